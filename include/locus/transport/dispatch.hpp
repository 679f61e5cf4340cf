#pragma once
//! @file
//! Dispatch and combine over any exchanger (local, MPI, NCCL host staging).
//!
//! Dispatch sends each token's hidden vector once per distinct destination rank (flat) or once per
//! distinct destination node across the network to the rail peer, which forwards it to the
//! token's destination ranks on its node (hierarchical), exactly the copies cost/traffic.hpp
//! counts. Destinations come from transport/layout.hpp (locality-first replica choice, fresh for
//! each dispatch, over this rank's tokens in token order). Each row carries a small header (source rank, token, the
//! token's top-k experts, weights and chosen destination ranks), so a receiver or forwarder needs
//! no other metadata. The receiver orders the rows into one block per local expert: by default it
//! copies them into a contiguous buffer; with `expert_input_layout::row_pointers` it only records
//! where each row lies in the receive buffers, which saves a copy of every (token, expert) row for
//! an expert compute that reads rows through pointers (layer::swiglu_host does).
//!
//! Combine is the mirror image: each destination sums its experts' outputs for a copy with the
//! routing weights and sends one row back along the copy's path; a rail peer adds the partial sums
//! of its node before the single network copy returns; the source adds the rows per token. The
//! copies of combine therefore equal those of dispatch per link class, as the traffic model says.

#include <algorithm>
#include <cstring>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/cost/traffic.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! How dispatch hands each local expert its input rows.
enum class expert_input_layout : std::uint8_t {
  contiguous,  //!< copied into one `rows × hidden` buffer, blocked by local expert
  row_pointers //!< left in the receive buffers; one pointer per row, blocked by local expert
};

//! Trivially copyable view of what dispatch delivered to one rank, for expert kernels: rows of
//! local expert `i` are `input[offsets[i] * hidden .. offsets[i + 1] * hidden)` (contiguous
//! layout) or `input_rows[offsets[i] .. offsets[i + 1])` (row pointers; `input` is then null), and
//! the expert's outputs go to the same rows of `output`.
template <class T>
struct dispatch_handle {
  const T* input = nullptr;
  const T* const* input_rows = nullptr;
  T* output = nullptr;
  const std::size_t* offsets = nullptr; //!< local_experts + 1 entries
  const expert_id* experts = nullptr;   //!< the local experts, ascending
  std::size_t local_experts = 0;
  std::size_t hidden = 0;
};

namespace detail::dispatch {
struct choice {
  std::int32_t expert;
  float weight;
  std::int32_t dest;
};
struct row_header {
  std::uint32_t source;
  std::uint32_t token;
};
// Where a row of a send buffer came from, so that combine can route the returning row.
struct origin {
  std::uint32_t index;   //!< token (own) or stage-1 received row (forwarded)
  std::uint32_t forward; //!< 1 when forwarded
};
} // namespace detail::dispatch

//! Dispatch and combine of one MoE layer on one rank.
//! @tparam Exchanger a type modelling `transport::exchanger`
//! @tparam T         element of hidden vectors and expert outputs (float, double, bfloat16...)
template <class Exchanger, class T>
class moe_dispatcher {
  static_assert(exchanger<Exchanger>, "locus::transport::moe_dispatcher needs a transport::exchanger");
  static_assert(std::is_trivially_copyable_v<T>, "locus::transport::moe_dispatcher: T must be trivially copyable");

public:
  //! @param ex     this rank's exchanger (outlives the dispatcher)
  //! @param map    the layer's expert map (outlives the dispatcher); ranks equal the exchanger's
  //! @param hidden hidden size
  //! @param top_k  experts per token
  //! @throws locus::config_error on a rank-count mismatch, zero hidden size or top_k
  moe_dispatcher(Exchanger& ex, const expert_map& map, std::size_t hidden, std::size_t top_k)
      : ex_(&ex), map_(&map), hidden_(hidden), k_(top_k) {
    LOCUS_REQUIRE(map.ranks() == ex.topology().ranks(), config_error, "moe_dispatcher: the expert map has ",
                  map.ranks(), " ranks but the transport has ", ex.topology().ranks());
    LOCUS_REQUIRE(hidden > 0 && top_k > 0, config_error, "moe_dispatcher: hidden size (", hidden, ") and top_k (",
                  top_k, ") must be positive");
    header_bytes_ = (sizeof(detail::dispatch::row_header) + k_ * sizeof(detail::dispatch::choice) + 15) / 16 * 16;
    dispatch_row_ = (header_bytes_ + hidden_ * sizeof(T) + 7) / 8 * 8;
    combine_row_ = hidden_ * sizeof(T);
    local_index_.assign(map.experts(), -1);
    for (expert_id e : map.experts_on(ex.rank()))
      local_index_[static_cast<std::size_t>(e)] = 0;
    for (std::size_t e = 0; e < map.experts(); ++e) {
      if (local_index_[e] < 0) continue;
      local_index_[e] = static_cast<std::int32_t>(local_experts_.size());
      local_experts_.push_back(static_cast<expert_id>(e));
    }
  }

