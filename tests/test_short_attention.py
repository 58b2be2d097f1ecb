"""The motion modules' short-sequence attention (kernels/short_attention.py): the Triton kernel against SDPA
and an einsum oracle - on CPU through Triton's interpreter (a subprocess with TRITON_INTERPRET=1), on a GPU
(marked `gpu`) at the denoiser's real shapes, alone and inside the compiled UNet; the dispatch rules."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from stand_ins import ClaimsCuda, PastTheSwitch

from megactor_rt.kernels import short_attention as SA


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, seq, pos, c = q.shape
    d = c // heads
    qq, kk, vv = (t.double().view(b, seq, pos, heads, d) for t in (q, k, v))
    s = torch.einsum("biphd,bjphd->bphij", qq, kk) / d ** 0.5
    return torch.einsum("bphij,bjphd->biphd", s.softmax(-1), vv).reshape(b, seq, pos, c)


SHAPES = [(2, 16, 6, 8, 40), (1, 12, 3, 2, 80), (1, 33, 2, 1, 160), (1, 1, 5, 2, 8), (3, 64, 1, 4, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_oracle(shape: tuple[int, ...]) -> None:
    b, seq, pos, heads, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, seq, pos, heads * d, generator=g) for _ in range(3))
    torch.testing.assert_close(SA.short_attention_ref(q, k, v, heads), _oracle(q, k, v, heads).float(),
                               atol=1e-5, rtol=1e-5)


def test_kernel_in_triton_interpreter(triton_interpreter: Callable[[str, int], None]) -> None:
    triton_interpreter(f"""
        import torch
        from megactor_rt.kernels import short_attention as SA
        g = torch.Generator().manual_seed(1)
        for b, seq, pos, heads, d in {SHAPES!r}:
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
                q, k, v = (torch.randn(b, seq, pos, heads * d, generator=g).to(dtype) for _ in range(3))
                out = SA.short_attention_triton(q, k, v, heads)
                assert out.shape == q.shape and out.dtype == dtype, (out.shape, out.dtype)
                ref = SA.short_attention_ref(q.float(), k.float(), v.float(), heads)
                err = (out.float() - ref).abs().max().item()
                assert err < tol, (b, seq, pos, heads, d, dtype, err)
        # strided views (channel slices of one projection, as a fused qkv would give)
        x = torch.randn(2, 16, 3, 3 * 64, generator=g)
        q, k, v = x.split(64, dim=-1)
        err = (SA.short_attention_triton(q, k, v, 2) - SA.short_attention_ref(q, k, v, 2)).abs().max().item()
        assert err < 1e-5, err
        print("ok")
        """, 600)


def test_the_kernels_flops_are_counted_as_sdpas(triton_interpreter: Callable[[str, int], None]) -> None:
    """The benchmark's FLOP ledger (torch.utils.flop_counter) counts a call of the kernel's op as it counts the
    SDPA call it replaces (it counted 0 before the op had a FLOP formula)."""
    triton_interpreter("""
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        import megactor_rt.benchmark  # SDPA's CPU kernel's FLOP formula, as the benchmark counts
        from megactor_rt.kernels import short_attention as SA
        q, k, v = (torch.randn(2, 16, 6, 8 * 40) for _ in range(3))
        counts = []
        for fn in (torch.ops.megactor.short_attention, SA.short_attention_ref):
            with FlopCounterMode(display=False) as counter:
                fn(q, k, v, 8)
            counts.append(counter.get_total_flops())
        assert counts[0] == counts[1] == 4 * 2 * 6 * 16 * 16 * 320, counts
        print("ok")
        """, 300)


def test_dispatch_falls_back_on_cpu_and_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 16, 4, 32)
    assert not SA.short_attention_usable(q, 4)  # CPU tensors: SDPA
    torch.testing.assert_close(SA.short_attention(q, q, q, 4), SA.short_attention_ref(q, q, q, 4))
    # the switch itself, where everything before it holds (a CUDA tensor, Triton, the kernel): with it off the
    # answer is no; with it on, the checks go on past it (to the stand-in's shape, which raises)
    monkeypatch.setattr(SA, "HAVE_TRITON", True)
    monkeypatch.setattr(SA, "_OP", object())
    monkeypatch.setenv("MEGACTOR_SHORT_ATTENTION", "0")
    assert not SA.short_attention_usable(ClaimsCuda(), 4)  # type: ignore[arg-type]
    monkeypatch.setenv("MEGACTOR_SHORT_ATTENTION", "1")
    with pytest.raises(PastTheSwitch):
        SA.short_attention_usable(ClaimsCuda(), 4)  # type: ignore[arg-type]


def test_self_check_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A Triton that cannot build the kernel, or a kernel that computes wrong values, means SDPA from then on
    (was: the eager forward raised, or used wrong values)."""
    cpu = torch.device("cpu")

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no kernel for you")

    def wrong(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(q)

    for fake, message in ((broken, "unusable"), (wrong, "self-check error")):
        SA._self_check.cache_clear()
        monkeypatch.setattr(SA, "short_attention_triton", fake)
        with caplog.at_level("WARNING", logger=SA.__name__):
            assert SA._self_check(cpu) is False
        assert message in caplog.text
    monkeypatch.setattr(SA, "short_attention_triton", SA.short_attention_ref)
    SA._self_check.cache_clear()
    assert SA._self_check(cpu) is True
    SA._self_check.cache_clear()


def test_bad_shapes_are_named() -> None:
    q = torch.randn(1, 16, 4, 32)
    with pytest.raises(ValueError, match="one shape"):
        SA._check(q, q[:, :8], q, 4)
    with pytest.raises(ValueError, match="L <= 64"):
        SA._check(torch.randn(1, 65, 1, 8), torch.randn(1, 65, 1, 8), torch.randn(1, 65, 1, 8), 1)
    with pytest.raises(ValueError, match="heads"):
        SA._check(q, q, q, 5)
    edge = torch.randn(1, SA.MAX_LEN, 1, SA.MAX_HEAD_DIM)  # the longest sequence and the largest head: taken
    SA._check(edge, edge, edge, 1)
    with pytest.raises(ValueError, match="d <= 256"):
        wide = torch.randn(1, 4, 1, 2 * (SA.MAX_HEAD_DIM + 1))
        SA._check(wide, wide, wide, 2)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.randn(1, 4, 1, 64).transpose(1, 3)
        SA._check(strided, strided, strided, 1)


def test_cpu_queries_never_reach_the_self_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take SDPA before any kernel question, even with Triton and the op there: the once-per-device
    self-check (a Triton compile, which fails for CPU tensors outside the interpreter) is for CUDA devices."""
    def no_self_check(device: torch.device) -> bool:
        raise AssertionError(f"self-check asked for {device}")

    monkeypatch.setattr(SA, "HAVE_TRITON", True)
    monkeypatch.setattr(SA, "_OP", object())
    monkeypatch.setattr(SA, "_self_check", no_self_check)
    monkeypatch.setenv("MEGACTOR_SHORT_ATTENTION", "1")
    q = torch.randn(1, 16, 4, 32)
    assert not SA.short_attention_usable(q, 4, q, q)
    torch.testing.assert_close(SA.short_attention(q, q, q, 4), SA.short_attention_ref(q, q, q, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 4096, 8, 40), (2, 16, 1024, 8, 80), (2, 16, 64, 8, 160),
                                   (1, 24, 256, 8, 160), (1, 7, 33, 2, 40)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_on_gpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    b, seq, pos, heads, d = shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, seq, pos, heads * d, generator=g).to("cuda", dtype) for _ in range(3))
    assert SA.short_attention_usable(q, heads) and SA.short_attention_usable(q, heads, k, v)
    out = SA.short_attention(q, k, v, heads)
    ref = SA.short_attention_ref(q.float(), k.float(), v.float(), heads)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert (out.float() - ref).abs().max().item() < tol
    # keys or values the kernel cannot take go to the reference instead of raising
    odd = [k.float() if dtype != torch.float32 else k.half(), k.transpose(-1, -2).contiguous().transpose(-1, -2)]
    for bad in odd:
        assert not SA.short_attention_usable(q, heads, bad, v)
        ok = SA.short_attention(q, bad.to(dtype), v, heads)  # the call itself still works
        assert ok.shape == q.shape


@pytest.mark.gpu
def test_compiled_unet_keeps_the_kernel() -> None:
    """The custom op inside torch.compile: same output as eager SDPA, no graph break at the motion modules."""
    from dataclasses import replace

    from megactor_rt.config import tiny_config
    from megactor_rt.weights import build_models

    cfg = replace(tiny_config(), image_size=128)
    unet = build_models(cfg, seed=0, only=("temporal_unet",)).unet.to("cuda", torch.float16)
    g = torch.Generator().manual_seed(3)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to("cuda", torch.float16)

    args = (rand(1, 9, 16, 16, 16), torch.tensor(500, device="cuda"), rand(1, 257, cfg.unet.cross_attention_dim),
            rand(1, 4, 16, 16, 16))
    with torch.inference_mode():
        os.environ["MEGACTOR_SHORT_ATTENTION"] = "0"
        try:
            ref = unet(*args)
        finally:
            del os.environ["MEGACTOR_SHORT_ATTENTION"]
        eager = unet(*args)
        torch._dynamo.reset()
        compiled = torch.compile(unet, dynamic=False, fullgraph=True)(*args)
    assert (eager.float() - ref.float()).abs().max().item() < 5e-3
    assert (compiled.float() - ref.float()).abs().max().item() < 5e-3
