// The kernel variants and their dispatch. No torch headers here, so CI can compile this file quickly for every
// target architecture (tests/test_kernels.py); the torch binding lives in tinygemm_op.cpp.
#include "tinygemm.cuh"

namespace tinygemm {

template <typename T, bool kIntCodes, bool kHasZero>
static cudaError_t launch_for_rows(const Problem& p, cudaStream_t stream) {
  if (p.m <= 8) {
    tinygemm_kernel<T, kIntCodes, kHasZero, 1><<<p.n_tiles, kThreads, 0, stream>>>(p);
  } else {
    tinygemm_kernel<T, kIntCodes, kHasZero, 2><<<p.n_tiles, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_for_dtype(const Problem& p, bool int_codes, bool has_zero, cudaStream_t stream) {
  if (int_codes) return launch_for_rows<T, true, true>(p, stream);  // int codes always carry a zero point
  if (has_zero) return launch_for_rows<T, false, true>(p, stream);
  return launch_for_rows<T, false, false>(p, stream);
}

cudaError_t launch(const Problem& p, bool bf16, bool int_codes, bool has_zero, cudaStream_t stream) {
  if (p.m < 1 || p.m > 16 || (int_codes && !has_zero)) return cudaErrorInvalidValue;
  return bf16 ? launch_for_dtype<__nv_bfloat16>(p, int_codes, has_zero, stream)
              : launch_for_dtype<__half>(p, int_codes, has_zero, stream);
}

}  // namespace tinygemm
