"""This project's TensorRT code against the real TensorRT 10.0 and 11.4 Python APIs (recorded from NVIDIA's
bindings wheels, ``engine/trt_api.py``): TensorRT cannot run here, but every call it would receive can be
checked."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import fake_tensorrt
import pytest

from megactor_rt.engine.trt_api import (
    check_source,
    describe_wheel,
    load_api,
    parse_signatures,
    recorded_versions,
)

ROOT = Path(__file__).resolve().parents[1]
API = load_api()  # the newest recorded release
VERSIONS = recorded_versions()  # the oldest (10.0) and the newest release the code must work with

# Each file that uses TensorRT, with the types of the TensorRT objects that reach a function through a
# parameter or a container (everything else is inferred from ``trt.X(...)`` and the API's return types),
# and uses the check must find there: if the inference stops following the code, this fails instead of
# checking nothing.
SOURCES = {
    "engine/builder.py": (
        {"_add_profile:builder": "Builder", "_add_profile:network": "INetworkDefinition",
         "_add_profile:config": "IBuilderConfig", "_load_timing_cache:config": "IBuilderConfig",
         "_save_timing_cache:config": "IBuilderConfig",
         "_network_io:network": "INetworkDefinition", "_network_io:t": "ITensor"},
        ["Builder(...)", "Builder.create_network(...)", "OnnxParser(...)",
         "OnnxParser.parse_from_file(...)", "OnnxParser.get_error(...)", "Builder.create_builder_config(...)",
         "set IBuilderConfig.builder_optimization_level", "IBuilderConfig.set_memory_pool_limit(...)",
         "set IBuilderConfig.profiling_verbosity", "ProfilingVerbosity.DETAILED",
         "MemoryPoolType.WORKSPACE", "set IBuilderConfig.progress_monitor", "Builder.build_serialized_network(...)",
         "memoryview(IHostMemory)", "IBuilderConfig.get_timing_cache(...)", "ITimingCache.serialize(...)",
         "ITimingCache.combine(...)",
         "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "INetworkDefinition.get_input(...)",
         "INetworkDefinition.num_inputs", "ITensor.shape", "ITensor.dtype", "DataType.name",
         "Builder.create_optimization_profile(...)", "IOptimizationProfile.set_shape(...)",
         "IBuilderConfig.add_optimization_profile(...)", "IBuilderConfig.create_timing_cache(...)",
         "IBuilderConfig.set_timing_cache(...)", "INetworkDefinition.get_output(...)",
         "_Monitor.phase_start overrides IProgressMonitor.phase_start",
         "_Monitor.step_complete overrides IProgressMonitor.step_complete",
         "_Monitor.phase_finish overrides IProgressMonitor.phase_finish"]),
    "engine/runner.py": (
        {"state.context": "IExecutionContext", "_set_address:ctx": "IExecutionContext"},
        ["Runtime(...)", "Runtime.deserialize_cuda_engine(...)", "ICudaEngine.num_io_tensors",
         "ICudaEngine.get_tensor_name(...)", "ICudaEngine.get_tensor_mode(...)", "TensorIOMode.INPUT",
         "ICudaEngine.get_tensor_dtype(...)", "ICudaEngine.create_execution_context(...)",
         "IExecutionContext.set_input_shape(...)", "IExecutionContext.set_tensor_address(...)",
         "IExecutionContext.get_tensor_shape(...)", "IExecutionContext.execute_async_v3(...)"]),
    "engine/cache.py": ({},  # (trt_logger's logger is _ToLogging: its min_severity is its own)
                        ["tensorrt.__version__", "tensorrt.ILogger", "ILogger.__init__", "Logger.VERBOSE", "Logger.WARNING",
                         "_ToLogging.log overrides ILogger.log"]),
    "runtime/backends.py": ({}, ["tensorrt.__version__"]),
    "engine/trt_api.py": ({}, []),
}


def _uses(checked: list[str]) -> set[str]:
    return {c.split(": ", 1)[1] for c in checked}


def test_the_recorded_apis_span_tensorrt_10_and_11() -> None:
    assert VERSIONS[0].startswith("10.") and VERSIONS[-1].startswith("11."), VERSIONS
    assert API.version == VERSIONS[-1]
    assert load_api(version=VERSIONS[0]).names["NetworkDefinitionCreationFlag"]["members"]["STRONGLY_TYPED"] == 1
    for name in ("Builder", "IBuilderConfig", "OnnxParser", "Runtime", "ICudaEngine", "IExecutionContext"):
        assert API.names[name]["kind"] == "class", name
    # the facts the builder relies on: strongly typed networks exist; fp16 comes from the graph, not a flag
    assert API.names["NetworkDefinitionCreationFlag"]["members"]["STRONGLY_TYPED"] == 0
    assert "FP16" not in API.names["BuilderFlag"]["members"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_tensorrt_use_exists_and_binds(source: str, version: str) -> None:
    seeds, expected = SOURCES[source]
    result = check_source(load_api(version=version), ROOT / source, seeds)
    assert result.problems == [], "\n".join(result.problems)
    missing = sorted(set(expected) - _uses(result.checked))
    assert not missing, f"{source}: the check no longer reaches {missing} (update SOURCES' seeds)"


def test_every_module_that_imports_tensorrt_is_checked() -> None:
    found = set()
    for folder in ("megactor_rt", "engine", "export", "runtime", "kernels", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if re.search(r"import_tensorrt\(\)|^\s*import tensorrt\b", path.read_text(), re.MULTILINE):
                found.add(str(path.relative_to(ROOT)))
    assert found - set(SOURCES) == set(), f"add these files to SOURCES: {sorted(found - set(SOURCES))}"


def test_the_check_flags_calls_tensorrt_11_removed_or_never_had(tmp_path: Path) -> None:
    src = tmp_path / "old_trt.py"
    src.write_text('''
import tensorrt as trt


def build(path, stream):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.max_workspace_size = 1 << 30
    config.num_optimization_profiles = 2
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (2, 4))
    profile.set_shape(name="x", min=(1,), opt=(1,), max=(1,))
    engine = builder.build_engine(network, config)
    context = trt.Runtime(trt.Logger()).deserialize_cuda_engine(path).create_execution_context()
    context.execute_async_v2([0, 0], stream)
    return bytes(builder.create_optimization_profile())


class Monitor(trt.IProgressMonitor):
    def phase_start(self, phase_name, parent_phase):
        pass
''')
    result = check_source(API, src)
    text = "\n".join(result.problems)
    for problem in ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH does not exist",
                    "BuilderFlag.FP16 does not exist",
                    "IBuilderConfig.num_optimization_profiles cannot be assigned",
                    "IOptimizationProfile.set_shape(3 positional, keywords [])",
                    "IOptimizationProfile.set_shape(0 positional, keywords ['name', 'min', 'opt', 'max'])",
                    "Builder.build_engine does not exist",
                    "IExecutionContext.execute_async_v2 does not exist",
                    "IOptimizationProfile does not export the buffer protocol",
                    "Monitor.phase_start('phase_name', 'parent_phase') differs"):
        assert problem in text, f"{problem!r} not flagged in:\n{text}"
    # max_workspace_size is gone too (an unknown attribute, assigned): flagged as missing
    assert "IBuilderConfig.max_workspace_size does not exist" in text
    # what is right in the same file passes
    assert "Builder(...)" in _uses(result.checked) and not any("old_trt.py:6:" in p for p in result.problems)


def test_the_stand_in_tensorrt_matches_the_recorded_api() -> None:
    """tests/fake_tensorrt.py runs the builder on CPUs; each of its classes, methods (parameter names
    included, so keyword calls behave alike), properties and enum values must be TensorRT's."""
    classes = {n for n, v in vars(fake_tensorrt).items() if inspect.isclass(v) and v.__module__ == "fake_tensorrt"}
    assert classes == set(fake_tensorrt.REAL_NAMES), "map every stand-in class in fake_tensorrt.REAL_NAMES"
    checked = 0
    for fake_name, real_name in fake_tensorrt.REAL_NAMES.items():
        cls, real = getattr(fake_tensorrt, fake_name), API.names[real_name]
        if real["kind"] == "enum":
            for member in cls:
                assert real["members"].get(member.name) == member.value, f"{fake_name}.{member.name}"
                checked += 1
            continue
        for name, value in vars(cls).items():
            if name.startswith("_") and name not in ("__init__", "__str__"):
                continue
            member = API.member(real_name, name)
            if name == "fail_builds":  # the stand-in's own switch for tests
                continue
            if name == "SETTABLE":  # attributes the stand-in lets code set: each a property of the real class
                for attr in value:
                    found = API.member(real_name, attr)
                    assert found is not None and found["kind"] == "property", f"{fake_name}: {real_name}.{attr}"
                    checked += 1
                continue
            if name == "__init__" and member is None:  # not constructible from Python (a factory makes it):
                continue  # how the stand-in makes its own is its business; check_source flags any trt.X(...)
            assert member is not None, f"{fake_name}.{name}: {real_name} has no {name}"
            if isinstance(value, property):
                assert member["kind"] == "property", f"{fake_name}.{name}"
            elif callable(value):
                params = [p for p in inspect.signature(value).parameters][1:]
                overloads = [[p[0] for p in o["params"]] for o in member["overloads"]]
                assert params in overloads, f"{fake_name}.{name}{params}: TensorRT's {real_name}.{name} takes {overloads}"
            else:
                assert member["kind"] == "constant" and member["value"] == value, f"{fake_name}.{name}"
            checked += 1
    assert checked >= 30


