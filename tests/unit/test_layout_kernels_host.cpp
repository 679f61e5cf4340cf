// The device layout's kernels (transport/detail/kernels/layout.cuh), compiled by the host compiler
// and run on the CPU under the warp emulator (tests/support/warp_emulator.hpp), in the order
// `dispatch_build` (transport/detail/dispatch_layout.hpp) launches them: CUB's stable radix sorts
// are std::stable_sort (after checking that every key fits the end bit the build passes, since a
// radix sort ignores the bits above it) and its scans std::exclusive_scan. Every array must equal
// the host layout's (transport/layout.hpp, itself tested against brute force in test_layout.cpp),
// as tests/cuda/test_layout_kernels.cu checks on a GPU. So a CPU-only build catches errors in the
// kernels' own index arithmetic (row keys and sentinels, row sizes, entry numbering, targets,
// forwards), which the shared per-token bodies do not cover, and in the order of the steps.
#define BOOST_TEST_MODULE layout_kernels_host
#include "../support/layout_cases.hpp"
#include "../support/random_map.hpp"
#include "../support/warp_emulator.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <locus/core/expert_map.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/replica_selection.hpp>
#include <numeric>
#include <random>
#include <span>
#include <vector>

// The kernels call CUDA's global isfinite unqualified (their `#pragma unroll`, nvcc's, is left to
// -Wno-unknown-pragmas in tests/unit/CMakeLists.txt: GCC reads it before any diagnostic pragma).
using std::isfinite;
#include <locus/transport/detail/kernels/layout.cuh>

namespace {

using namespace locus;
using namespace locus::transport;
namespace we = locus_test::warp_emulator;
namespace dl = locus::transport::detail::layout;

constexpr unsigned threads = 256; // dispatch_build's block size

//! The arrays dispatch_build leaves, on the host.
struct replay {
  std::int32_t error = 0;
  std::vector<std::int32_t> copy_rank, copy_slot, copy_replica, copy_row, copy_entry, row_token, row_forwards,
      row_entry_offsets, rank_offsets, rank_entry_offsets, entry_copy, entry_target, entry_slot, slot_counts, reach;
  std::vector<float> entry_weight;
  std::vector<unsigned long long> links;
};

//! CUB's SortPairs(keys, values, 0, end_bit), stable, on the host: every key must lie below
//! 2^end_bit, or the radix sort would order by the low bits alone.
void sort_pairs(const std::vector<std::int32_t>& key_in, const std::vector<std::int32_t>& val_in,
                std::vector<std::int32_t>& key_out, std::vector<std::int32_t>& val_out, int end_bit) {
  for (const std::int32_t k : key_in) {
    BOOST_REQUIRE_MESSAGE(k >= 0 && (static_cast<std::int64_t>(k) >> end_bit) == 0,
                          "sort key " << k << " does not fit the radix sort's " << end_bit << " bits");
  }
  std::vector<std::size_t> order(key_in.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return key_in[a] < key_in[b]; });
  for (std::size_t i = 0; i < order.size(); ++i) {
    key_out[i] = key_in[order[i]];
    val_out[i] = val_in[order[i]];
  }
}

