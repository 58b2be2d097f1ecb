"""The Python API as a typed user sees it: ``mypy --strict`` on small user scripts and on the README's snippet.

Each check runs mypy in a subprocess from a temporary folder (outside the checkout), with the checkout on
``MYPYPATH`` and the package's own modules followed silently, so only the user script's errors count. The
scripts import only light modules (no torch), so each check takes a few seconds. Skipped, with the reason
printed, where mypy is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mypy_strict(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        print("skipped: mypy is not installed (pip install -e '.[dev]')")
        pytest.skip("mypy is not installed")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = {"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--ignore-missing-imports",
           "--no-error-summary", f"--cache-dir={tmp_path / 'cache'}", *extra, str(script)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_on_progress_takes_a_function_whose_result_is_ignored(tmp_path: Path) -> None:
    """``on_progress`` ignores what its function returns, so a writer's ``write`` (returning an int) is fine."""
    done = _mypy_strict(tmp_path, """
        import io

        from megactor_rt.progress import Progress, Reporter

        log = io.StringIO()

        def on_progress(p: Progress) -> int:
            return log.write(f"{p.stage} {p.done}/{p.total} {p.unit}\\n")

        report: Reporter = on_progress
        report(Progress("denoise", 1, 2, "window"))
    """)
    assert done.returncode == 0, done.stdout + done.stderr
