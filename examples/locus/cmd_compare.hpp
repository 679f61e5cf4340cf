#pragma once
// `locus compare`: the project's main job on any trace. The maps of the baselines (linear,
// round_robin, eplb), the published method (activation_usage placement + workload_aware
// grouping) and locus's locality planner (with and without replicas) are fitted on a training
// split of the requests; decode is simulated on the disjoint test split for each transport
// asked for, and the inter-node bytes are compared with linear / round_robin on the first
// transport. Without --trace it runs on an embedded synthetic trace (what scripts/demo shows).
// The defaults are bench/comm_volume's, so `locus compare --trace ../shared/traces/esft`
// reproduces the README's headline rows.
#include "cmd_plan.hpp"
#include "output.hpp"

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <locus/core/atomic_file.hpp>
#include <locus/cost/comparison.hpp>
#include <locus/cost/simulation_json.hpp>
#include <locus/locus.hpp>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace locus_driver {

namespace compare_detail {

// The embedded default: requests of 4 kinds with 16 prefill + 16..80 decode tokens; a kind routes
// with probability 0.6 into its own block of experts (rotating with the layer), otherwise
// uniformly. Phases are recorded (the first 16 tokens of each request are prefill).
inline locus::trace::trace synthetic_trace(std::size_t requests, std::uint64_t seed) {
  const std::size_t experts = 64, k = 6, layers = 8, kinds = 4, prefill = 16;
  locus::trace::trace_builder b(experts, k, layers);
  b.set_domains({"kind0", "kind1", "kind2", "kind3"});
  locus::trace::detail::splitmix64 g(seed);
  std::vector<std::pair<std::size_t, std::size_t>> spans; // (first token, length)
  std::vector<std::size_t> kind;
  for (std::size_t r = 0; r < requests; ++r) {
    kind.push_back(static_cast<std::size_t>(g.below(kinds)));
    const std::size_t len = prefill + 16 + static_cast<std::size_t>(g.below(65));
    spans.emplace_back(b.tokens(), len);
    b.add_request(r, static_cast<std::uint32_t>(kind.back()), len);
  }
  const std::size_t block = experts / kinds;
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t r = 0; r < requests; ++r)
      for (std::size_t t = spans[r].first; t < spans[r].first + spans[r].second; ++t) {
        auto ids = b.ids(l, t);
        for (std::size_t j = 0; j < k; ++j) {
          std::size_t e;
          bool fresh;
          do {
            e = g.uniform() < 0.6 ? (kind[r] * block + g.below(block) + 5 * l) % experts : g.below(experts);
            fresh = true;
            for (std::size_t i = 0; i < j; ++i)
              fresh &= ids[i] != e;
          } while (!fresh);
          ids[j] = static_cast<locus::trace::trace_expert_id>(e);
          b.weights(l, t)[j] = 1.0f / static_cast<float>(k);
        }
      }
  return b.build().with_prefill_tokens(prefill);
}

//! "baseline", "paper" or "locus": who proposed the row's configuration.
inline const char* method_of(const locus::cost::comparison_row& r) {
  if (r.placement == "locality") return "locus";
  if (r.placement == "activation_usage") return "paper";
  return "baseline";
}

//! Parses "flat,hierarchical" (each once, in the order given).
inline std::vector<locus::transport_kind> parse_transports(const std::string& list) {
  std::vector<locus::transport_kind> out;
  // getline drops a trailing empty item: "flat," would pass as "flat".
  LOCUS_REQUIRE(list.empty() || (list.front() != ',' && list.back() != ',' && list.find(",,") == std::string::npos),
                locus::config_error, "an empty transport in \"", list,
                "\" (expected flat, hierarchical or flat,hierarchical)");
  std::stringstream in(list);
  for (std::string name; std::getline(in, name, ',');) {
    LOCUS_REQUIRE(name == "flat" || name == "hierarchical", locus::config_error, "unknown transport \"", name,
                  "\" in \"", list, "\" (expected flat, hierarchical or flat,hierarchical)");
    const auto k = locus::parse_transport_kind(name);
    for (const auto seen : out)
      LOCUS_REQUIRE(seen != k, locus::config_error, "\"", list, "\" names ", name, " twice");
    out.push_back(k);
  }
  LOCUS_REQUIRE(!out.empty(), locus::config_error, "no transport (expected flat, hierarchical or flat,hierarchical)");
  return out;
}

