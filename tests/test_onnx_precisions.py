"""The onnxruntime backend on an export that holds a graph at one precision only (an fp16 export stopped part way
beside a whole fp32 one): the run is refused naming the precision it lacks, not as if the graph were not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megactor_rt.config import AnimateConfig, Precision, tiny_config
from megactor_rt.engine.manifest import load_manifest
from megactor_rt.errors import InputError
from megactor_rt.runtime.onnx_backend import RUN_GRAPHS, graph_submodels, graphs_needed


def _half_fp16_export(out: Path) -> None:
    """Every graph at fp32; at fp16 only the graphs every run calls (no UNet graph): files of no content (a run's
    check comes before any graph is loaded)."""
    cfg = tiny_config()
    tensor = {"x": {"dtype": "float32", "shape": [1]}}
    graphs = {}
    for precision in ("fp32", "fp16"):
        for g in graphs_needed(AnimateConfig()) + ["temporal_unet_cond"]:
            if precision == "fp16" and g not in RUN_GRAPHS:
                continue
            name = f"{g}.{precision}.onnx"
            inputs = {"latents": {"dtype": "float32", "shape": ["windows", 4, "frames", 16, 16]}} \
                if g.startswith("temporal_unet") else tensor
            (out / name).write_bytes(b"")
            graphs[f"{g}.{precision}"] = {"file": name, "submodel": g, "precision": precision, "sha256": "0" * 64,
                                          "image_size": cfg.image_size, "inputs": inputs, "outputs": tensor}
    (out / "manifest.json").write_text(json.dumps({"format": 1, "graphs": graphs}))


def test_a_graph_exported_at_the_other_precision_only_is_named_with_it(tmp_path: Path) -> None:
    _half_fp16_export(tmp_path)
    manifest = load_manifest(tmp_path, validate_profiles=False)  # (the TensorRT profiles: not for onnxruntime)
    assert manifest.format == 1

    def fallback(dtype: torch.dtype):  # noqa: ANN202 - never called on onnxruntime
        raise AssertionError("no torch fallback on onnxruntime")

    sub = graph_submodels("onnxruntime", tiny_config(), "w", manifest, torch.device("cpu"), Precision.FP16,
                          torch_fallback=fallback, onnx_dir=tmp_path)
    with pytest.raises(InputError, match=r"the export has no temporal_unet graph, which this run needs at fp16 \(it "
                                         r"holds them as fp32 graphs: export with --precision fp16, or run with "
                                         r"--precision fp32\)"):
        sub.check_run(AnimateConfig())
    fp32 = graph_submodels("onnxruntime", tiny_config(), "w", manifest, torch.device("cpu"), Precision.FP32,
                           torch_fallback=fallback, onnx_dir=tmp_path)
    fp32.check_run(AnimateConfig())  # (every graph there at fp32)
