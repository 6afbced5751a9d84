"""Batched, weighted 1-D k-means: one independent clustering per row, all rows at once.

In one dimension a cluster of a sorted row is a contiguous run, so after one sort per row every quantity k-means
needs (cluster weight, weighted sum, weighted sum of squares, hence centroid and cost) is a difference of three
prefix sums. Lloyd iterations and the k-means++ seeding then cost O(k log M) per row instead of O(k M): the sort
dominates. Prefix sums are float64 so that differences over long rows do not cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centers: torch.Tensor  # [R, k] ascending
    labels: torch.Tensor  # [R, M] int64, index into centers
    inertia: torch.Tensor  # [R] float64: sum of weight * (x - center)^2
    n_iter: int


class _SortedRows:
    """Rows sorted once, with prefix sums of w, w*x, w*x^2 (float64, a leading zero column)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor):
        self.values, order = torch.sort(x, dim=1, stable=True)
        w = torch.gather(weight, 1, order).double()
        xd = self.values.double()
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
        self.p0 = torch.cat([zero, w.cumsum(1)], 1)
        self.p1 = torch.cat([zero, (w * xd).cumsum(1)], 1)
        self.p2 = torch.cat([zero, (w * xd * xd).cumsum(1)], 1)

    @property
    def length(self) -> int:
        return self.values.shape[1]

    def segment_cost(self, lo: torch.Tensor, hi: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """sum w (x - center)^2 over sorted positions [lo, hi) of each row; lo/hi/center share one shape [R, ...]."""
        flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
        s0, s1, s2 = (flat(p.gather(1, flat(hi))) - flat(p.gather(1, flat(lo))) for p in (self.p0, self.p1, self.p2))
        c = flat(center).double()
        return (s2 - 2 * c * s1 + c * c * s0).clamp_min(0).reshape(center.shape)

    def boundaries(self, centers: torch.Tensor) -> torch.Tensor:
        """[R, ..., k+1] sorted positions where each center's run starts (centers ascending along the last dim)."""
        mids = (centers[..., 1:] + centers[..., :-1]) / 2
        lead = centers.shape[:-1]
        inner = torch.searchsorted(self.values, mids.reshape(lead[0], -1).to(self.values.dtype)).reshape(mids.shape)
        first = torch.zeros(*lead, 1, dtype=torch.long, device=centers.device)
        return torch.cat([first, inner, torch.full_like(first, self.length)], -1)

    def potential(self, centers: torch.Tensor) -> torch.Tensor:
        """Cost of each row's clustering by nearest ascending center; centers [R, ..., k] -> [R, ...]."""
        b = self.boundaries(centers)
        return self.segment_cost(b[..., :-1], b[..., 1:], centers).sum(-1)

    def sample_by_cost(self, centers: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Draw sorted positions with probability proportional to w * d(x, nearest center)^2.

        centers [R, i] ascending, u [R, L] uniform in (0, 1]. Picks the cluster by its cost, then bisects the
        monotone partial cost inside it: no pass over the row.
        """
        b = self.boundaries(centers)
        lo_all, hi_all = b[:, :-1], b[:, 1:]
        cost = self.segment_cost(lo_all, hi_all, centers)
        cum = cost.cumsum(1)
        target = u.double() * cum[:, -1:]
        cluster = torch.searchsorted(cum, target).clamp_max(centers.shape[1] - 1)
        before = torch.where(cluster > 0, cum.gather(1, (cluster - 1).clamp_min(0)), torch.zeros_like(target))
        need = target - before
        lo, hi = lo_all.gather(1, cluster), hi_all.gather(1, cluster)
        c = centers.gather(1, cluster)
        start = lo.clone()
        # Smallest end in (lo, hi] whose partial cost from lo reaches `need`.
        lo = lo + 1
        for _ in range(max(1, math.ceil(math.log2(self.length + 1)))):
            mid = (lo + hi) // 2
            reached = self.segment_cost(start, mid, c) >= need
            hi = torch.where(reached, mid, hi)
            lo = torch.where(reached, lo, mid + 1)
        return (hi - 1).clamp(0, self.length - 1)


def _kmeans_plus_plus(rows: _SortedRows, k: int, n_local_trials: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii, with local trials as in scikit-learn), batched over rows."""
    n_rows, device = rows.values.shape[0], rows.values.device
    uniform = lambda *shape: 1 - torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
    # First center: a point drawn with probability proportional to its weight.
    first = torch.searchsorted(rows.p0[:, 1:].contiguous(), uniform(n_rows, 1) * rows.p0[:, -1:]).clamp_max(rows.length - 1)
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
    seed: int = 0,
) -> KMeansResult:
    """Weighted k-means of each row of `x` ([R, M] float) into `k` clusters, Lloyd's algorithm run to convergence.

    weight: [R, M] non-negative sample weights (None: all ones); a row whose weights sum to zero is clustered
    unweighted. init: "k-means++" (greedy, 2 + ln k local trials unless `n_local_trials`), or an [R or 1, k] tensor
    of starting centers (e.g. the integer grid). Deterministic for a given seed and device.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects [rows, points], got shape {tuple(x.shape)}")
    x = x.float()
    weight = torch.ones_like(x) if weight is None else weight.float().expand_as(x)
    dead = weight.sum(1, keepdim=True) <= 0
    weight = torch.where(dead, torch.ones_like(weight), weight)
    rows = _SortedRows(x, weight)

    if isinstance(init, torch.Tensor):
        centers = torch.sort(init.to(x).expand(x.shape[0], k), 1).values
    elif init == "k-means++":
        generator = torch.Generator(device=x.device).manual_seed(seed)
        trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
        centers = _kmeans_plus_plus(rows, k, trials, generator)
    else:
        raise ValueError(f"unknown k-means init {init!r}: use 'k-means++' or a tensor of starting centers")

    bounds = rows.boundaries(centers)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        mass = rows.p0.gather(1, hi) - rows.p0.gather(1, lo)
        moment = rows.p1.gather(1, hi) - rows.p1.gather(1, lo)
        # An empty cluster keeps its center (it may win points back next round).
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centers.double()).float()
        centers = torch.sort(updated, 1).values
        new_bounds = rows.boundaries(centers)
        if torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds

    inertia = rows.segment_cost(bounds[:, :-1], bounds[:, 1:], centers).sum(1)
    return KMeansResult(centers, assign_nearest(x, centers), inertia, n_iter)


def assign_nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ascending `centers` ([R or 1, k]) for each element of `x` ([R, M]); ties go up."""
    mids = (centers[:, 1:] + centers[:, :-1]) / 2
    return torch.searchsorted(mids.expand(x.shape[0], -1).contiguous(), x.contiguous(), right=True)
