"""The one export function: spec + models -> ONNX (fp32, and fp16 derived from it) + manifest entry.

Idempotent: each graph file is named by a content key (weights id, spec, opset, precision, exporter
version); a re-run whose key matches the manifest and whose file hash still matches reuses the file.
Graphs over protobuf's 2 GB limit keep their weights in ``<file>.data`` (external data).

fp16 graphs (TensorRT 11 networks are strongly typed: an fp16 engine needs an fp16 graph) are derived from
the fp32 export with onnxruntime's float16 converter: weights and activations in fp16, while normalisation
(GroupNorm/LayerNorm statistics), softmax and the sinusoidal timestep embedding stay fp32 with casts
around them.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megactor_rt.config import ModelConfig, full_config, tiny_config
from megactor_rt.engine.cache import external_data_path, sha256_graph
from megactor_rt.engine.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from megactor_rt.errors import ONNX_INSTALL, BackendUnavailable, InputError, ResourceError
from megactor_rt.export.specs import TRACE, ExportSpec, export_specs
from megactor_rt.files import (
    UNHELD_S,
    hold,
    let_go,
    locked,
    not_writable,
    remove_stale,
    replace_synced,
    umask_mode,
    unwritable,
)
from megactor_rt.progress import progress
from megactor_rt.weights import (
    MegActorModels,
    build_models,
    check_image_size,
    converted_config,
    load_converted,
    resized,
)

logger = logging.getLogger(__name__)

EXPORTER_VERSION = 1
EXTERNAL_DATA_BYTES = 1_800_000_000  # keep well under protobuf's 2 GiB
KEY_CHARS = 12  # of the export key in a graph file's name: <graph>.<precision>.<key[:12]>.onnx
STAGING_PREFIX = ".export-"  # each graph is written in such a folder inside the export folder, then moved
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "ReduceMean",
            "Pow", "Sqrt", "Erf"]


GRAPH_MODULES = {"clip_image_encoder": "clip_image_encoder", "vae_encoder": "vae", "vae_decoder": "vae",
                 "reference_net": "reference_net", "pose_guider": "temporal_unet", "pose_guider_film": "temporal_unet",
                 "token_kv": "temporal_unet", "temporal_unet": "temporal_unet", "temporal_unet_cond": "temporal_unet",
                 "temporal_unet_reuse": "temporal_unet", "temporal_unet_cond_reuse": "temporal_unet"}


def _random(weights: str | Path) -> bool:
    """``tiny`` / ``full`` name random-weight architectures, unless a folder of that name exists (then it is the
    converted weights folder it names, as any other path)."""
    random = str(weights) in ("tiny", "full") and not Path(weights).exists()
    if str(weights) in ("tiny", "full") and not random:
        logger.info("--weights %s: using the folder ./%s (not the random-weight %s architecture)", weights,
                    weights, weights)
    return random


def load_models_for_export(weights: str | Path, graphs: Sequence[str] | None = None) -> MegActorModels:
    """A converted weights folder, or ``tiny`` / ``full`` for random-weight architectures (seeded; only the
    networks ``graphs`` need are built)."""
    if _random(weights):
        only = None if graphs is None else {GRAPH_MODULES[g] for g in graphs if g in GRAPH_MODULES}
        models = build_models(tiny_config() if str(weights) == "tiny" else full_config(), seed=0, only=only)
        models.weights_id = f"random-{weights}-seed0"
        return models
    return load_converted(weights)


def model_config_of(weights: str | Path) -> ModelConfig:
    """The model config of a converted weights folder, or of ``tiny`` / ``full`` (no weights read)."""
    if _random(weights):
        return tiny_config() if str(weights) == "tiny" else full_config()
    return converted_config(weights)[0]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the code a graph is traced from and converted by (the networks' modules, ``megactor_rt/models``;
    the kernels' PyTorch references they call when traced, ``kernels/``; the model config; this export package):
    a changed network or export step makes new graphs, where a fixed version number had to be remembered (a
    random-weight export, ``tiny``/``full``, has the same weights id in every version)."""
    import megactor_rt.config as config_module
    import megactor_rt.kernels as kernels_pkg
    import megactor_rt.models as models_pkg

    files = [Path(config_module.__file__)]
    for package in (models_pkg, kernels_pkg):
        files += sorted(Path(str(package.__file__)).parent.glob("*.py"))
    files += sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def export_key(spec: ExportSpec, weights_id: str, opset: int, precision: str, fp16_softmax: bool = False) -> str:
    """What the graph file's content depends on. Not the shape profiles: they are manifest data for TensorRT
    (an export for another ``--window``/``--window-batch`` reuses the files and rewrites the profiles), except
    through the sizes the sample is traced at."""
    traced = [spec.concrete(t.shape, "default", TRACE) for t in spec.inputs]  # as _torch_export traces
    desc = {"weights": weights_id, "name": spec.name, "inputs": [t.__dict__ for t in spec.inputs],
            "outputs": [t.__dict__ for t in spec.outputs], "traced": traced, "opset": opset,
            "precision": precision, "exporter": EXPORTER_VERSION, "torch": torch.__version__, "code": code_digest()}
    if precision == "fp16":  # the fp16 graphs come from onnxruntime's float16 converter
        desc["onnxruntime"] = _ort_version()
    if fp16_softmax and precision == "fp16":
        desc["fp16_softmax"] = True
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:  # exporting fp16 needs it (to_fp16 says so); the key is made before that
        return "none"


