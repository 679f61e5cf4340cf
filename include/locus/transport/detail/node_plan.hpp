#pragma once
//! @file
//! The host index plan of one rank's hierarchical device dispatch (`transport/device_dispatch.hpp`):
//! which rows each stage sends, in which order, and where each returning row goes. Token rows stay
//! on the device; the plan is lists of row indices the device gathers by, built from the layout's
//! host copy and the received entry metadata (which the host needs anyway: its counts size the
//! next exchange). The intra-node fan-out is computed by the stage bodies
//! (`detail/stage.hpp`: fanout_count, exclusive_scan, fanout_place), the code a kernel would run.
//!
//! Row spaces the indices refer to:
//! - *source*: the layout's rows (`[0, L)`), then the rows received in the rail stage
//!   (`[L, L + rail rows)`);
//! - *received*: the rows received in the node stage, then the rail rows this rank forwards to
//!   itself (computed here, never sent);
//! - *pool* (combine): the rows returned by the node stage (in node send order), the partial sums of
//!   the self-forwarded rows, then the rows returned by the rail stage (in rail send order).

#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/transport/detail/stage.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::device_dispatch {

//! One entry as it travels with a row in the metadata exchanges of a hierarchical device dispatch.
struct node_entry {
  std::int32_t target; //!< local rank on the destination node
  std::int32_t slot;
  float weight;
};
static_assert(sizeof(node_entry) == 12);

//! The layout of one source rank as the plan reads it (host copies of device_layout's arrays).
struct layout_rows {
  std::span<const std::int32_t> rank_offsets;      //!< ranks + 1
  std::span<const std::int32_t> row_entry_offsets; //!< rows + 1
  std::span<const std::int32_t> entry_target, entry_slot;
  std::span<const float> entry_weight;
};

//! The plan of one rank for one step. Use: plan_rail → (rail metadata exchange) → plan_node →
//! (node metadata exchange) → plan_receive; the lists stay valid until the next plan_rail.
class node_plan {
public:
  //! Rail stage of rank `self` (`gpus` per node, `nodes` nodes): its rows to the rail peer of each
  //! remote node, with their entries.
  void plan_rail(std::size_t gpus, std::size_t nodes, std::size_t self, const layout_rows& l) {
    gpus_ = gpus;
    self_ = self;
    layout_rows_ = static_cast<std::size_t>(l.rank_offsets[gpus * nodes]);
    const std::size_t node = self / gpus, local = self % gpus;
    rail_index.clear();
    rail_row_entries.clear();
    rail_entries.clear();
    rail_counts.assign(nodes, 0);
    rail_entry_counts.assign(nodes, 0);
    for (std::size_t m = 0; m < nodes; ++m) {
      if (m == node) continue; // own node: the node stage
      const std::size_t d = m * gpus + local, before = rail_entries.size();
      for (auto r = l.rank_offsets[d]; r < l.rank_offsets[d + 1]; ++r) {
        rail_index.push_back(r);
        append_row(l, r, rail_row_entries, rail_entries);
      }
      rail_counts[m] = static_cast<std::size_t>(l.rank_offsets[d + 1] - l.rank_offsets[d]);
      rail_entry_counts[m] = rail_entries.size() - before;
    }
  }

