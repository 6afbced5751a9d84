"""tinygemm speed: `python -m any4lib.bench.kernels` (needs a CUDA device).

Per Llama shape and m, the median microseconds of cuBLAS bf16 (F.linear), PyTorch's int4 tinygemm
(torch._weight_int4pack_mm) and ours (int4, any4, nf4 at g128; MX-FP4 at its g32), the effective bandwidth
(weight + activation + output bytes over time) and its fraction of a measured device-to-device copy.
Each method runs back to back inside a CUDA graph over enough weight copies that L2 (50 MB) cannot hold them.
Ours are launched without programmatic dependent launch (ANY4_TINYGEMM_PDL=0 unless set): copies of one GEMM back
to back would overlap each one's start with the previous one's end, which no decode step offers (a GEMM there
follows a norm or attention kernel), and no other method gets.
Writes results/kernels/kernels_<device>.csv with provenance columns. `--bnb` adds bitsandbytes' nf4 / fp4 matmul_4bit
and the same codes converted to tinygemm (any4lib.bnb). `--prefill M`: the same shapes at M rows, where
`linear` runs the dequantize kernel and cuBLAS (kernels_prefill_<device>.csv).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.random_weights import random_quantized
from ..kernels import PackedWeight, linear, load_kernels
from ..peers import TorchInt4Linear
from ..provenance import git_state

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
ROWS = [1, 2, 4, 8, 16]
OURS = [("int4", 128), ("any4", 128), ("nf4", 128), ("mxfp4", 32)]
ROTATE_BYTES = 400e6  # weight bytes cycled through per timing: 8x the L2
CALLS_PER_GRAPH = 40


def time_us(fn, calls: int, replays: int = 15) -> float:
    """Median microseconds per call of fn(i) for i in range(calls), captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up: builds, cuBLAS handles, workspaces
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def time_us_eager(fn, calls: int = 3) -> float:
    """Mean microseconds per call of fn(i), launched eagerly: for code that cannot be captured in a CUDA graph."""
    fn(0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the best of 256 MiB and 1 GiB buffers."""
    best = 0.0
    for size in (2**28, 2**30):
        src = torch.empty(size, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        best = max(best, 2 * size / (time_us(lambda i: dst.copy_(src), calls=5) * 1e-6))
        del src, dst
    return best


def _clones(weight, nbytes: int) -> list:
    """weight plus enough fresh copies of its tensors that cycling through them reads ROTATE_BYTES."""
    def clone(w):
        if isinstance(w, PackedWeight):
            return replace(w, **{name: t.clone() for name, t in w.tensors().items()})
        return w.clone() if isinstance(w, torch.Tensor) else tuple(t.clone() for t in w)

    return [weight] + [clone(weight) for _ in range(max(2, math.ceil(ROTATE_BYTES / nbytes)) - 1)]


# The measured columns of every row (weight shape n x k, activation rows m, median microseconds, bytes moved, their
# rate and its share of the device's copy rate); the provenance columns follow them in the CSV. Readers (notebook
# 05) take the names from here.
COLUMNS = ("n", "k", "m", "method", "median_us", "bytes", "gbps", "fraction_of_copy")


def timing_row(n: int, k: int, m: int, method: str, us: float, weight_bytes: int, copy_bps: float) -> dict:
    """A result row: the bytes one call moves (weight + x + y in bf16) and their rate, also as a share of copy."""
    moved = weight_bytes + 2 * m * (k + n)
    values = (n, k, m, method, round(us, 2), moved, round(moved / us / 1e3, 1), round(moved / (us * 1e-6) / copy_bps, 3))
    return dict(zip(COLUMNS, values))


def bnb_methods(n: int, k: int) -> dict:
    """bitsandbytes' own 4-bit matmul (matmul_4bit, nf4 / fp4 in blocks of 64) and the very same codes converted to
    tinygemm (any4lib.bnb), as bench_shape's methods."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from ..bnb import quantized_from_bnb

    def clone(weight):
        packed, state = weight
        copied = copy.copy(state)
        copied.absmax = state.absmax.clone()
        return packed.clone(), copied

    methods = {}
    for quant_type in ("nf4", "fp4"):
        weight = bnbf.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64,
                                    quant_type=quant_type)
        nbytes = sum(t.numel() * t.element_size() for t in (weight[0], weight[1].absmax))
        copies = [weight] + [clone(weight) for _ in range(max(2, math.ceil(ROTATE_BYTES / nbytes)) - 1)]
        methods[f"bnb_{quant_type}"] = (copies, lambda x, w: bnb.matmul_4bit(x, w[0].t(), quant_state=w[1]), nbytes)
        ours = PackedWeight.from_quantized(quantized_from_bnb(*weight), torch.bfloat16)
        methods[f"ours_bnb_{quant_type}"] = (_clones(ours, ours.nbytes()), linear, ours.nbytes())
    return methods


