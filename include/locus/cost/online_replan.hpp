#pragma once
//! @file
//! Online re-planning in the decode simulator. A decode run is recorded once (the grouper places
//! requests without looking at the expert maps, so every map schedule sees the same tokens on the
//! same ranks); `run_online` then replays it step by step under maps that a planner may replace:
//! every `interval` steps from the last `window` steps of traffic (as engines re-run EPLB), at
//! steps given in advance (an oracle that knows the phases), or early when the drift trigger
//! fires. The trigger compares the window's per-(node, expert) load distribution with the one the
//! maps in service were fitted to (total variation, mean over layers) and fires when it exceeds
//! both a floor and `drift_ratio` × the window's own noise (the same distance between two halves
//! of its requests: a request's tokens are alike, so the window's sample is its requests, not its
//! tokens; halves in time would differ by the drift itself), so that stationary traffic, whose
//! windows differ only by which requests they sample, keeps it quiet at any window size. Given the
//! profile the initial maps were fitted to (online_options::reference), checks start within the
//! first steps, on the steps so far: a plan fitted elsewhere is re-planned before a full window
//! has run under it; a balance trigger re-plans, at the same checks, while the maps in service
//! measure a GPU max/mean above a bound since the last re-plan. Every re-plan reports the slots
//! whose weights changed and their bytes; reported windows (a fixed count of tokens each) and the
//! caller's segments (e.g. one per phase of a workload) give bytes and balance over time.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <limits>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/random.hpp>
#include <locus/cost/decode_simulator.hpp>
#include <locus/cost/traffic.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/plan_input.hpp>
#include <locus/placement/split_floor.hpp>
#include <locus/placement/token_refine.hpp>
#include <locus/trace/trace.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

//! A recorded decode run: per simulated step, its tokens (trace positions) and the rank each runs
//! on. Arrival gaps the simulator skipped (nothing running) are not in it: every step index below
//! (intervals, windows, re-plan steps) counts simulated steps.
struct decode_schedule {
  std::vector<std::size_t> step_begin{0}; //!< steps + 1 offsets into tokens and sources
  std::vector<std::size_t> tokens;
  std::vector<std::uint32_t> sources;

  std::size_t steps() const noexcept { return step_begin.size() - 1; }
  std::span<const std::size_t> step_tokens(std::size_t s) const {
    return {tokens.data() + step_begin[s], step_begin[s + 1] - step_begin[s]};
  }
  std::span<const std::uint32_t> step_sources(std::size_t s) const {
    return {sources.data() + step_begin[s], step_begin[s + 1] - step_begin[s]};
  }

  //! Checks that the schedule is well formed and was recorded on a trace of `tokens` tokens and a
  //! topology of `ranks` ranks (its offsets ascend from 0 to the token count, every token and rank
  //! is in range), so that replaying it reads nothing outside the trace.
  //! @throws locus::config_error naming the first step, token or rank that does not fit
  void validate(std::size_t trace_tokens, std::size_t ranks) const {
    LOCUS_REQUIRE(!step_begin.empty(), config_error, "decode schedule: no step offsets (an empty one holds {0})");
    validate_steps(0, steps(), trace_tokens, ranks);
  }

  //! validate() for the steps [first, last) only (what a window reads): O(their tokens).
  //! @throws locus::config_error as validate(), and for steps outside the schedule
  void validate_steps(std::size_t first, std::size_t last, std::size_t trace_tokens, std::size_t ranks) const {
    LOCUS_REQUIRE(!step_begin.empty() && first <= last && last <= steps(), config_error, "decode schedule: steps [",
                  first, ", ", last, ") outside a schedule of ", step_begin.empty() ? 0 : steps());
    LOCUS_REQUIRE(step_begin.front() == 0 && step_begin.back() == tokens.size() && sources.size() == tokens.size(),
                  config_error, "decode schedule: step offsets from ", step_begin.front(), " to ", step_begin.back(),
                  " for ", tokens.size(), " tokens and ", sources.size(), " sources");
    for (std::size_t s = first; s < last; ++s)
      LOCUS_REQUIRE(step_begin[s] <= step_begin[s + 1], config_error, "decode schedule: step ", s, " ends at ",
                    step_begin[s + 1], " before it begins at ", step_begin[s]);
    // Offsets that do not ascend elsewhere may still put these steps past the tokens.
    LOCUS_REQUIRE(step_begin[last] <= tokens.size(), config_error, "decode schedule: step ", last, " begins at ",
                  step_begin[last], ", past the ", tokens.size(), " tokens");
    for (std::size_t i = step_begin[first]; i < step_begin[last]; ++i)
      LOCUS_REQUIRE(tokens[i] < trace_tokens && sources[i] < ranks, config_error, "decode schedule: entry ", i,
                    " is token ", tokens[i], " on rank ", sources[i], ", but the trace has ", trace_tokens,
                    " tokens and the topology ", ranks,
                    " ranks (was the schedule recorded on another trace or deployment?)");
  }
};

