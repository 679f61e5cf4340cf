#pragma once
// `locus trace import`: an ESFT folder, a route-JSONL file or a locus binary trace → a locus binary
// trace (docs/trace-format.md).
#include "output.hpp"
#include "split.hpp"
#include "trace_input.hpp"

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>
#include <memory>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

namespace locus_driver {

//! A progress line on stderr that appears only once the work has taken more than a second (short
//! imports stay quiet), is redrawn at most five times a second, and is cleared when done. Shown
//! when every command's progress is (a terminal, or `--progress`; never with the global `-q`).
class import_progress {
public:
  explicit import_progress(std::string what, bool enabled = true)
      : what_(std::move(what)), enabled_(enabled), tty_(::isatty(2) != 0), start_(clock::now()), last_(start_) {
    const auto mode = progress_setting();
    enabled_ = enabled_ && (mode == progress_mode::always || (mode == progress_mode::automatic && tty_));
  }
  ~import_progress() { finish(); }

  //! Reports `done` out of `total` units (`unit` names them, e.g. "files" or "MB").
  void update(double done, double total, const char* unit) {
    if (!enabled_) return;
    const auto now = clock::now();
    if (now - start_ < std::chrono::seconds(1) || now - last_ < std::chrono::milliseconds(tty_ ? 200 : 2000)) return;
    last_ = now;
    const double pct = total > 0 ? 100.0 * done / total : 0.0;
    std::fprintf(stderr, "%s%s: %.0f%% (%.0f of %.0f %s)%s", tty_ ? "\r" : "", what_.c_str(), pct, done, total, unit,
                 tty_ ? "" : "\n");
    std::fflush(stderr);
    shown_ = true;
  }
  void finish() {
    if (shown_ && tty_) std::fprintf(stderr, "\r%*s\r", 60, "");
    shown_ = false;
  }

private:
  using clock = std::chrono::steady_clock;
  std::string what_;
  bool enabled_, tty_;
  clock::time_point start_, last_;
  bool shown_ = false;
};

struct trace_import_options {
  std::vector<std::string> inputs;
  std::string output, format = "auto";
  std::size_t experts = 0, top_k = 0, layers = 0;
  std::vector<std::string> domains;
  bool skip_bad = false, split_on_restart = false, strict_layers = false, verify = false, quiet = false;
  std::string default_domain = "default";
};

inline void run_trace_import(const trace_import_options& o) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string format = o.format == "auto" ? detect_trace_format(o.inputs) : o.format;
  // A binary trace imported onto itself is fine (read whole, then replaced atomically); an ESFT or
  // route-JSONL input would be replaced by its conversion, so it must not be the output.
  check_outputs({{"--out", o.output}}, format == "binary" ? std::vector<std::string>{} : o.inputs);
  LOCUS_REQUIRE(format == "jsonl" || o.inputs.size() == 1, locus::config_error,
                "several inputs given: only route "
                "JSONL is read from several files (--format ",
                format, " reads one)");
  const std::string input = o.inputs.size() == 1 ? o.inputs.front() : o.inputs.front() + " ...";
  // The options of one input format given with another were dropped without a word (a binary
  // trace imported with --layers 5 kept its own 2).
  const bool esft = format == "esft", jsonl = format == "jsonl";
  const std::pair<const char*, bool> format_options[] = {{"--experts", o.experts != 0 && !esft && !jsonl},
                                                         {"--top-k", o.top_k != 0 && !esft && !jsonl},
                                                         {"--layers", o.layers != 0 && !esft && !jsonl},
                                                         {"--domains", !o.domains.empty() && !esft},
                                                         {"--skip-bad", o.skip_bad && !jsonl},
                                                         {"--split-on-restart", o.split_on_restart && !jsonl},
                                                         {"--strict-layers", o.strict_layers && !jsonl},
                                                         {"--default-domain", o.default_domain != "default" && !jsonl}};
  for (const auto& [name, ignored] : format_options)
    LOCUS_REQUIRE(!ignored, locus::config_error, name, " does not apply to ", input, ", ",
                  format == "binary" ? "a binary trace (it is copied as it is)"
                  : esft             ? "an ESFT folder"
                                     : "route JSONL");
  locus::trace::trace t;
  locus::trace::jsonl_report report;
  if (format == "esft") {
    check_esft_counts(o.experts, o.top_k);
    locus::trace::esft_options opt;
    if (o.experts) opt.experts = o.experts;
    if (o.top_k) opt.top_k = o.top_k;
    opt.layers = o.layers;
    opt.domains = detail::name_list(o.domains, "--domains");
    import_progress bar("importing " + input, !o.quiet);
    opt.progress = [&](std::size_t done, std::size_t all) { bar.update(double(done), double(all), "files"); };
    locus::trace::esft_report rep;
    t = locus::trace::import_esft(o.inputs.front(), opt, &rep);
    note_skipped_folders(rep);
  } else if (format == "jsonl") {
    locus::trace::jsonl_options opt;
    opt.experts = o.experts;
    opt.settings = {"--experts", "--split-on-restart", "importing without --strict-layers", "--skip-bad"};
    opt.top_k = o.top_k;
    opt.layers = o.layers;
    opt.skip_bad = o.skip_bad;
    opt.split_on_restart = o.split_on_restart;
    opt.trim_ragged = !o.strict_layers;
    opt.default_domain = o.default_domain;
    import_progress bar("importing " + input, !o.quiet);
    opt.progress = [&](std::uint64_t done, std::uint64_t all) {
      bar.update(double(done) / 1e6, double(all) / 1e6, "MB");
    };
    t = locus::trace::import_jsonl(o.inputs, opt, &report);
  } else if (format == "binary") {
    t = read_binary_trace(o.inputs.front());
  } else {
    throw locus::invalid_input_error("--format " + format + ": expected auto, esft, jsonl or binary", __FILE__,
                                     __LINE__);
  }
  std::error_code ec;
  const bool regular_output = !is_device(o.output) && (!std::filesystem::exists(o.output, ec) ||
                                                       std::filesystem::is_regular_file(o.output, ec));
  LOCUS_REQUIRE(!o.verify || regular_output, locus::config_error, "--verify reads the output back, so ", o.output,
                " must be a regular file");
  locus::trace::write_trace(t, o.output);
  if (o.verify) {
    const auto back = locus::trace::read_trace(o.output);
    if (!(back == t))
      throw locus::format_error(o.output + ": reading the written trace back does not give the imported trace", 0,
                                __FILE__, __LINE__);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (format == "jsonl" && (report.bad_records || report.dropped_requests)) {
    // Messages quote the input (names, JSON text): written safe for a terminal.
    std::fprintf(stderr, "locus: %s: skipped %s and dropped %s; first problems:\n", one_line(input).c_str(),
                 tool_cli::counted(report.bad_records, "bad record").c_str(),
                 tool_cli::counted(report.dropped_requests, "inconsistent request").c_str());
    for (const auto& m : report.messages)
      std::fprintf(stderr, "  %s\n", one_line(m).c_str());
  }
  if (format == "jsonl") {
    note_trimmed(input, report);
    for (std::size_t i = 0; i < report.trimmed_examples.size() && i < 5; ++i)
      std::fprintf(stderr, "  %s\n", one_line(report.trimmed_examples[i]).c_str());
  }
  if (!o.quiet && !stdout_taken({o.output})) {
    std::string doms;
    for (const auto& d : t.domains())
      doms += (doms.empty() ? "" : ", ") + one_line(locus::trace::listed_name(d));
    // A device or FIFO output (-o /dev/null) has no size to report.
    const auto bytes = std::filesystem::file_size(o.output, ec);
    std::printf("%s: %s, %s, %s, %s, top-%zu, domains [%s]; %s bytes, %.2f s%s\n", one_line(o.output).c_str(),
                tool_cli::counted(t.requests(), "request").c_str(), tool_cli::counted(t.tokens(), "token").c_str(),
                tool_cli::counted(t.layers(), "layer").c_str(), tool_cli::counted(t.experts(), "expert").c_str(),
                t.top_k(), doms.c_str(), ec ? "?" : std::to_string(bytes).c_str(), secs, o.verify ? " (verified)" : "");
    if (format == "jsonl")
      std::printf("  %s: %s, %s, %zu skipped (blank or another record type), %zu bad, %s dropped, %s dropped from "
                  "%s\n",
                  tool_cli::counted(report.lines, "line").c_str(),
                  tool_cli::counted(report.route_records, "route record").c_str(),
                  tool_cli::counted(report.meta_lines, "meta line").c_str(), report.skipped_lines, report.bad_records,
                  tool_cli::counted(report.dropped_requests, "request").c_str(),
                  tool_cli::counted(report.trimmed_tokens, "token").c_str(),
                  tool_cli::counted(report.trimmed_requests, "ragged request").c_str());
    if (t.has_request_names())
      std::printf("  requests keep their string req_ids as names (first: %s); --homes, --train-requests and "
                  "--test-requests name them so\n",
                  one_line(t.request_label(0)).c_str());
  }
}

inline void register_trace_import(CLI::App* trace_cmd) {
  auto o = std::make_shared<trace_import_options>();
  auto* cmd = trace_cmd->add_subcommand(
      "import", "Convert an ESFT expert-score folder, a route-JSONL file or a binary trace into a locus binary trace");
  cmd->add_option("input", o->inputs,
                  "ESFT folder (<domain>/expert_weights_<layer>.txt, or one domain folder), binary trace, or route "
                  "JSONL: one or more files or a folder of .jsonl files; - reads standard input (route JSONL or a "
                  "binary trace)")
      ->required();
  cmd->add_option("-o,--out", o->output, "Output binary trace")->required();
  cmd->add_option("--format", o->format,
                  "Input format: auto (folder of .jsonl files or .jsonl = jsonl, other folder "
                  "= esft, magic = binary, - = jsonl or binary by its first byte), esft, jsonl, binary")
      ->check(CLI::IsMember({"auto", "esft", "jsonl", "binary"}));
  cmd->add_option("--experts", o->experts,
                  "Declared routed experts (esft default 64; jsonl: else a meta line's num_experts)")
      ->check(experts_range())
      ->default_str(experts_default);
  cmd->add_option("--top-k", o->top_k, "Experts per token (esft default 6; jsonl: else meta or first record)")
      ->check(CLI::Range(std::size_t{0}, locus::trace::max_trace_top_k))
      ->default_str("the trace's (esft: 6)");
  cmd->add_option("--layers", o->layers,
                  "Expected layers (esft: files per domain; jsonl: distinct layer numbers; 0: no check)");
  cmd->add_option("--domains", o->domains,
                  "esft: domain folders to read, in this order (comma-separated, as plan's --train-domains; "
                  "default: all, sorted)");
  cmd->add_flag("--skip-bad", o->skip_bad, "jsonl: skip and count bad records instead of failing on the first");
  cmd->add_flag("--split-on-restart", o->split_on_restart, split_on_restart_help);
  cmd->add_flag("--strict-layers", o->strict_layers, strict_layers_help);
  cmd->add_option("--default-domain", o->default_domain, "jsonl: domain of requests whose records carry none");
  cmd->add_flag("--verify", o->verify, "Read the written file back and check it equals the imported trace");
  cmd->add_flag("-q,--quiet", o->quiet, "No summary and no progress");
  cmd->callback([o] { run_trace_import(*o); });
}

} // namespace locus_driver
