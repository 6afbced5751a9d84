"""The accuracy experiments: perplexity per (format, group size, calibration, dataset), stored one JSON each.

Notebooks and the CLI call `accuracy_records`; it computes only what the store lacks, so every table can be
stopped, resumed and re-run for free. `python -m any4lib.experiments accuracy --profile main` rebuilds the README's
tables on the reference model (see PROFILES).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from .calibration import ActivationStats, calibrate, calibration_inputs
from .evaluate import evaluate_perplexity, resolve_seq_len
from .formats import get_format
from .identity import model_identity, text_identity
from .model import bits_per_weight, load_model, quantize_model
from .nn import use_kernels
from .results import ResultStore, served_from_store
from .standins import standin_label

REPO_ROOT = Path(__file__).resolve().parents[1]
UNQUANTIZED = "bf16"
# Models whose reference numbers were measured at a shorter window than min(2048, max positions).
DEFAULT_SEQ_LEN = {"ref-en-16m": 512}
# First tokens of each set the ref-en-16m tables use (64 windows of 512), so all tables fit two hours of a shared
# 2-core CPU. Formats are compared on the same tokens, so their differences are much surer than the absolute ppl.
REF_TOKENS = 32768
# Tokens per forward call on the kernel path: decode-shaped calls (batch 1 x 16 rows) that tinygemm serves.
KERNEL_CHUNK = 16

COLUMNS = ["format", "method", "activations", "group_size", "calibration", "seed", "dataset", "ppl", "bits_per_weight",
           "seconds"]
FORMATS_MAIN = ["bf16", "int4", "fp4", "nf4", "any4", "int3", "any3", "int2", "any2", "mxfp4", "nvfp4"]
FORMATS_METHODS = ["int4", "nf4", "any4", "int3", "any3", "int2", "any2"]
METHOD_CALIBRATION = "wikitext2_valid:16"
METHODS = ["rtn", "gptq", "awq", "awq+gptq"]
WA_METHODS = ["rtn", "smoothquant", "rotate"]
# Weight-activation runs evaluate the first 8,192 tokens of each set (16 windows of 512): fake-quantizing every
# linear's input costs CPU time, and the sweep has to fit a shared 2-core machine. Settings compare on the same tokens.
WA_TOKENS = 8192
WA_COMMON = dict(group_sizes=[None], datasets=["heldout", "wikitext2", "ptb"], calibration=METHOD_CALIBRATION,
                 max_tokens=WA_TOKENS)
# In the order the sweep runs them: the cheap methods everywhere first, then the learned and GPTQ steps.
WA_PROFILES = ["wa_w4", "wa_w8", "wa_w3w2", "wa_w6", "wa_omniquant", "wa_gptq", "wa_w4a16", "wa_seeds"]
PROFILES = {
    "main": dict(formats=FORMATS_MAIN, group_sizes=[128], datasets=["heldout", "wikitext2", "ptb"]),
    # ref-en-16m's K is 384 (and 1024 for down_proj): no size above 128 divides both, so beyond 128 the sweep
    # ends at one group per row (None), the limit the paper's g = 256..1024 approach.
    "groups": dict(formats=["int4", "nf4", "fp4", "any4"], group_sizes=[32, 64, 128, None], datasets=["heldout"]),
    "calibration": dict(
        formats=["any4"], group_sizes=[128], datasets=["heldout"],
        calibration=["prompt", "heldout:64", "wikitext2_valid:64"],
    ),
    # On a GPU: the same 4-bit models through the tinygemm kernels and as fake-quant (issue 8: within 0.5%).
    "gpu_fake": dict(formats=["bf16", "int4", "nf4", "any4"], group_sizes=[128], datasets=["heldout"]),
    "gpu_kernels": dict(formats=["int4", "nf4", "any4"], group_sizes=[128], datasets=["heldout"], kernels=True),
    # k-means seed noise of the learned formats (seed 0 is in "main").
    "seeds": dict(formats=["any4", "any3", "any2"], group_sizes=[128], datasets=["heldout", "wikitext2", "ptb"],
                  seeds=[1, 2]),
    # Methods beyond round-to-nearest (any4lib.pipeline), every method calibrated on the same 16 windows of 512
    # tokens of WikiText-2's validation split (disjoint from every test set). Sized for a shared 2-core CPU (57 min
    # for the two, measured): "methods" is seed 0 of everything, so a stopped sweep has whole rows first;
    # "methods_seeds" adds the k-means seed spread of the learned formats (seeds 1 and 2).
    "methods": dict(formats=FORMATS_METHODS, methods=METHODS, group_sizes=[128], datasets=["heldout", "wikitext2", "ptb"],
                    calibration=METHOD_CALIBRATION),
    "methods_seeds": dict(formats=[f for f in FORMATS_METHODS if get_format(f).learned], methods=METHODS,
                          group_sizes=[128], datasets=["heldout", "wikitext2", "ptb"], calibration=METHOD_CALIBRATION,
                          seeds=[1, 2]),
    # Weight-activation quantization (issue 33), ABQ-LLM's settings: per-channel weights (one group per row, as
    # integer GEMMs need), per-token dynamic asymmetric activations, every method calibrated on METHOD_CALIBRATION.
    # One profile per weight width so each is a product of formats x activations; WA_PROFILES runs them in order.
    "wa_w4": dict(formats=["int4", "any4"], activations=["int4", "int8", "int6"], methods=WA_METHODS, **WA_COMMON),
    "wa_w8": dict(formats=["bf16", "int8"], activations=["int8"], methods=WA_METHODS, **WA_COMMON),
    "wa_w3w2": dict(formats=["int3", "any3", "int2", "any2"], activations=["int8"], methods=["rtn", "rotate"],
                    **WA_COMMON),
    "wa_w6": dict(formats=["int6"], activations=["int6"], methods=WA_METHODS, **WA_COMMON),
    # The learned steps (LWC + LET) and GPTQ after rotation where they matter most, W4A4; LWC + LET with 5 epochs,
    # not OmniQuant's 20 (CPU time).
    "wa_omniquant": dict(formats=["int4", "any4"], activations=["int4"], methods=["omniquant"],
                         method_options={"omniquant_epochs": 5}, **WA_COMMON),
    "wa_gptq": dict(formats=["int4", "any4"], activations=["int4"], methods=["rotate+gptq"], **WA_COMMON),
    # k-means seeds 1 and 2 of any4 at W4A4 (seed 0 is in the profiles above): the noise bar of its cells.
    "wa_seeds": dict(formats=["any4"], activations=["int4"], methods=["rtn", "rotate", "rotate+gptq"], seeds=[1, 2],
                     **WA_COMMON),
    # The same weights with unquantized activations: what the activation quantizer costs.
    "wa_w4a16": dict(formats=["int4", "any4"], activations=[None], methods=["rtn", "rotate"], **WA_COMMON),
    # The whole held-out set, to check the pipeline against the model's published baseline (ppl 56.1).
    "bf16_full": dict(formats=["bf16"], group_sizes=[128], datasets=["heldout"], max_tokens=None),
}


def tiny_model(seed: int = 0, hidden: int = 128, layers: int = 2):
    """(LlamaForCausalLM, tokenizer): a random tiny Llama (GQA, every K a multiple of 128) and a byte-level
    tokenizer, both built in-process with no download. For tests and notebooks' smoke profile."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(byte_chars))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", model_max_length=256)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


