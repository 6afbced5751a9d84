"""QuantLinear's int8 (torch._int_mm) and FP8 (torch._scaled_mm) execution on CUDA against its fake quantization
in float64, on Llama-3-8B shapes and decode-to-prefill row counts. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from any4lib.activations import quantize_activations
from any4lib.nn import QuantLinear
from any4lib.quant import quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the int8 / FP8 GEMM tests need a CUDA device"),
]

SHAPES = [(6144, 4096), (4096, 14336)]


@pytest.mark.parametrize("m", [1, 16, 17, 300, 2048])
@pytest.mark.parametrize("fmt,activations", [("int8_sym", "int8_sym"), ("int4_sym", "int8_sym"),
                                             ("int4_sym", "fp8_e4m3"), ("fp4_e2m1", "fp8_e4m3")])
@pytest.mark.parametrize("n,k", SHAPES)
def test_cuda_path_equals_fake_quantization(m, fmt, activations, n, k):
    if activations == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9 or newer")
    q = quantize(torch.randn(n, k, device="cuda"), fmt, None)
    layer = QuantLinear(q).cuda()
    layer.activations = activations
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert ("low_precision", activations) in layer._cache and layer._cache[("low_precision", activations)] is not None
    expected = F.linear(quantize_activations(x.double(), activations), q.dequantize(torch.float64))
    torch.testing.assert_close(y.double(), expected, rtol=2**-7, atol=2e-3 * float(expected.abs().max()))