  //! Bytes of one dispatch row (header + hidden vector) and of one combine row: the message sizes
  //! under which the traffic model's bytes equal the measured ones.
  cost::message_sizes message_sizes() const noexcept { return {dispatch_row_, combine_row_}; }
  std::size_t hidden() const noexcept { return hidden_; }
  std::size_t top_k() const noexcept { return k_; }

  //! How the next dispatch hands the experts their rows (contiguous by default).
  void set_expert_input_layout(expert_input_layout l) noexcept { input_layout_ = l; }
  expert_input_layout input_layout() const noexcept { return input_layout_; }

  //! Collective: sends this rank's tokens to their experts' ranks.
  //! @param x tokens × hidden inputs of this rank's tokens, token-major
  //! @param r this rank's routing (same token count)
  //! @throws locus::invalid_input_error naming the token with a bad expert id, or on a size mismatch
  //!         (after the exchanges, with what peers sent already ordered: a combine that follows,
  //!         with no tokens of this rank's own, returns their sums)
  template <class TopK, class Id, class Weight>
  void dispatch(std::span<const T> x, const routing_view<TopK, Id, Weight, memory_space::host>& r) {
    const std::size_t tokens = r.tokens();
    // Every member must take part in the exchanges even when its input is bad, or the others
    // would wait for it; bad input is sent as an empty request and raised after the exchanges.
    std::string problem;
    if (r.top_k() != k_)
      problem = ::locus::detail::concat("moe_dispatcher::dispatch: the routing has top_k ", r.top_k(),
                                        ", the dispatcher ", k_);
    else if (x.size() != tokens * hidden_)
      problem = ::locus::detail::concat("moe_dispatcher::dispatch: ", tokens, " tokens need ", tokens * hidden_,
                                        " input values, got ", x.size());
    if (problem.empty()) {
      // The destination of every copy comes from the shared layout (transport/layout.hpp): the
      // locality-first replica choice the traffic model counts. It also validates the routing.
      try {
        layout_.assign(routing_view<::locus::top_k<>, Id, Weight, memory_space::host>(r.ids(), r.weights(), tokens,
                                                                                      ::locus::top_k<>(k_)),
                       *map_, ex_->topology(), ex_->rank());
      } catch (const locus::error& e) {
        problem = ::locus::detail::concat("moe_dispatcher::dispatch: ", e.message());
      }
    }
    tokens_ = problem.empty() ? tokens : 0;
    dest_.assign(layout_.copy_rank().begin(), layout_.copy_rank().begin() + static_cast<std::ptrdiff_t>(tokens_ * k_));
    if (!ex_->hierarchical()) {
      pack_own(x, r, exchange_group::world, send_a_, counts_a_, origins_a_);
      ex_->exchange({exchange_group::world, dispatch_row_, send_a_, counts_a_, {}}, recv_a_);
      copies_.clear();
      for (std::size_t i = 0; i < recv_a_.row_count(); ++i)
        copies_.push_back(recv_a_.row(i));
    } else {
      // Stage 1: one row per remote destination node, to the rail peer on that node.
      pack_own(x, r, exchange_group::rail, send_a_, counts_a_, origins_a_);
      ex_->exchange({exchange_group::rail, dispatch_row_, send_a_, counts_a_, {}}, recv_a_);
      // Stage 2: own tokens to own-node destinations, and the fan-out of what arrived.
      pack_node(x, r);
      ex_->exchange({exchange_group::node, dispatch_row_, send_b_, counts_b_, {}}, recv_b_);
      copies_.clear();
      for (std::size_t i = 0; i < recv_b_.row_count(); ++i)
        copies_.push_back(recv_b_.row(i));
      for (std::uint32_t i : self_forward_)
        copies_.push_back(recv_a_.row(i));
    }
    // The rows peers sent are valid whatever this rank's input was: order them, so that a combine
    // after a failed dispatch still returns the peers' sums.
    gather();
    if (!problem.empty()) LOCUS_THROW(invalid_input_error, problem);
  }

