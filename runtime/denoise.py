"""The faithful denoising loop (backend-independent), in two orders.

Upstream MegActor v1 (pipeline.py:778-895), step by step (``denoise``): every context window (frames modulo N)
is predicted, predictions are summed per frame and divided by the number of windows covering the frame, CFG
combines the unconditional and conditional halves, and one DDIM step (eta 0) updates all N latents.

``denoise_stream`` computes the same per-frame math on open (non-wrapping) windows in a wavefront order: a
window runs step s as soon as every frame it holds has finished step s - 1, lowest window first, so the first
frames are final after about steps x (steps + 1) / 2 window calls instead of after all of them. It holds the
latents of the frames in flight only (window 16 / overlap 8: 40 frames at 3 steps, 216 at 25), so its memory
does not grow with the driver's length; ``denoise`` holds all N frames' latents, as every step runs every window.

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
from megactor_rt.runtime.pipeline import check_cancelled, to_device_queued


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
            feature_reuse: int | None = None, start_step: int = 0,
            after_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the whole DDIM schedule over all frames.

    Within a step a frame's DDIM update is made as soon as the last window holding it has been predicted
    (windows run in order; no later window of the step reads it), from its own sum of predictions: the same
    per-frame math as one update of all frames after the last window, bit for bit, but the prediction sums are
    held only for the frames begun and not yet updated (a window or two, plus the frames the last windows wrap
    onto), not for all N frames. What stays N frames long is the latents themselves.

    Args:
        latents: initial noise ``(1, 4, N, h, w)``; updated in place, step by step.
        model: window noise predictor; returns both CFG halves when ``guidance != 1``. A ``BatchedEpsModel``
            whose ``window_batch`` is K > 1 gets up to K windows per call (``window_batches``); every frame
            still sums its windows' predictions in window order.
        plan: DDIM steps (timesteps and alpha-bars).
        windows: frame indices of each context window (see ``context_windows``).
        guidance: CFG scale; 1.0 means conditional only.
        callback: called after each step with (index, step, guided eps, new latents) (both of all N frames,
            gathered and copied for it).
        on_step: called with i before step i and with ``len(plan)`` after the last (e.g. to time steps).
        cfg_steps: CFG truncation (changes the math; None = upstream, CFG in every step): guidance only in the
            first ``cfg_steps`` steps, the conditional half alone after them.
        feature_reuse: feature reuse (changes the math; None or 1 = upstream): the whole UNet every
            ``feature_reuse``-th step, the shallow path from each window's kept deep feature in between.
        start_step: begin with this step, ``latents`` being the state after the steps before it (a resumed
            run: :mod:`~megactor_rt.runtime.checkpoint`); with feature reuse it must be a whole UNet step.
        after_step: called with (i, latents) after step i (the latents of all frames, not copied).

    Returns:
        Final latents ``(1, 4, N, h, w)`` (``latents``).
    """
    counts, indices = _coverage(latents, windows)
    per_call = getattr(model, "window_batch", 1)
    batched: BatchedEpsModel | None = model if per_call > 1 else None  # type: ignore[assignment]
    groups = window_batches(windows, per_call)
    # the frames each call finishes (their last window is in it), as host lists and device indices, made once
    last = {f: k for k, w in enumerate(windows) for f in w}  # dicts keep the last value written: the last window
    call_of = {k: g for g, group in enumerate(groups) for k in group}
    finishes: list[list[int]] = [[] for _ in groups]
    for f, k in sorted(last.items()):
        finishes[call_of[k]].append(f)
    finish_idx = [torch.as_tensor(fs, device=latents.device) if fs else None for fs in finishes]
    finish_counts = [counts.index_select(0, ix) if ix is not None else None for ix in finish_idx]
    shape = latents.shape[3:]
    if start_step and step_kind(start_step, guidance, cfg_steps, feature_reuse).reuse:
        raise ValueError(f"step {start_step} reuses the deep features of the step before it; a run cannot start there")
    # the bar is closed also when the loop stops early (an error, Ctrl-C, a cancelled run)
    with progress(total=(len(plan) - start_step) * len(windows), desc="denoise", unit="window") as bar:
        for i, step in enumerate(plan[start_step:], start_step):
            if on_step is not None:
                on_step(i)
            kind = step_kind(i, guidance, cfg_steps, feature_reuse)
            halves = 2 if kind.cfg else 1
            model.begin_step(step, kind)
            sums: dict[int, torch.Tensor] = {}  # frame -> its prediction sums (halves, 4, h, w), until its update
            guided = torch.empty_like(latents) if callback is not None else None
            for g, group in enumerate(groups):
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
                    eps = eps.to(latents.dtype)
                    for j, f in enumerate(windows[k]):
                        if f not in sums:
                            sums[f] = latents.new_zeros((halves, latents.shape[1], *shape))
                        sums[f].add_(eps[:, :, j])
                    bar.update(1)
                ix = finish_idx[g]
                if ix is not None:  # these frames' sums are complete: their update, now
                    acc = torch.stack([sums.pop(f) for f in finishes[g]], dim=2)  # (halves, 4, m, h, w)
                    out = torch.empty((1, *acc.shape[1:]), dtype=latents.dtype, device=latents.device) \
                        if guided is not None else None
                    new = ddim_cfg_update(acc, finish_counts[g], latents.index_select(2, ix), guidance, step.alpha_t,
                                          step.alpha_prev, eps_out=out)
                    latents.index_copy_(2, ix, new)
                    if guided is not None and out is not None:
                        guided.index_copy_(2, ix, out)
            assert not sums, "every frame is updated once per step"
            if callback is not None and guided is not None:  # guided is made exactly when there is a callback
                callback(i, step, guided, latents.clone())  # a copy: ``latents`` changes in place at the next step
            if after_step is not None:
                after_step(i, latents)
    if on_step is not None:
        on_step(len(plan))
    for k in range(len(windows)):  # no window runs again: its kept feature and driver features can go before the
        model.end_window(k)  # decode (they are about 10 MB per frame at 512 px with feature reuse)
    return latents


