"""any4 in transformers (any4lib.hf): from_pretrained on a save_quantized folder gives QuantLinear layers and
load_quantized's logits; save_pretrained round-trips; device_map / max_memory place it; quantization_config=
Any4Config(...) quantizes on load as quantize_model does; folders of earlier versions get a note on converting;
registration never makes `import any4lib` import transformers. On ref-en-16m: lm-eval's own `hf` model on the folder
gives the metrics of the loaded model, and transformers' text-generation pipeline decodes as the engine."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import any4lib
from any4lib.calibration import calibrate
from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.hf import Any4Config
from any4lib.model import load_model, quantize_model, quantized_layers
from any4lib.nn import QuantLinear
from any4lib.paths import data_root
from test_checkpoint import as_earlier_version

REF = data_root() / "models" / "ref-en-16m"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason="needs ../shared/data/models/ref-en-16m")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def saved(tiny, tmp_path):
    """(quantized tiny Llama, its save_quantized folder): any4 g64 calibrated on the prompt, one layer nf4."""
    model, tokenizer = tiny
    quantize_model(model, "any4", 64, calibrate(model, tokenizer, progress=False), exclude=["lm_head", "*.0.mlp.up_proj"],
                   progress=False)
    quantize_model(model, "nf4", 32, include="*.0.mlp.up_proj", progress=False)
    return model, save_quantized(model, tmp_path / "q", tokenizer)


def test_from_pretrained_gives_quant_linears_with_load_quantized_logits(saved):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    layers = quantized_layers(loaded)
    assert {n: (m.format, m.group_size, m.form) for n, m in layers.items()} == {
        n: (m.format, m.group_size, "contract") for n, m in quantized_layers(model).items()}
    assert len(layers) == 14 and type(loaded.lm_head) is torch.nn.Linear
    assert isinstance(loaded.config.quantization_config, Any4Config)
    ids = torch.randint(0, 258, (2, 21))
    assert torch.equal(logits(loaded, ids), logits(load_quantized(folder), ids))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_save_pretrained_round_trips_through_both_loaders(saved, tmp_path):
    model, folder = saved
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "again")
    quant = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert quant["checksums"] is None and quant["layers"] == {"model.layers.0.mlp.up_proj": {"format": "nf4",
                                                                                             "group_size": 32}}
    ids = torch.randint(0, 258, (2, 13))
    expected = logits(model, ids)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), ids), expected)
    assert torch.equal(logits(load_quantized(tmp_path / "again"), ids), expected)


def test_device_map_and_max_memory_place_the_quantized_model(saved, tmp_path):
    model, folder = saved
    ids = torch.randint(0, 258, (1, 9))
    on_cpu = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert isinstance(on_cpu.model.layers[1].mlp.down_proj, QuantLinear)
    # 400 KB of CPU memory holds the embedding and head; the decoder goes to disk (its layers' quantized tensors are
    # buffers, which transformers keeps resident unless offload_buffers=True).
    split = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "400KB"},
                                                 offload_folder=tmp_path / "offload")
    assert split.hf_device_map["model.embed_tokens"] == "cpu" and split.hf_device_map["model.layers"] == "disk"
    for loaded in (on_cpu, split):
        assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_damaged_folder_fails_its_checksum_in_from_pretrained(saved):
    _, folder = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-64:-60] = bytes(4)
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged or was changed after saving"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_quantize_on_load_equals_quantize_model_on_the_prompt(tiny_folder, tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=Any4Config("any4", group_size=64))
    reference, tokenizer = load_model(tiny_folder, dtype=loaded.dtype)
    quantize_model(reference, "any4", 64, calibrate(reference, tokenizer, progress=False), progress=False)
    assert set(quantized_layers(loaded)) == set(quantized_layers(reference)) and len(quantized_layers(loaded)) == 14
    ids = torch.randint(0, 258, (2, 11))
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    loaded.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(load_quantized(tmp_path / "q"), ids), logits(reference, ids))


def test_weight_activation_models_keep_their_activation_format_through_both_loaders(tiny_folder, tmp_path):
    """W4A8: quantized on load with Any4Config(activations=...), saved, and read back by from_pretrained and
    load_quantized, every layer still rounds its input to int8 (logits equal the quantize_model reference's)."""
    config = Any4Config("int4", group_size=64, activations="int8")
    loaded = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=config)
    reference, tokenizer = load_model(tiny_folder, dtype=loaded.dtype)
    quantize_model(reference, "int4", 64, calibrate(reference, tokenizer, progress=False), activations="int8",
                   progress=False)
    ids = torch.randint(0, 258, (2, 15))
    assert {m.activations for m in quantized_layers(loaded).values()} == {"int8"}
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    save_quantized(reference, tmp_path / "w4a8")
    assert json.loads((tmp_path / "w4a8" / "config.json").read_text())["quantization_config"]["activations"] == "int8"
    for again in (AutoModelForCausalLM.from_pretrained(tmp_path / "w4a8"), load_quantized(tmp_path / "w4a8")):
        assert {m.activations for m in quantized_layers(again).values()} == {"int8"}
        assert torch.equal(logits(again, ids), logits(reference, ids))


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="int9"), "unknown format 'int9'"),
    (dict(method="magic"), "method"),
    (dict(calibration="wikitext2:x"), "calibration 'wikitext2:x'"),
    (dict(activations="int7x"), "unknown activation format"),
])
def test_any4_config_refuses_bad_requests_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Any4Config(**kwargs)


