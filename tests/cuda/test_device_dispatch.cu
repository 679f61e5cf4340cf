// Device dispatch + cuBLAS expert compute + device combine over the one-GPU multi-rank device
// transport (ranks as threads, each with its own stream), against the dense double-precision MoE
// reference; no token row goes through the host.
#define BOOST_TEST_MODULE device_dispatch
#include "../mpi/dispatch_cases.hpp"
#include "../support/moe_reference.hpp"

#include <boost/test/unit_test.hpp>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/layer/expert_compute_cuda.hpp>
#include <locus/layer/moe_layer_cuda.hpp>
#include <locus/transport/device_dispatch.hpp>
#include <locus/transport/device_local.hpp>
#include <thread>
#include <vector>

using namespace locus;
using namespace locus::transport;

namespace {

// One case with a static top-k K (the kernels are instantiated for it); y[r] per rank.
template <std::size_t K>
std::vector<std::vector<float>> run_device(const locus_test::dispatch_case& c,
                                           const layer::expert_weights<float>& all) {
  device_local_fabric fabric(c.topo, false);
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

// The same step through moe_layer<..., device_local_flat, backend::cuda>::forward on device rows.
template <std::size_t K>
std::vector<std::vector<float>> run_layer(const locus_test::dispatch_case& c, const layer::expert_weights<float>& all) {
  using shape = moe_shape<experts<>, top_k<K>, hidden<>, shared_experts<>>;
  using layer_t = moe_layer<shape, dynamic_topology, device_local_flat, backend::cuda, layer::given_routing>;
  device_local_fabric fabric(c.topo, false);
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
        layer_t l(shape(c.experts, K, c.hidden, 0), c.topo, ep, c.map,
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
          l.forward(dx.data(), device_routing_view<top_k<K>>(ids.data(), w.data(), routing.tokens()), dy.data());
        }
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

std::vector<std::vector<float>> run_layer_k(const locus_test::dispatch_case& c,
                                            const layer::expert_weights<float>& all) {
  switch (c.k) {
  case 1: return run_layer<1>(c, all);
  case 2: return run_layer<2>(c, all);
  case 3: return run_layer<3>(c, all);
  case 4: return run_layer<4>(c, all);
  case 5: return run_layer<5>(c, all);
  default: return run_layer<6>(c, all);
  }
}

std::vector<std::vector<float>> run_device_k(const locus_test::dispatch_case& c,
                                             const layer::expert_weights<float>& all) {
  switch (c.k) {
  case 1: return run_device<1>(c, all);
  case 2: return run_device<2>(c, all);
  case 3: return run_device<3>(c, all);
  case 4: return run_device<4>(c, all);
  case 5: return run_device<5>(c, all);
  default: return run_device<6>(c, all);
  }
}

} // namespace

// Dispatcher and layer (moe_layer::forward on device rows) against the dense reference.
BOOST_AUTO_TEST_CASE(device_step_matches_dense_reference) {
  for (std::uint64_t seed = 1; seed <= 12; ++seed)
    for (auto [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 4}, {2, 2}, {1, 1}}) {
      const auto c = locus_test::make_case(seed, nodes, gpus);
      BOOST_TEST_CONTEXT("seed " << seed << ", " << nodes << " x " << gpus << ", k " << c.k) {
        BOOST_TEST_REQUIRE(c.k <= 6u);
        const auto all = locus_test::model_weights<float>(seed + 100, c.experts, c.hidden, 16);
        const auto y = run_device_k(c, all);
        // The layer runs the same step: the same bits.
        BOOST_TEST((run_layer_k(c, all) == y));
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          std::vector<double> scale;
          const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, nullptr, &scale);
          double worst = 0;
          for (std::size_t i = 0; i < ref.size(); ++i)
            worst = std::max(worst, std::abs(y[r][i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
          BOOST_TEST(worst <= 1.0);
        }
      }
    }
}

BOOST_AUTO_TEST_CASE(hierarchical_endpoints_are_refused) {
  const auto c = locus_test::make_case(3, 2, 2);
  device_local_fabric fabric(c.topo, true);
  auto ep = fabric.endpoint(0, nullptr);
  using dispatcher = device_dispatcher<device_local_transport, float, top_k<2>>;
  BOOST_CHECK_THROW(dispatcher(ep, c.map, c.hidden, nullptr), config_error);
}
