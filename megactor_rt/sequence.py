"""Results as PNG frame sequences: a folder of numbered, lossless frames (``take1/%05d.png``).

Compositing and editing tools read image sequences, and re-encoding a lossy video loses quality twice. A sequence
result is named by a number pattern in its file name, as FFmpeg names them (``%d``, or ``%05d``: at least five
digits, zero-padded); its frames are numbered from :data:`FIRST_FRAME`, or, driven by an image sequence (below) at
its own rate, with the numbers of the driver's frames they animate (a plate's 1001, 1002, ...). The folder that
holds the pattern is the result as a whole:

* it is written as a hidden temporary folder beside it and renamed onto its name once every frame is written, so a
  run that fails or is stopped leaves no frames under the final name; a folder left by a killed write is removed
  by the next write of the same result once it is an hour old;
* an existing folder is replaced only where it holds nothing but frames named by the pattern (a result written
  before); any other file in it is an error before any work, so nothing else is ever deleted;
* every frame carries PNG text chunks: ``fps`` (the result's exact frame rate, which image files otherwise lose)
  and, unless metadata is off, ``Comment`` with the run's settings (as a video result's comment tag).

The result's sound (the driver's, or another file's) goes beside the frames as :data:`SOUND_NAME` (16-bit PCM WAV,
starting with the first frame), which editors take with a sequence; a folder driver or pattern whose folder holds
one drives with that sound.

Image sequences are read as drivers too (:class:`FrameSequence`): any image format Pillow reads (PNG, JPEG, TIFF,
...), named by a number pattern the same way, its frames consecutive from whatever number the first has, at the rate
its frames record (this engine's sequences do) or a given one, else FFmpeg's default of 25 fps.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import mmap
import os
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import TypeVar, overload

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from megactor_rt.config import exact_rate
from megactor_rt.errors import InputError, ResourceError
from megactor_rt.files import UNHELD_S, hold, let_go, remove_stale, sync_file, sync_folder

logger = logging.getLogger(__name__)

SEQUENCE_SUFFIXES = (".png",)
FIRST_FRAME = 1  # as FFmpeg's image2 muxer numbers them
FPS_KEY = "fps"  # the PNG text chunk with the result's frame rate ("30000/1001")
SETTINGS_KEY = "Comment"  # the PNG text chunk with the run's settings (JSON), PNG's standard keyword
# zlib level 1: 31 ms per 512 px frame with Pillow on one core, within 20 % of level 6's size at a third of its time
_PNG_LEVEL = 1
_NUMBER = re.compile(r"%(0?\d*)d")
_HASHES = re.compile(r"#+(?!\d)")  # a number pattern as compositing tools write it (####: four digits)
_TMP_NAME_CHARS = 200  # the folder name's part in its temporary name (the file system's limit is 255 bytes)
DEFAULT_FPS = Fraction(25)  # the rate of an image sequence that records none (FFmpeg's image2 default)
SOUND_NAME = "audio.wav"  # a sequence's sound, in its folder beside the frames
# what a frame takes per pixel and colour at _PNG_LEVEL, by bit depth: 0.34-0.39 on the bundled driver's 512 px
# camera frames; 16-bit frames 1.52 (their low bytes hardly compress; bench/result_formats.py, 2026-11-28)
PNG_BYTES_PER_VALUE = {8: 0.4, 16: 1.6}


def is_sequence(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a frame-sequence result (a ``.png`` suffix; its number pattern is checked by
    :func:`frame_pattern`)."""
    return Path(path).suffix.lower() in SEQUENCE_SUFFIXES


