#pragma once
// locus-requires: json
//! @file
//! A locus plan (one expert_map per MoE layer) written in the files serving engines take. Formats
//! and the versions they were read from are in docs/engines.md:
//!   - SGLang `--init-expert-location FILE.json`: {"physical_to_logical_map": [hidden layer][slot]},
//!     one row per hidden layer of the model; a dense layer's row is the engine's own trivial
//!     placement (slot p holds expert p mod E).
//!   - vLLM EPLB state, per MoE layer: physical_to_logical_map [L][P], logical_to_physical_map
//!     [L][E][X] padded with -1, logical_replica_count [L][E]; and num_ranks, the GPUs the slots are
//!     spread over (locus.vllm checks vLLM's against it).
//!   - TensorRT-LLM `moe_load_balancer` YAML: num_slots and initial_global_assignments keyed by the
//!     model's layer index.
//!   - DeepSeek EPLB's triple (phy2log, log2phy, logcnt), as `rebalance_experts` returns it.
//! Physical slots are numbered rank-major (rank × slots_per_rank + slot) in all of them, and none
//! of them accepts an empty slot: `fill_empty_slots` fills a plan's empty slots first.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/placement/eplb.hpp>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

using ::locus::max_hidden_layers; // where it was declared before it moved to core/expert_map.hpp

//! Where the planned (MoE) layers sit among the model's hidden layers. Engines index every hidden
//! layer, dense ones included; a plan numbers its layers 0..L-1.
struct model_layers {
  //! Hidden-layer index of each planned layer, ascending.
  std::vector<std::size_t> moe_layer;
  //! The model's hidden-layer count (≥ every index above + 1).
  std::size_t hidden_layers = 0;
  //! Multi-token-prediction layers after the hidden layers (DeepSeek-V3/R1 with MTP: 1), numbered
  //! hidden_layers, hidden_layers + 1, ...: TensorRT-LLM's load balancer looks each up and fails
  //! without an assignment; the others need none (SGLang's NextN layer reads row 0). A planned
  //! layer numbered among them (TensorRT-LLM's statistics hold DeepSeek-V3's layer 61 beside 3..60)
  //! is that MTP layer: TensorRT-LLM gets its map, the files without MTP rows leave it out; the
  //! MTP layers no planned layer is get the trivial placement.
  std::size_t mtp_layers = 0;
  //! MTP layers at most (DeepSeek's models have one).
  static constexpr std::size_t max_mtp_layers = 16;

  //! Planned layer i is hidden layer `first_moe_layer + i × step`: step 1 for MoE layers that follow
  //! each other (DeepSeek-V3 from layer 3, Qwen3 from 0), 2 for a model whose MoE layers alternate
  //! with dense ones (Llama 4 Maverick: layers 1, 3, ..., 47, first_moe_layer 1). `hidden_layers` 0
  //! means the last MoE layer + 1 (no dense layer after it).
  //! @throws locus::config_error on step 0, beyond max_hidden_layers or when the table is not valid
  static model_layers spaced(std::size_t layers, std::size_t first_moe_layer, std::size_t step = 1,
                             std::size_t hidden_layers = 0) {
    LOCUS_REQUIRE(step > 0, config_error, "model layers: a MoE-layer step of 0");
    // Divided, not multiplied: (layers - 1) × step could wrap.
    LOCUS_REQUIRE(first_moe_layer < max_hidden_layers &&
                      (layers == 0 || (layers - 1) <= (max_hidden_layers - 1 - first_moe_layer) / step),
                  config_error, "model layers: the plan's ", layers, " layers from hidden layer ", first_moe_layer,
                  step > 1 ? ::locus::detail::concat(", every ", step, ",") : std::string(), " pass the limit of ",
                  max_hidden_layers, " hidden layers");
    model_layers m;
    for (std::size_t i = 0; i < layers; ++i)
      m.moe_layer.push_back(first_moe_layer + i * step);
    m.hidden_layers = hidden_layers == 0 ? (layers == 0 ? first_moe_layer : m.moe_layer.back() + 1) : hidden_layers;
    m.validate(layers);
    return m;
  }

