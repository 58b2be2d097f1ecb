"""Media I/O: image reading, video probing/decoding, VideoWriter (exact fps, audio, atomic output)."""

from __future__ import annotations

import logging
import math
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from megactor_rt import media
from megactor_rt.assets import ASSETS_DIR
from megactor_rt.errors import InputError, ResourceError
from megactor_rt.media import (
    CRF_SCALES,
    AnimatedWebP,
    VideoWriter,
    _check_complete,
    _has_video,
    check_output_path,
    check_quality,
    display_orientation,
    iter_video_frames,
    probe_video,
    read_image,
    read_portrait,
)

PORTRAIT = ASSETS_DIR / "portrait.png"
DRIVER = ASSETS_DIR / "driver.mp4"


def _frames(n: int, size: int = 64) -> list[np.ndarray]:
    """Distinct synthetic frames: a bright square moving left to right."""
    out = []
    for i in range(n):
        f = np.full((size, size, 3), 40, np.uint8)
        x = (i * 3) % (size - 16)
        f[24:40, x:x + 16] = (250, 200, 30)
        out.append(f)
    return out


def test_a_result_is_on_disk_before_its_final_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss soon after a result was renamed into place must not leave that name on an empty file: the
    written file is synced before the rename, its folder after (results, and files written in pieces)."""
    from media_fixtures import Renames

    from megactor_rt.files import written_whole

    renames = Renames().install(monkeypatch)
    for out in (tmp_path / "r.mp4", tmp_path / "r.gif"):
        with VideoWriter(out, Fraction(25), 64, 64) as w:
            w.write(_frames(1)[0])
    with written_whole(tmp_path / "piece.bin") as partial:
        partial.write_bytes(b"abc")
    assert [e[2] for e in renames.events if e[0] == "rename"] == [str(tmp_path / n) for n in ("r.mp4", "r.gif",
                                                                                             "piece.bin")]
    assert renames.unsynced() == []
    renames.events.clear()
    with media.result_writer(tmp_path / "seq" / "%03d.png", Fraction(25), 64, 64) as w:  # (a frame sequence)
        for frame in _frames(2):
            w.write(frame)
    synced = [e[1] for e in renames.events if e[0] == "sync"]
    assert renames.unsynced() == []  # (the frames' folder synced as a file is, and each frame in it:)
    tmp = next(e[1] for e in renames.events if e[0] == "rename")
    assert {f"{tmp}/001.png", f"{tmp}/002.png", tmp} <= set(synced) and str(tmp_path) in synced


def _write_clip(path: Path, n: int = 20, fps: int = 25, audio: bool = True, size: int = 64) -> Path:
    """A synthetic H.264 clip, optionally with a 440 Hz AAC sine track covering the whole clip."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        if audio:
            aus = c.add_stream("aac", rate=16000)
            aus.layout = "mono"
        for f in _frames(n, size):
            c.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(vs.encode(None))
        if audio:
            samples = int(16000 * (n / fps + 0.5))
            t = np.arange(samples) / 16000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, samples) fltp mono
            for start in range(0, samples, 1024):
                af = av.AudioFrame.from_ndarray(wave[:, start:start + 1024], format="fltp", layout="mono")
                af.sample_rate = 16000
                af.pts = start
                c.mux(aus.encode(af))
            c.mux(aus.encode(None))
    return path


def _reread(path: Path) -> tuple[int, Fraction, bool, str | None]:
    """(decoded frame count, average rate, has audio, audio codec) via plain PyAV."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        rate = Fraction(vs.average_rate)
        audio = c.streams.audio[0].codec_context.codec.canonical_name if c.streams.audio else None
        n = sum(1 for _ in c.decode(vs))
    return n, rate, audio is not None, audio


# ---------------------------------------------------------------------------------------------- images


def test_read_real_portrait() -> None:
    img = read_image(PORTRAIT)
    assert img.shape == (844, 768, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not blank


@pytest.mark.parametrize("mode,suffix", [("RGBA", ".png"), ("L", ".png"), ("P", ".png"),
                                         ("RGB", ".jpg"), ("RGB", ".webp"), ("RGB", ".bmp")])
def test_read_image_modes(tmp_path: Path, mode: str, suffix: str) -> None:
    rgb = np.zeros((80, 96, 3), np.uint8)
    rgb[:, :48] = (200, 100, 50)
    im = Image.fromarray(rgb).convert(mode)
    if mode == "RGBA":
        im.putalpha(0)  # fully transparent: alpha must be dropped, not composited
    path = tmp_path / f"img{suffix}"
    im.save(path)
    out = read_image(path)
    assert out.shape == (80, 96, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(out, expected)
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    if mode == "RGBA":
        assert tuple(out[0, 0]) == (200, 100, 50)


def test_read_16bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey16 = (np.arange(80 * 90).reshape(80, 90) * 9).astype(np.uint16)  # 0..64791
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (80, 90, 3)
    assert np.abs(out[..., 0].astype(int) - (grey16 >> 8)).max() <= 1


def test_read_float_grey_in_0_1_is_scaled(tmp_path: Path) -> None:
    """A 32-bit float TIFF with values in 0..1 (scientific and HDR tools write these) keeps its picture
    (was: truncated to black)."""
    grey = (np.arange(80 * 90).reshape(80, 90) / (80 * 90 - 1)).astype(np.float32)  # 0..1
    Image.fromarray(grey, "F").save(tmp_path / "f.tiff")
    out = read_image(tmp_path / "f.tiff")
    assert out.shape == (80, 90, 3) and np.abs(out[..., 0].astype(int) - np.rint(grey * 255)).max() <= 1


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (100, 70), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").shape == (100, 70, 3)


def _upright_picture() -> np.ndarray:
    """160x120 RGB: a red band on top, a green one on the left, blue elsewhere (every quarter turn and flip of it
    differs)."""
    img = np.zeros((160, 120, 3), np.uint8)
    img[...] = (0, 0, 255)
    img[:, :30] = (0, 255, 0)
    img[:40] = (255, 0, 0)
    return img


# EXIF orientation -> how a camera stores an upright picture under it (the inverse of its display transform)
_STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _heic_photo(path: Path, orientation: int) -> Path:
    """A phone-style HEIC of :func:`_upright_picture`: the pixels stored turned, with the EXIF orientation that
    turns them back (pillow-heif also writes it as the HEIF rotation property, as iPhones do)."""
    pytest.importorskip("pillow_heif", reason="pillow-heif (a dependency of megactor-rt) writes the HEIC fixtures")
    media.register_heif()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_upright_picture()).transpose(_STORED_AS[orientation]).save(path, exif=exif.tobytes(),
                                                                                 quality=95)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_heic_photos_are_read_upright(tmp_path: Path, orientation: int) -> None:
    """An iPhone-style HEIC portrait (turned pixels + rotation) is read upright, once turned (not twice: libheif
    applies the rotation, and the EXIF orientation left beside it must not be applied again)."""
    out = read_portrait(_heic_photo(tmp_path / f"photo{orientation}.heic", orientation))
    assert out.shape == (160, 120, 3) and np.abs(out.astype(int) - _upright_picture()).mean() < 4


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_heic_photo_read_through_ffmpeg_keeps_its_rotation(tmp_path: Path, orientation: int) -> None:
    """FFmpeg reads a HEIC photo as a one-frame video (the way without pillow-heif): its frames carry side data of
    a type PyAV 18.1 does not know (FFmpeg 8's EXIF), which made listing them raise ValueError (a crash with no
    file named); the rotation is now read on its own, so the frame comes out upright."""
    path = _heic_photo(tmp_path / "photo.heic", orientation)
    if not _has_video(path):
        pytest.skip(f"this PyAV's FFmpeg ({av.library_versions['libavformat']}) does not read HEIC")
    (frame,) = list(iter_video_frames(path))
    assert frame.shape == (160, 120, 3) and np.abs(frame.astype(int) - _upright_picture()).mean() < 4


@pytest.mark.parametrize("case", ["missing", "text", "tiny", "huge", "truncated"])
def test_read_image_bad(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"bad_{case}.png"
    if case == "text":
        path.write_text("this is not an image")
    elif case == "tiny":
        Image.new("RGB", (32, 32)).save(path)
    elif case == "huge":
        Image.new("L", (8200, 70)).save(path)
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match=path.name):
        read_image(path)


# ---------------------------------------------------------------------------------------------- probing / decoding


def test_probe_real_driver() -> None:
    info = probe_video(DRIVER)
    assert (info.width, info.height) == (512, 512)
    assert info.fps == Fraction(30) and isinstance(info.fps, Fraction)
    assert info.num_frames == 96
    assert info.has_audio
    assert info.duration_s == pytest.approx(3.2, abs=0.05)


def test_decode_real_driver_streaming() -> None:
    frames = iter_video_frames(DRIVER, max_frames=10)
    assert not isinstance(frames, list)
    got = list(frames)
    assert len(got) == 10
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in got)
    assert not np.array_equal(got[0], got[9])  # frames differ: really decoding the stream


def test_decode_synthetic_all_frames(tmp_path: Path) -> None:
    clip = _write_clip(tmp_path / "clip.mp4", n=20, fps=25)
    info = probe_video(clip)
    assert info.fps == 25 and info.num_frames == 20 and info.has_audio
    frames = list(iter_video_frames(clip))
    assert len(frames) == 20
    # the bright square sits where _frames put it (lossy codec: compare coarsely)
    assert frames[5][32, 5 * 3 + 8, 0] > 200 and frames[5][32, 60, 0] < 80


def test_probe_silent_clip(tmp_path: Path) -> None:
    assert not probe_video(_write_clip(tmp_path / "silent.mp4", audio=False)).has_audio


def _zero_frame_clip(path: Path) -> Path:
    """A clip whose header announces frames but none decodes (sample data zeroed)."""
    from media_fixtures import write_zero_frame_video

    write_zero_frame_video(path)
    assert path.is_file()
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        aus = c.add_stream("aac", rate=16000)
        aus.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    return path


@pytest.mark.parametrize("case", ["missing", "text", "zero_frames", "audio_only", "truncated_moov_last",
                                  "directory"])
def test_bad_videos_raise_input_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"bad_{case}.mp4"
    if case == "text":
        path.write_text("not a video at all\n" * 50)
    elif case == "zero_frames":
        _zero_frame_clip(path)
    elif case == "audio_only":
        _audio_only(path.with_suffix(".m4a"))
        path = path.with_suffix(".m4a")
    elif case == "truncated_moov_last":  # the real driver keeps its index at the end: half is unreadable
        data = DRIVER.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "directory":
        path.mkdir()
    with pytest.raises(InputError, match=path.name) as err:
        list(iter_video_frames(path))
    if case == "zero_frames":
        assert "no decodable video frame" in str(err.value)
    if case != "zero_frames":  # a zero-frame file has a valid header; only decoding finds the problem
        with pytest.raises(InputError, match=path.name):
            probe_video(path)


def _truncated_faststart(tmp_path: Path) -> Path:
    """A clip whose index is at the front (faststart), cut in half: decodable start, missing end."""
    src = tmp_path / "full.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(src, Fraction(25), 64, 64) as w:
        for _ in range(60):  # noise: every frame is big, so half the bytes hold about half the frames
            w.write(rng.integers(0, 256, (64, 64, 3), np.uint8))
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_strict_raises_after_partial_frames(tmp_path: Path) -> None:
    cut = _truncated_faststart(tmp_path)
    got = []
    with pytest.raises(InputError, match="cut.mp4.*truncated") as info:
        for f in iter_video_frames(cut):
            got.append(f)
    assert 0 < len(got) < 60
    assert f"--max-frames {len(got)} (AnimateConfig.max_frames) animates the {len(got)} frames" in str(info.value)
    assert len(list(iter_video_frames(cut, len(got)))) == len(got)  # and that works
    with pytest.raises(InputError) as info:  # a later start: the hint counts the frames from there
        later = list(iter_video_frames(cut, skip=3))
    assert f"--max-frames {len(got) - 3} (AnimateConfig.max_frames)" in str(info.value)
    later = list(iter_video_frames(cut, len(got) - 3, skip=3))
    assert len(later) == len(got) - 3 and all(np.array_equal(a, b) for a, b in zip(later, got[3:]))


def test_corrupt_middle_raises(tmp_path: Path) -> None:
    data = bytearray(_truncated_faststart(tmp_path).with_name("full.mp4").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 3000] = np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes()
    bad = tmp_path / "garbled.mp4"
    bad.write_bytes(bytes(data))
    got = []
    with pytest.raises(InputError, match="garbled.mp4.*corrupt after frame"):
        for f in iter_video_frames(bad):
            got.append(f)
    assert 0 < len(got) < 60


def test_short_stream_vs_header() -> None:
    _check_complete(Path("clip.mp4"), announced=96, decoded=96, strict=True, usable=96)  # complete
    _check_complete(Path("clip.mp4"), announced=0, decoded=10, strict=True, usable=10)  # count unknown
    _check_complete(Path("clip.mp4"), announced=96, decoded=94, strict=True, usable=94)  # edit-list slack
    with pytest.raises(InputError, match="clip.mp4.*announces 96 frames but only 40.*--max-frames 37 "):
        _check_complete(Path("clip.mp4"), announced=96, decoded=40, strict=True, usable=37)  # the hint: usable
    _check_complete(Path("clip.mp4"), announced=96, decoded=40, strict=False, usable=40)  # lenient: warns only


def test_truncated_lenient_warns_and_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cut = _truncated_faststart(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        got = list(iter_video_frames(cut, strict=False))
    assert 0 < len(got) < 60
    assert any("truncated" in r.getMessage() and "cut.mp4" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001), Fraction(15, 2)])
def test_writer_exact_fps_and_frame_count_silent(tmp_path: Path, fps: Fraction) -> None:
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps, 64, 64) as w:
        for f in _frames(12):
            w.write(f)
    n, rate, has_audio, _ = _reread(out)
    assert (n, rate, has_audio) == (12, fps, False)
    assert probe_video(out).fps == fps


def test_writer_copies_mp3_from_real_driver(tmp_path: Path) -> None:
    frames = list(iter_video_frames(DRIVER, max_frames=30))
    out = tmp_path / "with_audio.mp4"
    with VideoWriter(out, Fraction(30), 512, 512, audio_source=DRIVER) as w:
        for f in frames:
            w.write(f)
    n, rate, has_audio, codec = _reread(out)
    assert (n, rate, has_audio, codec) == (30, Fraction(30), True, "mp3")  # copied, not transcoded
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        audio_s = float(a.duration * a.time_base)
    assert 0.9 < audio_s < 1.0 + 0.1  # trimmed to the 1 s of video (packet granularity)
    decoded = list(iter_video_frames(out))
    assert np.abs(decoded[10].astype(int) - frames[10]).mean() < 4  # crf 18 is near-lossless


@pytest.mark.parametrize("suffix, worse", [(".mp4", 32), (".webm", 45)])
def test_crf_trades_quality_for_size(tmp_path: Path, suffix: str, worse: int) -> None:
    """crf: a higher value gives a smaller file with a larger error, in H.264 and VP9 (the default is the
    format's own: 18 and 24, the same file as without crf)."""
    frames = list(iter_video_frames(DRIVER, max_frames=12))
    facts = {}
    for crf in (None, CRF_SCALES["libx264" if suffix == ".mp4" else "libvpx-vp9"][2], worse):
        out = tmp_path / f"{crf}{suffix}"
        with VideoWriter(out, Fraction(30), 512, 512, crf=crf) as w:
            for f in frames:
                w.write(f)
        decoded = list(iter_video_frames(out))
        error = float(np.mean([np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames, strict=True)]))
        facts[crf] = (out.stat().st_size, error)
    (default_size, default_error), (size, error) = facts[None], facts[worse]
    assert list(facts.values())[1] == facts[None]
    assert size < 0.7 * default_size and error > default_error + 0.3, facts


def test_crf_outside_the_encoders_scale_is_refused(tmp_path: Path) -> None:
    """crf is checked against the result's encoder before a file is opened: 52 is past H.264's 51 (VP9 takes
    it), a GIF has no crf; nothing is left behind."""
    with pytest.raises(InputError, match=r"r\.mp4: crf \(--crf\) 52 is outside libx264's scale of 0 .* to 51"):
        VideoWriter(tmp_path / "r.mp4", Fraction(25), 64, 64, crf=52)
    with pytest.raises(InputError, match=r"r\.gif: .*encoder, gif, has no such scale"):
        VideoWriter(tmp_path / "r.gif", Fraction(25), 64, 64, crf=20)
    assert list(tmp_path.iterdir()) == []
    check_quality(tmp_path / "r.webm", 52)
    check_quality(tmp_path / "r.gif", None)


