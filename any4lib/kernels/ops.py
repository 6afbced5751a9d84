"""Schemas and fake (meta) kernels of the tinygemm ops; the CUDA implementations register themselves when
tinygemm_src/tinygemm_op.cpp is loaded (build.load_kernels)."""

from __future__ import annotations

import torch


def _load_for(t: torch.Tensor) -> None:
    """Tracing for a CUDA run: the real kernels must exist by the time the graph runs."""
    if t.is_cuda and torch.cuda.is_available():
        from .build import load_kernels

        load_kernels()


torch.library.define(
    "any4lib::tinygemm_4bit",
    "(Tensor x, Tensor codes, Tensor scales, Tensor? lut, int n, int group_size, bool int_codes, bool swiglu=False) "
    "-> Tensor",
)


@torch.library.register_fake("any4lib::tinygemm_4bit")
def _tinygemm_4bit_fake(x, codes, scales, lut, n, group_size, int_codes, swiglu=False):
    torch._check(x.dim() == 2, lambda: f"tinygemm_4bit: x must be [m, k], got {tuple(x.shape)}")
    torch._check(x.dtype in (torch.bfloat16, torch.float16), lambda: f"x must be bf16/fp16, got {x.dtype}")
    torch._check(not swiglu or n % 16 == 0, lambda: f"tinygemm_4bit: swiglu needs n % 16 == 0, got n = {n}")
    _load_for(x)
    return x.new_empty(x.shape[0], n // 2 if swiglu else n)


torch.library.define(
    "any4lib::tinygemm_dequantize",
    "(Tensor codes, Tensor scales, Tensor? lut, int n, int k, int group_size, bool int_codes) -> Tensor",
)


@torch.library.register_fake("any4lib::tinygemm_dequantize")
def _tinygemm_dequantize_fake(codes, scales, lut, n, k, group_size, int_codes):
    torch._check(scales.dtype in (torch.bfloat16, torch.float16), lambda: f"scales must be bf16/fp16, got {scales.dtype}")
    _load_for(scales)
    return scales.new_empty(n, k)


def tinygemm_4bit(x, codes, scales, lut, n: int, group_size: int, int_codes: bool,
                  swiglu: bool = False) -> torch.Tensor:
    """y = x @ W^T [m, n]; swiglu (rows gate/up interleaved by 8): silu(gate) * up [m, n / 2]
    (reference.swiglu_reference)."""
    return torch.ops.any4lib.tinygemm_4bit(x, codes, scales, lut, n, group_size, int_codes, swiglu)


def tinygemm_dequantize(codes, scales, lut, n: int, k: int, group_size: int, int_codes: bool) -> torch.Tensor:
    """The packed weight as a dense [n, k] matrix in the scales' dtype (the prefill path of `linear`)."""
    return torch.ops.any4lib.tinygemm_dequantize(codes, scales, lut, n, k, group_size, int_codes)