//! dispatch_build's seven steps for one source rank, each kernel under the emulator.
template <std::size_t K, class Experts>
replay build(const routing<top_k<K>>& r, const expert_map& map, const dynamic_topology& topo, std::size_t src,
             transport_kind kind, const placement::replica_policy& policy) {
  const std::size_t tokens = r.tokens(), n = tokens * K, ranks = topo.ranks();
  const auto slots = static_cast<std::int32_t>(map.slots_per_rank());
  const auto gpus = static_cast<std::int32_t>(topo.gpus_per_node());
  const dl::token_params p{static_cast<std::int32_t>(src), gpus, slots,
                           kind == transport_kind::flat ? slots : gpus * slots, kind == transport_kind::hierarchical};
  const std::size_t buckets = ranks * static_cast<std::size_t>(p.bucket_width);
  const Experts experts(map.experts());
  std::vector<std::int32_t> fixed, cand_offsets, cands;
  placement::replica_candidates(map, topo, src, fixed, cand_offsets, cands, policy);
  cands.push_back(-1); // never empty, as device_layout uploads it
  const slot_ref* replicas = map.view().replicas;
  const std::int32_t* ids = r.ids().data();
  const float* weights = r.weights().data();

  replay out;
  out.copy_rank.assign(n, 0);
  out.copy_slot.assign(n, 0);
  out.copy_replica.assign(n, 0);
  out.copy_row.assign(n, 0);
  out.copy_entry.assign(n, 0);
  out.row_token.assign(n, 0);
  out.row_forwards.assign(n, 0);
  out.row_entry_offsets.assign(n + 1, 0);
  out.rank_offsets.assign(ranks + 1, 0);
  out.rank_entry_offsets.assign(ranks + 1, 0);
  out.entry_copy.assign(n, 0);
  out.entry_target.assign(n, 0);
  out.entry_slot.assign(n, 0);
  out.entry_weight.assign(n, 0.0f);
  out.slot_counts.assign(ranks * static_cast<std::size_t>(slots), 0);
  out.reach.assign(ranks, 0);
  out.links.assign(3, 0);
  out.error = 0x7f7f7f7f; // the memset's "no error"
  std::vector<std::int32_t> key_in(n), key_out(n), val_in(n), val_out(n), local_row(n), row_size(n), sorted_size(n + 1),
      rank_rows(ranks + 1, 0);

  // 1. validate, joins, sort keys.
  we::launch(dl::blocks_for(tokens, threads), threads, [&] {
    dl::validate_kernel<K, Experts>(ids, weights, tokens, experts, p, fixed.data(), cand_offsets.data(), cands.data(),
                                    replicas, policy.rule, &out.error, key_in.data(), val_in.data(),
                                    out.copy_replica.data());
  });
  // 2. stable sort by expert (joined copies after the balanced ones).
  sort_pairs(key_in, val_in, key_out, val_out, dl::key_bits(2 * experts.value()));
  // 3. replica per copy.
  we::launch(dl::blocks_for(n, threads), threads, [&] {
    dl::replica_kernel(key_out.data(), val_out.data(), n, fixed.data(), cand_offsets.data(), cands.data(), policy.rule,
                       replicas, slots, out.copy_rank.data(), out.copy_slot.data(), out.copy_replica.data(),
                       out.slot_counts.data());
  });
  // 4. rows per token.
  we::launch(dl::blocks_for(tokens, threads), threads, [&] {
    dl::group_kernel<K>(p, out.copy_rank.data(), out.copy_slot.data(), tokens, static_cast<std::int32_t>(buckets),
                        local_row.data(), key_in.data(), val_in.data(), row_size.data(), rank_rows.data(),
                        out.reach.data(), out.links.data());
  });
  // 5. stable sort of rows by bucket (unused places carry the sentinel `buckets`, sorted last).
  sort_pairs(key_in, val_in, key_out, val_out, dl::key_bits(buckets));
  // 6. rank offsets; per-row entry counts; entry offsets.
  std::exclusive_scan(rank_rows.begin(), rank_rows.end(), out.rank_offsets.begin(), 0);
  we::launch(dl::blocks_for(n + 1, threads), threads,
             [&] { dl::row_sizes_kernel(val_out.data(), row_size.data(), n, sorted_size.data()); });
  std::exclusive_scan(sorted_size.begin(), sorted_size.end(), out.row_entry_offsets.begin(), 0);
  // 7. rows' tokens and entries.
  we::launch(dl::blocks_for(n, threads), threads, [&] {
    dl::place_kernel<K>(p, key_out.data(), val_out.data(), out.rank_offsets.data(), static_cast<std::int32_t>(ranks),
                        out.row_entry_offsets.data(), out.copy_rank.data(), out.copy_slot.data(), local_row.data(),
                        weights, out.row_token.data(), p.node ? out.row_forwards.data() : nullptr, out.copy_row.data(),
                        out.copy_entry.data(), out.entry_copy.data(), out.entry_target.data(), out.entry_slot.data(),
                        out.entry_weight.data());
  });
  we::launch(dl::blocks_for(ranks + 1, threads), threads, [&] {
    dl::rank_entry_offsets_kernel(out.rank_offsets.data(), out.row_entry_offsets.data(),
                                  static_cast<std::int32_t>(ranks), out.rank_entry_offsets.data());
  });
  return out;
}

using locus_test::random_routing;

template <class T>
void check_equal(const char* what, std::span<const T> host, const std::vector<T>& replayed) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_REQUIRE_GE(replayed.size(), host.size());
    BOOST_TEST(std::equal(host.begin(), host.end(), replayed.begin()));
  }
}

