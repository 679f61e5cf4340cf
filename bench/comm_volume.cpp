// Question: how many bytes cross the network per decode token, for each placement x grouper x
// transport, on real routing traces? Fits on a training split of requests, evaluates on the
// disjoint test split; every figure is also given relative to the baseline measured in the same
// run (linear placement, round-robin grouping, flat transport, same topology).
//
//   comm_volume [--trace DIR_OR_FILE] [--out DIR] [--split-seed S] [--prefill-tokens P]
//               [--anneal N] [--plan-per-transport 0|1] [--replica-rule R] [--replica-slack S]
//               [--replica-balance-slack S] [--unseen-redundant N] (--help lists every option and its default)
// Rows with redundant slots are also simulated under every engine's replica rule (second table).
// Writes DIR/comm_volume.json and DIR/comm_volume.md; bench/plot_comm_volume.py draws the PNG.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/cost/comparison.hpp>
#include <locus/cost/simulation_json.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/split_floor.hpp>
#include <locus/placement/trace_load.hpp>
#include <locus/trace/synthesizer.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

struct topology_case {
  std::size_t nodes, gpus;
};

// Majority training domain of each cluster, then the share of test requests whose predicted
// cluster's domain is their own (classified from the first `prefill` tokens).
double domain_accuracy(const locus::grouper::workload_model& m, const locus::trace::trace& train,
                       const locus::trace::trace& test, std::size_t prefill) {
  const std::size_t domains = train.domains().size();
  std::vector<std::vector<std::size_t>> votes(m.clusters(), std::vector<std::size_t>(domains, 0));
  for (std::size_t i = 0; i < m.training_requests().size(); ++i)
    ++votes[m.training_labels()[i]][train.request(m.training_requests()[i]).domain];
  std::vector<std::uint32_t> cluster_domain(m.clusters());
  for (std::size_t c = 0; c < m.clusters(); ++c)
    cluster_domain[c] =
        static_cast<std::uint32_t>(std::max_element(votes[c].begin(), votes[c].end()) - votes[c].begin());
  std::vector<std::uint32_t> scratch;
  std::size_t right = 0, n = 0;
  for (std::size_t r = 0; r < test.requests(); ++r) {
    if (test.request(r).length <= prefill) continue;
    const auto c = m.classify(test, r, prefill, scratch);
    right += cluster_domain[c.cluster] == test.request(r).domain;
    ++n;
  }
  return n ? static_cast<double>(right) / static_cast<double>(n) : 0.0;
}

// What the command line asks for.
struct run_options {
  std::string trace_path, out_dir = ".", only;
  unsigned long long seed = 1;
  std::size_t prefill = 32, hidden = 2048, clusters = 8, unseen_redundant = 0;
  bool fit_on_test = false, synthetic = true;
  bool balance_floor = false; // print each row's balance floor (placement/split_floor.hpp)
  // The rule of the main rows and the unseen-domain rows; every replica row also gets every rule.
  locus::placement::replica_rule main_rule = locus::placement::replica_rule::locality_first;
  double replica_slack = 0.05;
  locus::cost::comparison_options copt; // the planner's and the simulation's settings
};

