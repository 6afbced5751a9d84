"""The engine's Llama decoder (gpt-fast style): static KV cache, fused projections, Triton decode kernels.

Parameter names follow transformers' LlamaForCausalLM. `LlamaDecoder.from_model(model)` builds it on the meta
device from a loaded (bf16 or quantized) transformers Llama and takes that model's own modules and parameters, so
no weight exists twice; the random-weight stand-in of the benchmark (random_weights.py) builds it the same way.
Prompts of different lengths are left-padded: each sequence's RoPE positions start at its first real token and its
padding is masked out of attention (`set_padding`), which is what transformers computes for the unpadded prompt.

Three decode-speed options, all rewrites of the same function:
- `fuse_projections()`: q/k/v become one linear (qkv_proj) and gate/up one (gate_up_proj), their weights stacked
  by output rows. Per-row and per-group quantized formats quantize row by row, so stacking the quantized parts
  is the same quantized model with fewer, larger GEMMs. A gate_up_proj whose `swiglu` attribute is true returns
  silu(gate) * up itself (the tinygemm epilogue, kernels.PackedWeight.from_gate_up).
- `decode_attention = "triton"`: a one-token step on CUDA reads the cache through a split-K Triton kernel
  (`attention.py`) that stops at the filled length, instead of SDPA with a boolean mask over the whole cache; with
  fused projections the same kernel also applies RoPE and writes the new key and value into the cache. Padded
  batches keep the masked SDPA (the kernel has one start position for every sequence).
- `set_decode_norm("triton")`: each residual add + RMSNorm on CUDA is one Triton kernel (`rmsnorm.py`) that lets
  the tinygemm GEMM after it start early, instead of the kernel torch.compile fuses from the same ops (same
  roundings; the fp32 sum of squares may add up in another order).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantLinear
from .attention import decode_attention, decode_attention_step, rotate_half, serves_head_dim
from .rmsnorm import add_rms_norm, add_rms_norm_reference
from .rope import check_rope, rope_tables

log = logging.getLogger("any4lib")

COVERED = ("LlamaForCausalLM (Llama 1/2/3/3.1/3.2 and llama2.c checkpoints loaded as Llama): no biases, SiLU MLP, "
           "RoPE default or llama3")


class UnsupportedModel(ValueError):
    """A model the engine does not build; the message names what it covers."""


def check_model(model) -> None:
    """Raise UnsupportedModel unless `model` is a Llama-family transformers model the engine covers."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or getattr(config, "model_type", None) != "llama" or name != "LlamaForCausalLM":
        arch = getattr(config, "model_type", None)
        raise UnsupportedModel(f"the engine does not cover {name} (model_type {arch!r}); it covers {COVERED}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedModel(f"the engine does not cover {flag}=True; it covers {COVERED}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"the engine does not cover hidden_act={config.hidden_act!r}; it covers {COVERED}")
    try:
        check_rope(config)
    except ValueError as err:
        raise UnsupportedModel(f"{err}; the engine covers {COVERED}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = "compiled"  # or "triton": see add_and_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm_reference(x, None, self.weight, self.eps)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual); residual None: (self(x), x). kernel "compiled": PyTorch ops, which
        torch.compile fuses into one kernel; "triton" (CUDA): rmsnorm.add_rms_norm, the same function in one kernel
        that lets the GEMM after it start early."""
        norm = add_rms_norm if self.kernel == "triton" and x.is_cuda else add_rms_norm_reference
        return norm(x, residual, self.weight, self.eps)


class KVCache(nn.Module):
    """Keys and values of every position so far, one buffer [2, batch, kv_heads, max_len, head_dim] (k = [0],
    v = [1]), written in place: one write per step for both, which torch.compile fuses with RoPE of k (a one-token
    step with fused projections and the Triton attention writes it inside the attention kernel instead)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (2, batch, kv_heads, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.kv.index_copy_(3, pos, torch.stack([k, v]))
        return self.kv[0], self.kv[1]


def stack_linears(linears: list[nn.Module], swiglu: bool = False) -> nn.Module | None:
    """One bias-free layer whose output rows are those of `linears` in order, or None when they do not stack.

    nn.Linear parts (meta device too): one nn.Linear, the parts' weights then views of its weight (one copy). Packed
    QuantLinear parts: one packed QuantLinear of the stacked codes (swiglu, parts [gate, up]: the gate/up weight
    whose output is silu(gate) * up); the parts' packed tensors are released. `split_sizes` keeps the parts' sizes.
    """
    if any(lin.bias is not None for lin in linears):
        return None
    sizes = [lin.out_features for lin in linears]
    if all(type(lin) is nn.Linear for lin in linears):
        weight = torch.cat([lin.weight.detach() for lin in linears])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        for lin, part in zip(linears, weight.split(sizes)):
            lin.weight = nn.Parameter(part, requires_grad=False)
    elif all(isinstance(lin, QuantLinear) and lin.form == "packed" and not lin.swiglu for lin in linears):
        from ..kernels import PackedWeight
        from ..qtensor import cat_rows

        activations = {lin.activations for lin in linears}
        if len(activations) > 1 or any(lin.input_rotation for lin in linears):
            return None  # parts that round or rotate their (shared) input differently stay apart

        parts, dtype = [lin.quantized for lin in linears], linears[0].packed.dtype
        try:
            packed = (PackedWeight.from_gate_up(*parts, dtype) if swiglu
                      else PackedWeight.from_quantized(cat_rows(parts), dtype))
        except ValueError:  # formats or group sizes that do not stack, or gate rows not a multiple of 8
            return None
        fused = QuantLinear.from_packed(packed)
        fused.activations = activations.pop()  # one shared input, rounded once: as each part did
        for lin in linears:
            _release(lin)
    else:
        return None
    fused.split_sizes = sizes
    return fused


def _release(layer: QuantLinear) -> None:
    """Free a packed layer whose codes now live in a fused layer; calling it says so."""
    for name in ("packed_codes", "packed_scales", "packed_lut"):
        setattr(layer, name, None)
    layer._packed = None
    layer.forward = _released


def _released(*_):
    raise RuntimeError("this layer's weight moved into an any4lib engine's fused projection (fuse=True); run the "
                       "engine, or build it with fuse=False to keep the model's own layers usable")


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.kv_cache: KVCache | None = None
        self.fused = False
        self.decode_attention = "sdpa"  # or "triton": see the module docstring

    def fuse(self) -> None:
        """q/k/v -> one qkv_proj (rows stacked q, k, v), registered first so module order stays q, k, v, o."""
        if self.fused:
            return
        qkv, o = stack_linears([self.q_proj, self.k_proj, self.v_proj]), self.o_proj
        if qkv is None:  # parts in different forms: they stay separate
            return
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            delattr(self, name)
        self.qkv_proj, self.o_proj = qkv, o
        self.fused = True

    def forward(self, x, cos, sin, pos, mask):
        """cos / sin: [T, D] (every sequence from position 0) or [B, 1, T, D] (padded: per sequence); mask:
        [1 or B, 1, T, max_len], True where a query may see a key."""
        b, t, _ = x.shape
        triton = t == 1 and self.decode_attention == "triton" and x.is_cuda and cos.dim() == 2
        if triton and self.fused:
            # RoPE and the cache write inside the attention kernel (two kernels a layer fewer): attention.py
            qkv = self.qkv_proj(x).view(b, -1, self.head_dim)
            out = decode_attention_step(qkv, self.kv_cache.kv, cos[0], sin[0], pos)
            return self.o_proj(out.reshape(b, 1, -1))
        if self.fused:
            q, k, v = self.qkv_proj(x).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        k, v = self.kv_cache.update(pos, k, v)
        # Grouped-query attention without copying K/V per query head: the `group` query heads that share a KV
        # head become `group` times as many query rows of that head (rows of the mask repeated to match).
        group = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, group * t, self.head_dim)
        if triton:
            out = decode_attention(q, k, v, pos)  # keys 0..pos[0]: the causal mask of a one-token step
        else:
            mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(mask.shape[0], 1, group * t, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused = False

    def fuse(self, swiglu: bool = True) -> None:
        """gate/up -> one gate_up_proj (rows stacked gate, up), registered before down_proj. swiglu: packed parts
        become the gate/up weight whose GEMM applies silu(gate) * up in its epilogue."""
        if self.fused:
            return
        parts = [self.gate_proj, self.up_proj]
        swiglu = swiglu and all(isinstance(p, QuantLinear) and p.form == "packed" for p in parts)
        gate_up, down = stack_linears(parts, swiglu=swiglu), self.down_proj
        if gate_up is None:
            return
        for name in ("gate_proj", "up_proj", "down_proj"):
            delattr(self, name)
        self.gate_up_proj, self.down_proj = gate_up, down
        self.fused = True

    def forward(self, x):
        if self.fused and getattr(self.gate_up_proj, "swiglu", False):  # the layer applies silu(gate) * up itself
            return self.down_proj(self.gate_up_proj(x))
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, pos, mask, residual=None):
        """-> (MLP output, the residual it is to be added to). The block's last addition is left to the next block
        (or the final norm), where it fuses with that block's input norm: one kernel fewer per block."""
        normed, x = self.input_layernorm.add_and_norm(x, residual)
        normed, h = self.post_attention_layernorm.add_and_norm(self.self_attn(normed, cos, sin, pos, mask), x)
        return self.mlp(normed), h


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """forward(tokens [B, T], pos [T]) -> logits [B, T, vocab], reading and writing the static KV cache."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_len = self.max_batch = 0
        self.padded = False

    @classmethod
    def from_model(cls, model, fuse: bool = False, swiglu: bool = True) -> LlamaDecoder:
        """The decoder running `model`'s own modules and parameters (a transformers LlamaForCausalLM, bf16 or with
        QuantLinear layers, packed or not): nothing is copied. fuse: stack q/k/v and gate/up (fuse_projections);
        the model's separate layers are then views of the stacked weight (nn.Linear) or released (packed QuantLinear:
        calling them raises), so keep fuse=False where the transformers model must still run."""
        check_model(model)
        with torch.device("meta"):
            decoder = cls(model.config)
        source = model.model
        decoder.model.embed_tokens = source.embed_tokens
        decoder.model.norm.weight = source.norm.weight
        decoder.lm_head = model.lm_head
        for ours, theirs in zip(decoder.model.layers, source.layers, strict=True):
            ours.input_layernorm.weight = theirs.input_layernorm.weight
            ours.post_attention_layernorm.weight = theirs.post_attention_layernorm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(ours.self_attn, name, getattr(theirs.self_attn, name))
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(ours.mlp, name, getattr(theirs.mlp, name))
        if fuse:
            decoder.fuse_projections(swiglu)
        return decoder.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.embed_tokens.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.embed_tokens.parameters()).device

    def fuse_projections(self, swiglu: bool = True) -> LlamaDecoder:
        """Stack q/k/v and gate/up of every block into one linear each (exact; see the module docstring); swiglu:
        packed gate/up with the activation in the GEMM's epilogue (MLP.fuse)."""
        for block in self.model.layers:
            block.self_attn.fuse()
            block.mlp.fuse(swiglu)
        return self

    def set_decode_attention(self, impl: str) -> LlamaDecoder:
        """'sdpa' (masked SDPA over the whole cache) or 'triton' (split-K kernel over the filled part, CUDA)."""
        if impl not in ("sdpa", "triton"):
            raise ValueError(f"decode attention {impl!r}: use 'sdpa' or 'triton'")
        head_dim = self.model.layers[0].self_attn.head_dim
        if impl == "triton" and not serves_head_dim(head_dim):
            log.warning("decode attention runs masked SDPA: the Triton kernel takes head_dim a power of two >= 16, "
                        "this model's is %d", head_dim)
            impl = "sdpa"
        for block in self.model.layers:
            block.self_attn.decode_attention = impl
        return self

    def set_decode_norm(self, impl: str) -> LlamaDecoder:
        """'compiled' (PyTorch ops, fused by torch.compile) or 'triton' (rmsnorm.add_rms_norm on CUDA) for every
        residual add + RMSNorm."""
        if impl not in ("compiled", "triton"):
            raise ValueError(f"decode norm {impl!r}: use 'compiled' or 'triton'")
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = impl
        return self

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate the KV cache and the RoPE / causal-mask tables for `batch` sequences of up to `max_len` tokens."""
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"{max_len} positions asked for, the model has {limit} (max_position_embeddings)")
        dtype, device = self.dtype, self.device
        for block in self.model.layers:
            attn = block.self_attn
            attn.kv_cache = KVCache(batch, attn.kv_heads, max_len, attn.head_dim, dtype, device)
        cos, sin = rope_tables(self.config, self.model.layers[0].self_attn.head_dim, max_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("pad", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.max_len, self.max_batch, self.padded = max_len, batch, False

    def set_padding(self, pad: torch.Tensor) -> None:
        """pad [B]: how many left-padding tokens each sequence of the batch starts with (see the module docstring)."""
        self.pad.copy_(pad)
        self.padded = bool((pad > 0).any())

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """last_only: logits of the last position alone ([B, 1, vocab]), as a prefill needs."""
        if self.max_len == 0:
            raise RuntimeError("call setup_caches(batch, max_len) before running the decoder")
        x = self.model.embed_tokens(tokens)
        mask = self.causal_mask[pos][None, None]  # [1, 1, T, max_len]: each new token sees the positions up to it
        if self.padded:
            rope_pos = (pos[None] - self.pad[:, None]).clamp_min(0)  # [B, T]: positions from the first real token
            cos, sin = self.rope_cos[rope_pos][:, None], self.rope_sin[rope_pos][:, None]
            keys = torch.arange(self.max_len, device=pos.device)
            real = keys[None] >= self.pad[:, None]  # [B, max_len]: the padding is no key
            mask = mask & real[:, None, None] | (keys[None] == pos[:, None])[None, None]  # a pad row sees itself
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        residual = None
        for block in self.model.layers:
            x, residual = block(x, cos, sin, pos, mask, residual)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        return self.lm_head(self.model.norm.add_and_norm(x, residual)[0])
