"""Our GPTQ against llm-compressor's (a maintained implementation), INT4 g128 on ref-en-16m.

Both quantize every linear but lm_head with GPTQ (dampening 1%, blocks of 128, no act-order, sequential over the
decoder blocks with the quantized outputs propagated) from the same calibration windows (METHOD_CALIBRATION).
Reported: per layer, the relative reconstruction error ||X W^T - X W_q^T||^2 / ||X W^T||^2 on the float model's
inputs X of that layer over the calibration windows, and perplexity on heldout, beside RTN.
The formats differ slightly: llm-compressor's W4A16_ASYM rounds its zero point to an integer and widens each
group's range to include 0; ours keeps a float zero at min + 8 * scale.

llm-compressor pins other torch / transformers versions than the suite, so it runs from its own venv:
    python -m venv --system-site-packages /tmp/venv-gptq
    /tmp/venv-gptq/bin/pip install --no-deps llmcompressor compressed-tensors loguru
    PYTHONPATH=$PWD /tmp/venv-gptq/bin/python scripts/gptq_reference.py
Writes results/gptq_reference/ref-en-16m_int4_g128.json.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from any4lib.calibration import ActivationStats, calibrate, linear_layers, record_inputs
from any4lib.evaluate import evaluate_perplexity
from any4lib.experiments import DEFAULT_SEQ_LEN, METHOD_CALIBRATION, REF_TOKENS, REPO_ROOT
from any4lib.model import load_model, quantize_model, select_linear_layers
from any4lib.nn import QuantLinear
from any4lib.provenance import provenance
from any4lib.results import write_json_atomic

MODEL, DATASETS = "ref-en-16m", ["heldout"]  # one set: a shared 2-core CPU


class LayerInputs(ActivationStats):
    """Keeps every input of the chosen layers (a few MB on this model) instead of their sums."""

    def __init__(self):
        super().__init__()
        self.x: dict[str, list[torch.Tensor]] = {}

    def add(self, name, x):
        self.x.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).double())


def llm_compressor_gptq(model, windows):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    data = Dataset.from_dict({"input_ids": [w[0].tolist() for w in windows],
                              "attention_mask": [[1] * w.shape[1] for w in windows]})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"], dampening_frac=0.01,
                          block_size=128, actorder=None)
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=windows[0].shape[1],
            num_calibration_samples=len(windows), pipeline="sequential")
    return model


def dequantized_weight(module) -> torch.Tensor:
    return module.quantized.dequantize(torch.float64) if isinstance(module, QuantLinear) else module.weight.double()


def main() -> None:
    torch.manual_seed(0)
    base, tokenizer = load_model(MODEL, dtype=torch.float32)
    seq_len = DEFAULT_SEQ_LEN[MODEL]
    dataset, _, n = METHOD_CALIBRATION.rpartition(":")
    stats = calibrate(base, tokenizer, dataset, n_samples=int(n), seq_len=seq_len, mode="online", progress=False)
    names = select_linear_layers(base)
    inputs = record_inputs(base, stats.inputs, LayerInputs(), layers=names)

    models, seconds = {}, {}
    for label, build in {
        "rtn (ours)": lambda m: quantize_model(m, "int4", 128, stats, progress=False),
        "gptq (ours)": lambda m: quantize_model(m, "int4", 128, stats, method="gptq", progress=False),
        "gptq (llm-compressor)": lambda m: llm_compressor_gptq(m, stats.inputs),
    }.items():
        start = time.perf_counter()
        models[label] = build(copy.deepcopy(base)).eval()
        seconds[label] = time.perf_counter() - start

    layers = {}
    for name in names:
        x = torch.cat(inputs.x[name])
        w = base.get_submodule(name).weight.double()
        reference = (x @ w.T).pow(2).sum()
        layers[name] = {
            label: float((x @ (w - dequantized_weight(linear_layers(m)[name])).T).pow(2).sum() / reference)
            for label, m in models.items()
        }
    ppl = {
        label: {d: evaluate_perplexity(m, tokenizer, d, seq_len, REF_TOKENS, progress=False).ppl for d in DATASETS}
        for label, m in models.items()
    }
    ppl["bf16"] = {d: evaluate_perplexity(base, tokenizer, d, seq_len, REF_TOKENS, progress=False).ppl
                   for d in DATASETS}
    record = {
        "config": {"model": MODEL, "format": "int4", "group_size": 128, "calibration": METHOD_CALIBRATION,
                   "seq_len": seq_len, "max_tokens": REF_TOKENS, "damp": 0.01, "block_size": 128},
        "metrics": {"ppl": ppl, "layer_relative_error": layers, "quantize_seconds": seconds},
        "provenance": provenance("cpu") | {"llmcompressor": __import__("llmcompressor").__version__},
    }
    out = REPO_ROOT / "results" / "gptq_reference" / f"{MODEL}_int4_g128.json"
    write_json_atomic(out, record)
    for label, values in ppl.items():
        print(f"{label:24s}", " ".join(f"{d} {v:.3f}" for d, v in values.items()))
    for label in models:
        errors = [layers[n][label] for n in names]
        print(f"{label:24s} mean layer relative error {sum(errors) / len(errors):.5f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
