"""TensorRT end to end on a tiny fp16 graph: build a plan, reuse it, run it against onnxruntime.

Every test carries the ``trt`` marker; conftest.py skips them (with the reason) where TensorRT or CUDA is
missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from megactor_rt.engine.builder import build_engines
from megactor_rt.engine.cache import DeviceInfo, read_sidecar, timing_cache_path
from megactor_rt.engine.runner import TensorRTRunner
from megactor_rt.engine.select import select_backends
from megactor_rt.errors import InputError

pytestmark = pytest.mark.trt

F16 = TensorProto.FLOAT16


def _tiny_model(seed: int = 0) -> onnx.ModelProto:
    """y = relu(x @ w + b), z = sigmoid(x @ w); x (batch, 8) fp16, batch dynamic."""
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", F16, [8, 16], rng.standard_normal((8, 16)).astype(np.float16).tobytes(), raw=True)
    b = helper.make_tensor("b", F16, [16], rng.standard_normal(16).astype(np.float16).tobytes(), raw=True)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["y"]), helper.make_node("Sigmoid", ["h"], ["z"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", F16, ["batch", 8])],
        [helper.make_tensor_value_info("y", F16, ["batch", 16]), helper.make_tensor_value_info("z", F16, ["batch", 16])],
        [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, onnx.ModelProto]:
    root = tmp_path_factory.mktemp("trt")
    onnx_dir, engines = root / "onnx", root / "engines"
    onnx_dir.mkdir()
    model = _tiny_model()
    onnx.save(model, str(onnx_dir / "vae_decoder.fp16.onnx"))
    sha = hashlib.sha256((onnx_dir / "vae_decoder.fp16.onnx").read_bytes()).hexdigest()
    manifest = {"format": 1, "graphs": {"vae_decoder_fp16": {
        "file": "vae_decoder.fp16.onnx", "submodel": "vae_decoder", "precision": "fp16", "sha256": sha,
        "inputs": {"x": {"dtype": "float16", "shape": ["batch", 8]}},
        "outputs": {"y": {"dtype": "float16", "shape": ["batch", 16]}, "z": {"dtype": "float16", "shape": ["batch", 16]}},
        "profiles": {"default": {"x": [[1, 8], [2, 8], [4, 8]]}}}}}
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    results = build_engines(onnx_dir, engines, "fp16", optimization_level=1, workspace_gib=1)
    assert [r.status for r in results] == ["built"]
    return onnx_dir, results[0].directory, model


def _reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(["y", "z"], sess.run(["y", "z"], {"x": x})))


def _exact(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 math on the fp16 weights: the yardstick both fp16 paths are measured against."""
    w, b = (onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    h = x.astype(np.float64) @ w
    return {"y": np.maximum(h + b, 0), "z": 1 / (1 + np.exp(-h))}


def test_plan_runs_like_onnxruntime(built) -> None:
    onnx_dir, plan_dir, model = built
    record = read_sidecar(plan_dir)
    assert record.device == DeviceInfo.current() and record.precision == "fp16"
    assert record.inputs == {"x": {"dtype": "float16", "shape": [-1, 8]}}
    with TensorRTRunner(plan_dir) as runner:
        for batch in (1, 3, 4):  # dynamic shapes set per call
            x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float16)
            out = runner.infer({"x": torch.from_numpy(x).cuda()})
            ref, exact = _reference(model, x), _exact(model, x)
            for name in ("y", "z"):
                got = out[name].float().cpu().numpy()
                assert got.shape == (batch, 16) and out[name].dtype == torch.float16
                err_trt = np.abs(got - exact[name]).max()
                err_ort = np.abs(ref[name].astype(np.float64) - exact[name]).max()
                assert err_trt <= 4 * err_ort + 2e-3, (name, batch, err_trt, err_ort)


def test_second_build_skips_and_timing_cache_persists(built) -> None:
    onnx_dir, plan_dir, _ = built
    before = (plan_dir / "engine.plan").stat().st_mtime_ns
    results = build_engines(onnx_dir, plan_dir.parent.parent, "fp16")
    assert [r.status for r in results] == ["skipped"]
    assert (plan_dir / "engine.plan").stat().st_mtime_ns == before
    assert timing_cache_path(plan_dir.parent.parent, DeviceInfo.current()).stat().st_size > 0
    choice = select_backends(["vae_decoder"], plan_dir.parent.parent)["vae_decoder"]
    assert choice.backend == "tensorrt" and choice.plan_dir == plan_dir


