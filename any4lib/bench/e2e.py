"""End-to-end decode speed: a Llama-architecture model with random weights, quantized, greedy-decoded on the GPU.

    python -m any4lib.bench.e2e --model-config llama3-8b --formats bf16,int4,any4,nf4,mxfp4 \
        --peers torch-int4,gemlite-int4,bnb-nf4 --batch 1,4,16 --prompt 512 --new 128

Each method replaces every Linear of the decoder blocks (lm_head stays bf16; METHOD:qhead quantizes it too) and is
timed on: prefill of the prompt (eager), then greedy decode of the new tokens with a static KV cache, the per-token
step compiled (by default each block through torch.compile and the whole step in one CUDA graph; --compile
reduce-overhead compiles the whole step with torch.compile(mode="reduce-overhead") instead, minutes per shape on an 8B
model). Every method runs the same decoder: by default q/k/v and gate/up fused into one linear each (--layout
separate: seven per block) and the one-token attention through the split-K Triton kernel (--attention sdpa: masked
SDPA over the whole cache), and each residual add + RMSNorm through one Triton kernel that lets the next GEMM start
early (--norm compiled: the kernel torch.compile fuses); on the tinygemm kernels the MLP's silu(gate) * up runs in
the gate/up GEMM's epilogue (--swiglu compiled: a kernel of its own); the CSV records all four. One CSV row per
(method, batch, layout, attention, norm, swiglu), written as soon
as it is measured; rows already in the CSV are skipped, so an interrupted run resumes. --profile: where one step's
time goes (profile.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import get_format, list_formats
from ..provenance import provenance
from ..qtensor import cat_rows
from ..quant import quantize
from .decode import LlamaDecoder, decode, decode_step, prefill

PEERS = ("torch-int4", "gemlite-int4", "bnb-nf4")


def model_config(name: str):
    """A transformers LlamaConfig by name: 'llama3-8b' (Llama-3-8B's architecture) or 'tiny' (for tests)."""
    from transformers import LlamaConfig

    common = dict(rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192)
    if name == "llama3-8b":
        dims = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
    elif name == "tiny":
        dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, rope_theta=500000.0)
    else:
        raise ValueError(f"unknown model config {name!r}: use 'llama3-8b' or 'tiny'")
    return LlamaConfig(**dims, **common)


# ---- the linear layers each method puts in place of nn.Linear ---------------------------------------------------


class PackedLinear(nn.Module):
    """Inference-only linear on the tinygemm kernels: holds nothing but the packed weight. swiglu (a weight from
    PackedWeight.from_gate_up): the output is silu(gate) * up, which the decoder's MLP then skips."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed
        self.swiglu = packed.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import linear

        return linear(x, self.packed)


class DequantizedLinear(nn.Module):
    """Dense float32 matmul by a dequantized weight, rounded to the activation dtype: the kernels' reference."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight).to(x.dtype)