def test_signatures_are_read_from_pybind11_docstrings() -> None:
    doc = ("__init__(self: tensorrt_bindings.tensorrt.Logger, min_severity: tensorrt_bindings.tensorrt.ILogger"
           ".Severity = <Severity.WARNING: 2>) -> None\n\n    Create a logger.\n")
    assert parse_signatures(doc, "__init__") == [
        {"params": [["min_severity", True, "ILogger.Severity"]], "returns": "None"}]
    doc = ("set_input_shape(*args, **kwargs)\nOverloaded function.\n\n"
           "1. set_input_shape(self: tensorrt.IExecutionContext, name: str, shape: tuple) -> bool\n\n"
           "2. set_input_shape(self: tensorrt.IExecutionContext, name: str, shape: tensorrt.Dims) -> bool\n")
    assert [[p[0] for p in s["params"]] for s in parse_signatures(doc, "set_input_shape")] == \
        [["name", "shape"], ["name", "shape"]]
    assert parse_signatures("get_shape(self: X, input: str) -> list[tuple[int, int]]", "get_shape")[0]["returns"] \
        == "list[tuple[int, int]]"


@pytest.mark.skipif(not os.environ.get("MEGACTOR_TRT_BINDINGS_WHEEL"),
                    reason="set MEGACTOR_TRT_BINDINGS_WHEEL to a tensorrt-cu13-bindings wheel for this Python "
                           "(pip download --no-deps tensorrt-cu13-bindings==<version>) to re-read the API from it")
