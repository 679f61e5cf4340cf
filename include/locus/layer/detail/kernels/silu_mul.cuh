#pragma once
// locus-requires: cuda
//! @file
//! The fused SiLU-multiply of the CUDA SwiGLU: act[r, j] = silu(gu[r, j]) · gu[r, ffn + j], reading
//! the fp32 output of the gate|up GEMM once and writing the activation in the weights' type.

#include <cstddef>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels {

template <class T>
__device__ inline T from_float_device(float v) {
  if constexpr (sizeof(T) == sizeof(float))
    return v;
  else
    return T(v);
}

//! Grid-stride over `rows × ffn` activations; `gu` is `rows × 2·ffn` (gate columns, then up).
template <class T>
__global__ void silu_mul(const float* __restrict__ gu, T* __restrict__ act, std::size_t rows, std::size_t ffn) {
  const std::size_t n = rows * ffn;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t r = i / ffn, j = i - r * ffn;
    const float g = gu[r * 2 * ffn + j];
    const float u = gu[r * 2 * ffn + ffn + j];
    act[i] = from_float_device<T>(g / (1.0f + __expf(-g)) * u);
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels
