// A type with the router tag but no host `route` is refused as a router: the tag alone does not
// make one.
#include <locus/router/logits.hpp>

struct tagged_without_route {
  using policy_concept = locus::router_tag;
  using top_k_type = locus::top_k<>;
  static constexpr const char* name = "tagged";
  std::size_t top_k() const { return 2; }
};
template struct locus::require_router<tagged_without_route>;
