"""AWQ (Lin et al., 2024): per-input-channel scales searched on the block's output error, folded into the model.

For each set of linears sharing one input, s = mean|x|^alpha (normalised so that max(s) * min(s) = 1) scales the
weights' input columns up and the producer of that input down, which leaves the float model's function unchanged
while the quantizer sees the salient channels larger. alpha is chosen from a grid on the decoder block's output
error over the calibration inputs, with the format in the loop (the layers fake-quantized by round-to-nearest).

The producer must be one the scale folds into exactly: a norm whose output scales with its weight (Llama's
RMSNorm: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) or a linear whose output rows feed the
inputs one to one (up -> down; v -> o only without grouped-query attention, where v's rows are shared by several
heads of o). Where no producer folds, the layers are left unscaled, as AutoAWQ does.
"""

from __future__ import annotations

import torch
from torch import nn

from .pipeline import BlockInput, record_block, run_block
from .quant import quantize

# (producer, consumers) within a Llama-style decoder block.
SCALE_SETS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def _module(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _norm_folds(norm: nn.Module) -> bool:
    """Whether doubling the norm's weight doubles its output (false for e.g. Gemma's (1 + w) norms)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    x = torch.randn(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
    y = norm(x)
    weight.mul_(2)
    try:
        doubled = norm(x)
    finally:
        weight.div_(2)
    return torch.allclose(doubled, 2 * y, rtol=1e-2, atol=1e-6)


def foldable_sets(block: nn.Module, names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The SCALE_SETS of `block` whose consumers are all being quantized and whose producer folds a scale exactly."""
    found = []
    for producer, consumers in SCALE_SETS:
        source, targets = _module(block, producer), [_module(block, c) for c in consumers]
        if source is None or any(t is None for t in targets) or not all(c in names for c in consumers):
            continue
        if any(getattr(t, "input_rotation", None) for t in targets):
            continue  # its input is rotated online (any4lib.rotation): a channel scale before it does not fold
        if isinstance(source, nn.Linear):
            if any(t.in_features != source.out_features for t in targets):
                continue  # e.g. v -> o under grouped-query attention
        elif not _norm_folds(source):
            continue
        found.append((producer, consumers))
    return found


@torch.no_grad()
def fold_scales(block: nn.Module, producer: str, consumers: tuple[str, ...], s: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by s (in place)."""
    source = block.get_submodule(producer)
    s = s.to(source.weight)
    if isinstance(source, nn.Linear):
        source.weight.div_(s[:, None])
        if source.bias is not None:
            source.bias.div_(s)
    else:
        source.weight.div_(s)
    for name in consumers:
        block.get_submodule(name).weight.mul_(s.to(block.get_submodule(name).weight)[None])


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scale mean|x|^alpha, normalised to max * min = 1 (exactly 1 everywhere at alpha = 0)."""
    s = mean_abs.float().pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_block(
    block: nn.Module,
    names: list[str],
    inputs: list[BlockInput],
    fmt: str,
    group_size: int | None,
    grid: int = 10,
    statistic: str = "abs_mean",
    search_tokens: int | None = 2048,
    **quant_options,
) -> dict[str, float]:
    """Search and fold AWQ scales for every foldable set of `block`'s linears; returns the alpha chosen per set.

    The mean |x| comes from all `inputs`; the output error of each alpha from the first windows holding at most
    `search_tokens` tokens (at least one window; None: all), since the search runs the block grid times per set."""
    sets = foldable_sets(block, names)
    if not sets:
        return {}
    consumers_all = [c for _, consumers in sets for c in consumers]
    stats, _ = record_block(block, consumers_all, inputs, stop=False)
    sizes = torch.tensor([item.hidden.shape[:-1].numel() for item in inputs]).cumsum(0)
    inputs = inputs[: max(1, int((sizes <= search_tokens).sum())) if search_tokens else len(inputs)]
    reference = [run_block(block, item) for item in inputs]
    chosen = {}
    for producer, consumers in sets:
        mean_abs = stats.abs_sums[consumers[0]] / stats.tokens[consumers[0]]
        originals = {c: block.get_submodule(c).weight.detach().clone() for c in consumers}
        best = (float("inf"), 0.0)
        for alpha in [i / grid for i in range(grid)]:
            s = awq_scale(mean_abs, alpha).to(originals[consumers[0]].device)
            for c in consumers:
                sample_weight = stats.sample_weight(c, statistic).to(s.device) / s if c in stats else None
                scaled = originals[c].float() * s[None]
                q = quantize(scaled, fmt, group_size, sample_weight=sample_weight, **quant_options)
                block.get_submodule(c).weight.copy_(q.dequantize() / s[None])
            error = sum(
                float((run_block(block, item).double() - ref.double()).pow(2).sum())
                for item, ref in zip(inputs, reference)
            )
            best = min(best, (error, alpha))
        for c in consumers:
            block.get_submodule(c).weight.copy_(originals[c])
        fold_scales(block, producer, consumers, awq_scale(mean_abs, best[1]))
        chosen[producer] = best[1]
    return chosen
