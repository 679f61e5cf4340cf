#pragma once
//! @file
//! splitmix64: a tiny, well-mixed generator so that splits, synthetic traces and the planner's
//! annealing are identical on every platform (std:: distributions are not specified bit-for-bit).

#include <cstdint>
#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE {

struct splitmix64 {
  std::uint64_t state;
  explicit constexpr splitmix64(std::uint64_t seed) noexcept : state(seed) {}
  constexpr std::uint64_t next() noexcept {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  //! Uniform double in [0, 1).
  constexpr double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  //! Uniform integer in [0, n), 0 < n < 2^53 (the bias of scaling a 53-bit fraction is negligible).
  constexpr std::uint64_t below(std::uint64_t n) noexcept {
    const auto v = static_cast<std::uint64_t>(uniform() * static_cast<double>(n));
    return v < n ? v : n - 1;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
