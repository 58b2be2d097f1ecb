"""Window noise predictors (``EpsModel`` implementations) for the two evaluation modes.

``OptimizedPredictor`` applies only exact-preserving savings: the bank is computed at batch 1 once per
timestep per portrait (cached in the PortraitState), PoseGuider features once per frame (an input here),
the down path once for both CFG halves, and reference attention only in the conditional half.
``ReferencePredictor`` evaluates as upstream does (batch-2 ReferenceNet every step, PoseGuider and FiLM
inside every call, batch-2 UNet with the bank attention computed for both halves and the unconditional
half recomputed): same math, used as the baseline in benchmarks and equivalence tests.

Both implement feature reuse (``AnimateConfig.feature_reuse``) the same way: with it on, every whole UNet call
keeps its deep feature per window, and a reusing step runs the shallow path from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch

from megactor_rt.config import StepKind
from megactor_rt.models.scheduler import DDIMStep
from megactor_rt.runtime.pipeline import to_device_queued
from megactor_rt.runtime.portrait import PortraitState
from megactor_rt.runtime.submodels import Submodels


def reusable(deep: torch.Tensor | None, cfg: bool, windows: int = 1) -> torch.Tensor | None:
    """The part of a kept deep feature ``(B, F, C, h, w)`` of ``windows`` windows a call of this kind can reuse:
    the CFG pair needs both halves (B = 2 x windows, [uncond | cond]); a conditional-only call takes the
    conditional (last) ones."""
    if deep is None or (cfg and deep.shape[0] != 2 * windows):
        return None
    return deep if cfg else deep[-windows:]


def cfg_pair(cfg: bool) -> dict[str, Any]:
    """The CFG arguments of a ``sub.unet`` call on one sample per window: with CFG, the shared down path and
    output [uncond | cond]; without, none (the conditional half alone)."""
    return {"n_uncond": 1, "shared_down": True} if cfg else {}


def kept_feature_bytes(windows: int, window: int, cfg: bool, channels: int, latent: int, itemsize: int) -> int:
    """Bytes of the deep features feature reuse keeps: one ``(halves, F, C0, h, w)`` tensor per window."""
    return windows * (2 if cfg else 1) * window * channels * latent * latent * itemsize


def feature_offload(device: torch.device, nbytes: int, share: float = 0.5) -> bool:
    """Whether kept deep features should live in host memory: on CUDA when they would take more than ``share``
    of the free device memory (long drivers: about 10 MB per frame at 512 px, fp16, CFG, overlap 8). Costs a
    device-host copy of each feature per whole step and back per reusing step."""
    return device.type == "cuda" and nbytes > share * torch.cuda.mem_get_info(device)[0]


class PoseFeed:
    """PoseGuider features of a driver's frames, computed as the denoising loop first needs them.

    The frames come from an iterator (the driver's second pass, decoded and preprocessed on worker threads);
    each window's first call pulls the frames up to its last one, in batches of ``batch`` consecutive frames
    from frame 0 - the batches a whole-clip pass makes, so the features are the same values. Decoding and
    preprocessing the rest of the driver thus overlaps denoising instead of preceding it (in step order the
    windows of step 0 need their frames in order; the open-window wavefront likewise).

    The features are kept per batch; ``release(k)`` (after window k's last call) drops the batches no later
    window holds, so with open windows only the frames in flight are kept, whatever the driver's length.

    Args:
        frames: ``(3, S, S)`` PoseGuider inputs of frames 0..n-1, in order.
        windows: the run's context windows (a window's last frame decides how far its first call pulls).
    """

    def __init__(self, sub: Submodels, frames: Iterator[torch.Tensor], n: int, film_scale: torch.Tensor,
                 film_shift: torch.Tensor, windows: Sequence[Sequence[int]], batch: int) -> None:
        self.sub, self.frames, self.n, self.batch = sub, frames, n, batch
        self.scale, self.shift = film_scale, film_shift
        self.windows = [list(w) for w in windows]
        self.need = [max(w) + 1 for w in windows]
        self.keep_from = [n] * len(windows)  # the lowest frame of the windows after k
        for k in range(len(windows) - 2, -1, -1):
            self.keep_from[k] = min(self.keep_from[k + 1], min(windows[k + 1]))
        self.batches: dict[int, torch.Tensor] = {}  # first frame -> features (1, 4, b, h, w), contiguous
        self.done = 0  # frames whose features have been computed
        self.seconds = 0.0  # host time spent here: waiting for frames, PoseGuider calls

    def window(self, window: int, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``(1, 4, F, h, w)`` of window ``window``'s frames (a new tensor). ``frames`` (its indices on
        the device) is not needed: the feed knows the windows.

        Raises:
            RuntimeError: a frame released before (see ``release``).
        """
        self.fill(self.need[window])
        pieces = []
        w = self.windows[window]
        i = 0
        while i < len(w):  # runs of consecutive frames within one batch
            first = w[i] - w[i] % self.batch
            chunk = self.batches.get(first)
            if chunk is None:
                raise RuntimeError(f"PoseGuider features of frame {w[i]} were released before window {window}")
            j = i + 1
            while j < len(w) and w[j] == w[j - 1] + 1 and w[j] < first + chunk.shape[2]:
                j += 1
            pieces.append(chunk[:, :, w[i] - first:w[j - 1] - first + 1])
            i = j
        return torch.cat(pieces, dim=2)

    def fill(self, end: int) -> None:
        """Compute features up to frame ``end`` (exclusive), a batch at a time.

        Raises:
            RuntimeError: the frame iterator ended before frame ``end``.
        """
        t0 = time.perf_counter()
        while self.done < end:
            batch = list(islice(self.frames, min(self.batch, self.n - self.done)))
            if not batch:
                raise RuntimeError(f"driver frames ended after {self.done} of {self.n}")
            frames = to_device_queued(torch.stack(batch), self.sub.device)  # no host wait for the denoising
            out = self.sub.pose_features(frames, self.scale, self.shift)  # (b, 4, h, w)
            self.batches[self.done] = out.permute(1, 0, 2, 3)[None].contiguous()
            self.done += len(batch)
        self.seconds += time.perf_counter() - t0

    def release(self, window: int) -> None:
        """Window ``window`` has had its last call: drop the batches no later window holds a frame of."""
        keep = self.keep_from[window]
        for first in [f for f, chunk in self.batches.items() if f + chunk.shape[2] <= keep]:
            del self.batches[first]

    def close(self) -> None:
        """Stop the frame source (its worker thread) if it can be stopped."""
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()


class _Base:
    def __init__(self, sub: Submodels, state: PortraitState, guidance: float, reference_timestep: int | None,
                 feature_reuse: bool = False):
        self.sub, self.state = sub, state
        self.cfg = guidance != 1.0  # this step evaluates both CFG halves (begin_step may turn it off)
        self.reference_timestep = reference_timestep
        self.bank: list[torch.Tensor] | None = None
        self.keep = feature_reuse  # whole calls keep their deep feature, per window
        self.reuse = False  # this step reuses them
        self.deep: dict[int, torch.Tensor] = {}
        self.offload = False  # keep them in host memory (see ``feature_offload``)
        self.token_kv: list[torch.Tensor] | None = None  # the tokens' cross-attention K/V (optimized path)

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        self.cfg, self.reuse = kind.cfg, kind.reuse

    def end_window(self, window: int) -> None:
        self.deep.pop(window, None)  # its kept feature: streaming runs hold only the windows in flight

    def unet(self, windows: Sequence[int], latents: torch.Tensor, timestep: int, tokens: torch.Tensor,
             pose: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
        """One ``sub.unet`` call on this step's bank for the K windows ``windows`` (``latents (K, 9, F, h, w)``,
        ``pose (K, 4, F, h, w)``; ``kwargs``: the CFG arguments, by default the shared-down pair), with feature
        reuse: the shallow path where this step reuses and the windows have kept features of the right kind,
        else the whole UNet (keeping its deep features when reuse is on). Returns each window's output
        ``(halves, 4, F, h, w)``: the call's is [K uncond | K cond] (CFG) or [K cond], so window j's rows are j
        and K + j."""
        kwargs = kwargs or cfg_pair(self.cfg)
        k = len(windows)
        deeps = [reusable(self.deep.get(w), self.cfg) if self.reuse else None for w in windows]
        if any(d is None for d in deeps) and any(d is not None for d in deeps):
            # denoise's step order keeps every window of a step in the same state
            raise ValueError(f"windows {list(windows)} share a UNet call but only some have a kept feature to reuse")
        if deeps[0] is not None and self.offload:  # from pinned memory: queued, no host wait; joined on the
            # device below, in stream order after the copies that wrote the host buffers (a host-side join would
            # read them before those copies are done)
            deeps = [d.to(latents.device, non_blocking=True) for d in deeps]  # type: ignore[union-attr]
        deep = deeps[0]
        if deep is not None and k > 1:  # [uncond of each window | cond of each window]
            deep = torch.cat([d[half:half + 1] for half in range(deep.shape[0]) for d in deeps])  # type: ignore
        out = self.sub.unet(latents, timestep, tokens, pose, self.bank, deep=deep,
                            keep_deep=self.keep and deep is None, token_kv=self.token_kv, **kwargs)
        out, kept = out if isinstance(out, tuple) else (out, None)
        halves = out.shape[0] // k
        if kept is not None:
            kept = kept.unflatten(0, (halves, k))
            for j, w in enumerate(windows):
                self._keep(w, kept[:, j])
        if k == 1:
            return [out]
        eps = out.unflatten(0, (halves, k))  # (halves, K, 4, F, h, w)
        return [eps[:, j] for j in range(k)]

    def _keep(self, window: int, deep: torch.Tensor) -> None:
        if not self.offload:
            self.deep[window] = deep
            return
        host = self.deep.get(window)
        layout = torch.empty_like(deep, device="meta")  # the device's strides where dense, else suggested ones
        if host is None or host.shape != deep.shape or host.stride() != layout.stride():
            # same layout as on the device (the kernels that read it back choose by layout; a window's part of a
            # several-window call is not dense and gets the layout torch suggests for it); pinned on CUDA, so
            # the copies queue without a host wait
            host = self.deep[window] = torch.empty_like(deep, device="cpu", pin_memory=deep.device.type == "cuda")
        host.copy_(deep, non_blocking=True)  # stream order keeps it ahead of the next step's read

    def ref_t(self, step: DDIMStep) -> int:
        return step.timestep if self.reference_timestep is None else self.reference_timestep

    def window_latents(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """``(1, 4, F, h, w)`` -> ``(1, 9, F, h, w)``: noisy | reference latent + mask (same for every frame)."""
        cond = self.state.cond[:, :, None].expand(-1, -1, len(frames), -1, -1)
        return torch.cat([latents.to(cond.dtype), cond], dim=1)


class OptimizedPredictor(_Base):
    def __init__(self, sub: Submodels, state: PortraitState, pose_features: torch.Tensor | PoseFeed, guidance: float,
                 reference_timestep: int | None = None, feature_reuse: bool = False) -> None:
        """``pose_features``: PoseGuider output of all frames, ``(1, 4, N, h, w)``, or a ``PoseFeed`` that
        computes it as windows need it."""
        super().__init__(sub, state, guidance, reference_timestep, feature_reuse)
        self.token_kv = state.cross_kv(sub)  # projected once per portrait, not in every call
        self.pose = pose_features
        self.window_batch = 1  # windows per UNet call in ``denoise`` (``predict_windows``; see AnimateConfig)

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        super().begin_step(step, kind)
        self.bank = self.state.bank(self.ref_t(step), self.sub)

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep, window: int) -> torch.Tensor:
        lat = self.window_latents(latents, frames)
        return self.unet([window], lat, step.timestep, self.state.tokens, self._pose(window, frames))[0]

    def predict_windows(self, latents: torch.Tensor, frames: Sequence[torch.Tensor], step: DDIMStep,
                        windows: Sequence[int]) -> list[torch.Tensor]:
        """``predict`` for K windows of equal length in one UNet call (``latents (K, 4, F, h, w)``): the same
        math, a bigger batch (see ``AnimateConfig.window_batch``)."""
        lat = torch.cat([self.window_latents(latents[j:j + 1], f) for j, f in enumerate(frames)])
        pose = torch.cat([self._pose(w, f) for w, f in zip(windows, frames)])
        return self.unet(windows, lat, step.timestep, self.state.tokens, pose)

    def end_window(self, window: int) -> None:
        super().end_window(window)
        if isinstance(self.pose, PoseFeed):  # the features no later window needs
            self.pose.release(window)

    def _pose(self, window: int, frames: torch.Tensor) -> torch.Tensor:
        if isinstance(self.pose, PoseFeed):
            return self.pose.window(window, frames)
        return self.pose.index_select(2, frames.to(self.pose.device))


class ReferencePredictor(_Base):
    def __init__(self, sub: Submodels, state: PortraitState, driving: torch.Tensor, guidance: float,
                 reference_timestep: int | None = None, feature_reuse: bool = False) -> None:
        """``driving``: preprocessed driving frames of all N frames, ``(1, 3, N, H, W)`` in [0, 1]; moved to the
        networks' device and dtype once here (upstream keeps them on the GPU too), not per window."""
        super().__init__(sub, state, guidance, reference_timestep, feature_reuse)
        self.driving = sub._in(driving)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def _dup(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.batch, *([1] * (x.dim() - 1)))

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        super().begin_step(step, kind)
        s = self.state
        self.bank = self.sub.reference_bank(self._dup(s.ref_latent), self.ref_t(step), self._dup(s.tokens))

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep, window: int) -> torch.Tensor:
        s = self.state
        frames_in = self.driving.index_select(2, frames.to(self.driving.device))
        pose = self.sub.pose_guider_full(self._dup(frames_in), self._dup(s.ada_reference))
        lat = self._dup(self.window_latents(latents, frames))
        return self.unet([window], lat, step.timestep, self._dup(s.tokens), pose, n_uncond=1 if self.cfg else 0,
                         upstream=True)[0]