// Fills `o` from the command line. Returns the exit code when the program should end here (help
// asked for, or an option refused: CLI11 has printed why), else nothing.
std::optional<int> parse_options(int argc, char** argv, run_options& o) {
  CLI::App app{"Inter-node bytes per decode token for each placement x grouper x transport on a real trace, fitted on "
               "a training split and measured on the test split"};
  tool_cli::show_defaults(app);
  std::string replica_rule_name = "locality_first", shift_by = "node";
  int balance_floor = 0;
  int fit_on_test = 0, synthetic = 1, token_refine = 1, token_replicas = 1, plan_per_transport = 1;
  // The comparison's defaults are this benchmark's; the options below override them.
  auto& popt = o.copt.plan;
  popt.joint.token_slack = 0.10;
  popt.named.locality.balance_slack = 0.05;
  popt.named.locality.replica_balance_slack = 0.03;
  popt.refine.balance_slack = 0.03;
  popt.refine.rank_copy_weight = 1;
  popt.refine.node_copy_weight = 1;
  popt.refine_sample_pairs = 24576;
  popt.refine.candidates = 3;
  popt.refine.max_sweeps = 6;
  popt.refine.anneal_per_expert = 300;
  popt.refine.anneal_temperature = 0.3;
  popt.refine.balance_shift = 0;
  popt.refine.shift_slack = 0.10;
  const std::vector<std::string> rule_names = tool_cli::names_of(locus::placement::all_replica_rules);
  const CLI::Validator topology_shape{
      [](std::string& value) -> std::string {
        const auto x = value.find('x');
        std::size_t nodes = 0, gpus = 0;
        if (x != std::string::npos && CLI::detail::lexical_cast(value.substr(0, x), nodes) &&
            CLI::detail::lexical_cast(value.substr(x + 1), gpus) && nodes > 0 && gpus > 0)
          return {};
        return "must be NODESxGPUS (e.g. 4x2), got " + value;
      },
      "NODESxGPUS"};
  const CLI::Option* trace_opt = bench_args::add_trace_option(app, o.trace_path, "ESFT folder or binary trace");
  app.add_option("--out", o.out_dir, bench_args::out_folder_help);
  app.add_option("--split-seed", o.seed, "Seed of the train/test split of the requests (and of the grouping)");
  app.add_option("--prefill-tokens", o.prefill, "Prefill tokens per request");
  app.add_option("--hidden", o.hidden, "Hidden size (message sizes)")->check(tool_cli::positive);
  app.add_option("--clusters", o.clusters, "Request clusters of the workload model")->check(tool_cli::positive);
  app.add_option("--only", o.only, "One topology instead of 2x4, 4x2, 4x4 and 8x1")->check(topology_shape);
  app.add_option("--synthetic", synthetic, "Also the 8x8 synthetic 256-expert rows (0|1)")->check(CLI::Range(0, 1));
  app.add_option("--balance-floor", balance_floor,
                 "Also each row's balance floor: the lowest GPU max/mean (aggregate) any split of the test decode "
                 "rows among the map's replicas reaches (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--fit-on-test", fit_on_test, "Fit on the test split: upper-bound experiments only (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--replica-rule", replica_rule_name, "Replica rule of the main rows and the unseen-domain rows")
      ->check(CLI::IsMember(rule_names));
  app.add_option("--replica-slack", o.replica_slack, "locality_bounded: a GPU is hot above (1 + this) x the mean load")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--replica-balance-slack", popt.named.locality.replica_balance_slack,
                 "Locality planner: node load at most (1 + this) x the mean when adding replicas")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--unseen-redundant", o.unseen_redundant, "Redundant slots per GPU of the unseen-domain rows");
  app.add_option("--plan-per-transport", plan_per_transport, "Plan locality for the transport of each row (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--token-slack", popt.joint.token_slack,
                 "Grouping: a node's decode tokens at most (1 + this) x the mean")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--balance-slack", popt.named.locality.balance_slack,
                 "Locality planner: node load at most (1 + this) x the mean (first copies)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--token-refine", token_refine, "Run the token-level stage on locality maps (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--token-replicas", token_replicas,
                 "Token-level stage also chooses replicas on the exact copy cost (0|1)")
      ->check(CLI::Range(0, 1));
  app.add_option("--refine-slack", popt.refine.balance_slack,
                 "Token-level stage: GPU load at most (1 + this) x the mean")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--rank-copy-weight", popt.refine.rank_copy_weight, "Token-level stage: weight of a GPU copy")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--node-copy-weight", popt.refine.node_copy_weight, "Token-level stage: weight of a node copy")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--refine-pairs", popt.refine_sample_pairs, "Token-level stage: sampled (token, layer) pairs")
      ->check(tool_cli::positive);
  app.add_option("--refine-candidates", popt.refine.candidates,
                 "Token-level stage: swap partners evaluated per expert and sweep")
      ->check(tool_cli::positive);
  app.add_option("--refine-sweeps", popt.refine.max_sweeps, "Token-level stage: sweeps over the experts at most");
  app.add_option("--anneal", popt.refine.anneal_per_expert,
                 "Annealing swap proposals per expert and layer after the sweeps");
  app.add_option("--anneal-temperature", popt.refine.anneal_temperature,
                 "Annealing start temperature (share of a random swap's mean cost rise)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--balance-shift", popt.refine.balance_shift,
                 "Token-level stage: keep balance when a group's tokens grow by this share (0: off)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-replicas", popt.refine.hedge_replicas,
                 "Token-level stage: at most this many replica slots per layer first hold balance hedges (the "
                 "--hedge-floor rule, or the risk rule with --hedge-floor 0) before copies saved (0: off; default: "
                 "one per GPU)")
      ->default_str("one per GPU");
  app.add_option("--fill-slack", popt.refine.fill_slack,
                 "Token-level stage: the replica fill's load bound (0: --refine-slack's); swaps bring the "
                 "GPUs back within that after the fill")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-z", popt.refine.hedge_z, "Hedge replicas: a GPU's risk is its mean share + this many sd")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-excess", popt.refine.hedge_excess, "Hedge replicas: hedge GPUs whose risk exceeds 1 + this")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-floor", popt.refine.hedge_floor,
                 "Hedge replicas: copy experts out of the binding GPU set until the worst balance floor over the "
                 "resamples is at most this (0: the risk rule of --hedge-z and --hedge-excess instead)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-cost-budget", popt.refine.hedge_cost_budget,
                 "Floor hedge: at most this share more copies on the training sample than without hedges (0: no bound)")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--hedge-resamples", popt.refine.hedge_resamples, "Hedge replicas: bootstrap draws of the requests");
  app.add_option("--hedge-class-spread", popt.refine.hedge_class_spread,
                 "Floor hedge: each draw also weights a request class's requests by exp(this x a standard normal "
                 "draw), shifting the mix of domains, at most 2 (0: resamples only)")
      ->check(tool_cli::number_in(0.0, locus::placement::token_refine_options::max_hedge_class_spread));
  app.add_option("--shift-slack", popt.refine.shift_slack, "Token-level stage: GPU load bound under a shifted mix")
      ->check(tool_cli::finite_non_negative);
  app.add_option("--shift-by", shift_by, "Token-level stage: what a shifted mix grows (node, request class, request)")
      ->check(CLI::IsMember({"node", "class", "request"}));
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  o.trace_path = bench_args::trace_to_read(*trace_opt, o.trace_path);
  o.fit_on_test = fit_on_test == 1;
  o.balance_floor = balance_floor == 1;
  o.synthetic = synthetic == 1;
  o.main_rule = locus::placement::parse_replica_rule(replica_rule_name);
  popt.token_refine = token_refine == 1;
  popt.token_replicas = token_replicas == 1;
  if (shift_by != "node")
    popt.shift_by =
        shift_by == "class" ? locus::placement::shift_group::request_class : locus::placement::shift_group::request;
  // The locality planner is told the transport it plans for: its token-level stage then counts
  // only the copies that transport sends (flat: per remote GPU, hierarchical: per remote node).
  // With 0, one plan serves both transports and counts both kinds of copies.
  o.copt.plan_per_transport = plan_per_transport == 1;
  popt.grouping.clusters = o.clusters;
  popt.grouping.seed = o.seed;
  popt.grouping.prefill_tokens = o.prefill;
  o.copt.simulation.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(o.hidden);
  o.copt.simulation.seed = o.seed;
  o.copt.simulation.replica_rule = o.main_rule;
  o.copt.simulation.replica_slack = o.replica_slack;
  return std::nullopt;
}

