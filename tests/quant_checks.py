"""Checks the weight-activation method tests share."""

from __future__ import annotations

import copy

import torch

from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.model import quantize_model


def logit_error(model, stats, ids, fmt: str, group_size: int, method: str, activations: str, **options):
    """(mean squared logit error of a quantized copy of `model` against `model` on `ids`, the copy)."""
    q = quantize_model(copy.deepcopy(model), fmt, group_size, stats, method=method, activations=activations,
                       progress=False, **options)
    with torch.no_grad():
        return float((q(ids).logits - model(ids).logits).pow(2).mean()), q


def assert_reloads_exactly(model, folder, ids) -> None:
    """save_quantized then load_quantized gives the model's logits bit for bit."""
    save_quantized(model, folder)
    with torch.no_grad():
        assert torch.equal(load_quantized(folder)(ids).logits, model(ids).logits)
