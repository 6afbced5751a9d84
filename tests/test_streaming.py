"""Layer-by-layer quantization (any4lib.streaming): bit for bit the in-memory path on the same calibration windows,
one decoder layer materialised at a time, shards written as it goes and read back; and online calibration costs a
fixed number of passes per block (not a model prefix per layer)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from any4lib.calibration import calibrate
from any4lib.checkpoint import load_quantized
from any4lib.model import load_model, quantize_model
from any4lib.nn import QuantLinear
from any4lib.paths import data_root
from any4lib.pipeline import decoder_blocks
from any4lib.standins import CheckpointWeights, StandinWeights, scaled_down, write_standin
from any4lib.streaming import quantize_checkpoint


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


def in_memory(folder, fmt: str, group_size: int):
    """The all-in-memory reference: the whole bf16 model loaded, online calibration, quantize_model."""
    model, tokenizer = load_model(folder, dtype=torch.bfloat16)
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    return quantize_model(model, fmt, group_size, stats, progress=False), stats.inputs, tokenizer


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not (data_root() / "models/ref-en-16m").is_dir(), reason="needs ../shared/data/models/ref-en-16m")
def test_ref_en_16m_layer_by_layer_equals_in_memory_bit_for_bit_and_reloads_from_shards(tmp_path):
    reference, windows, tokenizer = in_memory("ref-en-16m", "any4", 128)
    folder = tmp_path / "q"
    model = quantize_checkpoint("ref-en-16m", "any4", 128, windows=windows, out=folder, layers_per_shard=3,
                                tokenizer=tokenizer, progress=False)  # fmt: skip
    assert_same_state(reference, model)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8 * 7

    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert sorted(quant["checksums"]) == ["model-00001.safetensors", "model-00002.safetensors",
                                          "model-00003.safetensors", "model-00004.safetensors"]  # 8 layers by 3, the rest
    assert quant["format"] == "any4" and quant["modules_to_not_convert"] == ["lm_head"] and not quant["layers"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.7.mlp.down_proj.codes"] == "model-00003.safetensors"
    assert index["model.embed_tokens.weight"] == "model-00004.safetensors"
    loaded = load_quantized(folder)
    assert_same_state(reference, loaded)
    with torch.no_grad():
        assert torch.equal(reference(windows[0]).logits, loaded(windows[0]).logits)


@pytest.mark.parametrize("name, fmt", [("llama-3.2-1b", "any4"), ("moe-small", "int4")])
def test_standin_from_shards_and_from_the_generator_equal_in_memory(tiny, tmp_path, name, fmt):
    """Tied embeddings and llama3 RoPE (1B); 3-D experts converted from the checkpoint's w1/w3/w2 (MoE)."""
    _, tokenizer = tiny
    config = scaled_down(name, vocab_size=300, layers=3)
    folder = write_standin(config, tmp_path / name, tokenizer, seed=5, max_shard_bytes=300_000, progress=False)
    reference, windows, _ = in_memory(folder, fmt, 64)

    from_shards = quantize_checkpoint(folder, fmt, 64, windows=windows, out=tmp_path / "q", progress=False)
    assert_same_state(reference, from_shards)
    from_generator = quantize_checkpoint(StandinWeights(config, seed=5), fmt, 64, windows=windows, progress=False)
    assert_same_state(reference, from_generator)
    assert_same_state(reference, load_quantized(tmp_path / "q"))
    if name == "moe-small":  # every expert quantized per expert, routers left in bf16
        layer = from_shards.model.layers[2].mlp
        assert not isinstance(layer.gate, QuantLinear) and layer.gate.weight.dtype == torch.bfloat16
        assert all(isinstance(m, QuantLinear) for m in (*layer.experts.gate_up_proj, *layer.experts.down_proj))


class WatchedWeights(CheckpointWeights):
    """Checks, each time a layer is read, that no other decoder layer holds unquantized weights on a device."""

    def layer_tensors(self, i):
        _, blocks = decoder_blocks(self.model)
        for j, block in enumerate(blocks):
            linears = [m for m in block.modules() if type(m) is nn.Linear]
            on_device = [m for m in linears if not m.weight.is_meta]
            assert not on_device if j != i else True, f"reading layer {i}: layer {j} holds bf16 weights"
        return super().layer_tensors(i)