//! Records the steps of simulate_decode(t, maps, g, cfg).
//! @throws as simulate_decode
template <grouper::grouper_for Grouper>
decode_schedule record_schedule(const trace::trace& t, const std::vector<expert_map>& maps, Grouper& g,
                                const simulation_config& cfg) {
  decode_schedule s;
  simulate_decode(t, maps, g, cfg,
                  [&s](std::size_t, std::span<const std::size_t> tokens, std::span<const std::uint32_t> sources) {
                    s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
                    s.sources.insert(s.sources.end(), sources.begin(), sources.end());
                    s.step_begin.push_back(s.tokens.size());
                  });
  return s;
}

//! Which of a window's requests a load profile counts: all, or one of two halves.
enum class request_half : std::uint8_t { all, first, second };

//! The half a trace's request `r` falls in: a hash of its index, so that requests listed in a
//! pattern (domains taking turns) split evenly across the two.
inline request_half request_half_of(std::size_t r) noexcept {
  return (splitmix64(static_cast<std::uint64_t>(r)).next() & 1) ? request_half::second : request_half::first;
}

//! Per layer, the (node, expert) pair counts of a range of steps: the traffic a plan is fitted to.
struct load_profile {
  std::size_t nodes = 0, experts = 0;
  std::vector<std::vector<double>> counts; //!< per layer: nodes × experts

  bool empty() const noexcept { return counts.empty(); }

  //! Checks that every layer holds `nodes × experts` counts, each finite and non-negative.
  //! @throws locus::config_error naming the layer (`what` starts the message)
  void validate(const char* what) const {
    for (std::size_t l = 0; l < counts.size(); ++l) {
      LOCUS_REQUIRE(counts[l].size() == nodes * experts, config_error, what, ": layer ", l, " of the profile has ",
                    counts[l].size(), " counts for ", nodes, " nodes × ", experts, " experts");
      for (const double x : counts[l])
        LOCUS_REQUIRE(std::isfinite(x) && x >= 0, config_error, what, ": layer ", l, " of the profile has count ", x,
                      " (must be finite and non-negative)");
    }
  }

  //! Steps [first, last) of `s`: the tokens of every request, or of one half of the requests
  //! (request_half_of; the drift check's noise compares the two, counted in one pass by halves()).
  //! @throws locus::config_error for a range outside the schedule
  static load_profile of(const trace::trace& t, const decode_schedule& s, std::size_t first, std::size_t last,
                         const dynamic_topology& topo, request_half half = request_half::all) {
    if (half != request_half::all) return halves(t, s, first, last, topo)[half == request_half::second ? 1 : 0];
    load_profile p[1];
    count(t, s, first, last, topo, p, 1, [](std::size_t) { return 0; });
    return std::move(p[0]);
  }

  //! The profiles of the two halves of the requests of steps [first, last) (request_half_of).
  //! @throws locus::config_error for a range outside the schedule
  static std::array<load_profile, 2> halves(const trace::trace& t, const decode_schedule& s, std::size_t first,
                                            std::size_t last, const dynamic_topology& topo) {
    // Requests own contiguous, ascending token ranges: a token's request is the last one that
    // starts at or before it.
    std::vector<std::uint64_t> starts(t.requests());
    for (std::size_t r = 0; r < t.requests(); ++r)
      starts[r] = t.request(r).first_token;
    std::array<load_profile, 2> p;
    count(t, s, first, last, topo, p.data(), p.size(), [&](std::size_t token) {
      const auto at = std::upper_bound(starts.begin(), starts.end(), static_cast<std::uint64_t>(token));
      return request_half_of(static_cast<std::size_t>(at - starts.begin()) - 1) == request_half::second ? 1 : 0;
    });
    return p;
  }

private:
  //! Counts the pairs of steps [first, last) into `out[which(token)]`, `which` below `outs`.
  template <class Which>
  static void count(const trace::trace& t, const decode_schedule& s, std::size_t first, std::size_t last,
                    const dynamic_topology& topo, load_profile* out, std::size_t outs, Which&& which) {
    LOCUS_REQUIRE(first <= last && last <= s.steps(), config_error, "load_profile: steps [", first, ", ", last,
                  ") outside a schedule of ", s.steps());
    s.validate_steps(first, last, t.tokens(), topo.ranks());
    const std::size_t b = s.step_begin[first], e = s.step_begin[last];
    std::vector<std::uint8_t> to(e - b); // each token's profile, found once for every layer
    for (std::size_t i = b; i < e; ++i)
      to[i - b] = static_cast<std::uint8_t>(which(s.tokens[i]));
    for (std::size_t k = 0; k < outs; ++k) {
      out[k].nodes = topo.nodes();
      out[k].experts = t.experts();
      out[k].counts.assign(t.layers(), std::vector<double>(topo.nodes() * t.experts(), 0.0));
    }
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const auto view = t.layer(l);
      for (std::size_t i = b; i < e; ++i) {
        auto& c = out[to[i - b]].counts[l];
        const std::size_t n = topo.node_of(s.sources[i]);
        for (std::size_t j = 0; j < t.top_k(); ++j)
          c[n * t.experts() + view.expert(s.tokens[i], j)] += 1;
      }
    }
  }

