#define BOOST_TEST_MODULE mpi_transport
#include "dispatch_cases.hpp"
#include "mpi_fixture.hpp"

#include <chrono>
#include <cstdlib>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/mpi.hpp>
#include <map>
#include <memory>
#include <thread>

using namespace locus;
using namespace locus::transport;

namespace {
// Iterations of the random test: 700 on 8 ranks, 200 on 4, 100 on 2 (1,000 over the three ctest
// runs); `-- --iterations N` overrides.
std::size_t iterations() {
  auto& suite = boost::unit_test::framework::master_test_suite();
  for (int i = 1; i + 1 < suite.argc; ++i)
    if (std::string(suite.argv[i]) == "--iterations") return static_cast<std::size_t>(std::atoll(suite.argv[i + 1]));
  const int size = world_size();
  return size >= 8 ? 700 : size >= 4 ? 200 : 100;
}

// Every (nodes, gpus) factorisation of the world size.
std::vector<std::pair<std::size_t, std::size_t>> shapes(std::size_t ranks) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (std::size_t g = 1; g <= ranks; ++g)
    if (ranks % g == 0) out.emplace_back(ranks / g, g);
  return out;
}

// Runs `body` and reports on every rank which locus error kind it raised (-1 for none).
template <class F>
int error_kind_of(F&& body) {
  try {
    body();
  } catch (const locus::error& e) {
    return static_cast<int>(e.kind());
  }
  return -1;
}
} // namespace

// Random routings (uniform and skewed, replicas, empty ranks), flat and hierarchical, every
// nodes × GPUs shape of the world: outputs equal the dense reference (expert e multiplies by e+1),
// every (token, expert) pair is computed exactly once, and the bytes moved per link class equal
// the traffic model's for dispatch and for combine.
BOOST_AUTO_TEST_CASE(random_dispatch_combine_matches_reference_and_model) {
  const std::size_t ranks = static_cast<std::size_t>(world_size()), me = static_cast<std::size_t>(world_rank());
  const auto topologies = shapes(ranks);
  std::map<std::pair<std::size_t, bool>, std::unique_ptr<mpi_transport>> transports;
  const std::size_t n = iterations();
  std::size_t failures = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t it = 0; it < n; ++it) {
    const std::size_t shape = it % topologies.size();
    const bool hier = (it / topologies.size()) % 2 == 1;
    const auto [nodes, gpus] = topologies[shape];
    auto& tp = transports[{shape, hier}];
    if (!tp)
      tp = std::make_unique<mpi_transport>(MPI_COMM_WORLD, dynamic_topology(nodes, gpus),
                                           hier ? transport_kind::hierarchical : transport_kind::flat,
                                           exchange_options{std::chrono::milliseconds(60000)});
    const auto c = locus_test::make_case(1000 + it, nodes, gpus);
    moe_dispatcher<mpi_transport, float> d(*tp, c.map, c.hidden);
    const auto x = c.inputs(me);
    layout<> l;
    d.plan(l, c.routings[me].view());
    tp->reset_bytes();
    auto h = d.dispatch(std::span<const float>(x), l);
    const auto dispatch_bytes = tp->bytes().bytes_sent;
    tp->reset_bytes();
    const bool payload_ok = locus_test::payloads_are_inputs(h, c);
    std::vector<float> y(x.size());
    if (it % 3 == 2) // the weighted sums formed beside the experts, as a fusing compute does
      locus_test::run_experts_into_sums(h, it % 6 == 5);
    else
      locus_test::run_experts(h);
    d.combine(y, h);
    const auto combine_bytes = tp->bytes().bytes_sent;

    const double err = locus_test::max_error(y, c.reference(me));
    // One reduction per iteration: expert rows, then dispatch and combine bytes per link class.
    std::vector<std::uint64_t> mine(c.experts + 6, 0), all(c.experts + 6, 0), expect_rows(c.experts, 0);
    for (std::size_t i = 0; i < h.local_experts().size(); ++i)
      mine[static_cast<std::size_t>(h.local_experts()[i])] += h.expert_offsets()[i + 1] - h.expert_offsets()[i];
    for (std::size_t cls = 0; cls < 3; ++cls) {
      mine[c.experts + cls] = dispatch_bytes[cls];
      mine[c.experts + 3 + cls] = combine_bytes[cls];
    }
    LOCUS_MPI_CHECK(
        MPI_Allreduce(mine.data(), all.data(), static_cast<int>(mine.size()), MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD));
    const std::vector<std::uint64_t> all_rows(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(c.experts));
    for (const auto& r : c.routings)
      for (expert_id e : r.ids())
        ++expect_rows[static_cast<std::size_t>(e)];
    const auto model = c.model(hier ? cost::transport_kind::hierarchical : cost::transport_kind::flat);
    const auto sizes = d.message_sizes();
    const std::array<std::uint64_t, 3> db{all[c.experts], all[c.experts + 1], all[c.experts + 2]};
    const std::array<std::uint64_t, 3> cb{all[c.experts + 3], all[c.experts + 4], all[c.experts + 5]};
    bool ok = payload_ok && err < 1e-5 && all_rows == expect_rows;
    for (std::size_t cls = 0; cls < 3; ++cls)
      ok &= db[cls] == model.dispatch_bytes(static_cast<link_class>(cls), sizes) &&
            cb[cls] == model.combine_bytes(static_cast<link_class>(cls), sizes);
    if (!ok) {
      ++failures;
      BOOST_TEST_MESSAGE("iteration " << it << " (" << nodes << "x" << gpus << (hier ? " hierarchical" : " flat")
                                      << ") failed on rank " << me << ": error " << err << " payload " << payload_ok);
    }
  }
  BOOST_TEST(failures == 0u);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (me == 0) BOOST_TEST_MESSAGE(n << " iterations on " << ranks << " ranks in " << seconds << " s");
}

