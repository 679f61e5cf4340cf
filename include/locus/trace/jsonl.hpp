#pragma once
// locus-requires: json
//! @file
//! Importer for route JSONL, the shape vLLM-style routing loggers write: one JSON object per line,
//! one line per token per MoE layer (schema in docs/trace-format.md):
//!
//!     {"req_id": 17, "token_idx": 3, "layer": 5, "topk_ids": [4, 9], "topk_weights": [0.6, 0.4],
//!      "phase": "decode", "step": 0, "domain": "code"}
//!
//! `phase`, `step` and `domain` are optional. A line whose `type` is present and not "route" (for
//! example `{"type": "meta", "num_experts": 64, "top_k": 6}`) is not a route record: it is skipped,
//! and a meta line may declare `num_experts` (or `experts`) and `top_k`. In a route record,
//! `experts` is the list of chosen experts instead (an alias of `topk_ids`). Blank lines are skipped.
//!
//! Lines are streamed from the file in large chunks and each one is parsed straight into compact
//! columns (no JSON DOM per line): by a small lexer for the flat objects route loggers write, which
//! drives the same SAX handler as nlohmann-json does, and by nlohmann-json's SAX parser for any line
//! that lexer does not take (string escapes, nesting, non-ASCII text, literals other than null,
//! malformed JSON), so that every line means the same either way and errors read the same. Requests are then assembled:
//! tokens sorted by `token_idx`, and every layer of a request must hold the same tokens, except
//! that layers may end early (jsonl_options::trim_ragged). Several files (one per layer, or shards)
//! can be read as one log.
//! Every bad record is reported as "file:line: what"; `jsonl_options::skip_bad` chooses between
//! failing on the first one and skipping and counting them (requests left inconsistent by a
//! skipped record are dropped and counted too).

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

//! Options of import_jsonl.
struct jsonl_options {
  //! Declared routed experts; every id must be below it. 0: taken from a meta line
  //! (`num_experts` or `experts`) that precedes the first route record.
  std::size_t experts = 0;
  //! How messages name the settings they advise, as the caller offers them: a command-line tool
  //! gives its own options ("--experts"); an empty name leaves that advice out.
  struct setting_names {
    std::string experts = "jsonl_options::experts";                   //!< gives the expert count
    std::string split_on_restart = "jsonl_options::split_on_restart"; //!< cuts requests at token_idx restarts
    std::string keep_ragged = "jsonl_options::trim_ragged";           //!< keeps requests with ragged layers
    std::string skip_bad = "jsonl_options::skip_bad";                 //!< skips bad records
  } settings;
  //! Experts per token. 0: from a meta line's `top_k`, else the length of the first record's `topk_ids`.
  std::size_t top_k = 0;
  //! Expected number of distinct layer numbers (0: any). Layer numbers need not start at 0: the
  //! distinct values, sorted, become layers 0, 1, ..., and are kept as the trace's model layer ids
  //! (trace::model_layer), which engine exports number layers by.
  std::size_t layers = 0;
  //! false: the first bad record raises locus::format_error. true: bad records are skipped and
  //! counted in jsonl_report, requests they leave inconsistent are dropped and counted.
  bool skip_bad = false;
  //! Reconstruct requests from `token_idx` restarts: within one `req_id` (or among records without
  //! one), a record whose `token_idx` is not above the previous one at the same layer starts a new
  //! request. For loggers that write no `req_id`, or a constant one.
  bool split_on_restart = false;
  //! A request whose layers hold different numbers of tokens, the shorter layers holding the first
  //! tokens of the longer ones (a logger that stopped mid-step), keeps the tokens every layer holds;
  //! the others are dropped and counted in jsonl_report. false: such a request is inconsistent (an
  //! error, or dropped whole with skip_bad).
  bool trim_ragged = true;
  //! Domain of requests whose records carry none.
  std::string default_domain = "default";
  //! Longest line accepted, in bytes (a route record of top-64 takes about 2 KiB; meta lines may
  //! carry more); a longer line is a format error raised before it is buffered, so memory stays
  //! bounded whatever the file holds.
  std::size_t max_line_bytes = std::size_t{16} << 20;
  //! Called now and then with (bytes read, file size); may be empty.
  std::function<void(std::uint64_t, std::uint64_t)> progress;
};

//! What an import saw.
struct jsonl_report {
  std::size_t lines = 0;            //!< lines read
  std::size_t route_records = 0;    //!< route records kept in the trace
  std::size_t meta_lines = 0;       //!< meta records read (the expert count, top-k, model)
  std::size_t skipped_lines = 0;    //!< blank lines and records of other types (stats, ...)
  std::size_t bad_records = 0;      //!< bad records skipped (skip_bad only)
  std::size_t dropped_requests = 0; //!< requests dropped as inconsistent (skip_bad only)
  //! Requests whose layers end at different tokens (jsonl_options::trim_ragged), and the tokens
  //! dropped from them because some layer lacks them.
  std::size_t trimmed_requests = 0, trimmed_tokens = 0;
  //! The first trimmed requests, what was kept and dropped (at most `max_messages`).
  std::vector<std::string> trimmed_examples;
  //! The first problems, "file:line: what" (at most `max_messages`).
  std::vector<std::string> messages;
  static constexpr std::size_t max_messages = 20;
};

namespace detail::trace {

//! One line's fields as the SAX handler collects them.
struct jsonl_fields {
  enum class id_kind : std::uint8_t { none, number, text };
  id_kind req_kind = id_kind::none;
  std::uint64_t req_number = 0;
  std::string req_text;
  bool has_token = false, has_layer = false, has_ids = false, has_weights = false, has_step = false;
  bool has_phase = false, has_domain = false, has_type = false;
  std::uint64_t token_idx = 0, layer = 0;
  std::int64_t step = -1;
  locus::trace::phase ph = locus::trace::phase::unknown;
  std::string domain, type;
  std::vector<std::uint64_t> ids;
  std::vector<double> weights;
  std::uint64_t meta_experts = 0, meta_top_k = 0;
  bool has_meta_experts = false, has_meta_top_k = false;
  // `experts`: a number (a meta line's alias of num_experts) or a list (a route record's alias of
  // topk_ids); which one the line means is known only once its `type` has been read.
  bool has_experts_number = false, has_experts_list = false;
  std::uint64_t experts_number = 0;
  std::vector<std::uint64_t> experts_list;
  std::string error; //!< first problem found while parsing, empty when none

  void clear() {
    req_kind = id_kind::none;
    req_text.clear();
    has_token = has_layer = has_ids = has_weights = has_step = has_phase = has_domain = has_type = false;
    step = -1;
    ph = locus::trace::phase::unknown;
    domain.clear();
    type.clear();
    ids.clear();
    weights.clear();
    meta_experts = meta_top_k = 0;
    has_meta_experts = has_meta_top_k = false;
    has_experts_number = has_experts_list = false;
    experts_number = 0;
    experts_list.clear();
    error.clear();
  }
};

//! SAX handler: fills jsonl_fields from one object; unknown keys (of any type) are ignored.
class jsonl_sax {
public:
  using json = nlohmann::json;
  using number_integer_t = json::number_integer_t;
  using number_unsigned_t = json::number_unsigned_t;
  using number_float_t = json::number_float_t;
  using string_t = json::string_t;
  using binary_t = json::binary_t;

