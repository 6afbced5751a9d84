"""Schema and fake (meta) kernel of the tinygemm op; the CUDA implementation registers itself when
tinygemm_src/tinygemm_op.cpp is loaded (build.load_kernels)."""

from __future__ import annotations

import torch

torch.library.define(
    "any4lib::tinygemm_4bit",
    "(Tensor x, Tensor codes, Tensor scales, Tensor? lut, int n, int group_size, bool int_codes) -> Tensor",
)


@torch.library.register_fake("any4lib::tinygemm_4bit")
def _tinygemm_4bit_fake(x, codes, scales, lut, n, group_size, int_codes):
    torch._check(x.dim() == 2, lambda: f"tinygemm_4bit: x must be [m, k], got {tuple(x.shape)}")
    torch._check(x.dtype in (torch.bfloat16, torch.float16), lambda: f"x must be bf16/fp16, got {x.dtype}")
    if x.is_cuda and torch.cuda.is_available():  # tracing for a CUDA run: the real kernel must exist by then
        from .build import load_kernels

        load_kernels()
    return x.new_empty(x.shape[0], n)


def tinygemm_4bit(x, codes, scales, lut, n: int, group_size: int, int_codes: bool) -> torch.Tensor:
    return torch.ops.any4lib.tinygemm_4bit(x, codes, scales, lut, n, group_size, int_codes)
