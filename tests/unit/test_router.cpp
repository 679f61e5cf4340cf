// Routers against an independent brute-force reference: every probability and score computed in
// double precision with std::exp, every selection made by a full sort.
#define BOOST_TEST_MODULE router
#include "../support/router_inputs.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <locus/router/router.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace locus;
namespace lr = locus::router;
using locus_test::random_bias;
using locus_test::random_logits;

static_assert(router_policy<lr::softmax_topk<top_k<8>>>);
static_assert(router_policy<lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>>>);
static_assert(router_policy<lr::sigmoid_top1>);
static_assert(std::is_same_v<require_router<lr::sigmoid_top1>::type, lr::sigmoid_top1>);

// The router concept checks what the layer calls, not only the tag.
struct tag_only_router {
  using policy_concept = router_tag;
  using top_k_type = locus::top_k<>;
  static constexpr const char* name = "tag_only";
  std::size_t top_k() const { return 2; }
};
struct routes_other_top_k {
  using policy_concept = router_tag;
  using top_k_type = locus::top_k<2>;
  static constexpr const char* name = "other";
  std::size_t top_k() const { return 2; }
  void route(const lr::logits_view<experts<>, const float>&, const mutable_routing_view<locus::top_k<4>>&,
             unsigned) const {}
};
struct complete_router : tag_only_router {
  void route(const lr::logits_view<experts<>, const float>&, const mutable_routing_view<locus::top_k<>>&,
             unsigned) const {}
};
static_assert(!router_policy<tag_only_router> && !router_policy<routes_other_top_k> && router_policy<complete_router>);

