#pragma once
// locus-requires: json
//! @file
//! Saving and loading expert maps (one per MoE layer) as JSON, so a plan made offline can be
//! loaded by the serving engine. Needs nlohmann_json.
//!
//! Format (version 1):
//! {"format": "locus-expert-map", "version": 1, "experts": E, "ranks": R, "slots_per_rank": S,
//!  "layers": [ [[e, e, ...] per rank] per layer ]}   (-1 marks an empty slot)
//! and, optional, "model_layers": [hidden-layer index of each layer], "hidden_layers": H (the
//! model's layer numbering, which engine exports use; see placement/engine_export.hpp).

#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

inline constexpr int expert_map_json_version = 1;

//! The JSON document for per-layer maps. @throws locus::config_error when the maps differ in shape
inline nlohmann::json expert_maps_to_json(const std::vector<expert_map>& layers) {
  LOCUS_REQUIRE(!layers.empty(), config_error, "expert_maps_to_json: no layers");
  const expert_map& first = layers.front();
  nlohmann::json doc = {{"format", "locus-expert-map"},
                        {"version", expert_map_json_version},
                        {"experts", first.experts()},
                        {"ranks", first.ranks()},
                        {"slots_per_rank", first.slots_per_rank()}};
  nlohmann::json out_layers = nlohmann::json::array();
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const expert_map& m = layers[l];
    LOCUS_REQUIRE(m.experts() == first.experts() && m.ranks() == first.ranks() &&
                      m.slots_per_rank() == first.slots_per_rank(),
                  config_error, "expert_maps_to_json: layer ", l, " has a different shape from layer 0");
    nlohmann::json ranks = nlohmann::json::array();
    for (std::size_t r = 0; r < m.ranks(); ++r) {
      nlohmann::json slots = nlohmann::json::array();
      for (std::size_t s = 0; s < m.slots_per_rank(); ++s) slots.push_back(m.expert_at(r, s));
      ranks.push_back(std::move(slots));
    }
    out_layers.push_back(std::move(ranks));
  }
  doc["layers"] = std::move(out_layers);
  return doc;
}

namespace detail {
inline std::size_t json_size(const nlohmann::json& doc, const char* key) {
  if (!doc.contains(key) || !doc[key].is_number_unsigned())
    throw format_error(concat("expert map JSON: \"", key, "\" is missing or not a non-negative integer"), 0);
  return doc[key].get<std::size_t>();
}
} // namespace detail

//! Parses the document written by expert_maps_to_json, validating every map.
//! @throws locus::format_error naming the key, layer or rank that is malformed (offset() is the layer)
//! @throws locus::invalid_input_error from expert_map when a layer breaks a placement rule
inline std::vector<expert_map> expert_maps_from_json(const nlohmann::json& doc) {
  if (!doc.is_object() || doc.value("format", std::string{}) != "locus-expert-map")
    throw format_error("expert map JSON: \"format\" must be \"locus-expert-map\"", 0);
  if (doc.value("version", -1) != expert_map_json_version)
    throw format_error(detail::concat("expert map JSON: unsupported version ", doc.value("version", -1), " (expected ",
                                      expert_map_json_version, ")"),
                       0);
  const std::size_t experts = detail::json_size(doc, "experts");
  const std::size_t ranks = detail::json_size(doc, "ranks");
  const std::size_t slots = detail::json_size(doc, "slots_per_rank");
  if (!doc.contains("layers") || !doc["layers"].is_array() || doc["layers"].empty())
    throw format_error("expert map JSON: \"layers\" must be a non-empty array", 0);
  std::vector<expert_map> out;
  const auto& layers = doc["layers"];
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& layer = layers[l];
    if (!layer.is_array() || layer.size() != ranks)
      throw format_error(detail::concat("expert map JSON: layer ", l, " must list ", ranks, " ranks"), l);
    std::vector<expert_id> table;
    table.reserve(ranks * slots);
    for (std::size_t r = 0; r < ranks; ++r) {
      const auto& row = layer[r];
      if (!row.is_array() || row.size() != slots)
        throw format_error(detail::concat("expert map JSON: layer ", l, " rank ", r, " must list ", slots, " slots"), l);
      for (const auto& cell : row) {
        if (!cell.is_number_integer())
          throw format_error(detail::concat("expert map JSON: layer ", l, " rank ", r, " has a non-integer slot"), l);
        table.push_back(cell.get<expert_id>());
      }
    }
    try {
      out.emplace_back(experts, ranks, slots, std::move(table));
    } catch (const invalid_input_error& e) {
      throw invalid_input_error(detail::concat("layer ", l, ": ", e.message()), __FILE__, __LINE__);
    }
  }
  return out;
}

