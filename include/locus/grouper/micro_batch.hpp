#pragma once
//! @file
//! Micro-batch split for two-batch overlap: a rank's running batch is split into M micro-batches
//! (sizes differing by at most one) so that the expert work each micro-batch puts on the GPUs is
//! balanced — one micro-batch computes experts while the other communicates, so the slower one
//! sets the pace. Each request carries a per-GPU expected load (expert rows per step, e.g. from
//! its prefill routing through the expert maps: request_gpu_load). Greedy: requests by decreasing
//! total load (lower index on ties), each into the micro-batch with room whose busiest GPU would
//! end lowest (then the lighter micro-batch, then the lower index); then swaps of a request of the
//! micro-batch with the highest peak against another micro-batch's while that lowers the higher of
//! the two peaks.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/trace/trace.hpp>
#include <numeric>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

//! Most micro-batches a split takes: far above any overlap schedule (two-batch overlap uses 2),
//! and low enough that per-micro-batch tables sized from a mistyped count are refused instead of
//! allocated.
inline constexpr std::size_t max_micro_batches = 4096;

//! A split of a batch into micro-batches.
struct micro_batch_split {
  std::vector<std::uint32_t> batch_of;   //!< per request: its micro-batch
  std::vector<std::vector<double>> load; //!< per micro-batch, per GPU: expected expert rows
  //! Busiest GPU of each micro-batch (its expert time), max over mean across micro-batches.
  double peak_max_over_mean = 1;
  //! Total rows of each micro-batch, max over mean.
  double total_max_over_mean = 1;
};

namespace detail::micro_batch {
inline void summarize(micro_batch_split& s) {
  const std::size_t m = s.load.size();
  double peak_max = 0, peak_sum = 0, tot_max = 0, tot_sum = 0;
  for (const auto& b : s.load) {
    const double peak = b.empty() ? 0.0 : *std::max_element(b.begin(), b.end());
    const double tot = std::accumulate(b.begin(), b.end(), 0.0);
    peak_max = std::max(peak_max, peak);
    peak_sum += peak;
    tot_max = std::max(tot_max, tot);
    tot_sum += tot;
  }
  s.peak_max_over_mean = peak_sum > 0 ? peak_max * static_cast<double>(m) / peak_sum : 1.0;
  s.total_max_over_mean = tot_sum > 0 ? tot_max * static_cast<double>(m) / tot_sum : 1.0;
}
} // namespace detail::micro_batch

//! Evaluates a given split (e.g. the contiguous baseline) with the same metrics.
//! @throws locus::invalid_input_error on a micro-batch index ≥ m or ragged load rows
inline micro_batch_split evaluate_micro_batches(std::span<const std::vector<double>> request_load,
                                                std::vector<std::uint32_t> batch_of, std::size_t m) {
  LOCUS_REQUIRE(m <= max_micro_batches, config_error, "micro-batch split: ", m, " micro-batches, expected at most ",
                max_micro_batches);
  LOCUS_REQUIRE(batch_of.size() == request_load.size(), invalid_input_error, "micro-batch split: ", batch_of.size(),
                " assignments for ", request_load.size(), " requests");
  const std::size_t gpus = request_load.empty() ? 0 : request_load.front().size();
  micro_batch_split s;
  s.load.assign(m, std::vector<double>(gpus, 0.0));
  for (std::size_t r = 0; r < request_load.size(); ++r) {
    LOCUS_REQUIRE(batch_of[r] < m, invalid_input_error, "micro-batch split: request ", r, " in micro-batch ",
                  batch_of[r], " of ", m);
    LOCUS_REQUIRE(request_load[r].size() == gpus, invalid_input_error, "micro-batch split: request ", r, " has ",
                  request_load[r].size(), " GPU loads, request 0 has ", gpus);
    for (std::size_t g = 0; g < gpus; ++g)
      s.load[batch_of[r]][g] += request_load[r][g];
  }
  s.batch_of = std::move(batch_of);
  detail::micro_batch::summarize(s);
  return s;
}

