#pragma once
// locus-requires: cuda
//! @file
//! `router::cuda_router<R>`: runs a router on the GPU. It owns what the kernels need beyond the
//! router's parameters — a device copy of the correction bias, and the status counters through
//! which kernels report non-finite logits — and hands everything to the kernels by value.
//!
//! Results: the same expert ids as the host path (same selection order, same tie rule: the lower
//! expert id), weights within 1e-6 relative (bit-identical except the full-softmax denominator).
//! A token with a non-finite logit gets ids -1 and weights 0 and is counted; `check()` raises
//! locus::invalid_input_error naming the first such token and expert.

#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <locus/core/policy.hpp>
#include <locus/router/detail/dispatch_cuda.hpp>
#include <locus/router/detail/dispatch_host.hpp>
#include <locus/router/logits.hpp>
#include <locus/router/router.hpp>
#include <utility>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! What the kernels reported since the last reset.
struct cuda_route_status {
  unsigned long long flagged_tokens = 0; //!< tokens with at least one non-finite logit
  std::size_t first_token = 0;           //!< the lowest such token (valid when flagged_tokens > 0)
  std::size_t first_expert = 0;          //!< its lowest non-finite expert
};

//! A router bound to the device.
//! @tparam Router softmax_topk<K>, sigmoid_grouped<G, TG, K> or sigmoid_top1
template <class Router>
class cuda_router {
  static_assert(router_policy<Router>, "locus::router::cuda_router: the parameter must be a router policy");

public:
  using router_type = Router;
  using top_k_type = typename Router::top_k_type;

  //! Copies the router's bias (if any) to the device and allocates the status counters.
  //! @throws locus::cuda_error when an allocation or copy fails
  explicit cuda_router(Router r) : router_(std::move(r)) {
    LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&status_), 2 * sizeof(unsigned long long)));
    if constexpr (requires { router_.bias(); }) {
      const auto& bias = router_.bias();
      if (!bias.empty()) {
        LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&bias_), bias.size() * sizeof(float)));
        LOCUS_CUDA_CHECK(cudaMemcpy(bias_, bias.data(), bias.size() * sizeof(float), cudaMemcpyHostToDevice));
      }
    }
    reset();
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }
  ~cuda_router() {
    cudaFree(status_); // errors cannot be reported from a destructor; the memory is gone either way
    cudaFree(bias_);
  }
  cuda_router(const cuda_router&) = delete;
  cuda_router& operator=(const cuda_router&) = delete;

  const Router& router() const noexcept { return router_; }

  //! Routes `logits` into `out` on `stream` (asynchronous; inputs and outputs in device memory).
  //! @throws locus::config_error or locus::invalid_input_error on shapes that do not fit, and
  //!         locus::config_error when a forced kernel cannot run
  template <class Experts, class T>
  void route(const device_logits_view<Experts, T>& logits, const device_mutable_routing_view<top_k_type>& out,
             cudaStream_t stream = nullptr, cuda_kernel kernel = cuda_kernel::automatic) const {
    detail::router::validate_route_arguments(Router::name, logits, out, router_.top_k());
    const detail::router::device_status st{status_, status_ + 1};
    if constexpr (requires { router_.bias(); }) {
      router_.validate_experts(logits.experts());
      auto p = router_.params();
      p.bias = bias_;
      detail::router::launch_sigmoid_grouped(p, logits, out.ids(), out.weights(), st, stream, kernel);
    } else if constexpr (requires { router_.renormalize(); }) {
      detail::router::launch_softmax_topk(router_.params(), logits, out.ids(), out.weights(), st, stream, kernel);
    } else {
      detail::router::launch_sigmoid_top1(logits, out.ids(), out.weights(), st, stream, kernel);
    }
  }

  //! Waits for `stream` and reads the counters.
  cuda_route_status status(cudaStream_t stream = nullptr) const {
    unsigned long long h[2];
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(h, status_, sizeof h, cudaMemcpyDeviceToHost, stream));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
    cuda_route_status s;
    s.flagged_tokens = h[0];
    if (h[0] > 0) {
      s.first_token = static_cast<std::size_t>(h[1] >> detail::router::status_expert_bits);
      s.first_expert = static_cast<std::size_t>(h[1] & ((1ull << detail::router::status_expert_bits) - 1));
    }
    return s;
  }

  //! Waits for `stream`; raises when a token had a non-finite logit.
  //! @throws locus::invalid_input_error naming the count, the first token and expert
  void check(cudaStream_t stream = nullptr) const {
    const auto s = status(stream);
    if (s.flagged_tokens > 0)
      LOCUS_THROW(invalid_input_error, "router::", Router::name, ": ", s.flagged_tokens,
                  " token(s) with non-finite logits on the device; the first is token ", s.first_token, ", expert ",
                  s.first_expert);
  }

  //! Clears the counters (asynchronously on `stream`).
  void reset(cudaStream_t stream = nullptr) {
    LOCUS_CUDA_CHECK(cudaMemsetAsync(status_, 0, sizeof(unsigned long long), stream));
    LOCUS_CUDA_CHECK(cudaMemsetAsync(status_ + 1, 0xff, sizeof(unsigned long long), stream));
  }

private:
  Router router_;
  float* bias_ = nullptr;
  unsigned long long* status_ = nullptr;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
