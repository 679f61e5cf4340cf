#pragma once
// locus-requires: cuda
//! @file
//! `device_dispatcher`: dispatch and combine of one rank with every token row in device memory,
//! over a transport with a device exchange (`device_local_transport`, `nccl_transport`), flat or
//! hierarchical as the endpoint says (flat with one GPU per node, where there is no node stage).
//!
//!   flat dispatch:  device layout → permute into the send buffer → one count round (rows and
//!                   entries per destination) → known-count exchanges of the rows' entry metadata
//!                   (entries per row, local slot, weight) → receive layout, checked and built on
//!                   the device → known-count exchange of the rows → gather each local expert's
//!                   input rows
//!   flat combine:   weighted reduction of the expert outputs per received row → known-count
//!                   exchange back → combine on the source (a row shared by several choices
//!                   counts once)
//!   hierarchical:   node layout (one row per remote node, to the rail peer there) → rail stage
//!                   (metadata, then rows) → the rail peer fans the rows out inside its node
//!                   (the stage bodies' fan-out) and sends them with its own rows for its node in
//!                   the node stage → receive layout over the node rows and the rows it forwards to
//!                   itself; combine goes back the same way, the rail peer summing its node's
//!                   returns of each rail row before the rail stage back (detail/node_plan.hpp).
//!
//! Host waits per flat step (one, and the count round), and why:
//! 1. the layout's count read: its per-rank row and entry counts (the message sizes) and its
//!    entries per (destination, slot) come to the host, and with them the caller's "plan nothing"
//!    flag (device_abort: the router's non-finite-logit counter), which the layout applies on the
//!    device, so the flag adds no wait. It waits through the transport's synchronize(), so the
//!    NCCL transport's timeout and error watch cover it and everything queued before it (the last
//!    step's exchanges included);
//! 2. the count round (`exchange_device_counts`, one header round for the whole step): each rank
//!    learns how many rows and entries every peer sends it and, in the round's tail, how many of
//!    those entries go to each of its local slots: the expert compute's segment sizes, so the
//!    receive layout built on the device reads nothing back. Every exchange after the round knows
//!    its counts (`exchange_device_known`: no header round, no wait).
//! The receive layout's check (stage::receive_metadata_check and stage::slot_offsets_check: the
//! received metadata against what the count round announced) stays on the device: a violation
//! makes the expert input gather skip and the weighted reduction return zeros, and its word comes
//! back with the next step's count read (or finish()), which raises it after that step's
//! exchanges.
//! Combine adds no wait (its counts are dispatch's reversed); a peer lost in it is caught by the
//! next step's first wait.
//! Hierarchical step: the layout's count read; its entry metadata comes to the host (the plan's
//! index lists are built there); the four metadata exchanges (rail and node stage, rows' entry
//! counts and entries) go through the host with a header round and the host copies each, because
//! the rail stage's metadata sizes the node stage (a rail peer must know how many rows it
//! forwards to each rank before that exchange). Their row counts make the four row exchanges
//! (rail and node, dispatch and combine) known-count ones, with no wait of their own.
//! No token row is copied to or from the host.

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/topology.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/transport/detail/node_plan.hpp>
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

// Received entry metadata: the result of an exchange copied, device to device, to `out` (the
// transport's buffer is reused by its next exchange).
template <class U>
void keep(const device_exchange_result& in, device_buffer<U>& out, cudaStream_t stream) {
  const std::size_t n = in.offsets.back();
  out.resize(std::max<std::size_t>(n, 1));
  if (n > 0) LOCUS_CUDA_CHECK(cudaMemcpyAsync(out.data(), in.rows, n * sizeof(U), cudaMemcpyDeviceToDevice, stream));
}

} // namespace detail::device_dispatch

