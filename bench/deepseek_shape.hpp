#pragma once
// The DeepSeek-V3 dispatch shape shared by bench/layout_permute.cpp and bench/gpu_permute.cu:
// 256 routed experts, top-8, hidden 7168, EP64 = 8 nodes x 8 GPUs, 5 slots per rank (linear
// placement plus replicas of the 32 hottest experts), grouped-router-like skewed routing.
#include <cstddef>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <random>
#include <vector>

namespace bench_shape {

using namespace locus;
constexpr std::size_t experts_n = 256, k_n = 8, hidden_n = 7168, nodes_n = 8, gpus_n = 8, slots_n = 5;
using topo_type = topology<nodes<nodes_n>, gpus_per_node<gpus_n>>;

// Linear placement (4 experts per rank) plus replicas of the 32 hottest experts in slot 4 of 32
// distinct ranks (37 is odd, so h * 37 + 5 mod 64 are distinct).
inline expert_map deepseek_map() {
  std::vector<expert_id> table(nodes_n * gpus_n * slots_n, empty_slot);
  for (std::size_t e = 0; e < experts_n; ++e)
    table[(e / 4) * slots_n + e % 4] = static_cast<expert_id>(e);
  for (std::size_t h = 0; h < 32; ++h)
    table[((h * 37 + 5) % 64) * slots_n + 4] = static_cast<expert_id>(h);
  return expert_map(experts_n, nodes_n * gpus_n, slots_n, table);
}

// Grouped-router-like routing: 4 of 8 groups (skewed towards the low groups), 8 experts in them
// (skewed towards the low experts of each group, which are the replicated hot ones).
inline routing<top_k<k_n>> deepseek_routing(std::size_t tokens, std::mt19937& rng) {
  std::vector<expert_id> ids(tokens * k_n);
  std::vector<float> w(tokens * k_n);
  std::vector<double> expert_weight(experts_n);
  for (std::size_t e = 0; e < experts_n; ++e)
    expert_weight[e] = 1.0 / (1.0 + static_cast<double>(e % 32) * 0.3 + static_cast<double>(e / 32));
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<double> gw(8);
    for (std::size_t g = 0; g < 8; ++g)
      gw[g] = 1.0 / (1.0 + static_cast<double>(g) * 0.5);
    std::vector<std::size_t> groups;
    for (int i = 0; i < 4; ++i) {
      std::discrete_distribution<std::size_t> d(gw.begin(), gw.end());
      const std::size_t g = d(rng);
      gw[g] = 0;
      groups.push_back(g);
    }
    std::vector<double> ew(experts_n, 0.0);
    for (std::size_t g : groups)
      for (std::size_t e = g * 32; e < g * 32 + 32; ++e)
        ew[e] = expert_weight[e];
    for (std::size_t j = 0; j < k_n; ++j) {
      std::discrete_distribution<std::size_t> d(ew.begin(), ew.end());
      const std::size_t e = d(rng);
      ew[e] = 0;
      ids[t * k_n + j] = static_cast<expert_id>(e);
      w[t * k_n + j] = u(rng);
    }
  }
  return routing<top_k<k_n>>(std::move(ids), std::move(w));
}

} // namespace bench_shape