public:
  //! The (node, expert) pairs of a token sample's tokens (each on its home node, each counted once:
  //! load weights are not read): e.g. the training traffic the initial maps were fitted to.
  //! @throws locus::invalid_input_error on a malformed sample
  static load_profile of(const placement::token_sample& sample, std::size_t nodes) {
    sample.validate(nodes);
    load_profile p;
    p.nodes = nodes;
    p.experts = sample.experts;
    p.counts.assign(sample.layers(), std::vector<double>(nodes * sample.experts, 0.0));
    for (std::size_t l = 0; l < sample.layers(); ++l)
      for (std::size_t i = 0; i < sample.tokens(); ++i)
        for (std::size_t j = 0; j < sample.top_k; ++j)
          p.counts[l][sample.home[i] * sample.experts + sample.ids[l][i * sample.top_k + j]] += 1;
    return p;
  }
};

//! Total variation distance between the normalised counts of two profiles, mean over layers (0:
//! the same distribution, 1: disjoint). A layer with no pairs on either side counts 0.
//! @throws locus::config_error when the shapes differ, or a layer's counts do not match its shape
inline double divergence(const load_profile& a, const load_profile& b) {
  LOCUS_REQUIRE(a.counts.size() == b.counts.size() && a.nodes == b.nodes && a.experts == b.experts, config_error,
                "divergence: profiles of different shapes");
  a.validate("divergence");
  b.validate("divergence");
  if (a.counts.empty()) return 0;
  double sum = 0;
  for (std::size_t l = 0; l < a.counts.size(); ++l) {
    double ta = 0, tb = 0;
    for (double x : a.counts[l])
      ta += x;
    for (double x : b.counts[l])
      tb += x;
    if (ta == 0 || tb == 0) continue;
    double d = 0;
    for (std::size_t i = 0; i < a.counts[l].size(); ++i)
      d += std::abs(a.counts[l][i] / ta - b.counts[l][i] / tb);
    sum += d / 2;
  }
  return sum / static_cast<double>(a.counts.size());
}

//! The drift trigger's test on the window [first, last) against the profile the maps were fitted
//! to: (fires, distance, the noise it is held against). The noise is the distance between two
//! halves of the window's requests (request_half_of), two samples of half its size each: a
//! request's tokens choose alike, so halves of its steps (even and odd) would each hold every
//! request and see only the tokens' noise, and the turnover of requests alone then fired the
//! trigger on stationary traffic. A window whose requests all fall in one half has no noise
//! estimate and does not fire. Each half holds half the window's requests, so on stationary
//! traffic the window strays from the traffic's mean by about half the halves' distance, and a
//! reference of m pairs (a re-plan's few steps, or the training sample) adds its own: the noise
//! is the halves' distance × √((1 + n/m) / 4) for a window of n pairs.
struct drift_check {
  bool fired = false;
  double distance = 0;
  double noise = 0;
};
inline drift_check check_drift(const trace::trace& t, const decode_schedule& s, std::size_t first, std::size_t last,
                               const dynamic_topology& topo, const load_profile& reference, double ratio,
                               double floor) {
  drift_check c;
  c.distance = divergence(load_profile::of(t, s, first, last, topo), reference);
  const auto [a, b] = load_profile::halves(t, s, first, last, topo);
  const auto pairs = [](const load_profile& p) {
    double sum = 0;
    for (const auto& layer : p.counts)
      for (const double x : layer)
        sum += x;
    return sum;
  };
  if (pairs(a) == 0 || pairs(b) == 0) {
    c.noise = std::numeric_limits<double>::infinity(); // one half is empty: no estimate
    return c;
  }
  c.noise = divergence(a, b);
  // Pairs per layer: the window's from its token count, the reference's from its first layer.
  const double n = static_cast<double>(s.step_begin[last] - s.step_begin[first]) * static_cast<double>(t.top_k());
  double m = 0;
  if (!reference.counts.empty())
    for (const double x : reference.counts.front())
      m += x;
  c.noise *= m > 0 ? std::sqrt((1 + n / m) / 4) : 0.5;
  c.fired = c.distance > floor && c.distance > ratio * c.noise;
  return c;
}

