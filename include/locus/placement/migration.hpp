#pragma once
//! @file
//! Re-planning the maps in service on a window of recent traffic under a migration budget: at most
//! `max_moved_experts` slots (summed over layers) receive another expert's weights. Each layer's
//! token-level state (placement/token_refine.hpp) proposes its best swaps one at a time (load
//! repairs first, of the GPUs above the re-plan's bound, token_refine_options::replan_slack or, where
//! larger, two standard errors of a GPU's load from the spread of the window's requests, on the
//! loads the sample's load weights give (with_prior: the window's); then
//! the largest copy savings of the window's tokens within it, each above its own noise:
//! token_refine_options::swap_significance); the budget goes to the
//! largest gains over all layers, taking each layer's swaps in the order they were found (a later
//! swap was scored on the map its predecessors left). Replicas stay where they are. A swap moves
//! two experts, so the budget holds by construction; the result counts the slots that changed.
//! Deterministic: fixed orders, ties to the lower layer.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/placement/token_refine.hpp>
#include <queue>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Result of replan_by_tokens.
struct migration_result {
  std::vector<expert_map> maps;
  std::size_t experts_moved = 0; //!< slots whose expert changed (at most the budget)
  std::uint64_t bytes_moved = 0; //!< experts_moved × expert_bytes
  std::size_t swaps = 0;         //!< swaps applied
  double cost_before = 0;        //!< the sample's copy cost on the maps in service
  double cost_after = 0;         //!< ... and on the result
};

//! One slot whose expert changes: the engine loads `to`'s weights into it (`from` or `to` is
//! empty_slot where the slot was or becomes empty).
struct slot_move {
  std::size_t layer = 0, rank = 0, slot = 0;
  expert_id from = empty_slot, to = empty_slot;
};

//! The slots whose expert differs between two map sets of the same shape (the weights a move must
//! load), by layer, rank, slot.
//! @throws locus::config_error when the shapes differ
inline std::vector<slot_move> slot_moves(const std::vector<expert_map>& before, const std::vector<expert_map>& after) {
  LOCUS_REQUIRE(before.size() == after.size(), config_error, "slot_moves: ", before.size(), " layers before, ",
                after.size(), " after");
  std::vector<slot_move> out;
  for (std::size_t l = 0; l < before.size(); ++l) {
    const auto &a = before[l], &b = after[l];
    LOCUS_REQUIRE(a.ranks() == b.ranks() && a.slots_per_rank() == b.slots_per_rank(), config_error,
                  "slot_moves: layer ", l, " has ", a.ranks(), " × ", a.slots_per_rank(), " slots before and ",
                  b.ranks(), " × ", b.slots_per_rank(), " after");
    for (std::size_t r = 0; r < a.ranks(); ++r)
      for (std::size_t s = 0; s < a.slots_per_rank(); ++s)
        if (a.expert_at(r, s) != b.expert_at(r, s)) out.push_back({l, r, s, a.expert_at(r, s), b.expert_at(r, s)});
  }
  return out;
}

//! How many slots slot_moves lists.
//! @throws as slot_moves
inline std::size_t experts_moved(const std::vector<expert_map>& before, const std::vector<expert_map>& after) {
  return slot_moves(before, after).size();
}

