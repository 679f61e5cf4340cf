// Question: how low can inter-node copies go on this trace at all? An upper-bound experiment for
// comm_volume's inter-node byte targets, not a planner: locus's token-level stage (sweeps + annealing) is given
// the decode tokens it will be scored on, each on a node chosen by its true domain, starting from
// the linear map, without and with a replica slot per GPU, and optionally a looser GPU load
// bound. The baseline (linear placement, round-robin requests, flat copies) is counted on the
// same tokens in the same run.
//
//   placement_oracle [--trace DIR] [--out DIR] [--nodes 4] [--gpus-per-node 2] [--split-seed 1]
//                    [--prefill-tokens 32] [--anneal 1000] [--slacks 0.03,0.10] [--redundant 0,1]
//                    [--homes domain|free] [--home-caps -1,0.10] [--rounds 3]
// Writes DIR/placement_oracle.{json,md}; with --homes free, DIR/placement_oracle_free.{json,md}:
// test-fit rows only, where the requests' nodes are searched too. Each round fits the maps to
// the current homes, then moves every request to the node where its tokens cost the fewest
// copies on those maps, within a bound on each node's decode tokens (--home-caps; -1: none).
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/placement/token_refine.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

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
  for (std::size_t i = 0; i < d; ++i)
    out[order[i]].push_back(static_cast<std::uint32_t>(i % nodes));
  for (auto next = static_cast<std::uint32_t>(std::min(d, nodes)); next < nodes; ++next) {
    std::size_t best = 0;
    for (std::size_t x = 1; x < d; ++x)
      if (requests[x] / static_cast<double>(out[x].size()) > requests[best] / static_cast<double>(out[best].size()))
        best = x;
    out[best].push_back(next);
  }
  return out;
}

// The decode tokens of `t`, each on the node its request runs on: by domain, or round-robin over
// ranks (request r on rank r mod ranks). `owner`, when given, receives each token's request.
locus::placement::token_sample decode_tokens(const locus::trace::trace& t, const locus::dynamic_topology& topo,
                                             bool by_domain, std::vector<std::uint32_t>* owner = nullptr) {
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
    const auto node =
        by_domain ? mine[seen[q.domain]++ % mine.size()] : static_cast<std::uint32_t>(topo.node_of(r % topo.ranks()));
    for (std::size_t i = 0; i < q.length; ++i)
      if (t.token_phase(q.first_token + i) == locus::trace::phase::decode) {
        picked.push_back(q.first_token + i);
        s.home.push_back(node);
        if (owner) owner->push_back(static_cast<std::uint32_t>(r));
      }
  }
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    for (const auto tok : picked)
      for (std::size_t j = 0; j < s.top_k; ++j)
        s.ids[l].push_back(static_cast<std::uint16_t>(view.expert(tok, j)));
  }
  return s;
}

