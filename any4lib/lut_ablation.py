"""The paper's LUT-learning ablations: how anyN's k-means starts, and which error it minimises.

Each variant changes one thing from the default (k-means++ start; error weighted by activation x group scale):
  init: "k-means++", "random" (k points of the row), "int" (the INT grid), "nf4" (NF4's levels);
  term: "weights" (every normalised weight counts the same), "activation" (|mean activation| of its input feature),
        "activation_x_scale" (that times its group's scale: error in the weight's own units; the default).
Measured per variant: the weight error sum ||W - W_q||^2 / sum ||W||^2 over the quantized layers, the output error
sum ||X W^T - X W_q^T||^2 / sum ||X W^T||^2 on the calibration inputs X, and perplexity. One record each in the
results store (task "lut_ablation"), so a rerun computes only what is missing.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .calibration import ActivationStats, record_inputs
from .evaluate import evaluate_perplexity
from .formats import KMEANS_INITS
from .gptq import HessianAccumulator
from .model import quantize_model, quantized_layers
from .results import ResultStore
from .standins import standin_label

TERMS = ("weights", "activation", "activation_x_scale")
DEFAULT_INIT, DEFAULT_TERM = "k-means++", "activation_x_scale"


def variants(inits=KMEANS_INITS, terms=TERMS) -> list[tuple[str, str]]:
    """(init, term) pairs changing one factor at a time from the default."""
    return [(i, DEFAULT_TERM) for i in inits] + [(DEFAULT_INIT, t) for t in terms if t != DEFAULT_TERM]


class InputGram(ActivationStats):
    """ActivationStats that also keep each layer's X^T X, from which any weight's output error follows."""

    def __init__(self):
        super().__init__()
        self.gram: dict[str, HessianAccumulator] = {}

    def add(self, name, x):
        super().add(name, x)
        self.gram.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add(x)


@torch.no_grad()
def _errors(reference: torch.nn.Module, quantized: torch.nn.Module, gram: InputGram) -> dict[str, float]:
    weight = [0.0, 0.0]
    output = [0.0, 0.0]
    for name, layer in quantized_layers(quantized).items():
        w = reference.get_submodule(name).weight.double()
        d = w - layer.quantized.dequantize(torch.float64)
        weight = [weight[0] + float(d.pow(2).sum()), weight[1] + float(w.pow(2).sum())]
        h = gram.gram[name].hessian()  # 2 X^T X / T: the ratio below is the same for X itself
        output = [output[0] + float(((d @ h) * d).sum()), output[1] + float(((w @ h) * w).sum())]
    return {"weight_error": weight[0] / weight[1], "output_error": output[0] / output[1]}


def lut_ablation_records(
    model: str = "ref-en-16m",
    fmt: str = "any4",
    group_size: int | None = 128,
    calibration: str = "prompt",
    dataset: str = "heldout",
    pairs: list[tuple[str, str]] | None = None,
    max_tokens: int | None = 32768,
    store: str | Path = "results/accuracy",
    progress: bool = True,
):
    """A frame with one row per (init, term): weight_error, output_error, ppl (see the module doc)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .experiments import REPO_ROOT, _load, calibration_stats, calibration_windows, default_seq_len
    from .identity import model_identity, text_identity

    store = ResultStore(store if Path(store).is_absolute() else REPO_ROOT / store)
    identity = {"model": model_identity(model), "data": text_identity(dataset)}  # keyed by content (issue 20)
    base = tokenizer = stats = gram = None
    rows = []
    for init, term in tqdm(pairs or variants(), desc="LUT ablation", disable=not progress):
        config = {"task": "lut_ablation", "model": model, "format": fmt, "group_size": group_size,
                  "calibration": calibration, "dataset": dataset, "max_tokens": max_tokens, "init": init,
                  "term": term, "identity": identity}
        if standin_label(model):  # random weights: the record says its numbers are no accuracy
            config["standin"] = standin_label(model)["name"]
        if not store.has(config):
            if base is None:
                base, tokenizer = _load(model, torch.float32, "cpu")
                seq_len = default_seq_len(model, base)
                stats = calibration_stats(base, tokenizer, calibration)
                gram = record_inputs(base, calibration_windows(tokenizer, calibration, base.config), InputGram())
            start = time.perf_counter()
            quantized = quantize_model(
                copy.deepcopy(base), fmt, group_size, None if term == "weights" else stats, progress=False,
                init=init, scale_weighted=term == "activation_x_scale",
            )
            seconds = time.perf_counter() - start
            ppl = evaluate_perplexity(quantized, tokenizer, dataset, seq_len, max_tokens, progress=False).ppl
            store.put(config, _errors(base, quantized, gram) | {"ppl": ppl, "quantize_seconds": seconds})
        record = store.get(config)
        rows.append({"init": init, "term": term} | {k: record["metrics"][k] for k in
                                                     ("weight_error", "output_error", "ppl")})
    return pd.DataFrame(rows)


if __name__ == "__main__":  # python -m any4lib.lut_ablation: the README's table on ref-en-16m
    print(lut_ablation_records().to_markdown(index=False, floatfmt=".4g"))
