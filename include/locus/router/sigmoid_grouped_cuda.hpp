#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The CUDA part of `router::sigmoid_grouped` (the host part is sigmoid_grouped.hpp): its kernel choice and
//! launch, found by `cuda_router` through argument-dependent lookup like any router's
//! `route_on_device`, and its device state (`make_device_state`).

#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/error.hpp>
#include <locus/router/detail/dispatch_cuda.hpp>
#include <locus/router/sigmoid_grouped.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {
namespace detail::router {

template <class Groups, class TopGroups, class TopK, class Experts, class T>
void launch_sigmoid_grouped(const sigmoid_grouped_params<Groups, TopGroups, TopK>& p,
                            const locus::router::device_logits_view<Experts, T>& in, expert_id* ids, float* weights,
                            const device_status& st, cudaStream_t stream, locus::router::cuda_kernel choice) {
  using value = std::remove_const_t<T>;
  const std::size_t tokens = in.tokens();
  if (tokens == 0) return;
  constexpr bool is_static = Experts::is_static && TopK::is_static && Groups::is_static && TopGroups::is_static;
  constexpr std::size_t E = Experts::static_value;
  if constexpr (is_static && warp_kernel_supports(E) && Groups::static_value <= warp_size) {
    constexpr int V = vector_width<static_cast<int>(E), value>();
    const char* why = warp_kernel_refusal<true, E, V>(in.data());
    if (choice != locus::router::cuda_kernel::thread_per_token && why == nullptr) {
      sigmoid_grouped_warp_kernel<static_cast<int>(E), static_cast<int>(Groups::static_value),
                                  static_cast<int>(TopGroups::static_value), static_cast<int>(TopK::static_value),
                                  value, V>
          <<<grid_for(tokens * warp_size, warp_kernel_block), warp_kernel_block, 0, stream>>>(
              in.data(), tokens, p.bias, p.scale, p.normalize, ids, weights, st);
      LOCUS_CUDA_CHECK(cudaGetLastError());
      return;
    }
    if (choice == locus::router::cuda_kernel::warp_per_token) refuse("sigmoid_grouped", why);
  } else if (choice == locus::router::cuda_kernel::warp_per_token) {
    refuse("sigmoid_grouped", is_static && Groups::static_value > warp_size
                                  ? "the warp-per-token kernel holds at most 32 groups"
                                  : warp_kernel_refusal<is_static, E, 1>(in.data()));
  }
  // The per-token function keeps its scores in memory: one scratch row per token, allocated on
  // the stream so that it is reused as soon as the kernel is done.
  const std::size_t n = in.experts(), groups = p.groups();
  // Freed on the stream also when the second allocation or the launch throws (the scratch leaked).
  struct stream_scratch {
    void* ptr = nullptr;
    cudaStream_t stream;
    ~stream_scratch() {
      if (ptr) cudaFreeAsync(ptr, stream); // on the way out of an exception: nowhere to report to
    }
    void free() {
      void* q = ptr;
      ptr = nullptr;
      LOCUS_CUDA_CHECK(cudaFreeAsync(q, stream));
    }
  } fscratch{nullptr, stream}, iscratch{nullptr, stream};
  LOCUS_CUDA_CHECK(cudaMallocAsync(&fscratch.ptr, tokens * grouped_scratch_floats(n, groups) * sizeof(float), stream));
  LOCUS_CUDA_CHECK(cudaMallocAsync(&iscratch.ptr, tokens * groups * sizeof(int), stream));
  launch_thread_kernel(tokens,
                       grouped_thread_fn<Groups, TopGroups, TopK, Experts, value>{
                           p, in.experts_extent(), in.data(), ids, weights, static_cast<float*>(fscratch.ptr),
                           static_cast<int*>(iscratch.ptr)},
                       st, stream);
  fscratch.free();
  iscratch.free();
}

} // namespace detail::router

namespace router {

//! The router's device state: a device copy of its correction bias (none when it has no bias).
template <class Groups, class TopGroups, class TopK>
device_buffer<float> make_device_state(const sigmoid_grouped<Groups, TopGroups, TopK>& r) {
  device_buffer<float> bias;
  if (!r.bias().empty()) {
    bias.upload(r.bias());
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(nullptr)); // the host copy may go before the first route
  }
  return bias;
}

//! Routes `in` into `out` on the device (see sigmoid_grouped for the rule), the bias read from
//! `bias` (make_device_state): warp per token where the shape allows it, else thread per token.
template <class Groups, class TopGroups, class TopK, class Experts, class T>
void route_on_device(const sigmoid_grouped<Groups, TopGroups, TopK>& r, const device_buffer<float>& bias,
                     const device_logits_view<Experts, T>& in, const device_mutable_routing_view<TopK>& out,
                     const device_route_context& c) {
  r.validate_experts(in.experts());
  auto p = r.params();
  p.bias = bias.size() == 0 ? nullptr : bias.data();
  ::locus::detail::router::launch_sigmoid_grouped(p, in, out.ids(), out.weights(), c.status, c.stream, c.kernel);
}

} // namespace router
} // namespace locus::inline LOCUS_ABI_NAMESPACE
