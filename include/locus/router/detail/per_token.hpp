#pragma once
//! @file
//! The per-token logic of every router, written once for the host paths and the CUDA
//! thread-per-token kernels: LOCUS_HOST_DEVICE functions over one row of logits, with the top-k
//! in registers when k is a compile-time extent. The warp-per-token kernels reuse the same
//! arithmetic (detail/math.hpp) and selection order, so all paths give the same expert ids.
//!
//! Each function returns -1, or the first expert whose logit is not finite (the token's outputs
//! are then unspecified; host callers raise, kernels flag).

#include <locus/core/config.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/router/detail/topk.hpp>

#include <cstddef>
#include <limits>

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
  // Branch-free accumulation so the host compiler vectorises the common (all finite) case.
  bool ok = true;
  for (std::size_t e = 0; e < experts; ++e) ok &= is_finite(load_logit(row + e));
  return ok;
}

//! Softmax over the experts, top-k, weights = the chosen probabilities, optionally renormalised
//! over the k. Selection is on the logits themselves (softmax is monotonic), so ties are exact.
template <class TopK, class Experts, class T>
LOCUS_HOST_DEVICE int softmax_topk_token(const softmax_topk_params<TopK>& p, Experts experts, const T* row,
                                         expert_id* ids, float* weights) {
  const std::size_t n = experts.value();
  if (!all_finite(row, n)) return first_non_finite(row, n);
  topk_buffer<TopK::static_value> top(p.k(), weights, ids);
  for (std::size_t e = 0; e < n; ++e) top.push(load_logit(row + e), static_cast<int>(e));
  const float m = top.v[0]; // the largest logit: exp never overflows
  float sum = 0.0f;
  for (std::size_t j = 0; j < top.size(); ++j) {
    top.v[j] = exp(fsub(top.v[j], m));
    if (p.renormalize) sum = fadd(sum, top.v[j]);
  }
  if (!p.renormalize)
    for (std::size_t e = 0; e < n; ++e) sum = fadd(sum, exp(fsub(load_logit(row + e), m)));
  for (std::size_t j = 0; j < top.size(); ++j) {
    ids[j] = top.id[j];
    weights[j] = fdiv(top.v[j], sum);
  }
  return -1;
}

//! Floats of scratch sigmoid_grouped_token needs (sigmoid scores, biased scores, group scores).
LOCUS_HOST_DEVICE std::size_t grouped_scratch_floats(std::size_t experts, std::size_t groups) {
  return 2 * experts + groups;
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
  for (std::size_t e = 0; e < n; ++e) s[e] = sigmoid(load_logit(row + e));
  if (p.bias)
    for (std::size_t e = 0; e < n; ++e) b[e] = fadd(s[e], p.bias[e]);
  else
    for (std::size_t e = 0; e < n; ++e) b[e] = s[e];

  const std::size_t groups = p.groups();
  const std::size_t size = n / groups;
  topk_buffer<TopGroups::static_value> kept(p.top_groups(), fscratch + 2 * n, iscratch);
  for (std::size_t g = 0; g < groups; ++g) {
    float m1 = -std::numeric_limits<float>::infinity(), m2 = m1;
    for (std::size_t i = 0; i < size; ++i) {
      const float x = b[g * size + i];
      if (x > m1) {
        m2 = m1;
        m1 = x;
      } else if (x > m2) {
        m2 = x;
      }
    }
    kept.push(fadd(m1, m2), static_cast<int>(g));
  }

  topk_buffer<TopK::static_value> top(p.k(), weights, ids);
  for (std::size_t j = 0; j < kept.size(); ++j) {
    const std::size_t first = static_cast<std::size_t>(kept.id[j]) * size;
    for (std::size_t e = first; e < first + size; ++e) top.push(b[e], static_cast<int>(e));
  }
  float sum = 0.0f;
  for (std::size_t j = 0; j < top.size(); ++j) sum = fadd(sum, s[top.id[j]]);
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

} // namespace locus::LOCUS_ABI_NAMESPACE::detail::router
