"""Exact-preserving savings: the optimized evaluation equals the upstream-equivalent one (fp32 rounding).

Both predictors run through the same (golden-verified) loop, on the golden pack's weights, for several
frame counts and window/overlap settings, including N <= window, windows that wrap, and no CFG.
"""

from __future__ import annotations

import pytest
import torch
from golden_pack import GoldenPack, pack_dir

from megactor_rt.config import StepKind
from megactor_rt.models.scheduler import DDIM, context_windows
from megactor_rt.runtime.denoise import denoise, denoise_stream
from megactor_rt.runtime.portrait import PortraitInputs, prepare_portrait
from megactor_rt.runtime.predictor import OptimizedPredictor, PoseFeed, ReferencePredictor
from megactor_rt.runtime.submodels import TorchSubmodels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    pack = GoldenPack(pack_dir())
    sub = TorchSubmodels(pack.models())
    v = pack.vectors
    inputs = PortraitInputs(v["in_src_image_u8"][0], v["in_background_mask_u8"][0], v["in_clip_raw_image_u8"][0],
                            v["in_ada_reference_u8"][0])
    state = prepare_portrait(sub, inputs, seed=0)
    frames = v["in_driving_frames_grey"][0] / 255  # (N0, 3, H, W)
    return sub, state, frames


def _run(sub, state, frames, n, window, overlap, guidance, mode, steps=2, ref_t=None, cfg_steps=None, callback=None,
         feature_reuse=None, models=None, offload=False, closed_loop=True, stream=None, window_batch=1):
    idx = [i % frames.shape[0] for i in range(n)]
    fr = frames[idx]
    keep = (feature_reuse or 1) > 1
    if mode == "optimized":
        pose = sub.pose_features(fr, state.film_scale, state.film_shift).permute(1, 0, 2, 3)[None]
        model = OptimizedPredictor(sub, state, pose, guidance, ref_t, keep)
        model.window_batch = window_batch
    else:
        model = ReferencePredictor(sub, state, fr.permute(1, 0, 2, 3)[None], guidance, ref_t, keep)
    model.offload = offload
    if models is not None:
        models.append(model)
    h = state.cond.shape[-1]
    noise = torch.randn(1, 4, n, h, h, generator=torch.Generator().manual_seed(n))
    windows = context_windows(n, window, overlap, closed_loop)
    if stream is not None:  # a list: receives each yielded count of final frames
        out = torch.full_like(noise, float("nan"))
        for final, latents in denoise_stream(noise, model, DDIM().plan(steps), windows, guidance,
                                             cfg_steps=cfg_steps, feature_reuse=feature_reuse):
            before = stream[-1] if stream else 0
            assert (latents is None) == (final == before)  # exactly the frames that became final
            if latents is not None:
                out[:, :, before:final] = latents
            stream.append(final)
        return out
    return denoise(noise, model, DDIM().plan(steps), windows, guidance,
                   callback=callback, cfg_steps=cfg_steps, feature_reuse=feature_reuse)


@pytest.mark.parametrize("n,window,overlap,guidance", [
    (3, 4, 2, 4.5),    # one window holding every frame
    (7, 4, 2, 4.5),    # wrapping windows, uneven coverage
    (10, 5, 1, 4.5),
    (6, 3, 0, 4.5),    # no overlap
    (7, 4, 2, 1.0),    # no CFG: conditional only
])
def test_optimized_equals_reference(setup, n, window, overlap, guidance):
    """Every step's guided eps and latents, not only the final latents: the last DDIM step scales eps by about
    0.03, so a bug in it (a stale ReferenceNet bank) hid within the final latents' tolerance without CFG."""
    sub, state, frames = setup
    steps: dict[str, list] = {"reference": [], "optimized": []}
    for mode, seen in steps.items():
        _run(sub, state, frames, n, window, overlap, guidance, mode,
             callback=lambda i, s, e, x, seen=seen: seen.append((e.clone(), x.clone())))
    assert len(steps["reference"]) == len(steps["optimized"]) == 2
    for i, ((e_ref, x_ref), (e_opt, x_opt)) in enumerate(zip(steps["reference"], steps["optimized"])):
        for what, ref, opt in (("eps", e_ref, e_opt), ("latents", x_ref, x_opt)):
            err = (opt - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), f"step {i} {what}: optimized vs reference {err:.3g}"


def test_savings_are_real(setup):
    """The optimized path really does less: batch-1 ReferenceNet once per timestep, no per-call PoseGuider."""
    sub, state, frames = setup
    state.banks.clear()
    before = dict(sub.calls)
    _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=2)
    opt_calls = {k: v - before.get(k, 0) for k, v in sub.calls.items()}
    before = dict(sub.calls)
    _run(sub, state, frames, 7, 4, 2, 4.5, "reference", steps=2)
    ref_calls = {k: v - before.get(k, 0) for k, v in sub.calls.items()}
    assert opt_calls["reference_bank"] == 2 and opt_calls.get("pose_guider_full", 0) == 0
    assert ref_calls["reference_bank"] == 2 and ref_calls["pose_guider_full"] == ref_calls["unet"] == 8
    # a second optimized run of the same portrait reuses the cached banks
    before = dict(sub.calls)
    _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=2)
    assert sub.calls["reference_bank"] == before["reference_bank"]


