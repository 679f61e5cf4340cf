#define BOOST_TEST_MODULE online_replan
#include "../support/random_map.hpp"

#include <algorithm>
#include <atomic>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <locus/cost/online_replan.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/placement/linear.hpp>
#include <locus/placement/live_replan.hpp>
#include <locus/placement/migration.hpp>
#include <map>
#include <numeric>
#include <random>
#include <set>

using namespace locus;

namespace {

using locus_test::random_map;

// Tokens with a skewed, node-dependent expert preference, so that swaps have something to gain.
placement::token_sample random_sample(std::mt19937& rng, std::size_t experts, std::size_t k, std::size_t layers,
                                      std::size_t tokens, std::size_t nodes) {
  placement::token_sample s;
  s.experts = experts;
  s.top_k = k;
  s.ids.assign(layers, {});
  for (std::size_t t = 0; t < tokens; ++t)
    s.home.push_back(static_cast<std::uint32_t>(rng() % nodes));
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t t = 0; t < tokens; ++t) {
      std::vector<std::uint16_t> chosen;
      while (chosen.size() < k) {
        const std::size_t base = s.home[t] * experts / nodes;
        const std::size_t e = rng() % 3 == 0 ? rng() % experts : (base + rng() % (experts / nodes)) % experts;
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(static_cast<std::uint16_t>(e));
      }
      s.ids[l].insert(s.ids[l].end(), chosen.begin(), chosen.end());
    }
  return s;
}

std::size_t differing_slots(const std::vector<expert_map>& a, const std::vector<expert_map>& b) {
  std::size_t n = 0;
  for (std::size_t l = 0; l < a.size(); ++l)
    for (std::size_t r = 0; r < a[l].ranks(); ++r)
      for (std::size_t s = 0; s < a[l].slots_per_rank(); ++s)
        n += a[l].expert_at(r, s) != b[l].expert_at(r, s);
  return n;
}

// Per layer, the multiset of experts in the slots: re-planning moves weights, it never drops or adds one.
std::vector<std::map<expert_id, int>> contents(const std::vector<expert_map>& maps) {
  std::vector<std::map<expert_id, int>> out;
  for (const auto& m : maps) {
    std::map<expert_id, int> c;
    for (const auto e : m.slot_table())
      ++c[e];
    out.push_back(c);
  }
  return out;
}

} // namespace

BOOST_AUTO_TEST_CASE(migration_budget_is_never_exceeded) {
  std::mt19937 rng(11);
  for (int instance = 0; instance < 40; ++instance) {
    const std::size_t nodes = 2 + rng() % 3, gpus = 1 + rng() % 3, ranks = nodes * gpus;
    const std::size_t experts = ranks * (2 + rng() % 4), layers = 1 + rng() % 4, k = 2 + rng() % 3;
    const std::size_t redundant = rng() % 2;
    const dynamic_topology topo(nodes, gpus);
    std::vector<expert_map> maps;
    for (std::size_t l = 0; l < layers; ++l)
      maps.push_back(random_map(rng, experts, ranks, experts / ranks + redundant, redundant * ranks));
    const auto sample = random_sample(rng, experts, k, layers, 60 + rng() % 200, nodes);
    placement::token_refine_options opt;
    opt.balance_slack = 0.03 + 0.1 * static_cast<double>(rng() % 3);
    for (const std::size_t budget :
         {std::size_t{0}, std::size_t{1}, std::size_t{2}, std::size_t{5}, std::size_t{13}, experts * layers}) {
      const auto r = placement::replan_by_tokens(maps, sample, topo, opt, budget, 100);
      const std::size_t moved = differing_slots(maps, r.maps);
      BOOST_TEST_CONTEXT("instance " << instance << " budget " << budget) {
        BOOST_TEST(moved <= budget);
        BOOST_TEST(r.experts_moved == moved);
        BOOST_TEST(r.bytes_moved == moved * 100);
        BOOST_TEST((contents(r.maps) == contents(maps)));
        if (budget == 0) BOOST_TEST(r.cost_after == r.cost_before);
      }
    }
  }
}

// A budget share written as a decimal counts in full (0.57 × 100 slots is 56.99999999999999 in
// binary, and the floor of it cost a slot); any other share is floored, and never past the slots.
BOOST_AUTO_TEST_CASE(a_decimal_budget_share_counts_in_full) {
  std::mt19937 rng(3);
  const std::vector<expert_map> hundred{random_map(rng, 100, 4, 25, 0)};
  BOOST_TEST(placement::total_slots(hundred) == 100u);
  BOOST_TEST(placement::budget_slots(0.57, hundred) == 57u);
  BOOST_TEST(placement::budget_slots(0.29, hundred) == 29u);
  BOOST_TEST(placement::budget_slots(0.575, hundred) == 57u);
  BOOST_TEST(placement::budget_slots(0.0099, hundred) == 0u);
  BOOST_TEST(placement::budget_slots(0.0, hundred) == 0u);
  BOOST_TEST(placement::budget_slots(1.0, hundred) == 100u);
  for (int percent = 0; percent <= 100; ++percent)
    BOOST_TEST(placement::budget_slots(percent / 100.0, hundred) == static_cast<std::size_t>(percent));
  // A move swaps two experts: a budget above 0 of fewer than two slots would move nothing unseen.
  BOOST_CHECK_NO_THROW(placement::require_movable_budget(0.0, hundred, "budget"));
  BOOST_CHECK_NO_THROW(placement::require_movable_budget(0.02, hundred, "budget"));
  for (const double share : {0.0099, 0.01, 0.019}) {
    try {
      placement::require_movable_budget(share, hundred, "budget");
      BOOST_FAIL("a budget of " << share << " of 100 slots was taken");
    } catch (const config_error& e) {
      BOOST_TEST(e.message().find("of the 100 slots (all layers) is " +
                                  std::string(share < 0.01 ? "0 slots" : "1 slot;")) != std::string::npos,
                 e.message());
      BOOST_TEST(e.message().find("give at least 0.02") != std::string::npos, e.message());
    }
  }
}

// Within the bound, every swap taken saves copies of the sample; with the loads already balanced
// and a budget, the result costs no more than the maps in service (a brute-force count).
BOOST_AUTO_TEST_CASE(budgeted_swaps_lower_the_sample_cost_when_balanced) {
  std::mt19937 rng(5);
  for (int instance = 0; instance < 20; ++instance) {
    const dynamic_topology topo(2 + rng() % 2, 2);
    const std::size_t ranks = topo.ranks(), experts = ranks * 4;
    std::vector<expert_map> maps{random_map(rng, experts, ranks, 4, 0)};
    const auto sample = random_sample(rng, experts, 3, 1, 300, topo.nodes());
    placement::token_refine_options opt;
    opt.balance_slack = 10; // no load bound: only copy savings drive the swaps
    const auto r = placement::replan_by_tokens(maps, sample, topo, opt, 8, 1);
    // Independent cost: per token, distinct remote ranks + distinct remote nodes.
    const auto cost = [&](const expert_map& m) {
      double c = 0;
      for (std::size_t t = 0; t < sample.tokens(); ++t) {
        std::vector<bool> rank_seen(ranks, false), node_seen(topo.nodes(), false);
        for (std::size_t j = 0; j < 3; ++j) {
          const auto rank = m.replicas(sample.ids[0][t * 3 + j])[0].rank;
          const std::size_t node = topo.node_of(static_cast<std::size_t>(rank));
          if (node == sample.home[t]) continue;
          if (!rank_seen[static_cast<std::size_t>(rank)]) c += 1;
          if (!node_seen[node]) c += 1;
          rank_seen[static_cast<std::size_t>(rank)] = node_seen[node] = true;
        }
      }
      return c;
    };
    BOOST_TEST(r.cost_before == cost(maps[0]));
    BOOST_TEST(r.cost_after == cost(r.maps[0]));
    BOOST_TEST(r.cost_after <= r.cost_before);
    if (r.swaps > 0) BOOST_TEST(r.cost_after < r.cost_before);
    // An unbounded budget saves at least as much (its per-layer share wrapped to no swap at all).
    const auto free = placement::replan_by_tokens(maps, sample, topo, opt, std::numeric_limits<std::size_t>::max(), 1);
    BOOST_TEST(free.cost_after <= r.cost_after);
    if (r.swaps > 0) BOOST_TEST(free.swaps > 0u);
  }
}