def export_all(weights: str | Path, out: str | Path, *, opset: int = 18, precisions: Sequence[str] = ("fp32", "fp16"),
               frames: int = 16, graphs: Sequence[str] | None = None, window_batch: int = 1,
               fp16_softmax: bool = False, image_size: int | None = None) -> list[dict]:
    """Export every graph (or ``graphs``) at every precision into ``out`` and write ``out/manifest.json``.
    ``frames`` / ``window_batch``: the window length and the windows per UNet call the TensorRT profiles target.
    ``fp16_softmax``: the fp16 graphs compute their attention softmax in fp16 too (see :func:`to_fp16`).
    ``image_size``: the portrait crop side the graphs take (default: the weights' own; see ``animate --size``).

    Returns:
        One summary row per graph x precision: graph, precision, file, size_mb, seconds, status.
    """
    check_export_modules(precisions)  # before the networks load
    if image_size is not None:  # a size the networks cannot take: before they are loaded
        check_image_size(model_config_of(weights), image_size)
    models = resized(load_models_for_export(weights, graphs), image_size)
    return export_models(models, out, opset=opset, precisions=precisions, frames=frames, graphs=graphs,
                         window_batch=window_batch, fp16_softmax=fp16_softmax)


def check_export_size(out: str | Path, image_size: int, weights_size: int, replaced: Sequence[str]) -> None:
    """Refuse an export at ``image_size`` into a folder holding graphs of another size that it does not replace
    (``replaced``: the manifest keys it writes, ``<graph>.<precision>``): one folder holds one size.

    Raises:
        InputError: naming the graphs left at the other size; or the folder's ``manifest.json`` is none an export
            may replace (see :func:`_read_manifest`): before any work.
    """
    graphs = _read_manifest(Path(out), warn=False)["graphs"] if Path(out).is_dir() else {}
    stale = sorted(k for k, e in graphs.items() if (e.get("image_size") or weights_size) != image_size
                   and k not in replaced)
    if stale:
        sizes = sorted({graphs[k].get("image_size") or weights_size for k in stale})
        raise InputError(f"{out}: holds graphs exported at {', '.join(map(str, sizes))} px that this export at "
                         f"{image_size} px would not replace ({', '.join(stale)}); export into another folder, or "
                         "export those graphs too")


OPSETS = (17, 20)  # checked: all 22 tiny graphs export and pass check-export at 17 and at 20 (default 18)


