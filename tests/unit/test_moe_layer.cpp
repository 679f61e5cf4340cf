#define BOOST_TEST_MODULE moe_layer
#include "../mpi/dispatch_cases.hpp"
#include "../support/error_message.hpp"
#include "../support/moe_reference.hpp"
#include "../support/rank_threads.hpp"

#include <boost/test/unit_test.hpp>
#include <functional>
#include <limits>
#include <locus/layer/moe_layer.hpp>
#include <locus/placement/linear.hpp>
#include <locus/router/sigmoid_grouped.hpp>
#include <locus/router/sigmoid_top1.hpp>
#include <thread>

using namespace locus;
using locus::layer::expert_weights;

namespace {

// Runs body(endpoint) on one thread per rank; returns each rank's exception (or null).
std::vector<std::exception_ptr> on_ranks(transport::local_fabric& f,
                                         const std::function<void(transport::local_transport&)>& body) {
  return locus_test::run_rank_threads(f.topology().ranks(), [&](std::size_t r) {
    auto ep = f.endpoint(r);
    body(ep);
  });
}

void require_no_errors(const std::vector<std::exception_ptr>& errors) {
  for (std::size_t r = 0; r < errors.size(); ++r)
    if (errors[r]) try {
        std::rethrow_exception(errors[r]);
      } catch (const std::exception& e) {
        BOOST_FAIL("rank " << r << " raised: " << e.what());
      }
}

// |y - ref| <= acc · scale + 1e-6 everywhere; returns the worst ratio.
template <class T>
double worst_ratio(const std::vector<T>& y, const std::vector<double>& ref, const std::vector<double>& scale,
                   double rel, double acc) {
  BOOST_REQUIRE_EQUAL(y.size(), ref.size());
  double worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i)
    worst = std::max(worst,
                     std::abs(locus_test::as_double(y[i]) - ref[i]) / (rel * std::abs(ref[i]) + acc * scale[i] + 1e-6));
  return worst;
}

// run(transport::local_flat{}) or run(transport::local_hierarchical{}), as `kind` says.
template <class Run>
void with_transport(transport_kind kind, Run&& run) {
  if (kind == transport_kind::flat)
    run(transport::local_flat{});
  else
    run(transport::local_hierarchical{});
}

using dyn_shape = dynamic_moe_shape;
template <class Transport, class... More>
using dyn_layer = moe_layer<dyn_shape, dynamic_topology, Transport, More...>;

// One random case (routings with skew, replicas and empty ranks) through the layer on every rank,
// against the dense reference; with `shared` shared experts. `Site`: where the given routing's
// weights apply; `reference_site`: where the reference applies them (the two differ only to show
// that the comparison tells them apart).
template <class Transport, weight_site Site = weight_site::expert_output>
double run_case(const locus_test::dispatch_case& c, std::size_t ffn, std::size_t shared, std::uint64_t seed,
                placement::replica_rule rule = placement::replica_rule::locality_first,
                weight_site reference_site = Site) {
  const auto all = locus_test::model_weights<float>(seed, c.experts, c.hidden, ffn);
  const auto shared_w = locus_test::model_weights<float>(seed + 1, shared, c.hidden, ffn);
  transport::local_fabric f(c.topo, Transport::kind);
  std::vector<std::vector<float>> y(c.topo.ranks());
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    const std::size_t r = ep.rank();
    dyn_layer<Transport, layer::given_routing_at<Site>> layer(
        dyn_shape(c.experts, c.k, c.hidden, shared), c.topo, ep, c.map,
        layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
    static_assert(decltype(layer)::routing_weight_site == Site);
    if (shared > 0) layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
    if (rule != placement::replica_rule::locality_first) {
      std::vector<std::uint8_t> hot(c.topo.ranks(), 0);
      hot[seed % hot.size()] = 1; // locality_bounded: one rank over its bound
      layer.set_layer_index(seed);
      layer.set_replica_policy(rule,
                               rule == placement::replica_rule::locality_bounded ? hot : std::vector<std::uint8_t>{});
    }
    const auto x = c.inputs(r);
    y[r].assign(x.size(), -1.0f);
    layer.forward(x, c.routings[r].view(), y[r]);
  }));
  double worst = 0;
  for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, shared > 0 ? &shared_w : nullptr,
                                           &scale, reference_site);
    worst = std::max(worst, worst_ratio(y[r], ref, scale, 0.0, 2e-6));
  }
  return worst;
}

} // namespace

// Many random cases, flat and hierarchical, several topologies: the layer equals the dense MoE.
BOOST_AUTO_TEST_CASE(random_cases_match_dense_reference) {
  const std::pair<std::size_t, std::size_t> topos[] = {{2, 2}, {1, 4}, {4, 1}, {2, 3}, {3, 2}};
  double worst = 0;
  std::size_t cases = 0;
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    const auto [nodes, gpus] = topos[seed % 5];
    const auto c = locus_test::make_case(seed, nodes, gpus);
    const std::size_t shared = seed % 3 == 0 ? 1 + seed % 2 : 0;
    const double flat = run_case<transport::local_flat>(c, 6 + seed % 7, shared, seed);
    const double hier = run_case<transport::local_hierarchical>(c, 6 + seed % 7, shared, seed);
    BOOST_TEST(flat <= 1.0, "seed " << seed << " flat: error / tolerance " << flat);
    BOOST_TEST(hier <= 1.0, "seed " << seed << " hierarchical: error / tolerance " << hier);
    worst = std::max({worst, flat, hier});
    cases += 2;
  }
  BOOST_TEST_MESSAGE(cases << " cases, worst error / tolerance " << worst);
}

// Routing weights on the expert input (Llama 4: y = Σ_j E_j(w_j · x)), flat and hierarchical, with
// replicas, several choices of one token on one rank, own rows and forwarded rows: each expert row
// is scaled by its own weight and combine sums the outputs unweighted. The layer applied the weights
// to the outputs before, whatever the model did; the comparison with the output-weighted reference
// shows the two differ on these cases.
BOOST_AUTO_TEST_CASE(weights_on_the_expert_input_match_the_dense_reference) {
  const std::pair<std::size_t, std::size_t> topos[] = {{2, 2}, {1, 4}, {4, 1}, {2, 3}, {3, 2}};
  double worst = 0;
  std::size_t told_apart = 0, cases = 0;
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    const auto [nodes, gpus] = topos[seed % 5];
    const auto c = locus_test::make_case(seed, nodes, gpus);
    const std::size_t shared = seed % 3 == 0 ? 1 : 0;
    constexpr auto in = weight_site::expert_input;
    const double flat = run_case<transport::local_flat, in>(c, 6 + seed % 7, shared, seed);
    const double hier = run_case<transport::local_hierarchical, in>(c, 6 + seed % 7, shared, seed);
    BOOST_TEST(flat <= 1.0, "seed " << seed << " flat: error / tolerance " << flat);
    BOOST_TEST(hier <= 1.0, "seed " << seed << " hierarchical: error / tolerance " << hier);
    worst = std::max({worst, flat, hier});
    const double other = run_case<transport::local_flat, in>(
        c, 6 + seed % 7, shared, seed, placement::replica_rule::locality_first, weight_site::expert_output);
    told_apart += other > 1.0;
    ++cases;
  }
  BOOST_TEST(told_apart == cases, told_apart << " of " << cases << " cases differ from the output-weighted MoE");
  BOOST_TEST_MESSAGE(2 * cases << " cases, worst error / tolerance " << worst);
}

