#pragma once
//! @file
//! The copies of one exchange of the one-GPU transport (`device_local.hpp`) as a few kernels
//! launched by one thread: the rows every member sends every member, in tiles of up to 32
//! senders × 64 receivers whose row offsets travel in the kernel's parameters (17 KiB of the
//! 32 KiB a Hopper launch takes), so no table is uploaded and a 64-rank group needs two launches.
//! A pair (s, r) of a tile is one segment: its rows start, in s's buffer, after the rows s sends
//! the tile's earlier receivers, and land, in r's buffer, after the rows the tile's earlier
//! senders send r. The host computes both offsets (`for_each_tile`), so a block finds its pair
//! with three reads of the constant bank (a per-block prefix sum over the counts, 64 dependent
//! reads, made the kernel 4× slower than the copies). The kernel body (`copy_pair`) runs on the
//! host in the CPU tests.

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/transport/detail/stage.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::group_gather {

//! Senders and receivers per tile.
inline constexpr std::size_t tile_senders = 32, tile_receivers = 64;

//! One launch: the pairs of up to `tile_senders` senders × `tile_receivers` receivers.
struct tile_params {
  std::uint32_t senders = 0, receivers = 0;
  std::size_t row_bytes = 0;
  std::uint64_t skipped = 0;          //!< bit r: receiver r of the tile gets nothing
  const std::byte* src[tile_senders]; //!< sender s's first row for the tile's first receiver
  std::byte* dst[tile_receivers];     //!< receiver r's place for the tile's first sender's rows
  std::uint32_t src_first[tile_senders]
                         [tile_receivers + 1]; //!< rows s sends the tile's receivers before r (r = receivers: all)
  std::uint32_t dst_first[tile_receivers][tile_senders]; //!< rows r gets from the tile's senders before s
};
static_assert(sizeof(tile_params) < 32764, "a tile travels in a kernel's parameters (at most 32764 bytes)");
static_assert(tile_receivers <= 64, "a tile's skipped receivers are bits of one 64-bit word");

//! One pair's bytes.
struct segment {
  const std::byte* src;
  std::byte* dst;
  std::size_t bytes;
};

//! Pair (s, r) of tile `p` (s < p.senders, r < p.receivers).
LOCUS_HOST_DEVICE segment pair_segment(const tile_params& p, unsigned s, unsigned r) {
  const std::uint32_t first = p.src_first[s][r];
  return segment{p.src[s] + std::size_t{first} * p.row_bytes, p.dst[r] + std::size_t{p.dst_first[r][s]} * p.row_bytes,
                 std::size_t{p.src_first[s][r + 1] - first} * p.row_bytes};
}

//! One thread's share of pair (s, r): the blocks of a grid row (`g`) split its bytes.
template <bool Vec>
LOCUS_HOST_DEVICE void copy_pair(stage::grid_index g, const tile_params& p, unsigned s, unsigned r) {
  if ((p.skipped >> r) & 1u) return;
  const segment seg = pair_segment(p, s, r);
  stage::copy_bytes<Vec>(g, seg.src, seg.dst, seg.bytes);
}

//! How a tile is launched: blocks per pair (about `fill_blocks` blocks in all, at most one per
//! 32 KiB of the tile's largest pair and 64), and whether every pair moves in 16-byte vectors.
struct tile_shape {
  unsigned blocks_per_pair = 1;
  bool vec = true;
};

inline constexpr unsigned threads_per_block = 512;
inline constexpr std::size_t fill_blocks = 2048;

//! Calls `launch(params, shape)` for every tile of an exchange among `members` members with a
//! row to copy: `sent(s, r)` rows from s to r, `send[s]` the first of s's send rows (ordered by
//! receiver), `recv[r]` r's receive buffer (ordered by sender), `skip(r)` true for a receiver
//! that must get nothing (its buffer is not written). `params` is reused between calls.
//! @throws locus::invalid_input_error when a tile's offsets do not fit 32 bits
template <class Sent, class Skip, class Launch>
void for_each_tile(std::size_t members, std::size_t row_bytes, const std::byte* const* send, Sent&& sent, Skip&& skip,
                   std::byte* const* recv, tile_params& params, Launch&& launch) {
  params.row_bytes = row_bytes;
  const auto narrow = [](std::size_t v) {
    LOCUS_REQUIRE(v <= UINT32_MAX, invalid_input_error, "device local transport: ", v,
                  " rows between one tile's pairs do not fit 32 bits");
    return static_cast<std::uint32_t>(v);
  };
  for (std::size_t r0 = 0; r0 < members; r0 += tile_receivers) {
    const std::size_t r1 = std::min(members, r0 + tile_receivers), receivers = r1 - r0;
    params.skipped = 0;
    for (std::size_t r = r0; r < r1; ++r)
      if (skip(r)) params.skipped |= std::uint64_t{1} << (r - r0);
    for (std::size_t s0 = 0; s0 < members; s0 += tile_senders) {
      const std::size_t s1 = std::min(members, s0 + tile_senders), senders = s1 - s0;
      params.senders = static_cast<std::uint32_t>(senders);
      params.receivers = static_cast<std::uint32_t>(receivers);
      std::size_t largest = 0, total = 0;
      bool vec = row_bytes % 16 == 0;
      for (std::size_t s = s0; s < s1; ++s) {
        std::size_t first = 0; // rows s sends receivers before the tile
        for (std::size_t r = 0; r < r0; ++r)
          first += sent(s, r);
        params.src[s - s0] = send[s] + first * row_bytes;
        vec = vec && reinterpret_cast<std::uintptr_t>(params.src[s - s0]) % 16 == 0;
        std::size_t at = 0;
        for (std::size_t r = r0; r < r1; ++r) {
          params.src_first[s - s0][r - r0] = narrow(at);
          const std::size_t n = sent(s, r);
          at += n;
          if ((params.skipped >> (r - r0)) & 1u) continue;
          largest = std::max(largest, n * row_bytes);
          total += n;
        }
        params.src_first[s - s0][receivers] = narrow(at);
      }
      for (std::size_t r = r0; r < r1; ++r) {
        std::size_t first = 0; // rows r gets from senders before the tile
        for (std::size_t s = 0; s < s0; ++s)
          first += sent(s, r);
        params.dst[r - r0] = recv[r] + first * row_bytes;
        vec = vec && reinterpret_cast<std::uintptr_t>(params.dst[r - r0]) % 16 == 0;
        std::size_t at = 0;
        for (std::size_t s = s0; s < s1; ++s) {
          params.dst_first[r - r0][s - s0] = narrow(at);
          at += sent(s, r);
        }
      }
      if (total == 0) continue;
      constexpr std::size_t block_bytes = std::size_t{threads_per_block} * 16 * 4;
      const std::size_t pairs = senders * receivers;
      const std::size_t useful = std::min<std::size_t>((largest + block_bytes - 1) / block_bytes, 64);
      const std::size_t wanted = (fill_blocks + pairs - 1) / pairs;
      launch(
          static_cast<const tile_params&>(params),
          tile_shape{static_cast<unsigned>(std::clamp<std::size_t>(wanted, 1, std::max<std::size_t>(useful, 1))), vec});
    }
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::group_gather
