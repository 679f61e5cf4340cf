#pragma once
// Which requests of a trace train (plan, fit a grouping) and which test (simulate, compare): the
// split flags shared by every command that splits a trace (docs/byo-trace.md, "Splits").
#include "tool_cli.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace locus_driver {

//! The split flags. Exactly one way of splitting applies: by domain (--train-domains /
//! --test-domains), by explicit request ids (--train-requests / --test-requests), or by a fraction
//! of the requests (--split random|time with --test-fraction). --skip-requests drops warm-up
//! requests first, whatever the split.
struct split_flags {
  std::string split = "random"; //!< random: each request by a seeded draw; time: the first requests train
  double test_fraction = 0.5;
  std::uint64_t split_seed = 1; //!< also seeds planning and simulation
  std::size_t skip_requests = 0;
  std::vector<std::string> train_domains, test_domains;
  std::string train_requests, test_requests; //!< files of request ids
  // Set by add_split_flags, to tell a default from a value the user gave.
  CLI::Option* split_opt = nullptr;
  CLI::Option* fraction_opt = nullptr;

  bool by_domain() const { return !train_domains.empty() || !test_domains.empty(); }
  bool by_ids() const { return !train_requests.empty() || !test_requests.empty(); }
};

//! Adds the split flags to `cmd` (their help shows the defaults).
inline void add_split_flags(CLI::App* cmd, split_flags& s) {
  s.split_opt = cmd->add_option("--split", s.split,
                                "How --test-fraction splits the requests: random (a seeded draw per request) or time "
                                "(the first requests, in trace order, train; the last test)")
                    ->check(CLI::IsMember({"random", "time"}));
  s.fraction_opt = cmd->add_option("--test-fraction", s.test_fraction, "Fraction of requests in the test split")
                       ->check(tool_cli::number_in(0, 1));
  cmd->add_option("--split-seed", s.split_seed, "Seed of the random split (also seeds planning and simulation)");
  cmd->add_option("--skip-requests", s.skip_requests,
                  "Drop the trace's first this many requests (warm-up passes) before the split");
  auto* trd = cmd->add_option("--train-domains", s.train_domains,
                              "Split by domain: these domains train (comma-separated; a name holding a comma in "
                              "double quotes, a JSON string; default with --test-domains: the other domains)");
  auto* ted = cmd->add_option("--test-domains", s.test_domains,
                              "Split by domain: these domains test (comma-separated, as --train-domains; default with "
                              "--train-domains: the other domains)");
  auto* trr = cmd->add_option(
      "--train-requests", s.train_requests,
      "Split by request id: a file of the ids that train (separated by whitespace or commas, # comments; a trace "
      "whose req_ids were strings lists them as logged, in double quotes (a JSON string) where they hold a space, tab, "
      "comma, # or quote; "
      "default with --test-requests: the other requests)");
  auto* ter = cmd->add_option("--test-requests", s.test_requests,
                              "Split by request id: a file of the ids that test (default with --train-requests: the "
                              "other requests)");
  // Conflicting ways of splitting are refused by CLI11 with both flags named.
  for (auto* d : {trd, ted})
    for (auto* r : {trr, ter})
      d->excludes(r);
  for (auto* o : {trd, ted, trr, ter}) {
    o->excludes(s.split_opt);
    o->excludes(s.fraction_opt);
  }
}

