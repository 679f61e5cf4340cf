#define BOOST_TEST_MODULE traffic
#include "../support/replica_reference.hpp"

#include <boost/test/unit_test.hpp>
#include <cmath>
#include <locus/cost/bounds.hpp>
#include <locus/cost/time_model.hpp>
#include <locus/cost/traffic.hpp>
#include <locus/placement/linear.hpp>
#include <map>
#include <random>
#include <set>

using namespace locus;
using namespace locus::cost;

namespace {

// Reference count, token by token with ordered sets. Replica choices come from the rule's text
// (tests/support/replica_reference.hpp).
layer_traffic reference(const dynamic_topology& topo, const expert_map& map, const routing<top_k<>>& r,
                        const std::vector<std::uint32_t>& src, transport_kind kind) {
  layer_traffic out(topo.ranks());
  locus_test::replica_reference sel(map, topo, kind);
  auto copy = [&](std::size_t a, std::size_t b, link_class c) {
    ++out.copies[static_cast<std::size_t>(c)];
    ++out.sent[a][static_cast<std::size_t>(c)];
    ++out.received[b][static_cast<std::size_t>(c)];
  };
  for (std::size_t t = 0; t < r.tokens(); ++t) {
    std::set<std::size_t> dests;
    for (const std::int32_t idx :
         sel.token(src[t], std::span<const expert_id>(r.ids().data() + t * r.top_k(), r.top_k()))) {
      const auto rank = static_cast<std::size_t>(map.view().replicas[idx].rank);
      ++out.expert_rows[rank];
      dests.insert(rank);
    }
    std::map<std::size_t, std::set<std::size_t>> by_node;
    for (std::size_t d : dests)
      by_node[topo.node_of(d)].insert(d);
    for (const auto& [node, ranks] : by_node) {
      if (kind == transport_kind::flat || node == topo.node_of(src[t])) {
        for (std::size_t d : ranks)
          copy(src[t], d, d == src[t] ? link_class::same_gpu : topo.link(src[t], d));
      } else {
        const std::size_t peer = topo.rank_of(node, topo.local_rank_of(src[t]));
        copy(src[t], peer, link_class::inter_node);
        for (std::size_t d : ranks)
          if (d != peer) copy(peer, d, link_class::intra_node);
      }
    }
    ++out.tokens;
  }
  return out;
}

void require_equal(const layer_traffic& a, const layer_traffic& b) {
  BOOST_REQUIRE_EQUAL(a.tokens, b.tokens);
  for (std::size_t c = 0; c < link_class_count; ++c)
    BOOST_REQUIRE_EQUAL(a.copies[c], b.copies[c]);
  for (std::size_t r = 0; r < a.ranks(); ++r) {
    BOOST_REQUIRE_EQUAL(a.expert_rows[r], b.expert_rows[r]);
    for (std::size_t c = 0; c < link_class_count; ++c) {
      BOOST_REQUIRE_EQUAL(a.sent[r][c], b.sent[r][c]);
      BOOST_REQUIRE_EQUAL(a.received[r][c], b.received[r][c]);
    }
  }
}

routing<top_k<>> random_routing(std::mt19937& rng, std::size_t tokens, std::size_t experts, std::size_t k) {
  routing<top_k<>> r(tokens, top_k<>(k));
  std::vector<expert_id> pool(experts);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t e = 0; e < experts; ++e)
      pool[e] = static_cast<expert_id>(e);
    for (std::size_t j = 0; j < k; ++j) {
      // Skewed: low ids are popular.
      const std::size_t pick = j + std::min<std::size_t>(rng() % (experts - j), rng() % (experts - j));
      std::swap(pool[j], pool[pick]);
      r.view().expert(t, j) = pool[j];
    }
  }
  return r;
}

} // namespace

BOOST_AUTO_TEST_CASE(matches_brute_force_on_random_cases) {
  std::mt19937 rng(21);
  for (int trial = 0; trial < 60; ++trial) {
    const dynamic_topology topo(1 + rng() % 4, 1 + rng() % 4);
    const std::size_t experts = topo.ranks() * (1 + rng() % 4), k = 1 + rng() % std::min<std::size_t>(experts, 8);
    const std::size_t slots = std::min(experts, experts / topo.ranks() + rng() % 3); // planners: one copy per GPU
    // Random map with replicas in the redundant slots.
    std::vector<expert_id> table(topo.ranks() * slots, empty_slot);
    const auto lin = placement::linear{}.plan({topo, experts, slots, {std::vector<double>(experts, 1.0)}, {}}).front();
    table = lin.slot_table();
    for (expert_id& cell : table)
      if (cell == empty_slot && rng() % 2) cell = static_cast<expert_id>(rng() % experts);
    const expert_map map(experts, topo.ranks(), slots, table);
    const auto r = random_routing(rng, 200, experts, k);
    std::vector<std::uint32_t> src(r.tokens());
    for (auto& s : src)
      s = static_cast<std::uint32_t>(rng() % topo.ranks());
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      traffic_counter counter(topo, kind);
      layer_traffic got(topo.ranks());
      counter.count_step(map, r.view(), {}, src, got);
      require_equal(got, reference(topo, map, r, src, kind));
    }
  }
}

