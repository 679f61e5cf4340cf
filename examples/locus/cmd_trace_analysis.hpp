#pragma once
// `locus trace stats` (statistics as a table or JSON), `locus trace synth` (write a synthetic
// binary trace, from a shape or fitted to a real trace and rescaled) and `locus trace report`
// (CSV files and PNG figures rendered by scripts/trace_report.py).
#include "output.hpp"
#include "tool_cli.hpp"
#include "trace_input.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/core/read_file.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/statistics.hpp>
#include <locus/trace/synthesizer.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <sys/file.h>
#include <unistd.h>
#include <vector>

namespace locus_driver {

//! --threads: up to 4,096 workers (a count past the type's 32 bits was CLI11's "Could not convert").
inline CLI::Validator thread_range() { return CLI::Range(0u, 4096u); }

namespace trace_analysis {

//! Refuses a trace path that names nothing ("-" is standard input).
inline void require_exists(const std::string& path) {
  std::error_code ec;
  LOCUS_REQUIRE(path == "-" || std::filesystem::exists(path, ec) || (ec && ec != std::errc::no_such_file_or_directory),
                locus::io_error, "trace \"", path,
                "\" does not exist (expected a locus binary trace file, an ESFT folder or a route JSONL file)");
}

inline locus::trace::trace load(const std::string& path, const jsonl_reading& how, progress& p) {
  require_exists(path);
  p.start("loading " + path);
  auto t = load_trace(std::vector<std::string>{path}, how);
  p.done();
  return t;
}

//! The trace `trace stats` and `trace report` read (every path, with the reading flags), prefill
//! marked: the phases it records unless `prefill_given`, else its first `prefill` tokens.
//! `recorded` says which.
inline locus::trace::trace load(const std::vector<std::string>& paths, const jsonl_reading& how, std::size_t prefill,
                                bool prefill_given, progress& p, bool& recorded) {
  for (const auto& path : paths)
    require_exists(path);
  p.start("loading " + paths.front() + (paths.size() > 1 ? " ..." : ""));
  const auto loaded = load_trace(paths, how);
  p.done();
  recorded = keeps_recorded_phases(loaded, prefill_given);
  return with_prefill(loaded, prefill, prefill_given);
}

inline nlohmann::json number_or_null(double v) {
  if (std::isfinite(v)) return v;
  return nullptr;
}

//! The JSON document of `locus trace stats --json`.
//! `recorded`: the trace's own phases were used, not `prefill` leading tokens. `model_layers`:
//! the model's layer index of each traced layer, when the trace knows it (empty otherwise).
inline nlohmann::json stats_json(const locus::trace::trace_statistics& s, std::size_t prefill, bool recorded = false,
                                 const std::vector<std::size_t>& model_layers = {}) {
  nlohmann::json j;
  j["requests"] = s.requests;
  j["tokens"] = s.tokens;
  j["layers"] = s.layers;
  j["experts"] = s.experts;
  j["top_k"] = s.top_k;
  j["prefill_tokens"] = recorded ? nlohmann::json("recorded") : nlohmann::json(prefill);
  j["domains"] = nlohmann::json::array();
  for (std::size_t d = 0; d < s.domain_names.size(); ++d)
    j["domains"].push_back(
        {{"name", s.domain_names[d]}, {"requests", s.popularity.requests[d]}, {"tokens", s.popularity.tokens[d]}});
  const auto js = s.divergence.mean_per_layer();
  j["per_layer"] = nlohmann::json::array();
  for (std::size_t l = 0; l < s.layers; ++l) {
    j["per_layer"].push_back({{"layer", l},
                              {"imbalance_max_over_mean", s.layer_imbalance[l].max_over_mean},
                              {"imbalance_cv", s.layer_imbalance[l].cv},
                              {"gini", s.layer_imbalance[l].gini},
                              {"domain_js_mean", number_or_null(js[l])},
                              {"prefill_decode_correlation_mean", number_or_null(s.correlation.mean[l])},
                              {"prefill_decode_correlation_median", number_or_null(s.correlation.median[l])},
                              {"prefill_decode_correlation_defined", s.correlation.defined[l]}});
    if (l < model_layers.size()) j["per_layer"].back()["model_layer"] = model_layers[l];
  }
  double js_sum = 0;
  std::size_t js_n = 0;
  for (double v : js)
    if (std::isfinite(v)) js_sum += v, ++js_n;
  j["summary"] = {{"mean_imbalance_max_over_mean", s.mean_imbalance(&locus::trace::imbalance::max_over_mean)},
                  {"mean_imbalance_cv", s.mean_imbalance(&locus::trace::imbalance::cv)},
                  {"mean_gini", s.mean_imbalance(&locus::trace::imbalance::gini)},
                  {"mean_domain_js", number_or_null(js_n ? js_sum / static_cast<double>(js_n) : std::nan(""))},
                  {"mean_prefill_decode_correlation", number_or_null(s.correlation.overall_mean())}};
  return j;
}

inline void print_stats_table(const locus::trace::trace_statistics& s, std::size_t prefill, bool recorded = false,
                              const std::vector<std::size_t>& model_layers = {}) {
  std::printf("%s, %s, %s, %s, top-%zu\n\n", tool_cli::counted(s.requests, "request").c_str(),
              tool_cli::counted(s.tokens, "token").c_str(), tool_cli::counted(s.layers, "layer").c_str(),
              tool_cli::counted(s.experts, "expert").c_str(), s.top_k);
  std::printf("%-16s %10s %10s\n", "domain", "requests", "tokens");
  for (std::size_t d = 0; d < s.domain_names.size(); ++d)
    std::printf("%-16s %10llu %10llu\n", one_line(s.domain_names[d]).c_str(),
                static_cast<unsigned long long>(s.popularity.requests[d]),
                static_cast<unsigned long long>(s.popularity.tokens[d]));
  const auto js = s.divergence.mean_per_layer();
  const std::string basis =
      recorded ? std::string("recorded phases") : "first " + std::to_string(prefill) + " tokens prefill";
  // Traced layers count from 0; where the trace knows the model's numbering, a column shows it.
  const bool named = model_layers.size() == s.layers;
  std::printf("\n%5s%s %9s %7s %7s %9s %10s %10s   (correlation: %s)\n", "layer", named ? " model" : "", "max/mean",
              "CV", "Gini", "JS(dom)", "corr mean", "corr med", basis.c_str());
  // Undefined values print "n/a", as JSON writes null: JS divergence with one domain, the
  // prefill/decode correlation of a trace without prefill tokens.
  const auto cell = [](double v, int width, int precision) {
    char buf[48];
    if (std::isfinite(v))
      std::snprintf(buf, sizeof buf, "%*.*f", width, precision, v);
    else
      std::snprintf(buf, sizeof buf, "%*s", width, "n/a");
    return std::string(buf);
  };
  for (std::size_t l = 0; l < s.layers; ++l) {
    char model[24] = "";
    if (named) std::snprintf(model, sizeof model, " %5zu", model_layers[l]);
    std::printf("%5zu%s %9.3f %7.3f %7.3f %s %s %s\n", l, model, s.layer_imbalance[l].max_over_mean,
                s.layer_imbalance[l].cv, s.layer_imbalance[l].gini, cell(js[l], 9, 4).c_str(),
                cell(s.correlation.mean[l], 10, 3).c_str(), cell(s.correlation.median[l], 10, 3).c_str());
  }
  double js_sum = 0;
  std::size_t js_n = 0;
  for (double v : js)
    if (std::isfinite(v)) js_sum += v, ++js_n;
  std::printf("%5s%s %9.3f %7.3f %7.3f %s %s\n", "mean", named ? "      " : "",
              s.mean_imbalance(&locus::trace::imbalance::max_over_mean), s.mean_imbalance(&locus::trace::imbalance::cv),
              s.mean_imbalance(&locus::trace::imbalance::gini),
              cell(js_n ? js_sum / static_cast<double>(js_n) : std::nan(""), 9, 4).c_str(),
              cell(s.correlation.overall_mean(), 10, 3).c_str());
}

//! Parses "E:K:L" (experts, top-k, layers) for --rescale.
inline locus::trace::rescale_options parse_rescale(const std::string& text) {
  locus::trace::rescale_options o;
  // Decimal digits only: sscanf's %zu took "-5" as 2^64 - 5, and " 8" or "+8" as 8.
  std::size_t* const parts[] = {&o.experts, &o.top_k, &o.layers};
  const char* at = text.data();
  const char* const end = text.data() + text.size();
  bool ok = true;
  for (std::size_t i = 0; i < 3 && ok; ++i) {
    const auto [next, ec] = std::from_chars(at, end, *parts[i]);
    ok = ec == std::errc{} && next != at && (i == 2 ? next == end : next != end && *next == ':');
    at = next + 1;
  }
  if (!ok)
    LOCUS_THROW(locus::config_error, "--rescale \"", text,
                "\": expected EXPERTS:TOP_K:LAYERS (whole numbers), e.g. 256:8:58 for the DeepSeek-V3 shape");
  return o;
}

//! Writes a finished text atomically (a failed run never leaves half a file behind).
inline void save(const std::filesystem::path& p, const std::ostringstream& text) {
  locus::write_file_atomically(p.string(), text.str());
}

//! A domain's file stem: `load_<name>` when the name is a plain file name ([A-Za-z0-9._-], at
//! most 64 characters, not "all", not "domain<digit>..."), else `load_domain<index>_<name with
//! anything else replaced by '_'>`. So no domain leaves the folder, and no two domains, or a domain
//! and the aggregate "load_all", share a file.
inline std::string domain_file_stem(std::size_t index, const std::string& name) {
  auto plain = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
  };
  bool ok = !name.empty() && name.size() <= 64 && name != "all" && name != "." && name != ".." &&
            !(name.rfind("domain", 0) == 0 && name.size() > 6 && name[6] >= '0' && name[6] <= '9');
  for (const char c : name)
    ok = ok && plain(c);
  if (ok) return "load_" + name;
  std::string s = "load_domain" + std::to_string(index) + "_";
  for (std::size_t i = 0; i < name.size() && i < 64; ++i)
    s += plain(name[i]) ? name[i] : '_';
  return s;
}

//! A CSV field: quoted, with quotes doubled, so that commas and newlines in domain names stay
//! inside their field.
inline std::string csv_quote(const std::string& x) {
  std::string r = "\"";
  for (const char c : x)
    r += c == '"' ? std::string("\"\"") : std::string(1, c);
  return r + "\"";
}

//! An exclusive lock on a folder (flock of the folder itself) while alive: two reports into one
//! folder take turns from reading the earlier summary to removing its files. A folder that cannot
//! be locked (a filesystem without flock) is written without it.
class folder_lock {
public:
  explicit folder_lock(const std::string& folder) : fd_(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {
    if (fd_ >= 0)
      while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
      }
  }
  ~folder_lock() {
    if (fd_ >= 0) ::close(fd_); // closing releases the lock
  }
  folder_lock(const folder_lock&) = delete;
  folder_lock& operator=(const folder_lock&) = delete;

private:
  int fd_;
};

//! The files the report already in `folder` listed in its summary (reports before the list came
//! name none) and `now` does not: plain names of regular files in the folder, nothing else.
inline std::vector<std::string> earlier_report_files(const std::string& folder, const nlohmann::json& now) {
  namespace fs = std::filesystem;
  std::vector<std::string> stale;
  const fs::path summary = fs::path(folder) / "summary.json";
  std::error_code ec;
  if (!fs::is_regular_file(summary, ec)) return stale;
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(locus::detail::read_whole_file(summary.string(), std::size_t{64} << 20, "a summary"));
  } catch (const std::exception&) {
    return stale; // not a report's summary: nothing of it is removed
  }
  // Looked at field by field: value() of a format that is no string would throw nlohmann's error.
  if (!doc.is_object()) return stale;
  const auto format = doc.find("format"), files = doc.find("files");
  if (format == doc.end() || !format->is_string() || *format != "locus.trace.report.summary" || files == doc.end() ||
      !files->is_array())
    return stale;
  for (const auto& f : *files) {
    if (!f.is_string()) continue;
    const std::string name = f.get<std::string>();
    // A NUL would cut the name short where the system reads it ("load_all.csv\0" is load_all.csv).
    const bool plain = !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
                       name.find('\0') == std::string::npos;
    // A regular file itself, not a link to one.
    if (plain && std::find(now.begin(), now.end(), f) == now.end() &&
        fs::is_regular_file(fs::symlink_status(fs::path(folder) / name, ec)))
      stale.push_back(name);
  }
  return stale;
}

} // namespace trace_analysis

