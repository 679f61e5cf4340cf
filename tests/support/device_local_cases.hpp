#pragma once
// The device transports' cases, written once over a harness `H`: the one-GPU transport's
// (transport/device_local.hpp and its protocol, detail/device_local_protocol.hpp) in the CUDA test
// (tests/cuda/test_device_local.cu: device memory, streams) and the CPU test
// (tests/unit/test_device_local_host.cpp: host memory, tests/support/host_local_device.hpp), and the
// NCCL transport's protocol over a host imitation of NCCL (tests/unit/test_nccl_protocol.cpp,
// tests/support/host_nccl.hpp), which runs all but the cases of the one-GPU transport's own checks.
// Ranks are threads; received rows are checked against what each sender wrote (rows carry their
// sender, receiver and index), and host dispatch + combine over the transport against the dense
// reference.
//
// H provides `fabric`, `endpoint`, `stream_owner` (its `s`: a stream for one endpoint), `rows<U>`
// (a buffer of the endpoint's memory: a size constructor, `resize`, `upload(vector, stream)`,
// `data()`) and `read_rows(endpoint&, const device_exchange_result&)` (the received rows on the host,
// once the endpoint's stream is done).

#include "../mpi/dispatch_cases.hpp"
#include "rank_threads.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <exception>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/exchange.hpp>
#include <numeric>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace locus_test::device_local_cases {

using namespace locus;
using namespace locus::transport;

// Runs f(rank) on one thread per rank; rethrows the first failure.
template <class F>
void on_ranks(std::size_t ranks, F&& f) {
  for (auto& e : run_rank_threads(ranks, f))
    if (e) std::rethrow_exception(e);
}

// Boost.Test is not thread-safe: rank threads report a failed check by throwing, and on_ranks
// rethrows it on the test's thread.
inline void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

inline std::uint64_t row_value(std::size_t from, std::size_t to, std::size_t i, std::size_t step) {
  return (step << 48) | (from << 32) | (to << 16) | i;
}

// Rank r's rows for a world exchange: rows[m] rows to each rank m, each saying (r, m, i, step).
inline std::vector<std::uint64_t> world_rows(std::size_t r, const std::vector<std::size_t>& rows, std::size_t step) {
  std::vector<std::uint64_t> payload;
  for (std::size_t m = 0; m < rows.size(); ++m)
    for (std::size_t i = 0; i < rows[m]; ++i)
      payload.push_back(row_value(r, m, i, step));
  return payload;
}

// Checks that every row rank r received in a world exchange says it came from its sender, in order.
template <class H>
void expect_world_rows(typename H::endpoint& ep, const device_exchange_result& out, std::size_t r, std::size_t step,
                       const std::string& at) {
  const std::vector<std::uint64_t> got = H::read_rows(ep, out);
  for (std::size_t m = 0; m + 1 < out.offsets.size(); ++m)
    for (std::size_t i = 0; i < out.counts[m]; ++i)
      expect(got[out.offsets[m] + i] == row_value(m, r, i, step),
             at + ": row " + std::to_string(i) + " from " + std::to_string(m));
}

