"""The format registry: every numeric format the suite compares, looked up by name.

Each quantizer takes a float32 weight viewed as groups, [N, G, g] (G groups of g along K), and returns a
QuantizedTensor. Formats fall in four families, all sharing QuantizedTensor's one dequantization formula:
  - asymmetric integer and anyN: per-group min/max scaling to the continuous range [0, 2^b - 1];
  - symmetric integer: per-group absmax scaling, codes centred on zero;
  - fixed float grids (fp4, nf4, FP6/FP5): per-group absmax scaling onto the grid's largest magnitude;
  - block formats with a prescribed scale encoding (MX-FP4, NVFP4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import grids
from .kmeans import assign_nearest, kmeans_1d
from .qtensor import QuantizedTensor

Quantizer = Callable[..., QuantizedTensor]


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    quantizer: Quantizer
    definition: str
    fixed_group_size: int | None = None  # block formats prescribe theirs
    learned: bool = False  # anyN: uses sample weights and k-means options
    scale_bits: int = 16  # storage of one group scale / zero (the block formats' scales are 8-bit)
    tensor_scale_bits: int = 0  # NVFP4 keeps one fp32 scale per tensor

    def __call__(self, groups: torch.Tensor, **options) -> QuantizedTensor:
        return self.quantizer(groups, self, **options)


_REGISTRY: dict[str, Format] = {}
_ALIASES = {"fp4": "fp4_e2m1", "mx4": "mxfp4", "int4_asym": "int4"}


def register(fmt: Format) -> Format:
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(list_formats())}")
    return _REGISTRY[key]


def list_formats() -> list[str]:
    return sorted(_REGISTRY)


def _finish(groups, fmt, codes, lut, scale, zero=None, tensor_scale=1.0, group_size=None) -> QuantizedTensor:
    n, g_count, g = groups.shape
    return QuantizedTensor(
        format=fmt.name,
        bits=fmt.bits,
        group_size=group_size or g,
        codes=codes.reshape(n, g_count * g).to(torch.uint8),
        lut=lut.to(groups.device, torch.float32).contiguous(),  # module-level grids live on the CPU
        scale=scale.reshape(n, g_count).float().contiguous(),
        zero=None if zero is None else zero.reshape(n, g_count).float().contiguous(),
        tensor_scale=float(tensor_scale),
    )


def _nearest_code(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Code (position in `lut`, [R or 1, L]) of the nearest entry for each element of x [R, M]; a tie goes to the
    even code, which for a minifloat grid indexed by bit pattern is IEEE round-half-to-even. A sign-magnitude grid
    (minifloat: the upper half the negated lower half) is rounded as hardware does: the magnitude on the positive
    half, then the sign bit, so -w always gets the code of w with its sign flipped (and -0.0 the code of -0)."""
    lut = lut.to(x.device)
    half = lut.shape[1] // 2
    if lut.shape[0] == 1 and torch.equal(lut[0, half:], -lut[0, :half]) and bool((lut[0, :half].diff() > 0).all()):
        magnitude = _nearest_even(x.abs(), lut[:, :half], torch.arange(half, device=x.device)[None])
        return magnitude | (torch.signbit(x).to(magnitude.dtype) * half)
    order = torch.argsort(lut, dim=1, stable=True)
    return _nearest_even(x, torch.gather(lut, 1, order), order)


