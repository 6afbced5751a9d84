"""Quantized checkpoints: the folder save_quantized writes and both load_quantized and transformers' from_pretrained
read (once `import any4lib` has registered the any4 quantizer, any4lib.hf).

A folder is a standard Hugging Face one: `model.safetensors` (or shards named by `model.safetensors.index.json`,
as quantize_checkpoint writes them) holding every tensor, QuantLinear codes two to a byte with their tables or a
packed layer's tinygemm tensors; the tokenizer when given; and `config.json`, the model's config with a
`quantization_config`:

    quant_method            "any4"
    format, bits, group_size, method, activations
                            the quantized layers' values (activations: the activation format their inputs are
                            rounded to, any4lib.activations; None: weights only)
    modules_to_not_convert  the linear layers left unquantized (lm_head by default)
    layers                  per layer, only the fields where it departs from those (a packed layer's form and layout)
    checksums               each weight file's SHA-256, verified on load (a folder written by transformers'
                            save_pretrained has none: it writes the config before the weights)
    version                 4

Folders of versions 1-3 keep the layer table and checksums in `quant.json` beside a plain config.json; they still
load with load_quantized, and save_quantized converts them.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import check_finite
from .identity import file_sha256
from .model import quantized_layers, select_linear_layers, set_submodule
from .moe import unstack_experts
from .nn import QuantLinear
from .qtensor import QuantizedTensor

QUANT_METHOD = "any4"
VERSION = 4
LEGACY_CONFIG = "quant.json"  # versions 1-3
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_WIDE = ("format", "bits", "group_size", "method", "activations")


def unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied parameter once and buffers copied, since layers may share a format's grid
    tensor and safetensors stores no aliases."""
    keys = model.state_dict().keys()
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied weights once
    state |= {name: b.detach().contiguous().clone() for name, b in model.named_buffers() if name in keys}
    return state


def layer_spec(m: QuantLinear) -> dict:
    """What rebuilding layer `m` needs beyond its tensors and its linear's shape."""
    spec = {"format": m.format, "bits": m.bits, "group_size": m.group_size, "method": m.method,
            "activations": m.activations, "input_rotation": m.input_rotation, "form": m.form}
    if m.form == "packed":
        spec |= {"dtype": str(m.packed.dtype).removeprefix("torch."), "int_codes": m.packed.int_codes,
                 "swiglu": m.packed.swiglu, "rows": m.packed.n}
    return spec


def describe_quantization(model: nn.Module) -> dict:
    """The model's quantization_config (without checksums; see the module doc): the most common value of each
    model-wide field, each layer's departures from them, and the linear layers left unquantized."""
    specs = {name: layer_spec(m) for name, m in quantized_layers(model).items()}
    if not specs:
        raise ValueError("the model has no quantized layer to save: quantize it first (any4lib.quantize_model)")
    wide = {key: Counter(spec[key] for spec in specs.values()).most_common(1)[0][0] for key in MODEL_WIDE}
    defaults = wide | {"form": "contract", "input_rotation": None}
    departures = {name: {k: v for k, v in spec.items() if defaults.get(k) != v} for name, spec in specs.items()}
    return {
        "quant_method": QUANT_METHOD, **wide,
        "modules_to_not_convert": [name for name, m in model.named_modules() if type(m) is nn.Linear],
        "layers": {name: d for name, d in departures.items() if d},
        "version": VERSION,
    }


def write_quant_config(path: Path, model: nn.Module, weight_files: list[str]) -> None:
    """config.json with the quantization_config and the weight files' SHA-256. Written after the weight files: a
    folder whose config.json names any4 holds complete weights."""
    config = copy.deepcopy(model.config)
    config.quantization_config = describe_quantization(model) | {
        "checksums": {file: file_sha256(path / file, cache=False) for file in weight_files}
    }
    config.save_pretrained(path)


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write the quantized model to folder `path` (see the module doc); the tokenizer too when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(unshared_state(model), os.fspath(path / WEIGHTS), metadata={"format": "pt"})
    write_quant_config(path, model, [WEIGHTS])
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def read_quant_config(path: str | os.PathLike) -> dict | None:
    """The folder's any4 quantization record: config.json's quantization_config (version 4) or quant.json (1-3);
    None when it has neither."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    quant = config.get("quantization_config")
    if quant is not None and quant.get("quant_method") == QUANT_METHOD:
        return quant
    if (path / LEGACY_CONFIG).is_file():
        return json.loads((path / LEGACY_CONFIG).read_text())
    return None


def convert_hint(path) -> str:
    return (f"{path} is an any4lib checkpoint of an earlier version (quant.json), which transformers cannot read; "
            f"convert it once: any4lib.save_quantized(any4lib.load_quantized({str(path)!r}), NEW_FOLDER)")


def weight_files(path: Path, quant: dict) -> list[str]:
    if "weight_files" in quant:  # versions 1-3
        return quant["weight_files"]
    if (path / INDEX).is_file():
        return sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    return [WEIGHTS]


def verify_checksums(path: str | os.PathLike, checksums: dict[str, str]) -> None:
    """Raise ValueError when a weight file's SHA-256 differs from the one the folder records."""
    for name, expected in checksums.items():
        actual = file_sha256(Path(path) / name, cache=False)
        if actual != expected:
            raise ValueError(
                f"{Path(path) / name} is damaged or was changed after saving: its SHA-256 is {actual[:16]}..., "
                f"the folder records {expected[:16]}...; quantize and save the model again "
                "(or load with verify=False / --no-verify to skip this check)"
            )


