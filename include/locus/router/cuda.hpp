#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! `router::cuda_router<R>`: runs a router on the GPU. It owns what every router's kernels share —
//! the status counters through which kernels report non-finite logits — and the router's own
//! device state, and calls the router's CUDA part. A router's CUDA part lives beside its host part
//! (`softmax_topk_cuda.hpp` beside `softmax_topk.hpp`) and is found by argument-dependent lookup,
//! so a router defined outside the library runs here without a change to this file:
//!
//!     void route_on_device(const R&, const State&, const device_logits_view<E, T>&,
//!                          const device_mutable_routing_view<R::top_k_type>&, const device_route_context&);
//!     State make_device_state(const R&); // optional; without it State is no_device_state
//!
//! Results of the built-in routers: the same expert ids as the host path (same selection order,
//! same tie rule: the lower expert id), weights within 1e-6 relative (bit-identical except the
//! full-softmax denominator). A token with a non-finite logit gets ids -1 and weights 0 and is
//! counted; `check()` raises locus::invalid_input_error naming the first such token and expert.

#include <array>
#include <cstddef>
#include <cuda_runtime_api.h>
#include <exception>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <locus/core/policy.hpp>
#include <locus/router/detail/dispatch_cuda.hpp>
#include <locus/router/detail/dispatch_host.hpp>
#include <locus/router/logits.hpp>
#include <locus/router/router.hpp>
#include <locus/router/sigmoid_grouped_cuda.hpp>
#include <locus/router/sigmoid_top1_cuda.hpp>
#include <locus/router/softmax_topk_cuda.hpp>
#include <type_traits>
#include <utility>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! What the kernels reported since the last reset.
struct cuda_route_status {
  unsigned long long flagged_tokens = 0; //!< tokens with at least one non-finite logit
  std::size_t first_token = 0;           //!< the lowest such token (valid when flagged_tokens > 0)
  std::size_t first_expert = 0;          //!< its lowest non-finite expert
};

//! The device state `cuda_router<R>` keeps for R: what `make_device_state(r)` returns, found by
//! argument-dependent lookup, or no_device_state when R declares none.
template <class R>
struct device_state_of {
  using type = no_device_state;
};
template <class R>
requires requires(const R& r) { make_device_state(r); }
struct device_state_of<R> {
  using type = decltype(make_device_state(std::declval<const R&>()));
};

//! A router with a CUDA part: `route_on_device(r, state, logits, out, context)` is found for fp32
//! logits of any expert count.
template <class R>
concept device_router = router_policy<R> &&
    requires(const R& r, const typename device_state_of<R>::type& state,
             const device_logits_view<experts<>, const float>& l,
             const device_mutable_routing_view<typename R::top_k_type>& out, const device_route_context& c) {
  route_on_device(r, state, l, out, c);
};

//! A router bound to the device.
//! @tparam Router a router policy with a CUDA part (`device_router`; the built-in ones are
//!         softmax_topk<K>, sigmoid_grouped<G, TG, K> and sigmoid_top1)
template <class Router>
class cuda_router {
  static_assert(router_policy<Router>, "locus::router::cuda_router: the parameter must be a router policy");
  static_assert(device_router<Router>,
                "locus::router::cuda_router: the router has no CUDA part; declare `route_on_device(router, state, "
                "device_logits_view, device_mutable_routing_view, device_route_context)` in the router's namespace "
                "(see router/cuda.hpp) and include it");

public:
  using router_type = Router;
  using top_k_type = typename Router::top_k_type;
  using state_type = typename device_state_of<Router>::type;

  //! Builds the router's device state (e.g. a device copy of its bias) and the status counters.
  //! @throws locus::cuda_error when an allocation or copy fails
  explicit cuda_router(Router r) : router_(std::move(r)), state_(make_state(router_)) {
    LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&status_), 2 * sizeof(unsigned long long)));
    reset();
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }
  ~cuda_router() {
    cudaFree(status_); // errors cannot be reported from a destructor; the memory is gone either way
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
    route_on_device(router_, state_, logits, out, device_route_context{{status_, status_ + 1}, stream, kernel});
  }

  //! Waits for `stream` and reads the counters.
  cuda_route_status status(cudaStream_t stream = nullptr) const { return decode(read_words(stream)); }

  //! Waits for `stream`; raises when a token had a non-finite logit.
  //! @throws locus::invalid_input_error naming the count, the first token and expert
  void check(cudaStream_t stream = nullptr) const {
    if (const auto e = error_of(read_words(stream))) std::rethrow_exception(e);
  }

  //! The counters on the device: two words, the first the number of flagged tokens (non-zero: the
  //! step must send no tokens), for a consumer that reads them in a wait it has anyway
  //! (transport::device_layout's `plan_nothing`); error_of() turns their host copy into the error.
  const unsigned long long* status_words() const noexcept { return status_; }

  //! The counters from a host copy of status_words().
  static cuda_route_status decode(const std::array<unsigned long long, 2>& h) noexcept {
    cuda_route_status s;
    s.flagged_tokens = h[0];
    if (h[0] > 0) {
      s.first_token = static_cast<std::size_t>(h[1] >> detail::router::status_expert_bits);
      s.first_expert = static_cast<std::size_t>(h[1] & ((1ull << detail::router::status_expert_bits) - 1));
    }
    return s;
  }

  //! The error check() raises for a host copy of status_words(); null when no token was flagged.
  static std::exception_ptr error_of(const std::array<unsigned long long, 2>& h) {
    const auto s = decode(h);
    if (s.flagged_tokens == 0) return nullptr;
    try {
      LOCUS_THROW(invalid_input_error, "router::", Router::name, ": ", s.flagged_tokens,
                  " token(s) with non-finite logits on the device; the first is token ", s.first_token, ", expert ",
                  s.first_expert);
    } catch (...) {
      return std::current_exception();
    }
  }

  //! Clears the counters (asynchronously on `stream`).
  void reset(cudaStream_t stream = nullptr) {
    LOCUS_CUDA_CHECK(cudaMemsetAsync(status_, 0, sizeof(unsigned long long), stream));
    LOCUS_CUDA_CHECK(cudaMemsetAsync(status_ + 1, 0xff, sizeof(unsigned long long), stream));
  }

private:
  std::array<unsigned long long, 2> read_words(cudaStream_t stream) const {
    std::array<unsigned long long, 2> h;
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(h.data(), status_, sizeof h, cudaMemcpyDeviceToHost, stream));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
    return h;
  }

  static state_type make_state(const Router& r) {
    if constexpr (std::is_same_v<state_type, no_device_state>)
      return {};
    else
      return make_device_state(r);
  }

  Router router_;
  state_type state_;
  unsigned long long* status_ = nullptr;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
