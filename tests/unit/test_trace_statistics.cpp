#define BOOST_TEST_MODULE trace_statistics
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <filesystem>
#include <locus/trace/esft.hpp>
#include <locus/trace/statistics.hpp>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace locus::trace;
using locus::invalid_input_error;

namespace {

const std::string esft_dir = std::string(LOCUS_SHARED_DIR) + "/traces/esft";

//! ESFT imported once for the whole executable; nullptr when the data is absent.
const trace* esft() {
  static std::optional<trace> t;
  static bool tried = false;
  if (!tried) {
    tried = true;
    if (std::filesystem::is_directory(esft_dir)) t = import_esft(esft_dir);
  }
  return t ? &*t : nullptr;
}

#define REQUIRE_ESFT()                                                                                                 \
  if (!esft()) {                                                                                                       \
    BOOST_TEST_MESSAGE("skipped: ESFT traces not found at " << esft_dir);                                              \
    return;                                                                                                            \
  }

// Brute-force references, written from the definitions and sharing nothing with the library.

//! Loads of one layer by walking request by request and token by token into a std::map.
std::vector<double> brute_load(const trace& t, std::size_t l, std::optional<phase> only = {}) {
  std::map<int, long> m;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto v = t.request_layer(r, l);
    for (std::size_t i = 0; i < v.tokens(); ++i) {
      if (only && t.token_phase(t.request(r).first_token + i) != *only) continue;
      for (std::size_t j = 0; j < v.top_k(); ++j)
        ++m[static_cast<int>(v.expert(i, j))];
    }
  }
  std::vector<double> out(t.experts(), 0.0);
  for (auto [e, c] : m)
    out[static_cast<std::size_t>(e)] = static_cast<double>(c);
  return out;
}

//! Gini from the mean absolute difference: Σ_i Σ_j |x_i − x_j| / (2 n² μ).
double brute_gini(const std::vector<double>& x) {
  double s = 0.0, sum = 0.0;
  for (double a : x) {
    sum += a;
    for (double b : x)
      s += std::fabs(a - b);
  }
  const double n = static_cast<double>(x.size());
  return s / (2.0 * n * n * (sum / n));
}
double brute_max_over_mean(const std::vector<double>& x) {
  double mx = 0.0, sum = 0.0;
  for (double a : x)
    mx = std::max(mx, a), sum += a;
  return mx / (sum / static_cast<double>(x.size()));
}
double brute_cv(const std::vector<double>& x) {
  const double n = static_cast<double>(x.size());
  double sum = 0.0, sq = 0.0;
  for (double a : x)
    sum += a, sq += a * a;
  const double mean = sum / n;
  return std::sqrt(sq / n - mean * mean) / mean;
}

//! JS divergence through the entropy identity JS = H(m) − (H(p) + H(q))/2, in bits.
double brute_js(std::vector<double> p, std::vector<double> q) {
  double sp = 0, sq = 0;
  for (auto v : p)
    sp += v;
  for (auto v : q)
    sq += v;
  auto h = [](const std::vector<double>& v) {
    double s = 0;
    for (auto x : v)
      if (x > 0) s -= x * std::log2(x);
    return s;
  };
  std::vector<double> m(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    p[i] /= sp;
    q[i] /= sq;
    m[i] = 0.5 * (p[i] + q[i]);
  }
  return h(m) - 0.5 * (h(p) + h(q));
}

//! Builds a trace with k = 1 (or more) from explicit per-token id lists.
struct hand_request {
  std::uint32_t domain;
  std::vector<std::vector<trace_expert_id>> tokens; // per token, k ids (same at every layer)
};
trace hand_trace(std::size_t experts, std::size_t k, std::size_t layers, const std::vector<std::string>& domains,
                 const std::vector<hand_request>& reqs) {
  trace_builder b(experts, k, layers);
  b.set_domains(domains);
  for (std::size_t r = 0; r < reqs.size(); ++r) {
    const auto q = b.add_request(100 + r, reqs[r].domain, reqs[r].tokens.size());
    for (std::size_t i = 0; i < reqs[r].tokens.size(); ++i)
      for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t j = 0; j < k; ++j) {
          b.ids(l, b.tokens() - reqs[r].tokens.size() + i)[j] = reqs[r].tokens[i][j];
          b.weights(l, b.tokens() - reqs[r].tokens.size() + i)[j] = 0.5f;
        }
    (void)q;
  }
  return b.build();
}

