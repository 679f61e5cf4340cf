#pragma once
//! @file
//! `refine_by_tokens` and `add_replicas_by_tokens`: the token-level stage of the locality planner.
//!
//! The node-level planner (placement/locality.hpp) minimises the (token, expert) pairs that leave
//! their node. The transports pay per token *copy*: flat sends one per distinct remote rank of a
//! token, hierarchical one per distinct remote node. Two experts that tokens use together cost one
//! copy when they sit on the same remote rank (node) and two when they do not, which pair counts
//! cannot see. This stage takes each layer's map and a sample of training tokens, each with the
//! node its request runs on, and swaps single-copy experts between ranks while the exact copy
//! cost of the sample falls:
//!   cost = rank_copy_weight × Σ_tokens (distinct remote ranks) + node_copy_weight × Σ_tokens
//!          (distinct remote nodes),
//! keeping every rank's expected load (pairs of the sample) under (1 + balance_slack) × the mean,
//! or no worse than before where a rank starts above it. For each expert, the gain of moving it
//! alone to every rank comes from its tokens' rank lists in O(its pairs + ranks); partners are
//! ranked by the sum of both move gains, and the best few are evaluated exactly from fresh rows (a
//! token that uses both keeps its ranks, so both moves are taken back for it). A sweep costs
//! O(sample pairs × candidates + experts²). Replicated experts stay where they are; a token's copy
//! for one of them goes where the engine's replica rule sends it (placement::replica_selector
//! under token_refine_options::replicas, over the sample's tokens in order, as one step, each token
//! from its sample_source_rank), and the copies are counted by the layout's rule (send_rank and row_link of
//! transport/detail/layout_token.hpp). The choice is made one copy at a time, without the locality
//! rules' joining (a copy taking a row its token already sends to a single-copy expert's rank), so
//! that moving a single-copy expert changes no replicated expert's choice: the cost the planners
//! lower is the traffic model's inter-node copies with joining left out (joining mostly lowers the
//! count, but also shifts the round robin's later turns). `sample_copy_cost` counts the joins: the
//! traffic model's copies exactly when one kind of copy is counted (copy_count::flat or
//! hierarchical; with both, the joins are the flat transport's). (A planner that fixed the joins
//! of the map it starts from and kept them while experts moved planned no better:
//! bench/results/robust_planning.md, section 11.)
//! With token_refine_options::anneal_per_expert, simulated annealing over random swaps (exact cost
//! change by one merge of the two experts' token lists) then starts from the sweeps' optimum,
//! keeps the best state it sees, and the sweeps run once more.
//! With token_refine_options::balance_shift the load bound also holds under request mixes where one
//! node's tokens grow by that share; a map above those bounds is first repaired by swaps.
//! `add_replicas_by_tokens` fills empty slots the same way: greedily the replica that saves the
//! most copies of the sample (lazy re-evaluation), under the same load bound, with the tokens'
//! copies going where the same replica rule sends them.
//! Deterministic: fixed orders, ties to the lower index.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/random.hpp>
#include <locus/core/topology.hpp>
#include <locus/placement/load_bound.hpp>
#include <locus/placement/split_floor.hpp>
#include <locus/trace/trace.hpp>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/replica_selection.hpp>
#include <numbers>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Request ids renumbered 0, 1, ... in ascending order of the ids, and how many there are (the
//! sample's requests once, for every layer's layer_state::cluster_by).
inline std::pair<std::vector<std::uint32_t>, std::size_t> dense_request_ids(std::span<const std::uint32_t> request) {
  std::vector<std::uint32_t> ids(request.begin(), request.end());
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::vector<std::uint32_t> dense(request.size());
  for (std::size_t t = 0; t < request.size(); ++t)
    dense[t] = static_cast<std::uint32_t>(std::lower_bound(ids.begin(), ids.end(), request[t]) - ids.begin());
  return {std::move(dense), ids.size()};
}

//! Training tokens for refine_by_tokens: per layer, `tokens × top_k` expert ids, and for every
//! token the node its request runs on (the same for every layer).
struct token_sample {
  std::size_t experts = 0;
  std::size_t top_k = 0;
  std::vector<std::uint32_t> home;             //!< per token: node of its request
  std::vector<std::vector<std::uint16_t>> ids; //!< per layer: tokens × top_k expert ids
  //! Optional, per token: the group whose share a shifted mix grows (token_refine_options::
  //! balance_shift), e.g. the request's class; empty: the token's node.
  std::vector<std::uint32_t> mix_group;
  //! Optional, per token: the request it comes from. Hedge replicas (token_refine_options::
  //! hedge_replicas) resample the requests; empty: every token is its own request.
  std::vector<std::uint32_t> request;
  //! Optional, per token: its request's class (the grouping model's cluster, which stands for a
  //! task domain). The floor hedge's draws shift the classes' shares with
  //! token_refine_options::hedge_class_spread; empty: no classes.
  std::vector<std::uint32_t> request_class;
  //! Optional, per token: its weight in the GPU loads that the load bounds and repairs hold (copy
  //! costs count every token once); empty: 1 each. A re-plan's prior tokens weigh less than the
  //! window's (migration.hpp's with_prior): they steer which swaps save copies, the window mostly
  //! says which GPUs are busy. Read by refine_by_tokens and replan_by_tokens; the replica fill
  //! refuses a weighted sample.
  std::vector<float> load_weight;
  //! The first token of a prior appended by with_prior (tokens from here on are the fixed reference
  //! a re-plan weighs, not the window's sample); tokens(): none.
  std::size_t prior_from = SIZE_MAX;

  std::size_t tokens() const noexcept { return home.size(); }
  //! The tokens' total load weight (tokens() without load_weight).
  double load_tokens() const noexcept {
    if (load_weight.empty()) return static_cast<double>(home.size());
    double w = 0;
    for (const float x : load_weight)
      w += x;
    return w;
  }
  std::size_t layers() const noexcept { return ids.size(); }

  //! @throws locus::invalid_input_error naming the layer, token or value that is wrong
  void validate(std::size_t nodes) const {
    LOCUS_REQUIRE(experts > 0 && top_k > 0 && top_k <= experts, invalid_input_error, "token_sample: ", experts,
                  " experts and top-k ", top_k, " are not a valid shape");
    for (std::size_t t = 0; t < home.size(); ++t)
      LOCUS_REQUIRE(home[t] < nodes, invalid_input_error, "token_sample: token ", t, " runs on node ", home[t], " of ",
                    nodes);
    LOCUS_REQUIRE(mix_group.empty() || mix_group.size() == home.size(), invalid_input_error,
                  "token_sample: ", mix_group.size(), " mix groups for ", home.size(), " tokens");
    LOCUS_REQUIRE(request.empty() || request.size() == home.size(), invalid_input_error,
                  "token_sample: ", request.size(), " request ids for ", home.size(), " tokens");
    LOCUS_REQUIRE(request_class.empty() || request_class.size() == home.size(), invalid_input_error,
                  "token_sample: ", request_class.size(), " request classes for ", home.size(), " tokens");
    LOCUS_REQUIRE(load_weight.empty() || load_weight.size() == home.size(), invalid_input_error,
                  "token_sample: ", load_weight.size(), " load weights for ", home.size(), " tokens");
    for (std::size_t t = 0; t < load_weight.size(); ++t)
      LOCUS_REQUIRE(std::isfinite(load_weight[t]) && load_weight[t] >= 0, invalid_input_error, "token_sample: token ",
                    t, " has load weight ", load_weight[t], " (a finite number >= 0 expected)");
    for (const auto g : mix_group)
      LOCUS_REQUIRE(g < 65536, invalid_input_error, "token_sample: mix group ", g, " (at most 65,535)");
    for (const auto c : request_class)
      LOCUS_REQUIRE(c < 65536, invalid_input_error, "token_sample: request class ", c, " (at most 65,535)");
    for (std::size_t l = 0; l < ids.size(); ++l) {
      LOCUS_REQUIRE(ids[l].size() == home.size() * top_k, invalid_input_error, "token_sample: layer ", l, " has ",
                    ids[l].size(), " ids for ", home.size(), " tokens × top-k ", top_k);
      for (std::size_t i = 0; i < ids[l].size(); ++i)
        LOCUS_REQUIRE(ids[l][i] < experts, invalid_input_error, "token_sample: layer ", l, " token ", i / top_k,
                      " names expert ", ids[l][i], " of ", experts);
      // The cost model indexes per-token rank lists by choice; a repeated expert breaks them.
      const std::size_t t = trace::first_repeated_choice(ids[l].data(), home.size(), top_k);
      LOCUS_REQUIRE(t == home.size(), invalid_input_error, "token_sample: layer ", l, " token ", t, " chooses expert ",
                    ids[l][t * top_k + trace::repeated_choice(ids[l].data() + t * top_k, top_k)],
                    " twice (a token's top-k experts must be distinct)");
    }
  }
};

//! The rank sample token `t` runs on: the sample names the node of a token's request, and its GPU
//! there is the token's index in the sample modulo the GPUs per node (a stand-in for where the
//! grouping put it; a sample whose nodes alternate with the same period as the GPUs puts a node's
//! tokens all on one GPU). Copy costs and replica choices are the transports' for a token from
//! this rank.
inline std::size_t sample_source_rank(std::size_t home, std::size_t t, std::size_t gpus_per_node) noexcept {
  return home * gpus_per_node + t % gpus_per_node;
}

//! The copies a plan is for: those of the flat transport (one per distinct remote GPU of a
//! token), of the hierarchical one (one per distinct remote node), or both weighed together.
enum class copy_count : std::uint8_t { flat, hierarchical, both };

//! The copy_count named "flat", "hierarchical" or "both".
//! @throws locus::config_error naming the accepted names for any other
inline copy_count parse_copy_count(std::string_view name) {
  if (name == "flat") return copy_count::flat;
  if (name == "hierarchical") return copy_count::hierarchical;
  LOCUS_REQUIRE(name == "both", config_error, "copies \"", std::string(name),
                "\" (expected flat, hierarchical or both)");
  return copy_count::both;
}

