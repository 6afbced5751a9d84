"""Batched, weighted 1-D k-means: one independent clustering per row, all rows at once.

In one dimension a cluster of a sorted row is a contiguous run, so after one sort per row every quantity k-means
needs (cluster weight, weighted sum, weighted sum of squares, hence centroid and cost) is a difference of three
prefix sums. Lloyd iterations and the k-means++ seeding then cost O(k log M) per row instead of O(k M). Rows longer
than `bins` (2048) skip the sort: they are pooled into a fine weighted histogram (one O(M) pass), whose bins are
already in order; the final labels and objective are computed on the raw points. Sums are float64 so that
differences over long rows do not cancel.

Lloyd runs per row until no label changes (or, with `tol` > 0, scikit-learn's rule: squared centre shift at most
`tol` times the row's variance); a finished row is frozen while the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .native import kmeans_module


@dataclass
class KMeansResult:
    centers: torch.Tensor  # [R, k] ascending
    labels: torch.Tensor  # [R, M] index into centers: uint8 when k <= 256 (the codes' own type), else int64
    inertia: torch.Tensor | None  # [R] float64: sum of weight * (x - center)^2 (None unless asked for)
    n_iter: int


class _SortedRows:
    """Rows sorted once, with prefix sums of (w, w*x, w*x^2) stacked: [R, 3, M + 1] float64, leading zero."""

    def __init__(self, values: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, wxx: torch.Tensor):
        self.values = values
        self.prefix = torch.nn.functional.pad(torch.stack([w, wx, wxx], 1).cumsum(2), (1, 0))

    @classmethod
    def exact(cls, x: torch.Tensor, weight: torch.Tensor) -> "_SortedRows":
        values, order = torch.sort(x, dim=1, stable=True)
        w = torch.gather(weight, 1, order).double()
        wx = w * values.double()
        return cls(values, w, wx, wx * values.double())

    @classmethod
    def histogram(cls, x: torch.Tensor, weight: torch.Tensor, bins: int) -> "_SortedRows":
        """Each row pooled into `bins` equal-width bins over its range, a bin standing for one point at its weighted
        mean (its midpoint when empty, so points stay ascending): O(M) instead of a sort. A bin holds a few points,
        so its own sums are exact enough in float32; the prefix sums over bins are float64."""
        n_rows = x.shape[0]
        lo, hi = torch.aminmax(x, dim=1, keepdim=True)
        width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny) / bins
        index = (x - lo).div_(width).clamp_(0, bins - 1).long()
        index += torch.arange(0, n_rows * bins, bins, device=x.device)[:, None]  # one bincount serves every row
        index, w = index.reshape(-1), weight.reshape(-1)
        mass = torch.bincount(index, w, minlength=n_rows * bins).reshape(n_rows, bins).double()
        moment = torch.bincount(index, w * x.reshape(-1), minlength=n_rows * bins).reshape(n_rows, bins).double()
        mean = moment / mass.clamp_min(1e-300)
        mid = (lo + width * (torch.arange(bins, device=x.device) + 0.5)).double()
        return cls(torch.where(mass > 0, mean, mid).float(), mass, moment, moment * mean)

    def take(self, keep: torch.Tensor) -> "_SortedRows":
        """The rows where `keep` ([R] bool) is true."""
        subset = _SortedRows.__new__(_SortedRows)
        subset.values, subset.prefix = self.values[keep], self.prefix[keep]
        return subset

    @property
    def length(self) -> int:
        return self.values.shape[1]

    def sums(self, position: torch.Tensor) -> torch.Tensor:
        """Prefix sums (w, w*x, w*x^2) before sorted `position` ([R, ...] int64) -> [R, ..., 3]."""
        flat = position.reshape(position.shape[0], 1, -1).expand(-1, 3, -1)
        return self.prefix.gather(2, flat).movedim(1, -1).reshape(*position.shape, 3)

    @staticmethod
    def cost(sums: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """sum w (x - center)^2 of a run, from its (w, w*x, w*x^2) sums [..., 3] and its center [...]."""
        c = center.double()
        return (sums[..., 2] - 2 * c * sums[..., 1] + c * c * sums[..., 0]).clamp_min(0)

    def boundaries(self, centers: torch.Tensor) -> torch.Tensor:
        """[R, ..., k+1] sorted positions where each center's run starts (centers ascending along the last dim)."""
        mids = (centers[..., 1:] + centers[..., :-1]) / 2
        lead = centers.shape[:-1]
        inner = torch.searchsorted(self.values, mids.reshape(lead[0], -1).to(self.values.dtype)).reshape(mids.shape)
        first = torch.zeros(*lead, 1, dtype=torch.long, device=centers.device)
        return torch.cat([first, inner, torch.full_like(first, self.length)], -1)

    def run_sums(self, bounds: torch.Tensor) -> torch.Tensor:
        """(w, w*x, w*x^2) of each run between consecutive boundaries: [R, ..., k+1] -> [R, ..., k, 3]."""
        at = self.sums(bounds)
        return at[..., 1:, :] - at[..., :-1, :]

    def potential(self, centers: torch.Tensor) -> torch.Tensor:
        """Cost of each row's clustering by nearest ascending center; centers [R, ..., k] -> [R, ...]."""
        return self.cost(self.run_sums(self.boundaries(centers)), centers).sum(-1)

    def sample_by_cost(self, centers: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Draw sorted positions with probability proportional to w * d(x, nearest center)^2.

        centers [R, i] ascending, u [R, L] uniform in (0, 1]. Picks the cluster by its cost, then bisects the
        monotone partial cost inside it: no pass over the row.
        """
        bounds = self.boundaries(centers)
        cum = self.cost(self.run_sums(bounds), centers).cumsum(1)
        target = u.double() * cum[:, -1:]
        cluster = torch.searchsorted(cum, target).clamp_max(centers.shape[1] - 1)
        before = torch.where(cluster > 0, cum.gather(1, (cluster - 1).clamp_min(0)), torch.zeros_like(target))
        need = target - before
        lo, hi = bounds.gather(1, cluster), bounds.gather(1, cluster + 1)
        c = centers.gather(1, cluster)
        at_start = self.sums(lo)
        # Smallest end in (lo, hi] whose partial cost from lo reaches `need`.
        lo = lo + 1
        for _ in range(max(1, math.ceil(math.log2(self.length + 1)))):
            mid = (lo + hi) // 2
            reached = self.cost(self.sums(mid) - at_start, c) >= need
            hi = torch.where(reached, mid, hi)
            lo = torch.where(reached, lo, mid + 1)
        return (hi - 1).clamp(0, self.length - 1)


def _kmeans_plus_plus(rows: _SortedRows, k: int, n_local_trials: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii, with local trials as in scikit-learn), batched over rows."""
    n_rows, device = rows.values.shape[0], rows.values.device
    uniform = lambda *shape: 1 - torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
    # First center: a point drawn with probability proportional to its weight.
    mass = rows.prefix[:, 0, 1:].contiguous()
    first = torch.searchsorted(mass, uniform(n_rows, 1) * mass[:, -1:]).clamp_max(rows.length - 1)
    centers = rows.values.gather(1, first)
    for _ in range(1, k):
        picks = rows.sample_by_cost(centers, uniform(n_rows, n_local_trials))
        candidates = rows.values.gather(1, picks)  # [R, L]
        trial = torch.cat([centers.unsqueeze(1).expand(-1, n_local_trials, -1), candidates.unsqueeze(-1)], -1)
        trial, _ = torch.sort(trial, -1)
        best = rows.potential(trial).argmin(1)  # [R]
        centers = trial[torch.arange(n_rows, device=device), best]
    return centers


def kmeans_1d(
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor | None = None,
    *,
    init: str | torch.Tensor = "k-means++",
    n_local_trials: int | None = None,
    max_iter: int = 300,
    tol: float = 0.0,
    seed: int = 0,
    bins: int | None = 2048,
    with_inertia: bool = True,
    row_chunk: int | None = None,
) -> KMeansResult:
    """Weighted k-means of each row of `x` ([R, M] float) into `k` clusters, Lloyd's algorithm run to convergence.

    weight: [R, M] non-negative sample weights (None: all ones); a row whose weights sum to zero is clustered
    unweighted. init: "k-means++" (greedy, 2 + ln k local trials unless `n_local_trials`), or an [R or 1, k] tensor
    of starting centers (e.g. the integer grid). tol: 0 runs Lloyd until no label changes; > 0 also stops
    on scikit-learn's relative centre-shift rule (its default is 1e-4), trading a little objective for time.
    bins: rows longer than this are clustered through a weighted histogram of that many bins (None: always sort);
    labels and inertia are then computed on the raw points. with_inertia=False skips the objective (one pass over
    the rows fewer) when only centers and labels are needed. Deterministic for a given seed and device.

    On a CPU the compiled version (any4lib.native) runs when it builds, one row at a time over threads; elsewhere
    the tensor version runs `row_chunk` rows at a time (None: 512 on a CPU, 16384 on a GPU).
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects [rows, points], got shape {tuple(x.shape)}")
    x = x.float()
    weight = torch.ones_like(x) if weight is None else weight.float().expand_as(x)
    dead = weight.sum(1, keepdim=True) <= 0
    if dead.any():
        weight = torch.where(dead, torch.ones_like(weight), weight)
    if isinstance(init, str) and init != "k-means++":
        raise ValueError(f"unknown k-means init {init!r}: use 'k-means++' or a tensor of starting centers")
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    start = torch.sort(init.to(x).expand(x.shape[0], k), 1).values if isinstance(init, torch.Tensor) else None

    native = kmeans_module() if x.device.type == "cpu" and k <= 256 else None
    if native is not None:
        empty = torch.empty(0, k)
        centers, labels, iterations = native.kmeans_rows(
            x.contiguous(), weight.contiguous(), k, bins or 0, empty if start is None else start.contiguous(),
            trials, max_iter, tol, seed,
        )
        n_iter = int(iterations.max())
    else:
        # The tensor version holds float64 prefix sums (24 bytes a point): rows go through in chunks.
        row_chunk = row_chunk or (16384 if x.is_cuda else 512)
        parts = [
            _kmeans_tensor(
                x[i : i + row_chunk], k, weight[i : i + row_chunk], None if start is None else start[i : i + row_chunk],
                trials, max_iter, tol, seed + i, bins,
            )
            for i in range(0, x.shape[0], row_chunk)
        ]
        centers, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        labels = labels.to(torch.uint8) if k <= 256 else labels
        n_iter = max(p[2] for p in parts)

    inertia = None
    if with_inertia:
        inertia = (weight.double() * (x.double() - centers.gather(1, labels.long()).double()) ** 2).sum(1)
    return KMeansResult(centers, labels, inertia, n_iter)


def _kmeans_tensor(x, k, weight, start, trials, max_iter, tol, seed, bins) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows = _SortedRows.histogram(x, weight, bins) if bins and x.shape[1] > bins else _SortedRows.exact(x, weight)
    if start is None:
        start = _kmeans_plus_plus(rows, k, trials, torch.Generator(device=x.device).manual_seed(seed))
    tolerance = tol * x.double().var(1, unbiased=False) if tol > 0 else torch.zeros(x.shape[0], device=x.device)
    centers, n_iter = _lloyd(rows, start, tolerance, max_iter)
    return centers, assign_nearest(x, centers), n_iter


def _lloyd(rows: _SortedRows, centers: torch.Tensor, tolerance: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    """Lloyd iterations per row until its runs stop changing (or its centre shift is within `tolerance`).

    A finished row is frozen. Most rows settle in a few dozen iterations while a few take a hundred or more, so
    the working set is compacted whenever half of it has finished (the copies sum to at most one full pass).
    """
    centers = centers.clone()
    active = torch.arange(centers.shape[0], device=centers.device)  # rows of the working set
    work, work_tolerance, current = rows, tolerance, centers.clone()
    done = torch.zeros(len(active), dtype=torch.bool, device=centers.device)
    bounds = work.boundaries(current)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        runs = work.run_sums(bounds)
        mass, moment = runs[..., 0], runs[..., 1]
        # An empty cluster keeps its center (it may win points back next round).
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), current.double()).float()
        updated = torch.where(done[:, None], current, torch.sort(updated, 1).values)
        shift = ((updated.double() - current.double()) ** 2).sum(1)
        new_bounds = work.boundaries(updated)
        done = done | (new_bounds == bounds).all(1) | (shift <= work_tolerance)
        current, bounds = updated, new_bounds
        if done.all():
            break
        if 2 * int(done.sum()) >= len(done):
            centers[active[done]] = current[done]
            keep = ~done
            active, work, work_tolerance = active[keep], work.take(keep), work_tolerance[keep]
            current, bounds, done = current[keep], bounds[keep], done[keep]
    centers[active] = current
    return centers, n_iter


def assign_nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ascending `centers` ([R or 1, k]) for each element of `x` ([R, M]); ties go up."""
    mids = (centers[:, 1:] + centers[:, :-1]) / 2
    return torch.searchsorted(mids.expand(x.shape[0], -1).contiguous(), x.contiguous(), right=True)
