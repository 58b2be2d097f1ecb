"""What the Triton kernel modules (``short_attention``, ``group_norm``) share: whether Triton is installed,
when an eager call must not use a kernel, and the self-check that decides once per device whether it can."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def switched_off(env_var: str) -> bool:
    """An eager call's reasons to use PyTorch instead of a Triton kernel: the kernel's switch ``env_var`` set
    to ``0`` (read on every call), or an ONNX export or TorchScript trace under way (their graphs must hold
    the PyTorch ops)."""
    return os.environ.get(env_var, "1") == "0" or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def kernel_passes(what: str, device: torch.device, error: Callable[[], float], tolerance: float,
                  log: logging.Logger, instead: str) -> bool:
    """Run a kernel's self-check on ``device``: ``error()`` runs the kernel and its reference on a small input and
    returns the largest difference. Any failure (a Triton that cannot compile the kernel) or an error not below
    ``tolerance`` is logged on ``log``, naming ``what`` and the ``instead`` used from then on, and gives False."""
    try:
        err = error()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        log.warning("Triton %s unusable on %s (%s); using %s", what, device, exc, instead)
        return False
    if not err < tolerance:
        log.warning("Triton %s off on %s: self-check error %.3g; using %s", what, device, err, instead)
        return False
    return True


def on_tensor_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A launch guard: Triton launches on the current CUDA device and its current stream, so a kernel on tensors
    of another device (``--device cuda:1`` in a thread whose current device is 0) enters that device first.
    Nothing for CPU tensors (the interpreter) or tensors of the current device."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
