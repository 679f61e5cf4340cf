// Question: how many bytes cross the network per decode token, for each placement x grouper x
// transport, on real routing traces? Fits on a training split of requests, evaluates on the
// disjoint test split; every figure is also given relative to the baseline measured in the same
// run (linear placement, round-robin grouping, flat transport, same topology).
//
//   comm_volume [--trace DIR_OR_FILE] [--out DIR] [--split-seed S] [--prefill-tokens P]
// Writes DIR/comm_volume.json and DIR/comm_volume.md; bench/plot_comm_volume.py draws the PNG.
#include <locus/cost/simulation_json.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/trace_load.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct row_config {
  std::string placement;
  std::size_t redundant = 0;
  std::string grouper;
  locus::cost::transport_kind transport;
};

struct topology_case {
  std::size_t nodes, gpus;
};

std::string arg_value(int argc, char** argv, const std::string& name, const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return argv[i + 1];
  return fallback;
}

} // namespace

int main(int argc, char** argv) try {
  const std::string trace_path = arg_value(argc, argv, "--trace", LOCUS_DEFAULT_TRACE);
  const std::string out_dir = arg_value(argc, argv, "--out", ".");
  const auto seed = std::stoull(arg_value(argc, argv, "--split-seed", "1"));
  const auto prefill = std::stoul(arg_value(argc, argv, "--prefill-tokens", "32"));
  const auto hidden = std::stoul(arg_value(argc, argv, "--hidden", "2048"));
  if (!std::filesystem::exists(trace_path)) {
    std::printf("comm_volume: trace %s not found; skipped\n", trace_path.c_str());
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto full = (std::filesystem::is_directory(trace_path) ? locus::trace::import_esft(trace_path)
                                                                 : locus::trace::read_trace(trace_path))
                        .with_prefill_tokens(prefill);
  const auto [train, test] = locus::trace::split_by_request(full, 0.5, seed);

  const std::vector<topology_case> topologies = {{2, 4}, {4, 2}, {4, 4}, {8, 1}};
  std::vector<row_config> rows;
  for (const char* placement : {"linear", "round_robin", "eplb"})
    for (const char* grouper : {"round_robin", "least_loaded"})
      for (auto transport : {locus::cost::transport_kind::flat, locus::cost::transport_kind::hierarchical})
        rows.push_back({placement, std::string(placement) == "eplb" ? 1u : 0u, grouper, transport});

  nlohmann::json doc = {{"trace", trace_path},       {"split_seed", seed},
                        {"prefill_tokens", prefill}, {"hidden", hidden},
                        {"train_requests", train.requests()}, {"test_requests", test.requests()},
                        {"rows", nlohmann::json::array()}};
  std::string md = "| topology | placement | redundant/GPU | grouper | transport | inter-node B/token | vs baseline | "
                   "norm. a2a median | p90 | GPU max/mean (step) | (aggregate) | layer time µs (model) |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& tc : topologies) {
    const locus::dynamic_topology topo(tc.nodes, tc.gpus);
    locus::cost::simulation_config cfg;
    cfg.topology = topo;
    cfg.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(hidden);
    cfg.batch_per_rank = 16;
    cfg.seed = seed;
    locus::cost::simulation_result baseline;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const row_config& row = rows[i];
      cfg.transport = row.transport;
      const auto maps = locus::placement::plan_by_name(
          row.placement, locus::placement::plan_input_from_trace(train, topo, row.redundant), {1});
      auto grouper = locus::grouper::grouper_by_name(row.grouper);
      const auto res = locus::cost::simulate_decode(test, maps, grouper, cfg);
      if (i == 0) baseline = res; // linear / round_robin / flat
      auto j = locus::cost::simulation_summary_json(res, &baseline);
      const double ratio = res.inter_node_bytes_per_token / baseline.inter_node_bytes_per_token;
      j["topology"] = std::to_string(tc.nodes) + "x" + std::to_string(tc.gpus);
      j["placement"] = row.placement;
      j["redundant_slots_per_gpu"] = row.redundant;
      j["grouper"] = row.grouper;
      j["transport"] = locus::cost::to_string(row.transport);
      j["inter_node_bytes_vs_baseline"] = ratio;
      doc["rows"].push_back(j);
      char line[512];
      std::snprintf(line, sizeof line, "| %s | %s | %zu | %s | %s | %.0f | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f |\n",
                    j["topology"].get<std::string>().c_str(), row.placement.c_str(), row.redundant,
                    row.grouper.c_str(), locus::cost::to_string(row.transport), res.inter_node_bytes_per_token, ratio,
                    j["normalized_all2all_median"].get<double>(), j["normalized_all2all_p90"].get<double>(),
                    res.gpu_imbalance_step_mean, res.gpu_imbalance_aggregate, res.layer_time_estimate_us);
      md += line;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  doc["seconds"] = seconds;
  std::filesystem::create_directories(out_dir);
  std::ofstream(out_dir + "/comm_volume.json") << doc.dump(1) << '\n';
  std::ofstream(out_dir + "/comm_volume.md")
      << "# Communication volume on ESFT (test split)\n\nProduced by `build/test/bench/comm_volume --trace "
         "../shared/traces/esft --out docs/results` in "
      << static_cast<int>(seconds + 0.5)
      << " s. Fit on a training split of requests (seed " << seed << "), evaluated on the disjoint test split; prefill = "
      << "first " << prefill << " tokens of each request, decode = the rest; FP8 dispatch / BF16 combine of hidden "
      << hidden << "; 16 running requests per GPU. \"vs baseline\" divides by linear / round_robin / flat in the same "
         "topology, measured in the same run. Time is the alpha-beta model's, not a measurement.\n\n"
      << md;
  std::printf("%s", md.c_str());
  std::printf("\n%zu rows in %.1f s; wrote %s/comm_volume.{json,md}\n", doc["rows"].size(), seconds, out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "comm_volume: %s\n", e.what());
  return 1;
}
