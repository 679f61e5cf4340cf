#pragma once
// locus-requires: cuda
//! @file
//! CUDA dispatch of the routers: picks the kernel for the extents, the element type and the
//! pointer alignment, and launches it. Warp per token when E and k (and the groups) are
//! compile-time values, E is a multiple of 32 and the logits are aligned for vector loads;
//! thread per token otherwise (any shape, dynamic extents included).

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <locus/router/detail/kernels/router_kernels.cuh>
#include <locus/router/detail/per_token.hpp>
#include <locus/router/logits.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {
namespace router {
//! Which CUDA kernel routes the tokens. `automatic` picks warp per token where it exists; the
//! others force a kernel (tests compare each with the host; forcing warp_per_token where it does
//! not exist raises locus::config_error saying why).
enum class cuda_kernel { automatic, warp_per_token, thread_per_token };
} // namespace router

namespace detail::router {

inline constexpr unsigned thread_kernel_block = 128;

inline unsigned grid_for(std::size_t threads, unsigned block) {
  const std::size_t blocks = (threads + block - 1) / block;
  LOCUS_REQUIRE(blocks <= 0x7fffffffu, config_error, "router: ", threads, " threads exceed one CUDA grid");
  return static_cast<unsigned>(blocks);
}

template <class T>
bool aligned_to(const T* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

//! Whether a warp kernel can run, and if not, why (for the forced-kernel error).
template <bool StaticShape, std::size_t E, int V, class T>
const char* warp_kernel_refusal(const T* logits) {
  if constexpr (!StaticShape) {
    return "the warp-per-token kernel needs compile-time experts, top_k (and groups)";
  } else {
    if (!warp_kernel_supports(E)) return "the warp-per-token kernel needs a multiple of 32 experts";
    if (!aligned_to(logits, sizeof(T) * V)) return "the logits are not aligned for the warp kernel's vector loads";
    return nullptr;
  }
}

template <class Fn>
void launch_thread_kernel(std::size_t tokens, const Fn& fn, const device_status& st, cudaStream_t stream) {
  thread_per_token_kernel<<<grid_for(tokens, thread_kernel_block), thread_kernel_block, 0, stream>>>(tokens, fn, st);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

inline void refuse(const char* router, const char* why) {
  LOCUS_THROW(config_error, "router::", router, ": cuda_kernel::warp_per_token requested but ", why);
}

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
  float* fscratch = nullptr;
  int* iscratch = nullptr;
  LOCUS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&fscratch),
                                   tokens * grouped_scratch_floats(n, groups) * sizeof(float), stream));
  LOCUS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&iscratch), tokens * groups * sizeof(int), stream));
  launch_thread_kernel(tokens,
                       grouped_thread_fn<Groups, TopGroups, TopK, Experts, value>{p, in.experts_extent(), in.data(),
                                                                                  ids, weights, fscratch, iscratch},
                       st, stream);
  LOCUS_CUDA_CHECK(cudaFreeAsync(fscratch, stream));
  LOCUS_CUDA_CHECK(cudaFreeAsync(iscratch, stream));
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
          <<<grid_for(tokens * warp_size, warp_kernel_block), warp_kernel_block, 0, stream>>>(in.data(), tokens, ids,
                                                                                              weights, st);
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
} // namespace locus::inline LOCUS_ABI_NAMESPACE
