#define BOOST_TEST_MODULE simulator
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <limits>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/placement/linear.hpp>
#include <random>
#include <string_view>

using namespace locus;
using namespace locus::cost;

namespace {
trace::trace random_trace(std::mt19937& rng, std::size_t requests, std::size_t experts, std::size_t k,
                          std::size_t layers, std::size_t prefill) {
  trace::trace_builder b(experts, k, layers);
  b.set_domains({"a", "b"});
  for (std::size_t r = 0; r < requests; ++r) {
    const std::size_t len = prefill + 1 + rng() % 20;
    const std::size_t q = b.add_request(r, static_cast<std::uint32_t>(r % 2), len);
    (void)q;
  }
  for (std::size_t t = 0; t < b.tokens(); ++t)
    for (std::size_t l = 0; l < layers; ++l) {
      auto ids = b.ids(l, t);
      std::vector<trace::trace_expert_id> pool(experts);
      for (std::size_t e = 0; e < experts; ++e)
        pool[e] = static_cast<trace::trace_expert_id>(e);
      for (std::size_t j = 0; j < k; ++j) {
        std::swap(pool[j], pool[j + rng() % (experts - j)]);
        ids[j] = pool[j];
        b.weights(l, t)[j] = 0.1f;
      }
    }
  return b.build().with_prefill_tokens(prefill);
}

// Decode tokens of `t` when every request's first `prefill` tokens are prefill.
std::uint64_t decode_tokens(const trace::trace& t, std::size_t prefill) {
  std::uint64_t n = 0;
  for (std::size_t r = 0; r < t.requests(); ++r)
    n += t.request(r).length - prefill;
  return n;
}
} // namespace