def _nearest_even(x: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codes[nearest of ascending `levels`] for each element of x; on an exact midpoint, the even code."""
    mids = ((levels[:, 1:] + levels[:, :-1]) / 2).expand(x.shape[0], -1).contiguous()
    x = x.contiguous()
    codes = codes.expand(x.shape[0], -1)
    up = torch.gather(codes, 1, torch.searchsorted(mids, x, right=True))
    down = torch.gather(codes, 1, torch.searchsorted(mids, x, right=False))
    return torch.where(up % 2 == 0, up, down)


def _safe_divide(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, with 0 where the scale is 0 (a constant group: its codes do not matter)."""
    return torch.where(scale > 0, x / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(x))


# ---- asymmetric integer and anyN -------------------------------------------------------------------------------


def _min_max_normalise(groups: torch.Tensor, bits: int):
    """Per-group min/max scaling to the continuous range [0, 2^b - 1] (not rounded)."""
    lo = groups.amin(-1, keepdim=True)
    hi = groups.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    zero = lo + 2 ** (bits - 1) * scale
    # A constant group (scale 0) has groups - lo = 0 exactly, so dividing it by 1 gives its codes 0. In place: the
    # per-element passes dominate the cost of quantizing.
    x = (groups - lo).div_(torch.where(scale > 0, scale, torch.ones_like(scale)))
    return x.clamp_(0, 2**bits - 1), scale, zero


def _quantize_int_asymmetric(groups, fmt):
    x, scale, zero = _min_max_normalise(groups, fmt.bits)
    codes = torch.round(x)
    lut = (torch.arange(2**fmt.bits, dtype=torch.float32) - 2 ** (fmt.bits - 1))[None]
    return _finish(groups, fmt, codes, lut, scale, zero)


def _quantize_int_symmetric(groups, fmt):
    half = 2 ** (fmt.bits - 1)
    scale = groups.abs().amax(-1, keepdim=True) / (half - 1)
    codes = torch.round(_safe_divide(groups, scale)).clamp(-half, half - 1) + half
    lut = (torch.arange(2**fmt.bits, dtype=torch.float32) - half)[None]
    return _finish(groups, fmt, codes, lut, scale)


def _quantize_any(
    groups,
    fmt,
    *,
    sample_weight: torch.Tensor | None = None,
    scale_weighted: bool = True,
    per_row: bool = True,
    init: str = "k-means++",
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 0.0,
    row_chunk: int | None = None,
):
    n, g_count, g = groups.shape
    x, scale, zero = _min_max_normalise(groups, fmt.bits)
    weight = torch.ones_like(groups) if sample_weight is None else sample_weight.reshape(n, g_count, g)
    if scale_weighted:
        weight = weight * scale  # error in the original units, as the method weighs it
    x, weight = x.reshape(n, -1), weight.reshape(n, -1)
    k = 2**fmt.bits
    start = _initial_centers(init, x, k, seed)
    settings = {"init": start, "max_iter": max_iter, "tol": tol, "with_inertia": False, "row_chunk": row_chunk}

    if per_row:
        result = kmeans_1d(x, k, weight, seed=seed, **settings)
        centers, codes = result.centers, result.labels
    else:
        centers = kmeans_1d(x.reshape(1, -1), k, weight.reshape(1, -1), seed=seed, **settings).centers
        codes = assign_nearest(x, centers)
    return _finish(groups, fmt, codes, centers - 2 ** (fmt.bits - 1), scale, zero)


KMEANS_INITS = ("k-means++", "random", "int", "nf4")


def _initial_centers(init: str | torch.Tensor, x: torch.Tensor, k: int, seed: int) -> str | torch.Tensor:
    """k-means starting centers on the normalised rows x [N, M] (values in [0, k - 1]): "k-means++" (kmeans_1d
    seeds it), "random" (k distinct points of each row, seeded), "int" (the integer grid 0..k-1), "nf4" (NF4's
    levels stretched onto [0, 15]; 4 bits only), or a tensor of centers."""
    if isinstance(init, torch.Tensor) or init == "k-means++":
        return init
    if init == "int":
        return torch.arange(k, dtype=torch.float32, device=x.device)[None]
    if init == "nf4" and k == 16:
        return ((grids.NF4_LEVELS + 1) / 2 * (k - 1)).to(x.device)[None]
    if init == "random" and x.shape[1] >= k:
        generator = torch.Generator().manual_seed(seed)
        picks = torch.rand(x.shape, generator=generator).argsort(1)[:, :k].to(x.device)
        return torch.gather(x, 1, picks)
    raise ValueError(f"k-means init {init!r} does not apply here: use one of {KMEANS_INITS} ('nf4' for 4 bits only, "
                     f"'random' needs at least {k} weights a row)")


# ---- fixed grids with absmax scaling ---------------------------------------------------------------------------


def _grid_quantizer(grid: torch.Tensor) -> Quantizer:
    def quantize(groups, fmt):
        n, g_count, g = groups.shape
        scale = groups.abs().amax(-1, keepdim=True) / grid.abs().max()
        x = _safe_divide(groups, scale).reshape(n, -1)
        return _finish(groups, fmt, _nearest_code(x, grid[None]), grid[None], scale)

    return quantize


# ---- block formats ----------------------------------------------------------------------------------------------


def _float32_exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of positive float32 x, read from its exponent bits (exact; -127 for zero and subnormals)."""
    return ((x.float().view(torch.int32) >> 23) & 0xFF) - 127


def mx_shared_exponent(
    amax: torch.Tensor, rule: str = "floor", element_max: float = 6.0, element_emax: int = grids.E2M1_EMAX
) -> torch.Tensor:
    """The shared E8M0 exponent of each MX block of largest magnitude `amax`, for an element type whose largest
    value is `element_max` = m * 2^element_emax (E2M1: 6 = 1.5 * 2^2; FP8 E4M3: 448 = 1.75 * 2^8). "floor" (OCP MX):
    floor(log2 amax) - element_emax, the largest power of two not above amax over the element's largest power of
    two, so elements can exceed element_max and saturate. "rceil" (NVIDIA's cuBLAS rule): ceil(log2(amax /
    element_max)), the smallest scale that maps amax within element_max (no saturation)."""
    if rule == "floor":
        exponent = _float32_exponent(amax) - element_emax
    elif rule == "rceil":
        descale = amax / element_max
        mantissa, exponent = torch.frexp(descale)  # descale = mantissa * 2^exponent, mantissa in [0.5, 1)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two need no rounding up
    else:
        raise ValueError(f"MX scale rule must be 'floor' or 'rceil', got {rule!r}")
    return exponent.clamp(-grids.E8M0_BIAS, grids.E8M0_BIAS)


def _mxfp4_quantizer(rule: str) -> Quantizer:
    def quantize(groups, fmt):
        """OCP MX: blocks of 32 elements share a power-of-two scale; elements round half to even onto E2M1 and
        saturate at +-6 (the rule of torchao's to_mx)."""
        n, g_count, g = groups.shape
        amax = groups.abs().amax(-1, keepdim=True)
        scale = torch.exp2(mx_shared_exponent(amax, rule, float(grids.E2M1.max())).float())
        divisor = scale.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero block: 2^-127 stored, codes 0
        x = (groups / divisor).reshape(n, -1)
        return _finish(groups, fmt, _nearest_code(x, grids.E2M1[None]), grids.E2M1[None], scale)

    return quantize


def _quantize_nvfp4(groups, fmt):
    """NVFP4: fp32 tensor scale s = amax / (6 * 448); per block of 16 an FP8-E4M3 scale (amax_block / 6) / s,
    at least E4M3's smallest normal; elements x * ((1 / s) / block) round half to even onto E2M1 (torchao's
    arithmetic, operation for operation, so the codes agree bit for bit)."""
    n, g_count, g = groups.shape
    e2m1_max = grids.E2M1.max()
    tensor_scale = groups.abs().amax() / (grids.FP8_E4M3_MAX * e2m1_max)
    if tensor_scale == 0:  # an all-zero weight: any scale dequantizes it to zero
        tensor_scale = torch.ones_like(tensor_scale)
    block = (groups.abs().amax(-1, keepdim=True) / e2m1_max) / tensor_scale
    block = grids.round_to_fp8_e4m3(block.clamp_min(torch.finfo(torch.float8_e4m3fn).tiny))
    x = (groups * ((1.0 / tensor_scale) / block)).reshape(n, -1)
    codes = _nearest_code(x, grids.E2M1[None])
    return _finish(groups, fmt, codes, grids.E2M1[None], block, tensor_scale=tensor_scale.item())


# ---- the registry -----------------------------------------------------------------------------------------------

for _b in range(2, 9):
    register(Format(
        f"int{_b}", _b, _quantize_int_asymmetric,
        f"{_b}-bit asymmetric integer, per group: scale = (max - min) / {2**_b - 1}, code = round((w - min) / scale), "
        f"w' = (code - {2**(_b-1)}) * scale + zero with zero = min + {2**(_b-1)} * scale.",
    ))
    register(Format(
        f"int{_b}_sym", _b, _quantize_int_symmetric,
        f"{_b}-bit symmetric integer, per group: scale = absmax / {2**(_b-1) - 1}, code = clamp(round(w / scale), "
        f"-{2**(_b-1)}, {2**(_b-1) - 1}), w' = code * scale.",
    ))

for _b in (2, 3, 4, 8):
    register(Format(
        f"any{_b}", _b, _quantize_any,
        f"any{_b}: asymmetric {_b}-bit grouping as int{_b}, but each row's {2**_b} dequantization values are learned "
        f"by weighted 1-D k-means (k-means++ init) on the group-normalised row in [0, {2**_b - 1}], weights = "
        f"|mean activation| x group scale; LUT = centroids - {2**(_b-1)}.",
        learned=True,
    ))
register(Format(
    "any4_global", 4, lambda groups, fmt, **opts: _quantize_any(groups, fmt, per_row=False, **opts),
    "any4 with one 16-entry LUT for the whole tensor (k-means over all rows' normalised values).",
    learned=True,
))

register(Format(
    "fp4_e2m1", 4, _grid_quantizer(grids.E2M1),
    "FP4 E2M1 (OCP MX element type): sign, 2 exponent bits (bias 1), 1 mantissa bit, no inf/NaN; magnitudes "
    "0, 0.5, 1, 1.5, 2, 3, 4, 6. Per group: scale = absmax / 6, code = nearest grid value to w / scale.",
))
register(Format(
    "fp4_e3m0", 4, _grid_quantizer(grids.minifloat_grid(3, 0)),
    "FP4 E3M0: sign and 3 exponent bits (bias 3), no mantissa; magnitudes 0 and 2^-2 .. 2^4. Per-group absmax "
    "scaling onto 16.",
))
register(Format(
    "fp4_bnb", 4, _grid_quantizer(grids.BNB_FP4),
    "bitsandbytes' FP4 (quant_type='fp4'): its own sign / 2-exponent / 1-mantissa table, magnitudes 0, 1/192, 1/6, "
    "1/4, 1/3, 1/2, 2/3, 1 in bitsandbytes' code order. Per-group absmax scaling onto 1.",
))
register(Format(
    "nf4", 4, _grid_quantizer(grids.NF4_LEVELS),
    "NormalFloat4 (QLoRA): the 16 published levels in [-1, 1] (normal quantiles, exact zero). Per-group absmax "
    "scaling onto 1.",
))
for _name, _e, _m in (("fp6_e3m2", 3, 2), ("fp6_e2m3", 2, 3), ("fp5_e2m2", 2, 2), ("fp5_e3m1", 3, 1)):
    _grid = grids.minifloat_grid(_e, _m)
    register(Format(
        _name, 1 + _e + _m, _grid_quantizer(_grid),
        f"FP{1 + _e + _m} E{_e}M{_m}: sign, {_e} exponent bits (bias {2**(_e-1) - 1}), {_m} mantissa bits, "
        f"subnormals, no inf/NaN; largest magnitude {_grid.max().item():g}. Per-group absmax scaling onto it.",
    ))

register(Format(
    "mxfp4", 4, _mxfp4_quantizer("floor"),
    "MX-FP4 (OCP Microscaling v1.0): blocks of 32 E2M1 elements sharing an E8M0 scale 2^(floor(log2 amax) - 2); "
    "elements round half to even onto E2M1 and saturate at +-6.",
    fixed_group_size=32,
    scale_bits=8,
))
register(Format(
    "mxfp4_rceil", 4, _mxfp4_quantizer("rceil"),
    "MX-FP4 with NVIDIA's RCEIL scale rule: E8M0 scale 2^ceil(log2(amax / 6)), so no element saturates; "
    "elements round half to even onto E2M1.",
    fixed_group_size=32,
    scale_bits=8,
))
register(Format(
    "nvfp4", 4, _quantize_nvfp4,
    "NVFP4: blocks of 16 E2M1 elements with an FP8-E4M3 block scale (amax_block / 6) / s (at least 2^-6), under "
    "one fp32 tensor scale s = amax / (6 * 448); elements round half to even.",
    fixed_group_size=16,
    scale_bits=8,
    tensor_scale_bits=32,
))
