// Every router kernel against the host path: expert ids exactly, weights within 1e-6 relative.
// The host path is itself tested against a double-precision brute-force reference
// (tests/unit/test_router.cpp), so agreement here carries that check over to the device.
#define BOOST_TEST_MODULE router_kernels
#include "../support/router_inputs.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <locus/core/device_buffer.hpp>
#include <locus/router/cuda.hpp>
#include <random>
#include <string>
#include <vector>

using namespace locus;
namespace lr = locus::router;
using locus_test::random_bias;
using locus_test::random_logits;
using locus_test::tied_logits;

namespace {

const char* kernel_name(lr::cuda_kernel k) {
  switch (k) {
  case lr::cuda_kernel::automatic: return "automatic";
  case lr::cuda_kernel::warp_per_token: return "warp_per_token";
  case lr::cuda_kernel::thread_per_token: return "thread_per_token";
  }
  return "?";
}

// Routes the same logits on the host and with `kernel` on the device and compares.
template <class Experts, class T, class Router>
void compare(const Router& router, std::size_t tokens, std::size_t experts, unsigned seed, lr::cuda_kernel kernel,
             const std::string& what, bool tied = false) {
  using K = typename Router::top_k_type;
  const std::size_t k = router.top_k();
  const auto logits = tied ? tied_logits<T>(tokens * experts, seed) : random_logits<T>(tokens * experts, seed);
  const auto host = router.route(lr::logits_view<Experts, const T>(logits.data(), tokens, Experts(experts)));

  device_buffer<T> d_logits(logits.size());
  d_logits.upload(logits);
  device_buffer<expert_id> d_ids(tokens * k);
  device_buffer<float> d_weights(tokens * k);
  lr::cuda_router<Router> device(router);
  device.route(lr::device_logits_view<Experts, const T>(d_logits.data(), tokens, Experts(experts)),
               lr::device_mutable_routing_view<K>(d_ids.data(), d_weights.data(), tokens, K(k)), nullptr, kernel);
  device.check();
  const auto ids = d_ids.to_host();
  const auto weights = d_weights.to_host();

  const std::string label = what + " (" + kernel_name(kernel) + ")";
  std::size_t id_errors = 0, weight_errors = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] != host.ids()[i]) {
      if (id_errors++ < 5)
        BOOST_ERROR(label << ": token " << i / k << " choice " << i % k << ": device expert " << ids[i] << ", host "
                          << host.ids()[i]);
      continue;
    }
    const double h = host.weights()[i], d = weights[i];
    if (std::abs(d - h) > 1e-6 * std::abs(h)) {
      if (weight_errors++ < 5)
        BOOST_ERROR(label << ": token " << i / k << " choice " << i % k << ": device weight " << d << ", host " << h);
    }
  }
  BOOST_TEST(id_errors == 0u, label << ": " << id_errors << " id mismatches");
  BOOST_TEST(weight_errors == 0u, label << ": " << weight_errors << " weight mismatches");
}

const std::vector<lr::cuda_kernel> both = {lr::cuda_kernel::warp_per_token, lr::cuda_kernel::thread_per_token,
                                           lr::cuda_kernel::automatic};
const std::vector<lr::cuda_kernel> thread_only = {lr::cuda_kernel::thread_per_token, lr::cuda_kernel::automatic};

template <std::size_t E, std::size_t K, class T>
void softmax_case(std::size_t tokens, unsigned seed, bool renormalize, const std::vector<lr::cuda_kernel>& kernels) {
  const lr::softmax_topk<top_k<K>> router(K, renormalize);
  const std::string what = "softmax E=" + std::to_string(E) + " K=" + std::to_string(K) +
                           (renormalize ? " renorm" : "") + (sizeof(T) == 2 ? " bf16" : " fp32");
  for (const auto kernel : kernels)
    compare<experts<E>, T>(router, tokens, E, seed, kernel, what);
}

template <std::size_t E, std::size_t G, std::size_t TG, std::size_t K, class T>
void grouped_case(std::size_t tokens, unsigned seed, const std::vector<lr::cuda_kernel>& kernels) {
  const lr::sigmoid_grouped<groups<G>, top_groups<TG>, top_k<K>> router(random_bias(E, seed + 1), 2.5f);
  const std::string what = "grouped E=" + std::to_string(E) + " G=" + std::to_string(G) + "/" + std::to_string(TG) +
                           " K=" + std::to_string(K) + (sizeof(T) == 2 ? " bf16" : " fp32");
  for (const auto kernel : kernels)
    compare<experts<E>, T>(router, tokens, E, seed, kernel, what);
}

} // namespace

