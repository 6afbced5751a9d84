"""Layer-by-layer quantization of a checkpoint larger than the device: one decoder layer in bf16 at a time.

    model = any4lib.quantize_checkpoint("path/to/Llama-3-70B", "any4", 128, tokenizer=tok, device="cuda", out="q")

The model is built on the meta device. Its embeddings, final norm and LM head are loaded; the first decoder
block's inputs are captured for the calibration windows (the paper's prompt by default); then, for each decoder
layer: its tensors are read from the checkpoint's safetensors shards (`standins.CheckpointWeights`) or generated
(`standins.StandinWeights`, the 70B stand-in) onto the device, the block is quantized on its cached inputs by
any4lib.pipeline.quantize_block (RTN, GPTQ or AWQ; each linear's statistics measured with the linears before it
in the block already quantized), its bf16 weights are dropped, and replaying it gives the next block's inputs.
Peak device memory is about one layer in bf16, the cached block inputs, and the quantized model so far.

The next block sees the *quantized* block's outputs by default (method_options={"propagate": "float"} feeds it the
unquantized ones): each layer is calibrated on the inputs it will really get, as GPTQ-style pipelines do, and the
result is bit for bit what quantize_model gives with an online calibration on the same windows. With `out`, the
quantized blocks are written as they are done, `layers_per_shard` layers to a safetensors shard, so the model never
exists in bf16 anywhere; load_quantized reads the folder back.

A stopped run (a time limit, a preempted job) resumes: each shard is written atomically and then recorded in the
folder's progress.json with the run's settings, so calling quantize_checkpoint again with the same arguments reads
the finished layers back from their shards, replays them to rebuild the next layer's inputs, and quantizes only the
rest; the result is bit for bit the uninterrupted run's. Other settings on the same folder are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    INDEX, empty_model, layer_spec, materialize_buffers, quantized_layer, unshared_state, write_quant_config,
)  # fmt: skip
from .model import DEFAULT_EXCLUDE, check_group_size, quantized_layers, select_linear_layers, set_submodule
from .moe import unstack_experts
from .paths import resolve_model
from .pipeline import (
    MethodOptions, advance, capture_block_inputs, decoder_blocks, method_steps, parse_method, quantize_and_advance,
)  # fmt: skip
from .standins import CheckpointWeights, StandinWeights


def checkpoint_to_model_names(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's checkpoint tensors under the names (and layout) of the transformers model: Mixtral's
    per-expert w1 / w3 / w2 become the 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I], as from_pretrained
    converts them."""
    if config.model_type != "mixtral":
        return tensors
    tensors = {name.replace(".block_sparse_moe.", ".mlp."): t for name, t in tensors.items()}
    experts = sorted({name.split(".experts.")[0] for name in tensors if ".experts." in name})
    for prefix in experts:
        def stacked(w: str) -> torch.Tensor:
            return torch.stack([tensors.pop(f"{prefix}.experts.{e}.{w}.weight") for e in range(config.num_local_experts)])

        gate, up, down = stacked("w1"), stacked("w3"), stacked("w2")
        tensors[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors[f"{prefix}.experts.down_proj"] = down
    return tensors


def as_weights(source) -> CheckpointWeights | StandinWeights:
    """A weight source: a CheckpointWeights / StandinWeights as given, else a folder (or model name) to read."""
    if isinstance(source, (CheckpointWeights, StandinWeights)):
        return source
    folder = resolve_model(source)
    if isinstance(folder, str) or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"quantize_checkpoint reads a local Hugging Face folder of safetensors; {source!r} is not one "
            "(download it first, e.g. `huggingface-cli download <id> --local-dir DIR`)"
        )
    return CheckpointWeights(folder)


PROGRESS = "progress.json"


