"""The temporal UNet (MegActor's denoiser) and the ReferenceNet, on one SD1.5-topology implementation.

Both networks mirror the original module trees (``down_blocks.i.{resnets,attentions,motion_modules,
downsamplers}``, ``mid_block``, ``up_blocks``), so checkpoint keys load as they are.

* ``TemporalUNet``: 13-channel conv_in (noisy 4 | reference latent 4 | mask 1 | PoseGuider 4), 20 motion
  modules, reference attention in the 10 mid/up transformer blocks, frame-spanning GroupNorm in resnets and
  the output norm. The PoseGuider lives at ``condition_input_layer`` (its checkpoint location) but runs
  outside ``forward``: its output is an input, so it can be computed once per driving frame.
* ``ReferenceNet``: the 2-D UNet (frames = 1) that returns the 10 bank tensors and stops after the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from torch import nn

from megactor_rt.config import UNetConfig
from megactor_rt.kernels.group_norm import group_norm_silu
from megactor_rt.models.layers import Downsample, MotionModule, ResnetBlock, Upsample
from megactor_rt.models.pose_guider import PoseGuider
from megactor_rt.models.transformer import AttnContext, BankTap, BasicTransformerBlock, SpatialTransformer

NUM_BANKS = 10
# feature reuse (a speed knob, DeepCache's shallowest branch): top-level down layers a reusing call recomputes;
# the last up block's layers from ``layers_per_block - REUSE_DOWN_LAYERS`` on consume their skips
REUSE_DOWN_LAYERS = 1
REUSE_BANKS = REUSE_DOWN_LAYERS + 1  # bank tensors a reusing call reads: the last ones, one per recomputed up layer


def reuse_kv_slots(num_blocks: int) -> list[int]:
    """The transformer blocks (``kv_slot``) a feature-reusing call runs, of a UNet with ``num_blocks``: the first
    ``REUSE_DOWN_LAYERS`` (top down block) and the last ``REUSE_BANKS`` (the top up block's recomputed layers)."""
    return [*range(REUSE_DOWN_LAYERS), *range(num_blocks - REUSE_BANKS, num_blocks)]


class _Block(nn.Module):
    """One down or up block: (resnet [, transformer] [, motion module]) x n, then down/upsampler."""

    resnets: nn.ModuleList
    attentions: nn.ModuleList
    motion_modules: nn.ModuleList
    downsamplers: nn.ModuleList
    upsamplers: nn.ModuleList

    def __init__(self, cfg: UNetConfig, in_chs: Sequence[int], out_ch: int, *, attention: bool,
                 motion: bool, down: bool, up: bool) -> None:
        super().__init__()
        temb = cfg.block_out_channels[0] * 4
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, temb, g, eps) for c in in_chs])
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.attention_heads, cfg.cross_attention_dim, g) for _ in in_chs])
        if motion:
            self.motion_modules = nn.ModuleList(
                [MotionModule(out_ch, cfg.motion_heads, cfg.motion_pe_max_len, cfg.motion_norm_groups)
                 for _ in in_chs])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, ctx: AttnContext,
              bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """resnet i -> transformer i -> motion module i. Returns (x, norm1 output of transformer i)."""
        x = self.resnets[i](x, temb, ctx.frames)
        normed = None
        if hasattr(self, "attentions"):
            x, normed = self.attentions[i](x, ctx, bank)
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[i](x, ctx.frames)
        return x, normed


class _MidBlock(nn.Module):
    resnets: nn.ModuleList
    attentions: nn.ModuleList

    def __init__(self, cfg: UNetConfig, ch: int) -> None:
        super().__init__()
        temb, g, eps = cfg.block_out_channels[0] * 4, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(ch, cfg.attention_heads, cfg.cross_attention_dim, g)])


