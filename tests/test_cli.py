import json

import pytest

from any4lib.calibration import ActivationStats
from any4lib.cli import main


def test_quantize_then_eval_the_saved_folder_and_rerun_reads_the_store(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--group-size", "64", "--out", str(out)])
    assert (out / "quant.json").is_file()
    args = ["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--out", str(tmp_path / "r")]
    main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = list((tmp_path / "r").glob("*.json"))
    assert len(records) == 1 and first["ppl"] > 1 and first["windows"] >= 1
    stamp = records[0].stat().st_mtime_ns
    main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    assert records[0].stat().st_mtime_ns == stamp


def test_calibrate_and_analyze(tiny_folder, tmp_path, capsys):
    main(["calibrate", "--model", str(tiny_folder), "--out", str(tmp_path / "s.safetensors")])
    assert "lm_head" in ActivationStats.load(tmp_path / "s.safetensors").names
    main(["analyze", "--model", str(tiny_folder), "--format", "int2", "--group-size", "row", "--out", str(tmp_path / "a.json")])
    rows = json.loads((tmp_path / "a.json").read_text())
    assert len(rows) == 14 and all(0 < r["weight_rel"] < 1 and r["isolated_rel"] > 0 for r in rows)
    # A layer's own error is part of what the quantized model shows at its output; deeper layers accumulate more.
    assert rows[-1]["output_rel"] > rows[-1]["isolated_rel"] * 0.5


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tmp_path / "missing" / "model"), "--datasets", "wikitext2"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "x", "--group-size", "big"])
    assert "group size must be an integer or 'row'" in capsys.readouterr().err


def test_accuracy_delegates_to_the_experiments_runner(monkeypatch):
    seen = []
    monkeypatch.setattr("any4lib.experiments.main", seen.append)
    main(["accuracy", "--profile", "groups", "--profile", "calibration"])
    assert seen == [["accuracy", "--model", "ref-en-16m", "--device", "cpu", "--profile", "groups", "--profile", "calibration"]]


def test_quantize_with_a_method_saves_a_model_that_reloads(tiny_folder, tmp_path, capsys):
    from any4lib.model import load_quantized

    out = tmp_path / "gptq"
    main(["quantize", "--model", str(tiny_folder), "--format", "any4", "--group-size", "64", "--method", "gptq",
          "--dtype", "fp32", "--out", str(out)])
    assert load_quantized(out).model.layers[0].mlp.up_proj.format == "any4"
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "x", "--method", "sparsegpt"])
    assert "unknown method 'sparsegpt'" in capsys.readouterr().err
