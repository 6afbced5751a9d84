// tinygemm: y = x @ W^T for 1 <= m <= 16 rows of x and a 4-bit weight W [n, k] (int4, any4, nf4/fp4, MX-FP4).
//
// The weight is the A operand of mma.sync m16n8k16 (16 rows of W by 16 of k) and x is B (k16 by n8), so m <= 8
// fills the n = 8 side of one mma; 9..16 take a second. A CTA owns kTiles 16-row tiles of W; its warps split k in
// chunks of 64 (warp w takes chunks w, w + kWarps, ...: the CTA streams contiguous bytes). The packing
// (any4lib/kernels/packing.py, docs/KERNELS.md) stores the codes in mma fragment order, 16 bytes per lane per chunk.
//
// Loads: each warp owns a ring of kStages shared-memory slots. A slot holds one unit of k = 128 (two chunks):
// its codes (per tile), scales/zeros and the x columns they multiply, copied with cp.async kStages - 1 units ahead
// of the math. The copies hold no registers, so a warp keeps several KB in flight and no load's latency is exposed
// in the iteration that uses it; the x-fragment reads are fixed-address shared loads without bounds predicates
// (the copy zero-fills past k); and the per-unit work (issuing copies, applying scales at g >= 128) is paid once
// per 128 k.
//
// Dequantization is w = lut[code] * scale + zero. The mma runs on the raw LUT values; scale and zero are applied
// to the fp32 partial sums once per group: acc += scale * sum(x * lut[c]) + zero * sum(x). sum(x) comes from a
// second mma against a matrix of ones (shared by all tiles of the CTA). The per-weight work is only the table
// lookup: for int4 a mask and an OR (the value is built under a float exponent), for LUT formats one shared-memory
// load per pair of codes (rows g and g + 8 at one k) from a 256-entry table of value pairs that each CTA builds
// from its rows' 16-entry LUTs, replicated kRepl times so lanes that would hit the same bank read different
// copies (no bank conflicts), and a prmt per register to pair the values along k as the mma wants (at
// m <= 2 none: the pairs go in as they are and x is spread over B's columns instead, kPairedRows).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "tinygemm.h"

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
  __device__ static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
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
  __device__ static float round(float v) { return __half2float(__float2half_rn(v)); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

constexpr int kUnitK = 2 * kChunkK;  // k per ring slot: two 16-byte code loads per lane

// Shared-memory carve-up of one CTA, computed the same way on the host (launch size) and the device:
//   [pair tables (LUT formats)] [kWarps rings of kStages slots], later reused for the cross-warp sums.
// A slot: kTiles x 1 KB of codes (2 chunks x 32 lanes x 16 B), kTiles x the unit's scales (1 to 4 groups x 8 lane
// groups x 2 rows x (scale[, zero]) x 2 B), then m rows x 256 B of x (128 bf16/fp16 of k each).
template <bool kIntCodes, bool kHasZero, int kMTiles, int kTiles, int kWarps, int kStages, int kRepl>
struct Smem {
  static constexpr int kZ = kHasZero ? 2 : 1;
  __host__ __device__ static int groups_per_unit(const Problem& p) {
    return p.group_shift >= 7 ? 1 : 1 << (7 - p.group_shift);
  }
  __host__ __device__ static int scale_bytes(const Problem& p) { return groups_per_unit(p) * 32 * kZ; }
  __host__ __device__ static int stage_bytes(const Problem& p) { return kTiles * (1024 + scale_bytes(p)) + 256 * p.m; }
  // Per tile: 256 pairs x 8 row pairs (g, g + 8) x kRepl copies; one such table when the matrix shares a LUT.
  __host__ __device__ static int table_bytes(const Problem& p) {
    return kIntCodes ? 0 : (p.lut_per_row ? kTiles : 1) * 256 * 8 * kRepl * 4;
  }
  __host__ __device__ static int bytes(const Problem& p) {
    const int pipeline = table_bytes(p) + kWarps * kStages * stage_bytes(p);
    const int sums = kWarps * kTiles * kMTiles * 4 * 32 * 4;
    return pipeline > sums ? pipeline : sums;
  }
  static int max_bytes() {  // the largest any problem of this variant asks for: all rows, g32, a LUT per row
    Problem p{};
    p.m = 8 * kMTiles, p.group_shift = 5, p.lut_per_row = 1;
    return bytes(p);
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1 (.cg). With valid false it reads nothing and writes zeros
// (src-size 0): the x columns past k.
__device__ __forceinline__ void copy16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// The same for the codes, marked evict-first in L2: they are read once, and x and the scales should stay.
__device__ __forceinline__ void copy16_stream(uint32_t dst, const void* src, bool valid, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0), "l"(policy)
               : "memory");
}

// Programmatic dependent launch (PTX griddepcontrol, sm_90+; no-ops before). A grid launched with the
// programmatic-serialization attribute may start before the previous kernel in the stream has finished; the wait
// blocks until that kernel has completed and its writes are visible. The launch_dependents signal lets a kernel
// queued after this one start once every CTA of this grid has signalled (or exited): it is given at the top, since
// a dependent does nothing but read its own weight before its own wait.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void copy_wait() {  // until at most kPending of this thread's newest groups are in flight
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// The A fragment (4 registers of 2 values: rows g, g+8, g, g+8; k pairs 0-1, 0-1, 2-3, 2-3) from one word of codes.
// tab: this lane's copy of its row pair's table (LUT codes only); consecutive pairs are kStride words apart.
// kPairedRows (LUT codes, m <= 2): register i is the table value pair (row g, row g + 8) at k i as it is; the B
// fragment then spreads x so that the products of rows g and g + 8 land in different columns (see the kernel).
template <typename T, bool kIntCodes, bool kPairedRows, int kStride>
__device__ __forceinline__ void dequantize_fragment(uint32_t word, const uint32_t* tab, uint32_t (&a)[4]) {
  if constexpr (kIntCodes) {
    // Int layout: register p takes nibbles p and p + 4; OR-ing them under a float's exponent gives 128 + c exactly.
    // One lop3 per register ((w & mask) | magic; the compiler otherwise emits an AND and an OR).
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      asm("lop3.b32 %0, %1, %2, %3, 0xEA;"
          : "=r"(a[p])
          : "r"(word >> (4 * p)), "n"(0x000F000F), "r"(Dtype<T>::kIntMagic));
    }
  } else {
    // LUT layout: byte i of the word holds the codes of rows g (low nibble) and g + 8 (high nibble) at the
    // i-th k of the lane, so one shared-memory load of the row pair's table gives (row g, row g + 8) at one k,
    // and two prmts regroup two such loads into the mma's (row, k pair) registers. Tables of row pairs let the
    // 4 lanes of a lane group (all on the same rows) read 4 copies in 32 KB: every lane its own bank.
    // Byte offsets straight from the word: mask the byte in place, then one shift-and-add (LEA / LEA.HI).
    constexpr int kShift = kStride == 8 ? 5 : kStride == 16 ? 6 : 7;  // log2 of the bytes between pairs
    const char* bytes = reinterpret_cast<const char*>(tab);
    // (byte 0 isolated with prmt: written as a mask, the compiler shifts first and then cannot fold the add)
    const uint32_t k0 = *reinterpret_cast<const uint32_t*>(bytes + (__byte_perm(word, 0u, 0x4440u) << kShift));
    const uint32_t k1 = *reinterpret_cast<const uint32_t*>(bytes + ((word & 0xFF00u) >> (8 - kShift)));
    const uint32_t k2 = *reinterpret_cast<const uint32_t*>(bytes + ((word & 0xFF0000u) >> (16 - kShift)));
    const uint32_t k3 = *reinterpret_cast<const uint32_t*>(bytes + ((word & 0xFF000000u) >> (24 - kShift)));
    if constexpr (kPairedRows) {
      a[0] = k0, a[1] = k1, a[2] = k2, a[3] = k3;
    } else {
      a[0] = __byte_perm(k0, k1, 0x5410), a[1] = __byte_perm(k0, k1, 0x7632);  // row g / row g + 8, k 0-1
      a[2] = __byte_perm(k2, k3, 0x5410), a[3] = __byte_perm(k2, k3, 0x7632);  // the same at k 2-3
    }
  }
}

