// The packed weight back as a dense [n, k] matrix in the activation dtype: what `linear` multiplies with cuBLAS when x
// has more than 16 rows (prefill): one pass over the packed weight, writing each output element once.
//
// A CTA takes one 16-row tile and kChunksPerCta chunks of 64 k. Thread i = (g, j, t) = (i / 16, i / 4 % 4, i % 4)
// reads word j of lane (g, t), the codes of rows g and g + 8 at k = 64 c + 16 j + 4 t .. + 3 (packing.py), and
// writes those 4 values of each row: the 16 threads of one g write 128 contiguous bytes of both rows.
#include "tinygemm.cuh"

namespace tinygemm {

constexpr int kChunksPerCta = 4;

// w = lut[code] * scale (+ zero), rounded to fp32 after the product and after the sum (no fused multiply-add), then
// to T: the arithmetic of QuantizedTensor.dequantize, so the result equals the PyTorch reference bit for bit.
template <typename T, bool kIntCodes, bool kHasZero>
__global__ void __launch_bounds__(128) dequantize_kernel(const Problem p) {
  using D = Dtype<T>;
  constexpr int kZ = kHasZero ? 2 : 1;
  __shared__ float table[16][16];  // the tile's rows' 16 LUT entries (LUT formats)
  const int tile = blockIdx.x, g = threadIdx.x >> 4, j = (threadIdx.x >> 2) & 3, t = threadIdx.x & 3;
  if constexpr (!kIntCodes) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
      const int r = e >> 4, c = e & 15;
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p.lut + 2 * (p.lut_per_row ? tile * 16 + r : 0));
      table[r][c] = D::to_float(bytes[c] | bytes[16 + c] << 8);  // 16 low bytes, then 16 high bytes
    }
    __syncthreads();
  }
  const uint16_t* scales = static_cast<const uint16_t*>(p.scales);
  T* y = static_cast<T*>(p.y);
  const int last = min(p.k_chunks, (blockIdx.y + 1) * kChunksPerCta);
  for (int c = blockIdx.y * kChunksPerCta; c < last; ++c) {
    const int k0 = c * kChunkK + 16 * j + 4 * t;
    if (k0 >= p.k) break;  // k is a multiple of 32: the padded chunk's last 32 k, for every later c too
    const uint32_t word =
        reinterpret_cast<const uint32_t*>(p.codes + (static_cast<size_t>(tile) * p.k_chunks + c) * 32 + 4 * g + t)[j];
    const int group = k0 >> p.group_shift;  // the 4 values share a group (groups are >= 32 wide)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tile * 16 + g + 8 * h;
      if (row >= p.n) continue;
      const uint16_t* sz = scales + ((static_cast<size_t>(tile) * p.groups + group) * 16 + 2 * g + h) * kZ;
      const float scale = D::to_float(sz[0]), zero = kHasZero ? D::to_float(sz[1]) : 0.f;
      T out[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // Nibble of (row g + 8 h, i-th k): int codes [0, 4, 2, 6, 1, 5, 3, 7][4 h + i], LUT codes 2 i + h.
        const int nibble = kIntCodes ? h + 4 * (i & 1) + 2 * (i >> 1) : 2 * i + h;
        const int code = (word >> (4 * nibble)) & 0xF;
        float w = __fmul_rn(kIntCodes ? static_cast<float>(code - 8) : table[g + 8 * h][code], scale);
        if constexpr (kHasZero) w = __fadd_rn(w, zero);
        out[i] = D::from_float(w);
      }
      *reinterpret_cast<uint2*>(y + static_cast<size_t>(row) * p.k + k0) = *reinterpret_cast<const uint2*>(out);
    }
  }
}

template <typename T>
static cudaError_t dequantize_for(const Problem& p, bool int_codes, bool has_zero, cudaStream_t stream) {
  const dim3 grid(p.n_tiles, (p.k_chunks + kChunksPerCta - 1) / kChunksPerCta);
  if (int_codes) {
    dequantize_kernel<T, true, true><<<grid, 128, 0, stream>>>(p);
  } else if (has_zero) {
    dequantize_kernel<T, false, true><<<grid, 128, 0, stream>>>(p);
  } else {
    dequantize_kernel<T, false, false><<<grid, 128, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const Problem& p, bool bf16, bool int_codes, bool has_zero, cudaStream_t stream) {
  if (int_codes && !has_zero) return cudaErrorInvalidValue;
  return bf16 ? dequantize_for<__nv_bfloat16>(p, int_codes, has_zero, stream)
              : dequantize_for<__half>(p, int_codes, has_zero, stream);
}

}  // namespace tinygemm
