"""Every format's grid against its published definition, and exact round trips of representable values."""

from fractions import Fraction

import pytest
import torch
from scipy.stats import norm

from any4lib import dequantize, get_format, list_formats, quantize
from any4lib import grids


def decode_minifloat(bits: int, exp_bits: int, man_bits: int) -> float:
    """One bit pattern of an IEEE-style minifloat without inf/NaN, decoded with exact rationals."""
    bias = 2 ** (exp_bits - 1) - 1
    sign = -1 if bits >> (exp_bits + man_bits) & 1 else 1
    exponent = bits >> man_bits & (2**exp_bits - 1)
    mantissa = Fraction(bits & (2**man_bits - 1), 2**man_bits)
    if exponent == 0:
        return sign * float(mantissa * Fraction(2) ** (1 - bias))
    return sign * float((1 + mantissa) * Fraction(2) ** (exponent - bias))


@pytest.mark.parametrize(
    "exp_bits, man_bits, largest",
    [(2, 1, 6.0), (3, 0, 16.0), (3, 2, 28.0), (2, 3, 7.5), (2, 2, 7.0), (3, 1, 24.0)],
    ids=["e2m1", "e3m0", "e3m2", "e2m3", "e2m2", "e3m1"],
)
def test_minifloat_grid_decodes_every_bit_pattern(exp_bits, man_bits, largest):
    grid = grids.minifloat_grid(exp_bits, man_bits)
    expected = [decode_minifloat(b, exp_bits, man_bits) for b in range(2 ** (1 + exp_bits + man_bits))]
    assert grid.tolist() == expected
    assert grid.max().item() == largest  # OCP MX spec's max normal for E2M1 / E3M2 / E2M3


