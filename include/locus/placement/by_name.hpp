#pragma once
//! @file
//! Planners chosen by name at run time, for offline tools (`locus plan`, benchmarks).

#include <locus/placement/activation_usage.hpp>
#include <locus/placement/eplb.hpp>
#include <locus/placement/linear.hpp>
#include <locus/placement/locality.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

static_assert(placement_policy<linear> && placement_policy<round_robin> && placement_policy<eplb> &&
              placement_policy<activation_usage> && placement_policy<locality>);

//! Options of the named planners that take any.
struct named_plan_options {
  std::size_t eplb_groups = 1; //!< expert groups for eplb
  locality_options locality{}; //!< options of the locality planner
};

//! Names accepted by plan_by_name.
inline std::vector<std::string> planner_names() {
  return {"linear", "round_robin", "eplb", "activation_usage", "locality"};
}

//! @throws locus::config_error naming the planners when `name` is none of them
inline void require_planner_name(std::string_view name) {
  std::string known;
  for (const auto& n : planner_names()) {
    if (n == name) return;
    known += (known.empty() ? "" : ", ") + n;
  }
  LOCUS_THROW(config_error, "unknown placement \"", name, "\" (known: ", known, ")");
}

//! Runs the planner called `name`. @throws locus::config_error for an unknown name
inline std::vector<expert_map> plan_by_name(std::string_view name, const plan_input& in,
                                            const named_plan_options& opt = {}) {
  require_planner_name(name);
  if (name == "linear") return linear{}.plan(in);
  if (name == "round_robin") return round_robin{}.plan(in);
  if (name == "eplb") return eplb{opt.eplb_groups}.plan(in);
  // These two need plan_input::node_load (see placement/activation_plan.hpp).
  if (name == "activation_usage") return activation_usage{}.plan(in);
  return locality{opt.locality}.plan(in);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