// The same through a compute that does not fuse combine's sum (a user callable; the dispatcher's
// combine sums the outputs, unweighted): expert e squares its input and scales it by e + 1, so
// y[t] = Σ_j (e_j + 1) (w_j x)², which the output-weighted Σ_j w_j (e_j + 1) x² is not.
BOOST_AUTO_TEST_CASE(weights_on_the_expert_input_through_a_user_compute) {
  auto square = [](expert_id e, std::span<const float> in, std::span<float> out, std::size_t) {
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i] * in[i];
  };
  using compute = layer::expert_callable<decltype(square)>;
  for (std::uint64_t seed = 1; seed <= 8; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 1 + seed % 3);
    for (const auto kind : {transport_kind::flat, transport_kind::hierarchical}) {
      transport::local_fabric f(c.topo, kind);
      std::vector<std::vector<float>> y(c.topo.ranks());
      require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
        const std::size_t r = ep.rank();
        const auto x = c.inputs(r);
        y[r].assign(x.size(), -1.0f);
        const auto run = [&]<class Transport>(Transport) {
          dyn_layer<Transport, compute, layer::given_routing_at<weight_site::expert_input>> layer(
              dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map, compute(square));
          layer.forward(x, c.routings[r].view(), y[r]);
        };
        with_transport(kind, run);
      }));
      for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
        const auto x = c.inputs(r);
        const auto v = c.routings[r].view();
        double worst = 0;
        for (std::size_t t = 0; t < v.tokens(); ++t)
          for (std::size_t h = 0; h < c.hidden; ++h) {
            double ref = 0, size = 0;
            for (std::size_t j = 0; j < c.k; ++j) {
              const double wx = double(v.weight(t, j)) * x[t * c.hidden + h];
              ref += double(v.expert(t, j) + 1) * wx * wx;
              size += std::abs(double(v.expert(t, j) + 1) * wx * wx);
            }
            worst = std::max(worst, std::abs(y[r][t * c.hidden + h] - ref) / (1e-5 * size + 1e-6));
          }
        BOOST_TEST(worst <= 1.0, "seed " << seed << " " << to_string(kind) << " rank " << r << ": " << worst);
      }
    }
  }
}

// Gated shared experts (Qwen2-MoE, Qwen3-Next: y = routed + sigmoid(x·gate) · Σ_s FFN_s(x)), flat
// and hierarchical, out of place and in place; the gate's size and values are checked when set.
BOOST_AUTO_TEST_CASE(gated_shared_experts_match_the_dense_reference) {
  std::size_t told_apart = 0, cases = 0;
  for (std::uint64_t seed = 1; seed <= 8; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 1 + seed % 3);
    const std::size_t shared = 1 + seed % 2, ffn = 9;
    const auto all = locus_test::model_weights<float>(seed, c.experts, c.hidden, ffn);
    const auto shared_w = locus_test::model_weights<float>(seed + 1, shared, c.hidden, ffn);
    const auto gate = locus_test::random_rows<float>(seed + 2, 1, c.hidden);
    for (const auto kind : {transport_kind::flat, transport_kind::hierarchical})
      for (const bool in_place : {false, true}) {
        transport::local_fabric f(c.topo, kind);
        std::vector<std::vector<float>> y(c.topo.ranks());
        require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
          const std::size_t r = ep.rank();
          const auto run = [&]<class Transport>(Transport) {
            dyn_layer<Transport, layer::given_routing> layer(
                dyn_shape(c.experts, c.k, c.hidden, shared), c.topo, ep, c.map,
                layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
            layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1), gate);
            const auto x = c.inputs(r);
            if (in_place) {
              y[r] = x;
              layer.forward(y[r], c.routings[r].view(), y[r]);
            } else {
              y[r].assign(x.size(), -1.0f);
              layer.forward(x, c.routings[r].view(), y[r]);
            }
          };
          with_transport(kind, run);
        }));
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          std::vector<double> scale;
          const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, &shared_w, &scale,
                                                 weight_site::expert_output, &gate);
          const double worst = worst_ratio(y[r], ref, scale, 0.0, 2e-6);
          BOOST_TEST(worst <= 1.0, "seed " << seed << " " << to_string(kind) << (in_place ? " in place" : "")
                                           << " rank " << r << ": " << worst);
          if (c.routings[r].tokens() == 0) continue;
          const auto ungated = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, &shared_w, &scale);
          told_apart += worst_ratio(y[r], ungated, scale, 0.0, 2e-6) > 1.0;
          ++cases;
        }
      }
  }
  BOOST_TEST(told_apart == cases, told_apart << " of " << cases << " ranks differ from the ungated MoE");
  // The gate is checked when set: its size, and finite values.
  const auto c = locus_test::make_case(3, 1, 1);
  transport::local_fabric f(c.topo, transport_kind::flat);
  auto ep = f.endpoint(0);
  const auto all = locus_test::model_weights<float>(3, c.experts, c.hidden, 4);
  const auto shared_w = locus_test::model_weights<float>(4, 1, c.hidden, 4);
  dyn_layer<transport::local_flat> layer(dyn_shape(c.experts, c.k, c.hidden, 1), c.topo, ep, c.map,
                                         layer::swiglu_host<float>(all, 1));
  BOOST_CHECK_THROW(layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1), std::vector<float>(c.hidden + 1)),
                    config_error);
  std::vector<float> bad(c.hidden, 0.5f);
  bad.back() = std::numeric_limits<float>::infinity();
  BOOST_CHECK_THROW(layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1), bad), config_error);
  BOOST_CHECK_NO_THROW(layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1), std::vector<float>(c.hidden)));
}