def test_from_pretrained_on_an_earlier_version_folder_says_how_to_convert(saved):
    model, folder = saved
    as_earlier_version(folder, model, 3)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(handler)
    try:
        AutoModelForCausalLM.from_pretrained(folder)
    finally:
        report_logger.removeHandler(handler)
    hint = f"convert it once: any4lib.save_quantized(any4lib.load_quantized({str(folder)!r}), NEW_FOLDER)"
    assert any(hint in m for m in messages)
    converted = save_quantized(load_quantized(folder), folder.parent / "converted")
    ids = torch.randint(0, 258, (1, 7))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(converted), ids), logits(model, ids))


@pytest.mark.parametrize("first", ["import any4lib", "import transformers.quantizers.auto"])
def test_import_any4lib_stays_cheap_and_registers_in_either_order(first):
    other = "import transformers.quantizers.auto" if first == "import any4lib" else "import any4lib"
    code = (f"import sys; {first}; cheap = 'transformers' not in sys.modules; {other}; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as q; "
            "print(cheap, type(q['any4']).__name__, q['any4'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(first == "import any4lib"), "ABCMeta", "Any4HfQuantizer"]


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    """ref-en-16m quantized any4 g128 on the prompt, saved with its tokenizer (once for the tests below)."""
    if not REF.is_dir():
        pytest.skip(f"needs {REF}")
    model, tokenizer = load_model("ref-en-16m")
    quantize_model(model, "any4", 128, calibrate(model, tokenizer, progress=False), progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("ref") / "q", tokenizer), tokenizer


@pytest.mark.real_data
@needs_ref
def test_ref_en_16m_from_pretrained_equals_load_quantized(ref_folder):
    folder, tokenizer = ref_folder
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert len(quantized_layers(loaded)) == 8 * 7 and loaded.dtype == torch.float32  # load_model's CPU default
    ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    assert torch.equal(logits(loaded, ids), logits(load_quantized(folder), ids))


@pytest.mark.slow
@pytest.mark.real_data
@needs_ref
def test_lm_eval_hf_model_on_the_folder_equals_evaluating_the_loaded_model(ref_folder, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from any4lib.zeroshot import evaluate_tasks, task_config
    from test_zeroshot import FIXTURES, SPLIT

    folder, tokenizer = ref_folder
    tasks = ["piqa", "lambada_openai"]
    for task in tasks:
        (tmp_path / task).mkdir()
        (tmp_path / task / f"{SPLIT[task]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FIXTURES[task]))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder}", device="cpu", batch_size=4,
                                  tasks=[task_config(t, tmp_path) for t in tasks],
                                  task_manager=TaskManager(include_defaults=False), log_samples=False)
    through_hf = {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and v != "N/A"}
                  for task, metrics in out["results"].items()}
    in_memory = evaluate_tasks(load_quantized(folder), tokenizer, tasks, data_dir=tmp_path, batch_size=4)
    assert through_hf == in_memory and 0 < through_hf["lambada_openai"]["perplexity"] < float("inf")


@pytest.mark.slow
@pytest.mark.real_data
@needs_ref
def test_text_generation_pipeline_on_the_folder_decodes_as_the_engine(ref_folder):
    from transformers import pipeline

    from test_engine import F32_TIE, assert_agrees

    folder, tokenizer = ref_folder
    prompt = "The history of the city"
    generate = pipeline("text-generation", model=str(folder))
    generated = generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         return_tensors=True)[0]["generated_token_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert generated[:len(prompt_ids)] == prompt_ids
    model = load_quantized(folder)
    engine = any4lib.generate(model, tokenizer, prompt, 12, eos=False).tokens[0]
    assert_agrees(load_quantized(folder), prompt_ids, generated[len(prompt_ids):], engine, tie=F32_TIE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_on_a_gpu_packs_the_layers_for_the_kernels(saved, tmp_path):
    model, _ = saved
    folder = save_quantized(model.to(torch.bfloat16), tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    forms = {n: m.form for n, m in quantized_layers(loaded).items()}
    assert set(forms.values()) == {"packed"}
    ids = torch.randint(0, 258, (1, 9))
    reference = any4lib.pack_model(load_quantized(folder, "cuda").to(torch.bfloat16), torch.bfloat16)
    assert torch.equal(logits(loaded, ids.cuda()), logits(reference, ids.cuda()))
