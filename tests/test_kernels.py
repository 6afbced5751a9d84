"""tinygemm on CPU: packing round trip, the packed layout read the way the kernel reads it, the reference against
float64, clear errors, and a compile-only build of every CUDA source for sm_80 and sm_90."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from any4lib import quantize
from any4lib.kernels import PackedWeight, build, check_supported, is_supported, linear, ops, packing

FORMATS = ["int4", "any4", "nf4", "fp4", "mxfp4", "int4_sym", "any4_global"]
GROUP_SIZES = [32, 64, 128, 256]
DTYPES = [torch.bfloat16, torch.float16]


def _quantized(fmt, group_size, n=40, k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = k or (288 if group_size == 32 else 2 * group_size)  # 288: k = 64 c + 32, the padded case
    return quantize(torch.randn(n, k, generator=gen), fmt, group_size, max_iter=20) if "any" in fmt else quantize(
        torch.randn(n, k, generator=gen), fmt, group_size
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_unpack_round_trip(fmt, group_size, dtype):
    q = _quantized(fmt, group_size)
    packed = PackedWeight.from_quantized(q, dtype)
    back = packed.unpack()
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.scale, (q.scale * q.tensor_scale).to(dtype).float())
    assert torch.equal(back.lut.expand_as(q.lut), q.lut.to(dtype).float())
    assert (back.zero is None) == (q.zero is None)
    if q.zero is not None:
        assert torch.equal(back.zero, q.zero.to(dtype).float())
    assert packed.int_codes == (fmt == "int4")
    assert packed.codes.shape == (3, -(-q.shape[1] // 64), 32, 4)


def _fragment_values(word: int, lut_words: list[list[int]], int_codes: bool, dtype) -> list[list[int]]:
    """The kernel's dequantize_fragment, bit for bit: 4 registers of 2 16-bit values each."""
    if int_codes:
        magic = 0x43004300 if dtype == torch.bfloat16 else 0x64006400
        regs = [((word >> (4 * p)) & 0x000F000F) | magic for p in range(4)]
        return [[r & 0xFFFF, r >> 16] for r in regs]
    # LUT codes: the kernel's pair tables hold (row g's entry[c0], row g+8's entry[c1]) at c0 | c1 << 4, entries
    # from the byte planes; byte i of the word gives one such pair, and prmts regroup bytes (0, 1) and (2, 3) by row.
    entries = []
    for words in lut_words:
        planes = [(w >> (8 * i)) & 0xFF for w in words for i in range(4)]
        entries.append([planes[c] | planes[16 + c] << 8 for c in range(16)])
    pairs = [[entries[0][byte & 15], entries[1][byte >> 4]] for byte in ((word >> (8 * i)) & 0xFF for i in range(4))]
    return [[pairs[2 * r][h], pairs[2 * r + 1][h]] for r in range(2) for h in range(2)]


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4"])
def test_packed_layout_as_the_kernel_reads_it(fmt, group_size):
    """Rebuild W from the packed buffers with the kernel's indexing and the PTX mma fragment map, and compare
    with the unpacked weight: the packing and the kernel agree on every bit of the layout."""
    dtype = torch.bfloat16
    q = _quantized(fmt, group_size, n=20, k=96 if group_size == 32 else 256)
    p = PackedWeight.from_quantized(q, dtype)
    expected = p.dequantize(torch.float64)
    n, k = q.shape
    tiles, chunks = p.codes.shape[:2]
    codes = (p.codes.long() & 0xFFFFFFFF).flatten().tolist()
    lut = None if p.int_codes else (p.lut.long() & 0xFFFFFFFF).tolist()
    flat_scales = p.scales.flatten().float()
    z = p.scales.shape[-1]
    groups = p.scales.shape[1]
    to_float = lambda bits: torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).item()  # noqa: E731
    rebuilt = torch.full((tiles * 16, chunks * 64), float("nan"), dtype=torch.float64)
    for tile in range(tiles):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            rows = [tile * 16 + g, tile * 16 + g + 8]
            lut_rows = [lut[r if len(lut) > 1 else 0] for r in rows] if lut else None
            for c in range(chunks):
                for j in range(4):
                    word = codes[((tile * chunks + c) * 32 + lane) * 4 + j]
                    regs = _fragment_values(word, lut_rows, p.int_codes, dtype)
                    k0 = c * 64 + 16 * j + 4 * t
                    group = k0 // group_size
                    base = ((tile * groups + group) * 8 + g) * 2 * z
                    for r in range(4):  # PTX A fragment: register r holds row g + 8 (r & 1), k pair r >> 1
                        h = r & 1
                        scale = flat_scales[base + h * z].item()
                        zero = flat_scales[base + h * z + 1].item() if z == 2 else 0.0
                        for e in range(2):
                            value = to_float(regs[r][e])
                            if p.int_codes:
                                value -= 136.0
                            rebuilt[rows[h], k0 + 2 * (r >> 1) + e] = value * scale + zero
    assert torch.equal(rebuilt[:n, :k], expected)