// The topologies measured: --only's, or the four that split 8 GPUs.
std::vector<topology_case> topologies(const std::string& only) {
  if (only.empty()) return {{2, 4}, {4, 2}, {4, 4}, {8, 1}};
  return {{std::stoul(only.substr(0, only.find('x'))), std::stoul(only.substr(only.find('x') + 1))}};
}

// Every placement x grouper x transport row of the real-trace tables.
std::vector<locus::cost::comparison_row> comparison_rows() {
  // (placement, redundant slots per GPU): linear and round_robin never use redundant slots.
  const std::vector<std::pair<std::string, std::size_t>> placements = {
      {"linear", 0},           {"round_robin", 0},      {"eplb", 0},     {"eplb", 1},
      {"activation_usage", 0}, {"activation_usage", 1}, {"locality", 0}, {"locality", 1}};
  std::vector<locus::cost::comparison_row> rows;
  for (const auto& [placement, redundant] : placements)
    for (const char* grouper : {"round_robin", "least_loaded", "workload_aware"})
      for (auto transport : {locus::cost::transport_kind::flat, locus::cost::transport_kind::hierarchical})
        rows.push_back({placement, redundant, grouper, transport});
  return rows;
}

// What the run collects: the JSON document and the Markdown tables the output is made of.
struct results {
  nlohmann::json doc;
  std::string md = "| topology | placement | redundant/GPU | grouper | transport | inter-node B/token | vs baseline | "
                   "norm. a2a median | p90 | GPU max/mean (step, by rows) | (aggregate) | attention max/mean | layer "
                   "time µs (model) |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::string rules_md =
      "| topology | placement | grouper | transport | locality_first (locus) | same_gpu_else_random (SGLang static) "
      "| random (vLLM EPLB) | locality_bounded |\n|---|---|---|---|---|---|---|---|\n";
  std::string floor_md = "| topology | placement | redundant/GPU | grouper | transport | GPU max/mean (aggregate) | "
                         "floor | above floor | worst resampled floor | layers above it |\n"
                         "|---|---|---|---|---|---|---|---|---|---|\n";
  std::map<std::string, nlohmann::json> by_key; // "4x2 locality 1 workload_aware flat" -> row
  std::optional<double> accuracy;               // measured on 4x2 only (the plans it reads are that topology's)
};

