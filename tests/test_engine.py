"""The generation engine against transformers on tiny random Llamas (CPU): RoPE default and llama3, GQA, tied and
untied heads, bf16 and the 4-bit formats, prompts of different lengths; sampling, EOS, stop strings, streaming,
limits, the fallback for other architectures. The shared models on the GPU: test_engine_gpu.py."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import any4lib
import any4lib.engine.random_weights
from any4lib.engine import Engine, LlamaDecoder, UnsupportedModel, generate_ids
from any4lib.engine.rope import inv_freq
from any4lib.engine.sampling import sample
from any4lib.experiments import tiny_model
from any4lib.model import quantize_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# bf16 rounding moves logits by a few bf16 steps of their size: where transformers' top-2 logits are closer than this
# (relative to the top one) the two greedy paths may pick different tokens, and nothing after that is comparable.
BF16_TIE = 2**-5
# float32 on the GPU (other GEMM and attention kernels, other summation orders): a much tighter rule of the same kind.
F32_TIE = 2**-10


def bf16_llama(seed: int, rope: dict | None = None, tied: bool = True, kv_heads: int = 2):
    """A random tiny bf16 LlamaForCausalLM (K = 64 / 128, so every tinygemm group size up to 64 fits), its RoPE
    frequencies kept in float32 as from_pretrained keeps them (model.to(bf16) would round that buffer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=97, max_position_embeddings=96,
                         tie_word_embeddings=tied, rope_parameters=rope or {"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.25)
    rotary = model.model.rotary_emb
    keep = {name: getattr(rotary, name).clone() for name in ("inv_freq", "original_inv_freq") if hasattr(rotary, name)}
    model.to(torch.bfloat16)
    for name, value in keep.items():
        setattr(rotary, name, value)
    return model


PROMPTS = [[5, 17, 3, 44, 8, 90, 12, 7, 61], [33, 2], [70, 70, 1, 9, 4]]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():  # the mask given: transformers would mask every token equal to pad_token_id otherwise
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_agrees(model, prompt, expected, got, tie: float = BF16_TIE):
    """Equal tokens, or the first difference where transformers' top-2 logits are within `tie` (relative to the top
    one) of each other."""
    if got == expected:
        return
    i = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + expected[:i]], device=model.device)).logits[0, -1].float()
    top = logits.topk(2).values
    gap = (top[0] - top[1]).item()
    assert gap <= tie * max(1.0, top[0].abs().item()), (
        f"diverges at new token {i} where transformers' top-2 logits differ by {gap:.4f} (> tolerance {tie})")


def engine_tokens(model, new: int, fuse: bool = False) -> list[list[int]]:
    decoder = LlamaDecoder.from_model(model, fuse=fuse)
    decoder.setup_caches(len(PROMPTS), max(map(len, PROMPTS)) + new)
    return generate_ids(decoder, PROMPTS, new).tokens


def test_rope_frequencies_are_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in ({"rope_type": "default", "rope_theta": 10000.0}, LLAMA3_ROPE):
        config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope)
        if rope["rope_type"] == "default":
            expected = 1.0 / (1e4 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
        else:
            expected = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
        assert torch.equal(inv_freq(config, 128), expected)
    with pytest.raises(ValueError, match="'yarn' is not implemented; the engine has default, llama3"):
        inv_freq(LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), 64)


@pytest.mark.parametrize("rope, tied, kv_heads", [(LLAMA3_ROPE, True, 2), (None, False, 4), (LLAMA3_ROPE, False, 1)])
def test_bf16_greedy_equals_transformers_with_left_padding(rope, tied, kv_heads):
    model = bf16_llama(0, rope, tied, kv_heads)
    new = 16
    expected = [hf_greedy(model, p, new) for p in PROMPTS]
    for prompt, exp, got in zip(PROMPTS, expected, engine_tokens(model, new)):
        assert_agrees(model, prompt, exp, got)
    # The model itself still runs after the engine took its modules (fuse=False shares them).
    assert hf_greedy(model, PROMPTS[0], 4) == expected[0][:4]