//! `after` with each rank's slots reordered so that an expert (or empty slot) the rank holds in both
//! maps stays in the slot it had in `before`: the rank's contents and so every GPU's load are
//! `after`'s, the weights moved are the fewest that reach them without moving experts between ranks
//! (what vLLM's EPLB does with the map in service, `preserve_intragpu_slots`). A full re-plan (EPLB,
//! a per-phase plan) places experts with no regard to slots: without this an expert that stays on
//! its GPU would count as moved wherever its slot changed.
//! @throws locus::config_error when the two maps differ in shape
inline expert_map keep_slots_in_place(const expert_map& before, const expert_map& after) {
  LOCUS_REQUIRE(before.experts() == after.experts() && before.ranks() == after.ranks() &&
                    before.slots_per_rank() == after.slots_per_rank(),
                config_error, "keep_slots_in_place: maps of ", before.experts(), " experts on ", before.ranks(), " × ",
                before.slots_per_rank(), " slots and of ", after.experts(), " on ", after.ranks(), " × ",
                after.slots_per_rank());
  const std::size_t spr = after.slots_per_rank();
  std::vector<expert_id> table(after.slot_count());
  for (std::size_t r = 0; r < after.ranks(); ++r) {
    std::vector<expert_id> left(spr);
    for (std::size_t s = 0; s < spr; ++s)
      left[s] = after.expert_at(r, s);
    std::vector<bool> placed(spr, false), used(spr, false);
    // First every slot whose old expert the rank keeps (a multiset: two replicas of one expert on
    // a rank keep two slots), then the rank's other experts in `after`'s order.
    for (std::size_t s = 0; s < spr; ++s) {
      const expert_id e = before.expert_at(r, s);
      for (std::size_t i = 0; i < spr; ++i)
        if (!used[i] && left[i] == e) {
          table[r * spr + s] = e;
          used[i] = placed[s] = true;
          break;
        }
    }
    std::size_t next = 0;
    for (std::size_t s = 0; s < spr; ++s) {
      if (placed[s]) continue;
      while (used[next])
        ++next;
      table[r * spr + s] = left[next];
      used[next] = true;
    }
  }
  return expert_map(after.experts(), after.ranks(), spr, std::move(table));
}

//! keep_slots_in_place per layer.
//! @throws locus::config_error when the map sets differ in layers or shapes
inline std::vector<expert_map> keep_slots_in_place(const std::vector<expert_map>& before,
                                                   std::vector<expert_map> after) {
  LOCUS_REQUIRE(before.size() == after.size(), config_error, "keep_slots_in_place: ", before.size(), " layers before, ",
                after.size(), " after");
  for (std::size_t l = 0; l < after.size(); ++l)
    after[l] = keep_slots_in_place(before[l], after[l]);
  return after;
}

//! Slots of all layers (the denominator of a moved share).
inline std::size_t total_slots(const std::vector<expert_map>& maps) {
  std::size_t n = 0;
  for (const auto& m : maps)
    n += m.slot_count();
  return n;
}

//! The largest expert the command line and Python take for the weight bytes moved (a tebibyte).
inline constexpr std::uint64_t max_expert_bytes = std::uint64_t{1} << 40;

//! The slots a re-plan may move for a budget of `share` of all layers' slots: the floor of their
//! product, but a share written as a decimal counts in full (0.57 of 100 slots is 57, where the
//! product of the binary 0.57 and 100 is 56.99999999999999).
//! @throws locus::config_error when `share` is not a number from 0 to 1
inline std::size_t budget_slots(double share, const std::vector<expert_map>& maps) {
  // A NaN counted every slot, a negative share wrapped to 2^64 - 2,000 slots.
  LOCUS_REQUIRE(std::isfinite(share) && share >= 0 && share <= 1, config_error, "budget share ", share,
                " (expected a share of the slots from 0 to 1)");
  const double slots = static_cast<double>(total_slots(maps));
  const double exact = share * slots;
  return static_cast<std::size_t>(std::min(slots, std::floor(exact + exact * 1e-12)));
}

//! Refuses a budget share above 0 that leaves fewer than two slots: a move swaps two experts, so
//! such a budget would re-plan nothing without a word (0 itself asks for no move). `what` names
//! the setting in the message.
//! @throws locus::config_error naming the smallest share that moves a pair
inline void require_movable_budget(double share, const std::vector<expert_map>& maps, const std::string& what) {
  LOCUS_REQUIRE(std::isfinite(share) && share >= 0 && share <= 1, config_error, what, " ", share,
                " (expected a share of the slots from 0 to 1)");
  if (share == 0 || budget_slots(share, maps) >= 2) return;
  const std::size_t slots = total_slots(maps);
  LOCUS_REQUIRE(slots >= 2, config_error, what, " ", share, ": the maps have ", slots,
                " slot in all; a move swaps two experts");
  LOCUS_THROW(config_error, what, " ", share, " of the ", slots, " slots (all layers) is ", budget_slots(share, maps),
              budget_slots(share, maps) == 1 ? " slot" : " slots",
              "; a move swaps two experts, so nothing could move: give at least ",
              std::ceil(2e6 / static_cast<double>(slots)) / 1e6, " (0 moves nothing)");
}

//! The migration budget a caller gets without giving one: 10% of all slots, or, where that is under
//! two slots (maps of fewer than 20 slots in all), the least share that moves a pair (a move swaps
//! two experts), so that a small plan re-plans by default instead of being refused.
inline constexpr double default_budget_share = 0.10;
inline double default_budget_for(const std::vector<expert_map>& maps) {
  const std::size_t slots = total_slots(maps);
  if (slots < 2 || budget_slots(default_budget_share, maps) >= 2) return default_budget_share;
  return std::min(1.0, 2.0 / static_cast<double>(slots));
}

//! with_prior's weight of the prior, in requests. On ESFT's drift scenario (split seed 1, re-plan
//! bound 1.175) 32 keeps 99% of the per-phase oracle's byte saving against 94% with 0 (the
//! window's loads alone), at GPU max/mean 1.22 against 1.17 over the phase the shift unbalanced
//! most, and where a domain no plan saw arrives saves 20.2% against 18.7% with a worst window of
//! 1.69 against 1.76 (bench/results/robust_planning.md, section 2).
inline constexpr double default_prior_requests = 32;

//! A re-plan's sample: the window's tokens, then a prior's (e.g. the training sample the maps in
//! service were fitted to). A window is a small sample, and swaps fitted to it alone chase its
//! noise: the prior's tokens steer which swaps save copies. But the window says which GPUs are busy
//! now: a prior counted in full in the loads hides the imbalance a shifted mix brings, and the
//! re-plan's repairs then never see it (bench/results/robust_planning.md, section 2). So the prior
//! counts in the loads (token_sample::load_weight) as `prior_requests` requests would beside the
//! window's distinct requests (token_sample::request; without them every token is its own): a
//! window of a few long requests, whose tokens say little about the traffic to come, leans on the
//! prior; a window of hundreds barely does. An empty prior returns the window unchanged; else the
//! result has no mix groups, and request ids where the window has them (the prior's after the
//! window's, a prior token without one its own: the significance rule sums a saving per request).
//! @throws locus::config_error when the two samples differ in shape, the window already has load
//!         weights, or prior_requests is negative, not finite or so large that a prior token's load
//!         weight leaves a float's range
inline token_sample with_prior(token_sample window, const token_sample& prior,
                               double prior_requests = default_prior_requests) {
  LOCUS_REQUIRE(std::isfinite(prior_requests) && prior_requests >= 0, config_error, "with_prior: prior_requests (",
                prior_requests, ") must be a finite number >= 0");
  if (prior.tokens() == 0) return window;
  LOCUS_REQUIRE(window.experts == prior.experts && window.top_k == prior.top_k && window.layers() == prior.layers(),
                config_error, "with_prior: a window of ", window.layers(), " layers, ", window.experts,
                " experts, top-", window.top_k, " and a prior of ", prior.layers(), " layers, ", prior.experts,
                " experts, top-", prior.top_k);
  LOCUS_REQUIRE(window.load_weight.empty(), config_error, "with_prior: the window already has load weights");
  std::vector<std::uint32_t> seen = window.request;
  std::sort(seen.begin(), seen.end());
  const auto requests = window.request.empty()
                            ? static_cast<double>(window.tokens())
                            : static_cast<double>(std::unique(seen.begin(), seen.end()) - seen.begin());
  // The prior's total load weight is the window's tokens × prior_requests / the window's requests.
  const double share = requests > 0 ? prior_requests / requests : 0.0;
  const auto w = static_cast<float>(share * static_cast<double>(window.tokens()) / static_cast<double>(prior.tokens()));
  LOCUS_REQUIRE(std::isfinite(w), config_error, "with_prior: prior_requests ", prior_requests,
                " gives each prior token a load weight beyond a float's range");
  window.mix_group.clear();
  window.request_class.clear(); // read by the replica fill's hedge only, which a re-plan does not run
  // Request ids go on (the significance rule sums a saving per request): the prior's, numbered
  // densely so that they cannot wrap, after the window's; a prior token without one its own request.
  if (!window.request.empty()) {
    const std::uint64_t next = std::uint64_t{*std::max_element(window.request.begin(), window.request.end())} + 1;
    const auto [dense, count] = prior.request.empty()
                                    ? std::pair<std::vector<std::uint32_t>, std::size_t>{{}, prior.tokens()}
                                    : dense_request_ids(prior.request);
    LOCUS_REQUIRE(next + count <= std::uint64_t{std::numeric_limits<std::uint32_t>::max()} + 1, config_error,
                  "with_prior: the window's request ids (up to ", next - 1, ") leave no room for the prior's ", count,
                  " requests");
    for (std::size_t t = 0; t < prior.tokens(); ++t)
      window.request.push_back(static_cast<std::uint32_t>(next + (dense.empty() ? t : dense[t])));
  }
  window.prior_from = window.tokens();
  window.load_weight.assign(window.tokens(), 1.0f);
  window.load_weight.resize(window.tokens() + prior.tokens(), w);
  window.home.insert(window.home.end(), prior.home.begin(), prior.home.end());
  for (std::size_t l = 0; l < window.layers(); ++l)
    window.ids[l].insert(window.ids[l].end(), prior.ids[l].begin(), prior.ids[l].end());
  return window;
}

