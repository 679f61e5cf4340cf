#define BOOST_TEST_MODULE floor_hedge
#include "../support/random_map.hpp"
#include "../support/token_sample_builder.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <locus/core/routing.hpp>
#include <locus/placement/split_floor.hpp>
#include <locus/placement/token_refine.hpp>
#include <numeric>
#include <random>
#include <vector>

// Floor-targeted hedge copies (token_refine_options::hedge_floor): the planner lever for maps whose
// balance floor (split_floor.hpp) on resampled training traffic is above the target.

using namespace locus;

namespace {

// Rows of each expert in a sample's layer.
std::vector<double> expert_rows(const placement::token_sample& s, std::size_t layer) {
  std::vector<double> rows(s.experts, 0.0);
  for (const auto e : s.ids[layer])
    rows[e] += 1;
  return rows;
}

// Four nodes of one GPU, three slots each (one empty). GPU 0 hosts experts 0 and 1, GPU r the
// experts 2r and 2r+1. Expert 0's 200 tokens come from two long requests, every other expert's
// from many short ones, and each GPU serves 300 rows: the sample's own floor is 1.0, but a
// resample of the requests that draws one of expert 0's requests twice puts GPU 0 far above the
// mean, and only a copy of expert 0 off GPU 0 lets a split move that load. Every token is local,
// so no copy saves anything and the copy-saving fill adds none.
struct single_copy_binds {
  dynamic_topology topo{4, 1};
  std::vector<expert_map> maps{
      expert_map(8, 4, 3, {0, 1, empty_slot, 2, 3, empty_slot, 4, 5, empty_slot, 6, 7, empty_slot})};
  placement::token_sample s = [] {
    locus_test::token_sample_builder b(8);
    b.add(0, 0, 120);
    b.add(0, 0, 80);
    for (int i = 0; i < 50; ++i)
      b.add(0, 1, 2);
    for (std::uint16_t r = 1; r < 4; ++r)
      for (int i = 0; i < 75; ++i) {
        b.add(r, static_cast<std::uint16_t>(2 * r), 2);
        b.add(r, static_cast<std::uint16_t>(2 * r + 1), 2);
      }
    return b.s;
  }();
};

} // namespace

BOOST_AUTO_TEST_CASE(a_binding_single_copy_expert_gets_a_copy_and_the_floor_drops) {
  const single_copy_binds c;
  placement::token_refine_options opt;
  opt.hedge_replicas = 0;
  BOOST_TEST((placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt)[0] == c.maps[0]));
  opt.hedge_replicas = 3;
  opt.hedge_floor = 1.10;
  std::size_t reported = 0;
  const auto hedged = placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt, &reported);
  BOOST_TEST(hedged[0].replica_count(0) >= 2u); // the first hedge copy is of expert 0
  std::size_t added = 0;
  for (std::size_t e = 0; e < 8; ++e)
    added += hedged[0].replica_count(e) - 1;
  BOOST_TEST(added >= 1u);
  BOOST_TEST(added <= opt.hedge_replicas);
  BOOST_TEST(reported == added); // every copy here is a hedge: the fill saves nothing
  // A shifted test mix: expert 0's requests twice as common. Its floor drops from GPU 0 carrying
  // 500 of 1,400 rows (1.43) to within the target.
  auto rows = expert_rows(c.s, 0);
  rows[0] *= 2;
  const double before = placement::min_max_split(c.maps[0], rows).max_over_mean;
  const double after = placement::min_max_split(hedged[0], rows).max_over_mean;
  BOOST_TEST(before == 500.0 / 350.0, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(after <= 1.10);
  // Same inputs, same map.
  BOOST_TEST((placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt)[0] == hedged[0]));
  // The budget binds: one copy at most.
  opt.hedge_replicas = 1;
  const auto one = placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt);
  std::size_t one_added = 0;
  for (std::size_t e = 0; e < 8; ++e)
    one_added += one[0].replica_count(e) - 1;
  BOOST_TEST(one_added == 1u);
  BOOST_TEST(one[0].replica_count(0) == 2u);
  // The draws the hedge held the map to: one floor per draw, above the target on the plain map;
  // the hedge's copies lower the worst and raise none (a copy only adds choices).
  const auto plain_draws = placement::hedge_draw_floors(c.maps[0], c.s, 0, c.topo, opt);
  BOOST_TEST(plain_draws.size() == opt.hedge_resamples);
  BOOST_TEST(*std::max_element(plain_draws.begin(), plain_draws.end()) > opt.hedge_floor);
  const auto hedged_draws = placement::hedge_draw_floors(hedged[0], c.s, 0, c.topo, opt);
  BOOST_TEST(*std::max_element(hedged_draws.begin(), hedged_draws.end()) <
             *std::max_element(plain_draws.begin(), plain_draws.end()) - 0.05);
  for (std::size_t b = 0; b < plain_draws.size(); ++b)
    BOOST_TEST(hedged_draws[b] <= plain_draws[b] + 1e-9);
  BOOST_CHECK_THROW(placement::hedge_draw_floors(c.maps[0], c.s, 1, c.topo, opt), config_error);
  // A target every draw already meets adds nothing; a target below 1 is refused.
  opt.hedge_floor = 50;
  BOOST_TEST((placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt)[0] == c.maps[0]));
  opt.hedge_floor = 0.5;
  BOOST_CHECK_THROW(placement::add_replicas_by_tokens(c.maps, c.s, c.topo, opt), config_error);
}

