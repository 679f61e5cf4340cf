#pragma once
//! @file
//! `locality`: locus's own placement. Per layer, with the node usage U[node, expert]
//! (`plan_input::node_load`) it minimises the expected (token, expert) pairs that leave their
//! node — the quantity both transports' network copies grow with: flat sends one copy per remote
//! rank and hierarchical one per remote node, and each remote pair costs at most one of either —
//! under equal slots per GPU and a node load bound, then spends redundant slots on replicas:
//!   1. balanced greedy: (node, expert) pairs by decreasing usage, the expert to the node while the
//!      node has a free first-copy slot and its load stays under (1 + balance_slack) × the mean;
//!      experts left over go, heaviest first, to the least-loaded node with a free slot;
//!   2. Kernighan–Lin style refinement: sweeps of the best improving swap (or move into a free
//!      slot) of each expert with an expert on another node, keeping node loads under the bound,
//!      until a sweep finds nothing (or `max_sweeps`);
//!   3. replicas: (node, expert) candidates by decreasing remote usage removed per slot, accepted
//!      while the node has a redundant slot and the loads of the expert's copies stay under the
//!      replica bound; a replica takes its node's tokens for the expert and a share of the remote
//!      ones (as the replica selector does);
//!   4. inside each node, copies packed onto GPUs balancing expected load (largest first, then
//!      improving moves and swaps).
//! Deterministic: every order is stable and every tie goes to the lower index.
//! plan_activation_aware then runs the token-level stage (token_refine.hpp) on these maps; there
//! step 3 is skipped (`replicas = false`) and the replicas are chosen on the exact copy cost.
//! `refine_grouping` fits the grouping to the placement in turn (the joint fit).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/policy.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <locus/placement/activation_usage.hpp>
#include <locus/placement/load_bound.hpp>
#include <locus/placement/plan_input.hpp>
#include <numeric>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Options of the locality planner.
struct locality_options {
  double balance_slack = 0.05;         //!< node load ≤ (1 + slack) × mean node load, first copies
  double replica_balance_slack = 0.03; //!< bound on a copy's node load when adding replicas
  std::size_t max_sweeps = 32;         //!< refinement sweeps at most
  bool replicas = true;                //!< fill redundant slots (false leaves them empty for add_replicas_by_tokens)
};

