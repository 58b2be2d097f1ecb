"""ONNX -> TensorRT plan builder (TensorRT Python API, strongly typed; written for TensorRT 11, runs on 10.x).

TensorRT 11 has no weak typing: no ``BuilderFlag.FP16``, no precision constraints. Every network is strongly
typed, so an fp16 engine comes from an fp16 ONNX graph (the export step writes those). We still pass
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: required on 10.x, accepted and ignored on 11.x.

Pure-Python parts (option checks, jobs and keys from the manifest, skip logic, sidecar contents) are
separate from the one function that talks to TensorRT (``_build_plan_trt``), so they are tested on CPU.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megactor_rt.errors import EngineMismatch, InputError, MegactorError, ResourceError
from megactor_rt.files import locked, not_writable, unwritable
from megactor_rt.progress import progress

from .cache import (
    REBUILD_HINT,
    SIDECAR_NAME,
    DeviceInfo,
    EngineKey,
    EngineRecord,
    import_tensorrt,
    load_valid_record,
    plan_dir,
    plan_lock,
    sha256_graph,
    timing_cache_path,
    trt_logger,
    write_atomic,
    write_plan,
)
from .manifest import (
    GraphEntry,
    Manifest,
    Precision,
    ProfileShapes,
    load_manifest,
    parse_precision,
    profile_to_json,
)

logger = logging.getLogger(__name__)

STATIC_PROFILE = "static"  # profile name used for graphs without dynamic inputs
# TensorRT DataType member name -> the dtype names used in the manifest and sidecar.
TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                   "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


class EngineBuildError(MegactorError):
    """TensorRT could not parse the ONNX graph or build the plan; the message carries the parser errors."""


@dataclass(frozen=True)
class BuildOptions:
    """How to build plans.

    Attributes:
        precision: only graphs exported at this precision are built (strong typing: the graph decides).
        profile: build only this shape profile (None: every profile of each graph).
        optimization_level: TensorRT builder optimization level, 0..5 (TensorRT's default is 3).
        workspace_gib: workspace memory pool limit; None leaves TensorRT's default (the device memory).
        timing_cache: load/save the per-device timing cache under the engine dir.
        force: rebuild even when a valid plan exists.
        verbose: TensorRT's logger at VERBOSE instead of WARNING.
    """

    precision: Precision = Precision.FP16
    profile: str | None = None
    optimization_level: int = 3
    workspace_gib: float | None = None
    timing_cache: bool = True
    force: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse_precision(self.precision))
        if not isinstance(self.optimization_level, int) or not 0 <= self.optimization_level <= 5:
            raise InputError(f"builder optimization level must be an int in 0..5, got {self.optimization_level!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise InputError(f"workspace must be > 0 GiB, got {self.workspace_gib!r}")
        if self.profile is not None and not self.profile:
            raise InputError("profile name must not be empty")

    def builder_settings(self) -> dict[str, Any]:
        """What a plan's sidecar records of how it was built; a plan recorded with other settings is rebuilt
        (so a plan from before a settings change, e.g. fp32 plans made with TF32, is not reused)."""
        return {"optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib,
                "strongly_typed": True, "tf32": self.precision is not Precision.FP32}


@dataclass(frozen=True)
class BuildJob:
    """One plan to build: a graph, one of its profiles, its key and target directory."""

    graph: GraphEntry
    profile_name: str
    profile: dict[str, ProfileShapes]
    key: EngineKey
    directory: Path


@dataclass(frozen=True)
class BuildResult:
    """What happened to one job: ``status`` is 'built' or 'skipped'."""

    graph: str
    profile_name: str
    directory: Path
    status: str
    seconds: float
    reason: str


# Type of the function that turns a job into (plan bytes, io description); replaced in CPU tests.
BuildFn = Callable[[BuildJob, BuildOptions, Path | None], tuple[Any, dict[str, Any]]]


# -- pure planning ---------------------------------------------------------------------------------------

def graph_profiles(graph: GraphEntry, only: str | None = None) -> dict[str, dict[str, ProfileShapes]]:
    """Profiles to build for ``graph``: all (or only ``only``); a graph without dynamic inputs gets 'static'.
    Of profiles with the same shapes only the first is built (``default`` first: an export with ``--window 32``,
    the longest, has a ``long`` profile equal to its ``default``, whose plan would be a second, identical build
    of minutes; the runtime runs each call on any plan whose profile takes its shapes)."""
    if not graph.profiles:
        if any(t.dynamic_dims for t in graph.inputs.values()):
            raise InputError(f"graph '{graph.name}' has dynamic inputs but no shape profile in the manifest")
        if only not in (None, STATIC_PROFILE):
            raise InputError(f"graph '{graph.name}' is static and has no profile '{only}'")
        return {STATIC_PROFILE: {}}
    if only is not None:
        return {only: graph.profile(only)}
    chosen: dict[str, dict[str, ProfileShapes]] = {}
    for name in sorted(graph.profiles, key=lambda p: p != "default"):
        same = next((c for c, shapes in chosen.items()
                     if profile_to_json(shapes) == profile_to_json(graph.profiles[name])), None)
        if same is None:
            chosen[name] = graph.profiles[name]
        else:
            logger.info("%s: profile '%s' has the shapes of '%s': its plan serves both", graph.name, name, same)
    return chosen


def plan_jobs(manifest: Manifest, device: DeviceInfo, engine_dir: str | Path, options: BuildOptions,
              graphs: list[str] | None = None) -> list[BuildJob]:
    """Jobs for every graph of ``options.precision`` (optionally only ``graphs``) and each selected profile.

    Raises:
        InputError: no graph has that precision, an unknown graph name, or a graph lacks the asked profile.
    """
    unknown = sorted(set(graphs or []) - set(manifest.graphs))
    if unknown:
        raise InputError(f"{manifest.path}: unknown graphs {unknown}; known: {sorted(manifest.graphs)}")
    selected = [g for g in manifest.graphs.values()
                if g.precision == options.precision.value and (graphs is None or g.name in graphs)]
    if not selected:
        have = sorted({g.precision for g in manifest.graphs.values()})
        raise InputError(f"{manifest.path}: no {options.precision.value} graphs to build (the manifest has "
                         f"{have}); TensorRT 11 is strongly typed, so export {options.precision.value} ONNX first")
    with_profile = [g for g in selected if options.profile is None or options.profile in g.profiles
                    or (not g.profiles and options.profile == STATIC_PROFILE)]
    if not with_profile:
        raise InputError(f"{manifest.path}: no graph has profile '{options.profile}'; known: "
                         f"{sorted({p for g in selected for p in g.profiles})}")
    jobs = []
    for graph in with_profile:
        for pname, shapes in graph_profiles(graph, options.profile).items():
            key = EngineKey(device, options.precision.value, graph.sha256, pname, profile_to_json(shapes))
            jobs.append(BuildJob(graph, pname, shapes, key, plan_dir(engine_dir, graph.name, key)))
    return jobs


def cached_reason(job: BuildJob, device: DeviceInfo, options: BuildOptions) -> str | None:
    """Why the job's plan can be reused, or None when it must be (re)built: no valid plan, or one built with
    other builder settings (optimization level, workspace)."""
    if not (job.directory / SIDECAR_NAME).exists():
        return None
    try:
        record = load_valid_record(job.directory, device, job.key)
    except EngineMismatch as exc:
        logger.info("%s [%s]: existing plan is not valid, rebuilding: %s", job.graph.name, job.profile_name, exc)
        return None
    if record.builder_settings() != options.builder_settings():
        logger.info("%s [%s]: existing plan was built with %s, now asked for %s: rebuilding", job.graph.name,
                    job.profile_name, record.builder or "unrecorded settings", options.builder_settings())
        return None
    return f"valid plan built {record.built_at or 'earlier'} in {record.build_seconds:.0f} s"


def make_record(job: BuildJob, plan: bytes | memoryview, io: dict[str, Any], seconds: float,
                options: BuildOptions) -> EngineRecord:
    """The sidecar for a freshly built plan."""
    d = job.key.device
    return EngineRecord(
        graph=job.graph.name, submodel=job.graph.submodel, precision=job.key.precision,
        profile_name=job.profile_name, profile_shapes=profile_to_json(job.profile),
        inputs=io["inputs"], outputs=io["outputs"], gpu_name=d.gpu_name,
        compute_capability=list(d.compute_capability), trt_version=d.trt_version,
        onnx_file=job.graph.file, onnx_sha256=job.graph.sha256,
        plan_sha256=hashlib.sha256(plan).hexdigest(), plan_bytes=memoryview(plan).nbytes,
        key=job.key.digest(), build_seconds=round(seconds, 3),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), builder=options.builder_settings(),
    )


def check_onnx_file(graph: GraphEntry) -> None:
    """The ONNX file exists and its bytes match the manifest's sha256 (the key is built from it)."""
    if not graph.path.is_file():
        raise InputError(f"graph '{graph.name}': ONNX file {graph.path} is missing (re-run the export)")
    actual = sha256_graph(graph.path)
    if actual != graph.sha256:
        raise EngineMismatch(f"graph '{graph.name}': {graph.path} has sha256 {actual[:12]}…, the manifest says "
                             f"{graph.sha256[:12]}…; the export is inconsistent, re-run it")


def run_jobs(jobs: list[BuildJob], device: DeviceInfo, engine_dir: str | Path, options: BuildOptions,
             build_fn: BuildFn) -> list[BuildResult]:
    """Build every job whose plan is missing or invalid (all of them with ``options.force``); skip the rest.
    Every job's ONNX file is checked first (a bad file late in the list stopped a run after the long builds before
    it); where a build fails, the plans done before it are named (they are kept, and skipped by the next run)."""
    results: list[BuildResult] = []
    for graph in {job.graph.name: job.graph for job in jobs}.values():
        check_onnx_file(graph)
    cache = timing_cache_path(engine_dir, device) if options.timing_cache else None
    bar = progress(total=len(jobs), desc="build-engines", unit="engine", leave=True)
    try:
        for job in jobs:
            label = f"{job.graph.name}[{job.profile_name}]"
            bar.set_postfix_str(label)
            result = _skipped(job, label, device, options)
            if result is None:  # locked only to build (a valid plan in a folder this user may not write is fine)
                _check_writable(job, label, engine_dir)
                with plan_lock(job.directory):  # another build-engines building it now: wait, then reuse it
                    result = _skipped(job, label, device, options) or _build_job(job, label, device, options,
                                                                                 build_fn, cache)
            results.append(result)
            bar.update(1)
    except BaseException:
        if results:
            logger.warning("build-engines stopped; the plans done before are kept: %s",
                           ", ".join(f"{r.graph}[{r.profile_name}] ({r.status})" for r in results))
        raise
    finally:
        bar.close()
    return results


def _check_writable(job: BuildJob, label: str, engine_dir: str | Path) -> None:
    """Refuse, once a plan must be built, a plan folder this user may not write: before the build's minutes, and
    only then (a folder of valid plans that this user may only read is fine: every job is skipped).

    Raises:
        InputError: naming the engine folder, what blocks it and the plan to be built.
    """
    blocked = unwritable(job.directory)
    if blocked is not None:
        raise InputError(f"{engine_dir}: the engine folder (--out) cannot be written ({not_writable(blocked)}), and "
                         f"{label} has no valid plan there to reuse; nothing was built: build into a folder you may "
                         "write")


def _skipped(job: BuildJob, label: str, device: DeviceInfo, options: BuildOptions) -> BuildResult | None:
    """The job's result when its plan is valid already (and no rebuild is forced), else None."""
    reason = None if options.force else cached_reason(job, device, options)
    if reason is None:
        return None
    logger.info("%s: skipped, %s (%s)", label, reason, job.directory)
    return BuildResult(job.graph.name, job.profile_name, job.directory, "skipped", 0.0, reason)


def _build_job(job: BuildJob, label: str, device: DeviceInfo, options: BuildOptions, build_fn: BuildFn,
               cache: Path | None) -> BuildResult:
    logger.info("%s: building %s plan for %s", label, job.key.precision, device.describe())
    start = time.perf_counter()
    plan, io = build_fn(job, options, cache)
    seconds = time.perf_counter() - start
    try:
        write_plan(job.directory, plan, make_record(job, plan, io, seconds, options))
    except OSError as exc:  # (a full disk, no permission: named, not an "unexpected error")
        raise ResourceError(f"{job.directory}: cannot write the plan of {label} ({exc}); nothing partial is left "
                            "under its name: build again once that is fixed") from exc
    logger.info("%s: built in %.1f s -> %s", label, seconds, job.directory)
    return BuildResult(job.graph.name, job.profile_name, job.directory, "built", seconds,
                       "forced" if options.force else "no valid plan")


# -- entry point -----------------------------------------------------------------------------------------

def build_engines(onnx_dir: str | Path, out_dir: str | Path, precision: str | Precision = "fp16",
                  profile: str | None = None, *, graphs: list[str] | None = None, optimization_level: int = 3,
                  workspace_gib: float | None = None, timing_cache: bool = True, force: bool = False,
                  verbose: bool = False) -> list[BuildResult]:
    """Build (or reuse) a TensorRT plan for every exported graph: ``megactor-rt build-engines``.

    Args:
        onnx_dir: the ONNX export directory (with ``manifest.json``).
        out_dir: the engine cache directory.
        precision: build the graphs exported at this precision.
        profile: build only this shape profile (default: all profiles of every graph).
        graphs: build only these manifest graph names (default: all).
        optimization_level: TensorRT builder optimization level 0..5.
        workspace_gib: workspace memory limit in GiB (default: TensorRT's).
        timing_cache: use the persisted per-device timing cache.
        force: rebuild plans even if valid ones exist.
        verbose: verbose TensorRT logging.

    Returns:
        One ``BuildResult`` per plan, 'built' or 'skipped'.

    Raises:
        BackendUnavailable: TensorRT is not importable or no CUDA device is visible (says how to install).
        ManifestError, InputError: bad manifest, options, or missing ONNX files.
        EngineMismatch: an ONNX file does not match its manifest sha256.
        EngineBuildError: TensorRT failed to parse or build a graph.
    """
    options = BuildOptions(parse_precision(precision), profile, optimization_level, workspace_gib, timing_cache,
                           force, verbose)
    import_tensorrt()  # fail fast, before reading anything, with the install hint
    device = DeviceInfo.current()
    manifest = load_manifest(onnx_dir)
    jobs = plan_jobs(manifest, device, out_dir, options, graphs)
    return run_jobs(jobs, device, out_dir, options, _build_plan_trt)


# -- TensorRT --------------------------------------------------------------------------------------------

def _build_plan_trt(job: BuildJob, options: BuildOptions,
                    cache_path: Path | None) -> tuple[memoryview, dict[str, Any]]:
    """Parse the ONNX file and build a serialized plan with the TensorRT Python API."""
    trt = import_tensorrt()
    log = trt_logger(trt, verbose=options.verbose)
    builder = trt.Builder(log)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(job.graph.path)):  # resolves external data next to the file
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {job.graph.path}:\n  {errors}")
    io = _network_io(network, job.graph.path)  # I/O the runner cannot bind is refused before the build
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    # layer names and parameters kept in the plan (the engine inspector's documented use of it; trtexec's
    # --profilingVerbosity=detailed), so `polygraphy inspect model PLAN --show layers` shows what TensorRT
    # fused (e.g. the attention blocks)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if job.graph.precision == "fp32":  # TF32 is on by default: an fp32 plan would round its matmul/conv inputs
        config.clear_flag(trt.BuilderFlag.TF32)  # to 10 mantissa bits; fp32 plans are for exactness
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    _add_profile(trt, builder, network, config, job)
    cache = _load_timing_cache(config, cache_path)
    monitor = _progress_monitor(trt, f"{job.graph.name}[{job.profile_name}]")
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build {job.graph.path} with profile "
                               f"'{job.profile_name}' (see the TensorRT log above)")
    if cache is not None and cache_path is not None:
        _save_timing_cache(config, cache_path)
    return memoryview(plan), io


