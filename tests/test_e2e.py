"""The engine's decoder on the benchmark's random-weight stand-in: against transformers' Llama, the quantized paths
against the model that multiplies by the dequantized weights, the Triton decode ops; and the e2e bench run itself
(CSV, provenance, resume) on a tiny config, through its entry points (run, parse_args, run_profile)."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from any4lib import quantize
from any4lib.bench.e2e import COLUMNS, parse_args, run
from any4lib.engine import random_weights as rw
from any4lib.engine.attention import (decode_attention, decode_attention_reference, decode_attention_step, rotate_half,
                                      split_plan)
from any4lib.engine.generate import generate_ids, make_step, prefill
from any4lib.engine.model import LlamaDecoder

TINY = rw.model_config("tiny")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches compiled graphs per code object (Block.forward), so blocks compiled by earlier tests would
    count toward its recompile limit; the bench resets it per run the same way."""
    torch._dynamo.reset()


def greedy_tokens(name: str, device="cpu", compile_mode="none", batch=2, prompt=12, new=6, dtype=torch.bfloat16,
                  **build):
    """Greedy tokens of the tiny model of method `name`; `build`: build_model's fuse / attention."""
    # reuse_budget_s=0: later blocks copy the first one's anyN codes, which halves the k-means time here.
    model, _ = rw.build_model(TINY, rw.method(name, 128), device, seed=3, reuse_budget_s=0.0, dtype=dtype,
                               progress=False, **build)
    return greedy_tokens_of(model, batch, prompt, new, compile_mode, device)


def greedy_tokens_of(model, batch=2, prompt=12, new=6, compile_mode="none", device="cpu"):
    """Greedy continuation of a seeded random prompt through the engine's loop and compiled step, as the bench runs."""
    model.setup_caches(batch, prompt + new)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        step = make_step(model, compile_mode, batch, device)
        return continuation(model, ids, new, step)


def continuation(model, prompt: torch.Tensor, new: int, step=None) -> torch.Tensor:
    """[B, new] greedy tokens after prompt [B, T] (caches set up already)."""
    return torch.tensor(generate_ids(model, prompt.tolist(), new, step=step).tokens)


def test_decoder_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=80, rope_theta=500000.0, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).double().eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    ours = LlamaDecoder(config).double()
    ours.load_state_dict(reference.state_dict())
    ours.setup_caches(batch=3, max_len=24)
    prompt = torch.randint(0, 80, (3, 9))
    with torch.no_grad():
        expected = reference(prompt).logits
        got = ours(prompt, torch.arange(9))
        # Both compute RMSNorm and RoPE tables in float32, each in its own order: float32 rounding apart.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Incremental decode through the static cache equals recomputing the whole sequence each step.
        tokens = continuation(ours, prompt, 8)
        full = torch.cat([prompt, tokens], 1)
        recomputed = reference(full[:, :-1]).logits[:, 8:].argmax(-1)
    assert torch.equal(tokens, recomputed)


def test_fused_projections_compute_the_same_model():
    config = rw.model_config("tiny")
    torch.manual_seed(1)
    ours = LlamaDecoder(config).double()
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    fused = LlamaDecoder(config).double()
    fused.load_state_dict(ours.state_dict())
    fused.fuse_projections()
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.qkv_proj.split_sizes == [128, 64, 64] and not hasattr(attn, "q_proj")
    assert [n for n, _ in fused.model.layers[0].named_children()] == [
        "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"]
    assert [n for n, _ in attn.named_children()] == ["qkv_proj", "o_proj"]
    assert [n for n, _ in mlp.named_children()] == ["gate_up_proj", "down_proj"]
    for m in (ours, fused):
        m.setup_caches(batch=2, max_len=20)
    prompt = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fused(prompt, torch.arange(7)), ours(prompt, torch.arange(7)), rtol=1e-12,
                                   atol=1e-12)
        assert torch.equal(continuation(fused, prompt, 6), continuation(ours, prompt, 6))


