#pragma once
//! @file
//! Seeded, deterministic k-means (k-means++ initialisation, Lloyd iterations) over dense float
//! points, the offline half of the workload-aware grouper. Determinism: the seed drives a
//! platform-independent generator (splitmix64), every tie goes to the lower index, and sums run
//! in point order, so the same input and seed give bit-identical results everywhere.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

//! Options of kmeans().
struct kmeans_options {
  std::size_t k = 8;                //!< clusters (at most the number of points)
  std::uint64_t seed = 1;           //!< drives the k-means++ draws
  std::size_t max_iterations = 100; //!< Lloyd iterations at most (stops earlier once labels settle)
  std::size_t restarts = 1;         //!< independent initialisations; the lowest inertia wins (at most max_restarts)
  //! The most restarts: each costs a full k-means, so a mistyped count (or SIZE_MAX) would run for
  //! years; a few dozen already find the best optimum restarts can.
  static constexpr std::size_t max_restarts = 1024;
};

//! Result of kmeans().
struct kmeans_result {
  std::size_t k = 0, dim = 0;
  std::vector<float> centroids;      //!< `k × dim`, row-major: the mean of each cluster's points
  std::vector<std::uint32_t> labels; //!< per point: its cluster
  std::vector<std::size_t> sizes;    //!< per cluster: its points
  double inertia = 0;                //!< sum of squared distances of points to their centroid
  std::size_t iterations = 0;        //!< Lloyd iterations of the winning restart

  std::span<const float> centroid(std::size_t c) const { return {centroids.data() + c * dim, dim}; }
};

namespace detail::kmeans {

//! Dot product with four independent accumulators so that the compiler can vectorise it without
//! reassociating a single sum (and the result is still the same on every run).
inline float dot(const float* a, const float* b, std::size_t n) noexcept {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i)
    s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

//! Squared distance in double with four independent accumulators (as dot: vectorisable, and the
//! same result on every run).
inline double squared_distance(const float* a, const float* b, std::size_t n) noexcept {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const double d0 = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    const double d1 = static_cast<double>(a[i + 1]) - static_cast<double>(b[i + 1]);
    const double d2 = static_cast<double>(a[i + 2]) - static_cast<double>(b[i + 2]);
    const double d3 = static_cast<double>(a[i + 3]) - static_cast<double>(b[i + 3]);
    s0 += d0 * d0;
    s1 += d1 * d1;
    s2 += d2 * d2;
    s3 += d3 * d3;
  }
  for (; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s0 += d * d;
  }
  return (s0 + s1) + (s2 + s3);
}

