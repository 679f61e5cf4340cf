#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
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
//!   hierarchical:   node layout (one row per remote node, to the rail peer there) → one count
//!                   round (world group) that sizes both stages → rail stage (entry metadata, then
//!                   rows) → the rail peer fans the rows out inside its node on the device and
//!                   sends them with its own rows for its node in the node stage → receive layout
//!                   built on the device from the node stage's metadata, as in the flat step;
//!                   combine goes back the same way, the rail peer summing its node's returns of
//!                   each rail row before the rail stage back (detail/node_step.hpp).
//!
//! Host waits per step (one, and the count round), flat or hierarchical, and why:
//! 1. the layout's count read: its per-rank row and entry counts (the message sizes), its entries
//!    per (rank, slot) and its tokens reaching each rank come to the host, and with them the
//!    caller's "plan nothing" flag (device_abort: the router's non-finite-logit counter), which the
//!    layout applies on the device, so the flag adds no wait. It waits through the transport's
//!    synchronize(), so the NCCL transport's timeout and error watch cover it and everything
//!    queued before it (the last step's exchanges included);
//! 2. the count round (`exchange_device_counts`, one header round for the whole step): each rank
//!    learns how many rows and entries every peer sends it first-hand and, in the round's tail,
//!    how many of its entries go to each of its local slots (the expert compute's segment sizes,
//!    so the receive layout built on the device reads nothing back); a hierarchical round's tail
//!    also carries the rows of each peer that reach it through its node and, to a rail peer, what
//!    it forwards to each rank of its node, so both stages' sizes are known before either moves.
//!    Every exchange after the round knows its counts (`exchange_device_known`: no header round,
//!    no wait).
//! The device checks stay on the device: the receive layout's (stage::receive_metadata_check and
//! stage::slot_offsets_check: the received metadata against what the count round announced) and,
//! hierarchical, the rail peer's (its received rail metadata, and its fan-out against the
//! announced forwards). A violation makes the expert input gather skip and the reductions return
//! zeros, and the words come back with the next step's count read (or finish()), which raises them
//! after that step's exchanges.
//! Combine adds no wait (its counts are dispatch's reversed); a peer lost in it is caught by the
//! next step's first wait.
//! No token row is copied to or from the host.
//! With CUDA's lazy module loading (the default since CUDA 12.2) a kernel's first launch may wait
//! for the device, untimed; a deployment whose first step must already be covered by the timeout
//! sets CUDA_MODULE_LOADING=EAGER or runs one step before it serves.

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/topology.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/transport/detail/flat_step_sequence.hpp>
#include <locus/transport/detail/node_step.hpp>
#include <locus/transport/detail/node_step_sequence.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/device_layout.hpp>
#include <locus/transport/device_permute.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <memory>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::device_dispatch {

//! The deleter of a pointer the dispatcher does not own (its endpoint): a unique_ptr of it is
//! nulled by a move, which a raw pointer is not.
struct not_owned {
  template <class T>
  void operator()(T*) const noexcept {}
};

// A stage of a device step (the `stages` of detail/flat_step_sequence.hpp and node_step_sequence.hpp) as
// a kernel.
template <class Stage, class... A>
__global__ void stage_kernel(A... a) {
  Stage::run(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, a...);
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
      : ex_(&ex), map_(std::move(map)), map_fingerprint_(map_.fingerprint()),
        agreement_(step_agreement(map_fingerprint_, 0)), hidden_(hidden), hx_(hidden), stream_(stream),
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
    // Written once per step after the step's first wait, which its previous upload ran before.
    if (kind_ == transport_kind::hierarchical)
      tables_host_ =
          pinned_buffer<std::int32_t>(detail::node_step::table_count * (ex.topology().gpus_per_node() + 1) + 1);
  }
  device_dispatcher(device_dispatcher&&) noexcept = default;
  // Assigning would free this dispatcher's buffers without its wait first (see quiesce()).
  device_dispatcher& operator=(device_dispatcher&&) = delete;
  ~device_dispatcher() { quiesce(); }

  //! The layer this dispatcher serves, by an index every rank gives alike (the model layer): it
  //! enters every exchange's agreement (step_agreement), so that ranks stepping two layers of one
  //! map in different orders raise together instead of computing one layer's tokens with the
  //! other's experts. Layers that share a map and step on one endpoint need distinct indices.
  void set_layer_index(std::uint64_t index) noexcept {
    layer_index_ = index;
    agreement_ = step_agreement(map_fingerprint_, index, site_);
  }
  std::uint64_t layer_index() const noexcept { return layer_index_; }
  //! Where the routing weights apply (default expert_output): at the expert input, the gather of
  //! the local experts' rows scales each by its weight and combine's reduction sums the outputs
  //! unweighted (as moe_dispatcher::set_weight_site). Part of every exchange's agreement.
  void set_weight_site(weight_site site) noexcept {
    site_ = site;
    agreement_ = step_agreement(map_fingerprint_, layer_index_, site);
  }
  weight_site routing_weight_site() const noexcept { return site_; }

  //! Waits, through the transport, for the work this rank queued, and swallows what the wait
  //! raises: what the destructor does before its buffers go. Freeing device memory waits for the
  //! whole device, untimed, so after a step that ended in an exception before finish(), with a peer
  //! lost, it would wait forever for an exchange that peer never joins; the NCCL transport's timed
  //! wait aborts that exchange at its timeout instead. A caller with device buffers of its own that
  //! the dispatcher's work reads calls it before freeing them.
  void quiesce() noexcept {
    if (!ex_) return;
    try {
      ex_->synchronize("releasing the dispatcher");
    } catch (...) { // a broken transport raises at once; its aborted exchanges hold nothing
    }
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
    in_step([&] { dispatch_step(x, r, replicas, fail, abort); });
  }

