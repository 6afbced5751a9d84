"""Load a model, and quantize its linear layers in place (saving and reloading the result: any4lib.checkpoint)."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import ActivationStats, record_inputs
from .checks import check_device, check_dtype, check_finite
from .formats import get_format
from .moe import ROUTER_PATTERNS, expert_sample_weight, unstack_experts
from .nn import QuantLinear
from .quant import quantize, valid_group_sizes

DEFAULT_EXCLUDE = ("lm_head", *ROUTER_PATTERNS)


def _matches(name: str, pattern: str) -> bool:
    """fnmatch glob ("*.mlp.*") or, failing that, a regular expression matched against the whole name."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_linear_layers(
    model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE
) -> list[str]:
    """Names of the nn.Linear layers to quantize, in module order: matching any `include` (all when None)
    and no `exclude` pattern."""
    include, exclude = _as_patterns(include), _as_patterns(exclude)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [
        name for name in names
        if (not include or any(_matches(name, p) for p in include)) and not any(_matches(name, p) for p in exclude)
    ]
    if include and not chosen:
        raise ValueError(f"no linear layer matches include={include} (minus exclude={exclude}); e.g. {names[:3]}")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _order_by_forward(names: list[str], stats: ActivationStats | None) -> list[str]:
    """Calibrated layers in the order the forward pass reached them (online calibration needs it), then the rest."""
    if stats is None:
        return names
    rank = {name: i for i, name in enumerate(stats.names)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    fmt: str,
    group_size: int | None = 128,
    calibration: ActivationStats | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE,
    statistic: str = "abs_mean",
    progress: bool = True,
    method: str | Iterable[str] = "rtn",
    method_options: dict | None = None,
    activations: str | None = None,
    **options,
) -> nn.Module:
    """Replace the chosen nn.Linear layers of `model` by QuantLinear in format `fmt` (in place; returns model).

    include / exclude: glob or regex patterns on qualified layer names; lm_head and MoE routers are excluded by
    default. MoE experts stored as 3-D parameters are first split into one linear layer per expert (any4lib.moe).
    calibration: statistics from any4lib.calibrate; anyN formats weigh their k-means by them (|mean input| per
    feature); without them every weight counts the same (so does an expert no calibration token was routed to).
    With an "online" calibration each layer's statistics are re-measured on the partly quantized model just before
    the layer is quantized: block by block (any4lib.pipeline), each block replayed on its cached inputs.
    options: passed to any4lib.quantize (anyN k-means settings).
    method: "rtn" (round to nearest), or steps joined by "+" (or a list): "gptq", "awq", "smoothquant"
    (any4lib.smoothquant), "omniquant" (LWC + LET, any4lib.omniquant), "rotate" (QuaRot's Hadamard rotations,
    any4lib.rotation; the model's float weights are rotated first, keeping its function), e.g. "awq+gptq",
    "rotate+gptq": the methods run block by block on the calibration token windows (any4lib.pipeline), so they need
    a calibration that kept them (calibrate(..., mode="online")). method_options: any4lib.pipeline.MethodOptions
    fields (damp, act_order, smoothquant_alpha, omniquant_epochs, ...).
    activations: the activation format every quantized layer rounds its input to (any4lib.activations: "int8",
    "int4_sym", "fp8_e4m3", "mxfp4", ...; None / "none": inputs stay in the model's dtype).
    """
    from .activations import check_activation_width, resolve_activations
    from .pipeline import MethodOptions, method_steps, parse_method, quantize_sequential

    method = parse_method(method)
    activations = resolve_activations(activations)
    unstack_experts(model)
    names = _order_by_forward(select_linear_layers(model, include, exclude), calibration)
    check_group_size(model, names, fmt, group_size)
    for name in names:
        check_activation_width(activations, model.get_submodule(name).in_features)
    online = calibration is not None and calibration.mode == "online"
    if (online or method != "rtn") and (calibration is None or not calibration.inputs):
        raise ValueError(
            f"{'method ' + repr(method) if method != 'rtn' else 'online calibration'} needs the calibration token "
            "windows: pass calibration=calibrate(model, tokenizer, ..., mode='online')"
        )
    if method == "rtn" and method_options:
        raise ValueError(f"method 'rtn' takes no method options; got {sorted(method_options)}")
    if online or method != "rtn":  # block by block on cached block inputs: L block passes, not a prefix per layer
        settings = MethodOptions.from_dict(method_options)
        settings.activations = activations
        if "rotate" in method_steps(method):
            _rotate(model, names, settings.rotation_seed)
        names = quantize_sequential(
            model, names, calibration.inputs, fmt, group_size, method, settings, statistic, progress, **options
        )  # what is left lies outside the decoder blocks: round to nearest below
    for name in tqdm(names, desc=f"quantizing {fmt}", disable=not progress or not names, leave=False):
        linear = model.get_submodule(name)
        sample_weight = None
        if online:
            fresh = record_inputs(model, calibration.inputs, ActivationStats(), layers=[name], stop_after=name)
            sample_weight = expert_sample_weight(fresh, name, statistic)
        elif calibration is not None:
            sample_weight = expert_sample_weight(calibration, name, statistic)
        try:
            q = quantize(linear.weight, fmt, group_size, sample_weight=sample_weight, **options)
        except ValueError as err:
            raise ValueError(f"layer {name!r} ({tuple(linear.weight.shape)}): {err}") from err
        layer = QuantLinear(q, linear.bias).to(linear.weight.device)
        layer.activations = activations
        layer.input_rotation = getattr(linear, "input_rotation", None)  # set by any4lib.rotation
        set_submodule(model, name, layer)
    return model


