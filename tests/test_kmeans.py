"""Batched weighted 1-D k-means against scikit-learn and against the definition of a Lloyd fixed point."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from any4lib import kmeans_1d, native
from any4lib.formats import _min_max_normalise
from real_weights import real_weight


@pytest.fixture(autouse=True, params=["native", "torch"])
def backend(request, monkeypatch):
    """Every test runs on both CPU implementations: the compiled one and the tensor one (the GPU's)."""
    monkeypatch.setenv("ANY4_KMEANS", request.param)
    return request.param


def sklearn_inertia(x: torch.Tensor, weight: torch.Tensor, k: int) -> float:
    """Mean over rows of scikit-learn's weighted k-means objective (k-means++, one init, as the original any4)."""
    total = 0.0
    for row, w in zip(x.double().numpy(), weight.double().numpy()):
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=0).fit(row[:, None], sample_weight=w)
        total += km.inertia_
    return total / len(x)


def normalised_rows(w: torch.Tensor, bits: int = 4, group_size: int = 128):
    """Rows as any4 clusters them: group-normalised to [0, 2^bits - 1], weighted by the group scale."""
    n, k = w.shape
    x, scale, _ = _min_max_normalise(w.reshape(n, k // group_size, group_size), bits)
    return x.reshape(n, k), scale.expand_as(x).reshape(n, k)


@pytest.mark.real_data
@pytest.mark.parametrize("layer", ["model.layers.0.mlp.down_proj.weight", "model.layers.5.self_attn.q_proj.weight"])
def test_objective_within_one_percent_of_sklearn_on_real_rows(layer):
    x, weight = normalised_rows(real_weight(layer)[:24])
    weight = weight * torch.rand(x.shape[1], generator=torch.Generator().manual_seed(0))  # activation-like weights
    ours = kmeans_1d(x, 16, weight).inertia.mean().item()
    assert ours <= 1.01 * sklearn_inertia(x, weight, 16)


@pytest.mark.parametrize("k", [4, 8, 16])
def test_objective_within_one_percent_of_sklearn_on_mixtures(k):
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(12, k, generator=g) * 3
    x = torch.gather(centres, 1, torch.randint(0, k, (12, 600), generator=g)) + 0.4 * torch.randn(12, 600, generator=g)
    weight = torch.rand(12, 600, generator=g)
    assert kmeans_1d(x, k, weight).inertia.mean().item() <= 1.01 * sklearn_inertia(x, weight, k)


def test_result_is_a_lloyd_fixed_point_computed_in_float64():
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(8, 500, generator=g), torch.rand(8, 500, generator=g)
    result = kmeans_1d(x, 16, weight, tol=0.0)
    xd, wd, c = x.double(), weight.double(), result.centers.double()
    nearest = (xd[..., None] - c[:, None, :]).abs().argmin(-1)
    assert result.labels.dtype == torch.uint8
    assert torch.equal(nearest, result.labels.long())  # every point sits with its nearest centre
    for r in range(8):
        for j in range(16):
            members = result.labels[r] == j
            if members.any():  # every centre is the weighted mean of its points
                mean = (wd[r, members] * xd[r, members]).sum() / wd[r, members].sum()
                assert abs(mean.item() - c[r, j].item()) < 1e-5
    inertia = (wd * (xd - c.gather(1, result.labels.long())) ** 2).sum(1)
    torch.testing.assert_close(result.inertia, inertia)


def test_weights_pull_centres_toward_heavy_points():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    light = kmeans_1d(x, 2, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    heavy = kmeans_1d(x, 2, torch.tensor([[1.0, 1.0, 100.0, 1.0]]))
    assert light.centers.tolist() == [[1.0, 10.0]]
    assert heavy.centers[0, 0].item() == pytest.approx((0 + 1 + 200) / 102)


def test_seeded_runs_are_deterministic_and_seeds_differ():
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(2))
    a, b, c = kmeans_1d(x, 16, seed=3), kmeans_1d(x, 16, seed=3), kmeans_1d(x, 16, seed=4)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centers, c.centers)


def test_integer_grid_init_and_zero_weight_rows():
    x = torch.rand(3, 256) * 15
    weight = torch.rand(3, 256)
    weight[1] = 0  # a row with no weight is clustered unweighted rather than producing NaN
    result = kmeans_1d(x, 16, weight, init=torch.arange(16.0)[None])
    assert torch.isfinite(result.centers).all()
    assert (result.centers[:, 1:] >= result.centers[:, :-1]).all()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="rows, points"):
        kmeans_1d(torch.randn(10), 4)
    with pytest.raises(ValueError, match="unknown k-means init"):
        kmeans_1d(torch.randn(2, 10), 4, init="random")


