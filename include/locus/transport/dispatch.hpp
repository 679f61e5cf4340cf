#pragma once
//! @file
//! Dispatch and combine over any exchanger (local, MPI, NCCL host staging): the one data path of
//! an MoE step, read top-down in this folder.
//!
//!   routing --layout (layout.hpp)--> plan --dispatch--> handle --expert compute--> handle
//!   --combine--> tokens
//!
//! 1. **Layout**, once per step (transport/layout.hpp): each token's copies, the chosen replicas,
//!    the send rows (one per distinct destination rank, or per distinct remote node for a
//!    hierarchical transport), per-rank counts and offsets, and each row's entries (target local
//!    rank, slot, weight): the fan-out table a receiver needs.
//! 2. **Dispatch** packs each row for another rank once (`send[r] = x[row_token[r]]`: payload
//!    only, no per-row header) and moves it with one exchange; the rank's own rows are neither
//!    packed nor moved: the compute reads them in place from `x`; the rows' entries (8 bytes per
//!    entry, the last entry of each row marked) travel in the same exchange
//!    (`exchange_request::entries`), so a receiver splits them per row from the counts alone.
//!    Hierarchically (with more than one GPU per node; with one there is no node stage and the
//!    flat path runs: `staged()`), the rail peer on each remote node splits what it received per
//!    target rank of its node (`make_node_fanout`) and forwards it with its own node's direct
//!    rows in a second stage. Every receiver then orders its entries per local
//!    expert (`receive_layout`) and hands the expert compute a pointer per row *into the receive
//!    buffers* (or into `x` for its own rows): rows are never copied again.
//! 3. **Expert compute** reads the handle's blocks in place and writes either output rows or, when
//!    it fuses combine's weighted sum (layer::swiglu_host), one fp32 sum per received copy.
//! 4. **Combine** returns one row per received copy along the way it came (a rail peer adds the
//!    partial sums of its node first), and the source adds each token's rows once, starting from
//!    the sum of its own row, which never left.
//!
//! The dispatcher keeps nothing between a dispatch and its combine: everything combine needs (the
//! receive buffers, the expert blocks, where each returning row goes) lives in the
//! `dispatch_handle`, so several micro-batches can be in flight at once (dispatch A, dispatch B,
//! combine B, combine A), as long as every rank issues the calls in the same order (ranks that
//! combine different dispatches raise transport_error together: a combine's exchange carries the
//! number of the dispatch it returns).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <locus/core/config.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/message_sizes.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::dispatch {

//! One fan-out entry as it travels: `code = ((target local rank × slots + slot) << 1) | last`,
//! where `last` marks the final entry of a row (rows are told apart by it), and the weight.
struct wire_entry {
  std::uint32_t code;
  float weight;
};
static_assert(sizeof(wire_entry) == 8);

inline wire_entry encode(std::int32_t target, std::int32_t slot, std::size_t slots, bool last, float weight) {
  const auto key =
      static_cast<std::uint32_t>(static_cast<std::size_t>(target) * slots + static_cast<std::size_t>(slot));
  return {(key << 1) | (last ? 1u : 0u), weight};
}

//! dst[c] += w · src[c] for c < n, in fp32. Blocks of 8 with a fixed trip count, so that the
//! compiler vectorises the loop at -O2 too (its cheapest cost model vectorises no loop of unknown
//! trip count); without the weight when `weighted` is false.
template <bool weighted, class T>
inline void add_row(float* LOCUS_RESTRICT dst, const T* LOCUS_RESTRICT src, float w, std::size_t n) {
  const auto term = [w](T v) { return weighted ? w * static_cast<float>(v) : static_cast<float>(v); };
  std::size_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (std::size_t i = 0; i < 8; ++i)
      dst[c + i] += term(src[c + i]);
  for (; c < n; ++c)
    dst[c] += term(src[c]);
}

//! dst[c] = first[c] + src[c] (or 0 + src[c] without `first`) for c < n, in fp32: the value of
//! starting dst from `first` (or zero) and adding `src` with add_row, in one pass over dst.
template <class T>
inline void start_row(float* LOCUS_RESTRICT dst, const float* LOCUS_RESTRICT first, const T* LOCUS_RESTRICT src,
                      std::size_t n) {
  std::size_t c = 0;
  if (first) {
    for (; c + 8 <= n; c += 8)
      for (std::size_t i = 0; i < 8; ++i)
        dst[c + i] = first[c + i] + static_cast<float>(src[c + i]);
    for (; c < n; ++c)
      dst[c] = first[c] + static_cast<float>(src[c]);
  } else {
    // 0 + v, not v: a -0 row sums to +0, as when added to a zeroed sum.
    for (; c + 8 <= n; c += 8)
      for (std::size_t i = 0; i < 8; ++i)
        dst[c + i] = 0.0f + static_cast<float>(src[c + i]);
    for (; c < n; ++c)
      dst[c] = 0.0f + static_cast<float>(src[c]);
  }
}

//! The entries of received rows, split per row.
struct received_entries {
  std::vector<std::int32_t> row_counts; //!< entries of each received row
  std::vector<std::int32_t> target, slot;
  std::vector<float> weight;

  void clear() {
    row_counts.clear();
    target.clear();
    slot.clear();
    weight.clear();
  }
};

