"""SmoothQuant (any4lib.smoothquant): the scale's closed form, folding keeps the float model, after folding at
alpha = 0.5 each channel's activation max equals its weight column max (the paper's balance), and on a model with
outlier channels W8A8 with SmoothQuant is closer to the float model than W8A8 without."""

from __future__ import annotations

import pytest
import torch

from any4lib.calibration import calibrate
from any4lib.pipeline import capture_block_inputs, parse_method, run_block
from any4lib.smoothquant import input_abs_max, smooth_block, smoothquant_scale
from quant_checks import logit_error


def test_scale_is_the_closed_form():
    act, weight = torch.rand(64, dtype=torch.float64) * 9 + 0.1, torch.rand(64, dtype=torch.float64) + 0.01
    weight[5] = 0.0
    for alpha in (0.0, 0.5, 0.8, 1.0):
        expected = act**alpha / weight.clamp_min(1e-5) ** (1 - alpha)
        expected[5] = act[5]
        torch.testing.assert_close(smoothquant_scale(act, weight, alpha).double(), expected, rtol=1e-6, atol=0)


def test_smoothing_keeps_the_block_and_balances_activation_and_weight_ranges(outlier):
    model, tokenizer = outlier
    model = model.double()
    windows = calibrate(model, tokenizer, mode="online", progress=False).inputs
    inputs = capture_block_inputs(model, windows)
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        before = [run_block(block, item) for item in inputs]
        scales = smooth_block(block, names, inputs, alpha=0.5)
        after = [run_block(block, item) for item in inputs]
    assert sorted(scales) == ["input_layernorm", "post_attention_layernorm"]  # llm-compressor's Llama mappings
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # RMSNorm normalises in float32
    act_max = input_abs_max(block, ["self_attn.q_proj"], inputs)
    weight_max = torch.stack([block.get_submodule(f"self_attn.{p}_proj").weight.abs().amax(0) for p in "qkv"]).amax(0)
    torch.testing.assert_close(act_max["self_attn.q_proj"].double(), weight_max, rtol=1e-5, atol=0)


def test_smoothquant_helps_w8a8_on_outlier_channels(outlier):
    model, tokenizer = outlier
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    ids = tokenizer("a journey of a thousand miles begins with a single step", return_tensors="pt").input_ids
    smoothed, _ = logit_error(model, stats, ids, "int8", 64, "smoothquant", "int4_sym")
    plain, _ = logit_error(model, stats, ids, "int8", 64, "rtn", "int4_sym")
    assert smoothed < 0.7 * plain


def test_method_names_compose_in_step_order():
    assert parse_method("gptq+smoothquant") == "smoothquant+gptq"
    assert parse_method(["gptq", "rotate"]) == "rotate+gptq"
    with pytest.raises(ValueError, match="steps of rotate, smoothquant, awq, omniquant, gptq"):
        parse_method("smoothquant+rtn")
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        smooth_block(torch.nn.Module(), [], [], alpha=1.5)