template <class H>
void rows_arrive_from_every_member_of_every_group() {
  // Passing means no rank threw.
  const dynamic_topology topo(2, 2);
  typename H::fabric fabric(topo, transport_kind::hierarchical);
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    typename H::template rows<std::uint64_t> send;
    device_exchange_result out;
    for (std::size_t step = 0; step < 3; ++step)
      for (exchange_group g : {exchange_group::world, exchange_group::node, exchange_group::rail}) {
        ep.begin_step(step);
        const std::size_t members = ep.group_size(g);
        const std::size_t self = [&] {
          for (std::size_t m = 0; m < members; ++m)
            if (ep.world_rank_of(g, m) == r) return m;
          return members;
        }();
        // Counts vary with sender, receiver and step, zero included.
        std::vector<std::size_t> counts(members), expected(members);
        std::vector<std::uint64_t> rows;
        for (std::size_t m = 0; m < members; ++m) {
          counts[m] = (self * 3 + m + step) % 4;
          expected[m] = (m * 3 + self + step) % 4;
          for (std::size_t i = 0; i < counts[m]; ++i)
            rows.push_back(row_value(r, ep.world_rank_of(g, m), i, step));
        }
        send.upload(rows, ep.stream());
        ep.exchange_device(g, sizeof(std::uint64_t), reinterpret_cast<const std::byte*>(send.data()), counts, expected,
                           out, 1);
        const std::string at = "rank " + std::to_string(r) + " step " + std::to_string(step) + " group " + to_string(g);
        expect(out.offsets.back() == std::accumulate(expected.begin(), expected.end(), std::size_t{0}),
               at + ": row total");
        const std::vector<std::uint64_t> got = H::read_rows(ep, out);
        for (std::size_t m = 0; m < members; ++m) {
          expect(out.counts[m] == expected[m], at + ": count from member " + std::to_string(m));
          for (std::size_t i = 0; i < out.counts[m]; ++i)
            expect(got[out.offsets[m] + i] == row_value(ep.world_rank_of(g, m), r, i, step),
                   at + ": row " + std::to_string(i) + " from member " + std::to_string(m));
        }
      }
  });
}

template <class H>
void disagreeing_counts_raise_on_every_member() {
  const dynamic_topology topo(1, 3);
  typename H::fabric fabric(topo, transport_kind::flat);
  std::vector<int> raised(3, 0);
  on_ranks(3, [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    typename H::template rows<std::uint64_t> send(3);
    device_exchange_result out;
    std::vector<std::size_t> counts{1, 1, 1}, expected{1, 1, r == 2 ? 2u : 1u};
    try {
      ep.exchange_device(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), counts, expected,
                         out);
    } catch (const transport_error&) {
      raised[r] = 1;
    }
  });
  BOOST_TEST(raised == std::vector<int>({1, 1, 1}), boost::test_tools::per_element());
}

// Host dispatch and combine over the transport (header rounds, rows staged through the endpoint's
// memory and back) on every (nodes, GPUs per node) shape given, both kinds, for each seed.
template <class H>
void host_dispatch_and_combine_match_reference(const std::vector<std::pair<std::size_t, std::size_t>>& shapes = {{2,
                                                                                                                  2}},
                                               const std::vector<std::uint64_t>& seeds = {7}) {
  for (const auto& [nodes, gpus] : shapes)
    for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical})
      for (const std::uint64_t seed : seeds) {
        const auto c = locus_test::make_case(seed, nodes, gpus);
        typename H::fabric fabric(c.topo, kind);
        std::vector<double> error(c.topo.ranks(), 1.0);
        on_ranks(c.topo.ranks(), [&](std::size_t r) {
          typename H::stream_owner st;
          auto ep = fabric.endpoint(r, st.s);
          moe_dispatcher<typename H::endpoint, float> d(ep, c.map, c.hidden);
          const auto x = c.inputs(r);
          layout<> l;
          d.plan(l, c.routings[r].view());
          auto h = d.dispatch(std::span<const float>(x), l);
          locus_test::run_experts(h);
          std::vector<float> y(x.size());
          d.combine(y, h);
          error[r] = locus_test::max_error(y, c.reference(r));
        });
        BOOST_TEST_CONTEXT(nodes << "x" << gpus << " " << to_string(kind) << " seed " << seed) {
          for (double e : error)
            BOOST_TEST(e < 1e-5);
        }
      }
}

