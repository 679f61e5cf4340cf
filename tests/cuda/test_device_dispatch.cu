// Device dispatch + cuBLAS expert compute + device combine over the one-GPU multi-rank device
// transport (ranks as threads, each with its own stream), against the dense double-precision MoE
// reference; no token row goes through the host.
#define BOOST_TEST_MODULE device_dispatch
#include "../mpi/dispatch_cases.hpp"
#include "../support/hold_stream.cuh"
#include "../support/moe_reference.hpp"

#include <boost/test/unit_test.hpp>
#include <cmath>
#include <exception>
#include <limits>
#include <locus/core/device_buffer.hpp>
#include <locus/layer/expert_compute_cuda.hpp>
#include <locus/layer/moe_layer_cuda.hpp>
#include <locus/router/sigmoid_top1.hpp>
#include <locus/router/softmax_topk.hpp>
#include <locus/transport/device_dispatch.hpp>
#include <locus/transport/device_local.hpp>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

using namespace locus;
using namespace locus::transport;
using experts_t = locus::experts<>;

namespace {

// One case with a static top-k K (the kernels are instantiated for it); y[r] per rank.
template <std::size_t K>
std::vector<std::vector<float>> run_device(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                                           transport_kind kind) {
  device_local_fabric fabric(c.topo, kind);
  const std::size_t R = c.topo.ranks();
  std::vector<std::vector<float>> y(R);
  std::vector<std::exception_ptr> errors(R);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t stream = nullptr;
      try {
        LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        auto ep = fabric.endpoint(r, stream);
        layer::swiglu_cuda<float> compute(layer::expert_weights<float>::for_rank(c.map, r, all), stream);
        device_dispatcher<device_local_transport, float, top_k<K>> d(ep, c.map, c.hidden, stream);
        const auto x = c.inputs(r);
        const auto& routing = c.routings[r];
        device_buffer<float> dx, dy(x.size()), w;
        device_buffer<expert_id> ids;
        dx.upload(x, stream);
        ids.upload(routing.ids(), stream);
        w.upload(routing.weights(), stream);
        // Two steps: the second reuses every buffer.
        for (int step = 0; step < 2; ++step) {
          ep.begin_step(static_cast<std::uint64_t>(step));
          d.dispatch(dx.data(), device_routing_view<top_k<K>>(ids.data(), w.data(), routing.tokens()));
          compute(d.blocks());
          d.combine(dy.data());
        }
        d.finish(); // the last step's device check
        y[r].resize(x.size());
        dy.download(y[r], stream);
      } catch (...) {
        errors[r] = std::current_exception();
      }
      if (stream) cudaStreamDestroy(stream);
    });
  for (auto& t : threads)
    t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return y;
}

// The same step through moe_layer<..., Transport, backend::cuda>::forward on device rows.
template <std::size_t K, class Transport = device_local_flat>
std::vector<std::vector<float>> run_layer(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                                          std::vector<std::exception_ptr>* errors_out = nullptr,
                                          const expert_map* rank0_map = nullptr) {
  using shape = moe_shape<experts<>, top_k<K>, hidden<>, shared_experts<>>;
  using layer_t = moe_layer<shape, dynamic_topology, Transport, backend::cuda, layer::given_routing>;
  device_local_fabric fabric(c.topo, Transport::kind);
  const std::size_t R = c.topo.ranks();
  std::vector<std::vector<float>> y(R);
  std::vector<std::exception_ptr> errors(R);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t stream = nullptr;
      try {
        LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        auto ep = fabric.endpoint(r, stream);
        layer_t l(shape(c.experts, K, c.hidden, 0), c.topo, ep, r == 0 && rank0_map ? *rank0_map : c.map,
                  layer::swiglu_cuda<float>(layer::expert_weights<float>::for_rank(c.map, r, all), stream),
                  backend::cuda{stream});
        const auto x = c.inputs(r);
        const auto& routing = c.routings[r];
        device_buffer<float> dx, dy(x.size()), w;
        device_buffer<expert_id> ids;
        dx.upload(x, stream);
        ids.upload(routing.ids(), stream);
        w.upload(routing.weights(), stream);
        for (int step = 0; step < 2; ++step) {
          ep.begin_step(static_cast<std::uint64_t>(step));
          // A rank that raises has still taken part in the step: it goes on to the next with its peers.
          try {
            l.forward(dx.data(), device_routing_view<top_k<K>>(ids.data(), w.data(), routing.tokens()), dy.data());
          } catch (const invalid_input_error&) {
            if (!errors[r]) errors[r] = std::current_exception();
          }
        }
        l.finish(); // the last step's device check
        y[r].resize(x.size());
        dy.download(y[r], stream);
      } catch (...) {
        errors[r] = std::current_exception();
      }
      if (stream) cudaStreamDestroy(stream);
    });
  for (auto& t : threads)
    t.join();
  if (errors_out) {
    *errors_out = errors;
    return y;
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return y;
}

// Router weights, multiples of 1/64: with the inputs' multiples of 1/16 every logit is exact in
// fp32, so neither side's summation order can change a routing.
std::vector<float> router_gate(std::uint64_t seed, std::size_t hidden, std::size_t experts) {
  std::vector<float> g(hidden * experts);
  for (std::size_t i = 0; i < g.size(); ++i)
    g[i] = static_cast<float>(static_cast<int>((i * 37 + seed * 101) % 29) - 14) / 64.0f;
  return g;
}

