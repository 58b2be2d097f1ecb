"""Results streamed to standard output (``-o -``, :mod:`megactor_rt.pipe`): a YUV4MPEG2 stream FFmpeg reads, sent
frame by frame, the command's own lines on stderr; the flags that do not fit a stream refused before any work."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_fixtures import write_face_driver
from PIL import Image

from megactor_rt.cli import main
from megactor_rt.errors import InputError
from megactor_rt.media import check_output_path, result_exists, result_writer
from megactor_rt.pipe import Y4MWriter, yuv444_planes


def frames(n: int, dtype: type = np.uint8) -> list[np.ndarray]:
    top = 255 if dtype is np.uint8 else 65535
    return list(np.random.default_rng(0).integers(0, top + 1, (n, 64, 80, 3)).astype(dtype))


def read_stream(data: bytes, fmt: str) -> tuple[str, Fraction, list[np.ndarray]]:
    """A YUV4MPEG2 stream as FFmpeg reads it: pixel format, rate and its frames (``fmt``: their planes' format)."""
    with av.open(io.BytesIO(data), format="yuv4mpegpipe") as c:
        stream = c.streams.video[0]
        decoded = [f.to_ndarray(format=fmt) for f in c.decode(stream)]
        return stream.codec_context.pix_fmt, Fraction(stream.average_rate), decoded


@pytest.mark.parametrize(("dtype", "pix_fmt"), [(np.uint8, "yuv444p"), (np.uint16, "yuv444p16le")])
def test_the_stream_is_yuv4mpeg_that_ffmpeg_reads_frame_for_frame(dtype: type, pix_fmt: str) -> None:
    """Header (size, exact rate, 4:4:4 at 8 or 16 bits), then each frame's planes as written: FFmpeg reads the same
    planes back, and their RGB is the frames' within the conversion's rounding."""
    content = frames(3, dtype)
    sink = io.BytesIO()
    with result_writer("-", Fraction(30000, 1001), 80, 64, stream=sink, bit_depth=16 if dtype is np.uint16 else 8,
                       audio_source="sound.m4a", metadata={"comment": "{}"}) as w:
        for f in content:
            w.write(f)
    assert isinstance(w, Y4MWriter) and w.frames_written == 3
    data = sink.getvalue()
    assert data.startswith(b"YUV4MPEG2 W80 H64 F30000:1001 ")
    got_fmt, rate, planes = read_stream(data, pix_fmt)
    assert (got_fmt, rate, len(planes)) == (pix_fmt, Fraction(30000, 1001), 3)
    for f, p in zip(content, planes, strict=True):
        mine = yuv444_planes(f)
        assert np.array_equal(p if p.shape == mine.shape else np.moveaxis(p, -1, 0), mine)
    rgb = read_stream(data, "rgb24" if dtype is np.uint8 else "rgb48le")[2]
    tolerance = 3 if dtype is np.uint8 else 3 * 257
    assert all(np.abs(a.astype(np.int64) - b).max() <= tolerance for a, b in zip(rgb, content, strict=True))
    with pytest.raises(ValueError, match=r"expected a \(64, 80, 3\)"):
        Y4MWriter("-", 30, 80, 64, stream=io.BytesIO()).write(frames(1, np.uint16)[0])


@pytest.mark.parametrize("width", [134, 182])
def test_16_bit_frames_of_any_even_width_are_converted_right_every_time(width: int) -> None:
    """A pasted-back portrait's frames are as wide as the portrait (134 px, 910 px): 16-bit ones went to the stream
    with 8 pixels at the start of some rows off by up to a third of the range, differing from frame to frame
    (swscale's rgb48le -> yuv444p16le where the width is no multiple of 16). Every plane value is BT.601 limited
    range within swscale's 16-bit rounding, on every call."""
    frame = np.random.default_rng(0).integers(0, 65536, (148, width, 3)).astype(np.uint16)
    r, g, b = (frame[..., i] / 65535 for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    exact = np.stack([(16 + 219 * y) * 256, (128 + 224 * (b - y) / 1.772) * 256, (128 + 224 * (r - y) / 1.402) * 256])
    for _ in range(30):
        planes = yuv444_planes(frame)
        assert planes.shape == (3, 148, width) and planes.dtype == np.dtype("<u2")
        assert np.abs(planes - exact).max() < 300


def test_flags_that_do_not_fit_a_stream_are_refused_before_any_work(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    driver = write_face_driver(tmp_path / "talk.mp4", n=4)
    assert check_output_path("-") == Path("-") and not result_exists("-")
    with pytest.raises(InputError, match="crf .--crf. does not apply"):
        Y4MWriter("-", 30, 64, 64, crf=18, stream=io.BytesIO())
    for extra, problem in ((["--crf", "20"], "-o -: the stream carries raw frames"),
                           (["--first-number", "5"], "first_number (--first-number) numbers the frames of a PNG")):
        code = main(["-q", "demo", "--driver", str(driver), "-o", "-", *extra])
        captured = capsys.readouterr()
        assert code == 2 and problem in captured.err and captured.out == "", captured
    code = main(["-q", "animate", "--weights", str(tmp_path), "--portrait", str(driver), "--driver", str(driver),
                 str(driver), "-o", "-"])
    captured = capsys.readouterr()
    assert code == 2 and "-o - streams one result to standard output" in captured.err and captured.out == ""
    assert not (tmp_path.parent / "-").exists() and not Path("-").exists()


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    driver = tmp_path / "talk.mp4"
    if not driver.exists():
        write_face_driver(driver, n=6)
    return subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "--driver", str(driver),
                           "--steps", "2", "--window", "4", "--overlap", "2", *args], capture_output=True,
                          timeout=600)


def test_the_cli_streams_the_runs_frames_and_its_lines_go_to_stderr(tmp_path: Path) -> None:
    """demo -o -: stdout holds the stream alone (its frames those of the same run written as PNG frames, within
    the YUV conversion's rounding); the notice and the 'streamed' line are on stderr. A reader that goes away
    ends the command quietly with 141, as `| head` does."""
    streamed = demo(tmp_path, "-o", "-")
    assert streamed.returncode == 0, streamed.stderr
    assert b"streamed to standard output: 6 frames" in streamed.stderr and b"TINY RANDOM-WEIGHT" in streamed.stderr
    _, rate, got = read_stream(streamed.stdout, "rgb24")
    written = demo(tmp_path, "-o", str(tmp_path / "seq" / "%05d.png"), "--no-audio")
    assert written.returncode == 0, written.stderr
    pngs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "seq").glob("*.png"))]
    assert rate == 25 and len(got) == len(pngs) == 6
    assert all(np.abs(a.astype(np.int64) - b).max() <= 3 for a, b in zip(got, pngs, strict=True))
    driver = tmp_path / "talk.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "--driver", str(driver), "--steps",
                             "1", "--window", "4", "--overlap", "2", "-o", "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(100).startswith(b"YUV4MPEG2")
    proc.stdout.close()  # the reader goes away
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 141 and b"Traceback" not in err, err


