"""Resumable runs (``animate --checkpoint-dir DIR``): the denoising state saved after each step.

A long driver takes hours (a 10-minute song is 18 000 frames: about 2.3 hours at the 2.15 fps measured on an
H200), and an interrupted run (a crash, Ctrl-C, a preempted cloud machine) would start again from nothing. With
a checkpoint folder the latents of every frame are written there after each DDIM step (atomically: a file is
whole or absent); the same run started again finds them and continues with the next step. DDIM here draws no
noise after the initial one, so the result is the same, frame for frame, as an uninterrupted run's on the same
machine and backend.

A checkpoint belongs to one run: its name is a hash of the portrait (its prepared state's key: content, weights,
options), the driver's content (its bytes, hashed once per file version), the driver's plan (frames, crop), every
run setting that changes the math, the backend (with a graph backend, the exported graph each submodel but the
decoders runs: a re-export under the same weights is another run), precision and size; another run never reads it. It is removed once the run
has yielded its last frame. A run that finds none of its own says so where the folder holds one of the same portrait
and driver saved with other settings (a setting changed before starting it again) or ones an older version wrote
(neither is continued from). Wrapping windows only (the default): open windows (``--no-wrap``) finish frames at
different steps, so there is no state "after step i" to save. With feature reuse only the steps before a whole
UNet step are saved (the features kept in between are not). At 512 px a checkpoint is 64 KiB per frame (1.2 GB for
18 000 frames, rewritten after each step; the atomic write needs room for two while it is made). The temporary file
of a save killed midway is removed by the next run using the folder once it is an hour old.

A checkpoint that cannot be written (a full disk, a folder made read-only meanwhile) does not end the run: it is
said once (a warning) and the run goes on without saving more (the run is not lost for want of its insurance; a
file saved before stays, and a run started again would continue from it). ``animate --checkpoint-dir`` and
``serve --jobs-dir`` both save through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from megactor_rt.config import AnimateConfig
from megactor_rt.engine.cache import write_atomic
from megactor_rt.errors import InputError
from megactor_rt.files import not_writable, remove_stale, unwritable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "2"  # (2: the driver known by its bytes, not its path; saved in each file's metadata)


def check_checkpoint_dir(folder: str | Path) -> None:
    """A checkpoint folder can be written (it, or the nearest folder above it that exists: it is created).

    Raises:
        InputError: naming the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: the checkpoint folder (--checkpoint-dir) is a file")
    blocked = unwritable(folder)
    if blocked is not None:
        raise InputError(f"{folder}: the checkpoint folder (--checkpoint-dir) cannot be written "
                         f"({not_writable(blocked)})")


STALE_DAYS = 7  # a checkpoint untouched this long is said to be one of a run never started again


def warn_stale_checkpoints(folder: str | Path, days: float = STALE_DAYS) -> list[Path]:
    """Warn (logged) about checkpoints in ``folder`` untouched for ``days``: runs that were stopped and never
    started again, whose files stay until deleted (a checkpoint goes only when its run finishes). Returns them.
    Nothing is deleted: the same run started later still continues from its file."""
    import time

    cutoff = time.time() - days * 86400
    stale, size = [], 0
    for path in sorted(Path(folder).glob("run-*.safetensors")) if Path(folder).is_dir() else []:
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_mtime < cutoff:
            stale.append(path)
            size += st.st_size
    if stale:
        logger.warning("%s: %d checkpoint(s) (%.1f GB) of runs stopped more than %g days ago and never started "
                       "again, e.g. %s; they stay until deleted (a run with the same inputs and settings would still "
                       "continue from its own)", folder, len(stale), size / 1e9, days, stale[0].name)
    return stale


