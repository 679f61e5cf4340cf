#define BOOST_TEST_MODULE split_floor
#include "../support/random_map.hpp"

#include <algorithm>
#include <bit>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <locus/placement/split_floor.hpp>
#include <random>

using namespace locus;

namespace {

using locus_test::random_map;

// Brute force over every rank set: max W(S) / |S|.
double densest_set(const expert_map& map, const std::vector<double>& rows) {
  double best = 0;
  for (std::size_t mask = 1; mask < (std::size_t{1} << map.ranks()); ++mask) {
    double w = 0;
    for (std::size_t e = 0; e < map.experts(); ++e) {
      bool inside = true;
      for (const slot_ref& s : map.replicas(e))
        inside = inside && ((mask >> s.rank) & 1);
      if (inside) w += rows[e];
    }
    best = std::max(best, w / std::popcount(mask));
  }
  return best;
}

// Brute force over every integral split of each expert's rows among its replicas: the lowest max load.
double best_integral_split(const expert_map& map, const std::vector<double>& rows) {
  std::vector<double> load(map.ranks(), 0);
  double best = 1e300;
  std::function<void(std::size_t)> expert = [&](std::size_t e) {
    if (e == map.experts()) {
      best = std::min(best, *std::max_element(load.begin(), load.end()));
      return;
    }
    const auto reps = map.replicas(e);
    std::function<void(std::size_t, int)> give = [&](std::size_t i, int left) {
      const auto r = static_cast<std::size_t>(reps[i].rank);
      if (i + 1 == reps.size()) {
        load[r] += left;
        expert(e + 1);
        load[r] -= left;
        return;
      }
      for (int k = 0; k <= left; ++k) {
        load[r] += k;
        give(i + 1, left - k);
        load[r] -= k;
      }
    };
    give(0, static_cast<int>(rows[e]));
  };
  expert(0);
  return best;
}

} // namespace

BOOST_AUTO_TEST_CASE(floor_matches_brute_force_on_small_maps) {
  std::mt19937 rng(19);
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t ranks = 2 + rng() % 3, spr = 2 + rng() % 2;
    const std::size_t experts = 2 + rng() % (ranks * spr - 1);
    const expert_map map = random_map(rng, experts, ranks, spr, rng() % (ranks * spr - experts + 1));
    std::vector<double> rows(experts);
    for (double& r : rows)
      r = static_cast<double>(rng() % 6);
    rows[rng() % experts] += 1; // never all zero
    const placement::split_floor f = placement::min_max_split(map, rows);
    BOOST_TEST_CONTEXT("trial " << trial) {
      BOOST_TEST(f.max_load == densest_set(map, rows), boost::test_tools::tolerance(1e-9));
      // Integral rows: max-flow integrality makes the best integral split the ceiling of the floor.
      BOOST_TEST(best_integral_split(map, rows) == std::ceil(f.max_load - 1e-9));
      BOOST_TEST(f.max_over_mean >= 1 - 1e-12);
      BOOST_TEST(!f.binding_ranks.empty());
    }
  }
}

