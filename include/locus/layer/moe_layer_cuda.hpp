#pragma once
// locus-requires: cuda
//! @file
//! The device-resident step of `moe_layer` on `backend::cuda`: `forward(x, device routing, y)`
//! runs device layout → permute → device exchange → expert compute on the device blocks, rows read
//! in place → weighted reduction → exchange back → combine, all on the backend's stream, through
//! `transport::device_dispatcher` (where the host waits, and why, is documented there). The layer
//! keeps the dispatcher (and its buffers) between steps.

#include <locus/backend/cuda.hpp>
#include <locus/layer/expert_compute_cuda.hpp>
#include <locus/layer/moe_layer.hpp>
#include <locus/transport/device_dispatch.hpp>
#include <memory>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

template <class Shape, class Topology, class... Policies>
struct device_step<moe_layer<Shape, Topology, Policies...>> {
  using layer_type = moe_layer<Shape, Topology, Policies...>;
  using value_type = typename layer_type::value_type;
  using top_k_type = typename layer_type::top_k_type;
  using dispatcher_type = transport::device_dispatcher<typename layer_type::exchanger_type, value_type, top_k_type,
                                                       typename Shape::experts_type>;
  static_assert(top_k_type::is_static,
                "locus::moe_layer: the device-resident forward needs a static top_k in the shape (its kernels are "
                "instantiated for it)");
  static_assert(std::invocable<typename layer_type::expert_compute_type&,
                               const locus::layer::expert_blocks<value_type, memory_space::device>&>,
                "locus::moe_layer: the device-resident forward needs an expert compute that takes device blocks "
                "(layer::swiglu_cuda)");

  static void run(layer_type& l, std::shared_ptr<void>& state, const value_type* x,
                  const device_routing_view<top_k_type>& r, value_type* y) {
    LOCUS_REQUIRE(l.shape().shared_experts() == 0, config_error,
                  "moe_layer::forward: the device-resident step has no shared experts yet; the shape has ",
                  l.shape().shared_experts());
    if (!state)
      state = std::make_shared<dispatcher_type>(l.exchanger(), l.map(), l.shape().hidden(), l.backend().stream);
    auto& d = *static_cast<dispatcher_type*>(state.get());
    d.dispatch(x, r);
    l.experts()(d.blocks());
    d.combine(y);
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
