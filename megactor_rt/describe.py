"""``megactor-rt inspect FILE``: what the engine sees in a file, before a run.

For an image: its size (upright, as a portrait is read) and the faces the portrait crop would choose from. For a
sound alone (an ``--audio`` file, a sequence's ``audio.wav``): its codec, rate, channels and duration. For a
video (or animated GIF/PNG/WebP): size, exact frame rate, frame count, duration, sound, a variable rate (and then
the frames a run reads, on its constant-rate grid), HDR, an MP4/MOV cut short (``truncated``: its header counts more
than it holds), the faces in its first frame (a video portrait's), and for a result of this engine the settings it was
made with. For an image sequence (its number pattern, ``take1/%05d.png``, ``plate/%04d.jpg``): its first frame's
size and faces, its frame numbers (and any missing), its sound file, and the rate and settings its frames record (this
engine's PNG results; a frame of one alone too).
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megactor_rt.errors import InputError
from megactor_rt.media import (
    VIDEO_SUFFIXES,
    AnimatedWebP,
    VideoInfo,
    grid_frame_count,
    is_animated_webp,
    iso_cut_off,
    matroska_cut_off,
    photo_hdr,
    picture_cut_off,
    probe_sound,
    probe_video,
    read_image,
    read_portrait,
    require_file,
    result_settings,
    timestamps_vary,
)
from megactor_rt.sequence import (
    DEFAULT_FPS,
    FRAME_SUFFIXES,
    find_pattern,
    is_frame_pattern,
    is_sequence,
    jpeg_cut_off,
    recorded_fps,
    sequence_frames,
    sequence_sound,
)


def describe(path: str | Path, faces: bool = True) -> dict[str, Any]:
    """What :mod:`megactor_rt.describe` reports about ``path``, as plain JSON values.

    Args:
        faces: also find the faces (dlib's HOG detector, then its CNN detector where installed and HOG finds
            none, as a portrait is cropped: a second or more for a large photo).

    Raises:
        InputError: missing or unreadable file (the message says why).
    """
    path = Path(path)
    if is_frame_pattern(path) or path.is_dir():  # a folder: its image sequence
        return _describe_sequence(path if is_frame_pattern(path) else find_pattern(path), faces)
    require_file(path, "input")
    report: dict[str, Any]
    image = None  # a still image's pixels, read once for its size and its faces
    animated = _animated(path)  # (a GIF or PNG of frames: a driver, read as a video)
    if is_animated_webp(path):  # (by content: one saved as .gif too)
        report = _webp_report(path)
    elif (path.suffix.lower() in VIDEO_SUFFIXES or animated or (image := _image(path)) is None) and \
            (sound := probe_sound(path)) is not None:
        return {"kind": "audio", **sound}  # no picture: no faces, no settings
    elif path.suffix.lower() in VIDEO_SUFFIXES or image is None:
        try:
            info = probe_video(path)
        except InputError:
            if path.suffix.lower() in _IMAGE_SUFFIXES:  # (named as an image, read as none: said as a portrait's is)
                read_image(path)
            raise
        if info.still_image:  # (FFmpeg reads it as a picture: one named as a video, a PNG saved as .mp4, is read as
            image = read_image(path)  # an image, as a portrait; where Pillow does not read it either, this says why)
            report = _image_report(path, image)
        else:
            report = _video_report(path, info, animated)
    else:
        report = _image_report(path, image)
    if faces:
        from megactor_rt.preprocess import portrait_faces

        found = portrait_faces(image if image is not None else read_portrait(path), path.name)
        report["faces"] = [f"{round(b.width)}x{round(b.height)} px at ({round(b.left)}, {round(b.top)})"
                           for b in sorted(found, key=lambda b: b.left)]  # left to right, as --portrait-face counts
    if report["kind"] == "video":
        settings = result_settings(path)
        if settings is not None:
            report["made_with"] = settings
    elif report["kind"] == "image" and is_sequence(path):  # a frame of a sequence result
        report.update(_frame_facts(path))
    return report


def _video_report(path: Path, info: VideoInfo, animated: bool) -> dict[str, Any]:
    """A video's (or an animated GIF's or PNG's) size, rate, frames, duration, sound, variable rate, HDR, other
    video streams and where it is cut off."""
    kind = f"animated {'GIF' if path.suffix.lower() == '.gif' else 'PNG'}" if animated else "video"
    report: dict[str, Any] = {"kind": kind, "size": f"{info.width}x{info.height}",
                              "fps": _rate(info.fps),
                              "frames": info.num_frames if info.num_frames is not None else _count_frames(path),
                              "duration_s": None if info.duration_s is None else round(info.duration_s, 3),
                              "audio": info.has_audio,
                              "variable_rate": info.variable_rate or timestamps_vary(path, info.fps),
                              "hdr": info.hdr}  # (a Matroska header does not tell a variable rate: its timestamps do)
    if (report["variable_rate"] or animated) and (run := grid_frame_count(info)) is not None and \
            (report["variable_rate"] or run != report["frames"]):  # (what a run reads and writes: its frames on
        report["frames_in_a_run"] = run  # the grid at its fps, beside the ones it stores; a GIF/APNG's pause at
        # its end, or an APNG's anywhere, is no variable rate to their headers or first frames' timestamps)
    if info.other_streams:  # (the one read, and those that are not)
        report["video_streams"] = f"{1 + len(info.other_streams)}: {info.stream} is read, not " + \
            ", ".join(info.other_streams)
    if (cut := iso_cut_off(path)) is not None:  # (the header's frames and duration are more than it holds)
        report["truncated"] = f"{cut}: not all the frames and seconds its header counts are there"
    elif (cut := matroska_cut_off(path)) is not None:  # (its frames are counted: its duration is more)
        frames, seconds = report["frames"], info.duration_s
        if frames and seconds and frames >= seconds * info.fps - 2:  # (cut after its frames: its index, tags)
            report["truncated"] = f"{cut}: its frames are all there, not what follows them (an index, tags)"
        else:
            report["truncated"] = f"{cut}: not all the seconds its header counts are there"
    elif animated and (cut := picture_cut_off(path)) is not None:
        report["truncated"] = f"{cut} (a partial download or copy?)"
    return report


def _webp_report(path: Path) -> dict[str, Any]:
    """An animated WebP's size, rate, stored frames and duration, as a GIF's are given (was: the frames a run reads,
    a pause's repeats among them, as its frames, and no duration): where it pauses, the frames a run reads too."""
    frames = AnimatedWebP(path)
    shown = frames.durations_ms
    h, w = frames[0].shape[:2]
    report: dict[str, Any] = {"kind": "animated WebP", "size": f"{w}x{h}", "fps": _rate(frames.fps),
                              "frames": len(shown), "duration_s": round(sum(shown) / 1000, 3), "audio": False,
                              "variable_rate": max(shown) - min(shown) > 1}  # (30 fps: 33 and 34 ms, no pause)
    if len(frames) != len(shown):
        report["frames_in_a_run"] = len(frames)
    return report


def _image_report(path: Path, image: np.ndarray) -> dict[str, Any]:
    """A still image's upright size, and its HDR where it is an HDR photo."""
    report: dict[str, Any] = {"kind": "image", "size": f"{image.shape[1]}x{image.shape[0]}"}
    if (hdr := photo_hdr(path)) is not None:
        report["hdr"] = hdr
    return report


def _describe_sequence(path: Path, faces: bool) -> dict[str, Any]:
    """A frame sequence's report: its first frame's size, faces and text chunks, and its frame numbers."""
    pattern, frames = sequence_frames(path)
    first, last = pattern.number(frames[0].name), pattern.number(frames[-1].name)
    first_frame = describe(frames[0], faces)
    if first_frame["kind"] != "image":  # (an animated PNG as a frame: a run reads its first picture; its frames,
        # rate and sound are no facts of the sequence's: were reported as the sequence's own)
        first_frame = {k: v for k, v in first_frame.items() if k in ("kind", "size", "faces")}
    fps = first_frame.pop("fps", None) or f"none recorded ({_rate(DEFAULT_FPS)} taken as a driver; --sequence-fps)"
    sound = sequence_sound(pattern)
    report = {"kind": "frame sequence", "size": first_frame.pop("size"), "fps": fps,
              "frames": len(frames), "numbers": f"{first}-{last}", "audio": sound.name if sound else False}
    if last is not None and first is not None and last - first + 1 != len(frames):
        report["missing_frames"] = last - first + 1 - len(frames)
        have = {pattern.number(f.name) for f in frames}
        report["first_missing"] = pattern.name(next(n for n in range(first, last + 1) if n not in have))
    sizes = [_header_size(frame) for frame in frames]  # (each frame's header, read once)
    if (odd := _odd_sizes(frames, sizes)) is not None:  # (a run refuses such a sequence at its first odd frame)
        report["other_sizes"] = odd
    if (bad := _unreadable(frames, sizes)) is not None:  # (and stops at its first unreadable frame)
        report["unreadable_frames"] = bad
    del first_frame["kind"]
    if "bit_depth" in first_frame:
        first_frame["bit_depth"] = _sequence_depth(frames)
    return report | first_frame  # its faces and settings


def _odd_sizes(frames: list[Path], sizes: list[tuple[int, int] | None]) -> str | None:
    """Where frames differ in size from the first (a frame re-rendered at another size, replaced by hand), how
    many, and the first of them, from their headers (``sizes``, :func:`_header_size`'s); None where all have one
    size (was: the first frame's size alone, and the run refused the sequence at its first odd frame)."""
    first = sizes[0]
    if first is None:
        return None
    odd = [(frame, size) for frame, size in zip(frames[1:], sizes[1:], strict=True)
           if size is not None and size != first]
    if not odd:
        return None
    (frame, (w, h)), n = odd[0], len(odd)
    return f"{n} frame{'s' * (n != 1)} of another size than the first (first: {frame.name}, {w}x{h}): a driver's " \
        "frames must all have one size"


def _unreadable(frames: list[Path], sizes: list[tuple[int, int] | None]) -> str | None:
    """Frames a run cannot read (a render that crashed mid-frame, a copy cut short: an empty file, no image's
    header, a PNG without its end), how many, and the first with why, from their headers (``sizes``) and a PNG's
    last bytes; None where there is none (was: not looked for: the sequence was reported whole, and the run
    stopped at such a frame after its first pass)."""
    bad = []
    for frame, size in zip(frames, sizes, strict=True):
        why = "not a readable image" if size is None else picture_cut_off(frame) or jpeg_cut_off(frame)
        if why is not None:
            bad.append((frame, "an empty file" if size is None and frame.stat().st_size == 0 else why))
    if not bad:
        return None
    (frame, why), n = bad[0], len(bad)
    return f"{n} frame{'s' * (n != 1)} a run cannot read (first: {frame.name}, {why})"


def _header_size(frame: Path) -> tuple[int, int] | None:
    """A frame's upright width and height (its EXIF orientation applied, as a driver's frame is read) from its
    header alone (a PNG's IHDR chunk, and its eXIf chunk where it comes before the pixels, as written: Pillow's
    getexif would decode a PNG to look after them); None where it cannot be read so."""
    try:
        with open(frame, "rb") as f:
            head = f.read(24)
        if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            turned = _png_orientation(frame) in (5, 6, 7, 8)  # (was: not looked at, a turned PNG of the plate's
            # upright size called another size and one turned off it not)
        else:
            with Image.open(frame) as im:
                (w, h), turned = im.size, im.getexif().get(0x0112) in (5, 6, 7, 8)
        return (h, w) if turned else (w, h)
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError):  # (struct.error: an
        return None  # EXIF block cut short, which Pillow does not catch: was "unexpected error" of inspect)


