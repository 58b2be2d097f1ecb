"""The onnxruntime backend on an export that holds a graph at one precision only (an fp16 export stopped part way
beside a whole fp32 one): the run is refused naming the precision it lacks, not as if the graph were not there; and
what an fp16 graph promises to compute in fp32 is fp32 in the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def tiny_fp16_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ReferenceNet's graphs (random weights), fp32 and fp16."""
    from megactor_rt.export.onnx_export import export_all

    out = tmp_path_factory.mktemp("fp16")
    export_all("tiny", out, frames=4, graphs=["reference_net"])
    return out


def test_the_fp16_graphs_timestep_embedding_is_computed_in_fp32(tiny_fp16_export: Path) -> None:
    """The sinusoidal timestep embedding an fp16 graph feeds its first time-embedding layer is the fp32 one rounded
    once to fp16 (error <= 2**-11 of values in [-1, 1]) at every timestep 1..999: the converter rounded each value
    between the nodes it keeps in fp32 through fp16, ``t * freq`` too (half a radian apart near 999), and the
    sinusoids were off by up to ~0.25 at large timesteps."""
    import onnx
    import onnxruntime as ort
    from diffusers.models.embeddings import get_timestep_embedding

    from megactor_rt.export.onnx_export import timestep_nodes

    graph = load_manifest(tiny_fp16_export).graphs["reference_net.fp16"]
    model = onnx.load(str(graph.path))
    kept = set(timestep_nodes(model))
    produced = {o for n in model.graph.node if n.name in kept for o in n.output}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and n.input[0] in produced]
    assert len(gemms) == 1 and gemms[0].name.endswith("time_embedding/linear_1/Gemm"), gemms
    model.graph.output.append(onnx.helper.make_tensor_value_info(gemms[0].input[0], onnx.TensorProto.FLOAT16, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = tiny_config().reference_net
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in graph.inputs[i.name].shape],
                              np.float32 if graph.inputs[i.name].dtype == "float32" else np.float16)
             for i in session.get_inputs()}
    worst = 0.0
    for t in (1.0, 250.0, 501.0, 777.0, 999.0):
        feeds["timestep"] = np.array([t], np.float32)
        got = session.run([gemms[0].input[0]], feeds)[0].astype(np.float32)
        want = get_timestep_embedding(torch.tensor([t]), cfg.block_out_channels[0],
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
    assert worst <= 2.0**-11, f"the fp16 graph's timestep embedding is {worst:.3g} off the fp32 one"


def test_the_fp16_graph_keeps_no_casts_that_nothing_reads(tiny_fp16_export: Path) -> None:
    """Dropping the converter's fp32 -> fp16 -> fp32 round trips leaves a valid, sorted graph: no node whose outputs
    nothing reads (the first Casts of the pairs were left, read only by the removed second ones), no value types for
    values no node makes, every input made before it is read."""
    import onnx

    model = onnx.load(str(load_manifest(tiny_fp16_export).graphs["reference_net.fp16"].path))
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unread = [n.name for n in graph.node if not any(o in read for o in n.output)]
    assert not unread, f"{len(unread)} nodes whose outputs nothing reads: {unread[:3]}"
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        assert set(node.input) <= made, f"{node.name} reads a value not made before it"
        made |= set(node.output)
    stale = [v.name for v in graph.value_info if v.name not in made]
    assert not stale, f"types of values no node makes: {stale[:3]}"