// hedge_class_spread: the draws shift the mix of request classes, which resampling many short
// requests barely does. GPU 0 hosts experts 0 and 1, GPU r the experts 2r and 2r+1, every expert
// 300 one-token requests, all local. Class 0 is expert 0's requests: resampled, GPU 0 stays near
// the mean and nothing is hedged under a 1.15 target; with the class's share drawn to move, a draw
// makes GPU 0 the binding set and expert 0 gets copies. A test mix with class 0 twice as common
// then has a lower floor.
BOOST_AUTO_TEST_CASE(a_class_spread_hedges_a_class_whose_share_moves) {
  const dynamic_topology topo(4, 1);
  const std::vector<expert_map> maps{
      expert_map(8, 4, 3, {0, 1, empty_slot, 2, 3, empty_slot, 4, 5, empty_slot, 6, 7, empty_slot})};
  locus_test::token_sample_builder b(8);
  for (std::uint16_t e = 0; e < 8; ++e)
    for (int i = 0; i < 300; ++i)
      b.add(e / 2u, e, 1);
  placement::token_sample s = b.s;
  for (const auto e : s.ids[0])
    s.request_class.push_back(e == 0 ? 0 : 1);
  placement::token_refine_options opt;
  opt.hedge_replicas = 3;
  opt.hedge_floor = 1.15;
  opt.hedge_cost_budget = 0;
  const auto plain = placement::add_replicas_by_tokens(maps, s, topo, opt);
  BOOST_TEST((plain[0] == maps[0])); // resamples alone: no draw above 1.15
  opt.hedge_class_spread = 1.0;
  std::size_t hedged = 0;
  const auto spread = placement::add_replicas_by_tokens(maps, s, topo, opt, &hedged);
  BOOST_TEST(spread[0].replica_count(0) >= 2u);
  BOOST_TEST(hedged >= 1u);
  BOOST_TEST(hedged <= opt.hedge_replicas);
  auto rows = expert_rows(s, 0);
  rows[0] *= 2;
  const double before = placement::min_max_split(maps[0], rows).max_over_mean;
  BOOST_TEST(before == 900.0 / 675.0, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(placement::min_max_split(spread[0], rows).max_over_mean < before - 0.1);
  // Same inputs, same map; without classes in the sample a spread is refused, as is one out of range.
  BOOST_TEST((placement::add_replicas_by_tokens(maps, s, topo, opt)[0] == spread[0]));
  placement::token_sample unlabelled = s;
  unlabelled.request_class.clear();
  BOOST_CHECK_THROW(placement::add_replicas_by_tokens(maps, unlabelled, topo, opt), config_error);
  opt.hedge_class_spread = placement::token_refine_options::max_hedge_class_spread + 1;
  BOOST_CHECK_THROW(placement::add_replicas_by_tokens(maps, s, topo, opt), config_error);
  // Without a spread the classes are not read.
  opt.hedge_class_spread = 0;
  BOOST_TEST((placement::add_replicas_by_tokens(maps, unlabelled, topo, opt)[0] == plain[0]));
  // A class per token or none.
  s.request_class.pop_back();
  BOOST_CHECK_THROW(placement::add_replicas_by_tokens(maps, s, topo, opt), invalid_input_error);
}

// Random maps and samples: never more hedge copies than the budget, each in an empty slot with the
// existing copies kept, the sample's copy cost within the byte bound when one is set, the sample's floor never higher
// than before (a copy only adds choices), and the same map from the same inputs.
BOOST_AUTO_TEST_CASE(floor_hedges_keep_their_budget_and_are_deterministic) {
  std::mt19937 rng(7);
  std::size_t hedged_some = 0, over = 0, cut = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const std::size_t nodes = 2 + rng() % 3, gpus = 1 + rng() % 2, ranks = nodes * gpus;
    const std::size_t spare = 1 + rng() % 2, spr = 2 + spare, experts = ranks * (spr - spare);
    const dynamic_topology topo(nodes, gpus);
    placement::token_sample s;
    s.experts = experts;
    s.top_k = 1;
    s.ids.resize(1);
    std::uint32_t request = 0;
    const std::size_t tokens = 100 + rng() % 200;
    for (std::size_t t = 0; t < tokens;) { // requests of 1 to 40 tokens, each on one expert
      const auto e = static_cast<std::uint16_t>(rng() % (rng() % 3 ? experts : 2)); // experts 0, 1 hot
      const auto home = static_cast<std::uint32_t>(rng() % nodes);
      for (std::size_t n = 1 + rng() % 40; n > 0; --n, ++t) {
        s.home.push_back(home);
        s.request.push_back(request);
        s.ids[0].push_back(e);
      }
      ++request;
    }
    const std::vector<expert_map> maps{locus_test::shuffled_round_robin_map(rng, experts, ranks, spr)};
    placement::token_refine_options opt;
    opt.hedge_cost_budget = 0; // unbounded here; the bound's cases below
    opt.balance_slack = 0.1 * static_cast<double>(trial % 4);
    opt.hedge_replicas = rng() % 5;
    opt.hedge_floor = 1.0 + 0.05 * static_cast<double>(trial % 4);
    opt.hedge_resamples = 8 + rng() % 24;
    opt.hedge_seed = static_cast<std::uint64_t>(trial);
    placement::detail::token_refine::replica_state<dynamic_topology> state(maps[0], s.ids[0], s.home, s.top_k, topo,
                                                                           opt, 0, {}, s.request);
    const std::size_t hedges = state.hedge();
    const expert_map after = state.to_map();
    std::size_t copies = 0;
    for (std::size_t e = 0; e < experts; ++e)
      copies += after.replica_count(e) - 1;
    BOOST_TEST(copies == hedges);
    BOOST_TEST(hedges <= opt.hedge_replicas);
    hedged_some += hedges > 0;
    // Fewer hedge copies are a prefix of these: what the byte bound's cut-back replays.
    if (hedges > 0) {
      placement::token_refine_options fewer = opt;
      fewer.hedge_replicas = hedges - 1;
      placement::detail::token_refine::replica_state<dynamic_topology> less(maps[0], s.ids[0], s.home, s.top_k, topo,
                                                                            fewer, 0, {}, s.request);
      BOOST_TEST(less.hedge() == hedges - 1);
      const auto& all = state.hedge_copies();
      BOOST_TEST((less.hedge_copies() == std::vector(all.begin(), all.end() - 1)));
    }
    for (std::size_t r = 0; r < ranks; ++r)
      for (std::size_t sl = 0; sl < spr; ++sl)
        if (maps[0].expert_at(r, sl) != empty_slot) BOOST_TEST(after.expert_at(r, sl) == maps[0].expert_at(r, sl));
    const auto rows = expert_rows(s, 0);
    BOOST_TEST(placement::min_max_split(after, rows).max_over_mean <=
               placement::min_max_split(maps[0], rows).max_over_mean + 1e-9);
    const auto out = placement::add_replicas_by_tokens(maps, s, topo, opt);
    BOOST_TEST((out[0] == placement::add_replicas_by_tokens(maps, s, topo, opt)[0]));
    // The byte bound: the sample's copy cost at most (1 + budget) × the plain fill's.
    const auto cost_of = [&](const expert_map& m) {
      return placement::detail::token_refine::replica_state<dynamic_topology>(m, s.ids[0], s.home, s.top_k, topo, opt,
                                                                              0, {}, s.request)
          .cost();
    };
    placement::token_refine_options plain = opt, bounded = opt;
    plain.hedge_replicas = 0;
    bounded.hedge_cost_budget = 0.01 * static_cast<double>(trial % 3);
    const double plain_cost = cost_of(placement::add_replicas_by_tokens(maps, s, topo, plain)[0]);
    std::size_t kept = 0;
    const auto within = placement::add_replicas_by_tokens(maps, s, topo, bounded, &kept);
    BOOST_TEST(kept <= hedges); // the byte bound only cuts hedges back
    BOOST_TEST(kept <= within[0].replica_slots_used());
    if (bounded.hedge_cost_budget > 0) {
      BOOST_TEST(cost_of(within[0]) <= plain_cost * (1 + bounded.hedge_cost_budget) + 1e-6);
      cut += !(within[0] == out[0]);
    }
    over += cost_of(out[0]) > plain_cost * 1.02 + 1e-6;
  }
  BOOST_TEST(hedged_some > 10u);
  BOOST_TEST(over > 0u); // unbounded hedges do cost bytes here, so the bound is tested where it binds
  BOOST_TEST(cut > 0u);
}

