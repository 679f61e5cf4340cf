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
//! Sums accumulate in float in a fixed order (a row's entries in entry order; a token's rows in
//! order of their first choice j), so results do not depend on the thread count, and the CUDA
//! kernels (`transport/detail/kernels/permute.cuh`) reproduce them bit for bit: they multiply and
//! add with separate round-to-nearest operations, as the host does when it is built without
//! floating-point contraction (the default on x86-64 without -mfma).

#include <locus/core/bfloat16.hpp>
#include <locus/core/error.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/transport/layout.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::permute {

template <class T>
inline constexpr bool element_type = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

inline void check_size(const char* what, const char* name, std::size_t got, std::size_t rows, std::size_t hidden) {
  LOCUS_REQUIRE(got == rows * hidden, invalid_input_error, what, ": ", name, " holds ", got, " values, expected ", rows,
                " rows × hidden ", hidden, " = ", rows * hidden);
}

// Rows below this are copied on the caller: a thread start costs more than copying them.
inline std::size_t grain_rows(std::size_t hidden, std::size_t bytes) {
  return std::max<std::size_t>(1, (std::size_t{256} << 10) / std::max<std::size_t>(hidden * bytes, 1));
}

template <class T>
inline T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else return T(f);
}

// acc[h] += w * y[h], rounded after the multiply and after the add.
template <class T>
inline void accumulate(float* LOCUS_RESTRICT acc, const T* LOCUS_RESTRICT y, float w, std::size_t hidden) {
  for (std::size_t h = 0; h < hidden; ++h) {
    const float p = w * to_float(y[h]);
    acc[h] = acc[h] + p;
  }
}
template <class T>
inline void accumulate(float* LOCUS_RESTRICT acc, const T* LOCUS_RESTRICT y, std::size_t hidden) {
  for (std::size_t h = 0; h < hidden; ++h) acc[h] = acc[h] + to_float(y[h]);
}
template <class T>
inline void store(T* LOCUS_RESTRICT out, const float* LOCUS_RESTRICT acc, std::size_t hidden) {
  for (std::size_t h = 0; h < hidden; ++h) out[h] = from_float<T>(acc[h]);
}

} // namespace detail::permute

