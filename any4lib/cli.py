"""`any4 quantize | eval | calibrate | analyze | accuracy | generate`: the library's pipeline from the shell.

--model is a Hugging Face folder or hub id, a llama2.c checkpoint, a name under data_root()/models, or (eval,
analyze) a folder written by `any4 quantize`. --out is always the file or folder the command writes; --store is
the results store eval reads and fills. A failure prints one "any4 <command>: error: ..." line (--debug: the
traceback) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .checks import DTYPES, check_device


def group_size_arg(text: str) -> int | None:
    """An int >= 2, or "row" / "none" for one group per output row."""
    if text.lower() in ("row", "none", "-1"):
        return None
    try:
        return count_arg(2)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"group size must be an integer >= 2 or 'row', got {text!r}") from None


def method_arg(text: str) -> str:
    from .pipeline import parse_method

    try:
        return parse_method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_arg(text: str) -> str:
    """A format name as given (records keep the name they were asked by), checked against the registry now, before
    any model loads."""
    from .formats import get_format

    try:
        get_format(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def activations_arg(text: str) -> str | None:
    from .activations import resolve_activations

    try:
        return resolve_activations(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def csv_arg(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def count_arg(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def device_arg(text: str) -> str:
    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def compute_dtype(args) -> torch.dtype:
    """--dtype, or float32 on CPU and bf16 on CUDA."""
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.float32 if torch.device(args.device).type == "cpu" else torch.bfloat16


def _load(args):
    """(model, tokenizer, quantized-by-this-command?) for --model, quantized with --format when given."""
    from .checkpoint import load_quantized, read_quant_config
    from .model import load_model

    dtype = compute_dtype(args)
    path = Path(args.model)
    if read_quant_config(path) is not None:
        if getattr(args, "format", None):
            raise ValueError(f"{path} is already quantized; drop --format or point --model at the original model")
        from transformers import AutoTokenizer

        model = load_quantized(path, args.device, verify=not getattr(args, "no_verify", False))
        return model.to(dtype), AutoTokenizer.from_pretrained(path)
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    if getattr(args, "format", None):
        _quantize(model, tokenizer, args)
    return model, tokenizer


def _quantize(model, tokenizer, args):
    """`model` quantized in place as --format, --group-size, --calibration, --method and --exclude ask."""
    from .experiments import calibration_stats, method_calibration
    from .model import quantize_model

    calibration = method_calibration(args.calibration, args.method)
    stats = calibration_stats(model, tokenizer, calibration)
    return quantize_model(model, args.format, args.group_size, stats, exclude=args.exclude, method=args.method,
                          activations=args.activations)


def cmd_quantize(args) -> None:
    from .checkpoint import save_quantized

    if not args.format:
        raise ValueError("any4 quantize needs --format (e.g. --format any4)")
    if not args.out:
        raise ValueError("any4 quantize needs --out FOLDER")
    if args.sequential:
        if args.activations:
            raise ValueError("--sequential quantizes weights only: drop --activations, or quantize in memory")
        return _quantize_sequential(args)
    model, tokenizer = _load(args)
    print(f"saved {save_quantized(model, args.out, tokenizer)}")


def _quantize_sequential(args) -> None:
    """One decoder layer at a time from the checkpoint's shards, written to --out as it goes (any4lib.streaming)."""
    from transformers import AutoTokenizer

    from .experiments import calibration_windows
    from .paths import resolve_model
    from .streaming import as_weights, quantize_checkpoint

    weights = as_weights(args.model)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    windows = calibration_windows(tokenizer, args.calibration, weights.config)
    quantize_checkpoint(weights, args.format, args.group_size, tokenizer=tokenizer, windows=windows,
                        method=args.method, exclude=args.exclude, device=args.device, dtype=compute_dtype(args),
                        out=args.out)  # fmt: skip
    print(f"saved {args.out}")


def _saved_format(path: Path) -> tuple[str, int | None, str, str | None] | None:
    """(format, group size, method, activation format or None) of a folder written by `any4 quantize` ("a+b" where its layers differ), else
    None."""
    from .checkpoint import read_quant_config, saved_values

    quant = read_quant_config(path)
    if quant is None:
        return None
    formats, sizes, methods, activations = (
        sorted(saved_values(quant, key), key=str) for key in ("format", "group_size", "method", "activations")
    )
    activations = [a for a in activations if a not in (None, "none")]
    return ("+".join(formats) or "none", sizes[0] if len(sizes) == 1 else None, "+".join(methods) or "rtn",
            "+".join(activations) or None)


