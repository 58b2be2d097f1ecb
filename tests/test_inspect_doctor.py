"""`megactor-rt inspect` and `megactor-rt doctor` as a user runs them: each figure checked against the file made."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import folder_served

from megactor_rt.cli import main
from megactor_rt.runtime.driver import DriverFrames, driver_source


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _frames(n: int, size: int = 64) -> list[Image.Image]:
    """Distinct synthetic frames: a bright square moving left to right."""
    out = []
    for i in range(n):
        f = np.full((size, size, 3), 40, np.uint8)
        f[24:40, i * 4:i * 4 + 16] = (250, 200, 30)
        out.append(Image.fromarray(f))
    return out


def test_an_animated_webp_gives_its_stored_frames_as_a_gif_does(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An animated WebP of 6 frames, one held 200 ms among 40 ms ones, is 6 frames, 0.4 s and a variable rate, and
    a run reads 10 on its 25 fps grid, as the same GIF is said to be (was: "frames: 10", no duration)."""
    first, *rest = _frames(6)
    delays = [40, 40, 200, 40, 40, 40]
    reports = {}
    for name in ("paused.webp", "paused.gif"):
        first.save(tmp_path / name, save_all=True, append_images=rest, duration=delays, loop=0)
        code, out, err = run(capsys, "inspect", "--no-faces", "--json", tmp_path / name)
        assert code == 0, err
        reports[name] = json.loads(out)[str(tmp_path / name)]
    webp, gif = reports["paused.webp"], reports["paused.gif"]
    facts = ("frames", "duration_s", "audio", "variable_rate", "frames_in_a_run")
    assert [webp[k] for k in facts] == [gif[k] for k in facts] == [6, 0.4, False, True, 10]
    read = driver_source(tmp_path / "paused.webp")  # (what a run reads)
    assert isinstance(read, DriverFrames) and len(read.frames) == 10
    # frames of 33 and 34 ms (this engine's 30 fps WebP results) are no variable rate, and no frame is repeated
    even = tmp_path / "even.webp"
    first.save(even, save_all=True, append_images=rest, duration=[33, 34, 33, 33, 34, 33], loop=0)
    code, out, _ = run(capsys, "inspect", "--no-faces", even)
    assert code == 0 and "  frames: 6\n" in out and "variable rate: False" in out and "in a run" not in out


def test_inspect_names_the_frames_of_a_sequence_a_run_cannot_read(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A plate of 6 frames whose 3rd is empty (a render that crashed) and 5th cut short (a copy interrupted): inspect
    names them, as a run would stop at the first (was: the sequence reported whole); a whole plate has no such line."""
    plate = tmp_path / "plate"
    plate.mkdir()
    for i, frame in enumerate(_frames(6, 96), 1):
        frame.save(plate / f"{i:04d}.png")
    code, out, err = run(capsys, "inspect", "--no-faces", "--json", plate)
    assert code == 0 and "unreadable_frames" not in json.loads(out)[str(plate)], err
    (plate / "0003.png").write_bytes(b"")
    cut = (plate / "0005.png").read_bytes()
    (plate / "0005.png").write_bytes(cut[: len(cut) // 2])
    code, out, err = run(capsys, "inspect", "--no-faces", "--json", plate)
    report = json.loads(out)[str(plate)]
    assert code == 0 and report["frames"] == 6, err
    assert report["unreadable_frames"] == "2 frames a run cannot read (first: 0003.png, an empty file)"
    (plate / "0003.png").write_text("not a picture")
    code, out, _ = run(capsys, "inspect", "--no-faces", plate)
    assert "  unreadable frames: 2 frames a run cannot read (first: 0003.png, not a readable image)\n" in out
    (plate / "0003.png").unlink()
    (plate / "0002.png").rename(plate / "0003.png")  # (only the 5th unreadable: it is cut short)
    (plate / "0001.png").rename(plate / "0002.png")
    code, out, _ = run(capsys, "inspect", "--no-faces", "--json", plate)
    assert json.loads(out)[str(plate)]["unreadable_frames"] == \
        "1 frame a run cannot read (first: 0005.png, it lacks the chunk that ends a PNG, IEND)"


def test_inspect_reports_the_others_where_a_web_address_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect of two addresses and a file, one address a 404: the error names it and the others are reported, as
    where a local file is missing (was: the downloads came first, the 404 ended the command, --json printed nothing);
    no download is left behind."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (the local server is reached directly)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # (TMPDIR is read again)
    served = tmp_path / "served"
    served.mkdir()
    _frames(1, 96)[0].save(served / "me.png")
    _frames(1, 80)[0].save(tmp_path / "here.png")
    with folder_served(served) as url:
        code, out, err = run(capsys, "inspect", "--no-faces", "--json", f"{url}/gone.mp4", f"{url}/me.png",
                             tmp_path / "here.png")
    assert code == 2 and f"error: {url}/gone.mp4: the server answered 404" in err, err
    reports = json.loads(out)
    assert list(reports) == [f"{url}/me.png", str(tmp_path / "here.png")]
    assert (reports[f"{url}/me.png"]["size"], reports[str(tmp_path / "here.png")]["size"]) == ("96x96", "80x80")
    assert list(scratch.iterdir()) == []


def test_inspect_json_reports_go_by_the_paths_as_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`inspect --json ./clips/a.png clips//b.png` (a shell loop's `./clips/*`): each report is under its argument
    as typed, so a script finds it by the name it passed (was: `clips/a.png`, pathlib's spelling: a KeyError)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    for name in ("a.png", "b.png"):
        _frames(1, 96)[0].save(tmp_path / "clips" / name)
    given = ["./clips/a.png", "clips//b.png"]
    code, out, err = run(capsys, "inspect", "--no-faces", "--json", *given)
    assert code == 0, err
    reports = json.loads(out)
    assert list(reports) == given and all(reports[g]["size"] == "96x96" for g in given)


def test_inspect_help_names_what_it_takes_and_its_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """`inspect --help` names sequences (a folder or a pattern) and sound files, which it takes as the README says,
    and its exit status (was: "images, videos, results" alone)."""
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "image sequences (their folder, or their number pattern: 'take1/%05d.png', quoted)" in text
    assert "sound files" in text and "exit status 2 where one cannot be read, the others still reported" in text


def test_a_sequence_whose_first_frame_is_an_animated_png_gives_its_own_frames(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A plate of 3 PNG frames whose first is an APNG of 5 pictures (40 ms each): 3 frames, no rate recorded (a run
    reads 3 at 25 fps), as it is read (was: the APNG's 5 frames and its 25 fps as the plate's, recorded)."""
    plate = tmp_path / "plate"
    plate.mkdir()
    first, *rest = _frames(5, 80)
    first.save(plate / "0001.png", save_all=True, append_images=rest, duration=40, loop=0)
    for n in (2, 3):
        rest[n].save(plate / f"{n:04d}.png")
    code, out, err = run(capsys, "inspect", "--no-faces", "--json", plate)
    report = json.loads(out)[str(plate)]
    assert code == 0 and (report["frames"], report["numbers"], report["audio"]) == (3, "1-3", False), err
    assert report["fps"].startswith("none recorded") and "variable_rate" not in report
    read = driver_source(plate / "%04d.png")
    assert isinstance(read, DriverFrames) and len(read.frames) == 3
