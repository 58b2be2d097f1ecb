"""PNG frame-sequence results (megactor_rt.sequence): lossless numbered frames in a folder of their own, published
as a whole (a temporary folder renamed into place), an earlier result replaced but nothing else deleted; through
the Python API (frames equal to the streamed run's) and the CLI (batches, --skip-existing, jobs files, inspect)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_fixtures import PORTRAIT, write_face_driver, write_plain_driver
from PIL import Image

from megactor_rt.cli import main
from megactor_rt.config import AnimateConfig, tiny_config
from megactor_rt.errors import InputError, ResourceError
from megactor_rt.media import (
    Soundtrack,
    check_not_an_input,
    check_output_path,
    result_exists,
    result_settings,
)
from megactor_rt.progress import progress_enabled, set_progress_enabled
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.driver import DriverFrames, driver_identity, driver_source, sequence_driver
from megactor_rt.sequence import (
    FramePattern,
    FrameSequence,
    SequenceWriter,
    find_pattern,
    frame_pattern,
    sequence_pattern,
)
from megactor_rt.weights import build_models, write_converted

FAST = ["--steps", "2", "--window", "4", "--overlap", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _restore_progress() -> Iterator[None]:
    was = progress_enabled()
    yield
    set_progress_enabled(was)


def frames(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def write(path: Path, content: list[np.ndarray], fps: Fraction | int = 25, **options: object) -> None:
    with SequenceWriter(path, fps, content[0].shape[1], content[0].shape[0], **options) as w:  # type: ignore[arg-type]
        for f in content:
            w.write(f)


def read(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- the writer


def test_frames_are_lossless_numbered_from_1_and_record_their_rate_and_settings(tmp_path: Path) -> None:
    content = frames(12)
    write(tmp_path / "take1" / "frame_%04d.png", content, Fraction(30000, 1001), metadata={"comment": '{"a": 1}'})
    folder = tmp_path / "take1"
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:04d}.png" for i in range(1, 13)]
    assert all(np.array_equal(a, b) for a, b in zip(read(folder), content, strict=True))
    with Image.open(folder / "frame_0007.png") as im:
        assert im.text == {"fps": "30000/1001", "Comment": '{"a": 1}'}  # type: ignore[attr-defined]
    assert hidden(tmp_path) == [] and result_exists(tmp_path / "take1" / "frame_%04d.png")
    assert not result_exists(tmp_path / "take1" / "other_%04d.png")


def test_frame_numbers_beyond_the_padding_and_without_it() -> None:
    padded, plain = FramePattern(Path("/x"), "f", ".png", 3), FramePattern(Path("/x"), "", ".png", 0)
    assert (padded.name(7), padded.name(12345), plain.name(7)) == ("f007.png", "f12345.png", "7.png")
    assert [padded.number(n) for n in ("f007.png", "f12345.png", "f07.png", "f0007.png", "g007.png")] == \
        [7, 12345, None, None, None]
    assert [plain.number(n) for n in ("7.png", "123.png", "07.png", "7.PNG")] == [7, 123, None, None]
    assert frame_pattern("a/b/%d.png").digits == 0 and frame_pattern("a/%05d.png").folder.name == "a"


@pytest.mark.parametrize(("name", "problem"), [
    ("take.png", "give its file name one number pattern"),
    ("t%d_%d.png", "give its file name one number pattern"),
    ("t%s%d.png", "only the file name may hold a number pattern"),
    ("shot%d/%05d.png", "only the file name may hold a number pattern"),
])
def test_a_sequence_needs_one_number_pattern_in_its_file_name(tmp_path: Path, name: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem) as err:
        check_output_path(tmp_path / name)
    assert "%05d.png" in str(err.value)  # an example to follow
    assert list(tmp_path.iterdir()) == []


def test_a_pattern_of_hashes_says_how_ffmpeg_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plate/d.####.png, as compositing tools name frames: as a driver or inspected, the error names %04d (was: "file
    does not exist"); as a result, too (was: an example of r2/####/%05d.png, the hashes taken for a folder's name)."""
    from megactor_rt.describe import describe

    plate(tmp_path / "plate", frames(2), name="d.%04d.png", first=1)
    monkeypatch.chdir(tmp_path)
    said = r"d.####.png: frames are numbered as FFmpeg names them, %04d for ####: e.g. plate/d.%04d.png " \
        r"\(frames d.0001.png, ...\)"
    assert sequence_pattern("plate/d.####.png") == Path("plate/d.####.png")  # (read as a sequence, then refused)
    for refuse in (FrameSequence, lambda p: describe(p, faces=False)):
        with pytest.raises(InputError, match=f"^plate/{said}$"):
            refuse("plate/d.####.png")
    with pytest.raises(InputError, match=r"^r2/####.png: .* e.g. r2/%04d.png \(frames 0001.png, ...\)$"):
        check_output_path("r2/####.png")


def test_an_earlier_result_is_replaced_as_a_whole(tmp_path: Path) -> None:
    pattern = tmp_path / "take" / "%05d.png"
    write(pattern, frames(5))
    write(pattern, frames(3, seed=1))  # shorter: frames 4 and 5 of the first must not stay
    assert all(np.array_equal(a, b) for a, b in zip(read(tmp_path / "take"), frames(3, seed=1), strict=True))
    assert hidden(tmp_path) == []


def test_a_folder_holding_other_files_is_refused_before_any_work(tmp_path: Path) -> None:
    folder = tmp_path / "renders"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "00001.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"holds notes\.txt besides frames named 00001\.png, \.\.\.; a frame "
                                         "sequence's folder is replaced as a whole"):
        SequenceWriter(folder / "%05d.png", 25, 24, 24)
    assert (folder / "notes.txt").read_text() == "keep me" and hidden(tmp_path) == []


def test_the_current_folder_and_links_are_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(InputError, match="is the current folder or holds it"):
        check_output_path("%05d.png")
    with pytest.raises(InputError, match="is the current folder or holds it"):
        check_output_path(tmp_path / "%05d.png")
    (tmp_path / "there").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "there")
    with pytest.raises(InputError, match="is a symbolic link.*name the folder it points to"):
        check_output_path(tmp_path / "link" / "%05d.png")
    check_output_path("frames/%05d.png")  # a new folder below it