@pytest.mark.parametrize("name", ["int4:dequant", "any4:dequant", "nf4:dequant", "torch-int4"])
def test_fused_quantized_layers_stack_the_separate_ones(name):
    # Same random parts, each quantized on its own: the fused weight is the separate weights stacked, bit for bit.
    build = lambda fuse: rw.build_model(TINY, rw.method(name, 128), "cpu", seed=3, reuse_budget_s=0.0,  # noqa: E731
                                         progress=False, fuse=fuse)[0]
    fused, separate = build(True), build(False)
    x = torch.randn(3, TINY.hidden_size, dtype=torch.bfloat16)
    for i in range(TINY.num_hidden_layers):
        f, s = fused.model.layers[i], separate.model.layers[i]
        parts = [s.self_attn.q_proj(x), s.self_attn.k_proj(x), s.self_attn.v_proj(x)]
        assert torch.equal(f.self_attn.qkv_proj(x), torch.cat(parts, -1))
        assert torch.equal(f.mlp.gate_up_proj(x), torch.cat([s.mlp.gate_proj(x), s.mlp.up_proj(x)], -1))
    if name != "torch-int4":  # its CPU kernel blocks N, so stacking changes the float rounding order
        assert torch.equal(greedy_tokens_of(fused), greedy_tokens_of(separate))


def test_quantized_lm_head_option():
    meth = rw.method("int4:dequant:qhead", 128)
    assert meth.quant_head and meth.format == "int4" and meth.describe_head() == "int4:dequant"
    with pytest.raises(ValueError, match="bf16:qhead"):
        rw.method("bf16:qhead", 128)
    model, _ = rw.build_model(TINY, meth, "cpu", seed=3, progress=False)
    plain, _ = rw.build_model(TINY, rw.method("int4:dequant", 128), "cpu", seed=3, progress=False)
    assert isinstance(model.lm_head, rw.DequantizedLinear) and isinstance(plain.lm_head, torch.nn.Linear)
    # The same random head, quantized: close to the bf16 one, not equal.
    w_q, w_b = model.lm_head.weight, plain.lm_head.weight.float()
    assert 0 < (w_q - w_b).abs().max() < 0.2 * w_b.abs().max()


def _masked_sdpa(q, k, v, pos):
    # What the decoder's SDPA path computes for one token: keys 0..pos visible.
    mask = torch.arange(k.shape[2]) <= int(pos[0])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None, None, :])


@pytest.mark.parametrize("p", [0, 5, 39])
def test_decode_attention_reference_and_cpu_op_match_masked_sdpa(p):
    torch.manual_seed(p)
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    pos = torch.tensor([p])
    expected = _masked_sdpa(q, k, v, pos)
    torch.testing.assert_close(decode_attention_reference(q, k, v, pos), expected)
    torch.testing.assert_close(decode_attention(q, k, v, pos), expected)  # the custom op's CPU path


def _step_inputs(b, hkv, g, d, n, p, dtype=torch.float32, device="cpu"):
    """A fused projection of one token, a filled cache and the RoPE angles at position p."""
    qkv = torch.randn(b, hkv * (g + 2), d, device=device).to(dtype)
    kv = torch.randn(2, b, hkv, n, d, device=device).to(dtype)
    angles = (p + 1) * torch.rand(d // 2, device=device)
    cos, sin = torch.cat([angles, angles]).cos(), torch.cat([angles, angles]).sin()
    return qkv, kv, cos, sin, torch.tensor([p], device=device)


@pytest.mark.parametrize("p", [0, 17, 39])
def test_decode_attention_step_cpu_op_rotates_writes_the_cache_and_attends(p):
    torch.manual_seed(p)
    qkv, kv, cos, sin, pos = _step_inputs(2, 2, 3, 16, 40, p)
    before = kv.clone()
    out = decode_attention_step(qkv, kv, cos, sin, pos)
    q, k, v = qkv[:, :6], qkv[:, 6:8], qkv[:, 8:]
    # RoPE by its definition: each pair (x_i, x_{i + d/2}) turned by its angle.
    x1, x2 = k[..., :8], k[..., 8:]
    c, s = cos[:8], sin[:8]
    torch.testing.assert_close(kv[0, :, :, p], torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1))
    torch.testing.assert_close(kv[1, :, :, p], v)
    keep = torch.arange(40) != p
    assert torch.equal(kv[:, :, :, keep], before[:, :, :, keep])  # only position p is written
    expected = _masked_sdpa(rotate_half(q, cos, sin).reshape(2, 2, 3, 16), kv[0], kv[1], pos)
    torch.testing.assert_close(out, expected)


