"""Weight loading: full-size key manifest, released-layout conversion, and every error path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from golden_pack import ROOT, GoldenPack, pack_dir
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

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
    # the wrapper's VAE and text encoder: ignored (values unlike the VAE folder's, so taking them would show)
    state.update({f"module.vae.{k}": v + 100 for k, v in strip_prefix(w, "vae.").items()})
    state["module.text_encoder.text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    if mutate:
        mutate(state)
    torch.save({"epoch": 1, "global_step": 9000, "state_dict": state}, root / "checkpoint-steps9000.ckpt")
    (root / "StableDiffusion" / "unet").mkdir(parents=True)
    (root / "StableDiffusion" / "unet" / "config.json").write_text(json.dumps(arch["unet_2d_config"]))
    enc = root / "StableDiffusion" / "image_encoder"
    enc.mkdir()
    cfg = pack.model_config()
    hf_vision_config(cfg.clip).to_json_file(str(enc / "config.json"))
    clip = strip_prefix(w, "image_encoder.")  # + the buffer older transformers versions saved (dropped)
    clip["vision_model.embeddings.position_ids"] = torch.arange(cfg.clip.num_tokens)[None]
    save_file(clip, str(enc / "model.safetensors"))
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

    def no_chmod(fd, mode):  # a file system without permissions (vfat): the temporary file just made goes too
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(weights_mod.os, "fchmod", no_chmod)
    with pytest.raises(WeightsError, match=r"cannot write the converted weights .*Operation not permitted"):
        convert_release(src, dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    monkeypatch.undo()
    import os
    import time

    old = time.time() - 2 * 3600  # left by a conversion killed two hours ago: removed by the next one
    stale, fresh = dst / ".vae.safetensors.k1ll3d.tmp", dst / ".config.json.n0w.tmp"  # (fresh: maybe running)
    for leftover in (stale, fresh):
        leftover.write_bytes(b"partial")
    os.utime(stale, (old, old))
    convert_release(src, dst)
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    # the same weights again: the same files and the same weights id (safetensors orders its metadata
    # differently from process to process, so the id hashes the tensors, not the file bytes)
    assert sorted(p.name for p in dst.iterdir()) == sorted(before)
    again = json.loads((dst / "config.json").read_text())
    first = json.loads(before["config.json"])
    assert again.pop("files").keys() == first.pop("files").keys()  # (each file's size and time: new files)
    assert again == first
    for name in (n for n in before if n.endswith(".safetensors")):
        old_tensors, new_tensors = load_bytes(before[name]), load_file(str(dst / name))
        assert old_tensors.keys() == new_tensors.keys()
        assert all(torch.equal(old_tensors[k], new_tensors[k]) for k in old_tensors)
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(WeightsError, match="this is a file"):
        convert_release(src, a_file)


@pytest.mark.parametrize("case,needle", [
    ("missing", "missing keys"),
    ("extra_unet", "unexpected keys"),
    ("shape", "wrong shapes"),
    ("integers", "not floating point: conv_in.weight: int64"),
    ("nan", "conv_in.weight holds NaN or infinite values"),
    ("sparse", "conv_in.weight is a sparse_coo tensor, not a dense one"),
])
def test_bad_checkpoints_name_the_problem(pack, tmp_path, case, needle):
    def mutate(state):
        key = "module.unet.conv_in.weight"
        if case == "integers":
            state[key] = state[key].long()
        elif case == "nan":
            state[key] = state[key].clone()
            state[key][0, 0, 0, 0] = float("nan")
        elif case == "sparse":
            state[key] = state[key].to_sparse()
        elif case == "missing":
            del state["module.unet.conv_in.weight"]
        elif case == "extra_unet":
            state["module.unet.not_a_layer.weight"] = torch.zeros(1)
        elif case == "shape":
            state["module.unet.conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    src = write_release(pack, tmp_path / "w", mutate)
    with pytest.raises(WeightsError) as err:
        convert_release(src, tmp_path / "out")
    assert needle in str(err.value)
    assert "checkpoint-steps9000.ckpt" in str(err.value) or "temporal_unet" in str(err.value)
    assert not (tmp_path / "out").exists()  # (not even an empty folder)


def test_tied_tensors_convert(pack, tmp_path):
    """Tensors sharing their storage (tied weights) are written each on its own (safetensors refuses shared
    storage; that was reported as the destination's failure)."""
    def mutate(state):
        state["module.unet.conv_norm_out.bias"] = state["module.unet.conv_norm_out.weight"]  # (one shape)
    src = write_release(pack, tmp_path / "w", mutate)
    models = load_converted(convert_release(src, tmp_path / "out"))
    unet = models.modules()["temporal_unet"].state_dict()
    assert torch.equal(unet["conv_norm_out.bias"], unet["conv_norm_out.weight"])


def test_converted_files_are_on_disk_before_config_json_names_them(pack, tmp_path, monkeypatch):
    """config.json marks a converted folder complete: every file, config.json too, is synced before the renames
    and the folder after them (a power loss must not leave a complete-looking folder of empty files)."""
    from media_fixtures import Renames

    src = write_release(pack, tmp_path / "w")
    renames = Renames().install(monkeypatch)
    dst = convert_release(src, tmp_path / "out")
    named = [e[2] for e in renames.events if e[0] == "rename"]
    assert named[-1] == str(dst / "config.json") and len(named) > 3 and renames.unsynced() == []


def test_a_destination_holding_other_things_is_refused(pack, tmp_path):
    """convert-weights never writes over what is not an earlier conversion: the release folder itself or a folder
    in it (its config.json files), or a folder holding other files; a new or empty folder, or an earlier
    conversion, is taken."""
    from megactor_rt.weights_layout import check_destination

    src = write_release(pack, tmp_path / "w")
    for dst in (src, src / "sd-vae-ft-mse", src / "new"):
        with pytest.raises(WeightsError, match="would be written into the released folder"):
            convert_release(src, dst)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(WeightsError, match=r"mine: the folder holds other files than converted weights \(config.json"):
        convert_release(src, mine)
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    (tmp_path / "empty").mkdir()
    convert_release(src, tmp_path / "empty")
    check_destination(src, tmp_path / "empty")  # (an earlier conversion: converted again)

def test_a_state_of_another_network_is_named_in_one_line():
    """Two networks' files swapped: one line saying the file holds none of the model's keys (was: three lines
    listing 20 missing and 20 unexpected keys); a partial mismatch lists 5 keys per kind."""
    from torch import nn

    from megactor_rt.weights import check_state

    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(8)))
    other = {f"encoder.{i}.weight": torch.zeros(2, 2) for i in range(8)}
    with pytest.raises(WeightsError) as err:
        check_state(model, other, "vae", "w/vae.safetensors")
    message = str(err.value)
    assert "\n" not in message and "the file holds none of its 16 keys" in message
    assert "(its 8 keys begin encoder.0.weight, encoder.1.weight, encoder.2.weight, ...): another network's file?" \
        in message
    partial = {k: v for k, v in model.state_dict().items() if not k.endswith("bias")}
    with pytest.raises(WeightsError, match=r"vae weights in w/vae\.safetensors do not match the model: missing keys "
                                           r"\(8\): 0\.bias, 1\.bias, 2\.bias, 3\.bias, 4\.bias, \.\.\. \(\+3 more\)$"):
        check_state(model, partial, "vae", "w/vae.safetensors")


