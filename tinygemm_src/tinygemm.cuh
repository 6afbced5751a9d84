// tinygemm: y = x @ W^T for 1 <= m <= 16 rows of x and a 4-bit weight W [n, k] (int4, any4, nf4/fp4, MX-FP4).
//
// The weight is the A operand of mma.sync m16n8k16 (16 rows of W by 16 of k) and x is B (k16 by n8), so m <= 8
// fills the n = 8 side of one mma; 9..16 take a second. A CTA owns one 16-row tile of W; its warps split k.
// Every lane reads its codes with one 16-byte load per 64 k, straight from global memory into registers: the
// packing (any4lib/kernels/packing.py, docs/KERNELS.md) stores the codes in mma fragment order.
//
// Dequantization is w = lut[code] * scale + zero. The mma runs on the raw LUT values; scale and zero are applied
// to the fp32 partial sums once per group: acc += scale * sum(x * lut[c]) + zero * sum(x). sum(x) comes from a
// second mma against a matrix of ones. This keeps the per-weight work to the table lookup alone: for int4 a
// mask and an OR (the value is built under a float exponent), for LUT formats one shared-memory load per pair of
// codes from a 256-entry table of value pairs that each CTA builds from its rows' 16-entry LUTs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "tinygemm.h"

#ifndef TINYGEMM_UNROLL
// Chunks per batch at m <= 8 (half that at m > 8); of 2 and 4, 2 measured faster (docs/KERNELS.md).
#define TINYGEMM_UNROLL 2
#endif

namespace tinygemm {

template <typename T>
struct Dtype;

template <>
struct Dtype<__nv_bfloat16> {
  static constexpr uint32_t kIntMagic = 0x43004300u;  // bf16 128.0 in both halves: (magic | c) == 128 + c
  static constexpr float kIntOffset = 136.f;          // (128 + c) - 136 == c - 8, the int4 table
  static constexpr uint32_t kOnes = 0x3F803F80u;
  __device__ static float to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Dtype<__half> {
  static constexpr uint32_t kIntMagic = 0x64006400u;  // fp16 1024.0: (magic | c) == 1024 + c
  static constexpr float kIntOffset = 1032.f;
  static constexpr uint32_t kOnes = 0x3C003C00u;
  __device__ static float to_float(uint32_t bits16) { return __half2float(__ushort_as_half(uint16_t(bits16))); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The A fragment (4 registers of 2 values: rows g, g+8, g, g+8; k pairs 0-1, 0-1, 2-3, 2-3) from one word of codes.
// pairs_g / pairs_g8: the 256-entry pair tables of rows g and g + 8 (LUT codes only).
template <typename T, bool kIntCodes>
__device__ __forceinline__ void dequantize_fragment(uint32_t word, const uint32_t* pairs_g, const uint32_t* pairs_g8,
                                                    uint32_t (&a)[4]) {
  if constexpr (kIntCodes) {
    // Int layout: register p takes nibbles p and p + 4; OR-ing them under a float's exponent gives 128 + c exactly.
#pragma unroll
    for (int p = 0; p < 4; ++p) a[p] = ((word >> (4 * p)) & 0x000F000Fu) | Dtype<T>::kIntMagic;
  } else {
    // LUT layout: byte b of the word is the code pair of one register (rows g, g, g+8, g+8 for b = 0..3), so one
    // shared-memory load of the pair table gives both values, already packed as the mma wants them.
    a[0] = pairs_g[word & 0xFFu];
    a[2] = pairs_g[(word >> 8) & 0xFFu];
    a[1] = pairs_g8[(word >> 16) & 0xFFu];
    a[3] = pairs_g8[word >> 24];
  }
}

// Fills pairs[r][c0 | c1 << 4] = (lut[c0], lut[c1]) for the tile's rows (or the one shared table), going through
// `entries` (rows x 16 values) so each byte of the packed LUT is read from global memory once.
__device__ __forceinline__ void build_pair_tables(const uint4* lut, int first_row, int rows, uint16_t* entries,
                                                  uint32_t* pairs, int threads) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(lut) + static_cast<size_t>(first_row) * 32;
  for (int i = threadIdx.x; i < rows * 16; i += threads) {  // per row: 16 low bytes, then 16 high bytes
    const uint8_t* row = bytes + (i >> 4) * 32;
    entries[i] = static_cast<uint16_t>(row[i & 15] | (row[16 + (i & 15)] << 8));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * 256; i += threads) {
    const uint16_t* row = entries + (i >> 8) * 16;
    pairs[i] = row[i & 15] | (static_cast<uint32_t>(row[(i >> 4) & 15]) << 16);
  }
  __syncthreads();
}

template <int kWarps, int kUnroll>
__device__ __forceinline__ void load_codes(const uint4* codes, int c0, int k_chunks, uint4 (&w)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = c0 + u * kWarps;
    w[u] = c < k_chunks ? __ldcs(codes + static_cast<size_t>(c) * 32) : make_uint4(0, 0, 0, 0);
  }
}

template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) tinygemm_kernel(const Problem p) {
  using D = Dtype<T>;
  // Chunks per batch; a warp has two batches of code loads in flight.
  constexpr int kUnroll = TINYGEMM_UNROLL / kMTiles > 0 ? TINYGEMM_UNROLL / kMTiles : 1;
  constexpr int kStep = kWarps * kUnroll;
  constexpr int kZ = kHasZero ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const T* x = static_cast<const T*>(p.x);
  const uint16_t* scales = static_cast<const uint16_t*>(p.scales);
  const bool two_groups = p.group_shift == 5;  // group size 32: a chunk of 64 spans two groups

  const uint4* codes = p.codes + static_cast<size_t>(tile) * p.k_chunks * 32 + lane;
  uint4 w_next[kUnroll];
  load_codes<kWarps>(codes, warp, p.k_chunks, w_next);

  // Pair tables: 16 rows x 256 x 4 bytes (one table when the matrix shares its LUT). Built while the first codes load.
  __shared__ uint32_t pairs[kIntCodes ? 1 : 16 * 256];
  __shared__ uint16_t entries[kIntCodes ? 1 : 16 * 16];
  const uint32_t* pairs_g = pairs;
  const uint32_t* pairs_g8 = pairs;
  if constexpr (!kIntCodes) {
    build_pair_tables(p.lut, p.lut_per_row ? tile * 16 : 0, p.lut_per_row ? 16 : 1, entries, pairs, kWarps * 32);
    if (p.lut_per_row) pairs_g += g * 256, pairs_g8 += (g + 8) * 256;
  }

  float acc[kMTiles][4] = {};
  for (int c0 = warp; c0 < p.k_chunks; c0 += kStep) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = w_next[u];
    load_codes<kWarps>(codes, c0 + kStep, p.k_chunks, w_next);  // the next batch streams in during this one's math
    uint2 xv[kUnroll][kMTiles][4];
    uint2 sz[kUnroll][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int row = mt * 8 + g;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int k0 = c * kChunkK + 16 * j + 4 * t;
          const bool ok = c < p.k_chunks && row < p.m && k0 < p.k;
          xv[u][mt][j] = ok ? __ldg(reinterpret_cast<const uint2*>(x + static_cast<size_t>(row) * p.k + k0))
                            : make_uint2(0, 0);
        }
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int group = ((c * kChunkK) >> p.group_shift) + s;
        const bool ok = c < p.k_chunks && (s == 0 || two_groups);
        const uint16_t* at = scales + ((static_cast<size_t>(tile) * p.groups + group) * 8 + g) * 2 * kZ;
        if constexpr (kHasZero) {
          sz[u][s] = ok ? __ldg(reinterpret_cast<const uint2*>(at)) : make_uint2(0, 0);
        } else {
          sz[u][s] = make_uint2(ok ? __ldg(reinterpret_cast<const uint32_t*>(at)) : 0u, 0u);
        }
      }
    }

