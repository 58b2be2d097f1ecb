"""Synthetic media for the Animator / CLI tests: short face clips, sine audio, broken files.

Every clip is cut from the bundled portrait's face region (so dlib's HOG detector finds a face in each
frame), shifted a few pixels per frame, and written through :class:`megactor_rt.media.VideoWriter`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.media import VideoWriter, read_image

PORTRAIT = ASSETS_DIR / "portrait.png"
DRIVER = ASSETS_DIR / "driver.mp4"

# A square around the portrait's face (HOG box about (233, 267)-(543, 578) in the 768x844 image).
_FACE_CENTER = (388, 422)  # (x, y)
_FACE_HALF = 250


def face_frames(n: int, size: int = 192, step: int = 3) -> list[np.ndarray]:
    """``n`` distinct ``(size, size, 3)`` uint8 frames: the portrait's face, moving ``step`` px per frame."""
    img = read_image(PORTRAIT)
    cx, cy = _FACE_CENTER
    out = []
    for i in range(n):
        dx, dy = (i % 5) * step - 2 * step, (i % 3) * step - step
        top, left = cy - _FACE_HALF + dy, cx - _FACE_HALF + dx
        patch = img[top:top + 2 * _FACE_HALF, left:left + 2 * _FACE_HALF]
        out.append(np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR)))
    return out