def bench_shape(n: int, k: int, copy_bps: float, rows=ROWS, bnb: bool = False) -> list[dict]:
    results = []
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    methods = {"cublas_bf16": (_clones(dense, n * k * 2), lambda x, w: F.linear(x, w), n * k * 2)}
    del dense
    if bnb:
        methods |= bnb_methods(n, k)
    # Ours, and PyTorch's int4 on the very same int4 codes.
    for fmt, group_size in OURS:
        q = random_quantized(fmt, n, k, group_size)
        packed = PackedWeight.from_quantized(q, torch.bfloat16)
        methods[f"ours_{fmt}"] = (_clones(packed, packed.nbytes()), linear, packed.nbytes())
        if fmt == "int4":
            peer = TorchInt4Linear(q)
            tw = (peer.packed, peer.scales_zeros)
            nbytes = sum(t.numel() * t.element_size() for t in tw)
            methods["torch_int4"] = (
                _clones(tw, nbytes),
                lambda x, w, g=group_size: torch._weight_int4pack_mm(x, w[0], g, w[1]),
                nbytes,
            )
            x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
            exact = x.double() @ packed.dequantize(torch.float64).T
            for name, y in (("torch_int4", methods["torch_int4"][1](x, tw)), ("ours_int4", linear(x, packed))):
                err = ((y.double() - exact).norm() / exact.norm()).item()
                assert err < 1e-2, f"{name} disagrees with the float64 reference at {n}x{k}: {err:.2e}"
        del q

    for m in rows:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        for name, (weights, fn, nbytes) in methods.items():
            us = time_us(lambda i: fn(xs[i % len(xs)], weights[i % len(weights)]), CALLS_PER_GRAPH)
            results.append(timing_row(n, k, m, name, us, nbytes, copy_bps))
    for weights, _, _ in methods.values():
        weights.clear()
    torch.cuda.empty_cache()
    return results


def parse_variants(spec: str) -> dict[str, dict[str, str]]:
    """"a:TINYGEMM_STAGES=2,TINYGEMM_REPL=1;b:..." -> {"a": {"TINYGEMM_STAGES": "2", ...}, "b": ...}."""
    out = {}
    for part in filter(None, spec.split(";")):
        name, _, assignments = part.partition(":")
        out[name] = dict(a.split("=", 1) for a in filter(None, assignments.split(",")))
    return out