// With room for everyone and round-robin grouping, request r decodes on rank r mod R from step 0;
// the reference replays exactly that with the (separately tested) traffic counter.
BOOST_AUTO_TEST_CASE(batching_matches_a_direct_replay) {
  std::mt19937 rng(3);
  const auto t = random_trace(rng, 13, 16, 3, 2, 4);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  cfg.batch_per_rank = 100;
  const auto maps = placement::linear{}.plan(
      {cfg.topology, 16, 4, std::vector<std::vector<double>>(2, std::vector<double>(16, 1)), {}});
  grouper::round_robin g;
  const auto res = simulate_decode(t, maps, g, cfg);

  std::vector<layer_traffic> expected(2, layer_traffic(4));
  traffic_counter<dynamic_topology> counter(cfg.topology, cfg.transport);
  std::uint64_t tokens_total = 0;
  double busiest = 0, rows = 0, step_sum = 0;        // per-step balance, from each step's own count
  std::vector<std::vector<std::uint64_t>> step_rows; // per step: layer-major rows per rank
  std::size_t max_decode = 0;
  for (std::size_t r = 0; r < t.requests(); ++r)
    max_decode = std::max<std::size_t>(max_decode, t.request(r).length - 4);
  for (std::size_t s = 0; s < max_decode; ++s) {
    std::vector<std::size_t> tokens;
    std::vector<std::uint32_t> src;
    for (std::size_t r = 0; r < t.requests(); ++r)
      if (t.request(r).length - 4 > s) {
        tokens.push_back(t.request(r).first_token + 4 + s);
        src.push_back(static_cast<std::uint32_t>(r % 4));
      }
    tokens_total += tokens.size();
    double step = 0;
    step_rows.emplace_back();
    for (std::size_t l = 0; l < 2; ++l) {
      counter.count_step(maps[l], t.layer(l), tokens, src, expected[l]);
      layer_traffic alone(4);
      counter.count_step(maps[l], t.layer(l), tokens, src, alone);
      step_rows.back().insert(step_rows.back().end(), alone.expert_rows.begin(), alone.expert_rows.end());
      const auto most = *std::max_element(alone.expert_rows.begin(), alone.expert_rows.end());
      busiest += static_cast<double>(most);
      rows += static_cast<double>(tokens.size() * 3);
      step += static_cast<double>(most) * 4 / static_cast<double>(tokens.size() * 3);
    }
    step_sum += step / 2;
  }
  BOOST_TEST(res.gpu_imbalance_step_weighted == busiest * 4 / rows, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(res.gpu_imbalance_step_mean == step_sum / static_cast<double>(max_decode),
             boost::test_tools::tolerance(1e-12));
  // Windows of 3 steps: each layer's rows per rank summed over the window, its busiest rank summed.
  double window_busiest = 0;
  for (std::size_t s0 = 0; s0 < step_rows.size(); s0 += 3)
    for (std::size_t l = 0; l < 2; ++l) {
      std::uint64_t most = 0;
      for (std::size_t r = 0; r < 4; ++r) {
        std::uint64_t sum = 0;
        for (std::size_t s = s0; s < std::min(step_rows.size(), s0 + 3); ++s)
          sum += step_rows[s][l * 4 + r];
        most = std::max(most, sum);
      }
      window_busiest += static_cast<double>(most);
    }
  auto windowed = cfg;
  windowed.balance_window = 3;
  grouper::round_robin g3;
  BOOST_TEST(simulate_decode(t, maps, g3, windowed).gpu_imbalance_window == window_busiest * 4 / rows,
             boost::test_tools::tolerance(1e-12));
  BOOST_TEST(res.steps == max_decode);
  BOOST_TEST(res.decode_tokens == tokens_total);
  BOOST_TEST(res.requests_served == t.requests());
  for (std::size_t l = 0; l < 2; ++l) {
    BOOST_TEST(res.layers[l].copies == expected[l].copies);
    BOOST_TEST(res.layers[l].expert_rows == expected[l].expert_rows);
  }
  const double bytes = static_cast<double>((expected[0].copies[2] + expected[1].copies[2]) *
                                           (cfg.sizes.dispatch_bytes + cfg.sizes.combine_bytes));
  BOOST_TEST(res.inter_node_bytes_per_token == bytes / static_cast<double>(tokens_total),
             boost::test_tools::tolerance(1e-12));
  // Attention work: request r sits on rank r mod 4 from step 0 and, at its decode step s, its
  // rank holds its prefill and the s tokens decoded before.
  std::vector<double> attention(4, 0.0);
  for (std::size_t r = 0; r < t.requests(); ++r)
    for (std::size_t s = 0; s < t.request(r).length - 4; ++s)
      attention[r % 4] += static_cast<double>(4 + s);
  BOOST_TEST(res.rank_attention_tokens == attention, boost::test_tools::per_element());
  double sum = 0;
  for (double a : attention)
    sum += a;
  BOOST_TEST(res.attention_imbalance == *std::max_element(attention.begin(), attention.end()) * 4 / sum,
             boost::test_tools::tolerance(1e-12));
  const auto self = normalize_all2all(res, res);
  BOOST_TEST(self.median == 1.0);
  BOOST_TEST(self.p90 == 1.0);
}

// Under every replica rule the simulator equals a direct replay that chooses replicas with the rule
// seeded by the layer index and, for locality_bounded, the ranks hot after the steps before (its
// own load counts); and locality_bounded balances the skewed load better than locality_first.
// Three balances that differ on one small run (1 layer, top-1, expert e on GPU e of 2; every
// request running from step 0): r0 decodes experts 0 1 0 0, r1 0 1, r2 1 1. Steps: [2 1], [0 3],
// [1 0], [1 0] rows on the GPUs. Over the run 4 and 4: 1.0. Per step, by rows: busiest 2 + 3 + 1 +
// 1 of 8 rows over 2 GPUs: 1.75 (the expert time of a run that waits for each step's busiest GPU,
// over a balanced run's). The plain mean over steps: (4/3 + 2 + 2 + 2) / 4, the two one-token steps
// of the drain weighing as much as the full ones.
BOOST_AUTO_TEST_CASE(balance_over_the_run_per_step_by_rows_and_per_step_plainly) {
  trace::trace_builder b(2, 1, 1);
  b.set_domains({"a"});
  const std::vector<std::vector<trace::trace_expert_id>> decode{{0, 1, 0, 0}, {0, 1}, {1, 1}};
  for (std::size_t r = 0; r < decode.size(); ++r)
    b.add_request(r, 0, 1 + decode[r].size()); // one prefill token, then the decode tokens
  for (std::size_t r = 0, t = 0; r < decode.size(); ++r) {
    b.ids(0, t)[0] = 0; // prefill: not simulated
    b.weights(0, t++)[0] = 1;
    for (const auto e : decode[r]) {
      b.ids(0, t)[0] = e;
      b.weights(0, t++)[0] = 1;
    }
  }
  const auto t = b.build().with_prefill_tokens(1);
  simulation_config cfg;
  cfg.topology = dynamic_topology(1, 2);
  cfg.batch_per_rank = 8;
  const auto maps = placement::linear{}.plan({cfg.topology, 2, 1, {std::vector<double>(2, 1)}, {}});
  grouper::round_robin g;
  const auto res = simulate_decode(t, maps, g, cfg);
  BOOST_TEST(res.steps == 4u);
  BOOST_TEST(res.gpu_imbalance_aggregate == 1.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(res.gpu_imbalance_step_weighted == 1.75, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(res.gpu_imbalance_step_mean == (4.0 / 3 + 6) / 4, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(res.balance_window == 0u); // not measured unless asked for
  BOOST_TEST(res.gpu_imbalance_window == 1.0);
  // Loads summed over windows of steps: 1 step is the per-step figure, the run's 4 the run's; 2
  // steps: [2 4] and [2 0], busiest 4 + 2 of 8; 3 steps: [3 4] and the shorter last window [1 0].
  for (const auto& [window, expected] : {std::pair{1, 1.75}, {2, 1.5}, {3, 1.25}, {4, 1.0}, {9, 1.0}}) {
    cfg.balance_window = static_cast<std::size_t>(window);
    const auto w = simulate_decode(t, maps, g, cfg);
    BOOST_TEST(w.balance_window == cfg.balance_window);
    BOOST_TEST(w.gpu_imbalance_window == expected, boost::test_tools::tolerance(1e-12));
    BOOST_TEST(w.gpu_imbalance_step_weighted == 1.75, boost::test_tools::tolerance(1e-12)); // unchanged
  }
}

BOOST_AUTO_TEST_CASE(replica_rules_match_a_direct_replay) {
  std::mt19937 rng(9);
  const auto t = random_trace(rng, 24, 8, 2, 2, 3);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  cfg.batch_per_rank = 100;
  // Experts 0..7 two per rank; rank r also holds replicas of experts 2r and 2r + 5 (mod 8).
  std::vector<expert_id> table(4 * 4, empty_slot);
  for (std::size_t r = 0; r < 4; ++r) {
    table[r * 4] = static_cast<expert_id>(2 * r);
    table[r * 4 + 1] = static_cast<expert_id>(2 * r + 1);
    table[r * 4 + 2] = static_cast<expert_id>((2 * r + 2) % 8);
    table[r * 4 + 3] = static_cast<expert_id>((2 * r + 5) % 8);
  }
  const std::vector<expert_map> maps(2, expert_map(8, 4, 4, table));
  std::size_t max_decode = 0;
  for (std::size_t r = 0; r < t.requests(); ++r)
    max_decode = std::max<std::size_t>(max_decode, t.request(r).length - 3);
  double first_balance = 0, bounded_balance = 0;
  for (const auto rule : placement::all_replica_rules) {
    cfg.replica_rule = rule;
    cfg.replica_slack = 0.02;
    grouper::round_robin g;
    const auto res = simulate_decode(t, maps, g, cfg);
    std::vector<layer_traffic> expected(2, layer_traffic(4));
    std::vector<placement::hot_rank_tracker> hot(2, placement::hot_rank_tracker(4, 0.02));
    traffic_counter<dynamic_topology> counter(cfg.topology, cfg.transport);
    for (std::size_t s = 0; s < max_decode; ++s) {
      std::vector<std::size_t> tokens;
      std::vector<std::uint32_t> src;
      for (std::size_t r = 0; r < t.requests(); ++r)
        if (t.request(r).length - 3 > s) {
          tokens.push_back(t.request(r).first_token + 3 + s);
          src.push_back(static_cast<std::uint32_t>(r % 4));
        }
      for (std::size_t l = 0; l < 2; ++l) {
        layer_traffic step(4);
        const bool bounded = rule == placement::replica_rule::locality_bounded;
        counter.count_step(maps[l], t.layer(l), tokens, src, step,
                           {rule, l, bounded ? hot[l].hot() : std::span<const std::uint8_t>{}});
        hot[l].observe(std::span<const std::uint64_t>(step.expert_rows));
        expected[l] += step;
      }
    }
    for (std::size_t l = 0; l < 2; ++l) {
      BOOST_TEST(res.layers[l].copies == expected[l].copies);
      BOOST_TEST(res.layers[l].expert_rows == expected[l].expert_rows, boost::test_tools::per_element());
    }
    BOOST_TEST_MESSAGE(placement::to_string(rule) << ": GPU max/mean " << res.gpu_imbalance_aggregate);
    if (rule == placement::replica_rule::locality_first) first_balance = res.gpu_imbalance_aggregate;
    if (rule == placement::replica_rule::locality_bounded) bounded_balance = res.gpu_imbalance_aggregate;
  }
  BOOST_TEST(bounded_balance < first_balance);
}

BOOST_AUTO_TEST_CASE(capacity_is_respected_and_nothing_is_lost) {
  std::mt19937 rng(8);
  const auto t = random_trace(rng, 40, 8, 2, 1, 2);
  const std::uint64_t decode = decode_tokens(t, 2);
  for (std::size_t batch : {1u, 3u}) {
    simulation_config cfg;
    cfg.topology = dynamic_topology(2, 2);
    cfg.batch_per_rank = batch;
    cfg.arrival_rate = 0.7;
    cfg.seed = 11;
    const auto maps = placement::linear{}.plan({cfg.topology, 8, 2, {std::vector<double>(8, 1)}, {}});
    grouper::least_loaded g;
    const auto a = simulate_decode(t, maps, g, cfg);
    const auto b = simulate_decode(t, maps, g, cfg);
    BOOST_TEST(a.decode_tokens == decode);
    BOOST_TEST(a.requests_served == t.requests());
    for (std::uint64_t s : a.step_tokens)
      BOOST_TEST(s <= 4 * batch);
    BOOST_TEST(a.step_inter_node_bytes == b.step_inter_node_bytes); // same seed, same run
  }
  // A link model with no bandwidth is refused before the run (it reported every step as inf µs).
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  cfg.links.network_gbps = 0;
  const auto maps = placement::linear{}.plan({cfg.topology, 8, 2, {std::vector<double>(8, 1)}, {}});
  grouper::least_loaded g;
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), config_error);
}

// Arrival gaps with nothing running are skipped, not simulated step by step: a very low arrival
// rate (here one request per 10^9 steps) costs neither time nor memory, and every request still
// runs (alone: each finishes long before the next arrives).
BOOST_AUTO_TEST_CASE(arrival_gaps_are_skipped) {
  std::mt19937 rng(3);
  const auto t = random_trace(rng, 6, 8, 2, 1, 2);
  const std::uint64_t decode = decode_tokens(t, 2);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  cfg.arrival_rate = 1e-9;
  const auto maps = placement::linear{}.plan({cfg.topology, 8, 2, {std::vector<double>(8, 1)}, {}});
  grouper::least_loaded g;
  const auto sparse = simulate_decode(t, maps, g, cfg);
  BOOST_TEST(sparse.decode_tokens == decode);
  BOOST_TEST(sparse.steps == decode); // one request at a time: one token per busy step
  BOOST_TEST(sparse.step_tokens.size() == sparse.steps);
  BOOST_TEST(sparse.idle_steps > 1000000000u); // the first arrival alone is ~10^9 steps away
  for (const auto n : sparse.step_tokens)
    BOOST_TEST(n == 1u);
  BOOST_TEST(sparse.step_number.size() == sparse.steps);
  BOOST_TEST(sparse.step_number.back() > sparse.idle_steps); // numbers keep the skipped gaps
  // Runs are compared step by step by step number: a run that skipped steps 2-4 pairs its step 5
  // with the baseline's step 5, not its 3rd.
  simulation_result a, b;
  a.steps = 3;
  a.step_number = {0, 1, 5};
  a.step_tokens = {1, 1, 1};
  a.step_inter_node_bytes = {2, 2, 8};
  b.steps = 6;
  b.step_number = {0, 1, 2, 3, 4, 5};
  b.step_tokens = {1, 1, 1, 1, 1, 1};
  b.step_inter_node_bytes = {2, 2, 100, 100, 100, 4};
  const auto n = normalize_all2all(a, b);
  BOOST_TEST(n.median == 1.0);
  BOOST_TEST(n.p90 == 1.8, boost::test_tools::tolerance(1e-12)); // ratios 1, 1, 2
  // A rate that would put an arrival beyond 10^18 steps is refused, not cast out of range.
  cfg.arrival_rate = 1e-300;
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), config_error);
}

