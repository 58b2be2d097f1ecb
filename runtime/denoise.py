"""The faithful denoising loop (backend-independent).

Upstream MegActor v1 (pipeline.py:778-895), step by step: every context window (frames modulo N) is
predicted, predictions are summed per frame and divided by the number of windows covering the frame, CFG
combines the unconditional and conditional halves, and one DDIM step (eta 0) updates all N latents.

What a "prediction" is - which backend, reference or optimized evaluation, where the ReferenceNet bank comes
from - is the job of the ``EpsModel`` passed in; this loop is the only copy of the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from megactor_rt.config import StepKind, step_kind
from megactor_rt.kernels.ops import ddim_cfg_update
from megactor_rt.models.scheduler import DDIMStep
from megactor_rt.progress import progress


class EpsModel(Protocol):
    """Predicts the noise of one window; ``begin_step`` lets it prepare per-timestep state (the bank) and says
    what this step runs (``kind``: both CFG halves or the conditional half only; whole UNet or feature reuse)."""

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None: ...

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep, window: int) -> torch.Tensor:
        """``latents (1, 4, F, h, w)`` of the window's frames -> eps ``(2, 4, F, h, w)`` ([uncond, cond]) in a CFG
        step, ``(1, 4, F, h, w)`` (cond) otherwise.
        ``frames``: the window's frame indices, a 1-D int64 tensor on the latents' device (made once per run by
        ``denoise``, so no predictor copies indices to the device while device work is queued).
        ``window``: the window's position in ``windows`` (the same frames at every step)."""
        ...


StepCallback = Callable[[int, DDIMStep, torch.Tensor, torch.Tensor], None]


def denoise(latents: torch.Tensor, model: EpsModel, plan: Sequence[DDIMStep], windows: Sequence[Sequence[int]],
            guidance: float, callback: StepCallback | None = None,
            on_step: Callable[[int], None] | None = None, cfg_steps: int | None = None,
            feature_reuse: int | None = None) -> torch.Tensor:
    """Run the whole DDIM schedule over all frames.

    Args:
        latents: initial noise ``(1, 4, N, h, w)``.
        model: window noise predictor; returns both CFG halves when ``guidance != 1``.
        plan: DDIM steps (timesteps and alpha-bars).
        windows: frame indices of each context window (see ``context_windows``).
        guidance: CFG scale; 1.0 means conditional only.
        callback: called after each step with (index, step, guided eps, new latents).
        on_step: called with i before step i and with ``len(plan)`` after the last (e.g. to time steps).
        cfg_steps: CFG truncation (changes the math; None = upstream, CFG in every step): guidance only in the
            first ``cfg_steps`` steps, the conditional half alone after them.
        feature_reuse: feature reuse (changes the math; None or 1 = upstream): the whole UNet every
            ``feature_reuse``-th step, the shallow path from each window's kept deep feature in between.

    Returns:
        Final latents ``(1, 4, N, h, w)``.
    """
    n = latents.shape[2]
    counts = torch.zeros(n, dtype=torch.float32)
    for w in windows:
        counts[list(w)] += 1
    counts = counts.to(latents.device)
    # frame indices on the device once, before any device work: building them per window would make the host
    # wait for the device (a blocking host-to-device copy) before every window
    indices = [torch.as_tensor(list(w), device=latents.device) for w in windows]
    bar = progress(total=len(plan) * len(windows), desc="denoise", unit="window")
    for i, step in enumerate(plan):
        if on_step is not None:
            on_step(i)
        kind = step_kind(i, guidance, cfg_steps, feature_reuse)
        halves = 2 if kind.cfg else 1
        model.begin_step(step, kind)
        acc = torch.zeros((halves, *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
        for k, idx in enumerate(indices):
            eps = model.predict(latents[:, :, idx], idx, step, k)  # (halves, 4, F, h, w)
            if eps.shape[0] != halves:
                raise ValueError(f"EpsModel returned batch {eps.shape[0]}, expected {halves}")
            acc.index_add_(2, idx, eps.to(acc.dtype))
            bar.update(1)
        guided = torch.empty_like(latents) if callback is not None else None
        latents = ddim_cfg_update(acc, counts, latents, guidance, step.alpha_t, step.alpha_prev, eps_out=guided)
        if callback is not None and guided is not None:  # guided is made exactly when there is a callback
            callback(i, step, guided, latents)
    bar.close()
    if on_step is not None:
        on_step(len(plan))
    return latents