//! The rows compared for each transport: linear, round_robin and eplb (with `redundant` replica
//! slots per GPU) under round-robin grouping; activation_usage + workload_aware; locality +
//! workload_aware without and (when `redundant` > 0) with replicas.
inline std::vector<locus::cost::comparison_row> rows_for(const std::vector<locus::transport_kind>& transports,
                                                         std::size_t redundant) {
  std::vector<locus::cost::comparison_row> rows;
  for (const auto t : transports) {
    rows.push_back({"linear", 0, "round_robin", t});
    rows.push_back({"round_robin", 0, "round_robin", t});
    rows.push_back({"eplb", redundant, "round_robin", t});
    rows.push_back({"activation_usage", 0, "workload_aware", t});
    rows.push_back({"locality", 0, "workload_aware", t});
    if (redundant > 0) rows.push_back({"locality", redundant, "workload_aware", t});
  }
  return rows;
}

inline nlohmann::json number_or_null(double v) {
  if (std::isfinite(v)) return v;
  return nullptr;
}

// Draws the comparison as a bar chart: inter-node bytes over the baseline per row, GPU max/mean
// below it (rr / ll / wa: the round_robin, least_loaded, workload_aware groupers; +N: replica
// slots per GPU). Read from stdin by the interpreter: argv[1] the JSON document, argv[2] the PNG.
inline constexpr const char* plot_script = R"py(import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
doc = json.load(open(sys.argv[1]))
rows = doc["rows"]
short = {"round_robin": "rr", "least_loaded": "ll", "workload_aware": "wa", "flat": "flat", "hierarchical": "hier."}
labels = ["%s%s\n%s\n%s" % (r["placement"], " +%d" % r["redundant_slots_per_gpu"] if r["redundant_slots_per_gpu"] else "", short[r["grouper"]], short[r["transport"]]) for r in rows]
colors = {"baseline": "#999999", "paper": "#4c72b0", "locus": "#dd8452"}
fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows)), 7), sharex=True)
x = range(len(rows))
ratio = [r["inter_node_bytes_vs_baseline"] if r["inter_node_bytes_vs_baseline"] is not None else 0 for r in rows]
a.bar(x, ratio, color=[colors[r["method"]] for r in rows])
a.axhline(1.0, color="black", linewidth=0.8)
a.set_ylabel("inter-node bytes\nvs " + doc["baseline"])
for i, v in enumerate(ratio):
    a.text(i, v, "%.3f" % v, ha="center", va="bottom", fontsize=8)
b.bar(x, [r["gpu_imbalance_aggregate"] for r in rows], color=[colors[r["method"]] for r in rows])
b.axhline(1.0, color="black", linewidth=0.8)
b.set_ylabel("GPU max/mean\n(aggregate)")
b.set_xticks(list(x))
b.set_xticklabels(labels, fontsize=7)
a.set_title("%s: %d x %d GPUs, fitted on %d requests, simulated on %d" % (doc["trace"], doc["nodes"], doc["gpus_per_node"], doc["train_requests"], doc["test_requests"]), fontsize=9)
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
a.legend(handles, list(colors.keys()), fontsize=8, loc="lower left")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
)py";

//! Refuses --png before any work when the interpreter or matplotlib is missing.
inline void check_python(const std::string& python) {
  std::error_code ec;
  LOCUS_REQUIRE(std::filesystem::exists(python, ec), locus::io_error, "--png needs Python 3 with matplotlib: ", python,
                " does not exist (install python3-matplotlib, or name an interpreter with --python)");
  const std::string probe = shell_quote(python) + " -c 'import matplotlib' >/dev/null 2>&1";
  LOCUS_REQUIRE(std::system(probe.c_str()) == 0, locus::io_error, "--png needs Python 3 with matplotlib: ", python,
                " cannot import matplotlib (install python3-matplotlib, or name another interpreter with --python)");
}

