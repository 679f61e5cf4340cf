#define BOOST_TEST_MODULE planning
#include "../support/error_message.hpp"

#include <array>
#include <atomic>
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/grouper/kmeans.hpp>
#include <locus/grouper/micro_batch.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/eplb.hpp>
#include <random>
#include <set>
#include <thread>

using namespace locus;

namespace {

// Requests of `domains` kinds; kind d routes mostly to its own block of experts (probability
// `affinity`), otherwise uniformly. Prefill = the first `prefill` tokens.
trace::trace domain_trace(std::mt19937& rng, std::size_t requests, std::size_t experts, std::size_t k,
                          std::size_t layers, std::size_t domains, std::size_t prefill, double affinity = 0.8) {
  trace::trace_builder b(experts, k, layers);
  std::vector<std::string> names;
  for (std::size_t d = 0; d < domains; ++d)
    names.push_back("d" + std::to_string(d));
  b.set_domains(names);
  const std::size_t block = std::max<std::size_t>(k, experts / domains);
  for (std::size_t r = 0; r < requests; ++r) {
    const std::size_t d = r % domains, len = prefill + 2 + rng() % 24;
    const std::size_t q = b.add_request(r, static_cast<std::uint32_t>(d), len);
    const std::size_t first = b.tokens() - len;
    (void)q;
    for (std::size_t t = first; t < first + len; ++t)
      for (std::size_t l = 0; l < layers; ++l) {
        std::set<std::size_t> chosen;
        while (chosen.size() < k) {
          const bool own = std::uniform_real_distribution<double>(0, 1)(rng) < affinity;
          const std::size_t e = own ? (d * block + (rng() % block) + l) % experts : rng() % experts;
          chosen.insert(e);
        }
        std::size_t j = 0;
        for (auto e : chosen) {
          b.ids(l, t)[j] = static_cast<trace::trace_expert_id>(e);
          b.weights(l, t)[j++] = 1.0f / static_cast<float>(k);
        }
      }
  }
  return b.build().with_prefill_tokens(prefill);
}

double inertia_of(const std::vector<float>& pts, std::size_t dim, const std::vector<std::uint32_t>& labels,
                  std::size_t k) {
  std::vector<std::vector<double>> mean(k, std::vector<double>(dim, 0.0));
  std::vector<std::size_t> size(k, 0);
  for (std::size_t p = 0; p < labels.size(); ++p) {
    ++size[labels[p]];
    for (std::size_t i = 0; i < dim; ++i)
      mean[labels[p]][i] += pts[p * dim + i];
  }
  double s = 0;
  for (std::size_t p = 0; p < labels.size(); ++p)
    for (std::size_t i = 0; i < dim; ++i) {
      const double d = pts[p * dim + i] - mean[labels[p]][i] / static_cast<double>(size[labels[p]]);
      s += d * d;
    }
  return s;
}

// A request's prefill vector as the classifier sees it, in double precision: counts of the first
// `prefill` tokens' choices on layers 0, stride, 2·stride, ... (layers × experts), normalised.
std::vector<double> dense_prefill(const trace::trace& t, std::size_t r, std::size_t prefill, std::size_t stride) {
  const std::size_t E = t.experts();
  std::vector<double> v(t.layers() * E, 0.0);
  const auto& q = t.request(r);
  for (std::size_t l = 0; l < t.layers(); l += stride)
    for (std::size_t i = 0; i < std::min<std::size_t>(prefill, q.length); ++i)
      for (std::size_t j = 0; j < t.top_k(); ++j)
        v[l * E + t.layer(l).token_ids(q.first_token + i)[j]] += 1;
  double s = 0;
  for (double x : v)
    s += x * x;
  for (double& x : v)
    x /= std::sqrt(s);
  return v;
}

// Independent validity checks of a planner's output beyond what expert_map enforces.
// `node_sharing`: an expert's copies may share a node (the floor hedge's copies split a GPU's
// load with a neighbour at no inter-node cost), never a GPU.
void check_maps(const std::vector<expert_map>& maps, const placement::plan_input& in, bool node_sharing = false) {
  BOOST_REQUIRE_EQUAL(maps.size(), in.layers());
  const std::size_t gpus = in.topology.gpus_per_node();
  for (const auto& m : maps) {
    BOOST_TEST(m.experts() == in.experts);
    BOOST_TEST(m.ranks() == in.ranks());
    BOOST_TEST(m.slots_per_rank() == in.slots_per_rank);
    std::size_t used = 0;
    for (std::size_t e = 0; e < in.experts; ++e) {
      BOOST_TEST(m.replica_count(e) >= 1u);
      std::set<std::size_t> nodes, ranks;
      for (const auto& s : m.replicas(e)) {
        nodes.insert(static_cast<std::size_t>(s.rank) / gpus);
        ranks.insert(static_cast<std::size_t>(s.rank));
      }
      BOOST_TEST(ranks.size() == m.replica_count(e));                    // never two copies on one GPU
      if (!node_sharing) BOOST_TEST(nodes.size() == m.replica_count(e)); // nor on one node
      used += m.replica_count(e);
    }
    BOOST_TEST(used <= in.slots());
  }
}

} // namespace