// A swap taken for the copies it saves must save more than swap_significance standard errors of
// that saving, summed per request: one token's saving is its own standard error, so a window of
// one token moves nothing, nor do nine tokens of one request, while nine requests' tokens (a saving
// of 18 copies, standard error 6) still do.
BOOST_AUTO_TEST_CASE(a_copy_saving_swap_must_stand_above_its_noise) {
  const dynamic_topology topo(2, 1);
  // Experts 0 and 1 on node 0, 2 and 3 on node 1; every token comes from node 0 and uses 0 and 2.
  const std::vector<expert_map> maps{expert_map(4, 2, 2, {0, 1, 2, 3})};
  const auto tokens = [](std::size_t n, bool one_request = false) {
    placement::token_sample s;
    s.experts = 4;
    s.top_k = 2;
    s.ids.assign(1, {});
    for (std::size_t t = 0; t < n; ++t) {
      s.home.push_back(0);
      s.ids[0].insert(s.ids[0].end(), {0, 2});
      if (one_request) s.request.push_back(7);
    }
    return s;
  };
  placement::token_refine_options opt;
  opt.balance_slack = 10; // no load bound: the copies alone decide
  const auto moved = [&](std::size_t n, double z, bool one_request = false) {
    opt.swap_significance = z;
    return placement::replan_by_tokens(maps, tokens(n, one_request), topo, opt, 2, 1).experts_moved;
  };
  BOOST_TEST(moved(1, 0) == 2u); // any saving: expert 2 comes to node 0
  BOOST_TEST(moved(1, 1) == 0u);
  BOOST_TEST(moved(1, placement::token_refine_options{}.swap_significance) == 0u); // the default
  BOOST_TEST(moved(9, 1) == 2u);
  BOOST_TEST(moved(9, 2) == 2u); // 18 > 2 × 6
  BOOST_TEST(moved(9, 3.5) == 0u);
  BOOST_TEST(moved(9, 1, true) == 0u); // one request's nine tokens: its saving is its own error
  BOOST_TEST(moved(9, 0, true) == 2u);
  BOOST_TEST(moved(9, 0.99, true) == 2u);
  for (const double bad : {-1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    opt.swap_significance = bad;
    BOOST_CHECK_THROW(placement::replan_by_tokens(maps, tokens(1), topo, opt, 2, 1), config_error);
  }
}

BOOST_AUTO_TEST_CASE(replanning_is_deterministic) {
  std::mt19937 rng(7);
  const dynamic_topology topo(4, 2);
  std::vector<expert_map> maps;
  for (int l = 0; l < 3; ++l)
    maps.push_back(random_map(rng, 32, 8, 5, 8));
  const auto sample = random_sample(rng, 32, 4, 3, 400, 4);
  placement::token_refine_options opt;
  const auto a = placement::replan_by_tokens(maps, sample, topo, opt, 20, 1);
  const auto b = placement::replan_by_tokens(maps, sample, topo, opt, 20, 1);
  BOOST_TEST(a.experts_moved > 0u);
  for (std::size_t l = 0; l < maps.size(); ++l)
    BOOST_TEST(a.maps[l].slot_table() == b.maps[l].slot_table());
}

namespace {

// A trace whose requests of domain 0 favour experts [0, E/2) and of domain 1 experts [E/2, E);
// `domain_of(r)` gives each request's domain. One token per step per running request.
trace::trace two_mix_trace(std::mt19937& rng, std::size_t requests, std::size_t experts, std::size_t layers,
                           const std::function<std::uint32_t(std::size_t)>& domain_of) {
  trace::trace_builder b(experts, 2, layers);
  b.set_domains({"a", "b"});
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(r, domain_of(r), 1 + 40);
  for (std::size_t r = 0; r < requests; ++r)
    for (std::size_t p = 0; p < 41; ++p) {
      const std::size_t t = r * 41 + p;
      const std::size_t half = experts / 2, base = domain_of(r) * half;
      for (std::size_t l = 0; l < layers; ++l) {
        auto ids = b.ids(l, t);
        const std::size_t x = base + rng() % half;
        std::size_t y = base + rng() % half;
        while (y == x)
          y = base + rng() % half;
        ids[0] = static_cast<trace::trace_expert_id>(x);
        ids[1] = static_cast<trace::trace_expert_id>(y);
        b.weights(l, t)[0] = b.weights(l, t)[1] = 0.5f;
      }
    }
  return b.build().with_prefill_tokens(1);
}

// The drift and balance-trigger tests' setting: 2 nodes × 2 GPUs, 4 running requests per GPU, and
// linear maps of t's experts.
struct small_run {
  cost::simulation_config cfg;
  std::vector<expert_map> maps;
  explicit small_run(const trace::trace& t) {
    cfg.topology = dynamic_topology(2, 2);
    cfg.batch_per_rank = 4;
    maps = placement::linear{}.plan({cfg.topology,
                                     t.experts(),
                                     t.experts() / 4,
                                     std::vector<std::vector<double>>(t.layers(), std::vector<double>(t.experts(), 1)),
                                     {}});
  }
};

// `shift_step`: the first step that runs a token at or after trace position `shift_token`.
cost::online_result run_with_trigger(const trace::trace& t, std::size_t* first_fire, std::size_t shift_token = 0,
                                     std::size_t* shift_step = nullptr) {
  small_run run(t);
  auto& cfg = run.cfg;
  const auto& maps = run.maps;
  cfg.arrival_rate = 0.5; // in trace order: the mix follows the request order in time
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, maps, g, cfg);
  if (shift_step) {
    *shift_step = s.steps();
    for (std::size_t st = 0; st < s.steps() && *shift_step == s.steps(); ++st)
      for (const auto tok : s.step_tokens(st))
        if (tok >= shift_token) *shift_step = st;
  }
  cost::online_options opt;
  opt.window = 16;
  opt.drift_every = 4;
  opt.min_gap = 16;
  bool seen = false;
  auto res = cost::run_online(t, s, maps, cfg, opt,
                              [&](const std::vector<expert_map>& current, std::size_t, std::size_t last) {
                                if (!seen && first_fire) *first_fire = last;
                                seen = true;
                                return current;
                              });
  return res;
}

} // namespace

