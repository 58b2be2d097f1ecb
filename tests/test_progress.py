"""Progress reports of the Python API (``on_progress``): what each stage reports, to whom, and a hook that raises."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_fixtures import PORTRAIT, write_face_driver

from megactor_rt.config import AnimateConfig
from megactor_rt.models.scheduler import context_windows
from megactor_rt.progress import Progress, progress, progress_enabled, reporting, set_progress_enabled
from megactor_rt.runtime.animator import DECODE_BATCH, Animator

CFG = AnimateConfig(steps=2, window=4, overlap=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _bars_off() -> Iterator[None]:
    was = progress_enabled()
    set_progress_enabled(False)  # reports go on without the bars
    yield
    set_progress_enabled(was)


@pytest.fixture(scope="module")
def networks() -> Animator:
    return Animator.demo(seed=0, device="cpu", config=CFG)


@pytest.fixture
def anim(networks: Animator) -> Animator:
    """The networks with empty caches: every run finds its driver's faces (a kept plan reports no driver stage)."""
    return Animator(networks.sub, CFG)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_driver(tmp_path_factory.mktemp("progress") / "clip.mp4", n=6, fps=25)


def by_stage(reports: list[Progress]) -> dict[str, list[tuple[int, int | None, str]]]:
    out: dict[str, list[tuple[int, int | None, str]]] = {}
    for p in reports:
        out.setdefault(p.stage, []).append((p.done, p.total, p.unit))
    return out