//! Splits the entries that came with `rows` (grouped by source member, as the rows) into rows.
//! @throws locus::transport_error when a source's entries do not form exactly its rows, or name a
//!         target or slot out of range
inline void split_entries(const exchange_result& rows, std::size_t gpus, std::size_t slots, received_entries& out) {
  out.clear();
  const std::size_t members = rows.counts.size();
  LOCUS_REQUIRE(rows.entry_counts.size() == members &&
                    (rows.entry_count() == 0 || rows.entry_bytes == sizeof(wire_entry)),
                transport_error, "dispatch: entries of ", rows.entry_bytes, " bytes came from ",
                rows.entry_counts.size(), " members but rows from ", members);
  for (std::size_t m = 0; m < members; ++m) {
    std::size_t got = 0;
    std::int32_t in_row = 0;
    for (std::size_t e = rows.entry_offsets[m]; e < rows.entry_offsets[m + 1]; ++e) {
      wire_entry w;
      std::memcpy(&w, rows.entry(e), sizeof w);
      const std::size_t key = w.code >> 1;
      LOCUS_REQUIRE(key < gpus * slots, transport_error, "dispatch: member ", m, " sent an entry for slot ",
                    key % slots, " of local rank ", key / slots, ", out of range (", gpus, " ranks × ", slots,
                    " slots)");
      out.target.push_back(static_cast<std::int32_t>(key / slots));
      out.slot.push_back(static_cast<std::int32_t>(key % slots));
      out.weight.push_back(w.weight);
      ++in_row;
      if (w.code & 1u) {
        out.row_counts.push_back(in_row);
        in_row = 0;
        ++got;
      }
    }
    LOCUS_REQUIRE(in_row == 0 && got == rows.counts[m], transport_error, "dispatch: member ", m, " sent ",
                  rows.counts[m], " rows but entries for ", got, in_row ? " and a half" : "");
  }
}

} // namespace detail::dispatch

template <class Exchanger, class T>
class moe_dispatcher;

//! Everything one dispatch leaves for its expert compute and its combine: the received rows (read
//! in place), the rows of each local expert, and where each returning row goes. Reusable: a
//! dispatch into a handle keeps its storage. Not tied to the layout it came from.
//! @tparam T element of hidden vectors and expert outputs
template <class T>
class dispatch_handle {
public:
  dispatch_handle() = default;
  // Its expert rows point into its own buffers (received rows, scaled inputs): a copy would read
  // the original's, freed with it. A move keeps the buffers, and the rows with them.
  dispatch_handle(const dispatch_handle&) = delete;
  dispatch_handle& operator=(const dispatch_handle&) = delete;
  dispatch_handle(dispatch_handle&&) noexcept = default;
  dispatch_handle& operator=(dispatch_handle&&) noexcept = default;

  //! Tokens of this rank in the dispatch (combine writes `tokens × hidden` values).
  std::size_t tokens() const noexcept { return tokens_; }
  std::size_t hidden() const noexcept { return hidden_; }
  //! The experts hosted on this rank (ascending), one row block each.
  std::span<const expert_id> local_experts() const noexcept { return experts_; }
  //! First row of each local expert's block, plus the total (local_experts().size() + 1 entries).
  std::span<const std::size_t> expert_offsets() const noexcept { return expert_offsets_; }
  //! Expert rows in all.
  std::size_t expert_rows() const noexcept { return expert_offsets_.empty() ? 0 : expert_offsets_.back(); }
  //! Where each expert row's `hidden` inputs lie (in the receive buffers, or in the dispatch's `x`
  //! for this rank's own tokens: `x` must outlive the expert compute), blocked by local expert.
  //! When the dispatcher's routing weights apply to the expert input (weight_site::expert_input),
  //! each row is its routing weight times the token's row, in fp32 rounded to T, held by the handle.
  std::span<const T* const> expert_input_rows() const noexcept { return row_ptr_; }
  const T* expert_input_row(std::size_t row) const noexcept { return row_ptr_[row]; }
  //! Where an expert compute writes its outputs, `rows × hidden`, blocked by local expert. Not
  //! cleared between steps: the compute must write every row.
  std::span<T> expert_output() noexcept { return expert_out_; }
  //! Token copies this rank received (before expansion to experts).
  std::size_t received_copies() const noexcept { return recv_.rows(); }
  //! For each expert row: the received copy it belongs to, and its routing weight.
  std::span<const std::uint32_t> row_copies() const noexcept {
    // int32 and uint32 may alias; every value is a valid non-negative copy index.
    return {reinterpret_cast<const std::uint32_t*>(recv_.expert_row().data()), recv_.entries()};
  }
  std::span<const float> row_weights() const noexcept { return recv_.expert_weight(); }
  //! The weight each expert row's output enters its copy's sum with: its routing weight, or 1 where
  //! the routing weight was applied to the row's input (weight_site::expert_input). What a compute
  //! that fuses combine's weighted sum multiplies by.
  std::span<const float> sum_weights() const noexcept {
    return site_ == weight_site::expert_input ? std::span<const float>(ones_) : row_weights();
  }
  //! Zeroed fp32 sums, `received_copies() × hidden`, for an expert compute that fuses combine's
  //! weighted sum (adds weight × output of each row to its copy's sum, rows ascending); combine
  //! then sends these instead of reading expert_output().
  std::span<float> copy_sums() {
    sums_.assign(received_copies() * hidden_, 0.0f);
    sums_taken_ = true;
    return sums_;
  }
  //! The same sums for a compute that writes each copy's first row instead of adding it
  //! (layer::weighted_sum_target::row_first, given by row_first()): not zeroed, which saves a pass
  //! over `received_copies() × hidden` values per step; a copy no row belongs to is zeroed here.
  std::span<float> copy_sums_to_write() {
    const std::size_t copies = received_copies();
    const auto copy = row_copies();
    sums_.resize(copies * hidden_);
    first_.resize(copy.size());
    seen_.assign(copies, 0);
    for (std::size_t r = 0; r < copy.size(); ++r) {
      const bool valid = copy[r] < copies; // an invalid index is the compute's to report
      first_[r] = valid && !seen_[copy[r]];
      if (valid) seen_[copy[r]] = 1;
    }
    for (std::size_t c = 0; c < copies; ++c)
      if (!seen_[c]) std::fill_n(sums_.data() + c * hidden_, hidden_, 0.0f);
    sums_taken_ = true;
    return sums_;
  }
  //! Per expert row: 1 when it is the first row (ascending) of its copy; set by copy_sums_to_write().
  std::span<const std::uint8_t> row_first() const noexcept { return first_; }

private:
  template <class, class>
  friend class moe_dispatcher;