  //! @throws locus::config_error when the table does not describe `layers` planned layers
  void validate(std::size_t layers) const {
    LOCUS_REQUIRE(hidden_layers <= max_hidden_layers, config_error, "model layers: ", hidden_layers,
                  " hidden layers (at most ", max_hidden_layers, ")");
    LOCUS_REQUIRE(mtp_layers <= max_mtp_layers, config_error, "model layers: ", mtp_layers, " MTP layers (at most ",
                  max_mtp_layers, ")");
    LOCUS_REQUIRE(moe_layer.size() == layers, config_error, "model layers: ", moe_layer.size(),
                  " layer ids for a plan of ", layers, " layers");
    for (std::size_t i = 0; i < moe_layer.size(); ++i) {
      LOCUS_REQUIRE(moe_layer[i] < hidden_layers + mtp_layers, config_error, "model layers: MoE layer ", i,
                    " is hidden layer ", moe_layer[i], ", but the model has ", hidden_layers, " hidden layers",
                    mtp_layers ? ::locus::detail::concat(" and ", mtp_layers, " MTP layers") : std::string());
      LOCUS_REQUIRE(i == 0 || moe_layer[i] > moe_layer[i - 1], config_error, "model layers: layer ids must ascend (",
                    moe_layer[i - 1], " then ", moe_layer[i], ")");
    }
    LOCUS_REQUIRE(planned_mtp() < moe_layer.size() || moe_layer.empty(), config_error,
                  "model layers: every planned layer is an MTP layer (from hidden layer ", hidden_layers,
                  " on); a plan needs a hidden layer");
  }

  //! The first hidden layer that carries on the planned layers' regular numbering (first, first +
  //! step, ...; one planned layer: step 1) below `hidden_layers`: a MoE layer the plan has no map
  //! for, unless the model's last layers are dense (ERNIE 4.5's moe_layer_end_index may make them
  //! so), which nothing here can tell; exporters say it rather than refuse. 0 when there is none, or
  //! when the planned ids are not evenly spaced (a trace that logged some layers only).
  std::size_t unplanned_layer() const noexcept {
    const std::size_t planned = moe_layer.size() - planned_mtp();
    if (planned == 0) return 0;
    const std::size_t step = even_step({moe_layer.data(), planned});
    if (step == 0) return 0;
    const std::size_t next = moe_layer[planned - 1] + step;
    return next < hidden_layers ? next : 0;
  }

  //! The spacing of ascending layer ids that are evenly spaced (one id: 1), else 0.
  static std::size_t even_step(std::span<const std::size_t> ids) noexcept {
    const std::size_t step = ids.size() > 1 ? ids[1] - ids[0] : 1;
    for (std::size_t i = 1; i < ids.size(); ++i)
      if (ids[i] - ids[i - 1] != step) return 0;
    return step;
  }

  //! Planned layers that are MTP layers (numbered from hidden_layers on: the last ones).
  std::size_t planned_mtp() const noexcept {
    return static_cast<std::size_t>(
        std::count_if(moe_layer.begin(), moe_layer.end(), [&](std::size_t id) { return id >= hidden_layers; }));
  }
};

namespace detail::engine {

inline void require_same_shape(const std::vector<expert_map>& maps, const char* what) {
  LOCUS_REQUIRE(!maps.empty(), config_error, what, ": the plan has no layers");
  for (std::size_t l = 1; l < maps.size(); ++l)
    LOCUS_REQUIRE(maps[l].experts() == maps[0].experts() && maps[l].ranks() == maps[0].ranks() &&
                      maps[l].slots_per_rank() == maps[0].slots_per_rank(),
                  config_error, what, ": layer ", l, " has a different shape from layer 0");
}

inline void require_full(const std::vector<expert_map>& maps, const char* what) {
  require_same_shape(maps, what);
  for (std::size_t l = 0; l < maps.size(); ++l) {
    const auto& table = maps[l].slot_table();
    const auto it = std::find(table.begin(), table.end(), empty_slot);
    LOCUS_REQUIRE(it == table.end(), invalid_input_error, what, ": layer ", l, " slot ", it - table.begin(),
                  " is empty; engines accept no empty slot (fill_empty_slots fills them)");
  }
}

} // namespace detail::engine

