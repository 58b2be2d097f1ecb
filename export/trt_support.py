"""Will the TensorRT ONNX parser take this graph? Operator support checked against ``data/trt_onnx_ops.json``.

The JSON is the operator matrix of onnx-tensorrt ``docs/operators.md`` at the commit TensorRT 11.1 ships
(its provenance is in the file). An operator is unsupported when the parser does not list it, when it lives
in a custom domain (TensorRT would need a plugin), when its tensors use a float type the parser does not
list for it (e.g. an fp16 ``STFT``), or when a node breaks a restriction of the table's notes that can be
read off the node (Squeeze/Unsqueeze/ReduceMean axes not constant, LayerNormalization's extra outputs,
string/sparse Constants, Resize modes, ScatterND reductions).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megactor_rt.errors import ONNX_INSTALL, BackendUnavailable

try:
    import onnx
except ImportError as exc:  # a base install (no 'onnx' extra): check-export said "unexpected error"
    raise BackendUnavailable("the ONNX export and its checks need the python module onnx, not installed here: "
                             f"{ONNX_INSTALL}") from exc

if TYPE_CHECKING:
    from megactor_rt.engine.manifest import GraphEntry

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES: dict[int, str] = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
_TWO_GIB = 2 << 30
# Most context windows per UNet call a TensorRT profile may take (``export --window-batch``): the plan holds
# activation memory for its profile's maximum, about K times a window's. An estimate, not a measurement: the
# 7.36 GiB peak of a one-window-per-call run on an H200 (2026-11-27) less the fp16 weights' roughly 4 GiB leaves
# about 3 GiB per CFG window of 16 frames at 512 px, so 64 windows is past what the largest GPU (141 GB) holds at
# full size; at smaller windows or sizes a call of 64 windows is 64 windows' frames, a GPU filled already.
MAX_WINDOW_BATCH = 64


@lru_cache(maxsize=1)
def trt_op_table() -> dict[str, Any]:
    """The committed operator table (``supported``, ``unsupported``, ``opset_range``, provenance)."""
    text = resources.files("megactor_rt.export").joinpath("data/trt_onnx_ops.json").read_text()
    return json.loads(text)


def _walk(graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto],
          seen: set[tuple[str, str]]) -> Iterator[tuple[onnx.NodeProto, onnx.GraphProto | None]]:
    """Every node, recursing into subgraph attributes (If/Loop/Scan) and model-local functions."""
    for node in graph.node:
        fkey = (node.domain, node.op_type)
        if fkey in functions:  # the parser inlines model-local functions
            if fkey not in seen:
                seen.add(fkey)
                for inner in functions[fkey].node:
                    yield from _walk(onnx.helper.make_graph([inner], "f", [], []), functions, seen)
            continue
        yield node, graph
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk(sub, functions, seen)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type, from inputs/outputs/value_info/initializers of all (sub)graphs."""
    with contextlib.suppress(Exception):  # >2 GiB protos or odd graphs: use what the file already says
        model = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}

    def visit(g: onnx.GraphProto) -> None:
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for init in g.initializer:
            types[init.name] = init.data_type
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        types[node.output[0]] = a.t.data_type
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub)

    visit(model.graph)
    return types


