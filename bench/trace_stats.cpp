// Question: how fast are the trace statistics and the synthesizer? Statistics over all of ESFT
// (target < 0.5 s) against a straightforward per-token, std::map-based computation of the same
// numbers in the same run (results checked equal); synthesizer fit / rescale / sample timing at
// DeepSeek-V3 size (256 experts, top-8, 58 layers, ~100k tokens) against a straightforward
// sampler (each choice a linear scan over the remaining experts) on a slice of the same size.
//
//   trace_stats [--trace DIR_OR_FILE] [--out DIR] [--md FILE] [--repeats N] [--tokens N]
// Writes DIR/trace_stats.json and, with --md, the markdown table.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/trace/statistics.hpp>
#include <locus/trace/synthesizer.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace {

template <class F>
double best_of(std::size_t repeats, F&& f) {
  double best = 1e30;
  for (std::size_t i = 0; i < repeats; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return best;
}

using locus::trace::trace;

//! The baseline: every statistic computed the obvious way, token by token, into std::map.
struct baseline_result {
  std::vector<std::map<int, long>> load;                          // per layer
  std::vector<double> gini;                                       // per layer
  std::vector<double> corr_mean;                                  // per layer
  std::vector<std::map<std::pair<int, int>, long>> co, tr;        // per layer / layer pair
  std::map<std::pair<int, int>, std::map<int, long>> domain_load; // (domain, layer) -> expert -> count
};

baseline_result baseline(const trace& t) {
  baseline_result b;
  const std::size_t L = t.layers(), E = t.experts();
  b.load.resize(L);
  b.co.resize(L);
  b.tr.resize(L > 0 ? L - 1 : 0);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    for (std::size_t i = 0; i < q.length; ++i) {
      const std::size_t tok = q.first_token + i;
      for (std::size_t l = 0; l < L; ++l) {
        std::set<int> chosen;
        for (std::size_t j = 0; j < t.top_k(); ++j) {
          const int e = t.layer(l).expert(tok, j);
          ++b.load[l][e];
          ++b.domain_load[{static_cast<int>(q.domain), static_cast<int>(l)}][e];
          chosen.insert(e);
          if (l + 1 < L)
            for (std::size_t y = 0; y < t.top_k(); ++y)
              ++b.tr[l][{e, static_cast<int>(t.layer(l + 1).expert(tok, y))}];
        }
        for (int x : chosen)
          for (int y : chosen)
            ++b.co[l][{x, y}];
      }
    }
  }
  for (std::size_t l = 0; l < L; ++l) {
    std::vector<double> x(E, 0.0);
    for (auto [e, c] : b.load[l])
      x[static_cast<std::size_t>(e)] = static_cast<double>(c);
    std::sort(x.begin(), x.end());
    double s = 0, sum = 0;
    for (std::size_t i = 0; i < E; ++i)
      s += (2.0 * static_cast<double>(i + 1) - static_cast<double>(E) - 1.0) * x[i], sum += x[i];
    b.gini.push_back(s / (static_cast<double>(E) * sum));
    double cs = 0;
    std::size_t cn = 0;
    for (std::size_t r = 0; r < t.requests(); ++r) {
      std::map<int, double> pre, dec;
      const auto& q = t.request(r);
      for (std::size_t i = 0; i < q.length; ++i)
        for (std::size_t j = 0; j < t.top_k(); ++j)
          (t.token_phase(q.first_token + i) == locus::trace::phase::prefill
               ? pre
               : dec)[t.layer(l).expert(q.first_token + i, j)] += 1;
      if (pre.empty() || dec.empty()) continue;
      double ma = 0, mb = 0;
      for (std::size_t e = 0; e < E; ++e)
        ma += pre[static_cast<int>(e)], mb += dec[static_cast<int>(e)];
      ma /= static_cast<double>(E);
      mb /= static_cast<double>(E);
      double sab = 0, saa = 0, sbb = 0;
      for (std::size_t e = 0; e < E; ++e) {
        const double a = pre[static_cast<int>(e)] - ma, c = dec[static_cast<int>(e)] - mb;
        sab += a * c, saa += a * a, sbb += c * c;
      }
      if (saa > 0 && sbb > 0) cs += sab / std::sqrt(saa * sbb), ++cn;
    }
    b.corr_mean.push_back(cn ? cs / static_cast<double>(cn) : std::nan(""));
  }
  return b;
}