def _network_flags(trt: Any) -> int:
    """The strongly typed flag: required on 10.x; still passed on 11.x where the enum has it (deprecated there and
    ignored: "Strongly typed mode is always enabled", NvInfer.h), and no flag on an 11.x or later that dropped it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        major = str(trt.__version__).split(".")[0]
        if major.isdigit() and int(major) >= 11:
            return 0
        raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks; use 10.x or 11.x")
    return 1 << int(flag)


def _add_profile(trt: Any, builder: Any, network: Any, config: Any, job: BuildJob) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    unknown = sorted(set(job.profile) - set(inputs))
    if unknown:
        raise EngineBuildError(f"profile '{job.profile_name}' names {unknown}, not inputs of {job.graph.path} "
                               f"(inputs: {sorted(inputs)})")
    dynamic = [n for n, t in inputs.items() if any(d < 0 for d in t.shape)]
    missing = [n for n in dynamic if n not in job.profile]
    if missing:
        raise EngineBuildError(f"profile '{job.profile_name}' lacks dynamic inputs {missing} of {job.graph.path}")
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for name in dynamic:
        s = job.profile[name]
        try:
            profile.set_shape(name, s.min, s.opt, s.max)
        except RuntimeError as exc:  # the binding raises on min/opt/max inconsistent with the input's rank
            raise EngineBuildError(f"profile '{job.profile_name}' of {job.graph.path}: input {name} "
                                   f"min/opt/max {s.min}/{s.opt}/{s.max} rejected by TensorRT ({exc})") from exc
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected profile '{job.profile_name}' of {job.graph.path} as invalid")


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):  # None: bytes TensorRT cannot read
        logger.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write this build's timing cache combined with what the file holds now, under a lock: builds of other
    plans running at the same time (another ``build-engines``) keep their timings instead of the last writer's
    replacing them."""
    with locked(path.with_name(f".{path.name}.lock")):
        ours = config.get_timing_cache()
        theirs = config.create_timing_cache(path.read_bytes()) if path.is_file() else None
        if theirs is not None and not ours.combine(theirs, False):
            logger.warning("timing cache %s could not be combined with this build's; writing this build's", path)
        write_atomic(path, bytes(memoryview(ours.serialize())))


