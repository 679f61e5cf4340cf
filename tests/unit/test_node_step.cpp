// The hierarchical device step (transport/detail/node_step.hpp) run on the host for every rank of
// a simulated machine: the count round's messages and sizes, then the step's own sequence
// (detail/node_step_sequence.hpp, which device_dispatcher runs with CUDA launches) with a host
// engine: the stage bodies through stage::run_grid on several grid shapes, exchanges over the
// one-GPU transport's protocol with host memory (as the CUDA tests exchange), ranks as threads,
// rows carrying token identities. Each rank must
// receive every copy routed to it once (token, expert, weight), with the segments the count round
// announced, and combine must return each token's weighted sum over its copies; the reference is
// computed from the routings and the host layouts' replica choices alone. Doctored rounds and
// fan-outs must be refused where the dispatcher relies on their checks.
#define BOOST_TEST_MODULE node_step
#include "../mpi/dispatch_cases.hpp"
#include "../support/host_step_engine.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <limits>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/detail/node_step.hpp>
#include <locus/transport/detail/node_step_sequence.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/local.hpp>
#include <set>
#include <span>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

using namespace locus;
using namespace locus::transport;
namespace ns = locus::transport::detail::node_step;
namespace st = locus::transport::detail::stage;
namespace hs = locus_test::host_step;

