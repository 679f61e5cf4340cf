#pragma once
//! @file
//! Trace-driven decode simulation with continuous batching. Requests arrive (all at the start in
//! trace order, or by a seeded Poisson process), a grouper gives each one a rank with room (at
//! most `batch_per_rank` running requests per rank; a request the grouper cannot place waits, and
//! requests behind it wait too, first come first served), and every step each running request
//! contributes its next decode token to every MoE layer. The traffic model counts each step of
//! each layer; the result keeps per-step and per-layer figures. A gap in the arrivals with nothing
//! running is skipped, not simulated step by step (it moves nothing): a low arrival rate costs no
//! time or memory for the empty steps.
//!
//! Metrics (all per decode token unless said otherwise):
//! - inter_node_bytes_per_token: network bytes of dispatch + combine summed over layers;
//! - inter_node_copies_per_token: network copies of dispatch summed over layers;
//! - gpu_imbalance_step_weighted: per step and layer, the busiest rank's expert rows, summed over
//!   the run, over the mean rank's summed likewise: a step's expert work waits for its busiest rank,
//!   so where rows decide expert time (the time model's rows term) this is the factor by which the
//!   run's expert time exceeds a balanced run's (a step of few tokens counts little, as in time);
//! - gpu_imbalance_step_mean: per step, mean over layers of max/mean expert rows per rank; then
//!   the mean over steps, every step alike (the drain at a run's end, a few requests left on long
//!   steps of few rows, weighs as much as a full step);
//! - gpu_imbalance_aggregate: per layer, max/mean of expert rows summed over the whole run; then
//!   the mean over layers;
//! - layer_time_estimate_us: the modelled layer time (time_model.hpp), mean over steps and layers;
//! - normalised all-to-all data (the paper's metric, see normalized_all2all): per step, inter-node
//!   bytes per token divided by a baseline run's at the same step; median and p90 over steps.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/cost/time_model.hpp>
#include <locus/cost/traffic.hpp>
#include <locus/grouper/grouper.hpp>
#include <locus/trace/trace.hpp>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

struct simulation_config {
  dynamic_topology topology{1, 1};
  transport_kind transport = transport_kind::flat;
  message_sizes sizes = message_sizes::fp8_dispatch_bf16_combine(7168);
  link_model links{};
  std::size_t batch_per_rank = 32; //!< most running requests per rank
  //! Requests per step of a Poisson arrival process; 0 puts every request in the queue at step 0.
  double arrival_rate = 0;
  std::uint64_t seed = 1;
  std::size_t max_steps = 0; //!< 0: until every request has finished
  //! How copies pick among an expert's replicas (the engine's rule; transport/replica_selection.hpp).
  placement::replica_rule replica_rule = placement::replica_rule::locality_first;
  //! locality_bounded: a rank is hot for a layer when its recent rows exceed (1 + slack) × the mean.
  double replica_slack = 0.05;
  //! locality_bounded: recent = an exponential average over about this many steps; 0 = since the start.
  std::size_t replica_window = 0;
  //! With N > 0, simulation_result::gpu_imbalance_window: the balance of GPU loads summed over
  //! windows of N simulated steps (1: per step, as gpu_imbalance_step_weighted; the run's length:
  //! as over the run), which tells a load that drifts over many steps from one that jitters per step.
  std::size_t balance_window = 0;
};

//! Per layer, the replica policy of the coming step and, for locality_bounded, the loads it
//! follows: what the simulator and the online replay share.
class replica_policies {
public:
  replica_policies(const simulation_config& cfg, std::size_t layers) : rule_(cfg.replica_rule) {
    if (rule_ == placement::replica_rule::locality_bounded)
      trackers_.assign(layers,
                       placement::hot_rank_tracker(cfg.topology.ranks(), cfg.replica_slack, cfg.replica_window));
  }
  //! The policy for layer `l` in the coming step (the layer index seeds the static draws).
  placement::replica_policy operator()(std::size_t l) const {
    return {rule_, l, trackers_.empty() ? std::span<const std::uint8_t>{} : trackers_[l].hot()};
  }
  //! Records layer `l`'s step once counted.
  void observe(std::size_t l, const layer_traffic& step) {
    if (!trackers_.empty()) trackers_[l].observe(std::span<const std::uint64_t>(step.expert_rows));
  }

private:
  placement::replica_rule rule_;
  std::vector<placement::hot_rank_tracker> trackers_;
};