def test_a_failed_run_leaves_the_earlier_result_untouched(tmp_path: Path) -> None:
    pattern = tmp_path / "take" / "%05d.png"
    write(pattern, frames(4))
    before = {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()}
    with pytest.raises(RuntimeError, match="stopped"), SequenceWriter(pattern, 25, 24, 24) as w:
        for f in frames(2, seed=3):
            w.write(f)
        raise RuntimeError("stopped")
    assert {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()} == before
    assert hidden(tmp_path) == []
    with pytest.raises(ValueError, match="no frames were written"):
        SequenceWriter(tmp_path / "new" / "%05d.png", 25, 24, 24).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take"]


def test_a_full_disk_is_named_and_leaves_the_earlier_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    pattern = tmp_path / "take" / "%05d.png"
    write(pattern, frames(2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()}
    save = Image.Image.save
    written: list[int] = []

    def full_disk(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        save(self, fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(ResourceError, match=r"cannot write the result's frames .*No space left on device.*nothing "
                                            "was written under"):
        write(pattern, frames(4, seed=1))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()} == before and hidden(tmp_path) == []


def test_a_failed_rename_puts_the_earlier_result_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = tmp_path / "take" / "%05d.png"
    write(pattern, frames(2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()}
    replace_path = os.replace

    def second_fails(src: Path, dst: Path) -> None:
        if str(src).endswith(".tmp"):
            raise OSError(18, "Invalid cross-device link")
        replace_path(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(ResourceError, match="cannot write the result's frames"):
        write(pattern, frames(3, seed=1))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()} == before and hidden(tmp_path) == []


def test_a_file_put_into_the_folder_during_the_run_is_not_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "take"
    w = SequenceWriter(folder / "%05d.png", 25, 24, 24)
    w.write(frames(1)[0])
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    with pytest.raises(ResourceError, match=r"now holds mine\.txt.*nothing was replaced, the 1 frames are in") as err:
        w.close()
    kept = Path(str(err.value).rsplit(" are in ", 1)[1])
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"] and (kept / "00001.png").is_file()
    assert kept.name.startswith("take.frames-")  # (visible, and a name no later write's cleanup takes)
    (folder / "mine.txt").unlink()
    write(folder / "%05d.png", frames(1))  # (a later write of the result, its cleanup run)
    assert (kept / "00001.png").is_file()


def test_crf_is_refused_and_odd_sizes_taken(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="PNG frames are lossless"):
        SequenceWriter(tmp_path / "a" / "%05d.png", 25, 24, 24, crf=18)
    write(tmp_path / "b" / "%05d.png", [f[:, :23] for f in frames(2)])
    assert Image.open(tmp_path / "b" / "00002.png").size == (23, 24)


# ---------------------------------------------------------------------------------------------- the sound


def pcm_source(path: Path, seconds: float, rate: int = 16000) -> np.ndarray:
    """A mono 16-bit PCM file (Matroska) whose samples all differ from their neighbours; returns them. (Its frames
    are 100 ms long: Matroska's timestamps are whole milliseconds.)"""
    n = int(seconds * rate)
    samples = ((np.arange(n) * 7) % 60000 - 30000).astype(np.int16)
    with av.open(str(path), "w") as c:
        stream = c.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        for start in range(0, n, rate // 10):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, start:start + rate // 10]), format="s16",
                                           layout="mono")
            f.sample_rate, f.pts = rate, start
            c.mux(stream.encode(f))
        c.mux(stream.encode(None))
    return samples


def wav(path: Path) -> tuple[str, int, np.ndarray]:
    """A WAV file's codec, rate and samples."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(stream)])
        return stream.codec_context.name, stream.codec_context.sample_rate, samples


def test_the_sound_goes_beside_the_frames_from_the_first_frames_sample(tmp_path: Path) -> None:
    """The result's sound is a 16-bit WAV in the folder holding exactly the source's samples under the frames
    (10 frames at 10 fps from 0.5 s: 1 s from sample 8000); the folder, sound and all, is replaced by the next
    result, and a result without sound leaves no earlier sound behind."""
    samples = pcm_source(tmp_path / "sound.mkv", 3.0)
    folder = tmp_path / "take"
    with SequenceWriter(folder / "%05d.png", 10, 24, 24, audio_source=tmp_path / "sound.mkv",
                        audio_offset=Fraction(1, 2)) as w:
        for f in frames(10):
            w.write(f)
    assert w.has_sound
    codec, rate, got = wav(folder / "audio.wav")
    assert (codec, rate) == ("pcm_s16le", 16000) and np.array_equal(got, samples[8000:24000])
    write(folder / "%05d.png", frames(2, seed=1), fps=10)  # replaced: no sound this time
    assert sorted(p.name for p in folder.iterdir()) == ["00001.png", "00002.png"] and hidden(tmp_path) == []


def test_a_silent_unreadable_or_unwritable_sound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source without sound gives frames alone; an unreadable one fails before any frame (nothing left behind);
    a sound file that cannot be written fails the result and keeps the earlier one; a folder named like the sound
    file is no sound and is refused."""
    import errno

    silent = write_plain_driver(tmp_path / "silent.mp4")
    write(tmp_path / "a" / "%05d.png", frames(2), audio_source=silent)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00001.png", "00002.png"]
    with pytest.raises(InputError, match=r"missing\.mp4"):
        SequenceWriter(tmp_path / "b" / "%05d.png", 25, 24, 24, audio_source=tmp_path / "missing.mp4")
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(InputError, match=r"notes\.txt: not a readable audio source file"):
        SequenceWriter(tmp_path / "b" / "%05d.png", 25, 24, 24, audio_source=tmp_path / "notes.txt")
    assert not (tmp_path / "b").exists() and hidden(tmp_path) == []

    pcm_source(tmp_path / "sound.mkv", 1.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def full_disk(self: Soundtrack, path: Path, duration: Fraction) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Soundtrack, "write", full_disk)
    with pytest.raises(ResourceError, match=r"cannot write the result's frames .*No space left"):
        write(tmp_path / "a" / "%05d.png", frames(3, seed=1), audio_source=tmp_path / "sound.mkv")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before and hidden(tmp_path) == []
    (tmp_path / "a" / "audio.wav").mkdir()
    with pytest.raises(InputError, match=r"holds audio\.wav besides frames"):
        SequenceWriter(tmp_path / "a" / "%05d.png", 25, 24, 24)


def test_inspect_describes_a_sound_alone(tmp_path: Path) -> None:
    """inspect on a sound (an --audio file, a sequence's audio.wav): codec, rate, channels, duration; a file that is
    no media is named."""
    from megactor_rt.describe import describe

    pcm_source(tmp_path / "sound.mkv", 1.5)
    write(tmp_path / "take" / "%05d.png", frames(5), fps=10, audio_source=tmp_path / "sound.mkv")
    assert describe(tmp_path / "take" / "audio.wav") == {"kind": "audio", "codec": "pcm_s16le", "sample_rate": 16000,
                                                         "channels": 1, "duration_s": 0.5}
    assert describe(tmp_path / "sound.mkv", faces=False)["duration_s"] == 1.5
    (tmp_path / "notes.mp4").write_text("not media")
    with pytest.raises(InputError, match=r"notes\.mp4: not a readable"):
        describe(tmp_path / "notes.mp4")


def test_a_results_sound_goes_with_its_frames_and_drives_again(tmp_path: Path) -> None:
    """animate_to_file: a sequence result gets the driver's sound (as long as its frames); driven again, the
    sequence's sound is the next result's (a video's audio, or a sequence's sound file), unless audio=False;
    inspect names it."""
    from megactor_rt.describe import describe
    from megactor_rt.media import probe_video

    driver = write_face_driver(tmp_path / "talk.mp4", n=6, fps=25, audio=True)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2))
    anim.animate_to_file(PORTRAIT, driver, tmp_path / "a" / "%05d.png")
    codec, rate, got = wav(tmp_path / "a" / "audio.wav")
    assert codec == "pcm_s16le" and len(got) == round(rate * 6 / 25) and np.abs(got).max() > 1000
    assert describe(tmp_path / "a", faces=False)["audio"] == "audio.wav"
    anim.animate_to_file(PORTRAIT, tmp_path / "a", tmp_path / "again.mp4", face_crop=False)  # (random model: no face)
    info = probe_video(tmp_path / "again.mp4")
    assert info.has_audio and info.num_frames == 6
    anim.animate_to_file(PORTRAIT, tmp_path / "a" / "%05d.png", tmp_path / "b" / "%05d.png", audio=False,
                         face_crop=False)
    assert not (tmp_path / "b" / "audio.wav").exists()
    assert describe(tmp_path / "b", faces=False)["audio"] is False


def test_a_stale_temporary_folder_of_a_killed_write_is_removed(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".take.0123abcd.tmp", tmp_path / ".take.4567cdef.tmp"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "00001.png").write_bytes(b"")
    for p in (stale / "00001.png", stale):
        os.utime(p, (1e9, 1e9))
    write(tmp_path / "take" / "%05d.png", frames(1))
    assert hidden(tmp_path) == [fresh.name]  # a running writer's is not touched


def test_an_input_in_the_sequence_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shot"
    folder.mkdir()
    driver = folder / "plate.mp4"
    driver.write_bytes(b"")
    with pytest.raises(InputError, match="the driver .*plate.mp4 .* is in the result's folder"):
        check_not_an_input(folder / "%05d.png", driver=driver)
    check_not_an_input(tmp_path / "other" / "%05d.png", driver=driver)


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_driver(tmp_path_factory.mktemp("seq_media") / "clip.mp4", n=6, fps=25, audio=True)


def test_animate_to_file_writes_the_runs_frames_exactly(driver: Path, tmp_path: Path) -> None:
    cfg = AnimateConfig(steps=2, window=4, overlap=2, max_frames=5)
    anim = Animator.demo(seed=0, device="cpu", config=cfg)
    streamed = list(anim.animate(anim.prepare(PORTRAIT), driver))
    anim.animate_to_file(PORTRAIT, driver, tmp_path / "take" / "%05d.png")
    written = read(tmp_path / "take")
    assert len(written) == len(streamed) == 5 and all(np.array_equal(a, b) for a, b in zip(written, streamed))
    settings = result_settings(tmp_path / "take" / "%05d.png")
    assert settings is not None and settings["driver"] == "clip.mp4" and settings["config"]["max_frames"] == 5
    assert result_settings(tmp_path / "take") == settings == result_settings(tmp_path / "take" / "00003.png")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = build_models(tiny_config(), seed=0)
    states = {name: module.state_dict() for name, module in models.modules().items()}
    return write_converted(tiny_config(), states, tmp_path_factory.mktemp("seq_weights") / "tiny")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_batches_jobs_files_skip_existing_and_inspect(weights: Path, driver: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """--format png gives each pair a folder of frames; --skip-existing keeps a sequence that is there; a jobs
    file's .png row writes one, its folders created; inspect reads a sequence's rate, frames and settings."""
    second = driver.with_name("clip2.mp4")
    second.write_bytes(driver.read_bytes())
    common = ("--weights", weights, "--device", "cpu", *FAST, "--max-frames", 3)
    out = tmp_path / "results"
    code, stdout, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", driver, second, "-o", out,
                            "--format", "png", *common, "--first-number", 1001)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["portrait_clip", "portrait_clip2"]
    assert sorted(p.name for p in (out / "portrait_clip").iterdir()) == ["01001.png", "01002.png", "01003.png",
                                                                         "audio.wav"]  # (the driver's sound)
    first = out / "portrait_clip" / "01001.png"
    os.utime(first, (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, stdout, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", driver, second, "-o", out,
                                "--format", "png", *common, "--skip-existing")
    assert code == 0 and stdout.count("kept ") == 2 and first.stat().st_mtime == 1e9, err
    assert "other settings than this run's: first_number 1001 (now None)" in caplog.text  # (kept without a word)

    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output\n{PORTRAIT},{driver},shots/a/%04d.png\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, *common)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "shots" / "a").iterdir()) == ["0001.png", "0002.png", "0003.png",
                                                                            "audio.wav"]
    assert all(np.array_equal(a, b) for a, b in zip(read(tmp_path / "shots" / "a"), read(out / "portrait_clip")))

    code, stdout, err = run(capsys, "inspect", tmp_path / "shots" / "a" / "%04d.png", "--json", "--no-faces")
    assert code == 0, err
    report = json.loads(stdout)[str(tmp_path / "shots" / "a" / "%04d.png")]
    assert (report["kind"], report["size"], report["fps"], report["frames"], report["numbers"]) == \
        ("frame sequence", "128x128", "25", 3, "1-3")
    assert report["made_with"]["driver"] == "clip.mp4" and "missing_frames" not in report
    code, stdout, err = run(capsys, "inspect", tmp_path / "shots" / "a", "--json", "--no-faces")  # the folder
    assert code == 0 and json.loads(stdout)[str(tmp_path / "shots" / "a")]["numbers"] == "1-3", err
    (tmp_path / "shots" / "a" / "0002.png").unlink()  # a gap: named
    code, stdout, err = run(capsys, "inspect", tmp_path / "shots" / "a", "--json", "--no-faces")
    report = json.loads(stdout)[str(tmp_path / "shots" / "a")]
    assert code == 0 and (report["missing_frames"], report["first_missing"]) == (1, "0002.png"), err


