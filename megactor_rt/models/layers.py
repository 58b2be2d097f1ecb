"""Building blocks shared by the temporal UNet and the ReferenceNet.

Tensor layout inside the UNets is *folded*: video activations are ``(B*F, C, H, W)`` with the frames of a
sample contiguous (sample-major), so per-frame ops (convs, spatial attention) run unchanged and only the
ops that mix frames (frame-spanning GroupNorm, motion modules) unfold. Parameter names mirror the original
MegActor v1 module tree, so released checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megactor_rt.kernels.group_norm import group_norm_silu
from megactor_rt.kernels.short_attention import short_attention


def repeat_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B, ...)`` -> ``(B*F, ...)``: each sample repeated for its F frames (sample-major, like the fold).

    Written as expand + reshape (not ``repeat_interleave``) so exported graphs stay a plain Expand.
    """
    return x.unsqueeze(1).expand(x.shape[0], frames, *x.shape[1:]).reshape(-1, *x.shape[1:])


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q/to_k/to_v/to_out.0), SDPA inside."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, Cc)`` -> keys and values ``(B, h, N, d)``."""
        return self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries from ``x (B, L, C)`` against ``k, v (B, h, N, d)`` -> ``(B, L, C)``."""
        q = self.split_heads(self.to_q(x))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        b, h, n, d = o.shape
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.project_kv(x if context is None else context)
        return self.attend(x, k, v)


def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch`` for a transformer's residual, where ``branch`` is a channels-last view (the tokens
    permuted back to ``(B*F, C, H, W)``). The values are the same either way round; the memory layout of the sum
    follows the first operand, and every later conv and norm inherits it:

    * CUDA: ``x`` first, so activations stay contiguous NCHW as upstream's (diffusers calls ``.contiguous()``
      there), and the Triton GroupNorm+SiLU kernels, which take contiguous input, serve every resnet norm (in
      the other order 41 of the tiny UNet's 45 got channels-last input and fell back to PyTorch);
    * CPU: ``branch`` first, so channels-last flows on: a full-size 256 px window call ran about 8 % faster
      that way on this project's 2-core machine (2026-11-27, docs/performance.md).
    """
    return x + branch if x.is_cuda and KEEP_NCHW_ON_CUDA else branch + x


KEEP_NCHW_ON_CUDA = True  # residual_add's CUDA order; bench/profile_unet.py times False (the CPU's) on a GPU


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU (keys ``net.0.proj``, ``net.2``), mult 4."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class ResnetBlock(nn.Module):
    """ResnetBlock3D of upstream: frame-spanning GroupNorms, per-frame 3x3 convs, time-embedding bias."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        # x: (B*F, C, H, W); temb: (B, T)
        h = self.conv1(group_norm_silu(x, self.norm1, frames))
        t = self.time_emb_proj(F.silu(temb))  # (B, C_out)
        h = h + repeat_frames(t, frames)[:, :, None, None]
        h = self.conv2(group_norm_silu(h, self.norm2, frames))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PositionalEncoding(nn.Module):
    """Sinusoidal temporal position encoding; ``pe`` is a persistent buffer (it is in the checkpoint)."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(1, max_len, d_model)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.pe: torch.Tensor
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]]


class TemporalAttention(Attention):
    """Self-attention over the frames at each spatial position, with the position encoding on its input."""

    def __init__(self, dim: int, heads: int, pe_max_len: int) -> None:
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim, pe_max_len)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        """``x (B*F, HW, C)`` folded activations; attends over the F frames at every position, in place of
        upstream's rearrange to ``(B*HW, F, C)``: the projections are per token and ``short_attention``
        takes the frame-major layout as it is (the Triton kernel on CUDA, SDPA elsewhere)."""
        bf, hw, c = x.shape
        t = x.view(bf // frames, frames, hw, c) + self.pos_encoder.pe[:, :frames, None, :]
        o = short_attention(self.to_q(t), self.to_k(t), self.to_v(t), self.heads)  # (B, F, HW, C)
        return self.to_out[0](o).view(bf, hw, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pe_max_len: int) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, pe_max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, pe_max_len: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(ch, heads, pe_max_len)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)  # per-frame GroupNorm
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, frames)
        t = self.proj_out(t)
        return residual_add(x, t.reshape(bf, h, w, c).permute(0, 3, 1, 2))


class MotionModule(nn.Module):
    """AnimateDiff 'Vanilla' temporal module (upstream VanillaTemporalModule)."""

    def __init__(self, ch: int, heads: int, pe_max_len: int, groups: int) -> None:
        super().__init__()
        self.temporal_transformer = TemporalTransformer(ch, heads, pe_max_len, groups)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)
