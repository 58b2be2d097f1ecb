"""InFlight (device work issued ahead of its consumer): order, laziness off-GPU, streams on GPU."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from megactor_rt.runtime.pipeline import Cancelled, InFlight, check_cancelled, prefetch


def test_cpu_runs_each_item_when_asked_and_keeps_order() -> None:
    calls: list[int] = []

    def fn(i: int) -> torch.Tensor:
        calls.append(i)
        return torch.full((2,), i)

    flight = InFlight(torch.device("cpu"), depth=3)
    it = flight.map(fn, range(5))
    assert calls == []  # nothing before the first request
    assert next(it).tolist() == [0, 0] and calls == [0]  # no run-ahead without concurrency
    assert [t[0].item() for t in it] == [1, 2, 3, 4]
    assert flight.launched == 5 and flight.device_seconds > 0


def test_incremental_launches_come_out_in_order() -> None:
    """launch / ready / drain (items that appear while other work runs): without a side stream each launch runs
    at once and ready hands it out immediately; drain hands out the rest."""
    flight = InFlight(torch.device("cpu"), depth=2)
    flight.launch(lambda i: torch.full((1,), i), 0)
    assert [t.item() for t in flight.ready()] == [0]
    assert list(flight.ready()) == []
    for i in (1, 2, 3):
        flight.launch(lambda i: torch.full((1,), i), i)
    assert [t.item() for t in flight.drain()] == [1, 2, 3] and flight.launched == 4


def test_bad_depth_is_rejected() -> None:
    with pytest.raises(ValueError, match="depth"):
        InFlight(torch.device("cpu"), depth=0)


def test_producer_error_reaches_the_consumer() -> None:
    def fn(i: int) -> torch.Tensor:
        if i == 2:
            raise RuntimeError("decode failed at 2")
        return torch.zeros(1)

    it = InFlight(torch.device("cpu")).map(fn, range(4))
    next(it), next(it)
    with pytest.raises(RuntimeError, match="at 2"):
        next(it)


@pytest.mark.gpu
def test_cuda_streams_give_the_same_results_in_order() -> None:
    dev = torch.device("cuda")
    x = torch.randn(8, 256, 256, device=dev)
    fn = lambda i: (x[i] @ x[i]).relu()  # noqa: E731
    ref = [fn(i).cpu() for i in range(8)]
    flight = InFlight(dev, depth=3)
    launched_at_first = None
    out = []
    for t in flight.map(fn, range(8)):
        launched_at_first = launched_at_first or flight.launched
        assert t.is_pinned()
        out.append(t)
    assert launched_at_first == 4  # depth ahead, plus the next one issued before the first is handed out
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, out))
    assert flight.device_seconds > 0


@pytest.mark.gpu
def test_streamed_decode_gives_the_same_frames_as_serial_decode() -> None:
    import numpy as np

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.config import AnimateConfig
    from megactor_rt.runtime.animator import Animator

    cfg = AnimateConfig(steps=1, window=4, overlap=2, max_frames=10)
    anim = Animator.demo(device="cuda", config=cfg)
    state = anim.prepare(ASSETS_DIR / "portrait.png")
    driver = ASSETS_DIR / "driver.mp4"
    streamed = list(anim.animate(state, driver))
    assert anim.last_stats.stage_seconds["vae_decode"] > 0
    serial = list(anim.animate(state, driver, config=AnimateConfig(**{**cfg.__dict__, "decode_streams": False})))
    assert len(streamed) == len(serial) == 10
    assert all(np.array_equal(a, b) for a, b in zip(streamed, serial))


@pytest.mark.gpu
def test_prefetch_runs_its_producer_on_the_callers_cuda_stream() -> None:
    """A new thread starts on the default stream; the producer (``animate_to_file``'s whole run) must queue its
    device work on the caller's stream, after what the caller queued there (e.g. a portrait state prepared under
    ``with torch.cuda.stream(s)``)."""
    from megactor_rt.runtime.pipeline import prefetch

    def producer() -> Iterator[int]:
        yield torch.cuda.current_stream().cuda_stream

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert list(prefetch(producer())) == [side.cuda_stream]
    assert list(prefetch(producer())) == [torch.cuda.current_stream().cuda_stream]


@pytest.mark.gpu
def test_feature_reuse_with_features_in_pinned_host_memory_gives_the_same_frames(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Long drivers keep feature reuse's deep features in pinned host memory (copies queued on the stream, no
    host wait); the frames must equal those with the features on the device."""
    import logging

    import numpy as np

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.config import AnimateConfig
    from megactor_rt.runtime import animator as animator_module
    from megactor_rt.runtime.animator import Animator

    cfg = AnimateConfig(steps=4, window=4, overlap=2, max_frames=10, cfg_steps=3, feature_reuse=2)
    anim = Animator.demo(device="cuda", config=cfg)
    state = anim.prepare(ASSETS_DIR / "portrait.png")
    driver = ASSETS_DIR / "driver.mp4"
    on_device = list(anim.animate(state, driver))
    monkeypatch.setattr(animator_module, "feature_offload", lambda device, nbytes: True)
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.animator"):
        in_host_memory = list(anim.animate(state, driver))
    assert "go to host memory" in caplog.text
    assert anim.last_stats.calls.get("unet_reuse") == 2 * 5  # steps 1 and 3, 5 windows each
    assert len(in_host_memory) == len(on_device) == 10
    assert all(np.array_equal(a, b) for a, b in zip(in_host_memory, on_device))