// The rank serving each of layer l's pairs (token-major) under the engines' default replica rule,
// locality_first, written here from its definition (transport/replica_selection.hpp) rather than
// through the library, so that the check below tests sample_copy_cost: a token runs on rank
// src = home * gpus + t mod gpus; a replica on that rank serves it; otherwise its candidates are
// the replicas on its node (or all of them when its node has none), in rank order rotated to start
// at candidate src mod m; one candidate serves it alone. Those copies are the token's fixed ones.
// Any other copy joins a row the token already sends: the first candidate on a rank a fixed copy
// goes to, else (`hier`) the first on a node other than src's that one reaches; failing that, the
// n-th such copy of the expert from src goes to candidate (src + n) mod m. The sample's tokens in
// order are one step.
std::vector<std::size_t> serving_ranks(const locus::expert_map& map, const locus::placement::token_sample& s,
                                       std::size_t l, const locus::dynamic_topology& topo, bool hier) {
  const std::size_t G = topo.gpus_per_node(), k = s.top_k;
  std::vector<std::size_t> out(s.ids[l].size());
  std::map<std::pair<std::size_t, std::size_t>, std::size_t> nth; // (source rank, expert) → turns taken
  std::vector<std::vector<std::size_t>> cands(k);
  for (std::size_t t = 0; t < s.tokens(); ++t) {
    const std::size_t src = s.home[t] * G + t % G;
    std::vector<bool> fixed(k, false);
    std::set<std::size_t> ranks, nodes;
    for (std::size_t j = 0; j < k; ++j) {
      std::vector<std::size_t> reps, near;
      for (const auto& c : map.replicas(static_cast<locus::expert_id>(s.ids[l][t * k + j])))
        reps.push_back(static_cast<std::size_t>(c.rank));
      std::sort(reps.begin(), reps.end());
      for (const auto r : reps)
        if (topo.node_of(r) == topo.node_of(src)) near.push_back(r);
      cands[j] = near.empty() ? reps : near;
      const bool local = std::find(reps.begin(), reps.end(), src) != reps.end();
      if (local || cands[j].size() == 1) {
        out[t * k + j] = local ? src : cands[j][0];
        fixed[j] = true;
        ranks.insert(out[t * k + j]);
        nodes.insert(topo.node_of(out[t * k + j]));
      }
    }
    for (std::size_t j = 0; j < k; ++j) {
      if (fixed[j]) continue;
      const auto& c = cands[j];
      const std::size_t m = c.size();
      const auto pick = [&](auto&& ok) {
        for (std::size_t i = 0; i < m; ++i)
          if (ok(c[(src + i) % m])) return c[(src + i) % m];
        return std::size_t{SIZE_MAX};
      };
      std::size_t r = pick([&](std::size_t x) { return ranks.count(x) > 0; });
      if (r == SIZE_MAX && hier)
        r = pick(
            [&](std::size_t x) { return topo.node_of(x) != topo.node_of(src) && nodes.count(topo.node_of(x)) > 0; });
      if (r == SIZE_MAX) r = c[(src + nth[{src, s.ids[l][t * k + j]}]++) % m];
      out[t * k + j] = r;
    }
  }
  return out;
}

// Mean over layers of the busiest GPU's pairs over the mean (the comm_volume aggregate metric),
// pairs served as serving_ranks says (for the transport `hier` names).
double gpu_max_over_mean(const std::vector<locus::expert_map>& maps, const locus::placement::token_sample& s,
                         const locus::dynamic_topology& topo, bool hier) {
  double sum = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    std::vector<double> load(maps[l].ranks(), 0.0);
    for (const auto r : serving_ranks(maps[l], s, l, topo, hier))
      load[r] += 1;
    const double mean = std::accumulate(load.begin(), load.end(), 0.0) / static_cast<double>(load.size());
    sum += *std::max_element(load.begin(), load.end()) / mean;
  }
  return sum / static_cast<double>(maps.size());
}

// The sample's copies at its tokens' homes, pairs served as serving_ranks says: per token, flat
// counts its distinct GPUs on other nodes, hierarchical its distinct other nodes.
double sample_copies(const std::vector<locus::expert_map>& maps, const locus::placement::token_sample& s,
                     const locus::dynamic_topology& topo, bool hier) {
  double c = 0;
  for (std::size_t l = 0; l < maps.size(); ++l) {
    const auto ranks = serving_ranks(maps[l], s, l, topo, hier);
    for (std::size_t t = 0; t < s.tokens(); ++t) {
      std::vector<std::size_t> seen;
      for (std::size_t j = 0; j < s.top_k; ++j) {
        const std::size_t r = ranks[t * s.top_k + j];
        if (topo.node_of(r) == s.home[t]) continue;
        const std::size_t key = hier ? topo.node_of(r) : r;
        if (std::find(seen.begin(), seen.end(), key) == seen.end()) seen.push_back(key);
      }
      c += static_cast<double>(seen.size());
    }
  }
  return c;
}

