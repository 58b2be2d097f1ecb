"""What the Triton kernel modules (``short_attention``, ``group_norm``) share: whether Triton is installed, and
when an eager call must not use a kernel."""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def switched_off(env_var: str) -> bool:
    """An eager call's reasons to use PyTorch instead of a Triton kernel: the kernel's switch ``env_var`` set
    to ``0`` (read on every call), or an ONNX export or TorchScript trace under way (their graphs must hold
    the PyTorch ops)."""
    return os.environ.get(env_var, "1") == "0" or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
