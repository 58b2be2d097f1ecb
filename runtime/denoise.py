"""The faithful denoising loop (backend-independent), in two orders.

Upstream MegActor v1 (pipeline.py:778-895), step by step (``denoise``): every context window (frames modulo N)
is predicted, predictions are summed per frame and divided by the number of windows covering the frame, CFG
combines the unconditional and conditional halves, and one DDIM step (eta 0) updates all N latents.

``denoise_stream`` computes the same per-frame math on open (non-wrapping) windows in a wavefront order: a
window runs step s as soon as every frame it holds has finished step s - 1, lowest window first, so the first
frames are final after about steps x (steps + 1) / 2 window calls instead of after all of them.

What a "prediction" is - which backend, reference or optimized evaluation, where the ReferenceNet bank comes
from - is the job of the ``EpsModel`` passed in.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from megactor_rt.config import StepKind, step_kind
from megactor_rt.kernels.ops import ddim_cfg_update
from megactor_rt.models.scheduler import DDIMStep
from megactor_rt.progress import progress
from megactor_rt.runtime.pipeline import check_cancelled


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

    def end_window(self, window: int) -> None:
        """``window`` will not be predicted again in this run (per-window state can go)."""
        ...


class BatchedEpsModel(EpsModel, Protocol):
    """An ``EpsModel`` that can also predict several windows in one call (``denoise`` uses it when its
    ``window_batch`` is above 1)."""

    window_batch: int

    def predict_windows(self, latents: torch.Tensor, frames: Sequence[torch.Tensor], step: DDIMStep,
                        windows: Sequence[int]) -> list[torch.Tensor]:
        """``predict`` for K windows of equal length: ``latents (K, 4, F, h, w)``, their frame indices and
        positions -> K predictions, each as ``predict`` returns it."""
        ...


def window_batches(windows: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """Positions of ``windows`` grouped into UNet calls, in order: ``batch`` consecutive windows of equal length
    per call, and the windows left over (fewer than ``batch``) one per call. Calls thus hold 1 or ``batch``
    windows, whatever the window count: the two shapes ``Animator.warmup`` prepares (a compiled UNet compiles
    once per shape)."""
    if batch < 1:
        raise ValueError(f"window batch must be >= 1, got {batch}")
    groups: list[list[int]] = []
    run: list[int] = []  # consecutive windows of one length not yet in a call
    for k, w in enumerate(windows):
        if run and len(windows[run[0]]) != len(w):
            groups += [[j] for j in run]
            run = []
        run.append(k)
        if len(run) == batch:
            groups.append(run)
            run = []
    return groups + [[j] for j in run]


StepCallback = Callable[[int, DDIMStep, torch.Tensor, torch.Tensor], None]


def denoise(latents: torch.Tensor, model: EpsModel, plan: Sequence[DDIMStep], windows: Sequence[Sequence[int]],
            guidance: float, callback: StepCallback | None = None,
            on_step: Callable[[int], None] | None = None, cfg_steps: int | None = None,
            feature_reuse: int | None = None) -> torch.Tensor:
    """Run the whole DDIM schedule over all frames.

    Args:
        latents: initial noise ``(1, 4, N, h, w)``.
        model: window noise predictor; returns both CFG halves when ``guidance != 1``. A ``BatchedEpsModel``
            whose ``window_batch`` is K > 1 gets up to K windows per call (``window_batches``); every frame
            still sums its windows' predictions in window order.
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
    counts, indices = _coverage(latents, windows)
    per_call = getattr(model, "window_batch", 1)
    batched: BatchedEpsModel | None = model if per_call > 1 else None  # type: ignore[assignment]
    groups = window_batches(windows, per_call)
    bar = progress(total=len(plan) * len(windows), desc="denoise", unit="window")
    for i, step in enumerate(plan):
        if on_step is not None:
            on_step(i)
        kind = step_kind(i, guidance, cfg_steps, feature_reuse)
        halves = 2 if kind.cfg else 1
        model.begin_step(step, kind)
        acc = torch.zeros((halves, *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
        for group in groups:
            check_cancelled()
            if len(group) == 1:
                k = group[0]
                preds = [model.predict(latents[:, :, indices[k]], indices[k], step, k)]  # (halves, 4, F, h, w)
            else:
                assert batched is not None  # groups of several windows only come from a batched model
                lat = torch.cat([latents[:, :, indices[k]] for k in group])
                preds = batched.predict_windows(lat, [indices[k] for k in group], step, group)
            for k, eps in zip(group, preds, strict=True):  # summed in window order, as one window per call does
                if eps.shape[0] != halves:
                    raise ValueError(f"EpsModel returned batch {eps.shape[0]}, expected {halves}")
                acc.index_add_(2, indices[k], eps.to(acc.dtype))
                bar.update(1)
        guided = torch.empty_like(latents) if callback is not None else None
        latents = ddim_cfg_update(acc, counts, latents, guidance, step.alpha_t, step.alpha_prev, eps_out=guided)
        if callback is not None and guided is not None:  # guided is made exactly when there is a callback
            callback(i, step, guided, latents)
    bar.close()
    if on_step is not None:
        on_step(len(plan))
    return latents


def _coverage(latents: torch.Tensor, windows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Windows covering each frame ``(N,)`` and each window's frame indices, on the latents' device. Both are made
    once per run, before any device work: building indices per window would make the host wait for the
    device (a blocking host-to-device copy) before every window."""
    counts = torch.zeros(latents.shape[2], dtype=torch.float32)
    for w in windows:
        counts[list(w)] += 1
    return counts.to(latents.device), [torch.as_tensor(list(w), device=latents.device) for w in windows]


def _open_spans(windows: Sequence[Sequence[int]], n: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each window; ValueError unless the windows are open: contiguous ranges with strictly
    increasing starts and ends that cover frames 0..n-1 without a gap (``context_windows(closed_loop=False)``)."""
    spans = [(w[0], w[0] + len(w)) for w in windows]
    ok = bool(windows) and all(list(w) == list(range(a, b)) for w, (a, b) in zip(windows, spans))
    ok = ok and spans[0][0] == 0 and spans[-1][1] == n
    ok = ok and all(a0 < a1 <= b0 < b1 for (a0, b0), (a1, b1) in zip(spans, spans[1:]))
    if not ok:
        raise ValueError("denoise_stream needs open windows (contiguous, increasing, covering every frame; "
                         "context_windows(..., closed_loop=False)), got wrapping or unordered ones")
    return spans


def wavefront(windows: Sequence[Sequence[int]], n: int, steps: int) -> Iterator[tuple[int, int]]:
    """The order of ``denoise_stream``'s window calls: ``(window, step)`` pairs, each window's steps in order.

    Window k may run step s once window k-1 has run step s (so every frame sums its windows' predictions in
    window order, as ``denoise`` does) and every window owning one of its frames has run step s - 1 (the frame
    has its latent after step s - 1); of the windows that may, the lowest runs. The lowest window with the
    fewest steps done always may, so the order never stalls and holds every pair. Frames [start_k, start_k+1)
    are owned by window k, the last window holding them: their DDIM update for step s follows window k's call
    at step s.

    Raises:
        ValueError: the windows are not open (see ``_open_spans``).
    """
    spans = _open_spans(windows, n)
    starts = [a for a, _ in spans]
    reach = [bisect_left(starts, b) - 1 for _, b in spans]  # the last window owning a frame of window k
    done = [0] * len(spans)  # steps each window has run
    lowest = 0  # lowest window with steps left
    while lowest < len(spans):
        k = next(k for k in range(lowest, len(spans)) if _ready(k, done, reach, steps))
        yield k, done[k]
        done[k] += 1
        while lowest < len(spans) and done[lowest] == steps:
            lowest += 1


def windows_in_flight(windows: Sequence[Sequence[int]], n: int, steps: int) -> int:
    """The most windows ``denoise_stream`` has begun and not finished at once (each holds a kept deep feature
    under feature reuse): about ``steps`` + 1 once there are more windows than that."""
    most = now = 0
    for _, s in wavefront(windows, n, steps):
        now += s == 0
        most = max(most, now)
        now -= s == steps - 1
    return most


def denoise_stream(latents: torch.Tensor, model: EpsModel, plan: Sequence[DDIMStep],
                   windows: Sequence[Sequence[int]], guidance: float, cfg_steps: int | None = None,
                   feature_reuse: int | None = None) -> Iterator[int]:
    """``denoise``'s math on open windows, in wavefront order; frames are final in order, long before the end.

    Every frame gets the same per-step sum of its windows' predictions (added in the same window order), the
    same CFG and the same DDIM update as in ``denoise``, so the final latents are the same, bit for bit; only
    the order of the window calls differs (:func:`wavefront`).

    Args:
        latents: initial noise ``(1, 4, N, h, w)``, updated in place (frame f holds its final latent once a
            yielded count exceeds f).
        windows: open windows (``context_windows(..., closed_loop=False)``); ValueError otherwise.
        model, plan, guidance, cfg_steps, feature_reuse: as for ``denoise``. ``model.begin_step`` is called
            whenever the next window call is at another step than the last one; ``model.end_window`` after a
            window's last call.

    Yields:
        After every window call, the number of leading frames that are final (non-decreasing; N at the end).
    """
    n, steps = latents.shape[2], len(plan)
    starts = [a for a, _ in _open_spans(windows, n)]  # ValueError at the first next(), before any model call
    own = list(zip(starts, [*starts[1:], n]))  # frames whose last window is k: [start_k, start_k+1)
    counts, indices = _coverage(latents, windows)
    acc = torch.zeros((2 if guidance != 1.0 else 1, *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
    current: int | None = None
    final = 0  # frames final so far
    bar = progress(total=steps * len(windows), desc="denoise", unit="window")
    for k, s in wavefront(windows, n, steps):
        step, kind = plan[s], step_kind(s, guidance, cfg_steps, feature_reuse)
        halves = 2 if kind.cfg else 1
        if current != s:
            model.begin_step(step, kind)
            current = s
        idx = indices[k]
        check_cancelled()
        eps = model.predict(latents[:, :, idx], idx, step, k)
        if eps.shape[0] != halves:
            raise ValueError(f"EpsModel returned batch {eps.shape[0]}, expected {halves}")
        part = acc[acc.shape[0] - halves:]  # a conditional-only step sums into the conditional slot
        part.index_add_(2, idx, eps.to(acc.dtype))
        a, b = own[k]
        latents[:, :, a:b] = ddim_cfg_update(part[:, :, a:b], counts[a:b], latents[:, :, a:b], guidance,
                                             step.alpha_t, step.alpha_prev)
        acc[:, :, a:b] = 0
        bar.update(1)
        if s == steps - 1:
            model.end_window(k)
            final = b
        yield final
    bar.close()


def _ready(k: int, done: list[int], reach: list[int], steps: int) -> bool:
    """Whether window k may run its next step s (see :func:`wavefront`)."""
    s = done[k]
    if s == steps or (k > 0 and done[k - 1] <= s):
        return False
    return all(done[j] >= s for j in range(k + 1, reach[k] + 1))