//! Up to `max_tokens` tokens of steps [first, last) (evenly strided), each with its rank's node and
//! its request (token_sample::request, the trace's request index): what a planner sees of a window.
inline placement::token_sample window_sample(const trace::trace& t, const decode_schedule& s, std::size_t first,
                                             std::size_t last, const dynamic_topology& topo, std::size_t max_tokens) {
  LOCUS_REQUIRE(first <= last && last <= s.steps(), config_error, "window_sample: steps [", first, ", ", last,
                ") outside a schedule of ", s.steps());
  s.validate_steps(first, last, t.tokens(), topo.ranks());
  const std::size_t b = s.step_begin[first], e = s.step_begin[last], n = e - b;
  const std::size_t stride = max_tokens == 0 ? 1 : std::max<std::size_t>(1, (n + max_tokens - 1) / max_tokens);
  placement::token_sample out;
  out.experts = t.experts();
  out.top_k = t.top_k();
  std::vector<std::size_t> picked;
  // Requests own contiguous, ascending token ranges: a token's request is the last one starting at
  // or before it.
  std::vector<std::uint64_t> starts(t.requests());
  for (std::size_t r = 0; r < t.requests(); ++r)
    starts[r] = t.request(r).first_token;
  for (std::size_t i = b; i < e; i += stride) {
    picked.push_back(s.tokens[i]);
    out.home.push_back(static_cast<std::uint32_t>(topo.node_of(s.sources[i])));
    const auto at = std::upper_bound(starts.begin(), starts.end(), static_cast<std::uint64_t>(s.tokens[i]));
    out.request.push_back(static_cast<std::uint32_t>(at - starts.begin() - 1));
  }
  out.ids.assign(t.layers(), std::vector<std::uint16_t>(picked.size() * out.top_k));
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    for (std::size_t i = 0; i < picked.size(); ++i)
      for (std::size_t j = 0; j < out.top_k; ++j)
        out.ids[l][i * out.top_k + j] = view.expert(picked[i], j);
  }
  return out;
}

//! A plan input (load and per-node load) counted on steps [first, last), for the node-level
//! planners (locality, eplb).
inline placement::plan_input window_plan_input(const trace::trace& t, const decode_schedule& s, std::size_t first,
                                               std::size_t last, const dynamic_topology& topo,
                                               std::size_t slots_per_rank) {
  const auto p = load_profile::of(t, s, first, last, topo);
  placement::plan_input in;
  in.topology = topo;
  in.experts = t.experts();
  in.slots_per_rank = slots_per_rank;
  in.load.assign(t.layers(), std::vector<double>(t.experts(), 0.0));
  in.node_load.assign(t.layers(), std::vector<std::vector<double>>(topo.nodes(), std::vector<double>(t.experts())));
  for (std::size_t l = 0; l < t.layers(); ++l)
    for (std::size_t n = 0; n < topo.nodes(); ++n)
      for (std::size_t e = 0; e < t.experts(); ++e) {
        in.node_load[l][n][e] = p.counts[l][n * t.experts() + e];
        in.load[l][e] += p.counts[l][n * t.experts() + e];
      }
  return in;
}

//! The balance trigger `locus simulate` and bench/drift use (online_options::balance_trigger): above
//! the re-plan's own bound (1 + token_refine_options::replan_slack) and its sampling noise, so that
//! it asks again only where a budgeted re-plan left the GPUs clearly unbalanced.
inline constexpr double default_balance_trigger = 1.25;

//! When run_online re-plans.
struct online_options;

//! The first step run_online may run a drift check (and the balance trigger) at: with a reference,
//! online_options::min_check (at least 4, at most the window); without one, a full window.
std::size_t drift_check_start(const online_options& opt) noexcept;

//! The first step run_online may re-plan at on its own (scheduled or on a check; plan_at aside):
//! SIZE_MAX when neither can act. A run shorter than this reports no re-plan.
std::size_t first_replan_step(const online_options& opt) noexcept;

