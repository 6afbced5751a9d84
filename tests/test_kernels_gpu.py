"""tinygemm on the GPU: every format x group size x m in 1..16 on Llama shapes and odd ones, against float64;
the SwiGLU epilogue; the dequantize kernel (m > 16) against the PyTorch reference bit for bit; opcheck,
torch.compile (with CUDA graphs), the m > 16 fallback and bad inputs. Skipped without CUDA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from any4lib import quantize
from any4lib.engine.random_weights import random_quantized
from any4lib.kernels import PackedWeight, linear, load_kernels, ops
from any4lib.kernels.reference import swiglu_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm GPU tests need a CUDA device"),
]

LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
FORMATS = ["int4", "any4", "nf4", "fp4", "mxfp4"]
GROUP_SIZES = [32, 64, 128, 256]
TOLERANCE = 1e-2


def run_poisoned(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """linear(x, w) after filling the block the caching allocator will hand out for its output with NaN."""
    shape = (*x.shape[:-1], w.out_features)
    poison = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    del poison
    return linear(x, w)


def relative_error(y: torch.Tensor, x: torch.Tensor, weight64: torch.Tensor) -> float:
    exact = x.double() @ weight64.T
    return ((y.double() - exact).norm() / exact.norm()).item()


def check_all_m(w: PackedWeight, dtype, ms=range(1, 17)):
    weight64 = w.dequantize(torch.float64)
    for m in ms:
        x = torch.randn(m, w.k, device="cuda").to(dtype)
        y = run_poisoned(x, w)
        assert torch.isfinite(y).all(), f"m={m}: unwritten (NaN) outputs"
        err = relative_error(y, x, weight64)
        assert err <= TOLERANCE, f"{w.format} g{w.group_size} {w.n}x{w.k} m={m}: relative error {err:.2e}"


@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_shapes_every_group_size_and_m(fmt, shape):
    for group_size in [32] if fmt == "mxfp4" else GROUP_SIZES:
        w = PackedWeight.from_quantized(random_quantized(fmt, *shape, group_size), torch.bfloat16)
        check_all_m(w, torch.bfloat16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_float16_activations(fmt, group_size):
    if fmt == "mxfp4" and group_size != 32:
        pytest.skip("MX-FP4 blocks are 32 wide")
    w = PackedWeight.from_quantized(random_quantized(fmt, 4096, 4096, group_size), torch.float16)
    check_all_m(w, torch.float16)


ODD_SHAPES = [(200, 96, 32), (33, 160, 32), (1000, 320, 64), (8, 256, 128), (4100, 512, 256), (1, 2048, 64)]


@pytest.mark.parametrize("n,k,group_size", ODD_SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "mxfp4", "int4_sym"])
def test_odd_shapes_from_quantize(fmt, n, k, group_size):
    q = quantize(torch.randn(n, k, device="cuda"), fmt, group_size, **({"max_iter": 30} if fmt == "any4" else {}))
    check_all_m(PackedWeight.from_quantized(q, torch.bfloat16), torch.bfloat16, ms=[1, 3, 8, 9, 16])


def test_batched_leading_dims_and_fallback_above_16_rows():
    w = PackedWeight.from_quantized(random_quantized("any4", 512, 1024, 128), torch.bfloat16)
    weight64 = w.dequantize(torch.float64)
    for shape in [(2, 3, 1024), (40, 1024)]:
        x = torch.randn(shape, device="cuda").to(torch.bfloat16)
        y = linear(x, w)
        assert y.shape == (*shape[:-1], 512)
        assert relative_error(y.reshape(-1, 512), x.reshape(-1, 1024), weight64) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel_equals_the_reference_bit_for_bit(fmt, dtype):
    shapes = ODD_SHAPES + [(4096, 4096, 128), (1024, 2048, 32), (96, 4096, 256)]
    for n, k, group_size in shapes:
        if fmt == "mxfp4" and group_size != 32:
            continue
        w = PackedWeight.from_quantized(random_quantized(fmt, n, k, group_size), dtype)
        dense = w.dequantize(dtype)  # the kernel
        assert dense.shape == (n, k) and dense.dtype == dtype
        expected = w.unpack().dequantize(dtype)  # PyTorch: gather, float32 product and sum, one rounding to dtype
        mismatched = (dense.view(torch.int16) != expected.view(torch.int16)).sum().item()
        assert mismatched == 0, f"{fmt} g{group_size} {n}x{k} {dtype}: {mismatched} values differ from the reference"


def test_dequantize_kernel_from_quantize():
    for fmt in ["int4_sym", "any4_global", "any4"]:
        q = quantize(torch.randn(300, 512, device="cuda"), fmt, 64, **({"max_iter": 20} if "any4" in fmt else {}))
        w = PackedWeight.from_quantized(q, torch.bfloat16)
        assert torch.equal(w.dequantize(torch.bfloat16), w.unpack().dequantize(torch.bfloat16))


SWIGLU_SHAPES = [(14336, 4096), (8, 256), (200, 512)]  # (h, k) of gate and of up: Llama-3-8B's MLP, small ones


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("h,k", SWIGLU_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "mxfp4"])
def test_swiglu_epilogue(fmt, h, k, dtype):
    # The epilogue's silu(gate) * up against (1) the same kernel without it, the products then through PyTorch (the
    # same fp32 sums, so at most one rounding step apart), and (2) float64 from the unpacked gate and up weights.
    group_size = 32 if fmt == "mxfp4" else 128
    gate, up = (random_quantized(fmt, h, k, group_size) for _ in range(2))
    fused = PackedWeight.from_gate_up(gate, up, dtype)
    plain = replace(fused, swiglu=False)
    gate64, up64 = (PackedWeight.from_quantized(q, dtype).dequantize(torch.float64) for q in (gate, up))
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for m in [1, 2, 3, 8, 9, 16]:
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = run_poisoned(x, fused)
        assert y.shape == (m, h) and torch.isfinite(y).all(), f"m={m}: unwritten (NaN) outputs"
        torch.testing.assert_close(y.float(), swiglu_reference(linear(x, plain)).float(), rtol=step, atol=1e-6)
        exact = F.silu(x.double() @ gate64.T) * (x.double() @ up64.T)
        err = ((y.double() - exact).norm() / exact.norm()).item()
        assert err <= TOLERANCE, f"{fmt} {h}x{k} m={m}: relative error {err:.2e}"


def _op_args(fmt, dtype, m=5, n=48, k=256, group_size=64):
    w = PackedWeight.from_quantized(random_quantized(fmt, n, k, group_size), dtype)
    x = torch.randn(m, k, device="cuda").to(dtype)
    return (x, w.codes, w.scales, w.lut, w.n, w.group_size, w.int_codes)


@pytest.mark.parametrize("fmt,dtype", [("int4", torch.bfloat16), ("any4", torch.bfloat16), ("nf4", torch.float16)])
def test_opcheck(fmt, dtype):
    load_kernels()
    torch.library.opcheck(torch.ops.any4lib.tinygemm_4bit.default, _op_args(fmt, dtype))
    torch.library.opcheck(torch.ops.any4lib.tinygemm_4bit.default, (*_op_args(fmt, dtype), True))  # swiglu


@pytest.mark.parametrize("fmt,dtype", [("int4", torch.bfloat16), ("any4", torch.float16), ("mxfp4", torch.bfloat16)])
def test_opcheck_dequantize(fmt, dtype):
    load_kernels()
    _, codes, scales, lut, n, group_size, int_codes = _op_args(fmt, dtype, group_size=32)
    torch.library.opcheck(torch.ops.any4lib.tinygemm_dequantize.default, (codes, scales, lut, n, 256, 32, int_codes))


def test_dequantize_bad_inputs_raise_clear_errors():
    load_kernels()
    _, codes, scales, lut, n, group_size, int_codes = _op_args("any4", torch.bfloat16)
    with pytest.raises(RuntimeError, match="scales .* must be bfloat16 or float16"):
        ops.tinygemm_dequantize(codes, scales.float(), lut, n, 256, group_size, int_codes)
    with pytest.raises(RuntimeError, match="codes must be contiguous int32 \\[3, 5, 32, 4\\]"):
        ops.tinygemm_dequantize(codes, scales, lut, n, 320, group_size, int_codes)  # k that does not match codes
    with pytest.raises(RuntimeError, match="does not divide k"):
        ops.tinygemm_dequantize(codes, scales, lut, n, 224, group_size, int_codes)
    with pytest.raises(RuntimeError, match="pass a lut exactly"):
        ops.tinygemm_dequantize(codes, scales, None, n, 256, group_size, int_codes)


def test_bad_inputs_raise_clear_errors():
    load_kernels()
    x, codes, scales, lut, n, group_size, int_codes = _op_args("any4", torch.bfloat16)
    op = torch.ops.any4lib.tinygemm_4bit
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        op(x.float(), codes, scales, lut, n, group_size, int_codes)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        op(torch.randn(17, x.shape[1], device="cuda", dtype=x.dtype), codes, scales, lut, n, group_size, int_codes)
    with pytest.raises(RuntimeError, match="codes must be contiguous int32"):
        op(x, codes[:, :1].contiguous(), scales, lut, n, group_size, int_codes)
    with pytest.raises(RuntimeError, match="group_size must be"):
        op(x, codes, scales, lut, n, 48, int_codes)
    with pytest.raises(RuntimeError, match="pass a lut exactly"):
        op(x, codes, scales, None, n, group_size, int_codes)
    with pytest.raises(RuntimeError, match="must be on a CUDA device"):
        op(x.cpu(), codes, scales, lut, n, group_size, int_codes)
    shifted = torch.empty(codes.numel() + 1, dtype=codes.dtype, device="cuda")[1:].view(codes.shape)
    with pytest.raises(RuntimeError, match="must start 16-byte aligned"):
        op(x, shifted.copy_(codes), scales, lut, n, group_size, int_codes)
    x, codes, scales, lut, n, group_size, int_codes = _op_args("any4", torch.bfloat16, n=40)
    with pytest.raises(RuntimeError, match="n = 40 must be a multiple of 16"):
        op(x, codes, scales, lut, n, group_size, int_codes, True)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    w = PackedWeight.from_quantized(random_quantized("any4", 1024, 2048, 128), torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: linear(x, w), fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records a CUDA graph after warm-up runs, then replays it
        x = torch.randn(4, 2048, device="cuda").to(torch.bfloat16)
        torch.testing.assert_close(compiled(x), linear(x, w), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", ["int4", "any4"])
def test_early_start_reads_x_after_the_kernel_that_writes_it(fmt, monkeypatch):
    # On sm_90+ kernels may start while the kernel before them runs (programmatic dependent launch): the GEMM
    # behind the decode bench's add + RMSNorm, which allows that at its first instruction, and the norm behind the
    # GEMM, which allows it at its top. Replayed from CUDA graphs with fresh inputs each time, each kernel must see
    # this replay's input: bit for bit what the same ops give run one at a time, with the GEMMs' early launch on or
    # off (the norm is launched early either way).
    from any4lib.engine.rmsnorm import add_rms_norm

    first, second = (PackedWeight.from_quantized(random_quantized(fmt, 4096, 4096, 128), torch.bfloat16)
                     for _ in range(2))
    src, residual = (torch.randn(4, 4096, device="cuda").to(torch.bfloat16) for _ in range(2))
    norm_weight = torch.rand(4096, device="cuda").to(torch.bfloat16)

    def step(sync=lambda: None):
        h = linear(src, first)
        sync()
        normed = add_rms_norm(h, residual, norm_weight, 1e-5)[0]
        sync()
        return linear(normed, second)

    graphs = {}
    for flag in ("1", "0"):  # the launch attribute is chosen when the op is called, here at capture
        monkeypatch.setenv("ANY4_TINYGEMM_PDL", flag)
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graphs[flag] = (graph, out)
    for _ in range(10):
        src.copy_(torch.randn_like(src, dtype=torch.float32))
        residual.copy_(torch.randn_like(residual, dtype=torch.float32))
        outs = {}
        for flag, (graph, out) in graphs.items():
            graph.replay()
            outs[flag] = out.clone()
        expected = step(torch.cuda.synchronize)  # each kernel launched after the one before has finished
        assert torch.equal(outs["0"], expected) and torch.equal(outs["1"], expected)