// The host routing of x: fp32 logits, then the host softmax_topk.
routing<> host_routing(const std::vector<float>& x, const std::vector<float>& gate, std::size_t hidden,
                       std::size_t experts, std::size_t k, layer::router_logits rounding = layer::router_logits::fp32) {
  const std::size_t T = x.size() / hidden;
  std::vector<float> logits(T * experts, 0.0f);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t h = 0; h < hidden; ++h)
      for (std::size_t e = 0; e < experts; ++e)
        logits[t * experts + e] += x[t * hidden + h] * gate[h * experts + e];
  if (rounding == layer::router_logits::bf16)
    for (float& l : logits)
      l = static_cast<float>(bfloat16(l));
  routing<> r(T, top_k<>(k));
  router::softmax_topk<top_k<>>(k).route(
      router::logits_view<experts_t, const float>(logits.data(), T, experts_t(experts)), r.view());
  return r;
}

// What one rank of a device-routed run saw.
struct routed_rank {
  std::vector<float> x, y, weights;
  std::vector<expert_id> ids;
  std::exception_ptr error;
};

// Runs body(r, stream, out[r]) for each of `ranks` ranks on a thread of its own, each with a
// non-blocking stream of its own; what a rank raises lands in out[r].error.
template <class Body>
std::vector<routed_rank> on_device_ranks(std::size_t ranks, Body&& body) {
  std::vector<routed_rank> out(ranks);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t stream = nullptr;
      try {
        LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        body(r, stream, out[r]);
      } catch (...) {
        out[r].error = std::current_exception();
      }
      if (stream) cudaStreamDestroy(stream);
    });
  for (auto& t : threads)
    t.join();
  return out;
}

