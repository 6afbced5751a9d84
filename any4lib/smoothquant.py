"""SmoothQuant (Xiao et al., 2023): migrate the activations' outlier channels into the weights, for W8A8 and below.

For each set of linears that share one input X and follow a norm (q/k/v after input_layernorm, gate/up after
post_attention_layernorm: llm-compressor's Llama mappings), per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|W_j| over every row of every linear in the set; s_j = max|X_j| where that column is all zero). X / s is folded
into the norm's weight and W diag(s) into the linears (any4lib.awq.fold_scales), so the float model is unchanged
while the activation quantizer sees a flatter X. alpha = 1 flattens the activations completely (every channel's
max becomes 1) and moves all of the difficulty onto the weights; alpha = 0 flattens the weights' columns instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .awq import fold_scales, foldable_sets
from .pipeline import BlockInput, run_block

DEFAULT_ALPHA = 0.5


def smoothquant_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_max^alpha / weight_max^(1 - alpha) (act_max itself where weight_max is 0), float32, both clamped at
    1e-5 as llm-compressor does."""
    act_max, weight_max = act_max.float().clamp_min(1e-5), weight_max.float()
    scale = act_max.pow(alpha) / weight_max.clamp_min(1e-5).pow(1 - alpha)
    return torch.where(weight_max > 0, scale, act_max)


@torch.no_grad()
def input_abs_max(block: nn.Module, names: list[str], inputs: list[BlockInput]) -> dict[str, torch.Tensor]:
    """max over the calibration tokens of |input| per input channel of each linear in `names` (one block pass per
    cached input)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name, x):
        amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        found[name] = amax if name not in found else torch.maximum(found[name], amax)

    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: hook(n, args[0]))
               for n in names]
    try:
        for item in inputs:
            run_block(block, item)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def smooth_block(block: nn.Module, names: list[str], inputs: list[BlockInput],
                 alpha: float = DEFAULT_ALPHA) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant's scales into every norm -> linears set of `block` whose linears are all in `names`;
    returns the scales per norm."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"SmoothQuant's alpha must lie in [0, 1], got {alpha}")
    sets = [(p, c) for p, c in foldable_sets(block, names) if not isinstance(block.get_submodule(p), nn.Linear)]
    act_max = input_abs_max(block, [consumers[0] for _, consumers in sets], inputs)
    scales = {}
    for producer, consumers in sets:
        weight_max = torch.stack([block.get_submodule(c).weight.abs().amax(0).float() for c in consumers]).amax(0)
        scales[producer] = smoothquant_scale(act_max[consumers[0]], weight_max, alpha)
        fold_scales(block, producer, consumers, scales[producer])
    return scales
