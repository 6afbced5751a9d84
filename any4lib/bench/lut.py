"""How fast any4 learns its LUTs: our batched k-means against the original per-row scikit-learn k-means.

    python -m any4lib.bench.lut                      # 4096x4096 and 14336x4096 on the CPU
    python -m any4lib.bench.lut --device cuda        # the same on a GPU

The original method runs scikit-learn's KMeans once per output row. We time it on a sample of rows and extrapolate
to the whole matrix (its cost is linear in rows), then quantize the whole matrix with `quantize(w, "any4")` and
print both, their ratio, and the two k-means objectives on the sampled rows (ours / scikit-learn's). Run it on an
otherwise idle machine: scikit-learn's OpenMP threads slow down many times over when the cores are shared.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..formats import _min_max_normalise
from .. import native
from ..kmeans import kmeans_1d
from ..provenance import provenance
from ..quant import quantize
from ..results import write_json_atomic


def _sklearn_rows(x: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[float, float]:
    """Seconds per row and mean objective of scikit-learn's KMeans (k-means++, one init) on each row."""
    from sklearn.cluster import KMeans

    start, total = time.perf_counter(), 0.0
    for row, w in zip(x.double().numpy(), weight.double().numpy()):
        total += KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=0).fit(row[:, None], sample_weight=w).inertia_
    return (time.perf_counter() - start) / len(x), total / len(x)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_shape(n: int, k: int, bits: int, group_size: int, sample_rows: int, device: torch.device) -> dict:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    activation = torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.1  # calibration-like weights
    # The rows exactly as quantize() clusters them: group-normalised, weighted by activation x group scale.
    sample = w[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:sample_rows]]
    x, scale, _ = _min_max_normalise(sample.reshape(sample_rows, k // group_size, group_size), bits)
    x, weight = x.reshape(sample_rows, k), (scale * activation.reshape(k // group_size, group_size)).reshape(sample_rows, k)
    sklearn_per_row, sklearn_objective = _sklearn_rows(x, weight, 2**bits)
    ours_objective = kmeans_1d(x.to(device), 2**bits, weight.to(device)).inertia.mean().item()

    w_dev, act_dev = w.to(device), activation.to(device)
    run = lambda rows=n: quantize(w_dev[:rows], f"any{bits}", group_size, sample_weight=act_dev)  # noqa: E731
    # Warm-up outside the timing: a GPU's first call allocates; a CPU's first call builds the compiled k-means.
    _timed(run if device.type == "cuda" else lambda: run(64), device)
    seconds = _timed(run, device)
    sklearn_seconds = sklearn_per_row * n
    return {
        "shape": f"{n}x{k}", "bits": bits, "group_size": group_size, "device": str(device),
        "kmeans": "tensor" if device.type == "cuda" or native.kmeans_module() is None else "compiled", "seconds": seconds,
        "sklearn_seconds_per_row": sklearn_per_row, "sklearn_rows_timed": sample_rows,
        "sklearn_seconds_extrapolated": sklearn_seconds, "speedup": sklearn_seconds / seconds,
        "objective_ratio": ours_objective / sklearn_objective,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x4096,14336x4096", help="comma-separated NxK")
    parser.add_argument("--bits", type=int, default=4, choices=[2, 3, 4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sample-rows", type=int, default=32, help="rows timed with scikit-learn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/lut", help="folder for the JSON record ('' to skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    print(f"{'shape':>11} {'ours s':>9} {'sklearn s (extrap.)':>20} {'speedup':>8} {'objective ours/sk':>18}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.lower().split("x"))
        r = bench_shape(n, k, args.bits, args.group_size, args.sample_rows, device)
        rows.append(r)
        print(f"{r['shape']:>11} {r['seconds']:9.2f} {r['sklearn_seconds_extrapolated']:20.1f} "
              f"{r['speedup']:7.0f}x {r['objective_ratio']:18.4f}", flush=True)
    if args.out:
        path = Path(args.out) / f"any{args.bits}_{device.type}.json"
        write_json_atomic(path, {"rows": rows, "threads": torch.get_num_threads(), "provenance": provenance(args.device)})
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
