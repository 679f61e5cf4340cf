#pragma once
//! @file
//! Which replica of an expert receives a token's copy: the one definition the traffic model, the
//! decode simulator, the host and CUDA layouts and the transports use, so that predicted and moved
//! bytes agree by construction.
//!
//! Rule (`locality_first`), for the copies one source rank `src` sends in one step:
//!   1. a replica on `src` itself, if any (no transfer);
//!   2. otherwise the replicas on `src`'s node, if any; otherwise all replicas;
//!   3. among those m candidates (in rank order), the one `src` has sent the fewest copies of this
//!      expert so far in the step; ties go to the first in rank order counted from candidate
//!      `src mod m`.
//! Step 3 is round robin: the n-th balanced copy (in token order) of an expert goes to candidate
//! (src + n) mod m. Each source balances on its own, as each rank builds its own layout (a prefix
//! count per expert, which parallelises and runs on a GPU deterministically); starting each source
//! at its own candidate spreads the first copies of many sources over the replicas, as a decode
//! step's few tokens per rank need. The split is in two parts: `replica_candidates` (per source,
//! on the host; lists the candidates already rotated) and `choose_replica` (per copy, host or
//! device).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Per expert, for source `src`: the fixed replica (the only one, one on `src` itself, or the only
//! candidate; -1 if none) or the candidates the rule balances over (node-local replicas if any,
//! else all; in rank order rotated to start at candidate `src mod m`), as indices into the map's
//! CSR replica array (`expert_map_view::replicas`).
template <class Topology>
void replica_candidates(const expert_map& map, const Topology& topo, std::size_t src, std::vector<std::int32_t>& fixed,
                        std::vector<std::int32_t>& cand_offsets, std::vector<std::int32_t>& cands) {
  const expert_map_view v = map.view();
  const std::size_t experts = map.experts();
  const std::size_t src_node = topo.node_of(src);
  fixed.assign(experts, -1);
  cand_offsets.assign(experts + 1, 0);
  cands.clear();
  for (std::size_t e = 0; e < experts; ++e) {
    const std::int32_t first = v.replica_offsets[e], last = v.replica_offsets[e + 1];
    cand_offsets[e] = static_cast<std::int32_t>(cands.size());
    if (last - first == 1) {
      fixed[e] = first;
      continue;
    }
    bool node_local = false;
    for (std::int32_t i = first; i < last && fixed[e] < 0; ++i) {
      const auto rank = static_cast<std::size_t>(v.replicas[i].rank);
      if (rank == src) fixed[e] = i;
      node_local |= topo.node_of(rank) == src_node;
    }
    if (fixed[e] >= 0) continue;
    for (std::int32_t i = first; i < last; ++i)
      if (!node_local || topo.node_of(static_cast<std::size_t>(v.replicas[i].rank)) == src_node) cands.push_back(i);
    const std::size_t m = cands.size() - static_cast<std::size_t>(cand_offsets[e]);
    if (m == 1) {
      fixed[e] = cands.back(); // one candidate: no balancing state needed
      cands.pop_back();
      continue;
    }
    const auto begin = cands.begin() + cand_offsets[e];
    std::rotate(begin, begin + static_cast<std::ptrdiff_t>(src % m), cands.end());
  }
  cand_offsets[experts] = static_cast<std::int32_t>(cands.size());
}

//! Replica of the `nth` balanced copy of expert `e` from one source (round robin over its
//! candidates), or its fixed replica; the tables come from replica_candidates.
LOCUS_HOST_DEVICE std::int32_t choose_replica(const std::int32_t* fixed, const std::int32_t* cand_offsets,
                                              const std::int32_t* cands, std::int32_t e, std::int32_t nth) {
  const std::int32_t f = fixed[e];
  if (f >= 0) return f;
  const std::int32_t m = cand_offsets[e + 1] - cand_offsets[e];
  return cands[cand_offsets[e] + nth % m];
}

//! Stateful replica chooser for one layer and one step, copies from any sources in any order
//! (each source balances its own copies). Call reset() between steps.
template <class Topology>
class locality_first_selector {
  static_assert(any_topology<Topology>, "locus::placement::locality_first_selector needs a locus::topology");

public:
  locality_first_selector(const expert_map& map, const Topology& topo) : map_(&map), topo_(topo) {
    LOCUS_REQUIRE(map.ranks() == topo.ranks(), config_error, "replica selection: the expert map has ", map.ranks(),
                  " ranks but the topology has ", topo.ranks());
    view_ = map.view();
    copies_.assign(static_cast<std::size_t>(view_.replica_offsets[view_.experts]), 0);
    sources_.resize(topo.ranks());
  }

  //! Forgets the copies counted so far (a new step or micro-batch).
  void reset() {
    std::fill(copies_.begin(), copies_.end(), 0u);
    for (auto& s : sources_)
      std::fill(s.nth.begin(), s.nth.end(), 0);
  }

  //! The slot receiving the copy of a token on rank `src` bound for expert `e`; counts the copy.
  //! @throws locus::invalid_input_error when `e` or `src` is out of range
  slot_ref select(std::size_t src, std::size_t e) {
    LOCUS_REQUIRE(e < map_->experts(), invalid_input_error, "replica selection: expert id ", e, " out of range [0, ",
                  map_->experts(), ")");
    LOCUS_REQUIRE(src < topo_.ranks(), invalid_input_error, "replica selection: source rank ", src,
                  " out of range [0, ", topo_.ranks(), ")");
    return view_.replicas[choose(src, e)];
  }

  //! Like select(), returning the replica's index in the map's CSR replica array (no range checks).
  std::size_t select_index(std::size_t src, std::size_t e) { return choose(src, e); }

  //! Copies received so far by each replica (CSR order of expert_map_view).
  const std::vector<std::uint32_t>& replica_copies() const noexcept { return copies_; }

private:
  // A source's candidate tables, built on its first copy, and its balanced copies per expert.
  struct source {
    std::vector<std::int32_t> fixed, cand_offsets, cands, nth;
  };

  std::size_t choose(std::size_t src, std::size_t e) {
    source& s = sources_[src];
    if (s.fixed.empty()) {
      replica_candidates(*map_, topo_, src, s.fixed, s.cand_offsets, s.cands);
      s.nth.assign(map_->experts(), 0);
    }
    const auto ei = static_cast<std::int32_t>(e);
    const auto best =
        static_cast<std::size_t>(choose_replica(s.fixed.data(), s.cand_offsets.data(), s.cands.data(), ei, s.nth[e]));
    if (s.fixed[e] < 0) ++s.nth[e];
    ++copies_[best];
    return best;
  }

  const expert_map* map_;
  Topology topo_;
  expert_map_view view_;
  std::vector<std::uint32_t> copies_;
  std::vector<source> sources_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
