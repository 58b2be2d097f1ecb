"""Spatial transformers with explicit reference ("mutual self-") attention.

Upstream MegActor monkey-patches the forward of the mid/up transformer blocks at run time to read and write
a "bank". Here the bank is an explicit argument: the ReferenceNet returns the norm1 outputs of its mid/up
blocks, and the temporal UNet takes them as an input. Semantics of the reader (spec section 1.4):

* conditional samples: self-attention K/V = concat(own normed tokens, bank tokens of the paired block);
* unconditional samples (the first ``n_uncond`` samples of the batch under CFG): K/V = own tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megactor_rt.models.layers import Attention, FeedForward, repeat_frames, residual_add


@dataclass
class AttnContext:
    """Per-call arguments every spatial transformer needs.

    Attributes:
        tokens: CLIP tokens ``(B, T, D)`` (one set per sample, shared by its frames) or ``(1, T, D)`` (shared by
            every sample; not with ``upstream``).
        frames: F, the frames per sample in the folded batch.
        n_uncond: leading samples that attend without the bank (CFG unconditional half).
        upstream: evaluate the way upstream does (tokens repeated per frame before projection, bank K/V
            for every sample and the unconditional rows recomputed). Same math, more work; for
            ``Mode.REFERENCE`` benchmarks.
        token_kv: the cross-attention keys and values of ``tokens`` (batch 1), projected once per portrait
            (``TemporalUNet.token_kv``): ``[k, v]`` per transformer block in ``kv_slot`` order (None for blocks
            a call does not run, as in the exported feature-reuse graphs); None: each block projects ``tokens``
            itself. Not with ``upstream``.
    """

    tokens: torch.Tensor | None  # None: only with token_kv
    frames: int
    n_uncond: int = 0
    upstream: bool = False
    token_kv: Sequence[torch.Tensor | None] | None = None


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attention (+bank) -> LayerNorm -> cross-attention -> LayerNorm -> GEGLU FF."""

    kv_slot = -1  # this block's place in a UNet's ``token_kv`` list (numbered by the UNet, in module order)

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext, bank: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x ``(B*F, L, C)``; bank ``(Bb, Lb, C)`` or None. Returns (output, norm1 output)."""
        normed = self.norm1(x)
        x = self._self_attention(normed, ctx, bank) + x
        x = self._cross_attention(self.norm2(x), ctx) + x
        x = self.ff(self.norm3(x)) + x
        return x, normed

    def _cross_attention(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if ctx.upstream:  # upstream repeats the tokens per frame, then projects every copy
            assert ctx.tokens is not None, "upstream projects the tokens: AttnContext needs them"
            return self.attn2.attend(x, *self.attn2.project_kv(repeat_frames(ctx.tokens, ctx.frames)))
        if ctx.token_kv is not None:  # projected once per portrait
            if self.kv_slot < 0:
                raise ValueError("token_kv given to a transformer block no UNet numbered (kv_slot)")
            k, v = ctx.token_kv[2 * self.kv_slot], ctx.token_kv[2 * self.kv_slot + 1]  # (1, h, T, d)
            if k is None or v is None:
                raise ValueError(f"token_kv holds no keys/values for transformer block {self.kv_slot}")
        else:
            assert ctx.tokens is not None, "AttnContext needs tokens or token_kv"
            k, v = self.attn2.project_kv(ctx.tokens)  # (B or 1, h, T, d): once per sample, or once for all
        b = x.shape[0] // ctx.frames  # the same values for every frame: broadcast
        k, v = (repeat_frames(t.expand(b, -1, -1, -1), ctx.frames) for t in (k, v))
        return self.attn2.attend(x, k, v)

    def _self_attention(self, n: torch.Tensor, ctx: AttnContext, bank: torch.Tensor | None) -> torch.Tensor:
        attn, f = self.attn1, ctx.frames
        if bank is None:
            return attn(n)
        u = ctx.n_uncond * f  # rows of the unconditional samples
        if ctx.upstream:
            # upstream: bank (one per sample) repeated per frame, K/V over concat for every row, then the
            # unconditional rows are recomputed without the bank
            bank = bank.expand(n.shape[0] // f, -1, -1)
            kv_in = torch.cat([n, repeat_frames(bank, f)], dim=1)
            out = attn(n, kv_in)
            return torch.cat([attn(n[:u]), out[u:]]) if u else out
        k, v = attn.project_kv(n)  # (B*F, h, L, d)
        kb, vb = attn.project_kv(bank)  # (Bb, h, Lb, d)
        rows = n.shape[0] - u
        kb, vb = (repeat_frames(t.expand(rows // f, -1, -1, -1), f) for t in (kb, vb))  # bank batch 1 broadcasts
        out_c = attn.attend(n[u:], torch.cat([k[u:], kb], dim=2), torch.cat([v[u:], vb], dim=2))
        if not u:
            return out_c
        return torch.cat([attn.attend(n[:u], k[:u], v[:u]), out_c])


class SpatialTransformer(nn.Module):
    """Transformer3DModel of upstream: per-frame GroupNorm, 1x1 proj_in, one block, 1x1 proj_out, residual."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, ctx: AttnContext, bank: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x ``(B*F, C, H, W)``. Returns (output ``(B*F, C, H, W)``, norm1 output ``(B*F, HW, C)``)."""
        bf, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        t, normed = self.transformer_blocks[0](t, ctx, bank)
        t = t.reshape(bf, h, w, c).permute(0, 3, 1, 2)
        return residual_add(x, self.proj_out(t)), normed


class _NormOnlyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)


class BankTap(nn.Module):
    """The ReferenceNet's last transformer (``up_blocks.3.attentions.2``): only its norm1 output is used.

    Upstream replaces the rest of that block by identities and discards its result; the checkpoint holds
    only ``norm``, ``proj_in`` and ``transformer_blocks.0.norm1``.
    """

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([_NormOnlyBlock(ch)])

    def normed(self, t: torch.Tensor) -> torch.Tensor:
        block: _NormOnlyBlock = self.transformer_blocks[0]  # type: ignore[assignment]
        return block.norm1(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        return self.normed(t)
