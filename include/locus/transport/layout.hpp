#pragma once
//! @file
//! Layout of one MoE dispatch from one source rank: where each token copy goes, and the order of
//! the send buffer. This is the host definition every transport (local, MPI, NCCL; flat or
//! node-hierarchical) and the CUDA path (`transport/detail/dispatch_layout.hpp`) build on.
//!
//! Vocabulary (one source rank, `T` tokens, top-k `K`):
//! - a **copy** is one (token `t`, choice `j`) pair, indexed `c = t * K + j` (token-major, as the
//!   routing). Its destination is the replica chosen by the rule of `layout_options::replicas`
//!   (`transport/replica_selection.hpp`; by default locality-first: same GPU, then same node, then
//!   the least-copied replica of this step), so the bytes moved equal those the traffic model
//!   (`cost/traffic.hpp`) predicts under the same rule;
//! - a **row** is one token vector in the send buffer. Rows are deduplicated as the traffic model
//!   counts them: a flat layout sends one row per distinct (token, destination rank) - two experts
//!   of a token on one rank share it; a node layout (`transport_kind::hierarchical`) sends one row per
//!   distinct (token, destination node) to the rail peer (the rank with the source's local rank
//!   on that node), which forwards it inside the node, and direct rows to destinations on the
//!   source's own node;
//! - an **entry** is one copy listed under the row that carries it. Each row's entries are the
//!   fan-out table the receiver needs: (target local rank, local slot, weight) per entry.
//!
//! Send order: rows grouped by the rank they are sent to (ascending), inside a rank by the row's
//! lead entry - its smallest (target local rank, local slot) - then by token, stably. When no
//! token has two experts on one rank, this is exactly "destination rank, then expert slot, then
//! token", so a receiver's rows from one source arrive already in expert order. Each row's entries
//! are ordered by (target rank, local slot). Everything is a pure function of the inputs: the
//! result does not depend on the thread count.
//!
//! Replica choice is placement's rule (`replica_candidates` per source; under the locality rules
//! `token_joins` per token, for the copies that join a row their token already sends; then
//! `choose_replica` with the copy's rank among the source's balanced copies of its expert that
//! join nothing): a prefix count per expert, which parallelises (and runs on a GPU)
//! deterministically.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/core/transport_kind.hpp>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/replica_selection.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Options of a layout build.
struct layout_options {
  //! flat: one row per distinct (token, destination rank), sent to that rank; hierarchical: one
  //! row per distinct (token, remote destination node), sent to the rail peer, and direct rows on
  //! the source's own node
  transport_kind kind = transport_kind::flat;
  unsigned threads = 0;     //!< worker threads (0 = default_host_threads())
  std::size_t grain = 2048; //!< minimum tokens per worker: below this one thread is faster
  //! The replica rule (and, for locality_bounded, the hot ranks; the span must outlive assign()).
  placement::replica_policy replicas{};
};

//! The largest top-k a dynamic `top_k<>` layout accepts (per-token scratch lives on the stack).
inline constexpr std::size_t max_dynamic_top_k = 64;

namespace detail::layout {

// Chunks of [0, n) for a chunked two-pass algorithm: the same chunk boundaries in every pass.
inline std::size_t chunk_count(std::size_t n, std::size_t grain, unsigned threads) {
  if (threads == 0) threads = default_host_threads();
  return std::max<std::size_t>(1, std::min<std::size_t>(threads, n / std::max<std::size_t>(grain, 1)));
}
inline std::size_t chunk_begin(std::size_t n, std::size_t chunks, std::size_t w) { return n * w / chunks; }

template <class TopK>
constexpr std::size_t scratch_k() {
  if constexpr (TopK::is_static)
    return TopK::static_value;
  else
    return max_dynamic_top_k;
}

} // namespace detail::layout

//! The dispatch layout of one source rank (flat or node-deduplicated). Build with assign() (which
//! reuses storage across steps) or make_layout() / make_node_layout().
//! @tparam TopK `locus::top_k<K>` (loops specialised for K) or `top_k<>`
template <class TopK = top_k<>>
class layout {
  static_assert(extent_of<TopK, locus::detail::top_k_tag>,
                "locus::transport::layout: the parameter must be locus::top_k<K>");

public:
  using top_k_type = TopK;

  layout() = default;

  //! Computes the layout of `r`'s tokens, all on rank `source_rank`.
  //! @param r           routing (`tokens × k`); weights are optional (then entry_weights() is empty)
  //! @param map         the layer's expert map
  //! @param topo        the deployment (same rank count as `map`)
  //! @param source_rank the rank holding the tokens
  //! @throws locus::config_error when map and topology disagree on the rank count, or a dynamic
  //!         top-k exceeds max_dynamic_top_k
  //! @throws locus::invalid_input_error naming the token and choice of an out-of-range or repeated
  //!         expert id, a non-finite weight, or an out-of-range source rank
  template <class Topology, class Id, class Weight>
  void assign(const routing_view<TopK, Id, Weight, memory_space::host>& r, const expert_map& map, const Topology& topo,
              std::size_t source_rank, const layout_options& opt = {});