BOOST_AUTO_TEST_CASE(kmeans_matches_brute_force_optimum_on_tiny_data) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t n = 7, dim = 2, k = 2 + trial % 2;
    std::vector<float> pts(n * dim);
    // Three well-separated blobs so that the optimum is unambiguous.
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t i = 0; i < dim; ++i)
        pts[p * dim + i] = static_cast<float>(10.0 * static_cast<double>((p % k) * (i + 1)) +
                                              std::uniform_real_distribution<double>(-1, 1)(rng));
    // Brute force over all k^n labellings with every cluster non-empty.
    double best = 1e300;
    std::vector<std::uint32_t> labels(n, 0);
    std::size_t total = 1;
    for (std::size_t i = 0; i < n; ++i)
      total *= k;
    for (std::size_t code = 0; code < total; ++code) {
      std::size_t c = code;
      std::vector<std::size_t> size(k, 0);
      for (std::size_t p = 0; p < n; ++p) {
        labels[p] = static_cast<std::uint32_t>(c % k);
        ++size[c % k];
        c /= k;
      }
      if (std::count(size.begin(), size.end(), 0u) > 0) continue;
      best = std::min(best, inertia_of(pts, dim, labels, k));
    }
    const auto km = grouper::kmeans(pts, dim, {k, 1, 100, 4});
    BOOST_TEST(std::abs(km.inertia - best) <= 1e-6 * (1 + best));
    BOOST_TEST(std::abs(inertia_of(pts, dim, km.labels, k) - km.inertia) <= 1e-6 * (1 + best));
    // Fixed point: every point is labelled with its nearest centroid (checked in double).
    for (std::size_t p = 0; p < n; ++p) {
      std::size_t nearest = 0;
      double nd = 1e300;
      for (std::size_t c = 0; c < k; ++c) {
        double d = 0;
        for (std::size_t i = 0; i < dim; ++i)
          d += std::pow(pts[p * dim + i] - km.centroid(c)[i], 2.0);
        if (d < nd) nd = d, nearest = c;
      }
      BOOST_TEST(km.labels[p] == nearest);
    }
  }
}

BOOST_AUTO_TEST_CASE(kmeans_is_deterministic_and_rejects_bad_input) {
  std::mt19937 rng(3);
  std::vector<float> pts(50 * 4);
  for (auto& x : pts)
    x = std::uniform_real_distribution<float>(0, 1)(rng);
  const auto a = grouper::kmeans(pts, 4, {5, 42, 100, 2});
  const auto b = grouper::kmeans(pts, 4, {5, 42, 100, 2});
  BOOST_TEST(a.labels == b.labels);
  BOOST_TEST(a.centroids == b.centroids);
  BOOST_CHECK_THROW(grouper::kmeans(pts, 4, {51, 1, 10, 1}), config_error);
  BOOST_CHECK_THROW(grouper::kmeans(pts, 3, {2, 1, 10, 1}), config_error);
  // A restart count beyond the bound (SIZE_MAX: years of k-means) is refused, here and in the fit.
  BOOST_CHECK_NO_THROW(grouper::kmeans(pts, 4, {2, 1, 10, grouper::kmeans_options::max_restarts}));
  BOOST_CHECK_THROW(grouper::kmeans(pts, 4, {2, 1, 10, grouper::kmeans_options::max_restarts + 1}), config_error);
  BOOST_CHECK_THROW(grouper::kmeans(pts, 4, {2, 1, 10, std::numeric_limits<std::size_t>::max()}), config_error);
  pts[17] = std::nanf("");
  BOOST_CHECK_THROW(grouper::kmeans(pts, 4, {2, 1, 10, 1}), invalid_input_error);
}

