"""ONNX export: onnxruntime parity with PyTorch (fp32 and fp16), golden vectors through onnxruntime,
TensorRT readiness (op support, profiles, checker), idempotent re-export, end-to-end PSNR."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from golden_pack import GoldenPack, pack_dir
from media_fixtures import write_leftovers

from megactor_rt.config import AnimateConfig
from megactor_rt.engine.manifest import check_profiles_cover, load_manifest
from megactor_rt.errors import EngineMismatch, InputError
from megactor_rt.export.onnx_export import export_graph, export_models
from megactor_rt.export.specs import BANK_NAMES, export_specs
from megactor_rt.export.trt_support import check_trt_ready
from megactor_rt.runtime.onnx_backend import GraphSubmodels, OrtRunner
from megactor_rt.runtime.submodels import TorchSubmodels

WINDOW = 4


@pytest.fixture(scope="module")
def pack():
    return GoldenPack(pack_dir())


@pytest.fixture(scope="module")
def models(pack):
    m = pack.models()
    m.weights_id = "golden-" + pack.config["pack"]
    return m


@pytest.fixture(scope="module")
def export_dir(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    rows = export_models(models, out, frames=WINDOW)
    assert {r["status"] for r in rows} == {"exported"}
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return load_manifest(export_dir)


def _specs(models):
    return {s.name: s for s in export_specs(models.config, window=WINDOW)}


def _ort(manifest, name, precision):
    return OrtRunner(manifest.graphs[f"{name}.{precision}"]).activate()


def _torch_outputs(spec, models, inputs, dtype=torch.float32):
    import copy

    module = copy.deepcopy(spec.build(models)).eval().to(dtype)
    cast = [x.to(dtype) if x.is_floating_point() and t.name not in spec.keep_fp32 else x
            for x, t in zip(inputs, spec.inputs)]
    with torch.no_grad():
        out = module(*cast)
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.float() for t, o in zip(spec.outputs, out)}


def _fresh_inputs(spec):
    """Random inputs at a shape other than the export sample's (min of each dynamic dim, seed 7)."""
    return spec.sample_inputs(which=0 if spec.dims else 1, seed=7)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


GRAPHS = ["clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider", "pose_guider_film",
          "token_kv", "temporal_unet", "temporal_unet_cond", "temporal_unet_reuse", "temporal_unet_cond_reuse"]


@pytest.mark.parametrize("name", GRAPHS)
def test_fp32_parity(models, manifest, name):
    """fp32 graph vs PyTorch fp32 on fresh inputs: relative error <= 1e-4 (only fp32 reassociation differs)."""
    spec = _specs(models)[name]
    inputs = _fresh_inputs(spec)
    ref = _torch_outputs(spec, models, inputs)
    got = _ort(manifest, name, "fp32").infer(dict(zip([t.name for t in spec.inputs], inputs)))
    for k in ref:
        assert got[k].shape == ref[k].shape
        assert _rel(got[k], ref[k]) <= 1e-4, f"{name}.{k}: rel err {_rel(got[k], ref[k]):.2e}"


def _assert_fp16_parity_earned(spec, models, runner):
    """An fp16 graph vs PyTorch fp32 on fresh inputs, within 4x what PyTorch fp16 achieves on them (+1e-3)."""
    inputs = _fresh_inputs(spec)
    ref = _torch_outputs(spec, models, inputs)
    t16 = _torch_outputs(spec, models, inputs, torch.float16)
    got = runner.infer(dict(zip([t.name for t in spec.inputs], inputs)))
    for k in ref:
        err, budget = _rel(got[k], ref[k]), _rel(t16[k], ref[k])
        assert err <= 4 * budget + 1e-3, f"{spec.name}.{k}: fp16 graph rel err {err:.2e} vs torch fp16 {budget:.2e}"


@pytest.mark.parametrize("name", GRAPHS)
def test_fp16_parity_earned(models, manifest, name):
    """fp16 graph vs PyTorch fp32, judged against what PyTorch fp16 achieves on the same inputs."""
    _assert_fp16_parity_earned(_specs(models)[name], models, _ort(manifest, name, "fp16"))


UNET_GRAPHS = ["temporal_unet", "temporal_unet_cond", "temporal_unet_reuse", "temporal_unet_cond_reuse"]


@pytest.mark.parametrize("name", UNET_GRAPHS)
def test_dynamic_windows_and_frames_beyond_sample(models, manifest, name):
    """The UNet graphs are traced at 2 windows of 2 frames; they must be right at other counts of both (dynamic
    axes really dynamic): W windows in, [W uncond | W cond] (or W cond) out, as the torch module gives."""
    from dataclasses import replace

    spec = _specs(models)[name]
    assert spec.dims["windows"]["default"] == (1, 1, 1)  # export_models' default: TensorRT plans of one window
    runner = _ort(manifest, name, "fp32")
    for w, f in ((1, 1), (3, 2), (2, 3)):
        at = replace(spec, dims={**spec.dims, "windows": {"default": (w, w, w)}, "pairs": {"default": (2 * w,) * 3},
                                 "frames": {"default": (f, f, f)}})
        inputs = at.sample_inputs(seed=w + f)
        ref = _torch_outputs(spec, models, inputs)
        got = runner.infer(dict(zip([t.name for t in spec.inputs], inputs)))
        halves = 2 if "_cond" not in name else 1
        assert got["eps"].shape == ref["eps"].shape == (halves * w, 4, f, *ref["eps"].shape[-2:])
        for k in ref:
            assert _rel(got[k], ref[k]) <= 1e-4, f"{name} at {w} windows x {f} frames, {k}: {_rel(got[k], ref[k]):.2e}"


def test_window_batch_sets_the_unet_profiles():
    """``window_batch`` K: TensorRT profiles of 1..K windows (opt K) for the UNet graphs' default profile, one
    window in the long-window profile; no other graph changes."""
    from megactor_rt.config import tiny_config

    one = {s.name: s for s in export_specs(tiny_config(), window=4)}
    three = {s.name: s for s in export_specs(tiny_config(), window=4, window_batch=3)}
    for name in UNET_GRAPHS:
        prof = three[name].profiles()
        lo, opt, hi = prof["default"]["latents"]
        assert (lo[0], opt[0], hi[0]) == (1, 3, 3) and opt[2] == hi[2] == 4
        assert [s[0] for s in prof["long"]["pose"]] == [1, 1, 1]
        if name.endswith("_reuse"):  # the kept deep feature: 2 per window with CFG
            assert [s[0] for s in prof["default"]["deep"]] == ([2, 6, 6] if "_cond" not in name else [1, 3, 3])
    assert all(three[n].profiles() == one[n].profiles() for n in one if n not in UNET_GRAPHS)
    with pytest.raises(InputError, match="window_batch"):
        export_specs(tiny_config(), window_batch=0)


def test_long_profile_reaches_the_positional_encoding_length():
    """The long-window profile covers windows up to the motion modules' positional-encoding length (every
    profile stays min <= opt <= max); a longer window is refused before anything is written."""
    from megactor_rt.config import tiny_config

    cfg = tiny_config()
    longest = cfg.unet.motion_pe_max_len
    for window in (4, longest):
        specs = export_specs(cfg, window=window)
        lo, opt, hi = specs_by_name(specs)["temporal_unet"].profiles()["long"]["latents"]
        assert (lo[2], opt[2], hi[2]) == (1, window, longest)
        for spec in specs:
            for profile in spec.profiles().values():
                for name, (a, b, c) in profile.items():
                    assert all(x <= y <= z for x, y, z in zip(a, b, c)), (spec.name, name, a, b, c)
    with pytest.raises(InputError, match=f"must be <= {longest}"):
        export_specs(cfg, window=longest + 1)


def specs_by_name(specs):
    return {s.name: s for s in specs}


def test_golden_vectors_through_onnxruntime(pack, models, manifest):
    """The pack's module vectors, computed by the exported fp32 graphs."""
    v = pack.vectors
    sub = GraphSubmodels("onnxruntime", models.config, models.weights_id,
                         {g.submodel: OrtRunner(g) for g in manifest.graphs.values() if g.precision == "fp32"},
                         torch.device("cpu"), torch.float32)
    from megactor_rt.models.clip import clip_pixels

    tokens = sub.clip_tokens(clip_pixels(v["in_clip_raw_image_u8"][0], models.config.clip.image_size))
    pack.check("clip_tokens", tokens)
    mean, logvar = sub.vae_encode((v["in_src_image_u8"].float() / 255 - 0.5) * 2)
    pack.check("vae_posterior_mean", mean)
    pack.check("vae_posterior_logvar", logvar)
    pack.check("vae_decode_out", sub.vae_decode(v["in_vae_decode_latent_in"]))
    scale, shift = sub.film(v["in_ada_reference_u8"].float() / 255)
    pack.check("film_scale", scale)
    pack.check("film_shift", shift)
    frames = v["in_driving_frames_grey"][0] / 255
    pose = sub.pose_features(frames, scale, shift).permute(1, 0, 2, 3)[None]
    pack.check("driven_encoder_out", pose)
    bank = sub.reference_bank(mean * models.config.vae.scaling_factor, int(v["refnet_timestep"]), tokens)
    for i, b in enumerate(bank):
        pack.check(f"refnet_bank_{i:02d}", b)
    w0 = v["e2e_windows"][int(pack.run["cfg_window_index"])].tolist()  # the pack's CFG window, not always the first
    lat = v["cfg_latent_model_input"][:1]
    eps = sub.unet(lat, int(v["cfg_timestep"]), tokens, pose[:, :, w0], bank, n_uncond=1, shared_down=True)
    pack.check("cfg_eps_uncond", eps[:1])
    pack.check("cfg_eps_cond", eps[1:])