  //! @name Sizes
  //! @{
  transport_kind kind() const noexcept { return kind_; }
  std::size_t tokens() const noexcept { return tokens_; }
  std::size_t top_k() const noexcept { return k_; }
  std::size_t copies() const noexcept { return tokens_ * k_; }
  std::size_t rows() const noexcept { return row_token_.size(); }
  std::size_t ranks() const noexcept { return ranks_; }
  std::size_t gpus_per_node() const noexcept { return gpus_; }
  std::size_t slots_per_rank() const noexcept { return slots_; }
  std::size_t source_rank() const noexcept { return source_; }
  //! @}

  //! @name Per copy (`c = t * top_k + j`)
  //! @{
  //! Rank computing the copy's expert.
  std::span<const std::int32_t> copy_rank() const noexcept { return copy_rank_; }
  //! Slot on that rank (index into the rank's `slots_per_rank` slots).
  std::span<const std::int32_t> copy_slot() const noexcept { return copy_slot_; }
  //! Chosen replica as an index into the map's CSR replica array (expert_map_view::replicas).
  std::span<const std::int32_t> copy_replica() const noexcept { return copy_replica_; }
  //! Send row carrying the copy.
  std::span<const std::int32_t> copy_row() const noexcept { return copy_row_; }
  //! Position of the copy among the entries (entry_copy()[copy_entry()[c]] == c).
  std::span<const std::int32_t> copy_entry() const noexcept { return copy_entry_; }
  //! @}

  //! @name Send rows (send order)
  //! @{
  //! Token of each row: the send buffer is `send[r] = x[row_token[r]]`.
  std::span<const std::int32_t> row_token() const noexcept { return row_token_; }
  //! Exclusive offsets of the rows sent to each rank (`ranks + 1` values); for a node layout the
  //! rank a row is sent to may be a forwarding rail peer.
  std::span<const std::int32_t> rank_offsets() const noexcept { return rank_offsets_; }
  //! Rows sent to rank `d`.
  std::size_t rank_count(std::size_t d) const {
    LOCUS_REQUIRE(d < ranks_, invalid_input_error, "layout::rank_count: rank ", d, " out of range [0, ", ranks_, ")");
    return static_cast<std::size_t>(rank_offsets_[d + 1] - rank_offsets_[d]);
  }
  //! Exclusive offsets of each row's entries (`rows + 1` values).
  std::span<const std::int32_t> row_entry_offsets() const noexcept { return row_entry_offsets_; }
  //! Exclusive offsets of the entries of the rows sent to each rank (`ranks + 1` values): the
  //! fan-out metadata a transport sends to rank `d` is entries `[rank_entry_offsets[d], [d+1])`.
  std::span<const std::int32_t> rank_entry_offsets() const noexcept { return rank_entry_offsets_; }
  //! @}

  //! @name Entries (the fan-out table, in row order)
  //! @{
  //! Copy of each entry.
  std::span<const std::int32_t> entry_copy() const noexcept { return entry_copy_; }
  //! Target rank's position in its node (the rank computing the entry's expert). For a flat
  //! layout it is the local rank of the row's destination.
  std::span<const std::int32_t> entry_target() const noexcept { return entry_target_; }
  //! Local slot, on the target rank, of the entry's expert.
  std::span<const std::int32_t> entry_slot() const noexcept { return entry_slot_; }
  //! Routing weight of the entry's copy (empty when the routing has no weights).
  std::span<const float> entry_weight() const noexcept { return entry_weight_; }
  //! @}

  //! @name Counts
  //! @{
  //! Copies per global slot (`rank * slots_per_rank + slot`): the expert rows this source adds to
  //! each slot.
  std::span<const std::int32_t> slot_counts() const noexcept { return slot_counts_; }
  //! Token copies moved per link class, counted as cost::traffic_counter counts them (rows sent;
  //! for a node layout plus the intra-node forwards made by the rail peers).
  const std::array<std::uint64_t, link_class_count>& link_copies() const noexcept { return link_copies_; }
  //! Copies the receiving rail peer of row `r` forwards to other ranks of its node (0 for flat).
  std::size_t forwards(std::size_t r) const {
    LOCUS_REQUIRE(r < rows(), invalid_input_error, "layout::forwards: row ", r, " out of range [0, ", rows(), ")");
    return static_cast<std::size_t>(row_forwards_[r]);
  }
  //! @}

private:
  template <class Topology, class Id>
  void select_replicas(const expert_map& map, const Topology& topo, const Id* ids, std::size_t chunks,
                       const placement::replica_policy& policy);
  //! Groups the chosen copies into rows and lays rows and entries out by destination, in chunks
  //! that run in parallel: count, scan, place, sum.
  void place_rows(std::size_t chunks, const float* weights);
  //! Pass 1 of place_rows: groups each token's copies into rows and counts rows, entries, slot
  //! copies and link copies per chunk, so pass 2 can write without contention.
  void count_rows(std::size_t chunks, const detail::layout::token_params& params);
  //! Turns the per-chunk counts into each (bucket, chunk)'s first row and entry, bucket-major so
  //! rows come out ordered by destination and then by token, and sizes the row and entry tables.
  void scan_rows(std::size_t chunks, const float* weights);
  //! Pass 2 of place_rows: writes every row, its entries and, for a node layout, its forwards at
  //! the positions the scan reserved.
  void place_entries(std::size_t chunks, const float* weights, const detail::layout::token_params& params);
  //! Sums the per-chunk slot and link counts into the layout's totals.
  void sum_chunk_counts(std::size_t chunks);

