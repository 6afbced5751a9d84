"""End-to-end decode speed through the generation engine (any4lib.engine), quantized, greedy-decoded on the GPU.

    python -m any4lib.bench.e2e --model-config llama3-8b --formats bf16,int4,any4,nf4,mxfp4 \
        --peers torch-int4,gemlite-int4,bnb-nf4 --batch 1,4,16 --prompt 512 --new 128
    python -m any4lib.bench.e2e --model-config llama3-8b --formats bf16,bnb-nf4-tinygemm,bnb-fp4-tinygemm \
        --peers bnb-nf4,bnb-fp4 --batch 1,4,16      # bitsandbytes' own 4-bit path vs its weights on tinygemm
    python -m any4lib.bench.e2e --model ref-en-16m --formats bf16,any4 --peers '' --hf-generate --batch 1,16

Without --model the decoder gets seeded random weights of --model-config's shape (engine.random_weights, a stand-in:
decode time does not depend on the values); --model PATH times a real model (quantized here with each format) or a
folder saved by `any4 quantize` (its own format), and --hf-generate times transformers' generate on the same
quantized model beside it (static cache, compiled where transformers does so), the ratio printed.

Each method replaces every Linear of the decoder blocks (lm_head stays bf16; METHOD:qhead quantizes it too) and is
timed on: prefill of the prompt (eager), then greedy decode of the new tokens with a static KV cache, the per-token
step compiled (engine.make_step: by default each block through torch.compile and the whole step in one CUDA graph).
Every method runs the same decoder: by default q/k/v and gate/up fused into one linear each (--layout separate:
seven per block) and the one-token attention through the split-K Triton kernel (--attention sdpa: masked SDPA over
the whole cache), and each residual add + RMSNorm through one Triton kernel that lets the next GEMM start early
(--norm compiled: the kernel torch.compile fuses); on the tinygemm kernels the MLP's silu(gate) * up runs in the
gate/up GEMM's epilogue (--swiglu compiled: a kernel of its own); the CSV records all four. One CSV row per
(method, batch, layout, attention, norm, swiglu), written as soon as it is measured; rows already in the CSV are
skipped, so an interrupted run resumes. --profile: where one step's time goes (profile.py).
"""

from __future__ import annotations

import argparse
import csv
import gc
import time
from pathlib import Path

import torch

from ..engine.generate import generate_ids, make_step
from ..engine.model import LlamaDecoder
from ..engine.random_weights import Method, build_model, method, model_config
from ..peers import PEERS
from ..provenance import provenance


# ---- timing -------------------------------------------------------------------------------------------------------


def time_generation(model: LlamaDecoder, batch: int, prompt_len: int, new: int, compile_mode: str, device,
                    seed: int = 0) -> dict:
    """Prefill `prompt_len` random tokens, decode `new` tokens greedily through engine.generate_ids; a warm-up pass
    first (compiles and records the graphs), then the timed one."""
    model.setup_caches(batch, prompt_len + new)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    start = time.perf_counter()
    with torch.no_grad():
        step = make_step(model, compile_mode, batch, device)
        generate_ids(model, prompt, new, step=step)
        warmup_s = time.perf_counter() - start
        out = generate_ids(model, prompt, new, step=step)
    t = out.timing
    return {
        "tokens": torch.tensor(out.tokens),
        "prefill_ms": 1e3 * t["prefill_s"],
        "prefill_tok_s": t["prefill_tok_s"],
        "decode_ms_per_step": t["decode_ms_per_step"],
        "decode_tok_s": t["decode_tok_s"],
        "peak_mem_gb": t["peak_gpu_gb"],
        "prefill_peak_mem_gb": t["prefill_peak_gpu_gb"],
        "warmup_s": warmup_s,
    }


def packed_checkpoint(path: str, meth: Method, device):
    """A real model, its quantized layers packed for the kernels: a folder saved by `any4 quantize` as it is (its
    layers must be meth's format), or a model load_model reads, quantized with meth's format (bf16: as loaded; the
    lm_head only for a :qhead method). Peers are not built from checkpoints."""
    from ..checkpoint import load_quantized, read_quant_config
    from ..model import load_model, quantize_model, quantized_layers
    from ..nn import pack_model

    if meth.name.split(":")[0] in PEERS or meth.dequantized:
        raise ValueError(f"{meth.name} runs on random weights only (no --model)")
    if read_quant_config(path) is not None:
        model = load_quantized(path, device).to(torch.bfloat16)
        saved = {layer.format for layer in quantized_layers(model).values()}
        if saved != {meth.format}:
            raise ValueError(f"{path} holds {', '.join(sorted(saved))} layers; name that format in --formats")
    else:
        model, _ = load_model(path, dtype=torch.bfloat16, device=device)
        if meth.format is not None:
            exclude = [] if meth.quant_head else ["lm_head"]
            quantize_model(model, meth.format, meth.group_size, exclude=exclude, progress=False)
    return pack_model(model, torch.bfloat16)