def _png_orientation(frame: Path) -> int | None:
    """The EXIF orientation of a PNG's eXIf chunk before its pixels (read as Pillow opens it), or None."""
    try:
        with Image.open(frame) as im:
            raw = im.info.get("exif")
    except Image.DecompressionBombError:  # (its size is its header's: no rotation looked for)
        return None
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    orientation = exif.get(0x0112)
    return orientation if isinstance(orientation, int) else None


def _sequence_depth(frames: list[Path]) -> int | str:
    """The frames' bits per sample: one number, or where PNGs of several depths are mixed (a plate touched up in
    another program), each with its frame count (read as a driver, every frame is taken to 8 bits alike)."""
    counts: dict[int, int] = {}
    for frame in frames:
        depth = png_bit_depth(frame)
        if depth is not None:  # (1, 2, 4 bits: a palette's or a grey PNG's, read as 8 bits as any 8-bit frame)
            counts[max(depth, 8)] = counts.get(max(depth, 8), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{depth} ({n} frame{'s' * (n != 1)})" for depth, n in sorted(counts.items()))


def _frame_facts(path: Path) -> dict[str, Any]:
    """A sequence frame's bits per colour, and its rate and settings (its PNG text chunks) where it records them."""
    fps, settings = recorded_fps(path), result_settings(path)
    depth = png_bit_depth(path)
    return {**({"bit_depth": depth} if depth else {}), **({"fps": _rate(fps)} if fps else {}),
            **({"made_with": settings} if settings else {})}


def png_bit_depth(path: Path) -> int | None:
    """A PNG file's bits per sample (its IHDR chunk's; Pillow reads 16-bit RGB as 8-bit and does not say), or None
    where ``path`` is no PNG."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else None


# the names of images: those a folder of frames is read for, and the phone and GIF formats a portrait may be
_IMAGE_SUFFIXES = FRAME_SUFFIXES | {".heic", ".heif", ".avif", ".gif"}


def _count_frames(path: Path) -> int | None:
    """A video's frames where its header does not say (WebM, Matroska): its video packets, read without decoding
    them; None where it cannot be read so."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, IndexError, OSError):
        return None


def _animated(path: Path) -> bool:
    """Whether ``path`` is a GIF or PNG (APNG) of more than one frame (a driver, read as a video; Pillow would give
    its first)."""
    if path.suffix.lower() not in (".gif", ".png", ".apng"):
        return False
    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # (a bomb: refused by its reading)
        return False


def _image(path: Path) -> np.ndarray | None:
    """The still image's pixels (as a portrait is read), or None where Pillow does not read it as one."""
    try:
        return read_image(path)
    except InputError:
        return None


def _rate(fps: Fraction) -> str:
    """``30`` or ``30000/1001 (29.97)``."""
    return str(fps) if fps.denominator == 1 else f"{fps} ({float(fps):.3f})"