  transport_kind kind_ = transport_kind::flat;
  std::size_t tokens_ = 0, k_ = 0, ranks_ = 0, gpus_ = 1, slots_ = 0, source_ = 0;
  unsigned threads_ = 0;

  std::vector<std::int32_t> copy_rank_, copy_slot_, copy_replica_, copy_row_, copy_entry_;
  std::vector<std::int32_t> row_token_, rank_offsets_, row_entry_offsets_, rank_entry_offsets_, row_forwards_;
  std::vector<std::int32_t> entry_copy_, entry_target_, entry_slot_;
  std::vector<float> entry_weight_;
  std::vector<std::int32_t> slot_counts_;
  std::array<std::uint64_t, link_class_count> link_copies_{};

  // Scratch, kept to avoid reallocation across steps.
  std::vector<std::int32_t> fixed_, cand_offsets_, cands_; // per expert: fixed replica or candidates
  std::vector<std::int32_t> hist_;                         // chunks × buckets
  std::vector<std::int32_t> copy_local_row_;               // row of each copy within its token
  std::vector<std::int32_t> token_rows_;                   // rows per token
  std::vector<std::int32_t> token_row_key_;                // tokens × k bucket keys of each token's rows
  std::vector<std::int32_t> row_start_, entry_start_;      // buckets × chunks starting positions
  std::vector<std::int32_t> chunk_slot_counts_;            // chunks × slots
  std::vector<std::array<std::uint64_t, link_class_count>> chunk_links_;
  std::size_t bucket_width_ = 0;
};

//! A flat layout (one row per distinct destination rank of a token). See layout::assign.
template <class TopK, class Id, class Weight, class Topology>
layout<TopK> make_layout(const routing_view<TopK, Id, Weight, memory_space::host>& r, const expert_map& map,
                         const Topology& topo, std::size_t source_rank, unsigned threads = 0) {
  layout<TopK> l;
  l.assign(r, map, topo, source_rank, layout_options{transport_kind::flat, threads});
  return l;
}

//! A node-deduplicated layout for hierarchical transports (one row per distinct remote
//! destination node, to the rail peer; direct rows on the source's node). See layout::assign.
template <class TopK, class Id, class Weight, class Topology>
layout<TopK> make_node_layout(const routing_view<TopK, Id, Weight, memory_space::host>& r, const expert_map& map,
                              const Topology& topo, std::size_t source_rank, unsigned threads = 0) {
  layout<TopK> l;
  l.assign(r, map, topo, source_rank, layout_options{transport_kind::hierarchical, threads});
  return l;
}

// ----------------------------------------------------------------------------------------------
// Implementation

template <class TopK>
template <class Topology, class Id, class Weight>
void layout<TopK>::assign(const routing_view<TopK, Id, Weight, memory_space::host>& r, const expert_map& map,
                          const Topology& topo, std::size_t source_rank, const layout_options& opt) {
  static_assert(any_topology<Topology>, "locus::transport::layout needs a locus::topology");
  LOCUS_REQUIRE(map.ranks() == topo.ranks(), config_error, "layout: the expert map has ", map.ranks(),
                " ranks but the topology has ", topo.ranks());
  LOCUS_REQUIRE(source_rank < topo.ranks(), invalid_input_error, "layout: source rank ", source_rank,
                " out of range [0, ", topo.ranks(), ")");
  const std::size_t k = r.top_k();
  if constexpr (!TopK::is_static)
    LOCUS_REQUIRE(k <= max_dynamic_top_k, config_error, "layout: top_k ", k, " exceeds the supported ",
                  max_dynamic_top_k, " (use a static top_k<K>)");
  LOCUS_REQUIRE(r.tokens() == 0 || r.ids() != nullptr, invalid_input_error, "layout: the routing has no expert ids");
  // Divided, not multiplied: 2^62 tokens × top_k 4 wraps to 0 copies.
  LOCUS_REQUIRE(r.tokens() <= static_cast<std::size_t>(INT32_MAX) / 2 / k, invalid_input_error, "layout: ", r.tokens(),
                " tokens × top_k ", k, " copies exceed 32-bit indices");
  kind_ = opt.kind;
  tokens_ = r.tokens();
  k_ = k;
  ranks_ = topo.ranks();
  gpus_ = topo.gpus_per_node();
  slots_ = map.slots_per_rank();
  source_ = source_rank;
  threads_ = opt.threads == 0 ? default_host_threads() : opt.threads;
  // Bucket = (send rank, lead entry): flat rows lead with a slot of their destination, node rows
  // with (local rank, slot) on the destination node.
  bucket_width_ = kind_ == transport_kind::flat ? slots_ : gpus_ * slots_;
  LOCUS_REQUIRE(ranks_ * bucket_width_ <= static_cast<std::size_t>(INT32_MAX), config_error,
                "layout: ranks × slots too large");
  const std::size_t chunks = detail::layout::chunk_count(tokens_, opt.grain, threads_);
  select_replicas(map, topo, r.ids(), chunks, opt.replicas);
  if (r.has_weights()) {
    // Weights are checked here (ids were checked while selecting) so a bad weight names its token.
    const Weight* w = r.weights();
    for (std::size_t c = 0; c < copies(); ++c)
      if (!std::isfinite(static_cast<double>(w[c])))
        LOCUS_THROW(invalid_input_error, "layout: token ", c / k, " choice ", c % k, ": weight ", w[c],
                    " is not finite");
  }
  if constexpr (std::is_same_v<std::remove_const_t<Weight>, float>) {
    place_rows(chunks, r.has_weights() ? r.weights() : nullptr);
  } else {
    std::vector<float> w;
    if (r.has_weights()) w.assign(r.weights(), r.weights() + copies());
    place_rows(chunks, r.has_weights() ? w.data() : nullptr);
  }
}

