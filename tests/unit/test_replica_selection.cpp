#define BOOST_TEST_MODULE placement
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <limits>
#include <locus/cost/traffic.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/replica_selection.hpp>
#include <map>
#include <random>
#include <tuple>

using namespace locus;

namespace {
// Reference: spell the rule out over explicit candidate lists, counting each source's copies per
// replica, keyed by (source, rank, slot).
struct reference_selector {
  const expert_map& map;
  dynamic_topology topo;
  std::map<std::tuple<std::size_t, int, int>, unsigned> copies;

  slot_ref select(std::size_t src, std::size_t e) {
    std::vector<slot_ref> all(map.replicas(e).begin(), map.replicas(e).end());
    for (const slot_ref& s : all)
      if (static_cast<std::size_t>(s.rank) == src) {
        ++copies[{src, s.rank, s.slot}];
        return s;
      }
    std::vector<slot_ref> local;
    for (const slot_ref& s : all)
      if (topo.node_of(static_cast<std::size_t>(s.rank)) == topo.node_of(src)) local.push_back(s);
    const std::vector<slot_ref>& cand = local.empty() ? all : local;
    // Ties: the first in rank order counted from candidate src mod m.
    const std::size_t m = cand.size();
    const auto order = [&](const slot_ref& s) {
      const auto i = static_cast<std::size_t>(std::find(cand.begin(), cand.end(), s) - cand.begin());
      return (i + m - src % m) % m;
    };
    const slot_ref best = *std::min_element(cand.begin(), cand.end(), [&](const slot_ref& a, const slot_ref& b) {
      return std::tuple(copies[{src, a.rank, a.slot}], order(a)) < std::tuple(copies[{src, b.rank, b.slot}], order(b));
    });
    ++copies[{src, best.rank, best.slot}];
    return best;
  }
};
// A random map: every expert once, then replicas into random free slots (never two on one rank).
expert_map random_map(std::mt19937& rng, std::size_t ranks, std::size_t slots, std::size_t experts) {
  std::vector<expert_id> table(ranks * slots, empty_slot);
  std::vector<std::size_t> cells(table.size());
  for (std::size_t i = 0; i < cells.size(); ++i)
    cells[i] = i;
  std::shuffle(cells.begin(), cells.end(), rng);
  for (std::size_t e = 0; e < experts; ++e)
    table[cells[e]] = static_cast<expert_id>(e);
  for (std::size_t i = experts; i < cells.size(); ++i) {
    const auto e = static_cast<expert_id>(rng() % experts);
    const std::size_t r = cells[i] / slots;
    if (std::none_of(table.begin() + r * slots, table.begin() + (r + 1) * slots, [&](expert_id x) { return x == e; }))
      table[cells[i]] = e;
  }
  return expert_map(experts, ranks, slots, table);
}

// Tokens with k distinct experts each.
routing<top_k<>> random_routing(std::mt19937& rng, std::size_t tokens, std::size_t experts, std::size_t k) {
  routing<top_k<>> r(tokens, top_k<>(k));
  std::vector<expert_id> pool(experts);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t e = 0; e < experts; ++e)
      pool[e] = static_cast<expert_id>(e);
    for (std::size_t j = 0; j < k; ++j) {
      std::swap(pool[j], pool[j + rng() % (experts - j)]);
      r.view().expert(t, j) = pool[j];
    }
  }
  return r;
}

std::vector<std::uint8_t> random_hot(std::mt19937& rng, std::size_t ranks) {
  std::vector<std::uint8_t> hot(ranks);
  const bool graded = rng() % 2; // hot_rank_tracker's values (hot ranks numbered by load) or 0/1 flags
  for (auto& h : hot)
    h = rng() % 3 == 0 ? static_cast<std::uint8_t>(graded ? 1 + rng() % 3 : 1) : 0;
  return hot;
}
} // namespace