// One initialisation + Lloyd run.
inline kmeans_result run(const float* points, std::size_t n, std::size_t dim, std::size_t k, std::size_t max_it,
                         std::uint64_t seed) {
  kmeans_result out;
  out.k = k;
  out.dim = dim;
  out.centroids.assign(k * dim, 0.0f);
  out.labels.assign(n, 0);
  out.sizes.assign(k, 0);
  trace::detail::splitmix64 rng(seed);

  // k-means++: first centre uniform, each next one with probability proportional to the squared
  // distance to the nearest centre chosen so far.
  std::vector<double> nearest(n, std::numeric_limits<double>::infinity());
  std::size_t first = static_cast<std::size_t>(rng.below(n));
  std::copy_n(points + first * dim, dim, out.centroids.begin());
  for (std::size_t c = 1; c < k; ++c) {
    double total = 0;
    for (std::size_t p = 0; p < n; ++p) {
      nearest[p] = std::min(nearest[p], squared_distance(points + p * dim, out.centroids.data() + (c - 1) * dim, dim));
      total += nearest[p];
    }
    std::size_t pick = 0;
    if (total > 0) {
      double u = rng.uniform() * total;
      pick = n - 1;
      for (std::size_t p = 0; p < n; ++p) {
        if (nearest[p] > 0 && u < nearest[p]) {
          pick = p;
          break;
        }
        u -= nearest[p];
      }
      // Rounding can leave u past the last positive weight: take the last point not yet a centre.
      while (nearest[pick] == 0 && pick > 0)
        --pick;
    } else {
      pick = static_cast<std::size_t>(rng.below(n)); // every point coincides with a centre
    }
    std::copy_n(points + pick * dim, dim, out.centroids.begin() + static_cast<std::ptrdiff_t>(c * dim));
  }

  // Lloyd: assign (ties to the lower cluster), recompute means in double, repeat until stable.
  std::vector<double> sums(k * dim);
  std::vector<double> half_norm(k);
  bool changed = true;
  std::size_t it = 0;
  for (; it < max_it && changed; ++it) {
    throw_if_cancelled();
    for (std::size_t c = 0; c < k; ++c) {
      const float* m = out.centroids.data() + c * dim;
      half_norm[c] = 0.5 * static_cast<double>(dot(m, m, dim));
    }
    changed = false;
    for (std::size_t p = 0; p < n; ++p) {
      // argmin |p - c|^2 = argmax p·c - |c|^2 / 2
      std::uint32_t best = 0;
      double best_score = -std::numeric_limits<double>::infinity();
      for (std::size_t c = 0; c < k; ++c) {
        const double s = static_cast<double>(dot(points + p * dim, out.centroids.data() + c * dim, dim)) - half_norm[c];
        if (s > best_score) {
          best_score = s;
          best = static_cast<std::uint32_t>(c);
        }
      }
      if (it == 0 || out.labels[p] != best) changed = true;
      out.labels[p] = best;
    }
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(out.sizes.begin(), out.sizes.end(), 0);
    for (std::size_t p = 0; p < n; ++p) {
      double* s = sums.data() + out.labels[p] * dim;
      const float* x = points + p * dim;
      for (std::size_t i = 0; i < dim; ++i)
        s[i] += x[i];
      ++out.sizes[out.labels[p]];
    }
    for (std::size_t c = 0; c < k; ++c) {
      if (out.sizes[c] == 0) {
        // An empty cluster takes the point farthest from its centre (lowest index on ties), so
        // that k clusters survive.
        std::size_t far = 0;
        double far_d = -1;
        for (std::size_t p = 0; p < n; ++p) {
          const double d = squared_distance(points + p * dim, out.centroids.data() + out.labels[p] * dim, dim);
          if (d > far_d && out.sizes[out.labels[p]] > 1) {
            far_d = d;
            far = p;
          }
        }
        std::copy_n(points + far * dim, dim, out.centroids.begin() + static_cast<std::ptrdiff_t>(c * dim));
        changed = true;
        continue;
      }
      const double inv = 1.0 / static_cast<double>(out.sizes[c]);
      for (std::size_t i = 0; i < dim; ++i)
        out.centroids[c * dim + i] = static_cast<float>(sums[c * dim + i] * inv);
    }
  }
  out.iterations = it;
  // Final labels against the final centres, then sizes and inertia.
  std::fill(out.sizes.begin(), out.sizes.end(), 0);
  out.inertia = 0;
  for (std::size_t p = 0; p < n; ++p) {
    std::uint32_t best = 0;
    double best_d = std::numeric_limits<double>::infinity();
    for (std::size_t c = 0; c < k; ++c) {
      const double d = squared_distance(points + p * dim, out.centroids.data() + c * dim, dim);
      if (d < best_d) {
        best_d = d;
        best = static_cast<std::uint32_t>(c);
      }
    }
    out.labels[p] = best;
    ++out.sizes[best];
    out.inertia += best_d;
  }
  return out;
}

} // namespace detail::kmeans

//! k-means of `n` points of dimension `dim` stored row-major in `points`.
//! @throws locus::config_error when k is 0 or exceeds the number of points, sizes disagree, or
//!         restarts is outside 1..max_restarts
//! @throws locus::invalid_input_error on a non-finite coordinate (naming the point)
inline kmeans_result kmeans(std::span<const float> points, std::size_t dim, const kmeans_options& opt) {
  LOCUS_REQUIRE(dim > 0 && points.size() % dim == 0, config_error, "kmeans: ", points.size(),
                " values do not form points of dimension ", dim);
  const std::size_t n = points.size() / dim;
  LOCUS_REQUIRE(opt.k >= 1 && opt.k <= n, config_error, "kmeans: k = ", opt.k, " clusters for ", n,
                " points (need 1 <= k <= points)");
  LOCUS_REQUIRE(opt.max_iterations >= 1 && opt.restarts >= 1, config_error,
                "kmeans: max_iterations and restarts must be at least 1");
  LOCUS_REQUIRE(opt.restarts <= kmeans_options::max_restarts, config_error, "kmeans: restarts is ", opt.restarts,
                ", expected at most ", kmeans_options::max_restarts);
  for (std::size_t i = 0; i < points.size(); ++i)
    LOCUS_REQUIRE(std::isfinite(points[i]), invalid_input_error, "kmeans: point ", i / dim, " coordinate ", i % dim,
                  " is ", points[i]);
  kmeans_result best;
  for (std::size_t r = 0; r < opt.restarts; ++r) {
    kmeans_result cur =
        detail::kmeans::run(points.data(), n, dim, opt.k, opt.max_iterations, opt.seed + 0x9e3779b97f4a7c15ull * r);
    if (r == 0 || cur.inertia < best.inertia) best = std::move(cur);
  }
  return best;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