namespace {

// A body run over a grid of `shape` (blocks × threads): the host executor of its kernel.
struct grid_shape {
  std::size_t blocks, threads;
};
template <class Body>
void run(grid_shape g, Body&& body) {
  st::run_grid(g.blocks, g.threads, body);
}

// Tokens reaching each rank, counted independently of the layout (distinct ranks of its copies).
std::vector<std::int32_t> reach_of(const layout<>& l, std::size_t ranks, std::size_t k) {
  std::vector<std::int32_t> reach(ranks, 0);
  for (std::size_t t = 0; t < l.tokens(); ++t) {
    std::set<std::int32_t> seen(l.copy_rank().begin() + static_cast<std::ptrdiff_t>(t * k),
                                l.copy_rank().begin() + static_cast<std::ptrdiff_t>(t * k + k));
    for (std::int32_t r : seen)
      ++reach[static_cast<std::size_t>(r)];
  }
  return reach;
}

// Every rank runs dispatch_sequence and combine_sequence (the device dispatcher's own order) with
// the host engine (tests/support/host_step_engine.hpp), then the checks every device step passes.
void check_case(const locus_test::dispatch_case& c, grid_shape grid) {
  const auto& topo = c.topo;
  const std::size_t R = topo.ranks(), G = topo.gpus_per_node(), K = c.k, S = c.map.slots_per_rank();
  const std::size_t W = ns::tail_width(S, G);
  std::vector<layout<>> layouts(R);
  std::vector<std::vector<std::int32_t>> reach(R);
  std::vector<ns::step_counts> sc(R);
  hs::round_state round;
  round.rows.resize(R);
  round.entries.resize(R);
  round.tail.resize(R);
  const auto counts_of = [&](std::size_t s) {
    const auto& l = layouts[s];
    return ns::layout_counts{l.rank_offsets(), l.rank_entry_offsets(), l.slot_counts(), reach[s]};
  };
  for (std::size_t s = 0; s < R; ++s) {
    layouts[s].assign(c.routings[s].view(), c.map, topo, s, layout_options{transport_kind::hierarchical, 1});
    const auto& l = layouts[s];
    reach[s] = reach_of(l, R, K);
    // The layout kernel's rule (first copy of a token on its rank) counts the same.
    std::vector<std::int32_t> by_rule(R, 0);
    for (std::size_t t = 0; t < l.tokens(); ++t)
      for (std::size_t j = 0; j < K; ++j)
        if (locus::transport::detail::layout::first_copy_on_rank(l.copy_rank().data() + t * K, j))
          ++by_rule[static_cast<std::size_t>(l.copy_rank()[t * K + j])];
    BOOST_TEST(by_rule == reach[s]);
    ns::round_message(counts_of(s), G, s, S, round.rows[s], round.entries[s], round.tail[s]);
  }
  std::vector<std::vector<std::int32_t>> slot_offsets(R);
  for (std::size_t q = 0; q < R; ++q) {
    const std::string why = ns::counts_from(counts_of(q), hs::delivered(round, q, W), G, q, S, sc[q]);
    BOOST_TEST_REQUIRE(why.empty(), "rank " << q << ": " << why);
    slot_offsets[q] = sc[q].slot_offsets;
  }
  const auto results =
      hs::run_ranks(topo, transport_kind::hierarchical, layouts, grid.blocks, grid.threads,
                    [&](std::size_t q, hs::engine& e, hs::rank_result& out) {
                      const auto& l = layouts[q];
                      ns::step_buffers<hs::engine, double> b;
                      const ns::layout_view lay{counts_of(q),
                                                l.rows(),
                                                l.row_entry_offsets().data(),
                                                l.entry_target().data(),
                                                l.entry_slot().data(),
                                                l.entry_weight().data()};
                      const std::size_t nin = sc[q].node_in, nin_entries = sc[q].node_in_entries;
                      const double* rows = ns::dispatch_sequence(e, b, lay, sc[q], G, q, 1, [&] {
                        out.row_entries.assign(b.recv_row_entries.data(), b.recv_row_entries.data() + nin);
                        out.slots.assign(b.recv_slots.data(), b.recv_slots.data() + nin_entries);
                        out.weights.assign(b.recv_weights.data(), b.recv_weights.data() + nin_entries);
                      });
                      out.received.assign(rows, rows + nin);
                      const std::vector<double> back = hs::expert_sums(out, c.map, q);
                      const double* ret = ns::combine_sequence(e, b, lay, sc[q], G, q, 1, back.data());
                      out.returned.assign(ret, ret + l.rows());
                      out.flag = b.flag.data()[0];
                    });
  hs::check_step(c, layouts, results, slot_offsets);
}

// The round of one case, for the refusal tests: every rank's layout counts and messages.
struct case_round {
  std::vector<layout<>> layouts;
  std::vector<std::vector<std::int32_t>> reach;
  hs::round_state round;
  ns::layout_counts counts(std::size_t s) const {
    return {layouts[s].rank_offsets(), layouts[s].rank_entry_offsets(), layouts[s].slot_counts(), reach[s]};
  }
};
case_round make_round(const locus_test::dispatch_case& c) {
  const std::size_t R = c.topo.ranks(), G = c.topo.gpus_per_node(), S = c.map.slots_per_rank();
  case_round out;
  out.layouts.resize(R);
  out.reach.resize(R);
  out.round.rows.resize(R);
  out.round.entries.resize(R);
  out.round.tail.resize(R);
  for (std::size_t s = 0; s < R; ++s) {
    out.layouts[s].assign(c.routings[s].view(), c.map, c.topo, s, layout_options{transport_kind::hierarchical, 1});
    out.reach[s] = reach_of(out.layouts[s], R, c.k);
    ns::round_message(out.counts(s), G, s, S, out.round.rows[s], out.round.entries[s], out.round.tail[s]);
  }
  return out;
}

} // namespace

BOOST_AUTO_TEST_CASE(step_moves_every_copy_once_and_returns_every_sum) {
  const grid_shape grids[] = {{1, 1}, {2, 3}, {3, 64}};
  std::size_t g = 0;
  for (std::uint64_t seed = 1; seed <= 40; ++seed)
    for (auto [nodes, gpus] :
         {std::pair<std::size_t, std::size_t>{2, 2}, {3, 2}, {2, 4}, {4, 1}, {1, 4}, {1, 1}, {3, 3}}) {
      const grid_shape grid = grids[g++ % 3];
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", grid " << grid.blocks << " x "
                                 << grid.threads) {
        check_case(locus_test::make_case(seed, nodes, gpus), grid);
      }
    }
}

