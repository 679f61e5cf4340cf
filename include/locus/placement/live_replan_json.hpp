#pragma once
//! @file
//! A re-plan of recorded traffic (placement::replan_live) as JSON: its figures and the slots whose
//! weights change (`from` / `to` null for an empty slot). `locus map replan --json` and
//! `locus.replan` (Python) give it.

#include <locus/placement/live_replan.hpp>
#include <nlohmann/json.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

inline nlohmann::json live_replan_json(const live_replan_result& r) {
  const auto id = [](expert_id e) { return e == empty_slot ? nlohmann::json(nullptr) : nlohmann::json(e); };
  nlohmann::json moves = nlohmann::json::array();
  for (const auto& m : r.moves)
    moves.push_back({{"layer", m.layer}, {"rank", m.rank}, {"slot", m.slot}, {"from", id(m.from)}, {"to", id(m.to)}});
  return {{"window_requests", r.window_requests},
          {"window_decode_tokens", r.window_decode_tokens},
          {"sample_tokens", r.sample_tokens},
          {"prior_tokens", r.prior_tokens},
          {"budget_slots", r.budget_slots},
          {"slots_moved", r.moves.size()},
          {"moved_share", r.moved_share},
          {"bytes_moved", r.bytes_moved},
          {"copies_per_token_before", r.copies_per_token_before},
          {"copies_per_token_after", r.copies_per_token_after},
          {"balance_floor_before", r.balance_floor_before},
          {"balance_floor_after", r.balance_floor_after},
          {"moves", std::move(moves)}};
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
