#pragma once
// locus-requires: cuda
//! @file
//! `device_dispatcher`: dispatch and combine of one rank with every token row in device memory,
//! over a transport with a device exchange (`device_local_transport`, `nccl_transport`); flat
//! layouts.
//!
//!   dispatch: device layout → permute into the send buffer → exchange the rows' entry metadata
//!             (entries per row, local slot, weight) → receive layout → exchange the rows →
//!             gather each local expert's input rows
//!   combine:  weighted reduction of the expert outputs per received row → exchange back →
//!             combine on the source (a row shared by several choices counts once)
//!
//! Host synchronisation per step: the layout returns its per-rank row and entry counts (the
//! message sizes), each exchange agrees on counts behind the transport's header round, and the
//! received entry metadata (4 + 4 + 4 bytes per entry, never a token row) comes to the host once,
//! because the expert compute issues one GEMM per expert and needs each expert's row count on the
//! host. No token row is copied to or from the host.

#include <cstddef>
#include <cstdint>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/topology.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/placement/replica_selection.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/device_layout.hpp>
#include <locus/transport/device_permute.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::device_dispatch {

template <class = void>
__global__ void adjacent_difference_kernel(const std::int32_t* offsets, std::size_t n, std::int32_t* out) {
  stage::adjacent_difference(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, offsets, n, out);
}

// Received entry metadata: the result of an exchange copied to the host (the caller synchronises).
inline void download(const device_exchange_result& in, std::vector<std::int32_t>& host, cudaStream_t stream) {
  host.resize(in.offsets.back());
  if (!host.empty())
    LOCUS_CUDA_CHECK(
        cudaMemcpyAsync(host.data(), in.rows, host.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream));
}

} // namespace detail::device_dispatch

//! Device dispatch and combine of one rank (flat layouts).
//! @tparam Exchanger a transport endpoint with `exchange_device` (device_local_transport, nccl_transport)
//! @tparam T         row element: float or bfloat16
//! @tparam TopK      `locus::top_k<K>`, static (the kernels are instantiated for K)
//! @tparam Experts   `locus::experts<E>` or `experts<>`
template <class Exchanger, class T, class TopK, class Experts = experts<>>
class device_dispatcher {
  static_assert(detail::permute::device_element<T>, "locus::transport::device_dispatcher: rows are float or bfloat16");

public:
  //! @param ex     this rank's endpoint (outlives the dispatcher)
  //! @param map    where the experts live; its ranks are the transport's
  //! @param hidden row width in elements
  //! @param stream the stream every kernel and copy is issued on: the endpoint's
  //! @throws locus::config_error when the map and the transport disagree, or the endpoint is
  //!         hierarchical (the device path moves flat layouts)
  device_dispatcher(Exchanger& ex, expert_map map, std::size_t hidden, cudaStream_t stream)
      : ex_(&ex), map_(std::move(map)), hidden_(hidden), stream_(stream) {
    LOCUS_REQUIRE(map_.ranks() == ex.topology().ranks(), config_error, "device_dispatcher: the expert map has ",
                  map_.ranks(), " ranks but the transport has ", ex.topology().ranks());
    LOCUS_REQUIRE(!ex.hierarchical(), config_error,
                  "device_dispatcher: the device path moves flat layouts; the transport endpoint is hierarchical");
    LOCUS_REQUIRE(hidden > 0, config_error, "device_dispatcher: zero hidden size");
    const std::size_t S = map_.slots_per_rank();
    for (std::size_t s = 0; s < S; ++s)
      slot_expert_.push_back(map_.expert_at(ex.rank(), s));
  }

