#pragma once
//! @file
//! The traffic model: for a batch of tokens (source rank + top-k routing) on one MoE layer, an
//! expert map, the replica-selection policy and a transport kind, how many token copies and bytes
//! cross each link class, per rank and in total, and how much expert work each rank gets.
//!
//! Transport kinds:
//! - flat: one copy per distinct destination rank of a token (two experts of a token on one rank
//!   share a copy, as DeepEP and the MPI/NCCL exchanges of locus send it);
//! - hierarchical: one copy per distinct destination node crosses the network, to the peer with
//!   the same local rank on that node (rail-aligned), which forwards it to the token's other
//!   destination ranks on its node over NVLink; destinations on the source's own node get direct
//!   intra-node copies.
//! Combine is the mirror image of dispatch: the same copies travel back, so its copy counts equal
//! dispatch's and only the message size differs.
//!
//! Dispatch also moves a small fan-out table beside the rows: one *entry* (target slot and routing
//! weight) per (token, expert) pair on each hop that carries it, so that a receiver knows which of
//! its experts each row feeds. The model counts those entries per link class too; combine needs
//! none (rows return in the order they came).

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/core/transport_kind.hpp>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/message_sizes.hpp>
#include <locus/transport/replica_selection.hpp>
#include <span>
#include <string_view>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::cost {

// The transport kind is core's (core/transport_kind.hpp); named here too for the model's callers.
using ::locus::parse_transport_kind;
using ::locus::to_string;
using ::locus::transport_kind;

// The wire sizes are the transport's (transport/message_sizes.hpp); the model multiplies by them.
using transport::message_sizes;

using per_class = std::array<std::uint64_t, link_class_count>;

//! Counts for one layer, accumulated over any number of tokens and steps.
struct layer_traffic {
  std::uint64_t tokens = 0;               //!< tokens counted
  per_class copies{};                     //!< dispatch copies per link class (combine sends as many back)
  per_class entries{};                    //!< fan-out entries dispatch sends per link class
  std::vector<std::uint64_t> expert_rows; //!< per rank: (token, expert) pairs computed there
  //! Per rank: the expert slots that computed at least one row, per count_step call (one step of
  //! one layer; summed when counts are added): the expert weights the rank reads in a step.
  std::vector<std::uint64_t> active_slots;
  std::vector<per_class> sent;     //!< per rank: dispatch copies sent per link class
  std::vector<per_class> received; //!< per rank: dispatch copies received per link class

  explicit layer_traffic(std::size_t ranks = 0)
      : expert_rows(ranks, 0), active_slots(ranks, 0), sent(ranks), received(ranks) {}

  std::size_t ranks() const noexcept { return expert_rows.size(); }
  std::uint64_t dispatch_bytes(link_class c, const message_sizes& m) const {
    const auto i = static_cast<std::size_t>(c);
    return copies[i] * m.dispatch_bytes + entries[i] * m.entry_bytes;
  }
  std::uint64_t combine_bytes(link_class c, const message_sizes& m) const {
    return copies[static_cast<std::size_t>(c)] * m.combine_bytes;
  }
  //! Copies that leave the node, dispatch or combine: the quantity locus exists to reduce.
  std::uint64_t inter_node_copies() const { return copies[static_cast<std::size_t>(link_class::inter_node)]; }

  //! The busiest rank's expert rows.
  std::uint64_t busiest_rows() const {
    return expert_rows.empty() ? 0 : *std::max_element(expert_rows.begin(), expert_rows.end());
  }
  //! Expert rows over every rank.
  std::uint64_t total_rows() const {
    std::uint64_t total = 0;
    for (const std::uint64_t r : expert_rows)
      total += r;
    return total;
  }
  //! Max over mean of per-rank expert rows (1 when nothing was computed).
  double load_imbalance() const {
    const std::uint64_t total = total_rows();
    return total == 0 ? 1.0
                      : static_cast<double>(busiest_rows()) * static_cast<double>(ranks()) / static_cast<double>(total);
  }

  //! Adds another count of the same rank count.
  layer_traffic& operator+=(const layer_traffic& o) {
    LOCUS_REQUIRE(o.ranks() == ranks(), config_error, "layer_traffic: adding ", o.ranks(), " ranks to ", ranks());
    tokens += o.tokens;
    for (std::size_t c = 0; c < link_class_count; ++c) {
      copies[c] += o.copies[c];
      entries[c] += o.entries[c];
    }
    for (std::size_t r = 0; r < ranks(); ++r) {
      expert_rows[r] += o.expert_rows[r];
      active_slots[r] += o.active_slots[r];
      for (std::size_t c = 0; c < link_class_count; ++c) {
        sent[r][c] += o.sent[r][c];
        received[r][c] += o.received[r][c];
      }
    }
    return *this;
  }