namespace detail::migration {

//! The relative standard error of a GPU's load in layer `l` of `sample` under `map` that the
//! window's sampling leaves: from the spread of the window's requests' contributions (a replicated
//! expert's copies split evenly among its replicas), as a ratio estimator, so that requests of
//! different lengths that load the GPUs alike add no noise: the root of R / (R - 1) × the sum over
//! the window's R requests of (y_rg - s_g y_r)², with y_rg request r's load on GPU g, y_r its whole
//! load and s_g the window's share of g, over the GPU's load (a prior's, token_sample::prior_from,
//! included: a fixed reference, it adds load and no noise), for the busiest GPU. Infinite for a
//! window of fewer than two requests. `requests`: the sample's dense request ids
//! and their count (dense_request_ids; a prior's follow the window's).
inline double request_load_noise(const expert_map& map, const token_sample& sample, std::size_t l,
                                 const std::pair<std::vector<std::uint32_t>, std::size_t>& requests) {
  const std::size_t G = map.ranks(), k = sample.top_k, window = std::min(sample.prior_from, sample.tokens());
  std::size_t R = 0;
  for (std::size_t t = 0; t < window; ++t)
    R = std::max<std::size_t>(R, std::size_t{requests.first[t]} + 1);
  if (R < 2) return std::numeric_limits<double>::infinity();
  const auto& ids = sample.ids[l];
  // Calls `f(token, rank, share)` for every copy of the tokens below `end`, split among its replicas.
  const auto each_copy = [&](std::size_t end, auto&& f) {
    for (std::size_t t = 0; t < end; ++t) {
      const double w = sample.load_weight.empty() ? 1.0 : static_cast<double>(sample.load_weight[t]);
      for (std::size_t j = 0; j < k; ++j) {
        const auto replicas = map.replicas(ids[t * k + j]);
        const double share = w / static_cast<double>(replicas.size());
        for (const auto& r : replicas)
          f(t, static_cast<std::size_t>(r.rank), share);
      }
    }
  };
  // The busiest GPU's: the one a repair would start from (a GPU loaded by one request alone is
  // noisy, but says nothing about whether the busiest one is).
  std::vector<double> load(G, 0.0);
  each_copy(sample.tokens(), [&](std::size_t, std::size_t rank, double share) { load[rank] += share; });
  const std::size_t g = static_cast<std::size_t>(std::max_element(load.begin(), load.end()) - load.begin());
  std::vector<double> on_g(R, 0.0), per_request(R, 0.0); // per window request: its load on g, in all
  each_copy(window, [&](std::size_t t, std::size_t rank, double share) {
    per_request[requests.first[t]] += share;
    if (rank == g) on_g[requests.first[t]] += share;
  });
  double all = 0.0, window_on_g = 0.0;
  for (std::size_t r = 0; r < R; ++r) {
    all += per_request[r];
    window_on_g += on_g[r];
  }
  if (load[g] <= 0 || all <= 0) return 0.0;
  const double share = window_on_g / all;
  double squares = 0.0;
  for (std::size_t r = 0; r < R; ++r) {
    const double d = on_g[r] - share * per_request[r];
    squares += d * d;
  }
  return std::sqrt(squares * static_cast<double>(R) / static_cast<double>(R - 1)) / load[g];
}

} // namespace detail::migration

