#pragma once
//! @file
//! Lower bounds to print beside measured traffic, so a reader sees how much room is left.
//!
//! `remote_pairs_lower_bound`: node n can hold at most C_n distinct experts (its GPUs × slots per
//! GPU). Whatever the placement (replicas included), the (token, expert) pairs of node n's tokens
//! whose expert is not on node n are at least the usage of every expert outside the C_n experts
//! node n uses most. The bound ignores load balance and the fact that nodes compete for replicas,
//! so it is optimistic: no placement does better, few get close.
//!
//! From it: a hierarchical transport sends at least one network copy per token with a remote
//! pair, and one copy serves at most k pairs, so network copies ≥ pairs / k; a flat transport's
//! copy serves at most min(k, slots per rank) pairs, so copies ≥ pairs / min(k, slots per rank).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <locus/core/error.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

//! @param node_usage `node_usage[n][e]`: (token, expert) pairs of tokens on node n for expert e
//! @param node_capacity distinct experts a node can hold
inline std::uint64_t remote_pairs_lower_bound(const std::vector<std::vector<std::uint64_t>>& node_usage,
                                              std::size_t node_capacity) {
  std::uint64_t bound = 0;
  for (const auto& usage : node_usage) {
    std::vector<std::uint64_t> sorted = usage;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    for (std::size_t i = std::min(node_capacity, sorted.size()); i < sorted.size(); ++i)
      bound += sorted[i];
  }
  return bound;
}

//! Lower bound on network copies given the remote-pair bound.
inline double inter_node_copies_lower_bound(std::uint64_t remote_pairs, std::size_t top_k, bool hierarchical,
                                            std::size_t slots_per_rank) {
  LOCUS_REQUIRE(top_k > 0 && slots_per_rank > 0, config_error, "copies bound: zero top_k or slots");
  const std::size_t per_copy = hierarchical ? top_k : std::min(top_k, slots_per_rank);
  return static_cast<double>(remote_pairs) / static_cast<double>(per_copy);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
