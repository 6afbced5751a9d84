"""Quantize a model's linear layers in place, and save / reload the quantized model without re-quantizing.

A saved model is a folder: `model.safetensors` (every tensor, QuantLinear codes and tables included; codes of at
most 4 bits two to a byte), `quant.json` (format, bits, group size, shape and form of each quantized layer, the
weight files with their SHA-256, which load_quantized verifies; quantize_checkpoint writes several shards) and the
Hugging Face `config.json`. Version 1 folders (one code per byte) and version 2 folders still load.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .calibration import ActivationStats, record_inputs
from .formats import get_format
from .identity import file_sha256
from .moe import ROUTER_PATTERNS, expert_sample_weight, unstack_experts
from .nn import QuantLinear
from .qtensor import QuantizedTensor
from .quant import quantize, valid_group_sizes

QUANT_CONFIG = "quant.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
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
    _check_group_size(model, names, fmt, group_size)
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


def _check_group_size(model: nn.Module, names: list[str], fmt: str, group_size: int | None) -> None:
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


def _unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied parameter once and buffers copied, since layers may share a format's grid
    tensor and safetensors stores no aliases."""
    keys = model.state_dict().keys()
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied weights once
    state |= {name: b.detach().contiguous().clone() for name, b in model.named_buffers() if name in keys}
    return state


