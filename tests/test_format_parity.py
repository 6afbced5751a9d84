"""The registry's formats against the reference libraries, bit for bit: nf4 and fp4_bnb against bitsandbytes, MX-FP4 (FLOOR and
RCEIL scale rules), NVFP4 and int4 groupwise affine against torchao. Each runs when its library is installed (the
dev extra installs both on CPU)."""

import pytest
import torch

from any4lib import dequantize, quantize
from any4lib.formats import get_format


def _inputs():
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 512, generator=generator)
    outliers = normal.clone()
    rows, cols = torch.randint(0, 64, (40,), generator=generator), torch.randint(0, 512, (40,), generator=generator)
    outliers[rows, cols] *= torch.logspace(1, 4, 40)  # a few entries 10x .. 10^4x the rest
    heavy_tailed = torch.distributions.StudentT(2.0).sample((64, 512))
    return {
        "normal": normal,
        "outlier-heavy": outliers,
        "heavy-tailed": heavy_tailed,
        "bf16-rounded": (normal * 0.02).bfloat16().float(),  # ties on the E2M1 grid are common here
    }


INPUTS = _inputs()


@pytest.fixture(params=list(INPUTS))
def w(request):
    return INPUTS[request.param]


def _unpack_high_nibble_first(packed: torch.Tensor, shape) -> torch.Tensor:
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], 1).reshape(shape)


def _unpack_low_nibble_first(packed: torch.Tensor, shape) -> torch.Tensor:
    packed = packed.view(torch.uint8).reshape(-1)
    return torch.stack([packed & 0xF, packed >> 4], 1).reshape(shape)


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("fmt, quant_type", [("nf4", "nf4"), ("fp4_bnb", "fp4")])
def test_nf4_and_fp4_bnb_equal_bitsandbytes(request, w, group_size, fmt, quant_type):
    functional = pytest.importorskip("bitsandbytes.functional")
    if fmt == "fp4_bnb" and "bf16-rounded" in request.node.name:
        pytest.skip("at an exact midpoint bitsandbytes takes the lower level, fp4_bnb the even code (as every grid "
                    "format here); bitsandbytes-quantized weights convert exactly all the same (test_bnb.py)")
    packed, state = functional.quantize_4bit(w, blocksize=group_size, quant_type=quant_type)
    q = quantize(w, fmt, group_size)
    assert torch.equal(q.codes, _unpack_high_nibble_first(packed, w.shape))
    assert torch.equal(q.scale.reshape(-1), state.absmax)
    assert torch.equal(q.lut[0], state.code.float())
    reference = functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(dequantize(q), reference, rtol=0, atol=0)


@pytest.mark.parametrize("fmt, rule", [("mxfp4", "FLOOR"), ("mxfp4_rceil", "RCEIL")])
def test_mxfp4_equals_torchao(w, fmt, rule):
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    scale_e8m0, packed = mx_tensor.to_mx(w, torch.float4_e2m1fn_x2, 32, getattr(ScaleCalculationMode, rule))
    q = quantize(w, fmt)
    assert torch.equal(q.codes, _unpack_low_nibble_first(packed, w.shape))
    assert torch.equal(q.scale, scale_e8m0.float().reshape(q.scale.shape))


def test_nvfp4_equals_torchao(w):
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    tensor_scale = nvfp4.per_tensor_amax_to_scale(w.abs().amax())
    block_scale, packed = nvfp4.nvfp4_quantize(w, 16, tensor_scale)
    q = quantize(w, "nvfp4")
    assert torch.equal(q.codes, _unpack_low_nibble_first(packed, w.shape))
    assert torch.equal(q.scale, block_scale.float().reshape(q.scale.shape))
    assert q.tensor_scale == tensor_scale.item()


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_equals_torchao_groupwise_affine(w, group_size):
    utils = pytest.importorskip("torchao.quantization.utils")
    scales, zeros = utils.get_groupwise_affine_qparams(w, 4, group_size, dtype=torch.float32)
    codes = utils.groupwise_affine_quantize_tensor_from_qparams(w, scales, zeros, 4, group_size)
    q = quantize(w, "int4", group_size)
    assert torch.equal(q.codes, codes.to(torch.uint8))
    assert torch.equal(q.scale, scales.reshape(q.scale.shape)) and torch.equal(q.zero, zeros.reshape(q.zero.shape))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_rceil", "nvfp4", "fp4_e2m1", "fp6_e3m2", "int4_sym"])
def test_symmetric_formats_quantize_minus_w_to_minus_the_result(w, fmt):
    """Round half to even is symmetric, so the codes of -w dequantize to exactly -(those of w)."""
    assert torch.equal(dequantize(quantize(-w, fmt, 32)), -dequantize(quantize(w, fmt, 32)))


def test_ties_round_to_the_even_e2m1_code():
    # Block max 6 -> scale 1 in MX-FP4 (2^(2 - 2)): each element is its own value on the grid.
    halfway = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w = torch.cat([halfway, -halfway, torch.zeros(16)])[None]
    got = dequantize(quantize(w, "mxfp4"))[0, :8]
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_mxfp4_exponent_is_read_exactly_below_a_power_of_two():
    # float32 maxima just below 2^k: log2 rounds up to k in float32, but floor(log2) is k - 1.
    below = torch.nextafter(torch.tensor([1.0, 2.0, 8.0, 2.0**20]), torch.tensor(0.0))
    for amax in below:
        w = torch.zeros(1, 32)
        w[0, 0] = amax
        expected = 2.0 ** (torch.frexp(amax).exponent.item() - 1 - 2)
        assert quantize(w, "mxfp4").scale.item() == expected


def test_rceil_is_a_format_option_of_its_own():
    assert get_format("mxfp4_rceil").fixed_group_size == 32
