"""Engine cache: one directory per key, a JSON sidecar next to each plan, and foreign-plan detection.

Key = GPU name + compute capability + TensorRT version + precision + ONNX sha256 + shape profile (name and
min/opt/max shapes). Layout::

    <engine_dir>/<graph name>/<key dir>/engine.plan
    <engine_dir>/<graph name>/<key dir>/engine.json      # sidecar, written last (it marks the plan complete)
    <engine_dir>/timing_cache/<device>.cache            # TensorRT timing cache, one per GPU + TRT version

A plan is only deserialized after its sidecar has been read and matched against this machine, and its
bytes checked against the sidecar's sha256, so a foreign or truncated plan gives ``EngineMismatch`` with a
'rebuild' message instead of a TensorRT deserialization error.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megactor_rt.errors import TENSORRT_INSTALL, BackendUnavailable, EngineMismatch
from megactor_rt.files import locked, remove_stale, sync_folder, umask_mode

PLAN_NAME = "engine.plan"
SIDECAR_NAME = "engine.json"
SIDECAR_FORMAT = 1
TIMING_CACHE_DIR = "timing_cache"
REBUILD_HINT = "rebuild it with `megactor-rt build-engines --onnx <onnx dir> --out <engine dir>`"


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT plan is tied to: the GPU model, its compute capability, the TensorRT version."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        cc = ".".join(map(str, self.compute_capability))
        return f"{self.gpu_name} (compute capability {cc}), TensorRT {self.trt_version}"

    def slug(self) -> str:
        return f"{_slug(self.gpu_name)}_{self.sm}_trt{self.trt_version}"

    @classmethod
    def current(cls, device: int | None = None) -> DeviceInfo:
        """The CUDA device and TensorRT of this process.

        Raises:
            BackendUnavailable: TensorRT is not importable or no CUDA device is visible.
        """
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines need a CUDA device, and none is visible to torch")
        index = torch.cuda.current_device() if device is None else device
        major, minor = torch.cuda.get_device_capability(index)
        flavour = tensorrt_cuda_flavour()
        version = str(trt.__version__) + (f"+{flavour}" if flavour else "")
        return cls(torch.cuda.get_device_name(index), (major, minor), version)


def tensorrt_cuda_flavour(names: Iterable[str] | None = None) -> str:
    """The CUDA major version of the installed TensorRT wheels (``"cu12"``, ``"cu13"``), from their distribution
    names (``tensorrt-cu12-libs``, ``tensorrt_cu13_bindings``, ...); "" where none says (a tarball or system
    install). One TensorRT release ships builds for several CUDA majors under the same ``__version__``; the
    flavour keeps their plans apart (a plan is rebuilt rather than failing to deserialize).

    Args:
        names: distribution names to look at (default: every installed distribution's).
    """
    if names is None:
        from importlib.metadata import distributions

        names = (d.metadata["Name"] or "" for d in distributions())
    found = sorted({m.group(1) for n in names if (m := re.fullmatch(r"tensorrt[-_.](cu\d+)(?:[-_.].*)?", n.lower()))})
    return "+".join(found)


def import_tensorrt() -> Any:
    """Import TensorRT or raise ``BackendUnavailable`` saying how to install it."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a stub package raising at import
        raise BackendUnavailable(
            f"TensorRT is not importable ({type(exc).__name__}: {exc}). TensorRT engines need an NVIDIA GPU "
            f"and the TensorRT Python package: {TENSORRT_INSTALL}; "
            "or use the 'onnxruntime'/'torch' backend") from exc
    return trt


_TRT_LOGGERS: dict[int, Any] = {}  # id(TensorRT module) -> its one logger


def trt_logger(trt: Any, verbose: bool | None = None) -> Any:
    """The process's one TensorRT logger: TensorRT keeps the first logger it is given and ignores later ones
    (NVIDIA/TensorRT#1475), so builders and runtimes share this one. ``verbose``: set its level (VERBOSE, or
    WARNING with False); None leaves it as it is (WARNING when first made). Its messages go through
    :mod:`logging` (``megactor_rt.engine.tensorrt``; ``trt.Logger`` would write to stderr itself)."""
    made = _TRT_LOGGERS.get(id(trt))
    if made is None:
        made = _TRT_LOGGERS[id(trt)] = _to_logging(trt)
    if verbose is not None:
        made.min_severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    return made


_TRT_LOG = logging.getLogger("megactor_rt.engine.tensorrt")
# ILogger.Severity: INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4 (the same in 10.x and 11.x)
_TRT_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}