BOOST_AUTO_TEST_CASE(drift_trigger_stays_quiet_on_stationary_traffic) {
  for (std::uint32_t seed = 1; seed <= 5; ++seed) {
    std::mt19937 rng(seed);
    const auto t = two_mix_trace(rng, 120, 16, 3, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
    const auto res = run_with_trigger(t, nullptr);
    BOOST_TEST_CONTEXT("seed " << seed) {
      BOOST_TEST(res.drift_checks > 20u);
      BOOST_TEST(res.drift_fired == 0u);
      BOOST_TEST(res.replans.empty());
    }
  }
}

// Stationary traffic whose requests each keep their own favourite experts (as real requests do: a
// request's prefill predicts its decode): a window's load is a sample of its requests, whose
// turnover alone moves it. The noise of two halves of the window's requests covers that; the
// noise of its even and odd steps, each holding every request, did not (73 of 172 checks fired).
BOOST_AUTO_TEST_CASE(drift_trigger_stays_quiet_when_requests_keep_their_own_experts) {
  for (std::uint32_t seed = 1; seed <= 5; ++seed) {
    std::mt19937 rng(seed);
    constexpr std::size_t requests = 120, experts = 16, layers = 3, tokens = 41;
    trace::trace_builder b(experts, 2, layers);
    b.set_domains({"a"});
    for (std::size_t r = 0; r < requests; ++r)
      b.add_request(r, 0, tokens);
    for (std::size_t r = 0; r < requests; ++r)
      for (std::size_t l = 0; l < layers; ++l) {
        std::vector<std::size_t> favourite(experts);
        std::iota(favourite.begin(), favourite.end(), std::size_t{0});
        std::shuffle(favourite.begin(), favourite.end(), rng);
        favourite.resize(3);
        for (std::size_t p = 0; p < tokens; ++p) {
          auto ids = b.ids(l, r * tokens + p);
          const std::size_t x = rng() % 3, y = (x + 1 + rng() % 2) % 3;
          ids[0] = static_cast<trace::trace_expert_id>(favourite[x]);
          ids[1] = static_cast<trace::trace_expert_id>(favourite[y]);
          b.weights(l, r * tokens + p)[0] = b.weights(l, r * tokens + p)[1] = 0.5f;
        }
      }
    const auto t = b.build().with_prefill_tokens(1);
    const auto res = run_with_trigger(t, nullptr);
    BOOST_TEST_CONTEXT("seed " << seed) {
      BOOST_TEST(res.drift_checks > 20u);
      BOOST_TEST(res.drift_fired == 0u);
    }
  }
}

BOOST_AUTO_TEST_CASE(drift_trigger_fires_on_a_shift) {
  for (std::uint32_t seed = 1; seed <= 5; ++seed) {
    std::mt19937 rng(seed);
    // The first 60 requests mix both domains, the rest are domain 1 only.
    const auto t =
        two_mix_trace(rng, 120, 16, 3, [](std::size_t r) { return static_cast<std::uint32_t>(r < 60 ? r % 2 : 1); });
    std::size_t fire = 0, shift = 0;
    const auto res = run_with_trigger(t, &fire, 60 * 41, &shift);
    // Before the running requests have turned over (40 decode steps each) and one window (16 steps)
    // has filled with the new mix: the mix changes gradually from the first shifted token.
    BOOST_TEST_CONTEXT("seed " << seed) {
      BOOST_TEST(res.drift_fired >= 1u);
      BOOST_REQUIRE(!res.replans.empty());
      BOOST_TEST((res.replans.front().reason == cost::replan_reason::drift));
      BOOST_TEST(fire > shift);
      BOOST_TEST(fire <= shift + 40 + 16);
    }
  }
}

// A small replay: 50 requests of two mixes over 16 experts and 2 layers, 2 nodes × 2 GPUs, and
// single-copy random maps.
struct small_replay {
  explicit small_replay(unsigned seed) : rng(seed) {
    t = two_mix_trace(rng, 50, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
    cfg.topology = dynamic_topology(2, 2);
    cfg.batch_per_rank = 3;
    for (int l = 0; l < 2; ++l)
      maps.push_back(random_map(rng, 16, 4, 4, 0));
  }
  std::mt19937 rng;
  trace::trace t;
  cost::simulation_config cfg;
  std::vector<expert_map> maps;
};

// Replays are deterministic and a planner that never changes the maps gives simulate_decode's figures.
BOOST_AUTO_TEST_CASE(replay_matches_the_simulator) {
  small_replay sr(9);
  const auto& t = sr.t;
  auto cfg = sr.cfg;
  cfg.balance_window = 3;
  const auto& maps = sr.maps;
  grouper::round_robin g1, g2;
  const auto direct = cost::simulate_decode(t, maps, g1, cfg);
  const auto s = cost::record_schedule(t, maps, g2, cfg);
  cost::online_options opt;
  opt.interval = 7;
  opt.window = 5;
  const auto keep = [](const std::vector<expert_map>& m, std::size_t, std::size_t) { return m; };
  const auto a = cost::run_online(t, s, maps, cfg, opt, keep);
  const auto b = cost::run_online(t, s, maps, cfg, opt, keep);
  BOOST_TEST(a.decode_tokens == direct.decode_tokens);
  BOOST_TEST(a.inter_node_bytes_per_token == direct.inter_node_bytes_per_token, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(a.gpu_imbalance_aggregate == direct.gpu_imbalance_aggregate, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(a.gpu_imbalance_step_weighted == direct.gpu_imbalance_step_weighted, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(a.gpu_imbalance_step_weighted > a.gpu_imbalance_aggregate); // a run of small steps
  // The balance window counts the schedule's steps as the simulator counts its own.
  BOOST_TEST(a.balance_window == 3u);
  BOOST_TEST(a.gpu_imbalance_window == direct.gpu_imbalance_window, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(a.gpu_imbalance_window < a.gpu_imbalance_step_weighted);
  BOOST_TEST(a.gpu_imbalance_window > a.gpu_imbalance_aggregate);
  BOOST_TEST(a.replans.size() == b.replans.size());
  BOOST_TEST(a.replans.size() > 0u);
  for (const auto& e : a.replans)
    BOOST_TEST(e.experts_moved == 0u);
  // Options that were silently ignored: a plan_at step after a later one was skipped, and a NaN
  // drift ratio or floor never fired.
  cost::online_options unsorted = opt;
  unsorted.plan_at = {9, 3};
  BOOST_CHECK_THROW(cost::run_online(t, s, maps, cfg, unsorted, keep), config_error);
  for (const bool ratio : {true, false}) {
    cost::online_options nan = opt;
    nan.drift_every = 4;
    (ratio ? nan.drift_ratio : nan.drift_floor) = std::nan("");
    BOOST_CHECK_THROW(cost::run_online(t, s, maps, cfg, nan, keep), config_error);
  }
}

// vLLM's EPLB re-plans first after interval / 4 steps (its counter starts three quarters of the
// way), on the steps so far, then every interval: first_interval schedules the same. Without it
// the first scheduled re-plan waits for the interval and a full window.
BOOST_AUTO_TEST_CASE(first_interval_schedules_the_first_replan_as_vllm_does) {
  small_replay sr(9);
  const auto& t = sr.t;
  const auto& cfg = sr.cfg;
  const auto& maps = sr.maps;
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, maps, g, cfg);
  BOOST_REQUIRE(s.steps() > 12u);
  cost::online_options opt;
  opt.interval = 8;
  opt.window = 5;
  std::vector<std::pair<std::size_t, std::size_t>> windows;
  const auto record = [&](const std::vector<expert_map>& m, std::size_t a, std::size_t b) {
    windows.emplace_back(a, b);
    return m;
  };
  const auto steps_of = [](const cost::online_result& r) {
    std::vector<std::size_t> v;
    for (const auto& e : r.replans)
      v.push_back(e.step);
    return v;
  };
  const auto plain = cost::run_online(t, s, maps, cfg, opt, record);
  BOOST_TEST(plain.replans.front().step == 8u);
  BOOST_TEST(cost::first_replan_step(opt) == 8u);
  windows.clear();
  opt.first_interval = opt.interval / 4;
  const auto vllm = cost::run_online(t, s, maps, cfg, opt, record);
  const auto at = steps_of(vllm);
  BOOST_TEST(at.front() == 2u);
  BOOST_TEST(cost::first_replan_step(opt) == 2u);
  BOOST_TEST((windows.front() == std::pair<std::size_t, std::size_t>{0, 2})); // the steps so far
  for (std::size_t i = 1; i < at.size(); ++i)
    BOOST_TEST(at[i] - at[i - 1] == 8u);
  BOOST_TEST((windows.at(1) == std::pair<std::size_t, std::size_t>{5, 10})); // a full window after
  for (const std::size_t bad : {std::size_t{9}, std::size_t{1}}) {
    cost::online_options o = opt;
    o.first_interval = bad;
    if (bad == 1) o.interval = 0; // nothing to schedule
    BOOST_CHECK_THROW(cost::run_online(t, s, maps, cfg, o, record), config_error);
  }
}

BOOST_AUTO_TEST_CASE(window_floor_equals_the_balance_of_single_copy_maps) {
  // Without replicas every row has one destination: each window's floor is its measured balance,
  // also across re-plans that move experts mid-window (each segment split on its own maps).
  small_replay sr(11);
  auto& rng = sr.rng;
  const auto& t = sr.t;
  const auto& cfg = sr.cfg;
  const auto& maps = sr.maps;
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, maps, g, cfg);
  cost::online_options opt;
  opt.interval = 7;
  opt.window = 5;
  opt.report_tokens = 40;
  opt.balance_floor = true;
  std::size_t moved = 0;
  const auto reshuffle = [&](const std::vector<expert_map>&, std::size_t, std::size_t) {
    std::vector<expert_map> next;
    for (int l = 0; l < 2; ++l)
      next.push_back(random_map(rng, 16, 4, 4, 0));
    return next;
  };
  const auto res = cost::run_online(t, s, maps, cfg, opt, reshuffle);
  for (const auto& e : res.replans)
    moved += e.experts_moved;
  BOOST_TEST(moved > 0u);
  BOOST_TEST(res.windows.size() > 1u);
  for (const auto& w : res.windows)
    BOOST_TEST(w.balance_floor == w.gpu_imbalance, boost::test_tools::tolerance(1e-9));
  // With replicas the floor is a lower bound of the measured balance.
  std::vector<expert_map> replicated;
  for (int l = 0; l < 2; ++l)
    replicated.push_back(random_map(rng, 16, 4, 6, 8));
  const auto s2 = cost::record_schedule(t, replicated, g, cfg);
  const auto keep = [](const std::vector<expert_map>& m, std::size_t, std::size_t) { return m; };
  for (const auto& w : cost::run_online(t, s2, replicated, cfg, opt, keep).windows) {
    BOOST_TEST(w.balance_floor >= 1 - 1e-12);
    BOOST_TEST(w.balance_floor <= w.gpu_imbalance + 1e-9);
  }
}

// Segments (e.g. one per phase) partition the steps from their first start: their tokens and bytes
// add up to the run's, one segment from step 0 has the run's balance, and each segment's balance
// is that of a run over its steps alone under the same maps.
BOOST_AUTO_TEST_CASE(segments_partition_the_run) {
  small_replay sr(13);
  const auto& t = sr.t;
  const auto& cfg = sr.cfg;
  const auto& maps = sr.maps;
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, maps, g, cfg);
  BOOST_REQUIRE(s.steps() > 10u);
  const auto keep = [](const std::vector<expert_map>& m, std::size_t, std::size_t) { return m; };
  cost::online_options opt;
  opt.segment_starts = {0};
  const auto whole = cost::run_online(t, s, maps, cfg, opt, keep);
  BOOST_REQUIRE(whole.segments.size() == 1u);
  BOOST_TEST(whole.segments[0].steps == s.steps());
  BOOST_TEST(whole.segments[0].tokens == whole.decode_tokens);
  BOOST_TEST(whole.segments[0].gpu_imbalance == whole.gpu_imbalance_aggregate, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(whole.segments[0].inter_node_bytes ==
                 whole.inter_node_bytes_per_token * static_cast<double>(whole.decode_tokens),
             boost::test_tools::tolerance(1e-9));

  const std::size_t a = 3, b = s.steps() / 2;
  opt.segment_starts = {a, b};
  const auto split = cost::run_online(t, s, maps, cfg, opt, keep);
  BOOST_REQUIRE(split.segments.size() == 2u);
  BOOST_TEST(split.segments[0].first_step == a);
  BOOST_TEST(split.segments[0].steps == b - a);
  BOOST_TEST(split.segments[1].steps == s.steps() - b);
  // The second segment alone: the same steps as a schedule of their own.
  cost::decode_schedule tail;
  for (std::size_t st = b; st < s.steps(); ++st) {
    for (const auto tok : s.step_tokens(st))
      tail.tokens.push_back(tok);
    for (const auto src : s.step_sources(st))
      tail.sources.push_back(src);
    tail.step_begin.push_back(tail.tokens.size());
  }
  cost::online_options plain;
  const auto alone = cost::run_online(t, tail, maps, cfg, plain, keep);
  BOOST_TEST(split.segments[1].tokens == alone.decode_tokens);
  BOOST_TEST(split.segments[1].gpu_imbalance == alone.gpu_imbalance_aggregate, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(split.segments[1].inter_node_bytes ==
                 alone.inter_node_bytes_per_token * static_cast<double>(alone.decode_tokens),
             boost::test_tools::tolerance(1e-9));

  for (const auto& bad :
       {std::vector<std::size_t>{4, 4}, std::vector<std::size_t>{5, 2}, std::vector<std::size_t>{s.steps()}}) {
    cost::online_options o;
    o.segment_starts = bad;
    BOOST_CHECK_THROW(cost::run_online(t, s, maps, cfg, o, keep), config_error);
  }
}

namespace {

// Rows per rank of one layer's sample on a map without replicas.
std::vector<double> rank_rows(const expert_map& m, const placement::token_sample& s, std::size_t layer) {
  std::vector<double> rows(m.ranks(), 0.0);
  for (const auto e : s.ids[layer])
    rows[static_cast<std::size_t>(m.replicas(e)[0].rank)] += 1;
  return rows;
}

// A random one-layer case: 2-4 nodes of 1-2 GPUs, 3-5 experts per GPU on a single-copy map, and a
// sample of 200-499 top-2 tokens.
struct layer_case {
  dynamic_topology topo;
  std::size_t ranks, experts;
  std::vector<expert_map> maps;
  placement::token_sample sample;
};
layer_case one_layer_case(std::mt19937& rng) {
  const dynamic_topology topo(2 + rng() % 3, 1 + rng() % 2);
  const std::size_t ranks = topo.ranks(), experts = ranks * (3 + rng() % 3);
  std::vector<expert_map> maps{random_map(rng, experts, ranks, experts / ranks, 0)};
  auto sample = random_sample(rng, experts, 2, 1, 200 + rng() % 300, topo.nodes());
  return {topo, ranks, experts, std::move(maps), std::move(sample)};
}

} // namespace

// Under a budget every swap moves weights: a repair must lower the busiest GPU by at least half of
// what the best single swap would (brute force over all swaps), not by whatever saves most copies.
BOOST_AUTO_TEST_CASE(a_repair_swap_takes_at_least_half_the_best_drop) {
  std::mt19937 rng(21);
  int repaired = 0;
  for (int instance = 0; instance < 60; ++instance) {
    auto [topo, ranks, experts, maps, sample] = one_layer_case(rng);
    // Heat the experts of one rank: extra tokens that use two of them.
    const std::size_t hot = rng() % ranks;
    std::vector<std::uint16_t> on_hot;
    for (std::size_t e = 0; e < experts; ++e)
      if (static_cast<std::size_t>(maps[0].replicas(static_cast<expert_id>(e))[0].rank) == hot)
        on_hot.push_back(static_cast<std::uint16_t>(e));
    const std::size_t extra = sample.tokens() / 2;
    for (std::size_t i = 0; i < extra; ++i) {
      const std::size_t x = rng() % on_hot.size(), y = (x + 1 + rng() % (on_hot.size() - 1)) % on_hot.size();
      sample.ids[0].push_back(on_hot[x]);
      sample.ids[0].push_back(on_hot[y]);
      sample.home.push_back(static_cast<std::uint32_t>(rng() % topo.nodes()));
    }
    const auto before = rank_rows(maps[0], sample, 0);
    const double peak = *std::max_element(before.begin(), before.end());
    const std::size_t over = static_cast<std::size_t>(std::max_element(before.begin(), before.end()) - before.begin());
    double total = 0;
    for (const double x : before)
      total += x;
    placement::token_refine_options opt;
    // The re-plan's bound (at least two standard errors of a rank's sampled load): a repair only above it.
    const double per_rank = static_cast<double>(sample.ids[0].size()) / static_cast<double>(ranks);
    const double slack = std::max({opt.balance_slack, opt.replan_slack, 2 / std::sqrt(per_rank)});
    if (peak <= (1 + slack) * total / static_cast<double>(ranks) * 1.02) continue;
    std::vector<double> rows(experts, 0.0);
    for (const auto e : sample.ids[0])
      rows[e] += 1;
    double best = 0; // the most one swap of an expert on `over` lowers max(over, partner)
    for (std::size_t e = 0; e < experts; ++e) {
      if (static_cast<std::size_t>(maps[0].replicas(static_cast<expert_id>(e))[0].rank) != over) continue;
      for (std::size_t f = 0; f < experts; ++f) {
        const auto b = static_cast<std::size_t>(maps[0].replicas(static_cast<expert_id>(f))[0].rank);
        if (b == over) continue;
        const double d = rows[f] - rows[e];
        best = std::max(best, peak - std::max(peak + d, before[b] - d));
      }
    }
    const auto r = placement::replan_by_tokens(maps, sample, topo, opt, 2, 1);
    BOOST_REQUIRE(r.swaps == 1u);
    const auto after = rank_rows(r.maps[0], sample, 0);
    double changed_peak = 0; // the larger of the two swapped ranks' loads after the swap
    for (std::size_t q = 0; q < ranks; ++q)
      if (after[q] != before[q]) changed_peak = std::max(changed_peak, after[q]);
    BOOST_TEST_CONTEXT("instance " << instance) {
      BOOST_TEST(after[over] < before[over]);
      BOOST_TEST(peak - changed_peak >= 0.5 * best - 1e-9);
    }
    ++repaired;
  }
  BOOST_TEST(repaired >= 20);
}

// A re-plan never leaves a GPU above the larger of its own bound and the peak it started from.
BOOST_AUTO_TEST_CASE(a_replan_holds_its_load_bound) {
  std::mt19937 rng(23);
  for (int instance = 0; instance < 40; ++instance) {
    const dynamic_topology topo(2 + rng() % 3, 1 + rng() % 3);
    const std::size_t ranks = topo.ranks(), experts = ranks * (2 + rng() % 4), layers = 1 + rng() % 3;
    std::vector<expert_map> maps;
    for (std::size_t l = 0; l < layers; ++l)
      maps.push_back(random_map(rng, experts, ranks, experts / ranks, 0));
    const auto sample = random_sample(rng, experts, 2, layers, 100 + rng() % 400, topo.nodes());
    placement::token_refine_options opt;
    opt.replan_slack = 0.02 * static_cast<double>(rng() % 8);
    const auto r = placement::replan_by_tokens(maps, sample, topo, opt, 4 + rng() % 20, 1);
    const double per_rank = static_cast<double>(sample.tokens() * 2) / static_cast<double>(ranks);
    const double slack = std::max({opt.balance_slack, opt.replan_slack, 2 / std::sqrt(per_rank)});
    for (std::size_t l = 0; l < layers; ++l) {
      const auto before = rank_rows(maps[l], sample, l), after = rank_rows(r.maps[l], sample, l);
      double total = 0;
      for (const double x : before)
        total += x;
      const double bound =
          std::max(*std::max_element(before.begin(), before.end()), (1 + slack) * total / static_cast<double>(ranks));
      BOOST_TEST_CONTEXT("instance " << instance << " layer " << l) {
        BOOST_TEST(*std::max_element(after.begin(), after.end()) <= bound + 1e-9);
      }
    }
  }
  placement::token_refine_options bad;
  bad.replan_slack = -0.1;
  std::vector<expert_map> one{random_map(rng, 8, 4, 2, 0)};
  BOOST_CHECK_THROW(
      placement::replan_by_tokens(one, random_sample(rng, 8, 2, 1, 50, 2), dynamic_topology(2, 2), bad, 2, 1),
      config_error);
}

// with_prior: the prior's tokens steer the copy savings, the window alone sets the loads the
// re-plan's bound holds. A prior that piles onto one GPU's experts would, counted in the loads, send
// the budget to repairing a GPU the window does not overload.
BOOST_AUTO_TEST_CASE(a_replan_with_a_prior_holds_the_bound_on_the_windows_loads) {
  std::mt19937 rng(29);
  int broken_if_counted = 0;
  for (int instance = 0; instance < 40; ++instance) {
    const auto c = one_layer_case(rng);
    // Plain references, not structured bindings: the lambda below captures them.
    const dynamic_topology& topo = c.topo;
    const std::vector<expert_map>& maps = c.maps;
    const placement::token_sample& window = c.sample;
    const std::size_t ranks = c.ranks, experts = c.experts;
    auto prior = random_sample(rng, experts, 2, 1, 300, topo.nodes());
    std::vector<std::uint16_t> on_first;
    for (std::size_t e = 0; e < experts; ++e)
      if (maps[0].replicas(static_cast<expert_id>(e))[0].rank == 0) on_first.push_back(static_cast<std::uint16_t>(e));
    for (std::size_t i = 0; i < prior.ids[0].size(); i += 2) { // every prior token on GPU 0's experts
      prior.ids[0][i] = on_first[0];
      prior.ids[0][i + 1] = on_first[1 + rng() % (on_first.size() - 1)];
    }
    const auto both = placement::with_prior(window, prior, 0);
    BOOST_REQUIRE(both.tokens() == window.tokens() + prior.tokens());
    BOOST_TEST(both.load_tokens() == static_cast<double>(window.tokens()));
    placement::token_refine_options opt;
    const std::size_t budget = 4 + rng() % 12;
    const auto r = placement::replan_by_tokens(maps, both, topo, opt, budget, 1);
    BOOST_TEST(r.experts_moved <= budget);
    const double per_rank = static_cast<double>(window.tokens() * 2) / static_cast<double>(ranks);
    const double slack = std::max({opt.balance_slack, opt.replan_slack, 2 / std::sqrt(per_rank)});
    const auto bound_holds = [&](const std::vector<expert_map>& m) {
      const auto before = rank_rows(maps[0], window, 0), after = rank_rows(m[0], window, 0);
      double total = 0;
      for (const double x : before)
        total += x;
      return *std::max_element(after.begin(), after.end()) <=
             std::max(*std::max_element(before.begin(), before.end()),
                      (1 + slack) * total / static_cast<double>(ranks)) +
                 1e-9;
    };
    BOOST_TEST_CONTEXT("instance " << instance) { BOOST_TEST(bound_holds(r.maps)); }
    // The same tokens counted once each in the loads: the bound on the window can break.
    auto counted = both;
    counted.load_weight.clear();
    broken_if_counted += !bound_holds(placement::replan_by_tokens(maps, counted, topo, opt, budget, 1).maps);
  }
  BOOST_TEST(broken_if_counted > 0);
}

// A token of load weight 2 is, for the loads, the same token twice: a re-plan of a sample whose first
// tokens weigh 2 repairs and bounds as one on a sample holding them twice, with copy costs counted
// once. With both copy weights 0 the loads alone decide: every swap is a repair.
BOOST_AUTO_TEST_CASE(a_load_weight_of_two_is_a_token_counted_twice) {
  std::mt19937 rng(43);
  int differed_from_unweighted = 0;
  for (int instance = 0; instance < 30; ++instance) {
    const auto c = one_layer_case(rng);
    const std::size_t heavy = c.sample.tokens() / 3;
    auto weighted = c.sample;
    weighted.load_weight.assign(weighted.tokens(), 1.0f);
    for (std::size_t t = 0; t < heavy; ++t)
      weighted.load_weight[t] = 2.0f;
    auto doubled = c.sample;
    doubled.home.insert(doubled.home.end(), c.sample.home.begin(), c.sample.home.begin() + heavy);
    doubled.ids[0].insert(doubled.ids[0].end(), c.sample.ids[0].begin(), c.sample.ids[0].begin() + heavy * 2);
    placement::token_refine_options opt;
    opt.rank_copy_weight = opt.node_copy_weight = 0; // loads alone decide
    opt.replan_slack = 0.02;
    const auto a = placement::replan_by_tokens(c.maps, weighted, c.topo, opt, 12, 1);
    const auto b = placement::replan_by_tokens(c.maps, doubled, c.topo, opt, 12, 1);
    BOOST_TEST_CONTEXT("instance " << instance) {
      BOOST_TEST(differing_slots(a.maps, b.maps) == 0u);
      BOOST_TEST(a.swaps == b.swaps);
    }
    differed_from_unweighted +=
        differing_slots(a.maps, placement::replan_by_tokens(c.maps, c.sample, c.topo, opt, 12, 1).maps) > 0;
  }
  BOOST_TEST(differed_from_unweighted > 0); // the weights did change what the re-plan did
}

// Load weights of 1 are the unweighted sample; malformed weights and mismatched samples are refused.
BOOST_AUTO_TEST_CASE(load_weights_of_one_change_nothing_and_bad_ones_are_refused) {
  std::mt19937 rng(31);
  const dynamic_topology topo(2, 2);
  std::vector<expert_map> maps{random_map(rng, 16, 4, 4, 0), random_map(rng, 16, 4, 4, 0)};
  auto sample = random_sample(rng, 16, 2, 2, 400, 2);
  const auto plain = placement::replan_by_tokens(maps, sample, topo, {}, 8, 1);
  auto ones = sample;
  ones.load_weight.assign(ones.tokens(), 1.0f);
  const auto weighted = placement::replan_by_tokens(maps, ones, topo, {}, 8, 1);
  BOOST_TEST(differing_slots(plain.maps, weighted.maps) == 0u);
  BOOST_TEST(plain.cost_after == weighted.cost_after);
  auto bad = ones;
  bad.load_weight[3] = -1.0f;
  BOOST_CHECK_THROW(placement::replan_by_tokens(maps, bad, topo, {}, 8, 1), invalid_input_error);
  bad.load_weight[3] = std::nanf("");
  BOOST_CHECK_THROW(placement::replan_by_tokens(maps, bad, topo, {}, 8, 1), invalid_input_error);
  bad.load_weight.pop_back();
  BOOST_CHECK_THROW(placement::replan_by_tokens(maps, bad, topo, {}, 8, 1), invalid_input_error);
  // The replica fill balances every token once: a weighted sample is refused, not misread.
  BOOST_CHECK_THROW(placement::add_replicas_by_tokens(maps, ones, topo), config_error);
  // A prior of another shape, or a window already weighted.
  BOOST_CHECK_THROW(placement::with_prior(sample, random_sample(rng, 12, 2, 2, 10, 2)), config_error);
  BOOST_CHECK_THROW(placement::with_prior(ones, sample), config_error);
  BOOST_TEST(placement::with_prior(sample, placement::token_sample{}).load_weight.empty());
  BOOST_CHECK_THROW(placement::with_prior(sample, sample, -1), config_error);
  BOOST_CHECK_THROW(placement::with_prior(sample, sample, std::nan("")), config_error);
  // A weight a float cannot hold is refused here, not blamed on the sample later.
  BOOST_CHECK_THROW(placement::with_prior(sample, sample, 1e300), config_error);
}

// The prior weighs in the loads as prior_requests requests beside the window's distinct ones: a
// window of few requests leans on it, a window of many barely does.
BOOST_AUTO_TEST_CASE(the_prior_weighs_as_many_requests_as_asked) {
  std::mt19937 rng(37);
  const auto prior = random_sample(rng, 16, 2, 1, 300, 2);
  for (const std::size_t requests : {4u, 40u}) {
    auto window = random_sample(rng, 16, 2, 1, 200, 2);
    for (std::size_t t = 0; t < window.tokens(); ++t)
      window.request.push_back(static_cast<std::uint32_t>(100 + t % requests));
    const auto both = placement::with_prior(window, prior, 8);
    BOOST_REQUIRE(both.load_weight.size() == 500u);
    // Request ids go on, the prior's (it has none: each token its own) after the window's.
    BOOST_REQUIRE(both.request.size() == 500u);
    BOOST_TEST(std::equal(window.request.begin(), window.request.end(), both.request.begin()));
    const std::set<std::uint32_t> prior_ids(both.request.begin() + 200, both.request.end());
    BOOST_TEST(prior_ids.size() == 300u);
    BOOST_TEST(*prior_ids.begin() > 100 + requests - 1);
    for (std::size_t t = 0; t < 200; ++t)
      BOOST_TEST(both.load_weight[t] == 1.0f);
    // The prior's 300 tokens weigh as 8 / requests of the window's 200.
    const double expected = 200.0 * (1 + 8.0 / static_cast<double>(requests));
    BOOST_TEST(both.load_tokens() == expected, boost::test_tools::tolerance(1e-5));
    // Without request ids every token is its own request: the prior weighs as 8 of the 200.
    window.request.clear();
    BOOST_TEST(placement::with_prior(window, prior, 8).load_tokens() == 208.0, boost::test_tools::tolerance(1e-5));
  }
}

// With the profile the maps were fitted to, drift is checked from the first steps: a run whose mix
// is not that profile's is re-planned before a full window has run, and one whose mix is stays quiet.
BOOST_AUTO_TEST_CASE(a_reference_profile_lets_drift_fire_before_a_full_window) {
  for (std::uint32_t seed = 1; seed <= 5; ++seed) {
    std::mt19937 rng(seed);
    const auto mixed = [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); };
    const auto fitted = two_mix_trace(rng, 120, 16, 3, mixed);
    const auto same = two_mix_trace(rng, 120, 16, 3, mixed);
    const auto other = two_mix_trace(rng, 120, 16, 3, [](std::size_t) { return std::uint32_t{1}; });
    const small_run setting(fitted);
    const auto& cfg = setting.cfg;
    const auto& maps = setting.maps;
    grouper::round_robin g;
    const auto fs = cost::record_schedule(fitted, maps, g, cfg);
    cost::online_options opt;
    opt.window = 16;
    opt.drift_every = 4;
    opt.min_gap = 16;
    opt.reference = cost::load_profile::of(fitted, fs, 0, fs.steps(), cfg.topology);
    opt.min_check = 4;
    // The profile of a sample of every token of the run is the run's profile.
    const auto every = cost::window_sample(fitted, fs, 0, fs.steps(), cfg.topology, 0);
    BOOST_TEST((cost::load_profile::of(every, cfg.topology.nodes()).counts == opt.reference.counts));
    // ... and each sampled token names the request that owns it.
    BOOST_REQUIRE(every.request.size() == fs.tokens.size());
    for (std::size_t i = 0; i < fs.tokens.size(); ++i) {
      const auto& q = fitted.request(every.request[i]);
      BOOST_TEST((fs.tokens[i] >= q.first_token && fs.tokens[i] < q.first_token + q.length));
    }
    const auto run = [&](const trace::trace& t, std::size_t* first) {
      grouper::round_robin rr;
      const auto s = cost::record_schedule(t, maps, rr, cfg);
      return cost::run_online(t, s, maps, cfg, opt,
                              [&](const std::vector<expert_map>& cur, std::size_t, std::size_t b) {
                                if (*first == 0) *first = b;
                                return cur;
                              });
    };
    std::size_t first_same = 0, first_other = 0;
    const auto quiet = run(same, &first_same), shifted = run(other, &first_other);
    // A check every step from the first on: checks need four steps (fewer hold a token or two of
    // each request, too few to measure the noise), so a one-step window is never checked.
    auto every_step = opt;
    every_step.drift_every = every_step.min_check = 1;
    grouper::round_robin rr1;
    const auto ss = cost::record_schedule(same, maps, rr1, cfg);
    BOOST_TEST(cost::run_online(same, ss, maps, cfg, every_step, [](const auto& m, std::size_t, std::size_t) {
                 return m;
               }).drift_fired == 0u);
    BOOST_TEST_CONTEXT("seed " << seed) {
      BOOST_TEST(quiet.drift_fired == 0u);
      // Once: the re-plan's reference is its own few steps, whose sampling noise the later checks
      // on full windows of the same traffic allow for.
      BOOST_TEST(shifted.drift_fired == 1u);
      BOOST_TEST(first_other >= 4u);
      BOOST_TEST(first_other >= cost::first_replan_step(opt));
      BOOST_TEST(first_other < opt.window);
    }
    // A reference of another shape is refused.
    auto wrong = opt;
    wrong.reference.counts.pop_back();
    grouper::round_robin rr;
    const auto s = cost::record_schedule(same, maps, rr, cfg);
    BOOST_CHECK_THROW(
        cost::run_online(same, s, maps, cfg, wrong, [](const auto& m, std::size_t, std::size_t) { return m; }),
        config_error);
  }
}

// The balance trigger re-plans while the maps in service measure a GPU max/mean above it, whatever
// the drift check says: a planner that leaves the maps unbalanced is asked again every min_gap
// steps, one that balances them is asked once.
BOOST_AUTO_TEST_CASE(the_balance_trigger_fires_while_the_maps_stay_unbalanced) {
  std::mt19937 rng(41);
  // Domain 1 only: experts [8, 16), which linear placement puts on ranks 2 and 3.
  const auto t = two_mix_trace(rng, 80, 16, 2, [](std::size_t) { return std::uint32_t{1}; });
  const small_run setting(t);
  const auto& cfg = setting.cfg;
  const auto& linear = setting.maps;
  // Two of the hot experts on every rank.
  std::vector<expert_id> table;
  for (std::size_t r = 0; r < 4; ++r)
    for (const std::size_t e : {2 * r, 2 * r + 1, 8 + 2 * r, 9 + 2 * r})
      table.push_back(static_cast<expert_id>(e));
  const std::vector<expert_map> spread(2, expert_map(16, 4, 4, table));
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, linear, g, cfg);
  cost::online_options opt;
  opt.window = 16;
  opt.drift_every = 4;
  opt.min_gap = 16;
  opt.drift_floor = 2; // the drift check never fires: only the balance trigger can
  const auto keep = [](const std::vector<expert_map>& m, std::size_t, std::size_t) { return m; };
  const auto off = cost::run_online(t, s, linear, cfg, opt, keep);
  BOOST_TEST(off.replans.empty());
  opt.balance_trigger = 1.5;
  const auto stuck = cost::run_online(t, s, linear, cfg, opt, keep);
  BOOST_TEST(stuck.balance_fired >= 3u);
  BOOST_TEST(stuck.replans.size() == stuck.balance_fired);
  for (std::size_t i = 0; i < stuck.replans.size(); ++i) {
    BOOST_TEST((stuck.replans[i].reason == cost::replan_reason::balance));
    BOOST_TEST(stuck.replans[i].measured_imbalance > 1.5);
    if (i > 0) BOOST_TEST(stuck.replans[i].step - stuck.replans[i - 1].step >= opt.min_gap);
  }
  const auto fixed = cost::run_online(t, s, linear, cfg, opt,
                                      [&](const std::vector<expert_map>&, std::size_t, std::size_t) { return spread; });
  BOOST_TEST(fixed.balance_fired == 1u);
  opt.balance_trigger = 0.5;
  BOOST_CHECK_THROW(cost::run_online(t, s, linear, cfg, opt, keep), config_error);
}

// The first step a run can re-plan at: without a reference the first check compares its window with
// itself, so a drift re-plan comes at the next check at the earliest (the balance trigger may act at
// the first); with one, checks start at min_check.
BOOST_AUTO_TEST_CASE(first_replan_step_skips_a_check_without_a_reference) {
  cost::online_options opt;
  opt.window = 16;
  opt.drift_every = 4;
  BOOST_TEST(cost::first_replan_step(opt) == 20u);
  opt.window = 10; // the first check at 12 (a window's own reference), the first that can fire at 16
  BOOST_TEST(cost::first_replan_step(opt) == 16u);
  opt.window = 100;
  opt.drift_every = 30;
  BOOST_TEST(cost::first_replan_step(opt) == 150u);
  opt.window = 16;
  opt.drift_every = 4;
  opt.balance_trigger = 1.25;
  BOOST_TEST(cost::first_replan_step(opt) == 16u);
  opt.balance_trigger = 0;
  opt.interval = 10;
  BOOST_TEST(cost::first_replan_step(opt) == 16u); // scheduled: a full window and the interval
  opt.interval = 0;
  opt.reference.nodes = opt.reference.experts = 1;
  opt.reference.counts = {{1.0}};
  opt.min_check = 6;
  BOOST_TEST(cost::first_replan_step(opt) == 8u);
}

// The noise the distance is held against is the distance between the window's two request halves
// × √((1 + n/m) / 4) (window n pairs, reference m): half the halves' distance for a reference as
// large as the population, more for a reference of a few steps, which carries its own noise.
BOOST_AUTO_TEST_CASE(a_small_reference_widens_the_drift_noise) {
  std::mt19937 rng(47);
  const auto t = two_mix_trace(rng, 80, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const small_run setting(t);
  const auto& cfg = setting.cfg;
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, setting.maps, g, cfg);
  BOOST_REQUIRE(s.steps() > 40u);
  const auto& topo = cfg.topology;
  const auto first_half = cost::load_profile::of(t, s, 20, 40, topo, cost::request_half::first);
  const auto second_half = cost::load_profile::of(t, s, 20, 40, topo, cost::request_half::second);
  const double halves = cost::divergence(first_half, second_half);
  // The halves split the window's tokens, each token in one.
  const auto whole = cost::load_profile::of(t, s, 20, 40, topo);
  for (std::size_t l = 0; l < whole.counts.size(); ++l)
    for (std::size_t i = 0; i < whole.counts[l].size(); ++i)
      BOOST_TEST(first_half.counts[l][i] + second_half.counts[l][i] == whole.counts[l][i]);
  const double n = static_cast<double>(s.step_begin[40] - s.step_begin[20]) * 2;
  const auto small = cost::load_profile::of(t, s, 0, 4, topo), large = cost::load_profile::of(t, s, 0, 40, topo);
  const double m = static_cast<double>(s.step_begin[4] - s.step_begin[0]) * 2;
  const auto c_small = cost::check_drift(t, s, 20, 40, topo, small, 2, 0.02);
  const auto c_large = cost::check_drift(t, s, 20, 40, topo, large, 2, 0.02);
  const double m_large = static_cast<double>(s.step_begin[40] - s.step_begin[0]) * 2;
  BOOST_TEST(c_small.noise == halves * std::sqrt((1 + n / m) / 4), boost::test_tools::tolerance(1e-12));
  BOOST_TEST(c_large.noise == halves * std::sqrt((1 + n / m_large) / 4), boost::test_tools::tolerance(1e-12));
  BOOST_TEST(c_small.noise > c_large.noise);
  // A window of one request has no second half to measure its noise by: no estimate, no fire
  // (though its distance from the mixed traffic is large).
  std::mt19937 rng1(5);
  const auto one = two_mix_trace(rng1, 1, 16, 2, [](std::size_t) { return std::uint32_t{1}; });
  grouper::round_robin g1;
  const auto s1 = cost::record_schedule(one, setting.maps, g1, cfg);
  const auto c_one = cost::check_drift(one, s1, 0, s1.steps(), topo, large, 2, 0.02);
  BOOST_TEST(c_one.distance > 0.3);
  BOOST_TEST(!c_one.fired);
  BOOST_TEST(std::isinf(c_one.noise));
}

// The re-plan of recorded traffic (placement/live_replan.hpp), as `locus map replan` and
// `locus.replan` run it.

// decode_token_sample: the listed requests' decode tokens in order (every stride-th), each with
// its request's node and its index in the list, and the trace's experts.
BOOST_AUTO_TEST_CASE(decode_token_sample_takes_the_listed_requests_decode_tokens) {
  std::mt19937 rng(51);
  const auto t = two_mix_trace(rng, 6, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const std::vector<std::size_t> reqs{1, 3, 4};
  const std::vector<std::uint32_t> nodes{1, 0, 1};
  for (const std::size_t max_tokens : {std::size_t{0}, std::size_t{50}}) {
    const auto s = placement::decode_token_sample(t, reqs, nodes, max_tokens);
    std::vector<std::uint64_t> expected; // (list index, trace token) of every decode token, strided
    std::vector<std::size_t> owner;
    for (std::size_t i = 0; i < reqs.size(); ++i)
      for (std::size_t p = 1; p < 41; ++p) { // the first token of each request is prefill
        expected.push_back(t.request(reqs[i]).first_token + p);
        owner.push_back(i);
      }
    const std::size_t stride = max_tokens ? (expected.size() + max_tokens - 1) / max_tokens : 1;
    BOOST_TEST_REQUIRE(s.tokens() == (expected.size() + stride - 1) / stride);
    for (std::size_t k = 0; k < s.tokens(); ++k) {
      const std::size_t at = k * stride;
      BOOST_TEST(s.request[k] == owner[at]);
      BOOST_TEST(s.home[k] == nodes[owner[at]]);
      for (std::size_t l = 0; l < t.layers(); ++l)
        for (std::size_t j = 0; j < t.top_k(); ++j)
          BOOST_TEST(s.ids[l][k * t.top_k() + j] == t.layer(l).expert(expected[at], j));
    }
  }
  BOOST_CHECK_THROW(placement::decode_token_sample(t, reqs, std::vector<std::uint32_t>{0}, 0), config_error);
  BOOST_CHECK_THROW(placement::decode_token_sample(t, std::vector<std::size_t>{6}, std::vector<std::uint32_t>{0}, 0),
                    config_error);
}

// class_nodes: requests the model recognises go to their class's node, so the two kinds of
// requests land on different nodes, each kind on one.
BOOST_AUTO_TEST_CASE(class_nodes_put_each_kind_of_request_on_its_classes_node) {
  std::mt19937 rng(53);
  const auto domain = [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); };
  const auto train = two_mix_trace(rng, 40, 16, 2, domain), window = two_mix_trace(rng, 10, 16, 2, domain);
  grouper::workload_aware_options o;
  o.clusters = 2;
  const auto m = grouper::workload_model::fit(train, dynamic_topology(2, 2), o);
  const auto nodes = grouper::class_nodes(m, window, 1);
  BOOST_TEST_REQUIRE(nodes.size() == 10u);
  for (std::size_t r = 2; r < 10; ++r)
    BOOST_TEST(nodes[r] == nodes[r % 2]);
  BOOST_TEST(nodes[0] != nodes[1]);
}

// A window of one request says nothing about which GPUs are busy: its tokens route alike, so the
// re-plan's bound, two standard errors of a GPU's load from the spread of the window's requests,
// is unbounded, and nothing moves, with a prior or without (the bound that counted copies as
// independent draws, 2 / sqrt(copies per GPU), saw its kind's GPUs at twice the mean as hot and
// repaired them with the whole budget). The same kind as twelve requests is repaired (the case below).
BOOST_AUTO_TEST_CASE(a_window_of_one_request_moves_nothing) {
  std::mt19937 rng(57);
  const auto prior = two_mix_trace(rng, 40, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const auto window = two_mix_trace(rng, 1, 16, 2, [](std::size_t) { return std::uint32_t{1}; });
  const small_run setting(window);
  std::vector<std::uint32_t> prior_nodes(prior.requests());
  for (std::size_t r = 0; r < prior_nodes.size(); ++r)
    prior_nodes[r] = static_cast<std::uint32_t>(r % 2);
  placement::live_replan_options o;
  o.budget_share = 1.0;
  const std::vector<std::uint32_t> window_nodes{0};
  for (const bool with_prior : {false, true}) {
    const auto r =
        placement::replan_live(setting.maps, window, window_nodes, setting.cfg.topology, o,
                               with_prior ? &prior : nullptr, with_prior ? prior_nodes : std::vector<std::uint32_t>{});
    BOOST_TEST_CONTEXT("with prior " << with_prior) {
      BOOST_TEST(r.balance_floor_before > 1.9); // the kind's experts sit on half the GPUs
      BOOST_TEST(r.moves.empty());
    }
  }
}

// replan_live: at most the budget moved, the moves are exactly the slots that changed, every
// layer keeps its experts, and the same call gives the same maps; with a budget the window of one
// kind on maps that put its experts on half the GPUs is spread (its balance floor falls).
BOOST_AUTO_TEST_CASE(replan_live_moves_within_its_budget_and_reports_the_changed_slots) {
  std::mt19937 rng(55);
  const auto prior = two_mix_trace(rng, 40, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const auto window = two_mix_trace(rng, 12, 16, 2, [](std::size_t) { return std::uint32_t{1}; });
  const small_run setting(window);
  const auto& topo = setting.cfg.topology;
  std::vector<std::uint32_t> window_nodes(window.requests()), prior_nodes(prior.requests());
  for (std::size_t r = 0; r < window_nodes.size(); ++r)
    window_nodes[r] = static_cast<std::uint32_t>(r % 2);
  for (std::size_t r = 0; r < prior_nodes.size(); ++r)
    prior_nodes[r] = static_cast<std::uint32_t>(r % 2);
  const std::size_t slots = placement::total_slots(setting.maps);
  for (const bool with_prior : {false, true})
    for (const double share : {0.0, 0.1, 0.25, 1.0}) {
      placement::live_replan_options o;
      o.budget_share = share;
      o.expert_bytes = 7;
      const auto r = placement::replan_live(setting.maps, window, window_nodes, topo, o, with_prior ? &prior : nullptr,
                                            with_prior ? prior_nodes : std::vector<std::uint32_t>{});
      BOOST_TEST(r.budget_slots == static_cast<std::size_t>(share * static_cast<double>(slots)));
      BOOST_TEST(r.moves.size() <= r.budget_slots);
      BOOST_TEST(r.moves.size() == differing_slots(setting.maps, r.maps));
      BOOST_TEST(r.bytes_moved == 7 * r.moves.size());
      for (const auto& m : r.moves) {
        BOOST_TEST(setting.maps[m.layer].expert_at(m.rank, m.slot) == m.from);
        BOOST_TEST(r.maps[m.layer].expert_at(m.rank, m.slot) == m.to);
      }
      BOOST_TEST((contents(r.maps) == contents(setting.maps)));
      BOOST_TEST(r.prior_tokens == (with_prior ? 40u * 40u : 0u));
      const auto again =
          placement::replan_live(setting.maps, window, window_nodes, topo, o, with_prior ? &prior : nullptr,
                                 with_prior ? prior_nodes : std::vector<std::uint32_t>{});
      BOOST_TEST(differing_slots(again.maps, r.maps) == 0u);
      if (share == 0.0) BOOST_TEST(r.balance_floor_after == r.balance_floor_before);
      if (share == 1.0) BOOST_TEST(r.balance_floor_after < r.balance_floor_before - 0.3);
    }
  placement::live_replan_options bad;
  bad.budget_share = 1.5;
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, window_nodes, topo, bad), config_error);
  // budget_slots, public and read by planner callbacks, takes shares only: a NaN counted every slot
  // and a negative share wrapped to 2^64 - 2,000 slots.
  for (const double share : {std::nan(""), -1.0, 2.0, std::numeric_limits<double>::infinity()})
    BOOST_CHECK_THROW((void)placement::budget_slots(share, setting.maps), config_error);
  // A re-plan told to stop (core/cancel.hpp) raises instead of finishing its layers.
  std::atomic<bool> stop{true};
  {
    const cancel_scope scope(stop);
    placement::live_replan_options all;
    all.budget_share = 1.0;
    BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, window_nodes, topo, all), cancelled_error);
  }
  bad = {};
  bad.copies = static_cast<placement::copy_count>(9); // counted both kinds of copies without a word
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, window_nodes, topo, bad), config_error);
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, std::vector<std::uint32_t>(12, 2), topo, {}),
                    config_error);
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, std::vector<std::uint32_t>(3, 0), topo, {}),
                    config_error);
}

