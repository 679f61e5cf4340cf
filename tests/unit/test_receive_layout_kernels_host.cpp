// The device receive layout's build (transport/detail/kernels/receive_layout.cuh: its kernels and
// the order device_receive_layout::build runs them in), compiled by the host compiler and run on
// the CPU under the warp emulator (tests/support/warp_emulator.hpp), CUB's scans replaced by a host
// scan that wraps in 32 bits as the device's does. On good metadata it must equal the host
// receive_layout (transport/layout.hpp); on bad metadata it must raise the check's bits and write
// nothing outside its arrays, which are sized exactly as the build sizes them (ASan and UBSan see
// any write past them in the sanitizer run). The skip checks live in the kernels, which the stage
// bodies' own CPU tests (test_stage_bodies.cpp) do not run.
#define BOOST_TEST_MODULE receive_layout_kernels_host
#include "../support/warp_emulator.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstring>
#include <locus/transport/detail/kernels/receive_layout.cuh>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/layout.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

namespace we = locus_test::warp_emulator;
namespace dp = locus::transport::detail::permute;
namespace st = locus::transport::detail::stage;

//! One build's arrays, sized as device_receive_layout::build sizes them.
struct build_result {
  std::vector<std::int32_t> row_entry_offsets, entry_row, count, at, slot_offsets, expected, expert_row, entry_position;
  std::vector<float> expert_weight;
  std::int32_t flag = 0;
  unsigned long long total = 0;
};

build_result build(const std::vector<std::int32_t>& counts, const std::vector<std::int32_t>& slot,
                   const std::vector<float>& weight, const std::vector<std::int32_t>& expected) {
  const std::size_t rows = counts.size(), entries = slot.size(), slots = expected.size() - 1;
  const dp::receive_layout_sizes n(rows, entries, slots);
  build_result b;
  b.row_entry_offsets.assign(n.row_entry_offsets, -7);
  b.entry_row.assign(n.per_entry, -7);
  b.count.assign(n.count, -7);
  b.at.assign(n.at, -7);
  b.slot_offsets.assign(n.slot_offsets, -7);
  b.expected = expected;
  b.expert_row.assign(n.per_entry, -7);
  b.entry_position.assign(n.per_entry, -7);
  b.expert_weight.assign(weight.empty() ? 0 : n.per_entry, -7.0f);
  const auto launch = [](auto kernel, unsigned blocks, unsigned threads, auto... args) {
    we::launch(blocks, threads, [&] { kernel(args...); });
  };
  // CUB's scan: out[0] = 0, then the inclusive sums, in 32-bit two's complement as on the device.
  const auto scan = [](const std::int32_t* in, std::size_t items, std::int32_t* out) {
    std::uint32_t sum = 0;
    out[0] = 0;
    for (std::size_t i = 0; i < items; ++i) {
      sum += static_cast<std::uint32_t>(in[i]);
      out[i + 1] = static_cast<std::int32_t>(sum);
    }
  };
  dp::receive_layout_sequence(
      launch, scan, counts.empty() ? nullptr : counts.data(), rows, slot.empty() ? nullptr : slot.data(),
      weight.empty() ? nullptr : weight.data(), entries, slots,
      {b.row_entry_offsets.data(), b.entry_row.data(), b.count.data(), b.at.data(), b.slot_offsets.data(),
       b.expected.data(), b.expert_row.data(), weight.empty() ? nullptr : b.expert_weight.data(),
       b.entry_position.data(), &b.flag, &b.total});
  return b;
}

} // namespace