def test_decode_attention_ops_pass_opcheck():
    # Schemas (the cache declared mutated), fake kernels and their shapes, as torch.compile will use them.
    torch.manual_seed(0)
    torch.library.opcheck(decode_attention_step, _step_inputs(2, 2, 3, 16, 40, 7))
    q, k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    torch.library.opcheck(decode_attention, (q, k, v, torch.tensor([7])))


def test_split_plan_covers_the_cache():
    for programs, max_len in [(8, 640), (32, 640), (128, 640), (1, 17), (8, 8192)]:
        slices, chunk = split_plan(programs, max_len, 132)
        assert chunk % 32 == 0 and slices * chunk >= max_len and (slices - 1) * chunk < max_len
    assert split_plan(8, 640, 132)[0] >= 10  # one sequence: the cache is split so that ~all SMs work


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode on CPU)")
def test_decode_attention_triton_kernel_in_interpreter():
    # Triton's CPU interpreter runs the kernel's own code (its bf16 dot is broken there: fp32 and fp16 only).
    code = """
import torch
from any4lib.engine.attention import decode_attention_triton, decode_attention_reference
torch.manual_seed(0)
for b, hkv, g, d, n, p, dtype, tol in [(1, 2, 4, 64, 100, 70, torch.float32, 1e-5), (2, 2, 4, 32, 64, 0, torch.float32, 1e-5),
                                       (3, 1, 3, 32, 130, 129, torch.float32, 1e-5), (2, 2, 4, 64, 200, 150, torch.float16, 2e-3)]:
    q, k, v = (torch.randn(b, hkv, m, d).to(dtype) for m in (g, n, n))
    pos = torch.tensor([p])
    out = decode_attention_triton(q, k, v, pos)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), pos)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, (b, hkv, g, d, n, p, dtype, err)
# The decode step from a fused projection (RoPE and the cache write in the split kernel) against its reference.
from any4lib.engine.attention import decode_attention_step_triton, decode_attention_step_reference
for b, hkv, g, d, n, p, dtype, tol in [(1, 2, 4, 64, 100, 70, torch.float32, 1e-5), (2, 1, 3, 32, 130, 0, torch.float32, 1e-5),
                                       (2, 2, 1, 32, 64, 63, torch.float16, 2e-3)]:
    qkv = torch.randn(b, hkv * (g + 2), d).to(dtype)
    kv = torch.randn(2, b, hkv, n, d).to(dtype)
    angles = torch.rand(d // 2) * p
    cos, sin = torch.cat([angles, angles]).cos(), torch.cat([angles, angles]).sin()
    pos = torch.tensor([p])
    kv_ref = kv.double()
    out = decode_attention_step_triton(qkv, kv, cos, sin, pos)
    ref = decode_attention_step_reference(qkv.double(), kv_ref, cos.double(), sin.double(), pos)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, (b, hkv, g, d, n, p, dtype, err)
    torch.testing.assert_close(kv.double(), kv_ref, rtol=tol, atol=tol)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_profile_smoke_on_cpu(tmp_path):
    from any4lib.bench.profile import classify

    assert classify("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "rmsnorm (+ residual add)"
    assert classify("triton_poi_fused_add_cat_index_copy_mul_neg_1") == "kv cache writes (+ rope k)"
    assert classify("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_tinygemm_4bit_view_5") == "rmsnorm (+ residual add)"
    assert classify("triton_poi_fused__to_copy_add_cat_decode_attention_mul_neg_slice") == "rope q"
    assert classify("split_kernel") == "attention" and classify("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert classify("void tinygemm::kernel<4, true>(...)") == "gemm" and classify("nvjet_tst_64x8_64x16") == "gemm"
    assert classify("triton_poi_fused_mul_silu_2") == "silu * up"
    out = tmp_path / "profile.csv"
    e2e_args = parse_args(["--profile", "--model-config", "tiny", "--device", "cpu", "--compile", "none",
                               "--formats", "bf16", "--peers", "", "--batch", "1", "--prompt", "8", "--new", "16",
                               "--profile-out", str(out)])
    from any4lib.bench.profile import run_profile

    rows = run_profile(e2e_args)
    assert [(r["layout"], r["attention"], r["status"]) for r in rows] == [("separate", "sdpa", "ok"),
                                                                         ("fused", "triton", "ok")]
    assert out.is_file() and out.with_suffix(".txt").read_text().startswith("bf16 b=1 separate+sdpa")


@pytest.mark.parametrize("vocab", [128256, 256, 80, 7, 1])
def test_greedy_is_argmax_ties_included(vocab):
    from any4lib.engine.sampling import greedy

    torch.manual_seed(vocab)
    for logits in (torch.randn(5, vocab), torch.randint(0, 3, (5, vocab)).float(), torch.zeros(2, vocab),
                   torch.randn(3, vocab).bfloat16()):
        assert torch.equal(greedy(logits), logits.argmax(-1))


def test_kv_cache_holds_k_and_v_in_one_buffer():
    from any4lib.engine.model import KVCache

    cache = KVCache(2, 3, 10, 4, torch.float32, "cpu")
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    ks, vs = cache.update(torch.tensor([5, 6]), k, v)
    assert torch.equal(ks[:, :, 5:7], k) and torch.equal(vs[:, :, 5:7], v) and ks.abs()[:, :, :5].sum() == 0
    assert ks.data_ptr() == cache.kv.data_ptr() and torch.equal(cache.v, vs)


def test_torch_int4_peer_matches_our_int4_dequantized():
    # Independent kernel (PyTorch's tinygemm layout, CPU build) fed our int4 codes: same greedy tokens.
    assert torch.equal(greedy_tokens("torch-int4"), greedy_tokens("int4:dequant"))


def test_quantized_model_differs_from_bf16():
    # Guards the comparisons: the quantized weights must actually change what the model computes.
    model_q, _ = rw.build_model(TINY, rw.method("int4:dequant", 128), "cpu", seed=3, progress=False)
    model_b, _ = rw.build_model(TINY, rw.method("bf16", 128), "cpu", seed=3, progress=False)
    w_q = model_q.model.layers[1].mlp.down_proj.weight
    w_b = model_b.model.layers[1].mlp.down_proj.weight.float()
    assert 0 < (w_q - w_b).abs().max() < 0.2 * w_b.abs().max()


@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "mxfp4"])
def test_kernel_path_matches_dequantized_weights(fmt):
    kernels = pytest.importorskip("any4lib.kernels", reason="any4lib.kernels is not in this checkout yet")
    if not hasattr(kernels, "PackedWeight"):
        pytest.skip("any4lib.kernels is not in this checkout yet")
    assert torch.equal(greedy_tokens(fmt), greedy_tokens(f"{fmt}:dequant"))


def test_swiglu_epilogue_is_the_same_model():
    model, _ = rw.build_model(TINY, rw.method("any4", 128), "cpu", seed=3, reuse_budget_s=0.0, progress=False)
    assert all(block.mlp.gate_up_proj.swiglu for block in model.model.layers)
    assert torch.equal(greedy_tokens("any4"), greedy_tokens("any4", swiglu="compiled"))
    # Only the tinygemm methods, fused, have the epilogue.
    for name, fuse, mode in [("int4", True, "epilogue"), ("int4", False, "compiled"),
                             ("int4:dequant", True, "compiled"), ("torch-int4", True, "compiled"),
                             ("bf16", True, "compiled")]:
        assert rw.method(name, 128).swiglu_mode("epilogue", fuse) == mode, name
    assert rw.method("int4", 128).swiglu_mode("compiled", True) == "compiled"


def test_anyn_codes_shared_across_blocks_when_quantizing_is_slow():
    model, info = rw.build_model(TINY, rw.method("any4:dequant", 128), "cpu", seed=3, reuse_budget_s=0.0,
                                  progress=False)
    assert info["codes_reused"]
    first, second = (model.model.layers[i].self_attn.qkv_proj.weight for i in (0, 1))
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()


def test_run_writes_csv_with_provenance_and_resumes(tmp_path, capsys):
    out = tmp_path / "decode.csv"
    argv = ["--model-config", "tiny", "--device", "cpu", "--compile", "none", "--formats", "bf16,int4:dequant",
            "--peers", "torch-int4", "--batch", "1,2", "--prompt", "8", "--new", "4", "--out", str(out)]
    run(parse_args(argv))
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["batch"]) for r in rows] == [
        (m, b) for m in ("bf16", "int4:dequant", "torch-int4") for b in ("1", "2")]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["git_commit"] and r["torch"] == torch.__version__ and r["date"] for r in rows)
    assert all((r["layout"], r["attention"], r["norm"], r["swiglu"], r["lm_head"])
               == ("fused", "triton", "triton", "compiled", "bf16") for r in rows)
    assert all(float(r["decode_tok_s"]) > 0 for r in rows)
    bf16 = {r["batch"]: float(r["decode_tok_s"]) for r in rows if r["method"] == "bf16"}
    for r in rows:
        assert float(r["speedup_vs_bf16"]) == pytest.approx(float(r["decode_tok_s"]) / bf16[r["batch"]], rel=1e-3)
    assert "torch-int4" in capsys.readouterr().out  # the side-by-side table
    run(parse_args(argv))  # everything measured already: nothing is appended
    assert len(list(csv.DictReader(out.open()))) == len(rows)
    # Another layout in the same CSV is measured anew, its speedups against its own bf16 rows.
    run(parse_args(argv + ["--layout", "separate", "--attention", "sdpa"]))
    again = list(csv.DictReader(out.open()))
    assert len(again) == 2 * len(rows) and {r["layout"] for r in again[len(rows):]} == {"separate"}


def test_csv_from_before_the_layout_columns_is_rewritten(tmp_path):
    out = tmp_path / "decode.csv"
    old_columns = [c for c in COLUMNS if c not in ("layout", "attention", "norm", "lm_head")]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, old_columns)
        writer.writeheader()
        writer.writerow({c: "" for c in old_columns} | {"method": "bf16", "batch": "1", "status": "ok",
                                                         "decode_tok_s": "100"})
    run(parse_args(["--model-config", "tiny", "--device", "cpu", "--compile", "none", "--formats", "bf16",
                            "--peers", "", "--batch", "1", "--prompt", "4", "--new", "2", "--out", str(out)]))
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == COLUMNS
    assert [(r["method"], r["layout"], r["decode_tok_s"]) for r in rows][0] == ("bf16", "", "100")
    assert rows[1]["layout"] == "fused" and rows[1]["speedup_vs_bf16"] == "1"  # against its own layout's bf16


def test_missing_peer_is_recorded_not_fatal(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    out = tmp_path / "decode.csv"
    run(parse_args(["--model-config", "tiny", "--device", "cpu", "--compile", "none", "--formats", "",
                            "--peers", "bnb-nf4", "--batch", "1", "--prompt", "4", "--new", "2", "--out", str(out)]))
    (row,) = csv.DictReader(out.open())
    assert row["status"].startswith("failed to build: ImportError")


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="unknown method 'int9'"):
        rw.method("int9", 128)
    with pytest.raises(ValueError, match="unknown model config"):
        rw.model_config("llama9")
    with pytest.raises(SystemExit):
        parse_args(["--new", "1"])
    model = LlamaDecoder(TINY)
    with pytest.raises(RuntimeError, match="setup_caches"):
        prefill(model, torch.zeros(1, 3, dtype=torch.long))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="the cache holds 8"):
        generate_ids(model, [[1] * 6], 4)
    with pytest.raises(ValueError, match="cache was built for 1"):
        generate_ids(model, [[1], [2]], 2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["blocks", "reduce-overhead", "cudagraph"])
def test_compiled_decode_matches_eager_in_float32_on_gpu(mode):
    # float32: inductor's fused elementwise ops round differently from eager by ~1e-7, far below logit gaps.
    eager = greedy_tokens("bf16", "cuda", "none", dtype=torch.float32)
    assert torch.equal(greedy_tokens("bf16", "cuda", mode, dtype=torch.float32), eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["bf16", "any4", "torch-int4", "bnb-nf4", "bnb-fp4-tinygemm"])
def test_graphed_and_compiled_quantized_decode_on_gpu(name):
    if name.startswith("bnb-"):
        pytest.importorskip("bitsandbytes")
    eager = greedy_tokens(name, "cuda", "none")
    # The same kernels replayed from a CUDA graph: bitwise the same tokens.
    assert torch.equal(greedy_tokens(name, "cuda", "cudagraph"), eager)
    # Compiled blocks: the first decoded token (after the shared eager prefill) comes from the compiled step.
    assert torch.equal(greedy_tokens(name, "cuda", "blocks")[:, :2], eager[:, :2])


# (batch, KV heads, query heads per KV head, head dim, cache length, position): the bench's shapes at b = 1, 4, 16
# with pos in the middle, at the end and at 0, and odd ones.
GPU_DECODE_CASES = [(1, 8, 4, 128, 640, 511), (1, 8, 4, 128, 640, 639), (4, 8, 4, 128, 640, 0),
                    (16, 8, 4, 128, 640, 600), (3, 2, 3, 64, 100, 77), (2, 4, 8, 128, 4096, 3000)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_attention_kernel_on_gpu(dtype):
    from any4lib.engine.attention import decode_attention_triton

    torch.manual_seed(0)
    for b, hkv, g, d, n, p in GPU_DECODE_CASES:
        q, k, v = (torch.randn(b, hkv, m, d, device="cuda", dtype=dtype) for m in (g, n, n))
        pos = torch.tensor([p], device="cuda")
        out = torch.full_like(q, float("nan"))
        out.copy_(decode_attention_triton(q, k, v, pos))
        ref = decode_attention_reference(q.double(), k.double(), v.double(), pos)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and err < (1e-5 if dtype == torch.float32 else 1e-2), (b, n, p, err)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_attention_step_kernel_on_gpu(dtype):
    from any4lib.engine.attention import decode_attention_step_reference, decode_attention_step_triton

    torch.manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for b, hkv, g, d, n, p in GPU_DECODE_CASES:
        qkv, kv, cos, sin, pos = _step_inputs(b, hkv, g, d, n, p, dtype, "cuda")
        kv_ref = kv.double()
        out = decode_attention_step_triton(qkv, kv, cos, sin, pos)
        ref = decode_attention_step_reference(qkv.double(), kv_ref, cos.double(), sin.double(), pos)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and err < tol, (b, n, p, err)
        # The written k is RoPE rounded to the dtype once (the reference rounds each product in float64).
        torch.testing.assert_close(kv.double(), kv_ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@needs_cuda
def test_triton_decode_attention_matches_sdpa_in_the_model_on_gpu():
    # float32: the kernel's ieee dots against SDPA's masked attention, same greedy tokens; and both layouts agree.
    def tokens(attention, fuse=True, mode="none"):
        return greedy_tokens("bf16", "cuda", mode, new=8, dtype=torch.float32, attention=attention, fuse=fuse)

    expected = tokens("sdpa", fuse=False)
    assert torch.equal(tokens("triton"), expected)
    assert torch.equal(tokens("triton", mode="blocks"), expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["none", "blocks"])
def test_triton_norm_matches_the_compiled_norm_in_the_model_on_gpu(mode):
    # float32: the Triton add + RMSNorm against the ops torch.compile fuses (or eager ops), same greedy tokens.
    def tokens(norm):
        return greedy_tokens("bf16", "cuda", mode, new=8, dtype=torch.float32, norm=norm)

    assert torch.equal(tokens("triton"), tokens("compiled"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["any4", "int4"])
def test_swiglu_epilogue_matches_the_compiled_activation_on_gpu(name):
    # The same products either way; the epilogue's silu(gate) * up against inductor's kernel of the same ops.
    assert torch.equal(greedy_tokens(name, "cuda", "blocks", new=8),
                       greedy_tokens(name, "cuda", "blocks", new=8, swiglu="compiled"))
