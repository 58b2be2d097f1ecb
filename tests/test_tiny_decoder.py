"""The TAESD tiny decoder (``--tiny-decoder``): both released weight layouts load and decode exactly like
diffusers' ``AutoencoderTiny`` with the same weights, bad files are clear errors, and a run uses it instead
of the VAE decoder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny
from media_fixtures import PORTRAIT, write_face_driver
from safetensors.torch import save_file

from megactor_rt.config import AnimateConfig
from megactor_rt.errors import WeightsError
from megactor_rt.models.tiny_decoder import load_tiny_decoder
from megactor_rt.progress import set_progress_enabled
from megactor_rt.runtime.animator import Animator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AutoencoderTiny]:
    """A random-weight AutoencoderTiny (TAESD's default configuration) saved as the HF repo holds it."""
    folder = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    ae = AutoencoderTiny().eval()
    ae.save_pretrained(folder)
    return folder, ae


def _original_layout(ae: AutoencoderTiny) -> dict[str, torch.Tensor]:
    """madebyollin/taesd's taesd_decoder layout: nn.Sequential keys, index 0 a parameter-free clamp."""
    out = {}
    for key, value in ae.decoder.state_dict().items():
        _, index, rest = key.split(".", 2)  # "layers.<i>.<rest>"
        out[f"{int(index) + 1}.{rest}"] = value.clone()
    return out


def _decode_reference(ae: AutoencoderTiny, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ae.decode(z).sample


@pytest.mark.parametrize("layout", ["diffusers folder", "original .pth", "original .safetensors"])
def test_both_layouts_decode_like_diffusers(taesd: tuple[Path, AutoencoderTiny], tmp_path: Path,
                                            layout: str) -> None:
    folder, ae = taesd
    if layout == "diffusers folder":
        path = folder
    elif layout == "original .pth":
        path = tmp_path / "taesd_decoder.pth"
        torch.save(_original_layout(ae), path)
    else:
        path = tmp_path / "taesd_decoder.safetensors"
        save_file(_original_layout(ae), str(path))
    model = load_tiny_decoder(path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(z)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, _decode_reference(ae, z), rtol=0, atol=0)


def test_the_weights_id_is_the_files_sha256(taesd: tuple[Path, AutoencoderTiny], tmp_path: Path) -> None:
    """``tiny_decoder_id`` is ``taesd-`` and the first 16 hex digits of the weights file's sha256 (what exported
    ``tiny_decoder`` graphs record, so the ids of graphs exported earlier keep matching), the same for a
    diffusers folder and its weights file, and another one for other weights."""
    import hashlib

    from megactor_rt.models.tiny_decoder import tiny_decoder_id

    folder, ae = taesd
    file = folder / "diffusion_pytorch_model.safetensors"
    want = "taesd-" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    assert tiny_decoder_id(folder) == tiny_decoder_id(file) == want
    other = tmp_path / "taesd_decoder.safetensors"
    save_file(_original_layout(ae), str(other))
    assert tiny_decoder_id(other) != want


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope\.pth: tiny decoder weights not found .*madebyollin/taesd"):
        load_tiny_decoder(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: tiny decoder weights not found"):
        load_tiny_decoder(tmp_path)  # a folder without the diffusers weights file


def test_sixteen_channel_model_is_refused(tmp_path: Path) -> None:
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path)  # taesd3 / taef1 shape
    with pytest.raises(WeightsError, match="shapes do not match TAESD for SD 1.x latents"):
        load_tiny_decoder(tmp_path)


def test_foreign_checkpoint_lists_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(WeightsError, match=r"other\.safetensors: not a TAESD decoder: \d+ missing keys"):
        load_tiny_decoder(path)


class _Payload:  # a pickled object that is not a tensor: weights_only loading must refuse it
    pass


def test_pickled_code_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"1.weight": _Payload()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth: the --tiny-decoder file holds more than tensors; refused "
                                           r"without unpickling code.*Unsupported global.*_Payload"):
        load_tiny_decoder(path)


@pytest.mark.parametrize("content, says", [
    (b"", "the --tiny-decoder file is empty"),
    (b"not a checkpoint", "the --tiny-decoder file is not a PyTorch checkpoint or safetensors file"),
    ({1: torch.zeros(1)}, "the --tiny-decoder file holds a dict, not a state dict of named tensors"),
    ([torch.zeros(1)], "the --tiny-decoder file holds a list, not a state dict of named tensors"),
])
def test_a_file_that_is_no_checkpoint_is_named_with_its_reason(tmp_path: Path, content: object, says: str) -> None:
    path = tmp_path / "taesd.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=rf"taesd\.pth: {says}"):
        load_tiny_decoder(path)


def test_a_run_decodes_with_the_tiny_decoder(taesd: tuple[Path, AutoencoderTiny], tmp_path: Path) -> None:
    set_progress_enabled(False)
    folder, _ = taesd
    cfg = AnimateConfig(steps=1, window=4, overlap=2)
    anim = Animator.demo(seed=0, device="cpu", config=cfg)
    driver = write_face_driver(tmp_path / "face.mp4", n=5)
    state = anim.prepare(PORTRAIT)
    vae_frames = list(anim.animate(state, driver))
    assert anim.last_stats.calls.get("vae_decode") == 2 and "tiny_decode" not in anim.last_stats.calls
    tiny_frames = list(anim.animate(state, driver, config=replace(cfg, tiny_decoder=str(folder))))
    assert anim.last_stats.calls.get("tiny_decode") == 2 and "vae_decode" not in anim.last_stats.calls
    assert len(tiny_frames) == 5 and tiny_frames[0].shape == vae_frames[0].shape == (128, 128, 3)
    assert any((a != b).any() for a, b in zip(tiny_frames, vae_frames))
    with pytest.raises(WeightsError, match="tiny decoder weights not found"):
        next(anim.animate(state, driver, config=replace(cfg, tiny_decoder=str(tmp_path / "gone.pth"))))


def test_a_bad_tiny_decoder_fails_before_any_work(tmp_path: Path) -> None:
    """animate_to_file checks the tiny decoder before the portrait's networks run, and writes nothing."""
    set_progress_enabled(False)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2,
                                                                   tiny_decoder=str(tmp_path / "gone.pth")))
    out = tmp_path / "out.mp4"
    with pytest.raises(WeightsError, match="gone.pth"):
        anim.animate_to_file(PORTRAIT, write_face_driver(tmp_path / "face.mp4", n=5), out)
    assert not anim.sub.calls and not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "face.mp4"]


