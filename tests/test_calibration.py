import pytest
import torch

import any4lib.pipeline as pipeline_mod
from any4lib.calibration import ActivationStats, calibrate, calibration_inputs, record_inputs
from any4lib.model import quantize_model
from any4lib.paths import calibration_prompt


def test_prompt_statistics_match_the_layer_inputs_computed_by_hand(tiny):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, progress=False)
    ids = tokenizer(calibration_prompt(), return_tensors="pt").input_ids
    with torch.no_grad():
        # q_proj of layer 0 sees RMSNorm(embeddings); lm_head sees the final hidden state.
        x_q = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).double().reshape(-1, 128)
        x_head = model.model(ids).last_hidden_state.double().reshape(-1, 128)
    for name, x in (("model.layers.0.self_attn.q_proj", x_q), ("lm_head", x_head)):
        torch.testing.assert_close(stats.sample_weight(name).double(), x.mean(0).abs(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.sample_weight(name, "mean_abs").double(), x.abs().mean(0), rtol=1e-5, atol=1e-7)
        assert stats.tokens[name] == ids.numel()
    # Every linear layer, in forward order: q, k, v share one input and come first.
    assert stats.names[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(stats.names) == 2 * 7 + 1


def test_dataset_windows_are_seeded_and_sized(tiny, text_file):
    _, tokenizer = tiny
    a, source = calibration_inputs(tokenizer, text_file, n_samples=5, seq_len=32, seed=1)
    b, _ = calibration_inputs(tokenizer, text_file, n_samples=5, seq_len=32, seed=1)
    c, _ = calibration_inputs(tokenizer, text_file, n_samples=5, seq_len=32, seed=2)
    assert [w.shape for w in a] == [(1, 32)] * 5 and "5x32" in source
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    full = tokenizer(text_file.read_text(), return_tensors="pt").input_ids[0]
    assert any(torch.equal(full[s : s + 32], a[0][0]) for s in range(full.numel() - 32))


def test_save_load_round_trip_keeps_statistics_and_online_windows(tiny, text_file, tmp_path):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, text_file, n_samples=2, seq_len=16, mode="online", progress=False)
    stats.save(tmp_path / "stats.safetensors")
    back = ActivationStats.load(tmp_path / "stats.safetensors")
    assert back.names == stats.names and back.mode == "online" and back.source == stats.source
    for name in stats.names:
        assert torch.equal(back.sample_weight(name), stats.sample_weight(name))
    assert all(torch.equal(x, y) for x, y in zip(back.inputs, stats.inputs))


def test_online_calibration_measures_each_layer_after_the_earlier_ones_are_quantized(tiny, monkeypatch):
    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    used = {}
    real_quantize = pipeline_mod.quantize

    def spy(w, fmt, group_size, sample_weight=None, **options):
        used[len(used)] = sample_weight
        return real_quantize(w, fmt, group_size, sample_weight=sample_weight, **options)

    monkeypatch.setattr(pipeline_mod, "quantize", spy)  # online calibration runs block by block (any4lib.pipeline)
    quantize_model(model, "any4", 128, calibration=stats, progress=False)
    # A layer's input depends only on the layers before it, so the final model shows what each layer was given.
    final = record_inputs(model, stats.inputs, ActivationStats())
    names = [n for n in stats.names if n != "lm_head"]
    for i, name in enumerate(names):
        torch.testing.assert_close(used[i], final.sample_weight(name))
    assert not torch.allclose(final.sample_weight(names[-1]), stats.sample_weight(names[-1]))


def test_errors_say_what_was_wrong(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="calibration mode"):
        calibrate(model, tokenizer, mode="sideways", progress=False)
    stats = calibrate(model, tokenizer, layers=["lm_head"], progress=False)
    with pytest.raises(KeyError, match="no calibration statistics"):
        stats.sample_weight("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="unknown statistic"):
        stats.sample_weight("lm_head", "median")
    with pytest.raises(KeyError, match="no linear layer named"):
        calibrate(model, tokenizer, layers=["nope"], progress=False)
    with pytest.raises(FileNotFoundError, match="no calibration statistics file"):
        ActivationStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "short.txt").write_text("a short text")
    with pytest.raises(ValueError, match="too few"):
        calibrate(model, tokenizer, tmp_path / "short.txt", n_samples=1, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="online calibration needs"):
        quantize_model(model, "any4", calibration=ActivationStats(mode="online"), progress=False)


def test_public_names_are_not_shadowed_by_submodules():
    # Importing a submodule sets it as a package attribute; a public function of the same name would be hidden.
    import importlib
    import pkgutil
    import types

    import any4lib

    for info in pkgutil.iter_modules(any4lib.__path__):
        if info.name not in ("kernels", "bench"):
            importlib.import_module(f"any4lib.{info.name}")
    for name in any4lib.__all__:
        assert not isinstance(getattr(any4lib, name), types.ModuleType), f"any4lib.{name} is a module"


@pytest.mark.parametrize("seq_len", [1, 257])
def test_calibration_window_is_checked_against_the_model(tiny, text_file, seq_len):
    from any4lib.calibration import calibrate

    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"seq_len must be an integer >= 2 and <= 256"):
        calibrate(model, tokenizer, text_file, n_samples=2, seq_len=seq_len, progress=False)
