"""The command line around its runs: progress bars where stderr is not a terminal, interruption, exit codes and the
last line a command leaves (demo, export, convert-weights, download, check-export, build-engines)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from megactor_rt import cli
from megactor_rt.progress import progress_enabled, set_progress_enabled


@pytest.fixture(autouse=True)
def _restore_progress() -> Iterator[None]:
    was = progress_enabled()  # main() switches progress bars off process-wide
    yield
    set_progress_enabled(was)


def _command(*argv: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """``megactor-rt ARGV`` in a process of its own, its stdout and stderr pipes (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "megactor_rt.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_no_progress_bar_redraws_where_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    """stderr to a file or a pipe (a log, CI, nohup): no bar redrawn with carriage returns (one export of a small
    graph wrote three copies of its bar on one line; a demo thousands); MEGACTOR_PROGRESS=1 still asks for them."""
    argv = ("export", "--weights", "tiny", "--graphs", "token_kv", "--precision", "fp32")
    res = _command(*argv, "--out", str(tmp_path / "a"), env={"MEGACTOR_PROGRESS": ""})
    assert res.returncode == 0, res.stderr
    assert "token_kv" in res.stdout and "\r" not in res.stderr and "graph/s" not in res.stderr, res.stderr
    res = _command(*argv, "--out", str(tmp_path / "b"), env={"MEGACTOR_PROGRESS": "1"})
    assert res.returncode == 0 and "graph/s" in res.stderr, res.stderr


def test_progress_bars_stay_on_for_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A terminal's stderr keeps its bars (unless -q); the switch is set before the command runs."""

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("MEGACTOR_PROGRESS", raising=False)
    with open(os.devnull, "w") as log:
        assert cli._bars_wanted(Terminal()) and not cli._bars_wanted(log)
    monkeypatch.setattr(cli, "_bars_wanted", lambda stream: True)
    set_progress_enabled(True)
    assert cli.main(["check-export", "--onnx", str(tmp_path / "none")]) == 2
    assert progress_enabled()
    assert cli.main(["-q", "check-export", "--onnx", str(tmp_path / "none")]) == 2
    assert not progress_enabled()


def test_download_names_why_the_hub_could_not_be_reached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Unreachable (offline, a proxy's refusal, a misspelt --repo), the hub warns that it returns the local folder as
    it is and returns it: that warning came twice (the hub's handler and the root logger's) and the error guessed
    "offline"; now the error gives the hub's reason, once, no folder is left, and -q silences the hub's bars."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    seen: list[bool] = []

    def unreachable(repo_id: str, local_dir: str, **kwargs: object) -> str:
        seen.append(are_progress_bars_disabled())
        logging.getLogger("huggingface_hub._snapshot_download").warning(
            f"Returning existing local_dir `{local_dir}` as remote repo cannot be accessed in `snapshot_download` "
            f"(Client error '404 Not Found' for url 'https://huggingface.co/api/models/{repo_id}/revision/main')."
        )
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    out = tmp_path / "weights"
    assert cli.main(["-q", "download", "--repo", "someone/misspelt", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "404 Not Found" in last and "someone/misspelt" in last and str(out) in last, err
    assert "Returning existing local_dir" not in err and err.count("404 Not Found") == 1, err
    assert seen == [True] and not out.exists()


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, 130), (cli.Terminated, 143)])
def test_a_download_stopped_before_anything_came_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  stop: type[BaseException], status: int) -> None:
    """Ctrl-C or SIGTERM while the hub is asked (nothing has come yet): the folder it made goes, as after a failure
    (it was left holding the unfinished-download mark alone); one where files came stays, to go on from."""
    import huggingface_hub

    def stopped(local_dir: str, **kwargs: object) -> str:
        raise stop()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stopped)
    out = tmp_path / "weights"
    assert cli.main(["-q", "download", "--out", str(out)]) == status
    assert not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] in ("interrupted", "terminated")

    def came_then_stopped(local_dir: str, **kwargs: object) -> str:
        (Path(local_dir) / "weights").mkdir()
        raise stop()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", came_then_stopped)
    assert cli.main(["-q", "download", "--out", str(out)]) == status
    assert (out / "weights").is_dir() and (out / cli.DOWNLOADING).exists()


