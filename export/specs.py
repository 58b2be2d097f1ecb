"""One export spec per graph: names, shapes (named dynamic dims), sample inputs, TensorRT profiles.

Graph boundaries (DESIGN.md), with S = image size, h = latent size, T/D = CLIP tokens/width, F = frames:

| graph | inputs -> outputs |
|---|---|
| clip_image_encoder | pixels (1,3,224,224) -> tokens (1,T,D) |
| vae_encoder | images (1,3,S,S) -> mean, logvar (1,4,h,h) |
| vae_decoder | latents (batch,4,h,h) -> images (batch,3,S,S) |
| reference_net | latent (1,4,h,h), timestep (1,), tokens -> bank_00..bank_09 (1,L_i,C_i) |
| pose_guider | frames (batch,3,S,S), film_scale, film_shift (1,128) -> pose (batch,4,h,h) |
| pose_guider_film | reference (1,3,512,512) -> film_scale, film_shift |
| token_kv | tokens (1,T,D) -> kv_00_k, kv_00_v .. kv_15_k, kv_15_v (1,8,T,C_i/8): the UNet's cross-attention K/V |
| temporal_unet | latents (W,9,F,h,h), timestep, pose (W,4,F,h,h), kv_00_k..kv_15_v, bank_00..09 -> eps (2W,4,F,h,h), deep (2W,F,C0,h,h) |
| temporal_unet_cond | same inputs -> eps (W,4,F,h,h), deep (W,F,C0,h,h) (guidance 1: conditional only) |
| temporal_unet_reuse | latents, timestep, pose, kv of blocks 0, 14, 15, deep (2W,F,C0,h,h), bank_08..09 -> eps (2W,4,F,h,h) |
| temporal_unet_cond_reuse | same with deep (W,F,C0,h,h) -> eps (W,4,F,h,h) |
| tiny_decoder | latents (batch,4,h,h), scaled -> images (batch,3,S,S) (TAESD, from its own weights file) |

The CLIP tokens' cross-attention keys and values depend only on the portrait: ``token_kv`` projects them once
per portrait and the UNet graphs take them (32 inputs; a feature-reusing graph only those of the blocks it
runs) instead of projecting the tokens in every call. The temporal UNet takes the ReferenceNet bank as explicit inputs (normed tokens, not pre-projected K/V:
10 tensors of 1 x L x C instead of 20, and the K/V projection is a small share of the attention cost). The
CFG graph computes the down path once and both halves above it, the unconditional one without the bank -
upstream's CFG pair, exactly. Graph variants are specs over the same modules, never copies of code.

W (dim ``windows``) is the number of context windows in one call (``AnimateConfig.window_batch``; tokens and bank
have batch 1 and serve all of them); a CFG graph's outputs are [W unconditional | W conditional] (dim ``pairs``
= 2W). onnxruntime runs any W; a TensorRT plan runs W up to its profile's maximum (``export --window-batch``).

Feature reuse (``AnimateConfig.feature_reuse``): the two whole-UNet graphs also output their deep feature (the
input of the top up block's recomputed layers; writing it costs one extra output buffer), and the two
``_reuse`` graphs are the shallow path that starts from it (only the top level's weights; they read only the
bank tensors of the layers they run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megactor_rt.config import ModelConfig
from megactor_rt.errors import InputError
from megactor_rt.models.unet import NUM_BANKS, REUSE_BANKS, reuse_kv_slots
from megactor_rt.weights import MegActorModels

BANK_NAMES = tuple(f"bank_{i:02d}" for i in range(NUM_BANKS))
# the graphs of a whole export, as export_specs names them (tiny_decoder, from export --tiny-decoder, aside)
GRAPH_NAMES = ("clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider", "pose_guider_film",
               "token_kv", "temporal_unet", "temporal_unet_cond", "temporal_unet_reuse", "temporal_unet_cond_reuse")
TRACE = -1
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"  # fp16 graphs turn float32 into float16 except where ``keep_fp32``


@dataclass(frozen=True)
class ExportSpec:
    """How to export one graph.

    Attributes:
        name: graph name (file stem).
        submodel: the engine manifest's name for the graph (one plan per submodel; equals ``name``).
        inputs / outputs: tensor specs in call order; a str dim is dynamic.
        build: wraps the loaded models into a module whose forward takes the inputs positionally.
        dims: per dynamic dim name, (min, opt, max) per profile name.
        keep_fp32: inputs that stay float32 in the fp16 graph (the timestep: sinusoids need it).
        trace_sizes: size of a dynamic dim in the traced sample where it must not follow the profiles (a dim
            whose profiles all end at 1 is still traced at 2, so no size-1 special case is baked in).
    """

    name: str
    submodel: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[Any], nn.Module]  # MegActorModels (TinyDecoderModels for the tiny decoder)
    dims: dict[str, dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    keep_fp32: tuple[str, ...] = ()
    trace_sizes: dict[str, int] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}

    def concrete(self, shape: tuple[Dim, ...], profile: str, which: int) -> tuple[int, ...]:
        """Shape at a profile's min (0) / opt (1) / max (2), or ``TRACE`` (-1): 2 wherever some profile allows
        it (the graph serves them all: an export for 1-frame windows still has a ``long`` profile of up to 32),
        small enough to trace a full-size model on CPU quickly and > 1 so no size-1 special case is baked in."""
        if which == TRACE:
            return tuple(d if isinstance(d, int) else self.trace_sizes.get(d) or self._trace_size(d) for d in shape)
        return tuple(d if isinstance(d, int) else self.dims[d][profile][which] for d in shape)

    def _trace_size(self, dim: str) -> int:
        ranges = self.dims[dim].values()
        return min(max(2, min(r[0] for r in ranges)), max(r[2] for r in ranges))

    def profiles(self) -> dict[str, dict[str, list[list[int]]]]:
        """TensorRT min/opt/max shapes of every input, per profile name."""
        names = sorted({p for ranges in self.dims.values() for p in ranges}) or ["default"]
        return {p: {t.name: [list(self.concrete(t.shape, p, k)) for k in range(3)] for t in self.inputs}
                for p in names}

    def sample_inputs(self, profile: str = "default", which: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs at the profile's opt (which=1) shapes; timesteps are a valid DDIM timestep."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = self.concrete(t.shape, profile, which)
            if t.name == "timestep":
                out.append(torch.tensor([501.0]))
            elif t.name in ("frames", "reference"):
                out.append(torch.rand(shape, generator=gen))
            else:
                out.append(torch.randn(shape, generator=gen))
        return tuple(out)


# -- graph wrappers (flat positional tensors in, tuple out) --------------------------------------------
class _Clip(nn.Module):
    def __init__(self, m: MegActorModels) -> None:
        super().__init__()
        self.clip = m.clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.tokens(pixels)


class _VaeEncoder(nn.Module):
    def __init__(self, m: MegActorModels) -> None:
        super().__init__()
        self.vae = m.vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from megactor_rt.models.vae import vae_moments

        return vae_moments(self.vae, images)


class _VaeDecoder(_VaeEncoder):
    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from megactor_rt.models.vae import vae_decode

        return vae_decode(self.vae, latents)


class _ReferenceNet(nn.Module):
    def __init__(self, m: MegActorModels) -> None:
        super().__init__()
        self.net = m.reference_net

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(latent, timestep, tokens))


class _PoseGuider(nn.Module):
    def __init__(self, m: MegActorModels) -> None:
        super().__init__()
        self.pg = m.unet.condition_input_layer

    def forward(self, frames: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.pg.modulate(self.pg.features(frames), scale, shift)


class _Film(_PoseGuider):
    def forward(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.pg.film(reference)


@dataclass
class TinyDecoderModels:
    """What the tiny decoder's export needs in place of :class:`MegActorModels`: the loaded TAESD decoder, the
    id of its weights file (the graph's ``weights_id``) and the model config whose sizes the graph takes."""

    config: ModelConfig
    weights_id: str
    tiny_decoder: nn.Module


def tiny_decoder_spec(cfg: ModelConfig, decode_batch: int = 4) -> ExportSpec:
    """The TAESD decoder as a graph (``--tiny-decoder``; scaled latents in, like the VAE decoder's images out)."""
    s, h = cfg.image_size, cfg.latent_size
    return ExportSpec("tiny_decoder", "tiny_decoder", (TensorSpec("latents", ("batch", 4, h, h)),),
                      (TensorSpec("images", ("batch", 3, s, s)),), lambda m: m.tiny_decoder,
                      {"batch": {"default": (1, decode_batch, decode_batch)}})


class _TokenKV(nn.Module):
    def __init__(self, m: MegActorModels) -> None:
        super().__init__()
        self.unet = m.unet

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.unet.token_kv(tokens))


