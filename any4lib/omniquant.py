"""OmniQuant's learnable weight clipping (LWC) and learnable equivalent transformation (LET) (Shao et al., 2024), the
block-wise training ABQ-LLM builds on, trained on one decoder block's cached inputs.

Per block, with the block's float outputs on its cached inputs as the target:
  - LET: one scale per input channel of every set of linears fed by a norm (q/k/v, gate/up) or by a linear whose
    rows feed it one to one (up -> down), X / s folded into the producer and W diag(s) into the linears, as
    SmoothQuant's (its alpha = 0.5 scales are the start); OmniQuant's shifts need biases Llama's layers lack and
    are left out;
  - LWC: per weight group, factors sigmoid(gamma), sigmoid(beta) (start: sigmoid(4) = 0.982) shrinking the group's
    max and min before min/max quantization;
the block runs with its weights fake-quantized as OmniQuant's integer grid of the format's width (round with a
straight-through gradient, integer zero point) and its linears' inputs fake-quantized in the activation format
(straight through), and AdamW (no weight decay; lr 1e-2 for LWC, 5e-3 for LET, OmniQuant's) lowers the mean squared
error to the float outputs, one window per step, for `epochs` passes.

Afterwards the scales are folded into the model and each weight group is clamped to its learned range, so any
min/max format (intN, and anyN, whose LUT k-means then learns inside the clipped range) quantizes it as usual, by
round to nearest or GPTQ (any4lib.pipeline runs them after this step).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import quantize_activations
from .awq import fold_scales, foldable_sets
from .formats import get_format
from .pipeline import BlockInput, run_block
from .smoothquant import DEFAULT_ALPHA, input_abs_max, smoothquant_scale

LWC_START = 4.0
LWC_LR = 1e-2
LET_LR = 5e-3
MIN_MAX_FAMILIES = ("int", "any")  # asymmetric min/max formats: clipping the range is what LWC learns


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def lwc_fake_quantize(w: torch.Tensor, bits: int, group_size: int, gamma: torch.Tensor,
                      beta: torch.Tensor) -> torch.Tensor:
    """OmniQuant's fake-quantized weight: per group of `group_size` along K, max * sigmoid(gamma) and min *
    sigmoid(beta) as the range, scale = range / (2^b - 1), integer zero point, codes clamped to [0, 2^b - 1]."""
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    hi = groups.amax(-1) * torch.sigmoid(gamma)
    lo = groups.amin(-1) * torch.sigmoid(beta)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-5)[..., None]
    zero = round_ste(-lo[..., None] / scale)
    codes = torch.clamp(round_ste(groups / scale) + zero, 0, 2**bits - 1)
    return ((codes - zero) * scale).reshape(n, k)


def clip_groups(w: torch.Tensor, group_size: int, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """w with each group clamped to [min * sigmoid(beta), max * sigmoid(gamma)]: min/max quantization of the result
    uses exactly the learned range."""
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    hi = (groups.amax(-1) * torch.sigmoid(gamma))[..., None]
    lo = (groups.amin(-1) * torch.sigmoid(beta))[..., None]
    return torch.minimum(torch.maximum(groups, lo), hi).reshape(n, k)


def _check_format(fmt: str) -> int:
    spec = get_format(fmt)
    if not spec.name.startswith(MIN_MAX_FAMILIES) or spec.name.endswith("_sym") or spec.fixed_group_size:
        raise ValueError(f"LWC learns a min/max clipping range: it applies to intN and anyN weights, not {fmt!r}")
    return spec.bits


@torch.no_grad()
def omniquant_block(
    block: nn.Module,
    names: list[str],
    inputs: list[BlockInput],
    fmt: str,
    group_size: int | None,
    activations: str | None = None,
    epochs: int = 20,
    progress: bool = False,
) -> list[float]:
    """Train LWC + LET on `block` (linears `names`) against its float outputs on `inputs`, then fold the scales and
    clip the weights in place. Returns the mean loss of each epoch."""
    bits = _check_format(fmt)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    linears = {n: block.get_submodule(n) for n in names}
    sizes = {n: group_size or m.in_features for n, m in linears.items()}
    target = [run_block(block, item) for item in inputs]
    sets = foldable_sets(block, names)
    act_max = input_abs_max(block, [c[0] for _, c in sets], inputs)
    scales = {}
    for producer, consumers in sets:
        weight_max = torch.stack([linears[c].weight.abs().amax(0).float() for c in consumers]).amax(0)
        scales[producer] = smoothquant_scale(act_max[consumers[0]], weight_max, DEFAULT_ALPHA).log()
    log_scales = {p: nn.Parameter(v.clone()) for p, v in scales.items()}  # log: the scale stays positive
    clip = {n: (nn.Parameter(torch.full((m.out_features, m.in_features // sizes[n]), LWC_START)),
                nn.Parameter(torch.full((m.out_features, m.in_features // sizes[n]), LWC_START)))
            for n, m in linears.items()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for pair in clip.values() for p in pair], "lr": LWC_LR},
         {"params": list(log_scales.values()), "lr": LET_LR}], weight_decay=0.0)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    hooks = [m.register_forward_pre_hook(_ste_activation_hook(activations)) for m in linears.values()
             if activations is not None]
    losses = []
    try:
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="lwc+let", disable=not progress, leave=False):
                total = 0.0
                for item, ref in zip(inputs, target):
                    weights = _effective_weights(block, linears, sets, log_scales, clip, bits, sizes)
                    out = torch.func.functional_call(block, weights, (item.hidden,), item.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = (out.float() - ref.float()).pow(2).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                losses.append(total / len(inputs))
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    for producer, consumers in sets:
        fold_scales(block, producer, consumers, log_scales[producer].detach().exp())
    for n, m in linears.items():
        gamma, beta = clip[n]
        m.weight.copy_(clip_groups(m.weight.float(), sizes[n], gamma.detach(), beta.detach()).to(m.weight.dtype))
    return losses


def _effective_weights(block, linears, sets, log_scales, clip, bits, sizes) -> dict[str, torch.Tensor]:
    """The block's parameters under the current LET scales (norms / producers divided, consumers multiplied) and
    LWC fake quantization, by qualified parameter name (for torch.func.functional_call)."""
    weights = {f"{n}.weight": m.weight.float() for n, m in linears.items()}
    for producer, consumers in sets:
        s = log_scales[producer].exp()
        source = block.get_submodule(producer)
        key = f"{producer}.weight"
        if isinstance(source, nn.Linear):
            weights[key] = weights[key] / s[:, None]
        else:
            weights[key] = source.weight.float() / s
        for c in consumers:
            weights[f"{c}.weight"] = weights[f"{c}.weight"] * s[None]
    for n in linears:
        gamma, beta = clip[n]
        weights[f"{n}.weight"] = lwc_fake_quantize(weights[f"{n}.weight"], bits, sizes[n], gamma, beta)
    return weights


def _ste_activation_hook(activations: str | None):
    def hook(module, args):
        x = args[0]
        return (x + (quantize_activations(x, activations) - x).detach(), *args[1:])

    return hook