template <std::size_t K, class Experts = experts<>>
void check_case(std::size_t experts_n, const dynamic_topology& topo, std::size_t slots, std::size_t replicas,
                std::size_t tokens, transport_kind kind, const placement::replica_policy& policy, std::mt19937& rng) {
  const expert_map map = locus_test::random_map(rng, experts_n, topo.ranks(), slots, replicas);
  const auto r = random_routing<K>(tokens, experts_n, rng);
  for (const std::size_t src : {std::size_t{0}, topo.ranks() / 2, topo.ranks() - 1}) {
    BOOST_TEST_CONTEXT("E=" << experts_n << " K=" << K << " " << topo.nodes() << "x" << topo.gpus_per_node() << " "
                            << to_string(kind) << " " << placement::to_string(policy.rule) << " source " << src) {
      layout<top_k<K>> host;
      layout_options opt{kind, 2, 64};
      opt.replicas = policy;
      host.assign(r.view(), map, topo, src, opt);
      const auto dev = build<K, Experts>(r, map, topo, src, kind, policy);
      BOOST_TEST(dev.error == 0x7f7f7f7f);
      BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(dev.rank_offsets.back()), host.rows());
      check_equal<std::int32_t>("copy_rank", host.copy_rank(), dev.copy_rank);
      check_equal<std::int32_t>("copy_slot", host.copy_slot(), dev.copy_slot);
      check_equal<std::int32_t>("copy_replica", host.copy_replica(), dev.copy_replica);
      check_equal<std::int32_t>("copy_row", host.copy_row(), dev.copy_row);
      check_equal<std::int32_t>("copy_entry", host.copy_entry(), dev.copy_entry);
      check_equal<std::int32_t>("row_token", host.row_token(), dev.row_token);
      check_equal<std::int32_t>("rank_offsets", host.rank_offsets(), dev.rank_offsets);
      check_equal<std::int32_t>("rank_entry_offsets", host.rank_entry_offsets(), dev.rank_entry_offsets);
      check_equal<std::int32_t>("row_entry_offsets", host.row_entry_offsets(), dev.row_entry_offsets);
      check_equal<std::int32_t>("entry_copy", host.entry_copy(), dev.entry_copy);
      check_equal<std::int32_t>("entry_target", host.entry_target(), dev.entry_target);
      check_equal<std::int32_t>("entry_slot", host.entry_slot(), dev.entry_slot);
      check_equal<float>("entry_weight", host.entry_weight(), dev.entry_weight);
      check_equal<std::int32_t>("slot_counts", host.slot_counts(), dev.slot_counts);
      // The link classes (local, intra-node, inter-node copies) and, per rank, the tokens reaching it.
      for (std::size_t c = 0; c < 3; ++c)
        BOOST_TEST(dev.links[c] == host.link_copies()[c]);
      BOOST_TEST(dev.reach == locus_test::tokens_reaching(host.copy_rank(), K, topo.ranks()),
                 boost::test_tools::per_element());
      if (kind == transport_kind::hierarchical)
        for (std::size_t i = 0; i < host.rows(); ++i)
          BOOST_TEST(static_cast<std::size_t>(dev.row_forwards[i]) == host.forwards(i), "row " << i);
    }
  }
}

} // namespace

// Several blocks per launch (300 tokens: two of the validate and group kernels, up to ten of the
// copy kernels), every replica rule, both transports, one to twelve ranks, a static and a dynamic
// expert count.
BOOST_AUTO_TEST_CASE(device_layout_kernels_equal_the_host_layout) {
  std::mt19937 rng(17);
  const std::vector<std::uint8_t> hot4 = {1, 0, 0, 2}, hot12 = {0, 1, 0, 0, 2, 0, 0, 0, 3, 0, 1, 0};
  for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical})
    for (const placement::replica_rule rule : placement::all_replica_rules) {
      placement::replica_policy policy{rule, 5, {}};
      check_case<3>(16, dynamic_topology(1, 1), 16, 0, 300, kind, policy, rng);
      if (rule == placement::replica_rule::locality_bounded) policy.hot = hot4;
      check_case<4, experts<24>>(24, dynamic_topology(2, 2), 8, 8, 300, kind, policy, rng);
      if (rule == placement::replica_rule::locality_bounded) policy.hot = hot12;
      check_case<8>(40, dynamic_topology(3, 4), 5, 20, 300, kind, policy, rng);
    }
}

