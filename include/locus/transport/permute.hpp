#pragma once
//! @file
//! Moving token vectors through a layout on the host (float or bfloat16, any hidden size):
//!
//!   tokens --permute--> send rows --(transport)--> received rows --gather_expert_input--> expert input
//!   expert output --reduce_expert_output--> rows back --(transport)--> returned rows --combine--> tokens
//!
//! `reduce_expert_output` applies the routing weights on the rank that computed the experts (one
//! row goes back per row received, as the traffic model counts combine), so `combine` is a plain
//! sum of a token's returned rows. `combine_weighted` is the alternative when one output per entry
//! comes back (weights applied at the source). `unpermute` is the inverse of `permute`.
//!
//! Every function runs a stage body of `transport/detail/stage.hpp` over contiguous chunks of
//! rows; the CUDA kernels (`transport/detail/kernels/permute.cuh`) run the same bodies, so the two
//! paths agree bit for bit. Sums accumulate in float in a fixed order, so results do not depend on
//! the thread count.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/core/bfloat16.hpp>
#include <locus/core/error.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/layout.hpp>
#include <span>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::permute {

template <class T>
inline constexpr bool element_type = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

inline void check_size(const char* what, const char* name, std::size_t got, std::size_t rows, std::size_t hidden) {
  // Divided, not multiplied: 2 rows × hidden 2^63 wraps to 0 and would pass with empty spans.
  LOCUS_REQUIRE(hidden == 0 ? got == 0 : got % hidden == 0 && got / hidden == rows, invalid_input_error, what, ": ",
                name, " holds ", got, " values, expected ", rows, " rows × hidden ", hidden);
}

// Rows below this are copied on the caller: a thread start costs more than copying them.
inline std::size_t grain_rows(std::size_t hidden, std::size_t bytes) {
  return std::max<std::size_t>(1, (std::size_t{256} << 10) / std::max<std::size_t>(hidden * bytes, 1));
}

// Runs a stage body over rows [0, n) on up to `threads` workers. `body(r0, r1, vec)` handles rows
// [r0, r1) as one grid block; `vec` says whether the 16-byte vector path applies.
template <class T, class Body>
void run_rows(std::size_t n, std::size_t hidden, unsigned threads, bool vec, Body&& body) {
  parallel_for(n, grain_rows(hidden, sizeof(T)), threads, [&](std::size_t r0, std::size_t r1, unsigned) {
    if (vec)
      body(r0, r1, std::true_type{});
    else
      body(r0, r1, std::false_type{});
  });
}

template <class T>
void gather(const T* src, const std::int32_t* index, std::size_t stride, std::size_t rows, std::size_t hidden, T* dst,
            unsigned threads) {
  run_rows<T>(rows, hidden, threads, stage::vectorisable<T>(hidden, src, dst),
              [&](std::size_t r0, std::size_t r1, auto vec) {
                stage::gather_rows<T, decltype(vec)::value>(stage::grid_index{}, src, index + r0 * stride, stride,
                                                            r1 - r0, hidden, dst + r0 * hidden);
              });
}

} // namespace detail::permute

//! Fills the send buffer: `send[r] = tokens[row_token[r]]`, read token-major (each token is read
//! once and written to each of its rows: stage::scatter_rows).
//! @param tokens `tokens × hidden`, token-major
//! @param send   `rows × hidden`
//! @throws locus::invalid_input_error on a size mismatch
template <class T, class TopK>
void permute(const layout<TopK>& l, std::span<const T> tokens, std::size_t hidden, std::span<T> send,
             unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::permute: elements must be float or bfloat16");
  detail::permute::check_size("permute", "tokens", tokens.size(), l.tokens(), hidden);
  detail::permute::check_size("permute", "send", send.size(), l.rows(), hidden);
  const TopK k = TopK(l.top_k());
  const bool vec = detail::stage::vectorisable<T>(hidden, tokens.data(), send.data());
  detail::permute::run_rows<T>(l.tokens(), hidden, threads, vec, [&](std::size_t t0, std::size_t t1, auto v) {
    detail::stage::scatter_rows<T, decltype(v)::value>(detail::stage::grid_index{}, k, tokens.data() + t0 * hidden,
                                                       l.copy_row().data() + t0 * k.value(), t1 - t0, hidden,
                                                       send.data());
  });
}

//! The inverse of permute: `tokens[t] = send[row of choice 0 of t]`.
//! @throws locus::invalid_input_error on a size mismatch
template <class T, class TopK>
void unpermute(const layout<TopK>& l, std::span<const T> send, std::size_t hidden, std::span<T> tokens,
               unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::unpermute: elements must be float or bfloat16");
  detail::permute::check_size("unpermute", "send", send.size(), l.rows(), hidden);
  detail::permute::check_size("unpermute", "tokens", tokens.size(), l.tokens(), hidden);
  detail::permute::gather(send.data(), l.copy_row().data(), l.top_k(), l.tokens(), hidden, tokens.data(), threads);
}