namespace {

// --- the reference ------------------------------------------------------------------------------

struct reference_token {
  std::vector<int> ids;
  std::vector<double> weights;
  bool ambiguous = false; // a decision margin below the float resolution: ids not compared
};

// Float value of a bfloat16, written independently of locus::bfloat16.
float bf16_bits_to_float(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
double value_of(float x) { return x; }
double value_of(bfloat16 x) { return bf16_bits_to_float(x.bits); }

// Indices sorted by decreasing score, ties by lower index.
std::vector<int> order_by(const std::vector<double>& score) {
  std::vector<int> idx(score.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(),
            [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  return idx;
}

template <class T>
reference_token ref_softmax(const T* row, std::size_t experts, std::size_t k, bool renormalize) {
  std::vector<double> l(experts), p(experts);
  for (std::size_t e = 0; e < experts; ++e)
    l[e] = value_of(row[e]);
  const double m = *std::max_element(l.begin(), l.end());
  double sum = 0;
  for (std::size_t e = 0; e < experts; ++e)
    sum += p[e] = std::exp(l[e] - m);
  for (auto& x : p)
    x /= sum;
  // Selection on the logits themselves: equal logits are exact ties, distinct ones never are.
  const auto order = order_by(l);
  reference_token r;
  double chosen = 0;
  for (std::size_t j = 0; j < k; ++j)
    chosen += p[order[j]];
  for (std::size_t j = 0; j < k; ++j) {
    r.ids.push_back(order[j]);
    r.weights.push_back(renormalize ? p[order[j]] / chosen : p[order[j]]);
  }
  return r;
}

template <class T>
reference_token ref_grouped(const T* row, std::size_t experts, std::size_t groups, std::size_t top_groups,
                            std::size_t k, const std::vector<float>& bias, double scale, bool normalize) {
  constexpr double margin = 1e-5; // well above float rounding of scores in [0, 2]
  std::vector<double> s(experts), b(experts);
  for (std::size_t e = 0; e < experts; ++e) {
    s[e] = 1.0 / (1.0 + std::exp(-value_of(row[e])));
    b[e] = s[e] + (bias.empty() ? 0.0 : static_cast<double>(bias[e]));
  }
  const std::size_t size = experts / groups;
  std::vector<double> gscore(groups);
  for (std::size_t g = 0; g < groups; ++g) {
    std::vector<double> v(b.begin() + g * size, b.begin() + (g + 1) * size);
    std::sort(v.begin(), v.end(), std::greater<>());
    gscore[g] = v[0] + v[1];
  }
  reference_token r;
  const auto gorder = order_by(gscore);
  if (top_groups < groups) {
    const double gap = gscore[gorder[top_groups - 1]] - gscore[gorder[top_groups]];
    r.ambiguous |= gap > 0 && gap < margin;
  }
  std::vector<double> cand(experts, -std::numeric_limits<double>::infinity());
  for (std::size_t j = 0; j < top_groups; ++j)
    for (std::size_t e = gorder[j] * size; e < (gorder[j] + 1) * size; ++e)
      cand[e] = b[e];
  const auto order = order_by(cand);
  if (k < top_groups * size) {
    const double gap = cand[order[k - 1]] - cand[order[k]];
    r.ambiguous |= gap > 0 && gap < margin;
  }
  double sum = 0;
  for (std::size_t j = 0; j < k; ++j)
    sum += s[order[j]];
  for (std::size_t j = 0; j < k; ++j) {
    r.ids.push_back(order[j]);
    r.weights.push_back((normalize ? s[order[j]] / sum : s[order[j]]) * scale);
  }
  return r;
}

// --- comparison ---------------------------------------------------------------------------------

constexpr double weight_tolerance = 2e-6; // relative: float arithmetic over at most 256 terms

// Compares a routing with the reference, token by token; returns the number of ambiguous tokens.
template <class View, class RefFn>
std::size_t expect_matches(const View& got, std::size_t tokens, std::size_t k, RefFn&& ref, const std::string& what) {
  std::size_t ambiguous = 0, id_errors = 0, weight_errors = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    const reference_token r = ref(t);
    if (r.ambiguous) {
      ++ambiguous;
      continue;
    }
    for (std::size_t j = 0; j < k; ++j) {
      if (got.expert(t, j) != r.ids[j]) {
        if (id_errors++ < 5)
          BOOST_ERROR(what << ": token " << t << " choice " << j << ": expert " << got.expert(t, j) << ", expected "
                           << r.ids[j]);
        continue;
      }
      const double w = got.weight(t, j);
      if (std::abs(w - r.weights[j]) > weight_tolerance * std::abs(r.weights[j]) + 1e-30) {
        if (weight_errors++ < 5)
          BOOST_ERROR(what << ": token " << t << " choice " << j << ": weight " << w << ", expected " << r.weights[j]);
      }
    }
  }
  BOOST_TEST(id_errors == 0u, what << ": " << id_errors << " id mismatches");
  BOOST_TEST(weight_errors == 0u, what << ": " << weight_errors << " weight mismatches");
  // Near-ties are rare with continuous random inputs; many of them would hide a real error.
  BOOST_TEST(ambiguous * 100 <= tokens, what << ": " << ambiguous << " ambiguous tokens");
  return ambiguous;
}

// --- softmax top-k ------------------------------------------------------------------------------

template <std::size_t E, std::size_t K, class T>
void check_softmax(std::size_t tokens, unsigned seed, bool renormalize) {
  const auto logits = random_logits<T>(tokens * E, seed);
  const lr::softmax_topk<top_k<K>> router(K, renormalize);
  const auto r = router.route(lr::logits_view<experts<E>, const T>(logits.data(), tokens), 3);
  const std::string what = "softmax E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (renormalize ? " renorm" : "") + (sizeof(T) == 2 ? " bf16" : " fp32");
  expect_matches(
      r.view(), tokens, K, [&](std::size_t t) { return ref_softmax(&logits[t * E], E, K, renormalize); }, what);
  validate_routing(r.view(), E);
}

BOOST_AUTO_TEST_CASE(softmax_topk_matches_reference) {
  check_softmax<8, 2, float>(2000, 1, true);
  check_softmax<8, 2, float>(2000, 2, false);
  check_softmax<64, 6, float>(1500, 3, true);
  check_softmax<64, 6, float>(1500, 4, false);
  check_softmax<128, 1, float>(1000, 5, false);
  check_softmax<128, 8, float>(1000, 6, true);
  check_softmax<256, 8, float>(800, 7, false);
  check_softmax<60, 4, float>(800, 8, true); // not a multiple of anything
  check_softmax<1, 1, float>(100, 9, false);
  check_softmax<8, 8, float>(200, 10, false); // k = E: every expert, weights = the full softmax
}

BOOST_AUTO_TEST_CASE(softmax_topk_bf16_matches_reference) {
  // bf16 logits repeat often (8 bits of mantissa), so this also exercises exact ties.
  check_softmax<8, 2, bfloat16>(2000, 11, true);
  check_softmax<64, 6, bfloat16>(1500, 12, false);
  check_softmax<128, 8, bfloat16>(1000, 13, true);
  check_softmax<256, 8, bfloat16>(600, 14, false);
}

BOOST_AUTO_TEST_CASE(softmax_topk_ties_choose_the_lower_expert) {
  // Token 0: all equal. Token 1: three-way tie for the top at 5, 2, 7. Token 2: tie at the k-th place.
  const std::vector<float> logits = {1, 1, 1, 1, 1, 1, 1, 1, //
                                     0, 0, 3, 0, 0, 3, 0, 3, //
                                     9, 2, 2, 0, 2, 0, 0, 0};
  const auto r = lr::softmax_topk<top_k<2>>().route(lr::logits_view<experts<8>>(logits.data(), 3));
  BOOST_TEST(r.view().expert(0, 0) == 0);
  BOOST_TEST(r.view().expert(0, 1) == 1);
  BOOST_TEST(r.view().weight(0, 0) == 0.5f);
  BOOST_TEST(r.view().weight(0, 1) == 0.5f);
  BOOST_TEST(r.view().expert(1, 0) == 2);
  BOOST_TEST(r.view().expert(1, 1) == 5);
  BOOST_TEST(r.view().expert(2, 0) == 0);
  BOOST_TEST(r.view().expert(2, 1) == 1);
}

// --- sigmoid grouped ----------------------------------------------------------------------------

template <std::size_t E, std::size_t G, std::size_t TG, std::size_t K, class T>
void check_grouped(std::size_t tokens, unsigned seed, bool with_bias, float scale, bool normalize) {
  const auto logits = random_logits<T>(tokens * E, seed);
  const auto bias = with_bias ? random_bias(E, seed + 100) : std::vector<float>{};
  const lr::sigmoid_grouped<groups<G>, top_groups<TG>, top_k<K>> router(bias, scale, normalize);
  const auto r = router.route(lr::logits_view<experts<E>, const T>(logits.data(), tokens), 3);
  const std::string what = "grouped E=" + std::to_string(E) + " G=" + std::to_string(G) + "/" + std::to_string(TG) +
                           " K=" + std::to_string(K) + (sizeof(T) == 2 ? " bf16" : " fp32");
  expect_matches(
      r.view(), tokens, K,
      [&](std::size_t t) { return ref_grouped(&logits[t * E], E, G, TG, K, bias, scale, normalize); }, what);
  validate_routing(r.view(), E);
}

BOOST_AUTO_TEST_CASE(sigmoid_grouped_matches_reference) {
  check_grouped<256, 8, 4, 8, float>(1000, 21, true, 2.5f, true); // DeepSeek-V3
  check_grouped<256, 8, 4, 8, float>(500, 22, false, 1.0f, true);
  check_grouped<256, 8, 4, 8, float>(500, 23, true, 1.0f, false);
  check_grouped<64, 8, 3, 6, float>(1000, 24, true, 1.0f, true);
  check_grouped<160, 8, 3, 6, float>(500, 25, true, 16.0f, true); // DeepSeek-V2 shape
  check_grouped<8, 4, 2, 2, float>(1000, 26, true, 1.0f, true);
  check_grouped<128, 1, 1, 8, float>(500, 27, true, 1.0f, true);  // one group: plain sigmoid top-k
  check_grouped<64, 32, 32, 4, float>(500, 28, true, 1.0f, true); // every group kept
  check_grouped<16, 4, 1, 2, float>(500, 29, true, 1.0f, true);   // k = group size
}

BOOST_AUTO_TEST_CASE(sigmoid_grouped_bf16_matches_reference) {
  check_grouped<256, 8, 4, 8, bfloat16>(800, 31, true, 2.5f, true);
  check_grouped<64, 8, 3, 6, bfloat16>(800, 32, false, 1.0f, true);
}

BOOST_AUTO_TEST_CASE(sigmoid_grouped_ties_choose_the_lower_group_and_expert) {
  // All logits equal, no bias: every group scores the same, so groups 0 and 1 are kept and the
  // four lowest experts of them chosen; weights are equal.
  std::vector<float> logits(16, 0.25f);
  const lr::sigmoid_grouped<groups<4>, top_groups<2>, top_k<3>> router;
  auto r = router.route(lr::logits_view<experts<16>>(logits.data(), 1));
  BOOST_TEST(r.view().expert(0, 0) == 0);
  BOOST_TEST(r.view().expert(0, 1) == 1);
  BOOST_TEST(r.view().expert(0, 2) == 2);
  for (int j = 0; j < 3; ++j)
    BOOST_TEST(std::abs(r.view().weight(0, j) - 1.0 / 3) < 1e-6);
  // Groups 1 and 3 tie for the best score and group 2 scores lower, so {1, 3} are kept; inside
  // them experts 5 and 13 tie (5 first), then 6 and 14 tie (6 wins the third place).
  logits.assign(16, -5.0f);
  logits[5] = logits[13] = 2.0f;
  logits[6] = logits[14] = 1.0f;
  logits[9] = 2.5f; // group 2: 2.5 + (-5) is below 2 + 1
  r = router.route(lr::logits_view<experts<16>>(logits.data(), 1));
  BOOST_TEST(r.view().expert(0, 0) == 5);
  BOOST_TEST(r.view().expert(0, 1) == 13);
  BOOST_TEST(r.view().expert(0, 2) == 6);
}

BOOST_AUTO_TEST_CASE(sigmoid_grouped_bias_affects_selection_only) {
  // Expert 1 has the lower logit but a bias that lifts it above expert 0: it is chosen, and its
  // weight comes from its unbiased score.
  const std::vector<float> logits = {1.0f, 0.5f, -3.0f, -3.0f};
  const lr::sigmoid_grouped<groups<1>, top_groups<1>, top_k<1>> router(std::vector<float>{0.0f, 0.5f, 0.0f, 0.0f}, 2.0f,
                                                                       false);
  const auto r = router.route(lr::logits_view<experts<4>>(logits.data(), 1));
  BOOST_TEST(r.view().expert(0, 0) == 1);
  BOOST_TEST(std::abs(r.view().weight(0, 0) - 2.0 / (1.0 + std::exp(-0.5))) < 1e-6);
}

// --- sigmoid top-1 ------------------------------------------------------------------------------

template <std::size_t E, class T>
void check_top1(std::size_t tokens, unsigned seed) {
  const auto logits = random_logits<T>(tokens * E, seed);
  const auto r = lr::sigmoid_top1().route(lr::logits_view<experts<E>, const T>(logits.data(), tokens), 3);
  expect_matches(
      r.view(), tokens, 1,
      [&](std::size_t t) {
        std::vector<double> l(E);
        for (std::size_t e = 0; e < E; ++e)
          l[e] = value_of(logits[t * E + e]);
        const int best = order_by(l)[0];
        return reference_token{{best}, {1.0 / (1.0 + std::exp(-l[best]))}};
      },
      "top1 E=" + std::to_string(E));
}

BOOST_AUTO_TEST_CASE(sigmoid_top1_matches_reference) {
  check_top1<128, float>(2000, 41); // Llama 4 Maverick
  check_top1<16, float>(2000, 42);  // Llama 4 Scout
  check_top1<128, bfloat16>(2000, 43);
  const std::vector<float> tie = {0, 4, 1, 4};
  const auto r = lr::sigmoid_top1().route(lr::logits_view<experts<4>>(tie.data(), 1));
  BOOST_TEST(r.view().expert(0, 0) == 1);
}

// --- extents, threads, errors -------------------------------------------------------------------

template <class A, class B>
void expect_identical(const A& a, const B& b) {
  BOOST_TEST(a.ids() == b.ids());
  BOOST_TEST(a.weights() == b.weights());
}

BOOST_AUTO_TEST_CASE(dynamic_extents_give_the_static_results) {
  const std::size_t tokens = 700;
  const auto logits = random_logits<float>(tokens * 256, 51);
  const auto bias = random_bias(256, 52);
  {
    const auto s = lr::softmax_topk<top_k<6>>(6, false).route(lr::logits_view<experts<64>>(logits.data(), tokens));
    const auto d = lr::softmax_topk<>(6, false).route(lr::logits_view<>(logits.data(), tokens, experts<>(64)));
    expect_identical(s, d);
  }
  {
    const lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>> st(bias, 2.5f);
    const lr::sigmoid_grouped<> dy(8, 4, 8, bias, 2.5f);
    const auto s = st.route(lr::logits_view<experts<256>>(logits.data(), tokens));
    const auto d = dy.route(lr::logits_view<>(logits.data(), tokens, experts<>(256)));
    expect_identical(s, d);
    // Mixed: static groups, dynamic k and experts.
    const lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<>> mixed(8, 4, 8, bias, 2.5f);
    expect_identical(s, mixed.route(lr::logits_view<>(logits.data(), tokens, experts<>(256))));
  }
  {
    const auto s = lr::sigmoid_top1().route(lr::logits_view<experts<128>>(logits.data(), tokens));
    const auto d = lr::sigmoid_top1().route(lr::logits_view<>(logits.data(), tokens, experts<>(128)));
    expect_identical(s, d);
  }
}

BOOST_AUTO_TEST_CASE(results_do_not_depend_on_the_thread_count) {
  const std::size_t tokens = 3000;
  const auto logits = random_logits<float>(tokens * 64, 61);
  const lr::softmax_topk<top_k<6>> router;
  const lr::logits_view<experts<64>> view(logits.data(), tokens);
  expect_identical(router.route(view, 1), router.route(view, 4));
}

BOOST_AUTO_TEST_CASE(non_finite_logits_raise_naming_token_and_expert) {
  const std::size_t tokens = 2000;
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    auto logits = random_logits<float>(tokens * 64, 71);
    logits[1500 * 64 + 9] = bad;
    logits[1234 * 64 + 17] = bad; // the lowest bad token is reported, whatever the threads
    const lr::logits_view<experts<64>> view(logits.data(), tokens);
    const auto expect = [&](auto&& call) {
      try {
        call();
        BOOST_ERROR("no exception for logit " << bad);
      } catch (const invalid_input_error& e) {
        BOOST_TEST(std::string(e.what()).find("token 1234, expert 17") != std::string::npos, e.what());
      }
    };
    expect([&] { (void)lr::softmax_topk<top_k<2>>().route(view, 4); });
    expect([&] { (void)lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>>().route(view, 4); });
    expect([&] { (void)lr::sigmoid_top1().route(view, 4); });
  }
  std::vector<bfloat16> b(8, bfloat16(0.0f));
  b[3] = bfloat16::from_bits(0x7fc0); // NaN
  BOOST_CHECK_THROW((void)lr::softmax_topk<top_k<2>>().route(lr::logits_view<experts<8>, const bfloat16>(b.data(), 1)),
                    invalid_input_error);
}

BOOST_AUTO_TEST_CASE(invalid_configurations_are_rejected) {
  std::vector<float> logits(8 * 10, 0.0f);
  const lr::logits_view<> view(logits.data(), 10, experts<>(8));
  BOOST_CHECK_THROW((void)lr::softmax_topk<>(9).route(view), config_error);
  BOOST_CHECK_THROW(lr::softmax_topk<top_k<2>>(3), config_error);
  BOOST_CHECK_THROW(lr::softmax_topk<>(0), config_error);
  routing<top_k<>> wrong(9, top_k<>(2));
  BOOST_CHECK_THROW(lr::softmax_topk<>(2).route(view, wrong.view()), invalid_input_error);
  routing<top_k<>> wrong_k(10, top_k<>(3));
  BOOST_CHECK_THROW(lr::softmax_topk<>(2).route(view, wrong_k.view()), invalid_input_error);
  BOOST_CHECK_THROW((void)lr::sigmoid_grouped<>(3, 1, 2).route(view), config_error);         // 8 experts / 3 groups
  BOOST_CHECK_THROW((void)lr::sigmoid_grouped<>(8, 2, 2).route(view), config_error);         // groups of 1
  BOOST_CHECK_THROW((void)lr::sigmoid_grouped<>(4, 1, 3).route(view), config_error);         // k > kept experts
  BOOST_CHECK_THROW((void)lr::sigmoid_grouped<>(2, 1, 2, {1, 2}).route(view), config_error); // bias size
  BOOST_CHECK_THROW(lr::sigmoid_grouped<>(2, 3, 2), config_error);
  BOOST_CHECK_THROW(lr::sigmoid_grouped<>(2, 1, 2, {0, std::nanf(""), 0, 0}), config_error);
  BOOST_CHECK_THROW(lr::sigmoid_grouped<>(2, 1, 2, {}, std::numeric_limits<float>::infinity()), config_error);
  BOOST_CHECK_THROW((void)lr::sigmoid_top1().route(lr::logits_view<>(nullptr, 3, experts<>(8))), invalid_input_error);
  // Zero tokens are fine.
  BOOST_TEST(lr::sigmoid_top1().route(lr::logits_view<>(nullptr, 0, experts<>(8))).tokens() == 0u);
}

// The warp kernels' selection (tests/cuda/test_router_kernels.cu runs them) reduces order_key
// words instead of (value, id) pairs: the key must order every non-NaN float as `better` orders
// values, and give it back.
BOOST_AUTO_TEST_CASE(order_keys_order_floats_as_the_selection_does) {
  namespace dr = detail::router;
  constexpr float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {-inf,
                          -std::numeric_limits<float>::max(),
                          -1.5f,
                          -std::numeric_limits<float>::min(),
                          -std::numeric_limits<float>::denorm_min(),
                          -0.0f,
                          0.0f,
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::min(),
                          1.0f,
                          1.0f + std::numeric_limits<float>::epsilon(),
                          std::numeric_limits<float>::max(),
                          inf};
  std::mt19937 rng(5);
  while (v.size() < 3000) {
    const float x = dr::bits_to_float(static_cast<std::uint32_t>(rng()));
    if (!std::isnan(x)) v.push_back(x);
  }
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    const auto ki = dr::order_key(v[i]);
    if (ki == 0) ++wrong; // 0 is reserved for "not a candidate"
    const float back = dr::key_value(ki);
    if (dr::float_to_bits(back) != dr::float_to_bits(v[i] == 0.0f ? 0.0f : v[i])) ++wrong;
    for (std::size_t j = 0; j < v.size(); j += 7) {
      const auto kj = dr::order_key(v[j]);
      if ((v[i] > v[j]) != (ki > kj) || (v[i] == v[j]) != (ki == kj)) ++wrong;
    }
  }
  BOOST_TEST(wrong == 0u);
}

// The warp kernel's group score: each lane pushes its values into a top-2 pair, then the group's
// lanes merge pairs in a butterfly. Every lane must end with the two values the host's top2_sum
// adds, duplicates counted, whatever the split.
BOOST_AUTO_TEST_CASE(top2_pairs_merged_in_a_butterfly_give_the_hosts_group_score) {
  namespace dr = detail::router;
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> pick(-3, 3); // few distinct values: many ties
  std::size_t wrong = 0, cases = 0;
  for (const std::size_t size : {2u, 4u, 8u, 32u, 64u})
    for (std::size_t lanes = 1; lanes <= size && lanes <= 32; lanes *= 2)
      for (int trial = 0; trial < 50; ++trial, ++cases) {
        std::vector<float> group(size);
        for (auto& x : group)
          x = trial % 2 ? static_cast<float>(pick(rng)) : std::ldexp(static_cast<float>(rng() % 1000), -7);
        const float expected = dr::top2_sum(group.data(), size);
        const std::size_t per_lane = size / lanes;
        std::vector<float> m1(lanes, -std::numeric_limits<float>::infinity()), m2 = m1;
        for (std::size_t l = 0; l < lanes; ++l)
          for (std::size_t v = 0; v < per_lane; ++v)
            dr::top2_push(m1[l], m2[l], group[l * per_lane + v]);
        for (std::size_t offset = 1; offset < lanes; offset *= 2) {
          const auto o1 = m1, o2 = m2; // every lane reads its partner's pair before any writes
          for (std::size_t l = 0; l < lanes; ++l)
            dr::top2_merge(m1[l], m2[l], o1[l ^ offset], o2[l ^ offset]);
        }
        for (std::size_t l = 0; l < lanes; ++l)
          if (dr::fadd(m1[l], m2[l]) != expected) ++wrong;
      }
  BOOST_TEST(cases > 0u);
  BOOST_TEST(wrong == 0u);
}

} // namespace
