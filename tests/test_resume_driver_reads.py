"""A driver whose frames are read when indexed (an image sequence, an animated WebP): a later ``--start`` and a
lower ``--fps`` read only the frames the run uses, as a video's seek does, on every pass (was: every frame from the
first one, each decoded and dropped)."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import write_face_driver, write_truncated_video
from PIL import Image

from megactor_rt.errors import InputError
from megactor_rt.runtime.driver import (
    DriverFrames,
    _kept,
    driver_frames,
    driver_info,
    plan_driver,
    sequence_driver,
    start_frame,
    start_shown,
)
from megactor_rt.sequence import FrameSequence


def _plate(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(folder / f"img_{i + 1:04d}.png")
    return folder / "img_%04d.png"


@pytest.mark.parametrize(("max_frames", "ratio", "skip", "reads"), [
    (5, Fraction(1), 50, 5), (None, Fraction(1), 57, 3), (4, Fraction(5), 0, 4), (None, Fraction(5, 2), 40, 8)],
    ids=["late-start", "start-to-end", "lower-rate", "both"])
def test_a_sequence_driver_reads_only_the_frames_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       max_frames: int | None, ratio: Fraction, skip: int,
                                                       reads: int) -> None:
    src = sequence_driver(_plate(tmp_path / "plate", 60), fps=25)
    read: list[int] = []
    original = FrameSequence._read

    def counted(self: FrameSequence, k: int) -> np.ndarray:
        read.append(k)
        return original(self, k)

    monkeypatch.setattr(FrameSequence, "_read", counted)
    got = [int(f[0, 0, 0]) for f in driver_frames(src, max_frames, ratio, skip)]
    kept = list(_kept(iter(range(skip, 60)), max_frames, ratio))  # the frames the selection keeps
    assert got == kept
    assert len(kept) == reads
    assert set(read) - {0} == set(kept) - {0}  # (frame 0 also: its size, every frame is checked against)


def test_frames_in_memory_keep_their_selection() -> None:
    frames = [np.full((64, 64, 3), i, np.uint8) for i in range(50)]
    clip = DriverFrames(frames, fps=30)
    for max_frames, ratio, skip in [(None, Fraction(1), 0), (7, Fraction(5, 2), 3), (None, Fraction(2000, 1001), 5),
                                    (1, Fraction(5, 2), 49), (None, Fraction(1), 60), (3, Fraction(1), 48)]:
        got = [int(f[0, 0, 0]) for f in driver_frames(clip, max_frames, ratio, skip)]
        assert got == list(_kept(itertools.islice(iter(range(50)), skip, None), max_frames, ratio))


def test_a_start_at_the_end_of_a_clip_without_a_frame_count_names_its_frames_right(tmp_path: Path) -> None:
    """A WebM's header counts no frames: a start at its end is found past it by pass 1, and the error said the
    driver had "fewer than 6 frames" when it has 6 (now: at most 6)."""
    clip = write_face_driver(tmp_path / "six.webm", n=6, size=96)
    assert driver_info(clip).num_frames is None  # (the case: else the header's count is named)
    with pytest.raises(InputError, match=r"the first would be frame 6; the driver has at most 6 frames"):
        plan_driver(clip, start=0.24)
    assert len(list(driver_frames(clip, skip=5))) == 1  # (it has 6)


@pytest.mark.parametrize(("fps", "start", "frames"), [(None, None, 9), (10, None, 4), (10, 0.2, 2)],
                         ids=["all", "fps", "fps-and-start"])
def test_a_truncated_clip_at_a_lower_fps_names_the_max_frames_that_animates_it(
        tmp_path: Path, fps: int | None, start: float | None, frames: int) -> None:
    """The error of a clip that breaks off names the --max-frames that animates the frames before the break; with
    --fps it counted the clip's frames (9 at 25 fps), not the frames kept (4 at 10 fps), so following it broke again;
    that --max-frames now plans the clip."""
    clip = write_truncated_video(tmp_path / "cut.mp4", n=24)
    with pytest.raises(InputError, match=rf"; --max-frames {frames} \(AnimateConfig.max_frames\) animates the "
                                         rf"{frames} frames before the break") as caught:
        plan_driver(clip, fps=fps, start=start, face_crop=False)
    assert "after frame 9 " in str(caught.value)  # (the case: 9 frames decode before the break)
    assert plan_driver(clip, frames, face_crop=False, fps=fps, start=start).num_frames == frames


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), Fraction(24000, 1001), Fraction(25), Fraction(60)])
def test_a_start_time_the_log_shows_picks_its_frame_again(fps: Fraction) -> None:
    """The log's "from S s" (the first frame used): --start S picks that frame again (was rounded to the nearest
    millisecond: at 29.97 fps frame 100's 3.33667 s shown as 3.337, which picked frame 101)."""
    for frame in range(1, 5000):
        assert start_frame(fps, float(start_shown(frame / fps))) == frame, (fps, frame)