// The layer's last device routing (`k` choices per token) into o.ids and o.weights.
template <class Layer>
void download_routing(const Layer& l, std::size_t k, routed_rank& o) {
  const auto dr = l.last_device_routing();
  o.ids.resize(dr.tokens() * k);
  o.weights.resize(dr.tokens() * k);
  if (o.ids.empty()) return;
  LOCUS_CUDA_CHECK(cudaMemcpy(o.ids.data(), dr.ids(), o.ids.size() * sizeof(expert_id), cudaMemcpyDeviceToHost));
  LOCUS_CUDA_CHECK(
      cudaMemcpy(o.weights.data(), dr.weights(), o.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
}

// moe_layer<..., device_local_flat, backend::cuda> with its softmax_topk router, routed on the
// device: forward(x, tokens, y). `poison` ranks get a NaN in their first token's input.
template <std::size_t K>
std::vector<routed_rank> run_routed(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                                    const std::vector<float>& gate, const std::vector<bool>& poison,
                                    const layer::expert_weights<float>* shared = nullptr,
                                    const std::vector<float>* shared_gate = nullptr,
                                    layer::router_logits rounding = layer::router_logits::fp32) {
  using shape = moe_shape<experts<>, top_k<K>, hidden<>, shared_experts<>>;
  using layer_t = moe_layer<shape, dynamic_topology, device_local_flat, backend::cuda>;
  device_local_fabric fabric(c.topo, transport_kind::flat);
  return on_device_ranks(c.topo.ranks(), [&](std::size_t r, cudaStream_t stream, routed_rank& o) {
    auto ep = fabric.endpoint(r, stream);
    layer_t l(shape(c.experts, K, c.hidden, shared ? 1 : 0), c.topo, ep, c.map,
              layer::swiglu_cuda<float>(layer::expert_weights<float>::for_rank(c.map, r, all), stream),
              backend::cuda{stream});
    l.set_router(gate, rounding);
    if (shared)
      l.set_shared_experts(layer::swiglu_cuda<float>(*shared, stream),
                           shared_gate ? *shared_gate : std::vector<float>{});
    o.x = c.inputs(r);
    const std::size_t T = o.x.size() / c.hidden;
    if (poison[r] && T > 0) o.x[0] = std::numeric_limits<float>::quiet_NaN();
    device_buffer<float> dx, dy(std::max<std::size_t>(o.x.size(), 1));
    dx.upload(o.x, stream);
    for (int step = 0; step < 2; ++step) {
      ep.begin_step(static_cast<std::uint64_t>(step));
      try {
        l.forward(dx.data(), T, dy.data());
      } catch (const invalid_input_error&) {
        if (!o.error) o.error = std::current_exception();
      }
    }
    l.finish(); // the last step's device check
    o.y.resize(o.x.size());
    dy.download(o.y, stream);
    download_routing(l, K, o);
  });
}

std::vector<routed_rank> run_routed_k(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                                      const std::vector<float>& gate, const std::vector<bool>& poison,
                                      const layer::expert_weights<float>* shared = nullptr,
                                      const std::vector<float>* shared_gate = nullptr,
                                      layer::router_logits rounding = layer::router_logits::fp32) {
  switch (c.k) {
  case 1: return run_routed<1>(c, all, gate, poison, shared, shared_gate, rounding);
  case 2: return run_routed<2>(c, all, gate, poison, shared, shared_gate, rounding);
  case 3: return run_routed<3>(c, all, gate, poison, shared, shared_gate, rounding);
  case 4: return run_routed<4>(c, all, gate, poison, shared, shared_gate, rounding);
  case 5: return run_routed<5>(c, all, gate, poison, shared, shared_gate, rounding);
  default: return run_routed<6>(c, all, gate, poison, shared, shared_gate, rounding);
  }
}

// Worst error of y against the dense reference under routing r, in units of the tolerance.
double worst_error(const std::vector<float>& x, const std::vector<float>& y, const routing<>& r,
                   const layer::expert_weights<float>& all, const layer::expert_weights<float>* shared = nullptr,
                   const std::vector<float>* shared_gate = nullptr) {
  std::vector<double> scale;
  const auto ref = locus_test::dense_moe(x, r.view(), all, shared, &scale, weight_site::expert_output, shared_gate);
  double worst = 0;
  for (std::size_t i = 0; i < ref.size(); ++i)
    worst = std::max(worst, std::abs(y[i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
  return worst;
}

template <class Transport = device_local_flat>
std::vector<std::vector<float>> run_layer_k(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                                            std::vector<std::exception_ptr>* errors = nullptr,
                                            const expert_map* rank0_map = nullptr) {
  switch (c.k) {
  case 1: return run_layer<1, Transport>(c, all, errors, rank0_map);
  case 2: return run_layer<2, Transport>(c, all, errors, rank0_map);
  case 3: return run_layer<3, Transport>(c, all, errors, rank0_map);
  case 4: return run_layer<4, Transport>(c, all, errors, rank0_map);
  case 5: return run_layer<5, Transport>(c, all, errors, rank0_map);
  default: return run_layer<6, Transport>(c, all, errors, rank0_map);
  }
}

std::vector<std::vector<float>> run_device_k(const locus_test::dispatch_case& c,
                                             const layer::expert_weights<float>& all, transport_kind kind) {
  switch (c.k) {
  case 1: return run_device<1>(c, all, kind);
  case 2: return run_device<2>(c, all, kind);
  case 3: return run_device<3>(c, all, kind);
  case 4: return run_device<4>(c, all, kind);
  case 5: return run_device<5>(c, all, kind);
  default: return run_device<6>(c, all, kind);
  }
}

// Rank r's output `y` against the dense reference: the largest error as a share of its bound
// (2e-6 of the element's scale plus 1e-6), so at most 1 passes.
template <class Y>
double worst_vs_dense(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all, std::size_t r,
                      const Y& y) {
  std::vector<double> scale;
  const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, nullptr, &scale);
  double worst = 0;
  for (std::size_t i = 0; i < ref.size(); ++i)
    worst = std::max(worst, std::abs(y[i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
  return worst;
}

} // namespace

// Every member compiled for the DeepSeek-V3 decode shape with static extents (the kernels are then
// instantiated for top-8, 256 experts and hidden 7168).
template class locus::transport::device_dispatcher<device_local_transport, bfloat16, top_k<8>, experts<256>,
                                                   hidden<7168>>;

// Dispatcher and layer (moe_layer::forward on device rows) against the dense reference, flat and
// hierarchical (rail stage, then the fan-out inside each node; with one GPU per node, 1 x 1 and
// 2 x 1, the hierarchical endpoint takes the flat path).
BOOST_AUTO_TEST_CASE(device_step_matches_dense_reference) {
  for (std::uint64_t seed = 1; seed <= 12; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 4}, {2, 2}, {1, 1}, {3, 2}, {2, 1}})
      for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
        const auto c = locus_test::make_case(seed, nodes, gpus);
        BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", k " << c.k << ", "
                                   << to_string(kind)) {
          BOOST_TEST_REQUIRE(c.k <= 6u);
          const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
          const auto y = run_device_k(c, all, kind);
          // The layer runs the same step: the same bits.
          if (kind == transport_kind::flat)
            BOOST_TEST((run_layer_k<device_local_flat>(c, all) == y));
          else
            BOOST_TEST((run_layer_k<device_local_hierarchical>(c, all) == y));
          for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
            BOOST_TEST(worst_vs_dense(c, all, r, y[r]) <= 1.0);
          }
        }
      }
}

// Ranks that step with different expert maps raise on every rank (the step's count round is over
// the world, flat and hierarchical, and carries each rank's map fingerprint), rather than routing
// rows by two maps.
BOOST_AUTO_TEST_CASE(ranks_with_different_maps_raise_on_every_rank) {
  const auto c = locus_test::make_case(77, 2, 2);
  const expert_map other = locus_test::ranks_traded(c.map);
  const auto all = locus_test::model_weights<float>(9, c.experts, c.hidden, 16);
  for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    std::vector<std::exception_ptr> errors;
    if (kind == transport_kind::flat)
      run_layer_k<device_local_flat>(c, all, &errors, &other);
    else
      run_layer_k<device_local_hierarchical>(c, all, &errors, &other);
    for (std::size_t r = 0; r < c.topo.ranks(); ++r)
      BOOST_TEST_CONTEXT(to_string(kind) << ", rank " << r) {
        BOOST_TEST_REQUIRE(static_cast<bool>(errors[r]));
        try {
          std::rethrow_exception(errors[r]);
        } catch (const transport_error& e) {
          BOOST_TEST(std::string(e.what()).find("step with different expert maps") != std::string::npos, e.what());
        } catch (...) {
          BOOST_ERROR("another error");
        }
      }
  }
}

