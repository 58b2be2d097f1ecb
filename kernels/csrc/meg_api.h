// extern "C" entry points exported by both libraries:
//   libmegactor_kernels.so       CUDA kernels (cuda_kernels.cu), launched on the given cudaStream_t
//   libmegactor_kernels_host.so  the same per-index functions looped on the CPU (host_kernels.cpp);
//                                `stream` is ignored. The *_bug variant is built with MEGACTOR_INJECT_BUG.
// Parameters travel as the structs of meg_ops.h (mirrored by ctypes.Structure in kernels/_lib.py;
// meg_params_size() lets the loader check the layouts agree). All return 0 on success, a negative
// MegStatus on invalid arguments, or a positive cudaError_t.
#pragma once

#include "meg_ops.h"

#define MEG_ABI_VERSION 1

extern "C" {
int meg_abi_version(void);
long long meg_params_size(int which);  // 0: preprocess, 1: ddim, 2: to_uint8
const char* meg_build_info(void);
const char* meg_status_string(int code);
int meg_device_count(void);  // CUDA devices visible (negative cudaError_t on failure; host lib: 0)
int meg_preprocess_frame(const MegPreprocessParams* p, void* stream);
int meg_ddim_cfg_update(const MegDdimParams* p, void* stream);
int meg_latents_to_uint8(const MegToUint8Params* p, void* stream);
}

// Argument checks shared by both builds (the Python wrappers validate first; these guard the ABI).
inline int meg_check(const MegPreprocessParams& p) {
  if (!meg_valid_dtype(p.out_dtype)) return MEG_BAD_DTYPE;
  if (p.frame == nullptr || p.out == nullptr || p.in_h < 1 || p.in_w < 1 || p.size < 1) return MEG_BAD_ARG;
  return MEG_OK;
}

inline int meg_check(const MegDdimParams& p) {
  if (!meg_valid_dtype(p.eps_dtype) || !meg_valid_dtype(p.lat_dtype)) return MEG_BAD_DTYPE;
  if (p.eps_out != nullptr && !meg_valid_dtype(p.eps_out_dtype)) return MEG_BAD_DTYPE;
  if (p.eps_sum == nullptr || p.counts == nullptr || p.latents == nullptr || p.out == nullptr) return MEG_BAD_ARG;
  if (p.frames < 1 || p.hw < 1 || p.total < 0 || p.total % (p.frames * p.hw) != 0) return MEG_BAD_ARG;
  return MEG_OK;
}

inline int meg_check(const MegToUint8Params& p) {
  if (!meg_valid_dtype(p.dtype)) return MEG_BAD_DTYPE;
  if (p.images == nullptr || p.out == nullptr || p.hw < 1 || p.total < 0) return MEG_BAD_ARG;
  return MEG_OK;
}

inline long long meg_params_size_impl(int which) {
  switch (which) {
    case 0: return (long long)sizeof(MegPreprocessParams);
    case 1: return (long long)sizeof(MegDdimParams);
    case 2: return (long long)sizeof(MegToUint8Params);
    default: return -1;
  }
}

inline const char* meg_status_name(int code) {
  switch (code) {
    case MEG_OK: return "ok";
    case MEG_BAD_DTYPE: return "unsupported dtype code";
    case MEG_BAD_ARG: return "invalid argument (null pointer or bad size)";
    default: return nullptr;
  }
}