def test_out_of_profile_shape_is_an_input_error(built) -> None:
    _, plan_dir, _ = built
    with TensorRTRunner(plan_dir) as runner, pytest.raises(InputError, match="allows \\[1, 8\\] .. \\[4, 8\\]"):
        runner.infer({"x": torch.zeros(5, 8, dtype=torch.float16, device="cuda")})


def test_cuda_graph_replay_matches_eager(built) -> None:
    _, plan_dir, _ = built
    xs = [torch.randn(b, 8, device="cuda").half() for b in (2, 2, 3, 3, 2, 3, 4)]
    with TensorRTRunner(plan_dir) as eager, TensorRTRunner(plan_dir, cuda_graph=True, max_graphs=2) as graphed:
        for x in xs:  # each shape's first call captures, alternating shapes replay; a third shape evicts one
            a, b = eager.infer({"x": x}), graphed.infer({"x": x})
            torch.cuda.synchronize()
            for name in ("y", "z"):
                assert torch.equal(a[name], b[name]), name
        assert graphed.cuda_graph, "capture fell back to eager"
        assert graphed.captures == 3 and len(graphed._graphs) == 2


def test_a_view_at_an_unaligned_offset_runs_like_a_copy(built) -> None:
    """TensorRT takes addresses aligned to 256 bytes: a view into a tensor's storage at another offset is
    copied first, not refused (or silently left bound to the previous call's address)."""
    _, plan_dir, _ = built
    base = torch.randn(5, 8, device="cuda").half()
    view = base[1:]  # 16 bytes into the storage
    assert view.is_contiguous() and view.data_ptr() % 256
    with TensorRTRunner(plan_dir) as runner:
        a, b = runner.infer({"x": view})["y"], runner.infer({"x": view.clone()})["y"]
        torch.cuda.synchronize()
        assert torch.equal(a, b)


def test_one_context_per_stream(built) -> None:
    """Up to max_contexts streams get a context each; a further stream takes over the least recently used
    one (waiting for its last call on the device) and gets the same result."""
    _, plan_dir, _ = built
    x = torch.randn(4, 8, device="cuda").half()
    with TensorRTRunner(plan_dir, max_contexts=2) as runner:
        outs = []
        for s in (torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                outs.append(runner.infer({"x": x}))
        torch.cuda.synchronize()
        assert 1 <= len(runner._contexts) <= 2  # a stream takes an idle context (one whose call is done) first
        assert torch.equal(outs[0]["y"], outs[1]["y"]) and torch.equal(outs[0]["y"], outs[2]["y"])


def test_default_stream_calls_enqueue_on_a_stream_of_their_own(built) -> None:
    """TensorRT adds device-wide synchronizations on the legacy default stream: a caller on it gets its
    thread's own stream (ordered by stream waits), and the same result as a caller on its own stream."""
    _, plan_dir, _ = built
    x = torch.randn(4, 8, device="cuda").half()
    with TensorRTRunner(plan_dir) as runner:
        assert torch.cuda.current_stream().cuda_stream == 0
        on_default = runner.infer({"x": x})["y"].clone()  # the caller's stream waits for the result
        assert 0 not in runner._contexts and len(runner._contexts) == 1
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            on_own = runner.infer({"x": x})["y"]
        torch.cuda.synchronize()
        assert torch.equal(on_default, on_own)


def test_threads_on_two_streams_take_turns_on_a_plan_with_dynamic_inputs(built) -> None:
    """TensorRT: "If the engine supports dynamic shapes, each execution context in concurrent use must use a
    separate optimization profile" (NvInferRuntime.h); a plan holds one. Two threads, each on a stream of its own
    (a context of its own while the other's is busy), calling at shapes that change every call, get what one
    stream gets."""
    import threading

    _, plan_dir, _ = built
    xs = [torch.randn(b, 8, device="cuda").half() for b in (1, 4, 2, 3) * 4]
    with TensorRTRunner(plan_dir) as runner:
        assert runner.serial
        want = [runner.infer({"x": x})["y"] for x in xs]
        torch.cuda.synchronize()
        got: list[torch.Tensor | None] = [None] * len(xs)

        def work(first: int) -> None:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for i in range(first, len(xs), 2):
                    got[i] = runner.infer({"x": xs[i]})["y"]
            stream.synchronize()

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(g is not None for g in got)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
