"""Quantized checkpoints (any4lib.checkpoint): save / load round trips, the quantization_config in config.json, the
folders of earlier versions (quant.json), checksums and finiteness checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import any4lib
from any4lib.calibration import calibrate
from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.model import quantize_model, quantized_layers
from any4lib.nn import QuantLinear
from any4lib.qtensor import unpack_nibbles


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def as_earlier_version(folder, model, version: int) -> None:
    """Rewrite a saved folder as versions 1-3 wrote it: a plain config.json and quant.json listing every layer."""
    config = json.loads((folder / "config.json").read_text())
    checksums = config.pop("quantization_config")["checksums"]
    (folder / "config.json").write_text(json.dumps(config))
    layers = {}
    for name, m in quantized_layers(model).items():
        layers[name] = {"format": m.format, "bits": m.bits, "group_size": m.group_size,
                        "out_features": m.out_features, "in_features": m.in_features}
        if version == 3:
            layers[name] |= {"form": m.form, "method": m.method}
            if m.form == "packed":
                layers[name] |= {"dtype": str(m.packed.dtype).removeprefix("torch."), "int_codes": m.packed.int_codes,
                                 "swiglu": m.packed.swiglu, "rows": m.packed.n}
    quant = {"version": version, "layers": layers}
    if version == 3:
        quant |= {"weight_files": ["model.safetensors"], "sha256": checksums}
    (folder / "quant.json").write_text(json.dumps(quant))


@pytest.mark.parametrize("fmt", ["any4", "nvfp4"])
def test_save_then_load_gives_identical_logits(tiny, tmp_path, fmt):
    model, tokenizer = tiny
    quantize_model(model, fmt, 64, calibration=calibrate(model, tokenizer, progress=False), progress=False)
    save_quantized(model, tmp_path / "q", tokenizer)
    back = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 258, (2, 33))
    assert torch.equal(logits(back, ids), logits(model, ids))
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    layer = back.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and layer.format == fmt
    assert torch.equal(layer.codes, model.model.layers[1].self_attn.o_proj.codes)


def test_config_carries_the_quantization_config_with_exceptions_and_checksums(tiny, tmp_path):
    model, _ = tiny
    quantize_model(model, "int4", 64, exclude=["lm_head", "*.down_proj"], progress=False)
    quantize_model(model, "nf4", 32, include="*.down_proj", progress=False)  # two layers that depart
    folder = save_quantized(model, tmp_path / "q")
    quant = quantization_config(folder)
    assert {k: quant[k] for k in ("quant_method", "format", "bits", "group_size", "method", "activations", "version")} \
        == {"quant_method": "any4", "format": "int4", "bits": 4, "group_size": 64, "method": "rtn",
            "activations": None, "version": 4}
    assert quant["modules_to_not_convert"] == ["lm_head"]
    assert quant["layers"] == {f"model.layers.{i}.mlp.down_proj": {"format": "nf4", "group_size": 32} for i in range(2)}
    assert set(quant["checksums"]) == {"model.safetensors"} and len(quant["checksums"]["model.safetensors"]) == 64
    assert not (folder / "quant.json").exists()
    back = load_quantized(folder)
    assert {n: (m.format, m.group_size) for n, m in quantized_layers(back).items()} == {
        n: (m.format, m.group_size) for n, m in quantized_layers(model).items()}
    ids = torch.randint(0, 258, (2, 17))
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_an_unquantized_model_is_refused(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(ValueError, match="no quantized layer to save: quantize it first"):
        save_quantized(model, tmp_path / "q")


def test_checkpoint_stores_4_bit_codes_two_to_a_byte_and_reads_version_1(tiny, tmp_path):
    model, _ = tiny
    quantize_model(model, "any4", 64, progress=False)
    folder = save_quantized(model, tmp_path / "q")
    tensors = load_file(folder / "model.safetensors")
    for name, m in quantized_layers(model).items():
        assert tensors[f"{name}.codes"].shape == (m.out_features, m.in_features // 2)
    # The same model as a version 1 folder (one code per byte) loads to the same logits.
    for name, m in quantized_layers(model).items():
        tensors[f"{name}.codes"] = unpack_nibbles(tensors[f"{name}.codes"], m.in_features)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    as_earlier_version(folder, model, 1)
    ids = torch.randint(0, 258, (2, 17))
    assert torch.equal(logits(load_quantized(folder), ids), logits(model, ids))


def test_packed_layers_save_and_load_packed_and_versions_2_3_still_load(tiny, tmp_path):
    model, _ = tiny
    model = quantize_model(model.to(torch.bfloat16), "any4", 64, progress=False)
    contract = save_quantized(model, tmp_path / "contract")
    ids = torch.randint(0, 258, (2, 17))
    expected_contract = logits(model, ids)
    as_earlier_version(contract, model, 2)  # no form recorded: a contract-form folder
    assert torch.equal(logits(load_quantized(contract).to(torch.bfloat16), ids), expected_contract)

    any4lib.pack_model(model, torch.bfloat16)
    folder = save_quantized(model, tmp_path / "packed")
    spec = quantization_config(folder)["layers"]["model.layers.0.mlp.up_proj"]
    assert spec == {"form": "packed", "dtype": "bfloat16", "int_codes": False, "swiglu": False, "rows": 256}
    assert not any(name.endswith(".codes") for name in load_file(folder / "model.safetensors"))
    back = load_quantized(folder)
    layer = back.model.layers[0].mlp.up_proj
    assert layer.form == "packed" and torch.equal(layer.packed_codes, model.model.layers[0].mlp.up_proj.packed_codes)
    assert torch.equal(logits(back.to(torch.bfloat16), ids), logits(model, ids))
    as_earlier_version(folder, model, 3)
    assert torch.equal(logits(load_quantized(folder).to(torch.bfloat16), ids), logits(model, ids))


def test_load_errors_name_the_path(tiny_folder):
    with pytest.raises(FileNotFoundError, match="config.json has no any4 quantization_config and quant.json is missing"):
        load_quantized(tiny_folder)


def _rewrite(folder, change):
    """Apply `change` to the saved tensors and write the file back (its recorded checksum no longer fits)."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_damaged_checkpoint_fails_its_checksum(tiny, tmp_path):
    model, _ = tiny
    quantize_model(model, "int4", 64, progress=False)
    folder = save_quantized(model, tmp_path / "q")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100:-90] = bytes(10)  # overwrite a few bytes of the last tensor, sizes unchanged
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged or was changed after saving.*verify=False"):
        load_quantized(folder)
    load_quantized(folder, verify=False)  # the opt-out skips the hash (the values are finite, so it loads)


def test_a_nan_scale_in_a_checkpoint_is_refused_at_load(tiny, tmp_path):
    model, _ = tiny
    quantize_model(model, "int4", 64, progress=False)
    folder = save_quantized(model, tmp_path / "q")
    layer = next(iter(quantized_layers(model)))

    def nan_in_a_floating_tensor_of_the_layer(tensors):
        name = next(k for k, t in tensors.items() if k.startswith(layer + ".") and t.is_floating_point() and t.dim())
        tensors[name].view(-1)[0] = float("nan")

    _rewrite(folder, nan_in_a_floating_tensor_of_the_layer)
    with pytest.raises(ValueError, match="hold NaN/Inf values"):
        load_quantized(folder, verify=False)