BOOST_AUTO_TEST_CASE(softmax_topk_kernels_match_host) {
  softmax_case<8, 2, float>(5000, 1, true, thread_only);
  softmax_case<64, 6, float>(5000, 2, true, both);
  softmax_case<64, 6, float>(5000, 3, false, both);
  softmax_case<128, 1, float>(5000, 4, false, both);
  softmax_case<128, 8, float>(5000, 5, true, both);
  softmax_case<256, 8, float>(3000, 6, false, both);
  softmax_case<128, 8, bfloat16>(5000, 7, true, both);
  softmax_case<256, 8, bfloat16>(3000, 8, false, both);
  softmax_case<60, 4, float>(2000, 9, true, thread_only);
}

BOOST_AUTO_TEST_CASE(sigmoid_grouped_kernels_match_host) {
  grouped_case<256, 8, 4, 8, float>(5000, 11, both);
  grouped_case<256, 8, 4, 8, bfloat16>(5000, 12, both);
  grouped_case<64, 8, 3, 6, float>(5000, 13, both);
  grouped_case<128, 1, 1, 8, float>(3000, 14, both);
  grouped_case<8, 4, 2, 2, float>(3000, 15, thread_only);
}

BOOST_AUTO_TEST_CASE(sigmoid_top1_kernels_match_host) {
  for (const auto kernel : both) {
    compare<experts<128>, float>(lr::sigmoid_top1(), 5000, 128, 21, kernel, "top1 E=128 fp32");
    compare<experts<128>, bfloat16>(lr::sigmoid_top1(), 5000, 128, 22, kernel, "top1 E=128 bf16");
  }
  for (const auto kernel : thread_only)
    compare<experts<16>, float>(lr::sigmoid_top1(), 5000, 16, 23, kernel, "top1 E=16");
}

BOOST_AUTO_TEST_CASE(tied_logits_match_host) {
  for (const auto kernel : both) {
    compare<experts<128>, float>(lr::softmax_topk<top_k<8>>(8, true), 3000, 128, 61, kernel, "tied softmax fp32", true);
    compare<experts<256>, bfloat16>(lr::softmax_topk<top_k<8>>(8, false), 3000, 256, 62, kernel, "tied softmax bf16",
                                    true);
    using grouped = lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>>;
    compare<experts<256>, float>(grouped(), 3000, 256, 63, kernel, "tied grouped fp32", true);
    compare<experts<256>, bfloat16>(grouped(), 3000, 256, 64, kernel, "tied grouped bf16", true);
    compare<experts<64>, float>(lr::sigmoid_grouped<groups<8>, top_groups<3>, top_k<6>>(), 3000, 64, 65, kernel,
                                "tied grouped E=64", true);
    compare<experts<128>, bfloat16>(lr::sigmoid_top1(), 3001, 128, 66, kernel, "tied top1 bf16", true);
    compare<experts<256>, float>(lr::sigmoid_top1(), 3001, 256, 67, kernel, "tied top1 E=256", true);
  }
}

BOOST_AUTO_TEST_CASE(dynamic_extents_match_host) {
  compare<experts<>, float>(lr::softmax_topk<>(6, false), 3000, 64, 31, lr::cuda_kernel::automatic, "softmax dynamic");
  compare<experts<>, float>(lr::sigmoid_grouped<>(8, 4, 8, random_bias(256, 32), 2.5f), 3000, 256, 33,
                            lr::cuda_kernel::automatic, "grouped dynamic");
  compare<experts<>, bfloat16>(lr::sigmoid_top1(), 3000, 128, 34, lr::cuda_kernel::automatic, "top1 dynamic");
  // Forcing the warp kernel on dynamic extents is refused with a reason.
  device_buffer<float> d(64);
  device_buffer<expert_id> ids(2);
  device_buffer<float> w(2);
  lr::cuda_router<lr::softmax_topk<>> router(lr::softmax_topk<>(2));
  BOOST_CHECK_THROW(router.route(lr::device_logits_view<>(d.data(), 1, experts<>(64)),
                                 lr::device_mutable_routing_view<>(ids.data(), w.data(), 1, top_k<>(2)), nullptr,
                                 lr::cuda_kernel::warp_per_token),
                    config_error);
}