namespace detail {

//! One entry of a file of requests: its text (a quoted entry unquoted) and its line.
struct listed_entry {
  std::string text;
  std::size_t line = 0;
};

//! The index past the closing quote of the JSON string that starts at `s[i]` (a double quote,
//! backslash escapes skipped), or npos when it has none.
inline std::size_t quoted_end(const std::string& s, std::size_t i) {
  std::size_t j = i + 1;
  for (; j < s.size() && s[j] != '"'; ++j)
    if (s[j] == '\\') ++j;
  return j < s.size() ? j + 1 : std::string::npos;
}

//! The text of the JSON string `s[i, end)`, or none where it is no JSON string.
inline std::optional<std::string> json_string(const std::string& s, std::size_t i, std::size_t end) {
  try {
    return nlohmann::json::parse(s.begin() + static_cast<std::ptrdiff_t>(i),
                                 s.begin() + static_cast<std::ptrdiff_t>(end))
        .get<std::string>();
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

//! The entries of a file that lists requests (and, for --homes, ranks): separated by whitespace or
//! commas, `#` to the end of a line a comment; an entry in double quotes is a JSON string, so that
//! a request name holding a separator, a `#` or a quote can be listed.
inline std::vector<listed_entry> read_listed_entries(const std::string& path, const char* flag) {
  // A folder opens as a stream that reads nothing: it was said to list no request id.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw locus::io_error(std::string(flag) + " " + path + ": is a folder, expected a file of request ids", __FILE__,
                          __LINE__);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int e = errno;
    throw locus::io_error(std::string(flag) + " " + path + ": cannot open: " + std::strerror(e), __FILE__, __LINE__, e);
  }
  std::vector<listed_entry> out;
  std::string line;
  const auto separator = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == ','; };
  // Read with a bound: /dev/zero, or a binary file given by mistake, would otherwise fill memory
  // (a line with no end) before any entry is judged.
  constexpr std::size_t max_bytes = std::size_t{64} << 20;
  std::size_t read = 0;
  std::streambuf* const buf = in.rdbuf();
  const auto next_line = [&](std::string& l) {
    l.clear();
    for (int c; (c = buf->sbumpc()) != std::char_traits<char>::eof();) {
      LOCUS_REQUIRE(++read <= max_bytes, locus::config_error, flag, " ", path, ": longer than ", max_bytes >> 20,
                    " MiB; not a list of requests");
      if (c == '\n') return true;
      l += static_cast<char>(c);
    }
    return !l.empty();
  };
  for (std::size_t line_no = 1; next_line(line); ++line_no) {
    // A byte-order mark (some editors write one) is no part of the first entry.
    std::size_t i = line_no == 1 && line.starts_with("\xEF\xBB\xBF") ? 3 : 0;
    while (i < line.size()) {
      while (i < line.size() && separator(line[i]))
        ++i;
      if (i == line.size() || line[i] == '#') break;
      std::size_t j = i;
      if (line[i] == '"') {
        j = quoted_end(line, i);
        LOCUS_REQUIRE(j != std::string::npos, locus::config_error, flag, " ", path, ":", line_no,
                      ": a quoted entry has no closing quote");
        LOCUS_REQUIRE(j == line.size() || separator(line[j]) || line[j] == '#', locus::config_error, flag, " ", path,
                      ":", line_no, ": a quoted entry runs on past its closing quote");
        auto text = json_string(line, i, j);
        LOCUS_REQUIRE(text, locus::config_error, flag, " ", path, ":", line_no, ": ",
                      line.substr(i, std::min<std::size_t>(j - i, 32)), " is not a JSON string");
        out.push_back({std::move(*text), line_no});
      } else {
        while (j < line.size() && !separator(line[j]) && line[j] != '#')
          ++j;
        out.push_back({line.substr(i, j - i), line_no});
      }
      i = j;
    }
  }
  LOCUS_REQUIRE(!out.empty(), locus::config_error, flag, " ", path, ": lists no request");
  return out;
}

//! Entry `e` as a non-negative integer; `what` names it in the message that refuses it.
inline std::uint64_t listed_number(const listed_entry& e, const std::string& path, const char* flag, const char* what) {
  std::uint64_t v = 0;
  const auto r = std::from_chars(e.text.data(), e.text.data() + e.text.size(), v);
  LOCUS_REQUIRE(!e.text.empty() && r.ec == std::errc{} && r.ptr == e.text.data() + e.text.size(), locus::config_error,
                flag, " ", path, ":", e.line, ": \"", e.text.substr(0, 32), "\" is not ", what,
                " (a non-negative integer)");
  return v;
}