// The layer routes on the device (cuBLAS logits, the softmax_topk kernel): the same routing as the
// host router, and y equal to the dense reference under it.
BOOST_AUTO_TEST_CASE(device_routed_layer_matches_dense_reference) {
  for (std::uint64_t seed = 1; seed <= 8; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 4}, {2, 2}, {1, 1}}) {
      const auto c = locus_test::make_case(seed, nodes, gpus);
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", k " << c.k) {
        BOOST_TEST_REQUIRE(c.k <= 6u);
        const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
        const auto gate = router_gate(seed, c.hidden, c.experts);
        const auto out = run_routed_k(c, all, gate, std::vector<bool>(c.topo.ranks(), false));
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          if (out[r].error) std::rethrow_exception(out[r].error);
          const auto ref = host_routing(out[r].x, gate, c.hidden, c.experts, c.k);
          BOOST_TEST((out[r].ids == std::vector<expert_id>(ref.ids().begin(), ref.ids().end())));
          for (std::size_t i = 0; i < out[r].weights.size(); ++i)
            BOOST_TEST(std::abs(out[r].weights[i] - ref.weights()[i]) <= 1e-6f * std::abs(ref.weights()[i]) + 1e-7f);
          BOOST_TEST(worst_error(out[r].x, out[r].y, ref, all) <= 1.0);
        }
      }
    }
}

// set_router(gate, router_logits::bf16) on the device: the router kernel sees the cuBLAS logits
// rounded to bf16, so its routing is the host router's on rounded logits (router_gate's logits are
// exact in fp32, so both sides round the same values), and its weights differ from the fp32 logits';
// the layer's output follows the weights it used.
BOOST_AUTO_TEST_CASE(device_router_sees_bf16_rounded_logits) {
  std::size_t tokens = 0, far_from_bf16 = 0, multi = 0, moved = 0;
  for (std::uint64_t seed = 1; seed <= 4; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 2);
    BOOST_TEST_CONTEXT("seed " << seed << ", k " << c.k) {
      const auto all = locus_test::model_weights<float>(seed + 500, c.experts, c.hidden, 16);
      const auto gate = router_gate(seed + 11, c.hidden, c.experts);
      const auto out = run_routed_k(c, all, gate, std::vector<bool>(c.topo.ranks(), false), nullptr, nullptr,
                                    layer::router_logits::bf16);
      for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
        if (out[r].error) std::rethrow_exception(out[r].error);
        const auto ref = host_routing(out[r].x, gate, c.hidden, c.experts, c.k, layer::router_logits::bf16);
        const auto fp32 = host_routing(out[r].x, gate, c.hidden, c.experts, c.k);
        const std::size_t T = out[r].x.size() / c.hidden;
        for (std::size_t t = 0; t < T; ++t) {
          bool near = true, same_as_fp32 = true;
          for (std::size_t j = 0; j < c.k; ++j) {
            const std::size_t i = t * c.k + j;
            near = near && out[r].ids[i] == ref.ids()[i] &&
                   std::abs(out[r].weights[i] - ref.weights()[i]) <= 1e-6f * std::abs(ref.weights()[i]) + 1e-7f;
            same_as_fp32 = same_as_fp32 && out[r].ids[i] == fp32.ids()[i] &&
                           std::abs(out[r].weights[i] - fp32.weights()[i]) <= 1e-6f * std::abs(fp32.weights()[i]);
          }
          ++tokens;
          far_from_bf16 += !near;
          if (c.k > 1) { // a renormalised top-1 weight is 1 whatever the logits
            ++multi;
            moved += !same_as_fp32;
          }
        }
        BOOST_TEST(worst_error(out[r].x, out[r].y, routing<>(out[r].ids, out[r].weights, top_k<>(c.k)), all) <= 1.0);
      }
    }
  }
  BOOST_TEST(tokens > 0u);
  BOOST_TEST(far_from_bf16 == 0u, far_from_bf16 << " of " << tokens << " tokens off the bf16-logit router");
  // On the host, 102 of these 144 top-k > 1 tokens move.
  BOOST_TEST(moved * 2 > multi, "only " << moved << " of " << multi << " tokens moved from the fp32-logit weights");
}

// A rank with a non-finite logit raises, after taking part in the step with no tokens: its peers
// finish and still equal the reference (their tokens' experts may live on the bad rank).
BOOST_AUTO_TEST_CASE(non_finite_logits_on_one_rank_release_the_peers) {
  for (std::uint64_t seed = 1; seed <= 4; ++seed) {
    const auto c = locus_test::make_case(seed, 1, 4);
    const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
    const auto gate = router_gate(seed, c.hidden, c.experts);
    std::vector<bool> poison(c.topo.ranks(), false);
    poison[1] = true;
    const auto out = run_routed_k(c, all, gate, poison);
    BOOST_TEST_CONTEXT("seed " << seed << ", k " << c.k) {
      for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
        if (poison[r] && !out[r].x.empty()) {
          // The router's error, not the layout's complaint about the ids it wrote for the token.
          BOOST_CHECK_EXCEPTION(std::rethrow_exception(out[r].error), invalid_input_error,
                                [](const invalid_input_error& e) {
                                  return std::string(e.what()).find("non-finite logits") != std::string::npos;
                                });
          continue;
        }
        if (out[r].error) std::rethrow_exception(out[r].error);
        BOOST_TEST(worst_error(out[r].x, out[r].y, host_routing(out[r].x, gate, c.hidden, c.experts, c.k), all) <= 1.0);
      }
    }
  }
}

