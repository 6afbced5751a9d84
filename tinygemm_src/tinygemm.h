// The host-side interface of tinygemm: the problem description and the launcher (plain C++, no device code),
// shared by the kernels (tinygemm.cuh) and the torch binding (tinygemm_op.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tinygemm {

constexpr int kChunkK = 64;  // k covered by one 16-byte code load (4 mma k-tiles of 16)

struct Problem {
  const void* x;       // [m, k] activations, row-major
  void* y;             // [m, n] output ([m, n / 2] with swiglu)
  const uint4* codes;  // [n_tiles, k_chunks, 32 lanes] x 16 bytes
  const void* scales;  // [n_tiles, groups, 8, 2, 1 + has_zero] in the activation dtype
  const uint4* lut;    // [rows, 2]: 16 low bytes then 16 high bytes of the 16 table entries; null for int codes
  int lut_per_row;     // 1: a table per weight row; 0: one table for the whole matrix
  int m, n, k, n_tiles, k_chunks, groups, group_shift;  // group_size == 1 << group_shift
  int sm_count;        // multiprocessors of the device: picks the warps per tile
  int sm_shared_bytes; // shared memory of one multiprocessor (see the launch of small early-started grids)
  int programmatic;    // 1: launch with programmatic stream serialization (sm_90+; see the kernel's prologue)
  int swiglu;          // 1: the rows are gate/up interleaved by 8 (n % 16 == 0); y [m, n / 2] = silu(gate) * up
};

// Launches the variant the problem needs; returns the launch's error. Defined in tinygemm_kernels.cu.
cudaError_t launch(const Problem& p, bool bf16, bool int_codes, bool has_zero, cudaStream_t stream);

// Writes the dense weight [n, k] (row-major, activation dtype) to y; x, m and sm_count are not read. Defined in
// tinygemm_dequantize.cu.
cudaError_t launch_dequantize(const Problem& p, bool bf16, bool int_codes, bool has_zero, cudaStream_t stream);

}  // namespace tinygemm
