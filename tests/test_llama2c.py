"""llama2.c loader: checkpoints against a float64 numpy forward written from the file format, tokenizer
against llama2.c's merge rule, and the real stories260K against llama2.c's own C program."""

import copy
import struct

import numpy as np
import pytest
import torch

from any4lib.llama2c import Llama2cTokenizer, load_llama2c, load_llama2c_model, read_header

# ---------------------------------------------------------------- reference: llama2.c's layout and forward


def llama2c_tensor_shapes(dim, hidden, layers, heads, kv_heads, vocab, seq, shared):
    hs = dim // heads
    shapes = [
        ("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_heads * hs, dim)), ("wv", (layers, kv_heads * hs, dim)), ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("fcr", (seq, hs // 2)), ("fci", (seq, hs // 2)),
    ]  # fmt: skip
    return shapes if shared else shapes + [("wcls", (vocab, dim))]


def write_checkpoint(path, dim=16, hidden=24, layers=2, heads=4, kv_heads=2, vocab=40, seq=32, shared=True, seed=0):
    rng = np.random.default_rng(seed)
    header = (dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq)
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *header))
        for name, shape in llama2c_tensor_shapes(dim, hidden, layers, heads, kv_heads, vocab, seq, shared):
            scale = 1.0 if name.startswith("rms") else 0.5
            offset = 1.0 if name.startswith("rms") else 0.0
            (offset + scale * rng.standard_normal(shape)).astype("<f4").tofile(f)


def numpy_forward(path, tokens):
    """All-position logits of a llama2.c checkpoint in float64, following llama2.c's own conventions
    (interleaved-pair RoPE, kv head = query head // (n_heads / n_kv_heads))."""
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", open(path, "rb").read(28))
    shared, vocab = vocab > 0, abs(vocab)
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    w, pos = {}, 0
    for name, shape in llama2c_tensor_shapes(dim, hidden, layers, heads, kv_heads, vocab, seq, shared):
        w[name] = flat[pos : pos + int(np.prod(shape))].reshape(shape)
        pos += int(np.prod(shape))
    assert pos == flat.size
    wcls = w["emb"] if shared else w["wcls"]
    hs, T = dim // heads, len(tokens)

    def rmsnorm(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)

    def rope(v):  # v [T, n, hs]: rotate pairs (2i, 2i+1) by angle t * 10000^(-2i/hs)
        ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = v.copy()
        out[..., 0::2] = v[..., 0::2] * c - v[..., 1::2] * s
        out[..., 1::2] = v[..., 0::2] * s + v[..., 1::2] * c
        return out

    x = w["emb"][tokens]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for layer in range(layers):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope((xb @ w["wq"][layer].T).reshape(T, heads, hs))
        k = rope((xb @ w["wk"][layer].T).reshape(T, kv_heads, hs))
        v = (xb @ w["wv"][layer].T).reshape(T, kv_heads, hs)
        att_out = np.zeros((T, heads, hs))
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = np.where(causal, q[:, h] @ k[:, kv].T / np.sqrt(hs), -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            att_out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att_out.reshape(T, dim) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        a, b = xb @ w["w1"][layer].T, xb @ w["w3"][layer].T
        x = x + (a / (1 + np.exp(-a)) * b) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ wcls.T


def write_tokenizer(path, extra):
    """A tok*.bin with llama2.c's fixed prefix (<unk>, BOS, EOS, 256 byte tokens) then `extra` (piece, score)."""
    pieces = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += extra
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p.encode()) for p, _ in pieces)))
        for piece, score in pieces:
            raw = piece.encode()
            f.write(struct.pack("<fi", score, len(raw)) + raw)
    return {p: i for i, (p, _) in enumerate(pieces)}