// A bad device routing on one rank (an expert id out of range): that rank raises after taking part
// in the step with no tokens; its peers finish and equal the reference.
BOOST_AUTO_TEST_CASE(bad_device_routing_on_one_rank_releases_the_peers) {
  for (std::uint64_t seed = 1; seed <= 4; ++seed) {
    auto c = locus_test::make_case(seed, 1, 4);
    BOOST_TEST_CONTEXT("seed " << seed << ", k " << c.k) {
      const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
      const bool bad = c.routings[1].tokens() > 0;
      if (bad) c.routings[1].ids()[0] = static_cast<expert_id>(c.experts);
      std::vector<std::exception_ptr> errors;
      const auto y = run_layer_k(c, all, &errors);
      for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
        if (r == 1 && bad) {
          BOOST_CHECK_THROW(std::rethrow_exception(errors[r]), invalid_input_error);
          continue;
        }
        if (errors[r]) std::rethrow_exception(errors[r]);
        BOOST_TEST(worst_vs_dense(c, all, r, y[r]) <= 1.0);
      }
    }
  }
}

// Shared experts on the device path: every rank runs them on its own tokens and adds them, with
// weight 1 or scaled by a gate.
BOOST_AUTO_TEST_CASE(device_layer_adds_shared_experts) {
  for (std::uint64_t seed = 1; seed <= 4; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 4}, {2, 2}}) {
      const auto c = locus_test::make_case(seed, nodes, gpus);
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", k " << c.k) {
        const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
        const auto shared = locus_test::model_weights<float>(seed + 200, 1, c.hidden, 16);
        const auto gate = router_gate(seed, c.hidden, c.experts);
        // Ungated (weight 1), and gated by sigmoid(x·g) per token (Qwen2-MoE's shared_expert_gate).
        const auto shared_gate = locus_test::random_rows<float>(seed + 300, 1, c.hidden);
        for (const bool gated : {false, true}) {
          const auto* g = gated ? &shared_gate : nullptr;
          const auto out = run_routed_k(c, all, gate, std::vector<bool>(c.topo.ranks(), false), &shared, g);
          for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
            if (out[r].error) std::rethrow_exception(out[r].error);
            const auto ref = host_routing(out[r].x, gate, c.hidden, c.experts, c.k);
            BOOST_TEST(worst_error(out[r].x, out[r].y, ref, all, &shared, g) <= 1.0, "gated " << gated);
          }
        }
      }
    }
}

