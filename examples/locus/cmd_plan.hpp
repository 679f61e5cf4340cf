#pragma once
// `locus plan` (fit an expert map on a trace's training split) and `locus simulate` (run the decode
// simulator on its test split).
#include "output.hpp"
#include "split.hpp"
#include "tool_cli.hpp"
#include "trace_input.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <locus/core/expert_map_json.hpp>
#include <locus/cost/online_replan.hpp>
#include <locus/cost/simulation_json.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/live_replan.hpp>
#include <locus/placement/load_import.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/trace_load.hpp>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

namespace locus_driver {

//! Options shared by plan and simulate: where the trace comes from, how it is read and how it is
//! split (split_flags, split.hpp).
struct split_options : split_flags {
  std::vector<std::string> trace_paths;
  std::size_t nodes = 4, gpus_per_node = 2;
  std::size_t prefill_tokens = 32;
  std::size_t experts = 0;
  bool split_on_restart = false, strict_layers = false;
  CLI::Option* prefill_opt = nullptr;

  CLI::Option* add_to(CLI::App* cmd, bool trace_required = true) {
    auto* trace = cmd->add_option("--trace", trace_paths, trace_help);
    if (trace_required) trace->required();
    cmd->add_option("--nodes", nodes, "Nodes")
        ->check(tool_cli::positive_whole)
        ->check(CLI::Range(std::size_t{1}, locus::max_topology_ranks));
    cmd->add_option("--gpus-per-node", gpus_per_node, "GPUs (ranks) per node")
        ->check(tool_cli::positive_whole)
        ->check(CLI::Range(std::size_t{1}, locus::max_topology_ranks));
    add_split_flags(cmd, *this);
    prefill_opt = cmd->add_option("--prefill-tokens", prefill_tokens, prefill_help);
    cmd->add_flag("--split-on-restart", split_on_restart, split_on_restart_help);
    cmd->add_flag("--strict-layers", strict_layers, strict_layers_help);
    return trace;
  }

  //! What the command reads besides its maps: the trace (files or folders) and the request-id files
  //! of the split (check_outputs keeps the outputs off them).
  std::vector<std::string> input_paths() const {
    std::vector<std::string> in = trace_paths;
    in.push_back(train_requests);
    in.push_back(test_requests);
    return in;
  }

  //! The trace as messages name it.
  std::string trace_name() const {
    const std::string first = trace_paths.front() == "-" ? "<stdin>" : trace_paths.front();
    return trace_paths.size() == 1 ? first : first + " (and " + std::to_string(trace_paths.size() - 1) + " more)";
  }

  //! (train, test), prefill marked; a split that the job needs and that came out empty is refused.
  std::pair<locus::trace::trace, locus::trace::trace> load(bool need_train, bool need_test) const {
    jsonl_reading how;
    how.experts = experts;
    how.split_on_restart = split_on_restart;
    how.strict_layers = strict_layers;
    auto t = with_prefill(load_trace(trace_paths, how), prefill_tokens, prefill_opt->count() > 0);
    return apply_split(std::move(t), *this, need_train, need_test, trace_name());
  }
  locus::dynamic_topology topology() const { return {nodes, gpus_per_node}; }
};

//! The values of --anneal wherever a locality plan is made: a usage error before the trace is read
//! (the planner refused a larger one only once it ran, by its own field's name).
inline CLI::Validator anneal_range() {
  return CLI::Range(std::size_t{0}, locus::placement::token_refine_options::max_anneal_per_expert);
}

//! Help text of --hedge-replicas wherever a locality plan is made.
inline constexpr const char* hedge_replicas_help =
    "locality with replica slots: at most this many slots per layer first hold balance hedges, copies that bring "
    "the worst GPU balance floor over resampled training requests towards 1.10 while the training sample's "
    "inter-node copies grow by at most --hedge-cost-budget (0: off; default: one per GPU)";

//! Help text of --hedge-class-spread wherever a locality plan is made.
inline constexpr const char* hedge_class_spread_help =
    "locality with replica slots: the balance hedges' resampled training traffic also shifts the mix of request "
    "classes (the workload model's --clusters), each class's requests weighted by exp(this x a standard normal "
    "draw) per draw, at most 2 (0: resamples only; 0.6 with --hedge-cost-budget 0, --fill-slack 0.3 and the "
    "locality_bounded replica rule holds ESFT's split seeds within 1.10 for some bytes)";

//! Help text of --hedge-cost-budget wherever a locality plan is made.
inline constexpr const char* hedge_cost_budget_help =
    "locality with replica slots: the balance hedges may raise the training sample's inter-node copies by at most "
    "this share (0: no bound: the hedges may cost any bytes)";

//! Help text of --fill-slack wherever a locality plan is made.
inline constexpr const char* fill_slack_help =
    "locality with replica slots: the replica fill's GPU load bound over the training sample's mean (0: the "
    "planner's 0.03); a looser one lets copies of hot experts in and swaps bring every GPU back within 0.03 "
    "after: more bytes saved, a little less balance on shifted traffic";

struct plan_options {
  std::string placement = "linear";
  std::size_t redundant_slots = 0;
  //! --redundant-experts: a total over all GPUs, as EPLB counts them, made slots per GPU once the
  //! expert count is known (redundant_per_gpu); its option says whether it was given.
  std::size_t redundant_experts = 0;
  CLI::Option* redundant_experts_opt = nullptr;
  std::size_t eplb_groups = 1;
  std::size_t clusters = 8;
  bool clusters_given = false; // --clusters on the command line (the default's clamp is no news)
  std::string copies;          //!< empty: both kinds (plan) or the simulated transport's (simulate)
  std::size_t anneal = 0;
  double balance_shift = 0;
  std::string shift_by = "node";
  std::size_t hedge_replicas = locus::placement::token_refine_options{}.hedge_replicas;
  double fill_slack = 0;
  double hedge_class_spread = 0;
  double hedge_cost_budget = locus::placement::token_refine_options{}.hedge_cost_budget;

  //! Every option add_to registers (what a command that plans nothing refuses).
  static constexpr const char* option_names[] = {"--placement",        "--redundant-slots", "--redundant-experts",
                                                 "--eplb-groups",      "--clusters",        "--copies",
                                                 "--anneal",           "--balance-shift",   "--shift-by",
                                                 "--hedge-replicas",   "--fill-slack",      "--hedge-class-spread",
                                                 "--hedge-cost-budget"};

