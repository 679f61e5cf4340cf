#pragma once
//! @file
//! Where each logical expert of one MoE layer lives: a table of physical slots (rank, slot) with
//! a fixed number of slots per rank; an expert may occupy several slots (replicas). An
//! `expert_map` is always valid: its constructors check every rule and say precisely what broke.

#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/routing.hpp>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! One physical slot.
struct slot_ref {
  std::int32_t rank = 0;
  std::int32_t slot = 0;
  friend constexpr bool operator==(const slot_ref&, const slot_ref&) = default;
};

//! Marks an unused slot in a slot table.
inline constexpr expert_id empty_slot = -1;

//! Hidden layers of a model at most (the largest today have about a hundred): the bound on the
//! model layer ids a plan file, a load import or an engine export takes. Engine files list every
//! hidden layer, so it also bounds what an export writes.
inline constexpr std::size_t max_hidden_layers = 4096;

//! Trivially copyable view of an expert map, for kernels and hot loops. Arrays are CSR: the
//! replicas of expert `e` are `replicas[replica_offsets[e] .. replica_offsets[e + 1])`, ordered by
//! rank then slot.
struct expert_map_view {
  const expert_id* slot_expert = nullptr;        //!< `ranks × slots_per_rank`, empty_slot where unused
  const std::int32_t* replica_offsets = nullptr; //!< `experts + 1`
  const slot_ref* replicas = nullptr;            //!< one entry per occupied slot
  std::int32_t experts = 0;
  std::int32_t ranks = 0;
  std::int32_t slots_per_rank = 0;

  LOCUS_HOST_DEVICE constexpr std::int32_t replica_count(std::int32_t e) const {
    LOCUS_ASSERT(e >= 0 && e < experts, "expert_map_view::replica_count: expert out of range");
    return replica_offsets[e + 1] - replica_offsets[e];
  }
  LOCUS_HOST_DEVICE constexpr slot_ref replica(std::int32_t e, std::int32_t i) const {
    LOCUS_ASSERT(i >= 0 && i < replica_count(e), "expert_map_view::replica: replica index out of range");
    return replicas[replica_offsets[e] + i];
  }
};

//! Placement of one MoE layer's experts onto `ranks × slots_per_rank` physical slots.
class expert_map {
public:
  //! Builds a map from its slot table (`ranks × slots_per_rank`, rank-major; `empty_slot` marks an
  //! unused slot).
  //! @throws locus::config_error on zero experts, ranks or slots, or a table of the wrong size
  //! @throws locus::invalid_input_error naming the slot holding an out-of-range id or the expert
  //!         hosted nowhere
  expert_map(std::size_t experts, std::size_t ranks, std::size_t slots_per_rank, std::vector<expert_id> slot_table)
      : experts_(experts), ranks_(ranks), slots_per_rank_(slots_per_rank), slot_expert_(std::move(slot_table)) {
    check_sizes(experts, ranks, slots_per_rank);
    LOCUS_REQUIRE(slot_expert_.size() == ranks * slots_per_rank, config_error, "expert_map: slot table has ",
                  slot_expert_.size(), " entries, expected ranks × slots_per_rank = ", ranks * slots_per_rank);
    LOCUS_REQUIRE(ranks * slots_per_rank >= experts, config_error, "expert_map: ", ranks * slots_per_rank,
                  " slots cannot host ", experts, " experts");
    build_index();
  }

