import math
import sys
import types

import pytest
import torch

from any4lib import paths
from any4lib.evaluate import evaluate_perplexity, perplexity, token_windows


def test_perplexity_matches_float64_reference(tiny, text_file):
    model, tokenizer = tiny
    result = evaluate_perplexity(model, tokenizer, text_file, seq_len=64, batch_size=3, progress=False)
    ids = tokenizer(text_file.read_text()).input_ids
    n = len(ids) // 64
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            window = torch.tensor(ids[i * 64 : (i + 1) * 64])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            total -= logp[torch.arange(63), window[1:]].sum().item()
    assert result.windows == n and result.tokens == n * 63 and result.seq_len == 64
    assert result.ppl == pytest.approx(math.exp(total / (n * 63)), rel=1e-5)


@pytest.mark.parametrize("chunk", [16, 25])
def test_chunked_windows_through_the_cache_match_whole_windows(tiny, text_file, chunk):
    model, tokenizer = tiny
    whole = evaluate_perplexity(model, tokenizer, text_file, seq_len=64, batch_size=2, progress=False)
    chunked = evaluate_perplexity(model, tokenizer, text_file, seq_len=64, batch_size=2, progress=False, chunk=chunk)
    assert chunked.tokens == whole.tokens
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-5)
    with pytest.raises(ValueError, match=r"chunk must be an integer >= 1 \(or None: whole windows\); got 0"):
        evaluate_perplexity(model, tokenizer, text_file, seq_len=64, chunk=0)


def test_uniform_prediction_gives_vocabulary_size(tiny, text_file):
    model, tokenizer = tiny
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: every logit is 0, so ppl = vocab size exactly
    assert perplexity(model, tokenizer, text_file, seq_len=32, progress=False) == pytest.approx(258, rel=1e-5)


def test_default_window_is_the_model_positions_and_max_tokens_caps_the_text(tiny, text_file):
    model, tokenizer = tiny
    result = evaluate_perplexity(model, tokenizer, text_file, progress=False)
    assert result.seq_len == 256  # min(2048, the tiny model's max_position_embeddings)
    assert token_windows(tokenizer, text_file, 100, max_tokens=350).shape == (3, 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tokenizer, text_file, 100, max_tokens=50)


def test_named_sets_read_local_files_under_the_data_root(tiny, data_root):
    model, tokenizer = tiny
    assert paths.data_root() == data_root
    a = perplexity(model, tokenizer, "wikitext2", seq_len=64, progress=False)
    b = perplexity(model, tokenizer, data_root / "wikitext-2-v1" / "test.txt", seq_len=64, progress=False)
    assert a == b


def test_missing_dataset_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local only and was not found at .*ref-en/heldout.txt"):
        paths.load_text("heldout")
    with pytest.raises(FileNotFoundError, match="neither a file nor a known set name"):
        paths.load_text("no_such_set")

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(FileNotFoundError, match=r"ptb/test.txt; hub ptb_text_only/penn_treebank \[test\].*unreachable"):
        paths.load_text("ptb")


def test_hub_fallback_joins_the_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_DATA", str(tmp_path))
    monkeypatch.setattr(paths, "hub_reachable", lambda: True)
    rows = {"text": ["first", "second"]}
    hub = types.SimpleNamespace(load_dataset=lambda *a, **k: rows)
    monkeypatch.setitem(sys.modules, "datasets", hub)
    assert paths.load_text("wikitext2") == "first\n\nsecond"


@pytest.mark.parametrize("name, hub", [
    ("c4", ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})),
    ("codeparrot", ("huggingface-course/codeparrot-ds-valid", None, "validation", None)),
    ("pile", ("monology/pile-uncopyrighted", None, "train", None)),
])  # fmt: skip
def test_paper_sets_stream_only_their_slice(tmp_path, monkeypatch, name, hub):
    """The any4 paper reads the first 256 windows of 2048 tokens of each stream: only that prefix is fetched."""
    monkeypatch.setenv("ANY4_DATA", str(tmp_path))
    monkeypatch.setattr(paths, "hub_reachable", lambda: True)
    field = "content" if name == "codeparrot" else "text"
    calls, served = [], []

    def load_dataset(path, config, split, streaming=False, data_files=None):
        calls.append((path, config, split, data_files, streaming))
        for i in range(10**6):
            served.append(i)
            yield {field: f"{i:07d}" * 100}  # 700 characters a record

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = paths.load_text(name)
    assert calls == [(*hub, True)]
    joiner = paths.TEXT_SETS[name].joiner
    records = -(-paths.STREAM_CHARS // (700 + len(joiner)))  # the fewest that reach the budget
    assert len(served) == records and text.startswith("0000000") and text.endswith(f"{records - 1:07d}")
    assert paths.STREAM_CHARS == 8 * 256 * 2048


def test_offline_hub_sets_fail_at_once_naming_the_set_and_where_to_put_it(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("ANY4_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def never(*args, **kwargs):
        raise AssertionError("offline: the hub must not be tried")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=never))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'codeparrot' not found.*hub is unreachable.*Put the text at "
                       rf"{tmp_path}/codeparrot/validation.txt or point ANY4_DATA at a folder holding"):
        paths.load_text("codeparrot")
    assert time.perf_counter() - start < 1.0
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "train.txt").write_text("a local copy")
    assert paths.load_text("pile") == "a local copy"


def test_hub_reachable_asks_the_endpoint(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert paths.hub_reachable(timeout=1)
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
        assert not paths.hub_reachable(timeout=1)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert not paths.hub_reachable(timeout=1)  # the port is closed now


@pytest.mark.parametrize("seq_len", [0, -5, 1, 257, 2048, 64.0, True])
def test_bad_seq_len_is_an_error_giving_the_valid_range(tiny, text_file, seq_len):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"seq_len must be an integer >= 2 and <= 256 .*got"):
        evaluate_perplexity(model, tokenizer, text_file, seq_len=seq_len, progress=False)


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("max_tokens", -1)])
def test_bad_batch_and_max_tokens_are_errors(tiny, text_file, name, value):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=f"{name} must be an integer >="):
        evaluate_perplexity(model, tokenizer, text_file, seq_len=64, progress=False, **{name: value})


def test_a_nan_in_the_model_is_an_error_not_a_perplexity(tiny, text_file):
    model, tokenizer = tiny
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="mean loss is nan"):
        perplexity(model, tokenizer, text_file, seq_len=64, progress=False)


def test_cpu_evaluation_computes_in_float32_and_leaves_the_released_weights(tiny, text_file):
    model, tokenizer = tiny
    reference = perplexity(model, tokenizer, text_file, seq_len=64, progress=False)
    model.to(torch.bfloat16)
    released = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    upcast = perplexity(model, tokenizer, text_file, seq_len=64, progress=False)
    assert set(seen) == {torch.float32}
    assert all(torch.equal(p, released[name]) and p.dtype == torch.bfloat16 for name, p in model.named_parameters())
    # bf16-rounded weights computed in float32: close to the float32 model's value
    assert upcast == pytest.approx(reference, rel=2e-2)
    seen.clear()
    perplexity(model, tokenizer, text_file, seq_len=64, progress=False, dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16}