// Every replica rule sends each copy to a replica of its expert: the result is the dense MoE's.
BOOST_AUTO_TEST_CASE(every_replica_rule_matches_dense_reference) {
  for (const auto rule : placement::all_replica_rules)
    for (std::uint64_t seed = 1; seed <= 6; ++seed) {
      const auto c = locus_test::make_case(seed, 2, 1 + seed % 3);
      const double flat = run_case<transport::local_flat>(c, 7, 0, seed, rule);
      const double hier = run_case<transport::local_hierarchical>(c, 7, 0, seed, rule);
      BOOST_TEST(flat <= 1.0, placement::to_string(rule) << " seed " << seed << " flat: " << flat);
      BOOST_TEST(hier <= 1.0, placement::to_string(rule) << " seed " << seed << " hierarchical: " << hier);
    }
  BOOST_CHECK_THROW(
      [] {
        const auto c = locus_test::make_case(1, 2, 2);
        transport::local_fabric f(c.topo, transport_kind::flat);
        const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
          const auto all = locus_test::model_weights<float>(1, c.experts, c.hidden, 4);
          dyn_layer<transport::local_flat> layer(
              dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
              layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, ep.rank(), all), 1));
          layer.set_replica_policy(placement::replica_rule::locality_bounded, std::vector<std::uint8_t>(3, 0));
        });
        for (const auto& e : errors)
          if (e) std::rethrow_exception(e);
      }(),
      config_error);
}

// Two layers of one expert map (different weights) stepped in different orders on different ranks:
// with their layer indices set, or left at their default (the order they were made in), every rank
// raises instead of computing one layer's tokens with the other layer's experts (the map's
// fingerprint alone agreed, and the results were silently wrong); stepped in the same order, both
// equal the dense reference.
BOOST_AUTO_TEST_CASE(layers_stepped_in_different_orders_raise_on_every_rank) {
  for (const bool explicit_index : {true, false})
    for (const bool hierarchical : {false, true}) {
      const auto c = locus_test::make_case(4, 2, 2);
      const auto wa = locus_test::model_weights<float>(21, c.experts, c.hidden, 6);
      const auto wb = locus_test::model_weights<float>(22, c.experts, c.hidden, 6);
      transport::local_fabric f(c.topo, hierarchical ? transport_kind::hierarchical : transport_kind::flat);
      for (const bool same_order : {true, false}) {
        std::vector<std::vector<float>> ya(c.topo.ranks()), yb(c.topo.ranks());
        const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
          const std::size_t r = ep.rank();
          const auto run = [&]<class Transport>(Transport) {
            dyn_layer<Transport> a(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
                                   layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, wa), 1));
            dyn_layer<Transport> b(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
                                   layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, wb), 1));
            // Made in the same order on every rank: their default indices, 0 and 1, differ. Given
            // explicitly with `explicit_index`.
            if (explicit_index) {
              a.set_layer_index(3);
              b.set_layer_index(4);
            }
            const auto x = c.inputs(r);
            ya[r].assign(x.size(), 0.0f);
            yb[r].assign(x.size(), 0.0f);
            if (same_order || r % 2 == 0) {
              a.forward(x, c.routings[r].view(), ya[r]);
              b.forward(x, c.routings[r].view(), yb[r]);
            } else {
              b.forward(x, c.routings[r].view(), yb[r]);
              a.forward(x, c.routings[r].view(), ya[r]);
            }
          };
          if (hierarchical)
            run(transport::local_hierarchical{});
          else
            run(transport::local_flat{});
        });
        if (same_order) {
          require_no_errors(errors);
          for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
            std::vector<double> sa, sb;
            const auto ra = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), wa, nullptr, &sa);
            const auto rb = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), wb, nullptr, &sb);
            BOOST_TEST(worst_ratio(ya[r], ra, sa, 0.0, 2e-6) <= 1.0);
            BOOST_TEST(worst_ratio(yb[r], rb, sb, 0.0, 2e-6) <= 1.0);
          }
          continue;
        }
        for (std::size_t r = 0; r < errors.size(); ++r) {
          BOOST_TEST_CONTEXT("hierarchical " << hierarchical << ", explicit index " << explicit_index << ", rank "
                                             << r) {
            BOOST_REQUIRE(errors[r] != nullptr);
            try {
              std::rethrow_exception(errors[r]);
            } catch (const transport_error& e) {
              BOOST_TEST(std::string_view(e.what()).find("different layers") != std::string_view::npos, e.what());
            } catch (const std::exception& e) {
              BOOST_FAIL("rank " << r << " raised another error: " << e.what());
            }
          }
        }
      }
    }
}

// A dynamic top_k above what the layout takes is refused when the layer is built (it was refused
// by every forward's layout, after construction and set_router had passed).
BOOST_AUTO_TEST_CASE(a_dynamic_top_k_above_the_layout_limit_is_refused_at_construction) {
  const auto topo = dynamic_topology(1, 1);
  const std::size_t experts = transport::max_dynamic_top_k + 6;
  const auto map = placement::linear{}.plan({topo, experts, experts, {std::vector<double>(experts, 1)}, {}}).at(0);
  const auto w = locus_test::model_weights<float>(3, experts, 4, 2);
  transport::local_fabric f(topo, transport_kind::flat);
  auto ep = f.endpoint(0);
  const auto make = [&](std::size_t k) {
    dyn_layer<transport::local_flat> layer(dyn_shape(experts, k, 4, 0), topo, ep, map,
                                           layer::swiglu_host<float>(expert_weights<float>::for_rank(map, 0, w), 1));
  };
  BOOST_CHECK_NO_THROW(make(transport::max_dynamic_top_k));
  const std::string why = locus_test::error_message<config_error>([&] { make(transport::max_dynamic_top_k + 1); });
  BOOST_TEST(why.find("top_k 65 exceeds the 64 a dynamic top_k takes") != std::string::npos, why);
}

// A static shape and topology, bf16 weights and activations, one shared expert, replicas.
// The backend is an object the layer is built with: a host backend's thread count reaches the
// step, and the result does not depend on it.
BOOST_AUTO_TEST_CASE(backend_object_is_taken_by_the_layer) {
  const auto c = locus_test::make_case(5, 1, 2);
  const auto all = locus_test::model_weights<float>(9, c.experts, c.hidden, 12);
  std::vector<std::vector<float>> y[2];
  for (unsigned threads : {1u, 3u}) {
    transport::local_fabric f(c.topo, transport_kind::flat);
    auto& out = y[threads == 1 ? 0 : 1];
    out.resize(c.topo.ranks());
    require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      dyn_layer<transport::local_flat> layer(
          dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
          layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1), backend::host{threads});
      if (layer.backend().threads != threads) throw std::runtime_error("the layer dropped its backend");
      const auto x = c.inputs(r);
      out[r].assign(x.size(), -1.0f);
      layer.forward(x, c.routings[r].view(), out[r]);
    }));
  }
  for (std::size_t r = 0; r < c.topo.ranks(); ++r)
    BOOST_TEST(y[0][r] == y[1][r]);
}