def cmd_eval(args) -> None:
    from .evaluate import evaluate_perplexity, resolve_seq_len
    from .identity import model_identity, text_identity
    from .results import ResultStore, served_from_store

    store = ResultStore(args.store)
    identity = model_identity(args.model)
    fmt, group_size, method, activations = (
        _saved_format(Path(args.model))
        or (args.format or "none", args.group_size, args.method if args.format else "rtn",
            args.activations if args.format else None))
    base = {"model": args.model, "format": fmt, "group_size": group_size,
            "method": method, "calibration": args.calibration, "dtype": str(compute_dtype(args)).removeprefix("torch."),
            "device": torch.device(args.device).type}
    if activations:  # only where set: weight-only records keep the keys they were stored under
        base["activations"] = activations
    todo = [{"task": "perplexity", "dataset": d, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
             "identity": {"model": identity, "data": text_identity(d)}} for d in args.datasets]
    shots = {"num_fewshot": args.num_fewshot} if args.num_fewshot else {}  # zero-shot records keep their keys
    todo += [{"task": "zeroshot", "dataset": t, "limit": args.limit, "identity": {"model": identity}} | shots
             for t in args.tasks]
    todo = [base | item for item in todo]
    missing = [config for config in todo if args.recompute or not store.has(config)]
    if missing:
        model, tokenizer = _load(args)
        for config in missing:
            if config["task"] == "perplexity":
                seq_len = resolve_seq_len(model, config["seq_len"])
                r = evaluate_perplexity(model, tokenizer, config["dataset"], seq_len, args.max_tokens)
                metrics = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len}
            else:
                from .zeroshot import evaluate_tasks

                metrics = evaluate_tasks(model, tokenizer, [config["dataset"]], data_dir=args.data_dir, limit=args.limit,
                                         num_fewshot=args.num_fewshot)
            store.put(config, metrics, args.device)
    for config in todo:
        record = store.get(config)
        source = "computed" if config in missing else served_from_store([record])
        if config not in missing:
            print(f"{config['dataset']}: {source}", file=sys.stderr)
        named = {k: config[k] for k in ("model", "format", "group_size", "method", "activations", "task", "dataset")
                 if k in config}
        print(json.dumps(named | record["metrics"] | {"source": source}, default=str))


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .model import load_model

    if not args.out:
        raise ValueError("any4 calibrate needs --out FILE.safetensors")
    model, tokenizer = load_model(args.model, dtype=compute_dtype(args), device=args.device)
    stats = calibrate(model, tokenizer, args.dataset, n_samples=args.n_samples, seq_len=args.seq_len, mode=args.mode)
    stats.save(args.out)
    print(f"saved statistics of {len(stats.names)} layers ({stats.source}, {stats.mode}) to {args.out}")


