"""Peer 4-bit linear layers the benchmark times beside tinygemm: PyTorch's int4 tinygemm, GemLite, bitsandbytes NF4 /
FP4.

Each stands in for nn.Linear and is built from the same weight (our int4 QuantizedTensor where the peer's formula is
ours); the peer libraries are imported when a layer is built.
"""

from __future__ import annotations

import torch
from torch import nn

PEERS = ("torch-int4", "gemlite-int4", "bnb-nf4", "bnb-fp4")


class TorchInt4Linear(nn.Module):
    """PyTorch's built-in tinygemm int4 (torch._weight_int4pack_mm), fed our int4 codes, scales and zeros.

    Its dequantization, (code - 8) * scale + zero, is our int4 formula, so the same QuantizedTensor is reused.
    """

    def __init__(self, q, inner_k_tiles: int = 8):
        super().__init__()
        self.group_size, self.out_features = q.group_size, q.shape[0]
        codes = q.codes.int()
        if q.device.type == "cuda":
            packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                       inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)
        self.register_buffer("packed", packed)
        # [K // g, N, 2]: scale and zero of each group, in the activation dtype.
        self.register_buffer("scales_zeros", torch.stack([q.scale, q.zero], -1).transpose(0, 1).contiguous().bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scales_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def gemlite_int4(q):
    """GemLite's int4 layer holding our int4 codes."""
    import gemlite

    n, k = q.shape
    layer = gemlite.GemLiteLinear(4, group_size=q.group_size, in_features=k, out_features=n,
                                  input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
    # GemLite (HQQ convention) computes (code - z) * scale; ours is (code - 8) * scale + zero. z is stored in bf16,
    # so its weights round slightly differently from ours: same bytes moved, which is all this bench measures.
    z = 8 - q.zero / q.scale.clamp_min(1e-12)
    layer.pack(q.codes, q.scale.bfloat16(), z.bfloat16(), bias=None)
    return layer


class Bnb4bitLinear(nn.Module):
    """bitsandbytes NF4 or FP4 (its default block of 64, absmax scaling), through bnb.matmul_4bit."""

    def __init__(self, w: torch.Tensor, quant_type: str):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.weight, self.state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.state)