//! Options of refine_by_tokens and add_replicas_by_tokens.
struct token_refine_options {
  double rank_copy_weight = 1.0; //!< cost of a copy to a distinct remote rank (flat transport)
  double node_copy_weight = 1.0; //!< cost of a copy to a distinct remote node (hierarchical)
  double balance_slack = 0.03;   //!< rank load ≤ (1 + slack) × mean rank load (pairs of the sample)
  std::size_t max_sweeps = 6;    //!< sweeps over the experts at most
  std::size_t candidates = 3;    //!< swap partners evaluated exactly per expert and sweep
  double min_sweep_gain = 0.005; //!< stop when a sweep saves less than this share of the cost
  //! Simulated-annealing swap proposals per movable expert and layer after the sweeps (0: none).
  //! The sweeps only take improving swaps and stop in the first local optimum the balance bound
  //! leaves them; annealing from there also takes some worsening swaps early on, keeps the best
  //! state it sees (so it never ends worse), and the sweeps run again on its result. Time grows
  //! linearly with it: each proposal costs O(tokens of both experts × top-k). At most
  //! max_anneal_per_expert.
  std::size_t anneal_per_expert = 0;
  //! The largest anneal_per_expert: proposals are it × experts per layer, a product that must
  //! neither wrap nor run for years.
  static constexpr std::size_t max_anneal_per_expert = std::size_t{1} << 20;
  //! Start temperature, as a share of the mean cost rise of a random balanced swap; it falls
  //! linearly to zero over the proposals.
  double anneal_temperature = 0.3;
  std::uint64_t anneal_seed = 1; //!< proposals are drawn from splitmix64(seed, layer)
  //! Balance under a shifted request mix (0: off). Each node's tokens in turn grow by this share
  //! (its requests become more common than in the sample); under each such mix every rank's load
  //! must also stay within (1 + shift_slack) × that mix's mean, or no worse than before. A map
  //! that starts above one of these bounds is first repaired by the swaps that lower the worst
  //! excess at the least copy cost. Costs bytes; keeps a plan fitted on one mix balanced on
  //! another.
  double balance_shift = 0;
  double shift_slack = 0.10; //!< the bound under a shifted mix
  //! The replica rule of the engine the plan is for (transport/replica_selection.hpp): where a
  //! token's copy for a replicated expert goes, in the cost and the loads. Layer l's draws are
  //! seeded by salt + l, as the decode simulator seeds them by the layer index; `hot` applies to
  //! every layer.
  replica_policy replicas{};
  //! Hedge replicas per layer at most (0: off). A plan that spends every replica on copies saved
  //! leaves the GPUs whose load varies most between request mixes with nothing to shed: a test
  //! mix that differs from the sample then lands on one GPU whatever the replica rule. Hedge
  //! copies go first, chosen by the floor rule (hedge_floor, the default) or, with hedge_floor =
  //! 0, by the risk rule: add_replicas_by_tokens resamples the sample's requests
  //! (hedge_resamples bootstrap draws), takes each GPU's load at the mean plus hedge_z standard
  //! deviations of its share over the draws, and for each GPU above (1 + hedge_excess) × the mean
  //! in turn (riskiest first) copies one of its experts to another node: the copy that lets it
  //! shed that excess at run time onto a GPU that can take it, saving the most copies. The
  //! remaining slots are then filled for bytes alone. On by default, one per GPU of the deployment
  //! (hedge_one_per_gpu: 8 at ESFT's 4 × 2 GPUs, every slot with one redundant slot each) with the
  //! floor rule and its byte bound, which cost 0.0-0.2 points of the inter-node byte saving on
  //! ESFT's split seeds and lower the worst seed's GPU max/mean (bench/results/robust_planning.md).
  //! A fixed 8 at 64 GPUs balanced worse than one per GPU (by 0.006-0.053 of max/mean on the
  //! synthetic 8 × 8 rows); 64 copies keep full planning at DeepSeek-V3 shape within its 2 s
  //! (section 7 there).
  std::size_t hedge_replicas = hedge_one_per_gpu;
  //! hedge_replicas' default: as many as the topology has GPUs (ranks).
  static constexpr std::size_t hedge_one_per_gpu = std::numeric_limits<std::size_t>::max();
  //! The hedge copies per layer at most on `ranks` GPUs: hedge_replicas, `ranks` for hedge_one_per_gpu.
  constexpr std::size_t hedge_budget(std::size_t ranks) const noexcept {
    return hedge_replicas == hedge_one_per_gpu ? ranks : hedge_replicas;
  }
  std::size_t hedge_resamples = 64; //!< bootstrap draws of the requests
  double hedge_z = 2.0;             //!< a GPU's risk: its mean share plus this many standard deviations
  double hedge_excess = 0.05;       //!< GPUs whose risk exceeds (1 + this) × the mean are hedged
  std::uint64_t hedge_seed = 1;     //!< layer l's draws come from splitmix64(seed, l)
  //! Floor-targeted hedging (0: the risk rule instead; else the target). Replaces the risk rule:
  //! while the worst balance floor (split_floor.hpp: the lowest GPU max/mean any split of each
  //! expert's rows among its copies reaches) over the hedge_resamples draws of the requests is
  //! above this, the draw's binding rank set S gets one copy, outside S, of an expert hosted only
  //! on S: the one that saves the most copies among those heavy enough to bring S's density to
  //! the target, else the heaviest. At most hedge_replicas copies per layer (the budget). A map
  //! whose floor is above the target is plan-limited: no replica rule at run time can fix it.
  double hedge_floor = 1.10;
  //! Byte bound of the floor hedge (0: none): with it, a layer's hedge copies are cut back, last
  //! first, until the sample's copy cost after the fill is at most (1 + this) × the cost the fill
  //! reaches without hedge copies.
  double hedge_cost_budget = 0.01;
  //! The hedge's draws also shift the mix of request classes (token_sample::request_class; 0: no
  //! shift, the default). Resampling the training requests keeps each class's share near the
  //! sample's, but a test mix can hold a domain's requests in other proportions: on one ESFT split
  //! the test floor exceeds the worst of 64 resamples in 16 of 26 layers. With a spread s each
  //! draw weights a class's requests by exp(s × z), z a standard normal draw per class and draw
  //! (s = 0.6: a class's weight moves by a factor of 0.55-1.8 within one standard deviation). Costs
  //! bytes through the copies it adds: off by default (bench/results/robust_planning.md, section 10).
  double hedge_class_spread = 0;
  //! hedge_class_spread at most this: a class's factor stays within e^±18 (a normal draw from two
  //! doubles is below 9 standard deviations), so a draw's rows stay whole numbers below 2^53.
  static constexpr double max_hedge_class_spread = 2;
  //! The replica fill's own load bound (0: balance_slack, the default). Under balance_slack a copy
  //! of a hot expert often cannot go in: it moves its node's rows onto one GPU at once, and the
  //! fill adds copies without moving anything else, so slots stay empty (half of them on small
  //! models). With a looser fill bound those copies go in and the sweep after the fill first brings
  //! every GPU back under balance_slack by swaps (repair_load_bound). More bytes saved, a little
  //! less balance on shifted traffic (docs/robust_planning.md); off by default.
  double fill_slack = 0;
  //! refine_by_tokens first brings every rank under its load bound as far as single swaps can: the
  //! re-planner's repair step (best_swaps) until no rank is above it (set by the planner after a
  //! fill under fill_slack).
  bool repair_load_bound = false;
  //! replan_by_tokens: the load bound of a re-plan under a migration budget, (1 + this) × the
  //! mean of the loads the sample's load weights give (or balance_slack's where that is looser): it
  //! repairs the GPUs above it first, as far as the budget allows (a repair lowers the busiest GPU's
  //! load and may lift its partner's above the bound, never to the busiest's old load), and no other
  //! swap raises a GPU above it.
  //! balance_slack's tight bound is for a full plan, which moves every expert freely; held under a
  //! budget it spends the moves on small repairs, and a re-plan after a shift of the request mix
  //! then fixes neither its balance nor its bytes. A tighter bound trades bytes for balance
  //! (bench/results/robust_planning.md, section 2, measures 0.10 to 0.20 on ESFT's drift scenario).
  double replan_slack = 0.125;
  //! replan_by_tokens: a swap taken for the copies it saves (not a repair) must save more than this
  //! many standard errors of that saving on the sample: the root of the sum of squares of its saving
  //! per request (token_sample::request; without ids, per token), since a request's tokens are
  //! alike. On a window of a few requests every saving is noise, and a swap would move two experts'
  //! weights for it; 1 refuses any saving a single request makes (bench/results/robust_planning.md,
  //! section 2, measures it on ESFT's drift scenario). 0: any saving.
  double swap_significance = 1.0;

  //! Sets the copy weights to count what `c` names (1 for each kind counted, 0 otherwise).
  token_refine_options& count(copy_count c) noexcept {
    rank_copy_weight = c == copy_count::hierarchical ? 0.0 : 1.0;
    node_copy_weight = c == copy_count::flat ? 0.0 : 1.0;
    return *this;
  }
};

//! What one layer's refinement did, in the sample's cost units.
struct token_refine_report {
  double cost_before = 0;
  double cost_after = 0;
  std::size_t swaps = 0;
  double cost_swept = 0;           //!< cost after the first sweeps, before annealing
  std::size_t anneal_accepted = 0; //!< annealing swaps taken (before the best state was restored)
  std::size_t repair_swaps = 0;    //!< swaps made to bring loads within their bounds (shifted mixes, repair_load_bound)
};

namespace detail::token_refine {

//! A set over [0, n) cleared in O(1): members carry the current stamp; next() starts a new set.
class stamp_set {
public:
  void reset(std::size_t n) {
    mark_.assign(n, 0);
    stamp_ = 1;
  }
  void next() {
    if (++stamp_ != 0) return;
    std::fill(mark_.begin(), mark_.end(), 0u); // wrapped: forget every old stamp
    stamp_ = 1;
  }
  //! Adds i; true when it was not in the set yet.
  bool insert(std::size_t i) {
    if (mark_[i] == stamp_) return false;
    mark_[i] = stamp_;
    return true;
  }
  bool contains(std::size_t i) const { return mark_[i] == stamp_; }

private:
  std::vector<std::uint32_t> mark_;
  std::uint32_t stamp_ = 1;
};

//! Rank loads under shifted request mixes (token_refine_options::balance_shift): mix s adds
//! `shift` × the pairs of the tokens homed on node s to the sample's loads.
struct shifted_loads {
  double shift = 0;
  std::size_t ranks = 0, nodes = 0;
  std::vector<double> pairs; //!< nodes × ranks: pairs of tokens homed on node s that rank r serves
  std::vector<double> cap;   //!< per mix s

  bool on() const noexcept { return shift > 0; }
  void reset(double shift_, std::size_t nodes_, std::size_t ranks_) {
    shift = shift_;
    nodes = nodes_;
    ranks = ranks_;
    pairs.assign(on() ? nodes * ranks : 0, 0.0);
  }
  void count(std::size_t home, std::size_t rank, double w) {
    if (on()) pairs[home * ranks + rank] += w;
  }
  //! Bounds from the sample's loads `load` (call once every pair is counted).
  void set_caps(const std::vector<double>& load, double slack) {
    cap.assign(on() ? nodes : 0, 0.0);
    double total = 0;
    for (double x : load)
      total += x;
    for (std::size_t s = 0; s < cap.size(); ++s) {
      double extra = 0;
      for (std::size_t r = 0; r < ranks; ++r)
        extra += pairs[s * ranks + r];
      cap[s] = load_bound(total + shift * extra, ranks, slack);
    }
  }
  double at(const std::vector<double>& load, std::size_t s, std::size_t r) const {
    return load[r] + shift * pairs[s * ranks + r];
  }
};

//! Copy cost of one token from rank `source` whose pairs are served by the ranks `rank_of(j)`
//! (negative: the pair is ignored): the rows the layout sends across nodes (transport/detail/
//! layout_token.hpp), one per distinct remote rank for the flat transport and one per distinct
//! remote node (to its rail peer) for the hierarchical one, weighted.
template <class RankOf>
double token_copy_cost(std::size_t source, std::size_t gpus, std::size_t k, RankOf&& rank_of,
                       const std::vector<std::uint32_t>& node_of, stamp_set& ranks_seen, stamp_set& nodes_seen,
                       const token_refine_options& opt) {
  namespace tl = transport::detail::layout;
  constexpr auto inter = static_cast<std::int32_t>(link_class::inter_node);
  const auto src = static_cast<std::int32_t>(source), g = static_cast<std::int32_t>(gpus);
  const tl::token_params flat{src, g, 1, 1, false}, hier{src, g, 1, 1, true};
  ranks_seen.next();
  nodes_seen.next();
  double c = 0;
  for (std::size_t j = 0; j < k; ++j) {
    const std::int64_t ri = rank_of(j);
    if (ri < 0) continue;
    const auto dst = static_cast<std::int32_t>(ri);
    const std::int32_t to_rank = tl::send_rank(flat, dst), to_node = tl::send_rank(hier, dst);
    if (tl::row_link(flat, to_rank) == inter && ranks_seen.insert(static_cast<std::size_t>(to_rank)))
      c += opt.rank_copy_weight;
    // Distinct rail peers are distinct nodes.
    if (tl::row_link(hier, to_node) == inter && nodes_seen.insert(node_of[static_cast<std::size_t>(to_node)]))
      c += opt.node_copy_weight;
  }
  return c;
}

//! Layer l's replica policy under the options (token_refine_options::replicas).
inline replica_policy layer_replica_policy(const token_refine_options& opt, std::size_t layer) noexcept {
  return {opt.replicas.rule, opt.replicas.salt + layer, opt.replicas.hot};
}

//! Groups of shifted mixes: one per node, or one past the largest group id given.
inline std::size_t mix_groups(std::span<const std::uint32_t> mix, std::size_t nodes) {
  return mix.empty() ? nodes : static_cast<std::size_t>(*std::max_element(mix.begin(), mix.end())) + 1;
}

//! One layer's state: each movable expert's rank and tokens, and the rank serving each pair.
template <class Topology>
class layer_state {
public:
  layer_state(const expert_map& map, std::span<const std::uint16_t> ids, std::span<const std::uint32_t> home,
              std::size_t top_k, const Topology& topo, const token_refine_options& opt, std::size_t layer,
              std::span<const std::uint32_t> mix = {}, std::span<const float> load_weight = {}, bool join_rows = false)
      : opt_(opt), k_(top_k), tokens_(home.size()), ranks_(map.ranks()), nodes_(topo.nodes()),
        gpus_(topo.gpus_per_node()), ids_(ids), home_(home), mix_(mix.empty() ? home : mix),
        mixes_(mix_groups(mix, nodes_)), weight_(load_weight) {
    // Each pair's rank and node are packed in 16 bits each (`pack`), the all-ones word meaning none.
    LOCUS_REQUIRE(ranks_ < 65535, config_error, "token refinement: ", ranks_, " ranks (at most 65,534)");
    const std::size_t experts = map.experts();
    node_of_.resize(ranks_);
    for (std::size_t r = 0; r < ranks_; ++r)
      node_of_[r] = static_cast<std::uint32_t>(topo.node_of(r));
    rank_of_.assign(experts, -1);
    slot_of_.assign(experts, -1);
    for (std::size_t e = 0; e < experts; ++e) {
      const auto reps = map.replicas(e);
      if (reps.size() == 1) {
        rank_of_[e] = reps[0].rank;
        slot_of_[e] = reps[0].slot;
      }
    }
    // Per pair: -1 movable expert, -2 a repeat of an earlier choice of the token (ignored), else
    // the fixed rank that serves a replicated expert.
    fixed_.assign(tokens_ * k_, -1);
    tok_of_.assign(experts, {});
    mass_.assign(experts, 0.0);
    load_.assign(ranks_, 0.0);
    // The engine's replica rule, over the sample's tokens in order as one step. Every pair is
    // selected, as the traffic model does, so that position-based rules count the same copies.
    // Without `join_rows`, one copy at a time (the planners' model): moving single-copy experts
    // changes no replicated expert's choice, so those choices are fixed here. With it, tokens are
    // chosen whole (select_token) and copies join rows as the engine's locality rule joins them
    // (for node copies alone, by node): the traffic model's count of this map.
    replica_selector<Topology> selector(map, topo, layer_replica_policy(opt, layer));
    const expert_map_view view = map.view();
    const bool node_join = opt.rank_copy_weight == 0 && opt.node_copy_weight > 0;
    std::vector<std::size_t> chosen(k_);
    for (std::size_t t = 0; t < tokens_; ++t) {
      if (join_rows)
        selector.select_token(source_of(t), ids_.data() + t * k_, k_, node_join, chosen.data());
      else
        for (std::size_t j = 0; j < k_; ++j)
          chosen[j] = selector.select_index(source_of(t), ids_[t * k_ + j]);
      for (std::size_t j = 0; j < k_; ++j) {
        const std::size_t e = ids_[t * k_ + j];
        const std::int32_t r = view.replicas[chosen[j]].rank;
        bool repeat = false;
        for (std::size_t i = 0; i < j; ++i)
          repeat |= ids_[t * k_ + i] == e;
        if (repeat) {
          fixed_[t * k_ + j] = -2;
          continue;
        }
        if (rank_of_[e] >= 0) {
          tok_of_[e].push_back(static_cast<std::uint32_t>(t));
          mass_[e] += weight(t);
          load_[static_cast<std::size_t>(rank_of_[e])] += weight(t);
          continue;
        }
        fixed_[t * k_ + j] = r;
        load_[static_cast<std::size_t>(r)] += weight(t);
      }
    }
    double total = 0;
    for (double x : load_)
      total += x;
    cap_ = load_bound(total, ranks_, opt_.balance_slack);
    // The rank serving each pair, token-major (-1: a repeated choice, ignored): k entries per
    // token keep the working set small, and every per-token question is a scan of them.
    tr_.assign(tokens_ * k_, none);
    for (std::size_t i = 0; i < tokens_ * k_; ++i) {
      const std::int32_t r = fixed_[i] == -1 ? rank_of_[ids_[i]] : fixed_[i];
      if (r >= 0) tr_[i] = pack(static_cast<std::size_t>(r));
    }
    fixed_.clear();
    shifted_.reset(opt_.balance_shift, mixes_, ranks_);
    if (shifted_.on()) {
      for (std::size_t i = 0; i < tokens_ * k_; ++i)
        if (tr_[i] != none) shifted_.count(mix_[i / k_], tr_[i] & 0xFFFFu, weight(i / k_));
      shifted_.set_caps(load_, opt_.shift_slack);
      home_count_of_.assign(experts * mixes_, 0.0);
      for (std::size_t e = 0; e < experts; ++e)
        for (const auto t : tok_of_[e])
          home_count_of_[e * mixes_ + mix_[t]] += weight(t);
    }
    tokens_seen_.reset(tokens_);
    ranks_seen_.reset(ranks_);
    nodes_seen_.reset(nodes_);
  }