BOOST_AUTO_TEST_CASE(bounded_search_picks_the_copies_of_the_full_scan) {
  // With whole-number copy weights the hedge costs candidate copies in the order of upper bounds on
  // their gain and stops early (best_copy_bounded); with other weights it costs every one
  // (best_copy). Halving both weights halves every cost exactly and changes no comparison, so the
  // two searches must choose the same copies, under every replica rule.
  std::mt19937 rng(11);
  std::size_t hedged = 0;
  for (int trial = 0; trial < 80; ++trial) {
    const std::size_t nodes = 2 + rng() % 3, gpus = 1 + rng() % 3, ranks = nodes * gpus;
    const std::size_t spare = 1 + rng() % 2, spr = 2 + spare, experts = ranks * (spr - spare);
    const dynamic_topology topo(nodes, gpus);
    placement::token_sample s;
    s.experts = experts;
    s.top_k = 1 + rng() % 3;
    s.ids.resize(1);
    std::uint32_t request = 0;
    for (std::size_t t = 0, tokens = 150 + rng() % 250; t < tokens; ++request) {
      // Requests of 1 to 30 tokens from one node, most choices among a few experts of their own.
      const auto home = static_cast<std::uint32_t>(rng() % nodes);
      const std::size_t own = rng() % experts;
      for (std::size_t n = 1 + rng() % 30; n > 0; --n, ++t) {
        s.home.push_back(home);
        s.request.push_back(request);
        for (std::size_t j = 0; j < s.top_k; ++j) {
          std::uint16_t e;
          do
            e = static_cast<std::uint16_t>(rng() % 2 ? (own + rng() % 3) % experts : rng() % experts);
          while (std::find(s.ids[0].end() - static_cast<std::ptrdiff_t>(j), s.ids[0].end(), e) != s.ids[0].end());
          s.ids[0].push_back(e);
        }
      }
    }
    // Some experts start with copies on several ranks (or twice on one), so that a copy may also
    // move pairs between the old copies.
    const expert_map map = locus_test::random_map(rng, experts, ranks, spr, rng() % (ranks * spare / 2 + 1));
    std::vector<std::uint8_t> hot(ranks);
    for (auto& h : hot)
      h = static_cast<std::uint8_t>(rng() % 3);
    placement::token_refine_options whole;
    whole.hedge_replicas = 1 + rng() % 6;
    whole.hedge_floor = 1.0 + 0.05 * static_cast<double>(trial % 3);
    whole.hedge_resamples = 8 + rng() % 24;
    whole.hedge_seed = static_cast<std::uint64_t>(trial);
    whole.balance_slack = 0.1 * static_cast<double>(trial % 4);
    whole.replicas = {transport::all_replica_rules[static_cast<std::size_t>(trial) % 4], rng(), hot};
    whole.count(static_cast<placement::copy_count>(trial % 3));
    placement::token_refine_options half = whole;
    half.rank_copy_weight /= 2;
    half.node_copy_weight /= 2;
    using state = placement::detail::token_refine::replica_state<dynamic_topology>;
    state a(map, s.ids[0], s.home, s.top_k, topo, whole, 0, {}, s.request);
    state b(map, s.ids[0], s.home, s.top_k, topo, half, 0, {}, s.request);
    const std::size_t made = a.hedge();
    BOOST_TEST_CONTEXT("trial " << trial) {
      BOOST_TEST(b.hedge() == made);
      BOOST_TEST((a.hedge_copies() == b.hedge_copies()));
    }
    hedged += made;
  }
  BOOST_TEST(hedged > 100u); // many choices compared, not a few
}

