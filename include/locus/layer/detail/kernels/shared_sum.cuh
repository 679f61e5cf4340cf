#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The device layer step's elementwise kernels: the router input's fp32 copy, the shared experts'
//! gate scores and their fp32 sum added to the routed output. Their bodies are detail/shared_sum_stages.hpp's,
//! which the host layer runs.

#include <cstddef>
#include <locus/core/config.hpp>
#include <locus/layer/detail/shared_sum_stages.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels {

template <class T>
__global__ void to_f32(const T* __restrict__ in, std::size_t n, float* __restrict__ out) {
  layer::to_f32(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, in, n, out);
}

template <class T>
__global__ void accumulate(const T* __restrict__ part, std::size_t n, bool first, float* __restrict__ sum) {
  layer::accumulate(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, part, n,
                    first, sum);
}

// A template, as the other kernels here: a header's plain kernel would be defined in every program
// that includes it.
template <class T>
__global__ void round_to_bf16(T* __restrict__ v, std::size_t n) {
  layer::round_to_bf16(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, v, n);
}

template <class T>
__global__ void gate_partials(const T* __restrict__ x, std::size_t tokens, std::size_t hidden,
                              const float* __restrict__ gate, float* __restrict__ partial) {
  layer::gate_partials(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, x, tokens,
                       hidden, gate, partial);
}

template <class = void> // a template, see round_to_bf16
__global__ void gate_finish(const float* __restrict__ partial, std::size_t tokens, float* __restrict__ score) {
  layer::gate_finish(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, partial,
                     tokens, score);
}

template <class T>
__global__ void add_sum(const float* __restrict__ sum, std::size_t n, T* __restrict__ y, const float* score,
                        std::size_t hidden) {
  layer::add_sum(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, sum, n, y, score,
                 hidden);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels
