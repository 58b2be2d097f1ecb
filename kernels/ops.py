"""Fused per-frame / per-step elementwise ops, each a triple (see kernels/README.md):

* ``name(...)``       dispatch: CUDA tensors + compiled library -> fused kernel, else ``name_ref``.
* ``name_ref(...)``   pure PyTorch; the definition of the op, the test oracle and the fallback.
* ``name_cuda(...)``  always the CUDA kernel (on the current torch stream); raises if unavailable.
* ``name_host(...)``  the kernels' element code run on the CPU by the host library (tests).

Shapes: frames (H, W, 3) uint8; video latents (B, C, F, H, W) with B = 1 (2 for the CFG eps halves).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _lib
from ._lib import DdimParams, LoadedLib, PreprocessParams, ToUint8Params

logger = logging.getLogger(__name__)

__all__ = [
    "preprocess_frame",
    "preprocess_frame_ref",
    "preprocess_frame_cuda",
    "preprocess_frame_host",
    "ddim_cfg_update",
    "ddim_cfg_update_ref",
    "ddim_cfg_update_cuda",
    "ddim_cfg_update_host",
    "latents_to_uint8",
    "latents_to_uint8_ref",
    "latents_to_uint8_cuda",
    "latents_to_uint8_host",
    "ddim_coefficients",
    "kernels_status",
]

kernels_status = _lib.kernels_status
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # MegDtype in meg_common.h
_FLOAT_DTYPES = "torch.float32, torch.float16 or torch.bfloat16"
Box = tuple[int, int, int, int]
_fallback_logged = False


# ---------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------
def _check_float(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name} must be {_FLOAT_DTYPES}, got {t.dtype}")
    return t


def _check_box(name: str, box: Sequence[int]) -> Box:
    try:
        vals = tuple(operator.index(v) for v in box)
    except TypeError as exc:
        raise ValueError(f"{name} must be 4 ints (top, left, bottom, right), got {box!r}") from exc
    if len(vals) != 4:
        raise ValueError(f"{name} must be 4 ints (top, left, bottom, right), got {box!r}")
    return vals  # type: ignore[return-value]


def _use_kernel(*tensors: torch.Tensor) -> bool:
    global _fallback_logged
    if not all(t.is_cuda for t in tensors):
        return False
    lib = _lib.cuda_lib_for(torch.cuda.get_device_capability(tensors[0].device))
    if not lib.available and not _fallback_logged:
        _fallback_logged = True
        logger.info("CUDA kernels unavailable (%s); using the PyTorch reference ops", lib.reason)
    return lib.available


def _run(
    fn: str,
    backend: str,
    tensors: Sequence[torch.Tensor],
    launch: Callable[[LoadedLib, int], torch.Tensor],
    bug: bool = False,
) -> torch.Tensor:
    """Run ``launch(lib, stream)`` on the CUDA library (current torch stream) or the host library."""
    if backend == "host":
        if any(t.is_cuda for t in tensors):
            raise ValueError(f"{fn}_host takes CPU tensors")
        lib = _lib.host_lib(bug)
        if not lib.available:
            raise RuntimeError(f"{fn}_host: host kernel library unavailable: {lib.reason}")
        return launch(lib, 0)
    device = tensors[0].device
    if any(not t.is_cuda or t.device != device for t in tensors):
        raise ValueError(
            f"{fn}_cuda takes CUDA tensors on one device, got {[str(t.device) for t in tensors]}"
        )
    lib = _lib.cuda_lib_for(torch.cuda.get_device_capability(device))
    if not lib.available:
        raise RuntimeError(
            f"{fn}_cuda: compiled CUDA kernels unavailable: {lib.reason}. "
            f"Build them from the repository root with: {_lib.BUILD_COMMAND}"
        )
    with torch.cuda.device(device):
        return launch(lib, torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------------------------------------
# preprocess_frame
# ---------------------------------------------------------------------------------------------
def _check_preprocess(
    frame: torch.Tensor, crop: Sequence[int], keep: Sequence[int] | None, size: int, dtype: torch.dtype
) -> tuple[Box, Box]:
    if (
        not isinstance(frame, torch.Tensor)
        or frame.dtype != torch.uint8
        or frame.ndim != 3
        or frame.shape[2] != 3
    ):
        got = (
            f"{tuple(frame.shape)} {frame.dtype}" if isinstance(frame, torch.Tensor) else type(frame).__name__
        )
        raise ValueError(f"frame must be a (H, W, 3) uint8 RGB tensor, got {got}")
    height, width = frame.shape[:2]
    top, left, bottom, right = box = _check_box("crop", crop)
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(
            f"crop {box} must satisfy 0 <= top < bottom <= {height} and 0 <= left < right <= {width}"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype must be {_FLOAT_DTYPES}, got {dtype}")
    kt, kl, kb, kr = (0, 0, size, size) if keep is None else _check_box("keep", keep)
    clip = lambda v: min(max(v, 0), size)  # noqa: E731 - same pixel set, values stay int64-safe
    return box, (clip(kt), clip(kl), clip(kb), clip(kr))


def preprocess_frame_ref(
    frame: torch.Tensor,
    crop: Sequence[int],
    keep: Sequence[int] | None = None,
    size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Crop, bilinear-resize, mask, grey-scale and normalise one RGB frame (PyTorch reference).

    Args:
        frame: (H, W, 3) uint8 RGB, CPU or CUDA.
        crop: (top, left, bottom, right) in source pixels, 0 <= top < bottom <= H, 0 <= left < right <= W.
        keep: (top, left, bottom, right) in output pixels; pixels outside are zeroed. None keeps all.
        size: output side length.
        dtype: float32, float16 or bfloat16.

    Returns:
        (3, size, size) tensor on frame's device: grey = 0.2989 R + 0.5870 G + 0.1140 B of the
        bilinear (align_corners=False) resize, clamped to [0, 255], divided by 255, in 3 channels.

    Raises:
        ValueError: on bad shapes, dtypes or boxes.
    """
    (top, left, bottom, right), (kt, kl, kb, kr) = _check_preprocess(frame, crop, keep, size, dtype)
    x = frame[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0).float().contiguous()  # (1, 3, h, w)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]
    rows = torch.arange(size, device=x.device)
    inside = ((rows >= kt) & (rows < kb))[:, None] & ((rows >= kl) & (rows < kr))[None, :]  # (size, size)
    x = x * inside  # (3, size, size); outside keep -> 0
    return grey_unit(x, dtype)


