// A program outside the locus tree, built against an installed locus.
#include <locus/locus.hpp>
#if defined(CONSUMER_USES_MPI)
#include <locus/core/mpi_error.hpp>
#endif

#include <cstdio>

int main(int argc, char** argv) {
#if defined(CONSUMER_USES_MPI)
  LOCUS_MPI_CHECK(MPI_Init(&argc, &argv));
#else
  (void)argc;
  (void)argv;
#endif
  using shape = locus::moe_shape<locus::experts<256>, locus::top_k<8>, locus::hidden<7168>>;
  using topo = locus::topology<locus::nodes<8>, locus::gpus_per_node<8>>;
  static_assert(shape{}.experts() == 256 && topo{}.ranks() == 64);
  const locus::expert_map map(4, 2, 2, {0, 1, 2, 3});
  std::printf("locus %d.%d.%d consumer: %zu ranks, expert 3 on rank %d\n", LOCUS_VERSION_MAJOR, LOCUS_VERSION_MINOR,
              LOCUS_VERSION_PATCH, topo{}.ranks(), map.replicas(3)[0].rank);
#if defined(CONSUMER_USES_MPI)
  LOCUS_MPI_CHECK(MPI_Finalize());
#endif
  return map.replicas(3)[0].rank == 1 ? 0 : 1;
}
