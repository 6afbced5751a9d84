"""`make reproduce PROFILE=paper MODEL=...`: the paper profile's notebooks run pointed at a Llama-3.2-1B stand-in
(test-sized here, on CPU; the full-size one runs on the GPU through scripts/device_scale.sh paper)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from any4lib.standins import scaled_down, write_standin

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The paper profile's accuracy notebooks, their sweeps cut to a few configurations and their sets to the local
# heldout text (the other notebooks load the model as these do).
SMALL = {
    "03_accuracy": {"formats": ["bf16", "int4", "any4"], "datasets": ["heldout"], "method_formats": ["int4"]},
    "04_ablations": {"group_formats": ["any4"], "group_sizes": [64, None], "calibrations": ["prompt", "none"],
                     "dataset": "heldout"},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_paper_profile_runs_on_a_standin(name, tiny, tmp_path, data_root, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    _, tokenizer = tiny
    # The paper profile calibrates its methods on WikiText-2's validation split: a local stand-in for it.
    (data_root / "wikitext-2-v1" / "valid.txt").write_text((data_root / "wikitext-2-v1" / "test.txt").read_text())
    folder = write_standin(scaled_down("llama-3.2-1b", vocab_size=300), tmp_path / "standin", tokenizer,
                           progress=False)  # fmt: skip
    parameters = {
        "profile": "paper", "model": str(folder), "device": "cpu", "store": str(tmp_path / "store"),
        "figures_dir": str(tmp_path / "figures"), "tables_dir": str(tmp_path / "tables"), **SMALL[name],
    }
    declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={k: v for k, v in parameters.items() if k in declared},
        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
    )
    assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
    records = list((tmp_path / "store").rglob("*.json"))  # they name the stand-in: no table mistakes it for a model
    assert records and all('"standin"' in r.read_text() for r in records)
