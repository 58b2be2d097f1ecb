"""Open windows hold only the frames in flight: chunked noise, per-segment loop state, released PoseGuider
features (issue #6: memory stays bounded for arbitrarily long drivers)."""

from __future__ import annotations

import weakref

import pytest
import torch

from megactor_rt.config import StepKind
from megactor_rt.models.scheduler import DDIM, DDIMStep, context_windows
from megactor_rt.runtime.denoise import denoise, denoise_stream, wavefront, windows_in_flight
from megactor_rt.runtime.noise import FrameNoise, chunked_fill_matches, initial_noise
from megactor_rt.runtime.predictor import PoseFeed


@pytest.mark.parametrize("n,h,w,cuts", [
    (7, 8, 8, [3, 3, 7]),        # uneven ranges, an empty one
    (48, 64, 64, [16, 24, 40, 48]),  # the 512 px latent size
    (13, 4, 4, list(range(1, 14))),  # 16 elements per frame, one frame at a time
    (9, 3, 5, [4, 9]),           # 15 elements per frame: drawn whole, then sliced
])
def test_frame_noise_is_the_whole_noise_in_parts(n, h, w, cuts):
    whole = initial_noise(5, (1, 4, n, h, w))
    noise = FrameNoise(5, n, 4, h, w)
    assert noise.chunked == ((h * w) % 16 == 0)
    parts, start = [], 0
    for end in cuts:
        part = noise.take(start, end)
        assert part.shape == (1, 4, end - start, h, w)
        parts.append(part)
        start = end
    assert torch.equal(torch.cat(parts, dim=2), whole)
    with pytest.raises(ValueError, match="in order"):
        noise.take(end - 1, end)
    with pytest.raises(ValueError, match="in order"):
        FrameNoise(5, n, 4, h, w).take(1, 2)  # a range after a gap


def test_this_torch_fills_in_parts_as_whole():
    """The property FrameNoise relies on; should a torch release change it, the noise is drawn whole (slower to
    start, more memory, same values) - this test then says so."""
    assert chunked_fill_matches()


class _Stub:
    """An EpsModel whose prediction is a fixed function of its input: cheap, deterministic, and any mix-up of
    frames or segments changes the result."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        self.halves = 2 if kind.cfg else 1

    def predict(self, latents, frames, step, window):
        eps = torch.sin(latents * 3 + frames.view(1, 1, -1, 1, 1).to(latents.dtype) * 0.01 + step.timestep * 1e-3)
        return torch.cat([eps * (1 + 0.1 * i) for i in range(self.halves)])

    def end_window(self, window: int) -> None:
        self.ended.append(window)


@pytest.mark.parametrize("n,window,overlap,guidance", [(37, 8, 4, 4.5), (20, 6, 0, 1.0), (5, 8, 4, 4.5)])
def test_stream_from_a_noise_source_is_denoise(n, window, overlap, guidance):
    """The streamed loop from a NoiseSource gives ``denoise``'s latents bit for bit, made from the whole noise."""
    h = 8
    windows = context_windows(n, window, overlap, closed_loop=False)
    plan = DDIM().plan(4)
    whole = denoise(initial_noise(1, (1, 4, n, h, h)), _Stub(), plan, windows, guidance)
    frame_noise = FrameNoise(1, n, 4, h, h)
    got = [lat for _, lat in denoise_stream(lambda a, b: frame_noise.take(a, b), _Stub(), plan, windows, guidance)
           if lat is not None]
    assert torch.equal(torch.cat(got, dim=2), whole)


def test_stream_holds_only_the_frames_in_flight():
    """A 2000-frame run at the 512 px latent size: the noise is asked for as windows begin, each final segment
    is handed out and then referenced by nothing in the loop, and the frames begun but not final stay under
    what about steps + 1 windows hold - not the driver's length."""
    n, window, overlap, steps, h = 2000, 16, 8, 3, 64
    windows = context_windows(n, window, overlap, closed_loop=False)
    noise = FrameNoise(0, n, 4, h, h)
    asked = [0]

    def source(a: int, b: int) -> torch.Tensor:
        assert a == asked[0]
        asked[0] = b
        return noise.take(a, b)

    model = _Stub()
    most = 0  # frames begun and not yet final, at most
    handed = 0
    for final, latents in denoise_stream(source, model, DDIM().plan(steps), windows, 4.5):
        most = max(most, asked[0] - final)
        if latents is not None:
            handed += 1
            ref = weakref.ref(latents)
            del latents
            assert ref() is None, f"the loop still holds final segment {handed} while it runs"
    assert asked[0] == n and model.ended == list(range(len(windows))) and handed == len(windows)
    assert most <= (steps + 2) * (window - overlap) + window, most  # 48 frames, of 2000


