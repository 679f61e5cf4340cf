// A type without `using policy_concept = locus::backend_tag;` is refused as a backend.
#include <locus/core/policy.hpp>

struct looks_like_a_backend {
  using policy_concept = int;
};
template struct locus::require_backend<looks_like_a_backend>;