def checksums_of(quant: dict) -> dict[str, str]:
    return quant.get("checksums") or quant.get("sha256") or {}  # version 4 / versions 1-3


def saved_values(quant: dict, key: str) -> set:
    """The values field `key` (format, group_size, method, activations) takes over a folder's quantized layers."""
    if quant.get("version", 1) < VERSION:
        return {spec.get(key, "rtn" if key == "method" else None) for spec in quant["layers"].values()}
    return {quant.get(key)} | {spec[key] for spec in (quant.get("layers") or {}).values() if key in spec}


def layer_specs(model: nn.Module, quant: dict) -> dict[str, dict]:
    """Each quantized layer's full spec: version 4's model-wide values with the layer's departures, over the linear
    layers of `model` (experts split) not in modules_to_not_convert; versions 1-3 list every layer in full."""
    if quant.get("version", 1) < VERSION:
        return {name: {"form": "contract", "method": "rtn"} | spec for name, spec in quant["layers"].items()}
    wide = {key: quant.get(key) for key in MODEL_WIDE} | {"form": "contract"}
    names = select_linear_layers(model, exclude=quant.get("modules_to_not_convert") or [])
    departures = quant.get("layers") or {}
    return {name: wide | departures.get(name, {}) for name in dict.fromkeys([*names, *departures])}


def quantized_layer(name: str, spec: dict, linear: nn.Module, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """Layer `name` rebuilt from its spec and its tensors (real, or meta ones of the stored shapes: transformers
    assigns the values later)."""
    bias = tensors.get(f"{name}.bias")
    if spec["form"] == "packed":
        from .kernels import PackedWeight

        packed = PackedWeight(
            codes=tensors[f"{name}.packed_codes"], scales=tensors[f"{name}.packed_scales"],
            lut=tensors.get(f"{name}.packed_lut"), n=spec["rows"], k=linear.in_features,
            group_size=spec["group_size"], int_codes=spec["int_codes"], format=spec["format"],
            dtype=getattr(torch, spec["dtype"]), swiglu=spec["swiglu"],
        )
        layer = QuantLinear.from_packed(packed, bias)
    else:
        # Placeholder codes of the right shape: the stored ones replace them (QuantLinear packs a version 1
        # folder's one-code-a-byte tensor as it loads).
        lut = tensors[f"{name}.lut"]
        codes = torch.zeros(linear.out_features, linear.in_features, dtype=torch.uint8, device=lut.device)
        q = QuantizedTensor(
            format=spec["format"], bits=spec["bits"], group_size=spec["group_size"], codes=codes, lut=lut,
            scale=tensors[f"{name}.scale"], zero=tensors.get(f"{name}.zero"),
            tensor_scale=1.0 if lut.is_meta else float(tensors[f"{name}.tensor_scale"]),
        )
        layer = QuantLinear(q, bias)
    layer.method = spec["method"]
    layer.activations, layer.input_rotation = spec.get("activations"), spec.get("input_rotation")
    return layer


def replace_linears(model: nn.Module, quant: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Swap each quantized linear layer for its QuantLinear (MoE experts split first, as quantize_model did)."""
    unstack_experts(model)
    for name, spec in layer_specs(model, quant).items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized layer {name!r} is a {type(linear).__name__} in this model, not a linear layer")
        set_submodule(model, name, quantized_layer(name, spec, linear, tensors))


def header_tensors(files: list[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes and dtypes the safetensors files hold (their headers only)."""
    tensors = {}
    for file in files:
        with safe_open(os.fspath(file), "pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                dtype = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                                        "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
                                        "I64": "int64", "BOOL": "bool"}[sliced.get_dtype()])
                tensors[key] = torch.empty(sliced.get_shape(), dtype=dtype, device="meta")
    return tensors


def empty_model(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `config` with every parameter on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def materialize_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Rebuild, on `device`, the modules whose computed (non-checkpoint) buffers are still on meta: the rotary
    embeddings' inverse frequencies."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                model.set_submodule(name, type(module)(model.config))


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """A model saved by save_quantized (or written by quantize_checkpoint), rebuilt from its config and codes:
    built on the meta device and given the saved tensors, so no unquantized copy ever exists.

    verify: check each weight file against the SHA-256 the folder records (False skips the hashing, for speed).
    Every floating tensor loaded (scales, tables, dense weights) is checked finite either way.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a quantized model folder: config.json is missing (see save_quantized)")
    quant = read_quant_config(path)
    if quant is None:
        raise FileNotFoundError(f"{path} is not a quantized model folder: its config.json has no any4 "
                                f"quantization_config and {LEGACY_CONFIG} is missing (see save_quantized)")
    files = weight_files(path, quant)
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{path} is not a complete quantized model folder: {absent} missing (see save_quantized)")
    if verify:
        verify_checksums(path, checksums_of(quant))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are built here, not by transformers' quantizer
    model = empty_model(config, getattr(config, "dtype", None) or torch.float32)
    tensors = {}
    for file in files:
        loaded = load_file(os.fspath(path / file), device=str(device))
        check_finite(loaded, path / file)
        tensors |= loaded
    replace_linears(model, quant, tensors)
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