BOOST_AUTO_TEST_CASE(static_shape_bf16) {
  using shape = moe_shape<experts<8>, top_k<2>, hidden<32>, shared_experts<1>>;
  using topo = topology<nodes<2>, gpus_per_node<2>>;
  using compute = layer::swiglu_host<bfloat16, bfloat16>;
  using layer_t = moe_layer<shape, topo, transport::local_hierarchical, compute>;
  static_assert(std::is_same_v<layer_t::value_type, bfloat16>);
  constexpr std::size_t ffn = 24, tokens = 19;
  // Experts 0..7 on 4 ranks × 3 slots, hot experts 0 and 5 replicated on the other node.
  const expert_map map(8, 4, 3, {0, 1, empty_slot, 2, 3, 5, 4, 5, 0, 6, 7, empty_slot});
  const auto all = locus_test::model_weights<bfloat16>(77, 8, 32, ffn);
  const auto shared_w = locus_test::model_weights<bfloat16>(78, 1, 32, ffn);
  std::vector<routing<top_k<2>>> routings;
  std::vector<std::vector<bfloat16>> xs, ys(4);
  std::mt19937 rng(5);
  for (std::size_t r = 0; r < 4; ++r) {
    routing<top_k<2>> rt(tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      const auto a = static_cast<expert_id>(rng() % 8), b = static_cast<expert_id>((a + 1 + rng() % 7) % 8);
      rt.view().expert(t, 0) = a;
      rt.view().expert(t, 1) = b;
      rt.view().weight(t, 0) = 0.7f;
      rt.view().weight(t, 1) = 0.3f;
    }
    routings.push_back(rt);
    xs.push_back(locus_test::random_rows<bfloat16>(100 + r, tokens, 32));
  }
  transport::local_fabric f(dynamic_topology(2, 2), transport_kind::hierarchical);
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    const std::size_t r = ep.rank();
    layer_t layer(shape{}, topo{}, ep, map, compute(expert_weights<bfloat16>::for_rank(map, r, all), 1));
    layer.set_shared_experts(compute(shared_w, 1));
    ys[r].resize(tokens * 32);
    layer.forward(xs[r], routings[r].view(), ys[r]);
  }));
  for (std::size_t r = 0; r < 4; ++r) {
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(xs[r], routings[r].view(), all, &shared_w, &scale);
    // Expert outputs, their weighted sums and the final sum are each rounded to bfloat16.
    const double w = worst_ratio(ys[r], ref, scale, 0.0, 3.0 / 256);
    BOOST_TEST(w <= 1.0, "rank " << r << ": error / tolerance " << w);
  }
}

// Llama 4 in bf16 as the engines compute it (Hugging Face: the sigmoid score cast to the hidden
// states' type, then routed_in * score; vLLM: topk_weights.to(a1.dtype) before the multiply): the
// expert's input row is bf16(x · bf16(w)). Through an identity expert, top-1, flat and hierarchical,
// the layer's output is that row bit for bit; the product with the fp32 weight differs on some.
struct identity_bf16_expert {
  using policy_concept = expert_compute_tag;
  using activation_type = bfloat16;
  void operator()(const layer::expert_blocks<bfloat16>& b) const {
    for (std::size_t r = 0; r < b.total_rows(); ++r)
      std::copy_n(b.input_row(r), b.hidden, b.output + r * b.hidden);
  }
};

BOOST_AUTO_TEST_CASE(bf16_expert_input_is_scaled_by_the_bf16_weight) {
  using shape = moe_shape<experts<8>, top_k<1>, hidden<32>, shared_experts<0>>;
  constexpr std::size_t H = 32, tokens = 23;
  const expert_map map(8, 4, 3, {0, 1, empty_slot, 2, 3, 5, 4, 5, 0, 6, 7, empty_slot});
  std::vector<routing<top_k<1>>> routings;
  std::vector<std::vector<bfloat16>> xs;
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> score(0.05f, 0.95f);
  for (std::size_t r = 0; r < 4; ++r) {
    routing<top_k<1>> rt(tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      rt.view().expert(t, 0) = static_cast<expert_id>(rng() % 8);
      rt.view().weight(t, 0) = score(rng); // a sigmoid score: not a bf16 value in general
    }
    routings.push_back(rt);
    xs.push_back(locus_test::random_rows<bfloat16>(200 + r, tokens, H));
  }
  for (const auto kind : {transport_kind::flat, transport_kind::hierarchical}) {
    transport::local_fabric f(dynamic_topology(2, 2), kind);
    std::vector<std::vector<bfloat16>> ys(4);
    require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      const auto run = [&]<class Transport>(Transport) {
        moe_layer<shape, topology<nodes<2>, gpus_per_node<2>>, Transport, identity_bf16_expert,
                  layer::given_routing_at<weight_site::expert_input>>
            layer(shape{}, topology<nodes<2>, gpus_per_node<2>>{}, ep, map, identity_bf16_expert{});
        ys[r].resize(tokens * H);
        layer.forward(xs[r], routings[r].view(), ys[r]);
      };
      with_transport(kind, run);
    }));
    std::size_t differ = 0, wrong = 0;
    for (std::size_t r = 0; r < 4; ++r)
      for (std::size_t t = 0; t < tokens; ++t) {
        const float w = routings[r].view().weight(t, 0);
        for (std::size_t h = 0; h < H; ++h) {
          const float x = static_cast<float>(xs[r][t * H + h]);
          const bfloat16 engine(static_cast<float>(bfloat16(w)) * x), unrounded(w * x);
          wrong += ys[r][t * H + h].bits != engine.bits;
          differ += engine.bits != unrounded.bits;
        }
      }
    BOOST_TEST(wrong == 0u, to_string(kind) << ": " << wrong << " elements differ from bf16(x · bf16(w))");
    BOOST_TEST(differ > 0u, "no element tells the rounded weight from the fp32 one");
  }
}

// A user callable as the expert compute: y = Σ_j w_j (e_j + 1) x, the transport tests' reference.
BOOST_AUTO_TEST_CASE(user_callable_expert_compute) {
  const auto c = locus_test::make_case(4242, 2, 2);
  auto scale = [](expert_id e, std::span<const float> in, std::span<float> out, std::size_t) {
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i];
  };
  using compute = layer::expert_callable<decltype(scale)>;
  transport::local_fabric f(c.topo, transport_kind::flat);
  std::vector<std::vector<float>> y(4);
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    moe_layer<dyn_shape, dynamic_topology, compute> layer(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
                                                          compute(scale));
    const auto x = c.inputs(ep.rank());
    y[ep.rank()].resize(x.size());
    layer.forward(x, c.routings[ep.rank()].view(), y[ep.rank()]);
  }));
  for (std::size_t r = 0; r < 4; ++r)
    BOOST_TEST(locus_test::max_error(y[r], c.reference(r)) <= 1e-5);
}