  void add_to(CLI::App* cmd, const char* copies_default) {
    cmd->add_option("--placement", placement, "Planner: linear, round_robin, eplb, activation_usage, locality")
        ->check(CLI::IsMember(locus::placement::planner_names()));
    cmd->add_option("--redundant-slots", redundant_slots,
                    "Replica slots per GPU, at most experts - experts / GPUs (more slots than experts would hold a "
                    "second copy on one GPU); the locality planner puts each expert on a GPU at most once, eplb packs "
                    "replicas as DeepSeek's EPLB does and may put two of one expert on a GPU. EPLB's and vLLM's "
                    "num_redundant_experts counts them over all GPUs: this x GPUs where the experts divide evenly "
                    "(DeepSeek-V3's 32 redundant experts on 32 GPUs: 1), or give that total as --redundant-experts");
    redundant_experts_opt = add_redundant_experts(cmd, redundant_experts, "--redundant-slots");
    cmd->add_option("--eplb-groups", eplb_groups,
                    "Expert groups for eplb: a multiple of --nodes selects DeepSeek's hierarchical policy (the "
                    "experts must split into the groups); any other count its global policy, which reads no "
                    "groups, as DeepSeek's EPLB does")
        ->check(tool_cli::positive_whole);
    cmd->add_option("--clusters", clusters,
                    "Request clusters of the workload-aware model (at most one per training request)")
        ->check(tool_cli::positive_whole);
    cmd->add_option("--copies", copies,
                    "locality: the copies to minimise: flat (per remote GPU), hierarchical (per remote node) or both")
        ->check(CLI::IsMember({"flat", "hierarchical", "both"}))
        ->default_str(copies_default);
    cmd->add_option("--anneal", anneal, "locality: annealing proposals per expert after the token-level sweeps")
        ->check(anneal_range());
    cmd->add_option("--balance-shift", balance_shift,
                    "locality: also balance GPU load when one node's requests grow by this share")
        ->check(tool_cli::finite_non_negative);
    cmd->add_option("--shift-by", shift_by,
                    "locality with --balance-shift: what one shifted mix grows: node, class (request cluster) or "
                    "request")
        ->check(CLI::IsMember({"node", "class", "request"}));
    cmd->add_option("--hedge-replicas", hedge_replicas, hedge_replicas_help)->default_str("one per GPU");
    cmd->add_option("--fill-slack", fill_slack, fill_slack_help)->check(tool_cli::finite_non_negative);
    add_hedge_options(cmd, hedge_class_spread, hedge_cost_budget);
  }
  //! --redundant-experts (plan, simulate and compare share it), which `per_gpu` excludes.
  static CLI::Option* add_redundant_experts(CLI::App* cmd, std::size_t& total, const char* per_gpu) {
    return cmd
        ->add_option("--redundant-experts", total,
                     "Redundant experts over all GPUs, as DeepSeek's EPLB and vLLM's num_redundant_experts count them: "
                     "the experts and these split evenly over the GPUs, the same number on each (instead of " +
                         std::string(per_gpu) + ", which counts per GPU)")
        ->excludes(per_gpu)
        ->default_str("not given");
  }
  bool redundant_experts_given() const { return redundant_experts_opt && redundant_experts_opt->count() > 0; }
  //! Whether replica slots are asked for (per GPU or as a total).
  bool asks_replicas() const { return redundant_experts_given() ? redundant_experts > 0 : redundant_slots > 0; }
  //! Replica slots per GPU for `experts` on `ranks` GPUs: --redundant-slots, or --redundant-experts
  //! made per GPU.
  //! @throws locus::config_error for a total that does not split evenly over the GPUs
  std::size_t redundant_per_gpu(std::size_t experts, std::size_t ranks) const {
    if (!redundant_experts_given()) return redundant_slots;
    return locus::placement::redundant_slots_for_total(experts, ranks, redundant_experts);
  }
  //! --hedge-class-spread and --hedge-cost-budget (plan, simulate and compare share them).
  static void add_hedge_options(CLI::App* cmd, double& class_spread, double& cost_budget) {
    cmd->add_option("--hedge-class-spread", class_spread, hedge_class_spread_help)
        ->check(tool_cli::number_in(0.0, locus::placement::token_refine_options::max_hedge_class_spread));
    cmd->add_option("--hedge-cost-budget", cost_budget, hedge_cost_budget_help)->check(tool_cli::finite_non_negative);
  }
  //! Whether the planner fits a workload-aware grouping model of its own (--clusters sizes it).
  bool fits_grouping_model() const { return placement == "activation_usage" || placement == "locality"; }
  //! The options the plan was made with, for `--json` (those of other planners left out), so that
  //! a saved result says how to make it again. `ranks`: the GPUs "one per GPU" hedges count.
  nlohmann::json settings(std::size_t ranks, std::size_t experts) const {
    nlohmann::json j{{"redundant_slots", redundant_per_gpu(experts, ranks)}};
    if (redundant_experts_given()) j["redundant_experts"] = redundant_experts;
    if (placement == "eplb") j["eplb_groups"] = eplb_groups;
    if (fits_grouping_model()) j["clusters"] = clusters;
    if (placement != "locality") return j;
    j["copies"] = copies.empty() ? std::string("both") : copies;
    j["anneal"] = anneal;
    j["balance_shift"] = balance_shift;
    if (balance_shift > 0) j["shift_by"] = shift_by;
    locus::placement::token_refine_options refine;
    refine.hedge_replicas = hedge_replicas;
    j["hedge_replicas"] = redundant_per_gpu(experts, ranks) > 0 ? refine.hedge_budget(ranks) : 0;
    j["fill_slack"] = fill_slack;
    j["hedge_class_spread"] = hedge_class_spread;
    j["hedge_cost_budget"] = hedge_cost_budget;
    return j;
  }
  //! Refuses the options of one planner given with another (they would be ignored without a word).
  //! @throws locus::config_error naming the option
  void check_applies(const CLI::App* cmd) const {
    for (const char* name :
         {"--copies", "--anneal", "--balance-shift", "--shift-by", "--fill-slack", "--hedge-cost-budget"})
      LOCUS_REQUIRE(cmd->count(name) == 0 || placement == "locality", locus::config_error, name,
                    " applies to --placement locality, not ", placement);
    // 0 (no shift) is accepted everywhere, as --hedge-replicas 0 is.
    LOCUS_REQUIRE(cmd->count("--hedge-class-spread") == 0 || hedge_class_spread == 0 || placement == "locality",
                  locus::config_error, "--hedge-class-spread applies to --placement locality, not ", placement);
    // 0 (off) is accepted everywhere, so that one command line can turn the hedge off for any planner.
    LOCUS_REQUIRE(cmd->count("--hedge-replicas") == 0 || hedge_replicas == 0 || placement == "locality",
                  locus::config_error, "--hedge-replicas applies to --placement locality, not ", placement);
    LOCUS_REQUIRE(cmd->count("--eplb-groups") == 0 || placement == "eplb", locus::config_error,
                  "--eplb-groups applies to --placement eplb, not ", placement);
    LOCUS_REQUIRE(cmd->count("--shift-by") == 0 || balance_shift > 0, locus::config_error,
                  "--shift-by applies with --balance-shift");
    LOCUS_REQUIRE(cmd->count("--hedge-replicas") == 0 || hedge_replicas == 0 || asks_replicas(), locus::config_error,
                  "--hedge-replicas spends replica slots: it needs --redundant-slots");
    LOCUS_REQUIRE(cmd->count("--fill-slack") == 0 || asks_replicas(), locus::config_error,
                  "--fill-slack bounds the replica fill: it needs --redundant-slots");
    const bool spread = cmd->count("--hedge-class-spread") > 0 && hedge_class_spread > 0;
    for (const auto& [name, given] : {std::pair{"--hedge-class-spread", spread},
                                      std::pair{"--hedge-cost-budget", cmd->count("--hedge-cost-budget") > 0}}) {
      LOCUS_REQUIRE(!given || asks_replicas(), locus::config_error, name,
                    " shapes the balance hedges in replica slots: it needs --redundant-slots");
      LOCUS_REQUIRE(!given || hedge_replicas > 0, locus::config_error, name,
                    " shapes the balance hedges, which --hedge-replicas 0 turns off");
    }
  }
  //! Refuses --eplb-groups that select DeepSeek's hierarchical policy (a multiple of the nodes) but
  //! that `experts` do not split into; EPLB said so only by its own function's name.
  //! @throws locus::config_error naming the option and the numbers
  void check_eplb_groups(std::size_t experts, std::size_t nodes) const {
    if (placement != "eplb" || nodes == 0 || eplb_groups % nodes != 0) return;
    LOCUS_REQUIRE(experts % eplb_groups == 0, locus::config_error, "--eplb-groups ", eplb_groups, ": the ", experts,
                  " experts do not split into ", eplb_groups,
                  " equal groups (a multiple of --nodes selects EPLB's hierarchical policy, which needs them to; "
                  "another count selects its global policy)");
  }
  //! Maps and the workload-aware grouping model fitted with them (locality refines the grouping
  //! jointly with the placement).
  //! `fit_grouping`: fit the grouping model even when the placement does not need it.
  //! `trace_name` names the trace in messages.
  locus::placement::activation_plan plan(const locus::trace::trace& train, const locus::dynamic_topology& topo,
                                         std::uint64_t seed, std::size_t prefill, bool fit_grouping,
                                         const std::string& trace_name) const {
    check_eplb_groups(train.experts(), topo.nodes());
    if (fits_grouping_model())
      require_prefill_and_decode(train, trace_name, prefill,
                                 placement == "locality" ? "--placement locality (with its workload-aware grouping)"
                                                         : "--placement activation_usage (with its workload-aware "
                                                           "grouping)");
    else if (fit_grouping)
      require_prefill_and_decode(train, trace_name, prefill, "the workload-aware grouping");
    locus::placement::activation_plan_options opt;
    opt.fit_grouping = fit_grouping;
    opt.named.eplb_groups = eplb_groups;
    opt.grouping.clusters = clusters;
    opt.grouping.seed = seed;
    opt.grouping.prefill_tokens = std::max<std::size_t>(1, prefill); // a cap; recorded phases may have more
    opt.refine.count(copies.empty() ? locus::placement::copy_count::both : locus::placement::parse_copy_count(copies));
    opt.refine.anneal_per_expert = anneal;
    opt.refine.balance_shift = balance_shift;
    opt.refine.hedge_replicas = hedge_replicas;
    opt.refine.fill_slack = fill_slack;
    opt.refine.hedge_class_spread = hedge_class_spread;
    opt.refine.hedge_cost_budget = hedge_cost_budget;
    opt.shift_by = shift_by == "class"     ? locus::placement::shift_group::request_class
                   : shift_by == "request" ? locus::placement::shift_group::request
                                           : locus::placement::shift_group::node;
    return locus::placement::plan_activation_aware(train, topo, placement,
                                                   redundant_per_gpu(train.experts(), topo.ranks()), opt);
  }
};

//! --load-iterations "FIRST:END" or "FIRST:" as an iteration window ("" is every iteration).
//! @throws locus::config_error for anything else (the option's check names the option)
inline locus::placement::iteration_window parse_iterations(const std::string& text) {
  locus::placement::iteration_window w;
  if (text.empty()) return w;
  const auto colon = text.find(':');
  const auto number = [&](std::string_view part, std::uint64_t& v) {
    const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), v);
    return !part.empty() && ec == std::errc{} && end == part.data() + part.size();
  };
  const std::string_view all(text);
  const bool ok = colon != std::string::npos && number(all.substr(0, colon), w.begin) &&
                  (colon + 1 == text.size() || number(all.substr(colon + 1), w.end));
  LOCUS_REQUIRE(ok, locus::config_error, "\"", text, "\": expected FIRST:END or FIRST: (whole numbers, END exclusive)");
  LOCUS_REQUIRE(w.begin < w.end, locus::config_error, "\"", text, "\" holds no iteration");
  return w;
}

