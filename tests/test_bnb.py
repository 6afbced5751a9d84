"""bitsandbytes 4-bit models onto tinygemm (any4lib.bnb): each Linear4bit's QuantLinear dequantizes bit for bit to
what bitsandbytes' own dequantize_4bit gives (nf4 and fp4, blocks of 64, with and without double quantization), a
model loaded by transformers with a BitsAndBytesConfig converts in place and generates through the engine."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import any4lib
from any4lib.bnb import convert_bnb_model, quantized_from_bnb
from any4lib.model import quantized_layers
from any4lib.nn import QuantLinear
from any4lib.paths import data_root
from test_engine import BF16_TIE, F32_TIE, assert_agrees, hf_greedy

functional = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")

KINDS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                              b.view(torch.int16 if b.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("quant_type, double_quant", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_bitsandbytes_bit_for_bit(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    w = (torch.randn(96, 512) * 0.02 * torch.rand(96, 1) * 4).to(dtype)  # rows of different ranges
    w[3, 100] = 0.3  # an outlier in one block
    packed, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    q = quantized_from_bnb(packed, state)
    assert (q.format, q.group_size, tuple(q.scale.shape)) == ({"nf4": "nf4", "fp4": "fp4_bnb"}[quant_type], 64, (96, 8))
    reference = functional.dequantize_4bit(packed, state)
    assert same_bits(q.dequantize(dtype), reference)
    assert same_bits(QuantLinear(q).dequantized_weight(dtype), reference)


def test_weights_bitsandbytes_cannot_hold_in_rows_are_refused():
    packed, state = functional.quantize_4bit(torch.randn(4, 96), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match=r"\[4, 96\] weight in bitsandbytes blocks of 64: blocks would span rows"):
        quantized_from_bnb(packed, state)
    with pytest.raises(ValueError, match="no bitsandbytes Linear4bit layer"):
        convert_bnb_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def bnb_config(quant_type: str, double_quant: bool) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)


def assert_converts_exactly(model) -> dict:
    """Convert `model` in place; each layer's weight bit for bit bitsandbytes' own dequantized one."""
    expected = {name: functional.dequantize_4bit(m.weight.data, m.weight.quant_state)  # in the weight's own dtype
                for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    convert_bnb_model(model)
    layers = quantized_layers(model)
    assert set(layers) == set(expected) and not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for name, layer in layers.items():
        assert same_bits(layer.dequantized_weight(expected[name].dtype), expected[name]), name
    assert getattr(model.config, "quantization_config", None) is None
    return layers


@pytest.mark.parametrize("quant_type, double_quant", KINDS)
def test_a_transformers_bitsandbytes_model_converts_and_generates_through_the_engine(tiny_folder, quant_type,
                                                                                    double_quant):
    config = bnb_config(quant_type, double_quant)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=config, device_map="cpu")
    assert len(assert_converts_exactly(model)) == 14
    tokenizer = any4lib.load_model(tiny_folder)[1]
    prompt = tokenizer("The quick brown fox")["input_ids"]
    reference = copy.deepcopy(model)  # transformers' forward through the QuantLinear layers
    tokens = any4lib.generate(model, tokenizer, "The quick brown fox", 12, eos=False).tokens[0]
    assert_agrees(reference, prompt, hf_greedy(reference, prompt, 12), tokens, tie=F32_TIE)
    # bitsandbytes' own 4-bit matmul (on a CPU with AVX512-BF16 it computes in bf16).
    own = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=config, device_map="cpu")
    assert_agrees(reference, prompt, hf_greedy(own, prompt, 12), tokens, tie=BF16_TIE)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_weight_the_cpu_kernel_repacked_converts_to_what_it_multiplies_by(tiny_folder, double_quant):
    from bitsandbytes.functional import QuantState

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=bnb_config("nf4", double_quant),
                                                 device_map="cpu")
    layer = model.model.layers[0].mlp.down_proj
    stored, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
    with torch.no_grad():
        layer(torch.randn(1, layer.in_features))  # may repack the weight for bitsandbytes' CPU kernel
    repacked = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    absmax = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    if repacked:  # its absmax rounded to bf16 once repacked
        absmax = absmax.bfloat16().float()
    expected = functional.dequantize_4bit(stored, QuantState(absmax=absmax.float(), shape=state.shape,
                                                             dtype=torch.float32, blocksize=64, code=state.code,
                                                             quant_type="nf4"))
    converted = quantized_from_bnb(layer.weight.data, layer.weight.quant_state)
    assert same_bits(converted.dequantize(torch.float32), expected)


def test_a_saved_bitsandbytes_folder_converts_and_saves_as_any4(tiny_folder, tmp_path):
    quantized = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=bnb_config("nf4", True),
                                                     device_map="cpu")
    quantized.save_pretrained(tmp_path / "bnb")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu")  # bitsandbytes' own reload
    assert_converts_exactly(model)
    folder = any4lib.save_quantized(model, tmp_path / "any4")
    back = AutoModelForCausalLM.from_pretrained(folder)
    assert back.config.quantization_config.format == "nf4" and back.config.quantization_config.group_size == 64
    ids = torch.randint(0, 258, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.real_data
@pytest.mark.skipif(not (data_root() / "models" / "ref-en-16m").is_dir(), reason="needs ref-en-16m")
def test_ref_en_16m_in_bitsandbytes_nf4_converts_exactly_and_decodes_as_transformers():
    folder = data_root() / "models" / "ref-en-16m"
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("nf4", True),
                                                 device_map="cpu", dtype=torch.float32)
    assert len(assert_converts_exactly(model)) == 8 * 7
    tokenizer = any4lib.load_model(folder)[1]
    reference = copy.deepcopy(model)
    prompt = "The history of the city"
    out = any4lib.generate(model, tokenizer, prompt, 16, eos=False)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert_agrees(reference, prompt_ids, hf_greedy(reference, prompt_ids, 16), out.tokens[0], tie=F32_TIE)


@pytest.mark.parametrize("name, quant_type", [("bnb-nf4-tinygemm", "nf4"), ("bnb-fp4-tinygemm", "fp4")])
def test_the_bench_rows_run_bitsandbytes_codes_on_tinygemm(name, quant_type):
    from any4lib.engine.random_weights import method

    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    layer = method(name, 128).make(w, seed=0)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert layer.form == "packed" and torch.equal(layer.quantized.codes, quantized_from_bnb(packed, state).codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type, double_quant", KINDS)
def test_converted_layers_run_tinygemm_against_bitsandbytes_on_the_gpu(quant_type, double_quant):
    torch.manual_seed(0)
    w = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
    packed, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    layer = QuantLinear(quantized_from_bnb(packed, state))
    assert layer.pack(torch.bfloat16)  # tinygemm runs it
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    expected = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