def _load(model: str, dtype: torch.dtype, device: str):
    if model == "tiny":
        net, tokenizer = tiny_model()
        return net.to(device=device, dtype=dtype), tokenizer
    net, tokenizer = load_model(model, dtype=torch.bfloat16, device=device)  # the weights as released
    # Only upcasts: .to() also casts buffers, and bf16 would round RoPE's float32 inverse frequencies.
    return (net if dtype == torch.bfloat16 else net.to(dtype)), tokenizer


def default_seq_len(model: str, net) -> int:
    """The evaluation length of `model` (a name, as accuracy_records takes it) loaded as `net`: DEFAULT_SEQ_LEN's
    entry, else min(2048, its max positions)."""
    return resolve_seq_len(net, DEFAULT_SEQ_LEN.get(model))


def calibration_stats(net, tokenizer, calibration: str) -> ActivationStats | None:
    """"prompt" (the paper's one prompt), "<set>:<N>" (N windows of a text set, each of the model's context up to
    2048 tokens), "<set>:<N>x<L>" (N windows of L tokens, e.g. "c4_train:128x4096"), "none"; a "@online" suffix
    asks for online calibration. The calibration's windows never depend on the evaluation's."""
    spec, mode = parse_calibration(calibration)
    if spec is None:
        return None
    return calibrate(net, tokenizer, **spec, mode=mode, progress=False)


