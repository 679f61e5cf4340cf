#pragma once
//! @file
//! `router::sigmoid_top1`: Llama 4 Maverick gating — one routed expert per token, weighted by the
//! sigmoid of its logit, and the weight scales the expert's input (Llama 4 multiplies the hidden
//! state by it before the expert), not its output. The shared expert every token also passes
//! through is the layer's job.

#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/dispatch_host.hpp>
#include <locus/router/detail/per_token.hpp>
#include <locus/router/logits.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! Top-1 sigmoid gating: the expert with the largest logit (equal logits: the lower expert id),
//! weight sigmoid(logit). A non-finite logit raises on the host and is counted on the device.
class sigmoid_top1 {
public:
  using policy_concept = router_tag;
  using top_k_type = locus::top_k<1>;
  static constexpr const char* name = "sigmoid_top1";
  //! Llama 4: y = E(w·x), not w·E(x); a moe_layer scales the expert input rows (locus::weight_site).
  static constexpr weight_site routing_weight_site = weight_site::expert_input;

  static constexpr std::size_t top_k() noexcept { return 1; }

  //! Routes `logits` into `out` on up to `threads` host threads (0: all cores).
  //! @throws locus::invalid_input_error on mismatched sizes or a non-finite logit
  template <class Experts, class T>
  void route(const logits_view<Experts, T>& logits, const mutable_routing_view<top_k_type>& out,
             unsigned threads = 0) const {
    detail::router::validate_route_arguments(name, logits, out, 1);
    const Experts e = logits.experts_extent();
    detail::router::route_host(name, logits, out, threads, 0, 0,
                               [&](const auto* row, expert_id* ids, float* w, float*, int*) {
                                 return detail::router::sigmoid_top1_token(e, row, ids, w);
                               });
  }
  //! Routes `logits` into a new routing.
  template <class Experts, class T>
  routing<top_k_type> route(const logits_view<Experts, T>& logits, unsigned threads = 0) const {
    routing<top_k_type> r(logits.tokens());
    route(logits, r.view(), threads);
    return r;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
