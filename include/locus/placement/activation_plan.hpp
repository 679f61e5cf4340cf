#pragma once
//! @file
//! One call that fits what an activation-aware deployment needs on a training trace: the
//! workload-aware grouping model and the per-layer expert maps of a named placement. For
//! `activation_usage` (the published method) the grouping is the model's own token-balanced one;
//! for `locality` it is jointly refined with the placement (placement::refine_grouping); the
//! baselines (linear, round_robin, eplb) are planned as usual beside the same model, so that every
//! placement can be paired with every grouper. `locality` maps then get the token-level stage
//! (placement/token_refine.hpp) on a sample of the training decode tokens, each on the node the
//! grouping gives its request.

#include <algorithm>
#include <cmath>
#include <locus/grouper/workload_aware.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/token_refine.hpp>
#include <locus/placement/trace_load.hpp>
#include <memory>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! What one shifted mix of token_refine_options::balance_shift grows: the tokens of one node, of
//! one request class (the grouping model's cluster: a task domain's share is what moves when the
//! mix moves), or of one training request (a resample of the requests: with few long requests
//! the test mix differs from the training one by which requests it holds).
enum class shift_group : std::uint8_t { node, request_class, request };

//! Options of plan_activation_aware.
struct activation_plan_options {
  grouper::workload_aware_options grouping{};
  named_plan_options named{};
  joint_options joint{};
  //! Fit the workload-aware grouping model even when the placement does not use it (only
  //! activation_usage and locality do), for the serving side's grouping: on by default, so a
  //! trace without prefill tokens (nothing to fit on) is refused unless it is turned off; off,
  //! the baselines plan alone and activation_plan::model stays empty.
  bool fit_grouping = true;
  bool joint_grouping = true; //!< refine the grouping with the placement when it is `locality`
  bool token_refine = true;   //!< run the token-level stage on `locality` maps
  bool token_replicas = true; //!< with it, choose replicas on the exact copy cost too
  token_refine_options refine{};
  //! With refine.balance_shift: what each shifted mix grows (see shift_group).
  shift_group shift_by = shift_group::node;
  //! (token, expert) pairs per layer the token-level stage samples at most (its time grows with
  //! them) ...
  std::size_t refine_sample_pairs = 24576;
  //! ... and over all layers together (deep models get a smaller sample per layer)
  std::size_t refine_total_pairs = std::size_t{1} << 20;

  //! Tokens the token-level stage samples for a trace of `layers` layers and top-k `k`.
  std::size_t refine_sample_tokens(std::size_t layers, std::size_t k) const {
    const std::size_t per_layer = std::min(refine_sample_pairs, refine_total_pairs / std::max<std::size_t>(1, layers));
    return std::max<std::size_t>(1, per_layer / std::max<std::size_t>(1, k));
  }
};

//! Up to `max_tokens` decode tokens (evenly strided; 0: all) of the requests `requests` of `t`,
//! request i's tokens on node `nodes[i]`; token_sample::request holds i.
//! @throws locus::config_error when `nodes` does not give one node per request or a request index
//!         is out of range
inline token_sample decode_token_sample(const trace::trace& t, std::span<const std::size_t> requests,
                                        std::span<const std::uint32_t> nodes, std::size_t max_tokens) {
  LOCUS_REQUIRE(nodes.size() == requests.size(), config_error, "token sample: ", nodes.size(), " nodes for ",
                requests.size(), " requests");
  std::size_t decode = 0;
  for (const std::size_t r : requests) {
    LOCUS_REQUIRE(r < t.requests(), config_error, "token sample: request ", r, " of a trace of ", t.requests());
    const auto& q = t.request(r);
    for (std::size_t i = 0; i < q.length; ++i)
      decode += t.token_phase(q.first_token + i) == trace::phase::decode;
  }
  const std::size_t stride = max_tokens == 0 ? 1 : std::max<std::size_t>(1, (decode + max_tokens - 1) / max_tokens);
  token_sample s;
  s.experts = t.experts();
  s.top_k = t.top_k();
  std::vector<std::uint64_t> picked;
  std::size_t seen = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const auto& q = t.request(requests[i]);
    for (std::size_t p = 0; p < q.length; ++p) {
      const std::uint64_t tok = q.first_token + p;
      if (t.token_phase(tok) != trace::phase::decode) continue;
      if (seen++ % stride != 0) continue;
      picked.push_back(tok);
      s.home.push_back(nodes[i]);
      s.request.push_back(static_cast<std::uint32_t>(i));
    }
  }
  s.ids.assign(t.layers(), std::vector<std::uint16_t>(picked.size() * s.top_k));
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    for (std::size_t i = 0; i < picked.size(); ++i)
      for (std::size_t j = 0; j < s.top_k; ++j)
        s.ids[l][i * s.top_k + j] = view.expert(picked[i], j);
  }
  return s;
}