  //! The rank token t runs on (sample_source_rank).
  std::size_t source_of(std::size_t t) const noexcept { return sample_source_rank(home_[t], t, gpus_); }

  //! The sample's copy cost under the current positions.
  double total_cost() {
    double c = 0;
    for (std::size_t t = 0; t < tokens_; ++t) {
      const std::uint32_t* tr = tr_.data() + t * k_;
      const auto rank_of = [tr](std::size_t j) -> std::int64_t { return tr[j] == none ? -1 : tr[j] & 0xFFFFu; };
      c += token_copy_cost(source_of(t), gpus_, k_, rank_of, node_of_, ranks_seen_, nodes_seen_, opt_);
    }
    return c;
  }

  //! Sweeps over the movable experts: for each, every other movable expert is scored as a swap
  //! partner by the sum of the two single-expert move gains (the partner's row as last computed,
  //! possibly stale), the best `candidates` are evaluated exactly and the best improving swap is
  //! applied.
  std::size_t refine() {
    const std::size_t experts = rank_of_.size();
    std::vector<double> gains(experts * ranks_, 0.0);
    std::vector<std::uint8_t> dirty(experts, 1), computed(experts, 0);
    std::vector<std::pair<double, std::uint32_t>> cand;
    const double stop_below = opt_.min_sweep_gain * total_cost();
    std::size_t swaps = 0;
    for (std::size_t sweep = 0; sweep < opt_.max_sweeps; ++sweep) {
      throw_if_cancelled();
      std::size_t made = 0;
      double saved = 0;
      for (std::size_t e = 0; e < experts; ++e) {
        if (rank_of_[e] < 0 || tok_of_[e].empty()) continue;
        const auto a = static_cast<std::size_t>(rank_of_[e]);
        // Rows go stale when a swap changes the copy counts of a token the expert is in.
        if (dirty[e]) {
          move_gains(e, gains.data() + e * ranks_);
          dirty[e] = 0;
          computed[e] = 1;
        }
        const double* own = gains.data() + e * ranks_;
        cand.clear();
        for (std::size_t f = 0; f < experts; ++f) {
          if (rank_of_[f] < 0 || static_cast<std::size_t>(rank_of_[f]) == a) continue;
          if (!computed[f]) { // partners' rows may be stale: the exact check below decides
            move_gains(f, gains.data() + f * ranks_);
            dirty[f] = 0;
            computed[f] = 1;
          }
          const double est = own[static_cast<std::size_t>(rank_of_[f])] + gains[f * ranks_ + a];
          if (est > 1e-9 && balanced(e, f)) cand.emplace_back(est, static_cast<std::uint32_t>(f));
        }
        const std::size_t keep = std::min(cand.size(), opt_.candidates);
        std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(keep), cand.end(),
                          [](const auto& x, const auto& y) {
                            return x.first > y.first || (x.first == y.first && x.second < y.second);
                          });
        double best = 1e-9;
        std::size_t best_f = experts;
        for (std::size_t i = 0; i < keep; ++i) {
          const double g = swap_gain(e, cand[i].second, gains);
          if (g > best) {
            best = g;
            best_f = cand[i].second;
          }
        }
        if (best_f == experts) continue;
        apply_swap(e, best_f, dirty);
        saved += best;
        ++made;
      }
      swaps += made;
      if (made == 0 || saved < stop_below) break;
    }
    return swaps;
  }

  //! Simulated annealing over swaps of two movable experts on different ranks under the balance
  //! bound: `proposals` random pairs, each taken when it lowers the cost, or with probability
  //! exp(-rise / T) when it does not (so neutral swaps only while T > 0), T falling linearly from
  //! `temperature` × the mean rise of random swaps to zero. Ends in the best state seen. Returns
  //! the swaps taken.
  std::size_t anneal(std::size_t proposals, double temperature, std::uint64_t seed) {
    std::vector<std::uint32_t> movable;
    for (std::size_t e = 0; e < rank_of_.size(); ++e)
      if (rank_of_[e] >= 0) movable.push_back(static_cast<std::uint32_t>(e));
    if (movable.size() < 2 || proposals == 0) return 0;
    splitmix64 g(seed);
    const auto draw = [&](std::size_t& e, std::size_t& f) {
      e = movable[g.below(movable.size())];
      f = movable[g.below(movable.size())];
      return rank_of_[e] != rank_of_[f] && balanced(e, f);
    };
    // Temperature scale: the mean rise of random balanced swaps from the starting state.
    double rise = 0;
    std::size_t rises = 0;
    for (std::size_t i = 0, e, f; i < 4 * movable.size(); ++i)
      if (draw(e, f))
        if (const double d = swap_delta(e, f); d > 0) {
          rise += d;
          ++rises;
        }
    // No rise seen (few balanced swaps): a plain descent over random swaps.
    const double t0 = rises == 0 ? 0.0 : temperature * rise / static_cast<double>(rises);
    double cost = total_cost(), best = cost;
    std::vector<std::int32_t> best_rank = rank_of_, best_slot = slot_of_;
    std::vector<double> best_load = load_, best_shifted = shifted_.pairs;
    std::vector<std::uint8_t> dirty(rank_of_.size(), 0); // apply_swap's bookkeeping; unused here
    std::size_t taken = 0;
    for (std::size_t i = 0, e, f; i < proposals; ++i) {
      if (i % 4096 == 0) throw_if_cancelled();
      if (!draw(e, f)) continue;
      const double d = swap_delta(e, f);
      const double temp = t0 * (1.0 - static_cast<double>(i) / static_cast<double>(proposals));
      if (d > -1e-9 && (temp <= 0 || g.uniform() >= std::exp(-d / temp))) continue;
      apply_swap(e, f, dirty);
      cost += d;
      ++taken;
      if (cost < best - 1e-9) {
        best = cost;
        best_rank = rank_of_;
        best_slot = slot_of_;
        best_load = load_;
        best_shifted = shifted_.pairs;
      }
    }
    if (best_rank != rank_of_) { // move every expert back to where the best state had it
      for (std::size_t e = 0; e < rank_of_.size(); ++e)
        if (rank_of_[e] >= 0 && rank_of_[e] != best_rank[e])
          for (const auto t : tok_of_[e])
            move_pairs(t, e, best_rank[e]);
      rank_of_ = std::move(best_rank);
      slot_of_ = std::move(best_slot);
      load_ = std::move(best_load);
      shifted_.pairs = std::move(best_shifted);
    }
    return taken;
  }

  //! With token_refine_options::balance_shift: while some rank is above a shifted-mix bound, the
  //! swap of one of its experts that brings both ranks it touches below the current worst excess
  //! at the least copy cost. Stops when every bound holds or no swap helps. Returns the swaps.
  std::size_t repair() {
    if (!shifted_.on()) return 0;
    std::size_t made = 0;
    std::vector<std::uint8_t> dirty(rank_of_.size(), 0);
    for (std::size_t round = 0; round < 4 * rank_of_.size(); ++round) {
      double worst = 1.0 + 1e-9;
      std::size_t over = ranks_;
      for (std::size_t s = 0; s < mixes_; ++s)
        for (std::size_t r = 0; r < ranks_; ++r)
          if (const double x = shifted_.at(load_, s, r) / shifted_.cap[s]; x > worst) {
            worst = x;
            over = r;
          }
      if (over == ranks_) break;
      double best = 0;
      std::size_t be = 0, bf = 0;
      bool found = false;
      for (std::size_t e = 0; e < rank_of_.size(); ++e) {
        if (rank_of_[e] != static_cast<std::int32_t>(over)) continue;
        for (std::size_t f = 0; f < rank_of_.size(); ++f) {
          if (rank_of_[f] < 0 || rank_of_[f] == rank_of_[e] || !within_cap(e, f)) continue;
          if (shifted_excess_after(e, f) >= worst - 1e-9) continue;
          const double d = swap_delta(e, f);
          if (!found || d < best) {
            best = d;
            be = e;
            bf = f;
            found = true;
          }
        }
      }
      if (!found) break;
      apply_swap(be, bf, dirty);
      ++made;
    }
    return made;
  }

  //! token_refine_options::repair_load_bound: best_swaps' repairs alone, until every rank is within
  //! the load bound or no swap lowers the busiest one. Returns the swaps.
  std::size_t repair_load_bound() {
    std::vector<swap_step> done;
    best_swaps(4 * rank_of_.size(), done, true);
    return done.size();
  }

  //! One swap of best_swaps: the two experts and the sample cost it saved (repairs may save less
  //! than nothing).
  struct swap_step {
    std::uint32_t e, f;
    double gain;
    bool repair;
  };

  //! A budgeted repair swap lowers the busiest rank by at least this share of the most a swap does:
  //! each swap moves two experts' weights, and a repair that barely lowers the peak (while saving
  //! copies) spends the budget without fixing the balance.
  static constexpr double repair_progress = 0.5;

  //! The requests of the sample's tokens, numbered densely below `requests` (dense_request_ids;
  //! empty: every token its own), for swap_significance: a request's tokens are alike, so a
  //! saving's standard error sums each request's saving first.
  void cluster_by(std::span<const std::uint32_t> request, std::size_t requests) {
    if (request.empty()) return;
    LOCUS_REQUIRE(request.size() == tokens_, config_error, "token sample: ", request.size(), " request ids for ",
                  tokens_, " tokens");
    cluster_.assign(request.begin(), request.end());
    by_cluster_.assign(requests, 0.0);
  }