// The engine's replica rule decides where a replicated expert's copies go in the counts: with every
// expert on both GPUs of a 2 × 1 deployment, locality_first keeps every copy on its node (0
// inter-node copies), random sends about half across, and a map without replicas counts alike
// under every rule. A rule outside the enum is refused.
BOOST_AUTO_TEST_CASE(replan_live_counts_the_copies_under_the_engines_replica_rule) {
  std::mt19937 rng(57);
  const auto window = two_mix_trace(rng, 12, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const dynamic_topology topo(2, 1);
  std::vector<expert_id> both(2 * 16);
  for (std::size_t s = 0; s < both.size(); ++s)
    both[s] = static_cast<expert_id>(s % 16);
  const std::vector<expert_map> everywhere(2, expert_map(16, 2, 16, both));
  std::vector<expert_id> halves(2 * 8);
  std::iota(halves.begin(), halves.end(), expert_id{0});
  const std::vector<expert_map> single(2, expert_map(16, 2, 8, halves));
  std::vector<std::uint32_t> nodes(window.requests());
  for (std::size_t r = 0; r < nodes.size(); ++r)
    nodes[r] = static_cast<std::uint32_t>(r % 2);
  placement::live_replan_options o;
  o.budget_share = 0;
  const auto local = placement::replan_live(everywhere, window, nodes, topo, o);
  BOOST_TEST(local.copies_per_token_before == 0.0);
  o.replicas = placement::replica_rule::random;
  const auto spread = placement::replan_live(everywhere, window, nodes, topo, o);
  // Two layers, two choices each: four copies a token, about half of them remote.
  BOOST_TEST(spread.copies_per_token_before > 1.0);
  BOOST_TEST(spread.copies_per_token_before < 3.0);
  double first = -1;
  for (const auto rule : placement::all_replica_rules) {
    o.replicas = rule;
    const double c = placement::replan_live(single, window, nodes, topo, o).copies_per_token_before;
    if (first < 0) first = c;
    BOOST_TEST(c == first, placement::to_string(rule));
  }
  o.replicas = static_cast<placement::replica_rule>(9);
  BOOST_CHECK_THROW(placement::replan_live(single, window, nodes, topo, o), config_error);
}

// A prior with no decode token was dropped without a word (with_prior returns the window alone),
// and a moved-bytes product beyond 64 bits wrapped to a small figure: both are refused.
BOOST_AUTO_TEST_CASE(replan_live_refuses_an_empty_prior_and_moved_bytes_beyond_64_bits) {
  std::mt19937 rng(56);
  const auto prior = two_mix_trace(rng, 8, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const auto window = two_mix_trace(rng, 12, 16, 2, [](std::size_t) { return std::uint32_t{1}; });
  const small_run setting(window);
  const auto& topo = setting.cfg.topology;
  const std::vector<std::uint32_t> window_nodes(window.requests(), 0), prior_nodes(prior.requests(), 1);
  const auto all_prefill = prior.with_prefill_tokens(1u << 20);
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, window_nodes, topo, {}, &all_prefill, prior_nodes),
                    config_error);
  BOOST_TEST(placement::replan_live(setting.maps, window, window_nodes, topo, {}, &prior, prior_nodes).prior_tokens >
             0u);
  const std::size_t slots = placement::total_slots(setting.maps);
  placement::live_replan_options o;
  o.budget_share = 1.0;
  o.expert_bytes = std::numeric_limits<std::uint64_t>::max() / slots + 1;
  BOOST_CHECK_THROW(placement::replan_live(setting.maps, window, window_nodes, topo, o), config_error);
  o.expert_bytes = std::numeric_limits<std::uint64_t>::max() / slots;
  const auto r = placement::replan_live(setting.maps, window, window_nodes, topo, o);
  BOOST_TEST(r.moves.size() > 0u);
  BOOST_TEST(r.bytes_moved / o.expert_bytes == r.moves.size());
}

