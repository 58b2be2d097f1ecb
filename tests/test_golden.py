"""Golden parity: the ORIGINAL MegActor v1 code's outputs (../shared/golden, format in its README).

Every value is computed from the pack's inputs alone (never from recorded intermediates) and compared with
the pack's per-tensor tolerance. The pack directory comes from MEGACTOR_GOLDEN_DIR; a missing pack fails.
"""

from __future__ import annotations

import pytest
import torch
from golden_pack import GoldenPack, pack_dir

from megactor_rt.config import step_kind
from megactor_rt.kernels.ops import ddim_cfg_update
from megactor_rt.models.clip import clip_pixels
from megactor_rt.models.scheduler import DDIM, context_windows
from megactor_rt.models.vae import vae_decode, vae_moments
from megactor_rt.runtime.denoise import denoise
from megactor_rt.runtime.portrait import PortraitInputs, prepare_portrait
from megactor_rt.runtime.predictor import OptimizedPredictor, ReferencePredictor
from megactor_rt.runtime.submodels import TorchSubmodels


@pytest.fixture(scope="module")
def pack() -> GoldenPack:
    path = pack_dir()
    assert (path / "config.json").is_file(), f"golden pack missing at {path} (set MEGACTOR_GOLDEN_DIR)"
    return GoldenPack(path)


@pytest.fixture(scope="module")
def models(pack):
    torch.manual_seed(0)
    return pack.models()


@pytest.fixture(scope="module")
def module_outputs(pack, models):
    """Everything module-level, computed from the pack's inputs. The tensors the runtime assembles between the
    networks (the VAE's input, the concat latents, the CFG call's inputs, the guided eps) are taken from the
    runtime's own code (``prepare_portrait``, ``ReferencePredictor``, ``ddim_cfg_update``), not rebuilt here."""
    v, out = pack.vectors, {}
    seen: dict[str, torch.Tensor] = {}
    sub = TorchSubmodels(models)

    def spy_on(name: str) -> None:  # records the first argument of each call of ``sub.<name>``
        call = getattr(sub, name)

        def spy(*args, **kwargs):
            seen[name] = args[0]
            return call(*args, **kwargs)
        setattr(sub, name, spy)

    for name in ("vae_encode", "pose_guider_full", "unet"):
        spy_on(name)
    with torch.no_grad():
        out["clip_pixel_values"] = px = clip_pixels(v["in_clip_raw_image_u8"][0], models.config.clip.image_size)
        out["clip_tokens"], out["clip_last_hidden_state"] = models.clip.tokens_and_hidden(px)
        state = _pack_portrait(pack, sub)
        out["vae_encode_in"] = x = seen["vae_encode"]
        mean, logvar = vae_moments(models.vae, x)
        out["vae_posterior_mean"], out["vae_posterior_logvar"] = mean, logvar
        out["ref_latent"] = mean * models.config.vae.scaling_factor
        out["vae_decode_out"] = vae_decode(models.vae, v["in_vae_decode_latent_in"])
        pg = models.unet.condition_input_layer
        out["film_scale"], out["film_shift"] = pg.film(v["in_ada_reference_u8"].float() / 255)
        frames = v["in_driving_frames_grey"][0] / 255  # (N, 3, H, W)
        feats = pg.features(frames)
        out["driven_features_prefilm"] = feats.permute(1, 0, 2, 3)[None]
        pose = pg.modulate(feats, out["film_scale"], out["film_shift"]).permute(1, 0, 2, 3)[None]
        out["driven_encoder_out"] = pose
        out["concat_latents"] = state.cond[:, :, None].expand(-1, -1, frames.shape[0], -1, -1)
        bank = models.reference_net(out["ref_latent"], v["refnet_timestep"], out["clip_tokens"])
        out.update({f"refnet_bank_{i:02d}": b for i, b in enumerate(bank)})
        w0 = v["e2e_windows"][int(pack.run["cfg_window_index"])].tolist()
        k = int(pack.run["cfg_step_index"])  # the CFG call's step: its latents are the previous step's output
        noisy = v["in_e2e_init_noise"] if k == 0 else v[f"e2e_step{k - 1}_latents"]
        guidance = pack.run["guidance_scale"]
        step = DDIM().plan(pack.run["num_inference_steps"])[k]
        model = ReferencePredictor(sub, state, frames.permute(1, 0, 2, 3)[None], guidance)
        model.begin_step(step, step_kind(k, guidance, None, None))
        pair = model.predict(noisy[:, :, w0], torch.tensor(w0), step, int(pack.run["cfg_window_index"]))
        out["cfg_latent_model_input"] = seen["unet"]
        out["cfg_pose_guide"] = seen["pose_guider_full"][:1]  # the CFG halves' frames are the same
        tok2 = out["clip_tokens"].expand(2, -1, -1)
        eps = models.unet(out["cfg_latent_model_input"], v["cfg_timestep"], tok2,
                          pose[:, :, w0].expand(2, -1, -1, -1, -1), bank, n_uncond=1)
        torch.testing.assert_close(pair, eps)  # the predictor's call is the module's call
        out["cfg_eps_uncond"], out["cfg_eps_cond"] = eps[:1], eps[1:]
        out["cfg_eps_guided"] = torch.empty(eps[:1].shape, dtype=eps.dtype)  # the runtime's guidance (inside its DDIM update)
        ddim_cfg_update(eps, torch.ones(len(w0)), noisy[:, :, w0], guidance, step.alpha_t, step.alpha_prev,
                        eps_out=out["cfg_eps_guided"])
    return out


