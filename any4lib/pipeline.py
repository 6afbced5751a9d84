"""The sequential block pipeline behind quantize_model's methods other than plain round-to-nearest.

The inputs of the first decoder block are captured once for the calibration token windows; then, block by block:
AWQ (when asked) searches and folds its input-channel scales, and the block's linear layers are quantized in the
order they run, each set of layers sharing one input (q/k/v, gate/up) at once, from statistics recorded on the
block's cached inputs with the layers before them already quantized: the anyN k-means weights, and GPTQ's Hessian
(one per shared input, so memory holds one layer's H at a time). Replaying the block on its cached inputs gives the
next block's inputs.

By default the next block sees the *quantized* block's outputs, as GPTQ's and llm-compressor's pipelines do: each
block is then calibrated on the inputs it will really get, and can absorb the error of the blocks before it.
propagate="float" feeds it the unquantized block's outputs instead.

quantize_block works on one block and its cached inputs, so a caller that loads blocks one at a time (from
safetensors shards) can drive it without holding the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import ActivationStats, _StopForward, model_device
from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, HessianAccumulator, gptq_quantize
from .moe import expert_sample_weight, is_expert_layer
from .nn import QuantLinear
from .quant import quantize

METHODS = ("rtn", "gptq", "awq", "awq+gptq")  # the weight-only methods; the steps below compose into more
# Steps in the order they run: rotate the whole float model, then per block fold scales (SmoothQuant, AWQ), train
# LWC + LET (OmniQuant), then choose codes (GPTQ, else round to nearest).
STEPS = ("rotate", "smoothquant", "awq", "omniquant", "gptq")
PROPAGATE = ("quantized", "float")


def parse_method(method: str | Sequence[str]) -> str:
    """The canonical method name of a name or a list of steps: "rtn", or STEPS joined by "+" in their order
    ("gptq", "awq+gptq", "smoothquant", "rotate+gptq", ...)."""
    steps = [s.strip().lower() for s in (method.split("+") if isinstance(method, str) else method)]
    if steps == ["rtn"]:
        return "rtn"
    if steps and len(set(steps)) == len(steps) and set(steps) <= set(STEPS):
        return "+".join(s for s in STEPS if s in steps)
    raise ValueError(f"unknown method {method!r}: choose 'rtn' or steps of {', '.join(STEPS)} joined by '+' (e.g. "
                     f"{', '.join(METHODS[1:])}, smoothquant+gptq, rotate+gptq), or a list of them")


def method_steps(method: str) -> list[str]:
    """The steps of a canonical method name (parse_method's)."""
    return [] if method == "rtn" else method.split("+")


@dataclass
class MethodOptions:
    """GPTQ: damp (fraction of mean diag H added to it), block_size, act_order, static_groups. AWQ: awq_grid (alpha
    values 0, 1/n, ..., (n-1)/n are tried; AutoAWQ tries 20, 10 halves the search), awq_tokens (calibration tokens
    the alpha search runs the block on; None: all). smoothquant_alpha: SmoothQuant's migration strength.
    rotation_seed: the signs of the residual rotation (any4lib.rotation). omniquant_epochs: passes of LWC + LET's
    training over the block's inputs (any4lib.omniquant; OmniQuant's 20). propagate: what the next block sees
    ("quantized" or "float"). activations: the activation format the quantized layers round their inputs to
    (quantize_model's `activations`), so each block is calibrated on what the blocks before it really give."""

    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK
    act_order: bool = False
    static_groups: bool = False
    awq_grid: int = 10
    awq_tokens: int | None = 2048
    smoothquant_alpha: float = 0.5
    rotation_seed: int = 0
    omniquant_epochs: int = 20
    propagate: str = "quantized"
    activations: str | None = None

    def __post_init__(self):
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate must be one of {PROPAGATE}, got {self.propagate!r}")
        if not 0 <= self.damp < 1 or self.block_size < 1 or self.awq_grid < 1:
            raise ValueError(f"need 0 <= damp < 1, block_size >= 1 and awq_grid >= 1; got {self}")

    @classmethod
    def from_dict(cls, options: dict | None) -> MethodOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise ValueError(f"unknown method options {unknown}; known: {sorted(known)}")
        return cls(**(options or {}))

    def gptq(self) -> dict:
        return dict(damp=self.damp, block_size=self.block_size, act_order=self.act_order,
                    static_groups=self.static_groups)


@dataclass
class BlockInput:
    """One calibration window at a block's entry: its hidden states and the block's other arguments."""

    hidden: torch.Tensor
    kwargs: dict = field(default_factory=dict)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: the longest ModuleList holding linear layers that
    lies in no other such list (a MoE block's per-expert lists lie in the decoder blocks' list)."""
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and any(isinstance(x, nn.Linear) for x in m.modules())
    ]
    candidates = [(name, m) for name, m in candidates if not any(name.startswith(o + ".") for o, _ in candidates)]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks (a ModuleList of layers)")
    return max(candidates, key=lambda c: len(c[1]))


def run_block(block: nn.Module, item: BlockInput) -> torch.Tensor:
    out = block(item.hidden, **item.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: Sequence[torch.Tensor]) -> list[BlockInput]:
    """The first decoder block's inputs for each token window (the forward pass stops there)."""
    _, blocks = decoder_blocks(model)
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        for ids in windows:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _shared_input_sets(block: nn.Module, names: list[str], item: BlockInput) -> list[list[str]]:
    """The chosen linears of `block` in the order they run, grouped where consecutive layers get the same tensor."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        block.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
        for name in names
    ]
    try:
        run_block(block, item)
    finally:
        for h in hooks:
            h.remove()
    sets: list[list[str]] = []
    for i, (name, x) in enumerate(seen):
        if name in sum(sets, []):
            continue
        if i and x is seen[i - 1][1] and sets:
            sets[-1].append(name)
        else:
            sets.append([name])
    return sets + [[n] for n in names if n not in sum(sets, [])]  # layers the window never reached


@torch.no_grad()
def record_block(
    block: nn.Module, names: list[str], inputs: list[BlockInput], hessian: bool = False, stop: bool = True
) -> tuple[ActivationStats, HessianAccumulator | None]:
    """Input statistics of the linears `names` (which share one input when hessian=True) over the cached inputs;
    with `stop`, each pass ends once the last of `names` has its input."""
    stats, acc = ActivationStats(), None
    last = names[-1]

    def hook(module, args, name):
        nonlocal acc
        stats.add(name, args[0])
        if hessian and name == names[0]:
            acc = acc or HessianAccumulator(args[0].shape[-1], args[0].device)
            acc.add(args[0])
        if stop and name == last:
            raise _StopForward

    handles = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n)) for n in names
    ]
    try:
        for item in inputs:
            try:
                run_block(block, item)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats, acc


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    names: list[str],
    inputs: list[BlockInput],
    fmt: str,
    group_size: int | None,
    method: str,
    options: MethodOptions,
    statistic: str = "abs_mean",
    **quant_options,
) -> None:
    """Quantize the linears `names` (relative to `block`) in place by `method`, calibrated on `inputs`."""
    steps = method_steps(method)
    if "smoothquant" in steps:
        from .smoothquant import smooth_block

        smooth_block(block, names, inputs, options.smoothquant_alpha)
    if "awq" in steps:
        from .awq import awq_block

        awq_block(block, names, inputs, fmt, group_size, options.awq_grid, statistic, options.awq_tokens,
                  **quant_options)
    if "omniquant" in steps:
        from .omniquant import omniquant_block

        omniquant_block(block, names, inputs, fmt, group_size, options.activations, options.omniquant_epochs)
    for shared in _shared_input_sets(block, names, inputs[0]):
        stats, acc = record_block(block, shared, inputs, hessian="gptq" in steps)
        for name in shared:
            linear = block.get_submodule(name)
            reached = name in stats or is_expert_layer(name)  # an expert no token reached: unweighted, logged
            sample_weight = expert_sample_weight(stats, name, statistic) if reached else None
            try:
                if acc is not None:
                    q = gptq_quantize(linear.weight, acc.hessian(), fmt, group_size, sample_weight,
                                      **options.gptq(), **quant_options)
                else:
                    q = quantize(linear.weight, fmt, group_size, sample_weight=sample_weight, **quant_options)
            except ValueError as err:
                raise ValueError(f"layer {name!r} ({tuple(linear.weight.shape)}): {err}") from err
            layer = QuantLinear(q, linear.bias).to(linear.weight.device)
            layer.method = method  # saved in the checkpoint, named by `any4 eval`
            layer.activations = options.activations
            layer.input_rotation = getattr(linear, "input_rotation", None)  # set by any4lib.rotation
            block.set_submodule(name, layer)


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    names: list[str],
    windows: Sequence[torch.Tensor],
    fmt: str,
    group_size: int | None,
    method: str,
    options: MethodOptions,
    statistic: str = "abs_mean",
    progress: bool = True,
    **quant_options,
) -> list[str]:
    """Quantize the chosen linears inside the decoder blocks block by block; returns the chosen names outside
    every block (the caller quantizes those)."""
    prefix, blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, windows)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    for index, block in enumerate(tqdm(blocks, desc=f"{method} {fmt}", disable=not progress, leave=False)):
        head = f"{prefix}.{index}."
        mine = [n.removeprefix(head) for n in names if n.startswith(head)]
        inputs = quantize_and_advance(block, mine, inputs, fmt, group_size, method, options, statistic, **quant_options)
    return outside


@torch.no_grad()
def quantize_and_advance(
    block: nn.Module,
    names: list[str],
    inputs: list[BlockInput],
    fmt: str,
    group_size: int | None,
    method: str,
    options: MethodOptions,
    statistic: str = "abs_mean",
    **quant_options,
) -> list[BlockInput]:
    """Quantize the linears `names` of `block` on its cached inputs; return the next block's inputs (the quantized
    or the float block's outputs, as options.propagate says)."""
    floating = advance(block, inputs) if options.propagate == "float" else None
    if names:
        quantize_block(block, names, inputs, fmt, group_size, method, options, statistic, **quant_options)
    return floating or advance(block, inputs)


@torch.no_grad()
def advance(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: `block` run on each cached input."""
    return [BlockInput(run_block(block, item), item.kwargs) for item in inputs]
