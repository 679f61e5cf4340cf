#define BOOST_TEST_MODULE placement
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <locus/placement/replica_selection.hpp>
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
} // namespace

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
