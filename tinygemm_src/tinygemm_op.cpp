// Torch binding of any4lib::tinygemm_4bit and any4lib::tinygemm_dequantize. The schemas and the fake (meta) kernels
// are defined in Python (any4lib/kernels/ops.py); this file checks the arguments and launches the CUDA kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "tinygemm.h"

namespace {

struct DeviceInfo {
  int sm_count;         // multiprocessors
  int major;            // compute capability
  int sm_shared_bytes;  // shared memory per multiprocessor
};

const DeviceInfo& device_info(int device) {  // cached: asked once per device
  static DeviceInfo infos[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "tinygemm: CUDA device index ", std::to_string(device), " out of range");
  DeviceInfo& info = infos[device];
  if (info.sm_count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_shared_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  }
  return info;
}

// Programmatic dependent launch needs sm_90+; ANY4_TINYGEMM_PDL=0 turns it off (read at each call, so a process can
// compare both: a CUDA graph keeps what its capture saw).
bool programmatic_launch(const DeviceInfo& info) {
  const char* env = std::getenv("ANY4_TINYGEMM_PDL");
  return info.major >= 9 && !(env && std::string(env) == "0");
}

// Integers reach TORCH_CHECK messages as strings: streaming an int64 from this JIT-built library crashed inside
// libstdc++ on the H100 image (a mismatch between the extension's and torch's C++ runtimes), so we never do.
std::string str(int64_t v) { return std::to_string(v); }

std::string shape(const at::Tensor& t) {  // "[a, b, c]"
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

// Checks the packed weight (codes, scales, lut) of an [n, k] matrix against each other and against the activation
// dtype and device, and fills the weight's part of a Problem. `op` names the caller in the messages.
tinygemm::Problem weight_problem(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& lut, int64_t n, int64_t k, int64_t group_size,
                                 bool int_codes, at::ScalarType dtype, at::Device device, bool* has_zero) {
  TORCH_CHECK(codes.is_cuda() && scales.is_cuda(), op, ": codes and scales must be on a CUDA device; got codes on ",
              codes.device(), ", scales on ", scales.device());
  TORCH_CHECK(k % 32 == 0, op, ": k must be a multiple of 32, got ", str(k));
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256,
              op, ": group_size must be 32, 64, 128 or 256, got ", str(group_size));
  TORCH_CHECK(k % group_size == 0, op, ": group_size ", str(group_size), " does not divide k = ", str(k));
  TORCH_CHECK(n >= 1, op, ": n must be positive, got ", str(n));
  const int64_t n_tiles = (n + 15) / 16, k_chunks = (k + 63) / 64, groups = k_chunks * 64 / group_size;
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.is_contiguous() && codes.dim() == 4 &&
                  codes.size(0) == n_tiles && codes.size(1) == k_chunks && codes.size(2) == 32 && codes.size(3) == 4,
              op, ": codes must be contiguous int32 [", str(n_tiles), ", ", str(k_chunks), ", 32, 4] for n = ",
              str(n), ", k = ", str(k), "; got ", codes.scalar_type(), " ", shape(codes));
  TORCH_CHECK(scales.scalar_type() == dtype && scales.is_contiguous() && scales.dim() == 5 &&
                  scales.size(0) == n_tiles && scales.size(1) == groups && scales.size(2) == 8 &&
                  scales.size(3) == 2 && (scales.size(4) == 1 || scales.size(4) == 2),
              op, ": scales must be contiguous ", dtype, " [", str(n_tiles), ", ", str(groups), ", 8, 2, 1 or 2]; got ",
              scales.scalar_type(), " ", shape(scales));
  *has_zero = scales.size(4) == 2;
  TORCH_CHECK(!int_codes || *has_zero, op, ": int codes need (scale, zero) pairs: scales.size(4) == 2");
  TORCH_CHECK(int_codes == !lut.has_value(), op, ": pass a lut exactly when the codes are not int codes");
  int lut_per_row = 0;
  if (lut.has_value()) {
    TORCH_CHECK(lut->is_cuda() && lut->scalar_type() == at::kInt && lut->is_contiguous() && lut->dim() == 2 &&
                    lut->size(1) == 8 && (lut->size(0) == 1 || lut->size(0) == n_tiles * 16),
                op, ": lut must be contiguous CUDA int32 [1 or ", str(n_tiles * 16), ", 8]; got ", lut->scalar_type(),
                " ", shape(*lut), " on ", lut->device());
    lut_per_row = lut->size(0) != 1;
  }
  TORCH_CHECK(codes.device() == device && scales.device() == device && (!lut.has_value() || lut->device() == device),
              op, ": all tensors must be on one device (", device, ")");
  // The kernels copy the weight in 16-byte pieces; a view into a larger buffer may start elsewhere.
  for (const at::Tensor* t : {&codes, &scales, lut.has_value() ? &*lut : &codes}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op,
                ": codes, scales and lut must start 16-byte aligned; pass a fresh tensor (e.g. .clone()) instead of a "
                "view into a larger buffer");
  }
  tinygemm::Problem p{};
  p.codes = reinterpret_cast<const uint4*>(codes.data_ptr());
  p.scales = scales.data_ptr();
  p.lut = lut.has_value() ? reinterpret_cast<const uint4*>(lut->data_ptr()) : nullptr;
  p.lut_per_row = lut_per_row;
  p.n = static_cast<int>(n), p.k = static_cast<int>(k);
  p.n_tiles = static_cast<int>(n_tiles), p.k_chunks = static_cast<int>(k_chunks), p.groups = static_cast<int>(groups);
  p.group_shift = __builtin_ctzll(group_size);
  return p;
}

