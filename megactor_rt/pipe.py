"""Results streamed to standard output (``-o -``): YUV4MPEG2 frames for a pipe.

``megactor-rt animate ... -o - | ffmpeg -i - out.mov`` (or ``| ffplay -``) hands each frame to the next program as
soon as it is final, in whatever format FFmpeg writes (ProRes, DPX, ...), or to a player while later frames
still denoise (open windows, ``--no-wrap``, stream early). YUV4MPEG2 (``.y4m``) is the raw video stream FFmpeg and
players read from a pipe without being told the size or rate: a header line with both, then each frame's planes.
Frames go as 4:4:4 (no colour subsampling), 8 bits (``C444``) or 16 bits (``C444p16``, ``--bit-depth 16``), converted
from RGB as the H.264 results are (BT.601, limited range). The stream holds no sound and no settings tag, and it is
not atomic: a run that fails leaves the reader a stream cut short (the command's exit status says so).

Its sound can go to a WAV file beside it (``sound_out``, ``--audio-out``): written whole, as long as the frames the
run will make, before the stream's first byte, so the reading program opens it complete as its second input
(``-o - --audio-out s.wav | ffmpeg -i - -i s.wav ...``: FFmpeg opens its inputs in order, the pipe's first, which
cannot be opened before its first bytes come).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import wave
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from megactor_rt.errors import InputError, ResourceError
from megactor_rt.files import written_whole
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
    out = standard_output()
    with contextlib.suppress(AttributeError, ValueError, OSError):  # (no file descriptor: a test's capture)
        if os.isatty(out.fileno()):
            raise InputError("-o - writes the frames as a binary stream to standard output, which is a terminal "
                             "here: pipe it into a program (| ffmpeg -i - out.mov, | ffplay -) or name a file")


def standard_output() -> BinaryIO:
    """Where a streamed result goes: standard output's bytes (as it was before :func:`prints_to_stderr`).

    Raises:
        InputError: standard output takes text only (replaced by a ``StringIO``, a notebook's), or is closed.
    """
    if _saved is not None:
        return _saved
    if sys.stdout is None:  # (Python's when the command started with its standard output closed: `>&-`)
        raise InputError("-o - streams bytes to standard output, and this command's is closed (started with >&-): "
                         "pipe it into a program (| ffmpeg -i - out.mov) or name a file")
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # (was an AttributeError)
        raise InputError(f"-o - streams bytes to standard output, and it takes text only here "
                         f"({type(sys.stdout).__name__}: a notebook, or replaced by the program); name a file")
    return cast(BinaryIO, out)


@contextlib.contextmanager
def prints_to_stderr() -> Iterator[None]:
    """While a result streams to standard output, the command's own lines (``wrote ...``) go to stderr instead of
    into the stream."""
    global _saved
    before, _saved = _saved, standard_output()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _saved = before


class Y4MWriter(ResultWriter):
    """Write RGB frames as a YUV4MPEG2 stream (:mod:`megactor_rt.pipe`): :meth:`write` each frame (sent at once),
    :meth:`close` flushes. Takes :func:`~megactor_rt.media.result_writer`'s arguments; ``metadata`` is left out, and
    ``audio_source`` too unless ``sound_out`` names a WAV file for its sound (:func:`write_sound`; silence where
    the source has none), written before the stream's first byte for ``frame_count()`` frames (the run's count,
    known once its first frame comes; where it returns None, the file is written at :meth:`close`).

    Raises:
        InputError: a ``crf`` (raw frames have none), or ``audio_source`` is unreadable.
        ValueError: non-positive fps or frame size, a bit depth other than 8 or 16.
    """

    def __init__(self, path: object, fps: Fraction | int, width: int, height: int,
                 audio_source: str | os.PathLike[str] | None = None,
                 crf: int | None = None, metadata: Mapping[str, str] | None = None, bit_depth: int = 8,
                 stream: BinaryIO | None = None, sound_out: Path | None = None,
                 frame_count: Callable[[], int | None] | None = None, audio_offset: Fraction = Fraction(0),
                 video_start: Fraction | None = None) -> None:
        if crf is not None:
            raise InputError("-o -: the stream carries raw frames: crf (--crf) does not apply; leave it out")
        self._take_frames(fps, width, height, bit_depth)
        self._sound: Any = None
        self.sound_out = sound_out
        self._frame_count = frame_count
        self.sound_frames: int | None = None  # the frames the sound file was written for (once written)
        if sound_out is not None and audio_source is not None:
            from megactor_rt.media import Soundtrack  # (media imports this module)

            self._sound = Soundtrack(audio_source, audio_offset, video_start)  # (unreadable: said before any work)
        elif audio_source is not None:
            logger.info("-o -: the stream has no sound; the audio of %s is left out (--audio-out FILE: in a WAV file "
                        "beside it)", audio_source)
        self.path = STDOUT
        self._stream = stream if stream is not None else standard_output()
        self.frames_written = 0
        self._closed = False
        colour = "C444" if bit_depth == 8 else "C444p16"
        self._header = (f"YUV4MPEG2 W{width} H{height} F{self.fps.numerator}:{self.fps.denominator} Ip A1:1 {colour} "
                        "XCOLORRANGE=LIMITED\n").encode()

    def _write_sound(self, frames: int) -> None:
        assert self.sound_out is not None
        try:
            write_sound(self.sound_out, self._sound, Fraction(frames) / self.fps)
        finally:
            self._sound = None
        self.sound_frames = frames

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
        if self.frames_written == 0:  # the sound first (the reader opens it once frames come), then the header
            if self.sound_out is not None:
                count = self._frame_count() if self._frame_count is not None else None
                if count is not None:
                    self._write_sound(count)
                else:
                    logger.warning("-o -: the run's frame count is not known yet: %s is written when the stream "
                                   "ends", self.sound_out)
            self._send(self._header)
        self._send(b"FRAME\n" + yuv444_planes(frame).tobytes())
        self.frames_written += 1

    def _write_error(self, exc: OSError) -> ResourceError:
        return ResourceError(f"-o -: cannot write the stream to standard output ({exc})")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.frames_written == 0:
                self._let_sound_go()
                raise ValueError("-o -: no frames were written")
            if self.sound_out is not None and self.sound_frames is None:
                self._write_sound(self.frames_written)
            elif self.sound_frames is not None and self.sound_frames != self.frames_written:
                logger.warning("-o -: %s was written for %d frames; the stream has %d", self.sound_out,
                               self.sound_frames, self.frames_written)
            logger.info("streamed %d frames at %s fps to standard output", self.frames_written, self.fps)

    def _let_sound_go(self) -> None:
        if self._sound is not None:
            self._sound.close()
            self._sound = None

    def abort(self) -> None:
        """Stop: the reader has the frames sent so far (a stream cannot be taken back; a sound file written before
        them stays, as they do)."""
        self._closed = True
        self._let_sound_go()

    def _discard(self) -> None:
        self._closed = True
        self._let_sound_go()


SILENCE_RATE = 48000  # the sample rate of a sound file of silence (a driver without sound)


def write_sound(path: Path, track: Any, duration: Fraction) -> None:
    """Write ``duration`` seconds of a result's sound to the WAV file ``path`` (under a temporary name beside it,
    renamed when whole): ``track``'s (a :class:`~megactor_rt.media.Soundtrack`, closed after), or silence (16-bit
    mono) where there is none, so that a command that reads the file works the same.

    Raises:
        ResourceError: the file cannot be written (a full disk).
    """
    try:
        with written_whole(path) as partial:
            if track is None or not track.write(partial, duration):
                samples = round(duration * SILENCE_RATE)
                with wave.open(str(partial), "wb") as out:
                    out.setnchannels(1)
                    out.setsampwidth(2)
                    out.setframerate(SILENCE_RATE)
                    for done in range(0, samples, SILENCE_RATE):
                        out.writeframes(bytes(2 * min(SILENCE_RATE, samples - done)))
                logger.warning("%s: the result has no sound: the file holds %.2f s of silence", path,
                               float(duration))
    except OSError as exc:
        raise ResourceError(f"{path}: cannot write the result's sound ({exc})") from exc


def check_sound_out(path: str | os.PathLike[str], output: object, audio: object) -> Path:
    """Check, before any work, a file for a streamed result's sound (``audio_out``, ``--audio-out``): a ``.wav`` in a
    writable folder, for ``-o -`` only and a result with sound.

    Raises:
        InputError: naming the problem.
    """
    out = Path(path).expanduser().absolute()
    if not is_stdout(output):
        raise InputError(f"{out}: audio_out (--audio-out) is for the stream of -o -, which holds no sound; a video "
                         "result holds its own, and a PNG sequence gets audio.wav in its folder")
    if audio is False:
        raise InputError(f"{out}: audio_out (--audio-out) writes the result's sound, and no sound was asked for "
                         "(audio=False, --no-audio)")
    if out.suffix.lower() != ".wav":
        raise InputError(f"{out}: audio_out (--audio-out) writes a WAV file: name it .wav")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; audio_out (--audio-out) names a WAV file")
    if not out.parent.is_dir():
        raise InputError(f"{out}: its folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: its folder {out.parent} is not writable")
    return out


def yuv444_planes(frame: np.ndarray) -> np.ndarray:
    """An RGB frame (uint8, or uint16) as its Y, U and V planes ``(3, H, W)`` of the same type: BT.601, limited
    range, as swscale converts (the H.264 results' conversion, without their 4:2:0 subsampling); 16-bit samples
    little-endian, as YUV4MPEG2's ``C444p16`` stores them."""
    import av

    eight = frame.dtype == np.uint8
    width = frame.shape[1]
    if not eight and width % 16:
        # swscale (PyAV 18's FFmpeg 8.1) converts rgb48le to yuv444p16le wrongly at the start of some rows (8
        # pixels, values off by up to a third of the range, differing from call to call) where the width is no
        # multiple of 16 (a pasted-back portrait's, e.g. 134 px): converted with the last column repeated to one
        # (each pixel is converted on its own: the frame's own are the same), then cut back
        frame = np.pad(frame, ((0, 0), (0, -width % 16), (0, 0)), mode="edge")
    yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24" if eight else "rgb48le").reformat(
        format="yuv444p" if eight else "yuv444p16le").to_ndarray()
    planes = yuv if yuv.shape[0] == 3 and yuv.shape[1:] == frame.shape[:2] else np.moveaxis(yuv, -1, 0)
    return np.ascontiguousarray(planes[:, :, :width], dtype=np.dtype("<u2") if not eight else np.uint8)