//! See the file comment. `opt` gives the load bound and the copy weights (balance_shift and
//! annealing do not apply here). `per_layer_cap` bounds the swaps one layer may propose (0: twice
//! an even share of the budget, plus two: a layer that drifted more may take more than its share,
//! and the time stays proportional to the budget).
//! @throws locus::config_error when the maps, the sample and the topology disagree
template <class Topology>
migration_result replan_by_tokens(const std::vector<expert_map>& current, const token_sample& sample,
                                  const Topology& topo, const token_refine_options& opt, std::size_t max_moved_experts,
                                  std::uint64_t expert_bytes, std::size_t per_layer_cap = 0) {
  LOCUS_REQUIRE(current.size() == sample.layers(), config_error, "replan_by_tokens: ", current.size(),
                " maps for a sample of ", sample.layers(), " layers");
  LOCUS_REQUIRE(opt.balance_slack >= 0 && opt.replan_slack >= 0 && std::isfinite(opt.replan_slack) &&
                    detail::token_refine::finite_weights(opt) && opt.swap_significance >= 0 &&
                    std::isfinite(opt.swap_significance),
                config_error, "replan_by_tokens: a slack (", opt.balance_slack,
                ") that is not a number >= 0, copy weights (", opt.rank_copy_weight, ", ", opt.node_copy_weight,
                ") that are not finite numbers >= 0, or a replan_slack (", opt.replan_slack, ") or swap_significance (",
                opt.swap_significance, ") that is not a finite number >= 0");
  sample.validate(topo.nodes());
  // The moved bytes are counted in 64 bits: a product that wraps would report a small figure.
  LOCUS_REQUIRE(expert_bytes == 0 || total_slots(current) <= std::numeric_limits<std::uint64_t>::max() / expert_bytes,
                config_error, "replan_by_tokens: ", total_slots(current), " slots of ", expert_bytes,
                " bytes each exceed 2^64 bytes");
  const std::size_t layers = current.size();
  const std::size_t swaps_total = max_moved_experts / 2;
  const std::size_t share = (swaps_total + layers - 1) / std::max<std::size_t>(1, layers);
  // 2 × share + 2 saturates at swaps_total: an unbounded budget (SIZE_MAX) wrapped it to 0 swaps.
  const std::size_t spread = share >= swaps_total / 2 ? swaps_total : 2 * share + 2;
  const std::size_t cap = std::min(swaps_total, per_layer_cap ? per_layer_cap : spread);
  auto plain = opt;
  plain.balance_shift = 0;
  // The re-plan's own load bound (token_refine_options::replan_slack). A window is a small sample:
  // the bound is at least two standard errors of a rank's sampled load, so that the budget is not
  // spent on repairing sampling noise (counting copies as independent draws here, and per layer
  // below, from the spread of the requests' contributions).
  plain.balance_slack = std::max(plain.balance_slack, opt.replan_slack);
  const double per_rank = sample.load_tokens() * static_cast<double>(sample.top_k) / static_cast<double>(topo.ranks());
  if (per_rank > 0) plain.balance_slack = std::max(plain.balance_slack, 2.0 / std::sqrt(per_rank));
  std::vector<std::vector<typename detail::token_refine::layer_state<Topology>::swap_step>> found(layers);
  migration_result out;
  const auto requests = dense_request_ids(sample.request); // for the significance rule, once for every layer
  for (std::size_t l = 0; l < layers; ++l) {
    throw_if_cancelled();
    LOCUS_REQUIRE(current[l].ranks() == topo.ranks() && current[l].experts() == sample.experts, config_error,
                  "replan_by_tokens: layer ", l, " map (", current[l].experts(), " experts, ", current[l].ranks(),
                  " ranks) does not match the sample (", sample.experts, ") or the topology (", topo.ranks(), ")");
    // Nor on the noise of the window's requests: a request's tokens route alike (and the planner
    // put experts that fire together on one GPU), so its copies are no independent draws, and a
    // window of one request repaired "hot" GPUs with the whole budget, raising its copies.
    auto layer_opt = plain;
    if (!sample.request.empty())
      layer_opt.balance_slack = std::max(layer_opt.balance_slack,
                                         2.0 * detail::migration::request_load_noise(current[l], sample, l, requests));
    detail::token_refine::layer_state<Topology> s(current[l], sample.ids[l], sample.home, sample.top_k, topo, layer_opt,
                                                  l, {}, sample.load_weight);
    out.cost_before += s.total_cost();
    s.cluster_by(requests.first, requests.second);
    if (cap > 0) s.best_swaps(cap, found[l]);
  }
  // Largest gains first over all layers, each layer's swaps in their own order (repairs first).
  const auto key = [&](std::size_t l, std::size_t i) {
    const auto& st = found[l][i];
    return st.repair ? std::numeric_limits<double>::infinity() : st.gain;
  };
  using item = std::pair<double, std::size_t>; // (gain, -layer ordering through the comparator)
  const auto worse = [](const item& x, const item& y) {
    return x.first < y.first || (x.first == y.first && x.second > y.second);
  };
  std::priority_queue<item, std::vector<item>, decltype(worse)> heap(worse);
  std::vector<std::size_t> taken(layers, 0);
  for (std::size_t l = 0; l < layers; ++l)
    if (!found[l].empty()) heap.push({key(l, 0), l});
  for (std::size_t used = 0; used < swaps_total && !heap.empty(); ++used) {
    const std::size_t l = heap.top().second;
    heap.pop();
    if (++taken[l] < found[l].size()) heap.push({key(l, taken[l]), l});
  }
  out.maps.reserve(layers);
  for (std::size_t l = 0; l < layers; ++l) {
    auto table = current[l].slot_table();
    for (std::size_t i = 0; i < taken[l]; ++i) {
      const auto e = static_cast<expert_id>(found[l][i].e), f = static_cast<expert_id>(found[l][i].f);
      std::size_t se = table.size(), sf = table.size();
      for (std::size_t s = 0; s < table.size(); ++s) {
        if (table[s] == e) se = s;
        if (table[s] == f) sf = s;
      }
      std::swap(table[se], table[sf]);
    }
    out.maps.emplace_back(current[l].experts(), current[l].ranks(), current[l].slots_per_rank(), std::move(table));
    out.swaps += taken[l];
    out.cost_after += detail::token_refine::layer_state<Topology>(out.maps.back(), sample.ids[l], sample.home,
                                                                  sample.top_k, topo, plain, l)
                          .total_cost();
  }
  out.experts_moved = experts_moved(current, out.maps);
  out.bytes_moved = static_cast<std::uint64_t>(out.experts_moved) * expert_bytes;
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