//! Where `locus plan` writes the grouping model of map `map_path`: map.json -> map.grouping.json.
inline std::string grouping_path_for(const std::string& map_path) {
  const std::string ext = ".json";
  const bool json =
      map_path.size() > ext.size() && map_path.compare(map_path.size() - ext.size(), ext.size(), ext) == 0;
  return (json ? map_path.substr(0, map_path.size() - ext.size()) : map_path) + ".grouping.json";
}

inline void register_plan(CLI::App& app) {
  auto split = std::make_shared<split_options>();
  auto plan = std::make_shared<plan_options>();
  // A plan's default reads its input: EPLB balances the loads of a trace or of --load (as Python's
  // locus.plan does); simulate and compare keep linear, the baseline they measure against.
  plan->placement = "eplb";
  auto out = std::make_shared<std::string>("map.json");
  auto load = std::make_shared<std::string>();
  auto grouping = std::make_shared<std::string>();
  auto experts = std::make_shared<std::size_t>(0);
  auto json = std::make_shared<std::string>();
  auto iterations = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("plan", "Fit an expert map on a trace's training split and save it as JSON");
  auto* trace = split->add_to(cmd, false);
  plan->add_to(cmd, "both");
  cmd->add_option("--out", *out, "Output expert map JSON");
  auto* grouping_opt =
      cmd->add_option("--grouping", *grouping,
                      "Output grouping model JSON, for simulate --grouping (activation_usage and locality write one by "
                      "default, named after --out unless it is a device or stream; other placements only when this "
                      "is given)")
          ->default_str("MAP.grouping.json for activation_usage and locality");
  auto* load_opt = cmd->add_option("--load", *load,
                                   "Plan from engine statistics instead of a trace (linear, round_robin, eplb): a .npy "
                                   "of [layers, experts] loads or [tokens, layers, k] routed experts, or a "
                                   "TensorRT-LLM expert-statistics folder");
  cmd->add_option("--experts", *experts,
                  "Experts of the model, for routed-expert arrays (default: largest id + 1), route JSONL traces "
                  "(default: the meta line's num_experts) and ESFT folders (default: 64); a binary trace records "
                  "its own")
      ->check(experts_range())
      ->default_str(experts_default);
  auto* iterations_opt = cmd->add_option("--load-iterations", *iterations,
                                         "With --load of a TensorRT-LLM folder: sum iterations FIRST:END (END "
                                         "exclusive; FIRST: for every one from FIRST on). Default: all of them");
  iterations_opt->needs(load_opt)->check(tool_cli::parsed_by(parse_iterations, "FIRST:END"));
  trace->excludes(load_opt);
  add_json_option(cmd, *json);
  cmd->callback([cmd, split, plan, out, load, grouping, grouping_opt, experts, json, iterations] {
    if (load->empty() && split->trace_paths.empty()) throw CLI::RequiredError("--trace or --load");
    plan->check_applies(cmd);
    plan->clusters_given = cmd->count("--clusters") > 0;
    LOCUS_REQUIRE(grouping->empty() || load->empty(), locus::config_error,
                  "--grouping needs --trace: a plan from --load has no grouping model");
    // A plan from engine statistics reads no trace: its split, reading and grouping options would
    // be ignored without a word (--train-domains law planned on every domain's load).
    if (!load->empty())
      for (const char* name : {"--split", "--test-fraction", "--split-seed", "--skip-requests", "--train-domains",
                               "--test-domains", "--train-requests", "--test-requests", "--prefill-tokens",
                               "--split-on-restart", "--strict-layers", "--clusters"})
        LOCUS_REQUIRE(cmd->count(name) == 0, locus::config_error, name,
                      " applies to a trace (--trace); a plan from --load reads engine statistics");
    // activation_usage and locality write their grouping model beside the map unless told where.
    const bool grouped = grouping_opt->count() > 0 || plan->fits_grouping_model();
    // A map written to a device or stream (/dev/stdout, /dev/null) names no file to put the model
    // beside: "/dev/null.grouping.json" would be a stray file in /dev.
    const bool beside_out = grouped && grouping->empty() && load->empty() && is_device(*out);
    const std::string grouping_path = !load->empty()           ? std::string()
                                      : !grouping->empty()     ? *grouping
                                      : grouped && !beside_out ? grouping_path_for(*out)
                                                               : std::string();
    LOCUS_REQUIRE(!load->empty() || grouped || cmd->count("--clusters") == 0, locus::config_error,
                  "--clusters sizes the grouping model, which --placement ", plan->placement,
                  " fits only when --grouping asks for one");
    // The grouping model's file is named after --out where --grouping does not name it: a file there
    // that is no grouping model (the user never named it) is not replaced.
    std::error_code regular_error;
    if (grouping->empty() && !grouping_path.empty() && !is_device(grouping_path) &&
        std::filesystem::is_regular_file(grouping_path, regular_error))
      LOCUS_REQUIRE(replaceable_json(grouping_path, "locus-grouping"), locus::config_error, "--out ", *out,
                    " puts the grouping model in ", grouping_path,
                    ", which exists and is not one: writing it would replace it (name the model's file with "
                    "--grouping)");
    std::vector<std::string> inputs = split->input_paths();
    inputs.push_back(*load);
    check_outputs({{"--out", *out}, {"--grouping", grouping_path}, {"--json", *json}}, inputs);
    progress p("locus plan");
    if (!load->empty()) {
      const auto imported = locus::placement::import_load(*load, *experts, parse_iterations(*iterations));
      locus::placement::plan_input in;
      in.topology = split->topology();
      in.experts = imported.load.front().size();
      in.slots_per_rank =
          locus::placement::slots_for(in.experts, in.ranks(), plan->redundant_per_gpu(in.experts, in.ranks()));
      in.load = imported.load;
      LOCUS_REQUIRE(plan->placement == "linear" || plan->placement == "round_robin" || plan->placement == "eplb",
                    locus::config_error, "--load plans with linear, round_robin or eplb; \"", plan->placement,
                    "\" needs a trace");
      plan->check_eplb_groups(in.experts, split->nodes);
      locus::placement::named_plan_options opt;
      opt.eplb_groups = plan->eplb_groups;
      const auto maps = locus::placement::plan_by_name(plan->placement, in, opt);
      // TensorRT-LLM statistics and routed-experts arrays name the model layers (the arrays also
      // count the hidden layers); a [layers, experts] .npy does not.
      output_set files;
      files.add(*out,
                locus::expert_plan_text({maps, imported.layers_named ? imported.layer_ids : std::vector<std::size_t>{},
                                         imported.layers_named ? imported.hidden_layers : 0, split->gpus_per_node}));
      files.add_json(
          *json, "plan",
          {{"map", *out},
           {"placement", plan->placement},
           {"layers", maps.size()},
           {"model_layers", imported.layers_named ? nlohmann::json(imported.layer_ids) : nlohmann::json(nullptr)},
           {"experts", in.experts},
           {"nodes", split->nodes},
           {"gpus_per_node", split->gpus_per_node},
           {"slots_per_rank", in.slots_per_rank},
           {"load", *load},
           {"options", plan->settings(in.topology.ranks(), in.experts)}});
      files.commit();
      if (stdout_taken({*json, *out, grouping_path})) return;
      // Said as map check will say it: a [layers, experts] table names no model layer.
      const std::string layers_text =
          imported.layers_named ? "model layers: " + saved_layers_text(imported.layer_ids, imported.hidden_layers)
                                : std::string("no model layer numbers saved");
      std::printf("%s: %s placement, %s (%s), %zu experts on %zu x %zu ranks, %s per rank (from %s)\n",
                  one_line(*out).c_str(), plan->placement.c_str(), tool_cli::counted(maps.size(), "layer").c_str(),
                  layers_text.c_str(), in.experts, split->nodes, split->gpus_per_node,
                  tool_cli::counted(in.slots_per_rank, "slot").c_str(), one_line(*load).c_str());
      return;
    }
    const auto topo = split->topology(); // an impossible topology is refused before the trace is read
    split->experts = *experts;
    p.start("loading " + split->trace_name());
    const auto [train, test] = split->load(true, false);
    p.done();
    p.start("planning " + plan->placement);
    const auto planned = plan->plan(train, topo, split->split_seed, split->prefill_tokens, grouping_opt->count() > 0,
                                    split->trace_name());
    p.done();
    p.clear();
    const auto& maps = planned.maps;
    std::size_t replicas = 0;
    for (const auto& m : maps)
      replicas += m.replica_slots_used();
    // The map, its grouping model and the JSON are put in place together or not at all.
    output_set files;
    files.add(*out, locus::expert_plan_text(
                        {maps, train.has_model_layers() ? train.model_layer_ids() : std::vector<std::size_t>{},
                         train.hidden_layers(), split->gpus_per_node}));
    if (planned.model) files.add(grouping_path, locus::grouper::grouping_text(*planned.model));
    files.add_json(*json, "plan",
                   {{"map", *out},
                    {"placement", plan->placement},
                    {"layers", maps.size()},
                    {"experts", maps.front().experts()},
                    {"nodes", split->nodes},
                    {"gpus_per_node", split->gpus_per_node},
                    {"slots_per_rank", maps.front().slots_per_rank()},
                    {"train_requests", train.requests()},
                    {"replicas", replicas},
                    {"hedge_copies", planned.hedge_copies},
                    {"grouping",
                     planned.model && !grouping_path.empty() ? nlohmann::json(grouping_path) : nlohmann::json(nullptr)},
                    {"options", [&] {
                       auto o = plan->settings(topo.ranks(), maps.front().experts());
                       o["split_seed"] = split->split_seed; // it also seeds the grouping model's fit
                       if (split->prefill_opt->count() > 0) o["prefill_tokens"] = split->prefill_tokens;
                       return o;
                     }()}});
    files.commit();
    if (beside_out)
      std::fprintf(stderr,
                   "locus plan: the grouping model was not written: --out %s is no file to put it beside (name its "
                   "file with --grouping)\n",
                   one_line(*out).c_str());
    // k-means takes at most one cluster per training request: said where --clusters asked for more.
    if (plan->clusters_given && planned.model && planned.model->clusters() < plan->clusters)
      std::fprintf(stderr,
                   "locus plan: the grouping model has %zu clusters, not --clusters %zu: one per training "
                   "request at most\n",
                   planned.model->clusters(), plan->clusters);
    if (stdout_taken({*json, *out, grouping_path})) return;
    std::printf("%s: %s placement, %s, %zu experts on %zu x %zu ranks, %s per rank (fitted on %s)%s%s\n",
                one_line(*out).c_str(), plan->placement.c_str(), tool_cli::counted(maps.size(), "layer").c_str(),
                maps.front().experts(), split->nodes, split->gpus_per_node,
                tool_cli::counted(maps.front().slots_per_rank(), "slot").c_str(),
                tool_cli::counted(train.requests(), "request").c_str(),
                !grouping_path.empty() ? "; grouping model in " : "", one_line(grouping_path).c_str());
    if (replicas > 0)
      std::printf("%zu replicas over the layers, %zu of them balance hedges%s\n", replicas, planned.hedge_copies,
                  planned.hedge_copies > 0 ? " (--hedge-replicas 0 for none)" : "");
    // linear and round_robin place every expert once, and locality leaves a slot empty where no
    // replica saves a copy within its load bound: empty until map export fills them.
    std::size_t empty = 0;
    for (const auto& m : maps)
      empty += m.empty_slots();
    if (empty > 0)
      std::printf("%zu slots left empty over the layers (%s; map export fills them, by load with --load-trace)\n",
                  empty,
                  replicas > 0 ? "no replica there saves a copy within the load bound"
                               : (plan->placement + " places no replicas").c_str());
  });
}