BOOST_AUTO_TEST_CASE(single_copy_hot_expert_sets_the_floor) {
  // 3 ranks × 2 slots: expert 0 (9 rows) only on rank 0; experts 1, 2 (3 rows each) replicated everywhere else.
  const expert_map map = expert_map::from_replicas(3, 3, 2, {{{0, 0}}, {{0, 1}, {1, 0}, {2, 0}}, {{1, 1}, {2, 1}}});
  const std::vector<double> rows{9, 3, 3};
  const placement::split_floor f = placement::min_max_split(map, rows);
  BOOST_TEST(f.max_load == 9, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(f.max_over_mean == 9.0 / 5.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(f.binding_ranks == std::vector<std::size_t>{0});
  // A replica of expert 0 on rank 1 lets the split spread it: the floor falls to the mean.
  const expert_map fixed = expert_map::from_replicas(3, 3, 2, {{{0, 0}, {1, 0}}, {{0, 1}, {2, 0}}, {{1, 1}, {2, 1}}});
  BOOST_TEST(placement::min_max_split(fixed, rows).max_over_mean == 1.0, boost::test_tools::tolerance(1e-12));
  // The same floor on any finite scale: counts summing past the largest double gave max/mean NaN,
  // and a mean that rounds to 0 among the subnormals gave inf.
  const placement::split_floor huge = placement::min_max_split(map, std::vector<double>{9e307, 3e307, 3e307});
  BOOST_TEST(huge.max_over_mean == 9.0 / 5.0, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(huge.binding_ranks == std::vector<std::size_t>{0});
  const placement::split_floor over = placement::min_max_split(map, std::vector<double>{1.35e308, 4.5e307, 4.5e307});
  BOOST_TEST(over.max_over_mean == 9.0 / 5.0, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(over.max_load == 1.35e308, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(over.mean_load == 7.5e307, boost::test_tools::tolerance(1e-9));
  const expert_map two = expert_map::from_replicas(2, 2, 1, {{{0, 0}}, {{1, 0}}});
  const double tiny = std::numeric_limits<double>::denorm_min();
  BOOST_TEST(placement::min_max_split(two, std::vector<double>{tiny, 0}).max_over_mean == 2.0);
}

BOOST_AUTO_TEST_CASE(bad_traffic_is_refused) {
  const expert_map map = expert_map::from_replicas(2, 2, 1, {{{0, 0}}, {{1, 0}}});
  BOOST_CHECK_THROW(placement::min_max_split(map, std::vector<double>{1}), invalid_input_error);
  BOOST_CHECK_THROW(placement::min_max_split(map, std::vector<double>{1, -1}), invalid_input_error);
  BOOST_CHECK_THROW(placement::min_max_split(map, std::vector<double>{0, 0}), invalid_input_error);
  BOOST_CHECK_THROW(placement::min_max_split(map, std::vector<double>{1, NAN}), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(segments_split_on_their_own_maps) {
  // Expert 0 (4 rows) lives on rank 0 for the first segment and on rank 1 for the second.
  const expert_map a = expert_map::from_replicas(2, 2, 1, {{{0, 0}}, {{1, 0}}});
  const expert_map b = expert_map::from_replicas(2, 2, 1, {{{1, 0}}, {{0, 0}}});
  const std::vector<std::vector<double>> rows{{4, 0}, {4, 0}};
  const std::vector<const expert_map*> ab{&a, &b}, aa{&a, &a};
  BOOST_TEST(placement::min_max_split(ab, rows).max_over_mean == 1.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(placement::min_max_split(aa, rows).max_over_mean == 2.0, boost::test_tools::tolerance(1e-12));
  // The same map twice is the one map with the rows summed.
  std::mt19937 rng(5);
  const expert_map m = random_map(rng, 6, 3, 3, 3);
  const std::vector<std::vector<double>> two{{1, 2, 3, 0, 5, 1}, {4, 0, 1, 2, 2, 7}};
  const std::vector<const expert_map*> mm{&m, &m};
  BOOST_TEST(placement::min_max_split(mm, two).max_load ==
                 placement::min_max_split(m, std::vector<double>{5, 2, 4, 2, 7, 8}).max_load,
             boost::test_tools::tolerance(1e-9));
  BOOST_CHECK_THROW(placement::min_max_split(ab, std::vector<std::vector<double>>{{4, 0}}), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(solver_returns_min_max_split_bit_for_bit) {
  // Whole-number rows on random maps, most experts on one rank and some on several (repeats on a
  // rank included): the folded solver, with and without a hint, gives min_max_split's loads and
  // binding set exactly; so does a second solve on the same solver (its memory is reused).
  std::mt19937 rng(23);
  placement::split_floor_solver solver;
  int multi = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const std::size_t ranks = 2 + rng() % 7, spr = 2 + rng() % 3;
    const std::size_t experts = 2 + rng() % (ranks * spr - 1);
    const expert_map map = random_map(rng, experts, ranks, spr, rng() % (ranks * spr - experts + 1));
    std::vector<double> rows(experts);
    for (double& r : rows)
      r = rng() % 3 == 0 ? 0.0 : static_cast<double>(rng() % 40);
    rows[rng() % experts] += 1;
    std::vector<std::vector<std::int32_t>> hosts(experts);
    for (std::size_t e = 0; e < experts; ++e) {
      for (const slot_ref& s : map.replicas(e))
        hosts[e].push_back(s.rank);
      multi += hosts[e].size() > 1;
    }
    const auto of = [&](std::size_t e) -> const std::vector<std::int32_t>& { return hosts[e]; };
    std::vector<std::size_t> hint;
    for (std::size_t r = 0; r < ranks; ++r)
      if (rng() % 2) hint.push_back(r);
    const placement::split_floor want = placement::min_max_split(map, rows);
    for (const auto& got : {solver.solve(ranks, rows, of), solver.solve(ranks, rows, of, hint)})
      BOOST_TEST_CONTEXT("trial " << trial) {
        BOOST_TEST(got.max_load == want.max_load);
        BOOST_TEST(got.mean_load == want.mean_load);
        BOOST_TEST(got.max_over_mean == want.max_over_mean);
        BOOST_TEST(got.binding_ranks == want.binding_ranks, boost::test_tools::per_element());
      }
  }
  BOOST_TEST(multi > 100); // the flow part is exercised, not only the folded ranks
  std::vector<std::vector<std::int32_t>> none(2);
  BOOST_CHECK_THROW(solver.solve(
                        2, std::vector<double>{0, 0}, [&](std::size_t e) -> const auto& { return none[e]; }),
                    invalid_input_error);
  BOOST_CHECK_THROW(solver.solve(
                        2, std::vector<double>{1, 0}, [&](std::size_t e) -> const auto& { return none[e]; }),
                    invalid_input_error);
}