  //! The experts hosted on this rank (ascending), one token block each.
  std::span<const expert_id> local_experts() const noexcept { return local_experts_; }
  //! First row of each local expert's block, plus the total (local_experts().size() + 1 entries).
  std::span<const std::size_t> expert_offsets() const noexcept { return segment_offsets_; }
  //! Received inputs, `rows × hidden`, blocked by local expert (contiguous layout; empty with
  //! row pointers).
  std::span<const T> expert_input() const noexcept { return expert_in_; }
  //! With the row-pointer layout: where each expert row's `hidden` inputs lie, blocked by local
  //! expert; valid until the next dispatch or combine (empty with the contiguous layout).
  std::span<const T* const> expert_input_rows() const noexcept { return row_ptr_; }
  //! The inputs of expert row `row`, under either layout.
  const T* expert_input_row(std::size_t row) const noexcept {
    return input_layout_ == expert_input_layout::row_pointers ? row_ptr_[row] : expert_in_.data() + row * hidden_;
  }
  //! Where the expert compute writes its outputs, `rows × hidden`, blocked by local expert. Not cleared
  //! between steps (that memset cost as much as the gather): the compute must write every row.
  std::span<T> expert_output() noexcept { return expert_out_; }
  //! For each expert row: the source rank and token it came from.
  std::span<const std::uint32_t> row_sources() const noexcept { return row_source_; }
  std::span<const std::uint32_t> row_tokens() const noexcept { return row_token_; }
  //! Token copies this rank received (before expansion to experts).
  std::size_t received_copies() const noexcept { return copies_.size(); }
  //! For each expert row: the received copy it belongs to, and its routing weight.
  std::span<const std::uint32_t> row_copies() const noexcept { return row_copy_; }
  std::span<const float> row_weights() const noexcept { return row_weight_; }
  //! Zeroed fp32 sums, `received_copies() × hidden`, for an expert compute that fuses combine's
  //! weighted sum (adds weight × output of each row to its copy's sum, rows ascending per copy);
  //! then combine_sums() returns them without reading expert_output().
  std::span<float> copy_sums() {
    sums_.assign(copies_.size() * hidden_, 0.0f);
    sums_taken_ = true;
    return sums_;
  }
  dispatch_handle<T> handle() noexcept {
    const bool rows = input_layout_ == expert_input_layout::row_pointers;
    return {rows ? nullptr : expert_in_.data(), rows ? row_ptr_.data() : nullptr, expert_out_.data(),
            segment_offsets_.data(),            local_experts_.data(),            local_experts_.size(),
            hidden_};
  }

  //! Collective: returns the expert outputs to their sources and writes, for each token of the
  //! last dispatch, y[t] = Σ_j weight(t, j) · output(expert(t, j), t).
  //! @param y tokens × hidden, token-major
  void combine(std::span<T> y) { combine_from(y, nullptr); }

