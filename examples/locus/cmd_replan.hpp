#pragma once
// `locus map replan`: re-plan a saved map on a window of recorded routing, under a migration budget.
#include "output.hpp"
#include "split.hpp"
#include "tool_cli.hpp"
#include "trace_input.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <iterator>
#include <locus/core/expert_map_json.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/live_replan_json.hpp>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace locus_driver {

struct replan_options {
  std::string map_path, homes, grouping, out, json;
  std::vector<std::string> window_paths, prior_paths;
  std::size_t experts = 0, prefill_tokens = 32, gpus_per_node = 0;
  bool split_on_restart = false, strict_layers = false;
  std::string transport = "flat", replica_rule = "locality_first";
  locus::placement::live_replan_options live{};
  CLI::Option* prefill_opt = nullptr;
  CLI::Option* prior_requests_opt = nullptr;
  CLI::Option* budget_opt = nullptr;
};

// The node of each request of `t`: its rank in `homes` (request key → rank), else its class's node
// under `model`, else the nodes in turn.
inline std::vector<std::uint32_t> request_nodes(const locus::trace::trace& t,
                                                const std::map<std::string, std::size_t>* homes,
                                                const locus::grouper::workload_model* model,
                                                const locus::dynamic_topology& topo, std::size_t prefill_tokens,
                                                const std::string& what) {
  std::vector<std::uint32_t> nodes(t.requests());
  if (homes) {
    for (std::size_t r = 0; r < t.requests(); ++r) {
      const auto it = homes->find(t.request_key(r));
      LOCUS_REQUIRE(
          it != homes->end(), locus::config_error, "--homes lists no rank for request ", t.request_label(r), " of ",
          what, t.has_request_names() ? " (its requests are named by their logged req_id strings, not numbered)" : "");
      nodes[r] = static_cast<std::uint32_t>(topo.node_of(it->second));
    }
    return nodes;
  }
  return locus::placement::assumed_request_nodes(t, model, topo.nodes(), prefill_tokens);
}

// `--homes FILE`: pairs of request and rank, a request named as `window` names its requests
// (trace::request_key: its id, or its logged name where the trace has names).
inline std::map<std::string, std::size_t> read_homes(const std::string& path, std::size_t ranks,
                                                     const locus::trace::trace& window) {
  const auto v = detail::read_listed_entries(path, "--homes");
  detail::note_numerals_as_names(window, v, "--homes", 2);
  LOCUS_REQUIRE(v.size() % 2 == 0, locus::config_error, "--homes ", path, ": ", v.size(),
                " entries, expected pairs of request and rank");
  std::map<std::string, std::size_t> out;
  for (std::size_t i = 0; i < v.size(); i += 2) {
    const auto key = detail::listed_request(window, v[i], path, "--homes");
    const auto rank = detail::listed_number(v[i + 1], path, "--homes", "a rank");
    const std::string who = window.key_label(key);
    LOCUS_REQUIRE(rank < ranks, locus::config_error, "--homes ", path, ":", v[i + 1].line, ": request ", who,
                  " on rank ", rank, ", but the plan has ", ranks, " ranks");
    const auto [it, fresh] = out.emplace(key, static_cast<std::size_t>(rank));
    LOCUS_REQUIRE(fresh || it->second == rank, locus::config_error, "--homes ", path, ":", v[i].line, ": request ", who,
                  " is on rank ", it->second, " and on rank ", rank);
  }
  return out;
}

