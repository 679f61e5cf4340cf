#pragma once
// Test helpers shared by the unit, MPI and CUDA tests of the MoE layer: deterministic random
// weights, and an independent double-precision reference of the expert FFN and of a dense,
// single-process MoE layer (every token through its top-k experts, weighted, plus the shared
// experts). The reference reads weights through plain index arithmetic on the stored values and
// shares no code with the library's compute paths.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <locus/layer/expert_compute.hpp>
#include <numeric>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

namespace locus_test {

// Value of a stored element (float or bfloat16) in double.
inline double as_double(double v) { return v; }
inline double as_double(float v) { return v; }
inline double as_double(locus::bfloat16 v) { return static_cast<double>(static_cast<float>(v)); }

// Deterministic weights for expert `e` of a model seeded `seed`: uniform in ±scale with scale
// 1/sqrt(fan_in), so outputs stay O(1) whatever the sizes.
template <class W>
void fill_expert(std::uint64_t seed, locus::expert_id e, std::size_t hidden, std::size_t ffn, std::span<W> gate,
                 std::span<W> up, std::span<W> down) {
  std::mt19937_64 rng(seed * 1000003u + static_cast<std::uint64_t>(e) * 7919u + 17u);
  std::uniform_real_distribution<float> in_dist(-1.0f / std::sqrt(float(hidden)), 1.0f / std::sqrt(float(hidden)));
  std::uniform_real_distribution<float> out_dist(-1.0f / std::sqrt(float(ffn)), 1.0f / std::sqrt(float(ffn)));
  for (auto& w : gate)
    w = static_cast<W>(3.0f * in_dist(rng)); // wider gate: silu sees both signs well
  for (auto& w : up)
    w = static_cast<W>(in_dist(rng));
  for (auto& w : down)
    w = static_cast<W>(out_dist(rng));
}

// Weights of experts [0, n) seeded `seed`.
template <class W>
locus::layer::expert_weights<W> model_weights(std::uint64_t seed, std::size_t n, std::size_t hidden, std::size_t ffn) {
  std::vector<locus::expert_id> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  locus::layer::expert_weights<W> w(hidden, ffn, ids);
  for (locus::expert_id e : ids)
    fill_expert<W>(seed, e, hidden, ffn, w.gate(e), w.up(e), w.down(e));
  return w;
}

template <class T>
std::vector<T> random_rows(std::uint64_t seed, std::size_t rows, std::size_t hidden) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<T> x(rows * hidden);
  for (auto& v : x)
    v = static_cast<T>(d(rng));
  return x;
}

// Double-precision SwiGLU of one row through one expert's stored weights; also returns, in
// `scale`, the sum of |terms| of each output (the size rounding errors are measured against).
template <class W, class X>
void reference_ffn(const locus::layer::expert_weights<W>& weights, locus::expert_id e, const X* x, double* out,
                   double* scale) {
  const auto v = weights.view(e);
  const std::size_t H = v.hidden, F = v.ffn;
  std::vector<double> act(F), act_scale(F);
  for (std::size_t f = 0; f < F; ++f) {
    double g = 0, u = 0, gs = 0, us = 0;
    for (std::size_t h = 0; h < H; ++h) {
      const double xv = as_double(x[h]);
      g += xv * as_double(v.gate[h * F + f]);
      u += xv * as_double(v.up[h * F + f]);
      gs += std::abs(xv * as_double(v.gate[h * F + f]));
      us += std::abs(xv * as_double(v.up[h * F + f]));
    }
    const double s = g / (1.0 + std::exp(-g));
    act[f] = s * u;
    act_scale[f] = (std::abs(s) + gs) * (std::abs(u) + us);
  }
  for (std::size_t c = 0; c < H; ++c) {
    double o = 0, os = 0;
    for (std::size_t f = 0; f < F; ++f) {
      o += act[f] * as_double(v.down[f * H + c]);
      os += act_scale[f] * std::abs(as_double(v.down[f * H + c]));
    }
    out[c] = o;
    if (scale) scale[c] = os;
  }
}