  explicit jsonl_sax(jsonl_fields& f) : f_(f) {}

  bool null() {
    // An optional field written as null is absent.
    if (depth_ == 1 && (field_ == field::req_id || field_ == field::phase || field_ == field::step ||
                        field_ == field::domain || field_ == field::type))
      return true;
    return scalar("null");
  }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(number_integer_t v) {
    if (v >= 0) return number_unsigned(static_cast<number_unsigned_t>(v));
    if (depth_ == 1 && field_ == field::step) {
      f_.has_step = true;
      f_.step = v;
      return true;
    }
    if (depth_ == 2 && field_ == field::weights) {
      f_.weights.push_back(static_cast<double>(v));
      return true;
    }
    return scalar_number("a negative number");
  }
  bool number_unsigned(number_unsigned_t v) {
    if (depth_ == 0) return wrong_type_top("a number");
    if (depth_ == 1) {
      switch (field_) {
      case field::req_id:
        f_.req_kind = jsonl_fields::id_kind::number;
        f_.req_number = v;
        return true;
      case field::token_idx:
        f_.has_token = true;
        f_.token_idx = v;
        return true;
      case field::layer:
        f_.has_layer = true;
        f_.layer = v;
        return true;
      case field::step:
        f_.has_step = true;
        f_.step = v > static_cast<number_unsigned_t>(std::numeric_limits<std::int64_t>::max())
                      ? std::numeric_limits<std::int64_t>::max()
                      : static_cast<std::int64_t>(v);
        return true;
      case field::meta_experts:
        f_.has_meta_experts = true;
        f_.meta_experts = v;
        return true;
      case field::meta_top_k:
        f_.has_meta_top_k = true;
        f_.meta_top_k = v;
        return true;
      case field::experts:
        f_.has_experts_number = true;
        f_.experts_number = v;
        return true;
      case field::weights:
      case field::ids:
      case field::phase:
      case field::domain:
      case field::type: return wrong_type("a number");
      case field::other: return true;
      }
    }
    if (depth_ == 2 && field_ == field::ids) {
      push(f_.ids, v);
      return true;
    }
    if (depth_ == 2 && field_ == field::experts) {
      push(f_.experts_list, v);
      return true;
    }
    if (depth_ == 2 && field_ == field::weights) {
      push(f_.weights, static_cast<double>(v));
      return true;
    }
    return true;
  }
  bool number_float(number_float_t v, const string_t& text) {
    if (depth_ == 2 && field_ == field::weights) {
      push(f_.weights, v);
      return true;
    }
    // nlohmann-json reads an integer beyond 2^64-1 as a float: call it what it is. Written with a
    // point or an exponent (3.0, 1e3), it is a float whatever its value.
    const bool written_whole = text.find_first_of(".eE") == string_t::npos;
    return scalar_number(written_whole        ? "an integer beyond 2^64-1"
                         : std::floor(v) == v ? "a number written with a point or an exponent (expected digits only)"
                                              : "a fractional number");
  }
  bool string(string_t& s) {
    if (depth_ == 0) return wrong_type_top("a string");
    if (depth_ == 1) {
      switch (field_) {
      case field::req_id:
        f_.req_kind = jsonl_fields::id_kind::text;
        f_.req_text = s;
        return true;
      case field::domain:
        // An empty name is no name (a logger's "unknown"), as null is: a domain named "" could be
        // neither listed nor selected.
        f_.has_domain = !s.empty();
        f_.domain = s;
        return true;
      case field::type:
        f_.has_type = true;
        f_.type = s;
        return true;
      case field::phase:
        f_.has_phase = true;
        if (s == "prefill")
          f_.ph = locus::trace::phase::prefill;
        else if (s == "decode")
          f_.ph = locus::trace::phase::decode;
        else
          note(locus::detail::concat("\"phase\" is \"", s.substr(0, 32), "\", expected \"prefill\" or \"decode\""));
        return true;
      case field::other: return true;
      default: return wrong_type("a string");
      }
    }
    if (depth_ == 2 && (is_list(field_) || field_ == field::weights)) return wrong_type("a string");
    return true;
  }
  bool binary(binary_t&) { return true; }
  bool start_object(std::size_t) {
    if ((depth_ == 1 || depth_ == 2) && field_ != field::other) wrong_type("an object");
    ++depth_;
    if (depth_ == 1) {
      field_ = field::other;
      seen_ = 0;
    }
    return true;
  }
  bool end_object() {
    --depth_;
    return true;
  }
  bool key(string_t& k) {
    if (depth_ != 1) return true;
    field_ = field_of(k);
    // A JSON parser keeps one of two equal keys (nlohmann: the last), so a record that names a
    // field twice says two things: refused, not read as either.
    if (field_ != field::other) {
      const auto bit = 1u << static_cast<unsigned>(field_);
      if (seen_ & bit) note(locus::detail::concat("\"", name(field_), "\" appears twice"));
      seen_ |= bit;
    }
    if (field_ == field::ids) {
      f_.ids.clear();
      f_.has_ids = false;
    }
    if (field_ == field::weights) {
      f_.weights.clear();
      f_.has_weights = false;
    }
    if (field_ == field::experts) {
      f_.experts_list.clear();
      f_.has_experts_list = f_.has_experts_number = false;
    }
    return true;
  }
  bool start_array(std::size_t) {
    if (depth_ == 0) return wrong_type_top("an array");
    if (depth_ == 1) {
      if (field_ == field::ids)
        f_.has_ids = true;
      else if (field_ == field::weights)
        f_.has_weights = true;
      else if (field_ == field::experts)
        f_.has_experts_list = true;
      else if (field_ != field::other)
        wrong_type("an array");
    } else if (depth_ == 2 && (is_list(field_) || field_ == field::weights)) {
      wrong_type("a nested array");
    }
    ++depth_;
    return true;
  }
  bool end_array() {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) {
    std::string what = ex.what();
    // nlohmann's message starts with "[json.exception.parse_error.101] parse error at line 1, column N: ".
    const auto colon = what.find(": ", what.find("column"));
    if (colon != std::string::npos) what = what.substr(colon + 2);
    note(locus::detail::concat("invalid JSON at column ", position, ": ", what));
    return false;
  }

private:
  enum class field : std::uint8_t {
    other,
    req_id,
    token_idx,
    layer,
    ids,
    weights,
    phase,
    step,
    domain,
    type,
    meta_experts,
    meta_top_k,
    experts
  };
  static_assert(static_cast<unsigned>(field::experts) < 32, "seen_ holds a bit per field");
  //! A list of expert ids: `topk_ids`, or `experts` written as a list.
  static bool is_list(field k) { return k == field::ids || k == field::experts; }

