#pragma once
//! @file
//! `activation_usage`: the placement of the published activation-aware method. With the usage
//! U[node, expert] = decode tokens that the request clusters mapped to each node send to each
//! expert (`plan_input::node_load`, from grouper::workload_model::node_load()), each expert is
//! placed once, greedily by usage: (node, expert) pairs in decreasing usage, the expert going to
//! the node if it is not placed yet and the node has a free slot, under equal slots per GPU.
//! Redundant slots, when there are any, take replicas of the experts each node uses most among
//! those it does not host. Inside a node, the slots are packed onto GPUs balancing expected load.
//!
//! The helpers in detail::activation (expected replica loads, balanced packing onto a node's GPUs,
//! building the slot table) are shared with the locality planner.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/policy.hpp>
#include <locus/placement/plan_input.hpp>
#include <numeric>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

namespace detail::activation {

//! Node-level layout of one layer: the experts each node hosts (each at most once per node).
struct node_layout {
  std::vector<std::vector<std::uint32_t>> hosted; //!< per node, in the order they were added
  std::vector<std::int32_t> primary;              //!< per expert: node of its first copy, -1 if none

  node_layout(std::size_t nodes, std::size_t experts) : hosted(nodes), primary(experts, -1) {}

  bool hosts(std::size_t node, std::size_t e) const {
    for (auto x : hosted[node])
      if (x == e) return true;
    return false;
  }
  void add(std::size_t node, std::size_t e) {
    hosted[node].push_back(static_cast<std::uint32_t>(e));
    if (primary[e] < 0) primary[e] = static_cast<std::int32_t>(node);
  }
};

//! Expected tokens each hosted copy receives, aligned with `layout.hosted[n]`: tokens from a node
//! that hosts the expert stay there (the replica selector prefers the local copy); tokens from
//! other nodes spread evenly over every copy (it balances remote copies).
inline std::vector<std::vector<double>> copy_loads(const node_layout& layout, const std::vector<std::vector<double>>& u,
                                                   std::size_t experts) {
  const std::size_t nodes = layout.hosted.size();
  std::vector<std::vector<std::uint32_t>> hosts(experts);
  for (std::size_t n = 0; n < nodes; ++n)
    for (auto e : layout.hosted[n])
      hosts[e].push_back(static_cast<std::uint32_t>(n));
  // remote[e]: tokens of e from nodes without a copy, shared by every copy.
  std::vector<double> share(experts, 0.0);
  for (std::size_t e = 0; e < experts; ++e) {
    if (hosts[e].empty()) continue;
    double remote = 0;
    for (std::size_t n = 0; n < nodes; ++n)
      if (std::find(hosts[e].begin(), hosts[e].end(), n) == hosts[e].end()) remote += u[n][e];
    share[e] = remote / static_cast<double>(hosts[e].size());
  }
  std::vector<std::vector<double>> out(nodes);
  for (std::size_t n = 0; n < nodes; ++n) {
    out[n].reserve(layout.hosted[n].size());
    for (auto e : layout.hosted[n])
      out[n].push_back(u[n][e] + share[e]);
  }
  return out;
}

//! Balanced packing of `loads.size()` items onto `gpus` bins of at most `per_gpu` items:
//! heaviest first into the lightest bin with room (lower bin on ties), then swaps and moves that
//! lower the heavier of the two bins involved, until none helps. Returns each item's bin.
inline std::vector<std::size_t> pack_balanced(const std::vector<double>& loads, std::size_t gpus, std::size_t per_gpu) {
  const std::size_t m = loads.size();
  LOCUS_REQUIRE(m <= gpus * per_gpu, config_error, "placement: ", m, " copies do not fit ", gpus, " GPUs × ", per_gpu,
                " slots");
  std::vector<std::size_t> order(m), bin(m, 0), count(gpus, 0);
  std::vector<double> load(gpus, 0.0);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return loads[a] > loads[b]; });
  for (const std::size_t i : order) {
    std::size_t best = gpus;
    for (std::size_t g = 0; g < gpus; ++g)
      if (count[g] < per_gpu && (best == gpus || load[g] < load[best])) best = g;
    bin[i] = best;
    ++count[best];
    load[best] += loads[i];
  }
  if (gpus == 1) return bin;
  for (std::size_t round = 0; round < 4 * m + 16; ++round) {
    const auto hi = static_cast<std::size_t>(std::max_element(load.begin(), load.end()) - load.begin());
    double best_peak = load[hi];
    std::size_t best_i = m, best_j = m, best_g = gpus;
    for (std::size_t i = 0; i < m; ++i) {
      if (bin[i] != hi) continue;
      for (std::size_t g = 0; g < gpus; ++g) {
        if (g == hi) continue;
        if (count[g] < per_gpu) { // move
          const double peak = std::max(load[hi] - loads[i], load[g] + loads[i]);
          if (peak < best_peak - 1e-9) {
            best_peak = peak;
            best_i = i;
            best_j = m;
            best_g = g;
          }
        }
        for (std::size_t j = 0; j < m; ++j) { // swap
          if (bin[j] != g) continue;
          const double d = loads[i] - loads[j];
          if (d <= 0) continue;
          const double peak = std::max(load[hi] - d, load[g] + d);
          if (peak < best_peak - 1e-9) {
            best_peak = peak;
            best_i = i;
            best_j = j;
            best_g = g;
          }
        }
      }
    }
    if (best_i == m) break;
    if (best_j == m) {
      load[hi] -= loads[best_i];
      load[best_g] += loads[best_i];
      --count[hi];
      ++count[best_g];
      bin[best_i] = best_g;
    } else {
      const double d = loads[best_i] - loads[best_j];
      load[hi] -= d;
      load[best_g] += d;
      bin[best_i] = best_g;
      bin[best_j] = hi;
    }
  }
  return bin;
}

