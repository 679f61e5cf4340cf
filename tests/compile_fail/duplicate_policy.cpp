// Two routers in one composition are ambiguous and refused.
#include <locus/core/policy.hpp>

struct router_a {
  using policy_concept = locus::router_tag;
};
struct router_b {
  using policy_concept = locus::router_tag;
};
template struct locus::policy_set<router_a, router_b>;
