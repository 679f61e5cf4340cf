#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <locus/placement/eplb.hpp>
#include <locus/placement/linear.hpp>
#include <random>
#include <span>
#include <utility>
#include <vector>

using namespace locus;
using namespace locus::placement;

BOOST_AUTO_TEST_SUITE(baselines)

// The example published in DeepSeek's EPLB README: two layers, 12 experts, 16 physical slots,
// 4 groups, 2 nodes, 8 GPUs.
BOOST_AUTO_TEST_CASE(eplb_reproduces_the_published_example) {
  plan_input in;
  in.topology = dynamic_topology(2, 4);
  in.experts = 12;
  in.slots_per_rank = 2;
  in.load = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
             {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
  const std::vector<std::vector<expert_id>> expected = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                                                        {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
  const auto maps = eplb{.groups = 4}.plan(in);
  BOOST_REQUIRE_EQUAL(maps.size(), 2u);
  for (std::size_t l = 0; l < 2; ++l)
    BOOST_TEST(maps[l].slot_table() == expected[l], boost::test_tools::per_element());
}

// The same example through the drop-in entry point: the other two results agree with the first.
BOOST_AUTO_TEST_CASE(rebalance_experts_returns_consistent_maps) {
  const std::vector<float> w = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
                                20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
  const auto r = rebalance_experts(w, 2, 12, 16, 4, 2, 8);
  const std::vector<std::int64_t> expected = {5, 6,  5, 7, 8, 4,  3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                                              7, 10, 6, 8, 6, 11, 8, 9, 2,  4, 5,  1, 5, 0, 3,  1};
  BOOST_TEST(r.physical_to_logical == expected, boost::test_tools::per_element());
  BOOST_TEST(r.max_replicas == 2u);
  for (std::size_t l = 0; l < 2; ++l)
    for (std::size_t e = 0; e < 12; ++e) {
      const auto count = static_cast<std::size_t>(
          std::count(expected.begin() + l * 16, expected.begin() + l * 16 + 16, static_cast<std::int64_t>(e)));
      BOOST_TEST(r.logical_count[l * 12 + e] == static_cast<std::int64_t>(count));
      for (std::size_t k = 0; k < 2; ++k) {
        const auto p = r.logical_to_physical[(l * 12 + e) * 2 + k];
        if (k < count)
          BOOST_TEST(expected[l * 16 + static_cast<std::size_t>(p)] == static_cast<std::int64_t>(e));
        else
          BOOST_TEST(p == -1);
      }
    }
  BOOST_CHECK_THROW(rebalance_experts(w, 2, 12, 16, 4, 2, 6), config_error); // 16 slots on 6 GPUs
  BOOST_CHECK_THROW(rebalance_experts(w, 2, 12, 8, 4, 2, 8), config_error);  // 8 slots for 12 experts
  auto bad = w;
  bad[13] = std::nanf("");
  BOOST_CHECK_THROW(rebalance_experts(bad, 2, 12, 16, 4, 2, 8), invalid_input_error);
  // 2^32 layers × 2^32 experts wrapped to 0 values, which an empty table matched; each layer's
  // slice was then read past its end.
  BOOST_CHECK_THROW(rebalance_experts({}, std::size_t{1} << 32, std::size_t{1} << 32, std::size_t{1} << 32, 1, 1, 1),
                    invalid_input_error);
}

// The packing and the replication pick from heaps: the same choices as the reference's scans
// (least loaded pack with room, largest load per replica; the lowest index among equals), here
// written as those scans, on loads with many ties; and counts far past any deployment are refused
// before their tables are allocated (2^31 slots of one layer were 16 GiB of results).
BOOST_AUTO_TEST_CASE(rebalance_picks_as_the_reference_scans) {
  const auto scan_packing = [](std::span<const float> w, std::size_t packs) {
    const std::size_t n = w.size(), per_pack = n / packs;
    placement::detail::eplb::packing out{std::vector<std::size_t>(n), std::vector<std::size_t>(n, 0)};
    if (per_pack == 1) {
      for (std::size_t i = 0; i < n; ++i)
        out.pack[i] = i;
      return out;
    }
    std::vector<float> load(packs, 0.0f);
    std::vector<std::size_t> items(packs, 0);
    for (const std::size_t item : placement::detail::eplb::descending_order(w)) {
      std::size_t best = packs;
      for (std::size_t p = 0; p < packs; ++p)
        if (items[p] < per_pack && (best == packs || load[p] < load[best])) best = p;
      out.pack[item] = best;
      out.position[item] = items[best]++;
      load[best] += w[item];
    }
    return out;
  };
  const auto scan_replicate = [](std::span<const float> w, std::size_t physical) {
    const std::size_t n = w.size();
    std::vector<std::size_t> slot(physical), count(n, 1);
    for (std::size_t e = 0; e < n; ++e)
      slot[e] = e;
    std::vector<float> per(w.begin(), w.end());
    for (std::size_t p = n; p < physical; ++p) {
      std::size_t best = 0;
      for (std::size_t e = 1; e < n; ++e)
        if (per[e] > per[best]) best = e;
      slot[p] = best;
      per[best] = w[best] / static_cast<float>(++count[best]);
    }
    return std::make_pair(slot, count);
  };
  std::mt19937 rng(17);
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t packs = 1 + rng() % 9, per = 1 + rng() % 6, levels = 1 + rng() % 4;
    std::vector<float> w(packs * per);
    for (auto& x : w)
      x = static_cast<float>(rng() % levels); // few distinct loads: ties everywhere
    const auto a = placement::detail::eplb::balanced_packing(w, packs), b = scan_packing(w, packs);
    BOOST_TEST(a.pack == b.pack, boost::test_tools::per_element());
    BOOST_TEST(a.position == b.position, boost::test_tools::per_element());
    const std::size_t physical = w.size() + rng() % (2 * w.size() + 1);
    const auto r = placement::detail::eplb::replicate(w, physical);
    const auto [slot, count] = scan_replicate(w, physical);
    BOOST_TEST(r.physical_to_logical == slot, boost::test_tools::per_element());
    BOOST_TEST(r.count == count, boost::test_tools::per_element());
  }
  const std::vector<float> one(8, 1.0f);
  BOOST_CHECK_THROW(rebalance_experts(one, 1, 8, std::size_t{1} << 31, 1, 1, 1), config_error);
  BOOST_CHECK_NO_THROW(rebalance_experts(one, 1, 8, 8 * 8192, 1, 1, 8192)); // 8,192 GPUs: a scan was 1.3 s
}

// Independent check of balance: max/mean GPU load (each replica carrying load / replica count)
// is never worse than linear's on random skewed loads, and every slot is used.
BOOST_AUTO_TEST_CASE(eplb_balances_at_least_as_well_as_linear) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 30; ++trial) {
    plan_input in;
    const std::size_t nodes = 1 + rng() % 4, gpus = 1 + rng() % 4;
    in.topology = dynamic_topology(nodes, gpus);
    in.experts = in.ranks() * (1 + rng() % 4);
    // A GPU holds each expert at most once: one GPU of all the experts has no room for a replica.
    in.slots_per_rank = std::min(in.experts, in.experts / in.ranks() + rng() % 2);
    std::lognormal_distribution<double> skew(0.0, 1.5);
    in.load.assign(2, std::vector<double>(in.experts));
    for (auto& layer : in.load)
      for (double& x : layer)
        x = std::round(100 * skew(rng));
    const std::size_t groups = in.experts % nodes == 0 ? nodes : 1;
    const auto balanced = eplb{.groups = groups}.plan(in);
    const auto lin = linear{}.plan(in);
    for (std::size_t l = 0; l < 2; ++l) {
      auto gpu_max_over_mean = [&](const expert_map& m) {
        std::vector<double> gpu(in.ranks(), 0.0);
        for (std::size_t e = 0; e < in.experts; ++e)
          for (const slot_ref& s : m.replicas(e))
            gpu[static_cast<std::size_t>(s.rank)] += in.load[l][e] / static_cast<double>(m.replica_count(e));
        double total = 0;
        for (double g : gpu)
          total += g;
        return total == 0 ? 1.0 : *std::max_element(gpu.begin(), gpu.end()) / (total / static_cast<double>(gpu.size()));
      };
      BOOST_TEST(std::count(balanced[l].slot_table().begin(), balanced[l].slot_table().end(), empty_slot) == 0);
      BOOST_TEST(gpu_max_over_mean(balanced[l]) <= gpu_max_over_mean(lin[l]) + 1e-9);
    }
  }
}