namespace detail::locality {

namespace da = detail::activation;

using usage_table = std::vector<std::vector<double>>;

//! First copies of one layer's experts: each expert's node, and per node the usage and experts it
//! hosts, kept together because every step that moves an expert updates all three.
struct first_copies {
  std::vector<std::int32_t> host;
  std::vector<double> load;
  std::vector<std::size_t> count;
};

//! Per expert, its usage summed over nodes: the load the expert brings to whichever node hosts it.
inline std::vector<double> expert_usage(const usage_table& u, std::size_t nodes, std::size_t experts) {
  std::vector<double> w(experts, 0.0);
  for (std::size_t n = 0; n < nodes; ++n)
    for (std::size_t e = 0; e < experts; ++e)
      w[e] += u[n][e];
  return w;
}

//! Step 1, balanced greedy: (node, expert) pairs by decreasing usage place each expert where most
//! of its tokens come from while the node has a slot and stays under `cap`; the experts left over
//! go, heaviest first, to the least-loaded node with a slot, so every expert gets one copy.
inline first_copies greedy_first_copies(const usage_table& u, const std::vector<double>& w, std::size_t nodes,
                                        std::size_t slots_per_node, double cap) {
  const std::size_t experts = w.size();
  first_copies fc{std::vector<std::int32_t>(experts, -1), std::vector<double>(nodes, 0.0),
                  std::vector<std::size_t>(nodes, 0)};
  std::vector<std::int32_t>& host = fc.host;
  std::vector<double>& load = fc.load;
  std::vector<std::size_t>& count = fc.count;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> pairs;
  pairs.reserve(nodes * experts);
  for (std::size_t e = 0; e < experts; ++e)
    for (std::size_t n = 0; n < nodes; ++n)
      pairs.emplace_back(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>(e));
  std::stable_sort(pairs.begin(), pairs.end(),
                   [&](const auto& a, const auto& x) { return u[a.first][a.second] > u[x.first][x.second]; });
  for (const auto& [n, e] : pairs) {
    if (host[e] >= 0 || count[n] >= slots_per_node || load[n] + w[e] > cap) continue;
    host[e] = static_cast<std::int32_t>(n);
    ++count[n];
    load[n] += w[e];
  }
  std::vector<std::size_t> left;
  for (std::size_t e = 0; e < experts; ++e)
    if (host[e] < 0) left.push_back(e);
  std::stable_sort(left.begin(), left.end(), [&](std::size_t a, std::size_t x) { return w[a] > w[x]; });
  for (const std::size_t e : left) {
    std::size_t best = nodes;
    for (std::size_t n = 0; n < nodes; ++n)
      if (count[n] < slots_per_node && (best == nodes || load[n] < load[best])) best = n;
    host[e] = static_cast<std::int32_t>(best);
    ++count[best];
    load[best] += w[e];
  }
  return fc;
}

//! Step 2, Kernighan–Lin style sweeps: each expert takes the best improving move into a free slot
//! or swap with an expert on another node, until a sweep finds nothing or `max_sweeps`. A change
//! is allowed when neither node ends above the larger of `cap` and the worse of the two loads
//! before it, so an over-full start never worsens.
inline void refine_first_copies(const usage_table& u, const std::vector<double>& w, std::size_t slots_per_node,
                                double cap, std::size_t max_sweeps, first_copies& fc) {
  const std::size_t nodes = fc.load.size(), experts = w.size();
  std::vector<std::int32_t>& host = fc.host;
  std::vector<double>& load = fc.load;
  std::vector<std::size_t>& count = fc.count;
  auto allowed = [&](std::size_t a, std::size_t x, double new_a, double new_x) {
    return keeps_load_bound(std::max(new_a, new_x), std::max(load[a], load[x]), cap);
  };
  for (std::size_t sweep = 0; sweep < max_sweeps; ++sweep) {
    bool improved = false;
    for (std::size_t e = 0; e < experts; ++e) {
      const auto a = static_cast<std::size_t>(host[e]);
      double best_gain = 1e-9;
      std::size_t best_f = experts, best_node = nodes;
      for (std::size_t x = 0; x < nodes; ++x) { // moves into free first-copy slots
        if (x == a || count[x] >= slots_per_node) continue;
        const double gain = u[x][e] - u[a][e];
        if (gain > best_gain && allowed(a, x, load[a] - w[e], load[x] + w[e])) {
          best_gain = gain;
          best_f = experts;
          best_node = x;
        }
      }
      for (std::size_t f = 0; f < experts; ++f) {
        const auto x = static_cast<std::size_t>(host[f]);
        if (x == a) continue;
        const double gain = u[x][e] + u[a][f] - u[a][e] - u[x][f];
        if (gain > best_gain && allowed(a, x, load[a] - w[e] + w[f], load[x] - w[f] + w[e])) {
          best_gain = gain;
          best_f = f;
          best_node = x;
        }
      }
      if (best_node == nodes) continue;
      improved = true;
      if (best_f == experts) {
        load[a] -= w[e];
        load[best_node] += w[e];
        --count[a];
        ++count[best_node];
        host[e] = static_cast<std::int32_t>(best_node);
      } else {
        load[a] += w[best_f] - w[e];
        load[best_node] += w[e] - w[best_f];
        host[best_f] = static_cast<std::int32_t>(a);
        host[e] = static_cast<std::int32_t>(best_node);
      }
    }
    if (!improved) break;
  }
}

//! Step 3, replicas: (node, expert) candidates by decreasing usage on the node, accepted while the
//! node has a free slot of its `node_slots` and the loads of the expert's copies stay under
//! `rcap`. A copy's load is its node's tokens for the expert plus an equal share of the remote
//! ones, as the replica selector spreads them.
inline void add_replicas(const usage_table& u, const std::vector<double>& w, const std::vector<std::int32_t>& host,
                         std::size_t node_slots, double rcap, da::node_layout& layout) {
  const std::size_t nodes = layout.hosted.size(), experts = w.size();
  std::vector<std::vector<std::uint32_t>> hosts(experts);
  for (std::size_t e = 0; e < experts; ++e)
    hosts[e].push_back(static_cast<std::uint32_t>(host[e]));
  auto copy_load = [&](std::size_t e, const std::vector<std::uint32_t>& hs, std::vector<double>& per_host) {
    double remote = w[e];
    for (auto h : hs)
      remote -= u[h][e];
    per_host.resize(hs.size());
    for (std::size_t i = 0; i < hs.size(); ++i)
      per_host[i] = u[hs[i]][e] + remote / static_cast<double>(hs.size());
  };
  // Node loads including the (so far single) copies.
  std::vector<double> load(nodes, 0.0);
  for (std::size_t e = 0; e < experts; ++e)
    load[static_cast<std::size_t>(host[e])] += w[e];
  std::vector<std::size_t> used(nodes);
  for (std::size_t n = 0; n < nodes; ++n)
    used[n] = layout.hosted[n].size();
  std::vector<std::pair<std::uint32_t, std::uint32_t>> cand;
  for (std::size_t e = 0; e < experts; ++e)
    for (std::size_t n = 0; n < nodes; ++n)
      if (static_cast<std::size_t>(host[e]) != n && u[n][e] > 0)
        cand.emplace_back(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>(e));
  std::stable_sort(cand.begin(), cand.end(),
                   [&](const auto& a, const auto& x) { return u[a.first][a.second] > u[x.first][x.second]; });
  std::vector<double> before, after;
  for (const auto& [n, e] : cand) {
    if (used[n] >= node_slots) continue;
    copy_load(e, hosts[e], before);
    auto hs = hosts[e];
    hs.push_back(n);
    copy_load(e, hs, after);
    // New node loads of every host of e.
    double worst_new = 0, worst_old = 0;
    for (std::size_t i = 0; i < hs.size(); ++i) {
      const double old_copy = i < before.size() ? before[i] : 0.0;
      const double nl = load[hs[i]] - old_copy + after[i];
      worst_new = std::max(worst_new, nl);
      worst_old = std::max(worst_old, load[hs[i]]);
    }
    if (!keeps_load_bound(worst_new, worst_old, rcap)) continue;
    for (std::size_t i = 0; i < hs.size(); ++i)
      load[hs[i]] += after[i] - (i < before.size() ? before[i] : 0.0);
    hosts[e] = std::move(hs);
    layout.add(n, e);
    ++used[n];
  }
}

//! Node-level layout of one layer (steps 1-3 of the file comment).
inline da::node_layout plan_layer(const usage_table& u, const plan_input& in, const locality_options& opt) {
  const std::size_t nodes = in.topology.nodes(), experts = in.experts;
  const da::node_budget b = da::budget(in);
  const std::vector<double> w = expert_usage(u, nodes, experts);
  double total = 0;
  for (double x : w)
    total += x;
  const double cap = load_bound(total, nodes, opt.balance_slack, "locality balance_slack");

  first_copies fc = greedy_first_copies(u, w, nodes, b.primary_per_node, cap);
  refine_first_copies(u, w, b.primary_per_node, cap, opt.max_sweeps, fc);

  da::node_layout layout(nodes, experts);
  for (std::size_t e = 0; e < experts; ++e)
    layout.add(static_cast<std::size_t>(fc.host[e]), e);
  if (b.redundant_per_node == 0 || !opt.replicas) return layout;
  add_replicas(u, w, fc.host, in.slots_per_rank * in.topology.gpus_per_node(),
               load_bound(total, nodes, opt.replica_balance_slack, "locality replica_balance_slack"), layout);
  return layout;
}

//! Σ over clusters of their usage that lands on a copy on the cluster's node, per cluster and node.
inline std::vector<std::vector<double>> local_usage(const grouper::workload_model& m,
                                                    const std::vector<da::node_layout>& layouts) {
  const std::size_t k = m.clusters(), nodes = m.nodes(), experts = m.experts();
  std::vector<std::vector<double>> out(k, std::vector<double>(nodes, 0.0));
  for (std::size_t l = 0; l < layouts.size(); ++l)
    for (std::size_t n = 0; n < nodes; ++n)
      for (auto e : layouts[l].hosted[n])
        for (std::size_t c = 0; c < k; ++c)
          out[c][n] += m.cluster_usage(c)[l * experts + e];
  return out;
}

} // namespace detail::locality

