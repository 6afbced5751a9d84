"""The PyTorch reference of tinygemm: what the CUDA op computes, on any device (the CPU path of `linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T with fp32 accumulation, returned in x's dtype; weight is the dequantized [N, K] matrix."""
    return (x.float() @ weight.float().T).to(x.dtype)


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h [..., n] whose columns are gate and up interleaved by 8 (packing.gate_up_rows):
    [..., n / 2], as PyTorch computes it in h's dtype (silu rounded, then the product). The kernel's epilogue rounds
    once, as the kernel torch.compile fuses from the same ops does: the two differ by at most about one rounding
    step."""
    blocks = h.unflatten(-1, (-1, 2, 8))
    return F.silu(blocks[..., 0, :].flatten(-2)) * blocks[..., 1, :].flatten(-2)