def write_sine_audio(path: Path, seconds: float, rate: int = 16000, freq: float = 440.0,
                     then: float | None = None) -> Path:
    """An audio-only AAC file (.m4a) holding a mono sine of ``seconds`` (its second half at ``then`` Hz, if
    given)."""
    with av.open(str(path), "w") as c:
        stream = c.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = int(rate * seconds)
        hz = np.full(samples, float(freq))
        if then is not None:
            hz[samples // 2:] = then
        phase = 2 * np.pi * np.cumsum(hz) / rate
        wave = (0.3 * np.sin(phase)).astype(np.float32)[None]  # (1, N)
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(wave[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    return path


def write_face_driver(path: Path, n: int = 8, fps: int | Fraction = 25, audio: bool = False,
                      size: int = 192) -> Path:
    """A short H.264 driving clip of the portrait's moving face, optionally with a sine audio track."""
    source = None
    if audio:
        source = write_sine_audio(path.with_name(path.stem + "_sine.m4a"), seconds=n / float(fps) + 0.5)
    with VideoWriter(path, Fraction(fps), size, size, audio_source=source) as w:
        for frame in face_frames(n, size):
            w.write(frame)
    return path


def write_half_lit_driver(path: Path, n: int = 6) -> Path:
    """:func:`write_face_driver`'s moving face with its left half in deep shadow: dlib's HOG detector finds no
    face in any frame, its CNN detector finds it in each."""
    with VideoWriter(path, Fraction(25), 192, 192) as w:
        for frame in face_frames(n):
            shaded = frame.copy()
            shaded[30:170, :96] //= 4
            w.write(shaded)
    return path


def write_plain_driver(path: Path, n: int = 6, fps: int = 25, size: int = 128, audio: bool = False) -> Path:
    """A clip with no face anywhere (a grey gradient with a moving bar), optionally with sine audio."""
    source = write_sine_audio(path.with_name(path.stem + "_sine.m4a"), seconds=n / fps + 0.5) if audio else None
    with VideoWriter(path, Fraction(fps), size, size, audio_source=source) as w:
        for i in range(n):
            f = np.tile(np.linspace(30, 200, size, dtype=np.uint8)[None, :, None], (size, 1, 3))
            f[40:60, (i * 7) % (size - 20):(i * 7) % (size - 20) + 20] = (220, 60, 40)
            w.write(np.ascontiguousarray(f))
    return path


def write_empty_video(path: Path) -> Path:
    """An MP4 whose encoder was started but never given a frame (a crashed or aborted export)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        c.start_encoding()  # without this PyAV writes no file at all
        c.mux(vs.encode(None))
    return path


def write_zero_frame_video(path: Path) -> Path:
    """A clip whose header announces 6 frames but none decodes (the sample data is zeroed)."""
    write_face_driver(path, n=6, size=64)
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4  # VideoWriter writes faststart files: the index precedes mdat
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))
    return path


def write_truncated_video(path: Path, n: int = 24) -> Path:
    """A faststart clip (index first) cut in half: the start decodes, then the stream breaks off."""
    full = path.with_name(path.stem + "_full.mp4")
    rng = np.random.default_rng(0)
    frames = face_frames(4, 128)
    with VideoWriter(full, Fraction(25), 128, 128) as w:
        for i in range(n):  # noisy frames: every frame is big, so half the bytes hold about half the frames
            noise = rng.integers(-40, 40, (128, 128, 3))
            w.write(np.clip(frames[i % 4].astype(np.int16) + noise, 0, 255).astype(np.uint8))
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return path


def plain_image(path: Path, width: int, height: int) -> Path:
    """A faceless image (a colour gradient) of the given size."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    img = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.uint8)], axis=2)
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a video via PyAV directly (independent of megactor_rt.media)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def block_means(frame: np.ndarray, k: int = 8) -> np.ndarray:
    """Means of ``frame``'s k x k blocks (its last partial row and column of blocks left out): compares frames
    through a lossy codec, whose error on the tiny model's noisy frames is large per pixel and small per block."""
    h, w = frame.shape[0] // k * k, frame.shape[1] // k * k
    return frame[:h, :w].astype(float).reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def stream_facts(path: Path) -> tuple[int, Fraction, bool]:
    """(decoded frame count, average frame rate, has an audio stream) via plain PyAV."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        rate = Fraction(vs.average_rate)
        has_audio = bool(c.streams.audio)
        n = sum(1 for _ in c.decode(vs))
    return n, rate, has_audio


def leftovers(folder: Path, stem: str) -> list[str]:
    """Files in ``folder`` that look like (partial) outputs named ``stem``: the final file or its temp."""
    return sorted(p.name for p in folder.iterdir() if stem in p.name)


def write_audio_only(path: Path) -> Path:
    """A media file without a video stream (AAC audio only)."""
    return write_sine_audio(path, seconds=0.3)


# Bad-input cases shared by the Python API and CLI tests: name -> what is broken and the message expected.
BAD_INPUT_CASES = [
    "portrait_missing", "portrait_not_media", "portrait_truncated", "portrait_no_face", "portrait_tiny",
    "portrait_huge", "driver_missing", "driver_not_media", "driver_audio_only", "driver_empty",
    "driver_zero_frames",
    "driver_truncated", "driver_no_face", "output_folder_missing", "output_is_directory",
    "output_bad_suffix",
]


def bad_input(case: str, root: Path, portrait: Path, driver: Path) -> tuple[Path, Path, Path, str]:
    """Build the broken file of ``case`` under ``root``.

    Args:
        case: one of :data:`BAD_INPUT_CASES`.
        root: an empty folder; the output goes to ``root / "out" / "result.mp4"`` unless the case breaks it.
        portrait: a good portrait.
        driver: a good driving clip.

    Returns:
        ``(portrait, driver, output, needle)`` where ``needle`` is a regex the error message must match
        (it names the offending file and the problem).
    """
    out_dir = root / "out"
    out_dir.mkdir()
    output = out_dir / "result.mp4"
    what, _, problem = case.partition("_")
    bad = root / f"bad_{problem}"
    if case == "portrait_missing":
        portrait, needle = bad.with_suffix(".png"), r"bad_missing\.png: (image|portrait) file does not exist"
    elif case == "portrait_not_media":
        portrait = bad.with_suffix(".png")
        portrait.write_text("this is not an image\n" * 20)
        needle = r"bad_not_media\.png: not a readable image"
    elif case == "portrait_truncated":
        portrait = bad.with_suffix(".png")
        data = PORTRAIT.read_bytes()
        portrait.write_bytes(data[: len(data) // 2])
        needle = r"bad_truncated\.png: image is corrupt or truncated"
    elif case == "portrait_no_face":
        portrait, needle = plain_image(bad.with_suffix(".png"), 256, 256), r"no face found in portrait bad_no_face\.png"
    elif case == "portrait_tiny":
        portrait, needle = plain_image(bad.with_suffix(".png"), 32, 40), r"bad_tiny\.png: image is 32x40 px.*at least 64"
    elif case == "portrait_huge":
        portrait = plain_image(bad.with_suffix(".png"), 8200, 64)
        needle = r"bad_huge\.png: image is 8200x64 px.*at most 8192"
    elif case == "driver_missing":
        driver, needle = bad.with_suffix(".mp4"), r"bad_missing\.mp4: (video|driver) file does not exist"
    elif case == "driver_not_media":
        driver = bad.with_suffix(".mp4")
        driver.write_text("this is not a video\n" * 50)
        needle = r"bad_not_media\.mp4: not a readable video file"
    elif case == "driver_audio_only":
        driver, needle = write_audio_only(bad.with_suffix(".m4a")), r"bad_audio_only\.m4a: the file has no video stream"
    elif case == "driver_empty":
        driver, needle = write_empty_video(bad.with_suffix(".mp4")), r"bad_empty\.mp4: the file has no video stream"
    elif case == "driver_zero_frames":
        driver = write_zero_frame_video(bad.with_suffix(".mp4"))
        needle = r"bad_zero_frames\.mp4: no decodable video frame"
    elif case == "driver_truncated":
        driver, needle = write_truncated_video(bad.with_suffix(".mp4")), r"bad_truncated\.mp4: video is truncated"
    elif case == "driver_no_face":
        driver = write_plain_driver(bad.with_suffix(".mp4"))
        needle = r"no face found in any of the 6 frames of driving video bad_no_face\.mp4.*--no-face-crop"
    elif case == "output_folder_missing":
        output, needle = root / "missing_folder" / "result.mp4", r"result\.mp4: output folder .*missing_folder does not exist"
    elif case == "output_is_directory":
        output.mkdir()
        needle = r"result\.mp4: output path is a directory"
    elif case == "output_bad_suffix":
        output, needle = out_dir / "result.avi", r"result\.avi: unsupported output format '\.avi'"
    else:
        raise ValueError(case)
    return portrait, driver, output, needle


class Renames:
    """What ``os.fsync`` synced and ``os.replace`` renamed, in order (while installed with :meth:`install`), to
    check that a file reaches the disk before its final name: ``("sync", path)`` and ``("rename", src, dst)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def install(self, monkeypatch: object) -> Renames:
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            self.events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: object, dst: object, **kw: object) -> None:
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))  # type: ignore[arg-type]
            real_replace(src, dst, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "fsync", fsync)  # type: ignore[attr-defined]
        monkeypatch.setattr(os, "replace", replace)  # type: ignore[attr-defined]
        return self

    def unsynced(self) -> list[str]:
        """The final names given to a file not synced before its rename, or whose folder was not synced after."""
        bad = []
        for i, event in enumerate(self.events):
            if event[0] != "rename":
                continue
            src, dst = event[1], event[2]
            before, after = self.events[:i], self.events[i + 1:]
            folder = os.path.dirname(os.path.realpath(dst))
            if ("sync", os.path.realpath(src)) not in before or ("sync", folder) not in after:
                bad.append(dst)
        return bad


def write_leftovers(data: bytes, stale: Sequence[Path], fresh: Sequence[Path] = ()) -> None:
    """Temporary files as writers leave them, each holding ``data``: those in ``stale`` untouched for longer than
    an interrupted write's file is kept (``files.STALE_S``: a killed writer's), those in ``fresh`` written now (a
    live writer's, or one too young to tell)."""
    import time

    from megactor_rt.files import STALE_S

    for path in (*stale, *fresh):
        path.write_bytes(data)
    then = time.time() - STALE_S - 60
    for path in stale:
        os.utime(path, (then, then))