  //! Builds a map from each expert's list of slots.
  //! @throws locus::invalid_input_error when a slot is given to two experts (naming both), a slot is
  //!         outside the table, or an expert has no slot
  static expert_map from_replicas(std::size_t experts, std::size_t ranks, std::size_t slots_per_rank,
                                  const std::vector<std::vector<slot_ref>>& replicas) {
    LOCUS_REQUIRE(replicas.size() == experts, config_error, "expert_map::from_replicas: ", replicas.size(),
                  " replica lists for ", experts, " experts");
    // Before the table is sized from them: ranks × slots may wrap to a small table.
    check_sizes(experts, ranks, slots_per_rank);
    std::vector<expert_id> table(ranks * slots_per_rank, empty_slot);
    for (std::size_t e = 0; e < experts; ++e) {
      for (const slot_ref& s : replicas[e]) {
        if (s.rank < 0 || static_cast<std::size_t>(s.rank) >= ranks || s.slot < 0 ||
            static_cast<std::size_t>(s.slot) >= slots_per_rank)
          LOCUS_THROW(invalid_input_error, "expert ", e, " is given slot (rank ", s.rank, ", slot ", s.slot,
                      ") outside the ", ranks, " × ", slots_per_rank, " slot table");
        expert_id& cell = table[static_cast<std::size_t>(s.rank) * slots_per_rank + static_cast<std::size_t>(s.slot)];
        if (cell != empty_slot)
          LOCUS_THROW(invalid_input_error, "slot (rank ", s.rank, ", slot ", s.slot, ") is used twice: by expert ",
                      cell, " and by expert ", e);
        cell = static_cast<expert_id>(e);
      }
    }
    return expert_map(experts, ranks, slots_per_rank, std::move(table));
  }

  std::size_t experts() const noexcept { return experts_; }
  std::size_t ranks() const noexcept { return ranks_; }
  std::size_t slots_per_rank() const noexcept { return slots_per_rank_; }
  std::size_t slot_count() const noexcept { return slot_expert_.size(); }
  //! Slots holding a replica beyond each expert's first copy.
  std::size_t replica_slots_used() const noexcept { return replicas_.size() - experts_; }
  //! Slots that hold no expert (`map export` fills them for the engines, whose files have none).
  std::size_t empty_slots() const noexcept { return slot_expert_.size() - replicas_.size(); }

  //! Expert in (rank, slot), or empty_slot.
  expert_id expert_at(std::size_t rank, std::size_t slot) const {
    LOCUS_REQUIRE(rank < ranks_ && slot < slots_per_rank_, invalid_input_error, "expert_map::expert_at: (rank ", rank,
                  ", slot ", slot, ") outside the ", ranks_, " × ", slots_per_rank_, " table");
    return slot_expert_[rank * slots_per_rank_ + slot];
  }
  //! Every slot holding expert `e`, ordered by rank then slot.
  std::span<const slot_ref> replicas(std::size_t e) const {
    check_expert(e);
    return {replicas_.data() + offsets_[e], static_cast<std::size_t>(offsets_[e + 1] - offsets_[e])};
  }
  std::size_t replica_count(std::size_t e) const {
    check_expert(e);
    return static_cast<std::size_t>(offsets_[e + 1] - offsets_[e]);
  }
  //! True when `rank` holds a replica of `e`.
  bool hosts(std::size_t rank, std::size_t e) const {
    for (const slot_ref& s : replicas(e))
      if (static_cast<std::size_t>(s.rank) == rank) return true;
    return false;
  }
  //! Experts held by `rank`, one per occupied slot in slot order.
  std::vector<expert_id> experts_on(std::size_t rank) const {
    LOCUS_REQUIRE(rank < ranks_, invalid_input_error, "expert_map::experts_on: rank ", rank, " out of range [0, ",
                  ranks_, ")");
    std::vector<expert_id> out;
    for (std::size_t s = 0; s < slots_per_rank_; ++s)
      if (const expert_id e = slot_expert_[rank * slots_per_rank_ + s]; e != empty_slot) out.push_back(e);
    return out;
  }
  //! The rank-major slot table.
  const std::vector<expert_id>& slot_table() const noexcept { return slot_expert_; }