def check_export_modules(precisions: Sequence[str]) -> None:
    """Raise ``BackendUnavailable`` before any work where a module the export needs is not installed: onnx (each
    graph is loaded, checked and saved with it) and, for fp16 graphs, onnxruntime (its float16 converter makes
    them). A base install has neither (the ``onnx`` extra): the export wrote its fp32 graph and then stopped with an
    "unexpected error: ModuleNotFoundError"."""
    import importlib.util

    need = {"onnx": "every graph is checked and saved with it"}
    if "fp16" in precisions:
        need["onnxruntime"] = "its float16 converter makes the fp16 graphs"
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        alone = " - or export fp32 graphs alone (--precision fp32)" if missing == ["onnxruntime"] else ""
        raise BackendUnavailable("the ONNX export needs python module(s) not installed here: "
                                 f"{'; '.join(f'{m} ({need[m]})' for m in missing)}; {ONNX_INSTALL}{alone}")


def check_opset(opset: int) -> None:
    """Raise ``InputError`` for an opset outside :data:`OPSETS` (below 17 LayerNormalization and attention
    decompose or fail to export; above 20 torch's TorchScript exporter stops)."""
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise InputError(f"--opset {opset}: the export supports opsets {OPSETS[0]} to {OPSETS[1]} (default 18)")


def export_models(models: MegActorModels, out: str | Path, *, opset: int = 18,
                  precisions: Sequence[str] = ("fp32", "fp16"), frames: int = 16,
                  graphs: Sequence[str] | None = None, window_batch: int = 1,
                  fp16_softmax: bool = False) -> list[dict]:
    """``export_all`` for already-loaded models."""
    check_opset(opset)
    check_export_modules(precisions)
    out = Path(out)
    specs = [s for s in export_specs(models.config, window=frames, window_batch=window_batch)
             if graphs is None or s.name in graphs]
    if graphs is not None and len(specs) != len(set(graphs)):
        known = [s.name for s in export_specs(models.config)]
        unknown = sorted(set(graphs) - set(known))
        hint = " (the tiny_decoder graph comes from --tiny-decoder PATH)" if "tiny_decoder" in unknown else ""
        raise InputError(f"unknown graph(s) {', '.join(unknown)}{hint}; known: {', '.join(known)}")
    if not out.is_dir():
        check_writable(out, "the export folder is to be made")
    out.mkdir(parents=True, exist_ok=True)  # once the graphs are known: a typo leaves no empty folder
    return _export_specs(specs, models, out, opset, precisions, fp16_softmax)


def check_writable(out: Path, why: str) -> None:
    """Refuse, once something must be written into the export folder ``out`` (``why``: what), a folder this user
    may not write: before the graph's work, and only then (an export whose graphs are all there already, cached,
    writes nothing, and runs in a folder it may only read).

    Raises:
        InputError: naming the folder, what blocks it and what was to be written.
    """
    blocked = unwritable(out)
    if blocked is not None:
        raise InputError(f"{out}: the export folder (--out) cannot be written ({not_writable(blocked)}), and "
                         f"{why}; nothing was written: export into a folder you may write")


def export_tiny_decoder(path: str | Path, config: ModelConfig, out: str | Path, *, opset: int = 18,
                        precisions: Sequence[str] = ("fp32", "fp16")) -> list[dict]:
    """Export TAESD's decoder from ``path`` (a ``--tiny-decoder`` file or folder) as the ``tiny_decoder`` graph
    beside the other graphs of ``config``'s size; its ``weights_id`` is the weights file's (see
    :func:`~megactor_rt.models.tiny_decoder.tiny_decoder_id`), so a run with another file does not use it.

    Raises:
        WeightsError: missing or wrong weights.
    """
    from megactor_rt.export.specs import TinyDecoderModels, tiny_decoder_spec
    from megactor_rt.models.tiny_decoder import load_tiny_decoder, tiny_decoder_id

    check_opset(opset)
    check_export_modules(precisions)
    models = TinyDecoderModels(config, tiny_decoder_id(path), load_tiny_decoder(path))
    out = Path(out)
    if not out.is_dir():
        check_writable(out, "the export folder is to be made")
    out.mkdir(parents=True, exist_ok=True)
    return _export_specs([tiny_decoder_spec(config)], models, out, opset, precisions)