  //! Node stage, once the rail stage's metadata has arrived (`row_entries` per received rail row,
  //! `entries` concatenated): the fan-out of the rail rows by target, then per local rank g its own
  //! rows for g followed by the rail rows forwarded to g (those for this rank stay here).
  //! @throws locus::transport_error when the received metadata is not well formed
  void plan_node(const layout_rows& l, std::span<const std::int32_t> row_entries, std::span<const node_entry> entries) {
    const std::size_t G = gpus_, rows = row_entries.size(), local = self_ % G, node0 = self_ - local;
    rail_rows_ = rows;
    // Received metadata comes from peers: check it before indexing with it.
    reo_.assign(rows + 1, 0);
    for (std::size_t r = 0; r < rows; ++r) {
      LOCUS_REQUIRE(row_entries[r] >= 1, transport_error, "device_dispatcher: rail row ", r, " came with ",
                    row_entries[r], " entries (at least 1 expected)");
      reo_[r + 1] = reo_[r] + row_entries[r];
    }
    LOCUS_REQUIRE(static_cast<std::size_t>(reo_[rows]) == entries.size(), transport_error,
                  "device_dispatcher: the rail rows' entry counts add up to ", reo_[rows], " but ", entries.size(),
                  " entries arrived");
    target_.resize(entries.size());
    slot_.resize(entries.size());
    weight_.resize(entries.size());
    for (std::size_t e = 0; e < entries.size(); ++e) {
      LOCUS_REQUIRE(entries[e].target >= 0 && static_cast<std::size_t>(entries[e].target) < G, transport_error,
                    "device_dispatcher: a rail entry targets local rank ", entries[e].target, ", out of range [0, ", G,
                    ")");
      target_[e] = entries[e].target;
      slot_[e] = entries[e].slot;
      weight_[e] = entries[e].weight;
    }
    fan_out();

    // Node send list: own rows for g, then the rail rows forwarded to g.
    node_index.clear();
    node_row_entries.clear();
    node_entries.clear();
    node_counts.assign(G, 0);
    node_entry_counts.assign(G, 0);
    own_position_.assign(layout_rows_, -1);
    forward_.assign(rows, {});
    for (std::size_t g = 0; g < G; ++g) {
      const std::size_t d = node0 + g, before = node_entries.size(), rows_before = node_index.size();
      for (auto r = l.rank_offsets[d]; r < l.rank_offsets[d + 1]; ++r) {
        own_position_[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(node_index.size());
        node_index.push_back(r);
        append_row(l, r, node_row_entries, node_entries);
      }
      if (g != local)
        for (auto i = fan_targets_[g]; i < fan_targets_[g + 1]; ++i) {
          const auto rr = static_cast<std::size_t>(fan_row_[static_cast<std::size_t>(i)]);
          forward_[rr].push_back(static_cast<std::int32_t>(node_index.size()));
          node_index.push_back(static_cast<std::int32_t>(layout_rows_ + rr));
          append_fan_row(static_cast<std::size_t>(i), static_cast<std::int32_t>(g), node_row_entries, node_entries);
        }
      node_counts[g] = node_index.size() - rows_before;
      node_entry_counts[g] = node_entries.size() - before;
    }
    // The rail rows this rank computes itself.
    self_index.clear();
    self_row_entries.clear();
    self_entries.clear();
    for (auto i = fan_targets_[local]; i < fan_targets_[local + 1]; ++i) {
      const auto rr = static_cast<std::size_t>(fan_row_[static_cast<std::size_t>(i)]);
      forward_[rr].push_back(static_cast<std::int32_t>(node_index.size() + self_index.size()));
      self_index.push_back(static_cast<std::int32_t>(layout_rows_ + rr));
      append_fan_row(static_cast<std::size_t>(i), static_cast<std::int32_t>(local), self_row_entries, self_entries);
    }
    // Combine: each rail row's sum over its node returns and self partials (pool positions).
    forward_offsets.assign(rows + 1, 0);
    forward_position.clear();
    for (std::size_t r = 0; r < rows; ++r) {
      forward_position.insert(forward_position.end(), forward_[r].begin(), forward_[r].end());
      forward_offsets[r + 1] = static_cast<std::int32_t>(forward_position.size());
    }
    forward_weight.assign(node_index.size() + self_index.size(), 1.0f);
    // Combine: where each layout row's returned sum lies in the pool.
    return_index.assign(layout_rows_, -1);
    const std::size_t rail_base = node_index.size() + self_index.size();
    for (std::size_t r = 0; r < layout_rows_; ++r)
      return_index[r] = own_position_[r];
    for (std::size_t i = 0; i < rail_index.size(); ++i)
      return_index[static_cast<std::size_t>(rail_index[i])] = static_cast<std::int32_t>(rail_base + i);
  }

  //! Rows received in the node stage plus the self-forwarded rows (the *received* space), with
  //! each row's entries (slot, weight) for the receive layout.
  //! @throws locus::transport_error when an entry names another rank or the metadata is not well formed
  void plan_receive(std::span<const std::int32_t> row_entries, std::span<const node_entry> entries) {
    const auto local = static_cast<std::int32_t>(self_ % gpus_);
    recv_row_entries.assign(row_entries.begin(), row_entries.end());
    recv_row_entries.insert(recv_row_entries.end(), self_row_entries.begin(), self_row_entries.end());
    recv_slot.clear();
    recv_weight.clear();
    std::size_t need = 0;
    for (std::int32_t n : row_entries) {
      LOCUS_REQUIRE(n >= 1, transport_error, "device_dispatcher: a node row came with ", n,
                    " entries (at least 1 expected)");
      need += static_cast<std::size_t>(n);
    }
    LOCUS_REQUIRE(need == entries.size(), transport_error, "device_dispatcher: the node rows' entry counts add up to ",
                  need, " but ", entries.size(), " entries arrived");
    for (const node_entry& e : entries) {
      LOCUS_REQUIRE(e.target == local, transport_error, "device_dispatcher: rank ", self_,
                    " received an entry for local rank ", e.target);
      recv_slot.push_back(e.slot);
      recv_weight.push_back(e.weight);
    }
    for (const node_entry& e : self_entries) {
      recv_slot.push_back(e.slot);
      recv_weight.push_back(e.weight);
    }
  }

  //! @name Rail stage (plan_rail)
  //! @{
  std::vector<std::int32_t> rail_index; //!< source rows sent in the rail stage, in member order
  std::vector<std::size_t> rail_counts, rail_entry_counts;
  std::vector<std::int32_t> rail_row_entries;
  std::vector<node_entry> rail_entries;
  //! @}
  //! @name Node stage (plan_node)
  //! @{
  std::vector<std::int32_t> node_index; //!< source rows sent in the node stage, in member order
  std::vector<std::size_t> node_counts, node_entry_counts;
  std::vector<std::int32_t> node_row_entries;
  std::vector<node_entry> node_entries;
  std::vector<std::int32_t> self_index; //!< source rows this rank forwards to itself
  std::vector<std::int32_t> self_row_entries;
  std::vector<node_entry> self_entries;
  //! Combine: rail row r's sum = the pool rows forward_position[forward_offsets[r] ..
  //! forward_offsets[r + 1]), each times forward_weight[its pool row] (all 1: the weighted row
  //! reduction of the stage bodies, whose weights are per position, serves as a plain sum).
  std::vector<std::int32_t> forward_offsets, forward_position;
  std::vector<float> forward_weight;
  //! Combine: the pool row holding layout row r's returned sum.
  std::vector<std::int32_t> return_index;
  //! @}
  //! @name Receive side (plan_receive)
  //! @{
  std::vector<std::int32_t> recv_row_entries, recv_slot;
  std::vector<float> recv_weight;
  //! @}

private:
  static void append_row(const layout_rows& l, std::int32_t r, std::vector<std::int32_t>& row_entries,
                         std::vector<node_entry>& entries) {
    const auto e0 = static_cast<std::size_t>(l.row_entry_offsets[static_cast<std::size_t>(r)]);
    const auto e1 = static_cast<std::size_t>(l.row_entry_offsets[static_cast<std::size_t>(r) + 1]);
    row_entries.push_back(static_cast<std::int32_t>(e1 - e0));
    for (std::size_t e = e0; e < e1; ++e)
      entries.push_back({l.entry_target[e], l.entry_slot[e], l.entry_weight.empty() ? 0.0f : l.entry_weight[e]});
  }

  void append_fan_row(std::size_t i, std::int32_t target, std::vector<std::int32_t>& row_entries,
                      std::vector<node_entry>& entries) const {
    row_entries.push_back(fan_row_entries_[i]);
    for (auto q = fan_entry_at_[i]; q < fan_entry_at_[i] + fan_row_entries_[i]; ++q)
      entries.push_back({target, fan_slot_[static_cast<std::size_t>(q)], fan_weight_[static_cast<std::size_t>(q)]});
  }

  // The fan-out of the rail rows by the stage bodies (node_fanout's arrays).
  void fan_out() {
    const std::size_t G = gpus_, rows = rail_rows_, n = G * rows;
    count_.assign(n, 0);
    present_.assign(n, 0);
    row_at_.assign(n + 1, 0);
    entry_at_.assign(n + 1, 0);
    const stage::grid_index one{};
    stage::fanout_count(one, reo_.data(), target_.data(), rows, G, count_.data(), present_.data());
    stage::exclusive_scan(one, present_.data(), n, row_at_.data());
    stage::exclusive_scan(one, count_.data(), n, entry_at_.data());
    const auto fan_rows = static_cast<std::size_t>(row_at_[n]), fan_entries = static_cast<std::size_t>(entry_at_[n]);
    fan_row_.resize(fan_rows);
    fan_row_entries_.resize(fan_rows);
    fan_slot_.resize(fan_entries);
    fan_weight_.resize(fan_entries);
    fan_source_.resize(fan_entries);
    fan_targets_.resize(G + 1);
    stage::fanout_place(one, reo_.data(), target_.data(), slot_.data(), weight_.data(), rows, G, row_at_.data(),
                        entry_at_.data(), fan_row_.data(), fan_row_entries_.data(), fan_slot_.data(),
                        fan_weight_.data(), fan_source_.data());
    stage::fanout_targets(one, row_at_.data(), rows, G, fan_targets_.data());
    fan_entry_at_.resize(fan_rows);
    std::int32_t at = 0;
    for (std::size_t i = 0; i < fan_rows; ++i) {
      fan_entry_at_[i] = at;
      at += fan_row_entries_[i];
    }
  }

  std::size_t gpus_ = 1, self_ = 0, layout_rows_ = 0, rail_rows_ = 0;
  std::vector<std::int32_t> reo_, target_, slot_, count_, present_, row_at_, entry_at_;
  std::vector<float> weight_;
  std::vector<std::int32_t> fan_row_, fan_row_entries_, fan_slot_, fan_source_, fan_targets_, fan_entry_at_;
  std::vector<float> fan_weight_;
  std::vector<std::int32_t> own_position_;
  std::vector<std::vector<std::int32_t>> forward_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::device_dispatch
