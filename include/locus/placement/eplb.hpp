#pragma once
//! @file
//! `rebalance_experts`: a C++ re-implementation, written from its published description and
//! interface, of DeepSeek's expert-parallel load balancer (EPLB, github.com/deepseek-ai/EPLB),
//! with the same arguments, the same three results and the same tie-breaking, so that its
//! published example and any other input come out slot for slot as the reference does. Per layer,
//! with load w[expert] (converted to 32-bit floats, as the reference does):
//!   1. pack the expert groups (contiguous blocks of experts) onto nodes: visit groups by
//!      descending load, each into the node with the smallest load so far among nodes that still
//!      have room (equal group count per node; first such node on ties);
//!   2. inside each node, replicate: while redundant slots remain, add a replica to the expert
//!      with the largest load per replica (first on ties);
//!   3. pack the node's replicas (each carrying load / replica count) onto its GPUs with the same
//!      balanced packing (equal replicas per GPU).
//! When the group count is not a multiple of the node count, the same runs with one group and one
//! node (the "global" policy). The result balances GPU load; it does not consider locality.
//!
//! Equal loads: the reference orders items with PyTorch's default (unstable) CPU sort, which is the
//! standard library's `std::sort` over (load, index) pairs compared by load alone; the same call
//! here visits equal loads in the same order. Sums and ratios are taken in `float`, as there.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <locus/core/cancel.hpp>
#include <locus/core/policy.hpp>
#include <locus/placement/plan_input.hpp>
#include <numeric>
#include <queue>
#include <span>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Most physical slots `rebalance_experts` plans over all layers (DeepSeek-V3: 58 layers × 288).
inline constexpr std::size_t max_eplb_slots = std::size_t{1} << 24;

//! The three results of `rebalance_experts`, row-major, as the reference returns them.
struct eplb_result {
  std::size_t layers = 0, experts = 0, replicas = 0;
  //! Largest replica count of any expert in any layer: the last extent of `logical_to_physical`.
  std::size_t max_replicas = 0;
  //! `[layers][replicas]`: the logical expert in each physical slot (slots numbered GPU-major).
  std::vector<std::int64_t> physical_to_logical;
  //! `[layers][experts][max_replicas]`: the physical slots of each expert in replica order
  //! (the original first), padded with -1.
  std::vector<std::int64_t> logical_to_physical;
  //! `[layers][experts]`: the replica count of each expert.
  std::vector<std::int64_t> logical_count;
};

