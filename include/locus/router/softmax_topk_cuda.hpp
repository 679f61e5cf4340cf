#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The CUDA part of `router::softmax_topk` (the host part is softmax_topk.hpp): its kernel choice and
//! launch, found by `cuda_router` through argument-dependent lookup like any router's
//! `route_on_device`.

#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <locus/router/detail/dispatch_cuda.hpp>
#include <locus/router/softmax_topk.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {
namespace detail::router {

template <class TopK, class Experts, class T>
void launch_softmax_topk(const softmax_topk_params<TopK>& p, const locus::router::device_logits_view<Experts, T>& in,
                         expert_id* ids, float* weights, const device_status& st, cudaStream_t stream,
                         locus::router::cuda_kernel choice) {
  using value = std::remove_const_t<T>;
  const std::size_t tokens = in.tokens();
  if (tokens == 0) return;
  constexpr bool is_static = Experts::is_static && TopK::is_static;
  constexpr std::size_t E = Experts::static_value;
  if constexpr (is_static && warp_kernel_supports(E)) {
    constexpr int V = vector_width<static_cast<int>(E), value>();
    const char* why = warp_kernel_refusal<true, E, V>(in.data());
    if (choice != locus::router::cuda_kernel::thread_per_token && why == nullptr) {
      softmax_topk_warp_kernel<static_cast<int>(E), static_cast<int>(TopK::static_value), value, V>
          <<<grid_for(tokens * warp_size, warp_kernel_block), warp_kernel_block, 0, stream>>>(
              in.data(), tokens, p.renormalize, ids, weights, st);
      LOCUS_CUDA_CHECK(cudaGetLastError());
      return;
    }
    if (choice == locus::router::cuda_kernel::warp_per_token) refuse("softmax_topk", why);
  } else if (choice == locus::router::cuda_kernel::warp_per_token) {
    refuse("softmax_topk", warp_kernel_refusal<false, 0, 1>(in.data()));
  }
  launch_thread_kernel(tokens, softmax_thread_fn<TopK, Experts, value>{p, in.experts_extent(), in.data(), ids, weights},
                       st, stream);
}

} // namespace detail::router

namespace router {

//! Routes `in` into `out` on the device (see softmax_topk for the rule): warp per token where the
//! shape allows it, else thread per token.
template <class TopK, class Experts, class T>
void route_on_device(const softmax_topk<TopK>& r, no_device_state, const device_logits_view<Experts, T>& in,
                     const device_mutable_routing_view<TopK>& out, const device_route_context& c) {
  ::locus::detail::router::launch_softmax_topk(r.params(), in, out.ids(), out.weights(), c.status, c.stream, c.kernel);
}

} // namespace router
} // namespace locus::inline LOCUS_ABI_NAMESPACE
