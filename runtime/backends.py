"""Backend registry: backends are chosen by name, per submodel, and checked for their preconditions.

A backend whose dependency is missing is reported as unavailable with the reason; nothing fails at import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megactor_rt.errors import TENSORRT_INSTALL, BackendUnavailable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend.

    Attributes:
        name: registry name (``torch``, ``onnxruntime``, ``tensorrt``).
        check: returns ``(available, reason)``; must be cheap and must not raise.
        description: one line for ``megactor-rt doctor``.
    """

    name: str
    check: Callable[[], tuple[bool, str]]
    description: str


_REGISTRY: dict[str, BackendInfo] = {}


def register_backend(name: str, check: Callable[[], tuple[bool, str]], description: str) -> None:
    """Register (or replace) a backend by name."""
    _REGISTRY[name] = BackendInfo(name, check, description)


def backend_names() -> list[str]:
    _register_builtin()
    return list(_REGISTRY)


def backend_status() -> dict[str, tuple[bool, str]]:
    """Availability and reason of every registered backend (for ``doctor``)."""
    _register_builtin()
    out = {}
    for name, info in _REGISTRY.items():
        try:
            out[name] = info.check()
        except Exception as exc:  # a check must never take the process down
            out[name] = (False, f"availability check failed: {exc}")
    return out


def require_backend(name: str) -> BackendInfo:
    """Return the backend's info or raise ``BackendUnavailable`` with the reason."""
    _register_builtin()
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend '{name}'; known: {sorted(_REGISTRY)}")
    ok, reason = _REGISTRY[name].check()
    if not ok:
        raise BackendUnavailable(f"backend '{name}' is unavailable: {reason}")
    return _REGISTRY[name]


def _module_available(module: str) -> tuple[bool, str]:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return False, f"python module '{module}' is not installed"
    return True, "ok"


def cpu_model() -> str:
    """The CPU's model as the system names it (``AMD EPYC 7B13``; Linux's ``/proc/cpuinfo``), else its
    architecture (``platform.processor()`` is empty on Linux)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(dev: torch.device) -> str:
    """A device as measured figures name it: the GPU's name, or the CPU's model and core count."""
    import os

    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def _torch_check() -> tuple[bool, str]:
    import torch

    dev = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return True, f"torch {torch.__version__}, {dev}"


def _ort_check() -> tuple[bool, str]:
    ok, reason = _module_available("onnxruntime")
    if not ok:
        return ok, reason + (" (pip install onnx onnxruntime onnxscript polygraphy: the 'onnx' extra, "
                             "pip install -e '.[onnx]' in this checkout)")
    import onnxruntime as ort

    return True, f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}"


def _trt_check() -> tuple[bool, str]:
    ok, reason = _module_available("tensorrt")
    if not ok:
        return ok, reason + f" (needs an NVIDIA GPU; {TENSORRT_INSTALL})"
    try:
        import tensorrt as trt
    except Exception as exc:  # stub packages raise at import
        return False, f"'import tensorrt' failed: {exc}"
    import torch

    if not torch.cuda.is_available():
        return False, f"tensorrt {trt.__version__} is installed but no CUDA device is visible"
    return True, f"tensorrt {trt.__version__}"


_BUILTIN_DONE = False


def _register_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    register_backend("torch", _torch_check, "PyTorch reference/fallback (CPU or CUDA, fp32/fp16)")
    register_backend("onnxruntime", _ort_check, "exported ONNX graphs under onnxruntime")
    register_backend("tensorrt", _trt_check, "TensorRT fp16 plans built per GPU by build-engines")