BOOST_AUTO_TEST_CASE(hand_built_flat_and_hierarchical) {
  // 2 nodes x 2 GPUs, expert e on rank e; expert 2 also replicated on rank 1.
  const dynamic_topology topo(2, 2);
  const expert_map map(4, 4, 2, {0, empty_slot, 1, 2, 2, empty_slot, 3, empty_slot});
  routing<top_k<>> r({1, 2, 3, 0, 1, 3}, std::vector<float>(6, 1.f), top_k<>(3));
  const std::vector<std::uint32_t> src = {0, 1};
  // Token 0 (rank 0): expert 1 -> rank 1, expert 2 -> rank 1 (node-local replica), expert 3 -> rank 3.
  // Token 1 (rank 1): expert 0 -> rank 0, expert 1 -> rank 1 (same GPU), expert 3 -> rank 3.
  traffic_counter flat(topo, transport_kind::flat), hier(topo, transport_kind::hierarchical);
  layer_traffic f(4), h(4);
  flat.count_step(map, r.view(), {}, src, f);
  hier.count_step(map, r.view(), {}, src, h);
  // Flat: token 0 -> {1 intra, 3 inter}; token 1 -> {0 intra, 1 same, 3 inter}.
  BOOST_TEST(f.copies[0] == 1u);
  BOOST_TEST(f.copies[1] == 2u);
  BOOST_TEST(f.copies[2] == 2u);
  // Hierarchical: token 0 crosses to rank 2 (its rail peer) which forwards to rank 3; token 1's
  // rail peer is rank 3 itself.
  BOOST_TEST(h.copies[0] == 1u);
  BOOST_TEST(h.copies[1] == 3u);
  BOOST_TEST(h.copies[2] == 2u);
  BOOST_TEST(h.received[2][2] == 1u);
  BOOST_TEST(h.sent[2][1] == 1u);
  BOOST_TEST((f.expert_rows == std::vector<std::uint64_t>{1, 3, 0, 2}));
  BOOST_TEST(f.load_imbalance() == 2.0);
  // Active slots (the weights a rank reads in the step): rank 1 runs expert 1 (both tokens, one slot)
  // and expert 2's replica; rank 3 expert 3 once for two rows. Each call counts afresh; added
  // counts sum.
  BOOST_TEST((f.active_slots == std::vector<std::uint64_t>{1, 2, 0, 1}));
  layer_traffic twice = f;
  flat.count_step(map, r.view(), {}, src, twice);
  BOOST_TEST((twice.active_slots == std::vector<std::uint64_t>{2, 4, 0, 2}));
  layer_traffic again(4);
  flat.count_step(map, r.view(), std::vector<std::size_t>{1}, std::vector<std::uint32_t>{1}, again);
  BOOST_TEST((again.active_slots == std::vector<std::uint64_t>{1, 1, 0, 1})); // token 1 alone: 0, 1, 3
  const message_sizes m = message_sizes::fp8_dispatch_bf16_combine(7168);
  BOOST_TEST(m.dispatch_bytes == 7168u + 56u * 4u);
  BOOST_TEST(f.dispatch_bytes(link_class::inter_node, m) == 2u * m.dispatch_bytes);
  BOOST_TEST(f.combine_bytes(link_class::inter_node, m) == 2u * 2u * 7168u);
}

BOOST_AUTO_TEST_CASE(bad_inputs_raise) {
  const dynamic_topology topo(1, 2);
  const expert_map map(2, 2, 1, {0, 1});
  routing<top_k<>> r({0, 5}, {1.f, 1.f}, top_k<>(1));
  traffic_counter counter(topo, transport_kind::flat);
  layer_traffic out(2);
  const std::vector<std::uint32_t> src = {0, 1};
  BOOST_CHECK_THROW(counter.count_step(map, r.view(), {}, src, out), invalid_input_error);
  r.ids()[1] = 1;
  const std::vector<std::uint32_t> bad_src = {0, 2};
  BOOST_CHECK_THROW(counter.count_step(map, r.view(), {}, bad_src, out), invalid_input_error);
  layer_traffic wrong(3);
  BOOST_CHECK_THROW(counter.count_step(map, r.view(), {}, src, wrong), config_error);
  BOOST_CHECK_THROW(parse_transport_kind("mesh"), config_error);
  // One expert twice in a token: the layout refuses it, so the model does too (it counted two rows).
  routing<top_k<>> twice({1, 1}, {1.f, 1.f}, top_k<>(2));
  try {
    counter.count_step(map, twice.view(), {}, std::vector<std::uint32_t>{0}, out);
    BOOST_ERROR("a token choosing one expert twice was counted");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message() == "traffic model: token 0: expert 1 is chosen twice");
  }
}

