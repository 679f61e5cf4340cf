#pragma once
// Command-line and trace loading shared by the host benchmarks: the CLI11 conventions of
// tool_cli.hpp, a trace given as an ESFT folder or a binary trace file, and the machine line of a
// results file.
#include "tool_cli.hpp"

#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/core/atomic_file.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <string>
#include <thread>

namespace bench_args {

// An ESFT folder (imported) or a binary trace file.
inline locus::trace::trace load_trace(const std::string& path) {
  return std::filesystem::is_directory(path) ? locus::trace::import_esft(path) : locus::trace::read_trace(path);
}

//! CPU time of the calling thread: the machine is shared, and "on one core" means the time the core
//! spends, not the wall-clock time other processes stretch it to.
inline double cpu_now() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

//! The machine and the time of the run, for the results file: CPU model, cores, load average, UTC date.
inline std::string machine_line() {
  std::string cpu = "unknown CPU", load = "?";
  std::ifstream info("/proc/cpuinfo");
  for (std::string l; std::getline(info, l);)
    if (l.rfind("model name", 0) == 0) {
      cpu = l.substr(l.find(':') + 2);
      break;
    }
  std::ifstream avg("/proc/loadavg");
  std::getline(avg, load);
  const std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  return cpu + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores, load average " +
         load.substr(0, load.find(' ', load.find(' ', load.find(' ') + 1) + 1)) + ", " + date;
}

//! The command line as run, for the results file. The program is named as it was run, relative to
//! the folder the run started in (e.g. build/rel/bench/router), or as `program` (build/dev/bench/
//! <name>) when it was run from outside that folder: an absolute path would name this machine's
//! folders.
inline std::string command_line(int argc, char** argv, const std::string& program) {
  std::string c = program;
  if (argc > 0 && argv[0] && *argv[0]) {
    std::error_code ec;
    const std::filesystem::path run = argv[0], here = std::filesystem::current_path(ec);
    const std::filesystem::path rel = run.is_absolute() && !ec ? run.lexically_relative(here) : run;
    const std::string r = rel.generic_string();
    // A bare name was found on PATH, not in the folder: keep the conventional name then too.
    if (!r.empty() && r.rfind("..", 0) != 0 && !rel.is_absolute() && r.find('/') != std::string::npos) c = r;
  }
  for (int i = 1; i < argc; ++i)
    c += std::string(" ") + argv[i];
  return c;
}

//! Checks that `path` (a results file) can be written, before the run: its folder exists and takes
//! files, and it is not a folder. Nothing is written; the file is replaced whole at the end.
inline void output_file(const std::string& path) {
  locus::atomic_file probe(path); // never committed: its unnamed temporary goes when it does
}

//! Makes the results folder `dir` and checks that a file can be written in it, before the run: a
//! folder that cannot be used is said at once, not after the minutes or hours of measuring (and not
//! as std::filesystem's "cannot create directories").
inline void output_folder(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw locus::io_error(dir + ": cannot be made the results folder: " + ec.message());
  output_file((std::filesystem::path(dir) / ".results-probe").string());
}

//! What every results file records: the command as run, and the machine with the date.
struct provenance {
  std::string command, machine;
};
//! The command line (program named as `program`) and machine_line() of this run.
inline provenance provenance_of(int argc, char** argv, const std::string& program) {
  return {command_line(argc, argv, program), machine_line()};
}

} // namespace bench_args