//! The plan with every empty slot filled, so that engines can load it. Rule, per layer, slots in
//! rank-major order: the slot gets the expert, among those not yet on its rank, with the largest
//! load per replica (the replica that best balances GPU load, as EPLB's replication does); ties go
//! to the expert with the largest load from the slot's node that no GPU of the node serves yet
//! (the replica that saves most copies), then to the lowest id. `load[l][e]` is the expected load;
//! `node_load[l][node][e]` (optional, may be empty) the load from requests grouped onto each node.
//! Without loads (`load` empty), every expert weighs the same: the fewest replicas, lowest id.
//! @throws locus::config_error, locus::invalid_input_error when the loads do not match the plan
inline std::vector<expert_map> fill_empty_slots(const std::vector<expert_map>& maps,
                                                const std::vector<std::vector<double>>& load = {},
                                                const std::vector<std::vector<std::vector<double>>>& node_load = {},
                                                std::size_t gpus_per_node = 1) {
  detail::engine::require_same_shape(maps, "fill_empty_slots");
  const std::size_t experts = maps[0].experts(), ranks = maps[0].ranks(), per_rank = maps[0].slots_per_rank();
  LOCUS_REQUIRE(load.empty() || load.size() == maps.size(), invalid_input_error, "fill_empty_slots: ", load.size(),
                " load rows for ", maps.size(), " layers");
  LOCUS_REQUIRE(node_load.empty() || node_load.size() == maps.size(), invalid_input_error,
                "fill_empty_slots: ", node_load.size(), " node-load tables for ", maps.size(), " layers");
  LOCUS_REQUIRE(gpus_per_node > 0 && ranks % gpus_per_node == 0, config_error, "fill_empty_slots: ", ranks,
                " ranks do not split into nodes of ", gpus_per_node, " GPUs");
  const std::size_t nodes = ranks / gpus_per_node;
  std::vector<expert_map> out;
  out.reserve(maps.size());
  for (std::size_t l = 0; l < maps.size(); ++l) {
    throw_if_cancelled();
    std::vector<double> w(experts, 1.0);
    if (!load.empty()) {
      LOCUS_REQUIRE(load[l].size() == experts, invalid_input_error, "fill_empty_slots: layer ", l, " has ",
                    load[l].size(), " load values for ", experts, " experts");
      w = load[l];
    }
    if (!node_load.empty())
      LOCUS_REQUIRE(node_load[l].size() == nodes, invalid_input_error, "fill_empty_slots: layer ", l, " has ",
                    node_load[l].size(), " node-load rows for ", nodes, " nodes");
    for (std::size_t e = 0; e < experts; ++e)
      LOCUS_REQUIRE(std::isfinite(w[e]) && w[e] >= 0, invalid_input_error, "fill_empty_slots: layer ", l, " expert ", e,
                    " has load ", w[e], " (must be finite and non-negative)");
    if (!node_load.empty())
      for (std::size_t node = 0; node < nodes; ++node)
        LOCUS_REQUIRE(node_load[l][node].size() == experts, invalid_input_error, "fill_empty_slots: layer ", l,
                      " node ", node, " has ", node_load[l][node].size(), " values for ", experts, " experts");
    std::vector<expert_id> table = maps[l].slot_table();
    std::vector<std::size_t> count(experts, 0);
    // Which experts each node holds (with node loads): a slot's pick checks every expert, and
    // scanning the node's slots per expert made a big plan's fill take minutes.
    std::vector<std::uint32_t> node_holds(node_load.empty() ? 0 : nodes * experts, 0);
    for (std::size_t slot = 0; slot < table.size(); ++slot) {
      if (table[slot] == empty_slot) continue;
      const auto e = static_cast<std::size_t>(table[slot]);
      ++count[e];
      if (!node_load.empty()) ++node_holds[slot / per_rank / gpus_per_node * experts + e];
    }
    std::vector<char> on_rank(experts);
    for (std::size_t rank = 0; rank < ranks; ++rank) {
      const std::size_t node = rank / gpus_per_node, first = rank * per_rank;
      const auto saved = [&](std::size_t e) {
        return node_load.empty() || node_holds[node * experts + e] ? 0.0 : node_load[l][node][e];
      };
      std::fill(on_rank.begin(), on_rank.end(), 0);
      for (std::size_t s = first; s < first + per_rank; ++s)
        if (table[s] != empty_slot) on_rank[static_cast<std::size_t>(table[s])] = 1;
      for (std::size_t slot = first; slot < first + per_rank; ++slot) {
        if (table[slot] != empty_slot) continue;
        std::size_t best = experts;
        double best_share = 0, best_saved = 0;
        // Two passes: experts not on this rank yet; any expert when the rank already holds them all.
        for (int pass = 0; pass < 2 && best == experts; ++pass)
          for (std::size_t e = 0; e < experts; ++e) {
            if (pass == 0 && on_rank[e]) continue;
            // Load per replica is w / count; an expert still placed nowhere counts as one replica's worth.
            const double share = w[e] / static_cast<double>(std::max<std::size_t>(count[e], 1));
            const double saving = saved(e);
            if (best == experts || share > best_share || (share == best_share && saving > best_saved)) {
              best = e;
              best_share = share;
              best_saved = saving;
            }
          }
        table[slot] = static_cast<expert_id>(best);
        ++count[best];
        on_rank[best] = 1;
        if (!node_load.empty()) ++node_holds[node * experts + best];
      }
    }
    out.emplace_back(experts, ranks, per_rank, std::move(table));
  }
  return out;
}