  void clear() {
    tokens = 0;
    copies = {};
    entries = {};
    std::fill(expert_rows.begin(), expert_rows.end(), 0);
    std::fill(active_slots.begin(), active_slots.end(), 0);
    std::fill(sent.begin(), sent.end(), per_class{});
    std::fill(received.begin(), received.end(), per_class{});
  }
};

//! Balance summed over many counts (steps, or windows of steps, of every layer): the busiest rank's
//! rows of each count, added up, over the mean rank's; a count of few rows weighs little, as its
//! expert time does. The decode simulator and the on-line replay share it.
struct rows_balance {
  std::uint64_t busiest = 0, rows = 0;
  void add(const layer_traffic& t) {
    busiest += t.busiest_rows();
    rows += t.total_rows();
  }
  //! Max over mean on `ranks` ranks (1 when nothing was counted).
  double max_over_mean(std::size_t ranks) const {
    return rows == 0 ? 1.0 : static_cast<double>(busiest) * static_cast<double>(ranks) / static_cast<double>(rows);
  }
};

//! rows_balance over windows of `steps` steps: each layer's counts are summed over a window first,
//! so a load that moves over many steps shows and per-step jitter averages out (1: per step; the
//! run's length: over the run). Every step counts, the run's last window may be shorter; 0 steps:
//! off (finish() gives 1). The decode simulator and the on-line replay share it.
class window_balance {
public:
  window_balance(std::size_t steps, std::size_t layers, std::size_t ranks)
      : steps_(steps), rows_(steps ? layers : 0, layer_traffic(ranks)) {}
  bool on() const noexcept { return steps_ > 0; }
  //! Adds one step's count of `layer` to the current window.
  void add(std::size_t layer, const layer_traffic& t) {
    if (on()) rows_[layer] += t;
  }
  //! Ends a step; a full window joins the balance.
  void end_step() {
    if (on() && ++done_ == steps_) close();
  }
  //! Closes the last window and returns max over mean on `ranks` ranks.
  double finish(std::size_t ranks) {
    if (on()) close();
    return balance_.max_over_mean(ranks);
  }

private:
  void close() {
    for (layer_traffic& w : rows_) {
      balance_.add(w);
      w.clear();
    }
    done_ = 0;
  }
  std::size_t steps_, done_ = 0;
  std::vector<layer_traffic> rows_; //!< per layer, the window's counts so far
  rows_balance balance_;
};

//! Counts one step of one layer. Tokens come from a routing view, optionally through a list of
//! token indices (a decode step gathers one token per running request from a trace).
template <class Topology>
class traffic_counter {
  static_assert(any_topology<Topology>, "locus::cost::traffic_counter needs a locus::topology");

public:
  traffic_counter(const Topology& topo, transport_kind kind) : topo_(topo), kind_(kind), selector_(topo) {}

  const Topology& topology() const noexcept { return topo_; }
  transport_kind kind() const noexcept { return kind_; }

