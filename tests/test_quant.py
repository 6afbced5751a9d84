"""quantize / dequantize: checked inputs, QuantizedTensor's contract, and any4's accuracy ordering on real weights."""

import subprocess
import sys

import pytest
import torch

from any4lib import QuantizedTensor, dequantize, quantize, valid_group_sizes
from any4lib.qtensor import cat_rows
from real_weights import real_weight


def mse(w: torch.Tensor, fmt: str, group_size=128, **kw) -> float:
    return (dequantize(quantize(w, fmt, group_size, **kw)) - w).pow(2).mean().item()


@pytest.mark.real_data
def test_any4_beats_nf4_beats_int4_on_real_weights():
    names = [f"model.layers.{i}.{m}.weight" for i in (0, 3, 7) for m in ("self_attn.q_proj", "mlp.down_proj")]
    totals = {fmt: sum(mse(real_weight(n), fmt) for n in names) for fmt in ("any4", "nf4", "int4")}
    assert totals["any4"] < totals["nf4"] < totals["int4"], totals


def test_fewer_bits_cost_more_error_and_any_beats_int_at_each_width():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    errors = {b: (mse(w, f"any{b}"), mse(w, f"int{b}")) for b in (2, 3, 4)}
    assert errors[4][0] < errors[3][0] < errors[2][0]
    for any_error, int_error in errors.values():
        assert any_error < int_error


def test_sample_weight_lowers_error_where_it_is_large():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    importance = torch.ones(256)
    importance[:64] = 50.0  # the first columns matter most
    plain = (dequantize(quantize(w, "any4", 128)) - w).pow(2)[:, :64].mean()
    weighted = (dequantize(quantize(w, "any4", 128, sample_weight=importance)) - w).pow(2)[:, :64].mean()
    assert weighted < 0.8 * plain


def test_global_lut_is_shared_and_no_better_than_per_row():
    w = torch.randn(32, 256) * torch.linspace(0.5, 2, 32)[:, None]
    q = quantize(w, "any4_global", 64)
    assert q.lut.shape == (1, 16)
    assert mse(w, "any4", 64) <= mse(w, "any4_global", 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_are_accepted(dtype):
    w = torch.randn(8, 128).to(dtype)
    assert torch.equal(quantize(w, "int4").codes, quantize(w.float(), "int4").codes)


def test_per_channel_group_is_one_group_per_row():
    w = torch.randn(4, 96)
    q = quantize(w, "int4", None)
    assert q.group_size == 96 and q.scale.shape == (4, 1)


def test_block_formats_keep_their_own_block():
    w = torch.randn(4, 128)
    assert quantize(w, "mxfp4", 128).group_size == 32
    assert quantize(w, "nvfp4", 64).group_size == 16


def test_state_dict_round_trip_and_storage_cost():
    w = torch.randn(16, 256)
    for fmt in ("any4", "nf4", "nvfp4", "int3"):
        q = quantize(w, fmt, 64)
        back = QuantizedTensor.from_state_dict(q.state_dict())
        assert back.format == q.format and back.bits == q.bits and back.group_size == q.group_size
        assert torch.equal(back.dequantize(), q.dequantize())
    # any4 g64: 4 bits + (scale + zero) * 16 / 64 + its 16-entry LUT * 16 bits spread over the row's 256 weights.
    assert quantize(w, "any4", 64).bits_per_weight() == pytest.approx(4 + 32 / 64 + 16 * 16 / 256)
    assert quantize(w, "nf4", 64).bits_per_weight() == pytest.approx(4 + 16 / 64)
    assert quantize(w, "mxfp4").bits_per_weight() == pytest.approx(4 + 8 / 32)  # E8M0 scale per 32
    assert quantize(w, "nvfp4").bits_per_weight() == pytest.approx(4 + 8 / 16 + 32 / w.numel())  # E4M3 per 16, fp32


def test_constant_groups_do_not_divide_by_zero():
    w = torch.zeros(4, 128)
    w[1] = 3.0
    for fmt in ("int4", "any4", "nf4", "mxfp4", "nvfp4"):
        torch.testing.assert_close(dequantize(quantize(w, fmt)), w)


# ---- bad input: clear errors ---------------------------------------------------------------------------------


def test_group_size_that_does_not_divide_k_names_valid_sizes():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide K=96.*Valid group sizes.*32, 48, 96"):
        quantize(torch.randn(4, 96), "int4", 128)
    assert valid_group_sizes(12) == [2, 3, 4, 6, 12]


@pytest.mark.parametrize(
    "weight, fmt, error, message",
    [
        (torch.tensor([[1.0, float("nan")] * 64]), "int4", ValueError, "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")] * 64]), "any4", ValueError, "NaN/Inf"),
        (torch.randint(0, 5, (4, 128)), "int4", TypeError, "floating-point"),
        (torch.randn(128), "int4", ValueError, r"2-D weight.*w\[None\]"),
        (torch.randn(0, 128), "int4", ValueError, "empty"),
        (torch.randn(4, 128), "int5_asym", ValueError, "unknown format 'int5_asym'; known formats: any2"),
    ],
    ids=["nan", "inf", "int-dtype", "1-d", "empty", "unknown-format"],
)
def test_bad_weights_raise_clear_errors(weight, fmt, error, message):
    with pytest.raises(error, match=message):
        quantize(weight, fmt)


