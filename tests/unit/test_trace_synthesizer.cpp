#define BOOST_TEST_MODULE trace_synthesizer
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <filesystem>
#include <locus/trace/esft.hpp>
#include <locus/trace/synthesizer.hpp>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

using namespace locus::trace;
using locus::config_error;
using locus::invalid_input_error;

namespace {

const std::string esft_dir = std::string(LOCUS_SHARED_DIR) + "/traces/esft";

// Statistics recomputed here from the definitions (std::map counting), independent of
// statistics.hpp, so that a fault there cannot hide a fault in the synthesizer.

//! share[d][l][e]: choices of expert e at layer l by domain d's tokens / (its tokens × k).
std::vector<std::vector<std::vector<double>>> ref_popularity(const trace& t) {
  std::vector<std::vector<std::vector<double>>> out(
      t.domains().size(), std::vector<std::vector<double>>(t.layers(), std::vector<double>(t.experts(), 0.0)));
  std::vector<double> tokens(t.domains().size(), 0.0);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto d = t.request(r).domain;
    tokens[d] += t.request(r).length;
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const auto v = t.request_layer(r, l);
      std::map<int, double> m;
      for (std::size_t i = 0; i < v.tokens(); ++i)
        for (std::size_t j = 0; j < v.top_k(); ++j)
          m[v.expert(i, j)] += 1.0;
      for (auto [e, c] : m)
        out[d][l][static_cast<std::size_t>(e)] += c;
    }
  }
  for (std::size_t d = 0; d < out.size(); ++d)
    for (auto& row : out[d])
      for (auto& v : row)
        v /= std::max(1.0, tokens[d] * static_cast<double>(t.top_k()));
  return out;
}

double ref_js(std::vector<double> p, std::vector<double> q) {
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
  for (std::size_t i = 0; i < p.size(); ++i)
    p[i] /= sp, q[i] /= sq, m[i] = 0.5 * (p[i] + q[i]);
  return h(m) - 0.5 * (h(p) + h(q));
}

//! Gini of the total per-layer load, mean over layers (mean-absolute-difference form).
double ref_mean_gini(const trace& t) {
  double total = 0;
  for (std::size_t l = 0; l < t.layers(); ++l) {
    std::vector<double> x(t.experts(), 0.0);
    for (std::size_t i = 0; i < t.tokens() * t.top_k(); ++i)
      x[t.layer(l).ids()[i]] += 1.0;
    double s = 0, sum = 0;
    for (double a : x) {
      sum += a;
      for (double b : x)
        s += std::fabs(a - b);
    }
    const double n = static_cast<double>(x.size());
    total += s / (2.0 * n * n * (sum / n));
  }
  return total / static_cast<double>(t.layers());
}

//! Mean max/mean over layers.
double ref_mean_max_over_mean(const trace& t) {
  double total = 0;
  for (std::size_t l = 0; l < t.layers(); ++l) {
    std::vector<double> x(t.experts(), 0.0);
    for (std::size_t i = 0; i < t.tokens() * t.top_k(); ++i)
      x[t.layer(l).ids()[i]] += 1.0;
    double mx = 0, sum = 0;
    for (double a : x)
      mx = std::max(mx, a), sum += a;
    total += mx / (sum / static_cast<double>(x.size()));
  }
  return total / static_cast<double>(t.layers());
}

//! Mean over defined (request, layer) of Pearson(prefill counts, decode counts), via
//! E[xy] − E[x]E[y].
double ref_mean_correlation(const trace& t) {
  double sum = 0;
  std::size_t n = 0;
  for (std::size_t r = 0; r < t.requests(); ++r)
    for (std::size_t l = 0; l < t.layers(); ++l) {
      std::vector<double> a(t.experts(), 0.0), b(t.experts(), 0.0);
      const auto v = t.request_layer(r, l);
      for (std::size_t i = 0; i < v.tokens(); ++i) {
        auto& c = t.token_phase(t.request(r).first_token + i) == phase::prefill ? a : b;
        for (std::size_t j = 0; j < v.top_k(); ++j)
          c[v.expert(i, j)] += 1.0;
      }
      const double m = static_cast<double>(a.size());
      double sa = 0, sb = 0, sab = 0, saa = 0, sbb = 0;
      for (std::size_t i = 0; i < a.size(); ++i)
        sa += a[i], sb += b[i], sab += a[i] * b[i], saa += a[i] * a[i], sbb += b[i] * b[i];
      const double va = saa / m - sa * sa / m / m, vb = sbb / m - sb * sb / m / m;
      if (va < 1e-12 || vb < 1e-12) continue;
      sum += (sab / m - sa * sb / m / m) / std::sqrt(va * vb);
      ++n;
    }
  return sum / static_cast<double>(n);
}