//! Fills the send buffer: `send[r] = tokens[row_token[r]]`.
//! @param tokens `tokens × hidden`, token-major
//! @param send   `rows × hidden`
//! @throws locus::invalid_input_error on a size mismatch
template <class T, class TopK>
void permute(const layout<TopK>& l, std::span<const T> tokens, std::size_t hidden, std::span<T> send,
             unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::permute: elements must be float or bfloat16");
  detail::permute::check_size("permute", "tokens", tokens.size(), l.tokens(), hidden);
  detail::permute::check_size("permute", "send", send.size(), l.rows(), hidden);
  const auto rt = l.row_token();
  parallel_for(l.rows(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t r0, std::size_t r1, unsigned) {
    for (std::size_t r = r0; r < r1; ++r)
      std::memcpy(send.data() + r * hidden, tokens.data() + static_cast<std::size_t>(rt[r]) * hidden, hidden * sizeof(T));
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
  const auto cr = l.copy_row();
  const std::size_t k = l.top_k();
  parallel_for(l.tokens(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t t0, std::size_t t1, unsigned) {
    for (std::size_t t = t0; t < t1; ++t)
      std::memcpy(tokens.data() + t * hidden, send.data() + static_cast<std::size_t>(cr[t * k]) * hidden, hidden * sizeof(T));
  });
}

//! Expert input on a receiving rank: `expert_in[i] = received[expert_row[i]]` (per-slot segments
//! at receive_layout::slot_offsets).
//! @throws locus::invalid_input_error on a size mismatch
template <class T>
void gather_expert_input(const receive_layout& rl, std::span<const T> received, std::size_t hidden,
                         std::span<T> expert_in, unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::gather_expert_input: elements must be float or bfloat16");
  detail::permute::check_size("gather_expert_input", "received", received.size(), rl.rows(), hidden);
  detail::permute::check_size("gather_expert_input", "expert_in", expert_in.size(), rl.entries(), hidden);
  const auto er = rl.expert_row();
  parallel_for(rl.entries(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t i0, std::size_t i1, unsigned) {
    for (std::size_t i = i0; i < i1; ++i)
      std::memcpy(expert_in.data() + i * hidden, received.data() + static_cast<std::size_t>(er[i]) * hidden, hidden * sizeof(T));
  });
}

//! Rows to send back from a receiving rank: `rows_out[r] = sum over r's entries e (in order) of
//! weight(e) × expert_out[entry_position[e]]`, accumulated in float.
//! @throws locus::invalid_input_error on a size mismatch or when the layout carries no weights
template <class T>
void reduce_expert_output(const receive_layout& rl, std::span<const T> expert_out, std::size_t hidden,
                          std::span<T> rows_out, unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::reduce_expert_output: elements must be float or bfloat16");
  detail::permute::check_size("reduce_expert_output", "expert_out", expert_out.size(), rl.entries(), hidden);
  detail::permute::check_size("reduce_expert_output", "rows_out", rows_out.size(), rl.rows(), hidden);
  LOCUS_REQUIRE(rl.entries() == 0 || !rl.expert_weight().empty(), invalid_input_error,
                "reduce_expert_output: the receive layout was built without weights");
  const auto off = rl.row_entry_offsets();
  const auto pos = rl.entry_position();
  const auto wt = rl.expert_weight();
  parallel_for(rl.rows(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t r0, std::size_t r1, unsigned) {
    std::vector<float> acc(hidden);
    for (std::size_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (auto e = static_cast<std::size_t>(off[r]); e < static_cast<std::size_t>(off[r + 1]); ++e) {
        const auto p = static_cast<std::size_t>(pos[e]);
        detail::permute::accumulate(acc.data(), expert_out.data() + p * hidden, wt[p], hidden);
      }
      detail::permute::store(rows_out.data() + r * hidden, acc.data(), hidden);
    }
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
  const auto cr = l.copy_row();
  const TopK kext = TopK(l.top_k());
  parallel_for(l.tokens(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t t0, std::size_t t1, unsigned) {
    std::vector<float> acc(hidden);
    for (std::size_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const std::size_t c0 = t * kext.value();
      for (std::size_t j = 0; j < kext.value(); ++j) {
        bool first = true; // a row shared by several choices counts once
        for (std::size_t i = 0; i < j; ++i) first &= cr[c0 + i] != cr[c0 + j];
        if (first) detail::permute::accumulate(acc.data(), returned.data() + static_cast<std::size_t>(cr[c0 + j]) * hidden, hidden);
      }
      detail::permute::store(out.data() + t * hidden, acc.data(), hidden);
    }
  });
}

//! Weighted combine of per-entry outputs: `out[t] = sum over j of weight(t, j) ×
//! entry_out[copy_entry[t * k + j]]`, j ascending, accumulated in float.
//! @param entry_out `copies × hidden`, one expert output per entry, in entry order
//! @throws locus::invalid_input_error on a size mismatch or a layout built without weights
template <class T, class TopK>
void combine_weighted(const layout<TopK>& l, std::span<const T> entry_out, std::size_t hidden, std::span<T> out,
                      unsigned threads = 0) {
  static_assert(detail::permute::element_type<T>, "locus::transport::combine_weighted: elements must be float or bfloat16");
  detail::permute::check_size("combine_weighted", "entry_out", entry_out.size(), l.copies(), hidden);
  detail::permute::check_size("combine_weighted", "out", out.size(), l.tokens(), hidden);
  LOCUS_REQUIRE(l.copies() == 0 || !l.entry_weight().empty(), invalid_input_error,
                "combine_weighted: the layout was built from a routing without weights");
  const auto ce = l.copy_entry();
  const auto w = l.entry_weight();
  const TopK kext = TopK(l.top_k());
  parallel_for(l.tokens(), detail::permute::grain_rows(hidden, sizeof(T)), threads, [&](std::size_t t0, std::size_t t1, unsigned) {
    std::vector<float> acc(hidden);
    for (std::size_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::size_t j = 0; j < kext.value(); ++j) {
        const auto e = static_cast<std::size_t>(ce[t * kext.value() + j]);
        detail::permute::accumulate(acc.data(), entry_out.data() + e * hidden, w[e], hidden);
      }
      detail::permute::store(out.data() + t * hidden, acc.data(), hidden);
    }
  });
}

} // namespace locus::LOCUS_ABI_NAMESPACE::transport
