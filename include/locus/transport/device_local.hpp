#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The one-GPU multi-rank device transport: R ranks as threads of one process sharing one GPU,
//! each with its own stream, exchanging device rows with device-to-device copies. It has the
//! device interface of `nccl_transport` (`exchange_device`, `device_exchange_result`), so the
//! whole multi-rank device path runs and is tested on one GPU, where NCCL cannot put two ranks on
//! one device.
//!
//! Rows never pass through the host; the members meet on the host once per known-count exchange
//! (twice with a header round), and the last to arrive queues the whole exchange's copies on the
//! group's stream (the protocol: detail/device_local_protocol.hpp, which the CPU tests run with
//! host memory and threads).
//! So a member issues three stream operations per exchange and the group a launch per tile,
//! instead of a copy and two event waits per sender-receiver pair (R = 64: 12,288 calls into one
//! CUDA context per exchange, 16-20 ms per DeepSeek-V3 decode step on an H200).

#include <algorithm>
#include <array>
#include <chrono>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/detail/device_local_protocol.hpp>
#include <locus/transport/detail/group_gather.hpp>
#include <locus/transport/detail/host_staging.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::device_local {

//! An owned CUDA event without timing (cheap to record and wait on).
class event {
public:
  event() { LOCUS_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event() {
    if (e_) cudaEventDestroy(e_); // a failing destroy in a destructor has nowhere to report to
  }
  cudaEvent_t get() const noexcept { return e_; }

private:
  cudaEvent_t e_ = nullptr;
};

//! An owned non-blocking CUDA stream.
class stream {
public:
  stream() { LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  cudaStream_t get() const noexcept { return s_; }

private:
  cudaStream_t s_ = nullptr;
};

// The copies of one tile of an exchange (group_gather.hpp): blockIdx.y the receiver, blockIdx.z
// the sender, the blocks along x share the pair's bytes.
template <bool Vec>
__global__ void __launch_bounds__(group_gather::threads_per_block)
    group_gather_kernel(const __grid_constant__ group_gather::tile_params p) {
  group_gather::copy_pair<Vec>(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, p, blockIdx.z,
                               blockIdx.y);
}

//! The CUDA device policy of the meeting protocol (detail/device_local_protocol.hpp): events,
//! streams, device memory and the group-gather kernel.
struct cuda_device {
  using stream = cudaStream_t;
  using event = device_local::event;
  using group_stream = device_local::stream;
  using buffer = device_buffer<std::byte>;
  using staging = exchange::host_staging<::locus::detail::cuda_memory::stream_memory>;

  static void record(event& e, cudaStream_t s) { LOCUS_CUDA_CHECK(cudaEventRecord(e.get(), s)); }
  static void record(event& e, group_stream& g) { LOCUS_CUDA_CHECK(cudaEventRecord(e.get(), g.get())); }
  static void join(group_stream& g, const event& e) { LOCUS_CUDA_CHECK(cudaStreamWaitEvent(g.get(), e.get(), 0)); }
  static void wait(cudaStream_t s, const event& e) { LOCUS_CUDA_CHECK(cudaStreamWaitEvent(s, e.get(), 0)); }
  static void launch_tile(group_stream& g, const group_gather::tile_params& p, group_gather::tile_shape shape) {
    const dim3 grid(shape.blocks_per_pair, p.receivers, p.senders);
    if (shape.vec)
      group_gather_kernel<true><<<grid, group_gather::threads_per_block, 0, g.get()>>>(p);
    else
      group_gather_kernel<false><<<grid, group_gather::threads_per_block, 0, g.get()>>>(p);
    LOCUS_CUDA_CHECK(cudaGetLastError());
  }
  static void synchronize(cudaStream_t s) { LOCUS_CUDA_CHECK(cudaStreamSynchronize(s)); }
  template <class Endpoint>
  static void host_exchange(Endpoint& ep, staging& s, cudaStream_t st, link_counters& bytes,
                            const exchange_request& req, exchange_result& out) {
    exchange::stage_host_exchange(ep, s, st, bytes, req, out, [st] { synchronize(st); });
  }
};

} // namespace detail::device_local

//! Shared state of R ranks on one GPU (detail/device_local_protocol.hpp). Create it once, then hand
//! `endpoint(r, stream)` to the thread acting as rank r, each rank its own stream. The fabric must
//! outlive its endpoints.
using device_local_fabric = detail::device_local::fabric<detail::device_local::cuda_device>;
//! One rank's endpoint of a device_local_fabric: `exchange_device`, `exchange_device_counts`,
//! `exchange_device_known`, `abandon`, `synchronize`, and the host `exchange`. Each endpoint is
//! used by one thread at a time.
using device_local_transport = detail::device_local::rank_endpoint<detail::device_local::cuda_device>;

//! Policy tags of the one-GPU multi-rank device transport.
struct device_local_flat {
  using policy_concept = transport_tag;
  using exchanger_type = device_local_transport;
  static constexpr transport_kind kind = transport_kind::flat;
};
struct device_local_hierarchical {
  using policy_concept = transport_tag;
  using exchanger_type = device_local_transport;
  static constexpr transport_kind kind = transport_kind::hierarchical;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