def grey_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Upstream's driver grey conversion: ``(3, H, W)`` RGB in 0..255 -> ``(3, H, W)`` grey
    (0.2989 R + 0.5870 G + 0.1140 B, clamped to [0, 255], divided by 255) in all three channels."""
    x = x.float()
    grey = 0.2989 * x[0] + 0.5870 * x[1] + 0.1140 * x[2]  # (H, W), float32
    grey = grey.clamp(0, 255) / 255
    return grey.to(dtype).expand(3, *grey.shape).contiguous()


def _preprocess_launch(frame: torch.Tensor, crop: Box, keep: Box, size: int, dtype: torch.dtype):
    def launch(lib: LoadedLib, stream: int) -> torch.Tensor:
        out = torch.empty((3, size, size), dtype=dtype, device=frame.device)
        top, left, bottom, right = crop
        sh, sw, sc = frame.stride()
        params = PreprocessParams(
            frame=frame.data_ptr() + top * sh + left * sw,
            stride_h=sh,
            stride_w=sw,
            stride_c=sc,
            in_h=bottom - top,
            in_w=right - left,
            size=size,
            keep_top=keep[0],
            keep_left=keep[1],
            keep_bottom=keep[2],
            keep_right=keep[3],
            out=out.data_ptr(),
            out_dtype=_DTYPE_CODES[dtype],
        )
        lib.call("meg_preprocess_frame", params, stream)
        return out

    return launch


def preprocess_frame_cuda(
    frame: torch.Tensor,
    crop: Sequence[int],
    keep: Sequence[int] | None = None,
    size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fused CUDA :func:`preprocess_frame_ref` (one pass). Raises RuntimeError if not built."""
    box, kept = _check_preprocess(frame, crop, keep, size, dtype)
    return _run("preprocess_frame", "cuda", [frame], _preprocess_launch(frame, box, kept, size, dtype))


def preprocess_frame_host(
    frame: torch.Tensor,
    crop: Sequence[int],
    keep: Sequence[int] | None = None,
    size: int = 512,
    dtype: torch.dtype = torch.float32,
    bug: bool = False,
) -> torch.Tensor:
    """The kernel's element code on CPU tensors via the host library (``bug``: injected-bug build)."""
    box, kept = _check_preprocess(frame, crop, keep, size, dtype)
    return _run("preprocess_frame", "host", [frame], _preprocess_launch(frame, box, kept, size, dtype), bug)


