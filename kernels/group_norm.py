"""Frame-spanning GroupNorm + SiLU in two Triton kernels (the eager path's ResnetBlock norms).

Upstream normalises 5-D video activations with statistics over all frames of a window. On the folded
``(B*F, C, H, W)`` layout PyTorch needs a transpose to a contiguous copy, the GroupNorm (statistics, then
apply), a transpose back to a second copy and the SiLU: about nine passes over the activations. Here a group's
elements are read where they are - for each (sample, group, frame) one contiguous span of C/G x H x W values -
so it takes three: a statistics kernel (per-chunk mean and M2, two reads of a chunk that stays in cache) and an
apply kernel that merges the chunk statistics (Chan's formula, float32), normalises, applies the affine
parameters and the SiLU, and writes once.

* ``group_norm_silu(x, norm, frames, silu=True)`` - dispatch: the kernels on CUDA in eager mode with Triton
  importable and a once-per-device self-check passed; inside ``torch.compile`` (Inductor fuses these ops itself), while exporting, on CPU or with
  ``MEGACTOR_TRITON_GROUP_NORM=0``, ``group_norm_silu_ref``.
* ``group_norm_silu_ref(...)`` - PyTorch; the definition and the fallback.
* ``group_norm_silu_triton(...)`` - always the kernels (tests; CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from megactor_rt.kernels._triton import HAVE_TRITON, kernel_passes, on_tensor_device, switched_off

logger = logging.getLogger(__name__)

__all__ = ["group_norm_silu", "group_norm_silu_ref", "group_norm_silu_triton", "group_norm_silu_usable"]

CHUNK = 4096  # elements per program: one chunk's second read comes from cache


def group_norm_silu_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                        frames: int, eps: float, silu: bool = True) -> torch.Tensor:
    """``x (B*F, C, H, W)`` normalised with per-(sample, group) statistics over C/G x F x H x W (upstream's
    GroupNorm on 5-D video tensors: the statistics span all frames of a window), affine, then SiLU."""
    bf, c, h, w = x.shape
    if frames == 1:
        y = F.group_norm(x, groups, weight, bias, eps)
    else:
        x5 = x.view(bf // frames, frames, c, h * w).transpose(1, 2)  # (B, C, F, HW)
        y = F.group_norm(x5, groups, weight, bias, eps).transpose(1, 2).reshape(bf, c, h, w)
    return F.silu(y) if silu else y


def group_norm_silu_usable(x: torch.Tensor) -> bool:
    """Whether ``group_norm_silu`` runs the Triton kernels for activations like ``x``."""
    if not (x.is_cuda and HAVE_TRITON) or torch.compiler.is_compiling() or switched_off("MEGACTOR_TRITON_GROUP_NORM"):
        return False
    return x.dim() == 4 and x.is_contiguous() and x.dtype in (torch.float16, torch.bfloat16, torch.float32) \
        and _self_check(x.device)


@functools.cache
def _self_check(device: torch.device) -> bool:
    """Once per process and device: the kernels against the reference on a small input. A failure (a Triton
    version that cannot compile them, a wrong result) is logged and the reference is used from then on."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 32, 9, 9, generator=g) * 2 + 1).to(device)
    w, b = torch.randn(32, generator=g).to(device), torch.randn(32, generator=g).to(device)

    def error() -> float:
        out = group_norm_silu_triton(x, w, b, 8, 3, 1e-5)
        return (out - group_norm_silu_ref(x, w, b, 8, 3, 1e-5)).abs().max().item()

    return kernel_passes("GroupNorm kernels", device, error, 1e-4, logger, "PyTorch")


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, frames: int, silu: bool = True) -> torch.Tensor:
    """GroupNorm ``norm`` over the frames of each sample of folded ``x``, then SiLU (see the module docstring)."""
    if group_norm_silu_usable(x):
        return group_norm_silu_triton(x, norm.weight, norm.bias, norm.num_groups, frames, norm.eps, silu)
    return group_norm_silu_ref(x, norm.weight, norm.bias, norm.num_groups, frames, norm.eps, silu)


