"""Decode attention over a static KV cache: one query token per sequence, split-K ("flash-decoding") in Triton.

    out = decode_attention(q, k_cache, v_cache, pos)   # q [B, Hkv, G, D]; caches [B, Hkv, max_len, D]; pos [1]

Each program takes one (sequence, KV head) and one contiguous slice of the cache: the G query heads that share
that KV head are the rows of one tl.dot, so each K/V tile is read once for all of them (grouped-query attention
without repeating K/V). Keys past pos[0] (read on the device, so one CUDA graph serves every step) are masked;
slices entirely past it exit after one load. A second kernel merges the slices' partial softmax sums. On sm_90+ both
allow the kernel queued after them to launch at their first instruction (programmatic dependent launch): the merge
kernel is launched so, and waits for the split kernel's sums before its loads; the o_proj GEMM after it waits for
its output the same way. The op is
opaque to torch.compile (torch.library.custom_op with a fake kernel), so compiled blocks and CUDA graphs call it
as is. Triton is imported on first use: importing this module needs only torch.
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
    def split_kernel(Q, K, V, POS, ACC, M, L,
                     sqb, sqh, sqg, skb, skh, skn, svb, svh, svn,
                     G, S, chunk, qk_scale,
                     HKV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                     TILES: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the merge kernel may launch now: it waits for this grid's completion before reading (sm_90+)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        length = tl.load(POS).to(tl.int32) + 1
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK)
        q = tl.load(Q + b * sqb + h * sqh + offs_g[:, None] * sqg + offs_d[None, :],
                    mask=offs_g[:, None] < G, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for i in range(TILES):  # a constant trip count; tiles past the filled part are skipped
            n0 = start + i * BLOCK
            if n0 < end:
                n = n0 + offs_n
                valid = n < end
                k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :], mask=valid[:, None],
                            other=0.0)
                if IEEE:
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))
                scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))  # log2 units
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :], mask=valid[:, None],
                            other=0.0)
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


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, keys 0..pos[0]) v for q [B, Hkv, G, D] over caches [B, Hkv, N, D] -> [B, Hkv, G, D]."""
    triton, split_kernel, combine_kernel = _kernels()
    batch, hkv, g, d = q.shape
    n = k.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    slices, chunk = split_plan(batch * hkv, n, sms)
    pdl = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    acc = torch.empty(batch * hkv, slices, g, d, device=q.device, dtype=torch.float32)
    m = torch.empty(batch * hkv, slices, g, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    out = torch.empty_like(q)
    split_kernel[(batch * hkv, slices)](
        q, k, v, pos, acc, m, l,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        g, slices, chunk, scale * math.log2(math.e),
        HKV=hkv, BLOCK_G=max(MIN_ROWS, _next_pow2(g)), BLOCK=BLOCK_N, D=d, TILES=chunk // BLOCK_N,
        IEEE=q.dtype == torch.float32, PDL=pdl, num_warps=4, num_stages=2,
    )
    combine_kernel[(batch * hkv, g)](acc, m, l, out, out.stride(0), out.stride(1), out.stride(2), g, slices,
                                     HKV=hkv, BLOCK_S=max(2, _next_pow2(slices)), D=d, PDL=pdl, num_warps=4,
                                     **({"launch_pdl": True} if pdl else {}))
    return out


def decode_attention_reference(q, k, v, pos, scale: float | None = None) -> torch.Tensor:
    """The same function in plain PyTorch (float32 math): what the kernel is tested against."""
    length = int(pos.reshape(-1)[0]) + 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.float() @ k[:, :, :length].float().transpose(-1, -2) * scale
    return (scores.softmax(-1) @ v[:, :, :length].float()).to(q.dtype)


@torch.library.custom_op("any4lib_bench::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence over the cache: q [B, Hkv, G, D], k/v [B, Hkv, N, D], pos [1]."""
    if q.is_cuda:
        return decode_attention_triton(q.contiguous(), k, v, pos)
    return decode_attention_reference(q, k, v, pos)


@decode_attention.register_fake
def _(q, k, v, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)

