"""The engine on the GPU with the shared models: greedy tokens equal transformers' generate on the same quantized
(packed) model for 64 new tokens, up to bf16 near-ties (test_engine.assert_agrees says the rule); llama2.c's "Zoo"
continuation of stories260K through compiled blocks in one CUDA graph (the default step), float32 near-ties aside."""

from __future__ import annotations

import copy

import pytest
import torch

import any4lib
from any4lib.engine import Engine
from any4lib.model import quantize_model
from any4lib.paths import data_root
from test_engine import assert_agrees, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.real_data,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The history of the city", "In 1905 the", "Once upon a time there was a little dog who"]
NEW = 64
# (format, group size) per model: g128 where K allows (ref-en-16m: K = 384, 1024), per-row and g4 on stories260K
# (K = 64, 172: the g4 layers and the K = 172 down projections run their dequantized weight, the others tinygemm;
# MX-FP4's fixed blocks of 32 do not divide K = 172).
FORMATS = {
    "ref-en-16m": [("bf16", None), ("int4", 128), ("nf4", 128), ("any4", 128), ("mxfp4", 32)],
    "stories260K": [("bf16", None), ("int4", None), ("nf4", None), ("any4", None), ("int4", 4), ("any4", 4)],
}


def _load(name: str):
    if not (data_root() / "models" / name).exists():
        pytest.skip(f"{name} is not under {data_root() / 'models'}")
    return any4lib.load_model(name, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("name, fmt, group_size", [(m, f, g) for m, cases in FORMATS.items() for f, g in cases])
def test_engine_greedy_equals_transformers_on_the_shared_models(name, fmt, group_size):
    model, tokenizer = _load(name)
    if fmt != "bf16":
        quantize_model(model, fmt, group_size, progress=False)
    any4lib.pack_model(model, torch.bfloat16)
    reference = copy.deepcopy(model)  # the engine fuses q/k/v and gate/up on CUDA, releasing the model's parts
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [hf_greedy(reference, i, NEW) for i in ids]
    # The CUDA-graphed eager step (the same kernels as compiled blocks, without a compile per case).
    engine = Engine(model, tokenizer, max_batch=len(PROMPTS), max_len=128, compile="cudagraph")
    out = engine.generate(PROMPTS, NEW, eos=False)
    for prompt, exp, got in zip(ids, expected, out.tokens):
        assert len(got) == NEW
        assert_agrees(reference, prompt, exp, got)
    assert out.timing["decode_tok_s"] > 0 and out.timing["peak_gpu_gb"] > 0
    # One prompt at a time (no padding: the Triton decode step) gives the batch's tokens for the same prompt.
    single = Engine(copy.deepcopy(reference), tokenizer, max_len=128, compile="cudagraph").generate(PROMPTS[0], NEW,
                                                                                                 eos=False)
    assert_agrees(reference, ids[0], expected[0], single.tokens[0])


def test_stories260k_zoo_continuation_through_the_engine_agrees_with_transformers():
    """float32 through compiled blocks in one CUDA graph (the default step) against transformers on the same GPU. At
    new token 14 llama2.c's top-2 logits differ by 0.0035 of 16.5, so float32 kernels may pick either there; the
    exact llama2.c continuation is checked on the CPU (test_engine.py)."""
    from test_engine import F32_TIE
    from test_llama2c import C_GREEDY_ZOO

    model, tokenizer = _load("stories260K")
    model = model.float()
    prompt = C_GREEDY_ZOO[:4]
    expected = hf_greedy(model, prompt, len(C_GREEDY_ZOO) - 4)
    out = Engine(copy.deepcopy(model), tokenizer, max_len=256).generate("Zoo", len(C_GREEDY_ZOO) - 4, eos=False)
    assert_agrees(model, prompt, expected, out.tokens[0], tie=F32_TIE)
    assert "was a little girl named Lily." in out.texts[0]