// A placement is checked for what a planner is asked (plan on a plan_input, giving maps), not only its tag.
struct tag_only_placement {
  using policy_concept = placement_tag;
  static constexpr const char* name = "tag_only";
};
struct plans_one_map {
  using policy_concept = placement_tag;
  static constexpr const char* name = "one_map";
  expert_map plan(const plan_input& in) const { return linear{}.plan(in).front(); }
};
static_assert(placement_policy<linear> && placement_policy<round_robin> && placement_policy<eplb>);
static_assert(!placement_policy<tag_only_placement> && !placement_policy<plans_one_map>);

// A plan_input takes loads on any finite scale; EPLB's float arithmetic turned 1e300 into inf and
// refused it ("load inf") and 1e-300 into 0. Such a layer is scaled to a largest load of 1.
BOOST_AUTO_TEST_CASE(eplb_takes_loads_on_any_finite_scale) {
  std::vector<double> base(8), huge(8), tiny(8);
  for (std::size_t e = 0; e < 8; ++e) {
    base[e] = static_cast<double>(e + 1) / 8; // exact, as are the scaled copies (powers of two)
    huge[e] = std::ldexp(static_cast<double>(e + 1), 900);
    tiny[e] = std::ldexp(static_cast<double>(e + 1), -900);
  }
  const auto plan = [](std::vector<double> load) {
    return plan_placement<eplb>(plan_input{dynamic_topology(2, 2), 8, 3, {std::move(load)}, {}}).front();
  };
  const expert_map expected = plan(base);
  for (const auto& load : {huge, tiny}) {
    const expert_map m = plan(load);
    for (std::size_t r = 0; r < 4; ++r)
      for (std::size_t s = 0; s < 3; ++s)
        BOOST_TEST(m.expert_at(r, s) == expected.expert_at(r, s));
  }
}