// One line of the "All rows" table.
std::string all_rows_line(const std::string& topology, const locus::cost::comparison_row& row,
                          const locus::cost::simulation_result& res, const nlohmann::json& j, double ratio) {
  char line[512];
  std::snprintf(line, sizeof line,
                "| %s | %s | %zu | %s | %s | %.0f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f |\n",
                topology.c_str(), row.placement.c_str(), row.redundant, row.grouper.c_str(),
                locus::cost::to_string(row.transport), res.inter_node_bytes_per_token, ratio,
                j["normalized_all2all_median"].get<double>(), j["normalized_all2all_p90"].get<double>(),
                res.gpu_imbalance_step_weighted, res.gpu_imbalance_aggregate, res.attention_imbalance,
                res.layer_time_estimate_us);
  return line;
}

// Every row on one topology, and the rows with replicas again under each engine's replica rule.
void topology_table(const topology_case& tc, const locus::trace::trace& train, const locus::trace::trace& test,
                    const std::vector<locus::cost::comparison_row>& rows, const run_options& o, results& out) {
  auto topo_opt = o.copt;
  topo_opt.simulation.topology = locus::dynamic_topology(tc.nodes, tc.gpus);
  const auto cmp = locus::cost::compare(train, test, rows, topo_opt);
  if (tc.nodes == 4 && tc.gpus == 2)
    out.accuracy = domain_accuracy(*cmp.plans.at({"activation_usage", 0, -1}).model, train, test, o.prefill);
  const locus::cost::simulation_result& baseline = cmp.rows.front().result; // linear / round_robin / flat
  const auto test_rows =
      o.balance_floor ? locus::placement::expert_load(test, true) : std::vector<std::vector<double>>{};
  std::map<std::tuple<std::string, std::size_t, int>, std::vector<double>> worst_resampled; // per plan, per layer
  for (const auto& entry : cmp.rows) {
    const auto& row = entry.row;
    const auto& res = entry.result;
    auto j = locus::cost::simulation_summary_json(res, &baseline);
    const double ratio = entry.vs_baseline;
    j["topology"] = std::to_string(tc.nodes) + "x" + std::to_string(tc.gpus);
    j["placement"] = row.placement;
    j["redundant_slots_per_gpu"] = row.redundant;
    j["grouper"] = row.grouper;
    j["transport"] = locus::cost::to_string(row.transport);
    j["inter_node_bytes_vs_baseline"] = ratio;
    j["replica_rule"] = locus::placement::to_string(o.main_rule);
    if (row.redundant > 0) {
      // The same maps and requests under each engine's replica rule (the rule only matters with replicas).
      const auto& p = cmp.plans.at(locus::cost::detail::plan_key(row, topo_opt));
      char cells[640];
      int at = std::snprintf(cells, sizeof cells, "| %s | %s | %s | %s |", j["topology"].get<std::string>().c_str(),
                             row.placement.c_str(), row.grouper.c_str(), locus::cost::to_string(row.transport));
      for (const auto rule : locus::placement::all_replica_rules) {
        auto rcfg = topo_opt.simulation;
        rcfg.transport = row.transport;
        rcfg.replica_rule = rule;
        auto rg = locus::grouper::grouper_by_name(row.grouper, p.model);
        const auto rr = rule == o.main_rule ? res : locus::cost::simulate_decode(test, p.maps, rg, rcfg);
        const double rratio = rr.inter_node_bytes_per_token / baseline.inter_node_bytes_per_token;
        j["by_replica_rule"][locus::placement::to_string(rule)] = {
            {"inter_node_bytes_per_token", rr.inter_node_bytes_per_token},
            {"inter_node_bytes_vs_baseline", rratio},
            {"gpu_imbalance_aggregate", rr.gpu_imbalance_aggregate},
            {"gpu_imbalance_step_weighted", rr.gpu_imbalance_step_weighted},
            {"gpu_imbalance_step_mean", rr.gpu_imbalance_step_mean}};
        at += std::snprintf(cells + at, sizeof cells - static_cast<std::size_t>(at), " %.1f%% / %.3f |",
                            100 * (1 - rratio), rr.gpu_imbalance_aggregate);
      }
      out.rules_md += std::string(cells) + "\n";
    }
    if (o.balance_floor) {
      // Mean over layers, like gpu_imbalance_aggregate; a row near its floor is plan-limited.
      const auto key = locus::cost::detail::plan_key(row, topo_opt);
      const auto& plan = cmp.plans.at(key);
      const auto& maps = plan.maps;
      std::vector<double> test_floor(maps.size());
      double floor = 0;
      for (std::size_t l = 0; l < maps.size(); ++l)
        floor += test_floor[l] = locus::placement::min_max_split(maps[l], test_rows[l]).max_over_mean;
      floor /= static_cast<double>(maps.size());
      j["gpu_balance_floor"] = floor;
      char resampled[64] = "— | —";
      if (row.placement == "locality" && row.redundant > 0) {
        // The hedge's view: each layer's worst floor over its draws of the planner's own sample
        // (the same sample and draws the plan was hedged with); a test floor above it is a mix the
        // hedge could not see.
        auto& worst = worst_resampled[key];
        if (worst.empty()) {
          const auto sample = locus::placement::token_sample_from_model(
              train, *plan.model, topo_opt.plan.refine_sample_tokens(train.layers(), train.top_k()),
              topo_opt.plan.shift_by);
          for (std::size_t l = 0; l < maps.size(); ++l) {
            const auto draws = locus::placement::hedge_draw_floors(maps[l], sample, l, topo_opt.simulation.topology,
                                                                   topo_opt.plan.refine);
            worst.push_back(draws.empty() ? 0.0 : *std::max_element(draws.begin(), draws.end()));
          }
        }
        double mean = 0;
        std::size_t above = 0;
        for (std::size_t l = 0; l < maps.size(); ++l) {
          mean += worst[l];
          above += test_floor[l] > worst[l];
        }
        mean /= static_cast<double>(maps.size());
        j["gpu_balance_floor_worst_resample"] = mean;
        j["layers_test_floor_above_worst_resample"] = above;
        std::snprintf(resampled, sizeof resampled, "%.3f | %zu of %zu", mean, above, maps.size());
      }
      char cells[400];
      std::snprintf(cells, sizeof cells, "| %s | %s | %zu | %s | %s | %.3f | %.3f | %+.3f | %s |\n",
                    j["topology"].get<std::string>().c_str(), row.placement.c_str(), row.redundant, row.grouper.c_str(),
                    locus::cost::to_string(row.transport), res.gpu_imbalance_aggregate, floor,
                    res.gpu_imbalance_aggregate - floor, resampled);
      out.floor_md += cells;
    }
    out.doc["rows"].push_back(j);
    out.by_key[j["topology"].get<std::string>() + " " + row.placement + " " + std::to_string(row.redundant) + " " +
               row.grouper + " " + locus::cost::to_string(row.transport)] = j;
    out.md += all_rows_line(j["topology"].get<std::string>(), row, res, j, ratio);
  }
}

