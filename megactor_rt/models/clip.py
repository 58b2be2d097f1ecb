"""CLIP image encoder: all tokens -> post-layernorm -> projection (upstream animate.py:488-492).

Upstream feeds the person-removed portrait ("background") through the PIL path of transformers' CLIP image
processor and uses ALL 257 tokens of the vision tower, each post-layernormed and projected to 768, as the
cross-attention context of both UNets (instead of text embeddings).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from megactor_rt.config import CLIPConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_vision_config(cfg: CLIPConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, projection_dim=cfg.projection_dim,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads, num_channels=3,
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


class ClipImageEncoder(CLIPVisionModelWithProjection):
    """transformers' CLIPVisionModelWithProjection (same state-dict keys) with upstream's token readout."""

    @classmethod
    def from_config(cls, cfg: CLIPConfig) -> ClipImageEncoder:
        hf = hf_vision_config(cfg)
        hf._attn_implementation = "sdpa"
        return cls(hf)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> ``(B, 1 + (S/patch)^2, projection_dim)`` tokens."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, T, hidden)
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def tokens_and_hidden(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(hidden)), hidden


def clip_pixels(image_u8: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Upstream's CLIP preprocessing via transformers' PIL image processor (bit-exact with the golden pack).

    Args:
        image_u8: ``(3, H, W)`` or ``(H, W, 3)`` uint8 RGB.
        size: CLIP input size (224 for ViT-L/14).

    Returns:
        ``(1, 3, size, size)`` float32: shortest side -> size (bicubic, PIL), centre crop, /255, mean/std.
    """
    from transformers import CLIPImageProcessorPil

    arr = image_u8.numpy() if isinstance(image_u8, torch.Tensor) else np.asarray(image_u8)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    proc = CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    out = proc(images=[np.ascontiguousarray(arr.astype(np.uint8))], return_tensors="pt")
    return out["pixel_values"].float()
