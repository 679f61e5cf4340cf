#pragma once
// Boost.Test global fixture for MPI tests: every rank runs the same test tree between
// MPI_Init and MPI_Finalize. Errors are returned, not fatal, so LOCUS_MPI_CHECK can report them.
#include <boost/test/unit_test.hpp>
#include <mpi.h>

struct mpi_session {
  mpi_session() {
    int provided = 0;
    MPI_Init_thread(&boost::unit_test::framework::master_test_suite().argc,
                    &boost::unit_test::framework::master_test_suite().argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~mpi_session() { MPI_Finalize(); }
};
BOOST_TEST_GLOBAL_FIXTURE(mpi_session);

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
