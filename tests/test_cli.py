import json

import pytest

from any4lib.calibration import ActivationStats
from any4lib.cli import main


def test_quantize_then_eval_the_saved_folder_and_rerun_reads_the_store(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--group-size", "64", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int4"
    args = ["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--store", str(tmp_path / "r")]
    main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = list((tmp_path / "r").glob("*.json"))
    assert len(records) == 1 and first["ppl"] > 1 and first["windows"] >= 1
    stamp = records[0].stat().st_mtime_ns
    main(args)
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again | {"source": "computed"} == first and again["source"].startswith("from the results store")
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
    assert "group size must be an integer >= 2 or 'row'" in capsys.readouterr().err


def test_accuracy_delegates_to_the_experiments_runner(monkeypatch):
    seen = []
    monkeypatch.setattr("any4lib.experiments.main", seen.append)
    main(["accuracy", "--profile", "groups", "--profile", "calibration"])
    assert seen == [["accuracy", "--model", "ref-en-16m", "--device", "cpu", "--profile", "groups", "--profile", "calibration"]]


def test_eval_passes_few_shot_counts_and_keys_records_by_them(tiny_folder, tmp_path, monkeypatch, capsys):
    calls = []

    def evaluate_tasks(model, tokenizer, tasks, data_dir=None, limit=None, num_fewshot=0):
        calls.append((tasks, limit, num_fewshot))
        return {tasks[0]: {"acc": 0.25 * (1 + num_fewshot)}}

    monkeypatch.setattr("any4lib.zeroshot.evaluate_tasks", evaluate_tasks)
    base = ["eval", "--model", str(tiny_folder), "--datasets", "", "--tasks", "arc_easy", "--limit", "5",
            "--store", str(tmp_path / "r")]  # fmt: skip
    main(base + ["--num-fewshot", "2"])
    main(base)
    assert calls == [(["arc_easy"], 5, 2), (["arc_easy"], 5, 0)]
    configs = [json.loads(p.read_text())["config"] for p in (tmp_path / "r").glob("*.json")]
    assert sorted(c.get("num_fewshot", 0) for c in configs) == [0, 2]


def _last_json(capsys):
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_eval_after_quantizing_over_the_same_folder_measures_the_new_model(tiny_folder, text_file, tmp_path, capsys):
    out, store = tmp_path / "q", tmp_path / "r"
    evaluate = ["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--store", str(store)]
    main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--group-size", "64", "--out", str(out)])
    main(evaluate)
    int4, _ = _last_json(capsys)
    assert int4 | {"ppl": 0} == int4 | {
        "model": str(out), "format": "int4", "group_size": 64, "method": "rtn", "task": "perplexity",
        "dataset": str(text_file), "seq_len": 64, "source": "computed", "ppl": 0,
    }
    main(["quantize", "--model", str(tiny_folder), "--format", "int2", "--group-size", "64", "--out", str(out)])
    main(evaluate)
    int2, _ = _last_json(capsys)
    assert int2["format"] == "int2" and int2["source"] == "computed" and int2["ppl"] != int4["ppl"]
    main(evaluate)  # unchanged folder: served from the store, and it says so
    again, err = _last_json(capsys)
    assert again["ppl"] == int2["ppl"] and again["source"].startswith("from the results store, ")
    assert f"{text_file}: from the results store, " in err
    main(evaluate + ["--recompute"])
    fresh, _ = _last_json(capsys)
    assert fresh["source"] == "computed" and fresh["ppl"] == pytest.approx(int2["ppl"], rel=1e-6)


def test_an_edited_text_file_is_a_new_measurement(tiny_folder, text_file, tmp_path, capsys):
    evaluate = ["eval", "--model", str(tiny_folder), "--datasets", str(text_file), "--seq-len", "64",
                "--store", str(tmp_path / "r")]
    main(evaluate)
    before, _ = _last_json(capsys)
    text_file.write_text(text_file.read_text()[::-1])
    main(evaluate)
    after, _ = _last_json(capsys)
    assert after["source"] == "computed" and after["ppl"] != before["ppl"]


def test_a_damaged_checkpoint_is_one_error_line_and_no_record(tiny_folder, text_file, tmp_path, capsys):
    out, store = tmp_path / "q", tmp_path / "r"
    main(["quantize", "--model", str(tiny_folder), "--format", "int4", "--group-size", "64", "--out", str(out)])
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-64:-60] = b"\xff\xff\xff\x7f"  # a few bytes of the last tensor, its size unchanged
    (out / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    evaluate = ["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--store", str(store)]
    with pytest.raises(SystemExit) as exit_info:
        main(evaluate)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("any4 eval: error: ")
    assert "damaged" in err[0] and "--no-verify" in err[0]
    assert not store.exists() or not list(store.iterdir())
    with pytest.raises(ValueError, match="damaged"):
        main(evaluate + ["--debug"])  # the traceback, for a developer


@pytest.mark.parametrize("flag, value, message", [
    ("--seq-len", "0", "must be an integer >= 2"),
    ("--seq-len", "-3", "must be an integer >= 2"),
    ("--seq-len", "300", "seq_len must be an integer >= 2 and <= 256"),
    ("--max-tokens", "1", "must be an integer >= 2"),
    ("--limit", "0", "must be an integer >= 1"),
    ("--device", "gpu", "not a device name"),
    ("--group-size", "1", "group size must be an integer >= 2"),
    ("--format", "any5", "unknown format 'any5'; known formats: any2, any3, any4"),
])
def test_bad_arguments_are_one_error_line_with_the_valid_range(tiny_folder, text_file, tmp_path, capsys, flag, value,
                                                               message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_folder), "--datasets", str(text_file), "--store", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_every_option_has_help_and_out_means_what_the_command_writes(capsys):
    from any4lib.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"any4 {name} {action.option_strings} has no help"
        outs = [a for a in sub._actions if "--out" in a.option_strings]
        assert all("write" in a.help for a in outs), name
    assert "--out" not in {s for a in commands["eval"]._actions for s in a.option_strings}
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in shown and "(default: results/eval)" in shown and "(default: wikitext2)" in shown


def test_quantize_with_a_method_saves_a_model_that_reloads(tiny_folder, text_file, tmp_path, capsys):
    from any4lib.checkpoint import load_quantized

    out = tmp_path / "gptq"
    main(["quantize", "--model", str(tiny_folder), "--format", "any4", "--group-size", "64", "--method", "gptq",
          "--dtype", "fp32", "--out", str(out)])
    layer = load_quantized(out).model.layers[0].mlp.up_proj
    assert (layer.format, layer.method) == ("any4", "gptq")
    main(["eval", "--model", str(out), "--datasets", str(text_file), "--seq-len", "64", "--store", str(tmp_path / "r")])
    assert _last_json(capsys)[0]["method"] == "gptq"  # eval names the method the saved folder was made with
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "x", "--method", "sparsegpt"])
    assert "unknown method 'sparsegpt'" in capsys.readouterr().err


def test_generate_streams_the_library_call_and_prints_strict_json(tiny_folder, tmp_path, capsys):
    from any4lib.engine.generate import generate
    from any4lib.model import load_model

    out = tmp_path / "q"
    main(["quantize", "--model", str(tiny_folder), "--format", "any4", "--group-size", "64", "--out", str(out)])
    capsys.readouterr()
    main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "6"])
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    texts = json.loads(lines[-1])
    model, tokenizer = load_model(str(out))
    expected = generate(model, tokenizer, ["the cat"], 6).texts[0]  # greedy: the same tokens
    assert texts == {"prompt": "the cat", "text": expected} and lines[0] == "the cat" + expected
    timing = json.loads(printed.err.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert timing["timing"]["peak_gpu_gb"] is None and timing["timing"]["decode_steps"] == 5