def test_the_tiny_decoder_exports_and_runs_as_a_graph(taesd: tuple[Path, AutoencoderTiny], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`export --tiny-decoder`: the TAESD decoder becomes the ``tiny_decoder`` graph (fp32 and fp16, every op
    in TensorRT's parser list), keyed by its weights file; a graph backend's animator decodes with it (same
    images as torch) for that file, and with TAESD in torch for another file."""
    import logging

    from megactor_rt.config import tiny_config
    from megactor_rt.engine.manifest import load_manifest
    from megactor_rt.export.onnx_export import export_tiny_decoder
    from megactor_rt.export.trt_support import unsupported_ops
    from megactor_rt.models.tiny_decoder import tiny_decoder_id
    from megactor_rt.runtime.onnx_backend import GraphSubmodels, OrtRunner

    folder, ae = taesd
    cfg = tiny_config()
    rows = export_tiny_decoder(folder, cfg, tmp_path / "onnx")
    assert [(r["graph"], r["precision"], r["status"]) for r in rows] == [
        ("tiny_decoder", "fp32", "exported"), ("tiny_decoder", "fp16", "exported")]
    assert [r["status"] for r in export_tiny_decoder(folder, cfg, tmp_path / "onnx")] == ["cached", "cached"]
    manifest = load_manifest(tmp_path / "onnx")
    graphs = {g.precision: g for g in manifest.graphs.values()}
    assert {g.weights_id for g in graphs.values()} == {tiny_decoder_id(folder)}
    assert unsupported_ops(graphs["fp16"].path, "fp16") == []

    z = torch.randn(3, 4, cfg.latent_size, cfg.latent_size, generator=torch.Generator().manual_seed(1))
    expected = _decode_reference(ae, z)
    for precision, tol in (("fp32", 1e-4), ("fp16", 2e-2)):
        dtype = torch.float16 if precision == "fp16" else torch.float32
        sub = GraphSubmodels("onnxruntime", cfg, "w", {"tiny_decoder": OrtRunner(graphs[precision])},
                             torch.device("cpu"), dtype, graph_weights={"tiny_decoder": graphs[precision].weights_id})
        anim = Animator(sub, AnimateConfig(steps=1))
        decoder = anim.tiny_decoder(folder)
        assert not isinstance(decoder, torch.nn.Module)  # the graph
        got = decoder(z.to(dtype)).float()
        assert sub.calls["tiny_decoder"] == 1 and got.shape == expected.shape == (3, 3, 128, 128)
        assert (got - expected).abs().max() <= tol * expected.abs().max(), precision

    other = tmp_path / "other.safetensors"
    save_file(_original_layout(ae), str(other))  # the same weights in another file: another id
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.onnx_backend"):
        fallback = anim.tiny_decoder(other)
    assert isinstance(fallback, torch.nn.Module) and "comes from other TAESD weights" in caplog.text
