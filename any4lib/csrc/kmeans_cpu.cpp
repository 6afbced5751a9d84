// Batched weighted 1-D k-means on the CPU: one independent clustering per row, rows spread over threads.
//
// The same algorithm as any4lib/kmeans.py (which runs it as batched tensor ops, for GPUs), written as a plain loop
// per row: PyTorch's per-op overhead and its full-size temporaries cost more than the arithmetic on a CPU. In one
// dimension a cluster is a run of the sorted row, so with prefix sums of (w, w x, w x^2) every centroid and cost
// is O(1) and a Lloyd step is O(k log n).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace {

// One row's points in ascending order with prefix sums over them (index 0 holds the empty sum).
struct SortedRow {
  std::vector<float> value;
  std::vector<double> p0, p1, p2;

  int size() const { return static_cast<int>(value.size()); }

  void resize(int n) {
    value.resize(n);
    p0.assign(n + 1, 0.0);
    p1.assign(n + 1, 0.0);
    p2.assign(n + 1, 0.0);
  }

  // sum of w (x - c)^2 over points [a, b); clamped because the difference of large sums can dip below zero.
  double cost(int a, int b, double c) const {
    const double s0 = p0[b] - p0[a], s1 = p1[b] - p1[a], s2 = p2[b] - p2[a];
    return std::max(0.0, s2 - 2 * c * s1 + c * c * s0);
  }

  // Exact: the row sorted (stable, so equal values keep their order and results are deterministic).
  void from_points(const float* x, const float* w, int m, std::vector<int>& order) {
    order.resize(m);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [x](int a, int b) { return x[a] < x[b]; });
    resize(m);
    for (int i = 0; i < m; ++i) {
      const double v = x[order[i]], wi = w[order[i]];
      value[i] = x[order[i]];
      p0[i + 1] = p0[i] + wi;
      p1[i + 1] = p1[i] + wi * v;
      p2[i + 1] = p2[i] + wi * v * v;
    }
  }

  // Pooled into `bins` equal-width bins over the row's range; a bin stands for one point at its weighted mean
  // (its midpoint when empty, so points stay ascending). Within-bin spread is a constant the clustering ignores.
  // A bin holds a few points, so its own sums are float32 (as the tensor version's bincount keeps them, in the
  // same order, so the two agree bit for bit); sums across bins are float64.
  void from_histogram(const float* x, const float* w, int m, int bins, std::vector<float>& mass,
                      std::vector<float>& moment) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < m; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const float width = std::max(hi - lo, FLT_MIN) / bins;
    mass.assign(bins, 0.0f);
    moment.assign(bins, 0.0f);
    for (int i = 0; i < m; ++i) {
      const int b = static_cast<int>(std::min((x[i] - lo) / width, static_cast<float>(bins - 1)));
      mass[b] += w[i];
      moment[b] += w[i] * x[i];
    }
    resize(bins);
    for (int b = 0; b < bins; ++b) {
      const double mean = mass[b] > 0 ? static_cast<double>(moment[b]) / mass[b]
                                      : static_cast<double>(lo + width * (static_cast<float>(b) + 0.5f));
      value[b] = static_cast<float>(mean);
      p0[b + 1] = p0[b] + mass[b];
      p1[b + 1] = p1[b] + moment[b];
      p2[b + 1] = p2[b] + moment[b] * mean;
    }
  }

  // First point at or above `mid` (std::lower_bound), galloping out from `guess`: between Lloyd steps a run's
  // boundary moves a few points, so this costs O(log distance) instead of O(log n).
  int seek(float mid, int guess) const {
    const int n = size();
    const float* v = value.data();
    if (guess < n && v[guess] < mid) {  // the answer is right of guess: every index below lo is < mid
      int lo = guess + 1, step = 1;
      while (lo + step <= n && v[lo + step - 1] < mid) {
        lo += step;
        step *= 2;
      }
      return static_cast<int>(std::lower_bound(v + lo, v + std::min(lo + step - 1, n), mid) - v);
    }
    int hi = guess, step = 1;  // the answer is at or left of guess: every index from hi on is >= mid
    while (hi - step >= 0 && v[hi - step] >= mid) {
      hi -= step;
      step *= 2;
    }
    return static_cast<int>(std::lower_bound(v + std::max(hi - step + 1, 0), v + hi, mid) - v);
  }

  // start[j] = first point of center j's run for ascending centers c[0..k): a point goes to its nearest center,
  // so runs split at the midpoints (computed in float, like the tensor version). `guess` (optional): boundaries
  // of nearby centers to start the searches from.
  void boundaries(const float* c, int k, int* start, const int* guess = nullptr) const {
    start[0] = 0;
    for (int j = 1; j < k; ++j) {
      const float mid = (c[j - 1] + c[j]) / 2;
      start[j] = guess ? seek(mid, guess[j])
                       : static_cast<int>(std::lower_bound(value.begin(), value.end(), mid) - value.begin());
    }
    start[k] = size();
  }
};