//! Largest --hidden: above every model's hidden size, and small enough that byte counts stay far
//! from 64-bit overflow.
inline constexpr std::size_t max_hidden = std::size_t{1} << 24;
inline constexpr const char* expert_read_help =
    "Time model: microseconds to read one expert's weights (its bytes over HBM bandwidth; DeepSeek-V3's 44 MB of FP8 "
    "on an H200: 9.2), charged per expert a GPU runs in a step; a GPU's expert time is the larger of that and its "
    "rows' arithmetic (0.22 us per row). 0: not counted";
//! Refuses a simulation whose replica tables (one entry per GPU and expert) this machine cannot
//! hold, naming the options, once the trace is read and before planning or simulating: a large
//! topology grew until the kernel killed the run (or reported "out of memory" as if the input were
//! too large).
inline void require_simulation_memory(const locus::dynamic_topology& topo, std::size_t experts) {
  using selector = locus::transport::replica_selector<locus::dynamic_topology>;
  tool_cli::require_memory(static_cast<double>(selector::table_bytes_per_pair) * static_cast<double>(topo.ranks()) *
                               static_cast<double>(experts),
                           locus::detail::concat("simulating ", topo.nodes(), " nodes × ", topo.gpus_per_node(),
                                                 " GPUs (--nodes, --gpus-per-node, or a map's own) with ", experts,
                                                 " experts: the replica choice's tables (",
                                                 selector::table_bytes_per_pair, " bytes per GPU and expert)"));
}

