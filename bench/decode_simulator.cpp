// Question: does the trace-driven decode simulator handle a DeepSeek-V3-sized deployment (256
// experts, top-8, 58 MoE layers, 8 nodes x 8 GPUs, 100k decode tokens) in seconds on one core,
// and how much faster is its counting than a straightforward per-token count of the same traffic?
//
// Baseline (same run, same tokens): for every decode token and layer, collect the destination
// ranks of its k experts in a std::set and count those on other nodes. With linear placement, a
// round-robin grouper and room for every request at once, request r runs on rank r mod 64 for its
// whole decode, so both must find exactly the same inter-node copies; the program checks that.
//
//   decode_simulator [--requests N] [--decode-tokens D] [--out DIR]
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/placement/linear.hpp>
#include <locus/placement/trace_load.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

// Skewed routing: per domain and layer a Zipf(1.0) popularity over a shuffled expert order;
// each token draws k distinct experts from it.
locus::trace::trace make_trace(std::size_t requests, std::size_t prefill, std::size_t decode) {
  constexpr std::size_t experts = 256, k = 8, layers = 58, domains = 4;
  std::mt19937_64 rng(7);
  std::vector<std::vector<std::discrete_distribution<int>>> popularity(domains);
  for (std::size_t d = 0; d < domains; ++d)
    for (std::size_t l = 0; l < layers; ++l) {
      std::vector<double> w(experts);
      for (std::size_t e = 0; e < experts; ++e)
        w[e] = 1.0 / static_cast<double>(e + 1);
      std::shuffle(w.begin(), w.end(), rng);
      popularity[d].emplace_back(w.begin(), w.end());
    }
  locus::trace::trace_builder b(experts, k, layers);
  b.set_domains({"code", "math", "chat", "general"});
  const std::size_t length = prefill + decode;
  b.reserve_tokens(requests * length);
  for (std::size_t r = 0; r < requests; ++r) {
    const auto d = static_cast<std::uint32_t>(r % domains);
    const std::size_t q = b.add_request(r, d, length);
    (void)q;
    const std::size_t first = r * length;
    for (std::size_t t = 0; t < length; ++t) {
      b.set_token(first + t, t < prefill ? locus::trace::phase::prefill : locus::trace::phase::decode,
                  t < prefill ? -1 : static_cast<std::int32_t>(t - prefill));
      for (std::size_t l = 0; l < layers; ++l) {
        auto ids = b.ids(l, first + t);
        auto weights = b.weights(l, first + t);
        for (std::size_t j = 0; j < k; ++j) {
          int e;
          do
            e = popularity[d][l](rng);
          while (std::find(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(j), e) !=
                 ids.begin() + static_cast<std::ptrdiff_t>(j));
          ids[j] = static_cast<locus::trace::trace_expert_id>(e);
          weights[j] = 1.0f / k;
        }
      }
    }
  }
  return b.build();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Decode simulator at DeepSeek-V3 size (8 x 8 GPUs) on one core"};
  tool_cli::show_defaults(app);
  std::size_t requests = 400, decode = 250;
  std::string out_dir = ".";
  app.add_option("--requests", requests, "Requests in the synthetic trace")->check(tool_cli::positive);
  app.add_option("--decode-tokens", decode, "Decode tokens per request")->check(tool_cli::positive);
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/decode_simulator");
  constexpr std::size_t prefill = 32, nodes = 8, gpus = 8;

  auto t0 = std::chrono::steady_clock::now();
  const auto trace = make_trace(requests, prefill, decode);
  const double make_s = seconds_since(t0);

  const locus::dynamic_topology topo(nodes, gpus);
  const std::size_t ranks = topo.ranks();
  const auto maps = locus::placement::linear{}.plan(locus::placement::plan_input_from_trace(trace, topo, 0));
  locus::cost::simulation_config cfg;
  cfg.topology = topo;
  cfg.transport = locus::cost::transport_kind::flat;
  cfg.batch_per_rank = (requests + ranks - 1) / ranks; // every request runs from step 0
  locus::grouper::round_robin grouper;

  t0 = std::chrono::steady_clock::now();
  const auto sim = locus::cost::simulate_decode(trace, maps, grouper, cfg);
  const double sim_s = seconds_since(t0);
  std::uint64_t sim_copies = 0;
  for (const auto& l : sim.layers)
    sim_copies += l.copies[static_cast<std::size_t>(locus::link_class::inter_node)];

  // Baseline: per token and layer, a std::set of destination ranks.
  t0 = std::chrono::steady_clock::now();
  std::uint64_t ref_copies = 0;
  for (std::size_t r = 0; r < trace.requests(); ++r) {
    const auto& q = trace.request(r);
    const std::size_t src_node = topo.node_of(r % ranks);
    for (std::size_t tok = q.first_token; tok < q.first_token + q.length; ++tok) {
      if (trace.token_phase(tok) != locus::trace::phase::decode) continue;
      for (std::size_t l = 0; l < trace.layers(); ++l) {
        const auto* ids = trace.layer(l).token_ids(tok);
        std::set<std::size_t> dest;
        for (std::size_t j = 0; j < trace.top_k(); ++j)
          dest.insert(maps[l].replicas(ids[j])[0].rank);
        for (std::size_t d : dest)
          ref_copies += topo.node_of(d) != src_node;
      }
    }
  }
  const double ref_s = seconds_since(t0);
  const bool match = ref_copies == sim_copies;

  const double token_layers = static_cast<double>(sim.decode_tokens) * static_cast<double>(trace.layers());
  nlohmann::json doc = {{"command", run.command},
                        {"machine", run.machine},
                        {"experts", 256},
                        {"top_k", 8},
                        {"layers", trace.layers()},
                        {"ranks", ranks},
                        {"decode_tokens", sim.decode_tokens},
                        {"steps", sim.steps},
                        {"trace_build_seconds", make_s},
                        {"simulator_seconds", sim_s},
                        {"baseline_seconds", ref_s},
                        {"speedup_vs_baseline", ref_s / sim_s},
                        {"simulator_token_layers_per_second", token_layers / sim_s},
                        {"inter_node_copies", sim_copies},
                        {"baseline_inter_node_copies", ref_copies},
                        {"copies_match", match}};
  bench_output::files()[folder.file("decode_simulator.json")] << doc.dump(1) << '\n';

  std::printf("DeepSeek-V3 shape: 256 experts, top-8, %zu layers, %zux%zu ranks, %llu decode tokens, %zu steps\n",
              trace.layers(), nodes, gpus, static_cast<unsigned long long>(sim.decode_tokens), sim.steps);
  std::printf("(synthetic trace built in %.2f s)\n\n", make_s);
  std::printf("| what | seconds | token-layers/s | vs baseline |\n|---|---|---|---|\n");
  std::printf("| per-token std::set count (baseline) | %.2f | %.3g | 1.00 |\n", ref_s, token_layers / ref_s);
  std::printf("| simulate_decode (full simulation, all metrics) | %.2f | %.3g | %.2fx |\n", sim_s, token_layers / sim_s,
              ref_s / sim_s);
  std::printf("\ninter-node copies: simulator %llu, baseline %llu: %s\n", static_cast<unsigned long long>(sim_copies),
              static_cast<unsigned long long>(ref_copies), match ? "equal" : "MISMATCH");
  return match ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "decode_simulator: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