def test_writer_transcodes_mp3_into_m4v(tmp_path: Path) -> None:
    """FFmpeg's ipod muxer (.m4v) refuses MP3 (and E-AC-3): the bundled driver's MP3 is transcoded to AAC
    there (was: an error from the muxer)."""
    out = tmp_path / "with_audio.m4v"
    with VideoWriter(out, Fraction(30), 64, 64, audio_source=DRIVER) as w:
        for f in _frames(30):
            w.write(f)
    assert _reread(out) == (30, Fraction(30), True, "aac")


def test_a_result_file_that_cannot_be_made_is_not_blamed_on_the_sound(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is first opened where the header is written, after the sound's stream is set up: a file that
    cannot be made there (a full disk, no permission; here a folder in the temporary file's place) is a
    ResourceError naming the result, not the sound "cannot be written into a .mp4 result"."""
    import types
    import uuid

    import megactor_rt.media as media_module

    monkeypatch.setattr(media_module, "uuid", types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=0xABCDEF12 << 96)))
    out = tmp_path / "r.mp4"
    (tmp_path / ".r.abcdef12.tmp.mp4").mkdir()  # (opening it for writing fails: EISDIR)
    with pytest.raises(ResourceError, match=r"r\.mp4: cannot write the result video .*nothing was written") as err:
        VideoWriter(out, Fraction(30), 64, 64, audio_source=DRIVER)
    assert "audio" not in str(err.value) and not out.exists()


def test_writer_disk_errors_name_the_output_and_leave_nothing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (here: a full disk, as FFmpeg reports it) is a ResourceError naming the result, and
    neither the result nor its temporary file remains; a result name the file system takes also fits its
    temporary file (the temporary stem is cut)."""
    import errno

    from megactor_rt.errors import ResourceError

    out = tmp_path / "full.mp4"
    w = VideoWriter(out, Fraction(25), 64, 64)
    w.write(_frames(1)[0])

    class FullDisk:  # the container, whose writes fail
        def __init__(self, real: object) -> None:
            self.real = real

        def mux(self, *args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    monkeypatch.setattr(w, "_out", FullDisk(w._out))
    with pytest.raises(ResourceError, match=r"full\.mp4: cannot write the result video .*No space left"):
        w.write(_frames(1)[0])
    w.abort()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    long = tmp_path / ("a" * 248 + ".mp4")  # 252 bytes: fits, its temporary name would not uncut
    with VideoWriter(long, Fraction(25), 64, 64) as w:
        w.write(_frames(1)[0])
    assert [p.name for p in tmp_path.iterdir()] == [long.name]


def test_abort_broken_off_by_a_second_interrupt_still_removes_the_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C or SIGTERM (GNU ``timeout`` signals the process and then its group) can arrive while an
    aborted output is being closed: the temporary file goes all the same."""
    w = VideoWriter(tmp_path / "out.mp4", Fraction(25), 64, 64)
    for frame in _frames(60):  # past the encoder's look-ahead: the file is on disk
        w.write(frame)
    assert [p.name for p in tmp_path.iterdir()] == [w._tmp.name]
    real = w._out

    class Interrupted:
        def close(self) -> None:
            real.close()
            raise KeyboardInterrupt

    monkeypatch.setattr(w, "_out", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_transcodes_audio_into_mp4(tmp_path: Path) -> None:
    src = tmp_path / "src.mkv"
    with av.open(str(src), "w") as c:  # PCM in Matroska: a codec MP4 cannot take as is
        aus = c.add_stream("pcm_s16le", rate=16000)
        aus.layout = "mono"
        wave = (3000 * np.sin(np.arange(32000) / 5)).astype(np.int16)[None]  # (1, 2 s)
        af = av.AudioFrame.from_ndarray(wave, format="s16", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    out = tmp_path / "out.mp4"
    with VideoWriter(out, Fraction(25), 64, 64, audio_source=src) as w:
        for f in _frames(25):
            w.write(f)
    n, _, has_audio, codec = _reread(out)
    assert (n, has_audio, codec) == (25, True, "aac")
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        audio_s = float(a.duration * a.time_base)
    assert 0.95 < audio_s < 1.15  # 2 s of source trimmed to 1 s (+ AAC priming/padding)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_transcoded_audio_starts_on_time(tmp_path: Path, suffix: str) -> None:
    """A click 0.5 s into PCM audio at 8 kHz is 0.5 s into the result's AAC (WebM: Opus) audio, as players place
    it (the decoded samples from the first packet's time on). Was: 1024 samples late (128 ms at 8 kHz), as the
    encoder's start-up delay went unrecorded."""
    rate, click = 8000, 4000
    src = tmp_path / "src.mkv"
    with av.open(str(src), "w") as c:
        aus = c.add_stream("pcm_s16le", rate=rate)
        aus.layout = "mono"
        wave = np.zeros((1, 2 * rate), np.int16)
        wave[0, click:click + 8] = 20000
        af = av.AudioFrame.from_ndarray(wave, format="s16", layout="mono")
        af.sample_rate, af.pts = rate, 0
        c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    out = tmp_path / f"out{suffix}"
    with VideoWriter(out, Fraction(25), 64, 64, audio_source=src) as w:
        for f in _frames(25):
            w.write(f)
    with av.open(str(out)) as c:
        frames = list(c.decode(audio=0))
    start = frames[0].pts * frames[0].time_base  # where the decoded audio begins on the result's clock
    got = np.concatenate([f.to_ndarray()[0] for f in frames])
    at = float(start) + int(np.argmax(np.abs(got))) / frames[0].sample_rate  # AAC keeps 8 kHz, Opus has 48
    assert abs(at - click / rate) < 0.003, at


@pytest.mark.parametrize("sar,shown", [(Fraction(2), (256, 128)), (Fraction(1, 2), (64, 128)),
                                      (Fraction(8), (128, 128))])  # a broken header: square pixels
def test_non_square_pixels_are_shown_at_their_display_size(tmp_path: Path, sar: Fraction,
                                                            shown: tuple[int, int]) -> None:
    """A 128x128 video whose pixels are twice as wide (or half as wide) as high plays at 256x128 (64x128): the
    probe, the frames and a video portrait have that size, so faces keep their shape."""
    path = tmp_path / "sar.mp4"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width = vs.height = 128
        vs.pix_fmt = "yuv420p"
        vs.codec_context.sample_aspect_ratio = sar
        for f in _frames(3, 128):
            c.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(vs.encode(None))
    info = probe_video(path)
    assert (info.width, info.height) == shown
    frames = list(iter_video_frames(path))
    assert len(frames) == 3 and all(f.shape == (shown[1], shown[0], 3) for f in frames)
    assert read_portrait(path).shape == (shown[1], shown[0], 3)
    square = np.asarray(Image.fromarray(_frames(1, 128)[0]).resize(shown, Image.BILINEAR), np.float32)
    assert np.abs(frames[0].astype(np.float32) - square).mean() < 6  # the picture stretched, not cropped


def test_writer_synthetic_audio_and_silent_source(tmp_path: Path) -> None:
    with_audio = _write_clip(tmp_path / "a.mp4", audio=True)
    silent = _write_clip(tmp_path / "s.mp4", audio=False)
    for src, expect in ((with_audio, True), (silent, False)):
        out = tmp_path / f"out_{src.stem}.mp4"
        with VideoWriter(out, Fraction(25), 64, 64, audio_source=src) as w:
            for f in iter_video_frames(src):
                w.write(f)
        n, rate, has_audio, _ = _reread(out)
        assert (n, rate, has_audio) == (20, Fraction(25), expect)


def test_writer_exception_leaves_no_file(tmp_path: Path) -> None:
    """Enough frames that the encoder has written to the temporary file before the failure (5 frames stay in
    x264's buffers, so the file was never made and its removal went untested)."""
    out = tmp_path / "never.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, Fraction(25), 64, 64, audio_source=DRIVER) as w:
        for f in _frames(100):
            w.write(f)
        written = [p.name for p in tmp_path.iterdir()]
        assert len(written) == 1 and written[0].startswith(".never.") and written[0].endswith(".tmp.mp4")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_writer_keeps_previous_file_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "result.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(ValueError), VideoWriter(out, Fraction(25), 64, 64) as w:
        w.write(np.zeros((64, 64, 3), np.uint8))
        w.write(np.zeros((32, 32, 3), np.uint8))  # wrong size
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.mp4"]


def test_writer_no_frames_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "empty.mp4"
    w = VideoWriter(out, Fraction(25), 64, 64)
    with pytest.raises(ValueError, match="no frames"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_final_name_only_after_close(tmp_path: Path) -> None:
    out = tmp_path / "late.mp4"
    w = VideoWriter(out, Fraction(25), 64, 64)
    w.write(_frames(1)[0])
    assert not out.exists()
    w.close()
    assert out.exists() and len(list(tmp_path.iterdir())) == 1


def test_writer_removes_its_stale_temporaries(tmp_path: Path) -> None:
    """A write of out.mp4 killed midway left its hidden temporary file; the next successful write of out.mp4
    removes it once it is over an hour old, and leaves a young one (a concurrent writer's) and other files."""
    from megactor_rt.files import STALE_S

    stale, young = tmp_path / ".out.0123abcd.tmp.mp4", tmp_path / ".out.4567cdef.tmp.mp4"
    other, lookalike = tmp_path / ".other.89abcdef.tmp.mp4", tmp_path / ".out.notours.tmp.mp4"
    for p in (stale, young, other, lookalike):
        p.write_bytes(b"half a video")
        if p is not young:
            old = p.stat().st_mtime - STALE_S - 60
            os.utime(p, (old, old))
    with VideoWriter(tmp_path / "out.mp4", Fraction(25), 64, 64) as w:
        w.write(_frames(1)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.mp4", young.name, other.name, lookalike.name])


@pytest.mark.parametrize("kind", ["out.mp4", "take/%05d.png"])
def test_a_killed_writers_leftover_goes_with_the_next_write_a_live_ones_stays(tmp_path: Path, kind: str) -> None:
    """A write killed with SIGKILL (a run whose checkpoint lets it start again at once) left its temporary file or
    folder: the next write of the result removes it without waiting an hour, as its writer's hold went with the
    process; a temporary file a live writer holds stays, however old (a run of hours writes nothing into it before
    its last step; its sequence's folder was removed after an hour, failing the run). (Was: left for an hour, a
    PNG sequence's frames among them.)"""
    import subprocess
    import sys
    import time

    from megactor_rt.files import hold, let_go

    script = ("import os, numpy as np; from fractions import Fraction; from megactor_rt.media import result_writer\n"
              f"w = result_writer({str(tmp_path / kind)!r}, Fraction(25), 64, 64)\n"
              "w.write(np.zeros((64, 64, 3), np.uint8)); os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(left) == 1, left
    live = left[0].with_name(left[0].name.replace(left[0].name.split(".")[2], "4567cdef"))
    live.mkdir() if left[0].is_dir() else live.write_bytes(b"half")
    a_minute_ago, two_hours_ago = time.time() - 60, time.time() - 7200  # (a live run of hours: its temporary file
    for p in (*left, *left[0].iterdir()) if left[0].is_dir() else left:  # untouched until its last step)
        os.utime(p, (a_minute_ago, a_minute_ago))
    os.utime(live, (two_hours_ago, two_hours_ago))
    held = hold(live)
    try:
        w = media.result_writer(tmp_path / kind, Fraction(25), 64, 64)
        w.write(_frames(1)[0])
        w.close()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]
    finally:
        let_go(held)


def test_a_hold_outwaits_another_process_asking_whether_the_file_is_held(tmp_path: Path) -> None:
    """``remove_stale`` asks whether a temporary file is held by taking its lock for a moment: a writer whose
    ``hold`` fell in that moment went unprotected (None), and its file could be removed as a dead writer's once
    untouched for 10 s (an export tracing a network). The hold waits the moment out."""
    import fcntl
    import threading

    from megactor_rt.files import hold, let_go

    path = tmp_path / ".export-x"
    path.mkdir()
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other process's probe, let go 20 ms later
    threading.Timer(0.02, os.close, (probe,)).start()
    held = hold(path)
    try:
        assert held is not None
    finally:
        let_go(held)


def test_where_the_os_has_no_flock_leftovers_go_by_age(tmp_path: Path) -> None:
    """An OS without ``fcntl`` (Windows): the package imported no more (files imported it at the top); now a hold
    is None and a leftover is told by its age alone; a lock file's block runs unlocked."""
    import subprocess
    import sys

    script = ("import os, sys, time; sys.modules['fcntl'] = None\n"
              "from pathlib import Path; from megactor_rt import files\n"
              f"d = Path({str(tmp_path)!r}); old, new = d / '.a.part', d / '.b.part'\n"
              "old.write_bytes(b'x'); new.write_bytes(b'x'); os.utime(old, (time.time() - 7200,) * 2)\n"
              "assert files.hold(new) is None\n"
              "with files.locked(d / 'sub' / '.x.lock'): pass\n"
              "print(sorted(p.name for p in files.remove_stale(d, '.*.part', unheld_s=10.0)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['.a.part']"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.part", "sub"]


@pytest.mark.parametrize("case", ["missing_dir", "parent_is_file", "is_dir", "bad_suffix"])
def test_unwritable_destination(tmp_path: Path, case: str) -> None:
    if case == "missing_dir":
        path = tmp_path / "nope" / "out.mp4"
    elif case == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "out.mp4"
    elif case == "is_dir":
        path = tmp_path / "out.mp4"
        path.mkdir()
    else:
        path = tmp_path / "out.xyz"
    with pytest.raises(InputError, match=path.name):
        check_output_path(path)
    with pytest.raises(InputError, match=path.name):
        VideoWriter(path, Fraction(25), 64, 64)


def test_read_only_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # chmod alone cannot be used: the test may run as root, which ignores directory permissions
    monkeypatch.setattr("megactor_rt.media.os.access",
                        lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(InputError, match="ro.*not writable"):
        check_output_path(ro / "out.mp4")
    with pytest.raises(InputError, match="not writable"):
        VideoWriter(ro / "out.mp4", Fraction(25), 64, 64)
    assert list(ro.iterdir()) == []


def test_bad_audio_source_fails_before_work(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus_audio.mp4"
    bogus.write_text("nope")
    with pytest.raises(InputError, match="bogus_audio.mp4"):
        VideoWriter(tmp_path / "out.mp4", Fraction(25), 64, 64, audio_source=bogus)
    assert [p.name for p in tmp_path.iterdir()] == ["bogus_audio.mp4"]


def test_portrait_from_a_video_is_its_first_frame(tmp_path: Path) -> None:
    from media_fixtures import write_face_driver

    clip = write_face_driver(tmp_path / "source.MP4", n=3, size=96)  # suffix case does not matter
    first = next(iter_video_frames(clip, 1))
    np.testing.assert_array_equal(read_portrait(clip), first)
    np.testing.assert_array_equal(read_portrait(PORTRAIT), read_image(PORTRAIT))  # stills unchanged


def test_portrait_from_a_video_under_another_suffix(tmp_path: Path) -> None:
    """A video whose suffix is not one of the video suffixes (.ts, .3gp, .flv...) is read as a video when it is
    no image (was: "not a readable image"); a file that is neither keeps the image error."""
    clip = _write_clip(tmp_path / "clip.mp4", n=3, size=128, audio=False)
    other = clip.rename(tmp_path / "clip.ts")
    assert np.array_equal(read_portrait(other), next(iter_video_frames(other, 1)))
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(InputError, match=r"notes\.png: not a readable image"):
        read_portrait(text)


@pytest.mark.parametrize("case", ["zero-frame", "missing", "no-video-stream"])
def test_bad_video_portrait_names_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.mp4"
    if case == "zero-frame":
        _zero_frame_clip(path)
    elif case == "no-video-stream":
        _audio_only(path)
    with pytest.raises(InputError, match=f"{case}.mp4: ") as info:
        read_portrait(path)
    assert {"zero-frame": "no decodable video frame", "missing": "video file does not exist",
            "no-video-stream": "no video stream"}[case] in str(info.value)


def test_a_portrait_on_a_transparent_background_is_said_to_be(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A cut-out portrait (PNG, transparent around the person): its alpha is dropped as upstream drops it, so the
    colour stored under it (black here) became its background without a word; now a warning says so. An opaque
    alpha channel, or a few transparent pixels, says nothing."""
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[32:96, 32:96] = (200, 160, 140, 255)
    cut_out, opaque = tmp_path / "cut_out.png", tmp_path / "opaque.png"
    Image.fromarray(rgba).save(cut_out)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(opaque)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        assert read_portrait(cut_out)[0, 0].tolist() == [0, 0, 0]
    assert "cut_out.png: 75 % of the portrait is transparent; its alpha is dropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        read_portrait(opaque)
    assert not caplog.records


@pytest.mark.parametrize("name", ["me.png", "me.jpg", "me.heic", "clip.mp4", "clip.webp", "clip.mkv"])
def test_an_empty_file_is_said_to_be_empty(tmp_path: Path, name: str) -> None:
    """A 0-byte portrait, driver or inspected file (a failed copy or download) is called empty, naming it (was:
    "not a readable image (cannot identify image file)" or "not a readable video file (Invalid data found when
    processing input)", which sends the user looking for a codec)."""
    from megactor_rt.describe import describe

    path = tmp_path / name
    path.write_bytes(b"")
    says = re.escape(f"{path}: the ") + r"\w+ file is empty \(0 bytes"
    for read in (read_portrait, probe_video, lambda p: next(iter_video_frames(p)), describe):
        with pytest.raises(InputError, match=says):
            read(path)


def test_a_photo_too_large_says_how_to_use_it(tmp_path: Path) -> None:
    """A phone's full-resolution photo (64 MP: 9248x6936) over the 8192 px limit is refused, naming the file and
    saying what to do with it (was: the limit alone)."""
    photo = tmp_path / "IMG_64MP.jpg"
    Image.new("RGB", (9248, 6936), (120, 130, 140)).save(photo, quality=50)
    with pytest.raises(InputError, match=re.escape(f"{photo}: image is 9248x6936 px; each side must be at most 8192 "
                                                   "px (scale it down first, to 4096 px on its longer side say")):
        read_portrait(photo)


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header gives ``width`` x ``height`` (RGB) and whose pixels are a few bytes (a crafted or
    damaged file: Pillow's decompression bomb limit refuses it as it opens it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("name", ["huge.png", "huge.gif"])
def test_an_image_over_pillows_limit_is_said_to_be_too_large(tmp_path: Path, name: str) -> None:
    """An image whose header gives more pixels than Pillow opens (its decompression bomb limit: 100000x100000 px)
    is refused as too large, naming the file, by inspect and as a portrait (was: inspect's "unexpected error:
    DecompressionBombError", exit 1, and a portrait's "not a readable image")."""
    from megactor_rt.describe import describe

    path = _png_header(tmp_path / "huge.png", 100_000, 100_000)
    if name.endswith(".gif"):  # a GIF's logical screen of 60000x60000
        Image.new("RGB", (64, 64)).save(path := tmp_path / name)
        path.write_bytes(path.read_bytes()[:6] + (60_000).to_bytes(2, "little") * 2 + path.read_bytes()[10:])
    says = re.escape(f"{path}: image is too large to read (") + r"[\d,]+ pixels\); each side must be at most 8192 px"
    for read in (lambda p: describe(p, faces=False), read_portrait):
        with pytest.raises(InputError, match=says):
            read(path)


def test_an_image_over_pillows_warning_limit_is_refused_without_its_warning(tmp_path: Path) -> None:
    """``megactor-rt inspect`` of a 10000x10000 px image (over Pillow's 89 MP warning limit, under its error one)
    gives the engine's error naming the file and its 8192 px limit, and no raw DecompressionBombWarning from
    Pillow on stderr before it (was: both), with Python's warnings shown as by default."""
    import subprocess
    import sys

    big = _png_header(tmp_path / "big.png", 10_000, 10_000)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-W", "default", "-m", "megactor_rt.cli", "inspect", "--no-faces",
                           str(big)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert f"error: {big}: image is 10000x10000 px; each side must be at most 8192 px" in done.stderr
    assert "DecompressionBombWarning" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_an_animated_webp_over_pillows_limit_is_said_to_be_too_large(tmp_path: Path) -> None:
    """An animated WebP whose canvas (its VP8X header) is over Pillow's decompression bomb limit is refused as too
    large, as a driver and in inspect, as the same file is as a portrait (was: "not a readable animated WebP: corrupt
    or cut off (Image size (...) exceeds limit ...)", as if damaged)."""
    from megactor_rt.describe import describe
    from megactor_rt.media import AnimatedWebP

    clip = tmp_path / "huge.webp"
    first, *rest = [Image.fromarray(f) for f in _frames(3, 64)]
    first.save(clip, save_all=True, append_images=rest, duration=100, loop=0)
    raw = bytearray(clip.read_bytes())
    assert raw[12:16] == b"VP8X" and raw[20] & 0x02  # (the animation flag)
    raw[24:30] = (15_999).to_bytes(3, "little") * 2  # canvas 16000x16000 (each side less one)
    clip.write_bytes(bytes(raw))
    says = re.escape(f"{clip}: image is too large to read (256,000,000 pixels); each side must be at most 8192 px")
    for read in (AnimatedWebP, lambda p: describe(p, faces=False), read_portrait):
        with pytest.raises(InputError, match=says):
            read(clip)


def test_inspect_takes_a_picture_named_as_a_video_and_a_video_named_as_a_picture(tmp_path: Path) -> None:
    """A PNG saved as .mp4 is an image (as a portrait reads it), and an MP4 saved as .png a video whose settings are
    its container's, as a run reads them (was: "not an image Pillow reads, nor a video" for the one, and "cannot
    read this frame" for the other, a frame's text chunks being looked for in it)."""
    import json

    from megactor_rt.describe import describe
    from megactor_rt.media import result_settings

    picture = tmp_path / "photo.mp4"
    Image.new("RGB", (96, 80), (120, 130, 140)).save(picture, format="PNG")
    assert describe(picture, faces=False) == {"kind": "image", "size": "96x80"}
    assert read_portrait(picture).shape == (80, 96, 3)
    clip = tmp_path / "clip.png"
    with av.open(str(clip), "w", format="mp4") as c:
        c.metadata["comment"] = json.dumps({"megactor_rt": "0.1.0", "portrait": "me.png"})
        stream = c.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(3):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        c.mux(stream.encode(None))
    report = describe(clip, faces=False)
    assert (report["kind"], report["size"], report["frames"]) == ("video", "64x64", 3)
    assert report["made_with"] == {"megactor_rt": "0.1.0", "portrait": "me.png"} == result_settings(clip)
    assert len(list(iter_video_frames(clip))) == 3


def test_a_sound_file_of_no_samples_is_refused_as_the_results_sound(tmp_path: Path) -> None:
    """A WAV of no samples (a recording stopped at once, a failed export) given as the result's sound is refused
    before any work, naming it (was: a result without sound, said at -v only); inspect gives its length as 0 s
    (was: none), and a WAV with sound passes."""
    import wave

    from megactor_rt.describe import describe
    from megactor_rt.media import check_sound

    empty, sound = tmp_path / "empty.wav", tmp_path / "sound.wav"
    for path, samples in ((empty, b""), (sound, b"\x00\x01" * 1600)):
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(samples)
    with pytest.raises(InputError, match=re.escape(f"{empty}: its audio stream holds no sound (no samples")):
        check_sound(empty)
    assert describe(empty)["duration_s"] == 0
    assert check_sound(sound) == (sound, 0.0) and describe(sound)["duration_s"] == 0.1


def test_a_driver_over_ffmpegs_size_limit_is_said_to_be_too_large(tmp_path: Path) -> None:
    """A GIF whose header gives 60000x60000 px (over FFmpeg's size limit, which then gives it no frame size) is
    refused as a driver as too large, naming it (was: "the video stream has no frame size (corrupt header?)")."""
    gif = tmp_path / "huge.gif"
    Image.new("RGB", (64, 64)).save(gif)
    gif.write_bytes(gif.read_bytes()[:6] + (60_000).to_bytes(2, "little") * 2 + gif.read_bytes()[10:])
    with pytest.raises(InputError, match=re.escape(f"{gif}: image is too large to read (3,600,000,000 pixels)")):
        probe_video(gif)


def test_an_mp4_cut_inside_its_index_is_said_to_be_cut_off(tmp_path: Path) -> None:
    """An MP4 cut inside its index (moov box: at the end of a camera's file, at the start of a faststart one), which
    FFmpeg opens as a file of no streams, is called cut off, as a driver and in inspect (was: 'the file has no video
    stream')."""
    from megactor_rt.describe import describe

    whole = _write_clip(tmp_path / "whole.mp4", n=12, size=96)
    data = whole.read_bytes()
    path = tmp_path / "download.mp4"
    path.write_bytes(data[:data.index(b"moov") + 40])
    for read in (probe_video, lambda p: next(iter_video_frames(p)), describe):
        with pytest.raises(InputError, match=re.escape(f"{path}: not a readable video file: the MP4/MOV is cut off "
                                                       "(it ends ") + r"\d+ bytes short of the end of its moov box"):
            read(path)


def test_an_mp4_cut_before_its_index_is_said_to_be_cut_off(tmp_path: Path) -> None:
    """A phone recording whose app stopped before it wrote the index (moov box, at the end: no faststart), or such
    a file's download cut short, is called cut off, naming it, as a driver, a portrait and in inspect (was: "not a
    readable video file (Invalid data found when processing input)"); a whole file and a HEIF photo (ISO BMFF
    boxes too, without an index) are not."""
    from megactor_rt.describe import describe
    from megactor_rt.media import iso_cut_off

    whole = _write_clip(tmp_path / "whole.mp4", n=12, size=96)
    data = whole.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")  # (the index at the end, as a camera writes it)
    cases = {"unfinished.mp4": (data[:data.index(b"moov") - 4], "it has no index, no moov box"),
             "download.mp4": (data[:len(data) * 6 // 10], r"it ends \d+ bytes short of the end of its mdat box, "
                                                          r"before its index \(moov box\)")}
    for name, (cut, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(cut)
        assert re.fullmatch(says, iso_cut_off(path) or "")
        for read in (probe_video, read_portrait, lambda p: next(iter_video_frames(p)), describe):
            with pytest.raises(InputError, match=re.escape(f"{path}: not a readable ") + r"\w+ file: the MP4/MOV is "
                               rf"cut off \({says}: a partial download or copy, or a recording that was not finished"):
                read(path)
    assert iso_cut_off(whole) is None and describe(whole, faces=False).get("truncated") is None
    heif = tmp_path / "photo.heic"
    heif.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0\0\0\x10meta" + bytes(8)
                     + b"\0\0\0\x10mdat12345678")
    assert iso_cut_off(heif) is None
    text = tmp_path / "notes.mp4"
    text.write_text("ftyp, moov and mdat are words in this text\n")
    assert iso_cut_off(text) is None


def test_inspect_says_an_mp4_is_cut_short(tmp_path: Path) -> None:
    """An MP4 with its index first (faststart) cut short opens, and its header counts every frame: inspect says it
    is cut off rather than give that count alone as the file's (animate fails at the break, naming it)."""
    from media_fixtures import write_truncated_video

    from megactor_rt.describe import describe

    cut = write_truncated_video(tmp_path / "cut.mp4")
    report = describe(cut, faces=False)
    assert report["frames"] == 24
    assert re.fullmatch(r"it ends \d+ bytes short of the end of its mdat box: not all the frames and seconds its "
                        r"header counts are there", report["truncated"]), report


# ---------------------------------------------------------------------------------------------- orientation


def _corner_pattern(h: int = 72, w: int = 112) -> np.ndarray:
    """A picture that every quarter turn and mirror changes: three coloured corners, one dark."""
    img = np.full((h, w, 3), 20, np.uint8)
    img[:16, :16] = (255, 0, 0)
    img[:16, -16:] = (0, 255, 0)
    img[-16:, :16] = (0, 0, 255)
    return img


def _write_with_display_matrix(path: Path, frames: list[np.ndarray], degrees: int, hflip: bool = False,
                               vflip: bool = False) -> Path:
    """Near-lossless H.264 (qp 0, 4:4:4) whose container says: turn by ``degrees`` counter-clockwise,
    then mirror, to show it (PyAV's ``set_display_rotation``, as a phone writes its upright clips)."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        stream.options = {"qp": "0"}
        stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for f in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("degrees", [0, 90, 180, -90])
@pytest.mark.parametrize("hflip", [False, True])
def test_display_matrix_applied(tmp_path: Path, degrees: int, hflip: bool) -> None:
    """All eight orientations (four turns, each also mirrored) come out as a player shows them."""
    stored = _corner_pattern()
    clip = _write_with_display_matrix(tmp_path / "turned.mp4", [stored] * 3, degrees, hflip)
    shown = np.rot90(stored, degrees // 90)  # np.rot90 turns counter-clockwise
    if hflip:
        shown = shown[:, ::-1]
    frames = list(iter_video_frames(clip))
    assert len(frames) == 3
    for f in frames:
        assert f.shape == shown.shape and f.flags.c_contiguous
        assert np.abs(f.astype(int) - shown).max() <= 8  # colour conversion rounding only
    info = probe_video(clip)
    assert (info.height, info.width) == shown.shape[:2]
    np.testing.assert_array_equal(read_portrait(clip), frames[0])


def test_phone_matrix_is_a_clockwise_turn() -> None:
    """The matrix phones write for an upright clip recorded as landscape (ISO 14496-12 a=0, b=1, c=-1, d=0;
    ffprobe: 'rotation of -90.00 degrees'; the ffmpeg command line turns it clockwise)."""
    one, w = 1 << 16, 1 << 30
    orient = display_orientation(np.array([0, one, 0, -one, 0, 0, 0, 0, w], np.int32))
    img = _corner_pattern()
    np.testing.assert_array_equal(orient.apply(img), np.rot90(img, -1))
    upright = display_orientation(np.array([one, 0, 0, 0, one, 0, 0, 0, w], np.int32))
    assert upright.apply(img) is img  # no copy for the common case


def test_odd_display_angle_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    c, s = int(round(np.cos(np.radians(30)) * 65536)), int(round(np.sin(np.radians(30)) * 65536))
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        orient = display_orientation(np.array([c, s, 0, -s, c, 0, 0, 0, 1 << 30], np.int32), Path("odd.mp4"))
    img = _corner_pattern()
    assert orient.apply(img) is img
    assert "odd.mp4: display rotation of 30 degrees is not a quarter turn" in caplog.text


def test_turned_driver_gets_the_upright_crop(tmp_path: Path) -> None:
    """A driver stored sideways with a display matrix is planned like the same clip stored upright: the face
    is found and the crop is taken in the upright frame (a non-square clip, so a swapped size would show)."""
    from media_fixtures import face_frames

    from megactor_rt.runtime.driver import plan_driver

    upright = [np.pad(f, ((0, 0), (0, 64), (0, 0)), mode="edge") for f in face_frames(4, size=192)]  # 192x256
    straight = _write_with_display_matrix(tmp_path / "upright.mp4", upright, 0)
    sideways = _write_with_display_matrix(tmp_path / "sideways.mp4",
                                          [np.ascontiguousarray(np.rot90(f, 1)) for f in upright], -90)
    a, b = plan_driver(straight), plan_driver(sideways)
    assert (b.info.height, b.info.width) == (a.info.height, a.info.width) == (192, 256)
    assert b.num_frames == a.num_frames == 4
    assert np.abs(np.subtract(a.crop, b.crop)).max() <= 2, (a.crop, b.crop)


def test_a_driver_of_two_video_streams_says_which_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file of two video streams (a camera's second angle, a preview beside the picture) drives with the one
    FFmpeg chooses, and says so: inspect names the streams, a run warns that the other is not read (was: nothing,
    and a first stream without a face failed with "no face found in any of the frames" of a file that shows one)."""
    from megactor_rt.describe import describe
    from megactor_rt.runtime.driver import plan_driver

    clip = tmp_path / "two.mkv"
    with av.open(str(clip), "w") as c:
        small, large = c.add_stream("libx264", rate=25), c.add_stream("libx264", rate=25)
        for stream, size in ((small, 64), (large, 96)):
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
        for f in _frames(4, 96):
            c.mux(small.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[16:80, 16:80]), format="rgb24")))
            c.mux(large.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(small.encode(None))
        c.mux(large.encode(None))
    info = probe_video(clip)
    assert (info.width, info.stream, info.other_streams) == (64, "#0 (64x64)", ("#1 (96x96)",))
    assert describe(clip, faces=False)["video_streams"] == "2: #0 (64x64) is read, not #1 (96x96)"
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        plan_driver(clip, face_crop=False)
    assert "driver two.mkv has 2 video streams: the driver is its stream #0 (64x64), the one FFmpeg chooses; " \
           "#1 (96x96) is not read" in caplog.text
    caplog.clear()
    one = _write_clip(tmp_path / "one.mp4", n=4, size=64)  # (a sound stream beside it is no other picture)
    assert probe_video(one).other_streams == () and "video_streams" not in describe(one, faces=False)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        plan_driver(one, face_crop=False)
    assert "video streams" not in caplog.text


def test_inspect_says_an_animated_png_is_animated(tmp_path: Path) -> None:
    """An animated PNG (APNG: browsers, Discord and Telegram stickers) drives as the video FFmpeg reads it; inspect
    says so, with its rate and frames, as for an animated GIF (was: "kind: image", its first frame's size alone)."""
    from megactor_rt.describe import describe

    clip = tmp_path / "sticker.png"
    first, *rest = [Image.fromarray(f) for f in _frames(6, 96)]
    first.save(clip, save_all=True, append_images=rest, duration=40, loop=0)
    assert len(list(iter_video_frames(clip))) == 6 and probe_video(clip).fps == 25
    report = describe(clip, faces=False)
    assert (report["kind"], report["size"], report["fps"], report["frames"]) == ("animated PNG", "96x96", "25", 6)
    still = tmp_path / "still.png"
    first.save(still)
    assert describe(still, faces=False)["kind"] == "image"


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_an_animated_png_with_pauses_keeps_every_frame(tmp_path: Path, suffix: str) -> None:
    """An animated PNG that holds some frames (delays of 40, 200 and 500 ms) is read on a grid that puts each frame
    on a step of its own, as a GIF is, pauses repeating a frame (was: at its average rate, 7 fps, dropping 3 of its
    8 frames: those 40 ms apart shared a step)."""
    content = _frames(8, 64)
    clip = tmp_path / f"paused{suffix}"
    first, *rest = [Image.fromarray(f) for f in content]
    first.save(clip, save_all=True, append_images=rest, duration=[40, 40, 200, 40, 40, 500, 40, 40], loop=0)
    read = list(iter_video_frames(clip))
    nearest = [int(np.argmin([np.abs(r.astype(int) - c).mean() for c in content])) for r in read]
    assert sorted(set(nearest)) == list(range(8)) and nearest == sorted(nearest)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_an_animated_gif_or_png_with_pauses_is_read_at_its_common_delays_rate(tmp_path: Path, suffix: str,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A GIF or APNG of 40 ms frames that holds some (200 and 500 ms) is read at the rate of its most common delay,
    25 fps, as an animated WebP is, every frame kept in order, the pauses repeating one: its 940 ms are 24 frames
    (23.5 steps, the last frame shown to the end) (was: FFmpeg's nominal 50 fps, 47 frames computed of which 39
    repeats)."""
    content = _frames(8, 64)
    clip = tmp_path / f"paused{suffix}"
    first, *rest = [Image.fromarray(f) for f in content]
    first.save(clip, save_all=True, append_images=rest, duration=[40, 40, 200, 40, 40, 500, 40, 40], loop=0)
    assert probe_video(clip).fps == 25
    with caplog.at_level("INFO", logger="megactor_rt.media"):
        read = list(iter_video_frames(clip))
    # its pauses are said, without the advice of a lower --fps (which would drop frames of 40 ms)
    assert "the animation's pauses" in caplog.text and "--fps" not in caplog.text
    nearest = [int(np.argmin([np.abs(r.astype(int) - c).mean() for c in content])) for r in read]
    assert len(read) == 24 and sorted(set(nearest)) == list(range(8)) and nearest == sorted(nearest)


def test_a_gif_rate_that_would_put_two_frames_on_one_step_of_the_grid_is_not_taken(tmp_path: Path) -> None:
    """A GIF whose third frame falls half-way between two steps of its common delay's 25 fps (100 ms: 2.5 steps)
    and the next 30 ms later (3.25 steps): the reader's grid takes the half up, both on step 3, so 25 fps would drop
    the third; a rate that keeps every frame is read (was: the check took halves to the even step, Python's
    round(): 2 and 3, and the third frame was lost)."""
    delays = [40, 60, 30, 40, 40, 40, 40, 500]
    shades = _gif_driver(tmp_path / "halves.gif", delays)[1]
    assert sorted(set(shades)) == [i * 5 for i in range(len(delays))] and shades == sorted(shades)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_inspect_gives_a_variable_rate_clips_frames_in_a_run(tmp_path: Path, suffix: str) -> None:
    """A variable-rate clip (20 frames at 30 fps with two pauses) stores fewer frames than a run reads and writes on
    its constant-rate grid (a frame repeated over a gap): inspect gives both, the run's as the reader counts them
    (was: the stored 20 alone, and a run wrote 29); a constant-rate clip has no such line."""
    from megactor_rt.describe import describe

    ms = [0, 33, 67, 100, 133, 167, 200, 233, 400, 433, 467, 500, 533, 567, 600, 800, 833, 867, 900, 933]
    for name, times in (("vfr", ms), ("cfr", [round(i * 1000 / 30) for i in range(20)])):
        clip = tmp_path / f"{name}{suffix}"
        with av.open(str(clip), "w") as c:
            stream = c.add_stream("mpeg4" if suffix == ".mp4" else "mjpeg", rate=30)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p" if suffix == ".mp4" else "yuvj420p"
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
            for i, t in enumerate(times):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 10, np.uint8), format="rgb24")
                frame.pts, frame.time_base = t, Fraction(1, 1000)
                c.mux(stream.encode(frame))
            c.mux(stream.encode(None))
        report = describe(clip, faces=False)
        assert report["variable_rate"] is (name == "vfr")
        if name == "vfr":
            assert report["frames_in_a_run"] == len(list(iter_video_frames(clip))) == 29
        else:
            assert "frames_in_a_run" not in report


def test_inspect_gives_a_paused_gifs_frames_in_a_run(tmp_path: Path) -> None:
    """A GIF or APNG of 8 frames that pauses is read as 24 on its 25 fps grid: inspect says so beside its 8."""
    from megactor_rt.describe import describe

    images = [Image.fromarray(f) for f in _frames(8, 64)]
    for clip in (tmp_path / "paused.gif", tmp_path / "paused.png"):
        images[0].save(clip, save_all=True, append_images=images[1:], duration=[40, 40, 200, 40, 40, 500, 40, 40],
                       loop=0)
        report = describe(clip, faces=False)
        assert (report["frames"], report["variable_rate"], report["frames_in_a_run"]) == (8, True, 24)
        assert len(list(iter_video_frames(clip))) == 24


def test_inspect_gives_the_frames_in_a_run_of_a_gif_that_pauses_at_its_end_or_an_apng_at_its_start(
        tmp_path: Path) -> None:
    """A GIF of 20 40 ms frames whose last one is held 1 s, or an APNG whose first one is held 0.5 s, is no variable
    rate to its header or its frames' timestamps, yet a run reads 45 and 33 frames on its 25 fps grid: inspect says
    so beside the stored 21 (was: "frames: 21" alone); a GIF without a pause has no such line."""
    from megactor_rt.describe import describe

    images = [Image.fromarray(f) for f in _frames(21, 64)]
    for name, delays, run in (("end.gif", [40] * 20 + [1000], 45), ("start.png", [500] + [40] * 20, 33),
                              ("even.gif", [40] * 21, None)):
        clip = tmp_path / name
        images[0].save(clip, save_all=True, append_images=images[1:], duration=delays, loop=0)
        report = describe(clip, faces=False)
        assert (report["frames"], report["variable_rate"], report.get("frames_in_a_run")) == (21, False, run)
        assert len(list(iter_video_frames(clip))) == (run or 21)


def test_an_apng_that_holds_its_last_frame_keeps_the_hold(tmp_path: Path) -> None:
    """An APNG (a LINE or Telegram sticker) whose last frame is held 500 ms keeps that hold as a GIF does: 22 frames
    on its 25 fps grid, the last one 13 times (was: once, as FFmpeg gives an APNG no stream duration, so the result
    lost the sticker's final pose); inspect counts the same."""
    from megactor_rt.describe import describe

    content = _frames(6, 64)
    images = [Image.fromarray(f) for f in content]
    for clip in (tmp_path / "held.png", tmp_path / "held.gif"):
        images[0].save(clip, save_all=True, append_images=images[1:], duration=[40, 40, 200, 40, 40, 500], loop=0)
        read = list(iter_video_frames(clip))
        nearest = [int(np.argmin([np.abs(r.astype(int) - c).mean() for c in content])) for r in read]
        assert nearest == [0, 1] + [2] * 5 + [3, 4] + [5] * 13, clip.name
        assert describe(clip, faces=False)["frames_in_a_run"] == 22


def test_inspect_says_an_animated_gif_or_png_is_cut_off(tmp_path: Path) -> None:
    """An animated GIF or PNG cut short (a partial download) is said to be, beside the frames it still holds (was:
    its frame count alone, as if whole; a run warns of the GIF and fails at the PNG's break); whole ones are not."""
    from megactor_rt.describe import describe

    first, *rest = [Image.fromarray(f) for f in _frames(8, 96)]
    for name, says in (("meme.gif", "it lacks the byte that ends a GIF"),
                       ("sticker.png", "it lacks the chunk that ends a PNG, IEND")):
        whole, cut = tmp_path / name, tmp_path / f"cut_{name}"
        first.save(whole, save_all=True, append_images=rest, duration=40, loop=0)
        cut.write_bytes(whole.read_bytes()[:-40])
        assert "truncated" not in describe(whole, faces=False)
        report = describe(cut, faces=False)
        assert report["kind"].startswith("animated") and report["frames"] > 0
        assert report["truncated"] == f"{says} (a partial download or copy?)"


def test_an_animated_gif_or_png_with_bytes_after_its_end_is_whole(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A GIF or APNG with bytes after its end (its trailer byte, its IEND chunk: a tool's padding, something
    appended) is whole: inspect does not call it cut off and a run does not warn (was: judged by its last bytes)."""
    from megactor_rt.describe import describe

    first, *rest = [Image.fromarray(f) for f in _frames(8, 96)]
    for name in ("meme.gif", "sticker.png"):
        whole, padded = tmp_path / name, tmp_path / f"padded_{name}"
        first.save(whole, save_all=True, append_images=rest, duration=40, loop=0)
        padded.write_bytes(whole.read_bytes() + b"\0\0\0\n")
        assert "truncated" not in describe(padded, faces=False), name
        cut = tmp_path / f"cut_{name}"  # (cut, then padded: still cut)
        cut.write_bytes(whole.read_bytes()[:-40] + b"\0\0\0\n")
        assert "truncated" in describe(cut, faces=False), name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        assert len(list(iter_video_frames(tmp_path / "padded_meme.gif"))) == 8
    assert "truncated" not in caplog.text


# ---------------------------------------------------------------------------------------------- audio offset


def _marker_audio(path: Path, codec: str, rate: int = 16000) -> Path:
    """2 s of mono audio: silent for the first second, a loud tone in the second (AAC in .m4a is copied
    into an MP4; PCM in .mkv must be transcoded)."""
    wave = np.zeros(2 * rate, np.float32)
    wave[rate:] = 0.5 * np.sin(np.arange(rate) * 2 * np.pi * 440 / rate)
    with av.open(str(path), "w") as c:
        aus = c.add_stream(codec, rate=rate)
        aus.layout = "mono"
        fmt, data = ("fltp", wave[None]) if codec == "aac" else ("s16", (wave * 32767).astype(np.int16)[None])
        for start in range(0, 2 * rate, 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + 1024]), format=fmt,
                                            layout="mono")
            af.sample_rate, af.pts = rate, start
            c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    return path


def _audio_level(path: Path, first_s: float, last_s: float) -> float:
    """RMS of the decoded audio between two times of the file."""
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray().astype(np.float32).reshape(-1) for f in c.decode(c.streams.audio[0])]
        rate = c.streams.audio[0].codec_context.sample_rate
    pcm = np.concatenate(chunks)
    pcm = pcm / 32767 if np.abs(pcm).max() > 2 else pcm
    part = pcm[int(first_s * rate): int(last_s * rate)]
    return float(np.sqrt(np.mean(part ** 2)))


@pytest.mark.parametrize("codec,suffix", [("aac", ".m4a"), ("pcm_s16le", ".mkv")])
def test_audio_offset_carries_the_audio_from_there(tmp_path: Path, codec: str, suffix: str) -> None:
    """audio_offset=1 s: the result's audio is the source's second second (the tone) from its start, and
    lasts as long as the video; without an offset it begins with the silent first second."""
    src = _marker_audio(tmp_path / f"marker{suffix}", codec)
    levels = {}
    for offset in (Fraction(0), Fraction(1)):
        out = tmp_path / f"out_{offset}.mp4"
        with VideoWriter(out, Fraction(25), 64, 64, audio_source=src, audio_offset=offset) as w:
            for f in _frames(20):  # 0.8 s
                w.write(f)
        with av.open(str(out)) as c:
            a = c.streams.audio[0]
            audio_s = float(a.duration * a.time_base)
        assert 0.75 < audio_s < 0.9, audio_s  # 0.8 s (whole AAC packets / priming)
        levels[offset] = (_audio_level(out, 0.1, 0.7))
    assert levels[Fraction(0)] < 0.01 and levels[Fraction(1)] > 0.2, levels
    with pytest.raises(ValueError, match="audio_offset must be >= 0"):
        VideoWriter(tmp_path / "x.mp4", Fraction(25), 64, 64, audio_offset=Fraction(-1))


def _tone_after(path: Path, codec: str, seconds: int, tone_from: int, rate: int) -> Path:
    """``seconds`` of mono audio, silent up to ``tone_from`` s, then a 440 Hz tone that rises in loudness (so
    a misplaced start shows), in whatever container ``path`` names."""
    n = seconds * rate
    t = np.arange(n) / rate
    wave = np.where(t >= tone_from, 0.1 + 0.4 * (t - tone_from) / (seconds - tone_from), 0.0)
    wave = (wave * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as c:
        aus = c.add_stream(codec, rate=rate)
        aus.layout = "mono"
        step = aus.codec_context.frame_size or 1024
        fmt = aus.codec_context.format.name
        for start in range(0, n, step):
            part = wave[start:start + step]
            data = (part * 32767).astype(np.int16)[None] if fmt.startswith("s16") else part[None]
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout="mono")
            af.sample_rate, af.pts = rate, start
            c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    return path


def _audio_track(path: Path) -> tuple[list[bytes], np.ndarray]:
    """The audio packets' bytes and the decoded samples of a result."""
    with av.open(str(path)) as c:
        packets = [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]
    with av.open(str(path)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    return packets, pcm


@pytest.mark.parametrize("codec,suffix,rate", [("aac", ".m4a", 16000), ("opus", ".mkv", 48000)])
def test_a_late_audio_offset_seeks_and_carries_the_same_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              codec: str, suffix: str, rate: int) -> None:
    """12.4 s into the audio (past AUDIO_SEEK_MIN_S) the audio is read from a seek: the result's audio equals
    the one read from the beginning - AAC copied packet for packet, Opus (not storable in MP4) transcoded to
    the same samples - also when the seek fails and the writer starts again from the beginning."""
    src = _tone_after(tmp_path / f"tone{suffix}", codec, 16, 12, rate)
    offset = Fraction(62, 5)
    assert offset >= media.AUDIO_SEEK_MIN_S

    def result(name: str) -> tuple[list[bytes], np.ndarray]:
        out = tmp_path / f"{name}.mp4"
        with VideoWriter(out, Fraction(25), 64, 64, audio_source=src, audio_offset=offset) as w:
            for f in _frames(30):  # 1.2 s
                w.write(f)
        return _audio_track(out)

    seeks: list[int] = []
    clock = VideoWriter._audio_clock

    def counted(self: VideoWriter, source: object, stream: object, seek: bool) -> object:
        seeks.append(seek)
        return clock(self, source, stream, seek)  # type: ignore[arg-type]

    monkeypatch.setattr(VideoWriter, "_audio_clock", counted)
    sought = result("sought")
    assert seeks == [True]
    monkeypatch.setattr(media, "AUDIO_SEEK_MIN_S", Fraction(10**6))
    whole = result("whole")
    assert seeks == [True, False]
    assert sought[0] == whole[0] and np.array_equal(sought[1], whole[1])
    level = float(np.sqrt(np.mean(whole[1].astype(np.float64) ** 2)))
    assert level > 0.05  # the tone, which starts at 12 s: the audio is from the offset on

    def failing(self: VideoWriter, source: object, stream: object, seek: bool) -> object:
        seeks.append(seek)
        if seek:
            raise media._SeekFailed("test")
        return clock(self, source, stream, seek)  # type: ignore[arg-type]

    monkeypatch.setattr(media, "AUDIO_SEEK_MIN_S", Fraction(10))
    monkeypatch.setattr(VideoWriter, "_audio_clock", failing)
    fell_back = result("fell_back")
    assert seeks[2:] == [True, False]
    assert fell_back[0] == whole[0] and np.array_equal(fell_back[1], whole[1])


# ---------------------------------------------------------------------------------------------- --start: seeking


def _numbered_clip(path: Path, codec: str, rate: Fraction | int, n: int = 96, gop: int = 12,
                   options: dict[str, str] | None = None) -> Path:
    """A clip whose frame i shows i in binary blocks (plus a moving square), a key frame every ``gop``."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=rate, options=options or {})
        vs.width, vs.height, vs.pix_fmt = 96, 64, "yuv420p"
        vs.gop_size = gop
        for i in range(n):
            f = np.full((64, 96, 3), 30, np.uint8)
            for b in range(8):
                if (i >> b) & 1:
                    f[8:24, 4 + 11 * b:13 + 11 * b] = 240
            f[40:56, (i * 5) % 80:(i * 5) % 80 + 16] = (250, 120, 10)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(vs.encode(None))
    return path


_SEEK_CLIPS = {  # B-frames and decoding-time key frame index (mp4), open GOPs and ms timestamps (mkv), ...
    "h264.mp4": ("libx264", 30, {}),
    "h264-open-gop-2997.mkv": ("libx264", Fraction(30000, 1001), {"x264-params": "open-gop=1"}),
    "mpeg4.avi": ("mpeg4", 25, {}),
    "vp9.webm": ("libvpx-vp9", 30, {}),
    # x265's open GOPs: a seek for frame 11 lands on key frame 12 (indexed by decoding time), so aim earlier
    "hevc.mp4": ("libx265", 30, {"x265-params": "log-level=error"}),
}


@pytest.mark.parametrize("name", sorted(_SEEK_CLIPS))
def test_start_seeks_to_a_key_frame_and_gives_the_same_frames(tmp_path: Path, name: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    codec, rate, options = _SEEK_CLIPS[name]
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    clip = _numbered_clip(tmp_path / name, codec, rate, options=options)
    full = list(iter_video_frames(clip))
    assert len(full) == 96
    monkeypatch.setattr(media, "SEEK_MIN_SKIP", 1)  # seek for every start
    for skip in (1, 11, 12, 13, 50, 77, 95):
        with caplog.at_level(logging.DEBUG, logger="megactor_rt.media"):
            caplog.clear()
            got = list(iter_video_frames(clip, skip=skip))
        assert len(got) == 96 - skip, skip
        assert all(np.array_equal(a, b) for a, b in zip(got, full[skip:])), skip
        landed = [r.args[1] for r in caplog.records if r.getMessage().startswith("seek to frame")]
        assert len(landed) == 1 and 0 <= landed[0] <= skip, (skip, landed)
        if skip >= 50:  # decoding started at a key frame well after the clip's first frame
            assert landed[0] >= 24, (skip, landed)
        assert not any("cannot seek" in r.getMessage() for r in caplog.records)
    got = list(iter_video_frames(clip, 5, skip=77))
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, full[77:82]))
    assert list(iter_video_frames(clip, skip=120)) == []  # past the end: nothing (plan_driver says why)


def test_start_decodes_from_the_beginning_where_seeking_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    clip = _numbered_clip(tmp_path / "clip.mp4", "libx264", 25)
    full = list(iter_video_frames(clip))

    def fail(*args: object) -> None:
        raise media._SeekFailed("not seekable here")

    monkeypatch.setattr(media, "SEEK_MIN_SKIP", 1)
    monkeypatch.setattr(media._FrameClock, "seek", fail)
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"):
        got = list(iter_video_frames(clip, skip=40))
    assert len(got) == 56 and all(np.array_equal(a, b) for a, b in zip(got, full[40:]))
    assert any("cannot seek to frame 40 (not seekable here)" in r.getMessage() for r in caplog.records)


def test_start_in_a_truncated_clip_reports_as_without_seeking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    src = tmp_path / "full.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(src), "w", options={"movflags": "faststart"}) as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width = vs.height = 64
        vs.gop_size = 12
        for _ in range(96):  # noise: half the bytes hold about half the frames
            c.mux(vs.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), np.uint8), format="rgb24")))
        c.mux(vs.encode(None))
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])

    def outcome(skip: int, seek_from: int) -> tuple[int, str]:
        monkeypatch.setattr(media, "SEEK_MIN_SKIP", seek_from)
        got = []
        with pytest.raises(InputError) as info:
            for f in iter_video_frames(cut, skip=skip):
                got.append(f)
        return len(got), str(info.value)

    for skip in (20, 80):  # before and after the break
        assert outcome(skip, 1) == outcome(skip, 10**9), skip
    n, message = outcome(80, 1)
    assert n == 0 and "breaks off before the first frame used (--start)" in message


def _write_numbered_vfr(clip: Path, times: list[float], rate: int | Fraction = 30, last_s: float | None = None,
                        noise: bool = False, first: int = 0) -> None:
    """Frame i at ``times[i]`` seconds (a 1 ms clock), its number written in 8 bright bars (see _frame_number);
    ``rate``: the nominal rate in the header; ``last_s``: how long the last frame is shown (its packet's
    duration); ``noise``: random pixels around the bars (big frames, so a cut file loses many); ``first``: the
    first frame's number."""
    rng = np.random.default_rng(0)
    with av.open(str(clip), "w") as c:
        vs = c.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = 96, 64, "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        vs.gop_size = 12
        vs.codec_context.max_b_frames = 0
        packets = []
        for i, t in enumerate(times, first):
            f = rng.integers(0, 100, (64, 96, 3), np.uint8) if noise else np.full((64, 96, 3), 30, np.uint8)
            f[8:24] = 30
            for b in range(8):
                if (i >> b) & 1:
                    f[8:24, 4 + 11 * b:13 + 11 * b] = 240
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            packets += vs.encode(frame)
        packets += vs.encode(None)
        if last_s is not None:
            packets[-1].duration = round(last_s / packets[-1].time_base)
        for packet in packets:
            c.mux(packet)


def _frame_number(rgb: np.ndarray) -> int:
    return sum(1 << b for b in range(8) if rgb[16, 8 + 11 * b].mean() > 128)


def _slot(t: float, fps: Fraction) -> int:
    """The grid slot of a frame at ``t`` s (1 ms clock): halves round up."""
    return math.floor(Fraction(round(t * 1000), 1000) * fps + Fraction(1, 2))


def test_a_variable_rate_clip_keeps_its_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames are placed by timestamp on a constant-rate grid: output frame k is the frame on screen k / fps
    seconds in, so a stretch recorded at half the rate has each frame twice and the clip lasts as long as it
    did (was: frames counted, the slow stretch played at double speed and ran ahead of the audio). A start is
    a slot of the same grid, with or without seeking."""
    times = [i / 30 for i in range(30)] + [1 + k / 15 for k in range(30)]  # 30 fps for 1 s, then 15 fps
    for name in ("vfr.mkv", "vfr.mp4"):  # Matroska: no average rate; MP4: average 20 fps, nominal 30 fps
        clip = tmp_path / name
        _write_numbered_vfr(clip, times)
        info = probe_video(clip)
        assert info.fps == 30 and info.variable_rate == name.endswith(".mp4")
        full = [_frame_number(f) for f in iter_video_frames(clip)]
        slots = [_slot(t, info.fps) for t in times]
        assert full == [max(i for i, s in enumerate(slots) if s <= k) for k in range(len(full))]
        assert full[:30] == list(range(30)) and full[30:36] == [30, 30, 31, 31, 32, 32]
        assert len(full) in (89, 90)  # up to the stream's end where the container says it (MP4: 1/15 s after)
        for seek_from in (10**9, 1):  # decoding from the beginning, and seeking: the same frames
            monkeypatch.setattr(media, "SEEK_MIN_SKIP", seek_from)
            for skip in (10, 40, 41, 50, 88):
                got = [_frame_number(f) for f in iter_video_frames(clip, skip=skip)]
                assert got == full[skip:], (name, seek_from, skip)
            assert [_frame_number(f) for f in iter_video_frames(clip, 5, skip=41)] == full[41:46]
            assert list(iter_video_frames(clip, skip=len(full))) == []
        monkeypatch.setattr(media, "SEEK_MIN_SKIP", 60)


def test_inspect_says_a_matroska_clip_varies_its_rate(tmp_path: Path) -> None:
    """A Matroska/WebM header does not tell a variable rate (FFmpeg gives the nominal rate as the average); inspect
    reads it from the frames' timestamps (was: "variable rate: False" for a clip whose run repeats frames to keep
    its timing), and a constant rate on a millisecond clock (33, 33, 34 ms) is none."""
    from megactor_rt.describe import describe
    from megactor_rt.media import timestamps_vary

    vfr = tmp_path / "vfr.mkv"
    _write_numbered_vfr(vfr, [i / 30 for i in range(30)] + [1 + k / 15 for k in range(30)])
    assert not probe_video(vfr).variable_rate  # (the header's view, unchanged)
    assert timestamps_vary(vfr, Fraction(30)) and describe(vfr, faces=False)["variable_rate"] is True
    steady = tmp_path / "steady.mkv"
    _write_numbered_vfr(steady, [i * 1001 / 30000 for i in range(600)], rate=Fraction(30000, 1001))
    webm = tmp_path / "steady.webm"
    with VideoWriter(webm, Fraction(30), 64, 64) as w:
        for f in _frames(40):
            w.write(f)
    for clip in (steady, webm):
        assert describe(clip, faces=False)["variable_rate"] is False, clip.name
    assert not timestamps_vary(DRIVER, Fraction(1))  # (an MP4's header tells: not read again)


def test_a_steady_matroska_clip_with_b_frames_does_not_vary(tmp_path: Path) -> None:
    """A constant-rate Matroska clip longer than the timestamps read (1200) whose frames are stored out of order
    (B-frames: a later frame's packet before those shown ahead of it) keeps a constant rate in inspect (was: the
    last packets read left a step empty, 'variable rate: True')."""
    from megactor_rt.describe import describe

    clip = tmp_path / "steady_b.mkv"
    with av.open(str(clip), "w") as c:
        vs = c.add_stream("mpeg2video", rate=30)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        vs.codec_context.max_b_frames, vs.codec_context.gop_size = 2, 12
        rng = np.random.default_rng(0)
        for _ in range(1210):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), np.uint8), format="rgb24")
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
    assert describe(clip, faces=False)["variable_rate"] is False


def test_inspect_of_a_matroska_clip_cut_after_its_frames_says_they_are_all_there(tmp_path: Path) -> None:
    """A Matroska clip cut after its last frame (its index, Cues, and tags at the end are missing: a download cut
    in its last KB) holds every frame, as a run reads them: inspect says so (was: 'not all the seconds its header
    counts are there')."""
    from megactor_rt.describe import describe

    whole = tmp_path / "whole.mkv"
    _write_numbered_vfr(whole, [i / 30 for i in range(90)])
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:data.rindex(b"\x1c\x53\xbb\x6b") + 4])  # (up to its Cues' ID)
    assert len(list(iter_video_frames(cut))) == 90
    report = describe(cut, faces=False)
    assert report["frames"] == 90
    assert report["truncated"].endswith("Segment: its frames are all there, not what follows them (an index, tags)")


def test_a_short_matroska_clip_cut_in_half_is_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Matroska clip of a second, cut at 60 % (a partial download), ends its frames under a second before its
    declared end, which a variable rate may explain in a whole file; its Segment, longer than the file, says it was
    cut: reading refuses it as any cut clip (was: its first 0.4 s animated as the whole), and inspect says so."""
    from megactor_rt.describe import describe
    from megactor_rt.media import matroska_cut_off

    whole = tmp_path / "whole.mkv"
    _write_numbered_vfr(whole, [i / 30 for i in range(30)], noise=True)
    assert len(list(iter_video_frames(whole))) == 30 and matroska_cut_off(whole) is None
    assert "truncated" not in describe(whole, faces=False)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size * 6 // 10])
    assert re.fullmatch(r"it ends \d+ bytes short of the end of its Segment", matroska_cut_off(cut) or "")
    with pytest.raises(InputError, match=re.escape(f"{cut}: video is truncated: its header says it lasts until ")):
        list(iter_video_frames(cut))
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        assert 0 < len(list(iter_video_frames(cut, strict=False))) < 25
    assert "video is truncated" in caplog.text
    assert describe(cut, faces=False)["truncated"].endswith("Segment: not all the seconds its header counts are there")


def test_a_faster_stretch_keeps_evenly_spaced_frames(tmp_path: Path) -> None:
    """60 fps for a second on a 30 fps grid: every other frame, evenly (of the frames on one grid step, the
    nearest to its time; how a frame exactly half-way is placed: test_a_frame_half_way_between_two_grid_steps_
    takes_the_later_step). Reading M frames gives the first M of the whole read."""
    times = [i / 30 for i in range(30)] + [1 + k / 60 for k in range(60)]
    clip = tmp_path / "fast.mkv"
    _write_numbered_vfr(clip, times)
    full = [_frame_number(f) for f in iter_video_frames(clip)]
    assert full[:30] == list(range(30))
    assert full[30:] == list(range(30, 90, 2)) + [89][: len(full) - 60]
    for m in (29, 31, 44, 45):
        assert [_frame_number(f) for f in iter_video_frames(clip, m)] == full[:m]


def test_a_long_last_frame_lasts_to_the_streams_end(tmp_path: Path) -> None:
    """A recording whose last frame stays on screen for a second (a paused screen recording): the grid runs to
    the stream's declared end, so the result lasts as long as the clip (and keeps that much of its audio), and
    a start inside the last frame's time is a frame; its nominal 30 fps is the grid's rate, not the 20 fps
    average the long frame pulls the header's average down to."""
    from megactor_rt.runtime.driver import plan_driver

    clip = tmp_path / "paused.mp4"
    _write_numbered_vfr(clip, [i / 30 for i in range(60)], last_s=1.0)
    info = probe_video(clip)
    assert info.fps == 30 and info.num_frames == 60 and abs(info.duration_s - 2.967) < 0.01
    got = [_frame_number(f) for f in iter_video_frames(clip)]
    assert got[:60] == list(range(60)) and set(got[59:]) == {59} and len(got) == 89
    plan = plan_driver(clip, face_crop=False, start=2.5)
    assert plan.num_frames == 14


def test_a_recording_that_freezes_for_seconds_keeps_its_rate_and_every_frame(tmp_path: Path) -> None:
    """A 30 fps recording whose picture freezes for 4 s (a video call that stalls, a recording paused and resumed):
    its header's average, 7.5 fps, is under a quarter of its nominal 30, yet nearly all its frames come 1/30 s apart,
    so the grid is at 30 fps: every frame once, in order, the freeze repeating one (was: the average, 7.5 fps, which
    dropped three of every four frames of its motion). A static screen recording keeps its average rate."""
    clip = tmp_path / "frozen.mp4"
    times = [i / 30 for i in range(30)] + [5 + i / 30 for i in range(10)]
    _write_numbered_vfr(clip, times)
    with av.open(str(clip)) as c:
        assert c.streams.video[0].base_rate / c.streams.video[0].average_rate > 3
    assert probe_video(clip).fps == 30
    got = [_frame_number(f) for f in iter_video_frames(clip)]
    assert sorted(set(got)) == list(range(40)) and got == sorted(got)
    # a static screen recording, whose frames come 6 to 21 frame times apart but for a few: still its average rate
    steps = [1, 1, 1, 6, 15, 9, 21, 12, 7, 18, 10, 8, 14, 20, 6, 11, 9]
    _write_numbered_vfr(clip, [sum(steps[:k]) / 30 for k in range(len(steps) + 1)])
    assert 3 < probe_video(clip).fps < 4


def test_a_short_animation_with_pauses_keeps_every_frame(tmp_path: Path) -> None:
    """Six 40 ms frames of which one is held 200 ms and the last 500 ms (an animated AVIF or a sticker as an MP4):
    its average, 7 fps, is far below its nominal 25, and most of its few steps are at 25 fps, so the grid is at 25 fps
    and every frame is shown (was: too few frames to tell, so the average, which dropped frames 1 and 4)."""
    clip = tmp_path / "sticker.mp4"
    _write_numbered_vfr(clip, [0, 0.04, 0.08, 0.28, 0.32, 0.36], rate=25, last_s=0.5)
    assert probe_video(clip).fps == 25
    got = [_frame_number(f) for f in iter_video_frames(clip)]
    assert sorted(set(got)) == list(range(6)) and got == sorted(got)


def test_a_constant_rate_mp4_with_an_odd_last_sample_keeps_every_frame(tmp_path: Path) -> None:
    """30 fps frames whose last MP4 sample lasts 1 ms: the header's average is 30.19 fps; the grid takes the
    nominal 30 fps, so each frame once (at the average one would be dropped and others repeated)."""
    clip = tmp_path / "short_last.mp4"
    _write_numbered_vfr(clip, [i / 30 for i in range(150)], last_s=0.001)
    with av.open(str(clip)) as c:
        assert float(c.streams.video[0].average_rate) > 30.1
    assert probe_video(clip).fps == 30
    assert [_frame_number(f) for f in iter_video_frames(clip)] == list(range(150))


def test_timestamps_that_jump_back_follow_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two MPEG-TS recordings joined byte for byte (each with its own clock, as HLS segments or DVR files put
    together): where the timestamps jump back, the frames follow on from the next grid step, with a warning
    (was: every later frame landed on a step already passed, and half the clip vanished silently)."""
    parts = [tmp_path / "a.ts", tmp_path / "b.ts"]
    for i, part in enumerate(parts):
        _write_numbered_vfr(part, [k / 30 for k in range(30)], first=30 * i)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        got = [_frame_number(f) for f in iter_video_frames(joined, strict=False)]
    assert got == list(range(60)) and "timestamps jump back" in caplog.text


def test_jittered_timestamps_read_as_twice_their_rate_are_read_at_half_of_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frames 33 ms apart, every 4th 15 ms late, on a 1 ms clock: FFmpeg's nominal rate is 60 fps, under twice
    the average. Most steps between the timestamps are two or more 60 fps frame times, so the grid is at 30 fps
    and the frames come about once each (was: 60 fps, every frame twice, each computed again)."""
    clip = tmp_path / "jitter.mp4"
    _write_numbered_vfr(clip, sorted({int(i * 33.3 + (15 if i % 4 == 0 else 0)) / 1000 for i in range(45)}))
    with av.open(str(clip)) as c:
        assert c.streams.video[0].base_rate == 60  # what FFmpeg makes of these timestamps
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"):
        assert probe_video(clip).fps == 30
        got = [_frame_number(f) for f in iter_video_frames(clip)]
    assert len(got) == 45 and got == sorted(got) and len(set(got)) >= 40  # a few slip a step: the anchor is late
    assert caplog.text.count("twice the rate of most of its frames' timestamps") == 1  # once for both passes
    assert "come much slower" not in caplog.text


def test_vsync_locked_capture_is_read_at_its_frame_rate(tmp_path: Path) -> None:
    """A 30 fps capture whose frames land on a 60 Hz clock (steps of 33, 50 and 17 ms, as webcams and screen
    recorders deliver them; FFmpeg's nominal rate 60, just over twice the average): read at 30 fps (was: the
    average, 29.997 fps). A frame 50 ms after the one before is half a step late and shares the next frame's
    step, one of the two shown (as ``ffmpeg -r 30`` does)."""
    steps = [2, 2, 3, 1, 2, 2, 2, 3, 1, 2] * 9
    times = [sum(steps[:k]) / 60 for k in range(len(steps))]
    clip = tmp_path / "vsync.mp4"
    _write_numbered_vfr(clip, times)
    got = [_frame_number(f) for f in iter_video_frames(clip)]
    assert probe_video(clip).fps == 30 and abs(len(got) - len(times)) <= 2 and got == sorted(got)
    assert len(set(got)) >= 0.8 * len(times)


def test_a_grid_much_finer_than_the_frames_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A clip at 60 fps for 0.4 s, then 30 fps: the nominal 60 fps grid is right for 40 % of its steps, so it is
    kept, and the 30 fps part repeats every frame. Said in a warning that names --fps (was: silent)."""
    clip = tmp_path / "mixed.mp4"
    _write_numbered_vfr(clip, [k / 60 for k in range(24)] + [0.4 + k / 30 for k in range(36)])
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        frames = list(iter_video_frames(clip))
    assert probe_video(clip).fps == 60 and len(frames) == 96
    assert "come much slower than its header's 60.000 fps (36 of 96" in caplog.text and "--fps F" in caplog.text


def test_a_cut_variable_rate_clip_is_truncated(tmp_path: Path) -> None:
    """A variable-rate MP4 (10 fps, then 50 fps) cut cleanly at a packet: strict reading refuses it by its
    real decoded count, and the --max-frames it names (grid frames, not decoded ones) reads what is there."""
    times = [k / 10 for k in range(50)] + [5 + k / 50 for k in range(250)]
    src = tmp_path / "whole.mp4"
    with av.open(str(src), "w", options={"movflags": "+faststart"}) as c:
        vs = c.add_stream("libx264", rate=50)
        vs.width = vs.height = 64
        vs.pix_fmt, vs.gop_size = "yuv420p", 12
        vs.codec_context.time_base = Fraction(1, 1000)
        rng = np.random.default_rng(0)
        for t in times:
            f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
    with av.open(str(src)) as c:
        at = sorted(p.pos for p in c.demux(c.streams.video[0]) if p.pos is not None and p.pos >= 0)[200]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(src.read_bytes()[:at])  # the first 200 frames, complete
    with pytest.raises(InputError, match=r"announces 300 frames but only 200 decode; --max-frames (\d+) ") as info:
        list(iter_video_frames(cut))
    n = int(re.search(r"--max-frames (\d+) ", str(info.value)).group(1))  # type: ignore[union-attr]
    assert len(list(iter_video_frames(cut, n))) == n > 200  # grid frames: the slow stretch repeats


def test_a_stream_cut_mid_gop_starts_at_its_first_decodable_frame(tmp_path: Path) -> None:
    """An MPEG-TS whose video starts with frames that need the ones before them (cut between key frames): the
    clip starts, for the result and its audio, at the first frame that decodes, not at the stream's start
    (was: the stream's start, so the audio of the frames that do not decode played under the first one)."""
    src = tmp_path / "src.mkv"
    _write_numbered_vfr(src, [i / 25 for i in range(75)])
    ts = tmp_path / "cut.ts"
    with av.open(str(src)) as i, av.open(str(ts), "w") as o:
        vi = i.streams.video[0]
        vo = o.add_stream_from_template(vi)
        for n, packet in enumerate(p for p in i.demux(vi) if p.dts is not None):
            if n >= 3:  # the key frame and 2 more dropped: frames until the next key frame cannot decode
                packet.stream = vo
                o.mux(packet)
    with av.open(str(ts)) as c:
        v = c.streams.video[0]
        stream_start = Fraction(v.start_time * v.time_base)
        first = next(c.decode(v))
        first_s, first_number = Fraction(first.pts * first.time_base), _frame_number(first.to_ndarray(format="rgb24"))
    assert first_s > stream_start  # the stream's first frames do not decode
    assert probe_video(ts).start_s == first_s
    assert _frame_number(next(iter_video_frames(ts, strict=False))) == first_number
    assert probe_video(DRIVER).start_s == 0


def test_a_clip_whose_edit_list_hides_frames_is_complete(tmp_path: Path) -> None:
    """An MP4 whose edit list hides its first 10 of 100 coded frames (what a stream-copy cut on a non-key
    frame writes): its header counts 100 samples, 90 are shown and decode, and the last one reaches the
    stream's end, so the clip is complete, not truncated (was: refused as truncated)."""
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width = vs.height = 64
        vs.pix_fmt, vs.gop_size = "yuv420p", 200
        vs.codec_context.time_base = Fraction(1, 25)
        for i in range(100):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 2, np.uint8), format="rgb24")
            f.pts, f.time_base = i - 10, Fraction(1, 25)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 100
    assert len(list(iter_video_frames(path))) == 90
    assert len(list(iter_video_frames(path, skip=40))) == 50


def _noise_clip(path: Path, codec: str, options: dict[str, str] | None = None) -> Path:
    """100 frames of 64 px noise at 25 fps (hard to compress: cutting the file at half cuts its frames at half)."""
    with av.open(str(path), "w", options=options or {}) as c:
        vs = c.add_stream(codec, rate=25)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        for i in range(100):
            f = av.VideoFrame.from_ndarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8),
                                           format="rgb24")
            f.pts = i
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
    return path


def test_a_clip_cut_off_midway_is_still_truncated(tmp_path: Path) -> None:
    """The other side of the check above: an MP4 with its index in front (faststart) whose data is cut off
    at half: decoding ends early in time as well as in frames, so it is refused as truncated."""
    path = _noise_clip(tmp_path / "whole.mp4", "libx264", {"movflags": "+faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.mp4.*truncated"):
        list(iter_video_frames(cut))


@pytest.mark.parametrize("suffix,codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_a_matroska_clip_cut_off_midway_is_truncated(tmp_path: Path, suffix: str, codec: str) -> None:
    """Matroska and WebM count no frames in their header: a copy cut off at half (a partial download), whose
    frames end long before the track's declared end (its DURATION tag), is refused as truncated, not animated
    short; the whole file is taken."""
    path = _noise_clip(tmp_path / f"whole{suffix}", codec)
    assert len(list(iter_video_frames(path))) == 100
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"cut{suffix}: video is truncated: its header says it lasts until 4.0"):
        list(iter_video_frames(cut))


@pytest.mark.parametrize("suffix,codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9"), (".mp4", "libx264")])
def test_a_clip_cut_off_inside_its_first_frame_is_said_to_be_cut_off(tmp_path: Path, suffix: str, codec: str) -> None:
    """A copy cut off before its first whole frame (a download stopped in its first KB; an MP4 with its index in
    front) has no frame to decode: said to be cut off, as a driver, a portrait and in inspect (was: "the video
    stream contains no decodable frames" alone, and inspect without faces called it a video of 0 frames)."""
    from megactor_rt.describe import describe

    path = _noise_clip(tmp_path / f"whole{suffix}", codec, {"movflags": "+faststart"} if suffix == ".mp4" else None)
    data = path.read_bytes()
    first = data.index(b"\x1f\x43\xb6\x75" if suffix != ".mp4" else b"mdat")  # (its first Cluster, its frames)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:first + 200])  # (a 64 px noise frame: some 6 KB)
    says = re.escape(f"{cut}: ") + r"(the video stream contains no decodable frames|no decodable video frame \(.*\))" \
        + re.escape(": the file is cut off (it ends ")
    for read in (lambda p: list(iter_video_frames(p)), read_portrait, describe):
        with pytest.raises(InputError, match=says):
            read(cut)


def test_a_gif_without_its_last_byte_is_said_to_be_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), (20 * i, 0, 0)) for i in range(6)]
    whole, cut = tmp_path / "whole.gif", tmp_path / "cut.gif"
    frames[0].save(whole, save_all=True, append_images=frames[1:], duration=40, loop=0)
    cut.write_bytes(whole.read_bytes()[:-1])  # (a download cut after a whole frame: it decodes cleanly)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        assert len(list(iter_video_frames(whole))) == 6 and "truncated" not in caplog.text
        assert len(list(iter_video_frames(cut))) == 6
    assert "cut.gif: the GIF may be truncated" in caplog.text


def _clip_with_offset_audio(path: Path, acodec: str, video_start: float, audio_start: float) -> None:
    """1 s of 10 fps video from ``video_start``; 2 s of mono audio from ``audio_start``, silent before the
    video's first frame and a tone from then on (absolute times on the container's clock)."""
    rate = 16000
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=10)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = Fraction(1, 10)
        aus = c.add_stream(acodec, rate=rate)
        aus.layout = "mono"
        t = audio_start + np.arange(2 * rate) / rate
        wave = np.where(t >= video_start, 0.5 * np.sin(t * 2 * np.pi * 440), 0).astype(np.float32)
        packets = []
        for i in range(10):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = round(video_start * 10) + i, Fraction(1, 10)
            packets += vs.encode(f)
        packets += vs.encode(None)
        fmt, data = ("fltp", wave[None]) if acodec == "aac" else ("s16", (wave * 32767).astype(np.int16)[None])
        for s in range(0, 2 * rate, 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, s:s + 1024]), format=fmt, layout="mono")
            af.sample_rate, af.pts = rate, round(audio_start * rate) + s
            packets += aus.encode(af)
        packets += aus.encode(None)
        for p in sorted(packets, key=lambda p: float((p.dts if p.dts is not None else p.pts) * p.time_base)):
            c.mux(p)


def _rms(path: Path, a: float, b: float) -> float:
    """RMS level of the audio between result times ``a`` and ``b`` s (the stream's start time honoured)."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        rate, start = s.codec_context.sample_rate, float((s.start_time or 0) * s.time_base)
        pcm = np.concatenate([f.to_ndarray().astype(np.float32).reshape(-1) for f in c.decode(s)])
    pcm = pcm / 32767 if np.abs(pcm).max() > 2 else pcm
    part = pcm[max(int((a - start) * rate), 0):max(int((b - start) * rate), 0)]
    return float(np.sqrt(np.mean(part ** 2))) if len(part) else 0.0


def _two_sound_clip(path: Path) -> Path:
    """25 frames with two AAC tracks: #1 silent mono ("commentary"), not marked default, then #2 a stereo sine
    ("main"), the default one players play."""
    rate = 16000
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        silent, main = c.add_stream("aac", rate=rate), c.add_stream("aac", rate=rate)
        silent.layout, main.layout = "mono", "stereo"
        silent.disposition, main.disposition = av.stream.Disposition(0), av.stream.Disposition.default
        silent.metadata["title"], main.metadata["title"] = "commentary", "main"
        for i, f in enumerate(_frames(25, 64)):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            c.mux(v.encode(frame))
        sine = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
        for stream, wave in ((silent, np.zeros((1, rate))), (main, np.stack([sine, sine]))):
            for start in range(0, rate, 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + 1024], np.float32),
                                                   format="fltp", layout=stream.layout.name)
                frame.sample_rate, frame.pts = rate, start
                c.mux(stream.encode(frame))
        for stream in (v, silent, main):
            c.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])  # copied, converted
def test_a_driver_of_several_audio_tracks_gives_the_default_ones_sound(
        tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A driver whose first audio track is a silent one not marked default and whose second is the default (the
    one players play) gives the result the default track's sound, and says which it took (was: the first, silent,
    without a word)."""
    clip = _two_sound_clip(tmp_path / "tracks.mkv")
    out = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"), \
            VideoWriter(out, Fraction(25), 64, 64, audio_source=clip) as w:
        for f in _frames(25, 64):
            w.write(f)
    assert "tracks.mkv has 2 audio streams: the result's sound is its stream #2 ('main', 2 channels)" in caplog.text
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.channels == 2
        sound = np.concatenate([f.to_ndarray().ravel() for f in c.decode(audio=0)])
    assert np.sqrt(np.mean(sound.astype(float) ** 2)) > 0.1


@pytest.mark.parametrize("name,acodec,video_start,audio_start", [
    ("late_video.mkv", "pcm_s16le", 1.0, 0.0),  # transcoded; audio before the video is dropped
    ("late_audio.mkv", "pcm_s16le", 0.0, 0.5),  # transcoded; the audio's later start is kept as silence
    ("late_video.mp4", "aac", 1.0, 0.0),  # copied
])
def test_audio_stays_in_step_when_its_stream_starts_elsewhere_than_the_video(
        tmp_path: Path, name: str, acodec: str, video_start: float, audio_start: float) -> None:
    """Audio and video streams that start at different times (MPEG-TS, screen recordings): the result's audio
    is aligned with its first frame by the video stream's start (``VideoInfo.start_s``), not the audio's own
    (was: off by the difference, e.g. the tone 1 s late)."""
    src = tmp_path / name
    _clip_with_offset_audio(src, acodec, video_start, audio_start)
    info = probe_video(src)
    assert info.start_s == Fraction(video_start).limit_denominator(100)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, info.fps, 64, 64, audio_source=src, video_start=info.start_s) as w:
        for f in iter_video_frames(src):
            w.write(f)
    tone_from = max(audio_start - video_start, 0.0)  # in the result
    assert _rms(out, tone_from + 0.05, 0.95) > 0.3
    if tone_from:
        assert _rms(out, 0.0, tone_from - 0.05) < 0.01


