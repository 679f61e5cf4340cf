#pragma once
// Reading a trace named on the command line: a locus binary trace file, an ESFT folder (or one of
// its domain folders), or route JSONL: one or more files or a folder of .jsonl files (experts
// declared by a meta line or --experts; see docs/trace-format.md and docs/byo-trace.md); "-" reads
// standard input, route JSONL or a binary trace.
#include "output.hpp"
#include "tool_cli.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>
#include <string>
#include <vector>

namespace locus_driver {

//! Help text of every option that names a trace to read.
inline constexpr const char* trace_help =
    "Trace: locus binary file, ESFT folder, or route JSONL (a file or a folder of .jsonl files; repeat for several "
    "files, e.g. one per layer); - reads standard input (route JSONL or a binary trace)";
//! Help text of --experts where a trace is read.
inline constexpr const char* experts_help =
    "Experts of a route JSONL trace (default: its meta line's num_experts) or an ESFT folder (default: 64); a "
    "binary trace records its own";
//! The counts an ESFT folder is read with (0: its defaults, 64 experts and top-6), checked as the
//! options name them (the trace builder said "trace: top_k is 6, expected 1..2").
inline void check_esft_counts(std::size_t experts, std::size_t top_k) {
  const std::size_t e = experts ? experts : 64, k = top_k ? top_k : 6;
  if (k <= e) return;
  if (experts)
    LOCUS_THROW(locus::config_error, "--experts ", e, " is fewer than the ", k, " experts each token chooses (",
                top_k ? "--top-k" : "an ESFT folder's top-6", ")");
  LOCUS_THROW(locus::config_error, "--top-k ", k, " exceeds an ESFT folder's 64 experts (--experts gives its count)");
}

//! The values of --experts wherever a trace is read (0: the trace's own count): a usage error before
//! the trace is read (the trace builder refused a larger one as "trace: experts is ...").
inline CLI::Validator experts_range() { return CLI::Range(std::size_t{0}, locus::trace::max_trace_experts); }
//! What --experts shows as its default: the trace's own count (0 is that sentinel, not a count).
inline constexpr const char* experts_default = "the trace's";

//! Help text of --prefill-tokens where a trace is read.
inline constexpr const char* prefill_help =
    "Tokens at the start of each request that are prefill; a trace that records phases keeps them unless this "
    "is given";
//! Help texts of the route-JSONL reading flags.
inline constexpr const char* split_on_restart_help =
    "Route JSONL: start a new request where token_idx restarts (for logs without a usable req_id)";
inline constexpr const char* strict_layers_help =
    "Route JSONL: refuse a request whose layers end at different tokens instead of keeping the tokens every "
    "layer holds";

//! Whether standard input holds a binary trace rather than route JSONL: its first byte is the binary
//! magic's 'L', which no JSON object starts with (a pipe cannot be read twice, so only that byte is
//! looked at, and put back; the binary reader checks the whole magic).
inline bool stdin_holds_binary() {
  const int c = std::getc(stdin);
  if (c == EOF) return false;
  std::ungetc(c, stdin);
  return c == locus::trace::binary_magic[0];
}

//! "esft", "jsonl" or "binary", from what `path` is: a folder holding .jsonl/.ndjson files is route
//! JSONL, any other folder ESFT (a root, or one domain folder); .jsonl, .ndjson and .json files are
//! route JSONL; a file starting with the binary magic is a binary trace; "-" (standard input) is
//! route JSONL, or a binary trace when it starts as one. Any other file is refused, or with
//! `else_binary` taken for a binary trace (whose reader then says what is wrong with it).
inline std::string detect_trace_format(const std::string& path, bool else_binary = false) {
  namespace fs = std::filesystem;
  if (path == "-") return stdin_holds_binary() ? "binary" : "jsonl";
  std::error_code ec;
  const auto st = fs::status(path, ec); // error codes, not exceptions: a symlink loop is an input error
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw locus::io_error(path + ": " + ec.message(), __FILE__, __LINE__, ec.value());
  if (fs::is_directory(st)) {
    for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec))
      if (locus::trace::is_jsonl_name(it->path())) return "jsonl"; // whose reader refuses a part it cannot read
    return "esft";
  }
  if (!fs::exists(st)) {
    // A relative path is read from the current folder, which may not be the one the user had in
    // mind (the README's ../shared/traces/esft exists only beside this project's checkout).
    std::error_code cwd_error;
    const auto cwd = fs::path(path).is_relative() ? fs::current_path(cwd_error) : fs::path();
    throw locus::io_error(path + ": no such file or folder" +
                              (cwd.empty() || cwd_error ? std::string() : " (looked for from " + cwd.string() + ")"),
                          __FILE__, __LINE__);
  }
  const auto ext = fs::path(path).extension().string();
  if (ext == ".jsonl" || ext == ".ndjson" || ext == ".json") return "jsonl";
  // Anything else: a binary trace if it starts with the magic, else say what is accepted.
  char magic[8] = {};
  if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
    const std::size_t got = std::fread(magic, 1, 8, f);
    std::fclose(f);
    if (got == 8 && std::memcmp(magic, locus::trace::binary_magic.data(), 8) == 0) return "binary";
  }
  if (else_binary) return "binary";
  throw locus::invalid_input_error(path + ": cannot tell its format: expected an ESFT folder, a route-JSONL file "
                                          "(.jsonl) or a locus binary trace; pass --format",
                                   __FILE__, __LINE__);
}