def test_fixed_reference_timestep(setup):
    sub, state, frames = setup
    state.banks.clear()
    before = sub.calls["reference_bank"]
    opt = _run(sub, state, frames, 5, 4, 2, 4.5, "optimized", steps=3, ref_t=0)
    assert sub.calls["reference_bank"] - before == 1 and set(state.banks) == {0}
    ref = _run(sub, state, frames, 5, 4, 2, 4.5, "reference", steps=3, ref_t=0)
    assert (opt - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_uncond_half_ignores_bank(setup):
    """Changing the bank changes only the conditional half of a CFG call (upstream's CFG semantics)."""
    sub, state, frames = setup
    h = state.cond.shape[-1]
    lat = torch.randn(1, 9, 4, h, h)
    pose = torch.randn(1, 4, 4, h, h)
    bank = state.bank(501, sub)
    a = sub.unet(lat, 501, state.tokens, pose, bank, n_uncond=1, shared_down=True)
    b = sub.unet(lat, 501, state.tokens, pose, [x * 1.5 for x in bank], n_uncond=1, shared_down=True)
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-3


def _count_token_projections(sub):
    """Forward hooks on every UNet cross-attention's key projection: how many times the tokens were projected."""
    count = [0]
    hooks = [b.attn2.to_k.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for b in sub.models.unet.transformer_blocks()]
    return count, hooks


def test_token_kv_projected_once_per_portrait(setup):
    """CLIP keys/values once per portrait: the portrait state holds the UNet's cross-attention K/V of its tokens
    (one projection per transformer block, made when the portrait is prepared), the optimized path's UNet calls
    project nothing, the reference path still projects in every call (upstream's work), and the frames agree."""
    sub, state, frames = setup
    n_blocks = sub.models.unet.num_transformer_blocks
    t, heads = state.tokens.shape[1], sub.config.unet.attention_heads
    assert state.token_kv is not None and len(state.token_kv) == 2 * n_blocks
    assert all(kv.shape[:3] == (1, heads, t) and kv.is_contiguous() for kv in state.token_kv)  # as stored
    count, hooks = _count_token_projections(sub)
    try:
        before = sub.calls["token_kv"]
        opt = _run(sub, state, frames, 6, 4, 2, 4.5, "optimized", steps=2)
        assert count[0] == 0 and sub.calls["token_kv"] == before  # cached: no per-call or per-run projection
        ref = _run(sub, state, frames, 6, 4, 2, 4.5, "reference", steps=2)
        assert count[0] == 2 * len(context_windows(6, 4, 2)) * n_blocks  # reference: every block of every call
    finally:
        for h in hooks:
            h.remove()
    assert (opt - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [dict(n_uncond=1, shared_down=True), {}], ids=["cfg pair", "conditional"])
def test_unet_with_cached_token_kv_is_the_same_call(setup, kw):
    """Fed the portrait's K/V, a UNet call (one window and two per call) gives the values it projects itself."""
    sub, state, lat, pose, bank = _window_inputs(setup)
    for k in (2, 1):
        lk, pk = lat.repeat(k, 1, 1, 1, 1), pose.repeat(k, 1, 1, 1, 1)
        own = sub.unet(lk, 801, state.tokens, pk, bank, **kw)
        cached = sub.unet(lk, 801, state.tokens, pk, bank, token_kv=state.token_kv, **kw)
        assert torch.equal(own, cached)
    other = sub.unet(lat, 801, state.tokens, pose, bank, token_kv=[x * 1.5 for x in state.token_kv], **kw)
    assert (other - own).abs().max() > 1e-3  # the K/V given are the ones used (own: the one-window call)
    with pytest.raises(ValueError, match="token_kv"):
        sub.unet(lat, 801, state.tokens, pose, bank, token_kv=state.token_kv[:-2], **kw)
    with pytest.raises(ValueError, match="token_kv"):  # too many is refused as well (the slots would shift)
        sub.unet(lat, 801, state.tokens, pose, bank, token_kv=[*state.token_kv, *state.token_kv[:2]], **kw)


def test_token_kv_takes_one_set_of_tokens(setup):
    """``TemporalUNet.token_kv`` projects the one portrait's tokens (batch 1, shared by every call): a batch of
    token sets is refused, not projected into keys/values of batch 2 that every call would broadcast wrongly."""
    sub, state, _ = setup
    with torch.inference_mode():
        kv = sub.models.unet.token_kv(state.tokens)
        assert len(kv) == 2 * sub.models.unet.num_transformer_blocks and all(t.shape[0] == 1 for t in kv)
        for n in (2, 3):
            with pytest.raises(ValueError, match="one set of tokens"):
                sub.models.unet.token_kv(state.tokens.repeat(n, 1, 1))


@pytest.mark.parametrize("kw", [{}, dict(upstream=True), dict(shared_down=True)],
                         ids=["optimized", "upstream", "cfg pairs"])
def test_a_batch_of_samples_is_each_samples_own_call(setup, kw):
    """Folded batches are sample-major: a call on two samples, each with its own latents, timestep, tokens and
    bank, gives what each sample's one-sample call gives (the per-sample values a call repeats over the frames
    of its sample: the time embedding, the tokens' keys/values, the bank). With ``shared_down`` each sample's
    call gives its [uncond, cond] pair, and the two-sample call [both uncond | both cond]."""
    sub, state, lat, pose, bank = _window_inputs(setup)
    g = torch.Generator().manual_seed(7)
    other = lambda t: t + 0.5 * torch.randn(t.shape, generator=g)  # noqa: E731 - a second sample's values
    lat2, pose2, tokens2 = (torch.cat([t, other(t)]) for t in (lat, pose, state.tokens))
    bank2 = [torch.cat([b, other(b)]) for b in bank]
    t2 = torch.tensor([801, 301])
    unet = sub.models.unet
    with torch.inference_mode():
        both = unet(lat2, t2, tokens2, pose2, bank2, **kw)
        own = [unet(lat2[i:i + 1], t2[i:i + 1], tokens2[i:i + 1], pose2[i:i + 1], [b[i:i + 1] for b in bank2], **kw)
               for i in range(2)]
    each = torch.cat([o[:1] for o in own] + [o[1:] for o in own])  # (a pair per sample with shared_down)
    assert (own[0] - own[1]).abs().max() > 1e-2  # the samples differ, so a mix-up would show
    torch.testing.assert_close(both, each, rtol=0, atol=1e-4 * each.abs().max().item())


def test_time_embedding_takes_the_activations_dtype(setup):
    """The sinusoidal timestep features (float32, diffusers') are cast to the activations' dtype before the
    time-embedding MLP, so a half-precision UNet (the GPU's float16/bfloat16 runs) embeds its timesteps in its
    own dtype: the same values as the float32 UNet's, to bfloat16 precision."""
    import copy

    sub, _, _ = setup
    unet = sub.models.unet
    half = copy.deepcopy(unet).to(torch.bfloat16)
    t = torch.tensor([801, 301])
    with torch.inference_mode():
        want = unet.time_embed(t, 2, torch.float32)
        got = half.time_embed(t, 2, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05 * want.abs().max().item())


def test_upstream_pose_guider_keeps_each_samples_film_code(setup):
    """The full PoseGuider call (reference mode) modulates each sample's frames with the FiLM code of that
    sample's reference: a two-sample call gives each sample's own call."""
    sub, _, frames = setup
    pg = sub.models.unet.condition_input_layer
    g = torch.Generator().manual_seed(8)
    fr = frames[:3].permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
    fr2 = torch.cat([fr, fr.flip(2)])
    refs = torch.rand(2, 3, pg.REFERENCE_SIZE, pg.REFERENCE_SIZE, generator=g)
    with torch.inference_mode():
        both = pg(fr2, refs)
        each = torch.cat([pg(fr2[i:i + 1], refs[i:i + 1]) for i in range(2)])
    assert both.shape == (2, 4, 3, fr.shape[-2] // 8, fr.shape[-1] // 8)
    torch.testing.assert_close(both, each, rtol=0, atol=1e-5 * each.abs().max().item())


def test_a_transformer_block_no_unet_numbered_refuses_token_kv(setup):
    from megactor_rt.models.transformer import AttnContext, BasicTransformerBlock

    sub, state, _ = setup
    block = BasicTransformerBlock(32, 8, sub.config.unet.cross_attention_dim)
    x = torch.randn(4, 16, 32)
    with torch.inference_mode():  # (the state's tensors are inference tensors)
        block(x, AttnContext(state.tokens, 4))  # projects the tokens itself
        with pytest.raises(ValueError, match="no UNet numbered"):
            block(x, AttnContext(None, 4, token_kv=state.token_kv))


def test_upstream_calls_refuse_cached_token_kv(setup):
    sub, state, lat, pose, bank = _window_inputs(setup)
    with pytest.raises(ValueError, match="upstream"):
        sub.unet(lat.repeat(2, 1, 1, 1, 1), 801, state.tokens.repeat(2, 1, 1), pose.repeat(2, 1, 1, 1, 1), bank,
                 n_uncond=1, upstream=True, token_kv=state.token_kv)


# ---------------------------------------------------------------------------------------------- CFG truncation
# (a speed knob that changes the math; these tests pin down which math)


@pytest.mark.parametrize("mode", ["optimized", "reference"])
def test_speed_knobs_at_their_neutral_values_are_the_default(setup, mode):
    """CFG in every step (cfg_steps >= steps) and feature reuse every step (1) are upstream, bit for bit."""
    sub, state, frames = setup
    full = _run(sub, state, frames, 7, 4, 2, 4.5, mode)
    for knob in ({"cfg_steps": 2}, {"cfg_steps": 9}, {"feature_reuse": 1}):
        assert torch.equal(_run(sub, state, frames, 7, 4, 2, 4.5, mode, **knob), full), knob


@pytest.mark.parametrize("mode", ["optimized", "reference"])
def test_cfg_steps_zero_is_conditional_only(setup, mode):
    sub, state, frames = setup
    cond_only = _run(sub, state, frames, 7, 4, 2, 1.0, mode)
    assert torch.equal(_run(sub, state, frames, 7, 4, 2, 4.5, mode, cfg_steps=0), cond_only)


def test_truncated_cfg_guides_the_first_steps_only(setup):
    sub, state, frames = setup
    seen = {}

    def keep(tag):
        return lambda i, step, eps, lat: seen.setdefault(tag, []).append(lat.clone())

    calls = []
    unet = sub.unet

    def spy(*args, **kwargs):
        calls.append(kwargs.get("n_uncond", 0))
        return unet(*args, **kwargs)

    _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=3, callback=keep("cfg"))
    _run(sub, state, frames, 7, 4, 2, 1.0, "optimized", steps=3, callback=keep("cond"))
    sub.unet = spy
    try:
        out = _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=3, cfg_steps=1, callback=keep("cut"))
    finally:
        del sub.unet
    assert calls == [1] * 4 + [0] * 8  # 4 windows per step: a CFG pair in step 0, conditional only after
    assert torch.equal(seen["cut"][0], seen["cfg"][0])  # step 0 guided as usual
    assert not torch.equal(seen["cut"][1], seen["cfg"][1])  # step 1 not guided ...
    assert not torch.equal(seen["cut"][1], seen["cond"][1])  # ... but starts from the guided step 0
    assert torch.equal(out, seen["cut"][-1])


