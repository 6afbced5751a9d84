import pytest

from any4lib.calibration import calibrate
from any4lib.explorer import LutExplorer


@pytest.fixture
def explorer(tiny):
    model, tokenizer = tiny
    return LutExplorer(model, calibrate(model, tokenizer, progress=False), ["int4", "nf4", "any4"], group_size=128)


def test_sliders_follow_the_chosen_layer_and_every_row_is_reachable(explorer):
    pytest.importorskip("ipywidgets")
    drawn = []
    box = explorer.widget("model.layers.0.self_attn.k_proj", show=lambda name, r, g_index: drawn.append((name, r, g_index)))
    name, row, group = box.children[:3]
    assert (row.max, group.max) == (63, 0)  # k_proj: 64 rows (GQA), K = 128: one group
    for layer in explorer.layer_names:
        name.value = layer
        rows, groups = explorer.ranges(layer)
        assert (row.max, group.max) == (rows - 1, groups - 1)
        row.value, group.value = row.max, group.max  # the last row and group of every layer are reachable
        assert drawn[-1] == (layer, rows - 1, groups - 1)
        explorer.errors(*drawn[-1])  # and they can be drawn
    # up_proj (256 x 128) then down_proj (128 x 256, two groups): the row is brought back inside the new range
    name.value = "model.layers.1.mlp.up_proj"
    row.value = 255
    name.value = "model.layers.1.mlp.down_proj"
    assert (row.value, row.max, group.max) == (127, 127, 1) and drawn[-1][1] == 127
    assert all(0 <= r < explorer.ranges(n)[0] and 0 <= g < explorer.ranges(n)[1] for n, r, g in drawn)


def test_figure_levels_and_errors_of_a_group(explorer):
    layer = "model.layers.1.mlp.down_proj"
    fig, errors = explorer.figure(layer, 127, 1)
    assert list(errors.index) == ["int4", "nf4", "any4"] and (errors.values > 0).all()
    q = explorer.quantized(layer, "int4")
    levels = explorer.levels(q, 127, 128)
    w = explorer.weight(layer)[127, 128:]
    assert len(levels) == 16 and levels.min() == pytest.approx(w.min().item(), rel=1e-5)
    with pytest.raises(ValueError, match="has 128 rows and 2 groups of 128; got row 128"):
        explorer.figure(layer, 128, 0)
