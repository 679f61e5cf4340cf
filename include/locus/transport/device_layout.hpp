#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The layout of `transport/layout.hpp` computed on a GPU from a device routing: the same arrays,
//! equal bit for bit (same per-token code, stable CUB sorts and scans). The routing stays on the
//! device; the expert map and topology come from the host (a few KiB uploaded per assign).
//! assign() synchronises the stream once at the end, to check the input and to return the
//! per-rank row and entry counts, the per-(rank, slot) entry counts and the tokens reaching each
//! rank to the host, where a
//! transport needs them anyway (message sizes; the receivers' expert compute sizes).
//! A device flag may tell it to plan nothing (the router's non-finite-logit counter): the counts
//! are then zeroed on the device and the flag comes back in the same wait.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/transport/detail/dispatch_layout.hpp>
#include <locus/transport/layout.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Device layout of one source rank.
//! @tparam TopK    `locus::top_k<K>` - static: the kernels are instantiated for K
//! @tparam Experts `locus::experts<E>` or `experts<>`
template <class TopK, class Experts = experts<>>
class device_layout {
  static_assert(extent_of<TopK, locus::detail::top_k_tag> && TopK::is_static,
                "locus::transport::device_layout needs a static locus::top_k<K>: its kernels are specialised for K");
  static_assert(extent_of<Experts, locus::detail::experts_tag>,
                "locus::transport::device_layout: the second parameter must be locus::experts<E>");
  static constexpr std::size_t K = TopK::static_value;

public:
  //! Same contract as layout::assign, for a device routing; `replicas` is layout_options::replicas
  //! (the replica rule, and for locality_bounded the hot ranks). `plan_nothing`, when not null,
  //! points to two device words written before this call on `stream` (router::cuda_router's
  //! status_words()): a non-zero first word makes the layout one of no rows and no tokens, the
  //! routing's own errors unreported (the flag's owner raises its own), and both words come to the
  //! host with the counts (flag_words()), so the flag costs no wait of its own.
  //! @throws locus::config_error when map, topology and Experts disagree, or `replicas.hot` has
  //!         neither no entry nor one per rank
  //! @throws locus::invalid_input_error naming the first token and choice with an out-of-range or
  //!         repeated expert id or a non-finite weight (found on the device, named on the host)
  //! @throws locus::cuda_error on a CUDA failure
  //! `wait`, when given, is how the one wait is made (a transport's timed synchronize(), so that a
  //! peer lost in work queued earlier on the stream is reported instead of waited for); by
  //! default cudaStreamSynchronize.
  template <class Topology>
  void assign(const device_routing_view<TopK>& r, const expert_map& map, const Topology& topo, std::size_t source_rank,
              transport_kind kind = transport_kind::flat, cudaStream_t stream = nullptr,
              const placement::replica_policy& replicas = {}, const unsigned long long* plan_nothing = nullptr,
              const std::function<void()>& wait = {}) {
    static_assert(any_topology<Topology>, "locus::transport::device_layout needs a locus::topology");
    flag_host_ = {};
    LOCUS_REQUIRE(map.ranks() == topo.ranks(), config_error, "device_layout: the expert map has ", map.ranks(),
                  " ranks but the topology has ", topo.ranks());
    const Experts experts(map.experts());
    // The replica stage sorts copies by 2 × expert + joined in 32 bits.
    LOCUS_REQUIRE(map.experts() <= static_cast<std::size_t>(INT32_MAX) / 2, config_error,
                  "device_layout: ", map.experts(), " experts exceed the replica stage's 32-bit sort keys (at most ",
                  INT32_MAX / 2, ")");
    LOCUS_REQUIRE(source_rank < topo.ranks(), invalid_input_error, "device_layout: source rank ", source_rank,
                  " out of range [0, ", topo.ranks(), ")");
    LOCUS_REQUIRE(r.tokens() * K <= static_cast<std::size_t>(INT32_MAX) / 2, invalid_input_error,
                  "device_layout: ", r.tokens(), " tokens × top_k ", K, " copies exceed 32-bit indices");
    kind_ = kind;
    tokens_ = r.tokens();
    ranks_ = topo.ranks();
    slots_ = map.slots_per_rank();
    gpus_ = topo.gpus_per_node();
    const detail::layout::token_params p{
        static_cast<std::int32_t>(source_rank), static_cast<std::int32_t>(gpus_), static_cast<std::int32_t>(slots_),
        static_cast<std::int32_t>(kind == transport_kind::flat ? slots_ : gpus_ * slots_),
        kind == transport_kind::hierarchical};
    placement::replica_candidates(map, topo, source_rank, fixed_, cand_offsets_, cands_, replicas);
    const expert_map_view v = map.view();
    upload_tables(v.replicas, static_cast<std::size_t>(v.replica_offsets[v.experts]), stream);
    detail::layout::dispatch_build<K, Experts>(b_, r.ids(), r.weights(), tokens_, experts, replicas_.data(), p, ranks_,
                                               replicas.rule, stream);
    if (plan_nothing) {
      detail::layout::plan_nothing_kernel<<<1, 128, 0, stream>>>(plan_nothing, ranks_, b_.rank_offsets.data(),
                                                                 b_.rank_entry_offsets.data(), b_.slot_counts.data(),
                                                                 ranks_ * slots_, b_.reach.data(), b_.links.data());
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
    // Everything the host reads lands in pinned memory, so no copy waits on its own: the one wait
    // is `wait`'s. Words: the error, rank offsets, rank entry offsets, slot counts, reach; then the
    // links and the flag's two words.
    const std::size_t R1 = ranks_ + 1, SC = ranks_ * slots_;
    words_.resize(1 + 2 * R1 + SC + ranks_);
    wide_.resize(3 + 2);
    const auto down = [&](auto* host, const auto* dev, std::size_t n) {
      if (n > 0) LOCUS_CUDA_CHECK(cudaMemcpyAsync(host, dev, n * sizeof(*host), cudaMemcpyDeviceToHost, stream));
    };
    down(words_.data(), b_.error.data(), 1);
    down(words_.data() + 1, b_.rank_offsets.data(), R1);
    down(words_.data() + 1 + R1, b_.rank_entry_offsets.data(), R1);
    down(words_.data() + 1 + 2 * R1, b_.slot_counts.data(), SC);
    down(words_.data() + 1 + 2 * R1 + SC, b_.reach.data(), ranks_);
    down(wide_.data(), b_.links.data(), 3);
    wide_[3] = wide_[4] = 0;
    if (plan_nothing) down(wide_.data() + 3, plan_nothing, 2);
    if (wait)
      wait();
    else
      LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::int32_t error = words_[0];
    rank_offsets_host_.assign(words_.data() + 1, words_.data() + 1 + R1);
    rank_entry_offsets_host_.assign(words_.data() + 1 + R1, words_.data() + 1 + 2 * R1);
    slot_counts_host_.assign(words_.data() + 1 + 2 * R1, words_.data() + 1 + 2 * R1 + SC);
    reach_host_.assign(words_.data() + 1 + 2 * R1 + SC, words_.data() + 1 + 2 * R1 + SC + ranks_);
    links_host_ = {wide_[0], wide_[1], wide_[2]};
    flag_host_ = {wide_[3], wide_[4]};
    if (planned_nothing()) {
      tokens_ = 0;
      return;
    }
    if (error != 0x7f7f7f7f) report(r, error, experts.value());
  }

  //! Whether the last assign was told by its flag to plan nothing.
  bool planned_nothing() const noexcept { return flag_host_[0] != 0; }
  //! Host copy of the last assign's flag words (zeros when it had none).
  const std::array<unsigned long long, 2>& flag_words() const noexcept { return flag_host_; }

  transport_kind kind() const noexcept { return kind_; }
  std::size_t tokens() const noexcept { return tokens_; }
  static constexpr std::size_t top_k() noexcept { return K; }
  std::size_t copies() const noexcept { return tokens_ * K; }
  std::size_t rows() const noexcept {
    return rank_offsets_host_.empty() ? 0 : static_cast<std::size_t>(rank_offsets_host_.back());
  }
  std::size_t ranks() const noexcept { return ranks_; }
  std::size_t slots_per_rank() const noexcept { return slots_; }
  //! Host copy of the per-rank row offsets (`ranks + 1` values).
  const std::vector<std::int32_t>& rank_offsets_host() const noexcept { return rank_offsets_host_; }
  //! Host copy of the per-rank entry offsets (`ranks + 1` values).
  const std::vector<std::int32_t>& rank_entry_offsets_host() const noexcept { return rank_entry_offsets_host_; }
  //! Host copy of the copies per (rank, slot) of their replicas (`ranks × slots_per_rank` values,
  //! layout::slot_counts): in a flat layout the entries this rank sends each slot of each rank.
  const std::vector<std::int32_t>& slot_counts_host() const noexcept { return slot_counts_host_; }
  //! Host copy of the tokens that reach each rank (`ranks` values: tokens with a copy there): the
  //! rows that arrive there from this source, first-hand or forwarded (a node layout's count round).
  const std::vector<std::int32_t>& reach_host() const noexcept { return reach_host_; }
  //! Copies moved per link class (as layout::link_copies).
  std::array<std::uint64_t, link_class_count> link_copies() const noexcept {
    return {links_host_[0], links_host_[1], links_host_[2]};
  }

  //! @name Device arrays, with the meaning and length of layout's accessors of the same name
  //! @{
  const std::int32_t* copy_rank() const noexcept { return b_.copy_rank.data(); }
  const std::int32_t* copy_slot() const noexcept { return b_.copy_slot.data(); }
  const std::int32_t* copy_replica() const noexcept { return b_.copy_replica.data(); }
  const std::int32_t* copy_row() const noexcept { return b_.copy_row.data(); }
  const std::int32_t* copy_entry() const noexcept { return b_.copy_entry.data(); }
  const std::int32_t* row_token() const noexcept { return b_.row_token.data(); }
  const std::int32_t* rank_offsets() const noexcept { return b_.rank_offsets.data(); }
  const std::int32_t* row_entry_offsets() const noexcept { return b_.row_entry_offsets.data(); }
  const std::int32_t* rank_entry_offsets() const noexcept { return b_.rank_entry_offsets.data(); }
  //! Forwards per row (node layouts only).
  const std::int32_t* row_forwards() const noexcept { return b_.row_forwards.data(); }
  const std::int32_t* entry_copy() const noexcept { return b_.entry_copy.data(); }
  const std::int32_t* entry_target() const noexcept { return b_.entry_target.data(); }
  const std::int32_t* entry_slot() const noexcept { return b_.entry_slot.data(); }
  //! Null when the routing had no weights.
  const float* entry_weight() const noexcept { return b_.entry_weight.empty() ? nullptr : b_.entry_weight.data(); }
  const std::int32_t* slot_counts() const noexcept { return b_.slot_counts.data(); }
  //! @}

private:
  // The replica tables (fixed choices, candidate offsets and candidates, the map's replicas) to
  // the device, staged through pinned memory so that the copies queue behind the stream's earlier
  // work: a copy from pageable memory may wait for that work (CUDA allows it to), untimed, and
  // before a step's one wait that work is the previous step's exchanges, which a lost NCCL peer
  // never finishes. The previous assign's copies from the staging ran before its wait.
  void upload_tables(const slot_ref* reps, std::size_t n_reps, cudaStream_t stream) {
    static_assert(sizeof(slot_ref) == 2 * sizeof(std::int32_t), "a slot_ref travels as two int32 words");
    const std::size_t n_fixed = fixed_.size(), n_offsets = cand_offsets_.size(), n_cands = cands_.size();
    staging_.resize(n_fixed + n_offsets + n_cands + 2 * n_reps);
    std::int32_t* const h = staging_.data();
    std::copy(fixed_.begin(), fixed_.end(), h);
    std::copy(cand_offsets_.begin(), cand_offsets_.end(), h + n_fixed);
    std::copy(cands_.begin(), cands_.end(), h + n_fixed + n_offsets);
    if (n_reps > 0) std::memcpy(h + n_fixed + n_offsets + n_cands, reps, n_reps * sizeof(slot_ref));
    const auto up = [&](void* dev, const std::int32_t* host, std::size_t words) {
      if (words > 0)
        LOCUS_CUDA_CHECK(cudaMemcpyAsync(dev, host, words * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream));
    };
    b_.fixed.resize(n_fixed);
    up(b_.fixed.data(), h, n_fixed);
    b_.cand_offsets.resize(n_offsets);
    up(b_.cand_offsets.data(), h + n_fixed, n_offsets);
    b_.cands.resize(n_cands + 1); // never empty, so the pointer is valid
    up(b_.cands.data(), h + n_fixed + n_offsets, n_cands);
    replicas_.resize(n_reps);
    up(replicas_.data(), h + n_fixed + n_offsets + n_cands, 2 * n_reps);
  }

  // The device found a bad copy: name it as the host layout would.
  void report(const device_routing_view<TopK>& r, std::int32_t c, std::size_t experts) const {
    const std::size_t t = static_cast<std::size_t>(c) / K, j = static_cast<std::size_t>(c) % K;
    std::array<std::int32_t, K> ids{};
    LOCUS_CUDA_CHECK(cudaMemcpy(ids.data(), r.ids() + t * K, sizeof ids, cudaMemcpyDeviceToHost));
    const std::int32_t e = ids[j];
    if (e < 0 || static_cast<std::size_t>(e) >= experts)
      LOCUS_THROW(invalid_input_error, "device_layout: token ", t, " choice ", j, ": expert id ", e,
                  " out of range [0, ", experts, ")");
    for (std::size_t i = 0; i < j; ++i)
      if (ids[i] == e) LOCUS_THROW(invalid_input_error, "device_layout: token ", t, ": expert ", e, " is chosen twice");
    float w = 0;
    if (r.weights()) LOCUS_CUDA_CHECK(cudaMemcpy(&w, r.weights() + c, sizeof w, cudaMemcpyDeviceToHost));
    LOCUS_THROW(invalid_input_error, "device_layout: token ", t, " choice ", j, ": weight ", w, " is not finite");
  }

  transport_kind kind_ = transport_kind::flat;
  std::size_t tokens_ = 0, ranks_ = 0, slots_ = 0, gpus_ = 1;
  detail::layout::device_layout_buffers b_;
  device_buffer<slot_ref> replicas_;
  std::vector<std::int32_t> fixed_, cand_offsets_, cands_, rank_offsets_host_, rank_entry_offsets_host_,
      slot_counts_host_, reach_host_;
  std::array<unsigned long long, 3> links_host_{};
  std::array<unsigned long long, 2> flag_host_{};
  pinned_buffer<std::int32_t> staging_;    // the replica tables on their way to the device
  pinned_buffer<std::int32_t> words_;      // the count read's landing place (see assign)
  pinned_buffer<unsigned long long> wide_; // links, then the flag's words
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