def bench_prefill(n: int, k: int, copy_bps: float, m: int) -> list[dict]:
    """Above 16 rows (prefill): cuBLAS bf16 against ours (the dequantize kernel, then cuBLAS), the dequantize kernel
    alone (m = 0: its bytes are the packed weight read and the dense one written) and the PyTorch unpacking that
    `linear` used before the kernel, on the same weights."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dense = _clones(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, n * k * 2)
    us = time_us(lambda i: F.linear(x, dense[i % len(dense)]), CALLS_PER_GRAPH, replays=5)
    results = [timing_row(n, k, m, "cublas_bf16", us, n * k * 2, copy_bps)]
    dense.clear()
    for fmt, group_size in OURS:
        packed = PackedWeight.from_quantized(random_quantized(fmt, n, k, group_size), torch.bfloat16)
        weights, nbytes = _clones(packed, packed.nbytes()), packed.nbytes()
        exact = x.double() @ packed.dequantize(torch.float64).T
        err = ((linear(x, packed).double() - exact).norm() / exact.norm()).item()
        assert err < 1e-2, f"ours_{fmt} at m = {m} disagrees with the float64 reference at {n}x{k}: {err:.2e}"
        ours = lambda i: linear(x, weights[i % len(weights)])  # noqa: E731
        dequantize = lambda i: weights[i % len(weights)].dequantize(torch.bfloat16)  # noqa: E731
        # (unpacking copies a small table to the GPU, which a CUDA graph cannot capture: timed eagerly)
        unpack = lambda i: F.linear(x, weights[i % len(weights)].unpack().dequantize(x.dtype))  # noqa: E731
        results += [
            timing_row(n, k, m, f"ours_{fmt}", time_us(ours, CALLS_PER_GRAPH, replays=5), nbytes, copy_bps),
            timing_row(n, k, 0, f"ours_{fmt}_dequantize", time_us(dequantize, CALLS_PER_GRAPH, replays=5),
                       nbytes + 2 * n * k, copy_bps),
            timing_row(n, k, m, f"pytorch_unpack_{fmt}", time_us_eager(unpack), nbytes, copy_bps),
        ]
        weights.clear()
    torch.cuda.empty_cache()
    return results


def bench_variants(n: int, k: int, copy_bps: float, rows, variants: dict, formats=("int4", "any4")) -> list[dict]:
    """Kernel variants of a TINYGEMM_TUNING build side by side (each picked by environment variables that the
    launcher reads at every launch): per m and format, each variant is checked against float64 and then timed, so
    all variants see the same weights, inputs and device state."""
    results = []
    for fmt in formats:
        q = random_quantized(fmt, n, k, 128)
        packed = PackedWeight.from_quantized(q, torch.bfloat16)
        del q
        weights = _clones(packed, packed.nbytes())
        weight64 = packed.dequantize(torch.float64)
        for m in rows:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            exact = xs[0].double() @ weight64.T
            for name, env in variants.items():
                saved = {key: os.environ.get(key) for key in env}
                os.environ.update(env)
                try:
                    y = linear(xs[0], packed)
                    err = ((y.double() - exact).norm() / exact.norm()).item()
                    finite = bool(torch.isfinite(y).all())
                    us = time_us(lambda i: linear(xs[i % len(xs)], weights[i % len(weights)]), CALLS_PER_GRAPH)
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
                row = timing_row(n, k, m, f"ours_{fmt}", us, packed.nbytes(), copy_bps)
                results.append(row | {"variant": name, "rel_err": f"{err:.2e}", "ok": finite and err < 1e-2})
                print(f"{n}x{k} m={m:>2} {fmt} {name:>10}: {us:8.2f} us  {100 * row['fraction_of_copy']:5.1f}% "
                      f"copy  err {err:.1e}{'' if results[-1]['ok'] else '  WRONG'}", flush=True)
        del weights, weight64
        torch.cuda.empty_cache()
    return results


def print_table(rows: list[dict]) -> None:
    names = ["cublas_bf16", "torch_int4", "ours_int4", "ours_any4", "ours_nf4", "ours_mxfp4"]
    by_key = {(r["n"], r["k"], r["m"], r["method"]): r for r in rows}
    print(f"{'n x k':>12} {'m':>3} " + " ".join(f"{n:>11}" for n in names)
          + "   any4/int4  cublas/any4  torch/any4  any4 %copy  int4 %copy")
    for n, k, m in sorted({(r["n"], r["k"], r["m"]) for r in rows}):
        get = lambda name: by_key[(n, k, m, name)]  # noqa: E731
        us = [get(name)["median_us"] for name in names]
        any4, int4 = get("ours_any4"), get("ours_int4")
        print(f"{f'{n}x{k}':>12} {m:>3} " + " ".join(f"{u:>11.2f}" for u in us)
              + f"   {any4['median_us'] / int4['median_us']:>9.2f}  {us[0] / any4['median_us']:>11.2f}"
              + f"  {us[1] / any4['median_us']:>10.2f}  {100 * any4['fraction_of_copy']:>9.1f}%"
              + f"  {100 * int4['fraction_of_copy']:>9.1f}%")
    for r in rows:  # --bnb: bitsandbytes' matmul_4bit and the same codes on tinygemm
        if "bnb_" in r["method"]:
            print(f"{r['n']}x{r['k']} m={r['m']:>2} {r['method']:<13} {r['median_us']:>8.2f} us")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernels"))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="e.g. 4096x4096,28672x8192")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="m values, e.g. 1,2,4,8,16")
    parser.add_argument("--prefill", type=int, default=0, help="time m = PREFILL rows instead (ours: dequantize "
                        "kernel + cuBLAS) against cuBLAS bf16 and the PyTorch unpacking (writes kernels_prefill_<device>.csv)")
    parser.add_argument("--bnb", action="store_true", help="also bitsandbytes' nf4 / fp4 matmul_4bit and the same "
                        "codes on tinygemm (bnb_*, ours_bnb_* rows)")
    parser.add_argument("--variants", default="", help="kernel variants of a TINYGEMM_TUNING build to compare, "
                        "e.g. 'base:;s2:TINYGEMM_STAGES=2' (writes kernels_variants_<device>.csv)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA device")
    os.environ.setdefault("ANY4_TINYGEMM_PDL", "0")  # see the module docstring; the binding reads it per call
    load_kernels()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows_m = [int(v) for v in args.rows.split(",")]
    copy_bps = copy_bandwidth()
    print(f"device-to-device copy: {copy_bps / 1e12:.2f} TB/s (read + write)")
    provenance = {
        "commit": git_state()["commit"],  # $ANY4_GIT_COMMIT names it on the device (its copy's .git is stale)
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "copy_tbps": round(copy_bps / 1e12, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    variants = parse_variants(args.variants) if args.variants else None
    kind = "kernels_variants" if variants else "kernels_prefill" if args.prefill else "kernels"
    path = args.out / f"{kind}_{provenance['device'].replace(' ', '_')}.csv"
    rows = []
    for n, k in shapes:
        if variants:
            rows += bench_variants(n, k, copy_bps, rows_m, variants)
        elif args.prefill:
            rows += bench_prefill(n, k, copy_bps, args.prefill)
        else:
            rows += bench_shape(n, k, copy_bps, rows_m, bnb=args.bnb)
        with path.open("w", newline="") as f:  # rewritten after each shape: a cut-off run keeps what it measured
            writer = csv.DictWriter(f, fieldnames=[*rows[0], *provenance])
            writer.writeheader()
            writer.writerows({**r, **provenance} for r in rows)
        print(f"done {n}x{k}", flush=True)
    if args.prefill:
        for r in rows:
            print(f"{r['n']}x{r['k']} m={r['m']:>4} {r['method']:<26} {r['median_us']:>10.1f} us  "
                  f"{100 * r['fraction_of_copy']:5.1f}% copy")
    elif not variants:
        print_table(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
