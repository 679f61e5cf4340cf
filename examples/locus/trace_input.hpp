#pragma once
// Reading a trace named on the command line: a locus binary trace file, an ESFT folder, or a route
// JSONL file (.jsonl / .ndjson; experts declared by a meta line or --experts, see docs/trace-format.md).
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>

#include <filesystem>
#include <string>

namespace locus_driver {

//! Help text of every option that names a trace to read.
inline constexpr const char* trace_help = "Trace: locus binary file, ESFT folder or route JSONL";
//! Help text of --experts where a trace is read.
inline constexpr const char* experts_help = "Experts of a route JSONL trace (default: its meta line's num_experts)";
//! Help text of --prefill-tokens where a trace is read.
inline constexpr const char* prefill_help =
    "Tokens at the start of each request that are prefill; a trace that records phases keeps them unless this "
    "is given";

//! `experts` is the route JSONL trace's expert count (0: from its meta line); other formats ignore it.
inline locus::trace::trace load_trace(const std::string& path, std::size_t experts = 0) {
  std::error_code ec; // error codes, not exceptions: a symlink loop is an input error like any other
  const auto st = std::filesystem::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw locus::io_error(path + ": " + ec.message(), __FILE__, __LINE__, ec.value());
  if (std::filesystem::is_directory(st)) return locus::trace::import_esft(path);
  const auto ext = std::filesystem::path(path).extension();
  if (ext == ".jsonl" || ext == ".ndjson") {
    locus::trace::jsonl_options opt;
    opt.experts = experts;
    return locus::trace::import_jsonl(path, opt);
  }
  return locus::trace::read_trace(path);
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

} // namespace locus_driver
