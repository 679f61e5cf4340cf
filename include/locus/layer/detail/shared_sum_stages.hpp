#pragma once
//! @file
//! The elementwise stages of a layer step around its GEMMs, written once for the host layer
//! (`moe_layer.hpp`) and the device one (`moe_layer_cuda.hpp`, through `kernels/shared_sum.cuh`):
//! the fp32 copy of the router's input, the shared experts' gate scores, and the shared experts'
//! outputs summed in fp32 with the routed part and rounded once. Each is one thread of a grid
//! (transport/detail/stage.hpp) striding over the elements; the host runs them through `stage::run_grid`, so the CPU
//! tests cover the arithmetic the GPU does and both give the same bits (one rounding per add, none contracted).

#include <cstddef>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/core/rounded_float.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/transport/detail/stage.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

//! out[i] = in[i] in fp32, for the `n` elements (the router GEMM's input).
template <class T>
LOCUS_HOST_DEVICE void to_f32(transport::detail::stage::grid_index g, const T* LOCUS_RESTRICT in, std::size_t n,
                              float* LOCUS_RESTRICT out) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads)
    out[i] = to_float(in[i]);
}

//! sum[i] = (first ? 0 : sum[i]) + part[i] in fp32: one shared expert's output added to the sum of
//! the ones before it.
template <class T>
LOCUS_HOST_DEVICE void accumulate(transport::detail::stage::grid_index g, const T* LOCUS_RESTRICT part, std::size_t n,
                                  bool first, float* LOCUS_RESTRICT sum) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads)
    sum[i] = (first ? 0.0f : sum[i]) + to_float(part[i]);
}

//! v[i] = v[i] rounded to bf16 (nearest, ties to even), for the `n` values: the router's logits as a
//! bf16 linear layer gives them (layer::router_logits::bf16).
LOCUS_HOST_DEVICE void round_to_bf16(transport::detail::stage::grid_index g, float* LOCUS_RESTRICT v, std::size_t n) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads)
    v[i] = bfloat16::to_float(bfloat16::from_float(v[i]));
}

//! The shared experts' gate (Qwen2-MoE's and Qwen3-Next's shared_expert_gate), score[t] =
//! sigmoid(x[t]·gate) for `tokens` rows of `hidden` values, in two stages so that a GPU reads the rows
//! coalesced and with more than one thread per token: `gate_partials` writes gate_lanes partial sums
//! per token (lane l sums the products at h = l, l + gate_lanes, ... in ascending order, in fp32), and
//! `gate_finish` adds a token's partials pairwise (lane l + w into lane l for w = 16, 8, 4, 2, 1) and
//! takes the sigmoid. One fixed order, so host and device give the same bits.
inline constexpr std::size_t gate_lanes = 32;

template <class T>
LOCUS_HOST_DEVICE void gate_partials(transport::detail::stage::grid_index g, const T* LOCUS_RESTRICT x,
                                     std::size_t tokens, std::size_t hidden, const float* LOCUS_RESTRICT gate,
                                     float* LOCUS_RESTRICT partial) {
  for (std::size_t i = g.block * g.threads + g.thread; i < tokens * gate_lanes; i += g.blocks * g.threads) {
    const std::size_t t = i / gate_lanes, lane = i % gate_lanes; // a power of two: shifts
    const T* row = x + t * hidden;
    float v = 0.0f;
    for (std::size_t h = lane; h < hidden; h += gate_lanes)
      v = locus::detail::fadd(v, locus::detail::fmul(to_float(row[h]), gate[h]));
    partial[i] = v;
  }
}

LOCUS_HOST_DEVICE void gate_finish(transport::detail::stage::grid_index g, const float* LOCUS_RESTRICT partial,
                                   std::size_t tokens, float* LOCUS_RESTRICT score) {
  for (std::size_t t = g.block * g.threads + g.thread; t < tokens; t += g.blocks * g.threads) {
    float p[gate_lanes];
    for (std::size_t l = 0; l < gate_lanes; ++l)
      p[l] = partial[t * gate_lanes + l];
    for (std::size_t w = gate_lanes / 2; w > 0; w /= 2)
      for (std::size_t l = 0; l < w; ++l)
        p[l] = locus::detail::fadd(p[l], p[l + w]);
    score[t] = locus::detail::router::sigmoid(p[0]);
  }
}

//! y[i] = round(y[i] + sum[i]): the routed part and the shared experts' sum added in fp32 and
//! rounded once to T; with `score` (the gate's, one per row of `hidden` values), the sum is scaled
//! by its row's score first.
template <class T>
LOCUS_HOST_DEVICE void add_sum(transport::detail::stage::grid_index g, const float* LOCUS_RESTRICT sum, std::size_t n,
                               T* LOCUS_RESTRICT y, const float* LOCUS_RESTRICT score = nullptr,
                               std::size_t hidden = 1) {
  const std::size_t first = g.block * g.threads + g.thread, step = g.blocks * g.threads;
  if (!score) {
    for (std::size_t i = first; i < n; i += step)
      y[i] = static_cast<T>(to_float(y[i]) + sum[i]);
    return;
  }
  if (first >= n) return; // also hidden == 0, which holds no values
  // The row advances with the stride, divided once per thread: a 64-bit division per element would
  // cost this memory-bound kernel about as much as its loads on a GPU.
  const std::size_t row_step = step / hidden, col_step = step % hidden;
  std::size_t row = first / hidden, col = first % hidden;
  for (std::size_t i = first; i < n; i += step) {
    y[i] = static_cast<T>(to_float(y[i]) + locus::detail::fmul(score[row], sum[i]));
    row += row_step;
    col += col_step;
    if (col >= hidden) {
      col -= hidden;
      ++row;
    }
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