def test_one_layer_in_bf16_at_a_time(tiny, tmp_path, monkeypatch):
    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300, layers=3), tmp_path / "s", tokenizer,
                           progress=False)  # fmt: skip
    weights = WatchedWeights(folder)
    import any4lib.streaming as streaming

    built = streaming.empty_model
    monkeypatch.setattr(streaming, "empty_model", lambda *a: setattr(weights, "model", built(*a)) or weights.model)
    model = quantize_checkpoint(weights, "int4", 64, tokenizer=tokenizer, progress=False)
    assert model is weights.model and sum(isinstance(m, QuantLinear) for m in model.modules()) == 3 * 7


def test_online_calibration_replays_each_block_a_fixed_number_of_times(tiny, tmp_path):
    """Each block runs once to find which layers share an input, once per shared input set (q/k/v, o, gate/up,
    down) and once to give the next block's inputs, per window: the same count for every block, where re-running
    the model prefix per layer would run block 0 once per linear layer of the whole model."""
    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300, layers=4), tmp_path / "s", tokenizer,
                           progress=False)  # fmt: skip
    model, _ = load_model(folder)
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    stats.inputs = stats.inputs * 2
    counts = [0] * 4
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    quantize_model(model, "int4", 64, stats, progress=False)
    capture = 2  # block 0's entry also stops each window's pass through the embeddings
    assert counts == [1 + (4 + 1) * 2 + capture] + [1 + (4 + 1) * 2] * 3


def test_bad_requests_fail_before_any_layer_is_read(tiny, tmp_path):
    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300), tmp_path / "s", tokenizer, progress=False)
    with pytest.raises(ValueError, match="outside"):
        quantize_checkpoint(folder, "int4", 64, tokenizer=tokenizer, exclude=[], progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_checkpoint(folder, "int4", 96, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        quantize_checkpoint(folder, "int4", 64, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nowhere", "int4", 64, tokenizer=tokenizer, progress=False)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_sequential_writes_what_the_in_memory_path_gives(tiny, tmp_path, data_root, method):
    from any4lib.cli import main

    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300), tmp_path / "s", tokenizer, progress=False)
    main(["quantize", "--model", str(folder), "--format", "int4", "--group-size", "64", "--sequential",
          "--calibration", "heldout:2x64", "--method", method, "--out", str(tmp_path / "q")])  # fmt: skip
    model, _ = load_model(folder, dtype=torch.float32)  # the CLI computes in float32 on a CPU
    stats = calibrate(model, tokenizer, "heldout", n_samples=2, seq_len=64, mode="online", progress=False)
    saved = load_quantized(tmp_path / "q")
    assert_same_state(quantize_model(model, "int4", 64, stats, progress=False, method=method), saved)
    assert saved.model.layers[0].mlp.down_proj.method == method


def test_scale_bench_sequential_stages_and_perplexity_of_the_in_memory_model(tiny, tmp_path, data_root):
    from any4lib.bench import scale
    from any4lib.evaluate import evaluate_perplexity
    from any4lib.experiments import KERNEL_CHUNK

    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300), tmp_path / "s", tokenizer, progress=False)
    record = scale.main(["--model", str(folder), "--format", "int4", "--group-size", "64", "--seq-len", "32",
                         "--windows", "2", "--sequential", "--device", "cpu", "--store", str(tmp_path / "scale")])
    metrics = record["metrics"]
    assert set(metrics["stages"]) == {"quantize_by_layer", "load_quantized", "perplexity"}
    assert record["config"]["path"] == "layer by layer" and record["config"]["standin"]["name"] == "llama-3-8b"
    model, _ = load_model(folder, dtype=torch.bfloat16)
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    quantize_model(model, "int4", 64, stats, progress=False)
    expected = evaluate_perplexity(model, tokenizer, "heldout", 32, 64, batch_size=1, progress=False, chunk=KERNEL_CHUNK)
    assert metrics["ppl"] == expected.ppl and metrics["quantized_layers"] == 2 * 7