//! Share of co-chosen pairs in the same cluster, from std::set per token.
double ref_same_cluster_share(const trace& t, const std::vector<std::uint16_t>& cl) {
  double same = 0, pairs = 0;
  for (std::size_t l = 0; l < t.layers(); ++l)
    for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
      std::set<int> s;
      for (std::size_t j = 0; j < t.top_k(); ++j)
        s.insert(t.layer(l).expert(tok, j));
      std::vector<int> v(s.begin(), s.end());
      for (std::size_t a = 0; a < v.size(); ++a)
        for (std::size_t b = a + 1; b < v.size(); ++b) {
          same += cl[l * t.experts() + v[a]] == cl[l * t.experts() + v[b]] ? 1 : 0;
          pairs += 1;
        }
    }
  return same / pairs;
}

//! Mean over domains and layers of JS(real popularity, synthetic popularity).
double mean_popularity_js(const trace& a, const trace& b) {
  const auto pa = ref_popularity(a), pb = ref_popularity(b);
  double s = 0;
  std::size_t n = 0;
  for (std::size_t d = 0; d < pa.size(); ++d)
    for (std::size_t l = 0; l < pa[d].size(); ++l)
      s += ref_js(pa[d][l], pb[d][l]), ++n;
  return s / static_cast<double>(n);
}

double mean_domain_js(const trace& t) {
  const auto p = ref_popularity(t);
  double s = 0;
  std::size_t n = 0;
  for (std::size_t l = 0; l < t.layers(); ++l)
    for (std::size_t a = 0; a < p.size(); ++a)
      for (std::size_t b = a + 1; b < p.size(); ++b)
        s += ref_js(p[a][l], p[b][l]), ++n;
  return s / static_cast<double>(n);
}

void check_well_formed(const trace& t, std::size_t prefill) {
  for (std::size_t l = 0; l < t.layers(); ++l)
    for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
      std::set<int> s;
      for (std::size_t j = 0; j < t.top_k(); ++j)
        s.insert(t.layer(l).expert(tok, j));
      BOOST_REQUIRE_EQUAL(s.size(), t.top_k()); // distinct experts per token
    }
  for (std::size_t r = 0; r < t.requests(); ++r)
    for (std::size_t i = 0; i < t.request(r).length; ++i) {
      const auto tok = t.request(r).first_token + i;
      BOOST_REQUIRE(t.token_phase(tok) == (i < prefill ? phase::prefill : phase::decode));
      BOOST_REQUIRE_EQUAL(t.token_step(tok), i < prefill ? -1 : static_cast<std::int32_t>(i - prefill));
    }
}

synth_shape small_shape() {
  synth_shape sh;
  sh.experts = 32;
  sh.top_k = 4;
  sh.layers = 4;
  sh.domains = 3;
  sh.clusters = 4;
  sh.length_log_mean = 4.0;
  sh.length_log_sigma = 0.5;
  sh.prefill_tokens = 16;
  return sh;
}

trace draw(const synth_model& m, std::size_t requests, std::uint64_t seed, unsigned threads = 0) {
  sample_options o;
  o.requests = requests;
  o.seed = seed;
  o.threads = threads;
  return sample(m, o);
}

} // namespace

BOOST_AUTO_TEST_CASE(sampling_is_deterministic_and_well_formed) {
  const auto m = make_synth_model(small_shape());
  const auto a = draw(m, 40, 7, 1), b = draw(m, 40, 7, 3), c = draw(m, 40, 8, 2);
  BOOST_TEST((a == b));
  BOOST_TEST(!(a == c));
  BOOST_TEST(a.experts() == 32u);
  BOOST_TEST(a.top_k() == 4u);
  BOOST_TEST(a.layers() == 4u);
  BOOST_TEST(a.requests() == 40u);
  check_well_formed(a, 16);
  sample_options o;
  o.tokens = 5000;
  const auto t = sample(m, o);
  BOOST_TEST(t.tokens() >= 5000u);
  BOOST_TEST(t.tokens() - t.request(t.requests() - 1).length < 5000u); // stops at the first request past it
}