def naive_bpe(tok, text):
    """llama2.c's encoder literally: rescan all adjacent pairs, merge the best (leftmost on ties), repeat."""
    ids = [tok.piece_to_id[" "]]
    for ch in text:
        ids += [tok.piece_to_id[ch]] if ch in tok.piece_to_id else [b + 3 for b in ch.encode()]
    while True:
        best, best_i = -1e10, -1
        for i in range(len(ids) - 1):
            m = tok.piece_to_id.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best:
                best, best_i, best_id = tok.scores[m], i, m
        if best_i < 0:
            return ids
        ids[best_i : best_i + 2] = [best_id]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("shared", [True, False], ids=["shared_classifier", "separate_classifier"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_tiny_checkpoint_matches_numpy_reference(tmp_path, shared, kv_heads):
    path = tmp_path / "model.bin"
    write_checkpoint(path, kv_heads=kv_heads, shared=shared)
    model = load_llama2c_model(path)
    assert model.config.tie_word_embeddings == shared
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == shared
    tokens = [1, 5, 17, 3, 39, 0, 22, 8, 8, 30, 11, 2]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    want = numpy_forward(path, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_low_precision_load_keeps_rope_frequencies(tmp_path):
    path = tmp_path / "model.bin"
    write_checkpoint(path)
    full, half = load_llama2c_model(path), load_llama2c_model(path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(half.model.embed_tokens.weight, full.model.embed_tokens.weight.bfloat16())


def test_header_and_truncation_errors(tmp_path):
    path = tmp_path / "model.bin"
    write_checkpoint(path, shared=False)
    h = read_header(path)
    assert (h.dim, h.n_kv_heads, h.vocab_size, h.shared_classifier) == (16, 2, 40, False)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        load_llama2c_model(path)
    (tmp_path / "junk.bin").write_bytes(struct.pack("<7i", 16, 24, 2, 5, 2, 40, 32))  # 16 % 5 != 0
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        read_header(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_llama2c(tmp_path / "missing.bin")


def test_tokenizer_lookup_beside_checkpoint(tmp_path):
    path = tmp_path / "model.bin"
    write_checkpoint(path, vocab=40)
    with pytest.raises(FileNotFoundError, match="tok40.bin"):
        load_llama2c(path)
    write_tokenizer(tmp_path / "tok40.bin", [])  # 259 tokens: does not match the checkpoint's 40
    with pytest.raises(ValueError, match="259 tokens"):
        load_llama2c(path)


# ---------------------------------------------------------------- tokenizer

MERGES = [(" ", 0.0), ("a", 0.0), ("b", 0.0), ("c", 0.0), ("ab", 5.0), ("bc", 10.0), ("abc", 3.0), (" a", 1.0),
          ("ca", 2.0), ("cab", 2.0), ("é", 0.0)]  # fmt: skip


@pytest.fixture
def tiny_tok(tmp_path):
    ids = write_tokenizer(tmp_path / "tok.bin", MERGES)
    return Llama2cTokenizer.from_file(tmp_path / "tok.bin"), ids


def test_merge_order_by_score(tiny_tok):
    tok, ids = tiny_tok
    # " abc": pairs ' a'(1) ab(5) bc(10) -> bc; then ' a'(1) abc(3) -> abc; ' abc' is not a token
    assert tok.bpe_ids("abc") == [ids[" "], ids["abc"]]
    # " ab": ' a'(1) < ab(5) -> ab; ' ab' absent
    assert tok.bpe_ids("ab") == [ids[" "], ids["ab"]]
    # " cab": ca(2) ab(5) -> ab; then cab(2) -> cab
    assert tok.bpe_ids("cab") == [ids[" "], ids["cab"]]


def test_byte_fallback_and_decode_round_trip(tiny_tok):
    tok, ids = tiny_tok
    # "ü" is not a piece: its two UTF-8 bytes become <0xC3> <0xBC> at ids byte + 3
    assert tok.bpe_ids("ü") == [ids[" "], 0xC3 + 3, 0xBC + 3]
    assert tok.bpe_ids("é") == [ids[" "], ids["é"]]
    for text in ["abc", "cabbage üé", "a  b\nc"]:
        enc = tok(text)["input_ids"]
        assert enc[0] == tok.bos_token_id == 1
        assert tok.decode(enc, skip_special_tokens=True) == text  # the dummy-prefix space after BOS is dropped
        assert tok.decode(enc[1:]) == " " + text  # without BOS the prefix space is kept, like llama2.c


def test_heap_encoder_equals_rescanning_encoder(tiny_tok):
    tok, _ = tiny_tok
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(list("abc é"), size=rng.integers(1, 25)))
        assert tok.bpe_ids(text) == naive_bpe(tok, text), text


def test_hf_tokenizer_interface(tiny_tok):
    tok, ids = tiny_tok
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, len(ids))
    assert tok.encode("abc", add_special_tokens=False) == tok.bpe_ids("abc")
    assert tok("<s>abc")["input_ids"][:2] == [1, ids[" "]]  # a literal "<s>" in text is text, not BOS
    batch = tok(["ab", "cabbage"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert batch.attention_mask[0].sum() < batch.input_ids.shape[1]  # "ab" is the shorter one: padded
    assert tok.batch_decode([tok("ab").input_ids, tok("ca").input_ids], skip_special_tokens=True) == ["ab", "ca"]


def test_save_pretrained_round_trip(tiny_tok, tmp_path):
    tok, _ = tiny_tok
    tok.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()
    again = Llama2cTokenizer.from_pretrained(tmp_path / "saved")
    for text in ["cabbage üé", "abc abc"]:
        assert again(text).input_ids == tok(text).input_ids


# ---------------------------------------------------------------- the real stories260K


@pytest.fixture(scope="module")
def stories():
    from any4lib.paths import data_root

    folder = data_root() / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not present under {folder}")
    return folder, *load_llama2c(folder / "stories260K.bin")


# Produced by llama2.c's run.c (karpathy/llama2.c, commit bd18228), compiled with gcc -O2 and run as
# `run stories260K.bin -z tok512.bin -t 0 -i "Zoo" -n 128` with each sampled token id printed: BOS, the 3 prompt
# tokens, then 124 greedy tokens.
C_GREEDY_ZOO = [
    1, 410, 469, 347, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411,
    322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266,
    267, 337, 335, 312, 432, 398, 358, 279, 292, 416, 439, 413, 391, 267, 337, 335, 312, 426, 13, 438, 310, 439,
    419, 357, 336, 432, 313, 438, 310, 432, 278, 316, 439, 419, 298, 414, 267, 265, 282, 295, 433, 426, 436, 317,
    336, 432, 313, 452, 406, 432, 278, 316, 439, 419, 337, 335, 265, 268, 388, 426, 436, 13, 447, 419, 366, 273,
    421, 355, 432, 366, 394, 261, 370, 268, 388, 426, 291, 268, 388, 286, 399, 393, 426, 317,
]  # fmt: skip


def test_stories260k_tokenizer_saves_its_file_unchanged(stories, tmp_path):
    folder, _, tok = stories
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.bin").read_bytes() == (folder / "tok512.bin").read_bytes()


def test_stories260k_matches_numpy_reference(stories):
    folder, model, tok = stories
    tokens = C_GREEDY_ZOO[:48]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    want = numpy_forward(folder / "stories260K.bin", tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_stories260k_greedy_matches_llama2c(stories):
    _, model, tok = stories
    prompt = tok("Zoo", return_tensors="pt").input_ids
    assert prompt[0].tolist() == C_GREEDY_ZOO[:4]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=len(C_GREEDY_ZOO) - 4, do_sample=False, eos_token_id=None)
    assert out[0].tolist() == C_GREEDY_ZOO
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Zoo was a little girl named Lily. She loved to play outside in the park.")


def test_stories260k_quantizes_with_group_sizes_that_divide_its_layers(stories):
    """K is 64 (attention, gate/up) or 172 (down): g128 fails naming the valid sizes; per-row groups and g4 work and
    keep most greedy predictions of the unquantized model on the C reference text."""
    from any4lib.model import quantize_model

    _, model, _ = stories
    with pytest.raises(ValueError, match=r"group sizes valid for every layer: 2, 4;"):
        quantize_model(copy.deepcopy(model), "any4", group_size=128, progress=False)
    tokens = torch.tensor([C_GREEDY_ZOO])
    with torch.no_grad():
        reference = model(tokens).logits.argmax(-1)
        for fmt, group_size in (("any4", None), ("int4", 4)):
            quantized = quantize_model(copy.deepcopy(model), fmt, group_size=group_size, progress=False)
            agreement = (quantized(tokens).logits.argmax(-1) == reference).float().mean().item()
            assert agreement > 0.8, (fmt, group_size, agreement)