def test_the_recorded_api_is_what_the_wheel_holds() -> None:
    wheel = Path(os.environ["MEGACTOR_TRT_BINDINGS_WHEEL"])
    fresh = describe_wheel(wheel)
    if fresh["tensorrt_version"] not in VERSIONS:
        pytest.skip(f"{wheel.name} is TensorRT {fresh['tensorrt_version']}; recorded: {VERSIONS}")
    assert fresh["names"] == load_api(version=fresh["tensorrt_version"]).names


@pytest.mark.trt
def test_every_tensorrt_use_exists_in_the_installed_tensorrt() -> None:
    """Where TensorRT is installed (any version this project supports), the same check against it."""
    import tensorrt

    from megactor_rt.engine.trt_api import TrtApi, describe

    live = describe(tensorrt)
    api = TrtApi(live["tensorrt_version"], live["names"])
    for source, (seeds, _) in SOURCES.items():
        result = check_source(api, ROOT / source, seeds)
        assert result.problems == [], "\n".join(result.problems)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_dtype_names_the_engine_code_maps_are_tensorrts(version: str) -> None:
    """builder.py and runner.py read ``DataType.name`` through ``TRT_DTYPE_NAMES``: every key must be a member
    (a renamed member would turn an engine's I/O check into a mismatch)."""
    from megactor_rt.engine.builder import TRT_DTYPE_NAMES

    members = load_api(version=version).names["DataType"]["members"]
    assert set(TRT_DTYPE_NAMES) <= set(members), sorted(set(TRT_DTYPE_NAMES) - set(members))


def test_the_stand_in_refuses_attributes_tensorrt_lacks() -> None:
    """A builder setting written as an attribute TensorRT 11 does not have (``max_workspace_size``, removed in
    TensorRT 10) fails on the stand-in as on the pybind11 object, wherever in the builder it is written (was:
    accepted, so only a write in the function the source check reads was caught)."""
    config = fake_tensorrt.Builder(fake_tensorrt.Logger()).create_builder_config()
    config.builder_optimization_level = 5
    with pytest.raises(AttributeError, match="IBuilderConfig' object has no attribute 'max_workspace_size'"):
        config.max_workspace_size = 1 << 30


# ---------------------------------------------------------------------------------------------- (mutation audit, second round)


def test_a_call_with_a_keyword_the_signature_lacks_or_already_got_is_flagged() -> None:
    """A keyword a method does not take is flagged even when every parameter is otherwise given, and so is a
    keyword naming a parameter already passed positionally (Python raises a TypeError for both)."""
    assert API.call_error("IBuilderConfig", "set_memory_pool_limit", 2, []) is None
    assert API.call_error("IBuilderConfig", "set_memory_pool_limit", 1, ["pool_size"]) is None
    extra = API.call_error("IBuilderConfig", "set_memory_pool_limit", 2, ["size"])
    twice = API.call_error("IBuilderConfig", "set_memory_pool_limit", 1, ["pool", "pool_size"])
    for error in (extra, twice):
        assert error is not None and "binds to none of TensorRT" in error and "[['pool', 'pool_size']]" in error


def test_the_recorded_versions_are_ordered_by_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions sort as numbers (11.10 after 11.4, 10.x after 9.x), so the newest is the default API."""
    from types import SimpleNamespace

    from megactor_rt.engine import trt_api

    (tmp_path / "data").mkdir()
    for version in ("11.10.0.1", "9.3.0.1", "11.4.0.106", "10.0.1"):
        (tmp_path / "data" / f"trt_python_api_{version}.json").write_text("{}")
    (tmp_path / "data" / "notes.txt").write_text("")
    monkeypatch.setattr(trt_api, "resources", SimpleNamespace(files=lambda package: tmp_path))
    assert trt_api.recorded_versions() == ["9.3.0.1", "10.0.1", "11.4.0.106", "11.10.0.1"]