class ShardWriter:
    """Writes a quantized model to a save_quantized folder as its blocks are done: `layers_per_shard` decoder
    layers per safetensors shard, the rest of the model in a last shard, then the index and config.json.

    `run` (the settings that decide the result) goes to progress.json with every shard written, so a later writer of
    the same run resumes after the last shard (`resumed` layers) and one of other settings refuses the folder."""

    def __init__(self, folder: str | os.PathLike, layers_per_shard: int = 4, run: dict | None = None):
        if layers_per_shard < 1:
            raise ValueError(f"layers_per_shard must be >= 1, got {layers_per_shard}")
        self.folder, self.layers_per_shard = Path(folder), layers_per_shard
        self.run = json.loads(json.dumps(run or {}))  # as progress.json gives it back (tuples become lists)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_specs: dict[str, dict] = {}
        self.layers, self.weight_map, self.files, self.specs = 0, {}, [], {}
        self.resumed = self._resume()

    def _resume(self) -> int:
        path = self.folder / PROGRESS
        if not path.is_file():
            return 0
        progress = json.loads(path.read_text())
        if progress["run"] != self.run:
            differ = sorted(k for k in self.run.keys() | progress["run"].keys() if self.run.get(k) != progress["run"].get(k))
            raise ValueError(
                f"{self.folder} holds a quantize_checkpoint run of other settings (they differ in {', '.join(differ)}); "
                "pass another `out` folder, or delete this one to start over"
            )
        self.layers, self.files = progress["layers"], progress["files"]
        self.weight_map, self.specs = progress["weight_map"], progress["specs"]
        return self.layers

    def restore_block(self, prefix: str, block: nn.Module, device: torch.device) -> None:
        """Give the meta `block` ("model.layers.7") its quantized layers and tensors back from the shards."""
        head = prefix + "."
        files = sorted({file for name, file in self.weight_map.items() if name.startswith(head)})
        tensors = {}
        for file in files:  # this block's tensors only: a shard holds layers_per_shard blocks
            with safe_open(os.fspath(self.folder / file), "pt", device=str(device)) as f:
                tensors |= {n.removeprefix(head): f.get_tensor(n) for n in f.keys() if n.startswith(head)}
        unstack_experts(block)
        for name, spec in self.specs.items():
            if name.startswith(head):
                name = name.removeprefix(head)
                set_submodule(block, name, quantized_layer(name, spec, block.get_submodule(name), tensors))
        block.load_state_dict(tensors, strict=True, assign=True)

    def add_block(self, prefix: str, block: nn.Module) -> None:
        """Queue block `prefix` ("model.layers.7") and write a shard once layers_per_shard are queued."""
        self.pending |= {f"{prefix}.{name}": t.cpu() for name, t in unshared_state(block).items()}
        self.pending_specs |= {f"{prefix}.{name}": layer_spec(m) for name, m in quantized_layers(block).items()}
        self.layers += 1
        if self.layers % self.layers_per_shard == 0:
            self._flush()

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        file = f"model-{len(self.files) + 1:05d}.safetensors"
        partial = self.folder / (file + ".partial")
        save_file(tensors, os.fspath(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / file)  # a stop mid-write leaves no shard that looks complete
        self.weight_map |= dict.fromkeys(tensors, file)
        self.files.append(file)

    def _flush(self) -> None:
        if not self.pending:
            return
        self._write_shard(self.pending)
        self.specs |= self.pending_specs
        self.pending, self.pending_specs = {}, {}
        self._write_progress()

    def _write_progress(self) -> None:
        progress = {"run": self.run, "layers": self.layers, "files": self.files, "weight_map": self.weight_map,
                    "specs": self.specs}  # fmt: skip
        partial = self.folder / (PROGRESS + ".partial")
        partial.write_text(json.dumps(progress, indent=1) + "\n")
        os.replace(partial, self.folder / PROGRESS)

    def finish(self, model: nn.Module, blocks_prefix: str, tokenizer=None) -> Path:
        """Write the tensors outside the decoder blocks, the index, the config (with its quantization_config) and the
        tokenizer."""
        self._flush()
        # The last shard stays out of progress.json: a rerun of a finished run writes it again under the same name.
        self._write_shard({n: t.cpu() for n, t in unshared_state(model).items() if not n.startswith(blocks_prefix + ".")})
        index = {"metadata": {}, "weight_map": self.weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        write_quant_config(self.folder, model, self.files)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        return self.folder


@torch.no_grad()
def quantize_checkpoint(
    source,
    fmt: str,
    group_size: int | None = 128,
    *,
    tokenizer=None,
    windows: Sequence[torch.Tensor] | None = None,
    method: str | Iterable[str] = "rtn",
    method_options: dict | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE,
    statistic: str = "abs_mean",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    out: str | os.PathLike | None = None,
    layers_per_shard: int = 4,
    progress: bool = True,
    **options,
) -> nn.Module:
    """Quantize a checkpoint layer by layer (see the module doc); returns the quantized model on `device`.

    source: a local Hugging Face folder (or a name under data_root()/models), a standins.CheckpointWeights, or a
    standins.StandinWeights (weights generated per layer). windows: calibration token windows ([1, T] ids; e.g.
    calibrate(...).inputs or calibration.calibration_inputs(...)[0]); None: the paper's prompt through `tokenizer`.
    method, method_options, include, exclude, statistic, options: as quantize_model. out: also write the quantized
    model there as it goes (load it with load_quantized); tokenizer is saved beside it when given.
    """
    from .calibration import calibration_inputs

    weights = as_weights(source)
    method = parse_method(method)
    if "rotate" in method_steps(method):
        raise ValueError("method 'rotate' rotates the whole model at once: quantize in memory (quantize_model)")
    settings = MethodOptions.from_dict(method_options)
    if windows is None:
        if tokenizer is None:
            raise ValueError("quantize_checkpoint needs calibration windows or a tokenizer to make them from")
        windows = calibration_inputs(tokenizer)[0]
    if not windows:
        raise ValueError("quantize_checkpoint needs at least one calibration window")
    device = torch.device(device)

    model = empty_model(weights.config, dtype)
    prefix, blocks = decoder_blocks(model)
    names = _plan(model, prefix, fmt, group_size, include, exclude)
    model.load_state_dict(_to(weights.other_tensors(), device, dtype), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    materialize_buffers(model, device)
    writer = None
    if out is not None:
        run = {
            "source": _source_identity(weights), "format": fmt, "group_size": group_size, "method": method,
            "method_options": dataclasses.asdict(settings), "include": include, "exclude": exclude,
            "statistic": statistic, "dtype": str(dtype), "options": repr(sorted(options.items())),
            "windows": _windows_sha256(windows), "layers_per_shard": layers_per_shard,
        }  # fmt: skip
        writer = ShardWriter(out, layers_per_shard, run)
    done = writer.resumed if writer is not None else 0
    replay = done < len(blocks)  # the finished layers' outputs are the next layer's inputs
    inputs = capture_block_inputs(model, windows) if replay else []

    bar = tqdm(blocks, desc=f"{method} {fmt} by layer", disable=not progress)
    for index, block in enumerate(bar):
        head = f"{prefix}.{index}"
        if index < done:  # on disk from a stopped run: read back and replayed, not quantized again
            bar.set_postfix_str(f"layers 0-{done - 1} read back")
            if replay and settings.propagate == "float":
                _load_layer(weights, block, head, index, device, dtype)
                inputs = advance(block, inputs)
            writer.restore_block(head, block, device)
            if replay and settings.propagate == "quantized":
                inputs = advance(block, inputs)
            continue
        _load_layer(weights, block, head, index, device, dtype)
        mine = [n.removeprefix(head + ".") for n in names if n.startswith(head + ".")]
        inputs = quantize_and_advance(block, mine, inputs, fmt, group_size, method, settings, statistic, **options)
        if writer is not None:
            writer.add_block(head, block)
    if writer is not None:
        writer.finish(model, prefix, tokenizer)
    return model


def _load_layer(weights, block: nn.Module, head: str, index: int, device: torch.device, dtype: torch.dtype) -> None:
    """Give the meta `block` decoder layer `index`'s unquantized tensors (experts split per expert)."""
    tensors = checkpoint_to_model_names(weights.config, _to(weights.layer_tensors(index), device, dtype))
    block.load_state_dict({n.removeprefix(head + "."): t for n, t in tensors.items()}, strict=True, assign=True)
    unstack_experts(block)


def _source_identity(weights: CheckpointWeights | StandinWeights) -> dict:
    """What the weights are, for progress.json: the folder, or the stand-in's seed, and the config's hash."""
    fields = {k: v for k, v in weights.config.to_dict().items() if k != "transformers_version"}
    config = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if isinstance(weights, CheckpointWeights):
        return {"folder": os.fspath(weights.folder.resolve()), "config": config}
    return {"standin_seed": weights.seed, "config": config}


def _windows_sha256(windows: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for ids in windows:
        digest.update(ids.to(torch.int64).cpu().numpy().tobytes() + b"|")
    return digest.hexdigest()[:16]


def _plan(model: nn.Module, prefix: str, fmt: str, group_size: int | None, include, exclude) -> list[str]:
    """The names of the linears to quantize (experts split per expert), checked before any weight is read."""
    probe = copy.deepcopy(model)  # on meta: costs no memory
    unstack_experts(probe)
    names = select_linear_layers(probe, include, exclude)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(
            f"quantize_checkpoint quantizes the decoder layers' linears only; {outside} lie outside them: add them "
            "to exclude, or quantize the model in memory with quantize_model"
        )
    check_group_size(probe, names, fmt, group_size)
    return names


def _to(tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for n, t in tensors.items()}

