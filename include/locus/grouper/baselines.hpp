#pragma once
//! @file
//! Baseline groupers: `round_robin` (the next rank in turn that has room) and `least_loaded`
//! (the rank with the fewest running tokens). Neither looks at what the request will use.

#include <locus/grouper/grouper.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

//! Ranks in turn, skipping full ones.
class round_robin {
public:
  using policy_concept = grouper_tag;
  static constexpr const char* name = "round_robin";

  std::size_t assign(const arrival&, const cluster_state& c) {
    const std::size_t ranks = c.ranks.size();
    for (std::size_t i = 0; i < ranks; ++i) {
      const std::size_t r = (next_ + i) % ranks;
      if (c.has_room(r)) {
        next_ = (r + 1) % ranks;
        return r;
      }
    }
    return no_rank;
  }

private:
  std::size_t next_ = 0;
};

//! The rank with room and the fewest running tokens (lower rank on ties).
class least_loaded {
public:
  using policy_concept = grouper_tag;
  static constexpr const char* name = "least_loaded";

  std::size_t assign(const arrival&, const cluster_state& c) const {
    std::size_t best = no_rank;
    for (std::size_t r = 0; r < c.ranks.size(); ++r)
      if (c.has_room(r) && (best == no_rank || c.ranks[r].running_tokens < c.ranks[best].running_tokens)) best = r;
    return best;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