BOOST_AUTO_TEST_CASE(member_of_finds_the_range_past_empty_members) {
  const std::vector<std::int32_t> at{0, 0, 5, 5, 9};
  const std::vector<std::size_t> want{1, 1, 1, 1, 1, 3, 3, 3, 3};
  for (std::int32_t p = 0; p < 9; ++p)
    BOOST_TEST(ns::member_of(at.data(), 4, p) == want[static_cast<std::size_t>(p)]);
  const std::vector<std::int32_t> one{0, 3};
  BOOST_TEST(ns::member_of(one.data(), 1, 2) == 0u);
}

// A refusal names the sender and leaves no segments; the sizes a receiver refuses still run the
// step's exchanges (those it sends are its own layout's, and its self-exchange stays consistent).
BOOST_AUTO_TEST_CASE(doctored_rounds_are_refused) {
  std::size_t own = 0, rail = 0, rail_self = 0, stranger = 0, width = 0, empty = 0;
  for (std::uint64_t seed = 1; seed <= 30; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 2);
    const std::size_t R = c.topo.ranks(), G = 2, S = c.map.slots_per_rank(), W = ns::tail_width(S, G);
    const auto cr = make_round(c);
    for (std::size_t q = 0; q < R; ++q) {
      ns::step_counts good, bad;
      BOOST_TEST_REQUIRE(ns::counts_from(cr.counts(q), hs::delivered(cr.round, q, W), G, q, S, good).empty());
      BOOST_TEST_CONTEXT("seed " << seed << ", rank " << q) {
        // A rank of its node whose first-hand rows disagree with its tail.
        const std::size_t peer = q ^ 1, rail_peer = (q + G) % R, stranger_rank = (q + G) % R ^ 1;
        auto d = hs::delivered(cr.round, q, W);
        ++d.rows[peer];
        std::string why = ns::counts_from(cr.counts(q), d, G, q, S, bad);
        BOOST_TEST(why.find("by rank " + std::to_string(peer) + " of its node") != std::string::npos, why);
        BOOST_TEST((bad.slot_offsets == std::vector<std::int32_t>(S + 1, 0)));
        BOOST_TEST((bad.node_send == good.node_send && bad.rail_send == good.rail_send));
        BOOST_TEST(bad.node_recv[q % G] == bad.node_send[q % G]);
        BOOST_TEST(bad.node_recv_entries[q % G] == bad.node_send_entries[q % G]);
        BOOST_TEST((bad.sized && bad.indexable));
        ++own;
        // A rail peer announcing entries its forwards do not add up to.
        d = hs::delivered(cr.round, q, W);
        ++d.entries[rail_peer];
        why = ns::counts_from(cr.counts(q), d, G, q, S, bad);
        BOOST_TEST(why.find("by rank " + std::to_string(rail_peer) + ", which forwards") != std::string::npos, why);
        ++rail;
        // A rail peer whose reach of this rank differs from what it says this rank forwards to
        // itself: this rank's self-exchange would be sized two ways.
        d = hs::delivered(cr.round, q, W);
        ++d.tail[rail_peer * W + S]; // its reach of q
        why = ns::counts_from(cr.counts(q), d, G, q, S, bad);
        BOOST_TEST(why.find("was told by rank " + std::to_string(rail_peer)) != std::string::npos, why);
        BOOST_TEST(bad.node_recv[q % G] == bad.node_send[q % G]);
        std::size_t in = 0;
        for (std::size_t g = 0; g < G; ++g)
          in += bad.node_recv[g];
        BOOST_TEST(bad.node_in == in);
        ++rail_self;
        // A rank of another node, not its rail peer, sending first-hand.
        d = hs::delivered(cr.round, q, W);
        ++d.rows[stranger_rank];
        why = ns::counts_from(cr.counts(q), d, G, q, S, bad);
        BOOST_TEST(why.find("sends it none first-hand") != std::string::npos, why);
        ++stranger;
        // A tail of another width.
        d = hs::delivered(cr.round, q, W);
        d.tail_width = S;
        why = ns::counts_from(cr.counts(q), d, G, q, S, bad);
        BOOST_TEST(why.find("needs " + std::to_string(W)) != std::string::npos, why);
        BOOST_TEST(!bad.sized);
        ++width;
      }
    }
    // Entries for a slot that holds no expert (the dispatcher's refusal, after counts_from).
    for (std::size_t q = 0; q < R; ++q) {
      ns::step_counts sc;
      BOOST_TEST_REQUIRE(ns::counts_from(cr.counts(q), hs::delivered(cr.round, q, W), G, q, S, sc).empty());
      std::vector<expert_id> slot_expert;
      for (std::size_t s = 0; s < S; ++s)
        slot_expert.push_back(c.map.expert_at(q, s));
      BOOST_TEST(locus::transport::detail::exchange::entries_for_empty_slot(sc.slot_offsets, slot_expert).empty());
      for (std::size_t s = 0; s < S; ++s)
        if (sc.slot_offsets[s + 1] > sc.slot_offsets[s]) {
          auto doctored = slot_expert;
          doctored[s] = empty_slot;
          const std::string why = locus::transport::detail::exchange::entries_for_empty_slot(sc.slot_offsets, doctored);
          BOOST_TEST(why.find("local slot " + std::to_string(s) + ", which holds no expert") != std::string::npos, why);
          ++empty;
          break;
        }
    }
  }
  BOOST_TEST(own > 0u);
  BOOST_TEST(rail > 0u);
  BOOST_TEST(rail_self > 0u);
  BOOST_TEST(stranger > 0u);
  BOOST_TEST(width > 0u);
  BOOST_TEST(empty > 0u);
}

