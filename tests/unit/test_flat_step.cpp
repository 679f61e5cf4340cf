// The flat device step (transport/detail/flat_step_sequence.hpp, which device_dispatcher runs with
// CUDA launches and device exchanges) run on the host for every rank of a simulated machine: the
// count round's messages as the dispatcher writes them (rows and entries per destination, entries
// per destination slot in the tail), the segments it reads from them (slot_offsets_from), then the
// step's own sequence with the host engine (tests/support/host_step_engine.hpp): ranks as threads
// over the one-GPU transport's protocol with host memory, every buffer poisoned at each resize and every received
// result at the next exchange. Each rank must receive every copy routed to it once, under the
// announced segments, and combine must return each token's weighted sum over its copies.
#define BOOST_TEST_MODULE flat_step
#include "../mpi/dispatch_cases.hpp"
#include "../support/host_step_engine.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <locus/transport/detail/flat_step_sequence.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/layout.hpp>
#include <string>
#include <vector>

using namespace locus;
using namespace locus::transport;
namespace fs = locus::transport::detail::flat_step;
namespace hs = locus_test::host_step;

namespace {

void check_case(const locus_test::dispatch_case& c, std::size_t blocks, std::size_t threads) {
  const auto& topo = c.topo;
  const std::size_t R = topo.ranks(), S = c.map.slots_per_rank();
  std::vector<layout<>> layouts(R);
  std::vector<std::vector<std::size_t>> send_counts(R), entry_counts(R);
  hs::round_state round;
  round.rows.resize(R);
  round.entries.resize(R);
  round.tail.resize(R);
  for (std::size_t s = 0; s < R; ++s) {
    layouts[s].assign(c.routings[s].view(), c.map, topo, s, layout_options{transport_kind::flat, 1});
    const auto& l = layouts[s];
    for (std::size_t d = 0; d < R; ++d) {
      send_counts[s].push_back(static_cast<std::size_t>(l.rank_offsets()[d + 1] - l.rank_offsets()[d]));
      entry_counts[s].push_back(static_cast<std::size_t>(l.rank_entry_offsets()[d + 1] - l.rank_entry_offsets()[d]));
    }
    round.rows[s] = send_counts[s];
    round.entries[s] = entry_counts[s];
    round.tail[s].assign(l.slot_counts().begin(), l.slot_counts().end()); // per destination, its slots
  }
  std::vector<device_counts> counts(R);
  std::vector<std::vector<std::int32_t>> slot_offsets(R);
  for (std::size_t q = 0; q < R; ++q) {
    counts[q] = hs::delivered(round, q, S);
    const std::string why = locus::transport::detail::exchange::slot_offsets_from(counts[q], S, slot_offsets[q]);
    BOOST_TEST_REQUIRE(why.empty(), "rank " << q << ": " << why);
  }
  const auto results = hs::run_ranks(
      topo, transport_kind::flat, layouts, blocks, threads, [&](std::size_t q, hs::engine& e, hs::rank_result& out) {
        const auto& l = layouts[q];
        fs::step_buffers<hs::engine, double> b;
        const fs::layout_view lay{l.rows(), l.row_entry_offsets().data(), l.entry_slot().data(),
                                  l.entry_weight().data()};
        std::size_t rows = 0, entries = 0;
        for (std::size_t m = 0; m < R; ++m) {
          rows += counts[q].rows[m];
          entries += counts[q].entries[m];
        }
        fs::prepare_sequence(e, b, lay, 1);
        const double* got = fs::dispatch_sequence(e, b, lay, send_counts[q], entry_counts[q], counts[q], 1, [&] {
          out.row_entries.assign(b.recv_row_entries.data(), b.recv_row_entries.data() + rows);
          out.slots.assign(b.recv_slots.data(), b.recv_slots.data() + entries);
          out.weights.assign(b.recv_weights.data(), b.recv_weights.data() + entries);
        });
        out.received.assign(got, got + rows);
        const std::vector<double> back = hs::expert_sums(out, c.map, q);
        const double* ret = fs::combine_sequence(e, send_counts[q], counts[q], 1, back.data());
        out.returned.assign(ret, ret + l.rows());
      });
  hs::check_step(c, layouts, results, slot_offsets);
}

} // namespace

BOOST_AUTO_TEST_CASE(step_moves_every_copy_once_and_returns_every_sum) {
  const std::pair<std::size_t, std::size_t> grids[] = {{1, 1}, {2, 3}, {3, 64}};
  std::size_t g = 0;
  for (std::uint64_t seed = 1; seed <= 30; ++seed)
    for (auto [nodes, gpus] :
         {std::pair<std::size_t, std::size_t>{2, 2}, {3, 2}, {2, 4}, {4, 1}, {1, 4}, {1, 1}, {3, 3}}) {
      const auto [blocks, threads] = grids[g++ % 3];
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", grid " << blocks << " x " << threads) {
        check_case(locus_test::make_case(seed, nodes, gpus), blocks, threads);
      }
    }
}
