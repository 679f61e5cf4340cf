// A placement plans before the layer exists; naming it among a layer's policies is refused.
#include <locus/core/policy.hpp>

struct a_placement {
  using policy_concept = locus::placement_tag;
};
template struct locus::policy_set<a_placement>;