def test_compiled_unet_is_built_once_and_used_only_when_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring of ``TorchSubmodels.compile`` (torch.compile itself is measured on a GPU: docs/performance.md;
    compiling on this 2-core CI machine takes minutes)."""
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.submodels import TorchSubmodels
    from megactor_rt.weights import build_models

    compiled_calls: list[int] = []

    modes: list[object] = []

    def fake_compile(module: torch.nn.Module, **kwargs: object) -> object:
        assert kwargs.pop("dynamic") is False
        modes.append(kwargs.get("mode"))

        def run(*args: object, **kw: object) -> torch.Tensor:
            compiled_calls.append(1)
            return module(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    sub = TorchSubmodels(build_models(tiny_config(), seed=0))
    g = torch.Generator().manual_seed(0)
    lat, pose = torch.randn(1, 9, 2, 16, 16, generator=g), torch.randn(1, 4, 2, 16, 16, generator=g)
    tokens = torch.randn(1, 257, sub.config.unet.cross_attention_dim, generator=g)
    eager = sub.unet(lat, 500, tokens, pose, None)
    assert compiled_calls == []
    sub.compile = True
    out = [sub.unet(lat, 500, tokens, pose, None) for _ in range(2)]
    assert len(compiled_calls) == 2 and modes == [None]  # compiled once, used twice
    assert all(torch.equal(o, eager) for o in out)
    sub.compile = False
    sub.unet(lat, 500, tokens, pose, None)
    assert len(compiled_calls) == 2
    sub.compile = "reduce-overhead"  # another mode: compiled separately, the first one kept
    sub.unet(lat, 500, tokens, pose, None)
    assert modes == [None, "reduce-overhead"] and len(compiled_calls) == 3


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])  # both replay CUDA graphs
def test_a_kept_deep_feature_outlives_the_next_cuda_graph_replay(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """``compile="reduce-overhead"`` replays CUDA graphs, whose outputs live in the graph's memory and are
    overwritten by the next replay; feature reuse reads a call's deep feature steps later. Simulated here with
    a compiled UNet that returns its outputs in the same two buffers every call (a real replay needs a GPU):
    the feature kept from the first call must still hold that call's values after the second."""
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.submodels import TorchSubmodels
    from megactor_rt.weights import build_models

    static: dict[str, torch.Tensor] = {}

    def fake_compile(module: torch.nn.Module, **kwargs: object) -> object:
        def replay(*args: object, **kw: object) -> object:
            out = module(*args, **kw)
            if not isinstance(out, tuple):
                return out
            for name, t in zip(("eps", "deep"), out):  # written into the graph's fixed output buffers
                static.setdefault(name, torch.empty_like(t)).copy_(t)
            return static["eps"], static["deep"]
        return replay

    monkeypatch.setattr(torch, "compile", fake_compile)
    sub = TorchSubmodels(build_models(tiny_config(), seed=0), compile=mode)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 257, sub.config.unet.cross_attention_dim, generator=g)
    inputs = [(torch.randn(1, 9, 2, 16, 16, generator=g), torch.randn(1, 4, 2, 16, 16, generator=g)) for _ in range(2)]
    _, kept = sub.unet(*inputs[0][:1], 500, tokens, inputs[0][1], None, keep_deep=True)
    first = kept.clone()
    sub.unet(inputs[1][0], 500, tokens, inputs[1][1], None, keep_deep=True)  # the next replay
    assert torch.equal(kept, first) and not torch.equal(static["deep"], first)


