#pragma once
// Random expert maps for tests of planners and balance bounds.
#include <algorithm>
#include <cstddef>
#include <locus/core/expert_map.hpp>
#include <numeric>
#include <random>
#include <vector>

namespace locus_test {

//! `experts` experts on `ranks` ranks of `spr` slots each, in a random order, with `replicas`
//! random extra copies in the spare slots (as many as fit).
inline locus::expert_map random_map(std::mt19937& rng, std::size_t experts, std::size_t ranks, std::size_t spr,
                                    std::size_t replicas) {
  std::vector<locus::expert_id> table(ranks * spr, locus::empty_slot);
  std::vector<std::size_t> order(ranks * spr);
  for (std::size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (std::size_t e = 0; e < experts; ++e)
    table[order[e]] = static_cast<locus::expert_id>(e);
  for (std::size_t i = 0; i < replicas && experts + i < order.size(); ++i)
    table[order[experts + i]] = static_cast<locus::expert_id>(rng() % experts);
  return locus::expert_map(experts, ranks, spr, table);
}

//! `experts` experts in a random order dealt round-robin over `ranks` ranks of `spr` slots (one
//! copy each; the spare slots empty).
inline locus::expert_map shuffled_round_robin_map(std::mt19937& rng, std::size_t experts, std::size_t ranks,
                                                  std::size_t spr) {
  std::vector<locus::expert_id> table(ranks * spr, locus::empty_slot);
  std::vector<locus::expert_id> order(experts);
  std::iota(order.begin(), order.end(), locus::expert_id{0});
  std::shuffle(order.begin(), order.end(), rng);
  for (std::size_t i = 0; i < experts; ++i)
    table[(i % ranks) * spr + i / ranks] = order[i];
  return locus::expert_map(experts, ranks, spr, table);
}

} // namespace locus_test
