"""LWC + LET (any4lib.omniquant): the fake quantizer is OmniQuant's closed form in float64 and passes gradients
straight through, clipped groups quantize onto exactly the learned range, the result is closer to the float model
than round to nearest at W4A4 on a model with outlier channels; the method saves and reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from any4lib.calibration import calibrate
from any4lib.model import quantize_model
from any4lib.omniquant import clip_groups, lwc_fake_quantize, omniquant_block, round_ste
from any4lib.pipeline import capture_block_inputs
from any4lib.quant import quantize
from quant_checks import assert_reloads_exactly, logit_error


def test_lwc_fake_quantize_is_omniquants_closed_form():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=g, dtype=torch.float64)
    gamma = torch.randn(8, 2, generator=g, dtype=torch.float64)
    beta = torch.randn(8, 2, generator=g, dtype=torch.float64)
    groups = w.reshape(8, 2, 64)
    hi = groups.amax(-1) / (1 + torch.exp(-gamma))
    lo = groups.amin(-1) / (1 + torch.exp(-beta))
    scale = ((hi - lo) / 15)[..., None]
    zero = torch.round(-lo[..., None] / scale)
    expected = (torch.clamp(torch.round(groups / scale) + zero, 0, 15) - zero) * scale
    torch.testing.assert_close(lwc_fake_quantize(w, 4, 64, gamma, beta), expected.reshape(8, 128), rtol=0, atol=1e-12)


def test_gradients_pass_straight_through_and_reach_the_clipping_factors():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    gamma = torch.zeros(4, 1, requires_grad=True)
    beta = torch.zeros(4, 1, requires_grad=True)
    lwc_fake_quantize(torch.randn(4, 32), 4, 32, gamma, beta).pow(2).sum().backward()
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0


def test_clipped_groups_quantize_onto_the_learned_range():
    w = torch.randn(6, 64)
    gamma, beta = torch.full((6, 2), 0.5), torch.full((6, 2), 1.0)
    clipped = clip_groups(w, 32, gamma, beta)
    q = quantize(clipped, "int4", 32)
    groups = w.reshape(6, 2, 32)
    expected = (groups.amax(-1) * torch.sigmoid(gamma) - groups.amin(-1) * torch.sigmoid(beta)) / 15
    torch.testing.assert_close(q.scale, expected, rtol=1e-6, atol=0)


def test_training_runs_its_epochs_and_beats_rtn_at_w4a4(outlier):
    model, tokenizer = outlier
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    inputs = capture_block_inputs(model, stats.inputs)
    block = copy.deepcopy(model.model.layers[0])
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    losses = omniquant_block(block, names, inputs, "int4", 64, "int4", epochs=3)
    assert len(losses) == 3 and all(0 < loss < 1e-3 for loss in losses)  # the block's output MSE, W4A4

    ids = tokenizer("the quick brown fox jumps over the lazy dog, again and again", return_tensors="pt").input_ids
    plain, _ = logit_error(model, stats, ids, "int4", 64, "rtn", "int4")
    learned, q = logit_error(model, stats, ids, "int4", 64, "omniquant", "int4", method_options={"omniquant_epochs": 6})
    assert learned < 0.5 * plain, (learned, plain)
    assert {m.method for m in q.modules() if hasattr(m, "codes")} == {"omniquant"}


def test_omniquant_with_anyn_saves_and_reloads(tiny, tmp_path):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    q = quantize_model(model, "any4", 64, stats, method="omniquant", activations="int8",
                       method_options={"omniquant_epochs": 1}, progress=False)
    assert_reloads_exactly(q, tmp_path / "q", torch.randint(0, 200, (1, 32)))


def test_lwc_needs_a_min_max_format(tiny):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    with pytest.raises(ValueError, match="intN and anyN weights, not 'nf4'"):
        quantize_model(model, "nf4", 64, stats, method="omniquant")
