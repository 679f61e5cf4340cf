#pragma once
//! @file
//! Re-planning the maps an engine serves with, on traffic it recorded: the budgeted re-planner of
//! placement/migration.hpp (the one `locus simulate --drift-every` and bench/drift run) for a
//! window of real routing. The engine logs a window of its routing (a trace: every token's top-k
//! per layer) and which node served each request; `replan_live` returns maps that move at most a
//! share of the slots, the slots whose weights must be loaded, and what the window says of both
//! maps: inter-node copies per token and the lowest GPU max/mean a replica split reaches.
//! `locus map replan` and `locus.replan` (Python) call it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/topology.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/split_floor.hpp>
#include <locus/trace/trace.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Options of replan_live.
struct live_replan_options {
  double budget_share = 0.10; //!< share of all slots (all layers) whose weights may change
  //! The prior's weight in the loads, in requests (with_prior); the prior steers the copy savings.
  double prior_requests = default_prior_requests;
  copy_count copies = copy_count::flat; //!< the copies to save: the engine's transport
  //! The engine's replica rule: where a replicated expert's copy goes in the copies counted and
  //! saved (locality_bounded counts as locality_first: its hot GPUs change with the traffic).
  replica_rule replicas = replica_rule::locality_first;
  double replan_slack = token_refine_options{}.replan_slack; //!< the re-plan's load bound over the mean
  std::size_t sample_tokens = 0;  //!< tokens sampled from the window (and the prior); 0: the planner's default
  std::uint64_t expert_bytes = 0; //!< weight bytes of one expert (moved bytes = moved slots × this)
};

//! What replan_live returns.
struct live_replan_result {
  std::vector<expert_map> maps;
  std::vector<slot_move> moves; //!< the slots whose weights change (at most budget_slots)
  std::size_t budget_slots = 0;
  std::uint64_t bytes_moved = 0;
  double moved_share = 0; //!< moves over all slots
  //! Inter-node copies per decode token of the window sample (the transport's bytes over the
  //! copy size; with copy_count::both the flat and the hierarchical count summed, the cost the
  //! re-plan lowers), on the maps in service and on the result.
  double copies_per_token_before = 0, copies_per_token_after = 0;
  //! The lowest GPU max/mean any split of the window's rows among the replicas reaches (mean over
  //! layers): with no replicas the maps' own; the replica rule at run time is at or above it.
  double balance_floor_before = 1, balance_floor_after = 1;
  std::size_t window_requests = 0, window_decode_tokens = 0, sample_tokens = 0, prior_tokens = 0;
};

namespace detail {
// Per layer, the rows of each expert over the decode tokens of `t`.
inline std::vector<std::vector<double>> decode_rows(const trace::trace& t) {
  std::vector<std::vector<double>> rows(t.layers(), std::vector<double>(t.experts(), 0.0));
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    for (std::size_t tok = 0; tok < t.tokens(); ++tok)
      if (t.token_phase(tok) == trace::phase::decode)
        for (std::size_t j = 0; j < t.top_k(); ++j)
          rows[l][view.expert(tok, j)] += 1.0;
  }
  return rows;
}

// Mean over layers of the lowest GPU max/mean the maps allow on per-layer expert rows.
inline double balance_floor(const std::vector<expert_map>& maps, const std::vector<std::vector<double>>& rows) {
  double sum = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    throw_if_cancelled();
    sum += min_max_split(maps[l], rows[l]).max_over_mean;
  }
  return maps.empty() ? 1.0 : sum / static_cast<double>(maps.size());
}
} // namespace detail

//! The nodes of a window's requests where no record says where they ran: their class's node under
//! the grouping `model` for requests its classes recognise (grouper::class_nodes), the others, or
//! all without a model, over the `nodes` nodes in turn.
inline std::vector<std::uint32_t> assumed_request_nodes(const trace::trace& t, const grouper::workload_model* model,
                                                        std::size_t nodes, std::size_t prefill_tokens) {
  if (model) return grouper::class_nodes(*model, t, prefill_tokens);
  std::vector<std::uint32_t> out(t.requests());
  for (std::size_t r = 0; r < out.size(); ++r)
    out[r] = static_cast<std::uint32_t>(r % nodes);
  return out;
}

//! Refuses maps, a window and a topology that disagree (replan_live's first check; callers that
//! derive the window's nodes from it first call it before). `map_layers`, the hidden-layer index of
//! each map where the plan saved them: a window that records its own must name the same layers
//! (layers are matched by position, so an offset by one would re-plan each layer on its neighbour's
//! traffic).
//! @throws locus::config_error naming both shapes
inline void require_replan_shape(const std::vector<expert_map>& current, const trace::trace& window,
                                 const dynamic_topology& topo, std::span<const std::size_t> map_layers = {},
                                 const char* what = "window") {
  LOCUS_REQUIRE(!current.empty() && current.size() == window.layers() &&
                    current.front().experts() == window.experts() && current.front().ranks() == topo.ranks(),
                config_error, "re-plan: maps of ", current.size(), " layers × ",
                current.empty() ? 0 : current.front().experts(), " experts on ",
                current.empty() ? 0 : current.front().ranks(), " ranks for a ", what, " of ", window.layers(),
                " layers × ", window.experts(), " experts and ", topo.ranks(), " ranks");
  if (map_layers.empty() || !window.has_model_layers()) return;
  const auto ids = window.model_layer_ids();
  for (std::size_t l = 0; l < ids.size(); ++l)
    LOCUS_REQUIRE(l < map_layers.size() && ids[l] == map_layers[l], config_error, "re-plan: the ", what, "'s layer ", l,
                  " is hidden layer ", ids[l], ", the map's is ", l < map_layers.size() ? map_layers[l] : 0, " (the ",
                  what, "'s layers are hidden layers ", ids.front(), "..", ids.back(), ", the map's ",
                  map_layers.front(), "..", map_layers.back(), ")");
}