  // The field a top-level key names (by length first: this runs for every key of every line).
  static field field_of(std::string_view k) {
    switch (k.size()) {
    case 4: return k == "step" ? field::step : k == "type" ? field::type : field::other;
    case 5:
      return k == "layer"   ? field::layer
             : k == "phase" ? field::phase
             : k == "top_k" ? field::meta_top_k
                            : field::other;
    case 6: return k == "req_id" ? field::req_id : k == "domain" ? field::domain : field::other;
    case 7: return k == "experts" ? field::experts : field::other;
    case 8: return k == "topk_ids" ? field::ids : field::other;
    case 9: return k == "token_idx" ? field::token_idx : field::other;
    case 11: return k == "num_experts" ? field::meta_experts : field::other;
    case 12: return k == "topk_weights" ? field::weights : field::other;
    default: return field::other;
    }
  }

  void note(std::string what) {
    if (f_.error.empty()) f_.error = std::move(what);
  }
  static const char* name(field k) {
    switch (k) {
    case field::req_id: return "req_id";
    case field::token_idx: return "token_idx";
    case field::layer: return "layer";
    case field::ids: return "topk_ids";
    case field::weights: return "topk_weights";
    case field::phase: return "phase";
    case field::step: return "step";
    case field::domain: return "domain";
    case field::type: return "type";
    case field::meta_experts: return "num_experts";
    case field::meta_top_k: return "top_k";
    case field::experts: return "experts";
    case field::other: break;
    }
    return "?";
  }
  static const char* expected(field k) {
    switch (k) {
    case field::req_id: return "a non-negative integer or a string";
    case field::token_idx:
    case field::layer:
    case field::meta_experts:
    case field::meta_top_k: return "a non-negative integer";
    case field::ids: return "an array of non-negative integers";
    case field::weights: return "an array of numbers";
    case field::phase: return "\"prefill\" or \"decode\"";
    case field::step: return "an integer";
    case field::domain:
    case field::type: return "a string";
    case field::experts:
      return "an array of non-negative integers (route record: the chosen experts) or a non-negative integer "
             "(meta line: the number of experts)";
    case field::other: break;
    }
    return "?";
  }
  bool wrong_type(const char* got) {
    note(locus::detail::concat("\"", name(field_), "\" is ", got, ", expected ", expected(field_)));
    return true; // keep parsing: the line is bad either way, and the first problem is what is reported
  }
  bool wrong_type_top(const char* got) {
    note(locus::detail::concat("the line is ", got, ", expected a JSON object"));
    return false;
  }
  bool scalar(const char* got) {
    if (depth_ == 0) return wrong_type_top(got);
    if ((depth_ == 1 && field_ != field::other) || (depth_ == 2 && (is_list(field_) || field_ == field::weights)))
      return wrong_type(got);
    return true;
  }
  bool scalar_number(const char* got) {
    if (depth_ == 0) return wrong_type_top("a number");
    if (depth_ == 1 && field_ != field::other) return wrong_type(got);
    if (depth_ == 2 && is_list(field_)) return wrong_type(got);
    return true;
  }

  //! Arrays longer than any top-k are bad anyway; stop collecting them so memory stays bounded.
  template <class T>
  void push(std::vector<T>& v, T x) {
    if (v.size() <= max_trace_top_k) v.push_back(x);
  }

  jsonl_fields& f_;
  int depth_ = 0;
  field field_ = field::other;
  std::uint32_t seen_ = 0; //!< the fields this record has named (bit per field)
};

//! Lexer for the common shape of a route record: one object whose values are numbers, strings
//! without escapes, null, or arrays of those, with ASCII text. It calls `Sax` exactly as
//! nlohmann::json::sax_parse would for such a line (numbers are converted the same way: integers
//! exactly, fractions correctly rounded). It returns false as soon as the line leaves that shape,
//! is malformed, or a callback declines; the caller then parses the line with nlohmann-json from
//! scratch (after clearing what the handler collected).
template <class Sax>
class flat_record_lexer {
public:
  flat_record_lexer(std::string_view text, Sax& sax) : p_(text.data()), end_(text.data() + text.size()), sax_(sax) {}

  bool run() {
    ws();
    if (!eat('{') || !sax_.start_object(std::size_t(-1))) return false;
    const bool members = items('}', [&] {
      std::string_view k;
      if (!text(k)) return false;
      key_.assign(k);
      if (!sax_.key(key_)) return false;
      ws();
      if (!eat(':')) return false;
      ws();
      return value(true);
    });
    if (!members || !sax_.end_object()) return false;
    ws();
    return p_ == end_;
  }

private:
  void ws() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r'))
      ++p_;
  }
  bool eat(char c) {
    if (p_ == end_ || *p_ != c) return false;
    ++p_;
    return true;
  }
  // Comma-separated items up to `close` (the opening bracket already read).
  template <class Item>
  bool items(char close, Item&& item) {
    ws();
    if (eat(close)) return true;
    for (;;) {
      if (!item()) return false;
      ws();
      if (!eat(',')) return eat(close);
      ws();
    }
  }
  // A string of printable ASCII without escapes (anything else goes to nlohmann-json).
  bool text(std::string_view& out) {
    if (!eat('"')) return false;
    const char* begin = p_;
    while (p_ != end_ && *p_ != '"') {
      const auto c = static_cast<unsigned char>(*p_);
      if (c < 0x20 || c >= 0x80 || c == '\\') return false;
      ++p_;
    }
    if (p_ == end_) return false;
    out = std::string_view(begin, static_cast<std::size_t>(p_ - begin));
    ++p_;
    return true;
  }
  bool value(bool array_allowed) {
    if (p_ == end_) return false;
    switch (*p_) {
    case '"': {
      std::string_view v;
      if (!text(v)) return false;
      str_.assign(v);
      return sax_.string(str_);
    }
    case '[': {
      if (!array_allowed) return false;
      ++p_;
      if (!sax_.start_array(std::size_t(-1))) return false;
      return items(']', [&] { return value(false); }) && sax_.end_array();
    }
    case 'n':
      if (end_ - p_ < 4 || std::string_view(p_, 4) != "null") return false;
      p_ += 4;
      return sax_.null();
    default: return number();
    }
  }
  // JSON number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  bool number() {
    const char* begin = p_;
    const bool negative = eat('-');
    if (p_ == end_ || *p_ < '0' || *p_ > '9') return false;
    if (*p_ == '0')
      ++p_;
    else
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9')
        ++p_;
    bool fraction = false;
    if (p_ != end_ && *p_ == '.') {
      ++p_;
      if (!digits()) return false;
      fraction = true;
    }
    if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ != end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (!digits()) return false;
      fraction = true;
    }
    if (fraction) {
      double v = 0;
      const auto r = std::from_chars(begin, p_, v);
      if (r.ec != std::errc() || r.ptr != p_ || !std::isfinite(v)) return false;
      return sax_.number_float(v, float_text_);
    }
    if (negative) {
      std::int64_t v = 0;
      const auto r = std::from_chars(begin, p_, v);
      if (r.ec != std::errc() || r.ptr != p_) return false;
      return sax_.number_integer(v);
    }
    std::uint64_t v = 0;
    const auto r = std::from_chars(begin, p_, v);
    if (r.ec != std::errc() || r.ptr != p_) return false;
    return sax_.number_unsigned(v);
  }
  bool digits() {
    const char* begin = p_;
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9')
      ++p_;
    return p_ != begin;
  }

  const char* p_;
  const char* end_;
  Sax& sax_;
  std::string key_, str_;
  // The number's text for number_float, which reads only whether it has a point or an exponent:
  // here it always has one (an integer out of range falls back to nlohmann-json, which passes
  // the real text).
  const std::string float_text_ = ".";
};