  //! Up to `budget` swaps, each the best one available now (for re-planning under a migration
  //! budget, where the sweeps' expert-order greed would spend the budget on small gains): while
  //! some rank is above the load bound, the swap of one of its experts that lowers the larger of
  //! the two ranks' loads at the least copy cost, among the swaps that lower it by at least half
  //! the most any swap does (repair_progress); then the balanced swap that saves the most copies,
  //! by more than swap_significance standard errors (in both, partners ranked by the sum of the two
  //! move gains, the best few checked exactly).
  //! Appends every swap to `done`. With `repairs_only` (the planner's repair to the bound, where
  //! swaps move no weights yet), stops once no repair is left, and a repair is the cheapest swap
  //! that lowers the peak at all.
  void best_swaps(std::size_t budget, std::vector<swap_step>& done, bool repairs_only = false) {
    const std::size_t experts = rank_of_.size();
    std::vector<double> gains(experts * ranks_, 0.0);
    std::vector<std::uint8_t> dirty(experts, 1);
    std::vector<std::pair<double, std::uint64_t>> cand;
    std::vector<double> drops; // per repair candidate: how much it lowers the busiest rank
    const double progress = repairs_only ? 0.0 : repair_progress;
    const std::size_t check = std::max<std::size_t>(8, 4 * opt_.candidates);
    const auto refresh = [&] {
      for (std::size_t e = 0; e < experts; ++e)
        if (rank_of_[e] >= 0 && dirty[e]) {
          move_gains(e, gains.data() + e * ranks_);
          dirty[e] = 0;
        }
    };
    refresh();
    for (std::size_t made = 0; made < budget; ++made) {
      throw_if_cancelled();
      const auto over = static_cast<std::size_t>(std::max_element(load_.begin(), load_.end()) - load_.begin());
      if (load_[over] > cap_ + 1e-9) {
        // Swaps that lower the larger of the two loads by at least `progress` of the most any
        // swap lowers it, ranked by the move gains' estimate of the copies they save (rows as
        // last computed: a repair run does not refresh them), the least exact cost among the best
        // few (an exact cost for every pair would dominate the time).
        cand.clear();
        drops.clear();
        double most = 0;
        for (std::size_t e = 0; e < experts; ++e) {
          if (rank_of_[e] != static_cast<std::int32_t>(over)) continue;
          for (std::size_t f = 0; f < experts; ++f) {
            if (rank_of_[f] < 0 || rank_of_[f] == rank_of_[e]) continue;
            const auto b = static_cast<std::size_t>(rank_of_[f]);
            const double d = mass_[f] - mass_[e];
            const double drop = load_[over] - std::max(load_[over] + d, load_[b] - d);
            if (drop <= 1e-9) continue;
            most = std::max(most, drop);
            drops.push_back(drop);
            cand.emplace_back(gains[e * ranks_ + b] + gains[f * ranks_ + over], e * experts + f);
          }
        }
        std::size_t kept = 0;
        for (std::size_t i = 0; i < cand.size(); ++i)
          if (drops[i] >= progress * most) cand[kept++] = cand[i];
        cand.resize(kept);
        const std::size_t keep = std::min(cand.size(), check);
        std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(keep), cand.end(),
                          [](const auto& x, const auto& y) {
                            return x.first > y.first || (x.first == y.first && x.second < y.second);
                          });
        double best = 0;
        std::size_t be = experts, bf = experts;
        for (std::size_t i = 0; i < keep; ++i) {
          const std::size_t e = cand[i].second / experts, f = cand[i].second % experts;
          const double c = swap_delta(e, f);
          if (be == experts || c < best) {
            best = c;
            be = e;
            bf = f;
          }
        }
        if (be != experts) {
          apply_swap(be, bf, dirty);
          done.push_back({static_cast<std::uint32_t>(be), static_cast<std::uint32_t>(bf), -best, true});
          continue;
        }
      }
      if (repairs_only) break;
      refresh();
      cand.clear();
      for (std::size_t e = 0; e < experts; ++e) {
        if (rank_of_[e] < 0) continue;
        const auto a = static_cast<std::size_t>(rank_of_[e]);
        for (std::size_t f = e + 1; f < experts; ++f) {
          if (rank_of_[f] < 0 || static_cast<std::size_t>(rank_of_[f]) == a) continue;
          const double est = gains[e * ranks_ + static_cast<std::size_t>(rank_of_[f])] + gains[f * ranks_ + a];
          if (est > 1e-9) cand.emplace_back(est, e * experts + f);
        }
      }
      const std::size_t keep = std::min(cand.size(), check);
      std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(keep), cand.end(),
                        [](const auto& x, const auto& y) {
                          return x.first > y.first || (x.first == y.first && x.second < y.second);
                        });
      double best = 1e-9;
      std::size_t be = experts, bf = experts;
      for (std::size_t i = 0; i < keep; ++i) {
        const std::size_t e = cand[i].second / experts, f = cand[i].second % experts;
        if (!balanced(e, f)) continue;
        double squares = 0;
        const double g = -swap_delta(e, f, &squares);
        if (g > best && g > opt_.swap_significance * std::sqrt(squares)) {
          best = g;
          be = e;
          bf = f;
        }
      }
      if (be == experts) break;
      apply_swap(be, bf, dirty);
      done.push_back({static_cast<std::uint32_t>(be), static_cast<std::uint32_t>(bf), best, false});
    }
  }

  //! The slot table with the refined positions.
  expert_map to_map(const expert_map& original) const {
    const std::size_t spr = original.slots_per_rank();
    std::vector<expert_id> table(original.slot_count());
    for (std::size_t r = 0; r < original.ranks(); ++r)
      for (std::size_t s = 0; s < spr; ++s) {
        const expert_id e = original.expert_at(r, s);
        table[r * spr + s] = e == empty_slot || rank_of_[static_cast<std::size_t>(e)] < 0 ? e : empty_slot;
      }
    for (std::size_t e = 0; e < rank_of_.size(); ++e)
      if (rank_of_[e] >= 0)
        table[static_cast<std::size_t>(rank_of_[e]) * spr + static_cast<std::size_t>(slot_of_[e])] =
            static_cast<expert_id>(e);
    return expert_map(original.experts(), original.ranks(), spr, std::move(table));
  }

private:
  //! Cost change of token t when one of its experts moves from rank p to rank q (q ≠ p).
  double move_delta(std::size_t t, std::size_t p, std::size_t q) const {
    const std::size_t h = home_[t], np = node_of_[p], nq = node_of_[q];
    const std::uint32_t* tr = tr_.data() + t * k_;
    // Branch-free over the packed (node, rank) pairs; `none` matches no rank and no node.
    int cp = 0, cq = 0, cnp = 0, cnq = 0;
    for (std::size_t j = 0; j < k_; ++j) {
      const std::uint32_t r = tr[j] & 0xFFFFu, n = tr[j] >> 16;
      cp += r == p;
      cq += r == q;
      cnp += n == np;
      cnq += n == nq;
    }
    double d = 0;
    if (cp == 1 && np != h) d -= opt_.rank_copy_weight;
    if (cq == 0 && nq != h) d += opt_.rank_copy_weight;
    if (np != nq) {
      if (cnp == 1 && np != h) d -= opt_.node_copy_weight;
      if (cnq == 0 && nq != h) d += opt_.node_copy_weight;
    }
    return d;
  }

  //! Exact cost change of swapping e and f (on different ranks): a token that uses one of them
  //! sees that one move, a token that uses both keeps its ranks. Both token lists ascend, so one
  //! merge finds the tokens they share.
  double swap_delta(std::size_t e, std::size_t f, double* squares = nullptr) const {
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    const auto &te = tok_of_[e], &tf = tok_of_[f];
    double d = 0, sq = 0;
    std::size_t i = 0, j = 0;
    while (i < te.size() || j < tf.size()) {
      double x = 0;
      std::size_t last = 0;
      if (j == tf.size() || (i < te.size() && te[i] < tf[j])) {
        last = te[i];
        x = move_delta(te[i++], a, b);
      } else if (i == te.size() || tf[j] < te[i]) {
        last = tf[j];
        x = move_delta(tf[j++], b, a);
      } else {
        ++i;
        ++j;
      }
      d += x;
      if (!squares || x == 0) continue;
      if (cluster_.empty()) {
        sq += x * x;
      } else {
        const std::uint32_t c = cluster_[last];
        if (by_cluster_[c] == 0) touched_.push_back(c);
        by_cluster_[c] += x;
      }
    }
    if (!cluster_.empty()) {
      for (const auto c : touched_) {
        sq += by_cluster_[c] * by_cluster_[c];
        by_cluster_[c] = 0;
      }
      touched_.clear();
    }
    if (squares) *squares = sq;
    return d;
  }

  //! gain[r]: cost saved on e's tokens by moving e alone to rank r, in O(tokens of e × top-k + ranks):
  //! a token pays for r unless r is on its node or already holds another of its experts.
  void move_gains(std::size_t e, double* gain) {
    const auto a = static_cast<std::size_t>(rank_of_[e]);
    const std::size_t na = node_of_[a];
    const double wr = opt_.rank_copy_weight, wn = opt_.node_copy_weight;
    home_count_.assign(nodes_, 0.0);
    occ_rank_.assign(ranks_, 0.0);
    occ_node_.assign(nodes_, 0.0);
    double leave_rank = 0, leave_node = 0;
    for (const auto t : tok_of_[e]) {
      const std::size_t h = home_[t];
      home_count_[h] += 1;
      ranks_seen_.next();
      nodes_seen_.next();
      const std::uint32_t* tr = tr_.data() + t * k_;
      int on_a = 0, on_na = 0;
      for (std::size_t j = 0; j < k_; ++j) {
        if (tr[j] == none) continue;
        const std::size_t r = tr[j] & 0xFFFFu, n = tr[j] >> 16;
        on_a += r == a;
        on_na += n == na;
        if (n == h) continue;
        if (ranks_seen_.insert(r)) occ_rank_[r] += 1;
        if (nodes_seen_.insert(n)) occ_node_[n] += 1;
      }
      if (na != h) {
        leave_rank += on_a == 1 ? wr : 0.0;
        leave_node += on_na == 1 ? wn : 0.0;
      }
    }
    const auto m = static_cast<double>(tok_of_[e].size());
    for (std::size_t r = 0; r < ranks_; ++r) {
      const std::size_t n = node_of_[r];
      double g = leave_rank - wr * (m - home_count_[n] - occ_rank_[r]);
      if (n != na) g += leave_node - wn * (m - home_count_[n] - occ_node_[n]);
      gain[r] = g;
    }
    gain[a] = 0.0; // staying put changes nothing (the formula above does not hold for r = a)
  }

  //! The sample's load bound alone: after swapping e and f, neither rank above the cap, or no worse.
  bool within_cap(std::size_t e, std::size_t f) const {
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    const double d = mass_[f] - mass_[e];
    return keeps_load_bound(std::max(load_[a] + d, load_[b] - d), std::max(load_[a], load_[b]), cap_);
  }

  //! What swapping e and f adds to the load of e's rank under shifted mix s (f's rank loses it).
  double shifted_swap_change(std::size_t e, std::size_t f, std::size_t s) const {
    return mass_[f] - mass_[e] + shifted_.shift * (home_count_of_[f * mixes_ + s] - home_count_of_[e * mixes_ + s]);
  }

  bool balanced(std::size_t e, std::size_t f) const {
    if (!within_cap(e, f)) return false;
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    for (std::size_t s = 0; s < shifted_.cap.size(); ++s) {
      const double oa = shifted_.at(load_, s, a), ob = shifted_.at(load_, s, b), d = shifted_swap_change(e, f, s);
      if (!keeps_load_bound(std::max(oa + d, ob - d), std::max(oa, ob), shifted_.cap[s])) return false;
    }
    return true;
  }

  //! The worst shifted-mix load over its bound after swapping e and f (ranks of e and f only).
  double shifted_excess_after(std::size_t e, std::size_t f) const {
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    double worst = 0;
    for (std::size_t s = 0; s < shifted_.cap.size(); ++s) {
      const double d = shifted_swap_change(e, f, s);
      worst = std::max(
          {worst, (shifted_.at(load_, s, a) + d) / shifted_.cap[s], (shifted_.at(load_, s, b) - d) / shifted_.cap[s]});
    }
    return worst;
  }

  //! Exact cost saved by swapping e and f, from e's fresh move-gain row: a token that uses only e
  //! sees e's move (the row counts it); a token that uses only f sees f's move (counted here); a
  //! token that uses both keeps its ranks, so e's move is taken back for it.
  double swap_gain(std::size_t e, std::size_t f, const std::vector<double>& gains) {
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    double g = gains[e * ranks_ + b];
    tokens_seen_.next();
    for (const auto t : tok_of_[e])
      tokens_seen_.insert(t);
    for (const auto t : tok_of_[f])
      g += tokens_seen_.contains(t) ? move_delta(t, a, b) : -move_delta(t, b, a);
    return g;
  }

  //! Token t's pairs of expert x now go to rank q.
  void move_pairs(std::size_t t, std::size_t x, std::int32_t q) {
    for (std::size_t j = 0; j < k_; ++j)
      if (ids_[t * k_ + j] == x && tr_[t * k_ + j] != none) tr_[t * k_ + j] = pack(static_cast<std::size_t>(q));
  }

  void apply_swap(std::size_t e, std::size_t f, std::vector<std::uint8_t>& dirty) {
    const auto a = static_cast<std::size_t>(rank_of_[e]), b = static_cast<std::size_t>(rank_of_[f]);
    for (const auto t : tok_of_[e])
      move_pairs(t, e, static_cast<std::int32_t>(b));
    for (const auto t : tok_of_[f])
      move_pairs(t, f, static_cast<std::int32_t>(a));
    for (const auto x : {e, f})
      for (const auto t : tok_of_[x])
        for (std::size_t j = 0; j < k_; ++j)
          dirty[ids_[t * k_ + j]] = 1;
    const double we = mass_[e], wf = mass_[f];
    load_[a] += wf - we;
    load_[b] += we - wf;
    if (shifted_.on())
      for (std::size_t s = 0; s < mixes_; ++s) {
        const double d = home_count_of_[f * mixes_ + s] - home_count_of_[e * mixes_ + s];
        shifted_.pairs[s * ranks_ + a] += d;
        shifted_.pairs[s * ranks_ + b] -= d;
      }
    std::swap(rank_of_[e], rank_of_[f]);
    std::swap(slot_of_[e], slot_of_[f]);
  }

  //! Token t's weight in the loads (token_sample::load_weight).
  double weight(std::size_t t) const noexcept { return weight_.empty() ? 1.0 : static_cast<double>(weight_[t]); }

  token_refine_options opt_;
  std::size_t k_, tokens_, ranks_, nodes_, gpus_;
  std::span<const std::uint16_t> ids_;
  std::span<const std::uint32_t> home_;
  std::span<const std::uint32_t> mix_; //!< per token: its shifted-mix group (home_ when none given)
  std::size_t mixes_;
  std::span<const float> weight_;          //!< per token: its load weight (empty: 1 each)
  std::vector<std::uint32_t> cluster_;     //!< per token: its request, numbered densely (empty: its own)
  mutable std::vector<double> by_cluster_; //!< swap_delta's per-request sums (zero between calls)
  mutable std::vector<std::uint32_t> touched_;
  std::vector<std::uint32_t> node_of_;
  std::vector<std::int32_t> rank_of_, slot_of_, fixed_;
  std::vector<std::vector<std::uint32_t>> tok_of_;
  std::vector<double> mass_; //!< per movable expert: its tokens' load weight
  std::vector<double> load_;
  double cap_ = 0;
  shifted_loads shifted_;
  std::vector<double> home_count_of_; //!< experts × mixes: tokens of each movable expert per mix group
  //! (node << 16) | rank of each pair; `none` for a repeated choice.
  static constexpr std::uint32_t none = 0xFFFFFFFFu;
  std::uint32_t pack(std::size_t r) const { return static_cast<std::uint32_t>(node_of_[r] << 16 | r); }
  std::vector<std::uint32_t> tr_;
  stamp_set tokens_seen_, ranks_seen_, nodes_seen_;
  std::vector<double> home_count_, occ_rank_, occ_node_;
};

