"""Where one decode step's time goes: torch.profiler over compiled, not graphed, decode steps.

    python -m any4lib.bench.e2e --profile --formats bf16,any4,int4 --peers "" --batch 1 \
        --profile-variants separate+sdpa,fused+triton --profile-out results/e2e/profile/profile.csv

Each block runs through torch.compile as in the bench, but the step is launched eagerly so every kernel shows up
in the trace (inside a CUDA graph the profiler may see one graph launch). Each kernel is charged to the region
that launched it (a record_function around each block, the embedding, the final norm and lm_head; the rest is
`outside blocks`) and, inside blocks, to a category read off its name (inductor names its kernels after the aten
ops it fused). Kernel durations do not depend on how they were launched; the gaps between them do, so the same
model is then also timed as the bench times it (one CUDA graph per step): graphed ms/step minus the kernel sum
is the idle time left inside the graph.
"""

from __future__ import annotations

import csv
import gc
import gzip
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..engine.generate import compile_blocks, decode_step, generate_ids, graphed_step, prefill
from ..engine.random_weights import build_model, method, model_config
from ..engine.sampling import greedy

REGIONS = ("block", "embed", "final_norm", "lm_head")
# Library kernels, by name; first match wins (attention before GEMMs: attention kernels mention gemm-like words).
LIBRARY = (
    ("attention", r"split_kernel|combine_kernel|fmha|flash|attention|efficient|sdpa"),
    ("rmsnorm (+ residual add)", r"rms_norm"),
    ("gemm", r"tinygemm|gemv|gemm|nvjet|xmma|int4pack|splitk|cublas|kgemm|matmul|cutlass"),
    ("memset", r"memset"),
    ("memcpy", r"memcpy"),
)
# Inductor's kernels (triton_poi_/triton_red_/triton_per_fused_...) are named after every aten op they fuse,
# including the extern op their output feeds (e.g. `..._rsqrt_tinygemm_4bit_view`): these are never GEMMs or
# attention themselves, so they are told apart by their own ops.
INDUCTOR = (
    ("rmsnorm (+ residual add)", r"rsqrt|rms"),
    ("kv cache writes (+ rope k)", r"index_copy|index_put|scatter"),
    ("rope q", r"cat|neg"),
    ("silu * up", r"silu|sigmoid"),
    ("residual add", r"add"),
)


def classify(kernel: str) -> str:
    name = kernel.lower()
    table = INDUCTOR if name.startswith("triton_") and "fused" in name else LIBRARY
    for category, pattern in table:
        if re.search(pattern, name):
            return category
    return "other"


class Labelled(nn.Module):
    """Runs `inner` inside a profiler range named `label`, so its kernels can be charged to it."""

    def __init__(self, label: str, inner: nn.Module):
        super().__init__()
        self.label, self.inner = label, inner

    def forward(self, *args):
        with torch.profiler.record_function(self.label):
            return self.inner(*args)

    def add_and_norm(self, *args):  # the decoder calls its final norm (engine.model.RMSNorm) through this method
        with torch.profiler.record_function(self.label):
            return self.inner.add_and_norm(*args)


def _label(event) -> str:
    while event is not None:
        if event.name in REGIONS:
            return event.name
        event = event.cpu_parent
    return "outside blocks"


def kernel_times(prof) -> tuple[dict, float]:
    """{(region, kernel name): [calls, total us]} over the profiled steps, and every device event's total us."""
    from torch.autograd import DeviceType

    table: dict = defaultdict(lambda: [0, 0.0])
    device_total = 0.0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            if event.name not in REGIONS:  # the ranges' own device-side spans are no kernels
                device_total += event.time_range.elapsed_us()
            continue
        for kernel in getattr(event, "kernels", []):
            if kernel.name in REGIONS:
                continue
            cell = table[(_label(event), kernel.name)]
            cell[0] += 1
            cell[1] += kernel.duration
    return dict(table), device_total