def _export_specs(specs: Sequence[ExportSpec], models: Any, out: Path, opset: int, precisions: Sequence[str],
                  fp16_softmax: bool = False) -> list[dict]:
    manifest = _read_manifest(out)  # (first: a manifest.json that is not the export's is refused before any change)
    # staging folders of exports killed midway (SIGKILL, the OOM killer: GBs at full size): at once where no export
    # holds them (export_graph does while it writes), else after an hour untouched
    remove_stale(out, f"{STAGING_PREFIX}*", folders=True, unheld_s=UNHELD_S)
    remove_stale(out, f"{STAGING_PREFIX}*.inferred.onnx")  # earlier versions' fp16 conversions, killed midway
    remove_stale(out, f"{glob.escape(MANIFEST_NAME)}.*.tmp")
    rows = []
    for spec in progress(specs, desc="export", unit="graph", leave=True):
        fp32_path = None
        for precision in sorted(set(precisions), key=lambda p: p != "fp32"):  # fp32 first: fp16 derives from it
            t0 = time.perf_counter()
            entry, status = export_graph(spec, models, out, opset, precision, manifest, fp32_path,
                                         fp16_softmax=fp16_softmax)
            if precision == "fp32":
                fp32_path = out / entry["file"]
            key = f"{spec.name}.{precision}"
            if manifest["graphs"].get(key) != entry:  # (a cached graph its manifest names as it is: nothing to
                # write, so that an export whose graphs are all there runs in a folder this user may only read)
                check_writable(out, f"its manifest's entry of {key} is to change ({status})")
                manifest["graphs"][key] = entry
                _update_manifest(out, key, entry)
            _remove_stale(out, spec.name, precision, keep=entry["file"])  # once the manifest names the new file
            size = sum(p.stat().st_size for p in (out / entry["file"], external_data_path(out / entry["file"]))
                       if p.is_file())
            rows.append({"graph": spec.name, "precision": precision, "file": entry["file"],
                         "size_mb": size / 1e6, "seconds": time.perf_counter() - t0, "status": status})
    return rows


def export_graph(spec: ExportSpec, models: Any, out: Path, opset: int, precision: str,
                 manifest: dict, fp32_path: Path | None = None, *, fp16_softmax: bool = False) -> tuple[dict, str]:
    """Export one graph at one precision (reusing a matching earlier export). Returns (entry, status).

    Raises:
        ResourceError: the graph cannot be written (a full disk), naming its file.
    """
    fp16_softmax = fp16_softmax and precision == "fp16"
    key = export_key(spec, models.weights_id, opset, precision, fp16_softmax)
    name = f"{spec.name}.{precision}.{key[:KEY_CHARS]}.onnx"
    old = manifest["graphs"].get(f"{spec.name}.{precision}")
    # (.get: an entry edited by hand may lack a field, and was "unexpected error: KeyError: 'sha256'")
    if old and old.get("export_key") == key and (out / name).is_file() and \
            sha256_graph(out / name) == old.get("sha256"):
        # the entry as this export describes the graph, not as the manifest does: an entry edited or damaged by
        # hand (an input's dtype or shape, its submodel) was kept as "cached", and the runs it broke asked for the
        # export that kept it (a graph of no image size, CLIP's or the FiLM code's, is the same at every size: it is
        # labelled with this export's, or a folder exported again at another size held graphs "of two sizes")
        entry = _entry(spec, models, name, precision, old["sha256"], key, opset, fp16_softmax)
        fresh = json.loads(json.dumps(entry))
        if {**fresh, "profiles": None, "image_size": None} != {**old, "profiles": None, "image_size": None}:
            logger.warning("%s: the manifest's entry of %s.%s is not what this export describes (edited?); it is "
                           "written again", out / MANIFEST_NAME, spec.name, precision)
            return entry, "cached, manifest entry rewritten"
        # (the graph is the same; its shape profile may not be: --window-batch)
        return entry, "cached" if fresh["profiles"] == old.get("profiles") else "cached, profile updated"
    check_writable(out, f"{spec.name}.{precision} is not exported there yet")  # (before minutes of tracing)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=STAGING_PREFIX) as tmp, _held(Path(tmp)):
            src = fp32_path if (precision == "fp16" and fp32_path is not None) else None
            if src is None:
                src = Path(tmp) / "fp32.onnx"
                _torch_export(spec, models, src, opset)
            if precision == "fp16":
                inferred = Path(tmp) / "inferred.onnx"  # (in the staging folder: gone with it, however this ends)
                try:
                    _infer_shapes(src, inferred)
                    model = to_fp16(_load(inferred, weights_from=src.parent), spec, fp16_softmax=fp16_softmax)
                finally:
                    inferred.unlink(missing_ok=True)  # at once: a copy of the fp32 graph, GBs at full size
            else:
                model = _load(src)
            _save(model, out / name, Path(tmp))
    except OSError as exc:  # a full disk or quota: the full-size graphs take GBs (the staging folder is gone)
        raise ResourceError(f"{out / name}: cannot write the graph ({exc}); nothing was written under this "
                            "name") from exc
    return _entry(spec, models, name, precision, sha256_graph(out / name), key, opset, fp16_softmax), "exported"