//! Greedy replica placement on the exact copy cost (see add_replicas_by_tokens).
template <class Topology>
class replica_state {
public:
  replica_state(const expert_map& map, std::span<const std::uint16_t> ids, std::span<const std::uint32_t> home,
                std::size_t top_k, const Topology& topo, const token_refine_options& opt, std::size_t layer,
                std::span<const std::uint32_t> mix = {}, std::span<const std::uint32_t> request = {},
                std::span<const std::uint32_t> request_class = {})
      : opt_(opt), policy_(layer_replica_policy(opt, layer)), topo_(topo), k_(top_k), tokens_(home.size()),
        ranks_(map.ranks()), nodes_(topo.nodes()), gpus_(topo.gpus_per_node()), spr_(map.slots_per_rank()), ids_(ids),
        home_(home), mix_(mix.empty() ? home : mix), mixes_(mix_groups(mix, nodes_)), experts_(map.experts()),
        request_(request), request_class_(request_class), layer_(layer) {
    LOCUS_REQUIRE(policy_.hot.empty() || policy_.hot.size() == ranks_, config_error,
                  "add_replicas_by_tokens: ", policy_.hot.size(), " hot-rank flags for ", ranks_, " ranks");
    node_of_.resize(ranks_);
    for (std::size_t r = 0; r < ranks_; ++r)
      node_of_[r] = static_cast<std::uint32_t>(topo.node_of(r));
    table_.resize(map.slot_count());
    for (std::size_t r = 0; r < ranks_; ++r)
      for (std::size_t s = 0; s < spr_; ++s)
        table_[r * spr_ + s] = map.expert_at(r, s);
    copies_.assign(experts_, {});
    for (std::size_t e = 0; e < experts_; ++e)
      for (const auto& x : map.replicas(e))
        copies_[e].push_back(x.rank); // rank order, as the selector sees them
    pairs_of_.assign(experts_, {});
    tr_.assign(tokens_ * k_, -1);
    // A token's index in its source's batch (the sources' batches are the sample in order).
    batch_index_.resize(tokens_);
    std::vector<std::uint32_t> batch(ranks_, 0);
    for (std::size_t t = 0; t < tokens_; ++t) {
      src_of_.push_back(static_cast<std::uint32_t>(sample_source_rank(home_[t], t, gpus_)));
      batch_index_[t] = batch[src_of_[t]]++;
    }
    for (std::size_t t = 0; t < tokens_; ++t)
      for (std::size_t j = 0; j < k_; ++j) {
        const std::size_t e = ids_[t * k_ + j];
        bool repeat = false;
        for (std::size_t i = 0; i < j; ++i)
          repeat |= ids_[t * k_ + i] == e;
        if (!repeat) pairs_of_[e].push_back(static_cast<std::uint32_t>(t * k_ + j));
      }
    for (std::size_t e = 0; e < experts_; ++e) {
      LOCUS_REQUIRE(!copies_[e].empty() || pairs_of_[e].empty(), invalid_input_error,
                    "add_replicas_by_tokens: the sample uses expert ", e, ", which the map does not place");
      const auto& next = serving(e, copies_[e]);
      for (std::size_t i = 0; i < pairs_of_[e].size(); ++i)
        tr_[pairs_of_[e][i]] = next[i];
    }
    load_.assign(ranks_, 0.0);
    for (const auto r : tr_)
      if (r >= 0) load_[static_cast<std::size_t>(r)] += 1;
    double total = 0;
    for (double x : load_)
      total += x;
    cap_ = load_bound(total, ranks_, opt_.balance_slack);
    shifted_.reset(opt_.balance_shift, mixes_, ranks_);
    if (shifted_.on()) {
      for (std::size_t i = 0; i < tr_.size(); ++i)
        if (tr_[i] >= 0) shifted_.count(mix_[i / k_], static_cast<std::size_t>(tr_[i]), 1.0);
      shifted_.set_caps(load_, opt_.shift_slack);
    }
    ranks_seen_.reset(ranks_);
    nodes_seen_.reset(nodes_);
    cost_.resize(tokens_);
    for (std::size_t t = 0; t < tokens_; ++t)
      cost_[t] = token_cost(t, k_, -1);
    const auto whole = [](double w) { return w >= 0 && w <= 1048576 && std::floor(w) == w; };
    whole_weights_ = whole(opt_.rank_copy_weight) && whole(opt_.node_copy_weight) && k_ <= 64;
  }

