"""A stand-in for the ``tensorrt`` module's build API, so CPU tests run ``engine/builder.py``'s TensorRT code.

It models what the real Python bindings do (TensorRT 10.x/11.x, checked against NVIDIA/TensorRT's
``python/src/infer`` bindings, samples and Polygraphy; see docs/decisions.md): the strongly typed flag is
passed as ``1 << int(flag)``; ``parse_from_file`` returns a bool and keeps errors that print; dynamic
dimensions are -1 in a ``Dims`` that ``list()`` accepts; ``DataType`` members are named FLOAT/HALF/...;
``OptimizationProfile.set_shape`` raises ``RuntimeError`` on shapes inconsistent with the input;
``add_optimization_profile`` returns -1 for an incomplete profile; ``create_timing_cache`` returns None for
bytes it cannot read and ``set_timing_cache`` returns a bool; ``build_serialized_network`` returns a
buffer or None; a progress monitor subclass must call the base ``__init__``. It builds nothing: the "plan"
is a JSON description of what the build was given, so tests can check it.

Its classes, methods (with the bindings' parameter names), properties and enum values are checked against
TensorRT 11.4's recorded Python API (``engine/data/trt_python_api_11.4.0.106.json``) by ``tests/test_trt_api.py``;
``REAL_NAMES`` says which real class each stands for.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import onnx

__version__ = "11.1.0.106"

_CACHE_MAGIC = b"FAKE-TIMING-CACHE:"
_ONNX_TYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.BOOL: "BOOL"}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0  # TensorRT 11 numbering (10.x: 1); code must not hard-code it


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class BuilderFlag(enum.Enum):
    TF32 = 6  # set by default (NvInfer.h: "kTF32 ... Enabled by default")


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class ILogger:  # (pybind11: a Python subclass must call ILogger.__init__, without arguments)
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4

    def __init__(self) -> None:
        self.base_initialised = True

    def log(self, severity: int, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual")


class Logger(ILogger):
    def __init__(self, min_severity: int = ILogger.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: int, msg: str) -> None:
        self.messages.append((severity, msg))


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    def get_output(self, index: int) -> _Tensor:
        return self.outputs[index]


class _ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger) -> None:
        self.network = network
        self.errors: list[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> _ParserError:
        return self.errors[index]

    def parse_from_file(self, model: str) -> bool:  # (the binding's parameter name: the file's path)
        try:
            proto = onnx.load(model)  # external data resolved next to the file, as the real parser does
        except Exception as exc:  # noqa: BLE001 - the real parser reports every failure the same way
            self.errors.append(_ParserError(f"ModelImporter.cpp: Failed to parse ONNX model from file {model}: {exc}"))
            return False

        def tensors(values: Any) -> list[_Tensor]:
            out = []
            for v in values:
                t = v.type.tensor_type
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
                out.append(_Tensor(v.name, shape, DataType[_ONNX_TYPES[t.elem_type]]))
            return out

        init = {i.name for i in proto.graph.initializer}
        self.network.inputs = tensors(v for v in proto.graph.input if v.name not in init)
        self.network.outputs = tensors(proto.graph.output)
        return True


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the binding's names
        lo, mid, hi = tuple(min), tuple(opt), tuple(max)
        if not len(lo) == len(mid) == len(hi) or any(a > b or b > c for a, b, c in zip(lo, mid, hi)):
            raise RuntimeError(f"Shape provided for min is inconsistent with other shapes for {input}")
        self.shapes[input] = (lo, mid, hi)


class IProgressMonitor:
    def __init__(self) -> None:
        self.base_initialised = True


class _TimingCache:
    def __init__(self, entries: dict[str, int]) -> None:
        self.entries = entries

    def serialize(self) -> bytes:
        return _CACHE_MAGIC + json.dumps(self.entries).encode()

    def combine(self, input_cache: _TimingCache, ignore_mismatch: bool) -> bool:
        """Add the entries ``input_cache`` has and this one lacks (TensorRT keeps its own on a conflict)."""
        for key, value in input_cache.entries.items():
            self.entries.setdefault(key, value)
        return True


class _BuilderConfig:
    # the real IBuilderConfig's writable properties this stand-in models (tests/test_trt_api.py checks each is
    # one); like a pybind11 object it refuses any other attribute (its own bookkeeping is underscored)
    SETTABLE = frozenset({"builder_optimization_level", "profiling_verbosity", "progress_monitor"})

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name not in self.SETTABLE:
            raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}'")
        super().__setattr__(name, value)

    def __init__(self) -> None:
        self.builder_optimization_level = 3
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self._pool_limits: dict[MemoryPoolType, int] = {}
        self._profiles: list[OptimizationProfile] = []
        self._timing_cache: _TimingCache | None = None
        self.progress_monitor: IProgressMonitor | None = None
        self._flags = {BuilderFlag.TF32}

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self._flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pool_limits[pool] = int(pool_size)

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        if not profile.shapes:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> _TimingCache | None:
        data = serialized_timing_cache
        if not data:
            return _TimingCache({})
        if not data.startswith(_CACHE_MAGIC):
            return None  # the real binding logs "Magic tag does not match" and hands back nothing usable
        return _TimingCache(json.loads(data[len(_CACHE_MAGIC):]))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, _TimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")  # what pybind11 raises
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self._timing_cache


class Builder:
    fail_builds = False  # tests set it to make build_serialized_network return None

    def __init__(self, logger: ILogger) -> None:
        if not getattr(logger, "base_initialised", False):
            raise TypeError("Builder(): incompatible constructor arguments (an ILogger whose __init__ ran)")
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _BuilderConfig:
        return _BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: _Network, config: _BuilderConfig) -> memoryview | None:
        if network.flags != 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise RuntimeError("fake TensorRT: this project builds strongly typed networks only")
        monitor = config.progress_monitor
        if monitor is not None:
            if not getattr(monitor, "base_initialised", False):
                raise TypeError("IProgressMonitor.__init__() must be called")  # pybind11's complaint
            monitor.phase_start("Building engine", None, 1)
            monitor.step_complete("Building engine", 0)
            monitor.phase_finish("Building engine")
        if Builder.fail_builds:
            return None
        problem = _profile_problem(network, config._profiles)
        if problem is not None:  # the real builder logs an error and returns None
            self.logger.log(Logger.ERROR, problem)
            return None
        if config._timing_cache is not None:
            config._timing_cache.entries["builds"] = config._timing_cache.entries.get("builds", 0) + 1
        plan = {"inputs": [t.name for t in network.inputs], "level": config.builder_optimization_level,
                "verbosity": config.profiling_verbosity.name,
                "workspace": config._pool_limits.get(MemoryPoolType.WORKSPACE),
                "tf32": config.get_flag(BuilderFlag.TF32),
                "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config._profiles]}
        return memoryview(json.dumps(plan).encode())


def _profile_problem(network: _Network, profiles: list[OptimizationProfile]) -> str | None:
    """What the real build rejects about the profiles (NvInfer.h: a network with dynamic inputs needs at least
    one profile; IOptimizationProfile::setDimensions: each profile's shapes have the input's rank and its
    static sizes; every dynamic input needs shapes in every profile), or None."""
    dynamic = [t for t in network.inputs if -1 in t.shape]
    if dynamic and not profiles:
        return f"Network has dynamic or shape inputs, but no optimization profile has been defined ({dynamic[0].name})"
    known = {t.name: t for t in network.inputs}
    for i, p in enumerate(profiles):
        for name in p.shapes:
            if name not in known:
                return f"profile {i}: no network input named {name}"
        for t in network.inputs:
            if t.name not in p.shapes:
                if -1 in t.shape:
                    return f"profile {i}: no dimensions for dynamic input {t.name}"
                continue
            for dims in p.shapes[t.name]:
                if len(dims) != len(t.shape) or any(n != -1 and d != n for d, n in zip(dims, t.shape)):
                    return f"profile {i}: {t.name} dims {list(dims)} do not match the network's {list(t.shape)}"
    return None


# which TensorRT class each stand-in is (tests/test_trt_api.py checks them against the recorded API)
REAL_NAMES = {"DataType": "DataType", "NetworkDefinitionCreationFlag": "NetworkDefinitionCreationFlag",
              "MemoryPoolType": "MemoryPoolType", "BuilderFlag": "BuilderFlag", "ProfilingVerbosity": "ProfilingVerbosity", "Logger": "Logger",
              "ILogger": "ILogger",
              "_Tensor": "ITensor", "_Network": "INetworkDefinition", "_ParserError": "ParserError", "OnnxParser": "OnnxParser",
              "OptimizationProfile": "IOptimizationProfile", "IProgressMonitor": "IProgressMonitor",
              "_TimingCache": "ITimingCache", "_BuilderConfig": "IBuilderConfig", "Builder": "Builder"}