def test_a_stream_onto_a_terminal_is_refused_before_any_work(tmp_path: Path) -> None:
    import os
    import pty

    leader, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "-o", "-"], stdout=terminal,
                              stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(terminal)
        os.close(leader)
    assert proc.returncode == 2 and b"standard output, which is a terminal here: pipe it" in proc.stderr, proc.stderr
    assert b"TINY RANDOM-WEIGHT" not in proc.stderr  # (refused before the model is built)


def test_a_stream_onto_a_text_only_standard_output_is_refused_before_any_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``-o -`` where standard output is text only (a notebook's, a StringIO): named before any work (was an
    AttributeError: '_io.StringIO' object has no attribute 'buffer')."""
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(InputError, match=r"-o - streams bytes to standard output, and it takes text only here "
                                         r"\(StringIO"):
        check_output_path("-")


def test_a_stream_onto_a_closed_standard_output_is_named_so(tmp_path: Path) -> None:
    """``-o -`` in a command started with its standard output closed (``>&-``: Python's ``sys.stdout`` is None) is
    refused as that, not as "text only here (NoneType: a notebook, ...)"."""
    import os

    proc = subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "-o", "-"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2, proc.stderr
    assert b"standard output, and this command's is closed (started with >&-)" in proc.stderr, proc.stderr
    assert b"TINY RANDOM-WEIGHT" not in proc.stderr  # (refused before the model is built)


def test_a_driver_piped_into_standard_input_drives_as_its_file_does(tmp_path: Path) -> None:
    """--driver -: the clip piped in animates exactly as the same file (PNG frames compared), is named "stdin" in
    the result's settings, and its temporary copy is gone afterwards; empty input, a terminal and "-" among several
    drivers are refused before any work."""
    import os
    import pty

    from megactor_rt.media import result_settings

    driver = write_face_driver(tmp_path / "talk.mp4", n=5, audio=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    base = [sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "--steps", "2", "--window", "4", "--overlap", "2"]
    piped = subprocess.run([*base, "--driver", "-", "-o", str(tmp_path / "a" / "%05d.png")],
                           input=driver.read_bytes(), capture_output=True, env=env, timeout=600)
    assert piped.returncode == 0, piped.stderr
    named = subprocess.run([*base, "--driver", str(driver), "-o", str(tmp_path / "b" / "%05d.png")],
                           capture_output=True, timeout=600)
    assert named.returncode == 0, named.stderr
    a, b = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert len(a) == len(b) == 5
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(a, b))
    assert (tmp_path / "a" / "audio.wav").is_file()  # the piped clip's sound too
    settings = result_settings(tmp_path / "a")
    assert settings is not None and settings["driver"] == "stdin"
    assert list(scratch.glob("megactor-rt-*")) == []  # the copy of standard input is gone
    empty = subprocess.run([*base, "--driver", "-", "-o", str(tmp_path / "c.mp4")], input=b"", capture_output=True,
                           env=env, timeout=300)
    assert empty.returncode == 2 and b"standard input was empty" in empty.stderr
    junk = subprocess.run([*base, "--driver", "-", "-o", str(tmp_path / "c.mp4")], input=b"hello world",
                          capture_output=True, env=env, timeout=300)  # (named as given: not its removed copy)
    assert junk.returncode == 2 and b"error: standard input (--driver -): not a readable video" in junk.stderr
    assert str(scratch).encode() not in junk.stderr, junk.stderr
    leader, terminal = pty.openpty()
    try:
        tty = subprocess.run([*base, "--driver", "-", "-o", str(tmp_path / "c.mp4")], stdin=terminal,
                             capture_output=True, timeout=300)
    finally:
        os.close(terminal)
        os.close(leader)
    assert tty.returncode == 2 and b"standard input, which is a terminal here" in tty.stderr
    several = subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "animate", "--weights", str(tmp_path),
                              "--portrait", str(driver), "--driver", "-", str(driver), "-o", str(tmp_path / "r")],
                             input=b"x", capture_output=True, timeout=300)
    assert several.returncode == 2 and b"--driver - reads one driver from standard input" in several.stderr
    assert not (tmp_path / "c.mp4").exists() and list(scratch.glob("megactor-rt-*")) == []


# ---------------------------------------------------------------------------------------- the stream's sound


class _Watched(io.BytesIO):
    """A stream that notes, at its first write, whether a file exists and how large it is."""

    def __init__(self, watched: Path) -> None:
        super().__init__()
        self.watched, self.seen_at_first_write = watched, None

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.seen_at_first_write is None:
            self.seen_at_first_write = self.watched.stat().st_size if self.watched.exists() else -1
        return super().write(data)


def _wav(path: Path) -> tuple[int, int, np.ndarray]:
    import wave

    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnchannels(), np.frombuffer(w.readframes(w.getnframes()), np.int16)


def test_the_sound_file_is_written_whole_before_the_streams_first_byte(tmp_path: Path) -> None:
    """A reader opens its second input (the sound) only once the stream's frames come: so the WAV is in place, as
    long as the run's frames (their count from the run, asked at the first frame), before anything is sent."""
    driver = write_face_driver(tmp_path / "talk.mp4", n=6, audio=True)
    sound = tmp_path / "s.wav"
    sink = _Watched(sound)
    with result_writer("-", Fraction(25), 80, 64, stream=sink, audio_source=driver, sound_out=sound,
                       frame_count=lambda: 4) as w:
        assert not sound.exists() and sink.getvalue() == b""  # (nothing before the first frame)
        for f in frames(4):
            w.write(f)
    assert sink.seen_at_first_write is not None and sink.seen_at_first_write > 0
    rate, channels, samples = _wav(sound)
    assert abs(len(samples) / channels / rate - 4 / 25) < 1e-3 and np.abs(samples).max() > 1000  # (the sine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.wav", "talk.mp4", "talk_sine.m4a"]
    silent = tmp_path / "silent.wav"  # (no sound: silence of the frames' length; a count not known: at the end)
    with result_writer("-", Fraction(30000, 1001), 80, 64, stream=io.BytesIO(), sound_out=silent,
                       frame_count=lambda: None) as w:
        for f in frames(3):
            w.write(f)
        assert not silent.exists()
    rate, channels, samples = _wav(silent)
    assert (rate, channels, int(np.abs(samples).max())) == (48000, 1, 0)
    assert len(samples) == round(Fraction(3 * 1001, 30000) * 48000)


def test_audio_out_gives_a_stream_the_sound_a_frame_sequence_gets(tmp_path: Path) -> None:
    """`demo -o - --audio-out s.wav`: the WAV holds the samples the same run's PNG sequence gets in audio.wav."""
    driver = write_face_driver(tmp_path / "talk.mp4", n=6, audio=True)
    streamed = demo(tmp_path, "-o", "-", "--audio-out", str(tmp_path / "s.wav"))
    assert streamed.returncode == 0, streamed.stderr
    assert len(read_stream(streamed.stdout, "rgb24")[2]) == 6
    written = demo(tmp_path, "-o", str(tmp_path / "seq" / "%05d.png"))
    assert written.returncode == 0, written.stderr
    got, want = _wav(tmp_path / "s.wav"), _wav(tmp_path / "seq" / "audio.wav")
    assert got[:2] == want[:2] and np.array_equal(got[2], want[2]) and len(got[2]) > 0
    assert driver.exists()


@pytest.mark.parametrize(("args", "problem"), [
    (["-o", "{tmp}/a.mp4", "--audio-out", "{tmp}/s.wav"], "audio_out (--audio-out) is for the stream of -o -"),
    (["-o", "-", "--no-audio", "--audio-out", "{tmp}/s.wav"], "and no sound was asked for"),
    (["-o", "-", "--audio-out", "{tmp}/s.mp3"], "writes a WAV file: name it .wav"),
    (["-o", "-", "--audio-out", "{tmp}/no/s.wav"], "its folder {tmp}/no does not exist"),
    (["-o", "-", "--audio", "{tmp}/in.wav", "--audio-out", "{tmp}/in.wav"], "the result would overwrite the audio"),
], ids=["not-a-stream", "no-audio", "not-wav", "no-folder", "an-input"])
def test_audio_out_is_refused_where_it_does_not_fit_before_any_work(args: list[str], problem: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from megactor_rt.pipe import write_sound

    driver = write_face_driver(tmp_path / "talk.mp4", n=4)
    write_sound(tmp_path / "in.wav", None, Fraction(1))  # (a sound file to give as --audio)
    code = main(["-q", "demo", "--driver", str(driver), *[a.format(tmp=tmp_path) for a in args]])
    captured = capsys.readouterr()
    assert code == 2 and problem.format(tmp=tmp_path) in captured.err and "wrote" not in captured.out, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "talk.mp4"]
    code = main(["-q", "animate", "--weights", str(tmp_path / "none"), "--portrait", str(driver), "--driver",
                 str(driver), *[a.format(tmp=tmp_path) for a in args]])
    assert code == 2 and problem.format(tmp=tmp_path) in capsys.readouterr().err  # (before the weights are looked at)