def test_ordered_map_keeps_order_bounds_work_and_reraises() -> None:
    import threading
    import time

    from megactor_rt.runtime.pipeline import ordered_map

    started: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        return i * i

    it = ordered_map(slow, range(100), workers=3)
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    time.sleep(0.1)
    assert len(started) <= 5 + 2 * 3  # bounded look-ahead, not the whole input
    assert list(it) == [i * i for i in range(5, 100)]

    def boom(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        list(ordered_map(boom, range(10), workers=2))


def test_threaded_face_detection_gives_the_same_driver_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.runtime import pipeline
    from megactor_rt.runtime.driver import iter_driver_inputs, plan_driver

    def run(workers: int) -> tuple:
        monkeypatch.setattr(pipeline, "default_workers", lambda: workers)
        plan = plan_driver(ASSETS_DIR / "driver.mp4", max_frames=12)
        return plan.crop, list(iter_driver_inputs(plan, 128))

    crop1, frames1 = run(1)
    crop3, frames3 = run(3)
    assert crop1 == crop3 and len(frames1) == len(frames3) == 12
    assert all(torch.equal(a, b) for a, b in zip(frames1, frames3))


def test_a_long_faceless_opening_is_read_again_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 2 holds at most LOOKAHEAD frames before the first face in a cropped frame; a longer faceless
    opening is read again once the face is found, and gives the same inputs as holding it all (was: every
    frame before the first face held in memory, e.g. 1.9 GB for a 10 s 1080p intro)."""
    import sys

    import numpy as np

    from megactor_rt.runtime import driver as driver_mod
    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    sys.path.insert(0, str(Path(__file__).parent))
    from media_fixtures import face_frames

    faces = face_frames(3, 160)
    blank = np.full((160, 160, 3), 128, np.uint8)
    plan = plan_driver(DriverFrames([blank] * 9 + faces, fps=25))
    reads = 0
    frames_of_plan = type(plan).frames

    def counting_frames(self):  # noqa: ANN001, ANN202
        nonlocal reads
        reads += 1
        return frames_of_plan(self)

    def run(lookahead: int) -> list[torch.Tensor]:
        monkeypatch.setattr(driver_mod, "LOOKAHEAD", lookahead)
        return list(iter_driver_inputs(plan, 64))

    monkeypatch.setattr(type(plan), "frames", counting_frames)
    everything = run(1000)
    assert reads == 1 and len(everything) == 12
    bounded = run(4)
    assert reads == 3  # pass 2, then the opening once more
    assert all(torch.equal(a, b) for a, b in zip(everything, bounded, strict=True))


@pytest.mark.gpu
def test_open_windows_stream_decode_while_denoising_on_cuda() -> None:
    """--no-wrap on CUDA: decode batches launched on the side stream while later windows denoise on the main
    stream give the frames of a serial decode (no side stream), in order."""
    import numpy as np

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.config import AnimateConfig
    from megactor_rt.runtime.animator import Animator

    cfg = AnimateConfig(steps=3, window=4, overlap=2, max_frames=24, closed_loop=False)
    anim = Animator.demo(device="cuda", config=cfg)
    state = anim.prepare(ASSETS_DIR / "portrait.png")
    driver = ASSETS_DIR / "driver.mp4"
    streamed = list(anim.animate(state, driver))
    stats = anim.last_stats
    assert stats.stage_seconds["vae_decode"] > 0 and stats.stage_seconds["denoise"] > 0
    serial = list(anim.animate(state, driver, config=AnimateConfig(**{**cfg.__dict__, "decode_streams": False})))
    assert len(streamed) == len(serial) == 24
    assert all(np.array_equal(a, b) for a, b in zip(streamed, serial))


def test_a_stopped_consumer_cancels_its_producer_at_the_next_check() -> None:
    """When prefetch's consumer stops (raises, e.g. Ctrl-C, or closes it), the producer's next
    ``check_cancelled`` raises ``Cancelled`` on the worker thread, the producer's cleanup runs there, and the
    consumer returns only after the worker has stopped (was: the worker went on computing for up to the
    whole run, and an interpreter exiting meanwhile aborted)."""
    import threading
    import time

    events: list[str] = []
    release = threading.Event()

    def producer():
        try:
            yield 0
            release.wait(5)  # a long window call, under way when the consumer stops
            for i in range(1, 10_000):
                check_cancelled()
                time.sleep(0.01)
                events.append(f"work {i}")
                yield i
        except Cancelled:
            events.append("cancelled")
        finally:
            events.append(f"cleanup on {threading.current_thread().name}")

    it = prefetch(producer(), depth=1, name="producer-test")
    assert next(it) == 0
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            threading.Timer(0.2, release.set).start()
            it.close()  # what leaving the consumer's loop by an exception does
    assert "cancelled" in events and events[-1] == "cleanup on producer-test"
    assert sum(e.startswith("work") for e in events) <= 2  # at most the items already under way
    assert not any(t.name == "producer-test" for t in threading.enumerate())
    check_cancelled()  # on a thread that produces for no prefetch: nothing to cancel


def test_a_failed_run_stops_its_driver_thread_at_once_and_frees_its_state() -> None:
    """A run that fails inside denoising stops its driver-decode worker before the error reaches the caller,
    and once the caller drops the error, reference counting frees the run's state (was: ``prefetch`` re-raised from a frame that the exception's
    traceback kept alive, so the worker went on decoding and the predictor, latents and features stayed alive
    until a garbage collection; in the CLI's job loop the next job then ran beside them)."""
    import gc
    import threading
    import weakref

    from media_fixtures import PORTRAIT, face_frames

    from megactor_rt.config import AnimateConfig
    from megactor_rt.runtime import animator as animator_module
    from megactor_rt.runtime.animator import Animator
    from megactor_rt.runtime.driver import DriverFrames

    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=2, window=4, overlap=2))
    state = anim.prepare(PORTRAIT)
    real, calls, models = anim.sub.unet, [0], []
    made = animator_module.OptimizedPredictor

    def unet(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("UNet failed")
        return real(*args, **kwargs)

    class Predictor(made):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(weakref.ref(self))

    anim.sub.unet = unet
    animator_module.OptimizedPredictor = Predictor  # type: ignore[misc]
    gc.disable()  # reference counting alone must free the run
    try:
        with pytest.raises(RuntimeError, match="UNet failed") as caught:
            list(anim.animate(state, DriverFrames(face_frames(120), fps=25, name="clip")))
        assert "UNet failed" in str(caught.value)  # the caller still holds the error (its traceback: the run's frames)
        assert not [t.name for t in threading.enumerate() if t.name == "driver-decode"]
        del caught
        assert models and models[0]() is None  # dropping the error frees the run
    finally:
        gc.enable()
        animator_module.OptimizedPredictor = made  # type: ignore[misc]


def test_a_small_face_found_in_pass_1_is_found_in_the_crops(caplog: pytest.LogCaptureFixture) -> None:
    """A face about 110 px high in a 1920x1080 frame comes out about 52 px in the 512 px crop, under what HOG
    finds without upsampling: pass 2 detects it upsampled, as pass 1 found it (was: "no face found in the
    cropped frames", although pass 1 had found it in every frame). Larger faces keep the default."""
    import logging

    import numpy as np
    from PIL import Image

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.media import read_image
    from megactor_rt.runtime.driver import DriverFrames, crop_upsample, iter_driver_inputs, plan_driver

    img = read_image(ASSETS_DIR / "portrait.png")  # its face is about 310 px
    s = 110 / 310
    small = np.asarray(Image.fromarray(img).resize((round(768 * s), round(844 * s)), Image.BILINEAR))
    frame = np.full((1080, 1920, 3), 120, np.uint8)
    y0, x0 = 540 - round(422 * s), 960 - round(388 * s)
    frame[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    plan = plan_driver(DriverFrames([frame], fps=25))
    assert plan.face_fraction is not None and plan.face_fraction * 512 < 60 and crop_upsample(plan, 512) == 1
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.driver"):
        out = next(iter_driver_inputs(plan, 512))
    assert "detecting them upsampled" in caplog.text
    assert 0.005 < float((out > 0).float().mean()) < 0.05  # the small face region kept, the rest black
    assert crop_upsample(plan_driver(DriverFrames([img], fps=25)), 512) is None  # a large face: the default


def test_an_output_rate_within_a_hair_of_the_source_rate_is_the_source_rate() -> None:
    """``--fps 29.97`` on an NTSC clip (30000/1001) keeps its exact rate and every frame (was: 2997/100, one frame
    in a million dropped); lower rates resample, higher ones keep the source's."""
    from fractions import Fraction

    from megactor_rt.runtime.driver import output_fps

    ntsc = Fraction(30000, 1001)
    assert output_fps(ntsc, 29.97) == ntsc and output_fps(Fraction(24000, 1001), 23.976) == Fraction(24000, 1001)
    assert output_fps(ntsc, 25) == 25 and output_fps(ntsc, 60) == ntsc and output_fps(ntsc, None) == ntsc
    assert output_fps(Fraction(30), 29.99) == Fraction(2999, 100)  # 0.03 % lower: a real resampling


def test_call_counts_are_bumped_under_a_lock() -> None:
    """Runs on several threads share one submodels' ``calls``; ``calls[k] += 1`` is a read then a write, so
    ``bump`` holds the counter's lock (a bump from another thread waits for it) and a snapshot is one copy."""
    import threading

    from megactor_rt.runtime.submodels import CallCounter

    calls = CallCounter()
    calls.bump("unet")
    worker = threading.Thread(target=calls.bump, args=("unet",))
    with calls._lock:
        worker.start()
        worker.join(0.2)
        assert worker.is_alive() and calls["unet"] == 1  # waiting for the lock
    worker.join(5)
    assert not worker.is_alive() and calls.snapshot() == {"unet": 2}


def test_prefetch_calls_on_stop_before_waiting_for_its_worker() -> None:
    """A consumer that stops (here: raises) has ``on_stop`` called while the worker is still busy, before the
    wait for it (animate_to_file discards its temporary video there, not after up to JOIN_S); a consumer that
    takes every item does not."""
    import threading

    release, worker_done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def slow() -> Iterator[int]:
        try:
            yield 1
            release.wait(10)  # busy, not at a cancellation point
            yield 2
        finally:
            worker_done.set()

    def on_stop() -> None:
        seen.append(worker_done.is_set())
        release.set()

    with pytest.raises(RuntimeError, match="consumer failed"):
        for _ in prefetch(slow(), depth=1, on_stop=on_stop):
            raise RuntimeError("consumer failed")
    assert seen == [False] and worker_done.is_set()  # called while the worker ran; the wait came after
    calls: list[int] = []
    assert list(prefetch(iter([1, 2, 3]), on_stop=lambda: calls.append(1))) == [1, 2, 3] and calls == []


def test_prefetch_runs_at_most_depth_items_ahead() -> None:
    """The producer waits while ``depth`` results are buffered (the driver's preprocessed frames, about 3 MB each
    at 512 px, would otherwise pile up while the denoiser is slower)."""
    import time

    made = [0]

    def producer() -> Iterator[int]:
        for i in range(50):  # finite: an unbounded queue would drain it, not hang
            made[0] += 1
            yield i

    items = prefetch(producer(), depth=3)
    assert next(items) == 0
    time.sleep(0.3)
    assert made[0] <= 3 + 2  # the one taken, three buffered, one waiting to be put
    assert list(items) == list(range(1, 50))


def test_cuda_graph_modes_are_known_without_torchs_mode_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's table of compile modes cannot be read (another torch's internals), ``reduce-overhead`` and
    ``max-autotune`` still count as replaying CUDA graphs (so a kept deep feature is cloned out of the graph's
    memory before the next replay overwrites it); ``default`` and plain True/False do not. (Mutation audit.)"""
    import torch._inductor

    from megactor_rt.runtime import submodels

    def unreadable(*args: object) -> dict:
        raise RuntimeError("no mode table in this torch")

    monkeypatch.setattr(torch._inductor, "list_mode_options", unreadable)
    submodels.replays_cuda_graphs.cache_clear()
    try:
        modes = ("reduce-overhead", "max-autotune", "default", True, False)
        assert [submodels.replays_cuda_graphs(m) for m in modes] == [True, True, False, False, False]
    finally:
        submodels.replays_cuda_graphs.cache_clear()


def test_a_cropped_frame_without_a_face_keeps_the_previous_face() -> None:
    """Pass 2: a cropped frame in which no face is found after the first one reuses the previous frame's face box
    (was untested: taking only each frame's own box made a driver ending on a faceless frame an error).
    (Mutation audit.)"""
    from media_fixtures import face_frames

    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    blank = np.full((160, 160, 3), 128, np.uint8)
    plan = plan_driver(DriverFrames([*face_frames(2, 160), blank], fps=25))
    inputs = list(iter_driver_inputs(plan, 64))
    assert len(inputs) == 3
    kept = inputs[2] > 0  # the blank frame, black outside the second frame's face box
    assert 0.1 < float(kept.float().mean()) < 0.8


def test_faces_lost_in_the_crops_are_an_error_however_long_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 1 found faces but no cropped frame shows one: an InputError, also where the faceless frames were more
    than LOOKAHEAD and were counted instead of held (was untested: such a driver gave no frames at all).
    (Mutation audit.)"""
    from media_fixtures import face_frames

    from megactor_rt.errors import InputError
    from megactor_rt.runtime import driver as driver_mod
    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    plan = plan_driver(DriverFrames(face_frames(6, 160), fps=25, name="clip"))
    monkeypatch.setattr(driver_mod, "detect_faces", lambda *args, **kwargs: [])
    for lookahead in (2, 16):  # the opening counted, and held
        monkeypatch.setattr(driver_mod, "LOOKAHEAD", lookahead)
        with pytest.raises(InputError, match="no face found in the cropped frames of driving video clip; pass "
                                             "--no-face-crop"):
            list(iter_driver_inputs(plan, 64))


def test_the_rate_tolerance_is_relative_to_the_source_rate() -> None:
    """``--fps 119.88`` on a 120000/1001 clip (0.0001 % off, 0.00012 fps) keeps the source rate; the tolerance
    scales with the rate, so 60 -> 59.99 (0.017 %) still resamples. (Mutation audit.)"""
    from fractions import Fraction

    from megactor_rt.runtime.driver import output_fps

    assert output_fps(Fraction(120000, 1001), 119.88) == Fraction(120000, 1001)
    assert output_fps(Fraction(60), 59.99) == Fraction(5999, 100)


def test_stage_times_add_up_over_several_entries() -> None:
    """A stage entered twice, or given time measured elsewhere twice, sums its times; the first frame's time is
    kept while the total grows. (Mutation audit.)"""
    from megactor_rt.runtime.pipeline import RunStats, StageTimer

    stats = RunStats()
    timer = StageTimer(stats)
    for _ in range(2):
        with timer.stage("decode"):
            time.sleep(0.02)
    assert stats.stage_seconds["decode"] >= 0.04
    timer.add("vae_decode", 0.5)
    timer.add("vae_decode", 0.25)
    assert stats.stage_seconds["vae_decode"] == 0.75
    timer.frame_out()
    first = stats.first_frame_s
    time.sleep(0.01)
    timer.frame_out()
    assert stats.frames == 2 and first is not None and stats.first_frame_s == first
    assert stats.total_s is not None and stats.total_s > first and stats.fps == pytest.approx(2 / stats.total_s)


def test_in_thread_runs_a_generator_on_one_thread_and_closes_it_there() -> None:
    """in_thread: every item computed on one thread of its own (not the event loop's), in order; leaving early
    closes the generator on that thread even while other references keep it alive."""
    import asyncio
    import contextlib

    from megactor_rt.runtime.pipeline import in_thread

    seen: list[str] = []
    closed: list[str] = []

    def numbers() -> Iterator[int]:
        try:
            for i in range(100):
                seen.append(threading.current_thread().name)
                yield i
        finally:
            closed.append(threading.current_thread().name)

    items = numbers()  # still referenced here: only in_thread's own close can end it

    async def first_four() -> list[int]:
        out = []
        async with contextlib.aclosing(in_thread(items, name="numbers")) as it:
            async for x in it:
                out.append(x)
                if x == 3:
                    break
        for _ in range(200):
            if closed:
                break
            await asyncio.sleep(0.01)
        return out

    assert asyncio.run(first_four()) == [0, 1, 2, 3]
    assert len(set(seen)) == 1 and seen[0].startswith("numbers") and seen[0] != threading.current_thread().name
    assert closed == seen[:1]


def test_in_thread_names_an_error_of_closing_its_items(caplog: pytest.LogCaptureFixture) -> None:
    """An error raised while in_thread closes its items (a run's cleanup failing) is logged as a warning naming it
    (was: dropped with the close's future, which nobody looks at)."""
    import asyncio
    import contextlib

    from megactor_rt.runtime.pipeline import in_thread

    def numbers() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            raise OSError("the half-written result could not be removed")

    async def first_two() -> None:
        async with contextlib.aclosing(in_thread(numbers())) as it:
            async for x in it:
                if x == 1:
                    break
        for _ in range(200):
            if "could not be removed" in caplog.text:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        asyncio.run(first_two())
    assert "closing the run left early failed: OSError: the half-written result could not be removed" in caplog.text


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_closes_its_items_when_a_call_fails(workers: int) -> None:
    """A failing call (a face detector's error in a driver pass) closes the items being mapped before the error
    reaches the caller, also while the caller holds the error (was: the pass's video decoder, and its open file,
    lived on as long as the error did: its traceback holds ordered_map's frame)."""
    from megactor_rt.runtime.pipeline import ordered_map

    closed: list[bool] = []

    def frames() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            closed.append(True)

    def detect(i: int) -> int:
        if i == 5:
            raise RuntimeError("detector failed")
        return i

    with pytest.raises(RuntimeError, match="detector failed") as caught:
        list(ordered_map(detect, frames(), workers=workers))
    assert caught.value is not None and closed == [True]


@pytest.mark.parametrize("workers", [1, 2])
def test_map_repeats_computes_a_repeated_item_once(workers: int) -> None:
    """map_repeats: an item repeated in a row (a frame a constant-rate grid shows over a gap in a clip's timestamps)
    is computed once, its result given for each repeat, in order; an equal item that is another object is computed
    again; stopped early, the items are closed."""
    from megactor_rt.runtime.pipeline import map_repeats

    a, b, c = np.zeros(2), np.ones(2), np.zeros(2)  # (c equals a, but is another frame)
    calls: list[float] = []

    def fn(x: np.ndarray) -> float:
        calls.append(float(x[0]))
        return float(x.sum()) + len(calls) * 10

    assert list(map_repeats(fn, [a, a, a, b, c, c, a], workers=workers)) == [10, 10, 10, 22, 30, 30, 40]
    assert calls == [0, 1, 0, 0]
    closed: list[bool] = []

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                yield a
                yield b
        finally:
            closed.append(True)

    mapped = map_repeats(lambda x: float(x[0]), frames(), workers=workers)
    assert [next(mapped) for _ in range(3)] == [0, 1, 0]
    mapped.close()
    assert closed == [True]
    assert list(map_repeats(fn, [], workers=workers)) == []