// A round past 32-bit offsets (a rail peer announcing 2^31 more entries for this rank's slot 0) is
// refused with no tables and no fan-out (the rail rows × GPUs of its scratch and scans are not
// sized from it), while the exchanges keep the sizes its peers use; the next, good, round on the
// same counts is sized as if the refused one never came.
BOOST_AUTO_TEST_CASE(a_round_past_32_bits_fans_out_nothing) {
  std::size_t seen = 0;
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 2);
    const std::size_t R = c.topo.ranks(), G = 2, S = c.map.slots_per_rank(), W = ns::tail_width(S, G);
    const auto cr = make_round(c);
    for (std::size_t q = 0; q < R; ++q) {
      BOOST_TEST_CONTEXT("seed " << seed << ", rank " << q) {
        ns::step_counts fresh, sc;
        BOOST_TEST_REQUIRE(ns::counts_from(cr.counts(q), hs::delivered(cr.round, q, W), G, q, S, fresh).empty());
        BOOST_TEST(ns::fanout_rows(fresh) == fresh.rail_in);
        auto d = hs::delivered(cr.round, q, W);
        d.tail[((q + G) % R) * W] += 0x80000000u;
        const std::string why = ns::counts_from(cr.counts(q), d, G, q, S, sc);
        BOOST_TEST(!why.empty());
        BOOST_TEST(!sc.indexable);
        BOOST_TEST(ns::fanout_rows(sc) == 0u);
        BOOST_TEST((sc.node_send == fresh.node_send && sc.rail_send == fresh.rail_send));
        BOOST_TEST((sc.rail_recv == fresh.rail_recv && sc.node_recv == fresh.node_recv));
        BOOST_TEST(ns::counts_from(cr.counts(q), hs::delivered(cr.round, q, W), G, q, S, sc).empty());
        BOOST_TEST(sc.indexable);
        BOOST_TEST((sc.tables == fresh.tables && sc.slot_offsets == fresh.slot_offsets));
        BOOST_TEST(ns::fanout_rows(sc) == fresh.rail_in);
        seen += fresh.rail_in > 0;
      }
    }
  }
  BOOST_TEST(seen > 0u);
}

