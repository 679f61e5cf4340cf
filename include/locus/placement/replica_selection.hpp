#pragma once
//! @file
//! Which replica of an expert receives a token's copy. Shared by the traffic model, the layout
//! and the transports, so that predicted and moved bytes agree by construction.
//!
//! Rule (`locality_first`), for a copy from rank `src` to expert `e`:
//!   1. a replica on `src` itself, if any (no transfer);
//!   2. otherwise the replicas on `src`'s node, if any; otherwise all replicas;
//!   3. among those candidates, the replica that has received the fewest copies so far in the
//!      current step; ties go to the lower rank (replicas are kept in rank order).
//! Counting per replica (not per rank) splits a hot expert's remote traffic evenly across its
//! replicas, which is what replication is for, and keeps the choice for one expert independent of
//! every other expert, so a device implementation can run experts in parallel.

#include <locus/core/expert_map.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Stateful replica chooser for one layer and one step. Call reset() between steps.
template <class Topology>
class locality_first_selector {
  static_assert(any_topology<Topology>, "locus::placement::locality_first_selector needs a locus::topology");

public:
  locality_first_selector(const expert_map& map, const Topology& topo) : map_(&map), topo_(topo) {
    LOCUS_REQUIRE(map.ranks() == topo.ranks(), config_error, "replica selection: the expert map has ", map.ranks(),
                  " ranks but the topology has ", topo.ranks());
    view_ = map.view();
    copies_.assign(static_cast<std::size_t>(view_.replica_offsets[view_.experts]), 0);
  }

  //! Forgets the copies counted so far (a new step or micro-batch).
  void reset() { std::fill(copies_.begin(), copies_.end(), 0u); }

  //! The slot receiving the copy of a token on rank `src` bound for expert `e`; counts the copy.
  //! @throws locus::invalid_input_error when `e` or `src` is out of range
  slot_ref select(std::size_t src, std::size_t e) {
    LOCUS_REQUIRE(e < map_->experts(), invalid_input_error, "replica selection: expert id ", e,
                  " out of range [0, ", map_->experts(), ")");
    LOCUS_REQUIRE(src < topo_.ranks(), invalid_input_error, "replica selection: source rank ", src,
                  " out of range [0, ", topo_.ranks(), ")");
    return view_.replicas[choose(src, e)];
  }

  //! Like select(), returning the replica's index in the map's CSR replica array.
  std::size_t select_index(std::size_t src, std::size_t e) { return choose(src, e); }

  //! Copies received so far by each replica (CSR order of expert_map_view).
  const std::vector<std::uint32_t>& replica_copies() const noexcept { return copies_; }

private:
  std::size_t choose(std::size_t src, std::size_t e) {
    const auto first = static_cast<std::size_t>(view_.replica_offsets[e]);
    const auto last = static_cast<std::size_t>(view_.replica_offsets[e + 1]);
    std::size_t best = last;
    if (last - first == 1) {
      best = first; // the common case: one copy of the expert
    } else {
      const std::size_t node = topo_.node_of(src);
      bool node_local = false;
      for (std::size_t i = first; i < last; ++i) {
        const auto rank = static_cast<std::size_t>(view_.replicas[i].rank);
        if (rank == src) {
          best = i;
          break;
        }
        node_local |= topo_.node_of(rank) == node;
      }
      if (best == last) {
        for (std::size_t i = first; i < last; ++i) {
          if (node_local && topo_.node_of(static_cast<std::size_t>(view_.replicas[i].rank)) != node) continue;
          if (best == last || copies_[i] < copies_[best]) best = i;
        }
      }
    }
    ++copies_[best];
    return best;
  }

  const expert_map* map_;
  Topology topo_;
  expert_map_view view_;
  std::vector<std::uint32_t> copies_;
};

} // namespace locus::LOCUS_ABI_NAMESPACE::placement
