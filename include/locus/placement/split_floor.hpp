#pragma once
//! @file
//! The balance floor of a placement: the lowest GPU max/mean that any split of each expert's rows
//! among its replicas can reach for a given map and traffic. A measured max/mean near the floor
//! is plan-limited (only a different map helps); one far above it is split-limited (replica
//! selection can still help). Exact: the optimum max load is max over rank sets S of W(S) / |S|,
//! W(S) the rows of the experts whose every replica lies in S (Hall's condition for the flow
//! source → expert (its rows) → hosting ranks → sink (cap L)); a Dinkelbach iteration on L finds
//! the maximising S, each step a max-flow whose min cut names a set denser than the current L.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <numeric>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! The floor of one map under one traffic.
struct split_floor {
  double max_load = 0;      //!< lowest reachable load of the most loaded rank (rows)
  double mean_load = 0;     //!< total rows / ranks
  double max_over_mean = 1; //!< max_load / mean_load
  //! The ranks that bind: the experts hosted only on them carry max_load × size rows, so no split
  //! can bring all of them lower. Ascending.
  std::vector<std::size_t> binding_ranks;
};

namespace detail {

// Dinic's max-flow on doubles; small graphs (experts + ranks + 2 nodes).
class split_flow {
public:
  split_flow() = default;
  split_flow(std::size_t nodes, std::size_t edges) : head_(nodes, -1), level_(nodes), it_(nodes) {
    edges_.reserve(2 * edges);
    queue_.reserve(nodes);
  }
  //! An empty network of `nodes` nodes, keeping the memory (for many small solves).
  void reset(std::size_t nodes) {
    edges_.clear();
    head_.assign(nodes, -1);
    level_.resize(nodes);
    it_.resize(nodes);
  }
  //! Adds u → v with capacity `cap`; returns its index for set_capacity.
  std::size_t add_edge(std::size_t u, std::size_t v, double cap) {
    edges_.push_back({v, head_[u], cap});
    head_[u] = static_cast<std::int64_t>(edges_.size() - 1);
    edges_.push_back({u, head_[v], 0});
    head_[v] = static_cast<std::int64_t>(edges_.size() - 1);
    return edges_.size() - 2;
  }
  //! The capacities as built: the next max_flow starts from an empty flow.
  void save() { built_ = edges_; }
  void restore() { std::copy(built_.begin(), built_.end(), edges_.begin()); }
  void set_capacity(std::size_t e, double cap) { edges_[e].cap = cap; }
  double max_flow(std::size_t s, std::size_t t, double eps) {
    double flow = 0;
    while (bfs(s, t, eps)) {
      for (std::size_t i = 0; i < head_.size(); ++i)
        it_[i] = head_[i];
      while (const double f = dfs(s, t, std::numeric_limits<double>::infinity(), eps))
        flow += f;
    }
    return flow;
  }
  // Nodes reachable from `s` in the residual graph of the last max_flow (the min cut's source
  // side), into `seen` (one flag per node), with `stack` as scratch: no allocation once warm.
  void reachable(std::size_t s, double eps, std::vector<std::uint8_t>& seen, std::vector<std::size_t>& stack) const {
    search(s, eps, true, seen, stack);
  }
  // The same for the nodes that reach `t` in the residual graph (the largest min cut's sink side).
  void reaching(std::size_t t, double eps, std::vector<std::uint8_t>& seen, std::vector<std::size_t>& stack) const {
    search(t, eps, false, seen, stack);
  }

private:
  // Depth-first over residual edges with room, from `from` along them (forward) or against them.
  void search(std::size_t from, double eps, bool forward, std::vector<std::uint8_t>& seen,
              std::vector<std::size_t>& stack) const {
    seen.assign(head_.size(), 0);
    stack.assign(1, from);
    seen[from] = 1;
    while (!stack.empty()) {
      const std::size_t v = stack.back();
      stack.pop_back();
      for (std::int64_t e = head_[v]; e >= 0; e = edges_[static_cast<std::size_t>(e)].next) {
        // Edge v -> u is stored beside its pair u -> v: backward, u reaches v while that one has room.
        const auto i = static_cast<std::size_t>(e);
        const std::size_t u = edges_[i].to;
        if (edges_[forward ? i : i ^ 1].cap > eps && !seen[u]) {
          seen[u] = 1;
          stack.push_back(u);
        }
      }
    }
  }

