"""The int8 / FP8 GEMM paths (any4lib.wa_matmul) on the CPU, where torch._int_mm and torch._scaled_mm also run:
each equals F.linear of the fake-quantized input and the dequantized weight (int8: to float32 precision, the
products being exact in int32; FP8: to the bf16 output's rounding), and the layers without a path say why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from any4lib.activations import quantize_activations
from any4lib.quant import quantize
from any4lib.wa_matmul import execution_reason, linear, prepare


def inputs(m: int, k: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 20
    return x


def fake_quant(x, q, activations):
    return F.linear(quantize_activations(x.double(), activations), q.dequantize(torch.float64))


@pytest.mark.parametrize("m", [1, 5, 17, 40])
@pytest.mark.parametrize("fmt", ["int8_sym", "int4_sym"])
def test_int8_path_equals_fake_quantization(m, fmt):
    q = quantize(torch.randn(64, 256), fmt, None)
    y = linear(inputs(m), prepare(q, "int8_sym"))
    assert y.shape == (m, 64)
    torch.testing.assert_close(y.double(), fake_quant(inputs(m), q, "int8_sym"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("fmt", ["int4_sym", "fp4_e2m1", "int3_sym"])
def test_fp8_path_equals_fake_quantization_to_bf16_rounding(m, fmt):
    q = quantize(torch.randn(64, 256), fmt, None)
    y = linear(inputs(m), prepare(q, "fp8_e4m3"))
    expected = fake_quant(inputs(m), q, "fp8_e4m3")
    torch.testing.assert_close(y.double(), expected, rtol=2**-7, atol=1e-3 * float(expected.abs().max()))


def test_bias_and_leading_dimensions():
    q = quantize(torch.randn(32, 64), "int8_sym", None)
    x, bias = torch.randn(2, 3, 64), torch.randn(32)
    expected = fake_quant(x, q, "int8_sym") + bias.double()
    torch.testing.assert_close(linear(x, prepare(q, "int8_sym"), bias).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,group,activations,reason", [
    ("int4", None, "int8_sym", "no zero point"),
    ("int8_sym", 64, "int8_sym", "one scale per row"),
    ("any4", None, "fp8_e4m3", "no zero point"),
    ("nf4", None, "fp8_e4m3", "not exact in FP8 E4M3"),
    ("int8_sym", None, "fp8_e4m3", "not exact in FP8 E4M3"),
    ("fp4_e2m1", None, "int8_sym", "not integers within int8"),
    ("int8_sym", None, "int8", "no low-precision GEMM here"),
])
def test_layers_without_a_path_say_why(fmt, group, activations, reason):
    q = quantize(torch.randn(64, 128), fmt, group)
    assert reason in execution_reason(q, activations)
    with pytest.raises(ValueError, match=reason):
        prepare(q, activations)
