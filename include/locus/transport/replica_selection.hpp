#pragma once
//! @file
//! Which replica of an expert receives a token's copy: the one definition the traffic model, the
//! decode simulator, the host layout and the transports use, so that predicted and moved bytes
//! agree by construction. The choice is a policy (`replica_rule`), because what a placement saves
//! depends on the rule of the engine that serves it (docs/engines.md):
//!
//! - `locality_first` (locus), for the copies one source rank `src` sends in one step:
//!   1. a replica on `src` itself, if any (no transfer);
//!   2. otherwise the replicas on `src`'s node, if any; otherwise all replicas;
//!   3. among those m candidates (in rank order), the one `src` has sent the fewest copies of this
//!      expert so far in the step; ties go to the first in rank order counted from candidate
//!      `src mod m`.
//!   Step 3 is round robin: the n-th balanced copy (in token order) of an expert goes to candidate
//!   (src + n) mod m. Each source balances on its own, as each rank builds its own layout (a
//!   prefix count per expert, which parallelises and runs on a GPU deterministically); starting
//!   each source at its own candidate spreads the first copies of many sources over the replicas,
//!   as a decode step's few tokens per rank need.
//!   Before step 3, a copy *joins* a row its token already sends: if one of its candidates is on a
//!   rank that one of the token's *fixed* copies goes to (a copy with one replica to go to: an
//!   expert with one replica, a replica on `src`, a single candidate), it goes there (the first
//!   such candidate), and its token's row to that rank carries it at no extra transfer; with a
//!   node-deduplicating (hierarchical) transport, failing that, a candidate on another node that
//!   a fixed copy reaches, whose one network copy then carries it too. Only copies that join
//!   nothing take step 3's round robin, and only they are counted there. Joining looks at the
//!   fixed copies alone, so that each copy's choice is a function of its own token and its
//!   source's tables, which the device layout evaluates one token per thread.
//! - `same_gpu_else_random` (SGLang's static dispatch): a fixed replica per (source, layer,
//!   expert): one on `src` itself, else a draw that gives every replica an equal share of the
//!   sources without a local one (seeded by the layer, so it is the same in every step).
//! - `random` (vLLM's EPLB dispatch): the replica at index `position mod m` of the expert's
//!   replicas in rank order, `position` being the copy's index in its source's batch (token × k +
//!   choice): uniform over replicas, with no notion of where the token is.
//! - `locality_bounded`: `locality_first` over the replicas not on a *hot* rank (one whose recent
//!   load of this layer is above the bound the caller sets); when every replica is hot, the one on
//!   the least loaded hot rank (hot_rank_tracker numbers hot ranks by load, equal loads by rank; a
//!   caller's plain 0/1 flags all tie, and locality_first picks among every replica). The caller
//!   (simulator, layer) decides which ranks are hot from the loads it observed, so a placement
//!   fitted to yesterday's traffic sheds load at run time instead of at planning time. Taking the
//!   least hot when all are hot matters in a run's tail, when a few long requests keep several
//!   ranks above the bound. Joining sees only the candidates left, so a copy never joins a row
//!   to a hot rank it would otherwise have been kept away from.
//!
//! The split is in three parts: `replica_candidates` (per source, on the host; lists the
//! candidates already rotated, or fixes the replica), `join_candidate` (per copy of a token, host
//! or device; the locality rules) and `choose_replica` (per balanced copy, host or device).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! How a copy bound for a replicated expert picks its replica (see the file comment).
enum class replica_rule : std::uint8_t { locality_first, same_gpu_else_random, random, locality_bounded };

inline constexpr std::array<replica_rule, 4> all_replica_rules = {replica_rule::locality_first,
                                                                  replica_rule::same_gpu_else_random,
                                                                  replica_rule::random, replica_rule::locality_bounded};

//! The rule's name, as `parse_replica_rule` and the command line take it.
constexpr const char* to_string(replica_rule r) noexcept {
  switch (r) {
  case replica_rule::locality_first: return "locality_first";
  case replica_rule::same_gpu_else_random: return "same_gpu_else_random";
  case replica_rule::random: return "random";
  case replica_rule::locality_bounded: return "locality_bounded";
  }
  return "?";
}

