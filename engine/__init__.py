"""TensorRT: ONNX -> plan builder, engine cache keyed per GPU, TensorRT runner. TensorRT is imported lazily.

``TensorRTRunner`` is loaded on first access (it imports torch and the runtime's runner interface).
"""

from __future__ import annotations

from typing import Any

from .builder import BuildOptions, BuildResult, EngineBuildError, build_engines
from .cache import DeviceInfo, EngineKey, EngineRecord, load_valid_record, plan_dir, read_sidecar
from .manifest import GraphEntry, Manifest, ManifestError, Precision, check_profiles_cover, load_manifest
from .select import BackendChoice, parse_submodel_list, select_backends

__all__ = [
    "BackendChoice", "BuildOptions", "BuildResult", "DeviceInfo", "EngineBuildError", "EngineKey", "EngineRecord",
    "GraphEntry", "Manifest", "ManifestError", "Precision", "TensorRTRunner", "build_engines",
    "check_profiles_cover", "load_manifest", "load_valid_record", "parse_submodel_list", "plan_dir",
    "read_sidecar", "select_backends",
]


def __getattr__(name: str) -> Any:
    if name == "TensorRTRunner":
        from .runner import TensorRTRunner

        return TensorRTRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