// The 256-expert top-8 case on 8 nodes x 8 GPUs (the paper's EP64): the synthesizer fitted to
// this ESFT trace, rescaled to 256 experts and top-8 (ESFT's layer count kept so that the run
// stays short), sampled, split and measured like the real trace.
void synthetic_rows(const locus::trace::trace& full, const run_options& o, results& out) {
  using locus::cost::transport_kind;
  const auto fitted = locus::trace::fit(full, {});
  locus::trace::rescale_options ro;
  ro.experts = 256;
  ro.top_k = 8;
  ro.layers = full.layers();
  const auto big = locus::trace::rescale(fitted, ro);
  locus::trace::sample_options so;
  so.tokens = 40000;
  so.seed = o.seed;
  const auto synth = locus::trace::sample(big, so).with_prefill_tokens(o.prefill);
  const auto [strain, stest] = locus::trace::split_by_request(synth, 0.5, o.seed);
  auto synth_opt = o.copt;
  synth_opt.simulation.topology = locus::dynamic_topology(8, 8);
  const std::vector<locus::cost::comparison_row> srows = {
      {"linear", 0, "round_robin", transport_kind::flat},
      {"eplb", 1, "round_robin", transport_kind::flat},
      {"activation_usage", 0, "workload_aware", transport_kind::flat},
      {"locality", 0, "workload_aware", transport_kind::flat},
      {"locality", 1, "workload_aware", transport_kind::flat},
      {"locality", 1, "workload_aware", transport_kind::hierarchical}};
  const auto cmp = locus::cost::compare(strain, stest, srows, synth_opt);
  for (const auto& entry : cmp.rows) {
    const auto& row = entry.row;
    const auto& res = entry.result;
    auto j = locus::cost::simulation_summary_json(res, &cmp.rows.front().result);
    const double ratio = entry.vs_baseline;
    j["topology"] = "8x8 synthetic 256e top-8";
    j["placement"] = row.placement;
    j["redundant_slots_per_gpu"] = row.redundant;
    j["grouper"] = row.grouper;
    j["transport"] = locus::cost::to_string(row.transport);
    j["inter_node_bytes_vs_baseline"] = ratio;
    out.doc["rows"].push_back(j);
    out.md += all_rows_line("8x8 synth 256e/top-8", row, res, j, ratio);
  }
}