def test_a_variable_frame_rate_is_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A driver whose frames come at 30 fps, then 15 fps: the header's average rate is not its nominal one, so
    the probe flags it, and planning says the frames are placed by timestamp: the result lasts as long as the
    clip (was: a warning that the result does not follow it). A constant-rate clip is not flagged."""
    from megactor_rt.runtime.driver import plan_driver

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=30)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = Fraction(1, 30)
        for i, pts in enumerate([*range(10), *range(10, 30, 2)]):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 30)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
    assert probe_video(path).variable_rate and not probe_video(DRIVER).variable_rate
    with caplog.at_level("INFO", logger="megactor_rt.runtime.driver"):
        plan = plan_driver(path, face_crop=False)
    assert "variable frame rate" in caplog.text and "vfr.mp4" in caplog.text and "by timestamp" in caplog.text
    info = probe_video(path)  # (the grid's rate: it was given as "its header's average", which it is not)
    assert f"at a constant {float(info.fps):.3f} fps" in caplog.text and "average" not in caplog.text
    assert abs((plan.num_frames - 1) / info.fps - Fraction(28, 30)) <= 1 / (2 * info.fps)  # the last frame at its time
    assert len(list(plan.frames())) == plan.num_frames


# -- inputs a media audit found (2026-11-27) --------------------------------------------------------------

def _audio_clip(path: Path, codec: str, rate: int, segments: list[tuple[str, int]], container: str | None = None,
                seconds: float = 2.0) -> Path:
    """A 64 px, 25 fps clip of ``seconds`` with an audio track of ``codec``; each of ``segments`` (layout, rate)
    is ``seconds`` long, encoded by its own encoder and muxed into the one stream (a stream that changes its
    layout or rate, as joined broadcast recordings do)."""
    with av.open(str(path), "w", format=container) as c:
        v = c.add_stream("libx264", rate=25)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        a = c.add_stream(codec, rate=rate)
        a.layout = segments[0][0]
        for i in range(round(25 * seconds)):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i, np.uint8), format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        c.mux(v.encode(None))
        start = Fraction(0)
        for layout, seg_rate in segments:
            enc = av.CodecContext.create(codec, "w")
            enc.sample_rate, enc.layout, enc.time_base = seg_rate, layout, Fraction(1, seg_rate)
            enc.format = enc.codec.audio_formats[0].name
            chunk = enc.frame_size or 1024
            channels = len(av.AudioLayout(layout).channels)
            dtype = {"s16": np.int16, "s32": np.int32, "flt": np.float32, "dbl": np.float64}[enc.format.packed.name]
            for k in range(0, round(seg_rate * seconds), chunk):
                shape = (channels, chunk) if enc.format.is_planar else (1, chunk * channels)
                fr = av.AudioFrame.from_ndarray(np.zeros(shape, dtype), format=enc.format.name, layout=layout)
                fr.sample_rate, fr.pts = seg_rate, k
                for pk in enc.encode(fr):
                    _mux_on_one_clock(c, a, pk, start, seg_rate, rate)
            for pk in enc.encode(None):
                _mux_on_one_clock(c, a, pk, start, seg_rate, rate)
            start += Fraction(seconds)
    return path


def _mux_on_one_clock(c, stream, pk, start: Fraction, seg_rate: int, rate: int) -> None:  # noqa: ANN001
    """Mux a segment encoder's packet with its time moved onto the stream's clock (segments follow each other)."""
    if pk.pts is not None:
        pk.pts = pk.dts = int((start + Fraction(pk.pts, seg_rate)) * rate)
    pk.time_base, pk.stream = Fraction(1, rate), stream
    c.mux(pk)


def _written_audio(path: Path) -> tuple[str, int, float]:
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(a))
        return a.codec_context.name, a.codec_context.sample_rate, samples / a.codec_context.sample_rate


@pytest.mark.parametrize(("codec", "rate", "container", "expect"), [
    ("pcm_s24le", 192000, "matroska", ("aac", 96000)),  # AAC has no 192 kHz: resampled to its nearest rate
    ("pcm_s16le", 37800, "matroska", ("aac", 32000)),
    ("libmp3lame", 8000, "matroska", ("aac", 8000)),  # MP3 at 8 kHz: MP4 refuses to hold it, so transcoded
])
def test_audio_the_result_cannot_hold_as_it_is_is_converted(tmp_path: Path, codec: str, rate: int,
                                                           container: str, expect: tuple[str, int]) -> None:
    """Sample rates AAC lacks and MP3 below 16 kHz in MP4 were a raw PyAV error after the last frame (or at the
    41st), losing the run."""
    layout = "mono" if rate < 16000 else "stereo"
    src = _audio_clip(tmp_path / "src.mkv", codec, rate, [(layout, rate)], container)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, Fraction(25), 64, 64, audio_source=src) as w:
        for f in _frames(50):
            w.write(f)
    name, got_rate, seconds = _written_audio(out)
    assert (name, got_rate) == expect and 1.9 < seconds < 2.4  # 2 s of video, plus AAC's frame padding


def test_audio_that_changes_layout_or_rate_midway_is_carried_over(tmp_path: Path) -> None:
    """A stream going from stereo to mono, or from 48 to 44.1 kHz (PyAV's encoder resampler is fixed by the
    first frame: "Frame does not match AudioResampler setup" at the end of the run)."""
    for name, segments in (("layout", [("stereo", 48000), ("mono", 48000)]),
                           ("rate", [("stereo", 48000), ("stereo", 44100)])):
        src = _audio_clip(tmp_path / f"{name}.ts", "mp2", 48000, segments, "mpegts", seconds=1.0)
        with av.open(str(src)) as c:
            seen = {(f.layout.name, f.sample_rate) for f in c.decode(audio=0)}
        assert seen == set(segments)  # the source really changes
        out = tmp_path / f"{name}.mp4"
        with VideoWriter(out, Fraction(25), 64, 64, audio_source=src, video_start=probe_video(src).start_s) as w:
            for f in _frames(50):
                w.write(f)
        assert _written_audio(out)[0] == "aac" and _written_audio(out)[2] > 1.9


def test_damaged_audio_packets_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged packets in the driver's audio lost the whole run at its end (InvalidDataError); now they are
    skipped and counted."""
    import logging

    src = _audio_clip(tmp_path / "good.mkv", "flac", 48000, [("stereo", 48000)], "matroska")
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        positions = [p.pos for p in c.demux(c.streams.audio[0]) if p.size and p.pos and p.pos > 0]
    rng = np.random.default_rng(1)
    for pos in positions[len(positions) // 2:len(positions) // 2 + 5]:
        for k in range(8, 60):
            data[pos + k] = int(rng.integers(0, 255))
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"), \
            VideoWriter(out, Fraction(25), 64, 64, audio_source=bad) as w:
        for f in _frames(50):
            w.write(f)
    assert out.is_file() and _written_audio(out)[0] == "aac"
    assert "audio packets could not be decoded and were skipped" in caplog.text


def test_cover_pictures_and_second_video_streams(tmp_path: Path) -> None:
    """An MP3's cover picture is not a driving video (was: a 1-frame driver at 90000 fps); of several video
    streams the main one is read (was: always the first)."""
    song = tmp_path / "song.mp3"
    with av.open(str(song), "w") as c:
        a = c.add_stream("libmp3lame", rate=44100)
        a.layout = "stereo"
        pic = c.add_stream("mjpeg")
        pic.width = pic.height = 96
        pic.pix_fmt = "yuvj420p"
        pic.disposition = av.stream.Disposition.attached_pic
        f = av.VideoFrame.from_ndarray(np.full((96, 96, 3), 200, np.uint8), format="rgb24").reformat(format="yuvj420p")
        f.pts = 0
        for pk in [*pic.encode(f), *pic.encode(None)]:
            c.mux(pk)
        for s in range(0, 44100, 1152):
            fr = av.AudioFrame.from_ndarray(np.zeros((2, 1152), np.float32), format="fltp", layout="stereo")
            fr.sample_rate, fr.pts = 44100, s
            c.mux(a.encode(fr))
        c.mux(a.encode(None))
    with pytest.raises(InputError, match="song.mp3: the file has no video stream .only a cover picture"):
        probe_video(song)
    two = tmp_path / "two.mkv"
    with av.open(str(two), "w") as c:
        thumb = c.add_stream("mjpeg", rate=25)
        thumb.width, thumb.height, thumb.pix_fmt = 80, 64, "yuvj420p"
        main = c.add_stream("libx264", rate=25)
        main.width, main.height, main.pix_fmt = 96, 64, "yuv420p"
        f = av.VideoFrame.from_ndarray(np.zeros((64, 80, 3), np.uint8), format="rgb24").reformat(format="yuvj420p")
        f.pts = 0
        for pk in [*thumb.encode(f), *thumb.encode(None)]:
            c.mux(pk)
        for i, frame in enumerate(_frames(20, 64)):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.pad(frame, ((0, 0), (0, 32), (0, 0)))),
                                            format="rgb24")
            vf.pts = i
            c.mux(main.encode(vf))
        c.mux(main.encode(None))
    info = probe_video(two)
    assert (info.width, info.height) == (96, 64) and len(list(iter_video_frames(two))) == 20