  //! Lazy greedy: the (node, expert) copy that saves the most, re-evaluated when popped, while
  //! slots are free and a copy saves anything. Returns the replicas added.
  std::size_t fill() {
    // Candidates: per node, the experts its tokens use most among those it does not host (a
    // few per free slot: a copy's savings come mostly from the node's own tokens).
    std::vector<std::pair<double, std::pair<std::uint32_t, std::uint32_t>>> heap;
    std::vector<std::vector<double>> remote(nodes_, std::vector<double>(experts_, 0.0));
    for (std::size_t e = 0; e < experts_; ++e)
      for (const auto p : pairs_of_[e])
        remote[home_[p / k_]][e] += 1;
    std::vector<std::uint32_t> order(experts_);
    for (std::size_t n = 0; n < nodes_; ++n) {
      std::size_t free = 0;
      for (std::size_t r = 0; r < ranks_; ++r)
        if (node_of_[r] == n)
          for (std::size_t s = 0; s < spr_; ++s)
            free += table_[r * spr_ + s] == empty_slot;
      if (free == 0) continue;
      const std::size_t r = free_rank(n);
      std::iota(order.begin(), order.end(), 0u);
      const std::size_t keep = std::min(experts_, std::max<std::size_t>(32, 8 * free));
      std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                        [&](std::uint32_t x, std::uint32_t y) {
                          const double a = hosts(x, n) ? -1.0 : remote[n][x], b = hosts(y, n) ? -1.0 : remote[n][y];
                          return a > b || (a == b && x < y);
                        });
      for (std::size_t i = 0; i < keep; ++i) {
        const std::size_t e = order[i];
        if (hosts(e, n) || remote[n][e] == 0) continue;
        const double g = gain(e, r);
        if (g > 1e-9) heap.push_back({g, {static_cast<std::uint32_t>(n), static_cast<std::uint32_t>(e)}});
      }
    }
    auto less = [](const auto& x, const auto& y) {
      return x.first < y.first || (x.first == y.first && x.second > y.second);
    };
    std::make_heap(heap.begin(), heap.end(), less);
    std::size_t added = 0;
    while (!heap.empty()) {
      throw_if_cancelled();
      std::pop_heap(heap.begin(), heap.end(), less);
      auto [stale, ne] = heap.back();
      heap.pop_back();
      const auto [n, e] = ne;
      if (hosts(e, n)) continue;
      const std::size_t r = free_rank(n);
      if (r == ranks_) continue;
      const auto& served = serving(e, with_copy(e, r));
      const double g = balanced(e, r, served) ? gain(e, served) : -1.0;
      if (g <= 1e-9) continue;
      if (!heap.empty() && g < heap.front().first) { // stale: back in with its current gain
        heap.push_back({g, ne});
        std::push_heap(heap.begin(), heap.end(), less);
        continue;
      }
      add(e, r);
      ++added;
    }
    return added;
  }

  //! Each token's request as a dense index (ascending request id), and how many requests.
  std::pair<std::vector<std::uint32_t>, std::size_t> request_indices() const {
    if (!request_.empty()) return dense_request_ids(request_);
    std::vector<std::uint32_t> req(tokens_);
    std::iota(req.begin(), req.end(), 0u);
    return {std::move(req), tokens_};
  }

  //! Bootstrap draws: how often each request is picked when the requests are drawn again with
  //! replacement, draw-major (hedge_resamples × requests); with hedge_class_spread, times each
  //! draw's factor for the request's class, rounded to whole sixteenths (whole numbers keep the
  //! floor solver and the bounded copy search exact; the common scale of 16 leaves every floor as
  //! it is, and a request weighted below 1/32 of one pick drops out of that draw).
  //! `req`: each token's request (request_indices()).
  std::vector<double> draw_weights(const std::vector<std::uint32_t>& req, std::size_t requests) const {
    const std::size_t draws = opt_.hedge_resamples;
    std::vector<double> weight(draws * requests, 0.0);
    splitmix64 rng(opt_.hedge_seed ^ (0x9e3779b97f4a7c15ull * (layer_ + 1)));
    for (std::size_t b = 0; b < draws; ++b)
      for (std::size_t i = 0; i < requests; ++i)
        weight[b * requests + rng.below(requests)] += 1;
    if (opt_.hedge_class_spread <= 0 || request_class_.empty()) return weight;
    // A stream of its own, so that the resamples stay those of the spread-free draws.
    std::vector<std::uint32_t> class_of(requests, 0);
    std::size_t classes = 0;
    for (std::size_t t = 0; t < tokens_; ++t) {
      class_of[req[t]] = request_class_[t];
      classes = std::max<std::size_t>(classes, std::size_t{request_class_[t]} + 1);
    }
    splitmix64 shift(opt_.hedge_seed ^ 0x5851f42d4c957f2dull ^ (0x9e3779b97f4a7c15ull * (layer_ + 1)));
    std::vector<double> factor(classes);
    for (std::size_t b = 0; b < draws; ++b) {
      for (auto& f : factor) { // Box-Muller: a standard normal draw from two uniform ones
        const double u = 1.0 - shift.uniform(), v = shift.uniform();
        f = std::exp(opt_.hedge_class_spread * std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * std::numbers::pi * v));
      }
      for (std::size_t i = 0; i < requests; ++i)
        weight[b * requests + i] = std::round(16 * weight[b * requests + i] * factor[class_of[i]]);
    }
    return weight;
  }

  //! Hedge replicas (token_refine_options::hedge_replicas), before fill(). Returns those added.
  std::size_t hedge() {
    if (opt_.hedge_budget(ranks_) == 0 || opt_.hedge_resamples == 0 || tokens_ == 0) return 0;
    if (opt_.hedge_floor > 0) return hedge_floor();
    const auto [req, requests] = request_indices();
    const std::size_t draws = opt_.hedge_resamples;
    const std::vector<double> weight = draw_weights(req, requests);
    std::vector<std::uint8_t> done(ranks_, 0);
    std::vector<double> per_request(requests * ranks_), risk(ranks_);
    std::size_t added = 0;
    while (added < opt_.hedge_budget(ranks_)) {
      throw_if_cancelled();
      // Each rank's load share under every draw, from where the pairs go now.
      std::fill(per_request.begin(), per_request.end(), 0.0);
      for (std::size_t p = 0; p < tr_.size(); ++p)
        if (tr_[p] >= 0) per_request[req[p / k_] * ranks_ + static_cast<std::size_t>(tr_[p])] += 1;
      std::vector<double> sum(ranks_, 0.0), sq(ranks_, 0.0), load(ranks_);
      for (std::size_t b = 0; b < draws; ++b) {
        std::fill(load.begin(), load.end(), 0.0);
        for (std::size_t i = 0; i < requests; ++i)
          if (const double w = weight[b * requests + i]; w > 0)
            for (std::size_t r = 0; r < ranks_; ++r)
              load[r] += w * per_request[i * ranks_ + r];
        double total = 0;
        for (const double x : load)
          total += x;
        if (total <= 0) continue;
        for (std::size_t r = 0; r < ranks_; ++r) {
          const double share = load[r] * static_cast<double>(ranks_) / total;
          sum[r] += share;
          sq[r] += share * share;
        }
      }
      double total = 0;
      for (const double x : load_)
        total += x;
      if (total <= 0) break;
      const double mean = total / static_cast<double>(ranks_);
      std::size_t hot = ranks_;
      for (std::size_t r = 0; r < ranks_; ++r) {
        const double m = sum[r] / static_cast<double>(draws);
        const double sd = std::sqrt(std::max(0.0, sq[r] / static_cast<double>(draws) - m * m));
        risk[r] = load_[r] / mean + opt_.hedge_z * sd - 1.0; // the rank's excess at risk, as a share of the mean
        if (!done[r] && risk[r] > opt_.hedge_excess && (hot == ranks_ || risk[r] > risk[hot])) hot = r;
      }
      if (hot == ranks_) break;
      done[hot] = 1;
      const double need = risk[hot] * mean;
      // Load the rank can already shed: its pairs of experts with a copy elsewhere.
      double sheddable = 0;
      for (std::size_t e = 0; e < experts_; ++e)
        if (copies_[e].size() > 1)
          for (const auto p : pairs_of_[e])
            sheddable += tr_[p] == static_cast<std::int32_t>(hot);
      if (sheddable >= need) continue;
      // The best copy: one that covers the excess onto a rank with room for it, then the most
      // copies saved; failing that, the most load covered.
      struct choice {
        bool fits = false;
        double covered = -1, gain = 0;
        std::size_t e = 0, r = 0;
      } best;
      for (std::size_t e = 0; e < experts_; ++e) {
        if (copies_[e].size() != 1 || copies_[e][0] != static_cast<std::int32_t>(hot)) continue;
        double cover = 0;
        for (const auto p : pairs_of_[e])
          cover += tr_[p] == static_cast<std::int32_t>(hot);
        if (cover <= 0) continue;
        for (std::size_t r = 0; r < ranks_; ++r) {
          if (node_of_[r] == node_of_[hot] || free_slot(r) == spr_) continue;
          const auto& served = serving(e, with_copy(e, r));
          if (!balanced(e, r, served)) continue;
          const double covered = std::min(cover, need - sheddable);
          const bool fits = cover + sheddable >= need && risk[r] + cover / mean <= risk[hot];
          const double g = gain(e, served);
          const bool better =
              fits != best.fits ? fits
              : fits            ? g > best.gain + 1e-9 || (g >= best.gain - 1e-9 && covered > best.covered)
                     : covered > best.covered + 1e-9 || (covered >= best.covered - 1e-9 && g > best.gain + 1e-9);
          if (best.covered < 0 || better) best = {fits, covered, g, e, r};
        }
      }
      if (best.covered < 0) continue;
      add(best.e, best.r);
      hedged_.emplace_back(best.e, best.r);
      ++added;
    }
    return added;
  }

  //! Each draw's rows per expert (hedge_resamples × experts): the sample's rows of each request
  //! weighted by the draw (draw_weights).
  std::vector<std::vector<double>> draw_rows() const {
    const auto [req, requests] = request_indices();
    const std::vector<double> weight = draw_weights(req, requests);
    // Rows of each expert per request, sparse (a request uses few experts).
    std::vector<std::vector<std::pair<std::uint32_t, double>>> per_request(requests);
    for (std::size_t e = 0; e < experts_; ++e)
      for (const auto p : pairs_of_[e]) {
        auto& used = per_request[req[p / k_]];
        if (used.empty() || used.back().first != e) used.emplace_back(static_cast<std::uint32_t>(e), 0.0);
        used.back().second += 1;
      }
    std::vector<std::vector<double>> rows(opt_.hedge_resamples, std::vector<double>(experts_, 0.0));
    for (std::size_t b = 0; b < rows.size(); ++b)
      for (std::size_t i = 0; i < requests; ++i)
        if (const double w = weight[b * requests + i]; w > 0)
          for (const auto& [e, n] : per_request[i])
            rows[b][e] += w * n;
    return rows;
  }

  //! Each draw's balance floor on the current copies (GPU max/mean), in draw order, draws without
  //! traffic left out.
  std::vector<double> draw_floors() {
    const auto hosts = [this](std::size_t e) -> const std::vector<std::int32_t>& { return copies_[e]; };
    std::vector<double> out;
    for (const auto& rows : draw_rows())
      if (even_split_ratio(rows) >= 0) out.push_back(floor_solver_.solve(ranks_, rows, hosts).max_over_mean);
    return out;
  }

  //! Floor-targeted hedge copies (token_refine_options::hedge_floor). Returns those added.
  std::size_t hedge_floor() {
    const std::size_t draws = opt_.hedge_resamples;
    const std::vector<std::vector<double>> rows = draw_rows();
    // A draw's floor only falls as copies are added, and the even split of each expert's rows
    // among its copies is a split every map allows: either is an upper bound that rules a draw out
    // without solving its flow. bound < 0: a draw without traffic.
    std::vector<double> bound(draws, -1.0);
    for (std::size_t b = 0; b < draws; ++b)
      bound[b] = even_split_ratio(rows[b]);
    std::vector<split_floor> solved(draws);
    // fresh: solved in this round; exact: solved[b] is the draw's floor on the current copies (a
    // copy that cannot change it leaves it so, and the round takes it instead of solving again).
    std::vector<std::uint8_t> fresh(draws), exact(draws, 0);
    const auto hosts = [this](std::size_t e) -> const std::vector<std::int32_t>& { return copies_[e]; };
    std::size_t added = 0;
    while (added < opt_.hedge_budget(ranks_)) {
      throw_if_cancelled();
      std::fill(fresh.begin(), fresh.end(), 0);
      // The worst draw: the highest bound, solved (among equal bounds an unsolved one first, then
      // the lowest index, as a full scan that keeps the first maximum would pick).
      std::size_t wb = draws;
      for (;;) {
        std::size_t top = draws;
        for (std::size_t b = 0; b < draws; ++b)
          if (bound[b] >= 0 &&
              (top == draws || bound[b] > bound[top] || (bound[b] == bound[top] && fresh[top] && !fresh[b])))
            top = b;
        if (top == draws || bound[top] <= opt_.hedge_floor) break; // every draw at most the target
        if (fresh[top]) {
          wb = top;
          break;
        }
        // Hint: the draw's binding set when last solved, often still the densest.
        if (!exact[top]) solved[top] = floor_solver_.solve(ranks_, rows[top], hosts, solved[top].binding_ranks);
        exact[top] = 1;
        bound[top] = solved[top].max_over_mean;
        fresh[top] = 1;
      }
      if (wb == draws) break;
      const split_floor& worst = solved[wb];
      std::vector<std::uint8_t> in_set(ranks_, 0);
      for (const std::size_t r : worst.binding_ranks)
        in_set[r] = 1;
      // Rows S must lose for its density to reach the target.
      const double need =
          (worst.max_load - opt_.hedge_floor * worst.mean_load) * static_cast<double>(worst.binding_ranks.size());
      const hedge_choice best =
          whole_weights_ ? best_copy_bounded(rows[wb], in_set, need) : best_copy(rows[wb], in_set, need);
      if (best.rows < 0) break; // no copy can leave S: the floor stays
      // The copy lowers W(R) only for the rank sets R that hold all of e's hosts but not r. A
      // draw's floor and binding set are those of its largest densest set U (the set min_max_split
      // ends on), so a draw whose U is not such a set, or without rows of e, keeps both.
      for (std::size_t b = 0; b < draws; ++b) {
        if (!exact[b] || rows[b][best.e] <= 0) continue;
        const auto& u = solved[b].binding_ranks;
        bool holds = !std::binary_search(u.begin(), u.end(), best.r);
        for (const auto c : copies_[best.e])
          holds = holds && std::binary_search(u.begin(), u.end(), static_cast<std::size_t>(c));
        if (holds) exact[b] = 0;
      }
      add(best.e, best.r);
      hedged_.emplace_back(best.e, best.r);
      ++added;
    }
    return added;
  }

  //! A floor hedge copy: of expert e to rank r; `fits` when e's rows can bring the binding set to
  //! the target; rows < 0 when there is none.
  struct hedge_choice {
    bool fits = false;
    double rows = -1, gain = 0;
    std::size_t e = 0, r = 0;
  };

  //! The floor hedge's copy for the binding set `in_set` that must lose `need` of the draw's
  //! `rows`: of an expert hosted only inside it to a rank outside it with a free slot, within the
  //! load bounds; the one that saves the most copies among those that fit, else the heaviest and
  //! then the most saved; ties to the first in (expert, rank) order. Costs every candidate that
  //! might beat the best so far.
  hedge_choice best_copy(const std::vector<double>& rows, const std::vector<std::uint8_t>& in_set, double need) {
    hedge_choice best;
    for (std::size_t e = 0; e < experts_; ++e) {
      bool inside = !copies_[e].empty();
      for (const auto c : copies_[e])
        inside = inside && in_set[static_cast<std::size_t>(c)];
      const double x = rows[e];
      if (!inside || x <= 0) continue;
      const bool fits = x >= need;
      // A copy that cannot beat the best so far is not costed (gain and the bound check
      // replay the expert's pairs).
      if (best.rows >= 0 && (best.fits ? !fits : !fits && x < best.rows - 1e-9)) continue;
      for (std::size_t r = 0; r < ranks_; ++r) {
        if (in_set[r] || free_slot(r) == spr_) continue;
        const auto& served = serving(e, with_copy(e, r));
        const double g = gain(e, served);
        const bool better =
            best.rows < 0 || (fits != best.fits ? fits
                              : fits            ? g > best.gain + 1e-9
                                     : x > best.rows + 1e-9 || (x >= best.rows - 1e-9 && g > best.gain + 1e-9));
        if (better && balanced(e, r, served)) best = {fits, x, g, e, r};
      }
    }
    return best;
  }

  //! best_copy's choice, costing fewer candidates: with whole-number copy weights every cost, gain
  //! and row count is a whole number, so best_copy's scan keeps the first (expert, rank) of the
  //! largest (fits, gain) or, with none that fits, (rows, gain) among the copies within the bounds.
  //! Candidates are costed by falling upper bounds on their gain (gain_bounds), and the search
  //! stops once no bound reaches the best gain found.
  hedge_choice best_copy_bounded(const std::vector<double>& rows, const std::vector<std::uint8_t>& in_set,
                                 double need) {
    hedge_choice best;
    std::vector<std::size_t>& to = hedge_ranks_;
    to.clear();
    for (std::size_t r = 0; r < ranks_; ++r)
      if (!in_set[r] && free_slot(r) != spr_) to.push_back(r);
    if (to.empty()) return best;
    // Experts hosted only inside the set, with rows: those that fit first, then by rows.
    std::vector<std::pair<double, std::size_t>>& inside = hedge_experts_;
    inside.clear();
    for (std::size_t e = 0; e < experts_; ++e) {
      bool in = !copies_[e].empty();
      for (const auto c : copies_[e])
        in = in && in_set[static_cast<std::size_t>(c)];
      if (in && rows[e] > 0)
        inside.emplace_back(rows[e] >= need ? std::numeric_limits<double>::infinity() : rows[e], e);
    }
    std::stable_sort(inside.begin(), inside.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    auto& cands = hedge_cands_;
    for (std::size_t i = 0; i < inside.size();) {
      // One group: the experts that fit, or those of equal rows.
      std::size_t end = i;
      while (end < inside.size() && inside[end].first == inside[i].first)
        ++end;
      cands.clear();
      for (std::size_t g = i; g < end; ++g) {
        const std::size_t e = inside[g].second;
        gain_bounds(e, bound_);
        for (const std::size_t r : to)
          cands.push_back({bound_[r], e, r});
      }
      std::sort(cands.begin(), cands.end(), [](const auto& a, const auto& b) {
        return a.bound > b.bound || (a.bound == b.bound && (a.e < b.e || (a.e == b.e && a.r < b.r)));
      });
      bool found = false;
      for (const auto& c : cands) {
        if (found && c.bound < best.gain) break; // no later candidate can reach the best
        const bool earlier = c.e < best.e || (c.e == best.e && c.r < best.r);
        if (found && c.bound == best.gain && !earlier) continue;
        const auto& served = serving(c.e, with_copy(c.e, c.r));
        const double gain_c = gain(c.e, served);
        if (found && !(gain_c > best.gain || (gain_c == best.gain && earlier))) continue;
        if (!balanced(c.e, c.r, served)) continue;
        best = {std::isinf(inside[i].first), rows[c.e], gain_c, c.e, c.r};
        found = true;
      }
      if (found) return best;
      i = end;
    }
    return best;
  }

  //! bound[r] >= gain(e, r) for every rank r, in O(e's pairs × top-k + ranks), for whole-number
  //! copy weights (the sums are exact). A copy of e on r sends each pair of e to one of e's copies,
  //! old or new; a pair's gain at rank q is what its token saves when the pair leaves its rank, less
  //! what it pays at q: nothing on the token's node or at a rank its other pairs use, the node's
  //! copy at another rank of a node they use, else both. So a pair gains at most the larger of its
  //! gain at the old copies (at least 0: it may stay) and at r.
  void gain_bounds(std::size_t e, std::vector<double>& bound) {
    const double wr = opt_.rank_copy_weight, wn = opt_.node_copy_weight;
    bound.assign(ranks_, 0.0); // first the per-rank corrections
    node_extra_.assign(nodes_, 0.0);
    std::int32_t other_rank[64];
    std::uint32_t other_node[64];
    double all = 0;
    for (const auto p : pairs_of_[e]) {
      const std::size_t t = p / k_, j = p % k_, home = home_[t];
      const std::int32_t* tr = tr_.data() + t * k_;
      // The remote ranks and nodes of the token's other pairs.
      std::size_t nr = 0, nn = 0;
      for (std::size_t i = 0; i < k_; ++i) {
        if (i == j || tr[i] < 0) continue;
        const std::uint32_t n = node_of_[static_cast<std::size_t>(tr[i])];
        if (n == home) continue;
        if (std::find(other_rank, other_rank + nr, tr[i]) == other_rank + nr) other_rank[nr++] = tr[i];
        if (std::find(other_node, other_node + nn, n) == other_node + nn) other_node[nn++] = n;
      }
      const auto pays = [&](std::int32_t q) {
        const std::uint32_t n = node_of_[static_cast<std::size_t>(q)];
        if (n == home) return 0.0;
        double c = 0;
        if (std::find(other_rank, other_rank + nr, q) == other_rank + nr) c += wr;
        if (std::find(other_node, other_node + nn, n) == other_node + nn) c += wn;
        return c;
      };
      const std::int32_t now = tr[j];
      const double saves = pays(now);
      double stay = 0; // the most it gains at an old copy
      for (const auto q : copies_[e])
        if (q != now) stay = std::max(stay, saves - pays(q));
      const double far = std::max(stay, saves - wr - wn), near = std::max(stay, saves);
      all += far;
      node_extra_[home] += near - far;
      for (std::size_t i = 0; i < nn; ++i)
        node_extra_[other_node[i]] += std::max(stay, saves - wr) - far;
      for (std::size_t i = 0; i < nr; ++i)
        bound[static_cast<std::size_t>(other_rank[i])] += near - std::max(stay, saves - wr);
    }
    for (std::size_t r = 0; r < ranks_; ++r)
      bound[r] += all + node_extra_[node_of_[r]];
  }

  //! Exact cost saved on the sample by a copy of e on rank r (not hosting e).
  double gain(std::size_t e, std::size_t r) { return gain(e, serving(e, with_copy(e, r))); }

  //! max/mean of the loads when each expert's `rows` split evenly among its copies (-1 without
  //! rows): at least the balance floor of those rows on the current map.
  double even_split_ratio(const std::vector<double>& rows) const {
    std::vector<double> load(ranks_, 0.0);
    double total = 0;
    for (std::size_t e = 0; e < experts_; ++e) {
      if (rows[e] <= 0 || copies_[e].empty()) continue;
      const double share = rows[e] / static_cast<double>(copies_[e].size());
      for (const auto c : copies_[e])
        load[static_cast<std::size_t>(c)] += share;
      total += rows[e];
    }
    if (total <= 0) return -1.0;
    return *std::max_element(load.begin(), load.end()) / (total / static_cast<double>(ranks_));
  }

  //! The copies the hedge added, in order (the floor hedge's choice i depends only on the copies
  //! before it, so any prefix is what a smaller hedge_replicas would have chosen).
  const std::vector<std::pair<std::size_t, std::size_t>>& hedge_copies() const noexcept { return hedged_; }

  //! Adds the first `n` of `copies` (a hedge_copies() of the same layer), as hedge() with
  //! hedge_replicas = n would, without searching again.
  void replay(const std::vector<std::pair<std::size_t, std::size_t>>& copies, std::size_t n) {
    for (std::size_t i = 0; i < n && i < copies.size(); ++i)
      add(copies[i].first, copies[i].second);
  }

  expert_map to_map() const { return expert_map(experts_, ranks_, spr_, table_); }

  //! The sample's copy cost with the copies as they are.
  double cost() const {
    double c = 0;
    for (std::size_t t = 0; t < tokens_; ++t)
      c += cost_[t];
    return c;
  }

private:
  //! The ranks serving expert e's pairs (pairs_of_[e], in order) were its copies on `copies` (in
  //! rank order): the replica rule of the selector (placement::expert_replica_candidates and
  //! choose_replica), over the sample in order as one step. A pair's choice depends only on the
  //! expert's copies, its source and its place in the source's batch, so one expert is enough.
  const std::vector<std::int32_t>& serving(std::size_t e, const std::vector<std::int32_t>& copies) {
    served_.resize(pairs_of_[e].size());
    src_fixed_.assign(ranks_, unset);
    src_nth_.assign(ranks_, 0);
    src_cands_.resize(ranks_);
    const auto m = static_cast<std::int32_t>(copies.size());
    const auto rank_of = [&](std::int32_t i) { return copies[static_cast<std::size_t>(i)]; };
    for (std::size_t i = 0; i < pairs_of_[e].size(); ++i) {
      const std::size_t p = pairs_of_[e][i], t = p / k_, src = src_of_[t];
      auto& cands = src_cands_[src];
      if (src_fixed_[src] == unset) {
        cands.clear();
        src_fixed_[src] = expert_replica_candidates(e, 0, m, rank_of, topo_, src, policy_, cands);
      }
      const std::int32_t offsets[2] = {0, static_cast<std::int32_t>(cands.size())};
      const auto position = static_cast<std::int64_t>(batch_index_[t] * k_ + p % k_);
      const std::int32_t x =
          choose_replica(&src_fixed_[src], offsets, cands.data(), 0, src_nth_[src], policy_.rule, position);
      if (src_fixed_[src] < 0) ++src_nth_[src];
      served_[i] = copies[static_cast<std::size_t>(x)];
    }
    return served_;
  }

  bool hosts(std::size_t e, std::size_t n) const {
    for (const auto r : copies_[e])
      if (node_of_[static_cast<std::size_t>(r)] == n) return true;
    return false;
  }

  //! The least-loaded rank of node n with an empty slot, or ranks_.
  std::size_t free_rank(std::size_t n) const {
    std::size_t best = ranks_;
    for (std::size_t r = 0; r < ranks_; ++r) {
      if (node_of_[r] != n || free_slot(r) == spr_) continue;
      if (best == ranks_ || load_[r] < load_[best]) best = r;
    }
    return best;
  }

  std::size_t free_slot(std::size_t r) const {
    for (std::size_t s = 0; s < spr_; ++s)
      if (table_[r * spr_ + s] == empty_slot) return s;
    return spr_;
  }

  //! Token t's copy cost with pair jx served by rank rx (jx = k: no pair replaced).
  double token_cost(std::size_t t, std::size_t jx, std::int32_t rx) {
    const std::int32_t* tr = tr_.data() + t * k_;
    const auto rank_of = [&](std::size_t j) -> std::int64_t { return j == jx ? rx : tr[j]; };
    return token_copy_cost(sample_source_rank(home_[t], t, gpus_), gpus_, k_, rank_of, node_of_, ranks_seen_,
                           nodes_seen_, opt_);
  }

  std::vector<std::int32_t> with_copy(std::size_t e, std::size_t r) const {
    auto c = copies_[e];
    c.insert(std::upper_bound(c.begin(), c.end(), static_cast<std::int32_t>(r)), static_cast<std::int32_t>(r));
    return c;
  }

  //! The same, given the ranks that would serve e's pairs with the copy (serving(e, with_copy(e, r))).
  double gain(std::size_t e, const std::vector<std::int32_t>& served) {
    double g = 0;
    for (std::size_t i = 0; i < pairs_of_[e].size(); ++i) {
      const std::size_t p = pairs_of_[e][i], t = p / k_, j = p % k_;
      const std::int32_t now = tr_[p], next = served[i];
      if (now == next) continue;
      g += cost_[t] - token_cost(t, j, next);
    }
    return g;
  }

  //! Whether a copy of e on rank r keeps the load bounds, given the ranks that would serve e's
  //! pairs with it (serving(e, with_copy(e, r))).
  bool balanced(std::size_t e, std::size_t r, const std::vector<std::int32_t>& served) {
    auto& delta = delta_;
    auto& shifted_delta = shifted_delta_;
    delta.assign(ranks_, 0.0);
    shifted_delta.assign(shifted_.pairs.size(), 0.0);
    for (std::size_t i = 0; i < pairs_of_[e].size(); ++i) {
      const std::size_t p = pairs_of_[e][i];
      const std::int32_t now = tr_[p], next = served[i];
      if (now == next) continue;
      delta[static_cast<std::size_t>(now)] -= 1;
      delta[static_cast<std::size_t>(next)] += 1;
      if (shifted_.on()) {
        shifted_delta[mix_[p / k_] * ranks_ + static_cast<std::size_t>(now)] -= 1;
        shifted_delta[mix_[p / k_] * ranks_ + static_cast<std::size_t>(next)] += 1;
      }
    }
    double worst_new = 0, worst_old = 0;
    for (std::size_t x = 0; x < ranks_; ++x)
      if (delta[x] != 0 || x == r) {
        worst_new = std::max(worst_new, load_[x] + delta[x]);
        worst_old = std::max(worst_old, load_[x]);
      }
    if (!keeps_load_bound(worst_new, worst_old, cap_)) return false;
    for (std::size_t s = 0; s < shifted_.cap.size(); ++s) {
      worst_new = worst_old = 0;
      for (std::size_t x = 0; x < ranks_; ++x)
        if (delta[x] != 0 || x == r) {
          const double old = shifted_.at(load_, s, x);
          worst_new = std::max(worst_new, old + delta[x] + shifted_.shift * shifted_delta[s * ranks_ + x]);
          worst_old = std::max(worst_old, old);
        }
      if (!keeps_load_bound(worst_new, worst_old, shifted_.cap[s])) return false;
    }
    return true;
  }

  void add(std::size_t e, std::size_t r) {
    copies_[e] = with_copy(e, r);
    const auto& served = serving(e, copies_[e]);
    for (std::size_t i = 0; i < pairs_of_[e].size(); ++i) {
      const std::size_t p = pairs_of_[e][i];
      const std::int32_t next = served[i];
      load_[static_cast<std::size_t>(tr_[p])] -= 1;
      load_[static_cast<std::size_t>(next)] += 1;
      shifted_.count(mix_[p / k_], static_cast<std::size_t>(tr_[p]), -1.0);
      shifted_.count(mix_[p / k_], static_cast<std::size_t>(next), 1.0);
      tr_[p] = next;
    }
    for (const auto p : pairs_of_[e]) // a token uses e once (repeats are not pairs)
      cost_[p / k_] = token_cost(p / k_, k_, -1);
    table_[r * spr_ + free_slot(r)] = static_cast<expert_id>(e);
  }

  static constexpr std::int32_t unset = -2; //!< src_fixed_: the source's candidates not built yet

  token_refine_options opt_;
  replica_policy policy_;
  Topology topo_;
  std::size_t k_, tokens_, ranks_, nodes_, gpus_, spr_;
  std::span<const std::uint16_t> ids_;
  std::span<const std::uint32_t> home_;
  std::span<const std::uint32_t> mix_; //!< per token: its shifted-mix group (home_ when none given)
  std::size_t mixes_;
  std::size_t experts_;
  std::span<const std::uint32_t> request_;       //!< per token: its request (empty: its own)
  std::span<const std::uint32_t> request_class_; //!< per token: its request's class (empty: none)
  std::size_t layer_;
  std::vector<std::uint32_t> node_of_;
  std::vector<expert_id> table_;
  std::vector<std::vector<std::int32_t>> copies_;
  std::vector<std::pair<std::size_t, std::size_t>> hedged_; //!< hedge copies in order: (expert, rank)
  std::vector<std::vector<std::uint32_t>> pairs_of_;
  std::vector<std::int32_t> tr_;
  std::vector<std::uint32_t> src_of_, batch_index_; //!< per token: source rank, index in its batch
  std::vector<std::int32_t> served_, src_fixed_, src_nth_;
  std::vector<std::vector<std::int32_t>> src_cands_;
  std::vector<double> load_;
  std::vector<double> cost_;                  //!< per token: its copy cost under tr_
  std::vector<double> delta_, shifted_delta_; //!< balanced()'s scratch
  double cap_ = 0;
  shifted_loads shifted_;
  stamp_set ranks_seen_, nodes_seen_;
  split_floor_solver floor_solver_; //!< hedge_floor()'s draws
  //! Copy costs are whole numbers (best_copy_bounded): whole-number weights, small enough to sum
  //! exactly, and top-k at most 64 (gain_bounds' arrays).
  bool whole_weights_ = false;
  struct bounded_copy {
    double bound;
    std::size_t e, r;
  };
  std::vector<bounded_copy> hedge_cands_; //!< best_copy_bounded()'s scratch
  std::vector<std::pair<double, std::size_t>> hedge_experts_;
  std::vector<std::size_t> hedge_ranks_;
  std::vector<double> bound_, node_extra_;
};

} // namespace detail::token_refine

