"""Where quantization error comes from: per-layer weight error and per-layer output error against the unquantized
model (the seed's `analyze.py` and `diff.py`).

Output error is reported two ways on the same prompt: `output_rel` compares the layer's output in the quantized
model with the reference's (errors of earlier layers included), `isolated_rel` runs the quantized layer on the
reference's own input (this layer's error alone).
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import model_device
from .model import quantized_layers
from .paths import calibration_prompt


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return (error.double().norm() / reference.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def weight_errors(reference: nn.Module, quantized: nn.Module) -> list[dict]:
    """Per quantized layer: MSE and relative Frobenius error of its dequantized weight against the reference's."""
    rows = []
    for name, layer in quantized_layers(quantized).items():
        w = reference.get_submodule(name).weight.double()
        error = layer.quantized.dequantize(torch.float64).to(w.device) - w
        rows.append({
            "layer": name, "format": layer.format, "group_size": layer.group_size,
            "weight_mse": error.pow(2).mean().item(), "weight_rel": _relative(error, w),
        })
    return rows


@torch.no_grad()
def _capture(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each named layer on one forward pass of `ids`."""
    seen, handles = {}, []
    for name in names:
        def hook(module, args, output, name=name):
            seen[name] = (args[0].detach(), output.detach())

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(ids.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def output_errors(reference: nn.Module, quantized: nn.Module, tokenizer, prompt: str | None = None) -> list[dict]:
    """Per quantized layer, on `prompt` (default: the calibration prompt): output MSE and relative error in the
    quantized model (accumulated) and of the layer alone on the reference's input (isolated)."""
    ids = tokenizer(prompt or calibration_prompt(), return_tensors="pt").input_ids
    layers = quantized_layers(quantized)
    ref = _capture(reference, list(layers), ids)
    out = _capture(quantized, list(layers), ids)
    rows = []
    for name, layer in layers.items():
        x_ref, y_ref = ref[name]
        y_isolated = layer(x_ref.to(layer.codes.device)).to(y_ref.device)
        rows.append({
            "layer": name,
            "output_mse": (out[name][1] - y_ref).double().pow(2).mean().item(),
            "output_rel": _relative(out[name][1] - y_ref, y_ref),
            "isolated_rel": _relative(y_isolated - y_ref, y_ref),
        })
    return rows


def layer_report(reference: nn.Module, quantized: nn.Module, tokenizer, prompt: str | None = None) -> list[dict]:
    """weight_errors and output_errors joined per layer, in the model's order."""
    outputs = {row["layer"]: row for row in output_errors(reference, quantized, tokenizer, prompt)}
    return [row | outputs[row["layer"]] for row in weight_errors(reference, quantized)]