def test_keys_of_neither_network_are_skipped_with_a_warning(pack, tmp_path, caplog):
    """Upstream's loader picks the unet./appearance_encoder. keys and skips the rest (e.g. a training wrapper's
    other modules); so does the conversion, naming them (was: an error)."""
    def mutate(state):
        state["module.controlnet.weight"] = torch.zeros(1)

    with caplog.at_level("WARNING", logger="megactor_rt.weights"):
        dst = convert_release(write_release(pack, tmp_path / "w", mutate), tmp_path / "out")
    assert "1 keys outside" in caplog.text and "module.controlnet.weight" in caplog.text
    assert (dst / "config.json").is_file()


def test_configs_describing_no_network_are_named(pack, tmp_path):
    """Config values that parse but build no network are a WeightsError naming the config files (exit 2), not an
    unexpected error (exit 1) without a file."""
    from megactor_rt import cli

    src = write_release(pack, tmp_path / "w")
    unet_json = src / "StableDiffusion" / "unet" / "config.json"
    unet_json.write_text(json.dumps({**json.loads(unet_json.read_text()), "norm_num_groups": 7}))
    with pytest.raises(WeightsError, match=r"unet.config\.json.*cannot be built.*divisible"):
        convert_release(src, tmp_path / "out")
    assert cli.main(["convert-weights", str(src), str(tmp_path / "out")]) == 2


def test_a_whole_clip_model_folder_converts_without_its_text_tower(pack, tmp_path):
    """An image_encoder folder holding a whole CLIPModel (vision + text towers, as upstream's from_pretrained of the
    vision tower accepts) converts: the text tower's tensors are left out."""
    from transformers import CLIPConfig as HFCLIPConfig

    src = write_release(pack, tmp_path / "w")
    enc = src / "StableDiffusion" / "image_encoder"
    vision = json.loads((enc / "config.json").read_text())
    HFCLIPConfig(vision_config=vision, projection_dim=vision["projection_dim"]).to_json_file(str(enc / "config.json"))
    state = load_file(str(enc / "model.safetensors"))
    state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
                  "text_projection.weight": torch.zeros(2, 2), "logit_scale": torch.zeros(())})
    save_file(state, str(enc / "model.safetensors"))
    dst = convert_release(src, tmp_path / "out")
    reference = load_converted(convert_release(write_release(pack, tmp_path / "v"), tmp_path / "ref"))
    for k, v in load_converted(dst).clip.state_dict().items():
        assert torch.equal(v, reference.clip.state_dict()[k]), k


def test_a_reference_net_config_unlike_the_unets_is_named(pack, tmp_path, caplog):
    """Upstream builds the ReferenceNet from ``appearance_encoder/appearance_encoder/config.json``, this
    conversion from the SD1.5 UNet config: a difference in a field no tensor shape shows is a warning."""
    src = write_release(pack, tmp_path / "w")
    unet = json.loads((src / "StableDiffusion" / "unet" / "config.json").read_text())
    folder = src / "appearance_encoder" / "appearance_encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(unet))
    with caplog.at_level("WARNING", logger="megactor_rt.weights"):
        convert_release(src, tmp_path / "same")
    assert "differs from the SD1.5 UNet config" not in caplog.text
    (folder / "config.json").write_text(json.dumps({**unet, "norm_eps": 1e-6}))
    with caplog.at_level("WARNING", logger="megactor_rt.weights"):
        convert_release(src, tmp_path / "other")
    assert "differs from the SD1.5 UNet config" in caplog.text and "norm_eps: 1e-06 vs 1e-05" in caplog.text
    (folder / "config.json").write_text("{broken")  # only read for the warning: the conversion goes on
    with caplog.at_level("WARNING", logger="megactor_rt.weights"):
        convert_release(src, tmp_path / "broken")
    assert "cannot compare the ReferenceNet's config" in caplog.text