//! DeepSeek EPLB's triple for a full plan: physical_to_logical [L][P], logical_to_physical
//! [L][E][X] (each expert's slots in slot order, padded with -1), logical_count [L][E]. The same
//! arrays are vLLM's EPLB state (physical_to_logical_map, logical_to_physical_map,
//! logical_replica_count).
//! @throws locus::invalid_input_error naming the first empty slot
inline eplb_result to_eplb_arrays(const std::vector<expert_map>& maps) {
  detail::engine::require_full(maps, "to_eplb_arrays");
  eplb_result r;
  r.layers = maps.size();
  r.experts = maps[0].experts();
  r.replicas = maps[0].slot_count();
  for (const auto& m : maps)
    for (std::size_t e = 0; e < r.experts; ++e)
      r.max_replicas = std::max(r.max_replicas, m.replica_count(e));
  r.logical_to_physical.assign(r.layers * r.experts * r.max_replicas, -1);
  r.logical_count.assign(r.layers * r.experts, 0);
  for (std::size_t l = 0; l < r.layers; ++l) {
    const auto& table = maps[l].slot_table();
    for (std::size_t p = 0; p < r.replicas; ++p) {
      const auto e = static_cast<std::size_t>(table[p]);
      r.physical_to_logical.push_back(table[p]);
      auto& n = r.logical_count[l * r.experts + e];
      r.logical_to_physical[(l * r.experts + e) * r.max_replicas + static_cast<std::size_t>(n)] =
          static_cast<std::int64_t>(p);
      ++n;
    }
  }
  return r;
}

namespace detail::engine {
inline nlohmann::json rows(const std::vector<std::int64_t>& flat, std::size_t row) {
  nlohmann::json out = nlohmann::json::array();
  for (std::size_t i = 0; i < flat.size(); i += row)
    out.push_back(std::vector<std::int64_t>(flat.begin() + static_cast<std::ptrdiff_t>(i),
                                            flat.begin() + static_cast<std::ptrdiff_t>(i + row)));
  return out;
}
} // namespace detail::engine

//! The triple as JSON: {"phy2log": [L][P], "log2phy": [L][E][X], "logcnt": [L][E]}.
inline nlohmann::json eplb_json(const eplb_result& r) {
  nlohmann::json log2phy = nlohmann::json::array();
  for (std::size_t l = 0; l < r.layers; ++l) {
    nlohmann::json layer = nlohmann::json::array();
    for (std::size_t e = 0; e < r.experts; ++e) {
      const auto first =
          r.logical_to_physical.begin() + static_cast<std::ptrdiff_t>((l * r.experts + e) * r.max_replicas);
      layer.push_back(std::vector<std::int64_t>(first, first + static_cast<std::ptrdiff_t>(r.max_replicas)));
    }
    log2phy.push_back(std::move(layer));
  }
  return {{"phy2log", detail::engine::rows(r.physical_to_logical, r.replicas)},
          {"log2phy", std::move(log2phy)},
          {"logcnt", detail::engine::rows(r.logical_count, r.experts)}};
}

//! vLLM's EPLB arrays, one row per MoE layer, as JSON with vLLM's names, and the GPUs (ranks) the
//! slots are spread over (vLLM gives each rank an equal run of slots; locus.vllm checks the count).
inline nlohmann::json vllm_json(const std::vector<expert_map>& maps) {
  const auto r = to_eplb_arrays(maps);
  auto doc = eplb_json(r);
  return {{"physical_to_logical_map", std::move(doc["phy2log"])},
          {"logical_to_physical_map", std::move(doc["log2phy"])},
          {"logical_replica_count", std::move(doc["logcnt"])},
          {"num_ranks", maps.front().ranks()}};
}