  //! Collective: combine() for a compute that left each copy's weighted sum in copy_sums().
  //! @throws locus::invalid_input_error (after the exchanges) when copy_sums() was not taken
  //!         since the last dispatch
  void combine_sums(std::span<T> y) {
    const bool ready = sums_taken_;
    if (!ready) sums_.assign(copies_.size() * hidden_, 0.0f); // peers still get their rows
    combine_from(y, sums_.data());
    LOCUS_REQUIRE(ready, invalid_input_error, "moe_dispatcher::combine_sums: copy_sums() was not filled since the "
                                              "last dispatch");
  }

private:
  // Combine from the expert outputs (`sums` null) or from per-copy sums a fused compute made.
  void combine_from(std::span<T> y, const float* sums) {
    const bool size_ok = y.size() == tokens_ * hidden_;
    // Returned rows are summed per token in fp32: straight into y when it is fp32.
    constexpr bool in_place = std::is_same_v<T, float>;
    float* acc = nullptr;
    if (in_place && size_ok) {
      std::fill(y.begin(), y.end(), T{});
      acc = reinterpret_cast<float*>(y.data());
    } else {
      acc_.assign(tokens_ * hidden_, 0.0f);
      acc = acc_.data();
    }
    if (!ex_->hierarchical()) {
      // The weighted partial sum of every received copy is what goes back.
      const auto rows = partial_rows(0, recv_a_.row_count(), send_a_, sums);
      ex_->exchange({exchange_group::world, combine_row_, rows, recv_a_.counts, {}}, back_a_);
      add_back(back_a_, origins_a_, acc, nullptr);
    } else {
      const std::size_t node_rows = recv_b_.row_count();
      const auto rows = partial_rows(0, node_rows, send_b_, sums);
      // Copies this rank forwards to itself are summed with what its node peers return.
      const float* self_sums = sums ? sums + node_rows * hidden_ : nullptr;
      if (!self_sums) {
        partial_.resize(self_forward_.size() * hidden_);
        weighted_sums(node_rows, self_forward_.size(), partial_.data());
        self_sums = partial_.data();
      }
      ex_->exchange({exchange_group::node, combine_row_, rows, recv_b_.counts, {}}, back_b_);
      forward_acc_.assign(recv_a_.row_count() * hidden_, 0.0f);
      add_back(back_b_, origins_b_, acc, forward_acc_.data());
      for (std::size_t i = 0; i < self_forward_.size(); ++i) {
        const float* p = self_sums + i * hidden_;
        float* a = forward_acc_.data() + std::size_t{self_forward_[i]} * hidden_;
        for (std::size_t h = 0; h < hidden_; ++h)
          a[h] += p[h];
      }
      to_rows(forward_acc_.data(), recv_a_.row_count(), send_a_);
      ex_->exchange({exchange_group::rail, combine_row_, send_a_, recv_a_.counts, {}}, back_a_);
      add_back(back_a_, origins_a_, acc, nullptr);
    }
    LOCUS_REQUIRE(size_ok, invalid_input_error, "moe_dispatcher::combine: ", tokens_, " tokens need ",
                  tokens_ * hidden_, " output values, got ", y.size());
    if constexpr (!in_place)
      for (std::size_t i = 0; i < acc_.size(); ++i) y[i] = static_cast<T>(acc_[i]);
  }

  // True when `dest` occurs among the first `j` choices of token t's destinations (mapped by f).
  template <class F>
  bool seen_before(std::size_t t, std::size_t j, F&& f) const {
    const std::size_t key = f(static_cast<std::size_t>(dest_[t * k_ + j]));
    for (std::size_t p = 0; p < j; ++p)
      if (f(static_cast<std::size_t>(dest_[t * k_ + p])) == key) return true;
    return false;
  }

  void write_row(std::byte* row, std::size_t token, const T* payload, const expert_id* ids, const float* w) const {
    namespace dd = detail::dispatch;
    std::memset(row, 0, header_bytes_);
    const dd::row_header h{static_cast<std::uint32_t>(ex_->rank()), static_cast<std::uint32_t>(token)};
    std::memcpy(row, &h, sizeof h);
    for (std::size_t j = 0; j < k_; ++j) {
      const dd::choice c{ids[j], w ? w[j] : 0.0f, dest_[token * k_ + j]};
      std::memcpy(row + sizeof h + j * sizeof c, &c, sizeof c);
    }
    std::memcpy(row + header_bytes_, payload, hidden_ * sizeof(T));
  }

