"""Activation formats (any4lib.activations) against float64 closed forms, an enumeration of the FP8 E4M3 values and
torchao's MX / NVFP4 quantizers; QuantLinear's quantized input; the axis through quantize_model, save / load, the
CLI and the results store; W4A4 worse than W4A16 on the reference model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from any4lib.activations import get_activation_format, list_activation_formats, quantize_activations
from any4lib.cli import main
from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.model import quantize_model
from any4lib.nn import QuantLinear
from any4lib.quant import quantize


def tokens(n: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Activations with outlier channels and tokens of very different size, as a transformer's inputs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.logspace(-1, 1, n)[:, None]
    x[:, :4] *= 30  # outlier channels
    return x


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_symmetric_int_per_token_is_the_closed_form(bits):
    x = tokens()
    xd = x.double()
    levels = 2 ** (bits - 1) - 1
    scale = xd.abs().amax(1, keepdim=True) / levels
    expected = torch.round(xd / scale).clamp(-levels, levels) * scale
    got = quantize_activations(x, f"int{bits}_sym").double()
    assert ((got - expected).abs() <= 1e-6 * xd.abs().amax(1, keepdim=True)).all()  # float32 rounding only
    # every token takes at most 2 * levels + 1 distinct values, on its own grid
    assert all(len(row.unique()) <= 2 * levels + 1 for row in got)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_asymmetric_int_per_token_is_the_closed_form(bits):
    x = tokens().abs()  # one-sided: the asymmetric grid spends no level on the unused side
    xd = x.double()
    lo, hi = xd.amin(1, keepdim=True), xd.amax(1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    expected = lo + torch.round((xd - lo) / scale).clamp(0, 2**bits - 1) * scale
    got = quantize_activations(x, f"int{bits}").double()
    assert ((got - expected).abs() <= 1e-6 * xd.abs().amax(1, keepdim=True)).all()  # float32 rounding only
    asym_error = (got - xd).pow(2).mean()
    sym_error = (quantize_activations(x, f"int{bits}_sym").double() - xd).pow(2).mean()
    assert asym_error < sym_error


def e4m3_nearest(values: torch.Tensor) -> torch.Tensor:
    """Nearest finite FP8 E4M3 value of each float64 value, ties to the even bit pattern, saturating at 448: by
    enumerating the 256 bit patterns."""
    patterns = torch.arange(256, dtype=torch.uint8)
    grid = patterns.view(torch.float8_e4m3fn).double()
    finite = torch.isfinite(grid)
    grid, patterns = grid[finite], patterns[finite].long()
    distance = (values.clamp(-448, 448)[:, None] - grid[None]).abs()
    best = distance.min(1, keepdim=True).values
    candidates = distance == best
    # among equally near values prefer the even pattern (and +0 over -0)
    preference = (patterns % 2) * 2 + (patterns == 128).long()
    rank = torch.where(candidates, preference, torch.full_like(distance, 9, dtype=torch.long))
    return grid[rank.argmin(1)]


def test_fp8_per_token_rounds_to_the_nearest_e4m3_value():
    x = tokens()
    scale = x.abs().amax(1, keepdim=True) / 448
    expected = e4m3_nearest((x / scale).double().flatten()).reshape(x.shape) * scale.double()
    got = quantize_activations(x, "fp8_e4m3").double()
    assert torch.equal(got, expected.float().double())


def test_fp8_halfway_values_round_to_even():
    # one token whose amax is 448 (scale 1): 1 + 1/16 lies halfway between 1 and 1 + 1/8, 17 between 16 and 18
    x = torch.tensor([[448.0, 1.0 + 1 / 16, 17.0, -17.0, 1.0 + 3 / 16]])
    assert quantize_activations(x, "fp8")[0].tolist() == [448.0, 1.0, 16.0, -16.0, 1.25]


@pytest.mark.parametrize("name,elem", [("mxfp8", "float8_e4m3fn"), ("mxfp4", "float4_e2m1fn_x2")])
def test_mx_activations_equal_torchao(name, elem):
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    x = tokens()
    scale_e8m0, data = mx_tensor.to_mx(x, getattr(torch, elem), 32)
    expected = mx_tensor.to_dtype(data, scale_e8m0, getattr(torch, elem), 32, torch.float32)
    assert torch.equal(quantize_activations(x, name), expected)


def test_nvfp4_activations_equal_torchao():
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = tokens()
    tensor_scale = nvfp4.per_tensor_amax_to_scale(x.abs().amax())
    block_scale, packed = nvfp4.nvfp4_quantize(x, 16, tensor_scale)
    expected = nvfp4.NVFP4Tensor(packed, block_scale, 16, x.dtype, per_tensor_scale=tensor_scale).dequantize(x.dtype)
    assert torch.allclose(quantize_activations(x, "nvfp4"), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", [n for n in list_activation_formats() if n != "none"])
def test_every_format_is_per_token_or_per_block_and_keeps_shape_and_dtype(name):
    x = tokens().reshape(4, 16, 256).to(torch.bfloat16)
    got = quantize_activations(x, name)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    if name != "nvfp4":  # nvfp4's second-level scale is the whole input's: the others see one token at a time
        alone = torch.stack([quantize_activations(t[None], name)[0] for t in x.reshape(-1, 256)])
        assert torch.equal(alone.reshape(x.shape), got)
    error = (got.float() - x.float()).pow(2).sum() / x.float().pow(2).sum()
    assert 0 < error < {8: 3e-3, 6: 3e-2, 4: 0.3, 3: 0.6}[get_activation_format(name).bits]  # zeros would give 1


def test_quant_linear_multiplies_the_quantized_input():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 256, generator=g), tokens(8)
    layer = QuantLinear(quantize(w, "any4", 64), torch.randn(48, generator=g))
    plain = layer(x)
    layer.activations = "int4_sym"
    expected = F.linear(quantize_activations(x, "int4_sym"), layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.equal(layer(x), expected)
    assert not torch.allclose(layer(x), plain, atol=1e-3)
    assert "activations=int4_sym" in repr(layer)


def test_quantize_model_sets_the_axis_and_it_survives_save_and_reload(tiny, tmp_path):
    model, tokenizer = tiny
    ids = tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        weight_only = quantize_model(__import__("copy").deepcopy(model), "any4", 64, progress=False)(ids).logits
        quantize_model(model, "any4", 64, progress=False, activations="int4")
        logits = model(ids).logits
    assert all(m.activations == "int4" for m in model.modules() if isinstance(m, QuantLinear))
    assert not torch.allclose(logits, weight_only, atol=1e-4)
    save_quantized(model, tmp_path / "q")
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert quant["activations"] == "int4" and not any("activations" in spec for spec in quant["layers"].values())
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, logits)


def test_bad_activation_formats_fail_naming_the_choices(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown activation format 'int9'.*int8_sym"):
        quantize_model(model, "int4", 64, activations="int9")
    with pytest.raises(ValueError, match="multiple of its block of 32; this layer's is 48"):
        quantize_activations(torch.randn(2, 48), "mxfp8")


def test_cli_quantizes_activations_and_the_store_keys_them(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "w4a8"
    main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--group-size", "64", "--activations", "int8",
          "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["activations"] == "int8"
    capsys.readouterr()
    main(["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--store", str(tmp_path / "s")])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["activations"] == "int8" and line["source"] == "computed"
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--activations", "int9", "--out", str(out)])
    assert "unknown activation format 'int9'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_data
def test_w4a4_is_worse_than_w4a16_on_the_reference_model(tmp_path):
    from any4lib.experiments import accuracy_records
    from any4lib.paths import text_file

    if text_file("heldout") is None:
        pytest.skip("needs ../shared/data (ref-en-16m and the held-out text)")
    frame = accuracy_records("ref-en-16m", ["int4"], datasets=["heldout"], max_tokens=4096, store=tmp_path,
                             progress=False, activations=[None, "int8", "int4"])
    ppl = frame.set_index("activations")["ppl"]
    assert ppl["none"] < ppl["int4"] and ppl["int8"] < ppl["int4"]
    assert abs(ppl["int8"] - ppl["none"]) < 0.02 * ppl["none"]


def test_the_engine_fuses_projections_with_their_activation_format(tiny):
    from any4lib.engine.model import stack_linears
    from any4lib.nn import pack_model

    model, _ = tiny
    quantize_model(model, "int4", 64, progress=False, activations="int8")
    pack_model(model, torch.bfloat16)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        fused = stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        assert fused.activations == "int8"
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