// A fan-out that differs from what the count round announced (a rail peer's tail that lied) is
// flagged before anything is placed: the forwarded node rows then go out with no entries (which
// every receiver's check refuses), their entries as slot -1, and the rail rows return zeros.
BOOST_AUTO_TEST_CASE(fanout_against_other_announced_forwards_is_flagged) {
  std::size_t seen = 0;
  for (std::uint64_t seed = 1; seed <= 40 && seen < 5; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 2);
    const std::size_t R = c.topo.ranks(), G = 2, S = c.map.slots_per_rank(), W = ns::tail_width(S, G);
    auto cr = make_round(c);
    for (std::size_t q = 0; q < R; ++q) {
      // Rail peer p of q moves, in its tail, one forwarded row from one rank of q's node to the
      // other: every sum the round can check still holds (on a transport the other rank's node
      // stage would then be sized differently by q and by itself; here only q's bodies run).
      const std::size_t p = (q + G) % R;
      const auto fwd_at = [&](std::size_t t) { return q * W + S + 1 + 2 * t; };
      const std::uint32_t rows_p = static_cast<std::uint32_t>(cr.round.rows[p][q]);
      const std::size_t a = cr.round.tail[p][fwd_at(0)] > 0 ? 0 : 1, b = 1 - a;
      if (cr.round.tail[p][fwd_at(a)] == 0 || cr.round.tail[p][fwd_at(b)] >= rows_p) continue;
      auto round = cr.round;
      --round.tail[p][fwd_at(a)];
      ++round.tail[p][fwd_at(b)];
      // ... and its reach of q with it, as an honest tail would say it (the round checks that).
      if (a == q % G) --round.tail[p][q * W + S];
      if (b == q % G) ++round.tail[p][q * W + S];
      ns::step_counts sc;
      const std::string why = ns::counts_from(cr.counts(q), hs::delivered(round, q, W), G, q, S, sc);
      BOOST_TEST(why.empty(), why); // the round alone cannot tell
      // q's fan-out of p's actual rail rows.
      const auto& lp = cr.layouts[p];
      const std::size_t node = q / G, begin = static_cast<std::size_t>(lp.rank_offsets()[q]),
                        end = static_cast<std::size_t>(lp.rank_offsets()[q + 1]);
      BOOST_TEST_REQUIRE(node != p / G);
      const std::size_t rin = end - begin;
      std::vector<std::int32_t> reo(rin + 1, 0), target_of, slot, count(G * rin), present(G * rin), row_at(G * rin + 1),
          entry_at(G * rin + 1);
      std::vector<float> weight;
      for (std::size_t r = begin; r < end; ++r) {
        const auto e0 = static_cast<std::size_t>(lp.row_entry_offsets()[r]),
                   e1 = static_cast<std::size_t>(lp.row_entry_offsets()[r + 1]);
        for (std::size_t e = e0; e < e1; ++e) {
          target_of.push_back(lp.entry_target()[e]);
          slot.push_back(lp.entry_slot()[e]);
          weight.push_back(lp.entry_weight()[e]);
        }
        reo[r - begin + 1] = static_cast<std::int32_t>(target_of.size());
      }
      std::int32_t flag = 0;
      const grid_shape grid{2, 3};
      run(grid, [&](st::grid_index g) {
        ns::fanout_count(g, reo.data(), target_of.data(), rin, G, &flag, count.data(), present.data());
      });
      run(grid, [&](st::grid_index g) { st::exclusive_scan(g, present.data(), G * rin, row_at.data()); });
      run(grid, [&](st::grid_index g) { st::exclusive_scan(g, count.data(), G * rin, entry_at.data()); });
      run(grid, [&](st::grid_index g) {
        ns::fanout_check(g, row_at.data(), entry_at.data(), rin, G, sc.tables.data(), &flag);
      });
      BOOST_TEST(flag == st::bad_slot_counts);
      std::vector<std::int32_t> fan_row(G * rin + 1, -7);
      std::vector<std::int32_t> untouched = fan_row, fan_row_entries = fan_row, fan_slot(target_of.size() + 1, -7),
                                fan_source = fan_slot;
      std::vector<float> fan_weight(target_of.size() + 1, -7.0f);
      run(grid, [&](st::grid_index g) {
        ns::fanout_place(g, reo.data(), target_of.data(), slot.data(), weight.data(), rin, G, row_at.data(),
                         entry_at.data(), &flag, fan_row.data(), fan_row_entries.data(), fan_slot.data(),
                         fan_weight.data(), fan_source.data());
      });
      BOOST_TEST(fan_row == untouched);
      // The forwarded positions of the node stage: no entries, slot -1; own rows as they are.
      const std::size_t nout = sc.node_out, nout_entries = sc.node_out_entries;
      const auto& lq = cr.layouts[q];
      std::vector<std::int32_t> index(nout), row_entries(nout), node_slot(nout_entries);
      std::vector<float> node_weight(nout_entries);
      run(grid, [&](st::grid_index g) {
        ns::node_send_rows(g, sc.tables.data(), G, fan_row.data(), static_cast<std::int32_t>(lq.rows()), nout, &flag,
                           index.data());
        ns::node_send_row_entries(g, sc.tables.data(), G, lq.row_entry_offsets().data(), fan_row_entries.data(), nout,
                                  &flag, row_entries.data());
        ns::node_send_entries(g, sc.tables.data(), G, lq.entry_slot().data(), lq.entry_weight().data(), fan_slot.data(),
                              fan_weight.data(), nout_entries, &flag, node_slot.data(), node_weight.data());
      });
      const std::size_t own_rows =
          static_cast<std::size_t>(lq.rank_offsets()[node * G + 1] - lq.rank_offsets()[node * G]);
      for (std::size_t i = own_rows; i < sc.node_send[0]; ++i) { // local rank 0's forwarded rows
        BOOST_TEST(row_entries[i] == 0);
        BOOST_TEST(index[i] == 0);
      }
      const std::size_t own_entries =
          static_cast<std::size_t>(lq.rank_entry_offsets()[node * G + 1] - lq.rank_entry_offsets()[node * G]);
      for (std::size_t i = own_entries; i < sc.node_send_entries[0]; ++i)
        BOOST_TEST(node_slot[i] == -1);
      for (std::size_t i = 0; i < own_rows; ++i)
        BOOST_TEST(index[i] == lq.rank_offsets()[node * G] + static_cast<std::int32_t>(i));
      std::vector<std::int32_t> fwd_count(rin, -1);
      run(grid, [&](st::grid_index g) { ns::forward_count(g, row_at.data(), rin, G, &flag, fwd_count.data()); });
      BOOST_TEST(fwd_count == std::vector<std::int32_t>(rin, 0));
      ++seen;
    }
  }
  BOOST_TEST(seen > 0u);
}