//! The slot table of one layer: each node's copies packed onto its GPUs by expected load.
inline expert_map build_map(const node_layout& layout, const std::vector<std::vector<double>>& u,
                            const plan_input& in) {
  const std::size_t gpus = in.topology.gpus_per_node(), spr = in.slots_per_rank;
  const auto loads = copy_loads(layout, u, in.experts);
  std::vector<expert_id> table(in.slots(), empty_slot);
  for (std::size_t n = 0; n < layout.hosted.size(); ++n) {
    const auto bin = pack_balanced(loads[n], gpus, spr);
    std::vector<std::size_t> fill(gpus, 0);
    // Slots in hosted order inside each GPU: deterministic.
    for (std::size_t i = 0; i < bin.size(); ++i) {
      const std::size_t rank = n * gpus + bin[i];
      table[rank * spr + fill[bin[i]]++] = static_cast<expert_id>(layout.hosted[n][i]);
    }
  }
  return expert_map(in.experts, in.ranks(), spr, std::move(table));
}

//! Slots per node for first copies (equal per GPU) and the node's redundant slots.
struct node_budget {
  std::size_t primary_per_node = 0, redundant_per_node = 0;
};
inline node_budget budget(const plan_input& in) {
  const std::size_t gpus = in.topology.gpus_per_node();
  const std::size_t base = (in.experts + in.ranks() - 1) / in.ranks();
  return {base * gpus, (in.slots_per_rank - base) * gpus};
}

//! Node-usage table of layer `l`, or a clear error when the input has none.
inline const std::vector<std::vector<double>>& usage_of(const plan_input& in, std::size_t l, const char* planner) {
  LOCUS_REQUIRE(!in.node_load.empty(), config_error, planner,
                ": needs per-node usage (plan_input::node_load); fit a grouper::workload_model on a trace and use "
                "its node_load()");
  return in.node_load[l];
}

//! Adds, per node, replicas of the experts the node uses most among those it does not host, into
//! its redundant slots (highest usage first, lower expert on ties).
inline void add_usage_replicas(node_layout& layout, const std::vector<std::vector<double>>& u,
                               std::size_t redundant_per_node) {
  const std::size_t nodes = layout.hosted.size(), experts = layout.primary.size();
  for (std::size_t n = 0; n < nodes; ++n) {
    std::vector<std::size_t> cand;
    for (std::size_t e = 0; e < experts; ++e)
      if (!layout.hosts(n, e)) cand.push_back(e);
    std::stable_sort(cand.begin(), cand.end(), [&](std::size_t a, std::size_t b) { return u[n][a] > u[n][b]; });
    for (std::size_t i = 0; i < std::min(redundant_per_node, cand.size()); ++i)
      layout.add(n, cand[i]);
  }
}

} // namespace detail::activation

//! The published usage-greedy placement (see the file comment).
struct activation_usage {
  using policy_concept = placement_tag;
  static constexpr const char* name = "activation_usage";

  //! @throws locus::config_error when `in` has no node_load or the slots cannot host the experts
  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    namespace da = detail::activation;
    const std::size_t nodes = in.topology.nodes(), experts = in.experts;
    const da::node_budget b = da::budget(in);
    std::vector<expert_map> out;
    out.reserve(in.layers());
    for (std::size_t l = 0; l < in.layers(); ++l) {
      const auto& u = da::usage_of(in, l, name);
      da::node_layout layout(nodes, experts);
      std::vector<std::pair<std::size_t, std::size_t>> pairs; // (node, expert)
      pairs.reserve(nodes * experts);
      for (std::size_t e = 0; e < experts; ++e)
        for (std::size_t n = 0; n < nodes; ++n)
          pairs.emplace_back(n, e);
      std::stable_sort(pairs.begin(), pairs.end(),
                       [&](const auto& a, const auto& x) { return u[a.first][a.second] > u[x.first][x.second]; });
      for (const auto& [n, e] : pairs)
        if (layout.primary[e] < 0 && layout.hosted[n].size() < b.primary_per_node) layout.add(n, e);
      // Every expert is placed by now: the pairs cover all (node, expert) and the nodes have
      // room for all experts.
      da::add_usage_replicas(layout, u, b.redundant_per_node);
      out.push_back(da::build_map(layout, u, in));
    }
    return out;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