def test_scale_bench_runs_a_method_layer_by_layer_as_quantize_model_does(tiny, tmp_path, data_root):
    from any4lib.bench import scale
    from any4lib.evaluate import evaluate_perplexity
    from any4lib.experiments import KERNEL_CHUNK

    _, tokenizer = tiny
    folder = write_standin(scaled_down("llama-3-8b", vocab_size=300), tmp_path / "s", tokenizer, progress=False)
    args = ["--model", str(folder), "--format", "int4", "--group-size", "64", "--seq-len", "32", "--windows", "2",
            "--sequential", "--no-save", "--device", "cpu", "--store", str(tmp_path / "scale"),
            "--calibration", "heldout:2x64"]  # fmt: skip
    record = scale.main(args + ["--method", "gptq"])
    assert record["config"]["method"] == "gptq" and record["metrics"]["calibration_tokens"] == 2 * 64
    model, _ = load_model(folder, dtype=torch.bfloat16)
    stats = calibrate(model, tokenizer, "heldout", n_samples=2, seq_len=64, mode="online", progress=False)
    quantize_model(model, "int4", 64, stats, progress=False, method="gptq")
    expected = evaluate_perplexity(model, tokenizer, "heldout", 32, 64, batch_size=1, progress=False, chunk=KERNEL_CHUNK)
    assert record["metrics"]["ppl"] == expected.ppl
    rtn = scale.main(args)  # a second record: rtn's key has no method field, as before methods existed
    assert "method" not in rtn["config"] and rtn["metrics"]["ppl"] != expected.ppl
    with pytest.raises(SystemExit):
        scale.main(["--model", str(folder), "--method", "gptq"])  # the in-memory run times rtn only


class Stopped(Exception):
    """Stands for a time limit or a preemption that ends the run mid-way."""


@pytest.mark.parametrize("fmt, method, propagate", [("any4", "rtn", "quantized"), ("int4", "gptq", "float")])
def test_a_stopped_run_resumes_from_its_shards_and_ends_bit_for_bit_as_an_uninterrupted_one(
    tiny, tmp_path, monkeypatch, fmt, method, propagate
):
    import any4lib.streaming as streaming

    _, tokenizer = tiny
    config = scaled_down("llama-3.2-1b", vocab_size=300, layers=5)
    folder = write_standin(config, tmp_path / "s", tokenizer, seed=3, progress=False)
    windows = [torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    run = dict(windows=windows, method=method, method_options={"propagate": propagate}, layers_per_shard=2,
               progress=False)  # fmt: skip
    whole = quantize_checkpoint(folder, fmt, 64, out=tmp_path / "whole", **run)

    quantized = []
    real = streaming.quantize_and_advance

    def stops_at_the_fourth_layer(block, names, *args, **kwargs):
        if len(quantized) == 3:
            raise Stopped
        quantized.append(names)
        return real(block, names, *args, **kwargs)

    monkeypatch.setattr(streaming, "quantize_and_advance", stops_at_the_fourth_layer)
    with pytest.raises(Stopped):
        quantize_checkpoint(folder, fmt, 64, out=tmp_path / "stopped", **run)
    progress = json.loads((tmp_path / "stopped" / "progress.json").read_text())
    assert progress["layers"] == 2 and progress["files"] == ["model-00001.safetensors"]  # layer 2 was not flushed
    assert not (tmp_path / "stopped" / "config.json").exists()  # written last: the folder is not a model yet

    quantized.clear()
    resumed = quantize_checkpoint(folder, fmt, 64, out=tmp_path / "stopped", **run)
    assert len(quantized) == 3  # layers 2, 3, 4: the two on disk were read back
    assert_same_state(whole, resumed)
    assert_same_state(whole, load_quantized(tmp_path / "stopped"))
    assert (tmp_path / "stopped" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()

    quantized.clear()
    again = quantize_checkpoint(folder, fmt, 64, out=tmp_path / "stopped", **run)  # finished: nothing quantized
    assert not quantized
    assert_same_state(whole, again)
    with pytest.raises(ValueError, match="other settings .*format"):
        quantize_checkpoint(folder, "nf4", 64, out=tmp_path / "stopped", **run)
