#pragma once
//! @file
//! The host-testable parts of the CUDA SwiGLU (`layer/expert_compute_cuda.hpp`): the gate|up
//! weight packing its first GEMM reads, and its activation as a stage body (one thread of a grid,
//! see transport/detail/stage.hpp) that the kernel (`kernels/silu_mul.cuh`) runs. The CPU tests
//! run both (the GEMMs as plain loops) against the double-precision reference FFN, so the gate|up
//! layout is checked without a GPU.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <locus/core/config.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/transport/detail/stage.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

//! The experts' gate and up weights side by side, per expert a row-major `hidden × 2·ffn` matrix
//! (each hidden row's ffn gate columns, then its ffn up columns), in the order of `weights.experts()`:
//! x · it is the `rows × 2·ffn` input of silu_mul.
template <class W>
std::vector<W> pack_gate_up(const ::locus::layer::expert_weights<W>& weights) {
  const std::size_t H = weights.hidden(), F = weights.ffn(), E = weights.experts().size();
  std::vector<W> gu(E * H * 2 * F);
  for (std::size_t i = 0; i < E; ++i) {
    const auto v = weights.view(weights.experts()[i]);
    for (std::size_t h = 0; h < H; ++h) {
      std::copy(v.gate + h * F, v.gate + (h + 1) * F, gu.begin() + static_cast<std::ptrdiff_t>((i * H + h) * 2 * F));
      std::copy(v.up + h * F, v.up + (h + 1) * F, gu.begin() + static_cast<std::ptrdiff_t>((i * H + h) * 2 * F + F));
    }
  }
  return gu;
}

//! act[r, j] = silu(gu[r, j]) · gu[r, ffn + j] for the `rows × ffn` activations, grid-stride;
//! `gu` is the fp32 output of the gate|up GEMM, `rows × 2·ffn` (each row's gate columns, then its
//! up columns); `act` is written in the weights' type T (float or bfloat16).
template <class T>
LOCUS_HOST_DEVICE void silu_mul(transport::detail::stage::grid_index g, const float* LOCUS_RESTRICT gu,
                                T* LOCUS_RESTRICT act, std::size_t rows, std::size_t ffn) {
  const std::size_t n = rows * ffn;
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads) {
    const std::size_t r = i / ffn, j = i - r * ffn;
    const float gate = gu[r * 2 * ffn + j];
    const float up = gu[r * 2 * ffn + ffn + j];
    const float v = locus::detail::fmul(silu(gate), up); // the host FFN's silu: equal bits on both sides
    if constexpr (sizeof(T) == sizeof(float))
      act[i] = v;
    else
      act[i] = T(v);
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