//! The same over every request of `t`, request r's tokens on node `nodes[r]`.
//! @throws locus::config_error when `nodes` does not give one node per request
inline token_sample decode_token_sample(const trace::trace& t, std::span<const std::uint32_t> nodes,
                                        std::size_t max_tokens) {
  std::vector<std::size_t> requests(t.requests());
  std::iota(requests.begin(), requests.end(), std::size_t{0});
  return decode_token_sample(t, requests, nodes, max_tokens);
}

//! Up to `max_tokens` decode tokens of the model's training requests (evenly strided), each with
//! the node the model's grouping puts its request on.
//! @throws locus::config_error when the trace does not match the model
//! Each token's token_sample::mix_group is set as `groups` says (none for shift_group::node), and
//! its token_sample::request_class to its request's cluster.
inline token_sample token_sample_from_model(const trace::trace& train, const grouper::workload_model& m,
                                            std::size_t max_tokens, shift_group groups = shift_group::node) {
  LOCUS_REQUIRE(train.experts() == m.experts() && train.layers() == m.layers(), config_error,
                "token sample: the trace (", train.experts(), " experts, ", train.layers(),
                " layers) does not match the grouping model (", m.experts(), " experts, ", m.layers(), " layers)");
  std::vector<std::uint32_t> nodes;
  nodes.reserve(m.training_labels().size());
  for (const auto label : m.training_labels())
    nodes.push_back(m.cluster_node()[label]);
  auto s = decode_token_sample(train, m.training_requests(), nodes, max_tokens);
  s.request_class.reserve(s.request.size());
  for (const auto i : s.request)
    s.request_class.push_back(m.training_labels()[i]);
  if (groups == shift_group::request_class) s.mix_group = s.request_class;
  if (groups == shift_group::request) s.mix_group = s.request;
  return s;
}

//! The result: expert maps and the grouping model the workload_aware grouper runs on.
struct activation_plan {
  std::vector<expert_map> maps;
  std::shared_ptr<const grouper::workload_model> model; //!< empty when nothing needed it (fit_grouping)
  double local_fraction = 0; //!< training decode pairs kept local by the joint fit (locality only)
  //! Replica slots, over all layers, that hold balance hedges (token_refine_options::hedge_replicas;
  //! locality with replica slots only); the others hold copies that save bytes.
  std::size_t hedge_copies = 0;
};

