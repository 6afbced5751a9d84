// The kernel variants and their dispatch. No torch headers here, so CI can compile this file quickly for every
// target architecture (tests/test_kernels.py); the torch binding lives in tinygemm_op.cpp.
//
// Tuning: built with -DTINYGEMM_TUNING (ANY4_TINYGEMM_CUDA_FLAGS), every variant below is compiled and the
// environment picks one at each launch (TINYGEMM_STAGES, TINYGEMM_LUT_STAGES, TINYGEMM_REPL, TINYGEMM_TILES16,
// TINYGEMM_WARPS, TINYGEMM_LUT_WARPS; see Config). The normal build compiles only the measured best (kChosen),
// so the tests cover what ships.
#include <atomic>
#include <cstdlib>

#include "tinygemm.cuh"

namespace tinygemm {

struct Config {
  int stages;      // int codes: ring slots (units of k = 128) per warp at m <= 8, 2 or 4 (at m > 8, where a slot
                   // holds twice the x: half of it, at least 2)
  int lut_stages;  // the same for LUT formats, whose tables share the shared memory
  int repl;        // copies of the pair tables when a CTA has one tile (1, 2 or 4); two tiles take half as many,
                   // and so does a matrix-wide table above 2 rows of x in 4-warp CTAs
  int tiles16;     // at m > 8: 1 tile per CTA; 2: two tiles (each x fragment serves both, half the x traffic)
                   // when that leaves >= 1 CTA per SM; 3: two tiles when it leaves >= 1 CTA per 2 SMs
  int warps;       // warps per CTA for int codes: 0 picks by CTA count, 4 or 8 forces it
  int lut_warps;   // the same for LUT formats
};

// The measured best on the H100 (the measurements: docs/KERNELS.md, "Why the configuration is what it is"): 4
// slots for int codes; 2 slots and 32 KB of pair tables (4 conflict-free copies) for LUT formats, whose shared
// memory then holds 5 four-warp CTAs an SM at m <= 2 and fewer as the x slots grow with m (3 at m = 8); two tiles per
// CTA at m > 8, also when that leaves 128 CTAs for 132 SMs.
constexpr Config kChosen{4, 2, 4, 3, 0, 0};

#ifdef TINYGEMM_TUNING
#define TG_IF if
static int env_or(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}
static Config config() {  // read at every launch: a benchmark switches variants between CUDA-graph captures
  return {env_or("TINYGEMM_STAGES", kChosen.stages),   env_or("TINYGEMM_LUT_STAGES", kChosen.lut_stages),
          env_or("TINYGEMM_REPL", kChosen.repl),       env_or("TINYGEMM_TILES16", kChosen.tiles16),
          env_or("TINYGEMM_WARPS", kChosen.warps),     env_or("TINYGEMM_LUT_WARPS", kChosen.lut_warps)};
}
#else
#define TG_IF if constexpr  // only the chosen variant is instantiated
static constexpr Config config() { return kChosen; }
#endif

// Launches the variant, or with `resident` set launches nothing and stores how many of its CTAs one SM holds at once
// for this problem (registers, shared memory and threads all counted: the occupancy calculator).
template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, bool kPairedRows, int kTiles, int kWarps,
          int kStages, int kRepl>
static cudaError_t run(const Problem& p, cudaStream_t stream, int* resident) {
  using S = Smem<kIntCodes, kHasZero, kMTiles, kTiles, kWarps, kStages, kRepl>;
  auto* kernel = tinygemm_kernel<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, kRepl>;
  // Opt in to more than 48 KB of shared memory (static + dynamic) once per device, for the variant's largest need
  // (or the half SM that a small early-started grid asks for, below).
  static std::atomic<uint64_t> raised{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = 1ull << (device & 63);
  const int spread_bytes = p.sm_shared_bytes / 2;
  if (!(raised.load() & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               S::max_bytes() > spread_bytes ? S::max_bytes() : spread_bytes);
    if (err != cudaSuccess) return err;
    raised.fetch_or(bit);
  }
  const int bytes = S::bytes(p);
  if (resident) {
    // The last answer is kept as one word (device + 1, bytes, CTAs): a decode step asks the same question each layer.
    static std::atomic<uint64_t> last{0};
    const uint64_t key = (static_cast<uint64_t>(device + 1) << 24 | static_cast<uint64_t>(bytes)) << 8;
    const uint64_t seen = last.load();
    if ((seen & ~0xFFull) == key) {
      *resident = static_cast<int>(seen & 0xFF);
      return cudaSuccess;
    }
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(resident, kernel, kWarps * 32, bytes);
    if (err == cudaSuccess) last.store(key | static_cast<uint64_t>(*resident & 0xFF));
    return err;
  }
  if (!p.programmatic) {
    kernel<<<p.n_tiles / kTiles, kWarps * 32, bytes, stream>>>(p);
    return cudaGetLastError();
  }
  // May start while the previous kernel in the stream runs: the kernel waits for it before it reads x. Started
  // early, CTAs are placed on the SMs as the previous kernel's CTAs leave them, so a grid of at most one CTA per
  // SM could put two on one SM and none on another (the down projection behind the SwiGLU GEMM at m = 16: int4 /
  // nf4 decode at batch 16 5-7% slower). Asking for half an SM's shared memory keeps them one per SM, as a normal
  // launch spreads them.
  const int early_bytes = p.n_tiles / kTiles <= p.sm_count && bytes < spread_bytes ? spread_bytes : bytes;
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(p.n_tiles / kTiles), config.blockDim = dim3(kWarps * 32);
  config.dynamicSmemBytes = early_bytes, config.stream = stream;
  config.attrs = &early, config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, bool kPairedRows, int kTiles, int kWarps,
          int kStages>
static cudaError_t for_repl(const Problem& p, cudaStream_t stream, int* resident) {
  // Int codes have no tables; two tiles take half the copies (the same 32 KB at 4) so the x-heavy rings still fit.
  if constexpr (kIntCodes) {
    return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 1>(p, stream, resident);
  } else if constexpr (kTiles > 1) {
    TG_IF (config().repl == 4) {
      return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 2>(p, stream, resident);
    } else {
      return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 1>(p, stream, resident);
    }
  } else {
    TG_IF (config().repl == 4) {
      // A matrix-wide LUT's one table is 32 KB at 4 copies too. Above 2 rows of x, where the x slots grow, and with
      // many CTAs (4-warp CTAs: more than one wave of 8-warp CTAs, so occupancy binds), 2 copies (16 KB) keep a CTA
      // per SM more; with few CTAs the bank conflicts of 2 copies cost more than that CTA gains (docs/KERNELS.md).
      if constexpr (!kPairedRows && kWarps == 4) {
        if (!p.lut_per_row) {
          return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 2>(p, stream, resident);
        }
      }
      return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 4>(p, stream, resident);
    } else TG_IF (config().repl == 2) {
      return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 2>(p, stream, resident);
    } else {
      return run<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, kStages, 1>(p, stream, resident);
    }
  }
}

template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, bool kPairedRows, int kTiles, int kWarps>
static cudaError_t for_stages(const Problem& p, cudaStream_t stream, int* resident = nullptr) {
  // At m > 8 a slot carries 16 rows of x (4 KB): fewer slots keep the shared memory per CTA in bounds.
  TG_IF ((kIntCodes ? config().stages : config().lut_stages) == 4) {
    return for_repl<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, 4 / kMTiles>(p, stream, resident);
  } else {
    return for_repl<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, kWarps, 2>(p, stream, resident);
  }
}

template <typename T, bool kIntCodes, bool kHasZero, int kMTiles, bool kPairedRows, int kTiles>
static cudaError_t for_warps(const Problem& p, cudaStream_t stream) {
  // 8 warps per CTA when the grid fits in one wave of 8-warp CTAs: with few CTAs (small n) they keep enough loads
  // in flight to fill the memory system. Otherwise 4: longer k-slices per warp, fewer CTA start-ups (and table
  // builds), and no second, partial wave.
  int warps = kIntCodes ? config().warps : config().lut_warps;
  if (!warps) {
    int resident = 0;
    const cudaError_t err = for_stages<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, 8>(p, stream, &resident);
    if (err != cudaSuccess) return err;
    warps = p.n_tiles / kTiles <= resident * p.sm_count ? 8 : 4;
  }
  if (warps == 4) return for_stages<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, 4>(p, stream);
  return for_stages<T, kIntCodes, kHasZero, kMTiles, kPairedRows, kTiles, 8>(p, stream);
}

template <typename T, bool kIntCodes, bool kHasZero>
static cudaError_t for_rows(const Problem& p, cudaStream_t stream) {
  if constexpr (!kIntCodes) {
    // One or two rows of x: the A registers as the pair tables give them (no regrouping prmts; see the kernel).
    if (p.m <= 2) return for_warps<T, kIntCodes, kHasZero, 1, true, 1>(p, stream);
  }
  if (p.m <= 8) return for_warps<T, kIntCodes, kHasZero, 1, false, 1>(p, stream);
  // Two tiles per CTA at m > 8 when the tile count splits evenly and still gives (nearly) every SM a CTA.
  TG_IF (config().tiles16 >= 2) {
    const int min_ctas = config().tiles16 == 2 ? p.sm_count : p.sm_count / 2;
    if (p.n_tiles % 2 == 0 && p.n_tiles / 2 >= min_ctas) {
      return for_warps<T, kIntCodes, kHasZero, 2, false, 2>(p, stream);
    }
    return for_warps<T, kIntCodes, kHasZero, 2, false, 1>(p, stream);
  } else {
    return for_warps<T, kIntCodes, kHasZero, 2, false, 1>(p, stream);
  }
}

template <typename T>
static cudaError_t for_dtype(const Problem& p, bool int_codes, bool has_zero, cudaStream_t stream) {
  if (int_codes) return for_rows<T, true, true>(p, stream);  // int codes always carry a zero point
  if (has_zero) return for_rows<T, false, true>(p, stream);
  return for_rows<T, false, false>(p, stream);
}

cudaError_t launch(const Problem& p, bool bf16, bool int_codes, bool has_zero, cudaStream_t stream) {
  if (p.m < 1 || p.m > 16 || (int_codes && !has_zero)) return cudaErrorInvalidValue;
  return bf16 ? for_dtype<__nv_bfloat16>(p, int_codes, has_zero, stream)
              : for_dtype<__half>(p, int_codes, has_zero, stream);
}

}  // namespace tinygemm
