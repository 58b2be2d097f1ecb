"""Lazy ctypes loader for the compiled kernel libraries (see kernels/README.md).

Nothing is loaded at import time. ``cuda_lib()`` / ``host_lib()`` find, load and check a library on
first use and cache the outcome (including the reason it is unavailable).
Lookup for each library name: where ``$MEGACTOR_KERNELS_LIB`` points, if set (a folder, or the CUDA library's
file; the host libraries are looked for beside it), and nowhere else; otherwise ``<repo>/build/kernels/``, then
next to this file. A CUDA library whose compiled architectures do not run on a GPU is not used there
(:func:`cuda_lib_for`).
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
    """Where to look for library ``name``: with ``$MEGACTOR_KERNELS_LIB`` set, only where it points (the CUDA
    library: that file, or ``name`` in that folder; the host libraries: beside it), so a library it names that
    is missing or does not load is reported, not silently replaced by another build."""
    env = os.environ.get(ENV_VAR)
    if env:
        env_path = Path(env).expanduser()
        folder = env_path if env_path.is_dir() else env_path.parent
        return [env_path if name == CUDA_LIB_NAME and not env_path.is_dir() else folder / name]
    return [_REPO_BUILD_DIR / name, _HERE / name]


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
    if os.environ.get(ENV_VAR):
        out.reason += f" (${ENV_VAR} is set: only where it points is searched)"
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


def compiled_archs(build_info: str) -> list[str]:
    """The ``CMAKE_CUDA_ARCHITECTURES`` entries a CUDA library was built for (from its build info), e.g.
    ``["80-real", "86-real", "90"]``; empty for a host library or an unknown list."""
    if not build_info.startswith("cuda;archs="):
        return []
    archs = [a.strip() for a in build_info.split("=", 1)[1].split(",") if a.strip()]
    return [] if archs == ["unknown"] else archs


def arch_runs_on(archs: list[str], capability: tuple[int, int]) -> bool | None:
    """Whether code built for ``archs`` (CMake's CUDA architecture entries) runs on a GPU of compute
    ``capability`` (major, minor); None where the list cannot tell (empty, or ``native``/``all``...).

    An entry ``NN`` embeds machine code (SASS) for NN and PTX; ``NN-real`` SASS only; ``NN-virtual`` PTX only.
    SASS runs on the same major version at the same or a higher minor one; PTX is compiled by the driver for
    any GPU at least as new. Arch-specific entries (``90a``, ``100f``) run on that exact GPU (family) only.
    """
    major, minor = capability
    told = False
    for entry in archs:
        code, _, kind = entry.partition("-")
        digits = code.rstrip("af")
        if not digits.isdigit() or len(digits) < 2 or kind not in ("", "real", "virtual"):
            continue  # native, all, all-major, or a form not known here
        told = True
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if code != digits:  # 90a / 100f: that GPU (family) only
            if (major, minor) == (a_major, a_minor) or (code.endswith("f") and major == a_major
                                                        and minor >= a_minor):
                return True
            continue
        if kind in ("", "real") and major == a_major and minor >= a_minor:
            return True
        if kind in ("", "virtual") and (major, minor) >= (a_major, a_minor):
            return True
    return False if told else None


def cuda_lib_for(capability: tuple[int, int]) -> LoadedLib:
    """:func:`cuda_lib` where its compiled architectures run on a GPU of ``capability``; otherwise an unavailable
    :class:`LoadedLib` saying so (a launch there would fail with "no kernel image is available")."""
    lib = cuda_lib()
    if not lib.available or arch_runs_on(compiled_archs(lib.build_info), capability) is not False:
        return lib
    arch = f"{capability[0]}{capability[1]}"
    return LoadedLib(name=lib.name, path=lib.path, build_info=lib.build_info, tried=lib.tried,
                     reason=f"{lib.path} was built for CUDA architectures {','.join(compiled_archs(lib.build_info))}, "
                            f"which do not run on this compute capability {capability[0]}.{capability[1]} GPU; "
                            f"rebuild with: cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES={arch} && "
                            "cmake --build build -j2")


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
        ``host_library`` (path or None), ``build_command`` (str); with a usable library and a GPU in view also
        ``this_gpu`` (str): whether its architectures run on the current GPU (else the rebuild command).
    """
    cuda, host = cuda_lib(), host_lib()
    archs = [a.split("-")[0] for a in compiled_archs(cuda.build_info)]
    status = {
        "available": cuda.available,
        "library": str(cuda.path) if cuda.path else None,
        "reason": (cuda.reason or "ok") + (" (the CUDA runtime finds no NVIDIA driver: no GPU on this machine?)"
                                           if "driver version is insufficient" in (cuda.reason or "") else ""),
        "build_info": cuda.build_info,
        "compute_capabilities": archs,
        "host_library": str(host.path) if host.path else None,
        "build_command": BUILD_COMMAND,
    }
    capability = _gpu_capability() if cuda.available else None
    if capability is not None:
        here = cuda_lib_for(capability)
        status["this_gpu"] = (f"compute capability {capability[0]}.{capability[1]}: "
                              + ("the library runs here" if here.available else here.reason))
    return status


def _gpu_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, or None without one (torch imported only here)."""
    try:
        import torch
    except ImportError:
        return None
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None  # type: ignore[return-value]