//! When run_online re-plans.
struct online_options {
  std::size_t interval = 0; //!< re-plan every this many steps after the last re-plan (0: never)
  //! Steps before the first scheduled re-plan, on the steps so far (0: `interval`, once a full
  //! window has run). vLLM starts its EPLB counter three quarters of the way to its interval, so
  //! that its first re-plan comes after interval / 4 steps: first_interval = interval / 4.
  std::size_t first_interval = 0;
  std::size_t window = 16;     //!< steps of traffic a re-plan (and the drift check) sees
  std::size_t drift_every = 0; //!< steps between drift checks (0: no trigger)
  double drift_ratio = 2.0;    //!< fire when the distance exceeds this multiple of the window's noise ...
  double drift_floor = 0.02;   //!< ... and this floor
  std::size_t min_gap = 0;     //!< steps between two re-plans at least (scheduled ones excepted)
  //! The traffic the initial maps were fitted to (e.g. load_profile::of a training sample; the
  //! shape of the run's). Empty: the first full window stands in for it, so that a plan fitted
  //! elsewhere is never flagged before `window` steps have run and been taken as the reference.
  //! Its counts are pair counts, as load_profile::of gives them: the drift check reads the
  //! reference's sample size from them (frequencies that sum to 1 would silence the trigger).
  load_profile reference;
  //! Steps a drift check needs at least (0: `window`; never below 4, or the window where shorter:
  //! fewer hold a token or two of each request, too few to measure the noise of the request halves
  //! it compares): with a reference, checks from this step
  //! on see the steps so far until a full window has run, so that a plan that does not fit the
  //! traffic it meets is re-planned within tens of steps.
  std::size_t min_check = 0;
  //! Also re-plan at a drift check when the GPU max/mean the maps in service measure over the steps
  //! since the last re-plan (at least min_gap of them; mean over layers) exceeds this (0: off). The
  //! drift check compares traffic with the traffic the maps were fitted to, so it stays quiet when
  //! a budgeted re-plan left them unbalanced on the traffic they were fitted to: this one does not.
  double balance_trigger = 0;
  std::vector<std::size_t> plan_at; //!< steps where the planner is called regardless (ascending)
  //! Decode tokens per reported window: a window closes after the step that reaches it (a short
  //! last one joins the window before it), so that every window's balance counts as many tokens.
  std::size_t report_tokens = 2048;
  std::uint64_t expert_bytes = 0; //!< weight bytes of one expert (moved bytes = moved × this)
  //! Also each window's balance floor (placement::min_max_split over the maps in service).
  bool balance_floor = false;
  //! Steps where a reported segment starts (ascending, each below the schedule's length; a segment
  //! runs to the next start or the end): online_result::segments, e.g. one per phase of a workload.
  std::vector<std::size_t> segment_starts;
};

inline std::size_t drift_check_start(const online_options& opt) noexcept {
  if (opt.reference.empty() || opt.min_check == 0) return opt.window;
  return std::min(std::max<std::size_t>(opt.min_check, 4), opt.window);
}

inline std::size_t first_replan_step(const online_options& opt) noexcept {
  constexpr std::size_t never = ~std::size_t{0};
  const std::size_t scheduled = !opt.interval        ? never
                                : opt.first_interval ? opt.first_interval
                                                     : std::max(opt.window, opt.interval);
  const std::size_t start = drift_check_start(opt);
  if (!opt.drift_every || start > never - 2 * opt.drift_every) return scheduled;
  std::size_t checked = (start + opt.drift_every - 1) / opt.drift_every * opt.drift_every; // the first check
  // Without a reference the first check takes its own window for one (a distance of 0): unless the
  // balance trigger can act there, the next check is the first that can re-plan.
  if (opt.reference.empty() && !(opt.balance_trigger > 0)) checked += opt.drift_every;
  return std::min(scheduled, checked);
}

//! Why a re-plan happened.
enum class replan_reason : std::uint8_t { scheduled, drift, fixed, balance };
inline const char* to_string(replan_reason r) noexcept {
  switch (r) {
  case replan_reason::scheduled: return "scheduled";
  case replan_reason::drift: return "drift";
  case replan_reason::fixed: return "fixed";
  case replan_reason::balance: return "balance";
  }
  return "unknown";
}

struct replan_event {
  std::size_t step = 0;
  replan_reason reason = replan_reason::scheduled;
  std::size_t experts_moved = 0; //!< slots whose weights changed
  double moved_share = 0;        //!< ... over all slots of all layers
  std::uint64_t bytes_moved = 0;
  double drift_distance = 0; //!< the drift check's figures at this step (0 when none ran)
  double drift_noise = 0;
  double measured_imbalance = 0; //!< the balance trigger's figure at this step (0 when it did not run)
  double seconds = 0;            //!< the planner's CPU time (of the process: planners here run on one thread)
};

//! One reported window of steps.
struct online_window {
  std::size_t first_step = 0, steps = 0;
  std::uint64_t tokens = 0;
  double inter_node_bytes = 0;
  double gpu_imbalance = 1; //!< per layer max/mean of rank rows over the window, mean over layers
  //! With online_options::balance_floor: the lowest gpu_imbalance any split of the window's rows
  //! among the replicas of the maps in service reaches (0 when not asked).
  double balance_floor = 0;
};

//! One segment of online_options::segment_starts: its traffic under the maps each step had.
struct online_segment {
  std::size_t first_step = 0, steps = 0;
  std::uint64_t tokens = 0;
  double inter_node_bytes = 0;
  double gpu_imbalance = 1; //!< per layer max/mean of rank rows summed over the segment, mean over layers
};