// Uniform in (0, 1], as the tensor version draws it (1 - U[0, 1)).
double uniform(std::mt19937_64& gen) { return 1.0 - std::generate_canonical<double, 53>(gen); }

// Greedy k-means++ (Arthur & Vassilvitskii, with local trials as scikit-learn does) on one sorted row.
void kmeans_plus_plus(const SortedRow& row, int k, int trials, std::mt19937_64& gen, float* centers,
                      std::vector<int>& start, std::vector<double>& cum, std::vector<float>& best) {
  const int n = row.size();
  // First center: a point drawn with probability proportional to its weight.
  const double target = uniform(gen) * row.p0[n];
  int first = static_cast<int>(std::lower_bound(row.p0.begin() + 1, row.p0.end(), target) - (row.p0.begin() + 1));
  centers[0] = row.value[std::min(first, n - 1)];
  for (int i = 1; i < k; ++i) {
    row.boundaries(centers, i, start.data());
    cum.resize(i);
    double running = 0;
    for (int j = 0; j < i; ++j) cum[j] = running += row.cost(start[j], start[j + 1], centers[j]);
    double best_potential = INFINITY;
    for (int t = 0; t < trials; ++t) {
      // A point with probability proportional to w d^2: pick its cluster by cost, then bisect the monotone
      // partial cost inside the cluster's run (no pass over the row).
      const double goal = uniform(gen) * running;
      const int j = std::min(static_cast<int>(std::lower_bound(cum.begin(), cum.end(), goal) - cum.begin()), i - 1);
      const double need = goal - (j > 0 ? cum[j - 1] : 0.0);
      int lo = start[j] + 1, hi = start[j + 1];
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (row.cost(start[j], mid, centers[j]) >= need) hi = mid;
        else lo = mid + 1;
      }
      const float candidate = row.value[std::clamp(hi - 1, 0, n - 1)];
      // Inserted at a, the candidate takes points only from its neighbours' runs (clusters a-1 and a), so the
      // trial's potential is the current one with those two runs re-split at the two new midpoints.
      const int a = static_cast<int>(std::upper_bound(centers, centers + i, candidate) - centers);
      const int first = a > 0 ? start[a - 1] : 0, last = a < i ? start[a + 1] : n;
      double before = 0, after = 0;
      int m1 = first, m2 = last;
      if (a > 0) {
        before += row.cost(start[a - 1], start[a], centers[a - 1]);
        m1 = row.seek((centers[a - 1] + candidate) / 2, start[a]);
        after += row.cost(first, m1, centers[a - 1]);
      }
      if (a < i) {
        before += row.cost(start[a], start[a + 1], centers[a]);
        m2 = row.seek((candidate + centers[a]) / 2, start[a]);
        after += row.cost(m2, last, centers[a]);
      }
      const double p = running - before + after + row.cost(m1, m2, candidate);
      if (p < best_potential) {  // the first of equal potentials, as argmin does
        best_potential = p;
        best.assign(centers, centers + i);
        best.insert(best.begin() + a, candidate);
      }
    }
    std::copy(best.begin(), best.end(), centers);
  }
}

// Lloyd's algorithm until no run changes or the squared centre shift is at most `tolerance`; returns iterations.
int lloyd(const SortedRow& row, int k, int max_iter, double tolerance, float* centers, std::vector<int>& start,
          std::vector<int>& next_start, std::vector<float>& updated) {
  row.boundaries(centers, k, start.data());
  updated.resize(k);
  int it = 0;
  while (it < max_iter) {
    ++it;
    for (int j = 0; j < k; ++j) {
      const double s0 = row.p0[start[j + 1]] - row.p0[start[j]];
      // An empty cluster keeps its center (it may win points back next round).
      updated[j] = s0 > 0 ? static_cast<float>((row.p1[start[j + 1]] - row.p1[start[j]]) / s0) : centers[j];
    }
    std::sort(updated.begin(), updated.end());
    double shift = 0;
    for (int j = 0; j < k; ++j) shift += (static_cast<double>(updated[j]) - centers[j]) * (updated[j] - centers[j]);
    row.boundaries(updated.data(), k, next_start.data(), start.data());
    const bool settled = std::equal(start.begin(), start.end(), next_start.begin()) || shift <= tolerance;
    std::copy(updated.begin(), updated.end(), centers);
    start.swap(next_start);
    if (settled) break;
  }
  return it;
}

}  // namespace

