"""Window noise predictors (``EpsModel`` implementations) for the two evaluation modes.

``OptimizedPredictor`` applies only exact-preserving savings: the bank is computed at batch 1 once per
timestep per portrait (cached in the PortraitState), PoseGuider features once per frame (an input here),
the down path once for both CFG halves, and reference attention only in the conditional half.
``ReferencePredictor`` evaluates as upstream does (batch-2 ReferenceNet every step, PoseGuider and FiLM
inside every call, batch-2 UNet with the bank attention computed for both halves and the unconditional
half recomputed): same math, used as the baseline in benchmarks and equivalence tests.
"""

from __future__ import annotations

import torch

from megactor_rt.models.scheduler import DDIMStep
from megactor_rt.runtime.portrait import PortraitState
from megactor_rt.runtime.submodels import Submodels


class _Base:
    def __init__(self, sub: Submodels, state: PortraitState, guidance: float, reference_timestep: int | None):
        self.sub, self.state = sub, state
        self.cfg = guidance != 1.0  # this step evaluates both CFG halves (begin_step may turn it off)
        self.reference_timestep = reference_timestep
        self.bank: list[torch.Tensor] | None = None

    def ref_t(self, step: DDIMStep) -> int:
        return step.timestep if self.reference_timestep is None else self.reference_timestep

    def window_latents(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """``(1, 4, F, h, w)`` -> ``(1, 9, F, h, w)``: noisy | reference latent + mask (same for every frame)."""
        cond = self.state.cond[:, :, None].expand(-1, -1, len(frames), -1, -1)
        return torch.cat([latents.to(cond.dtype), cond], dim=1)


class OptimizedPredictor(_Base):
    def __init__(self, sub: Submodels, state: PortraitState, pose_features: torch.Tensor, guidance: float,
                 reference_timestep: int | None = None) -> None:
        """``pose_features``: PoseGuider output of all frames, ``(1, 4, N, h, w)``."""
        super().__init__(sub, state, guidance, reference_timestep)
        self.pose = pose_features

    def begin_step(self, step: DDIMStep, cfg: bool) -> None:
        self.cfg = cfg
        self.bank = self.state.bank(self.ref_t(step), self.sub)

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep) -> torch.Tensor:
        lat = self.window_latents(latents, frames)
        pose = self.pose.index_select(2, frames.to(self.pose.device))
        if self.cfg:  # batch-1 inputs, output [uncond, cond]
            return self.sub.unet(lat, step.timestep, self.state.tokens, pose, self.bank, n_uncond=1,
                                 shared_down=True)
        return self.sub.unet(lat, step.timestep, self.state.tokens, pose, self.bank)


class ReferencePredictor(_Base):
    def __init__(self, sub: Submodels, state: PortraitState, driving: torch.Tensor, guidance: float,
                 reference_timestep: int | None = None) -> None:
        """``driving``: preprocessed driving frames of all N frames, ``(1, 3, N, H, W)`` in [0, 1]; moved to the
        networks' device and dtype once here (upstream keeps them on the GPU too), not per window."""
        super().__init__(sub, state, guidance, reference_timestep)
        self.driving = sub._in(driving)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def _dup(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.batch, *([1] * (x.dim() - 1)))

    def begin_step(self, step: DDIMStep, cfg: bool) -> None:
        self.cfg = cfg
        s = self.state
        self.bank = self.sub.reference_bank(self._dup(s.ref_latent), self.ref_t(step), self._dup(s.tokens))

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep) -> torch.Tensor:
        s = self.state
        frames_in = self.driving.index_select(2, frames.to(self.driving.device))
        pose = self.sub.pose_guider_full(self._dup(frames_in), self._dup(s.ada_reference))
        lat = self._dup(self.window_latents(latents, frames))
        return self.sub.unet(lat, step.timestep, self._dup(s.tokens), pose, self.bank,
                             n_uncond=1 if self.cfg else 0, upstream=True)
