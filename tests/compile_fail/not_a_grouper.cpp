// A type with the grouper tag but no `assign` is refused as a grouper.
#include <locus/grouper/grouper.hpp>

struct tagged_without_assign {
  using policy_concept = locus::grouper_tag;
};
template struct locus::require_grouper<tagged_without_assign>;