def write_quant_config(path: Path, model: nn.Module, weight_files: list[str]) -> None:
    """quant.json: each quantized layer's format, shape and form, the safetensors files holding the weights and their
    SHA-256. Written after the weight files: a folder whose quant.json exists holds complete weights."""
    config = {
        "version": 3,
        "layers": {name: _layer_spec(m) for name, m in quantized_layers(model).items()},
        "weight_files": weight_files,
        "sha256": {file: file_sha256(path / file, cache=False) for file in weight_files},
    }
    (path / QUANT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write the quantized model to folder `path` (see the module doc); the tokenizer too when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file(_unshared_state(model), os.fspath(path / WEIGHTS), metadata={"format": "pt"})
    write_quant_config(path, model, [WEIGHTS])
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _layer_spec(m: QuantLinear) -> dict:
    spec = {"format": m.format, "bits": m.bits, "group_size": m.group_size, "out_features": m.out_features,
            "in_features": m.in_features, "form": m.form, "method": m.method}
    spec |= {key: getattr(m, key) for key in ("activations", "input_rotation") if getattr(m, key) is not None}
    if m.form == "packed":
        spec |= {"dtype": str(m.packed.dtype).removeprefix("torch."), "int_codes": m.packed.int_codes,
                 "swiglu": m.packed.swiglu, "rows": m.packed.n}
    return spec


def _packed_layer(name: str, spec: dict, tensors: dict) -> QuantLinear:
    from .kernels import PackedWeight

    packed = PackedWeight(
        codes=tensors[f"{name}.packed_codes"], scales=tensors[f"{name}.packed_scales"],
        lut=tensors.get(f"{name}.packed_lut"), n=spec["rows"], k=spec["in_features"], group_size=spec["group_size"],
        int_codes=spec["int_codes"], format=spec["format"], dtype=getattr(torch, spec["dtype"]), swiglu=spec["swiglu"],
    )
    return QuantLinear.from_packed(packed, tensors.get(f"{name}.bias"))


def _contract_layer(name: str, spec: dict, tensors: dict) -> QuantLinear:
    # Placeholder codes of the right shape: load_state_dict fills the buffer from either layout (QuantLinear packs a
    # version 1 folder's one-code-a-byte tensor as it loads).
    codes = torch.zeros(spec["out_features"], spec["in_features"], dtype=torch.uint8)
    q = QuantizedTensor(
        format=spec["format"], bits=spec["bits"], group_size=spec["group_size"],
        codes=codes, lut=tensors[f"{name}.lut"], scale=tensors[f"{name}.scale"],
        zero=tensors.get(f"{name}.zero"), tensor_scale=float(tensors[f"{name}.tensor_scale"]),
    )
    return QuantLinear(q, tensors.get(f"{name}.bias"))


def verify_checksums(path: str | os.PathLike, quant: dict) -> None:
    """Raise ValueError when a weight file's SHA-256 differs from the one quant.json records."""
    for name, expected in quant.get("sha256", {}).items():
        actual = file_sha256(Path(path) / name, cache=False)
        if actual != expected:
            raise ValueError(
                f"{Path(path) / name} is damaged or was changed after saving: its SHA-256 is {actual[:16]}..., "
                f"{QUANT_CONFIG} records {expected[:16]}...; quantize and save the model again "
                "(or load with verify=False / --no-verify to skip this check)"
            )


def check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise ValueError naming the floating tensors (weights, scales, tables) that hold NaN or Inf."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} tensor(s) hold NaN/Inf values, e.g. {', '.join(bad[:3])}; the checkpoint is "
            "damaged and would give meaningless outputs"
        )


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """A model saved by save_quantized (or written by quantize_checkpoint), rebuilt from its config and codes:
    built on the meta device and given the saved tensors, so no unquantized copy ever exists.

    verify: check each weight file against the SHA-256 quant.json records (False skips the hashing, for speed).
    Every floating tensor loaded (scales, tables, dense weights) is checked finite either way.
    """
    from transformers import AutoConfig

    from .streaming import empty_model, materialize_buffers

    path = Path(path)
    for needed in (QUANT_CONFIG, "config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path} is not a quantized model folder: {needed} is missing (see save_quantized)")
    quant_config = json.loads((path / QUANT_CONFIG).read_text())
    layers, files = quant_config["layers"], quant_config.get("weight_files", [WEIGHTS])
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{path} is not a complete quantized model folder: {absent} missing (see save_quantized)")
    if verify:
        verify_checksums(path, quant_config)
    config = AutoConfig.from_pretrained(path)
    model = empty_model(config, getattr(config, "dtype", None) or torch.float32)
    tensors = {}
    for file in files:
        loaded = load_file(os.fspath(path / file), device=str(device))
        check_finite(loaded, path / file)
        tensors |= loaded
    unstack_experts(model)  # quantize_model split 3-D experts into per-expert layers before quantizing them
    for name, spec in layers.items():
        layer = (_packed_layer if spec.get("form") == "packed" else _contract_layer)(name, spec, tensors)
        layer.method = spec.get("method", "rtn")  # folders before methods existed: all rtn
        layer.activations, layer.input_rotation = spec.get("activations"), spec.get("input_rotation")
        set_submodule(model, name, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [m for m in missing if not _is_tied(model, m)]  # loaded through the parameter it shares
    if missing or unexpected:
        raise ValueError(f"{path} ({', '.join(files)}) does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    materialize_buffers(model, device)
    return model.to(device).eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` shares its storage with another parameter of the model (tied embeddings)."""
    target = model.get_parameter(name)
    return any(
        other is target for other_name, other in model.named_parameters(remove_duplicate=False) if other_name != name
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """A local model folder / llama2.c file, a model name under data_root()/models, or else a hub id (returned as is)."""
    from .paths import data_root

    for candidate in (Path(name_or_path).expanduser(), data_root() / "models" / str(name_or_path)):
        if candidate.exists():
            return candidate
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not a hub id "org/name"
        raise FileNotFoundError(f"model path {text!r} does not exist (also looked under {data_root() / 'models'})")
    return text


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face folder or hub id, a llama2.c checkpoint, or a name under
    data_root()/models ("ref-en-16m", "stories260K"). Raises FileNotFoundError naming what was tried."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huggingface_hub import try_to_load_from_cache

    from .checks import check_device, check_dtype
    from .hub import hub_reachable, hub_unreachable_error
    from .paths import data_root

    check_device(device)
    check_dtype(dtype)
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
