#pragma once
// locus-requires: json
//! @file
//! The decode simulator's summary as JSON (the `locus simulate --json` document).

#include <locus/cost/decode_simulator.hpp>
#include <nlohmann/json.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

//! Summary metrics of `r` (the window balance where one was measured); with a baseline, also the normalised all-to-all
//! data against it (without one the keys are absent: a run normalised by itself would read 1 and say nothing).
inline nlohmann::json simulation_summary_json(const simulation_result& r, const simulation_result* baseline = nullptr) {
  nlohmann::json j = {{"steps", r.steps},
                      {"idle_steps", r.idle_steps},
                      {"decode_tokens", r.decode_tokens},
                      {"requests", r.requests_served},
                      {"layers", r.layers.size()},
                      {"inter_node_bytes_per_token", r.inter_node_bytes_per_token},
                      {"inter_node_copies_per_token", r.inter_node_copies_per_token},
                      {"gpu_imbalance_step_weighted", r.gpu_imbalance_step_weighted},
                      {"gpu_imbalance_step_mean", r.gpu_imbalance_step_mean},
                      {"gpu_imbalance_aggregate", r.gpu_imbalance_aggregate},
                      {"layer_time_estimate_us", r.layer_time_estimate_us},
                      {"attention_imbalance", r.attention_imbalance}};
  if (r.balance_window > 0) {
    j["balance_window"] = r.balance_window;
    j["gpu_imbalance_window"] = r.gpu_imbalance_window;
  }
  if (baseline) {
    const normalized_all2all n = normalize_all2all(r, *baseline);
    j["normalized_all2all_median"] = n.median;
    j["normalized_all2all_p90"] = n.p90;
  }
  return j;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
