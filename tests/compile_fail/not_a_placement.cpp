// A type without `using policy_concept = locus::placement_tag;` is refused as a placement.
#include <locus/core/policy.hpp>

struct looks_like_a_placement {
  using policy_concept = int;
};
template struct locus::require_placement<looks_like_a_placement>;
