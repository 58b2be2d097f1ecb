"""Weight loading: full-size key manifest, released-layout conversion, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_pack import ROOT, GoldenPack, pack_dir
from safetensors.torch import save_file

from megactor_rt.config import full_config
from megactor_rt.errors import WeightsError
from megactor_rt.models.clip import hf_vision_config
from megactor_rt.weights import build_models, convert_release, load_converted, strip_prefix

MANIFEST = ROOT.parent / "shared" / "golden" / "megactor_v1_checkpoint_keys.json"


def test_full_size_keys_match_release_manifest():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        models = build_models(full_config())
    ours = {"unet": models.unet, "appearance_encoder": models.reference_net, "vae": models.vae,
            "clip": models.clip}
    for name, module in ours.items():
        expected = {e["key"]: tuple(e["shape"]) for e in manifest[name]}
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert got == expected, f"{name}: missing {sorted(set(expected) - set(got))[:5]}, " \
                                f"extra {sorted(set(got) - set(expected))[:5]}"
    n_params = sum(p.numel() for p in models.unet.parameters())
    assert n_params == manifest["param_counts"]["unet"]


@pytest.fixture(scope="module")
def pack() -> GoldenPack:
    return GoldenPack(pack_dir())


def write_release(pack: GoldenPack, root: Path, mutate=None) -> Path:
    """A released-layout weights folder (tiny config) built from the golden pack's weights."""
    root.mkdir(parents=True)
    w, arch = pack.weights, pack.config["architecture"]
    state = {f"module.{k}": v for k, v in w.items() if k.startswith(("unet.", "appearance_encoder."))}
    state.update({f"module.vae.{k}": v for k, v in list(strip_prefix(w, "vae.").items())[:3]})  # ignored
    if mutate:
        mutate(state)
    torch.save({"epoch": 1, "global_step": 9000, "state_dict": state}, root / "checkpoint-steps9000.ckpt")
    (root / "StableDiffusion" / "unet").mkdir(parents=True)
    (root / "StableDiffusion" / "unet" / "config.json").write_text(json.dumps(arch["unet_2d_config"]))
    enc = root / "StableDiffusion" / "image_encoder"
    enc.mkdir()
    cfg = pack.model_config()
    hf_vision_config(cfg.clip).to_json_file(str(enc / "config.json"))
    save_file(strip_prefix(w, "image_encoder."), str(enc / "model.safetensors"))
    vae = root / "sd-vae-ft-mse"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps(arch["vae_config"]))
    save_file(strip_prefix(w, "vae."), str(vae / "diffusion_pytorch_model.safetensors"))
    return root


def test_release_layout_converts_and_loads(pack, tmp_path):
    src = write_release(pack, tmp_path / "weights")
    dst = convert_release(src, tmp_path / "converted")
    models = load_converted(dst)
    ref = pack.models()
    for name, module in models.modules().items():
        theirs = ref.modules()[name].state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(v, theirs[k]), f"{name}.{k} differs after conversion"
    assert not list(dst.glob("*.tmp"))


def test_a_conversion_that_cannot_write_leaves_the_earlier_one(pack, tmp_path, monkeypatch):
    """A write failing midway (a full disk) is a WeightsError naming the folder; the earlier conversion there
    keeps every file (new files are renamed in only once all are written) and no temporary file remains. A
    destination that is a file is refused."""
    from megactor_rt import weights as weights_mod
    from megactor_rt.errors import WeightsError

    src = write_release(pack, tmp_path / "weights")
    dst = convert_release(src, tmp_path / "converted")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    real, calls = weights_mod.save_file, []

    def fails_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(weights_mod, "save_file", fails_second)
    with pytest.raises(WeightsError, match=r"converted: cannot write the converted weights .*No space left"):
        convert_release(src, dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    monkeypatch.undo()
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(WeightsError, match="this is a file"):
        convert_release(src, a_file)


@pytest.mark.parametrize("case,needle", [
    ("missing", "missing keys"),
    ("extra", "keys outside"),
    ("extra_unet", "unexpected keys"),
    ("shape", "wrong shapes"),
])
def test_bad_checkpoints_name_the_problem(pack, tmp_path, case, needle):
    def mutate(state):
        if case == "missing":
            del state["module.unet.conv_in.weight"]
        elif case == "extra":
            state["module.something_else.weight"] = torch.zeros(1)
        elif case == "extra_unet":
            state["module.unet.not_a_layer.weight"] = torch.zeros(1)
        elif case == "shape":
            state["module.unet.conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    src = write_release(pack, tmp_path / "w", mutate)
    with pytest.raises(WeightsError) as err:
        convert_release(src, tmp_path / "out")
    assert needle in str(err.value)
    assert "checkpoint-steps9000.ckpt" in str(err.value) or "temporal_unet" in str(err.value)
    assert not (tmp_path / "out" / "config.json").exists()


class NotATensor:
    pass


def test_pickled_code_is_refused(pack, tmp_path):
    src = write_release(pack, tmp_path / "w")
    torch.save({"state_dict": {"module.unet.x": NotATensor()}}, src / "checkpoint-steps9000.ckpt")
    with pytest.raises(WeightsError, match="weights_only"):
        convert_release(src, tmp_path / "out")


def test_missing_folders_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_converted(tmp_path / "nope")
    with pytest.raises(WeightsError, match="checkpoint-steps"):
        (tmp_path / "empty").mkdir()
        convert_release(tmp_path / "empty", tmp_path / "out")