// Copies of token t (ids: its top-k experts) if its request ran on node n, the free-homes search's
// estimate: each expert served by its copy on n if there is one, else by copy t mod copies (the
// rule's rotation depends on the other tokens of the source, which a move changes); flat counts
// distinct remote GPUs, hierarchical distinct remote nodes. The exact count at the chosen homes is
// sample_copies.
double token_copies(const locus::expert_map& map, const std::uint16_t* ids, std::size_t k, std::size_t t, std::size_t n,
                    const locus::dynamic_topology& topo, bool hier) {
  std::vector<std::size_t> seen;
  for (std::size_t j = 0; j < k; ++j) {
    bool repeat = false;
    for (std::size_t i = 0; i < j; ++i)
      repeat |= ids[i] == ids[j];
    if (repeat) continue;
    const auto copies = map.replicas(ids[j]);
    auto r = static_cast<std::size_t>(copies[t % copies.size()].rank);
    for (const auto& c : copies)
      if (topo.node_of(static_cast<std::size_t>(c.rank)) == n) {
        r = static_cast<std::size_t>(c.rank);
        break;
      }
    if (topo.node_of(r) == n) continue;
    const std::size_t key = hier ? topo.node_of(r) : r;
    if (std::find(seen.begin(), seen.end(), key) == seen.end()) seen.push_back(key);
  }
  return static_cast<double>(seen.size());
}

// Per request, the copies all its tokens would cost on each node (requests × nodes, row-major).
std::vector<double> request_node_copies(const std::vector<locus::expert_map>& maps,
                                        const locus::placement::token_sample& s,
                                        const std::vector<std::uint32_t>& owner, std::size_t requests,
                                        const locus::dynamic_topology& topo, bool hier) {
  const std::size_t nodes = topo.nodes();
  std::vector<double> c(requests * nodes, 0.0);
  for (std::size_t l = 0; l < maps.size(); ++l)
    for (std::size_t t = 0; t < s.tokens(); ++t)
      for (std::size_t n = 0; n < nodes; ++n)
        c[owner[t] * nodes + n] += token_copies(maps[l], s.ids[l].data() + t * s.top_k, s.top_k, t, n, topo, hier);
  return c;
}

// Balanced domain homes: requests in order of their domain's decode volume (largest first), then
// by index, fill the nodes in turn, each request on the node where the midpoint of its tokens
// falls in that running order: one or two domains per node, nodes' decode tokens near the mean.
void balanced_domain_homes(locus::placement::token_sample& s, const std::vector<std::uint32_t>& owner,
                           const locus::trace::trace& t, std::size_t nodes) {
  std::vector<double> tokens(t.requests(), 0.0), domain(t.domains().size(), 0.0);
  for (const auto r : owner)
    tokens[r] += 1;
  for (std::size_t r = 0; r < t.requests(); ++r)
    domain[t.request(r).domain] += tokens[r];
  std::vector<std::size_t> order(t.requests());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) {
    const auto da = t.request(a).domain, db = t.request(b).domain;
    return domain[da] != domain[db] ? domain[da] > domain[db] : da < db;
  });
  const double mean = static_cast<double>(s.tokens()) / static_cast<double>(nodes);
  std::vector<std::uint32_t> home(t.requests(), 0);
  double before = 0;
  for (const std::size_t r : order) {
    home[r] = static_cast<std::uint32_t>(
        std::min<double>(static_cast<double>(nodes - 1), std::floor((before + tokens[r] / 2) / mean)));
    before += tokens[r];
  }
  for (std::size_t i = 0; i < s.tokens(); ++i)
    s.home[i] = home[owner[i]];
}