BOOST_AUTO_TEST_CASE(invalid_models_are_rejected) {
  auto m = make_synth_model(small_shape());
  BOOST_CHECK_THROW(sample(m, {}), config_error);
  auto bad = m;
  bad.domains[1].popularity.pop_back();
  BOOST_CHECK_THROW(bad.validate(), config_error);
  bad = m;
  bad.cluster_of[5] = 9;
  BOOST_CHECK_THROW(bad.validate(), config_error);
  bad = m;
  bad.request_sigma = -1;
  BOOST_CHECK_THROW(draw(bad, 3, 1), config_error);
  bad = m;
  bad.domains[0].popularity[3] = NAN;
  BOOST_CHECK_THROW(bad.validate(), config_error);
  rescale_options ro;
  ro.top_k = 300;
  BOOST_CHECK_THROW(rescale(m, ro), config_error);
  BOOST_CHECK_THROW(fit(trace{}), invalid_input_error);
  // No calibration token: every measured share was 0 / 0, and the NaN weights were refused later
  // as a "negative or not finite" model weight that named neither the option nor calibrate.
  auto c = m;
  BOOST_CHECK_THROW(calibrate(c, 0, 2, 1, 1), config_error);
  BOOST_CHECK_NO_THROW(calibrate(c, 0, 0, 1, 1)); // no round: nothing to measure, nothing changes
  ro = {};
  ro.calibration_tokens = 0;
  BOOST_CHECK_THROW(rescale(m, ro), config_error);
  fit_options fo;
  fo.calibration_tokens = 1;
  fo.threads = 1;
  BOOST_CHECK_THROW(fit(sample(m, {4, 0, 1, 1}), fo), config_error);
}

// Absurd shapes are refused before any table is built (they used to run for seconds to minutes,
// growing gigabytes, before a later check or the trace builder refused them).
BOOST_AUTO_TEST_CASE(absurd_shapes_are_refused_at_once) {
  const auto refuses = [](auto f, const std::string& says) {
    try {
      f();
    } catch (const config_error& e) {
      BOOST_TEST(std::string(e.what()).find(says) != std::string::npos, e.what());
      return;
    }
    BOOST_ERROR("accepted: " << says);
  };
  auto sh = small_shape();
  sh.layers = 100000;
  refuses([&] { (void)make_synth_model(sh); }, "layers is 100000");
  sh = small_shape();
  sh.domains = 100000;
  refuses([&] { (void)make_synth_model(sh); }, "domains is 100000");
  sh = small_shape();
  sh.experts = 65536;
  sh.layers = 4096;
  sh.domains = 2;
  refuses([&] { (void)make_synth_model(sh); }, "table entries");
  rescale_options ro;
  ro.experts = 256;
  ro.top_k = 8;
  ro.layers = 100000;
  refuses([&] { (void)rescale(make_synth_model(small_shape()), ro); }, "layers is 100000");
  BOOST_CHECK_NO_THROW(check_synth_shape("x", 256, 8, 58, 3));
}

BOOST_AUTO_TEST_CASE(structure_is_controllable) {
  auto sh = small_shape();
  // Domains: with shift 0 every domain ranks experts alike, with 1 independently.
  sh.domain_shift = 0.0;
  const double js_same = mean_domain_js(draw(make_synth_model(sh), 150, 1));
  sh.domain_shift = 1.0;
  const double js_apart = mean_domain_js(draw(make_synth_model(sh), 150, 1));
  BOOST_TEST(js_same < 0.03);
  BOOST_TEST(js_apart > 3 * js_same);
  // Skew: Zipf exponent raises the Gini of the load.
  sh = small_shape();
  sh.zipf = 0.2;
  const double g_low = ref_mean_gini(draw(make_synth_model(sh), 100, 2));
  sh.zipf = 1.2;
  const double g_high = ref_mean_gini(draw(make_synth_model(sh), 100, 2));
  BOOST_TEST(g_high > g_low + 0.15);
  // Co-activation clusters.
  sh = small_shape();
  sh.cluster_probability = 0.0;
  auto m0 = make_synth_model(sh);
  const double share0 = ref_same_cluster_share(draw(m0, 80, 3), m0.cluster_of);
  sh.cluster_probability = 0.9;
  auto m1 = make_synth_model(sh);
  const double share1 = ref_same_cluster_share(draw(m1, 80, 3), m1.cluster_of);
  BOOST_TEST(share0 < 0.35); // ≈ 7/31 for 4 random clusters of 8
  BOOST_TEST(share1 > share0 + 0.2);
  // Prefill↔decode correlation: σ raises it, per-segment noise η lowers it.
  sh = small_shape();
  sh.request_sigma = 0.0;
  const double c0 = ref_mean_correlation(draw(make_synth_model(sh), 100, 4));
  sh.request_sigma = 1.5;
  const double c_hi = ref_mean_correlation(draw(make_synth_model(sh), 100, 4));
  sh.request_sigma = 0.0;
  auto ms = make_synth_model(sh);
  ms.segment_sigma = 1.5;
  const double c_lo = ref_mean_correlation(draw(ms, 100, 4));
  BOOST_TEST(c_hi > c0 + 0.1);
  BOOST_TEST(c_lo < c0 - 0.1);
  // Lengths: log-normal with μ = 4, σ = 0.5 has mean e^(μ + σ²/2) ≈ 61.9.
  const auto t = draw(make_synth_model(small_shape()), 2000, 5);
  const double mean_len = static_cast<double>(t.tokens()) / 2000.0;
  BOOST_TEST(mean_len == std::exp(4.0 + 0.125), boost::test_tools::tolerance(0.05));
}

