#pragma once
// Option parsing for programs that run as an MPI job. Every rank parses its own command line, and
// an mpirun may give ranks different ones (MPMD `:`), so a rank that refuses its options must not
// leave the others waiting in their first collective: the ranks agree on the outcome first.
#include "tool_cli.hpp"

#include <cstdio>
#include <mpi.h>
#include <optional>
#include <string>

namespace tool_cli {

// Parses `argv` with `app` on every rank of `comm` (a collective: every rank must call it). All
// ranks agree (MPI_Allreduce) on the outcome:
// - every rank parsed its options: returns nullopt and the program carries on;
// - some rank was asked for --help (and none failed): rank 0 prints the help, every rank calls
//   MPI_Finalize and 0 is returned for main to return;
// - some rank could not parse its options: that rank says why on stderr ("<program>: rank <r>: ...",
//   as every rank's error line reads), rank 0 says that the job ends if it parsed its own, every
//   rank calls MPI_Finalize and 1 is returned.
// Nothing is aborted, so the job ends with every rank's message and exit status, not a hang.
[[nodiscard]] inline std::optional<int> parse_or_finish(CLI::App& app, int argc, char** argv, MPI_Comm comm,
                                                        const std::string& program) {
  enum : int { parsed = 0, help = 1, failed = 2 };
  int mine = parsed;
  try {
    if (const std::string unknown = unknown_option(app, argc, argv, program); !unknown.empty())
      throw CLI::ExtrasError(unknown, CLI::ExitCodes::ExtrasError);
    if (const std::string empty = empty_list_item(app, argc, argv); !empty.empty())
      throw CLI::ValidationError(empty, CLI::ExitCodes::ValidationError);
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help (CallForHelp, CallForAllHelp) is a ParseError with exit code 0.
    if (e.get_exit_code() == 0) {
      mine = help;
    } else {
      mine = failed;
      int rank = 0;
      MPI_Comm_rank(comm, &rank);
      const std::string what = e.what();
      const bool points_to_help = what.size() >= 7 && what.compare(what.size() - 7, 7, "--help)") == 0;
      std::fprintf(stderr, "%s: rank %d: %s%s\n", program.c_str(), rank, what.c_str(),
                   points_to_help ? "" : " (see --help)");
      std::fflush(stderr);
    }
  }
  int outcome = mine;
  if (MPI_Allreduce(&mine, &outcome, 1, MPI_INT, MPI_MAX, comm) != MPI_SUCCESS) outcome = failed;
  if (outcome == parsed) return std::nullopt;
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  if (rank == 0 && outcome == help) std::fputs(app.help().c_str(), stdout);
  if (rank == 0 && outcome == failed && mine != failed)
    std::fprintf(stderr, "%s: rank 0: another rank could not parse its options; every rank ends\n", program.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Finalize();
  return outcome == help ? 0 : 1;
}

} // namespace tool_cli