//! Where `t` names its requests and every entry of a file (every `step`-th from the first) is a
//! whole number, says on stderr that the numbers are taken as names: an older locus took them as
//! the numbering of string req_ids, and a log of numeral strings ("5", "3", ...) then selected
//! other requests.
inline void note_numerals_as_names(const locus::trace::trace& t, const std::vector<listed_entry>& entries,
                                   const char* flag, std::size_t step = 1) {
  if (!t.has_request_names()) return;
  for (std::size_t i = 0; i < entries.size(); i += step)
    if (entries[i].text.empty() ||
        !std::all_of(entries[i].text.begin(), entries[i].text.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return;
  std::fprintf(stderr,
               "locus: note: %s lists numbers; the trace names its requests by their logged req_id strings, so each "
               "is taken as a name (\"%s\" is the request logged as that string), not as their numbering\n",
               flag, entries.front().text.c_str());
}

//! Entry `e` as a request key of `t` (trace::request_key): a name as listed where `t` has names, else an
//! id (a non-negative integer, so that "007" lists request 7).
inline std::string listed_request(const locus::trace::trace& t, const listed_entry& e, const std::string& path,
                                  const char* flag) {
  if (t.has_request_names()) return e.text;
  const bool digits = !e.text.empty() && std::all_of(e.text.begin(), e.text.end(), [](char c) {
    return (c >= '0' && c <= '9') || c == '-' || c == '+';
  });
  if (!digits) // a name for a trace that keeps none: imported before locus kept string req_ids?
    LOCUS_THROW(locus::config_error, flag, " ", path, ":", e.line, ": \"", e.text.substr(0, 32),
                "\" is not a request id (a non-negative integer); the trace names no request (a route JSONL of "
                "string req_ids keeps them as names: import its log again)");
  return std::to_string(listed_number(e, path, flag, "a request id"));
}

//! The names a list flag gives (--train-domains, --test-domains, trace import's --domains): each of
//! its values split at commas, spaces and tabs around a name dropped; a name in double quotes is a
//! JSON string, so that one holding a comma can be given (as trace::listed_name shows it).
inline std::vector<std::string> name_list(const std::vector<std::string>& values, const char* flag) {
  std::vector<std::string> out;
  const auto blank = [](char c) { return c == ' ' || c == '\t'; };
  for (const auto& v : values) {
    std::size_t i = 0;
    for (;;) {
      while (i < v.size() && blank(v[i]))
        ++i;
      std::size_t end = i;
      if (i < v.size() && v[i] == '"') {
        end = quoted_end(v, i);
        LOCUS_REQUIRE(end != std::string::npos, locus::config_error, flag, ": ", v,
                      ": a quoted name has no closing quote");
        auto text = json_string(v, i, end);
        LOCUS_REQUIRE(text, locus::config_error, flag, ": ", v.substr(i, end - i), " is not a JSON string");
        out.push_back(std::move(*text));
        while (end < v.size() && blank(v[end]))
          ++end;
        LOCUS_REQUIRE(end == v.size() || v[end] == ',', locus::config_error, flag, ": ", v,
                      ": a quoted name runs on past its closing quote");
      } else {
        end = v.find(',', i);
        if (end == std::string::npos) end = v.size();
        std::size_t last = end;
        while (last > i && blank(v[last - 1]))
          --last;
        LOCUS_REQUIRE(last > i, locus::config_error, flag, ": ", v.empty() ? "\"\"" : v,
                      ": an empty name (a name that is empty or holds a comma goes in double quotes, a JSON string)");
        out.push_back(v.substr(i, last - i));
      }
      if (end == v.size()) break;
      i = end + 1; // past the comma: a name follows, empty or not
    }
  }
  return out;
}

//! Request indices of `t` whose domain is in `names` (each name must be a domain of `t`).
inline std::vector<bool> in_domains(const locus::trace::trace& t, const std::vector<std::string>& names,
                                    const char* flag) {
  std::vector<bool> chosen_domain(t.domains().size(), false);
  for (const auto& n : name_list(names, flag))
    chosen_domain[t.domain_index(n, flag)] = true;
  std::vector<bool> chosen(t.requests());
  for (std::size_t r = 0; r < t.requests(); ++r)
    chosen[r] = chosen_domain[t.request(r).domain];
  return chosen;
}

//! Requests of `t` listed in file `path` (by id, or by name where `t` has names); every listed
//! request must be in `t`.
inline std::vector<bool> in_id_file(const locus::trace::trace& t, const std::string& path, const char* flag) {
  std::vector<std::string> listed; // in file order, for the message
  std::set<std::string> wanted;
  const auto entries = read_listed_entries(path, flag);
  note_numerals_as_names(t, entries, flag);
  for (const auto& e : entries)
    if (auto key = listed_request(t, e, path, flag); wanted.insert(key).second) listed.push_back(std::move(key));
  std::set<std::string> found;
  std::vector<bool> chosen(t.requests());
  for (std::size_t r = 0; r < t.requests(); ++r)
    if (auto key = t.request_key(r); wanted.count(key)) {
      chosen[r] = true;
      found.insert(std::move(key));
    }
  if (found.size() != wanted.size()) {
    std::string missing;
    std::size_t count = 0;
    for (const auto& key : listed)
      if (!found.count(key) && count++ < 5) missing += (missing.empty() ? "" : ", ") + t.key_label(key);
    throw locus::config_error(
        locus::detail::concat(flag, " ", path, ": ", wanted.size() - found.size(), " listed ",
                              t.has_request_names() ? "request name" : "request id",
                              wanted.size() - found.size() == 1 ? " is" : "s are", " not in the trace (", missing,
                              count > 5 ? ", ..." : "", ")",
                              t.has_request_names() ? "; its requests are named by their logged req_id strings" : ""),
        __FILE__, __LINE__);
  }
  return chosen;
}

} // namespace detail

//! (train, test) requests of `t` as the flags say; `name` names the trace in messages. A split the
//! job needs (`need_train`, `need_test`) that comes out empty is refused, naming the flags to change.
inline std::pair<locus::trace::trace, locus::trace::trace>
apply_split(locus::trace::trace t, const split_flags& s, bool need_train, bool need_test, const std::string& name) {
  // CLI11 refuses these combinations already; callers that fill split_flags by hand get the same.
  LOCUS_REQUIRE(!(s.by_domain() && s.by_ids()), locus::config_error,
                "split by domain (--train-domains/--test-domains) or by request id (--train-requests/"
                "--test-requests), not both");
  const bool fraction_given =
      (s.split_opt && s.split_opt->count() > 0) || (s.fraction_opt && s.fraction_opt->count() > 0);
  LOCUS_REQUIRE(!((s.by_domain() || s.by_ids()) && fraction_given), locus::config_error,
                "--split and --test-fraction split by a fraction of the requests; they do not combine with "
                "--train-domains, --test-domains, --train-requests or --test-requests");
  LOCUS_REQUIRE(s.split == "random" || s.split == "time", locus::config_error, "--split ", s.split,
                ": expected random or time");
  LOCUS_REQUIRE(std::isfinite(s.test_fraction) && s.test_fraction >= 0 && s.test_fraction <= 1, locus::config_error,
                "--test-fraction ", s.test_fraction, " is outside [0, 1]");
  if (s.skip_requests > 0) {
    LOCUS_REQUIRE(s.skip_requests < t.requests(), locus::config_error, "--skip-requests ", s.skip_requests,
                  " drops all ", t.requests(), " requests of ", name);
    std::vector<std::size_t> kept(t.requests() - s.skip_requests);
    for (std::size_t i = 0; i < kept.size(); ++i)
      kept[i] = s.skip_requests + i;
    t = t.select_requests(kept);
  }
  std::pair<locus::trace::trace, locus::trace::trace> out;
  std::string how; // the flags that made the split, for the messages below
  if (s.by_domain() || s.by_ids()) {
    std::vector<bool> train, test;
    if (s.by_domain()) {
      if (!s.train_domains.empty()) train = detail::in_domains(t, s.train_domains, "--train-domains");
      if (!s.test_domains.empty()) test = detail::in_domains(t, s.test_domains, "--test-domains");
      how = "--train-domains/--test-domains";
    } else {
      if (!s.train_requests.empty()) train = detail::in_id_file(t, s.train_requests, "--train-requests");
      if (!s.test_requests.empty()) test = detail::in_id_file(t, s.test_requests, "--test-requests");
      how = "--train-requests/--test-requests";
    }
    // One side given: the other side is every other request.
    const auto others = [](const std::vector<bool>& v) {
      std::vector<bool> o(v.size());
      for (std::size_t r = 0; r < v.size(); ++r)
        o[r] = !v[r];
      return o;
    };
    if (train.empty()) train = others(test);
    if (test.empty()) test = others(train);
    std::vector<std::size_t> tr, te;
    for (std::size_t r = 0; r < t.requests(); ++r) {
      LOCUS_REQUIRE(!(train[r] && test[r]), locus::config_error, how, ": request ", t.request_label(r), " (domain ",
                    locus::trace::quoted_name(t.domains()[t.request(r).domain]),
                    ") is both in the training and in the test split");
      if (train[r]) tr.push_back(r);
      if (test[r]) te.push_back(r);
    }
    out = {t.select_requests(tr), t.select_requests(te)};
  } else if (s.split == "time") {
    // The first requests in trace order train: ceil of the training share, so that a fraction
    // below 1 never leaves the training split empty by rounding.
    const auto n = t.requests();
    const auto train_n = static_cast<std::size_t>(std::ceil((1.0 - s.test_fraction) * static_cast<double>(n) - 1e-9));
    std::vector<std::size_t> tr, te;
    for (std::size_t r = 0; r < n; ++r)
      (r < train_n ? tr : te).push_back(r);
    out = {t.select_requests(tr), t.select_requests(te)};
    how = locus::detail::concat("--split time with --test-fraction ", s.test_fraction);
  } else {
    out = locus::trace::split_by_request(t, s.test_fraction, s.split_seed);
    how = locus::detail::concat("--test-fraction ", s.test_fraction, " with --split-seed ", s.split_seed);
  }
  if (s.by_domain() || s.by_ids()) {
    LOCUS_REQUIRE(!need_train || out.first.requests() > 0, locus::config_error, "the training split is empty: ", how,
                  " select no training request of the ", t.requests(), " of ", name);
    LOCUS_REQUIRE(!need_test || out.second.requests() > 0, locus::config_error,
                  "the test split is empty, nothing to simulate: ", how, " select no test request of the ",
                  t.requests(), " of ", name);
    return out;
  }
  // A seed moves requests only where the fraction leaves a draw: at 0 or 1 every seed splits alike.
  const bool seeded = s.split != "time" && s.test_fraction > 0 && s.test_fraction < 1;
  const char* lower = seeded ? " (lower --test-fraction or change --split-seed)" : " (lower --test-fraction)";
  const char* raise = seeded ? " (raise --test-fraction or change --split-seed)" : " (raise --test-fraction)";
  LOCUS_REQUIRE(!need_train || out.first.requests() > 0, locus::config_error, "the training split is empty: ", how,
                " puts all ", t.requests(), " requests of ", name, " in the test split", lower);
  LOCUS_REQUIRE(!need_test || out.second.requests() > 0, locus::config_error,
                "the test split is empty, nothing to simulate: ", how, " puts all ", t.requests(), " requests of ",
                name, " in the training split", raise);
  return out;
}

} // namespace locus_driver