// Counts that disagree between ranks raise transport_error on every rank: a row width that
// differs on one rank, a malformed request on one rank, and a count that differs from what its
// receiver expects. The transport stays in step and usable afterwards.
BOOST_AUTO_TEST_CASE(mismatched_counts_raise_on_every_rank) {
  const std::size_t ranks = static_cast<std::size_t>(world_size()), me = static_cast<std::size_t>(world_rank());
  const auto [nodes, gpus] = shapes(ranks)[shapes(ranks).size() / 2];
  mpi_transport t(MPI_COMM_WORLD, dynamic_topology(nodes, gpus), transport_kind::hierarchical,
                  exchange_options{std::chrono::seconds(60)});
  for (exchange_group g : {exchange_group::world, exchange_group::node, exchange_group::rail}) {
    const std::size_t members = t.group_size(g);
    for (int variant = 0; variant < 3; ++variant) {
      const int kind = error_kind_of([&] {
        std::size_t width = 8;
        std::vector<std::size_t> counts(members, 2), expected;
        if (variant == 0 && me == ranks - 1) width = 12;
        if (variant == 1 && me == 0) counts.push_back(1);
        if (variant == 2) {
          expected.assign(members, 2);
          if (me == ranks / 2) expected[members - 1] = 3;
        }
        std::size_t total = 0;
        for (auto c : counts)
          total += c;
        std::vector<std::byte> rows(total * width);
        exchange_result out;
        t.exchange({g, width, rows, counts, expected}, out);
      });
      // Every member of the affected group raises; a group without the faulty rank may pass.
      std::vector<int> kinds(ranks);
      LOCUS_MPI_CHECK(MPI_Allgather(&kind, 1, MPI_INT, kinds.data(), 1, MPI_INT, MPI_COMM_WORLD));
      const std::size_t faulty = variant == 0 ? ranks - 1 : variant == 1 ? 0 : ranks / 2;
      for (std::size_t r = 0; r < ranks; ++r) {
        bool same_group = true;
        const dynamic_topology topo(nodes, gpus);
        if (g == exchange_group::node) same_group = topo.node_of(r) == topo.node_of(faulty);
        if (g == exchange_group::rail) same_group = topo.local_rank_of(r) == topo.local_rank_of(faulty);
        // A different width is no disagreement in a group of one.
        if (variant == 0 && members == 1) same_group = false;
        if (same_group)
          BOOST_TEST(kinds[r] == static_cast<int>(error_kind::transport),
                     to_string(g) << " variant " << variant << " rank " << r);
        else
          BOOST_TEST(kinds[r] == -1, to_string(g) << " variant " << variant << " rank " << r);
      }
    }
    std::vector<std::size_t> counts(members, 1);
    std::vector<std::byte> rows(members * 4);
    exchange_result out;
    t.exchange({g, 4, rows, counts, {}}, out);
    BOOST_TEST(out.row_count() == members);
  }
}