def preprocess_frame(
    frame: torch.Tensor,
    crop: Sequence[int],
    keep: Sequence[int] | None = None,
    size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`preprocess_frame_ref` semantics; fused kernel for CUDA frames when built."""
    if _use_kernel(frame):
        return preprocess_frame_cuda(frame, crop, keep, size, dtype)
    return preprocess_frame_ref(frame, crop, keep, size, dtype)


# ---------------------------------------------------------------------------------------------
# ddim_cfg_update
# ---------------------------------------------------------------------------------------------
def ddim_coefficients(alpha_t: float | torch.Tensor, alpha_prev: float | torch.Tensor) -> tuple[float, ...]:
    """(sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)), computed in float32 like diffusers.

    Pass Python floats or CPU tensors (a CUDA scalar would force a device sync).

    Raises:
        ValueError: unless 0 < alpha_t <= 1 and 0 < alpha_prev <= 1.
    """
    a_t, a_p = np.float32(float(alpha_t)), np.float32(float(alpha_prev))  # float32 like alphas_cumprod
    if not (0 < a_t <= 1 and 0 < a_p <= 1):
        raise ValueError(f"alpha_t and alpha_prev must be in (0, 1], got {float(a_t)}, {float(a_p)}")
    one = np.float32(1)
    return tuple(float(np.sqrt(c)) for c in (a_t, one - a_t, a_p, one - a_p))


def _check_ddim(
    eps_sum: torch.Tensor, counts: torch.Tensor, latents: torch.Tensor, eps_out: torch.Tensor | None
) -> None:
    _check_float("eps_sum", eps_sum)
    _check_float("latents", latents)
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, C, N, H, W), got {tuple(latents.shape)}")
    if eps_sum.ndim != 5 or eps_sum.shape[0] not in (1, 2) or eps_sum.shape[1:] != latents.shape[1:]:
        raise ValueError(
            f"eps_sum must be (2, C, N, H, W) or (1, C, N, H, W) with C, N, H, W of latents "
            f"{tuple(latents.shape[1:])}, got {tuple(eps_sum.shape)}"
        )
    if (
        not isinstance(counts, torch.Tensor)
        or counts.shape != (latents.shape[2],)
        or not counts.is_floating_point()
    ):
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"counts must be a float tensor of shape (N,) = ({latents.shape[2]},), got {got}")
    if eps_out is not None:
        _check_float("eps_out", eps_out)
        if eps_out.shape != latents.shape or not eps_out.is_contiguous():
            raise ValueError(
                f"eps_out must be a contiguous {tuple(latents.shape)} tensor, got {tuple(eps_out.shape)}"
            )
    devices = {t.device for t in (eps_sum, counts, latents, eps_out) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"eps_sum, counts, latents and eps_out must share a device, got {devices}")


def ddim_cfg_update_ref(
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eps_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window-average the eps sums, apply classifier-free guidance and take a DDIM step (reference).

    Args:
        eps_sum: (2, C, N, H, W) per-frame sums of window predictions, [0] unconditional, [1] conditional;
            or (1, C, N, H, W) without CFG. float32/float16/bfloat16.
        counts: (N,) float, number of windows that covered each frame (> 0).
        latents: (1, C, N, H, W) current sample x_t.
        guidance: CFG scale (ignored without CFG).
        alpha_t, alpha_prev: alphas_cumprod at t and at the previous timestep, in (0, 1].
        eps_out: optional (1, C, N, H, W) contiguous tensor that receives the guided eps.

    Returns:
        (1, C, N, H, W) x_{t-1} in latents' dtype (math in float32, diffusers DDIM eta=0 order).

    Raises:
        ValueError: on bad shapes, dtypes, devices or alphas.
    """
    _check_ddim(eps_sum, counts, latents, eps_out)
    sqrt_at, sqrt_1m_at, sqrt_ap, sqrt_1m_ap = ddim_coefficients(alpha_t, alpha_prev)
    s = eps_sum.float()  # (2|1, C, N, H, W)
    cnt = counts.float().view(1, -1, 1, 1)  # (1, N, 1, 1)
    eps = s[0] / cnt  # (C, N, H, W)
    if s.shape[0] == 2:
        eps = eps + float(guidance) * (s[1] / cnt - eps)
    pred_x0 = (latents[0].float() - sqrt_1m_at * eps) / sqrt_at
    x_prev = sqrt_ap * pred_x0 + sqrt_1m_ap * eps
    if eps_out is not None:
        eps_out.copy_(eps.unsqueeze(0))
    return x_prev.unsqueeze(0).to(latents.dtype)  # (1, C, N, H, W)