// Issue targets at 4x2, relative to linear / round_robin / flat in the same run.
std::string targets_table(results& out) {
  struct target {
    const char* what;
    std::string key;
    double max_ratio, max_balance;
  };
  const std::vector<target> targets = {
      {"paper: activation_usage + workload_aware, no replicas, flat", "4x2 activation_usage 0 workload_aware flat", 0,
       0},
      {"locality + workload_aware, no replicas, flat", "4x2 locality 0 workload_aware flat", 0.75, 1.15},
      {"locality + workload_aware, 1 redundant slot/GPU, flat", "4x2 locality 1 workload_aware flat", 0.65, 1.10},
      {"locality + workload_aware, 1 redundant slot/GPU, hierarchical", "4x2 locality 1 workload_aware hierarchical",
       0.45, 1.10},
      {"eplb, 1 redundant slot/GPU (balance reference)", "4x2 eplb 1 round_robin flat", 0, 0},
      {"linear (balance reference)", "4x2 linear 0 round_robin flat", 0, 0}};
  std::string summary = "| case (4x2, ESFT test split) | inter-node bytes vs linear/rr/flat | reduction | GPU max/mean "
                        "(aggregate) | attention max/mean | target |\n|---|---|---|---|---|---|\n";
  out.doc["targets"] = nlohmann::json::array();
  for (const auto& t : targets) {
    if (!out.by_key.count(t.key)) continue;
    const auto& j = out.by_key.at(t.key);
    const double ratio = j["inter_node_bytes_vs_baseline"].get<double>();
    const double bal = j["gpu_imbalance_aggregate"].get<double>();
    std::string verdict = "reported";
    if (t.max_ratio > 0) {
      char v[128];
      std::snprintf(v, sizeof v, "≥ %.0f%% lower, ≤ %.2f: %s", 100 * (1 - t.max_ratio), t.max_balance,
                    ratio <= t.max_ratio && bal <= t.max_balance ? "met" : "MISSED");
      verdict = v;
    }
    char line[512];
    std::snprintf(line, sizeof line, "| %s | %.3f | %.1f%% | %.3f | %.3f | %s |\n", t.what, ratio, 100 * (1 - ratio),
                  bal, j["attention_imbalance"].get<double>(), verdict.c_str());
    summary += line;
    out.doc["targets"].push_back(
        {{"case", t.what}, {"ratio", ratio}, {"gpu_imbalance_aggregate", bal}, {"verdict", verdict}});
  }
  return summary;
}