struct simulation_result {
  std::size_t steps = 0;      //!< steps simulated (the per-step vectors' length)
  std::size_t idle_steps = 0; //!< steps of arrival gaps skipped: nothing ran and nothing arrived
  std::uint64_t decode_tokens = 0;
  std::size_t requests_served = 0;
  std::vector<layer_traffic> layers; //!< per layer, summed over the run
  //! Per simulated step, its number in the run (ascending; it passes its position where an arrival
  //! gap was skipped): what two runs' steps are paired by.
  std::vector<std::size_t> step_number;
  std::vector<std::uint64_t> step_tokens;    //!< decode tokens per step
  std::vector<double> step_inter_node_bytes; //!< network bytes per step (dispatch + combine, all layers)
  std::vector<double> step_imbalance;        //!< per step, mean over layers of max/mean rows
  std::vector<double> step_layer_time_us;    //!< per step, mean modelled layer time

  double inter_node_bytes_per_token = 0;
  double inter_node_copies_per_token = 0;
  double gpu_imbalance_step_weighted = 1;
  //! simulation_config::balance_window's figure: per window of that many steps and per layer, the
  //! busiest rank's rows summed over the window, over the mean rank's, weighted by the window's rows
  //! (1 when the window is 0).
  double gpu_imbalance_window = 1;
  std::size_t balance_window = 0; //!< the window it was measured over (0: not measured)
  double gpu_imbalance_step_mean = 1;
  double gpu_imbalance_aggregate = 1;
  double layer_time_estimate_us = 0;
  //! Per rank, the context tokens its running requests attend over, summed over steps (attention
  //! work and KV memory over time); and the busiest rank's over the mean. The GPU max/mean above
  //! counts expert rows only: a grouping that piles long requests onto a few ranks shows here.
  std::vector<double> rank_attention_tokens;
  double attention_imbalance = 1;
};

