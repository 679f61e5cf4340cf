#pragma once
// locus-requires: cuda
//! @file
//! The data movement of `transport/permute.hpp` on a GPU (float or bfloat16, any hidden size;
//! 16-byte vectorised when the row size is a multiple of 16 bytes and the pointers are aligned).
//! Results equal the host functions bit for bit. All pointers are device pointers; every call is
//! asynchronous on `stream`. `hidden` is a std::size_t or a static `locus::hidden<N>`, for which
//! the kernels are instantiated (constant row loops; the same stage bodies).

#include <cstddef>
#include <cstdint>
#include <locus/core/bfloat16.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/detail/dispatch_permute.hpp>
#include <locus/transport/device_layout.hpp>
#include <locus/transport/layout.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::permute {
template <class T>
inline constexpr bool device_element = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;
} // namespace detail::permute

//! A receive_layout uploaded to the device (built on the host from the received metadata).
class device_receive_layout {
public:
  device_receive_layout() = default;
  //! Uploads `rl` on `stream` (the host arrays may change once this returns).
  explicit device_receive_layout(const receive_layout& rl, cudaStream_t stream = nullptr) { assign(rl, stream); }
  void assign(const receive_layout& rl, cudaStream_t stream = nullptr) {
    rows_ = rl.rows();
    entries_ = rl.entries();
    row_entry_offsets_.upload(rl.row_entry_offsets(), stream);
    expert_row_.upload(rl.expert_row(), stream);
    entry_position_.upload(rl.entry_position(), stream);
    expert_weight_.upload(rl.expert_weight(), stream);
  }
  std::size_t rows() const noexcept { return rows_; }
  std::size_t entries() const noexcept { return entries_; }
  const std::int32_t* row_entry_offsets() const noexcept { return row_entry_offsets_.data(); }
  const std::int32_t* expert_row() const noexcept { return expert_row_.data(); }
  const std::int32_t* entry_position() const noexcept { return entry_position_.data(); }
  //! Null when built without weights.
  const float* expert_weight() const noexcept { return expert_weight_.empty() ? nullptr : expert_weight_.data(); }

private:
  std::size_t rows_ = 0, entries_ = 0;
  device_buffer<std::int32_t> row_entry_offsets_, expert_row_, entry_position_;
  device_buffer<float> expert_weight_;
};

//! `send[r] = tokens[row_token[r]]` for the `l.rows()` rows.
template <class T, class TopK, class Experts, class H = std::size_t>
void permute(const device_layout<TopK, Experts>& l, const T* tokens, H hidden, T* send, cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::permute: elements must be float or bfloat16");
  detail::permute::dispatch_gather<T>(tokens, l.row_token(), 1, l.rows(), hidden, send, stream);
}

//! `tokens[t] = send[copy_row[t * K]]`: the inverse of permute.
template <class T, class TopK, class Experts, class H = std::size_t>
void unpermute(const device_layout<TopK, Experts>& l, const T* send, H hidden, T* tokens,
               cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::unpermute: elements must be float or bfloat16");
  detail::permute::dispatch_gather<T>(send, l.copy_row(), TopK::static_value, l.tokens(), hidden, tokens, stream);
}

//! `expert_in[i] = received[expert_row[i]]`.
template <class T, class H = std::size_t>
void gather_expert_input(const device_receive_layout& rl, const T* received, H hidden, T* expert_in,
                         cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::gather_expert_input: elements must be float or bfloat16");
  detail::permute::dispatch_gather<T>(received, rl.expert_row(), 1, rl.entries(), hidden, expert_in, stream);
}

//! `rows_out[r] = sum over r's entries of weight × expert_out` (as the host function).
//! @throws locus::invalid_input_error when the receive layout has no weights
template <class T, class H = std::size_t>
void reduce_expert_output(const device_receive_layout& rl, const T* expert_out, H hidden, T* rows_out,
                          cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::reduce_expert_output: elements must be float or bfloat16");
  LOCUS_REQUIRE(rl.entries() == 0 || rl.expert_weight(), invalid_input_error,
                "reduce_expert_output: the receive layout was built without weights");
  detail::permute::dispatch_reduce<T>(expert_out, rl.row_entry_offsets(), rl.entry_position(), rl.expert_weight(),
                                      rl.rows(), hidden, rows_out, stream);
}

//! `out[t] = sum of t's returned rows` (as the host function).
template <class T, class TopK, class Experts, class H = std::size_t>
void combine(const device_layout<TopK, Experts>& l, const T* returned, H hidden, T* out,
             cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::combine: elements must be float or bfloat16");
  detail::permute::dispatch_combine<T>(TopK{}, returned, l.copy_row(), l.tokens(), hidden, out, stream);
}

//! `out[t] = sum over j of weight × entry_out[copy_entry[t * K + j]]` (as the host function).
//! @throws locus::invalid_input_error when the layout was built without weights
template <class T, class TopK, class Experts, class H = std::size_t>
void combine_weighted(const device_layout<TopK, Experts>& l, const T* entry_out, H hidden, T* out,
                      cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::combine_weighted: elements must be float or bfloat16");
  LOCUS_REQUIRE(l.copies() == 0 || l.entry_weight(), invalid_input_error,
                "combine_weighted: the layout was built from a routing without weights");
  detail::permute::dispatch_combine_weighted<T>(TopK{}, entry_out, l.copy_entry(), l.entry_weight(), l.tokens(), hidden,
                                                out, stream);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