def test_a_stream_that_changes_size_midway_keeps_the_probed_size(tmp_path: Path) -> None:
    """Frames after a resolution change (WebRTC/MediaRecorder recordings) are scaled to the probed size the crop
    was planned for (was: yielded at their own size and cropped in the wrong coordinates)."""
    path = tmp_path / "switch.ts"
    with av.open(str(path), "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        n = 0
        for w, h in ((160, 120), (320, 240)):
            enc = av.CodecContext.create("libx264", "w")
            enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
            enc.time_base, enc.framerate = Fraction(1, 25), Fraction(25)
            for _ in range(12):
                f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 100, np.uint8), format="rgb24")
                f = f.reformat(format="yuv420p")
                f.pts = n
                n += 1
                for pk in enc.encode(f):
                    pk.stream = s
                    c.mux(pk)
            for pk in enc.encode(None):
                pk.stream = s
                c.mux(pk)
    with av.open(str(path)) as c:
        assert {(f.width, f.height) for f in c.decode(video=0)} == {(160, 120), (320, 240)}
    shapes = {f.shape for f in iter_video_frames(path)}
    assert shapes == {(120, 160, 3)}


def test_a_driver_file_smaller_than_64_px_is_refused(tmp_path: Path) -> None:
    """As frames in memory and portraits are (was: "no face found", and with --no-face-crop a 1x1 driver
    upscaled to 512 px)."""
    from megactor_rt.runtime.driver import driver_info

    path = tmp_path / "tiny.mp4"
    with VideoWriter(path, Fraction(25), 32, 32) as w:
        for f in _frames(3, 32):
            w.write(f)
    with pytest.raises(InputError, match="tiny.mp4: frames are 32x32 px; each side must be at least 64 px"):
        driver_info(path)
    strip = tmp_path / "strip.mp4"  # one side is enough (a mutant testing the longer side survived the suite)
    with VideoWriter(strip, Fraction(25), 128, 32) as w:
        for f in _frames(3, 32):
            w.write(np.ascontiguousarray(np.tile(f, (1, 4, 1))))
    with pytest.raises(InputError, match="strip.mp4: frames are 128x32 px; each side must be at least 64 px"):
        driver_info(strip)


