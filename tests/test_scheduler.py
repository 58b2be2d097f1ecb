"""DDIM plan and the fused update's reference against diffusers' DDIMScheduler (upstream's scheduler)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from megactor_rt.config import SchedulerConfig
from megactor_rt.kernels.ops import ddim_cfg_update_ref
from megactor_rt.models.scheduler import DDIM, context_windows


@pytest.mark.parametrize("steps,offset", [(1, 1), (3, 1), (25, 1), (50, 1), (4, 0), (10, 0)])
def test_ddim_matches_diffusers(steps, offset):
    """Upstream's steps_offset 1, and 0 (whose last step's previous timestep is t = 0: alphas_cumprod[0], not
    the final alpha of 1 that only a negative previous timestep takes)."""
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=offset,
                        clip_sample=False)
    ref.set_timesteps(steps)
    ours = DDIM(SchedulerConfig(steps_offset=offset))
    assert ours.timesteps(steps) == ref.timesteps.tolist()
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(1, 4, 5, 8, 8, generator=gen)
    for st in ours.plan(steps):
        eps = torch.randn(2, 4, 5, 8, 8, generator=gen)
        counts = torch.ones(5)
        ours_x = ddim_cfg_update_ref(eps, counts, x, 4.5, st.alpha_t, st.alpha_prev)
        guided = eps[:1] + 4.5 * (eps[1:] - eps[:1])
        ref_x = ref.step(guided, st.timestep, x).prev_sample
        assert torch.allclose(ours_x, ref_x, atol=1e-5, rtol=1e-5)
        x = ref_x


def test_only_the_linear_beta_schedule_is_taken():
    """Upstream's inference uses linear betas; another schedule is refused, not computed as linear betas."""
    for schedule in ("scaled_linear", "squaredcos_cap_v2"):
        with pytest.raises(ValueError, match="only the linear beta schedule"):
            DDIM(SchedulerConfig(beta_schedule=schedule))


def test_upstream_timesteps_25():
    ts = DDIM().timesteps(25)
    assert ts[0] == 961 and ts[-1] == 1 and len(ts) == 25


def test_the_most_steps_have_a_first_timestep_below_1000():
    """Leading spacing with offset 1: 1000 steps would start at t = 1000, past the schedule (was an IndexError
    deep in plan(), as in diffusers); 999 steps start at 999."""
    ddim = DDIM()
    assert ddim.max_steps() == 999
    assert ddim.timesteps(999)[0] == 999 and len(ddim.plan(999)) == 999
    with pytest.raises(ValueError, match=r"steps must be 1\.\.999"):
        ddim.plan(1000)
    with pytest.raises(ValueError, match=r"steps must be 1\.\.999"):
        ddim.timesteps(0)


@pytest.mark.parametrize("n,w,o,expected", [
    (3, 4, 2, [[0, 1, 2]]),
    (4, 4, 2, [[0, 1, 2, 3]]),  # exactly one window's frames: that window alone (upstream: num_frames <= size)
    (10, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9], [8, 9, 0, 1]]),
    (5, 4, 0, [[0, 1, 2, 3], [4, 0, 1, 2]]),
])
def test_context_windows_wrap(n, w, o, expected):
    assert context_windows(n, w, o) == expected


def test_context_windows_coverage_upstream_numbers():
    # spec 2.5: N=50, 8/4 -> 13 windows, 104 slots; 16/8 -> 7 windows, 112 slots
    for w, o, nw, slots in [(8, 4, 13, 104), (16, 8, 7, 112)]:
        wins = context_windows(50, w, o)
        assert len(wins) == nw and sum(map(len, wins)) == slots


@pytest.mark.parametrize("n,w,o,expected", [
    (3, 4, 2, [[0, 1, 2]]),
    (10, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]),
    (11, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9], [7, 8, 9, 10]]),
    (5, 4, 0, [[0, 1, 2, 3], [1, 2, 3, 4]]),
    (8, 4, 0, [[0, 1, 2, 3], [4, 5, 6, 7]]),
])
def test_context_windows_open(n, w, o, expected):
    """closed_loop=False (the fix of upstream's wrap): no window holds the clip's end and its start together."""
    assert context_windows(n, w, o, closed_loop=False) == expected


def test_context_windows_open_cover_every_frame_in_order():
    for n in range(1, 60):
        for w, o in [(16, 8), (8, 4), (5, 1), (4, 0)]:
            wins = context_windows(n, w, o, closed_loop=False)
            assert sorted({f for win in wins for f in win}) == list(range(n))
            assert all(win == list(range(win[0], win[0] + len(win))) for win in wins)
            assert all(len(win) == min(n, w) for win in wins)
            starts = [win[0] for win in wins]
            assert starts == sorted(set(starts))


def test_refusals_of_what_the_networks_cannot_take():
    """Windows longer than the motion modules' positional encoding (32 frames) and a FiLM reference of another
    size than 512x512 (the PoseGuider's flattened 512-feature code) are refused with the reason."""
    from megactor_rt.config import AnimateConfig
    from megactor_rt.models.pose_guider import PoseGuider

    assert AnimateConfig(window=32, overlap=8).window == 32
    with pytest.raises(ValueError, match="window must be <= 32 .motion-module positional encoding length"):
        AnimateConfig(window=33, overlap=8)
    with pytest.raises(ValueError, match=r"needs a 512x512 reference, got \(1, 3, 256, 256\)"):
        PoseGuider().film(torch.zeros(1, 3, 256, 256))
    for shape in ((1, 3, 256, 512), (1, 3, 512, 256)):  # both sides are checked
        with pytest.raises(ValueError, match="needs a 512x512 reference"):
            PoseGuider().film(torch.zeros(shape))
