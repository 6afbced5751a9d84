import pytest
import torch

import any4lib
from any4lib.kernels import PackedWeight
from any4lib.nn import QuantLinear, pack_model, use_kernels


def reference_weight(q) -> torch.Tensor:
    """float64 weight from the contract's formula, element by element through Python indexing of the tables."""
    n, k = q.shape
    lut = q.lut.double().expand(n, -1)
    codes = q.codes.long()
    values = lut[torch.arange(n)[:, None], codes]
    group = torch.arange(k) // q.group_size
    w = values * q.scale.double()[:, group] * q.tensor_scale
    return w if q.zero is None else w + q.zero.double()[:, group]


@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "nvfp4", "int2"])
def test_forward_matches_float64_reference(fmt):
    torch.manual_seed(0)
    w, bias, x = torch.randn(48, 256), torch.randn(48), torch.randn(3, 5, 256)
    q = any4lib.quantize(w, fmt, 64)
    layer = QuantLinear(q, bias)
    expected = x.double() @ reference_weight(q).T + bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert {"codes", "lut", "scale", "tensor_scale", "bias"} <= set(layer.state_dict())
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (48, 128)  # two codes a byte
    assert torch.equal(layer.quantized.codes, q.codes)


@pytest.mark.parametrize("fmt, k, stored", [("any4", 99, 50), ("int3", 64, 32), ("fp6_e3m2", 64, 64), ("int8", 33, 33)])
def test_codes_stored_two_to_a_byte_up_to_4_bits(fmt, k, stored):
    q = any4lib.quantize(torch.randn(8, k), fmt, None)
    layer = QuantLinear(q)
    assert layer.codes.shape == (8, stored) and torch.equal(layer.quantized.codes, q.codes)
    # A state dict with one code per byte (checkpoint version 1) loads into the packed buffer.
    other = any4lib.quantize(torch.randn(8, k), fmt, None)
    layer.load_state_dict(QuantLinear(other).state_dict() | {"codes": other.codes})
    assert torch.equal(layer.quantized.codes, other.codes)


def test_dtype_cast_keeps_tables_in_float32_and_refreshes_the_cache():
    torch.manual_seed(0)
    q = any4lib.quantize(torch.randn(16, 128), "any4", 32)
    layer = QuantLinear(q)
    x = torch.randn(2, 128)
    y32 = layer(x)
    layer.to(torch.bfloat16)
    assert layer.lut.dtype == layer.scale.dtype == layer.zero.dtype == torch.float32
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    # bf16 rounds x, the weight and y: |y| ~ 11 here, so elements differ by ~0.04; the whole output by < 1%.
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 1e-2
    # Loading new codes must not serve the old cached weight.
    other = QuantLinear(any4lib.quantize(torch.randn(16, 128), "any4", 32))
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x.bfloat16()), other.to(torch.bfloat16)(x.bfloat16()))


def test_layer_the_kernels_cannot_run_stays_unpacked_said_once(caplog):
    q3 = any4lib.quantize(torch.randn(16, 128), "int3", 128)  # 3-bit codes: not a tinygemm format
    q4 = any4lib.quantize(torch.randn(16, 128), "int4", 128)
    model = torch.nn.Sequential(QuantLinear(q3), torch.nn.ReLU(), QuantLinear(q4))
    with caplog.at_level("WARNING", logger="any4lib"):
        pack_model(model, torch.bfloat16)
        pack_model(model, torch.bfloat16)
    assert [m.form for m in (model[0], model[2])] == ["contract", "packed"]
    records = [r for r in caplog.records if r.name.startswith("any4lib")]  # not other libraries' once-only warnings
    assert len(records) == 1 and "0 runs its dequantized weight: format 'int3'" in records[0].getMessage()
    assert all(m.use_kernel for m in (model[0], model[2]))
    use_kernels(model, False)
    assert not any(m.use_kernel for m in (model[0], model[2]))


