"""Portrait cache: an in-memory LRU with a byte budget, plus an optional on-disk safetensors store.

Key = portrait content (crop, mask, CLIP image, FiLM reference) + weights id + backend/dtype/device + seed. The
state's ReferenceNet banks are keyed by timestep inside the state, so one entry serves any step count.

With ``disk_dir`` (CLI ``--cache-dir``) each state is written there after a run that added to it (the banks
fill during the first run) and read back on a memory miss, e.g. by the next process: a later run with the
same portrait, weights and settings then runs no network on the portrait (its crop, face detection and
person mask still run: they make the key). Files are written under a
temporary name and renamed; an unreadable file is reported, ignored and rewritten, and so is a damaged one: each
file records a checksum of every tensor (safetensors files carry none of their own, so damaged bytes would be read
as another portrait's state). The store keeps to a size budget (``max_disk_bytes``, CLI ``--cache-max-gb``): least
recently used files go first; so they do where the store's disk has no room for a file to be written (a
budget larger than the disk's free space: the store rotates instead of keeping its old files and storing no new one).
Two processes that prepare one portrait at once both write its file; one whose state the file already holds
(another process's run of more steps wrote its banks meanwhile) leaves that file as it is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megactor_rt.files import SAFETENSORS_TEMPORARY, remove_stale, umask_mode
from megactor_rt.runtime.portrait import PortraitInputs, PortraitState

logger = logging.getLogger(__name__)


class PortraitCache:
    """LRU of ``PortraitState`` by key; safe to share between threads (one lock around every operation).

    Args:
        max_bytes: memory budget of the cached tensors (least recently used entries are evicted; the most
            recently used one stays even where it alone is over the budget: a run is using it).
        disk_dir: optional folder; states are also written there and read back on a memory miss.
        max_disk_bytes: budget of the store's files: after a write, the least recently used other files
            (by modification time; a read refreshes it) are deleted until the store fits.
    """

    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | Path | None = None,
                 max_disk_bytes: int = 20 << 30) -> None:
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._mem: OrderedDict[str, PortraitState] = OrderedDict()
        self._on_disk: dict[str, tuple[frozenset[int], str | None, int]] = {}  # key -> what its file holds
        # keys whose file is rewritten after the run: read without checksums (an older version's), damaged, unreadable
        self._rewrite: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()  # a file's rename and its record in _on_disk, together (not reads)

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self._mem.values())

    def get(self, key: str, device: torch.device | str = "cpu") -> PortraitState | None:
        """The state of ``key`` from memory, else from the disk store (read outside the lock: other threads'
        lookups do not wait for a file of some hundred MB), else None."""
        with self._lock:
            state = self._mem.get(key)
            if state is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                stored = self._path(key) if key in self._on_disk else None
        if state is not None:
            if stored is not None:  # a use of its file too: the last to go when the store is over its budget (was:
                try:  # a portrait used from memory all along went first)
                    os.utime(stored)
                except FileNotFoundError:  # removed by another process trimming the store: written again by persist
                    with self._lock:
                        self._on_disk.pop(key, None)
                except OSError:
                    pass
            return state
        with self._lock:
            if self.disk_dir is None:
                self.misses += 1
                return None
        loaded = self._load(key, device)
        with self._lock:
            state = self._mem.get(key)  # another thread may have put or read it meanwhile: that one is used
            if state is None and loaded is not None:
                state = self._mem[key] = loaded
                if self._path(key).is_file() and key not in self._rewrite:  # (not removed meanwhile by another
                    self._on_disk[key] = _content(loaded)  # process trimming the store; to be rewritten: not yet)
                self.disk_hits += 1
            if state is None:
                self.misses += 1
                return None
            self._mem.move_to_end(key)
            self.hits += 1
            self.trim()  # the state read back counts against the memory budget like any other
            return state

    def put(self, state: PortraitState) -> None:
        with self._lock:
            self._mem[state.key] = state
            self._mem.move_to_end(state.key)
            self.trim()

    def trim(self) -> None:
        """Evict least-recently-used entries until within budget (banks grow after ``put``)."""
        with self._lock:
            while len(self._mem) > 1 and self.nbytes > self.max_bytes:
                key, _ = self._mem.popitem(last=False)
                logger.debug("portrait cache: evicted %s", key[:12])

    def persist(self, state: PortraitState) -> bool:
        """Write ``state`` to the disk store if it holds more than its file (new banks or landmarks); returns
        whether it wrote (False too where another process's file already held it: :meth:`save`). No-op without
        ``disk_dir``. A store that cannot be written (full disk, no permission) is a warning, not an error: the run's
        output must not be lost to its cache."""
        with self._lock:
            if self.disk_dir is None or self._on_disk.get(state.key) == _content(state):
                return False
        try:
            wrote = self.save(state)
        except Exception as exc:  # noqa: BLE001 - any failure to store: warn, keep the run's result
            logger.warning("portrait cache: cannot write to %s (%s: %s); the portrait is not stored",
                           self.disk_dir, type(exc).__name__, exc)
            return False
        return wrote

    def save(self, state: PortraitState) -> bool:
        """Write a state (with the banks computed so far, and the portrait's landmarks if known) to the disk
        store: a temporary file, renamed on success. The tensors are gathered under the lock, the file is
        written outside it: other threads' lookups do not wait for a disk write of some hundred MB. Returns whether
        it wrote (not where the store's file, another process's, already holds the state)."""
        if self.disk_dir is None:
            return False
        with self._lock:
            content, tensors, meta = _snapshot(state)
        final = self._path(state.key)
        if self._kept(final, state.key, content):
            return False
        meta[CHECKSUM_KEY] = json.dumps(_checksums(tensors))  # (outside the lock: some hundred MB to hash)
        _make_folder(self.disk_dir)
        with self._lock:
            self._make_room(_file_bytes(tensors, meta), keep=final)
        tmp = final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # one per writer
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.chmod(tmp, umask_mode())  # a store shared by several users (safetensors writes 0600)
            with self._write_lock:  # two writers of one key: the record is the content of the file that stays
                if self._kept(final, state.key, content):  # written meanwhile, by another process, with more
                    return False
                tmp.replace(final)
                with self._lock:
                    self._on_disk[state.key] = content
                    self._rewrite.discard(state.key)
        finally:
            tmp.unlink(missing_ok=True)
        logger.debug("portrait cache: wrote %s (%d banks)", final.name, len(content[0]))
        with self._lock:
            self._trim_disk(keep=final)
        return True

    def _trim_disk(self, keep: Path) -> None:
        """Delete the least recently used state files (not ``keep``) until the store fits ``max_disk_bytes``,
        and temporary files older than an hour (left by a writer that was killed mid-write; a younger
        one may belong to another process writing now: :func:`megactor_rt.files.remove_stale`)."""
        assert self.disk_dir is not None
        self._remove_leftovers()
        total, full = 0, False
        for _, size, path in reversed(self._files()):  # newest first: each stays until one does not fit, then it
            if path != keep and (full or total + size > self.max_disk_bytes):  # and every older one go (a small
                full = True  # old file is not kept over a larger one used since)
                self._remove(path, f"store over {self.max_disk_bytes / 2**30:.3g} GiB")
                continue
            total += size

    def _kept(self, path: Path, key: str, content: tuple[frozenset[int], str | None, int]) -> bool:
        """Whether the store file ``path`` (another process's, as this cache has no record of it holding ``content``)
        already holds all of ``content``, with checksums: then it stays, and is recorded as holding it. Two
        processes preparing one portrait both write it; the one that finishes last must not replace the other's
        file of 25 steps' banks with its 2 steps' (the file's header alone is read). A file this cache found
        damaged, unreadable or without checksums is never kept."""
        banks, landmarks, kv = content
        with self._lock:
            if key in self._rewrite:
                return False
        try:
            with safe_open(str(path), "pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
            held = frozenset(json.loads(meta.get("banks", "[]")))
        except Exception:  # noqa: BLE001 - no file, or one that cannot be read: this writer's replaces it
            return False
        covers = (meta.get("key") == key and CHECKSUM_KEY in meta and banks <= held
                  and (landmarks is None or meta.get("landmarks_model") == landmarks)
                  and sum(n.startswith("token_kv_") for n in names) >= kv)
        if covers:
            logger.debug("portrait cache: %s already holds this state (%d banks); kept", path.name, len(held))
            with self._lock:
                self._on_disk[key] = content
                self._rewrite.discard(key)
        return covers

    def _remove_leftovers(self) -> None:
        """Temporary files of writers killed an hour ago or more: ours, and safetensors' own."""
        assert self.disk_dir is not None
        for leftover in ("*.safetensors.*.tmp", SAFETENSORS_TEMPORARY):
            remove_stale(self.disk_dir, leftover)

    def _make_room(self, need: int, keep: Path) -> None:
        """Where the store's disk has less than ``need`` bytes free (the file about to be written), delete killed
        writers' temporary files an hour old, then the least recently used state files (not ``keep``) until it has,
        or raise ENOSPC (deleting none) where deleting them all would not make room."""
        assert self.disk_dir is not None
        free = shutil.disk_usage(self.disk_dir).free
        if free < need:  # leftovers first: they hold no portrait
            self._remove_leftovers()
            free = shutil.disk_usage(self.disk_dir).free
        if free >= need:
            return
        files = [(size, path) for _, size, path in self._files() if path != keep]  # oldest first
        if free + sum(size for size, _ in files) < need:
            raise OSError(errno.ENOSPC, f"the disk holding it has {free / 2**20:.1f} MiB free and the portrait's file "
                          f"needs {need / 2**20:.1f} MiB")
        for _, path in files:
            self._remove(path, f"the disk holding the store has {free / 2**20:.1f} MiB free, the portrait's file "
                               f"needs {need / 2**20:.1f} MiB")
            free = shutil.disk_usage(self.disk_dir).free
            if free >= need:
                return

    def _files(self) -> list[tuple[int, int, Path]]:
        """The store's state files as (modification time, size, path), least recently used first (regular files
        only: a folder named like one, which cannot be removed as a file, is no state)."""
        assert self.disk_dir is not None
        found = []
        for p in self.disk_dir.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed meanwhile by another process trimming a shared store
                continue
            if stat.S_ISREG(st.st_mode):  # (was: a folder there ended every trim, the store grew past its budget)
                found.append((st.st_mtime_ns, st.st_size, p))
        return sorted(found)

    def _remove(self, path: Path, why: str) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # e.g. another user's file in a shared store with the sticky bit: it stays, and the
            # trim goes on with the others (was: the write that trimmed said 'not stored', and older files stayed)
            logger.warning("portrait cache: cannot remove %s (%s: %s) to keep the store within its budget; it stays",
                           path, type(exc).__name__, exc)
            return
        self._on_disk = {k: v for k, v in self._on_disk.items() if self._path(k) != path}
        logger.info("portrait cache: removed %s (%s)", path.name, why)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{_file_key(key)}.safetensors"

    def _load(self, key: str, device: torch.device | str) -> PortraitState | None:
        if self.disk_dir is None:
            return None
        path = self._path(key)
        try:
            if not path.is_file():
                return None
        except OSError as exc:  # e.g. a store folder this user may not search: computed, as without a store
            logger.warning("portrait cache: cannot look for %s (%s: %s); computing the portrait",
                           path, type(exc).__name__, exc)
            return None
        try:
            with safe_open(str(path), "pt") as f:  # one read: header (metadata) and tensors
                meta = f.metadata() or {}
                if meta.get("key") != key:  # a file-name collision, or a file from elsewhere: not this state
                    logger.warning("portrait cache: %s holds another portrait state; ignoring it", path)
                    return None
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable; host
            damaged = _damaged(t, meta)
            if damaged:
                named = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
                logger.warning("portrait cache: %s is damaged (%s does not match the checksum saved with it); "
                               "computing the portrait again", path, named)
                self._must_rewrite(key)
                return None
            with torch.inference_mode():  # as a computed state's (a compiled UNet's guards tell them apart)
                d = {k: v.to(device, copy=True) for k, v in t.items() if k not in _HOST_TENSORS}
            banks: dict[int, list[torch.Tensor]] = {}
            for name in sorted(k for k in d if k.startswith("bank_")):
                _, ts, _ = name.split("_")
                banks.setdefault(int(ts), []).append(d[name])
            kv_at = {int(k.rsplit("_", 1)[1]): v for k, v in d.items() if k.startswith("token_kv_")}
            whole = sorted(kv_at) == list(range(len(kv_at))) and len(kv_at) % 2 == 0  # k and v of every block
            kv = [kv_at[i] for i in range(len(kv_at))] if whole else []  # else computed on the first run
            inputs = PortraitInputs(t["in_image"], t["in_background_mask"], t["in_clip_image"], t["in_ada_reference"])
            lm = t.get("face_landmarks")
            state = PortraitState(key=key, inputs=inputs, ref_latent=d["ref_latent"], cond=d["cond"],
                                  tokens=d["tokens"], film_scale=d["film_scale"], film_shift=d["film_shift"],
                                  ada_reference=d["ada_reference"], banks=banks, token_kv=kv or None,
                                  face_landmarks=None if lm is None else lm.numpy(),
                                  landmarks_model=meta.get("landmarks_model") if lm is not None else None)
        except Exception as exc:  # a truncated or foreign file must not stop a run: recompute and rewrite it
            logger.warning("portrait cache: cannot read %s (%s: %s); computing the portrait again",
                           path, type(exc).__name__, exc)
            self._must_rewrite(key)
            return None
        with contextlib.suppress(OSError):  # removed meanwhile by another process trimming the store: it stands
            os.utime(path)  # recently used: the last to go when the store is over its budget
        if CHECKSUM_KEY not in meta:  # written by an older version: used, and rewritten with checksums after its run
            self._must_rewrite(key)
        return state

    def _must_rewrite(self, key: str) -> None:
        with self._lock:
            self._rewrite.add(key)


# stored tensors that stay on the host: the portrait's pixels (``PortraitInputs``) and its landmarks
_HOST_TENSORS = frozenset({"in_image", "in_background_mask", "in_clip_image", "in_ada_reference", "face_landmarks"})


def _snapshot(state: PortraitState) -> tuple[tuple[frozenset[int], str | None, int], dict[str, torch.Tensor],
                                             dict[str, str]]:
    """What a state's file holds (see :func:`_content`), its tensors on the host and its metadata."""
    content = _content(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors().items()}
    inp = state.inputs
    tensors.update({"in_image": inp.image, "in_background_mask": inp.background_mask,
                    "in_clip_image": inp.clip_image, "in_ada_reference": inp.ada_reference})
    tensors = _unshared(tensors)
    meta = {"key": state.key, "banks": json.dumps(sorted(content[0]))}
    if state.face_landmarks is not None and state.landmarks_model is not None:
        tensors["face_landmarks"] = torch.from_numpy(np.ascontiguousarray(state.face_landmarks))
        meta["landmarks_model"] = state.landmarks_model
    return content, tensors, meta


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor that shares memory with an earlier one copied (safetensors refuses shared
    memory; e.g. the portrait image is also its FiLM reference at 512 px)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def _content(state: PortraitState) -> tuple[frozenset[int], str | None, int]:
    """What a state's file would hold beyond the fixed tensors: bank timesteps, landmark model, how many of the
    tokens' keys/values (a file written by an older version has none; they are computed on its first use)."""
    return (frozenset(state.banks), state.landmarks_model if state.face_landmarks is not None else None,
            len(state.token_kv or ()))


# a store file's metadata key for its tensors' checksums: CRC-32, which finds damaged bytes (what it is for: no
# adversary writes the store) at 3x SHA-256's speed (0.12 against 0.37 s for a 512 px portrait's 360 MB here): on
# a GPU the portrait's state is computed in about a second, and every read of the store checks it
CHECKSUM_KEY = "crc32"


def _checksum(t: torch.Tensor) -> str:
    """A tensor's CRC-32 (of its dtype, shape and bytes), in hex."""
    head = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    return f"{zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data, head):08x}"


def _file_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> int:
    """About the size of the safetensors file of ``tensors`` and ``meta`` (the data, and a header of at most this
    much: a few hundred bytes a tensor and the metadata)."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 256 * len(tensors) + len(json.dumps(meta))


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: _checksum(t) for name, t in tensors.items()}


def _damaged(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> list[str]:
    """The names of the tensors read from a store file that do not match the checksums its metadata records (a
    tensor without one counts as damaged; a file without checksums, written by an older version, has none)."""
    if CHECKSUM_KEY not in meta:
        return []
    saved = json.loads(meta[CHECKSUM_KEY])
    return sorted(name for name, t in tensors.items() if saved.get(name) != _checksum(t))


def _make_folder(folder: Path) -> None:
    """``folder`` made where it is missing; one that is (or lies under) a symbolic link to nothing - a store on a drive
    not mounted, a folder moved - is named as such (was: 'File exists: <folder>', which it plainly does not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        link = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
        if link is None:
            raise
        raise FileNotFoundError(errno.ENOENT, f"{link} is a symbolic link to {os.readlink(link)}, which does not "
                                "exist (a drive not mounted, a folder moved?)") from exc


def _file_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]
