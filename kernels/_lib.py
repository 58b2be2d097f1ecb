"""Lazy ctypes loader for the compiled kernel libraries (see kernels/README.md).

Nothing is loaded at import time. ``cuda_lib()`` / ``host_lib()`` find, load and check a library on
first use and cache the outcome (including the reason it is unavailable).
Lookup order for each library name: the directory of ``$MEGACTOR_KERNELS_LIB`` (for the CUDA library,
that exact file), then ``<repo>/build/kernels/``, then next to this file.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_COMMAND = "cmake -S . -B build && cmake --build build -j2"
ENV_VAR = "MEGACTOR_KERNELS_LIB"
CUDA_LIB_NAME = "libmegactor_kernels.so"
HOST_LIB_NAME = "libmegactor_kernels_host.so"
HOST_BUG_LIB_NAME = "libmegactor_kernels_host_bug.so"
ABI_VERSION = 1

_HERE = Path(__file__).resolve().parent
_REPO_BUILD_DIR = _HERE.parent / "build" / "kernels"


class PreprocessParams(ctypes.Structure):
    """Mirror of ``MegPreprocessParams`` (kernels/csrc/meg_ops.h)."""

    _fields_ = [
        ("frame", ctypes.c_void_p),
        ("stride_h", ctypes.c_int64),
        ("stride_w", ctypes.c_int64),
        ("stride_c", ctypes.c_int64),
        ("in_h", ctypes.c_int64),
        ("in_w", ctypes.c_int64),
        ("size", ctypes.c_int64),
        ("keep_top", ctypes.c_int64),
        ("keep_left", ctypes.c_int64),
        ("keep_bottom", ctypes.c_int64),
        ("keep_right", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_dtype", ctypes.c_int),
    ]


class DdimParams(ctypes.Structure):
    """Mirror of ``MegDdimParams`` (kernels/csrc/meg_ops.h)."""

    _fields_ = [
        ("eps_sum", ctypes.c_void_p),
        ("eps_dtype", ctypes.c_int),
        ("has_cfg", ctypes.c_int),
        ("counts", ctypes.c_void_p),
        ("latents", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lat_dtype", ctypes.c_int),
        ("eps_out", ctypes.c_void_p),
        ("eps_out_dtype", ctypes.c_int),
        ("frames", ctypes.c_int64),
        ("hw", ctypes.c_int64),
        ("total", ctypes.c_int64),
        ("guidance", ctypes.c_float),
        ("sqrt_alpha_t", ctypes.c_float),
        ("sqrt_one_minus_alpha_t", ctypes.c_float),
        ("sqrt_alpha_prev", ctypes.c_float),
        ("sqrt_one_minus_alpha_prev", ctypes.c_float),
    ]


class ToUint8Params(ctypes.Structure):
    """Mirror of ``MegToUint8Params`` (kernels/csrc/meg_ops.h)."""

    _fields_ = [
        ("images", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("hw", ctypes.c_int64),
        ("total", ctypes.c_int64),
        ("out", ctypes.c_void_p),
    ]


_PARAM_STRUCTS = (PreprocessParams, DdimParams, ToUint8Params)
_ENTRY_POINTS = {
    "meg_preprocess_frame": PreprocessParams,
    "meg_ddim_cfg_update": DdimParams,
    "meg_latents_to_uint8": ToUint8Params,
}


@dataclass
class LoadedLib:
    """Outcome of looking up one library: ``lib`` is None when unusable, ``reason`` says why."""

    name: str
    lib: ctypes.CDLL | None = None
    path: Path | None = None
    reason: str = ""
    build_info: str = ""
    tried: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.lib is not None

    def call(self, fn: str, params: ctypes.Structure, stream: int = 0) -> None:
        """Call entry point ``fn``; raises RuntimeError with the library's message on failure."""
        if self.lib is None:
            raise RuntimeError(f"{self.name} is not available: {self.reason}")
        rc = getattr(self.lib, fn)(ctypes.byref(params), ctypes.c_void_p(stream))
        if rc != 0:
            msg = self.lib.meg_status_string(rc).decode(errors="replace")
            raise RuntimeError(f"{fn} failed in {self.path}: {msg} (code {rc})")


def _candidates(name: str) -> list[Path]:
    paths: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        env_path = Path(env).expanduser()
        paths.append(env_path if name == CUDA_LIB_NAME else env_path.parent / name)
    paths += [_REPO_BUILD_DIR / name, _HERE / name]
    return paths