class _UNetBase(nn.Module):
    """Shared construction: conv_in, time embedding, down/mid/up blocks (SD1.5 layout)."""

    down_blocks: nn.ModuleList
    up_blocks: nn.ModuleList
    mid_block: _MidBlock

    def __init__(self, cfg: UNetConfig, *, motion: bool, bank_writer: bool) -> None:
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            ins = [prev] + [c] * (cfg.layers_per_block - 1)
            self.down_blocks.append(_Block(cfg, ins, c, attention=i < n - 1, motion=motion,
                                           down=i < n - 1, up=False))
            prev = c
        self.mid_block = _MidBlock(cfg, ch[-1])
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        prev = rev[0]
        for i, c in enumerate(rev):
            skip_in, nl = rev[min(i + 1, n - 1)], cfg.layers_per_block + 1
            # resnet j input = (previous width if j == 0 else c) + skip width (skip_in for the last one)
            ins = [(prev if j == 0 else c) + (skip_in if j == nl - 1 else c) for j in range(nl)]
            self.up_blocks.append(_Block(cfg, ins, c, attention=i > 0, motion=motion,
                                         down=False, up=i < n - 1))
            prev = c
        if bank_writer:  # upstream's truncated last transformer block
            self._blocks(self.up_blocks)[-1].attentions[-1] = BankTap(ch[0], cfg.norm_num_groups)
        blocks = self.transformer_blocks()
        for slot, block in enumerate(blocks):
            block.kv_slot = slot
        self.num_transformer_blocks = len(blocks)

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        """The spatial transformer blocks (one cross-attention each), in module order: ``kv_slot`` order."""
        return [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]

    def token_kv(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The cross-attention keys and values of every transformer block for ``tokens (1, T, D)``, flat in
        ``kv_slot`` order ``[k_0, v_0, k_1, v_1, ...]``, each ``(1, heads, T, d)``: what every call would project
        from the same tokens, computed once per portrait (``forward``'s ``token_kv``)."""
        if tokens.shape[0] != 1:
            raise ValueError(f"token_kv takes one set of tokens (1, T, D), not {tuple(tokens.shape)}")
        # contiguous: as a portrait store file gives them back (a compiled UNet's guards check strides) and as a
        # TensorRT plan takes them
        return [t.contiguous() for block in self.transformer_blocks() for t in block.attn2.project_kv(tokens)]

    @staticmethod
    def _blocks(blocks: nn.ModuleList) -> list[_Block]:
        return list(blocks)  # type: ignore[arg-type]

    def time_embed(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)
        emb = get_timestep_embedding(t, self.config.block_out_channels[0],
                                     flip_sin_to_cos=self.config.flip_sin_to_cos,
                                     downscale_freq_shift=self.config.freq_shift)
        return self.time_embedding(emb.to(dtype))  # (B, 4*C0)

    def run_down(self, x: torch.Tensor, temb: torch.Tensor, ctx: AttnContext, layers: int | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path from conv_in's output; returns (x, skips). ``layers``: stop after that many layers
        of the first block (the shallow path of feature reuse)."""
        skips = [x]
        for block in self._blocks(self.down_blocks):
            for i in range(len(block.resnets)):
                x, _ = block.layer(i, x, temb, ctx)
                skips.append(x)
                if layers is not None and len(skips) > layers:
                    return x, skips
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)
        return x, skips


class TemporalUNet(_UNetBase):
    """MegActor's denoiser. See module docstring; ``forward`` documents the CFG batch conventions."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__(cfg, motion=True, bank_writer=False)
        ch0 = cfg.block_out_channels[0]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)
        self.condition_input_layer = PoseGuider()

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor | None,
                pose_features: torch.Tensor, bank: Sequence[torch.Tensor] | None = None, *,
                n_uncond: int = 0, shared_down: bool = False, upstream: bool = False,
                deep: torch.Tensor | None = None, keep_deep: bool = False,
                token_kv: Sequence[torch.Tensor | None] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise of one context window.

        Args:
            latents: ``(B, 9, F, h, w)`` = noisy latent 4 | reference latent 4 | background mask 1.
            timestep: scalar or ``(B,)``.
            tokens: CLIP tokens ``(B, T, D)``, or ``(1, T, D)`` shared by all samples (not with ``upstream``);
                None with ``token_kv``.
            pose_features: PoseGuider output ``(B, 4, F, h, w)``.
            bank: the 10 ReferenceNet tensors ``(Bb, L_i, C_i)`` for the conditional samples (Bb = 1 is
                broadcast), or None for no reference attention anywhere.
            n_uncond: leading samples that attend without the bank (1 for upstream's CFG pair).
            shared_down: the inputs are B samples (context windows) without their CFG twins; the path up to
                the first reference attention (conv_in, down blocks, first mid resnet) runs once per sample and
                is then duplicated into [B uncond, B cond]: output batch 2B (``n_uncond`` is then B). Exact,
                since both CFG halves get identical inputs. ``tokens`` may have batch 1 (shared by all).
            upstream: evaluate the way upstream does (see ``AttnContext``).
            deep: feature reuse (changes the math): the deep feature ``(B_out, F, C0, h, w)`` a ``keep_deep``
                call returned at an earlier step for the same frames. Only the shallow path runs: conv_in, the
                first ``REUSE_DOWN_LAYERS`` layers of the top down block, and the top up block's layers from the
                one that consumes their skips on, starting from ``deep`` instead of the deeper levels' output.
            keep_deep: also return the deep feature (the input of that first recomputed up layer).
            token_kv: :meth:`token_kv` of ``tokens`` (the same values, projected once per portrait instead of in
                every call; None in the slots a call does not run: :func:`reuse_kv_slots`); not with
                ``upstream``, which projects the tokens per frame as upstream does.

        Returns:
            Predicted noise ``(B_out, 4, F, h, w)``; with ``keep_deep``, ``(noise, deep feature)``.
        """
        if keep_deep and deep is not None:
            raise ValueError("keep_deep needs the whole UNet: pass either deep or keep_deep, not both")
        if token_kv is not None and upstream:
            raise ValueError("upstream projects the tokens in every call, per frame: token_kv is for the others")
        if token_kv is not None and len(token_kv) != 2 * self.num_transformer_blocks:
            raise ValueError(f"token_kv: {len(token_kv)} tensors, expected 2 x {self.num_transformer_blocks} "
                             "(TemporalUNet.token_kv)")
        if tokens is None and token_kv is None:
            raise ValueError("the UNet needs the CLIP tokens or their keys/values (token_kv)")
        b, _, f, h, w = latents.shape
        x = torch.cat([latents, pose_features], dim=1)  # (B, 13, F, h, w)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)  # fold frames: (B*F, 13, h, w)
        temb = self.time_embed(timestep, b, x.dtype)
        ctx = AttnContext(tokens, f, 0 if shared_down else n_uncond, upstream, token_kv)
        x, skips = self.run_down(self.conv_in(x), temb, ctx, None if deep is None else REUSE_DOWN_LAYERS)
        if deep is None:
            x = self.mid_block.resnets[0](x, temb, f)
        if shared_down:  # [B samples] -> [B uncond | B cond]
            pair = tokens if tokens is None or tokens.shape[0] == 1 else torch.cat([tokens, tokens])
            b, ctx = 2 * b, AttnContext(pair, f, b, upstream, token_kv)
            x, temb = torch.cat([x, x]) if deep is None else x, temb.repeat(2, 1)
            skips = [torch.cat([s, s]) for s in skips]
        banks = list(bank) if bank is not None else None
        kept = None
        if deep is None:
            x, kept = self._mid_up(x, temb, ctx, skips, banks, keep_deep)
        else:
            x = self._top_up(deep.flatten(0, 1), temb, ctx, skips, banks)
        x = self.conv_out(group_norm_silu(x, self.conv_norm_out, f))
        eps = x.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)  # (B, 4, F, h, w)
        if kept is not None:
            return eps, kept.unflatten(0, (b, f))
        return eps

    def _reuse_start(self) -> int:
        """Index, in the top up block, of the first layer a feature-reusing call recomputes."""
        return self.config.layers_per_block - REUSE_DOWN_LAYERS

    def _mid_up(self, x: torch.Tensor, temb: torch.Tensor, ctx: AttnContext, skips: list[torch.Tensor],
                banks: list[torch.Tensor] | None, keep_deep: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        it = iter(banks) if banks is not None else None

        def nxt() -> torch.Tensor | None:
            return next(it) if it is not None else None

        x, _ = self.mid_block.attentions[0](x, ctx, nxt())
        x = self.mid_block.resnets[1](x, temb, ctx.frames)
        blocks = self._blocks(self.up_blocks)
        kept = None
        for block in blocks:
            for i in range(len(block.resnets)):
                if keep_deep and block is blocks[-1] and i == self._reuse_start():
                    kept = x
                x = torch.cat([x, skips.pop()], dim=1)
                x, _ = block.layer(i, x, temb, ctx, nxt() if hasattr(block, "attentions") else None)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)
        return x, kept

    def _top_up(self, x: torch.Tensor, temb: torch.Tensor, ctx: AttnContext, skips: list[torch.Tensor],
                banks: list[torch.Tensor] | None) -> torch.Tensor:
        """The top up block's layers a feature-reusing call recomputes, from the deep feature ``x``."""
        top = self._blocks(self.up_blocks)[-1]
        layers = range(self._reuse_start(), len(top.resnets))
        own = banks[len(banks) - len(layers):] if banks is not None else [None] * len(layers)  # one per layer
        for i, bank in zip(layers, own):
            x = torch.cat([x, skips.pop()], dim=1)
            x, _ = top.layer(i, x, temb, ctx, bank)
        return x


class ReferenceNet(_UNetBase):
    """Upstream's appearance encoder: writes the norm1 outputs of its 10 mid/up transformer blocks."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__(cfg, motion=False, bank_writer=True)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Args: latent ``(B, 4, h, w)`` (VAE mean x 0.18215); timestep scalar or ``(B,)``; tokens ``(B, T, D)``.

        Returns:
            The bank: 10 tensors ``(B, L_i, C_i)`` in reader order (mid, then up blocks 1..3).
        """
        b = latent.shape[0]
        temb = self.time_embed(timestep, b, latent.dtype)
        ctx = AttnContext(tokens, 1)
        x, skips = self.run_down(self.conv_in(latent), temb, ctx)
        x = self.mid_block.resnets[0](x, temb, 1)
        x, normed = self.mid_block.attentions[0](x, ctx)
        bank = [normed]
        x = self.mid_block.resnets[1](x, temb, 1)
        last = list(self._blocks(self.up_blocks))[-1]
        for block in self._blocks(self.up_blocks):
            for i in range(len(block.resnets)):
                x = torch.cat([x, skips.pop()], dim=1)
                if block is last and i == len(block.resnets) - 1:
                    x = block.resnets[i](x, temb, 1)
                    bank.append(block.attentions[i](x))  # BankTap: norm1 output, then stop
                    return bank
                x, normed = block.layer(i, x, temb, ctx)
                if normed is not None:
                    bank.append(normed)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)
        raise AssertionError("unreachable: the last up block always ends in the bank tap")