def calibration_windows(tokenizer, calibration: str, config) -> list[torch.Tensor]:
    """The token windows of calibration spec `calibration` (as calibration_stats) for a model of `config`, without
    the model: what layer-by-layer quantization (any4lib.streaming) calibrates on."""
    spec, _ = parse_calibration(calibration)
    if spec is None:
        raise ValueError("layer-by-layer quantization needs calibration windows: use 'prompt' or '<set>:<N>'")
    seq_len = spec.pop("seq_len", None) or min(2048, getattr(config, "max_position_embeddings", 2048))
    return calibration_inputs(tokenizer, seq_len=seq_len, **spec)[0]


def parse_calibration(calibration: str) -> tuple[dict | None, str]:
    """(calibrate's data arguments, or None for "none"; mode) of a calibration spec (see calibration_stats)."""
    spec, _, mode = calibration.partition("@")
    mode = mode or "offline"
    if spec == "none":
        return None, mode
    if spec == "prompt":
        return {}, mode
    dataset, _, size = spec.rpartition(":")
    n, _, length = size.partition("x")
    if not dataset or not n.isdigit() or not (length.isdigit() or not length):
        raise ValueError(f"calibration {calibration!r}: use 'prompt', 'none', '<set>:<N>' or '<set>:<N>x<L>' "
                         "(e.g. 'heldout:128', 'c4_train:128x2048')")
    return {"dataset": dataset, "n_samples": int(n), "seq_len": int(length) if length else None}, mode


def method_calibration(calibration: str, method: str) -> str:
    """The calibration spec a method needs: methods other than rtn run on the token windows, which online
    calibration keeps."""
    return calibration if method == "rtn" else calibration.partition("@")[0] + "@online"


def _config(model, fmt, group_size, calibration, dataset, seq_len, max_tokens, device, dtype, kernels, seed,
            identity, method="rtn", activations=None, method_options=None) -> dict:
    if fmt == UNQUANTIZED:
        group_size, calibration = None, "none"
    config = {
        "task": "perplexity", "model": model, "format": fmt, "group_size": group_size, "calibration": calibration,
        "dataset": dataset, "seq_len": seq_len, "max_tokens": max_tokens, "device": torch.device(device).type,
        "dtype": str(dtype).removeprefix("torch."), "identity": identity,
    }
    # Keys only where they are not the default, so earlier records keep the keys they were stored under.
    label = standin_label(model)
    if label:  # random weights: the record says its ppl is no accuracy
        config["standin"] = label["name"]
    if kernels:
        config["path"] = f"tinygemm, {KERNEL_CHUNK}-token chunks"
    if seed:
        config["seed"] = seed
    if method != "rtn" and fmt != UNQUANTIZED:
        config["method"] = method
    if activations is not None:
        config["activations"] = activations
    if method_options and method != "rtn" and fmt != UNQUANTIZED:
        config["method_options"] = dict(sorted(method_options.items()))
    return config