inline void register_trace_stats(CLI::App& trace_cmd) {
  struct options {
    std::vector<std::string> paths;
    std::size_t prefill = 32;
    jsonl_reading how;
    std::string json;
    unsigned threads = 0;
  };
  auto o = std::make_shared<options>();
  auto* cmd = trace_cmd.add_subcommand("stats", "Statistics of a trace: load imbalance, domains, prefill/decode "
                                                "correlation (table, or JSON with --json -)");
  cmd->add_option("trace", o->paths, trace_help)->required()->expected(1, -1);
  auto* prefill = cmd->add_option("--prefill-tokens", o->prefill, prefill_help);
  cmd->add_option("--experts", o->how.experts, experts_help)->check(experts_range())->default_str(experts_default);
  cmd->add_flag("--split-on-restart", o->how.split_on_restart, split_on_restart_help);
  cmd->add_flag("--strict-layers", o->how.strict_layers, strict_layers_help);
  add_json_option(cmd, o->json);
  cmd->add_option("--threads", o->threads, "Worker threads (0 = all cores)")->check(thread_range());
  cmd->callback([o, prefill] {
    check_outputs({{"--json", o->json}}, o->paths);
    progress p("locus trace stats");
    bool recorded = false;
    const auto t = trace_analysis::load(o->paths, o->how, o->prefill, prefill->count() > 0, p, recorded);
    p.start("computing statistics");
    locus::trace::statistics_options so;
    so.coactivation = so.transitions = false;
    so.threads = o->threads;
    const auto s = locus::trace::compute_statistics(t, so);
    p.done();
    p.clear();
    const auto ids = t.has_model_layers() ? t.model_layer_ids() : std::vector<std::size_t>{};
    if (!stdout_taken({o->json})) trace_analysis::print_stats_table(s, o->prefill, recorded, ids);
    write_json(o->json, "trace stats", trace_analysis::stats_json(s, o->prefill, recorded, ids));
  });
}

