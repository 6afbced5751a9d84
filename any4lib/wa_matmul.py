"""Weight-activation GEMMs on CUDA: the products QuantLinear's fake quantization stands for, run in low precision.

  - int8 ("int8_sym" activations, per token) x a symmetric integer weight of at most 8 bits, one scale per row
    (intB_sym, group = K): torch._int_mm multiplies the int8 codes into int32, then y = acc * s_x[t] * s_w[n];
  - FP8 ("fp8_e4m3" activations, per token) x a weight whose table values are exact in E4M3 (int4_sym and
    narrower, fp4 E2M1, ...) with one scale per row: torch._scaled_mm multiplies the E4M3 values with row-wise
    scales s_x[t] and s_w[n] * tensor_scale, accumulating in fp32.

Both give what F.linear of the fake-quantized input and the dequantized weight gives, up to the order of the fp32
accumulation and the output's rounding. `execution_reason` says why a layer cannot take a path (None: it can);
the CUDA-only code runs only when called, so importing this module touches no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activations import round_fp8_per_token, round_int_sym_per_token
from .qtensor import QuantizedTensor

PATHS = {"int8_sym": "int8", "fp8_e4m3": "fp8"}  # activation format -> execution path
INT_MM_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows of A
SCALED_MM_ALIGN = 16  # torch._scaled_mm needs every dimension a multiple of 16


@dataclass
class PreparedWeight:
    """A weight in the form one path multiplies: [N, K] int8 codes or E4M3 values, and its per-row fp32 scale."""

    path: str
    values: torch.Tensor
    scale: torch.Tensor  # [N] float32


def execution_reason(q: QuantizedTensor, activations: str | None) -> str | None:
    """Why a weight `q` under activation format `activations` has no low-precision path (None: it has one)."""
    path = PATHS.get(activations or "")
    if path is None:
        return f"activations {activations} have no low-precision GEMM here (int8_sym and fp8_e4m3 do)"
    n, k = q.shape
    if q.zero is not None or q.group_size != k:
        return f"the weight ({q.format} g{q.group_size}) needs one scale per row and no zero point"
    lut = q.lut.float().cpu()
    if lut.shape[0] != 1:
        return f"the weight ({q.format}) has a table per row, not one grid"
    if path == "int8":
        if not (torch.equal(lut, lut.round()) and lut.min() >= -128 and lut.max() <= 127):
            return f"the weight's table ({q.format}) is not integers within int8"
        if n % 8 or k % 8:
            return f"torch._int_mm needs N and K multiples of 8, got [{n}, {k}]"
    else:
        if not torch.equal(lut.to(torch.float8_e4m3fn).float(), lut):
            return f"the weight's table ({q.format}) is not exact in FP8 E4M3"
        if n % SCALED_MM_ALIGN or k % SCALED_MM_ALIGN:
            return f"torch._scaled_mm needs N and K multiples of {SCALED_MM_ALIGN}, got [{n}, {k}]"
    return None


def prepare(q: QuantizedTensor, activations: str) -> PreparedWeight:
    """The weight's codes as the path's operand (on q's device); execution_reason(q, activations) must be None."""
    reason = execution_reason(q, activations)
    if reason is not None:
        raise ValueError(reason)
    path = PATHS[activations]
    values = q.lut[0].to(q.codes.device)[q.codes.long()]
    scale = (q.scale[:, 0] * q.tensor_scale).float().contiguous()
    values = values.to(torch.int8 if path == "int8" else torch.float8_e4m3fn).contiguous()
    return PreparedWeight(path, values, scale)


def _pad_rows(a: torch.Tensor, rows: int) -> torch.Tensor:
    """a [m, K] with zero rows appended up to `rows` (the GEMMs' shape constraints)."""
    return F.pad(a, (0, 0, 0, rows - a.shape[0])) if rows > a.shape[0] else a


def linear(x: torch.Tensor, weight: PreparedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = quantize(x) @ W^T (+ bias) in x's dtype through the weight's path (CUDA)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    m = flat.shape[0]
    if weight.path == "int8":
        codes, x_scale = round_int_sym_per_token(flat, 8)
        a = _pad_rows(codes.to(torch.int8), max(m, INT_MM_MIN_ROWS))
        acc = torch._int_mm(a, weight.values.t())[:m]
        y = acc.float() * x_scale * weight.scale[None]
        y = y.to(x.dtype)
    else:
        values, x_scale = round_fp8_per_token(flat)
        a = _pad_rows(values.to(torch.float8_e4m3fn), -(-m // SCALED_MM_ALIGN) * SCALED_MM_ALIGN)
        scale_a = F.pad(x_scale, (0, 0, 0, a.shape[0] - m), value=1.0)
        y = torch._scaled_mm(a, weight.values.t(), scale_a=scale_a, scale_b=weight.scale[None],
                             out_dtype=torch.bfloat16)[:m].to(x.dtype)
    y = y.reshape(*shape[:-1], weight.values.shape[0])
    return y if bias is None else y + bias