def test_the_weights_id_covers_the_architecture_and_is_required(pack, tmp_path, caplog):
    """Two conversions of the same tensors under configs that differ only where no tensor's shape changes get
    other ids (the id keys portrait caches and exports); a converted folder without an id is refused. The VAE
    config's latent scale is not read (upstream hard-codes 0.18215): a conversion warns and keeps the same id."""
    from megactor_rt.weights import converted_config

    a = convert_release(write_release(pack, tmp_path / "a"), tmp_path / "ca")
    src = write_release(pack, tmp_path / "b")
    clip_json = src / "StableDiffusion" / "image_encoder" / "config.json"
    clip_json.write_text(json.dumps({**json.loads(clip_json.read_text()), "layer_norm_eps": 1e-6}))
    b = convert_release(src, tmp_path / "cb")
    assert converted_config(a)[1] != converted_config(b)[1]
    src = write_release(pack, tmp_path / "c")
    vae_json = src / "sd-vae-ft-mse" / "config.json"
    vae_json.write_text(json.dumps({**json.loads(vae_json.read_text()), "scaling_factor": 0.2}))
    with caplog.at_level("WARNING", logger="megactor_rt.weights"):
        c = convert_release(src, tmp_path / "cc")
    assert "scaling_factor 0.2; upstream scales the latents by 0.18215" in caplog.text
    assert converted_config(c) == converted_config(a)
    meta = json.loads((b / "config.json").read_text())
    for bad in ("", None, 7):  # an id that cannot tell folders apart keys every cache and export alike
        (b / "config.json").write_text(json.dumps({**meta, "weights_id": bad}))
        with pytest.raises(WeightsError, match="is not an id"):
            converted_config(b)
    del meta["weights_id"]
    (b / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="weights_id"):
        converted_config(b)


class NotATensor:
    pass


def test_pickled_code_is_refused(pack, tmp_path):
    src = write_release(pack, tmp_path / "w")
    torch.save({"state_dict": {"module.unet.x": NotATensor()}}, src / "checkpoint-steps9000.ckpt")
    with pytest.raises(WeightsError, match="weights_only") as err:
        convert_release(src, tmp_path / "out")
    said = str(err.value)  # one line, and not torch's advice to load it with weights_only=False
    assert "\n" not in said and "weights_only=False" not in said and "holds code or objects" in said
    (src / "checkpoint-steps9000.ckpt").write_bytes(b"")
    with pytest.raises(WeightsError, match="the file is empty or cut off"):
        convert_release(src, tmp_path / "out")


def test_missing_folders_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_converted(tmp_path / "nope")
    with pytest.raises(WeightsError, match="checkpoint-steps"):
        (tmp_path / "empty").mkdir()
        convert_release(tmp_path / "empty", tmp_path / "out")


def test_the_vae_with_diffusers_0_4_attention_names_converts(pack, tmp_path):
    """sd-vae-ft-mse's files were written by diffusers 0.4, whose VAE attention projections are named
    query/key/value/proj_attn (diffusers renames them on load): they convert to the same weights (before: a
    missing-keys error that named the UNet checkpoint instead of the VAE file)."""
    from safetensors.torch import load_file

    src = write_release(pack, tmp_path / "weights")
    vae_file = src / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    new_names = load_file(str(vae_file))
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for k, v in new_names.items():
        for a, b in old.items():
            if ".attentions." in k and a in k:
                k = k.replace(a, b)
                v = v[:, :, None, None] if v.dim() == 2 and b == ".query." else v  # one as a 1x1 conv
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(vae_file))
    models = load_converted(convert_release(src, tmp_path / "converted"))
    for k, v in models.vae.state_dict().items():
        assert torch.equal(v, new_names[k]), k


def test_module_files_are_named_in_their_errors(pack, tmp_path):
    from safetensors.torch import load_file

    src = write_release(pack, tmp_path / "weights")
    clip_file = src / "StableDiffusion" / "image_encoder" / "model.safetensors"
    state = load_file(str(clip_file))
    del state["visual_projection.weight"]
    save_file(state, str(clip_file))
    with pytest.raises(WeightsError, match=r"clip_image_encoder weights in .*image_encoder.model\.safetensors"):
        convert_release(src, tmp_path / "out")


