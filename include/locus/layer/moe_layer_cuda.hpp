#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The device-resident step of `moe_layer` on `backend::cuda`, all on the backend's stream:
//! [route: logits = x·W_router in fp32 (cuBLAS) → the router policy's kernel (router::cuda_router)]
//! → device layout → permute → device exchange → expert compute on the device blocks, rows read in
//! place → weighted reduction → exchange back → combine, through `transport::device_dispatcher`,
//! then the shared experts (when the shape has them) on this rank's own tokens, added
//! (where the host waits, and why, is documented there). Routing on the device adds no wait: the
//! router's non-finite-logit counter is the layout's "plan nothing" flag (transport::device_abort),
//! applied on the device and read with the layout's counts, so a rank whose logits are bad sends no
//! tokens. The layer keeps the dispatcher, the router and their buffers between steps.
//!
//! As on the host, a rank whose own step fails (bad routing, non-finite logits, an expert compute
//! that refuses its blocks) still takes part in every exchange, with no tokens of its own and zero
//! expert outputs, and raises after the step, so its peers never wait for it.

#include <algorithm>
#include <cstdint>
#include <cuda_runtime_api.h>
#include <exception>
#include <locus/backend/cuda.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/layer/detail/kernels/shared_sum.cuh>
#include <locus/layer/expert_compute_cuda.hpp>
#include <locus/layer/moe_layer.hpp>
#include <locus/router/cuda.hpp>
#include <locus/transport/device_dispatch.hpp>
#include <memory>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

//! Blocks of 256 threads for the layer step's elementwise kernels over n items (their bodies stride
//! over the grid, so 65535 blocks cover any n).
inline unsigned elementwise_blocks(std::size_t n) {
  return static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 65535));
}

//! What a routed device step keeps between steps: the router on the device, its weights and the
//! step's logits and routing.
template <class Router>
struct device_route_state {
  device_route_state(const Router& r, const std::vector<float>& gate, std::uint64_t v, cudaStream_t stream)
      : kernel(r), blas(stream), version(v) {
    gate_d.upload(gate, stream);
  }
  locus::router::cuda_router<Router> kernel;
  backend::cublas_handle blas;
  std::uint64_t version;
  device_buffer<float> gate_d, x_f32, logits, weights;
  device_buffer<expert_id> ids;
  std::size_t tokens = 0;
};

template <class Shape, class Topology, class... Policies>
struct device_step<moe_layer<Shape, Topology, Policies...>> {
  using layer_type = moe_layer<Shape, Topology, Policies...>;
  using value_type = typename layer_type::value_type;
  using top_k_type = typename layer_type::top_k_type;
  using dispatcher_type = transport::device_dispatcher<typename layer_type::exchanger_type, value_type, top_k_type,
                                                       typename Shape::experts_type, typename Shape::hidden_type>;
  static_assert(top_k_type::is_static,
                "locus::moe_layer: the device-resident forward needs a static top_k in the shape (its kernels are "
                "instantiated for it)");
  static_assert(std::invocable<typename layer_type::expert_compute_type&,
                               const locus::layer::expert_blocks<value_type, memory_space::device>&>,
                "locus::moe_layer: the device-resident forward needs an expert compute that takes device blocks "
                "(layer::swiglu_cuda)");

  struct state {
    explicit state(layer_type& l) : dispatch(l.exchanger(), l.map(), l.shape().hidden(), l.backend().stream) {}
    // The members below are freed first (reverse order), and a free waits for the device: the
    // dispatcher's timed wait goes before them (device_dispatcher::quiesce).
    ~state() { dispatch.quiesce(); }
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    dispatcher_type dispatch;
    std::shared_ptr<void> route; // device_route_state<router_type>, made by the first routed step
    device_buffer<value_type> shared_out, shared_in;
    device_buffer<float> shared_sum, shared_gate, gate_partial, gate_score;
    std::uint64_t shared_gate_version = 0; // of the layer's gate in shared_gate (0: none uploaded)
  };

