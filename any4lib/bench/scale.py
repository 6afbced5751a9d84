"""Paper scale: the time and peak memory of each pipeline stage on one model, one results record per run.

    python -m any4lib.bench.scale --model llama-3-8b-standin --device cuda     # stand-ins: scripts/make_standins.py
    python -m any4lib.bench.scale --model llama-3-70b --sequential --device cuda   # generated layer by layer
    python -m any4lib.bench.scale --model llama-3-8b-standin --sequential --memory-cap-gb 12 --device cuda

Stages, each timed (CUDA synchronised) with the peak GPU memory allocated while it ran: load (bf16 from the model's
folder onto the device), calibrate, quantize, save, load_quantized, perplexity (a few windows of `--dataset`, fed
16 tokens at a time through the KV cache: on CUDA the tinygemm kernels). Then the quantize time of each of
`--formats` on a copy of the bf16 model. The record goes to results/scale/<key>.json with provenance; a
configuration already stored is skipped. Stand-ins (config field `any4_standin`) are labelled as such in the
record: their perplexity measures the machinery, never accuracy.

--sequential quantizes layer by layer instead (any4lib.streaming: one decoder layer in bf16 on the device at a
time, calibrated on the quantized layers' outputs), from the model's shards or, for a stand-in name such as
llama-3-70b, from weights generated on the device per layer; stages quantize_by_layer (read + calibrate + quantize,
the shards written as it goes unless --no-save), load_quantized, perplexity. --method gptq / awq / awq+gptq runs that
method in each layer (GPTQ's paper calibrates on 128 x 2048 tokens: --calibration heldout:128x2048). --memory-cap-gb caps the process's GPU
memory (torch.cuda.set_per_process_memory_fraction) and first records whether the in-memory path's bf16 load fits
under the same cap.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..evaluate import evaluate_perplexity
from ..experiments import KERNEL_CHUNK, REPO_ROOT, calibration_stats, calibration_windows
from ..checkpoint import load_quantized, save_quantized
from ..model import bits_per_weight, load_model, quantize_model, quantized_layers
from ..paths import resolve_model
from ..pipeline import parse_method
from ..results import ResultStore
from ..standins import STANDINS, StandinWeights, load_tokenizer, standin_config, standin_label
from ..streaming import as_weights, quantize_checkpoint

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


def run_sequential(model: str, fmt: str, group_size: int | None, calibration: str, dataset: str, seq_len: int,
                   windows: int, device: str, work_dir: Path, save: bool, memory_cap_gb: float | None,
                   progress: bool = False, method: str = "rtn") -> dict:
    """The metrics of one layer-by-layer run (see the module doc)."""
    stages, device, metrics = {}, torch.device(device), {}
    if memory_cap_gb is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()  # the call takes an index
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gb * 1e9 / total), index)
        metrics["in_memory_fits"] = _loads_in_memory(model, device)
    weights = StandinWeights(standin_config(model), device=device) if model in STANDINS else as_weights(model)
    tokenizer = load_tokenizer(None if model in STANDINS else resolve_model(model))
    calibration_ids = calibration_windows(tokenizer, calibration, weights.config)
    folder = work_dir / "quantized" if save else None
    with stage("quantize_by_layer", stages, device):
        net = quantize_checkpoint(weights, fmt, group_size, tokenizer=tokenizer, windows=calibration_ids,
                                  method=method, device=device, out=folder, progress=progress)  # fmt: skip
    metrics |= {"calibration_tokens": sum(w.numel() for w in calibration_ids), "bits_per_weight": bits_per_weight(net), "quantized_layers": len(quantized_layers(net))}
    if save:
        del net
        metrics["checkpoint_gb"] = round(_size(folder) / 1e9, 3)
        with stage("load_quantized", stages, device):
            net = load_quantized(folder, device)
    with stage("perplexity", stages, device):
        ppl = evaluate_perplexity(net, tokenizer, dataset, seq_len, windows * seq_len, batch_size=1,
                                  progress=False, chunk=KERNEL_CHUNK)  # fmt: skip
    return {"stages": stages, "ppl": ppl.ppl, "ppl_tokens": ppl.tokens, **metrics}


def _loads_in_memory(model: str, device: torch.device) -> bool:
    """Whether the whole bf16 model loads onto `device` (under the memory cap in force)."""
    try:
        net, _ = load_model(model, dtype=torch.bfloat16, device=str(device))
    except torch.cuda.OutOfMemoryError:
        fits = False
    else:
        fits = True
        del net
    gc.collect()
    torch.cuda.empty_cache()  # what the attempt held goes back before the layer-by-layer run
    return fits


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
    parser.add_argument("--sequential", action="store_true", help="quantize layer by layer (any4lib.streaming)")
    parser.add_argument("--method", default="rtn", help="--sequential: rtn, gptq, awq or awq+gptq")
    parser.add_argument("--no-save", dest="save", action="store_false", help="--sequential: write no shards")
    parser.add_argument("--memory-cap-gb", type=float, default=None, help="--sequential: cap the GPU memory")
    parser.add_argument("--progress", action="store_true", help="--sequential: a progress bar over the layers (its "
                        "per-layer rate stays in a log even when a time limit stops the run)")
    args = parser.parse_args(argv)
    if args.memory_cap_gb is not None and not (args.sequential and torch.device(args.device).type == "cuda"):
        parser.error("--memory-cap-gb needs --sequential and a CUDA --device")
    try:
        method = parse_method(args.method)
    except ValueError as err:
        parser.error(str(err))
    if method != "rtn" and not args.sequential:
        parser.error("--method needs --sequential (the in-memory run times round to nearest)")
    formats = [f for f in args.formats.split(",") if f]
    config = {
        "task": "scale", "model": args.model, "standin": standin_config(args.model).any4_standin if args.model in STANDINS else standin_label(args.model), "format": args.format,
        "group_size": args.group_size, "calibration": args.calibration, "dataset": args.dataset,
        "seq_len": args.seq_len, "windows": args.windows, "formats": formats, "device": torch.device(args.device).type,
    }
    if args.sequential:  # keys only where set, so earlier records keep the keys they were stored under
        config |= {"path": "layer by layer", "save": args.save, "memory_cap_gb": args.memory_cap_gb}
        config |= {"method": method} if method != "rtn" else {}
        config.pop("formats")
    store = ResultStore(Path(args.store) if Path(args.store).is_absolute() else REPO_ROOT / args.store)
    if not store.has(config):
        with tempfile.TemporaryDirectory(prefix="any4_scale_") as work_dir:
            if args.sequential:
                metrics = run_sequential(args.model, args.format, args.group_size, args.calibration, args.dataset,
                                         args.seq_len, args.windows, args.device, Path(work_dir), args.save,
                                         args.memory_cap_gb, args.progress, method)  # fmt: skip
            else:
                metrics = run(args.model, args.format, args.group_size, args.calibration, args.dataset, args.seq_len,
                              args.windows, formats, args.device, Path(work_dir))  # fmt: skip
        store.put(config, metrics, args.device)
    record = store.get(config)
    print(f"{store.path(config)}: {record['metrics']['stages']}")
    return record


if __name__ == "__main__":
    main()
