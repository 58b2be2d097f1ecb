"""The export manifest (``<onnx_dir>/manifest.json``): load, validate, and check TensorRT shape profiles.

The export step writes one manifest per ONNX directory::

    {"format": 1, "graphs": {"<graph name>": {
        "file": "temporal_unet_cond.fp16.<export key, 12 hex>.onnx", "submodel": "temporal_unet",
        "precision": "fp16", "sha256": "<hex of the .onnx bytes and its external data>",
        "export_key": "<hex: weights, code, config, size, precision, opset>", "weights_id": "<the weights' id>",
        "image_size": 512, "opset": 18,
        "inputs":  {"<name>": {"dtype": "float16", "shape": ["windows", 9, "frames", 64, 64]}},  # str = dynamic
        "outputs": {"<name>": {"dtype": ..., "shape": [...]}},
        "profiles": {"default": {"<input name>": [[min], [opt], [max]]}}}}}

This module only reads JSON; it never imports onnx or TensorRT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megactor_rt.config import Precision
from megactor_rt.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SUBMODELS = ("clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider", "pose_guider_film",
             "token_kv", "temporal_unet", "temporal_unet_cond", "temporal_unet_reuse", "temporal_unet_cond_reuse", "tiny_decoder")
DTYPES = ("float16", "float32", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

Dim = int | str  # int = static, str = named dynamic dim
Shape = tuple[int, ...]


class ManifestError(InputError):
    """The export manifest is missing, malformed, or inconsistent with the ONNX files next to it."""


ENGINE_PRECISIONS = (Precision.FP16, Precision.FP32)
"""Precisions of exported graphs and engines. TensorRT 11 networks are strongly typed: the ONNX graph carries
the precision (bf16 runs on the torch backend only)."""


def parse_precision(value: str | Precision) -> Precision:
    """``value`` as an engine precision; raises ``InputError`` naming the allowed ones."""
    try:
        precision = Precision(value)
    except ValueError:
        precision = None
    if precision not in ENGINE_PRECISIONS:
        raise InputError(f"unknown precision '{getattr(value, 'value', value)}'; expected one of "
                         f"{[p.value for p in ENGINE_PRECISIONS]}")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype name (``float16``...) and shape (str = dynamic dim)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def dynamic_dims(self) -> dict[int, str]:
        """Axis -> dim name of every dynamic axis."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ProfileShapes:
    """min/opt/max shape of one input in one optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def as_lists(self) -> list[list[int]]:
        return [list(self.min), list(self.opt), list(self.max)]


@dataclass(frozen=True)
class GraphEntry:
    """One exported ONNX graph of the manifest."""

    name: str
    file: str
    submodel: str
    precision: str
    sha256: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    profiles: dict[str, dict[str, ProfileShapes]]
    root: Path = field(default=Path("."), compare=False)
    weights_id: str | None = None  # the converted weights the graph was exported from (None: not recorded)
    image_size: int | None = None  # the portrait crop side the graph takes (None: not recorded, the weights' own)

    @property
    def path(self) -> Path:
        """Absolute path of the ``.onnx`` file (external data, if any, lies next to it)."""
        return self.root / self.file

    def profile(self, name: str) -> dict[str, ProfileShapes]:
        """The shapes of profile ``name``; raises ``ManifestError`` listing the known profiles."""
        if name not in self.profiles:
            raise ManifestError(f"graph '{self.name}' has no profile '{name}'; known: {sorted(self.profiles)}")
        return self.profiles[name]


@dataclass(frozen=True)
class Manifest:
    """All graphs of one ONNX export directory."""

    path: Path
    format: int
    graphs: dict[str, GraphEntry]

    @property
    def root(self) -> Path:
        return self.path.parent

    def image_sizes(self, default: int) -> dict[int, list[str]]:
        """Image size -> the graphs exported at it (``default``, the weights' own size, where an entry does not
        record one: exports before ``export --size``)."""
        sizes: dict[int, list[str]] = {}
        for name, g in sorted(self.graphs.items()):
            sizes.setdefault(g.image_size or default, []).append(name)
        return sizes

    def export_size(self, default: int, image_size: int | None = None) -> int:
        """The portrait crop side the graphs take (``export --size``; ``default``, the weights' own size, where
        not recorded).

        Raises:
            ManifestError: the graphs were exported at different sizes, or ``image_size`` is given and is not
                theirs.
        """
        sizes = self.image_sizes(default)
        if len(sizes) > 1:
            listing = "; ".join(f"{size} px: {', '.join(names)}" for size, names in sorted(sizes.items()))
            raise ManifestError(f"{self.root}: its graphs were exported at different sizes ({listing}); export them "
                                "all at one size (megactor-rt export --size PX), or into separate folders")
        (size,) = sizes
        if image_size is not None and image_size != size:
            raise ManifestError(f"image_size (--size) {image_size}: the graphs in {self.root} were exported at {size} "
                                f"px; export them at {image_size} px (megactor-rt export --size {image_size} --out "
                                "ANOTHER_DIR) or leave --size out")
        return size

    def for_submodel(self, submodel: str, precision: str | None = None) -> list[GraphEntry]:
        """Graphs exported for ``submodel`` (optionally only those of ``precision``)."""
        return [g for g in self.graphs.values()
                if g.submodel == submodel and (precision is None or g.precision == precision)]


# -- loading --------------------------------------------------------------------------------------------

def load_manifest(path: str | Path, *, validate_profiles: bool = True) -> Manifest:
    """Load and validate an export manifest.

    Args:
        path: the ONNX export directory or its ``manifest.json``.
        validate_profiles: also run ``check_profiles_cover`` on every graph and fail on any problem.

    Returns:
        The parsed manifest.

    Raises:
        ManifestError: the file is missing, not JSON, or malformed; the message names the file and field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        if path.name != MANIFEST_NAME and not path.exists():  # the folder given is not there
            raise ManifestError(f"{path}: no such export folder (the --out of `megactor-rt export`)")
        raise ManifestError(f"no export manifest at {path} (run the ONNX export first)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if path.suffix.lower() != ".json":  # (a graph file named, say: was the JSON decoder's "'utf-8' codec ...")
            raise ManifestError(f"{path}: an export is named by its folder (the --out of `megactor-rt export`) or "
                                f"its {MANIFEST_NAME}, not this file") from exc
        raise ManifestError(f"{path}: not a readable JSON manifest: {exc}") from exc
    manifest = parse_manifest(raw, path)
    if validate_profiles:
        problems = [f"graph '{g.name}': {p}" for g in manifest.graphs.values() for p in check_profiles_cover(g)]
        if problems:
            raise ManifestError(f"{path}: invalid shape profiles:\n  " + "\n  ".join(problems))
    return manifest


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Build a ``Manifest`` from decoded JSON; ``path`` is used for the root dir and error messages."""
    where = str(path)
    _expect(isinstance(raw, dict), where, "top level must be an object")
    fmt = raw.get("format")
    _expect(fmt == MANIFEST_FORMAT, where, f"'format' must be {MANIFEST_FORMAT}, got {fmt!r}")
    graphs_raw = raw.get("graphs")
    _expect(isinstance(graphs_raw, dict) and bool(graphs_raw), where, "'graphs' must be a non-empty object")
    graphs = {name: _parse_graph(name, g, path.parent, f"{where}: graphs.{name}") for name, g in graphs_raw.items()}
    return Manifest(path=path, format=fmt, graphs=graphs)


def _parse_graph(name: str, g: Any, root: Path, where: str) -> GraphEntry:
    _expect(isinstance(g, dict), where, "must be an object")
    for key in ("file", "submodel", "precision", "sha256"):
        _expect(isinstance(g.get(key), str) and bool(g[key]), where, f"'{key}' must be a non-empty string")
    _expect(g["submodel"] in SUBMODELS, where, f"unknown submodel '{g['submodel']}'; expected one of {SUBMODELS}")
    _expect(g["precision"] in [p.value for p in ENGINE_PRECISIONS], where, f"unknown precision '{g['precision']}'")
    _expect(re.fullmatch(r"[0-9a-f]{64}", g["sha256"]) is not None, where, "'sha256' must be 64 lowercase hex digits")
    inputs = _parse_tensors(g.get("inputs"), f"{where}.inputs")
    outputs = _parse_tensors(g.get("outputs"), f"{where}.outputs")
    profiles_raw = g.get("profiles", {})
    _expect(isinstance(profiles_raw, dict), where, "'profiles' must be an object")
    profiles = {p: _parse_profile(v, f"{where}.profiles.{p}") for p, v in profiles_raw.items()}
    weights_id = g.get("weights_id")
    _expect(weights_id is None or (isinstance(weights_id, str) and bool(weights_id)), where,
            "'weights_id' must be a non-empty string when present")
    image_size = g.get("image_size")
    _expect(image_size is None or (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0),
            where, "'image_size' must be a positive integer when present")
    return GraphEntry(name, g["file"], g["submodel"], g["precision"], g["sha256"], inputs, outputs, profiles, root,
                      weights_id, image_size)


def _parse_tensors(raw: Any, where: str) -> dict[str, TensorSpec]:
    _expect(isinstance(raw, dict) and bool(raw), where, "must be a non-empty object")
    out = {}
    for name, spec in raw.items():
        w = f"{where}.{name}"
        _expect(isinstance(spec, dict), w, "must be an object")
        _expect(spec.get("dtype") in DTYPES, w, f"'dtype' must be one of {DTYPES}, got {spec.get('dtype')!r}")
        shape = spec.get("shape")
        _expect(isinstance(shape, list), w, "'shape' must be a list")
        for d in shape:
            ok = (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and bool(d))
            _expect(ok, w, f"dims must be non-negative ints or dim names, got {d!r}")
        out[name] = TensorSpec(name, spec["dtype"], tuple(shape))
    return out


def _parse_profile(raw: Any, where: str) -> dict[str, ProfileShapes]:
    _expect(isinstance(raw, dict), where, "must be an object of input name -> [min, opt, max]")
    out = {}
    for name, triple in raw.items():
        w = f"{where}.{name}"
        _expect(isinstance(triple, list) and len(triple) == 3, w, "must be [[min], [opt], [max]]")
        shapes = []
        for s in triple:
            _expect(isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s),
                    w, f"shapes must be lists of ints, got {s!r}")
            shapes.append(tuple(s))
        out[name] = ProfileShapes(*shapes)
    return out


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {msg}")


# -- profile checks -------------------------------------------------------------------------------------

def check_profiles_cover(graph: GraphEntry) -> list[str]:
    """Check that the graph's shape profiles are usable as TensorRT optimization profiles.

    Every dynamic dim of every input must be covered by each profile with ``min <= opt <= max``; static
    dims must equal the graph's shape; ranks must match; a dim name shared by several inputs must get the
    same range in all of them; profiles may not name unknown inputs.

    Args:
        graph: one manifest graph.

    Returns:
        Human-readable problems; empty when the profiles are fine.
    """
    problems: list[str] = []
    dynamic_inputs = [t for t in graph.inputs.values() if t.dynamic_dims]
    if dynamic_inputs and not graph.profiles:
        problems.append(f"inputs {[t.name for t in dynamic_inputs]} have dynamic dims but there is no profile")
    for pname, profile in graph.profiles.items():
        for extra in sorted(set(profile) - set(graph.inputs)):
            problems.append(f"profile '{pname}' names '{extra}', which is not an input of the graph")
        named: dict[str, tuple[tuple[int, int, int], str]] = {}
        for spec in graph.inputs.values():
            if spec.name not in profile:
                if spec.dynamic_dims:
                    problems.append(f"profile '{pname}' does not cover dynamic input '{spec.name}' {list(spec.shape)}")
                continue
            problems += _check_one(pname, spec, profile[spec.name], named)
    return problems


def _check_one(pname: str, spec: TensorSpec, shapes: ProfileShapes,
               named: dict[str, tuple[tuple[int, int, int], str]]) -> list[str]:
    where = f"profile '{pname}', input '{spec.name}'"
    rank = len(spec.shape)
    bad_rank = [k for k, s in (("min", shapes.min), ("opt", shapes.opt), ("max", shapes.max)) if len(s) != rank]
    if bad_rank:
        return [f"{where}: {bad_rank} shape rank differs from the input rank {rank} {list(spec.shape)}"]
    problems = []
    for axis, dim in enumerate(spec.shape):
        lo, opt, hi = shapes.min[axis], shapes.opt[axis], shapes.max[axis]
        if isinstance(dim, int):
            if not lo == opt == hi == dim:
                problems.append(f"{where}: static axis {axis} is {dim} but the profile gives {lo}/{opt}/{hi}")
            continue
        if not 0 <= lo <= opt <= hi:
            problems.append(f"{where}: axis {axis} ('{dim}') needs 0 <= min <= opt <= max, got {lo}/{opt}/{hi}")
        seen = named.setdefault(dim, ((lo, opt, hi), spec.name))
        if seen[0] != (lo, opt, hi):
            problems.append(f"{where}: dim '{dim}' is {lo}/{opt}/{hi} here but {seen[0][0]}/{seen[0][1]}/"
                            f"{seen[0][2]} in input '{seen[1]}'")
    return problems


def profile_to_json(profile: Mapping[str, ProfileShapes]) -> dict[str, list[list[int]]]:
    """A profile as the manifest's JSON form (sorted by input name, for stable hashing)."""
    return {name: profile[name].as_lists() for name in sorted(profile)}
