"""``--stats`` records of a jobs file's rows (``animate --jobs FILE --stats FILE``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from megactor_rt.cli import StatsFile
from megactor_rt.config import AnimateConfig
from megactor_rt.jobs import read_jobs


def test_a_rows_overlap_of_the_commands_window_is_recorded(tmp_path: Path) -> None:
    """A row's overlap 16 with --window 24 is a valid run; its record has it with the command's window (was a
    ValueError, "overlap from 0 to window - 1, got window 16", once its result was written: the batch ended there,
    the other rows not made)."""
    command = AnimateConfig(window=24, steps=2)
    path = tmp_path / "jobs.csv"
    path.write_text("portrait,driver,output,overlap,start\na.png,d.mp4,a.mp4,16,0:01\nb.png,d.mp4,b.mp4,,\n")
    jobs = read_jobs(path, command)
    record = StatsFile(tmp_path / "stats.json", "animate", [j.output for j in jobs])
    for job in jobs:
        record.add({"config": command.plain()}, job, error="(stands for a run)")
    runs = json.loads((tmp_path / "stats.json").read_text())["runs"]
    assert [(r.get("config", {}).get("window"), r.get("config", {}).get("overlap"), r.get("config", {}).get("start"))
            for r in runs] == [(24, 16, 1.0), (None, None, None)]
    assert runs[0]["config"] == {**command.plain(), "overlap": 16, "start": 1.0}


def test_a_long_jobs_file_is_checked_in_a_time_that_grows_with_its_rows(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row's result is checked against every row's inputs without comparing each pair (was 80 s before any
    work for 1000 rows of their own portraits, ~12 min for 3000); a result that is an input under another name (a
    hard link, a linked folder) is still refused."""
    from megactor_rt import media
    from megactor_rt.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from media_fixtures import face_frames, write_face_driver

    write_face_driver(tmp_path / "d.mp4", n=4)
    Image.fromarray(face_frames(1)[0]).save(tmp_path / "a.png")
    (tmp_path / "p").mkdir()
    for i in range(200):
        os.link(tmp_path / "a.png", tmp_path / "p" / f"{i}.png")
    calls = []
    compare = media.result_replaces
    monkeypatch.setattr(media, "result_replaces", lambda *a: calls.append(a) or compare(*a))
    jobs = tmp_path / "jobs.csv"
    rows = "".join(f"p/{i}.png,d.mp4,out/{i}.mp4\n" for i in range(200))
    jobs.write_text(f"portrait,driver,output\n{rows}nobody.png,d.mp4,out/x.mp4\n")  # (the last row: before any run)
    code = main(["-q", "animate", "--demo", "--jobs", str(jobs)])
    err = capsys.readouterr().err
    assert code == 2 and f"{jobs}:202: " in err and "nobody.png: portrait file does not exist" in err, err
    assert len(calls) < 200  # (was 200 x 201)
    (tmp_path / "link").symlink_to(tmp_path)
    os.link(tmp_path / "d.mp4", tmp_path / "hard.mp4")
    for output in ("hard.mp4", "link/d.mp4", "d.mp4", "link/p/%d.png"):  # (a hard link of the driver, a linked
        jobs.write_text(f"portrait,driver,output\n{rows}a.png,d.mp4,{output}\n")  # folder, a sequence over p/)
        code = main(["-q", "animate", "--demo", "--jobs", str(jobs)])
        err = capsys.readouterr().err
        assert code == 2 and f"{jobs}:202: " in err and "the result would overwrite an input of this run" in err, err


def test_kept_results_are_recorded_with_one_write(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--skip-existing --stats: the kept results of a jobs file are all in the stats file, written once (was the
    whole file again per kept result: a minute for 3000)."""
    from megactor_rt import cli

    sys.path.insert(0, str(Path(__file__).parent))
    from media_fixtures import face_frames, write_face_driver

    write_face_driver(tmp_path / "d.mp4", n=4)
    Image.fromarray(face_frames(1)[0]).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    for i in range(50):
        (tmp_path / "out" / f"{i}.mp4").write_bytes(b"")  # (kept unchecked: not a readable result, said)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output\n" + "".join(f"a.png,d.mp4,out/{i}.mp4\n" for i in range(50)))
    writes = []
    write = cli.StatsFile._write
    monkeypatch.setattr(cli.StatsFile, "_write", lambda self: writes.append(1) or write(self))
    code = cli.main(["-q", "animate", "--demo", "--jobs", str(jobs), "--skip-existing", "--stats",
                     str(tmp_path / "stats.json")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("(--skip-existing)") == 50, out
    runs = json.loads((tmp_path / "stats.json").read_text())["runs"]
    assert [r["output"] for r in runs] == [str(tmp_path / "out" / f"{i}.mp4") for i in range(50)]
    assert all(r["kept"] for r in runs) and len(writes) == 1


def test_a_rows_name_too_long_for_the_file_system_is_named_by_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A portrait, driver, mask or sound file whose name the file system cannot hold (over 255 bytes) is named with
    its row (was "unexpected error: OSError: [Errno 36] File name too long", naming no line)."""
    from megactor_rt.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from media_fixtures import face_frames, write_face_driver

    write_face_driver(tmp_path / "d.mp4", n=4)
    Image.fromarray(face_frames(1)[0]).save(tmp_path / "a.png")
    long = "x" * 300
    jobs = tmp_path / "jobs.csv"
    for row in (f"{long}.png,d.mp4,p.mp4,,", f"a.png,{long}.mp4,p.mp4,,", f"a.png,d.mp4,p.mp4,{long}.png,",
                f"a.png,d.mp4,p.mp4,,{long}.wav"):
        jobs.write_text(f"portrait,driver,output,mask,audio\na.png,d.mp4,o.mp4,,\n{row}\n")
        code = main(["-q", "animate", "--demo", "--jobs", str(jobs), "--dry-run"])
        err = capsys.readouterr().err
        assert code == 2 and f"error: {jobs}:3: {tmp_path / long}." in err and "File name too long" in err, err


def test_stats_never_overwrite_the_jobs_file_or_a_rows_sound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--stats naming the jobs file (jobs.csv for jobs.json) or a row's sound file is refused before any work (was:
    the file replaced by the stats' JSON once the first result was made)."""
    from megactor_rt.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from media_fixtures import face_frames, write_face_driver, write_sine_audio

    write_face_driver(tmp_path / "d.mp4", n=4)
    write_sine_audio(tmp_path / "song.wav", 1.0)
    Image.fromarray(face_frames(1)[0]).save(tmp_path / "a.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,audio,max_frames\na.png,d.mp4,o.mp4,song.wav,2\n")
    before = {p: p.read_bytes() for p in (jobs, tmp_path / "song.wav")}
    for stats in before:
        code = main(["-q", "animate", "--demo", "--jobs", str(jobs), "--steps", "1", "--stats", str(stats)])
        err = capsys.readouterr().err
        assert code == 2 and f"{stats}: --stats would overwrite an input of this run" in err, err
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "o.mp4").exists()
