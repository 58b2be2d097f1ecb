"""Weights a user really has: checkpoints in other files and wrappers, folders of other models, conversions killed
midway (tests/test_weights.py covers the released layout and its error paths)."""

from __future__ import annotations

import re

import pytest
import torch
from golden_pack import GoldenPack, pack_dir
from media_fixtures import write_leftovers
from test_weights import write_release

from megactor_rt.errors import WeightsError
from megactor_rt.weights import convert_release


def _pack() -> GoldenPack:
    return GoldenPack(pack_dir())


def test_safetensors_own_temporary_files_left_by_a_killed_conversion_are_removed(tmp_path):
    """safetensors' save_file writes each network into a temporary ``.tmpXXXXXX`` beside it and renames it: a
    conversion killed meanwhile (SIGKILL, the OOM killer) left it, as large as the network, and later conversions
    into the folder kept it for ever (they removed only their own temporaries). One older than an hour goes; a
    recent one (maybe another conversion's, still writing) stays, as do the user's other hidden files."""
    src = write_release(_pack(), tmp_path / "weights")
    dst = convert_release(src, tmp_path / "converted")
    stale, fresh, other = dst / ".tmpAb3dE9", dst / ".tmpXy12Z4", dst / ".tmp-notes"
    write_leftovers(b"half a network", [stale, other], [fresh])
    convert_release(src, dst)
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_training_checkpoint_saved_as_safetensors_converts(tmp_path):
    """A training checkpoint re-saved as safetensors (its state_dict's keys; shared that way for its safety) and given
    with --checkpoint, under its own name or as a .ckpt, converts to the same weights (was refused as "it is no file
    torch saved (it begins b'...': an error page saved under its name ...); download it again")."""
    from safetensors.torch import save_file

    from megactor_rt import cli
    from megactor_rt.weights import load_converted

    src = write_release(_pack(), tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    state = {k: v.clone() for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    want = load_converted(convert_release(src, tmp_path / "from_ckpt"))
    mine = tmp_path / "megactor-v1.safetensors"
    save_file(state, str(mine))
    assert cli.main(["convert-weights", str(src), str(tmp_path / "a"), "--checkpoint", str(mine)]) == 0
    save_file(state, str(ckpt))  # (a safetensors file under the released name)
    for got in (load_converted(tmp_path / "a"), load_converted(convert_release(src, tmp_path / "b"))):
        assert got.weights_id == want.weights_id
        assert torch.equal(got.unet.conv_in.weight, want.unet.conv_in.weight)
    mine.write_bytes(mine.read_bytes()[:1000])  # cut short: named damaged, as the other safetensors files
    with pytest.raises(WeightsError, match=r"cannot read .*megactor-v1\.safetensors .*damaged or incomplete"):
        convert_release(src, tmp_path / "c", checkpoint=mine)


def test_a_diffusers_or_transformers_folder_given_as_converted_weights_says_what_it_is(tmp_path):
    """SD1.5's unet/ or vae/ folder, or the release's sd-vae-ft-mse/ or image_encoder/, given as --weights: their
    config.json is a diffusers or transformers model's, named so (was "unsupported format_version None (expected
    1)", as if an older converted folder), in `doctor --weights` too."""
    from megactor_rt.doctor import doctor_report
    from megactor_rt.weights import check_converted_files, load_converted

    src = write_release(_pack(), tmp_path / "weights")
    for folder, made_by in ((src / "sd-vae-ft-mse", "AutoencoderKL"),
                            (src / "StableDiffusion" / "image_encoder", "clip_vision_model")):
        said = rf"{folder / 'config.json'} is the config of a diffusers or transformers model \({made_by}\), not of " \
               r"megactor-rt's converted weights: .* convert the released weights/ folder with `megactor-rt " \
               r"convert-weights`"
        for read in (load_converted, check_converted_files):
            with pytest.raises(WeightsError, match=said):
                read(folder)
        status = doctor_report(folder)["weights"]["status"]
        assert status.startswith("unusable: ") and re.search(said, status), status


def test_a_folder_without_checkpoint_steps_names_the_files_it_could_mean(tmp_path):
    """A release folder whose checkpoint was renamed or saved under another suffix names those files and
    --checkpoint (was only "no checkpoint-steps<N>.ckpt in DIR"; a .ckpt of another name was called "not MegActor
    v1's training checkpoint" whatever it held); a diffusers pipeline folder (SD1.5, which MegActor builds on) given
    as the release is named so; MegActor-Sigma's checkpoint is still called another model's."""
    from megactor_rt.weights import release_checkpoint

    src = write_release(_pack(), tmp_path / "weights")
    (src / "checkpoint-steps9000.ckpt").rename(src / "megactor.pth")
    (src / "notes.txt").write_text("mine")
    with pytest.raises(WeightsError, match=r"no checkpoint-steps<N>\.ckpt in .*weights \(found megactor\.pth: if one "
                                           r"is MegActor v1's training checkpoint, name it with --checkpoint\)$"):
        convert_release(src, tmp_path / "out")
    assert release_checkpoint(src, src / "megactor.pth") == src / "megactor.pth"
    (src / "megactor.pth").rename(src / "megactor-sigma.ckpt")
    with pytest.raises(WeightsError, match=r"\(found megactor-sigma\.ckpt: not MegActor v1's training checkpoint\)$"):
        release_checkpoint(src)
    sd = tmp_path / "stable-diffusion-v1-5"
    (sd / "unet").mkdir(parents=True)
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (sd / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"stable-diffusion-v1-5: this is a diffusers pipeline folder "
                                           r"\(model_index\.json\), not MegActor's released weights/ folder"):
        convert_release(sd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoints_of_other_training_scripts_are_read_or_say_what_they_hold(tmp_path):
    """A fine-tuned checkpoint saved by DeepSpeed ({"module": state_dict, ...}) or as {"model": state_dict} converts
    to the same weights as the released {"state_dict": ...} (was "does not hold a state_dict of tensors"); one that
    holds no state_dict says what it holds, and one whose keys carry another prefix shows them (was "lacks unet.*
    keys" alone)."""
    from megactor_rt.weights import load_converted, read_training_checkpoint

    src = write_release(_pack(), tmp_path / "weights")
    ckpt = src / "checkpoint-steps9000.ckpt"
    state = {k: v.clone() for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    want = load_converted(convert_release(src, tmp_path / "released")).weights_id
    for i, wrapped in enumerate(({"module": state, "global_steps": 9000, "optimizer": None},
                                 {"model": {k.removeprefix("module."): v for k, v in state.items()}, "epoch": 3})):
        torch.save(wrapped, ckpt)
        assert load_converted(convert_release(src, tmp_path / f"out{i}")).weights_id == want
    torch.save({"epoch": 3, "weights": {"conv": torch.zeros(1)}}, ckpt)
    with pytest.raises(WeightsError, match=r"checkpoint-steps9000\.ckpt does not hold a state_dict of tensors: epoch "
                                           r"\(int\), weights \(dict\) are no tensors$"):
        read_training_checkpoint(ckpt)
    torch.save([torch.zeros(1)], ckpt)
    with pytest.raises(WeightsError, match=r"does not hold a state_dict of tensors \(it holds a list\)$"):
        read_training_checkpoint(ckpt)
    torch.save({"state_dict": {k.replace("module.", "module._orig_mod."): v for k, v in state.items()}}, ckpt)
    with pytest.raises(WeightsError, match=r"lacks unet\.\* keys \(its other keys begin module\._orig_mod\."
                                           r"appearance_encoder\..*, \.\.\.: another prefix\?\)$"):
        read_training_checkpoint(ckpt)


def test_a_destination_that_is_a_link_to_nothing_is_named(tmp_path):
    """convert-weights into a symbolic link whose folder does not exist (yet) says so, naming the link and its
    target, before any work (was "cannot write the converted weights (FileExistsError: [Errno 17] File exists")
    after reading every file); a link to a folder is written through, the link kept."""
    from megactor_rt import cli
    from megactor_rt.weights_layout import check_destination

    src = write_release(_pack(), tmp_path / "weights")
    link = tmp_path / "converted"
    link.symlink_to(tmp_path / "big-disk" / "megactor")
    said = rf"converted: a symbolic link to {re.escape(str(tmp_path))}.big-disk.megactor, which does not exist"
    with pytest.raises(WeightsError, match=said):
        check_destination(src, link)
    with pytest.raises(WeightsError, match=said):
        convert_release(src, link)
    assert cli.main(["convert-weights", str(src), str(link)]) == 2
    (tmp_path / "big-disk" / "megactor").mkdir(parents=True)
    convert_release(src, link)
    assert link.is_symlink() and (tmp_path / "big-disk" / "megactor" / "config.json").is_file()


def test_a_destination_inside_a_link_to_nothing_is_named_before_any_work(tmp_path, monkeypatch):
    """convert-weights into a folder under a symbolic link whose folder does not exist (``converted/v1`` where
    ``converted`` points at an unmounted disk) names that link and its target before any work (was "cannot write the
    converted weights (FileExistsError: [Errno 17] File exists: '...converted')" after reading every file: the check
    looked at the destination itself only)."""
    from megactor_rt import cli
    from megactor_rt.weights_layout import check_destination

    src = write_release(_pack(), tmp_path / "weights")
    link = tmp_path / "converted"
    link.symlink_to(tmp_path / "big-disk" / "megactor")
    inside = link / "v1"
    said = (rf"{re.escape(str(inside))}: {re.escape(str(link))} is a symbolic link to "
            rf"{re.escape(str(tmp_path))}.big-disk.megactor, which does not exist")
    with pytest.raises(WeightsError, match=said):
        check_destination(src, inside)
    read = []
    real = torch.load
    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: read.append(a) or real(*a, **k))
        assert cli.main(["convert-weights", str(src), str(inside)]) == 2
    assert not read  # (no checkpoint read first)
    (tmp_path / "big-disk" / "megactor").mkdir(parents=True)
    convert_release(src, inside)
    assert (tmp_path / "big-disk" / "megactor" / "v1" / "config.json").is_file()


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_a_destination_that_is_or_lies_under_a_file_is_named_before_any_work(tmp_path, monkeypatch, where):
    """convert_release (the Python API; the CLI checks its argument first) into a file, or into a folder under one,
    named it only after reading every checkpoint and network (minutes at full size: "the converted weights go to a
    folder, and this is a file"; under one, "cannot write the converted weights (NotADirectoryError ...)"): it is
    named before any file is read."""
    from megactor_rt.weights_layout import check_destination

    src = write_release(_pack(), tmp_path / "weights")
    (tmp_path / "file").write_text("notes")
    dst = tmp_path / where
    this = "this" if where == "file" else str(tmp_path / "file")
    said = re.escape(f"{dst}: the converted weights go to a folder, and {this} is a file")
    with pytest.raises(WeightsError, match=said):
        check_destination(src, dst)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a checkpoint was read first"))
    with pytest.raises(WeightsError, match=said):
        convert_release(src, dst)