// Pair tables: word ((tt * 256 + pair) * 8 + g) * kRepl + r holds (lut_g[c0], lut_g8[c1]), the entries of rows
// g and g + 8 of tile tt, for pair = c0 | c1 << 4. Lane (g, t) reads copy r = t % kRepl, so its bank is
// (8 pair + g) * kRepl + r mod 32: kRepl = 4 gives every lane its own bank (no conflicts) in 32 KB a tile, 2 leaves
// lanes t and t + 2 sharing one (~2 wavefronts a load), 1 lets the 4 lanes of a group collide. Pairing rows (not
// two k of one row) keeps a tile's tables to 8 KB a copy.
//
// Thread item i = (tt, c0, g) writes the 16 words of c1 = 0..15: one prmt and one store (all copies) each, at fixed
// offsets, from lut_g[c0] and row g + 8's 32 LUT bytes in registers. The 32 lanes of a warp cover 8 groups x 4
// values of c0, so each store covers contiguous words. A thread has up to kItems items and sends all their LUT
// loads out before the first store (one global latency instead of one per item).
template <int kRepl, int kItems>
__device__ __forceinline__ void build_pair_tables(const uint4* lut, int first_row, int tiles, bool shared_lut,
                                                  uint32_t* tables, int threads) {
  const int items = (shared_lut ? 1 : tiles) * 128;  // tiles x 16 c0 x 8 g; a shared LUT has one table
  const uint32_t* lut_words = reinterpret_cast<const uint32_t*>(lut);
  uint4 lo[kItems] = {}, hi[kItems] = {};  // byte c of lo / hi: low / high byte of row g + 8's entry c
  uint32_t lo_c0[kItems] = {}, hi_c0[kItems] = {};  // the word of row g's low / high bytes that holds entry c0
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = threadIdx.x + j * threads;
    if (i < items) {
      const int row = shared_lut ? 0 : first_row + (i >> 7) * 16 + (i & 7), row8 = shared_lut ? 0 : row + 8;
      const int q = (i >> 5) & 3;  // c0 / 4
      lo[j] = lut[2 * row8], hi[j] = lut[2 * row8 + 1];
      lo_c0[j] = lut_words[8 * row + q], hi_c0[j] = lut_words[8 * row + 4 + q];
    }
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = threadIdx.x + j * threads;
    if (i >= items) break;
    const int g = i & 7, c0 = (i >> 3) & 15, tt = i >> 7, b = c0 & 3;
    const uint32_t entry_c0 = __byte_perm(lo_c0[j], hi_c0[j], b | (b + 4) << 4);
    const uint32_t lo_words[4] = {lo[j].x, lo[j].y, lo[j].z, lo[j].w};
    const uint32_t hi_words[4] = {hi[j].x, hi[j].y, hi[j].z, hi[j].w};
    uint32_t entries[8];  // row g + 8's entries 2w and 2w + 1 as the halves of entries[w]
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      entries[2 * w] = __byte_perm(lo_words[w], hi_words[w], 0x5140);
      entries[2 * w + 1] = __byte_perm(lo_words[w], hi_words[w], 0x7362);
    }
    uint32_t* at = tables + static_cast<size_t>((tt * 256 + c0) * 8 + g) * kRepl;