def cmd_analyze(args) -> None:
    import copy

    from .analyze import layer_report
    from .model import load_model

    if not args.format:
        raise ValueError("any4 analyze needs --format (the format to analyze)")
    reference, tokenizer = load_model(args.model, dtype=compute_dtype(args), device=args.device)
    quantized = _quantize(copy.deepcopy(reference), tokenizer, args)
    rows = layer_report(reference, quantized, tokenizer)
    print(f"{'layer':40} {'weight_rel':>10} {'output_rel':>10} {'isolated':>10}")
    for row in rows:
        print(f"{row['layer']:40} {row['weight_rel']:10.4f} {row['output_rel']:10.4f} {row['isolated_rel']:10.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def cmd_generate(args) -> None:
    from .engine.generate import generate

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("any4 generate needs --prompt TEXT (repeatable) or --prompts-file FILE")
    model, tokenizer = _load(args)
    stream = None
    if not args.no_stream:
        def stream(i, text):
            print(text if len(prompts) == 1 else f"[{i}] {text!r}", end="" if len(prompts) == 1 else "\n", flush=True)

        if len(prompts) == 1:
            print(prompts[0], end="", flush=True)
    out = generate(model, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_strings=args.stop or (), stream=stream,
                   compile=args.compile)
    print()
    for prompt, text in zip(prompts, out.texts):
        print(json.dumps({"prompt": prompt, "text": text}))
    timing = {k: None if math.isnan(v) else round(v, 4) for k, v in out.timing.items()}  # NaN: not measured (no GPU)
    print(json.dumps({"timing": timing}, allow_nan=False), file=sys.stderr)


def cmd_accuracy(args) -> None:
    from .experiments import main as experiments_main

    experiments_main(["accuracy", "--model", args.model, "--device", args.device]
                     + [flag for p in args.profile or [] for flag in ("--profile", p)])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help says it already or there is none to show."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .model import DEFAULT_EXCLUDE

    formatter = HelpFormatter
    parser = argparse.ArgumentParser(prog="any4", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on failure, show the full traceback")
    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    common.add_argument("--model", required=True,
                        help="HF folder or hub id, llama2.c .bin, a name under $ANY4_DATA/models, or a quantized folder")
    common.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    common.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    common.add_argument("--seq-len", type=count_arg(2), default=None,
                        help="tokens per window, at most the model's positions (default: min(2048, its positions))")
    quant = argparse.ArgumentParser(add_help=False)
    quant.add_argument("--format", type=format_arg, default=None, help="any4, int4, nf4, fp4, mxfp4, ... (any4lib.list_formats())")
    quant.add_argument("--group-size", type=group_size_arg, default=128, help="int >= 2 dividing K, or 'row' for per-row")
    quant.add_argument("--calibration", default="prompt",
                       help="'prompt', 'none', '<set>:<N>' or '<set>:<N>x<L>' (N windows of L tokens; + '@online')")
    quant.add_argument("--method", type=method_arg, default="rtn",
                       help="rtn, or steps joined by '+': gptq, awq, smoothquant, rotate, omniquant (e.g. awq+gptq, "
                            "rotate+gptq; the methods calibrate on --calibration's token windows)")
    quant.add_argument("--activations", type=activations_arg, default=None,
                       help="activation format of the quantized layers' inputs: none (default), int8, int8_sym, "
                            "int4, fp8_e4m3, mxfp8, mxfp4, nvfp4, ... (any4lib.activations)")
    quant.add_argument("--exclude", type=csv_arg, default=",".join(DEFAULT_EXCLUDE),
                       help="layer name patterns to keep unquantized (lm_head and MoE routers by default)")

    q = commands.add_parser("quantize", parents=[common, quant], help="quantize and save", formatter_class=formatter)
    q.add_argument("--out", default=None, help="folder to write the quantized model to (required)")
    q.add_argument("--sequential", action="store_true",
                   help="one decoder layer in memory at a time, read from the folder's safetensors shards and "
                        "calibrated on the quantized layers' outputs (for models larger than the device)")
    q.set_defaults(run=cmd_quantize)
    ev = commands.add_parser("eval", parents=[common, quant], help="perplexity and zero-shot tasks",
                             formatter_class=formatter)
    ev.add_argument("--datasets", type=csv_arg, default="wikitext2", help="text sets or files, comma-separated")
    ev.add_argument("--tasks", type=csv_arg, default="", help="zero-shot tasks, comma-separated (default: none)")
    ev.add_argument("--data-dir", default=None, help="folder of local task files")
    ev.add_argument("--limit", type=count_arg(1), default=None, help="examples per task (default: all)")
    ev.add_argument("--num-fewshot", type=count_arg(0), default=0, help="examples before each task question")
    ev.add_argument("--max-tokens", type=count_arg(2), default=None, help="tokens read per text set (default: all)")
    ev.add_argument("--store", default="results/eval", help="results store folder: stored configurations are read")
    ev.add_argument("--recompute", action="store_true", help="compute even what the store holds, and replace it")
    ev.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a quantized folder's files")
    ev.set_defaults(run=cmd_eval)
    cal = commands.add_parser("calibrate", parents=[common], help="save activation statistics", formatter_class=formatter)
    cal.add_argument("--dataset", default=None, help="text set or file (default: the calibration prompt)")
    cal.add_argument("--n-samples", type=count_arg(1), default=128, help="windows drawn from --dataset")
    cal.add_argument("--mode", choices=["offline", "online"], default="offline", help="see any4lib.calibrate")
    cal.add_argument("--out", default=None, help="the .safetensors file to write (required)")
    cal.set_defaults(run=cmd_calibrate)
    an = commands.add_parser("analyze", parents=[common, quant], help="per-layer error", formatter_class=formatter)
    an.add_argument("--out", default=None, help="JSON file to write the per-layer rows to (default: print only)")
    an.set_defaults(run=cmd_analyze)
    gen = commands.add_parser("generate", parents=[common, quant], help="generate text (streamed) on the engine",
                               formatter_class=formatter)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--prompts-file", default=None, help="a file of prompts, one a line")
    gen.add_argument("--max-new-tokens", type=count_arg(1), default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=count_arg(1), default=None, help="sample from the k likeliest tokens only")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set holding this probability")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler (sampling only)")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="print the texts at the end only")
    gen.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a quantized folder's files")
    gen.add_argument("--compile", default="auto", help="decode step: auto, blocks, reduce-overhead, cudagraph, none")
    gen.set_defaults(run=cmd_generate)
    acc = commands.add_parser("accuracy", parents=[debug], help="the accuracy tables (any4lib.experiments)",
                              formatter_class=formatter)
    acc.add_argument("--model", default="ref-en-16m", help="model name or path, as for the other commands")
    acc.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    acc.add_argument("--profile", action="append", help="main, groups, calibration, seeds, methods, "
                     "methods_seeds, wa_w4, wa_w8, wa_w3w2, wa_w6, wa_omniquant, wa_gptq, wa_w4a16, wa_seeds, bf16_full, "
                     "gpu_fake, gpu_kernels (any4lib.experiments.PROFILES; repeatable; default: main, groups, "
                     "calibration)")
    acc.set_defaults(run=cmd_accuracy)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"any4 {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