@dataclass(frozen=True)
class FramePattern:
    """The frames of a sequence: ``folder / f"{head}{number:0{digits}d}{tail}"``."""

    folder: Path
    head: str
    tail: str
    digits: int  # the least number of digits, zero-padded (0 or 1: no padding)

    def name(self, number: int) -> str:
        return f"{self.head}{number:0{self.digits}d}{self.tail}"

    def number(self, name: str) -> int | None:
        """The frame number of a file named by this pattern, or None where ``name`` is no such frame."""
        head, tail = re.escape(self.head), re.escape(self.tail)
        match = re.fullmatch(f"{head}(\\d{{{max(self.digits, 1)},}}){tail}", name)
        if match is None:
            return None
        digits = match.group(1)  # a frame above the padding has more digits, but never a leading zero
        return int(digits) if len(digits) <= max(self.digits, 1) or digits[0] != "0" else None

    def frames(self) -> list[Path]:
        """The frames in the folder, in number order (none where it does not exist)."""
        if not self.folder.is_dir():
            return []
        numbered = [(n, p) for p in self.folder.iterdir() if (n := self.number(p.name)) is not None and p.is_file()]
        return [p for _, p in sorted(numbered)]

    def others(self) -> list[Path]:
        """What the folder holds besides this pattern's frames (sorted; none where it does not exist)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if self.number(p.name) is None or not p.is_file())


def frame_pattern(path: str | os.PathLike[str]) -> FramePattern:
    """The pattern of a sequence result's path (``take1/%05d.png``, ``shots/a/frame_%d.png``).

    Raises:
        InputError: no number pattern in the file name, more than one, a ``%`` that is none, or a pattern in a
            folder's name.
    """
    shown = Path(path).expanduser()  # (messages name it as given)
    path = shown.absolute()
    found = list(_NUMBER.finditer(path.name))
    stem = path.stem.split("%")[0].rstrip("_-. ")
    example = (shown.parent / stem if stem else shown.parent) / f"%05d{path.suffix}"
    if (hashes := _HASHES.search(path.name)) is not None and not found:  # (Nuke's, Houdini's ####: was taken for
        # the name of a folder, e.g. r2/####/%05d.png)
        digits = len(hashes.group())
        example = shown.with_name(f"{path.name[:hashes.start()]}%0{digits}d{path.name[hashes.end():]}")
        raise InputError(f"{shown}: frames are numbered as FFmpeg names them, %0{digits}d for "
                         f"{hashes.group()}: e.g. {example} (frames {example.name % FIRST_FRAME}, ...)")
    if len(found) != 1:
        what = f"a {path.suffix} result is a folder of numbered frames" if is_sequence(path) and not found else \
            "the frames of a sequence are named by a number pattern"
        raise InputError(f"{shown}: {what}: give its file name one number pattern, e.g. {example} (frames "
                         f"{FIRST_FRAME:05d}{path.suffix}, ...)")
    match = found[0]
    head, tail = path.name[:match.start()], path.name[match.end():]
    if "%" in head + tail or "%" in str(path.parent):
        raise InputError(f"{shown}: only the file name may hold a number pattern (%d or %05d), once, e.g. {example}")
    width = match.group(1)
    return FramePattern(path.parent, head, tail, int(width) if width else 0)


def sequence_name(path: str | os.PathLike[str]) -> str:
    """How messages and a result's settings name a sequence: its pattern with its folder's name
    (``plate/%04d.png``)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def sequence_frames(path: str | os.PathLike[str]) -> tuple[FramePattern, list[Path]]:
    """A sequence's pattern and its frames in number order.

    Raises:
        InputError: no pattern (:func:`frame_pattern`), no folder, or no frame in it.
    """
    pattern = frame_pattern(path)
    path, folder = Path(path).expanduser(), pattern.folder  # (named as given: was made absolute in messages)
    if not folder.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist" if not folder.exists() else
                         f"{path}: {path.parent} is not a folder")
    frames = pattern.frames()
    if not frames:
        held = _folder_patterns(folder)  # (was: no word of the sequence there, e.g. %03d given for 0001.png)
        hint = f"; it holds {path.parent / held[0][0].name} ({held[0][1]} frame{'s' * (held[0][1] != 1)})" \
            f"{f' and {len(held) - 1} other sequence(s)' if len(held) > 1 else ''}" if held else ""
        raise InputError(f"{path}: no frame named by this pattern in {path.parent} (e.g. "
                         f"{pattern.name(FIRST_FRAME)}){hint}")
    if (kind := _UNREAD.get(Path(f"f{pattern.tail}").suffix.lower())) is not None:  # (was: "not a readable image" of
        # the first frame, as if it were broken)
        raise InputError(f"{path}: {kind} frames are not read (Pillow reads no {kind}): convert them to 16-bit PNG "
                         "or TIFF (oiiotool, ffmpeg -pix_fmt rgb48be, a compositing tool's write)")
    return pattern, frames