BOOST_AUTO_TEST_CASE(misaligned_logits_fall_back_to_the_thread_kernel) {
  const std::size_t tokens = 100;
  const auto logits = random_logits<float>(tokens * 64 + 1, 41);
  device_buffer<float> d(logits.size());
  d.upload(logits);
  device_buffer<expert_id> ids(tokens * 6);
  device_buffer<float> w(tokens * 6);
  lr::cuda_router<lr::softmax_topk<top_k<6>>> router{lr::softmax_topk<top_k<6>>()};
  const lr::device_logits_view<experts<64>> shifted(d.data() + 1, tokens);
  const lr::device_mutable_routing_view<top_k<6>> out(ids.data(), w.data(), tokens);
  BOOST_CHECK_THROW(router.route(shifted, out, nullptr, lr::cuda_kernel::warp_per_token), config_error);
  router.route(shifted, out);
  router.check();
  const auto host = lr::softmax_topk<top_k<6>>().route(lr::logits_view<experts<64>>(logits.data() + 1, tokens));
  BOOST_TEST(ids.to_host() == host.ids());
}

BOOST_AUTO_TEST_CASE(non_finite_logits_are_flagged) {
  const std::size_t tokens = 1000, E = 256;
  auto logits = random_logits<float>(tokens * E, 51);
  logits[700 * E + 200] = std::numeric_limits<float>::quiet_NaN();
  logits[123 * E + 77] = std::numeric_limits<float>::infinity();
  logits[123 * E + 90] = -std::numeric_limits<float>::infinity();
  device_buffer<float> d(logits.size());
  d.upload(logits);
  device_buffer<expert_id> ids(tokens * 8);
  device_buffer<float> w(tokens * 8);
  for (const auto kernel : {lr::cuda_kernel::warp_per_token, lr::cuda_kernel::thread_per_token}) {
    lr::cuda_router<lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>>> router{
        lr::sigmoid_grouped<groups<8>, top_groups<4>, top_k<8>>()};
    router.route(lr::device_logits_view<experts<E>>(d.data(), tokens),
                 lr::device_mutable_routing_view<top_k<8>>(ids.data(), w.data(), tokens), nullptr, kernel);
    const auto s = router.status();
    BOOST_TEST(s.flagged_tokens == 2u);
    BOOST_TEST(s.first_token == 123u);
    BOOST_TEST(s.first_expert == 77u);
    BOOST_CHECK_THROW(router.check(), invalid_input_error);
    const auto got = ids.to_host();
    for (std::size_t j = 0; j < 8; ++j)
      BOOST_TEST(got[700 * 8 + j] == -1);
    BOOST_TEST(got[0] >= 0);
    router.reset();
    BOOST_TEST(router.status().flagged_tokens == 0u);
  }
}

// The top-1 kernel routes several tokens per warp: a flagged token among them leaves its
// neighbours routed, and a last, partial warp routes only the tokens that exist.
BOOST_AUTO_TEST_CASE(top1_flags_one_token_of_a_warp) {
  const std::size_t tokens = 37, E = 128;
  auto logits = random_logits<float>(tokens * E, 71);
  logits[5 * E + 3] = std::numeric_limits<float>::quiet_NaN();
  logits[34 * E + 127] = -std::numeric_limits<float>::infinity();
  device_buffer<float> d(logits.size());
  d.upload(logits);
  device_buffer<expert_id> ids(tokens + 1);
  device_buffer<float> w(tokens + 1);
  const std::vector<expert_id> sentinel(tokens + 1, 12345);
  ids.upload(sentinel);
  lr::cuda_router<lr::sigmoid_top1> router{lr::sigmoid_top1()};
  router.route(lr::device_logits_view<experts<E>>(d.data(), tokens),
               lr::device_mutable_routing_view<lr::sigmoid_top1::top_k_type>(ids.data(), w.data(), tokens), nullptr,
               lr::cuda_kernel::warp_per_token);
  BOOST_TEST(router.status().flagged_tokens == 2u);
  BOOST_TEST(router.status().first_token == 5u);
  BOOST_TEST(router.status().first_expert == 3u);
  const auto got = ids.to_host();
  BOOST_TEST(got[tokens] == 12345); // nothing written past the last token
  for (std::size_t t = 0; t < tokens; ++t) {
    if (t == 5 || t == 34) {
      BOOST_TEST(got[t] == -1);
      continue;
    }
    const float* row = logits.data() + t * E;
    const auto best = static_cast<expert_id>(std::max_element(row, row + E) - row);
    BOOST_TEST(got[t] == best, "token " << t);
  }
}