//! @throws locus::config_error naming the accepted rules when `name` is none of them
inline replica_rule parse_replica_rule(std::string_view name) {
  for (const replica_rule r : all_replica_rules)
    if (name == to_string(r)) return r;
  LOCUS_THROW(config_error, "unknown replica rule '", std::string(name),
              "': expected locality_first, same_gpu_else_random, random or locality_bounded");
}

//! What a rule needs besides the map and the source, for one layer and one step.
struct replica_policy {
  replica_rule rule = replica_rule::locality_first;
  //! Seeds same_gpu_else_random's draw; callers pass the layer index so layers draw independently.
  std::uint64_t salt = 0;
  //! locality_bounded: per rank, 0 when the rank is within its load bound, else its place among
  //! the hot ranks by load (1 the least loaded); when every replica is hot, those with the
  //! smallest value are the candidates (plain 0/1 flags: all of them). Empty means none is hot.
  std::span<const std::uint8_t> hot{};
};

//! A 64-bit mix (splitmix64's finaliser): a deterministic draw from a key, on host and device.
LOCUS_HOST_DEVICE std::uint64_t replica_mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

//! One expert's part of replica_candidates, for any set of replicas (a planner asks it about
//! replicas it has not placed yet): the expert's `m` replicas are `first`, ..., `first + m - 1`,
//! in rank order, replica `first + i` on rank `rank_of(i)`. Appends the candidates (rotated) to
//! `cands` and returns the fixed replica, or -1 when the copies balance over the candidates.
//! `policy.hot`, when not empty, has one entry per rank (replica_candidates checks it).
template <class Topology, class RankOf>
std::int32_t expert_replica_candidates(std::size_t e, std::int32_t first, std::int32_t m, RankOf&& rank_of,
                                       const Topology& topo, std::size_t src, const replica_policy& policy,
                                       std::vector<std::int32_t>& cands) {
  const std::int32_t last = first + m;
  const std::size_t src_node = topo.node_of(src);
  const replica_rule rule = policy.rule;
  const auto rank = [&](std::int32_t i) { return static_cast<std::size_t>(rank_of(i - first)); };
  if (m <= 1) return m == 1 ? first : -1; // no replica: nothing to choose
  if (rule == replica_rule::random) {
    for (std::int32_t i = first; i < last; ++i)
      cands.push_back(i);
    return -1;
  }
  // locality_bounded looks past hot ranks' replicas while some replica is not hot; when all are,
  // past all but those with the smallest hot value (the least loaded; plain 0/1 flags tie).
  const bool bounded = rule == replica_rule::locality_bounded && !policy.hot.empty();
  std::uint8_t heat = 255; // replicas hotter than this are skipped
  for (std::int32_t i = first; bounded && i < last; ++i)
    heat = std::min(heat, policy.hot[rank(i)]);
  const auto skip = [&](std::int32_t i) { return bounded && policy.hot[rank(i)] > heat; };
  for (std::int32_t i = first; i < last; ++i)
    if (rank(i) == src && !skip(i)) return i;
  if (rule == replica_rule::same_gpu_else_random) {
    // SGLang's fair draw: the sources without a local replica, in rank order, take the replicas
    // in turn from a layer- and expert-seeded start, so each replica serves an equal share.
    std::size_t hosts_below = 0; // distinct ranks below src hosting the expert
    for (std::int32_t i = first; i < last; ++i) {
      bool seen = false;
      for (std::int32_t q = first; q < i; ++q)
        seen |= rank(q) == rank(i);
      hosts_below += !seen && rank(i) < src;
    }
    const auto mm = static_cast<std::uint64_t>(m);
    const std::uint64_t start = replica_mix(policy.salt * 0x100000001b3ull + e) % mm;
    return first + static_cast<std::int32_t>((start + (src - hosts_below)) % mm);
  }
  const std::size_t begin = cands.size();
  bool node_local = false;
  for (std::int32_t i = first; i < last; ++i)
    node_local |= topo.node_of(rank(i)) == src_node && !skip(i);
  for (std::int32_t i = first; i < last; ++i)
    if (!skip(i) && (!node_local || topo.node_of(rank(i)) == src_node)) cands.push_back(i);
  const std::size_t n = cands.size() - begin;
  if (n == 1) { // one candidate: no balancing state needed
    const std::int32_t f = cands.back();
    cands.pop_back();
    return f;
  }
  const auto b = cands.begin() + static_cast<std::ptrdiff_t>(begin);
  std::rotate(b, b + static_cast<std::ptrdiff_t>(src % n), cands.end());
  return -1;
}

