#pragma once
// Random top-K routings for the layout tests (host and device): distinct experts per token, weights
// in (0, 1]; every other token draws from a few experts only, so replicated experts repeat and a
// token's rows share ranks.
#include <algorithm>
#include <cstddef>
#include <locus/core/expert_map.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <numeric>
#include <random>
#include <vector>

namespace locus_test {

template <std::size_t K>
locus::routing<locus::top_k<K>> random_routing(std::size_t tokens, std::size_t experts, std::mt19937& rng) {
  std::vector<locus::expert_id> ids(tokens * K), all(experts);
  std::vector<float> w(tokens * K);
  std::iota(all.begin(), all.end(), 0);
  std::uniform_real_distribution<float> u(0.01f, 1.0f);
  for (std::size_t t = 0; t < tokens; ++t) {
    const std::size_t pool = t % 2 ? experts : std::max<std::size_t>(K, std::min<std::size_t>(experts, 8));
    std::shuffle(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(pool), rng);
    for (std::size_t j = 0; j < K; ++j) {
      ids[t * K + j] = all[j];
      w[t * K + j] = u(rng);
    }
  }
  return locus::routing<locus::top_k<K>>(std::move(ids), std::move(w));
}

} // namespace locus_test