@pytest.mark.parametrize("fmt, group_size", [("int4", 32), ("nf4", 64), ("any4", 32), ("mxfp4", 32)])
def test_quantized_greedy_equals_transformers_on_the_same_packed_model(fmt, group_size):
    model = quantize_model(bf16_llama(1, LLAMA3_ROPE), fmt, group_size, progress=False)
    any4lib.pack_model(model, torch.bfloat16)  # what the engine runs: transformers then runs the same weights
    reference = copy.deepcopy(model)  # fusing releases the model's separate projections
    new = 16
    expected = [hf_greedy(reference, p, new) for p in PROMPTS]
    for fuse in (False, True):
        for prompt, exp, got in zip(PROMPTS, expected, engine_tokens(model, new, fuse=fuse)):
            assert_agrees(reference, prompt, exp, got)


def test_fused_engine_shares_the_models_weights():
    model = bf16_llama(2)
    q_ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    embed = model.model.embed_tokens.weight
    decoder = LlamaDecoder.from_model(model, fuse=True)
    qkv = decoder.model.layers[0].self_attn.qkv_proj.weight
    # The model's q/k/v are now views of the stacked weight: one copy, and transformers' forward still works.
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == qkv.data_ptr() != q_ptr
    assert model.model.layers[0].self_attn.v_proj.weight.untyped_storage().data_ptr() == qkv.data_ptr()
    assert decoder.model.embed_tokens.weight is embed and decoder.lm_head.weight is embed
    assert decoder.model.norm.weight is model.model.norm.weight
    # Packed quantized parts are released into the fused layer; calling one says where its weight went.
    quant = any4lib.pack_model(quantize_model(bf16_llama(2), "int4", 32, progress=False))
    fused = LlamaDecoder.from_model(quant, fuse=True)
    assert fused.model.layers[0].mlp.gate_up_proj.swiglu
    with pytest.raises(RuntimeError, match="fused projection"):
        quant.model.layers[0].mlp.gate_proj(torch.zeros(1, 64, dtype=torch.bfloat16))