  // Where a row sent in dispatch came from, so that its returning row finds its way.
  struct origin {
    std::uint32_t index;   //!< token (own) or stage-1 received row (forwarded)
    std::uint32_t forward; //!< 1 when forwarded
  };

  std::size_t tokens_ = 0, hidden_ = 0;
  std::span<const expert_id> experts_;
  exchange_result rows_a_, rows_b_;           // received payload: world or rail stage, node stage
  std::vector<origin> origins_a_, origins_b_; // per sent row, in send order
  std::vector<std::uint32_t> self_forward_;   // stage-1 rows this rail peer computes itself
  std::vector<std::uint32_t> own_tokens_;     // token of each own row (kept in x, never sent)
  receive_layout recv_;                       // entries ordered per local expert
  std::vector<std::size_t> expert_offsets_;
  std::vector<const T*> row_ptr_;
  std::vector<T> scaled_in_; // weight_site::expert_input: each expert row's weighted input
  std::vector<float> ones_;  // ... and the unit weights its output is summed with
  weight_site site_ = weight_site::expert_output;
  std::vector<T> expert_out_;
  std::vector<float> sums_;
  std::vector<std::uint8_t> first_, seen_; // copy_sums_to_write()'s marks
  bool sums_taken_ = false;
  std::uint64_t dispatch_number_ = 0; // which of its dispatcher's dispatches filled it (1, 2, ...)
};

//! Dispatch and combine of one MoE layer on one rank.
//! @tparam Exchanger a type modelling `transport::exchanger`
//! @tparam T         element of hidden vectors and expert outputs (float, double, bfloat16...)
template <class Exchanger, class T>
class moe_dispatcher {
  static_assert(exchanger<Exchanger>, "locus::transport::moe_dispatcher needs a transport::exchanger");
  static_assert(std::is_trivially_copyable_v<T>, "locus::transport::moe_dispatcher: T must be trivially copyable");
  // Rows are read in place as T from receive buffers whose row offsets are multiples of the row
  // width, in a buffer the allocator aligns for any fundamental type.
  static_assert(alignof(T) <= alignof(std::max_align_t), "locus::transport::moe_dispatcher: T is over-aligned");

public:
  using handle_type = dispatch_handle<T>;

  //! @param ex     this rank's exchanger (outlives the dispatcher)
  //! @param map    the layer's expert map (outlives the dispatcher); ranks equal the exchanger's
  //! @param hidden hidden size
  //! @throws locus::config_error on a rank-count mismatch or a zero hidden size
  moe_dispatcher(Exchanger& ex, const expert_map& map, std::size_t hidden)
      : ex_(&ex), map_(&map), hidden_(hidden), row_bytes_(hidden * sizeof(T)), map_fingerprint_(map.fingerprint()),
        agreement_(step_agreement(map_fingerprint_, 0)) {
    LOCUS_REQUIRE(map.ranks() == ex.topology().ranks(), config_error, "moe_dispatcher: the expert map has ",
                  map.ranks(), " ranks but the transport has ", ex.topology().ranks());
    LOCUS_REQUIRE(hidden > 0, config_error, "moe_dispatcher: the hidden size must be positive");
    // A row width that wraps (hidden 2^62 + 1 floats: 4 bytes) would pass every later size check.
    LOCUS_REQUIRE(hidden <= SIZE_MAX / sizeof(T), config_error, "moe_dispatcher: hidden size ", hidden,
                  " makes rows of more than 2^64 - 1 bytes");
    const std::size_t slots = map.slots_per_rank();
    local_experts_ = map.experts_on(ex.rank());
    std::sort(local_experts_.begin(), local_experts_.end());
    local_experts_.erase(std::unique(local_experts_.begin(), local_experts_.end()), local_experts_.end());
    // Two slots of one expert feed one block.
    slot_block_.assign(slots, -1);
    const expert_map_view v = map.view();
    for (std::size_t s = 0; s < slots; ++s) {
      const expert_id e = v.slot_expert[ex.rank() * slots + s];
      if (e == empty_slot) continue;
      slot_block_[s] = static_cast<std::int32_t>(std::lower_bound(local_experts_.begin(), local_experts_.end(), e) -
                                                 local_experts_.begin());
    }
  }

  //! How rows are deduplicated over this exchanger: per node when it is hierarchical.
  transport_kind kind() const noexcept {
    return ex_->hierarchical() ? transport_kind::hierarchical : transport_kind::flat;
  }
  //! Whether copies move in two stages (rail, then node): not over a hierarchical exchanger with one
  //! GPU per node, which takes the one-exchange path (`exchange_path`, core/transport_kind.hpp).
  bool staged() const noexcept {
    return exchange_path(kind(), ex_->topology().gpus_per_node()) == transport_kind::hierarchical;
  }
  //! The layer this dispatcher serves, by an index every rank gives alike (the model layer): it
  //! enters every exchange's agreement (step_agreement), so that ranks stepping two layers of one
  //! map in different orders raise together instead of computing one layer's tokens with the
  //! other's experts. Layers that share a map and step on one endpoint need distinct indices.
  void set_layer_index(std::uint64_t index) noexcept {
    layer_index_ = index;
    agreement_ = step_agreement(map_fingerprint_, index, site_);
  }
  std::uint64_t layer_index() const noexcept { return layer_index_; }
  //! Where the routing weights apply (default expert_output): at the expert input, each expert
  //! row is scaled by its weight before the expert compute reads it and combine sums the outputs
  //! unweighted. Part of every exchange's agreement: ranks must give it alike.
  void set_weight_site(weight_site site) noexcept {
    site_ = site;
    agreement_ = step_agreement(map_fingerprint_, layer_index_, site);
  }
  weight_site routing_weight_site() const noexcept { return site_; }

