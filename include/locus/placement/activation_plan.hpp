#pragma once
//! @file
//! One call that fits what an activation-aware deployment needs on a training trace: the
//! workload-aware grouping model and the per-layer expert maps of a named placement. For
//! `activation_usage` (the published method) the grouping is the model's own token-balanced one;
//! for `locality` it is jointly refined with the placement (placement::refine_grouping); the
//! baselines (linear, round_robin, eplb) are planned as usual beside the same model, so that every
//! placement can be paired with every grouper.

#include <locus/grouper/workload_aware.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/trace_load.hpp>

#include <memory>
#include <string_view>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Options of plan_activation_aware.
struct activation_plan_options {
  grouper::workload_aware_options grouping{};
  named_plan_options named{};
  joint_options joint{};
  bool joint_grouping = true; //!< refine the grouping with the placement when it is `locality`
};

//! The result: expert maps and the grouping model the workload_aware grouper runs on.
struct activation_plan {
  std::vector<expert_map> maps;
  std::shared_ptr<const grouper::workload_model> model;
  double local_fraction = 0; //!< training decode pairs kept local by the joint fit (locality only)
};

//! Fits the grouping model on `train` and plans `placement` with `redundant_per_rank` replica
//! slots per rank on `topo`.
//! @throws locus::config_error for an unknown placement or an unusable trace
inline activation_plan plan_activation_aware(const trace::trace& train, const dynamic_topology& topo,
                                             std::string_view placement, std::size_t redundant_per_rank,
                                             const activation_plan_options& opt = {}) {
  auto model = std::make_shared<grouper::workload_model>(grouper::workload_model::fit(train, topo, opt.grouping));
  plan_input in = plan_input_from_trace(train, topo, redundant_per_rank);
  activation_plan out;
  if (placement == "locality" && opt.joint_grouping)
    out.local_fraction = refine_grouping(*model, in, opt.named.locality, opt.joint);
  in.node_load = model->node_load();
  out.maps = plan_by_name(placement, in, opt.named);
  out.model = std::move(model);
  return out;
}

} // namespace locus::LOCUS_ABI_NAMESPACE::placement
