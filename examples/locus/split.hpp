#pragma once
// Which requests of a trace train (plan, fit a grouping) and which test (simulate, compare): the
// split flags shared by every command that splits a trace (docs/byo-trace.md, "Splits").
#include "tool_cli.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
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
                              "Split by domain: these domains train (comma-separated; default with --test-domains: "
                              "the other domains)")
                  ->delimiter(',');
  auto* ted = cmd->add_option("--test-domains", s.test_domains,
                              "Split by domain: these domains test (comma-separated; default with --train-domains: "
                              "the other domains)")
                  ->delimiter(',');
  auto* trr = cmd->add_option(
      "--train-requests", s.train_requests,
      "Split by request id: a file of the ids that train (separated by whitespace or commas, # comments; "
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

//! The request ids listed in `path`: non-negative integers separated by whitespace, `#` to the end
//! of a line is a comment. `what` names a number in the message that refuses one.
inline std::vector<std::uint64_t> read_request_ids(const std::string& path, const char* flag,
                                                   const char* what = "a request id") {
  // A folder opens as a stream that reads nothing: it was said to list no request id.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw locus::io_error(std::string(flag) + " " + path + ": is a folder, expected a file of request ids", __FILE__,
                          __LINE__);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw locus::io_error(std::string(flag) + " " + path + ": cannot open", __FILE__, __LINE__);
  std::vector<std::uint64_t> ids;
  std::string line;
  for (std::size_t line_no = 1; std::getline(in, line); ++line_no) {
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r' || line[i] == ','))
        ++i;
      if (i == line.size()) break;
      std::size_t j = i;
      while (j < line.size() && line[j] != ' ' && line[j] != '\t' && line[j] != '\r' && line[j] != ',')
        ++j;
      std::uint64_t v = 0;
      const auto r = std::from_chars(line.data() + i, line.data() + j, v);
      LOCUS_REQUIRE(r.ec == std::errc{} && r.ptr == line.data() + j, locus::config_error, flag, " ", path, ":", line_no,
                    ": \"", line.substr(i, std::min<std::size_t>(j - i, 32)), "\" is not ", what,
                    " (a non-negative integer)");
      ids.push_back(v);
      i = j;
    }
  }
  LOCUS_REQUIRE(!ids.empty(), locus::config_error, flag, " ", path, ": lists no request id");
  return ids;
}

//! Request indices of `t` whose domain is in `names` (each name must be a domain of `t`).
inline std::vector<bool> in_domains(const locus::trace::trace& t, const std::vector<std::string>& names,
                                    const char* flag) {
  std::vector<bool> chosen_domain(t.domains().size(), false);
  for (const auto& n : names)
    chosen_domain[t.domain_index(n, flag)] = true;
  std::vector<bool> chosen(t.requests());
  for (std::size_t r = 0; r < t.requests(); ++r)
    chosen[r] = chosen_domain[t.request(r).domain];
  return chosen;
}

//! Requests of `t` whose id is listed in file `path`; every listed id must be in `t`.
inline std::vector<bool> in_id_file(const locus::trace::trace& t, const std::string& path, const char* flag) {
  const auto ids = read_request_ids(path, flag);
  const std::set<std::uint64_t> wanted(ids.begin(), ids.end());
  std::set<std::uint64_t> found;
  std::vector<bool> chosen(t.requests());
  for (std::size_t r = 0; r < t.requests(); ++r)
    if (wanted.count(t.request(r).id)) {
      chosen[r] = true;
      found.insert(t.request(r).id);
    }
  if (found.size() != wanted.size()) {
    std::string missing;
    std::size_t count = 0;
    for (const auto id : wanted)
      if (!found.count(id) && count++ < 5) missing += (missing.empty() ? "" : ", ") + std::to_string(id);
    throw locus::config_error(locus::detail::concat(flag, " ", path, ": ", wanted.size() - found.size(),
                                                    " listed request ids are not in the trace (", missing,
                                                    count > 5 ? ", ..." : "", ")"),
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
      LOCUS_REQUIRE(!(train[r] && test[r]), locus::config_error, how, ": request ", t.request(r).id, " (domain \"",
                    t.domains()[t.request(r).domain], "\") is both in the training and in the test split");
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
  const char* lower =
      s.split == "time" ? " (lower --test-fraction)" : " (lower --test-fraction or change --split-seed)";
  const char* raise =
      s.split == "time" ? " (raise --test-fraction)" : " (raise --test-fraction or change --split-seed)";
  LOCUS_REQUIRE(!need_train || out.first.requests() > 0, locus::config_error, "the training split is empty: ", how,
                " puts all ", t.requests(), " requests of ", name, " in the test split", lower);
  LOCUS_REQUIRE(!need_test || out.second.requests() > 0, locus::config_error,
                "the test split is empty, nothing to simulate: ", how, " puts all ", t.requests(), " requests of ",
                name, " in the training split", raise);
  return out;
}

} // namespace locus_driver
