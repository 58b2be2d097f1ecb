"""Frame-spanning GroupNorm + SiLU (kernels/group_norm.py): the reference against an independent 5-D
GroupNorm, the Triton kernels against the reference on CPU through Triton's interpreter (subprocess with
TRITON_INTERPRET=1) and on a GPU (marked `gpu`, the UNet's real shapes), and the dispatch rules."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from stand_ins import ClaimsCuda, PastTheSwitch
from torch import nn

from megactor_rt.kernels import group_norm as GN


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("silu", [True, False])
def test_reference_matches_5d_group_norm(frames: int, silu: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, c, h, groups = 2, 16, 6, 4
    x = torch.randn(b * frames, c, h, h, generator=g)
    w, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    x5 = x.view(b, frames, c, h, h).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W), upstream's layout
    want = F.group_norm(x5, groups, w, bias, 1e-6).permute(0, 2, 1, 3, 4).reshape_as(x)
    want = F.silu(want) if silu else want
    got = GN.group_norm_silu_ref(x, w, bias, groups, frames, 1e-6, silu)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CASES = [  # (B, F, C, H, groups, affine, silu): multi-chunk spans, frames=1, no affine, odd sizes, and 17 frames
    # (more partial statistics per group than the apply kernel's smallest block of 16)
    (1, 16, 64, 8, 32, True, True), (2, 4, 32, 8, 8, True, False), (1, 1, 64, 16, 32, False, True),
    (2, 3, 40, 5, 4, True, True), (1, 2, 16, 70, 4, True, True), (1, 17, 8, 2, 4, True, True)]


def test_kernels_in_triton_interpreter(triton_interpreter: Callable[[str, int], None]) -> None:
    triton_interpreter(f"""
        import torch
        from megactor_rt.kernels import group_norm as GN
        g = torch.Generator().manual_seed(1)
        for b, f, c, h, groups, affine, silu in {CASES!r}:
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
                x = (torch.randn(b * f, c, h, h, generator=g) * 3 + 5).to(dtype)  # offset mean: the variance must not cancel
                w = torch.randn(c, generator=g).to(dtype) if affine else None
                bias = torch.randn(c, generator=g).to(dtype) if affine or silu else None  # silu alone: bias alone
                out = GN.group_norm_silu_triton(x, w, bias, groups, f, 1e-6, silu)
                ref = GN.group_norm_silu_ref(x.float(), None if w is None else w.float(),
                                             None if bias is None else bias.float(), groups, f, 1e-6, silu)
                assert out.shape == x.shape and out.dtype == dtype
                err = (out.float() - ref).abs().max().item()
                assert err < tol * max(1.0, ref.abs().max().item()), (b, f, c, h, groups, dtype, err)
        print("ok")
        """, 900)


def test_dispatch_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    x = torch.randn(8, 16, 4, 4)
    assert not GN.group_norm_silu_usable(x)  # CPU: PyTorch
    torch.testing.assert_close(GN.group_norm_silu(x, norm, 4),
                               GN.group_norm_silu_ref(x, norm.weight, norm.bias, 4, 4, 1e-6))
    monkeypatch.setattr(GN, "HAVE_TRITON", True)  # the switch, where a CUDA tensor and Triton are there:
    monkeypatch.setenv("MEGACTOR_TRITON_GROUP_NORM", "0")  # off: no
    assert not GN.group_norm_silu_usable(ClaimsCuda())  # type: ignore[arg-type]
    monkeypatch.setenv("MEGACTOR_TRITON_GROUP_NORM", "1")  # on: the checks go on to the stand-in's shape
    with pytest.raises(PastTheSwitch):
        GN.group_norm_silu_usable(ClaimsCuda())  # type: ignore[arg-type]
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(ValueError, match="multiple of frames"):
            GN.group_norm_silu_triton(x, None, None, 4, 3, 1e-6)
        with pytest.raises(ValueError, match="contiguous"):
            GN.group_norm_silu_triton(x.transpose(2, 3), None, None, 4, 4, 1e-6)


def test_cpu_activations_never_reach_the_self_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU activations take the reference before any kernel question, even with Triton importable: the
    once-per-device self-check (a Triton compile, which fails for CPU tensors outside the interpreter) is for
    CUDA devices only."""
    def no_self_check(device: torch.device) -> bool:
        raise AssertionError(f"self-check asked for {device}")

    monkeypatch.setattr(GN, "HAVE_TRITON", True)
    monkeypatch.setattr(GN, "_self_check", no_self_check)
    monkeypatch.setenv("MEGACTOR_TRITON_GROUP_NORM", "1")
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    x = torch.randn(8, 16, 4, 4)
    assert not GN.group_norm_silu_usable(x)
    torch.testing.assert_close(GN.group_norm_silu(x, norm, 4),
                               GN.group_norm_silu_ref(x, norm.weight, norm.bias, 4, 4, 1e-6))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_refuse_channels_that_do_not_split_into_the_groups() -> None:
    """The kernels index a group's channels as C/G consecutive ones: C not a multiple of G is refused before any
    launch (by name), as F.group_norm refuses it."""
    x = torch.randn(4, 10, 2, 2)
    with pytest.raises(ValueError, match="channels 10 of groups=4"):
        GN.group_norm_silu_triton(x, None, None, 4, 2, 1e-6)
    with pytest.raises(RuntimeError):  # the reference's own refusal (PyTorch's)
        GN.group_norm_silu_ref(x, None, None, 4, 2, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 320, 64), (1, 16, 640, 32), (2, 16, 1280, 8), (1, 1, 320, 64),
                                   (2, 16, 2560, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernels_on_gpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    b, f, c, h = shape
    g = torch.Generator().manual_seed(2)
    norm = nn.GroupNorm(32, c, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    norm = norm.to("cuda", dtype)
    x = (torch.randn(b * f, c, h, h, generator=g) * 2 + 1).to("cuda", dtype)
    assert GN.group_norm_silu_usable(x)
    out = GN.group_norm_silu(x, norm, f)
    ref = GN.group_norm_silu_ref(x.float(), norm.weight.float(), norm.bias.float(), 32, f, 1e-5)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert (out.float() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def test_self_check_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A Triton that cannot build the kernels, or kernels that compute wrong values, mean PyTorch from then on."""
    cpu = torch.device("cpu")

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no kernel for you")

    def wrong(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(x)

    for fake, message in ((broken, "unusable"), (wrong, "self-check error")):
        GN._self_check.cache_clear()
        monkeypatch.setattr(GN, "group_norm_silu_triton", fake)
        with caplog.at_level("WARNING", logger=GN.__name__):
            assert GN._self_check(cpu) is False
        assert message in caplog.text
    monkeypatch.setattr(GN, "group_norm_silu_triton", lambda x, w, b, g, f, eps, silu=True:
                        GN.group_norm_silu_ref(x, w, b, g, f, eps, silu))
    GN._self_check.cache_clear()
    assert GN._self_check(cpu) is True
    GN._self_check.cache_clear()


@pytest.mark.parametrize("upstream", [False, True])
def test_every_unet_group_norm_gets_contiguous_activations_on_cuda(monkeypatch: pytest.MonkeyPatch,
                                                                   upstream: bool) -> None:
    """The Triton kernels take contiguous (NCHW) activations only. On CUDA the transformers' residual sums put x
    first (``layers.residual_add``), so their output keeps x's layout: before, ``proj_out(t) + x`` took the
    permuted view's channels-last layout, every later conv kept it, and 41 of the tiny UNet's 45 frame-spanning
    norms fell back to PyTorch. Here on the CPU the CUDA order is patched in, which checks that those sums are
    the only place the layout changes, in both evaluation styles, with the ReferenceNet's bank."""
    from megactor_rt.config import tiny_config
    from megactor_rt.models import layers, transformer, unet

    seen: list[bool] = []

    def recording(x: torch.Tensor, norm: nn.GroupNorm, frames: int, silu: bool = True) -> torch.Tensor:
        seen.append(x.is_contiguous())
        return GN.group_norm_silu_ref(x, norm.weight, norm.bias, norm.num_groups, frames, norm.eps, silu)

    def run() -> list[bool]:
        seen.clear()
        torch.manual_seed(0)
        cfg = tiny_config()
        model, refnet = unet.TemporalUNet(cfg.unet).eval(), unet.ReferenceNet(cfg.reference_net).eval()
        tokens = torch.randn(1, 17, cfg.unet.cross_attention_dim)
        with torch.no_grad():
            bank = refnet(torch.randn(1, 4, 16, 16), torch.tensor(501), tokens)
            model(torch.randn(2, 9, 4, 16, 16), torch.tensor(501), tokens.expand(2, -1, -1),
                  torch.randn(2, 4, 4, 16, 16), bank, n_uncond=1, shared_down=not upstream, upstream=upstream)
        return list(seen)

    monkeypatch.setattr(layers, "group_norm_silu", recording)
    monkeypatch.setattr(unet, "group_norm_silu", recording)
    on_cpu = run()
    assert not all(on_cpu)  # the CPU order: channels-last flows on (faster oneDNN convs)
    for module in (layers, transformer):
        monkeypatch.setattr(module, "residual_add", lambda x, branch: x + branch)  # what CUDA tensors take
    on_cuda = run()
    assert len(on_cuda) > 20 and all(on_cuda), f"{on_cuda.count(False)} of {len(on_cuda)} norms non-contiguous"


def test_residual_add_order_sets_the_layout() -> None:
    from megactor_rt.models.layers import residual_add

    x = torch.randn(2, 8, 4, 4)
    branch = torch.randn(2, 4, 4, 8).permute(0, 3, 1, 2)  # a channels-last view, like the permuted tokens
    out = residual_add(x, branch)
    torch.testing.assert_close(out, x + branch, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()  # CPU: branch first
    if torch.cuda.is_available():
        on_gpu = residual_add(x.cuda(), branch.cuda())
        assert on_gpu.is_contiguous()
