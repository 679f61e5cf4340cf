#pragma once
//! @file
//! An alpha-beta estimate of one MoE layer's time from its traffic counts. It is a model, not a
//! measurement: links of different classes run concurrently, a rank's time on a link class is its
//! larger direction (sent or received bytes) over the class bandwidth plus one latency, the layer
//! waits for its slowest rank, and a rank's expert compute is a roofline over its step: the larger
//! of its rows' arithmetic and the reads of the expert weights it uses (its active slots).
//!
//! Defaults (documented in docs/design.md): NVLink 160 GB/s effective per GPU, 3 µs latency;
//! network 50 GB/s per GPU (a 400 Gb/s NIC), 8 µs latency; expert compute 0.22 µs per
//! (token, expert) row — a DeepSeek-V3 expert (hidden 7168, intermediate 2048, 88 MFLOP per row)
//! at 400 TFLOP/s effective; weight reads off (expert_read_us 0). With them on, e.g. 9.2 µs for
//! that expert's 44 MB of FP8 weights at an H200's 4.8 TB/s, a decode step of a few rows per expert
//! costs what its GPU's active experts cost to read, whatever their rows.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <locus/core/topology.hpp>
#include <locus/cost/traffic.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

//! Bandwidths (GB/s = 1e9 bytes/s), latencies (µs) and compute cost of the model.
//! The largest expert read time the tools take (µs): 1,000 s per read, past any device; larger
//! ones overflow a layer time.
inline constexpr double max_expert_read_us = 1e9;

struct link_model {
  double nvlink_gbps = 160.0;
  double nvlink_latency_us = 3.0;
  double network_gbps = 50.0;
  double network_latency_us = 8.0;
  double expert_us_per_row = 0.22;
  //! Microseconds to read one expert's weights from device memory (weight bytes over HBM
  //! bandwidth), per active slot and step; 0: not counted (compute by rows only).
  double expert_read_us = 0.0;

  //! @throws locus::config_error naming a bandwidth that is not positive and finite, or a latency
  //!         or compute cost that is negative or not finite (which made times inf, or NaN and then 0)
  void validate() const {
    const auto positive = [](const char* name, double v) {
      LOCUS_REQUIRE(std::isfinite(v) && v > 0, config_error, "link_model: ", name, " is ", v,
                    ", expected a finite number > 0");
    };
    const auto non_negative = [](const char* name, double v) {
      LOCUS_REQUIRE(std::isfinite(v) && v >= 0, config_error, "link_model: ", name, " is ", v,
                    ", expected a finite number >= 0");
    };
    positive("nvlink_gbps", nvlink_gbps);
    positive("network_gbps", network_gbps);
    non_negative("nvlink_latency_us", nvlink_latency_us);
    non_negative("network_latency_us", network_latency_us);
    non_negative("expert_us_per_row", expert_us_per_row);
    non_negative("expert_read_us", expert_read_us);
  }
};

//! Modelled time of one layer, in microseconds.
struct layer_time {
  double dispatch_us = 0;
  double compute_us = 0;
  double combine_us = 0;
  double total_us() const noexcept { return dispatch_us + compute_us + combine_us; }
};

namespace detail {
inline double exchange_us(const layer_traffic& t, std::size_t bytes_per_copy, const link_model& m) {
  double slowest = 0;
  for (std::size_t r = 0; r < t.ranks(); ++r) {
    double rank_us = 0;
    const auto link_us = [&](link_class c, double gbps, double latency_us) {
      const auto ci = static_cast<std::size_t>(c);
      const std::uint64_t copies = std::max(t.sent[r][ci], t.received[r][ci]);
      return copies == 0 ? 0.0 : latency_us + static_cast<double>(copies * bytes_per_copy) / (gbps * 1e3);
    };
    rank_us = std::max(link_us(link_class::intra_node, m.nvlink_gbps, m.nvlink_latency_us),
                       link_us(link_class::inter_node, m.network_gbps, m.network_latency_us));
    slowest = std::max(slowest, rank_us);
  }
  return slowest;
}
} // namespace detail

//! Estimates the layer time of the traffic `t` (one step) under `m`.
//! @throws locus::config_error when `m` is invalid (link_model::validate), or its costs are so
//!         large that a time overflows to infinity (e.g. 1e308 µs per row)
inline layer_time estimate_layer_time(const layer_traffic& t, const message_sizes& sizes, const link_model& m = {}) {
  m.validate();
  layer_time out;
  out.dispatch_us = detail::exchange_us(t, sizes.dispatch_bytes, m);
  out.combine_us = detail::exchange_us(t, sizes.combine_bytes, m);
  // Per rank, the larger of its rows' arithmetic and its active experts' weight reads (a roofline
  // over the step: a grouped GEMM overlaps one expert's reads with another's math).
  for (std::size_t r = 0; r < t.ranks(); ++r)
    out.compute_us = std::max(out.compute_us, std::max(static_cast<double>(t.expert_rows[r]) * m.expert_us_per_row,
                                                       static_cast<double>(t.active_slots[r]) * m.expert_read_us));
  // Finite costs can still overflow: an inf time would be reported as a result.
  LOCUS_REQUIRE(std::isfinite(out.total_us()), config_error, "link_model: the layer time overflows (dispatch ",
                out.dispatch_us, " µs, compute ", out.compute_us, " µs, combine ", out.combine_us,
                " µs): a latency, bandwidth or per-row cost is out of any real range");
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