def test_pose_feed_releases_what_no_later_window_holds():
    """Open windows: after window k's last call the feed keeps only the batches of later windows' frames; a
    released frame asked for again is an error naming it. Wrapping windows release nothing before the last
    one (the last window holds frame 0)."""

    class Sub:
        device = torch.device("cpu")
        calls = 0

        def pose_features(self, frames, scale, shift):
            Sub.calls += 1
            return frames[:, :1].repeat(1, 4, 1, 1) * scale + shift  # (b, 4, S, S)

    n, batch = 200, 8
    frames = [torch.full((3, 2, 2), float(i)) for i in range(n)]
    windows = context_windows(n, 16, 8, closed_loop=False)
    feed = PoseFeed(Sub(), iter(frames), n, torch.tensor(1.0), torch.tensor(0.0), windows, batch)
    most = 0
    for k, s in wavefront(windows, n, 3):
        got = feed.window(k)
        assert torch.equal(got[0, 0, :, 0, 0], torch.tensor(windows[k], dtype=torch.float32))
        if s == 2:
            feed.release(k)
        most = max(most, sum(c.shape[2] for c in feed.batches.values()))
    assert feed.done == n and not feed.batches and most <= 64
    with pytest.raises(RuntimeError, match="frame 0 were released before window 0"):
        feed.window(0)
    wrapping = context_windows(20, 8, 4)
    feed = PoseFeed(Sub(), iter(frames[:20]), 20, torch.tensor(1.0), torch.tensor(0.0), wrapping, batch)
    for k, w in enumerate(wrapping):
        assert torch.equal(feed.window(k)[0, 0, :, 0, 0], torch.tensor(w, dtype=torch.float32))
        if k < len(wrapping) - 1:
            feed.release(k)
    assert sum(c.shape[2] for c in feed.batches.values()) == 20
    feed.release(len(wrapping) - 1)  # after the last window nothing is held
    assert not feed.batches


def _whole_loop(latents, model, plan, windows, guidance, cfg_steps=None):
    """The step-by-step loop as it was before 2026-11-27: N frames of prediction sums, one update after the last
    window of each step (the order the golden vectors were checked with)."""
    from megactor_rt.config import step_kind
    from megactor_rt.kernels.ops import ddim_cfg_update

    counts = torch.zeros(latents.shape[2])
    for w in windows:
        counts[w] += 1
    for i, step in enumerate(plan):
        kind = step_kind(i, guidance, cfg_steps, None)
        model.begin_step(step, kind)
        acc = torch.zeros((2 if kind.cfg else 1, *latents.shape[1:]))
        for k, w in enumerate(windows):
            idx = torch.tensor(w)
            acc.index_add_(2, idx, model.predict(latents[:, :, idx], idx, step, k))
        latents = ddim_cfg_update(acc, counts, latents, guidance, step.alpha_t, step.alpha_prev)
    return latents


class _BatchedStub(_Stub):
    window_batch = 3

    def predict_windows(self, latents, frames, step, windows):
        return [self.predict(latents[j:j + 1], f, step, w) for j, (f, w) in enumerate(zip(frames, windows))]


@pytest.mark.parametrize("n,window,overlap,closed,guidance,cfg_steps,stub", [
    (23, 8, 4, True, 4.5, None, _Stub),       # wrapping: the last windows' frames 0.. are updated last
    (23, 8, 4, False, 4.5, None, _Stub),
    (9, 4, 2, True, 1.0, None, _Stub),        # no CFG
    (17, 6, 3, True, 4.5, 2, _Stub),          # CFG truncation: the sums change size between steps
    (20, 4, 2, True, 4.5, None, _BatchedStub),  # 3 windows per call (and leftovers one per call)
    (3, 8, 4, True, 4.5, None, _Stub),        # one window, shorter than asked
    (12, 4, 0, True, 4.5, None, _Stub),       # no overlap
])
def test_early_updates_are_the_whole_loops_math(n, window, overlap, closed, guidance, cfg_steps, stub):
    """``denoise`` updates each frame after the last window holding it instead of all frames after the last
    window: the same latents, bit for bit, and every step's latents handed to the callback as they were."""
    windows = context_windows(n, window, overlap, closed_loop=closed)
    plan = DDIM().plan(4)
    noise = initial_noise(2, (1, 4, n, 8, 8))
    want = _whole_loop(noise.clone(), stub(), plan, windows, guidance, cfg_steps)
    seen = []
    got = denoise(noise.clone(), stub(), plan, windows, guidance, cfg_steps=cfg_steps,
                  callback=lambda i, s, e, x: seen.append(x))
    assert torch.equal(got, want)
    assert len(seen) == 4 and torch.equal(seen[-1], want) and not torch.equal(seen[0], seen[-1])


