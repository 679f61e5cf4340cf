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
  std::size_t replicas = 0, empty = 0, same_gpu = 0;
  for (const auto& l : layers) {
    replicas += l.replica_slots_used();
    empty += l.empty_slots();
    // A second copy on the GPU that has the expert already takes a slot and a weight read and moves
    // no token's rows to another GPU (EPLB's packing may place one; locus's planners do not).
    for (std::size_t r = 0; r < l.ranks(); ++r) {
      auto on = l.experts_on(r);
      std::sort(on.begin(), on.end());
      same_gpu += static_cast<std::size_t>(on.end() - std::unique(on.begin(), on.end()));
    }
  }
  write_json(json, "map check",
             {{"map", path},
              {"layers", layers.size()},
              {"experts", m.experts()},
              {"ranks", m.ranks()},
              {"slots_per_rank", m.slots_per_rank()},
              {"replica_slots_used", replicas},
              {"empty_slots", empty},
              {"same_gpu_copies", same_gpu},
              {"gpus_per_node", plan.gpus_per_node ? nlohmann::json(plan.gpus_per_node) : nlohmann::json(nullptr)},
              {"model_layers", plan.model_layers.empty() ? nlohmann::json(nullptr) : nlohmann::json(plan.model_layers)},
              {"hidden_layers", plan.hidden_layers ? nlohmann::json(plan.hidden_layers) : nlohmann::json(nullptr)}});
  if (stdout_taken({json})) return 0;
  const std::string topology = plan.gpus_per_node ? " (" + std::to_string(m.ranks() / plan.gpus_per_node) +
                                                        " nodes x " + std::to_string(plan.gpus_per_node) + " GPUs)"
                                                  : std::string();
  std::printf("%s: %zu layers, %zu experts, %zu ranks%s x %zu slots, %zu replica slots in use%s\n",
              one_line(path).c_str(), layers.size(), m.experts(), m.ranks(), topology.c_str(), m.slots_per_rank(),
              replicas,
              empty ? (", " + std::to_string(empty) + " empty (map export fills them for the engines)").c_str() : "");
  if (same_gpu)
    std::printf("%zu of them %s a second copy of an expert on a GPU that has it already: %s nothing between "
                "GPUs and %s a slot and a weight read\n",
                same_gpu, same_gpu == 1 ? "holds" : "hold", same_gpu == 1 ? "it balances" : "they balance",
                same_gpu == 1 ? "costs" : "each cost");
  // What the engine exports will number the layers by, before they are written.
  if (plan.model_layers.empty())
    std::printf("no model layer numbers saved: map export writes the layers as hidden layers 0..%zu unless "
                "--first-moe-layer or --moe-layer-step say otherwise\n",
                layers.size() - 1);
  else
    std::printf("model layers: %s\n", saved_layers_text(plan.model_layers, plan.hidden_layers).c_str());
  return 0;
}