def _rotate(model: nn.Module, names: list[str], seed: int) -> None:
    """any4lib.rotation.rotate_model, after checking every down_proj is being quantized (its online rotation lives
    in the QuantLinear, so an unquantized one would lose it on saving)."""
    from .rotation import rotate_model

    unquantized = [n for n, m in model.named_modules() if n.endswith("mlp.down_proj") and n not in names]
    if unquantized:
        raise ValueError(f"method 'rotate' rotates every down_proj's input online, so each must be quantized; "
                         f"{unquantized[:3]} are excluded or not chosen")
    rotate_model(model, seed)


def check_group_size(model: nn.Module, names: list[str], fmt: str, group_size: int | None) -> None:
    """Fail before quantizing anything when group_size does not divide every chosen layer's input width."""
    if not isinstance(group_size, int) or group_size < 2 or get_format(fmt).fixed_group_size is not None:
        return  # per-row, or invalid (quantize says why), or a block format with its own size
    widths = {model.get_submodule(name).in_features for name in names}
    bad = sorted(k for k in widths if k % group_size)
    if bad:
        common = [g for g in valid_group_sizes(min(widths)) if all(k % g == 0 for k in widths)]
        raise ValueError(
            f"group_size={group_size} does not divide the input width K={', '.join(map(str, bad))} of some layers; "
            f"group sizes valid for every layer: {', '.join(map(str, common))}; or group_size=None for one group "
            "per row"
        )


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def bits_per_weight(model: nn.Module) -> float:
    """Mean storage bits per weight over the quantized layers (16 for a model with none)."""
    layers = quantized_layers(model).values()
    count = sum(m.out_features * m.in_features for m in layers)
    if count == 0:
        return 16.0
    return sum(m.quantized.bits_per_weight() * m.out_features * m.in_features for m in layers) / count


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face folder or hub id, a llama2.c checkpoint, or a name under
    data_root()/models ("ref-en-16m", "stories260K"). dtype: default float32 on a CPU (what evaluation and the
    engine compute in there; a float32 checkpoint such as llama2.c's is not rounded), bf16 on a GPU.
    Raises FileNotFoundError naming what was tried."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huggingface_hub import try_to_load_from_cache

    from .hub import hub_reachable, hub_unreachable_error
    from .paths import data_root, resolve_model

    check_device(device)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    dtype = check_dtype(dtype)
    source = resolve_model(name_or_path)
    if isinstance(source, Path):
        checkpoints = [source] if source.is_file() else sorted(source.glob("*.bin"))
        if checkpoints and not (source.is_dir() and (source / "config.json").is_file()):
            from .llama2c import load_llama2c

            model, tokenizer = load_llama2c(checkpoints[0], dtype=dtype)
            return model.to(device).eval(), tokenizer
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} holds neither a config.json (Hugging Face) nor a llama2.c *.bin")
    # Without network a hub id is looked up once, in the local hub cache, instead of retried for a minute.
    offline = isinstance(source, str) and not hub_reachable()
    if offline and not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise hub_unreachable_error(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except OSError as err:
        if offline:
            raise hub_unreachable_error(str(name_or_path)) from err
        raise FileNotFoundError(
            f"cannot load model {str(name_or_path)!r}: not a local path, not under {data_root() / 'models'}, "
            f"and the hub failed ({err})"
        ) from err
    check_finite(dict(model.named_parameters()), name_or_path)
    return model.to(device).eval(), tokenizer