// A round whose sizes pass 32-bit offsets (consistent otherwise) is refused and leaves zero tables,
// and the bodies the dispatcher then runs with its forwarding check failed stay in bounds: every
// node stage position takes its guarded branch and every layout row returns from inside the pool.
BOOST_AUTO_TEST_CASE(a_step_past_32_bit_offsets_indexes_nothing) {
  const std::size_t G = 2, R = 4, S = 1, W = ns::tail_width(S, G), q = 0, peer = 2;
  // Rank 0's own layout: 3 rows to rank 1 (its node), 2 rail rows to rank 2.
  const std::vector<std::int32_t> ro{0, 0, 3, 5, 5}, eo{0, 0, 4, 7, 7}, sc{0, 4, 3, 0}, reach{0, 3, 2, 1};
  const ns::layout_counts lc{ro, eo, sc, reach};
  device_counts d;
  d.tail_width = W;
  d.rows.assign(R, 0);
  d.entries.assign(R, 0);
  d.tail.assign(R * W, 0);
  const std::uint32_t huge = 1u << 31; // entries, one past INT32_MAX
  d.rows[peer] = 1;
  d.entries[peer] = huge;
  d.tail[peer * W + 0] = huge;          // its entries for q's slot 0
  d.tail[peer * W + S] = 1;             // its row reaching q
  d.tail[peer * W + S + 1 + 2 * 0] = 1; // forwards one row to q itself
  d.tail[peer * W + S + 2 + 2 * 0] = huge;
  ns::step_counts out;
  const std::string why = ns::counts_from(lc, d, G, q, S, out);
  BOOST_TEST(why.find("past 32-bit offsets") != std::string::npos, why);
  BOOST_TEST(out.sized);
  BOOST_TEST(!out.indexable);
  BOOST_TEST((out.tables == std::vector<std::int32_t>(ns::table_count * (G + 1), 0)));
  BOOST_TEST(out.node_send[0] == 1u); // the forwarded row, sized as the peers size it
  // The bodies over a small n with the flag set (the sizes themselves are not allocated here).
  const std::int32_t flag = ns::past_32_bits;
  const std::size_t n = 4, layout_rows = 5;
  const std::vector<std::int32_t> fan_row(1, 99), fan_row_entries(1, 99), fan_slot(1, 99), reo{0, 1, 2, 3, 4, 5};
  const std::vector<float> fan_weight(1, 9.0f);
  std::vector<std::int32_t> index(n, -5), entries(n, -5), slot(n, -5), ret(layout_rows, -5);
  std::vector<float> weight(n, -5.0f);
  run({2, 3}, [&](st::grid_index g) {
    ns::node_send_rows(g, out.tables.data(), G, fan_row.data(), static_cast<std::int32_t>(layout_rows), n, &flag,
                       index.data());
    ns::node_send_row_entries(g, out.tables.data(), G, reo.data(), fan_row_entries.data(), n, &flag, entries.data());
    ns::node_send_entries(g, out.tables.data(), G, reo.data(), nullptr, fan_slot.data(), fan_weight.data(), n, &flag,
                          slot.data(), weight.data());
    ns::return_index(g, out.tables.data(), G, layout_rows, static_cast<std::int32_t>(n), ret.data());
  });
  BOOST_TEST(index == std::vector<std::int32_t>(n, 0));
  BOOST_TEST(entries == std::vector<std::int32_t>(n, 0));
  BOOST_TEST(slot == std::vector<std::int32_t>(n, -1));
  for (std::size_t r = 0; r < layout_rows; ++r)
    BOOST_TEST((ret[r] >= 0 && static_cast<std::size_t>(ret[r]) < n + layout_rows)); // the pool: n + layout rows
  // The same bodies at positions 2^31 .. 2^31 + 3 (a refused stage keeps its announced size, up to
  // 2^32 entries): a position must not turn negative and index before the tables. The outputs are
  // four elements addressed as if they sat at 2^31 (only those four are written).
  const std::size_t far = std::size_t{1} << 31, m = 4;
  const auto at_far = [far](auto* p) {
    return reinterpret_cast<decltype(p)>(reinterpret_cast<std::uintptr_t>(p) - far * sizeof(*p));
  };
  std::vector<std::int32_t> index_far(m, -5), entries_far(m, -5), slot_far(m, -5);
  std::vector<float> weight_far(m, -5.0f);
  for (std::size_t t = 0; t < m; ++t) {
    const st::grid_index g{far / m, far / m + 1, t, m}; // thread t: position far + t, then past the end
    ns::node_send_rows(g, out.tables.data(), G, fan_row.data(), static_cast<std::int32_t>(layout_rows), far + m, &flag,
                       at_far(index_far.data()));
    ns::node_send_row_entries(g, out.tables.data(), G, reo.data(), fan_row_entries.data(), far + m, &flag,
                              at_far(entries_far.data()));
    ns::node_send_entries(g, out.tables.data(), G, reo.data(), nullptr, fan_slot.data(), fan_weight.data(), far + m,
                          &flag, at_far(slot_far.data()), at_far(weight_far.data()));
  }
  BOOST_TEST(index_far == std::vector<std::int32_t>(m, 0));
  BOOST_TEST(entries_far == std::vector<std::int32_t>(m, 0));
  BOOST_TEST(slot_far == std::vector<std::int32_t>(m, -1));
  BOOST_TEST(weight_far == std::vector<float>(m, 0.0f));
}
