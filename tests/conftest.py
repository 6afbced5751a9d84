"""Shared fixtures: a tiny random Llama and a byte-level tokenizer built in-process, and small text files."""

from __future__ import annotations

import pytest
import torch

from any4lib.experiments import tiny_model

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold; the early bird catches the worm, and fortune favours the bold. "
) * 12


@pytest.fixture
def tiny():
    """(model, tokenizer): float32 tiny Llama (hidden 128, 2 layers, GQA, tied embeddings), byte-level tokenizer."""
    torch.manual_seed(0)
    return tiny_model(seed=0)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An ANY4_DATA folder holding the local files of the named sets wikitext2 and heldout."""
    root = tmp_path / "data"
    for rel in ("wikitext-2-v1/test.txt", "corpora/ref-en/heldout.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(SAMPLE_TEXT)
    monkeypatch.setenv("ANY4_DATA", str(root))
    return root


@pytest.fixture
def tiny_folder(tiny, tmp_path):
    """The tiny model saved as a Hugging Face folder (for load_model and the CLI)."""
    model, tokenizer = tiny
    path = tmp_path / "tiny-hf"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def outlier():
    """The tiny model whose norms feed their linears a few channels 40x larger than the rest (activation outliers,
    as LLMs have), its function unchanged in float: those norm weights up, the fed linears' columns down by as
    much."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model(seed=0)
    channels = torch.tensor([3, 77])
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, fed in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                              (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[channels] *= 40
                for name in fed:
                    linear = getattr(layer.self_attn if name[0] in "qkv" else layer.mlp, name)
                    linear.weight[:, channels] /= 40
    return model, tokenizer
