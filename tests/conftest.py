"""Markers (registered in pyproject.toml): gpu / trt tests skip with a printed reason where unsupported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest


def _trt_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (it cannot be installed in this project's CI)"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return f"'import tensorrt' fails: {exc}"
    import torch

    return None if torch.cuda.is_available() else "TensorRT needs a CUDA device"


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker (the README's ``-n 2``: one per core), one intra-op thread per process, for its
    subprocesses too: two workers with a thread per core each would oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    gpu_reason = None if torch.cuda.is_available() else "no CUDA device on this machine"
    trt_reason = _trt_reason() if any("trt" in i.keywords for i in items) else None
    for item in items:
        if "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if "trt" in item.keywords and trt_reason:
            item.add_marker(pytest.mark.skip(reason=trt_reason))


@pytest.fixture(scope="module")
def no_progress_bars() -> Iterator[None]:
    """No progress bars for a module (the runs' bars would fill the test log)."""
    from megactor_rt.progress import progress_enabled, set_progress_enabled

    was = progress_enabled()
    set_progress_enabled(False)
    yield
    set_progress_enabled(was)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module: the pipeline's worker threads plus OpenMP spin-waits on a busy
    2-core runner otherwise slow the tiny models down by an order of magnitude."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter() -> Callable[[str, int], None]:
    """Runs a test script (dedented; it must print "ok" last) in a subprocess under Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` must be set before Triton is imported); skips where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' brings it)")

    def run(script: str, timeout: int) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                             text=True, timeout=timeout)
        assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr

    return run


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    """``import tensorrt`` gives the stand-in ``tests/fake_tensorrt.py`` (builds succeed) and this machine is
    an H100 with that TensorRT version, so the TensorRT build code runs on a CPU."""
    import fake_tensorrt

    from megactor_rt.engine.cache import DeviceInfo

    gpu = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), fake_tensorrt.__version__)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(DeviceInfo, "current", classmethod(lambda cls, device=None: gpu))
    monkeypatch.setattr(fake_tensorrt.Builder, "fail_builds", False)
    return fake_tensorrt
