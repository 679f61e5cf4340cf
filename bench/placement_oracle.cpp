// Question: how low can inter-node copies go on this trace at all? An upper-bound experiment for
// issue 5's byte targets, not a planner: locus's token-level stage (sweeps + annealing) is given
// the decode tokens it will be scored on, each on a node chosen by its true domain, starting from
// the linear map, without and with a replica slot per GPU, and optionally a looser GPU load
// bound. The baseline (linear placement, round-robin requests, flat copies) is counted on the
// same tokens in the same run.
//
//   placement_oracle [--trace DIR] [--out DIR] [--nodes 4] [--gpus 2] [--split-seed 1]
//                    [--prefill-tokens 32] [--anneal 1000] [--slacks 0.03,0.10] [--redundant 0,1]
// Writes DIR/placement_oracle.{json,md}.
#include <locus/placement/token_refine.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string arg_value(int argc, char** argv, const std::string& name, const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return argv[i + 1];
  return fallback;
}

// Nodes for each domain: one each, largest decode volume first; spare nodes go one at a time to
// the domain with the most requests per node (ESFT 4 nodes: summary, law, intent, intent). With
// fewer nodes than domains, domain i takes node i mod nodes.
std::vector<std::vector<std::uint32_t>> domain_nodes(const locus::trace::trace& t, std::size_t nodes) {
  const std::size_t d = t.domains().size();
  std::vector<double> decode(d, 0), requests(d, 0);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    requests[q.domain] += 1;
    for (std::size_t i = 0; i < q.length; ++i)
      decode[q.domain] += t.token_phase(q.first_token + i) == locus::trace::phase::decode;
  }
  std::vector<std::size_t> order(d);
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return decode[a] > decode[b]; });
  std::vector<std::vector<std::uint32_t>> out(d);
  for (std::size_t i = 0; i < d; ++i) out[order[i]].push_back(static_cast<std::uint32_t>(i % nodes));
  for (auto next = static_cast<std::uint32_t>(std::min(d, nodes)); next < nodes; ++next) {
    std::size_t best = 0;
    for (std::size_t x = 1; x < d; ++x)
      if (requests[x] / static_cast<double>(out[x].size()) > requests[best] / static_cast<double>(out[best].size())) best = x;
    out[best].push_back(next);
  }
  return out;
}

// The decode tokens of `t`, each on the node its request runs on: by domain, or round-robin over
// ranks (request r on rank r mod ranks).
locus::placement::token_sample decode_tokens(const locus::trace::trace& t, const locus::dynamic_topology& topo,
                                             bool by_domain) {
  locus::placement::token_sample s;
  s.experts = t.experts();
  s.top_k = t.top_k();
  s.ids.assign(t.layers(), {});
  const auto nodes_of = domain_nodes(t, topo.nodes());
  std::vector<std::size_t> seen(t.domains().size(), 0);
  std::vector<std::uint64_t> picked;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    const auto& mine = nodes_of[q.domain];
    const auto node = by_domain ? mine[seen[q.domain]++ % mine.size()]
                                : static_cast<std::uint32_t>(topo.node_of(r % topo.ranks()));
    for (std::size_t i = 0; i < q.length; ++i)
      if (t.token_phase(q.first_token + i) == locus::trace::phase::decode) {
        picked.push_back(q.first_token + i);
        s.home.push_back(node);
      }
  }
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    for (const auto tok : picked)
      for (std::size_t j = 0; j < s.top_k; ++j) s.ids[l].push_back(static_cast<std::uint16_t>(view.expert(tok, j)));
  }
  return s;
}

// Mean over layers of the busiest GPU's pairs over the mean (the comm_volume aggregate metric); a
// token's pair for a replicated expert goes to the copy on its node, else to copy t mod copies.
double gpu_max_over_mean(const std::vector<locus::expert_map>& maps, const locus::placement::token_sample& s,
                         const locus::dynamic_topology& topo) {
  double sum = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    std::vector<double> load(maps[l].ranks(), 0.0);
    for (std::size_t i = 0; i < s.ids[l].size(); ++i) {
      const std::size_t t = i / s.top_k;
      const auto copies = maps[l].replicas(s.ids[l][i]);
      auto r = static_cast<std::size_t>(copies[t % copies.size()].rank);
      for (const auto& c : copies)
        if (topo.node_of(static_cast<std::size_t>(c.rank)) == s.home[t]) {
          r = static_cast<std::size_t>(c.rank);
          break;
        }
      load[r] += 1;
    }
    const double mean = std::accumulate(load.begin(), load.end(), 0.0) / static_cast<double>(load.size());
    sum += *std::max_element(load.begin(), load.end()) / mean;
  }
  return sum / static_cast<double>(maps.size());
}

} // namespace