  //! Bytes of one dispatch row, one combine row and one fan-out entry: the message sizes under
  //! which the traffic model's bytes equal the measured ones.
  transport::message_sizes message_sizes() const noexcept {
    return {row_bytes_, row_bytes_, sizeof(detail::dispatch::wire_entry)};
  }
  std::size_t hidden() const noexcept { return hidden_; }
  //! The experts hosted on this rank (ascending).
  std::span<const expert_id> local_experts() const noexcept { return local_experts_; }

  //! The layout of this rank's tokens for this dispatcher (what `dispatch` takes), replicas chosen
  //! by `replicas` (transport/replica_selection.hpp; default locality_first).
  //! @throws locus::invalid_input_error naming a bad expert id or weight (see layout::assign)
  template <class LayoutK, class TopK, class Id, class Weight>
  void plan(layout<LayoutK>& l, const routing_view<TopK, Id, Weight, memory_space::host>& r, unsigned threads = 0,
            const placement::replica_policy& replicas = {}) const {
    const routing_view<LayoutK, Id, Weight, memory_space::host> v(r.ids(), r.weights(), r.tokens(), LayoutK(r.top_k()));
    layout_options opt{kind(), threads};
    opt.replicas = replicas;
    l.assign(v, *map_, ex_->topology(), ex_->rank(), opt);
  }

  //! Collective: sends this rank's tokens to their experts' ranks as `l` says, into `h`.
  //! @param x tokens × hidden inputs of this rank's tokens, token-major; the rows this rank computes
  //!          itself are read from here in place, so `x` must outlive the expert compute on `h`
  //! @param l this rank's layout (plan()), for this dispatcher's map and kind
  //! @throws locus::invalid_input_error on a size or layout mismatch (after the exchanges, with
  //!         what peers sent already ordered: a combine that follows, with no tokens of this
  //!         rank's own, returns their sums)
  template <class TopK>
  void dispatch(std::span<const T> x, const layout<TopK>& l, handle_type& h) {
    // Every member must take part in the exchanges even when its input is bad, or the others
    // would wait for it; bad input is sent as no rows and raised after the exchanges.
    std::string problem;
    const auto& topo = ex_->topology();
    if (l.kind() != kind() || l.ranks() != topo.ranks() || l.gpus_per_node() != topo.gpus_per_node() ||
        l.source_rank() != ex_->rank() || l.slots_per_rank() != map_->slots_per_rank())
      problem = ::locus::detail::concat(
          "moe_dispatcher::dispatch: the layout is a ", to_string(l.kind()), " layout of rank ", l.source_rank(),
          " over ", l.ranks(), " ranks and ", l.slots_per_rank(), " slots; this dispatcher needs a ", to_string(kind()),
          " layout of rank ", ex_->rank(), " over ", topo.ranks(), " ranks and ", map_->slots_per_rank(), " slots");
    else if (x.size() % hidden_ != 0 || x.size() / hidden_ != l.tokens())
      problem = ::locus::detail::concat("moe_dispatcher::dispatch: ", l.tokens(), " tokens of hidden size ", hidden_,
                                        " need tokens × hidden input values, got ", x.size());
    else if (l.tokens() > 0 && l.entry_weight().empty())
      problem = "moe_dispatcher::dispatch: the layout carries no routing weights";
    const bool use = problem.empty();
    h.dispatch_number_ = ++dispatches_;
    h.tokens_ = use ? l.tokens() : 0;
    h.hidden_ = hidden_;
    h.experts_ = local_experts_;
    h.sums_taken_ = false;
    h.own_tokens_.clear(); // nothing of an earlier dispatch survives a failed exchange
    h.self_forward_.clear();
    if (!staged()) {
      pack(x, l, use, exchange_group::world, h.origins_a_);
      exchange_rows(exchange_group::world, h.rows_a_, own_counts(l, use));
      detail::dispatch::split_entries(h.rows_a_, topo.gpus_per_node(), map_->slots_per_rank(), in_);
      keep_own(l, use, h);
    } else {
      // Stage 1: one row per remote destination node, to the rail peer on that node.
      pack(x, l, use, exchange_group::rail, h.origins_a_);
      try {
        exchange_rows(exchange_group::rail, h.rows_a_);
      } catch (const transport_error&) {
        // Its rail's members disagreed (another map, another step): the node peers, whose rails may
        // have agreed, are about to meet this rank in the node stage, and would wait out the
        // timeout for it. It meets them with no request, so that they raise at once.
        leave_stage(exchange_group::node);
        throw;
      }
      detail::dispatch::split_entries(h.rows_a_, topo.gpus_per_node(), map_->slots_per_rank(), in_);
      fan_ = make_node_fanout(topo.gpus_per_node(), in_.row_counts, in_.target, in_.slot, in_.weight);
      // Stage 2: own tokens to own-node destinations, and the fan-out of what arrived.
      pack_node(x, l, use, h);
      exchange_rows(exchange_group::node, h.rows_b_, own_counts(l, use));
      detail::dispatch::split_entries(h.rows_b_, topo.gpus_per_node(), map_->slots_per_rank(), in_);
      // The rows this rail peer forwards to itself are computed here, without an exchange.
      const std::size_t self = ex_->rank() % topo.gpus_per_node();
      h.self_forward_.assign(fan_.rows.begin() + fan_.target_row_offsets[self],
                             fan_.rows.begin() + fan_.target_row_offsets[self + 1]);
      std::size_t e = 0;
      for (std::size_t g = 0; g < self; ++g)
        for (auto i = fan_.target_row_offsets[g]; i < fan_.target_row_offsets[g + 1]; ++i)
          e += static_cast<std::size_t>(fan_.row_entry_counts[static_cast<std::size_t>(i)]);
      for (auto i = fan_.target_row_offsets[self]; i < fan_.target_row_offsets[self + 1]; ++i) {
        const auto n = static_cast<std::size_t>(fan_.row_entry_counts[static_cast<std::size_t>(i)]);
        in_.row_counts.push_back(static_cast<std::int32_t>(n));
        for (std::size_t q = 0; q < n; ++q, ++e) {
          in_.target.push_back(static_cast<std::int32_t>(self));
          in_.slot.push_back(fan_.entry_slot[e]);
          in_.weight.push_back(fan_.entry_weight[e]);
        }
      }
      keep_own(l, use, h);
    }
    // The rows peers sent are valid whatever this rank's input was: order them, so that a combine
    // after a failed dispatch still returns the peers' sums.
    order_rows(h, use ? x.data() : nullptr);
    if (!problem.empty()) LOCUS_THROW(invalid_input_error, problem);
  }