inline void register_trace_synth(CLI::App& trace_cmd) {
  struct options {
    std::string out, fit_path, rescale, json;
    locus::trace::synth_shape shape;
    double mean_length = 180.0;
    std::uint32_t max_length = locus::trace::synth_domain{}.max_length;
    double segment_sigma = 0.0;
    std::size_t requests = 0, tokens = 100000;
    std::uint64_t seed = 1;
    unsigned threads = 0;
    jsonl_reading how; // of the --fit trace
  };
  auto o = std::make_shared<options>();
  auto* cmd = trace_cmd.add_subcommand(
      "synth", "Write a synthetic binary trace: from a shape, or fitted to a real trace (--fit) and optionally "
               "rescaled (--rescale 256:8:58)");
  cmd->add_option("--out", o->out, "Output binary trace file")->required();
  cmd->add_option("--fit", o->fit_path, "Fit the model to this trace (binary file, ESFT folder or route JSONL)")
      ->default_str("none: the shape mode's model");
  cmd->add_option("--rescale", o->rescale, "With --fit: rescale to EXPERTS:TOP_K:LAYERS, e.g. 256:8:58")
      ->default_str("none: the fitted shape");
  auto& sh = o->shape;
  auto* experts =
      cmd->add_option("--experts", sh.experts,
                      "Experts per layer (shape mode; with --fit: the expert count of a route JSONL trace or an ESFT "
                      "folder; a binary trace records its own)")
          ->check(CLI::Range(1, 65536))
          ->default_str("64 (shape mode); with --fit, the trace's");
  // The shape mode's model; with --fit the model is fitted to the trace and these are refused.
  const std::vector<CLI::Option*> shape_only = {
      cmd->add_option("--top-k", sh.top_k, "Experts per token (shape mode)")->check(CLI::Range(1, 64)),
      cmd->add_option("--layers", sh.layers, "MoE layers (shape mode)")
          ->check(tool_cli::positive_whole)
          ->check(CLI::Range(std::size_t{1}, locus::trace::max_trace_layers)),
      cmd->add_option("--domains", sh.domains, "Domains (shape mode)")->check(tool_cli::positive_whole),
      cmd->add_option("--zipf", sh.zipf, "Popularity skew: share of rank i ∝ (i+1)^-zipf (shape mode)")
          ->check(tool_cli::number_in(0, 8)),
      cmd->add_option("--domain-shift", sh.domain_shift, "0: domains alike .. 1: independent rankings (shape mode)")
          ->check(tool_cli::number_in(0, 1)),
      cmd->add_option("--clusters", sh.clusters, "Co-activation clusters per layer, 0 = none (shape mode)"),
      cmd->add_option("--cluster-probability", sh.cluster_probability,
                      "Share of tokens drawing from one cluster (shape mode)")
          ->check(tool_cli::number_in(0, 1)),
      cmd->add_option("--request-sigma", sh.request_sigma,
                      "Per-request log-normal spread, raises prefill/decode correlation (shape mode)")
          ->check(tool_cli::number_in(0, 10)),
      cmd->add_option("--segment-sigma", o->segment_sigma, "Per-16-token log-normal spread, lowers it (shape mode)")
          ->check(tool_cli::number_in(0, 10)),
      cmd->add_option("--mean-length", o->mean_length,
                      "Mean request length, log-normal, at most --max-length (shape mode)")
          ->check(CLI::Range(1.0, 1e6)),
      cmd->add_option("--length-sigma", sh.length_log_sigma, "σ of ln(length) (shape mode)")
          ->check(tool_cli::number_in(0, 5)),
      cmd->add_option("--max-length", o->max_length,
                      "Longest request: longer draws are cut to it (shape mode; a fitted model resamples the "
                      "trace's lengths)")
          ->check(CLI::Range(1, 1000000))};
  auto* fit_opt = cmd->get_option("--fit");
  cmd->add_flag("--split-on-restart", o->how.split_on_restart, split_on_restart_help)->needs(fit_opt);
  cmd->add_flag("--strict-layers", o->how.strict_layers, strict_layers_help)->needs(fit_opt);
  cmd->add_option("--prefill-tokens", sh.prefill_tokens,
                  "Leading tokens of each request marked prefill; with --fit also where the fit splits the trace's "
                  "requests into prefill and decode (the synthesizer's requests all have this prefill: phases the "
                  "trace records are not used)");
  cmd->add_option("--requests", o->requests, "Requests to sample (overrides --tokens)");
  cmd->add_option("--tokens", o->tokens, "Sample requests until at least this many tokens");
  cmd->add_option("--seed", o->seed, "Seed (the output is identical for equal seeds)");
  cmd->add_option("--threads", o->threads, "Worker threads (0 = all cores)")->check(thread_range());
  add_json_option(cmd, o->json);
  cmd->callback([o, experts, shape_only] {
    progress p("locus trace synth");
    for (const CLI::Option* opt : shape_only)
      LOCUS_REQUIRE(o->fit_path.empty() || opt->count() == 0, locus::config_error, opt->get_name(),
                    " sets the shape mode's model; with --fit the model is fitted to the trace");
    LOCUS_REQUIRE(o->mean_length <= o->max_length, locus::config_error, "--mean-length ", o->mean_length,
                  " is above --max-length ", o->max_length, ": requests would be cut to ", o->max_length,
                  " tokens (raise --max-length)");
    LOCUS_REQUIRE(o->rescale.empty() || !o->fit_path.empty(), locus::config_error,
                  "--rescale needs --fit TRACE (a shape is given directly with --experts/--top-k/--layers)");
    LOCUS_REQUIRE(o->requests > 0 || o->tokens > 0, locus::config_error, "--requests and --tokens are both 0");
    check_outputs({{"--out", o->out}, {"--json", o->json}}, {o->fit_path});
    // The target shape is checked before the trace is read and fitted (seconds of work).
    locus::trace::rescale_options ro;
    if (!o->rescale.empty()) {
      ro = trace_analysis::parse_rescale(o->rescale);
      locus::trace::check_synth_shape("--rescale", ro.experts, ro.top_k, ro.layers, 1);
    }
    locus::trace::synth_model m;
    if (!o->fit_path.empty()) {
      o->how.experts = experts->count() ? o->shape.experts : 0;
      const auto real = trace_analysis::load(o->fit_path, o->how, p);
      // The fit measures prefill against decode and resamples the trace's lengths: a count that covers
      // every request leaves nothing to measure, and a sample with no decode token.
      std::size_t longest = 0;
      for (std::size_t r = 0; r < real.requests(); ++r)
        longest = std::max<std::size_t>(longest, real.request(r).length);
      LOCUS_REQUIRE(o->shape.prefill_tokens < longest, locus::config_error, "--prefill-tokens ",
                    o->shape.prefill_tokens, " covers every request of ", o->fit_path, " (the longest has ", longest,
                    " tokens): the fit splits every request there (the phases a trace records are not used), so "
                    "it would see no decode token, and no synthesized request would have one (lower --prefill-tokens)");
      p.start("fitting the synthesizer");
      locus::trace::fit_options fo;
      fo.prefill_tokens = o->shape.prefill_tokens;
      fo.seed = o->seed;
      fo.threads = o->threads;
      m = locus::trace::fit(real, fo);
      p.done();
      if (!o->rescale.empty()) {
        ro.seed = o->seed;
        ro.threads = o->threads;
        p.start("rescaling to " + o->rescale);
        m = locus::trace::rescale(m, ro);
        p.done();
      }
    } else {
      auto shape = o->shape;
      shape.seed = o->seed;
      LOCUS_REQUIRE(shape.top_k <= shape.experts, locus::config_error, "--top-k ", shape.top_k, " exceeds --experts ",
                    shape.experts);
      shape.length_log_mean = std::log(o->mean_length) - 0.5 * shape.length_log_sigma * shape.length_log_sigma;
      m = locus::trace::make_synth_model(shape);
      m.segment_sigma = o->segment_sigma;
      for (auto& d : m.domains)
        d.max_length = o->max_length;
    }
    {
      // The sample is held in memory (6 bytes per token, layer and choice): refuse a size this
      // machine cannot hold instead of allocating until the kernel kills the process.
      const double tokens =
          o->requests ? static_cast<double>(o->requests) * o->mean_length : static_cast<double>(o->tokens);
      const double bytes = tokens * static_cast<double>(m.layers * m.top_k) * 6.0;
      const double machine =
          static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
      LOCUS_REQUIRE(machine <= 0 || bytes <= machine, locus::config_error, "trace synth: about ", tokens,
                    " tokens would need ", bytes / 1e9, " GB, this machine has ", machine / 1e9, " GB");
    }
    locus::trace::sample_options so;
    so.requests = o->requests;
    so.tokens = o->requests ? 0 : o->tokens;
    so.seed = o->seed;
    so.threads = o->threads;
    p.start("sampling");
    const auto t = locus::trace::sample(m, so);
    p.done();
    {
      // A trace with nothing to decode would be refused by every command that simulates or plans on it.
      std::size_t longest = 0;
      for (std::size_t r = 0; r < t.requests(); ++r)
        longest = std::max<std::size_t>(longest, t.request(r).length);
      LOCUS_REQUIRE(m.prefill_tokens < longest, locus::config_error, "--prefill-tokens ", m.prefill_tokens,
                    " covers every sampled request (the longest has ", longest,
                    " tokens): the trace would have no decode tokens (lower --prefill-tokens or raise --mean-length)");
    }
    output_set files; // the trace and its JSON together or not at all
    locus::trace::write_trace(t, files.open(o->out));
    p.clear();
    // What --fit learnt is a result: in the summary and the JSON, not on the progress stream.
    const bool fitted = !o->fit_path.empty();
    nlohmann::json doc = {{"out", o->out},          {"requests", t.requests()}, {"tokens", t.tokens()},
                          {"layers", t.layers()},   {"experts", t.experts()},   {"top_k", t.top_k()},
                          {"domains", t.domains()}, {"seed", o->seed}};
    if (fitted)
      doc["fitted"] = {{"request_sigma", m.request_sigma},
                       {"segment_sigma", m.segment_sigma},
                       {"cluster_probability", m.cluster_probability}};
    files.add_json(o->json, "trace synth", doc);
    files.commit();
    if (stdout_taken({o->json, o->out})) return;
    std::printf("%s: %s, %s, %s, %s, top-%zu, %s\n", one_line(o->out).c_str(),
                tool_cli::counted(t.requests(), "request").c_str(), tool_cli::counted(t.tokens(), "token").c_str(),
                tool_cli::counted(t.layers(), "layer").c_str(), tool_cli::counted(t.experts(), "expert").c_str(),
                t.top_k(), tool_cli::counted(t.domains().size(), "domain").c_str());
    if (fitted)
      std::printf("fitted: request σ %.3f, segment η %.3f, cluster probability %.3f\n", m.request_sigma,
                  m.segment_sigma, m.cluster_probability);
  });
}

