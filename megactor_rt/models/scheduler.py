"""DDIM exactly as upstream's inference runs it, plus the context-window schedule.

diffusers ``DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
clip_sample=False)``, leading timestep spacing, ``set_alpha_to_one=True``, epsilon prediction, eta 0.
Re-implemented (a few lines) so the per-step coefficients are plain floats that the fused update
(``megactor_rt.kernels.ops.ddim_cfg_update``) takes; a test checks both against diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megactor_rt.config import SchedulerConfig


@dataclass(frozen=True)
class DDIMStep:
    """Coefficients of one DDIM step: t, the next t, and their alpha-bar values."""

    timestep: int
    alpha_t: float
    alpha_prev: float


class DDIM:
    def __init__(self, cfg: SchedulerConfig | None = None) -> None:
        self.cfg = cfg or SchedulerConfig()
        if self.cfg.beta_schedule != "linear":
            raise ValueError(f"only the linear beta schedule of upstream inference is supported, got "
                             f"{self.cfg.beta_schedule}")
        n = self.cfg.num_train_timesteps
        betas = torch.linspace(self.cfg.beta_start, self.cfg.beta_end, n, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha = 1.0 if self.cfg.set_alpha_to_one else float(self.alphas_cumprod[0])

    def max_steps(self) -> int:
        """The most steps whose timesteps all exist: the first, ``(steps - 1) * (T // steps) + steps_offset``,
        must be below T (with upstream's offset 1 and T = 1000: 999, as 1000 steps would start at t = 1000)."""
        n = self.cfg.num_train_timesteps
        return max((s for s in range(1, n + 1) if (s - 1) * (n // s) + self.cfg.steps_offset < n), default=0)

    def timesteps(self, steps: int) -> list[int]:
        """Leading spacing + steps_offset: 25 steps -> [961, 921, ..., 1].

        Raises:
            ValueError: ``steps`` is not 1 .. :meth:`max_steps`.
        """
        if not 1 <= steps <= self.max_steps():
            raise ValueError(f"steps must be 1..{self.max_steps()} (the scheduler's {self.cfg.num_train_timesteps} "
                             f"training timesteps, offset {self.cfg.steps_offset}), got {steps}")
        ratio = self.cfg.num_train_timesteps // steps
        return [int(i * ratio + self.cfg.steps_offset) for i in reversed(range(steps))]

    def plan(self, steps: int) -> list[DDIMStep]:
        ratio = self.cfg.num_train_timesteps // steps
        out = []
        for t in self.timesteps(steps):
            prev = t - ratio
            a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha
            out.append(DDIMStep(t, float(self.alphas_cumprod[t]), a_prev))
        return out


def context_windows(num_frames: int, window: int, overlap: int, closed_loop: bool = True) -> list[list[int]]:
    """Upstream's "uniform" context schedule at step 0: windows of ``window`` frames every ``window - overlap``.

    ``closed_loop`` (upstream): the windows wrap modulo N, so the clip's end shares windows with its start
    (spec pitfall 8), e.g. N=10, window 4, overlap 2 -> [[0,1,2,3], [2,3,4,5], [4,5,6,7], [6,7,8,9], [8,9,0,1]].
    Open (``closed_loop=False``, the fix): no wrapping; the last window is moved back to end at the last frame,
    e.g. N=11 -> [[0,1,2,3], [2,3,4,5], [4,5,6,7], [6,7,8,9], [7,8,9,10]]. Open windows are contiguous with
    increasing starts and ends, which is what lets ``denoise_stream`` finish frames in order.
    """
    if num_frames < 1:
        raise ValueError("need at least one frame")
    if num_frames <= window:
        return [list(range(num_frames))]
    stride = window - overlap
    if closed_loop:
        return [[j % num_frames for j in range(s, s + window)] for s in range(0, num_frames, stride)]
    starts = [*range(0, num_frames - window, stride), num_frames - window]
    return [list(range(s, s + window)) for s in starts]
