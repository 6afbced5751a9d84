"""Decode attention over a static KV cache: one query token per sequence, split-K ("flash-decoding") in Triton.

    out = decode_attention(q, k_cache, v_cache, pos)   # q [B, Hkv, G, D]; caches [B, Hkv, max_len, D]; pos [1]
    out = decode_attention_step(qkv, kv, cos, sin, pos)  # the same from the fused q/k/v projection [B, H + 2 Hkv, D]:
                                                         # RoPE and the cache write of k, v [2, B, Hkv, N, D] inside

Each program takes one (sequence, KV head) and one contiguous slice of the cache: the G query heads that share
that KV head are the rows of one tl.dot, so each K/V tile is read once for all of them (grouped-query attention
without repeating K/V). Keys past pos[0] (read on the device, so one CUDA graph serves every step) are masked;
slices entirely past it exit after one load. A second kernel merges the slices' partial softmax sums. On sm_90+ both
allow the kernel queued after them to launch at their first instruction (programmatic dependent launch), and both
are launched so, waiting for the kernel before them to finish before their first load: the split kernel behind the
q/k/v GEMM, the merge kernel behind the split kernel, the o_proj GEMM behind the merge kernel.

`decode_attention_step` (the decoder's one-token step with fused projections) also does what took two more kernels
a layer before: RoPE of q and k at pos and the cache write of the new k and v. Each split program applies RoPE to
its q rows and its KV head's new key as it loads them, reads keys below pos from the cache and the new key and value
at pos from the projection, and the program whose slice holds pos writes them to the cache (no program reads that
position from the cache in this step, so the write races with nothing).

The ops are opaque to torch.compile (torch.library.custom_op with a fake kernel), so compiled blocks and CUDA graphs
call them as they are. Triton is imported on first use: importing this module needs only torch.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK_N = 32  # keys per tile
MIN_ROWS = 16  # tl.dot needs 16 rows: the G query heads are padded with masked rows


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rope(X, offs, mask, COS, SIN, D: tl.constexpr):
        # The heads at X + offs [.., D] (0 where masked) rotated as transformers' Llama does (the halves of a head
        # form the pairs: x * cos + cat(-x2, x1) * sin), cos and sin rounded to x's dtype first, then one rounding.
        offs_d = tl.arange(0, D)
        x = tl.load(X + offs, mask=mask, other=0.0)
        partner = tl.load(X + offs - offs_d + (offs_d + D // 2) % D, mask=mask, other=0.0)
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
        cos = tl.load(COS + offs_d).to(x.dtype).to(tl.float32)
        sin = tl.load(SIN + offs_d).to(x.dtype).to(tl.float32)
        return (x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin).to(x.dtype)

    globals()["rope"] = rope  # Triton (and its interpreter) resolve a kernel's callees in its module, not its closure

    @triton.jit
    def split_kernel(Q, K, V, POS, ACC, M, L, COS, SIN,
                     sqb, sqh, sqg, skb, skh, skn, svb, svh, svn,
                     G, S, chunk, qk_scale,
                     HKV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                     TILES: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, FRESH: tl.constexpr):
        # FRESH: Q is the fused projection [B, HKV * G + 2 HKV, D] of the new token (q heads, then k, then v), not
        # yet rotated, and K / V hold keys and values below POS only (decode_attention_step).
        if PDL:  # the merge kernel may launch now; this grid waits for the kernel before it (sm_90+)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        pos = tl.load(POS).to(tl.int32)
        length = pos + 1
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK)
        q_offs = b * sqb + h * sqh + offs_g[:, None] * sqg + offs_d[None, :]
        cached = length  # keys read from the cache: 0..cached - 1
        if FRESH:
            q = rope(Q, q_offs, offs_g[:, None] < G, COS, SIN, D)
            k_new = rope(Q, b * sqb + (HKV * G + h) * D + offs_d, offs_d < D, COS, SIN, D)
            v_new = tl.load(Q + b * sqb + (HKV * G + HKV + h) * D + offs_d)
            cached = pos
            if (start <= pos) & (pos < start + chunk):  # this program's slice holds pos: the cache write
                tl.store(K + b * skb + h * skh + pos * skn + offs_d, k_new)
                tl.store(V + b * svb + h * svh + pos * svn + offs_d, v_new)
        else:
            q = tl.load(Q + q_offs, mask=offs_g[:, None] < G, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for i in range(TILES):  # a constant trip count; tiles past the filled part are skipped
            n0 = start + i * BLOCK
            if n0 < end:
                n = n0 + offs_n
                valid = n < end
                k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :],
                            mask=(n < cached)[:, None], other=0.0)
                if FRESH:
                    k = tl.where((n == pos)[:, None], k_new[None, :], k)
                if IEEE:
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))
                scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))  # log2 units
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :],
                            mask=(n < cached)[:, None], other=0.0)
                if FRESH:
                    v = tl.where((n == pos)[:, None], v_new[None, :], v)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        rows = (bh * S + s) * G + offs_g
        keep = offs_g < G
        tl.store(M + rows, m_i, mask=keep)
        tl.store(L + rows, l_i, mask=keep)
        tl.store(ACC + rows[:, None] * D + offs_d[None, :], acc, mask=keep[:, None])

    @triton.jit
    def combine_kernel(ACC, M, L, OUT, sob, soh, sog, G, S,
                       HKV: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            # The o_proj GEMM may start now: it waits for this grid's completion before reading (sm_90+). This grid
            # is launched early too, behind the split kernel, and waits for its partial sums.
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        bh = tl.program_id(0)
        g = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        rows = (bh * S + offs_s) * G + g
        live = offs_s < S
        m = tl.load(M + rows, mask=live, other=float("-inf"))
        l = tl.load(L + rows, mask=live, other=0.0)
        m_max = tl.max(m, 0)  # finite: the first slice always holds position 0
        w = tl.exp2(m - m_max)  # empty slices (m = -inf) weigh 0
        acc = tl.load(ACC + rows[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        b = bh // HKV
        h = bh % HKV
        tl.store(OUT + b * sob + h * soh + g * sog + offs_d, out.to(OUT.dtype.element_ty))

    return triton, split_kernel, combine_kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def split_plan(programs: int, max_len: int, sms: int) -> tuple[int, int]:
    """(slices, keys per slice) so that programs x slices is about two waves of `sms`, each slice >= one tile."""
    tiles = math.ceil(max_len / BLOCK_N)
    want = max(1, min(tiles, math.ceil(2 * sms / programs)))
    chunk = BLOCK_N * math.ceil(tiles / want)
    return math.ceil(max_len / chunk), chunk


def serves_head_dim(d: int) -> bool:
    """Whether the kernels take heads of d values (tl.dot tiles: a power of two, at least 16)."""
    return d >= 16 and not d & (d - 1)


def _split_and_merge(src: torch.Tensor, src_strides: tuple[int, int, int], g: int, k: torch.Tensor, v: torch.Tensor,
                     pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, scale: float | None
                     ) -> torch.Tensor:
    """Launches the two kernels; -> [B, Hkv, G, D]. src: q [B, Hkv, G, D] with strides (batch, KV head, query head
    of the group), or with `rope` = (cos, sin) the fused projection (see split_kernel's FRESH)."""
    triton, split_kernel, combine_kernel = _kernels()
    batch, hkv, n, d = k.shape
    if not serves_head_dim(d):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sms = torch.cuda.get_device_properties(src.device).multi_processor_count if src.is_cuda else 132
    slices, chunk = split_plan(batch * hkv, n, sms)
    pdl = src.is_cuda and torch.cuda.get_device_capability(src.device)[0] >= 9
    early = {"launch_pdl": True} if pdl else {}
    acc = torch.empty(batch * hkv, slices, g, d, device=src.device, dtype=torch.float32)
    m = torch.empty(batch * hkv, slices, g, device=src.device, dtype=torch.float32)
    l = torch.empty_like(m)
    out = torch.empty(batch, hkv, g, d, device=src.device, dtype=src.dtype)
    cos, sin = rope if rope is not None else (src, src)  # unread without FRESH
    split_kernel[(batch * hkv, slices)](
        src, k, v, pos, acc, m, l, cos, sin,
        *src_strides, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        g, slices, chunk, scale * math.log2(math.e),
        HKV=hkv, BLOCK_G=max(MIN_ROWS, _next_pow2(g)), BLOCK=BLOCK_N, D=d, TILES=chunk // BLOCK_N,
        IEEE=src.dtype == torch.float32, PDL=pdl, FRESH=rope is not None, num_warps=4, num_stages=2, **early,
    )
    combine_kernel[(batch * hkv, g)](acc, m, l, out, out.stride(0), out.stride(1), out.stride(2), g, slices,
                                     HKV=hkv, BLOCK_S=max(2, _next_pow2(slices)), D=d, PDL=pdl, num_warps=4, **early)
    return out


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, keys 0..pos[0]) v for q [B, Hkv, G, D] over caches [B, Hkv, N, D] -> [B, Hkv, G, D]."""
    return _split_and_merge(q, (q.stride(0), q.stride(1), q.stride(2)), q.shape[2], k, v, pos, None, scale)


def _step_heads(qkv: torch.Tensor, kv: torch.Tensor) -> tuple[int, int]:
    """(KV heads, query heads per KV head) of a fused projection [B, Hkv * (G + 2), D] and a cache [2, B, Hkv, N, D]."""
    batch, heads, d = qkv.shape
    hkv = kv.shape[2]
    if kv.dim() != 5 or kv.shape[0] != 2 or kv.shape[1] != batch or kv.shape[4] != d or heads % hkv or heads < 3 * hkv:
        raise ValueError(f"decode_attention_step: qkv [B, Hkv * (G + 2), D] and kv [2, B, Hkv, N, D] do not match: "
                         f"qkv {tuple(qkv.shape)}, kv {tuple(kv.shape)}")
    return hkv, heads // hkv - 2


def decode_attention_step_triton(qkv: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                 pos: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """decode_attention_step's CUDA kernels: qkv [B, Hkv * (G + 2), D] contiguous, kv [2, B, Hkv, N, D] (written at
    pos), cos / sin [D] float32 -> [B, Hkv, G, D]."""
    hkv, g = _step_heads(qkv, kv)
    d = qkv.shape[2]
    return _split_and_merge(qkv, (qkv.stride(0), g * d, d), g, kv[0], kv[1], pos, (cos, sin), scale)


def decode_attention_reference(q, k, v, pos, scale: float | None = None) -> torch.Tensor:
    """The same function in plain PyTorch (float32 math): what the kernel is tested against."""
    length = int(pos.reshape(-1)[0]) + 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.float() @ k[:, :, :length].float().transpose(-1, -2) * scale
    return (scores.softmax(-1) @ v[:, :, :length].float()).to(q.dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama applies it: the two halves of the head dimension form the rotated pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def decode_attention_step_reference(qkv, kv, cos, sin, pos, scale: float | None = None) -> torch.Tensor:
    """decode_attention_step in plain PyTorch: RoPE, the cache write, then decode_attention_reference."""
    hkv, g = _step_heads(qkv, kv)
    batch, _, d = qkv.shape
    q, k, v = qkv.split([hkv * g, hkv, hkv], 1)
    q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    kv.index_copy_(3, pos.reshape(1), torch.stack([k, v])[:, :, :, None])
    return decode_attention_reference(q.reshape(batch, hkv, g, d), kv[0], kv[1], pos, scale)


@torch.library.custom_op("any4lib_engine::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence over the cache: q [B, Hkv, G, D], k/v [B, Hkv, N, D], pos [1]."""
    if q.is_cuda:
        return decode_attention_triton(q.contiguous(), k, v, pos)
    return decode_attention_reference(q, k, v, pos)


@decode_attention.register_fake
def _(q, k, v, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("any4lib_engine::decode_attention_step", mutates_args=("kv",))
def decode_attention_step(qkv: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          pos: torch.Tensor) -> torch.Tensor:
    """One decode step's attention from the fused projection of the new token, qkv [B, Hkv * (G + 2), D] (query heads,
    then keys, then values): RoPE of q and k with cos / sin [D] (the angles at pos), k and v written into the cache
    kv [2, B, Hkv, N, D] at pos[0], then attention of q over keys 0..pos[0]. -> [B, Hkv, G, D]."""
    if qkv.is_cuda:
        return decode_attention_step_triton(qkv.contiguous(), kv, cos, sin, pos)
    return decode_attention_step_reference(qkv, kv, cos, sin, pos)


@decode_attention_step.register_fake
def _(qkv, kv, cos, sin, pos):
    hkv, g = _step_heads(qkv, kv)
    return qkv.new_empty(qkv.shape[0], hkv, g, qkv.shape[2])