// The dense reference MoE: y[t] = Σ_j weight(t, j) · FFN_{expert(t, j)}(x[t]) + Σ_s FFN_s(x[t]),
// or, with the weights on the expert input (Llama 4), Σ_j FFN_{expert(t, j)}(weight(t, j) · x[t]) + ....
// `shared` may be empty (no shared experts); with `shared_gate` (hidden values), the shared sum is
// scaled by sigmoid(x[t]·gate) (Qwen2-MoE). Returns y and, in `scale`, the error scale of each value.
template <class W, class X, class Routing>
std::vector<double> dense_moe(const std::vector<X>& x, const Routing& r, const locus::layer::expert_weights<W>& routed,
                              const std::type_identity_t<locus::layer::expert_weights<W>>* shared,
                              std::vector<double>* scale = nullptr,
                              locus::weight_site site = locus::weight_site::expert_output,
                              const std::vector<float>* shared_gate = nullptr) {
  const std::size_t H = routed.hidden(), T = r.tokens(), K = r.top_k();
  std::vector<double> y(T * H, 0.0), s(T * H, 0.0), o(H), os(H), scaled(H);
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t j = 0; j < K; ++j) {
      const double w = r.weight(t, j);
      if (site == locus::weight_site::expert_input) {
        for (std::size_t c = 0; c < H; ++c)
          scaled[c] = w * as_double(x[t * H + c]);
        reference_ffn(routed, r.expert(t, j), scaled.data(), o.data(), os.data());
        for (std::size_t c = 0; c < H; ++c) {
          y[t * H + c] += o[c];
          s[t * H + c] += os[c];
        }
        continue;
      }
      reference_ffn(routed, r.expert(t, j), x.data() + t * H, o.data(), os.data());
      for (std::size_t c = 0; c < H; ++c) {
        y[t * H + c] += w * o[c];
        s[t * H + c] += std::abs(w) * os[c];
      }
    }
    double g = 1.0;
    if (shared_gate) {
      double v = 0;
      for (std::size_t c = 0; c < H; ++c)
        v += as_double(x[t * H + c]) * (*shared_gate)[c];
      g = 1.0 / (1.0 + std::exp(-v));
    }
    if (shared)
      for (locus::expert_id e : shared->experts()) {
        reference_ffn(*shared, e, x.data() + t * H, o.data(), os.data());
        for (std::size_t c = 0; c < H; ++c) {
          y[t * H + c] += g * o[c];
          s[t * H + c] += g * os[c];
        }
      }
  }
  if (scale) *scale = std::move(s);
  return y;
}

// Reference softmax top-k routing in double: logits = x·gate (gate is hidden × experts), the k
// largest (ties to the lower id), weights softmax over all experts, renormalised over the k when asked.
template <class X>
void reference_softmax_topk(const std::vector<X>& x, const std::vector<float>& gate, std::size_t hidden,
                            std::size_t experts, std::size_t k, bool renormalize, std::vector<locus::expert_id>& ids,
                            std::vector<float>& weights) {
  const std::size_t T = x.size() / hidden;
  ids.assign(T * k, 0);
  weights.assign(T * k, 0.0f);
  std::vector<double> l(experts);
  std::vector<locus::expert_id> order(experts);
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t e = 0; e < experts; ++e) {
      double v = 0;
      for (std::size_t h = 0; h < hidden; ++h)
        v += as_double(x[t * hidden + h]) * gate[h * experts + e];
      l[e] = v;
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](locus::expert_id a, locus::expert_id b) { return l[a] > l[b]; });
    const double mx = l[order[0]];
    double all = 0, top = 0;
    for (std::size_t e = 0; e < experts; ++e)
      all += std::exp(l[e] - mx);
    for (std::size_t j = 0; j < k; ++j)
      top += std::exp(l[order[j]] - mx);
    for (std::size_t j = 0; j < k; ++j) {
      ids[t * k + j] = order[j];
      weights[t * k + j] = static_cast<float>(std::exp(l[order[j]] - mx) / (renormalize ? top : all));
    }
  }
}

} // namespace locus_test
