"""Hadamard rotations (any4lib.rotation): the matrices are Hadamard / orthogonal, the online transform is the dense
product, rotating a model keeps its function in float64 (width 128 and the Kronecker width 96 = 12 x 8), and a
rotated weight-activation-quantized model saves, reloads and is closer to the float model at W4A4 than without
rotation on a model with outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch

from any4lib.calibration import calibrate
from any4lib.experiments import tiny_model
from any4lib.model import quantize_model
from any4lib.nn import QuantLinear
from any4lib.rotation import (
    fast_walsh_hadamard, hadamard_factors, hadamard_matrix, paley_hadamard, residual_rotation, rotate_model,
    rotate_online, sylvester_hadamard,
)
from quant_checks import assert_reloads_exactly, logit_error

EYE = torch.eye


@pytest.mark.parametrize("n", [12, 20, 24, 44, 96, 384, 1024, 768])
def test_hadamard_matrices_have_entries_pm1_and_orthogonal_rows(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * EYE(n, dtype=torch.float64))


def test_the_kronecker_factors_and_missing_orders():
    assert hadamard_factors(384) == (12, 32) and hadamard_factors(1024) == (1, 1024)
    assert hadamard_factors(100) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 100"):
        hadamard_matrix(100)
    with pytest.raises(ValueError, match="a prime q = 3 mod 4"):
        paley_hadamard(14)
    q = residual_rotation(100)  # no Hadamard order: a random orthogonal matrix instead
    torch.testing.assert_close(q @ q.T, EYE(100, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fast_walsh_hadamard_is_the_sylvester_product():
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    torch.testing.assert_close(fast_walsh_hadamard(x), x @ sylvester_hadamard(64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [384, 1024, 96])
def test_online_rotation_is_the_normalised_dense_product(n):
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(rotate_online(x, "hadamard"), x @ hadamard_matrix(n) / n**0.5, rtol=0, atol=1e-12)
    q = residual_rotation(n, seed=3)
    torch.testing.assert_close(q @ q.T, EYE(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("hidden", [128, 96])
def test_rotating_keeps_the_float_model_function(hidden):
    model, _ = tiny_model(seed=1, hidden=hidden)
    model = model.double()
    with torch.no_grad():  # norms with uneven weights, so folding them matters
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 2.0)
    ids = torch.randint(0, 200, (2, 40))
    with torch.no_grad():
        before = model(ids).logits
        embed_before = model.model.embed_tokens.weight.clone()
        rotate_model(model, seed=0)
        after = model(ids).logits
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, embed_before)
    assert all(m.mlp.down_proj.input_rotation == "hadamard" for m in model.model.layers)
    # float64 weights, but transformers' RMSNorm normalises in float32: agreement to float32's precision
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_rotation_helps_w4a4_on_outlier_channels_and_the_rotated_model_reloads(outlier, tmp_path):
    model, tokenizer = outlier
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    ids = tokenizer("the quick brown fox jumps over the lazy dog, again and again", return_tensors="pt").input_ids
    plain, _ = logit_error(model, stats, ids, "int4", 64, "rtn", "int4")
    rotated, q = logit_error(model, stats, ids, "int4", 64, "rotate", "int4")
    assert rotated < 0.5 * plain, (rotated, plain)
    downs = [m for n, m in q.named_modules() if n.endswith("down_proj")]
    assert all(isinstance(m, QuantLinear) and m.input_rotation == "hadamard" for m in downs)
    assert_reloads_exactly(q, tmp_path / "q", ids)


def test_rotation_errors(tiny):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    with pytest.raises(ValueError, match="each must be quantized"):
        quantize_model(copy.deepcopy(model), "int4", 64, stats, method="rotate", exclude=["lm_head", "*down_proj"])
    quantize_model(model, "int4", 64, progress=False)
    with pytest.raises(ValueError, match="before quantizing"):
        rotate_model(model)
    with pytest.raises(ValueError, match="unknown online rotation"):
        rotate_online(torch.randn(2, 8), "givens")


def test_scales_do_not_fold_across_an_online_rotation(tiny):
    from any4lib.awq import foldable_sets

    model, _ = tiny
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "mlp.up_proj" in [p for p, _ in foldable_sets(block, names)]
    rotate_model(model)
    assert "mlp.up_proj" not in [p for p, _ in foldable_sets(block, names)]  # down_proj sees H-mixed channels
