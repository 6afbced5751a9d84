import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import any4lib.experiments as experiments
from any4lib.results import ResultStore, config_key

REPO = Path(__file__).resolve().parents[1]


def test_key_ignores_order_and_records_carry_provenance(tmp_path):
    assert config_key({"a": 1, "b": [2, 3]}) == config_key({"b": [2, 3], "a": 1}) != config_key({"a": 2, "b": [2, 3]})
    store = ResultStore(tmp_path)
    record = store.put({"format": "int4", "g": 128}, {"ppl": 12.5})
    assert json.loads(store.path({"g": 128, "format": "int4"}).read_text()) == record
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    prov = record["provenance"]
    assert prov["git"]["commit"] == head and prov["packages"]["torch"] and prov["device"] and prov["date"]
    assert list(tmp_path.iterdir()) == [store.path({"format": "int4", "g": 128})]  # no temporary left behind


def test_get_or_compute_computes_once(tmp_path):
    store, calls = ResultStore(tmp_path), []
    compute = lambda: calls.append(1) or {"ppl": 3.0}  # noqa: E731
    first = store.get_or_compute({"x": 1}, compute)
    second = store.get_or_compute({"x": 1}, compute)
    assert first == second and len(calls) == 1
    assert store.find(x=1) == [first] and store.find(x=2) == []


def test_a_record_that_cannot_be_written_leaves_nothing(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(TypeError):
        store.put({"x": 1}, {"ppl": object()})
    with pytest.raises(TypeError):
        store.put({"x": object()}, {"ppl": 1.0})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metrics_are_refused_and_records_are_strict_json(tmp_path, bad):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match="refusing to store non-finite metrics"):
        store.put({"x": 1}, {"ppl": bad})
    assert list(tmp_path.iterdir()) == []
    store.put({"x": 1}, {"ppl": 2.5})
    json.loads(store.path({"x": 1}).read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_recompute_replaces_the_stored_record(tmp_path):
    store, values = ResultStore(tmp_path), iter([1.0, 2.0])
    store.get_or_compute({"x": 1}, lambda: {"ppl": next(values)})
    assert store.get_or_compute({"x": 1}, lambda: {"ppl": next(values)}, recompute=True)["metrics"]["ppl"] == 2.0
    assert store.get({"x": 1})["metrics"]["ppl"] == 2.0


def test_accuracy_records_rerun_computes_nothing(tmp_path, data_root, monkeypatch):
    kwargs = dict(formats=["bf16", "int4"], datasets=["heldout"], seq_len=64, store=tmp_path, progress=False)
    first = experiments.accuracy_records("tiny", **kwargs)
    assert list(first.columns) == ["format", "method", "activations", "group_size", "calibration", "seed", "dataset",
                                   "ppl", "bits_per_weight", "seconds"]
    assert set(first.activations) == {"none"}  # weight-only runs
    assert first.bits_per_weight.tolist() == [16.0, 4.25] and len(list(tmp_path.glob("*.json"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a stored result was recomputed")

    monkeypatch.setattr(experiments, "evaluate_perplexity", fail)
    monkeypatch.setattr(experiments, "quantize_model", fail)
    again = experiments.accuracy_records("tiny", **kwargs)
    assert again.equals(first)
    stored = experiments.read_store(tmp_path, model="tiny").sort_values("format", ignore_index=True)
    assert stored[first.columns].equals(first.sort_values("format", ignore_index=True))
    assert set(stored.seq_len) == {64} and experiments.read_store(tmp_path, model="other").empty
    assert experiments.pivot(first).loc["int4"].iloc[0, 0] == first.ppl[1]
    with pytest.raises(ValueError, match="several records per cell"):
        experiments.pivot(pd.concat([first, first]))
    assert first.ppl[1] != first.ppl[0]  # the quantized model is a different model


def test_accuracy_records_are_keyed_by_the_model_files_not_the_path(tmp_path, data_root, tiny_folder, capsys):
    from any4lib.experiments import tiny_model

    kwargs = dict(formats=["bf16"], datasets=["heldout"], seq_len=64, store=tmp_path / "s", progress=False)
    first = experiments.accuracy_records(str(tiny_folder), **kwargs)
    assert "results store" not in capsys.readouterr().err  # computed, nothing read from the store
    tiny_model(seed=1)[0].save_pretrained(tiny_folder)  # another model at the same path
    second = experiments.accuracy_records(str(tiny_folder), **kwargs)
    assert second.ppl[0] != first.ppl[0] and len(list((tmp_path / "s").glob("*.json"))) == 2
    again = experiments.accuracy_records(str(tiny_folder), **kwargs)
    assert again.equals(second)
    assert "1 of 1 rows from the results store, 20" in capsys.readouterr().err
    fresh = experiments.accuracy_records(str(tiny_folder), recompute=True, **kwargs)
    assert fresh.ppl[0] == pytest.approx(second.ppl[0], rel=1e-6) and "results store" not in capsys.readouterr().err


def test_calibration_spec_errors(tiny):
    model, tokenizer = tiny
    for bad in ("heldout:many", "heldout:8xlong", ":8"):
        with pytest.raises(ValueError, match="use 'prompt', 'none', '<set>:<N>' or '<set>:<N>x<L>'"):
            experiments.calibration_stats(model, tokenizer, bad)
    assert experiments.calibration_stats(model, tokenizer, "none") is None


def test_calibration_windows_are_their_own_not_the_evaluation_s(tiny, text_file):
    """'<set>:<N>x<L>' draws N windows of L tokens; '<set>:<N>' windows of the model's context (up to 2048)."""
    model, tokenizer = tiny
    stats = experiments.calibration_stats(model, tokenizer, f"{text_file}:3x40")
    assert stats.tokens["lm_head"] == 3 * 40 and stats.source.endswith("3x40 seed 0")
    stats = experiments.calibration_stats(model, tokenizer, f"{text_file}:2@online")
    assert [w.shape for w in stats.inputs] == [(1, 256)] * 2  # tiny's 256 positions


def test_learned_formats_run_once_per_seed(tmp_path, data_root):
    kwargs = dict(datasets=["heldout"], seq_len=64, store=tmp_path, progress=False)
    frame = experiments.accuracy_records("tiny", formats=["int4", "any4"], seeds=[0, 3], **kwargs)
    assert frame[["format", "seed"]].values.tolist() == [["int4", 0], ["any4", 0], ["any4", 3]]
    assert frame.ppl[1] != frame.ppl[2]  # another k-means seed, another quantized model
    configs = sorted(json.loads(p.read_text())["config"].get("seed", 0) for p in tmp_path.glob("*.json"))
    assert configs == [0, 0, 3]  # seed 0 keeps the key-less config every earlier record has
    assert experiments.pivot(frame).shape == (3, 1)