// A grouper that makes a request wait while nothing runs would wait for ever: nothing can free a
// slot. The run refuses it (it looped without end, or spent max_steps on empty steps).
BOOST_AUTO_TEST_CASE(a_grouper_that_never_places_is_refused) {
  struct never_places {
    using policy_concept = grouper_tag;
    std::size_t assign(const grouper::arrival&, const grouper::cluster_state&) const { return grouper::no_rank; }
  };
  std::mt19937 rng(5);
  const auto t = random_trace(rng, 4, 8, 2, 1, 2);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  const auto maps = placement::linear{}.plan({cfg.topology, 8, 2, {std::vector<double>(8, 1)}, {}});
  never_places g;
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), invalid_input_error);
  cfg.max_steps = 100;
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), invalid_input_error);
}

// An enum cast from a number (a config file, a binding) ran as some default rule or transport.
BOOST_AUTO_TEST_CASE(enum_values_outside_their_range_and_traces_without_decode_are_refused) {
  std::mt19937 rng(6);
  const auto t = random_trace(rng, 4, 8, 2, 1, 2);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 2);
  const auto maps = placement::linear{}.plan({cfg.topology, 8, 2, {std::vector<double>(8, 1)}, {}});
  grouper::least_loaded g;
  BOOST_CHECK_NO_THROW(simulate_decode(t, maps, g, cfg));
  cfg.replica_rule = static_cast<placement::replica_rule>(77);
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), config_error);
  cfg.replica_rule = placement::replica_rule::locality_first;
  cfg.transport = static_cast<transport_kind>(9);
  BOOST_CHECK_THROW(simulate_decode(t, maps, g, cfg), config_error);
  // A trace whose every token is prefill returned an all-zero result (no steps, no bytes), which a
  // caller read as a free deployment.
  cfg.transport = transport_kind::flat;
  BOOST_CHECK_EXCEPTION(simulate_decode(t.with_prefill_tokens(1000), maps, g, cfg), config_error,
                        [](const config_error& e) {
                          return std::string_view(e.what()).find("no decode tokens") != std::string_view::npos;
                        });
}