def test_long_rows_through_the_histogram_stay_within_one_percent_of_sklearn():
    # K = 4096 > bins: the histogram path. Same rows through the exact sort path for comparison.
    x, weight = normalised_rows(torch.randn(6, 4096, generator=torch.Generator().manual_seed(7)))
    binned = kmeans_1d(x, 16, weight).inertia.mean().item()
    exact = kmeans_1d(x, 16, weight, bins=None).inertia.mean().item()
    assert binned <= 1.01 * sklearn_inertia(x, weight, 16)
    assert binned == pytest.approx(exact, rel=5e-3)


def test_max_iter_caps_lloyd_and_zero_keeps_the_start():
    x = torch.rand(4, 300, generator=torch.Generator().manual_seed(5)) * 15
    start = torch.arange(16.0)[None]
    assert torch.equal(kmeans_1d(x, 16, init=start, max_iter=0).centers, start.expand(4, -1))
    capped, full = kmeans_1d(x, 16, init=start, max_iter=2), kmeans_1d(x, 16, init=start)
    assert capped.n_iter == 2 and full.n_iter > 2
    assert (full.inertia <= capped.inertia + 1e-9).all()


@pytest.mark.parametrize("bins, tol", [(None, 0.0), (256, 0.0), (256, 1e-4)], ids=["exact", "histogram", "tol"])
def test_both_implementations_agree_from_the_same_start(monkeypatch, bins, tol):
    g = torch.Generator().manual_seed(11)
    x, weight = torch.rand(16, 1000, generator=g) * 15, torch.rand(16, 1000, generator=g)
    start = torch.sort(torch.rand(16, 16, generator=g) * 15, 1).values
    results = {}
    for name in ("native", "torch"):
        monkeypatch.setenv("ANY4_KMEANS", name)
        results[name] = kmeans_1d(x, 16, weight, init=start, bins=bins, tol=tol)
    assert torch.equal(results["native"].centers, results["torch"].centers)
    assert torch.equal(results["native"].labels, results["torch"].labels)
    assert results["native"].n_iter == results["torch"].n_iter


def test_compiled_rows_do_not_depend_on_the_rows_beside_them(backend):
    if backend != "native":
        pytest.skip("the tensor version draws one random stream for the whole batch")
    x = torch.rand(16, 700, generator=torch.Generator().manual_seed(12)) * 15
    whole, half = kmeans_1d(x, 16, seed=5), kmeans_1d(x[:8].contiguous(), 16, seed=5)
    assert torch.equal(whole.centers[:8], half.centers)


def test_backend_choice_and_fallback(monkeypatch):
    monkeypatch.setenv("ANY4_KMEANS", "fastest")
    with pytest.raises(ValueError, match="ANY4_KMEANS='fastest': choose one of auto, native, torch"):
        kmeans_1d(torch.rand(2, 10), 4)

    def broken():
        raise OSError("no C++ compiler")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("ANY4_KMEANS", "native")
    with pytest.raises(RuntimeError, match="did not build: OSError: no C\\+\\+ compiler"):
        kmeans_1d(torch.rand(2, 10), 4)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("ANY4_KMEANS", "auto")
    with pytest.warns(UserWarning, match="slower tensor version"):
        result = kmeans_1d(torch.rand(2, 10), 4)
    assert result.centers.shape == (2, 4)


def test_lut_benchmark_writes_its_record(tmp_path, backend):
    import json

    from any4lib.bench import lut

    rows = lut.main(["--shapes", "64x256", "--sample-rows", "2", "--group-size", "64", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "any4_cpu.json").read_text())
    assert record["rows"] == rows and rows[0]["shape"] == "64x256" and rows[0]["kmeans"] == {"native": "compiled", "torch": "tensor"}[backend]
    assert rows[0]["seconds"] > 0 and rows[0]["speedup"] == pytest.approx(rows[0]["sklearn_seconds_extrapolated"] / rows[0]["seconds"])
    assert 0.75 < rows[0]["objective_ratio"] < 1.25 and record["provenance"]["packages"]["torch"]
