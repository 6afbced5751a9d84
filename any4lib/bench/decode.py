"""A small Llama decoder with a static KV cache and a greedy generation loop (gpt-fast style), for timing decode.

Parameter names follow transformers' LlamaForCausalLM, so its state dict loads as is. The model is built from a
transformers LlamaConfig (dimensions only) and is meant for speed: default RoPE, no dropout, no padding, one prompt
length for the whole batch.

Three decode-speed options, all rewrites of the same function:
- `fuse_projections()`: q/k/v become one linear (qkv_proj) and gate/up one (gate_up_proj), their weights stacked
  by output rows. Per-row and per-group quantized formats quantize row by row, so stacking the quantized parts
  is the same quantized model with fewer, larger GEMMs. A gate_up_proj whose `swiglu` attribute is true returns
  silu(gate) * up itself (the tinygemm epilogue, kernels.PackedWeight.from_gate_up).
- `decode_attention = "triton"`: a one-token step on CUDA reads the cache through a split-K Triton kernel
  (`attention.py`) that stops at the filled length, instead of SDPA with a boolean mask over the whole cache; with
  fused projections the same kernel also applies RoPE and writes the new key and value into the cache.
- `set_decode_norm("triton")`: each residual add + RMSNorm on CUDA is one Triton kernel (`rmsnorm.py`) that lets
  the tinygemm GEMM after it start early, instead of the kernel torch.compile fuses from the same ops (same
  roundings; the fp32 sum of squares may add up in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import decode_attention, decode_attention_step, rotate_half
from .rmsnorm import add_rms_norm, add_rms_norm_reference


def rope_theta(config) -> float:
    """RoPE base from a LlamaConfig of transformers 4.x (rope_theta) or 5.x (rope_parameters)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"only default RoPE is implemented here, the config asks for {rope_type!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


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


def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One bias-free Linear whose output rows are those of `linears` in order (works on the meta device too).
    Its `split_sizes` attribute keeps the parts' output sizes."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("stack_linears: only bias-free linears")
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.split_sizes = [lin.out_features for lin in linears]
    return fused


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
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            delattr(self, name)
        self.qkv_proj, self.o_proj = qkv, o
        self.fused = True

    def forward(self, x, cos, sin, pos, mask):
        b, t, _ = x.shape
        if t == 1 and self.fused and self.decode_attention == "triton" and x.is_cuda:
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
        if t == 1 and self.decode_attention == "triton" and q.is_cuda:
            out = decode_attention(q, k, v, pos)  # keys 0..pos[0]: the causal mask of a one-token step
        else:
            mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(1, 1, group * t, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused = False

    def fuse(self) -> None:
        """gate/up -> one gate_up_proj (rows stacked gate, up), registered before down_proj."""
        if self.fused:
            return
        gate_up, down = stack_linears([self.gate_proj, self.up_proj]), self.down_proj
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
        self.max_len = 0

    def fuse_projections(self) -> LlamaDecoder:
        """Stack q/k/v and gate/up of every block into one linear each (exact; see the module docstring)."""
        for block in self.model.layers:
            block.self_attn.fuse()
            block.mlp.fuse()
        return self

    def set_decode_attention(self, impl: str) -> LlamaDecoder:
        """'sdpa' (masked SDPA over the whole cache) or 'triton' (split-K kernel over the filled part, CUDA)."""
        if impl not in ("sdpa", "triton"):
            raise ValueError(f"decode attention {impl!r}: use 'sdpa' or 'triton'")
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
        ref = self.model.norm.weight
        dtype, device = self.model.embed_tokens.weight.dtype, ref.device
        for block in self.model.layers:
            attn = block.self_attn
            attn.kv_cache = KVCache(batch, attn.kv_heads, max_len, attn.head_dim, dtype, device)
        head_dim = self.model.layers[0].self_attn.head_dim
        theta = rope_theta(self.config)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], -1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """last_only: logits of the last position alone ([B, 1, vocab]), as a prefill needs."""
        if self.max_len == 0:
            raise RuntimeError("call setup_caches(batch, max_len) before running the decoder")
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        mask = self.causal_mask[pos][None, None]  # [1, 1, T, max_len]: each new token sees the positions up to it
        residual = None
        for block in self.model.layers:
            x, residual = block(x, cos, sin, pos, mask, residual)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        return self.lm_head(self.model.norm.add_and_norm(x, residual)[0])


def _chunks(n: int) -> int:
    """The divisor of n nearest sqrt(n) from below (1 when n is prime)."""
    for c in range(int(n**0.5), 0, -1):
        if n % c == 0:
            return c
    return 1


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of logits [B, V], in two short reductions instead of one long one.

    One row of 128k logits is one long serial reduction on the GPU (~37 us on an H100 at B = 1); split into ~sqrt(V)
    chunks it is two small parallel ones. Ties resolve as argmax does, to the first index: max returns the first
    maximum of each chunk, argmax the first chunk holding the largest.
    """
    b, v = logits.shape
    c = _chunks(v)
    if c == 1:
        return logits.argmax(-1)
    values, index = logits.view(b, c, v // c).max(-1)
    best = values.argmax(-1, keepdim=True)
    return best[:, 0] * (v // c) + index.gather(-1, best)[:, 0]


def decode_step(model: LlamaDecoder, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One greedy step: token [B] at position pos [1] -> the next token [B]."""
    return greedy(model(token[:, None], pos)[:, -1])


def prefill(model: LlamaDecoder, prompt: torch.Tensor) -> torch.Tensor:
    """Run the prompt [B, T] through the model from position 0; returns the first generated token [B]."""
    pos = torch.arange(prompt.shape[1], device=prompt.device)
    return greedy(model(prompt, pos, last_only=True)[:, -1])


def decode(model: LlamaDecoder, token: torch.Tensor, start: int, steps: int, step=decode_step) -> torch.Tensor:
    """`steps` greedy steps from token [B] at position `start` -> [B, steps]. `step` may be compiled / graphed."""
    if start + steps > model.max_len:
        raise ValueError(f"decoding to position {start + steps} overruns the cache of {model.max_len} positions")
    pos = torch.tensor([start], device=token.device)
    out = []
    for _ in range(steps):
        # Clone: a CUDA-graphed step reuses its output buffer on the next replay.
        token = step(model, token, pos).clone()
        out.append(token)
        pos += 1
    return torch.stack(out, 1)


def generate(model: LlamaDecoder, prompt: torch.Tensor, new_tokens: int, step=decode_step) -> torch.Tensor:
    """Greedy continuation of prompt [B, T] by `new_tokens` tokens -> [B, new_tokens]."""
    first = prefill(model, prompt)
    rest = decode(model, first, prompt.shape[1], new_tokens - 1, step)
    return torch.cat([first[:, None], rest], 1)

