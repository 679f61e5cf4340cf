// A type with the placement tag whose `plan` returns one map instead of one per layer is refused
// as a placement.
#include <locus/placement/plan_input.hpp>

struct plans_one_map {
  using policy_concept = locus::placement_tag;
  static constexpr const char* name = "one_map";
  locus::expert_map plan(const locus::placement::plan_input&) const;
};
template struct locus::require_placement<plans_one_map>;