//! The token-level stage on node-level `locality` maps: first copies refined, then (with
//! `fill_replicas`) the empty slots filled with replicas on the exact copy cost and the first
//! copies refined around them. `hedged`, when given, receives the balance hedges placed.
inline std::vector<expert_map> token_level_stage(std::vector<expert_map> maps, const token_sample& sample,
                                                 const dynamic_topology& topo, const activation_plan_options& opt,
                                                 bool fill_replicas, std::size_t* hedged = nullptr) {
  maps = refine_by_tokens(maps, sample, topo, opt.refine);
  if (!fill_replicas) return maps;
  LOCUS_REQUIRE(std::isfinite(opt.refine.fill_slack) && opt.refine.fill_slack >= 0, config_error, "plan: fill slack ",
                opt.refine.fill_slack, " (0: the balance slack, else a finite number > 0)");
  detail::token_refine::check_hedge_options(opt.refine, sample, "plan");
  auto fill = opt.refine; // under token_refine_options::fill_slack, when set
  if (fill.fill_slack > 0) fill.balance_slack = fill.fill_slack;
  maps = add_replicas_by_tokens(maps, sample, topo, fill, hedged);
  auto again = opt.refine; // a warm start: one more sweep catches most of what the replicas opened
  again.max_sweeps = std::min<std::size_t>(again.max_sweeps, 1);
  again.repair_load_bound = opt.refine.fill_slack > 0; // the fill's looser bound, brought back
  return refine_by_tokens(maps, sample, topo, again);
}

//! Fits the grouping model on `train` and plans `placement` with `redundant_per_rank` replica
//! slots per rank on `topo`.
//! @throws locus::config_error for an unknown placement or an unusable trace
inline activation_plan plan_activation_aware(const trace::trace& train, const dynamic_topology& topo,
                                             std::string_view placement, std::size_t redundant_per_rank,
                                             const activation_plan_options& opt = {}) {
  require_planner_name(placement); // a misspelt name, not the fit's complaint about the trace
  // A sample of no pair shrank the token-level stage to one token per layer without a word.
  LOCUS_REQUIRE(opt.refine_sample_pairs >= 1 && opt.refine_total_pairs >= 1, config_error,
                "plan: refine_sample_pairs (", opt.refine_sample_pairs, ") and refine_total_pairs (",
                opt.refine_total_pairs, ") must be at least 1");
  LOCUS_REQUIRE(opt.shift_by == shift_group::node || opt.shift_by == shift_group::request_class ||
                    opt.shift_by == shift_group::request,
                config_error, "plan: shift_by ", static_cast<unsigned>(opt.shift_by), " is none of locus's");
  // The planners keep per-node usage tables (layers × nodes × experts doubles, several copies);
  // refuse a deployment whose tables alone would not fit before anything is fitted.
  constexpr std::size_t max_node_usage_entries = std::size_t{1} << 25; // 256 MB of doubles
  LOCUS_REQUIRE(train.layers() * train.experts() <= max_node_usage_entries / topo.nodes(), config_error,
                "plan: ", topo.nodes(), " nodes × ", train.experts(), " experts × ", train.layers(),
                " layers of per-node usage exceed the planner's limit of ", max_node_usage_entries, " entries");
  (void)slots_for(train.experts(), topo.ranks(), redundant_per_rank); // slot counts checked before the slow fit
  plan_input in = plan_input_from_trace(train, topo, redundant_per_rank);
  activation_plan out;
  if (!opt.fit_grouping && placement != "activation_usage" && placement != "locality") {
    out.maps = plan_by_name(placement, in, opt.named);
    return out;
  }
  auto model = std::make_shared<grouper::workload_model>(grouper::workload_model::fit(train, topo, opt.grouping));
  if (placement == "locality" && opt.joint_grouping)
    out.local_fraction = refine_grouping(*model, in, opt.named.locality, opt.joint);
  in.node_load = model->node_load();
  if (placement == "locality" && opt.token_refine) {
    // With redundant slots and token_replicas the token-level stage chooses the replicas.
    const bool fill = opt.token_replicas && redundant_per_rank > 0;
    auto named = opt.named;
    if (fill) named.locality.replicas = false;
    const auto sample =
        token_sample_from_model(train, *model, opt.refine_sample_tokens(train.layers(), train.top_k()), opt.shift_by);
    out.maps = token_level_stage(plan_by_name(placement, in, named), sample, topo, opt, fill, &out.hedge_copies);
  } else {
    out.maps = plan_by_name(placement, in, opt.named);
  }
  out.model = std::move(model);
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