//! A device flag that makes this rank's dispatch plan no tokens (device_layout::assign's
//! `plan_nothing`: two device words, the first non-zero to abort), and the error the rank then
//! raises after the step's exchanges, made on the host from the words the layout read.
struct device_abort {
  const unsigned long long* flag = nullptr; //!< null: no flag
  std::exception_ptr (*error)(const std::array<unsigned long long, 2>& words) = nullptr;
};

//! Device dispatch and combine of one rank (flat or hierarchical, as the endpoint's hierarchical(); flat
//! with one GPU per node).
//! @tparam Exchanger a transport endpoint with `exchange_device` (device_local_transport, nccl_transport)
//! @tparam T         row element: float or bfloat16
//! @tparam TopK      `locus::top_k<K>`, static (the kernels are instantiated for K)
//! @tparam Experts   `locus::experts<E>` or `experts<>`
//! @tparam Hidden    `locus::hidden<H>` (the row copy and reduction kernels are instantiated for H)
//!                   or `hidden<>`
template <class Exchanger, class T, class TopK, class Experts = experts<>, class Hidden = hidden<>>
class device_dispatcher {
  static_assert(detail::permute::device_element<T>, "locus::transport::device_dispatcher: rows are float or bfloat16");

public:
  //! @param ex     this rank's endpoint (outlives the dispatcher)
  //! @param map    where the experts live; its ranks are the transport's
  //! @param hidden row width in elements
  //! @param stream the stream every kernel and copy is issued on: the endpoint's
  //! @throws locus::config_error when the map and the transport disagree, `hidden` is zero or
  //!         differs from a static Hidden, or `stream` is not the endpoint's
  device_dispatcher(Exchanger& ex, expert_map map, std::size_t hidden, cudaStream_t stream)
      : ex_(&ex), map_(std::move(map)), hidden_(hidden), hx_(hidden), stream_(stream),
        // With one GPU per node there is no node stage: a hierarchical endpoint takes the flat path.
        kind_(exchange_path(ex.hierarchical() ? transport_kind::hierarchical : transport_kind::flat,
                            ex.topology().gpus_per_node())) {
    LOCUS_REQUIRE(map_.ranks() == ex.topology().ranks(), config_error, "device_dispatcher: the expert map has ",
                  map_.ranks(), " ranks but the transport has ", ex.topology().ranks());
    LOCUS_REQUIRE(hidden > 0, config_error, "device_dispatcher: zero hidden size");
    // The transport waits on its own stream (synchronize()), which must be the one the step runs on.
    LOCUS_REQUIRE(stream == ex.stream(), config_error,
                  "device_dispatcher: the stream differs from the transport endpoint's; give both the same stream");
    const std::size_t S = map_.slots_per_rank();
    for (std::size_t s = 0; s < S; ++s)
      slot_expert_.push_back(map_.expert_at(ex.rank(), s));
  }

