"""The PyTorch reference of tinygemm: what the CUDA op computes, on any device (the CPU path of `linear`)."""

from __future__ import annotations

import torch


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T with fp32 accumulation, returned in x's dtype; weight is the dequantized [N, K] matrix."""
    return (x.float() @ weight.float().T).to(x.dtype)