def test_e2m1_is_the_ocp_table():
    assert grids.E2M1[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_nf4_levels_are_qlora_normal_quantiles():
    # QLoRA's construction: 8 positive and 7 negative N(0, 1) quantiles at offset 0.9677..., plus an exact zero,
    # normalised to [-1, 1]. Rebuilt here from scipy's normal quantile function.
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    levels = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    levels /= levels.abs().max()
    torch.testing.assert_close(grids.NF4_LEVELS.double(), levels, rtol=0, atol=1e-6)


def all_fp8_e4m3_values() -> torch.Tensor:
    """Every finite OCP FP8 E4M3 value: bias 7, subnormals, only S.1111.111 is NaN (so 448 is the largest)."""
    values = set()
    for bits in range(128):
        if bits == 0x7F:
            continue
        exponent, mantissa = bits >> 3, Fraction(bits & 7, 8)
        v = mantissa * Fraction(2) ** -6 if exponent == 0 else (1 + mantissa) * Fraction(2) ** (exponent - 7)
        values |= {float(v), -float(v)}
    return torch.tensor(sorted(values), dtype=torch.float64)


def test_round_to_fp8_e4m3_is_nearest_representable():
    table = all_fp8_e4m3_values()
    assert table.max().item() == grids.FP8_E4M3_MAX
    x = torch.randn(4000, dtype=torch.float64) * torch.exp2(torch.randint(-8, 9, (4000,)).double())
    x = x.clamp(-448, 448)
    rounded = grids.round_to_fp8_e4m3(x.float()).double()
    distance = (x[:, None] - table[None]).abs()
    assert torch.all((rounded - x).abs() <= distance.min(1).values * (1 + 1e-12))


# ---- exact round trips: values a format can represent come back bit for bit -----------------------------------


def representable_int_weight(bits: int, n: int = 16, k: int = 256, g: int = 64) -> torch.Tensor:
    """lo + code * step with power-of-two steps, both extreme codes in every group: all arithmetic exact in fp32."""
    top = 2**bits - 1
    codes = torch.randint(0, top + 1, (n, k // g, g))
    codes[..., 0], codes[..., 1] = 0, top
    step = torch.exp2(torch.randint(-6, -1, (n, k // g, 1)).float())
    lo = torch.randint(-64, 0, (n, k // g, 1)).float() * step
    return (lo + codes * step).reshape(n, k)


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"int{b}")
def test_int_asymmetric_round_trip_is_exact(bits):
    w = representable_int_weight(bits)
    assert torch.equal(dequantize(quantize(w, f"int{bits}", 64)), w)


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"int{b}_sym")
def test_int_symmetric_round_trip_is_exact(bits):
    half = 2 ** (bits - 1)
    codes = torch.randint(-half + 1, half, (8, 4, 32))
    codes[..., 0] = half - 1  # the group's absmax sets scale = step
    step = torch.exp2(torch.randint(-8, 0, (8, 4, 1)).float())
    w = (codes * step).reshape(8, 128)
    assert torch.equal(dequantize(quantize(w, f"int{bits}_sym", 32)), w)


GRID_FORMATS = {
    "fp4_e2m1": grids.E2M1,
    "fp4_e3m0": grids.minifloat_grid(3, 0),
    "nf4": grids.NF4_LEVELS,
    "fp6_e3m2": grids.minifloat_grid(3, 2),
    "fp6_e2m3": grids.minifloat_grid(2, 3),
    "fp5_e2m2": grids.minifloat_grid(2, 2),
    "fp5_e3m1": grids.minifloat_grid(3, 1),
}


@pytest.mark.parametrize("name", GRID_FORMATS)
def test_grid_format_round_trip_is_exact(name):
    grid = GRID_FORMATS[name]
    codes = torch.randint(0, len(grid), (8, 4, 64))
    codes[..., 0] = grid.abs().argmax()  # absmax scaling then maps the group onto the grid exactly
    scale = torch.exp2(torch.randint(-10, 3, (8, 4, 1)).float())
    w = (grid[codes] * scale).reshape(8, 256)
    assert torch.equal(dequantize(quantize(w, name, 64)), w)


def test_mxfp4_round_trip_is_exact():
    codes = torch.randint(0, 16, (4, 8, 32))
    codes[..., 0] = 7  # +6: amax = 6 * 2^e, so the shared scale is 2^(floor(log2 amax) - 2) = 2^e
    exponent = torch.randint(-20, 20, (4, 8, 1)).float()
    w = (grids.E2M1[codes] * torch.exp2(exponent)).reshape(4, 256)
    q = quantize(w, "mxfp4")
    assert q.group_size == 32
    assert torch.equal(q.scale, torch.exp2(exponent[..., 0]))
    assert torch.equal(dequantize(q), w)


def test_nvfp4_round_trip_is_exact():
    tensor_scale = 2.0**-12
    block = torch.tensor([448.0, 1.0, 3.0, 0.5, 2.0, 13.0, 0.125, 96.0]).repeat(4, 2)[..., None]  # E4M3 values
    codes = torch.randint(0, 16, (4, 16, 16))
    codes[..., 0] = 7  # each block's amax is 6 * block * tensor_scale
    w = (grids.E2M1[codes] * block * tensor_scale).reshape(4, 256)
    q = quantize(w, "nvfp4")
    assert q.tensor_scale == tensor_scale and q.group_size == 16
    assert torch.equal(q.scale, block[..., 0])
    assert torch.equal(dequantize(q), w)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"any{b}")
def test_any_round_trip_is_exact_when_rows_hold_few_values(bits):
    # Each row's groups use one set of 2^bits normalised levels (multiples of 1/4 in [0, 2^bits - 1], both ends
    # present): k-means must find exactly those levels, and dequantization reproduces the weights.
    top = 2**bits - 1
    n, g_count, g = 6, 4, 32
    rows = []
    for _ in range(n):
        inner = torch.randperm(4 * top - 1)[: 2**bits - 2].float() / 4 + 0.25
        levels = torch.cat([torch.tensor([0.0, float(top)]), inner])
        picks = torch.randint(0, 2**bits, (g_count, g))
        picks[:, : 2**bits] = torch.arange(2**bits)  # every level in every group
        rows.append(levels[picks])
    normalised = torch.stack(rows)
    step = torch.exp2(torch.randint(-8, -2, (n, g_count, 1)).float())
    lo = torch.randint(-32, 0, (n, g_count, 1)).float() * step
    w = (lo + normalised * step).reshape(n, g_count * g)
    assert torch.equal(dequantize(quantize(w, f"any{bits}", g)), w)


# ---- the registry ------------------------------------------------------------------------------------------------


def test_registry_lists_every_format_of_the_suite():
    expected = {f"int{b}" for b in range(2, 9)} | {"any2", "any3", "any4", "nf4", "fp4_e2m1", "fp4_e3m0", "mxfp4",
                                                   "nvfp4", "fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp5_e3m1"}
    assert expected <= set(list_formats())
    assert get_format("fp4").name == "fp4_e2m1" and get_format("mx4").name == "mxfp4"
    for name in list_formats():
        assert get_format(name).definition  # every format documents its definition


def test_integer_lut_matches_design_contract():
    # int-b: lut = arange(2^b) - 2^(b-1), zero = min + 2^(b-1) * scale (docs/DESIGN.md).
    w = torch.randn(4, 128)
    q = quantize(w, "int4", 128)
    assert q.lut.tolist() == [list(range(-8, 8))]
    lo, hi = w.amin(1), w.amax(1)
    torch.testing.assert_close(q.scale[:, 0], (hi - lo) / 15)
    torch.testing.assert_close(q.zero[:, 0], lo + 8 * (hi - lo) / 15)


@pytest.mark.parametrize("name", ["int4", "any4", "nf4", "fp4", "mxfp4", "nvfp4", "int3", "any2", "fp6_e3m2", "int4_sym"])
def test_every_code_is_the_nearest_value_of_its_group(name):
    w = torch.randn(32, 512, dtype=torch.float64)
    q = quantize(w.float(), name, 128)
    n, g = q.shape[0], q.group_size
    # Every value the group can represent, in float64: [N, groups, 2^bits].
    candidates = q.lut.double().expand(n, -1)[:, None, :] * (q.scale.double() * q.tensor_scale)[..., None]
    if q.zero is not None:
        candidates = candidates + q.zero.double()[..., None]
    distance = (w.reshape(n, -1, g)[..., None] - candidates[:, :, None, :]).abs()  # [N, groups, g, 2^bits]
    chosen = (w - dequantize(q).double()).abs().reshape(n, -1, g)
    assert torch.all(chosen <= distance.min(-1).values + 1e-6)


def nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value in float64, saturating at +-6 (ties: either neighbour is nearest)."""
    table = torch.tensor(sorted(set(grids.E2M1.tolist())), dtype=torch.float64)
    return table[(x.clamp(-6, 6)[..., None] - table).abs().argmin(-1)]


def test_mxfp4_matches_a_float64_reading_of_the_ocp_spec():
    w = torch.randn(16, 256, dtype=torch.float64) * torch.exp2(torch.randint(-4, 5, (16, 1)).double())
    blocks = w.reshape(16, 8, 32)
    scale = torch.exp2(torch.floor(torch.log2(blocks.abs().amax(-1, keepdim=True))) - 2)  # E8M0, emax(E2M1) = 2
    expected = (nearest_e2m1(blocks / scale) * scale).reshape(16, 256)
    got = dequantize(quantize(w.float(), "mxfp4")).double()
    torch.testing.assert_close(got.abs(), expected.abs(), rtol=0, atol=1e-6)  # a tie may pick either side


def test_nvfp4_matches_a_float64_reading_of_its_definition():
    w = torch.randn(8, 256, dtype=torch.float64)
    fp8 = all_fp8_e4m3_values()
    tensor_scale = w.abs().max() / (6 * 448)
    blocks = w.reshape(8, 16, 16)
    wanted = blocks.abs().amax(-1, keepdim=True) / (6 * tensor_scale)
    block_scale = fp8[(wanted[..., None] - fp8).abs().argmin(-1)]
    expected = (nearest_e2m1(blocks / (block_scale * tensor_scale)) * block_scale * tensor_scale).reshape(8, 256)
    torch.testing.assert_close(dequantize(quantize(w.float(), "nvfp4")).double(), expected, rtol=1e-5, atol=1e-6)