//! Accumulates records, then assembles the trace.
class jsonl_importer {
public:
  jsonl_importer(std::string name, const jsonl_options& opt, jsonl_report& rep)
      : name_(name), opt_(opt), rep_(rep), experts_(opt.experts), top_k_(opt.top_k) {
    files_.push_back(std::move(name));
  }

  //! The lines that follow come from another file, named `name` in messages (they count from 1 again).
  void next_file(std::string name) {
    LOCUS_REQUIRE(files_.size() < max_files, invalid_input_error, "more than ", max_files, " route-JSONL files");
    name_ = name;
    files_.push_back(std::move(name));
  }

  //! Feeds one line (without its newline); `line_no` is 1-based.
  void line(std::string_view text, std::uint64_t line_no) {
    ++rep_.lines;
    if (text.size() && text.back() == '\r') text.remove_suffix(1);
    if (text.find_first_not_of(" \t") == std::string_view::npos) {
      ++rep_.skipped_lines;
      return;
    }
    // nlohmann-json takes a NUL byte for the end of its input: what follows one was never read.
    if (const auto nul = text.find('\0'); nul != std::string_view::npos)
      return bad(line_no, locus::detail::concat("a NUL byte at column ", nul + 1, " (not text: a binary file?)"));
    f_.clear();
    bool ok = false;
    {
      jsonl_sax sax(f_);
      ok = flat_record_lexer<jsonl_sax>(text, sax).run();
    }
    if (!ok) { // not the common shape, or not valid: nlohmann-json decides, from a clean slate
      f_.clear();
      jsonl_sax sax(f_);
      ok = nlohmann::json::sax_parse(text.begin(), text.end(), &sax, nlohmann::json::input_format_t::json,
                                     /*strict=*/true);
    }
    if (!ok || !f_.error.empty()) {
      std::string what = f_.error.empty() ? "invalid JSON" : f_.error;
      if (what.find("invalid JSON") == 0 &&
          (text.find("NaN") != std::string_view::npos || text.find("Infinity") != std::string_view::npos))
        what = "a weight is NaN or Infinity (not finite; " + what + ")";
      // A line that only opens an object or array starts a JSON document spread over lines (a map,
      // a plan, a config): say so, rather than what the parser missed at the line's end.
      if (what.find("invalid JSON") == 0 && line_no == 1) {
        const auto first = text.find_first_not_of(" \t"), last = text.find_last_not_of(" \t");
        const std::string_view opening = text.substr(first, last - first + 1);
        if (opening == "{" || opening == "[" || (opening.front() == '{' && opening.back() == ','))
          what += " (this looks like one JSON document spread over several lines, not route JSONL, which holds "
                  "one JSON object per line)";
      }
      bad(line_no, what);
      return;
    }
    if (f_.has_type && f_.type != "route") {
      if (f_.type == "meta") {
        // In a meta line `experts` is the number of experts, an alias of num_experts.
        if (f_.has_experts_list)
          return bad_meta(line_no, "\"experts\" in a meta line is the number of experts (an alias of num_experts), got "
                                   "an array");
        if (f_.has_experts_number) {
          if (f_.has_meta_experts && f_.meta_experts != f_.experts_number)
            return bad_meta(line_no, locus::detail::concat("\"experts\" ", f_.experts_number, " and \"num_experts\" ",
                                                           f_.meta_experts, " disagree"));
          f_.has_meta_experts = true;
          f_.meta_experts = f_.experts_number;
        }
        meta(line_no);
        ++rep_.meta_lines;
        return;
      }
      ++rep_.skipped_lines;
      return;
    }
    // In a route record `experts` is the list of chosen experts, an alias of topk_ids.
    if (f_.has_experts_number)
      return bad(line_no, "\"experts\" in a route record is the list of chosen experts (an alias of topk_ids), got "
                          "a number; declare the number of experts with a meta line's num_experts (or --experts)");
    if (f_.has_experts_list) {
      if (f_.has_ids)
        return bad(line_no, "both \"topk_ids\" and \"experts\" (its alias) are given; give the chosen experts once");
      f_.ids.swap(f_.experts_list);
      f_.has_ids = true;
    }
    route(line_no);
  }

  locus::trace::trace finish() {
    if (rep_.lines == 0)
      throw format_error(locus::detail::concat(name_, " is empty: no route record (a route record has req_id, "
                                                      "token_idx, layer, topk_ids and topk_weights)"),
                         0, __FILE__, __LINE__);
    if (records_ == 0 && rep_.bad_records == 0)
      throw format_error(locus::detail::concat(name_, ": no route record (a route record has req_id, token_idx, "
                                                      "layer, topk_ids and topk_weights)"),
                         0, __FILE__, __LINE__);
    if (records_ == 0)
      throw format_error(
          locus::detail::concat(name_, ": every route record was bad (", rep_.bad_records,
                                " skipped); first: ", rep_.messages.empty() ? std::string("?") : rep_.messages.front()),
          0, __FILE__, __LINE__);
    // Dense layer numbers.
    std::vector<std::uint64_t> layer_values;
    for (const auto& [v, _] : layer_index_)
      layer_values.push_back(v);
    std::sort(layer_values.begin(), layer_values.end());
    if (opt_.layers != 0 && layer_values.size() != opt_.layers)
      throw format_error(locus::detail::concat(name_, ": ", layer_values.size(), " distinct layer numbers (",
                                               layer_values.front(), "..", layer_values.back(), "), expected ",
                                               opt_.layers),
                         0, __FILE__, __LINE__);
    const std::size_t layers = layer_values.size();
    std::vector<std::uint32_t> dense(layer_values.size());
    for (std::size_t i = 0; i < layers; ++i)
      dense[layer_index_.at(layer_values[i])] = static_cast<std::uint32_t>(i);

    // Records sorted by (request, layer, token_idx); the file order breaks ties so that a
    // duplicate is reported at its second line.
    std::vector<std::uint32_t> order(records_);
    std::iota(order.begin(), order.end(), 0u);
    std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
      if (req_[a] != req_[b]) return req_[a] < req_[b];
      if (dense[layer_[a]] != dense[layer_[b]]) return dense[layer_[a]] < dense[layer_[b]];
      if (token_[a] != token_[b]) return token_[a] < token_[b];
      return a < b;
    });

    for (auto& m : request_meta_)
      if (m.domain == no_domain) m.domain = domain_of(opt_.default_domain);
    const std::size_t k = top_k_;
    trace_builder b(experts_, k, layers);
    b.set_domains(domain_names_);
    // The logged numbers are the model's layer ids (engines number their layers so, dense ones
    // included): kept, so that a map planned on this log is exported for the layers it was logged
    // at. Numbers 0, 1, ... are the default ids and need no table.
    if (layer_values.back() != layers - 1)
      b.set_model_layers(std::vector<std::uint32_t>(layer_values.begin(), layer_values.end()));
    std::size_t i = 0;
    while (i < order.size()) {
      const std::uint32_t r = req_[order[i]];
      std::size_t end = i;
      while (end < order.size() && req_[order[end]] == r)
        ++end;
      if (!add_request(b, r, order, i, end, dense, layers, layer_values)) ++rep_.dropped_requests;
      i = end;
    }
    if (b.requests() == 0)
      throw format_error(locus::detail::concat(name_, ": every request was dropped as inconsistent; first: ",
                                               rep_.messages.empty() ? std::string("?") : rep_.messages.front()),
                         0, __FILE__, __LINE__);
    return b.build();
  }