  //! dispatch() into a fresh handle.
  template <class TopK>
  handle_type dispatch(std::span<const T> x, const layout<TopK>& l) {
    handle_type h;
    dispatch(x, l, h);
    return h;
  }

  //! Collective: returns the expert outputs of `h` to their sources and writes, for each token of
  //! its dispatch, y[t] = Σ_j weight(t, j) · output(expert(t, j), t) (Σ_j output(expert(t, j), t)
  //! when the weights applied to the expert input: set_weight_site). Uses the sums a fused
  //! compute left in `h.copy_sums()` when it took them, else the expert output rows.
  //! @param y tokens × hidden, token-major
  //! @throws locus::invalid_input_error (after the exchanges) on a size mismatch
  void combine(std::span<T> y, handle_type& h) {
    // A handle another dispatcher filled holds rows of its own hidden size: none of them is read
    // (zeros go back, so peers still finish) and this rank raises after the exchanges.
    const bool handle_ok = h.hidden_ == hidden_;
    const bool size_ok = handle_ok && y.size() % hidden_ == 0 && y.size() / hidden_ == h.tokens_;
    const std::size_t copies = h.received_copies();
    // Each received copy's weighted partial sum, in fp32.
    float* partial = h.sums_.data();
    if (!h.sums_taken_ || !handle_ok) {
      partial_.assign(copies * hidden_, 0.0f);
      if (handle_ok) weighted_sums(h, partial_.data());
      partial = partial_.data();
    }
    h.sums_taken_ = false;
    // Returned rows are summed per token in fp32: straight into y when it is fp32. Each token
    // starts from the sum of its own row (the last received copies), or from zero without one.
    constexpr bool in_place = std::is_same_v<T, float>;
    float* acc = nullptr;
    if (in_place && size_ok) {
      acc = reinterpret_cast<float*>(y.data());
    } else {
      acc_.resize(h.tokens_ * hidden_);
      acc = acc_.data();
    }
    const std::size_t own = h.own_tokens_.size();
    const float* own_sums = partial + (copies - own) * hidden_;
    // Every rank must return the same dispatch: ranks that combine two handles in different orders
    // would read each other's rows as the other dispatch's (past the end of the shorter one). The
    // handle's dispatch number travels with the rows, and ranks that differ all raise.
    const std::uint64_t agreement = agreement_ ^ (0x9e3779b97f4a7c15ull * h.dispatch_number_);
    // The rows that come back are the rows this rank sent: checked before any is read (the
    // agreement makes a mismatch a bug, which must still not read past the buffer).
    bool back_ok = true;
    const auto returned = [&](const exchange_result& back, const std::vector<typename handle_type::origin>& origins) {
      back_ok = back_ok && back.row_count() == origins.size() && back.row_bytes == row_bytes_;
      return back_ok;
    };
    if (!staged()) {
      exchange_request back{exchange_group::world, row_bytes_, as_rows(partial, copies - own), h.rows_a_.counts, {}};
      back.kept_rows = own;
      back.agreement = agreement;
      ex_->exchange(back, back_);
      if (returned(back_, h.origins_a_)) start_and_add_back(back_, h.origins_a_, acc, nullptr, h, own_sums);
    } else {
      const std::size_t node_rows = h.rows_b_.row_count();
      exchange_request back{exchange_group::node, row_bytes_, as_rows(partial, node_rows), h.rows_b_.counts, {}};
      back.kept_rows = own;
      back.agreement = agreement;
      try {
        ex_->exchange(back, node_back_);
      } catch (const transport_error&) {
        // The node's members disagreed (another dispatch, another map): the rail peers, whose nodes
        // may have agreed, are about to meet this rank in the rail stage; it meets them with no
        // request, so that they raise at once instead of waiting out the timeout.
        leave_stage(exchange_group::rail);
        throw;
      }
      // A rail peer sums its node's partial sums of each stage-1 row, starting from its own.
      const std::size_t stage1 = h.rows_a_.row_count();
      forward_acc_.resize(stage1 * hidden_);
      float* forward = forward_acc_.data();
      start_sums(forward, stage1, h.self_forward_, partial + node_rows * hidden_);
      if (returned(node_back_, h.origins_b_)) start_and_add_back(node_back_, h.origins_b_, acc, forward, h, own_sums);
      exchange_request rail{exchange_group::rail, row_bytes_, as_rows(forward, stage1), h.rows_a_.counts, {}};
      rail.agreement = agreement;
      ex_->exchange(rail, back_);
      if (returned(back_, h.origins_a_)) add_back(back_, h.origins_a_, acc, nullptr);
    }
    LOCUS_REQUIRE(back_ok, transport_error, "moe_dispatcher::combine: rank ", ex_->rank(),
                  " got back other rows than it sent in the dispatch it combines");
    LOCUS_REQUIRE(handle_ok, invalid_input_error,
                  "moe_dispatcher::combine: the handle was dispatched with hidden size ", h.hidden_,
                  " but this dispatcher's is ", hidden_);
    LOCUS_REQUIRE(size_ok, invalid_input_error, "moe_dispatcher::combine: ", h.tokens_, " tokens of hidden size ",
                  hidden_, " need tokens × hidden output values, got ", y.size());
    if constexpr (!in_place)
      for (std::size_t i = 0; i < acc_.size(); ++i)
        y[i] = static_cast<T>(acc_[i]);
  }

private:
  // Rows and entries of the layout for this rank itself.
  struct layout_counts {
    std::size_t rows = 0, entries = 0;
  };

