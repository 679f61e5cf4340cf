#pragma once
// Router inputs the router tests share (host, CUDA and the kernels under the warp emulator), so that
// one seed gives the same logits everywhere.
#include <cstddef>
#include <random>
#include <vector>

namespace locus_test {

//! `n` logits drawn from normal(0, spread), as T (float or locus::bfloat16).
template <class T>
std::vector<T> random_logits(std::size_t n, unsigned seed, float spread = 2.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, spread);
  std::vector<T> v(n);
  for (auto& x : v)
    x = T(d(rng));
  return v;
}

//! `n` logits from five values, -0 and +0 among them: most tokens tie on their k-th choice (and often
//! on the first), so the lowest-id rule decides, and -0 must tie with +0 as the host's comparison
//! says.
template <class T>
std::vector<T> tied_logits(std::size_t n, unsigned seed) {
  const float values[] = {-1.0f, -0.0f, 0.0f, 0.5f, 1.0f};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(0, 4);
  std::vector<T> v(n);
  for (auto& x : v)
    x = T(values[d(rng)]);
  return v;
}

//! One selection bias per expert, uniform in [-half_width, half_width).
inline std::vector<float> random_bias(std::size_t experts, unsigned seed, float half_width = 0.05f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-half_width, half_width);
  std::vector<float> v(experts);
  for (auto& x : v)
    x = d(rng);
  return v;
}

} // namespace locus_test
