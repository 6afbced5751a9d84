"""Paper scale: the time and peak memory of each pipeline stage on one model, one results record per run.

    python -m any4lib.bench.scale --model llama-3-8b-standin --device cuda     # stand-ins: scripts/make_standins.py

Stages, each timed (CUDA synchronised) with the peak GPU memory allocated while it ran: load (bf16 from the model's
folder onto the device), calibrate, quantize, save, load_quantized, perplexity (a few windows of `--dataset`, fed
16 tokens at a time through the KV cache: on CUDA the tinygemm kernels). Then the quantize time of each of
`--formats` on a copy of the bf16 model. The record goes to results/scale/<key>.json with provenance; a
configuration already stored is skipped. Stand-ins (config field `any4_standin`) are labelled as such in the
record: their perplexity measures the machinery, never accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..evaluate import evaluate_perplexity
from ..experiments import KERNEL_CHUNK, REPO_ROOT, calibration_stats
from ..model import bits_per_weight, load_model, load_quantized, quantize_model, quantized_layers, save_quantized
from ..results import ResultStore
from ..standins import standin_label

FOUR_BIT = ["int4", "nf4", "fp4", "mxfp4", "nvfp4"]


@contextmanager
def stage(name: str, stages: dict, device: torch.device):
    """Record the wall time and peak GPU memory (GB) of the block under stages[name]."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
    stages[name] = {
        "seconds": round(time.perf_counter() - start, 3),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if cuda else None,
    }
    print(f"{name:16} {stages[name]['seconds']:9.1f} s   peak GPU {stages[name]['peak_gpu_gb']} GB", flush=True)


def run(model: str, fmt: str, group_size: int | None, calibration: str, dataset: str, seq_len: int, windows: int,
        formats: list[str], device: str, work_dir: Path) -> dict:
    """The metrics of one scale run (see the module doc)."""
    stages, device = {}, torch.device(device)
    with stage("load", stages, device):
        net, tokenizer = load_model(model, dtype=torch.bfloat16, device=str(device))
    with stage("calibrate", stages, device):
        stats = calibration_stats(net, tokenizer, calibration)
    with stage("quantize", stages, device):
        quantize_model(net, fmt, group_size, stats, progress=False)
    folder = work_dir / "quantized"
    with stage("save", stages, device):
        save_quantized(net, folder, tokenizer)
    bits, layers = bits_per_weight(net), len(quantized_layers(net))
    del net
    with stage("load_quantized", stages, device):
        net = load_quantized(folder, device).to(torch.bfloat16)
    with stage("perplexity", stages, device):
        ppl = evaluate_perplexity(net, tokenizer, dataset, seq_len, windows * seq_len, batch_size=1,
                                  progress=False, chunk=KERNEL_CHUNK)  # fmt: skip
    del net
    quantize_seconds = {}
    for other in formats:  # each on a freshly loaded bf16 model, so no copy inflates the peaks above
        net, _ = load_model(model, dtype=torch.bfloat16, device=str(device))
        with stage(f"quantize {other}", stages, device):
            quantize_model(net, other, group_size, progress=False)
        quantize_seconds[other] = stages.pop(f"quantize {other}")
        del net
    return {
        "stages": stages, "quantize_other_formats": quantize_seconds, "ppl": ppl.ppl, "ppl_tokens": ppl.tokens,
        "bits_per_weight": bits, "quantized_layers": layers, "checkpoint_gb": round(_size(folder) / 1e9, 3),
    }


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m any4lib.bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="folder, name under $ANY4_DATA/models, or hub id")
    parser.add_argument("--format", default="any4")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration", default="prompt", help="as any4 quantize --calibration")
    parser.add_argument("--dataset", default="heldout")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows of --seq-len tokens")
    parser.add_argument("--formats", default=",".join(FOUR_BIT), help="formats whose quantize time is also taken")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--store", default="results/scale")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    config = {
        "task": "scale", "model": args.model, "standin": standin_label(args.model), "format": args.format,
        "group_size": args.group_size, "calibration": args.calibration, "dataset": args.dataset,
        "seq_len": args.seq_len, "windows": args.windows, "formats": formats, "device": torch.device(args.device).type,
    }
    store = ResultStore(Path(args.store) if Path(args.store).is_absolute() else REPO_ROOT / args.store)
    if not store.has(config):
        with tempfile.TemporaryDirectory(prefix="any4_scale_") as work_dir:
            metrics = run(args.model, args.format, args.group_size, args.calibration, args.dataset, args.seq_len,
                          args.windows, formats, args.device, Path(work_dir))  # fmt: skip
        store.put(config, metrics, args.device)
    record = store.get(config)
    print(f"{store.path(config)}: {record['metrics']['stages']}")
    return record


if __name__ == "__main__":
    main()