def is_frame_pattern(path: object) -> bool:
    """Whether ``path`` is a path whose file name holds a number pattern (``%d``, ``%04d``): an image sequence. An
    existing file is none, whatever its name (a video named ``100%dance.mp4`` is read as the video)."""
    return (isinstance(path, (str, os.PathLike)) and (_NUMBER.search(Path(path).name) or _HASHES.search(
        Path(path).name)) is not None and not Path(path).is_file())  # (####: refused by frame_pattern, which says
    # how FFmpeg writes it; was "file does not exist")


_UNREAD = {".exr": "OpenEXR", ".dpx": "DPX"}  # frame formats of compositing that no reader here takes
# the image files a folder of frames is looked through for (find_pattern)
FRAME_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
_DIGITS = re.compile(r"(\d+)")


def find_pattern(folder: str | os.PathLike[str]) -> Path:
    """The number pattern of the one image sequence in ``folder`` (``plate/`` holding ``p.1001.png`` ... gives
    ``plate/p.%04d.png``; unpadded numbers of several lengths give ``%d``); files of other kinds are left out.

    Raises:
        InputError: no numbered image in it, or several sequences (each named, with its pattern to pass instead).
    """
    folder = Path(folder)
    patterns = _folder_patterns(folder)
    if not patterns:
        kinds = sorted({kind for p in folder.iterdir() if (kind := _UNREAD.get(p.suffix.lower())) is not None})
        unread = f"; its {' and '.join(kinds)} frames are not read: convert them to 16-bit PNG or TIFF" if kinds else ""
        raise InputError(f"{folder}: a folder is read as an image sequence, and this one holds no numbered image "
                         f"({', '.join(sorted(FRAME_SUFFIXES))}){unread}")
    if len(patterns) > 1:
        (first, count), (_, second) = patterns[:2]
        most = f" ({count} frames)" if count > second else ""
        raise InputError(f"{folder}: holds several image sequences ({', '.join(p.name for p, _ in patterns)}); name "
                         f"the one to use by its pattern, e.g. {first}{most}")
    return patterns[0][0]


def _folder_patterns(folder: Path) -> list[tuple[Path, int]]:
    """The number patterns of the image sequences in ``folder`` with their frame counts, the one of most frames
    first (then by name: the example named is the plate, not a frame saved apart from it)."""
    shapes: dict[tuple[str, ...], list[list[str]]] = {}  # by the names' parts besides their runs of digits
    for p in folder.iterdir():
        parts = _DIGITS.split(p.name)  # (text, digits, text, ..., text)
        if len(parts) > 1 and p.suffix.lower() in FRAME_SUFFIXES and p.is_file() and not p.name.startswith("."):
            # (hidden: no frame; macOS's ._0001.png beside each frame copied to a shared disk was a second sequence)
            shapes.setdefault(tuple(parts[::2]), []).append(parts)
    groups: dict[tuple[str, str], list[str]] = {}
    for names in shapes.values():
        runs = len(names[0]) // 2
        # the frame number is the run of digits whose other runs split the names into the fewest sequences (then
        # the widest, the last: shot_0001_v2.png's 0001, not the 2 as was taken, which made each frame a sequence)
        k = min(range(runs), key=lambda k: (len({tuple(n[:2 * k + 1] + n[2 * k + 2:]) for n in names}),
                                            -max(len(n[2 * k + 1]) for n in names), -k))
        for n in names:
            groups.setdefault(("".join(n[:2 * k + 1]), "".join(n[2 * k + 2:])), []).append(n[2 * k + 1])
    patterns = []
    for (head, tail), numbers in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        widths, zeros = {len(n) for n in numbers}, {len(n) for n in numbers if n.startswith("0")}
        # padded: the width of its numbers with a leading zero, the others beyond the padding (p098.png ...
        # p1000.png: %03d; was %d, which dropped 098 and 099), or of them all, one width
        width = zeros.pop() if len(zeros) == 1 and min(widths) in zeros else \
            next(iter(widths)) if len(widths) == 1 and len(numbers) > 1 else 0
        patterns.append((folder / f"{head}%{f'0{width}' if width else ''}d{tail}", len(numbers)))
    return patterns