// A request whose tokens marked decode are split by others (a later turn's prompt: prefill,
// decode, prefill, decode) decodes only its decode tokens, in position order; the tokens between
// join its context. The simulator decoded every token from the first decode one on (the second
// prompt's tokens counted as decode steps). Reference: the same requests with the tokens between
// cut out send the same copies, and the attention adds the cut tokens to the context after them.
BOOST_AUTO_TEST_CASE(tokens_between_decode_tokens_join_the_context_not_the_steps) {
  std::mt19937 rng(12);
  const std::size_t experts = 8, k = 2, layers = 2;
  // Request r: phases P^a D^b P^c D^d (c > 0 makes a gap), routes random.
  struct shape {
    std::size_t a, b, c, d;
  };
  const std::vector<shape> shapes{{3, 2, 2, 3}, {1, 4, 1, 1}, {2, 1, 3, 2}};
  const auto build = [&](bool with_gap) {
    std::mt19937 routes(5);
    trace::trace_builder b(experts, k, layers);
    b.set_domains({"a"});
    for (std::size_t r = 0; r < shapes.size(); ++r) {
      const auto& sh = shapes[r];
      const std::size_t len = sh.a + sh.b + (with_gap ? sh.c : 0) + sh.d;
      const std::size_t first = b.tokens();
      b.add_request(r, 0, len);
      std::size_t pos = 0;
      const auto put = [&](std::size_t n, trace::phase ph) {
        for (std::size_t i = 0; i < n; ++i)
          b.set_token(first + pos++, ph, -1);
      };
      put(sh.a, trace::phase::prefill);
      put(sh.b, trace::phase::decode);
      if (with_gap) put(sh.c, trace::phase::prefill);
      put(sh.d, trace::phase::decode);
    }
    // The same routes for the same decode token in both traces: drawn per request and position
    // with the gap's draws made (and dropped) either way.
    std::size_t token = 0;
    for (const auto& sh : shapes)
      for (std::size_t i = 0; i < sh.a + sh.b + sh.c + sh.d; ++i) {
        const bool in_gap = i >= sh.a + sh.b && i < sh.a + sh.b + sh.c;
        for (std::size_t l = 0; l < layers; ++l) {
          const auto e0 = static_cast<trace::trace_expert_id>(routes() % experts);
          const auto e1 = static_cast<trace::trace_expert_id>((e0 + 1 + routes() % (experts - 1)) % experts);
          if (in_gap && !with_gap) continue;
          b.ids(l, token)[0] = e0;
          b.ids(l, token)[1] = e1;
          b.weights(l, token)[0] = b.weights(l, token)[1] = 0.5f;
        }
        if (!in_gap || with_gap) ++token;
      }
    return b.build();
  };
  const auto gapped = build(true), cut = build(false);
  simulation_config cfg;
  cfg.topology = dynamic_topology(2, 1);
  cfg.batch_per_rank = 8;
  const auto maps = placement::linear{}.plan(
      {cfg.topology, experts, 4, std::vector<std::vector<double>>(layers, std::vector<double>(experts, 1)), {}});
  grouper::round_robin g1, g2;
  const auto a = simulate_decode(gapped, maps, g1, cfg);
  const auto b = simulate_decode(cut, maps, g2, cfg);
  std::size_t decode = 0, longest = 0;
  for (const auto& sh : shapes) {
    decode += sh.b + sh.d;
    longest = std::max(longest, sh.b + sh.d);
  }
  BOOST_TEST(a.decode_tokens == decode);
  BOOST_TEST(a.steps == longest);
  for (std::size_t l = 0; l < layers; ++l)
    BOOST_TEST(a.layers[l].copies == b.layers[l].copies);
  BOOST_TEST(a.step_inter_node_bytes == b.step_inter_node_bytes, boost::test_tools::per_element());
  // Request r on rank r mod 2 from step 0: at its decode step s it attends over a + s tokens, plus
  // c once past the gap.
  std::vector<double> attention(2, 0.0);
  for (std::size_t r = 0; r < shapes.size(); ++r)
    for (std::size_t s = 0; s < shapes[r].b + shapes[r].d; ++s)
      attention[r % 2] += static_cast<double>(shapes[r].a + s + (s >= shapes[r].b ? shapes[r].c : 0));
  BOOST_TEST(a.rank_attention_tokens == attention, boost::test_tools::per_element());
}