#pragma unroll
    for (int c1 = 0; c1 < 16; ++c1) {
      const uint32_t v = __byte_perm(entry_c0, entries[c1 / 2], c1 % 2 ? 0x7610 : 0x5410);  // (lut_g[c0], lut_g8[c1])
      uint32_t* word = at + c1 * 16 * 8 * kRepl;  // pair c0 + 16 c1
      if constexpr (kRepl == 4) {
        *reinterpret_cast<uint4*>(word) = make_uint4(v, v, v, v);  // one 16-byte store for the 4 copies
      } else if constexpr (kRepl == 2) {
        *reinterpret_cast<uint2*>(word) = make_uint2(v, v);
      } else {
        *word = v;
      }
    }
  }
  __syncthreads();
}

// kPairedRows (LUT codes, m <= 2, one m-tile and one tile): the A registers are the table lookups as they come,
// (W[g][k_i], W[g + 8][k_i]) for the lane's k_i, i = 0..3, which saves the two prmts per register pair that
// regroup them by row. B column c (lane group c) then carries x row c / 4 at k_1, k_3 (c odd) or k_0, k_2 in the
// odd (c & 2) or even k-slots, zeros elsewhere, so D[g][c] + D[g + 8][c + 1] (c = 0, 2, 4, 6) is the product of
// row g (c & 2 == 0) or g + 8 (c & 2 == 2) with x row c / 4: lane (g, t), c = 2 t, holds it in accumulators 0 and
// 3 (tests/test_kernels.py multiplies these fragments through the PTX maps).
template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, bool kPairedRows, int kTiles, int kWarps,
          int kStages, int kRepl>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) tinygemm_kernel(const Problem p) {
  using D = Dtype<T>;
  using S = Smem<kIntCodes, kHasZero, kMTiles, kTiles, kWarps, kStages, kRepl>;
  constexpr int kZ = kHasZero ? 2 : 1;
  constexpr int kStride = 8 * kRepl;  // words between consecutive pairs of one lane's table copy
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * kTiles;  // the dispatch launches only grids where n_tiles % kTiles == 0
  const int scale_bytes = S::scale_bytes(p), stage_bytes = S::stage_bytes(p);
  uint8_t* const ring = smem + S::table_bytes(p) + warp * kStages * stage_bytes;
  const uint32_t ring_at = shared_address(ring);

  const uint4* codes = p.codes + static_cast<size_t>(tile0) * p.k_chunks * 32 + lane;
  const uint8_t* scales = static_cast<const uint8_t*>(p.scales) + static_cast<size_t>(tile0) * p.groups * 32 * kZ;
  const T* x = static_cast<const T*>(p.x);
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  const int k_units = (p.k_chunks + 1) >> 1;
  const int n_mine = warp < k_units ? (k_units - 1 - warp) / kWarps + 1 : 0;  // units of this warp

  // The per-lane parts of the copies, fixed for the whole k loop.
  // Scales: kTiles x scale_bytes, 16-byte piece per lane (at most 2 tiles x 16 pieces); a group past the end
  // (the unit's second chunk beyond k) is zero-filled: scale 0, zero 0.
  const int group_piece_log2 = kZ == 2 ? 2 : 1;  // 16-byte pieces per group: 64 or 32 bytes
  const int scale_pieces_log2 = group_piece_log2 + (p.group_shift >= 7 ? 0 : 7 - p.group_shift);
  const bool scale_lane = lane < (kTiles << scale_pieces_log2);
  const int scale_piece = lane & ((1 << scale_pieces_log2) - 1);
  const int scale_group = scale_piece >> group_piece_log2;  // within the unit
  const int scale_src = (lane >> scale_pieces_log2) * p.groups * 32 * kZ + scale_piece * 16;
  const int scale_dst = kTiles * 1024 + (lane >> scale_pieces_log2) * scale_bytes + scale_piece * 16;
  // x rows < m: 16 pieces of 8 values per row; lane l copies piece l % 16 of rows l / 16, l / 16 + 2, ... Piece q
  // of row r goes to position q ^ 2 (r & 3) (inside its 128-byte half), so the fragment reads below (lane (g, t),
  // half h, k-tile j: piece 8 h + 2 j + t / 2) of each 16 lanes cover all 32 banks once.
  constexpr int kXCopies = kMTiles * 4;  // rows 8 kMTiles / 2 per lane
  const int x_row0 = lane >> 4, x_k = (lane & 15) * 8;
  const int x_src = x_row0 * p.k + x_k;
  const int x_base = kTiles * (1024 + scale_bytes);
  const int x_dst = x_base + x_row0 * 256 + (((lane & 15) ^ (x_row0 << 1)) << 4);  // rows r0 + 4i
  const int x_dst2 = x_base + (x_row0 + 2) * 256 + (((lane & 15) ^ ((x_row0 + 2) << 1)) << 4);  // rows r0 + 2 + 4i

  // Copies this warp's next unit (the i-th: k = 128 (warp + i kWarps) ..) into slot i % kStages: the weight part
  // (codes, scales) and the x part, called for i = 0, 1, 2, ... in order each, so the sources are running pointers
  // stepped once per call: recomputing them from i took ~40 of the loop's instructions per unit (64-bit products,
  // the group arithmetic). Nothing is issued past the end.
  const uint4* next_codes = codes + 2 * warp * 32;
  int next_chunk = 2 * warp;
  const int first_group = (warp * kUnitK) >> p.group_shift;  // kWarps * 128 is a whole number of groups (<= 256)
  const int group_step = (kWarps * kUnitK) >> p.group_shift;
  const uint8_t* next_scales = scales + scale_src + first_group * 32 * kZ;
  int next_group = first_group + scale_group;
  const T* next_x = x + x_src + warp * kUnitK;
  int next_x_k = warp * kUnitK + x_k;
  auto issue_weights = [&](int i) {
    if (i >= n_mine) return;
    const uint32_t slot = ring_at + (static_cast<unsigned>(i) % kStages) * stage_bytes;
    const bool second = next_chunk + 1 < p.k_chunks;  // an odd chunk count leaves the last unit one chunk
#pragma unroll
    for (int tt = 0; tt < kTiles; ++tt) {
      const uint4* src = next_codes + static_cast<size_t>(tt) * p.k_chunks * 32;
      copy16_stream(slot + tt * 1024 + lane * 16, src, true, policy);
      copy16_stream(slot + tt * 1024 + 512 + lane * 16, second ? src + 32 : src, second, policy);
    }
    if (scale_lane) {
      const bool ok = next_group < p.groups;
      // A zero-fill still names a valid address (the CTA's first scales), though it reads nothing.
      copy16(slot + scale_dst, ok ? next_scales : scales, ok);
    }
    next_codes += 2 * kWarps * 32;
    next_chunk += 2 * kWarps;
    next_scales += group_step * 32 * kZ;
    next_group += group_step;
  };
  auto issue_x = [&](int i) {
    if (i >= n_mine) return;
    const uint32_t slot = ring_at + (static_cast<unsigned>(i) % kStages) * stage_bytes;
    const bool ok = next_x_k < p.k;  // k is a multiple of 32: a piece is all in or all out
#pragma unroll
    for (int it = 0; it < kXCopies; ++it) {
      if (x_row0 + 2 * it >= p.m) break;
      copy16(slot + (it & 1 ? x_dst2 : x_dst) + (it >> 1) * 1024, ok ? next_x + 2 * it * p.k : x, ok);
    }
    next_x += kWarps * kUnitK;
    next_x_k += kWarps * kUnitK;
  };

  // Programmatic dependent launch (sm_90+, see allow_dependent_grid): everything up to the wait reads only the
  // weight (codes, scales, LUT), which no earlier kernel writes, so it overlaps the previous kernel when this grid
  // starts early: the first units' codes stream in and the pair tables are built. x is read, and y written, only
  // after the wait. Each unit is one commit group (empty past the end, so the group count stays in step with the
  // waits below); the first group also holds the weight copies of the units issued before the wait.
  allow_dependent_grid();
#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue_weights(i);

  const uint32_t* tab = nullptr;
  if constexpr (!kIntCodes) {
    uint32_t* tables = reinterpret_cast<uint32_t*>(smem);
    constexpr int kBuildItems = (kTiles * 128 + kWarps * 32 - 1) / (kWarps * 32);  // table items per thread
    build_pair_tables<kRepl, kBuildItems>(p.lut, tile0 * 16, kTiles, !p.lut_per_row, tables, kWarps * 32);
    tab = tables + g * kRepl + t % kRepl;
  }
  wait_for_previous_grid();
#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) {
    issue_x(i);
    copy_commit();
  }
  const int tile_words = p.lut_per_row ? 256 * kStride : 0;  // table words between tiles of the CTA

  // Byte offsets of this lane's x fragment reads inside a row's 128-byte half (see the swizzle above); rows >= m
  // are never copied and read as zero.
  const int x_row = kPairedRows ? g >> 2 : g;  // the x row of this lane's B column
  int x_at[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) x_at[j] = x_row * 256 + (((2 * j + (t >> 1)) ^ ((x_row & 3) << 1)) << 4) + 8 * (t & 1);
  bool row_ok[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_ok[mt] = mt * 8 + x_row < p.m;
  // kPairedRows: x at k_0, k_2 (g even) or k_1, k_3 (g odd), moved to the high half (g & 2) or the low one.
  const uint32_t x_select = g & 2 ? (g & 1 ? 0x3244u : 0x1044u) : (g & 1 ? 0x4432u : 0x4410u);
  // Scales apply at the end of each group inside the unit: after k-tile jj when (jj + 1) % (group / 16) == 0
  // (g32: 1, 3, 5, 7; g64: 3, 7; g >= 128: 7, where g256 applies its half group).
  const int group_tiles_log2 = p.group_shift - 4;
  const int apply_mask = (1 << (group_tiles_log2 < 3 ? group_tiles_log2 : 3)) - 1;

  float acc[kTiles][kMTiles][4] = {};
#pragma unroll 1
  for (int i = 0; i < n_mine; ++i) {
    copy_wait<kStages - 2>();  // unit i's group has landed (this lane's copies)
    __syncwarp();  // ... and the other lanes' too; all lanes are done reading slot (i - 1) % kStages
    issue_weights(i + kStages - 1);  // refill that slot kStages - 1 units ahead, before this unit's math
    issue_x(i + kStages - 1);
    copy_commit();
    const uint8_t* slot = ring + (static_cast<unsigned>(i) % kStages) * stage_bytes;
    const uint8_t* unit_scales = slot + kTiles * 1024 + g * 4 * kZ;
    const uint8_t* xs = slot + x_base;
    float part[kTiles][kMTiles][4] = {}, xsum[kMTiles][4] = {};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 w[kTiles];
#pragma unroll
      for (int tt = 0; tt < kTiles; ++tt) {
        w[tt] = *reinterpret_cast<const uint4*>(slot + tt * 1024 + h * 512 + lane * 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int jj = 4 * h + j;
        uint2 xv[kMTiles];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          xv[mt] = row_ok[mt] ? *reinterpret_cast<const uint2*>(xs + mt * 2048 + h * 128 + x_at[j]) : make_uint2(0, 0);
          if constexpr (kPairedRows) {
            xv[mt] = make_uint2(__byte_perm(xv[mt].x, 0, x_select), __byte_perm(xv[mt].y, 0, x_select));
          }
          if constexpr (kHasZero) {
            const uint32_t ones[4] = {D::kOnes, D::kOnes, D::kOnes, D::kOnes};
            D::mma(xsum[mt], ones, xv[mt].x, xv[mt].y);
          }
        }
#pragma unroll
        for (int tt = 0; tt < kTiles; ++tt) {
          const uint32_t words[4] = {w[tt].x, w[tt].y, w[tt].z, w[tt].w};
          uint32_t a[4];
          dequantize_fragment<T, kIntCodes, kPairedRows, kStride>(words[j], tab + tt * tile_words, a);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) D::mma(part[tt][mt], a, xv[mt].x, xv[mt].y);
        }
        if (jj == 7 || (jj % 2 == 1 && ((jj + 1) & apply_mask) == 0)) {  // jj odd: groups span >= 2 k-tiles
          const int s = jj >> group_tiles_log2;  // the group within the unit
#pragma unroll
          for (int tt = 0; tt < kTiles; ++tt) {
            // Rows g and g + 8 of this group: (scale, zero) pairs, or scales alone.
            const uint8_t* at = unit_scales + tt * scale_bytes + s * 32 * kZ;
            if constexpr (kPairedRows) {  // the lane's row g + 8 (t & 1): its product and sum(x) are two columns
              const uint8_t* mine = at + (t & 1) * 2 * kZ;
              const uint32_t v = kHasZero ? *reinterpret_cast<const uint32_t*>(mine)
                                          : *reinterpret_cast<const uint16_t*>(mine);
              acc[tt][0][0] += D::to_float(v & 0xFFFFu) * (part[tt][0][0] + part[tt][0][3]);
              if constexpr (kHasZero) acc[tt][0][0] += D::to_float(v >> 16) * (xsum[0][0] + xsum[0][1]);
#pragma unroll
              for (int e = 0; e < 4; ++e) part[tt][0][e] = 0.f;
              continue;
            }
            float scale[2], zero[2] = {0.f, 0.f};
            if constexpr (kHasZero) {
              const uint2 v = *reinterpret_cast<const uint2*>(at);
              scale[0] = D::to_float(v.x & 0xFFFFu), zero[0] = D::to_float(v.x >> 16);
              scale[1] = D::to_float(v.y & 0xFFFFu), zero[1] = D::to_float(v.y >> 16);
              if constexpr (kIntCodes) {
                zero[0] -= D::kIntOffset * scale[0];
                zero[1] -= D::kIntOffset * scale[1];
              }
            } else {
              const uint32_t v = *reinterpret_cast<const uint32_t*>(at);
              scale[0] = D::to_float(v & 0xFFFFu), scale[1] = D::to_float(v >> 16);
            }
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[tt][mt][e] += scale[e >> 1] * part[tt][mt][e];
                if constexpr (kHasZero) acc[tt][mt][e] += zero[e >> 1] * xsum[mt][e];
                part[tt][mt][e] = 0.f;
              }
            }
          }
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) xsum[mt][e] = 0.f;
        }
      }
    }
  }

  // Sum the warps' k-slices through shared memory (the rings and tables are free once every copy has landed).
  // Accumulator e of lane l holds row (l / 4) + 8 * (e / 2), column 2 * (l % 4) + e % 2 of its (tile, m-tile).
  constexpr int kOut = kTiles * kMTiles * 4;
  copy_wait<0>();
  __syncthreads();
  float* partial = reinterpret_cast<float*>(smem);  // [kWarps][kOut][32]