//! Renders `doc` through `python` and returns the PNG's bytes (`png` names it in messages). Python
//! draws into a folder of its own under the temporary directory; the caller writes the image as
//! every other output is (output_set): through a symbolic link to the file it names, and into a
//! device or FIFO (`--png /dev/null`) rather than over it (a rename put the PNG in the place of the
//! device node, and of the link).
inline std::string render_png(const std::string& python, const nlohmann::json& doc, const std::string& png) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string dir = (fs::temp_directory_path(ec) / "locus-compare-XXXXXX").string();
  if (ec || ::mkdtemp(dir.data()) == nullptr)
    LOCUS_THROW(locus::io_error, "cannot draw ", png, ": no temporary folder can be made");
  struct remove_folder {
    std::string dir;
    ~remove_folder() {
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } cleanup{dir};
  const fs::path data = fs::path(dir) / "compare.json", image = fs::path(dir) / "compare.png";
  locus::write_file_atomically(data.string(), doc.dump(1, ' ', false, nlohmann::json::error_handler_t::replace));
  const std::string command =
      shell_quote(python) + " - " + shell_quote(data.string()) + " " + shell_quote(image.string());
  FILE* p = ::popen(command.c_str(), "w");
  int rc = -1;
  if (p) {
    std::fputs(plot_script, p);
    rc = ::pclose(p);
  }
  std::ifstream in(image, std::ios::binary);
  LOCUS_REQUIRE(rc == 0 && in, locus::io_error, "drawing ", png, " with ", python, " failed (exit status ",
                exit_status(rc), ")");
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LOCUS_REQUIRE(!in.bad() && !bytes.empty(), locus::io_error, "drawing ", png, " with ", python,
                " failed: the figure could not be read back");
  return bytes;
}

} // namespace compare_detail

struct compare_options {
  std::size_t redundant = 1, batch_per_rank = 16, hidden = 2048, clusters = 8, anneal = 300;
  std::size_t redundant_experts = 0;
  bool redundant_experts_given = false; // --redundant-experts: a total, made per GPU once the experts are known
  double expert_read_us = 0;
  std::size_t hedge_replicas = locus::placement::token_refine_options{}.hedge_replicas;
  double fill_slack = 0;
  double hedge_class_spread = 0;
  double hedge_cost_budget = locus::placement::token_refine_options{}.hedge_cost_budget;
  std::size_t synthetic_requests = 400;
  std::size_t balance_window = 0;
  double arrival_rate = 0;
  std::string transports = "flat,hierarchical", replica_rule = "locality_first";
  std::string json, markdown, png, python = "/usr/bin/python3";
};

