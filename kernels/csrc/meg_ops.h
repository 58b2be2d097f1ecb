// Per-element computations of the megactor-rt kernels, shared by the CUDA kernels and the host
// test library. Each op has
//   * a pure element function (bilinear sample, grey + normalise, DDIM update, float -> uint8), and
//   * a per-index function `meg_<op>_at(params, i)` that does the full work for one flat output
//     index: address arithmetic, loads, the element function, stores.
// The CUDA kernels are `if (i < total) meg_<op>_at(p, i)`; the host library loops i over the same
// range. Building the host library with -DMEGACTOR_INJECT_BUG perturbs every element function so
// the test-suite can prove it detects a wrong element function.
//
// Both builds disable FMA contraction (--fmad=false / -ffp-contract=off) so host and device
// results are bit-identical and follow the operation order of the PyTorch references.
#pragma once

#include "meg_common.h"

#ifdef MEGACTOR_INJECT_BUG
#define MEG_BUG_F(v) ((v) * 1.001f + 1e-3f)
#define MEG_BUG_U8(q) ((q) == 255 ? 254 : (q) + 1)
#else
#define MEG_BUG_F(v) (v)
#define MEG_BUG_U8(q) (q)
#endif

// ---------------------------------------------------------------------------------------------
// preprocess_frame: uint8 HWC crop -> bilinear (align_corners=False) -> keep mask -> grey -> /255
// ---------------------------------------------------------------------------------------------
struct MegPreprocessParams {
  const uint8_t* frame;  // points at the crop origin (top, left, channel 0)
  int64_t stride_h, stride_w, stride_c;  // in elements
  int64_t in_h, in_w;                    // crop size
  int64_t size;                          // output is (3, size, size)
  int64_t keep_top, keep_left, keep_bottom, keep_right;  // output pixels kept; others are 0
  void* out;
  int out_dtype;
};

// Source index/weight of one output coordinate, exactly as ATen's upsample_bilinear2d
// (area_pixel_compute_source_index + guard_index_and_lambda, float32 math).
MEG_INLINE void meg_linear_coord(int64_t dst, int64_t in, int64_t out, int64_t* i0, int64_t* i1,
                                 float* lam0, float* lam1) {
  const float scale = (float)in / (float)out;
  // ATen's `scale * (dst + 0.5) - 0.5` is FMA-contracted in both its CPU (AVX2/FMA) and CUDA
  // builds; the explicit fmaf reproduces their source positions exactly.
  float src = fmaf(scale, (float)dst + 0.5f, -0.5f);
  if (src < 0.0f) src = 0.0f;
  int64_t i = (int64_t)src;  // src >= 0: truncation == floor
  if (i > in - 1) i = in - 1;
  float l1 = src - (float)i;
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  *i0 = i;
  *i1 = i + ((i < in - 1) ? 1 : 0);
  *lam1 = l1;
  *lam0 = 1.0f - l1;
}

MEG_INLINE float meg_bilinear(float v00, float v01, float v10, float v11, float h0l, float h1l, float w0l,
                              float w1l) {
  return h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11);
}

// grey = 0.2989 R + 0.5870 G + 0.1140 B, clamped to [0, 255], scaled to [0, 1].
MEG_INLINE float meg_grey_unit(float r, float g, float b) {
  float y = 0.2989f * r + 0.5870f * g + 0.1140f * b;
  y = y < 0.0f ? 0.0f : (y > 255.0f ? 255.0f : y);
  return MEG_BUG_F(y / 255.0f);
}

template <typename I>
MEG_INLINE void meg_preprocess_at(const MegPreprocessParams& p, I idx) {
  const I size = (I)p.size;
  const I oy = idx / size;
  const I ox = idx - oy * size;
  float rgb[3] = {0.0f, 0.0f, 0.0f};
  const bool kept = oy >= p.keep_top && oy < p.keep_bottom && ox >= p.keep_left && ox < p.keep_right;
  if (kept) {
    int64_t h0, h1, w0, w1;
    float h0l, h1l, w0l, w1l;
    meg_linear_coord(oy, p.in_h, p.size, &h0, &h1, &h0l, &h1l);
    meg_linear_coord(ox, p.in_w, p.size, &w0, &w1, &w0l, &w1l);
    const uint8_t* r0 = p.frame + h0 * p.stride_h;
    const uint8_t* r1 = p.frame + h1 * p.stride_h;
    for (int c = 0; c < 3; ++c) {
      const int64_t oc = c * p.stride_c;
      rgb[c] = meg_bilinear((float)r0[w0 * p.stride_w + oc], (float)r0[w1 * p.stride_w + oc],
                            (float)r1[w0 * p.stride_w + oc], (float)r1[w1 * p.stride_w + oc], h0l, h1l, w0l, w1l);
    }
  }
  const float y = meg_grey_unit(rgb[0], rgb[1], rgb[2]);
  const I plane = size * size;
  meg_store(p.out, p.out_dtype, idx, y);
  meg_store(p.out, p.out_dtype, idx + plane, y);
  meg_store(p.out, p.out_dtype, idx + 2 * plane, y);
}