  // Appends layout rows [r0, r1) to the send buffer, their entries to the entry buffer, and their
  // tokens to `origins`.
  template <class TopK>
  void append_rows(std::span<const T> x, const layout<TopK>& l, std::int32_t r0, std::int32_t r1,
                   std::vector<typename handle_type::origin>& origins) {
    const std::size_t slots = map_->slots_per_rank();
    const auto row_token = l.row_token();
    const auto reo = l.row_entry_offsets();
    const auto target = l.entry_target();
    const auto slot = l.entry_slot();
    const auto weight = l.entry_weight();
    std::byte* at = send_rows(static_cast<std::size_t>(r1 - r0));
    for (auto r = static_cast<std::size_t>(r0); r < static_cast<std::size_t>(r1); ++r, at += row_bytes_) {
      const auto t = static_cast<std::size_t>(row_token[r]);
      std::memcpy(at, x.data() + t * hidden_, row_bytes_);
      origins.push_back({static_cast<std::uint32_t>(t), 0});
      for (auto e = static_cast<std::size_t>(reo[r]); e < static_cast<std::size_t>(reo[r + 1]); ++e)
        entries_.push_back(detail::dispatch::encode(target[e], slot[e], slots,
                                                    e + 1 == static_cast<std::size_t>(reo[r + 1]), weight[e]));
    }
  }

  // Own rows to each member of `g` (world: every rank; rail: the rail peer of each remote node).
  template <class TopK>
  void pack(std::span<const T> x, const layout<TopK>& l, bool use, exchange_group g,
            std::vector<typename handle_type::origin>& origins) {
    const std::size_t members = ex_->group_size(g);
    const std::size_t my_node = ex_->rank() / ex_->topology().gpus_per_node();
    sent_ = 0;
    entries_.clear();
    origins.clear();
    counts_.assign(members, 0);
    entry_counts_.assign(members, 0);
    if (!use) return;
    const auto ro = l.rank_offsets();
    const auto reo = l.rank_entry_offsets();
    for (std::size_t m = 0; m < members; ++m) {
      if (g == exchange_group::rail && m == my_node) continue; // own node: stage 2
      const std::size_t d = ex_->world_rank_of(g, m);
      if (d == ex_->rank()) continue; // own rows: keep_own
      counts_[m] = l.rank_count(d);
      entry_counts_[m] = static_cast<std::size_t>(reo[d + 1] - reo[d]);
      append_rows(x, l, ro[d], ro[d + 1], origins);
    }
  }

  // Stage 2 of a hierarchical dispatch: own rows to each rank of the node, then the rows received
  // in stage 1 for that rank (not to itself: those it computes in place).
  template <class TopK>
  void pack_node(std::span<const T> x, const layout<TopK>& l, bool use, handle_type& h) {
    const std::size_t gpus = ex_->topology().gpus_per_node(), self = ex_->rank() % gpus;
    const std::size_t node0 = ex_->rank() - self, slots = map_->slots_per_rank();
    sent_ = 0;
    entries_.clear();
    h.origins_b_.clear();
    counts_.assign(gpus, 0);
    entry_counts_.assign(gpus, 0);
    const auto ro = l.rank_offsets();
    std::size_t e = 0; // fan-out entries of targets before g
    for (std::size_t g = 0; g < gpus; ++g) {
      const std::size_t d = node0 + g, entries_before = entries_.size();
      if (use && g != self) { // own rows: keep_own
        counts_[g] = l.rank_count(d);
        append_rows(x, l, ro[d], ro[d + 1], h.origins_b_);
      }
      for (auto i = static_cast<std::size_t>(fan_.target_row_offsets[g]);
           i < static_cast<std::size_t>(fan_.target_row_offsets[g + 1]); ++i) {
        const auto n = static_cast<std::size_t>(fan_.row_entry_counts[i]);
        if (g != self) {
          const auto row = static_cast<std::size_t>(fan_.rows[i]);
          std::memcpy(send_rows(1), h.rows_a_.row(row), row_bytes_);
          h.origins_b_.push_back({static_cast<std::uint32_t>(row), 1});
          ++counts_[g];
          for (std::size_t q = 0; q < n; ++q)
            entries_.push_back(detail::dispatch::encode(static_cast<std::int32_t>(g), fan_.entry_slot[e + q], slots,
                                                        q + 1 == n, fan_.entry_weight[e + q]));
        }
        e += n;
      }
      entry_counts_[g] = entries_.size() - entries_before;
    }
  }

  // The packed rows with their entries, in one exchange over group `g` (the one that reaches this
  // rank's own destination counts its own rows as kept).
  void exchange_rows(exchange_group g, exchange_result& rows, const layout_counts& own = {}) {
    exchange_request req{g, row_bytes_, {send_.data(), sent_}, counts_, {}};
    req.entry_bytes = sizeof(detail::dispatch::wire_entry);
    req.entries = std::as_bytes(std::span(entries_));
    req.entry_counts = entry_counts_;
    req.kept_rows = own.rows;
    req.kept_entries = own.entries;
    req.agreement = agreement_; // ranks dispatching by different maps or layers raise (exchange.hpp)
    exchange_with_entries(*ex_, req, rows, meta_in_);
  }

