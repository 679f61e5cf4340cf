// A type without `using policy_concept = locus::router_tag;` is refused as a router.
#include <locus/core/policy.hpp>

struct looks_like_a_router {
  using policy_concept = int;
};
template struct locus::require_router<looks_like_a_router>;