def checkpoint_model(path: str, meth: Method, device, fuse: bool, attention: str, norm: str, swiglu: str
                     ) -> tuple[LlamaDecoder, dict]:
    """The engine's decoder of a real model (packed_checkpoint)."""
    start = time.perf_counter()
    decoder = LlamaDecoder.from_model(packed_checkpoint(path, meth, device), fuse=fuse, swiglu=swiglu == "epilogue")
    decoder.set_decode_attention(attention).set_decode_norm(norm)
    return decoder, {"quantize_s_first_block": time.perf_counter() - start, "codes_reused": False}


def time_hf_generate(path: str, meth: Method, batch: int, prompt_len: int, new: int, device, seed: int = 0) -> dict:
    """transformers' generate on the same quantized model (packed_checkpoint; static cache: transformers compiles
    its forward then), greedy, all `new` tokens: decode tokens/s from the full run minus a one-token run."""
    model = packed_checkpoint(path, meth, device)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")

    def timed(tokens: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                           min_new_tokens=tokens, **options)
        sync()
        return time.perf_counter() - t0

    start = time.perf_counter()
    timed(new)  # warm-up: transformers compiles the static-cache forward
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    one, full = timed(1), timed(new)
    decode_s = max(full - one, 1e-9)
    return {"prefill_ms": 1e3 * one, "prefill_tok_s": batch * prompt_len / one, "decode_tok_s": batch * (new - 1) / decode_s,
            "decode_ms_per_step": 1e3 * decode_s / (new - 1), "warmup_s": warmup_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")}


# ---- the run ------------------------------------------------------------------------------------------------------

COLUMNS = ["method", "format", "group_size", "implementation", "layout", "attention", "norm", "swiglu", "lm_head",
           "batch", "prompt", "new", "decode_tok_s",
           "decode_ms_per_step", "speedup_vs_bf16", "prefill_tok_s", "prefill_ms", "model_gb", "peak_mem_gb", "prefill_peak_mem_gb",
           "quantize_s_first_block", "codes_reused", "compile", "warmup_s", "status", "model_config",
           "git_commit", "git_dirty", "torch", "cuda", "device", "date"]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        with path.open() as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:  # a CSV from an older bench: rewrite it under today's columns (new ones blank)
            old = _read_rows(path)
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _variant(row: dict) -> tuple[str, str, str]:
    """(layout, attention, norm) of a CSV row; rows from before these columns existed ran separate + sdpa + compiled."""
    return row.get("layout") or "separate", row.get("attention") or "sdpa", row.get("norm") or "compiled"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    """decode tokens/s per method (rows) and batch (columns), with the speedup over bf16 beside each."""
    batches = sorted({int(r["batch"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], int(r["batch"])): r for r in rows}
    header = f"{'method':<14}" + "".join(f"{'b=' + str(b) + ' tok/s (x bf16)':>26}" for b in batches)
    print(header + f"{'peak GB (b=' + str(batches[-1]) + ')':>18}")
    for m in methods:
        line = f"{m:<14}"
        for b in batches:
            r = cell.get((m, b))
            if r is None or not r["status"].startswith("ok"):
                line += f"{(r or {}).get('status', '-')[:24]:>26}"
            else:
                line += f"{float(r['decode_tok_s']):>14.1f} ({float(r.get('speedup_vs_bf16') or 'nan'):5.2f}x)    "
        last = cell.get((m, batches[-1]))
        line += f"{last['peak_mem_gb'] if last and last['status'].startswith('ok') else '-':>18.6}"
        print(line)


def run(args) -> list[dict]:
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu for a smoke run")
    config = None if args.model else model_config(args.model_config)
    out = Path(args.out)
    rows = _read_rows(out)
    variant = ("fused" if args.fuse else "separate", args.attention, args.norm)

    def swiglu_of(name: str) -> str:  # where this run's settings put a method's silu(gate) * up
        try:
            return method(name, args.group_size).swiglu_mode(args.swiglu, args.fuse)
        except ValueError:
            return "compiled"

    # Other variants in the same CSV (rows from before the swiglu column ran it compiled): kept, not compared.
    rows = [r for r in rows if _variant(r) == variant and (r.get("swiglu") or "compiled") == swiglu_of(r["method"])]
    rows = [r for r in rows if r.get("model_config", args.model_config) == (args.model or args.model_config)]
    done = {(r["method"], int(r["batch"])) for r in rows if r["status"].startswith("ok")}
    prov = provenance(device)
    common = {"prompt": args.prompt, "new": args.new, "compile": args.compile,
              "model_config": args.model or args.model_config,
              "git_commit": (prov["git"]["commit"] or "")[:12], "git_dirty": prov["git"]["dirty"],
              "torch": torch.__version__, "cuda": torch.version.cuda, "device": prov["device"], "date": prov["date"],
              "layout": variant[0], "attention": variant[1], "norm": variant[2]}
    start = time.perf_counter()
    methods = [method(name, args.group_size) for name in args.methods]
    for meth in methods:
        todo = [b for b in args.batch if (meth.name, b) not in done]
        if not todo:
            continue
        if time.perf_counter() - start > args.deadline_s:
            print(f"deadline of {args.deadline_s:.0f} s passed: skipping {meth.name} (rerun to resume)")
            continue
        base = {**common, "method": meth.name, "format": meth.format or "", "group_size": meth.group_size or "",
                "implementation": meth.implementation(), "lm_head": meth.describe_head(),
                "swiglu": meth.swiglu_mode(args.swiglu, args.fuse)}
        try:
            # The last method's model sits in reference cycles (compiled blocks hold their module): free it now, or
            # it would count in this method's memory.
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0
            if args.model:
                model, info = checkpoint_model(args.model, meth, device, args.fuse, args.attention, args.norm,
                                               meth.swiglu_mode(args.swiglu, args.fuse))
            else:
                model, info = build_model(config, meth, device, seed=args.seed, reuse_budget_s=args.reuse_budget_s,
                                          fuse=args.fuse, attention=args.attention, norm=args.norm,
                                          swiglu=args.swiglu)
            model_gb = ((torch.cuda.memory_allocated() - before) / 1e9 if torch.device(device).type == "cuda"
                        else float("nan"))
        except Exception as err:  # a peer that is missing or fails: recorded, the run goes on
            for b in todo:
                row = {**base, "batch": b, "status": f"failed to build: {type(err).__name__}: {err}"[:300]}
                _append_row(out, row)
                rows.append(row)
            print(f"{meth.name}: could not build ({type(err).__name__}: {err})")
            continue
        for b in todo:
            if time.perf_counter() - start > args.deadline_s:
                print(f"deadline of {args.deadline_s:.0f} s passed: skipping {meth.name} b={b} (rerun to resume)")
                continue
            row = {**base, **info, "batch": b, "model_gb": model_gb}
            torch._dynamo.reset()  # one fresh compile per (method, batch): no cache limits, no dynamic shapes
            try:
                timing = time_generation(model, b, args.prompt, args.new, args.compile, device, seed=args.seed)
                row.update(timing, status="ok")
            except Exception as err:
                row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
                if args.fallback_compile and args.fallback_compile != args.compile:
                    # A peer that does not compile still gets measured, and the row says how.
                    print(f"{meth.name} b={b}: --compile {args.compile} failed ({row['status']}); "
                          f"retrying with {args.fallback_compile}")
                    torch._dynamo.reset()
                    try:
                        timing = time_generation(model, b, args.prompt, args.new, args.fallback_compile, device,
                                                 seed=args.seed)
                        row.update(timing, compile=args.fallback_compile, status=f"ok after {row['status']}"[:300])
                    except Exception as err2:
                        row["status"] += f"; {args.fallback_compile}: {type(err2).__name__}: {err2}"[:200]
            row.pop("tokens", None)
            bf16 = next((r for r in rows + [row] if r["method"] == "bf16" and int(r["batch"]) == b
                         and r["status"].startswith("ok")), None)
            if bf16 and row["status"].startswith("ok"):
                row["speedup_vs_bf16"] = row["decode_tok_s"] / float(bf16["decode_tok_s"])
            row = {k: _fmt(v) for k, v in row.items()}
            _append_row(out, row)
            rows.append(row)
            print(f"{meth.name} b={b}: " + ", ".join(f"{k}={row.get(k)}" for k in
                  ("decode_tok_s", "speedup_vs_bf16", "prefill_tok_s", "peak_mem_gb", "status")), flush=True)
        del model
        torch._dynamo.reset()
        if args.model and args.hf_generate:
            rows += hf_rows(args, meth, base, todo, rows, out)
    print_table(rows)
    return rows


def hf_rows(args, meth: Method, base: dict, batches: list[int], rows: list[dict], out: Path) -> list[dict]:
    """transformers' generate on the same quantized model, one row per batch (method METHOD@hf-generate), with
    the engine's decode tokens/s over it printed."""
    import transformers

    new_rows = []
    for b in batches:
        gc.collect()
        torch._dynamo.reset()
        row = {**base, "batch": b, "method": f"{meth.name}@hf-generate", "swiglu": "compiled",
               "compile": "transformers static cache",
               "implementation": f"transformers {transformers.__version__} generate over {base['implementation']}"}
        try:
            row.update(time_hf_generate(args.model, meth, b, args.prompt, args.new, args.device, args.seed),
                       status="ok")
        except Exception as err:
            row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
        engine = next((r for r in rows if r["method"] == meth.name and int(r["batch"]) == b
                       and r["status"].startswith("ok")), None)
        if engine and row["status"] == "ok":
            print(f"{meth.name} b={b}: engine {float(engine['decode_tok_s']):.1f} tok/s, transformers generate "
                  f"{row['decode_tok_s']:.1f} tok/s: {float(engine['decode_tok_s']) / row['decode_tok_s']:.2f}x",
                  flush=True)
        row = {k: _fmt(v) for k, v in row.items()}
        _append_row(out, row)
        new_rows.append(row)
    return new_rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m any4lib.bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default="llama3-8b", help="llama3-8b or tiny (random weights)")
    parser.add_argument("--model", default="", help="a real model (load_model) or a folder saved by `any4 quantize`, "
                                                    "instead of random weights of --model-config's shape")
    parser.add_argument("--hf-generate", action="store_true",
                        help="with --model: also time transformers' generate on the same quantized model")
    parser.add_argument("--formats", default="bf16,int4,any4,nf4,mxfp4",
                        help="comma list: bf16 and any4lib formats run on the tinygemm kernels")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}, or ''")
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--compile", default="blocks", help="blocks, reduce-overhead, cudagraph or none (see make_step)")
    parser.add_argument("--fallback-compile", default="cudagraph",
                        help="mode to retry a method with when --compile fails for it ('' for none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-budget-s", type=float, default=60.0,
                        help="share the first block's anyN codes with later blocks if quantizing all would take longer")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="start no new method after this")
    parser.add_argument("--layout", default="fused", choices=["fused", "separate"],
                        help="fused: q/k/v and gate/up as one linear each (every method); separate: seven per block")
    parser.add_argument("--attention", default="triton", choices=["triton", "sdpa"],
                        help="one-token attention on CUDA: split-K Triton kernel, or masked SDPA over the whole cache")
    parser.add_argument("--norm", default="triton", choices=["triton", "compiled"],
                        help="residual add + RMSNorm on CUDA: a Triton kernel that lets the next GEMM start early "
                             "(sm_90+), or the kernel torch.compile fuses from the same ops")
    parser.add_argument("--swiglu", default="epilogue", choices=["epilogue", "compiled"],
                        help="the MLP's silu(gate) * up: in the fused gate/up GEMM's epilogue (tinygemm methods, fused "
                             "layout; the others run it compiled), or the kernel torch.compile fuses")
    parser.add_argument("--out", default="results/e2e/decode.csv")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the bench: profile one decode step per method x --profile-variants x batch")
    parser.add_argument("--profile-variants", default="separate+sdpa,fused+triton",
                        help="comma list of LAYOUT+ATTENTION to profile")
    parser.add_argument("--profile-out", default="results/e2e/profile/profile.csv",
                        help="profile CSV; the top-kernel tables go beside it (.txt)")
    parser.add_argument("--trace-dir", default="", help="also write gzipped Chrome traces of anyN profiles here")
    args = parser.parse_args(argv)
    args.fuse = args.layout == "fused"
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    args.methods = split(args.formats) + split(args.peers)
    args.batch = [int(b) for b in split(args.batch)]
    if args.new < 2:
        parser.error("--new must be at least 2 (one token comes from the prefill)")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.profile:
        from .profile import run_profile

        run_profile(_args)
    else:
        run(_args)