struct online_result {
  std::vector<online_window> windows;
  std::vector<online_segment> segments; //!< one per online_options::segment_starts
  std::vector<replan_event> replans;
  std::uint64_t decode_tokens = 0;
  double inter_node_bytes_per_token = 0;
  double gpu_imbalance_aggregate = 1;     //!< over the whole run, as simulate_decode's
  double gpu_imbalance_step_weighted = 1; //!< per step, weighted by its rows, as simulate_decode's
  //! With simulation_config::balance_window: over windows of that many steps, as simulate_decode's.
  std::size_t balance_window = 0;
  double gpu_imbalance_window = 1;
  double worst_window_imbalance = 1;
  double max_moved_share = 0;
  std::uint64_t bytes_moved = 0;
  std::size_t drift_checks = 0, drift_fired = 0;
  std::size_t balance_fired = 0; //!< re-plans the balance trigger asked for
};

//! Replays `s` (recorded on trace `t`) from maps `maps`. `plan(current, first, last)` returns the
//! maps to serve from step `last` on, given the traffic of steps [first, last); it is called as
//! `opt` says (see the file comment).
//! @throws locus::config_error when the maps do not match the trace or the topology, or on an
//!         option out of its range
template <class Planner>
online_result run_online(const trace::trace& t, const decode_schedule& s, std::vector<expert_map> maps,
                         const simulation_config& cfg, const online_options& opt, Planner&& plan) {
  const dynamic_topology& topo = cfg.topology;
  const std::size_t layers = t.layers(), ranks = topo.ranks();
  LOCUS_REQUIRE(maps.size() == layers, config_error, "run_online: ", maps.size(), " maps for ", layers, " layers");
  for (std::size_t l = 0; l < layers; ++l)
    LOCUS_REQUIRE(maps[l].experts() == t.experts() && maps[l].ranks() == ranks, config_error, "run_online: layer ", l,
                  " map does not match the trace (", t.experts(), " experts) or the topology (", ranks, " ranks)");
  LOCUS_REQUIRE(opt.window > 0 && opt.report_tokens > 0, config_error, "run_online: zero window or report size");
  LOCUS_REQUIRE(opt.first_interval == 0 || (opt.interval > 0 && opt.first_interval <= opt.interval), config_error,
                "run_online: first_interval ", opt.first_interval, " needs an interval at least as long (interval ",
                opt.interval, ")");
  // The replay reads the trace at the schedule's tokens before the traffic counter checks them.
  s.validate(t.tokens(), ranks);
  // The schedule is walked once in order: a step listed after a later one was skipped without a word.
  LOCUS_REQUIRE(std::is_sorted(opt.plan_at.begin(), opt.plan_at.end()), config_error,
                "run_online: plan_at is not in ascending order");
  // A segment must own at least one step: equal or late starts would report nothing for it.
  LOCUS_REQUIRE(std::adjacent_find(opt.segment_starts.begin(), opt.segment_starts.end(),
                                   [](std::size_t a, std::size_t b) { return a >= b; }) == opt.segment_starts.end() &&
                    (opt.segment_starts.empty() || opt.segment_starts.back() < s.steps()),
                config_error, "run_online: segment_starts must be strictly ascending steps below ", s.steps());
  // A NaN passes no comparison: the drift check never fired.
  LOCUS_REQUIRE(std::isfinite(opt.drift_ratio) && opt.drift_ratio >= 0 && std::isfinite(opt.drift_floor) &&
                    opt.drift_floor >= 0,
                config_error, "run_online: drift_ratio (", opt.drift_ratio, ") and drift_floor (", opt.drift_floor,
                ") must be finite numbers >= 0");
  LOCUS_REQUIRE(opt.balance_trigger == 0 || (std::isfinite(opt.balance_trigger) && opt.balance_trigger >= 1),
                config_error, "run_online: balance_trigger (", opt.balance_trigger,
                ") must be 0 (off) or a GPU max/mean >= 1");
  const std::size_t slots = placement::total_slots(maps);
  // Moved bytes are 64-bit: every slot moved at every step must fit.
  LOCUS_REQUIRE(opt.expert_bytes == 0 || static_cast<double>(slots) * static_cast<double>(s.steps() + 1) <=
                                             static_cast<double>(~std::uint64_t{0} / opt.expert_bytes),
                config_error, "run_online: ", opt.expert_bytes, " bytes per expert would overflow the moved-bytes ",
                "count over ", slots, " slots and ", s.steps(), " steps");
  traffic_counter<dynamic_topology> counter(topo, cfg.transport);
  replica_policies policies(cfg, layers);
  const std::size_t network = static_cast<std::size_t>(link_class::inter_node);
  const double bytes_per_copy = static_cast<double>(cfg.sizes.dispatch_bytes + cfg.sizes.combine_bytes);
  online_result out;
  std::vector<layer_traffic> total(layers, layer_traffic(ranks)), win(layers, layer_traffic(ranks)),
      seg_rows(layers, layer_traffic(ranks)), since_plan(layers, layer_traffic(ranks));
  std::size_t next_segment = 0;
  const auto close_segment = [&] {
    if (out.segments.empty()) return;
    double imb = 0;
    for (auto& x : seg_rows) {
      imb += x.load_imbalance();
      x.clear();
    }
    out.segments.back().gpu_imbalance = imb / static_cast<double>(layers);
  };
  layer_traffic step(ranks);
  online_window current{};
  load_profile reference = opt.reference;
  if (!reference.empty())
    LOCUS_REQUIRE(reference.counts.size() == layers && reference.nodes == topo.nodes() &&
                      reference.experts == t.experts(),
                  config_error, "run_online: the reference profile (", reference.counts.size(), " layers, ",
                  reference.nodes, " nodes, ", reference.experts, " experts) does not match the trace (", layers,
                  " layers, ", t.experts(), " experts) and the topology (", topo.nodes(), " nodes)");
  reference.validate("run_online: the reference");
  // Without a reference a check before a full window would compare the window with itself.
  const std::size_t first_check = drift_check_start(opt);
  std::size_t last_plan = 0, next_fixed = 0;
  bool planned_once = false;
  double bytes = 0;
  rows_balance step_balance; // per step and layer, for the weighted per-step balance
  window_balance balance_windows(cfg.balance_window, layers, ranks); // the simulator's, over the schedule's steps
  std::vector<layer_traffic> prev_win(layers, layer_traffic(ranks));
  const auto imbalance = [&](const std::vector<layer_traffic>& w) {
    double imb = 0;
    for (const auto& x : w)
      imb += x.load_imbalance();
    return imb / static_cast<double>(layers);
  };
  // With opt.balance_floor: the window's segments between re-plans, each its maps and its rows
  // per layer and expert (a window that spans a re-plan splits each segment on its own maps).
  struct floor_segment {
    std::vector<expert_map> maps;
    std::vector<std::vector<double>> rows;
  };
  std::vector<floor_segment> segs, prev_segs;
  bool new_segment = true;
  const auto window_floor = [&](const std::vector<floor_segment>& sg) {
    double f = 0;
    for (std::size_t l = 0; l < layers; ++l) {
      std::vector<const expert_map*> m;
      std::vector<std::vector<double>> r;
      for (const auto& x : sg) {
        m.push_back(&x.maps[l]);
        r.push_back(x.rows[l]);
      }
      f += placement::min_max_split(std::span<const expert_map* const>(m), std::span<const std::vector<double>>(r))
               .max_over_mean;
    }
    return f / static_cast<double>(layers);
  };
  const auto close_window = [&](bool last) {
    if (last && current.tokens < opt.report_tokens && !out.windows.empty()) { // join the window before
      auto& p = out.windows.back();
      p.steps += current.steps;
      p.tokens += current.tokens;
      p.inter_node_bytes += current.inter_node_bytes;
      for (std::size_t l = 0; l < layers; ++l)
        prev_win[l] += win[l];
      p.gpu_imbalance = imbalance(prev_win);
      if (opt.balance_floor) {
        prev_segs.insert(prev_segs.end(), segs.begin(), segs.end());
        p.balance_floor = window_floor(prev_segs);
      }
    } else if (current.tokens > 0) {
      current.gpu_imbalance = imbalance(win);
      if (opt.balance_floor) current.balance_floor = window_floor(segs);
      out.windows.push_back(current);
      std::swap(prev_win, win);
      std::swap(prev_segs, segs);
    }
    segs.clear();
    new_segment = true;
    for (auto& w : win)
      w.clear();
    current = {};
  };
  for (std::size_t st = 0; st < s.steps(); ++st) {
    throw_if_cancelled();
    // Decide before the step runs, from the steps before it.
    bool due = false;
    replan_reason why = replan_reason::scheduled;
    drift_check dc;
    double measured = 0;
    while (next_fixed < opt.plan_at.size() && opt.plan_at[next_fixed] < st)
      ++next_fixed;
    if (next_fixed < opt.plan_at.size() && opt.plan_at[next_fixed] == st) {
      due = true;
      why = replan_reason::fixed;
    } else {
      const std::size_t since = planned_once ? st - last_plan : st;
      const std::size_t from = st >= opt.window ? st - opt.window : 0;
      const bool scheduled =
          opt.interval &&
          (!planned_once && opt.first_interval ? st >= opt.first_interval : since >= opt.interval && st >= opt.window);
      if (scheduled) {
        due = true;
      } else if (st >= first_check && opt.drift_every && st % opt.drift_every == 0 &&
                 (since >= opt.min_gap || !planned_once)) {
        if (reference.empty()) reference = load_profile::of(t, s, from, st, topo);
        dc = check_drift(t, s, from, st, topo, reference, opt.drift_ratio, opt.drift_floor);
        ++out.drift_checks;
        if (dc.fired) {
          ++out.drift_fired;
          due = true;
          why = replan_reason::drift;
        } else if (opt.balance_trigger > 0 && since >= std::max<std::size_t>(opt.min_gap, 1)) {
          measured = imbalance(since_plan);
          if (measured > opt.balance_trigger) {
            ++out.balance_fired;
            due = true;
            why = replan_reason::balance;
          }
        }
      }
    }
    if (due) {
      const std::size_t first = st >= opt.window ? st - opt.window : 0;
      const std::clock_t t0 = std::clock();
      auto next = plan(static_cast<const std::vector<expert_map>&>(maps), first, st);
      replan_event ev;
      ev.seconds = static_cast<double>(std::clock() - t0) / CLOCKS_PER_SEC;
      ev.step = st;
      ev.reason = why;
      ev.experts_moved = placement::experts_moved(maps, next);
      ev.moved_share = slots ? static_cast<double>(ev.experts_moved) / static_cast<double>(slots) : 0.0;
      ev.bytes_moved = static_cast<std::uint64_t>(ev.experts_moved) * opt.expert_bytes;
      ev.drift_distance = dc.distance;
      ev.drift_noise = dc.noise;
      ev.measured_imbalance = measured;
      out.replans.push_back(ev);
      out.max_moved_share = std::max(out.max_moved_share, ev.moved_share);
      out.bytes_moved += ev.bytes_moved;
      maps = std::move(next);
      new_segment = true;
      last_plan = st;
      planned_once = true;
      if (opt.drift_every && st > first) reference = load_profile::of(t, s, first, st, topo);
      for (auto& x : since_plan)
        x.clear();
    }
    // The step itself.
    if (next_segment < opt.segment_starts.size() && opt.segment_starts[next_segment] == st) {
      close_segment();
      out.segments.push_back({st, 0, 0, 0, 1});
      ++next_segment;
    }
    const bool in_segment = next_segment > 0;
    if (current.steps == 0) current.first_step = st;
    const auto tokens = s.step_tokens(st);
    const auto sources = s.step_sources(st);
    ++current.steps;
    current.tokens += tokens.size();
    if (in_segment) {
      ++out.segments.back().steps;
      out.segments.back().tokens += tokens.size();
    }
    out.decode_tokens += tokens.size();
    if (opt.balance_floor && !tokens.empty()) {
      if (new_segment)
        segs.push_back({maps, std::vector<std::vector<double>>(layers, std::vector<double>(t.experts(), 0.0))});
      new_segment = false;
      for (std::size_t l = 0; l < layers; ++l) {
        const auto view = t.layer(l);
        auto& r = segs.back().rows[l];
        for (const std::size_t tok : tokens) {
          const auto* ids = view.token_ids(tok);
          for (std::size_t j = 0; j < t.top_k(); ++j)
            r[static_cast<std::size_t>(ids[j])] += 1.0;
        }
      }
    }
    for (std::size_t l = 0; l < layers && !tokens.empty(); ++l) {
      step.clear();
      counter.count_step(maps[l], t.layer(l), std::span<const std::size_t>(tokens),
                         std::span<const std::uint32_t>(sources), step, policies(l));
      policies.observe(l, step);
      total[l] += step;
      win[l] += step;
      step_balance.add(step);
      balance_windows.add(l, step);
      if (opt.balance_trigger > 0) since_plan[l] += step;
      const double b = static_cast<double>(step.copies[network]) * bytes_per_copy;
      bytes += b;
      current.inter_node_bytes += b;
      if (in_segment) {
        seg_rows[l] += step;
        out.segments.back().inter_node_bytes += b;
      }
    }
    if (current.tokens >= opt.report_tokens) close_window(false);
    balance_windows.end_step();
  }
  if (current.steps > 0) close_window(true);
  out.balance_window = cfg.balance_window;
  out.gpu_imbalance_window = balance_windows.finish(ranks);
  close_segment();
  for (const auto& w : out.windows)
    out.worst_window_imbalance = std::max(out.worst_window_imbalance, w.gpu_imbalance);
  double agg = 0;
  for (const auto& l : total)
    agg += l.load_imbalance();
  out.gpu_imbalance_aggregate = layers ? agg / static_cast<double>(layers) : 1.0;
  out.gpu_imbalance_step_weighted = step_balance.max_over_mean(ranks);
  out.inter_node_bytes_per_token = bytes / static_cast<double>(std::max<std::uint64_t>(out.decode_tokens, 1));
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
