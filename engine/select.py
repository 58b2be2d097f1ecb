"""Per-submodel backend selection: TensorRT where a valid plan exists, otherwise a fallback, with the reason.

The runtime asks ``select_backends(["temporal_unet", "vae_decoder", ...], engine_dir, "reference_net")``
and gets, per submodel, ``'tensorrt'`` and the plan directory, or the fallback backend name
(``'onnxruntime'`` or ``'torch'``) and why. Every choice is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from megactor_rt.errors import BackendUnavailable, EngineMismatch, InputError

from .cache import DeviceInfo, EngineKey, filed_under, iter_plan_dirs, load_valid_record, read_sidecar
from .manifest import SUBMODELS, Manifest, profile_to_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a submodel, why, and (for 'tensorrt') which plan."""

    submodel: str
    backend: str
    reason: str
    plan_dir: Path | None = None
    plan_dirs: tuple[Path, ...] = ()  # every valid plan of the submodel (one per profile), ``plan_dir`` first


def parse_submodel_list(value: str | Iterable[str] | None, known: Sequence[str] = SUBMODELS) -> list[str]:
    """Parse a user list like ``'reference_net,vae_decoder'``; unknown names raise ``InputError``."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [s.strip() for s in items if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown submodels {unknown} in the fallback list; known: {list(known)}")
    return names


def _tensorrt_status() -> tuple[bool, str]:
    from megactor_rt.runtime.backends import backend_status

    return backend_status().get("tensorrt", (False, "tensorrt backend is not registered"))


def select_backends(submodels: Sequence[str], engine_dir: str | Path | None,
                    force_fallback: str | Iterable[str] | None = None, *,
                    fallback: str | Mapping[str, str] = "onnxruntime", precision: str = "fp16",
                    profile: str | Mapping[str, str] | None = None, manifest: Manifest | None = None,
                    device: DeviceInfo | None = None,
                    tensorrt_status: Callable[[], tuple[bool, str]] | None = None,
                    cuda_device: int | None = None) -> dict[str, BackendChoice]:
    """Choose the backend of each submodel.

    Args:
        submodels: the submodels the runtime needs.
        engine_dir: the engine cache (None: no TensorRT).
        force_fallback: submodels forced to the fallback backend, as ``'a,b'`` or a list.
        fallback: fallback backend name, or a per-submodel mapping (missing names: ``'onnxruntime'``).
        precision: plan precision to look for.
        profile: shape profile name to require (per submodel via a mapping); None accepts any profile.
        manifest: the current export manifest; when given, only plans of its graphs' sha256 count.
        device: this machine (default: detected; only needed when TensorRT is available).
        tensorrt_status: availability check (default: the backend registry's).
        cuda_device: the GPU index the plans will run on, for the detected ``device`` (default: the current one).

    Returns:
        Submodel -> ``BackendChoice``.

    Raises:
        InputError: an unknown submodel name.
    """
    wanted = parse_submodel_list(list(submodels))
    forced = set(parse_submodel_list(force_fallback))
    ok, why = (tensorrt_status or _tensorrt_status)()
    if ok and device is None:
        try:
            device = DeviceInfo.current(cuda_device)
        except BackendUnavailable as exc:
            ok, why = False, str(exc)
    choices = {}
    for sub in wanted:
        fb = fallback.get(sub, "onnxruntime") if isinstance(fallback, Mapping) else fallback
        prof = profile.get(sub) if isinstance(profile, Mapping) else profile
        if sub in forced:
            choice = BackendChoice(sub, fb, "forced to the fallback by the user")
        elif not ok or device is None:  # with ok, device is known (set above)
            choice = BackendChoice(sub, fb, f"TensorRT unavailable: {why}")
        elif engine_dir is None or not Path(engine_dir).is_dir():
            choice = BackendChoice(sub, fb, f"no engine directory ({engine_dir})")
        else:
            choice = _choose_plan(sub, Path(engine_dir), fb, device, precision, prof, manifest)
        # a plan that exists but cannot be used means a slower run than asked for: said at the default level
        level = logging.WARNING if choice.reason.startswith("no usable TensorRT plan") else logging.INFO
        logger.log(level, "%s: backend %s (%s)", sub, choice.backend, choice.reason)
        choices[sub] = choice
    return choices


def _choose_plan(sub: str, engine_dir: Path, fb: str, device: DeviceInfo, precision: str, profile: str | None,
                 manifest: Manifest | None) -> BackendChoice:
    shas = None
    if manifest is not None:
        shas = {g.sha256: g for g in manifest.for_submodel(sub, precision)}
    rejected: list[str] = []
    valid: list[tuple[str, Path]] = []
    for directory in iter_plan_dirs(engine_dir):
        try:
            record = read_sidecar(directory)
        except EngineMismatch as exc:  # (blamed on the graph its folder is named after, not on every graph)
            if filed_under(directory, sub):
                rejected.append(str(exc))
            continue
        if record.submodel != sub or record.precision != precision:
            continue
        if profile is not None and record.profile_name != profile:
            continue
        expected = None
        if shas is not None:
            graph = shas.get(record.onnx_sha256)
            if graph is None:
                rejected.append(f"{directory} was built from another export of {sub}")
                continue
            expected = EngineKey(device, precision, graph.sha256, record.profile_name,
                                 profile_to_json(graph.profiles.get(record.profile_name, {})))
        try:
            record = load_valid_record(directory, device, expected, verify_hash=False)
        except EngineMismatch as exc:
            rejected.append(str(exc))
            continue
        if precision == "fp32" and record.builder_settings().get("tf32", True):  # built before TF32 was turned off
            rejected.append(f"{directory} is an fp32 plan built with TF32 (matmuls and convolutions rounded to "
                            "10 mantissa bits); rebuild it with `megactor-rt build-engines`")
            continue
        valid.append((record.profile_name, directory))
    if valid:
        # every profile's plan (the runner picks, per call, one whose shape ranges hold the inputs), the
        # default profile's first: it is tuned for the export's window
        valid.sort(key=lambda v: (v[0] != "default", v[0], v[1].name))
        valid = [v for i, v in enumerate(valid) if v[0] not in {n for n, _ in valid[:i]}]  # one per profile
        dirs = tuple(d for _, d in valid)
        profiles = ", ".join(f"{d.name} ({name})" for name, d in valid)
        return BackendChoice(sub, "tensorrt", f"valid plan{'s' if len(dirs) > 1 else ''} {profiles}", dirs[0], dirs)
    if rejected:
        return BackendChoice(sub, fb, "no usable TensorRT plan: " + " | ".join(rejected))
    want = f"{precision}" + (f", profile '{profile}'" if profile else "")
    return BackendChoice(sub, fb, f"no TensorRT plan for {sub} ({want}) in {engine_dir}; build one with "
                                  "`megactor-rt build-engines`")


__all__ = ["BackendChoice", "parse_submodel_list", "select_backends"]