// The count round then known-count exchanges (the device dispatcher's flat step): every member
// learns each sender's row and entry counts in one round, and rows sized by them arrive in order;
// a count round whose members name different exchanges raises on every member.
template <class H>
void count_round_then_known_count_exchanges() {
  const dynamic_topology topo(2, 2);
  typename H::fabric fabric(topo, transport_kind::flat);
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    const std::size_t R = topo.ranks();
    typename H::template rows<std::uint64_t> send;
    device_exchange_result out;
    device_counts counts;
    for (std::size_t step = 0; step < 3; ++step) {
      ep.begin_step(step);
      std::vector<std::size_t> rows(R), entries(R);
      for (std::size_t m = 0; m < R; ++m) {
        rows[m] = (r * 3 + m + step) % 4;
        entries[m] = rows[m] * 2 + m;
      }
      // A tail of two counts per receiver (as the dispatcher's entries per slot): from r to m,
      // (r + m + step, 10 r + m).
      std::vector<std::uint32_t> tail(2 * R);
      for (std::size_t m = 0; m < R; ++m) {
        tail[2 * m] = static_cast<std::uint32_t>(r + m + step);
        tail[2 * m + 1] = static_cast<std::uint32_t>(10 * r + m);
      }
      ep.exchange_device_counts(exchange_group::world, 8, rows, 4, entries, counts, 3, tail, 2);
      const std::string at = "rank " + std::to_string(r) + " step " + std::to_string(step);
      expect(counts.tail_width == 2 && counts.tail.size() == 2 * R, at + ": the tail's shape");
      for (std::size_t m = 0; m < R; ++m) {
        expect(counts.rows[m] == (m * 3 + r + step) % 4, at + ": row count from " + std::to_string(m));
        expect(counts.entries[m] == counts.rows[m] * 2 + r, at + ": entry count from " + std::to_string(m));
        expect(counts.tail[2 * m] == m + r + step && counts.tail[2 * m + 1] == 10 * m + r,
               at + ": tail from " + std::to_string(m));
      }
      send.upload(world_rows(r, rows, step), ep.stream());
      ep.exchange_device_known(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), rows,
                               counts.rows, out);
      expect_world_rows<H>(ep, out, r, step, at);
    }
    // Count rounds whose agreement values differ (the device dispatcher's expert-map fingerprint)
    // raise everywhere, naming the maps.
    const std::vector<std::size_t> ones(R, 1);
    std::string why;
    try {
      ep.exchange_device_counts(exchange_group::world, 8, ones, 4, ones, counts, 4, {}, 0, r == 3 ? 99 : 98);
    } catch (const transport_error& e) {
      why = e.what();
    }
    expect(why.find("step with different expert maps") != std::string::npos,
           "rank " + std::to_string(r) + ": count rounds of different maps raise: " + why);
    // Count rounds that name different exchanges raise everywhere.
    bool raised = false;
    try {
      ep.exchange_device_counts(exchange_group::world, 8, ones, 4, ones, counts, r == 2 ? 5 : 4);
    } catch (const transport_error&) {
      raised = true;
    }
    expect(raised, "rank " + std::to_string(r) + ": disagreeing count rounds raise");
  });
}

// The one-GPU transport's checks of what the NCCL one takes as preconditions (NCCL's sends and
// receives carry no counts to compare): a receive count that disagrees with its sender's raises on
// that receiver alone, and count rounds with tails of different widths raise on every member.
template <class H>
void known_counts_and_tail_widths_are_checked() {
  const dynamic_topology topo(2, 2);
  typename H::fabric fabric(topo, transport_kind::flat);
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    const std::size_t R = topo.ranks();
    typename H::template rows<std::uint64_t> send(R);
    device_exchange_result out;
    device_counts counts;
    // A wrong receive count: rank 1 expects one row too many from rank 0.
    std::vector<std::size_t> ones(R, 1), recv(R, 1);
    if (r == 1) recv[0] = 2;
    bool raised = false;
    try {
      ep.exchange_device_known(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), ones, recv,
                               out);
    } catch (const transport_error&) {
      raised = true;
    }
    expect(raised == (r == 1), "rank " + std::to_string(r) + ": a wrong known count raises on its receiver only");
    // Tails of different widths raise everywhere.
    raised = false;
    const std::vector<std::uint32_t> wide(3 * R, 1);
    try {
      const std::uint32_t width = r == 0 ? 2 : 3;
      ep.exchange_device_counts(exchange_group::world, 8, ones, 4, ones, counts, 6,
                                std::span<const std::uint32_t>(wide).first(width * R), width);
    } catch (const transport_error&) {
      raised = true;
    }
    expect(raised, "rank " + std::to_string(r) + ": count rounds with tails of different widths raise");
  });
}

