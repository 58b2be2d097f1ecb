"""``megactor-rt inspect FILE``: what the engine sees in a file, before a run.

For an image: its size (upright, as a portrait is read) and the faces the portrait crop would choose from. For a
video (or animated GIF/WebP): size, exact frame rate, frame count, duration, sound, a variable rate, HDR, the
faces in its first frame (a video portrait's), and for a result of this engine the settings it was made with.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from megactor_rt.errors import InputError
from megactor_rt.media import (
    VIDEO_SUFFIXES,
    AnimatedWebP,
    is_animated_webp,
    probe_video,
    read_image,
    read_portrait,
    require_file,
    result_settings,
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
    require_file(path, "input")
    report: dict[str, Any]
    image = None  # a still image's pixels, read once for its size and its faces
    if path.suffix.lower() == ".webp" and is_animated_webp(path):
        frames = AnimatedWebP(path)
        h, w = frames[0].shape[:2]
        report = {"kind": "animated WebP", "size": f"{w}x{h}", "fps": _rate(frames.fps), "frames": len(frames)}
    elif path.suffix.lower() in VIDEO_SUFFIXES or (image := _image(path)) is None:
        info = probe_video(path)
        if info.still_image:
            raise InputError(f"{path}: not an image Pillow reads, nor a video")
        report = {"kind": "video", "size": f"{info.width}x{info.height}", "fps": _rate(info.fps),
                  "frames": info.num_frames, "duration_s": None if info.duration_s is None else
                  round(info.duration_s, 3), "audio": info.has_audio, "variable_rate": info.variable_rate,
                  "hdr": info.hdr}
    else:
        report = {"kind": "image", "size": f"{image.shape[1]}x{image.shape[0]}"}
    if faces:
        from megactor_rt.preprocess import portrait_faces

        found = portrait_faces(image if image is not None else read_portrait(path), path.name)
        report["faces"] = [f"{round(b.width)}x{round(b.height)} px at ({round(b.left)}, {round(b.top)})"
                           for b in sorted(found, key=lambda b: b.left)]  # left to right, as --portrait-face counts
    if report["kind"] == "video":
        settings = result_settings(path)
        if settings is not None:
            report["made_with"] = settings
    return report


def _image(path: Path) -> np.ndarray | None:
    """The still image's pixels (as a portrait is read), or None where Pillow does not read it as one."""
    try:
        return read_image(path)
    except InputError:
        return None


def _rate(fps: Fraction) -> str:
    """``30`` or ``30000/1001 (29.97)``."""
    return str(fps) if fps.denominator == 1 else f"{fps} ({float(fps):.3f})"
