// The `locus` command-line driver: one subcommand per job, each in its own cmd_*.hpp that
// registers itself here. `locus --help` lists them.
#include "cmd_demo.hpp"
#include "cmd_map.hpp"
#include "cmd_plan.hpp"
#include "cmd_trace_import.hpp"
#include "cmd_trace_analysis.hpp"

#include <locus/core/error.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"locus: locality-aware multi-node Mixture-of-Experts tools"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::to_string(LOCUS_VERSION_MAJOR) + "." + std::to_string(LOCUS_VERSION_MINOR) +
                                        "." + std::to_string(LOCUS_VERSION_PATCH));
  locus_driver::register_demo(app);
  locus_driver::register_map(app);
  locus_driver::register_plan(app);
  locus_driver::register_simulate(app);
  // `locus trace <import|stats|synth|report>`: each trace command file adds its subcommands here.
  CLI::App* trace_cmd = app.add_subcommand("trace", "Import, inspect, synthesise and report expert-activation traces");
  trace_cmd->require_subcommand(1);
  locus_driver::register_trace_import(trace_cmd);
  locus_driver::register_trace_analysis(trace_cmd);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const locus::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
