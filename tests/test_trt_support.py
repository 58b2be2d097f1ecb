"""The TensorRT ONNX operator check: passes a graph of supported ops, names the op that is not supported."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from megactor_rt.export.trt_support import check_trt_ready, scan_ops, trt_op_table, unsupported_ops

F16 = TensorProto.FLOAT16


def _model(nodes: list[onnx.NodeProto], inputs=None, outputs=None, inits=(), opset: int = 17,
           extra_opsets=()) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", F16, [2, 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", F16, [2, 8])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _supported_model() -> onnx.ModelProto:
    w = helper.make_tensor("w", F16, [8, 8], [0.25] * 64)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=-1)]
    return _model(nodes, inits=[w])


def test_table_has_provenance_and_the_ops_megactor_needs() -> None:
    table = trt_op_table()
    assert table["source"]["commit"] == "7c51a63a719180eb5160c874c111746f3fb46a6b"
    assert table["tensorrt_version"].startswith("11.") and table["retrieved"] == "2026-11-25"
    for op in ["Conv", "MatMul", "Softmax", "GroupNormalization", "LayerNormalization", "Resize", "Einsum", "Gelu"]:
        assert table["supported"][op]["fp16"], op
    assert "Unique" in table["unsupported"] and "Unique" not in table["supported"]
    assert table["supported"]["STFT"] == {**table["supported"]["STFT"], "fp32": True, "fp16": False}


def test_supported_graph_passes(tmp_path: Path) -> None:
    model = _supported_model()
    assert unsupported_ops(model) == []
    path = tmp_path / "ok.onnx"
    onnx.save(model, str(path))
    assert check_trt_ready(path) == []


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    model = _supported_model()
    model.graph.node.append(helper.make_node("Unique", ["y"], ["u"], name="dedupe"))
    model.graph.output.append(helper.make_tensor_value_info("u", F16, ["n"]))
    assert unsupported_ops(model) == ["Unique"]
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    problems = check_trt_ready(path)
    assert len(problems) == 1 and "op 'Unique'" in problems[0] and "node 'dedupe'" in problems[0]


def test_custom_domain_op_is_reported() -> None:
    node = helper.make_node("FusedAttention", ["x"], ["y"], domain="com.megactor")
    model = _model([node], extra_opsets=[helper.make_opsetid("com.megactor", 1)])
    assert unsupported_ops(model) == ["com.megactor::FusedAttention"]
    assert "plugin" in scan_ops(model)["com.megactor::FusedAttention"][0]


def test_unsupported_op_inside_a_subgraph_is_found() -> None:
    then_out = helper.make_tensor_value_info("t", F16, [2, 8])
    else_out = helper.make_tensor_value_info("e", F16, [2, 8])
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("MaxUnpool", ["x", "idx"], ["e"], kernel_shape=[2])],
                               "else", [], [else_out])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   inputs=[helper.make_tensor_value_info("x", F16, [2, 8]), cond])
    assert unsupported_ops(model) == ["MaxUnpool"]


def test_precision_matters_for_fp32_only_ops() -> None:
    node = helper.make_node("STFT", ["x", "step"], ["y"])
    step = helper.make_tensor("step", TensorProto.INT64, [], [4])
    fp16 = _model([node], inits=[step])
    assert unsupported_ops(fp16) == ["STFT"]
    assert "no fp16 support" in scan_ops(fp16)["STFT"][0]
    fp32 = _model([node], inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1])],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits=[step])
    assert unsupported_ops(fp32, precision="fp32") == []
    # bool-only ops are precision-neutral
    andm = _model([helper.make_node("And", ["a", "b"], ["y"])],
                  inputs=[helper.make_tensor_value_info(n, TensorProto.BOOL, [2]) for n in "ab"],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.BOOL, [2])])
    assert unsupported_ops(andm) == []
    with pytest.raises(ValueError, match="precision"):
        unsupported_ops(andm, precision="int8")


def test_checker_and_opset_problems_are_reported(tmp_path: Path) -> None:
    broken = _model([helper.make_node("Relu", ["nope"], ["y"])])  # input never produced
    p = tmp_path / "broken.onnx"
    onnx.save(broken, str(p))
    problems = check_trt_ready(p)
    assert any("onnx.checker failed" in x for x in problems), problems

    old = _supported_model()
    old.opset_import[0].version = 8
    p2 = tmp_path / "old.onnx"
    onnx.save(old, str(p2))
    assert any("opset 8 is outside" in x for x in check_trt_ready(p2))

    assert "no such ONNX file" in check_trt_ready(tmp_path / "missing.onnx")[0]
    (tmp_path / "junk.onnx").write_bytes(b"\x01\x02not a model")
    assert "not a loadable ONNX model" in check_trt_ready(tmp_path / "junk.onnx")[0]


def test_nodes_breaking_the_parsers_documented_restrictions_are_named() -> None:
    """The restrictions of operators.md's notes column that a node shows: each flagged, the allowed form not."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    x1 = [helper.make_tensor_value_info("x", F16, [8])]
    ok = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], inputs=x1, inits=[axes])
    assert unsupported_ops(ok) == []
    computed = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Unsqueeze", ["x", "s"], ["y"])],
                      inputs=x1)
    assert "needs it constant" in scan_ops(computed)["Unsqueeze"][0]
    for reduce in ("ReduceSum", "ReduceMax"):  # every Reduce* op: 'axes' (an input from opset 18) an initializer
        fixed = _model([helper.make_node(reduce, ["x", "axes"], ["y"])], inputs=x1, inits=[axes])
        assert unsupported_ops(fixed) == [], reduce
        run_time = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node(reduce, ["x", "s"], ["y"])],
                          inputs=x1)
        assert "needs it constant" in scan_ops(run_time)[reduce][0], reduce
    starts, ends = helper.make_tensor("starts", TensorProto.INT64, [1], [0]), helper.make_tensor(
        "ends", TensorProto.INT64, [1], [4])
    pads = helper.make_tensor("pads", TensorProto.INT64, [2], [1, 1])
    for op, args, inits in (("Slice", ["x", "starts", "ends"], [starts, ends]), ("Pad", ["x", "pads", ""], [pads])):
        fixed = _model([helper.make_node(op, [*args, "axes"], ["y"])], inputs=x1, inits=[*inits, axes])
        assert unsupported_ops(fixed) == [], op  # (TensorRT 10.x: Slice's and Pad's 'axes' an initializer)
        run_time = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Sub", ["s", "s"], ["z"]),
                           helper.make_node(op, [*args, "z"], ["y"])], inputs=x1, inits=inits)
        assert "'axes' is computed at run time; the TensorRT 10.x parser" in scan_ops(run_time)[op][0], op
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    top = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)], inputs=x1, inits=[k])
    assert "sorted=0" in scan_ops(top)["TopK"][0]

    ln_in = [helper.make_tensor_value_info("x", F16, [2, 8])]
    scale = helper.make_tensor("g", F16, [8], [1.0] * 8)
    one = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y"])], inputs=ln_in, inits=[scale])
    assert unsupported_ops(one) == []
    three = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean", "inv"])], inputs=ln_in,
                   inits=[scale])
    assert "supports only Y" in scan_ops(three)["LayerNormalization"][0]

    sizes = helper.make_tensor("sizes", TensorProto.INT64, [2], [4, 16])
    def resize(**attrs: object) -> onnx.ModelProto:
        return _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)], inits=[sizes])
    assert unsupported_ops(resize(mode="nearest", coordinate_transformation_mode="asymmetric",
                                  nearest_mode="floor")) == []
    assert "mode=cubic" in scan_ops(resize(mode="cubic"))["Resize"][0]
    assert "antialias=1" in scan_ops(resize(mode="linear", antialias=1))["Resize"][0]
    assert "tf_crop_and_resize" in scan_ops(resize(coordinate_transformation_mode="tf_crop_and_resize"))["Resize"][0]

    text = _model([helper.make_node("Constant", [], ["c"], value_strings=["a"]), helper.make_node("Relu", ["x"], ["y"])])
    assert "value_strings constant" in scan_ops(text)["Constant"][0]