BOOST_AUTO_TEST_CASE(plan_placement_runs_the_named_planner) {
  const plan_input in{dynamic_topology(2, 2), 10, 3, {std::vector<double>(10, 1.0), std::vector<double>(10, 2.0)}, {}};
  const auto maps = plan_placement<round_robin>(in);
  BOOST_TEST_REQUIRE(maps.size() == 2u);
  for (const auto& m : maps) {
    BOOST_TEST(m.ranks() == 4u);
    for (expert_id e = 0; e < 10; ++e) // expert e on rank e mod 4, slot e div 4
      BOOST_TEST(m.expert_at(e % 4, e / 4) == e);
  }
  const auto grouped = plan_placement<eplb>(in, std::size_t{2});
  BOOST_TEST((grouped == eplb{2}.plan(in)));
}

BOOST_AUTO_TEST_CASE(linear_and_round_robin_layouts) {
  plan_input in;
  in.topology = dynamic_topology(2, 2);
  in.experts = 8;
  in.slots_per_rank = 3;
  in.load = {std::vector<double>(8, 1.0)};
  const auto lin = linear{}.plan(in).front();
  const auto rr = round_robin{}.plan(in).front();
  for (std::size_t e = 0; e < 8; ++e) {
    BOOST_TEST(lin.replica_count(e) == 1u);
    BOOST_TEST(static_cast<std::size_t>(lin.replicas(e)[0].rank) == e / 2);
    BOOST_TEST(static_cast<std::size_t>(rr.replicas(e)[0].rank) == e % 4);
  }
  in.slots_per_rank = 1;
  BOOST_CHECK_THROW(linear{}.plan(in), config_error);
  in.slots_per_rank = 2;
  in.load[0][3] = -1;
  BOOST_CHECK_THROW(linear{}.plan(in), invalid_input_error);
  in.load[0][3] = 1;
  BOOST_CHECK_THROW(eplb{.groups = 6}.plan(in), config_error); // hierarchical (6 groups on 2 nodes), 8 experts
  BOOST_CHECK_NO_THROW(eplb{.groups = 3}.plan(in));            // 3 groups on 2 nodes: global policy, groups unused
}