def accuracy_records(
    model: str,
    formats: list[str],
    group_sizes: list[int | None] = [128],
    datasets: list[str] = ["heldout", "wikitext2", "ptb"],
    calibration: str | list[str] = "prompt",
    seq_len: int | None = None,
    max_tokens: int | None = None,
    device: str = "cpu",
    store: str | Path = "results/accuracy",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    kernels: bool = False,
    seeds: tuple[int, ...] | list[int] = (0,),
    recompute: bool = False,
    methods: list[str] = ["rtn"],
    activations: list[str | None] = [None],
    method_options: dict | None = None,
):
    """One row per (format, method, group_size, calibration, dataset): ppl, bits_per_weight, seconds (of that
    evaluation).

    model: a name under data_root()/models ("ref-en-16m"), a path, a hub id, or "tiny" (tiny_model()).
    format "bf16" is the unquantized model (its group_size and calibration read None / "none").
    seq_len: None -> DEFAULT_SEQ_LEN for the model, else min(2048, its max positions). max_tokens caps the tokens
    read from each set (quick profiles). dtype: compute dtype, float32 on CPU (bf16 matmuls are slow there) and
    bfloat16 on CUDA by default. store: the results folder; a relative path is taken from the checkout root.
    kernels: run the quantized layers through the tinygemm kernels (CUDA), feeding each window KERNEL_CHUNK
    tokens at a time; otherwise they multiply by the dequantized weight (fake-quant). seeds: k-means seeds of the
    learned formats (one row per seed; other formats run once). methods: quantize_model's methods ("rtn", "gptq",
    "awq", "awq+gptq"); all but rtn calibrate online, on the token windows of `calibration`. activations: the
    activation formats of the quantized layers' inputs (any4lib.activations; None or "none": unquantized, A16);
    the unquantized model ("bf16") runs with unquantized activations only. method_options: quantize_model's, for
    every method but rtn (a key of the records where given).
    Computes what the store lacks (everything with recompute=True), reads the rest, and says in one line how many
    rows came from the store. Records are keyed by the content of the model and of each text (any4lib.identity).
    """
    from tqdm.auto import tqdm

    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
    store = ResultStore(store if Path(store).is_absolute() else REPO_ROOT / store)
    model_id = model_identity(model)
    identities = {d: {"model": model_id, "data": text_identity(d)} for d in datasets}
    calibrations = [calibration] if isinstance(calibration, str) else list(calibration)
    base = tokenizer = None
    from .pipeline import parse_method

    from .activations import resolve_activations

    methods = [parse_method(m) for m in methods]
    activations = list(dict.fromkeys(resolve_activations(a) for a in activations))
    runs = [
        (f, m, a, g, c, seed)
        for f in formats for m in (methods if f != UNQUANTIZED else ["rtn"])
        for a in (activations if f != UNQUANTIZED else [None]) for g in group_sizes for c in calibrations
        for seed in (seeds if f != UNQUANTIZED and get_format(f).learned else [0])
    ]
    rows, served, stats_cache = [], [], {}
    for fmt, method, acts, group_size, calib, seed in tqdm(runs, desc="accuracy", disable=not progress):
        if base is None:
            base, tokenizer = _load(model, dtype, device)
            seq_len = seq_len or default_seq_len(model, base)
        configs = {
            d: _config(model, fmt, group_size, calib, d, seq_len, max_tokens, device, dtype, kernels, seed,
                       identities[d], method, acts, method_options)
            for d in datasets
        }
        missing = [d for d, c in configs.items() if recompute or not store.has(c)]
        if missing:
            net, quantize_seconds = base, 0.0
            if fmt != UNQUANTIZED:
                source = method_calibration(calib, method)
                if source not in stats_cache:
                    stats_cache[source] = calibration_stats(base, tokenizer, source)
                start = time.perf_counter()
                options = {"seed": seed} if get_format(fmt).learned else {}
                net = quantize_model(copy.deepcopy(base), fmt, group_size, stats_cache[source], progress=False,
                                     method=method, activations=acts,
                                     method_options=method_options if method != "rtn" else None, **options)
                quantize_seconds = time.perf_counter() - start
                use_kernels(net, kernels)
            chunking = {"batch_size": 1, "chunk": KERNEL_CHUNK} if kernels else {}
            for dataset in missing:
                start = time.perf_counter()
                result = evaluate_perplexity(
                    net, tokenizer, dataset, seq_len, max_tokens, progress=progress, dtype=dtype, **chunking
                )
                metrics = {
                    "ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
                    "bits_per_weight": bits_per_weight(net), "seconds": time.perf_counter() - start,
                    "quantize_seconds": quantize_seconds,
                }
                store.put(configs[dataset], metrics, device)
        for dataset, config in configs.items():
            record = store.get(config)
            rows.append(_row(record))
            if dataset not in missing:
                served.append(record)
    if served:
        print(f"{len(served)} of {len(rows)} rows {served_from_store(served)}", file=sys.stderr)
    return _frame(rows)