int main(int argc, char** argv) try {
  const std::string trace_path = arg_value(argc, argv, "--trace", LOCUS_DEFAULT_TRACE);
  const std::string out_dir = arg_value(argc, argv, "--out", ".");
  const auto nodes = std::stoul(arg_value(argc, argv, "--nodes", "4"));
  const auto gpus = std::stoul(arg_value(argc, argv, "--gpus", "2"));
  const auto seed = std::stoull(arg_value(argc, argv, "--split-seed", "1"));
  const auto prefill = std::stoul(arg_value(argc, argv, "--prefill-tokens", "32"));
  const auto anneal = std::stoul(arg_value(argc, argv, "--anneal", "1000"));
  std::vector<double> slacks;
  std::vector<std::size_t> redundants;
  {
    std::stringstream ss(arg_value(argc, argv, "--slacks", "0.03,0.10"));
    for (std::string x; std::getline(ss, x, ',');) slacks.push_back(std::stod(x));
    std::stringstream rs(arg_value(argc, argv, "--redundant", "0,1"));
    for (std::string x; std::getline(rs, x, ',');) redundants.push_back(std::stoul(x));
  }
  if (!std::filesystem::exists(trace_path)) {
    std::printf("placement_oracle: trace %s not found; skipped\n", trace_path.c_str());
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto full = (std::filesystem::is_directory(trace_path) ? locus::trace::import_esft(trace_path)
                                                                 : locus::trace::read_trace(trace_path))
                        .with_prefill_tokens(prefill);
  const auto [train, test] = locus::trace::split_by_request(full, 0.5, seed);
  const locus::dynamic_topology topo(nodes, gpus);
  LOCUS_REQUIRE(full.experts() % topo.ranks() == 0, locus::config_error, "placement_oracle: ", full.experts(),
                " experts do not divide over ", topo.ranks(), " GPUs");
  const std::size_t spr = full.experts() / topo.ranks();

  const auto baseline_tokens = decode_tokens(test, topo, false);
  const auto test_tokens = decode_tokens(test, topo, true);
  const auto train_tokens = decode_tokens(train, topo, true);
  std::vector<locus::expert_id> table(full.experts());
  std::iota(table.begin(), table.end(), locus::expert_id{0});
  const std::vector<locus::expert_map> linear(full.layers(), locus::expert_map(full.experts(), topo.ranks(), spr, table));
  // The linear map with `spare` empty slots per GPU after its experts.
  const auto linear_with_spare = [&](std::size_t spare) {
    std::vector<locus::expert_id> t((spr + spare) * topo.ranks(), locus::empty_slot);
    for (std::size_t r = 0; r < topo.ranks(); ++r)
      for (std::size_t i = 0; i < spr; ++i) t[r * (spr + spare) + i] = table[r * spr + i];
    return std::vector<locus::expert_map>(full.layers(),
                                          locus::expert_map(full.experts(), topo.ranks(), spr + spare, std::move(t)));
  };
  locus::placement::token_refine_options flat;
  flat.count(locus::placement::copy_count::flat);
  const double baseline = locus::placement::sample_copy_cost(linear, baseline_tokens, topo, flat);

  nlohmann::json doc = {{"trace", trace_path}, {"topology", std::to_string(nodes) + "x" + std::to_string(gpus)},
                        {"split_seed", seed},  {"anneal_per_expert", anneal},
                        {"baseline_flat_copies", baseline}, {"rows", nlohmann::json::array()}};
  std::string md = "| fitted on | replicas/GPU | GPU bound | transport | copies vs linear/rr/flat | GPU max/mean on "
                   "test |\n|---|---|---|---|---|---|\n";
  for (const std::size_t redundant : redundants)
    for (const bool on_test : {true, false})
      for (const double slack : slacks)
        for (const bool hier : {false, true}) {
          locus::placement::token_refine_options o;
          o.count(hier ? locus::placement::copy_count::hierarchical : locus::placement::copy_count::flat);
          o.balance_slack = slack;
          o.anneal_per_expert = anneal;
          o.max_sweeps = 20;
          const auto& fit = on_test ? test_tokens : train_tokens;
          // Every expert once from the linear start, then (with spare slots) the replicas that save the
          // most copies and the first copies refined around them, as the planner's token-level stage.
          auto maps = locus::placement::refine_by_tokens(linear_with_spare(redundant), fit, topo, o);
          if (redundant > 0) {
            maps = locus::placement::add_replicas_by_tokens(maps, fit, topo, o);
            maps = locus::placement::refine_by_tokens(maps, fit, topo, o);
          }
          const double ratio = locus::placement::sample_copy_cost(maps, test_tokens, topo, o) / baseline;
          const double balance = gpu_max_over_mean(maps, test_tokens, topo);
          doc["rows"].push_back({{"fitted_on", on_test ? "test" : "train"}, {"redundant_slots_per_gpu", redundant},
                                 {"balance_slack", slack}, {"transport", hier ? "hierarchical" : "flat"},
                                 {"copies_vs_baseline", ratio}, {"gpu_max_over_mean_test", balance}});
          char line[256];
          std::snprintf(line, sizeof line, "| %s | %zu | %.2f | %s | %.3f | %.3f |\n",
                        on_test ? "test (oracle)" : "train", redundant, slack, hier ? "hierarchical" : "flat", ratio,
                        balance);
          md += line;
          std::fputs(line, stdout);
          std::fflush(stdout);
        }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::filesystem::create_directories(out_dir);
  std::ofstream(out_dir + "/placement_oracle.json") << doc.dump(1) << '\n';
  std::ofstream(out_dir + "/placement_oracle.md")
      << "# How low can copies go? (upper-bound experiment, issue 5)\n\nProduced by `build/dev/bench/placement_oracle "
         "--out docs/results` in "
      << static_cast<int>(secs) << " s on " << nodes << "x" << gpus
      << ", ESFT test split (seed " << seed << "), prefill = first " << prefill
      << " tokens. Not a planner: locus's token-level stage (sweeps, then " << anneal
      << " annealing proposals per expert) places each layer's experts starting from the linear map (with replicas: "
         "then fills the spare slots with the copies that save the most, and refines again), for the decode tokens of the split named in the first column, every request on a node chosen "
         "by its true domain (one node each, largest decode volume first; spare nodes to the domain with the most "
         "requests per node). Copies are counted on the test split's decode tokens with those homes, relative to "
         "linear placement with round-robin requests and flat copies on the same tokens. \"test (oracle)\" rows "
         "see the tokens they are scored on; their GPU bound is met on those tokens.\n\n"
      << md;
  std::printf("wrote %s/placement_oracle.{json,md} in %.0f s\n", out_dir.c_str(), secs);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "placement_oracle: %s\n", e.what());
  return 1;
}
