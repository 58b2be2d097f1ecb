"""The Python API as a typed user sees it: ``mypy --strict`` on small user scripts and on the README's snippet.

Each check runs mypy in a subprocess from a temporary folder (outside the checkout), with the checkout on
``MYPYPATH`` and the package's own modules followed silently, so only the user script's errors count. The
scripts import only light modules (no torch), so each check takes a few seconds. Skipped, with the reason
printed, where mypy is not installed.
"""

from __future__ import annotations

import importlib.util
import re
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


def test_readme_python_snippet_passes_mypy_strict(tmp_path: Path) -> None:
    """The README's Python snippet, copied as it stands into a user's script, passes ``mypy --strict`` (the
    package's own types are not followed here, which keeps this fast: it checks the snippet's own code)."""
    readme = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert snippets, "no ```python block in README.md"
    for snippet in snippets:
        done = _mypy_strict(tmp_path, snippet, "--follow-imports=skip")
        assert done.returncode == 0, done.stdout + done.stderr