  // Meets group `g`'s members in its next exchange with an abandoned request (exchange.hpp): every
  // member raises, this one too (swallowed: the caller raises the error that made it leave).
  void leave_stage(exchange_group g) noexcept {
    try {
      exchange_request gone{g, row_bytes_, {}, {}, {}};
      gone.abandoned = true;
      exchange_result sink;
      ex_->exchange(gone, sink);
    } catch (...) {
    }
  }

  template <class TopK>
  layout_counts own_counts(const layout<TopK>& l, bool use) const {
    if (!use) return {};
    const std::size_t me = ex_->rank();
    const auto reo = l.rank_entry_offsets();
    return {l.rank_count(me), static_cast<std::size_t>(reo[me + 1] - reo[me])};
  }

  // This rank's rows for itself: their entries join the received ones (after them) straight from
  // the layout, their payload stays in x.
  template <class TopK>
  void keep_own(const layout<TopK>& l, bool use, handle_type& h) {
    h.own_tokens_.clear();
    if (!use) return;
    const std::size_t me = ex_->rank();
    const auto ro = l.rank_offsets();
    const auto row_token = l.row_token();
    const auto reo = l.row_entry_offsets();
    const auto target = l.entry_target();
    const auto slot = l.entry_slot();
    const auto weight = l.entry_weight();
    for (auto r = static_cast<std::size_t>(ro[me]); r < static_cast<std::size_t>(ro[me + 1]); ++r) {
      h.own_tokens_.push_back(static_cast<std::uint32_t>(row_token[r]));
      in_.row_counts.push_back(reo[r + 1] - reo[r]);
      for (auto e = static_cast<std::size_t>(reo[r]); e < static_cast<std::size_t>(reo[r + 1]); ++e) {
        in_.target.push_back(target[e]);
        in_.slot.push_back(slot[e]);
        in_.weight.push_back(weight[e]);
      }
    }
  }

  // Orders the received entries per local expert and points each expert row at its payload:
  // received rows, then stage-1 rows this rail peer computes itself, then own rows in x.
  void order_rows(handle_type& h, const T* x) {
    const std::size_t me = ex_->rank() % ex_->topology().gpus_per_node();
    for (std::size_t i = 0; i < in_.slot.size(); ++i) {
      const std::int32_t s = in_.slot[i];
      LOCUS_REQUIRE(static_cast<std::size_t>(in_.target[i]) == me && slot_block_[static_cast<std::size_t>(s)] >= 0,
                    transport_error, "moe_dispatcher: rank ", ex_->rank(), " received an entry for slot ", s,
                    " of local rank ", in_.target[i], ", which it does not host");
      in_.slot[i] = slot_block_[static_cast<std::size_t>(s)];
    }
    const std::size_t blocks = local_experts_.size();
    h.recv_.assign(std::max<std::size_t>(blocks, 1), in_.row_counts, in_.slot, in_.weight);
    const auto offsets = h.recv_.slot_offsets();
    h.expert_offsets_.assign(offsets.begin(), offsets.begin() + static_cast<std::ptrdiff_t>(blocks + 1));
    const auto expert_row = h.recv_.expert_row();
    const exchange_result& direct = staged() ? h.rows_b_ : h.rows_a_;
    const std::size_t direct_rows = direct.row_count(), forwarded = direct_rows + h.self_forward_.size();
    h.row_ptr_.resize(expert_row.size());
    for (std::size_t i = 0; i < expert_row.size(); ++i) {
      const auto c = static_cast<std::size_t>(expert_row[i]);
      if (c < direct_rows)
        h.row_ptr_[i] = reinterpret_cast<const T*>(direct.row(c));
      else if (c < forwarded)
        h.row_ptr_[i] = reinterpret_cast<const T*>(h.rows_a_.row(h.self_forward_[c - direct_rows]));
      else
        h.row_ptr_[i] = x + std::size_t{h.own_tokens_[c - forwarded]} * hidden_;
    }
    h.expert_out_.resize(expert_row.size() * hidden_);
    h.site_ = site_;
    if (site_ == weight_site::expert_input) scale_inputs(h);
  }

  // weight_site::expert_input: each expert row becomes weight × its token's row (the weight rounded
  // to T, as engines cast the score to the hidden states' type; the product in fp32, rounded to T),
  // in the handle, as the device path's weighted gather computes it; its output is summed with 1.
  static void scale_inputs(handle_type& h) {
    const auto weight = h.recv_.expert_weight();
    const std::size_t rows = h.row_ptr_.size(), hidden = h.hidden_;
    h.scaled_in_.resize(rows * hidden);
    for (std::size_t i = 0; i < rows; ++i) {
      T* out = h.scaled_in_.data() + i * hidden;
      const T* in = h.row_ptr_[i];
      const float w = static_cast<float>(static_cast<T>(weight[i]));
      for (std::size_t c = 0; c < hidden; ++c)
        out[c] = static_cast<T>(w * static_cast<float>(in[c]));
      h.row_ptr_[i] = out;
    }
    h.ones_.assign(rows, 1.0f);
  }

  // Σ weight · expert output per received copy, in fp32, rows ascending (as a fusing compute
  // adds them); `out` is zeroed.
  void weighted_sums(const handle_type& h, float* out) const {
    const auto copy = h.recv_.expert_row();
    const auto weight = h.recv_.expert_weight();
    const bool unit = h.site_ == weight_site::expert_input; // the weights were applied to the inputs
    for (std::size_t r = 0; r < copy.size(); ++r) {
      float* p = out + static_cast<std::size_t>(copy[r]) * hidden_;
      if (unit)
        detail::dispatch::add_row<false>(p, h.expert_out_.data() + r * hidden_, 1.0f, hidden_);
      else
        detail::dispatch::add_row<true>(p, h.expert_out_.data() + r * hidden_, weight[r], hidden_);
    }
  }

