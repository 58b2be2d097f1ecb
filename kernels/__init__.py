"""Optional CUDA kernels (built by the top-level CMakeLists.txt) with pure-PyTorch reference fallbacks.

Importing this package loads no library; the compiled kernels are looked up on first use.
See kernels/README.md.
"""

from .ops import (
    ddim_cfg_update,
    ddim_cfg_update_cuda,
    ddim_cfg_update_host,
    ddim_cfg_update_ref,
    ddim_coefficients,
    kernels_status,
    latents_to_uint8,
    latents_to_uint8_cuda,
    latents_to_uint8_host,
    latents_to_uint8_ref,
    preprocess_frame,
    preprocess_frame_cuda,
    preprocess_frame_host,
    preprocess_frame_ref,
)

__all__ = [
    "ddim_cfg_update",
    "ddim_cfg_update_cuda",
    "ddim_cfg_update_host",
    "ddim_cfg_update_ref",
    "ddim_coefficients",
    "kernels_status",
    "latents_to_uint8",
    "latents_to_uint8_cuda",
    "latents_to_uint8_host",
    "latents_to_uint8_ref",
    "preprocess_frame",
    "preprocess_frame_cuda",
    "preprocess_frame_host",
    "preprocess_frame_ref",
]