// Unseen traffic (4x2): hold one domain out of training; plan locality and the grouping on the
// rest; simulate the whole test split, and its held-out requests alone, with the workload-aware
// grouper and with round-robin grouping on the same maps.
std::string unseen_domain_table(const locus::trace::trace& train, const locus::trace::trace& test, const run_options& o,
                                nlohmann::json& doc) {
  const auto& popt = o.copt.plan;
  std::string unseen =
      "\n## Unseen domain (4x2, locality, " + std::to_string(o.unseen_redundant) +
      " redundant slots/GPU, flat, replica rule " + locus::placement::to_string(o.main_rule) +
      ")\n\nOne domain is left out of the "
      "training split; the test split is simulated whole and restricted to the held-out domain. "
      "\"wa / rr\" is inter-node bytes with workload_aware over round_robin grouping on the same maps "
      "(target ≤ 1.05); capacity holds by construction (the simulator rejects a full rank).\n\n"
      "\"vs linear\" divides by linear / round-robin / flat on the same requests; \"linear max/mean\" is that "
      "baseline's GPU max/mean (shifted-traffic targets: mixed ≥ 20% lower at ≤ 1.15; held-out max/mean ≤ linear's, "
      "wa / rr ≤ 1). \"EPLB\" is the balance-only reference: EPLB with the same redundant slots, planned on the same "
      "training requests (the held-out domain unseen too), round-robin grouping, flat.\n\n"
      "| held out | test requests | wa / rr (all test) | wa / rr (held-out only) | GPU max/mean wa (all) "
      "| low-confidence fallbacks | vs linear (all) | vs linear (held-out) | GPU max/mean wa (held-out) "
      "| linear max/mean (held-out) | EPLB max/mean (all / held-out) "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|\n";
  doc["unseen_domain"] = nlohmann::json::array();
  const locus::dynamic_topology topo(4, 2);
  auto cfg = o.copt.simulation;
  cfg.topology = topo;
  for (std::uint32_t d = 0; d < train.domains().size(); ++d) {
    std::vector<std::size_t> keep;
    for (std::size_t r = 0; r < train.requests(); ++r)
      if (train.request(r).domain != d) keep.push_back(r);
    const auto partial = train.select_requests(keep);
    const auto held = test.select_domain(d);
    if (held.requests() == 0 || partial.requests() == 0) continue;
    const auto p = locus::placement::plan_activation_aware(partial, topo, "locality", o.unseen_redundant, popt);
    const auto lin = locus::placement::plan_activation_aware(partial, topo, "linear", 0, popt).maps;
    const auto eplb = locus::placement::plan_activation_aware(partial, topo, "eplb", o.unseen_redundant, popt).maps;
    double ratio[2] = {0, 0}, balance = 0, vs_linear[2] = {0, 0}, held_balance = 0, linear_balance = 0;
    double eplb_balance[2] = {0, 0};
    std::size_t low_conf = 0;
    for (int which = 0; which < 2; ++which) {
      const auto& t = which == 0 ? test : held;
      locus::grouper::workload_aware wa(p.model);
      locus::grouper::round_robin rr;
      const auto a = locus::cost::simulate_decode(t, p.maps, wa, cfg);
      const auto b = locus::cost::simulate_decode(t, p.maps, rr, cfg);
      ratio[which] = a.inter_node_bytes_per_token / b.inter_node_bytes_per_token;
      locus::grouper::round_robin rr_lin;
      const auto base = locus::cost::simulate_decode(t, lin, rr_lin, cfg);
      vs_linear[which] = a.inter_node_bytes_per_token / base.inter_node_bytes_per_token;
      locus::grouper::round_robin rr_eplb;
      eplb_balance[which] = locus::cost::simulate_decode(t, eplb, rr_eplb, cfg).gpu_imbalance_aggregate;
      if (which == 0)
        balance = a.gpu_imbalance_aggregate;
      else {
        low_conf = wa.stats().fallback_low_confidence;
        held_balance = a.gpu_imbalance_aggregate;
        linear_balance = base.gpu_imbalance_aggregate;
      }
    }
    char line[448];
    std::snprintf(line, sizeof line,
                  "| %s | %zu | %.3f | %.3f | %.3f | %zu of %zu | %.3f | %.3f | %.3f | %.3f | %.3f / %.3f |\n",
                  train.domains()[d].c_str(), held.requests(), ratio[0], ratio[1], balance, low_conf, held.requests(),
                  vs_linear[0], vs_linear[1], held_balance, linear_balance, eplb_balance[0], eplb_balance[1]);
    unseen += line;
    doc["unseen_domain"].push_back({{"held_out", train.domains()[d]},
                                    {"wa_over_rr_all", ratio[0]},
                                    {"wa_over_rr_held_out", ratio[1]},
                                    {"gpu_imbalance_aggregate", balance},
                                    {"low_confidence_fallbacks", low_conf},
                                    {"held_out_requests", held.requests()},
                                    {"vs_linear_all", vs_linear[0]},
                                    {"vs_linear_held_out", vs_linear[1]},
                                    {"gpu_imbalance_held_out", held_balance},
                                    {"linear_gpu_imbalance_held_out", linear_balance},
                                    {"eplb_gpu_imbalance_all", eplb_balance[0]},
                                    {"eplb_gpu_imbalance_held_out", eplb_balance[1]}});
  }
  return unseen;
}

