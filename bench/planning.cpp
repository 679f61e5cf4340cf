// Question: is activation-aware planning fast enough at DeepSeek-V3 shape (256 experts, 58 MoE
// layers, top-8, 16 clusters) on one core? Measures
//   - workload_aware::assign per request (target ≤ 20 µs), beside least_loaded::assign (baseline);
//   - full planning from a 100k-token trace: model fit (k-means + classifier), joint grouping
//     refinement and the locality placement (target < 2 s), beside eplb on the same input;
//   - the micro-batch split of one rank's batch (max/mean of the per-micro-batch busiest GPU,
//     against the contiguous split) and an on-line re-plan under a migration budget.
// The trace is synthetic (in-process, seeded): requests of 8 kinds, each kind routing mostly to
// its own rotating block of experts.
//
//   planning [--out DIR] [--tokens N] [--requests-per-kind R]
// Writes DIR/planning.json; prints a table of ratios last.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/cost/online_replan.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/grouper/micro_batch.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/migration.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace {

using bench_args::cpu_now;

double seconds_since(double t) { return cpu_now() - t; }

// `tokens` tokens in requests of 100 (32 prefill + 68 decode); kind d = request mod kinds routes
// with probability 0.7 into a block of 32 experts starting at 32·d (shifted by the layer).
locus::trace::trace synthetic(std::size_t tokens, std::size_t experts, std::size_t k, std::size_t layers,
                              std::size_t kinds, std::uint64_t seed) {
  const std::size_t len = 100, requests = tokens / len;
  locus::trace::trace_builder b(experts, k, layers);
  std::vector<std::string> names;
  for (std::size_t d = 0; d < kinds; ++d)
    names.push_back("kind" + std::to_string(d));
  b.set_domains(names);
  b.reserve_tokens(requests * len);
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(r, static_cast<std::uint32_t>(r % kinds), len);
  locus::trace::detail::splitmix64 g(seed);
  const std::size_t block = experts / kinds;
  for (std::size_t l = 0; l < layers; ++l) {
    auto ids = b.layer_ids(l);
    auto w = b.layer_weights(l);
    for (std::size_t r = 0; r < requests; ++r) {
      const std::size_t d = r % kinds;
      for (std::size_t t = r * len; t < (r + 1) * len; ++t) {
        for (std::size_t j = 0; j < k; ++j) {
          std::size_t e;
          bool fresh;
          do {
            e = g.uniform() < 0.7 ? (d * block + g.below(block) + 3 * l) % experts : g.below(experts);
            fresh = true;
            for (std::size_t i = 0; i < j; ++i)
              fresh &= ids[t * k + i] != e;
          } while (!fresh);
          ids[t * k + j] = static_cast<locus::trace::trace_expert_id>(e);
          w[t * k + j] = 1.0f / static_cast<float>(k);
        }
      }
    }
  }
  return b.build().with_prefill_tokens(32);
}

// DeepSeek-V3's MoE shape, the clusters fitted and the synthetic request kinds.
namespace v3 {
constexpr std::size_t experts = 256, k = 8, layers = 58, clusters = 16, kinds = 8;
} // namespace v3

// Full planning (fit, joint refinement, locality placement with one redundant slot per GPU, the
// token-level stage) timed step by step, plus the stage with annealing and EPLB beside it.
struct planning_run {
  std::shared_ptr<locus::grouper::workload_model> model;
  std::vector<locus::expert_map> maps;
  locus::placement::activation_plan_options opt;
  std::size_t sample_tokens = 0;
  std::size_t hedge_budget = 0, hedge_copies = 0; // hedge copies per layer at most; kept over all layers
  double fit_s = 0, joint_s = 0, place_s = 0, token_s = 0, anneal_token_s = 0, eplb_s = 0;
  double local = 0, cost_before = 0, cost_after = 0, cost_annealed = 0;
  double total_s() const { return fit_s + joint_s + place_s + token_s; }
};