// The sparse online classifier against a dense double-precision reference built from the model's
// training labels: class mean of normalised prefill count vectors, normalised; cosine argmax.
// The grouping model counts a request's decode usage over its tokens marked decode only: a later
// turn's prompt between them (phases prefill, decode, prefill, decode) was counted as decode. The
// model fitted with such gaps equals the one fitted on the same requests with the gaps cut out.
BOOST_AUTO_TEST_CASE(workload_model_counts_only_tokens_marked_decode) {
  const std::size_t E = 16, K = 2, L = 2, requests = 24;
  const auto build = [&](bool with_gap) {
    std::mt19937 rng(8);
    trace::trace_builder b(E, K, L);
    b.set_domains({"a", "b"});
    for (std::size_t r = 0; r < requests; ++r) {
      const std::size_t a = 4, d1 = 3 + r % 4, gap = 2 + r % 3, d2 = 2 + r % 5;
      const std::size_t first = b.tokens();
      b.add_request(r, static_cast<std::uint32_t>(r % 2), a + d1 + (with_gap ? gap : 0) + d2);
      std::size_t pos = 0;
      for (std::size_t i = 0; i < a + d1 + gap + d2; ++i) {
        const bool in_gap = i >= a + d1 && i < a + d1 + gap;
        // Each domain draws from its own half of the experts; the gap from the other half.
        std::array<trace::trace_expert_id, K * L> ids{};
        for (auto& id : ids)
          id = static_cast<trace::trace_expert_id>(((r % 2 == 0) != in_gap ? 0 : E / 2) + rng() % (E / 2));
        if (in_gap && !with_gap) continue;
        const std::size_t t = first + pos++;
        b.set_token(t, i < a || in_gap ? trace::phase::prefill : trace::phase::decode, -1);
        for (std::size_t l = 0; l < L; ++l) {
          b.ids(l, t)[0] = ids[l * K];
          b.ids(l, t)[1] =
              static_cast<trace::trace_expert_id>(ids[l * K] == ids[l * K + 1] ? (ids[l * K] + 1) % E : ids[l * K + 1]);
          b.weights(l, t)[0] = b.weights(l, t)[1] = 0.5f;
        }
      }
    }
    return b.build();
  };
  grouper::workload_aware_options opt;
  opt.clusters = 2;
  opt.prefill_tokens = 4;
  const auto gapped = grouper::workload_model::fit(build(true), dynamic_topology(2, 1), opt);
  const auto cut = grouper::workload_model::fit(build(false), dynamic_topology(2, 1), opt);
  BOOST_TEST(grouper::grouping_text(gapped) == grouper::grouping_text(cut));
}

BOOST_AUTO_TEST_CASE(classifier_matches_dense_reference_and_separates_domains) {
  std::mt19937 rng(11);
  const std::size_t E = 32, K = 4, L = 3, P = 6;
  const auto train = domain_trace(rng, 60, E, K, L, 3, P);
  const auto test = domain_trace(rng, 30, E, K, L, 3, P);
  grouper::workload_aware_options opt;
  opt.clusters = 3;
  opt.prefill_tokens = P;
  opt.classifier_layers = 2; // layers 0 and 2 of 3
  const auto m = grouper::workload_model::fit(train, dynamic_topology(3, 2), opt);
  const std::size_t dim = L * E;
  const auto prefill_vec = [&](const trace::trace& t, std::size_t r) {
    return dense_prefill(t, r, P, m.classifier_layer_stride());
  };
  std::vector<std::vector<double>> mean(m.clusters(), std::vector<double>(dim, 0.0));
  for (std::size_t i = 0; i < m.training_requests().size(); ++i) {
    const auto v = prefill_vec(train, m.training_requests()[i]);
    for (std::size_t f = 0; f < dim; ++f)
      mean[m.training_labels()[i]][f] += v[f];
  }
  for (auto& c : mean) {
    double s = 0;
    for (double x : c)
      s += x * x;
    for (double& x : c)
      x /= std::sqrt(s);
  }
  std::vector<std::uint32_t> scratch;
  std::size_t agree_domain = 0;
  std::vector<std::int32_t> cluster_domain(m.clusters(), -1);
  for (std::size_t r = 0; r < test.requests(); ++r) {
    const auto v = prefill_vec(test, r);
    std::size_t best = 0;
    double best_s = -1;
    for (std::size_t c = 0; c < m.clusters(); ++c) {
      double s = 0;
      for (std::size_t f = 0; f < dim; ++f)
        s += v[f] * mean[c][f];
      if (s > best_s) best_s = s, best = c;
    }
    const auto got = m.classify(test, r, P, scratch);
    BOOST_TEST(got.cluster == best);
    BOOST_TEST(std::abs(got.similarity - best_s) < 1e-4);
    // Clusters should coincide with domains on this well-separated data.
    if (cluster_domain[got.cluster] < 0)
      cluster_domain[got.cluster] = static_cast<std::int32_t>(test.request(r).domain);
    agree_domain += cluster_domain[got.cluster] == static_cast<std::int32_t>(test.request(r).domain);
  }
  BOOST_TEST(agree_domain == test.requests());
}

