"""A result's sound from another file (``--audio FILE``, ``audio=PATH``): taken from the file's own start, whatever
its clock says that start is."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from megactor_rt.media import Soundtrack, VideoWriter

RATE = 48000


def write_ts_sound(path: Path, clock_start: float = 1.4, beep_at: float = 0.2, seconds: float = 1.0) -> Path:
    """An audio-only MPEG-TS file (MP2, mono) whose clock starts at ``clock_start`` s, as FFmpeg writes a TS
    (1.4 s) and broadcast recordings have it: silence with a 1 kHz beep ``beep_at`` s into the sound."""
    t = np.arange(int(RATE * seconds)) / RATE
    beep = (t >= beep_at) & (t < beep_at + 0.05)
    sound = np.where(beep, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)
    samples = (sound * 32767).astype(np.int16)
    first = round(clock_start * RATE)
    with av.open(str(path), "w", format="mpegts") as c:
        stream = c.add_stream("mp2", rate=RATE)
        stream.layout = "mono"
        for start in range(0, len(samples), 1152):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1152], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, first + start, Fraction(1, RATE)
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    return path


def decoded(path: Path) -> tuple[float, np.ndarray]:
    """A file's first audio stream: where its first sample is (s) and its samples (mono, -1..1)."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        frames = list(c.decode(stream))
    first = float(frames[0].pts * frames[0].time_base) if frames and frames[0].pts is not None else 0.0
    parts = [f.to_ndarray().astype(np.float64).reshape(len(f.layout.channels), -1)[0]
             if f.format.is_planar else f.to_ndarray().astype(np.float64).reshape(-1, len(f.layout.channels))[:, 0]
             for f in frames]
    data = np.concatenate(parts) if parts else np.zeros(0)
    return first, data / 32768 if data.size and np.abs(data).max() > 2 else data


def onset(first: float, data: np.ndarray) -> float | None:
    """Where (s) the sound first gets loud, or None."""
    loud = np.flatnonzero(np.abs(data) > 0.1)
    return first + loud[0] / RATE if loud.size else None


def test_an_audio_file_whose_clock_starts_late_gives_its_sound_from_its_start(tmp_path: Path) -> None:
    """A TS whose clock starts at 1.4 s gave a PNG sequence's audio.wav (and --audio-out's file) no samples at
    all and an H.264 result no sound (its sound was taken as starting 1.4 s into the result): the beep 0.2 s into
    the file is 0.2 s into the result's sound."""
    song = write_ts_sound(tmp_path / "song.ts")
    track = Soundtrack(song)
    wav = tmp_path / "audio.wav"
    assert track.write(wav, Fraction(1, 2))
    first, data = decoded(wav)
    assert abs(len(data) / RATE - 0.5) < 0.01
    at = onset(first, data)
    assert at is not None and 0.18 < at < 0.24, at

    out = tmp_path / "out.mp4"
    with VideoWriter(out, 25, 64, 64, audio_source=song) as w:
        for _ in range(12):
            w.write(np.zeros((64, 64, 3), np.uint8))
    first, data = decoded(out)
    at = onset(first, data)
    assert at is not None and 0.18 < at < 0.26, at


def test_audio_from_a_later_point_counts_from_the_files_start(tmp_path: Path) -> None:
    """--audio-start 0.1 on that file: the beep 0.1 s into the result's sound, not 1.5 s before the file's first
    sample (silence, then the file from its start)."""
    song = write_ts_sound(tmp_path / "song.ts", beep_at=0.3)
    wav = tmp_path / "audio.wav"
    assert Soundtrack(song, audio_offset=Fraction(1, 10)).write(wav, Fraction(1, 2))
    at = onset(*decoded(wav))
    assert at is not None and 0.18 < at < 0.24, at


