// Question: when the request mix moves, how much of an activation-aware plan's byte saving does
// on-line re-planning keep, at what balance and at what cost in expert weights moved? One run
// replays the same decode schedule (ESFT test requests drawn per task domain into phases, a
// phase's requests queued at its start, the workload-aware grouping fitted on the training split)
// under: linear placement (the baseline of the savings), the static locality plan, EPLB re-run
// every N steps on a sliding window (vLLM's 3000-step interval / 1000-step window, its first
// re-plan after a quarter interval, scaled to the trace), locus adaptive (every N steps, and early
// on drift, checked against the training traffic from the first steps on, or while its maps
// measure unbalanced; a bounded number of experts moved), and an oracle planned per phase on that
// phase's own traffic (it moves freely at phase starts).
// Two look-ahead bounds say what knowing the future would buy: locus re-planned every W steps on
// the next W steps' own traffic under the same migration budget, and EPLB the same way with no
// budget (the balance the traffic itself admits). Then it times one re-plan at DeepSeek-V3 shape.
// With --unseen-domain D every plan (and the grouping, and locus adaptive's prior) is fitted on the
// training split without D's requests: how each policy copes when a domain it never saw arrives.
//
//   drift [--trace DIR] [--out DIR] [--split-seed S] [--phases summary,law,intent] [--phase-tokens T]
//         [--interval N] [--window W] [--budget-share B] [--drift-every D] [--redundant R]
//         [--transport flat|hierarchical] [--deepseek 0|1] [--replica-rule R] [--replica-slack S]
//         [--replica-window W] [--hedge-replicas H] [--hedge-floor F] [--hedge-cost-budget B]
//         [--lookahead 0|1] [--unseen-domain D] [--replan-slack S] [--balance-trigger B]
//         [--prior-requests R] [--swap-significance Z]
// Writes DIR/drift.json and DIR/drift.md; bench/plot_drift.py draws DIR/drift.png.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/cost/online_replan.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/migration.hpp>
#include <locus/trace/synthesizer.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace locus;