def test_trt_readiness(manifest):
    """onnx checker, TensorRT 11 parser op support at the graph's precision, profiles cover dynamic dims."""
    problems = {}
    for name, graph in manifest.graphs.items():
        found = check_trt_ready(graph.path, graph.precision) + check_profiles_cover(graph)
        if found:
            problems[name] = found
    assert not problems, problems
    assert len(manifest.graphs) == 2 * len(GRAPHS)


def test_a_graph_file_of_another_precision_is_named_when_loaded(manifest):
    """An fp16 file under the fp32 graph's name (files copied by hand): named with the graph when its session
    loads (was a dtype error from onnxruntime at its first call, after the whole denoising for the decoder)."""
    from dataclasses import replace

    from megactor_rt.errors import EngineMismatch

    fp32, fp16 = manifest.graphs["vae_decoder.fp32"], manifest.graphs["vae_decoder.fp16"]
    with pytest.raises(EngineMismatch, match=r"graph 'vae_decoder.fp32': .*vae_decoder\.fp16.* is not the graph "
                                             r"the manifest describes \(inputs \{'latents': 'tensor\(float16\)'\}"):
        OrtRunner(replace(fp32, file=fp16.file)).activate()


def test_a_graph_file_of_another_size_is_named_when_loaded(manifest):
    """A graph of another size's export under this graph's name (files copied by hand): named with the graph when
    its session loads (was onnxruntime's "Got invalid dimensions for input" at its first call, an "unexpected
    error" mid-run)."""
    from dataclasses import replace

    from megactor_rt.engine.manifest import TensorSpec
    from megactor_rt.errors import EngineMismatch

    graph = manifest.graphs["pose_guider.fp32"]
    name, spec = next((n, s) for n, s in graph.inputs.items() if any(isinstance(d, int) for d in s.shape[2:]))
    bigger = tuple(d * 2 if isinstance(d, int) and i >= 2 else d for i, d in enumerate(spec.shape))
    OrtRunner(graph).activate()  # (the graph as exported loads)
    with pytest.raises(EngineMismatch, match=r"graph 'pose_guider.fp32': .* is not the graph the manifest describes "
                                             r"\(input shapes"):
        OrtRunner(replace(graph, inputs={**graph.inputs, name: TensorSpec(name, spec.dtype, bigger)})).activate()


def test_onnxruntimes_own_warnings_are_shown_with_verbose_only(manifest, capfd, caplog):
    """An fp16 ReferenceNet's session on the CPU: onnxruntime printed a warning per node it cannot fold (about 90
    lines on every run with --precision fp16); shown at debug level (-v) only."""
    import logging

    OrtRunner(manifest.graphs["reference_net.fp16"]).activate()
    assert "onnxruntime" not in capfd.readouterr().err
    with caplog.at_level(logging.DEBUG, logger="megactor_rt"):
        OrtRunner(manifest.graphs["reference_net.fp16"]).activate()
    assert "constant_folding" in capfd.readouterr().err


