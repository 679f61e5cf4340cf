#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The fused SiLU-multiply of the CUDA SwiGLU: act[r, j] = silu(gu[r, j]) · gu[r, ffn + j], reading
//! the fp32 output of the gate|up GEMM once and writing the activation in the weights' type. The
//! body is detail/swiglu_stages.hpp's, which the CPU tests run.

#include <cstddef>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/layer/detail/swiglu_stages.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels {

//! Grid-stride over `rows × ffn` activations; `gu` is `rows × 2·ffn` (gate columns, then up).
template <class T>
__global__ void silu_mul(const float* __restrict__ gu, T* __restrict__ act, std::size_t rows, std::size_t ffn) {
  layer::silu_mul(transport::detail::stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, gu, act, rows,
                  ffn);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer::kernels