namespace detail::eplb {

//! Item i goes to pack `pack[i]` at position `position[i]`.
struct packing {
  std::vector<std::size_t> pack, position;
};

//! Items by descending weight, equal weights in the order PyTorch's CPU sort leaves them.
inline std::vector<std::size_t> descending_order(std::span<const float> w) {
  std::vector<std::pair<float, std::size_t>> keyed(w.size());
  for (std::size_t i = 0; i < w.size(); ++i)
    keyed[i] = {w[i], i};
  // Unstable on purpose: the reference's order of equal loads is this call's (see the file comment).
  std::sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::size_t> order(w.size());
  for (std::size_t i = 0; i < w.size(); ++i)
    order[i] = keyed[i].second;
  return order;
}

//! Balanced packing of `w.size()` items into `packs` packs of equal item count.
inline packing balanced_packing(std::span<const float> w, std::size_t packs) {
  const std::size_t n = w.size(), per_pack = n / packs;
  packing out{std::vector<std::size_t>(n), std::vector<std::size_t>(n, 0)};
  if (per_pack == 1) {
    std::iota(out.pack.begin(), out.pack.end(), std::size_t{0});
    return out;
  }
  // The least loaded pack with room, the lowest index among equal loads (the reference's scan), from
  // a heap: a scan of every pack per item was quadratic in the GPUs (seconds at 8,192).
  using entry = std::pair<float, std::size_t>; // (load, pack)
  std::priority_queue<entry, std::vector<entry>, std::greater<>> open;
  for (std::size_t p = 0; p < packs; ++p)
    open.push({0.0f, p});
  std::vector<std::size_t> pack_items(packs, 0);
  for (const std::size_t item : descending_order(w)) {
    const auto [load, best] = open.top();
    open.pop();
    out.pack[item] = best;
    out.position[item] = pack_items[best]++;
    if (pack_items[best] < per_pack) open.push({load + w[item], best});
  }
  return out;
}

//! Replication of `w.size()` logical experts into `physical` slots: the logical expert and replica
//! rank of each slot, and the replica count of each logical expert.
struct replication {
  std::vector<std::size_t> physical_to_logical, rank, count;
};

inline replication replicate(std::span<const float> w, std::size_t physical) {
  const std::size_t n = w.size();
  replication out{std::vector<std::size_t>(physical), std::vector<std::size_t>(physical, 0),
                  std::vector<std::size_t>(n, 1)};
  std::iota(out.physical_to_logical.begin(), out.physical_to_logical.begin() + static_cast<std::ptrdiff_t>(n),
            std::size_t{0});
  // The expert of the largest load per replica, the lowest index among equal ones (the reference's
  // argmax), from a heap: a scan per slot was quadratic (minutes for 2^26 slots).
  const auto after = [](const std::pair<float, std::size_t>& a, const std::pair<float, std::size_t>& b) {
    return a.first < b.first || (a.first == b.first && a.second > b.second);
  };
  std::priority_queue<std::pair<float, std::size_t>, std::vector<std::pair<float, std::size_t>>, decltype(after)> top(
      after);
  for (std::size_t e = 0; e < n; ++e)
    top.push({w[e], e});
  for (std::size_t p = n; p < physical; ++p) {
    const std::size_t best = top.top().second;
    top.pop();
    out.physical_to_logical[p] = best;
    out.rank[p] = out.count[best]++;
    top.push({w[best] / static_cast<float>(out.count[best]), best});
  }
  return out;
}

//! One layer: writes the layer's rows of `out` (slot → logical expert, replica ranks, counts).
//! `physical` slots are spread evenly over `gpus` GPUs on `nodes` nodes; `groups` expert groups.
inline void rebalance_layer(std::span<const float> w, std::size_t physical, std::size_t groups, std::size_t nodes,
                            std::size_t gpus, std::span<std::int64_t> slot_to_log, std::span<std::size_t> slot_rank,
                            std::span<std::int64_t> log_count) {
  const std::size_t experts = w.size(), group_size = experts / groups, groups_per_node = groups / nodes;
  const std::size_t per_gpu = physical / gpus, experts_per_node = experts / nodes, physical_per_node = physical / nodes;
  const std::size_t gpus_per_node = gpus / nodes;

  // 1. Groups onto nodes. "Middle" ids (mlog) number experts node by node.
  std::vector<float> group_load(groups, 0.0f);
  for (std::size_t e = 0; e < experts; ++e)
    group_load[e / group_size] += w[e];
  const packing group_pack = balanced_packing(group_load, nodes);
  std::vector<std::size_t> mlog_to_log(experts);
  for (std::size_t e = 0; e < experts; ++e) {
    const std::size_t g = e / group_size;
    const std::size_t mlog =
        (group_pack.pack[g] * groups_per_node + group_pack.position[g]) * group_size + e % group_size;
    mlog_to_log[mlog] = e;
  }

  std::vector<float> node_load(experts_per_node), replica_load(physical_per_node);
  for (std::size_t node = 0; node < nodes; ++node) {
    // 2. Replicas inside the node.
    for (std::size_t m = 0; m < experts_per_node; ++m)
      node_load[m] = w[mlog_to_log[node * experts_per_node + m]];
    const replication rep = replicate(node_load, physical_per_node);
    for (std::size_t m = 0; m < experts_per_node; ++m)
      log_count[mlog_to_log[node * experts_per_node + m]] = static_cast<std::int64_t>(rep.count[m]);
    // 3. Replicas onto the node's GPUs, each carrying its share of the expert's load.
    for (std::size_t p = 0; p < physical_per_node; ++p) {
      const std::size_t m = rep.physical_to_logical[p];
      replica_load[p] = node_load[m] / static_cast<float>(rep.count[m]);
    }
    const packing gpu_pack = balanced_packing(replica_load, gpus_per_node);
    for (std::size_t p = 0; p < physical_per_node; ++p) {
      const std::size_t slot = node * physical_per_node + gpu_pack.pack[p] * per_gpu + gpu_pack.position[p];
      slot_to_log[slot] = static_cast<std::int64_t>(mlog_to_log[node * experts_per_node + rep.physical_to_logical[p]]);
      slot_rank[slot] = rep.rank[p];
    }
  }
}

} // namespace detail::eplb

//! DeepSeek's EPLB entry point, `rebalance_experts(weight, num_replicas, num_groups, num_nodes,
//! num_gpus)`: `weight` is `[layers][experts]` row-major (any non-negative load scale). Uses the
//! hierarchical policy when `num_groups` is a multiple of `num_nodes` and the global policy (one
//! group, one node) otherwise; like the reference, the global policy reads neither `num_groups`
//! nor `num_nodes` further.
//! @throws locus::config_error when the sizes do not divide as the chosen policy needs
//! @throws locus::invalid_input_error naming the layer and expert of a negative, NaN or infinite load
inline eplb_result rebalance_experts(std::span<const float> weight, std::size_t layers, std::size_t experts,
                                     std::size_t num_replicas, std::size_t num_groups, std::size_t num_nodes,
                                     std::size_t num_gpus) {
  LOCUS_REQUIRE(layers > 0 && experts > 0, config_error, "rebalance_experts: the load table is ", layers, " × ",
                experts, "; it needs at least one layer and one expert");
  // Divided, not multiplied: 2^32 layers × 2^32 experts wraps to 0, which an empty table matched.
  LOCUS_REQUIRE(weight.size() % experts == 0 && weight.size() / experts == layers, invalid_input_error,
                "rebalance_experts: ", weight.size(), " load values for ", layers, " layers × ", experts, " experts");
  LOCUS_REQUIRE(num_groups > 0 && num_nodes > 0 && num_gpus > 0, config_error,
                "rebalance_experts: num_groups, num_nodes and num_gpus must be positive (got ", num_groups, ", ",
                num_nodes, ", ", num_gpus, ")");
  const bool hierarchical = num_groups % num_nodes == 0;
  const std::size_t groups = hierarchical ? num_groups : 1, nodes = hierarchical ? num_nodes : 1;
  LOCUS_REQUIRE(experts % groups == 0, config_error, "rebalance_experts: ", experts, " experts do not split into ",
                groups, " equal groups");
  LOCUS_REQUIRE(num_gpus % nodes == 0, config_error, "rebalance_experts: ", num_gpus, " GPUs do not split evenly over ",
                nodes, " nodes");
  LOCUS_REQUIRE(num_replicas % num_gpus == 0, config_error, "rebalance_experts: ", num_replicas,
                " physical experts do not split evenly over ", num_gpus, " GPUs");
  LOCUS_REQUIRE(num_replicas >= experts, config_error, "rebalance_experts: ", num_replicas,
                " physical experts cannot host ", experts, " logical experts");
  // Bounds before the tables are sized from them: a mistyped count must be refused, not allocated.
  // (The reference accepts several copies of an expert on one GPU, so the bound is per expert.)
  LOCUS_REQUIRE(num_gpus <= max_topology_ranks, config_error, "rebalance_experts: ", num_gpus, " GPUs exceed ",
                max_topology_ranks);
  LOCUS_REQUIRE(num_replicas / experts <= max_topology_ranks, config_error, "rebalance_experts: ", num_replicas,
                " physical experts are more than ", max_topology_ranks, " copies of each of the ", experts, " experts");
  // The results hold layers × num_replicas slots (8 bytes each, and as much again while planned):
  // a count far past any deployment (2^31 slots: 16 GiB from a table of one layer) is refused.
  LOCUS_REQUIRE(num_replicas <= max_eplb_slots / layers, config_error, "rebalance_experts: ", layers, " layers × ",
                num_replicas, " physical experts exceed ", max_eplb_slots, " slots in all");
  for (std::size_t i = 0; i < weight.size(); ++i)
    LOCUS_REQUIRE(std::isfinite(weight[i]) && weight[i] >= 0, invalid_input_error, "rebalance_experts: layer ",
                  i / experts, " expert ", i % experts, " has load ", weight[i], " (must be finite and non-negative)");

  eplb_result out;
  out.layers = layers;
  out.experts = experts;
  out.replicas = num_replicas;
  out.physical_to_logical.resize(layers * num_replicas);
  out.logical_count.resize(layers * experts);
  std::vector<std::size_t> rank(layers * num_replicas);
  for (std::size_t l = 0; l < layers; ++l) {
    throw_if_cancelled();
    detail::eplb::rebalance_layer(weight.subspan(l * experts, experts), num_replicas, groups, nodes, num_gpus,
                                  std::span(out.physical_to_logical).subspan(l * num_replicas, num_replicas),
                                  std::span(rank).subspan(l * num_replicas, num_replicas),
                                  std::span(out.logical_count).subspan(l * experts, experts));
  }
  out.max_replicas = static_cast<std::size_t>(*std::max_element(out.logical_count.begin(), out.logical_count.end()));
  out.logical_to_physical.assign(layers * experts * out.max_replicas, -1);
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t p = 0; p < num_replicas; ++p) {
      const auto e = static_cast<std::size_t>(out.physical_to_logical[l * num_replicas + p]);
      out.logical_to_physical[(l * experts + e) * out.max_replicas + rank[l * num_replicas + p]] =
          static_cast<std::int64_t>(p);
    }
  return out;
}

