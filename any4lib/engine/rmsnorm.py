"""Residual add + RMSNorm in one Triton kernel that lets the next kernel start early (decode on sm_90+).

    normed, total = add_rms_norm(x, residual, weight, eps)   # x, residual [..., D] (residual may be None)

total = x + residual, rounded to x's dtype (x itself when residual is None), and normed = RMSNorm(total): the same
function and roundings as `decode.RMSNorm` applied to the sum, which torch.compile fuses into one kernel too. What
this kernel adds is programmatic dependent launch on sm_90+, both ways: its first instruction allows the kernel
queued after it to launch, and it is itself launched early, waiting for the previous kernel's output before its
first load. The tinygemm GEMM that follows every norm of a decoder block streams its weight in and builds its tables
while this kernel runs; the GEMM before it (which allows dependents at its top) hides this kernel's launch. One
program normalises one row (D <= 16384). The op is opaque to torch.compile (a custom op with a fake kernel); Triton
is imported on first use.
"""

from __future__ import annotations

import functools

import torch

MAX_DIM = 16384  # one row in one program's registers


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(X, R, W, NORMED, TOTAL, D, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            # The dependent waits for this grid's completion before reading: allowing it at once is safe. This grid
            # is itself launched early (behind a GEMM that allows it at its top) and waits for that kernel's
            # output before its first load.
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        live = offs < D
        total = tl.load(X + row * D + offs, mask=live, other=0.0)
        if HAS_RESIDUAL:  # the sum, rounded once to the dtype, as the unfused x + residual is
            total = (total.to(tl.float32) + tl.load(R + row * D + offs, mask=live, other=0.0).to(tl.float32))
            total = total.to(TOTAL.dtype.element_ty)
            tl.store(TOTAL + row * D + offs, total, mask=live)
        t = total.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(t * t, 0) / D + eps)
        normed = (t * inv_rms).to(NORMED.dtype.element_ty)  # rounded, then scaled by the weight: RMSNorm's order
        w = tl.load(W + offs, mask=live, other=0.0)
        tl.store(NORMED + row * D + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(NORMED.dtype.element_ty),
                 mask=live)

    return add_rms_norm_kernel


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    d = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    if weight.shape != (d,) or weight.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: weight must be [{d}] {x.dtype} (x's last dim and dtype), got "
                         f"{tuple(weight.shape)} {weight.dtype}")


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d > MAX_DIM:
        raise ValueError(f"add_rms_norm: the Triton kernel normalises rows of up to {MAX_DIM} values, got {d}")
    x = x.contiguous()
    normed = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    rows = x.numel() // d
    if rows:
        import triton

        pdl = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9  # (CPU: Triton's interpreter)
        block = triton.next_power_of_2(d)
        _kernel()[(rows,)](x, x if residual is None else residual.contiguous(), weight, normed, total, d, eps,
                           HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
                           num_warps=max(1, min(16, block // 512)), **({"launch_pdl": True} if pdl else {}))
    return normed, total


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x + residual in plain PyTorch (decode.RMSNorm's arithmetic, which torch.compile fuses): the sum
    rounded to the dtype, the normalised value rounded, then scaled by the weight."""
    total = x if residual is None else x + residual
    tf = total.float()
    normed = (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed, total


@torch.library.custom_op("any4lib_engine::add_rms_norm", mutates_args=())
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  eps: float) -> list[torch.Tensor]:
    """[normed, total], or [normed] alone without a residual (a custom op may not return its input x)."""
    run = add_rms_norm_triton if x.is_cuda else add_rms_norm_reference
    normed, total = run(x, residual, weight, eps)
    return [normed] if residual is None else [normed, total]


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(1 if residual is None else 2)]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x, residual [..., D] and weight [D], all of one dtype;
    residual None: (RMSNorm(x) * weight, x). On CUDA one Triton kernel (see the module docstring), elsewhere the
    reference arithmetic.
    """
    _check(x, residual, weight)
    out = _add_rms_norm(x, residual, weight, eps)
    return (out[0], x) if residual is None else (out[0], out[1])