// A rank with a bad routing raises after the collective steps; its peers finish with correct
// outputs instead of waiting for it.
BOOST_AUTO_TEST_CASE(bad_routing_on_one_rank_raises_there_only) {
  auto c = locus_test::make_case(7, 2, 2);
  // Every rank gets tokens, so rank 1 has a token to spoil.
  routing<> good(3, top_k<>(c.k));
  for (std::size_t t = 0; t < 3; ++t)
    for (std::size_t j = 0; j < c.k; ++j) {
      good.view().expert(t, j) = static_cast<expert_id>(j);
      good.view().weight(t, j) = 0.5f;
    }
  for (auto& r : c.routings)
    if (r.tokens() == 0) r = good;
  routing<> bad = c.routings[1];
  bad.view().expert(0, 0) = static_cast<expert_id>(c.experts + 3);
  const auto all = locus_test::model_weights<float>(3, c.experts, c.hidden, 8);
  transport::local_fabric f(c.topo, transport_kind::hierarchical,
                            transport::exchange_options{std::chrono::milliseconds(5000)});
  std::vector<std::vector<float>> y(4);
  const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
    const std::size_t r = ep.rank();
    dyn_layer<transport::local_hierarchical> layer(
        dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
        layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
    const auto x = c.inputs(r);
    y[r].resize(x.size());
    layer.forward(x, r == 1 ? bad.view() : c.routings[r].view(), y[r]);
  });
  try {
    std::rethrow_exception(errors[1]);
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find("out of range") != std::string::npos, e.what());
  } catch (...) {
    BOOST_FAIL("rank 1 should raise invalid_input_error");
  }
  for (std::size_t r : {0u, 2u, 3u}) {
    BOOST_TEST(!errors[r]);
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, nullptr, &scale);
    BOOST_TEST(worst_ratio(y[r], ref, scale, 0.0, 2e-6) <= 1.0);
  }
}

BOOST_AUTO_TEST_CASE(inconsistent_composition_is_refused) {
  const dynamic_topology topo(1, 2);
  const expert_map map(4, 2, 2, {0, 1, 2, 3});
  const auto all = locus_test::model_weights<float>(1, 4, 8, 8);
  transport::local_fabric flat(topo, transport_kind::flat);
  auto ep = flat.endpoint(0);
  const auto mine = expert_weights<float>::for_rank(map, 0, all);
  using layer_t = dyn_layer<transport::local_flat>;
  // Wrong expert count in the shape.
  BOOST_CHECK_THROW(layer_t(dyn_shape(5, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(mine)), config_error);
  // Topology differs from the transport's.
  BOOST_CHECK_THROW(layer_t(dyn_shape(4, 2, 8, 0), dynamic_topology(2, 1), ep, map, layer::swiglu_host<float>(mine)),
                    config_error);
  // ... in its rank count too (with a map for the layer's one rank): the layer says so, not the
  // dispatcher it builds from them.
  const expert_map one_rank(4, 1, 4, {0, 1, 2, 3});
  BOOST_TEST(locus_test::error_message<config_error>([&] {
               layer_t(dyn_shape(4, 2, 8, 0), dynamic_topology(1, 1), ep, one_rank,
                       layer::swiglu_host<float>(expert_weights<float>::for_rank(one_rank, 0, all)));
             }) == "moe_layer: the layer's topology is 1 nodes × 1 GPUs but the transport's is 1 × 2");
  // The compute lacks expert 1, hosted on rank 0.
  BOOST_CHECK_THROW(
      layer_t(dyn_shape(4, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(expert_weights<float>(8, 8, {0}))),
      config_error);
  // A hierarchical policy on a flat endpoint.
  BOOST_CHECK_THROW(
      dyn_layer<transport::local_hierarchical>(dyn_shape(4, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(mine)),
      config_error);
  // Shared experts on a shape without them, and a shared compute lacking expert 1.
  layer_t ok(dyn_shape(4, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(mine));
  // The backend's thread bound reaches a compute left at all hardware threads, not one given its own.
  BOOST_TEST(ok.experts().threads() == 0u);
  BOOST_TEST(layer_t(dyn_shape(4, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(mine), backend::host{1})
                 .experts()
                 .threads() == 1u);
  BOOST_TEST(layer_t(dyn_shape(4, 2, 8, 0), topo, ep, map, layer::swiglu_host<float>(mine, 3), backend::host{1})
                 .experts()
                 .threads() == 3u);
  BOOST_CHECK_THROW(ok.set_shared_experts(layer::swiglu_host<float>(all)), config_error);
  layer_t two(dyn_shape(4, 2, 8, 2), topo, ep, map, layer::swiglu_host<float>(mine));
  BOOST_CHECK_THROW(two.set_shared_experts(layer::swiglu_host<float>(expert_weights<float>(8, 8, {0}))), config_error);
  // Weights of hidden size 8 for a shape of hidden size 16: refused when the layer is built, not
  // by the first forward.
  const auto wide = locus_test::model_weights<float>(1, 4, 16, 8);
  BOOST_CHECK_THROW(layer_t(dyn_shape(4, 2, 16, 0), topo, ep, map, layer::swiglu_host<float>(mine)), config_error);
  layer_t shared16(dyn_shape(4, 2, 16, 1), topo, ep, map,
                   layer::swiglu_host<float>(expert_weights<float>::for_rank(map, 0, wide)));
  BOOST_CHECK_THROW(shared16.set_shared_experts(layer::swiglu_host<float>(all)), config_error);
  BOOST_CHECK_NO_THROW(shared16.set_shared_experts(layer::swiglu_host<float>(wide)));
}

// The whole step with the router: logits = x·W_router, softmax top-k, dispatch, SwiGLU, combine,
// shared expert; against a double-precision router and the dense MoE.
BOOST_AUTO_TEST_CASE(forward_with_softmax_router_matches_reference) {
  constexpr std::size_t E = 12, K = 3, H = 20, F = 16, tokens = 23;
  const dynamic_topology topo(2, 2);
  const expert_map map = placement::linear{}.plan({topo, E, 4, {std::vector<double>(E, 1.0)}, {}})[0];
  const auto all = locus_test::model_weights<float>(91, E, H, F);
  const auto shared_w = locus_test::model_weights<float>(92, 1, H, F);
  const auto gate = locus_test::random_rows<float>(93, H, E);
  using layer_t = moe_layer<dyn_shape, dynamic_topology, transport::local_hierarchical>;
  static_assert(std::is_same_v<layer_t::router_type, router::softmax_topk<top_k<>>>);
  transport::local_fabric f(topo, transport_kind::hierarchical);
  std::vector<std::vector<float>> xs(4), ys(4);
  std::vector<std::vector<expert_id>> got_ids(4);
  for (std::size_t r = 0; r < 4; ++r)
    xs[r] = locus_test::random_rows<float>(200 + r, tokens + r, H);
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    const std::size_t r = ep.rank();
    layer_t layer(dyn_shape(E, K, H, 1), topo, ep, map,
                  layer::swiglu_host<float>(expert_weights<float>::for_rank(map, r, all), 1));
    layer.set_router(gate);
    layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
    ys[r].resize(xs[r].size());
    layer.forward(xs[r], ys[r]);
    got_ids[r] = layer.last_routing().ids();
  }));
  for (std::size_t r = 0; r < 4; ++r) {
    std::vector<expert_id> ids;
    std::vector<float> w;
    locus_test::reference_softmax_topk(xs[r], gate, H, E, K, true, ids, w);
    BOOST_TEST(got_ids[r] == ids, "rank " << r << ": the router chose other experts than the reference");
    routing<> ref_routing(ids, w, top_k<>(K));
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(xs[r], ref_routing.view(), all, &shared_w, &scale);
    // The weights come from fp32 logits and softmax: allow their relative error on top.
    const double worst = worst_ratio(ys[r], ref, scale, 0.0, 1e-5);
    BOOST_TEST(worst <= 1.0, "rank " << r << ": error / tolerance " << worst);
  }
}

// Router logits rounded to bf16, as an engine's bf16 router linear layer gives them (Qwen3, Mixtral,
// Llama 4): the layer routes what the router policy routes on those rounded logits, and the weights
// differ from the fp32 logits' routing.
BOOST_AUTO_TEST_CASE(router_logits_rounded_to_bf16_are_what_the_router_sees) {
  constexpr std::size_t E = 16, K = 4, H = 24, F = 8, T = 40;
  const dynamic_topology topo(1, 2);
  const expert_map map = placement::linear{}.plan({topo, E, 8, {std::vector<double>(E, 1.0)}, {}})[0];
  const auto all = locus_test::model_weights<float>(71, E, H, F);
  const auto gate = locus_test::random_rows<float>(72, H, E);
  std::vector<std::vector<float>> xs(2), w_bf16(2), w_fp32(2);
  std::vector<std::vector<expert_id>> ids_bf16(2);
  for (std::size_t r = 0; r < 2; ++r)
    xs[r] = locus_test::random_rows<float>(400 + r, T, H);
  transport::local_fabric f(topo, transport_kind::flat);
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    const std::size_t r = ep.rank();
    dyn_layer<transport::local_flat> layer(dyn_shape(E, K, H, 0), topo, ep, map,
                                           layer::swiglu_host<float>(expert_weights<float>::for_rank(map, r, all), 1));
    std::vector<float> y(xs[r].size());
    layer.set_router(gate, layer::router_logits::bf16);
    layer.forward(xs[r], y);
    ids_bf16[r] = layer.last_routing().ids();
    w_bf16[r] = layer.last_routing().weights();
    layer.set_router(gate);
    layer.forward(xs[r], y);
    w_fp32[r] = layer.last_routing().weights();
  }));
  for (std::size_t r = 0; r < 2; ++r) {
    // The logits as the layer sums them (fp32, hidden ascending), rounded to bf16, routed.
    std::vector<float> logits(T * E, 0.0f);
    for (std::size_t t = 0; t < T; ++t)
      for (std::size_t h = 0; h < H; ++h)
        for (std::size_t e = 0; e < E; ++e)
          logits[t * E + e] += xs[r][t * H + h] * gate[h * E + e];
    for (auto& v : logits)
      v = static_cast<float>(bfloat16(v));
    const auto want = router::softmax_topk<top_k<>>(K).route(router::logits_view<>(logits.data(), T, experts<>(E)));
    BOOST_TEST(ids_bf16[r] == want.ids(), "rank " << r);
    BOOST_TEST(w_bf16[r] == want.weights(), "rank " << r);
    BOOST_TEST(w_bf16[r] != w_fp32[r], "rank " << r << ": rounding the logits moved no weight");
  }
}

