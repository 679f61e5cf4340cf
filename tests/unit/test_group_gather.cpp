// The one-GPU transport's copies (transport/detail/group_gather.hpp): the tiles for_each_tile
// plans, run here by the host executor with the kernel's body, deliver what an all-to-all of the
// same counts delivers - every row once, in sender order on each receiver, nothing written beside
// - for groups of one tile and of several (33, 64, 65 and 130 members: tiles whose offsets
// start mid-list), with receivers that must get nothing, in 16-byte vectors where the buffers allow it.
#define BOOST_TEST_MODULE group_gather
#include <boost/test/unit_test.hpp>
#include <cstddef>
#include <cstdint>
#include <locus/transport/detail/group_gather.hpp>
#include <random>
#include <vector>

namespace gg = locus::transport::detail::group_gather;
namespace st = locus::transport::detail::stage;

namespace {

// Runs tile `p` as the kernel would: blockIdx.y the receiver, blockIdx.z the sender, the
// shape's blocks along x (fewer threads than the kernel: the body strides).
void run_tile(const gg::tile_params& p, gg::tile_shape shape) {
  for (unsigned s = 0; s < p.senders; ++s)
    for (unsigned r = 0; r < p.receivers; ++r)
      st::run_grid(shape.blocks_per_pair, 7, [&](st::grid_index g) {
        if (shape.vec)
          gg::copy_pair<true>(g, p, s, r);
        else
          gg::copy_pair<false>(g, p, s, r);
      });
}

void check_exchange(std::size_t members, std::size_t row_bytes, unsigned seed, std::size_t misalign) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::size_t> count(0, 3);
  std::bernoulli_distribution silent(0.1);
  // sent[s][r]: rows s sends r; a silent receiver gets nothing (as a receive that disagrees).
  std::vector<std::vector<std::size_t>> sent(members, std::vector<std::size_t>(members));
  std::vector<bool> mute(members);
  for (auto&& m : mute)
    m = silent(rng);
  for (auto& row : sent)
    for (auto& n : row)
      n = count(rng);
  constexpr std::byte guard{0x5A};
  std::vector<std::vector<std::byte>> send(members), recv(members), expected(members);
  std::vector<const std::byte*> send_ptr(members);
  std::vector<std::byte*> recv_ptr(members);
  std::uniform_int_distribution<int> byte(0, 255);
  for (std::size_t s = 0; s < members; ++s) {
    std::size_t rows = 0;
    for (std::size_t r = 0; r < members; ++r)
      rows += sent[s][r];
    send[s].resize(rows * row_bytes + 32 + misalign);
    for (auto& b : send[s])
      b = std::byte(byte(rng));
  }
  for (std::size_t s = 0; s < members; ++s) {
    auto* base =
        reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(send[s].data()) + 15) & ~std::uintptr_t{15});
    send_ptr[s] = base + misalign;
  }
  for (std::size_t r = 0; r < members; ++r) {
    std::size_t rows = 0;
    for (std::size_t s = 0; s < members; ++s)
      rows += sent[s][r];
    recv[r].assign(rows * row_bytes + 32, guard);
    recv_ptr[r] =
        reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(recv[r].data()) + 15) & ~std::uintptr_t{15});
    expected[r] = recv[r];
    if (mute[r]) continue;
    std::size_t at = 0;
    for (std::size_t s = 0; s < members; ++s) {
      std::size_t first = 0;
      for (std::size_t q = 0; q < r; ++q)
        first += sent[s][q];
      for (std::size_t i = 0; i < sent[s][r] * row_bytes; ++i)
        expected[r][static_cast<std::size_t>(recv_ptr[r] - recv[r].data()) + at + i] =
            send_ptr[s][first * row_bytes + i];
      at += sent[s][r] * row_bytes;
    }
  }
  gg::tile_params params;
  std::size_t tiles = 0;
  bool vec_seen = false;
  gg::for_each_tile(
      members, row_bytes, send_ptr.data(), [&](std::size_t s, std::size_t r) { return sent[s][r]; },
      [&](std::size_t r) { return static_cast<bool>(mute[r]); }, recv_ptr.data(), params,
      [&](const gg::tile_params& p, gg::tile_shape shape) {
        ++tiles;
        vec_seen = vec_seen || shape.vec;
        BOOST_TEST(p.senders <= gg::tile_senders);
        BOOST_TEST(p.receivers <= gg::tile_receivers);
        run_tile(p, shape);
      });
  BOOST_TEST(tiles <= ((members + gg::tile_senders - 1) / gg::tile_senders) *
                          ((members + gg::tile_receivers - 1) / gg::tile_receivers));
  if (tiles > 0) BOOST_TEST(vec_seen == (misalign == 0 && row_bytes % 16 == 0));
  for (std::size_t r = 0; r < members; ++r)
    BOOST_TEST((recv[r] == expected[r]), "receiver " << r << " of " << members << (mute[r] ? " (mute)" : ""));
}

} // namespace

BOOST_AUTO_TEST_CASE(one_tile_groups) {
  for (std::size_t members : {1, 2, 7, 32})
    for (std::size_t row_bytes : {16, 48, 13})
      check_exchange(members, row_bytes, static_cast<unsigned>(members * 100 + row_bytes), 0);
}

BOOST_AUTO_TEST_CASE(groups_of_several_tiles) {
  check_exchange(33, 48, 4, 0);
  check_exchange(64, 16, 5, 0);
  check_exchange(65, 32, 1, 0);
  check_exchange(130, 16, 2, 0);
}

BOOST_AUTO_TEST_CASE(misaligned_buffers_move_element_by_element) { check_exchange(9, 32, 3, 4); }
