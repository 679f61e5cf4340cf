// The `locus` command-line driver: one subcommand per job, each in its own cmd_*.hpp that
// registers itself here. `locus --help` lists them.
#include "cmd_compare.hpp"
#include "cmd_map.hpp"
#include "cmd_plan.hpp"
#include "cmd_trace_analysis.hpp"
#include "cmd_trace_import.hpp"
#include "output.hpp"
#include "tool_cli.hpp"

#include <CLI/CLI.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fcntl.h>
#include <iostream>
#include <locus/core/error.hpp>
#include <new>
#include <string>
#include <string_view>

namespace {

using locus_driver::one_line;

// Exit codes: 0 success, 1 the job failed (bad input, a file that cannot be read or written,
// ...), 2 the command line was wrong (CLI11's own code for parse errors), 3 out of memory,
// 4 an internal error (an exception that is not locus's: a bug to report).
int report(const std::string& message, int code) {
  std::fprintf(stderr, "%s\n", one_line(message).c_str());
  return code;
}

//! The name of the unknown command word where one is given, or the command word missing (`locus
//! map` alone), with the known ones; else empty. CLI11 would answer "A subcommand is required" to
//! both, naming nothing.
std::string unknown_command(const CLI::App& app, int argc, char** argv) {
  const CLI::App* at = &app;
  const auto names_of = [](const CLI::App* a) {
    std::string names;
    for (const CLI::App* sub : a->get_subcommands([](const CLI::App*) { return true; }))
      names += (names.empty() ? "" : ", ") + sub->get_name();
    return names;
  };
  const auto commands_of = [&](const CLI::App* a) {
    return (a == &app ? std::string("commands") : "commands of " + a->get_name()) + ": " + names_of(a);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.empty() || arg[0] == '-') return {}; // options (and everything after them) are CLI11's
    const auto subs = at->get_subcommands([](const CLI::App*) { return true; });
    if (subs.empty()) return {};
    const CLI::App* next = nullptr;
    for (const CLI::App* sub : subs)
      if (sub->get_name() == arg) next = sub;
    if (!next) return "locus: usage error: unknown command \"" + arg + "\" (" + commands_of(at) + "; see --help)";
    at = next;
  }
  if (at->get_require_subcommand_min() > 0)
    return "locus: usage error: " + (at == &app ? std::string("a command") : at->get_name() + " needs a command") +
           (at == &app ? " is required (" : " (") + commands_of(at) + "; see --help)";
  return {};
}

} // namespace