trace random_trace(std::uint32_t seed, std::size_t requests, std::size_t experts, std::size_t k, std::size_t layers) {
  std::mt19937 rng(seed);
  trace_builder b(experts, k, layers);
  b.set_domains({"a", "b", "c"});
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(r, static_cast<std::uint32_t>(rng() % 3), 1 + rng() % 40);
  std::vector<trace_expert_id> pool(experts);
  for (std::size_t t = 0; t < b.tokens(); ++t)
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t e = 0; e < experts; ++e)
        pool[e] = static_cast<trace_expert_id>(e);
      for (std::size_t j = 0; j < k; ++j) {
        // Skewed: low ids are likelier, so that loads are unequal.
        const std::size_t pick = j + (rng() % (experts - j)) * (rng() % (experts - j)) / (experts - j);
        std::swap(pool[j], pool[pick]);
        b.ids(l, t)[j] = pool[j];
        b.weights(l, t)[j] = 0.25f;
      }
    }
  return b.build().with_prefill_tokens(8);
}

} // namespace

BOOST_AUTO_TEST_CASE(imbalance_of_hand_built_vectors) {
  // Uniform: balanced.
  auto u = compute_imbalance(std::vector<int>{5, 5, 5, 5});
  BOOST_TEST(u.max_over_mean == 1.0);
  BOOST_TEST(u.cv == 0.0);
  BOOST_TEST(u.gini == 0.0);
  // Everything on one of n: max/mean = n, Gini = (n-1)/n, CV = sqrt(n-1).
  auto one = compute_imbalance(std::vector<int>{0, 0, 12, 0});
  BOOST_TEST(one.max_over_mean == 4.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(one.gini == 0.75, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(one.cv == std::sqrt(3.0), boost::test_tools::tolerance(1e-12));
  // (1, 2, 3, 4): mean 2.5, Gini = Σ|xi-xj| / (2 n² μ) = 20 / 80 = 0.25, CV = sqrt(1.25)/2.5.
  auto lin = compute_imbalance(std::vector<double>{4, 1, 3, 2});
  BOOST_TEST(lin.gini == 0.25, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lin.max_over_mean == 1.6, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lin.cv == std::sqrt(1.25) / 2.5, boost::test_tools::tolerance(1e-12));
  // All zero: reported balanced.
  auto z = compute_imbalance(std::vector<int>{0, 0});
  BOOST_TEST(z.max_over_mean == 1.0);
  BOOST_TEST(z.gini == 0.0);
  BOOST_CHECK_THROW(compute_imbalance(std::vector<double>{}), invalid_input_error);
  BOOST_CHECK_THROW(compute_imbalance(std::vector<double>{1.0, -1.0}), invalid_input_error);
  BOOST_CHECK_THROW(compute_imbalance(std::vector<double>{1.0, NAN}), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(js_divergence_of_hand_built_distributions) {
  BOOST_TEST(js_divergence(std::vector<double>{1, 0}, std::vector<double>{0, 1}) == 1.0,
             boost::test_tools::tolerance(1e-12));
  BOOST_TEST(js_divergence(std::vector<double>{0.2, 0.8}, std::vector<double>{2, 8}) == 0.0,
             boost::test_tools::tolerance(1e-12));
  // p = (1, 0), q = (½, ½): H(¾, ¼) − ½ = 0.311278...
  const double expect = -(0.75 * std::log2(0.75) + 0.25 * std::log2(0.25)) - 0.5;
  BOOST_TEST(js_divergence(std::vector<double>{1, 0}, std::vector<double>{0.5, 0.5}) == expect,
             boost::test_tools::tolerance(1e-12));
  std::mt19937 rng(5);
  for (int rep = 0; rep < 20; ++rep) {
    std::vector<double> p(17), q(17);
    for (auto& v : p)
      v = (rng() % 4 == 0) ? 0.0 : std::uniform_real_distribution<double>(0, 3)(rng);
    for (auto& v : q)
      v = (rng() % 4 == 0) ? 0.0 : std::uniform_real_distribution<double>(0, 3)(rng);
    p[0] = q[1] = 1.0;
    BOOST_TEST(js_divergence(p, q) == brute_js(p, q), boost::test_tools::tolerance(1e-9));
  }
  BOOST_CHECK_THROW(js_divergence(std::vector<double>{1}, std::vector<double>{1, 2}), invalid_input_error);
  BOOST_CHECK_THROW(js_divergence(std::vector<double>{0, 0}, std::vector<double>{1, 2}), invalid_input_error);
  // Finite entries summing past the largest double: the divergence of their shares (an infinite
  // sum made p's shares all 0, which gave 0.5 here).
  BOOST_TEST(js_divergence(std::vector<double>{1.5e308, 0.5e308, 0}, std::vector<double>{1, 0, 1}) ==
                 js_divergence(std::vector<double>{3, 1, 0}, std::vector<double>{1, 0, 1}),
             boost::test_tools::tolerance(1e-12));
}

BOOST_AUTO_TEST_CASE(pearson_of_hand_built_vectors) {
  BOOST_TEST(
      pearson(std::span<const int>(std::vector<int>{1, 2, 3}), std::span<const int>(std::vector<int>{2, 4, 6})) == 1.0,
      boost::test_tools::tolerance(1e-12));
  const std::vector<double> a{1, 2, 3, 4}, b{1, 3, 2, 4};
  // Deviations (−1.5, −.5, .5, 1.5) and (−1.5, .5, −.5, 1.5): Σxy = 4, Σx² = Σy² = 5, r = 0.8.
  BOOST_TEST(pearson(std::span<const double>(a), std::span<const double>(b)) == 0.8,
             boost::test_tools::tolerance(1e-12));
  const std::vector<double> c{3, 3, 3, 3};
  BOOST_TEST(std::isnan(pearson(std::span<const double>(a), std::span<const double>(c))));
}

BOOST_AUTO_TEST_CASE(prefill_decode_correlation_hand_built) {
  // 4 experts, k = 1, 1 layer; prefill = first 3 tokens.
  //  r0: prefill 0,0,1 → a = (2,1,0,0); decode 0,0,0,0,1,1 → b = (4,2,0,0) = 2a: r = 1.
  //  r1: prefill 0,0,1 → a = (2,1,0,0); decode 1,2,2,3,3 → b = (0,1,2,2) = 2 − a: r = −1.
  //  r2: prefill tokens only (no decode part): undefined.
  //  r3: prefill 0,1,2 then decode 3 → a = (1,1,1,0), b = (0,0,0,1): r = −1.
  std::vector<hand_request> reqs = {
      {0, {{0}, {0}, {1}, {0}, {0}, {0}, {0}, {1}, {1}}},
      {0, {{0}, {0}, {1}, {1}, {2}, {2}, {3}, {3}}},
      {1, {{0}, {1}, {2}}},
      {1, {{0}, {1}, {2}, {3}}},
  };
  const auto t = hand_trace(4, 1, 1, {"x", "y"}, reqs).with_prefill_tokens(3);
  const auto c = compute_prefill_decode_correlation(t);
  BOOST_TEST(c.at(0, 0) == 1.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(c.at(1, 0) == -1.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(std::isnan(c.at(2, 0)));
  BOOST_TEST(c.at(3, 0) == -1.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(c.defined[0] == 3u);
  BOOST_TEST(c.mean[0] == -1.0 / 3.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(c.median[0] == -1.0, boost::test_tools::tolerance(1e-12));

  // A constant prefill count vector: 2 experts, k = 1, prefill 0,1 → (1,1): undefined.
  const auto t2 = hand_trace(2, 1, 1, {"x"}, {{0, {{0}, {1}, {0}}}}).with_prefill_tokens(2);
  const auto c2 = compute_prefill_decode_correlation(t2);
  BOOST_TEST(std::isnan(c2.at(0, 0)));
  BOOST_TEST(c2.defined[0] == 0u);
  BOOST_TEST(std::isnan(c2.mean[0]));
}

BOOST_AUTO_TEST_CASE(loads_popularity_and_divergence_match_brute_force) {
  const auto t = random_trace(11, 60, 24, 4, 3);
  for (unsigned threads : {1u, 3u}) {
    const auto load = compute_expert_load(t, token_filter::all, threads);
    const auto pre = compute_expert_load(t, token_filter::prefill, threads);
    const auto dec = compute_expert_load(t, token_filter::decode, threads);
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const auto ref = brute_load(t, l), ref_p = brute_load(t, l, phase::prefill),
                 ref_d = brute_load(t, l, phase::decode);
      for (std::size_t e = 0; e < t.experts(); ++e) {
        BOOST_TEST(static_cast<double>(load.count(l, e)) == ref[e]);
        BOOST_TEST(static_cast<double>(pre.count(l, e)) == ref_p[e]);
        BOOST_TEST(static_cast<double>(dec.count(l, e)) == ref_d[e]);
      }
    }
    const auto pop = compute_domain_popularity(t, token_filter::all, threads);
    const auto div = compute_domain_divergence(pop);
    for (std::uint32_t d = 0; d < 3; ++d) {
      const auto sub = t.select_domain(d);
      BOOST_TEST(pop.requests[d] == sub.requests());
      BOOST_TEST(pop.tokens[d] == sub.tokens());
      for (std::size_t l = 0; l < t.layers(); ++l) {
        const auto ref = brute_load(sub, l);
        for (std::size_t e = 0; e < t.experts(); ++e)
          BOOST_TEST(pop.row(d, l)[e] == ref[e] / static_cast<double>(sub.tokens() * t.top_k()),
                     boost::test_tools::tolerance(1e-12));
      }
    }
    for (std::size_t l = 0; l < t.layers(); ++l)
      for (std::uint32_t a = 0; a < 3; ++a)
        for (std::uint32_t b = 0; b < 3; ++b)
          BOOST_TEST(div.at(l, a, b) == brute_js(brute_load(t.select_domain(a), l), brute_load(t.select_domain(b), l)),
                     boost::test_tools::tolerance(1e-9));
  }
}

BOOST_AUTO_TEST_CASE(correlation_matches_brute_force_on_random_trace) {
  const auto t = random_trace(12, 40, 16, 3, 2);
  const auto c = compute_prefill_decode_correlation(t, 2);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto one = t.select_requests(std::vector<std::size_t>{r});
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const auto a = brute_load(one, l, phase::prefill), b = brute_load(one, l, phase::decode);
      // Independent Pearson: via E[xy] − E[x]E[y] over the experts.
      const double n = static_cast<double>(a.size());
      double sa = 0, sb = 0, sab = 0, saa = 0, sbb = 0;
      for (std::size_t i = 0; i < a.size(); ++i)
        sa += a[i], sb += b[i], sab += a[i] * b[i], saa += a[i] * a[i], sbb += b[i] * b[i];
      const double cov = sab / n - sa * sb / n / n, va = saa / n - sa * sa / n / n, vb = sbb / n - sb * sb / n / n;
      if (va < 1e-12 || vb < 1e-12) {
        BOOST_TEST(std::isnan(c.at(r, l)));
      } else {
        BOOST_TEST(c.at(r, l) == cov / std::sqrt(va * vb), boost::test_tools::tolerance(1e-9));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(coactivation_and_transitions_match_brute_force) {
  const auto t = random_trace(13, 30, 12, 3, 3);
  const auto co = compute_coactivation_all(t, token_filter::all, 2);
  const auto tr = compute_transitions_all(t, token_filter::all, 2);
  BOOST_TEST(tr.size() == 2u);
  for (std::size_t l = 0; l < t.layers(); ++l) {
    std::map<std::pair<int, int>, long> ref, ref_tr;
    for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
      std::set<int> s;
      for (std::size_t j = 0; j < t.top_k(); ++j)
        s.insert(t.layer(l).expert(tok, j));
      for (int a : s)
        for (int b : s)
          ++ref[{a, b}];
      if (l + 1 < t.layers())
        for (std::size_t x = 0; x < t.top_k(); ++x)
          for (std::size_t y = 0; y < t.top_k(); ++y)
            ++ref_tr[{t.layer(l).expert(tok, x), t.layer(l + 1).expert(tok, y)}];
    }
    for (std::size_t i = 0; i < t.experts(); ++i)
      for (std::size_t j = 0; j < t.experts(); ++j) {
        const std::pair<int, int> key{static_cast<int>(i), static_cast<int>(j)};
        BOOST_TEST(co[l].at(i, j) == static_cast<std::uint64_t>(ref.count(key) ? ref[key] : 0));
        if (l + 1 < t.layers())
          BOOST_TEST(tr[l].at(i, j) == static_cast<std::uint64_t>(ref_tr.count(key) ? ref_tr[key] : 0));
      }
  }
  BOOST_CHECK_THROW(compute_transition(t, 2), invalid_input_error);
  try { // l + 1 wraps to 0 for l = 2^64 - 1
    (void)compute_transition(t, ~std::size_t{0});
    BOOST_ERROR("compute_transition accepted layer 2^64 - 1");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message().find("compute_transition: layer 18446744073709551615 has no next layer") == 0u);
  }
  BOOST_CHECK_THROW(compute_coactivation(t, 3), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(request_signatures_match_brute_force) {
  const auto t = random_trace(14, 25, 10, 2, 4);
  signature_options opt;
  opt.layers = {3, 1};
  opt.tokens = token_filter::prefill;
  const auto s = compute_request_signatures(t, opt);
  BOOST_TEST(s.dimension() == 20u);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto one = t.select_requests(std::vector<std::size_t>{r});
    for (std::size_t b = 0; b < 2; ++b) {
      const auto c = brute_load(one, opt.layers[b], phase::prefill);
      double norm = 0;
      for (double v : c)
        norm += v * v;
      norm = std::sqrt(norm);
      for (std::size_t e = 0; e < t.experts(); ++e)
        BOOST_TEST(s.row(r)[b * 10 + e] == (norm > 0 ? c[e] / norm : 0.0), boost::test_tools::tolerance(1e-6));
    }
    const auto single = compute_request_signature(t, r, opt);
    BOOST_TEST(std::vector<float>(s.row(r).begin(), s.row(r).end()) == single, boost::test_tools::per_element());
  }
  opt.layers = {4};
  BOOST_CHECK_THROW(compute_request_signatures(t, opt), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(esft_counts_and_imbalance_by_brute_force) {
  REQUIRE_ESFT();
  const trace& t = *esft();
  const auto s = compute_statistics(t.with_prefill_tokens(32), {false, false, 0});
  BOOST_TEST(s.requests == 173u);
  BOOST_TEST(s.layers == 26u);
  BOOST_TEST(s.experts == 64u);
  BOOST_TEST(s.top_k == 6u);
  const std::vector<std::string> names{"intent", "law", "summary"};
  BOOST_TEST(s.domain_names == names, boost::test_tools::per_element());
  const std::vector<std::uint64_t> req{127, 33, 13}, tok{8222, 8327, 8479};
  BOOST_TEST(s.popularity.requests == req, boost::test_tools::per_element());
  BOOST_TEST(s.popularity.tokens == tok, boost::test_tools::per_element());
  for (std::size_t l : {0u, 7u, 25u}) {
    const auto ref = brute_load(t, l);
    BOOST_TEST(s.layer_imbalance[l].max_over_mean == brute_max_over_mean(ref), boost::test_tools::tolerance(1e-12));
    BOOST_TEST(s.layer_imbalance[l].gini == brute_gini(ref), boost::test_tools::tolerance(1e-12));
    BOOST_TEST(s.layer_imbalance[l].cv == brute_cv(ref), boost::test_tools::tolerance(1e-9));
    BOOST_TEST(s.layer_imbalance[l].max_over_mean > 1.2); // real routing is measurably skewed
  }
  // Domains differ: a domain is closer to itself split in halves than to another domain.
  for (std::size_t l : {0u, 12u, 25u})
    BOOST_TEST(s.divergence.at(l, 0, 1) > 0.01);
  // Prefill predicts decode on real traces (the premise of workload-aware grouping).
  BOOST_TEST(s.correlation.overall_mean() > 0.3);
}