# ---------------------------------------------------------------------------------------------- TensorRT op check (mutation audit)


def test_an_opset_above_the_parsers_range_is_a_problem(tmp_path: Path) -> None:
    """A graph exported at an opset newer than the TensorRT parser's table goes (e.g. a future default) is
    reported by check-export, not found out minutes into build-engines."""
    import onnx

    from megactor_rt.export.trt_support import check_trt_ready, trt_op_table

    lo, hi = trt_op_table()["opset_range"]
    model = _supported_model()
    model.opset_import[0].version = hi + 1
    onnx.save(model, str(tmp_path / "new.onnx"))
    assert any(f"opset {hi + 1} is outside" in p for p in check_trt_ready(tmp_path / "new.onnx"))
    model.opset_import[0].version = hi
    onnx.save(model, str(tmp_path / "top.onnx"))
    assert check_trt_ready(tmp_path / "top.onnx") == []


def test_a_node_of_unknown_tensor_types_is_checked_at_the_graphs_precision() -> None:
    """Where shape inference cannot type a node's tensors (a >2 GiB graph, ops it does not know), the graph's
    precision decides: an fp32-only op (STFT) in an fp16 graph is still reported."""
    from onnx import helper

    nodes = [helper.make_node("Opaque", ["x"], ["a"], domain="com.x"), helper.make_node("Opaque", ["x"], ["s"], domain="com.x"),
             helper.make_node("STFT", ["a", "s"], ["b"], name="spectrum"),
             helper.make_node("Opaque", ["b"], ["y"], domain="com.x")]
    model = _model(nodes, extra_opsets=[helper.make_opsetid("com.x", 1)])
    from megactor_rt.export.trt_support import scan_ops

    found = scan_ops(model, precision="fp16")
    assert "no fp16 support" in found["STFT"][0] and "spectrum" in found["STFT"][0]
    assert "STFT" not in scan_ops(model, precision="fp32")