def _byte_perm(a: int, b: int, selector: int) -> int:
    """CUDA's __byte_perm: byte i of the result is byte (selector >> 4 i) & 7 of the 8 bytes of (b << 32 | a)."""
    source = (b << 32) | a
    return sum(((source >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


@pytest.mark.parametrize("m", [1, 2])
def test_paired_rows_fragments_multiply_as_the_kernel_reads_them(m):
    """The kernel's kPairedRows path (LUT codes, m <= 2) on one 16 x 16 tile, as the PTX mma fragment maps place its
    registers: A registers are the (row g, row g + 8) value pairs at the lane's k_i as the pair tables give them,
    B spreads x with the kernel's selectors, and accumulators 0 + 3 of lane (g, t) must be row g + 8 (t & 1) of
    W times x row t // 2 (and the ones-mma's 0 + 1 the sum of that x row), against a float64 product."""
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, 16, generator=gen).to(torch.bfloat16)
    bits = lambda v: int(v.view(torch.int16).item()) & 0xFFFF  # noqa: E731
    value = lambda b: torch.tensor([b]).to(torch.int16).view(torch.bfloat16).double().item()  # noqa: E731
    a_matrix = torch.zeros(16, 16, dtype=torch.float64)
    b_matrix = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):  # A register i: (W[g][k_i], W[g + 8][k_i]), k_i = 4 t + i; PTX: row g + 8 (i & 1),
            pair = (bits(w[g, 4 * t + i]), bits(w[g + 8, 4 * t + i]))  # k-slots 2 t + 8 (i >> 1) + e
            for e in range(2):
                a_matrix[g + 8 * (i & 1), 2 * t + 8 * (i >> 1) + e] = value(pair[e])
        x_row = g >> 2
        xv = [0, 0] if x_row >= m else [bits(x[x_row, 4 * t + 2 * r]) | bits(x[x_row, 4 * t + 2 * r + 1]) << 16
                                        for r in range(2)]
        select = (0x3244 if g & 1 else 0x1044) if g & 2 else (0x4432 if g & 1 else 0x4410)
        for r in range(2):  # B register r: k-slots 2 t + 8 r + e of column g
            reg = _byte_perm(xv[r], 0, select)
            for e in range(2):
                b_matrix[2 * t + 8 * r + e, g] = value((reg >> (16 * e)) & 0xFFFF)
    d = a_matrix @ b_matrix
    sums = torch.ones(16, 16, dtype=torch.float64) @ b_matrix
    exact = w.double() @ x.double().T  # [16 rows, m]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if t // 2 < m:
            assert d[g, 2 * t] + d[g + 8, 2 * t + 1] == pytest.approx(exact[g + 8 * (t & 1), t // 2].item(), abs=1e-9)
            assert sums[g, 2 * t] + sums[g, 2 * t + 1] == pytest.approx(x[t // 2].double().sum().item(), abs=1e-9)


@pytest.mark.parametrize("fmt", ["int4", "any4", "mxfp4"])
def test_reference_matches_float64(fmt):
    q = _quantized(fmt, 64, n=48, k=256)
    w = PackedWeight.from_quantized(q, torch.bfloat16)
    x = torch.randn(5, 3, 256).to(torch.bfloat16)
    y = linear(x, w)
    assert y.shape == (5, 3, 48) and y.dtype == torch.bfloat16
    exact = x.double() @ w.dequantize(torch.float64).T
    err = (y.double() - exact).norm() / exact.norm()
    assert err < 1e-2


def test_gate_up_rows_pair_each_output_in_one_tile():
    order = packing.gate_up_rows(32).tolist()
    assert order == list(range(8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        packing.gate_up_rows(24)


@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "mxfp4"])
def test_swiglu_weight_matches_float64(fmt):
    gate, up = (_quantized(fmt, 64 if fmt != "mxfp4" else 32, n=40, k=256, seed=s) for s in (1, 2))
    w = PackedWeight.from_gate_up(gate, up, torch.bfloat16)
    assert w.swiglu and w.shape == (80, 256) and w.out_features == 40
    # Stored interleaved by 8; unpack keeps that order.
    plain = [PackedWeight.from_quantized(q, torch.bfloat16).dequantize(torch.float64) for q in (gate, up)]
    stacked = torch.cat(plain)[packing.gate_up_rows(80)]
    assert torch.equal(w.dequantize(torch.float64), stacked)
    x = torch.randn(3, 2, 256).to(torch.bfloat16)
    y = linear(x, w)
    assert y.shape == (3, 2, 40) and y.dtype == torch.bfloat16
    exact = F.silu(x.double() @ plain[0].T) * (x.double() @ plain[1].T)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-2


def test_swiglu_fake_kernel_halves_the_columns():
    w = PackedWeight.from_gate_up(_quantized("any4", 64, n=16, k=128), _quantized("any4", 64, n=16, k=128, seed=1))
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    tensors = [mode.from_tensor(t) for t in (torch.empty(3, 128, dtype=torch.bfloat16), w.codes, w.scales, w.lut)]
    with mode:
        args = (*tensors, w.n, 64, False)
        assert ops.tinygemm_4bit(*args, swiglu=True).shape == (3, 16)
        assert ops.tinygemm_4bit(*args).shape == (3, 32)


def test_swiglu_bad_inputs_say_why():
    with pytest.raises(ValueError, match="same shape"):
        PackedWeight.from_gate_up(_quantized("int4", 64, n=16), _quantized("int4", 64, n=24))
    with pytest.raises(ValueError, match="multiple of 8 rows"):
        PackedWeight.from_gate_up(_quantized("int4", 64, n=12), _quantized("int4", 64, n=12))
    with pytest.raises(ValueError, match="cannot stack"):
        PackedWeight.from_gate_up(_quantized("int4", 64, n=16), _quantized("int4", 32, n=16, k=128))


def test_unsupported_weights_say_why():
    assert not is_supported(_quantized("int8", 64))
    with pytest.raises(ValueError, match="4-bit"):
        check_supported(_quantized("int8", 64))
    with pytest.raises(ValueError, match="group size 16"):
        PackedWeight.from_quantized(quantize(torch.randn(16, 64), "nvfp4"))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        PackedWeight.from_quantized(_quantized("int4", 64), torch.float32)


def test_linear_rejects_mismatched_inputs():
    w = PackedWeight.from_quantized(_quantized("int4", 64), torch.bfloat16)
    with pytest.raises(ValueError, match="expects k = 128"):
        linear(torch.randn(2, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="packed for torch.bfloat16"):
        linear(torch.randn(2, 128, dtype=torch.float16), w)


def test_import_builds_nothing_and_leaves_cuda_alone():
    code = "import any4lib, any4lib.kernels, torch, sys; print(torch.cuda.is_initialized(), build._loaded)"
    code = code.replace("build._loaded", "any4lib.kernels.build._loaded")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_build_key_changes_with_sources(tmp_path, monkeypatch):
    before = build.build_key("9.0")
    assert build.build_key("8.0") != before
    copy = tmp_path / "tinygemm_src"
    shutil.copytree(build.SOURCE_DIR, copy)
    (copy / "tinygemm.cuh").write_text((copy / "tinygemm.cuh").read_text() + "\n// edited\n")
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    assert build.build_key("9.0") != before


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: compiling tinygemm_src needs the CUDA toolkit")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(arch, tmp_path):
    for source in sorted(build.SOURCE_DIR.glob("*.cu")):
        cmd = [NVCC, f"-arch={arch}", "-O3", "--resource-usage", "-c", str(source), "-o", str(tmp_path / "out.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
        assert not re.search(r"[1-9]\d* bytes stack frame", done.stderr), f"local-memory arrays:\n{done.stderr}"


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs nvcc (CUDA headers) and g++")
def test_torch_binding_compiles(tmp_path):
    """Syntax check of the torch binding against this torch's headers (a CPU wheel lacks one generated CUDA
    header, which holds build macros only: an empty stand-in is enough to check our code)."""
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    homes = [os.environ.get("CUDA_HOME", ""), Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    cuda_include = next(Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists())
    includes = [f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()), f"-I{cuda_include}", f"-I{build.SOURCE_DIR}"]
    for source in sorted(build.SOURCE_DIR.glob("*.cpp")):
        cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", *includes, str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