  //! Collective: dispatches the rows of `x` (`r.tokens() × hidden`, device) routed by `r` (device),
  //! each copy to the replica `replicas` picks (the policy the host dispatcher's plan() takes, so
  //! both choose the same replicas). Afterwards blocks() describes the local experts' input and
  //! output rows.
  //!
  //! A bad routing (no weights, or what device_layout::assign refuses, a `replicas.hot` of the
  //! wrong size included) does not raise here: this rank then sends no tokens but still receives,
  //! computes and returns its peers' rows, and combine() raises the error once the step's exchanges
  //! are done, so no peer waits for it. `fail` does the same for an error the caller found before
  //! dispatch (a router's), and `abort` for one the device found (a router's non-finite logits):
  //! the layout reads its flag with the counts it returns anyway, so it costs no wait.
  void dispatch(const T* x, const device_routing_view<TopK>& r, const placement::replica_policy& replicas = {},
                std::exception_ptr fail = nullptr, device_abort abort = {}) {
    pending_ = fail;
    recv_bad_ = false;
    bool planned_nothing = false;
    // The last build's check word comes back with this step's count read: queued before it.
    const bool check_queued = queue_check_read();
    const auto wait = [this] { ex_->synchronize("reading the device layout's counts"); };
    if (!pending_) {
      try {
        LOCUS_REQUIRE(!abort.flag || abort.error, config_error, "device_dispatcher: an abort flag without its error");
        LOCUS_REQUIRE(r.tokens() == 0 || r.weights(), invalid_input_error,
                      "device_dispatcher: the routing carries no weights");
        layout_.assign(r, map_, ex_->topology(), ex_->rank(), kind_, stream_, replicas, abort.flag, wait);
        if (layout_.planned_nothing()) {
          planned_nothing = true; // the layout is already one of no rows
          pending_ = abort.error(layout_.flag_words());
          LOCUS_REQUIRE(pending_, config_error, "device_dispatcher: the abort flag was set but its error function ",
                        "gave no error");
        }
      } catch (const invalid_input_error&) {
        pending_ = std::current_exception();
      } catch (const config_error&) {
        pending_ = std::current_exception();
      }
    }
    if (pending_) x = nullptr;
    if (pending_ && !planned_nothing) {
      // The layout kernels stopped at the bad copy; a layout of no tokens replaces it.
      layout_.assign(device_routing_view<TopK>(nullptr, nullptr, 0), map_, ex_->topology(), ex_->rank(), kind_, stream_,
                     {}, nullptr, wait);
    }
    if (check_queued) take_check(" in the previous step"); // every path above waited once
    if (kind_ == transport_kind::hierarchical)
      dispatch_node(x);
    else
      dispatch_flat(x);
    // Blocks of the occupied slots; an empty slot has no entries, so the segments stay contiguous.
    // Refused counts (recv_bad_) leave no blocks: nothing was gathered.
    block_experts_.clear();
    block_offsets_.assign(1, 0);
    const auto so = drl_.slot_offsets_host();
    for (std::size_t s = 0; s < slot_expert_.size() && !recv_bad_; ++s) {
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
  //! @throws locus::transport_error when the last flat dispatch received counts that disagree
  //!         (each peer's entries per slot against its entries, or entries for an empty slot),
  //!         after the exchange (its rows went back as zeros); or, after `y` is written, when the
  //!         dispatch before it received entry metadata its receive layout's device check refused
  //!         (found on the device, so learnt at this step's count read; those rows went back as
  //!         zeros then). With `earlier` given, that error is handed there instead, for a caller
  //!         with more to write into `y` first (the layer's shared experts). With `y` null it
  //!         waits for the next combine or finish(), so that a caller's own error raised after
  //!         this call is not replaced by it.
  void combine(T* y, std::exception_ptr* earlier = nullptr) {
    if (recv_bad_) {
      // Bad received metadata (this rank raises below): every received row goes back as zeros.
      const std::size_t n = rows_.offsets.back();
      back_.resize(std::max<std::size_t>(n, 1) * hidden_);
      if (n > 0) LOCUS_CUDA_CHECK(cudaMemsetAsync(back_.data(), 0, n * hidden_ * sizeof(T), stream_));
    } else {
      back_.resize(std::max<std::size_t>(drl_.rows(), 1) * hidden_);
      reduce_expert_output(drl_, expert_out_.data(), hx_, back_.data(), stream_);
    }
    const T* returned = kind_ == transport_kind::hierarchical ? combine_node() : combine_flat();
    if (pending_) std::rethrow_exception(std::exchange(pending_, nullptr));
    if (!y) return;
    transport::combine(layout_, returned, hx_, y, stream_);
    // The previous step's: this step's rows and `y` are good.
    if (!deferred_) return;
    if (earlier)
      *earlier = std::exchange(deferred_, nullptr);
    else
      std::rethrow_exception(std::exchange(deferred_, nullptr));
  }

  //! Waits for this rank's queued work (through the transport's synchronize(), so the NCCL
  //! transport's timeout and error watch cover it) and raises what the device check found in the
  //! last dispatch's received metadata, which the next dispatch would otherwise learn at its count
  //! read and raise after its exchanges: call it after a run's last step.
  //! @throws locus::transport_error when that check refused the metadata
  void finish() {
    const bool queued = queue_check_read();
    ex_->synchronize("finishing the step");
    if (queued) take_check(" in the last step");
    if (deferred_) std::rethrow_exception(std::exchange(deferred_, nullptr));
  }

  const device_layout<TopK, Experts>& last_layout() const noexcept { return layout_; }
  cudaStream_t stream() const noexcept { return stream_; }

private:
  static const std::byte* bytes_of(const void* p) noexcept { return static_cast<const std::byte*>(p); }

  // Queues the copy of the last build's check word to the host, once per build; true when queued.
  bool queue_check_read() {
    if (!check_unread_) return false;
    check_unread_ = false;
    LOCUS_CUDA_CHECK(
        cudaMemcpyAsync(check_word_.data(), drl_.flag(), sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream_));
    return true;
  }
  // After a wait: the check word's error, kept until a combine or finish() raises it (an earlier
  // one not yet raised stays first).
  void take_check(const char* when) {
    if (std::exception_ptr e = device_receive_layout::error_of(check_word_[0], when); e && !deferred_) deferred_ = e;
  }

  // Flat: every row straight to its destination rank over the world group.
  void dispatch_flat(const T* x) {
    // An entry travels as its local slot and its weight.
    const std::size_t R = map_.ranks(), row_bytes = hidden_ * sizeof(T),
                      entry_bytes = sizeof(std::int32_t) + sizeof(float);
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
    permute(layout_, x, hx_, send_.data(), stream_);
    if (rows > 0) {
      detail::device_dispatch::adjacent_difference_kernel<><<<detail::layout::blocks_for(rows), 256, 0, stream_>>>(
          layout_.row_entry_offsets(), rows, row_entries_.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
    // One count round for the step: rows and entries per destination, and in its tail the entries
    // for each slot of the destination, from the layout's counts (already on the host). Every
    // exchange after it knows its counts: no more header rounds, and no wait.
    const std::size_t S = map_.slots_per_rank();
    const auto& sc = layout_.slot_counts_host();
    slot_tail_.assign(sc.begin(), sc.end());
    ex_->exchange_device_counts(exchange_group::world, row_bytes, send_counts_, entry_bytes, entry_counts_, counts_, 11,
                                slot_tail_, static_cast<std::uint32_t>(S));
    std::size_t recv_rows = 0, recv_entries = 0;
    for (std::size_t s = 0; s < R; ++s) {
      recv_rows += counts_.rows[s];
      recv_entries += counts_.entries[s];
    }
    // The expert compute's segments: each local slot's entries summed over the senders. Counts
    // that do not add up to a sender's entries, or that give an empty slot entries, cannot be
    // used: this rank still receives and returns its rows (as zeros), so no peer waits, and
    // raises after combine.
    std::string why = detail::exchange::slot_offsets_from(counts_, S, expected_offsets_);
    for (std::size_t s = 0; s < S && why.empty(); ++s)
      if (slot_expert_[s] == empty_slot && expected_offsets_[s + 1] != expected_offsets_[s])
        why = ::locus::detail::concat("was sent ", expected_offsets_[s + 1] - expected_offsets_[s],
                                      " entries for its local slot ", s, ", which holds no expert");
    if (!why.empty()) {
      recv_bad_ = true;
      if (!pending_)
        pending_ = std::make_exception_ptr(
            transport_error(::locus::detail::concat("device_dispatcher: rank ", ex_->rank(), " ", why)));
    }
    // Entry metadata, each result copied on the device (the next exchange reuses the transport's
    // buffer); the receive layout is built and checked there against the announced segments.
    ex_->exchange_device_known(exchange_group::world, sizeof(std::int32_t), bytes_of(row_entries_.data()), send_counts_,
                               counts_.rows, meta_);
    detail::device_dispatch::keep(meta_, recv_row_entries_, stream_);
    ex_->exchange_device_known(exchange_group::world, sizeof(std::int32_t), bytes_of(layout_.entry_slot()),
                               entry_counts_, counts_.entries, meta_);
    detail::device_dispatch::keep(meta_, recv_slots_, stream_);
    ex_->exchange_device_known(exchange_group::world, sizeof(float), bytes_of(layout_.entry_weight()), entry_counts_,
                               counts_.entries, meta_);
    detail::device_dispatch::keep(meta_, recv_weights_, stream_);
    if (!recv_bad_) {
      drl_.build(expected_offsets_, recv_row_entries_.data(), recv_rows, recv_slots_.data(), recv_weights_.data(),
                 recv_entries, stream_);
      check_unread_ = true;
    }

    ex_->exchange_device_known(exchange_group::world, row_bytes, bytes_of(send_.data()), send_counts_, counts_.rows,
                               rows_);
    const std::size_t n = recv_bad_ ? 0 : drl_.entries();
    expert_in_.resize(std::max<std::size_t>(n, 1) * hidden_);
    expert_out_.resize(std::max<std::size_t>(n, 1) * hidden_);
    if (!recv_bad_) gather_expert_input(drl_, reinterpret_cast<const T*>(rows_.rows), hx_, expert_in_.data(), stream_);
  }

  // Flat combine: the rows back over the world group, in layout order.
  const T* combine_flat() {
    ex_->exchange_device_known(exchange_group::world, hidden_ * sizeof(T), bytes_of(back_.data()), rows_.counts,
                               send_counts_, returned_);
    return reinterpret_cast<const T*>(returned_.rows);
  }

  // Hierarchical (node layouts): the rail stage sends one row per remote node to the rail peer
  // there, which fans it out inside its node with the node stage, together with its own rows for
  // its node (detail/node_plan.hpp says which row goes where). Each stage's entry metadata goes
  // first, through the host (its counts size the next exchange); rows only move device to device,
  // gathered by the plan's index lists.
  void dispatch_node(const T* x) {
    namespace dd = detail::device_dispatch;
    const auto& topo = ex_->topology();
    const std::size_t G = topo.gpus_per_node(), L = layout_.rows(), row_bytes = hidden_ * sizeof(T);
    const std::size_t E = static_cast<std::size_t>(layout_.rank_entry_offsets_host().back());
    // The layout's entry metadata on the host (the plan reads it).
    h_reo_.assign(L + 1, 0);
    h_target_.resize(E);
    h_slot_.resize(E);
    h_weight_.resize(E);
    if (L > 0) {
      const auto down = [&](auto& host, const auto* dev) {
        LOCUS_CUDA_CHECK(
            cudaMemcpyAsync(host.data(), dev, host.size() * sizeof(host[0]), cudaMemcpyDeviceToHost, stream_));
      };
      down(h_reo_, layout_.row_entry_offsets());
      down(h_target_, layout_.entry_target());
      down(h_slot_, layout_.entry_slot());
      down(h_weight_, layout_.entry_weight());
      ex_->synchronize("reading the layout's entry metadata");
    }
    const dd::layout_rows lr{layout_.rank_offsets_host(), h_reo_, h_target_, h_slot_, h_weight_};
    plan_.plan_rail(G, topo.nodes(), ex_->rank(), lr);
    // Rail stage: metadata, then rows.
    ex_->exchange({exchange_group::rail,
                   sizeof(std::int32_t),
                   std::as_bytes(std::span(plan_.rail_row_entries)),
                   plan_.rail_counts,
                   {},
                   21},
                  meta_a_);
    ex_->exchange({exchange_group::rail,
                   sizeof(dd::node_entry),
                   std::as_bytes(std::span(plan_.rail_entries)),
                   plan_.rail_entry_counts,
                   {},
                   22},
                  meta_b_);
    const std::size_t rail_in = meta_a_.row_count();
    // Source rows: the layout's rows, then the rail rows received.
    src_.resize(std::max<std::size_t>(L + rail_in, 1) * hidden_);
    permute(layout_, x, hx_, src_.data(), stream_);
    gather(src_.data(), plan_.rail_index, index_a_, stage_send_);
    // The rail rows' counts came with their metadata: no header round for them.
    rail_recv_counts_ = meta_a_.counts;
    ex_->exchange_device_known(exchange_group::rail, row_bytes, bytes_of(stage_send_.data()), plan_.rail_counts,
                               rail_recv_counts_, rows_);
    if (rail_in > 0)
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(src_.data() + L * hidden_, rows_.rows, rail_in * row_bytes,
                                       cudaMemcpyDeviceToDevice, stream_));
    // Node stage: own rows for each local rank, then the rail rows forwarded to it.
    plan_.plan_node(lr, as_span<std::int32_t>(meta_a_), as_span<dd::node_entry>(meta_b_));
    ex_->exchange({exchange_group::node,
                   sizeof(std::int32_t),
                   std::as_bytes(std::span(plan_.node_row_entries)),
                   plan_.node_counts,
                   {},
                   24},
                  meta_a_);
    ex_->exchange({exchange_group::node,
                   sizeof(dd::node_entry),
                   std::as_bytes(std::span(plan_.node_entries)),
                   plan_.node_entry_counts,
                   {},
                   25},
                  meta_b_);
    plan_.plan_receive(as_span<std::int32_t>(meta_a_), as_span<dd::node_entry>(meta_b_));
    node_recv_counts_ = meta_a_.counts; // as the rail rows': known from the metadata
    gather(src_.data(), plan_.node_index, index_a_, stage_send_);
    ex_->exchange_device_known(exchange_group::node, row_bytes, bytes_of(stage_send_.data()), plan_.node_counts,
                               node_recv_counts_, rows_);
    // Received rows: the node stage's, then the self-forwarded rail rows.
    const std::size_t node_in = rows_.offsets.back(), self_n = plan_.self_index.size();
    recv_.resize(std::max<std::size_t>(node_in + self_n, 1) * hidden_);
    if (node_in > 0)
      LOCUS_CUDA_CHECK(
          cudaMemcpyAsync(recv_.data(), rows_.rows, node_in * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    if (self_n > 0) {
      index_b_.upload(plan_.self_index, stream_);
      detail::permute::dispatch_gather<T>(src_.data(), index_b_.data(), 1, self_n, hx_,
                                          recv_.data() + node_in * hidden_, stream_);
    }
    rl_.assign(map_.slots_per_rank(), plan_.recv_row_entries, plan_.recv_slot, plan_.recv_weight);
    drl_.assign(rl_, stream_);
    const std::size_t n = rl_.entries();
    expert_in_.resize(std::max<std::size_t>(n, 1) * hidden_);
    expert_out_.resize(std::max<std::size_t>(n, 1) * hidden_);
    gather_expert_input(drl_, recv_.data(), hx_, expert_in_.data(), stream_);
  }

  // Hierarchical combine: node stage back; each rail peer sums, per rail row, what its node
  // returned for it (and its own partial); rail stage back; the layout's rows gathered from the
  // pool in layout order.
  const T* combine_node() {
    const std::size_t row_bytes = hidden_ * sizeof(T);
    const std::size_t node_out = plan_.node_index.size(), self_n = plan_.self_index.size();
    const std::size_t rail_out = plan_.rail_index.size(), rail_in = plan_.forward_offsets.size() - 1;
    const std::size_t node_in = rl_.rows() - self_n;
    pool_.resize(std::max<std::size_t>(node_out + self_n + rail_out, 1) * hidden_);
    ex_->exchange_device_known(exchange_group::node, row_bytes, bytes_of(back_.data()), node_recv_counts_,
                               plan_.node_counts, returned_);
    if (node_out > 0)
      LOCUS_CUDA_CHECK(
          cudaMemcpyAsync(pool_.data(), returned_.rows, node_out * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    if (self_n > 0)
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(pool_.data() + node_out * hidden_, back_.data() + node_in * hidden_,
                                       self_n * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    stage_send_.resize(std::max<std::size_t>(rail_in, 1) * hidden_);
    if (rail_in > 0) {
      index_a_.upload(plan_.forward_offsets, stream_);
      index_b_.upload(plan_.forward_position, stream_);
      ones_.upload(plan_.forward_weight, stream_);
      detail::permute::dispatch_reduce<T>(pool_.data(), index_a_.data(), index_b_.data(), ones_.data(), rail_in, hx_,
                                          stage_send_.data(), stream_);
    }
    ex_->exchange_device_known(exchange_group::rail, row_bytes, bytes_of(stage_send_.data()), rail_recv_counts_,
                               plan_.rail_counts, returned_);
    if (rail_out > 0)
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(pool_.data() + (node_out + self_n) * hidden_, returned_.rows,
                                       rail_out * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    gather(pool_.data(), plan_.return_index, index_a_, ret_);
    return ret_.data();
  }

  // dst[i] = src[index[i]] for the rows of `index` (uploaded through `dev`).
  void gather(const T* src, const std::vector<std::int32_t>& index, device_buffer<std::int32_t>& dev,
              device_buffer<T>& dst) {
    dst.resize(std::max<std::size_t>(index.size(), 1) * hidden_);
    if (index.empty()) return;
    dev.upload(index, stream_);
    detail::permute::dispatch_gather<T>(src, dev.data(), 1, index.size(), hx_, dst.data(), stream_);
  }

  // The received rows of a host exchange as values of U.
  template <class U>
  static std::span<const U> as_span(const exchange_result& r) {
    return {reinterpret_cast<const U*>(r.rows.data()), r.rows.size() / sizeof(U)};
  }

  Exchanger* ex_;
  expert_map map_;
  std::size_t hidden_;
  Hidden hx_; // the row width the kernels are instantiated for (static: a constant)
  cudaStream_t stream_;
  transport_kind kind_;
  std::vector<expert_id> slot_expert_, block_experts_;
  std::vector<std::size_t> block_offsets_, send_counts_, entry_counts_;
  device_layout<TopK, Experts> layout_;
  receive_layout rl_; // hierarchical: built on the host from the plan
  device_receive_layout drl_;
  device_buffer<T> send_, expert_in_, expert_out_, back_;
  device_buffer<std::int32_t> row_entries_;
  device_exchange_result meta_, rows_, returned_;
  device_counts counts_;                                      // flat: the step's count round
  device_buffer<std::int32_t> recv_row_entries_, recv_slots_; // flat: the received entry metadata
  device_buffer<float> recv_weights_;
  std::exception_ptr pending_;                 // this rank's routing error, raised by combine
  bool recv_bad_ = false;                      // flat: the count round's per-slot counts were refused (host check)
  std::vector<std::uint32_t> slot_tail_;       // flat: entries per (destination, slot), the count round's tail
  std::vector<std::int32_t> expected_offsets_; // flat: the local slots' segments the count round announced
  // The device check of the last flat build: its word lands in pinned memory with the next wait.
  pinned_buffer<std::int32_t> check_word_{1};
  bool check_unread_ = false;
  std::exception_ptr deferred_; // the check's error, raised by the next combine or finish()
  // Hierarchical only.
  detail::device_dispatch::node_plan plan_;
  std::vector<std::int32_t> h_reo_, h_target_, h_slot_;
  std::vector<float> h_weight_;
  exchange_result meta_a_, meta_b_;
  std::vector<std::size_t> rail_recv_counts_, node_recv_counts_;
  device_buffer<T> src_, stage_send_, recv_, pool_, ret_;
  device_buffer<std::int32_t> index_a_, index_b_;
  device_buffer<float> ones_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
