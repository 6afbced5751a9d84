"""The benchmark's stand-in model: the engine's decoder with seeded random weights, every block linear replaced by
one method's layer (bf16, a format on the tinygemm kernels as a packed QuantLinear, a peer, or the dequantized
reference), built on the meta device so only what each method keeps is allocated. Real models come in through
LlamaDecoder.from_model instead.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import grids
from ..bnb import FORMATS as BNB_FORMATS, quantize_with_bnb
from ..formats import get_format, list_formats
from ..nn import QuantLinear
from ..peers import PEERS, Bnb4bitLinear, TorchInt4Linear, gemlite_int4
from ..qtensor import QuantizedTensor, cat_rows
from ..quant import quantize
from ..standins import standin_config
from .model import LlamaDecoder

# bitsandbytes' quantization (blocks of 64) converted to run on tinygemm, beside bitsandbytes' own rows: method ->
# bitsandbytes quant_type.
BNB_ON_TINYGEMM = {"bnb-nf4-tinygemm": "nf4", "bnb-fp4-tinygemm": "fp4"}


def model_config(name: str):
    """A transformers LlamaConfig by name: 'llama3-8b' (Llama-3-8B's published architecture, the stand-in's config)
    or 'tiny' (for tests)."""
    from transformers import LlamaConfig

    if name == "llama3-8b":
        return standin_config("llama-3-8b")
    if name == "tiny":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, rope_theta=500000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, max_position_embeddings=8192)
    raise ValueError(f"unknown model config {name!r}: use 'llama3-8b' or 'tiny'")


class DequantizedLinear(nn.Module):
    """Dense float32 matmul by a dequantized weight, rounded to the activation dtype: the kernels' reference."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight).to(x.dtype)


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
        if self.name in ("bnb-nf4", "bnb-fp4"):
            # Blocks of 64 run along rows (K = 4096 is a multiple of 64): quantizing the stack = stacking the parts.
            return Bnb4bitLinear(w, self.name.removeprefix("bnb-"))
        from .. import kernels

        dtype = w.dtype
        del w
        if self.name in BNB_ON_TINYGEMM:  # bitsandbytes' own codes and scales, converted (any4lib.bnb)
            quantized = [quantize_with_bnb(p, BNB_ON_TINYGEMM[self.name]) for p in parts]
        else:
            quantized = [quantize(p, self.format, group_size=self.group_size, **({"seed": seed} if self.learned else {}))
                         for p in parts]
        if swiglu:
            if not self.on_tinygemm or len(quantized) != 2:
                raise ValueError(f"swiglu: {self.name} must run on the tinygemm kernels, with w = [gate, up]")
            return QuantLinear.from_packed(kernels.PackedWeight.from_gate_up(*quantized, dtype))
        q = cat_rows(quantized)
        if self.name == "torch-int4":
            return TorchInt4Linear(q)
        if self.name == "gemlite-int4":
            return gemlite_int4(q)
        if self.dequantized:
            # The weight the kernels stand for: tables rounded to the activation dtype as the packing stores them.
            exact = kernels.PackedWeight.from_quantized(q, dtype).unpack() if kernels.is_supported(q) else q
            return DequantizedLinear(exact.dequantize(torch.float32))
        kernels.check_supported(q)
        return QuantLinear.from_packed(kernels.PackedWeight.from_quantized(q, dtype))

    def describe_head(self) -> str:
        return self.name.removesuffix(":qhead") if self.quant_head else "bf16"

    def implementation(self) -> str:
        """What runs the matmul, with its version (a peer that is not installed says so)."""
        from importlib import metadata

        if self.name == "bf16":
            return f"torch {torch.__version__} dense (cuBLAS on CUDA)"
        if self.name == "torch-int4":
            return f"torch {torch.__version__} _weight_int4pack_mm"
        dist = {"gemlite-int4": "gemlite", "bnb-nf4": "bitsandbytes", "bnb-fp4": "bitsandbytes"}.get(self.name)
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
    if name in ("bnb-nf4", "bnb-fp4"):
        return Method(name, None, 64)
    if name in BNB_ON_TINYGEMM:
        return Method(name, BNB_FORMATS[BNB_ON_TINYGEMM[name]][0], 64)
    if name not in list_formats():
        raise ValueError(f"unknown method {name!r}: use bf16, one of {', '.join(PEERS)}, "
                         f"{', '.join(BNB_ON_TINYGEMM)}, or a format of any4lib.list_formats()")
    spec = get_format(name)
    return Method(name, name, spec.fixed_group_size or group_size, learned=spec.learned)


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


def random_quantized(fmt: str, n: int, k: int, group_size: int, device="cuda") -> QuantizedTensor:
    """A valid weight of the format with random codes, tables and scales (k-means on 28672 x 8192 would take
    minutes per draw; the kernel's speed and correctness do not depend on how the values were learned)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scale = torch.rand(n, k // group_size, device=device) * 0.02 + 1e-3
    zero = torch.randn(n, k // group_size, device=device) * 0.01
    if fmt == "int4":
        lut = (torch.arange(16, device=device) - 8.0)[None]
    elif fmt == "any4":
        lut = torch.sort(torch.randn(n, 16, device=device) * 3, dim=1).values
    elif fmt == "nf4":
        lut, zero = grids.NF4_LEVELS[None].to(device), None
    else:  # fp4, mxfp4: the E2M1 grid; MX scales are powers of two
        lut, zero = grids.E2M1[None].to(device), None
    if fmt == "mxfp4":
        scale = torch.exp2(torch.randint(-12, -4, scale.shape, device=device).float())
    return QuantizedTensor(fmt, 4, group_size, codes, lut.float(), scale, zero)
