"""The residual add + RMSNorm op of the decode bench: the reference against the decoder's RMSNorm, the op's checks,
and on the GPU the Triton kernel against the reference and inside the decoder."""

from __future__ import annotations

import pytest
import torch

from any4lib.engine.model import RMSNorm
from any4lib.engine.rmsnorm import add_rms_norm, add_rms_norm_reference


def _inputs(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x, residual = (torch.randn(shape, generator=gen, device=device).to(dtype) * 3 for _ in range(2))
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen, device=device)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_the_decoders_norm_of_the_sum(dtype):
    x, residual, weight = _inputs((2, 3, 96), dtype)
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data.copy_(weight)
    normed, total = add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual) and torch.equal(normed, norm(x + residual))
    assert torch.equal(norm.add_and_norm(x, residual)[0], normed)
    normed, total = add_rms_norm(x, None, weight, 1e-5)
    assert total is x and torch.equal(normed, norm(x))
    # Against float64: RMSNorm(v) = v / sqrt(mean(v^2) + eps) * weight, to the dtype's rounding.
    v = (x + residual).double()
    exact = v / (v.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(add_rms_norm(x, residual, weight, 1e-5)[0].double(), exact, rtol=tol, atol=tol)


def test_opcheck_on_cpu():
    x, residual, weight = _inputs((3, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.any4lib_engine.add_rms_norm, (x, residual, weight, 1e-5))
    torch.library.opcheck(torch.ops.any4lib_engine.add_rms_norm, (x, None, weight, 1e-5))


def test_bad_inputs_say_what_was_expected():
    x, residual, weight = _inputs((3, 64), torch.bfloat16)
    with pytest.raises(ValueError, match=r"residual \(3, 32\).*must match x \(3, 64\)"):
        add_rms_norm(x, residual[:, :32], weight, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[64\] torch.bfloat16"):
        add_rms_norm(x, residual, weight.float(), 1e-5)
    from any4lib.engine.model import LlamaDecoder
    from any4lib.engine.random_weights import model_config

    with pytest.raises(ValueError, match="use 'compiled' or 'triton'"):
        LlamaDecoder(model_config("tiny")).set_decode_norm("fused")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (16, 4096), (3, 5, 128), (2, 5000), (4, 8192)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_kernel_matches_the_reference_on_gpu(shape, dtype):
    x, residual, weight = _inputs(shape, dtype, "cuda")
    for res in (residual, None):
        normed, total = add_rms_norm(x, res, weight, 1e-5)
        ref_normed, ref_total = add_rms_norm_reference(x, res, weight, 1e-5)
        assert torch.equal(total, ref_total)
        # The sums of squares add up in another order and rsqrt may differ in its last bits (~1e-6 relative): in
        # 16-bit dtypes the final rounding hides that but for a step or two; float32 shows it as it is.
        steps = 16 if dtype == torch.float32 else 2
        step = torch.finfo(dtype).eps * ref_normed.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((normed.float() - ref_normed.float()).abs() <= steps * step).all()
        if dtype != torch.float32:
            assert (normed == ref_normed).float().mean() > 0.9


@pytest.mark.gpu
@needs_cuda
def test_opcheck_on_gpu():
    x, residual, weight = _inputs((3, 4096), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.any4lib_engine.add_rms_norm, (x, residual, weight, 1e-5))
    torch.library.opcheck(torch.ops.any4lib_engine.add_rms_norm, (x, None, weight, 1e-5))
