"""Attention over short sequences (the motion modules' frames) as one Triton kernel.

The motion modules attend over the F frames (16 by default) at every spatial position: at 512 px that is
8192 sequences x 8 heads of 16 tokens, head size 40. The SDPA backends are built for long sequences (their
tiles hold 64-128 queries and keys), so on an H200 these FLOP-trivial calls took 14 of the 31 ms of
attention in a compiled window call (`docs/performance.md`), about 14x their memory-bound time. Here one
program handles one (sequence, head): it loads its queries, keys and values once, forms the F x F scores,
softmax in float32, and writes the output straight back in the ``(N, L, heads x d)`` layout of the
projections. Sequences run along dimension 1 of ``(B, L, P, C)`` tensors, so the motion modules call it on
their ``(B, F, HW, C)`` activations as they are: no frame or head transposes on either side.

* ``short_attention(q, k, v, heads)`` - dispatch: the kernel where it applies (``short_attention_usable``),
  otherwise ``short_attention_ref``.
* ``short_attention_ref(q, k, v, heads)`` - SDPA; the definition and the fallback.
* ``short_attention_triton(q, k, v, heads)`` - always the kernel (tests; also under ``TRITON_INTERPRET=1``
  on CPU tensors).

``MEGACTOR_SHORT_ATTENTION=0`` turns the kernel off (SDPA everywhere).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from megactor_rt.kernels._triton import HAVE_TRITON, kernel_passes, on_tensor_device, switched_off

logger = logging.getLogger(__name__)

MAX_LEN = 64  # longest sequence the kernel takes (all keys of a sequence sit in registers)
MAX_HEAD_DIM = 256

__all__ = ["short_attention", "short_attention_ref", "short_attention_triton", "short_attention_usable",
           "MAX_LEN"]


def short_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``q, k, v (B, L, P, heads*d)`` -> ``(B, L, P, heads*d)``: for every (b, p) and head, softmax(q k^T /
    sqrt(d)) v over the L positions of dimension 1 (SDPA)."""
    b, seq, pos, c = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # (B*P, heads, L, d)
        return x.transpose(1, 2).reshape(b * pos, seq, heads, c // heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B*P, heads, L, d)
    return o.transpose(1, 2).reshape(b, pos, seq, c).transpose(1, 2)


_OFF_AT_IMPORT = os.environ.get("MEGACTOR_SHORT_ATTENTION", "1") == "0"


def short_attention_usable(q: torch.Tensor, heads: int, k: torch.Tensor | None = None,
                           v: torch.Tensor | None = None) -> bool:
    """Whether ``short_attention`` runs the kernel for queries like ``q`` (and keys and values like ``k``, ``v``
    where given: the same shape, dtype and device, channels contiguous; others take the reference).

    Inside ``torch.compile`` only the shape checks and the switch as it was at import are traced (so no graph
    breaks); eager calls read ``MEGACTOR_SHORT_ATTENTION`` each time and never use the kernel while exporting.
    """
    if not (q.is_cuda and HAVE_TRITON and _OP is not None):
        return False
    if torch.compiler.is_compiling():
        if _OFF_AT_IMPORT:
            return False
    elif switched_off("MEGACTOR_SHORT_ATTENTION"):
        return False
    if q.dim() != 4:
        return False
    others = [t for t in (k, v) if t is not None]
    if any(t.shape != q.shape or t.dtype != q.dtype or t.device != q.device for t in others) or any(
            t.stride(-1) != 1 for t in (q, *others)):
        return False
    b, seq, pos, c = q.shape
    return c % heads == 0 and seq <= MAX_LEN and c // heads <= MAX_HEAD_DIM and q.dtype in (
        torch.float16, torch.bfloat16, torch.float32) and (torch.compiler.is_compiling() or _self_check(q.device))