inline int map_replan(const replan_options& o) {
  // The window and the prior are inputs too: `--out window.bin` replaced the trace it re-planned on.
  // ("-" is standard input, not a file named "-").
  std::vector<std::string> inputs{o.map_path, o.homes, o.grouping};
  for (const auto* paths : {&o.window_paths, &o.prior_paths})
    std::copy_if(paths->begin(), paths->end(), std::back_inserter(inputs), [](const auto& p) { return p != "-"; });
  check_outputs({{"--out", o.out}, {"--json", o.json}}, inputs);
  const auto reads_stdin = [](const std::vector<std::string>& paths) {
    return std::find(paths.begin(), paths.end(), "-") != paths.end();
  };
  LOCUS_REQUIRE(!reads_stdin(o.window_paths) || !reads_stdin(o.prior_paths), locus::config_error,
                "--trace - and --prior - both read standard input: give one of them a file");
  // Options that would change nothing are refused, not dropped without a word.
  LOCUS_REQUIRE(!o.prior_paths.empty() || o.prior_requests_opt->count() == 0, locus::config_error,
                "--prior-requests applies with --prior (the traffic the map was fitted to)");
  LOCUS_REQUIRE(o.grouping.empty() || o.homes.empty() || !o.prior_paths.empty(), locus::config_error,
                "--grouping gives the nodes of requests --homes does not list: with --homes it applies to --prior's "
                "requests only, and there is no --prior");
  auto plan = locus::load_expert_plan(o.map_path);
  auto live = o.live;
  if (o.budget_opt->count() == 0) live.budget_share = locus::placement::default_budget_for(plan.maps);
  locus::placement::require_movable_budget(live.budget_share, plan.maps, "--budget");
  const std::size_t ranks = plan.maps.front().ranks();
  LOCUS_REQUIRE(o.gpus_per_node == 0 || plan.gpus_per_node == 0 || o.gpus_per_node == plan.gpus_per_node,
                locus::config_error, "--gpus-per-node ", o.gpus_per_node, ": the plan in ", o.map_path,
                " was made for ", plan.gpus_per_node, " GPUs per node");
  const std::size_t gpus = o.gpus_per_node ? o.gpus_per_node : plan.gpus_per_node;
  LOCUS_REQUIRE(gpus > 0, locus::config_error, "the plan in ", o.map_path,
                " does not say how many GPUs a node has: give --gpus-per-node");
  LOCUS_REQUIRE(ranks % gpus == 0, locus::config_error, "--gpus-per-node ", gpus, " does not divide the plan's ", ranks,
                " ranks");
  const locus::dynamic_topology topo{ranks / gpus, gpus};
  const auto read = [&](const std::vector<std::string>& paths) {
    jsonl_reading how;
    how.experts = o.experts;
    how.split_on_restart = o.split_on_restart;
    how.strict_layers = o.strict_layers;
    return with_prefill(load_trace(paths, how), o.prefill_tokens, o.prefill_opt->count() > 0);
  };
  const auto window = read(o.window_paths);
  const std::string window_name = o.window_paths.front();
  require_decode_tokens(window, window_name, o.prefill_tokens, "the window", "to re-plan on");
  std::shared_ptr<const locus::grouper::workload_model> model;
  if (!o.grouping.empty()) {
    model = std::make_shared<const locus::grouper::workload_model>(locus::grouper::load_grouping(o.grouping));
    LOCUS_REQUIRE(model->nodes() == topo.nodes(), locus::config_error, "the grouping in ", o.grouping, " is for ",
                  model->nodes(), " nodes; the plan has ", topo.nodes());
  }
  locus::placement::require_replan_shape(plan.maps, window, topo, plan.model_layers);
  std::map<std::string, std::size_t> homes;
  if (!o.homes.empty()) homes = read_homes(o.homes, ranks, window);
  const auto window_nodes = request_nodes(window, o.homes.empty() ? nullptr : &homes, model.get(), topo,
                                          o.prefill_tokens, "the window " + window_name);
  std::optional<locus::trace::trace> prior;
  std::vector<std::uint32_t> prior_nodes;
  if (!o.prior_paths.empty()) {
    prior = read(o.prior_paths);
    locus::placement::require_replan_shape(plan.maps, *prior, topo, plan.model_layers, "prior");
    require_decode_tokens(*prior, o.prior_paths.front(), o.prefill_tokens, "the prior", "to steer the re-plan");
    prior_nodes = request_nodes(*prior, nullptr, model.get(), topo, o.prefill_tokens, "the prior");
  }
  live.copies = locus::placement::parse_copy_count(o.transport);
  live.replicas = locus::placement::parse_replica_rule(o.replica_rule);
  const auto r = locus::placement::replan_live(plan.maps, window, window_nodes, topo, live, prior ? &*prior : nullptr,
                                               prior_nodes);
  plan.maps = r.maps;
  if (plan.gpus_per_node == 0) plan.gpus_per_node = gpus;
  output_set files; // the map and its JSON together or not at all
  files.add(o.out, locus::expert_plan_text(plan));
  auto doc = locus::placement::live_replan_json(r, plan.model_layers);
  doc["map"] = o.map_path;
  doc["out"] = o.out;
  doc["window"] = window_name;
  doc["homes"] = !o.homes.empty() ? "homes" : model ? "grouping" : "round_robin";
  doc["transport"] = o.transport;
  doc["replica_rule"] = o.replica_rule;
  files.add_json(o.json, "map replan", std::move(doc));
  files.commit();
  if (stdout_taken({o.json, o.out})) return 0;
  std::printf("%s: %zu of %zu slots budgeted moved (%.1f%% of all slots", one_line(o.out).c_str(), r.moves.size(),
              r.budget_slots, 100 * r.moved_share);
  if (r.bytes_moved) { // in the unit that shows it: a few small experts are megabytes
    const double b = static_cast<double>(r.bytes_moved);
    if (b >= 1e9)
      std::printf(", %.2f GB of weights", b / 1e9);
    else if (b >= 1e6)
      std::printf(", %.2f MB of weights", b / 1e6);
    else
      std::printf(", %.0f bytes of weights", b);
  }
  std::printf(")\non the window (%zu requests, %zu decode tokens): inter-node copies per token %.3f -> %.3f, GPU "
              "max/mean floor %.3f -> %.3f\n",
              r.window_requests, r.window_decode_tokens, r.copies_per_token_before, r.copies_per_token_after,
              r.balance_floor_before, r.balance_floor_after);
  return 0;
}