// Llama 4's gating on the device (router::sigmoid_top1, whose weight scales the expert input):
// the layer's weighted gather scales each expert row and its reduction sums the outputs unweighted,
// flat and hierarchical; y equals the dense MoE with the weights on the input under the routing the
// device chose, and differs from the output-weighted one.
BOOST_AUTO_TEST_CASE(device_layer_weights_the_expert_input_for_sigmoid_top1) {
  using shape = moe_shape<experts<>, top_k<1>, hidden<>, shared_experts<>>;
  for (std::uint64_t seed = 1; seed <= 4; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 4}, {2, 2}})
      for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
        const auto c = locus_test::make_case(seed, nodes, gpus);
        BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", " << to_string(kind)) {
          const auto all = locus_test::model_weights<float>(seed + 300, c.experts, c.hidden, 16);
          const auto gate = router_gate(seed + 7, c.hidden, c.experts);
          device_local_fabric fabric(c.topo, kind);
          const std::size_t R = c.topo.ranks();
          const auto out = on_device_ranks(R, [&](std::size_t r, cudaStream_t stream, routed_rank& o) {
            auto ep = fabric.endpoint(r, stream);
            const auto run = [&]<class Transport>(Transport) {
              using layer_t = moe_layer<shape, dynamic_topology, router::sigmoid_top1, Transport, backend::cuda>;
              static_assert(layer_t::routing_weight_site == weight_site::expert_input);
              layer_t l(shape(c.experts, 1, c.hidden, 0), c.topo, ep, c.map,
                        layer::swiglu_cuda<float>(layer::expert_weights<float>::for_rank(c.map, r, all), stream),
                        backend::cuda{stream});
              l.set_router(router::sigmoid_top1{}, gate);
              o.x = c.inputs(r);
              device_buffer<float> dx, dy(std::max<std::size_t>(o.x.size(), 1));
              dx.upload(o.x, stream);
              ep.begin_step(0);
              l.forward(dx.data(), o.x.size() / c.hidden, dy.data());
              l.finish();
              o.y.resize(o.x.size());
              dy.download(o.y, stream);
              download_routing(l, 1, o);
            };
            if (kind == transport_kind::flat)
              run(device_local_flat{});
            else
              run(device_local_hierarchical{});
          });
          for (std::size_t r = 0; r < R; ++r) {
            if (out[r].error) std::rethrow_exception(out[r].error);
            const routing<> used(out[r].ids, out[r].weights, top_k<>(1));
            std::vector<double> scale;
            const auto ref =
                locus_test::dense_moe(out[r].x, used.view(), all, nullptr, &scale, weight_site::expert_input);
            const auto other = locus_test::dense_moe(out[r].x, used.view(), all, nullptr);
            double worst = 0, worst_other = 0;
            for (std::size_t i = 0; i < ref.size(); ++i) {
              worst = std::max(worst, std::abs(out[r].y[i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
              worst_other = std::max(worst_other, std::abs(out[r].y[i] - other[i]) / (2e-6 * scale[i] + 1e-6));
            }
            BOOST_TEST(worst <= 1.0, "rank " << r << ": error / tolerance " << worst);
            if (!ref.empty()) BOOST_TEST(worst_other > 1.0, "rank " << r << ": the output-weighted MoE is as close");
          }
        }
      }
}

namespace {

// An endpoint that doctors its rank's count round at one step, after it arrived: `add` gives one
// sender's tail an entry more than its entries (the host check refuses the counts in that step);
// `shift` moves one entry of a sender's tail to another occupied slot (the sums agree: only the
// receive layout's device check, against the received slots, can tell). Everything else is the
// wrapped endpoint's.
struct doctored_endpoint {
  enum class how { add, shift, reach, oversize };
  device_local_transport* ep;
  const expert_map* map;
  how mode;
  std::uint64_t at;
  std::uint64_t step = 0;
  bool doctored = false;

  std::size_t rank() const noexcept { return ep->rank(); }
  const dynamic_topology& topology() const noexcept { return ep->topology(); }
  bool hierarchical() const noexcept { return ep->hierarchical(); }
  cudaStream_t stream() const noexcept { return ep->stream(); }
  void begin_step(std::uint64_t s) noexcept {
    step = s;
    ep->begin_step(s);
  }
  void exchange_device_known(exchange_group g, std::size_t row_bytes, const std::byte* send,
                             std::span<const std::size_t> send_counts, std::span<const std::size_t> recv_counts,
                             device_exchange_result& out) {
    ep->exchange_device_known(g, row_bytes, send, send_counts, recv_counts, out);
  }
  void synchronize(const char* what) { ep->synchronize(what); }
  void exchange_device_counts(exchange_group g, std::size_t row_bytes, std::span<const std::size_t> counts,
                              std::size_t entry_bytes, std::span<const std::size_t> entry_counts, device_counts& out,
                              std::uint32_t stage = 0, std::span<const std::uint32_t> tail = {},
                              std::uint32_t width = 0, std::uint64_t agreement = 0) {
    ep->exchange_device_counts(g, row_bytes, counts, entry_bytes, entry_counts, out, stage, tail, width, agreement);
    if (step != at || width == 0) return;
    if (mode == how::reach || mode == how::oversize) {
      // Hierarchical round: the rail peer's count of this rank's reached rows, one more than it
      // says it forwards to this rank; or (oversize) its entries for this rank's slot 0, 2^31
      // more, a step past 32-bit offsets. Either sizes only this rank's self-exchange, which the
      // refusal keeps sized by what it sends.
      const std::size_t G = topology().gpus_per_node(), S = map->slots_per_rank(), me = rank();
      for (std::size_t m = 0; m < topology().ranks() && !doctored; ++m)
        if (m / G != me / G && m % G == me % G) {
          if (mode == how::reach)
            ++out.tail[m * width + S];
          else
            out.tail[m * width] += 0x80000000u;
          doctored = true;
        }
      return;
    }
    const std::size_t S = width;
    for (std::size_t m = 0; m < out.entries.size() && !doctored; ++m)
      for (std::size_t s = 0; s < S && !doctored; ++s) {
        if (out.tail[m * S + s] == 0) continue;
        if (mode == how::add) {
          ++out.tail[m * S + s];
          doctored = true;
        } else {
          for (std::size_t t = 0; t < S && !doctored; ++t)
            if (t != s && map->expert_at(rank(), t) != empty_slot) {
              --out.tail[m * S + s];
              ++out.tail[m * S + t];
              doctored = true;
            }
        }
      }
  }
};

// One flat run of two steps over doctored endpoints on `victim`: per rank, the error of each step's
// combine and of finish(), and y after the last step.
struct doctored_run {
  std::vector<std::array<std::exception_ptr, 3>> errors; // step 0, step 1, finish
  std::vector<std::vector<float>> y;
  bool doctored = false;
};

template <std::size_t K>
doctored_run run_doctored(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all,
                          std::size_t victim, doctored_endpoint::how mode, std::uint64_t at,
                          transport_kind kind = transport_kind::flat) {
  device_local_fabric fabric(c.topo, kind);
  const std::size_t R = c.topo.ranks();
  doctored_run out;
  out.errors.resize(R);
  out.y.resize(R);
  std::vector<std::exception_ptr> failed(R);
  std::vector<std::uint8_t> doctored(R, 0);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t stream = nullptr;
      try {
        LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        auto ep = fabric.endpoint(r, stream);
        doctored_endpoint de{&ep, &c.map, mode, r == victim ? at : ~std::uint64_t{0}};
        layer::swiglu_cuda<float> compute(layer::expert_weights<float>::for_rank(c.map, r, all), stream);
        device_dispatcher<doctored_endpoint, float, top_k<K>> d(de, c.map, c.hidden, stream);
        const auto x = c.inputs(r);
        const auto& routing = c.routings[r];
        device_buffer<float> dx, dy(std::max<std::size_t>(x.size(), 1)), w;
        device_buffer<expert_id> ids;
        dx.upload(x, stream);
        ids.upload(routing.ids(), stream);
        w.upload(routing.weights(), stream);
        for (int step = 0; step < 2; ++step) {
          de.begin_step(static_cast<std::uint64_t>(step));
          d.dispatch(dx.data(), device_routing_view<top_k<K>>(ids.data(), w.data(), routing.tokens()));
          compute(d.blocks());
          try {
            d.combine(dy.data());
          } catch (const transport_error&) {
            out.errors[r][static_cast<std::size_t>(step)] = std::current_exception();
          }
        }
        try {
          d.finish();
        } catch (const transport_error&) {
          out.errors[r][2] = std::current_exception();
        }
        out.y[r].resize(x.size());
        dy.download(out.y[r], stream);
        doctored[r] = de.doctored;
      } catch (...) {
        failed[r] = std::current_exception();
      }
      if (stream) cudaStreamDestroy(stream);
    });
  for (auto& t : threads)
    t.join();
  for (auto& e : failed)
    if (e) std::rethrow_exception(e);
  out.doctored = doctored[victim] != 0;
  return out;
}

