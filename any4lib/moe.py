"""Mixture-of-experts layers as lists of linear layers, so that each expert is calibrated and quantized on its own.

Current transformers keeps a MoE layer's experts as 3-D parameters of one experts module (Mixtral / Qwen-MoE:
`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); older checkpoints hold an nn.ModuleList of per-expert MLPs made
of nn.Linear. `unstack_experts` turns the first layout into the second's shape: an `ExpertLinears` module whose
per-expert nn.Linear share the 3-D parameters' storage (no copy) and whose forward is transformers' eager expert
loop. From then on a calibration hook on `...experts.gate_up_proj.3` sees exactly the tokens routed to expert 3,
quantize_model gives every expert its own QuantLinear (per row, as any layer), save_quantized / load_quantized
store them like any other layer, and on CUDA each expert runs the tinygemm kernels.

Routers (`gate`, `router`, `shared_expert_gate`) stay unquantized by default (ROUTER_PATTERNS): a router's error
changes which experts run, and it is a tiny share of the weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Router / gating layers that are nn.Linear in some models (Mixtral before transformers 5, Qwen-MoE's shared gate).
ROUTER_PATTERNS = ("*.gate", "*.router", "*.shared_expert_gate")


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why ExpertLinears cannot reproduce this experts module's forward, or None when it can."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(module, "has_post_expert_norm", False):
        return "it normalises each expert's output"
    if module.has_gate and not getattr(module, "is_concatenated", True):
        return "its gate and up projections are interleaved"
    if module.has_gate and type(module)._apply_gate is not _default_apply_gate:
        return "it has its own gating function"
    return None


def is_stacked_experts(module: nn.Module) -> bool:
    """An experts module of transformers' 3-D layout (marked by its @use_experts_implementation attributes)."""
    return (
        hasattr(module, "num_experts") and hasattr(module, "has_gate") and hasattr(module, "is_transposed")
        and any(p.ndim == 3 for p in module.parameters(recurse=False))
    )


def is_expert_layer(name: str) -> bool:
    """Whether a linear layer belongs to one expert (either layout): only routed tokens reach it."""
    return ".experts." in f".{name}"


class ExpertLinears(nn.Module):
    """The experts of one MoE layer as one nn.Linear per expert and projection.

    `gate_up_proj[e]` (or `up_proj[e]` for experts without a gate) and `down_proj[e]` hold expert e's weights as
    [out, in] views of the original 3-D parameters. forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) is the original module's function.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.has_gate = experts.has_gate
        self.act_fn = experts.act_fn
        self.in_name = "gate_up_proj" if self.has_gate else "up_proj"
        setattr(self, self.in_name, _per_expert_linears(experts, self.in_name))
        self.down_proj = _per_expert_linears(experts, "down_proj")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        projections = getattr(self, self.in_name)
        for e in top_k_index.unique().tolist():
            if e >= self.num_experts:  # expert-parallel placeholder for a token routed elsewhere
                continue
            token, slot = torch.where(top_k_index == e)
            h = projections[e](hidden_states[token])
            if self.has_gate:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(h)
            y = self.down_proj[e](h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gated={self.has_gate}"


def _per_expert_linears(experts: nn.Module, name: str) -> nn.ModuleList:
    weight = getattr(experts, name).detach()  # [E, out, in], or [E, in, out] when transposed
    bias = getattr(experts, f"{name}_bias").detach() if experts.has_bias else None
    linears = nn.ModuleList()
    for e in range(weight.shape[0]):
        w = weight[e].t() if experts.is_transposed else weight[e]
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[e], requires_grad=False)
        linears.append(linear)
    return linears


def unstack_experts(model: nn.Module) -> list[str]:
    """Replace every 3-D experts module of `model` by an ExpertLinears computing the same function (in place).

    Returns the names replaced. An experts variant ExpertLinears does not reproduce is left as it is, with a
    warning that its experts stay unquantized. Idempotent: a model without 3-D experts is left untouched.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_stacked_experts(module):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            logger.warning("%s (%s): experts stay unquantized, %s", name, type(module).__name__, reason)
            continue
        model.set_submodule(name, ExpertLinears(module))
        replaced.append(name)
    return replaced


def expert_sample_weight(stats, name: str, statistic: str) -> torch.Tensor | None:
    """stats.sample_weight(name), or None (unweighted k-means, logged) for an expert no calibration token reached."""
    if name not in stats and is_expert_layer(name):
        logger.warning("%s: no calibration token was routed to this expert; its k-means is unweighted", name)
        return None
    return stats.sample_weight(name, statistic)