private:
  //! " (<setting> <does>)", or nothing where the caller names no such setting.
  static std::string advice(const std::string& setting, const char* does) {
    return setting.empty() ? std::string() : locus::detail::concat(" (", setting, does, ")");
  }

  void bad(std::uint64_t line_no, const std::string& what) {
    const std::string msg = locus::detail::concat(name_, ":", line_no, ": ", what);
    if (!opt_.skip_bad)
      throw format_error(msg + advice(opt_.settings.skip_bad, " skips bad records and counts them"), line_no, __FILE__,
                         __LINE__);
    ++rep_.bad_records;
    if (rep_.messages.size() < jsonl_report::max_messages) rep_.messages.push_back(msg);
  }
  //! A meta line that cannot be taken: never skipped, since it declares how every record is read
  //! (skipping a conflicting one would let the first declaration win without a word).
  [[noreturn]] void bad_meta(std::uint64_t line_no, const std::string& what) {
    throw format_error(locus::detail::concat(name_, ":", line_no, ": ", what, " (a meta line)"), line_no, __FILE__,
                       __LINE__);
  }
  //! `where`: a location (loc()).
  void inconsistent(std::uint64_t where, const std::string& what) {
    const std::string msg = locus::detail::concat(files_[where >> line_bits], ":", where & line_mask, ": ", what);
    if (!opt_.skip_bad)
      throw format_error(msg + advice(opt_.settings.skip_bad, " drops such a request and counts it"), where & line_mask,
                         __FILE__, __LINE__);
    if (rep_.messages.size() < jsonl_report::max_messages) rep_.messages.push_back(msg + " (request dropped)");
  }

  void meta(std::uint64_t line_no) {
    // A value the options set wins over meta lines; two meta lines must not disagree.
    if (f_.has_meta_experts) {
      if (meta_experts_line_ && f_.meta_experts != meta_experts_)
        return bad_meta(line_no, locus::detail::concat("num_experts ", f_.meta_experts, " conflicts with num_experts ",
                                                       meta_experts_, " declared at ", place(meta_experts_line_)));
      if (f_.meta_experts < 1 || f_.meta_experts > max_trace_experts)
        return bad_meta(line_no,
                        locus::detail::concat("num_experts is ", f_.meta_experts, ", expected 1..", max_trace_experts));
      if (experts_ == 0 && (records_ > 0 || rep_.bad_records > 0))
        return bad_meta(line_no, "a meta line declaring num_experts must precede the first route record");
      meta_experts_ = f_.meta_experts;
      meta_experts_line_ = loc(line_no);
      if (opt_.experts == 0) experts_ = f_.meta_experts;
    }
    if (f_.has_meta_top_k) {
      if (meta_top_k_line_ && f_.meta_top_k != meta_top_k_)
        return bad_meta(line_no, locus::detail::concat("top_k ", f_.meta_top_k, " conflicts with top_k ", meta_top_k_,
                                                       " declared at ", place(meta_top_k_line_)));
      const std::size_t most = experts_ ? std::min<std::size_t>(max_trace_top_k, experts_) : max_trace_top_k;
      if (f_.meta_top_k < 1 || f_.meta_top_k > most)
        return bad_meta(line_no,
                        locus::detail::concat("top_k is ", f_.meta_top_k, ", expected 1..", most,
                                              experts_ ? locus::detail::concat(" (", experts_, " experts)") : ""));
      if (opt_.top_k == 0 && top_k_ != 0 && top_k_ != f_.meta_top_k)
        return bad_meta(line_no, locus::detail::concat("top_k ", f_.meta_top_k, " conflicts with the ", top_k_,
                                                       " experts per token of the records before it"));
      meta_top_k_ = f_.meta_top_k;
      meta_top_k_line_ = loc(line_no);
      if (opt_.top_k == 0) top_k_ = f_.meta_top_k;
    }
  }

  void route(std::uint64_t line_no) {
    const char* missing = !f_.has_token     ? "token_idx"
                          : !f_.has_layer   ? "layer"
                          : !f_.has_ids     ? "topk_ids"
                          : !f_.has_weights ? "topk_weights"
                                            : nullptr;
    if (missing) return bad(line_no, locus::detail::concat("route record lacks \"", missing, "\""));
    if (f_.req_kind == jsonl_fields::id_kind::none && !opt_.split_on_restart)
      return bad(line_no, locus::detail::concat("route record lacks \"req_id\"",
                                                advice(opt_.settings.split_on_restart,
                                                       " reconstructs requests from token_idx restarts")));
    // A string kept as a request's name must be one (reconstructed requests keep none).
    if (f_.req_kind == jsonl_fields::id_kind::text && !opt_.split_on_restart &&
        (f_.req_text.empty() || f_.req_text.size() > max_trace_request_name))
      return bad(line_no, locus::detail::concat("req_id is a string of ", f_.req_text.size(), " bytes, expected 1..",
                                                max_trace_request_name));
    // Strings are numbered 0, 1, ... and numbers kept: a log of both would give two requests one id.
    if (f_.req_kind != jsonl_fields::id_kind::none && !opt_.split_on_restart) {
      if (id_kind_line_ == 0) {
        id_kind_ = f_.req_kind;
        id_kind_line_ = loc(line_no);
      } else if (f_.req_kind != id_kind_) {
        const bool text = f_.req_kind == jsonl_fields::id_kind::text;
        return bad(line_no, locus::detail::concat("req_id is a ", text ? "string" : "number", " here and a ",
                                                  text ? "number" : "string", " at ", place(id_kind_line_),
                                                  ": a log's req_ids are all numbers or all strings"));
      }
    }
    if (experts_ == 0)
      throw invalid_input_error(
          locus::detail::concat(name_, ":", line_no,
                                ": the number of experts is not declared: put a meta line with num_experts "
                                "before the route records",
                                opt_.settings.experts.empty() ? std::string()
                                                              : ", or give the count with " + opt_.settings.experts),
          __FILE__, __LINE__);
    if (top_k_ > experts_)
      throw invalid_input_error(locus::detail::concat(name_, ":", line_no, ": top_k ", top_k_, " exceeds the ",
                                                      experts_, " declared experts"),
                                __FILE__, __LINE__);
    if (top_k_ == 0) {
      if (f_.ids.empty() || f_.ids.size() > max_trace_top_k || f_.ids.size() > experts_)
        return bad(line_no, locus::detail::concat("topk_ids has ", entries(f_.ids), " entries, expected 1..",
                                                  std::min<std::size_t>(max_trace_top_k, experts_)));
      top_k_ = f_.ids.size();
    }
    if (f_.ids.size() != top_k_)
      return bad(line_no,
                 locus::detail::concat("topk_ids has ", entries(f_.ids), " entries, expected top_k = ", top_k_));
    if (f_.weights.size() != top_k_)
      return bad(line_no, locus::detail::concat("topk_weights has ", entries(f_.weights),
                                                " entries, expected top_k = ", top_k_));
    for (std::size_t j = 0; j < top_k_; ++j) {
      if (f_.ids[j] >= experts_)
        return bad(line_no,
                   locus::detail::concat("topk_ids[", j, "] = ", f_.ids[j], " is out of range [0, ", experts_, ")"));
      for (std::size_t i = 0; i < j; ++i)
        if (f_.ids[i] == f_.ids[j])
          return bad(line_no, locus::detail::concat("topk_ids chooses expert ", f_.ids[j], " twice"));
      const auto w = static_cast<float>(f_.weights[j]);
      if (!std::isfinite(w))
        return bad(line_no,
                   locus::detail::concat("topk_weights[", j, "] = ", f_.weights[j], " is not finite (as a float)"));
      if (w < 0)
        return bad(line_no, locus::detail::concat("topk_weights[", j, "] = ", f_.weights[j],
                                                  " is negative (a routing weight is >= 0)"));
    }
    if (f_.token_idx > 0xfffffffeull)
      return bad(line_no, locus::detail::concat("token_idx ", f_.token_idx, " exceeds 2^32-2"));
    if (f_.layer > 0xffffffffull) return bad(line_no, locus::detail::concat("layer ", f_.layer, " exceeds 2^32-1"));
    if (f_.has_step && (f_.step < -1 || f_.step > std::numeric_limits<std::int32_t>::max()))
      return bad(line_no, locus::detail::concat("step ", f_.step, " is outside -1..2^31-1"));

    // Request key: the req_id, plus the restart segment when reconstructing.
    std::string key;
    switch (f_.req_kind) {
    case jsonl_fields::id_kind::none: key = "n"; break;
    case jsonl_fields::id_kind::number: key = "#" + std::to_string(f_.req_number); break;
    case jsonl_fields::id_kind::text: key = "s" + f_.req_text; break;
    }
    auto lit = layer_index_.find(f_.layer);
    if (lit == layer_index_.end()) {
      if (layer_index_.size() >= 0xffffu)
        return bad(line_no, locus::detail::concat("layer ", f_.layer, " would be distinct layer number 65536"));
      lit = layer_index_.emplace(f_.layer, static_cast<std::uint32_t>(layer_index_.size())).first;
    }
    if (opt_.split_on_restart) {
      auto& s = segments_[key + '\x1f' + std::to_string(f_.layer)];
      if (s.seen && f_.token_idx <= s.last) ++s.segment;
      s.seen = true;
      s.last = f_.token_idx;
      key += '\x1f' + std::to_string(s.segment);
    }
    if (f_.has_domain && f_.domain.size() > max_trace_domain_name)
      return bad(line_no, locus::detail::concat("a domain name of ", f_.domain.size(), " bytes, expected at most ",
                                                max_trace_domain_name));
    auto rit = request_index_.find(key);
    if (rit == request_index_.end()) {
      request_meta m;
      m.id = (f_.req_kind == jsonl_fields::id_kind::number && !opt_.split_on_restart) ? f_.req_number
                                                                                      : request_meta_.size();
      m.domain = f_.has_domain ? domain_of(f_.domain) : no_domain;
      m.first_line = loc(line_no);
      // A string id is kept as the request's name (reconstructed requests have none: one string
      // then names several requests).
      if (f_.req_kind == jsonl_fields::id_kind::text && !opt_.split_on_restart) m.name = f_.req_text;
      rit = request_index_.emplace(std::move(key), static_cast<std::uint32_t>(request_meta_.size())).first;
      request_meta_.push_back(m);
    } else if (f_.has_domain) {
      auto& m = request_meta_[rit->second];
      if (m.domain == no_domain)
        m.domain = domain_of(f_.domain);
      else if (domain_names_[m.domain] != f_.domain)
        return bad(line_no, locus::detail::concat("domain \"", f_.domain, "\" but earlier records of this request (",
                                                  place(m.first_line), ") say \"", domain_names_[m.domain], "\""));
    }
    if (records_ == std::numeric_limits<std::uint32_t>::max())
      throw format_error(locus::detail::concat(name_, ":", line_no, ": more than 2^32-1 route records"), line_no,
                         __FILE__, __LINE__);
    req_.push_back(rit->second);
    layer_.push_back(lit->second);
    token_.push_back(static_cast<std::uint32_t>(f_.token_idx));
    phase_.push_back(f_.ph);
    step_.push_back(f_.has_step ? static_cast<std::int32_t>(f_.step) : -1);
    line_.push_back(loc(line_no));
    for (std::size_t j = 0; j < top_k_; ++j) {
      ids_.push_back(static_cast<trace_expert_id>(f_.ids[j]));
      weights_.push_back(static_cast<float>(f_.weights[j]));
    }
    ++records_;
    ++rep_.route_records;
  }

  //! An array's length as collected (the SAX handler stops past max_trace_top_k entries).
  template <class T>
  static std::string entries(const std::vector<T>& v) {
    return v.size() > max_trace_top_k ? locus::detail::concat("more than ", max_trace_top_k) : std::to_string(v.size());
  }

  std::uint32_t domain_of(const std::string& name) {
    for (std::size_t d = 0; d < domain_names_.size(); ++d)
      if (domain_names_[d] == name) return static_cast<std::uint32_t>(d);
    domain_names_.push_back(name);
    return static_cast<std::uint32_t>(domain_names_.size() - 1);
  }

  //! Adds request r from records order[begin, end) (sorted by layer, token); false when dropped.
  bool add_request(trace_builder& b, std::uint32_t r, const std::vector<std::uint32_t>& order, std::size_t begin,
                   std::size_t end, const std::vector<std::uint32_t>& dense, std::size_t layers,
                   const std::vector<std::uint64_t>& layer_values) {
    const auto& m = request_meta_[r];
    const std::string who =
        m.name.empty() ? locus::detail::concat("request ", m.id, " (first record at ", place(m.first_line), ")")
                       : locus::detail::concat("request \"", m.name, "\" (numbered ", m.id, "; first record at ",
                                               place(m.first_line), ")");
    // Split into layers.
    std::vector<std::size_t> at(layers + 1, end);
    {
      std::size_t l = 0;
      for (std::size_t i = begin; i < end; ++i)
        while (l <= dense[layer_[order[i]]])
          at[l++] = i;
      for (; l <= layers; ++l)
        at[l] = end;
    }
    std::size_t n = at[1] - at[0];
    for (std::size_t l = 0; l < layers; ++l) {
      if (at[l + 1] == at[l]) {
        inconsistent(m.first_line, locus::detail::concat(who, " has no record for layer ", layer_values[l],
                                                         " but has records at other layers; every layer must hold "
                                                         "the same tokens"));
        return false;
      }
      for (std::size_t i = at[l] + 1; i < at[l + 1]; ++i)
        if (token_[order[i]] == token_[order[i - 1]]) {
          inconsistent(line_[order[i]],
                       locus::detail::concat(who, ": token_idx ", token_[order[i]], " at layer ", layer_values[l],
                                             " appears twice (also ", place(line_[order[i - 1]]), ")",
                                             opt_.split_on_restart || opt_.settings.split_on_restart.empty()
                                                 ? std::string()
                                                 : "; if the logger reuses req_id for several requests (token_idx "
                                                   "starting over), import with " +
                                                       opt_.settings.split_on_restart));
          return false;
        }
    }
    // Every layer must hold the same tokens; with trim_ragged, layers may end early (a logger
    // stopped mid-step) and the request keeps the tokens all of them hold.
    std::size_t shortest = n;
    for (std::size_t l = 1; l < layers; ++l)
      shortest = std::min(shortest, at[l + 1] - at[l]);
    for (std::size_t l = 1; l < layers; ++l) {
      const std::size_t nl = at[l + 1] - at[l];
      for (std::size_t i = 0; i < std::min(n, nl); ++i)
        if (token_[order[at[l] + i]] != token_[order[at[0] + i]]) {
          inconsistent(line_[order[at[l] + i]],
                       locus::detail::concat(who, ": layer ", layer_values[l], " has token_idx ",
                                             token_[order[at[l] + i]], " where layer ", layer_values[0], " has ",
                                             token_[order[at[0] + i]], "; every layer must hold the same tokens"));
          return false;
        }
      if (nl != n && !opt_.trim_ragged) {
        inconsistent(line_[order[at[l] + std::min(n, nl) - (nl > n ? 0 : 1)]],
                     locus::detail::concat(who, ": layer ", layer_values[l], " has ", nl, " tokens, layer ",
                                           layer_values[0], " has ", n, "; every layer must hold the same tokens",
                                           advice(opt_.settings.keep_ragged, " keeps the tokens every layer holds")));
        return false;
      }
    }
    if (opt_.trim_ragged) {
      std::vector<std::uint32_t> tail; // token_idx held by some layers only
      for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t i = at[l] + shortest; i < at[l + 1]; ++i)
          tail.push_back(token_[order[i]]);
      if (!tail.empty()) {
        std::sort(tail.begin(), tail.end());
        tail.erase(std::unique(tail.begin(), tail.end()), tail.end());
        rep_.trimmed_tokens += tail.size();
        ++rep_.trimmed_requests;
        if (rep_.trimmed_examples.size() < jsonl_report::max_messages)
          rep_.trimmed_examples.push_back(
              locus::detail::concat(who, ": kept the ", shortest, shortest == 1 ? " token" : " tokens",
                                    " every layer holds, dropped token_idx ", tail.front(),
                                    tail.size() > 1 ? locus::detail::concat("..", tail.back()) : std::string()));
      }
      n = shortest;
    }
    const std::size_t first = b.tokens();
    b.add_request(m.id, m.domain, n, m.name);
    const std::size_t k = top_k_;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint32_t rec = order[at[0] + i];
      b.set_token(first + i, phase_[rec], step_[rec]);
    }
    for (std::size_t l = 0; l < layers; ++l) {
      auto ids = b.layer_ids(l);
      auto w = b.layer_weights(l);
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t rec = order[at[l] + i];
        std::copy_n(ids_.data() + std::size_t{rec} * k, k, ids.data() + (first + i) * k);
        std::copy_n(weights_.data() + std::size_t{rec} * k, k, w.data() + (first + i) * k);
      }
    }
    return true;
  }

  static constexpr std::uint32_t no_domain = 0xffffffffu;
  struct request_meta {
    std::uint64_t id = 0;
    std::string name; //!< the logged string id; empty for a number or a reconstructed request
    std::uint32_t domain = 0;
    std::uint64_t first_line = 0;
  };
  struct segment_state {
    bool seen = false;
    std::uint64_t last = 0;
    std::uint32_t segment = 0;
  };

  // A record's location: its file's index in files_ above line_bits, its line below.
  static constexpr unsigned line_bits = 40;
  static constexpr std::uint64_t line_mask = (std::uint64_t{1} << line_bits) - 1;
  static constexpr std::size_t max_files = std::size_t{1} << 20;
  std::uint64_t loc(std::uint64_t line_no) const {
    return (std::uint64_t{files_.size() - 1} << line_bits) | (line_no & line_mask);
  }
  //! "line N" when one file is read, else "file:N".
  std::string place(std::uint64_t where) const {
    if (files_.size() == 1) return locus::detail::concat("line ", where & line_mask);
    return locus::detail::concat(files_[where >> line_bits], ":", where & line_mask);
  }

  std::string name_; //!< the file being read
  std::vector<std::string> files_;
  const jsonl_options& opt_;
  jsonl_report& rep_;
  std::size_t experts_, top_k_;
  jsonl_fields f_;
  std::uint32_t records_ = 0;
  // Columns, one entry per record (ids and weights: top_k entries).
  std::vector<std::uint32_t> req_, layer_, token_;
  std::vector<locus::trace::phase> phase_;
  std::vector<std::int32_t> step_;
  std::vector<std::uint64_t> line_;
  std::vector<trace_expert_id> ids_;
  std::vector<float> weights_;
  std::unordered_map<std::string, std::uint32_t> request_index_;
  std::vector<request_meta> request_meta_;
  jsonl_fields::id_kind id_kind_ = jsonl_fields::id_kind::none; // the kind of the first req_id
  std::uint64_t id_kind_line_ = 0;                              // where (0: none yet)
  std::uint64_t meta_experts_ = 0, meta_top_k_ = 0;             // the values meta lines declared
  std::uint64_t meta_experts_line_ = 0, meta_top_k_line_ = 0;   // where (0: none yet)
  std::unordered_map<std::uint64_t, std::uint32_t> layer_index_;
  std::unordered_map<std::string, segment_state> segments_;
  std::vector<std::string> domain_names_;
};

} // namespace detail::trace