planning_run time_planning(const locus::trace::trace& train, const locus::dynamic_topology& topo, std::size_t anneal,
                           std::size_t hedge_replicas) {
  planning_run p;
  auto& opt = p.opt;
  opt.refine.hedge_replicas = hedge_replicas;
  opt.grouping.clusters = v3::clusters;
  opt.grouping.restarts = 1;
  auto t0 = cpu_now();
  p.model =
      std::make_shared<locus::grouper::workload_model>(locus::grouper::workload_model::fit(train, topo, opt.grouping));
  p.fit_s = seconds_since(t0);
  auto in = locus::placement::plan_input_from_trace(train, topo, 1);
  t0 = cpu_now();
  p.local = locus::placement::refine_grouping(*p.model, in, opt.named.locality, opt.joint);
  p.joint_s = seconds_since(t0);
  t0 = cpu_now();
  in.node_load = p.model->node_load();
  auto node_opt = opt.named.locality;
  node_opt.replicas = false; // chosen by the token-level stage, as plan_activation_aware does
  const auto node_maps = locus::placement::locality{node_opt}.plan(in);
  p.place_s = seconds_since(t0);
  // Token-level stage on a sample of the training decode tokens (as plan_activation_aware runs it).
  t0 = cpu_now();
  const auto sample =
      locus::placement::token_sample_from_model(train, *p.model, opt.refine_sample_tokens(v3::layers, v3::k));
  p.maps = locus::placement::token_level_stage(node_maps, sample, topo, opt, true, &p.hedge_copies);
  p.token_s = seconds_since(t0);
  p.sample_tokens = sample.tokens();
  p.hedge_budget = opt.refine.hedge_budget(topo.ranks());
  // The sample's copy cost before and after the stage.
  p.cost_before = locus::placement::sample_copy_cost(node_maps, sample, topo, opt.refine);
  p.cost_after = locus::placement::sample_copy_cost(p.maps, sample, topo, opt.refine);
  // The same stage with annealing after the sweeps (what bench/comm_volume runs on ESFT): not in
  // the planning total, which is for the defaults; shown for its extra time at this shape.
  auto aopt = opt;
  aopt.refine.anneal_per_expert = anneal;
  t0 = cpu_now();
  const auto annealed_maps =
      anneal > 0 ? locus::placement::token_level_stage(node_maps, sample, topo, aopt, true) : p.maps;
  p.anneal_token_s = anneal > 0 ? seconds_since(t0) : 0.0;
  p.cost_annealed = locus::placement::sample_copy_cost(annealed_maps, sample, topo, opt.refine);
  t0 = cpu_now();
  static_cast<void>(locus::placement::eplb{1}.plan(in));
  p.eplb_s = seconds_since(t0);
  return p;
}

// assign() per request in µs, workload_aware and least_loaded, on a cluster with room everywhere
// (the state is reset each request so that every call does the full work: classify + pick a rank).
struct assign_times {
  double workload_aware_us = 0, least_loaded_us = 0;
  std::size_t sink = 0;
};

assign_times time_assign(const locus::trace::trace& test, const locus::dynamic_topology& topo,
                         const std::shared_ptr<locus::grouper::workload_model>& model) {
  std::vector<locus::grouper::rank_state> st(topo.ranks());
  const locus::grouper::cluster_state cs{topo, st, 1u << 30};
  locus::grouper::workload_aware wa(model);
  locus::grouper::least_loaded ll;
  const std::size_t reps = 20000;
  assign_times a;
  auto t0 = cpu_now();
  for (std::size_t i = 0; i < reps; ++i)
    a.sink += wa.assign({&test, i % test.requests(), 32}, cs);
  a.workload_aware_us = seconds_since(t0) * 1e6 / static_cast<double>(reps);
  t0 = cpu_now();
  for (std::size_t i = 0; i < reps; ++i)
    a.sink += ll.assign({&test, i % test.requests(), 32}, cs);
  a.least_loaded_us = seconds_since(t0) * 1e6 / static_cast<double>(reps);
  return a;
}

// Classification accuracy on the synthetic kinds (cluster → majority kind of its training requests).
double classification_accuracy(const locus::grouper::workload_model& model, const locus::trace::trace& train,
                               const locus::trace::trace& test) {
  std::vector<std::vector<std::size_t>> votes(model.clusters(), std::vector<std::size_t>(v3::kinds, 0));
  for (std::size_t i = 0; i < model.training_requests().size(); ++i)
    ++votes[model.training_labels()[i]][train.request(model.training_requests()[i]).domain];
  std::vector<std::uint32_t> scratch;
  std::size_t right = 0;
  for (std::size_t r = 0; r < test.requests(); ++r) {
    const auto c = model.classify(test, r, 32, scratch);
    const auto& v = votes[c.cluster];
    right += static_cast<std::size_t>(std::max_element(v.begin(), v.end()) - v.begin()) == test.request(r).domain;
  }
  return static_cast<double>(right) / static_cast<double>(test.requests());
}