bool says(const std::exception_ptr& e, const char* words) {
  if (!e) return false;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return std::string(x.what()).find(words) != std::string::npos;
  }
}

} // namespace

// Received counts or metadata that disagree, flat step, one GPU: the rank that received them
// raises (the host check in the same step; the device check with the next step's count read, after
// writing that step's good y, or at finish() after the last step), no peer waits or raises, and a
// step after a device-found one is the dense reference again.
BOOST_AUTO_TEST_CASE(doctored_counts_are_raised_on_their_receiver) {
  using how = doctored_endpoint::how;
  std::size_t seen_add = 0, seen_shift = 0, cases = 0;
  for (std::uint64_t seed = 1; seed <= 80 && cases < 4; ++seed) {
    const auto c = locus_test::make_case(seed, 1, 4);
    if (c.k != 2) continue; // the runs below are instantiated for top-2
    ++cases;
    const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
    const std::size_t victim = 1;
    BOOST_TEST_CONTEXT("seed " << seed) {
      // The host refuses the counts in the doctored step; the next step is clean.
      const auto add = run_doctored<2>(c, all, victim, how::add, 0);
      if (add.doctored) {
        ++seen_add;
        BOOST_TEST(says(add.errors[victim][0], "add up to"));
        BOOST_TEST(!add.errors[victim][1]);
        BOOST_TEST(!add.errors[victim][2]);
      }
      // The device check: step 0 is doctored, step 1's combine names it after writing a good y.
      const auto early = run_doctored<2>(c, all, victim, how::shift, 0);
      if (early.doctored) {
        ++seen_shift;
        BOOST_TEST(!early.errors[victim][0]);
        BOOST_TEST(says(early.errors[victim][1], "in the previous step"));
        BOOST_TEST(!early.errors[victim][2]);
        std::vector<double> scale;
        const auto ref = locus_test::dense_moe(c.inputs(victim), c.routings[victim].view(), all, nullptr, &scale);
        double worst = 0;
        for (std::size_t i = 0; i < ref.size(); ++i)
          worst = std::max(worst, std::abs(early.y[victim][i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
        BOOST_TEST(worst <= 1.0);
      }
      // Doctored in the last step: finish() names it.
      const auto late = run_doctored<2>(c, all, victim, how::shift, 1);
      if (late.doctored) {
        BOOST_TEST(!late.errors[victim][0]);
        BOOST_TEST(!late.errors[victim][1]);
        BOOST_TEST(says(late.errors[victim][2], "in the last step"));
      }
      for (const auto* run : {&add, &early, &late})
        for (std::size_t r = 0; r < c.topo.ranks(); ++r)
          if (r != victim)
            for (const auto& e : run->errors[r])
              BOOST_TEST(!e);
    }
  }
  BOOST_TEST(seen_add > 0u);
  BOOST_TEST(seen_shift > 0u);
}

namespace {
// The first four top-2 cases on 2 × 2 ranks with rank 1's hierarchical round doctored by `how`:
// `check(c, all, run, victim)` for each; returns how many ran doctored.
template <class Check>
std::size_t for_doctored_hierarchical_cases(doctored_endpoint::how how, Check check) {
  std::size_t seen = 0, cases = 0;
  for (std::uint64_t seed = 1; seed <= 80 && cases < 4; ++seed) {
    const auto c = locus_test::make_case(seed, 2, 2);
    if (c.k != 2) continue; // instantiated for top-2
    ++cases;
    const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
    const std::size_t victim = 1;
    BOOST_TEST_CONTEXT("seed " << seed) {
      const auto run = run_doctored<2>(c, all, victim, how, 0, transport_kind::hierarchical);
      BOOST_TEST_REQUIRE(run.doctored);
      ++seen;
      check(c, all, run, victim);
    }
  }
  return seen;
}
} // namespace

// A hierarchical round whose rail peer's tail disagrees with itself (the rows reaching the
// receiver against those it says the receiver forwards to itself): the receiver refuses its own
// expert compute in that step (raised after combine), keeps its self-exchange sized by what it
// sends, so no exchange breaks and no peer raises, and the next step is the dense reference again.
BOOST_AUTO_TEST_CASE(doctored_hierarchical_round_is_raised_on_its_receiver) {
  const std::size_t seen = for_doctored_hierarchical_cases(
      doctored_endpoint::how::reach, [](const auto& c, const auto& all, const doctored_run& run, std::size_t victim) {
        BOOST_TEST(says(run.errors[victim][0], "was told by rank"));
        BOOST_TEST(!run.errors[victim][1]);
        BOOST_TEST(!run.errors[victim][2]);
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          if (r != victim)
            for (const auto& e : run.errors[r])
              BOOST_TEST(!e);
          BOOST_TEST(worst_vs_dense(c, all, r, run.y[r]) <= 1.0); // the last step's y
        }
      });
  BOOST_TEST(seen > 0u);
}

// A hierarchical round refused past 32-bit offsets (a rail peer's tail announcing 2^31 more
// entries): the receiver raises in that step, fans nothing out (its forwarding check starts failed,
// so its node's ranks get those rows without entries and may raise that with the next step), and
// the next step is good on every rank. Before, the check word the refusal set was read with the
// next step's counts and failed that good step too.
BOOST_AUTO_TEST_CASE(a_step_refused_past_32_bits_leaves_the_next_step_good) {
  const std::size_t seen = for_doctored_hierarchical_cases(
      doctored_endpoint::how::oversize,
      [](const auto& c, const auto& all, const doctored_run& run, std::size_t victim) {
        BOOST_TEST(static_cast<bool>(run.errors[victim][0]));
        BOOST_TEST(!run.errors[victim][1]);
        BOOST_TEST(!run.errors[victim][2]);
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          if (r != victim) {
            BOOST_TEST(!run.errors[r][0]);
            BOOST_TEST((!run.errors[r][1] || says(run.errors[r][1], "in the previous step")));
            BOOST_TEST(!run.errors[r][2]);
          }
          BOOST_TEST(worst_vs_dense(c, all, r, run.y[r]) <= 1.0); // the last step's y
        }
      });
  BOOST_TEST(seen > 0u);
}

namespace {

// The one-GPU endpoint whose wait releases a held stream: the wait a step makes through its
// transport, where the NCCL transport's timeout would notice a lost peer.
struct releasing_endpoint : device_local_transport {
  explicit releasing_endpoint(device_local_transport&& t) : device_local_transport(std::move(t)) {}
  volatile int* go = nullptr;
  void synchronize(const char* what) {
    if (go) *go = 1;
    device_local_transport::synchronize(what);
  }
};
struct releasing_flat {
  using policy_concept = transport_tag;
  using exchanger_type = releasing_endpoint;
  static constexpr transport_kind kind = transport_kind::flat;
};
} // namespace

// New router weights between two steps, the stream still held by earlier work (a kernel that only
// the transport's wait releases, as the last step's exchanges would hold it for a lost peer): the
// step replaces the router's device state only after that wait (before, freeing the old state
// waited for the device first, untimed), and routes by the new weights.
BOOST_AUTO_TEST_CASE(new_router_weights_wait_through_the_transport) {
  constexpr std::size_t E = 8, H = 32, K = 2, T = 40;
  using shape = moe_shape<experts<>, top_k<K>, hidden<>, shared_experts<>>;
  using layer_t = moe_layer<shape, dynamic_topology, releasing_flat, backend::cuda>;
  const dynamic_topology topo(1, 1);
  std::vector<expert_id> table(E);
  std::iota(table.begin(), table.end(), 0);
  const expert_map map(E, 1, E, table);
  const auto all = locus_test::model_weights<float>(7, E, H, 16);
  std::vector<float> x(T * H);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = static_cast<float>(static_cast<int>((i * 13) % 33) - 16) / 16.0f;
  cudaStream_t stream = nullptr;
  LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  device_local_fabric fabric(topo, transport_kind::flat);
  releasing_endpoint ep(fabric.endpoint(0, stream));
  const locus_test::mapped_flag go;
  std::vector<float> y(x.size());
  {
    layer_t l(shape(E, K, H, 0), topo, ep, map,
              layer::swiglu_cuda<float>(layer::expert_weights<float>::for_rank(map, 0, all), stream),
              backend::cuda{stream});
    device_buffer<float> dx, dy(x.size());
    device_buffer<int> released(1);
    dx.upload(x, stream);
    l.set_router(router_gate(1, H, E));
    ep.begin_step(0);
    l.forward(dx.data(), T, dy.data());
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto gate = router_gate(2, H, E);
    l.set_router(gate);
    locus_test::hold_stream<<<1, 1, 0, stream>>>(go.device, 5'000'000'000ull, released.data());
    LOCUS_CUDA_CHECK(cudaGetLastError());
    ep.go = go.host;
    ep.begin_step(1);
    l.forward(dx.data(), T, dy.data());
    l.finish();
    BOOST_TEST(released.to_host(stream) == std::vector<int>{1}, "the step waited for the stream before its wait");
    dy.download(y, stream);
    BOOST_TEST(worst_error(x, y, host_routing(x, gate, H, E, K), all) <= 1.0);
  }
  LOCUS_CUDA_CHECK(cudaStreamDestroy(stream));
}