// Moves requests to the node where their tokens cost the fewest copies on the current maps, largest
// saving first, while each node's decode tokens stay within (1 + cap) × the mean (cap < 0: no
// bound; a request may always stay where it is). Returns the requests moved.
std::size_t rehome(locus::placement::token_sample& s, const std::vector<std::uint32_t>& owner,
                   const std::vector<double>& cost, std::size_t requests, std::size_t nodes, double cap) {
  std::vector<std::uint32_t> home(requests, 0);
  std::vector<double> tokens(requests, 0.0), node_tokens(nodes, 0.0);
  for (std::size_t t = 0; t < s.tokens(); ++t) {
    home[owner[t]] = s.home[t];
    tokens[owner[t]] += 1;
    node_tokens[s.home[t]] += 1;
  }
  const double limit = cap < 0 ? 1e300 : (1.0 + cap) * static_cast<double>(s.tokens()) / static_cast<double>(nodes);
  const auto saving = [&](std::size_t r) {
    double best = cost[r * nodes + home[r]];
    for (std::size_t n = 0; n < nodes; ++n)
      best = std::min(best, cost[r * nodes + n]);
    return cost[r * nodes + home[r]] - best;
  };
  std::vector<std::size_t> order(requests);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return saving(a) > saving(b); });
  std::size_t moved = 0;
  for (const std::size_t r : order) {
    std::size_t best = home[r];
    for (std::size_t n = 0; n < nodes; ++n)
      if (cost[r * nodes + n] < cost[r * nodes + best] && node_tokens[n] + tokens[r] <= limit) best = n;
    if (best == home[r]) continue;
    node_tokens[home[r]] -= tokens[r];
    node_tokens[best] += tokens[r];
    home[r] = static_cast<std::uint32_t>(best);
    ++moved;
  }
  for (std::size_t t = 0; t < s.tokens(); ++t)
    s.home[t] = home[owner[t]];
  return moved;
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"How low could the copies go: the token-level stage fitted on the tokens it is scored on"};
  tool_cli::show_defaults(app);
  std::string trace_path, out_dir = ".", homes = "domain";
  std::size_t nodes = 4, gpus = 2, prefill = 32, anneal = 1000, rounds = 3;
  unsigned long long seed = 1;
  std::vector<double> slacks{0.03, 0.10}, caps{-1, 0.10};
  std::vector<std::size_t> redundants{0, 1};
  const CLI::Option* trace_opt = bench_args::add_trace_option(app, trace_path, "ESFT folder or binary trace");
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  app.add_option("--nodes", nodes, "Nodes")->check(tool_cli::positive);
  // --gpus-per-node as in the driver and the other programs; --gpus, its first name, still works.
  app.add_option("--gpus-per-node,--gpus", gpus, "GPUs (ranks) per node")->check(tool_cli::positive);
  app.add_option("--split-seed", seed, "Seed of the train/test split of the requests");
  app.add_option("--prefill-tokens", prefill, "Prefill tokens per request");
  app.add_option("--anneal", anneal, "Annealing proposals per expert");
  app.add_option("--homes", homes, "Requests' nodes: by domain, or searched (free)")
      ->check(CLI::IsMember({"domain", "free"}));
  app.add_option("--rounds", rounds, "Rounds of map fit and request moves (--homes free)")->check(tool_cli::positive);
  app.add_option("--slacks", slacks, "GPU load bounds over the mean")
      ->delimiter(',')
      ->check(tool_cli::finite_non_negative);
  app.add_option("--redundant", redundants, "Redundant slots per GPU")->delimiter(',');
  auto* caps_opt = app.add_option("--home-caps", caps, "Node token bounds over the mean (-1: none; --homes free)")
                       ->delimiter(',')
                       ->check(CLI::Validator(
                           [](const std::string& v) -> std::string {
                             // NaN ran as a bound and -5 as none: only -1 says none.
                             double x = 0;
                             try {
                               std::size_t used = 0;
                               x = std::stod(v, &used);
                               if (used != v.size()) throw std::invalid_argument(v);
                             } catch (const std::exception&) {
                               return std::string(); // not a number: the conversion of the option says so
                             }
                             return x == -1 || (std::isfinite(x) && x >= 0)
                                        ? std::string()
                                        : "\"" + v + "\" is neither -1 (none) nor a bound >= 0";
                           },
                           "-1 or >= 0"))
                       ->capture_default_str();
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  if (caps_opt->count() > 0 && homes != "free") {
    std::fprintf(stderr, "placement_oracle: usage error: --home-caps bounds the free homes; give --homes free\n");
    return 2;
  }
  trace_path = bench_args::trace_to_read(*trace_opt, trace_path);
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/placement_oracle");
  const auto start = std::chrono::steady_clock::now();
  const auto say = [&](const std::string& what) { bench_args::progress_line("placement_oracle", what, start); };
  const auto full = bench_args::with_prefill(bench_args::load_trace(trace_path), prefill);
  const auto [train, test] = locus::trace::split_by_request(full, 0.5, seed);
  const locus::dynamic_topology topo(nodes, gpus);
  LOCUS_REQUIRE(full.experts() % topo.ranks() == 0, locus::config_error, full.experts(), " experts do not divide over ",
                topo.ranks(), " GPUs");
  const std::size_t spr = full.experts() / topo.ranks();

  say("sampling the decode tokens");
  const auto baseline_tokens = decode_tokens(test, topo, false);
  std::vector<std::uint32_t> test_owner;
  const auto test_tokens = decode_tokens(test, topo, true, &test_owner);
  const auto train_tokens = decode_tokens(train, topo, true);
  std::vector<locus::expert_id> table(full.experts());
  std::iota(table.begin(), table.end(), locus::expert_id{0});
  const std::vector<locus::expert_map> linear(full.layers(),
                                              locus::expert_map(full.experts(), topo.ranks(), spr, table));
  // The linear map with `spare` empty slots per GPU after its experts.
  const auto linear_with_spare = [&](std::size_t spare) {
    std::vector<locus::expert_id> t((spr + spare) * topo.ranks(), locus::empty_slot);
    for (std::size_t r = 0; r < topo.ranks(); ++r)
      for (std::size_t i = 0; i < spr; ++i)
        t[r * (spr + spare) + i] = table[r * spr + i];
    return std::vector<locus::expert_map>(full.layers(),
                                          locus::expert_map(full.experts(), topo.ranks(), spr + spare, std::move(t)));
  };
  locus::placement::token_refine_options flat;
  flat.count(locus::placement::copy_count::flat);
  const double baseline = locus::placement::sample_copy_cost(linear, baseline_tokens, topo, flat);

  nlohmann::json doc = {{"command", run.command},
                        {"machine", run.machine},
                        {"trace", trace_path},
                        {"topology", std::to_string(nodes) + "x" + std::to_string(gpus)},
                        {"split_seed", seed},
                        {"anneal_per_expert", anneal},
                        {"baseline_flat_copies", baseline},
                        {"rows", nlohmann::json::array()}};
  const std::string command = run.command;
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  // DIR/name.json (the rows) and DIR/name.md (`text`).
  const auto write = [&](const std::string& name, const std::string& text) {
    bench_output::write_together(
        {{folder.file(name + ".json"), doc.dump(1) + "\n"}, {folder.file(name + ".md"), text}});
    std::printf("wrote %s/%s.{json,md} in %.0f s\n", out_dir.c_str(), name.c_str(), elapsed());
  };
  // The token-level stage's options for one transport and GPU load bound, with annealing.
  const auto options_for = [&](bool hier, double slack) {
    locus::placement::token_refine_options o;
    o.count(hier ? locus::placement::copy_count::hierarchical : locus::placement::copy_count::flat);
    o.balance_slack = slack;
    o.anneal_per_expert = anneal;
    o.max_sweeps = 20;
    o.hedge_replicas = 0; // a search for bytes alone: no slot spent on the planner's balance hedge
    return o;
  };
  const auto fit_maps = [&](const locus::placement::token_sample& fit, std::size_t redundant,
                            const locus::placement::token_refine_options& o) {
    // Every expert once from the linear start, then (with spare slots) the replicas that save the
    // most copies and the first copies refined around them, as the planner's token-level stage.
    auto maps = locus::placement::refine_by_tokens(linear_with_spare(redundant), fit, topo, o);
    if (redundant > 0) {
      maps = locus::placement::add_replicas_by_tokens(maps, fit, topo, o);
      maps = locus::placement::refine_by_tokens(maps, fit, topo, o);
    }
    return maps;
  };
  if (homes == "free") {
    std::string md = "| replicas/GPU | GPU bound | node token bound | transport | round | requests moved | node tokens "
                     "max/mean | copies vs linear/rr/flat | GPU max/mean |\n|---|---|---|---|---|---|---|---|---|\n";
    say("fitting maps and moving requests: up to " +
        std::to_string(redundants.size() * slacks.size() * caps.size() * 2 * rounds) + " rows, each printed when done");
    for (const std::size_t redundant : redundants)
      for (const double slack : slacks)
        for (const double cap : caps)
          for (const bool hier : {false, true}) {
            const auto o = options_for(hier, slack);
            auto tokens = test_tokens;
            if (cap >= 0) balanced_domain_homes(tokens, test_owner, test, topo.nodes());
            std::size_t moved = 0;
            for (std::size_t round = 0; round < rounds; ++round) {
              const auto maps = fit_maps(tokens, redundant, o);
              const double copies = locus::placement::sample_copy_cost(maps, tokens, topo, o);
              const auto cost = request_node_copies(maps, tokens, test_owner, test.requests(), topo, hier);
              // The same copies, counted apart from the library.
              const double mine = sample_copies(maps, tokens, topo, hier);
              if (std::abs(mine - copies) > 1e-6 * std::max(1.0, copies))
                throw std::runtime_error("the independent copy count " + std::to_string(mine) +
                                         " differs from sample_copy_cost " + std::to_string(copies));
              std::vector<double> node_tokens(topo.nodes(), 0.0);
              for (const auto h : tokens.home)
                node_tokens[h] += 1;
              const double token_balance = *std::max_element(node_tokens.begin(), node_tokens.end()) *
                                           static_cast<double>(topo.nodes()) / static_cast<double>(tokens.tokens());
              const double ratio = copies / baseline;
              const double balance = gpu_max_over_mean(maps, tokens, topo, hier);
              doc["rows"].push_back({{"redundant_slots_per_gpu", redundant},
                                     {"balance_slack", slack},
                                     {"node_token_bound", cap},
                                     {"transport", hier ? "hierarchical" : "flat"},
                                     {"round", round},
                                     {"requests_moved", moved},
                                     {"node_tokens_max_over_mean", token_balance},
                                     {"copies_vs_baseline", ratio},
                                     {"gpu_max_over_mean_test", balance}});
              char line[256];
              std::snprintf(line, sizeof line, "| %zu | %.2f | %s | %s | %zu | %zu | %.3f | %.3f | %.3f |\n", redundant,
                            slack, cap < 0 ? "none" : std::to_string(cap).substr(0, 4).c_str(),
                            hier ? "hierarchical" : "flat", round, moved, token_balance, ratio, balance);
              md += line;
              std::fputs(line, stdout);
              std::fflush(stdout);
              moved = rehome(tokens, test_owner, cost, test.requests(), topo.nodes(), cap);
              if (moved == 0) break;
            }
          }
    const double secs = elapsed();
    std::ostringstream text;
    text << "# How low can copies go if requests may sit anywhere? (upper-bound experiment for the inter-node byte "
            "targets)\n\nProduced by `"
         << command << "` (" << run.machine << ") in " << static_cast<int>(secs) << " s on " << nodes << "x" << gpus
         << ", ESFT test split (seed " << seed << "), prefill = first " << prefill
         << " tokens. Not a planner: every row fits and scores on the test split's decode tokens. Round 0 puts each "
            "request on its true domain's node, as placement_oracle.md does (rows without a node token bound), or "
            "fills the nodes in turn with the requests ordered by domain, largest domain first (rows with one); "
            "each round fits the maps (locus's token-level stage from the linear map, "
         << anneal
         << " annealing proposals per expert, replicas filled on the exact copy cost), then moves each request, "
            "largest saving first, to the node where its tokens cost the fewest copies on those maps while every "
            "node's decode tokens stay within (1 + the node token bound) times the mean. Requests moved is the count "
            "that produced the round's homes. Copies are relative to linear placement with round-robin requests and "
            "flat copies on the same tokens; every round checks sample_copy_cost against a count written apart.\n\n"
         << md;
    write("placement_oracle_free", text.str());
    return 0;
  }
  std::string md = "| fitted on | replicas/GPU | GPU bound | transport | copies vs linear/rr/flat | GPU max/mean on "
                   "test |\n|---|---|---|---|---|---|\n";
  say("fitting maps: " + std::to_string(redundants.size() * 2 * slacks.size() * 2) + " rows, each printed when done");
  for (const std::size_t redundant : redundants)
    for (const bool on_test : {true, false})
      for (const double slack : slacks)
        for (const bool hier : {false, true}) {
          const auto o = options_for(hier, slack);
          const auto maps = fit_maps(on_test ? test_tokens : train_tokens, redundant, o);
          const double copies = locus::placement::sample_copy_cost(maps, test_tokens, topo, o);
          // The same copies, counted apart from the library.
          const double mine = sample_copies(maps, test_tokens, topo, hier);
          if (std::abs(mine - copies) > 1e-6 * std::max(1.0, copies))
            throw std::runtime_error("the independent copy count " + std::to_string(mine) +
                                     " differs from sample_copy_cost " + std::to_string(copies));
          const double ratio = copies / baseline;
          const double balance = gpu_max_over_mean(maps, test_tokens, topo, hier);
          doc["rows"].push_back({{"fitted_on", on_test ? "test" : "train"},
                                 {"redundant_slots_per_gpu", redundant},
                                 {"balance_slack", slack},
                                 {"transport", hier ? "hierarchical" : "flat"},
                                 {"copies_vs_baseline", ratio},
                                 {"gpu_max_over_mean_test", balance}});
          char line[256];
          std::snprintf(line, sizeof line, "| %s | %zu | %.2f | %s | %.3f | %.3f |\n",
                        on_test ? "test (oracle)" : "train", redundant, slack, hier ? "hierarchical" : "flat", ratio,
                        balance);
          md += line;
          std::fputs(line, stdout);
          std::fflush(stdout);
        }
  const double secs = elapsed();
  std::ostringstream text;
  text << "# How low can copies go? (upper-bound experiment for the inter-node byte targets)\n\nProduced by `"
       << command << "` (" << run.machine << ") in " << static_cast<int>(secs) << " s on " << nodes << "x" << gpus
       << ", ESFT test split (seed " << seed << "), prefill = first " << prefill
       << " tokens. Not a planner: locus's token-level stage (sweeps, then " << anneal
       << " annealing proposals per expert) places each layer's experts starting from the linear map (with replicas: "
          "then fills the spare slots with the copies that save the most, and refines again), for the decode tokens of "
          "the split named in the first column, every request on a node chosen "
          "by its true domain (one node each, largest decode volume first; spare nodes to the domain with the most "
          "requests per node). Copies are counted on the test split's decode tokens with those homes, relative to "
          "linear placement with round-robin requests and flat copies on the same tokens. \"test (oracle)\" rows "
          "see the tokens they are scored on; their GPU bound is met on those tokens.\n\n"
       << md;
  write("placement_oracle", text.str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "placement_oracle: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