// Busiest-GPU max/mean of one rank's batch of 64 requests split into 2 micro-batches by
// prefill-estimated loads, and of contiguous halves (the baseline).
std::pair<double, double> micro_batch_balance(const locus::trace::trace& test,
                                              const std::vector<locus::expert_map>& maps) {
  std::vector<std::size_t> batch(64);
  for (std::size_t i = 0; i < batch.size(); ++i)
    batch[i] = i * 7 % test.requests();
  const auto est = locus::grouper::request_gpu_load(test, batch, maps, 0, 32);
  const auto actual = locus::grouper::request_gpu_load(test, batch, maps, 32, 68);
  const auto split = locus::grouper::split_micro_batches(est, 2);
  std::vector<std::uint32_t> contiguous(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i)
    contiguous[i] = i < batch.size() / 2 ? 0 : 1;
  return {locus::grouper::evaluate_micro_batches(actual, split.batch_of, 2).peak_max_over_mean,
          locus::grouper::evaluate_micro_batches(actual, contiguous, 2).peak_max_over_mean};
}

// Re-planning with the test trace as the new window, as on-line re-planning sees one: the test
// requests placed by the fitted grouping, a sample of their decode tokens; at most 32 experts move
// (DeepSeek-V3 expert: 3 matrices of 7168 × 2048 in FP8 ≈ 44 MB). Returns the result, the sample's
// tokens and the re-plan's time (the sample is not timed).
struct replan_run {
  locus::placement::migration_result result;
  std::size_t sample_tokens = 0;
  double seconds = 0;
};

