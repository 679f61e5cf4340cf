#pragma once
//! @file
//! `eplb`: a C++ re-implementation, written from its published description, of DeepSeek's
//! expert-parallel load balancer (EPLB). Per layer, with load w[expert]:
//!   1. pack the expert groups (contiguous blocks of experts) onto nodes: visit groups by
//!      descending load (stable), each into the node with the smallest load so far among nodes
//!      that still have room (equal group count per node; first such node on ties);
//!   2. inside each node, replicate: while redundant slots remain, add a replica to the expert
//!      with the largest load per replica (first on ties);
//!   3. pack the node's replicas (each carrying load / replica count) onto its GPUs with the same
//!      balanced packing (equal replicas per GPU).
//! When the group count is not a multiple of the node count, the same runs with one group and one
//! node (the "global" policy). The result balances GPU load; it does not consider locality.

#include <locus/core/policy.hpp>
#include <locus/placement/plan_input.hpp>

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

namespace detail::eplb {

//! Item i goes to pack `pack[i]` at position `position[i]`.
struct packing {
  std::vector<std::size_t> pack, position;
};

//! Balanced packing of `w.size()` items into `packs` packs of equal item count.
inline packing balanced_packing(const std::vector<double>& w, std::size_t packs) {
  const std::size_t n = w.size(), per_pack = n / packs;
  packing out{std::vector<std::size_t>(n), std::vector<std::size_t>(n, 0)};
  if (per_pack == 1) {
    std::iota(out.pack.begin(), out.pack.end(), std::size_t{0});
    return out;
  }
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return w[a] > w[b]; });
  std::vector<double> pack_load(packs, 0.0);
  std::vector<std::size_t> pack_items(packs, 0);
  for (const std::size_t item : order) {
    std::size_t best = packs;
    for (std::size_t p = 0; p < packs; ++p)
      if (pack_items[p] < per_pack && (best == packs || pack_load[p] < pack_load[best])) best = p;
    out.pack[item] = best;
    out.position[item] = pack_items[best]++;
    pack_load[best] += w[item];
  }
  return out;
}

//! Replication of `w.size()` logical experts into `physical` slots: `physical_to_logical[p]` and
//! the replica count of each logical expert.
struct replication {
  std::vector<std::size_t> physical_to_logical, count;
};

inline replication replicate(const std::vector<double>& w, std::size_t physical) {
  const std::size_t n = w.size();
  replication out{std::vector<std::size_t>(physical), std::vector<std::size_t>(n, 1)};
  std::iota(out.physical_to_logical.begin(), out.physical_to_logical.begin() + static_cast<std::ptrdiff_t>(n),
            std::size_t{0});
  for (std::size_t p = n; p < physical; ++p) {
    std::size_t best = 0;
    for (std::size_t e = 1; e < n; ++e)
      if (w[e] / static_cast<double>(out.count[e]) > w[best] / static_cast<double>(out.count[best])) best = e;
    out.physical_to_logical[p] = best;
    ++out.count[best];
  }
  return out;
}

