"""GPTQ (Frantar et al., 2022) for every format of the registry: codes chosen column by column with error feedback.

Per layer, H = 2 X^T X over the calibration inputs X [T, K] (accumulated by HessianAccumulator). Columns are
quantized left to right (or by decreasing H diagonal with act_order); each column's rounding error, scaled by the
inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized, lazily in blocks (Algorithm 1).

The per-column quantizer is the format's own. Each group's scale / zero / table come from the format's quantizer
applied to that group of the *updated* weights when GPTQ reaches its first column (dynamic groups, as the GPTQ
reference computes them), or from the original weights up front (static groups). Formats whose parameters are not
per group take them up front: anyN learns each row's LUT on the original weights (weighted k-means, as RTN does)
and GPTQ then assigns codes against that fixed LUT; NVFP4 keeps its per-tensor scale. act_order implies static
groups, since QuantizedTensor's groups are contiguous runs of K. The result is an ordinary QuantizedTensor.
"""

from __future__ import annotations

import torch

from .formats import _safe_divide, get_format
from .qtensor import QuantizedTensor
from .quant import _resolve_group_size, quantize

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


class HessianAccumulator:
    """H = 2 / T * sum_t x_t x_t^T over the inputs of one layer (float64, [K, K]): the mean, so the dampening
    fraction means the same whatever the number of calibration tokens."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer; GPTQ needs its Hessian")
        return 2 * self.sum / self.tokens


def inverse_hessian_factor(h: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row i holds the error-feedback weights of column i."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        factor = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"H + {damp} * mean(diag H) is not positive definite; raise damp (e.g. 0.1)") from err
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def _params(q: QuantizedTensor, dtype: torch.dtype):
    """(lut [R, L], scale [N, G], zero [N, G] or None) of a QuantizedTensor, in `dtype`."""
    return q.lut.to(dtype), q.scale.to(dtype), None if q.zero is None else q.zero.to(dtype)


def _snap(column: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
    """Nearest code of each entry of `column` [N] under its row's (lut, scale, zero), and the value it stands for."""
    shifted = column if zero is None else column - zero
    x = _safe_divide(shifted, scale)
    codes = (x[:, None] - lut).abs().argmin(1)
    value = lut.expand(column.shape[0], -1).gather(1, codes[:, None])[:, 0] * scale
    return codes, value if zero is None else value + zero


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: str,
    group_size: int | None = 128,
    sample_weight: torch.Tensor | None = None,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    act_order: bool = False,
    static_groups: bool = False,
    **options,
) -> QuantizedTensor:
    """Quantize weight w [N, K] into format `fmt` by GPTQ with Hessian h [K, K] (HessianAccumulator.hessian()).

    sample_weight and options go to any4lib.quantize (anyN's k-means weights and settings). Works in float64 when
    w is float64, else float32, on w's device.
    """
    spec = get_format(fmt)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight with K={k} input features")
    g = _resolve_group_size(spec, group_size, k)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    reference = quantize(w, fmt, group_size, sample_weight=sample_weight, **options)  # the RTN result, for its layout
    static = static_groups or act_order or spec.learned or spec.tensor_scale_bits > 0 or g == k
    lut, scale, zero = _params(reference, dtype)
    tensor_scale = reference.tensor_scale

    weight = w.to(dtype).clone()
    h = h.to(weight.device, torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1  # a feature that is always 0: its weight does not matter, quantize it as it is
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    order = order.to(weight.device)
    weight, h = weight[:, order], h[order][:, order]
    factor = inverse_hessian_factor(h, damp).to(dtype)

    codes = torch.zeros(n, k, dtype=torch.long, device=weight.device)
    column_group = (order // g).tolist()  # on the host: reading order[column] on a GPU would sync every column
    block = g * max(1, block_size // g) if g < k else k  # a group never straddles two blocks
    for start in range(0, k, block):
        end = min(start + block, k)
        chunk = weight[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        local = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = column_group[column]
            if not static and column % g == 0:  # dynamic groups: parameters of the group as updated so far
                lut, group_scale, group_zero = _params(spec(chunk[:, i : i + g].float().reshape(n, 1, g)), dtype)
                scale[:, group] = group_scale[:, 0]
                if zero is not None:
                    zero[:, group] = group_zero[:, 0]
            codes[:, column], value = _snap(
                chunk[:, i], lut, scale[:, group] * tensor_scale, None if zero is None else zero[:, group]
            )
            error = (chunk[:, i] - value) / local[i, i]
            chunk[:, i:] -= error[:, None] * local[i, i:][None]
            errors[:, i] = error
        weight[:, end:] -= errors @ factor[start:end, end:]

    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return QuantizedTensor(
        format=reference.format, bits=reference.bits, group_size=reference.group_size,
        codes=unpermuted.to(torch.uint8), lut=lut.float().contiguous(), scale=scale.float(),
        zero=None if zero is None else zero.float(), tensor_scale=tensor_scale,
    )