// Llama 4's step: logits = x·W_router, the top-1 sigmoid router, the routed expert on w·x (the
// router's weight scales the expert input), the shared expert on x; against a double-precision router
// and the dense MoE with the weights on the input, flat and hierarchical.
BOOST_AUTO_TEST_CASE(sigmoid_top1_layer_weights_the_expert_input) {
  constexpr std::size_t E = 16, H = 24, F = 20, tokens = 31;
  const dynamic_topology topo(2, 2);
  const expert_map map = placement::linear{}.plan({topo, E, 5, {std::vector<double>(E, 1.0)}, {}})[0];
  const auto all = locus_test::model_weights<float>(61, E, H, F);
  const auto shared_w = locus_test::model_weights<float>(62, 1, H, F);
  const auto gate = locus_test::random_rows<float>(63, H, E);
  for (const auto kind : {transport_kind::flat, transport_kind::hierarchical}) {
    transport::local_fabric f(topo, kind);
    std::vector<std::vector<float>> xs(4), ys(4);
    std::vector<std::vector<expert_id>> got_ids(4);
    std::vector<std::vector<float>> got_w(4);
    for (std::size_t r = 0; r < 4; ++r)
      xs[r] = locus_test::random_rows<float>(300 + r, tokens + 3 * r, H);
    require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      const auto run = [&]<class Transport>(Transport) {
        using layer_t = moe_layer<dyn_shape, dynamic_topology, router::sigmoid_top1, Transport>;
        static_assert(layer_t::routing_weight_site == weight_site::expert_input);
        layer_t layer(dyn_shape(E, 1, H, 1), topo, ep, map,
                      layer::swiglu_host<float>(expert_weights<float>::for_rank(map, r, all), 1));
        layer.set_router(router::sigmoid_top1{}, gate);
        layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
        ys[r].resize(xs[r].size());
        layer.forward(xs[r], ys[r]);
        got_ids[r] = layer.last_routing().ids();
        got_w[r] = layer.last_routing().weights();
      };
      with_transport(kind, run);
    }));
    for (std::size_t r = 0; r < 4; ++r) {
      BOOST_TEST_CONTEXT(to_string(kind) << ", rank " << r) {
        // The reference router: the largest logit (in double), weight sigmoid(logit).
        const std::size_t T = xs[r].size() / H;
        routing<> ref_routing(T, top_k<>(1));
        for (std::size_t t = 0; t < T; ++t) {
          double best = -1e300;
          std::size_t arg = 0;
          for (std::size_t e = 0; e < E; ++e) {
            double l = 0;
            for (std::size_t h = 0; h < H; ++h)
              l += double(xs[r][t * H + h]) * gate[h * E + e];
            if (l > best) best = l, arg = e;
          }
          ref_routing.view().expert(t, 0) = static_cast<expert_id>(arg);
          ref_routing.view().weight(t, 0) = static_cast<float>(1.0 / (1.0 + std::exp(-best)));
          BOOST_TEST(got_ids[r].at(t) == static_cast<expert_id>(arg), "token " << t);
          BOOST_TEST(std::abs(got_w[r].at(t) - ref_routing.view().weight(t, 0)) <= 1e-6, "token " << t);
        }
        std::vector<double> scale;
        const auto ref =
            locus_test::dense_moe(xs[r], ref_routing.view(), all, &shared_w, &scale, weight_site::expert_input);
        const double worst = worst_ratio(ys[r], ref, scale, 0.0, 1e-5);
        BOOST_TEST(worst <= 1.0, "error / tolerance " << worst);
        const auto output_weighted = locus_test::dense_moe(xs[r], ref_routing.view(), all, &shared_w, &scale);
        BOOST_TEST(worst_ratio(ys[r], output_weighted, scale, 0.0, 1e-5) > 1.0,
                   "the output-weighted MoE is as close: the test cannot tell the sites apart");
      }
    }
  }
}

