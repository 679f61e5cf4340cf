#pragma once
// What the layout tests (host and device) share: random top-K routings and an independent count of
// the tokens reaching each rank.
#include <algorithm>
#include <cstddef>
#include <locus/core/expert_map.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace locus_test {

//! Distinct experts per token, weights in (0, 1]; every other token draws from a few experts only,
//! so replicated experts repeat and a token's rows share ranks.
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

//! Per rank, the tokens with a copy there (a layout's reach, the hierarchical count round's), from
//! the copies' ranks (`k` per token).
inline std::vector<std::int32_t> tokens_reaching(std::span<const std::int32_t> copy_rank, std::size_t k,
                                                 std::size_t ranks) {
  std::vector<std::int32_t> reach(ranks, 0);
  for (std::size_t c = 0; c < copy_rank.size(); ++c) {
    bool first = true;
    for (std::size_t q = c - c % k; q < c; ++q)
      first &= copy_rank[q] != copy_rank[c];
    if (first) ++reach[static_cast<std::size_t>(copy_rank[c])];
  }
  return reach;
}

} // namespace locus_test