def _entry(spec: ExportSpec, models: Any, name: str, precision: str, sha256: str, key: str, opset: int,
           fp16_softmax: bool) -> dict:
    """The manifest entry of the graph file ``name`` (hash ``sha256``) exported from ``spec`` at ``precision``."""
    entry = {"file": name, "submodel": spec.submodel, "precision": precision, "sha256": sha256,
             "export_key": key, "weights_id": models.weights_id, "image_size": models.config.image_size, "opset": opset,
             "inputs": {t.name: {"dtype": _dtype(t.name, spec, precision), "shape": list(t.shape)}
                        for t in spec.inputs},
             "outputs": {t.name: {"dtype": "float16" if precision == "fp16" else "float32", "shape": list(t.shape)}
                         for t in spec.outputs},
             "profiles": spec.profiles()}
    if fp16_softmax:
        entry["fp16_softmax"] = True
    return entry


@contextlib.contextmanager
def _held(staging: Path) -> Iterator[None]:
    """Hold the staging folder while a graph is written into it (:func:`~megactor_rt.files.hold`), so that another
    export into the folder removes it at once if this process dies (SIGKILL) and never while it lives."""
    fd = hold(staging)
    try:
        yield
    finally:
        let_go(fd)


def _dtype(name: str, spec: ExportSpec, precision: str) -> str:
    return "float16" if precision == "fp16" and name not in spec.keep_fp32 else "float32"


def _torch_export(spec: ExportSpec, models: Any, path: Path, opset: int) -> None:
    module = spec.build(models).eval()
    sample = spec.sample_inputs(which=TRACE)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, sample, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def _infer_shapes(src: Path, dst: Path) -> None:
    """Value types of every tensor (the fp16 converter needs them to place its casts); path-based so
    graphs over 2 GB work. ``dst`` keeps ``src``'s relative external-data paths: load it with
    ``weights_from=src.parent``."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(src), str(dst))


def _load(path: Path, weights_from: Path | None = None):  # noqa: ANN202 - onnx imported lazily
    """The graph at ``path`` with its external data, read from ``weights_from`` (default: its own folder)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    load_external_data_for_model(model, str(weights_from or path.parent))
    return model


def _save(model, path: Path, staging: Path) -> None:  # noqa: ANN001
    """Write into the folder ``staging`` (on the same file system; external data beside the graph when large),
    check, then rename into place: the external data first, then the graph. An earlier file of the same name
    and its data are replaced whole, never appended to."""
    import onnx

    tmp = staging / path.name
    data = external_data_path(path)
    size = _proto_bytes(model)
    large = size is None or size > EXTERNAL_DATA_BYTES
    if large:
        # onnx's own location= check looks for an existing file relative to the working directory, not the
        # graph's folder: mark the tensors with a generated name, then point them at data.name in staging
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, size_threshold=1024)
        for tensor in _external_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, str(tmp))
    else:
        onnx.save_model(model, str(tmp))
    onnx.checker.check_model(str(tmp))
    if large:  # (each on disk before its final name, as every result: a power loss leaves no empty graph)
        # onnx creates the data file 0600: readable to the graph's readers (another user, a service account) too
        os.chmod(external_data_path(tmp), umask_mode())
        replace_synced(external_data_path(tmp), data)
    else:
        data.unlink(missing_ok=True)
    replace_synced(tmp, path)