#pragma unroll
  for (int tt = 0; tt < kTiles; ++tt)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) partial[(warp * kOut + (tt * kMTiles + mt) * 4 + e) * 32 + lane] = acc[tt][mt][e];
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  auto total = [&](int i) {
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v * kOut * 32 + i];
    return sum;
  };
  for (int i = threadIdx.x; i < kOut * 32; i += kWarps * 32) {
    const int l = i & 31, e = (i >> 5) & 3, mt = (i >> 7) % kMTiles, tt = (i >> 7) / kMTiles;
    int row = (l >> 2) + 8 * (e >> 1), col = mt * 8 + 2 * (l & 3) + (e & 1);  // row within the tile
    if constexpr (kPairedRows) {  // only accumulator 0 is used: row g + 8 (t & 1), x row t / 2
      if (e != 0) continue;
      row = (l >> 2) + 8 * (l & 1), col = (l & 3) >> 1;
    }
    if (col >= p.m) continue;
    if (p.swiglu) {
      // Rows 0-7 of tile j are gate rows 8j..8j+7 and rows 8-15 the up rows of the same index (the packing's
      // gate/up interleave), so a row's partner sits in this thread's reach: accumulator e + 2 of the same lane
      // (i + 64), or with paired rows the next lane (i + 1). Each product is rounded to the dtype first, as the
      // GEMM output of the unfused path is, then silu(gate) * up in fp32 with one rounding, as torch.compile's fused
      // kernel of the same ops computes it.
      if (row >= 8) continue;
      const float gate = D::round(total(i)), up = D::round(total(kPairedRows ? i + 1 : i + 64));
      y[static_cast<size_t>(col) * (p.n / 2) + (tile0 + tt) * 8 + row] = D::from_float(gate / (1.f + expf(-gate)) * up);
      continue;
    }
    row += (tile0 + tt) * 16;
    if (row < p.n) y[static_cast<size_t>(col) * p.n + row] = D::from_float(total(i));
  }
}

}  // namespace tinygemm