BOOST_AUTO_TEST_CASE(gain_bounds_hold_for_every_copy) {
  // gain_bounds(e)[r] bounds the exact sample cost a copy of e on r saves, for every expert and
  // rank not hosting it, under every replica rule, copy count and map with copies on several ranks
  // (where a copy also moves pairs between the old copies); and it is often tight.
  std::mt19937 rng(13);
  std::size_t checked = 0, tight = 0, multi = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t nodes = 2 + rng() % 3, gpus = 1 + rng() % 3, ranks = nodes * gpus, spr = 3;
    const std::size_t experts = 2 * ranks;
    const dynamic_topology topo(nodes, gpus);
    placement::token_sample s;
    s.experts = experts;
    s.top_k = 1 + rng() % 4;
    s.ids.resize(1);
    for (std::size_t t = 0, tokens = 50 + rng() % 150; t < tokens; ++t) {
      s.home.push_back(static_cast<std::uint32_t>(rng() % nodes));
      for (std::size_t j = 0; j < s.top_k; ++j) {
        std::uint16_t e;
        do
          e = static_cast<std::uint16_t>(rng() % experts);
        while (std::find(s.ids[0].end() - static_cast<std::ptrdiff_t>(j), s.ids[0].end(), e) != s.ids[0].end());
        s.ids[0].push_back(e);
      }
    }
    const expert_map map = locus_test::random_map(rng, experts, ranks, spr, rng() % (ranks + 1));
    std::vector<std::uint8_t> hot(ranks);
    for (auto& h : hot)
      h = static_cast<std::uint8_t>(rng() % 3);
    placement::token_refine_options opt;
    opt.replicas = {transport::all_replica_rules[static_cast<std::size_t>(trial) % 4], rng(), hot};
    opt.count(static_cast<placement::copy_count>(trial % 3));
    placement::detail::token_refine::replica_state<dynamic_topology> state(map, s.ids[0], s.home, s.top_k, topo, opt,
                                                                           0);
    std::vector<double> bound;
    for (std::size_t e = 0; e < experts; ++e) {
      state.gain_bounds(e, bound);
      const auto reps = map.replicas(e);
      multi += reps.size() > 1;
      for (std::size_t r = 0; r < ranks; ++r) {
        if (std::any_of(reps.begin(), reps.end(), [&](const slot_ref& x) { return x.rank == static_cast<int>(r); }))
          continue;
        const double g = state.gain(e, r);
        BOOST_TEST_CONTEXT("trial " << trial << " expert " << e << " rank " << r) { BOOST_TEST(g <= bound[r]); }
        ++checked;
        tight += g == bound[r] && g != 0;
      }
    }
  }
  BOOST_TEST(multi > 50u);
  BOOST_TEST(tight * 10 > checked); // a bound, not a blanket
}