//! Expert input on a receiving rank: `expert_in[i] = received[expert_row[i]]` (per-slot segments
//! at receive_layout::slot_offsets).
//! @throws locus::invalid_input_error on a size mismatch
template <class T>
void gather_expert_input(const receive_layout& rl, std::span<const T> received, std::size_t hidden,
                         std::span<T> expert_in, unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>,
                "locus::transport::gather_expert_input: elements must be float or bfloat16");
  detail::permute::check_size("gather_expert_input", "received", received.size(), rl.rows(), hidden);
  detail::permute::check_size("gather_expert_input", "expert_in", expert_in.size(), rl.entries(), hidden);
  detail::permute::gather(received.data(), rl.expert_row().data(), 1, rl.entries(), hidden, expert_in.data(), threads);
}

//! Rows to send back from a receiving rank: `rows_out[r] = sum over r's entries e (in order) of
//! weight(e) × expert_out[entry_position[e]]`, accumulated in float.
//! @throws locus::invalid_input_error on a size mismatch or when the layout carries no weights
template <class T>
void reduce_expert_output(const receive_layout& rl, std::span<const T> expert_out, std::size_t hidden,
                          std::span<T> rows_out, unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>,
                "locus::transport::reduce_expert_output: elements must be float or bfloat16");
  detail::permute::check_size("reduce_expert_output", "expert_out", expert_out.size(), rl.entries(), hidden);
  detail::permute::check_size("reduce_expert_output", "rows_out", rows_out.size(), rl.rows(), hidden);
  LOCUS_REQUIRE(rl.entries() == 0 || !rl.expert_weight().empty(), invalid_input_error,
                "reduce_expert_output: the receive layout was built without weights");
  const std::int32_t* off = rl.row_entry_offsets().data();
  const bool vec = detail::stage::vectorisable<T>(hidden, expert_out.data(), rows_out.data());
  detail::permute::run_rows<T>(rl.rows(), hidden, threads, vec, [&](std::size_t r0, std::size_t r1, auto v) {
    detail::stage::reduce_rows<T, decltype(v)::value>(detail::stage::grid_index{}, expert_out.data(), off + r0,
                                                      rl.entry_position().data(), rl.expert_weight().data(), r1 - r0,
                                                      hidden, rows_out.data() + r0 * hidden);
  });
}

//! Combine of reduced rows: `out[t] = sum of t's returned rows` (weights were applied by
//! reduce_expert_output), in order of each row's first choice j, accumulated in float.
//! @param returned `rows × hidden`, in send order
//! @throws locus::invalid_input_error on a size mismatch
template <class T, class TopK>
void combine(const layout<TopK>& l, std::span<const T> returned, std::size_t hidden, std::span<T> out,
             unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::combine: elements must be float or bfloat16");
  detail::permute::check_size("combine", "returned", returned.size(), l.rows(), hidden);
  detail::permute::check_size("combine", "out", out.size(), l.tokens(), hidden);
  const TopK k = TopK(l.top_k());
  const bool vec = detail::stage::vectorisable<T>(hidden, returned.data(), out.data());
  detail::permute::run_rows<T>(l.tokens(), hidden, threads, vec, [&](std::size_t t0, std::size_t t1, auto v) {
    detail::stage::combine<T, decltype(v)::value>(detail::stage::grid_index{}, k, returned.data(),
                                                  l.copy_row().data() + t0 * k.value(), t1 - t0, hidden,
                                                  out.data() + t0 * hidden);
  });
}

//! Weighted combine of per-entry outputs: `out[t] = sum over j of weight(t, j) ×
//! entry_out[copy_entry[t * k + j]]`, j ascending, accumulated in float.
//! @param entry_out `copies × hidden`, one expert output per entry, in entry order
//! @throws locus::invalid_input_error on a size mismatch or a layout built without weights
template <class T, class TopK>
void combine_weighted(const layout<TopK>& l, std::span<const T> entry_out, std::size_t hidden, std::span<T> out,
                      unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>,
                "locus::transport::combine_weighted: elements must be float or bfloat16");
  detail::permute::check_size("combine_weighted", "entry_out", entry_out.size(), l.copies(), hidden);
  detail::permute::check_size("combine_weighted", "out", out.size(), l.tokens(), hidden);
  LOCUS_REQUIRE(l.copies() == 0 || !l.entry_weight().empty(), invalid_input_error,
                "combine_weighted: the layout was built from a routing without weights");
  const TopK k = TopK(l.top_k());
  const bool vec = detail::stage::vectorisable<T>(hidden, entry_out.data(), out.data());
  detail::permute::run_rows<T>(l.tokens(), hidden, threads, vec, [&](std::size_t t0, std::size_t t1, auto v) {
    detail::stage::combine_weighted<T, decltype(v)::value>(
        detail::stage::grid_index{}, k, entry_out.data(), l.copy_entry().data() + t0 * k.value(),
        l.entry_weight().data(), t1 - t0, hidden, out.data() + t0 * hidden);
  });
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