// Confidence thresholds are per class. Training: a tight kind (every token on experts 0-7) and a
// loose kind (each request on its own 4 of experts 16-31). A request of an unseen kind on experts
// 4-11 is nearest the tight class and clears the pooled threshold the loose class sets, but not
// the tight class's own: it falls back. Fresh tight requests stay confident. The thresholds equal
// a dense leave-one-out reference (each member against its class mean without it, the lowest
// minus the margin), and `confident` is exactly "similarity ≥ the class's threshold".
// One fitted model shared by threads, each with scratch of its own (a grouper per frontend thread):
// every thread gets the answers one thread gets (run under TSan by scripts/test, this is also the
// check that classifying writes nothing of the model).
BOOST_AUTO_TEST_CASE(threads_classify_with_one_shared_model) {
  std::mt19937 rng(3);
  const auto train = domain_trace(rng, 60, 32, 4, 3, 3, 6), test = domain_trace(rng, 40, 32, 4, 3, 3, 6);
  const auto m = std::make_shared<const grouper::workload_model>(
      grouper::workload_model::fit(train, dynamic_topology(3, 2), grouper::workload_aware_options{}));
  std::vector<grouper::classification> want;
  std::vector<std::uint32_t> scratch;
  for (std::size_t r = 0; r < test.requests(); ++r)
    want.push_back(m->classify(test, r, 6, scratch));
  BOOST_TEST(std::all_of(scratch.begin(), scratch.end(), [](std::uint32_t v) { return v == 0; }));
  std::vector<std::size_t> wrong(4, 0);
  std::vector<std::thread> threads;
  for (std::size_t w = 0; w < wrong.size(); ++w)
    threads.emplace_back([&, w] {
      std::vector<std::uint32_t> own;
      for (int pass = 0; pass < 20; ++pass)
        for (std::size_t r = 0; r < test.requests(); ++r) {
          const auto got = m->classify(test, (r + w) % test.requests(), 6, own);
          const auto& ref = want[(r + w) % test.requests()];
          wrong[w] += got.cluster != ref.cluster || got.similarity != ref.similarity || got.confident != ref.confident;
        }
    });
  for (auto& t : threads)
    t.join();
  for (const auto n : wrong)
    BOOST_TEST(n == 0u);
}

BOOST_AUTO_TEST_CASE(confidence_thresholds_are_per_class) {
  const std::size_t E = 32, K = 4, P = 6;
  std::mt19937 rng(5);
  const auto draw = [&](std::size_t lo, std::size_t n) {
    std::set<std::size_t> s;
    while (s.size() < K)
      s.insert(lo + rng() % n);
    return s;
  };
  // kind 0 tight, 1 loose, 2 unseen
  const auto make = [&](const std::vector<std::uint32_t>& kinds) {
    trace::trace_builder b(E, K, 1);
    b.set_domains({"tight", "loose", "unseen"});
    for (std::size_t r = 0; r < kinds.size(); ++r) {
      const std::size_t len = P + 4;
      b.add_request(r, kinds[r], len);
      const std::set<std::size_t> own = draw(16, 16);
      for (std::size_t t = b.tokens() - len; t < b.tokens(); ++t) {
        const std::set<std::size_t> chosen = kinds[r] == 0 ? draw(0, 8) : kinds[r] == 1 ? own : draw(4, 8);
        std::size_t j = 0;
        for (auto e : chosen) {
          b.ids(0, t)[j] = static_cast<trace::trace_expert_id>(e);
          b.weights(0, t)[j++] = 1.0f / K;
        }
      }
    }
    return b.build().with_prefill_tokens(P);
  };
  std::vector<std::uint32_t> train_kinds, test_kinds;
  for (std::size_t i = 0; i < 24; ++i)
    train_kinds.push_back(static_cast<std::uint32_t>(i % 2));
  for (std::size_t i = 0; i < 20; ++i)
    test_kinds.push_back(i % 2 == 0 ? 0u : 2u);
  const auto train = make(train_kinds), test = make(test_kinds);
  grouper::workload_aware_options opt;
  opt.clusters = 2;
  opt.prefill_tokens = P;
  const auto m = grouper::workload_model::fit(train, dynamic_topology(2, 1), opt);

  // Dense reference of the thresholds from the model's own labels.
  const auto prefill_vec = [&](const trace::trace& t, std::size_t r) { return dense_prefill(t, r, P, 1); };
  const std::size_t n = m.training_requests().size();
  std::vector<double> lowest(m.clusters(), 2.0);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = m.training_labels()[i];
    std::vector<double> mean(E, 0.0);
    for (std::size_t o = 0; o < n; ++o)
      if (o != i && m.training_labels()[o] == c) {
        const auto v = prefill_vec(train, m.training_requests()[o]);
        for (std::size_t e = 0; e < E; ++e)
          mean[e] += v[e];
      }
    const auto v = prefill_vec(train, m.training_requests()[i]);
    double dot = 0, norm = 0;
    for (std::size_t e = 0; e < E; ++e)
      dot += v[e] * mean[e], norm += mean[e] * mean[e];
    lowest[c] = std::min(lowest[c], norm > 0 ? dot / std::sqrt(norm) : 0.0);
  }
  std::size_t tight = 0;
  for (std::size_t c = 0; c < m.clusters(); ++c) {
    BOOST_TEST(std::abs(m.class_min_similarity(c) - (lowest[c] - opt.confidence_margin)) < 1e-4);
    if (m.class_min_similarity(c) > m.class_min_similarity(tight)) tight = c;
  }
  BOOST_TEST(m.min_similarity() == std::min(m.class_min_similarity(0), m.class_min_similarity(1)));

  std::vector<std::uint32_t> scratch;
  std::size_t unseen = 0, unseen_over_pooled = 0;
  for (std::size_t r = 0; r < test.requests(); ++r) {
    const auto got = m.classify(test, r, P, scratch);
    BOOST_TEST(got.confident == (got.similarity >= m.class_min_similarity(got.cluster)));
    if (test.request(r).domain == 0) {
      BOOST_TEST(got.cluster == tight);
      BOOST_TEST(got.confident, "a fresh request of the tight kind, similarity " << got.similarity);
    } else {
      ++unseen;
      unseen_over_pooled += got.cluster == tight && got.similarity >= m.min_similarity();
      BOOST_TEST(!got.confident, "an unseen request, similarity " << got.similarity << " to cluster " << got.cluster);
    }
  }
  // The case is one a pooled threshold gets wrong.
  BOOST_TEST(unseen_over_pooled == unseen);
}

