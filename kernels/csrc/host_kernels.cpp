// Host build of the kernels: the per-index functions of meg_ops.h looped over the same index
// range the CUDA kernels cover. Used by the test-suite (via ctypes) as a CPU check of the element
// code against the PyTorch references; compiled with -DMEGACTOR_INJECT_BUG for the negative test.
#include "meg_api.h"

namespace {

template <typename P, typename F>
int meg_host_loop(const P* p, int64_t total, F body) {
  if (p == nullptr) return MEG_BAD_ARG;
  const int rc = meg_check(*p);
  if (rc != MEG_OK) return rc;
  for (int64_t i = 0; i < total; ++i) body(*p, i);
  return MEG_OK;
}

}  // namespace

extern "C" {

int meg_abi_version(void) { return MEG_ABI_VERSION; }

long long meg_params_size(int which) { return meg_params_size_impl(which); }

const char* meg_build_info(void) {
#ifdef MEGACTOR_INJECT_BUG
  return "host;inject_bug=1";
#else
  return "host;inject_bug=0";
#endif
}

const char* meg_status_string(int code) {
  const char* name = meg_status_name(code);
  return name != nullptr ? name : "unknown status";
}

int meg_device_count(void) { return 0; }

int meg_preprocess_frame(const MegPreprocessParams* p, void* /*stream*/) {
  const int64_t total = p != nullptr ? p->size * p->size : 0;
  return meg_host_loop(p, total, [](const MegPreprocessParams& q, int64_t i) { meg_preprocess_at(q, i); });
}

int meg_ddim_cfg_update(const MegDdimParams* p, void* /*stream*/) {
  const int64_t total = p != nullptr ? p->total : 0;
  return meg_host_loop(p, total, [](const MegDdimParams& q, int64_t i) { meg_ddim_at(q, i); });
}

int meg_latents_to_uint8(const MegToUint8Params* p, void* /*stream*/) {
  const int64_t total = p != nullptr ? p->total : 0;
  return meg_host_loop(p, total, [](const MegToUint8Params& q, int64_t i) { meg_to_uint8_at(q, i); });
}

}  // extern "C"