def _network_io(network: Any, source: Path) -> dict[str, Any]:
    def describe(t: Any) -> dict[str, Any]:
        dtype = TRT_DTYPE_NAMES.get(t.dtype.name)
        if dtype is None:  # e.g. FP8/INT4/FP4 I/O: the runner has no torch tensor type to bind
            raise EngineBuildError(f"{source}: network tensor '{t.name}' is {t.dtype.name}; the runner binds "
                                   f"inputs and outputs of {', '.join(sorted(TRT_DTYPE_NAMES))} only")
        return {"dtype": dtype, "shape": list(t.shape)}

    return {"inputs": {network.get_input(i).name: describe(network.get_input(i)) for i in range(network.num_inputs)},
            "outputs": {network.get_output(i).name: describe(network.get_output(i))
                        for i in range(network.num_outputs)}}


def _progress_monitor(trt: Any, label: str) -> Any:
    """A TensorRT progress monitor that logs the top-level build phases (None where the API is absent)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # type: ignore[misc]  # the pybind11 base needs its own __init__ called
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                logger.info("%s: %s (%d steps)", label, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            start = self.started.pop(phase_name, None)
            if start is not None:
                logger.debug("%s: %s done in %.1f s", label, phase_name, time.perf_counter() - start)

    return _Monitor()


__all__ = ["REBUILD_HINT", "BuildJob", "BuildOptions", "BuildResult", "EngineBuildError", "build_engines",
           "cached_reason", "graph_profiles", "make_record", "plan_jobs", "run_jobs"]