// Property test: random traces and topologies, both planners, 0..2 redundant slots per GPU.
BOOST_AUTO_TEST_CASE(planners_return_valid_maps_on_random_inputs) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 24; ++trial) {
    const std::size_t nodes = 1 + rng() % 4, gpus = 1 + rng() % 3, ranks = nodes * gpus;
    const std::size_t E = std::max<std::size_t>(ranks, 4 + rng() % 40), K = 1 + rng() % std::min<std::size_t>(4, E);
    const std::size_t L = 1 + rng() % 3, redundant = rng() % 3;
    const auto t = domain_trace(rng, 12 + rng() % 20, E, K, L, 1 + rng() % 3, 3, rng() % 2 ? 0.9 : 0.3);
    const dynamic_topology topo(nodes, gpus);
    for (const char* name : {"activation_usage", "locality"}) {
      const auto p = placement::plan_activation_aware(t, topo, name, redundant);
      auto in = placement::plan_input_from_trace(t, topo, redundant);
      check_maps(p.maps, in, std::string(name) == "locality");
      if (std::string(name) == "locality" && redundant == 0)
        for (const auto& m : p.maps)
          BOOST_TEST(m.replica_slots_used() == 0u);
    }
  }
}

// On a tiny instance the locality planner's node layout reaches the brute-force optimum of local
// usage among layouts with equal experts per node and node loads under the bound.
BOOST_AUTO_TEST_CASE(locality_reaches_brute_force_optimum_on_tiny_instances) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 30; ++trial) {
    const std::size_t nodes = 2, E = 6;
    placement::plan_input in;
    in.topology = dynamic_topology(nodes, 1);
    in.experts = E;
    in.slots_per_rank = E / nodes;
    in.load.assign(1, std::vector<double>(E, 0.0));
    in.node_load.assign(1, std::vector<std::vector<double>>(nodes, std::vector<double>(E, 0.0)));
    for (std::size_t n = 0; n < nodes; ++n)
      for (std::size_t e = 0; e < E; ++e)
        in.node_load[0][n][e] = static_cast<double>(rng() % 20 + 10);
    placement::locality_options opt;
    opt.balance_slack = 0.5;
    const auto maps = placement::locality{opt}.plan(in);
    const auto& u = in.node_load[0];
    double total = 0;
    std::vector<double> w(E, 0.0);
    for (std::size_t e = 0; e < E; ++e)
      w[e] = u[0][e] + u[1][e], total += w[e];
    const double cap = 1.5 * total / 2;
    double got = 0;
    for (std::size_t e = 0; e < E; ++e)
      got += u[static_cast<std::size_t>(maps[0].replicas(e)[0].rank)][e];
    double best = -1;
    for (std::size_t mask = 0; mask < (1u << E); ++mask) {
      if (std::popcount(mask) != static_cast<int>(E / 2)) continue;
      double local = 0, load0 = 0;
      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t n = (mask >> e) & 1u;
        local += u[n][e];
        if (n == 0) load0 += w[e];
      }
      if (load0 <= cap && total - load0 <= cap) best = std::max(best, local);
    }
    BOOST_TEST(got >= best - 1e-9);
  }
}