def _ddim_launch(
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    coefs: tuple[float, ...],
    eps_out: torch.Tensor | None,
):
    def launch(lib: LoadedLib, stream: int) -> torch.Tensor:
        es, lat = eps_sum.contiguous(), latents.contiguous()
        cnt = counts.to(torch.float32).contiguous()
        out = torch.empty_like(lat)
        if out.numel() == 0:
            return out
        params = DdimParams(
            eps_sum=es.data_ptr(),
            eps_dtype=_DTYPE_CODES[es.dtype],
            has_cfg=int(es.shape[0] == 2),
            counts=cnt.data_ptr(),
            latents=lat.data_ptr(),
            out=out.data_ptr(),
            lat_dtype=_DTYPE_CODES[lat.dtype],
            eps_out=eps_out.data_ptr() if eps_out is not None else None,
            eps_out_dtype=_DTYPE_CODES[eps_out.dtype] if eps_out is not None else 0,
            frames=lat.shape[2],
            hw=lat.shape[3] * lat.shape[4],
            total=lat.numel(),
            guidance=float(guidance),
            sqrt_alpha_t=coefs[0],
            sqrt_one_minus_alpha_t=coefs[1],
            sqrt_alpha_prev=coefs[2],
            sqrt_one_minus_alpha_prev=coefs[3],
        )
        lib.call("meg_ddim_cfg_update", params, stream)
        return out

    return launch


def _ddim_backend(
    backend: str,
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eps_out: torch.Tensor | None,
    bug: bool = False,
) -> torch.Tensor:
    _check_ddim(eps_sum, counts, latents, eps_out)
    coefs = ddim_coefficients(alpha_t, alpha_prev)
    tensors = [t for t in (eps_sum, counts, latents, eps_out) if t is not None]
    return _run(
        "ddim_cfg_update",
        backend,
        tensors,
        _ddim_launch(eps_sum, counts, latents, guidance, coefs, eps_out),
        bug,
    )


def ddim_cfg_update_cuda(
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eps_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused CUDA :func:`ddim_cfg_update_ref` (one pass). Raises RuntimeError if not built."""
    return _ddim_backend("cuda", eps_sum, counts, latents, guidance, alpha_t, alpha_prev, eps_out)


def ddim_cfg_update_host(
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eps_out: torch.Tensor | None = None,
    bug: bool = False,
) -> torch.Tensor:
    """The kernel's element code on CPU tensors via the host library (``bug``: injected-bug build)."""
    return _ddim_backend("host", eps_sum, counts, latents, guidance, alpha_t, alpha_prev, eps_out, bug)


def ddim_cfg_update(
    eps_sum: torch.Tensor,
    counts: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eps_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ddim_cfg_update_ref` semantics; fused kernel for CUDA tensors when built."""
    tensors = [t for t in (eps_sum, counts, latents, eps_out) if isinstance(t, torch.Tensor)]
    if _use_kernel(*tensors):
        return ddim_cfg_update_cuda(eps_sum, counts, latents, guidance, alpha_t, alpha_prev, eps_out)
    return ddim_cfg_update_ref(eps_sum, counts, latents, guidance, alpha_t, alpha_prev, eps_out)


# ---------------------------------------------------------------------------------------------
# latents_to_uint8
# ---------------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor) -> None:
    _check_float("images", images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")


def latents_to_uint8_ref(images: torch.Tensor) -> torch.Tensor:
    """Decoded VAE images in [-1, 1] to uint8 frames (reference).

    Args:
        images: (N, 3, H, W) float32/float16/bfloat16.

    Returns:
        (N, H, W, 3) uint8 = trunc(clamp(x / 2 + 0.5, 0, 1) * 255) computed in float32 (truncation,
        as upstream); NaN gives 0.

    Raises:
        ValueError: on bad shape or dtype.
    """
    _check_images(images)
    v = (images.float() / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)  # (N, 3, H, W)
    return (v * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, H, W, 3)


def _to_uint8_launch(images: torch.Tensor):
    def launch(lib: LoadedLib, stream: int) -> torch.Tensor:
        img = images.contiguous()
        n, _, h, w = img.shape
        out = torch.empty((n, h, w, 3), dtype=torch.uint8, device=img.device)
        if out.numel() == 0:
            return out
        params = ToUint8Params(
            images=img.data_ptr(),
            dtype=_DTYPE_CODES[img.dtype],
            hw=h * w,
            total=n * h * w,
            out=out.data_ptr(),
        )
        lib.call("meg_latents_to_uint8", params, stream)
        return out

    return launch


def latents_to_uint8_cuda(images: torch.Tensor) -> torch.Tensor:
    """Fused CUDA :func:`latents_to_uint8_ref` (one pass). Raises RuntimeError if not built."""
    _check_images(images)
    return _run("latents_to_uint8", "cuda", [images], _to_uint8_launch(images))


def latents_to_uint8_host(images: torch.Tensor, bug: bool = False) -> torch.Tensor:
    """The kernel's element code on a CPU tensor via the host library (``bug``: injected-bug build)."""
    _check_images(images)
    return _run("latents_to_uint8", "host", [images], _to_uint8_launch(images), bug)


def latents_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """:func:`latents_to_uint8_ref` semantics; fused kernel for CUDA tensors when built."""
    if isinstance(images, torch.Tensor) and _use_kernel(images):
        return latents_to_uint8_cuda(images)
    return latents_to_uint8_ref(images)
