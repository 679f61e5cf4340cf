#pragma once
//! @file
//! `router::softmax_topk<K>`: Mixtral / Qwen-style gating — softmax over the experts, the k most
//! probable, weights optionally renormalised over those k.

#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/dispatch_host.hpp>
#include <locus/router/detail/per_token.hpp>
#include <locus/router/logits.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! Softmax top-k gating.
//!
//! Choices are ordered by decreasing logit; equal logits are broken by the lower expert id, on
//! the host and on the device alike. Weight j is softmax(logits)[id_j], or with renormalisation
//! exp(l_j - l_max) / sum over the k chosen of exp(l_i - l_max). A non-finite logit raises
//! locus::invalid_input_error naming the token and expert (host) or is counted by the device
//! router (router/cuda.hpp).
//! @tparam TopK `locus::top_k<K>` (register top-k) or `top_k<>` (k given at run time)
template <class TopK = top_k<>>
class softmax_topk {
  static_assert(extent_of<TopK, locus::detail::top_k_tag>,
                "locus::router::softmax_topk: the parameter must be locus::top_k<K> (or top_k<>)");

public:
  using policy_concept = router_tag;
  using top_k_type = TopK;
  using params_type = detail::router::softmax_topk_params<TopK>;
  static constexpr const char* name = "softmax_topk";

  //! Static k, renormalised weights.
  softmax_topk() requires TopK::is_static = default;
  //! @param k           experts per token (must equal K when static)
  //! @param renormalize whether the k weights are renormalised to sum to 1
  //! @throws locus::config_error on k = 0 or a mismatch with a static K
  explicit softmax_topk(std::size_t k, bool renormalize = true) : params_(TopK(k), renormalize) {}

  std::size_t top_k() const noexcept { return params_.k(); }
  bool renormalize() const noexcept { return params_.renormalize; }
  //! The trivially copyable parameters the kernels receive.
  const params_type& params() const noexcept { return params_; }

  //! Routes `logits` into `out` on up to `threads` host threads (0: all cores).
  //! @throws locus::config_error when k exceeds the expert count
  //! @throws locus::invalid_input_error on mismatched sizes or a non-finite logit
  template <class Experts, class T>
  void route(const logits_view<Experts, T>& logits, const mutable_routing_view<TopK>& out, unsigned threads = 0) const {
    detail::router::validate_route_arguments(name, logits, out, top_k());
    const Experts e = logits.experts_extent();
    const params_type p = params_;
    detail::router::route_host(name, logits, out, threads, 0, 0,
                               [&](const auto* row, expert_id* ids, float* w, float*, int*) {
                                 return detail::router::softmax_topk_token(p, e, row, ids, w);
                               });
  }
  //! Routes `logits` into a new routing.
  template <class Experts, class T>
  routing<TopK> route(const logits_view<Experts, T>& logits, unsigned threads = 0) const {
    routing<TopK> r(logits.tokens(), params_.get());
    route(logits, r.view(), threads);
    return r;
  }

private:
  params_type params_{TopK{}, true};
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
