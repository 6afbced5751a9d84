// The kernel variants and their dispatch. No torch headers here, so CI can compile this file quickly for every
// target architecture (tests/test_kernels.py); the torch binding lives in tinygemm_op.cpp.
#include "tinygemm.cuh"

namespace tinygemm {

template <typename T, bool kIntCodes, bool kHasZero, int kMTiles>
static void launch_for_warps(const Problem& p, cudaStream_t stream) {
  // Fewer warps per tile when there are many tiles: longer k-slices per warp, fewer CTA start-ups. With few
  // tiles (small n), 8 warps per tile keep enough loads in flight to fill the memory system.
  if (p.n_tiles >= 4 * p.sm_count) {  // at 4 warps a tile, still 16 warps per SM
    tinygemm_kernel<T, kIntCodes, kHasZero, kMTiles, 4><<<p.n_tiles, 4 * 32, 0, stream>>>(p);
  } else {
    tinygemm_kernel<T, kIntCodes, kHasZero, kMTiles, 8><<<p.n_tiles, 8 * 32, 0, stream>>>(p);
  }
}

template <typename T, bool kIntCodes, bool kHasZero>
static cudaError_t launch_for_rows(const Problem& p, cudaStream_t stream) {
  if (p.m <= 8) {
    launch_for_warps<T, kIntCodes, kHasZero, 1>(p, stream);
  } else {
    launch_for_warps<T, kIntCodes, kHasZero, 2>(p, stream);
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