// x, weight: float32 [R, M]; init: float32 [R or 1, k] ascending, or an empty tensor for k-means++.
// Returns centers float32 [R, k] ascending, labels uint8 [R, M] (nearest center, ties go up), iterations int32 [R].
// Row r draws its random numbers from (seed, r) alone, so a row's result does not depend on the other rows.
std::vector<torch::Tensor> kmeans_rows(torch::Tensor x, torch::Tensor weight, int64_t k, int64_t bins,
                                       torch::Tensor init, int64_t trials, int64_t max_iter, double tol,
                                       int64_t seed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "kmeans_rows: x must be a contiguous float32 CPU tensor [rows, points]");
  TORCH_CHECK(weight.sizes() == x.sizes() && weight.scalar_type() == torch::kFloat32 && weight.is_contiguous(),
              "kmeans_rows: weight must be a contiguous float32 tensor shaped like x");
  TORCH_CHECK(k >= 1 && k <= 256, "kmeans_rows: k must be in 1..256 (labels are uint8)");
  const bool given_init = init.numel() > 0;
  TORCH_CHECK(!given_init || (init.dim() == 2 && init.size(1) == k && init.scalar_type() == torch::kFloat32 &&
                              init.is_contiguous() && (init.size(0) == 1 || init.size(0) == x.size(0))),
              "kmeans_rows: init must be a contiguous float32 tensor [1 or rows, k]");
  const int64_t rows = x.size(0), m = x.size(1);
  TORCH_CHECK(m >= 1, "kmeans_rows: rows must hold at least one point");
  auto centers = torch::empty({rows, k}, x.options());
  auto labels = torch::empty({rows, m}, x.options().dtype(torch::kUInt8));
  auto iterations = torch::empty({rows}, x.options().dtype(torch::kInt32));
  const float *xs = x.data_ptr<float>(), *ws = weight.data_ptr<float>();
  const float* init_ptr = given_init ? init.data_ptr<float>() : nullptr;
  float* cs = centers.data_ptr<float>();
  uint8_t* ls = labels.data_ptr<uint8_t>();
  int32_t* its = iterations.data_ptr<int32_t>();
  const bool pooled = bins > 0 && m > bins;

  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    SortedRow row;  // scratch, reused across this thread's rows
    std::vector<int> order, start(k + 1), next_start(k + 1), count;
    std::vector<float> mass, moment;
    std::vector<double> cum;
    std::vector<float> best, updated;
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = xs + r * m, *wr = ws + r * m;
      float* c = cs + r * k;
      if (pooled) row.from_histogram(xr, wr, m, bins, mass, moment);
      else row.from_points(xr, wr, m, order);
      if (given_init) {
        std::copy_n(init_ptr + (init.size(0) == 1 ? 0 : r * k), k, c);
      } else {
        std::seed_seq mix{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(r),
                          static_cast<uint32_t>(r >> 32)};
        std::mt19937_64 gen(mix);
        kmeans_plus_plus(row, k, trials, gen, c, start, cum, best);
      }
      double tolerance = 0;
      if (tol > 0) {  // scikit-learn's rule: tol times the row's variance (unweighted, as it computes it)
        double mean = 0, square = 0;
        for (int64_t i = 0; i < m; ++i) mean += xr[i];
        mean /= m;
        for (int64_t i = 0; i < m; ++i) square += (xr[i] - mean) * (xr[i] - mean);
        tolerance = tol * square / m;
      }
      its[r] = lloyd(row, k, max_iter, tolerance, c, start, next_start, updated);
      // Labels on the raw points: the number of midpoints at or below x, one midpoint at a time over the whole
      // row (branch-free and contiguous, so each pass vectorizes).
      // Counted in int32 (a float comparison mask adds to it lane for lane), narrowed to uint8 once.
      count.assign(m, 0);
      for (int j = 0; j + 1 < k; ++j) {
        const float mid = (c[j] + c[j + 1]) / 2;
        for (int64_t i = 0; i < m; ++i) count[i] += xr[i] >= mid;
      }
      std::copy(count.begin(), count.end(), ls + r * m);
    }
  });
  return {centers, labels, iterations};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kmeans_rows", &kmeans_rows, "Batched weighted 1-D k-means, one clustering per row (CPU)");
}