// Experts that do not divide the ranks: blocks differ by at most one, the larger ones first, in
// expert order (60 on 8 ranks: 8,8,8,8,7,7,7,7, not 8 × 7 and 4 on the last).
BOOST_AUTO_TEST_CASE(linear_spreads_uneven_counts_evenly) {
  plan_input in;
  in.topology = dynamic_topology(2, 4);
  in.experts = 60;
  in.slots_per_rank = slots_for(60, 8, 0);
  in.load = {std::vector<double>(60, 1.0)};
  const auto m = linear{}.plan(in).front();
  const std::vector<std::size_t> sizes = {8, 8, 8, 8, 7, 7, 7, 7};
  std::size_t first = 0;
  for (std::size_t r = 0; r < 8; ++r) {
    for (std::size_t e = first; e < first + sizes[r]; ++e) {
      BOOST_TEST(m.replica_count(e) == 1u);
      BOOST_TEST(static_cast<std::size_t>(m.replicas(e)[0].rank) == r);
    }
    first += sizes[r];
  }
  BOOST_TEST(first == 60u);
}

// EPLB's and vLLM's num_redundant_experts (a total) as locus's replica slots per GPU, against every
// per-GPU count r: a total is taken exactly when some r gives ranks x slots_for(r) physical slots =
// experts + total, and then as that r; a refused total names the nearest that are taken. DeepSeek-V3
// (256 experts) on 32 GPUs with 32 redundant experts: 1 per GPU; 60 experts on 8 GPUs leave 4 empty
// slots, so 4 redundant experts are 0 per GPU and 12 are 1.
BOOST_AUTO_TEST_CASE(redundant_experts_as_eplb_counts_them) {
  BOOST_TEST(redundant_slots_for_total(256, 32, 32) == 1u);
  BOOST_TEST(redundant_slots_for_total(60, 8, 4) == 0u);
  BOOST_TEST(redundant_slots_for_total(60, 8, 12) == 1u);
  for (std::size_t ranks = 1; ranks <= 9; ++ranks)
    for (std::size_t experts = ranks; experts <= 30; ++experts) {
      const std::size_t first = (experts + ranks - 1) / ranks;
      std::vector<std::size_t> taken; // the totals some r gives
      for (std::size_t r = 0; first + r <= experts; ++r)
        taken.push_back((first + r) * ranks - experts);
      for (std::size_t total = 0; total <= experts * ranks + ranks; ++total) {
        const auto it = std::find(taken.begin(), taken.end(), total);
        if (it != taken.end()) {
          BOOST_TEST(redundant_slots_for_total(experts, ranks, total) == static_cast<std::size_t>(it - taken.begin()));
          BOOST_TEST(slots_for(experts, ranks, redundant_slots_for_total(experts, ranks, total)) * ranks ==
                     experts + total);
          continue;
        }
        try {
          (void)redundant_slots_for_total(experts, ranks, total);
          BOOST_FAIL(total << " redundant experts taken for " << experts << " experts on " << ranks << " GPUs");
        } catch (const config_error& e) {
          if (total > taken.back()) {
            BOOST_TEST(e.message().find("at most " + std::to_string(taken.back())) != std::string::npos, e.message());
            continue;
          }
          // The nearest taken totals on either side, as the message names them.
          const auto above = std::upper_bound(taken.begin(), taken.end(), total);
          const std::string nearest = above == taken.begin()
                                          ? std::to_string(*above)
                                          : std::to_string(*(above - 1)) + " or " + std::to_string(*above);
          BOOST_TEST(e.message().find("(nearest: " + nearest + ")") != std::string::npos, e.message());
        }
      }
    }
}

BOOST_AUTO_TEST_CASE(fewer_experts_than_gpus_is_refused) {
  BOOST_CHECK_NO_THROW((void)slots_for(8, 8, 0));
  try {
    (void)slots_for(6, 8, 0);
    BOOST_FAIL("6 experts on 8 GPUs was accepted");
  } catch (const config_error& e) {
    BOOST_TEST(e.message().find("6 experts cannot give each of 8 GPUs") != std::string::npos, e.message());
  }
}

BOOST_AUTO_TEST_SUITE_END()