def profile_one(config, meth, batch: int, fuse: bool, attention: str, prompt_len: int, new: int, device,
                seed: int = 0, steps: int = 6, trace: Path | None = None,
                compile: bool = True, norm: str = "triton", swiglu: str = "epilogue") -> tuple[dict, list[str]]:
    """Profile `steps` decode steps of one (method, layout, attention, norm, swiglu, batch); then time it as the bench
    does.
    Returns the CSV row and the text summary. compile=False (and a CPU device) is for smoke tests."""
    if new < 4 + steps:
        raise ValueError(f"--new {new} leaves no room for 3 warm-up and {steps} profiled steps in the cache")
    is_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    model, info = build_model(config, meth, device, seed=seed, reuse_budget_s=0.0, fuse=fuse, attention=attention,
                              norm=norm, swiglu=swiglu, progress=False)
    layers = len(model.model.layers)
    model.setup_caches(batch, prompt_len + new)
    if compile:
        compile_blocks(model)
    body = model.model
    for i, block in enumerate(body.layers):
        body.layers[i] = Labelled("block", block)
    body.embed_tokens = Labelled("embed", body.embed_tokens)
    body.norm = Labelled("final_norm", body.norm)
    model.lm_head = Labelled("lm_head", model.lm_head)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(seed))
    with torch.no_grad():
        model.set_padding(torch.zeros(batch, dtype=torch.long, device=device))
        token, pos = greedy(prefill(model, prompt)), torch.tensor([prompt_len], device=device)
        for _ in range(3):  # compiles
            token = decode_step(model, token, pos)
            pos += 1
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if is_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                token = decode_step(model, token, pos)
                pos += 1
            sync()
        # The bench's timing of the same model: one CUDA graph per step, new - 1 steps after the prompt.
        step = graphed_step(decode_step, model, batch, device) if is_cuda else decode_step
        generate_ids(model, prompt.tolist(), new, step=step)
        graphed_ms = generate_ids(model, prompt.tolist(), new, step=step).timing["decode_ms_per_step"]
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    table, device_total = kernel_times(prof)
    del model, step
    gc.collect()
    if is_cuda:
        torch.cuda.empty_cache()

    per_step = {key: (calls / steps, us / steps) for key, (calls, us) in table.items()}
    attributed = sum(us for _, us in table.values())
    row = {"method": meth.name, "layout": "fused" if fuse else "separate", "attention": attention, "norm": norm,
           "swiglu": meth.swiglu_mode(swiglu, fuse), "batch": batch,
           "lm_head": meth.describe_head(), "graphed_ms_per_step": graphed_ms,
           "attributed_pct": 100 * attributed / device_total if device_total else float("nan"),
           "codes_reused": info["codes_reused"]}
    return summarize(row, per_step, layers)


def summarize(row: dict, per_step: dict, layers: int) -> tuple[dict, list[str]]:
    """CSV row and text from {(region, kernel name): (calls per step, us per step)} and the graphed ms/step."""
    row = dict(row)
    graphed_ms = float(row["graphed_ms_per_step"])
    kernel_us = sum(us for _, us in per_step.values())
    row.update(graphed_tok_s=int(row["batch"]) * 1e3 / graphed_ms, kernel_ms_per_step=kernel_us / 1e3,
               gap_ms_per_step=graphed_ms - kernel_us / 1e3,
               kernels_per_step=sum(calls for calls, _ in per_step.values()))
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(float)
    for (region, name), (calls, us) in per_step.items():
        key = f"block: {classify(name)}" if region == "block" else region
        sums[key] += us
        counts[key] += calls
    block_us = sum(v for k, v in sums.items() if k.startswith("block"))
    row["us/layer block gemm"] = sums.get("block: gemm", 0.0) / layers
    row["us/layer block non-gemm"] = (block_us - sums.get("block: gemm", 0.0)) / layers
    for key in sorted(sums):
        row[f"us/step {key}"] = sums[key]
        row[f"kernels/step {key}"] = counts[key]

    title = (f"{row['method']} b={row['batch']} {row['layout']}+{row['attention']}+{row['norm']}+{row['swiglu']} "
             f"lm_head={row['lm_head']}: "
             f"graphed {graphed_ms:.3f} ms/step ({row['graphed_tok_s']:.1f} tok/s); kernels "
             f"{row['kernel_ms_per_step']:.3f} ms/step, {row['kernels_per_step']:.0f} kernels/step, idle in the "
             f"graph {1e3 * row['gap_ms_per_step']:.0f} us/step")
    lines = [title, f"  {'region / category':<34}{'us/step':>10}{'us/layer':>10}{'kernels/step':>14}"]
    for key in sorted(sums, key=lambda k: -sums[k]):
        per_layer = f"{sums[key] / layers:10.2f}" if key.startswith("block") else f"{'':>10}"
        lines.append(f"  {key:<34}{sums[key]:10.1f}{per_layer}{counts[key]:14.1f}")
    lines.append(f"  {'top kernels':<88} {'region':<15}{'category':<26}{'us/step':>9}{'calls':>8}{'us/call':>9}")
    for (region, name), (calls, us) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[:25]:
        short = name if len(name) <= 88 else name[:85] + "..."
        lines.append(f"  {short:<88} {region:<15}{classify(name):<26}{us:9.1f}{calls:8.1f}{us / calls:9.2f}")
    return row, lines


