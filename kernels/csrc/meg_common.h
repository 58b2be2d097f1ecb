// Shared host/device helpers for megactor-rt kernels.
//
// Everything here compiles both under nvcc (as __host__ __device__) and under plain g++, so the
// host-side test library (host_kernels.cpp) and the CUDA kernels (cuda_kernels.cu) run the very
// same per-element code. Only the indexing/launch glue differs between the two builds.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MEG_HD __host__ __device__
#else
#define MEG_HD
#endif

#define MEG_INLINE MEG_HD inline

// dtype codes shared with kernels/ops.py (_DTYPE_CODES).
enum MegDtype : int { MEG_F32 = 0, MEG_F16 = 1, MEG_BF16 = 2 };

// Error codes returned by the extern "C" entry points (kernels/_lib.py mirrors them).
// Positive values are cudaError_t codes from the CUDA build.
enum MegStatus : int { MEG_OK = 0, MEG_BAD_DTYPE = -1, MEG_BAD_ARG = -2 };

MEG_INLINE uint32_t meg_float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MEG_INLINE float meg_bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE binary16 <-> binary32, round-to-nearest-even (the device uses the hardware conversion,
// which rounds identically; host code uses this bit-exact software version).
MEG_INLINE uint16_t meg_f32_to_f16_bits(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = meg_float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x0200u : 0u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520 -> inf
  if (ax < 0x38800000u) {                                      // half subnormal (or zero)
    if (ax < 0x33000000u) return (uint16_t)sign;               // < 2^-25 -> +-0
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
  }
  const uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t q = r >> 13;
  const uint32_t rem = r & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
#endif
}

MEG_INLINE float meg_f16_bits_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  const uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
  const uint32_t m = (uint32_t)h & 0x3FFu;
  if (e == 0) {
    const float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return meg_bits_float(meg_float_bits(v) | sign);
  }
  if (e == 31) return meg_bits_float(sign | 0x7F800000u | (m << 13));
  return meg_bits_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

MEG_INLINE uint16_t meg_f32_to_bf16_bits(float f) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = meg_float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u);  // quiet NaN
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

MEG_INLINE float meg_bf16_bits_to_f32(uint16_t b) { return meg_bits_float((uint32_t)b << 16); }

// Load element i of a float32/float16/bfloat16 buffer as float32. The dtype branch is uniform
// across a launch, so it costs nothing measurable in these memory-bound kernels.
template <typename I>
MEG_INLINE float meg_load(const void* p, int dtype, I i) {
  if (dtype == MEG_F16) return meg_f16_bits_to_f32(((const uint16_t*)p)[i]);
  if (dtype == MEG_BF16) return meg_bf16_bits_to_f32(((const uint16_t*)p)[i]);
  return ((const float*)p)[i];
}

template <typename I>
MEG_INLINE void meg_store(void* p, int dtype, I i, float v) {
  if (dtype == MEG_F16) {
    ((uint16_t*)p)[i] = meg_f32_to_f16_bits(v);
  } else if (dtype == MEG_BF16) {
    ((uint16_t*)p)[i] = meg_f32_to_bf16_bits(v);
  } else {
    ((float*)p)[i] = v;
  }
}

MEG_INLINE bool meg_valid_dtype(int dtype) { return dtype == MEG_F32 || dtype == MEG_F16 || dtype == MEG_BF16; }