//! The locality planner (see the file comment).
struct locality {
  using policy_concept = placement_tag;
  static constexpr const char* name = "locality";

  locality_options options{};

  //! @throws locus::config_error when `in` has no node_load or the slots cannot host the experts
  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    std::vector<expert_map> out;
    out.reserve(in.layers());
    for (std::size_t l = 0; l < in.layers(); ++l) {
      throw_if_cancelled();
      const auto& u = detail::activation::usage_of(in, l, name);
      out.push_back(detail::activation::build_map(detail::locality::plan_layer(u, in, options), u, in));
    }
    return out;
  }
};

//! Options of refine_grouping.
struct joint_options {
  std::size_t rounds = 4;      //!< placement ↔ grouping alternations at most
  double token_slack = 0.10;   //!< a node's clusters' decode tokens ≤ (1 + slack) × the mean
  double request_slack = 0.25; //!< a node's clusters' requests ≤ (1 + slack) × the mean (capacity)
};

namespace detail::locality {

//! What the joint fit holds fixed across rounds: the training (token, expert) pairs its score is a
//! fraction of, and the per-node bounds on decode tokens and on requests (capacity).
struct grouping_bounds {
  double pairs = 0, token_cap = 0, request_cap = 0;
};

//! The bounds of `model`'s clusters under `jopt`'s slacks.
inline grouping_bounds bounds_of(const grouper::workload_model& model, const joint_options& jopt) {
  const std::size_t k = model.clusters(), nodes = model.nodes();
  double total_tokens = 0, total_pairs = 0;
  for (std::size_t c = 0; c < k; ++c) {
    total_tokens += model.cluster_tokens(c);
    for (double x : model.cluster_usage(c))
      total_pairs += x;
  }
  double total_requests = 0;
  for (std::size_t c = 0; c < k; ++c)
    total_requests += model.cluster_requests(c);
  return {total_pairs, load_bound(total_tokens, nodes, jopt.token_slack, "joint grouping token_slack"),
          load_bound(total_requests, nodes, jopt.request_slack, "joint grouping request_slack")};
}

//! The node layout of every layer for `in.node_load` (the placement half of a round).
inline std::vector<da::node_layout> plan_layers(const plan_input& in, const locality_options& opt) {
  std::vector<da::node_layout> layouts;
  layouts.reserve(in.layers());
  for (std::size_t l = 0; l < in.layers(); ++l)
    layouts.push_back(plan_layer(in.node_load[l], in, opt));
  return layouts;
}

//! The usage that stays local when cluster c runs on node `map[c]`: the quantity the fit raises.
inline double local_score(const std::vector<std::vector<double>>& local, const std::vector<std::uint32_t>& map) {
  double score = 0;
  for (std::size_t c = 0; c < map.size(); ++c)
    score += local[c][map[c]];
  return score;
}

//! A cluster change: cluster `c` moves to `node`, or, when `d` is a cluster (< k), swaps nodes
//! with `d`, which is on `node`. `c == k` means no change.
struct cluster_change {
  std::size_t c, d, node;
};

//! Decode tokens and requests of the clusters on each node under `map`: what the bounds limit.
struct node_totals {
  std::vector<double> tokens, reqs;
};

//! The cluster move or swap that raises the local usage most while keeping both bounds. A change
//! may not push a node past a bound unless it already was past it and gets no worse; ties go to
//! the first found.
inline cluster_change best_cluster_change(const grouper::workload_model& model,
                                          const std::vector<std::vector<double>>& local,
                                          const std::vector<std::uint32_t>& map, const node_totals& at,
                                          const grouping_bounds& bounds) {
  const std::size_t k = model.clusters(), nodes = model.nodes();
  const std::vector<double>& tokens = at.tokens;
  const std::vector<double>& reqs = at.reqs;
  auto fits = [](double now_a, double now_x, double new_a, double new_x, double cap) {
    return keeps_load_bound(std::max(new_a, new_x), std::max(now_a, now_x), cap);
  };
  double best_gain = 1e-9;
  cluster_change best{k, k, nodes};
  for (std::size_t c = 0; c < k; ++c) {
    const std::size_t a = map[c];
    const double tc = model.cluster_tokens(c), rc = model.cluster_requests(c);
    for (std::size_t n = 0; n < nodes; ++n) {
      if (n == a) continue;
      const double gain = local[c][n] - local[c][a];
      if (gain > best_gain && fits(tokens[a], tokens[n], tokens[a] - tc, tokens[n] + tc, bounds.token_cap) &&
          fits(reqs[a], reqs[n], reqs[a] - rc, reqs[n] + rc, bounds.request_cap)) {
        best_gain = gain;
        best = {c, k, n};
      }
    }
    for (std::size_t d = c + 1; d < k; ++d) {
      const std::size_t x = map[d];
      if (x == a) continue;
      const double td = model.cluster_tokens(d), rd = model.cluster_requests(d);
      const double gain = local[c][x] + local[d][a] - local[c][a] - local[d][x];
      if (gain > best_gain && fits(tokens[a], tokens[x], tokens[a] - tc + td, tokens[x] - td + tc, bounds.token_cap) &&
          fits(reqs[a], reqs[x], reqs[a] - rc + rd, reqs[x] - rd + rc, bounds.request_cap)) {
        best_gain = gain;
        best = {c, d, x};
      }
    }
  }
  return best;
}

//! Applies `ch` to `map` and moves the clusters' tokens and requests with them.
inline void apply_cluster_change(const grouper::workload_model& model, const cluster_change& ch,
                                 std::vector<std::uint32_t>& map, node_totals& at) {
  const std::size_t k = model.clusters();
  std::vector<double>& tokens = at.tokens;
  std::vector<double>& reqs = at.reqs;
  const std::size_t a = map[ch.c];
  if (ch.d == k) {
    tokens[a] -= model.cluster_tokens(ch.c);
    tokens[ch.node] += model.cluster_tokens(ch.c);
    reqs[a] -= model.cluster_requests(ch.c);
    reqs[ch.node] += model.cluster_requests(ch.c);
    map[ch.c] = static_cast<std::uint32_t>(ch.node);
  } else {
    tokens[a] += model.cluster_tokens(ch.d) - model.cluster_tokens(ch.c);
    tokens[ch.node] += model.cluster_tokens(ch.c) - model.cluster_tokens(ch.d);
    reqs[a] += model.cluster_requests(ch.d) - model.cluster_requests(ch.c);
    reqs[ch.node] += model.cluster_requests(ch.c) - model.cluster_requests(ch.d);
    map[ch.d] = static_cast<std::uint32_t>(a);
    map[ch.c] = static_cast<std::uint32_t>(ch.node);
  }
}

//! The grouping half of a round: best-first cluster moves and swaps against one layout (its
//! `local` usage), at most 4k of them so the round ends. Returns whether `map` changed.
inline bool improve_grouping(const grouper::workload_model& model, const std::vector<std::vector<double>>& local,
                             const grouping_bounds& bounds, std::vector<std::uint32_t>& map) {
  const std::size_t k = model.clusters(), nodes = model.nodes();
  node_totals at{std::vector<double>(nodes, 0.0), std::vector<double>(nodes, 0.0)};
  for (std::size_t c = 0; c < k; ++c) {
    at.tokens[map[c]] += model.cluster_tokens(c);
    at.reqs[map[c]] += model.cluster_requests(c);
  }
  bool changed = false;
  for (std::size_t pass = 0; pass < 4 * k; ++pass) {
    const cluster_change ch = best_cluster_change(model, local, map, at, bounds);
    if (ch.c == k) break;
    changed = true;
    apply_cluster_change(model, ch, map, at);
  }
  return changed;
}

} // namespace detail::locality

