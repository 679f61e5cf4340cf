// A router defined outside the library (argmax top-1, weight 1) with its own host and CUDA parts:
// cuda_router runs it, and moe_layer's device-routed step takes it as its router policy, with no
// library file naming it. The router's CUDA part is found by argument-dependent lookup.
#define BOOST_TEST_MODULE user_router
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/layer/moe_layer_cuda.hpp>
#include <locus/router/cuda.hpp>
#include <locus/transport/device_local.hpp>
#include <random>
#include <vector>

namespace user_routers {

namespace lr = locus::router;

// The expert with the largest logit (the lower id on ties), weight 1; -1 for a row with a
// non-finite logit. One definition for the host and the device.
template <class T>
__host__ __device__ int argmax_row(const T* row, std::size_t experts, locus::expert_id* id, float* w) {
  int best = 0;
  float best_v = 0;
  for (std::size_t e = 0; e < experts; ++e) {
    const float v = static_cast<float>(row[e]);
    if (!(v - v == 0.0f)) return static_cast<int>(e); // NaN and infinities only
    if (e == 0 || v > best_v) {
      best = static_cast<int>(e);
      best_v = v;
    }
  }
  *id = best;
  *w = 1.0f;
  return -1;
}

struct argmax_top1 {
  using policy_concept = locus::router_tag;
  using top_k_type = locus::top_k<1>;
  static constexpr const char* name = "argmax_top1";
  std::size_t top_k() const noexcept { return 1; }

  template <class Experts, class T>
  void route(const lr::logits_view<Experts, T>& logits, const locus::mutable_routing_view<top_k_type>& out,
             unsigned = 0) const {
    for (std::size_t t = 0; t < logits.tokens(); ++t)
      LOCUS_REQUIRE(argmax_row(logits.row(t), logits.experts(), out.ids() + t, out.weights() + t) < 0,
                    locus::invalid_input_error, "argmax_top1: token ", t, " has a non-finite logit");
  }
};

template <class T>
__global__ void argmax_kernel(const T* logits, std::size_t tokens, std::size_t experts, locus::expert_id* ids,
                              float* weights) {
  const std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  if (argmax_row(logits + t * experts, experts, ids + t, weights + t) >= 0) {
    ids[t] = -1;
    weights[t] = 0;
  }
}

// The router's CUDA part, in its own namespace: cuda_router finds it by argument-dependent lookup.
template <class Experts, class T>
void route_on_device(const argmax_top1&, lr::no_device_state, const lr::device_logits_view<Experts, T>& in,
                     const lr::device_mutable_routing_view<argmax_top1::top_k_type>& out,
                     const lr::device_route_context& c) {
  if (in.tokens() == 0) return;
  argmax_kernel<<<static_cast<unsigned>((in.tokens() + 127) / 128), 128, 0, c.stream>>>(
      in.data(), in.tokens(), in.experts(), out.ids(), out.weights());
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

} // namespace user_routers

static_assert(locus::router_policy<user_routers::argmax_top1>);
static_assert(locus::router::device_router<user_routers::argmax_top1>);

// A router policy without a CUDA part is no device_router (cuda_router says so when asked).
namespace host_only {
struct first_expert {
  using policy_concept = locus::router_tag;
  using top_k_type = locus::top_k<1>;
  static constexpr const char* name = "first_expert";
  std::size_t top_k() const noexcept { return 1; }
  template <class Experts, class T>
  void route(const locus::router::logits_view<Experts, T>&, const locus::mutable_routing_view<top_k_type>&,
             unsigned = 0) const {}
};
} // namespace host_only
static_assert(locus::router_policy<host_only::first_expert>);
static_assert(!locus::router::device_router<host_only::first_expert>);

namespace {

using namespace locus;

// The layer's device-routed step with the user's router: instantiated here, so this file does not
// compile unless the layer takes the router as it is.
using user_shape = moe_shape<experts<>, top_k<1>, hidden<>, shared_experts<>>;
using user_layer =
    moe_layer<user_shape, dynamic_topology, transport::device_local_flat, backend::cuda, user_routers::argmax_top1>;
[[maybe_unused]] void forward_on_device(user_layer& l, const float* x, std::size_t tokens, float* y) {
  l.forward(x, tokens, y);
}

} // namespace

BOOST_AUTO_TEST_CASE(cuda_router_runs_a_user_router_as_its_host_part_does) {
  const std::size_t tokens = 1000, experts = 40;
  std::vector<float> logits(tokens * experts);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (auto& v : logits)
    v = u(rng);
  const user_routers::argmax_top1 router;
  routing<top_k<1>> host(tokens);
  router.route(router::logits_view<locus::experts<>, const float>(logits.data(), tokens, locus::experts<>(experts)),
               host.view());
  // The reference: the argmax by the standard library.
  for (std::size_t t = 0; t < tokens; ++t)
    BOOST_TEST(host.ids()[t] == std::max_element(logits.begin() + static_cast<std::ptrdiff_t>(t * experts),
                                                 logits.begin() + static_cast<std::ptrdiff_t>((t + 1) * experts)) -
                                    (logits.begin() + static_cast<std::ptrdiff_t>(t * experts)));

  device_buffer<float> d_logits;
  d_logits.upload(logits);
  device_buffer<expert_id> ids(tokens);
  device_buffer<float> weights(tokens);
  router::cuda_router<user_routers::argmax_top1> device(router);
  device.route(
      router::device_logits_view<locus::experts<>, const float>(d_logits.data(), tokens, locus::experts<>(experts)),
      router::device_mutable_routing_view<top_k<1>>(ids.data(), weights.data(), tokens, top_k<1>()));
  device.check();
  const auto got = ids.to_host();
  const auto w = weights.to_host();
  for (std::size_t t = 0; t < tokens; ++t) {
    BOOST_TEST(got[t] == host.ids()[t]);
    BOOST_TEST(w[t] == 1.0f);
  }
}