template <class TopK>
template <class Topology, class Id>
void layout<TopK>::select_replicas(const expert_map& map, const Topology& topo, const Id* ids, std::size_t chunks,
                                   const placement::replica_policy& policy) {
  const expert_map_view v = map.view();
  const std::size_t experts = map.experts();
  placement::replica_candidates(map, topo, source_, fixed_, cand_offsets_, cands_, policy);
  const std::size_t n = copies();
  copy_rank_.resize(n);
  copy_slot_.resize(n);
  copy_replica_.resize(n);
  const TopK kext = TopK(k_);
  constexpr std::size_t kmax = detail::layout::scratch_k<TopK>();
  const bool join = detail::layout::joins_rows(policy.rule);
  const detail::layout::token_params params{static_cast<std::int32_t>(source_), static_cast<std::int32_t>(gpus_),
                                            static_cast<std::int32_t>(slots_), 1,
                                            kind_ == transport_kind::hierarchical};
  // Pass 1: validate, find the copies that join a row (kept in copy_replica_, -1 for the others)
  // and count, per chunk, the balanced copies of each expert that join nothing.
  hist_.assign(chunks * experts, 0);
  parallel_for(chunks, 1, threads_, [&](std::size_t w0, std::size_t w1, unsigned) {
    for (std::size_t w = w0; w < w1; ++w) {
      std::int32_t* h = hist_.data() + w * experts;
      const std::size_t t1 = detail::layout::chunk_begin(tokens_, chunks, w + 1);
      for (std::size_t t = detail::layout::chunk_begin(tokens_, chunks, w); t < t1; ++t) {
        const Id* tid = ids + t * kext.value();
        for (std::size_t j = 0; j < kext.value(); ++j) {
          const auto e = tid[j];
          if (e < 0 || static_cast<std::size_t>(e) >= experts)
            LOCUS_THROW(invalid_input_error, "layout: token ", t, " choice ", j, ": expert id ", e,
                        " out of range [0, ", experts, ")");
          for (std::size_t i = 0; i < j; ++i)
            if (tid[i] == e) LOCUS_THROW(invalid_input_error, "layout: token ", t, ": expert ", e, " is chosen twice");
        }
        std::int32_t* joined = copy_replica_.data() + t * kext.value();
        if (join)
          detail::layout::token_joins<kmax>(params, tid, kext.value(), fixed_.data(), cand_offsets_.data(),
                                            cands_.data(), v.replicas, joined);
        else
          std::fill_n(joined, kext.value(), -1);
        for (std::size_t j = 0; j < kext.value(); ++j)
          if (fixed_[static_cast<std::size_t>(tid[j])] < 0 && joined[j] < 0) ++h[static_cast<std::size_t>(tid[j])];
      }
    }
  });
  // Exclusive scan over chunks, per expert: the index of each chunk's first copy of the expert.
  for (std::size_t e = 0; e < experts; ++e) {
    if (fixed_[e] >= 0) continue;
    std::int32_t sum = 0;
    for (std::size_t w = 0; w < chunks; ++w)
      std::swap(sum, hist_[w * experts + e]), sum += hist_[w * experts + e];
  }
  // Pass 2: choose replicas.
  parallel_for(chunks, 1, threads_, [&](std::size_t w0, std::size_t w1, unsigned) {
    for (std::size_t w = w0; w < w1; ++w) {
      std::int32_t* seen = hist_.data() + w * experts;
      const std::size_t t1 = detail::layout::chunk_begin(tokens_, chunks, w + 1);
      for (std::size_t t = detail::layout::chunk_begin(tokens_, chunks, w); t < t1; ++t) {
        for (std::size_t j = 0; j < kext.value(); ++j) {
          const std::size_t c = t * kext.value() + j;
          const auto e = static_cast<std::size_t>(ids[c]);
          const std::int32_t joined = copy_replica_[c];
          const std::int32_t rep =
              joined >= 0 ? joined
                          : detail::layout::choose_replica(fixed_.data(), cand_offsets_.data(), cands_.data(),
                                                           static_cast<std::int32_t>(e), seen[e], policy.rule,
                                                           static_cast<std::int64_t>(c));
          if (fixed_[e] < 0 && joined < 0) ++seen[e];
          copy_replica_[c] = rep;
          copy_rank_[c] = v.replicas[rep].rank;
          copy_slot_[c] = v.replicas[rep].slot;
        }
      }
    }
  });
}