def _counts(n: int, windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Windows covering each of the ``n`` frames, ``(n,)`` float32 on the host."""
    counts = torch.zeros(n, dtype=torch.float32)
    for w in windows:
        counts[list(w)] += 1
    return counts


def _coverage(latents: torch.Tensor, windows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Windows covering each frame ``(N,)`` and each window's frame indices, on the latents' device. Both are made
    once per run, before any device work: building indices per window would make the host wait for the
    device (a blocking host-to-device copy) before every window."""
    counts = _counts(latents.shape[2], windows)
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


NoiseSource = Callable[[int, int], torch.Tensor]
"""``noise(a, b)``: frames ``[a, b)`` of a run's initial noise, ``(1, 4, b - a, h, w)`` on the loop's device
(asked for in order, each range once)."""


def denoise_stream(noise: torch.Tensor | NoiseSource, model: EpsModel, plan: Sequence[DDIMStep],
                   windows: Sequence[Sequence[int]], guidance: float, cfg_steps: int | None = None,
                   feature_reuse: int | None = None) -> Iterator[tuple[int, torch.Tensor | None]]:
    """``denoise``'s math on open windows, in wavefront order; frames are final in order, long before the end.

    Every frame gets the same per-step sum of its windows' predictions (added in the same window order), the
    same CFG and the same DDIM update as in ``denoise``, so the final latents are the same, bit for bit; only
    the order of the window calls differs (:func:`wavefront`).

    Memory is bounded by the windows in flight, not by the driver's length: the latents and the CFG
    accumulator are kept per segment (frames ``[start_k, start_k+1)``, those whose last window is k), a segment
    is made (from ``noise``) when the first window holding it begins and handed out when it is final.

    Args:
        noise: the initial noise ``(1, 4, N, h, w)`` (not modified), or a ``NoiseSource`` giving it a frame range
            at a time (N is then the last window's end).
        windows: open windows (``context_windows(..., closed_loop=False)``); ValueError otherwise.
        model, plan, guidance, cfg_steps, feature_reuse: as for ``denoise``. ``model.begin_step`` is called
            whenever the next window call is at another step than the last one; ``model.end_window`` after a
            window's last call.

    Yields:
        After every window call, ``(final, latents)``: the number of leading frames that are final
        (non-decreasing; N at the end) and the final latents ``(1, 4, b - a, h, w)`` of the frames this call
        made final (``[a, b)``, b = ``final``), or None where it made none final.
    """
    source: NoiseSource
    if isinstance(noise, torch.Tensor):
        whole, n = noise, noise.shape[2]
        source = lambda a, b: whole[:, :, a:b].clone()  # noqa: E731
    else:
        n, source = (max(w[-1] for w in windows) + 1 if windows else 0), noise
    steps = len(plan)
    spans = _open_spans(windows, n)  # ValueError at the first next(), before any model call
    starts = [a for a, _ in spans]
    own = list(zip(starts, [*starts[1:], n]))  # segment k: the frames whose last window is k
    reach = [bisect_left(starts, b) - 1 for _, b in spans]  # the last segment of window k
    cfg = guidance != 1.0
    lat: dict[int, torch.Tensor] = {}  # segments begun and not yet final
    acc: dict[int, torch.Tensor] = {}  # their sums of predictions, [uncond, cond] or [cond]
    frames: dict[int, torch.Tensor] = {}  # frame indices of the windows in flight, on the device
    counts: torch.Tensor | None = None
    made = 0  # segments made so far
    final = 0  # frames final so far
    current: int | None = None
    # the bar is closed also when the loop stops early (an error, Ctrl-C, a cancelled run)
    with progress(total=steps * len(windows), desc="denoise", unit="window") as bar:
        for k, s in wavefront(windows, n, steps):
            step, kind = plan[s], step_kind(s, guidance, cfg_steps, feature_reuse)
            halves = 2 if kind.cfg else 1
            if current != s:
                model.begin_step(step, kind)
                current = s
            if s == 0:  # window k begins: its segments (made in order, as reach only grows)
                for j in range(made, reach[k] + 1):
                    lat[j] = source(*own[j])
                    acc[j] = lat[j].new_zeros((2 if cfg else 1, *lat[j].shape[1:]))
                made = max(made, reach[k] + 1)
                dev = lat[k].device
                if counts is None:  # windows covering each frame, once; queued behind the segment copies and
                    # this step's bank (a plain copy from pageable memory would make the host wait for them)
                    counts = to_device_queued(_counts(n, windows), dev)
                frames[k] = torch.arange(*spans[k], device=dev)  # a device op: no host wait for queued work
            assert counts is not None
            parts = [(j, max(spans[k][0], own[j][0]), min(spans[k][1], own[j][1])) for j in range(k, reach[k] + 1)]
            x = torch.cat([lat[j][:, :, a - own[j][0]:b - own[j][0]] for j, a, b in parts], dim=2)
            check_cancelled()
            eps = model.predict(x, frames[k], step, k)
            if eps.shape[0] != halves:
                raise ValueError(f"EpsModel returned batch {eps.shape[0]}, expected {halves}")
            for j, a, b in parts:
                part = acc[j][acc[j].shape[0] - halves:]  # a conditional-only step sums into the conditional slot
                part[:, :, a - own[j][0]:b - own[j][0]] += eps[:, :, a - spans[k][0]:b - spans[k][0]].to(part.dtype)
            a, b = own[k]
            lat[k] = ddim_cfg_update(acc[k][acc[k].shape[0] - halves:], counts[a:b], lat[k], guidance,
                                     step.alpha_t, step.alpha_prev)
            acc[k].zero_()
            bar.update(1)
            if s == steps - 1:  # segment k is final: no window holding its frames runs again
                model.end_window(k)
                del acc[k], frames[k]
                final = b
                yield final, lat.pop(k)
            else:
                yield final, None


def _ready(k: int, done: list[int], reach: list[int], steps: int) -> bool:
    """Whether window k may run its next step s (see :func:`wavefront`)."""
    s = done[k]
    if s == steps or (k > 0 and done[k - 1] <= s):
        return False
    return all(done[j] >= s for j in range(k + 1, reach[k] + 1))