int main(int argc, char** argv) {
  // Standard input, output and error closed by the caller (`locus ... >&-`) are opened on
  // /dev/null: a file opened later would take their number, and what is meant for /dev/stdout
  // (written through descriptor 1) would go into that file.
  for (int fd = 0; fd <= 2; ++fd)
    if (::fcntl(fd, F_GETFD) == -1 && ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) != fd) return 1;
  // A file-size limit (ulimit -f) would kill the process at the write past it; ignored, the write
  // fails with EFBIG instead and the output's error says which file (the old one stays).
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"locus: locality-aware multi-node Mixture-of-Experts tools"};
  app.require_subcommand(1);
  // Every option's --help shows its default; subcommands inherit this when they are added.
  tool_cli::show_defaults(app);
  app.fallthrough(); // --verbose may follow the subcommand
  app.set_version_flag("--version", std::to_string(LOCUS_VERSION_MAJOR) + "." + std::to_string(LOCUS_VERSION_MINOR) +
                                        "." + std::to_string(LOCUS_VERSION_PATCH));
  // Command-line mistakes read like every other failure: one line, "locus: " first.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return one_line(std::string("locus: usage error: ") + e.what() + " (see --help)") + "\n";
  });
  bool verbose = false;
  app.add_flag("--verbose", verbose, "On an error, also print where in the source it was raised");
  // Progress goes to stderr when it is a terminal; --progress asks for it elsewhere (one line per
  // step), -q silences it. Declared in this order so that -q wins over --progress.
  app.add_flag_callback(
      "--progress",
      [] {
        if (locus_driver::progress_setting() != locus_driver::progress_mode::never)
          locus_driver::progress_setting() = locus_driver::progress_mode::always;
      },
      "Print progress on stderr even when it is not a terminal");
  app.add_flag_callback(
      "-q,--quiet", [] { locus_driver::progress_setting() = locus_driver::progress_mode::never; },
      "No progress on stderr");
  locus_driver::this_run() = locus_driver::run_info::capture(argc, argv);
  locus_driver::register_compare(app);
  locus_driver::register_map(app);
  locus_driver::register_plan(app);
  locus_driver::register_simulate(app);
  // `locus trace <import|stats|synth|report>`: each trace command file adds its subcommands here.
  CLI::App* trace_cmd = app.add_subcommand("trace", "Import, inspect, synthesise and report expert-activation traces");
  trace_cmd->require_subcommand(1);
  locus_driver::register_trace_import(trace_cmd);
  locus_driver::register_trace_analysis(trace_cmd);
  // The driver's own flags work after any subcommand too (fallthrough): every help page says so.
  const auto add_footer = [](auto& self, CLI::App* cmd) -> void {
    for (CLI::App* sub : cmd->get_subcommands({})) {
      // trace import has a -q of its own (no summary either).
      const bool own_quiet = sub->get_option_no_throw("-q") != nullptr;
      sub->footer(own_quiet ? "Also after any command: --progress, --verbose (see locus --help)"
                            : "Also after any command: -q,--quiet, --progress, --verbose (see locus --help)");
      self(self, sub);
    }
  };
  add_footer(add_footer, &app);
  if (const std::string unknown = unknown_command(app, argc, argv); !unknown.empty()) return report(unknown, 2);
  if (const std::string unknown = tool_cli::unknown_option(app, argc, argv, "locus"); !unknown.empty())
    return report("locus: usage error: " + unknown, 2);
  // CLI11 reads `--json=` as `--json` alone (stdout): `--json="$OUT"` with OUT unset would print the
  // JSON instead of writing it.
  for (int i = 1; i < argc; ++i)
    if (std::string_view(argv[i]) == "--json=")
      return report("locus: usage error: --json=: an empty value; leave the option out for no JSON (see --help)", 2);
  // Every exception ends here as one line on stderr and an exit code: nothing aborts.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e); // prints the message (or the help text, with rc 0)
    // Help (or --version) that did not reach stdout (`locus --help > /dev/full`) is a failed run
    // too. CLI11 wrote it through std::cout, whose failed write left no errno to report.
    const bool written = rc != 0 || (std::cout.flush() && std::fflush(stdout) == 0 && !std::ferror(stdout));
    if (!written) return report("locus: I/O error: standard output: write failed (the help or version text)", 1);
    return rc == 0 ? 0 : 2;
  } catch (const locus::error& e) {
    std::string msg = std::string("locus: ") + locus::to_string(e.kind()) + ": " + e.message();
    if (verbose && !e.file().empty()) {
      // From the project's include/ or examples/ on (else the file's name): the build machine's
      // folders mean nothing to the reader.
      std::string file = e.file();
      if (const auto at = file.rfind("include/locus/"); at != std::string::npos)
        file.erase(0, at);
      else if (const auto ex = file.rfind("examples/locus/"); ex != std::string::npos)
        file.erase(0, ex);
      else if (const auto slash = file.rfind('/'); slash != std::string::npos)
        file.erase(0, slash + 1);
      msg += " [" + file + ":" + std::to_string(e.line()) + "]";
    }
    return report(msg, 1);
  } catch (const std::bad_alloc&) {
    return report("locus: out of memory (the input or the sizes the options ask for are more than this machine can "
                  "hold)",
                  3);
  } catch (const std::exception& e) {
    return report(std::string("locus: internal error: ") + e.what(), 4);
  } catch (...) {
    return report("locus: internal error: an unknown exception", 4);
  }
  // The tables on stdout are a command's result: one that did not reach it (a full disk under
  // `> results.txt`, a closed pipe) is a failed run, not a silent empty file.
  const bool flushed = std::fflush(stdout) == 0;
  const int e = errno;
  if (!flushed || std::ferror(stdout))
    return report(std::string("locus: I/O error: standard output: write failed") +
                      (flushed ? "" : std::string(": ") + std::strerror(e)) +
                      (locus_driver::files_committed() ? " (the command's files were written)" : ""),
                  1);
  return 0;
}