def test_cli_refuses_a_sequence_onto_a_folder_of_other_files_before_the_weights_load(
        weights: Path, driver: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("x")

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Animator, "from_weights", load)
    code, _, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", driver, "-o", tmp_path / "%05d.png",
                       "--weights", weights, "--device", "cpu")
    assert code == 2 and "holds notes.txt besides frames named 00001.png" in err
    code, _, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", driver, "-o", tmp_path / "s" /
                       "%05d.png", "--weights", weights, "--device", "cpu", "--crf", 18)
    assert code == 2 and "PNG frames are lossless" in err
    code, _, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", driver, "-o", tmp_path / "s.mp4",
                       "--weights", weights, "--device", "cpu", "--first-number", 1001)
    assert code == 2 and "first_number (--first-number) numbers the frames of a PNG sequence result" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- as drivers


def plate(folder: Path, content: list[np.ndarray], name: str = "img_%04d.png", first: int = 1001) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(content):
        Image.fromarray(f).save(folder / (name % (first + i)))
    return folder / name


def test_inspect_names_a_frame_of_another_size(tmp_path: Path) -> None:
    """A plate one of whose frames has another size (re-rendered, replaced by hand), which a run refuses at that
    frame, is said so by inspect, naming the first such frame and its upright size (was: the first frame's size
    alone); a JPEG stored turned, whose EXIF orientation makes it upright at the plate's size, is no other size."""
    from megactor_rt.describe import describe

    pattern = plate(tmp_path / "png", frames(4, size=64), name="%04d.png", first=1)
    assert "other_sizes" not in describe(pattern, faces=False)
    Image.fromarray(frames(1, size=96)[0]).save(tmp_path / "png" / "0003.png")
    assert describe(pattern, faces=False)["other_sizes"] == "1 frame of another size than the first (first: " \
        "0003.png, 96x96): a driver's frames must all have one size"
    with pytest.raises(InputError, match="0003.png: 96x96 px, the sequence's first frame 0001.png is 64x64"):
        list(FrameSequence(pattern))  # (what a run says, at that frame)

    content = [np.zeros((64, 80, 3), np.uint8)] * 3
    pattern = plate(tmp_path / "jpg", content, name="f_%03d.jpg", first=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 high, 64 wide: upright 80x64, as the others
    Image.fromarray(np.zeros((80, 64, 3), np.uint8)).save(tmp_path / "jpg" / "f_002.jpg", exif=exif)
    assert "other_sizes" not in describe(pattern, faces=False)
    assert len(list(FrameSequence(pattern))) == 3  # (a run takes it likewise)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "jpg" / "f_002.jpg", exif=exif)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "jpg" / "f_003.jpg")
    assert describe(pattern, faces=False)["other_sizes"] == "2 frames of another size than the first (first: " \
        "f_002.jpg, 64x64): a driver's frames must all have one size"


def test_inspect_turns_a_png_frame_by_its_exif_orientation_as_a_run_does(tmp_path: Path) -> None:
    """A PNG frame with an eXIf chunk (a phone's screenshot, an editor keeping the EXIF) is read upright by a run, as
    a JPEG is: inspect took its size from IHDR alone, so a frame stored turned at the plate's upright size was called
    another size (the run takes it), and one stored at the plate's size but turned by its EXIF was not (the run
    refuses it)."""
    from megactor_rt.describe import describe

    pattern = plate(tmp_path / "png", [np.zeros((64, 80, 3), np.uint8)] * 3, name="%04d.png", first=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((80, 64, 3), np.uint8)).save(tmp_path / "png" / "0002.png", exif=exif)
    assert len(list(FrameSequence(pattern))) == 3  # (a run takes it: upright 80x64)
    assert "other_sizes" not in describe(pattern, faces=False)
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "png" / "0002.png", exif=exif)
    with pytest.raises(InputError, match="0002.png: 64x80 px, the sequence's first frame 0001.png is 80x64"):
        list(FrameSequence(pattern))
    assert describe(pattern, faces=False)["other_sizes"] == "1 frame of another size than the first (first: " \
        "0002.png, 64x80): a driver's frames must all have one size"