namespace detail::trace {
[[noreturn]] inline void jsonl_long_line(const std::string& name, std::uint64_t line_no, const jsonl_options& opt) {
  throw format_error(locus::detail::concat(name, ":", line_no, ": line longer than ", opt.max_line_bytes,
                                           " bytes: no route record is that long"),
                     line_no, __FILE__, __LINE__);
}
} // namespace detail::trace

//! Imports route JSONL held in memory; `name` prefixes error messages.
//! @throws locus::format_error "name:line: what" (offset() = line) on the first bad record unless
//!         `opt.skip_bad`, or when nothing usable remains; locus::invalid_input_error when the
//!         expert count is declared nowhere
inline trace import_jsonl_text(std::string_view text, const std::string& name = "<memory>",
                               const jsonl_options& opt = {}, jsonl_report* report = nullptr) {
  jsonl_report local;
  jsonl_report& rep = report ? *report : local;
  rep = jsonl_report{};
  detail::trace::jsonl_importer imp(name, opt, rep);
  std::uint64_t line_no = 0;
  while (!text.empty()) {
    const auto nl = text.find('\n');
    const std::string_view line = text.substr(0, nl);
    ++line_no;
    if (line.size() > opt.max_line_bytes) detail::trace::jsonl_long_line(name, line_no, opt);
    imp.line(line, line_no);
    if (nl == std::string_view::npos) break;
    text.remove_prefix(nl + 1);
  }
  return imp.finish();
}