def generation_records(
    model: str,
    formats: list[tuple[str, int | None]],
    prompts: list[str],
    new_tokens: int,
    device: str = "cpu",
    store: str | Path = "results/generation",
    recompute: bool = False,
):
    """One row per (format, prompt): the greedy continuation any4lib.generate gives on `model` quantized with each
    (format, group size) (round to nearest, no calibration; "bf16": unquantized) and its decode tokens/s. One record
    per format, keyed by the model's content, the prompts and the device, so a rerun reads what was measured (the
    notebook's table stays byte for byte the same) unless recompute=True."""
    import pandas as pd

    from .engine.generate import generate

    store = ResultStore(store if Path(store).is_absolute() else REPO_ROOT / store)
    identity = model_identity(model)
    rows, served = [], []
    for fmt, group_size in formats:
        config = {"task": "generation", "model": model, "identity": {"model": identity}, "format": fmt,
                  "group_size": group_size, "prompts": list(prompts), "new_tokens": new_tokens,
                  "device": torch.device(device).type}
        record = None if recompute else store.get(config)
        if record is None:
            net, tokenizer = _load(model, torch.bfloat16, device)
            if fmt != UNQUANTIZED:
                quantize_model(net, fmt, group_size, progress=False)
            out = generate(net, tokenizer, list(prompts), new_tokens, eos=False)
            record = store.put(config, {"texts": out.texts, "decode_tok_s": out.timing["decode_tok_s"]}, device)
        else:
            served.append(record)
        rows += [{"format": fmt, "prompt": prompt, "continuation": text.replace("\n", " "),
                  "decode_tok_s": record["metrics"]["decode_tok_s"]}
                 for prompt, text in zip(prompts, record["metrics"]["texts"])]
    if served:
        print(f"{len(served)} of {len(formats)} formats {served_from_store(served)}", file=sys.stderr)
    return pd.DataFrame(rows).set_index(["format", "prompt"])


def _row(record: dict) -> dict:
    config = record["config"]
    row = {k: config[k] for k in ("format", "group_size", "calibration", "dataset")} | {"seed": config.get("seed", 0)}
    row["method"] = config.get("method", "rtn")
    row["activations"] = config.get("activations", "none")
    return row | {k: record["metrics"][k] for k in ("ppl", "bits_per_weight", "seconds")}


def _frame(rows: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["group_size"] = frame["group_size"].astype("Int64")  # None (bf16, per-row) stays missing, not NaN float
    return frame


def read_store(store: str | Path = "results/accuracy", **match):
    """Every stored perplexity record (whose config matches `match`, e.g. model="ref-en-16m") as accuracy_records'
    rows plus the config's model, seq_len and max_tokens; computes nothing."""
    store = ResultStore(store if Path(store).is_absolute() else REPO_ROOT / store)
    rows = [
        _row(r) | {k: r["config"][k] for k in ("model", "seq_len", "max_tokens")}
        for r in store.find(task="perplexity", **match)
    ]
    frame = _frame(rows)
    for extra in ("model", "seq_len", "max_tokens"):
        frame[extra] = [row[extra] for row in rows]
    return frame


def run_profile(name: str, model: str = "ref-en-16m", **overrides):
    """The records of one PROFILES entry on `model` (max_tokens REF_TOKENS unless the profile or caller says)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    settings = {"max_tokens": REF_TOKENS} | PROFILES[name] | overrides
    return accuracy_records(model, **settings)


def pivot(frame, columns: str = "dataset"):
    """A table of perplexities: rows (format, group size, calibration, seed), one column per `columns` value."""
    index = [c for c in ("format", "method", "activations", "group_size", "calibration", "seed", "dataset")
             if c != columns]
    if frame.duplicated(index + [columns]).any():
        raise ValueError("several records per cell (e.g. different max_tokens or seq_len): filter the frame first")
    table = frame.pivot_table(index=index, columns=columns, values="ppl", sort=False, dropna=False)
    return table.dropna(how="all")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m any4lib.experiments", description=__doc__)
    parser.add_argument("what", choices=["accuracy"])
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append", help="default: main, groups, calibration")
    parser.add_argument("--model", default="ref-en-16m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=REF_TOKENS, help="tokens per set (0: whole set)")
    args = parser.parse_args(argv)
    for name in args.profile or ["main", "groups", "calibration"]:
        frame = run_profile(name, args.model, device=args.device, **(
            {} if "max_tokens" in PROFILES[name] else {"max_tokens": args.max_tokens or None}
        ))
        print(f"\n## {name}\n")
        print(pivot(frame).to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