inline constexpr const char* balance_window_help =
    "Also report GPU max/mean with the loads summed over windows of this many simulated steps (an arrival gap with "
    "nothing running is skipped, not counted; 0: not reported): from 1 (per step) up to the run's length (over the "
    "run), it tells a load that drifts over many steps from one that jitters per step";
//! Steps of traffic a re-plan sees with --drift-every and neither --replan-every nor --replan-window
//! (the vLLM default window scaled as bench/drift scales it: a one-step window re-planned on noise).
inline constexpr std::size_t drift_only_window = 100;

//! `n`'s digits grouped by thousands ("551,588").
inline std::string grouped_count(std::uint64_t n) {
  std::string digits = std::to_string(n);
  for (std::size_t i = digits.size(); i > 3; i -= 3)
    digits.insert(i - 3, ",");
  return digits;
}

//! `v` rounded to a whole number, its digits grouped by thousands ("551,588").
inline std::string grouped(double v) {
  if (!std::isfinite(v)) return "n/a";
  const std::string digits = grouped_count(static_cast<std::uint64_t>(std::llround(std::fabs(v))));
  return v < 0 ? "-" + digits : digits;
}

//! What `locus simulate` prints: the run, its figures with their units, then the on-line replay's
//! (the same figures as the --json document).
inline void print_simulation(const nlohmann::json& doc) {
  const auto num = [&](const nlohmann::json& j, const char* key) { return j.at(key).get<double>(); };
  // "1 request", "2 requests": a count written with grouped digits and its noun.
  const auto count = [&](const char* key, const char* noun) {
    return grouped(num(doc, key)) + " " + noun + (num(doc, key) == 1 ? "" : "s");
  };
  std::printf("simulated %s, %s in %s (%zu layers) on %zu x %zu GPUs: %s placement, %s grouping, %s transport\n",
              count("requests", "request").c_str(), count("decode_tokens", "decode token").c_str(),
              count("steps", "step").c_str(), doc.at("layers").get<std::size_t>(), doc.at("nodes").get<std::size_t>(),
              doc.at("gpus_per_node").get<std::size_t>(), doc.at("placement").get<std::string>().c_str(),
              doc.at("grouper").get<std::string>().c_str(), doc.at("transport").get<std::string>().c_str());
  std::printf("  inter-node bytes per token    %s\n", grouped(num(doc, "inter_node_bytes_per_token")).c_str());
  std::printf("  inter-node copies per token   %s\n", fixed(num(doc, "inter_node_copies_per_token"), 2).c_str());
  std::printf("  GPU max/mean (expert rows)    %s over the run, %s per step (weighted by the step's rows; %s "
              "the plain mean over steps)\n",
              fixed(num(doc, "gpu_imbalance_aggregate"), 3).c_str(),
              fixed(num(doc, "gpu_imbalance_step_weighted"), 3).c_str(),
              fixed(num(doc, "gpu_imbalance_step_mean"), 3).c_str());
  if (doc.contains("gpu_imbalance_window")) {
    // The window as a whole number: read back as a double, 2^64 - 1 printed as 0.
    const auto window = doc.at("balance_window").get<std::uint64_t>();
    std::printf("  GPU max/mean per window       %s (windows of %s simulated step%s)\n",
                fixed(num(doc, "gpu_imbalance_window"), 3).c_str(), grouped_count(window).c_str(),
                window == 1 ? "" : "s");
  }
  std::printf("  attention max/mean            %s (context tokens per GPU)\n",
              fixed(num(doc, "attention_imbalance"), 3).c_str());
  const double read_us = num(doc, "expert_read_us");
  std::printf("  layer time estimate           %s us (model; %s)\n",
              fixed(num(doc, "layer_time_estimate_us"), 2).c_str(),
              read_us > 0 ? (fixed(read_us, 2) + " us per expert read").c_str() : "expert weight reads not counted");
  std::printf("  idle steps                    %s\n", grouped(num(doc, "idle_steps")).c_str());
  if (doc.contains("online")) {
    const auto& o = doc.at("online");
    std::printf("re-planned on line: %zu re-plans (%zu on drift, %zu on balance)\n", o.at("replans").get<std::size_t>(),
                o.at("drift_replans").get<std::size_t>(), o.at("balance_replans").get<std::size_t>());
    std::printf("  inter-node bytes per token    %s\n", grouped(num(o, "inter_node_bytes_per_token")).c_str());
    std::printf("  GPU max/mean (expert rows)    %s over the run, %s per step (weighted by the step's rows), %s in "
                "the worst window of %s tokens\n",
                fixed(num(o, "gpu_imbalance_aggregate"), 3).c_str(),
                fixed(num(o, "gpu_imbalance_step_weighted"), 3).c_str(),
                fixed(num(o, "worst_window_imbalance"), 3).c_str(),
                grouped_count(locus::cost::online_options{}.report_tokens).c_str());
    if (o.contains("gpu_imbalance_window")) {
      const auto window = o.at("balance_window").get<std::uint64_t>();
      std::printf("  GPU max/mean per window       %s (windows of %s simulated step%s)\n",
                  fixed(num(o, "gpu_imbalance_window"), 3).c_str(), grouped_count(window).c_str(),
                  window == 1 ? "" : "s");
    }
    std::printf("  moved                         at most %s%% of the slots per re-plan, %s bytes of weights\n",
                fixed(100 * num(o, "max_moved_share"), 1).c_str(), grouped(num(o, "bytes_moved")).c_str());
  }
  std::printf("took %s s\n", fixed(num(doc, "seconds"), 2).c_str());
}