  //! Collective: dispatches the rows of `x` (`r.tokens() × hidden`, device) routed by `r` (device),
  //! each copy to the replica `replicas` picks (placement/replica_selection.hpp: the rule the host
  //! dispatcher's plan() takes, so both choose the same replicas). Afterwards blocks() describes
  //! the local experts' input and output rows.
  //!
  //! A bad routing (no weights, or what device_layout::assign refuses, a `replicas.hot` of the
  //! wrong size included) does not raise here: this rank then sends no tokens but still receives,
  //! computes and returns its peers' rows, and combine() raises the error once the step's exchanges
  //! are done, so no peer waits for it. `fail` does the same for an error the caller found before
  //! dispatch (a router's).
  void dispatch(const T* x, const device_routing_view<TopK>& r, const placement::replica_policy& replicas = {},
                std::exception_ptr fail = nullptr) {
    const std::size_t R = map_.ranks(), row_bytes = hidden_ * sizeof(T);
    pending_ = fail;
    if (!pending_) {
      try {
        LOCUS_REQUIRE(r.tokens() == 0 || r.weights(), invalid_input_error,
                      "device_dispatcher: the routing carries no weights");
        layout_.assign(r, map_, ex_->topology(), ex_->rank(), transport_kind::flat, stream_, replicas);
      } catch (const invalid_input_error&) {
        pending_ = std::current_exception();
      } catch (const config_error&) {
        pending_ = std::current_exception();
      }
    }
    if (pending_) {
      // The layout kernels stopped at the bad copy; a layout of no tokens replaces it.
      layout_.assign(device_routing_view<TopK>(nullptr, nullptr, 0), map_, ex_->topology(), ex_->rank(),
                     transport_kind::flat, stream_);
      x = nullptr;
    }
    const auto& ro = layout_.rank_offsets_host();
    const auto& eo = layout_.rank_entry_offsets_host();
    send_counts_.resize(R);
    entry_counts_.resize(R);
    for (std::size_t d = 0; d < R; ++d) {
      send_counts_[d] = static_cast<std::size_t>(ro[d + 1] - ro[d]);
      entry_counts_[d] = static_cast<std::size_t>(eo[d + 1] - eo[d]);
    }
    const std::size_t rows = layout_.rows();
    send_.resize(std::max<std::size_t>(rows, 1) * hidden_);
    row_entries_.resize(std::max<std::size_t>(rows, 1));
    permute(layout_, x, hidden_, send_.data(), stream_);
    if (rows > 0) {
      detail::device_dispatch::adjacent_difference_kernel<>
          <<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream_>>>(layout_.row_entry_offsets(), rows,
                                                                           row_entries_.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
    // Entry metadata first: every result comes to the host before the rows are exchanged, whose
    // result then stays in the transport's buffer until combine.
    const auto bytes_of = [](const auto* p) { return reinterpret_cast<const std::byte*>(p); };
    ex_->exchange_device(exchange_group::world, sizeof(std::int32_t), bytes_of(row_entries_.data()), send_counts_, {},
                         meta_, 11);
    detail::device_dispatch::download(meta_, recv_row_entries_, stream_);
    ex_->exchange_device(exchange_group::world, sizeof(std::int32_t), bytes_of(layout_.entry_slot()), entry_counts_, {},
                         meta_, 12);
    detail::device_dispatch::download(meta_, recv_slots_, stream_);
    ex_->exchange_device(exchange_group::world, sizeof(float), bytes_of(layout_.entry_weight()), entry_counts_, {},
                         meta_, 13);
    recv_weights_.resize(meta_.offsets.back());
    if (!recv_weights_.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(recv_weights_.data(), meta_.rows, recv_weights_.size() * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream_));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    rl_.assign(map_.slots_per_rank(), recv_row_entries_, recv_slots_, recv_weights_);
    drl_.assign(rl_, stream_);

    ex_->exchange_device(exchange_group::world, row_bytes, bytes_of(send_.data()), send_counts_, {}, rows_, 14);
    const std::size_t n = rl_.entries();
    expert_in_.resize(std::max<std::size_t>(n, 1) * hidden_);
    expert_out_.resize(std::max<std::size_t>(n, 1) * hidden_);
    gather_expert_input(drl_, reinterpret_cast<const T*>(rows_.rows), hidden_, expert_in_.data(), stream_);
    // Blocks of the occupied slots; an empty slot has no entries, so the segments stay contiguous.
    block_experts_.clear();
    block_offsets_.assign(1, 0);
    const auto so = rl_.slot_offsets();
    for (std::size_t s = 0; s < slot_expert_.size(); ++s) {
      if (slot_expert_[s] == empty_slot) continue;
      block_experts_.push_back(slot_expert_[s]);
      block_offsets_.push_back(static_cast<std::size_t>(so[s + 1]));
    }
  }

  //! The local experts' rows of the last dispatch, on the device: the compute reads `input` and
  //! writes `output`.
  layer::expert_blocks<T, memory_space::device> blocks() noexcept {
    return {block_experts_.data(), block_offsets_.data(), block_experts_.size(),
            expert_in_.data(),     expert_out_.data(),    hidden_};
  }

  //! Collective: returns the weighted expert outputs to their sources and sums each token's rows
  //! into `y` (`tokens × hidden`, device).
  //! `y` null: the exchange only, nothing written (a rank that is going to raise).
  //! @throws locus::invalid_input_error the last dispatch's routing error, after the exchange
  //!         (`y` is then left as it was)
  void combine(T* y) {
    const std::size_t row_bytes = hidden_ * sizeof(T);
    back_.resize(std::max<std::size_t>(rl_.rows(), 1) * hidden_);
    reduce_expert_output(drl_, expert_out_.data(), hidden_, back_.data(), stream_);
    ex_->exchange_device(exchange_group::world, row_bytes, reinterpret_cast<const std::byte*>(back_.data()),
                         rows_.counts, send_counts_, returned_, 15);
    if (pending_) std::rethrow_exception(std::exchange(pending_, nullptr));
    if (y) transport::combine(layout_, reinterpret_cast<const T*>(returned_.rows), hidden_, y, stream_);
  }

  const device_layout<TopK, Experts>& last_layout() const noexcept { return layout_; }
  const receive_layout& last_receive_layout() const noexcept { return rl_; }
  cudaStream_t stream() const noexcept { return stream_; }

private:
  Exchanger* ex_;
  expert_map map_;
  std::size_t hidden_;
  cudaStream_t stream_;
  std::vector<expert_id> slot_expert_, block_experts_;
  std::vector<std::size_t> block_offsets_, send_counts_, entry_counts_;
  device_layout<TopK, Experts> layout_;
  receive_layout rl_;
  device_receive_layout drl_;
  device_buffer<T> send_, expert_in_, expert_out_, back_;
  device_buffer<std::int32_t> row_entries_;
  device_exchange_result meta_, rows_, returned_;
  std::vector<std::int32_t> recv_row_entries_, recv_slots_;
  std::vector<float> recv_weights_;
  std::exception_ptr pending_; // this rank's routing error, raised by combine
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