def test_inspect_of_a_sequence_with_a_png_frame_whose_exif_is_cut_short(tmp_path: Path) -> None:
    """A PNG frame whose eXIf chunk is cut short (Pillow raises struct.error reading it) leaves its size unknown to
    inspect's check of the frames' sizes, which reports the sequence (was: "unexpected error: error: unpack
    requires a buffer of 4 bytes", exit 1, since the eXIf chunk was read)."""
    import struct
    import zlib

    from megactor_rt.describe import describe

    pattern = plate(tmp_path / "png", [np.zeros((64, 80, 3), np.uint8)] * 3, name="%04d.png", first=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()[:12]  # (its header and the start of its first entry)
    raw = (tmp_path / "png" / "0002.png").read_bytes()
    at = raw.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    (tmp_path / "png" / "0002.png").write_bytes(raw[:at] + chunk + raw[at:])
    report = describe(pattern, faces=False)
    assert report["frames"] == 3 and "other_sizes" not in report


def test_inspect_names_a_jpeg_frame_cut_short_but_not_one_with_bytes_after_its_end(tmp_path: Path) -> None:
    """A JPEG frame cut short (a render or copy stopped midway) is named by inspect as a frame a run cannot read
    (was: the sequence reported whole, the run stopping at it); a whole JPEG with bytes appended after its end, or
    a progressive one, or one whose EXIF thumbnail has an end marker of its own, is no such frame."""
    from megactor_rt.describe import describe

    pattern = plate(tmp_path / "jpg", frames(5, size=64), name="f_%03d.jpg", first=1)
    exif = Image.Exif()
    exif[0x0112] = 1
    thumb = Image.fromarray(frames(1, size=16)[0])
    exif_bytes = exif.tobytes()
    Image.fromarray(frames(1, size=64, seed=1)[0]).save(tmp_path / "jpg" / "f_004.jpg", progressive=True)
    Image.fromarray(frames(1, size=64, seed=2)[0]).save(tmp_path / "jpg" / "f_005.jpg", exif=exif_bytes)
    with open(tmp_path / "jpg" / "f_003.jpg", "ab") as f:
        f.write(b"appended by a camera")
    assert len(list(FrameSequence(pattern))) == 5 and "unreadable_frames" not in describe(pattern, faces=False)
    for name in ("f_002.jpg", "f_005.jpg"):
        whole = (tmp_path / "jpg" / name).read_bytes()
        if name == "f_005.jpg":  # (an EXIF thumbnail, its own end marker before the picture's)
            thumb.save(tmp_path / "t.jpg")
            at = whole.index(b"\xff\xdb")  # the picture's own segments after the APP segments
            app = b"\xff\xe1" + (2 + len(t := (tmp_path / "t.jpg").read_bytes())).to_bytes(2, "big") + t
            whole = whole[:at] + app + whole[at:]
        (tmp_path / "jpg" / name).write_bytes(whole[:len(whole) * 2 // 3])
    assert describe(pattern, faces=False)["unreadable_frames"] == "2 frames a run cannot read (first: f_002.jpg, a " \
        "JPEG cut short: it lacks the marker that ends a JPEG (EOI) and does not decode)"
    with pytest.raises(InputError, match="f_002.jpg: image is corrupt or truncated"):
        list(FrameSequence(pattern))  # (what a run says, at that frame)


def test_an_image_sequence_reads_its_frames_in_number_order_at_its_rate(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    content = frames(12, size=64)
    pattern = plate(tmp_path / "plate", content)
    (tmp_path / "plate" / "notes.txt").write_text("ignored")  # other files beside a driver's frames are fine
    with caplog.at_level(logging.WARNING, logger="megactor_rt.sequence"):
        seq = FrameSequence(pattern)
        FrameSequence(pattern)  # (a run's second pass: said once)
    assert (len(seq), seq.first_number, seq.fps, seq.name) == (12, 1001, 25, "plate/img_%04d.png")
    assert caplog.text.count("the frames record no rate; taken as 25 fps") == 1
    assert all(np.array_equal(a, b) for a, b in zip(seq, content, strict=True)) and np.array_equal(seq[-1], content[-1])
    assert FrameSequence(pattern, Fraction(30000, 1001)).fps == Fraction(30000, 1001)
    write(tmp_path / "made" / "%05d.png", content[:3], Fraction(24))
    assert FrameSequence(tmp_path / "made" / "%05d.png").fps == 24  # as the engine's result records it


@pytest.mark.parametrize(("case", "problem"), [
    ("gap", r"2 frame\(s\) missing between img_1001.png and img_1006.png: img_1003.png, img_1004.png; a sequence's "
            "frames must be consecutive"),
    ("none", r"no frame named by this pattern in .*plate \(e.g. img_0001.png\)"),
    ("folder", "the folder .*nowhere does not exist"),
    ("rate", "the frame rate must be positive"),
    ("size", r"img_1004.png: 80x64 px, the sequence's first frame img_1001.png is 64x64: every frame must have one"),
])
def test_a_broken_image_sequence_is_named(tmp_path: Path, case: str, problem: str) -> None:
    pattern = plate(tmp_path / "plate", frames(6, size=64))
    fps = None
    if case == "gap":
        for n in (1003, 1004):
            (tmp_path / "plate" / f"img_{n}.png").unlink()
    elif case == "none":
        pattern = tmp_path / "plate" / "img_%04d.png"
        for p in (tmp_path / "plate").iterdir():
            p.unlink()
    elif case == "folder":
        pattern = tmp_path / "nowhere" / "%04d.png"
    elif case == "size":
        Image.fromarray(frames(1, size=80)[0][:64]).save(tmp_path / "plate" / "img_1004.png")
    else:
        fps = 0.0
    with pytest.raises(InputError, match=problem):
        list(FrameSequence(pattern, fps))


@pytest.mark.parametrize(("names", "found"), [
    (["p.1001.png", "p.1002.png", "notes.txt", "p.1003.png"], "p.%04d.png"),
    (["0001.jpg", "0002.jpg"], "%04d.jpg"),
    (["f8.png", "f9.png", "f10.png"], "f%d.png"),
    (["p098.png", "p099.png", "p100.png", "p1000.png"], "p%03d.png"),  # beyond the padding (was %d: 098 left out)
    (["0001.png", "._0001.png", "0002.png", "._0002.png"], "%04d.png"),  # macOS's (was: "several sequences")
    (["IMG_2023_07.tif", "IMG_2023_08.tif"], "IMG_2023_%02d.tif"),
    # the frame number is not the last number (was: shot_0001_v%d.png, ... each frame a sequence of its own)
    (["shot_0001_v2.png", "shot_0002_v2.png", "shot_0003_v2.png"], "shot_%04d_v2.png"),
    (["a_0001_v1.png", "a_0002_v1.png", "a_0001_v2.png", "a_0002_v2.png"],
     r"holds several image sequences .a_%04d_v1.png, a_%04d_v2.png.; name the one to use"),
    (["a_1.png", "b_1.png"], "holds several image sequences .a_%d.png, b_%d.png.; name the one to use"),
    (["readme.txt", "cover.png"], "holds no numbered image"),
])
def test_a_folder_of_frames_names_its_one_sequence(tmp_path: Path, names: list[str], found: str) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    if found.endswith(("png", "jpg", "tif")):
        assert find_pattern(tmp_path) == tmp_path / found
    else:
        with pytest.raises(InputError, match=found):
            find_pattern(tmp_path)


def test_a_pattern_of_the_wrong_padding_names_the_sequence_the_folder_holds(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """%03d given for 0001.png ...: the error names the path as typed and the pattern of the frames there (was:
    the absolute path, and no word of the right pattern)."""
    (tmp_path / "plate").mkdir()
    for n in (1, 2, 3):
        (tmp_path / "plate" / f"{n:04d}.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as caught:
        FrameSequence("plate/%03d.png")
    assert str(caught.value) == "plate/%03d.png: no frame named by this pattern in plate (e.g. 001.png); it holds " \
        "plate/%04d.png (3 frames)"
    (tmp_path / "plate" / "0002.png").unlink()
    with pytest.raises(InputError, match=r"^plate/%04d.png: 1 frame\(s\) missing between 0001.png and 0003.png"):
        FrameSequence("plate/%04d.png")  # (was the absolute path too)


def test_an_openexr_plate_is_said_to_be_unread_not_broken(tmp_path: Path) -> None:
    """An OpenEXR plate (which Pillow does not read) is refused as such, as a pattern or a folder, before any frame
    is read (was: "not a readable image" of its first frame, as if broken, or "no numbered image" of its folder)."""
    from megactor_rt.describe import describe

    for n in (1001, 1002):
        (tmp_path / f"s.{n}.exr").write_bytes(b"\x76\x2f\x31\x01")  # (OpenEXR's magic number)
    for refuse in (FrameSequence, lambda p: describe(p, faces=False)):
        with pytest.raises(InputError, match=r"s.%04d.exr: OpenEXR frames are not read \(Pillow reads no OpenEXR\): "
                                             "convert them to 16-bit PNG or TIFF"):
            refuse(tmp_path / "s.%04d.exr")
    with pytest.raises(InputError, match="holds no numbered image .*; its OpenEXR frames are not read: convert"):
        find_pattern(tmp_path)


def test_a_frame_saved_in_another_format_names_the_plate_as_the_one_to_use(tmp_path: Path) -> None:
    """A plate with one frame saved apart (1004.jpg among 1001-1008.png) names the plate's pattern as the example,
    with its frame count (was the one-frame '%d.jpg', the first by name)."""
    for name in ["1001.png", "1002.png", "1003.png", "1004.jpg", "1005.png", "1006.png"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError, match=r"several image sequences \(%04d\.png, %d\.jpg\); name the one to use by "
                                         r"its pattern, e\.g\. .*%04d\.png \(5 frames\)$"):
        find_pattern(tmp_path)


def test_a_sequence_drives_as_its_frames_in_memory_do(tmp_path: Path) -> None:
    """An image sequence animates exactly as the same frames handed over in memory; a checkpoint knows the
    sequence by its frames (another version of a frame is another driver)."""
    tmp_path_frames = write_face_frames(tmp_path)
    content = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(tmp_path_frames.iterdir())]
    cfg = AnimateConfig(steps=2, window=4, overlap=2)
    anim = Animator.demo(seed=0, device="cpu", config=cfg)
    state = anim.prepare(PORTRAIT)
    from_files = list(anim.animate(state, tmp_path_frames / "%03d.png"))
    in_memory = list(anim.animate(state, DriverFrames(content, fps=25)))
    assert len(from_files) == len(content) == 6
    assert all(np.array_equal(a, b) for a, b in zip(from_files, in_memory))
    source = driver_source(tmp_path_frames / "%03d.png")
    before = driver_identity(source)
    assert before is not None and driver_identity(DriverFrames(content, fps=25)) is None
    Image.fromarray(content[0][::-1]).save(tmp_path_frames / "001.png")
    os.utime(tmp_path_frames / "001.png", ns=(10**18, 10**18))
    assert driver_identity(source) != before


def write_face_frames(tmp_path: Path) -> Path:
    """The face driver's 6 frames as a PNG sequence 001.png ... (lossless: the same pixels as decoded)."""
    clip = write_face_driver(tmp_path / "clip.mp4", n=6, fps=25)
    folder = tmp_path / "faces"
    folder.mkdir()
    from megactor_rt.media import iter_video_frames

    for i, f in enumerate(iter_video_frames(clip), 1):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    return folder


def test_cli_drives_with_an_image_sequence_at_its_given_rate(weights: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """--driver plate/%04d.png at --sequence-fps; a batch names its result by the sequence's folder; a gap in the
    numbers or a result sequence onto the driver's own frames is refused before the weights load."""
    folder = write_face_frames(tmp_path)
    common = ("--portrait", PORTRAIT, "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 3)
    code, _, err = run(capsys, "animate", "--driver", folder / "%03d.png", "-o", tmp_path / "r.mp4", *common,
                       "--sequence-fps", "30000/1001")
    assert code == 0, err
    from megactor_rt.media import probe_video

    info = probe_video(tmp_path / "r.mp4")
    assert (info.num_frames, info.fps, info.has_audio) == (3, Fraction(30000, 1001), False)
    code, stdout, err = run(capsys, "animate", "--driver", folder, tmp_path / "clip.mp4", "-o",
                            tmp_path / "batch", *common)  # (a folder of frames drives as its one sequence)
    assert code == 0 and sorted(p.name for p in (tmp_path / "batch").iterdir()) == \
        ["portrait_clip.mp4", "portrait_faces.mp4"], err
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output,sequence_fps\n{PORTRAIT},faces/%03d.png,j24.mp4,24\n"
                    f"{PORTRAIT},faces/%03d.png,j.mp4,\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, *common[2:], "--sequence-fps", 12)
    assert code == 0, err
    assert (probe_video(tmp_path / "j24.mp4").fps, probe_video(tmp_path / "j.mp4").fps) == (24, 12)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):  # (kept: made at 24 and 12; asked for 24 and 25)
        code, _, err = run(capsys, "animate", "--jobs", jobs, *common[2:], "--sequence-fps", 25, "--skip-existing")
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert said == [f"kept {tmp_path / 'j.mp4'} was made with other settings than this run's: sequence_fps 12 "
                    "(now 25)"], said

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Animator, "from_weights", load)
    for given in (folder / "%03d.png", folder):
        code, _, err = run(capsys, "animate", "--driver", given, "-o", folder / "%03d.png", *common)
        assert code == 2 and "is in the result's folder, which the frames replace as a whole" in err
    jobs.write_text(f"portrait,driver,output\n{PORTRAIT},faces/%03d.png,x.mp4\n{PORTRAIT},clip.mp4,faces/%03d.png\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, *common[2:])
    assert code == 2 and f"{jobs}:3: " in err and "would overwrite an input of this run (of this job or another)" in err
    (folder / "004.png").unlink()
    code, _, err = run(capsys, "animate", "--driver", folder / "%03d.png", "-o", tmp_path / "x.mp4", *common)
    assert code == 2 and "1 frame(s) missing between 001.png and 006.png: 004.png" in err
    assert not (tmp_path / "x.mp4").exists() and len(list(folder.iterdir())) == 5


def test_a_video_whose_name_holds_a_percent_d_is_read_as_the_video(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An existing file named like a pattern (``100%dance.mp4``) is the video it is, through the API and the CLI
    (was: read as an image sequence with no frame named by its pattern)."""
    from megactor_rt.media import file_name
    from megactor_rt.sequence import is_frame_pattern, sequence_pattern

    video = write_face_driver(tmp_path / "100%dance.mp4", n=3)
    assert not is_frame_pattern(video) and sequence_pattern(video) is None and file_name(video) == "100%dance.mp4"
    assert driver_source(video) == video and driver_source(str(video)) == video
    assert is_frame_pattern(tmp_path / "100%dance" / "%03d.png")  # (a pattern of no file still is one)
    out = tmp_path / "r.mp4"
    code, _, err = run(capsys, "demo", "--portrait", PORTRAIT, "--driver", video, "-o", out, *FAST, "--max-frames", 2,
                       "--no-audio")
    assert code == 0 and out.is_file(), err


def test_sequence_fps_is_taken_for_a_folder_driver_and_said_to_be_ignored_for_a_video(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    folder = write_face_frames(tmp_path)
    common = ("demo", "--portrait", PORTRAIT, *FAST, "--max-frames", 3, "--sequence-fps", 24, "--no-audio")
    with caplog.at_level(logging.WARNING, "megactor_rt"):
        code, _, err = run(capsys, *common, "--driver", folder, "-o", tmp_path / "f.mp4")
    assert code == 0 and "--sequence-fps sets the rate" not in caplog.text, err
    from megactor_rt.media import probe_video

    assert probe_video(tmp_path / "f.mp4").fps == 24
    video = write_face_driver(tmp_path / "talk.mp4", n=4)
    with caplog.at_level(logging.WARNING, "megactor_rt"):
        code, _, err = run(capsys, *common, "--driver", video, "-o", tmp_path / "v.mp4")
    assert code == 0 and "--sequence-fps sets the rate of image-sequence drivers" in caplog.text, err


def test_a_result_sequence_takes_the_numbers_of_the_plate_it_animates(tmp_path: Path) -> None:
    """Driven by an image sequence at its own rate, a sequence result's frames carry the driver frames' numbers
    (from --start's first one); at another rate they count from 1."""
    folder = write_face_frames(tmp_path)
    plate_dir = tmp_path / "plate"
    plate_dir.mkdir()
    for i, p in enumerate(sorted(folder.iterdir())):
        p.rename(plate_dir / f"p.{1001 + i}.png")
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2))
    anim.animate_to_file(PORTRAIT, plate_dir / "p.%d.png", tmp_path / "a" / "%04d.png",
                         config=replace(anim.config, start=0.08))  # 2 frames in at 25 fps
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1003.png", "1004.png", "1005.png", "1006.png"]
    anim.animate_to_file(PORTRAIT, sequence_driver(plate_dir / "p.%d.png", fps=50), tmp_path / "b" / "%04d.png",
                         config=replace(anim.config, fps=25))  # every second frame
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["0001.png", "0002.png", "0003.png"]
    anim.animate_to_file(PORTRAIT, plate_dir / "p.%d.png", tmp_path / "c" / "%04d.png", first_number=0,
                         config=replace(anim.config, max_frames=2))  # numbered as asked instead
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(InputError, match="first_number .--first-number. numbers the frames of a PNG sequence"):
        anim.animate_to_file(PORTRAIT, plate_dir / "p.%d.png", tmp_path / "d.mp4", first_number=1001)


def test_a_sequence_larger_than_the_free_space_is_said_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """animate_to_file warns before any frame where the frames it will write (about 0.4 bytes per pixel and colour,
    counted from the driver's header and the settings) need more than the disk's free space; not where they fit."""
    import shutil

    from megactor_rt.runtime.driver import FrameSelection

    driver = write_face_driver(tmp_path / "clip.mp4", n=6, fps=25)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2))
    frame_bytes = 128 * 128 * 3 * 0.4  # the demo model's 128 px frames
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=int(3.5 * frame_bytes)))
    first: list[int] = []  # how many warnings were logged when the first frame was written

    def progress(p: object) -> None:
        if not first and getattr(p, "stage", None) == "write":
            first.append(len([r for r in caplog.records if "PNG frames of" in r.getMessage()]))

    with caplog.at_level(logging.WARNING, logger="megactor_rt.sequence"):
        anim.animate_to_file(PORTRAIT, driver, tmp_path / "a" / "%05d.png", on_progress=progress,
                             config=replace(anim.config, max_frames=4))
        assert first == [1] and "4 8-bit PNG frames of 128x128 take about 78.6 kB, but only 68.8 kB are free" in caplog.text
        caplog.clear()
        anim.animate_to_file(PORTRAIT, driver, tmp_path / "b" / "%05d.png", config=replace(anim.config, max_frames=3))
        assert "PNG frames of" not in caplog.text  # 3 frames fit
    # the count: the header's frames from --start at the result's rate, within --duration and --max-frames
    from megactor_rt.media import VideoInfo

    info = VideoInfo(path=Path("x.mp4"), width=64, height=64, fps=Fraction(60), num_frames=100, has_audio=False,
                     duration_s=100 / 60)
    sel = FrameSelection.of(Fraction(60), 30, 0.5)  # every second frame from frame 30
    assert sel.expected_frames(info) == 35
    assert sel.expected_frames(info, duration=0.4) == 12 and sel.expected_frames(info, max_frames=10) == 10
    assert sel.expected_frames(replace(info, num_frames=None)) == 35
    assert sel.expected_frames(replace(info, num_frames=None, duration_s=None)) is None


# ---------------------------------------------------------------------------------------------- 16-bit frames


def test_16_bit_frames_are_written_exactly_and_keep_their_text(tmp_path: Path) -> None:
    """bit_depth=16: uint16 frames as 16-bit PNG, read back exactly (OpenCV), with the rate and settings chunks that
    Pillow reads (and its 8-bit view: the high byte); inspect says the depth; a writer takes only its own depth."""
    import cv2

    from megactor_rt.describe import describe

    content = [np.random.default_rng(i).integers(0, 65536, (64, 70, 3), dtype=np.uint16) for i in range(3)]
    write(tmp_path / "t" / "%03d.png", content, fps=Fraction(30000, 1001), bit_depth=16,
          metadata={"comment": json.dumps({"portrait": "café.png"})})
    for i, frame in enumerate(content, 1):
        back = cv2.cvtColor(cv2.imread(str(tmp_path / "t" / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        assert back.dtype == np.uint16 and np.array_equal(back, frame)
    from megactor_rt.sequence import frame_text

    assert frame_text(tmp_path / "t" / "002.png") == {"fps": "30000/1001", "Comment": '{"portrait": "caf\\u00e9.png"}'}
    assert FrameSequence(tmp_path / "t" / "%03d.png").fps == Fraction(30000, 1001)
    assert np.array_equal(FrameSequence(tmp_path / "t" / "%03d.png")[0], (content[0] >> 8).astype(np.uint8))
    report = describe(tmp_path / "t", faces=False)
    assert report["bit_depth"] == 16 and report["frames"] == 3
    write(tmp_path / "e" / "%03d.png", frames(1, size=64))
    assert describe(tmp_path / "e", faces=False)["bit_depth"] == 8
    shutil.copy(tmp_path / "e" / "001.png", tmp_path / "t" / "004.png")  # a plate of both depths
    assert describe(tmp_path / "t", faces=False)["bit_depth"] == "mixed: 8 (1 frame), 16 (3 frames)"
    Image.fromarray(frames(1, size=64)[0]).quantize(16).save(tmp_path / "e" / "002.png", bits=4)  # a 4-bit palette
    assert describe(tmp_path / "e", faces=False)["bit_depth"] == 8
    with pytest.raises(ValueError, match=r"expected a \(64, 70, 3\) uint8 frame, got \(64, 70, 3\) uint16"):
        write(tmp_path / "u" / "%03d.png", content)
    with pytest.raises(ValueError, match=r"expected a \(24, 24, 3\) uint16 frame"):
        write(tmp_path / "v" / "%03d.png", frames(1), bit_depth=16)


def test_a_16_bit_run_has_the_decoders_finer_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AnimateConfig(bit_depth=16): animate() yields uint16 frames that lie within the 8-bit run's levels (the
    8-bit frames truncate the decoder's output, the 16-bit ones round it) and use the levels between them; its
    side-by-side panels and pasted-back portrait are the 8-bit pictures widened; the checkpoint key is the
    8-bit run's; a result that is one file refuses it before any work (API and CLI)."""
    from megactor_rt.runtime.checkpoint import run_key

    driver = write_face_driver(tmp_path / "talk.mp4", n=4, fps=25)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2))
    deep = anim.with_config(bit_depth=16)
    state = anim.prepare(PORTRAIT)
    eight = np.stack(list(anim.animate(state, driver)))
    sixteen = np.stack(list(deep.animate(state, driver)))
    assert eight.dtype == np.uint8 and sixteen.dtype == np.uint16 and sixteen.shape == eight.shape
    low, high = eight.astype(np.int64) * 257, (eight.astype(np.int64) + 1) * 257
    assert np.all(sixteen >= low - 2) and np.all(sixteen <= high + 2)  # (float rounding at the boundaries)
    assert (sixteen % 257 != 0).mean() > 0.9  # not 8-bit levels widened
    deep.animate_to_file(PORTRAIT, driver, tmp_path / "sbs" / "%05d.png", side_by_side=True, audio=False)
    anim.animate_to_file(PORTRAIT, driver, tmp_path / "sbs8" / "%05d.png", side_by_side=True, audio=False)
    import cv2

    wide = cv2.cvtColor(cv2.imread(str(tmp_path / "sbs" / "00002.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    narrow = np.asarray(Image.open(tmp_path / "sbs8" / "00002.png").convert("RGB"))
    assert wide.dtype == np.uint16 and np.array_equal(wide[:, :256], narrow[:, :256].astype(np.uint16) * 257)
    assert np.array_equal(wide[:, 256:], sixteen[1])
    paste = anim.paste_back(PORTRAIT)
    pasted8, pasted16 = paste(eight[0]), paste(sixteen[0])
    widened = pasted8.astype(np.int64) * 257
    t, lf, b, r = paste.box
    outside = np.ones(pasted8.shape[:2], bool)
    outside[t:b, lf:r] = False
    assert pasted16.dtype == np.uint16 and np.array_equal(pasted16[outside], widened[outside])
    assert np.abs(pasted16.astype(np.int64) - widened).max() <= 2 * 257  # (resized and blended at either depth)
    facts = {"portrait": "x"}
    assert run_key(facts, anim.config) == run_key(facts, deep.config) != run_key(facts, replace(anim.config, seed=1))
    with pytest.raises(InputError, match=r"16-bit frames \(bit_depth, --bit-depth\) go into PNG sequence results"):
        deep.animate_to_file(PORTRAIT, driver, tmp_path / "o.mp4")
    code = main(["-q", "demo", "--driver", str(driver), "-o", str(tmp_path / "o.webm"), "--bit-depth", "16"])
    assert code == 2 and "o.webm: 16-bit frames" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.webm").exists()


def test_ctrl_c_between_the_renames_puts_the_earlier_result_back(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = tmp_path / "take" / "%05d.png"
    write(pattern, frames(2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()}
    replace_path = os.replace

    def interrupted(src: Path, dst: Path) -> None:
        if str(src).endswith(".tmp"):  # Ctrl-C once the earlier result is moved aside, before the new one is in
            raise KeyboardInterrupt
        replace_path(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(pattern, frames(3, seed=1))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "take").iterdir()} == before and hidden(tmp_path) == []
