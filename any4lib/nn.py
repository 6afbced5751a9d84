"""QuantLinear: a linear layer that stores its weight as a QuantizedTensor's codes and tables.

On CUDA it runs the tinygemm kernels (any4lib.kernels) when they support the format; everywhere else, and for
formats the kernels lack, it multiplies by the dequantized weight (computed once and cached).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .qtensor import QuantizedTensor, pack_nibbles, unpack_nibbles


_TABLES = ("lut", "scale", "zero", "tensor_scale")


class QuantLinear(nn.Module):
    """y = x @ dequantize(codes)^T + bias, with the codes, LUT, scales and zeros held as buffers.

    Codes of at most 4 bits are stored two to a byte (`codes` is [out, ceil(in / 2)] uint8, see pack_nibbles), so
    memory and checkpoints cost what the format's bits say; wider codes take a byte each ([out, in]).
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.format, self.bits, self.group_size = q.format, q.bits, q.group_size
        self.register_buffer("codes", pack_nibbles(q.codes) if self.nibbles else q.codes)
        self.register_buffer("lut", q.lut)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.register_buffer("tensor_scale", torch.tensor(q.tensor_scale, dtype=torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernel = True  # on CUDA, when the kernels support the format
        self._cache: dict = {}

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (tables in float32, as the contract has them)."""
        return QuantizedTensor(
            format=self.format,
            bits=self.bits,
            group_size=self.group_size,
            codes=unpack_nibbles(self.codes, self.in_features) if self.nibbles else self.codes,
            lut=self.lut.float(),
            scale=self.scale.float(),
            zero=None if self.zero is None else self.zero.float(),
            tensor_scale=float(self.tensor_scale),
        )

    @property
    def nibbles(self) -> bool:
        return self.bits <= 4

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight in `dtype` (cached until the buffers move or are reloaded)."""
        key = ("weight", dtype)
        if key not in self._cache:
            self._cache[key] = self.quantized.dequantize(dtype)
        return self._cache[key]

    def packed_weight(self, dtype: torch.dtype):
        """The kernels' packed weight for activations of `dtype`, or None when the kernels cannot run it."""
        key = ("packed", dtype)
        if key not in self._cache:
            self._cache[key] = _pack_for_kernels(self.quantized, dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.use_kernel:
            packed = self.packed_weight(x.dtype)
            if packed is not None:
                from .kernels import linear

                y = linear(x, packed)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) would round the tables (and NVFP4's fp32 tensor scale): they follow the device only.
        self._cache = {}
        tables = {name: getattr(self, name) for name in _TABLES if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in tables.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cache = {}
        codes = state_dict.get(prefix + "codes")
        if self.nibbles and codes is not None and codes.shape[-1] == self.in_features != self.codes.shape[-1]:
            state_dict[prefix + "codes"] = pack_nibbles(codes)  # one code per byte, as checkpoints of version 1 hold
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, group_size={self.group_size}"
        )


_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"QuantLinear: {reason}; using the dequantized weight (fake-quant) on this device", stacklevel=3)


def _pack_for_kernels(q: QuantizedTensor, dtype: torch.dtype):
    try:
        from . import kernels
    except ImportError as err:
        _fallback(f"any4lib.kernels is not available ({err})")
        return None
    if not kernels.is_supported(q):
        _fallback(f"the kernels do not support {q.format} g{q.group_size} {tuple(q.shape)}")
        return None
    return kernels.PackedWeight.from_quantized(q, dtype)


def use_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every QuantLinear of `model` between the CUDA kernels (True) and the dequantized weight (False)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_kernel = enabled
    return model
