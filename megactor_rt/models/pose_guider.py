"""PoseGuider (upstream ``ConvInputLayer``, the paper's "DrivenEncoder") with its FiLM ("Ada") branch.

Driving frames ``[0, 1]`` -> per-frame conv stack -> 128-channel 64x64 features -> FiLM modulation by a
global code of the 512x512 reference image -> 1x1 conv to the 4 channels appended before the UNet's conv_in.
The two halves are separate methods so the FiLM code is computed once per portrait and the features once
per driving frame.
"""

from __future__ import annotations

import torch
from torch import nn

from megactor_rt.models.layers import repeat_frames


def _stage(c_in: int, c_mid: int, c_out: int, k2: int, s2: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(c_mid, c_out, k2, stride=s2, padding=1), nn.SiLU())


class PoseGuider(nn.Module):
    """Hard-coded widths as upstream (10.5 M parameters); the FiLM branch needs a 512x512 reference."""

    REFERENCE_SIZE = 512

    def __init__(self) -> None:
        super().__init__()
        self.spatial_conv_layers = nn.ModuleList([
            _stage(3, 3, 16, 4, 2), _stage(16, 16, 32, 4, 2), _stage(32, 32, 64, 4, 2), _stage(64, 64, 128, 3, 1),
        ])
        self.spatial_conv_out = nn.Conv2d(128, 4, 1)
        layers: list[nn.Module] = []
        widths = [4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 512, 512]
        c_in = 3
        for j, c in enumerate(widths):  # alternating 3x3 convs and 4x4 stride-2 convs, each + SiLU
            stride_conv = j % 2 == 1
            layers += [nn.Conv2d(c_in, c, 4 if stride_conv else 3, stride=2 if stride_conv else 1, padding=1),
                       nn.SiLU()]
            c_in = c
        layers += [nn.Conv2d(512, 512, 4), nn.SiLU()]  # 4x4 valid: 4x4 -> 1x1
        self.refer_convs = nn.Sequential(*layers)
        self.refer_linears = nn.Sequential(nn.Linear(512, 256), nn.SiLU())
        self.refer_linears_out = nn.Sequential(nn.Linear(256, 256))

    def film(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM code of the reference image.

        Args:
            reference: ``(B, 3, 512, 512)`` in ``[0, 1]``.

        Returns:
            (scale, shift), each ``(B, 128)``.
        """
        if reference.shape[-2:] != (self.REFERENCE_SIZE, self.REFERENCE_SIZE):
            raise ValueError(f"the PoseGuider FiLM branch needs a 512x512 reference, got {tuple(reference.shape)}")
        feat = self.refer_convs(reference * 2.0 - 1.0).flatten(1)  # (B, 512)
        code = self.refer_linears_out(self.refer_linears(feat))  # (B, 256)
        scale, shift = code.chunk(2, dim=1)
        return scale, shift

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame features before FiLM: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 128, H/8, W/8)``."""
        x = frames * 2.0 - 1.0
        for stage in self.spatial_conv_layers:
            x = stage(x)
        return x

    def modulate(self, features: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """FiLM + 1x1 output conv: ``(N, 128, h, w)``, scale/shift ``(1 or N, 128)`` -> ``(N, 4, h, w)``."""
        x = features * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.spatial_conv_out(x)

    def forward(self, frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Upstream's full call: frames ``(B, 3, F, H, W)``, reference ``(B, 3, 512, 512)`` -> ``(B, 4, F, h, w)``."""
        b, c, f, h, w = frames.shape
        feats = self.features(frames.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        scale, shift = self.film(reference)
        out = self.modulate(feats, repeat_frames(scale, f), repeat_frames(shift, f))
        return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)