inline void register_map_replan(CLI::App* map_cmd) {
  auto o = std::make_shared<replan_options>();
  auto* cmd = map_cmd->add_subcommand(
      "replan", "Re-plan a saved map on a window of recorded routing, moving at most a share of the slots");
  cmd->add_option("file", o->map_path, "Expert map JSON in service")->required()->check(CLI::ExistingFile);
  cmd->add_option("--trace", o->window_paths,
                  "The window: recorded routing of the traffic to re-plan on. " + std::string(trace_help))
      ->required();
  cmd->add_option("--out", o->out, "Output expert map JSON")->required();
  o->budget_opt =
      cmd->add_option("--budget", o->live.budget_share, "Share of all slots (all layers) whose weights may change")
          ->check(tool_cli::number_in(0, 1))
          ->default_str("0.1 (at least a pair of slots)");
  cmd->add_option("--homes", o->homes,
                  "Where the window's requests ran: a file of request id and rank pairs (whitespace or commas, # "
                  "comments; a window whose req_ids were strings names its requests as logged, in double quotes "
                  "(a JSON string) where they hold a space, tab, comma, # or quote)")
      ->check(CLI::ExistingFile)
      ->default_str("the grouping's nodes, else the nodes in turn");
  cmd->add_option("--grouping", o->grouping,
                  "Grouping model saved with the plan: a request whose prefill its classes recognise runs on its "
                  "class's node, the others on the nodes in turn")
      ->check(CLI::ExistingFile)
      ->default_str("none: the nodes in turn");
  cmd->add_option("--prior", o->prior_paths,
                  "The traffic the map was fitted to (e.g. the plan's training trace; several files, as for the "
                  "window, are one trace): steers the copy savings; its requests' nodes come from --grouping")
      ->default_str("none: the window alone");
  o->prior_requests_opt =
      cmd->add_option("--prior-requests", o->live.prior_requests,
                      "With --prior: its weight in the loads the re-plan balances, in requests beside the window's")
          ->check(tool_cli::number_in(0, 1e9))
          ->capture_default_str();
  cmd->add_option("--replan-slack", o->live.replan_slack,
                  "Load bound of the re-plan: GPUs above (1 + this) x the mean load are repaired first")
      ->check(tool_cli::finite_non_negative)
      ->capture_default_str();
  cmd->add_option("--transport", o->transport, "The engine's exchange, whose copies the re-plan saves")
      ->check(CLI::IsMember({"flat", "hierarchical"}))
      ->capture_default_str();
  cmd->add_option("--replica-rule", o->replica_rule,
                  "The engine's choice among an expert's replicas, where the copies counted and saved go: "
                  "locality_first (locus), same_gpu_else_random (SGLang static dispatch), random (vLLM EPLB), "
                  "locality_bounded (counted as locality_first: its hot GPUs change with the traffic)")
      ->check(CLI::IsMember(tool_cli::names_of(locus::placement::all_replica_rules)))
      ->capture_default_str();
  cmd->add_option("--expert-bytes", o->live.expert_bytes, "Weight bytes of one expert, for the bytes moved")
      ->check(CLI::Range(std::uint64_t{0}, locus::placement::max_expert_bytes))
      ->capture_default_str();
  cmd->add_option("--gpus-per-node", o->gpus_per_node, "GPUs per node of the plan's ranks")
      ->check(tool_cli::positive_whole)
      ->check(CLI::Range(std::size_t{1}, locus::max_topology_ranks))
      ->default_str("saved with the plan");
  o->prefill_opt = cmd->add_option("--prefill-tokens", o->prefill_tokens, prefill_help);
  cmd->add_option("--experts", o->experts, experts_help)->check(experts_range())->default_str(experts_default);
  cmd->add_flag("--split-on-restart", o->split_on_restart, split_on_restart_help);
  cmd->add_flag("--strict-layers", o->strict_layers, strict_layers_help);
  add_json_option(cmd, o->json);
  cmd->callback([o] { map_replan(*o); });
}

} // namespace locus_driver