// Bad ids and weights: the error word holds the smallest bad copy (an id out of range, repeated in
// its token, or a non-finite weight), which device_layout::assign then names as the host would.
BOOST_AUTO_TEST_CASE(validate_kernel_keeps_the_smallest_bad_copy) {
  std::mt19937 rng(23);
  const dynamic_topology topo(2, 2);
  const expert_map map = locus_test::random_map(rng, 16, 4, 6, 4);
  for (int trial = 0; trial < 12; ++trial) {
    auto r = random_routing<4>(300, 16, rng);
    std::vector<expert_id> ids(r.ids().begin(), r.ids().end());
    std::vector<float> w(r.weights().begin(), r.weights().end());
    // Three faults at random copies of the later blocks, one of each kind.
    std::uniform_int_distribution<std::size_t> at(40, 299);
    const std::size_t t1 = at(rng), t2 = at(rng), t3 = at(rng);
    ids[t1 * 4 + 2] = trial % 2 ? 16 : -1;
    ids[t2 * 4 + 3] = ids[t2 * 4 + 1];
    w[t3 * 4 + 0] = trial % 3 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    std::size_t smallest = std::numeric_limits<std::size_t>::max();
    for (std::size_t c = 0; c < ids.size(); ++c) {
      const std::size_t t = c / 4, j = c % 4;
      bool bad = ids[c] < 0 || ids[c] >= 16 || !std::isfinite(w[c]);
      for (std::size_t i = 0; i < j; ++i)
        bad |= ids[t * 4 + i] == ids[c];
      if (bad) smallest = std::min(smallest, c);
    }
    const routing<top_k<4>> bad(std::move(ids), std::move(w));
    const auto dev = build<4, experts<>>(bad, map, topo, 1, transport_kind::flat, {});
    BOOST_TEST(static_cast<std::size_t>(dev.error) == smallest);
  }
}

// With its flag set, plan_nothing_kernel (one block of 128 threads, as device_layout launches it)
// zeroes every count the host reads; with it clear, it changes nothing.
BOOST_AUTO_TEST_CASE(plan_nothing_kernel_zeroes_the_counts_only_when_flagged) {
  std::mt19937 rng(29);
  const dynamic_topology topo(3, 4);
  const expert_map map = locus_test::random_map(rng, 40, 12, 5, 20);
  const auto r = random_routing<8>(300, 40, rng);
  for (const unsigned long long flag : {0ull, 1ull}) {
    auto dev = build<8, experts<>>(r, map, topo, 5, transport_kind::hierarchical, {});
    const auto before = dev;
    const unsigned long long words[2] = {flag, 0};
    we::launch(1, 128, [&] {
      dl::plan_nothing_kernel(words, topo.ranks(), dev.rank_offsets.data(), dev.rank_entry_offsets.data(),
                              dev.slot_counts.data(), dev.slot_counts.size(), dev.reach.data(), dev.links.data());
    });
    const auto zero = [](const auto& v) { return std::all_of(v.begin(), v.end(), [](auto x) { return x == 0; }); };
    BOOST_TEST_CONTEXT("flag " << flag) {
      BOOST_TEST(!zero(before.rank_offsets)); // something to clear
      BOOST_TEST((flag ? zero(dev.rank_offsets) : dev.rank_offsets == before.rank_offsets));
      BOOST_TEST((flag ? zero(dev.rank_entry_offsets) : dev.rank_entry_offsets == before.rank_entry_offsets));
      BOOST_TEST((flag ? zero(dev.slot_counts) : dev.slot_counts == before.slot_counts));
      BOOST_TEST((flag ? zero(dev.reach) : dev.reach == before.reach));
      BOOST_TEST((flag ? zero(dev.links) : dev.links == before.links));
    }
  }
}

// key_bits: the end bit a radix sort needs for keys up to and including its argument.
BOOST_AUTO_TEST_CASE(key_bits_covers_its_largest_key) {
  for (std::size_t max_key : {0u, 1u, 2u, 3u, 4u, 255u, 256u, 1000u, 65535u, 65536u})
    BOOST_TEST((max_key >> dl::key_bits(max_key)) == 0u, "key " << max_key);
  BOOST_TEST(dl::key_bits(2) == 2);
  BOOST_TEST(dl::key_bits(1u << 30) == 31);
  BOOST_TEST(dl::blocks_for(0) == 1u);
  BOOST_TEST(dl::blocks_for(256) == 1u);
  BOOST_TEST(dl::blocks_for(257) == 2u);
}