  //! A 64-bit digest of the map (its sizes and slot table, FNV-1a), never 0: what the dispatchers
  //! compare across ranks in their exchanges' headers, so that ranks stepping with different maps
  //! raise instead of routing rows by two maps.
  std::uint64_t fingerprint() const noexcept {
    std::uint64_t h = 0xcbf29ce484222325ULL;
    const auto mix = [&](std::uint64_t v) {
      for (int i = 0; i < 8; ++i) {
        h ^= (v >> (8 * i)) & 0xff;
        h *= 0x100000001b3ULL;
      }
    };
    mix(experts_);
    mix(ranks_);
    mix(slots_per_rank_);
    for (const expert_id e : slot_expert_)
      mix(static_cast<std::uint32_t>(e));
    return h == 0 ? 1 : h;
  }
  //! A trivially copyable view over this map's host arrays (valid while the map lives).
  expert_map_view view() const noexcept {
    return {slot_expert_.data(),
            offsets_.data(),
            replicas_.data(),
            static_cast<std::int32_t>(experts_),
            static_cast<std::int32_t>(ranks_),
            static_cast<std::int32_t>(slots_per_rank_)};
  }

  friend bool operator==(const expert_map& a, const expert_map& b) {
    return a.experts_ == b.experts_ && a.ranks_ == b.ranks_ && a.slots_per_rank_ == b.slots_per_rank_ &&
           a.slot_expert_ == b.slot_expert_;
  }

private:
  static void check_sizes(std::size_t experts, std::size_t ranks, std::size_t slots_per_rank) {
    LOCUS_REQUIRE(experts > 0 && ranks > 0 && slots_per_rank > 0, config_error,
                  "expert_map needs at least one expert, rank and slot per rank (got ", experts, ", ", ranks, ", ",
                  slots_per_rank, ")");
    // Divided, not multiplied: a product of two huge sizes wraps to a small number.
    LOCUS_REQUIRE(experts <= static_cast<std::size_t>(INT32_MAX) &&
                      slots_per_rank <= static_cast<std::size_t>(INT32_MAX) / ranks,
                  config_error, "expert_map: ", experts, " experts or ", ranks, " ranks × ", slots_per_rank,
                  " slots exceed 32-bit ids (at most 2^31-1)");
  }

  void check_expert(std::size_t e) const {
    LOCUS_REQUIRE(e < experts_, invalid_input_error, "expert id ", e, " out of range [0, ", experts_, ")");
  }

  // Validates the table and builds the expert → slots index in one counting-sort pass.
  void build_index() {
    offsets_.assign(experts_ + 1, 0);
    for (std::size_t i = 0; i < slot_expert_.size(); ++i) {
      const expert_id e = slot_expert_[i];
      if (e == empty_slot) continue;
      if (e < 0 || static_cast<std::size_t>(e) >= experts_)
        LOCUS_THROW(invalid_input_error, "slot (rank ", i / slots_per_rank_, ", slot ", i % slots_per_rank_,
                    ") holds expert id ", e, ", out of range [0, ", experts_, ")");
      ++offsets_[static_cast<std::size_t>(e) + 1];
    }
    for (std::size_t e = 0; e < experts_; ++e) {
      if (offsets_[e + 1] == 0) LOCUS_THROW(invalid_input_error, "expert ", e, " is not hosted on any slot");
      offsets_[e + 1] += offsets_[e];
    }
    replicas_.resize(static_cast<std::size_t>(offsets_[experts_]));
    std::vector<std::int32_t> fill(offsets_.begin(), offsets_.end() - 1);
    for (std::size_t i = 0; i < slot_expert_.size(); ++i) {
      const expert_id e = slot_expert_[i];
      if (e == empty_slot) continue;
      // Two replicas on one rank are legal (EPLB's packing can produce them) though they add
      // nothing but compute balance inside that rank.
      std::int32_t& pos = fill[static_cast<std::size_t>(e)];
      replicas_[static_cast<std::size_t>(pos++)] = {static_cast<std::int32_t>(i / slots_per_rank_),
                                                    static_cast<std::int32_t>(i % slots_per_rank_)};
    }
  }

  std::size_t experts_;
  std::size_t ranks_;
  std::size_t slots_per_rank_;
  std::vector<expert_id> slot_expert_;
  std::vector<std::int32_t> offsets_;
  std::vector<slot_ref> replicas_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