struct export_options {
  std::string map_path, to, out, load_trace, grouping, json;
  static constexpr std::size_t unset = static_cast<std::size_t>(-1);
  std::size_t first_moe_layer = unset, hidden_layers = 0, gpus_per_node = 0; // 0: the plan's, else 1
  std::size_t moe_layer_step = 0;                                            // 0: not given (1)
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
  // Taken by every engine's file, so that one command line serves them all: TensorRT-LLM keys the MTP
  // layers, the others' files have no row for them (SGLang's NextN layer reads the first row).
  LOCUS_REQUIRE(o.mtp_layers == 0 || !as_map, locus::config_error,
                "--mtp-layers describes an engine's file; a locus map (--to locus) holds the model's hidden layers "
                "only");
  auto plan = locus::load_expert_plan(o.map_path);
  auto& maps = plan.maps;
  LOCUS_REQUIRE(o.gpus_per_node == 0 || plan.gpus_per_node == 0 || o.gpus_per_node == plan.gpus_per_node,
                locus::config_error, "--gpus-per-node ", o.gpus_per_node, ": the plan in ", o.map_path,
                " was made for ", plan.gpus_per_node, " GPUs per node");
  const std::size_t gpus_per_node = o.gpus_per_node ? o.gpus_per_node : plan.gpus_per_node ? plan.gpus_per_node : 1;
  // The plan's own layer numbering (from the trace it was made on) unless the options say otherwise.
  locus::placement::model_layers layers;
  const bool numbered = o.first_moe_layer != export_options::unset || o.moe_layer_step != 0;
  bool no_numbering_said = false;
  if (!numbered && !plan.model_layers.empty()) {
    layers.moe_layer = plan.model_layers;
    layers.hidden_layers = o.hidden_layers      ? o.hidden_layers
                           : plan.hidden_layers ? plan.hidden_layers
                                                : plan.model_layers.back() + 1;
  } else {
    // --moe-layer-step alone keeps the saved first layer (a plan saved from layer 1 stays there);
    // --first-moe-layer alone numbers contiguously, as Python's first_moe_layer does. The count is
    // set below, where layers past --num-hidden-layers may be MTP layers.
    const std::size_t first = o.first_moe_layer != export_options::unset ? o.first_moe_layer
                              : plan.model_layers.empty()                ? 0
                                                                         : plan.model_layers.front();
    layers = locus::placement::model_layers::spaced(maps.size(), first, o.moe_layer_step ? o.moe_layer_step : 1);
    if (o.hidden_layers)
      layers.hidden_layers = o.hidden_layers;
    else if (plan.hidden_layers)
      layers.hidden_layers = plan.hidden_layers;
    // Allowed (a trace may have logged its layers by another numbering), but said: the engine
    // would load each layer's map into another layer.
    if (!plan.model_layers.empty() && plan.model_layers != layers.moe_layer)
      std::fprintf(stderr,
                   "locus map export: the layer options number the plan's layers %zu..%zu; the plan saved "
                   "%zu..%zu, the layers of the trace it was made on\n",
                   layers.moe_layer.front(), layers.moe_layer.back(), plan.model_layers.front(),
                   plan.model_layers.back());
    // SGLang and TensorRT-LLM index every hidden layer: a plan that saved no numbering (a synthetic
    // trace, a [layers, experts] load without empty rows) is read as hidden layers 0..L-1, which is
    // right only for a model without dense layers, and a wrong guess fails at the engine's start-up
    // or loads each map into another layer. Said, with the options that number it.
    no_numbering_said =
        !numbered && (o.hidden_layers == 0 || o.hidden_layers > maps.size()) && !as_map &&
        (format == locus::placement::engine_format::sglang || format == locus::placement::engine_format::trtllm);
    if (no_numbering_said)
      std::fprintf(stderr,
                   "locus map export: the plan saves no model layer numbers: its %zu layers are written as hidden "
                   "layers 0..%zu, right for a model whose every layer is MoE (Qwen3); one with dense layers needs "
                   "--first-moe-layer, --moe-layer-step and --num-hidden-layers (DeepSeek-V3: 3, 1, 61; Llama 4 "
                   "Maverick: 1, 2, 48)\n",
                   maps.size(), maps.size() - 1);
  }
  // Planned layers at or past --num-hidden-layers are multi-token-prediction layers (TensorRT-LLM's
  // statistics hold DeepSeek-V3's MTP layer 61 beside hidden layers 3..60), of an engine's file (a
  // map JSON's layers stay the model's hidden layers): TensorRT-LLM gets their maps, and the trivial
  // placement for the others --mtp-layers counts (validate refuses ids past them all).
  const std::size_t planned_mtp = o.hidden_layers && !as_map ? layers.planned_mtp() : 0;
  layers.mtp_layers = o.mtp_layers;
  if (planned_mtp > 0) {
    // A model has few MTP layers (DeepSeek-V3/R1: 1): layers further past --num-hidden-layers say the
    // count is wrong, and taking them as MTP layers would drop real ones from the files. A plan's own
    // numbering may hold one (TensorRT-LLM's statistics do); one the options make needs --mtp-layers.
    const std::size_t span = layers.moe_layer.back() - o.hidden_layers + 1;
    const std::size_t allowed = numbered ? o.mtp_layers : std::max<std::size_t>(o.mtp_layers, 1);
    // More than a model's MTP layers can be (16) says the count is wrong: --mtp-layers would not take
    // it. TensorRT-LLM keys MTP layers; the other files have none, so for them --mtp-layers only leaves
    // layers out: the count comes first there (an off-by-one count must not lose a layer).
    constexpr std::size_t most = locus::placement::model_layers::max_mtp_layers;
    const std::string fix =
        span > most
            ? ::locus::detail::concat(", ", span, " layers past it, more than a model's multi-token-prediction ",
                                      "layers (at most ", most, "): give the model's hidden-layer count")
        : format == locus::placement::engine_format::trtllm
            ? ::locus::detail::concat(": as multi-token-prediction layers they need --mtp-layers ", span,
                                      numbered ? "" : " (a plan's saved layers may hold one)",
                                      "; else give the model's hidden-layer count")
            : ::locus::detail::concat(": give the model's hidden-layer count; only if they are its multi-token-",
                                      "prediction layers, which the ", o.to, " file has no row for, does --mtp-layers ",
                                      span, " leave them out");
    LOCUS_REQUIRE(span <= allowed, locus::config_error, "the plan's layers ",
                  layers.moe_layer[maps.size() - planned_mtp], "..", layers.moe_layer.back(),
                  " lie past --num-hidden-layers ", o.hidden_layers, fix);
    layers.mtp_layers = std::max(o.mtp_layers, span);
  }
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
    if (numbered || o.hidden_layers != 0) {
      plan.model_layers = layers.moe_layer;
      plan.hidden_layers = layers.hidden_layers;
    }
  }
  // SGLang's NextN layer reads the file's first row and vLLM's MTP draft is a model of its own: their
  // files, and EPLB's, leave the planned MTP layers out (export_text), which is said.
  const bool keys_mtp = format == locus::placement::engine_format::trtllm;
  if (planned_mtp > 0 && !keys_mtp)
    std::fprintf(stderr,
                 "locus map export: the plan's last %zu layer%s (from layer %zu, past --num-hidden-layers %zu): "
                 "the model's multi-token-prediction layers, which the %s file has no row for; left out\n",
                 planned_mtp, planned_mtp == 1 ? "" : "s", layers.moe_layer[maps.size() - planned_mtp],
                 layers.hidden_layers, o.to.c_str());
  // The model's MoE layers going on past the plan's (a 26-layer plan numbered from 3 for a model of
  // 61 hidden layers): the engine would serve those with no plan (TensorRT-LLM fails at start-up,
  // SGLang keeps its trivial placement, vLLM's plugin refuses the layer count). Said, not refused:
  // a model's last layers may be dense, which nothing here can tell, and only for a count the
  // options give: a plan's own count comes from a source that saw every hidden layer (a routed-
  // experts array, SGLang's per-layer counts), whose unplanned layers are dense.
  const bool count_given = o.hidden_layers != 0 && (numbered || o.hidden_layers != plan.hidden_layers);
  const std::size_t unplanned = as_map || !count_given ? 0 : layers.unplanned_layer();
  if (unplanned != 0 && !no_numbering_said)
    std::fprintf(stderr,
                 "locus map export: the plan's MoE layers end at hidden layer %zu, but their numbering goes on at "
                 "layer %zu of the model's %zu: unless the model's last layers are dense, the engine serves those "
                 "with no plan (TensorRT-LLM fails at start-up); plan on a trace of this model, or give "
                 "--first-moe-layer, --moe-layer-step and --num-hidden-layers as the model has them\n",
                 layers.moe_layer[maps.size() - planned_mtp - 1], unplanned, layers.hidden_layers);
  output_set files; // the export and its JSON together or not at all
  files.add(o.out, as_map ? locus::expert_plan_text(plan) : locus::placement::export_text(format, maps, layers));
  const auto& m = maps.front();
  const std::size_t mtp_keys = keys_mtp && !as_map ? layers.mtp_layers : 0; // the MTP layers the file keys
  const auto hidden_end = layers.moe_layer.end() - static_cast<std::ptrdiff_t>(planned_mtp);
  files.add_json(o.json, "map export",
                 {{"out", o.out},
                  {"to", o.to},
                  {"moe_layers", maps.size() - planned_mtp},
                  {"hidden_layer_ids", std::vector<std::size_t>(layers.moe_layer.begin(), hidden_end)},
                  {"mtp_layer_ids", keys_mtp ? std::vector<std::size_t>(hidden_end, layers.moe_layer.end())
                                             : std::vector<std::size_t>{}},
                  {"hidden_layers", layers.hidden_layers},
                  {"mtp_layers", mtp_keys},
                  {"unplanned_moe_layer", unplanned ? nlohmann::json(unplanned) : nlohmann::json(nullptr)},
                  {"experts", m.experts()},
                  {"slots", m.slot_count()},
                  {"ranks", m.ranks()},
                  {"empty_slots_filled", filled},
                  {"filled_by_load", !load.empty()}});
  files.commit();
  if (stdout_taken({o.json, o.out})) return 0;
  const std::size_t last_hidden = layers.moe_layer[maps.size() - planned_mtp - 1];
  const std::string mtp_text =
      mtp_keys == 0 ? std::string()
                    : ::locus::detail::concat(", ", mtp_keys, " MTP layer", mtp_keys == 1 ? "" : "s",
                                              planned_mtp ? ::locus::detail::concat(" (", planned_mtp, " planned)")
                                                          : std::string());
  std::printf("%s: %s format, %zu MoE layers (hidden layers %zu..%zu of %zu%s), %zu experts in %zu slots per layer on "
              "%zu ranks; %zu empty slots of %zu (all layers) filled%s\n",
              one_line(o.out).c_str(), o.to.c_str(), maps.size() - planned_mtp, layers.moe_layer.front(), last_hidden,
              layers.hidden_layers, mtp_text.c_str(), m.experts(), m.slot_count(), m.ranks(), filled,
              m.slot_count() * maps.size(), load.empty() && filled > 0 ? " (no --load-trace: by replica count)" : "");
  // A map JSON for locus itself (as_map) has no engine flag to name. The engine reads the file from its
  // own working folder (vLLM's Ray workers, a launcher elsewhere): the hints name it absolutely.
  std::string served_path = o.out;
  if (std::error_code ec; o.out != "-" && !is_device(o.out))
    if (const auto p = std::filesystem::absolute(o.out, ec); !ec) served_path = p.lexically_normal().string();
  if (!as_map && format == locus::placement::engine_format::sglang)
    std::printf("pass: --init-expert-location %s --ep-num-redundant-experts %zu --tp-size %zu --ep-size %zu (EP "
                "splits the TP ranks)\n",
                one_line(shell_quote(served_path)).c_str(), m.slot_count() - m.experts(), m.ranks(), m.ranks());
  else if (!as_map && format == locus::placement::engine_format::vllm)
    std::printf("pass: --enable-expert-parallel --enable-eplb --eplb-config '{\"num_redundant_experts\": %zu}' "
                "(expert-parallel size, data parallel x tensor parallel, %zu), and in every worker process, from a "
                "vllm.general_plugins entry point: locus.vllm.register(%s)\n",
                m.slot_count() - m.experts(), m.ranks(), one_line(locus::trace::quoted_name(served_path)).c_str());
  else if (!as_map && format == locus::placement::engine_format::trtllm)
    std::printf("pass: enable_attention_dp: true and moe_config: {backend: WIDEEP, load_balancer: %s} (in "
                "--extra_llm_api_options; TensorRT-LLM's load balancer needs attention DP, EP > 1 and a backend that "
                "supports it), --tp_size %zu --ep_size %zu (trtllm-serve; trtllm-bench: --tp, --ep)%s\n",
                one_line(locus::trace::quoted_name(served_path)).c_str(), m.ranks(), m.ranks(),
                o.mtp_layers || planned_mtp
                    ? ""
                    : "; a model with multi-token-prediction layers (DeepSeek-V3/R1: layer 61) needs --mtp-layers, "
                      "or, where the plan holds them (TensorRT-LLM's statistics do), --num-hidden-layers");
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
  // These default to what the plan saved: --help names that, not the sentinel the code holds.
  exp->add_option("--first-moe-layer", o->first_moe_layer,
                  "Hidden-layer index of the plan's first layer (DeepSeek-V3: 3; Llama 4 Maverick: 1)")
      ->check(CLI::Range(std::size_t{0}, locus::max_hidden_layers - 1)) // not the "saved ids" sentinel
      ->default_str("the layer ids saved with the plan; with --moe-layer-step alone their first, else 0");
  exp->add_option("--moe-layer-step", o->moe_layer_step,
                  "Hidden layers from one MoE layer to the next: 1 when they follow each other, 2 when they "
                  "alternate with dense layers (Llama 4 Maverick)")
      ->check(CLI::Range(std::size_t{1}, locus::max_hidden_layers)) // 0 is the "not given" sentinel
      ->default_str("the layer ids saved with the plan; with --first-moe-layer 1");
  exp->add_option("--num-hidden-layers", o->hidden_layers,
                  "The model's hidden-layer count (layers past it are the model's MTP layers: one a plan saved, or as "
                  "many as --mtp-layers says)")
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
      ->check(CLI::Range(std::size_t{1}, locus::max_topology_ranks))
      ->default_str("saved with the plan, else 1");
  exp->add_option("--mtp-layers", o->mtp_layers,
                  "Multi-token-prediction layers after the hidden layers (DeepSeek-V3/R1 with MTP: 1): trtllm keys "
                  "them, as TensorRT-LLM balances them too (the trivial placement, slot p holds expert p mod E, where "
                  "the plan has none); the other files have no row for them and leave planned ones out")
      ->check(CLI::Range(std::size_t{0}, locus::placement::model_layers::max_mtp_layers))
      ->capture_default_str();
  add_json_option(exp, o->json);
  exp->callback([o] { map_export(*o); });

  register_map_replan(map_cmd);
}

} // namespace locus_driver