//! True when `path` names a route-JSONL file by its extension (.jsonl or .ndjson).
inline bool is_jsonl_name(const std::filesystem::path& path) {
  const auto ext = path.extension();
  return ext == ".jsonl" || ext == ".ndjson";
}

//! The files that `inputs` name, in import order: a file as given, "-" (standard input) as given,
//! a folder as the *.jsonl and *.ndjson files directly in it, sorted by name.
//! @throws locus::io_error when an input does not exist or a folder holds no such file
inline std::vector<std::string> jsonl_inputs(const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  LOCUS_REQUIRE(!inputs.empty(), invalid_input_error, "no route-JSONL input given");
  std::vector<std::string> files;
  for (const auto& in : inputs) {
    if (in == "-") {
      files.push_back(in);
      continue;
    }
    std::error_code ec; // error codes, not exceptions: a symlink loop is an input error like any other
    const auto st = fs::status(in, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw io_error(in + ": " + ec.message(), __FILE__, __LINE__, ec.value());
    if (!fs::exists(st)) throw io_error(in + ": no such file or folder", __FILE__, __LINE__, ENOENT);
    if (!fs::is_directory(st)) {
      files.push_back(in);
      continue;
    }
    std::vector<std::string> found;
    for (fs::directory_iterator it(in, ec), end; !ec && it != end; it.increment(ec)) {
      if (!is_jsonl_name(it->path())) continue;
      // A part that cannot be read (a dangling link to a missing shard, a folder) is refused: the
      // trace would silently lack its records.
      std::error_code part_error;
      const auto part = fs::status(it->path(), part_error);
      if (!fs::is_regular_file(part))
        throw io_error(it->path().string() + ": " +
                           (part_error ? "cannot read it: " + part_error.message() : std::string("is not a file")) +
                           " (a folder of route-JSONL files is read whole: every .jsonl and .ndjson file in it)",
                       __FILE__, __LINE__, part_error ? part_error.value() : EISDIR);
      found.push_back(it->path().string());
    }
    if (ec) throw io_error(in + ": cannot list the folder: " + ec.message(), __FILE__, __LINE__, ec.value());
    if (found.empty())
      throw io_error(in + ": holds no .jsonl or .ndjson file (a folder of route-JSONL files is read whole)", __FILE__,
                     __LINE__, ENOENT);
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

namespace detail::trace {
//! Streams one file (or standard input) into `imp` line by line.
inline void jsonl_stream(std::FILE* f, const std::string& path, jsonl_importer& imp, const jsonl_options& opt,
                         std::uint64_t& done, std::uint64_t total) {
  std::vector<char> buf(std::size_t{1} << 20);
  std::string carry; // a line split across two reads
  std::uint64_t line_no = 0, next_report = done + (std::uint64_t{1} << 24);
  for (;;) {
    const std::size_t got = std::fread(buf.data(), 1, buf.size(), f);
    if (got == 0) {
      if (std::ferror(f)) {
        const int e = errno;
        throw io_error(path + ": read failed: " + std::strerror(e), __FILE__, __LINE__, e);
      }
      break;
    }
    done += got;
    std::string_view chunk(buf.data(), got);
    for (;;) {
      const auto nl = chunk.find('\n');
      const std::size_t part = nl == std::string_view::npos ? chunk.size() : nl;
      if (carry.size() + part > opt.max_line_bytes) jsonl_long_line(path, line_no + 1, opt);
      if (nl == std::string_view::npos) {
        carry.append(chunk);
        break;
      }
      if (carry.empty()) {
        imp.line(chunk.substr(0, nl), ++line_no);
      } else {
        carry.append(chunk.substr(0, nl));
        imp.line(carry, ++line_no);
        carry.clear();
      }
      chunk.remove_prefix(nl + 1);
    }
    if (opt.progress && done >= next_report) {
      opt.progress(done, total);
      next_report = done + (std::uint64_t{1} << 24);
    }
  }
  if (!carry.empty()) {
    try {
      imp.line(carry, ++line_no);
    } catch (const format_error& e) {
      if (e.offset() != line_no) throw;
      throw format_error(e.message() + " (the last line has no newline: the file looks truncated)", line_no, __FILE__,
                         __LINE__);
    }
  }
}
} // namespace detail::trace

//! Imports route JSONL from several files as one log (one file per layer, as some loggers write,
//! or shards of one run): records are matched across files by `req_id`, `token_idx` and `layer`
//! exactly as within one file, and errors name the file and line. Each input is a file, "-"
//! (standard input, named `<stdin>`) or a folder (its *.jsonl and *.ndjson files, sorted by name;
//! see jsonl_inputs).
//! @throws as import_jsonl_text; locus::io_error when an input cannot be read
inline trace import_jsonl(const std::vector<std::string>& inputs, const jsonl_options& opt = {},
                          jsonl_report* report = nullptr) {
  jsonl_report local;
  jsonl_report& rep = report ? *report : local;
  rep = jsonl_report{};
  const auto files = jsonl_inputs(inputs);
  std::uint64_t total = 0, done = 0;
  for (const auto& p : files) {
    std::error_code ec;
    if (p != "-") total += std::filesystem::is_regular_file(p, ec) ? std::filesystem::file_size(p, ec) : 0;
  }
  const auto name = [](const std::string& p) { return p == "-" ? std::string("<stdin>") : p; };
  detail::trace::jsonl_importer imp(name(files.front()), opt, rep);
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (i > 0) imp.next_file(name(files[i]));
    if (files[i] == "-") {
      detail::trace::jsonl_stream(stdin, name(files[i]), imp, opt, done, total);
      continue;
    }
    std::FILE* f = std::fopen(files[i].c_str(), "rb");
    if (!f)
      throw io_error(locus::detail::concat(files[i], ": cannot open: ", std::strerror(errno)), __FILE__, __LINE__,
                     errno);
    struct closer {
      std::FILE* f;
      ~closer() { std::fclose(f); }
    } close_at_exit{f};
    detail::trace::jsonl_stream(f, files[i], imp, opt, done, total);
  }
  if (opt.progress) opt.progress(done, total);
  return imp.finish();
}

//! Imports a route JSONL file (or "-": standard input; or a folder, as import_jsonl of several),
//! streaming it line by line.
//! @throws as import_jsonl_text; locus::io_error when the file cannot be read
inline trace import_jsonl(const std::string& path, const jsonl_options& opt = {}, jsonl_report* report = nullptr) {
  return import_jsonl(std::vector<std::string>{path}, opt, report);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