#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c0 + u * kWarps >= p.k_chunks) break;
      float part[kMTiles][4] = {}, xsum[kMTiles][4] = {};
      const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        dequantize_fragment<T, kIntCodes>(words[j], pairs_g, pairs_g8, a);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          D::mma(part[mt], a, xv[u][mt][j].x, xv[u][mt][j].y);
          if constexpr (kHasZero) {
            const uint32_t ones[4] = {D::kOnes, D::kOnes, D::kOnes, D::kOnes};
            D::mma(xsum[mt], ones, xv[u][mt][j].x, xv[u][mt][j].y);
          }
        }
        if (j == 3 || (j == 1 && two_groups)) {
          // Rows g and g+8 of this group: (scale, zero) pairs, or scales alone.
          const uint2 v = (j == 3 && two_groups) ? sz[u][1] : sz[u][0];  // select, not index: stays in registers
          float scale[2], zero[2] = {0.f, 0.f};
          if constexpr (kHasZero) {
            scale[0] = D::to_float(v.x & 0xFFFFu), zero[0] = D::to_float(v.x >> 16);
            scale[1] = D::to_float(v.y & 0xFFFFu), zero[1] = D::to_float(v.y >> 16);
            if constexpr (kIntCodes) {
              zero[0] -= D::kIntOffset * scale[0];
              zero[1] -= D::kIntOffset * scale[1];
            }
          } else {
            scale[0] = D::to_float(v.x & 0xFFFFu), scale[1] = D::to_float(v.x >> 16);
          }
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              acc[mt][e] += scale[e >> 1] * part[mt][e];
              if constexpr (kHasZero) acc[mt][e] += zero[e >> 1] * xsum[mt][e];
              part[mt][e] = 0.f;
              xsum[mt][e] = 0.f;
            }
          }
        }
      }
    }
  }

  // Sum the warps' k-slices. Accumulator e of lane l holds row (l / 4) + 8 * (e / 2), column 2 * (l % 4) + e % 2.
  __shared__ float partial[kWarps][kMTiles * 4][32];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][mt * 4 + e][lane] = acc[mt][e];
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  for (int i = threadIdx.x; i < kMTiles * 4 * 32; i += kWarps * 32) {
    const int l = i & 31, e = (i >> 5) & 3, mt = i >> 7;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][i >> 5][l];
    const int row = tile * 16 + (l >> 2) + 8 * (e >> 1);
    const int col = mt * 8 + 2 * (l & 3) + (e & 1);
    if (row < p.n && col < p.m) y[static_cast<size_t>(col) * p.n + row] = D::from_float(sum);
  }
}

}  // namespace tinygemm