def test_a_cumsum_with_a_run_time_axis_is_named() -> None:
    """The parser's note on CumSum: 'axis' must be a build-time constant; a computed one is reported, an
    initializer is not."""
    from onnx import TensorProto, helper

    from megactor_rt.export.trt_support import scan_ops

    x = [helper.make_tensor_value_info("x", F16, [8])]
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    fixed = _model([helper.make_node("CumSum", ["x", "axis"], ["y"])], inputs=x, inits=[axis])
    assert "CumSum" not in scan_ops(fixed)
    computed = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Squeeze", ["s"], ["a"]),
                       helper.make_node("CumSum", ["x", "a"], ["y"])], inputs=x)
    assert "'axis' is computed at run time" in scan_ops(computed)["CumSum"][0]


def test_check_export_names_an_input_of_another_element_type(tmp_path: Path) -> None:
    """A graph file whose input is float16 where the manifest says float32 (a file of the other precision
    under this name) is named by check-export, as build-engines would refuse it."""
    from test_engine import _graph_json, _write_onnx

    from megactor_rt.engine.manifest import load_manifest
    from megactor_rt.export.trt_support import check_against_manifest

    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_decoder.fp32.onnx")  # its input x is float16
    entry = _graph_json("vae_decoder.fp32.onnx", sha, precision="fp32")
    entry["inputs"]["x"]["dtype"] = "float32"
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"vae_decoder_fp32": entry}}))
    graph = load_manifest(d).graphs["vae_decoder_fp32"]
    problems = check_against_manifest(graph)
    assert problems == [f"{graph.path}: input 'x' has element type float16, the manifest says float32"]


# ---------------------------------------------------------------------------------------------- TensorRT op check (mutation audit, second round)


def test_default_domain_nodes_named_ai_onnx_are_not_custom() -> None:
    """The default ONNX domain may be spelled "ai.onnx": such a node is checked against the table like one of
    domain "", not reported as needing a plugin."""
    node = helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")
    assert scan_ops(_model([node])) == {}
    unique = helper.make_node("Unique", ["x"], ["y"], domain="ai.onnx")
    assert "not supported by the TensorRT" in scan_ops(_model([unique]))["Unique"][0]