namespace detail::token_refine {
//! True when both copy weights are finite and non-negative: an infinite weight made every cost
//! infinite (inf - inf gains are NaN), so nothing moved and the report read inf -> inf.
inline bool finite_weights(const token_refine_options& opt) noexcept {
  return std::isfinite(opt.rank_copy_weight) && opt.rank_copy_weight >= 0 && std::isfinite(opt.node_copy_weight) &&
         opt.node_copy_weight >= 0;
}

//! The slack, copy weights and balance shift the refinement and the replica fill both read,
//! checked once for each; `who` starts the message.
//! @throws locus::config_error naming the values
inline void check_cost_options(const token_refine_options& opt, const char* who) {
  LOCUS_REQUIRE(opt.balance_slack >= 0 && finite_weights(opt), config_error, who, ": a slack (", opt.balance_slack,
                ") that is not a number >= 0, or copy weights (", opt.rank_copy_weight, ", ", opt.node_copy_weight,
                ") that are not finite numbers >= 0");
  LOCUS_REQUIRE(std::isfinite(opt.balance_shift) && opt.balance_shift >= 0, config_error, who, ": balance shift ",
                opt.balance_shift, " (expected a finite number >= 0)");
  LOCUS_REQUIRE(std::isfinite(opt.shift_slack) && opt.shift_slack >= 0, config_error, who, ": shift slack ",
                opt.shift_slack, " (expected a finite number >= 0)");
  // An unknown rule was counted as locality_first here, where the simulator and re-planner refuse it.
  LOCUS_REQUIRE(std::find(transport::all_replica_rules.begin(), transport::all_replica_rules.end(),
                          opt.replicas.rule) != transport::all_replica_rules.end(),
                config_error, who, ": replica rule ", static_cast<unsigned>(opt.replicas.rule), " is none of locus's");
}

//! The options the hedge's draws read (hedge_resamples, hedge_class_spread with the sample's
//! request classes) and its byte bound, checked once for every caller; `who` starts the message.
//! @throws locus::config_error naming the option and its value
inline void check_hedge_options(const token_refine_options& opt, const token_sample& sample, const char* who) {
  // The draws cost O(resamples × requests × ranks) per hedge copy: bound the factor.
  LOCUS_REQUIRE(opt.hedge_resamples <= 4096, config_error, who, ": ", opt.hedge_resamples,
                " hedge resamples (at most 4,096)");
  LOCUS_REQUIRE(std::isfinite(opt.hedge_class_spread) && opt.hedge_class_spread >= 0 &&
                    opt.hedge_class_spread <= token_refine_options::max_hedge_class_spread,
                config_error, who, ": hedge class spread ", opt.hedge_class_spread, " (expected a number from 0 to ",
                token_refine_options::max_hedge_class_spread, ")");
  LOCUS_REQUIRE(opt.hedge_class_spread == 0 || !sample.request_class.empty(), config_error, who,
                ": a hedge class spread needs the sample's request classes");
  LOCUS_REQUIRE(std::isfinite(opt.hedge_cost_budget) && opt.hedge_cost_budget >= 0, config_error, who,
                ": hedge cost budget ", opt.hedge_cost_budget, " (expected a finite number >= 0; 0: no bound)");
}

template <class Topology>
expert_map refine_layer(const expert_map& map, const token_sample& sample, std::size_t layer, const Topology& topo,
                        const token_refine_options& opt, token_refine_report* report) {
  LOCUS_REQUIRE(map.ranks() == topo.ranks(), config_error, "refine_by_tokens: the map has ", map.ranks(),
                " ranks, the topology ", topo.ranks());
  LOCUS_REQUIRE(map.experts() == sample.experts, config_error, "refine_by_tokens: the map has ", map.experts(),
                " experts, the sample ", sample.experts);
  LOCUS_REQUIRE(layer < sample.layers(), config_error, "refine_by_tokens: layer ", layer, " but the sample has ",
                sample.layers());
  LOCUS_REQUIRE(sample.top_k <= 64, config_error, "refine_by_tokens: top-k ", sample.top_k, " above 64");
  check_cost_options(opt, "refine_by_tokens");
  LOCUS_REQUIRE(std::isfinite(opt.anneal_temperature) && opt.anneal_temperature >= 0, config_error,
                "refine_by_tokens: anneal temperature ", opt.anneal_temperature, " (expected a finite number >= 0)");
  // No candidate turned the sweeps off without a word; a NaN or negative gain never stopped them.
  LOCUS_REQUIRE(opt.candidates >= 1, config_error, "refine_by_tokens: 0 swap candidates (at least 1)");
  LOCUS_REQUIRE(std::isfinite(opt.min_sweep_gain) && opt.min_sweep_gain >= 0, config_error,
                "refine_by_tokens: min sweep gain ", opt.min_sweep_gain, " (expected a finite number >= 0)");
  LOCUS_REQUIRE(opt.anneal_per_expert <= token_refine_options::max_anneal_per_expert, config_error,
                "refine_by_tokens: anneal_per_expert is ", opt.anneal_per_expert, ", expected at most ",
                token_refine_options::max_anneal_per_expert);
  layer_state<Topology> s(map, sample.ids[layer], sample.home, sample.top_k, topo, opt, layer, sample.mix_group,
                          sample.load_weight);
  token_refine_report rep;
  rep.cost_before = s.total_cost();
  rep.repair_swaps = s.repair();
  if (opt.repair_load_bound) rep.repair_swaps += s.repair_load_bound();
  rep.swaps = s.refine();
  rep.cost_swept = s.total_cost();
  if (opt.anneal_per_expert > 0) { // from the sweeps' optimum; it ends no worse than it started
    rep.anneal_accepted = s.anneal(opt.anneal_per_expert * map.experts(), opt.anneal_temperature,
                                   opt.anneal_seed ^ (0x9e3779b97f4a7c15ull * (layer + 1)));
    rep.swaps += s.refine();
  }
  rep.cost_after = s.total_cost();
  if (report) *report = rep;
  return s.to_map(map);
}
} // namespace detail::token_refine

