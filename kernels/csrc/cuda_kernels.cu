// CUDA build of the kernels: one thread per flat output index calling the shared per-index
// functions of meg_ops.h, launched on the caller's stream (torch.cuda.current_stream()).
// Only the indexing/launch glue lives here; the element math is tested on the CPU through the
// host build of the same header.
#include <cuda_runtime.h>

#include <limits.h>

#include "meg_api.h"

#ifndef MEG_CUDA_ARCHS
#define MEG_CUDA_ARCHS "unknown"
#endif

namespace {

template <typename I>
__device__ __forceinline__ void meg_at(const MegPreprocessParams& p, I i) { meg_preprocess_at(p, i); }
template <typename I>
__device__ __forceinline__ void meg_at(const MegDdimParams& p, I i) { meg_ddim_at(p, i); }
template <typename I>
__device__ __forceinline__ void meg_at(const MegToUint8Params& p, I i) { meg_to_uint8_at(p, i); }

template <typename P, typename I>
__global__ void __launch_bounds__(256) meg_kernel(const P p, const I total) {
  const I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
  if (i < total) meg_at(p, i);
}

// Every kernel addresses at most 3 * total elements; 32-bit indexing when that fits (cheaper
// integer division on the GPU), 64-bit otherwise.
template <typename P>
int meg_launch(const P* p, int64_t total, void* stream) {
  if (p == nullptr) return MEG_BAD_ARG;
  const int rc = meg_check(*p);
  if (rc != MEG_OK) return rc;
  if (total <= 0) return MEG_OK;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return MEG_BAD_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (3 * total < (int64_t)INT_MAX) {
    meg_kernel<P, int32_t><<<(unsigned)blocks, kThreads, 0, s>>>(*p, (int32_t)total);
  } else {
    meg_kernel<P, int64_t><<<(unsigned)blocks, kThreads, 0, s>>>(*p, total);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int meg_abi_version(void) { return MEG_ABI_VERSION; }

long long meg_params_size(int which) { return meg_params_size_impl(which); }

const char* meg_build_info(void) { return "cuda;archs=" MEG_CUDA_ARCHS; }

const char* meg_status_string(int code) {
  const char* name = meg_status_name(code);
  return name != nullptr ? name : cudaGetErrorString(static_cast<cudaError_t>(code));
}

int meg_device_count(void) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  return err == cudaSuccess ? n : -(int)err;
}

int meg_preprocess_frame(const MegPreprocessParams* p, void* stream) {
  return meg_launch(p, p != nullptr ? p->size * p->size : 0, stream);
}

int meg_ddim_cfg_update(const MegDdimParams* p, void* stream) {
  return meg_launch(p, p != nullptr ? p->total : 0, stream);
}

int meg_latents_to_uint8(const MegToUint8Params* p, void* stream) {
  return meg_launch(p, p != nullptr ? p->total : 0, stream);
}

}  // extern "C"