BOOST_AUTO_TEST_CASE(infeasible_and_malformed_inputs_raise_clear_errors) {
  std::mt19937 rng(1);
  const auto t = domain_trace(rng, 10, 16, 2, 2, 2, 3);
  placement::plan_input in = placement::plan_input_from_trace(t, dynamic_topology(2, 2), 0);
  BOOST_CHECK_THROW(placement::activation_usage{}.plan(in), config_error); // no node_load
  BOOST_CHECK_THROW(placement::locality{}.plan(in), config_error);
  in.node_load.assign(2, std::vector<std::vector<double>>(3, std::vector<double>(16, 1.0))); // 3 nodes, topology 2
  BOOST_CHECK_THROW(placement::locality{}.plan(in), invalid_input_error);
  in.node_load.assign(2, std::vector<std::vector<double>>(2, std::vector<double>(16, 1.0)));
  in.node_load[1][0][3] = -1;
  BOOST_CHECK_THROW(placement::activation_usage{}.plan(in), invalid_input_error);
  in.node_load[1][0][3] = 1;
  in.slots_per_rank = 3; // 12 slots for 16 experts
  BOOST_CHECK_THROW(placement::locality{}.plan(in), config_error);
  BOOST_CHECK_THROW(grouper::grouper_by_name("workload_aware"), config_error);
  BOOST_CHECK_THROW(placement::plan_by_name("nope", in), config_error);
  // A misspelt placement is named as such, before the fit's complaint about the trace (none of its
  // tokens is prefill here); with the fit off a baseline plans such a trace.
  try {
    static_cast<void>(placement::plan_activation_aware(t.with_prefill_tokens(0), dynamic_topology(2, 2), "localty", 0));
    BOOST_ERROR("planned");
  } catch (const config_error& e) {
    BOOST_TEST(std::string(e.what()).find("unknown placement \"localty\"") != std::string::npos, e.what());
  }
  placement::activation_plan_options no_fit;
  no_fit.fit_grouping = false;
  BOOST_CHECK_NO_THROW(
      placement::plan_activation_aware(t.with_prefill_tokens(0), dynamic_topology(2, 2), "eplb", 0, no_fit));
  // A trace without prefill marks cannot train the classifier.
  BOOST_CHECK_THROW(grouper::workload_model::fit(t.with_prefill_tokens(0), dynamic_topology(2, 2)), config_error);
  // NaN options passed every comparison: a NaN confidence quantile indexed the similarities with
  // a cast NaN, a NaN margin made no request confident, a NaN slack never balanced.
  for (int field = 0; field < 4; ++field) {
    grouper::workload_aware_options o;
    (field == 0   ? o.confidence_quantile
     : field == 1 ? o.confidence_margin
     : field == 2 ? o.min_similarity
                  : o.balance_slack) = NAN;
    BOOST_CHECK_THROW(grouper::workload_model::fit(t, dynamic_topology(2, 2), o), config_error);
  }
  grouper::workload_aware_options negative;
  negative.balance_slack = -1;
  BOOST_CHECK_THROW(grouper::workload_model::fit(t, dynamic_topology(2, 2), negative), config_error);
}

// A cluster state with fewer ranks than its topology was read past its end.
BOOST_AUTO_TEST_CASE(workload_aware_checks_the_cluster_state) {
  std::mt19937 rng(5);
  const auto t = domain_trace(rng, 20, 16, 2, 2, 2, 3);
  grouper::workload_aware_options o;
  o.min_similarity = 0; // every request confident: assign reads its cluster's node
  grouper::workload_aware g(
      std::make_shared<grouper::workload_model>(grouper::workload_model::fit(t, dynamic_topology(2, 2), o)));
  std::vector<grouper::rank_state> one(1), four(4);
  BOOST_CHECK_THROW(g.assign({&t, 0, 3}, grouper::cluster_state{dynamic_topology(2, 2), one, 4}), invalid_input_error);
  BOOST_TEST(g.assign({&t, 0, 3}, grouper::cluster_state{dynamic_topology(2, 2), four, 4}) < 4u);
}

BOOST_AUTO_TEST_CASE(same_seed_gives_identical_plans_and_groupings) {
  std::mt19937 rng(21);
  const auto t = domain_trace(rng, 40, 32, 4, 3, 3, 4);
  const dynamic_topology topo(4, 2);
  for (const char* name : {"activation_usage", "locality"}) {
    const auto a = placement::plan_activation_aware(t, topo, name, 1);
    const auto b = placement::plan_activation_aware(t, topo, name, 1);
    BOOST_TEST((a.maps == b.maps));
    BOOST_TEST(a.model->cluster_node() == b.model->cluster_node());
    BOOST_TEST(a.model->training_labels() == b.model->training_labels());
  }
}