def test_ctrl_c_as_the_command_starts_ends_it_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the flags are parsed and logging is set up (before the command's own handling of it): was a
    KeyboardInterrupt traceback; now the command's last word and status 130, as later."""
    ended: list[int] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    monkeypatch.setattr(cli.os, "_exit", ended.append)
    monkeypatch.setattr(sys, "argv", ["megactor-rt", "demo"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with contextlib.suppress(SystemExit):
            cli.entry()
    except KeyboardInterrupt:
        pytest.fail("the interrupt went out of entry() (a traceback)")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert ended and ended[0] == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


FAST = ["--steps", "2", "--window", "4", "--overlap", "2", "--max-frames", "4"]


@pytest.mark.parametrize("command", [["demo"], ["animate", "--demo"]])
def test_a_result_written_is_in_its_stats_file_when_stdout_is_gone(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path, command: list[str],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`... --stats s.json | head -1`: the reader of stdout gone before the result's line (status 141, as `| head`
    gives) lost the written result's record in --stats (recorded after that line); it is recorded first now."""
    from megactor_rt.assets import ASSETS_DIR

    def reader_gone(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_report", reader_gone)
    out, stats = tmp_path / "r.mp4", tmp_path / "s.json"
    inputs = ["--portrait", str(ASSETS_DIR / "portrait.png"), "--driver", str(ASSETS_DIR / "driver.mp4")]
    assert cli.main(["-q", *command, *inputs, *FAST, "-o", str(out), "--stats", str(stats)]) == 141
    runs = json.loads(stats.read_text())["runs"]
    assert out.is_file() and [run["output"] for run in runs] == [str(out)]


def test_a_download_folder_that_cannot_be_made_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--out that passes the checks but cannot be made (a full disk, /proc as root): was "unexpected error:
    FileNotFoundError ..." with status 1; now status 2 and a line naming the folder, before the hub is asked."""
    import errno

    import huggingface_hub

    asked: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: asked.append("hub"))
    out = tmp_path / "weights"
    real_mkdir = Path.mkdir

    def full(self: Path, *args: object, **kwargs: object) -> None:
        if self == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", full)
    assert cli.main(["-q", "download", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}:") and "No space left on device" in last and not asked


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, 130), (cli.Terminated, 143)])
def test_an_export_stopped_before_its_first_graph_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   stop: type[BaseException], status: int) -> None:
    """Ctrl-C or SIGTERM while the first graph is exported: the --out folder the export made was left empty; it
    goes now (an export folder that was there, or holds graphs, stays)."""
    from megactor_rt.export import onnx_export

    def stopped(weights: object, out: Path, **kwargs: object) -> list[dict]:
        out.mkdir(parents=True, exist_ok=True)  # (as export_all makes it, then its staging folder inside)
        raise stop()

    monkeypatch.setattr(onnx_export, "export_all", stopped)
    out = tmp_path / "onnx"
    argv = ["-q", "export", "--weights", "tiny", "--graphs", "token_kv", "--out", str(out)]
    assert cli.main(argv) == status and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] in ("interrupted", "terminated")
    out.mkdir()
    assert cli.main(argv) == status and out.is_dir()


def test_a_command_without_torch_does_not_import_it_on_its_way_out() -> None:
    """entry()'s look for worker threads left running imported the pipeline, and with it torch, after every command
    (seconds after a download or an early error, and a Ctrl-C meanwhile ended in a traceback with status 130)."""
    script = ("import sys\nfrom megactor_rt import cli\ncli.main = lambda **kwargs: 2\n"
              "try:\n    cli.entry()\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
