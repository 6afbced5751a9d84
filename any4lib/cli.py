"""`any4 quantize | eval | calibrate | analyze | accuracy`: the library's pipeline from the shell.

--model is a Hugging Face folder or hub id, a llama2.c checkpoint, a name under data_root()/models, or (eval,
analyze) a folder written by `any4 quantize`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def group_size_arg(text: str) -> int | None:
    """An int, or "row" / "none" for one group per output row."""
    if text.lower() in ("row", "none", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'row', got {text!r}") from None


def method_arg(text: str) -> str:
    from .pipeline import parse_method

    try:
        return parse_method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def csv_arg(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _load(args):
    """(model, tokenizer, quantized-by-this-command?) for --model, quantized with --format when given."""
    from .model import QUANT_CONFIG, load_model, load_quantized

    dtype = DTYPES[args.dtype]
    path = Path(args.model)
    if (path / QUANT_CONFIG).is_file():
        if getattr(args, "format", None):
            raise SystemExit(f"{path} is already quantized; drop --format or point --model at the original model")
        from transformers import AutoTokenizer

        return load_quantized(path, args.device).to(dtype), AutoTokenizer.from_pretrained(path)
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    if getattr(args, "format", None):
        _quantize(model, tokenizer, args)
    return model, tokenizer


def _quantize(model, tokenizer, args):
    """`model` quantized in place as --format, --group-size, --calibration, --method and --exclude ask."""
    from .experiments import calibration_stats, method_calibration
    from .model import quantize_model

    calibration = method_calibration(args.calibration, args.method)
    stats = calibration_stats(model, tokenizer, calibration, args.seq_len or 2048)
    return quantize_model(model, args.format, args.group_size, stats, exclude=args.exclude, method=args.method)


def cmd_quantize(args) -> None:
    from .model import save_quantized

    if not args.format:
        raise SystemExit("any4 quantize needs --format (e.g. --format any4)")
    if not args.out:
        raise SystemExit("any4 quantize needs --out FOLDER")
    model, tokenizer = _load(args)
    print(f"saved {save_quantized(model, args.out, tokenizer)}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate_perplexity
    from .results import ResultStore

    store = ResultStore(args.out or "results/eval")
    base = {"model": args.model, "format": args.format or "none", "group_size": args.group_size,
            "calibration": args.calibration, "dtype": args.dtype, "device": torch.device(args.device).type}
    todo = [{"task": "perplexity", "dataset": d, "seq_len": args.seq_len or 2048, "max_tokens": args.max_tokens}
            for d in args.datasets]
    todo += [{"task": "zeroshot", "dataset": t, "limit": args.limit} for t in args.tasks]
    todo = [base | item for item in todo]
    missing = [config for config in todo if not store.has(config)]
    if missing:
        model, tokenizer = _load(args)
        for config in missing:
            if config["task"] == "perplexity":
                r = evaluate_perplexity(model, tokenizer, config["dataset"], config["seq_len"], args.max_tokens)
                metrics = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len}
            else:
                from .zeroshot import evaluate_tasks

                metrics = evaluate_tasks(model, tokenizer, [config["dataset"]], data_dir=args.data_dir, limit=args.limit)
            store.put(config, metrics, args.device)
    for config in todo:
        record = store.get(config)
        print(json.dumps({"dataset": config["dataset"], **record["metrics"]}, default=str))


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .model import load_model

    if not args.out:
        raise SystemExit("any4 calibrate needs --out FILE.safetensors")
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    stats = calibrate(model, tokenizer, args.dataset, n_samples=args.n_samples, seq_len=args.seq_len, mode=args.mode)
    stats.save(args.out)
    print(f"saved statistics of {len(stats.names)} layers ({stats.source}, {stats.mode}) to {args.out}")


def cmd_analyze(args) -> None:
    import copy

    from .analyze import layer_report
    from .model import load_model

    if not args.format:
        raise SystemExit("any4 analyze needs --format (the format to analyze)")
    reference, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    quantized = _quantize(copy.deepcopy(reference), tokenizer, args)
    rows = layer_report(reference, quantized, tokenizer)
    print(f"{'layer':40} {'weight_rel':>10} {'output_rel':>10} {'isolated':>10}")
    for row in rows:
        print(f"{row['layer']:40} {row['weight_rel']:10.4f} {row['output_rel']:10.4f} {row['isolated_rel']:10.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def cmd_accuracy(args) -> None:
    from .experiments import main as experiments_main

    experiments_main(["accuracy", "--model", args.model, "--device", args.device]
                     + [flag for p in args.profile or [] for flag in ("--profile", p)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="any4", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True)
    common.add_argument("--device", default="cpu")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    common.add_argument("--seq-len", type=int, default=None)
    common.add_argument("--out", default=None)
    quant = argparse.ArgumentParser(add_help=False)
    quant.add_argument("--format", default=None, help="any4, int4, nf4, fp4, mxfp4, ... (any4lib.list_formats())")
    quant.add_argument("--group-size", type=group_size_arg, default=128, help="int, or 'row' for per-row")
    quant.add_argument("--calibration", default="prompt", help="'prompt', 'none' or '<set>:<N>' (+ '@online')")
    quant.add_argument("--method", type=method_arg, default="rtn",
                       help="rtn, gptq, awq or awq+gptq (the methods calibrate on --calibration's token windows)")
    quant.add_argument("--exclude", type=csv_arg, default=["lm_head"], help="layer name patterns to keep unquantized")

    commands.add_parser("quantize", parents=[common, quant], help="quantize and save").set_defaults(run=cmd_quantize)
    ev = commands.add_parser("eval", parents=[common, quant], help="perplexity and zero-shot tasks")
    ev.add_argument("--datasets", type=csv_arg, default=["wikitext2"], help="text sets or files, comma-separated")
    ev.add_argument("--tasks", type=csv_arg, default=[], help="zero-shot tasks, comma-separated")
    ev.add_argument("--data-dir", default=None, help="folder of local task files")
    ev.add_argument("--limit", type=int, default=None, help="examples per task")
    ev.add_argument("--max-tokens", type=int, default=None, help="tokens per text set")
    ev.set_defaults(run=cmd_eval)
    cal = commands.add_parser("calibrate", parents=[common], help="save activation statistics")
    cal.add_argument("--dataset", default=None, help="text set or file (default: the calibration prompt)")
    cal.add_argument("--n-samples", type=int, default=128)
    cal.add_argument("--mode", choices=["offline", "online"], default="offline")
    cal.set_defaults(run=cmd_calibrate)
    commands.add_parser("analyze", parents=[common, quant], help="per-layer error").set_defaults(run=cmd_analyze)
    acc = commands.add_parser("accuracy", help="the accuracy tables (any4lib.experiments)")
    acc.add_argument("--model", default="ref-en-16m")
    acc.add_argument("--device", default="cpu")
    acc.add_argument("--profile", action="append", help="main, groups, calibration, bf16_full")
    acc.set_defaults(run=cmd_accuracy)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"any4 {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