//! Per expert, for source `src`: the fixed replica (the only one, one on `src` itself, the only
//! candidate, or the rule's static choice; -1 if none) or the candidates the rule picks from
//! (locality rules: node-local replicas if any, else all, in rank order rotated to start at
//! candidate `src mod m`; random: all replicas in rank order), as indices into the map's CSR
//! replica array (`expert_map_view::replicas`).
//! @throws locus::config_error when `policy.hot` is neither empty nor one entry per rank
template <class Topology>
void replica_candidates(const expert_map& map, const Topology& topo, std::size_t src, std::vector<std::int32_t>& fixed,
                        std::vector<std::int32_t>& cand_offsets, std::vector<std::int32_t>& cands,
                        const replica_policy& policy = {}) {
  LOCUS_REQUIRE(policy.hot.empty() || policy.hot.size() == topo.ranks(), config_error,
                "replica selection: ", policy.hot.size(), " hot-rank flags for ", topo.ranks(), " ranks");
  const expert_map_view v = map.view();
  const std::size_t experts = map.experts();
  fixed.assign(experts, -1);
  cand_offsets.assign(experts + 1, 0);
  cands.clear();
  for (std::size_t e = 0; e < experts; ++e) {
    const std::int32_t first = v.replica_offsets[e];
    cand_offsets[e] = static_cast<std::int32_t>(cands.size());
    fixed[e] = expert_replica_candidates(
        e, first, v.replica_offsets[e + 1] - first, [&](std::int32_t i) { return v.replicas[first + i].rank; }, topo,
        src, policy, cands);
  }
  cand_offsets[experts] = static_cast<std::int32_t>(cands.size());
}

//! Replica of the `nth` balanced copy of expert `e` from one source (round robin over its
//! candidates), or its fixed replica; the tables come from replica_candidates. This is the
//! locality rules' choice; the overload with a rule also serves `random`.
LOCUS_HOST_DEVICE std::int32_t choose_replica(const std::int32_t* fixed, const std::int32_t* cand_offsets,
                                              const std::int32_t* cands, std::int32_t e, std::int32_t nth) {
  const std::int32_t f = fixed[e];
  if (f >= 0) return f;
  const std::int32_t m = cand_offsets[e + 1] - cand_offsets[e];
  return cands[cand_offsets[e] + nth % m];
}

//! Replica of a copy under `rule`: `nth` is the copy's index among its source's balanced copies of
//! `e` (locality rules), `position` its index in the source's batch, token × k + choice (random).
LOCUS_HOST_DEVICE std::int32_t choose_replica(const std::int32_t* fixed, const std::int32_t* cand_offsets,
                                              const std::int32_t* cands, std::int32_t e, std::int32_t nth,
                                              replica_rule rule, std::int64_t position) {
  if (rule != replica_rule::random || fixed[e] >= 0) return choose_replica(fixed, cand_offsets, cands, e, nth);
  const std::int64_t m = cand_offsets[e + 1] - cand_offsets[e];
  return cands[cand_offsets[e] + static_cast<std::int32_t>(position % m)];
}

//! Whether copies under `rule` join rows their token already sends (the locality rules; the
//! engines' rules, same_gpu_else_random and random, choose as those engines do).
LOCUS_HOST_DEVICE constexpr bool joins_rows(replica_rule rule) {
  return rule == replica_rule::locality_first || rule == replica_rule::locality_bounded;
}

//! The locality rules' join (see the file comment) for one copy: of its `count` candidates
//! `cands` (replica indices in the rule's rotated order, `rank_of` giving each one's rank), the
//! first on a rank in `reached` (the `n` ranks its token's fixed copies go to); failing that, when
//! `node` (a node-deduplicating transport), the first on a node other than `source`'s that a
//! reached rank is on. -1 when none. Ranks are numbered node by node, `gpus` per node.
template <class RankOf>
LOCUS_HOST_DEVICE std::int32_t join_candidate(const std::int32_t* cands, std::int32_t count, RankOf&& rank_of,
                                              const std::int32_t* reached, std::int32_t n, std::int32_t source,
                                              std::int32_t gpus, bool node) {
  for (std::int32_t c = 0; c < count; ++c) {
    const std::int32_t r = rank_of(cands[c]);
    for (std::int32_t q = 0; q < n; ++q)
      if (reached[q] == r) return cands[c];
  }
  if (!node) return -1;
  for (std::int32_t c = 0; c < count; ++c) {
    const std::int32_t to = rank_of(cands[c]) / gpus;
    if (to == source / gpus) continue;
    for (std::int32_t q = 0; q < n; ++q)
      if (reached[q] / gpus == to) return cands[c];
  }
  return -1;
}