//! A saved plan: the maps and, when known, the model's layer numbering.
struct expert_plan_file {
  std::vector<expert_map> maps;
  std::vector<std::size_t> model_layers; //!< hidden-layer index of each map; empty when not saved
  std::size_t hidden_layers = 0;         //!< the model's hidden layers; 0 when not saved
};

//! Writes per-layer maps (and the model layer of each, when given) to a JSON file, atomically.
//! @throws locus::io_error when the file cannot be written
//! @throws locus::config_error when `model_layers` does not have one ascending id per map
inline void save_expert_maps(const std::string& path, const std::vector<expert_map>& layers,
                             const std::vector<std::size_t>& model_layers = {}, std::size_t hidden_layers = 0) {
  auto doc = expert_maps_to_json(layers);
  if (!model_layers.empty()) {
    LOCUS_REQUIRE(model_layers.size() == layers.size(), config_error, "save_expert_maps: ", model_layers.size(),
                  " model layer ids for ", layers.size(), " maps");
    for (std::size_t l = 1; l < model_layers.size(); ++l)
      LOCUS_REQUIRE(model_layers[l] > model_layers[l - 1], config_error,
                    "save_expert_maps: model layer ids must ascend");
    doc["model_layers"] = model_layers;
  }
  if (hidden_layers > 0) doc["hidden_layers"] = hidden_layers;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream os(tmp);
    if (!os) LOCUS_THROW(io_error, "cannot open ", tmp, " for writing");
    os << doc.dump(1) << '\n';
    if (!os.flush()) LOCUS_THROW(io_error, "writing ", tmp, " failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) LOCUS_THROW(io_error, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

//! Reads a saved plan: the maps and the model layer numbering when the file has it.
//! @throws locus::io_error, locus::format_error (with the file name), locus::invalid_input_error
inline expert_plan_file load_expert_plan(const std::string& path) {
  std::ifstream is(path);
  if (!is) LOCUS_THROW(io_error, "cannot open ", path);
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(is);
  } catch (const nlohmann::json::parse_error& e) {
    throw format_error(detail::concat(path, ": not valid JSON: ", e.what()), e.byte);
  }
  expert_plan_file out;
  try {
    out.maps = expert_maps_from_json(doc);
    if (doc.contains("model_layers")) {
      if (!doc["model_layers"].is_array() || doc["model_layers"].size() != out.maps.size())
        throw format_error("expert map JSON: \"model_layers\" must list one layer id per layer", 0);
      for (const auto& id : doc["model_layers"]) {
        if (!id.is_number_unsigned() ||
            (!out.model_layers.empty() && id.get<std::size_t>() <= out.model_layers.back()))
          throw format_error("expert map JSON: \"model_layers\" must be ascending non-negative integers", 0);
        out.model_layers.push_back(id.get<std::size_t>());
      }
    }
    if (doc.contains("hidden_layers")) out.hidden_layers = detail::json_size(doc, "hidden_layers");
  } catch (const format_error& e) {
    throw format_error(detail::concat(path, ": ", e.message()), e.offset());
  }
  return out;
}

//! Reads per-layer maps from a JSON file (without the model layer numbering; see load_expert_plan).
//! @throws locus::io_error, locus::format_error (with the file name), locus::invalid_input_error
inline std::vector<expert_map> load_expert_maps(const std::string& path) { return load_expert_plan(path).maps; }

} // namespace locus::LOCUS_ABI_NAMESPACE