class TorchInt4Linear(nn.Module):
    """PyTorch's built-in tinygemm int4 (torch._weight_int4pack_mm), fed our int4 codes, scales and zeros.

    Its dequantization, (code - 8) * scale + zero, is our int4 formula, so the same QuantizedTensor is reused.
    """

    def __init__(self, q, inner_k_tiles: int = 8):
        super().__init__()
        self.group_size, self.out_features = q.group_size, q.shape[0]
        codes = q.codes.int()
        if q.device.type == "cuda":
            packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                       inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)
        self.register_buffer("packed", packed)
        # [K // g, N, 2]: scale and zero of each group, in the activation dtype.
        self.register_buffer("scales_zeros", torch.stack([q.scale, q.zero], -1).transpose(0, 1).contiguous().bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scales_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def _gemlite_int4(q):
    import gemlite

    n, k = q.shape
    layer = gemlite.GemLiteLinear(4, group_size=q.group_size, in_features=k, out_features=n,
                                  input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
    # GemLite (HQQ convention) computes (code - z) * scale; ours is (code - 8) * scale + zero. z is stored in bf16,
    # so its weights round slightly differently from ours: same bytes moved, which is all this bench measures.
    z = 8 - q.zero / q.scale.clamp_min(1e-12)
    layer.pack(q.codes, q.scale.bfloat16(), z.bfloat16(), bias=None)
    return layer


class BnbNF4Linear(nn.Module):
    """bitsandbytes NF4 (its default block of 64, absmax scaling), through bnb.matmul_4bit."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.weight, self.state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.state)


@dataclass
class Method:
    """One way to hold and multiply the decoder's linear weights."""

    name: str
    format: str | None  # our format it quantizes to (None: bf16 and bnb's own quantizer)
    group_size: int | None
    learned: bool = False  # anyN: k-means per row, the slow quantizer
    dequantized: bool = False  # multiply by the dequantized weight instead (the kernels' reference in tests)
    quant_head: bool = False  # lm_head quantized too (NAME:qhead); the paper, and the main rows, keep it bf16

    @property
    def on_tinygemm(self) -> bool:
        """Its linears run on the tinygemm kernels (an any4lib format, not a peer, not the dequantized reference)."""
        return self.format is not None and not self.dequantized and self.name.split(":")[0] not in PEERS

    def swiglu_mode(self, requested: str, fuse: bool) -> str:
        """Where the MLP's silu(gate) * up runs: 'epilogue' (in the fused gate/up GEMM: tinygemm only) or 'compiled'
        (ops that torch.compile fuses)."""
        return "epilogue" if requested == "epilogue" and fuse and self.on_tinygemm else "compiled"

    def make(self, w: torch.Tensor | list[torch.Tensor], seed: int, swiglu: bool = False) -> nn.Module:
        """The module standing in for nn.Linear with weight `w` [N, K] (bf16, on the run's device).

        A list of weights is one fused linear of their stacked rows (qkv_proj, gate_up_proj): each part is quantized
        on its own and the quantized parts are stacked, so the layer is exactly the unfused layers side by side.
        swiglu (tinygemm methods, w = [gate, up]): the layer returns silu(gate) * up (PackedWeight.from_gate_up).
        """
        parts = [w] if isinstance(w, torch.Tensor) else list(w)
        w = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.name == "bf16":
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            layer.weight.data.copy_(w)
            return layer
        if self.name == "bnb-nf4":
            # Blocks of 64 run along rows (K = 4096 is a multiple of 64): quantizing the stack = stacking the parts.
            return BnbNF4Linear(w)
        from .. import kernels

        dtype = w.dtype
        del w
        quantized = [quantize(p, self.format, group_size=self.group_size, **({"seed": seed} if self.learned else {}))
                     for p in parts]
        if swiglu:
            if not self.on_tinygemm or len(quantized) != 2:
                raise ValueError(f"swiglu: {self.name} must run on the tinygemm kernels, with w = [gate, up]")
            return PackedLinear(kernels.PackedWeight.from_gate_up(*quantized, dtype))
        q = cat_rows(quantized)
        if self.name == "torch-int4":
            return TorchInt4Linear(q)
        if self.name == "gemlite-int4":
            return _gemlite_int4(q)
        if self.dequantized:
            # The weight the kernels stand for: tables rounded to the activation dtype as the packing stores them.
            exact = kernels.PackedWeight.from_quantized(q, dtype).unpack() if kernels.is_supported(q) else q
            return DequantizedLinear(exact.dequantize(torch.float32))
        kernels.check_supported(q)
        return PackedLinear(kernels.PackedWeight.from_quantized(q, dtype))

    def describe_head(self) -> str:
        return self.name.removesuffix(":qhead") if self.quant_head else "bf16"

    def implementation(self) -> str:
        """What runs the matmul, with its version (a peer that is not installed says so)."""
        from importlib import metadata

        if self.name == "bf16":
            return f"torch {torch.__version__} dense (cuBLAS on CUDA)"
        if self.name == "torch-int4":
            return f"torch {torch.__version__} _weight_int4pack_mm"
        dist = {"gemlite-int4": "gemlite", "bnb-nf4": "bitsandbytes"}.get(self.name)
        if dist is None:
            if self.dequantized:
                return "any4lib dequantized weight, dense matmul"
            off = os.environ.get("ANY4_TINYGEMM_PDL") == "0"  # read by the kernels' binding at each call
            return "any4lib tinygemm kernels" + (" (programmatic launch off)" if off else "")
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{dist} not installed"


def method(name: str, group_size: int) -> Method:
    """A Method by name: bf16, a peer, an any4lib format (tinygemm kernels) or FORMAT:dequant (dense matmul)."""
    if name.endswith(":qhead"):
        base = method(name.removesuffix(":qhead"), group_size)
        if base.name == "bf16":
            raise ValueError("bf16:qhead means nothing: bf16's lm_head is bf16 already")
        return Method(name, base.format, base.group_size, base.learned, base.dequantized, quant_head=True)
    if name.endswith(":dequant"):
        kernel_path = method(name.removesuffix(":dequant"), group_size)
        return Method(name, kernel_path.format, kernel_path.group_size, kernel_path.learned, dequantized=True)
    if name == "bf16":
        return Method(name, None, None)
    if name in ("torch-int4", "gemlite-int4"):
        return Method(name, "int4", group_size)
    if name == "bnb-nf4":
        return Method(name, None, 64)
    if name not in list_formats():
        raise ValueError(f"unknown method {name!r}: use bf16, one of {', '.join(PEERS)}, or a format of "
                         f"any4lib.list_formats()")
    spec = get_format(name)
    return Method(name, name, spec.fixed_group_size or group_size, learned=spec.learned)


# ---- building the model -----------------------------------------------------------------------------------------


def build_model(config, meth: Method, device, seed: int = 0, reuse_budget_s: float = 60.0,
                dtype=torch.bfloat16, progress: bool = True, fuse: bool = True,
                attention: str = "triton", norm: str = "triton", swiglu: str = "epilogue"
                ) -> tuple[LlamaDecoder, dict]:
    """The decoder on `device` with seeded random weights, every block Linear replaced by `meth`.

    Built on the meta device, so only what each method keeps is ever allocated. If quantizing the first block
    times the rest would exceed `reuse_budget_s`, the later blocks get copies of the first block's quantized
    layers (same codes, separate memory; the timing is unchanged since decode streams every weight once).
    fuse: q/k/v and gate/up as one linear each, built from the same random parts as the unfused model (so both
    models compute the same function). attention: the one-token attention on CUDA, 'triton' or 'sdpa'. norm: the
    residual add + RMSNorm on CUDA, 'triton' or 'compiled' (LlamaDecoder.set_decode_norm). swiglu: 'epilogue' puts
    silu(gate) * up in the fused gate/up GEMM where the method can (Method.swiglu_mode), 'compiled' never.
    lm_head stays bf16 unless meth.quant_head.
    """
    from tqdm import tqdm

    with torch.device("meta"):
        model = LlamaDecoder(config)
    if fuse:
        model.fuse_projections()
    model.set_decode_attention(attention).set_decode_norm(norm)
    generator = torch.Generator(device=device).manual_seed(seed)

    def random_weight(shape):
        return (torch.randn(shape, generator=generator, device=device) / math.sqrt(shape[1])).to(dtype)

    info = {"quantize_s_first_block": 0.0, "codes_reused": False}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    blocks = list(enumerate(model.model.layers))
    for i, block in tqdm(blocks, desc=f"build {meth.name}", disable=not progress):
        start = time.perf_counter()
        for name, linear in list(block.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            if info["codes_reused"]:
                layer = copy.deepcopy(model.model.layers[0].get_submodule(name))
            else:
                sizes = getattr(linear, "split_sizes", [linear.out_features])
                gated = name.endswith("gate_up_proj") and meth.swiglu_mode(swiglu, fuse) == "epilogue"
                layer = meth.make([random_weight((n, linear.in_features)) for n in sizes], seed + i, swiglu=gated)
            block.set_submodule(name, layer)
        sync()
        if i == 0:
            info["quantize_s_first_block"] = time.perf_counter() - start
            info["codes_reused"] = meth.learned and info["quantize_s_first_block"] * (len(blocks) - 1) > reuse_budget_s
    # Embedding, norms and lm_head: allocate and fill what is still on meta.
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.ones(p.shape, device=device, dtype=dtype) if p.dim() == 1 else random_weight(p.shape)
                setattr(module, pname, nn.Parameter(value, requires_grad=False))
    if meth.quant_head:  # the same random head as the bf16 one, quantized by the method
        model.lm_head = meth.make(model.lm_head.weight, seed + len(blocks))
    sync()
    return model.eval().requires_grad_(False), info


# ---- timing -------------------------------------------------------------------------------------------------------


def graphed_step(step, model: LlamaDecoder, batch: int, device):
    """`step` (decode_step, possibly over compiled blocks) captured once into one CUDA graph, replayed per token."""
    token = torch.zeros(batch, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles, autotunes, allocates: nothing of that may happen during capture
            step(model, token, pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(model, token, pos)

    def replay(_model, tok, p):
        token.copy_(tok)
        pos.copy_(p)
        graph.replay()
        return out

    return replay


def make_step(model: LlamaDecoder, compile_mode: str, batch: int, device):
    """The per-token decode step, made fast by `compile_mode`:

    blocks: torch.compile (inductor) on each decoder block (one compile serves all 32: they share their code),
        then the whole step captured in one CUDA graph. Compiles in seconds where the next mode takes minutes.
    reduce-overhead: torch.compile(mode="reduce-overhead") of the whole step (inductor + CUDA graphs).
    cudagraph: the eager step captured in one CUDA graph (no compiler). none: eager.
    """
    eager_step = lambda *args: _eager(decode_step, *args)  # noqa: E731  (blocks compiled by an earlier mode too)
    if compile_mode == "blocks":
        compile_blocks(model)
        return graphed_step(decode_step, model, batch, device)
    if compile_mode == "reduce-overhead":
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    if compile_mode == "cudagraph":
        return graphed_step(eager_step, model, batch, device)
    if compile_mode == "none":
        return eager_step
    raise ValueError(f"unknown --compile {compile_mode!r}: use blocks, reduce-overhead, cudagraph or none")


def compile_blocks(model: LlamaDecoder) -> None:
    """torch.compile each decoder block and the final norm (one compile serves all blocks: same code)."""
    for block in model.model.layers:
        block.compile(fullgraph=True, dynamic=False)
    model.model.norm.compile(fullgraph=True, dynamic=False)


def _eager(fn, *args):
    with torch.compiler.set_stance("force_eager"):
        return fn(*args)


def time_generation(model: LlamaDecoder, batch: int, prompt_len: int, new: int, compile_mode: str, device,
                    seed: int = 0) -> dict:
    """Prefill `prompt_len` random tokens, decode `new` tokens greedily; a warm-up pass first, then the timed one."""
    is_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    model.setup_caches(batch, prompt_len + new)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(seed))
    # The prompt runs eagerly in every mode: compiled blocks would otherwise recompile for its length.
    eager_prefill = lambda: _eager(prefill, model, prompt)  # noqa: E731
    start = time.perf_counter()
    with torch.no_grad():
        step = make_step(model, compile_mode, batch, device)
        first = eager_prefill()
        decode(model, first, prompt_len, new - 1, step)  # warm-up: compiles and records the graphs
        sync()
        warmup_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated if is_cuda else (lambda: float("nan"))
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        first = eager_prefill()
        sync()
        t1 = time.perf_counter()
        prefill_peak = peak()
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        tokens = decode(model, first, prompt_len, new - 1, step)
        sync()
        t2 = time.perf_counter()
    steps = new - 1
    return {
        "tokens": torch.cat([first[:, None], tokens], 1).cpu(),
        "prefill_ms": 1e3 * (t1 - t0),
        "prefill_tok_s": batch * prompt_len / (t1 - t0),
        "decode_ms_per_step": 1e3 * (t2 - t1) / steps,
        "decode_tok_s": batch * steps / (t2 - t1),
        "peak_mem_gb": peak() / 1e9,
        "prefill_peak_mem_gb": prefill_peak / 1e9,
        "warmup_s": warmup_s,
    }


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
    config = model_config(args.model_config)
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
    done = {(r["method"], int(r["batch"])) for r in rows if r["status"].startswith("ok")}
    prov = provenance(device)
    common = {"prompt": args.prompt, "new": args.new, "compile": args.compile, "model_config": args.model_config,
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
            model, info = build_model(config, meth, device, seed=args.seed, reuse_budget_s=args.reuse_budget_s,
                                      fuse=args.fuse, attention=args.attention, norm=args.norm, swiglu=args.swiglu)
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
    print_table(rows)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m any4lib.bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default="llama3-8b", help="llama3-8b or tiny")
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