  // fp32 sums as combine rows of T: the sums themselves for fp32, else converted into send_.
  std::span<const std::byte> as_rows(const float* values, std::size_t rows) {
    if constexpr (std::is_same_v<T, float>) {
      return {reinterpret_cast<const std::byte*>(values), rows * row_bytes_};
    } else {
      sent_ = 0;
      send_rows(rows);
      scratch_.resize(hidden_);
      for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t c = 0; c < hidden_; ++c)
          scratch_[c] = static_cast<T>(values[r * hidden_ + c]);
        std::memcpy(send_.data() + r * row_bytes_, scratch_.data(), row_bytes_);
      }
      return {send_.data(), sent_};
    }
  }

  // Starts `rows` sums: sum `index[i]` from `first` row i (each index at most once: a stage-1 row
  // has one copy for this rank), the others from zero. Cheaper than zeroing all and adding the
  // first rows.
  void start_sums(float* acc, std::size_t rows, std::span<const std::uint32_t> index, const float* first) {
    covered_.assign(rows, 0);
    for (std::size_t i = 0; i < index.size(); ++i) {
      const std::size_t r = index[i];
      covered_[r] = 1;
      std::memcpy(acc + r * hidden_, first + i * hidden_, hidden_ * sizeof(float));
    }
    for (std::size_t r = 0; r < rows; ++r)
      if (!covered_[r]) std::fill(acc + r * hidden_, acc + (r + 1) * hidden_, 0.0f);
  }

  // Room for `rows` more rows at the end of the send buffer, which only grows (a vector resized
  // after clear() would zero every byte before the rows overwrite them).
  std::byte* send_rows(std::size_t rows) {
    const std::size_t need = sent_ + rows * row_bytes_;
    if (send_.size() < need) send_.resize(std::max(need, 2 * send_.size()));
    std::byte* at = send_.data() + sent_;
    sent_ = need;
    return at;
  }

  // The first add of a combine: adds returned rows (in the order of the matching send buffer) to
  // forwarded rows, and to tokens whose sums it starts: a token's first returned row is added to
  // the sum of its own row (`own_sums`, in h.own_tokens_ order) or to zero as it is written, and a
  // token no row returned to takes its own row's sum or zero. One pass over the sums instead of a
  // copy of the own rows' sums followed by the adds; the same values, added in the same order.
  void start_and_add_back(const exchange_result& back, const std::vector<typename handle_type::origin>& origins,
                          float* acc, float* forward_acc, const handle_type& h, const float* own_sums) {
    constexpr std::uint32_t none = UINT32_MAX;
    own_row_.assign(h.tokens_, none);
    for (std::size_t i = 0; i < h.own_tokens_.size(); ++i)
      own_row_[h.own_tokens_[i]] = static_cast<std::uint32_t>(i);
    covered_.assign(h.tokens_, 0);
    for (std::size_t s = 0; s < origins.size(); ++s) {
      const auto* src = reinterpret_cast<const T*>(back.row(s));
      const std::size_t t = origins[s].index;
      if (origins[s].forward) {
        detail::dispatch::add_row<false>(forward_acc + t * hidden_, src, 1.0f, hidden_);
      } else if (covered_[t]) {
        detail::dispatch::add_row<false>(acc + t * hidden_, src, 1.0f, hidden_);
      } else {
        const std::uint32_t o = own_row_[t];
        detail::dispatch::start_row(acc + t * hidden_, o == none ? nullptr : own_sums + std::size_t{o} * hidden_, src,
                                    hidden_);
        covered_[t] = 1;
      }
    }
    for (std::size_t t = 0; t < h.tokens_; ++t) {
      if (covered_[t]) continue;
      float* dst = acc + t * hidden_;
      if (const std::uint32_t o = own_row_[t]; o != none)
        std::memcpy(dst, own_sums + std::size_t{o} * hidden_, hidden_ * sizeof(float));
      else
        std::fill(dst, dst + hidden_, 0.0f);
    }
  }

  // Adds returned rows (in the order of the matching send buffer) to tokens or forwarded rows.
  void add_back(const exchange_result& back, const std::vector<typename handle_type::origin>& origins, float* acc,
                float* forward_acc) const {
    for (std::size_t s = 0; s < origins.size(); ++s) {
      float* dst = (origins[s].forward ? forward_acc : acc) + std::size_t{origins[s].index} * hidden_;
      detail::dispatch::add_row<false>(dst, reinterpret_cast<const T*>(back.row(s)), 1.0f, hidden_);
    }
  }

  Exchanger* ex_;
  const expert_map* map_;
  std::size_t hidden_, row_bytes_;
  std::uint64_t map_fingerprint_; // of *map_ as the dispatcher read it (local_experts_, slot_block_)
  std::uint64_t layer_index_ = 0;
  weight_site site_ = weight_site::expert_output;
  std::uint64_t agreement_;      // step_agreement(map_fingerprint_, layer_index_, site_)
  std::uint64_t dispatches_ = 0; // dispatches so far: the number of the next handle filled, less one
  std::vector<expert_id> local_experts_;
  std::vector<std::int32_t> slot_block_; // local slot → block (local expert index), -1 for empty
  // Scratch of one call; nothing here outlives it.
  std::vector<std::byte> send_;
  std::size_t sent_ = 0; // bytes of send_ in use
  std::vector<detail::dispatch::wire_entry> entries_;
  std::vector<std::size_t> counts_, entry_counts_;
  exchange_result meta_in_, back_, node_back_; // two returns: each keeps its size across steps
  detail::dispatch::received_entries in_;
  node_fanout fan_;
  std::vector<float> partial_, acc_, forward_acc_;
  std::vector<std::uint8_t> covered_;
  std::vector<std::uint32_t> own_row_; // token → its own row, or UINT32_MAX
  std::vector<T> scratch_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