//! The format of several inputs read as one trace: only route JSONL can come in several parts.
inline std::string detect_trace_format(const std::vector<std::string>& paths, bool else_binary = false) {
  LOCUS_REQUIRE(!paths.empty(), locus::config_error, "no trace given");
  LOCUS_REQUIRE(std::count(paths.begin(), paths.end(), "-") <= 1, locus::config_error,
                "standard input (-) is given more than once as a trace; it can be read once");
  const std::string first = detect_trace_format(paths.front(), else_binary);
  if (paths.size() == 1) return first;
  for (const auto& p : paths) {
    const std::string f = p == paths.front() ? first : detect_trace_format(p, else_binary);
    LOCUS_REQUIRE(f == "jsonl", locus::config_error, "several traces given, but ", p, " is ",
                  f == "esft" ? "an ESFT folder" : "a binary trace",
                  "; only route JSONL is read from several files (one trace otherwise)");
  }
  return "jsonl";
}

//! Reads a binary trace from the file `path`, or from standard input for "-" (named <stdin> in messages).
inline locus::trace::trace read_binary_trace(const std::string& path) {
  if (path != "-") return locus::trace::read_trace(path);
  // A stream has no size: read as far as the header says the trace goes, and one byte more (extra
  // bytes are the decoder's to refuse). Where the header is not intact (the decoder says why),
  // nothing past it: endless input (/dev/zero) is not buffered.
  std::vector<std::byte> bytes;
  std::uint64_t want = locus::trace::binary_header_bytes;
  bool sized = false;
  for (std::size_t got = 0; got < want;) {
    bytes.resize(static_cast<std::size_t>(std::min<std::uint64_t>(want, got + (std::size_t{1} << 20))));
    const std::size_t n = std::fread(bytes.data() + got, 1, bytes.size() - got, stdin);
    got += n;
    if (n == 0) {
      LOCUS_REQUIRE(!std::ferror(stdin), locus::io_error, "<stdin>: read failed: ", std::strerror(errno));
      bytes.resize(got);
      break;
    }
    if (!sized && got >= locus::trace::binary_header_bytes) {
      sized = true;
      const auto whole = locus::trace::declared_trace_bytes(bytes);
      if (whole && *whole < SIZE_MAX) want = *whole + 1;
    }
  }
  return locus::trace::decode_trace(bytes, "<stdin>");
}

//! How the route-JSONL inputs of a trace are read (other formats ignore it).
struct jsonl_reading {
  std::size_t experts = 0; //!< 0: from the meta line
  //! The command's option that gives `experts`, for the message that asks for it (empty: it has none).
  std::string experts_option = "--experts";
  //! The command's way to cut requests at token_idx restarts, for the messages that advise it.
  std::string split_option = "--split-on-restart";
  bool split_on_restart = false, strict_layers = false;
};

//! One line on stderr when requests were trimmed to the tokens every layer holds (the user should
//! know that some tokens were not read).
inline void note_trimmed(const std::string& what, const locus::trace::jsonl_report& rep) {
  if (rep.trimmed_requests == 0) return;
  std::fprintf(stderr,
               "locus: %s: kept the tokens every layer holds in %s whose layers end at different tokens, dropping "
               "%s (--strict-layers refuses such requests)\n",
               what.c_str(), tool_cli::counted(rep.trimmed_requests, "request").c_str(),
               tool_cli::counted(rep.trimmed_tokens, "token").c_str());
}

//! Says on stderr which sub-folders of an ESFT root were read as no domain (an empty domain folder
//! would otherwise leave its domain out without a word).
inline void note_skipped_folders(const locus::trace::esft_report& rep) {
  for (const auto& f : rep.skipped_folders)
    std::fprintf(stderr, "locus: note: %s holds no expert_weights_<n>.txt file; it is no domain of the trace\n",
                 one_line(f).c_str());
}