//! One layer, hierarchical policy: physical slot → logical expert for `physical` slots spread
//! evenly over `gpus` GPUs on `nodes` nodes.
inline std::vector<std::size_t> rebalance_layer(const std::vector<double>& w, std::size_t physical,
                                                std::size_t groups, std::size_t nodes, std::size_t gpus) {
  const std::size_t experts = w.size(), group_size = experts / groups, groups_per_node = groups / nodes;
  const std::size_t per_gpu = physical / gpus, experts_per_node = experts / nodes, physical_per_node = physical / nodes;
  const std::size_t gpus_per_node = gpus / nodes;

  // 1. Groups onto nodes. "Middle" ids (mlog) number experts node by node.
  std::vector<double> group_load(groups, 0.0);
  for (std::size_t e = 0; e < experts; ++e) group_load[e / group_size] += w[e];
  const packing group_pack = balanced_packing(group_load, nodes);
  std::vector<std::size_t> mlog_to_log(experts);
  for (std::size_t e = 0; e < experts; ++e) {
    const std::size_t g = e / group_size;
    const std::size_t mlog = (group_pack.pack[g] * groups_per_node + group_pack.position[g]) * group_size + e % group_size;
    mlog_to_log[mlog] = e;
  }

  std::vector<std::size_t> slot_to_log(physical);
  for (std::size_t node = 0; node < nodes; ++node) {
    // 2. Replicas inside the node.
    std::vector<double> node_load(experts_per_node);
    for (std::size_t m = 0; m < experts_per_node; ++m) node_load[m] = w[mlog_to_log[node * experts_per_node + m]];
    const replication rep = replicate(node_load, physical_per_node);
    // 3. Replicas onto the node's GPUs, each carrying its share of the expert's load.
    std::vector<double> replica_load(physical_per_node);
    for (std::size_t p = 0; p < physical_per_node; ++p) {
      const std::size_t m = rep.physical_to_logical[p];
      replica_load[p] = node_load[m] / static_cast<double>(rep.count[m]);
    }
    const packing gpu_pack = balanced_packing(replica_load, gpus_per_node);
    for (std::size_t p = 0; p < physical_per_node; ++p) {
      const std::size_t slot = node * physical_per_node + gpu_pack.pack[p] * per_gpu + gpu_pack.position[p];
      slot_to_log[slot] = mlog_to_log[node * experts_per_node + rep.physical_to_logical[p]];
    }
  }
  return slot_to_log;
}

//! Physical slot → logical expert for one layer, choosing the hierarchical policy when the group
//! count divides evenly among nodes and the global policy otherwise.
//! @throws locus::config_error when the sizes do not divide as the algorithm needs
inline std::vector<std::size_t> rebalance(const std::vector<double>& w, std::size_t physical, std::size_t groups,
                                          std::size_t nodes, std::size_t gpus) {
  const std::size_t experts = w.size();
  LOCUS_REQUIRE(groups > 0 && experts % groups == 0, config_error, "eplb: ", experts,
                " experts do not split into ", groups, " equal groups");
  LOCUS_REQUIRE(gpus % nodes == 0 && physical % gpus == 0, config_error, "eplb: ", physical,
                " physical slots do not split evenly over ", gpus, " GPUs on ", nodes, " nodes");
  LOCUS_REQUIRE(physical >= experts, config_error, "eplb: ", physical, " slots cannot host ", experts, " experts");
  if (groups % nodes == 0) {
    LOCUS_REQUIRE(physical % nodes == 0 && (physical / nodes) >= experts / nodes, config_error,
                  "eplb: slots per node cannot host the node's experts");
    return rebalance_layer(w, physical, groups, nodes, gpus);
  }
  return rebalance_layer(w, physical, 1, 1, gpus);
}

} // namespace detail::eplb

//! DeepSeek's EPLB. Uses every slot (`slots_per_rank × ranks - experts` replicas per layer).
struct eplb {
  using policy_concept = placement_tag;
  static constexpr const char* name = "eplb";

  //! Expert groups (contiguous blocks of experts): 8 for DeepSeek-V3; 1 for models without
  //! group-limited routing, which selects the global policy on multi-node deployments.
  std::size_t groups = 1;

  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    std::vector<expert_map> out;
    out.reserve(in.layers());
    for (std::size_t l = 0; l < in.layers(); ++l) {
      const auto slots = detail::eplb::rebalance(in.load[l], in.slots(), groups, in.topology.nodes(), in.ranks());
      std::vector<expert_id> table(slots.begin(), slots.end());
      out.emplace_back(in.experts, in.ranks(), in.slots_per_rank, std::move(table));
    }
    return out;
  }
};

} // namespace locus::LOCUS_ABI_NAMESPACE::placement
