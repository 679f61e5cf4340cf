// A type without `using policy_concept = locus::transport_tag;` is refused as a transport.
#include <locus/core/policy.hpp>

struct looks_like_a_transport {
  using policy_concept = int;
};
template struct locus::require_transport<looks_like_a_transport>;