// Ranks whose layers apply the weights at different sites would each weight the other's tokens as
// its own router says, silently: the site enters every exchange's agreement, and all ranks raise.
BOOST_AUTO_TEST_CASE(ranks_applying_weights_at_different_sites_raise) {
  const auto c = locus_test::make_case(5, 2, 2);
  const auto all = locus_test::model_weights<float>(5, c.experts, c.hidden, 6);
  for (const auto kind : {transport_kind::flat, transport_kind::hierarchical}) {
    transport::local_fabric f(c.topo, kind, transport::exchange_options{std::chrono::milliseconds(2000)});
    const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      const auto x = c.inputs(r);
      std::vector<float> y(x.size());
      const auto run = [&]<class Transport, weight_site Site>(Transport, std::integral_constant<weight_site, Site>) {
        dyn_layer<Transport, layer::given_routing_at<Site>> layer(
            dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
            layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
        layer.forward(x, c.routings[r].view(), y);
      };
      using in = std::integral_constant<weight_site, weight_site::expert_input>;
      using out = std::integral_constant<weight_site, weight_site::expert_output>;
      if (kind == transport_kind::flat)
        r == 0 ? run(transport::local_flat{}, in{}) : run(transport::local_flat{}, out{});
      else
        r == 0 ? run(transport::local_hierarchical{}, in{}) : run(transport::local_hierarchical{}, out{});
    });
    for (std::size_t r = 0; r < errors.size(); ++r)
      BOOST_TEST_CONTEXT(to_string(kind) << ", rank " << r) {
        BOOST_TEST_REQUIRE(static_cast<bool>(errors[r]));
        try {
          std::rethrow_exception(errors[r]);
        } catch (const transport_error& e) {
          const std::string what = e.what();
          BOOST_TEST(
              (what.find("different sites") != std::string::npos || what.find("it left the step") != std::string::npos),
              what);
        } catch (const std::exception& e) {
          BOOST_ERROR("another error: " << e.what());
        }
      }
  }
}

// A router that fails on one rank (a non-finite input gives a non-finite logit) raises there after
// the collective steps; the other ranks finish.
BOOST_AUTO_TEST_CASE(router_failure_on_one_rank_raises_there_only) {
  constexpr std::size_t E = 8, K = 2, H = 8;
  const dynamic_topology topo(1, 2);
  const expert_map map(E, 2, 4, {0, 1, 2, 3, 4, 5, 6, 7});
  const auto all = locus_test::model_weights<float>(5, E, H, 8);
  transport::local_fabric f(topo, transport_kind::flat, transport::exchange_options{std::chrono::milliseconds(5000)});
  using layer_t = moe_layer<dyn_shape, dynamic_topology, transport::local_flat>;
  const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
    layer_t layer(dyn_shape(E, K, H, 0), topo, ep, map,
                  layer::swiglu_host<float>(expert_weights<float>::for_rank(map, ep.rank(), all), 1));
    layer.set_router(locus_test::random_rows<float>(1, H, E));
    auto x = locus_test::random_rows<float>(2, 5, H);
    if (ep.rank() == 1) x[3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> y(x.size());
    layer.forward(x, y);
  });
  BOOST_TEST(!errors[0]);
  BOOST_REQUIRE(errors[1]);
  try {
    std::rethrow_exception(errors[1]);
  } catch (const invalid_input_error&) {
  } catch (const std::exception& e) {
    BOOST_FAIL("rank 1 raised the wrong error: " << e.what());
  }
}

// Wrong input or output sizes on one rank: raised there, after the collective steps.
BOOST_AUTO_TEST_CASE(wrong_sizes_on_one_rank_raise_there_only) {
  const auto c = locus_test::make_case(21, 1, 3);
  const auto all = locus_test::model_weights<float>(4, c.experts, c.hidden, 8);
  transport::local_fabric f(c.topo, transport_kind::flat, transport::exchange_options{std::chrono::milliseconds(5000)});
  for (int which = 0; which < 2; ++which) {
    std::vector<std::vector<float>> y(3);
    const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      layer::swiglu_host<float> compute(expert_weights<float>::for_rank(c.map, r, all), 1);
      dyn_layer<transport::local_flat> layer(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map, compute);
      auto x = c.inputs(r);
      y[r].resize(x.size());
      if (r == 2) (which == 0 ? x : y[r]).push_back(0.0f); // one value too many
      layer.forward(x, c.routings[r].view(), y[r]);
    });
    BOOST_TEST(!errors[0]);
    BOOST_TEST(!errors[1]);
    BOOST_REQUIRE(errors[2]);
    try {
      std::rethrow_exception(errors[2]);
    } catch (const invalid_input_error&) {
    } catch (const std::exception& e) {
      BOOST_FAIL("rank 2 raised the wrong error: " << e.what());
    }
    for (std::size_t r = 0; r < 2; ++r) {
      std::vector<double> scale;
      const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, nullptr, &scale);
      BOOST_TEST(worst_ratio(y[r], ref, scale, 0.0, 2e-6) <= 1.0);
    }
  }
}

// An engine keeps one layer per model layer, e.g. in a std::vector, which moves them as it grows.
// The layer's dispatcher points at the layer's expert map: the map must not move with the layer
// (it did, and the moved layer's step read the freed map: heap-use-after-free under ASan).
BOOST_AUTO_TEST_CASE(layers_stay_valid_when_moved) {
  static_assert(std::is_move_constructible_v<dyn_layer<transport::local_flat>>);
  static_assert(!std::is_copy_constructible_v<dyn_layer<transport::local_flat>>,
                "a layer is one rank's endpoint of collective steps: not copied");
  const auto c = locus_test::make_case(4243, 2, 2);
  auto scale = [](expert_id e, std::span<const float> in, std::span<float> out, std::size_t) {
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i];
  };
  using compute = layer::expert_callable<decltype(scale)>;
  using layer_t = moe_layer<dyn_shape, dynamic_topology, compute>;
  transport::local_fabric f(c.topo, transport_kind::flat);
  std::vector<double> worst(4, 0.0);
  std::vector<int> maps_equal(4, 1), moved_from_refused(4, 0);
  require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
    std::vector<layer_t> layers; // no reserve: every emplace_back past the capacity moves the others
    for (int l = 0; l < 5; ++l)
      layers.emplace_back(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map, compute(scale));
    layers.push_back(std::move(layers.front())); // and one moved out of its place by hand
    const std::size_t r = ep.rank();
    const auto x = c.inputs(r);
    std::vector<float> y(x.size());
    for (std::size_t l = 1; l < layers.size(); ++l) {
      maps_equal[r] &= layers[l].map() == c.map;
      layers[l].forward(x, c.routings[r].view(), y);
      worst[r] = std::max(worst[r], locus_test::max_error(y, c.reference(r)));
    }
    // The layer moved from is refused at once, with no exchange (it read the moved-out map and
    // router: a segfault).
    try {
      layers.front().forward(x, c.routings[r].view(), y);
    } catch (const config_error& e) {
      moved_from_refused[r] = std::string(e.what()).find("moved from") != std::string::npos;
    }
  }));
  for (std::size_t r = 0; r < 4; ++r) {
    BOOST_TEST(maps_equal[r]);
    BOOST_TEST(worst[r] <= 1e-5);
    BOOST_TEST(moved_from_refused[r]);
  }
}