//! DeepSeek's EPLB as a planner. Uses every slot (`slots_per_rank × ranks - experts` replicas per
//! layer); nodes and GPUs come from the topology.
struct eplb {
  using policy_concept = placement_tag;
  static constexpr const char* name = "eplb";

  //! Expert groups (contiguous blocks of experts): 8 for DeepSeek-V3; 1 for models without
  //! group-limited routing, which selects the global policy on multi-node deployments.
  std::size_t groups = 1;

  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    std::vector<float> weight;
    weight.reserve(in.layers() * in.experts);
    for (const auto& layer : in.load) {
      // Loads are on any scale, but EPLB adds them in float: a layer whose loads would round to
      // infinity (1e300 is a valid load) or to zero is scaled to a largest load of 1, ratios kept.
      const double max = *std::max_element(layer.begin(), layer.end());
      const bool rescale = max > 0 && (max * static_cast<double>(in.experts) > std::numeric_limits<float>::max() ||
                                       max < std::numeric_limits<float>::min());
      for (const double x : layer)
        weight.push_back(static_cast<float>(rescale ? x / max : x));
    }
    const auto r =
        rebalance_experts(weight, in.layers(), in.experts, in.slots(), groups, in.topology.nodes(), in.ranks());
    std::vector<expert_map> out;
    out.reserve(in.layers());
    for (std::size_t l = 0; l < in.layers(); ++l) {
      const auto row = std::span(r.physical_to_logical).subspan(l * r.replicas, r.replicas);
      out.emplace_back(in.experts, in.ranks(), in.slots_per_rank, std::vector<expert_id>(row.begin(), row.end()));
    }
    return out;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