//! The straightforward sampler: per token, k choices, each a linear scan over the weights of the
//! experts not yet chosen (what one writes first). Same model, same number of tokens.
std::size_t naive_sample(const locus::trace::synth_model& m, std::size_t tokens, std::uint64_t seed) {
  locus::trace::detail::splitmix64 g(seed);
  std::vector<double> w(m.experts);
  std::vector<char> taken(m.experts);
  std::size_t checksum = 0;
  const auto& pop = m.domains[0].sampling_weights.empty() ? m.domains[0].popularity : m.domains[0].sampling_weights;
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t l = 0; l < m.layers; ++l) {
      for (std::size_t e = 0; e < m.experts; ++e)
        w[e] = pop[l * m.experts + e];
      std::fill(taken.begin(), taken.end(), 0);
      for (std::size_t j = 0; j < m.top_k; ++j) {
        double total = 0;
        for (std::size_t e = 0; e < m.experts; ++e)
          total += taken[e] ? 0.0 : w[e];
        double u = g.uniform() * total;
        std::size_t pick = 0;
        for (std::size_t e = 0; e < m.experts; ++e) {
          if (taken[e]) continue;
          pick = e;
          u -= w[e];
          if (u < 0) break;
        }
        taken[pick] = 1;
        checksum += pick;
      }
    }
  return checksum;
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Trace statistics (against a std::map baseline) and the synthesizer at DeepSeek-V3 size"};
  tool_cli::show_defaults(app);
  std::string trace_path, out_dir = ".", md_path;
  std::size_t repeats = 5, v3_tokens = 100000;
  const CLI::Option* trace_opt = bench_args::add_trace_option(app, trace_path, "ESFT folder or binary trace");
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  app.add_option("--md", md_path, "Markdown report file (default: none)");
  app.add_option("--repeats", repeats, "Timed runs per row (best kept)")->check(tool_cli::positive);
  app.add_option("--tokens", v3_tokens, "Tokens of the synthetic DeepSeek-V3 trace")->check(tool_cli::positive);
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  trace_path = bench_args::trace_to_read(*trace_opt, trace_path);
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  if (!md_path.empty()) folder.check_file(md_path); // its folder must exist (or be --out), as for every results file
  bench_output::require_distinct((std::filesystem::path(folder.path()) / "trace_stats.json").string(), md_path);
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/trace_stats");
  const auto real = bench_args::load_trace(trace_path);
  const auto t = real.with_prefill_tokens(32);

  // 1. Statistics over the whole trace.
  locus::trace::trace_statistics s;
  const double t_stats = best_of(repeats, [&] { s = locus::trace::compute_statistics(t); });
  baseline_result b;
  const double t_base = best_of(1, [&] { b = baseline(t); });
  std::size_t mismatches = 0;
  for (std::size_t l = 0; l < t.layers(); ++l) {
    for (std::size_t e = 0; e < t.experts(); ++e) {
      const auto it = b.load[l].find(static_cast<int>(e));
      mismatches += s.load.count(l, e) != static_cast<std::uint64_t>(it == b.load[l].end() ? 0 : it->second);
    }
    mismatches += std::fabs(s.layer_imbalance[l].gini - b.gini[l]) > 1e-9;
    mismatches += std::fabs(s.correlation.mean[l] - b.corr_mean[l]) > 1e-9;
    for (auto [key, c] : b.co[l])
      mismatches += s.coactivations[l].at(key.first, key.second) != static_cast<std::uint64_t>(c);
    if (l + 1 < t.layers())
      for (auto [key, c] : b.tr[l])
        mismatches += s.transitions[l].at(key.first, key.second) != static_cast<std::uint64_t>(c);
  }
  if (mismatches) {
    std::fprintf(stderr, "trace_stats: %zu mismatches between the library and the baseline\n", mismatches);
    return 1;
  }

  // 2. Synthesizer at DeepSeek-V3 size.
  locus::trace::synth_model m;
  const double t_fit = best_of(1, [&] { m = locus::trace::fit(real); });
  locus::trace::synth_model v3;
  const double t_rescale = best_of(1, [&] { v3 = locus::trace::rescale(m, {}); });
  locus::trace::sample_options so;
  so.tokens = v3_tokens;
  std::size_t sampled = 0;
  const double t_sample =
      best_of(std::max<std::size_t>(1, repeats / 2), [&] { sampled = locus::trace::sample(v3, so).tokens(); });
  const std::size_t naive_tokens = std::max<std::size_t>(1, v3_tokens / 20);
  volatile std::size_t sink = 0;
  const double t_naive = best_of(1, [&] { sink = naive_sample(v3, naive_tokens, 7); });
  (void)sink;
  const double synth_rate = static_cast<double>(sampled) / t_sample;
  const double naive_rate = static_cast<double>(naive_tokens) / t_naive;

  nlohmann::json j;
  j["command"] = run.command;
  j["machine"] = run.machine;
  j["trace"] = trace_path;
  j["requests"] = t.requests();
  j["tokens"] = t.tokens();
  j["statistics_seconds"] = t_stats;
  j["baseline_seconds"] = t_base;
  j["statistics_speedup"] = t_base / t_stats;
  j["statistics_target_seconds"] = 0.5;
  j["fit_seconds"] = t_fit;
  j["rescale_seconds"] = t_rescale;
  j["v3_sample_tokens"] = sampled;
  j["v3_sample_seconds"] = t_sample;
  j["v3_tokens_per_second"] = synth_rate;
  j["naive_sampler_tokens_per_second"] = naive_rate;
  j["sampler_speedup"] = synth_rate / naive_rate;
  j["threads"] = locus::default_host_threads();
  bench_output::files files; // the two together or neither
  files[folder.file("trace_stats.json")] << j.dump(2) << "\n";

  char table[2048];
  std::snprintf(table, sizeof table,
                "| what | locus | baseline | ratio |\n"
                "| --- | ---: | ---: | ---: |\n"
                "| statistics over ESFT (%zu tokens; load, imbalance, domains, JS, correlation, co-activation, "
                "transitions) | %.3f s | %.3f s (std::map per token) | %.1fx |\n"
                "| sample at DeepSeek-V3 shape (256 experts, top-8, 58 layers) | %.0f tokens/s | %.0f tokens/s "
                "(linear scan per choice) | %.1fx |\n"
                "| fit to ESFT | %.2f s | | |\n"
                "| rescale to 256:8:58 (with calibration) | %.2f s | | |\n"
                "| sample %zu tokens at 256:8:58 | %.2f s | | |\n",
                t.tokens(), t_stats, t_base, t_base / t_stats, synth_rate, naive_rate, synth_rate / naive_rate, t_fit,
                t_rescale, sampled, t_sample);
  if (!md_path.empty()) {
    auto& md = files[md_path];
    md << "# Trace statistics and synthesizer speed\n\n"
       << "Produced by `" << run.command << "` on " << run.machine << " (" << locus::default_host_threads()
       << " hardware threads; the development machine is shared, so times are upper bounds). The baseline "
          "statistics are checked equal to the library's before timing is reported.\n\n"
       << table << "\nTarget: statistics over ESFT under 0.5 s (" << (t_stats < 0.5 ? "met" : "NOT met") << ").\n";
  }
  std::printf("\n%s", table);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "trace_stats: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