def _external_tensors(model):  # noqa: ANN001, ANN202
    """The initializers of ``model``'s graph and its subgraphs that are stored as external data."""
    from onnx import TensorProto

    from megactor_rt.export.trt_support import all_graphs

    return [t for g in all_graphs(model.graph) for t in g.initializer if t.data_location == TensorProto.EXTERNAL]


def _proto_bytes(model) -> int | None:  # noqa: ANN001
    """Serialized size, or None when the model is over protobuf's 2 GiB limit."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except (EncodeError, ValueError):
        return None


def to_fp16(model, spec: ExportSpec, *, fp16_softmax: bool = False):  # noqa: ANN001, ANN201
    """fp32 graph -> fp16 graph, keeping normalisation/softmax and the timestep embedding in fp32.

    ``fp16_softmax``: Softmax in fp16 as well (no Cast between the attention's two matrix multiplies), the
    form TensorRT's fused-attention pattern and NVIDIA's own fp16 diffusion exports have; whether
    TensorRT fuses the default form (fp16 matmuls around an fp32 softmax) in a strongly typed network is
    unverified here (docs/decisions.md)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = timestep_nodes(model) if "timestep" in spec.keep_fp32 else []
    keep += constants_of(model, keep)  # the embedding's frequencies: fp32 as the products they make
    # the converter's own list (ops without fp16 kernels: Range, CumSum, TopK, ...) applies only when no list is
    # given, so it is joined to ours
    block = sorted({op for op in FP32_OPS if not (fp16_softmax and op == "Softmax")} | set(DEFAULT_OP_BLOCK_LIST))
    model = convert_float_to_float16(model, keep_io_types=list(spec.keep_fp32), op_block_list=block,
                                     node_block_list=keep, disable_shape_infer=True)
    drop_fp16_round_trips(model)
    OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end
    return model


def drop_fp16_round_trips(model) -> int:  # noqa: ANN001
    """Remove the converter's float32 -> float16 -> float32 Cast pairs between two nodes it keeps in fp32: the
    consumer reads the float32 value itself. The converter casts every output of a kept node to fp16 and every
    input back, also between kept nodes, so that the timestep embedding's sinusoid arguments (``t * freq``, up to
    ~999) were rounded to fp16 before ``Sin``/``Cos`` (half a radian apart at 999: the embedding off by up to
    ~0.25) although the graph "keeps it in fp32". Only the pairs whose source is float32 (a round trip of an
    integer or an fp16 value is no loss, and its source has another type). Returns the pairs removed."""
    from onnx import TensorProto

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node, to: int) -> bool:  # noqa: ANN001
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    rename: dict[str, str] = {}
    pairs = []
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if first is not None and cast_to(node, TensorProto.FLOAT) and cast_to(first, TensorProto.FLOAT16) and \
                types.get(first.input[0]) == TensorProto.FLOAT and node.output[0] not in outputs:
            rename[node.output[0]] = first.input[0]
            pairs += [node, first]

    def source(name: str) -> str:  # (a value that rounds through fp16 twice in a row)
        while name in rename:
            name = rename[name]
        return name

    for node in graph.node:
        node.input[:] = [source(i) for i in node.input]
    seconds = {id(n) for n in graph.node if n.output[0] in rename}
    used = {i for n in graph.node if id(n) not in seconds for i in n.input} | outputs  # (not the casts removed)
    dead = {id(n): n for n in pairs if n.output[0] not in used}
    for node in dead.values():  # the second casts, and the first ones nothing else reads
        graph.node.remove(node)
    gone = {n.output[0] for n in dead.values()}
    kept_info = [v for v in graph.value_info if v.name not in gone]  # (no types of values no longer made)
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return len(rename)