def test_sound_that_starts_after_the_results_end_is_silence_as_long_as_the_frames(tmp_path: Path) -> None:
    """A driver whose sound starts 0.3 s after its first frame, animated for 0.2 s: the PNG sequence's audio.wav
    held no sample at all (a WAV of 0 s beside 0.2 s of frames; --audio-out's file likewise); it is 0.2 s of
    silence, as the start of a longer result's sound is."""
    clip = tmp_path / "late.mkv"
    with av.open(str(clip), "w") as c:
        video = c.add_stream("ffv1", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = c.add_stream("pcm_s16le", rate=RATE, layout="mono")
        for i in range(25):
            vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            c.mux(video.encode(vf))
        c.mux(video.encode(None))
        first = round(0.3 * RATE)
        for start in range(0, RATE // 2, 1024):
            af = av.AudioFrame.from_ndarray(np.full((1, 1024), 8000, np.int16), format="s16", layout="mono")
            af.sample_rate, af.pts, af.time_base = RATE, first + start, Fraction(1, RATE)
            c.mux(audio.encode(af))
        c.mux(audio.encode(None))
    wav = tmp_path / "audio.wav"
    assert Soundtrack(clip, video_start=Fraction(0)).write(wav, Fraction(1, 5))
    _, data = decoded(wav)
    assert abs(len(data) / RATE - 0.2) < 0.005 and not np.abs(data).any()


def write_clip(path: Path, seconds: float, sound_seconds: float, beep_at: float) -> Path:
    """A 25 fps FFV1 clip of ``seconds`` with 16-bit mono sound of ``sound_seconds`` from its first frame: silence
    with a loud 50 ms burst ``beep_at`` s in."""
    t = np.arange(int(RATE * sound_seconds)) / RATE
    samples = np.where((t >= beep_at) & (t < beep_at + 0.05), 16000, 0).astype(np.int16)
    return _clip_with_sound(path, seconds, "pcm_s16le", RATE, samples[None], "s16", "mono")


def _clip_with_sound(path: Path, seconds: float, codec: str, rate: int, planes: np.ndarray, sample_format: str,
                     layout: str) -> Path:
    """A 25 fps FFV1 clip of ``seconds`` (black 64 px frames) with the sound ``planes`` (channels x samples, in
    ``sample_format``) encoded by ``codec`` from its first frame, in 1024-sample frames."""
    with av.open(str(path), "w") as c:
        video = c.add_stream("ffv1", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = c.add_stream(codec, rate=rate, layout=layout)
        for i in range(round(25 * seconds)):
            vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            c.mux(video.encode(vf))
        c.mux(video.encode(None))
        for start in range(0, planes.shape[1], 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, start:start + 1024]), format=sample_format,
                                            layout=layout)
            af.sample_rate, af.pts, af.time_base = rate, start, Fraction(1, rate)
            c.mux(audio.encode(af))
        c.mux(audio.encode(None))
    return path


def test_sound_that_ends_before_the_frames_is_padded_with_silence_to_their_length(tmp_path: Path) -> None:
    """A driver whose sound (0.5 s) ends before its frames (1 s): the PNG sequence's audio.wav (and --audio-out's
    file) held only the 0.5 s, not 'as long as the frames' (`ffmpeg -i - -i s.wav -shortest` cut the video there);
    it is 1 s, the beep still 0.2 s in, silence after the sound."""
    clip = write_clip(tmp_path / "short_sound.mkv", seconds=1.0, sound_seconds=0.5, beep_at=0.2)
    wav = tmp_path / "audio.wav"
    assert Soundtrack(clip, video_start=Fraction(0)).write(wav, Fraction(1))
    first, data = decoded(wav)
    assert abs(len(data) / RATE - 1.0) < 0.005, len(data) / RATE
    at = onset(first, data)
    assert at is not None and abs(at - 0.2) < 0.002, at
    assert not np.abs(data[int(0.3 * RATE):]).any()


def write_aac_clip(path: Path, seconds: float = 1.0, beep_at: float = 0.4, rate: int = RATE) -> Path:
    """A 25 fps FFV1 clip (Matroska or MP4) with AAC sound (stereo) from its first frame (its first packet, the
    encoder's priming, 1024 samples before it, as Matroska records it: a codec delay): silence with a 50 ms 1 kHz
    beep ``beep_at`` s in."""
    t = np.arange(int(rate * seconds)) / rate
    wave = np.where((t >= beep_at) & (t < beep_at + 0.05), 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)
    planes = np.tile(wave.astype(np.float32)[None], (2, 1))
    _clip_with_sound(path, seconds, "aac", rate, planes, "fltp", "stereo")
    return path


def test_copied_aac_keeps_its_priming_packet_and_the_start_of_the_sound(tmp_path: Path) -> None:
    """AAC copied from a Matroska driver into a Matroska result: the priming packet (before the first frame) was
    left out, and the result's decoder, told of the priming by the codec delay, skipped the first real packet
    instead: its sound began 21 ms late (from 0.5 s in: 41 ms, two packets). It begins with the first frame (from
    0.5 s: within one packet, the documented limit), the beep where its frame is."""
    clip = write_aac_clip(tmp_path / "talk.mkv")
    for offset, latest in ((Fraction(0), 0.001), (Fraction(1, 5), 1024 / RATE)):
        out = tmp_path / f"out_{offset.numerator}.mkv"
        with VideoWriter(out, 25, 64, 64, audio_source=clip, audio_offset=offset, video_start=Fraction(0)) as w:
            for _ in range(20):
                w.write(np.zeros((64, 64, 3), np.uint8))
        first, data = decoded(out)
        assert 0 <= first <= latest, (offset, first)
        at = onset(first, data)
        assert at is not None and abs(at - (0.4 - offset)) < 0.002, (offset, at)


def test_copied_audio_keeps_the_packet_that_straddles_an_mp4_results_start(tmp_path: Path) -> None:
    """8 kHz AAC (128 ms packets) copied into MP4 and MOV results from 0.52 s in: the packet under the start was left
    out, so the sound began 120 ms after the first frame; it is kept and an edit list cuts its part before the start:
    the sound begins with the first frame, the beep where its frame is."""
    rate = 8000
    clip = write_aac_clip(tmp_path / "talk.mp4", beep_at=0.8, rate=rate)
    for suffix in (".mp4", ".mov"):
        out = tmp_path / f"out{suffix}"
        with VideoWriter(out, 25, 64, 64, audio_source=clip, audio_offset=Fraction(13, 25),
                         video_start=Fraction(0)) as w:
            for _ in range(15):
                w.write(np.zeros((64, 64, 3), np.uint8))
        first, data = decoded(out)
        assert 0 <= first < 0.002, (suffix, first)
        loud = np.flatnonzero(np.abs(data) > 0.1)
        assert loud.size and abs(first + loud[0] / rate - 0.28) < 0.002, (suffix, first + loud[0] / rate)