BOOST_AUTO_TEST_CASE(calibration_matches_target_popularity) {
  auto sh = small_shape();
  sh.cluster_probability = 0.8;
  sh.request_sigma = 1.0;
  sh.zipf = 0.9; // top expert share 0.16: top_k × share < 1 keeps the target reachable
  auto m = make_synth_model(sh);
  auto js_to_target = [&](const synth_model& x) {
    const auto p = ref_popularity(draw(x, 600, 9));
    double s = 0;
    for (std::size_t d = 0; d < 3; ++d)
      for (std::size_t l = 0; l < 4; ++l) {
        std::vector<double> target(x.domains[d].popularity.begin() + static_cast<std::ptrdiff_t>(l * 32),
                                   x.domains[d].popularity.begin() + static_cast<std::ptrdiff_t>((l + 1) * 32));
        s += ref_js(p[d][l], target);
      }
    return s / 12;
  };
  const double before = js_to_target(m);
  calibrate(m, 20000, 8, 3);
  const double after = js_to_target(m);
  BOOST_TEST_MESSAGE("JS to target popularity: before " << before << ", after " << after);
  BOOST_TEST(after < 0.005);
  BOOST_TEST(after < before / 2);
}

namespace {
fit_options quick_fit() {
  fit_options o;
  o.prefill_tokens = 32;
  o.calibration_tokens = 4096;
  o.calibration_rounds = 3;
  o.search_steps = 5;
  return o;
}

//! The tolerances fit() promises (documented on fit()).
void check_fit(const trace& real, const synth_model& m, std::uint64_t seed) {
  const auto syn = draw(m, real.requests(), seed);
  const auto marked = real.with_prefill_tokens(32);
  const double js = mean_popularity_js(real, syn);
  const double g_real = ref_mean_gini(real), g_syn = ref_mean_gini(syn);
  const double mm_real = ref_mean_max_over_mean(real), mm_syn = ref_mean_max_over_mean(syn);
  const double c_real = ref_mean_correlation(marked), c_syn = ref_mean_correlation(syn);
  const double s_real = ref_same_cluster_share(real, m.cluster_of), s_syn = ref_same_cluster_share(syn, m.cluster_of);
  BOOST_TEST_MESSAGE("popularity JS " << js << "; Gini " << g_real << " vs " << g_syn << "; max/mean " << mm_real
                                      << " vs " << mm_syn << "; correlation " << c_real << " vs " << c_syn
                                      << "; same-cluster share " << s_real << " vs " << s_syn);
  BOOST_TEST(js < 0.01);
  BOOST_TEST(std::fabs(g_real - g_syn) < 0.03);
  BOOST_TEST(std::fabs(mm_real - mm_syn) / mm_real < 0.1);
  BOOST_TEST(std::fabs(c_real - c_syn) < 0.08);
  BOOST_TEST(std::fabs(s_real - s_syn) < 0.03);
  // Domains keep their identity and share of requests (±15 % of the trace, binomial noise).
  BOOST_TEST(std::fabs(mean_domain_js(real) - mean_domain_js(syn)) < 0.03);
  for (std::uint32_t d = 0; d < real.domains().size(); ++d) {
    double a = 0, b = 0;
    for (const auto& q : real.request_table())
      a += q.domain == d;
    for (const auto& q : syn.request_table())
      b += q.domain == d;
    BOOST_TEST(std::fabs(a - b) / static_cast<double>(real.requests()) < 0.15);
  }
}
} // namespace