  struct edge {
    std::size_t to;
    std::int64_t next;
    double cap;
  };
  bool bfs(std::size_t s, std::size_t t, double eps) {
    std::fill(level_.begin(), level_.end(), -1);
    queue_.assign(1, s);
    level_[s] = 0;
    for (std::size_t q = 0; q < queue_.size(); ++q) {
      const std::size_t u = queue_[q];
      for (std::int64_t e = head_[u]; e >= 0; e = edges_[static_cast<std::size_t>(e)].next) {
        const edge& ed = edges_[static_cast<std::size_t>(e)];
        if (ed.cap > eps && level_[ed.to] < 0) {
          level_[ed.to] = level_[u] + 1;
          queue_.push_back(ed.to);
        }
      }
    }
    return level_[t] >= 0;
  }
  double dfs(std::size_t u, std::size_t t, double limit, double eps) {
    if (u == t) return limit;
    for (; it_[u] >= 0; it_[u] = edges_[static_cast<std::size_t>(it_[u])].next) {
      const auto e = static_cast<std::size_t>(it_[u]);
      const std::size_t v = edges_[e].to;
      if (edges_[e].cap > eps && level_[v] == level_[u] + 1) {
        if (const double f = dfs(v, t, std::min(limit, edges_[e].cap), eps); f > eps) {
          edges_[e].cap -= f;
          edges_[e ^ 1].cap += f;
          return f;
        }
      }
    }
    return 0;
  }
  std::vector<edge> edges_, built_;
  std::vector<std::int64_t> head_;
  std::vector<std::size_t> queue_;
  std::vector<int> level_;
  std::vector<std::int64_t> it_;
};

} // namespace detail

//! The lowest GPU max/mean any split of each expert's `rows` among its replicas in `map` reaches
//! (rows may split fractionally; an integral split reaches ceil(max_load) for integral rows).
//! @throws locus::invalid_input_error when `rows` is not one finite, non-negative count per expert
//!         of the map or sums to zero (no load, no max/mean)
inline split_floor min_max_split(const expert_map& map, std::span<const double> rows) {
  const std::size_t experts = map.experts(), ranks = map.ranks();
  LOCUS_REQUIRE(rows.size() == experts, invalid_input_error, "balance floor: ", rows.size(), " row counts for ",
                experts, " experts");
  double total = 0;
  for (std::size_t e = 0; e < experts; ++e) {
    LOCUS_REQUIRE(std::isfinite(rows[e]) && rows[e] >= 0, invalid_input_error, "balance floor: expert ", e,
                  " has row count ", rows[e], " (must be finite and >= 0)");
    total += rows[e];
  }
  LOCUS_REQUIRE(total > 0, invalid_input_error, "balance floor: the traffic has no rows");
  // Counts on any finite scale: a sum past the largest double (inf) or a mean among the subnormals
  // made max/mean NaN or inf. Such counts are solved scaled to a largest count of 1, the ratio
  // kept and the loads scaled back.
  if (!std::isfinite(total) || total / static_cast<double>(ranks) < std::numeric_limits<double>::min()) {
    const double scale = *std::max_element(rows.begin(), rows.end());
    std::vector<double> scaled(rows.begin(), rows.end());
    for (double& x : scaled)
      x /= scale;
    split_floor out = min_max_split(map, scaled);
    out.max_load *= scale;
    out.mean_load *= scale;
    return out;
  }

  // W(S) / |S| for a set of ranks: the rows of experts hosted only inside S.
  const auto density = [&](const std::vector<bool>& in_set, std::size_t size) {
    double w = 0;
    for (std::size_t e = 0; e < experts; ++e) {
      bool inside = true;
      for (const slot_ref& s : map.replicas(e))
        inside = inside && in_set[static_cast<std::size_t>(s.rank)];
      if (inside) w += rows[e];
    }
    return w / static_cast<double>(size);
  };

  const std::size_t source = experts + ranks, sink = source + 1;
  split_floor out;
  out.mean_load = total / static_cast<double>(ranks);
  double level = out.mean_load; // S = every rank: a lower bound, and the start
  out.binding_ranks.resize(ranks);
  for (std::size_t r = 0; r < ranks; ++r)
    out.binding_ranks[r] = r;
  const double eps = 1e-12 * total;
  // The network is the same every pass but for the ranks' capacity (the level): built once.
  detail::split_flow g(sink + 1, experts + map.slot_count() + ranks);
  for (std::size_t e = 0; e < experts; ++e) {
    g.add_edge(source, e, rows[e]);
    for (const slot_ref& s : map.replicas(e))
      g.add_edge(e, experts + static_cast<std::size_t>(s.rank), total);
  }
  std::vector<std::size_t> to_sink(ranks);
  for (std::size_t r = 0; r < ranks; ++r)
    to_sink[r] = g.add_edge(experts + r, sink, 0);
  g.save();
  std::vector<std::uint8_t> side; // the min cut's source side, per node
  std::vector<std::size_t> stack;
  // Each pass either proves `level` reachable or finds a strictly denser set; at most 2^ranks
  // sets exist, in practice a handful of passes.
  for (;;) {
    g.restore();
    for (const std::size_t e : to_sink)
      g.set_capacity(e, level);
    const double flow = g.max_flow(source, sink, eps);
    if (flow >= total - 1e-9 * total) break;
    g.reachable(source, eps, side, stack);
    std::vector<bool> in_set(ranks, false);
    std::vector<std::size_t> set;
    for (std::size_t r = 0; r < ranks; ++r)
      if (side[experts + r]) {
        in_set[r] = true;
        set.push_back(r);
      }
    if (set.empty()) break; // rounding only: no denser set exists
    const double d = density(in_set, set.size());
    if (d <= level * (1 + 1e-12)) break; // rounding only
    level = d;
    out.binding_ranks = std::move(set);
  }
  out.max_load = level;
  out.max_over_mean = level / out.mean_load;
  return out;
}

