#define BOOST_TEST_MODULE mpi_core
#include "mpi_fixture.hpp"

#include <locus/core/mpi_error.hpp>
#include <locus/locus.hpp>
#include <random>
#include <vector>

using namespace locus;

namespace {
// Each rank's routing is a pure function of (seed, rank), so any rank can rebuild all of them.
routing<top_k<4>> routing_of(int rank, std::size_t tokens, std::size_t experts) {
  std::mt19937 rng(1234u + static_cast<unsigned>(rank));
  routing<top_k<4>> r(tokens);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<expert_id> pool(experts);
    for (std::size_t e = 0; e < experts; ++e)
      pool[e] = static_cast<expert_id>(e);
    for (std::size_t j = 0; j < 4; ++j) {
      std::swap(pool[j], pool[j + rng() % (experts - j)]);
      r.view().expert(t, j) = pool[j];
      r.view().weight(t, j) = 0.25f;
    }
  }
  return r;
}
} // namespace

// Global per-expert load via MPI_Allreduce equals the load counted by one rank over every rank's
// routing (the brute-force reference).
BOOST_AUTO_TEST_CASE(allreduced_expert_load_matches_reference) {
  const int rank = world_rank(), size = world_size();
  constexpr std::size_t experts = 32, tokens = 100;
  const auto mine = routing_of(rank, tokens + static_cast<std::size_t>(rank), experts);
  validate_routing(mine.view(), experts);
  std::vector<long long> local(experts, 0), global(experts, 0);
  for (std::size_t t = 0; t < mine.tokens(); ++t)
    for (std::size_t j = 0; j < 4; ++j)
      ++local[static_cast<std::size_t>(mine.view().expert(t, j))];
  LOCUS_MPI_CHECK(
      MPI_Allreduce(local.data(), global.data(), static_cast<int>(experts), MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD));
  std::vector<long long> expected(experts, 0);
  for (int r = 0; r < size; ++r) {
    const auto other = routing_of(r, tokens + static_cast<std::size_t>(r), experts);
    for (expert_id e : other.ids())
      ++expected[static_cast<std::size_t>(e)];
  }
  BOOST_TEST(global == expected, boost::test_tools::per_element());
}

// The topology's node numbering agrees with a communicator split by node: ranks that share a
// node index form one group of gpus_per_node ranks.
BOOST_AUTO_TEST_CASE(topology_split_matches_node_of) {
  const int rank = world_rank(), size = world_size();
  const std::size_t gpus = size % 2 == 0 ? 2 : 1;
  const dynamic_topology topo(static_cast<std::size_t>(size) / gpus, gpus);
  MPI_Comm node_comm;
  LOCUS_MPI_CHECK(
      MPI_Comm_split(MPI_COMM_WORLD, static_cast<int>(topo.node_of(static_cast<std::size_t>(rank))), rank, &node_comm));
  int node_rank = -1, node_size = 0;
  MPI_Comm_rank(node_comm, &node_rank);
  MPI_Comm_size(node_comm, &node_size);
  BOOST_TEST(static_cast<std::size_t>(node_size) == gpus);
  BOOST_TEST(static_cast<std::size_t>(node_rank) == topo.local_rank_of(static_cast<std::size_t>(rank)));
  MPI_Comm_free(&node_comm);
}

BOOST_AUTO_TEST_CASE(mpi_errors_become_exceptions) {
  int value = 0;
  // Root out of range: MPI reports MPI_ERR_ROOT, which LOCUS_MPI_CHECK must turn into mpi_error.
  try {
    LOCUS_MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT, world_size() + 5, MPI_COMM_WORLD));
    BOOST_FAIL("expected mpi_error");
  } catch (const mpi_error& e) {
    BOOST_TEST(e.code() != MPI_SUCCESS);
    BOOST_TEST(e.message().find("MPI_Bcast") != std::string::npos);
  }
}
