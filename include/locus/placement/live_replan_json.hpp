#pragma once
//! @file
//! A re-plan of recorded traffic (placement::replan_live) as JSON: its figures and the slots whose
//! weights change (`from` / `to` null for an empty slot; `model_layer` where the map numbers its layers). `locus map
//! replan --json` and `locus.replan` (Python) give it.

#include <locus/placement/live_replan.hpp>
#include <nlohmann/json.hpp>
#include <span>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! `model_layers` (the map file's, where saved): each move also names its layer's hidden-layer
//! index (`model_layer`), the layer number the engines' files use; `layer` is the map's own index.
//! @throws locus::config_error when `model_layers` is given and a move's layer has none
inline nlohmann::json live_replan_json(const live_replan_result& r, std::span<const std::size_t> model_layers = {}) {
  const auto id = [](expert_id e) { return e == empty_slot ? nlohmann::json(nullptr) : nlohmann::json(e); };
  nlohmann::json moves = nlohmann::json::array();
  for (const auto& m : r.moves) {
    nlohmann::json move{{"layer", m.layer}, {"rank", m.rank}, {"slot", m.slot}, {"from", id(m.from)}, {"to", id(m.to)}};
    if (!model_layers.empty()) {
      LOCUS_REQUIRE(m.layer < model_layers.size(), config_error, "live_replan_json: a move in layer ", m.layer, " of ",
                    model_layers.size(), " model layers");
      move["model_layer"] = model_layers[m.layer];
    }
    moves.push_back(std::move(move));
  }
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