//! Refines one layer's map on the sample's layer `layer` (see the file comment).
//! @throws locus::config_error when the map, the topology and the sample disagree in size
//! @throws locus::invalid_input_error on a malformed sample
template <class Topology>
expert_map refine_layer_by_tokens(const expert_map& map, const token_sample& sample, std::size_t layer,
                                  const Topology& topo, const token_refine_options& opt = {},
                                  token_refine_report* report = nullptr) {
  sample.validate(topo.nodes());
  return detail::token_refine::refine_layer(map, sample, layer, topo, opt, report);
}

//! Refines every layer's map (maps[l] with the sample's layer l).
//! @throws as refine_layer_by_tokens, and config_error when the layer counts differ
template <class Topology>
std::vector<expert_map> refine_by_tokens(const std::vector<expert_map>& maps, const token_sample& sample,
                                         const Topology& topo, const token_refine_options& opt = {},
                                         std::vector<token_refine_report>* reports = nullptr) {
  LOCUS_REQUIRE(maps.size() == sample.layers(), config_error, "refine_by_tokens: ", maps.size(),
                " maps for a sample of ", sample.layers(), " layers");
  sample.validate(topo.nodes());
  std::vector<expert_map> out;
  out.reserve(maps.size());
  if (reports) reports->assign(maps.size(), {});
  for (std::size_t l = 0; l < maps.size(); ++l)
    out.push_back(
        detail::token_refine::refine_layer(maps[l], sample, l, topo, opt, reports ? &(*reports)[l] : nullptr));
  return out;
}

//! The sample's copy cost (see the file comment) of each layer's map, summed over layers, with the
//! locality rules' joins: the traffic model's inter-node copies for the sample's tokens as one step
//! when one kind of copy is counted (with both kinds, the joins are the flat transport's);
//! refine_by_tokens and add_replicas_by_tokens lower the same count without the joins.
//! @throws as refine_by_tokens
template <class Topology>
double sample_copy_cost(const std::vector<expert_map>& maps, const token_sample& sample, const Topology& topo,
                        const token_refine_options& opt = {}) {
  LOCUS_REQUIRE(maps.size() == sample.layers(), config_error, "sample_copy_cost: ", maps.size(),
                " maps for a sample of ", sample.layers(), " layers");
  sample.validate(topo.nodes());
  double c = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    throw_if_cancelled();
    LOCUS_REQUIRE(maps[l].ranks() == topo.ranks() && maps[l].experts() == sample.experts, config_error,
                  "sample_copy_cost: layer ", l, " map does not match the sample or the topology");
    c += detail::token_refine::layer_state<Topology>(maps[l], sample.ids[l], sample.home, sample.top_k, topo, opt, l,
                                                     {}, {}, true)
             .total_cost();
  }
  return c;
}

//! The balance floor (split_floor.hpp: the lowest GPU max/mean any split of each expert's rows
//! among its copies reaches) of `map` under each of the floor hedge's draws of the sample's layer
//! `layer` (token_refine_options::hedge_resamples, hedge_seed and hedge_class_spread), in draw
//! order, draws without traffic left out: the mixes the hedge holds a plan to. A test mix whose
//! floor is above the worst of them lies outside what the hedge could see.
//! @throws as refine_by_tokens, and config_error for a class spread the hedge refuses
template <class Topology>
std::vector<double> hedge_draw_floors(const expert_map& map, const token_sample& sample, std::size_t layer,
                                      const Topology& topo, const token_refine_options& opt = {}) {
  sample.validate(topo.nodes());
  LOCUS_REQUIRE(layer < sample.layers(), config_error, "hedge_draw_floors: layer ", layer, " but the sample has ",
                sample.layers());
  LOCUS_REQUIRE(map.ranks() == topo.ranks() && map.experts() == sample.experts, config_error,
                "hedge_draw_floors: the map (", map.experts(), " experts, ", map.ranks(),
                " ranks) does not match the sample (", sample.experts, ") or the topology (", topo.ranks(), ")");
  detail::token_refine::check_hedge_options(opt, sample, "hedge_draw_floors");
  return detail::token_refine::replica_state<Topology>(map, sample.ids[layer], sample.home, sample.top_k, topo, opt,
                                                       layer, sample.mix_group, sample.request, sample.request_class)
      .draw_floors();
}

//! Fills each layer's empty slots with replicas chosen on the sample's exact copy cost: greedily
//! the (node, expert) copy that saves the most copies (a token's copy goes where the replica rule
//! of token_refine_options::replicas sends it, as in refine_by_tokens), placed on the
//! node's least-loaded GPU with a free slot, while the loads stay under the bound of
//! token_refine_options::balance_slack (or no worse than before). Leaves a slot empty when no copy
//! saves anything. Existing copies never move. With token_refine_options::hedge_replicas, slots
//! first go to hedge copies (see that option) under the same bound; `hedged`, when given, receives
//! how many the maps keep, over all layers.
//! @throws as refine_by_tokens
template <class Topology>
std::vector<expert_map> add_replicas_by_tokens(const std::vector<expert_map>& maps, const token_sample& sample,
                                               const Topology& topo, const token_refine_options& opt = {},
                                               std::size_t* hedged = nullptr) {
  LOCUS_REQUIRE(maps.size() == sample.layers(), config_error, "add_replicas_by_tokens: ", maps.size(),
                " maps for a sample of ", sample.layers(), " layers");
  sample.validate(topo.nodes());
  // The fill's loads and hedge draws count every token once: a weighted sample would be balanced
  // on other loads than the swaps before it held.
  LOCUS_REQUIRE(sample.load_weight.empty(), config_error,
                "add_replicas_by_tokens: the sample has load weights (read by the swaps only)");
  detail::token_refine::check_cost_options(opt, "add_replicas_by_tokens");
  LOCUS_REQUIRE(std::isfinite(opt.hedge_z) && opt.hedge_z >= 0, config_error, "add_replicas_by_tokens: hedge z ",
                opt.hedge_z, " (expected a finite number >= 0)");
  LOCUS_REQUIRE(std::isfinite(opt.hedge_excess) && opt.hedge_excess >= 0, config_error,
                "add_replicas_by_tokens: hedge excess ", opt.hedge_excess, " (expected a finite number >= 0)");
  LOCUS_REQUIRE(opt.hedge_floor == 0 || (std::isfinite(opt.hedge_floor) && opt.hedge_floor >= 1), config_error,
                "add_replicas_by_tokens: hedge floor ", opt.hedge_floor, " (0: off, else a GPU max/mean target >= 1)");
  detail::token_refine::check_hedge_options(opt, sample, "add_replicas_by_tokens");
  std::vector<expert_map> out;
  out.reserve(maps.size());
  for (std::size_t l = 0; l < maps.size(); ++l) {
    throw_if_cancelled();
    LOCUS_REQUIRE(maps[l].ranks() == topo.ranks() && maps[l].experts() == sample.experts, config_error,
                  "add_replicas_by_tokens: layer ", l, " map (", maps[l].experts(), " experts, ", maps[l].ranks(),
                  " ranks) does not match the sample (", sample.experts, ") or the topology (", topo.ranks(), ")");
    using state = detail::token_refine::replica_state<Topology>;
    const auto make = [&] {
      return state(maps[l], sample.ids[l], sample.home, sample.top_k, topo, opt, l, sample.mix_group, sample.request,
                   sample.request_class);
    };
    // The layer's map and its sample cost after the fill, from a state holding its hedge copies.
    const auto finish = [&](state& s) {
      s.fill();
      const double c = opt.hedge_cost_budget > 0 ? s.cost() : 0.0;
      return std::pair<expert_map, double>(s.to_map(), c);
    };
    state first = make();
    const std::size_t made = first.hedge();
    const auto copies = first.hedge_copies();
    auto best = finish(first);
    std::size_t kept = made;
    if (made > 0 && opt.hedge_floor > 0 && opt.hedge_cost_budget > 0) {
      // Fewer hedge copies are a prefix of these (the floor hedge is greedy): replayed, not searched.
      const auto with = [&](std::size_t n) {
        state s = make();
        s.replay(copies, n);
        return finish(s);
      };
      const double bound = with(0).second * (1 + opt.hedge_cost_budget) + 1e-9;
      for (std::size_t n = made; n-- > 0 && best.second > bound;) {
        best = with(n); // n = 0 is the plain fill: within the bound
        kept = n;
      }
    }
    if (hedged != nullptr) *hedged += kept;
    out.push_back(std::move(best.first));
  }
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