// A plan or a simulation told to stop (core/cancel.hpp; Python's Ctrl-C) raises cancelled_error
// soon after, even from inside an annealing run that would take minutes; a scope whose flag stays
// down changes nothing.
BOOST_AUTO_TEST_CASE(cancelled_plans_and_simulations_raise_soon_after) {
  std::mt19937 rng(21);
  const auto t = domain_trace(rng, 40, 32, 4, 2, 3, 4);
  const dynamic_topology topo(4, 2);
  std::atomic<bool> stop{false};
  {
    const cancel_scope scope(stop);
    const auto a = placement::plan_activation_aware(t, topo, "locality", 1);
    BOOST_TEST((a.maps == placement::plan_activation_aware(t, topo, "locality", 1).maps));
  }
  // The most proposals the planner takes: 2^20 per expert, 2^25 per layer (minutes in a debug
  // build). The flag goes up while it anneals.
  placement::activation_plan_options opt;
  opt.refine.anneal_per_expert = placement::token_refine_options::max_anneal_per_expert;
  const auto start = std::chrono::steady_clock::now();
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    stop = true;
  });
  {
    const cancel_scope scope(stop);
    BOOST_CHECK_THROW(placement::plan_activation_aware(t, topo, "locality", 1, opt), cancelled_error);
  }
  stopper.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  BOOST_TEST(seconds < 5.0, "stopped after " << seconds << " s");

  // A simulation stops at the step after the one that raised the flag.
  stop = false;
  const auto p = placement::plan_activation_aware(t, topo, "locality", 0);
  grouper::workload_aware g(p.model);
  cost::simulation_config cfg;
  cfg.topology = topo;
  cfg.batch_per_rank = 2;
  std::size_t last_step = 0;
  const cancel_scope scope(stop);
  BOOST_CHECK_THROW(cost::simulate_decode(t, p.maps, g, cfg,
                                          [&](std::size_t step, const auto&, const auto&) {
                                            last_step = step;
                                            if (step == 3) stop = true;
                                          }),
                    cancelled_error);
  BOOST_TEST(last_step == 3u);
}

// EPLB on a big load table (thousands of layers from an engine's counters) ran to its end after
// Ctrl-C: it now stops at the next layer.
BOOST_AUTO_TEST_CASE(a_cancelled_eplb_stops_at_the_next_layer) {
  std::mt19937 rng(25);
  std::vector<float> load(64 * 32);
  for (auto& x : load)
    x = static_cast<float>(rng() % 1000);
  std::atomic<bool> stop{false};
  const auto plain = placement::rebalance_experts(load, 64, 32, 48, 4, 2, 8);
  {
    const cancel_scope scope(stop);
    BOOST_TEST(
        (placement::rebalance_experts(load, 64, 32, 48, 4, 2, 8).physical_to_logical == plain.physical_to_logical));
    stop = true;
    BOOST_CHECK_THROW(placement::rebalance_experts(load, 64, 32, 48, 4, 2, 8), cancelled_error);
  }
}

// Options out of range are refused naming the option (they changed the plan without a word, or,
// for classifier_layers past the layer count, looped for ever).
BOOST_AUTO_TEST_CASE(out_of_range_plan_options_are_refused) {
  std::mt19937 rng(23);
  const auto t = domain_trace(rng, 30, 16, 2, 2, 2, 4);
  const dynamic_topology topo(2, 2);
  placement::activation_plan_options all_layers;
  all_layers.grouping.classifier_layers = SIZE_MAX; // "at most": every layer
  placement::activation_plan_options two_layers;
  two_layers.grouping.classifier_layers = 2;
  BOOST_TEST((placement::plan_activation_aware(t, topo, "locality", 1, all_layers).maps ==
              placement::plan_activation_aware(t, topo, "locality", 1, two_layers).maps));
  const auto refused = [&](const std::function<void(placement::activation_plan_options&)>& set,
                           const std::string& says) {
    placement::activation_plan_options o;
    set(o);
    const auto msg = locus_test::error_message<config_error>(
        [&] { (void)placement::plan_activation_aware(t, topo, "locality", 1, o); });
    BOOST_TEST(msg.find(says) != std::string::npos, msg);
  };
  const double nan = std::nan(""), inf = std::numeric_limits<double>::infinity();
  refused([](auto& o) { o.refine_sample_pairs = 0; }, "refine_sample_pairs (0)");
  refused([](auto& o) { o.refine_total_pairs = 0; }, "refine_total_pairs (0)");
  refused([](auto& o) { o.shift_by = static_cast<placement::shift_group>(7); }, "shift_by 7");
  refused([](auto& o) { o.refine.candidates = 0; }, "0 swap candidates");
  refused([=](auto& o) { o.refine.min_sweep_gain = nan; }, "min sweep gain nan");
  refused([](auto& o) { o.refine.min_sweep_gain = -1; }, "min sweep gain -1");
  refused([=](auto& o) { o.refine.anneal_temperature = inf; }, "anneal temperature inf");
  refused([=](auto& o) { o.refine.anneal_temperature = nan; }, "anneal temperature nan");
  refused([](auto& o) { o.refine.replicas.rule = static_cast<transport::replica_rule>(99); }, "replica rule 99");
  refused([=](auto& o) { o.refine.shift_slack = inf; }, "shift slack inf");
  refused([=](auto& o) { o.refine.hedge_z = inf; }, "hedge z inf");
  refused([=](auto& o) { o.refine.hedge_excess = nan; }, "hedge excess nan");
  refused([=](auto& o) { o.refine.hedge_floor = inf; }, "hedge floor inf");
  refused([](auto& o) { o.grouping.confidence_quantile = 2; }, "confidence_quantile is 2");
  refused([=](auto& o) { o.named.locality.balance_slack = nan; }, "locality balance_slack nan");
  refused([=](auto& o) { o.named.locality.replica_balance_slack = nan; }, "locality replica_balance_slack nan");
}