def inputs_key(facts: dict[str, Any]) -> str:
    """The hash of a run's portrait and driver alone (``facts``' ``portrait`` and ``driver``), saved with its
    checkpoint: a run of the same inputs that finds none of its own names one saved with other settings. The
    portrait is its content alone: its state's key (``digest|model, backend, precision, device|seed=N|...``) also
    names what computed it, which are other settings here (was: a run started again with another seed, precision,
    backend or device, whose state's key changed with them, was told of no checkpoint of its inputs)."""
    portrait = facts.get("portrait")
    if isinstance(portrait, str):
        portrait = portrait.split("|", 1)[0]
    doc = json.dumps({"portrait": portrait, "driver": facts.get("driver")}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def run_key(facts: dict[str, Any], config: AnimateConfig) -> str:
    """The hash naming a run's checkpoint: ``facts`` (portrait, driver, plan, backend...) and every setting of
    ``config`` that can change a bit of the latents."""
    settings = {k: v for k, v in config.plain().items() if k not in AnimateConfig.SAME_BITS}  # (not window_batch:
    # a run resumed with another would match neither uninterrupted run bit for bit)
    doc = json.dumps({"format": CHECKPOINT_FORMAT, **facts, "config": settings}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


class StepCheckpoint:
    """One run's checkpoint file in ``folder``: :meth:`load` before the loop, :meth:`save` after each step (the
    ``after_step`` hook of :func:`~megactor_rt.runtime.denoise.denoise`), :meth:`remove` once the run is done.

    Args:
        resumable: whether the loop can start at step ``i`` (with feature reuse: only at whole UNet steps).
    """

    def __init__(self, folder: str | Path, key: str, steps: int, resumable: Callable[[int], bool],
                 inputs: str | None = None) -> None:
        self.folder = Path(folder)
        check_checkpoint_dir(self.folder)
        self.path = self.folder / f"run-{key[:32]}.safetensors"
        if self.path.exists() and not self.path.is_file():  # (before the steps: its first save would fail)
            raise InputError(f"{self.path}: this run's checkpoint file is a folder here; remove it (or give another "
                             "--checkpoint-dir)")
        self.key, self.steps, self.resumable, self.inputs = key, steps, resumable, inputs
        self.failed: OSError | None = None  # why a save failed: no more are tried (the run goes on without)
        remove_stale(self.folder, ".run-*.safetensors.*.tmp")  # any run's save killed midway (kill -9, a preempted
        # machine) an hour ago or more: as large as its checkpoint, and named by no warning (was: left for ever where
        # that run was not started again with the same settings; write_atomic cleans only its own file's)

    def load(self, latents: torch.Tensor) -> int:
        """Copy the saved latents into ``latents`` and return the step to continue with (0: nothing saved, or a
        file that is not this run's, cannot be read or is damaged (its latents do not match the checksum saved
        with them), which is then overwritten by the first save)."""
        import torch

        if not self.path.is_file():
            self._name_others()
            return 0
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                saved = f.get_tensor("latents")
            step = int(meta.get("next_step", "0"))
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            logger.warning("%s: unreadable checkpoint (%s); the run starts from its first step", self.path, exc)
            return 0
        if meta.get("key") != self.key or saved.shape != latents.shape or not 0 < step <= self.steps:
            logger.warning("%s does not belong to this run; it starts from its first step", self.path)
            return 0
        damage = None
        if "sha256" not in meta:
            damage = "it carries no checksum (written by an older megactor-rt)"
        elif meta["sha256"] != _checksum(saved):
            damage = "its latents do not match the checksum saved with them"
        elif not bool(torch.isfinite(saved).all()):
            damage = "its latents hold NaN or infinite values"
        if damage is not None:
            logger.warning("%s: damaged checkpoint (%s); the run starts from its first step", self.path, damage)
            return 0
        latents.copy_(saved.to(device=latents.device, dtype=latents.dtype))
        if step == self.steps:  # a run stopped while its frames were decoded or handed out
            logger.info("every step of %d was done: decoding the latents saved in %s", self.steps, self.path)
        else:
            logger.info("resuming at step %d of %d from %s", step + 1, self.steps, self.path)
        return step

    def save(self, step: int, latents: torch.Tensor) -> None:
        """After step ``step`` (0-based): the latents, unless the loop could not start at the step after it."""
        from safetensors.torch import save

        following = step + 1
        if self.failed is not None or (following < self.steps and not self.resumable(following)):
            return
        saved = latents.detach().to("cpu", copy=True).contiguous()
        meta = {"key": self.key, "next_step": str(following), "steps": str(self.steps), "sha256": _checksum(saved),
                "format": CHECKPOINT_FORMAT}
        data = save({"latents": saved}, metadata=meta | ({"inputs": self.inputs} if self.inputs else {}))
        try:
            write_atomic(self.path, data)
        except OSError as exc:  # (said once; the run goes on)
            self.failed = exc
            logger.warning("%s: the checkpoint after step %d of %d cannot be written (%s); the run goes on without "
                           "saving its steps (stopped now, it would start again from %s)", self.path, following,
                           self.steps, exc.strerror or exc,
                           "the last step saved" if os.path.isfile(self.path) else "its first step")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _name_others(self) -> None:
        """This run has no checkpoint: say so where the folder holds one of the same portrait and driver saved with
        other settings (a setting changed before the run was started again: it does not continue from it), or ones
        an older megactor-rt wrote (which this version continues from never; said once per process)."""
        older: list[Path] = []
        for path in sorted(self.folder.glob("run-*.safetensors")):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
            except (OSError, ValueError, SafetensorError):
                continue
            if meta.get("format") != CHECKPOINT_FORMAT:  # (an older version's: its inputs' hash is of another kind)
                if path not in _OLDER_NAMED:
                    older.append(path)
            elif self.inputs is not None and meta.get("inputs") == self.inputs:
                logger.warning("%s: another run's checkpoint of this portrait and driver, saved with other settings "
                               "(or another seed, backend, precision, device or weights); a run continues only from one "
                               "of its own settings (changed since it was stopped?), so this run starts from its first "
                               "step (the file stays)", path)
        _OLDER_NAMED.update(older)
        if older:
            logger.warning("%s: %d checkpoint(s) written by an older megactor-rt, e.g. %s: this version continues "
                           "from none of them (a run of theirs starts from its first step); delete them once no older "
                           "version is to continue them", self.folder, len(older), older[0].name)


_OLDER_NAMED: set[Path] = set()  # older versions' checkpoints named already (once per process)


def _checksum(latents: torch.Tensor) -> str:
    """The SHA-256 of a checkpoint's latents (safetensors files carry no check of their own: damaged bytes would be
    read as other latents)."""
    import torch

    return hashlib.sha256(latents.contiguous().view(-1).view(torch.uint8).numpy().data).hexdigest()