private:
  void dispatch_step(const T* x, const device_routing_view<TopK>& r, const placement::replica_policy& replicas,
                     std::exception_ptr fail, device_abort abort) {
    pending_ = fail;
    recv_bad_ = false;
    step_site_ = site_; // the gather below and this step's combine apply the weights alike
    bool planned_nothing = false;
    // The last build's check word comes back with this step's count read: queued before it.
    const bool check_queued = queue_check_read();
    drl_built_ = false;
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

  // Runs `f`, a part of the step whose exchanges the peers take part in. An exception out of it
  // that is not the transport's own (a failed allocation or copy, a check that refused on this rank
  // only) leaves this rank out of step with its peers: an endpoint that can say so is told
  // (abandon), so that neither they nor this rank's next step pair exchanges that do not belong
  // together. The errors the step is designed to raise after its exchanges (a routing error,
  // refused metadata) do not come out of `f`.
  template <class F>
  void in_step(F&& f) {
    try {
      f();
    } catch (const transport_error&) {
      throw; // the transport's own: raised alike on every member, or it is unusable already
    } catch (const timeout_error&) {
      throw; // the transport is unusable already
    } catch (const std::exception& e) {
      if constexpr (requires { ex_->abandon("why"); }) ex_->abandon(e.what());
      throw;
    } catch (...) {
      if constexpr (requires { ex_->abandon("why"); }) ex_->abandon("an exception that names no cause");
      throw;
    }
  }

public:
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
    const T* returned = nullptr;
    in_step([&] {
      if (recv_bad_) {
        // Bad received metadata (this rank raises below): every received row goes back as zeros.
        const std::size_t n = rows_.offsets.back();
        back_.resize(std::max<std::size_t>(n, 1) * hidden_);
        if (n > 0) LOCUS_CUDA_CHECK(cudaMemsetAsync(back_.data(), 0, n * hidden_ * sizeof(T), stream_));
      } else {
        back_.resize(std::max<std::size_t>(drl_.rows(), 1) * hidden_);
        reduce_expert_output(drl_, expert_out_.data(), hx_, back_.data(), stream_, step_site_);
      }
      returned = kind_ == transport_kind::hierarchical ? combine_node() : combine_flat();
    });
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

  // Queues the copy of the last step's device check words to the host (the receive layout's, when
  // it was built, and the hierarchical forwarding check's), once per step; true when queued.
  bool queue_check_read() {
    if (!check_unread_) return false;
    check_unread_ = false;
    check_word_[0] = check_word_[1] = 0;
    if (drl_built_)
      LOCUS_CUDA_CHECK(
          cudaMemcpyAsync(check_word_.data(), drl_.flag(), sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream_));
    if (kind_ == transport_kind::hierarchical)
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(check_word_.data() + 1, node_.flag.data(), sizeof(std::int32_t),
                                       cudaMemcpyDeviceToHost, stream_));
    return true;
  }
  // After a wait: the check words' error, kept until a combine or finish() raises it (an earlier
  // one not yet raised stays first).
  void take_check(const char* when) {
    // The forwarding check first: a rail peer that forwards bad rows to itself also fails its own
    // receive layout's check, whose error would hide the cause.
    std::exception_ptr e;
    if (check_word_[1] != 0) {
      namespace st = detail::stage;
      const std::int32_t bits = check_word_[1];
      e = std::make_exception_ptr(transport_error(::locus::detail::concat(
          "device_dispatcher: rank ", ex_->rank(), " received rail-stage entry metadata it could not forward", when,
          ":", bits & st::bad_row_entries ? " a row without entries;" : "",
          bits & st::bad_entry_total ? " row entry counts that do not add up to the entries received;" : "",
          bits & st::bad_slot ? " an entry for a rank outside its node;" : "",
          bits & st::bad_slot_counts ? " rows or entries per rank other than the count round announced;" : "",
          bits & detail::node_step::past_32_bits ? " a step past 32-bit offsets;" : "",
          " its node's ranks received and returned zeros for the rows it forwards")));
    }
    if (!e) e = device_receive_layout::error_of(check_word_[0], when);
    if (e && !deferred_) deferred_ = e;
  }

  // Counts this rank cannot use for its expert compute (`why` not empty): it still receives and
  // returns its rows (as zeros), so no peer waits, and raises after combine.
  void refuse_counts(const std::string& why) {
    if (why.empty()) return;
    recv_bad_ = true;
    if (!pending_)
      pending_ = std::make_exception_ptr(
          transport_error(::locus::detail::concat("device_dispatcher: rank ", ex_->rank(), " ", why)));
  }

  // The receive layout, built and checked on the device from the received entry metadata against
  // the segments the count round announced (none when the counts were refused).
  void build_receive(std::span<const std::int32_t> expected, const std::int32_t* row_entries, const std::int32_t* slots,
                     const float* weights, std::size_t rows, std::size_t entries) {
    if (recv_bad_) return;
    drl_.build(expected, row_entries, rows, slots, weights, entries, stream_);
    drl_built_ = check_unread_ = true;
  }

  // The local experts' input rows, gathered from the received rows (scaled by their weights when
  // the weights apply to the expert input).
  void gather_input(const T* received) {
    const std::size_t n = recv_bad_ ? 0 : drl_.entries();
    expert_in_.resize(std::max<std::size_t>(n, 1) * hidden_);
    expert_out_.resize(std::max<std::size_t>(n, 1) * hidden_);
    if (recv_bad_) return;
    if (step_site_ == weight_site::expert_input)
      gather_weighted_expert_input(drl_, received, hx_, expert_in_.data(), stream_);
    else
      gather_expert_input(drl_, received, hx_, expert_in_.data(), stream_);
  }

  // Flat: every row straight to its destination rank over the world group.
  void dispatch_flat(const T* x) {
    // An entry travels as its local slot and its weight.
    const std::size_t R = map_.ranks(), entry_bytes = sizeof(std::int32_t) + sizeof(float);
    const auto& ro = layout_.rank_offsets_host();
    const auto& eo = layout_.rank_entry_offsets_host();
    send_counts_.resize(R);
    entry_counts_.resize(R);
    for (std::size_t d = 0; d < R; ++d) {
      send_counts_[d] = static_cast<std::size_t>(ro[d + 1] - ro[d]);
      entry_counts_[d] = static_cast<std::size_t>(eo[d + 1] - eo[d]);
    }
    // The sequence (detail/flat_step_sequence.hpp, which the CPU tests run too): the rows and
    // their entry counts are queued before the count round, so they overlap its meeting.
    step_engine e{*this, x};
    const detail::flat_step::layout_view lay{layout_.rows(), layout_.row_entry_offsets(), layout_.entry_slot(),
                                             layout_.entry_weight()};
    detail::flat_step::prepare_sequence(e, flat_, lay, hidden_);
    // One count round for the step: rows and entries per destination, and in its tail the entries
    // for each slot of the destination, from the layout's counts (already on the host). Every
    // exchange after it knows its counts: no more header rounds, and no wait.
    const std::size_t S = map_.slots_per_rank();
    const auto& sc = layout_.slot_counts_host();
    slot_tail_.assign(sc.begin(), sc.end());
    ex_->exchange_device_counts(exchange_group::world, hidden_ * sizeof(T), send_counts_, entry_bytes, entry_counts_,
                                counts_, 11, slot_tail_, static_cast<std::uint32_t>(S), agreement_);
    // The expert compute's segments: each local slot's entries summed over the senders.
    std::string why = detail::exchange::slot_offsets_from(counts_, S, expected_offsets_);
    if (why.empty()) why = detail::exchange::entries_for_empty_slot(expected_offsets_, slot_expert_);
    refuse_counts(why);
    // The receive layout is built and checked on the device against the announced segments.
    std::size_t recv_rows = 0, recv_entries = 0;
    for (std::size_t m = 0; m < R; ++m) {
      recv_rows += counts_.rows[m];
      recv_entries += counts_.entries[m];
    }
    const T* received =
        detail::flat_step::dispatch_sequence(e, flat_, lay, send_counts_, entry_counts_, counts_, hidden_, [&] {
          build_receive(expected_offsets_, flat_.recv_row_entries.data(), flat_.recv_slots.data(),
                        flat_.recv_weights.data(), recv_rows, recv_entries);
        });
    gather_input(received);
  }

  // Flat combine: the rows back over the world group, in layout order.
  const T* combine_flat() {
    step_engine e{*this, nullptr};
    return detail::flat_step::combine_sequence(e, send_counts_, counts_, hidden_, back_.data());
  }

  // Hierarchical (node layouts), detail/node_step.hpp: one count round sizes every exchange of the
  // step; the rail stage sends one row per remote node to the rail peer there, which fans it out
  // inside its node on the device and sends it with its own rows in the node stage.
  void dispatch_node(const T* x) {
    namespace ns = detail::node_step;
    const std::size_t G = ex_->topology().gpus_per_node(), S = map_.slots_per_rank(), self = ex_->rank();
    const ns::layout_counts lc = node_view().counts;
    // The count round: first-hand rows and entries, and in the tail what reaches each rank and
    // what each rail peer forwards; every exchange after it knows its counts.
    ns::round_message(lc, G, self, S, send_counts_, entry_counts_, slot_tail_);
    ex_->exchange_device_counts(exchange_group::world, hidden_ * sizeof(T), send_counts_, sizeof(ns::node_entry),
                                entry_counts_, counts_, 11, slot_tail_,
                                static_cast<std::uint32_t>(ns::tail_width(S, G)), agreement_);
    std::string why = ns::counts_from(lc, counts_, G, self, S, sc_);
    // A round of another width leaves no sizes to exchange by (the transports refuse it first).
    LOCUS_REQUIRE(sc_.sized, invalid_input_error, "device_dispatcher: rank ", self, " ", why);
    if (why.empty()) why = detail::exchange::entries_for_empty_slot(sc_.slot_offsets, slot_expert_);
    refuse_counts(why);
    // The rail stage, the fan-out and the node stage (detail/node_step_sequence.hpp, which the CPU
    // tests run too); the receive layout is built from the node stage's metadata before its rows.
    step_engine e{*this, x};
    const T* received = ns::dispatch_sequence(e, node_, node_view(), sc_, G, self, hidden_, [&] {
      build_receive(sc_.slot_offsets, node_.recv_row_entries.data(), node_.recv_slots.data(), node_.recv_weights.data(),
                    sc_.node_in, sc_.node_in_entries);
      // The forwarding check's word is read with the next step's count read, with the receive
      // layout's; none after counts refused here, which this step raises itself (a step past 32-bit
      // offsets starts with the word set: read, it would fail the next, good, step).
      check_unread_ = !recv_bad_;
    });
    gather_input(received);
  }

  // Hierarchical combine: node stage back; each rail peer sums, per rail row, what its node
  // returned for it; rail stage back; the layout's rows gathered in layout order.
  const T* combine_node() {
    step_engine e{*this, nullptr};
    return detail::node_step::combine_sequence(e, node_, node_view(), sc_, ex_->topology().gpus_per_node(), ex_->rank(),
                                               hidden_, back_.data());
  }

  // The node layout as the hierarchical step reads it.
  detail::node_step::layout_view node_view() const {
    return {{layout_.rank_offsets_host(), layout_.rank_entry_offsets_host(), layout_.slot_counts_host(),
             layout_.reach_host()},
            layout_.rows(),
            layout_.row_entry_offsets(),
            layout_.entry_target(),
            layout_.entry_slot(),
            layout_.entry_weight()};
  }

  // The device steps' engine (detail/step_engine.hpp): CUDA launches, CUB scans and the endpoint's
  // known-count device exchanges, on the dispatcher's stream.
  struct step_engine {
    template <class U>
    using buffer = device_buffer<U>;
    device_dispatcher& d;
    const T* x; // dispatch's input rows (null in combine)

    template <class Stage, class... A>
    void launch(std::size_t items, Stage, A... a) {
      detail::device_dispatch::stage_kernel<Stage, A...>
          <<<detail::layout::blocks_for(items), 256, 0, d.stream_>>>(a...);
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
    // CUB's scan: the fan-out's arrays are rail rows × GPUs long, too long for
    // stage::exclusive_scan's one thread.
    void scan(const std::int32_t* in, std::size_t n, std::int32_t* out) {
      detail::permute::device_scan(in, n, out, d.scan_temp_, d.stream_);
    }
    template <class U>
    void zero(U* p, std::size_t n) {
      if (n > 0) LOCUS_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(U), d.stream_));
    }
    template <class U>
    void copy(U* dst, const U* src, std::size_t n) {
      if (n > 0) LOCUS_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(U), cudaMemcpyDeviceToDevice, d.stream_));
    }
    // Through pinned memory (queued: no wait), written once per step after the step's first wait,
    // which its previous upload ran before; sized by the constructor.
    void upload(std::span<const std::int32_t> tables, std::int32_t word, std::int32_t* table_dst,
                std::int32_t* word_dst) {
      std::copy(tables.begin(), tables.end(), d.tables_host_.data());
      d.tables_host_[tables.size()] = word;
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(table_dst, d.tables_host_.data(), tables.size() * sizeof(std::int32_t),
                                       cudaMemcpyHostToDevice, d.stream_));
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(word_dst, d.tables_host_.data() + tables.size(), sizeof(std::int32_t),
                                       cudaMemcpyHostToDevice, d.stream_));
    }
    const void* exchange(exchange_group g, detail::node_step::received into, std::size_t element_bytes,
                         const void* send, std::span<const std::size_t> send_counts,
                         std::span<const std::size_t> recv_counts) {
      using detail::node_step::received;
      device_exchange_result& out = into == received::metadata ? d.meta_
                                    : into == received::rows   ? d.rows_
                                                               : d.returned_;
      d.ex_->exchange_device_known(g, element_bytes, bytes_of(send), send_counts, recv_counts, out);
      return out.rows;
    }
    void permute(T* dst) { transport::permute(d.layout_, x, d.hx_, dst, d.stream_); }
    void gather(const T* src, const std::int32_t* index, std::size_t n, T* dst) {
      if (n > 0) detail::permute::dispatch_gather<T>(src, index, 1, n, d.hx_, dst, d.stream_);
    }
    void reduce(const T* src, const std::int32_t* offsets, const std::int32_t* position, const float* weight,
                std::size_t n, T* dst, const std::int32_t* flag) {
      detail::permute::dispatch_reduce<T>(src, offsets, position, weight, n, d.hx_, dst, d.stream_, flag);
    }
  };

  // Null once moved from (the moved-from dispatcher's destructor then waits for nothing).
  std::unique_ptr<Exchanger, detail::device_dispatch::not_owned> ex_;
  expert_map map_;
  std::uint64_t map_fingerprint_;
  std::uint64_t layer_index_ = 0;
  weight_site site_ = weight_site::expert_output;
  weight_site step_site_ = weight_site::expert_output; // the last dispatch's, which its combine follows
  std::uint64_t agreement_; // step_agreement(map, index, site): each count round carries it, ranks compare it
  std::size_t hidden_;
  Hidden hx_; // the row width the kernels are instantiated for (static: a constant)
  cudaStream_t stream_;
  transport_kind kind_;
  std::vector<expert_id> slot_expert_, block_experts_;
  std::vector<std::size_t> block_offsets_, send_counts_, entry_counts_;
  device_layout<TopK, Experts> layout_;
  device_receive_layout drl_;
  device_buffer<T> expert_in_, expert_out_, back_;
  device_exchange_result meta_, rows_, returned_;
  device_counts counts_;                       // the step's count round
  std::exception_ptr pending_;                 // this rank's routing error, raised by combine
  bool recv_bad_ = false;                      // the count round's counts were refused (host check)
  std::vector<std::uint32_t> slot_tail_;       // the count round's tail
  std::vector<std::int32_t> expected_offsets_; // flat: the local slots' segments the count round announced
  // The device checks of the last step (receive layout, forwarding): their words land in pinned
  // memory with the next wait.
  pinned_buffer<std::int32_t> check_word_{2};
  bool check_unread_ = false, drl_built_ = false;
  std::exception_ptr deferred_; // the checks' error, raised by the next combine or finish()
  // Hierarchical only (detail/node_step.hpp).
  detail::node_step::step_counts sc_;
  pinned_buffer<std::int32_t> tables_host_;              // the step's tables on their way to the device
  detail::flat_step::step_buffers<step_engine, T> flat_; // flat only
  detail::node_step::step_buffers<step_engine, T> node_;
  device_buffer<std::byte> scan_temp_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