//! Quantile `q` of `v` by linear interpolation between order statistics (0 for an empty vector).
//! @throws locus::invalid_input_error when `q` is not in [0, 1] (it would index outside `v`)
inline double quantile(std::vector<double> v, double q) {
  LOCUS_REQUIRE(q >= 0 && q <= 1, invalid_input_error, "quantile: q is ", q, ", expected a number in [0, 1]");
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

//! Median and p90 over steps of (network bytes per token) / (the baseline's at the same step),
//! over the steps both runs have with tokens and where the baseline moved any bytes.
struct normalized_all2all {
  double median = 1;
  double p90 = 1;
};
inline normalized_all2all normalize_all2all(const simulation_result& run, const simulation_result& baseline) {
  std::vector<double> ratios;
  // Steps are paired by their number in the run (a run may have skipped an arrival gap the other
  // spent running).
  for (std::size_t s = 0, b = 0; s < run.steps && b < baseline.steps;) {
    if (run.step_number[s] < baseline.step_number[b]) {
      ++s;
      continue;
    }
    if (baseline.step_number[b] < run.step_number[s]) {
      ++b;
      continue;
    }
    if (run.step_tokens[s] > 0 && baseline.step_tokens[b] > 0 && baseline.step_inter_node_bytes[b] > 0) {
      const double mine = run.step_inter_node_bytes[s] / static_cast<double>(run.step_tokens[s]);
      const double base = baseline.step_inter_node_bytes[b] / static_cast<double>(baseline.step_tokens[b]);
      ratios.push_back(mine / base);
    }
    ++s;
    ++b;
  }
  if (ratios.empty()) return {};
  return {quantile(ratios, 0.5), quantile(ratios, 0.9)};
}

//! Called once per simulated step with its number in the run (simulation_result::step_number: the
//! steps of a skipped arrival gap are never seen), its decode tokens (trace positions) and the rank
//! each runs on.
template <class F>
concept step_observer = requires(F f, std::size_t step, std::span<const std::size_t> tokens,
                                 std::span<const std::uint32_t> sources) {
  f(step, tokens, sources);
};

//! A step_observer that does nothing.
struct no_step_observer {
  void operator()(std::size_t, std::span<const std::size_t>, std::span<const std::uint32_t>) const noexcept {}
};

namespace detail::simulation {

//! A request waiting for a rank: `prefill` tokens before its first decode token, `decode_tokens`
//! marked decode from there on (a later turn's prefill may sit between them: it is context, not a
//! step).
struct pending {
  std::size_t request, prefill, first_decode, decode_tokens, arrival_step;
};

//! A request decoding on a rank: the trace position of its next token, the tokens it has left and
//! the context it attends over.
struct running {
  std::size_t request, next_token, remaining, context;
};

//! Rejects maps, sizes and rates the run cannot honour, before any state is built, so a bad
//! deployment fails with what is wrong instead of a wrong count.
inline void validate(const trace::trace& t, const std::vector<expert_map>& maps, const simulation_config& cfg) {
  const std::size_t ranks = cfg.topology.ranks(), layers = t.layers();
  LOCUS_REQUIRE(maps.size() == layers, config_error, "simulate_decode: ", maps.size(), " expert maps for ", layers,
                " layers");
  for (std::size_t l = 0; l < layers; ++l)
    LOCUS_REQUIRE(maps[l].experts() == t.experts() && maps[l].ranks() == ranks, config_error, "simulate_decode: layer ",
                  l, " map has ", maps[l].experts(), " experts on ", maps[l].ranks(), " ranks; the trace has ",
                  t.experts(), " experts and the topology ", ranks, " ranks");
  LOCUS_REQUIRE(cfg.batch_per_rank > 0, config_error, "simulate_decode: batch_per_rank must be positive");
  // A run with nothing to decode returned an all-zero result, read as a free deployment.
  LOCUS_REQUIRE(std::ranges::find(t.phases(), trace::phase::decode) != t.phases().end(), config_error,
                "simulate_decode: the trace has no decode tokens (no token of its ", t.requests(),
                " requests is marked decode): nothing to simulate");
  // An enum cast from a number (a config file, a binding) ran silently as some default rule.
  LOCUS_REQUIRE(static_cast<std::size_t>(cfg.replica_rule) < placement::all_replica_rules.size(), config_error,
                "simulate_decode: replica_rule ", static_cast<unsigned>(cfg.replica_rule), " is none of the ",
                placement::all_replica_rules.size(), " rules");
  LOCUS_REQUIRE(cfg.transport == transport_kind::flat || cfg.transport == transport_kind::hierarchical, config_error,
                "simulate_decode: transport ", static_cast<unsigned>(cfg.transport),
                " is neither flat nor hierarchical");
  LOCUS_REQUIRE(std::isfinite(cfg.arrival_rate) && cfg.arrival_rate >= 0, config_error,
                "simulate_decode: arrival_rate is ", cfg.arrival_rate, ", expected a finite number >= 0");
  // Byte counters are 64-bit: every copy of every token at every layer, both ways, must fit.
  const std::uint64_t copies = std::uint64_t{t.tokens()} * t.top_k() * std::max<std::size_t>(layers, 1) + 1;
  const std::uint64_t limit = (std::uint64_t{1} << 62) / copies;
  LOCUS_REQUIRE(cfg.sizes.dispatch_bytes <= limit && cfg.sizes.combine_bytes <= limit && cfg.sizes.entry_bytes <= limit,
                config_error, "simulate_decode: message sizes of ", cfg.sizes.dispatch_bytes, " + ",
                cfg.sizes.combine_bytes, " bytes (entries ", cfg.sizes.entry_bytes,
                ") would overflow the byte counters over ", copies - 1, " copies (at most ", limit, " bytes each)");
  cfg.links.validate();
}

//! The queue of requests with decode tokens, in trace order, each with its arrival step (0, or
//! drawn from the seeded Poisson process), so every run of one config sees the same arrivals.
inline std::deque<pending> arrival_queue(const trace::trace& t, const simulation_config& cfg) {
  std::deque<pending> queue;
  std::mt19937_64 rng(cfg.seed);
  std::exponential_distribution<double> gap(cfg.arrival_rate > 0 ? cfg.arrival_rate : 1.0);
  double clock = 0;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    std::size_t prefill = 0;
    const auto phases = std::span(t.phases()).subspan(q.first_token, q.length);
    while (prefill < q.length && phases[prefill] != trace::phase::decode)
      ++prefill;
    if (prefill == q.length) continue; // nothing to decode
    const auto decode =
        static_cast<std::size_t>(std::count(phases.begin() + prefill, phases.end(), trace::phase::decode));
    if (cfg.arrival_rate > 0) clock += gap(rng);
    // Arrival steps are whole numbers of steps: the conversion must stay in range.
    LOCUS_REQUIRE(clock < 1e18, config_error, "simulate_decode: an arrival rate of ", cfg.arrival_rate,
                  " requests per step puts request ", r, " after step 10^18");
    queue.push_back({r, prefill, q.first_token + prefill, decode, static_cast<std::size_t>(clock)});
  }
  return queue;
}

//! One simulation in progress: the queue, what runs on each rank and the figures so far. One
//! method per phase of a step, so simulate_decode reads as the step it models.
class decode_run {
public:
  decode_run(const trace::trace& t, const std::vector<expert_map>& maps, const simulation_config& cfg)
      : t_(t), maps_(maps), cfg_(cfg), ranks_(cfg.topology.ranks()), layers_(t.layers()), queue_(arrival_queue(t, cfg)),
        per_rank_(ranks_), state_(ranks_), counter_(cfg.topology, cfg.transport), policies_(cfg, layers_),
        step_traffic_(layers_, layer_traffic(ranks_)),
        bytes_per_copy_(cfg.sizes.dispatch_bytes + cfg.sizes.combine_bytes),
        window_(cfg.balance_window, layers_, ranks_) {
    out_.layers.assign(layers_, layer_traffic(ranks_));
    out_.rank_attention_tokens.assign(ranks_, 0.0);
  }

  //! True once no request waits or runs.
  bool finished() const noexcept { return queue_.empty() && active_ == 0; }

  //! `step`, or with nothing running, the step of the next arrival, at most `max_steps` when that
  //! is set (the empty steps before it are counted as idle, not simulated).
  std::size_t skip_idle(std::size_t step, std::size_t max_steps) noexcept {
    if (active_ != 0 || queue_.empty() || queue_.front().arrival_step <= step) return step;
    const std::size_t next =
        max_steps ? std::min(queue_.front().arrival_step, std::max(step, max_steps)) : queue_.front().arrival_step;
    out_.idle_steps += next - step;
    return next;
  }

  //! Admits arrivals in order until the grouper finds no room for the head of the queue (first
  //! come first served: requests behind a waiting one wait too).
  //! @throws locus::invalid_input_error when the grouper picks a rank out of range or full, or
  //!         makes a request wait while nothing runs (no step could ever change its answer)
  template <class Grouper>
  void admit(std::size_t step, Grouper& g) {
    while (!queue_.empty() && queue_.front().arrival_step <= step) {
      const pending& p = queue_.front();
      const grouper::cluster_state cluster{cfg_.topology, state_, cfg_.batch_per_rank};
      const std::size_t rank = g.assign(grouper::arrival{&t_, p.request, p.prefill}, cluster);
      // Nothing running frees no slot: the run would wait for ever (or spend max_steps on nothing).
      LOCUS_REQUIRE(rank != grouper::no_rank || active_ != 0, invalid_input_error,
                    "simulate_decode: the grouper made request ", p.request,
                    " wait while every rank is empty (a grouper must place a request on an idle cluster)");
      if (rank == grouper::no_rank) break;
      LOCUS_REQUIRE(rank < ranks_ && state_[rank].running_requests < cfg_.batch_per_rank, invalid_input_error,
                    "simulate_decode: the grouper placed request ", p.request, " on rank ", rank,
                    ", which is out of range or full");
      per_rank_[rank].push_back({p.request, p.first_decode, p.decode_tokens, p.prefill});
      ++state_[rank].running_requests;
      state_[rank].running_tokens += p.prefill;
      ++active_;
      ++out_.requests_served;
      queue_.pop_front();
    }
  }

  //! Adds each rank's attended context to its total and lists the step's decode tokens with the
  //! rank each runs on, rank by rank (the order the traffic counter and the observer see).
  void gather() {
    tokens_.clear();
    sources_.clear();
    for (std::size_t r = 0; r < ranks_; ++r)
      out_.rank_attention_tokens[r] += static_cast<double>(state_[r].running_tokens);
    for (std::size_t r = 0; r < ranks_; ++r)
      for (const running& q : per_rank_[r]) {
        tokens_.push_back(q.next_token);
        sources_.push_back(static_cast<std::uint32_t>(r));
      }
  }

  //! The step's gathered tokens (trace positions) and their ranks, as the observer sees them.
  std::span<const std::size_t> tokens() const noexcept { return tokens_; }
  std::span<const std::uint32_t> sources() const noexcept { return sources_; }

  //! Counts the gathered tokens at every layer and records the step's bytes, imbalance and
  //! modelled time; the replica policies see each layer's step before the next step uses them.
  void count(std::size_t step) {
    double step_bytes = 0, step_imbalance = 0, step_time = 0;
    if (!tokens_.empty()) {
      for (std::size_t l = 0; l < layers_; ++l) {
        layer_traffic& st = step_traffic_[l];
        st.clear();
        counter_.count_step(maps_[l], t_.layer(l), tokens_, sources_, st, policies_(l));
        policies_.observe(l, st);
        out_.layers[l] += st;
        step_bytes += static_cast<double>(st.copies[network] * bytes_per_copy_);
        step_imbalance += st.load_imbalance();
        step_balance_.add(st);
        window_.add(l, st);
        step_time += estimate_layer_time(st, cfg_.sizes, cfg_.links).total_us();
      }
      step_imbalance /= static_cast<double>(layers_);
      step_time /= static_cast<double>(layers_);
    }
    out_.step_number.push_back(step);
    out_.step_tokens.push_back(tokens_.size());
    out_.step_inter_node_bytes.push_back(step_bytes);
    out_.step_imbalance.push_back(tokens_.empty() ? 1.0 : step_imbalance);
    out_.step_layer_time_us.push_back(step_time);
    out_.decode_tokens += tokens_.size();
    ++out_.steps;
    window_.end_step();
  }

  //! Each running request has produced one token: its context grows, and a request with no
  //! tokens left frees its slot and its context on the rank. Tokens not marked decode between two
  //! decode tokens (a later turn's prompt) join the context without a step of their own.
  void advance() {
    for (std::size_t r = 0; r < ranks_; ++r) {
      auto& list = per_rank_[r];
      for (std::size_t i = 0; i < list.size();) {
        running& q = list[i];
        ++q.next_token;
        --q.remaining;
        ++state_[r].running_tokens;
        if (q.remaining == 0) {
          --state_[r].running_requests;
          state_[r].running_tokens -= q.context + 1;
          --active_;
          list[i] = list.back();
          list.pop_back();
        } else {
          ++q.context;
          // `remaining` > 0: a decode token follows within the request, so this stops there.
          for (; t_.phases()[q.next_token] != trace::phase::decode; ++q.next_token) {
            ++q.context;
            ++state_[r].running_tokens;
          }
          ++i;
        }
      }
    }
  }

  //! The result with its summary metrics (file comment) computed from the per-step figures.
  simulation_result finish() && {
    simulation_result& out = out_;
    out.balance_window = cfg_.balance_window;
    out.gpu_imbalance_window = window_.finish(ranks_); // the run's last window may be shorter
    double bytes = 0, copies = 0, imbalance_sum = 0, time_sum = 0, aggregate = 0;
    std::size_t busy_steps = 0;
    for (std::size_t s = 0; s < out.steps; ++s) {
      bytes += out.step_inter_node_bytes[s];
      if (out.step_tokens[s] == 0) continue;
      imbalance_sum += out.step_imbalance[s];
      time_sum += out.step_layer_time_us[s];
      ++busy_steps;
    }
    for (const layer_traffic& l : out.layers) {
      copies += static_cast<double>(l.copies[network]);
      aggregate += l.load_imbalance();
    }
    const double tokens_total = static_cast<double>(std::max<std::uint64_t>(out.decode_tokens, 1));
    out.inter_node_bytes_per_token = bytes / tokens_total;
    out.inter_node_copies_per_token = copies / tokens_total;
    out.gpu_imbalance_step_weighted = step_balance_.max_over_mean(ranks_);
    out.gpu_imbalance_step_mean = busy_steps ? imbalance_sum / static_cast<double>(busy_steps) : 1.0;
    out.gpu_imbalance_aggregate = layers_ ? aggregate / static_cast<double>(layers_) : 1.0;
    out.layer_time_estimate_us = busy_steps ? time_sum / static_cast<double>(busy_steps) : 0.0;
    double attention_total = 0, attention_max = 0;
    for (const double a : out.rank_attention_tokens) {
      attention_total += a;
      attention_max = std::max(attention_max, a);
    }
    out.attention_imbalance = attention_total > 0 ? attention_max * static_cast<double>(ranks_) / attention_total : 1.0;
    return std::move(out_);
  }

private:
  static constexpr std::size_t network = static_cast<std::size_t>(link_class::inter_node);

  const trace::trace& t_;
  const std::vector<expert_map>& maps_;
  const simulation_config& cfg_;
  std::size_t ranks_, layers_;
  std::deque<pending> queue_;
  std::vector<std::vector<running>> per_rank_;
  std::vector<grouper::rank_state> state_;
  traffic_counter<dynamic_topology> counter_;
  replica_policies policies_;
  std::vector<layer_traffic> step_traffic_;
  std::uint64_t bytes_per_copy_;
  std::size_t active_ = 0;
  std::vector<std::size_t> tokens_;
  std::vector<std::uint32_t> sources_;
  rows_balance step_balance_; //!< over the run's steps and layers
  window_balance window_;     //!< with simulation_config::balance_window
  simulation_result out_;
};

} // namespace detail::simulation

//! Runs the decode of every request of `t` (tokens marked decode, in position order) on the
//! deployment of `cfg` with per-layer expert maps `maps` and grouper `g`. `on_step` sees every
//! step's tokens and their ranks (the online re-planning replay records them).
//! @throws locus::config_error when maps and trace or topology disagree, or the trace has no decode
//!         token
//! @throws locus::invalid_input_error when the grouper places a request out of range or on a full
//!         rank, or returns grouper::no_rank while no request runs
template <grouper::grouper_for Grouper, step_observer Observer = no_step_observer>
simulation_result simulate_decode(const trace::trace& t, const std::vector<expert_map>& maps, Grouper& g,
                                  const simulation_config& cfg, Observer&& on_step = {}) {
  detail::simulation::validate(t, maps, cfg);
  detail::simulation::decode_run run(t, maps, cfg);
  for (std::size_t step = 0; !run.finished(); ++step) {
    throw_if_cancelled();
    step = run.skip_idle(step, cfg.max_steps);
    if (cfg.max_steps && step >= cfg.max_steps) break;
    run.admit(step, g);
    run.gather();
    on_step(step, run.tokens(), run.sources());
    run.count(step);
    run.advance();
  }
  return std::move(run).finish();
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
