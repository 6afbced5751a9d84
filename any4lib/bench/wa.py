"""Weight-activation GEMM speed: `python -m any4lib.bench.wa` (needs a CUDA device; FP8 needs compute 8.9+).

Per Llama-3-8B linear shape (q/k/v and gate/up fused) and m = 1..4096 rows, the median microseconds of cuBLAS bf16
(F.linear) and of any4lib.wa_matmul's two paths, each as the GEMM alone (operands already quantized:
torch._int_mm + the int32 -> bf16 rescale; torch._scaled_mm with row-wise scales) and as QuantLinear runs it
(the per-token activation quantization included), with the speed-up over bf16 beside each. Timed in CUDA graphs
(any4lib.bench.kernels.time_us). Writes results/wa_gemm/wa_gemm_<device>.csv with provenance columns.
"""

from __future__ import annotations

import argparse
import csv
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from ..provenance import git_state
from ..quant import quantize
from ..wa_matmul import linear, prepare
from .kernels import time_us

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
CALLS = 20
VARIANTS = ("int8_gemm", "int8_path", "fp8_gemm", "fp8_path")


def measure(n: int, k: int, m: int, fp8: bool) -> dict[str, float]:
    """Microseconds per call of bf16 and each variant at one shape and row count."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    int8 = prepare(quantize(w, "int8_sym", None), "int8_sym")
    times = {"bf16": time_us(lambda i: F.linear(x, w), CALLS)}
    a_int8 = torch.randint(-127, 128, (max(m, 17), k), device="cuda", dtype=torch.int8)
    a_scale = torch.rand(max(m, 17), 1, device="cuda")
    times["int8_gemm"] = time_us(
        lambda i: (torch._int_mm(a_int8, int8.values.t()).float() * a_scale * int8.scale).to(torch.bfloat16), CALLS)
    times["int8_path"] = time_us(lambda i: linear(x, int8), CALLS)
    if fp8:
        weight = prepare(quantize(w, "int4_sym", None), "fp8_e4m3")
        rows = -(-m // 16) * 16
        a_fp8 = torch.randn(rows, k, device="cuda").to(torch.float8_e4m3fn)
        scale_a = torch.rand(rows, 1, device="cuda")
        times["fp8_gemm"] = time_us(lambda i: torch._scaled_mm(
            a_fp8, weight.values.t(), scale_a=scale_a, scale_b=weight.scale[None], out_dtype=torch.bfloat16), CALLS)
        times["fp8_path"] = time_us(lambda i: linear(x, weight), CALLS)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m any4lib.bench.wa", description=__doc__)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated m values")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK, comma-separated")
    parser.add_argument("--out", default="results/wa_gemm", help="folder of the CSV")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m any4lib.bench.wa needs a CUDA device")
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    device = torch.cuda.get_device_name()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    state = git_state()
    stamp = {"device": device, "torch": torch.__version__, "git_commit": state["commit"], "git_dirty": state["dirty"],
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    variants = [v for v in VARIANTS if fp8 or not v.startswith("fp8")]
    print(f"{'N x K':>12} {'m':>5} {'bf16 us':>9} " + " ".join(f"{v + ' us (x)':>21}" for v in variants))
    results = []
    for n, k in shapes:
        for m in rows:
            times = measure(n, k, m, fp8)
            cells = " ".join(f"{times[v]:11.1f} ({times['bf16'] / times[v]:5.2f}x)" for v in variants)
            print(f"{n:>6}x{k:<5} {m:>5} {times['bf16']:9.1f} {cells}", flush=True)
            results.append({"n": n, "k": k, "m": m} | {f"{v}_us": times[v] for v in times} | stamp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"wa_gemm_{device.replace(' ', '_')}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