@functools.cache
def _self_check(device: torch.device) -> bool:
    """Once per process and device (eager calls): the kernel against the reference on a small input. A failure
    (a Triton that cannot compile it, a wrong result) is logged and the reference is used from then on."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 5, 64, generator=g).to(device) for _ in range(3))

    def error() -> float:
        return (short_attention_triton(q, k, v, 4) - short_attention_ref(q, k, v, 4)).abs().max().item()

    return kernel_passes("short-attention kernel", device, error, 1e-3, logger, "SDPA")


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention of short sequences; see the module docstring."""
    if short_attention_usable(q, heads, k, v):
        return _OP(q, k, v, heads)
    return short_attention_ref(q, k, v, heads)


def short_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The kernel itself, whatever the device (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    return _launch(q, k, v, heads, wrap=False)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"short_attention wants q, k, v of one shape (B, L, P, C); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, seq, pos, c = q.shape
    if c % heads or seq > MAX_LEN or c // heads > MAX_HEAD_DIM:
        raise ValueError(f"short_attention takes L <= {MAX_LEN} and C = heads x d with d <= {MAX_HEAD_DIM}; "
                         f"got L={seq}, C={c}, heads={heads}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("short_attention wants the channel dimension contiguous")


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, wrap: bool) -> torch.Tensor:
    import triton

    _check(q, k, v, heads)
    b, seq, pos, c = q.shape
    d = c // heads
    out = torch.empty((b, seq, pos, c), device=q.device, dtype=q.dtype)
    kernel = _kernel()
    if wrap:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    block_l = max(16, triton.next_power_of_2(seq))
    block_d = max(16, triton.next_power_of_2(d))
    with on_tensor_device(q):
        kernel[(b * pos * heads,)](
            q, k, v, out, heads, pos, seq, d, d ** -0.5,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            BLOCK_L=block_l, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
            num_warps=4 if block_d * block_l <= 64 * 64 else 8)
    return out


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, heads, pos, seq, d, scale,
                               sqb, sql, sqp, skb, skl, skp, svb, svl, svp, sob, sol, sop,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        h = pid % heads
        bp = pid // heads
        b = (bp // pos).to(tl.int64)
        at = (bp % pos).to(tl.int64)  # the position (dimension 2)
        rows = tl.arange(0, BLOCK_L)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < seq) & (cols[None, :] < d)
        col = h * d + cols[None, :]
        q = tl.load(q_ptr + b * sqb + at * sqp + rows[:, None] * sql + col, mask=mask, other=0.0)
        k = tl.load(k_ptr + b * skb + at * skp + rows[:, None] * skl + col, mask=mask, other=0.0)
        v = tl.load(v_ptr + b * svb + at * svp + rows[:, None] * svl + col, mask=mask, other=0.0)
        if IEEE:  # float32 inputs: full-precision products, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (L, L), float32 accumulation
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(rows[None, :] < seq, s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        if IEEE:
            o = tl.dot(p, v, input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        tl.store(o_ptr + b * sob + at * sop + rows[:, None] * sol + col, o.to(o_ptr.dtype.element_ty), mask=mask)

    return short_attention_kernel


def _register():  # type: ignore[no-untyped-def]
    """The kernel as a torch custom op, so ``torch.compile`` keeps it in its graph instead of breaking there.
    Registered at import (no Triton import needed for that); None where this torch has no ``triton_op``."""
    triton_op = getattr(torch.library, "triton_op", None)
    if not HAVE_TRITON or triton_op is None:
        return None

    @triton_op("megactor::short_attention", mutates_args={})
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        return _launch(q, k, v, heads, wrap=True)

    _register_flops(torch.ops.megactor.short_attention)
    return op


def _register_flops(packet) -> None:  # type: ignore[no-untyped-def]
    """The op's FLOPs for ``torch.utils.flop_counter`` (the benchmark's FLOP ledger), as SDPA's are counted:
    q k^T and the weighted sum of v, 2 FLOPs per multiply-add; without it the kernel's calls counted 0."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    if packet in flop_registry:  # this module imported again
        return

    @register_flop_formula(packet)
    def flops(q_shape, k_shape, v_shape, heads, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        b, seq, pos, c = q_shape
        split = (b * pos, heads, seq, c // heads)  # short_attention_ref's SDPA call
        return sdpa_flop_count(split, split, split)


_OP = _register()
