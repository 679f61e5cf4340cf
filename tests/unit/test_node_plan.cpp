// The host index plan of the hierarchical device dispatch (transport/detail/node_plan.hpp), run for
// every rank of a simulated machine: rows are token identities and values moved by the plan's
// index lists through simulated rail and node exchanges, exactly as the device dispatcher moves
// them. Each rank must receive every copy routed to it once (token, expert, weight), and combine
// must return each token's weighted sum over its copies; the reference is computed from the
// routings and the host layouts' replica choices alone.
#define BOOST_TEST_MODULE node_plan
#include "../mpi/dispatch_cases.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <locus/transport/detail/node_plan.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <tuple>
#include <vector>

using namespace locus;
using namespace locus::transport;
namespace dd = locus::transport::detail::device_dispatch;

namespace {

// What member `q` receives in an exchange over group `g` where every rank s sends data[s], ordered
// by destination member with counts[s]: the senders' slices for q in member order. `from` gets the
// count from each member.
template <class U>
std::vector<U> receive(const dynamic_topology& topo, exchange_group g, std::size_t q,
                       const std::vector<std::vector<U>>& data, const std::vector<std::vector<std::size_t>>& counts,
                       std::vector<std::size_t>* from = nullptr) {
  const locus::transport::detail::exchange::group_map map{topo, q};
  const std::size_t me = map.self_member(g);
  std::vector<U> out;
  if (from) from->clear();
  for (std::size_t m = 0; m < map.size(g); ++m) {
    const std::size_t s = map.world_rank_of(g, m);
    BOOST_REQUIRE(counts[s].size() == map.size(g));
    std::size_t at = 0;
    for (std::size_t i = 0; i < me; ++i)
      at += counts[s][i];
    BOOST_REQUIRE(at + counts[s][me] <= data[s].size());
    out.insert(out.end(), data[s].begin() + static_cast<std::ptrdiff_t>(at),
               data[s].begin() + static_cast<std::ptrdiff_t>(at + counts[s][me]));
    if (from) from->push_back(counts[s][me]);
  }
  return out;
}

template <class U>
std::vector<U> pick(const std::vector<U>& v, const std::vector<std::int32_t>& index) {
  std::vector<U> out;
  for (std::int32_t i : index)
    out.push_back(v.at(static_cast<std::size_t>(i)));
  return out;
}

// An expert's output for a token: small integers, so every sum below is exact in double.
double output(std::int64_t id, expert_id e) { return static_cast<double>(id % 97 + 1) * (e + 3); }

void check_case(const locus_test::dispatch_case& c) {
  const auto& topo = c.topo;
  const std::size_t R = topo.ranks(), G = topo.gpus_per_node(), N = topo.nodes(), K = c.k;
  const auto id = [](std::size_t s, std::size_t t) { return static_cast<std::int64_t>(s * 1000000 + t); };
  std::vector<layout<>> layouts(R);
  std::vector<dd::layout_rows> lr(R);
  std::vector<dd::node_plan> plans(R);
  std::vector<std::vector<std::int64_t>> src(R);
  for (std::size_t s = 0; s < R; ++s) {
    layouts[s].assign(c.routings[s].view(), c.map, topo, s, layout_options{transport_kind::hierarchical, 1});
    const auto& l = layouts[s];
    lr[s] = {l.rank_offsets(), l.row_entry_offsets(), l.entry_target(), l.entry_slot(), l.entry_weight()};
    plans[s].plan_rail(G, N, s, lr[s]);
    for (std::size_t r = 0; r < l.rows(); ++r)
      src[s].push_back(id(s, static_cast<std::size_t>(l.row_token()[r])));
  }
  // Rail stage.
  std::vector<std::vector<std::int64_t>> send(R);
  std::vector<std::vector<std::int32_t>> row_entries(R);
  std::vector<std::vector<dd::node_entry>> entries(R);
  std::vector<std::vector<std::size_t>> counts(R), entry_counts(R), rail_from(R), node_from(R);
  for (std::size_t s = 0; s < R; ++s) {
    send[s] = pick(src[s], plans[s].rail_index);
    row_entries[s] = plans[s].rail_row_entries;
    entries[s] = plans[s].rail_entries;
    counts[s] = plans[s].rail_counts;
    entry_counts[s] = plans[s].rail_entry_counts;
  }
  for (std::size_t q = 0; q < R; ++q) {
    const auto rows = receive(topo, exchange_group::rail, q, send, counts, &rail_from[q]);
    const auto re = receive(topo, exchange_group::rail, q, row_entries, counts);
    const auto en = receive(topo, exchange_group::rail, q, entries, entry_counts);
    BOOST_REQUIRE(re.size() == rows.size());
    src[q].insert(src[q].end(), rows.begin(), rows.end());
    plans[q].plan_node(lr[q], re, en);
  }
  // Node stage.
  for (std::size_t s = 0; s < R; ++s) {
    send[s] = pick(src[s], plans[s].node_index);
    row_entries[s] = plans[s].node_row_entries;
    entries[s] = plans[s].node_entries;
    counts[s] = plans[s].node_counts;
    entry_counts[s] = plans[s].node_entry_counts;
  }
  std::vector<std::vector<std::int64_t>> received(R);
  for (std::size_t q = 0; q < R; ++q) {
    received[q] = receive(topo, exchange_group::node, q, send, counts, &node_from[q]);
    const auto re = receive(topo, exchange_group::node, q, row_entries, counts);
    const auto en = receive(topo, exchange_group::node, q, entries, entry_counts);
    plans[q].plan_receive(re, en);
    const auto self = pick(src[q], plans[q].self_index);
    received[q].insert(received[q].end(), self.begin(), self.end());
    BOOST_REQUIRE(plans[q].recv_row_entries.size() == received[q].size());
  }
  // Every copy arrives once at the rank of its replica, with its slot's expert and its weight.
  using copy = std::tuple<std::int64_t, expert_id, float>;
  std::vector<std::vector<copy>> expected(R), got(R);
  for (std::size_t s = 0; s < R; ++s)
    for (std::size_t t = 0; t < c.routings[s].tokens(); ++t)
      for (std::size_t j = 0; j < K; ++j) {
        const std::size_t cp = t * K + j;
        const auto d = static_cast<std::size_t>(layouts[s].copy_rank()[cp]);
        expected[d].emplace_back(id(s, t), c.routings[s].view().expert(t, j), c.routings[s].view().weight(t, j));
      }
  std::vector<std::vector<double>> back(R);
  for (std::size_t q = 0; q < R; ++q) {
    const auto& p = plans[q];
    std::size_t e = 0;
    for (std::size_t r = 0; r < received[q].size(); ++r) {
      double sum = 0;
      for (std::int32_t i = 0; i < p.recv_row_entries[r]; ++i, ++e) {
        const expert_id ex = c.map.expert_at(q, static_cast<std::size_t>(p.recv_slot[e]));
        got[q].emplace_back(received[q][r], ex, p.recv_weight[e]);
        sum += static_cast<double>(p.recv_weight[e]) * output(received[q][r], ex);
      }
      back[q].push_back(sum);
    }
    std::sort(expected[q].begin(), expected[q].end());
    std::sort(got[q].begin(), got[q].end());
    BOOST_TEST_CONTEXT("rank " << q) { BOOST_TEST((got[q] == expected[q])); }
  }
  // Combine: node stage back, forwarded sums, rail stage back, returned rows in layout order.
  std::vector<std::vector<double>> pool(R), node_back(R), rail_back(R);
  for (std::size_t q = 0; q < R; ++q)
    node_back[q].assign(back[q].begin(), back[q].end() - static_cast<std::ptrdiff_t>(plans[q].self_index.size()));
  for (std::size_t s = 0; s < R; ++s) {
    pool[s] = receive(topo, exchange_group::node, s, node_back, node_from);
    BOOST_REQUIRE(pool[s].size() == plans[s].node_index.size());
    pool[s].insert(pool[s].end(), back[s].end() - static_cast<std::ptrdiff_t>(plans[s].self_index.size()),
                   back[s].end());
    const auto& p = plans[s];
    for (std::size_t r = 0; r + 1 < p.forward_offsets.size(); ++r) {
      double sum = 0;
      for (auto i = p.forward_offsets[r]; i < p.forward_offsets[r + 1]; ++i) {
        const auto at = static_cast<std::size_t>(p.forward_position[static_cast<std::size_t>(i)]);
        sum += p.forward_weight.at(at) * pool[s].at(at);
      }
      rail_back[s].push_back(sum);
    }
  }
  for (std::size_t s = 0; s < R; ++s) {
    const auto returned = receive(topo, exchange_group::rail, s, rail_back, rail_from);
    BOOST_REQUIRE(returned.size() == plans[s].rail_index.size());
    pool[s].insert(pool[s].end(), returned.begin(), returned.end());
    const auto rows = pick(pool[s], plans[s].return_index);
    const auto& l = layouts[s];
    for (std::size_t t = 0; t < c.routings[s].tokens(); ++t) {
      double y = 0, want = 0;
      std::vector<std::int32_t> seen;
      for (std::size_t j = 0; j < K; ++j) {
        const std::int32_t row = l.copy_row()[t * K + j];
        if (std::find(seen.begin(), seen.end(), row) == seen.end()) y += rows.at(static_cast<std::size_t>(row));
        seen.push_back(row);
        want += static_cast<double>(c.routings[s].view().weight(t, j)) *
                output(id(s, t), c.routings[s].view().expert(t, j));
      }
      BOOST_TEST_CONTEXT("rank " << s << " token " << t) { BOOST_TEST(y == want); }
    }
  }
}

} // namespace

BOOST_AUTO_TEST_CASE(plan_moves_every_copy_once_and_returns_every_sum) {
  for (std::uint64_t seed = 1; seed <= 40; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{2, 2}, {3, 2}, {2, 4}, {4, 1}, {1, 4}, {1, 1}}) {
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus) {
        check_case(locus_test::make_case(seed, nodes, gpus));
      }
    }
}