// quantile() interpolates inside the vector: a q outside [0, 1] (or NaN) read outside it.
BOOST_AUTO_TEST_CASE(quantile_refuses_q_outside_the_unit_interval) {
  BOOST_TEST(quantile({1, 2, 3}, 0.5) == 2.0);
  BOOST_TEST(quantile({1, 2, 3}, 1.0) == 3.0);
  BOOST_TEST(quantile({}, 0.5) == 0.0);
  for (const double q : {-0.1, 1.5, 2.0, std::numeric_limits<double>::quiet_NaN()})
    BOOST_CHECK_THROW(quantile({1, 2, 3}, q), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(groupers_choose_as_documented) {
  std::vector<grouper::rank_state> st = {{2, 50}, {1, 10}, {0, 0}, {2, 5}};
  const grouper::cluster_state c{dynamic_topology(2, 2), st, 2};
  grouper::least_loaded ll;
  BOOST_TEST(ll.assign({}, c) == 2u);
  st[2] = {2, 0};
  BOOST_TEST(ll.assign({}, c) == 1u); // ranks 0, 2, 3 are full
  grouper::round_robin rr;
  BOOST_TEST(rr.assign({}, c) == 1u);
  st[1] = {2, 0};
  BOOST_TEST(rr.assign({}, c) == grouper::no_rank);
  simulation_config cfg;
  std::mt19937 rng(1);
  const auto t = random_trace(rng, 2, 8, 2, 1, 1);
  const auto maps = placement::linear{}.plan({dynamic_topology(1, 2), 8, 4, {std::vector<double>(8, 1)}, {}});
  BOOST_CHECK_THROW(simulate_decode(t, maps, rr, cfg), config_error); // 2-rank maps, 1-rank topology
}