def test_the_parsers_defaults_and_omitted_inputs_are_not_flagged() -> None:
    """A Reduce* node without its optional 'axes' (an empty input name: reduce over all axes) and a TopK without
    a 'sorted' attribute (the default, 1) are what the parser takes; a ScatterND with a reduction is not."""
    x1 = [helper.make_tensor_value_info("x", F16, [8])]
    all_axes = _model([helper.make_node("ReduceSum", ["x", ""], ["y"])], inputs=x1,
                      outputs=[helper.make_tensor_value_info("y", F16, [1])])
    assert scan_ops(all_axes) == {}
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    top = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], inputs=x1, inits=[k])
    assert "TopK" not in scan_ops(top)
    idx = helper.make_tensor("idx", TensorProto.INT64, [2, 1], [0, 3])
    upd = helper.make_tensor("upd", F16, [2], [1.0, 2.0])

    def scatter(**attrs: object) -> onnx.ModelProto:
        return _model([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], **attrs)], inputs=x1,
                      outputs=[helper.make_tensor_value_info("y", F16, [8])], inits=[idx, upd])

    assert scan_ops(scatter()) == {} and scan_ops(scatter(reduction="none")) == {}
    assert "ScatterND reduction 'add' is unsupported" in scan_ops(scatter(reduction="add"))["ScatterND"][0]


def test_ops_inside_model_local_functions_are_checked_not_the_call() -> None:
    """The parser inlines model-local functions: the call of one (in its own domain) is not a custom op, the
    ops inside it are checked (an unsupported one is named)."""
    def with_function(op: str) -> onnx.ModelProto:
        body = helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node(op, ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)])
        model = _model([helper.make_node("Block", ["x"], ["y"], domain="local")],
                       extra_opsets=[helper.make_opsetid("local", 1)])
        model.functions.append(body)
        return model

    assert scan_ops(with_function("Relu")) == {}
    assert list(scan_ops(with_function("Unique"))) == ["Unique"]


def test_one_line_per_distinct_reason() -> None:
    """Several nodes failing for the same reason give one line (naming the first), not one per node."""
    nodes = [helper.make_node("Unique", ["x"], ["u1"], name="first"), helper.make_node("Unique", ["x"], ["u2"], name="second"),
             helper.make_node("Relu", ["x"], ["y"])]
    found = scan_ops(_model(nodes))
    assert list(found) == ["Unique"] and len(found["Unique"]) == 1 and "node 'first'" in found["Unique"][0]


def test_the_checker_runs_shape_inference_on_graphs_under_2_gib(tmp_path: Path) -> None:
    """Below 2 GiB the checker runs with full_check (strict shape inference): a graph whose shapes cannot
    broadcast is reported before TensorRT finds it."""
    a = helper.make_tensor_value_info("a", F16, [2, 8])
    b = helper.make_tensor_value_info("b", F16, [3, 8])
    model = _model([helper.make_node("Add", ["a", "b"], ["y"])], inputs=[a, b])
    onnx.save(model, str(tmp_path / "bad_shapes.onnx"))
    assert any("onnx.checker failed" in p for p in check_trt_ready(tmp_path / "bad_shapes.onnx"))