//! The rendering script, found when the driver runs (a path compiled in named the build machine's
//! source folder and broke when the tree moved): beside an installed driver (<prefix>/share/locus),
//! else scripts/trace_report.py of the nearest folder above the driver that holds one (the checkout
//! it was built in), else scripts/trace_report.py from the working directory.
inline std::string default_report_script() {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto installed = exe.parent_path().parent_path() / "share" / "locus" / "trace_report.py";
    if (fs::is_regular_file(installed, ec)) return installed.string();
    for (fs::path dir = exe.parent_path(); !dir.empty(); dir = dir.parent_path()) {
      if (const auto p = dir / "scripts" / "trace_report.py"; fs::is_regular_file(p, ec)) return p.string();
      if (dir == dir.root_path()) break;
    }
  }
  return "scripts/trace_report.py";
}

inline void register_trace_report(CLI::App& trace_cmd) {
  struct options {
    std::vector<std::string> paths;
    std::string out = "trace_report", python = "/usr/bin/python3", script = default_report_script(), json;
    std::size_t prefill = 32;
    jsonl_reading how;
    long layer = -1;
    bool no_render = false;
    unsigned threads = 0;
  };
  auto o = std::make_shared<options>();
  auto* cmd = trace_cmd.add_subcommand("report", "Write CSV files and PNG figures (expert-load heatmaps per domain, "
                                                 "imbalance per layer, co-activation, prefill/decode scatter)");
  // The trace is read as `trace stats` reads it: the same inputs, flags and phases.
  cmd->add_option("trace", o->paths, trace_help)->required()->expected(1, -1);
  cmd->add_option("--out", o->out, "Output folder (made, with its parents, if missing)");
  auto* prefill = cmd->add_option("--prefill-tokens", o->prefill, prefill_help);
  cmd->add_option("--experts", o->how.experts, experts_help)->check(experts_range())->default_str(experts_default);
  cmd->add_flag("--split-on-restart", o->how.split_on_restart, split_on_restart_help);
  cmd->add_flag("--strict-layers", o->how.strict_layers, strict_layers_help);
  cmd->add_option("--layer", o->layer, "Layer of the co-activation heatmap and the scatter (-1: the middle one)")
      ->default_str("middle");
  cmd->add_option("--python", o->python, "Python interpreter with matplotlib");
  cmd->add_option("--script", o->script,
                  "The rendering script (default: share/locus/trace_report.py beside an installed driver, else "
                  "scripts/trace_report.py of the checkout above the driver or of the working directory)");
  cmd->add_flag("--no-render", o->no_render, "Write the CSV files only");
  add_json_option(cmd, o->json);
  cmd->add_option("--threads", o->threads, "Worker threads (0 = all cores)")->check(thread_range());
  cmd->callback([o, prefill] {
    namespace fs = std::filesystem;
    LOCUS_REQUIRE(o->layer >= -1, locus::config_error, "--layer ", o->layer,
                  " is not a layer (0, 1, ...; the default -1: the middle one)");
    // What rendering needs is checked before the statistics are computed.
    std::error_code ec;
    if (!o->no_render) {
      LOCUS_REQUIRE(fs::exists(o->script, ec), locus::io_error, "rendering script ", o->script,
                    " not found (give it with --script, or use --no-render for CSV only)");
      LOCUS_REQUIRE(fs::exists(o->python, ec), locus::io_error, "Python interpreter ", o->python,
                    " not found (install python3-matplotlib, give --python, or use --no-render)");
    }
    // The report's folder is checked now and made when the first file is written into it, so that a
    // report that ends before (a trace that is not there or does not read, Ctrl-C) leaves no folder;
    // --json may name a file inside it, which the folder's check covers.
    tool_cli::results_folder folder(o->out, "report folder");
    if (!folder.covers(o->json)) check_outputs({{"--json", o->json}}, o->paths);
    if (!o->json.empty() && !json_to_stdout(o->json)) {
      const auto folder_of = [](fs::path p) { return p.filename().empty() ? p.parent_path() : p; };
      const fs::path json = resolved_path(o->json);
      const std::string name = json.filename().string();
      LOCUS_REQUIRE(!(name == "summary.json" || name.ends_with(".csv") || name.ends_with(".png")) ||
                        json.parent_path() != folder_of(resolved_path(o->out)),
                    locus::config_error, "--json ", o->json, " is a name the report writes in ", o->out,
                    " (summary.json, *.csv, *.png): one would replace the other");
    }
    progress p("locus trace report");
    bool recorded = false;
    const auto t = trace_analysis::load(o->paths, o->how, o->prefill, prefill->count() > 0, p, recorded);
    const std::size_t layer = o->layer < 0 ? t.layers() / 2 : static_cast<std::size_t>(o->layer);
    LOCUS_REQUIRE(layer < t.layers(), locus::config_error, "--layer ", o->layer, " is out of range [0, ", t.layers(),
                  ")");
    p.start("computing statistics");
    locus::trace::statistics_options so;
    so.coactivation = so.transitions = false;
    so.threads = o->threads;
    const auto s = locus::trace::compute_statistics(t, so);
    const auto co = locus::trace::compute_coactivation(t, layer);
    p.done();
    // The report is written into a staging folder inside the report's, the figures are drawn there,
    // and only then does every file replace its namesake in the report folder: a report that fails
    // at any point (a drawing, a full disk) leaves the earlier report as it was.
    folder.make();
    const staging_folder stage(o->out, ".locus-report-");
    const fs::path& dir = stage.path();
    const std::size_t E = t.experts(), L = t.layers();
    // Expert load share per layer, one file per domain and one for all.
    for (std::size_t d = 0; d <= s.domain_names.size(); ++d) {
      const bool all = d == s.domain_names.size();
      std::ostringstream f;
      f << "layer";
      for (std::size_t e = 0; e < E; ++e)
        f << ",e" << e;
      f << "\n";
      for (std::size_t l = 0; l < L; ++l) {
        f << l;
        const double norm =
            1.0 / (static_cast<double>(all ? s.tokens : s.popularity.tokens[d]) * static_cast<double>(t.top_k()));
        for (std::size_t e = 0; e < E; ++e)
          f << "," << (all ? static_cast<double>(s.load.count(l, e)) * norm : s.popularity.row(d, l)[e]);
        f << "\n";
      }
      trace_analysis::save(
          dir / ((all ? std::string("load_all") : trace_analysis::domain_file_stem(d, s.domain_names[d])) + ".csv"), f);
    }
    {
      const auto js = s.divergence.mean_per_layer();
      std::ostringstream f;
      f << "layer,max_over_mean,cv,gini,domain_js_mean,correlation_mean,correlation_median\n";
      for (std::size_t l = 0; l < L; ++l)
        f << l << "," << s.layer_imbalance[l].max_over_mean << "," << s.layer_imbalance[l].cv << ","
          << s.layer_imbalance[l].gini << "," << js[l] << "," << s.correlation.mean[l] << "," << s.correlation.median[l]
          << "\n";
      trace_analysis::save(dir / "imbalance.csv", f);
    }
    {
      std::ostringstream f;
      f << "# layer " << layer << ": tokens choosing both experts (diagonal: tokens choosing the expert)\n";
      for (std::size_t i = 0; i < E; ++i) {
        for (std::size_t j = 0; j < E; ++j)
          f << (j ? "," : "") << co.at(i, j);
        f << "\n";
      }
      trace_analysis::save(dir / "coactivation.csv", f);
    }
    {
      // Per request and expert at the chosen layer: share of its prefill choices vs of its
      // decode choices (the scatter), and per request and layer the correlation. A request is
      // named as the trace names it (its id, or its logged string), so rows lead back to the log.
      std::ostringstream f;
      f << "request,domain,expert,prefill_share,decode_share\n";
      std::ostringstream g;
      g << "request,domain,layer,correlation\n";
      std::vector<double> a(E), b(E);
      for (std::size_t r = 0; r < t.requests(); ++r) {
        const auto& q = t.request(r);
        for (std::size_t l = 0; l < L; ++l)
          if (std::isfinite(s.correlation.at(r, l)))
            g << trace_analysis::csv_quote(t.request_key(r)) << ","
              << trace_analysis::csv_quote(s.domain_names[q.domain]) << "," << l << "," << s.correlation.at(r, l)
              << "\n";
        std::fill(a.begin(), a.end(), 0.0);
        std::fill(b.begin(), b.end(), 0.0);
        double na = 0, nb = 0;
        const auto v = t.request_layer(r, layer);
        for (std::size_t i = 0; i < q.length; ++i) {
          const bool pre = t.token_phase(q.first_token + i) == locus::trace::phase::prefill;
          for (std::size_t j = 0; j < t.top_k(); ++j)
            (pre ? a : b)[v.expert(i, j)] += 1, (pre ? na : nb) += 1;
        }
        if (na == 0 || nb == 0) continue;
        for (std::size_t e = 0; e < E; ++e)
          if (a[e] > 0 || b[e] > 0)
            f << trace_analysis::csv_quote(t.request_key(r)) << ","
              << trace_analysis::csv_quote(s.domain_names[q.domain]) << "," << e << "," << a[e] / na << "," << b[e] / nb
              << "\n";
      }
      trace_analysis::save(dir / "prefill_decode.csv", f);
      trace_analysis::save(dir / "correlation.csv", g);
    }
    nlohmann::json summary;
    {
      auto j = trace_analysis::stats_json(s, o->prefill, recorded,
                                          t.has_model_layers() ? t.model_layer_ids() : std::vector<std::size_t>{});
      j["format"] = "locus.trace.report.summary";
      j["version"] = 1;
      j["report_layer"] = layer;
      j["source"] = o->paths.size() == 1 ? nlohmann::json(o->paths.front()) : nlohmann::json(o->paths);
      for (std::size_t d = 0; d < s.domain_names.size(); ++d)
        j["domains"][d]["file"] = trace_analysis::domain_file_stem(d, s.domain_names[d]);
      std::ostringstream f;
      f << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      trace_analysis::save(dir / "summary.json", f);
      summary = std::move(j);
    }
    if (!o->no_render) {
      p.start("rendering figures");
      const std::string command =
          shell_quote(o->python) + " " + shell_quote(o->script) + " " + shell_quote(dir.string());
      const int rc = std::system(command.c_str());
      p.done();
      LOCUS_REQUIRE(rc == 0, locus::io_error, "rendering the figures (", o->python, " ", o->script,
                    ") failed (exit status ", exit_status(rc), "); the report folder is unchanged");
      p.clear();
    }
    // The summary lists the report's files: a later report into this folder removes those it does
    // not write again (a trace of other domains leaves no earlier domain's file), and nothing else.
    {
      auto listed = stage.file_names();
      summary["files"] = listed;
      std::ostringstream f;
      f << summary.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      trace_analysis::save(dir / "summary.json", f);
    }
    // Held from reading the earlier summary to the last removal: a report written meanwhile into
    // the same folder would otherwise lose files its own summary lists.
    const trace_analysis::folder_lock lock(o->out);
    const auto stale = trace_analysis::earlier_report_files(o->out, summary["files"]);
    output_set files;
    const auto names = stage.add_files_to(files, o->out);
    const auto pngs =
        std::count_if(names.begin(), names.end(), [](const std::string& n) { return n.ends_with(".png"); });
    // A script that exits 0 without drawing (another script, an empty file) is no rendering.
    LOCUS_REQUIRE(o->no_render || pngs > 0, locus::io_error, "rendering the figures (", o->python, " ", o->script,
                  ") drew no figure; the report folder is unchanged");
    files.add_json(o->json, "trace report", summary);
    files.commit();
    std::size_t removed = 0;
    for (const auto& name : stale) {
      std::error_code removal;
      // Never what this run just wrote: its --json may sit in the folder under a listed name.
      if (!o->json.empty() && !json_to_stdout(o->json) && fs::equivalent(fs::path(o->out) / name, o->json, removal))
        continue;
      removed += fs::remove(fs::path(o->out) / name, removal);
    }
    if (stdout_taken({o->json})) return; // stdout carries the JSON alone
    std::printf("%s: CSV files written%s%s\n", one_line(o->out).c_str(),
                o->no_render ? "" : (", " + std::to_string(pngs) + " figures rendered").c_str(),
                removed ? ("; " + tool_cli::counted(removed, "file") + " of the earlier report removed").c_str() : "");
  });
}

//! Registers stats, synth and report under `locus trace`.
inline void register_trace_analysis(CLI::App* trace_cmd) {
  register_trace_stats(*trace_cmd);
  register_trace_synth(*trace_cmd);
  register_trace_report(*trace_cmd);
}

} // namespace locus_driver
