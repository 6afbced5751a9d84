"""The notebook suite: committed without outputs, and every notebook runs top to bottom under papermill with its
smoke profile (random tiny model, CPU), writing each figure (PNG + PDF) and table (CSV + Markdown) it promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Per notebook: the figures (figures/<name>.png/.pdf) and tables (results/tables/<name>.csv/.md) it must write.
# The first figure is named after the notebook: it is the Makefile's target for that notebook.
EXPECTED = {
    "01_lut_learning": (["01_lut_learning", "01_lut_levels"], ["01_lut_error"]),
    "02_weight_distributions": (
        ["02_weight_distributions", "02_normalised_levels", "02_layer_errors"], ["02_layer_errors"]),
    "03_accuracy": (["03_accuracy", "03_accuracy_bits"],
                    ["03_accuracy", "03_accuracy_relative", "03_paper_reference", "03_methods", "03_methods_seeds"]),
    "04_ablations": (["04_ablations"], ["04_group_size", "04_calibration", "04_paper_group_size", "04_lut_ablation"]),
    "05_kernel_speedups": (
        ["05_kernel_speedups", "05_kernel_bandwidth", "05_e2e_decode"],
        ["05_kernel_us", "05_reference_h100", "05_e2e_decode", "05_generation"]),
    "06_lut_explorer": (["06_lut_explorer"], ["06_lut_explorer"]),
    "07_weight_activation": (["07_weight_activation"], ["07_weight_activation", "07_weight_activation_seeds"]),
}
# They evaluate perplexity on the held-out text under data_root().
NEEDS_TEXT = {"03_accuracy", "04_ablations", "07_weight_activation"}


def test_write_table_round_trips_and_renders_markdown(tmp_path):
    pd = pytest.importorskip("pandas")
    from any4lib import viz

    table = pd.DataFrame({"ppl": [65.24, float("nan")], "note": ["a|b", "c"]}, index=pd.Index(["bf16", "any4"], name="format"))
    csv, md = viz.write_table(table, "t", tmp_path, floatfmt=".1f")
    assert pd.read_csv(csv, index_col="format").equals(table.assign(ppl=[65.2, float("nan")]))  # rounded once
    assert md.read_text().splitlines() == [
        "| format | ppl | note |", "|---|---|---|", "| bf16 | 65.2 | a\\|b |", "| any4 |  | c |",
    ]


def test_figures_carry_no_timestamp(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import time

    import matplotlib.pyplot as plt

    from any4lib import viz

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    first = [p.read_bytes() for p in viz.savefig(fig, "f", tmp_path)]
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400 * 400)  # a year later
    assert [p.read_bytes() for p in viz.savefig(fig, "f", tmp_path)] == first
    assert b"CreationDate" not in first[1]
    plt.close(fig)


def test_compared_formats_have_distinct_colours():
    from any4lib import experiments, list_formats, viz

    compared = [*experiments.FORMATS_MAIN, "fp4_e3m0", "any4_global", "fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp5_e3m1"]
    colours = [viz.format_color(f) for f in compared]
    assert len(set(colours)) == len(colours)
    assert viz.format_color("fp4") == viz.format_color("fp4_e2m1")
    assert all(viz.format_color(f).startswith("#") for f in list_formats())  # the rest get a spare colour


def test_one_notebook_per_artifact():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_without_outputs_and_parameterised(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: strip outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "profile = " in tagged[0].source, f"{name}: needs one `parameters` cell with a profile"
    assert nb.cells[0].cell_type == "markdown", f"{name}: should open with a markdown cell saying what it shows"


def _fake_benchmark_csvs(folder: Path) -> None:
    """Small kernel and e2e CSVs in the benchmarks' column layout, so notebook 05 draws its full figures."""
    (folder / "kernels").mkdir(parents=True)
    (folder / "e2e").mkdir(parents=True)
    from any4lib.bench.kernels import COLUMNS

    lines = [",".join(COLUMNS)]
    for m in (1, 4, 16):
        for method, us in (("cublas_bf16", 50.0), ("torch_int4pack", 25.0), ("ours_int4", 15.0), ("ours_any4", 16.0)):
            lines.append(f"4096,14336,{m},{method},{us * (1 + m / 32)},0,0,{50 / us / 4}")
    (folder / "kernels" / "fake.csv").write_text("\n".join(lines) + "\n")
    (folder / "e2e" / "fake.csv").write_text(
        "method,batch,decode_tok_s,status\nbf16,1,100,ok\nany4,1,290,ok\nint4,1,300,ok\nbf16,4,380,ok\nany4,4,900,ok\n"
    )


def _execute(papermill, name: str, out: Path, parameters: dict) -> None:
    declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(out / f"{name}.out.ipynb"),
        parameters={k: v for k, v in parameters.items() if k in declared},
        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
    )


@pytest.mark.slow
def test_rerunning_a_notebook_rewrites_the_same_bytes(tmp_path, monkeypatch):
    """The cheapest notebook that writes figures and tables, twice: every file it writes is byte-identical."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    parameters = {"profile": "smoke", "figures_dir": str(tmp_path / "figures"), "tables_dir": str(tmp_path / "tables"),
                  "interactive": False}
    snapshots = []
    for _ in range(2):
        _execute(papermill, "06_lut_explorer", tmp_path, parameters)
        files = sorted(p for folder in ("figures", "tables") for p in (tmp_path / folder).iterdir())
        snapshots.append({p.name: p.read_bytes() for p in files})
    assert len(snapshots[0]) == 4 and snapshots[1] == snapshots[0]


RUNS = [(name, None) for name in sorted(EXPECTED)] + [("05_kernel_speedups", "with benchmark CSVs")]


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", RUNS, ids=[f"{n}-{v}" if v else n for n, v in RUNS])
def test_notebook_runs_under_smoke_profile(name, variant, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    if name in NEEDS_TEXT:
        from any4lib.paths import text_file

        if text_file("heldout") is None:
            pytest.skip("needs corpora/ref-en/heldout.txt under ANY4_DATA / ../shared/data")
    # The kernel is a subprocess: make sure it imports this checkout's any4lib.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    results = tmp_path / "results"
    if variant:
        _fake_benchmark_csvs(results)
    wanted = {
        "profile": "smoke", "figures_dir": str(tmp_path / "figures"), "tables_dir": str(tmp_path / "tables"),
        "store": str(tmp_path / "store"), "results_dir": str(results), "interactive": False,
    }
    _execute(papermill, name, tmp_path, wanted)
    figures, tables = EXPECTED[name]
    written = [tmp_path / "figures" / f"{f}.{ext}" for f in figures for ext in ("png", "pdf")]
    written += [tmp_path / "tables" / f"{t}.{ext}" for t in tables for ext in ("csv", "md")]
    missing = [str(p.relative_to(tmp_path)) for p in written if not p.is_file() or p.stat().st_size == 0]
    assert not missing, f"{name} did not write: {missing}"
    if name == "03_accuracy":  # the seed spread counts every k-means seed the smoke profile measured
        spread = pytest.importorskip("pandas").read_csv(tmp_path / "tables" / "03_methods_seeds.csv")
        assert set(spread["format"]) == {"any4"} and set(spread["method"]) == {"rtn", "gptq", "awq"}
        assert (spread["seeds"] == 2).all() and spread["std"].notna().all()
        assert ((spread["min"] <= spread["mean"]) & (spread["mean"] <= spread["max"])).all()
    if variant:
        assert "ours_any4" in (tmp_path / "tables" / "05_kernel_us.md").read_text()
        assert "no benchmark results" not in (tmp_path / "tables" / "05_kernel_us.md").read_text()
