"""Value tables of the fixed numeric grids, in code order (index = bit pattern or table position).

Every table here is derived from the format's definition rather than typed in, except NF4, whose levels
QLoRA publishes as constants (the tests rebuild them from normal quantiles and compare).
"""

from __future__ import annotations

import torch


def minifloat_grid(exp_bits: int, man_bits: int, bias: int | None = None) -> torch.Tensor:
    """All values of a sign + `exp_bits` + `man_bits` float with no inf/NaN codes, indexed by bit pattern.

    Bit pattern ``s eee mm``; exponent field e = 0 is subnormal (value 2^(1-bias) * m / 2^man_bits), otherwise
    2^(e-bias) * (1 + m / 2^man_bits). The default bias is 2^(exp_bits-1) - 1 (IEEE style), as in the OCP MX spec's
    FP4 E2M1, FP6 E2M3 / E3M2. With no mantissa bits (E3M0) every nonzero code is a power of two.
    """
    if bias is None:
        bias = 2 ** (exp_bits - 1) - 1
    codes = torch.arange(2 ** (1 + exp_bits + man_bits))
    sign = 1 - 2 * ((codes >> (exp_bits + man_bits)) & 1)
    exponent = (codes >> man_bits) & (2**exp_bits - 1)
    mantissa = codes & (2**man_bits - 1)
    fraction = mantissa.double() / 2**man_bits
    normal = torch.ldexp(1.0 + fraction, (exponent - bias).double())
    subnormal = torch.ldexp(fraction, torch.tensor(1.0 - bias, dtype=torch.float64))
    magnitude = torch.where(exponent == 0, subnormal, normal)
    return (sign * magnitude).float()


# QLoRA's NormalFloat4 levels (Dettmers et al., 2023, appendix E), ascending; exactly zero at index 7.
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

E2M1 = minifloat_grid(2, 1)  # 0, .5, 1, 1.5, 2, 3, 4, 6 and negatives: OCP MX FP4
# bitsandbytes' "fp4", as bitsandbytes.functional.get_4bit_type builds it: 1 sign, 2 exponent (bias 2) and 1 mantissa
# bit in its own bit order (0b000 .. 0b111 = 0, 0.0625, 8, 12, 4, 6, 2, 3), divided by 12 in float32; +0 at code 8.
# Not E2M1: its smallest nonzero magnitude is 1/192 of the largest (E2M1's: 1/12).
_BNB_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
BNB_FP4 = torch.tensor(_BNB_FP4_MAGNITUDES + [-m or 0.0 for m in _BNB_FP4_MAGNITUDES], dtype=torch.float32) / 12.0
E8M0_BIAS = 127  # OCP MX shared scale: 2^(byte - 127)
E2M1_EMAX = 2  # largest E2M1 exponent: 6 = 1.5 * 2^2
FP8_E4M3_MAX = 448.0  # largest finite OCP FP8 E4M3 value
FP8_E4M3_EMAX = 8  # its exponent: 448 = 1.75 * 2^8


def round_to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP8 E4M3 (OCP, saturating at 448) and return them as float32."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