def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                           frames: int, eps: float, silu: bool = True) -> torch.Tensor:
    """The two kernels, whatever the device (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    import triton

    bf, c, h, w = x.shape
    if bf % frames or c % groups:
        raise ValueError(f"group_norm_silu: batch {bf} is not a multiple of frames={frames} or channels {c} of "
                         f"groups={groups}")
    if not x.is_contiguous():
        raise ValueError("group_norm_silu wants contiguous (B*F, C, H, W) activations")
    b, cg, hw = bf // frames, c // groups, h * w
    span = cg * hw
    split = triton.cdiv(span, CHUNK)
    chunk = triton.cdiv(span, split)
    parts = frames * split
    mean = torch.empty((b * groups, parts), device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    count = torch.empty_like(mean)
    stats, apply = _kernels()
    grid = (b * groups, frames, split)
    out = torch.empty_like(x)
    has_affine = weight is not None
    w_arg = weight if has_affine else x  # never read without affine
    b_arg = bias if bias is not None else x
    with on_tensor_device(x):
        stats[grid](x, mean, m2, count, groups, frames, c, cg, hw, span, chunk, split, BLOCK=1024)
        apply[grid](x, out, mean, m2, count, w_arg, b_arg, groups, frames, c, cg, hw, span, chunk, split, parts,
                    eps, BLOCK=1024, BLOCK_P=max(16, triton.next_power_of_2(parts)), AFFINE=has_affine,
                    HAS_BIAS=bias is not None, SILU=silu)
    return out


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def gn_stats_kernel(x_ptr, mean_ptr, m2_ptr, count_ptr, groups, frames, c, cg, hw, span, chunk, split,
                        BLOCK: tl.constexpr):
        bg = tl.program_id(0)
        f = tl.program_id(1)
        s = tl.program_id(2)
        b = bg // groups
        g = bg % groups
        base = ((b * frames + f).to(tl.int64) * c + g * cg) * hw
        start = s * chunk
        end = tl.minimum(start + chunk, span)
        n = (end - start).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + base + idx, mask=idx < end, other=0.0).to(tl.float32)
        mu = tl.sum(acc, axis=0) / n
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + base + idx, mask=idx < end, other=0.0).to(tl.float32)
            d = tl.where(idx < end, v - mu, 0.0)
            acc2 += d * d
        slot = bg * frames * split + f * split + s
        tl.store(mean_ptr + slot, mu)
        tl.store(m2_ptr + slot, tl.sum(acc2, axis=0))
        tl.store(count_ptr + slot, n)

    @triton.jit
    def gn_apply_kernel(x_ptr, y_ptr, mean_ptr, m2_ptr, count_ptr, w_ptr, b_ptr, groups, frames, c, cg, hw, span,
                        chunk, split, parts, eps, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                        AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
        bg = tl.program_id(0)
        f = tl.program_id(1)
        s = tl.program_id(2)
        b = bg // groups
        g = bg % groups
        p = tl.arange(0, BLOCK_P)
        pm = p < parts
        n_i = tl.load(count_ptr + bg * parts + p, mask=pm, other=0.0)
        m_i = tl.load(mean_ptr + bg * parts + p, mask=pm, other=0.0)
        q_i = tl.load(m2_ptr + bg * parts + p, mask=pm, other=0.0)
        n = tl.sum(n_i, axis=0)
        mu = tl.sum(n_i * m_i, axis=0) / n
        d = m_i - mu
        var = (tl.sum(q_i, axis=0) + tl.sum(n_i * d * d, axis=0)) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        base = ((b * frames + f).to(tl.int64) * c + g * cg) * hw
        start = s * chunk
        end = tl.minimum(start + chunk, span)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            m = idx < end
            v = (tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32) - mu) * rstd
            ch = g * cg + idx // hw
            if AFFINE:
                v = v * tl.load(w_ptr + ch, mask=m, other=1.0).to(tl.float32)
            if HAS_BIAS:  # also without a weight (F.group_norm takes either alone)
                v = v + tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
            if SILU:
                v = v / (1.0 + tl.exp(-v))
            tl.store(y_ptr + base + idx, v.to(y_ptr.dtype.element_ty), mask=m)

    return gn_stats_kernel, gn_apply_kernel