//! Re-plans `current` (the maps in service) on the decode tokens of `window`, request r of which
//! ran on node `window_nodes[r]`, moving at most budget_share of the slots; `prior` (with its
//! requests' nodes), when given, is the traffic the maps were fitted to (placement::with_prior).
//! Deterministic.
//! @throws locus::config_error on options out of range or maps, traces and topology that disagree;
//!         when the window, or a prior given, has no decode token
inline live_replan_result replan_live(const std::vector<expert_map>& current, const trace::trace& window,
                                      std::span<const std::uint32_t> window_nodes, const dynamic_topology& topo,
                                      const live_replan_options& opt, const trace::trace* prior = nullptr,
                                      std::span<const std::uint32_t> prior_nodes = {}) {
  LOCUS_REQUIRE(std::isfinite(opt.budget_share) && opt.budget_share >= 0 && opt.budget_share <= 1, config_error,
                "re-plan: the budget (", opt.budget_share, ") must be a share of the slots from 0 to 1");
  require_replan_shape(current, window, topo);
  const auto check_nodes = [&](std::span<const std::uint32_t> nodes, const trace::trace& t, const char* what) {
    LOCUS_REQUIRE(nodes.size() == t.requests(), config_error, "re-plan: ", nodes.size(), " nodes for the ",
                  t.requests(), " requests of the ", what);
    for (std::size_t r = 0; r < nodes.size(); ++r)
      LOCUS_REQUIRE(nodes[r] < topo.nodes(), config_error, "re-plan: request ", r, " of the ", what, " runs on node ",
                    nodes[r], " of ", topo.nodes());
  };
  check_nodes(window_nodes, window, "window");
  if (prior) {
    LOCUS_REQUIRE(prior->layers() == window.layers() && prior->experts() == window.experts() &&
                      prior->top_k() == window.top_k(),
                  config_error, "re-plan: the prior (", prior->layers(), " layers × ", prior->experts(),
                  " experts, top-", prior->top_k(), ") does not match the window (", window.layers(), " × ",
                  window.experts(), ", top-", window.top_k(), ")");
    check_nodes(prior_nodes, *prior, "prior");
  }
  activation_plan_options popt;
  const std::size_t tokens =
      opt.sample_tokens ? opt.sample_tokens : popt.refine_sample_tokens(window.layers(), window.top_k());
  const auto sample = decode_token_sample(window, window_nodes, tokens);
  LOCUS_REQUIRE(sample.tokens() > 0, config_error, "re-plan: the window has no decode tokens (mark its prefill)");
  const auto fitted = prior ? decode_token_sample(*prior, prior_nodes, tokens) : token_sample{};
  // with_prior returns the window alone for an empty prior: a prior given must say something.
  LOCUS_REQUIRE(!prior || fitted.tokens() > 0, config_error,
                "re-plan: the prior has no decode tokens (mark its prefill)");
  // An enum cast from a number counted both kinds of copies without a word.
  LOCUS_REQUIRE(
      opt.copies == copy_count::flat || opt.copies == copy_count::hierarchical || opt.copies == copy_count::both,
      config_error, "re-plan: copies ", static_cast<unsigned>(opt.copies), " is none of flat, hierarchical and both");
  LOCUS_REQUIRE(static_cast<std::size_t>(opt.replicas) < all_replica_rules.size(), config_error,
                "re-plan: replica rule ", static_cast<unsigned>(opt.replicas), " is none of locus's");
  token_refine_options refine = popt.refine;
  refine.count(opt.copies);
  refine.replicas.rule = opt.replicas;
  refine.replan_slack = opt.replan_slack;
  require_movable_budget(opt.budget_share, current, "re-plan: the budget");
  live_replan_result out;
  out.budget_slots = budget_slots(opt.budget_share, current);
  auto moved = replan_by_tokens(current, with_prior(sample, fitted, opt.prior_requests), topo, refine, out.budget_slots,
                                opt.expert_bytes);
  out.maps = std::move(moved.maps);
  out.moves = slot_moves(current, out.maps);
  out.bytes_moved = moved.bytes_moved;
  out.moved_share = static_cast<double>(out.moves.size()) / static_cast<double>(total_slots(current));
  // The window's own copies (the prior's tokens left out).
  const double n = static_cast<double>(sample.tokens());
  out.copies_per_token_before = sample_copy_cost(current, sample, topo, refine) / n;
  out.copies_per_token_after = sample_copy_cost(out.maps, sample, topo, refine) / n;
  const auto rows = detail::decode_rows(window);
  out.balance_floor_before = detail::balance_floor(current, rows);
  out.balance_floor_after = detail::balance_floor(out.maps, rows);
  out.window_requests = window.requests();
  for (std::size_t t = 0; t < window.tokens(); ++t)
    out.window_decode_tokens += window.token_phase(t) == trace::phase::decode;
  out.sample_tokens = sample.tokens();
  out.prior_tokens = fitted.tokens();
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