class _UNet(nn.Module):
    """The whole UNet (outputs eps and the deep feature), or with ``reuse`` the shallow path (inputs end with
    the deep feature and the last ``REUSE_BANKS`` bank tensors). After latents, timestep and pose come the
    tokens' keys and values of the transformer blocks ``slots`` (all of them, or those a reusing call runs)."""

    def __init__(self, m: MegActorModels, cfg_pair: bool, reuse: bool = False) -> None:
        super().__init__()
        self.unet = m.unet
        self.pair = {"n_uncond": 1, "shared_down": True} if cfg_pair else {}
        self.reuse = reuse
        blocks = m.unet.num_transformer_blocks
        self.slots = reuse_kv_slots(blocks) if reuse else list(range(blocks))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, pose: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kv: list[torch.Tensor | None] = [None] * (2 * self.unet.num_transformer_blocks)
        for j, slot in enumerate(self.slots):
            kv[2 * slot], kv[2 * slot + 1] = rest[2 * j], rest[2 * j + 1]
        rest = rest[2 * len(self.slots):]
        if self.reuse:
            deep, *bank = rest
            return self.unet(latents, timestep, None, pose, bank, deep=deep, token_kv=kv, **self.pair)
        return self.unet(latents, timestep, None, pose, list(rest), keep_deep=True, token_kv=kv, **self.pair)


