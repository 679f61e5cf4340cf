// Question: how long does `rebalance_experts` (DeepSeek's EPLB, re-implemented) take at DeepSeek-V3
// shape (58 MoE layers × 256 experts, 320 physical slots, 8 groups, 8 nodes × 8 GPUs), hierarchical
// and global policies, and how well does it balance? Baseline in the same run: the linear planner
// (one expert per slot in id order, the remaining 64 slots replicating nothing) on the same loads.
// Loads are synthetic and seeded: lognormal per expert (σ = 1), scaled to token counts.
//
//   eplb [--out DIR] [--repeats N]
// Writes DIR/eplb.json; prints a table last.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/placement/eplb.hpp>
#include <locus/placement/linear.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

using bench_args::cpu_now;

// Mean over layers of max/mean GPU load, each replica carrying load / replica count.
double max_over_mean(const std::vector<locus::expert_map>& maps, const locus::placement::plan_input& in) {
  double sum = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    std::vector<double> gpu(in.ranks(), 0.0);
    double total = 0;
    for (std::size_t e = 0; e < in.experts; ++e) {
      total += in.load[l][e];
      for (const auto& s : maps[l].replicas(e))
        gpu[static_cast<std::size_t>(s.rank)] += in.load[l][e] / static_cast<double>(maps[l].replica_count(e));
    }
    sum += *std::max_element(gpu.begin(), gpu.end()) / (total / static_cast<double>(gpu.size()));
  }
  return sum / static_cast<double>(maps.size());
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"DeepSeek's EPLB (rebalance_experts) at DeepSeek-V3 shape, beside linear"};
  tool_cli::show_defaults(app);
  std::string out_dir = ".";
  int repeats = 5;
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  app.add_option("--repeats", repeats, "Timed runs per planner (best kept)")->check(CLI::Range(1, 1000));
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/eplb");
  const std::size_t layers = 58, experts = 256, nodes = 8, gpus = 8, slots_per_rank = 5, groups = 8;

  locus::placement::plan_input in;
  in.topology = locus::dynamic_topology(nodes, gpus);
  in.experts = experts;
  in.slots_per_rank = slots_per_rank;
  std::mt19937 rng(1);
  std::lognormal_distribution<double> skew(0.0, 1.0);
  in.load.assign(layers, std::vector<double>(experts));
  for (auto& layer : in.load)
    for (double& x : layer)
      x = std::round(1000 * skew(rng));

  // Best of `repeats` CPU times of one call of `f`, each the mean over enough calls to take 20 ms:
  // linear plans in tens of microseconds, and the ratios divide by its time.
  auto best_of = [&](auto&& f) {
    double best = 1e300;
    for (int r = 0; r < repeats; ++r) {
      std::size_t calls = 0;
      const double t0 = cpu_now();
      double t = 0;
      do {
        f();
        ++calls;
        t = cpu_now() - t0;
      } while (t < 0.02);
      best = std::min(best, t / static_cast<double>(calls));
    }
    return best;
  };
  std::vector<locus::expert_map> hier, global, lin;
  const double hier_s = best_of([&] { hier = locus::placement::eplb{groups}.plan(in); });
  const double global_s = best_of([&] { global = locus::placement::eplb{1}.plan(in); });
  const double lin_s = best_of([&] { lin = locus::placement::linear{}.plan(in); });
  const double hier_b = max_over_mean(hier, in), global_b = max_over_mean(global, in), lin_b = max_over_mean(lin, in);

  const nlohmann::json doc = {{"command", run.command},
                              {"machine", run.machine},
                              {"layers", layers},
                              {"experts", experts},
                              {"physical_slots", nodes * gpus * slots_per_rank},
                              {"nodes", nodes},
                              {"gpus", nodes * gpus},
                              {"groups", groups},
                              {"repeats", repeats},
                              {"eplb_hierarchical_s", hier_s},
                              {"eplb_global_s", global_s},
                              {"linear_s", lin_s},
                              {"eplb_hierarchical_max_over_mean", hier_b},
                              {"eplb_global_max_over_mean", global_b},
                              {"linear_max_over_mean", lin_b},
                              {"eplb_hierarchical_time_over_linear", hier_s / lin_s},
                              {"eplb_global_time_over_linear", global_s / lin_s},
                              {"eplb_hierarchical_balance_over_linear", hier_b / lin_b},
                              {"eplb_global_balance_over_linear", global_b / lin_b}};
  const std::string path = folder.file("eplb.json");
  bench_output::files()[path] << doc.dump(1) << '\n';

  std::printf("Times are the best of %d CPU times of one thread per plan of all %zu layers (each the mean over at "
              "least 20 ms of plans).\n",
              repeats, layers);
  std::printf("DeepSeek-V3 shape: %zu layers x %zu experts, %zu slots, %zu groups, %zu nodes x %zu GPUs\n\n", layers,
              experts, nodes * gpus * slots_per_rank, groups, nodes, gpus);
  // Ratios against linear, the baseline of the same run: absolute times on a shared machine are noise.
  std::printf("%-28s %12s %10s %18s %10s\n", "planner", "time", "/ linear", "GPU max/mean load", "/ linear");
  const std::string hier_name = "eplb hierarchical (" + std::to_string(groups) + " groups)";
  const auto row = [&](const char* name, double s, double b) {
    std::printf("%-28s %9.2f ms %10.2f %18.3f %10.3f\n", name, 1e3 * s, s / lin_s, b, b / lin_b);
  };
  row(hier_name.c_str(), hier_s, hier_b);
  row("eplb global", global_s, global_b);
  std::printf("%-28s %9.2f ms %10s %18.3f %10s\n", "linear", 1e3 * lin_s, "(baseline)", lin_b, "");
  std::printf("\nwrote %s\n", path.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "eplb: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
