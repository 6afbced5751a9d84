"""Activation statistics for any4's weighted k-means: per linear layer, the mean input per input feature.

any4 weighs each weight w[n, k] in its row's k-means by the magnitude of the activation it multiplies. The original
implementation takes |mean_t x[t, k]| over the calibration tokens (`abs_mean`); `mean_abs` (mean_t |x[t, k]|) is
kept beside it because it cannot cancel to zero on features of either sign.

Calibration data is the paper's one diverse prompt by default, or N random windows of a text set ("offline": one
forward pass, all layers at once). "online" keeps the token windows so that quantize_model re-measures each
layer's inputs after the layers before it are quantized, as the paper's online calibration does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import paths
from .evaluate import computing_in, resolve_seq_len

STATISTICS = ("abs_mean", "mean_abs")
MODES = ("offline", "online")


@dataclass
class ActivationStats:
    """Per layer name: the sum of inputs and of |inputs| per input feature (float64) and the token count.

    Names are in the order the layers ran, so iterating follows the forward pass.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    source: str = "prompt"
    mode: str = "offline"
    inputs: list[torch.Tensor] = field(default_factory=list)  # token windows, kept for online re-calibration

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    @property
    def names(self) -> list[str]:
        return list(self.sums)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Accumulate one layer input [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.abs_sums[name] = torch.zeros_like(self.sums[name])
            self.tokens[name] = 0
        self.sums[name] += x.sum(0)
        self.abs_sums[name] += x.abs().sum(0)
        self.tokens[name] += x.shape[0]

    def sample_weight(self, name: str, statistic: str = "abs_mean") -> torch.Tensor:
        """float32 [K]: the k-means weight of each input feature of layer `name`."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
        if name not in self.sums:
            raise KeyError(f"no calibration statistics for layer {name!r} (calibrated layers: {len(self.sums)})")
        if statistic == "abs_mean":
            value = (self.sums[name] / self.tokens[name]).abs()
        else:
            value = self.abs_sums[name] / self.tokens[name]
        return value.float().cpu()

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for name in self.sums:
            tensors[f"sum/{name}"] = self.sums[name].cpu()
            tensors[f"abs_sum/{name}"] = self.abs_sums[name].cpu()
        for i, ids in enumerate(self.inputs):
            tensors[f"input/{i}"] = ids.cpu()
        meta = {"source": self.source, "mode": self.mode, "tokens": json.dumps(self.tokens)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationStats:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no calibration statistics file at {path}")
        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
        if "tokens" not in meta:
            raise ValueError(f"{path} is not an activation statistics file (no 'tokens' metadata)")
        tensors = load_file(os.fspath(path))
        tokens = json.loads(meta["tokens"])
        n_inputs = sum(key.startswith("input/") for key in tensors)
        return cls(
            sums={name: tensors[f"sum/{name}"] for name in tokens},
            abs_sums={name: tensors[f"abs_sum/{name}"] for name in tokens},
            tokens=tokens,
            source=meta.get("source", "unknown"),
            mode=meta.get("mode", "offline"),
            inputs=[tensors[f"input/{i}"] for i in range(n_inputs)],
        )


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and QuantLinear of the model, by qualified name."""
    from .nn import QuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the forward pass."""


@torch.no_grad()
def record_inputs(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    stats: ActivationStats,
    layers: Iterable[str] | None = None,
    stop_after: str | None = None,
    progress: bool = False,
) -> ActivationStats:
    """Run `inputs` through the model, adding each chosen layer's inputs to `stats`.

    With `stop_after`, each forward pass ends right after that layer has been seen (online calibration needs
    only the layers up to the one it is about to quantize).
    """
    modules = linear_layers(model)
    chosen = list(modules) if layers is None else list(layers)
    missing = [name for name in chosen if name not in modules]
    if missing:
        raise KeyError(f"no linear layer named {missing[0]!r} in the model")

    def hook(name):
        def record(module, args):
            stats.add(name, args[0])
            if name == stop_after:
                raise _StopForward

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in chosen]
    device = model_device(model)
    try:
        for ids in tqdm(inputs, desc="calibrating", disable=not progress, leave=False):
            try:
                model(ids.to(device))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def calibration_inputs(
    tokenizer,
    dataset: str | os.PathLike | None = None,
    prompt: str | None = None,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
) -> tuple[list[torch.Tensor], str]:
    """The token windows to calibrate on, and a short description of them.

    Default: the paper's diverse prompt. With `dataset` (a set name of paths.TEXT_SETS or a text file):
    `n_samples` windows of `seq_len` tokens at random offsets (seeded), as GPTQ-style calibration samples.
    """
    if dataset is None:
        text = paths.calibration_prompt() if prompt is None else prompt
        return [tokenizer(text, return_tensors="pt").input_ids], "prompt" if prompt is None else "custom prompt"
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    ids = tokenizer(paths.load_text(dataset), return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"{dataset}: {ids.numel()} tokens, too few for calibration windows of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=generator)
    windows = [ids[s : s + seq_len][None] for s in starts.tolist()]
    return windows, f"{os.path.basename(os.fspath(dataset))} {n_samples}x{seq_len} seed {seed}"


def calibrate(
    model: nn.Module,
    tokenizer,
    dataset: str | os.PathLike | None = None,
    *,
    prompt: str | None = None,
    n_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    mode: str = "offline",
    layers: Iterable[str] | None = None,
    progress: bool = True,
) -> ActivationStats:
    """Mean input activation per input feature of every linear layer (or of `layers`).

    dataset: None for the default calibration prompt (or `prompt`), else a text set name or a text file, from
    which `n_samples` random windows of `seq_len` tokens are drawn (default: the model's context, at most 2048).
    The forward passes compute in float32 on CPU whatever the model's stored dtype.
    mode: "offline" measures every layer on the unquantized model; "online" also keeps the windows so that
    quantize_model re-measures each layer after quantizing the layers before it.
    MoE experts stored as 3-D parameters are first split into one linear layer per expert (in place, the same
    function: any4lib.moe), so each expert's statistics cover the tokens routed to it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; choose one of {MODES}")
    from .moe import unstack_experts

    unstack_experts(model)
    seq_len = resolve_seq_len(model, seq_len)
    inputs, source = calibration_inputs(tokenizer, dataset, prompt, n_samples, seq_len, seed)
    was_training = model.training
    model.eval()
    with computing_in(model, None):  # float32 on CPU, as evaluation
        stats = record_inputs(model, inputs, ActivationStats(source=source, mode=mode), layers, progress=progress)
    model.train(was_training)
    if mode == "online":
        stats.inputs = inputs
    return stats
