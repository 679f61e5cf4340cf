// A type with the backend tag but no memory space is refused as a backend.
#include <locus/core/policy.hpp>

struct tagged_without_space {
  using policy_concept = locus::backend_tag;
  static constexpr const char* name = "tagged";
};
template struct locus::require_backend<tagged_without_space>;