struct policy_run {
  std::string name;
  cost::online_result result;
  double plan_seconds_max = 0;
};

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"How much of an activation-aware plan's byte saving on-line re-planning keeps when the request mix "
               "moves"};
  tool_cli::show_defaults(app);
  std::string trace_path, out_dir = ".", transport_name = "flat", replica_rule_name = "locality_first", unseen_domain;
  unsigned long long seed = 1;
  // One ESFT (DeepSeek-V2-Lite) routed expert: gate, up and down projections, 2048 × 1408, BF16.
  unsigned long long expert_bytes = 3ull * 2048 * 1408 * 2;
  std::size_t prefill = 32, phase_tokens = 150000, redundant = 0, interval = 300, window = 100, drift_every = 10,
              batch = 16, hidden = 2048, replica_window = 0, report_tokens = 8192,
              hedge_replicas = placement::token_refine_options{}.hedge_replicas;
  std::optional<std::size_t> adaptive_window_opt;
  double budget_share = 0.10, phase_share = 0.8, replica_slack = 0.05,
         replan_slack = placement::token_refine_options{}.replan_slack, balance_trigger = cost::default_balance_trigger,
         prior_requests = placement::default_prior_requests,
         swap_significance = placement::token_refine_options{}.swap_significance,
         hedge_floor = placement::token_refine_options{}.hedge_floor,
         hedge_cost_budget = placement::token_refine_options{}.hedge_cost_budget;
  int deepseek = 1, balance_floor = 0, lookahead = 1;
  std::vector<std::string> phase_names{"summary", "law", "intent"};
  const std::vector<std::string> rule_names = tool_cli::names_of(placement::all_replica_rules);
  const CLI::Option* trace_opt = bench_args::add_trace_option(app, trace_path, "ESFT folder or binary trace");
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  app.add_option("--balance-floor", balance_floor,
                 "Also each window's balance floor: the lowest GPU max/mean any split of its rows among the "
                 "replicas of the maps in service reaches (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--split-seed", seed, "Seed of the train/test split of the requests (and of the schedule)");
  app.add_option("--prefill-tokens", prefill, "Prefill tokens per request");
  app.add_option("--phases", phase_names, "Task domains of the phases, in order")->delimiter(',');
  app.add_option("--phase-tokens", phase_tokens, "Decode tokens per phase")->check(tool_cli::positive);
  app.add_option("--phase-share", phase_share, "Share of a phase's requests drawn from its own domain")
      ->check(tool_cli::number_in(0, 1));
  app.add_option("--batch", batch, "Running requests per GPU")->check(tool_cli::positive);
  app.add_option("--hidden", hidden, "Hidden size (message sizes)")->check(tool_cli::positive);
  app.add_option("--redundant", redundant, "Redundant slots per GPU");
  app.add_option("--interval", interval, "Steps between scheduled re-plans (0: none)");
  app.add_option("--window", window, "Steps of traffic an EPLB re-plan sees")->check(tool_cli::positive);
  app.add_option("--adaptive-window", adaptive_window_opt, "Steps of traffic an adaptive re-plan sees")
      ->check(tool_cli::positive)
      ->default_str("--interval");
  app.add_option("--drift-every", drift_every, "Steps between drift checks (0: none)");
  app.add_option("--replan-slack", replan_slack,
                 "A budgeted re-plan's load bound (locus adaptive, the same-budget look-ahead): it first repairs the "
                 "GPUs above (1 + this) x the mean load (the window's, with --prior-requests' share of the training "
                 "sample), as far as its budget allows, and no swap raises a GPU above it")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--balance-trigger", balance_trigger,
                 "Locus adaptive also re-plans at a drift check when the GPU max/mean its maps measure since the last "
                 "re-plan exceeds this (0: off)")
      ->check(tool_cli::zero_or_at_least_one);
  app.add_option("--prior-requests", prior_requests,
                 "Locus adaptive: the training sample counts in a re-plan's loads as this many requests would beside "
                 "the window's (0: the window's loads alone; it always steers the copy savings)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--swap-significance", swap_significance,
                 "A budgeted re-plan takes a swap for the copies it saves only above this many standard errors of "
                 "that saving on its sample, summed per request (0: any saving)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--budget-share", budget_share, "Share of the slots an adaptive re-plan may move")
      ->check(tool_cli::number_in(0, 1));
  app.add_option("--report-tokens", report_tokens, "Decode tokens per reported window")->check(tool_cli::positive);
  app.add_option("--expert-bytes", expert_bytes, "Weight bytes of one expert")->check(tool_cli::positive);
  app.add_option("--transport", transport_name, "Transport of the run")->check(CLI::IsMember({"flat", "hierarchical"}));
  app.add_option("--replica-rule", replica_rule_name, "Rule that picks a token's replica, for every policy")
      ->check(CLI::IsMember(rule_names));
  app.add_option("--replica-slack", replica_slack, "locality_bounded: a GPU is hot above (1 + this) x the mean load")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--replica-window", replica_window,
                 "locality_bounded: steps of the load average (0: since the start)");
  auto* hedge_opt = app.add_option("--hedge-replicas", hedge_replicas,
                                   "Locality plans with --redundant: at most this many slots per layer first hold "
                                   "balance hedges (--hedge-floor's rule) before copies saved (0: off; default: "
                                   "one per GPU)")
                        ->default_str("one per GPU");
  app.add_option("--hedge-floor", hedge_floor,
                 "Hedges: copy experts out of the binding GPU set until the worst balance floor over resampled "
                 "training requests is at most this (0: the risk rule of earlier runs instead)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-cost-budget", hedge_cost_budget,
                 "Floor hedges: at most this share more copies on the training sample than without them (0: no bound)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--lookahead", lookahead,
                 "Also the look-ahead bounds: locus every --window steps on the next --window steps under the same "
                 "budget, and EPLB the same way with no budget (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--unseen-domain", unseen_domain,
                 "Fit every plan, the grouping and adaptive's prior without this domain's training requests (one "
                 "of --phases; none: every domain trained)")
      ->default_str("none");
  app.add_option("--deepseek", deepseek, "Time one re-plan at DeepSeek-V3 shape (0|1)")->check(CLI::Range(0, 1));
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  LOCUS_REQUIRE(hedge_opt->count() == 0 || hedge_replicas == 0 || redundant > 0, config_error,
                "--hedge-replicas spends replica slots: it needs --redundant");
  trace_path = bench_args::trace_to_read(*trace_opt, trace_path);
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  LOCUS_REQUIRE(drift_every > 0 || app.count("--balance-trigger") == 0, config_error,
                "--balance-trigger acts at the drift checks: it applies with --drift-every above 0");
  const std::size_t adaptive_window = adaptive_window_opt.value_or(interval);
  const auto transport = cost::parse_transport_kind(transport_name);
  // Every policy's replicas are chosen by one rule (transport/replica_selection.hpp).
  const auto replica_rule = placement::parse_replica_rule(replica_rule_name);
  const std::string command = bench_args::command_line(argc, argv, "build/dev/bench/drift");
  const std::string machine = bench_args::machine_line();
  const auto start = std::chrono::steady_clock::now();
  const auto say = [&](const std::string& what) { bench_args::progress_line("drift", what, start); };
  const auto full = bench_args::with_prefill(bench_args::load_trace(trace_path), prefill);
  // A phase whose domain the trace lacks is said before minutes of planning, with the domains it has.
  for (const auto& name : phase_names)
    static_cast<void>(full.domain_index(name, "--phases"));
  if (unseen_domain == "none") unseen_domain.clear(); // the default --help shows
  if (!unseen_domain.empty() && std::find(phase_names.begin(), phase_names.end(), unseen_domain) == phase_names.end()) {
    std::string list;
    for (const auto& name : phase_names)
      list += (list.empty() ? "" : ", ") + name;
    LOCUS_THROW(config_error, "--unseen-domain ", unseen_domain, " is not one of --phases (", list,
                "): its traffic would not run");
  }
  const auto [whole_train, test] = trace::split_by_request(full, 0.5, seed);
  // The plans' view of the past: the training split, less the unseen domain's requests.
  const auto train = [&] {
    if (unseen_domain.empty()) return whole_train;
    const auto d = whole_train.domain_index(unseen_domain, "--unseen-domain");
    std::vector<std::size_t> keep;
    for (std::size_t r = 0; r < whole_train.requests(); ++r)
      if (whole_train.request(r).domain != d) keep.push_back(r);
    LOCUS_REQUIRE(!keep.empty(), config_error, "--unseen-domain ", unseen_domain,
                  " leaves no training request: the plans would be fitted on nothing");
    return whole_train.select_requests(keep);
  }();
  const dynamic_topology topo(4, 2);

  // Planner options as comm_volume's defaults, planned for the transport of the run.
  placement::activation_plan_options popt;
  popt.grouping.clusters = 8;
  popt.grouping.seed = seed;
  popt.grouping.prefill_tokens = prefill;
  popt.refine.anneal_per_expert = 300;
  popt.refine.hedge_replicas = hedge_replicas;
  popt.refine.hedge_floor = hedge_floor;
  popt.refine.hedge_cost_budget = hedge_cost_budget;
  popt.refine.replan_slack = replan_slack;
  popt.refine.swap_significance = swap_significance;
  popt.refine.count(transport == cost::transport_kind::flat ? placement::copy_count::flat
                                                            : placement::copy_count::hierarchical);
  say("planning locality, eplb and linear on 4x2");
  const auto stat = placement::plan_activation_aware(train, topo, "locality", redundant, popt);
  const auto eplb0 = placement::plan_activation_aware(train, topo, "eplb", redundant, popt).maps;
  const auto linear = placement::plan_activation_aware(train, topo, "linear", 0, popt).maps;
  const std::size_t spr = stat.maps.front().slots_per_rank();

  // The timeline: per phase, test requests of that domain drawn with replacement until the phase
  // holds phase_tokens decode tokens.
  std::vector<std::size_t> order, phase_of_request;
  splitmix64 g(seed * 7919 + 1);
  std::vector<std::vector<std::size_t>> pools(phase_names.size());
  for (std::size_t p = 0; p < phase_names.size(); ++p) {
    for (std::size_t r = 0; r < test.requests(); ++r)
      if (test.domains()[test.request(r).domain] == phase_names[p] && test.request(r).length > prefill)
        pools[p].push_back(r);
    LOCUS_REQUIRE(!pools[p].empty(), config_error, "no test request of domain '", phase_names[p], "'");
  }
  for (std::size_t p = 0; p < phase_names.size(); ++p) {
    for (std::size_t tokens = 0; tokens < phase_tokens;) {
      // The phase's domain with probability phase_share, else another one, uniformly.
      std::size_t d = p;
      if (phase_names.size() > 1 && g.uniform() >= phase_share)
        d = (p + 1 + g.below(phase_names.size() - 1)) % phase_names.size();
      const std::size_t r = pools[d][g.below(pools[d].size())];
      order.push_back(r);
      phase_of_request.push_back(p);
      tokens += test.request(r).length - prefill;
    }
  }
  const auto timeline = test.select_requests(order);
  say("scheduling " + std::to_string(phase_names.size()) + " phases");
  cost::simulation_config cfg;
  cfg.topology = topo;
  cfg.transport = transport;
  cfg.sizes = cost::message_sizes::fp8_dispatch_bf16_combine(hidden);
  cfg.batch_per_rank = batch;
  cfg.seed = seed;
  cfg.replica_rule = replica_rule;
  cfg.replica_slack = replica_slack;
  cfg.replica_window = replica_window;
  // Each phase's requests queue at its start and run to the end before the next phase arrives
  // (continuous batching overlaps long summary requests with a whole later phase otherwise); the
  // phases' schedules are concatenated in the timeline's positions.
  cfg.arrival_rate = 0;
  cost::decode_schedule sched;
  std::vector<std::size_t> phase_start;
  for (std::size_t p = 0, first = 0; p < phase_names.size(); ++p) {
    std::size_t last = first;
    while (last < order.size() && phase_of_request[last] == p)
      ++last;
    std::vector<std::size_t> idx;
    for (std::size_t i = first; i < last; ++i)
      idx.push_back(i);
    const auto sub = timeline.select_requests(idx);
    std::vector<std::size_t> to_timeline(sub.tokens());
    for (std::size_t i = 0; i < idx.size(); ++i)
      for (std::size_t k = 0; k < sub.request(i).length; ++k)
        to_timeline[sub.request(i).first_token + k] = timeline.request(idx[i]).first_token + k;
    grouper::workload_aware wa(stat.model);
    const auto ps = cost::record_schedule(sub, stat.maps, wa, cfg);
    phase_start.push_back(sched.steps());
    for (std::size_t st = 0; st < ps.steps(); ++st) {
      for (const auto tok : ps.step_tokens(st))
        sched.tokens.push_back(to_timeline[tok]);
      for (const auto src : ps.step_sources(st))
        sched.sources.push_back(src);
      sched.step_begin.push_back(sched.tokens.size());
    }
    first = last;
  }
  std::vector<std::size_t> phase_end(phase_names.size(), sched.steps());
  for (std::size_t p = 0; p + 1 < phase_names.size(); ++p)
    phase_end[p] = phase_start[p + 1];

  const std::size_t sample_tokens = popt.refine_sample_tokens(timeline.layers(), timeline.top_k());
  const std::size_t slots = placement::total_slots(stat.maps);
  const auto budget = placement::budget_slots(budget_share, stat.maps);
  const bool fill = redundant > 0;
  // A full plan on steps [a, b): locality on their per-node loads, then the token-level stage.
  const auto full_plan = [&](std::size_t a, std::size_t b) {
    auto in = cost::window_plan_input(timeline, sched, a, b, topo, spr);
    auto named = popt.named;
    if (fill) named.locality.replicas = false;
    const auto sample = cost::window_sample(timeline, sched, a, b, topo, sample_tokens);
    return placement::token_level_stage(placement::plan_by_name("locality", in, named), sample, topo, popt, fill);
  };

  cost::online_options base;
  base.window = window;
  base.report_tokens = report_tokens;
  base.expert_bytes = expert_bytes;
  base.balance_floor = balance_floor == 1;
  base.segment_starts = phase_start; // per-phase bytes and balance
  std::vector<policy_run> runs;
  const auto keep = [](const std::vector<expert_map>& m, std::size_t, std::size_t) { return m; };
  say("replaying linear and static locality");
  runs.push_back({"linear", cost::run_online(timeline, sched, linear, cfg, base, keep)});
  runs.push_back({"static locality", cost::run_online(timeline, sched, stat.maps, cfg, base, keep)});
  {
    auto o = base;
    o.interval = interval;
    // As vLLM: its first re-plan after a quarter of the interval, on the steps so far.
    if (interval) o.first_interval = std::max<std::size_t>(interval / 4, 1);
    say("replaying eplb every " + std::to_string(interval) + " steps");
    runs.push_back(
        {"eplb every N",
         cost::run_online(
             timeline, sched, eplb0, cfg, o, [&](const std::vector<expert_map>& cur, std::size_t a, std::size_t b) {
               return placement::keep_slots_in_place(
                   cur, placement::plan_by_name("eplb", cost::window_plan_input(timeline, sched, a, b, topo, spr),
                                                popt.named));
             })});
  }
  // locus adaptive plans on the window together with the training sample the static plan was
  // fitted on (placement::with_prior: the prior steers the copy savings; in the loads the re-plan
  // balances it counts as --prior-requests requests beside the window's); the window-only variant
  // is reported beside it.
  const auto train_sample = placement::token_sample_from_model(train, *stat.model, sample_tokens);
  for (const bool prior : {true, false}) {
    auto o = base;
    o.interval = interval;
    o.window = adaptive_window;
    o.drift_every = drift_every;
    o.min_gap = window;
    // The initial maps were fitted to the training traffic: checked against it from the first
    // --drift-every steps on, a plan that does not fit the traffic it meets is re-planned early.
    o.reference = cost::load_profile::of(train_sample, topo.nodes());
    o.min_check = drift_every;
    o.balance_trigger = balance_trigger;
    say(prior ? "replaying locus adaptive" : "replaying locus adaptive, window only");
    runs.push_back(
        {prior ? "locus adaptive" : "locus adaptive, window only",
         cost::run_online(
             timeline, sched, stat.maps, cfg, o, [&](const std::vector<expert_map>& cur, std::size_t a, std::size_t b) {
               auto sample = cost::window_sample(timeline, sched, a, b, topo, sample_tokens);
               if (prior) sample = placement::with_prior(std::move(sample), train_sample, prior_requests);
               return placement::replan_by_tokens(cur, sample, topo, popt.refine, budget, expert_bytes).maps;
             })});
  }
  // The look-ahead bounds: plans fitted on the traffic about to run (what a perfect predictor of
  // the next `window` steps would see), from step 0 on. Not policies: no engine knows the future.
  if (lookahead == 1) {
    auto o = base;
    o.interval = window;
    o.window = 1;
    o.plan_at = {0};
    const auto next = [&](std::size_t b) { return std::min(sched.steps(), b + window); };
    say("replaying the look-ahead bounds");
    runs.push_back(
        {"look-ahead bound, same budget",
         cost::run_online(
             timeline, sched, stat.maps, cfg, o, [&](const std::vector<expert_map>& cur, std::size_t, std::size_t b) {
               const auto sample = cost::window_sample(timeline, sched, b, next(b), topo, sample_tokens);
               return placement::replan_by_tokens(cur, sample, topo, popt.refine, budget, expert_bytes).maps;
             })});
    runs.push_back(
        {"look-ahead eplb bound, no budget",
         cost::run_online(
             timeline, sched, eplb0, cfg, o, [&](const std::vector<expert_map>& cur, std::size_t, std::size_t b) {
               return placement::keep_slots_in_place(
                   cur, placement::plan_by_name("eplb", cost::window_plan_input(timeline, sched, b, next(b), topo, spr),
                                                popt.named));
             })});
  }
  {
    say("planning and replaying the per-phase oracle");
    std::vector<std::vector<expert_map>> per_phase;
    for (std::size_t p = 0; p < phase_names.size(); ++p)
      per_phase.push_back(full_plan(phase_start[p], phase_end[p]));
    auto o = base;
    o.plan_at = phase_start;
    std::size_t next = 0;
    runs.push_back(
        {"oracle per phase", cost::run_online(timeline, sched, per_phase[0], cfg, o,
                                              [&](const std::vector<expert_map>& cur, std::size_t, std::size_t) {
                                                return placement::keep_slots_in_place(
                                                    cur, per_phase[std::min(next++, per_phase.size() - 1)]);
                                              })});
  }
  for (auto& r : runs)
    for (const auto& e : r.result.replans)
      r.plan_seconds_max = std::max(r.plan_seconds_max, e.seconds);

  // Savings against linear on the same schedule.
  const double lin = runs[0].result.inter_node_bytes_per_token;
  const auto saving = [&](const policy_run& r) { return 1.0 - r.result.inter_node_bytes_per_token / lin; };
  const double oracle_saving = saving(runs.back());
  nlohmann::json doc = {{"trace", trace_path},
                        {"split_seed", seed},
                        {"phases", phase_names},
                        {"phase_start", phase_start},
                        {"steps", sched.steps()},
                        {"decode_tokens", runs[0].result.decode_tokens},
                        {"interval", interval},
                        {"window", window},
                        {"drift_every", drift_every},
                        {"budget_experts", budget},
                        {"slots", slots},
                        {"expert_bytes", expert_bytes},
                        {"transport", cost::to_string(transport)},
                        {"redundant", redundant},
                        {"replica_rule", placement::to_string(replica_rule)},
                        {"replica_slack", replica_slack},
                        {"replica_window", replica_window},
                        {"hedge_replicas", popt.refine.hedge_budget(topo.ranks())},
                        {"hedge_floor", hedge_floor},
                        {"hedge_cost_budget", hedge_cost_budget},
                        {"replan_slack", replan_slack},
                        {"swap_significance", swap_significance},
                        {"balance_trigger", balance_trigger},
                        {"prior_requests", prior_requests},
                        {"lookahead", lookahead == 1},
                        {"command", command},
                        {"machine", machine},
                        {"policies", nlohmann::json::array()}};
  std::string md =
      "| policy | inter-node B/token | saving vs linear | share of oracle's saving | per-phase saving | "
      "GPU max/mean (run) | per phase | worst window | re-plans (drift, balance) | most moved per re-plan | "
      "weights moved | longest re-plan |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::string floor_md = "\n| policy | worst window | its floor | highest window floor | windows above floor + 0.02 "
                         "|\n|---|---|---|---|---|\n";
  for (const auto& r : runs) {
    const auto& res = r.result;
    // Per phase (run_online's segments, one per phase start): bytes against linear's in the same
    // steps, and the phase's own GPU max/mean (rows summed over the phase).
    std::string phases, phase_balance;
    nlohmann::json ph = nlohmann::json::array(), pb = nlohmann::json::array();
    for (std::size_t p = 0; p < res.segments.size(); ++p) {
      const double base_bytes = runs[0].result.segments[p].inter_node_bytes;
      const double s = base_bytes > 0 ? 1.0 - res.segments[p].inter_node_bytes / base_bytes : 0.0;
      ph.push_back(s);
      pb.push_back(res.segments[p].gpu_imbalance);
      char b[48];
      std::snprintf(b, sizeof b, "%s%.1f%%", p ? " / " : "", 100 * s);
      phases += b;
      std::snprintf(b, sizeof b, "%s%.3f", p ? " / " : "", res.segments[p].gpu_imbalance);
      phase_balance += b;
    }
    std::size_t drifted = 0;
    for (const auto& e : res.replans)
      drifted += e.reason == cost::replan_reason::drift;
    nlohmann::json w = nlohmann::json::array();
    for (const auto& x : res.windows)
      w.push_back({{"first_step", x.first_step},
                   {"steps", x.steps},
                   {"tokens", x.tokens},
                   {"bytes_per_token", x.tokens ? x.inter_node_bytes / static_cast<double>(x.tokens) : 0.0},
                   {"gpu_imbalance", x.gpu_imbalance},
                   {"balance_floor", x.balance_floor}});
    if (balance_floor == 1 && !res.windows.empty()) {
      // Plan-limited windows sit near their floor; a window far above it is the split's to fix.
      const auto worst = std::max_element(res.windows.begin(), res.windows.end(), [](const auto& a, const auto& b) {
        return a.gpu_imbalance < b.gpu_imbalance;
      });
      double top = 0;
      std::size_t above = 0;
      for (const auto& x : res.windows) {
        top = std::max(top, x.balance_floor);
        above += x.gpu_imbalance > x.balance_floor + 0.02;
      }
      char fl[320];
      std::snprintf(fl, sizeof fl, "| %s | %.3f | %.3f | %.3f | %zu of %zu |\n", r.name.c_str(), worst->gpu_imbalance,
                    worst->balance_floor, top, above, res.windows.size());
      floor_md += fl;
    }
    nlohmann::json ev = nlohmann::json::array();
    for (const auto& e : res.replans)
      ev.push_back({{"step", e.step},
                    {"reason", cost::to_string(e.reason)},
                    {"experts_moved", e.experts_moved},
                    {"moved_share", e.moved_share},
                    {"bytes_moved", e.bytes_moved},
                    {"seconds", e.seconds},
                    {"drift_distance", e.drift_distance},
                    {"drift_noise", e.drift_noise},
                    {"measured_imbalance", e.measured_imbalance}});
    doc["policies"].push_back({{"name", r.name},
                               {"bytes_per_token", res.inter_node_bytes_per_token},
                               {"saving_vs_linear", saving(r)},
                               {"share_of_oracle_saving", saving(r) / oracle_saving},
                               {"phase_saving", ph},
                               {"phase_gpu_imbalance", pb},
                               {"gpu_imbalance_aggregate", res.gpu_imbalance_aggregate},
                               {"worst_window_imbalance", res.worst_window_imbalance},
                               {"replans", res.replans.size()},
                               {"drift_replans", drifted},
                               {"balance_replans", res.balance_fired},
                               {"drift_checks", res.drift_checks},
                               {"max_moved_share", res.max_moved_share},
                               {"bytes_moved", res.bytes_moved},
                               {"windows", w},
                               {"events", ev}});
    char line[640];
    std::snprintf(
        line, sizeof line,
        "| %s | %.0f | %.1f%% | %.2f | %s | %.3f | %s | %.3f | %zu (%zu, %zu) | %.1f%% | %.2f GB | %.3f s |\n",
        r.name.c_str(), res.inter_node_bytes_per_token, 100 * saving(r), saving(r) / oracle_saving, phases.c_str(),
        res.gpu_imbalance_aggregate, phase_balance.c_str(), res.worst_window_imbalance, res.replans.size(), drifted,
        res.balance_fired, 100 * res.max_moved_share, static_cast<double>(res.bytes_moved) / 1e9, r.plan_seconds_max);
    md += line;
  }
  const auto& ad = runs[3].result;
  const double keep_share = saving(runs[3]) / oracle_saving;
  char verdict[512];
  std::snprintf(verdict, sizeof verdict,
                "\nTargets (locus adaptive): ≥ 90%% of the oracle's saving: %.1f%% (%s); GPU max/mean ≤ 1.15 in every "
                "window: worst %.3f (%s); ≤ 10%% of expert weights per re-plan: at most %.1f%% (%s).\n",
                100 * keep_share, keep_share >= 0.9 ? "met" : "MISSED", ad.worst_window_imbalance,
                ad.worst_window_imbalance <= 1.15 ? "met" : "MISSED", 100 * ad.max_moved_share,
                ad.max_moved_share <= 0.10 + 1e-12 ? "met" : "MISSED");
  md += verdict;
  if (!unseen_domain.empty()) {
    // The leave-one-domain-out targets, read on the unseen domain's phase: its balance against
    // linear's on the same steps, its bytes against linear's.
    const auto p = static_cast<std::size_t>(std::find(phase_names.begin(), phase_names.end(), unseen_domain) -
                                            phase_names.begin());
    const auto phase_of = [&](const policy_run& r) { return r.result.segments[p]; };
    const double lin_imb = phase_of(runs[0]).gpu_imbalance, lin_bytes = phase_of(runs[0]).inter_node_bytes;
    char lin_text[32];
    std::snprintf(lin_text, sizeof lin_text, "%.3f", lin_imb); // as the table rounds it
    std::string u = "\nUnseen domain " + unseen_domain + " (phase " + std::to_string(p + 1) +
                    ", no training request of it): its phase's GPU max/mean (linear's: " + lin_text +
                    ") and inter-node byte saving vs linear:";
    nlohmann::json uj = nlohmann::json::object();
    for (const std::size_t i : {std::size_t{1}, std::size_t{2}, std::size_t{3}, runs.size() - 1}) {
      const auto seg = phase_of(runs[i]);
      const double sv = lin_bytes > 0 ? 1 - seg.inter_node_bytes / lin_bytes : 0.0;
      char b[192];
      std::snprintf(b, sizeof b, "%s %s %.3f (%s linear's), %.1f%%", i == 1 ? "" : ";", runs[i].name.c_str(),
                    seg.gpu_imbalance, seg.gpu_imbalance <= lin_imb ? "at or under" : "ABOVE", 100 * sv);
      u += b;
      uj[runs[i].name] = {{"gpu_imbalance", seg.gpu_imbalance}, {"saving_vs_linear", sv}};
    }
    md += u + ".\n";
    uj["linear"] = {{"gpu_imbalance", lin_imb}};
    doc["unseen_phase"] = uj;
  }
  if (balance_floor == 1)
    md += "\nBalance floor per window (placement::min_max_split over the maps in service, mean over layers): a "
          "window near its floor is plan-limited.\n" +
          floor_md;
  doc["unseen_domain"] = unseen_domain.empty() ? nlohmann::json(nullptr) : nlohmann::json(unseen_domain);
  doc["targets"] = {{"share_of_oracle_saving", keep_share},
                    {"worst_window_imbalance", ad.worst_window_imbalance},
                    {"max_moved_share", ad.max_moved_share}};

  // One re-plan at DeepSeek-V3 shape: 256 experts, top-8, 58 layers, 8 × 8 ranks, a 100k-token
  // window (the synthesizer's, requests homed by domain), 10% of the weights as the budget.
  std::string ds;
  if (deepseek == 1) {
    say("timing a re-plan at DeepSeek-V3 shape");
    trace::synth_shape sh;
    sh.experts = 256;
    sh.top_k = 8;
    sh.layers = 58;
    sh.seed = seed;
    const auto model = trace::make_synth_model(sh);
    trace::sample_options so;
    so.tokens = 100000;
    so.seed = seed;
    so.threads = 1;
    const auto big = trace::sample(model, so);
    const dynamic_topology dtopo(8, 8);
    cost::decode_schedule s;
    for (std::size_t r = 0; r < big.requests(); ++r)
      for (std::size_t i = 0; i < big.request(r).length; ++i) {
        s.tokens.push_back(big.request(r).first_token + i);
        s.sources.push_back(static_cast<std::uint32_t>(((big.request(r).domain * 3 + r % 3) % 8) * 8 + r % 8));
      }
    s.step_begin.push_back(s.tokens.size());
    const auto dmaps = placement::plan_by_name(
        "linear",
        placement::plan_input{dtopo, 256, 4, std::vector<std::vector<double>>(58, std::vector<double>(256, 1.0)), {}});
    placement::activation_plan_options dopt;
    const std::size_t dslots = placement::total_slots(dmaps);
    double best = 1e30;
    placement::migration_result mr;
    for (int rep = 0; rep < 3; ++rep) { // CPU time: this machine is shared, wall time is not the planner's
      const std::clock_t t0 = std::clock();
      const auto sample = cost::window_sample(big, s, 0, 1, dtopo, dopt.refine_sample_tokens(58, 8));
      mr = placement::replan_by_tokens(dmaps, sample, dtopo, dopt.refine, dslots / 10, 3ull * 7168 * 2048);
      best = std::min(best, static_cast<double>(std::clock() - t0) / CLOCKS_PER_SEC);
    }
    char b[512];
    std::snprintf(b, sizeof b,
                  "\nDeepSeek-V3 shape (256 experts, top-8, 58 layers, 8 × 8 ranks, a %zu-token window from the "
                  "synthesizer, budget 10%% of %zu slots): one re-plan (window sample + budgeted swaps) takes %.3f s "
                  "of CPU time on one core (best of 3); it moves %zu experts (%.1f%%, %.1f GB of FP8 expert weights, "
                  "7168 × 2048 × 3 bytes each) and lowers the window sample's copy cost from %.0f to %.0f.\n",
                  s.tokens.size(), dslots, best, mr.experts_moved,
                  100.0 * static_cast<double>(mr.experts_moved) / static_cast<double>(dslots),
                  static_cast<double>(mr.bytes_moved) / 1e9, mr.cost_before, mr.cost_after);
    ds = b;
    doc["deepseek"] = {{"seconds", best}, {"window_tokens", s.tokens.size()}, {"experts_moved", mr.experts_moved},
                       {"slots", dslots}, {"cost_before", mr.cost_before},    {"cost_after", mr.cost_after}};
  }

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  doc["seconds"] = seconds;
  std::string json_text = doc.dump(1) + "\n";
  char head[1024];
  std::snprintf(head, sizeof head,
                "# Plans under a moving request mix (ESFT, 4 × 2, %s)\n\nThe ESFT test split (seed %llu) drawn per "
                "domain into phases (%zu decode tokens each, in the order given, %.0f%% of a phase's requests from its "
                "domain%s; a phase's requests queue at its start, up to %zu run per GPU), "
                "the workload-aware grouping fitted on the training split%s. %zu steps, "
                "%llu decode tokens; phases start at steps",
                cost::to_string(transport), static_cast<unsigned long long>(seed),
                static_cast<std::size_t>(phase_tokens), 100 * phase_share,
                phase_share < 1 && phase_names.size() > 1 ? " and the rest from the others" : "",
                static_cast<std::size_t>(batch),
                unseen_domain.empty() ? "" : (" without its " + unseen_domain + " requests (as every plan)").c_str(),
                sched.steps(), static_cast<unsigned long long>(runs[0].result.decode_tokens));
  std::string text = head;
  for (std::size_t p = 0; p < phase_names.size(); ++p)
    text += (p ? ", " : " ") + std::to_string(phase_start[p]) + " (" + phase_names[p] + ")";
  char mid[2048];
  std::snprintf(mid, sizeof mid,
                ". Re-plans: EPLB every %zu steps from the last %zu, the first after %zu on the steps so far "
                "(vLLM's 3000 / 1000, the first after 750, scaled to the trace); locus adaptive at the same interval "
                "from the last %zu, also early when the drift check (every %zu steps, "
                "against the training traffic until the first re-plan) fires or the GPU max/mean since the last "
                "re-plan exceeds %.2f, moving at most %zu of %zu expert slots (%.0f%%) per re-plan, repairing first "
                "the GPUs above %.4g × the mean load, or above two standard errors of a GPU's load where the spread "
                "of the window's requests gives more (the window's, with the training sample counted as %g requests "
                "beside the window's; the sample also steers the copy savings, except in the window-only row), and "
                "taking a swap for the copies it saves only above %g standard errors of that saving (summed per "
                "request); the oracle re-plans at each phase start from that phase's own traffic; a full re-plan "
                "(EPLB, the oracle) keeps an "
                "expert that stays on its GPU in its slot, as vLLM's EPLB does. "
                "Reported windows of %zu decode tokens. An expert is %.1f MB.",
                static_cast<std::size_t>(interval), static_cast<std::size_t>(window),
                std::max<std::size_t>(static_cast<std::size_t>(interval) / 4, 1),
                static_cast<std::size_t>(adaptive_window), static_cast<std::size_t>(drift_every), balance_trigger,
                budget, slots, 100 * budget_share, 1 + replan_slack, prior_requests, swap_significance,
                base.report_tokens, static_cast<double>(expert_bytes) / 1e6);
  text += mid;
  if (lookahead == 1)
    text += " The look-ahead rows are bounds, not policies: from step 0 and every " + std::to_string(window) +
            " steps they re-plan on the traffic of the next " + std::to_string(window) +
            " steps (what a perfect predictor would see): locus under the same budget, EPLB with none.";
  text += " Columns: inter-node bytes per decode token, and their saving against linear's on the same steps "
          "(over the run, and per phase in the order above); GPU max/mean: per layer, the busiest GPU's rows over the "
          "mean, mean over layers, with rows summed over the run, over each phase (per phase) and over each reported "
          "window (the worst); re-plans, and in brackets those the drift check and the balance trigger fired.";
  text += "\n\n" + md + ds;
  char tail[256];
  std::snprintf(tail, sizeof tail, "\n%.0f s. Plot: `/usr/bin/python3 bench/plot_drift.py DIR`.\n", seconds);
  text += tail;
  text += "\nProduced by `" + command + "` on " + machine + "; replicas chosen by " +
          placement::to_string(replica_rule) +
          (replica_rule == placement::replica_rule::locality_bounded
               ? " (slack " + std::to_string(replica_slack) + ", window " + std::to_string(replica_window) + " steps)"
               : std::string()) +
          ".\n";
  bench_output::write_together({{folder.file("drift.json"), json_text}, {folder.file("drift.md"), text}});
  std::printf("%s", text.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "drift: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
