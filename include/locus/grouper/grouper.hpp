#pragma once
//! @file
//! What a grouper sees and decides. Attention is data-parallel: each arriving request is given to
//! one rank, which keeps it for its whole decode. A grouper is a policy
//! (`using policy_concept = locus::grouper_tag;`) with
//! `std::size_t assign(const arrival&, const cluster_state&)` returning a rank with free capacity,
//! or `no_rank` to make the request wait. A request waits for a running one to finish: on an idle
//! cluster a grouper must place it (the decode simulator refuses `no_rank` there).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>
#include <locus/trace/trace.hpp>
#include <span>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

//! Returned by assign() when no rank can take the request now.
inline constexpr std::size_t no_rank = std::numeric_limits<std::size_t>::max();

//! Load of one rank at the moment of an assignment.
struct rank_state {
  std::uint32_t running_requests = 0; //!< requests decoding on the rank
  std::uint64_t running_tokens = 0;   //!< their tokens so far (prefill + decoded): the KV footprint
};

//! The cluster as a grouper sees it.
struct cluster_state {
  dynamic_topology topology{1, 1};
  std::span<const rank_state> ranks;
  std::size_t capacity = 0; //!< most running requests per rank

  bool has_room(std::size_t rank) const { return ranks[rank].running_requests < capacity; }
};

//! An arriving request: its prefill tokens (`prefill_tokens` tokens from the request's start) are
//! known, its decode is not.
struct arrival {
  const trace::trace* source = nullptr;
  std::size_t request = 0;
  std::size_t prefill_tokens = 0;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! A grouper: the tag and `assign(arrival, cluster_state)` returning a rank or `grouper::no_rank`.
template <class G>
concept grouper_policy = policy_of<G, grouper_tag> &&
    requires(G g, const grouper::arrival& a, const grouper::cluster_state& c) {
  { g.assign(a, c) } -> std::convertible_to<std::size_t>;
};

//! `require_grouper<G>::type` is `G`, or one readable error when `G` is no grouper.
template <class G>
struct require_grouper {
  static_assert(grouper_policy<G>, "locus: this type is not a grouper policy; a grouper declares `using "
                                   "policy_concept = locus::grouper_tag;` and `std::size_t assign(const "
                                   "grouper::arrival&, const grouper::cluster_state&)`");
  using type = G;
};

namespace grouper {
//! A type usable as a grouper (the simulator's and the re-planner's constraint).
template <class G>
concept grouper_for = grouper_policy<G>;
} // namespace grouper

} // namespace locus::inline LOCUS_ABI_NAMESPACE
