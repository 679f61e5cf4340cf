#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The CUDA part of `router::sigmoid_top1` (the host part is sigmoid_top1.hpp): its kernel choice and
//! launch, found by `cuda_router` through argument-dependent lookup like any router's
//! `route_on_device`.

#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <locus/router/detail/dispatch_cuda.hpp>
#include <locus/router/sigmoid_top1.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {
namespace detail::router {

//! Warps that route `tokens`, `per_warp` each.
inline std::size_t top1_warps(std::size_t tokens, int per_warp) {
  return (tokens + static_cast<std::size_t>(per_warp) - 1) / static_cast<std::size_t>(per_warp);
}

template <class Experts, class T>
void launch_sigmoid_top1(const locus::router::device_logits_view<Experts, T>& in, expert_id* ids, float* weights,
                         const device_status& st, cudaStream_t stream, locus::router::cuda_kernel choice) {
  using value = std::remove_const_t<T>;
  const std::size_t tokens = in.tokens();
  if (tokens == 0) return;
  constexpr std::size_t E = Experts::static_value;
  if constexpr (Experts::is_static && warp_kernel_supports(E)) {
    constexpr int V = vector_width<static_cast<int>(E), value>();
    const char* why = warp_kernel_refusal<true, E, V>(in.data());
    if (choice != locus::router::cuda_kernel::thread_per_token && why == nullptr) {
      sigmoid_top1_warp_kernel<static_cast<int>(E), value, V>
          <<<grid_for(top1_warps(tokens, top1_tokens_per_warp<static_cast<int>(E)>()) * warp_size, warp_kernel_block),
             warp_kernel_block, 0, stream>>>(in.data(), tokens, ids, weights, st);
      LOCUS_CUDA_CHECK(cudaGetLastError());
      return;
    }
    if (choice == locus::router::cuda_kernel::warp_per_token) refuse("sigmoid_top1", why);
  } else if (choice == locus::router::cuda_kernel::warp_per_token) {
    refuse("sigmoid_top1", warp_kernel_refusal<Experts::is_static, E, 1>(in.data()));
  }
  launch_thread_kernel(tokens, top1_thread_fn<Experts, value>{in.experts_extent(), in.data(), ids, weights}, st,
                       stream);
}

} // namespace detail::router

namespace router {

//! Routes `in` into `out` on the device (see sigmoid_top1 for the rule): warp per token where the
//! shape allows it, else thread per token.
template <class Experts, class T>
void route_on_device(const sigmoid_top1&, no_device_state, const device_logits_view<Experts, T>& in,
                     const device_mutable_routing_view<sigmoid_top1::top_k_type>& out, const device_route_context& c) {
  ::locus::detail::router::launch_sigmoid_top1(in, out.ids(), out.weights(), c.status, c.stream, c.kernel);
}

} // namespace router
} // namespace locus::inline LOCUS_ABI_NAMESPACE
