"""QuantLinear: a linear layer holding one quantized weight, in one of two forms.

- "contract" (what quantize_model makes): the QuantizedTensor's codes (two a byte up to 4 bits) and float32 tables.
  It multiplies by the dequantized weight (computed once and cached), exactly the contract's formula.
- "packed" (`pack(dtype)`, `pack_model`, the engine, the first CUDA call on the kernel path): the tinygemm layout
  alone (kernels.PackedWeight: codes, scales, lut in the activation dtype), run by the tinygemm kernels on CUDA and
  by their PyTorch reference on the CPU. Packing converts the layer in place and frees the contract buffers.

Either form can quantize its input first (`activations`, an any4lib.activations format: weight-activation
quantization such as W4A8), after an optional online rotation of the input (`input_rotation`, any4lib.rotation).

The state dict saves whichever form the layer is in; the checkpoint's config records each layer's form
(any4lib.checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .activations import quantize_activations
from .qtensor import QuantizedTensor, pack_nibbles, unpack_nibbles

log = logging.getLogger("any4lib")

# Follow the device only under model.to(dtype): a cast would round them (NVFP4's fp32 tensor scale included).
_TABLES = ("lut", "scale", "zero", "tensor_scale", "packed_scales")
_PACKED = {"codes": "packed_codes", "scales": "packed_scales", "lut": "packed_lut"}  # PackedWeight field -> buffer


class QuantLinear(nn.Module):
    """y = x @ W^T + bias for a quantized W, in contract form (buffers codes, lut, scale, zero, tensor_scale) or
    packed form (buffers packed_codes, packed_scales, packed_lut). See the module docstring.

    Codes of at most 4 bits are stored two to a byte (`codes` is [out, ceil(in / 2)] uint8, see pack_nibbles), so
    memory and checkpoints cost what the format's bits say; wider codes take a byte each ([out, in]).
    """

    method = "rtn"  # how the codes were chosen (quantize_model sets "gptq", "awq", ...); saved in the checkpoint
    activations: str | None = None  # activation format of the input (None: unquantized); saved in the checkpoint
    input_rotation: str | None = None  # online rotation of the input before it is quantized; saved in the checkpoint

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.form = "contract"
        self.out_features, self.in_features = q.shape
        self.format, self.bits, self.group_size = q.format, q.bits, q.group_size
        self.register_buffer("codes", pack_nibbles(q.codes) if self.nibbles else q.codes)
        self.register_buffer("lut", q.lut)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.register_buffer("tensor_scale", torch.tensor(q.tensor_scale, dtype=torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernel = True  # on CUDA, when the kernels support the format
        self._packed = None
        self._cache: dict = {}

    @classmethod
    def from_packed(cls, packed, bias: torch.Tensor | None = None) -> QuantLinear:
        """A packed-form layer holding `packed` (a kernels.PackedWeight; a swiglu weight returns silu(gate) * up)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.use_kernel, layer._cache = True, {}
        layer._set_packed(packed)
        return layer

    def _set_packed(self, packed) -> None:
        self.form = "packed"
        self.format, self.bits, self.group_size = packed.format, 4, packed.group_size
        self.out_features, self.in_features = packed.out_features, packed.k
        for field, buffer in _PACKED.items():
            self.register_buffer(buffer, getattr(packed, field))
        self._packed = packed

    def pack(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Convert this layer in place to the packed form for activations of `dtype` (the contract buffers freed).
        False, and the layer unchanged, when the kernels do not run its format or shape (`unpacked_reason`)."""
        if self.form == "packed":
            if self._packed.dtype != dtype:
                raise ValueError(f"layer is packed for {self._packed.dtype}, not {dtype}: reload it to repack")
            return True
        if self.unpacked_reason() is not None:
            return False
        from .kernels import PackedWeight

        packed = PackedWeight.from_quantized(self.quantized, dtype)
        for name in ("codes", "lut", "scale", "zero", "tensor_scale"):
            delattr(self, name)
        self._cache = {}
        self._set_packed(packed)
        return True

    def unpacked_reason(self) -> str | None:
        """Why the kernels cannot run this layer (None: they can, or it is packed already)."""
        if self.form == "packed":
            return None
        try:
            from . import kernels
        except ImportError as err:
            return f"any4lib.kernels is not available ({err})"
        return kernels.unsupported_reason(self.quantized)

    @property
    def packed(self):
        """The kernels.PackedWeight of a packed layer (None in contract form)."""
        return self._packed

    @property
    def swiglu(self) -> bool:
        """A packed gate/up weight whose output is silu(gate) * up (kernels.PackedWeight.from_gate_up)."""
        return self._packed is not None and self._packed.swiglu

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (tables in float32, as the contract has them; a packed layer's as the
        dtype values the kernels use, rows in packed order)."""
        if self.form == "packed":
            return self._packed.unpack()
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
            source = self._packed if self.form == "packed" else self.quantized
            self._cache[key] = source.dequantize(dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            from .rotation import rotate_online

            x = rotate_online(x, self.input_rotation)
        if x.is_cuda and self.use_kernel and self.form == "contract" and self.activations is not None:
            prepared = self._low_precision_weight()
            if prepared is not None:  # int8 / FP8 GEMM: it quantizes x itself
                from .wa_matmul import linear as low_precision_linear

                return low_precision_linear(x, prepared, None if self.bias is None else self.bias.to(x.dtype))
        x = quantize_activations(x, self.activations)
        if x.is_cuda and self.use_kernel and self.form == "contract":
            if "reason" not in self._cache:
                self._cache["reason"] = self.unpacked_reason()
                if self._cache["reason"] is not None:
                    _note_unpacked(f"{self.format} g{self.group_size} [{self.out_features}, {self.in_features}]",
                                   self._cache["reason"])
            if self._cache["reason"] is None:
                self.pack(x.dtype)  # the kernel path: one packed weight from here on
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.form == "packed" and x.is_cuda and self.use_kernel:
            from .kernels import linear

            y = linear(x, self._packed)
            return y if bias is None else y + bias
        if self.form == "packed" and not x.is_cuda:
            # The kernels' CPU reference (fp32 products rounded to x's dtype), its float32 weight cached here; any
            # float x, since CPU evaluation computes in float32 whatever the packing dtype.
            from .kernels import check_activation
            from .kernels.reference import linear_reference, swiglu_reference

            check_activation(x, self._packed, match_dtype=False)
            y = linear_reference(x.reshape(-1, self.in_features), self.dequantized_weight(torch.float32))
            y = (swiglu_reference(y) if self.swiglu else y).reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        if self.swiglu:
            from .kernels.reference import swiglu_reference

            return swiglu_reference(F.linear(x, self.dequantized_weight(x.dtype)))
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _low_precision_weight(self):
        """The weight prepared for any4lib.wa_matmul's int8 / FP8 GEMM under this layer's activations (cached), or
        None when the layer has no such path (said once in the "any4lib" log)."""
        key = ("low_precision", self.activations)
        if key not in self._cache:
            from .wa_matmul import execution_reason, prepare

            reason = execution_reason(self.quantized, self.activations)
            if reason is not None:
                _note_unpacked(f"{self.format} x {self.activations} [{self.out_features}, {self.in_features}]", reason)
            self._cache[key] = None if reason else prepare(self.quantized, self.activations)
        return self._cache[key]

    def _apply(self, fn, recurse=True):
        self._cache = {}
        tables = {name: getattr(self, name) for name in _TABLES if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, before in tables.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        self.buffers_changed()
        return self

    def buffers_changed(self) -> None:
        """Forget what was computed from the buffers, and point a packed weight at the current ones: after they
        moved, or were assigned from outside (transformers' loader sets each by name)."""
        self._cache = {}
        if self.form == "packed":
            self._packed = replace(self._packed, **{f: getattr(self, b) for f, b in _PACKED.items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cache = {}
        codes = state_dict.get(prefix + "codes")
        if (self.form == "contract" and self.nibbles and codes is not None
                and codes.shape[-1] == self.in_features != self.codes.shape[-1]):
            state_dict[prefix + "codes"] = pack_nibbles(codes)  # one code per byte, as checkpoints of version 1 hold
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, group_size={self.group_size}, form={self.form}"
            + (f", activations={self.activations}" if self.activations else "")
            + (f", input_rotation={self.input_rotation}" if self.input_rotation else "")
            + (", swiglu" if self.swiglu else "")
        )


def pack_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """pack(dtype) every QuantLinear of `model` in place; a layer the kernels cannot run stays in contract form and
    gets its dequantized weight in `dtype` now (so a compiled step only reads it), said once per layer in the
    "any4lib" log. Returns the model."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not module.pack(dtype):
            reason = module.unpacked_reason()
            _note_unpacked(name, reason)
            module._cache["reason"] = reason
            module.dequantized_weight(dtype)
    return model


_noted: set[str] = set()


def _note_unpacked(name: str, reason: str) -> None:
    if name not in _noted:
        _noted.add(name)
        log.warning("%s runs its dequantized weight: %s", name, reason)


def use_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every QuantLinear of `model` between the CUDA kernels (True) and the dequantized weight (False)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_kernel = enabled
    return model