//! min_max_split for many traffics on maps where most experts have one host, as the floor hedge of
//! placement/token_refine.hpp solves them (thousands of resampled traffics, a copy added between
//! rounds). For rows that are whole numbers (counts, as the hedge's are) it returns min_max_split's
//! floor and binding set bit for bit (tests/unit/test_split_floor.cpp checks it on random maps):
//! - min_max_split's binding set is the largest of the densest rank sets: its last step's level L
//!   is below the floor d, so its set S maximises W(S) - |S| L = |S| (density - L), which among sets
//!   of density d the largest one does best, and sets of a lower density cannot match it (the least
//!   maximiser, which the reachable side is, lies inside every maximiser). That set U is one for any
//!   path to d, so the steps may start higher: at the densest single rank or at a hint (any set's
//!   density is at most d); at level d, U is what cannot reach the sink (the largest min cut).
//! - An expert hosted on one rank only always loads that rank: it is folded into the rank's load,
//!   and the flow runs over the ranks and the experts on several ranks alone.
//! - Whole-number rows sum exactly in any order, and keep every residual either 0 or at least
//!   1 / ranks, far above the tolerances.
//! Keeps its memory between solves.
class split_floor_solver {
public:
  //! The floor of `rows` (one finite, non-negative whole number per expert; not all zero) when
  //! expert e is hosted on the ranks `hosts(e)` (a range of rank indices below `ranks`, repeats
  //! allowed, empty only for an expert without rows). `hint`: a rank set (ascending) that is
  //! likely densest, e.g. the binding set of a similar traffic or map; any set is correct.
  //! @throws locus::invalid_input_error when the rows sum to zero or an expert with rows has no host
  template <class Hosts>
  split_floor solve(std::size_t ranks, std::span<const double> rows, Hosts&& hosts,
                    std::span<const std::size_t> hint = {}) {
    const std::size_t experts = rows.size();
    double total = 0;
    for (std::size_t e = 0; e < experts; ++e)
      total += rows[e];
    LOCUS_REQUIRE(total > 0 && std::isfinite(total), invalid_input_error, "balance floor: the traffic sums to ", total,
                  " rows (a finite count above 0 expected)");
    // Per rank the rows of experts hosted on it alone; the others become flow nodes.
    base_.assign(ranks, 0.0);
    multi_.clear();
    for (std::size_t e = 0; e < experts; ++e) {
      if (rows[e] <= 0) continue; // no capacity from the source: on no path, in every set's W
      const auto& h = hosts(e);
      LOCUS_REQUIRE(std::begin(h) != std::end(h), invalid_input_error, "balance floor: expert ", e, " has ", rows[e],
                    " rows and no host");
      const auto first = static_cast<std::size_t>(*std::begin(h));
      bool one = true;
      for (const auto r : h)
        one = one && static_cast<std::size_t>(r) == first;
      if (one)
        base_[first] += rows[e];
      else
        multi_.push_back(e);
    }
    // Nodes: ranks, then the experts on several ranks, then source and sink.
    const std::size_t source = ranks + multi_.size(), sink = source + 1;
    flow_.reset(sink + 1);
    for (std::size_t r = 0; r < ranks; ++r)
      if (base_[r] > 0) flow_.add_edge(source, r, base_[r]);
    for (std::size_t i = 0; i < multi_.size(); ++i) {
      const std::size_t e = multi_[i];
      flow_.add_edge(source, ranks + i, rows[e]);
      for (const auto r : hosts(e))
        flow_.add_edge(ranks + i, static_cast<std::size_t>(r), total);
    }
    to_sink_.resize(ranks);
    for (std::size_t r = 0; r < ranks; ++r)
      to_sink_[r] = flow_.add_edge(r, sink, 0);
    flow_.save();

    // W(S) / |S| of the ranks flagged in in_set_ (size > 0).
    const auto density = [&](std::size_t size) {
      double w = 0;
      for (std::size_t r = 0; r < ranks; ++r)
        if (in_set_[r]) w += base_[r];
      for (const std::size_t e : multi_) {
        bool inside = true;
        for (const auto r : hosts(e))
          inside = inside && in_set_[static_cast<std::size_t>(r)];
        if (inside) w += rows[e];
      }
      return w / static_cast<double>(size);
    };
    split_floor out;
    out.mean_load = total / static_cast<double>(ranks);
    // Start at the densest of: every rank (the mean), one rank (its own rows: an expert on several
    // ranks is in no single rank's W), the hint.
    double level = std::max(out.mean_load, *std::max_element(base_.begin(), base_.end()));
    in_set_.assign(ranks, 0);
    if (!hint.empty()) {
      for (const std::size_t r : hint)
        in_set_[r] = 1;
      level = std::max(level, density(hint.size()));
    }
    const double eps = 1e-12 * total;
    for (;;) {
      flow_.restore();
      for (const std::size_t e : to_sink_)
        flow_.set_capacity(e, level);
      if (flow_.max_flow(source, sink, eps) >= total - 1e-9 * total) break; // level is the floor
      // Short of the rows: the ranks the source still reaches are denser than the level.
      flow_.reachable(source, eps, side_, stack_);
      std::size_t size = 0;
      for (std::size_t r = 0; r < ranks; ++r) {
        in_set_[r] = side_[r];
        size += side_[r];
      }
      if (size == 0) break; // rounding only
      const double d = density(size);
      if (d <= level * (1 + 1e-12)) break; // rounding only
      level = d;
    }
    // At the floor, the ranks that cannot reach the sink: the largest densest set.
    flow_.reaching(sink, eps, side_, stack_);
    out.binding_ranks.clear();
    for (std::size_t r = 0; r < ranks; ++r) {
      in_set_[r] = !side_[r];
      if (in_set_[r]) out.binding_ranks.push_back(r);
    }
    out.max_load = out.binding_ranks.empty() ? level : density(out.binding_ranks.size());
    out.max_over_mean = out.max_load / out.mean_load;
    return out;
  }

private:
  detail::split_flow flow_;
  std::vector<double> base_;
  std::vector<std::size_t> multi_, to_sink_, stack_;
  std::vector<std::uint8_t> side_, in_set_;
};