BOOST_AUTO_TEST_CASE(time_model_by_hand) {
  layer_traffic t(2);
  t.sent[0][2] = 10; // rank 0 sends 10 network copies
  t.received[1][2] = 10;
  t.sent[1][1] = 4; // and 4 NVLink copies from rank 1
  t.expert_rows = {7, 3};
  const link_model m;
  const message_sizes s{1000, 2000};
  const layer_time lt = estimate_layer_time(t, s, m);
  // Network: 8 µs + 10 × 1000 B / 50 GB/s = 8.2 µs; NVLink: 3 + 4000 B / 160 GB/s = 3.025 µs.
  BOOST_TEST(lt.dispatch_us == 8.2, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lt.combine_us == 8.4, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lt.compute_us == 7 * 0.22, boost::test_tools::tolerance(1e-12));
  // Weight reads: a rank's expert time is the larger of its rows' arithmetic and its active slots'
  // reads, and the layer waits for the slowest rank (rank 1: 5 reads of 1 µs over 3 rows).
  t.active_slots = {2, 5};
  link_model reads;
  reads.expert_read_us = 1.0;
  BOOST_TEST(estimate_layer_time(t, s, reads).compute_us == 5.0, boost::test_tools::tolerance(1e-12));
  reads.expert_read_us = 0.1; // rank 0's rows (1.54 µs) then weigh more than any reads
  BOOST_TEST(estimate_layer_time(t, s, reads).compute_us == 7 * 0.22, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(estimate_layer_time(t, s, m).compute_us == 7 * 0.22, boost::test_tools::tolerance(1e-12)); // off
  reads.expert_read_us = -1;
  BOOST_CHECK_THROW(estimate_layer_time(t, s, reads), config_error);
  // A zero bandwidth made the time inf and a NaN one made it 0 (NaN lost every max): both refused.
  for (const double gbps : {0.0, -1.0, std::nan(""), HUGE_VAL}) {
    link_model bad;
    bad.network_gbps = gbps;
    BOOST_CHECK_THROW(estimate_layer_time(t, s, bad), config_error);
  }
  link_model slow;
  slow.nvlink_latency_us = std::nan("");
  BOOST_CHECK_THROW(estimate_layer_time(t, s, slow), config_error);
  slow.nvlink_latency_us = 0;
  slow.expert_us_per_row = -1;
  BOOST_CHECK_THROW(estimate_layer_time(t, s, slow), config_error);
  // Finite but absurd: 7 rows × 1e308 µs overflowed to an inf time, reported as a result.
  slow.expert_us_per_row = 1e308;
  BOOST_CHECK_THROW(estimate_layer_time(t, s, slow), config_error);
  slow.expert_us_per_row = 1e300;
  BOOST_TEST(std::isfinite(estimate_layer_time(t, s, slow).total_us()));
}

BOOST_AUTO_TEST_CASE(lower_bound_never_exceeds_any_placement) {
  std::mt19937 rng(4);
  for (int trial = 0; trial < 40; ++trial) {
    const dynamic_topology topo(2 + rng() % 3, 1 + rng() % 2);
    const std::size_t experts = topo.ranks() * 2, k = 2, slots = 2 + rng() % 2;
    std::vector<expert_id> table(topo.ranks() * slots, empty_slot);
    std::vector<std::size_t> cells(table.size());
    for (std::size_t i = 0; i < cells.size(); ++i)
      cells[i] = i;
    std::shuffle(cells.begin(), cells.end(), rng);
    for (std::size_t e = 0; e < experts; ++e)
      table[cells[e]] = static_cast<expert_id>(e);
    const expert_map map(experts, topo.ranks(), slots, table);
    const auto r = random_routing(rng, 300, experts, k);
    std::vector<std::uint32_t> src(r.tokens());
    std::vector<std::vector<std::uint64_t>> usage(topo.nodes(), std::vector<std::uint64_t>(experts, 0));
    std::uint64_t remote_pairs = 0;
    placement::locality_first_selector sel(map, topo);
    for (std::size_t t = 0; t < r.tokens(); ++t) {
      src[t] = static_cast<std::uint32_t>(rng() % topo.ranks());
      for (std::size_t j = 0; j < k; ++j) {
        const auto e = static_cast<std::size_t>(r.view().expert(t, j));
        ++usage[topo.node_of(src[t])][e];
        remote_pairs += topo.node_of(static_cast<std::size_t>(sel.select(src[t], e).rank)) != topo.node_of(src[t]);
      }
    }
    const std::uint64_t bound = remote_pairs_lower_bound(usage, topo.gpus_per_node() * slots);
    BOOST_TEST(bound <= remote_pairs);
    layer_traffic h(topo.ranks());
    traffic_counter(topo, transport_kind::hierarchical).count_step(map, r.view(), {}, src, h);
    BOOST_TEST(inter_node_copies_lower_bound(bound, k, true, slots) <= static_cast<double>(h.inter_node_copies()));
  }
}