def sequence_pattern(path: object) -> Path | None:
    """An input's image-sequence pattern: the path itself where it is one, a folder's (:func:`find_pattern`); None
    for anything else (a file, a missing path, frames in memory).

    Raises:
        InputError: a folder without one image sequence.
    """
    if is_frame_pattern(path):
        return Path(path)  # type: ignore[arg-type]
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        return find_pattern(path)
    return None


def check_sequence_path(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that a frame sequence can be written at ``path`` (a pattern: see
    :func:`frame_pattern`): the folder above its folder exists and is writable, and its folder is new, empty or
    holds only frames named by the pattern (a result written before: it is replaced as a whole).

    Returns:
        ``path`` as an absolute :class:`Path`.

    Raises:
        InputError: naming the path and the problem.
    """
    pattern = frame_pattern(path)
    path = Path(path).expanduser().absolute()
    folder = pattern.folder
    for name in (pattern.name(10 ** 9), folder.name):  # the longest frame name a run makes; the folder's
        if len(os.fsencode(name)) > 255:
            raise InputError(f"{path}: the name {name[:40]}... is longer than file systems allow (255 bytes)")
    parent = folder.parent
    if not parent.is_dir():
        raise InputError(f"{path}: the folder {parent} (above the sequence's folder {folder.name}) does not exist"
                         if not parent.exists() else f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the folder {parent} is not writable (the sequence's folder {folder.name} is "
                         "written beside it and renamed into place)")
    cwd = Path.cwd()
    if folder.exists() and (folder.samefile(cwd) or any(folder.samefile(p) for p in cwd.parents)):
        raise InputError(f"{path}: the sequence's folder {folder} is the current folder or holds it; it is replaced "
                         f"as a whole: name a folder of its own, e.g. {folder / 'frames' / path.name}")
    if folder.exists():
        if folder.is_symlink():
            raise InputError(f"{path}: {folder} is a symbolic link; a frame sequence's folder is replaced as a whole "
                             f"(the link by a folder): name the folder it points to, {folder.resolve()}")
        if not folder.is_dir():
            raise InputError(f"{path}: {folder} is not a folder (a frame sequence's frames go into a folder of "
                             "their own)")
        others = _foreign(pattern)
        if others:
            raise InputError(f"{path}: the folder {folder} holds {others[0].name}"
                             f"{f' and {len(others) - 1} more' if len(others) > 1 else ''} besides frames named "
                             f"{pattern.name(FIRST_FRAME)}, ...; a frame sequence's folder is replaced as a "
                             "whole: choose a new or empty folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{path}: the frames in {folder} (a result written before) cannot be replaced: the "
                             "folder is not writable")
    return path


def check_room(path: str | os.PathLike[str], frames: int, width: int, height: int, bit_depth: int = 8) -> None:
    """Warn (logged) where the disk that will hold a sequence result has less free space than its ``frames`` frames
    of ``width`` x ``height`` take, at about :data:`PNG_BYTES_PER_VALUE`: a long run would otherwise fail only
    when the disk fills, its hours of work lost (the earlier result stays)."""
    folder = frame_pattern(path).folder
    need = frames * width * height * 3 * PNG_BYTES_PER_VALUE[bit_depth]
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        return  # (the writer names a folder it cannot use)
    if free < need:
        logger.warning("%s: %d %d-bit PNG frames of %dx%d take about %s, but only %s are free on the disk of %s: "
                       "the run will likely stop when it is full, with nothing written; free space, or choose a "
                       "folder on another disk", path, frames, bit_depth, width, height, _bytes(need), _bytes(free),
                       folder.parent)


def _bytes(n: float) -> str:
    """A size for people: ``1.2 GB``, ``340 MB``, ``12 kB`` (decimal units, as disk tools show free space)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def _foreign(pattern: FramePattern) -> list[Path]:
    """What a sequence result's folder holds besides its frames and its sound (:data:`SOUND_NAME`)."""
    return [p for p in pattern.others() if p.name != SOUND_NAME or not p.is_file()]


def sequence_sound(pattern: FramePattern) -> Path | None:
    """A sequence's sound: :data:`SOUND_NAME` in its folder, where there is one."""
    sound = pattern.folder / SOUND_NAME
    return sound if sound.is_file() else None


def _tmp_prefix(folder: Path) -> str:
    return f".{folder.name[:_TMP_NAME_CHARS]}."


def frame_text(frame: Path) -> dict[str, str]:
    """A frame's PNG text chunks (``fps``, ``Comment``; none in other formats).

    Raises:
        InputError: no image Pillow reads.
    """
    try:
        with Image.open(frame) as im:
            return dict(getattr(im, "text", {}))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{frame}: cannot read this frame ({exc})") from exc


def sequence_settings(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The text chunks of a sequence's first frame (:func:`frame_text`), or None where it has no frame.

    Raises:
        InputError: the first frame is no image Pillow reads.
    """
    frames = frame_pattern(path).frames()
    return frame_text(frames[0]) if frames else None


def sequence_exists(path: str | os.PathLike[str]) -> bool:
    """Whether a sequence result is in place: its folder holds a frame named by the pattern."""
    return bool(frame_pattern(path).frames())


_W = TypeVar("_W", bound="ResultWriter")


class ResultWriter:
    """What writes a result (:class:`SequenceWriter`, :class:`~megactor_rt.media.VideoWriter`): :meth:`write` each
    frame, :meth:`close` puts the result in place, :meth:`abort` discards it; a ``with`` block closes it on a clean
    exit and aborts it on an exception."""

    frames_written: int

    def write(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def _take_frames(self, fps: Fraction | int, width: int, height: int, bit_depth: int = 8) -> None:
        """Check and keep the frames' rate, size and bits per colour (8: uint8 frames, 16: uint16).

        Raises:
            ValueError: a non-positive rate or size, another bit depth.
        """
        self.fps = Fraction(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
        self.width, self.height, self.bit_depth = width, height, bit_depth
        self._dtype = np.dtype(np.uint8 if bit_depth == 8 else np.uint16)

    def _check_frame(self, frame: np.ndarray) -> None:
        """ValueError unless ``frame`` is ``(height, width, 3)`` of the writer's type."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != self._dtype:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) {self._dtype} frame, got {frame.shape} "
                             f"{frame.dtype}")

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError

    def _write_error(self, exc: OSError) -> ResourceError:
        raise NotImplementedError

    @contextlib.contextmanager
    def _or_discard(self) -> Iterator[None]:
        """Discard what was written on any error inside; an OSError (a full disk) comes out as the writer's
        :class:`ResourceError`."""
        try:
            yield
        except OSError as exc:
            self._discard()
            raise self._write_error(exc) from exc
        except BaseException:
            self._discard()
            raise

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SequenceWriter(ResultWriter):
    """Write RGB frames as a PNG sequence (:mod:`megactor_rt.sequence`); the same use as
    :class:`~megactor_rt.media.VideoWriter`: :meth:`write` each frame, then :meth:`close` (or a clean ``with`` exit)
    renames the temporary folder into place; an exception inside the ``with`` block, or :meth:`abort`, deletes it.
    """

    def __init__(self, path: str | os.PathLike[str], fps: Fraction | int, width: int, height: int,
                 audio_source: str | os.PathLike[str] | None = None, crf: int | None = None,
                 metadata: Mapping[str, str] | None = None, first_number: int = FIRST_FRAME,
                 audio_offset: Fraction = Fraction(0), video_start: Fraction | None = None, bit_depth: int = 8) -> None:
        """Args: as :class:`~megactor_rt.media.VideoWriter`'s; the sound of ``audio_source`` goes into the folder as
        :data:`SOUND_NAME` (:class:`~megactor_rt.media.Soundtrack`); ``metadata``: its ``comment`` goes into every
        frame's ``Comment`` chunk; ``first_number``: the first frame's number (>= 0); ``bit_depth``: 8 (uint8
        frames) or 16 (uint16 frames, written as 16-bit PNG).

        Raises:
            InputError: the path is no writable sequence (:func:`check_sequence_path`), a ``crf`` is given (PNG
                frames are lossless), or ``audio_source`` is unreadable.
            ValueError: non-positive fps or frame size.
        """
        from megactor_rt.media import Soundtrack, check_quality  # (media imports this module)

        self.path = check_sequence_path(path)
        self.pattern = frame_pattern(self.path)
        check_quality(self.path, crf)  # (PNG frames take none)
        if first_number < 0:
            raise ValueError(f"first_number must be >= 0, got {first_number}")
        self.first_number = first_number
        self._take_frames(fps, width, height, bit_depth)
        self.has_sound = False  # whether the folder got a sound file (known once closed)
        comment = (metadata or {}).get("comment")
        self._text = {FPS_KEY: str(self.fps), **({SETTINGS_KEY: comment} if comment else {})}
        self._info = PngInfo()
        for key, value in self._text.items():
            self._info.add_text(key, value)
        self.frames_written = 0
        folder = self.pattern.folder
        self._tmp = folder.with_name(f"{_tmp_prefix(folder)}{uuid.uuid4().hex[:8]}.tmp")
        self._sound = Soundtrack(audio_source, audio_offset, video_start) if audio_source is not None else None
        try:
            self._tmp.mkdir()
        except OSError as exc:
            if self._sound is not None:
                self._sound.close()
            raise self._write_error(exc) from exc
        self._hold = hold(self._tmp)  # (a leftover of this write, killed, is known as one at once)
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        """Write one frame: ``(height, width, 3)`` RGB, uint8 (uint16 for ``bit_depth`` 16).

        Raises:
            ValueError: wrong shape or dtype, or the writer is closed.
            ResourceError: the frame cannot be written (a full disk).
        """
        if self._closed:
            raise ValueError(f"{self.path}: SequenceWriter is closed")
        self._check_frame(frame)
        name = self.pattern.name(self.first_number + self.frames_written)
        try:
            if self.bit_depth == 8:
                Image.fromarray(np.ascontiguousarray(frame)).save(self._tmp / name, "PNG", compress_level=_PNG_LEVEL,
                                                                  pnginfo=self._info)
            else:
                (self._tmp / name).write_bytes(png16(frame, self._text))
        except OSError as exc:
            raise self._write_error(exc) from exc
        self.frames_written += 1

    def _write_error(self, exc: OSError) -> ResourceError:
        return ResourceError(f"{self.path}: cannot write the result's frames ({exc}); nothing was written under "
                             f"{self.pattern.folder}")

    def close(self) -> None:
        """Rename the frames' folder into place (replacing a result written there before).

        Raises:
            ValueError: no frame was written (the temporary folder is removed).
            ResourceError: the folder cannot be put in place; where something other than frames appeared in the
                result's folder during the run, nothing is replaced and the frames are kept where the message says.
        """
        if self._closed:
            return
        if self.frames_written == 0:
            self._discard()
            raise ValueError(f"{self.path}: no frames were written")
        folder = self.pattern.folder
        others = _foreign(self.pattern)
        if others:  # appeared during the run: replacing the folder would delete them
            self._closed = True
            if self._sound is not None:
                self._sound.close()
            kept = folder.with_name(f"{folder.name}.frames-{uuid.uuid4().hex[:8]}")  # (a name no cleanup takes)
            try:
                os.replace(self._tmp, kept)
            except OSError:
                kept = self._tmp
            let_go(self._hold)
            raise ResourceError(f"{self.path}: {folder} now holds {others[0].name}, which is no frame of this "
                                f"result; nothing was replaced, the {self.frames_written} frames are in {kept}")
        if self._sound is not None:
            with self._or_discard():
                self.has_sound = self._sound.write(self._tmp / SOUND_NAME, Fraction(self.frames_written) / self.fps)
        old = folder.with_name(f"{_tmp_prefix(folder)}{uuid.uuid4().hex[:8]}.old")
        moved = False
        try:
            for frame in self._tmp.iterdir():  # (on disk before the folder takes its final name: a power loss then
                sync_file(frame)  # leaves no folder of empty frames; a few ms a frame, once, against seconds each)
            sync_folder(self._tmp)
            if folder.exists():
                os.replace(folder, old)
                moved = True
            os.replace(self._tmp, folder)
            sync_folder(folder.parent)
        except BaseException as exc:  # (Ctrl-C between the two renames too: the earlier result is not left hidden)
            if moved:  # the earlier result goes back under its name
                try:
                    os.replace(old, folder)
                except OSError as again:
                    logger.warning("%s: the earlier frames could not be put back; they are in %s (%s)", folder, old,
                                   again)
            self._discard()
            if isinstance(exc, OSError):
                raise self._write_error(exc) from exc
            raise
        self._closed = True
        let_go(self._hold)
        shutil.rmtree(old, ignore_errors=True)
        # folders of earlier writes of this result killed midway (same naming as self._tmp, held while written, and
        # the old folder)
        prefix = glob.escape(_tmp_prefix(folder))
        remove_stale(folder.parent, f"{prefix}{'[0-9a-f]' * 8}.tmp", folders=True, unheld_s=UNHELD_S)
        remove_stale(folder.parent, f"{prefix}{'[0-9a-f]' * 8}.old", folders=True)
        logger.info("wrote %s (%d frames at %s fps%s)", folder, self.frames_written, self.fps,
                    f", sound in {SOUND_NAME}" if self.has_sound else "")

    def abort(self) -> None:
        """Close without publishing: the temporary folder is deleted and the result's folder left untouched."""
        if not self._closed:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        let_go(self._hold)
        if self._sound is not None:
            self._sound.close()
        try:
            shutil.rmtree(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove the temporary folder %s: %s", self._tmp, exc)


@lru_cache(maxsize=64)
def _say_no_rate(name: str, folder: str) -> None:
    """Warn, once per sequence (``folder``: each pass over it opens it again), that its frames record no rate: the
    result's timing rests on the default."""
    logger.warning("%s: the frames record no rate; taken as %s fps (give the rate: --sequence-fps, Python: fps=)",
                   name, DEFAULT_FPS)


def png16(frame: np.ndarray, text: Mapping[str, str]) -> bytes:
    """A 16-bit RGB PNG of ``frame`` (``(H, W, 3)`` uint16), with ``text`` as UTF-8 text chunks (iTXt; Pillow, which
    writes no 16-bit RGB PNG, reads them as it reads its own).

    Raises:
        OSError: OpenCV could not encode it.
    """
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL])
    if not ok:
        raise OSError(f"OpenCV could not encode a {frame.shape[1]}x{frame.shape[0]} 16-bit PNG")
    png = data.tobytes()
    header = 8 + 4 + 4 + 13 + 4  # the signature and the IHDR chunk (length, type, 13 bytes, CRC), which come first
    chunks = b"".join(_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
                      for key, value in text.items())  # (uncompressed, no language, no translated keyword)
    return png[:header] + chunks + png[header:]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def jpeg_cut_off(frame: Path) -> str | None:
    """How a JPEG frame is cut short (a render or copy that stopped midway), or None where it is whole, is no JPEG
    or cannot be looked at. Said only of a JPEG that both lacks its end marker after its headers (EOI: no byte after
    it is looked for, so bytes appended after a whole picture are no matter) and does not decode, as a run reads
    it: a JPEG without its end that decodes all the same is whole to a run."""
    from megactor_rt.media import read_image  # (media imports this module)

    try:
        with open(frame, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:3] != b"\xff\xd8\xff":
                return None
            at = 2  # the segments before the first scan (APP1's EXIF thumbnail has an end marker of its own)
            while at + 4 <= len(data) and data[at] == 0xFF and data[at + 1] != 0xDA:
                at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
            if data.rfind(b"\xff\xd9", min(at, len(data))) >= 0:  # (a scan's bytes never hold it: 0xFF is
                return None  # stuffed with 0x00 there)
    except (OSError, ValueError):  # (ValueError: an empty file, which mmap refuses)
        return None
    try:
        read_image(frame)
    except InputError:
        return "a JPEG cut short: it lacks the marker that ends a JPEG (EOI) and does not decode"
    return None