at::Tensor tinygemm_4bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const std::optional<at::Tensor>& lut, int64_t n, int64_t group_size, bool int_codes,
                         bool swiglu) {
  TORCH_CHECK(x.is_cuda(), "tinygemm_4bit: x must be on a CUDA device, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "tinygemm_4bit: x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "tinygemm_4bit: x must be a contiguous [m, k] matrix, got shape ",
              shape(x), x.is_contiguous() ? "" : " (not contiguous)");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= 16, "tinygemm_4bit: x must have 1..16 rows, got ", str(m),
              " (larger m: dequantize + matmul)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "tinygemm_4bit: x must be 16-byte aligned");
  TORCH_CHECK(!swiglu || n % 16 == 0, "tinygemm_4bit: swiglu needs the gate and up rows interleaved by 8, so n = ",
              str(n), " must be a multiple of 16 (PackedWeight.from_gate_up packs them)");
  bool has_zero = false;
  tinygemm::Problem p = weight_problem("tinygemm_4bit", codes, scales, lut, n, k, group_size, int_codes,
                                       x.scalar_type(), x.device(), &has_zero);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m, swiglu ? n / 2 : n}, x.options());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.m = static_cast<int>(m);
  p.swiglu = swiglu;
  const DeviceInfo& info = device_info(x.get_device());
  p.sm_count = info.sm_count;
  p.sm_shared_bytes = info.sm_shared_bytes;
  p.programmatic = programmatic_launch(info);
  const cudaError_t err = tinygemm::launch(p, x.scalar_type() == at::kBFloat16, int_codes, has_zero,
                                           c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tinygemm_4bit: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

at::Tensor tinygemm_dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& lut,
                               int64_t n, int64_t k, int64_t group_size, bool int_codes) {
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kHalf,
              "tinygemm_dequantize: scales (the activation dtype) must be bfloat16 or float16, got ",
              scales.scalar_type());
  bool has_zero = false;
  tinygemm::Problem p = weight_problem("tinygemm_dequantize", codes, scales, lut, n, k, group_size, int_codes,
                                       scales.scalar_type(), codes.device(), &has_zero);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor w = at::empty({n, k}, scales.options());
  p.y = w.data_ptr();
  const cudaError_t err = tinygemm::launch_dequantize(p, scales.scalar_type() == at::kBFloat16, int_codes, has_zero,
                                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tinygemm_dequantize: kernel launch failed: ", cudaGetErrorString(err));
  return w;
}

}  // namespace

TORCH_LIBRARY_IMPL(any4lib, CUDA, m) {
  m.impl("tinygemm_4bit", &tinygemm_4bit);
  m.impl("tinygemm_dequantize", &tinygemm_dequantize);
}