def parse_text(text: str) -> list[tuple[dict, dict]]:
    """Read profile .txt sections back: [(header fields, {(region, kernel name): (calls/step, us/step)})].
    The kernel lists are complete when a section lists fewer than 25 kernels (checked)."""
    sections = []
    header = re.compile(r"^(\S+) b=(\d+) (\w+)\+(\w+)(?:\+(\w+))?(?:\+(\w+))? lm_head=(\S+): graphed ([\d.]+) ms/step")
    current, in_top = None, False
    for line in text.splitlines():
        m = header.match(line)
        if m:
            method, batch, layout, attention, norm, swiglu, head, ms = m.groups()
            current = ({"method": method, "batch": int(batch), "layout": layout, "attention": attention,
                        "norm": norm or "compiled", "swiglu": swiglu or "compiled",
                        "lm_head": head, "graphed_ms_per_step": float(ms)}, {})
            sections.append(current)
            in_top = False
        elif line.strip().startswith("top kernels"):
            in_top = True
        elif in_top and line.startswith("  ") and current is not None:
            name, rest = line[2:90].strip(), line[90:].split()
            us, calls = float(rest[-3]), float(rest[-2])
            region = "outside blocks" if rest[:2] == ["outside", "blocks"] else rest[0]
            before = current[1].get((region, name), (0.0, 0.0))  # names cut to 88 characters can coincide
            current[1][(region, name)] = (before[0] + calls, before[1] + us)
    for meta, kernels in sections:
        if len(kernels) >= 25:
            raise ValueError(f"{meta}: the top-25 list may be cut; rerun the profile instead")
    return sections


def run_profile(args) -> list[dict]:
    config = model_config(args.model_config)
    out = Path(args.profile_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trace_dir = Path(args.trace_dir) if args.trace_dir else None
    rows, text = [], []
    start = time.perf_counter()
    for name in args.methods:
        meth = method(name, args.group_size)
        for variant in [v.strip() for v in args.profile_variants.split(",") if v.strip()]:
            layout, attention = variant.split("+")
            for b in args.batch:
                if time.perf_counter() - start > args.deadline_s:
                    print(f"deadline passed: skipping {name} {variant} b={b}")
                    continue
                torch._dynamo.reset()
                trace = None
                if trace_dir is not None and meth.learned:
                    trace_dir.mkdir(parents=True, exist_ok=True)
                    trace = trace_dir / f"trace_{name.replace(':', '_')}_{layout}_{attention}_b{b}.json.gz"
                try:
                    row, lines = profile_one(config, meth, b, layout == "fused", attention, args.prompt, args.new,
                                             args.device, seed=args.seed, trace=trace,
                                             compile=args.compile != "none", norm=args.norm, swiglu=args.swiglu)
                except Exception as err:  # recorded, the run goes on
                    row = {"method": name, "layout": layout, "attention": attention, "norm": args.norm,
                           "swiglu": meth.swiglu_mode(args.swiglu, layout == "fused"), "batch": b,
                           "status": f"failed: {type(err).__name__}: {err}"[:300]}
                    lines = [f"{name} b={b} {variant}: {row['status']}"]
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                row.setdefault("status", "ok")
                rows.append(row)
                text += lines + [""]
                print("\n".join(lines), flush=True)
                _write(out, rows)
                out.with_suffix(".txt").write_text("\n".join(text))
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()})


def resummarize(raw: Path, out: Path, layers: int = 32) -> list[dict]:
    """Recompute a profile's categories from its .txt (e.g. after a change to classify()) into out (.csv + .txt)."""
    rows, text = [], []
    for meta, kernels in parse_text(Path(raw).read_text()):
        row, lines = summarize(meta, kernels, layers)
        rows.append(row)
        text += lines + [""]
    _write(Path(out), rows)
    Path(out).with_suffix(".txt").write_text("\n".join(text))
    return rows


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m any4lib.bench.profile RAW_PROFILE.txt OUT.csv  (re-categorize a profile)")
    for r in resummarize(Path(sys.argv[1]), Path(sys.argv[2])):
        print(r["method"], r["layout"], r["attention"], r["batch"], f"{r['graphed_tok_s']:.1f} tok/s")