def test_truncated_cfg_optimized_equals_reference(setup):
    sub, state, frames = setup
    ref = _run(sub, state, frames, 7, 4, 2, 4.5, "reference", steps=3, cfg_steps=2)
    opt = _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=3, cfg_steps=2)
    err = (opt - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"optimized vs reference: {err:.3g}"


# ----------------------------------------------------------------------------------------------- feature reuse
# (a speed knob that changes the math: DeepCache's idea on the temporal UNet)


def _window_inputs(setup, frames_n=4):
    sub, state, frames = setup
    pose = sub.pose_features(frames[:frames_n], state.film_scale, state.film_shift).permute(1, 0, 2, 3)[None]
    lat = torch.randn(1, 4, frames_n, *state.cond.shape[-2:], generator=torch.Generator().manual_seed(3))
    lat = torch.cat([lat, state.cond[:, :, None].expand(-1, -1, frames_n, -1, -1)], dim=1)
    return sub, state, lat, pose, state.bank(801, sub)


def test_the_motion_modules_use_their_loaded_positional_encodings(setup):
    """The checkpoint's ``pos_encoder.pe`` buffers are what the temporal attention adds (the golden pack's equal
    the sinusoid a module builds, so a forward that rebuilt them would pass every golden test): changing one
    changes the output."""
    sub, state, lat, pose, bank = _window_inputs(setup)
    whole = sub.unet(lat, 801, state.tokens, pose, bank, n_uncond=1, shared_down=True)
    pes = [b for name, b in sub.models.unet.named_buffers() if name.endswith("pos_encoder.pe")]
    assert pes, "the temporal UNet has positional-encoding buffers"
    saved = pes[0].clone()
    try:
        pes[0].add_(0.5)
        moved = sub.unet(lat, 801, state.tokens, pose, bank, n_uncond=1, shared_down=True)
    finally:
        pes[0].copy_(saved)
    assert (moved - whole).abs().max() > 1e-4
    assert torch.equal(sub.unet(lat, 801, state.tokens, pose, bank, n_uncond=1, shared_down=True), whole)


@pytest.mark.parametrize("call", ["cfg pair", "conditional", "upstream batch 2"])
def test_shallow_path_from_its_own_deep_feature_is_the_whole_unet(setup, call):
    """The split is exact: fed the deep feature of the same inputs, the shallow path gives the whole UNet's
    output bit for bit (so reuse changes only which step's deep feature is used)."""
    sub, state, lat, pose, bank = _window_inputs(setup)
    tokens = state.tokens
    kw = {"cfg pair": dict(n_uncond=1, shared_down=True), "conditional": {},
          "upstream batch 2": dict(n_uncond=1, upstream=True)}[call]
    if call == "upstream batch 2":
        lat, pose, tokens = lat.repeat(2, 1, 1, 1, 1), pose.repeat(2, 1, 1, 1, 1), tokens.repeat(2, 1, 1)
    whole = sub.unet(lat, 801, tokens, pose, bank, **kw)
    eps, deep = sub.unet(lat, 801, tokens, pose, bank, keep_deep=True, **kw)
    assert torch.equal(eps, whole)
    c0 = sub.models.unet.config.block_out_channels[0]
    assert deep.shape == (whole.shape[0], lat.shape[2], c0, *lat.shape[-2:])
    assert torch.equal(sub.unet(lat, 801, tokens, pose, bank, deep=deep, **kw), whole)
    other = sub.unet(lat, 801, tokens, pose, bank, deep=deep + 0.1, **kw)  # the deep feature is used
    assert (other - whole).abs().max() > 1e-3


def test_a_call_that_both_reuses_and_keeps_the_deep_feature_is_refused(setup):
    """``keep_deep`` returns the deep feature the whole UNet computes; a feature-reusing call (``deep``) does
    not compute one, so asking for both is refused rather than handing back a feature it never made."""
    sub, state, lat, pose, bank = _window_inputs(setup)
    with torch.inference_mode():
        _, deep = sub.models.unet(lat, torch.tensor(801), state.tokens, pose, bank, keep_deep=True)
        with pytest.raises(ValueError, match="either deep or keep_deep"):
            sub.models.unet(lat, torch.tensor(801), state.tokens, pose, bank, deep=deep, keep_deep=True)


def test_reuse_kv_slots_are_the_blocks_a_reusing_call_runs(setup):
    """``reuse_kv_slots`` (the keys/values an exported feature-reusing graph takes) names exactly the transformer
    blocks whose cross-attention a feature-reusing call runs, in ``kv_slot`` order."""
    from megactor_rt.models.unet import reuse_kv_slots

    sub, state, lat, pose, bank = _window_inputs(setup)
    unet = sub.models.unet
    ran: list[int] = []
    hooks = [b.attn2.to_q.register_forward_hook(lambda m, *_, slot=b.kv_slot: ran.append(slot))
             for b in unet.transformer_blocks()]
    try:
        with torch.inference_mode():
            _, deep = unet(lat, torch.tensor(801), state.tokens, pose, bank, keep_deep=True)
            ran.clear()
            unet(lat, torch.tensor(801), state.tokens, pose, bank, deep=deep)
    finally:
        for h in hooks:
            h.remove()
    assert ran == reuse_kv_slots(unet.num_transformer_blocks)


def test_feature_reuse_runs_the_whole_unet_every_kth_step(setup):
    sub, state, frames = setup
    seen, models = {}, []

    def keep(tag):
        return lambda i, step, eps, lat: seen.setdefault(tag, []).append(lat.clone())

    _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=3, callback=keep("whole"))
    before = dict(sub.calls)
    kept = []

    def reuse(i, step, eps, lat):
        keep("reuse")(i, step, eps, lat)
        kept.append({k: d.shape[0] for k, d in models[0].deep.items()})

    out = _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=3, callback=reuse, feature_reuse=2,
               models=models)
    calls = {k: v - before.get(k, 0) for k, v in sub.calls.items()}
    assert calls["unet"] == 12 and calls["unet_reuse"] == 4  # 4 windows per step; step 1 reuses
    assert kept[0] == {0: 2, 1: 2, 2: 2, 3: 2}  # one kept feature per window, both CFG halves
    assert models[0].deep == {}  # and none once the run is over (before the decode)
    assert torch.equal(seen["reuse"][0], seen["whole"][0])  # step 0: the whole UNet, as usual
    assert not torch.equal(seen["reuse"][1], seen["whole"][1])  # step 1 reuses step 0's deep features
    assert torch.isfinite(out).all() and torch.equal(out, seen["reuse"][-1])