// The grouper only returns ranks with room (or no_rank when every rank is full), whatever the
// state; and a whole simulation with tight capacity and Poisson arrivals never overfills a rank
// (the simulator rejects such a placement).
BOOST_AUTO_TEST_CASE(workload_aware_never_exceeds_capacity) {
  std::mt19937 rng(4);
  const auto train = domain_trace(rng, 60, 32, 4, 2, 3, 4);
  const auto test = domain_trace(rng, 80, 32, 4, 2, 3, 4);
  const dynamic_topology topo(3, 2);
  auto p = placement::plan_activation_aware(train, topo, "locality", 0);
  grouper::workload_aware g(p.model);
  for (int trial = 0; trial < 500; ++trial) {
    const std::size_t cap = 1 + rng() % 4;
    std::vector<grouper::rank_state> st(topo.ranks());
    for (auto& s : st) {
      s.running_requests = static_cast<std::uint32_t>(rng() % (cap + 1));
      s.running_tokens = rng() % 100;
    }
    const grouper::cluster_state cs{topo, st, cap};
    const std::size_t r = g.assign({&test, static_cast<std::size_t>(rng() % test.requests()), 4}, cs);
    bool any_room = false;
    for (std::size_t i = 0; i < topo.ranks(); ++i)
      any_room |= st[i].running_requests < cap;
    if (r == grouper::no_rank)
      BOOST_TEST(!any_room);
    else
      BOOST_TEST(st[r].running_requests < cap);
  }
  cost::simulation_config cfg;
  cfg.topology = topo;
  cfg.batch_per_rank = 2;
  cfg.arrival_rate = 3;
  auto g2 = grouper::grouper_by_name("workload_aware", p.model);
  const auto res = cost::simulate_decode(test, p.maps, g2, cfg);
  BOOST_TEST(res.requests_served == test.requests());
}

BOOST_AUTO_TEST_CASE(micro_batch_split_balances_against_brute_force) {
  std::mt19937 rng(8);
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t n = 6 + rng() % 3, gpus = 3;
    std::vector<std::vector<double>> load(n, std::vector<double>(gpus));
    for (auto& r : load)
      for (auto& x : r)
        x = static_cast<double>(rng() % 10);
    const auto s = grouper::split_micro_batches(load, 2);
    // Sizes differ by at most one; reported loads are the sums.
    std::size_t c0 = 0;
    for (auto b : s.batch_of)
      c0 += b == 0;
    BOOST_TEST(std::abs(static_cast<long>(c0) - static_cast<long>(n - c0)) <= 1);
    // Brute force: the best worst-peak over all balanced 2-splits; greedy + swaps must be within 1.2x.
    double best = 1e300;
    for (std::size_t mask = 0; mask < (1u << n); ++mask) {
      const long c = std::popcount(mask);
      if (std::abs(2 * c - static_cast<long>(n)) > 1) continue;
      std::vector<std::vector<double>> b(2, std::vector<double>(gpus, 0.0));
      for (std::size_t r = 0; r < n; ++r)
        for (std::size_t g = 0; g < gpus; ++g)
          b[(mask >> r) & 1u][g] += load[r][g];
      best = std::min(
          best, std::max(*std::max_element(b[0].begin(), b[0].end()), *std::max_element(b[1].begin(), b[1].end())));
    }
    double got = 0;
    for (const auto& b : s.load)
      got = std::max(got, *std::max_element(b.begin(), b.end()));
    BOOST_TEST(got <= 1.2 * best + 1e-9);
    BOOST_TEST(s.peak_max_over_mean >= 1.0 - 1e-12);
  }
  BOOST_CHECK_THROW(grouper::split_micro_batches(std::vector<std::vector<double>>{{1.0}, {1.0, 2.0}}, 2),
                    invalid_input_error);
  // A mistyped micro-batch count was a table of 2^40 rows: a bad_alloc, not a locus error.
  const std::vector<std::vector<double>> two{{1.0, 2.0}, {3.0, 4.0}};
  BOOST_CHECK_THROW(grouper::split_micro_batches(two, std::size_t{1} << 40), config_error);
  BOOST_CHECK_THROW(grouper::evaluate_micro_batches(two, {0, 1}, std::size_t{1} << 40), config_error);
  BOOST_TEST(grouper::split_micro_batches(two, 3).load.size() == 3u); // more micro-batches than requests
}