//! locality_bounded's run-time state for one layer: each rank's recent load (expert rows, summed
//! since the start, or an exponential average over about `window` steps) and which ranks are above
//! (1 + slack) × the mean, i.e. hot, numbered by load. Engines that balance at dispatch time keep
//! such counters; the simulator keeps one per layer and hands hot() to the selector of the next step.
class hot_rank_tracker {
public:
  //! @throws locus::config_error when `ranks` is 0 or above max_topology_ranks, or `slack` is
  //!         negative or not finite
  hot_rank_tracker(std::size_t ranks, double slack, std::size_t window = 0)
      : load_(checked_ranks(ranks), 0.0), hot_(ranks, 0), slack_(slack),
        keep_(window == 0 ? 1.0 : 1.0 - 1.0 / static_cast<double>(window)) {
    // Any finite slack: a bound past the largest double is +inf, which no load exceeds (no rank is hot).
    LOCUS_REQUIRE(std::isfinite(slack) && slack >= 0, config_error, "hot_rank_tracker: slack is ", slack,
                  ", expected a finite number >= 0");
  }

  //! Per rank, 0 when it is not hot, else its place among the hot ranks by load, 1 the least
  //! loaded, at most 255 (the selector's `replica_policy::hot`).
  std::span<const std::uint8_t> hot() const noexcept { return hot_; }

  //! Adds one step's expert rows per rank and decides the hot ranks for the next step.
  //! @throws locus::config_error when `rows` does not have one entry per rank
  template <class Count>
  void observe(std::span<const Count> rows) {
    LOCUS_REQUIRE(rows.size() == load_.size(), config_error, "hot_rank_tracker: ", rows.size(), " loads for ",
                  load_.size(), " ranks");
    double total = 0;
    for (std::size_t r = 0; r < load_.size(); ++r) {
      load_[r] = keep_ * load_[r] + static_cast<double>(rows[r]);
      total += load_[r];
    }
    const double bound = (1.0 + slack_) * total / static_cast<double>(load_.size());
    for (std::size_t r = 0; r < load_.size(); ++r)
      hot_[r] = total > 0 && load_[r] > bound;
    // Hot ranks numbered by load, 1 the least loaded (at most 255), so that a copy whose replicas
    // are all hot goes to the least loaded of them.
    order_.clear();
    for (std::size_t r = 0; r < load_.size(); ++r)
      if (hot_[r]) order_.push_back(r);
    std::stable_sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) { return load_[a] < load_[b]; });
    for (std::size_t i = 0; i < order_.size(); ++i)
      hot_[order_[i]] = static_cast<std::uint8_t>(std::min<std::size_t>(i + 1, 255));
  }

private:
  // Checked before the tables are sized from it: 2^62 ranks was a length_error.
  static std::size_t checked_ranks(std::size_t ranks) {
    LOCUS_REQUIRE(ranks > 0 && ranks <= max_topology_ranks, config_error, "hot_rank_tracker: ", ranks,
                  " ranks, expected 1..", max_topology_ranks);
    return ranks;
  }

  std::vector<double> load_;
  std::vector<std::uint8_t> hot_;
  std::vector<std::size_t> order_; // hot ranks by load (observe's scratch)
  double slack_, keep_;
};

//! Stateful replica chooser for one layer and one step, copies from any sources in any order
//! (each source balances its own copies). A source's copies must come in batch order, token by
//! token and choice by choice (the `random` rule counts them as positions). Call reset() between
//! steps, or rebind() for another map or policy (a traffic model counting many steps and layers
//! keeps one selector and rebinds it: its tables stay allocated).
template <class Topology>
class replica_selector {
  static_assert(any_topology<Topology>, "locus::transport::replica_selector needs a locus::topology");

public:
  //! Bytes of the tables the selector keeps per (source rank, expert) pair: a selector for R ranks
  //! and E experts holds R × E of them.
  static constexpr std::size_t table_bytes_per_pair = sizeof(std::uint32_t) + 4 * sizeof(std::int32_t);