def recorded_fps(frame: Path) -> Fraction | None:
    """The rate a frame's ``fps`` text chunk records (this engine's sequences), or None."""
    try:
        fps = Fraction(frame_text(frame)[FPS_KEY])
    except (InputError, KeyError, ValueError, ZeroDivisionError):  # (an unreadable frame's own read names it)
        return None
    return fps if fps > 0 else None


class LazyFrames(Sequence[np.ndarray]):
    """Frames read one at a time when asked for: ``frames[k]`` (negative too), ``frames[a:b]`` (a list)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, k: int) -> np.ndarray:
        """Frame ``k`` (0 <= k < len)."""
        raise NotImplementedError

    @overload
    def __getitem__(self, k: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, k: slice) -> list[np.ndarray]: ...

    def __getitem__(self, k: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(k, slice):
            return [self._read(i) for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self._read(k % len(self))


class FrameSequence(LazyFrames):
    """The frames of an image sequence (``plate/%04d.png``, ``frames/img_%d.jpg``) as ``(H, W, 3)`` uint8 RGB,
    each read when asked for (upright and RGB as a portrait is read); ``files`` are the frames in number order,
    ``sound`` the sound file beside them (:data:`SOUND_NAME`) or None.

    Args:
        path: the pattern (:func:`frame_pattern`).
        fps: the frames' rate; None: the rate their first frame records, else :data:`DEFAULT_FPS` (logged).

    Raises:
        InputError: no pattern, no folder, no frame, a gap in the numbers, or a non-positive ``fps``.
    """

    def __init__(self, path: str | os.PathLike[str], fps: Fraction | float | None = None) -> None:
        self.pattern, files = sequence_frames(path)
        self.files = tuple(files)
        self.path = Path(path).expanduser().absolute()
        given = Path(path).expanduser()  # (messages name it as given: was the absolute path)
        self.name = sequence_name(self.path)
        self.sound = sequence_sound(self.pattern)  # its sound file, where its folder holds one
        self._size: tuple[int, ...] | None = None  # the first frame's (height, width), once read
        numbers = [self.pattern.number(p.name) or 0 for p in self.files]
        self.first_number = numbers[0]
        if numbers[-1] - numbers[0] + 1 != len(numbers):
            have = set(numbers)
            missing = [n for n in range(numbers[0], numbers[-1]) if n not in have]
            shown = ", ".join(self.pattern.name(n) for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise InputError(f"{given}: {len(missing)} frame(s) missing between {self.files[0].name} and "
                             f"{self.files[-1].name}: {shown}; a sequence's frames must be consecutive")
        if fps is not None:
            rate = exact_rate(fps)
            if not rate > 0:
                raise InputError(f"{given}: the frame rate must be positive, got {fps}")
            self.fps = rate
        else:
            found = recorded_fps(self.files[0])
            if found is None:
                _say_no_rate(self.name, str(Path(self.files[0]).absolute().parent))
            self.fps = found or DEFAULT_FPS

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, k: int) -> np.ndarray:
        from megactor_rt.media import read_image  # (media imports this module)

        frame = read_image(self.files[k])
        if self._size is None:
            self._size = frame.shape[:2] if k == 0 else self._read(0).shape[:2]
        if frame.shape[:2] != self._size:
            raise InputError(f"{self.files[k]}: {frame.shape[1]}x{frame.shape[0]} px, the sequence's first frame "
                             f"{self.files[0].name} is {self._size[1]}x{self._size[0]}: every frame must have one size")
        return frame

    def identity(self) -> list[object]:
        """What tells this sequence from another version of it: its pattern, frame count, bytes and latest change.

        Raises:
            OSError: a frame cannot be looked at.
        """
        stats = [p.stat() for p in self.files]
        return [str(self.path.resolve()), len(self.files), sum(s.st_size for s in stats),
                max(s.st_mtime_ns for s in stats), str(self.fps)]