template <class TopK>
void layout<TopK>::place_rows(std::size_t chunks, const float* weights) {
  const detail::layout::token_params params{static_cast<std::int32_t>(source_), static_cast<std::int32_t>(gpus_),
                                            static_cast<std::int32_t>(slots_), static_cast<std::int32_t>(bucket_width_),
                                            kind_ == transport_kind::hierarchical};
  count_rows(chunks, params);
  scan_rows(chunks, weights);
  place_entries(chunks, weights, params);
  sum_chunk_counts(chunks);
}

template <class TopK>
void layout<TopK>::count_rows(std::size_t chunks, const detail::layout::token_params& params) {
  const std::size_t n = copies();
  const std::size_t buckets = ranks_ * bucket_width_;
  const std::size_t S = slots_;
  const TopK kext = TopK(k_);
  constexpr std::size_t kmax = detail::layout::scratch_k<TopK>();

  copy_local_row_.resize(n);
  token_rows_.resize(tokens_);
  token_row_key_.resize(n);
  std::vector<std::int32_t>& row_hist = hist_; // chunks × buckets: rows, then entries
  row_hist.assign(chunks * buckets * 2, 0);
  chunk_slot_counts_.assign(chunks * ranks_ * S, 0);
  chunk_links_.assign(chunks, {});
  row_forwards_.clear();

  // Each row is keyed by (send rank, lead entry).
  parallel_for(chunks, 1, threads_, [&](std::size_t w0, std::size_t w1, unsigned) {
    for (std::size_t w = w0; w < w1; ++w) {
      std::int32_t* rh = row_hist.data() + w * buckets * 2;
      std::int32_t* eh = rh + buckets;
      std::int32_t* sc = chunk_slot_counts_.data() + w * ranks_ * S;
      auto& links = chunk_links_[w];
      const std::size_t t1 = detail::layout::chunk_begin(tokens_, chunks, w + 1);
      for (std::size_t t = detail::layout::chunk_begin(tokens_, chunks, w); t < t1; ++t) {
        // Not value-initialised: group_rows writes each row's fields before reading them, and
        // zeroing 3 × kmax values per token cost more than the grouping (kmax = 64 for top_k<>).
        std::array<std::int32_t, kmax> row_key, row_size, row_forwards;
        const std::size_t c0 = t * kext.value();
        for (std::size_t j = 0; j < kext.value(); ++j)
          ++sc[static_cast<std::size_t>(copy_rank_[c0 + j]) * S + static_cast<std::size_t>(copy_slot_[c0 + j])];
        const std::int32_t rows = detail::layout::group_rows<kmax>(
            params, copy_rank_.data() + c0, copy_slot_.data() + c0, kext.value(), copy_local_row_.data() + c0,
            row_key.data(), row_size.data(), row_forwards.data());
        token_rows_[t] = rows;
        for (std::int32_t i = 0; i < rows; ++i) {
          const auto ui = static_cast<std::size_t>(i);
          token_row_key_[c0 + ui] = row_key[ui];
          ++rh[static_cast<std::size_t>(row_key[ui])];
          eh[static_cast<std::size_t>(row_key[ui])] += row_size[ui];
          ++links[static_cast<std::size_t>(
              detail::layout::row_link(params, row_key[ui] / static_cast<std::int32_t>(bucket_width_)))];
          links[static_cast<std::size_t>(link_class::intra_node)] += static_cast<std::uint64_t>(row_forwards[ui]);
        }
      }
    }
  });
}

template <class TopK>
void layout<TopK>::scan_rows(std::size_t chunks, const float* weights) {
  const std::size_t n = copies();
  const std::size_t buckets = ranks_ * bucket_width_;
  const bool node = kind_ == transport_kind::hierarchical;
  const std::vector<std::int32_t>& row_hist = hist_;

  // Scan: bucket-major, chunk-minor, so rows are ordered by bucket and, inside a bucket, by chunk
  // then token - i.e. by token.
  row_start_.resize(buckets * chunks);
  entry_start_.resize(buckets * chunks);
  rank_offsets_.assign(ranks_ + 1, 0);
  rank_entry_offsets_.assign(ranks_ + 1, 0);
  std::int32_t rsum = 0, esum = 0;
  for (std::size_t b = 0; b < buckets; ++b) {
    if (b % bucket_width_ == 0) {
      rank_offsets_[b / bucket_width_] = rsum;
      rank_entry_offsets_[b / bucket_width_] = esum;
    }
    for (std::size_t w = 0; w < chunks; ++w) {
      row_start_[b * chunks + w] = rsum;
      entry_start_[b * chunks + w] = esum;
      rsum += row_hist[w * buckets * 2 + b];
      esum += row_hist[w * buckets * 2 + buckets + b];
    }
  }
  rank_offsets_[ranks_] = rsum;
  rank_entry_offsets_[ranks_] = esum;
  const auto rows_total = static_cast<std::size_t>(rsum);
  row_token_.resize(rows_total);
  row_entry_offsets_.resize(rows_total + 1);
  row_entry_offsets_[rows_total] = esum;
  row_forwards_.assign(node ? rows_total : 0, 0);
  copy_row_.resize(n);
  copy_entry_.resize(n);
  entry_copy_.resize(n);
  entry_target_.resize(n);
  entry_slot_.resize(n);
  entry_weight_.resize(weights ? n : 0);
}