BOOST_AUTO_TEST_CASE(rule_names_round_trip) {
  for (const auto r : placement::all_replica_rules)
    BOOST_TEST((placement::parse_replica_rule(placement::to_string(r)) == r));
  BOOST_CHECK_THROW(placement::parse_replica_rule("nearest"), config_error);
}

BOOST_AUTO_TEST_CASE(every_rule_picks_a_replica_of_the_expert) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 40; ++trial) {
    const dynamic_topology topo(1 + rng() % 4, 1 + rng() % 4);
    const std::size_t ranks = topo.ranks(), slots = 2 + rng() % 3, experts = 1 + rng() % (ranks * slots);
    const expert_map map = random_map(rng, ranks, slots, experts);
    const auto hot = random_hot(rng, ranks);
    for (const auto rule : placement::all_replica_rules) {
      placement::replica_selector sel(map, topo, {rule, static_cast<std::uint64_t>(trial), hot});
      for (int c = 0; c < 300; ++c) {
        const std::size_t src = rng() % ranks, e = rng() % experts;
        const slot_ref s = sel.select(src, e);
        BOOST_REQUIRE_EQUAL(map.view().slot_expert[static_cast<std::size_t>(s.rank) * slots + s.slot],
                            static_cast<expert_id>(e));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(same_gpu_else_random_is_static_and_fair) {
  // 2 nodes x 4 GPUs; expert 0 on ranks 1, 4 and 6; expert 1 on rank 2 only.
  const dynamic_topology topo(2, 4);
  std::vector<expert_id> table(8 * 2, empty_slot);
  table[1 * 2] = 0;
  table[4 * 2] = 0;
  table[6 * 2 + 1] = 0;
  table[2 * 2] = 1;
  const expert_map map(2, 8, 2, table);
  for (std::uint64_t layer = 0; layer < 20; ++layer) {
    placement::replica_selector sel(map, topo, {placement::replica_rule::same_gpu_else_random, layer});
    std::map<int, int> served; // replica rank -> sources without a local replica sent there
    for (std::size_t src = 0; src < 8; ++src) {
      const int first = sel.select(src, 0).rank;
      for (int again = 0; again < 5; ++again)
        BOOST_REQUIRE_EQUAL(sel.select(src, 0).rank, first); // one fixed replica per source and layer
      if (src == 1 || src == 4 || src == 6)
        BOOST_TEST(first == static_cast<int>(src)); // own GPU
      else
        ++served[first];
      BOOST_TEST(sel.select(src, 1).rank == 2);
    }
    // Five sources without a local replica over three replicas: 2, 2, 1 in some order.
    BOOST_REQUIRE_EQUAL(served.size(), 3u);
    for (const auto& [rank, n] : served)
      BOOST_TEST((n == 1 || n == 2));
  }
}

BOOST_AUTO_TEST_CASE(random_is_even_and_deterministic) {
  // One node x 4 GPUs, 16 experts; expert 3 on ranks 0, 1 and 3. Source 0 holds one of them, but
  // random ignores where the token is.
  const dynamic_topology topo(1, 4);
  std::vector<expert_id> table(4 * 5, empty_slot);
  for (std::size_t e = 0; e < 16; ++e)
    table[e % 4 * 5 + e / 4] = static_cast<expert_id>(e);
  table[0 * 5 + 4] = 3;
  table[1 * 5 + 4] = 3;
  const expert_map map(16, 4, 5, table);
  std::mt19937 rng(3);
  const auto r = random_routing(rng, 3000, 16, 4);
  placement::replica_selector a(map, topo, {placement::replica_rule::random});
  placement::replica_selector b(map, topo, {placement::replica_rule::random});
  std::map<int, double> count;
  double n = 0;
  for (std::size_t t = 0; t < r.tokens(); ++t)
    for (std::size_t j = 0; j < 4; ++j) {
      const auto e = static_cast<std::size_t>(r.view().expert(t, j));
      const slot_ref x = a.select(0, e), y = b.select(0, e);
      BOOST_REQUIRE(x == y);
      if (e == 3) ++count[x.rank], ++n;
    }
  BOOST_REQUIRE_EQUAL(count.size(), 3u);
  double chi2 = 0;
  for (const auto& [rank, c] : count)
    chi2 += (c - n / 3) * (c - n / 3) / (n / 3);
  BOOST_TEST(chi2 < 13.8); // 2 degrees of freedom, p = 0.001
}

BOOST_AUTO_TEST_CASE(locality_bounded_avoids_hot_ranks) {
  // 2 nodes x 2 GPUs. Expert 0 on ranks 0, 1 and 3.
  const dynamic_topology topo(2, 2);
  const expert_map map(1, 4, 1, {0, 0, empty_slot, 0});
  using placement::replica_rule;
  const std::vector<std::uint8_t> none(4, 0), r0(4, 0), r01 = {1, 1, 0, 0}, all(4, 1);
  auto r0hot = r0;
  r0hot[0] = 1;
  const auto rank = [&](const std::vector<std::uint8_t>& hot, std::size_t src) {
    placement::replica_selector sel(map, topo, {replica_rule::locality_bounded, 0, hot});
    return sel.select(src, 0).rank;
  };
  BOOST_TEST(rank(none, 0) == 0);  // nothing hot: locality first
  BOOST_TEST(rank(r0hot, 0) == 1); // own GPU hot: the node's other replica
  BOOST_TEST(rank(r01, 0) == 3);   // the node's replicas hot: the remote one
  BOOST_TEST(rank(all, 0) == 0);   // all hot: locality first again
  BOOST_TEST(rank(r0hot, 2) == 3); // a source on node 1 keeps its node's replica
  // All hot, numbered by load (1 the least loaded): the least hot replicas, locality first among them.
  const std::vector<std::uint8_t> r3least = {3, 2, 0, 1}, r01least = {1, 1, 0, 2}, r13least = {2, 1, 0, 1};
  BOOST_TEST(rank(r3least, 0) == 3);  // the remote replica is the least loaded
  BOOST_TEST(rank(r01least, 0) == 0); // own GPU among the least loaded
  BOOST_TEST(rank(r01least, 2) == 0); // a source on node 1: the least loaded, across the network
  BOOST_TEST(rank(r13least, 0) == 1); // the node's least loaded one
  BOOST_TEST(rank(r13least, 2) == 3); // node 1's own
  BOOST_CHECK_THROW(placement::replica_selector(map, topo, {replica_rule::locality_bounded, 0, r0hot}).select(0, 1),
                    invalid_input_error);
  const std::vector<std::uint8_t> short_hot(3, 0);
  BOOST_CHECK_THROW(placement::replica_selector(map, topo, {replica_rule::locality_bounded, 0, short_hot}),
                    config_error);
}

BOOST_AUTO_TEST_CASE(hot_rank_tracker_bounds) {
  placement::hot_rank_tracker tr(4, 0.10);
  const std::vector<std::uint64_t> step = {10, 11, 9, 10};
  tr.observe(std::span<const std::uint64_t>(step));
  BOOST_TEST((std::vector<std::uint8_t>(tr.hot().begin(), tr.hot().end()) == std::vector<std::uint8_t>{0, 0, 0, 0}));
  const std::vector<std::uint64_t> spike = {30, 10, 10, 10};
  tr.observe(std::span<const std::uint64_t>(spike)); // totals 40, 21, 19, 20: mean 25, bound 27.5
  BOOST_TEST((std::vector<std::uint8_t>(tr.hot().begin(), tr.hot().end()) == std::vector<std::uint8_t>{1, 0, 0, 0}));
  const std::vector<std::uint64_t> second = {0, 30, 0, 0};
  tr.observe(std::span<const std::uint64_t>(second)); // 40, 51, 19, 20: bound 35.75, hot ranks by load
  BOOST_TEST((std::vector<std::uint8_t>(tr.hot().begin(), tr.hot().end()) == std::vector<std::uint8_t>{1, 2, 0, 0}));
  BOOST_CHECK_THROW(placement::hot_rank_tracker(4, -0.1), config_error);
  BOOST_CHECK_THROW(placement::hot_rank_tracker(4, std::numeric_limits<double>::infinity()), config_error);
  BOOST_CHECK_THROW(placement::hot_rank_tracker(4, std::nan("")), config_error);
  // Any finite slack is taken (it said "expected a finite number >= 0" to 1e9): a bound past the
  // largest double makes no rank hot.
  placement::hot_rank_tracker loose(4, 1e308);
  loose.observe(std::span<const std::uint64_t>(spike));
  BOOST_TEST(
      (std::vector<std::uint8_t>(loose.hot().begin(), loose.hot().end()) == std::vector<std::uint8_t>{0, 0, 0, 0}));
  BOOST_CHECK_THROW(tr.observe(std::span<const std::uint64_t>(step.data(), 3)), config_error);
  // The rank count is checked before the tables are sized from it (2^62 was a length_error).
  BOOST_CHECK_THROW(placement::hot_rank_tracker(std::size_t{1} << 62, 0.1), config_error);
  BOOST_CHECK_THROW(placement::hot_rank_tracker(0, 0.1), config_error);
}

// The traffic model and the host layout choose the same replica for every copy under every rule
// (the layout in several chunks, so its prefix counts are exercised), and so count the same rows.
BOOST_AUTO_TEST_CASE(traffic_model_equals_layout_under_every_rule) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 25; ++trial) {
    const dynamic_topology topo(1 + rng() % 3, 1 + rng() % 3);
    const std::size_t ranks = topo.ranks(), slots = 2 + rng() % 3;
    const std::size_t experts = 1 + rng() % (ranks * slots);
    const expert_map map = random_map(rng, ranks, slots, experts);
    const std::size_t k = 1 + rng() % std::min<std::size_t>(3, experts), tokens = 40 + rng() % 60;
    const auto r = random_routing(rng, tokens * ranks, experts, k);
    const auto hot = random_hot(rng, ranks);
    for (const auto kind : {transport_kind::flat, transport_kind::hierarchical})
      for (const auto rule : placement::all_replica_rules) {
        const placement::replica_policy policy{rule, static_cast<std::uint64_t>(trial), hot};
        // The traffic model sees each source's tokens as its batch, in order.
        std::vector<std::uint32_t> sources(r.tokens());
        for (std::size_t t = 0; t < r.tokens(); ++t)
          sources[t] = static_cast<std::uint32_t>(t / tokens);
        cost::traffic_counter<dynamic_topology> counter(topo, kind);
        cost::layer_traffic model(ranks);
        counter.count_step(map, r.view(), {}, sources, model, policy);
        std::vector<std::uint64_t> rows(ranks, 0);
        for (std::size_t src = 0; src < ranks; ++src) {
          const routing_view<top_k<>> part(r.ids().data() + src * tokens * k, nullptr, tokens, top_k<>(k));
          transport::layout<top_k<>> l;
          transport::layout_options opt;
          opt.kind = kind;
          opt.threads = 3;
          opt.grain = 7;
          opt.replicas = policy;
          l.assign(part, map, topo, src, opt);
          placement::replica_selector sel(map, topo, policy);
          std::vector<std::size_t> want(k);
          for (std::size_t t = 0; t < tokens; ++t) {
            sel.select_token(src, part.ids() + t * k, k, kind == transport_kind::hierarchical, want.data());
            for (std::size_t j = 0; j < k; ++j) {
              BOOST_REQUIRE_EQUAL(l.copy_replica()[t * k + j], static_cast<std::int32_t>(want[j]));
              ++rows[static_cast<std::size_t>(l.copy_rank()[t * k + j])];
            }
          }
        }
        BOOST_TEST(rows == model.expert_rows, boost::test_tools::per_element());
      }
  }
}

BOOST_AUTO_TEST_CASE(matches_reference_on_random_maps) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    const dynamic_topology topo(1 + rng() % 4, 1 + rng() % 4);
    const std::size_t ranks = topo.ranks(), slots = 2 + rng() % 3, experts = 1 + rng() % (ranks * slots);
    // Every expert once, then replicas into random free slots (never two on one rank).
    std::vector<expert_id> table(ranks * slots, empty_slot);
    std::vector<std::size_t> cells(table.size());
    for (std::size_t i = 0; i < cells.size(); ++i)
      cells[i] = i;
    std::shuffle(cells.begin(), cells.end(), rng);
    for (std::size_t e = 0; e < experts; ++e)
      table[cells[e]] = static_cast<expert_id>(e);
    for (std::size_t i = experts; i < cells.size(); ++i) {
      const auto e = static_cast<expert_id>(rng() % experts);
      const std::size_t r = cells[i] / slots;
      if (std::none_of(table.begin() + r * slots, table.begin() + (r + 1) * slots, [&](expert_id x) { return x == e; }))
        table[cells[i]] = e;
    }
    const expert_map map(experts, ranks, slots, table);
    placement::locality_first_selector sel(map, topo);
    reference_selector ref{map, topo, {}};
    for (int step = 0; step < 3; ++step) {
      sel.reset();
      ref.copies.clear();
      for (int c = 0; c < 500; ++c) {
        const std::size_t src = rng() % ranks, e = rng() % experts;
        const slot_ref got = sel.select(src, e), want = ref.select(src, e);
        BOOST_REQUIRE(got == want);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(hand_built_preferences) {
  // 2 nodes x 2 GPUs. Expert 0 on ranks 0 and 3; expert 1 on ranks 2 and 3.
  const dynamic_topology topo(2, 2);
  const expert_map map(2, 4, 2, {0, empty_slot, empty_slot, empty_slot, 1, empty_slot, 0, 1});
  placement::locality_first_selector sel(map, topo);
  BOOST_TEST(sel.select(0, 0).rank == 0); // same GPU
  BOOST_TEST(sel.select(1, 0).rank == 0); // same node
  BOOST_TEST(sel.select(2, 0).rank == 3); // same node (rank 3 is on node 1)
  BOOST_TEST(sel.select(0, 1).rank == 2); // remote: both replicas unused, source 0 starts at the first
  BOOST_TEST(sel.select(0, 1).rank == 3); // rank 2 now has one copy
  BOOST_TEST(sel.select(1, 1).rank == 3); // source 1 balances its own copies, starting at the second
  BOOST_TEST(sel.select(1, 1).rank == 2);
  BOOST_TEST(sel.select(0, 1).rank == 2); // source 0's third copy: round robin
  sel.reset();
  BOOST_TEST(sel.select(0, 1).rank == 2); // a new step starts over
  BOOST_CHECK_THROW(sel.select(4, 0), invalid_input_error);
  BOOST_CHECK_THROW(sel.select(0, 2), invalid_input_error);
  BOOST_CHECK_THROW(placement::locality_first_selector(map, dynamic_topology(1, 2)), config_error);
}

// A copy joins a row its token already sends (the locality rules): spelled out on a small map.
BOOST_AUTO_TEST_CASE(copies_join_rows_their_token_already_sends) {
  // 3 nodes × 2 GPUs (ranks 0-1, 2-3, 4-5), 3 slots per rank. Expert 0 on rank 2, 1 on ranks 3
  // and 4, 2 on rank 3, 3 on rank 0, 4 on ranks 1 and 3, 5 on ranks 2 and 4; rank 5 holds none.
  const dynamic_topology topo(3, 2);
  const expert_id x = empty_slot;
  const expert_map map(6, 6, 3, {3, x, x, 4, x, x, 0, 5, x, 2, 1, 4, 1, 5, x, x, x, x});
  const auto token = [&](placement::replica_selector<dynamic_topology>& sel, transport_kind kind,
                         std::vector<expert_id> ids) {
    std::vector<std::size_t> idx(ids.size());
    sel.select_token(0, ids.data(), ids.size(), kind == transport_kind::hierarchical, idx.data());
    std::vector<int> ranks;
    for (const std::size_t i : idx)
      ranks.push_back(map.view().replicas[i].rank);
    return ranks;
  };
  using v = std::vector<int>;
  placement::replica_selector sel(map, topo);
  // From rank 0 (node 0), flat: expert 1's replicas are both remote (ranks 3 and 4).
  BOOST_TEST(token(sel, transport_kind::flat, {2, 1}) == (v{3, 3}));       // joins the row to rank 3
  BOOST_TEST(token(sel, transport_kind::flat, {3, 1}) == (v{0, 3}));       // first balanced copy: rank 3
  BOOST_TEST(token(sel, transport_kind::flat, {1, 2}) == (v{3, 3}));       // joins (not counted)
  BOOST_TEST(token(sel, transport_kind::flat, {3, 1}) == (v{0, 4}));       // second balanced copy: rank 4
  BOOST_TEST(token(sel, transport_kind::flat, {0, 1}) == (v{2, 3}));       // rank 2 holds no copy of 1: turn
  BOOST_TEST(token(sel, transport_kind::flat, {2, 4}) == (v{3, 1}));       // a node-local replica wins
  BOOST_TEST(token(sel, transport_kind::flat, {0, 5, 1}) == (v{2, 2, 4})); // joins a fixed copy only
  sel.reset();
  // Hierarchical: failing a rank, a node the token already reaches (rank 2's node holds rank 3).
  BOOST_TEST(token(sel, transport_kind::hierarchical, {0, 1}) == (v{2, 3}));
  BOOST_TEST(token(sel, transport_kind::hierarchical, {0, 1}) == (v{2, 3}));
  BOOST_TEST(token(sel, transport_kind::hierarchical, {3, 1}) == (v{0, 3})); // own node: no join, turn
  sel.reset();
  BOOST_TEST(token(sel, transport_kind::flat, {0, 1}) == (v{2, 3}));
  BOOST_TEST(token(sel, transport_kind::flat, {0, 1}) == (v{2, 4})); // flat: no node join, round robin
  // locality_bounded never joins a hot rank's replica: rank 3 hot, expert 1 goes to rank 4.
  const std::vector<std::uint8_t> hot = {0, 0, 0, 1, 0, 0};
  placement::replica_selector bounded(map, topo, {placement::replica_rule::locality_bounded, 0, hot});
  BOOST_TEST(token(bounded, transport_kind::flat, {2, 1}) == (v{3, 4}));
  // The engines' rules do not join: random takes position mod replicas (copy 1 of the batch: rank 4).
  placement::replica_selector random(map, topo, {placement::replica_rule::random, 0, {}});
  BOOST_TEST(token(random, transport_kind::flat, {2, 1}) == (v{3, 4}));
  // The layouts choose the same, on host and (by the shared per-token code) on the device.
  for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    const routing<top_k<>> r({2, 1, 3, 1, 1, 2, 3, 1, 0, 1, 0, 1}, std::vector<float>(12, 1.0f), top_k<>(2));
    transport::layout<top_k<>> l;
    l.assign(r.view(), map, topo, 0, transport::layout_options{kind, 2, 1});
    const std::vector<int> flat_ranks{3, 3, 0, 3, 3, 3, 0, 4, 2, 3, 2, 4};
    const std::vector<int> node_ranks{3, 3, 0, 3, 3, 3, 0, 4, 2, 3, 2, 3};
    const std::vector<int> got(l.copy_rank().begin(), l.copy_rank().end());
    BOOST_TEST(got == (kind == transport_kind::flat ? flat_ranks : node_ranks), boost::test_tools::per_element());
  }
}