// keep_slots_in_place: each rank holds `after`'s experts, and as many slots keep their expert as
// the two maps' per-rank multisets share (the most any reordering within the ranks keeps); a map
// against itself is unchanged.
BOOST_AUTO_TEST_CASE(keep_slots_in_place_keeps_every_expert_a_rank_keeps) {
  std::mt19937 rng(57);
  for (int trial = 0; trial < 40; ++trial) {
    const std::size_t ranks = 2 + rng() % 4, spr = 2 + rng() % 4, experts = ranks * spr - rng() % (spr + 1);
    const std::size_t spare = ranks * spr - experts;
    const auto before = random_map(rng, experts, ranks, spr, rng() % (spare + 1)),
               after = random_map(rng, experts, ranks, spr, rng() % (spare + 1));
    const auto kept = placement::keep_slots_in_place(before, after);
    std::size_t same = 0, shared = 0;
    for (std::size_t r = 0; r < ranks; ++r) {
      std::multiset<expert_id> a, k, b;
      for (std::size_t s = 0; s < spr; ++s) {
        a.insert(after.expert_at(r, s));
        k.insert(kept.expert_at(r, s));
        b.insert(before.expert_at(r, s));
        same += kept.expert_at(r, s) == before.expert_at(r, s);
      }
      BOOST_TEST((a == k));
      std::vector<expert_id> common;
      std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
      shared += common.size();
    }
    BOOST_TEST(same == shared);
    BOOST_TEST(placement::keep_slots_in_place(before, before).slot_table() == before.slot_table());
  }
  BOOST_CHECK_THROW(placement::keep_slots_in_place(random_map(rng, 8, 2, 4, 0), random_map(rng, 8, 4, 2, 0)),
                    config_error);
}