inline void run_compare(const split_options& split, const compare_options& o, bool synthetic_count_given) {
  namespace cd = compare_detail;
  progress p("locus compare");
  const auto topo = split.topology(); // an impossible topology is refused before the trace is read
  const auto transports = cd::parse_transports(o.transports);
  const auto replica_rule = locus::placement::parse_replica_rule(o.replica_rule);
  if (!o.png.empty()) cd::check_python(o.python);
  check_outputs({{"--json", o.json}, {"--markdown", o.markdown}, {"--png", o.png}}, split.input_paths());
  LOCUS_REQUIRE(!synthetic_count_given || split.trace_paths.empty(), locus::config_error,
                "--synthetic-requests sizes the embedded trace; it cannot be used with --trace");
  std::string trace_name;
  locus::trace::trace train, test;
  if (split.trace_paths.empty()) {
    p.start("making the embedded synthetic trace");
    const auto full = with_prefill(cd::synthetic_trace(o.synthetic_requests, split.split_seed), split.prefill_tokens,
                                   split.prefill_opt->count() > 0);
    trace_name = "synthetic (" + std::to_string(full.requests()) + " requests of 4 kinds, 64 experts, top-6, 8 layers)";
    std::tie(train, test) = apply_split(full, split, true, true, trace_name);
  } else {
    p.start("loading " + split.trace_name());
    std::tie(train, test) = split.load(true, true);
    trace_name = split.trace_name();
  }
  p.done();
  require_decode_tokens(test, trace_name, split.prefill_tokens);
  require_simulation_memory(topo, test.experts());
  require_prefill_and_decode(train, trace_name, split.prefill_tokens,
                             "compare's workload-aware grouping (its activation_usage and locality rows)");

  locus::cost::comparison_options opt;
  opt.plan.grouping.clusters = o.clusters;
  opt.plan.grouping.seed = split.split_seed;
  opt.plan.grouping.prefill_tokens =
      std::max<std::size_t>(1, split.prefill_tokens); // a cap; recorded phases may have more
  opt.plan.refine.anneal_per_expert = o.anneal;
  opt.plan.refine.hedge_replicas = o.hedge_replicas;
  opt.plan.refine.fill_slack = o.fill_slack;
  opt.plan.refine.hedge_class_spread = o.hedge_class_spread;
  opt.plan.refine.hedge_cost_budget = o.hedge_cost_budget;
  opt.simulation.topology = topo;
  opt.simulation.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(o.hidden);
  opt.simulation.links.expert_read_us = o.expert_read_us;
  opt.simulation.batch_per_rank = o.batch_per_rank;
  opt.simulation.arrival_rate = o.arrival_rate;
  opt.simulation.seed = split.split_seed;
  opt.simulation.replica_rule = replica_rule;
  opt.simulation.balance_window = o.balance_window;
  const std::size_t redundant =
      o.redundant_experts_given
          ? locus::placement::redundant_slots_for_total(train.experts(), topo.ranks(), o.redundant_experts)
          : o.redundant;
  const auto rows = cd::rows_for(transports, redundant);
  const auto start = std::chrono::steady_clock::now();
  const auto cmp =
      locus::cost::compare(train, test, rows, opt, [&](std::size_t done, std::size_t total, const std::string& what) {
        p.step(done, total, what);
      });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  p.clear();

  const std::string baseline = std::string("linear/round_robin/") + locus::to_string(transports.front());
  nlohmann::json doc = {{"trace", trace_name},
                        {"nodes", topo.nodes()},
                        {"gpus_per_node", topo.gpus_per_node()},
                        {"train_requests", train.requests()},
                        {"test_requests", test.requests()},
                        {"split_seed", split.split_seed},
                        {"test_fraction", split.test_fraction},
                        {"prefill_tokens", split.prefill_tokens},
                        {"batch_per_rank", o.batch_per_rank},
                        {"hidden", o.hidden},
                        {"expert_read_us", o.expert_read_us},
                        {"clusters", o.clusters},
                        {"anneal_per_expert", o.anneal},
                        {"arrival_rate", o.arrival_rate},
                        {"balance_window", o.balance_window},
                        {"replica_rule", locus::placement::to_string(replica_rule)},
                        {"baseline", baseline},
                        {"seconds", seconds},
                        {"run", this_run().to_json()},
                        {"rows", nlohmann::json::array()}};
  for (const auto& e : cmp.rows) {
    auto j = locus::cost::simulation_summary_json(e.result, &cmp.rows.front().result);
    j["method"] = cd::method_of(e.row);
    j["placement"] = e.row.placement;
    j["redundant_slots_per_gpu"] = e.row.redundant;
    j["grouper"] = e.row.grouper;
    j["transport"] = locus::to_string(e.row.transport);
    j["inter_node_bytes_vs_baseline"] = cd::number_or_null(e.vs_baseline);
    doc["rows"].push_back(j);
  }

  // The table: the headline figures of bench/comm_volume's "Targets" table, at its precision.
  const auto line = [&](const locus::cost::comparison_entry& e, bool md) {
    char buf[400];
    const auto& r = e.result;
    const std::string red = std::to_string(e.row.redundant);
    // One node sends nothing over the network: no ratio, no reduction ("n/a").
    const double reduction = 100 * (1 - e.vs_baseline);
    const std::string reduction_text = std::isfinite(reduction) ? fixed(reduction, 1) + "%" : "n/a";
    // The window column only where --balance-window asks for it.
    char window[32] = "";
    if (o.balance_window) std::snprintf(window, sizeof window, md ? " %.3f |" : " %9.3f", r.gpu_imbalance_window);
    std::snprintf(buf, sizeof buf,
                  md ? "| %s | %s | %s | %s | %s | %.0f | %s | %s | %.3f | %.3f |%s %.3f | %.2f |\n"
                     : "%-8s %-16s %4s %-14s %-12s %11.0f %8s %9s %9.3f %9.3f%s %9.3f %9.2f\n",
                  cd::method_of(e.row), e.row.placement.c_str(), red.c_str(), e.row.grouper.c_str(),
                  locus::to_string(e.row.transport), r.inter_node_bytes_per_token, fixed(e.vs_baseline, 3).c_str(),
                  reduction_text.c_str(), r.gpu_imbalance_aggregate, r.gpu_imbalance_step_weighted, window,
                  r.attention_imbalance, r.layer_time_estimate_us);
    return std::string(buf);
  };
  char head[1024];
  std::snprintf(head, sizeof head,
                "%s: fitted on %zu requests, simulated on the other %zu; %zu nodes x %zu GPUs, %zu running requests "
                "per GPU, FP8 dispatch / BF16 combine of hidden %zu; locality anneals %zu proposals per expert; "
                "time model: %s",
                trace_name.c_str(), train.requests(), test.requests(), topo.nodes(), topo.gpus_per_node(),
                o.batch_per_rank, o.hidden, o.anneal,
                o.expert_read_us > 0 ? (fixed(o.expert_read_us, 2) + " us per expert weight read").c_str()
                                     : "expert weight reads not counted");
  // "1 step", "200 steps": the window's size as the legend and the Markdown header say it.
  const std::string window_steps =
      std::to_string(o.balance_window) + (o.balance_window == 1 ? " simulated step" : " simulated steps");
  const std::string legend =
      "net B/token: network bytes per decode token over all layers; vs base: over " + baseline +
      "; GPU max/mean: expert rows of the busiest GPU over the mean, per layer over the run (aggregate) and "
      "per step (step: each step's busiest GPU, weighted by the step's rows: what the run's expert time follows where "
      "rows decide it, a step waiting for its busiest GPU)" +
      (o.balance_window ? " and over windows of " + window_steps +
                              " (win: the loads summed over each window, weighted by its rows: a load that drifts "
                              "over many steps stays high there, jitter from step to step does not)"
                        : std::string()) +
      "; attn max/mean: the busiest GPU's "
      "attended context tokens over the mean; layer us: the time model's layer time (latency + bytes over "
      "bandwidth + the busiest GPU's expert time: its rows, or its experts' weight reads where --expert-read-us makes "
      "them longer), mean over steps: a model, not a measurement.";
  if (!stdout_taken({o.json, o.markdown, o.png})) {
    const char* window_head = o.balance_window ? "   win m/m" : ""; // its size is in the legend
    std::printf("%s\n\n%-8s %-16s %4s %-14s %-12s %11s %8s %9s %9s %9s%s %9s %9s\n", head, "method", "placement",
                "red.", "grouper", "transport", "net B/token", "vs base", "reduction", "GPU m/m", "step m/m",
                window_head, "attn m/m", "layer us");
    for (const auto& e : cmp.rows)
      std::printf("%s", line(e, false).c_str());
    std::printf("\n%s\n%zu rows in %.1f s\n", legend.c_str(), cmp.rows.size(), seconds);
  }
  // The JSON, the Markdown and the figure are put in place together or not at all: a drawing that
  // fails leaves the files of an earlier run as they were.
  output_set files;
  files.add_json(o.json, "compare", doc);
  if (!o.markdown.empty()) {
    const auto& run = this_run();
    std::string md = "# locus compare\n\n" + std::string(head) + ".\n\nProduced by `" + run.command + "` on " +
                     run.date + " (" + run.machine() + ") in " + fixed(seconds, 1) + " s.\n\n" + legend +
                     "\n\n| method | placement | redundant/GPU | grouper | transport | inter-node B/token | vs " +
                     baseline + " | reduction | GPU max/mean (aggregate) | GPU max/mean (step, by rows) |" +
                     (o.balance_window ? " GPU max/mean (" + window_steps + ") |" : std::string()) +
                     " attention max/mean | layer time µs (model) |\n"
                     "|---|---|---|---|---|---|---|---|---|---|" +
                     (o.balance_window ? "---|" : "") + "---|---|\n";
    for (const auto& e : cmp.rows)
      md += line(e, true);
    files.add(o.markdown, md);
  }
  if (!o.png.empty()) {
    p.start("drawing " + o.png);
    files.add(o.png, cd::render_png(o.python, doc, o.png));
    p.done();
    p.clear();
  }
  files.commit();
}

