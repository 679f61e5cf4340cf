#pragma once
// The locality rules' replica choice written from their description (transport/replica_selection.hpp's
// file comment) with sets and maps, for tests of the layouts and the traffic model: per source the
// candidate tables of replica_candidates (tested on its own), then per token:
//  1. a copy with a fixed replica goes there;
//  2. a balanced copy joins a candidate on a rank a fixed copy of its token goes to, else (a
//     node-deduplicating transport) one on a node other than the source's that a fixed copy reaches;
//  3. any other copy takes its expert's candidates in turn (the n-th such copy of the expert from
//     this source in the step takes candidate n mod m).
#include <cstddef>
#include <cstdint>
#include <locus/core/expert_map.hpp>
#include <locus/core/topology.hpp>
#include <locus/core/transport_kind.hpp>
#include <locus/transport/replica_selection.hpp>
#include <map>
#include <set>
#include <span>
#include <utility>
#include <vector>

namespace locus_test {

class replica_reference {
public:
  replica_reference(const locus::expert_map& map, const locus::dynamic_topology& topo, locus::transport_kind kind,
                    const locus::transport::replica_policy& policy = {})
      : map_(map), topo_(topo), node_(kind == locus::transport_kind::hierarchical), policy_(policy) {}

  //! Replica indices (the map's CSR order) of one token's copies from `src`, in choice order.
  template <class Id>
  std::vector<std::int32_t> token(std::size_t src, std::span<const Id> ids) {
    const tables& tb = tables_of(src);
    std::vector<std::int32_t> out(ids.size(), -1);
    std::set<std::int32_t> ranks, nodes;
    for (std::size_t j = 0; j < ids.size(); ++j) {
      const std::int32_t f = tb.fixed[static_cast<std::size_t>(ids[j])];
      if (f < 0) continue;
      out[j] = f;
      ranks.insert(rank(f));
      nodes.insert(node(rank(f)));
    }
    const auto own_node = static_cast<std::int32_t>(topo_.node_of(src));
    for (std::size_t j = 0; j < ids.size(); ++j) {
      if (out[j] >= 0) continue;
      const auto e = static_cast<std::size_t>(ids[j]);
      const std::vector<std::int32_t> cands(tb.cands.begin() + tb.offsets[e], tb.cands.begin() + tb.offsets[e + 1]);
      for (const std::int32_t c : cands)
        if (out[j] < 0 && ranks.count(rank(c))) out[j] = c;
      if (node_)
        for (const std::int32_t c : cands)
          if (out[j] < 0 && node(rank(c)) != own_node && nodes.count(node(rank(c)))) out[j] = c;
      if (out[j] < 0) out[j] = cands[static_cast<std::size_t>(turn_[{src, e}]++) % cands.size()];
    }
    return out;
  }

  //! A new step: every round robin starts again.
  void reset() { turn_.clear(); }

private:
  struct tables {
    std::vector<std::int32_t> fixed, offsets, cands;
  };

  const tables& tables_of(std::size_t src) {
    auto it = tables_.find(src);
    if (it != tables_.end()) return it->second;
    tables t;
    locus::transport::replica_candidates(map_, topo_, src, t.fixed, t.offsets, t.cands, policy_);
    return tables_.emplace(src, std::move(t)).first->second;
  }
  std::int32_t rank(std::int32_t replica) const { return map_.view().replicas[replica].rank; }
  std::int32_t node(std::int32_t r) const {
    return static_cast<std::int32_t>(topo_.node_of(static_cast<std::size_t>(r)));
  }

  const locus::expert_map& map_;
  locus::dynamic_topology topo_;
  bool node_;
  locus::transport::replica_policy policy_;
  std::map<std::size_t, tables> tables_;
  std::map<std::pair<std::size_t, std::size_t>, int> turn_;
};

} // namespace locus_test
