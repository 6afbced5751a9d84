"""End-to-end decode bench: the decoder against transformers' Llama, the quantized paths against the model that
multiplies by the dequantized weights, and the bench run itself (CSV, provenance, resume) on a tiny config."""

import csv

import pytest
import torch

from any4lib.bench import e2e
from any4lib.bench.decode import LlamaDecoder, decode, generate, prefill

TINY = e2e.model_config("tiny")


def greedy_tokens(name: str, device="cpu", compile_mode="none", batch=2, prompt=12, new=6, dtype=torch.bfloat16):
    # reuse_budget_s=0: later blocks copy the first one's anyN codes, which halves the k-means time here.
    model, _ = e2e.build_model(TINY, e2e.method(name, 128), device, seed=3, reuse_budget_s=0.0, dtype=dtype,
                               progress=False)
    return e2e.time_generation(model, batch, prompt, new, compile_mode, device, seed=5)["tokens"]


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
        tokens = generate(ours, prompt, 8)
        full = torch.cat([prompt, tokens], 1)
        recomputed = reference(full[:, :-1]).logits[:, 8:].argmax(-1)
    assert torch.equal(tokens, recomputed)


def test_torch_int4_peer_matches_our_int4_dequantized():
    # Independent kernel (PyTorch's tinygemm layout, CPU build) fed our int4 codes: same greedy tokens.
    assert torch.equal(greedy_tokens("torch-int4"), greedy_tokens("int4:dequant"))


def test_quantized_model_differs_from_bf16():
    # Guards the comparisons: the quantized weights must actually change what the model computes.
    model_q, _ = e2e.build_model(TINY, e2e.method("int4:dequant", 128), "cpu", seed=3, progress=False)
    model_b, _ = e2e.build_model(TINY, e2e.method("bf16", 128), "cpu", seed=3, progress=False)
    w_q = model_q.model.layers[1].mlp.down_proj.weight
    w_b = model_b.model.layers[1].mlp.down_proj.weight.float()
    assert 0 < (w_q - w_b).abs().max() < 0.2 * w_b.abs().max()


@pytest.mark.parametrize("fmt", ["int4", "any4", "nf4", "mxfp4"])
def test_kernel_path_matches_dequantized_weights(fmt):
    kernels = pytest.importorskip("any4lib.kernels", reason="any4lib.kernels is not in this checkout yet")
    if not hasattr(kernels, "PackedWeight"):
        pytest.skip("any4lib.kernels is not in this checkout yet")
    assert torch.equal(greedy_tokens(fmt), greedy_tokens(f"{fmt}:dequant"))


def test_anyn_codes_shared_across_blocks_when_quantizing_is_slow():
    model, info = e2e.build_model(TINY, e2e.method("any4:dequant", 128), "cpu", seed=3, reuse_budget_s=0.0,
                                  progress=False)
    assert info["codes_reused"]
    first, second = (model.model.layers[i].self_attn.q_proj.weight for i in (0, 1))
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()


def test_run_writes_csv_with_provenance_and_resumes(tmp_path, capsys):
    out = tmp_path / "decode.csv"
    argv = ["--model-config", "tiny", "--device", "cpu", "--compile", "none", "--formats", "bf16,int4:dequant",
            "--peers", "torch-int4", "--batch", "1,2", "--prompt", "8", "--new", "4", "--out", str(out)]
    e2e.run(e2e.parse_args(argv))
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["batch"]) for r in rows] == [
        (m, b) for m in ("bf16", "int4:dequant", "torch-int4") for b in ("1", "2")]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["git_commit"] and r["torch"] == torch.__version__ and r["date"] for r in rows)
    assert all(float(r["decode_tok_s"]) > 0 for r in rows)
    bf16 = {r["batch"]: float(r["decode_tok_s"]) for r in rows if r["method"] == "bf16"}
    for r in rows:
        assert float(r["speedup_vs_bf16"]) == pytest.approx(float(r["decode_tok_s"]) / bf16[r["batch"]], rel=1e-3)
    assert "torch-int4" in capsys.readouterr().out  # the side-by-side table
    e2e.run(e2e.parse_args(argv))  # everything measured already: nothing is appended
    assert len(list(csv.DictReader(out.open()))) == len(rows)


def test_missing_peer_is_recorded_not_fatal(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    out = tmp_path / "decode.csv"
    e2e.run(e2e.parse_args(["--model-config", "tiny", "--device", "cpu", "--compile", "none", "--formats", "",
                            "--peers", "bnb-nf4", "--batch", "1", "--prompt", "4", "--new", "2", "--out", str(out)]))
    (row,) = csv.DictReader(out.open())
    assert row["status"].startswith("failed to build: ImportError")


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="unknown method 'int9'"):
        e2e.method("int9", 128)
    with pytest.raises(ValueError, match="unknown model config"):
        e2e.model_config("llama9")
    with pytest.raises(SystemExit):
        e2e.parse_args(["--new", "1"])
    model = LlamaDecoder(TINY)
    with pytest.raises(RuntimeError, match="setup_caches"):
        prefill(model, torch.zeros(1, 3, dtype=torch.long))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="overruns the cache"):
        decode(model, torch.zeros(1, dtype=torch.long), 6, 4)


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
@pytest.mark.parametrize("name", ["bf16", "any4", "torch-int4", "bnb-nf4"])
def test_graphed_and_compiled_quantized_decode_on_gpu(name):
    if name == "bnb-nf4":
        pytest.importorskip("bitsandbytes")
    eager = greedy_tokens(name, "cuda", "none")
    # The same kernels replayed from a CUDA graph: bitwise the same tokens.
    assert torch.equal(greedy_tokens(name, "cuda", "cudagraph"), eager)
    # Compiled blocks: the first decoded token (after the shared eager prefill) comes from the compiled step.
    assert torch.equal(greedy_tokens(name, "cuda", "blocks")[:, :2], eager[:, :2])