# ---------------------------------------------------------------------------------------------- checks the loop makes


class _OneHalf:
    """An EpsModel that returns one half where a CFG step needs two (a graph exported without the unconditional
    half, or a predictor bug): the guidance would broadcast it into both halves and silently do nothing."""

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        pass

    def predict(self, latents: torch.Tensor, frames: list[int], step: DDIMStep, window: int) -> torch.Tensor:
        return torch.sin(latents)

    def end_window(self, window: int) -> None:
        pass


def test_a_model_returning_one_half_in_a_cfg_step_is_refused() -> None:
    with pytest.raises(ValueError, match="returned batch 1, expected 2"):
        denoise(initial_noise(0, (1, 4, 9, 8, 8)), _OneHalf(), DDIM().plan(2), context_windows(9, 4, 2), 4.5)
    with pytest.raises(ValueError, match="returned batch 1, expected 2"):
        list(denoise_stream(initial_noise(0, (1, 4, 9, 8, 8)), _OneHalf(), DDIM().plan(2),
                            context_windows(9, 4, 2, closed_loop=False), 4.5))


def test_windows_in_flight_grow_with_the_steps_not_the_driver() -> None:
    """What sizes the kept features' memory (and decides their offload to host memory on CUDA)."""
    windows = context_windows(200, 16, 8, closed_loop=False)
    assert len(windows) == 24 and windows_in_flight(windows, 200, 3) == 3


def test_the_stream_refuses_windows_that_do_not_cover_the_noise() -> None:
    """Windows missing the last frames, or shifted off the first, would leave frames never denoised."""
    noise = initial_noise(0, (1, 4, 10, 8, 8))
    with pytest.raises(ValueError, match="open windows"):
        next(denoise_stream(noise, _OneHalf(), DDIM().plan(2), context_windows(8, 4, 2, closed_loop=False), 1.0))
    shifted = [[f + 1 for f in w] for w in context_windows(9, 4, 2, closed_loop=False)]
    with pytest.raises(ValueError, match="open windows"):
        next(denoise_stream(noise, _OneHalf(), DDIM().plan(2), shifted, 1.0))


def test_frame_noise_refuses_frames_past_the_end() -> None:
    noise = FrameNoise(0, 5, 4, 8, 8)  # 5 frames
    with pytest.raises(ValueError, match="in order"):
        noise.take(0, 6)
    assert noise.take(0, 5).shape[2] == 5


def test_frame_noise_drawn_whole_is_dropped_after_the_last_frame() -> None:
    """Where the noise is drawn whole (a frame size not a multiple of 16), the whole tensor is let go once its
    last frame is handed out, not held (with every frame's noise) until the run ends. (Mutation audit.)"""
    noise = FrameNoise(5, 6, 4, 3, 5)  # 15 elements per frame: drawn whole
    assert not noise.chunked
    first = noise.take(0, 4)
    assert noise._whole is not None  # frames 4..5 still to come
    last = noise.take(4, 6)
    assert noise._whole is None
    assert torch.equal(torch.cat([first, last], dim=2), initial_noise(5, (1, 4, 6, 3, 5)))


def test_the_stream_begins_a_step_only_where_the_step_changes() -> None:
    """``begin_step`` (a model's per-timestep preparation, e.g. the ReferenceNet bank) is called where the next
    window call is at another step than the last one, not before every window call. (Mutation audit.)"""
    n, steps = 20, 3
    windows = context_windows(n, 6, 2, closed_loop=False)
    plan = DDIM().plan(steps)
    begun: list[int] = []

    class Recording(_Stub):
        def begin_step(self, step, kind):  # noqa: ANN001, ANN202
            begun.append(step.timestep)
            super().begin_step(step, kind)

    list(denoise_stream(initial_noise(0, (1, 4, n, 4, 4)), Recording(), plan, windows, 4.5))
    order = [plan[s].timestep for _, s in wavefront(windows, n, steps)]
    changes = [t for i, t in enumerate(order) if i == 0 or order[i - 1] != t]
    assert begun == changes and len(begun) < len(order)


def test_the_stream_leaves_the_callers_noise_as_it_was() -> None:
    """A noise tensor given to ``denoise_stream`` is read, not denoised in place (the segments are copies): the
    caller may run it again, or compare with ``denoise`` on the same noise."""
    noise = initial_noise(0, (1, 4, 9, 8, 8))
    before = noise.clone()
    made = [lat for _, lat in denoise_stream(noise, _OneHalf(), DDIM().plan(2),
                                             context_windows(9, 4, 2, closed_loop=False), 1.0) if lat is not None]
    assert torch.equal(noise, before)
    assert not torch.equal(torch.cat(made, dim=2), before)  # it did denoise