def test_a_bool_op_of_unknown_tensor_types_is_precision_neutral(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where shape inference cannot run (a graph over 2 GiB) an op's tensor types may be unknown: an op the
    parser lists for no float type (And: bool only) is then not judged by the graph's precision, while an
    fp32-only op (STFT) in an fp16 graph still is."""
    def too_large(model: onnx.ModelProto) -> onnx.ModelProto:
        raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", too_large)
    nodes = [helper.make_node("Opaque", ["x"], ["a"], domain="com.x"), helper.make_node("Opaque", ["x"], ["b"], domain="com.x"),
             helper.make_node("And", ["a", "b"], ["c"]), helper.make_node("STFT", ["a", "b"], ["s"]),
             helper.make_node("Opaque", ["c", "s"], ["y"], domain="com.x")]
    found = scan_ops(_model(nodes, extra_opsets=[helper.make_opsetid("com.x", 1)]), precision="fp16")
    assert sorted(found) == ["STFT", "com.x::Opaque"] and "no fp16 support" in found["STFT"][0]


def test_check_export_names_an_input_of_another_rank(tmp_path: Path) -> None:
    """A graph file whose input has another rank than the manifest says is named by check-export."""
    from test_engine import _graph_json, _write_onnx

    from megactor_rt.engine.manifest import load_manifest
    from megactor_rt.export.trt_support import check_against_manifest

    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_decoder.fp16.onnx")  # its input x is [batch, 8]
    entry = _graph_json("vae_decoder.fp16.onnx", sha)
    entry["inputs"]["x"]["shape"] = ["batch", 8, 1]
    entry["profiles"] = {"default": {"x": [[1, 8, 1], [2, 8, 1], [4, 8, 1]]}}
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"vae_decoder_fp16": entry}}))
    graph = load_manifest(d).graphs["vae_decoder_fp16"]
    assert check_against_manifest(graph) == [f"{graph.path}: input 'x' has rank 2, the manifest says 3"]


def test_check_export_given_a_graph_file_says_it_takes_the_folder(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``check-export --onnx g.onnx``: the error says --onnx takes the export folder or its manifest.json, naming
    the file given (was: "not a readable JSON manifest: 'utf-8' codec can't decode byte ...")."""
    from megactor_rt.cli import main

    graph = tmp_path / "vae_decoder.fp16.0123456789ab.onnx"
    graph.write_bytes(b"\x08\x09\xd8\xf3 protobuf")
    assert main(["check-export", "--onnx", str(graph)]) == 2
    assert (f"error: {graph}: --onnx takes the export folder (the --out of `megactor-rt export`) or its "
            "manifest.json, not this file") in capsys.readouterr().err


def test_check_export_refuses_profiles_no_run_uses(tmp_path: Path) -> None:
    """Profiles ``check_profiles_cover`` let pass: an empty batch (0/0/0) and more windows per call than
    ``export --window-batch`` allows (100000: was "ready"); min > opt is refused as before."""
    from megactor_rt.config import tiny_config
    from megactor_rt.engine.manifest import GraphEntry, ProfileShapes, TensorSpec
    from megactor_rt.export.onnx_export import export_models
    from megactor_rt.export.trt_support import MAX_WINDOW_BATCH, check_export, check_profile_sizes
    from megactor_rt.weights import build_models

    models = build_models(tiny_config(), seed=0, only={"vae"})
    models.weights_id = "random-tiny-seed0"
    export_models(models, tmp_path, graphs=["vae_decoder"], precisions=("fp32",))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["graphs"]["vae_decoder.fp32"]
    latents = entry["profiles"]["default"]["latents"]
    assert check_export(tmp_path) == {"vae_decoder.fp32": []}
    for batch, problem in (((0, 0, 0), "axis 0 ('batch') has min 0: no run passes an empty tensor"),
                           ((2, 1, 1), "axis 0 ('batch') needs 0 <= min <= opt <= max, got 2/1/1")):
        entry["profiles"]["default"]["latents"] = [[b, *shape[1:]] for b, shape in zip(batch, latents)]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert check_export(tmp_path)["vae_decoder.fp32"] == [
            f"shape profile: profile 'default', input 'latents': {problem}"]

    unet = GraphEntry("temporal_unet.fp16", "u.onnx", "temporal_unet", "fp16", "0" * 64,
                      {"latents": TensorSpec("latents", "float16", ("windows", 9, "frames", 8, 8))}, {},
                      {"default": {"latents": ProfileShapes((1, 9, 1, 8, 8), (MAX_WINDOW_BATCH, 9, 4, 8, 8),
                                                            (100000, 9, 4, 8, 8))}})
    assert check_profile_sizes(unet) == [
        f"profile 'default', input 'latents': axis 0 ('windows') has max 100000, over {MAX_WINDOW_BATCH} "
        f"({MAX_WINDOW_BATCH} windows per call, the most export --window-batch allows)"]


def test_without_onnx_the_checks_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base install has no onnx (the 'onnx' extra): ``check-export`` (and ``export``, which imports this
    module) said "unexpected error: ModuleNotFoundError"; now the module is named with the install line."""
    import importlib
    import sys

    from megactor_rt.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "megactor_rt.export.trt_support", raising=False)
    with pytest.raises(BackendUnavailable, match=r"need the python module onnx.*pip install .*'onnx' extra"):
        importlib.import_module("megactor_rt.export.trt_support")