  //! Adds the tokens `tokens[i]` of `r`, token i coming from rank `sources[i]`, to `out`. Replica
  //! choices start afresh under `policy`, i.e. the tokens form one step (each source's batch is
  //! its tokens in the order given).
  //! @param tokens indices into `r`; empty means all tokens of `r` in order
  //! @throws locus::invalid_input_error naming the token with an out-of-range expert or rank
  template <class TopK, class Id, class Weight>
  void count_step(const expert_map& map, const routing_view<TopK, Id, Weight, memory_space::host>& r,
                  std::span<const std::size_t> tokens, std::span<const std::uint32_t> sources, layer_traffic& out,
                  const placement::replica_policy& policy = {}) {
    const std::size_t n = tokens.empty() ? r.tokens() : tokens.size();
    LOCUS_REQUIRE(sources.size() == n, invalid_input_error, "traffic model: ", n, " tokens but ", sources.size(),
                  " source ranks");
    LOCUS_REQUIRE(out.ranks() == topo_.ranks() && map.ranks() == topo_.ranks(), config_error,
                  "traffic model: topology, expert map and output disagree on the rank count (", topo_.ranks(), ", ",
                  map.ranks(), ", ", out.ranks(), ")");
    selector_.rebind(map, policy); // one selector for every step and layer: its tables stay allocated
    const expert_map_view view = map.view();
    const std::size_t k = r.top_k(), experts = map.experts(), gpus = topo_.gpus_per_node();
    dest_.resize(k);
    replica_.resize(k);
    // A slot is active in this call from its first row: stamped with the call's number, so that the
    // marks need no clearing between steps.
    slot_stamp_.resize(static_cast<std::size_t>(view.replica_offsets[experts]), 0);
    if (++stamp_ == 0) { // wrapped: no slot may keep an old call's number
      std::fill(slot_stamp_.begin(), slot_stamp_.end(), 0);
      stamp_ = 1;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t t = tokens.empty() ? i : tokens[i];
      LOCUS_REQUIRE(t < r.tokens(), invalid_input_error, "traffic model: token index ", t, " out of range [0, ",
                    r.tokens(), ")");
      const std::size_t src = sources[i];
      LOCUS_REQUIRE(src < topo_.ranks(), invalid_input_error, "traffic model: token ", t, " has source rank ", src,
                    " out of range [0, ", topo_.ranks(), ")");
      const Id* ids = r.token_ids(t);
      for (std::size_t j = 0; j < k; ++j) {
        const auto e = static_cast<std::size_t>(ids[j]); // a negative id wraps to a huge value
        LOCUS_REQUIRE(e < experts, invalid_input_error, "traffic model: token ", t, " choice ", j, ": expert id ",
                      ids[j], " out of range [0, ", experts, ")");
        // The layout refuses such a token; counting it would charge one expert twice.
        for (std::size_t q = 0; q < j; ++q)
          LOCUS_REQUIRE(ids[q] != ids[j], invalid_input_error, "traffic model: token ", t, ": expert ", ids[j],
                        " is chosen twice");
      }
      selector_.select_token(src, ids, k, kind_ == transport_kind::hierarchical, replica_.data());
      for (std::size_t j = 0; j < k; ++j) {
        const auto rank = static_cast<std::uint32_t>(view.replicas[replica_[j]].rank);
        ++out.expert_rows[rank];
        if (slot_stamp_[replica_[j]] != stamp_) {
          slot_stamp_[replica_[j]] = stamp_;
          ++out.active_slots[rank];
        }
        dest_[j] = rank;
      }
      // The hops of the token's copies, by the layout's rule (transport/detail/layout_token.hpp):
      // a copy's row goes to send_rank (its destination, or the rail peer of a remote node), one
      // row per distinct send rank; a rail peer forwards once per distinct destination other than
      // itself. Every (token, expert) pair is an entry on each hop it takes.
      const transport::detail::layout::token_params p{static_cast<std::int32_t>(src), static_cast<std::int32_t>(gpus),
                                                      1, 1, kind_ == transport_kind::hierarchical};
      for (std::size_t j = 0; j < k; ++j) {
        const auto dst = static_cast<std::int32_t>(dest_[j]);
        const std::int32_t to = transport::detail::layout::send_rank(p, dst);
        const auto link = static_cast<link_class>(transport::detail::layout::row_link(p, to));
        bool new_row = true, new_dest = true;
        for (std::size_t q = 0; q < j; ++q) {
          const auto prev = static_cast<std::int32_t>(dest_[q]);
          new_row &= transport::detail::layout::send_rank(p, prev) != to;
          new_dest &= prev != dst;
        }
        if (new_row) add_copy(out, src, static_cast<std::size_t>(to), link);
        ++out.entries[static_cast<std::size_t>(link)];
        if (dst == to) continue;
        if (new_dest)
          add_copy(out, static_cast<std::size_t>(to), static_cast<std::size_t>(dst), link_class::intra_node);
        ++out.entries[static_cast<std::size_t>(link_class::intra_node)];
      }
      ++out.tokens;
    }
  }

private:
  static void add_copy(layer_traffic& out, std::size_t from, std::size_t to, link_class c) {
    const auto ci = static_cast<std::size_t>(c);
    ++out.copies[ci];
    ++out.sent[from][ci];
    ++out.received[to][ci];
  }

  Topology topo_;
  transport_kind kind_;
  placement::replica_selector<Topology> selector_;
  std::vector<std::uint32_t> dest_;
  std::vector<std::size_t> replica_;      // per copy of the token being counted
  std::vector<std::uint64_t> slot_stamp_; // per occupied slot: the last call that gave it a row
  std::uint64_t stamp_ = 0;               // this call's number
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::cost
