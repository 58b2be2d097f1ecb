"""Results streamed to standard output (``-o -``): YUV4MPEG2 frames for a pipe.

``megactor-rt animate ... -o - | ffmpeg -i - out.mov`` (or ``| ffplay -``) hands each frame to the next program as
soon as it is final, in whatever format FFmpeg writes (ProRes, DPX, ...), or to a player while later frames
still denoise (open windows, ``--no-wrap``, stream early). YUV4MPEG2 (``.y4m``) is the raw video stream FFmpeg and
players read from a pipe without being told the size or rate: a header line with both, then each frame's planes.
Frames go as 4:4:4 (no colour subsampling), 8 bits (``C444``) or 16 bits (``C444p16``, ``--bit-depth 16``), converted
from RGB as the H.264 results are (BT.601, limited range). The stream holds no sound and no settings tag, and it is
not atomic: a run that fails leaves the reader a stream cut short (the command's exit status says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import BinaryIO

import numpy as np

from megactor_rt.errors import InputError, ResourceError
from megactor_rt.sequence import ResultWriter

logger = logging.getLogger(__name__)

STDOUT = "-"  # the result path that names standard output
_saved: BinaryIO | None = None  # standard output while prints go to stderr (prints_to_stderr)


def is_stdout(path: object) -> bool:
    """Whether a result path names standard output (``-``)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path) == STDOUT


def check_stdout() -> None:
    """Refuse a stream onto a terminal (binary frames would fill it with noise), before any work.

    Raises:
        InputError: standard output is a terminal.
    """
    with contextlib.suppress(AttributeError, ValueError, OSError):  # (no file descriptor: a test's capture)
        if os.isatty(standard_output().fileno()):
            raise InputError("-o - writes the frames as a binary stream to standard output, which is a terminal "
                             "here: pipe it into a program (| ffmpeg -i - out.mov, | ffplay -) or name a file")


def standard_output() -> BinaryIO:
    """Where a streamed result goes: standard output's bytes (as it was before :func:`prints_to_stderr`)."""
    return _saved if _saved is not None else sys.stdout.buffer


@contextlib.contextmanager
def prints_to_stderr() -> Iterator[None]:
    """While a result streams to standard output, the command's own lines (``wrote ...``) go to stderr instead of
    into the stream."""
    global _saved
    before, _saved = _saved, sys.stdout.buffer
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _saved = before


class Y4MWriter(ResultWriter):
    """Write RGB frames as a YUV4MPEG2 stream (:mod:`megactor_rt.pipe`): :meth:`write` each frame (sent at once),
    :meth:`close` flushes. Takes :func:`~megactor_rt.media.result_writer`'s arguments; ``audio_source`` is left out
    (logged), ``metadata`` too.

    Raises:
        InputError: a ``crf`` (raw frames have none).
        ValueError: non-positive fps or frame size, a bit depth other than 8 or 16.
    """

    def __init__(self, path: object, fps: Fraction | int, width: int, height: int, audio_source: object = None,
                 crf: int | None = None, metadata: Mapping[str, str] | None = None, bit_depth: int = 8,
                 stream: BinaryIO | None = None, **_audio_timing: Fraction) -> None:
        if crf is not None:
            raise InputError("-o -: the stream carries raw frames: crf (--crf) does not apply; leave it out")
        self._take_frames(fps, width, height, bit_depth)
        if audio_source is not None:
            logger.info("-o -: the stream has no sound; the audio of %s is left out", audio_source)
        self.path = STDOUT
        self._stream = stream if stream is not None else standard_output()
        self.frames_written = 0
        self._closed = False
        colour = "C444" if bit_depth == 8 else "C444p16"
        self._send(f"YUV4MPEG2 W{width} H{height} F{self.fps.numerator}:{self.fps.denominator} Ip A1:1 {colour} "
                   "XCOLORRANGE=LIMITED\n".encode())

    def _send(self, data: bytes) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()  # the reader gets each frame as soon as it is final
        except BrokenPipeError:
            raise  # the reader went away: the command ends quietly (exit 141)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def write(self, frame: np.ndarray) -> None:
        """Send one frame: ``(height, width, 3)`` RGB, uint8 (uint16 for ``bit_depth`` 16).

        Raises:
            ValueError: wrong shape or dtype, or the writer is closed.
            BrokenPipeError: the reader has gone.
        """
        if self._closed:
            raise ValueError("-o -: Y4MWriter is closed")
        self._check_frame(frame)
        self._send(b"FRAME\n" + yuv444_planes(frame).tobytes())
        self.frames_written += 1

    def _write_error(self, exc: OSError) -> ResourceError:
        return ResourceError(f"-o -: cannot write the stream to standard output ({exc})")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.frames_written == 0:
                raise ValueError("-o -: no frames were written")
            logger.info("streamed %d frames at %s fps to standard output", self.frames_written, self.fps)

    def abort(self) -> None:
        """Stop: the reader has the frames sent so far (a stream cannot be taken back)."""
        self._closed = True

    def _discard(self) -> None:
        self._closed = True


def yuv444_planes(frame: np.ndarray) -> np.ndarray:
    """An RGB frame (uint8, or uint16) as its Y, U and V planes ``(3, H, W)`` of the same type: BT.601, limited
    range, as swscale converts (the H.264 results' conversion, without their 4:2:0 subsampling); 16-bit samples
    little-endian, as YUV4MPEG2's ``C444p16`` stores them."""
    import av

    eight = frame.dtype == np.uint8
    yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24" if eight else "rgb48le").reformat(
        format="yuv444p" if eight else "yuv444p16le").to_ndarray()
    planes = yuv if yuv.shape[0] == 3 and yuv.shape[1:] == frame.shape[:2] else np.moveaxis(yuv, -1, 0)
    return np.ascontiguousarray(planes, dtype=np.dtype("<u2") if not eight else np.uint8)