// A replay reads the trace at the schedule's tokens and the profiles at nodes × experts counts per
// layer: a schedule recorded on another trace, a malformed one, a reference profile whose layers
// are short or a zero stride read outside the arrays or never ended. Each is refused up front.
BOOST_AUTO_TEST_CASE(replay_inputs_that_do_not_fit_the_trace_are_refused) {
  std::mt19937 rng(4);
  const auto t = two_mix_trace(rng, 16, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  const auto longer = two_mix_trace(rng, 64, 16, 2, [](std::size_t r) { return static_cast<std::uint32_t>(r % 2); });
  small_run run(t);
  grouper::round_robin g;
  const auto s = cost::record_schedule(t, run.maps, g, run.cfg);
  const auto keep = [](const std::vector<expert_map>& current, std::size_t, std::size_t) { return current; };
  cost::online_options opt;
  opt.window = 4;
  opt.balance_floor = true;
  BOOST_CHECK_NO_THROW(cost::run_online(t, s, run.maps, run.cfg, opt, keep));

  grouper::round_robin g2;
  const auto foreign = cost::record_schedule(longer, run.maps, g2, run.cfg);
  BOOST_CHECK_THROW(cost::run_online(t, foreign, run.maps, run.cfg, opt, keep), config_error);
  BOOST_CHECK_THROW(cost::window_sample(t, foreign, 0, foreign.steps(), run.cfg.topology, 0), config_error);
  BOOST_CHECK_THROW(cost::load_profile::of(t, foreign, 0, foreign.steps(), run.cfg.topology), config_error);
  auto broken = s;
  broken.step_begin.back() += 5; // past the tokens
  BOOST_CHECK_THROW(cost::run_online(t, broken, run.maps, run.cfg, opt, keep), config_error);
  BOOST_CHECK_THROW(cost::window_sample(t, broken, 0, broken.steps(), run.cfg.topology, 0), config_error);
  broken = s;
  broken.sources.front() = 99; // no such rank
  BOOST_CHECK_THROW(cost::run_online(t, broken, run.maps, run.cfg, opt, keep), config_error);

  auto ref = cost::load_profile::of(t, s, 0, 2, run.cfg.topology);
  BOOST_TEST(cost::divergence(ref, ref) == 0.0);
  auto short_layer = ref;
  short_layer.counts[0].resize(3);
  BOOST_CHECK_THROW(cost::divergence(ref, short_layer), config_error);
  auto nan_count = ref;
  nan_count.counts[1][0] = std::numeric_limits<double>::quiet_NaN();
  BOOST_CHECK_THROW(cost::divergence(nan_count, ref), config_error);
  opt.drift_every = 1;
  opt.reference = short_layer;
  BOOST_CHECK_THROW(cost::run_online(t, s, run.maps, run.cfg, opt, keep), config_error);
}