// Good metadata over several blocks of every kernel (up to 1,300 entries: six blocks of the check,
// the chunk kernels' 41 chunks per slot), with and without weights: the host receive layout's
// arrays, and a clear check word.
BOOST_AUTO_TEST_CASE(the_build_equals_the_host_receive_layout) {
  std::mt19937 rng(31);
  for (const std::size_t slots : {1u, 3u, 32u})
    for (const std::size_t rows : {0u, 1u, 7u, 300u})
      for (const bool weighted : {true, false}) {
        std::uniform_int_distribution<std::int32_t> per_row(1, 8);
        std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(slots) - 1);
        std::uniform_real_distribution<float> u(0.f, 1.f);
        std::vector<std::int32_t> counts(rows);
        for (auto& c : counts)
          c = per_row(rng);
        const auto entries = static_cast<std::size_t>(std::accumulate(counts.begin(), counts.end(), 0));
        std::vector<std::int32_t> slot(entries);
        std::vector<float> weight(weighted ? entries : 0);
        for (std::size_t e = 0; e < entries; ++e) {
          slot[e] = pick(rng);
          if (weighted) weight[e] = u(rng);
        }
        locus::transport::receive_layout host;
        host.assign(slots, counts, slot, weight);
        const std::vector<std::int32_t> expected(host.slot_offsets().begin(), host.slot_offsets().end());
        const auto b = build(counts, slot, weight, expected);
        BOOST_TEST_CONTEXT(slots << " slots, " << rows << " rows, " << entries << " entries"
                                 << (weighted ? "" : ", no weights")) {
          BOOST_TEST(b.flag == 0);
          BOOST_TEST(std::equal(host.row_entry_offsets().begin(), host.row_entry_offsets().end(),
                                b.row_entry_offsets.begin(), b.row_entry_offsets.end()));
          BOOST_TEST(std::equal(host.slot_offsets().begin(), host.slot_offsets().end(), b.slot_offsets.begin(),
                                b.slot_offsets.end()));
          BOOST_TEST(std::equal(host.expert_row().begin(), host.expert_row().end(), b.expert_row.begin(),
                                b.expert_row.begin() + static_cast<std::ptrdiff_t>(entries)));
          BOOST_TEST(std::equal(host.entry_position().begin(), host.entry_position().end(), b.entry_position.begin(),
                                b.entry_position.begin() + static_cast<std::ptrdiff_t>(entries)));
          if (weighted && entries > 0)
            BOOST_TEST(std::memcmp(host.expert_weight().data(), b.expert_weight.data(), entries * sizeof(float)) == 0);
        }
      }
}

// Bad metadata (a row without entries, counts that do not add up or wrap 32 bits, a slot out of
// range, entries per slot other than announced): the check word names it, and every body after the
// check left its arrays as they were (the scans aside, whose output is never read).
BOOST_AUTO_TEST_CASE(bad_metadata_raises_its_bits_and_writes_nothing_out_of_place) {
  struct bad_case {
    const char* what;
    std::vector<std::int32_t> counts, slot, expected;
    std::int32_t bits;
  };
  const std::vector<std::int32_t> four{0, 2, 3, 5, 6}; // announced: slots 0..3 hold 2, 1, 2, 1 entries
  const std::vector<bad_case> cases{
      {"row without entries", {2, 0, 4}, {0, 1, 2, 2, 0, 3}, four, st::bad_row_entries},
      {"negative entry count", {3, -1, 4}, {0, 1, 2, 2, 0, 3}, four, st::bad_row_entries | st::bad_entry_total},
      {"counts exceed entries", {4, 4}, {0, 1, 2, 2, 0, 3}, four, st::bad_entry_total},
      {"counts short of entries", {1, 1}, {0, 1, 2, 2, 0, 3}, four, st::bad_entry_total},
      {"counts that wrap 32 bits", {2147483647, 2147483647, 4}, {0, 1, 2, 2, 0, 3}, four, st::bad_entry_total},
      {"entries with no rows", {}, {0, 1, 2, 2, 0, 3}, four, st::bad_entry_total},
      {"negative slot", {3, 3}, {0, -1, 2, 2, 0, 3}, four, st::bad_slot},
      {"slot past the end", {3, 3}, {0, 4, 2, 2, 0, 3}, four, st::bad_slot},
      {"slot far past the end", {3, 3}, {0, 1 << 30, 2, 2, 0, 3}, four, st::bad_slot},
      {"entries per slot other than announced", {3, 3}, {0, 1, 2, 2, 0, 0}, four, st::bad_slot_counts},
      {"everything", {0, 9}, {7, 1, 2, 2, 0, 3}, four, st::bad_row_entries | st::bad_entry_total | st::bad_slot}};
  for (const auto& c : cases) {
    const std::vector<float> weight(c.slot.size(), 0.5f);
    const auto b = build(c.counts, c.slot, weight, c.expected);
    BOOST_TEST_CONTEXT(c.what) {
      BOOST_TEST(b.flag == c.bits);
      // Skipped after the check: nothing placed. (A slot-count mismatch is found after the
      // counting, before the placement, which it skips too.)
      const auto untouched = [](const auto& v) {
        return std::all_of(v.begin(), v.end(), [](auto x) { return x == -7; });
      };
      BOOST_TEST(untouched(b.expert_row));
      BOOST_TEST(untouched(b.entry_position));
      BOOST_TEST(untouched(b.expert_weight));
      if (c.bits != st::bad_slot_counts) {
        BOOST_TEST(untouched(b.entry_row));
        BOOST_TEST(untouched(b.count));
        BOOST_TEST(untouched(b.slot_offsets));
      }
    }
  }
}
