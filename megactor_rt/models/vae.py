"""VAE: diffusers AutoencoderKL (sd-vae-ft-mse config, scaling 0.18215) with the two calls MegActor makes."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL

from megactor_rt.config import VAEConfig


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    vae = AutoencoderKL(**cfg.diffusers_kwargs())
    return vae


def vae_moments(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, H, W)`` in [-1, 1] -> posterior (mean, logvar), each ``(B, 4, H/8, W/8)``, unscaled."""
    h = vae.quant_conv(vae.encoder(images))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """diffusers DiagonalGaussianDistribution.sample with explicit noise: mean + std * eps."""
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * eps


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents ``(B, 4, h, w)`` -> raw decoder output ``(B, 3, 8h, 8w)`` (no clamp)."""
    return vae.decoder(vae.post_quant_conv(latents))