def _to_logging(trt: Any) -> Any:
    """A TensorRT ``ILogger`` passing the messages of ``min_severity`` and worse to :mod:`logging`."""
    base = trt.ILogger

    class _ToLogging(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # type: ignore[misc]  # the pybind11 base needs its own __init__ called
            self.min_severity = trt.Logger.WARNING

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(self.min_severity):
                _TRT_LOG.log(_TRT_LEVELS.get(int(severity), logging.DEBUG), "TensorRT: %s", msg)

    return _ToLogging()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


# -- keys ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineKey:
    """The content key of one plan. ``profile_shapes`` is input name -> [min, opt, max] shapes."""

    device: DeviceInfo
    precision: str
    onnx_sha256: str
    profile_name: str
    profile_shapes: Mapping[str, Any] = field(hash=False)

    def parts(self) -> dict[str, Any]:
        return {
            "gpu_name": self.device.gpu_name,
            "compute_capability": list(self.device.compute_capability),
            "trt_version": self.device.trt_version,
            "precision": self.precision,
            "onnx_sha256": self.onnx_sha256,
            "profile_name": self.profile_name,
            "profile_shapes": {k: [list(s) for s in v] for k, v in sorted(self.profile_shapes.items())},
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON of every key part."""
        return hashlib.sha256(json.dumps(self.parts(), sort_keys=True).encode()).hexdigest()

    def dirname(self) -> str:
        """Readable and unique: ``<gpu>_sm90_trt11.1.0.106_fp16_<profile>_<digest[:16]>``."""
        return f"{self.device.slug()}_{self.precision}_{_slug(self.profile_name)}_{self.digest()[:16]}"


def plan_dir(engine_dir: str | Path, graph_name: str, key: EngineKey) -> Path:
    """Directory holding the plan and sidecar of ``graph_name`` for ``key``."""
    return Path(engine_dir) / _slug(graph_name) / key.dirname()


def filed_under(directory: Path, submodel: str) -> bool:
    """Whether the plan folder ``directory`` (``<graph>/<key>``, as :func:`plan_dir` names it) is one of
    ``submodel``'s graphs' (``vae-decoder.fp16/...`` is ``vae_decoder``'s), read from its name alone: the longest
    submodel name it starts with (``temporal-unet-cond.fp16`` is ``temporal_unet_cond``'s, not
    ``temporal_unet``'s)."""
    from .manifest import SUBMODELS

    name = _slug(directory.parent.name)
    named = [s for s in SUBMODELS if name == _slug(s) or name.startswith((f"{_slug(s)}-", f"{_slug(s)}."))]
    return max(named, key=len, default=None) == submodel


def timing_cache_path(engine_dir: str | Path, device: DeviceInfo) -> Path:
    """Persisted TensorRT timing cache for this GPU + TensorRT version."""
    return Path(engine_dir) / TIMING_CACHE_DIR / f"{device.slug()}.cache"


# -- sidecar ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineRecord:
    """The JSON sidecar of a plan: what it was built from, for which machine, and what it contains."""

    graph: str
    submodel: str
    precision: str
    profile_name: str
    profile_shapes: dict[str, list[list[int]]]
    inputs: dict[str, dict[str, Any]]      # name -> {"dtype": "float16", "shape": [-1, 4, 64, 64]}
    outputs: dict[str, dict[str, Any]]
    gpu_name: str
    compute_capability: list[int]
    trt_version: str
    onnx_file: str
    onnx_sha256: str
    plan_sha256: str
    plan_bytes: int
    key: str
    build_seconds: float = 0.0
    built_at: str = ""
    builder: dict[str, Any] = field(default_factory=dict)  # optimization level, workspace, ...
    format: int = SIDECAR_FORMAT

    def builder_settings(self) -> dict[str, Any]:
        """``builder`` as the current settings name it: a sidecar written before TF32 was recorded was built
        with TF32 on (TensorRT's default). Empty where nothing was recorded."""
        return {**self.builder, "tf32": self.builder.get("tf32", True)} if self.builder else {}

    @property
    def device(self) -> DeviceInfo:
        major, minor = self.compute_capability
        return DeviceInfo(self.gpu_name, (major, minor), self.trt_version)

    def engine_key(self) -> EngineKey:
        return EngineKey(self.device, self.precision, self.onnx_sha256, self.profile_name, self.profile_shapes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "sidecar") -> EngineRecord:
        """Parse a sidecar; raises ``EngineMismatch`` (with a rebuild hint) when it is not valid."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("top level is not an object")
            if raw.get("format") != SIDECAR_FORMAT:
                raise ValueError(f"sidecar format {raw.get('format')!r}, expected {SIDECAR_FORMAT}")
            names = set(cls.__dataclass_fields__)
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            for name, value in raw.items():  # (a hand-edited or foreign sidecar: a rebuild hint, not a TypeError
                # from deep inside the selection)
                kind = _FIELD_TYPES[name]
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise ValueError(f"{name} is {type(value).__name__}, expected {_KIND_NAMES[kind]}")
            if not all(isinstance(v, dict) for part in ("inputs", "outputs") for v in raw.get(part, {}).values()):
                raise ValueError("inputs/outputs must map names to objects")
            if not all(isinstance(v, list) and all(isinstance(s, list) and all(isinstance(d, int) for d in s)
                                                   for s in v) for v in raw.get("profile_shapes", {}).values()):
                raise ValueError("profile_shapes must map names to lists of shapes")
            rec = cls(**raw)
            if len(rec.compute_capability) != 2 or not all(isinstance(c, int) for c in rec.compute_capability):
                raise ValueError(f"compute_capability {rec.compute_capability!r} is not [major, minor]")
            if not isinstance(rec.plan_bytes, int) or not re.fullmatch(r"[0-9a-f]{64}", str(rec.plan_sha256)):
                raise ValueError("plan_bytes/plan_sha256 missing or malformed")
        except (ValueError, TypeError) as exc:
            raise EngineMismatch(f"{where}: corrupt engine sidecar ({exc}); {REBUILD_HINT}") from exc
        return rec


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    **{name: str for name in ("graph", "submodel", "precision", "profile_name", "gpu_name", "trt_version", "onnx_file",
                              "onnx_sha256", "plan_sha256", "key", "built_at")},
    **{name: dict for name in ("profile_shapes", "inputs", "outputs", "builder")},
    "compute_capability": list, "plan_bytes": int, "format": int, "build_seconds": (int, float)}
_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", int: "a whole number", (int, float): "a number"}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk and rename it into place (so a
    plan written before its sidecar is on disk before the sidecar, even across a power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())  # as a plain write would make it (mkstemp: 0600, unreadable to others)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    remove_stale(path.parent, f".{glob.escape(path.name)}.*.tmp")  # earlier writes of this file killed midway



def plan_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on a plan directory (a ``.build.lock`` file in it, :func:`megactor_rt.files.locked`):
    two ``build-engines`` runs building the same plan at once would otherwise pair one build's plan with the
    other's sidecar (TensorRT builds are not bit-reproducible). The second waits, then finds the first's plan
    valid."""
    return locked(directory / ".build.lock")


def write_plan(directory: Path, plan: bytes, record: EngineRecord) -> None:
    """Write plan then sidecar (the sidecar's presence marks a complete plan)."""
    (directory / SIDECAR_NAME).unlink(missing_ok=True)
    write_atomic(directory / PLAN_NAME, plan)
    write_atomic(directory / SIDECAR_NAME, record.to_json().encode())


def read_sidecar(directory: str | Path) -> EngineRecord:
    """Read the sidecar of a plan directory (or of the directory holding a given ``engine.plan``).

    Raises:
        EngineMismatch: missing or corrupt sidecar, with a rebuild hint.
    """
    directory = Path(directory)
    if directory.name == PLAN_NAME:
        directory = directory.parent
    path = directory / SIDECAR_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EngineMismatch(f"{path}: missing engine sidecar, so the plan's origin is unknown; "
                             f"{REBUILD_HINT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineMismatch(f"{path}: unreadable engine sidecar ({exc}); {REBUILD_HINT}") from exc
    return EngineRecord.from_json(text, str(path))


def device_mismatches(record: EngineRecord, device: DeviceInfo) -> list[str]:
    """Fields in which the plan's build machine differs from ``device``."""
    out = []
    if record.gpu_name != device.gpu_name:
        out.append(f"GPU '{record.gpu_name}' != '{device.gpu_name}'")
    if tuple(record.compute_capability) != tuple(device.compute_capability):
        out.append(f"compute capability {tuple(record.compute_capability)} != {tuple(device.compute_capability)}")
    if record.trt_version != device.trt_version:
        out.append(f"TensorRT {record.trt_version} != {device.trt_version}")
    return out


def check_record(record: EngineRecord, device: DeviceInfo, directory: Path,
                 expected: EngineKey | None = None) -> None:
    """Raise ``EngineMismatch`` unless the plan was built for ``device`` (and for ``expected``, if given)."""
    problems = device_mismatches(record, device)
    if record.key != record.engine_key().digest():
        problems.append("the sidecar's key does not match its own fields")
    if expected is not None and not problems and record.key != expected.digest():
        rk = record.engine_key().parts()
        problems += [f"{k} {rk[k]!r} != {v!r}" for k, v in expected.parts().items() if rk[k] != v]
    if problems:
        raise EngineMismatch(f"plan {directory} was built for {record.device.describe()}, this machine is "
                             f"{device.describe()}: {'; '.join(problems)}. The plan cannot be used here; "
                             f"{REBUILD_HINT}")


def sha256_file(path: Path, chunk: int = 1 << 24, extra: tuple[Path, ...] = ()) -> str:
    h = hashlib.sha256()
    for p in (path, *extra):
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def external_data_path(onnx_path: Path) -> Path:
    """Where the export writes a graph's weights when it exceeds protobuf's 2 GB limit."""
    return onnx_path.with_name(onnx_path.name + ".data")


def sha256_graph(onnx_path: Path) -> str:
    """Content hash of an exported graph: the .onnx bytes plus its external-data file, if any.

    Hashing the weights too means a re-export that only changed external weights gets a new engine key.
    """
    data = external_data_path(Path(onnx_path))
    return sha256_file(Path(onnx_path), extra=(data,) if data.is_file() else ())


def check_plan_file(directory: Path, record: EngineRecord, *, verify_hash: bool = True) -> Path:
    """Check the plan exists and matches the sidecar's size (and sha256); returns its path."""
    plan = Path(directory) / PLAN_NAME
    if not plan.is_file():
        raise EngineMismatch(f"{plan}: plan file missing; {REBUILD_HINT}")
    size = plan.stat().st_size
    if size != record.plan_bytes:
        raise EngineMismatch(f"{plan}: {size} bytes, the sidecar says {record.plan_bytes} (truncated or "
                             f"replaced); {REBUILD_HINT}")
    if verify_hash and sha256_file(plan) != record.plan_sha256:
        raise EngineMismatch(f"{plan}: content does not match the sidecar's sha256 (corrupt); {REBUILD_HINT}")
    return plan


def read_plan(directory: Path, record: EngineRecord, *, verify_hash: bool = True) -> bytes:
    """The plan's bytes, checked (size, and sha256 with ``verify_hash``) on the bytes read, which are the
    ones to deserialize: a plan replaced between a check and a second read (another build) is not loaded."""
    plan = check_plan_file(directory, record, verify_hash=False)
    data = plan.read_bytes()
    if len(data) != record.plan_bytes:
        raise EngineMismatch(f"{plan}: {len(data)} bytes, the sidecar says {record.plan_bytes} (replaced while "
                             f"read?); {REBUILD_HINT}")
    if verify_hash and hashlib.sha256(data).hexdigest() != record.plan_sha256:
        raise EngineMismatch(f"{plan}: content does not match the sidecar's sha256 (corrupt); {REBUILD_HINT}")
    return data


def load_valid_record(directory: str | Path, device: DeviceInfo, expected: EngineKey | None = None,
                      *, verify_hash: bool = True) -> EngineRecord:
    """Sidecar + device + plan-file checks in one call; returns the record or raises ``EngineMismatch``."""
    directory = Path(directory)
    record = read_sidecar(directory)
    check_record(record, device, directory, expected)
    check_plan_file(directory, record, verify_hash=verify_hash)
    return record


def iter_plan_dirs(engine_dir: str | Path) -> Iterator[Path]:
    """Every ``<graph>/<key>`` directory under ``engine_dir`` that holds a plan or a sidecar."""
    root = Path(engine_dir)
    if not root.is_dir():
        return
    for graph_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != TIMING_CACHE_DIR):
        for key_dir in sorted(p for p in graph_dir.iterdir() if p.is_dir()):
            if (key_dir / PLAN_NAME).exists() or (key_dir / SIDECAR_NAME).exists():
                yield key_dir