def _bind(lib: ctypes.CDLL) -> None:
    lib.meg_abi_version.restype = ctypes.c_int
    lib.meg_params_size.restype = ctypes.c_longlong
    lib.meg_params_size.argtypes = [ctypes.c_int]
    lib.meg_build_info.restype = ctypes.c_char_p
    lib.meg_status_string.restype = ctypes.c_char_p
    lib.meg_status_string.argtypes = [ctypes.c_int]
    lib.meg_device_count.restype = ctypes.c_int
    for fn, struct in _ENTRY_POINTS.items():
        getattr(lib, fn).restype = ctypes.c_int
        getattr(lib, fn).argtypes = [ctypes.POINTER(struct), ctypes.c_void_p]


def _check_abi(lib: ctypes.CDLL) -> str:
    """Empty string if the library matches this Python side, else the mismatch."""
    if lib.meg_abi_version() != ABI_VERSION:
        return f"ABI version {lib.meg_abi_version()} != {ABI_VERSION}; rebuild with: {BUILD_COMMAND}"
    for i, struct in enumerate(_PARAM_STRUCTS):
        if lib.meg_params_size(i) != ctypes.sizeof(struct):
            return f"{struct.__name__} layout mismatch; rebuild with: {BUILD_COMMAND}"
    return ""


def _load(name: str) -> LoadedLib:
    out = LoadedLib(name=name)
    for path in _candidates(name):
        out.tried.append(str(path))
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except (OSError, AttributeError) as exc:
            out.reason = f"cannot load {path}: {exc}"
            continue
        mismatch = _check_abi(lib)
        if mismatch:
            out.reason = f"{path}: {mismatch}"
            continue
        out.lib, out.path = lib, path
        out.build_info = lib.meg_build_info().decode()
        out.reason = ""
        return out
    if not out.reason:
        out.reason = f"{name} not found (tried {', '.join(out.tried)}); build it with: {BUILD_COMMAND}"
    return out


def _load_cuda() -> LoadedLib:
    out = _load(CUDA_LIB_NAME)
    if out.lib is not None:
        count = out.lib.meg_device_count()
        if count <= 0:
            why = out.lib.meg_status_string(-count).decode() if count < 0 else "no CUDA device"
            out.reason = f"{out.path} loaded but its CUDA runtime is unusable: {why}"
            out.lib = None
    return out


_cache: dict[str, LoadedLib] = {}
_lock = threading.Lock()


def _cached(key: str, loader: Callable[[], LoadedLib]) -> LoadedLib:
    with _lock:
        if key not in _cache:
            _cache[key] = loader()
            logger.debug("kernels: %s -> %s", key, _cache[key].path or _cache[key].reason)
        return _cache[key]


def cuda_lib() -> LoadedLib:
    """The CUDA kernel library (loaded and checked once; ``available`` False with a reason if not)."""
    return _cached("cuda", _load_cuda)


def host_lib(bug: bool = False) -> LoadedLib:
    """The host (CPU) build of the element functions; ``bug=True`` gives the bug-injected build."""
    name = HOST_BUG_LIB_NAME if bug else HOST_LIB_NAME
    return _cached(name, lambda: _load(name))


def reset_cache() -> None:
    """Forget loaded libraries (tests; after rebuilding). Already-loaded .so files stay mapped."""
    with _lock:
        _cache.clear()


def kernels_status() -> dict:
    """Summary for ``megactor-rt doctor``: which library was found, why not, compiled archs.

    Returns:
        dict with keys ``available`` (bool), ``library`` (path or None), ``reason`` (str),
        ``build_info`` (str), ``compute_capabilities`` (list of str, e.g. ["80", "86", "90"]),
        ``host_library`` (path or None), ``build_command`` (str).
    """
    cuda, host = cuda_lib(), host_lib()
    archs: list[str] = []
    if cuda.build_info.startswith("cuda;archs="):
        archs = [a.split("-")[0] for a in cuda.build_info.split("=", 1)[1].split(",") if a]
    return {
        "available": cuda.available,
        "library": str(cuda.path) if cuda.path else None,
        "reason": cuda.reason or "ok",
        "build_info": cuda.build_info,
        "compute_capabilities": archs,
        "host_library": str(host.path) if host.path else None,
        "build_command": BUILD_COMMAND,
    }
