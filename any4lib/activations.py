"""Activation formats: how a quantized linear's input is rounded on the fly (dynamic, from the input itself).

The activation format is an axis beside the weight format: any weight format composes with any activation format.
Each one is fake quantization, x -> dequantize(quantize(x)) in x's dtype, computed in float32; the GPU execution
paths (any4lib.nn: torch._int_mm for int8, torch._scaled_mm for FP8) multiply the same values.

  - per token (one scale per row of x, i.e. per token, over all K features): intB (asymmetric, min/max) and
    intB_sym (absmax), exactly the weight registry's int formats applied to a token as one group; fp8_e4m3
    (scale = amax / 448, elements rounded to E4M3 half to even);
  - block-scaled along K: mxfp8 / mxfp4 (OCP MX, 32 elements share an E8M0 power of two), nvfp4 (16 elements share
    an FP8-E4M3 scale, under one fp32 scale from the whole input's amax, as NVIDIA's dynamic NVFP4).

"none" (A16) keeps the input as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import grids
from .formats import get_format, mx_shared_exponent

NONE = "none"
MX_BLOCK = 32


@dataclass(frozen=True)
class ActivationFormat:
    name: str
    bits: int
    definition: str
    rounder: Callable[[torch.Tensor], torch.Tensor]  # float32 [T, K] -> its fake-quantized values, [T, K]
    block_size: int | None = None  # elements of K sharing one scale; None: the whole token


def _weight_format_per_token(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A weight format of the registry applied to each token as one group of K elements."""
    fmt = get_format(name)
    return lambda x: fmt(x[:, None, :]).dequantize()


def _weight_format_per_block(name: str, block: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A block format of the registry (mxfp4, nvfp4) applied to blocks of `block` consecutive features."""
    fmt = get_format(name)
    return lambda x: fmt(x.reshape(x.shape[0], -1, block)).dequantize()


def round_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values of x / scale as float32, scale [T, 1]) with scale = amax / 448 per token (1 for a zero token):
    what torch._scaled_mm's row-wise scaling multiplies."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / grids.FP8_E4M3_MAX, torch.ones_like(amax))
    return grids.round_to_fp8_e4m3(x / scale), scale


def round_int_sym_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes of x as float32 in [-(2^(b-1) - 1), 2^(b-1) - 1], scale [T, 1]): scale = absmax / (2^(b-1) -
    1), code = round(x / scale) half to even (what torch._int_mm multiplies for b = 8). A zero token: scale 0."""
    q = get_format(f"int{bits}_sym")(x[:, None, :])
    return q.lut[0][q.codes.long()], q.scale


def _fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    values, scale = round_fp8_per_token(x)
    return values * scale


def _mxfp8(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(x.shape[0], -1, MX_BLOCK)
    exponent = mx_shared_exponent(blocks.abs().amax(-1, keepdim=True), "floor", grids.FP8_E4M3_MAX, grids.FP8_E4M3_EMAX)
    scale = torch.exp2(exponent.float())
    return (grids.round_to_fp8_e4m3(blocks / scale) * scale).reshape(x.shape)


_REGISTRY: dict[str, ActivationFormat] = {}


def _register(fmt: ActivationFormat) -> None:
    _REGISTRY[fmt.name] = fmt


for _b in (3, 4, 6, 8):
    _register(ActivationFormat(
        f"int{_b}", _b,
        f"per token, {_b}-bit asymmetric: scale = (max - min) / {2**_b - 1} over the token's K features, "
        f"code = round((x - min) / scale) (the weight format int{_b} with the token as one group).",
        _weight_format_per_token(f"int{_b}"),
    ))
    _register(ActivationFormat(
        f"int{_b}_sym", _b,
        f"per token, {_b}-bit symmetric: scale = absmax / {2**(_b-1) - 1}, code = round(x / scale) (the weight "
        f"format int{_b}_sym with the token as one group).",
        _weight_format_per_token(f"int{_b}_sym"),
    ))
_register(ActivationFormat(
    "fp8_e4m3", 8,
    "per token FP8 E4M3 (OCP): scale = amax / 448, elements x / scale rounded half to even onto E4M3.",
    _fp8_per_token,
))
_register(ActivationFormat(
    "mxfp8", 8,
    "MX-FP8 E4M3 (OCP Microscaling v1.0): blocks of 32 features share an E8M0 scale 2^(floor(log2 amax) - 8); "
    "elements round half to even onto E4M3 and saturate at +-448.",
    _mxfp8, block_size=MX_BLOCK,
))
_register(ActivationFormat(
    "mxfp4", 4, "MX-FP4 (OCP): the weight format mxfp4 on blocks of 32 features (E2M1 elements, E8M0 scale).",
    _weight_format_per_block("mxfp4", MX_BLOCK), block_size=MX_BLOCK,
))
_register(ActivationFormat(
    "nvfp4", 4,
    "NVFP4: the weight format nvfp4 on blocks of 16 features (E2M1 elements, FP8-E4M3 block scales), its fp32 "
    "second-level scale from the amax of the whole input of the call.",
    _weight_format_per_block("nvfp4", 16), block_size=16,
))
_ALIASES = {"fp8": "fp8_e4m3", "a16": NONE, "bf16": NONE}


def list_activation_formats() -> list[str]:
    return [NONE, *sorted(_REGISTRY)]


def resolve_activations(name: str | None) -> str | None:
    """The canonical activation format name of `name` (None for "none" / None: inputs unquantized)."""
    if name is None:
        return None
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key == NONE:
        return None
    if key not in _REGISTRY:
        raise ValueError(f"unknown activation format {name!r}; choose one of {', '.join(list_activation_formats())}")
    return key


def get_activation_format(name: str) -> ActivationFormat:
    key = resolve_activations(name)
    if key is None:
        raise ValueError(f"{name!r} keeps activations unquantized: it has no ActivationFormat")
    return _REGISTRY[key]


def check_activation_width(name: str | None, in_features: int) -> None:
    """Raise ValueError when a block-scaled activation format's block does not divide a layer's input width."""
    key = resolve_activations(name)
    block = None if key is None else _REGISTRY[key].block_size
    if block and in_features % block:
        raise ValueError(f"activation format {key} needs the input width to be a multiple of its block of {block}; "
                         f"this layer's is {in_features}: choose a per-token format (int8, fp8_e4m3, ...)")


def quantize_activations(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """x [..., K] fake-quantized in activation format `name` (None / "none": x itself), in x's dtype."""
    key = resolve_activations(name)
    if key is None:
        return x
    fmt = _REGISTRY[key]
    check_activation_width(key, x.shape[-1])
    flat = x.reshape(-1, x.shape[-1]).float()
    return fmt.rounder(flat).reshape(x.shape).to(x.dtype)