@pytest.mark.parametrize("steps,cfg_steps,reuse", [
    (3, None, 2),
    (4, 2, 2),   # CFG pair whole + reuse, then conditional whole + reuse
    (3, 1, 3),   # conditional-only steps reuse the conditional half kept by a CFG step
    (3, None, 5),  # every step after the first reuses
])
def test_feature_reuse_optimized_equals_reference(setup, steps, cfg_steps, reuse):
    sub, state, frames = setup
    ref = _run(sub, state, frames, 7, 4, 2, 4.5, "reference", steps=steps, cfg_steps=cfg_steps, feature_reuse=reuse)
    opt = _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=steps, cfg_steps=cfg_steps, feature_reuse=reuse)
    err = (opt - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"optimized vs reference: {err:.3g}"
    plain = _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=steps, cfg_steps=cfg_steps)
    assert (opt - plain).abs().max() > 1e-4  # the knob changed the result


@pytest.mark.parametrize("n,window,overlap,guidance,batch,knobs", [
    (7, 4, 2, 4.5, 3, {}),  # 4 wrapping windows: calls of 3 + 1
    (10, 5, 1, 4.5, 2, {}),  # 3 windows: 2 + 1
    (7, 4, 2, 1.0, 4, {}),  # no CFG: conditional only, all 4 windows in one call
    (7, 4, 2, 4.5, 2, {"steps": 4, "cfg_steps": 2, "feature_reuse": 2}),  # both knobs, reuse in batches
    (7, 4, 2, 4.5, 2, {"steps": 3, "cfg_steps": 1, "feature_reuse": 3, "offload": True}),
])
def test_window_batches_are_the_same_math(setup, n, window, overlap, guidance, batch, knobs):
    """Several windows per UNet call (``window_batch``) give the one-window-per-call result (fp32 rounding) in
    fewer calls, with CFG, without, and with the knobs that keep per-window state (feature reuse, offloaded)."""
    sub, state, frames = setup
    calls = []
    for k in (1, batch):
        before = sub.calls["unet"]
        out = _run(sub, state, frames, n, window, overlap, guidance, "optimized", window_batch=k, **knobs)
        calls.append(sub.calls["unet"] - before)
        if k == 1:
            one = out
    err = (out - one).abs().max().item()
    assert err <= 1e-5 * one.abs().max().item(), f"window_batch {batch} vs 1: {err:.3g}"
    windows = len(context_windows(n, window, overlap))
    per_step = windows // batch + windows % batch  # calls of `batch` windows, the rest one by one
    assert calls == [knobs.get("steps", 2) * windows, knobs.get("steps", 2) * per_step]