// A rank that never calls the exchange makes every other rank raise timeout_error after the
// configured timeout; nobody hangs.
BOOST_AUTO_TEST_CASE(missing_peer_times_out_on_every_waiting_rank) {
  const std::size_t ranks = static_cast<std::size_t>(world_size()), me = static_cast<std::size_t>(world_rank());
  for (transport_kind tk : {transport_kind::flat, transport_kind::hierarchical}) {
    const auto [nodes, gpus] = shapes(ranks)[shapes(ranks).size() / 2];
    int kind = -1;
    double seconds = 0;
    {
      mpi_transport t(MPI_COMM_WORLD, dynamic_topology(nodes, gpus), tk,
                      exchange_options{std::chrono::milliseconds(300)});
      const auto start = std::chrono::steady_clock::now();
      if (me != ranks - 1) {
        kind = error_kind_of([&] {
          std::vector<std::size_t> counts(ranks, 1);
          std::vector<std::byte> rows(ranks * 8);
          exchange_result out;
          t.exchange({exchange_group::world, 8, rows, counts, {}}, out);
        });
        // Unusable afterwards, with a message instead of a hang.
        const int again = error_kind_of([&] {
          std::vector<std::size_t> counts(ranks, 0);
          exchange_result out;
          t.exchange({exchange_group::world, 8, {}, counts, {}}, out);
        });
        BOOST_TEST(again == static_cast<int>(error_kind::transport));
      }
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      MPI_Barrier(MPI_COMM_WORLD);
    }
    std::vector<int> kinds(ranks);
    LOCUS_MPI_CHECK(MPI_Allgather(&kind, 1, MPI_INT, kinds.data(), 1, MPI_INT, MPI_COMM_WORLD));
    for (std::size_t r = 0; r + 1 < ranks; ++r)
      BOOST_TEST(kinds[r] == static_cast<int>(error_kind::timeout));
    BOOST_TEST(seconds < 20.0);
  }
}

// The constructor's checks are collective: ranks given different topologies, or one the
// communicator's size does not fit, all raise config_error instead of one raising while its peers
// wait in the communicator splits.
BOOST_AUTO_TEST_CASE(a_topology_that_does_not_fit_raises_on_every_rank) {
  const std::size_t ranks = static_cast<std::size_t>(world_size()), me = static_cast<std::size_t>(world_rank());
  std::string said;
  const int differ = error_kind_of([&] {
    try {
      mpi_transport t(MPI_COMM_WORLD, me == 0 ? dynamic_topology(1, ranks) : dynamic_topology(ranks, 1),
                      transport_kind::flat);
    } catch (const config_error& e) {
      said = e.what();
      throw;
    }
  });
  const int too_big = error_kind_of(
      [&] { mpi_transport t(MPI_COMM_WORLD, dynamic_topology(1, ranks + 1), transport_kind::hierarchical); });
  // Only the other ranks' topology is too big: rank 0's fits, and it must not wait for them alone.
  const int partly = error_kind_of(
      [&] { mpi_transport t(MPI_COMM_WORLD, dynamic_topology(1, me == 0 ? ranks : ranks + 1), transport_kind::flat); });
  // One topology, but rank 0 flat and the others hierarchical: their exchanges would not meet.
  std::string said_kind;
  const int kind_differs = error_kind_of([&] {
    try {
      mpi_transport t(MPI_COMM_WORLD, dynamic_topology(1, ranks),
                      me == 0 ? transport_kind::flat : transport_kind::hierarchical);
    } catch (const config_error& e) {
      said_kind = e.what();
      throw;
    }
  });
  std::vector<int> kinds(4 * ranks);
  const int mine[4] = {differ, too_big, partly, kind_differs};
  LOCUS_MPI_CHECK(MPI_Allgather(mine, 4, MPI_INT, kinds.data(), 4, MPI_INT, MPI_COMM_WORLD));
  for (int k : kinds)
    BOOST_TEST(k == static_cast<int>(error_kind::config));
  BOOST_TEST(said_kind.find("the ranks were given different transport kinds (flat and hierarchical)") !=
                 std::string::npos,
             said_kind);
  BOOST_TEST(said.find("the ranks were given different topologies (1 to " + std::to_string(ranks) + " nodes") !=
                 std::string::npos,
             said);
  // The transport still works afterwards on the same communicator.
  mpi_transport t(MPI_COMM_WORLD, dynamic_topology(1, ranks), transport_kind::flat);
  std::vector<std::size_t> counts(ranks, 1);
  std::vector<std::byte> rows(ranks * 8);
  exchange_result out;
  t.exchange({exchange_group::world, 8, rows, counts, {}}, out);
  BOOST_TEST(out.row_count() == ranks);
}
