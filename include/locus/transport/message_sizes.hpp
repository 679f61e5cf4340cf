#pragma once
//! @file
//! Bytes per token copy and per fan-out entry: what a dispatcher reports of its wire format and
//! the traffic model multiplies its counts by, so that predicted and moved bytes agree.

#include <cstddef>
#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Bytes of one token copy in each direction, and of one fan-out entry (dispatch only).
struct message_sizes {
  std::size_t dispatch_bytes = 0;
  std::size_t combine_bytes = 0;
  std::size_t entry_bytes = 0; //!< per (token, expert) pair and hop; 0 when the table is not counted

  //! FP8 hidden vector plus one fp32 scale per 128 values out (DeepSeek-V3 / DeepEP dispatch),
  //! BF16 back.
  static constexpr message_sizes fp8_dispatch_bf16_combine(std::size_t hidden) {
    return {hidden + (hidden + 127) / 128 * 4, 2 * hidden};
  }
  //! BF16 both ways.
  static constexpr message_sizes bf16(std::size_t hidden) { return {2 * hidden, 2 * hidden}; }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
