#pragma once
//! @file
//! The per-token logic of every router, written once for the host paths and the CUDA
//! thread-per-token kernels: LOCUS_HOST_DEVICE functions over one row of logits, with the top-k
//! in registers when k is a compile-time extent. The warp-per-token kernels reuse the same
//! arithmetic (detail/math.hpp) and selection order, so all paths give the same expert ids.
//!
//! Each function returns -1, or the first expert whose logit is not finite (the token's outputs
//! are then unspecified; host callers raise, kernels flag).

#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/config.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/router/detail/topk.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router {

//! Trivially copyable parameters of softmax_topk (kernel argument).
template <class TopK>
struct softmax_topk_params : extent_slot<0, TopK> {
  bool renormalize = true;
  softmax_topk_params() = default;
  LOCUS_HOST_DEVICE softmax_topk_params(TopK k, bool renorm) : extent_slot<0, TopK>(k), renormalize(renorm) {}
  LOCUS_HOST_DEVICE std::size_t k() const { return this->get().value(); }
};

//! Trivially copyable parameters of sigmoid_grouped (kernel argument). `bias` points to one
//! correction per expert in the memory space of the path that uses it, or is null for none.
template <class Groups, class TopGroups, class TopK>
struct sigmoid_grouped_params : extent_slot<0, Groups>, extent_slot<1, TopGroups>, extent_slot<2, TopK> {
  const float* bias = nullptr;
  float scale = 1.0f;
  bool normalize = true;
  sigmoid_grouped_params() = default;
  LOCUS_HOST_DEVICE sigmoid_grouped_params(Groups g, TopGroups tg, TopK k, const float* b, float s, bool n)
      : extent_slot<0, Groups>(g), extent_slot<1, TopGroups>(tg), extent_slot<2, TopK>(k), bias(b), scale(s),
        normalize(n) {}
  LOCUS_HOST_DEVICE std::size_t groups() const { return extent_slot<0, Groups>::get().value(); }
  LOCUS_HOST_DEVICE std::size_t top_groups() const { return extent_slot<1, TopGroups>::get().value(); }
  LOCUS_HOST_DEVICE std::size_t k() const { return extent_slot<2, TopK>::get().value(); }
};

//! The epsilon DeepSeek-V3's reference code adds to the weight denominator (keeps 0/0 away when
//! every chosen sigmoid underflows).
inline constexpr float grouped_denominator_epsilon = 1e-20f;

template <class T>
LOCUS_HOST_DEVICE int first_non_finite(const T* row, std::size_t experts) {
  for (std::size_t e = 0; e < experts; ++e)
    if (!is_finite(load_logit(row + e))) return static_cast<int>(e);
  return -1;
}

