"""Issue 8: the kernel path (packed weights + tinygemm ops) reproduces fake-quant perplexity on ref-en-16m."""

import copy

import pytest
import torch

from any4lib import QuantLinear, calibrate, load_model, quantize_model, use_kernels
from any4lib.evaluate import evaluate_perplexity
from any4lib.paths import data_root

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.real_data,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (data_root() / "models/ref-en-16m").is_dir(), reason="needs ../shared/data/models/ref-en-16m"),
]


@pytest.fixture(scope="module")
def ref_model():
    model, tokenizer = load_model("ref-en-16m", dtype=torch.bfloat16, device="cuda")
    return model, tokenizer, calibrate(model, tokenizer)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "any4"])
def test_kernel_path_perplexity_within_half_a_percent_of_fake_quant(ref_model, fmt):
    model, tokenizer, stats = ref_model
    net = quantize_model(copy.deepcopy(model), fmt, 128, stats, progress=False)
    layers = [m for m in net.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.unpacked_reason() is None for m in layers), "a layer would fall back"
    settings = dict(dataset="heldout", seq_len=512, max_tokens=8192, progress=False)
    fake = evaluate_perplexity(use_kernels(net, False), tokenizer, **settings).ppl
    kernel = evaluate_perplexity(use_kernels(net, True), tokenizer, batch_size=1, chunk=16, **settings).ppl
    assert kernel == pytest.approx(fake, rel=5e-3), f"{fmt}: kernel path {kernel:.3f} vs fake-quant {fake:.3f}"