def test_layers_the_kernels_cannot_serve_run_dequantized_said_once(caplog):
    model = bf16_llama(3)
    quantize_model(model, "int4", 32, include="*.mlp.*", progress=False)
    quantize_model(model, "int3", 32, include="*.self_attn.*", progress=False)  # 3-bit: not a tinygemm format
    with caplog.at_level(logging.WARNING, logger="any4lib"):
        engine = Engine(model, tokenizer=None, max_batch=3, dtype=torch.bfloat16)  # packed: what a GPU runs
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("any4lib")]
    assert len(lines) == 8 and all("runs its dequantized weight" in line and "int3" in line for line in lines)
    expected = [hf_greedy(model, p, 12) for p in PROMPTS]
    got = generate_ids(engine.decoder, PROMPTS, 12).tokens
    for prompt, exp, tokens in zip(PROMPTS, expected, got):
        assert_agrees(model, prompt, exp, tokens)


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    draw = lambda seed, **kw: sample(logits, 1.0, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not all(torch.equal(draw(3), draw(s)) for s in range(4, 8))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(draw(1, top_k=1), logits.argmax(-1))
    assert torch.equal(draw(1, top_p=1e-6), logits.argmax(-1))
    top2 = logits.topk(2).indices
    for seed in range(20):
        assert ((draw(seed, top_k=2)[:, None] == top2).any(-1)).all()
    # top_p keeps the smallest set of most likely tokens whose probability reaches p.
    probs = logits.softmax(-1)
    order = probs.sort(-1, descending=True)
    keep = (order.values.cumsum(-1) - order.values) < 0.5
    for seed in range(20):
        token = draw(seed, top_p=0.5)
        rank = (order.indices == token[:, None]).float().argmax(-1)
        assert keep.gather(-1, rank[:, None]).all()
    with pytest.raises(ValueError, match="top_p must be in"):
        generate_ids(LlamaDecoder.from_model(bf16_llama(0)), [[1]], 1, temperature=1.0, top_p=1.5)


@pytest.fixture
def tiny_engine():
    model, tokenizer = tiny_model(seed=0, hidden=128)
    return Engine(model.to(torch.bfloat16), tokenizer, max_batch=2, max_len=96), tokenizer


def test_engine_text_eos_stop_strings_streaming_and_seeds(tiny_engine):
    engine, tokenizer = tiny_engine
    prompts = ["The quick brown fox", "Hi"]
    plain = engine.generate(prompts, 16, eos=False)
    assert [len(t) for t in plain.tokens] == [16, 16]
    assert plain.texts == [tokenizer.decode(t) for t in plain.tokens]
    assert plain.timing["decode_tok_s"] > 0 and plain.timing["prefill_tok_s"] > 0
    # EOS: make the tokenizer's EOS the 5th greedy token of the first prompt; it ends there, the other goes on.
    eos = plain.tokens[0][4]
    tokenizer.eos_token_id = eos
    try:
        out = engine.generate(prompts, 16)
    finally:
        tokenizer.eos_token_id = 1
    first = plain.tokens[0]
    assert out.tokens[0] == first[:first.index(eos)]
    assert out.tokens[1] == [t for t in plain.tokens[1][:len(out.tokens[1])]] and eos not in out.tokens[1]
    # A stop string: the text ends before it, the tokens at the one completing it.
    stop = plain.texts[1][3:5]
    out = engine.generate(prompts, 16, eos=False, stop_strings=[stop])
    assert out.texts[1] == plain.texts[1][:plain.texts[1].find(stop)] and len(out.tokens[1]) < 16
    # Streaming: the pieces of each sequence add up to its text.
    pieces = {0: "", 1: ""}
    out = engine.generate(prompts, 12, eos=False, stream=lambda i, text: pieces.__setitem__(i, pieces[i] + text))
    assert [pieces[0], pieces[1]] == out.texts
    # Sampling: the same seed the same texts; the greedy tokens at temperature 0.
    a, b = (engine.generate(prompts, 12, eos=False, temperature=0.9, top_k=20, seed=7) for _ in range(2))
    assert a.tokens == b.tokens
    assert engine.generate(prompts, 12, eos=False, temperature=0.9, top_k=1, seed=3).tokens == \
        [t[:12] for t in plain.tokens]


def test_limits_say_what_they_are(tiny_engine):
    engine, _ = tiny_engine
    with pytest.raises(ValueError, match="cache was built for 2"):
        engine.generate(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        engine.generate(["x" * 250], 10)
    with pytest.raises(ValueError, match="the cache holds 96"):
        engine.generate(["x" * 90], 10)
    with pytest.raises(ValueError, match="positions asked for, the model has 256"):
        engine.resize(1, 300)


def test_any4lib_generate_grows_its_engine_and_falls_back_for_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tokenizer = tiny_model(seed=1, hidden=128)
    model = model.to(torch.bfloat16)
    one = any4lib.generate(model, tokenizer, "Once", 6, eos=False)
    two = any4lib.generate(model, tokenizer, ["Once", "Twice upon"], 6, eos=False)
    assert two.tokens[0] == one.tokens[0]
    assert model.dtype == torch.bfloat16  # on a CPU the engine computes in float32, the model keeps its dtype
    reference = copy.deepcopy(model).float()
    assert one.tokens[0] == hf_greedy(reference, tokenizer("Once")["input_ids"], 6)
    for bad in ([], [1, 2], None):
        with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
            any4lib.generate(model, tokenizer, bad, 4)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(UnsupportedModel, match="does not cover GPT2LMHeadModel.*it covers LlamaForCausalLM"):
        Engine(gpt2, tokenizer)
    with pytest.warns(UserWarning, match="using transformers' generate instead"):
        out = any4lib.generate(gpt2, tokenizer, ["Once", "Twice upon"], 5, eos=False)
    assert out.tokens[0] == hf_greedy(gpt2, tokenizer("Once")["input_ids"], 5)


def test_heads_the_triton_kernel_does_not_take_use_masked_sdpa(caplog):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=50)  # head_dim 8, as stories260K
    with caplog.at_level(logging.WARNING, logger="any4lib"):
        decoder = LlamaDecoder(config).set_decode_attention("triton")
    assert decoder.model.layers[0].self_attn.decode_attention == "sdpa" and "head_dim" in caplog.text
    assert LlamaDecoder(any4lib.engine.random_weights.model_config("tiny")).set_decode_attention(
        "triton").model.layers[0].self_attn.decode_attention == "triton"


@pytest.mark.real_data
def test_stories260k_zoo_continuation_through_the_engine_is_llama2c():
    from test_llama2c import C_GREEDY_ZOO

    from any4lib.paths import data_root

    if not (data_root() / "models" / "stories260K").exists():
        pytest.skip(f"stories260K is not under {data_root() / 'models'}")
    model, tokenizer = any4lib.load_model("stories260K")  # stored in bf16; the engine computes in float32 on a CPU
    out = any4lib.generate(model, tokenizer, "Zoo", len(C_GREEDY_ZOO) - 4, eos=False)
    assert out.tokens[0] == C_GREEDY_ZOO[4:]
    assert "was a little girl named Lily. She loved to play outside in the park." in out.texts[0]