def test_a_call_of_several_windows_reuses_for_all_or_none(setup):
    sub, state, _ = setup
    model = OptimizedPredictor(sub, state, torch.zeros(1, 4, 8, 1, 1), 4.5, feature_reuse=True)
    model.begin_step(DDIM().plan(2)[1], StepKind(cfg=True, reuse=True))
    model.deep = {0: torch.zeros(2, 4, 8, 1, 1)}  # window 1 kept nothing
    with pytest.raises(ValueError, match=r"windows \[0, 1\] share a UNet call but only some"):
        model.unet([0, 1], torch.zeros(2, 9, 4, 1, 1), 1, state.tokens, torch.zeros(2, 4, 4, 1, 1))


def test_window_batches_group_equal_windows_in_order():
    from megactor_rt.runtime.denoise import window_batches

    assert window_batches(context_windows(48, 16, 8), 2) == [[0, 1], [2, 3], [4, 5]]
    assert window_batches(context_windows(48, 16, 8), 4) == [[0, 1, 2, 3], [4], [5]]  # calls of 4 or of 1
    assert window_batches(context_windows(48, 16, 8), 1) == [[k] for k in range(6)]
    assert window_batches(context_windows(3, 4, 2), 3) == [[0]]
    # only windows of one length share a call
    assert window_batches([[0, 1], [1, 2], [2, 3], [3]], 2) == [[0, 1], [2], [3]]
    assert window_batches([[0], [0, 1], [1, 2]], 2) == [[0], [1, 2]]
    # a run cut short by a window of another length goes one window per call (calls hold 1 or ``batch``)
    assert window_batches([[0, 1], [1, 2], [2], [2, 3], [3, 4], [4, 5]], 3) == [[0], [1], [2], [3, 4, 5]]
    with pytest.raises(ValueError, match="window batch must be >= 1"):
        window_batches([[0]], 0)