  //! The step with the caller's device routing.
  static void run(layer_type& l, std::shared_ptr<void>& st, const value_type* x,
                  const device_routing_view<top_k_type>& r, value_type* y) {
    step(l, state_of(l, st), x, r, nullptr, y);
  }

  //! The step routed on the device by the layer's router.
  static void route_and_run(layer_type& l, std::shared_ptr<void>& st, const value_type* x, std::size_t tokens,
                            value_type* y) {
    using rs_type = device_route_state<typename layer_type::router_type>;
    auto& s = state_of(l, st);
    // New router weights (set_router, or the first routed step): building the router's state
    // uploads from pageable memory and syncs the default stream, and replacing it frees device
    // memory, each of which may wait, untimed, for the stream's earlier work (the last step's
    // exchanges, which a lost peer never finishes). The transport's timed wait goes first.
    if (!s.route || static_cast<rs_type*>(s.route.get())->version != l.router_version_)
      l.exchanger().synchronize("uploading the router's weights");
    std::exception_ptr fail;
    device_routing_view<top_k_type> r(nullptr, nullptr, 0, top_k_type{});
    transport::device_abort abort;
    try {
      r = route(l, s, x, tokens);
      abort = {static_cast<rs_type*>(s.route.get())->kernel.status_words(),
               &locus::router::cuda_router<typename layer_type::router_type>::error_of};
    } catch (...) {
      fail = std::current_exception();
    }
    step(l, s, x, r, fail, y, abort);
  }

  //! dispatcher::finish() after the last step; nothing before the first.
  static void finish(std::shared_ptr<void>& st) {
    if (st) static_cast<state*>(st.get())->dispatch.finish();
  }

  static device_routing_view<top_k_type> last_routing(const layer_type& l, const std::shared_ptr<void>& st) {
    using rs_type = device_route_state<typename layer_type::router_type>;
    if (!st) return {nullptr, nullptr, 0, top_k_type{}};
    const auto* s = static_cast<const state*>(st.get());
    if (!s->route) return {nullptr, nullptr, 0, top_k_type{}};
    const auto& rs = *static_cast<const rs_type*>(s->route.get());
    static_cast<void>(l);
    return {rs.ids.data(), rs.weights.data(), rs.tokens, top_k_type{}};
  }

private:
  static state& state_of(layer_type& l, std::shared_ptr<void>& st) {
    if (!st) st = std::make_shared<state>(l);
    return *static_cast<state*>(st.get());
  }