  // Own tokens, one row per distinct destination member of `g` (world: rank; rail: remote node).
  template <class TopK, class Id, class Weight>
  void pack_own(std::span<const T> x, const routing_view<TopK, Id, Weight, memory_space::host>& r, exchange_group g,
                std::vector<std::byte>& send, std::vector<std::size_t>& counts,
                std::vector<detail::dispatch::origin>& origins) {
    const auto& topo = ex_->topology();
    const std::size_t members = ex_->group_size(g), gpus = topo.gpus_per_node();
    const std::size_t my_node = ex_->rank() / gpus;
    const auto member_of = [&](std::size_t d) { return g == exchange_group::rail ? d / gpus : d; };
    counts.assign(members, 0);
    bucket_.assign(members, {});
    for (std::size_t t = 0; t < tokens_; ++t)
      for (std::size_t j = 0; j < k_; ++j) {
        const auto d = static_cast<std::size_t>(dest_[t * k_ + j]);
        if (g == exchange_group::rail && d / gpus == my_node) continue; // own node: stage 2
        if (seen_before(t, j, member_of)) continue;
        bucket_[member_of(d)].push_back(static_cast<std::uint32_t>(t));
      }
    std::size_t rows = 0;
    for (std::size_t m = 0; m < members; ++m)
      rows += counts[m] = bucket_[m].size();
    send.resize(rows * dispatch_row_);
    origins.clear();
    std::size_t at = 0;
    for (std::size_t m = 0; m < members; ++m)
      for (std::uint32_t t : bucket_[m]) {
        write_row(send.data() + at++ * dispatch_row_, t, x.data() + std::size_t{t} * hidden_, r.token_ids(t),
                  r.has_weights() ? r.token_weights(t) : nullptr);
        origins.push_back({t, 0});
      }
  }

  // Stage 2 of the hierarchical dispatch: own tokens to own-node ranks, then forwarded rows.
  template <class TopK, class Id, class Weight>
  void pack_node(std::span<const T> x, const routing_view<TopK, Id, Weight, memory_space::host>& r) {
    namespace dd = detail::dispatch;
    const auto& topo = ex_->topology();
    const std::size_t gpus = topo.gpus_per_node(), self = ex_->rank(), my_node = self / gpus;
    own_bucket_.assign(gpus, {});
    bucket_.assign(gpus, {});
    for (std::size_t t = 0; t < tokens_; ++t)
      for (std::size_t j = 0; j < k_; ++j) {
        const auto d = static_cast<std::size_t>(dest_[t * k_ + j]);
        if (d / gpus != my_node || seen_before(t, j, [](std::size_t v) { return v; })) continue;
        own_bucket_[d % gpus].push_back(static_cast<std::uint32_t>(t));
      }
    self_forward_.clear();
    std::vector<dd::choice> cs(k_);
    for (std::size_t i = 0; i < recv_a_.row_count(); ++i) {
      std::memcpy(cs.data(), recv_a_.row(i) + sizeof(dd::row_header), k_ * sizeof(dd::choice));
      for (std::size_t j = 0; j < k_; ++j) {
        const auto d = static_cast<std::size_t>(cs[j].dest);
        bool seen = false;
        for (std::size_t p = 0; p < j; ++p)
          seen |= cs[p].dest == cs[j].dest;
        if (seen || d / gpus != my_node) continue;
        if (d == self)
          self_forward_.push_back(static_cast<std::uint32_t>(i));
        else
          bucket_[d % gpus].push_back(static_cast<std::uint32_t>(i));
      }
    }
    counts_b_.assign(gpus, 0);
    std::size_t rows = 0;
    for (std::size_t l = 0; l < gpus; ++l)
      rows += counts_b_[l] = own_bucket_[l].size() + bucket_[l].size();
    send_b_.resize(rows * dispatch_row_);
    origins_b_.clear();
    std::size_t at = 0;
    for (std::size_t l = 0; l < gpus; ++l) {
      for (std::uint32_t t : own_bucket_[l]) {
        write_row(send_b_.data() + at++ * dispatch_row_, t, x.data() + std::size_t{t} * hidden_, r.token_ids(t),
                  r.has_weights() ? r.token_weights(t) : nullptr);
        origins_b_.push_back({t, 0});
      }
      for (std::uint32_t i : bucket_[l]) {
        std::memcpy(send_b_.data() + at++ * dispatch_row_, recv_a_.row(i), dispatch_row_);
        origins_b_.push_back({i, 1});
      }
    }
  }