def timestep_nodes(model) -> list[str]:  # noqa: ANN001
    """Nodes between the ``timestep`` input and the first Gemm/MatMul (the sinusoidal embedding)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = ["timestep"], set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen or node.op_type in ("Gemm", "MatMul"):
                continue
            seen.add(node.name)
            frontier.extend(node.output)
    return sorted(seen)


def constants_of(model, names: Sequence[str]) -> list[str]:  # noqa: ANN001
    """The Constant nodes that feed the nodes ``names`` and nothing else: the converter turns a Constant's value to
    fp16 unless the Constant itself is kept (the timestep embedding's frequencies were, then cast back to fp32:
    ``t * freq`` off by up to ``999 * freq * 2**-11``, half a radian)."""
    kept = set(names)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    return sorted(n.name for n in model.graph.node if n.op_type == "Constant" and n.name not in kept and
                  all(readers.get(o) and readers[o] <= kept for o in n.output))


def _remove_stale(out: Path, name: str, precision: str, keep: str) -> None:
    """Delete the graph files (and their external data) of ``name`` at ``precision`` other than ``keep``: earlier
    exports of it under other keys. Only names of the export's own form (the key's hex digits): a file of the
    user's beside them (``pose_guider.fp16.simplified.onnx``) stays."""
    own = re.compile(rf"{re.escape(name)}\.{re.escape(precision)}\.[0-9a-f]{{{KEY_CHARS}}}\.onnx")
    for p in out.glob(f"{glob.escape(name)}.{glob.escape(precision)}.*.onnx"):
        if p.name != keep and own.fullmatch(p.name):
            try:
                p.unlink()
                external_data_path(p).unlink(missing_ok=True)
            except OSError as exc:  # (a folder this user may only read: the manifest names the graph kept)
                logger.warning("%s: an earlier export of %s (%s) cannot be removed (%s); the manifest names %s",
                               p, name, precision, exc, keep)


def _read_manifest(out: Path, *, warn: bool = True) -> dict:
    """The folder's manifest as written by an export (graph name -> entry); a new one where there is none, or where
    it is empty or an export's manifest of this format or an older one that is malformed (with a warning unless
    ``warn`` is false: its graphs are exported again).

    Raises:
        InputError: ``manifest.json`` there is no export manifest (another program's, a folder), is one of a newer
            format, or cannot be read: the export, which replaces it, would lose it.
    """
    path = out / MANIFEST_NAME
    new = {"format": MANIFEST_FORMAT, "graphs": {}}
    if not path.exists():
        return new
    if not path.is_file():
        raise InputError(f"{path}: is not a file; the export writes its manifest under this name: export into "
                         "another folder, or move it away")
    try:
        text = path.read_text()
        data = json.loads(text) if text.strip() else new
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # (exports replace it whole: never half-written)
        raise InputError(f"{path}: is not an export manifest (not JSON: {exc}); the export would replace it: "
                         "export into another folder, or move it away") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the export manifest ({exc})") from exc
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, int) or isinstance(fmt, bool) or "graphs" not in data:  # a web app's manifest.json...
        raise InputError(f"{path}: is not an export manifest (no 'format' and 'graphs'); the export would replace "
                         "it: export into another folder, or move it away")
    if fmt > MANIFEST_FORMAT:
        raise InputError(f"{path}: is an export manifest of format {fmt}, newer than this megactor-rt's "
                         f"({MANIFEST_FORMAT}): export with the megactor-rt that wrote it, or into another folder")
    graphs = data["graphs"]
    if fmt == MANIFEST_FORMAT and isinstance(graphs, dict) and all(isinstance(e, dict) for e in graphs.values()):
        return data
    if warn:
        logger.warning("%s is an export manifest that this export cannot extend (empty, malformed or of an older "
                       "format than %s); starting a new manifest", path, MANIFEST_FORMAT)
    return new


def _update_manifest(out: Path, key: str, entry: dict) -> None:
    """Set one graph's entry in the folder's manifest: read, change and replaced under a lock, so exports of other
    graphs into the same folder at the same time keep theirs."""
    with locked(out / f".{MANIFEST_NAME}.lock"):  # hidden, as the plan folders' .build.lock
        manifest = _read_manifest(out, warn=False)  # (the export warned where it started a new one)
        manifest["graphs"][key] = entry
        tmp = out / f"{MANIFEST_NAME}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(manifest, indent=1))
            replace_synced(tmp, out / MANIFEST_NAME)  # (as its graphs are: _save)
        except OSError as exc:  # a full disk: the manifest stays as it was, naming the graphs it named
            raise ResourceError(f"{out / MANIFEST_NAME}: cannot write the export manifest ({exc}); it was left as "
                                "it was") from exc
        finally:
            tmp.unlink(missing_ok=True)