//! SGLang's `--init-expert-location` document: one physical_to_logical_map row per hidden layer;
//! a dense layer's row is SGLang's trivial placement (slot p holds expert p mod E).
//! @throws locus::config_error when `layers` does not describe the plan
inline nlohmann::json sglang_json(const std::vector<expert_map>& maps, const model_layers& layers) {
  detail::engine::require_full(maps, "sglang export");
  layers.validate(maps.size());
  const std::size_t experts = maps[0].experts(), slots = maps[0].slot_count();
  nlohmann::json rows = nlohmann::json::array();
  std::size_t next = 0;
  for (std::size_t h = 0; h < layers.hidden_layers; ++h) {
    if (next < layers.moe_layer.size() && layers.moe_layer[next] == h) {
      rows.push_back(maps[next++].slot_table());
      continue;
    }
    std::vector<std::int64_t> trivial(slots);
    for (std::size_t p = 0; p < slots; ++p)
      trivial[p] = static_cast<std::int64_t>(p % experts);
    rows.push_back(std::move(trivial));
  }
  return {{"physical_to_logical_map", std::move(rows)}};
}

//! TensorRT-LLM's `moe_load_balancer` YAML (static placement: layer_updates_per_iter 0), keyed by
//! the model's layer index; each MTP layer (`layers.mtp_layers`, keys from `layers.hidden_layers`)
//! gets its planned map, or the trivial placement (slot p holds expert p mod E) where the plan has
//! none (a trace that did not record its routing).
//! @throws locus::config_error when `layers` does not describe the plan
inline std::string trtllm_yaml(const std::vector<expert_map>& maps, const model_layers& layers) {
  detail::engine::require_full(maps, "trtllm export");
  layers.validate(maps.size());
  std::ostringstream os;
  os << "num_slots: " << maps[0].slot_count() << "\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n";
  const auto row = [&](std::size_t key, const auto& expert_of_slot) {
    os << "  " << key << ": [";
    for (std::size_t p = 0; p < maps[0].slot_count(); ++p)
      os << (p ? ", " : "") << expert_of_slot(p);
    os << "]\n";
  };
  std::size_t l = 0;
  for (; l < maps.size() && layers.moe_layer[l] < layers.hidden_layers; ++l)
    row(layers.moe_layer[l], [&](std::size_t p) { return maps[l].slot_table()[p]; });
  for (std::size_t key = layers.hidden_layers; key < layers.hidden_layers + layers.mtp_layers; ++key)
    if (l < maps.size() && layers.moe_layer[l] == key) {
      row(key, [&](std::size_t p) { return maps[l].slot_table()[p]; });
      ++l;
    } else {
      row(key, [&](std::size_t p) { return p % maps[0].experts(); });
    }
  return os.str();
}

//! Engines an export can target.
enum class engine_format { sglang, vllm, trtllm, eplb };

//! Parses "sglang", "vllm", "trtllm" or "eplb". @throws locus::config_error naming the choices
inline engine_format parse_engine_format(const std::string& name) {
  if (name == "sglang") return engine_format::sglang;
  if (name == "vllm") return engine_format::vllm;
  if (name == "trtllm") return engine_format::trtllm;
  if (name == "eplb") return engine_format::eplb;
  LOCUS_THROW(config_error, "unknown engine format \"", name, "\" (choose sglang, vllm, trtllm or eplb)");
}

//! The text of the file `format` takes for a full plan. vLLM's and EPLB's files have a row per MoE
//! layer and name no hidden layer, but `layers` is checked for them too: a numbering that cannot
//! describe the plan is a caller's mistake whichever file it goes to. Planned MTP layers are
//! TensorRT-LLM's only (model_layers::mtp_layers): SGLang's, vLLM's and EPLB's files leave them out.
//! @throws locus::config_error when `layers` does not describe the plan
inline std::string export_text(engine_format format, const std::vector<expert_map>& maps, const model_layers& layers) {
  layers.validate(maps.size());
  const auto hidden_maps = [&] {
    return std::vector<expert_map>(maps.begin(), maps.end() - static_cast<std::ptrdiff_t>(layers.planned_mtp()));
  };
  switch (format) {
  case engine_format::sglang: return sglang_json(maps, layers).dump() + "\n";
  case engine_format::vllm: return vllm_json(layers.planned_mtp() ? hidden_maps() : maps).dump() + "\n";
  case engine_format::trtllm: return trtllm_yaml(maps, layers);
  case engine_format::eplb: return eplb_json(to_eplb_arrays(layers.planned_mtp() ? hidden_maps() : maps)).dump() + "\n";
  }
  LOCUS_THROW(config_error, "unknown engine format");
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