template <class T>
LOCUS_HOST_DEVICE bool all_finite(const T* row, std::size_t experts) {
  // Branch-free accumulation over the exponent bits, so the host compiler vectorises the common
  // (all finite) case: a float is not finite exactly when its exponent field is all ones.
  std::uint32_t bad = 0;
  for (std::size_t e = 0; e < experts; ++e)
    bad |= static_cast<std::uint32_t>((float_to_bits(load_logit(row + e)) & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

//! Softmax over the experts, top-k, weights = the chosen probabilities, optionally renormalised
//! over the k. Selection is on the logits themselves (softmax is monotonic), so ties are exact.
template <class TopK, class Experts, class T>
LOCUS_HOST_DEVICE int softmax_topk_token(const softmax_topk_params<TopK>& p, Experts experts, const T* row,
                                         expert_id* ids, float* weights) {
  const std::size_t n = experts.value();
  if (!all_finite(row, n)) return first_non_finite(row, n);
  topk_buffer<TopK::static_value> top(p.k(), weights, ids);
  for (std::size_t e = 0; e < n; ++e)
    top.push(load_logit(row + e), static_cast<int>(e));
  const float m = top.v[0]; // the largest logit: exp never overflows
  float sum = 0.0f;
  for (std::size_t j = 0; j < top.size(); ++j) {
    top.v[j] = exp(fsub(top.v[j], m));
    if (p.renormalize) sum = fadd(sum, top.v[j]);
  }
  if (!p.renormalize) {
    // The full softmax denominator is accumulated in double: a warp adds in a different order than
    // this loop, and in double the order no longer shows after rounding to float.
    double all = 0.0;
    for (std::size_t e = 0; e < n; ++e)
      all += static_cast<double>(exp(fsub(load_logit(row + e), m)));
    sum = static_cast<float>(all);
  }
  for (std::size_t j = 0; j < top.size(); ++j) {
    ids[j] = top.id[j];
    weights[j] = fdiv(top.v[j], sum);
  }
  return -1;
}

//! s = sigmoid(row), b = s + bias (or s without a bias). The restrict-qualified, branch-free loop
//! is what lets the host compiler vectorise the exp (the dominant cost of grouped routing).
template <class T>
LOCUS_HOST_DEVICE void sigmoid_scores(const T* LOCUS_RESTRICT row, const float* LOCUS_RESTRICT bias,
                                      float* LOCUS_RESTRICT s, float* LOCUS_RESTRICT b, std::size_t n) {
  if (bias) {
#if defined(__GNUC__) && !defined(__clang__) && !LOCUS_HAS_CUDA_COMPILER()
#pragma GCC ivdep
#endif
    for (std::size_t e = 0; e < n; ++e) {
      const float x = sigmoid(load_logit(row + e));
      s[e] = x;
      b[e] = fadd(x, bias[e]);
    }
  } else {
#if defined(__GNUC__) && !defined(__clang__) && !LOCUS_HAS_CUDA_COMPILER()
#pragma GCC ivdep
#endif
    for (std::size_t e = 0; e < n; ++e)
      s[e] = b[e] = sigmoid(load_logit(row + e));
  }
}

//! Sum of the two largest of `x[0..n)`, n >= 2; the second largest goes to `second`. Branchy on
//! purpose: after the first few elements the branches are almost never taken, which beats a
//! branch-free min/max chain whose latency serialises every element. The result is a value, not a
//! choice, so ties do not matter.
LOCUS_HOST_DEVICE float top2_sum(const float* x, std::size_t n, float& second) {
  float m1 = -std::numeric_limits<float>::infinity(), m2 = m1;
  for (std::size_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (v > m1) {
      m2 = m1;
      m1 = v;
    } else if (v > m2) {
      m2 = v;
    }
  }
  second = m2;
  return fadd(m1, m2);
}

LOCUS_HOST_DEVICE float top2_sum(const float* x, std::size_t n) {
  float unused;
  return top2_sum(x, n, unused);
}

//! Floats of scratch sigmoid_grouped_token needs (sigmoid scores, biased scores, group scores).
LOCUS_HOST_DEVICE std::size_t grouped_scratch_floats(std::size_t experts, std::size_t groups) {
  return 2 * experts + 2 * groups;
}

//! DeepSeek-V3 gating: s = sigmoid(logit); b = s + bias (selection only); group score = sum of the
//! two largest b in the group; the `top_groups` best groups are kept; top-k of b among their
//! experts; weights = s / (sum of the chosen s + 1e-20) * scale (or s * scale without
//! normalisation).
//! @param fscratch grouped_scratch_floats(experts, groups) floats
//! @param iscratch `groups` ints
template <class Groups, class TopGroups, class TopK, class Experts, class T>
LOCUS_HOST_DEVICE int sigmoid_grouped_token(const sigmoid_grouped_params<Groups, TopGroups, TopK>& p, Experts experts,
                                            const T* row, expert_id* ids, float* weights, float* fscratch,
                                            int* iscratch) {
  const std::size_t n = experts.value();
  if (!all_finite(row, n)) return first_non_finite(row, n);
  float* s = fscratch;
  float* b = fscratch + n;
  sigmoid_scores(row, p.bias, s, b, n);

  const std::size_t groups = p.groups();
  const std::size_t size = n / groups;
  float* second = fscratch + 2 * n;
  topk_buffer<TopGroups::static_value> kept(p.top_groups(), fscratch + 2 * n + groups, iscratch);
  for (std::size_t g = 0; g < groups; ++g)
    kept.push(top2_sum(b + g * size, size, second[g]), static_cast<int>(g));

  // A bound that skips most candidates without a top-k insertion: the kept groups' two largest
  // values are 2 * top_groups distinct experts all >= tau, so when that is at least k, anything
  // strictly below tau is beaten by k others and cannot be chosen.
  float tau = -std::numeric_limits<float>::infinity();
  if (2 * kept.size() >= p.k()) {
    tau = std::numeric_limits<float>::infinity();
    for (std::size_t j = 0; j < kept.size(); ++j)
      tau = second[kept.id[j]] < tau ? second[kept.id[j]] : tau;
  }
  topk_buffer<TopK::static_value> top(p.k(), weights, ids);
  for (std::size_t j = 0; j < kept.size(); ++j) {
    const std::size_t first = static_cast<std::size_t>(kept.id[j]) * size;
    for (std::size_t e = first; e < first + size; ++e)
      if (b[e] >= tau) top.push(b[e], static_cast<int>(e));
  }
  float sum = 0.0f;
  for (std::size_t j = 0; j < top.size(); ++j)
    sum = fadd(sum, s[top.id[j]]);
  const float denominator = fadd(sum, grouped_denominator_epsilon);
  for (std::size_t j = 0; j < top.size(); ++j) {
    const int e = top.id[j];
    ids[j] = e;
    weights[j] = p.normalize ? fmul(fdiv(s[e], denominator), p.scale) : fmul(s[e], p.scale);
  }
  return -1;
}

//! Llama-4 gating: the single best logit (lowest id on ties), weight sigmoid(logit).
template <class Experts, class T>
LOCUS_HOST_DEVICE int sigmoid_top1_token(Experts experts, const T* row, expert_id* ids, float* weights) {
  const std::size_t n = experts.value();
  if (!all_finite(row, n)) return first_non_finite(row, n);
  float best = load_logit(row);
  int arg = 0;
  for (std::size_t e = 1; e < n; ++e) {
    const float x = load_logit(row + e);
    if (x > best) { // strict: an equal logit later keeps the lower id
      best = x;
      arg = static_cast<int>(e);
    }
  }
  ids[0] = arg;
  weights[0] = sigmoid(best);
  return -1;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