inline void register_simulate(CLI::App& app) {
  struct options {
    std::string map_path, grouping_path, grouper = "round_robin", transport = "flat", replica_rule = "locality_first";
    double replica_slack = 0.05;
    std::size_t batch_per_rank = 32, hidden = 2048, balance_window = 0;
    double expert_read_us = 0;
    double arrival_rate = 0;
    std::string json;
    // On-line re-planning (cost/online_replan.hpp): off unless an interval or a drift period is set.
    std::size_t replan_every = 0, replan_window = 0, drift_every = 0;
    double replan_budget = 0.10;
    double replan_slack = locus::placement::token_refine_options{}.replan_slack;
    double balance_trigger = locus::cost::default_balance_trigger;
    std::uint64_t expert_bytes = 3ull * 2048 * 1408 * 2;
  };
  auto split = std::make_shared<split_options>();
  auto plan = std::make_shared<plan_options>();
  auto opt = std::make_shared<options>();
  auto* cmd = app.add_subcommand("simulate", "Simulate decode on a trace's test split and report traffic");
  split->add_to(cmd);
  cmd->add_option("--experts", split->experts, experts_help)->check(experts_range())->default_str(experts_default);
  plan->add_to(cmd, "the simulated --transport's");
  cmd->add_option("--map", opt->map_path,
                  "Expert map JSON (instead of --placement); without --nodes and --gpus-per-node the run takes the "
                  "topology the map was planned for, where the map names it (plan saves it)")
      ->default_str("none: planned by --placement");
  cmd->add_option("--grouping", opt->grouping_path,
                  "Grouping model JSON written by plan (with --map: used as saved, nothing is fitted)")
      ->check(CLI::ExistingFile)
      ->default_str("none: fitted on the training split when used");
  cmd->add_option("--grouper", opt->grouper, "Grouper: round_robin, least_loaded, workload_aware")
      ->check(CLI::IsMember(locus::grouper::grouper_names()));
  cmd->add_option("--transport", opt->transport, "flat or hierarchical")
      ->check(CLI::IsMember({"flat", "hierarchical"}));
  cmd->add_option("--replica-rule", opt->replica_rule,
                  "How a copy picks among an expert's replicas: locality_first (locus), same_gpu_else_random "
                  "(SGLang static dispatch), random (vLLM EPLB), locality_bounded (locality first, away from GPUs "
                  "above the load bound)")
      ->check(CLI::IsMember(tool_cli::names_of(locus::placement::all_replica_rules)));
  cmd->add_option("--replica-slack", opt->replica_slack,
                  "locality_bounded: a GPU is avoided when its load so far exceeds (1 + slack) x the mean")
      ->check(tool_cli::finite_non_negative);
  cmd->add_option("--batch-per-rank", opt->batch_per_rank, "Running requests per rank (GPU)")
      ->check(tool_cli::positive_whole);
  cmd->add_option(
         "--hidden", opt->hidden,
         "Hidden size (message sizes: FP8 dispatch, BF16 combine); the default is DeepSeek-V2-Lite's, the ESFT traces' "
         "model (DeepSeek-V3: 7168, Qwen3-235B: 4096, Llama 4: 5120)")
      ->check(CLI::Range(std::size_t{1}, max_hidden));
  cmd->add_option("--arrival-rate", opt->arrival_rate, "Poisson arrivals per step (0: all at once)")
      ->check(tool_cli::finite_non_negative);
  cmd->add_option("--expert-read-us", opt->expert_read_us, expert_read_help)
      ->check(tool_cli::number_in(0.0, locus::cost::max_expert_read_us));
  cmd->add_option("--balance-window", opt->balance_window,
                  std::string(balance_window_help) +
                      "; with --replan-every or --drift-every, the re-planned replay's too");
  add_json_option(cmd, opt->json);
  cmd->add_option("--replan-every", opt->replan_every,
                  "Re-plan the maps every this many steps from recent traffic (0: never); adds an `online` block, the "
                  "same run replayed with the re-plans (the other figures are the run without them). Steps are the "
                  "simulated ones: an arrival gap with nothing running is skipped");
  cmd->add_option("--replan-window", opt->replan_window,
                  "Steps of traffic a re-plan sees (0: the interval, or " + std::to_string(drift_only_window) +
                      " steps with --drift-every alone)");
  cmd->add_option("--replan-budget", opt->replan_budget, "Share of the expert slots one re-plan may move")
      ->check(tool_cli::number_in(0, 1))
      ->default_str("0.1 (at least a pair of slots)");
  cmd->add_option("--replan-slack", opt->replan_slack,
                  "A re-plan's load bound: it first repairs the GPUs above (1 + this) x the mean load (the window's, "
                  "with the training split's traffic counted as " +
                      std::to_string(static_cast<int>(locus::placement::default_prior_requests)) +
                      " requests beside it when the run groups with workload_aware), as far as its budget allows, and "
                      "no other swap "
                      "raises a GPU above it")
      ->check(tool_cli::finite_non_negative);
  cmd->add_option("--drift-every", opt->drift_every,
                  "Steps between drift checks that re-plan early (0: none); with --grouper workload_aware the first "
                  "check compares the steps so far with the training traffic, else it waits for a full window");
  cmd->add_option(
         "--balance-trigger", opt->balance_trigger,
         "With --drift-every: also re-plan at a drift check when the GPU max/mean the maps measure since the "
         "last re-plan exceeds this (0: off). A re-plan on drift or balance comes at least a window (--replan-window) "
         "after the last re-plan")
      ->check(tool_cli::zero_or_at_least_one);
  cmd->add_option("--expert-bytes", opt->expert_bytes,
                  "Weight bytes of one expert (moved bytes); the default is DeepSeek-V2-Lite's (3 x 2048 x "
                  "1408 in BF16; DeepSeek-V3: 3 x 7168 x 2048 x 1 in FP8)")
      ->check(CLI::Range(std::uint64_t{0}, locus::placement::max_expert_bytes));
  cmd->callback([cmd, split, plan, opt] {
    const auto start = std::chrono::steady_clock::now();
    // A saved map names the topology it was planned for (plan writes it): without --nodes and
    // --gpus-per-node the run takes it. Either way an impossible topology, or a map that is not
    // one, is refused before the trace is read.
    std::optional<locus::expert_plan_file> map_file;
    if (!opt->map_path.empty()) map_file = locus::load_expert_plan(opt->map_path);
    const bool topology_given = cmd->count("--nodes") > 0 || cmd->count("--gpus-per-node") > 0;
    const auto topo =
        map_file && map_file->gpus_per_node > 0 && !topology_given
            ? locus::dynamic_topology(map_file->maps.front().ranks() / map_file->gpus_per_node, map_file->gpus_per_node)
            : split->topology();
    const bool saved = !opt->map_path.empty() && !opt->grouping_path.empty();
    // With --map nothing is planned, unless the workload-aware grouper needs a model and no saved
    // one is given: then the planner options fit it (locality refines it with its own maps).
    const bool map_only = !opt->map_path.empty() && (saved || opt->grouper != "workload_aware");
    if (map_only)
      for (const char* name : plan_options::option_names)
        LOCUS_REQUIRE(cmd->count(name) == 0, locus::config_error, name, " does not apply: --map simulates the saved ",
                      "plan as it is (", saved ? "with its saved grouping" : "--grouper " + opt->grouper, ")");
    else
      plan->check_applies(cmd);
    // The grouping model is fitted for the workload-aware grouper and by the planners that use one.
    LOCUS_REQUIRE(map_only || cmd->count("--clusters") == 0 || opt->grouper == "workload_aware" ||
                      plan->fits_grouping_model(),
                  locus::config_error, "--clusters sizes the grouping model, which --placement ", plan->placement,
                  " with --grouper ", opt->grouper, " does not fit");
    LOCUS_REQUIRE(opt->grouping_path.empty() || opt->grouper == "workload_aware", locus::config_error,
                  "--grouping is the workload_aware grouper's model, which --grouper ", opt->grouper,
                  " does not use: add --grouper workload_aware to group requests by it");
    LOCUS_REQUIRE(cmd->count("--replica-slack") == 0 || opt->replica_rule == "locality_bounded", locus::config_error,
                  "--replica-slack is locality_bounded's load bound; --replica-rule ", opt->replica_rule,
                  " does not use it");
    LOCUS_REQUIRE(opt->replan_every > 0 || opt->drift_every > 0 ||
                      (cmd->count("--replan-window") == 0 && cmd->count("--replan-budget") == 0 &&
                       cmd->count("--replan-slack") == 0 && cmd->count("--expert-bytes") == 0),
                  locus::config_error,
                  "--replan-window, --replan-budget, --replan-slack and --expert-bytes apply with --replan-every or "
                  "--drift-every");
    LOCUS_REQUIRE(opt->drift_every > 0 || cmd->count("--balance-trigger") == 0, locus::config_error,
                  "--balance-trigger acts at the drift checks: it applies with --drift-every");
    std::vector<std::string> inputs = split->input_paths();
    inputs.push_back(opt->map_path);
    inputs.push_back(opt->grouping_path);
    check_outputs({{"--json", opt->json}}, inputs);
    progress p("locus simulate");
    p.start("loading " + split->trace_name());
    const auto [train, test] = split->load(!map_only, true);
    p.done();
    require_decode_tokens(test, split->trace_name(), split->prefill_tokens);
    require_simulation_memory(topo, test.experts());
    // With --map and --grouping the saved plan and grouping are used as they are. Otherwise the
    // workload-aware model is fitted on the training split (with --placement, together with the maps).
    const auto transport = locus::cost::parse_transport_kind(opt->transport); // bad names fail before planning
    const auto replica_rule = locus::placement::parse_replica_rule(opt->replica_rule);
    LOCUS_REQUIRE(opt->grouping_path.empty() || !opt->map_path.empty(), locus::config_error,
                  "--grouping is used with --map (the grouping a saved plan was made with)");
    locus::placement::activation_plan planned;
    // A saved plan names the topology it was made for: a locality plan is wrong on another.
    const auto load_map = [&] {
      auto file = std::move(*map_file);
      LOCUS_REQUIRE(file.gpus_per_node == 0 ||
                        (file.gpus_per_node == topo.gpus_per_node() && file.maps.front().ranks() == topo.ranks()),
                    locus::config_error, "the map in ", opt->map_path, " was planned for ",
                    file.maps.front().ranks() / std::max<std::size_t>(file.gpus_per_node, 1), " nodes x ",
                    file.gpus_per_node, " GPUs; this run has ", topo.nodes(), " x ", topo.gpus_per_node(),
                    " (--nodes, --gpus-per-node)");
      return std::move(file.maps);
    };
    if (map_only) planned.maps = load_map();
    if (saved) {
      planned.model =
          std::make_shared<const locus::grouper::workload_model>(locus::grouper::load_grouping(opt->grouping_path));
      LOCUS_REQUIRE(planned.model->nodes() == topo.nodes(), locus::config_error, "the grouping in ", opt->grouping_path,
                    " is for ", planned.model->nodes(), " nodes, the simulation has ", topo.nodes());
    } else if (!map_only) {
      auto for_run = *plan;
      if (for_run.copies.empty())
        for_run.copies = locus::cost::to_string(transport); // plan for the transport simulated
      p.start("planning " + plan->placement);
      planned = for_run.plan(train, topo, split->split_seed, split->prefill_tokens, opt->grouper == "workload_aware",
                             split->trace_name());
      if (!opt->map_path.empty()) planned.maps = load_map();
      p.done();
    }
    const auto& maps = planned.maps;
    // A saved map of another model is named as the file, not as the simulator's arguments.
    LOCUS_REQUIRE(opt->map_path.empty() || (maps.size() == test.layers() && maps.front().experts() == test.experts() &&
                                            maps.front().ranks() == topo.ranks()),
                  locus::config_error, "the map in ", opt->map_path, " has ", maps.size(), " layers of ",
                  maps.front().experts(), " experts on ", maps.front().ranks(), " ranks; the trace has ", test.layers(),
                  " layers of ", test.experts(), " experts and the topology ", topo.ranks(), " ranks");
    locus::cost::simulation_config cfg;
    cfg.topology = topo;
    cfg.transport = transport;
    cfg.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(opt->hidden);
    cfg.links.expert_read_us = opt->expert_read_us;
    cfg.batch_per_rank = opt->batch_per_rank;
    cfg.arrival_rate = opt->arrival_rate;
    cfg.seed = split->split_seed;
    cfg.replica_rule = replica_rule;
    cfg.replica_slack = opt->replica_slack;
    cfg.balance_window = opt->balance_window;
    auto grouper = locus::grouper::grouper_by_name(opt->grouper, planned.model);
    p.start("simulating decode");
    const auto result = locus::cost::simulate_decode(test, maps, grouper, cfg);
    p.done();
    auto doc = locus::cost::simulation_summary_json(result);
    if (opt->replan_every > 0 || opt->drift_every > 0) {
      // The same run replayed under maps re-planned on line: the window's tokens with the training
      // sample the plan was fitted on, at most replan_budget of the slots moved per re-plan.
      p.start("replaying with on-line re-planning");
      auto regroup = locus::grouper::grouper_by_name(opt->grouper, planned.model);
      const auto sched = locus::cost::record_schedule(test, maps, regroup, cfg);
      const std::size_t window = opt->replan_window  ? opt->replan_window
                                 : opt->replan_every ? opt->replan_every
                                                     : drift_only_window;
      // The prior is the training split on the nodes the workload_aware grouping gives its requests
      // (each classified by the model, fitted here or loaded: a saved grouping keeps no training
      // labels, and both must give the same run). Other groupers place requests without the model,
      // so the model's nodes would be the wrong ones: the re-plans then see the window alone, and
      // drift checks wait for a full window to compare with.
      locus::placement::activation_plan_options popt;
      const std::size_t tokens = popt.refine_sample_tokens(test.layers(), test.top_k());
      const auto prior = planned.model && opt->grouper == "workload_aware"
                             ? locus::placement::decode_token_sample(
                                   train,
                                   locus::placement::assumed_request_nodes(train, planned.model.get(), topo.nodes(),
                                                                           split->prefill_tokens),
                                   tokens)
                             : locus::placement::token_sample{};
      popt.refine.count(transport == locus::cost::transport_kind::flat ? locus::placement::copy_count::flat
                                                                       : locus::placement::copy_count::hierarchical);
      popt.refine.replicas.rule = replica_rule; // the re-plans count copies as the run routes them
      popt.refine.replan_slack = opt->replan_slack;
      locus::cost::online_options o;
      o.interval = opt->replan_every;
      o.window = window;
      o.drift_every = opt->drift_every;
      o.min_gap = o.window;
      o.balance_trigger = opt->balance_trigger;
      if (prior.tokens() > 0) { // the traffic the maps were fitted to: drift is checked from the start
        o.reference = locus::cost::load_profile::of(prior, topo.nodes());
        o.min_check = opt->drift_every;
      }
      // A run shorter than the first step a re-plan can happen would report none as a result.
      LOCUS_REQUIRE(locus::cost::first_replan_step(o) < sched.steps(), locus::config_error, "the run has ",
                    sched.steps(), " steps, and with a window of ", window, " steps neither --replan-every ",
                    opt->replan_every, " nor --drift-every ", opt->drift_every, " acts before its end");
      o.expert_bytes = opt->expert_bytes;
      if (cmd->count("--replan-budget") == 0) opt->replan_budget = locus::placement::default_budget_for(maps);
      locus::placement::require_movable_budget(opt->replan_budget, maps, "--replan-budget");
      const auto budget = locus::placement::budget_slots(opt->replan_budget, maps);
      const auto online = locus::cost::run_online(
          test, sched, maps, cfg, o, [&](const std::vector<locus::expert_map>& cur, std::size_t a, std::size_t b) {
            const auto sample =
                locus::placement::with_prior(locus::cost::window_sample(test, sched, a, b, topo, tokens), prior);
            return locus::placement::replan_by_tokens(cur, sample, topo, popt.refine, budget, opt->expert_bytes).maps;
          });
      std::size_t drifted = 0;
      for (const auto& e : online.replans)
        drifted += e.reason == locus::cost::replan_reason::drift;
      doc["online"] = {{"inter_node_bytes_per_token", online.inter_node_bytes_per_token},
                       {"gpu_imbalance_aggregate", online.gpu_imbalance_aggregate},
                       {"gpu_imbalance_step_weighted", online.gpu_imbalance_step_weighted},
                       {"worst_window_imbalance", online.worst_window_imbalance},
                       {"replans", online.replans.size()},
                       {"drift_replans", drifted},
                       {"balance_replans", online.balance_fired},
                       {"max_moved_share", online.max_moved_share},
                       {"bytes_moved", online.bytes_moved}};
      if (online.balance_window > 0) {
        doc["online"]["balance_window"] = online.balance_window;
        doc["online"]["gpu_imbalance_window"] = online.gpu_imbalance_window;
      }
    }
    doc["placement"] = opt->map_path.empty() ? plan->placement : opt->map_path;
    doc["nodes"] = topo.nodes(); // a saved map's own topology where it has one
    doc["gpus_per_node"] = topo.gpus_per_node();
    doc["grouper"] = opt->grouper;
    doc["transport"] = opt->transport;
    doc["expert_read_us"] = opt->expert_read_us;
    doc["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    p.clear();
    if (!stdout_taken({opt->json})) {
      print_simulation(doc);
      std::fflush(stdout);
    }
    write_json(opt->json, "simulate", doc);
  });
}

} // namespace locus_driver