// forward(x, x): in place. The shared experts run after combine wrote y, and read the routed output
// instead of the input until they read a copy; the routed part reads x before combine. Flat and
// hierarchical, with and without shared experts: in place equals out of place.
template <class Transport>
void in_place_equals_out_of_place() {
  const auto c = locus_test::make_case(515, 2, 2);
  for (const std::size_t shared : {0u, 2u}) {
    const auto all = locus_test::model_weights<float>(5, c.experts, c.hidden, 8);
    const auto shared_w = locus_test::model_weights<float>(6, shared, c.hidden, 8);
    transport::local_fabric f(c.topo, Transport::kind);
    std::vector<int> equal(4, 0);
    require_no_errors(on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      dyn_layer<Transport> layer(dyn_shape(c.experts, c.k, c.hidden, shared), c.topo, ep, c.map,
                                 layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
      if (shared > 0) layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
      const auto x = c.inputs(r);
      std::vector<float> y(x.size()), xy = x;
      layer.forward(x, c.routings[r].view(), y);
      layer.forward(xy, c.routings[r].view(), xy);
      equal[r] = xy == y;
    }));
    for (std::size_t r = 0; r < 4; ++r)
      BOOST_TEST(equal[r], "rank " << r << ", " << to_string(Transport::kind) << ", " << shared << " shared experts");
  }
}

BOOST_AUTO_TEST_CASE(in_place_forward_equals_out_of_place) {
  in_place_equals_out_of_place<transport::local_flat>();
  in_place_equals_out_of_place<transport::local_hierarchical>();
}

// Ranks that step with different expert maps (one loaded a re-planned map a step before the
// others) raise, instead of routing rows by two maps (same sizes: silently wrong outputs; an empty
// slot where a peer's entry lands: one rank raised and its peers waited out the timeout). Flat: in
// the step's exchange over the world, every rank raises naming the maps. Hierarchical: the members
// of a rail whose maps differ raise in the rail stage, and meet their node peers in the node stage
// with no request, so that those raise at once too (they waited out the timeout).
BOOST_AUTO_TEST_CASE(ranks_with_different_maps_raise) {
  const auto c = locus_test::make_case(77, 2, 2);
  const expert_map other = locus_test::ranks_traded(c.map); // rank 0's map
  BOOST_TEST_REQUIRE(!(other == c.map));
  BOOST_TEST(other.fingerprint() != c.map.fingerprint());
  auto scale = [](expert_id e, std::span<const float> in, std::span<float> out, std::size_t) {
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i];
  };
  using compute = layer::expert_callable<decltype(scale)>;
  for (const auto kind : {transport_kind::flat, transport_kind::hierarchical}) {
    transport::local_fabric f(c.topo, kind, transport::exchange_options{std::chrono::milliseconds(1000)});
    const auto errors = on_ranks(f, [&](transport::local_transport& ep) {
      const std::size_t r = ep.rank();
      const expert_map& map = r == 0 ? other : c.map;
      const auto x = c.inputs(r);
      std::vector<float> y(x.size());
      if (kind == transport_kind::flat) {
        moe_layer<dyn_shape, dynamic_topology, compute> layer(dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, map,
                                                              compute(scale));
        layer.forward(x, c.routings[r].view(), y);
      } else {
        moe_layer<dyn_shape, dynamic_topology, compute, transport::local_hierarchical> layer(
            dyn_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, map, compute(scale));
        layer.forward(x, c.routings[r].view(), y);
      }
    });
    for (std::size_t r = 0; r < 4; ++r) {
      BOOST_TEST_CONTEXT(to_string(kind) << ", rank " << r) {
        BOOST_TEST_REQUIRE(static_cast<bool>(errors[r]));
        // Rails: ranks 0 and 2 share one, 1 and 3 the other.
        const bool named = kind == transport_kind::flat || r == 0 || r == 2;
        try {
          std::rethrow_exception(errors[r]);
        } catch (const transport_error& e) {
          BOOST_TEST(std::string(e.what()).find(named ? "step with different expert maps" : "it left the step") !=
                         std::string::npos,
                     e.what());
        } catch (const std::exception& e) {
          BOOST_ERROR("another error: " << e.what());
        }
      }
    }
  }
}

// A router that does not suit the shape's experts is refused by set_router, not by the first
// forward (which raises it only after the step's exchanges). Static extents make it a compile
// error (tests/compile_fail/layer_router_groups.cpp).
BOOST_AUTO_TEST_CASE(set_router_checks_the_router_against_the_experts) {
  const dynamic_topology topo(1, 1);
  const expert_map map(8, 1, 8, {0, 1, 2, 3, 4, 5, 6, 7});
  transport::local_fabric f(topo, transport_kind::flat);
  auto ep = f.endpoint(0);
  auto none = [](expert_id, std::span<const float>, std::span<float>, std::size_t) {};
  using compute = layer::expert_callable<decltype(none)>;
  using grouped = router::sigmoid_grouped<groups<>, top_groups<>, top_k<>>;
  moe_layer<dyn_shape, dynamic_topology, grouped, compute> l(dyn_shape(8, 2, 4, 0), topo, ep, map, compute(none));
  const std::vector<float> gate(4 * 8, 0.0f);
  try {
    l.set_router(grouped(3, 1, 2), gate);
    BOOST_FAIL("expected config_error");
  } catch (const config_error& e) {
    BOOST_TEST(std::string(e.what()).find("8 experts do not split into 3 equal groups") != std::string::npos, e.what());
  }
  BOOST_CHECK_THROW(l.set_router(grouped(8, 1, 2), gate), config_error);                              // 1 per group
  BOOST_CHECK_THROW(l.set_router(grouped(4, 1, 2, std::vector<float>(7, 0.0f)), gate), config_error); // bias of 7
  BOOST_CHECK_NO_THROW(l.set_router(grouped(4, 2, 2, std::vector<float>(8, 0.0f)), gate));
}
