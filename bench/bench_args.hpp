#pragma once
// Command-line and trace loading shared by the host benchmarks: the CLI11 conventions of
// tool_cli.hpp, --trace and its default, a trace given as an ESFT folder or a binary trace file,
// and the machine line of a results file.
#include "tool_cli.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <optional>
#include <string>
#include <thread>

namespace bench_args {

// The trace a benchmark reads when --trace is not given, decided when it runs (a path compiled in
// named the build machine's folders in --help and broke when the tree moved): $LOCUS_TRACES/esft
// when the environment variable LOCUS_TRACES is set; otherwise ../shared/traces/esft from the
// working directory (the README's commands run from the repository root, beside which the traces
// live); otherwise shared/traces/esft in the nearest folder above the program (so
// build/dev/bench/<name> finds the traces beside its checkout from any working directory).
inline constexpr const char* default_trace_rule =
    "when not given: $LOCUS_TRACES/esft if LOCUS_TRACES is set, else ../shared/traces/esft from the working "
    "directory, else shared/traces/esft in the nearest folder above this program";

// The default as --help shows it: the LOCUS_TRACES one when that is set, else the relative path.
inline std::string default_trace_shown() {
  const char* env = std::getenv("LOCUS_TRACES");
  return env && *env ? (std::filesystem::path(env) / "esft").string() : std::string("../shared/traces/esft");
}

// Adds --trace to `app`, reading into `path`; `what` says what it takes ("ESFT folder or binary
// trace"). Its default is shown, and the rule behind it (default_trace_rule) is in the description.
inline CLI::Option* add_trace_option(CLI::App& app, std::string& path, const std::string& what) {
  path = default_trace_shown();
  return app.add_option("--trace", path, what + "; " + default_trace_rule);
}

// The default trace by the rule above, or nothing when none of its places holds one. Throws
// locus::io_error when LOCUS_TRACES is set and names no esft: a variable set on purpose is not
// passed over in silence.
inline std::optional<std::string> find_default_trace() {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (const char* env = std::getenv("LOCUS_TRACES"); env && *env) {
    const fs::path p = fs::path(env) / "esft";
    if (fs::exists(p, ec)) return p.string();
    throw locus::io_error("LOCUS_TRACES is " + std::string(env) + ", but " + p.string() +
                          " does not exist; point LOCUS_TRACES at the folder that holds esft/, or give --trace");
  }
  const fs::path relative = "../shared/traces/esft";
  if (fs::exists(relative, ec)) return relative.string();
  const fs::path program = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return std::nullopt;
  for (fs::path dir = program.parent_path(); !dir.empty(); dir = dir.parent_path()) {
    if (const fs::path p = dir / "shared" / "traces" / "esft"; fs::exists(p, ec)) {
      // Relative to the working directory where it can be, so that results files name no machine's folders.
      const fs::path here = fs::current_path(ec);
      const fs::path rel = ec ? fs::path() : p.lexically_proximate(here);
      return rel.empty() ? p.string() : rel.string();
    }
    if (dir == dir.root_path()) break;
  }
  return std::nullopt;
}

// What a run without a trace is told: the places tried and how to give one (`takes`: what --trace takes).
inline std::string no_default_trace(const std::string& takes = "an ESFT folder or a binary trace") {
  std::error_code ec;
  const std::string here = std::filesystem::current_path(ec).string();
  return "no trace: ../shared/traces/esft is not there from the working directory (" + here +
         ") nor shared/traces/esft in any folder above this program; give --trace (" + takes +
         ") or set LOCUS_TRACES to the folder that holds esft/";
}

// Says which trace a run reads by default: the default is searched for, so it may be found
// elsewhere than --help shows.
inline void say_default_trace(const std::string& path) {
  std::fprintf(stderr, "reading the trace %s (the default; --trace reads another)\n", path.c_str());
}

// The trace a run reads: the --trace value when it was given (it must exist), else the default.
// Throws locus::io_error naming the path and how to give one when there is none.
inline std::string trace_to_read(const CLI::Option& opt, const std::string& path) {
  if (opt.count() > 0) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) throw locus::io_error(path + ": no such file or folder (--trace)");
    return path;
  }
  if (auto found = find_default_trace()) {
    say_default_trace(*found);
    return *found;
  }
  throw locus::io_error(no_default_trace());
}

// An ESFT folder (imported) or a binary trace file.
inline locus::trace::trace load_trace(const std::string& path) {
  return std::filesystem::is_directory(path) ? locus::trace::import_esft(path) : locus::trace::read_trace(path);
}

//! `t` with the first `prefill` tokens of every request marked prefill, refused (naming the option)
//! when no request keeps a decode token: the planners' own refusal named a library function.
inline locus::trace::trace with_prefill(const locus::trace::trace& t, std::size_t prefill) {
  std::size_t longest = 0;
  for (std::size_t r = 0; r < t.requests(); ++r)
    longest = std::max<std::size_t>(longest, t.request(r).length);
  if (prefill == 0)
    throw locus::config_error("--prefill-tokens 0 marks no prefill token: the workload model classifies a request "
                              "by its prefill");
  if (prefill >= longest)
    throw locus::config_error("--prefill-tokens " + std::to_string(prefill) +
                              " leaves no decode token: the longest request has " + std::to_string(longest) +
                              " tokens");
  return t.with_prefill_tokens(prefill);
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
  // A build with assertions (Debug) times other code: said, so that its ratios are not read as the product's.
#ifdef NDEBUG
  const char* build = "";
#else
  const char* build = " (a build with assertions: times are not the optimised build's)";
#endif
  return cpu + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores, load average " +
         load.substr(0, load.find(' ', load.find(' ', load.find(' ') + 1) + 1)) + ", " + date + build;
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
    c += " " + tool_cli::shell_quote(argv[i]);
  return c;
}

//! Checks that `path` (a results file) can be written, before the run: its folder exists and takes
//! files, and it is not a folder. Nothing is written; the file is replaced whole at the end.
inline void output_file(const std::string& path) {
  locus::atomic_file probe(path); // never committed: its unnamed temporary goes when it does
}

//! Help text of every benchmark's --out, which output_folder makes.
inline constexpr const char* out_folder_help = "Folder for the results (made, with its parents, if missing)";

//! The results folder `dir`, checked before the run (a folder that cannot be used is said at once, not
//! after the minutes or hours of measuring) and made, with any missing parents, when the first result
//! is written through its file(): a run stopped before (an error, Ctrl-C, a kill) leaves no folder.
//! Keep the object to the end: if no file gets written after all, it removes what it made.
[[nodiscard]] inline tool_cli::results_folder output_folder(const std::string& dir) {
  return tool_cli::results_folder(dir, "results folder");
}

//! Says on stderr that a long part of the run starts (stdout carries only results), so that a run of
//! minutes shows what it is doing: "drift: planning 4x2 (at 3 s)", the seconds since `start`.
inline void progress_line(const char* program, const std::string& what, std::chrono::steady_clock::time_point start) {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%s: %s (at %.0f s)\n", program, what.c_str(), s);
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
