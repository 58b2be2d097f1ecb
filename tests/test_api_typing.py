"""The Python API as a typed user sees it: ``mypy --strict`` on small user scripts and on the README's snippet.

Each check runs mypy in a subprocess from a temporary folder (outside the checkout), with the package laid out
as installed on ``MYPYPATH`` and its own modules followed silently, so only the user script's errors count;
third-party packages (torch, numpy) are left out (``Any``), so each check takes a few seconds. Skipped, with the reason
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


def _package_tree(tmp_path: Path) -> Path:
    """The package as installed (``megactor_rt.runtime`` is ``runtime/`` here, pyproject's package-dir), made of
    links: mypy cannot follow an editable install's import hook."""
    tree = tmp_path / "tree"
    package = tree / "megactor_rt"
    if package.exists():
        return tree
    package.mkdir(parents=True)
    for entry in (ROOT / "megactor_rt").iterdir():
        (package / entry.name).symlink_to(entry)
    for sub in ("runtime", "export", "engine", "kernels"):
        (package / sub).symlink_to(ROOT / sub)
    return tree


def _mypy_strict(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        print("skipped: mypy is not installed (pip install -e '.[dev]')")
        pytest.skip("mypy is not installed")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = {"MYPYPATH": str(_package_tree(tmp_path)), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--ignore-missing-imports",
           "--no-site-packages",
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


def test_animate_async_options_are_typed_as_animates(tmp_path: Path) -> None:
    """``animate_async(..., **options)`` takes ``animate()``'s options: a misspelt or mistyped one is refused by
    mypy, as it is for ``animate()``, and the right ones pass."""
    head = """
        from megactor_rt.runtime.animator import Animator
        from megactor_rt.progress import Progress

        def show(p: Progress) -> None: ...

        async def serve(anim: Animator) -> None:
            state = anim.prepare("me.png")
    """
    good = _mypy_strict(tmp_path, head + """
            async for _ in anim.animate_async(state, "meme.mp4", on_progress=show, face_crop=False, driver_face=1):
                pass
    """)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _mypy_strict(tmp_path, head + """
            async for _ in anim.animate_async(state, "meme.mp4", on_progres=show, face_crop="no"):
                pass
    """)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert '"on_progres"' in bad.stdout and '"face_crop"' in bad.stdout, bad.stdout


def test_with_config_changes_are_typed_as_animate_config_fields(tmp_path: Path) -> None:
    """``with_config(**changes)`` is typed by ``ConfigChanges``, whose keys are ``AnimateConfig``'s fields: the
    README's calls pass mypy (``start="1:05"`` among them), a misspelt or mistyped field is refused."""
    import dataclasses

    from megactor_rt.config import AnimateConfig, ConfigChanges

    assert set(ConfigChanges.__annotations__) == {f.name for f in dataclasses.fields(AnimateConfig)}
    head = """
        from megactor_rt.runtime.animator import Animator

        def tune(anim: Animator) -> list[Animator]:
            return [
    """
    good = _mypy_strict(tmp_path, head + """
                anim.with_config(steps=10, overlap=4, cfg_steps=5), anim.with_config(closed_loop=False),
                anim.with_config(window_batch=3), anim.with_config(face_detector="cnn"), anim.with_config(),
                anim.with_config(start="1:05", duration=8), anim.with_config(bit_depth=16, mode="reference"),
            ]
    """)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _mypy_strict(tmp_path, head + """
                anim.with_config(stpes=10), anim.with_config(closed_loop="no"),
            ]
    """)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert '"stpes"' in bad.stdout and '"closed_loop"' in bad.stdout, bad.stdout


def test_animate_options_are_animates_keyword_options() -> None:
    """``animate_async(**options)`` is typed by ``AnimateOptions``: its keys are ``animate``'s keyword-only
    parameters (one added to ``animate`` and not here would be refused by a user's type checker)."""
    import inspect

    from megactor_rt.runtime.animator import AnimateOptions, Animator

    keywords = [n for n, p in inspect.signature(Animator.animate).parameters.items() if p.kind == p.KEYWORD_ONLY]
    assert list(AnimateOptions.__annotations__) == keywords
