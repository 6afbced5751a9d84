"""Stand-in checkpoints: published parameter counts at full size, and test-sized copies of the same structure that
are written as sharded Hugging Face folders, load through any4lib.load_model and run."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from any4lib.model import load_model, quantize_model
from any4lib.standins import (
    STANDINS, CheckpointWeights, StandinWeights, layer_shapes, other_shapes, scaled_down, standin_bytes, standin_config,
    write_standin,
)  # fmt: skip

# Parameter counts the model cards publish.
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
             "mixtral-8x7b": 46_702_792_704}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STANDINS))
def test_full_size_configs_have_the_published_shapes(name):
    config = standin_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == PUBLISHED.get(name, count)
    assert standin_bytes(config) == 2 * count  # the generator's tensor tables cover every parameter once
    assert config.any4_standin["note"].startswith("random weights")
    if name == "llama-3.2-1b":
        assert config.rope_parameters["rope_type"] == "llama3" and config.tie_word_embeddings
    assert config.num_attention_heads // config.num_key_value_heads == (8 if name == "llama-3-70b" else 4)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3-8b", "llama-3-70b", "mixtral-8x7b"])
def test_scaled_down_folders_load_through_load_model_and_run(tiny, tmp_path, name):
    _, tokenizer = tiny
    config = scaled_down(name, vocab_size=300)
    folder = write_standin(config, tmp_path / name, tokenizer, seed=3, max_shard_bytes=200_000, progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected = other_shapes(config) | layer_shapes(config, 0) | layer_shapes(config, 1)
    assert sorted(index["weight_map"]) == sorted(expected)
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the hub has them

    # transformers itself finds every tensor its model needs under the names written, and nothing else.
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model, folder_tokenizer = load_model(folder, dtype=torch.float32)
    assert model.config.any4_standin["stands_in_for"] == STANDINS[name][0]
    assert (model.config.bos_token_id, len(folder_tokenizer)) == (tokenizer.bos_token_id, len(tokenizer))
    ids = folder_tokenizer("stand-ins run", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 300) and torch.isfinite(logits).all()

    # The shards hold exactly what the on-the-fly generator gives, layer by layer.
    written, generated = CheckpointWeights(folder), StandinWeights(config, seed=3)
    for i in range(2):
        a, b = written.layer_tensors(i), generated.layer_tensors(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(t, generated.other_tensors()[k]) for k, t in written.other_tensors().items())
    if name.startswith("llama"):  # names are the model's own: the loaded weights are the generated ones
        state = model.state_dict()
        assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"].float())


def test_moe_standin_quantizes_every_expert(tiny, tmp_path):
    _, tokenizer = tiny
    folder = write_standin(scaled_down("moe-small", vocab_size=300), tmp_path / "moe", tokenizer, progress=False)
    model, _ = load_model(folder, dtype=torch.float32)
    quantize_model(model, "int4", 64, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert len(experts.gate_up_proj) == 8 and type(experts.down_proj[7]).__name__ == "QuantLinear"


def test_generator_is_seeded_per_tensor_and_order_free():
    config = scaled_down("llama-3-70b")
    weights = StandinWeights(config, seed=1)
    later = weights.layer_tensors(1)
    first = weights.layer_tensors(0)
    assert torch.equal(weights.layer_tensors(1)["model.layers.1.self_attn.q_proj.weight"],
                       later["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], later["model.layers.1.mlp.up_proj.weight"])
    other_seed = StandinWeights(config, seed=2).layer_tensors(0)
    assert not torch.equal(other_seed["model.layers.0.mlp.up_proj.weight"], first["model.layers.0.mlp.up_proj.weight"])
    up = first["model.layers.0.mlp.up_proj.weight"].float()
    assert up.dtype == torch.float32 and abs(up.std().item() - 0.02) < 1e-3
    assert torch.equal(first["model.layers.0.input_layernorm.weight"], torch.ones(128, dtype=torch.bfloat16))


def test_rerun_keeps_the_folder_and_bad_requests_say_what_to_do(tiny, tmp_path):
    _, tokenizer = tiny
    config = scaled_down("llama-3-8b", vocab_size=300)
    folder = write_standin(config, tmp_path / "s", tokenizer, progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_standin(scaled_down("llama-3-8b", vocab_size=300), folder, tokenizer, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and not (tmp_path / "s.partial").exists()
    with pytest.raises(FileExistsError, match="holds something else"):
        write_standin(scaled_down("llama-3-8b", vocab_size=300), folder, tokenizer, seed=1, progress=False)
    with pytest.raises(ValueError, match="258 tokens, more than the model's vocab_size 200"):
        write_standin(scaled_down("llama-3-8b", vocab_size=200), tmp_path / "v", tokenizer, progress=False)
    with pytest.raises(ValueError, match="unknown stand-in 'llama-4'; choose one of llama-3.2-1b"):
        standin_config("llama-4")


def test_scale_bench_times_every_stage_of_a_standin_and_skips_a_stored_run(tiny, tmp_path, data_root, capsys):
    from any4lib.bench import scale

    _, tokenizer = tiny
    folder = write_standin(scaled_down("moe-small", vocab_size=300), tmp_path / "moe", tokenizer, progress=False)
    args = ["--model", str(folder), "--format", "int4", "--group-size", "64", "--seq-len", "32", "--windows", "2",
            "--formats", "nf4",
            "--device", "cpu", "--store", str(tmp_path / "scale")]  # fmt: skip
    record = scale.main(args)
    metrics = record["metrics"]
    assert set(metrics["stages"]) == {"load", "calibrate", "quantize", "save", "load_quantized", "perplexity"}
    assert all(s["seconds"] > 0 and s["peak_gpu_gb"] is None for s in metrics["stages"].values())
    assert list(metrics["quantize_other_formats"]) == ["nf4"] and metrics["ppl_tokens"] == 2 * 31
    assert metrics["quantized_layers"] == 2 * (4 + 2 * 8)  # attention and both projections of 8 experts, per layer
    assert record["config"]["standin"]["name"] == "moe-small" and record["provenance"]["git"]
    again = scale.main(args)  # stored: nothing recomputed
    assert again == record and len(list((tmp_path / "scale").glob("*.json"))) == 1


def test_accuracy_records_of_a_standin_are_labelled(tiny, tmp_path, text_file):
    from any4lib import experiments

    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3.2-1b", vocab_size=300), tmp_path / "s", tokenizer, progress=False)
    frame = experiments.accuracy_records(str(folder), ["bf16"], datasets=[str(text_file)], seq_len=32,
                                         max_tokens=64, store=tmp_path / "acc", progress=False)  # fmt: skip
    assert frame.ppl[0] > 1
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "acc").glob("*.json")]
    assert record["config"]["standin"] == "llama-3.2-1b"