def test_a_run_reports_each_stage_in_order(anim: Animator, driver: Path) -> None:
    seen: list[Progress] = []
    frames = list(anim.animate(anim.prepare(PORTRAIT), driver, on_progress=seen.append))
    stages = by_stage(seen)
    windows = len(context_windows(6, CFG.window, CFG.overlap))  # 3: the last wraps onto the start
    assert list(stages) == ["driver", "denoise", "decode"]
    assert stages["driver"] == [(i, 6, "frame") for i in range(1, 7)]
    assert stages["denoise"] == [(i, 2 * windows, "window") for i in range(1, 2 * windows + 1)]
    batches = -(-len(frames) // DECODE_BATCH)
    assert stages["decode"] == [(i, batches, "batch") for i in range(1, batches + 1)]


def test_reports_go_to_their_own_run_only(anim: Animator, driver: Path) -> None:
    """Two runs consumed in turns in one thread, and bars made between their frames: each run's function hears
    of its own work only."""
    state = anim.prepare(PORTRAIT)
    a_seen: list[Progress] = []
    a = anim.animate(state, driver, on_progress=a_seen.append)
    b = anim.with_config().animate(state, driver)  # no function
    next(a)
    next(b)
    for _ in progress(range(5), desc="outside", stage="outside"):
        pass
    list(a)
    list(b)
    assert {p.stage for p in a_seen} == {"driver", "denoise", "decode"}
    assert len([p for p in a_seen if p.stage == "driver"]) == 6  # b's driver pass was not counted here


def test_a_function_that_raises_stops_the_run_and_leaves_no_result(anim: Animator, driver: Path,
                                                                    tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def cancel(p: Progress) -> None:
        if p.stage == "denoise" and p.done == 2:
            raise Stop

    with pytest.raises(Stop):
        list(anim.animate(anim.prepare(PORTRAIT), driver, on_progress=cancel))
    with pytest.raises(Stop):
        anim.animate_to_file(PORTRAIT, driver, tmp_path / "out.mp4", on_progress=cancel)
    assert list(tmp_path.iterdir()) == []


def test_animate_to_file_reports_the_frames_written_too(anim: Animator, driver: Path, tmp_path: Path) -> None:
    seen: list[tuple[Progress, str]] = []
    anim.animate_to_file(PORTRAIT, driver, tmp_path / "out.mp4",
                         on_progress=lambda p: seen.append((p, threading.current_thread().name)))
    stages = by_stage([p for p, _ in seen])
    assert list(stages)[:3] == ["driver", "denoise", "decode"]  # (decode and write interleave)
    assert stages["write"] == [(i, 6, "frame") for i in range(1, 7)]
    main = threading.current_thread().name
    assert {t for p, t in seen if p.stage == "write"} == {main}
    assert {t for p, t in seen if p.stage != "write"} == {"decode"}  # the run's worker thread


def test_reporting_closes_the_run_it_wraps() -> None:
    closed: list[bool] = []

    def run() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    wrapped = reporting(run(), lambda p: None)
    assert next(wrapped) == 1
    wrapped.close()  # type: ignore[attr-defined]
    assert closed == [True]


def test_progress_json_gives_each_stages_last_line_and_no_bars(tmp_path: Path, driver: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--progress-json: JSON lines on stderr (no bars), throttled per stage, each stage's last one (done = total)
    always written."""
    import json

    from megactor_rt.cli import main

    set_progress_enabled(True)  # (main switches the bars off for --progress-json)
    out = tmp_path / "r.mp4"
    code = main(["demo", "--driver", str(driver), "-o", str(out), "--steps", "2", "--window", "4", "--overlap", "2",
                 "--progress-json"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON: no bar, no log
    assert {tuple(sorted(d)) for d in lines} == {("done", "elapsed_s", "output", "stage", "total", "unit")}
    last = {d["stage"]: d for d in lines}
    assert list(last) == ["driver", "denoise", "decode", "write"]
    assert all(d["done"] == d["total"] and d["output"] == str(out) for d in last.values())
    assert last["write"]["total"] == 6 and not progress_enabled()
    assert len([d for d in lines if d["stage"] == "driver"]) < 6  # throttled (6 frames in well under a second)


def test_progress_json_into_a_file_leaves_stderr_to_the_messages(tmp_path: Path, driver: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--progress-json FILE: the same JSON lines appended to FILE (a second run adds its own), none on stderr; a
    FILE that cannot be written is named before any work (exit 2, no result)."""
    import json

    from megactor_rt.cli import main

    log = tmp_path / "progress.jsonl"
    common = ["demo", "--driver", str(driver), "--steps", "1", "--window", "4", "--overlap", "2", "--max-frames", "4"]
    for name in ("a.mp4", "b.mp4"):
        code = main([*common, "-o", str(tmp_path / name), "--progress-json", str(log)])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "{" not in err  # (the demo's notice is all stderr holds)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["output"] for d in lines if d["stage"] == "write" and d["done"] == d["total"]] == \
        [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    code = main([*common, "-o", str(tmp_path / "c.mp4"), "--progress-json", str(tmp_path / "no" / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'no' / 'p.jsonl'}: cannot write progress reports there" in err, err
    assert not (tmp_path / "c.mp4").exists()


def test_progress_json_never_appends_to_a_file_of_the_run(tmp_path: Path, driver: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--progress-json FILE naming the driver (or the result) is refused before any work, the file untouched; a
    dry run, which reports no progress, checks FILE but does not make it."""
    import shutil

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.cli import main

    clip = Path(shutil.copy(driver, tmp_path / "clip.mp4"))
    before = clip.read_bytes()
    common = ["demo", "--driver", str(clip), "--steps", "1", "--window", "4", "--overlap", "2", "--max-frames", "4"]
    for target in (clip, tmp_path / "r.mp4"):
        code = main([*common, "-o", str(tmp_path / "r.mp4"), "--progress-json", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and f"--progress-json would append to {target}, a file of this run" in err, err
    assert clip.read_bytes() == before and not (tmp_path / "r.mp4").exists()
    log = tmp_path / "progress.jsonl"
    code = main(["animate", "--demo", "--portrait", str(ASSETS_DIR / "portrait.png"), "--driver", str(clip), "-o",
                 str(tmp_path / "r.mp4"), "--dry-run", "--progress-json", str(log)])
    assert code == 0, capsys.readouterr().err
    assert not log.exists() and not (tmp_path / "r.mp4").exists()