def bank_shapes(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """Shapes ``(1, L, C)`` of the 10 bank tensors: mid, then 3 per up block 1..3."""
    ch, h = cfg.reference_net.block_out_channels, cfg.latent_size
    n = len(ch)
    shapes = [(1, (h // 2 ** (n - 1)) ** 2, ch[-1])]
    for level in range(n - 2, -1, -1):  # up blocks 1..3 work at latent/4, /2, /1
        shapes += [(1, (h // 2**level) ** 2, ch[level])] * 3
    return shapes


def token_kv_shapes(cfg: ModelConfig) -> list[tuple[int, int, int, int]]:
    """Shapes ``(1, heads, T, C / heads)`` of the temporal UNet's token keys and values (``TemporalUNet.token_kv``),
    a key and a value per transformer block in module order: the top 3 down levels, mid, up blocks 1..3."""
    u, t = cfg.unet, cfg.clip.num_tokens
    ch, per_level = u.block_out_channels, u.layers_per_block
    widths = ([c for c in ch[:-1] for _ in range(per_level)] + [ch[-1]]
              + [c for c in reversed(ch[:-1]) for _ in range(per_level + 1)])
    return [(1, u.attention_heads, t, c // u.attention_heads) for c in widths for _ in ("k", "v")]


def token_kv_names(blocks: int) -> list[str]:
    """Graph tensor names of :func:`token_kv_shapes`' keys and values, in the same order."""
    return [f"kv_{i:02d}_{kind}" for i in range(blocks) for kind in ("k", "v")]


def export_specs(cfg: ModelConfig, window: int = 16, pose_batch: int = 16, decode_batch: int = 4,
                 window_batch: int = 1) -> list[ExportSpec]:
    """Every graph the runtime needs, with profiles for windows of up to ``window`` frames and UNet calls of up
    to ``window_batch`` windows (the TensorRT profiles' maximum; the graphs themselves take any number)."""
    if window < 1 or window_batch < 1:
        raise InputError(f"window ({window}) and window_batch ({window_batch}) must be >= 1")
    longest = cfg.unet.motion_pe_max_len  # the motion modules' positional encoding: the longest window there is
    if window > longest:
        raise InputError(f"window ({window}) must be <= {longest} (motion-module positional encoding length)")
    s, h = cfg.image_size, cfg.latent_size
    t, d = cfg.clip.num_tokens, cfg.unet.cross_attention_dim
    c = cfg.clip.image_size
    k = window_batch
    # the long-window profile (up to the positional encoding's length) keeps one window per call
    unet_dims = {"frames": {"default": (1, window, window), "long": (1, window, longest)},
                 "windows": {"default": (1, k, k), "long": (1, 1, 1)},
                 "pairs": {"default": (2, 2 * k, 2 * k), "long": (2, 2, 2)}}
    bank = tuple(TensorSpec(n, shp) for n, shp in zip(BANK_NAMES, bank_shapes(cfg)))
    kv_shapes = token_kv_shapes(cfg)
    kv = tuple(TensorSpec(n, shp) for n, shp in zip(token_kv_names(len(kv_shapes) // 2), kv_shapes))
    unet_in = (TensorSpec("latents", ("windows", 9, "frames", h, h)), TensorSpec("timestep", (1,)),
               TensorSpec("pose", ("windows", 4, "frames", h, h)))
    c0 = cfg.unet.block_out_channels[0]

    def eps(b: str) -> TensorSpec:
        return TensorSpec("eps", (b, 4, "frames", h, h))

    def deep(b: str) -> TensorSpec:
        return TensorSpec("deep", (b, "frames", c0, h, h))

    def unet(name: str, pair: bool, reuse: bool) -> ExportSpec:
        b = "pairs" if pair else "windows"  # output samples: [W uncond | W cond], or W cond
        if reuse:
            used = [t for slot in reuse_kv_slots(len(kv) // 2) for t in kv[2 * slot:2 * slot + 2]]
            ins = (*unet_in, *used, deep(b), *bank[-REUSE_BANKS:])
        else:
            ins = (*unet_in, *kv, *bank)
        outs = (eps(b),) if reuse else (eps(b), deep(b))
        return ExportSpec(name, name, ins, outs, lambda m: _UNet(m, cfg_pair=pair, reuse=reuse), unet_dims,
                          keep_fp32=("timestep",), trace_sizes={"windows": 2, "pairs": 4})
    return [
        ExportSpec("clip_image_encoder", "clip_image_encoder", (TensorSpec("pixels", (1, 3, c, c)),),
                   (TensorSpec("tokens", (1, t, d)),), _Clip),
        ExportSpec("vae_encoder", "vae_encoder", (TensorSpec("images", (1, 3, s, s)),),
                   (TensorSpec("mean", (1, 4, h, h)), TensorSpec("logvar", (1, 4, h, h))), _VaeEncoder),
        ExportSpec("vae_decoder", "vae_decoder", (TensorSpec("latents", ("batch", 4, h, h)),),
                   (TensorSpec("images", ("batch", 3, s, s)),), _VaeDecoder,
                   {"batch": {"default": (1, decode_batch, decode_batch)}}),
        ExportSpec("reference_net", "reference_net",
                   (TensorSpec("latent", (1, 4, h, h)), TensorSpec("timestep", (1,)), TensorSpec("tokens", (1, t, d))),
                   bank, _ReferenceNet, keep_fp32=("timestep",)),
        ExportSpec("pose_guider", "pose_guider",
                   (TensorSpec("frames", ("batch", 3, s, s)), TensorSpec("film_scale", (1, 128)),
                    TensorSpec("film_shift", (1, 128))),
                   (TensorSpec("pose", ("batch", 4, h, h)),), _PoseGuider,
                   {"batch": {"default": (1, pose_batch, pose_batch)}}),
        ExportSpec("pose_guider_film", "pose_guider_film", (TensorSpec("reference", (1, 3, 512, 512)),),
                   (TensorSpec("film_scale", (1, 128)), TensorSpec("film_shift", (1, 128))), _Film),
        ExportSpec("token_kv", "token_kv", (TensorSpec("tokens", (1, t, d)),), kv, _TokenKV),
        unet("temporal_unet", True, reuse=False),
        unet("temporal_unet_cond", False, reuse=False),
        unet("temporal_unet_reuse", True, reuse=True),
        unet("temporal_unet_cond_reuse", False, reuse=True),
    ]