  //! A selector with no map yet: rebind() before select().
  explicit replica_selector(const Topology& topo) : topo_(topo) {}

  //! @throws locus::config_error when map and topology disagree on the rank count, or `policy.hot`
  //!         has the wrong size
  replica_selector(const expert_map& map, const Topology& topo, const replica_policy& policy = {}) : topo_(topo) {
    rebind(map, policy);
  }

  //! Starts a step under `map` and `policy` (`map` must outlive the selector's use of it).
  //! @throws locus::config_error as the constructor
  void rebind(const expert_map& map, const replica_policy& policy = {}) {
    LOCUS_REQUIRE(map.ranks() == topo_.ranks(), config_error, "replica selection: the expert map has ", map.ranks(),
                  " ranks but the topology has ", topo_.ranks());
    LOCUS_REQUIRE(policy.hot.empty() || policy.hot.size() == topo_.ranks(), config_error,
                  "replica selection: ", policy.hot.size(), " hot-rank flags for ", topo_.ranks(), " ranks");
    map_ = &map;
    view_ = map.view();
    rule_ = policy.rule;
    salt_ = policy.salt;
    hot_.assign(policy.hot.begin(), policy.hot.end());
    const std::size_t cells = topo_.ranks() * map.experts();
    if (stamp_.size() < cells) {
      stamp_.assign(cells, 0);
      generation_ = 0;
    }
    fixed_.resize(std::max(fixed_.size(), cells));
    cand_begin_.resize(std::max(cand_begin_.size(), cells));
    cand_count_.resize(std::max(cand_count_.size(), cells));
    nth_.resize(std::max(nth_.size(), cells));
    reset();
  }

  //! Forgets the copies counted so far (a new step or micro-batch).
  void reset() {
    std::fill(copies_.begin(), copies_.end(), 0u);
    copies_.resize(static_cast<std::size_t>(view_.replica_offsets[view_.experts]), 0u);
    position_.assign(topo_.ranks(), 0);
    cands_.clear();
    // Every (source, expert) table becomes stale at once; they are made again on first use.
    if (++generation_ == 0) {
      std::fill(stamp_.begin(), stamp_.end(), 0u);
      generation_ = 1;
    }
  }

  //! The slot receiving the copy of a token on rank `src` bound for expert `e`; counts the copy.
  //! One copy at a time: no joining (select_token is the rule for whole tokens).
  //! @throws locus::invalid_input_error when `e` or `src` is out of range
  slot_ref select(std::size_t src, std::size_t e) {
    LOCUS_REQUIRE(e < map_->experts(), invalid_input_error, "replica selection: expert id ", e, " out of range [0, ",
                  map_->experts(), ")");
    LOCUS_REQUIRE(src < topo_.ranks(), invalid_input_error, "replica selection: source rank ", src,
                  " out of range [0, ", topo_.ranks(), ")");
    return view_.replicas[choose(src, e)];
  }

  //! Like select(), returning the replica's index in the map's CSR replica array (no range checks).
  //! One copy at a time: no joining (a planner's per-copy model; select_token is the rule).
  std::size_t select_index(std::size_t src, std::size_t e) { return choose(src, e); }