def test_step_kinds_and_warmup_steps():
    from megactor_rt.config import AnimateConfig, StepKind

    cfg = AnimateConfig(steps=10, cfg_steps=5, feature_reuse=2)
    assert [cfg.step_kind(i) for i in range(7)] == [StepKind(True, False), StepKind(True, True)] * 2 + [
        StepKind(True, False), StepKind(False, True), StepKind(False, False)]
    assert cfg.step_kinds() == (StepKind(True, False), StepKind(True, True), StepKind(False, True),
                                StepKind(False, False))
    assert cfg.warmup_steps() == 7
    assert AnimateConfig(steps=25).warmup_steps() == 1
    assert AnimateConfig(steps=25, feature_reuse=3).warmup_steps() == 2
    assert AnimateConfig(steps=1, feature_reuse=3).step_kinds() == (StepKind(True, False),)
    with pytest.raises(ValueError, match="feature_reuse must be >= 1"):
        AnimateConfig(feature_reuse=0)


def test_kept_features_in_host_memory_give_the_same_result(setup):
    """Offloaded features (long drivers on CUDA) are copied out and back; the result is bit-identical, also
    when a conditional-only whole step replaces a CFG pair's kept feature with a smaller one."""
    sub, state, frames = setup
    models: list = []
    kept: list[dict] = []  # per run: the kept features after its last step (denoise then ends every window)

    def run(offload: bool) -> torch.Tensor:
        snapshot: dict = {}

        def after_each_step(i, step, eps, lat):
            snapshot.clear()
            snapshot.update({k: v.clone() for k, v in models[-1].deep.items()})

        kept.append(snapshot)
        return _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", steps=5, cfg_steps=3, feature_reuse=2,
                    models=models, offload=offload, callback=after_each_step)

    on_device, in_host_memory = run(False), run(True)
    assert torch.equal(in_host_memory, on_device)
    assert kept[0] and kept[1].keys() == kept[0].keys()  # (was compared after the run: two empty dicts)
    assert all(torch.equal(kept[1][k], kept[0][k]) for k in kept[0])
    assert all(d.shape[0] == 1 for d in kept[1].values())  # the last whole step was conditional only


