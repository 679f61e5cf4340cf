#pragma once
// `locus demo`: the project's main job on an embedded default. A synthetic routing trace (requests
// of a few kinds, each kind favouring its own block of experts, generated in-process from a
// seed) is split into a training and a test half; on a 4-node × 2-GPU deployment the demo fits
// the workload-aware grouping model, plans the baselines, the published activation-aware method
// and locus's locality planner, simulates decode on the test half and prints the comparison.
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/locus.hpp>
#include <locus/placement/activation_plan.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace locus_driver {

// Requests of 4 kinds with 16 prefill + 16..80 decode tokens; a kind routes with probability 0.6
// into its own block of experts (rotating with the layer), otherwise uniformly.
inline int demo(std::size_t requests, std::uint64_t seed) {
  const std::size_t experts = 64, k = 6, layers = 8, kinds = 4, prefill = 16;
  // Build the trace: kinds first (so that routing can follow them), then routing.
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
            for (std::size_t i = 0; i < j; ++i) fresh &= ids[i] != e;
          } while (!fresh);
          ids[j] = static_cast<locus::trace::trace_expert_id>(e);
          b.weights(l, t)[j] = 1.0f / static_cast<float>(k);
        }
      }
  const auto full = b.build().with_prefill_tokens(prefill);
  const auto [train, test] = locus::trace::split_by_request(full, 0.5, seed);

  const locus::dynamic_topology topo(4, 2);
  locus::cost::simulation_config cfg;
  cfg.topology = topo;
  cfg.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(2048);
  cfg.batch_per_rank = 16;
  cfg.arrival_rate = 2;
  cfg.seed = seed;
  locus::placement::activation_plan_options opt;
  opt.grouping.clusters = kinds;
  opt.grouping.seed = seed;
  opt.grouping.prefill_tokens = prefill;

  struct row {
    const char* label;
    const char* placement;
    std::size_t redundant;
    const char* grouper;
    locus::cost::transport_kind transport;
  };
  using locus::cost::transport_kind;
  const std::vector<row> rows = {
      {"baseline", "linear", 0, "round_robin", transport_kind::flat},
      {"baseline", "eplb", 1, "round_robin", transport_kind::flat},
      {"paper", "activation_usage", 0, "workload_aware", transport_kind::flat},
      {"locus", "locality", 0, "workload_aware", transport_kind::flat},
      {"locus", "locality", 1, "workload_aware", transport_kind::flat},
      {"locus", "locality", 1, "workload_aware", transport_kind::hierarchical},
  };
  std::printf("locus %d.%d.%d demo: synthetic trace of %zu requests (%zu kinds, %zu experts, top-%zu, %zu layers), "
              "fitted on %zu, simulated on %zu; %zu nodes x %zu GPUs, prefill = first %zu tokens\n\n",
              LOCUS_VERSION_MAJOR, LOCUS_VERSION_MINOR, LOCUS_VERSION_PATCH, full.requests(), kinds, experts, k,
              layers, train.requests(), test.requests(), topo.nodes(), topo.gpus_per_node(), prefill);
  std::printf("%-9s %-17s %4s %-15s %-13s %12s %8s %10s\n", "method", "placement", "red.", "grouper", "transport",
              "net B/token", "vs base", "GPU max/mean");
  double base = 0;
  for (const row& r : rows) {
    auto row_opt = opt; // locality plans for the transport of its row
    row_opt.refine.count(r.transport == transport_kind::flat ? locus::placement::copy_count::flat
                                                             : locus::placement::copy_count::hierarchical);
    const auto plan = locus::placement::plan_activation_aware(train, topo, r.placement, r.redundant, row_opt);
    auto grouper = locus::grouper::grouper_by_name(r.grouper, plan.model);
    cfg.transport = r.transport;
    const auto res = locus::cost::simulate_decode(test, plan.maps, grouper, cfg);
    if (base == 0) base = res.inter_node_bytes_per_token;
    std::printf("%-9s %-17s %4zu %-15s %-13s %12.0f %8.3f %10.3f\n", r.label, r.placement, r.redundant, r.grouper,
                locus::cost::to_string(r.transport), res.inter_node_bytes_per_token,
                res.inter_node_bytes_per_token / base, res.gpu_imbalance_aggregate);
  }
  std::printf("\nnet B/token: network bytes (FP8 dispatch + BF16 combine, hidden 2048) per decode token over all "
              "layers;\nGPU max/mean: expert rows of the busiest GPU over the mean, per layer over the run.\n");
  return 0;
}

inline void register_demo(CLI::App& app) {
  struct options {
    std::size_t requests = 400;
    std::uint64_t seed = 1;
  };
  auto opt = std::make_shared<options>();
  auto* cmd = app.add_subcommand("demo", "Fit, plan and compare baselines, the published method and locality on a "
                                         "synthetic trace");
  cmd->add_option("--requests", opt->requests, "Requests in the synthetic trace")->check(CLI::Range(8, 100000));
  cmd->add_option("--seed", opt->seed, "Seed of the trace, the split and the clustering");
  cmd->callback([opt] { demo(opt->requests, opt->seed); });
}

} // namespace locus_driver