// ---------------------------------------------------------------------------------------------
// ddim_cfg_update: window-average -> classifier-free guidance -> DDIM step (eta = 0)
// ---------------------------------------------------------------------------------------------
struct MegDdimParams {
  const void* eps_sum;  // (2 or 1, C, N, H, W)
  int eps_dtype;
  int has_cfg;             // 1: eps_sum[0] = uncond, eps_sum[1] = cond; 0: eps_sum has one half
  const float* counts;     // (N,)
  const void* latents;     // (1, C, N, H, W)
  void* out;               // (1, C, N, H, W), dtype of latents
  int lat_dtype;
  void* eps_out;           // optional (1, C, N, H, W)
  int eps_out_dtype;
  int64_t frames, hw, total;  // N, H*W, C*N*H*W
  float guidance;
  float sqrt_alpha_t, sqrt_one_minus_alpha_t, sqrt_alpha_prev, sqrt_one_minus_alpha_prev;
};

// Guided eps from the window sums (diffusers: uncond + g * (cond - uncond)).
MEG_INLINE float meg_guided_eps(float sum_u, float sum_c, float count, bool cfg, float guidance) {
  const float eps_u = sum_u / count;
  if (!cfg) return MEG_BUG_F(eps_u);
  const float eps_c = sum_c / count;
  return MEG_BUG_F(eps_u + guidance * (eps_c - eps_u));
}

// diffusers DDIMScheduler.step, eta = 0, epsilon prediction, no clipping.
MEG_INLINE float meg_ddim_step(float x, float eps, float sqrt_at, float sqrt_1m_at, float sqrt_ap,
                               float sqrt_1m_ap) {
  const float pred_x0 = (x - sqrt_1m_at * eps) / sqrt_at;
  return MEG_BUG_F(sqrt_ap * pred_x0 + sqrt_1m_ap * eps);
}

template <typename I>
MEG_INLINE void meg_ddim_at(const MegDdimParams& p, I idx) {
  const I n = (idx / (I)p.hw) % (I)p.frames;
  const float s0 = meg_load(p.eps_sum, p.eps_dtype, idx);
  const float s1 = p.has_cfg ? meg_load(p.eps_sum, p.eps_dtype, idx + (I)p.total) : 0.0f;
  const float eps = meg_guided_eps(s0, s1, p.counts[n], p.has_cfg != 0, p.guidance);
  const float x = meg_load(p.latents, p.lat_dtype, idx);
  const float x_prev = meg_ddim_step(x, eps, p.sqrt_alpha_t, p.sqrt_one_minus_alpha_t, p.sqrt_alpha_prev,
                                     p.sqrt_one_minus_alpha_prev);
  meg_store(p.out, p.lat_dtype, idx, x_prev);
  if (p.eps_out != nullptr) meg_store(p.eps_out, p.eps_out_dtype, idx, eps);
}

// ---------------------------------------------------------------------------------------------
// latents_to_uint8: (N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8, truncating
// ---------------------------------------------------------------------------------------------
struct MegToUint8Params {
  const void* images;  // (N, 3, H, W)
  int dtype;
  int64_t hw;          // H * W
  int64_t total;       // N * H * W (one index per output pixel)
  uint8_t* out;        // (N, H, W, 3)
};

// trunc(clamp(x / 2 + 0.5, 0, 1) * 255); NaN maps to 0.
MEG_INLINE uint8_t meg_unit_to_uint8(float x) {
  float v = x / 2.0f + 0.5f;
  v = v > 0.0f ? v : 0.0f;  // also maps NaN to 0
  v = v < 1.0f ? v : 1.0f;
  const int q = (int)(v * 255.0f);
  return (uint8_t)MEG_BUG_U8(q);
}

template <typename I>
MEG_INLINE void meg_to_uint8_at(const MegToUint8Params& p, I idx) {
  const I hw = (I)p.hw;
  const I n = idx / hw;
  const I pix = idx - n * hw;
  const I base = n * 3 * hw + pix;
  for (int c = 0; c < 3; ++c) {
    p.out[idx * 3 + c] = meg_unit_to_uint8(meg_load(p.images, p.dtype, base + c * hw));
  }
}
