"""The per-row LUT explorer of notebook 06: one (layer, row, group) drawn with the levels every format offers there,
and the widget whose row and group sliders follow the chosen layer's shape.

matplotlib and ipywidgets are imported inside the methods that draw, so the class is testable without a kernel.
"""

from __future__ import annotations

from torch import nn

from .calibration import ActivationStats
from .qtensor import QuantizedTensor
from .quant import quantize


class LutExplorer:
    def __init__(self, model: nn.Module, stats: ActivationStats, formats: list[str], group_size: int = 128):
        self.modules = dict(model.named_modules())
        self.stats, self.formats, self.group_size = stats, list(formats), group_size
        self.layer_names = [n for n in stats.names if n != "lm_head"]
        self._quantized: dict[tuple[str, str], QuantizedTensor] = {}

    def weight(self, name: str):
        if name not in self.layer_names:
            raise ValueError(f"no linear layer {name!r}; choose one of: {', '.join(self.layer_names)}")
        return self.modules[name].weight.detach().float()

    def group_width(self, name: str) -> int:
        k = self.weight(name).shape[1]
        return self.group_size if k % self.group_size == 0 else k

    def ranges(self, name: str) -> tuple[int, int]:
        """(rows, groups) of layer `name`: the sliders' bounds are these minus one."""
        n, k = self.weight(name).shape
        return n, k // self.group_width(name)

    def quantized(self, name: str, fmt: str) -> QuantizedTensor:
        """The layer quantized in `fmt` (cached: the sliders revisit layers)."""
        if (name, fmt) not in self._quantized:
            w = self.weight(name)
            g = self.group_width(name)
            self._quantized[name, fmt] = quantize(w, fmt, g, sample_weight=self.stats.sample_weight(name).to(w.device))
        return self._quantized[name, fmt]

    @staticmethod
    def levels(q: QuantizedTensor, r: int, column: int):
        """The values each code can decode to at (row r, column), sorted: the format's own block holds the scale."""
        import numpy as np

        block = column // q.group_size
        lut = q.lut[min(r, q.lut.shape[0] - 1)]
        value = lut * q.scale[r, block] * q.tensor_scale + (0 if q.zero is None else q.zero[r, block])
        return np.sort(value.cpu().numpy())

    def errors(self, name: str, r: int, g_index: int):
        """Relative squared error of each format on the group and on the whole row (a DataFrame by format)."""
        import pandas as pd

        w = self.weight(name)
        cols = self._columns(name, r, g_index)
        rows = []
        for fmt in self.formats:
            deq = self.quantized(name, fmt).dequantize()[r].to(w.device)
            rows.append({
                "format": fmt,
                "group_rel_error": ((deq[cols] - w[r, cols]).pow(2).sum() / w[r, cols].pow(2).sum()).item(),
                "row_rel_error": ((deq - w[r]).pow(2).sum() / w[r].pow(2).sum()).item(),
            })
        return pd.DataFrame(rows).set_index("format")

    def _columns(self, name: str, r: int, g_index: int) -> slice:
        n, groups = self.ranges(name)
        if not (0 <= r < n and 0 <= g_index < groups):
            g = self.group_width(name)
            raise ValueError(f"{name} has {n} rows and {groups} groups of {g}; got row {r}, group {g_index}")
        g = self.group_width(name)
        return slice(g_index * g, (g_index + 1) * g)

    def figure(self, name: str, r: int, g_index: int):
        """(figure, errors) of one (layer, row, group)."""
        import matplotlib.pyplot as plt
        import numpy as np

        from . import viz

        cols = self._columns(name, r, g_index)
        values = self.weight(name)[r, cols].cpu().numpy()
        errors = self.errors(name, r, g_index)
        fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(values))
        ax.scatter(jitter, values, s=8, color="0.5", label="weights")
        for i, fmt in enumerate(self.formats, start=1):
            ax.hlines(self.levels(self.quantized(name, fmt), r, cols.start), i - 0.35, i + 0.35,
                      color=viz.format_color(fmt), lw=1.8)
        labels = [viz.format_label(f) for f in self.formats]
        ax.set_xticks(range(len(self.formats) + 1), ["weights"] + labels)
        ax.set_ylabel("weight value (model units)")
        ax.set_title(f"{name}, row {r}, group {g_index} (columns {cols.start}-{cols.stop - 1}): each format's levels")
        ax.grid(axis="x", visible=False)
        ax_err.barh(range(len(self.formats)), errors["group_rel_error"], color=[viz.format_color(f) for f in self.formats])
        ax_err.set_yticks(range(len(self.formats)), labels)
        ax_err.invert_yaxis()
        ax_err.set_xlabel("relative squared error on this group")
        ax_err.set_title("reconstruction error")
        fig.tight_layout()
        return fig, errors

    def widget(self, layer: str, row: int = 0, group: int = 0, show=None):
        """A layer dropdown and row / group sliders (the first three children) above the drawing; choosing a layer
        resets the sliders' ranges to its shape (and keeps their values inside). `show(name, r, g_index)` draws
        (default: the figure and its table)."""
        import ipywidgets as widgets

        rows, groups = self.ranges(layer)
        name = widgets.Dropdown(options=self.layer_names, value=layer, description="layer")
        r = widgets.IntSlider(value=min(row, rows - 1), min=0, max=rows - 1, description="row")
        g = widgets.IntSlider(value=min(group, groups - 1), min=0, max=groups - 1, description="group")

        def follow_layer(change):
            rows, groups = self.ranges(change["new"])
            with r.hold_trait_notifications(), g.hold_trait_notifications():  # one redraw, with both in range
                r.value, g.value = min(r.value, rows - 1), min(g.value, groups - 1)
                r.max, g.max = rows - 1, groups - 1

        name.observe(follow_layer, names="value")
        return widgets.interactive(show or self._show, name=name, r=r, g_index=g)

    def _show(self, name: str, r: int, g_index: int) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        _, table = self.figure(name, r, g_index)
        plt.show()
        display(table)