  // Expands received copies into per-local-expert blocks.
  void gather() {
    namespace dd = detail::dispatch;
    const std::size_t n_local = local_experts_.size();
    const auto self = static_cast<std::int32_t>(ex_->rank());
    segment_offsets_.assign(n_local + 1, 0);
    // Until the rows are known, no copy has any (a combine after a failed gather reads nothing).
    copy_row_offsets_.assign(copies_.size() + 1, 0);
    sums_taken_ = false;
    std::vector<dd::choice> cs(k_);
    const auto for_each_local_choice = [&](auto&& f) {
      for (std::size_t c = 0; c < copies_.size(); ++c) {
        std::memcpy(cs.data(), copies_[c] + sizeof(dd::row_header), k_ * sizeof(dd::choice));
        for (std::size_t j = 0; j < k_; ++j) {
          if (cs[j].dest != self) continue;
          const auto e = static_cast<std::size_t>(cs[j].expert);
          LOCUS_REQUIRE(e < local_index_.size() && local_index_[e] >= 0, transport_error, "moe_dispatcher: rank ", self,
                        " received a copy for expert ", cs[j].expert, " which it does not host");
          f(c, static_cast<std::size_t>(local_index_[e]), cs[j].weight);
        }
      }
    };
    for_each_local_choice([&](std::size_t, std::size_t li, float) { ++segment_offsets_[li + 1]; });
    for (std::size_t i = 0; i < n_local; ++i)
      segment_offsets_[i + 1] += segment_offsets_[i];
    const std::size_t rows = segment_offsets_[n_local];
    const bool pointers = input_layout_ == expert_input_layout::row_pointers;
    // Row pointers name bytes of the receive buffers as T: the rows were written there as T
    // values (by memcpy or MPI), and the offset of a payload is a multiple of 8 in a buffer the
    // allocator aligns for any T.
    static_assert(alignof(T) <= 8, "locus::transport::moe_dispatcher: T must be at most 8-byte aligned");
    if (pointers) {
      expert_in_.clear();
      row_ptr_.resize(rows);
    } else {
      row_ptr_.clear();
      expert_in_.resize(rows * hidden_);
    }
    expert_out_.resize(rows * hidden_);
    row_copy_.resize(rows);
    row_weight_.resize(rows);
    row_source_.resize(rows);
    row_token_.resize(rows);
    fill_.assign(segment_offsets_.begin(), segment_offsets_.end() - 1);
    for_each_local_choice([&](std::size_t c, std::size_t li, float w) {
      const std::size_t row = fill_[li]++;
      if (pointers)
        row_ptr_[row] = reinterpret_cast<const T*>(copies_[c] + header_bytes_);
      else
        std::memcpy(expert_in_.data() + row * hidden_, copies_[c] + header_bytes_, hidden_ * sizeof(T));
      dd::row_header h;
      std::memcpy(&h, copies_[c], sizeof h);
      row_copy_[row] = static_cast<std::uint32_t>(c);
      row_weight_[row] = w;
      row_source_[row] = h.source;
      row_token_[row] = h.token;
    });
    // Each copy's rows, ascending, for the weighted sums of combine.
    for (std::size_t row = 0; row < rows; ++row) ++copy_row_offsets_[row_copy_[row] + 1];
    for (std::size_t c = 0; c < copies_.size(); ++c) copy_row_offsets_[c + 1] += copy_row_offsets_[c];
    copy_rows_.resize(rows);
    fill_.assign(copy_row_offsets_.begin(), copy_row_offsets_.end() - 1);
    for (std::size_t row = 0; row < rows; ++row) copy_rows_[fill_[row_copy_[row]]++] = static_cast<std::uint32_t>(row);
  }

