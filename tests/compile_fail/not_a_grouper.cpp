// A type without `using policy_concept = locus::grouper_tag;` is refused as a grouper.
#include <locus/core/policy.hpp>

struct looks_like_a_grouper {
  using policy_concept = int;
};
template struct locus::require_grouper<looks_like_a_grouper>;