// A world of 65 ranks spans six tiles of the group's copies (detail/group_gather.hpp: 32 senders
// × 64 receivers per launch): every row still arrives once, in sender order.
template <class H>
void a_group_of_several_tiles_delivers_every_row() {
  const dynamic_topology topo(5, 13);
  typename H::fabric fabric(topo, transport_kind::flat);
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    const std::size_t R = topo.ranks();
    std::vector<std::size_t> rows(R), recv(R);
    for (std::size_t m = 0; m < R; ++m) {
      rows[m] = (r + 2 * m) % 3;
      recv[m] = (m + 2 * r) % 3;
    }
    typename H::template rows<std::uint64_t> send;
    send.upload(world_rows(r, rows, 0), ep.stream());
    device_exchange_result out;
    ep.exchange_device_known(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), rows, recv,
                             out);
    expect_world_rows<H>(ep, out, r, 0, "rank " + std::to_string(r));
  });
}

// Count rounds back to back, with no other meeting between them: a member reads its round's
// headers after the meeting while a faster one already writes the next round's, which must land
// in the board's other copy (the header rounds alternate). Every round's counts must arrive as sent.
template <class H>
void back_to_back_count_rounds() {
  const dynamic_topology topo(1, 4);
  typename H::fabric fabric(topo, transport_kind::flat);
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    const std::size_t R = topo.ranks();
    device_counts counts;
    for (std::size_t round = 0; round < 12; ++round) {
      std::vector<std::size_t> rows(R), entries(R);
      std::vector<std::uint32_t> tail(R);
      for (std::size_t m = 0; m < R; ++m) {
        rows[m] = (r * 5 + m * 3 + round) % 7;
        entries[m] = rows[m] + round;
        tail[m] = static_cast<std::uint32_t>(100 * round + 10 * r + m);
      }
      ep.exchange_device_counts(exchange_group::world, 8, rows, 4, entries, counts, 2, tail, 1);
      const std::string at = "rank " + std::to_string(r) + " round " + std::to_string(round);
      for (std::size_t m = 0; m < R; ++m) {
        const std::size_t want = (m * 5 + r * 3 + round) % 7;
        expect(counts.rows[m] == want && counts.entries[m] == want + round, at + ": counts from " + std::to_string(m));
        expect(counts.tail[m] == 100 * round + 10 * m + r, at + ": tail from " + std::to_string(m));
      }
    }
  });
}

// Known-count exchanges have no header round, but the members still meet on the board: a rank that
// skipped one (rank 1 here) is at another exchange than its peers at the next row stage, and every
// member raises transport_error saying who is where, instead of pairing two different exchanges.
template <class H>
void a_skipped_known_exchange_raises_on_every_member() {
  const dynamic_topology topo(1, 3);
  typename H::fabric fabric(topo, transport_kind::flat);
  std::vector<std::string> said(topo.ranks());
  on_ranks(topo.ranks(), [&](std::size_t r) {
    typename H::stream_owner st;
    auto ep = fabric.endpoint(r, st.s);
    const std::size_t R = topo.ranks();
    const std::vector<std::size_t> ones(R, 1);
    typename H::template rows<std::uint64_t> send;
    send.upload(world_rows(r, ones, 0), ep.stream());
    device_exchange_result out;
    ep.begin_step(0);
    try {
      for (int i = 0; i < (r == 1 ? 1 : 2); ++i)
        ep.exchange_device_known(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), ones, ones,
                                 out);
      // Rank 1 skipped its second exchange: its next step meets its peers' second exchange.
      ep.begin_step(1);
      ep.exchange_device_known(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), ones, ones,
                               out);
    } catch (const transport_error& e) {
      said[r] = e.what();
    }
  });
  for (std::size_t r = 0; r < topo.ranks(); ++r)
    BOOST_TEST(said[r].find("ranks 0, 2 are at step 0 exchange #1; rank 1 is at step 1 exchange #0") !=
                   std::string::npos,
               said[r]);
}

} // namespace locus_test::device_local_cases