def test_reexport_is_cached(models, export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    spec = _specs(models)["pose_guider"]
    entry, status = export_graph(spec, models, export_dir, 18, "fp32", manifest)
    assert status == "cached" and entry == manifest["graphs"]["pose_guider.fp32"]


def test_other_profiles_reuse_the_graph_file(models, export_dir):
    """The profiles are not the graph's content: an export for 3 windows per call reuses the one-window export's
    file (same key, same sha256) and only its manifest entry's profiles change; another traced shape does not."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    old = manifest["graphs"]["temporal_unet_cond.fp32"]
    spec = {s.name: s for s in export_specs(models.config, window=WINDOW, window_batch=3)}["temporal_unet_cond"]
    entry, status = export_graph(spec, models, export_dir, 18, "fp32", manifest)
    assert status == "cached, profile updated" and (entry["file"], entry["sha256"]) == (old["file"], old["sha256"])
    assert entry["profiles"]["default"]["latents"][2][0] == 3 and old["profiles"]["default"]["latents"][2][0] == 1
    from megactor_rt.export.onnx_export import export_key

    # an export for 1-frame windows is traced at 2 frames too (its long profile takes up to 32: traced at 1 frame,
    # the graph baked in a 1-frame special case and ran 4 frames wrongly), so it is the same graph file
    one_frame = {s.name: s for s in export_specs(models.config, window=1)}["temporal_unet_cond"]
    assert one_frame.concrete(one_frame.inputs[0].shape, "default", -1)[2] == 2
    assert export_key(one_frame, models.weights_id, 18, "fp32") == old["export_key"]


def test_the_export_key_follows_the_network_code_and_the_fp16_converter(models, monkeypatch):
    """A changed network or export module, or another onnxruntime (whose converter makes the fp16 graphs), makes
    a new graph file: a random-weight export has the same weights id in every version of the code (was: only
    a hand-bumped exporter version told them apart, so graphs of older code were reused)."""
    from megactor_rt.export import onnx_export

    spec = {s.name: s for s in export_specs(models.config, window=WINDOW)}["pose_guider"]
    key = lambda precision: onnx_export.export_key(spec, models.weights_id, 18, precision)  # noqa: E731
    assert len(onnx_export.code_digest()) == 16
    before = {p: key(p) for p in ("fp32", "fp16")}
    monkeypatch.setattr(onnx_export, "_ort_version", lambda: "0.0.1")
    assert key("fp32") == before["fp32"] and key("fp16") != before["fp16"]
    assert onnx_export.export_key(spec, models.weights_id, 17, "fp32") != before["fp32"]  # another opset
    monkeypatch.setattr(onnx_export, "code_digest", lambda: "0" * 16)
    assert key("fp32") != before["fp32"]


def test_the_code_digest_covers_the_kernels_pytorch_references(tmp_path, monkeypatch):
    """The graphs trace the kernels' PyTorch reference ops (kernels/*.py): a change there makes new graphs."""
    import shutil

    import megactor_rt.kernels as kernels_pkg
    from megactor_rt.export import onnx_export

    before = onnx_export.code_digest()
    copy = tmp_path / "kernels"
    shutil.copytree(Path(str(kernels_pkg.__file__)).parent, copy, ignore=shutil.ignore_patterns("csrc", "__pycache__"))
    (copy / "ops.py").write_text((copy / "ops.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(kernels_pkg, "__file__", str(copy / "__init__.py"))
    onnx_export.code_digest.cache_clear()
    try:
        assert onnx_export.code_digest() != before
    finally:
        monkeypatch.undo()
        onnx_export.code_digest.cache_clear()
    assert onnx_export.code_digest() == before


def test_a_graph_file_changed_since_its_export_is_exported_again(tmp_path):
    """A damaged or edited graph file is not 'cached' (build-engines would refuse it at every run, asking for
    the export that kept skipping it): its hash is checked, and it is written again."""
    from megactor_rt.config import tiny_config
    from megactor_rt.engine.cache import sha256_graph
    from megactor_rt.weights import build_models

    tiny = build_models(tiny_config(), seed=0)
    tiny.weights_id = "tiny-random-0"
    (row,) = export_models(tiny, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    path = tmp_path / row["file"]
    path.write_bytes(path.read_bytes() + b"\0")
    (again,) = export_models(tiny, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert again["status"] == "exported" and manifest["graphs"]["pose_guider.fp32"]["sha256"] == sha256_graph(path)


def _pose_guider_exported(folder):
    """The tiny model (its temporal UNet's networks) with its PoseGuider exported at fp32 into ``folder``: the
    model, the manifest's path and its content."""
    from megactor_rt.config import tiny_config
    from megactor_rt.weights import build_models

    tiny = build_models(tiny_config(), seed=0, only={"temporal_unet"})
    tiny.weights_id = "tiny-random-0"
    export_models(tiny, folder, graphs=["pose_guider"], precisions=("fp32",))
    path = folder / "manifest.json"
    return tiny, path, json.loads(path.read_text())


def test_a_manifest_entry_edited_since_its_export_is_written_again(tmp_path, caplog):
    """A manifest entry edited by hand (an input's dtype) while its graph file is intact: the runs it breaks say
    "re-run the export", and the export wrote it again (was: 'cached', the edited entry kept, the run refused again)."""
    tiny, path, first = _pose_guider_exported(tmp_path)
    edited = json.loads(path.read_text())
    edited["graphs"]["pose_guider.fp32"]["inputs"]["frames"]["dtype"] = "float16"
    path.write_text(json.dumps(edited))
    with pytest.raises(EngineMismatch, match="is not the graph the manifest describes"):
        OrtRunner(load_manifest(tmp_path).graphs["pose_guider.fp32"]).activate()
    (again,) = export_models(tiny, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert again["status"] == "cached, manifest entry rewritten" and "(edited?)" in caplog.text
    assert json.loads(path.read_text()) == first
    runner = OrtRunner(load_manifest(tmp_path).graphs["pose_guider.fp32"])
    runner.activate()
    runner.deactivate()
    (cached,) = export_models(tiny, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert cached["status"] == "cached"


def test_a_manifest_entry_without_its_sha256_is_exported_again(tmp_path):
    """An entry whose sha256 was deleted by hand: the graph is exported again (was: 'unexpected error: KeyError:
    'sha256'')."""
    tiny, path, first = _pose_guider_exported(tmp_path)
    edited = json.loads(path.read_text())
    del edited["graphs"]["pose_guider.fp32"]["sha256"]
    path.write_text(json.dumps(edited))
    (again,) = export_models(tiny, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert again["status"] == "exported" and json.loads(path.read_text()) == first


def test_fp16_graph_keeps_timestep_and_norms_fp32(manifest):
    import onnx

    graph = manifest.graphs["temporal_unet.fp16"]
    model = onnx.load(str(graph.path), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["timestep"] == onnx.TensorProto.FLOAT and types["latents"] == onnx.TensorProto.FLOAT16
    assert graph.inputs["timestep"].dtype == "float32"
    # the normalisations (and softmax) compute in fp32: each is fed by a Cast to float32 and feeds a Cast back
    # to float16, as the converter's block list makes them (here: no other node produces their inputs)
    from megactor_rt.export.onnx_export import FP32_OPS

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_cast(node, to) -> bool:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    kept = [n for n in model.graph.node if n.op_type in FP32_OPS]
    ops = {n.op_type for n in kept}  # GroupNorm is exported as InstanceNormalization at opsets below 21
    assert {"Softmax", "LayerNormalization"} <= ops and ops & {"InstanceNormalization", "GroupNormalization"}, ops
    for n in kept:
        assert is_cast(producer.get(n.input[0]), onnx.TensorProto.FLOAT) or \
            producer.get(n.input[0]) is not None and producer[n.input[0]].op_type in FP32_OPS, (n.name, n.op_type)
        assert all(is_cast(c, onnx.TensorProto.FLOAT16) or c.op_type in FP32_OPS
                   for c in consumers.get(n.output[0], [])), (n.name, n.op_type)


def test_the_readme_names_the_ops_fp16_graphs_keep_in_fp32():
    """README's "ONNX and TensorRT" says which ops an fp16 graph computes in fp32 (their Casts are the engine's
    precision and memory traffic): every op of ``FP32_OPS`` that is no normalisation (named as such) nor the
    softmax is named (it said "normalisation, softmax and the timestep embedding", and GELU's Erf and the attention
    scale's Sqrt stayed fp32 too)."""
    from megactor_rt.export.onnx_export import FP32_OPS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## ONNX and TensorRT", 1)[1].split("\n## ", 1)[0]
    norms = {"InstanceNormalization", "LayerNormalization", "GroupNormalization", "ReduceMean", "Pow"}
    assert "fp16 graphs keep normalisation, softmax" in section
    unnamed = [op for op in FP32_OPS if op not in norms | {"Softmax"} and f"`{op}`" not in section]
    assert not unnamed, f"README's ONNX section does not say that fp16 graphs keep {unnamed} in fp32"


def test_fp16_softmax_export(models, manifest, tmp_path):
    """``export --fp16-softmax``: the fp16 UNet graph's softmax is fp16 (no Cast between its attention
    matmuls), it is a different file with its own key, TensorRT-ready, and as close to PyTorch as the
    default fp16 graph is allowed to be."""
    import onnx

    name = "temporal_unet"
    export_models(models, tmp_path, precisions=("fp16",), frames=WINDOW, graphs=[name], fp16_softmax=True)
    raw = json.loads((tmp_path / "manifest.json").read_text())["graphs"][f"{name}.fp16"]
    from megactor_rt.export.onnx_export import export_key

    spec = _specs(models)[name]
    assert raw["fp16_softmax"] is True and raw["export_key"] == export_key(spec, models.weights_id, 18, "fp16", True)
    assert raw["export_key"] != export_key(spec, models.weights_id, 18, "fp16")  # the default graph's
    assert raw["file"] != manifest.graphs[f"{name}.fp16"].path.name
    graph = load_manifest(tmp_path).graphs[f"{name}.fp16"]
    model = onnx.load(str(graph.path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes and all(producers[n.input[0]].op_type == "MatMul" for n in softmaxes)
    default = onnx.load(str(manifest.graphs[f"{name}.fp16"].path), load_external_data=False)
    default_producers = {o: n for n in default.graph.node for o in n.output}
    assert all(default_producers[n.input[0]].op_type == "Cast" for n in default.graph.node if n.op_type == "Softmax")
    assert check_trt_ready(graph.path, "fp16") == []
    _assert_fp16_parity_earned(spec, models, OrtRunner(graph).activate())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("knobs,graphs", [
    ({}, {"temporal_unet"}),
    ({"feature_reuse": 2}, {"temporal_unet", "temporal_unet_reuse"}),
    ({"steps": 3, "cfg_steps": 1, "feature_reuse": 2}, {"temporal_unet", "temporal_unet_cond_reuse",
                                                        "temporal_unet_cond"}),
    ({"closed_loop": False, "feature_reuse": 2}, {"temporal_unet", "temporal_unet_reuse"}),
], ids=["upstream", "feature-reuse", "feature-reuse+cfg-steps", "open-windows-streamed+feature-reuse"])
def test_animate_onnxruntime_vs_torch(models, manifest, tmp_path, knobs, graphs):
    """End to end on the tiny model: frames of the onnxruntime backend vs torch, PSNR >= 40 dB (with feature
    reuse too: the whole graphs' deep outputs feed the reuse graphs)."""
    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.runtime.animator import Animator

    cfg = AnimateConfig(window=WINDOW, overlap=2, max_frames=6, **{"steps": 2, **knobs})
    ort_sub = GraphSubmodels("onnxruntime", models.config, models.weights_id,
                             {g.submodel: OrtRunner(g) for g in manifest.graphs.values() if g.precision == "fp32"},
                             torch.device("cpu"), torch.float32)
    frames = {}
    for name, sub in (("torch", TorchSubmodels(models)), ("onnxruntime", ort_sub)):
        anim = Animator(sub, cfg)
        state = anim.prepare(ASSETS_DIR / "portrait.png")
        frames[name] = np.stack(list(anim.animate(state, ASSETS_DIR / "driver.mp4")))
    assert frames["torch"].shape == frames["onnxruntime"].shape == (6, 128, 128, 3)
    assert _psnr(frames["onnxruntime"], frames["torch"]) >= 40.0
    assert {g for g in graphs if ort_sub.calls[g]} == graphs and not any(
        ort_sub.calls[g] for g in {"temporal_unet", "temporal_unet_cond", "temporal_unet_reuse",
                                   "temporal_unet_cond_reuse"} - graphs)


def test_onnxruntime_takes_several_windows_per_call(models, manifest):
    """``window_batch`` on the onnxruntime backend: the graphs take any number of windows, so a run of 3 windows
    makes one UNet call per step and gives the one-window-per-call frames (same math, fp32 rounding); a manifest
    from before the windows dim (batch 1 in the graph) allows one."""
    from dataclasses import replace

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.runtime.animator import Animator

    def sub(entries):
        return GraphSubmodels("onnxruntime", models.config, models.weights_id,
                              {g.submodel: OrtRunner(g) for g in entries if g.precision == "fp32"},
                              torch.device("cpu"), torch.float32)

    cfg = AnimateConfig(window=WINDOW, overlap=2, max_frames=6, steps=2)  # 3 wrapped windows
    frames, calls = {}, {}
    for k in (1, 3):
        ort_sub = sub(manifest.graphs.values())
        assert ort_sub.max_window_batch is None
        anim = Animator(ort_sub, cfg)
        run = replace(cfg, window_batch=k)
        assert anim.window_batch(run) == k
        frames[k] = np.stack(list(anim.animate(anim.prepare(ASSETS_DIR / "portrait.png"), ASSETS_DIR / "driver.mp4",
                                               config=run)))
        calls[k] = ort_sub.calls["temporal_unet"]
    assert calls == {1: 6, 3: 2}
    assert np.abs(frames[3].astype(int) - frames[1].astype(int)).max() <= 1  # uint8 frames: rounding at most

    def one_window(g):
        inputs = {n: replace(t, shape=(1, *t.shape[1:])) if n in ("latents", "pose") else t
                  for n, t in g.inputs.items()}
        return replace(g, inputs=inputs)

    old = sub([one_window(g) if g.submodel.startswith("temporal_unet") else g for g in manifest.graphs.values()])
    assert old.max_window_batch == 1 and Animator(old, cfg).window_batch(replace(cfg, window_batch=3)) == 1


def test_unet_graphs_that_take_the_tokens_are_refused_as_an_older_export(models, manifest):
    """UNet graphs exported before the token_kv graph took the CLIP tokens: a run on them says to export again
    instead of feeding inputs they lack; the portrait's keys/values come from the token_kv graph."""
    from megactor_rt.runtime.portrait import PortraitInputs, prepare_portrait

    runners = {g.submodel: OrtRunner(g) for g in manifest.graphs.values() if g.precision == "fp32"}
    for name, runner in runners.items():
        if name.startswith("temporal_unet"):  # the interface of an older export's UNet graph
            runner.input_names = ("latents", "timestep", "tokens", "pose", *BANK_NAMES)
    sub = GraphSubmodels("onnxruntime", models.config, models.weights_id, runners, torch.device("cpu"),
                         torch.float32)
    s = models.config.image_size
    image = torch.zeros(3, s, s, dtype=torch.uint8)
    state = prepare_portrait(sub, PortraitInputs(image, torch.zeros(s, s, dtype=torch.uint8), image,
                                                 torch.zeros(3, 512, 512)), seed=0)
    assert sub.calls["token_kv"] == 1 and state.token_kv is not None and len(state.token_kv) == len(sub.kv_names)
    h = models.config.latent_size
    lat, pose = torch.zeros(1, 9, WINDOW, h, h), torch.zeros(1, 4, WINDOW, h, h)
    with pytest.raises(InputError, match=r"takes the CLIP tokens.*re-run `megactor-rt export`"):
        sub.unet(lat, 501, state.tokens, pose, state.bank(501, sub), n_uncond=1, shared_down=True,
                 token_kv=state.token_kv)
    with pytest.raises(InputError, match=r"'temporal_unet' takes the CLIP tokens.*re-run"):
        sub.check_run(AnimateConfig())  # before any work
    # and an export without the token_kv graph: named as an older one, by check_run and by a prepare()
    fresh = {g.submodel: OrtRunner(g) for g in manifest.graphs.values()
             if g.precision == "fp32" and g.submodel != "token_kv"}
    old = GraphSubmodels("onnxruntime", models.config, models.weights_id, fresh, torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match=r"no token_kv graph, which this run needs \(exports made before"):
        old.check_run(AnimateConfig())
    with pytest.raises(InputError, match=r"no token_kv graph \(exports made before .*re-run `megactor-rt export`"):
        old.token_kv(state.tokens)


def test_tensorrt_plans_take_the_window_batch_they_were_exported_for(models, export_dir, tmp_path, fake_trt):
    """export --window-batch 2, then build-engines (against tests/fake_tensorrt.py): the UNet plan's profile
    allows 1..2 windows (and the reused graph file), so its runner, and with it the backend, takes 2 per call."""
    import shutil

    from megactor_rt.engine.builder import build_engines
    from megactor_rt.engine.cache import DeviceInfo
    from megactor_rt.engine.runner import TensorRTRunner
    from megactor_rt.export.onnx_export import _export_specs

    gpu = DeviceInfo.current()  # the stand-in's H100
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    entry = json.loads((export_dir / "manifest.json").read_text())["graphs"]["temporal_unet_cond.fp32"]
    shutil.copy(export_dir / entry["file"], onnx_dir / entry["file"])  # an export of one window per call
    manifest = {"format": 1, "graphs": {"temporal_unet_cond.fp32": entry}}
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    spec = {s.name: s for s in export_specs(models.config, window=WINDOW, window_batch=2)}["temporal_unet_cond"]
    rows = _export_specs([spec], models, onnx_dir, 18, ("fp32",))
    assert [r["status"] for r in rows] == ["cached, profile updated"]  # (the same graph: only its profile is new)
    results = build_engines(onnx_dir, tmp_path / "engines", "fp32", "default")
    assert [r.status for r in results] == ["built"]
    runner = TensorRTRunner(results[0].directory, device=gpu)  # reads the plan's sidecar only
    assert runner.max_size("latents", 0) == runner.max_size("pose", 0) == 2 and runner.max_size("latents", 2) == WINDOW
    sub = GraphSubmodels("tensorrt", models.config, models.weights_id, {"temporal_unet_cond": runner},
                         torch.device("cpu"), torch.float32)
    assert sub.max_window_batch == 2


@pytest.mark.parametrize("fallback", ["onnxruntime", "torch"])
def test_tensorrt_backend_falls_back_per_graph(models, manifest, tmp_path, fallback, caplog):
    """Without TensorRT (or without plans) every graph runs on the fallback backend and gives the same result;
    that no graph has a plan is a warning (a run much slower than asked for was said only with -v)."""
    from megactor_rt.runtime.onnx_backend import _tensorrt_submodels
    from megactor_rt.weights import load_converted, write_converted

    weights = write_converted(models.config, {k: m.state_dict() for k, m in models.modules().items()}, tmp_path / "w")
    ort_runners = {g.submodel: OrtRunner(g) for g in manifest.graphs.values() if g.precision == "fp32"}

    def torch_fallback(dtype):
        return TorchSubmodels(load_converted(weights), torch.device("cpu"), dtype)

    args = (ort_runners, torch.device("cpu"), torch.float32, "fp32", "reference_net", fallback)
    with pytest.raises(InputError, match=r"no-engines: no such engine folder \(--engines names the folder"):
        _tensorrt_submodels(models.config, models.weights_id, torch_fallback, tmp_path / "no-engines", manifest, *args)
    (tmp_path / "engines").mkdir()
    with caplog.at_level(logging.WARNING, "megactor_rt.runtime.onnx_backend"):
        sub = _tensorrt_submodels(models.config, models.weights_id, torch_fallback, tmp_path / "engines", manifest,
                                  *args)
    assert f"no usable plan for any graph here: every graph runs on {fallback}" in caplog.text
    if fallback == "onnxruntime":
        assert set(sub.runners) == set(ort_runners) and sub.fallback is None
    else:
        assert sub.runners == {} and isinstance(sub.fallback, TorchSubmodels)
    spec = _specs(models)["pose_guider"]
    frames, scale, shift = _fresh_inputs(spec)
    got = sub.pose_features(frames, scale, shift)
    ref = _torch_outputs(spec, models, (frames, scale, shift))["pose"]
    assert _rel(got, ref) <= 1e-4


def test_graphs_from_other_weights_are_refused(models, manifest, export_dir, tmp_path):
    from megactor_rt.config import Precision
    from megactor_rt.errors import InputError
    from megactor_rt.runtime.onnx_backend import make_graph_submodels
    from megactor_rt.weights import converted_config, write_converted

    assert {g.weights_id for g in manifest.graphs.values()} == {models.weights_id}
    weights = write_converted(models.config, {k: m.state_dict() for k, m in models.modules().items()}, tmp_path / "w")
    assert converted_config(weights)[1] != models.weights_id
    with pytest.raises(InputError, match="exported from other weights"):
        make_graph_submodels("onnxruntime", weights, export_dir, torch.device("cpu"), Precision.FP32)


@pytest.mark.parametrize("status", [
    "Failed to allocate memory for requested buffer of size 2147483648",  # the CPU/CUDA arena
    "CUDA failure 2: out of memory ; GPU=0 ; hostname=x ; file=cuda_allocator.cc",  # the CUDA provider
    "Non-zero status code returned while running Conv node. Name:'/conv_in' Status Message: bad shape",  # not memory
])
def test_onnxruntime_out_of_memory_is_a_resource_error(models, manifest, status):
    """onnxruntime's allocation failures become a ResourceError naming the graph and what lowers the need;
    its other failures pass through unchanged."""
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    from megactor_rt.errors import ResourceError

    runner = _ort(manifest, "pose_guider", "fp32")

    class Session:
        def run(self, names, feed):
            raise RuntimeException(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : {status}")

    runner.session = Session()
    spec = _specs(models)["pose_guider"]
    feed = dict(zip([t.name for t in spec.inputs], _fresh_inputs(spec)))
    if "memory" not in status:
        with pytest.raises(RuntimeException, match="bad shape"):
            runner.infer(feed)
        return
    with pytest.raises(ResourceError) as info:
        runner.infer(feed)
    assert f"out of memory in onnxruntime graph {runner.graph.name} on CPUExecutionProvider" in str(info.value)
    assert status.split(" ;")[0] in str(info.value) and "--window 8 --overlap 4" in str(info.value)


def test_a_tiny_decoder_graph_has_weights_of_its_own(models, export_dir, tmp_path, monkeypatch):
    """The tiny_decoder graph records its TAESD file's id, not the networks' weights id: loading the export
    with the networks' weights does not refuse it as foreign, and the backend knows which file it is from."""
    import shutil

    import diffusers

    from megactor_rt.config import Precision
    from megactor_rt.export.onnx_export import export_tiny_decoder
    from megactor_rt.models.tiny_decoder import tiny_decoder_id
    from megactor_rt.runtime import onnx_backend

    torch.manual_seed(0)
    diffusers.AutoencoderTiny().save_pretrained(tmp_path / "taesd")
    onnx = shutil.copytree(export_dir, tmp_path / "onnx")
    export_tiny_decoder(tmp_path / "taesd", models.config, onnx, precisions=("fp32",))
    monkeypatch.setattr(onnx_backend, "converted_config", lambda w: (models.config, models.weights_id))
    monkeypatch.setattr(onnx_backend, "current_weights_id", lambda w: models.weights_id)
    sub = onnx_backend.make_graph_submodels("onnxruntime", tmp_path / "w", onnx, torch.device("cpu"), Precision.FP32)
    assert "tiny_decoder" in sub.runners and sub.graph_weights["tiny_decoder"] == tiny_decoder_id(tmp_path / "taesd")
    assert sub.tiny_decoder_graph(tiny_decoder_id(tmp_path / "taesd")) is not None
    assert sub.tiny_decoder_graph("taesd-another") is None


@pytest.mark.parametrize("cuda_graphs, device, index", [(False, "cpu", None), (True, "cpu", None),
                                                         (False, "cuda:1", 1)])
def test_tensorrt_runners_get_the_cuda_graph_setting_and_the_gpu(models, manifest, monkeypatch, cuda_graphs,
                                                                 device, index):
    """Graphs with a valid plan run on TensorRT runners built with the animator's cuda_graphs setting, on the
    animator's GPU, against which the plans are also chosen (was: the current GPU, whatever --device said)."""
    from types import SimpleNamespace

    from megactor_rt.engine import runner, select
    from megactor_rt.runtime.onnx_backend import _tensorrt_submodels

    made, chosen_for = [], []

    class Recorder:
        def __init__(self, plan_dir, cuda_graph=False, cuda_device=None):
            made.append((plan_dir, cuda_graph, cuda_device))

    def choose(graphs, *args, **kwargs):
        chosen_for.append(kwargs.get("cuda_device"))
        return {g: SimpleNamespace(backend="tensorrt" if g == "vae_decoder" else "onnxruntime", plan_dir=f"plans/{g}",
                                   plan_dirs=(f"plans/{g}",), reason="a test's choice", submodel=g) for g in graphs}

    monkeypatch.setattr(runner, "TensorRTRunner", Recorder)
    monkeypatch.setattr(select, "select_backends", choose)
    ort_runners = {g.submodel: OrtRunner(g) for g in manifest.graphs.values() if g.precision == "fp32"}
    sub = _tensorrt_submodels(models.config, models.weights_id, lambda dtype: None, None, manifest, ort_runners,
                              torch.device(device), torch.float32, "fp32", None, "onnxruntime", cuda_graphs)
    assert made == [("plans/vae_decoder", cuda_graphs, index)] and isinstance(sub.runners["vae_decoder"], Recorder)
    assert chosen_for == [index]


@pytest.mark.parametrize("cwd_is_out", [False, True])
def test_saving_a_large_graph_again_replaces_its_external_data(tmp_path, monkeypatch, cwd_is_out):
    """A graph written with external data (over 2 GB at full size; here with the threshold lowered) and written
    again under the same name - an export re-run after its manifest was lost - replaces the data file rather
    than appending to it (onnx's default) or failing because it exists (onnx with the folder as cwd); the data
    file gets the graph file's permissions."""
    import stat

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from megactor_rt.engine.cache import external_data_path
    from megactor_rt.export import onnx_export
    from megactor_rt.files import umask_mode

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "out"
    out.mkdir()
    if cwd_is_out:
        monkeypatch.chdir(out)
    path = out / "g.onnx"

    def model(value: float) -> onnx.ModelProto:
        w = numpy_helper.from_array(np.full((64, 64), value, np.float32), "w")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    from media_fixtures import Renames

    renames = Renames().install(monkeypatch)
    sizes = []
    for value in (1.0, 2.0):
        staging = out / f"staging{value}"
        staging.mkdir()
        onnx_export._save(model(value), path, staging)
        sizes.append(external_data_path(path).stat().st_size)
        saved = onnx.load(str(path))
        assert float(numpy_helper.to_array(saved.graph.initializer[0]).max()) == value
        assert not any(staging.iterdir())  # everything moved into place
    assert sizes[0] == sizes[1] >= 64 * 64 * 4
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["g.onnx", external_data_path(path).name]
    assert renames.unsynced() == [] and len([e for e in renames.events if e[0] == "rename"]) == 4  # (on disk first)
    # as readable as the graph (onnx makes the data file 0600: another user or a service account could not load it)
    assert stat.S_IMODE(external_data_path(path).stat().st_mode) == stat.S_IMODE(path.stat().st_mode) == umask_mode()


def test_an_interrupted_reexport_leaves_the_folder_usable(models, tmp_path, monkeypatch):
    """The old graph file goes only once the manifest names the new one: an export interrupted before that (Ctrl-C
    while hashing a multi-GB graph) leaves the manifest and the file it names as they were."""
    from megactor_rt.export import onnx_export
    from megactor_rt.export.trt_support import check_export

    export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
    before = json.loads((tmp_path / "manifest.json").read_text())["graphs"]["vae_encoder.fp32"]["file"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_update_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",), opset=17)
    assert json.loads((tmp_path / "manifest.json").read_text())["graphs"]["vae_encoder.fp32"]["file"] == before
    assert check_export(tmp_path) == {"vae_encoder.fp32": []}


def test_a_killed_exports_staging_folder_is_removed_later(models, tmp_path):
    """An export killed mid-graph (SIGKILL: no cleanup runs) leaves its staging folder with a partial graph,
    GBs at full size. The next export into the folder removes such folders once nothing in them changed for an
    hour (older than any graph takes); a recent one (maybe a running export's) and other folders stay."""
    import os
    import time

    from megactor_rt.export.onnx_export import STAGING_PREFIX

    old, recent, other = (tmp_path / f"{STAGING_PREFIX}old", tmp_path / f"{STAGING_PREFIX}recent", tmp_path / "mine")
    for folder in (old, recent, other):
        folder.mkdir()
        (folder / "fp32.onnx").write_bytes(b"partial")
    stale_tmp = tmp_path / "manifest.json.123.tmp"
    stale_tmp.write_text("{")
    hours_ago = time.time() - 2 * 3600
    for path in (old / "fp32.onnx", old, other / "fp32.onnx", other, stale_tmp):
        os.utime(path, (hours_ago, hours_ago))
    export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
    assert not old.exists() and not stale_tmp.exists()
    assert (recent / "fp32.onnx").is_file() and (other / "fp32.onnx").is_file()
    assert not [p for p in tmp_path.glob(f"{STAGING_PREFIX}*") if p != recent]  # this export's own is gone


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_at_once(models, tmp_path, monkeypatch):
    """An export holds its staging folder while it writes a graph there, so the staging folder of one killed
    (SIGKILL, the OOM killer), GBs at full size, goes with the next export into the folder, not an hour later
    (a re-run after the kill kept it, and a second kill added another); one a live export holds stays."""
    import os
    import time

    from megactor_rt import files
    from megactor_rt.export import onnx_export
    from megactor_rt.export.onnx_export import STAGING_PREFIX

    killed, live = tmp_path / f"{STAGING_PREFIX}killed", tmp_path / f"{STAGING_PREFIX}live"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "inferred.onnx").write_bytes(b"partial")
        for path in (folder / "inferred.onnx", folder):
            os.utime(path, (time.time() - 60,) * 2)  # a minute untouched: a live export tracing a large graph
    holder = files.hold(live)
    held_while_written = []
    real = onnx_export._torch_export

    def export_and_look(spec, models_, path, opset):
        held_while_written.append(files._held(Path(path).parent))
        real(spec, models_, path, opset)

    monkeypatch.setattr(onnx_export, "_torch_export", export_and_look)
    try:
        export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
        assert not killed.exists() and (live / "inferred.onnx").is_file()
    finally:
        files.let_go(holder)
    assert held_while_written == [True]
    assert [p.name for p in tmp_path.glob(f"{STAGING_PREFIX}*")] == [live.name]


@pytest.mark.parametrize("absent,precisions,named", [
    ("onnxruntime", ("fp32", "fp16"), "onnxruntime (its float16 converter"),
    ("onnx", ("fp32",), "onnx (every graph"),
])
def test_an_export_without_its_modules_says_what_to_install_before_any_work(models, tmp_path, monkeypatch, absent,
                                                                            precisions, named):
    """A base install has no onnx/onnxruntime (the ``onnx`` extra): the export wrote its fp32 graph and then
    stopped with "unexpected error: ModuleNotFoundError: No module named 'onnxruntime'". Now the missing module
    is named with what it is for and how to install it, before any folder or graph is made."""
    import sys

    from megactor_rt.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, absent, None)  # (find_spec and import see it absent)
    out = tmp_path / "onnx"
    with pytest.raises(BackendUnavailable, match=re.escape(named)) as info:
        export_models(models, out, graphs=["vae_encoder"], precisions=precisions)
    assert "pip install" in str(info.value) and "'onnx' extra" in str(info.value)
    assert ("--precision fp32" in str(info.value)) == (absent == "onnxruntime")
    assert not out.exists()


def test_exports_into_one_folder_keep_each_others_entries(models, tmp_path):
    """Each graph's entry is merged into the manifest as it is on disk then (another export process may have
    added graphs since this one read it); a malformed manifest is replaced with a warning, not a crash."""
    from megactor_rt.export.onnx_export import _update_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "graphs": []}))  # valid JSON, wrong form
    export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
    _update_manifest(tmp_path, "other.fp32", {"file": "x.onnx"})  # what a concurrent export adds
    export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    graphs = json.loads((tmp_path / "manifest.json").read_text())["graphs"]
    assert set(graphs) == {"vae_encoder.fp32", "other.fp32", "pose_guider.fp32"}
    assert not list(tmp_path.glob("manifest.json.*.tmp"))


def test_check_export_finds_a_graph_file_that_is_not_the_manifests(models, tmp_path):
    from megactor_rt.export.trt_support import check_export

    export_models(models, tmp_path, graphs=["vae_encoder", "vae_decoder"], precisions=("fp32",))
    graphs = json.loads((tmp_path / "manifest.json").read_text())["graphs"]
    enc, dec = (tmp_path / graphs[g]["file"] for g in ("vae_encoder.fp32", "vae_decoder.fp32"))
    dec.write_bytes(enc.read_bytes())  # another graph under the decoder's name
    problems = check_export(tmp_path)
    assert problems["vae_encoder.fp32"] == []
    assert any("does not match the manifest's sha256" in p for p in problems["vae_decoder.fp32"])
    assert any("inputs ['images'] differ from the manifest's ['latents']" in p for p in problems["vae_decoder.fp32"])


def test_check_export_names_the_graphs_an_export_stopped_part_way_lacks(models, export_dir, tmp_path, caplog,
                                                                         capsys):
    """An export stopped part way (Ctrl-C in the UNet graphs) leaves a folder whose graphs are all ready: check-export
    answered "14 of 14 graphs ready" and exit 0 without a word about the UNet graphs every run needs (animate then
    refused the folder). The graphs a whole export holds and this one lacks are named in a warning."""
    from megactor_rt.export.specs import GRAPH_NAMES
    from megactor_rt.export.trt_support import check_export

    assert GRAPH_NAMES == tuple(s.name for s in export_specs(models.config)) == tuple(GRAPHS)
    export_models(models, tmp_path, graphs=["vae_encoder", "vae_decoder"], precisions=("fp32", "fp16"))
    with caplog.at_level(logging.WARNING, logger="megactor_rt.export.trt_support"):
        assert not any(check_export(tmp_path).values())
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "no clip_image_encoder.fp16, clip_image_encoder.fp32, reference_net.fp16" in said
    assert "temporal_unet.fp32" in said and "stopped part way" in said and "vae_encoder" not in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt.export.trt_support"):
        check_export(tmp_path, "fp32")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "temporal_unet_cond.fp32" in said and ".fp16" not in said
    from megactor_rt.cli import main

    capsys.readouterr()
    assert main(["check-export", "--onnx", str(tmp_path), "--precision", "fp32"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # (the summary's line: where the eye lands)
    assert last.startswith("not in this export: clip_image_encoder.fp32, ") and "stopped part way" in last, last
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt.export.trt_support"):
        check_export(export_dir)  # a whole export: no word
    assert not caplog.records


def test_unknown_graphs_and_opsets_are_input_errors(models, tmp_path):
    with pytest.raises(InputError, match="unknown graph.*tiny_decoder graph comes from --tiny-decoder"):
        export_models(models, tmp_path / "onnx", graphs=["tiny_decoder"])
    assert not (tmp_path / "onnx").exists()  # a typo leaves no empty folder
    with pytest.raises(InputError, match="--opset 9: the export supports opsets 17 to 20"):
        export_models(models, tmp_path, graphs=["vae_encoder"], opset=9)


def test_onnxruntime_on_cuda_asks_for_that_gpu_or_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device the sessions get the CUDA provider on that GPU (device_id); an onnxruntime without it (the
    CPU build this project installs) is an InputError naming onnxruntime-gpu (was: onnxruntime warned and ran the
    graphs on the CPU)."""
    import onnxruntime as ort

    from megactor_rt.runtime.onnx_backend import ort_providers

    assert ort_providers(torch.device("cpu")) is None
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers(torch.device("cuda:1")) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                     "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        ort_providers(torch.device("cuda:0"))


def test_an_input_dtype_numpy_cannot_hold_is_an_input_error(tmp_path: Path) -> None:
    from megactor_rt.engine.manifest import GraphEntry, TensorSpec

    graph = GraphEntry("g", "g.onnx", "g", "fp16", "0" * 64, {"x": TensorSpec("x", "bfloat16", (1,))},
                       {"y": TensorSpec("y", "bfloat16", (1,))}, {}, root=tmp_path)
    with pytest.raises(InputError, match="bfloat16"):
        OrtRunner(graph).activate()  # before a session is made (the file does not exist)


def test_graph_backends_refuse_bf16_before_exporting(tmp_path: Path) -> None:
    """Exported graphs are fp16 or fp32: bf16 on a graph backend is refused before any export (was: fp32 graphs
    run silently, the stats saying float32)."""
    from megactor_rt.errors import InputError
    from megactor_rt.runtime.animator import Animator

    with pytest.raises(InputError, match="onnxruntime backend runs fp16 or fp32 graphs; bf16 runs on the torch"):
        Animator.demo(backend="onnxruntime", precision="bf16", device="cpu", work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_or_missing_graph_file_is_a_clear_error(models, manifest, tmp_path, monkeypatch):
    """A truncated ONNX file fails when its session is made with an error naming the graph and the file (was:
    onnxruntime's own exception, exit 1, and for the decoder only after the whole denoising); a missing one is
    named when the onnxruntime submodels are made, before any work."""
    import dataclasses

    from megactor_rt.errors import EngineMismatch
    from megactor_rt.runtime.onnx_backend import graph_submodels

    entry = manifest.graphs["pose_guider.fp32"]
    damaged = dataclasses.replace(entry, root=tmp_path)
    damaged.path.write_bytes(entry.path.read_bytes()[:1000])
    with pytest.raises(EngineMismatch, match=r"graph 'pose_guider.fp32': onnxruntime cannot load .*re-run it"):
        OrtRunner(damaged).activate()
    damaged.path.unlink()
    with pytest.raises(InputError, match="pose_guider.fp32.*is missing"):
        OrtRunner(damaged).activate()
    import onnxruntime

    from megactor_rt.errors import ResourceError

    def no_memory(*args, **kwargs):  # loading a big graph's initializers on a full GPU: not the file's fault
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                           "buffer of size 1073741824")

    with monkeypatch.context() as patched:
        patched.setattr(onnxruntime, "InferenceSession", no_memory)
        with pytest.raises(ResourceError, match="out of memory loading onnxruntime graph pose_guider.fp32"):
            OrtRunner(entry).activate()
    moved = dataclasses.replace(manifest, graphs={**manifest.graphs, "pose_guider.fp32": damaged})
    with pytest.raises(InputError, match=f"ONNX files the manifest names are missing: {damaged.path}"):
        graph_submodels("onnxruntime", models.config, models.weights_id, moved, torch.device("cpu"), "fp32",
                        torch_fallback=lambda dtype: None)
    # a UNet graph (which ones a run calls depends on its settings) is named by the run's check, before any work
    unet = dataclasses.replace(manifest.graphs["temporal_unet.fp32"], root=tmp_path)
    sub = graph_submodels("onnxruntime", models.config, models.weights_id,
                          dataclasses.replace(manifest, graphs={**manifest.graphs, "temporal_unet.fp32": unet}),
                          torch.device("cpu"), "fp32", torch_fallback=lambda dtype: None)
    with pytest.raises(InputError, match=f"ONNX files this run needs are missing: {unet.path}"):
        sub.check_run(AnimateConfig(steps=2))
    sub.check_run(AnimateConfig(steps=2, guidance=1.0))  # a run without CFG calls temporal_unet_cond instead


# ---------------------------------------------------------------------------------------------- graph backend (mutation audit)


class _UNetPlans:
    """A UNet graph's runner that takes at most ``windows`` context windows per call (of any length)."""

    def __init__(self, name: str, windows: int, sha: str = "a") -> None:
        self.name, self.windows, self.sha = name, windows, sha
        self.input_names = ("latents",)

    def max_size(self, name: str, axis: int, where: dict[int, int] | None = None) -> int:
        return self.windows

    def identity(self) -> str:
        return f"tensorrt:{self.sha}"


def test_windows_per_call_are_what_every_unet_graph_takes() -> None:
    """An export whose CFG UNet plans take 3 windows per call but whose conditional-only plans take 1 (built
    from an older export, or another --window-batch) runs 1 window per call: with the most any graph takes,
    a CFG-truncated run sends 3 windows to a plan of 1 and fails at its first conditional-only step."""
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    runners = {"temporal_unet": _UNetPlans("temporal_unet", 3), "temporal_unet_cond": _UNetPlans("temporal_unet_cond", 1)}
    sub = GraphSubmodels("tensorrt", tiny_config(), "w", runners, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    assert sub.max_window_batch == 1 and sub.window_batch_limit(16) == 1


@pytest.mark.parametrize("graph", ["clip_image_encoder", "vae_encoder", "pose_guider_film", "reference_net", "token_kv"])
def test_the_portrait_key_changes_with_each_graph_that_computes_the_state(graph: str) -> None:
    """Every graph whose output a portrait state holds (CLIP tokens, the VAE posterior, the FiLM code, the
    ReferenceNet banks, the token keys/values) is part of the state's cache key: a state computed by another
    plan or session of any of them (another export, --fp16-softmax, a TensorRT plan instead of a fallback) is
    recomputed, not read back from the store. (The list is spelled out here: the test must not take it from
    the code under test.)"""
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    portrait = ("clip_image_encoder", "vae_encoder", "pose_guider_film", "reference_net", "token_kv")

    def state_id(runners: dict) -> str:
        return GraphSubmodels("tensorrt", tiny_config(), "w", runners, torch.device("cpu"), torch.float32,
                              fallback=SimpleNamespace(name="torch")).state_id  # type: ignore[arg-type]

    every = {g: _UNetPlans(g, 1) for g in portrait}
    assert state_id(every) != state_id({**every, graph: _UNetPlans(graph, 1, sha="b")})
    assert state_id(every) != state_id({g: r for g, r in every.items() if g != graph})


# ---------------------------------------------------------------------------------------------- export profiles (mutation audit)


def test_the_profiles_take_the_short_calls_of_a_run() -> None:
    """The TensorRT profiles start at 1: the decoder's last batch of a clip (6 frames at batch 4: a call of 2),
    the PoseGuider's last batch, and windows shorter than --window (a clip shorter than the window) fit a
    plan; a profile starting at the full size makes those runs fail at that call."""
    from megactor_rt.config import tiny_config
    from megactor_rt.export.specs import export_specs

    specs = {s.name: s for s in export_specs(tiny_config(), window=8, pose_batch=16, decode_batch=4)}
    assert specs["vae_decoder"].profiles()["default"]["latents"][0][0] == 1
    assert specs["pose_guider"].profiles()["default"]["frames"][0][0] == 1
    for name in ("temporal_unet", "temporal_unet_cond", "temporal_unet_reuse", "temporal_unet_cond_reuse"):
        lo, opt, hi = specs[name].profiles()["default"]["latents"]
        assert (lo[2], opt[2], hi[2]) == (1, 8, 8), name


def test_a_fixed_size_onnx_graph_takes_only_its_exported_window_length() -> None:
    """An ONNX UNet graph with fixed sizes (exported before the dynamic windows and frames dims) takes windows of
    its exported length only: ``max_size`` answers 0 for calls of another length and ``check_window`` names
    it before denoising; a dynamic axis takes any size, and a window no fixed plan takes still runs one
    window per call. (Mutation audit.)"""
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    def runner(shape: list) -> OrtRunner:
        latents = SimpleNamespace(shape=shape, dtype="float32")
        return OrtRunner(SimpleNamespace(name="temporal_unet", inputs={"latents": latents}, outputs={"eps": None}))

    fixed, dynamic = runner([1, 9, 4, 16, 16]), runner(["windows", 9, "frames", 16, 16])
    assert fixed.max_size("latents", 0) == 1 and fixed.max_size("latents", 0, {2: 4}) == 1
    assert fixed.max_size("latents", 0, {2: 8}) == 0
    assert dynamic.max_size("latents", 0) is None and dynamic.max_size("latents", 0, {2: 8}) is None

    def sub(r: OrtRunner) -> GraphSubmodels:
        return GraphSubmodels("onnxruntime", tiny_config(), "w", {"temporal_unet": r}, torch.device("cpu"),
                              torch.float32)

    sub(dynamic).check_window(8)
    sub(fixed).check_window(4)
    with pytest.raises(InputError, match="no plan of temporal_unet takes windows of 8 frames"):
        sub(fixed).check_window(8)
    assert sub(fixed).window_batch_limit(8) == 1 and sub(dynamic).window_batch_limit(8) is None


# ---------------------------------------------------------------------------------------------- export (mutation audit, second round)


def test_a_window_of_no_frames_is_refused() -> None:
    """``--window 0`` gives profiles whose opt and max (0) are below their min (1): refused before export."""
    from megactor_rt.config import tiny_config

    with pytest.raises(InputError, match=r"window \(0\) and window_batch \(1\) must be >= 1"):
        export_specs(tiny_config(), window=0)


def test_the_supported_opsets_are_17_to_20_inclusive() -> None:
    from megactor_rt.export.onnx_export import check_opset

    for opset in (17, 18, 20):
        check_opset(opset)
    for opset in (16, 21):
        with pytest.raises(InputError, match=f"--opset {opset}: the export supports opsets 17 to 20"):
            check_opset(opset)


def test_a_graph_saved_small_after_large_drops_its_old_external_data(tmp_path, monkeypatch):
    """A graph written with external data and then again without (a re-export of a smaller model under the same
    name) leaves no ``.data`` file: its hash, which covers that file, would otherwise never match a fresh one."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from megactor_rt.engine.cache import external_data_path, sha256_graph
    from megactor_rt.export import onnx_export

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "g.onnx"
    for limit, staging in ((0, tmp_path / "large"), (onnx_export.EXTERNAL_DATA_BYTES, tmp_path / "small")):
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", limit)
        staging.mkdir()
        onnx_export._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path, staging)
        assert external_data_path(path).is_file() == (limit == 0)
    assert sha256_graph(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert float(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).max()) == 1.0


def test_a_manifest_of_an_older_format_is_started_anew(tmp_path, caplog):
    """An export folder's manifest of an older format (an older exporter), or an empty one, is not extended: the
    export starts a new one, with a warning (its graphs are exported again)."""
    import logging

    from megactor_rt.export.onnx_export import _read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"format": 0, "graphs": {"g.fp32": {"file": "g.onnx"}}}))
    with caplog.at_level(logging.WARNING, logger="megactor_rt.export.onnx_export"):
        assert _read_manifest(tmp_path) == {"format": 1, "graphs": {}}
    assert "is an export manifest that this export cannot extend" in caplog.text
    (tmp_path / "manifest.json").write_text("")
    assert _read_manifest(tmp_path) == {"format": 1, "graphs": {}}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"g.fp32": {"file": "g.onnx"}}}))
    assert _read_manifest(tmp_path)["graphs"] == {"g.fp32": {"file": "g.onnx"}}


@pytest.mark.parametrize("content, problem", [
    ('{"name": "my web app", "icons": []}', "is not an export manifest \\(no 'format' and 'graphs'\\)"),
    ('["a", "list"]', "is not an export manifest \\(no 'format' and 'graphs'\\)"),
    (b"\xd8\x00 binary", "is not an export manifest \\(not JSON: "),
    ('{"format": 2, "graphs": {"g.fp32": {"file": "g.onnx"}}}', "is an export manifest of format 2, newer than "
                                                                   "this megactor-rt's \\(1\\)"),
    (None, "is not a file; the export writes its manifest under this name")])
def test_a_manifest_json_the_export_would_lose_is_refused_before_any_work(models, tmp_path, content, problem):
    """A ``manifest.json`` in the export folder that is not an export's (a web app's), or is one of a newer format,
    is refused, naming it, before anything is exported or removed, and left as it was (was: replaced, after a
    warning); so is a folder of that name (was: refused only by the manifest's write, after every graph)."""
    from megactor_rt.export.onnx_export import check_export_size

    path = tmp_path / "manifest.json"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    message = f"{re.escape(str(path))}: {problem}"
    with pytest.raises(InputError, match=message):  # as `export` checks the folder, before loading the model
        check_export_size(tmp_path, models.config.image_size, models.config.image_size, ["pose_guider.fp32"])
    with pytest.raises(InputError, match=message):
        export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    if content is not None:
        assert (path.read_bytes() if isinstance(content, bytes) else path.read_text()) == content


def test_an_unknown_graph_beside_known_ones_is_refused(models, tmp_path):
    """``--graphs pose_guider vae_decodr``: the typo is named before anything is exported (was not: only a list
    of nothing but unknown names)."""
    with pytest.raises(InputError, match="unknown graph\\(s\\) vae_decodr; known: "):
        export_models(models, tmp_path / "onnx", graphs=["pose_guider", "vae_decodr"])
    assert not (tmp_path / "onnx").exists()


def test_every_graph_has_a_default_profile_and_the_decoders_start_at_one():
    """Graphs of fixed sizes get a 'default' profile too (their sizes thrice), so ``build-engines --profile
    default`` builds every graph; the tiny decoder's batch, like the VAE decoder's, runs from 1 (a clip's last
    batch) to the decode batch."""
    from megactor_rt.config import tiny_config
    from megactor_rt.export.specs import tiny_decoder_spec

    cfg = tiny_config()
    clip = specs_by_name(export_specs(cfg, window=4))["clip_image_encoder"]
    c = cfg.clip.image_size
    assert clip.profiles() == {"default": {"pixels": [[1, 3, c, c]] * 3}}
    h = cfg.latent_size
    assert tiny_decoder_spec(cfg, decode_batch=4).profiles() == {
        "default": {"latents": [[1, 4, h, h], [4, 4, h, h], [4, 4, h, h]]}}


def test_fp16_softmax_leaves_the_fp32_graphs_as_they_are(models, tmp_path):
    """``--fp16-softmax`` changes the fp16 graphs only: the fp32 graph is the default one (same key, so the same
    file) and its manifest entry does not claim an fp16 softmax."""
    from megactor_rt.export.onnx_export import export_key

    export_models(models, tmp_path, precisions=("fp32",), frames=WINDOW, graphs=["pose_guider"], fp16_softmax=True)
    entry = json.loads((tmp_path / "manifest.json").read_text())["graphs"]["pose_guider.fp32"]
    assert "fp16_softmax" not in entry
    assert entry["export_key"] == export_key(_specs(models)["pose_guider"], models.weights_id, 18, "fp32")


def test_the_manifest_gives_each_tensor_the_element_type_of_the_graph_file(models, tmp_path):
    """The manifest describes its files: an fp16 graph's inputs and outputs are float16 there as in the file
    (the fp32 graph's float32)."""
    import onnx

    export_models(models, tmp_path, frames=WINDOW, graphs=["pose_guider"])
    for name, entry in json.loads((tmp_path / "manifest.json").read_text())["graphs"].items():
        graph = onnx.load(str(tmp_path / entry["file"]), load_external_data=False).graph
        in_file = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                   for v in (*graph.input, *graph.output)}
        float_type = "float16" if entry["precision"] == "fp16" else "float32"
        for kind in ("inputs", "outputs"):
            assert {n: t["dtype"] for n, t in entry[kind].items()} == {n: in_file[n] for n in entry[kind]}, name
            assert {t["dtype"] for t in entry[kind].values()} == {float_type}, name


def test_a_reexport_removes_the_graph_file_it_replaces(models, tmp_path):
    """A graph exported again under another key (here another opset) leaves one file of it, the one the
    manifest names: the replaced file (GBs at full size) goes once the manifest names the new one."""
    export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",), opset=17)
    entry = json.loads((tmp_path / "manifest.json").read_text())["graphs"]["pose_guider.fp32"]
    assert entry["opset"] == 17 and [p.name for p in tmp_path.glob("pose_guider.fp32.*.onnx")] == [entry["file"]]


def _full_disk(path: str) -> None:
    """What a write on a full disk does: part of the file, then ENOSPC."""
    import errno
    import os

    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_a_resource_error_naming_the_graph_file(models, tmp_path, monkeypatch):
    """A disk that fills while a graph is written (GBs at full size) ends in a ResourceError (exit code 2) naming
    the graph file, not an unexpected OSError; no part of the graph is left under its name, in a staging folder
    or in the manifest."""
    import onnx

    from megactor_rt.errors import ResourceError

    monkeypatch.setattr(onnx, "save_model", lambda model, path, *args, **kwargs: _full_disk(path))
    with pytest.raises(ResourceError, match=r"pose_guider\.fp32\.[0-9a-f]{12}\.onnx: cannot write the graph "
                                            r"\(\[Errno 28\] No space left on device\); nothing was written"):
        export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_manifest_is_a_resource_error_naming_it(models, tmp_path, monkeypatch):
    """The manifest's write on a full disk: a ResourceError naming it; the manifest is left as it was, with no
    temporary file beside it."""
    from megactor_rt.errors import ResourceError

    export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
    before = (tmp_path / "manifest.json").read_text()
    write_text = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _full_disk(str(self)) if self.suffix == ".tmp"
                        else write_text(self, *a, **k))
    manifest = re.escape(str(tmp_path / "manifest.json"))
    with pytest.raises(ResourceError, match=f"{manifest}: cannot write the export manifest "
                                            r"\(\[Errno 28\] No space left on device\); it was left as it was"):
        export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
    assert (tmp_path / "manifest.json").read_text() == before
    assert not list(tmp_path.glob("manifest.json.*")) and not list(tmp_path.glob(".export-*"))


def test_a_reexport_leaves_the_users_own_graph_files(models, tmp_path):
    """Files of the user's named like a graph's (a simplified copy, ``pose_guider.fp32.simplified.onnx``, and its
    external data) stay through an export and a cached re-run (were deleted as stale); an earlier export's file
    of the graph under another key goes."""
    own = [tmp_path / "pose_guider.fp32.simplified.onnx", tmp_path / "pose_guider.fp32.simplified.onnx.data",
           tmp_path / "pose_guider.fp32.v2.onnx"]
    earlier = [tmp_path / "pose_guider.fp32.0123456789ab.onnx", tmp_path / "pose_guider.fp32.0123456789ab.onnx.data"]
    for path in own + earlier:
        path.write_bytes(b"graph")
    for _ in range(2):
        export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp32",))
        assert all(p.read_bytes() == b"graph" for p in own) and not any(p.exists() for p in earlier)


def test_an_export_stopped_in_fp16_shape_inference_leaves_no_copy_of_the_graph(models, tmp_path, monkeypatch):
    """The fp16 conversion's shape-inferred copy of the fp32 graph (GBs at full size) is written in the staging
    folder, so that Ctrl-C or SIGTERM while it is written leaves nothing (was: beside the fp32 graph in the export
    folder, forever); the fp16 graph still finds the fp32 graph's external data."""
    import onnx

    from megactor_rt.export import onnx_export
    from megactor_rt.export.trt_support import check_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 10_000)  # as the full-size UNet's: weights beside
    export_models(models, tmp_path, graphs=["pose_guider"])
    assert check_export(tmp_path) == {"pose_guider.fp16": [], "pose_guider.fp32": []}
    assert len(list(tmp_path.glob("*.onnx.data"))) == 2
    infer_shapes_path = onnx.shape_inference.infer_shapes_path

    def interrupted(src: str, dst: str) -> None:
        infer_shapes_path(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        export_models(models, tmp_path, graphs=["pose_guider"], opset=17)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in before)
    assert [n for n in left if not n.startswith("pose_guider.fp32.")] == []  # the new fp32 graph alone


def test_a_killed_exports_shape_inferred_copy_is_removed_later(models, tmp_path):
    """Shape-inferred copies that earlier versions left in the export folder when killed (``.export-*.inferred.onnx``,
    plain files) go with the next export once an hour old, as the staging folders do; a recent one stays."""

    from megactor_rt.export.onnx_export import STAGING_PREFIX

    old, recent = tmp_path / f"{STAGING_PREFIX}old.inferred.onnx", tmp_path / f"{STAGING_PREFIX}new.inferred.onnx"
    write_leftovers(b"graph", [old], [recent])
    export_models(models, tmp_path, graphs=["vae_encoder"], precisions=("fp32",))
    assert not old.exists() and recent.is_file()


def test_graphs_may_name_the_tiny_decoder_given_its_weights(tmp_path, capsys):
    """``export --graphs ... tiny_decoder --tiny-decoder PATH`` exports the graphs named, the tiny decoder among
    them, and ``--graphs tiny_decoder`` it alone (was: "unknown graph(s) tiny_decoder (the tiny_decoder graph
    comes from --tiny-decoder PATH)" with that very flag given); without --tiny-decoder the error names it."""
    import diffusers

    from megactor_rt.cli import main

    torch.manual_seed(0)
    diffusers.AutoencoderTiny().save_pretrained(tmp_path / "taesd")
    base = ["-q", "export", "--weights", "tiny", "--precision", "fp32", "--tiny-decoder", str(tmp_path / "taesd")]
    for graphs, out in ((["tiny_decoder"], "only"), (["pose_guider", "tiny_decoder"], "both")):
        assert main([*base, "--out", str(tmp_path / out), "--graphs", *graphs]) == 0
        assert sorted(json.loads((tmp_path / out / "manifest.json").read_text())["graphs"]) == \
            [f"{g}.fp32" for g in graphs]
    capsys.readouterr()
    assert main(["-q", "export", "--weights", "tiny", "--out", str(tmp_path / "none"), "--graphs", "pose_guider",
                 "tiny_decoder"]) == 2
    assert "--graphs tiny_decoder: that graph is TAESD's decoder, exported from its own weights: give them with " \
        "--tiny-decoder PATH" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_an_export_whose_graphs_are_all_there_runs_in_a_folder_this_user_may_not_write(tmp_path, capsys,
                                                                                      monkeypatch):
    """``export --out`` a folder of up-to-date graphs this user may only read (a shared, read-only export): every
    graph is cached, nothing is written, exit 0 (was refused before any work: "--out cannot be written", though
    nothing was to be written); a graph not exported there yet, or a manifest entry to change (another
    --window-batch), is refused before its work, naming the folder, exit 2, with nothing written."""
    import os

    from megactor_rt.cli import main

    out = tmp_path / "onnx"
    base = ["-q", "export", "--weights", "tiny", "--precision", "fp32", "--out", str(out)]
    assert main([*base, "--graphs", "pose_guider"]) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    real_access = os.access  # chmod cannot be used: tests may run as root, which ignores it
    monkeypatch.setattr("megactor_rt.files.os.access", lambda p, mode: False if Path(p).is_relative_to(out)
                        else real_access(p, mode))
    assert main([*base, "--graphs", "pose_guider"]) == 0, capsys.readouterr().err
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 and rows[0].split()[:2] == ["pose_guider", "fp32"] and " cached " in rows[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main([*base, "--graphs", "pose_guider", "vae_encoder"]) == 2
    assert f"{out}: the export folder (--out) cannot be written ({out} is not a writable folder), and " \
        "vae_encoder.fp32 is not exported there yet; nothing was written" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    monkeypatch.undo()
    assert main([*base, "--graphs", "temporal_unet"]) == 0
    monkeypatch.setattr("megactor_rt.files.os.access", lambda p, mode: False if Path(p).is_relative_to(out)
                        else real_access(p, mode))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*base, "--graphs", "temporal_unet", "--window-batch", "2"]) == 2  # (its profiles change)
    assert "and its manifest's entry of temporal_unet.fp32 is to change (cached, profile updated); nothing was " \
        "written" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_window_batch_past_the_bound_is_refused_before_any_work(tmp_path, capsys):
    """``export --window-batch 100000`` (TensorRT profiles of up to 100000 windows, no GPU's memory) is refused
    naming the bound, before any work or folder (was: exported, and check-export said "ready")."""
    from megactor_rt.cli import main
    from megactor_rt.export.trt_support import MAX_WINDOW_BATCH

    assert MAX_WINDOW_BATCH == 64
    out = tmp_path / "onnx"
    assert main(["-q", "export", "--weights", "tiny", "--out", str(out), "--window-batch", "65"]) == 2
    assert "--window-batch 65: the TensorRT profiles take at most 64 windows per UNet call" in capsys.readouterr().err
    assert not out.exists()
    assert main(["-q", "export", "--weights", "tiny", "--out", str(out), "--precision", "fp32", "--fp16-softmax"]) == 2
    assert "--fp16-softmax sets the softmax of fp16 graphs, and --precision fp32 writes none" in capsys.readouterr().err
    assert not out.exists()  # (was: fp32 graphs, the flag taken silently)


def test_a_precision_given_twice_is_exported_once(models, tmp_path):
    """``--precision fp16 fp16``: one fp16 row (was: the graph exported, or reused, and listed twice)."""
    rows = export_models(models, tmp_path, graphs=["pose_guider"], precisions=("fp16", "fp16"))
    assert [(r["graph"], r["precision"]) for r in rows] == [("pose_guider", "fp16")]