replan_run time_replan(const locus::trace::trace& test, const locus::dynamic_topology& topo, const planning_run& p) {
  locus::cost::simulation_config cfg;
  cfg.topology = topo;
  locus::grouper::workload_aware wa(p.model);
  const auto sched = locus::cost::record_schedule(test, p.maps, wa, cfg);
  const auto sample =
      locus::cost::window_sample(test, sched, 0, sched.steps(), topo, p.opt.refine_sample_tokens(v3::layers, v3::k));
  replan_run r;
  r.sample_tokens = sample.tokens();
  const std::uint64_t expert_bytes = 3ull * 7168 * 2048;
  const auto t0 = cpu_now();
  r.result = locus::placement::replan_by_tokens(p.maps, sample, topo, p.opt.refine, 32, expert_bytes);
  r.seconds = seconds_since(t0);
  return r;
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Activation-aware planning at DeepSeek-V3 shape: assign per request, full planning"};
  tool_cli::show_defaults(app);
  std::string out_dir = ".";
  std::size_t tokens = 100000, anneal = 300;
  std::size_t hedge_replicas = locus::placement::token_refine_options{}.hedge_replicas;
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  // Requests of 100 tokens, at least one per cluster the workload model fits (fewer made no request).
  app.add_option("--tokens", tokens, "Tokens of the synthetic training trace, in requests of 100 (32 prefill)")
      ->check(CLI::Range(std::size_t{100} * v3::clusters, std::size_t{100'000'000}));
  app.add_option("--anneal", anneal, "Annealing proposals per expert in the timed annealing run");
  app.add_option("--hedge-replicas", hedge_replicas,
                 "Token-level stage: balance hedge copies per layer at most (0: off; default: one per GPU)")
      ->default_str("one per GPU");
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/planning");
  constexpr std::size_t experts = v3::experts, k = v3::k, layers = v3::layers, clusters = v3::clusters,
                        kinds = v3::kinds;
  const locus::dynamic_topology topo(8, 8);

  const auto t0 = cpu_now();
  const auto train = synthetic(tokens, experts, k, layers, kinds, 1);
  const auto test = synthetic(20000, experts, k, layers, kinds, 2);
  const double gen_s = seconds_since(t0);

  const planning_run p = time_planning(train, topo, anneal, hedge_replicas);
  const assign_times at = time_assign(test, topo, p.model);
  const double accuracy = classification_accuracy(*p.model, train, test);
  const auto [split_peak, contiguous_peak] = micro_batch_balance(test, p.maps);
  const replan_run rp = time_replan(test, topo, p);
  const auto& re = rp.result;
  const double plan_s = p.total_s();
  const double cost_ratio = p.cost_before > 0 ? p.cost_after / p.cost_before : 1.0;
  const double annealed_ratio = p.cost_before > 0 ? p.cost_annealed / p.cost_before : 1.0;

  nlohmann::json doc = {{"command", run.command},
                        {"machine", run.machine},
                        {"shape", {{"experts", experts}, {"top_k", k}, {"layers", layers}, {"clusters", clusters}}},
                        {"topology", "8x8"},
                        {"train_tokens", train.tokens()},
                        {"train_requests", train.requests()},
                        {"generate_s", gen_s},
                        {"fit_s", p.fit_s},
                        {"joint_refine_s", p.joint_s},
                        {"locality_place_s", p.place_s},
                        {"token_refine_s", p.token_s},
                        {"token_refine_sample_tokens", p.sample_tokens},
                        {"token_refine_cost_ratio", cost_ratio},
                        {"hedge_replicas", p.hedge_budget},
                        {"hedge_copies", p.hedge_copies},
                        {"anneal_per_expert", anneal},
                        {"token_refine_annealed_s", p.anneal_token_s},
                        {"token_refine_annealed_cost_ratio", annealed_ratio},
                        {"planning_total_s", plan_s},
                        {"eplb_place_s", p.eplb_s},
                        {"joint_local_fraction", p.local},
                        {"assign_us", at.workload_aware_us},
                        {"least_loaded_assign_us", at.least_loaded_us},
                        {"classification_accuracy", accuracy},
                        {"micro_batch_peak_max_over_mean", split_peak},
                        {"contiguous_peak_max_over_mean", contiguous_peak},
                        {"replan_experts_moved", re.experts_moved},
                        {"replan_bytes_moved", re.bytes_moved},
                        {"replan_sample_tokens", rp.sample_tokens},
                        {"replan_cost_before", re.cost_before},
                        {"replan_cost_after", re.cost_after},
                        {"replan_s", rp.seconds},
                        {"sink", at.sink}};
  bench_output::files()[folder.file("planning.json")] << doc.dump(1) << '\n';

  std::printf("Times are CPU time of one thread.\n");
  std::printf("DeepSeek-V3 shape: %zu experts, top-%zu, %zu layers, %zu clusters, 8x8; training trace %zu tokens "
              "(%zu requests), generated in %.2f s\n\n",
              experts, k, layers, clusters, train.tokens(), train.requests(), gen_s);
  std::printf("%-44s %12s %12s %8s\n", "measure", "value", "baseline", "ratio");
  std::printf("%-44s %10.2f µs %10.3f µs %8.1f  (target ≤ 20 µs; baseline least_loaded)\n", "assign() per request",
              at.workload_aware_us, at.least_loaded_us, at.workload_aware_us / at.least_loaded_us);
  std::printf("%-44s %11.3f s %11.3f s %8.1f  (target < 2 s; baseline eplb placement)\n",
              "planning: fit + joint + locality + tokens", plan_s, p.eplb_s, plan_s / p.eplb_s);
  std::printf("%-44s %11.3f s\n", "  of which model fit (k-means, classifier)", p.fit_s);
  std::printf("%-44s %11.3f s\n", "  of which joint grouping refinement", p.joint_s);
  std::printf("%-44s %11.3f s\n", "  of which locality placement", p.place_s);
  std::printf("%-44s %11.3f s  (%zu sampled tokens; sample copy cost x%.3f; %zu hedge copies, at most %zu per "
              "layer)\n",
              "  of which token-level refinement", p.token_s, p.sample_tokens, cost_ratio, p.hedge_copies,
              p.hedge_budget);
  if (anneal > 0)
    std::printf("%-44s %11.3f s  (sample copy cost x%.3f; not in the total: %zu proposals per expert, as "
                "bench/comm_volume runs)\n",
                "  token-level refinement with annealing", p.anneal_token_s, annealed_ratio, anneal);
  std::printf("%-44s %12.3f\n", "joint: training pairs kept local", p.local);
  std::printf("%-44s %11.1f%%\n", "kind classification from 32 prefill tokens", 100 * accuracy);
  std::printf("%-44s %12.3f %12.3f %8.3f  (baseline contiguous halves)\n", "micro-batch busiest-GPU max/mean (M=2)",
              split_peak, contiguous_peak, split_peak / contiguous_peak);
  std::printf("%-44s %12zu (%.2f GB), sample copy cost %.0f -> %.0f (%+.2f%%; %zu test tokens) in %.2f s\n",
              "re-plan: experts moved (budget 32)", re.experts_moved, static_cast<double>(re.bytes_moved) / 1e9,
              re.cost_before, re.cost_after, re.cost_before > 0 ? 100 * (re.cost_after / re.cost_before - 1) : 0.0,
              rp.sample_tokens, rp.seconds);
  std::printf("\nwrote %s/planning.json\n", out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "planning: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
