"""The notebooks' shared look: one colour per format, one figure style, PNG + PDF figures, CSV + Markdown tables.

matplotlib is imported lazily (inside functions), so `import any4lib` stays light for users without the lab extra.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# One colour per format, by family: learned anyN in blues, asymmetric integers in oranges, fixed float grids in
# greens/reds, block formats in purples, wider floats in browns; the unquantized baseline in black.
FORMAT_COLORS: dict[str, str] = {
    "bf16": "#000000",
    "fp16": "#000000",
    "any4": "#1f4e9c",
    "any3": "#4a86d4",
    "any2": "#9ec3ee",
    "any8": "#0b2a5c",
    "any4_global": "#6a5acd",
    "int4": "#e07b00",
    "int3": "#f5a54a",
    "int2": "#f9cf94",
    "int8": "#8a4b00",
    "int4_sym": "#b8860b",
    "nf4": "#2e9e44",
    "fp4_e2m1": "#d62728",
    "fp4_e3m0": "#f08080",
    "mxfp4": "#8e44ad",
    "nvfp4": "#c39bd3",
    "fp6_e3m2": "#8c564b",
    "fp6_e2m3": "#a0522d",
    "fp5_e2m2": "#bc8f8f",
    "fp5_e3m1": "#d2b48c",
}
_ALIASES = {"fp4": "fp4_e2m1", "mx4": "mxfp4", "int4_asym": "int4"}
_FALLBACK = ["#17becf", "#7f7f7f", "#bcbd22", "#e377c2", "#9467bd"]

# Display names as the paper writes them.
FORMAT_LABELS: dict[str, str] = {
    "bf16": "BF16", "fp16": "FP16", "fp4_e2m1": "FP4", "fp4_e3m0": "FP4 (E3M0)", "mxfp4": "MX-FP4",
    "nvfp4": "NVFP4", "nf4": "NF4", "any4_global": "any4 (one LUT)", "int4_sym": "INT4 (sym)",
    "fp6_e3m2": "FP6 E3M2", "fp6_e2m3": "FP6 E2M3", "fp5_e2m2": "FP5 E2M2", "fp5_e3m1": "FP5 E3M1",
}


def canonical(fmt: str) -> str:
    return _ALIASES.get(fmt, fmt)


def format_color(fmt: str) -> str:
    """The format's colour; unknown names get a stable colour from a spare palette."""
    fmt = canonical(fmt)
    if fmt in FORMAT_COLORS:
        return FORMAT_COLORS[fmt]
    return _FALLBACK[sum(map(ord, fmt)) % len(_FALLBACK)]


def format_label(fmt: str) -> str:
    fmt = canonical(fmt)
    if fmt in FORMAT_LABELS:
        return FORMAT_LABELS[fmt]
    return fmt.upper() if fmt.startswith("int") else fmt


def use_style() -> None:
    """Figure defaults for print: readable fonts, light grid, no top/right spines, 150 dpi on screen."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.dpi": 110,
        "savefig.dpi": 200,
        "savefig.bbox": "tight",
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 9,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # embed TrueType so the PDF's text stays editable
    })


# No dates or software versions in the files: rerunning a notebook rewrites the same bytes.
_STABLE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
}


def savefig(fig, name: str, out_dir: str | os.PathLike) -> list[Path]:
    """Write `fig` as <out_dir>/<name>.png and .pdf, byte-stable (no timestamps); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, metadata=_STABLE_METADATA[path.suffix[1:]])
    return paths


def _text(value, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def _as_text(df, floatfmt: str):
    """Every cell (the named index included) as the text both table files show: floats rounded here, once."""
    import pandas as pd

    if any(name is not None for name in df.index.names):
        df = df.reset_index()
    return pd.DataFrame([[_text(v, floatfmt) for v in row] for row in df.itertuples(index=False)],
                        columns=[str(c) for c in df.columns])


def markdown_table(df, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (its index included when it is named)."""
    text = _as_text(df, floatfmt)
    lines = ["| " + " | ".join(text.columns) + " |", "|" + "---|" * len(text.columns)]
    for row in text.itertuples(index=False):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(df, name: str, out_dir: str | os.PathLike, floatfmt: str = ".4g") -> list[Path]:
    """Write `df` as <out_dir>/<name>.csv and .md, both with the floats rounded once by `floatfmt` (so a rerun
    whose numbers differ beyond the shown digits rewrites the same bytes); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    _as_text(df, floatfmt).to_csv(csv, index=False)
    md.write_text(markdown_table(df, floatfmt))
    return [csv, md]


def empty_figure(message: str, figsize=(7, 3)):
    """A figure that says why there is nothing to plot (so a target file still exists and explains itself)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=12)
    return fig


def perplexity_axis(ax, values, label: str = "perplexity") -> None:
    """Label a perplexity y axis; log scale (with plain-number ticks) only when the values span more than 3x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v == v and v > 0]
    wide = bool(values) and max(values) / min(values) > 3
    ax.set_yscale("log" if wide else "linear")
    if wide:  # ticks at 1, 2, 5 x 10^n, written as plain numbers
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(label + (" (log scale)" if wide else ""))


def stored_accuracy(model: str, formats, group_sizes, datasets, calibration="prompt", max_tokens=None,
                    store="results/accuracy", device="cpu"):
    """The rows of experiments.accuracy_records already in the results store, computing nothing: for drawing
    figures while a long sweep is still filling the store. Missing configurations are simply absent. Only the
    default runs count: fake-quant on `device`, k-means seed 0, round to nearest."""
    from .experiments import REPO_ROOT, UNQUANTIZED, _frame, _row
    from .results import ResultStore

    calibrations = [calibration] if isinstance(calibration, str) else list(calibration)
    root = store if os.path.isabs(store) else REPO_ROOT / store
    rows = {}
    for record in ResultStore(root).find(task="perplexity", model=model, max_tokens=max_tokens, device=device):
        c = record["config"]
        if c.get("seed", 0) or "path" in c or "method" in c or "activations" in c:
            continue
        unquantized = c["format"] == UNQUANTIZED
        if (c["format"] in formats and c["dataset"] in datasets
                and (unquantized or (c["group_size"] in group_sizes and c["calibration"] in calibrations))):
            rows.setdefault((c["format"], c["group_size"], c["calibration"], c["dataset"]), _row(record))
    return _frame(list(rows.values()))
