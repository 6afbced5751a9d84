"""tinygemm: the low-batch 4-bit GEMM y = x @ W^T (int4, any4, nf4/fp4, MX-FP4), with its packed weight.

    w = PackedWeight.from_quantized(quantize(weight, "any4", 128), dtype=torch.bfloat16).to("cuda")
    y = linear(x, w)   # CUDA op for m <= 16 rows of x, dequantize kernel + matmul above; the PyTorch reference on CPU
    mlp = PackedWeight.from_gate_up(quantize(w_gate, "any4"), quantize(w_up, "any4"))
    h = linear(x, mlp)  # silu(x @ w_gate^T) * (x @ w_up^T), the activation in the GEMM's epilogue on CUDA

Importing this module builds nothing and never touches CUDA: the kernels build on first GPU use (build.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..qtensor import QuantizedTensor, cat_rows
from . import ops, packing
from .build import load_kernels
from .reference import linear_reference, swiglu_reference

MAX_KERNEL_ROWS = 16  # m above this: the dequantize kernel + cuBLAS
_DTYPES = (torch.bfloat16, torch.float16)

__all__ = ["PackedWeight", "check_supported", "is_supported", "linear", "load_kernels", "MAX_KERNEL_ROWS"]


def _is_int4_table(q: QuantizedTensor) -> bool:
    int_table = torch.arange(16, dtype=torch.float32, device=q.lut.device) - 8
    return q.zero is not None and q.lut.shape[0] == 1 and bool(torch.equal(q.lut[0].float(), int_table))


def unsupported_reason(q: QuantizedTensor) -> str | None:
    """Why tinygemm cannot run q, or None when it can."""
    n, k = q.shape
    if q.bits != 4 or q.lut.shape[-1] != 16:
        return f"format {q.format!r} has {q.bits}-bit codes; tinygemm runs 4-bit formats (int4, any4, nf4, fp4, mxfp4)"
    if q.group_size not in packing.GROUP_SIZES:
        return (f"group size {q.group_size} of format {q.format!r} is not supported; tinygemm takes "
                f"{', '.join(map(str, packing.GROUP_SIZES))} (quantize with one of those)")
    if k % 32:
        return f"K = {k} must be a multiple of 32"
    if q.lut.shape[0] not in (1, n):
        return f"lut must have 1 or N = {n} rows, got {q.lut.shape[0]}"
    return None


def is_supported(q: QuantizedTensor) -> bool:
    return unsupported_reason(q) is None


def check_supported(q: QuantizedTensor) -> None:
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"tinygemm cannot run this weight: {reason}")


@dataclass
class PackedWeight:
    """A 4-bit [n, k] weight in tinygemm's layout (docs/KERNELS.md). Tensors: codes, scales, lut (None for int4).

    int_codes: the int4 table (code - 8), computed in the kernel instead of looked up. dtype: the activation dtype
    the scales and LUT are stored in; x must match it. swiglu: the rows are SwiGLU's gate and up projections
    interleaved by 8 (from_gate_up), and `linear` returns silu(gate) * up, [..., n / 2].
    """

    codes: torch.Tensor
    scales: torch.Tensor
    lut: torch.Tensor | None
    n: int
    k: int
    group_size: int
    int_codes: bool
    format: str
    dtype: torch.dtype
    swiglu: bool = False

    TENSORS = ("codes", "scales", "lut")

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
        check_supported(q)
        if dtype not in _DTYPES:
            raise ValueError(f"tinygemm activations are bfloat16 or float16, got dtype={dtype}")
        q = q.to(q.codes.device)  # some quantizers leave a fixed grid's table on the CPU
        n, k = q.shape
        int_codes = _is_int4_table(q)
        scale = q.scale.float() * q.tensor_scale
        for name, values in (("scale", scale), ("zero", q.zero), ("lut", q.lut)):
            if values is not None and not torch.isfinite(values.float().to(dtype)).all():
                raise ValueError(f"{q.format} {name} values overflow {dtype}; pack for torch.bfloat16 instead")
        return cls(
            codes=packing.pack_codes(q.codes, int_codes),
            scales=packing.pack_scales(scale, q.zero, k, dtype),
            lut=None if int_codes else packing.pack_lut(q.lut, n, dtype),
            n=n,
            k=k,
            group_size=q.group_size,
            int_codes=int_codes,
            format=q.format,
            dtype=dtype,
        )

    @classmethod
    def from_gate_up(cls, gate: QuantizedTensor, up: QuantizedTensor, dtype: torch.dtype = torch.bfloat16
                     ) -> PackedWeight:
        """SwiGLU's gate and up projections ([h, k] each, one format and group size, h a multiple of 8) as one weight:
        `linear(x, w)` is silu(x @ gate^T) * (x @ up^T), [..., h], on CUDA in one kernel (the GEMM's epilogue).
        The rows are stored interleaved by 8 (packing.gate_up_rows); unpack() and dequantize() keep that order."""
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        if gate.shape[0] % 8:
            raise ValueError(f"gate and up need a multiple of 8 rows (the kernel pairs them 8 by 8), "
                             f"got {gate.shape[0]}")
        stacked = cat_rows([gate, up])
        order = packing.gate_up_rows(stacked.shape[0], stacked.device)
        return replace(cls.from_quantized(stacked.select_rows(order), dtype), swiglu=True)

    def unpack(self) -> QuantizedTensor:
        """The QuantizedTensor this holds: codes exact, LUT / scale / zero as the dtype values the kernel uses."""
        scale, zero = packing.unpack_scales(self.scales, self.n, self.k)
        if self.int_codes:
            lut = (torch.arange(16, dtype=torch.float32, device=self.codes.device) - 8)[None]
        else:
            lut = packing.unpack_lut(self.lut, 1 if self.lut.shape[0] == 1 else self.n, self.dtype)
        return QuantizedTensor(
            format=self.format,
            bits=4,
            group_size=self.group_size,
            codes=packing.unpack_codes(self.codes, self.n, self.k, self.int_codes),
            lut=lut,
            scale=scale,
            zero=zero,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [n, k] weight in dtype. On CUDA in the packing dtype: one kernel (the prefill path of `linear`),
        bit for bit what the PyTorch reference (`unpack().dequantize(dtype)`, used everywhere else) gives."""
        if self.codes.is_cuda and dtype == self.dtype:
            if not torch.compiler.is_compiling():
                load_kernels()
            return ops.tinygemm_dequantize(self.codes, self.scales, self.lut, self.n, self.k, self.group_size,
                                           self.int_codes)
        return self.unpack().dequantize(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to register as buffers (lut absent for int4)."""
        return {name: getattr(self, name) for name in self.TENSORS if getattr(self, name) is not None}

    def to(self, device: torch.device | str) -> PackedWeight:
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def shape(self) -> torch.Size:
        """[n, k] of the stored weight (gate and up rows together for a swiglu weight)."""
        return torch.Size((self.n, self.k))

    @property
    def out_features(self) -> int:
        """Columns of linear's output: n, or n / 2 for a swiglu weight."""
        return self.n // 2 if self.swiglu else self.n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def check_activation(x: torch.Tensor, w: PackedWeight, match_dtype: bool = True) -> None:
    """x fits w: k features, w's device and (match_dtype: the kernels' case) w's dtype."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects k = {w.k} (weight shape [{w.n}, {w.k}])")
    if match_dtype and x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but the weight was packed for {w.dtype}; cast x to {w.dtype} or pack "
                         f"for {x.dtype} (the kernels take bfloat16 or float16)")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}; move one with .to()")


def linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """y = x @ W^T for x [..., k] in w.dtype: [..., n]; a swiglu weight gives silu(gate) * up, [..., n / 2]. CUDA:
    the tinygemm op for up to 16 rows (the activation in its epilogue), else the dequantize op + cuBLAS (prefill).
    CPU: the PyTorch reference (fp32 accumulation, the products rounded to the dtype before the activation)."""
    check_activation(x, w)
    rows = x.reshape(-1, w.k)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], w.out_features)
    if x.is_cuda and rows.shape[0] <= MAX_KERNEL_ROWS:
        if not torch.compiler.is_compiling():
            load_kernels()
        out = ops.tinygemm_4bit(rows.contiguous(), w.codes, w.scales, w.lut, w.n, w.group_size, w.int_codes,
                                w.swiglu)
        return out.reshape(*x.shape[:-1], w.out_features)
    if x.is_cuda:
        out = torch.nn.functional.linear(rows, w.dequantize(x.dtype))
    else:
        out = linear_reference(rows, w.dequantize())
    return (swiglu_reference(out) if w.swiglu else out).reshape(*x.shape[:-1], w.out_features)