//! The floor of traffic served in segments, segment i by `maps[i]` with `rows[i]` (one count per
//! expert): a window that spans a re-plan. Each segment's rows split only among its own map's
//! replicas, and the ranks' loads add up over the segments: the same flow on a map whose experts
//! are (segment, expert) pairs.
//! @throws locus::invalid_input_error when the maps differ in experts or ranks, the counts do not
//!         match the maps, or there is no segment
inline split_floor min_max_split(std::span<const expert_map* const> maps, std::span<const std::vector<double>> rows) {
  LOCUS_REQUIRE(!maps.empty() && maps.size() == rows.size(), invalid_input_error, "balance floor: ", maps.size(),
                " maps for ", rows.size(), " row segments");
  if (maps.size() == 1) return min_max_split(*maps[0], rows[0]);
  const std::size_t experts = maps[0]->experts(), ranks = maps[0]->ranks();
  std::size_t spr = 0;
  for (const expert_map* m : maps) {
    LOCUS_REQUIRE(m->experts() == experts && m->ranks() == ranks, invalid_input_error,
                  "balance floor: segments' maps differ in experts or ranks");
    spr += m->slots_per_rank();
  }
  std::vector<expert_id> table(ranks * spr, empty_slot);
  std::vector<double> all;
  all.reserve(experts * maps.size());
  for (std::size_t r = 0; r < ranks; ++r) {
    std::size_t at = r * spr;
    for (std::size_t i = 0; i < maps.size(); ++i)
      for (std::size_t sl = 0; sl < maps[i]->slots_per_rank(); ++sl, ++at)
        if (const expert_id e = maps[i]->expert_at(r, sl); e != empty_slot)
          table[at] = static_cast<expert_id>(i * experts + static_cast<std::size_t>(e));
  }
  for (std::size_t i = 0; i < maps.size(); ++i) {
    LOCUS_REQUIRE(rows[i].size() == experts, invalid_input_error, "balance floor: segment ", i, " has ", rows[i].size(),
                  " row counts for ", experts, " experts");
    all.insert(all.end(), rows[i].begin(), rows[i].end());
  }
  return min_max_split(expert_map(experts * maps.size(), ranks, spr, std::move(table)), all);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