_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [128, 128, 128], [200, 100, 50]], float)


def _yuv_clip(path: Path, width: int, height: int, pix: str, bits: int, tag: int | None) -> Path:
    """Six colour bars written as limited-range BT.709 YUV computed by formula (an independent reference),
    lossless, tagged BT.709 or not tagged at all."""
    kr, kb = 0.2126, 0.0722
    r, g, b = (_COLOURS / 255).T
    y = kr * r + (1 - kr - kb) * g + kb * b
    u, v = (b - y) / (2 * (1 - kb)), (r - y) / (2 * (1 - kr))
    sc = 1 << (bits - 8)
    yuv = np.rint(np.stack([(16 + 219 * y) * sc, (128 + 224 * u) * sc, (128 + 224 * v) * sc], 1)).astype(int)
    dt = np.uint8 if bits == 8 else np.uint16
    bw = width // len(_COLOURS)
    planes = [np.zeros((height, width), dt), np.zeros((height // 2, width // 2), dt),
              np.zeros((height // 2, width // 2), dt)]
    for i, (yy, uu, vv) in enumerate(yuv):
        planes[0][:, i * bw:(i + 1) * bw] = yy
        planes[1][:, i * bw // 2:(i + 1) * bw // 2] = uu
        planes[2][:, i * bw // 2:(i + 1) * bw // 2] = vv
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = width, height, pix, {"qp": "0"}
        if tag is not None:
            s.codec_context.colorspace, s.codec_context.color_range = tag, 1
        for i in range(2):
            f = av.VideoFrame(width, height, pix)
            for plane, arr in zip(f.planes, planes):
                a = np.frombuffer(plane, dtype=dt).reshape(-1, plane.line_size // arr.itemsize)
                a[:arr.shape[0], :arr.shape[1]] = arr
            if tag is not None:
                f.colorspace, f.color_range = tag, 1
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


def test_hd_colours_decode_as_players_show_them(tmp_path: Path) -> None:
    """An untagged HD clip is BT.709, as players show it (was: BT.601, red off by up to 23 levels; swscale's
    fast path leaves up to 3). Results say how they were converted (BT.601, limited range; was: no tag, so
    players guessed)."""
    path = _yuv_clip(tmp_path / "bars.mp4", 1296, 720, "yuv420p", 8, None)
    frame = next(iter_video_frames(path, 1))
    bw = frame.shape[1] // len(_COLOURS)
    got = np.array([frame[360, i * bw + bw // 2] for i in range(len(_COLOURS))], float)
    assert np.abs(got - _COLOURS).max() <= 3
    out = tmp_path / "out.mp4"
    with VideoWriter(out, Fraction(25), 64, 64) as w:
        w.write(np.zeros((64, 64, 3), np.uint8))
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert (int(cc.colorspace), int(cc.color_range)) == (6, 1)


@pytest.mark.parametrize("tag", [8, 14])  # YCgCo, ICtCp
def test_a_colour_matrix_ffmpeg_cannot_convert_is_read_as_the_nearest_with_a_warning(
        tmp_path: Path, tag: int, caplog: pytest.LogCaptureFixture) -> None:
    """A clip tagged with a colour matrix FFmpeg's converter does not take (YCgCo: x264's --colormatrix, screen
    capture; ICtCp; BT.2020 constant luminance) is read as the nearest it takes (BT.709 for HD, BT.2020 for ICtCp),
    with a warning naming the file and the matrix (was: "unexpected error: OSError: [Errno 95] Operation not
    supported", naming neither). Its neutral tones are right."""
    path = _yuv_clip(tmp_path / f"matrix{tag}.mp4", 1296, 720, "yuv420p", 8, tag)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.media"):
        frames = list(iter_video_frames(path))
    assert len(frames) == 2
    bw = frames[0].shape[1] // len(_COLOURS)
    got = np.array([frames[0][360, i * bw + bw // 2] for i in range(len(_COLOURS))], float)
    assert np.abs(got - _COLOURS)[3:5].max() <= 3  # white, grey
    if tag == 8:  # (the bars are BT.709 YUV: read as BT.709, every colour is right)
        assert np.abs(got - _COLOURS).max() <= 3
    name = {8: "YCgCo", 14: "ICtCp"}[tag]
    assert caplog.text.count(f"matrix{tag}.mp4: its colour matrix ({name})") == 1


def test_a_video_portrait_whose_first_frame_has_no_face_says_its_first_frame_is_used(tmp_path: Path) -> None:
    """A video given as the portrait whose first frame shows no face (a clip that fades in from black) is refused
    saying that a video's first frame is the portrait (was: "no face found in portrait fade_in.mp4" alone, of a clip
    that shows a face); a still image's error has no such words."""
    from media_fixtures import face_frames

    from megactor_rt.preprocess import portrait_crop

    clip = tmp_path / "fade_in.mp4"
    with VideoWriter(clip, Fraction(25), 192, 192) as w:
        for f in [np.zeros((192, 192, 3), np.uint8)] * 3 + face_frames(3, 192):
            w.write(f)
    with pytest.raises(InputError, match=r"no face found in portrait fade_in\.mp4 \(of a video, its first frame is the "
                                         r"portrait.*cut it to where the face shows, or pass a still image\)"):
        portrait_crop(read_portrait(clip), source_name=clip.name, detector="hog")
    with pytest.raises(InputError, match=r"no face found in portrait blank\.png; use a frontal"):
        portrait_crop(np.zeros((192, 192, 3), np.uint8), source_name="blank.png", detector="hog")


@pytest.mark.parametrize("name", ["me.heic", "me.avif"])
def test_a_heic_or_avif_photo_as_the_driver_is_refused_as_a_still_image(tmp_path: Path, name: str) -> None:
    """A phone's photo (HEIC, AVIF), which FFmpeg reads as a one-frame video, given as the driver is refused as a
    JPEG or PNG is, as a still image (was: animated as a one-frame, 1 fps driver: a portrait and driver swapped went
    unsaid); an animated AVIF still drives."""
    from megactor_rt.runtime.driver import driver_info

    media.register_heif()
    path = tmp_path / name
    Image.fromarray(_frames(1, 96)[0]).save(path, quality=90)
    assert probe_video(path).still_image
    with pytest.raises(InputError, match=f"{name}: a still image, not a driving video"):
        driver_info(path)
    assert read_portrait(path).shape == (96, 96, 3)  # (a portrait all the same)
    if name == "me.avif":
        clip = tmp_path / "anim.avif"
        first, *rest = [Image.fromarray(f) for f in _frames(4, 96)]
        first.save(clip, save_all=True, append_images=rest, duration=40, loop=0, quality=90)
        info = driver_info(clip)
        assert not info.still_image and info.fps == 25


def test_an_animated_webp_driver_is_read_through_pillow(tmp_path: Path) -> None:
    """FFmpeg cannot decode animated WebP (probe_video says so, naming the way that can: was "no frame size
    (corrupt header?)"); a driver reads it through Pillow on the grid of its most common display time (40 ms:
    25 fps), a frame shown three times as long repeated three times, each frame's pixels as stored (lossless);
    a still WebP and a PNG are no animated WebP."""
    from megactor_rt.media import AnimatedWebP, is_animated_webp
    from megactor_rt.runtime.driver import DriverFrames, driver_info, driver_source

    shades = [np.full((80, 96, 3), 20 * i + 30, np.uint8) for i in range(6)]
    shades[2][:10] = (255, 0, 0)
    frames = [Image.fromarray(s) for s in shades]
    path = tmp_path / "meme.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[40, 40, 120, 40, 40, 40], loop=0,
                   lossless=True)
    with pytest.raises(InputError, match="meme.webp: an animated WebP, which FFmpeg cannot decode .*AnimatedWebP"):
        probe_video(path)
    webp = AnimatedWebP(path)
    assert webp.fps == 25 and len(webp) == 8
    source = [0, 1, 2, 2, 2, 3, 4, 5]
    assert all(np.array_equal(webp[k], shades[i]) for k, i in enumerate(source))
    assert np.array_equal(webp[-1], shades[5]) and len(webp[2:5]) == 3
    with pytest.raises(IndexError):
        webp[8]
    driver = driver_source(path)
    assert isinstance(driver, DriverFrames) and driver.name == "meme.webp"
    info = driver_info(path)
    assert (info.fps, info.num_frames, info.width, info.height, info.has_audio) == (25, 8, 96, 80, False)
    frames[0].save(tmp_path / "still.webp")
    frames[0].save(tmp_path / "still.png")
    assert is_animated_webp(path) and not is_animated_webp(tmp_path / "still.webp")
    assert not is_animated_webp(tmp_path / "still.png") and not is_animated_webp(tmp_path / "missing.webp")
    cut = tmp_path / "cut.webp"  # (a partial download: Pillow cannot open it; its header says animated)
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert is_animated_webp(cut)
    with pytest.raises(InputError, match="cut.webp: not a readable animated WebP: corrupt or cut off"):
        driver_info(cut)


@pytest.mark.parametrize("name", ["meme.gif", "sticker.mp4"])
def test_an_animated_webp_under_another_name_drives(tmp_path: Path, name: str) -> None:
    """An animated WebP saved under another suffix (a meme site's "GIF" served as WebP and saved as .gif, a sticker
    shared as .mp4) is known by its content: it drives and inspect reads it as the one named .webp (was: "the video
    stream has no frame size (corrupt header?)"); probe_video says what it is."""
    from megactor_rt.describe import describe
    from megactor_rt.runtime.driver import driver_info

    frames = [Image.fromarray(np.full((80, 96, 3), 20 * i + 30, np.uint8)) for i in range(6)]
    path = tmp_path / name
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=[40, 40, 120, 40, 40, 40],
                   loop=0, lossless=True)
    info = driver_info(path)
    assert (info.fps, info.num_frames, info.width, info.height) == (25, 8, 96, 80)
    report = describe(path, faces=False)
    assert (report["kind"], report["frames"], report["frames_in_a_run"]) == ("animated WebP", 6, 8)
    with pytest.raises(InputError, match=f"{name}: an animated WebP, which FFmpeg cannot decode"):
        probe_video(path)


def test_a_frame_half_way_between_two_grid_steps_takes_the_later_step(tmp_path: Path) -> None:
    """Halves round up (``floor(x + 1/2)``): a frame at 4.5 grid steps lands on step 5, so the frame before it
    holds steps 3 and 4 (Python's round() would put it on step 4: 0, 1, 2, 3, 4, 4, 5)."""
    clip = tmp_path / "half.mkv"
    _write_numbered_vfr(clip, [0, 1 / 30, 2 / 30, 0.1, 0.15, 0.2])  # 0.15 s: step 4.5 at 30 fps
    assert [_frame_number(f) for f in iter_video_frames(clip)][:7] == [0, 1, 2, 3, 3, 4, 5]


def test_a_driver_short_of_its_header_by_over_one_percent_is_truncated() -> None:
    """An edit list may hide a few frames (at most 1 % or 2 frames); more missing is a cut-off file."""
    _check_complete(Path("c.mp4"), announced=1000, decoded=990, strict=True, usable=990)
    with pytest.raises(InputError, match="truncated"):
        _check_complete(Path("c.mp4"), announced=1000, decoded=985, strict=True, usable=985)


def test_the_end_is_reached_within_two_frame_times() -> None:
    """A last frame shown up to two frame times before the declared end is the whole file; earlier, it was cut."""
    from types import SimpleNamespace

    stream = SimpleNamespace(duration=100, time_base=Fraction(1, 25), start_time=0, average_rate=Fraction(25),
                             guessed_rate=None)  # 4 s at 25 fps
    assert media._reaches_the_end(stream, 3.96) and media._reaches_the_end(stream, 3.92)
    assert not media._reaches_the_end(stream, 3.8)  # 5 frames short


def test_the_result_starts_at_time_zero(tmp_path: Path) -> None:
    """The first written frame is shown at 0 s (one frame late, the whole video would lag its audio)."""
    with VideoWriter(tmp_path / "o.mp4", Fraction(25), 64, 64) as w:
        for i in range(3):
            w.write(np.full((64, 64, 3), 40 * i, np.uint8))
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert next(c.decode(video=0)).time == 0 and (c.streams.video[0].start_time or 0) == 0


# ---------------------------------------------------------------------------------------------- WebM and GIF results


def test_webm_result_is_vp9_with_the_drivers_audio_as_opus(tmp_path: Path) -> None:
    """.webm: VP9 video near the frames written, the bundled driver's MP3 (which WebM cannot hold) converted to
    Opus and trimmed to the video."""
    frames = list(iter_video_frames(DRIVER, max_frames=30))
    out = tmp_path / "result.webm"
    with VideoWriter(out, Fraction(30), 512, 512, audio_source=DRIVER) as w:
        for f in frames:
            w.write(f)
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "vp9"
        a = c.streams.audio[0]
        assert a.codec_context.name in ("opus", "libopus") and a.codec_context.sample_rate == 48000
        audio_s = sum(f.samples for f in c.decode(a)) / 48000
    assert 0.95 < audio_s < 1.05, audio_s  # 1 s of video
    info = probe_video(out)
    assert (info.fps, info.has_audio) == (Fraction(30), True)
    decoded = list(iter_video_frames(out))
    assert len(decoded) == 30
    assert max(np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames, strict=True)) < 4


def test_webm_result_copies_opus_audio(tmp_path: Path) -> None:
    """Opus audio goes into a WebM result as it is: the result's packets are a run of the source's, from its first
    (which starts 7 ms before the video, with the encoder's start-up samples, the pre-skip players leave out)."""
    src = _tone_after(tmp_path / "tone.mkv", "libopus", seconds=2, tone_from=0, rate=48000)
    out = tmp_path / "result.webm"
    with VideoWriter(out, Fraction(25), 64, 64, audio_source=src) as w:
        for f in _frames(25):
            w.write(f)
    packets, _ = _audio_track(out)
    source_packets, _ = _audio_track(src)
    assert len(packets) >= 45 and packets == source_packets[:len(packets)]  # 20 ms packets over 1 s


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30), Fraction(50), Fraction(15, 2)])
def test_gif_result_keeps_every_frame_and_its_rate(tmp_path: Path, fps: Fraction) -> None:
    """A GIF result reads back with the frames written, at their rate (a GIF steps in hundredths of a second: 30
    fps is 3, 3, 4, ...), looping, in colours near the frames'."""
    frames = list(iter_video_frames(DRIVER, max_frames=24))
    out = tmp_path / "result.gif"
    with VideoWriter(out, fps, 512, 512) as w:
        for f in frames:
            w.write(f)
    info = probe_video(out)
    assert info.fps == fps and not info.has_audio
    decoded = list(iter_video_frames(out))
    assert len(decoded) == 24
    errors = [np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames, strict=True)]
    assert max(errors) < 5, errors  # 256 colours, dithered
    assert b"NETSCAPE2.0\x03\x01\x00\x00" in out.read_bytes()  # loops forever


@pytest.mark.parametrize("frames", [2, media.GIF_PALETTE_FRAMES + 3])
def test_gif_palette_comes_from_the_first_frames(tmp_path: Path, frames: int) -> None:
    """One palette, made from the first GIF_PALETTE_FRAMES frames (held until it is made; fewer frames: all of
    them): a colour first shown in the second frame is in it; one shown only after them is drawn from their
    colours (it would be exact with a palette per frame). Every frame comes out, in order."""
    first = np.zeros((64, 64, 3), np.uint8)
    first[:, :32] = (200, 30, 30)
    second = first.copy()
    second[:, 32:] = (30, 60, 220)
    late = first.copy()
    late[:, 32:] = (20, 200, 40)
    out = tmp_path / "palette.gif"
    content = [first, second, *[first] * (frames - 3), late][:frames]
    with VideoWriter(out, Fraction(10), 64, 64) as w:
        for f in content:
            w.write(f)
    decoded = list(iter_video_frames(out))
    assert len(decoded) == frames
    assert np.abs(decoded[0].astype(int) - first).max() <= 2
    assert np.abs(decoded[1].astype(int) - second).max() <= 2  # its blue is in the palette
    if frames > media.GIF_PALETTE_FRAMES:
        assert np.abs(decoded[-2].astype(int) - first).max() <= 2
        assert np.abs(decoded[-1][:, 32:].astype(int) - late[:, 32:]).mean() > 20  # not in the palette


def test_gif_palette_holds_fewer_large_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most GIF_PALETTE_BYTES of frames are held for the palette: with room for two, a colour first shown in
    the third frame is not in it."""
    monkeypatch.setattr(media, "GIF_PALETTE_BYTES", 2 * 64 * 64 * 3)
    base = np.full((64, 64, 3), (200, 30, 30), np.uint8)
    third = base.copy()
    third[:, 32:] = (30, 60, 220)
    out = tmp_path / "held.gif"
    with VideoWriter(out, Fraction(10), 64, 64) as w:
        for f in (base, base, third):
            w.write(f)
    assert np.abs(list(iter_video_frames(out))[2][:, 32:].astype(int) - third[:, 32:]).mean() > 20


def test_gif_result_leaves_the_audio_out_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "result.gif"
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"), \
            VideoWriter(out, Fraction(25), 64, 64, audio_source=DRIVER) as w:
        for f in _frames(5):
            w.write(f)
    assert not probe_video(out).has_audio
    assert any("a GIF has no sound" in r.getMessage() and "driver.mp4" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30)])
def test_animated_webp_result_keeps_every_frame(tmp_path: Path, fps: Fraction,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """An animated WebP result (memes, chat stickers) reads back (through Pillow, as a WebP driver is read) with
    the frames written, each shown for its time in whole milliseconds (30 fps: 33 or 34 ms), looping forever, in
    full colour near the frames'; the driver's audio is left out with a note, and --crf is refused."""
    frames = list(iter_video_frames(DRIVER, max_frames=12))
    out = tmp_path / "result.webp"
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"), \
            VideoWriter(out, fps, 512, 512, audio_source=DRIVER) as w:
        for f in frames:
            w.write(f)
    assert any("an animated WebP has no sound" in r.getMessage() for r in caplog.records)
    with Image.open(out) as im:
        assert im.n_frames == 12 and im.info["loop"] == 0
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            im.load()  # (Pillow sets a frame's duration when it decodes it)
            durations.append(im.info["duration"])
    assert all(abs(d - 1000 / fps) < 1 for d in durations[:-1]), durations
    decoded = list(AnimatedWebP(out))
    errors = [np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames, strict=True)]
    assert len(decoded) == 12 and max(errors) < 5, errors
    assert not [p for p in tmp_path.iterdir() if p != out]  # no temporary file left
    with pytest.raises(InputError, match="libwebp_anim, has no such scale"):
        VideoWriter(tmp_path / "q.webp", fps, 64, 64, crf=20)


def test_gif_result_above_50_fps_is_refused_before_any_file(tmp_path: Path) -> None:
    """A 60 fps GIF would step 1, 2, 2, ... hundredths, and browsers show a step under 2 as 10: refused, naming
    the way out, before a file is made."""
    out = tmp_path / "fast.gif"
    with pytest.raises(InputError, match=r"fast\.gif: a GIF plays at most 50 frames per second .* not 60: pass --fps"):
        VideoWriter(out, Fraction(60), 64, 64)
    assert list(tmp_path.iterdir()) == []


def test_result_formats_without_an_encoder_are_refused_up_front(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(media._OTHER_VIDEO_ENCODERS, ".webm", "no-such-encoder")
    media._encoder_for.cache_clear()
    try:
        with pytest.raises(InputError, match=r"x\.webm: this PyAV build has no no-such-encoder encoder for \.webm "
                                             r"results; write \.mp4 or \.mkv instead"):
            check_output_path(tmp_path / "x.webm")
        assert check_output_path(tmp_path / "x.gif") == tmp_path / "x.gif"
    finally:
        media._encoder_for.cache_clear()
    with pytest.raises(InputError, match=r"unsupported output format '\.avi'; use one of .*\.gif.*\.webm"):
        check_output_path(tmp_path / "x.avi")


@pytest.mark.parametrize(("delays_ms", "rate"), [([30, 30, 40], Fraction(30)), ([40], Fraction(25)),
                                                 ([30], Fraction(100, 3)), ([70, 70, 70, 80], Fraction(4800, 348)),
                                                 ([40, 50], Fraction(4800, 216))])
def test_gif_driver_gives_each_frame_once(tmp_path: Path, delays_ms: list[int], rate: Fraction) -> None:
    """A GIF driver (Pillow-made, as memes are) gives every frame exactly once. A 30 fps GIF steps 3, 3, 4
    hundredths; FFmpeg's average rate is then 100/3 fps, on whose grid every tenth frame repeated (53 frames of
    48): now its rate is the frames over the duration."""
    delays = delays_ms * (48 // len(delays_ms))
    shades = _gif_driver(tmp_path / "meme.gif", delays)
    assert shades[0] == rate
    assert shades[1] == [i * 5 for i in range(len(delays))]
    assert not probe_video(tmp_path / "meme.gif").variable_rate  # every step holds one frame


def _gif_driver(gif: Path, delays_ms: list[int]) -> tuple[Fraction, list[int]]:
    """A GIF of one shade per frame (5 x its index) with these delays: (its rate, the shades read back)."""
    images = [Image.fromarray(np.full((64, 64, 3), i * 5, np.uint8)) for i in range(len(delays_ms))]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=delays_ms, loop=0)
    return probe_video(gif).fps, [int(f[0, 0, 0]) for f in iter_video_frames(gif)]


def test_gif_driver_that_pauses_keeps_every_frame(tmp_path: Path) -> None:
    """A GIF of ten frames at 10 fps that holds its last for a second (5.5 frames a second on average) is read at
    10 fps, its pause as repeats; at its mean rate frames 1, 3, 6 and 8 were dropped."""
    rate, shades = _gif_driver(tmp_path / "pause.gif", [100] * 10 + [1000])
    assert rate == 10
    assert shades == [i * 5 for i in range(11)] + [50] * 9
    rate, shades = _gif_driver(tmp_path / "pauses.gif", [20, 20, 500] * 3)  # pauses between its frames
    assert rate == 50 and probe_video(tmp_path / "pauses.gif").variable_rate
    assert sorted(set(shades)) == [i * 5 for i in range(9)] and len(shades) > 9


def test_a_frame_shown_over_a_gap_is_searched_for_faces_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip with a 2 s gap in its timestamps (a recording paused, a screen capture idle): the frame before the gap
    fills its 50 frames of the grid, and the driver's face search looks at it once, not 50 times (a clip with an
    hour's gap kept a dry run searching 90 000 copies of one frame for over 45 minutes)."""
    from fractions import Fraction

    from media_fixtures import face_frames

    from megactor_rt.runtime import driver as driver_module

    path = tmp_path / "gap.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=25)
        s.width = s.height = 192
        s.pix_fmt, s.time_base = "yuvj420p", Fraction(1, 1000)
        for frame, ms in zip(face_frames(5), (0, 40, 80, 2080, 2120), strict=True):
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                p.pts = p.dts = ms
                p.time_base = Fraction(1, 1000)
                c.mux(p)
    searched: list[int] = []
    detect = driver_module.detect_scaled
    monkeypatch.setattr(driver_module, "detect_scaled", lambda f: searched.append(1) or detect(f))
    plan = driver_module.plan_driver(path)
    assert plan.num_frames == 54 and len(searched) == 5


def test_an_image_whose_exif_is_cut_short_is_named_as_corrupt(tmp_path: Path) -> None:
    """A PNG whose eXIf chunk is cut short (Pillow raises struct.error turning it upright) as a portrait or a mask:
    the file is named as corrupt (was: "unexpected error: error: unpack requires a buffer of 4 bytes", exit 1)."""
    import struct
    import zlib

    from megactor_rt.preprocess import load_user_mask

    path = tmp_path / "cut_exif.png"
    Image.fromarray(np.full((96, 80, 3), 128, np.uint8)).save(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()[:12]  # (its header and the start of its first entry)
    raw = path.read_bytes()
    at = raw.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    path.write_bytes(raw[:at] + chunk + raw[at:])
    with pytest.raises(InputError, match=re.escape(f"{path}: image is corrupt or truncated (its EXIF data is cut short")):
        read_portrait(path)
    with pytest.raises(InputError, match=re.escape(f"{path}: not a readable mask image (its EXIF data is cut short")):
        load_user_mask(path)


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_a_matroska_clip_cut_from_a_later_time_has_its_own_duration(tmp_path: Path, suffix: str) -> None:
    """A Matroska segment's duration counts from 0: a clip of 0.4 s whose timestamps start at 10 s (cut from a longer
    recording with its times kept) read as 10.4 s (a run's frame estimate 260 for its 10); an MP4's reads 0.4 s."""
    path = tmp_path / f"late{suffix}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9" if suffix == ".webm" else "libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 64, 64, "yuv420p", Fraction(1, 25)
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 250 + i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    info = probe_video(path)
    assert (info.start_s, info.duration_s) == (10, pytest.approx(0.4))