template <class TopK>
void layout<TopK>::place_entries(std::size_t chunks, const float* weights, const detail::layout::token_params& params) {
  const std::size_t G = gpus_;
  const bool node = kind_ == transport_kind::hierarchical;
  const TopK kext = TopK(k_);
  constexpr std::size_t kmax = detail::layout::scratch_k<TopK>();

  parallel_for(chunks, 1, threads_, [&](std::size_t w0, std::size_t w1, unsigned) {
    for (std::size_t w = w0; w < w1; ++w) {
      const std::size_t t1 = detail::layout::chunk_begin(tokens_, chunks, w + 1);
      for (std::size_t t = detail::layout::chunk_begin(tokens_, chunks, w); t < t1; ++t) {
        const std::size_t c0 = t * kext.value();
        for (std::int32_t i = 0; i < token_rows_[t]; ++i) {
          const auto b = static_cast<std::size_t>(token_row_key_[c0 + static_cast<std::size_t>(i)]);
          const std::int32_t row = row_start_[b * chunks + w]++;
          std::int32_t entry = entry_start_[b * chunks + w];
          row_token_[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(t);
          row_entry_offsets_[static_cast<std::size_t>(row)] = entry;
          std::array<std::int32_t, kmax> members; // row_members writes the m it returns
          const std::int32_t m =
              detail::layout::row_members<kmax>(params, copy_rank_.data() + c0, copy_slot_.data() + c0,
                                                copy_local_row_.data() + c0, kext.value(), i, members.data());
          std::int32_t forwards = 0;
          const std::int32_t to = static_cast<std::int32_t>(b / bucket_width_);
          // Every entry of a row targets a rank on the node of `to`: its local rank is its offset
          // from the node's first rank (one division per row, not one per entry).
          const std::int32_t node0 = to - to % static_cast<std::int32_t>(G);
          for (std::int32_t q = 0; q < m; ++q, ++entry) {
            const std::size_t c = c0 + static_cast<std::size_t>(members[static_cast<std::size_t>(q)]);
            const auto e = static_cast<std::size_t>(entry);
            copy_row_[c] = row;
            copy_entry_[c] = entry;
            entry_copy_[e] = static_cast<std::int32_t>(c);
            entry_target_[e] = copy_rank_[c] - node0;
            entry_slot_[e] = copy_slot_[c];
            if (weights) entry_weight_[e] = weights[c];
            // Entries are ordered by rank, so a new target shows as a change of rank.
            if (copy_rank_[c] != to &&
                (q == 0 ||
                 copy_rank_[c0 + static_cast<std::size_t>(members[static_cast<std::size_t>(q - 1)])] != copy_rank_[c]))
              ++forwards;
          }
          if (node) row_forwards_[static_cast<std::size_t>(row)] = forwards;
          entry_start_[b * chunks + w] = entry;
        }
      }
    }
  });
}

template <class TopK>
void layout<TopK>::sum_chunk_counts(std::size_t chunks) {
  const std::size_t S = slots_;
  slot_counts_.assign(ranks_ * S, 0);
  for (std::size_t w = 0; w < chunks; ++w)
    for (std::size_t s = 0; s < ranks_ * S; ++s)
      slot_counts_[s] += chunk_slot_counts_[w * ranks_ * S + s];
  link_copies_ = {};
  for (const auto& l : chunk_links_)
    for (std::size_t c = 0; c < link_class_count; ++c)
      link_copies_[c] += l[c];
}

// ----------------------------------------------------------------------------------------------
// Receiving side

//! What a receiving rank needs to compute its experts: its received rows (concatenated in any
//! agreed order, e.g. by source rank), each with its entries (local slot, weight) as sent by the
//! source layouts (layout::entry_slot / entry_weight, `row_entry_offsets` differences as counts).
//! Orders the entries by local slot, then by received row (stably), giving per-slot contiguous
//! segments for expert compute (`expert input i = received row expert_row()[i]`).
class receive_layout {
public:
  receive_layout() = default;

  //! @param slots_per_rank   slots on this rank
  //! @param row_entry_counts entries of each received row (at least 1 each)
  //! @param entry_slot       local slot of each entry, rows' entries concatenated
  //! @param entry_weight     weight of each entry, or empty
  //! @throws locus::invalid_input_error naming the row or entry with a bad count or slot, or on
  //!         mismatched sizes
  void assign(std::size_t slots_per_rank, std::span<const std::int32_t> row_entry_counts,
              std::span<const std::int32_t> entry_slot, std::span<const float> entry_weight = {}) {
    LOCUS_REQUIRE(slots_per_rank > 0, config_error, "receive_layout: zero slots per rank");
    // Slots are 32-bit in the entries; a larger count would size the table from a typing mistake
    // (and 2^64 - 1 wrapped it to nothing).
    LOCUS_REQUIRE(slots_per_rank <= static_cast<std::size_t>(INT32_MAX), config_error,
                  "receive_layout: ", slots_per_rank, " slots per rank exceed 32-bit slot ids (at most 2^31-1)");
    LOCUS_REQUIRE(entry_weight.empty() || entry_weight.size() == entry_slot.size(), invalid_input_error,
                  "receive_layout: ", entry_slot.size(), " entry slots but ", entry_weight.size(), " weights");
    LOCUS_REQUIRE(entry_slot.size() <= static_cast<std::size_t>(INT32_MAX), invalid_input_error,
                  "receive_layout: too many entries");
    slots_ = slots_per_rank;
    const std::size_t rows = row_entry_counts.size(), entries = entry_slot.size();
    row_entry_offsets_.resize(rows + 1);
    std::int64_t sum = 0;
    for (std::size_t r = 0; r < rows; ++r) {
      LOCUS_REQUIRE(row_entry_counts[r] >= 1, invalid_input_error, "receive_layout: received row ", r, " has ",
                    row_entry_counts[r], " entries (at least 1 expected)");
      row_entry_offsets_[r] = static_cast<std::int32_t>(sum);
      sum += row_entry_counts[r];
      LOCUS_REQUIRE(sum <= static_cast<std::int64_t>(entries), invalid_input_error, "receive_layout: the row counts (",
                    sum, " by row ", r, ") exceed the ", entries, " entries given");
    }
    LOCUS_REQUIRE(static_cast<std::size_t>(sum) == entries, invalid_input_error,
                  "receive_layout: the row counts add up to ", sum, " but ", entries, " entries were given");
    row_entry_offsets_[rows] = static_cast<std::int32_t>(sum);
    slot_offsets_.assign(slots_ + 1, 0);
    for (std::size_t e = 0; e < entries; ++e) {
      const std::int32_t s = entry_slot[e];
      LOCUS_REQUIRE(s >= 0 && static_cast<std::size_t>(s) < slots_, invalid_input_error, "receive_layout: entry ", e,
                    " names slot ", s, ", out of range [0, ", slots_, ")");
      ++slot_offsets_[static_cast<std::size_t>(s) + 1];
    }
    for (std::size_t s = 0; s < slots_; ++s)
      slot_offsets_[s + 1] += slot_offsets_[s];
    fill_.assign(slot_offsets_.begin(), slot_offsets_.end() - 1);
    expert_row_.resize(entries);
    expert_weight_.resize(entry_weight.empty() ? 0 : entries);
    entry_position_.resize(entries);
    for (std::size_t r = 0; r < rows; ++r) {
      for (auto e = static_cast<std::size_t>(row_entry_offsets_[r]);
           e < static_cast<std::size_t>(row_entry_offsets_[r + 1]); ++e) {
        const std::int32_t pos = fill_[static_cast<std::size_t>(entry_slot[e])]++;
        expert_row_[static_cast<std::size_t>(pos)] = static_cast<std::int32_t>(r);
        if (!entry_weight.empty()) expert_weight_[static_cast<std::size_t>(pos)] = entry_weight[e];
        entry_position_[e] = pos;
      }
    }
  }

  std::size_t rows() const noexcept { return row_entry_offsets_.empty() ? 0 : row_entry_offsets_.size() - 1; }
  std::size_t entries() const noexcept { return expert_row_.size(); }
  std::size_t slots_per_rank() const noexcept { return slots_; }
  //! Expert-input segment of local slot `s`: positions `[slot_offsets[s], slot_offsets[s + 1])`.
  std::span<const std::int32_t> slot_offsets() const noexcept { return slot_offsets_; }
  //! Received row of each expert-input position.
  std::span<const std::int32_t> expert_row() const noexcept { return expert_row_; }
  //! Routing weight of each expert-input position (empty when no weights were given).
  std::span<const float> expert_weight() const noexcept { return expert_weight_; }
  //! Expert-input position of each entry (entries in received order).
  std::span<const std::int32_t> entry_position() const noexcept { return entry_position_; }
  //! Exclusive offsets of each received row's entries (`rows + 1` values).
  std::span<const std::int32_t> row_entry_offsets() const noexcept { return row_entry_offsets_; }

private:
  std::size_t slots_ = 0;
  std::vector<std::int32_t> row_entry_offsets_, slot_offsets_, fill_, expert_row_, entry_position_;
  std::vector<float> expert_weight_;
};

//! The intra-node fan-out of a node layout, as seen by a rail peer: which of the rows it received
//! go to which rank of its node (itself included), with the entries for that rank. Targets are
//! local ranks; a target's rows keep received order, and its entries keep each row's order.
struct node_fanout {
  std::vector<std::int32_t> target_row_offsets; //!< `gpus_per_node + 1`: rows of target g are [g], [g+1]
  std::vector<std::int32_t> rows;               //!< received row index, per (target, row)
  std::vector<std::int32_t> row_entry_counts;   //!< entries for the target, per (target, row)
  std::vector<std::int32_t> entry_slot;         //!< per entry, grouped as the rows
  std::vector<float> entry_weight;              //!< per entry (empty when no weights were given)
  std::vector<std::int32_t> entry_source;       //!< index of the entry among the received entries

  //! Rows forwarded to local rank `g` (0 when `g` is the peer itself and it computes them).
  std::size_t row_count(std::size_t g) const {
    LOCUS_REQUIRE(g + 1 < target_row_offsets.size(), invalid_input_error, "node_fanout: local rank ", g,
                  " out of range");
    return static_cast<std::size_t>(target_row_offsets[g + 1] - target_row_offsets[g]);
  }
};

//! Splits the rows a rail peer received from node layouts (rows concatenated; each with its
//! entries: target local rank, slot, weight) by target local rank.
//! @throws locus::invalid_input_error naming the row or entry with a bad count or target, or on
//!         mismatched sizes
inline node_fanout make_node_fanout(std::size_t gpus_per_node, std::span<const std::int32_t> row_entry_counts,
                                    std::span<const std::int32_t> entry_target,
                                    std::span<const std::int32_t> entry_slot,
                                    std::span<const float> entry_weight = {}) {
  LOCUS_REQUIRE(gpus_per_node > 0, config_error, "node_fanout: zero GPUs per node");
  // Bounded as a topology is: the per-target table is sized from it (2^64 - 1 wrapped it to nothing).
  LOCUS_REQUIRE(gpus_per_node <= max_topology_ranks, config_error, "node_fanout: ", gpus_per_node,
                " GPUs per node exceed ", max_topology_ranks, " ranks");
  LOCUS_REQUIRE(entry_target.size() == entry_slot.size() &&
                    (entry_weight.empty() || entry_weight.size() == entry_slot.size()),
                invalid_input_error, "node_fanout: ", entry_target.size(), " targets, ", entry_slot.size(),
                " slots and ", entry_weight.size(), " weights");
  const std::size_t G = gpus_per_node, rows = row_entry_counts.size(), entries = entry_slot.size();
  // Offsets, rows and entry sources are 32-bit, as in the receive layout.
  LOCUS_REQUIRE(entries <= static_cast<std::size_t>(INT32_MAX) && rows <= entries, invalid_input_error,
                "node_fanout: ", rows, " rows with ", entries,
                " entries (at most 2^31 - 1 entries, one per row at least)");
  std::vector<std::int32_t> offsets(rows + 1, 0);
  for (std::size_t r = 0; r < rows; ++r) {
    LOCUS_REQUIRE(row_entry_counts[r] >= 1, invalid_input_error, "node_fanout: received row ", r, " has ",
                  row_entry_counts[r], " entries (at least 1 expected)");
    // Compared before the sum, which could pass 2^31 - 1.
    LOCUS_REQUIRE(static_cast<std::size_t>(row_entry_counts[r]) <= entries - static_cast<std::size_t>(offsets[r]),
                  invalid_input_error, "node_fanout: the row counts exceed the ", entries, " entries given");
    offsets[r + 1] = offsets[r] + row_entry_counts[r];
  }
  LOCUS_REQUIRE(static_cast<std::size_t>(offsets[rows]) == entries, invalid_input_error,
                "node_fanout: the row counts add up to ", offsets[rows], " but ", entries, " entries were given");
  node_fanout f;
  f.target_row_offsets.assign(G + 1, 0);
  for (std::size_t e = 0; e < entries; ++e)
    LOCUS_REQUIRE(entry_target[e] >= 0 && static_cast<std::size_t>(entry_target[e]) < G, invalid_input_error,
                  "node_fanout: entry ", e, " targets local rank ", entry_target[e], ", out of range [0, ", G, ")");
  // Target by target: rows are few per peer, and this keeps each target's part contiguous.
  for (std::size_t g = 0; g < G; ++g) {
    for (std::size_t r = 0; r < rows; ++r) {
      std::int32_t n = 0;
      for (auto e = static_cast<std::size_t>(offsets[r]); e < static_cast<std::size_t>(offsets[r + 1]); ++e) {
        if (static_cast<std::size_t>(entry_target[e]) != g) continue;
        ++n;
        f.entry_slot.push_back(entry_slot[e]);
        if (!entry_weight.empty()) f.entry_weight.push_back(entry_weight[e]);
        f.entry_source.push_back(static_cast<std::int32_t>(e));
      }
      if (n > 0) {
        f.rows.push_back(static_cast<std::int32_t>(r));
        f.row_entry_counts.push_back(n);
      }
    }
    f.target_row_offsets[g + 1] = static_cast<std::int32_t>(f.rows.size());
  }
  return f;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
