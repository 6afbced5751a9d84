import copy

import pytest
import torch
from torch import nn

import any4lib
from any4lib.calibration import calibrate
from any4lib.model import bits_per_weight, load_model, quantize_model, select_linear_layers
from any4lib.nn import QuantLinear


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_quantize_model_equals_quantizing_each_weight(tiny):
    model, tokenizer = tiny
    reference = copy.deepcopy(model)
    stats = calibrate(model, tokenizer, progress=False)
    quantize_model(model, "any4", 128, calibration=stats, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and "lm_head" not in layers and type(model.lm_head) is nn.Linear
    # Independent path: fake-quantize each nn.Linear's weight in place with the same statistics.
    for name in layers:
        linear = reference.get_submodule(name)
        q = any4lib.quantize(linear.weight, "any4", 128, sample_weight=stats.sample_weight(name))
        linear.weight.data = q.dequantize()
    ids = torch.randint(0, 258, (2, 40))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)
    # 4-bit codes, a 16-bit scale and zero per 128 weights, a 16-entry 16-bit LUT per row of K weights.
    sizes = [(m.out_features, m.in_features) for m in layers.values()]
    expected = sum(n * k * (4 + 16 * 2 / 128) + n * 16 * 16 for n, k in sizes) / sum(n * k for n, k in sizes)
    assert bits_per_weight(model) == pytest.approx(expected)


def test_include_exclude_patterns(tiny):
    model, _ = tiny
    assert select_linear_layers(model, include="*.mlp.*") == [
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")
    ]
    assert select_linear_layers(model, include=r"model\.layers\.1\..*_proj", exclude="*mlp*") == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"
    ]
    assert "lm_head" in select_linear_layers(model, exclude=None)
    with pytest.raises(ValueError, match="no linear layer matches"):
        select_linear_layers(model, include="*.conv")


def test_group_size_error_names_the_sizes_valid_for_every_layer(tiny):
    model, _ = tiny  # K = 128 (attention, up/gate) and 256 (down)
    with pytest.raises(ValueError, match=r"K=128, 256 of some layers; group sizes valid for every layer: 2, 4, 8, 16, 32, 64, 128;"):
        quantize_model(model, "int4", 96, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # failed before touching a layer
    with pytest.raises(ValueError, match=r"K=128 of some layers; .* 2, 4, 8, 16, 32, 64, 128;"):
        quantize_model(model, "int4", 256, progress=False)
    per_row = quantize_model(model, "int3", None, progress=False)
    assert per_row.model.layers[0].mlp.down_proj.group_size == 256


def test_load_model_errors_name_the_path(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="neither a config.json"):
        load_model(tmp_path)
    model, tokenizer = load_model(tiny_folder, dtype=torch.float32)
    assert model.config.hidden_size == 128 and tokenizer.decode(tokenizer("a b").input_ids) == "a b"


def test_dense_weights_are_checked_finite_at_load(tiny, tmp_path):
    model, tokenizer = tiny
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(tmp_path / "m", dtype=torch.float32)


def test_offline_hub_lookup_fails_at_once_with_a_clear_message(monkeypatch):
    import socket
    import time

    from any4lib import hub

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'meta-llama/Llama-3.2-1Bx' is not a local path.*cannot be reached"):
        load_model("meta-llama/Llama-3.2-1Bx")
    assert time.perf_counter() - start < 5 and len(attempts) == 1  # one probe, no retries


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="tpu"), "not a device name; use 'cpu', 'cuda' or 'cuda:N'"),
    (dict(dtype=torch.int8), "not a compute dtype; use one of bf16, fp16, fp32"),
])
def test_load_model_checks_device_and_dtype_first(tiny_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_folder, **kwargs)