def test_bad_sample_weights_and_options_raise():
    w = torch.randn(4, 128)
    with pytest.raises(ValueError, match="does not broadcast"):
        quantize(w, "any4", sample_weight=torch.ones(64))
    with pytest.raises(ValueError, match="non-negative"):
        quantize(w, "any4", sample_weight=-torch.ones(128))
    with pytest.raises(TypeError, match="takes no options"):
        quantize(w, "int4", seed=3)
    with pytest.raises(ValueError, match="group_size must be an int"):
        quantize(w, "int4", 1)


@pytest.mark.parametrize("fmt", ["any4", "nf4", "int4", "mxfp4"])
def test_cat_rows_is_exact(fmt):
    torch.manual_seed(0)
    parts = [quantize(torch.randn(n, 256), fmt, 128) for n in (32, 16, 48)]
    q = cat_rows(parts)
    assert q.shape == (96, 256)
    torch.testing.assert_close(q.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot stack"):
        cat_rows([parts[0], quantize(torch.randn(16, 256), fmt, 64 if fmt != "mxfp4" else 128)]
                 if fmt != "mxfp4" else [parts[0], quantize(torch.randn(16, 128), fmt, 128)])


@pytest.mark.parametrize("fmt", ["any4", "nf4"])
def test_select_rows_takes_the_rows_in_order(fmt):
    torch.manual_seed(0)
    q = quantize(torch.randn(24, 128), fmt, 64)
    order = torch.tensor([5, 0, 23, 5])
    picked = q.select_rows(order)
    torch.testing.assert_close(picked.dequantize(), q.dequantize()[order], rtol=0, atol=0)
    assert picked.lut.shape[0] == (4 if fmt == "any4" else 1)  # a shared table stays shared


def test_import_never_initialises_cuda():
    code = "import torch, any4lib, any4lib.formats; assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["any4", "any3", "int4", "nf4", "mxfp4", "nvfp4"])
def test_gpu_quantization_matches_cpu(fmt):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(5))
    act = torch.rand(1024) + 0.1
    cpu = quantize(w, fmt, 128, sample_weight=act)
    gpu = quantize(w.cuda(), fmt, 128, sample_weight=act.cuda())
    assert gpu.codes.is_cuda
    cpu_error = (dequantize(cpu) - w).pow(2).mean().item()
    gpu_error = (dequantize(gpu).cpu() - w).pow(2).mean().item()
    assert gpu_error == pytest.approx(cpu_error, rel=1e-2)  # k-means++ draws differ by device; quality must not
