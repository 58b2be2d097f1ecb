"""``export --size``: graphs exported at another portrait size than the weights' run the onnxruntime backend at
that size (as ``animate --size`` runs the torch backend), one size per export folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import PORTRAIT, write_face_driver

from megactor_rt.cli import main
from megactor_rt.config import tiny_config
from megactor_rt.engine.manifest import ManifestError, load_manifest
from megactor_rt.errors import InputError
from megactor_rt.media import iter_video_frames
from megactor_rt.runtime.animator import Animator
from megactor_rt.weights import build_models, write_converted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 192  # the tiny weights' own size is 128
RUN = ["--steps", "2", "--window", "4", "--overlap", "2", "--max-frames", "3", "--device", "cpu", "--no-audio"]
GRAPHS = ["clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider", "pose_guider_film",
          "token_kv", "temporal_unet"]  # what a run with guidance calls


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_size")
    models = build_models(tiny_config(), seed=0)
    weights = write_converted(tiny_config(), {n: m.state_dict() for n, m in models.modules().items()}, root / "w")
    onnx = root / "onnx"
    assert main(["-q", "export", "--weights", str(weights), "--out", str(onnx), "--size", str(SIZE),
                 "--precision", "fp32", "--graphs", *GRAPHS]) == 0
    return {"weights": weights, "onnx": onnx, "driver": write_face_driver(root / "driver.mp4", n=4, fps=25)}


def test_an_export_at_another_size_runs_at_it(setup: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Every graph records its size; the onnxruntime backend crops and animates at it without --size (and with
    the same --size), and its frames match the torch backend's at that size."""
    assert {e.image_size for e in load_manifest(setup["onnx"]).graphs.values()} == {SIZE}
    common = ["--weights", str(setup["weights"]), "--portrait", str(PORTRAIT), "--driver", str(setup["driver"]), *RUN]
    graph, torch_run = tmp_path / "graph.mp4", tmp_path / "torch.mp4"
    assert main(["-q", "animate", *common, "--backend", "onnxruntime", "--onnx", str(setup["onnx"]), "-o",
                 str(graph)]) == 0, capsys.readouterr().err
    assert main(["-q", "animate", *common, "--size", str(SIZE), "-o", str(torch_run)]) == 0, capsys.readouterr().err
    a, b = list(iter_video_frames(graph)), list(iter_video_frames(torch_run))
    assert len(a) == len(b) == 3 and a[0].shape == (SIZE, SIZE, 3)
    assert max(float(np.abs(x.astype(int) - y).mean()) for x, y in zip(a, b)) < 2
    anim = Animator.from_weights(setup["weights"], backend="onnxruntime", onnx_dir=setup["onnx"], device="cpu",
                                 image_size=SIZE)
    assert anim.image_size == SIZE