@pytest.mark.parametrize("fmt, group_size", [("int4", 64), ("any4", 32), ("nf4", 128), ("mxfp4", 32)])
def test_packed_form_is_the_only_state_and_computes_the_kernels_reference(fmt, group_size):
    torch.manual_seed(0)
    w, bias, x = torch.randn(48, 256), torch.randn(48), torch.randn(3, 256).bfloat16()
    layer = QuantLinear(any4lib.quantize(w, fmt, group_size), bias)
    assert layer.pack(torch.bfloat16) and layer.form == "packed"
    names = {"packed_codes", "packed_scales", "bias"} | ({"packed_lut"} if fmt != "int4" else set())
    assert set(layer.state_dict()) == names and {n for n, _ in layer.named_buffers()} <= names
    # Its weight: the contract's, with the tables rounded to bf16 as the packing stores them.
    packed = PackedWeight.from_quantized(any4lib.quantize(w, fmt, group_size), torch.bfloat16)
    expected = (x.double() @ packed.unpack().dequantize(torch.float64).T + bias.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(layer.quantized.codes, packed.unpack().codes)
    # The state dict loads into a layer built from it; a float cast leaves the bf16 scales alone.
    other = QuantLinear.from_packed(packed, torch.zeros(48))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    layer.to(torch.float32)
    assert layer.packed_scales.dtype == layer.packed.scales.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="packed for torch.bfloat16"):
        layer.pack(torch.float16)


def test_packed_layer_runs_float32_activations_on_the_cpu(tmp_path, tiny):
    """A folder saved after packing (e.g. on a GPU) evaluates on a CPU in float32, the CPU's compute default."""
    from any4lib.checkpoint import load_quantized, save_quantized
    from any4lib.model import quantize_model

    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(3, 256)
    layer = QuantLinear(any4lib.quantize(w, "any4", 64))
    layer.pack(torch.bfloat16)
    expected = x.double() @ layer.quantized.dequantize(torch.float64).T  # the packed (bf16-table) weight, exactly
    got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    model, tokenizer = tiny
    pack_model(quantize_model(model, "int4", 64, progress=False), torch.bfloat16)
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        before = model.float()(ids).logits
        after = load_quantized(save_quantized(model, tmp_path / "q", tokenizer)).float()(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("fmt", ["int4", "any4"])
def test_packed_swiglu_layer_is_silu_of_gate_times_up(fmt):
    torch.manual_seed(1)
    gate, up = (any4lib.quantize(torch.randn(32, 128), fmt, 64) for _ in range(2))
    layer = QuantLinear.from_packed(PackedWeight.from_gate_up(gate, up, torch.bfloat16))
    assert layer.swiglu and layer.out_features == 32
    x = torch.randn(2, 128).bfloat16()
    g, u = (QuantLinear(q).to(torch.bfloat16) for q in (gate, up))
    g.pack(torch.bfloat16), u.pack(torch.bfloat16)
    expected = torch.nn.functional.silu(g(x).double()) * u(x).double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4"])
def test_cuda_kernel_path_matches_dequantized_path(fmt):
    torch.manual_seed(0)
    q = any4lib.quantize(torch.randn(256, 512), fmt, 128)
    layer = QuantLinear(q).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    y_kernel = layer(x)
    assert layer.form == "packed" and not hasattr(layer, "codes")  # the first CUDA call packed it in place
    use_kernels(layer, False)
    y_fake = layer(x)
    # Against float64: the kernel scales in fp32 while fake-quant rounds each weight to bf16 first, so the two
    # bf16 outputs differ by about a bf16 ulp of |y| (~0.1 here); both must be within bf16 rounding of the truth.
    reference = x.double() @ any4lib.dequantize(q).double().cuda().T
    for y in (y_kernel, y_fake):
        assert ((y.double() - reference).norm() / reference.norm()).item() < 1e-2