//! The joint fit: alternately plans the node layout for the model's grouping and moves or swaps
//! clusters between nodes to raise the usage that stays local, keeping each node's decode tokens
//! under the bound; keeps the best grouping seen. Updates `model`'s cluster → node map and
//! returns the fraction of training decode (token, expert) pairs that stay local with it.
//! @throws locus::config_error when `in`'s shape differs from the model's
inline double refine_grouping(grouper::workload_model& model, plan_input in, const locality_options& opt = {},
                              const joint_options& jopt = {}) {
  LOCUS_REQUIRE(in.experts == model.experts() && in.topology.nodes() == model.nodes() &&
                    (in.load.empty() || in.load.size() == model.layers()),
                config_error, "refine_grouping: the plan input (", in.experts, " experts, ", in.topology.nodes(),
                " nodes) does not match the model (", model.experts(), " experts, ", model.nodes(), " nodes)");
  if (in.load.empty()) in.load.assign(model.layers(), std::vector<double>(model.experts(), 0.0));
  const detail::locality::grouping_bounds bounds = detail::locality::bounds_of(model, jopt);
  double best_score = -1;
  std::vector<std::uint32_t> best_map = model.cluster_node();
  for (std::size_t round = 0; round < jopt.rounds; ++round) {
    in.node_load = model.node_load();
    const auto local = detail::locality::local_usage(model, detail::locality::plan_layers(in, opt));
    auto map = model.cluster_node();
    const double score = detail::locality::local_score(local, map);
    if (score > best_score) {
      best_score = score;
      best_map = map;
    }
    if (!detail::locality::improve_grouping(model, local, bounds, map)) break;
    model.set_cluster_node(std::move(map));
  }
  model.set_cluster_node(best_map);
  return bounds.pairs > 0 ? best_score / bounds.pairs : 0.0;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