  //! The replicas (CSR indices, into `out`) of one token's `k` copies from `src`, its experts
  //! `ids` (distinct, in range: not checked), by the rule with joining (the file comment): what
  //! the layouts choose. `node`: the transport deduplicates per node (hierarchical). Counts the
  //! copies.
  template <class Id>
  void select_token(std::size_t src, const Id* ids, std::size_t k, bool node, std::size_t* out) {
    if (!joins_rows(rule_)) { // in batch order: random counts positions
      for (std::size_t j = 0; j < k; ++j)
        out[j] = choose(src, static_cast<std::size_t>(ids[j]));
      return;
    }
    reached_.clear();
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t cell = tables(src, static_cast<std::size_t>(ids[j]));
      out[j] = fixed_[cell] >= 0 ? choose(src, static_cast<std::size_t>(ids[j])) : none;
      if (out[j] != none) reached_.push_back(view_.replicas[out[j]].rank);
    }
    const auto rank_of = [&](std::int32_t i) { return view_.replicas[i].rank; };
    for (std::size_t j = 0; j < k; ++j) {
      if (out[j] != none) continue;
      const std::size_t cell = src * view_.experts + static_cast<std::size_t>(ids[j]);
      const std::int32_t joined =
          join_candidate(cands_.data() + cand_begin_[cell], cand_count_[cell], rank_of, reached_.data(),
                         static_cast<std::int32_t>(reached_.size()), static_cast<std::int32_t>(src),
                         static_cast<std::int32_t>(topo_.gpus_per_node()), node);
      if (joined < 0) {
        out[j] = choose(src, static_cast<std::size_t>(ids[j]));
        continue;
      }
      out[j] = static_cast<std::size_t>(joined);
      ++position_[src];
      ++copies_[out[j]];
    }
  }

  //! Copies received so far by each replica (CSR order of expert_map_view).
  const std::vector<std::uint32_t>& replica_copies() const noexcept { return copies_; }

private:
  static constexpr std::size_t none = static_cast<std::size_t>(-1); // select_token: not chosen yet

  // The (source, expert) cell's tables (replica_candidates'), made on the pair's first copy of the
  // step: a decode step touches few of a source's experts, and making every expert's tables for
  // every source of every step and layer was most of the traffic model's time.
  std::size_t tables(std::size_t src, std::size_t e) {
    const std::size_t cell = src * view_.experts + e;
    if (stamp_[cell] != generation_) {
      stamp_[cell] = generation_;
      const std::int32_t first = view_.replica_offsets[e];
      cand_begin_[cell] = static_cast<std::int32_t>(cands_.size());
      fixed_[cell] = expert_replica_candidates(
          e, first, view_.replica_offsets[e + 1] - first,
          [&](std::int32_t i) { return view_.replicas[first + i].rank; }, topo_, src,
          replica_policy{rule_, salt_, hot_}, cands_);
      cand_count_[cell] = static_cast<std::int32_t>(cands_.size()) - cand_begin_[cell];
      nth_[cell] = 0;
    }
    return cell;
  }

  // choose_replica's choice on the cell's tables: the copy's round-robin turn, or its position.
  std::size_t choose(std::size_t src, std::size_t e) {
    const std::size_t cell = tables(src, e);
    // The pair's tables as one expert's for choose_replica, the choice the device layout makes.
    const std::int32_t offsets[2] = {cand_begin_[cell], cand_begin_[cell] + cand_count_[cell]};
    const auto best = static_cast<std::size_t>(
        choose_replica(&fixed_[cell], offsets, cands_.data(), 0, nth_[cell], rule_, position_[src]++));
    if (fixed_[cell] < 0) ++nth_[cell];
    ++copies_[best];
    return best;
  }

  const expert_map* map_ = nullptr;
  Topology topo_;
  replica_rule rule_ = replica_rule::locality_first;
  std::uint64_t salt_ = 0;
  std::vector<std::uint8_t> hot_;
  expert_map_view view_{};
  std::vector<std::uint32_t> copies_;
  std::vector<std::int64_t> position_;                        // per source: its copies so far
  std::vector<std::uint32_t> stamp_;                          // per (source, expert): generation of its tables
  std::vector<std::int32_t> fixed_, cand_begin_, cand_count_; // per (source, expert)
  std::vector<std::int32_t> nth_;                             // per (source, expert): balanced copies so far
  std::vector<std::int32_t> cands_;
  std::vector<std::int32_t> reached_; // select_token's scratch: the ranks a token's fixed copies go to
  std::uint32_t generation_ = 0;
};

//! The selector under its former name (locality_first is the default policy).
template <class Topology>
using locality_first_selector = replica_selector<Topology>;

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport

// The planners choose replicas for the same rule they are scored under, so they name it too.
namespace locus::inline LOCUS_ABI_NAMESPACE::placement {
using transport::all_replica_rules;
using transport::choose_replica;
using transport::expert_replica_candidates;
using transport::hot_rank_tracker;
using transport::locality_first_selector;
using transport::parse_replica_rule;
using transport::replica_candidates;
using transport::replica_mix;
using transport::replica_policy;
using transport::replica_rule;
using transport::replica_selector;
using transport::to_string;
} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