def scan_ops(model: onnx.ModelProto | str | Path, precision: str = "fp16") -> dict[str, list[str]]:
    """Unsupported operator -> why (one line per distinct reason, naming an example node).

    Args:
        model: a loaded model or a path (external data is not loaded).
        precision: ``'fp16'`` or ``'fp32'``: used for nodes whose tensor types are unknown.
    """
    if precision not in ("fp16", "fp32", "bf16"):
        raise ValueError(f"precision must be 'fp16', 'fp32' or 'bf16', got {precision!r}")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = trt_op_table()
    supported = table["supported"]
    version = table["tensorrt_version"]
    types = _elem_types(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    graphs = list(all_graphs(model.graph))
    constants = {i.name for g in graphs for i in g.initializer} | \
        {o for g in graphs for n in g.node if n.op_type == "Constant" for o in n.output}
    found: dict[str, list[str]] = {}
    for node, _ in _walk(model.graph, functions, set()):
        label = f"node '{node.name or (node.output[0] if node.output else node.op_type)}'"
        if node.domain not in DEFAULT_DOMAINS:
            op = f"{node.domain}::{node.op_type}"
            reason = f"custom domain '{node.domain}' (needs a TensorRT plugin), e.g. {label}"
        elif node.op_type not in supported:
            op, reason = node.op_type, f"not supported by the TensorRT {version} ONNX parser, e.g. {label}"
        else:
            problem = _precision_problem(node, supported[node.op_type], types, precision, version) \
                or _restriction_problem(node, constants, version)
            if problem is None:
                continue
            op, reason = node.op_type, f"{problem}, e.g. {label}"
        reasons = found.setdefault(op, [])
        if not any(r.split(", e.g.")[0] == reason.split(", e.g.")[0] for r in reasons):
            reasons.append(reason)
    return found


def _precision_problem(node: onnx.NodeProto, entry: dict[str, Any], types: dict[str, int], precision: str,
                       version: str) -> str | None:
    if not any(entry.get(p) for p in ("fp32", "fp16", "bf16")):
        return None  # bool/int/quantized-only ops (And, Not, DequantizeLinear...) are precision-neutral
    known = {types[n] for n in [*node.input, *node.output] if n in types}
    used = sorted({_FLOAT_TYPES[t] for t in known if t in _FLOAT_TYPES})
    if not known:
        used = [precision]
    missing = [p for p in used if not entry.get(p)]
    if missing:
        return f"no {'/'.join(missing)} support in the TensorRT {version} ONNX parser"
    return None


# Restrictions of the operator table's "notes" column that can be read off a node (the parser rejects the
# node otherwise). Keyed by op type; each rule returns a problem or None.
_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _restriction_problem(node: onnx.NodeProto, constants: set[str], version: str) -> str | None:
    """A documented per-node restriction of the TensorRT ONNX parser that ``node`` breaks, or None."""
    op, a = node.op_type, _attrs(node)
    if (op in ("Squeeze", "Unsqueeze") or op.startswith("Reduce")) and len(node.input) > 1 and node.input[1] and \
            node.input[1] not in constants:  # the table's note on every Reduce* op: "axes must be an initializer"
        return f"'axes' is computed at run time; the TensorRT {version} parser needs it constant"
    if op in ("Slice", "Pad") and len(node.input) > 3 and node.input[3] and node.input[3] not in constants:
        # (onnx-tensorrt 10.1's docs/operators.md: "`axes` must be an initializer" for both; the 11.x table has no
        # such note, but TensorRT 10.x is supported too)
        return f"{op}'s 'axes' is computed at run time; the TensorRT 10.x parser needs it constant"
    if op == "CumSum" and len(node.input) > 1 and node.input[1] not in constants:
        return f"CumSum's 'axis' is computed at run time; the TensorRT {version} parser needs it constant"
    if op == "TopK" and not a.get("sorted", 1):
        return f"TopK with sorted=0, which the TensorRT {version} parser does not support"
    if op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        return f"uses the Mean/InvStdDev outputs; the TensorRT {version} parser supports only Y"
    if op == "Constant" and {"sparse_value", "value_string", "value_strings"} & set(a):
        return f"a {sorted({'sparse_value', 'value_string', 'value_strings'} & set(a))[0]} constant, " \
               f"unsupported by the TensorRT {version} parser"
    if op == "Resize":
        rules = (("coordinate_transformation_mode", _RESIZE_COORDS), ("mode", _RESIZE_MODES),
                 ("nearest_mode", _RESIZE_NEAREST), ("keep_aspect_ratio_policy", {"stretch"}))
        bad = [f"{k}={a[k]}" for k, allowed in rules if k in a and a[k] not in allowed]
        if a.get("antialias", 0):
            bad.append("antialias=1")
        if bad:
            return f"Resize with {', '.join(bad)}, which the TensorRT {version} parser does not support"
    if op == "ScatterND" and a.get("reduction", "none") != "none":
        return f"ScatterND reduction '{a['reduction']}' is unsupported by the TensorRT {version} parser"
    return None


def unsupported_ops(model: onnx.ModelProto | str | Path, precision: str = "fp16") -> list[str]:
    """Operator types TensorRT's ONNX parser cannot take, sorted.

    Includes ops inside subgraphs and model-local functions; ops of custom domains are reported as
    ``'domain::OpType'``; ops whose float tensors use a type the parser does not list for them count too.

    Args:
        model: a loaded model or a path to an ``.onnx`` file.
        precision: the graph's precision, used where tensor types cannot be inferred.

    Returns:
        Sorted unique op types; empty when everything is supported.
    """
    return sorted(scan_ops(model, precision))


def _model_bytes(path: Path, model: onnx.ModelProto) -> int:
    """Size of the .onnx file plus its external data files."""
    total = path.stat().st_size
    locations = set()
    for g in all_graphs(model.graph):
        for init in g.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                locations |= {e.value for e in init.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph of its nodes (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from all_graphs(sub)


def check_trt_ready(path: str | Path, precision: str = "fp16") -> list[str]:
    """Problems that would stop TensorRT from parsing an exported graph.

    Runs ``onnx.checker`` (with ``full_check`` shape inference when the model with its weights is under
    2 GiB; by path, without full check, above that), checks the default-domain opset against the parser's
    range, and lists unsupported operators.

    Args:
        path: the ``.onnx`` file (external data next to it).
        precision: the graph's precision.

    Returns:
        Human-readable problems naming the file; empty when the graph looks ready.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such ONNX file"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors have no common base
        return [f"{path}: not a loadable ONNX model: {exc}"]
    problems = []
    try:
        if _model_bytes(path, model) < _TWO_GIB:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError, missing external data
        problems.append(f"{path}: onnx.checker failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}")
    table = trt_op_table()
    lo, hi = table["opset_range"]
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            problems.append(f"{path}: opset {imp.version} is outside the TensorRT {table['tensorrt_version']} "
                            f"parser's range {lo}..{hi}")
    for op, reasons in sorted(scan_ops(model, precision).items()):
        problems += [f"{path}: op '{op}': {r}" for r in reasons]
    return problems


def check_export(onnx_dir: str | Path, precision: str | None = None) -> dict[str, list[str]]:
    """:func:`check_trt_ready` for every graph of an export folder (or those of ``precision``), each graph's
    shape-profile problems (:func:`~megactor_rt.engine.manifest.check_profiles_cover`, :func:`check_profile_sizes`)
    among its own: graph name -> problems (empty: ready).

    Raises:
        ManifestError: no readable manifest.
        InputError: the folder has no graph of ``precision``.
    """
    from megactor_rt.engine.manifest import check_profiles_cover, load_manifest
    from megactor_rt.errors import InputError

    manifest = load_manifest(onnx_dir, validate_profiles=False)
    graphs = sorted((g for g in manifest.graphs.values() if precision in (None, g.precision)), key=lambda g: g.name)
    if not graphs:
        raise InputError(f"{onnx_dir}: the export manifest has no {precision} graphs")
    absent = absent_graphs(manifest.graphs.values(), precision)
    if absent:  # the graphs there may all be ready, and a run still lack its UNet (an export stopped part way)
        logger.warning("%s: the export has no %s graph(s): an export stopped part way (run it again into this "
                       "folder: the graphs there are kept) or one made with --graphs; a run that calls them fails on "
                       "onnxruntime, and the tensorrt backend runs them with its fallback", onnx_dir, ", ".join(absent))
    return {g.name: [f"shape profile: {p}" for p in [*check_profiles_cover(g), *check_profile_sizes(g)]]
            + check_trt_ready(g.path, g.precision) + check_against_manifest(g) for g in graphs}


def absent_graphs(entries: Iterable[GraphEntry], precision: str | None = None) -> list[str]:
    """The graphs of a whole export (:data:`~megactor_rt.export.specs.GRAPH_NAMES`) that ``entries`` lack, as
    ``name.precision``, at ``precision`` or else at each precision ``entries`` hold."""
    from megactor_rt.export.specs import GRAPH_NAMES

    entries = list(entries)
    held = {(g.submodel, g.precision) for g in entries}
    precisions = [precision] if precision else sorted({g.precision for g in entries})
    return [f"{name}.{p}" for name in GRAPH_NAMES for p in precisions if (name, p) not in held]


def check_profile_sizes(g: GraphEntry) -> list[str]:
    """Profile sizes that :func:`~megactor_rt.engine.manifest.check_profiles_cover` lets pass but no run uses: a
    dim below 1 (an empty batch) and more context windows per call than ``export --window-batch`` allows
    (:data:`MAX_WINDOW_BATCH`; a plan holds activation memory for its maximum)."""
    most = {"windows": MAX_WINDOW_BATCH, "pairs": 2 * MAX_WINDOW_BATCH}  # (pairs: [W uncond | W cond])
    problems = []
    for pname, profile in g.profiles.items():
        for name, shapes in profile.items():
            spec = g.inputs.get(name)
            if spec is None or not len(spec.shape) == len(shapes.min) == len(shapes.max):
                continue  # check_profiles_cover reports it
            for axis, dim in enumerate(spec.shape):
                where = f"profile '{pname}', input '{name}': axis {axis}" + (f" ('{dim}')" if isinstance(dim, str)
                                                                                else "")
                if shapes.min[axis] < 1:
                    problems.append(f"{where} has min {shapes.min[axis]}: no run passes an empty tensor")
                elif dim in most and shapes.max[axis] > most[dim]:
                    problems.append(f"{where} has max {shapes.max[axis]}, over {most[dim]} ({MAX_WINDOW_BATCH} "
                                    "windows per call, the most export --window-batch allows)")
    return problems


def check_against_manifest(g: GraphEntry) -> list[str]:
    """Whether the graph file is the one the manifest describes (``build-engines`` refuses one that is not):
    its content hash (with external data) and its inputs' names, element types and ranks."""
    from megactor_rt.engine.cache import sha256_graph

    path = g.path
    if not path.is_file():
        return []  # check_trt_ready reports it
    problems = []
    try:
        digest = sha256_graph(path)
    except OSError as exc:
        return [f"{path}: cannot read it: {exc}"]
    if digest != g.sha256:
        problems.append(f"{path}: its content (with external data) does not match the manifest's sha256: another "
                        "or a damaged file; export again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - check_trt_ready reports an unloadable file
        return problems
    weights = {t.name for t in model.graph.initializer}
    found = {i.name: i for i in model.graph.input if i.name not in weights}
    if set(found) != set(g.inputs):
        problems.append(f"{path}: inputs {sorted(found)} differ from the manifest's {sorted(g.inputs)}")
    for name, spec in g.inputs.items():
        i = found.get(name)
        if i is None:
            continue
        kind = i.type.tensor_type
        try:
            elem = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name  # float16, float32, int64, ...
        except (KeyError, ValueError):
            elem = onnx.TensorProto.DataType.Name(kind.elem_type)
        if elem != spec.dtype:
            problems.append(f"{path}: input '{name}' has element type {elem}, the manifest says {spec.dtype}")
        if len(kind.shape.dim) != len(spec.shape):
            problems.append(f"{path}: input '{name}' has rank {len(kind.shape.dim)}, the manifest says "
                            f"{len(spec.shape)}")
    return problems