def test_lfs_pointers_damaged_files_and_bad_configs_are_named(pack, tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    src = write_release(pack, tmp_path / "a")
    (src / "checkpoint-steps9000.ckpt").write_bytes(pointer)
    with pytest.raises(WeightsError, match=r"checkpoint-steps9000\.ckpt is a Git LFS pointer.*git lfs pull"):
        convert_release(src, tmp_path / "out")
    src = write_release(pack, tmp_path / "b")
    (src / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").write_bytes(pointer)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors is a Git LFS pointer"):
        convert_release(src, tmp_path / "out")

    good = convert_release(write_release(pack, tmp_path / "c"), tmp_path / "converted")
    vae = good / "vae.safetensors"
    vae.write_bytes(vae.read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"cannot read .*vae\.safetensors.*damaged or incomplete"):
        load_converted(good)

    src = write_release(pack, tmp_path / "d")
    (src / "sd-vae-ft-mse" / "config.json").write_text(json.dumps({"layers_per_block": 2}))
    with pytest.raises(WeightsError, match=r"sd-vae-ft-mse.config\.json: missing field 'block_out_channels'"):
        convert_release(src, tmp_path / "out")
    meta = json.loads((good / "config.json").read_text())
    del meta["model"]
    (good / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"config\.json: missing field 'model'"):
        load_converted(good)


def _cut_checkpoint_refused(pack, folder: Path, legacy: bool) -> str:
    """What converting a release written in ``folder`` says of its training checkpoint cut in half (saved in
    torch's pre-1.6 format first, where ``legacy``)."""
    src = write_release(pack, folder)
    ckpt = src / "checkpoint-steps9000.ckpt"
    if legacy:
        torch.save(torch.load(ckpt, weights_only=True), ckpt, _use_new_zipfile_serialization=False)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(WeightsError) as err:
        convert_release(src, folder.parent / "out")
    return str(err.value)


def test_a_checkpoint_or_bin_file_cut_short_says_damaged_not_unsafe(pack, tmp_path):
    """A training checkpoint or a .bin weights file cut short (a download that broke off) was refused as "cannot
    read ... safely (weights_only=True): PytorchStreamReader failed reading zip archive: failed finding central
    directory. This is an internal miniz error...": read as a safety refusal. It says the file is damaged, to be
    downloaded again, as a damaged safetensors file does."""
    said = _cut_checkpoint_refused(pack, tmp_path / "a", legacy=False)
    assert re.search(r"cannot read checkpoint .*checkpoint-steps9000\.ckpt: the file is damaged or incomplete.*"
                     r"download it again \(PytorchStreamReader failed reading zip archive", said), said
    assert "safely" not in said and "miniz" not in said and "\n" not in said
    src = write_release(pack, tmp_path / "b")
    vae = src / "sd-vae-ft-mse"
    torch.save(load_file(str(vae / "diffusion_pytorch_model.safetensors")), vae / "diffusion_pytorch_model.bin")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    data = (vae / "diffusion_pytorch_model.bin").read_bytes()
    (vae / "diffusion_pytorch_model.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin: the file is damaged or incomplete"):
        convert_release(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_legacy_format_checkpoint_converts(pack, tmp_path):
    """A checkpoint saved in torch's pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole, still
    with weights_only (before: refused as unsafe)."""
    src = write_release(pack, tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    obj = torch.load(ckpt, weights_only=True)
    torch.save(obj, ckpt, _use_new_zipfile_serialization=False)
    models = load_converted(convert_release(src, tmp_path / "converted"))
    assert torch.equal(models.unet.conv_in.weight, pack.models().unet.conv_in.weight)


def test_a_legacy_format_checkpoint_cut_short_says_damaged_not_unsafe(pack, tmp_path):
    """A checkpoint in torch's pre-1.6 (non-zip) format cut short (a download that broke off) is named damaged, to
    download again, as a zip-format one is (was "cannot read ... safely (weights_only=True): unexpected EOF,
    expected N more bytes": read as a safety refusal)."""
    said = _cut_checkpoint_refused(pack, tmp_path / "weights", legacy=True)
    assert re.search(r"cannot read checkpoint .*checkpoint-steps9000\.ckpt: the file is damaged or incomplete.*"
                     r"download it again \(unexpected EOF", said), said
    assert "safely" not in said and "\n" not in said


def test_a_checkpoint_that_is_no_torch_file_says_so_without_torchs_advice(pack, tmp_path):
    """A .ckpt that is an HTML error page (a download of a page, not the file) or zeros (a download manager's
    preallocated file, never filled) is named no file torch saved, to download again (was "it holds code or objects
    other than tensors" of a page, and torch's advice to load zeros with weights_only=False)."""
    src = write_release(pack, tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    for data in (b"<!DOCTYPE html><html><body>Not Found</body></html>" * 20, bytes(1 << 16)):
        ckpt.write_bytes(data)
        with pytest.raises(WeightsError) as err:
            convert_release(src, tmp_path / "out")
        said = str(err.value)
        assert "checkpoint-steps9000.ckpt: it is no file torch saved" in said and "download it again" in said, said
        assert "weights_only" not in said and "holds code" not in said and "\n" not in said


def test_a_checkpoint_saved_without_the_ddp_prefix_converts(pack, tmp_path):
    """Keys without ``module.`` (a model saved outside DistributedDataParallel) convert to the same weights as
    the released, prefixed ones (was untested: cutting the prefix from every key passed)."""
    from megactor_rt.weights import read_training_checkpoint

    src = write_release(pack, tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    # the reader memory-maps the file: its tensors are copied before the file is rewritten below
    prefixed = [{k: v.clone() for k, v in part.items()} for part in read_training_checkpoint(ckpt)]
    obj = torch.load(ckpt, weights_only=True)
    plain = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    assert len(plain) == len(obj["state_dict"]) and not any(k.startswith("module.") for k in plain)
    torch.save({**obj, "state_dict": plain}, ckpt)
    unprefixed = read_training_checkpoint(ckpt)
    for ours, theirs in zip(unprefixed, prefixed):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_most_trained_checkpoint_is_converted_and_sigma_is_not(pack, tmp_path, caplog):
    import logging

    src = write_release(pack, tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    torch.save({"state_dict": {"module.unet.x": torch.zeros(1)}}, src / "checkpoint-steps800.ckpt")  # less trained
    with caplog.at_level(logging.WARNING, logger="megactor_rt.weights"):
        dst = convert_release(src, tmp_path / "converted")  # 9000 > 800 (by number, not by name)
    assert json.loads((dst / "config.json").read_text())["source"] == str(ckpt) and "2 checkpoints" in caplog.text
    (src / "checkpoint-steps800.ckpt").unlink()
    ckpt.rename(src / "megactor-sigma.ckpt")
    with pytest.raises(WeightsError, match="found megactor-sigma.ckpt: not MegActor v1"):
        convert_release(src, tmp_path / "out")


def test_a_chosen_checkpoint_is_converted_and_the_download_root_gets_a_hint(pack, tmp_path):
    """--checkpoint picks the file (a name in the folder, or a path); a missing one or Sigma's is refused. The
    download's root (holding weights/) is named as such, for conversion and for --weights."""
    from megactor_rt.cli import main

    src = write_release(pack, tmp_path / "root" / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    torch.save({"state_dict": {"module.unet.x": torch.zeros(1)}}, src / "checkpoint-steps99999.ckpt")  # foreign
    with pytest.raises(WeightsError, match="checkpoint-steps99999.ckpt"):
        convert_release(src, tmp_path / "highest")  # the default takes the highest N, which is not loadable here
    dst = convert_release(src, tmp_path / "chosen", checkpoint=ckpt)
    assert json.loads((dst / "config.json").read_text())["source"] == str(ckpt)
    assert main(["convert-weights", str(src), str(tmp_path / "cli"), "--checkpoint", "checkpoint-steps9000.ckpt"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["source"] == str(ckpt)
    with pytest.raises(WeightsError, match=r"checkpoint-steps100\.ckpt does not exist"):
        convert_release(src, tmp_path / "out", checkpoint="checkpoint-steps100.ckpt")
    ckpt.rename(src / "megactor-sigma.ckpt")
    with pytest.raises(WeightsError, match="MegActor-Sigma's checkpoint"):
        convert_release(src, tmp_path / "out", checkpoint="megactor-sigma.ckpt")
    (src / "megactor-sigma.ckpt").rename(ckpt)
    (src / "checkpoint-steps99999.ckpt").unlink()
    with pytest.raises(WeightsError, match=r"no checkpoint-steps<N>\.ckpt in .*root: it is in .*weights, pass that"):
        convert_release(tmp_path / "root", tmp_path / "out")
    with pytest.raises(WeightsError, match=r"holds the released weights.*convert-weights .*root/weights OUT"):
        load_converted(tmp_path / "root")
    with pytest.raises(WeightsError, match=r"chosen \(it looks like a folder convert-weights already wrote"):
        convert_release(dst, tmp_path / "out")  # a converted folder given as the source
    assert not (tmp_path / "out").exists()


def test_the_feature_extractor_is_compared_with_the_fixed_clip_preprocessing(tmp_path):
    """The released processor settings (SD1.5's, in transformers' old and new spelling) agree with the fixed CLIP
    preprocessing; a setting that differs is named (a conversion logs it: upstream preprocesses with the file)."""
    from megactor_rt.weights import feature_extractor_differences

    folder = tmp_path / "StableDiffusion" / "feature_extractor"
    folder.mkdir(parents=True)
    assert feature_extractor_differences(tmp_path, 224) == []  # absent: nothing to compare
    stock = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    newer = {**stock, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
             "do_rescale": True, "rescale_factor": 0.00392156862745098}
    square = {**newer, "size": {"height": 224, "width": 224}}  # the square crop resized to 224 x 224: the same
    for cfg in (stock, newer, square):
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
        assert feature_extractor_differences(tmp_path, 224) == []
    (folder / "preprocessor_config.json").write_text(json.dumps({**newer, "resample": 2, "image_std": [0.5] * 3}))
    found = feature_extractor_differences(tmp_path, 224)
    assert len(found) == 2 and found[0].startswith("resample 2") and found[1].startswith("image_std [0.5")
    assert feature_extractor_differences(tmp_path, 336)[:3] == ["size 224 (this engine: 336)",
                                                                "size width 224 (this engine: 336)",
                                                                "crop_size 224 (this engine: 336)"]
    (folder / "preprocessor_config.json").write_text(json.dumps({**newer, "size": {"longest_edge": 300}}))
    assert feature_extractor_differences(tmp_path, 224)[0] == "size {'longest_edge': 300} (this engine: 224)"
    for text, says in (("[]", "holds no settings object"), ("{", "unreadable ("),
                       ('{"rescale_factor": "abc"}', "a value that is no number"),
                       ('{"image_mean": [null, 1, 2]}', "a value that is no number")):
        (folder / "preprocessor_config.json").write_text(text)
        assert says in feature_extractor_differences(tmp_path, 224)[0]  # named, and the conversion goes on


def test_an_image_encoder_of_another_width_is_refused_at_conversion(pack, tmp_path):
    src = write_release(pack, tmp_path / "weights")
    cfg_file = src / "StableDiffusion" / "image_encoder" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["projection_dim"] = cfg["projection_dim"] + 16
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="projects to .* features, the denoiser's cross-attention takes"):
        convert_release(src, tmp_path / "out")


def test_a_released_folder_given_as_converted_weights_says_convert_it(pack, tmp_path):
    from megactor_rt.doctor import _weights_status

    src = write_release(pack, tmp_path / "weights")
    with pytest.raises(WeightsError, match="holds the released weights, not converted ones.*convert-weights"):
        load_converted(src)
    assert "convert-weights" in _weights_status(src)["status"]
    dst = convert_release(src, tmp_path / "converted")
    assert _weights_status(dst)["status"].startswith("converted weights found")
    # doctor reads each file's header (not its tensors): a cut file, another module's file are named
    whole = (dst / "clip_image_encoder.safetensors").read_bytes()
    (dst / "clip_image_encoder.safetensors").write_bytes(whole[: len(whole) // 2])
    status = _weights_status(dst)["status"]
    assert status.startswith("unusable: cannot read") and "clip_image_encoder.safetensors" in status, status
    (dst / "clip_image_encoder.safetensors").write_bytes((dst / "vae.safetensors").read_bytes())
    assert "another network's file?" in _weights_status(dst)["status"]
    (dst / "clip_image_encoder.safetensors").write_bytes(whole)
    meta = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "image_size": "x"}}))
    with pytest.raises(WeightsError, match="config.json: image_size 'x' is not a size in pixels"):
        load_converted(dst)
    (dst / "config.json").write_text(json.dumps(meta))
    (dst / "vae.safetensors").unlink()
    assert _weights_status(dst)["status"] == "incomplete: vae.safetensors missing"
    (dst / "config.json").write_text("{")
    assert _weights_status(dst)["status"].startswith("unusable: ") and "not valid JSON" in _weights_status(dst)["status"]
    (dst / "config.json").write_bytes(b"\xff\xfe{")  # not text: named, not a UnicodeDecodeError (exit 1)
    with pytest.raises(WeightsError, match=r"config.json: cannot be read as a JSON file \(UnicodeDecodeError"):
        load_converted(dst)
    (dst / "config.json").unlink()
    (dst / "config.json").mkdir()  # not a file: refused as an unfinished conversion
    with pytest.raises(WeightsError, match="is not a converted weights folder"):
        load_converted(dst)


def test_loaded_weights_are_the_files_tensors_in_the_asked_dtype(pack, tmp_path):
    """Loading assigns each file's tensors (no second full-size copy) and casts module by module; nothing is
    left uninitialised, and the modules stay without gradients."""
    dst = convert_release(write_release(pack, tmp_path / "weights"), tmp_path / "converted")
    models = load_converted(dst, dtype=torch.float16)
    ref = pack.models()
    for name, module in models.modules().items():
        theirs = ref.modules()[name].state_dict()
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                assert v.dtype == torch.float16 and torch.equal(v, theirs[k].half()), f"{name}.{k}"
        assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_a_weights_folder_named_full_is_that_folder_not_the_random_model(pack, tmp_path, monkeypatch):
    from megactor_rt.export.onnx_export import load_models_for_export, model_config_of

    monkeypatch.chdir(tmp_path)
    assert model_config_of("full") == full_config()  # no such folder: the random full-size architecture
    dst = convert_release(write_release(pack, tmp_path / "weights"), Path("full"))
    assert model_config_of("full").unet == pack.model_config().unet != full_config().unet
    assert load_models_for_export("full").weights_id == json.loads((dst / "config.json").read_text())["weights_id"]


def test_a_file_given_as_a_weights_folder_is_named_as_a_file(tmp_path):
    """--weights and convert-weights' source naming a file say it is a file, not that it does not exist (the
    user sees the file: 'does not exist' sends them looking in the wrong place). (Mutation audit.)"""
    from megactor_rt.weights_layout import check_converted_folder, check_release_folder

    file = tmp_path / "unet.safetensors"
    file.write_bytes(b"")
    with pytest.raises(WeightsError, match="--weights names the converted weights folder, and this is a file"):
        check_converted_folder(file)
    with pytest.raises(WeightsError, match="unet.safetensors is a file, not a folder"):
        check_release_folder(file)
    with pytest.raises(WeightsError, match="nope does not exist"):
        check_release_folder(tmp_path / "nope")
    assert check_release_folder(tmp_path) == tmp_path


def test_unet_configs_with_3d_block_names_and_per_block_heads_are_read() -> None:
    """AnimateDiff-style UNet configs name the SD1.5 blocks ``...3D``: the same layout, read (was only tested
    with 2D names); a list of equal per-block head counts is one count; another layout, or unequal heads,
    are named. (Mutation audit.)"""
    from megactor_rt.config import UNetConfig

    down3d = ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    cfg = UNetConfig.from_diffusers({"down_block_types": down3d, "attention_head_dim": [5, 5, 5, 5]})
    assert cfg.attention_heads == 5 and cfg.in_channels == 4
    with pytest.raises(ValueError, match="only the SD1.5 block layout is supported"):
        UNetConfig.from_diffusers({"down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="per-block attention_head_dim is not supported"):
        UNetConfig.from_diffusers({"attention_head_dim": [5, 10, 20, 20]})


class _Payload:
    """Pickled, it runs ``Path.touch`` on load: a stand-in for code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_legacy_format_checkpoint_is_read_without_running_its_code(pack, tmp_path):
    """A pre-1.6 (non-zip) checkpoint cannot be memory-mapped and is read whole: still with weights_only, so
    pickled code is refused, never run. (Mutation audit.)"""
    src = write_release(pack, tmp_path / "weights")
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {"module.unet.x": _Payload(marker)}}, src / "checkpoint-steps9000.ckpt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="weights_only"):
        convert_release(src, tmp_path / "out")
    assert not marker.exists()


def test_a_checkpoint_holding_a_bare_state_dict_is_read(pack, tmp_path):
    """A checkpoint saved as the state dict itself (no ``{"state_dict": ...}`` wrapper) gives the same networks'
    tensors. (Mutation audit.)"""
    from megactor_rt.weights import read_training_checkpoint

    src = write_release(pack, tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    wrapped = [{k: v.clone() for k, v in part.items()} for part in read_training_checkpoint(ckpt)]
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], ckpt)
    for bare, theirs in zip(read_training_checkpoint(ckpt), wrapped, strict=True):
        assert bare.keys() == theirs.keys() and all(torch.equal(bare[k], theirs[k]) for k in bare)


@pytest.mark.parametrize("dropped, lacks", [("appearance_encoder.", "appearance_encoder.*"), ("unet.", "unet.*")])
def test_a_checkpoint_without_one_networks_keys_says_which(pack, tmp_path, dropped, lacks):
    """A checkpoint holding the keys of one network only names the other one's prefix. (Mutation audit.)"""
    from megactor_rt.weights import read_training_checkpoint

    def drop(state):
        for key in [k for k in state if k.startswith(f"module.{dropped}")]:
            del state[key]

    src = write_release(pack, tmp_path / "weights", drop)
    with pytest.raises(WeightsError, match=rf"checkpoint .*checkpoint-steps9000\.ckpt lacks {re.escape(lacks)} keys$"):
        read_training_checkpoint(src / "checkpoint-steps9000.ckpt")


def test_a_vae_folder_holding_only_the_bin_file_converts(pack, tmp_path):
    """sd-vae-ft-mse/ with ``diffusion_pytorch_model.bin`` and no safetensors file converts to the same VAE, read
    with weights_only (pickled code in it is refused). (Mutation audit.)"""
    src = write_release(pack, tmp_path / "weights")
    vae = src / "sd-vae-ft-mse"
    state = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, vae / "diffusion_pytorch_model.bin")
    models = load_converted(convert_release(src, tmp_path / "converted"))
    assert all(torch.equal(v, state[k]) for k, v in models.vae.state_dict().items())
    marker = tmp_path / "code_ran"
    torch.save({**state, "x": _Payload(marker)}, vae / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin safely \(weights_only=True\)"):
        convert_release(src, tmp_path / "other")
    assert not marker.exists()


def test_the_weights_id_covers_the_tensors_values(pack, tmp_path):
    """Two conversions of tensors of the same names and shapes but other values get other weights ids (the id
    keys the portrait caches and exports). (Mutation audit.)"""
    from megactor_rt.weights import converted_config

    def nudge(state):
        state["module.unet.conv_in.weight"] = state["module.unet.conv_in.weight"] * 1.5

    a = convert_release(write_release(pack, tmp_path / "a"), tmp_path / "ca")
    b = convert_release(write_release(pack, tmp_path / "b", nudge), tmp_path / "cb")
    assert converted_config(a)[1] != converted_config(b)[1]


CONVERTING = """
import sys, time
import megactor_rt.weights as weights

def stalls(*args, **kwargs):  # a conversion midway through writing its files (minutes at full size)
    print("writing", flush=True)
    time.sleep(300)

weights.save_file = stalls
weights.convert_release(sys.argv[1], sys.argv[2])
"""


def test_a_second_conversion_into_a_folder_being_converted_is_refused(pack, tmp_path, capsys):
    """Two ``convert-weights`` into one folder at once: the second is refused at once, naming the folder and the
    process converting into it, exit 2, and writes nothing there (both reported success, the folder ending with one's
    files). The lock goes with the process: once it is killed (SIGKILL), the folder converts."""
    import subprocess
    import sys

    from megactor_rt import cli

    src, dst = write_release(pack, tmp_path / "w"), tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", CONVERTING, str(src), str(dst)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout is not None and first.stdout.readline() == "writing\n"
        assert cli.main(["convert-weights", str(src), str(dst)]) == 2
        assert f"{dst}: another convert-weights is writing this folder (process {first.pid}); wait for it to " \
            "end, or convert into another folder" in capsys.readouterr().err
        assert not (dst / "config.json").exists()
    finally:
        first.kill()
        first.wait()
    assert cli.main(["convert-weights", str(src), str(dst)]) == 0
    assert load_converted(dst).weights_id and not list(dst.glob(".*.lock"))


def test_a_conversion_that_fails_removes_the_folders_it_made(tmp_path):
    """A conversion into converted/v1/w, none of which exists, that fails (its checkpoint missing) leaves none of
    those folders (was: w removed, converted/v1 left empty, made for its lock); a folder that was there stays."""
    src, dst = tmp_path / "release", tmp_path / "converted" / "v1" / "w"
    src.mkdir()
    with pytest.raises(WeightsError, match="no checkpoint-steps"):
        convert_release(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    (tmp_path / "converted").mkdir()
    with pytest.raises(WeightsError, match="no checkpoint-steps"):
        convert_release(src, dst)
    assert (tmp_path / "converted").is_dir() and not list((tmp_path / "converted").iterdir())


def test_a_conversion_into_a_folder_this_user_may_not_write_says_so(tmp_path, monkeypatch):
    """convert_release into an existing folder this user may not write (its lock file cannot be made) names the
    permission error (was: "FileNotFoundError: No such file or directory" of the lock file, as the lock file of
    another user's conversion was then looked for); nothing is left there."""
    import os

    import megactor_rt.weights as weights

    src, dst = tmp_path / "release", tmp_path / "shared"
    src.mkdir()
    dst.mkdir()
    real_open = os.open

    def no_create(path, flags, *args):  # chmod cannot be used: tests may run as root, which ignores it
        if flags & os.O_CREAT and Path(path).parent == dst:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(weights.os, "open", no_create)
    with pytest.raises(WeightsError, match=r"cannot write the converted weights \(PermissionError: "):
        convert_release(src, dst)
    assert not list(dst.iterdir())


def test_a_conversion_broken_off_while_renaming_leaves_an_incomplete_folder(pack, tmp_path, monkeypatch):
    """The files of a conversion are renamed into place after config.json is removed (written back last): broken
    off in between, the folder is refused as unfinished rather than loaded with a stale config and a mix of old
    and new files. (Mutation audit.)"""
    src = write_release(pack, tmp_path / "weights")
    dst = convert_release(src, tmp_path / "converted")
    real, renamed = Path.replace, []

    def fails_second(self: Path, target: Path) -> Path:
        renamed.append(target)
        if len(renamed) == 2:
            raise OSError(5, "Input/output error")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", fails_second)
    with pytest.raises(WeightsError, match="cannot write the converted weights .*Input/output error"):
        convert_release(src, dst)
    monkeypatch.undo()
    assert not (dst / "config.json").exists() and not list(dst.glob(".*.tmp"))
    with pytest.raises(WeightsError, match="is not a converted weights folder .*conversion did not finish"):
        load_converted(dst)


def test_a_converted_folder_of_another_format_is_refused(tmp_path):
    """config.json's format_version must be this engine's: another one, or none, is refused. (Mutation audit.)"""
    from megactor_rt.config import tiny_config
    from megactor_rt.weights import FORMAT_VERSION, converted_config

    meta = {"format_version": FORMAT_VERSION, "source": "", "weights_id": "0123abcd", "model": tiny_config().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert converted_config(tmp_path) == (tiny_config(), "0123abcd")
    for version in (FORMAT_VERSION + 1, None):
        bad = {**meta, "format_version": version} if version else {k: v for k, v in meta.items()
                                                                    if k != "format_version"}
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(WeightsError, match=rf"unsupported format_version {version!r} \(expected {FORMAT_VERSION}\)"):
            converted_config(tmp_path)


def test_a_vae_file_that_does_not_match_is_named(pack, tmp_path):
    """A VAE file with a key missing is named in the error (not the training checkpoint). (Mutation audit.)"""
    src = write_release(pack, tmp_path / "weights")
    vae_file = src / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae_file))
    del state[sorted(state)[0]]
    save_file(state, str(vae_file))
    with pytest.raises(WeightsError, match=r"vae weights in .*sd-vae-ft-mse.diffusion_pytorch_model\.safetensors do "
                                           r"not match the model: missing keys \(1\)"):
        convert_release(src, tmp_path / "out")


def test_a_checkpoint_name_is_taken_from_the_working_folder_before_the_release_folder(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """``--checkpoint x.ckpt`` names the file where the user is (as any relative path on a command line); the
    release folder's file of that name is taken only where the working folder has none."""
    from megactor_rt.weights import release_checkpoint

    src, here = tmp_path / "weights", tmp_path / "here"
    src.mkdir()
    here.mkdir()
    (src / "checkpoint-steps9000.ckpt").write_bytes(b"release")
    (src / "mine.ckpt").write_bytes(b"release copy")
    monkeypatch.chdir(here)
    assert release_checkpoint(src, "checkpoint-steps9000.ckpt") == src / "checkpoint-steps9000.ckpt"
    (here / "checkpoint-steps9000.ckpt").write_bytes(b"mine")
    assert release_checkpoint(src, "checkpoint-steps9000.ckpt") == Path("checkpoint-steps9000.ckpt")
    assert release_checkpoint(src, "mine.ckpt") == src / "mine.ckpt"


def test_a_module_file_replaced_since_the_conversion_gets_another_weights_id(pack, tmp_path, caplog):
    """The weights id keys the portrait caches and the exports: a module file replaced by hand (fine-tuned values
    under the same names) gave the old id, so kept portraits and graphs of the old weights were used. config.json
    records each file's size and time; a file that differs is hashed again at load: other tensors give another id
    (said), the same tensors with a new time (a copy) the same id; either is recorded in config.json (the next load
    hashes nothing), and the graph backends' check (current_weights_id, no load) gives the same id."""
    import logging
    import os

    from megactor_rt.doctor import _weights_status
    from megactor_rt.weights import _changed_files, converted_config, current_weights_id

    dst = convert_release(write_release(pack, tmp_path / "weights"), tmp_path / "converted")
    recorded = converted_config(dst)[1]
    assert load_converted(dst).weights_id == recorded
    unet = dst / "temporal_unet.safetensors"
    stamp = unet.stat()
    os.utime(unet, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # (copied without its time)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.weights"):
        assert load_converted(dst).weights_id == recorded
    assert "these are other weights" not in caplog.text and _changed_files(dst) == []  # (the new time recorded)
    state = load_file(str(unet))
    state["conv_in.weight"] = state["conv_in.weight"] * 1.5
    save_file(state, str(unet))
    # doctor reads no tensors: it names the replaced file rather than give the stale id alone
    assert "temporal_unet.safetensors changed since the conversion" in _weights_status(dst)["status"]
    with caplog.at_level(logging.WARNING, logger="megactor_rt.weights"):
        replaced = load_converted(dst).weights_id
    assert replaced != recorded
    assert f"temporal_unet.safetensors changed since config.json was written: these are other weights " \
           f"(id {replaced}, not {recorded})" in caplog.text
    assert converted_config(dst)[1] == replaced and current_weights_id(dst) == replaced  # (recorded)
    state["conv_in.weight"] = state["conv_in.weight"] * 2
    save_file(state, str(unet))
    again = current_weights_id(dst)  # (the graph backends' check, without a load)
    assert again not in (recorded, replaced) and load_converted(dst).weights_id == again


def test_the_readme_names_every_torch_checkpoint_suffix() -> None:
    """README's convert-weights paragraph lists the torch file suffixes a checkpoint is looked for under (it left out
    ``.pt``, which ``release_checkpoint`` names among a folder's candidates as it does ``.pth``)."""
    from megactor_rt.weights import _CHECKPOINT_SUFFIXES

    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"a torch file, ((?:`\.\w+`/?)+), its state_dict", readme)
    assert listed is not None
    named = set(re.findall(r"`(\.\w+)`", listed.group(1)))
    assert named == {s for s in _CHECKPOINT_SUFFIXES if s != ".safetensors"}
