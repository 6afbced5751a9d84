"""Our SmoothQuant + W8A8 against llm-compressor's (a maintained implementation) on ref-en-16m.

The scheme is llm-compressor's W8A8: int8 weights, symmetric, one scale per output row; int8 activations, symmetric,
dynamic, one scale per token; every linear but lm_head. Ours: quantize_model(..., "int8_sym", None,
method="smoothquant", activations="int8_sym"). Both smooth with alpha = 0.5 over llm-compressor's Llama mappings
(q/k/v <- input_layernorm, gate/up <- post_attention_layernorm) from the same calibration windows
(METHOD_CALIBRATION), then round to nearest (llm-compressor's QuantizationModifier; no GPTQ on either side).
Reported: the relative difference of the smoothed norm weights (the migration scales, layer by layer) and
perplexity on the weight-activation protocol (WA_TOKENS of each set), beside round to nearest without smoothing.

llm-compressor pins other torch / transformers versions than the suite, so it runs from its own venv beside the
suite's (the .pth line makes the suite's packages visible, the venv's own pins shadow them):
    python -m venv /tmp/venv-sq
    python -c 'import site; print(site.getsitepackages()[0])' \\
        > /tmp/venv-sq/lib/python3.11/site-packages/suite.pth
    /tmp/venv-sq/bin/pip install --no-deps llmcompressor "compressed-tensors==0.19.0" "transformers==5.17.0" \\
        "huggingface-hub>=1.5,<2" loguru
    /tmp/venv-sq/bin/pip install datasets accelerate httpx
    PYTHONPATH=$PWD /tmp/venv-sq/bin/python scripts/smoothquant_reference.py
Writes results/smoothquant_reference/ref-en-16m_w8a8.json.
"""

from __future__ import annotations

import copy
import time

import torch

from any4lib.calibration import calibrate
from any4lib.evaluate import evaluate_perplexity
from any4lib.experiments import DEFAULT_SEQ_LEN, METHOD_CALIBRATION, REPO_ROOT, WA_TOKENS
from any4lib.model import load_model, quantize_model
from any4lib.provenance import provenance
from any4lib.results import write_json_atomic

MODEL, DATASETS, ALPHA = "ref-en-16m", ["heldout"], 0.5  # one set: a shared 2-core CPU


def llm_compressor_w8a8(model, windows, smooth: bool):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    data = Dataset.from_dict({"input_ids": [w[0].tolist() for w in windows],
                              "attention_mask": [[1] * w.shape[1] for w in windows]})
    recipe = ([SmoothQuantModifier(smoothing_strength=ALPHA)] if smooth else []) + [
        QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=windows[0].shape[1],
            num_calibration_samples=len(windows), pipeline="sequential")
    return model


def norm_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().double().clone() for name, m in model.named_modules()
            if name.endswith(("input_layernorm", "post_attention_layernorm"))}


def main() -> None:
    torch.manual_seed(0)
    base, tokenizer = load_model(MODEL, dtype=torch.float32)
    seq_len = DEFAULT_SEQ_LEN[MODEL]
    dataset, _, n = METHOD_CALIBRATION.rpartition(":")
    stats = calibrate(base, tokenizer, dataset, n_samples=int(n), seq_len=seq_len, mode="online", progress=False)

    def ours(method):
        return lambda m: quantize_model(m, "int8_sym", None, stats, method=method, activations="int8_sym",
                                        progress=False)

    models, seconds = {}, {}
    for label, build in {
        "rtn w8a8 (ours)": ours("rtn"),
        "smoothquant w8a8 (ours)": ours("smoothquant"),
        "rtn w8a8 (llm-compressor)": lambda m: llm_compressor_w8a8(m, stats.inputs, smooth=False),
        "smoothquant w8a8 (llm-compressor)": lambda m: llm_compressor_w8a8(m, stats.inputs, smooth=True),
    }.items():
        start = time.perf_counter()
        models[label] = build(copy.deepcopy(base)).eval()
        seconds[label] = time.perf_counter() - start
        print(f"{label}: quantized in {seconds[label]:.1f} s", flush=True)

    theirs, mine = (norm_weights(models[f"smoothquant w8a8 ({who})"]) for who in ("llm-compressor", "ours"))
    original = norm_weights(base)
    norms = {name: {"relative_difference": float((mine[name] - theirs[name]).norm() / theirs[name].norm()),
                    "smoothing_changed_it_by": float((theirs[name] - original[name]).norm() / original[name].norm())}
             for name in theirs}
    ppl = {label: {} for label in ["bf16", *models]}
    for d in DATASETS:
        ppl["bf16"][d] = evaluate_perplexity(base, tokenizer, d, seq_len, WA_TOKENS, progress=False).ppl
        for label, m in models.items():
            ppl[label][d] = evaluate_perplexity(m, tokenizer, d, seq_len, WA_TOKENS, progress=False).ppl
        print(d, {label: round(values[d], 3) for label, values in ppl.items()}, flush=True)
    record = {
        "config": {"model": MODEL, "weights": "int8_sym per row", "activations": "int8_sym per token, dynamic",
                   "alpha": ALPHA, "calibration": METHOD_CALIBRATION, "seq_len": seq_len, "max_tokens": WA_TOKENS},
        "metrics": {"ppl": ppl, "smoothed_norm_weights": norms, "quantize_seconds": seconds},
        "provenance": provenance("cpu") | {"llmcompressor": __import__("llmcompressor").__version__},
    }
    out = REPO_ROOT / "results" / "smoothquant_reference" / f"{MODEL}_w8a8.json"
    write_json_atomic(out, record)
    for label, values in ppl.items():
        print(f"{label:34s}", " ".join(f"{d} {v:.3f}" for d, v in values.items()))
    worst = max(norms.values(), key=lambda v: v["relative_difference"])
    print(f"smoothed norm weights: ours vs llm-compressor, largest relative difference "
          f"{worst['relative_difference']:.2e} (smoothing moved them by {worst['smoothing_changed_it_by']:.2f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