BOOST_AUTO_TEST_CASE(fit_recovers_a_known_synthetic_model) {
  auto sh = small_shape();
  sh.request_sigma = 0.8;
  sh.cluster_probability = 0.6;
  sh.zipf = 1.0;
  auto truth = make_synth_model(sh);
  // Its layers as a model's hidden layers 2, 3, ... of L + 3: samples and fits keep the ids.
  for (std::size_t l = 0; l < truth.layers; ++l)
    truth.model_layers.push_back(static_cast<std::uint32_t>(l + 2));
  truth.hidden_layers = static_cast<std::uint32_t>(truth.layers + 3);
  const auto real = draw(truth, 120, 21);
  BOOST_TEST(real.model_layer(0) == 2u);
  BOOST_TEST(real.hidden_layers() == truth.layers + 3);
  auto o = quick_fit();
  o.prefill_tokens = 16;
  o.clusters = 4;
  const auto m = fit(real, o);
  BOOST_TEST(m.model_layers == truth.model_layers, boost::test_tools::per_element());
  BOOST_TEST(m.hidden_layers == truth.hidden_layers);
  rescale_options ro;
  ro.experts = m.experts;
  ro.top_k = m.top_k;
  ro.layers = m.layers + 1;
  ro.calibration_rounds = 0;
  const auto other = rescale(m, ro); // another model's layers: no ids
  BOOST_TEST(other.model_layers.empty());
  BOOST_TEST(!draw(other, 4, 23).has_model_layers());
  BOOST_TEST_MESSAGE("fitted sigma " << m.request_sigma << " eta " << m.segment_sigma << " cluster p "
                                     << m.cluster_probability);
  const auto syn = draw(m, real.requests(), 22);
  BOOST_TEST(mean_popularity_js(real, syn) < 0.02);
  BOOST_TEST(std::fabs(ref_mean_gini(real) - ref_mean_gini(syn)) < 0.03);
  BOOST_TEST(std::fabs(ref_mean_correlation(real) - ref_mean_correlation(syn)) < 0.08);
  BOOST_TEST(std::fabs(ref_same_cluster_share(real, m.cluster_of) - ref_same_cluster_share(syn, m.cluster_of)) < 0.04);
}

BOOST_AUTO_TEST_CASE(fit_to_esft_and_rescale_to_deepseek_v3_shape) {
  if (!std::filesystem::is_directory(esft_dir)) {
    BOOST_TEST_MESSAGE("skipped: ESFT traces not found at " << esft_dir);
    return;
  }
  const auto real = import_esft(esft_dir);
  const auto m = fit(real, quick_fit());
  BOOST_TEST_MESSAGE("fitted sigma " << m.request_sigma << " eta " << m.segment_sigma << " cluster p "
                                     << m.cluster_probability);
  check_fit(real, m, 31);

  rescale_options ro; // 256 experts, top-8, 58 layers
  ro.calibration_tokens = 4096;
  ro.calibration_rounds = 3;
  const auto v3 = rescale(m, ro);
  BOOST_TEST(v3.experts == 256u);
  BOOST_TEST(v3.top_k == 8u);
  BOOST_TEST(v3.layers == 58u);
  sample_options so;
  so.tokens = 20000;
  so.seed = 3;
  const auto big = sample(v3, so);
  BOOST_TEST(big.experts() == 256u);
  for (std::size_t l = 0; l < big.layers(); l += 19)
    for (std::size_t i = 0; i < big.tokens() * 8; ++i)
      BOOST_REQUIRE(big.layer(l).ids()[i] < 256);
  // The rank-frequency shape carries over: Gini within 0.06, domains stay distinct.
  const double g_src = ref_mean_gini(real), g_dst = ref_mean_gini(big);
  const double d_src = mean_domain_js(real), d_dst = mean_domain_js(big);
  BOOST_TEST_MESSAGE("rescaled: Gini " << g_src << " -> " << g_dst << ", domain JS " << d_src << " -> " << d_dst
                                       << ", max/mean " << ref_mean_max_over_mean(real) << " -> "
                                       << ref_mean_max_over_mean(big));
  BOOST_TEST(std::fabs(g_src - g_dst) < 0.06);
  BOOST_TEST(d_dst > 0.5 * d_src);
}
