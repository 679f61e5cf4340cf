#pragma once
//! @file
//! The copies of one exchange of the one-GPU transport (`device_local.hpp`) as a few kernels
//! launched by one thread: the rows every member sends every member, in tiles of up to 64 senders
//! × 64 receivers whose row counts travel in the kernel's parameters (16 KiB of the 32 KiB a
//! Hopper launch takes), so no table is uploaded and a 64-rank group needs one launch. A pair
//! (s, r) of a tile is one segment: its rows start, in s's buffer, after the rows s sends the
//! tile's earlier receivers, and land, in r's buffer, after the rows the tile's earlier senders
//! send r. `for_each_tile` builds the tiles on the host; the kernel body (`copy_pair`) runs on the
//! host in the CPU tests.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/transport/detail/stage.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::group_gather {

//! Senders (and receivers) per tile.
inline constexpr std::size_t tile = 64;

//! One launch: the pairs of up to `tile` senders × `tile` receivers.
struct tile_params {
  std::uint32_t senders = 0, receivers = 0;
  std::size_t row_bytes = 0;
  std::uint64_t skipped = 0;        //!< bit r: receiver r of the tile gets nothing
  const std::byte* src[tile];       //!< sender s's first row for the tile's first receiver
  std::byte* dst[tile];             //!< receiver r's place for the tile's first sender's rows
  std::uint32_t count[tile][tile];  //!< rows [sender][receiver]
};
static_assert(tile <= 64, "a tile's skipped receivers are bits of one 64-bit word");
static_assert(sizeof(tile_params) < 32764, "a tile travels in a kernel's parameters (at most 32764 bytes)");

//! One pair's bytes.
struct segment {
  const std::byte* src;
  std::byte* dst;
  std::size_t bytes;
};

//! Pair (s, r) of tile `p` (s < p.senders, r < p.receivers).
LOCUS_HOST_DEVICE segment pair_segment(const tile_params& p, unsigned s, unsigned r) {
  std::size_t before_r = 0, before_s = 0;
  for (unsigned i = 0; i < r; ++i)
    before_r += p.count[s][i];
  for (unsigned i = 0; i < s; ++i)
    before_s += p.count[i][r];
  return segment{p.src[s] + before_r * p.row_bytes, p.dst[r] + before_s * p.row_bytes,
                 std::size_t{p.count[s][r]} * p.row_bytes};
}

//! One thread's share of pair (s, r): the blocks of a grid row (`g`) split its bytes.
template <bool Vec>
LOCUS_HOST_DEVICE void copy_pair(stage::grid_index g, const tile_params& p, unsigned s, unsigned r) {
  if ((p.skipped >> r) & 1u) return;
  const segment seg = pair_segment(p, s, r);
  stage::copy_bytes<Vec>(g, seg.src, seg.dst, seg.bytes);
}

//! How a tile is launched: blocks per pair (enough for its largest pair to take 32 KiB per block
//! of 512 threads, at most 64), and whether every pair moves in 16-byte vectors.
struct tile_shape {
  unsigned blocks_per_pair = 1;
  bool vec = true;
};

inline constexpr unsigned threads_per_block = 512;

//! Calls `launch(params, shape)` for every tile of an exchange among `members` members with a
//! row to copy: `sent(s, r)` rows from s to r, `send[s]` the first of s's send rows (ordered by
//! receiver), `recv[r]` r's receive buffer (ordered by sender), `skip(r)` true for a receiver
//! that must get nothing (its buffer is not written). `params` is reused between calls.
template <class Sent, class Skip, class Launch>
void for_each_tile(std::size_t members, std::size_t row_bytes, const std::byte* const* send, Sent&& sent, Skip&& skip,
                   std::byte* const* recv, tile_params& params, Launch&& launch) {
  params.row_bytes = row_bytes;
  for (std::size_t r0 = 0; r0 < members; r0 += tile) {
    const std::size_t r1 = std::min(members, r0 + tile);
    for (std::size_t s0 = 0; s0 < members; s0 += tile) {
      const std::size_t s1 = std::min(members, s0 + tile);
      params.senders = static_cast<std::uint32_t>(s1 - s0);
      params.receivers = static_cast<std::uint32_t>(r1 - r0);
      std::size_t largest = 0, total = 0;
      bool vec = row_bytes % 16 == 0;
      params.skipped = 0;
      for (std::size_t r = r0; r < r1; ++r)
        if (skip(r)) params.skipped |= std::uint64_t{1} << (r - r0);
      for (std::size_t s = s0; s < s1; ++s) {
        std::size_t first = 0; // rows s sends receivers before the tile
        for (std::size_t r = 0; r < r0; ++r)
          first += sent(s, r);
        params.src[s - s0] = send[s] + first * row_bytes;
        vec = vec && reinterpret_cast<std::uintptr_t>(params.src[s - s0]) % 16 == 0;
        for (std::size_t r = r0; r < r1; ++r) {
          const std::size_t n = sent(s, r);
          params.count[s - s0][r - r0] = static_cast<std::uint32_t>(n);
          if ((params.skipped >> (r - r0)) & 1u) continue;
          largest = std::max(largest, n * row_bytes);
          total += n;
        }
      }
      for (std::size_t r = r0; r < r1; ++r) {
        std::size_t first = 0; // rows r gets from senders before the tile
        for (std::size_t s = 0; s < s0; ++s)
          first += sent(s, r);
        params.dst[r - r0] = recv[r] + first * row_bytes;
        vec = vec && reinterpret_cast<std::uintptr_t>(params.dst[r - r0]) % 16 == 0;
      }
      if (total == 0) continue;
      constexpr std::size_t block_bytes = std::size_t{threads_per_block} * 16 * 4;
      launch(static_cast<const tile_params&>(params),
             tile_shape{static_cast<unsigned>(std::clamp<std::size_t>((largest + block_bytes - 1) / block_bytes, 1, 64)),
                        vec});
    }
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::group_gather