// DIR/comm_volume.json and DIR/comm_volume.md, and the tables on standard output.
void write_outputs(const run_options& o, tool_cli::results_folder& folder, results& out, const std::string& summary,
                   double seconds, const std::string& command, const std::string& machine) {
  const auto& popt = o.copt.plan;
  out.doc["seconds"] = seconds;
  out.doc["command"] = command;
  out.doc["machine"] = machine;
  bench_output::files files; // the two together or neither
  files[folder.file("comm_volume.json")] << out.doc.dump(1) << '\n';
  auto& md = files[folder.file("comm_volume.md")];
  md << "# Communication volume on ESFT (test split)\n\nProduced by `" << command << "` (trace " << o.trace_path
     << ") in " << static_cast<int>(seconds + 0.5) << " s on " << machine
     << ". Fit on a training split of requests (seed " << o.seed
     << "), evaluated on the disjoint test split; prefill = "
     << "first " << o.prefill << " tokens of each request, decode = the rest; FP8 dispatch / BF16 combine of hidden "
     << o.hidden
     << "; 16 running requests per GPU. \"vs baseline\" divides by linear / round_robin / flat in the same "
        "topology, measured in the same run. GPU max/mean (aggregate) is per layer over the whole run, averaged over "
        "layers (expert rows); attention max/mean is the busiest GPU's context tokens of its running requests, summed "
        "over steps, over the mean (attention work and KV memory, which the targets do not bound). Time is the "
        "alpha-beta model's, not a measurement. "
     << (o.copt.plan_per_transport
             ? "`locality` is planned for the transport of its row (the token-level stage counts the copies "
               "that transport sends)"
             : "`locality` is planned once for both transports")
     << ", with " << popt.refine.anneal_per_expert
     << " annealing proposals per expert after the token-level sweeps. The 8x8 synthetic rows (256 experts, top-8, "
        "the synthesizer fitted to this trace and rescaled; ESFT's 26 layers kept) "
     << (o.synthetic ? "are measured with `--synthetic 1`, the default; `--synthetic 0` leaves them out"
                     : "are left out (`--synthetic 0`; the default, 1, measures them)")
     << ". Plot: `/usr/bin/python3 bench/plot_comm_volume.py " << tool_cli::shell_quote(o.out_dir)
     << "`.\n\n## Targets: inter-node bytes and GPU "
        "balance at 4x2\n\n"
     << summary
     << "\n## Under each engine's replica rule\n\nRows with a redundant slot per GPU, simulated on the same maps and "
        "requests under each replica rule (which replica of an expert receives a token's copy; docs/engines.md says "
        "which engine does what; "
        "without replicas every rule gives the same copies). Each cell: inter-node bytes reduction vs linear / "
        "round-robin / flat, then GPU max/mean (aggregate). locality_bounded avoids a GPU whose rows of the layer "
        "so far exceed (1 + "
     << o.replica_slack << ") × the mean.\n\n"
     << out.rules_md << "\n## All rows\n\n"
     << out.md;
  if (o.balance_floor)
    md << "\n## Balance floor\n\nThe lowest GPU max/mean (aggregate) any split of the test split's decode rows "
          "among each map's replicas reaches (placement::min_max_split, mean over layers). A row near its floor is "
          "plan-limited: only a different map lowers it. For locality rows with replicas, the worst floor over the "
          "balance hedge's draws of the training sample (placement::hedge_draw_floors, each layer's worst, mean over "
          "layers), and in how many layers the test split's floor is above it: a test mix the hedge could not see.\n\n"
       << out.floor_md;
  std::printf("%s", out.md.c_str());
  std::printf("\n%s", summary.c_str());
  files.commit();
  std::printf("\n%zu rows in %.1f s; wrote %s/comm_volume.{json,md}\n", out.doc["rows"].size(), seconds,
              o.out_dir.c_str());
}

} // namespace

int main(int argc, char** argv) try {
  run_options o;
  if (const auto code = parse_options(argc, argv, o)) return *code;
  auto folder = bench_args::output_folder(o.out_dir); // checked now, made when the first result is written
  const auto start = std::chrono::steady_clock::now();
  const std::string command = bench_args::command_line(argc, argv, "build/dev/bench/comm_volume");
  const std::string machine = bench_args::machine_line();
  const auto say = [&](const std::string& what) { bench_args::progress_line("comm_volume", what, start); };
  const auto full = bench_args::with_prefill(bench_args::load_trace(o.trace_path), o.prefill);
  auto [train, test] = locus::trace::split_by_request(full, 0.5, o.seed);
  if (o.fit_on_test) train = test; // upper-bound experiments only

  results out;
  out.doc = {{"trace", o.trace_path},
             {"split_seed", o.seed},
             {"prefill_tokens", o.prefill},
             {"hidden", o.hidden},
             {"replica_rule", locus::placement::to_string(o.main_rule)},
             {"replica_slack", o.replica_slack},
             {"replica_balance_slack", o.copt.plan.named.locality.replica_balance_slack},
             {"unseen_redundant_slots_per_gpu", o.unseen_redundant},
             {"clusters", o.clusters},
             {"train_requests", train.requests()},
             {"test_requests", test.requests()},
             {"rows", nlohmann::json::array()}};
  const auto rows = comparison_rows();
  for (const auto& tc : topologies(o.only)) {
    say("planning and simulating " + std::to_string(rows.size()) + " rows on " + std::to_string(tc.nodes) + "x" +
        std::to_string(tc.gpus));
    topology_table(tc, train, test, rows, o, out);
  }
  if (o.synthetic) {
    say("the synthetic 8x8 rows");
    synthetic_rows(full, o, out);
  }
  std::string summary = targets_table(out);
  say("leaving each domain out of training (4x2)");
  summary += unseen_domain_table(train, test, o, out.doc);
  // A run without the 4x2 rows has no figure (it reported 0.0%).
  out.doc["domain_accuracy_4x2"] = out.accuracy ? nlohmann::json(*out.accuracy) : nlohmann::json(nullptr);
  if (out.accuracy) {
    char acc[256];
    std::snprintf(acc, sizeof acc,
                  "\nDomain classification from the first %zu prefill tokens (nearest prefill class mean, %zu "
                  "clusters, cluster → majority training domain), ESFT test split: %.1f%%.\n",
                  static_cast<std::size_t>(o.prefill), static_cast<std::size_t>(o.clusters), 100 * *out.accuracy);
    summary += acc;
  }
  write_outputs(o, folder, out, summary,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), command, machine);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "comm_volume: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