//! Reads the trace `paths` name (several only for route JSONL).
inline locus::trace::trace load_trace(const std::vector<std::string>& paths, const jsonl_reading& how = {}) {
  const std::string format = detect_trace_format(paths, true);
  // The route-JSONL reading options given for another format were dropped without a word.
  const std::string shown = paths.front() == "-" ? "<stdin>" : paths.front();
  const char* what = format == "esft" ? "an ESFT folder" : "a binary trace";
  LOCUS_REQUIRE(format == "jsonl" || !how.split_on_restart, locus::config_error,
                "--split-on-restart does not apply to ", shown, ", ", what, " (it reads route JSONL)");
  LOCUS_REQUIRE(format == "jsonl" || !how.strict_layers, locus::config_error, "--strict-layers does not apply to ",
                shown, ", ", what, " (it reads route JSONL)");
  if (format == "esft") {
    check_esft_counts(how.experts, 0);
    locus::trace::esft_options opt;
    if (how.experts) opt.experts = how.experts;
    locus::trace::esft_report rep;
    auto t = locus::trace::import_esft(paths.front(), opt, &rep);
    note_skipped_folders(rep);
    return t;
  }
  // A binary trace records its experts: a count given for it was dropped without a word.
  LOCUS_REQUIRE(how.experts == 0 || format != "binary", locus::config_error, how.experts_option, " ", how.experts,
                " does not apply to ", paths.front() == "-" ? "<stdin>" : paths.front(),
                ", a binary trace (it records its own expert count)");
  if (format == "binary") return read_binary_trace(paths.front());
  locus::trace::jsonl_options opt;
  opt.experts = how.experts;
  opt.settings = {how.experts_option, how.split_option, "reading without --strict-layers",
                  "`locus trace import --skip-bad`"};
  opt.split_on_restart = how.split_on_restart;
  opt.trim_ragged = !how.strict_layers;
  locus::trace::jsonl_report rep;
  auto t = locus::trace::import_jsonl(paths, opt, &rep);
  note_trimmed(paths.size() == 1 ? paths.front() : paths.front() + " ...", rep);
  return t;
}

//! `experts` is the route JSONL trace's expert count (0: from its meta line); other formats ignore it.
inline locus::trace::trace load_trace(const std::string& path, std::size_t experts = 0) {
  jsonl_reading how;
  how.experts = experts;
  return load_trace(std::vector<std::string>{path}, how);
}

//! Whether any token of `t` has a recorded phase (route logs may; ESFT folders do not).
inline bool has_recorded_phases(const locus::trace::trace& t) {
  for (std::size_t i = 0; i < t.tokens(); ++i)
    if (t.token_phase(i) != locus::trace::phase::unknown) return true;
  return false;
}

//! Whether the phases recorded in `t` are used rather than a count of leading prefill tokens: a
//! route log that records phases knows better, unless the user gave the count explicitly.
inline bool keeps_recorded_phases(const locus::trace::trace& t, bool explicit_count) {
  return !explicit_count && has_recorded_phases(t);
}

//! `t` with its prefill tokens marked (see keeps_recorded_phases).
inline locus::trace::trace with_prefill(const locus::trace::trace& t, std::size_t prefill, bool explicit_count) {
  return keeps_recorded_phases(t, explicit_count) ? t : t.with_prefill_tokens(prefill);
}

//! Refuses a test split with nothing to decode (every request within its prefill): a simulation
//! of it would report zeros as if they were results. `subject` and `use` name the trace's role
//! (map replan's window is no test split and simulates nothing).
inline void require_decode_tokens(const locus::trace::trace& test, const std::string& trace_name,
                                  std::size_t prefill_tokens, const char* subject = "the test split of",
                                  const char* use = "to simulate") {
  if (std::ranges::find(test.phases(), locus::trace::phase::decode) != test.phases().end()) return;
  LOCUS_THROW(locus::config_error, subject, " ", trace_name, " has no decode tokens ", use,
              ": every token is prefill (--prefill-tokens ", prefill_tokens,
              " covers each request, or the trace's recorded phases mark none as decode)");
}

//! Refuses a training split in which no request has both prefill and decode tokens where the
//! workload-aware grouping is fitted on it (it learns a request's kind from its prefill and the experts
//! of its decode): said by the option that marks them, not by the grouper's name. `fitted_by` names
//! what fits the grouping.
inline void require_prefill_and_decode(const locus::trace::trace& train, const std::string& trace_name,
                                       std::size_t prefill_tokens, const char* fitted_by) {
  for (std::size_t r = 0; r < train.requests(); ++r) {
    const auto& q = train.request(r);
    // A request's prefill is what precedes its first decode token (the grouper's own rule).
    std::size_t p = 0;
    while (p < q.length && train.token_phase(q.first_token + p) != locus::trace::phase::decode)
      ++p;
    if (p > 0 && p < q.length) return;
  }
  LOCUS_THROW(locus::config_error, "no request of the training split of ", trace_name,
              " has both prefill and decode tokens (--prefill-tokens ", prefill_tokens,
              ", or the trace's recorded phases), and ", fitted_by,
              " learns a request's kind from its prefill and the experts of its decode");
}

} // namespace locus_driver