inline void register_compare(CLI::App& app) {
  auto split = std::make_shared<split_options>();
  auto o = std::make_shared<compare_options>();
  auto* cmd = app.add_subcommand(
      "compare", "Compare the baselines, the published method and locality (with and without replicas, flat and "
                 "hierarchical) on a trace: fit on its training split, simulate decode on its test split");
  split->add_to(cmd, false)->description(std::string(trace_help) + " (default: an embedded synthetic trace)");
  cmd->add_option("--experts", split->experts, experts_help)->check(experts_range())->default_str(experts_default);
  cmd->add_option("--redundant-slots,--redundant", o->redundant,
                  "Replica slots per GPU of the replica rows, eplb's and locality's (0: no replica rows; the eplb "
                  "baseline without replicas stays); EPLB's and vLLM's num_redundant_experts is this x GPUs where the "
                  "experts divide evenly, or give that total as --redundant-experts");
  auto* redundant_experts =
      locus_driver::plan_options::add_redundant_experts(cmd, o->redundant_experts, "--redundant-slots");
  // Checked while parsing, so a bad list is a usage error (exit 2) as a bad --replica-rule is.
  cmd->add_option("--transport", o->transports, "Transports compared, comma-separated: flat, hierarchical")
      ->check(tool_cli::parsed_by(compare_detail::parse_transports, ""));
  cmd->add_option("--replica-rule", o->replica_rule,
                  "How a copy picks among an expert's replicas, in planning and simulation: locality_first (locus), "
                  "same_gpu_else_random (SGLang static dispatch), random (vLLM EPLB), locality_bounded (locality "
                  "first, away from GPUs above the load bound)")
      ->check(CLI::IsMember(tool_cli::names_of(locus::placement::all_replica_rules)));
  cmd->add_option("--batch-per-rank", o->batch_per_rank, "Running requests per rank (GPU)")
      ->check(tool_cli::positive_whole);
  cmd->add_option(
         "--hidden", o->hidden,
         "Hidden size (message sizes: FP8 dispatch, BF16 combine); the default is DeepSeek-V2-Lite's, the ESFT traces' "
         "model (DeepSeek-V3: 7168, Qwen3-235B: 4096, Llama 4: 5120)")
      ->check(CLI::Range(std::size_t{1}, max_hidden));
  cmd->add_option("--expert-read-us", o->expert_read_us, locus_driver::expert_read_help)
      ->check(tool_cli::number_in(0.0, locus::cost::max_expert_read_us));
  cmd->add_option("--clusters", o->clusters,
                  "Request clusters of the workload-aware model (at most one per training request)")
      ->check(tool_cli::positive_whole);
  cmd->add_option("--anneal", o->anneal, "locality: annealing proposals per expert after the token-level sweeps")
      ->check(anneal_range());
  cmd->add_option("--hedge-replicas", o->hedge_replicas, locus_driver::hedge_replicas_help)->default_str("one per GPU");
  cmd->add_option("--fill-slack", o->fill_slack, locus_driver::fill_slack_help)->check(tool_cli::finite_non_negative);
  locus_driver::plan_options::add_hedge_options(cmd, o->hedge_class_spread, o->hedge_cost_budget);
  cmd->add_option("--arrival-rate", o->arrival_rate, "Poisson arrivals per step (0: all at once)")
      ->check(tool_cli::finite_non_negative);
  cmd->add_option("--balance-window", o->balance_window, locus_driver::balance_window_help);
  auto* synthetic = cmd->add_option("--synthetic-requests", o->synthetic_requests,
                                    "Without --trace: requests in the embedded synthetic trace")
                        ->check(CLI::Range(8, 100000));
  add_json_option(cmd, o->json);
  cmd->add_option("--markdown", o->markdown, "Also write the table as Markdown to this file")
      ->default_str("not written");
  cmd->add_option("--png", o->png, "Also draw the comparison as a PNG (needs Python 3 with matplotlib)")
      ->default_str("not drawn");
  cmd->add_option("--python", o->python, "Python interpreter with matplotlib, for --png");
  cmd->callback([cmd, split, o, synthetic, redundant_experts] {
    o->redundant_experts_given = redundant_experts->count() > 0;
    const bool replica_rows = o->redundant_experts_given ? o->redundant_experts > 0 : o->redundant > 0;
    // The replica options shape the locality rows' replica slots and hedges: refused where they
    // would shape nothing (0 turns a hedge option off, as plan accepts it anywhere).
    const auto given = [cmd](const char* name) { return cmd->count(name) > 0; };
    const bool spread = given("--hedge-class-spread") && o->hedge_class_spread > 0;
    const bool hedges_asked = given("--hedge-replicas") && o->hedge_replicas > 0;
    const bool hedges_off = given("--hedge-replicas") && o->hedge_replicas == 0;
    for (const auto& [name, used] :
         {std::pair{"--fill-slack", given("--fill-slack")}, std::pair{"--hedge-replicas", hedges_asked},
          std::pair{"--hedge-class-spread", spread}, std::pair{"--hedge-cost-budget", given("--hedge-cost-budget")}})
      LOCUS_REQUIRE(!used || replica_rows, locus::config_error, name,
                    " shapes the locality rows' replica slots: --redundant 0 compares none");
    for (const auto& [name, used] :
         {std::pair{"--hedge-class-spread", spread}, std::pair{"--hedge-cost-budget", given("--hedge-cost-budget")}})
      LOCUS_REQUIRE(!used || !hedges_off, locus::config_error, name,
                    " shapes the balance hedges, which --hedge-replicas 0 turns off");
    run_compare(*split, *o, synthetic->count() > 0);
  });
}

} // namespace locus_driver