//! Splits requests with per-GPU loads `request_load[r][gpu]` into `m` micro-batches (see the file
//! comment). @throws locus::config_error when m is 0; locus::invalid_input_error on ragged rows or
//! a negative or non-finite load
inline micro_batch_split split_micro_batches(std::span<const std::vector<double>> request_load, std::size_t m) {
  LOCUS_REQUIRE(m >= 1 && m <= max_micro_batches, config_error, "micro-batch split: ", m,
                " micro-batches, expected 1..", max_micro_batches);
  const std::size_t n = request_load.size(), gpus = n ? request_load.front().size() : 0;
  std::vector<double> total(n, 0.0);
  for (std::size_t r = 0; r < n; ++r) {
    LOCUS_REQUIRE(request_load[r].size() == gpus, invalid_input_error, "micro-batch split: request ", r, " has ",
                  request_load[r].size(), " GPU loads, request 0 has ", gpus);
    for (double x : request_load[r]) {
      LOCUS_REQUIRE(std::isfinite(x) && x >= 0, invalid_input_error, "micro-batch split: request ", r, " has load ", x);
      total[r] += x;
    }
  }
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return total[a] > total[b]; });
  const std::size_t cap = (n + m - 1) / m;
  std::vector<std::vector<double>> load(m, std::vector<double>(gpus, 0.0));
  std::vector<double> sum(m, 0.0);
  std::vector<std::size_t> count(m, 0);
  std::vector<std::uint32_t> batch_of(n, 0);
  for (const std::size_t r : order) {
    std::size_t best = m;
    double best_peak = std::numeric_limits<double>::infinity();
    for (std::size_t b = 0; b < m; ++b) {
      if (count[b] >= cap) continue;
      double peak = 0;
      for (std::size_t g = 0; g < gpus; ++g)
        peak = std::max(peak, load[b][g] + request_load[r][g]);
      if (peak < best_peak - 1e-12 || (std::abs(peak - best_peak) <= 1e-12 && best < m && sum[b] < sum[best])) {
        best = b;
        best_peak = peak;
      }
    }
    batch_of[r] = static_cast<std::uint32_t>(best);
    ++count[best];
    sum[best] += total[r];
    for (std::size_t g = 0; g < gpus; ++g)
      load[best][g] += request_load[r][g];
  }
  // Swaps: the greedy fills micro-batches up to their size and the last requests must go wherever
  // there is room, which can leave one micro-batch's busiest GPU high. Swap a request of the
  // micro-batch with the highest peak against one of another micro-batch while that lowers the
  // higher of the two peaks (sizes stay as they are).
  auto peak_of = [&](const std::vector<double>& l) { return l.empty() ? 0.0 : *std::max_element(l.begin(), l.end()); };
  for (std::size_t step = 0; step < 4 * n && m > 1; ++step) {
    std::size_t w = 0;
    for (std::size_t b = 1; b < m; ++b)
      if (peak_of(load[b]) > peak_of(load[w])) w = b;
    const double pw = peak_of(load[w]);
    double best = pw - 1e-12;
    std::size_t br = n, bs = n;
    for (std::size_t r = 0; r < n; ++r) {
      if (batch_of[r] != w) continue;
      for (std::size_t q = 0; q < n; ++q) {
        const std::size_t b = batch_of[q];
        if (b == w) continue;
        double hi = 0;
        for (std::size_t g = 0; g < gpus; ++g) {
          const double d = request_load[q][g] - request_load[r][g];
          hi = std::max(hi, std::max(load[w][g] + d, load[b][g] - d));
        }
        if (hi < best) {
          best = hi;
          br = r;
          bs = q;
        }
      }
    }
    if (br == n) break;
    const std::size_t b = batch_of[bs];
    for (std::size_t g = 0; g < gpus; ++g) {
      const double d = request_load[bs][g] - request_load[br][g];
      load[w][g] += d;
      load[b][g] -= d;
    }
    batch_of[br] = static_cast<std::uint32_t>(b);
    batch_of[bs] = static_cast<std::uint32_t>(w);
  }
  return evaluate_micro_batches(request_load, std::move(batch_of), m);
}

//! Per request of `requests`: expected expert rows per GPU per step, from its routing over the
//! token range `[first, first + count)` (clipped) through `maps` (the first copy of each expert;
//! replicas only share load), averaged over those tokens and summed over layers.
//! @throws locus::config_error when maps and trace disagree
inline std::vector<std::vector<double>> request_gpu_load(const trace::trace& t, std::span<const std::size_t> requests,
                                                         const std::vector<expert_map>& maps, std::size_t first,
                                                         std::size_t count) {
  LOCUS_REQUIRE(maps.size() == t.layers(), config_error, "request_gpu_load: ", maps.size(), " maps for ", t.layers(),
                " layers");
  const std::size_t ranks = maps.empty() ? 0 : maps.front().ranks();
  std::vector<std::vector<double>> out(requests.size(), std::vector<double>(ranks, 0.0));
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const auto& q = t.request(requests[i]);
    const std::size_t b = std::min<std::size_t>(first, q.length), e = std::min<std::size_t>(first + count, q.length);
    if (e <= b) continue;
    const double inv = 1.0 / static_cast<double>(e - b);
    for (std::size_t l = 0; l < t.layers(); ++l) {
      LOCUS_REQUIRE(maps[l].experts() == t.experts() && maps[l].ranks() == ranks, config_error,
                    "request_gpu_load: layer ", l, " map does not match the trace or the other maps");
      const auto view = t.layer(l);
      for (std::size_t tok = q.first_token + b; tok < q.first_token + e; ++tok) {
        const auto* ids = view.token_ids(tok);
        for (std::size_t j = 0; j < t.top_k(); ++j)
          out[i][static_cast<std::size_t>(maps[l].replicas(ids[j])[0].rank)] += inv;
      }
    }
  }
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
