#pragma once
// `locus demo`: the project's main job on an embedded default.
#include <locus/locus.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

namespace locus_driver {

// `locus demo`: a synthetic skewed routing on a 4-node x 2-GPU deployment with contiguous expert
// placement, showing where its copies travel and how uneven the expert load is — the two
// problems locus exists to solve.
inline int demo(std::size_t tokens_per_rank, unsigned seed) {
  const locus::dynamic_topology topo(4, 2);
  const locus::dynamic_moe_shape shape(64, 6, 2048);
  const std::size_t ranks = topo.ranks(), experts = shape.experts(), k = shape.top_k();
  std::vector<locus::expert_id> table(experts);
  for (std::size_t e = 0; e < experts; ++e) table[e] = static_cast<locus::expert_id>(e);
  const locus::expert_map map(experts, ranks, experts / ranks, table);

  // Zipf-like popularity with a per-node favourite block, as real traces show.
  std::mt19937 rng(seed);
  std::vector<std::size_t> link_copies(locus::link_class_count, 0), load(ranks, 0);
  for (std::size_t src = 0; src < ranks; ++src) {
    std::vector<double> popularity(experts);
    for (std::size_t e = 0; e < experts; ++e)
      popularity[e] = 1.0 / double(1 + (e * 7 + 13 * topo.node_of(src)) % experts);
    for (std::size_t t = 0; t < tokens_per_rank; ++t) {
      std::vector<double> p = popularity;
      for (std::size_t j = 0; j < k; ++j) {
        std::discrete_distribution<std::size_t> pick(p.begin(), p.end());
        const std::size_t e = pick(rng);
        p[e] = 0;
        const std::size_t dst = static_cast<std::size_t>(map.replicas(e)[0].rank);
        ++link_copies[static_cast<std::size_t>(topo.link(src, dst))];
        ++load[dst];
      }
    }
  }
  const double total = double(tokens_per_rank * ranks * k);
  std::printf("locus %d.%d.%d demo: %zu nodes x %zu GPUs, %zu experts, top-%zu, %zu tokens per rank\n\n",
              LOCUS_VERSION_MAJOR, LOCUS_VERSION_MINOR, LOCUS_VERSION_PATCH, topo.nodes(), topo.gpus_per_node(),
              experts, k, tokens_per_rank);
  std::printf("%-12s %10s %8s\n", "link", "copies", "share");
  for (std::size_t c = 0; c < locus::link_class_count; ++c)
    std::printf("%-12s %10zu %7.1f%%\n", locus::to_string(static_cast<locus::link_class>(c)), link_copies[c],
                100.0 * double(link_copies[c]) / total);
  const double mean = total / double(ranks);
  const double max = double(*std::max_element(load.begin(), load.end()));
  std::printf("\nper-GPU expert load max/mean: %.3f\n", max / mean);
  return 0;
}

inline void register_demo(CLI::App& app) {
  struct options {
    std::size_t tokens = 2000;
    unsigned seed = 1;
  };
  auto opt = std::make_shared<options>();
  auto* cmd = app.add_subcommand("demo", "Show where a skewed routing's copies travel under linear placement");
  cmd->add_option("--tokens", opt->tokens, "Tokens per rank")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", opt->seed, "Random seed");
  cmd->callback([opt] { demo(opt->tokens, opt->seed); });
}

} // namespace locus_driver