MODULE_VECTORS = [
    "clip_pixel_values", "clip_last_hidden_state", "clip_tokens", "vae_encode_in", "vae_posterior_mean",
    "vae_posterior_logvar", "ref_latent", "vae_decode_out", "film_scale", "film_shift",
    "driven_features_prefilm", "driven_encoder_out", "concat_latents", "cfg_latent_model_input",
    "cfg_pose_guide", "cfg_eps_uncond", "cfg_eps_cond", "cfg_eps_guided",
] + [f"refnet_bank_{i:02d}" for i in range(10)]


@pytest.mark.parametrize("name", MODULE_VECTORS)
def test_module_vector(pack, module_outputs, name):
    pack.check(name, module_outputs[name])


def test_schedule_and_windows(pack):
    run = pack.run
    assert DDIM().timesteps(run["num_inference_steps"]) == pack.vectors["e2e_timesteps"].tolist()
    wins = context_windows(run["num_frames"], run["context_frames"], run["context_overlap"])
    assert wins == pack.vectors["e2e_windows"].tolist()


def test_posterior_sample_is_diffusers_at_the_clamp_bounds():
    """``posterior_sample`` draws as upstream's diffusers ``DiagonalGaussianDistribution`` does, including its
    clamp of logvar to [-30, 20] (the pack's logvars lie well inside it, so the golden vectors cannot tell)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from megactor_rt.models.vae import posterior_sample

    logvar = torch.tensor([-45.0, -30.0, -25.0, -10.0, 0.0, 10.0, 20.0, 25.0]).view(1, 8, 1, 1)
    mean = torch.zeros_like(logvar)  # the sample is then std * eps: every clamp bound shows in full
    eps = torch.full_like(logvar, 2.0)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    torch.testing.assert_close(posterior_sample(mean, logvar, eps), dist.mean + dist.std * eps, rtol=1e-6, atol=0)


def test_positional_encodings_are_upstreams(pack):
    """A motion module builds the sinusoidal ``pos_encoder.pe`` upstream's checkpoint holds (the pack's, saved
    by the original code): loaded weights overwrite it, so no other golden test sees how it is built, but a
    model built without a checkpoint (``build_models``, the benchmarks) uses it."""
    from megactor_rt.models.layers import PositionalEncoding

    pes = {k: t for k, t in pack.weights.items() if k.endswith("pos_encoder.pe")}
    assert pes, "the pack holds the motion modules' encodings"
    for name, pe in pes.items():
        built = PositionalEncoding(pe.shape[2], pe.shape[1]).pe
        torch.testing.assert_close(built, pe, rtol=0, atol=1e-6, msg=name)


def _pack_portrait(pack, sub):
    v = pack.vectors
    inputs = PortraitInputs(image=v["in_src_image_u8"][0], background_mask=v["in_background_mask_u8"][0],
                            clip_image=v["in_clip_raw_image_u8"][0], ada_reference=v["in_ada_reference_u8"][0])
    return prepare_portrait(sub, inputs, seed=0, vae_eps=v["in_vae_concat_eps"])


@pytest.mark.parametrize("mode", ["optimized", "reference"])
def test_end_to_end(pack, models, mode):
    """The whole denoising run: every step's guided eps and latents, final latents, decoded video."""
    v, run = pack.vectors, pack.run
    assert run["refnet_timestep"] == run["timesteps"][0], "pack runs the ReferenceNet at the current t"
    sub = TorchSubmodels(models)
    state = _pack_portrait(pack, sub)
    frames = v["in_driving_frames_grey"][0] / 255  # (N, 3, H, W)
    if mode == "optimized":
        pose = sub.pose_features(frames, state.film_scale, state.film_shift).permute(1, 0, 2, 3)[None]
        model = OptimizedPredictor(sub, state, pose, run["guidance_scale"])
    else:
        model = ReferencePredictor(sub, state, frames.permute(1, 0, 2, 3)[None], run["guidance_scale"])
    first = {}
    orig_predict = model.predict

    def predict(lat, w, step, window):
        eps = orig_predict(lat, w, step, window)
        first.setdefault("pred", eps)
        return eps

    model.predict = predict
    seen = {}
    plan = DDIM().plan(run["num_inference_steps"])
    wins = context_windows(run["num_frames"], run["context_frames"], run["context_overlap"])
    final = denoise(v["in_e2e_init_noise"].clone(), model, plan, wins, run["guidance_scale"],
                    callback=lambda i, s, e, x: seen.update({f"e2e_step{i}_eps_guided": e, f"e2e_step{i}_latents": x}))
    pack.check("e2e_first_window_pred", first["pred"])
    expected = {f"e2e_step{i}_{what}" for i in range(run["num_inference_steps"]) for what in ("eps_guided", "latents")}
    assert set(seen) == expected, "every step's vectors are computed"  # and the pack holds each one:
    assert expected <= set(v), sorted(expected - set(v))
    for name, value in seen.items():
        pack.check(name, value)
    pack.check("e2e_final_latents", final)
    lat = final[0].permute(1, 0, 2, 3) / models.config.vae.scaling_factor  # (N, 4, h, w)
    video = (sub.vae_decode(lat) / 2 + 0.5).clamp(0, 1)
    pack.check("e2e_video", video.permute(1, 0, 2, 3)[None])


def test_the_animators_decode_gives_upstreams_video(pack):
    """The Animator's decode step (unscale the final latents, VAE decoder, truncation to uint8) turns the pack's
    final latents into upstream's video, within the truncation's one level (was untested end to end: the
    end-to-end test decodes by itself). (Mutation audit.)"""
    from megactor_rt.runtime.animator import Animator

    torch.manual_seed(0)
    anim = Animator(TorchSubmodels(pack.models()))
    final = pack.vectors["e2e_final_latents"]  # (1, 4, N, h, w), scaled as the UNet sees them
    frames = anim._decode_batch(final[0].permute(1, 0, 2, 3), None)  # (N, S, S, 3) uint8
    video = pack.vectors["e2e_video"][0].permute(1, 2, 3, 0) * 255  # (N, S, S, 3) in [0, 255]
    assert frames.dtype == torch.uint8 and frames.shape == video.shape
    assert (frames.float() - video.float()).abs().max() <= 1 + pack.atol("e2e_video") * 255
