#pragma once
//! @file
//! Planners compared on one trace: each row names a placement, its replica slots per GPU, a
//! grouper and a transport; the maps are fitted on a training split and decode is simulated on
//! the disjoint test split. This is what `locus compare` prints and what bench/comm_volume
//! measures, so that the driver reproduces the benchmark's figures with its defaults.

#include <cmath>
#include <cstddef>
#include <functional>
#include <locus/core/error.hpp>
#include <locus/core/transport_kind.hpp>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/placement/activation_plan.hpp>
#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

//! One configuration of a comparison.
struct comparison_row {
  std::string placement;     //!< linear, round_robin, eplb, activation_usage or locality
  std::size_t redundant = 0; //!< replica slots per GPU
  std::string grouper;       //!< round_robin, least_loaded or workload_aware
  transport_kind transport = transport_kind::flat;
};

//! How a comparison plans and simulates. The defaults are the benchmark's (bench/comm_volume):
//! the planners' own defaults with 300 annealing proposals per expert, 16 running requests per
//! GPU, FP8 dispatch / BF16 combine of hidden 2048.
struct comparison_options {
  placement::activation_plan_options plan = default_plan_options();
  simulation_config simulation = default_simulation();
  //! `locality` is planned for the transport of its row: its token-level stage counts the copies
  //! that transport sends (flat: per remote GPU, hierarchical: per remote node). Off: one plan
  //! serves both transports and counts both kinds of copies.
  bool plan_per_transport = true;

  static placement::activation_plan_options default_plan_options() {
    placement::activation_plan_options o;
    o.refine.anneal_per_expert = 300;
    return o;
  }
  static simulation_config default_simulation() {
    simulation_config c;
    c.sizes = message_sizes::fp8_dispatch_bf16_combine(2048);
    c.batch_per_rank = 16;
    return c;
  }
};

//! A row's measurement: the simulation and its inter-node bytes over the baseline's.
struct comparison_entry {
  comparison_row row;
  simulation_result result;
  //! Inter-node bytes per token over the first row's (NaN when the first row sends none: one node)
  double vs_baseline = 0;
};

//! What compare returns: one entry per row, in order, and the plans they used.
struct comparison {
  std::vector<comparison_entry> rows;
  //! (placement, redundant, transport planned for or -1 when one plan serves both) -> plan
  std::map<std::tuple<std::string, std::size_t, int>, placement::activation_plan> plans;
};

//! Called before each planning or simulation step: (steps done, steps in all, what comes next).
using comparison_progress = std::function<void(std::size_t, std::size_t, const std::string&)>;

namespace detail {
inline std::tuple<std::string, std::size_t, int> plan_key(const comparison_row& r, const comparison_options& o) {
  const bool per = o.plan_per_transport && r.placement == "locality";
  return {r.placement, r.redundant, per ? static_cast<int>(r.transport) : -1};
}
} // namespace detail

//! Plans every distinct (placement, redundant, transport where it matters) once on `train`,
//! then simulates decode of `test` for every row on `opt.simulation.topology`. The first row is
//! the baseline of comparison_entry::vs_baseline (linear / round_robin / flat in the benchmark).
//! @throws locus::config_error on an empty row list, an empty split or an unknown name
inline comparison compare(const trace::trace& train, const trace::trace& test, const std::vector<comparison_row>& rows,
                          const comparison_options& opt, const comparison_progress& progress = {}) {
  LOCUS_REQUIRE(!rows.empty(), config_error, "compare: no rows to compare");
  LOCUS_REQUIRE(train.requests() > 0, config_error, "compare: the training split has no requests");
  LOCUS_REQUIRE(test.requests() > 0, config_error, "compare: the test split has no requests");
  comparison out;
  std::vector<comparison_row> to_plan;
  for (const auto& r : rows) {
    const auto key = detail::plan_key(r, opt);
    if (out.plans.emplace(key, placement::activation_plan{}).second) to_plan.push_back(r);
  }
  const std::size_t steps = to_plan.size() + rows.size();
  std::size_t done = 0;
  const auto& topo = opt.simulation.topology;
  for (const auto& r : to_plan) {
    if (progress)
      progress(done, steps,
               "planning " + r.placement + (r.redundant ? " (" + std::to_string(r.redundant) + " replica/GPU)" : "") +
                   (std::get<2>(detail::plan_key(r, opt)) >= 0 ? std::string(" for ") + to_string(r.transport) : ""));
    auto o = opt.plan;
    // Planned for the replica rule it is simulated under: what a replica saves depends on it.
    o.refine.replicas.rule = opt.simulation.replica_rule;
    if (std::get<2>(detail::plan_key(r, opt)) >= 0)
      o.refine.count(r.transport == transport_kind::flat ? placement::copy_count::flat
                                                         : placement::copy_count::hierarchical);
    out.plans[detail::plan_key(r, opt)] = placement::plan_activation_aware(train, topo, r.placement, r.redundant, o);
    ++done;
  }
  auto cfg = opt.simulation;
  for (const auto& r : rows) {
    if (progress)
      progress(done, steps,
               "simulating " + r.placement + (r.redundant ? " +" + std::to_string(r.redundant) : "") + " / " +
                   r.grouper + " / " + to_string(r.transport));
    cfg.transport = r.transport;
    const auto& p = out.plans.at(detail::plan_key(r, opt));
    auto grouper = grouper::grouper_by_name(r.grouper, p.model);
    comparison_entry e{r, simulate_decode(test, p.maps, grouper, cfg), 0};
    const double base =
        out.rows.empty() ? e.result.inter_node_bytes_per_token : out.rows.front().result.inter_node_bytes_per_token;
    e.vs_baseline = base > 0 ? e.result.inter_node_bytes_per_token / base : std::nan("");
    out.rows.push_back(std::move(e));
    ++done;
  }
  if (progress) progress(done, steps, "done");
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
