#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! What every router's CUDA part uses to pick and launch its kernel (each router's own
//! `<router>_cuda.hpp` does the picking): warp per token when E and k (and the groups) are
//! compile-time values, E is a multiple of 32 and the logits are aligned for vector loads; thread
//! per token otherwise (any shape, dynamic extents included).

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

//! What `cuda_router` hands a router's `route_on_device` besides the router, its device state and
//! the views: where kernels report non-finite logits, the stream and the kernel asked for.
struct device_route_context {
  detail::router::device_status status;
  cudaStream_t stream = nullptr;
  cuda_kernel kernel = cuda_kernel::automatic;
};

//! The device state of a router that needs none beyond its parameters.
struct no_device_state {};
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

} // namespace detail::router
} // namespace locus::inline LOCUS_ABI_NAMESPACE