def test_one_size_per_export_folder(setup: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An export at another size that would leave graphs of the first size beside it is refused (nothing written);
    a run asking for another size than the export's, or a folder of mixed sizes, is an error naming the sizes."""
    before = (setup["onnx"] / "manifest.json").read_text()
    code = main(["-q", "export", "--weights", str(setup["weights"]), "--out", str(setup["onnx"]), "--size", "256",
                 "--precision", "fp32", "--graphs", "vae_decoder"])
    err = capsys.readouterr().err
    assert code == 2 and f"holds graphs exported at {SIZE} px that this export at 256 px would not replace" in err
    assert "temporal_unet.fp32" in err and (setup["onnx"] / "manifest.json").read_text() == before
    with pytest.raises(InputError, match=rf"image_size \(--size\) 128: the graphs in .* were exported at {SIZE} px"):
        Animator.from_weights(setup["weights"], backend="onnxruntime", onnx_dir=setup["onnx"], device="cpu",
                              image_size=128)
    mixed = shutil.copytree(setup["onnx"], tmp_path / "mixed")
    doc = json.loads((mixed / "manifest.json").read_text())
    doc["graphs"]["vae_decoder.fp32"]["image_size"] = 256
    (mixed / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf"exported at different sizes \({SIZE} px: .*; 256 px: vae_decoder.fp32\)"):
        Animator.from_weights(setup["weights"], backend="onnxruntime", onnx_dir=mixed, device="cpu")
    doc["graphs"]["vae_decoder.fp32"]["image_size"] = "big"
    (mixed / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="'image_size' must be a positive integer"):
        load_manifest(mixed)


def test_a_graph_of_no_size_kept_from_an_export_at_another_size_takes_the_new_size(
        setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLIP's graph does not depend on the portrait size: exported again into the folder at another size it is kept
    (cached), labelled with the new size (it kept the first size's, so the folder held "graphs of two sizes" and
    every run on it was refused, while check-export said it was ready)."""
    out = tmp_path / "onnx"
    for size in (SIZE, 128):
        assert main(["-q", "export", "--weights", str(setup["weights"]), "--out", str(out), "--size", str(size),
                     "--precision", "fp32", "--graphs", "clip_image_encoder"]) == 0, capsys.readouterr().err
        assert {e.image_size for e in load_manifest(out).graphs.values()} == {size}
    assert "cached" in capsys.readouterr().out


def test_an_export_at_a_size_the_networks_cannot_take_is_refused(setup: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-q", "export", "--weights", str(setup["weights"]), "--out", str(tmp_path / "o"), "--size", "200"])
    assert code == 2 and "image_size (--size) 200: must be a multiple of 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_tensorrt_backend_falls_back_to_torch_at_the_export_size(setup: dict[str, Path], tmp_path: Path,
                                                                    fake_trt: object) -> None:
    """Graphs without a TensorRT plan (here: none was built) run on the torch fallback, at the export's size."""
    import torch

    from megactor_rt.config import AnimateConfig, Precision
    from megactor_rt.runtime.onnx_backend import make_graph_submodels

    (tmp_path / "engines").mkdir()
    sub = make_graph_submodels("tensorrt", setup["weights"], setup["onnx"], torch.device("cpu"), Precision.FP32,
                               engine_dir=tmp_path / "engines")
    anim = Animator(sub, AnimateConfig(steps=1, window=4, overlap=2, max_frames=3))
    frames = list(anim.animate(anim.prepare(PORTRAIT), setup["driver"]))
    assert sub.config.image_size == SIZE and len(frames) == 3 and frames[0].shape == (SIZE, SIZE, 3)


def test_a_dry_run_checks_the_export_a_graph_backend_would_run(setup: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--dry-run --backend onnxruntime`` finds what the run would stop at before any work: a result whose settings
    need a graph the export lacks (guidance 1: temporal_unet_cond), an export of other weights (was "ok" for
    both: only the manifest's presence was checked)."""
    common = ["-q", "animate", "--dry-run", "--portrait", str(PORTRAIT), "--driver", str(setup["driver"]), *RUN,
              "--backend", "onnxruntime", "--onnx", str(setup["onnx"]), "-o", str(tmp_path / "o.mp4")]
    assert main([*common, "--weights", str(setup["weights"])]) == 0, capsys.readouterr().err
    assert main([*common, "--weights", str(setup["weights"]), "--guidance", "1"]) == 2
    assert "the export has no temporal_unet_cond graph, which this run needs" in capsys.readouterr().err
    other = build_models(tiny_config(), seed=1)
    weights = write_converted(tiny_config(), {n: m.state_dict() for n, m in other.modules().items()}, tmp_path / "w")
    assert main([*common, "--weights", str(weights)]) == 2
    assert "were exported from other weights than" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_the_export_profiles_take_the_runtimes_largest_calls() -> None:
    """The PoseGuider and decoder plans' batch maxima (export_specs' defaults) are at least the frames the runtime
    puts in one call (POSE_BATCH, DECODE_BATCH): written in two places, one changed alone would make every run
    refuse its plans' shapes."""
    from megactor_rt.export.specs import export_specs, tiny_decoder_spec
    from megactor_rt.runtime.animator import DECODE_BATCH, POSE_BATCH

    specs = {s.name: s for s in export_specs(tiny_config())}
    tops = {name: max(hi for _, _, hi in spec.dims["batch"].values()) for name, spec in specs.items()
            if "batch" in spec.dims}
    assert tops["pose_guider"] >= POSE_BATCH, tops
    assert tops["vae_decoder"] >= DECODE_BATCH, tops
    tiny = tiny_decoder_spec(tiny_config())
    assert max(hi for _, _, hi in tiny.dims["batch"].values()) >= DECODE_BATCH