def test_kept_features_go_to_host_memory_only_when_large(monkeypatch):
    from megactor_rt.runtime.predictor import feature_offload, kept_feature_bytes

    per_run = kept_feature_bytes(6, 16, True, 320, 64, 2)  # 48 frames at 512 px, w16/o8, CFG, fp16
    assert per_run == 6 * 2 * 16 * 320 * 64 * 64 * 2  # 84 MB per window, ~10.5 MB per frame
    assert not feature_offload(torch.device("cpu"), 10**15)  # host memory already
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 10**9, 80 * 10**9))
    assert not feature_offload(torch.device("cuda"), per_run)
    assert feature_offload(torch.device("cuda"), 2 * 10**9 + 1)


# ---------------------------------------------------------------------------------------------- open windows
# closed_loop=False (the fix of upstream's wrap) and the streaming order it allows


@pytest.mark.parametrize("n,window,overlap,guidance,knobs", [
    (11, 4, 2, 4.5, {}),                     # last window moved back: frames covered 3x
    (14, 4, 1, 4.5, {}),
    (9, 3, 0, 4.5, {}),                      # no overlap except the moved-back last window
    (11, 4, 2, 1.0, {}),                     # no CFG
    (12, 4, 2, 4.5, {"cfg_steps": 1}),       # CFG truncation
    (12, 4, 2, 4.5, {"feature_reuse": 2}),   # feature reuse
    (3, 4, 2, 4.5, {}),                      # one window holding every frame
])
def test_stream_order_is_the_same_math(setup, n, window, overlap, guidance, knobs):
    """denoise_stream's wavefront order gives denoise's step-by-step result on open windows, bit for bit, and
    yields frames as they become final, in order, the first ones before the last window call."""
    sub, state, frames = setup
    steps = 3
    whole = _run(sub, state, frames, n, window, overlap, guidance, "optimized", steps=steps, closed_loop=False,
                 **knobs)
    calls = sub.calls["unet"]
    yielded: list[int] = []
    streamed = _run(sub, state, frames, n, window, overlap, guidance, "optimized", steps=steps, closed_loop=False,
                    stream=yielded, **knobs)
    assert torch.equal(streamed, whole)
    windows = len(context_windows(n, window, overlap, closed_loop=False))
    assert sub.calls["unet"] - calls == len(yielded) == steps * windows
    assert yielded == sorted(yielded) and yielded[-1] == n
    if windows > steps:  # a front frame is final once the wavefront has passed it
        assert yielded.index(next(c for c in yielded if c > 0)) < len(yielded) - 1