  // For copies [first, first + count): Σ weight · expert output over the copy's rows on this rank,
  // in fp32, rows in ascending order. Every received copy has at least one row here, so the first
  // product initialises the sum (no zero fill).
  void weighted_sums(std::size_t first, std::size_t count, float* out) const {
    for (std::size_t c = 0; c < count; ++c) {
      float* p = out + c * hidden_;
      const std::uint32_t* rows = copy_rows_.data() + copy_row_offsets_[first + c];
      const std::size_t n = copy_row_offsets_[first + c + 1] - copy_row_offsets_[first + c];
      for (std::size_t i = 0; i < n; ++i) {
        const T* o = expert_out_.data() + std::size_t{rows[i]} * hidden_;
        const float w = row_weight_[rows[i]];
        if (i == 0)
          for (std::size_t h = 0; h < hidden_; ++h) p[h] = w * static_cast<float>(o[h]);
        else
          for (std::size_t h = 0; h < hidden_; ++h) p[h] += w * static_cast<float>(o[h]);
      }
    }
  }

  // The partial sums of copies [first, first + count) as combine rows. fp32 rows are the sums a
  // fused compute made (sent as they are), or are summed straight into `out`; other types are
  // converted into `out` from fp32 sums.
  std::span<const std::byte> partial_rows(std::size_t first, std::size_t count, std::vector<std::byte>& out,
                                          const float* sums) {
    if constexpr (std::is_same_v<T, float>) {
      if (sums) return {reinterpret_cast<const std::byte*>(sums + first * hidden_), count * combine_row_};
      out.resize(count * combine_row_);
      weighted_sums(first, count, reinterpret_cast<float*>(out.data()));
    } else {
      if (!sums) {
        partial_.resize(count * hidden_);
        weighted_sums(first, count, partial_.data());
      }
      to_rows(sums ? sums + first * hidden_ : partial_.data(), count, out);
    }
    return out;
  }

  void to_rows(const float* values, std::size_t rows, std::vector<std::byte>& out) {
    out.resize(rows * combine_row_);
    if constexpr (std::is_same_v<T, float>) {
      if (rows) std::memcpy(out.data(), values, rows * hidden_ * sizeof(float)); // one block copy
    } else {
      // Convert a row at a time into a typed scratch row, then one copy per row.
      scratch_.resize(hidden_);
      for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t h = 0; h < hidden_; ++h) scratch_[h] = static_cast<T>(values[r * hidden_ + h]);
        std::memcpy(out.data() + r * combine_row_, scratch_.data(), hidden_ * sizeof(T));
      }
    }
  }

  // Adds returned rows (in the order of the matching send buffer) to tokens or forwarded rows.
  // Rows are read in place as T (written as T by the exchange; row offsets are multiples of the
  // row width in a buffer aligned for any T).
  void add_back(const exchange_result& back, const std::vector<detail::dispatch::origin>& origins, float* acc,
                float* forward_acc) const {
    for (std::size_t s = 0; s < origins.size(); ++s) {
      float* dst = (origins[s].forward ? forward_acc : acc) + std::size_t{origins[s].index} * hidden_;
      const T* v = reinterpret_cast<const T*>(back.row(s));
      for (std::size_t h = 0; h < hidden_; ++h) dst[h] += static_cast<float>(v[h]);
    }
  }

  Exchanger* ex_;
  const expert_map* map_;
  std::size_t hidden_, k_, header_bytes_ = 0, dispatch_row_ = 0, combine_row_ = 0, tokens_ = 0;
  std::vector<std::int32_t> local_index_;
  std::vector<expert_id> local_experts_;
  layout<::locus::top_k<>> layout_;
  std::vector<std::int32_t> dest_;
  std::vector<std::vector<std::uint32_t>> bucket_, own_bucket_;
  std::vector<std::byte> send_a_, send_b_;
  std::vector<std::size_t> counts_a_, counts_b_;
  std::vector<detail::dispatch::origin> origins_a_, origins_b_;
  exchange_result recv_a_, recv_b_, back_a_, back_b_;
  std::vector<std::uint32_t> self_forward_;
  std::vector<const std::byte*> copies_;
  std::vector<std::size_t> segment_offsets_, fill_;
  expert_input_layout input_layout_ = expert_input_layout::contiguous;
  bool sums_taken_ = false; // copy_sums() was handed out since the last dispatch
  std::vector<T> expert_in_, expert_out_, scratch_;
  std::vector<const T*> row_ptr_;
  std::vector<std::uint32_t> row_copy_, row_source_, row_token_, copy_rows_;
  std::vector<std::size_t> copy_row_offsets_;
  std::vector<float> row_weight_, partial_, acc_, forward_acc_, sums_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
