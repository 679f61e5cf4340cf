#pragma once
// `locus map ...`: expert-map tools.
#include "cmd_replan.hpp"
#include "output.hpp"
#include "tool_cli.hpp"
#include "trace_input.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <locus/core/atomic_file.hpp>
#include <locus/core/expert_map_json.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/engine_export.hpp>
#include <locus/placement/trace_load.hpp>
#include <memory>
#include <string>
#include <string_view>

namespace locus_driver {

// `locus map check`: validate a saved plan and summarise it.
inline int map_check(const std::string& path, const std::string& json = {}) {
  check_outputs({{"--json", json}}, {path});
  const auto plan = locus::load_expert_plan(path);
  const auto& layers = plan.maps;
  const auto& m = layers.front();
  std::size_t replicas = 0, empty = 0;
  for (const auto& l : layers) {
    replicas += l.replica_slots_used();
    empty += l.empty_slots();
  }
  write_json(json, "map check",
             {{"map", path},
              {"layers", layers.size()},
              {"experts", m.experts()},
              {"ranks", m.ranks()},
              {"slots_per_rank", m.slots_per_rank()},
              {"replica_slots_used", replicas},
              {"empty_slots", empty},
              {"gpus_per_node", plan.gpus_per_node ? nlohmann::json(plan.gpus_per_node) : nlohmann::json(nullptr)}});
  if (stdout_taken({json})) return 0;
  const std::string topology = plan.gpus_per_node ? " (" + std::to_string(m.ranks() / plan.gpus_per_node) +
                                                        " nodes x " + std::to_string(plan.gpus_per_node) + " GPUs)"
                                                  : std::string();
  std::printf("%s: %zu layers, %zu experts, %zu ranks%s x %zu slots, %zu replica slots in use%s\n",
              one_line(path).c_str(), layers.size(), m.experts(), m.ranks(), topology.c_str(), m.slots_per_rank(),
              replicas,
              empty ? (", " + std::to_string(empty) + " empty (map export fills them for the engines)").c_str() : "");
  return 0;
}

struct export_options {
  std::string map_path, to, out, load_trace, grouping, json;
  static constexpr std::size_t unset = static_cast<std::size_t>(-1);
  std::size_t first_moe_layer = unset, hidden_layers = 0, gpus_per_node = 0; // 0: the plan's, else 1
  std::size_t mtp_layers = 0;
};

// `locus map export`: the plan in the file an engine takes, empty slots filled first.
inline int map_export(const export_options& o) {
  // `--to locus`: the plan as the engines serve it, every empty slot filled, as a map JSON (the
  // map to re-plan: its moves are then those of the exported files).
  const bool as_map = o.to == "locus";
  const auto format = as_map ? locus::placement::engine_format{} : locus::placement::parse_engine_format(o.to);
  check_outputs({{"--out", o.out}, {"--json", o.json}}, {o.map_path, o.grouping, o.load_trace});
  // SGLang reads the flag's value as a file only when the name ends in .json (.pt: torch.load);
  // any other name is parsed as JSON text itself, and start-up fails on the path. A stream (stdout,
  // a descriptor, a pipe or device, or a link to one) names no file SGLang would be given; a link to a
  // file is passed by its own name, which must end in .json too.
  LOCUS_REQUIRE(as_map || format != locus::placement::engine_format::sglang || o.out == "-" ||
                    std::string_view(o.out).ends_with(".json") || is_device(o.out),
                locus::config_error, "--out ", o.out,
                ": SGLang reads --init-expert-location as a file only when its name ends in .json (any other value "
                "is parsed as JSON text); name the file X.json");
  LOCUS_REQUIRE(o.mtp_layers == 0 || (!as_map && format == locus::placement::engine_format::trtllm),
                locus::config_error,
                "--mtp-layers applies to --to trtllm (SGLang's NextN layer reads the file's first row; vLLM's and "
                "EPLB's files and a locus map have no layer for it)");
  auto plan = locus::load_expert_plan(o.map_path);
  auto& maps = plan.maps;
  LOCUS_REQUIRE(o.gpus_per_node == 0 || plan.gpus_per_node == 0 || o.gpus_per_node == plan.gpus_per_node,
                locus::config_error, "--gpus-per-node ", o.gpus_per_node, ": the plan in ", o.map_path,
                " was made for ", plan.gpus_per_node, " GPUs per node");
  const std::size_t gpus_per_node = o.gpus_per_node ? o.gpus_per_node : plan.gpus_per_node ? plan.gpus_per_node : 1;
  // The plan's own layer numbering (from the trace it was made on) unless the options say otherwise.
  locus::placement::model_layers layers;
  if (o.first_moe_layer == export_options::unset && !plan.model_layers.empty()) {
    layers.moe_layer = plan.model_layers;
    layers.hidden_layers = o.hidden_layers      ? o.hidden_layers
                           : plan.hidden_layers ? plan.hidden_layers
                                                : plan.model_layers.back() + 1;
  } else {
    layers = locus::placement::model_layers::contiguous(
        maps.size(), o.first_moe_layer == export_options::unset ? 0 : o.first_moe_layer,
        o.hidden_layers ? o.hidden_layers : plan.hidden_layers);
    // Allowed (a trace may have logged its layers by another numbering), but said: the engine
    // would load each layer's map into another layer.
    if (!plan.model_layers.empty() && plan.model_layers != layers.moe_layer)
      std::fprintf(stderr,
                   "locus map export: --first-moe-layer %zu numbers the plan's layers %zu..%zu; the plan saved "
                   "%zu..%zu, the layers of the trace it was made on\n",
                   layers.moe_layer.front(), layers.moe_layer.front(), layers.moe_layer.back(),
                   plan.model_layers.front(), plan.model_layers.back());
  }
  layers.mtp_layers = o.mtp_layers;
  layers.validate(maps.size());
  std::vector<std::vector<double>> load;
  if (!o.load_trace.empty()) {
    // map export has no --experts: a route JSONL load trace declares its experts in a meta line.
    jsonl_reading how;
    how.experts_option.clear();
    how.split_option = "`locus trace import --split-on-restart`";
    const auto t = load_trace(std::vector<std::string>{o.load_trace}, how);
    // Said as the files and the option are (the filler's own check named itself and load rows).
    LOCUS_REQUIRE(t.layers() == maps.size() && t.experts() == maps.front().experts(), locus::config_error,
                  "--load-trace ", o.load_trace, " has ", t.layers(), " layers of ", t.experts(),
                  " experts; the plan in ", o.map_path, " has ", maps.size(), " layers of ", maps.front().experts());
    load = locus::placement::expert_load(t);
  }
  std::size_t filled = 0;
  for (const auto& m : maps)
    filled += static_cast<std::size_t>(std::count(m.slot_table().begin(), m.slot_table().end(), locus::empty_slot));
  // The grouping saved with the plan says which node's requests use which experts: ties among
  // replicas for an empty slot go to the one that saves most copies from the slot's node.
  std::vector<std::vector<std::vector<double>>> node_load;
  if (!o.grouping.empty()) {
    const auto g = locus::grouper::load_grouping(o.grouping);
    LOCUS_REQUIRE(g.layers() == maps.size() && g.experts() == maps.front().experts() &&
                      g.nodes() * gpus_per_node == maps.front().ranks(),
                  locus::config_error, "the grouping in ", o.grouping, " is for ", g.layers(), " layers × ",
                  g.experts(), " experts on ", g.nodes(), " nodes; the plan has ", maps.size(), " × ",
                  maps.front().experts(), " on ", maps.front().ranks(), " ranks of ", gpus_per_node, " per node");
    node_load = g.node_load();
  }
  maps = locus::placement::fill_empty_slots(maps, load, node_load, gpus_per_node);
  if (as_map) {
    if (plan.gpus_per_node == 0) plan.gpus_per_node = gpus_per_node;
    // The layer options renumber the map as they renumber an engine's file; without them the
    // plan's own numbering, or none, stays as it was.
    if (o.first_moe_layer != export_options::unset || o.hidden_layers != 0) {
      plan.model_layers = layers.moe_layer;
      plan.hidden_layers = layers.hidden_layers;
    }
  }
  output_set files; // the export and its JSON together or not at all
  files.add(o.out, as_map ? locus::expert_plan_text(plan) : locus::placement::export_text(format, maps, layers));
  const auto& m = maps.front();
  files.add_json(o.json, "map export",
                 {{"out", o.out},
                  {"to", o.to},
                  {"moe_layers", maps.size()},
                  {"hidden_layer_ids", layers.moe_layer},
                  {"hidden_layers", layers.hidden_layers},
                  {"mtp_layers", layers.mtp_layers},
                  {"experts", m.experts()},
                  {"slots", m.slot_count()},
                  {"ranks", m.ranks()},
                  {"empty_slots_filled", filled},
                  {"filled_by_load", !load.empty()}});
  files.commit();
  if (stdout_taken({o.json, o.out})) return 0;
  std::printf(
      "%s: %s format, %zu MoE layers (hidden layers %zu..%zu of %zu), %zu experts in %zu slots per layer on %zu "
      "ranks; %zu empty slots of %zu (all layers) filled%s\n",
      one_line(o.out).c_str(), o.to.c_str(), maps.size(), layers.moe_layer.front(), layers.moe_layer.back(),
      layers.hidden_layers, m.experts(), m.slot_count(), m.ranks(), filled, m.slot_count() * maps.size(),
      load.empty() && filled > 0 ? " (no --load-trace: by replica count)" : "");
  // A map JSON for locus itself (as_map) has no engine flag to name.
  if (!as_map && format == locus::placement::engine_format::sglang)
    std::printf("pass: --init-expert-location %s --ep-num-redundant-experts %zu --tp-size %zu --ep-size %zu (EP "
                "splits the TP ranks)\n",
                one_line(shell_quote(o.out)).c_str(), m.slot_count() - m.experts(), m.ranks(), m.ranks());
  else if (!as_map && format == locus::placement::engine_format::vllm)
    std::printf("pass: --enable-expert-parallel --enable-eplb --eplb-config '{\"num_redundant_experts\": %zu}' "
                "(expert-parallel size, data parallel x tensor parallel, %zu), and in every worker process, from a "
                "vllm.general_plugins entry point: locus.vllm.register(%s)\n",
                m.slot_count() - m.experts(), m.ranks(), one_line(locus::trace::quoted_name(o.out)).c_str());
  else if (!as_map && format == locus::placement::engine_format::trtllm)
    std::printf("pass: enable_attention_dp: true and moe_config: {backend: WIDEEP, load_balancer: %s} (in "
                "--extra_llm_api_options; TensorRT-LLM's load balancer needs attention DP, EP > 1 and a backend that "
                "supports it), --tp_size %zu --ep_size %zu (trtllm-serve; trtllm-bench: --tp, --ep)%s\n",
                one_line(locus::trace::quoted_name(o.out)).c_str(), m.ranks(), m.ranks(),
                o.mtp_layers ? "" : "; MTP layers the plan lacks (DeepSeek-V3/R1: layer 61) need --mtp-layers");
  return 0;
}

inline void register_map(CLI::App& app) {
  auto* map_cmd = app.add_subcommand("map", "Expert-map tools");
  map_cmd->require_subcommand(1);
  auto* check = map_cmd->add_subcommand("check", "Validate a saved expert map and summarise it");
  auto path = std::make_shared<std::string>();
  check->add_option("file", *path, "Expert map JSON")->required()->check(CLI::ExistingFile);
  auto check_json = std::make_shared<std::string>();
  add_json_option(check, *check_json);
  check->callback([path, check_json] { map_check(*path, *check_json); });

  auto o = std::make_shared<export_options>();
  auto* exp = map_cmd->add_subcommand("export", "Write a saved expert map in the file a serving engine takes");
  exp->add_option("file", o->map_path, "Expert map JSON")->required()->check(CLI::ExistingFile);
  exp->add_option("--to", o->to,
                  "Engine format: sglang, vllm, trtllm or eplb; locus: the map JSON as the engines serve it, every "
                  "empty slot filled (the map to re-plan with map replan)")
      ->required()
      ->check(CLI::IsMember({"sglang", "vllm", "trtllm", "eplb", "locus"}));
  exp->add_option("--out", o->out, "Output file")->required();
  // These two default to what the plan saved: --help names that, not the sentinel the code holds.
  exp->add_option("--first-moe-layer", o->first_moe_layer,
                  "Hidden-layer index of the plan's first layer (DeepSeek-V3: 3); layers follow contiguously")
      ->check(CLI::Range(std::size_t{0}, locus::max_hidden_layers - 1)) // not the "saved ids" sentinel
      ->default_str("the layer ids saved with the plan, else 0");
  exp->add_option("--num-hidden-layers", o->hidden_layers, "The model's hidden-layer count")
      ->check(CLI::Range(std::size_t{1}, locus::max_hidden_layers)) // 0 is the "saved count" sentinel
      ->default_str("saved with the plan, else the last MoE layer + 1");
  exp->add_option("--load-trace", o->load_trace, "Trace whose expert loads choose the replicas of empty slots")
      ->default_str("none: by replica count");
  exp->add_option("--grouping", o->grouping,
                  "Grouping model saved with the plan: ties for empty slots go to the replica saving most copies")
      ->check(CLI::ExistingFile)
      ->default_str("none: ties to the lowest expert id");
  exp->add_option("--gpus-per-node", o->gpus_per_node, "GPUs per node of the plan's ranks")
      ->check(tool_cli::positive_whole)
      ->default_str("saved with the plan, else 1");
  exp->add_option("--mtp-layers", o->mtp_layers,
                  "trtllm: multi-token-prediction layers after the hidden layers (DeepSeek-V3/R1 with MTP: 1), "
                  "which TensorRT-LLM balances too; each gets the trivial placement (slot p holds expert p mod E)")
      ->check(CLI::Range(std::size_t{0}, locus::placement::model_layers::max_mtp_layers))
      ->capture_default_str();
  add_json_option(exp, o->json);
  exp->callback([o] { map_export(*o); });

  register_map_replan(map_cmd);
}

} // namespace locus_driver