def test_open_windows_optimized_equals_reference(setup):
    """Open windows: the optimized mode streaming equals the reference mode step by step (fp32 rounding)."""
    sub, state, frames = setup
    ref = _run(sub, state, frames, 11, 4, 2, 4.5, "reference", closed_loop=False)
    opt = _run(sub, state, frames, 11, 4, 2, 4.5, "optimized", closed_loop=False, stream=[])
    assert (opt - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    wrapped = _run(sub, state, frames, 11, 4, 2, 4.5, "optimized")
    assert (wrapped - ref).abs().max().item() > 1e-3  # and the wrap really is different math


def test_stream_first_frames_early_and_features_released(setup):
    """With more windows than steps, frames leave early: the first window's frames are final after
    steps x (steps + 1) / 2 calls; feature reuse holds only the windows in flight."""
    sub, state, frames = setup
    steps, n = 3, 30  # 14 windows of 4 frames, stride 2
    yielded: list[int] = []
    models: list = []
    _run(sub, state, frames, n, 4, 2, 4.5, "optimized", steps=steps, closed_loop=False, stream=yielded,
         feature_reuse=2, models=models)
    first = next(i for i, c in enumerate(yielded) if c > 0) + 1
    assert first == steps * (steps + 1) // 2
    assert models[0].deep == {}


def test_stream_refuses_wrapping_windows(setup):
    sub, state, frames = setup
    with pytest.raises(ValueError, match="open windows"):
        _run(sub, state, frames, 7, 4, 2, 4.5, "optimized", stream=[])


# ---------------------------------------------------------------------------------------------- PoseFeed


def test_a_wrapping_run_keeps_no_window_state_after_its_last_step(setup):
    """``denoise`` ends every window after the last step: the kept deep features and the driver's PoseGuider
    features are gone before the decode (they grow with the driver's length), and the result is unchanged."""
    sub, state, frames = setup
    n, b = 7, 3
    fr = frames[[i % frames.shape[0] for i in range(n)]]
    windows = context_windows(n, 4, 2)
    feed = PoseFeed(sub, iter(fr), n, state.film_scale, state.film_shift, windows, b)
    model = OptimizedPredictor(sub, state, feed, 4.5, feature_reuse=True)
    seen = []

    def held(i, step, eps, lat):
        seen.append((len(model.deep), sum(c.shape[2] for c in feed.batches.values())))

    noise = torch.randn(1, 4, n, *state.cond.shape[-2:], generator=torch.Generator().manual_seed(n))
    out = denoise(noise, model, DDIM().plan(3), windows, 4.5, callback=held, feature_reuse=2)
    assert seen[0] == (len(windows), n)  # during the run: every window's feature, every frame's features
    assert model.deep == {} and feed.batches == {}  # after it: none
    pose = torch.cat([sub.pose_features(fr[i:i + b], state.film_scale, state.film_shift)  # the feed's batches
                      for i in range(0, n, b)]).permute(1, 0, 2, 3)[None]
    upfront = OptimizedPredictor(sub, state, pose, 4.5, feature_reuse=True)
    noise = torch.randn(1, 4, n, *state.cond.shape[-2:], generator=torch.Generator().manual_seed(n))
    assert torch.equal(out, denoise(noise, upfront, DDIM().plan(3), windows, 4.5, feature_reuse=2))


def test_pose_feed_is_the_upfront_pass_computed_as_windows_need_it(setup):
    """The optimized mode's PoseGuider features come from a PoseFeed: the batches of a whole-clip pass (so the
    same values, bit for bit), but each computed only when the first window needing its frames runs."""
    sub, state, frames = setup
    n, b = 7, 3
    fr = frames[[i % frames.shape[0] for i in range(n)]]
    windows = context_windows(n, 4, 2)  # [0-3] [2-5] [4-6,0] [6,0-2]
    upfront = torch.cat([sub.pose_features(fr[i:i + b], state.film_scale, state.film_shift)
                         for i in range(0, n, b)]).permute(1, 0, 2, 3)[None]
    calls = sub.calls["pose_features"]
    feed = PoseFeed(sub, iter(fr), n, state.film_scale, state.film_shift, windows, b)
    assert feed.done == 0  # nothing before the first window asks
    idx = torch.tensor(windows[0])
    assert torch.equal(feed.window(0, idx), upfront.index_select(2, idx))
    assert feed.done == 6 and sub.calls["pose_features"] - calls == 2  # frames 0-5: two batches of 3
    for k, w in enumerate(windows):
        assert torch.equal(feed.window(k, torch.tensor(w)), upfront.index_select(2, torch.tensor(w)))
    assert feed.done == n and sub.calls["pose_features"] - calls == 3
    short = PoseFeed(sub, iter(fr[:3]), n, state.film_scale, state.film_shift, windows, b)
    with pytest.raises(RuntimeError, match="ended after 3 of 7"):
        short.window(0, idx)


# ---------------------------------------------------------------------------------------------- run settings (mutation audit)


@pytest.mark.parametrize("field, value, says", [("max_frames", 0, "max_frames must be >= 1"),
                                                ("guidance", 0.5, "guidance must be a finite number >= 1.0"),
                                                ("reference_timestep", -1, "reference_timestep must be >= 0")])
def test_python_api_settings_out_of_range_are_refused(field: str, value: float, says: str) -> None:
    """The Python API refuses what the CLI's parser refuses for its flags: no frames, guidance below 1
    (inverted CFG, not upstream's), a negative ReferenceNet timestep (sinusoids of a time that does not
    exist), before any model work."""
    from megactor_rt.config import AnimateConfig

    with pytest.raises(ValueError, match=says):
        AnimateConfig(**{field: value})
    AnimateConfig(**{field: {"max_frames": 1, "guidance": 1.0, "reference_timestep": 0}[field]})  # the edge is fine


def test_which_runs_keep_deep_features_stream_or_batch_windows():
    """feature_reuse None or 1 keeps no deep features (each costs about 10 MB per frame at 512 px, for nothing:
    no step reuses them), 2 and more do; window batches apply to the optimized mode's step-by-step loop only
    (the reference mode keeps upstream's one window per call, open windows stream one at a time), and only
    the optimized mode streams. (Mutation audit.)"""
    from megactor_rt.config import AnimateConfig

    assert not AnimateConfig().reuses_features and not AnimateConfig(feature_reuse=1).reuses_features
    assert AnimateConfig(feature_reuse=2).reuses_features
    assert AnimateConfig().batches_windows and not AnimateConfig(mode="reference").batches_windows
    assert not AnimateConfig(closed_loop=False).batches_windows and AnimateConfig(closed_loop=False).streams_frames
    assert not AnimateConfig(mode="reference", closed_loop=False).streams_frames


def test_a_conditional_only_call_reuses_the_conditional_half():
    """A kept deep feature is [uncond of each window | cond of each window]: a conditional-only reusing call
    (CFG truncation with feature reuse) takes the last ``windows`` rows, a CFG call needs both halves and gets
    nothing from a conditional-only feature. The reference and optimized modes share this rule, so their
    equality cannot catch a wrong half. (Mutation audit.)"""
    from megactor_rt.runtime.predictor import reusable

    deep = torch.arange(4.0).view(4, 1, 1, 1, 1)  # 2 windows: [u0, u1 | c0, c1]
    assert reusable(deep, cfg=False, windows=2).flatten().tolist() == [2.0, 3.0]
    assert reusable(deep[:2], cfg=False, windows=1).flatten().tolist() == [1.0]
    assert reusable(deep, cfg=True, windows=2) is deep
    assert reusable(deep[2:], cfg=True, windows=2) is None and reusable(None, cfg=False) is None