  // logits = x·gate (fp32, cuBLAS), then the router kernel; asynchronous (the layout reads the
  // router's counters).
  static device_routing_view<top_k_type> route(layer_type& l, state& s, const value_type* x, std::size_t tokens) {
    using router_type = typename layer_type::router_type;
    using rs_type = device_route_state<router_type>;
    using experts_type = typename Shape::experts_type;
    LOCUS_REQUIRE(l.router_.has_value(), config_error, "moe_layer::forward: no router weights were set (set_router)");
    const cudaStream_t stream = l.backend().stream;
    if (!s.route || static_cast<rs_type*>(s.route.get())->version != l.router_version_)
      s.route = std::make_shared<rs_type>(*l.router_, l.gate_, l.router_version_, stream);
    auto& rs = *static_cast<rs_type*>(s.route.get());
    const std::size_t H = l.shape().hidden(), E = l.shape().experts(), K = l.shape().top_k();
    LOCUS_REQUIRE(tokens <= static_cast<std::size_t>(INT32_MAX) / (H > E ? H : E), invalid_input_error,
                  "moe_layer::forward: ", tokens, " tokens exceed the 32-bit sizes of the router GEMM");
    rs.tokens = 0;
    rs.logits.resize(std::max<std::size_t>(tokens * E, 1));
    rs.ids.resize(std::max<std::size_t>(tokens * K, 1));
    rs.weights.resize(std::max<std::size_t>(tokens * K, 1));
    rs.kernel.reset(stream);
    if (tokens > 0) {
      const float* xf = nullptr;
      if constexpr (std::is_same_v<value_type, float>) {
        xf = x;
      } else {
        rs.x_f32.resize(tokens * H);
        const std::size_t n = tokens * H;
        const auto blocks = elementwise_blocks(n);
        kernels::to_f32<<<blocks, 256, 0, stream>>>(x, n, rs.x_f32.data());
        LOCUS_CUDA_CHECK(cudaGetLastError());
        xf = rs.x_f32.data();
      }
      // Row-major logits (T × E) = x (T × H) · gate (H × E) is column-major logitsᵀ = gateᵀ · xᵀ.
      const float one = 1.0f, zero = 0.0f;
      LOCUS_CUBLAS_CHECK(cublasSgemm(rs.blas.get(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(E),
                                     static_cast<int>(tokens), static_cast<int>(H), &one, rs.gate_d.data(),
                                     static_cast<int>(E), xf, static_cast<int>(H), &zero, rs.logits.data(),
                                     static_cast<int>(E)));
      if (l.logits_rounding_ == locus::layer::router_logits::bf16) {
        const std::size_t n = tokens * E;
        const auto blocks = elementwise_blocks(n);
        kernels::round_to_bf16<float><<<blocks, 256, 0, stream>>>(rs.logits.data(), n);
        LOCUS_CUDA_CHECK(cudaGetLastError());
      }
      using rk = typename router_type::top_k_type;
      rs.kernel.route(
          locus::router::device_logits_view<experts_type, const float>(rs.logits.data(), tokens, experts_type(E)),
          locus::router::device_mutable_routing_view<rk>(rs.ids.data(), rs.weights.data(), tokens, rk(K)), stream);
    }
    rs.tokens = tokens;
    return {rs.ids.data(), rs.weights.data(), tokens, top_k_type{}};
  }

  // dispatch → compute → combine; a routing error (`fail`, the router's flag `abort`, or the
  // dispatcher's own) is raised by combine once the exchanges are done.
  static void step(layer_type& l, state& s, const value_type* x, const device_routing_view<top_k_type>& r,
                   std::exception_ptr fail, value_type* y, transport::device_abort abort = {}) {
    auto& d = s.dispatch;
    require_stream(l.experts(), l.backend().stream, "routed");
    // A new shared-expert gate goes up before the step's exchanges: an upload from pageable memory
    // may wait, untimed, for the stream's earlier work, so the transport's timed wait goes first. A
    // failure is this rank's, raised after the step like a routing error.
    if (!l.shared_gate_.empty() && s.shared_gate_version != l.shared_version_) try {
        l.exchanger().synchronize("uploading the shared experts' gate");
        s.shared_gate.upload(l.shared_gate_, l.backend().stream);
        s.shared_gate_version = l.shared_version_;
      } catch (...) {
        if (!fail) fail = std::current_exception();
      }
    d.set_layer_index(l.layer_index_);
    d.set_weight_site(layer_type::routing_weight_site);
    d.dispatch(x, r, placement::replica_policy{l.replica_rule_, l.layer_index_, l.hot_ranks_}, fail, abort);
    const auto b = d.blocks();
    try {
      l.experts()(b);
    } catch (...) {
      // Zeros still go back, so that the peers finish combine; the error is raised after it (a
      // zero fill that fails is not raised first either: the peers wait for this rank's combine).
      const auto compute_error = std::current_exception();
      const std::size_t n = b.count == 0 ? 0 : b.offsets[b.count] * b.hidden;
      if (n > 0 && cudaMemsetAsync(b.output, 0, n * sizeof(value_type), l.backend().stream) != cudaSuccess)
        static_cast<void>(cudaGetLastError()); // not left for combine's launch checks to raise
      d.combine(nullptr);                      // raises this rank's routing error, the first cause, if it had one
      std::rethrow_exception(compute_error);
    }
    // In place (y over x), the shared experts, which run after combine wrote y, read a copy of x
    // (queued before combine on the layer's stream; a failure to make it is raised after combine,
    // which the peers wait for).
    const value_type* shared_x = x;
    std::exception_ptr copy_error;
    if (l.shape().shared_experts() > 0) {
      const std::size_t n = d.last_layout().tokens() * l.shape().hidden();
      if (layer_type::overlaps(x, y, n)) try {
          s.shared_in.resize(n);
          LOCUS_CUDA_CHECK(cudaMemcpyAsync(s.shared_in.data(), x, n * sizeof(value_type), cudaMemcpyDeviceToDevice,
                                           l.backend().stream));
          shared_x = s.shared_in.data();
        } catch (...) {
          copy_error = std::current_exception();
        }
    }
    std::exception_ptr earlier; // the previous step's received metadata, refused on the device
    d.combine(y, &earlier);
    try {
      if (copy_error) std::rethrow_exception(copy_error);
      if (l.shape().shared_experts() > 0) add_shared(l, s, shared_x, y);
    } catch (...) {
      if (earlier) std::rethrow_exception(earlier); // the older error, which the peers' data caused
      throw;
    }
    if (earlier) std::rethrow_exception(earlier);
  }

  // An expert compute that names its stream must run on the layer's: on another (the legacy default
  // stream included, which does not wait for non-blocking streams) its GEMMs could read the gathered
  // rows before the gather, and the reduction its outputs before the GEMMs.
  template <class Compute>
  static void require_stream(const Compute& c, cudaStream_t stream, const char* which) {
    if constexpr (requires {
                    { c.stream() } -> std::convertible_to<cudaStream_t>;
                  })
      LOCUS_REQUIRE(c.stream() == stream, config_error, "moe_layer::forward: the ", which,
                    " expert compute runs on another CUDA stream than the layer's backend; give both the same stream");
  }

  // The shared experts on this rank's own tokens, summed in fp32 with the routed part and rounded
  // once, as on the host. Every exchange is done: an error here concerns this rank only.
  static void add_shared(layer_type& l, state& s, const value_type* x, value_type* y) {
    LOCUS_REQUIRE(l.shared_.has_value(), config_error, "moe_layer::forward: the shape has ", l.shape().shared_experts(),
                  " shared experts but none were set (set_shared_experts)");
    require_stream(*l.shared_, l.backend().stream, "shared");
    const std::size_t T = s.dispatch.last_layout().tokens(), H = l.shape().hidden(), n = T * H;
    if (n == 0) return;
    const cudaStream_t stream = l.backend().stream;
    s.shared_out.resize(n);
    s.shared_sum.resize(n);
    const auto blocks = elementwise_blocks(n);
    for (std::size_t e = 0; e < l.shape().shared_experts(); ++e) {
      const expert_id id = static_cast<expert_id>(e);
      const std::size_t offsets[2] = {0, T};
      (*l.shared_)(
          locus::layer::expert_blocks<value_type, memory_space::device>{&id, offsets, 1, x, s.shared_out.data(), H});
      kernels::accumulate<<<blocks, 256, 0, stream>>>(s.shared_out.data(), n, e == 0, s.shared_sum.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
    const float* score = nullptr;
    if (!l.shared_gate_.empty()) {
      s.gate_score.resize(T);
      s.gate_partial.resize(T * gate_lanes);
      kernels::gate_partials<<<elementwise_blocks(T * gate_lanes), 256, 0, stream>>>(x, T, H, s.shared_gate.data(),
                                                                                     s.gate_partial.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
      kernels::gate_finish<><<<elementwise_blocks(T), 256, 0, stream>>>(s.gate_partial.data(), T, s.gate_score.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
      score = s.gate_score.data();
    }
    kernels::add_sum<<<blocks, 256, 0, stream>>>(s.shared_sum.data(), n, y, score, H);
    LOCUS_CUDA_CHECK(cudaGetLastError());
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
