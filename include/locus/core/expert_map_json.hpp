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
//! model's layer numbering, which engine exports use; see placement/engine_export.hpp), and
//! "gpus_per_node": G (the topology the plan was made for: ranks / G nodes of G GPUs; a locality
//! plan is only right on that topology).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/json_error.hpp>
#include <locus/core/json_integer.hpp>
#include <locus/core/read_file.hpp>
#include <nlohmann/json.hpp>
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
      for (std::size_t s = 0; s < m.slots_per_rank(); ++s)
        slots.push_back(m.expert_at(r, s));
      ranks.push_back(std::move(slots));
    }
    out_layers.push_back(std::move(ranks));
  }
  doc["layers"] = std::move(out_layers);
  return doc;
}

namespace detail {
//! Largest expert, rank or slot count a map file may declare (expert_map's ids are 32-bit).
inline constexpr std::uint64_t max_json_map_size = 0x7fffffff;

inline std::size_t json_size(const nlohmann::json& doc, const char* key) {
  const auto it = doc.find(key);
  if (it == doc.end()) throw format_error(concat("expert map JSON: \"", key, "\" is missing"), 0);
  if (!it->is_number_integer())
    // null's excerpt is its type name: said once.
    throw format_error(concat("expert map JSON: \"", key, "\" is ", it->type_name(),
                              it->is_null() ? std::string() : " " + json_excerpt(*it), ", expected a positive integer"),
                       0);
  const auto n = json_unsigned(*it, max_json_map_size);
  if (!n || *n < 1)
    throw format_error(concat("expert map JSON: \"", key, "\" is ", it->dump(), ", expected 1..", max_json_map_size),
                       0);
  return static_cast<std::size_t>(*n);
}

inline std::vector<expert_map> expert_maps_from_json_unchecked(const nlohmann::json& doc) {
  if (!doc.is_object()) throw format_error("expert map JSON: the document is not an object", 0);
  const auto fmt = doc.find("format");
  if (fmt == doc.end() || !fmt->is_string() || fmt->get_ref<const std::string&>() != "locus-expert-map")
    throw format_error(concat("expert map JSON: \"format\" is ",
                              fmt == doc.end() ? std::string("missing") : json_excerpt(*fmt),
                              ", expected \"locus-expert-map\""),
                       0);
  const auto ver = doc.find("version");
  if (ver == doc.end()) throw format_error("expert map JSON: \"version\" is missing", 0);
  if (!ver->is_number_integer() || ver->get<std::int64_t>() != expert_map_json_version)
    throw format_error(concat("expert map JSON: unsupported version ", json_excerpt(*ver), " (expected ",
                              expert_map_json_version, ")"),
                       0);
  const std::size_t experts = json_size(doc, "experts");
  const std::size_t ranks = json_size(doc, "ranks");
  const std::size_t slots = json_size(doc, "slots_per_rank");
  const auto layers_it = doc.find("layers");
  if (layers_it == doc.end() || !layers_it->is_array() || layers_it->empty())
    throw format_error("expert map JSON: \"layers\" must be a non-empty array", 0);
  std::vector<expert_map> out;
  const auto& layers = *layers_it;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& layer = layers[l];
    if (!layer.is_array() || layer.size() != ranks)
      throw format_error(concat("expert map JSON: layer ", l, " must list ", ranks, " ranks"), l);
    // Sizes are checked against what the document holds before anything is reserved, so a huge
    // declared count cannot make an allocation the file did not pay for.
    std::vector<expert_id> table;
    for (std::size_t r = 0; r < ranks; ++r) {
      const auto& row = layer[r];
      if (!row.is_array() || row.size() != slots)
        throw format_error(concat("expert map JSON: layer ", l, " rank ", r, " must list ", slots, " slots"), l);
      if (r == 0) table.reserve(ranks * slots); // both now bounded by the document's own size
      for (std::size_t s = 0; s < slots; ++s) {
        const auto& cell = row[s];
        // A number that is not an integer is named by its value ("is number" read as if it were one):
        // 1.5 is no whole number; 11.0 is one, written as a float.
        if (!cell.is_number_integer()) {
          std::string what = cell.type_name();
          if (cell.is_number_float()) {
            const double v = cell.get<double>();
            what = cell.dump() + (std::isfinite(v) && v == std::floor(v) ? ", a float (ids are written as integers)"
                                                                         : ", not a whole number");
          }
          throw format_error(concat("expert map JSON: layer ", l, " rank ", r, " slot ", s, " is ", what,
                                    ", expected an expert id or -1"),
                             l);
        }
        // Range-checked as 64-bit: an id of 2^32 must not become expert 0 on the way to 32 bits.
        const bool negative = cell.is_number_integer() && !cell.is_number_unsigned() && cell.get<std::int64_t>() < 0;
        const std::int64_t v =
            negative
                ? cell.get<std::int64_t>()
                : static_cast<std::int64_t>(std::min<std::uint64_t>(cell.get<std::uint64_t>(), std::uint64_t{1} << 62));
        if (v < -1 || v >= static_cast<std::int64_t>(experts))
          throw format_error(concat("expert map JSON: layer ", l, " rank ", r, " slot ", s, " holds expert ",
                                    cell.dump(), ", expected -1 (empty) or 0..", experts - 1),
                             l);
        table.push_back(static_cast<expert_id>(v));
      }
    }
    try {
      out.emplace_back(experts, ranks, slots, std::move(table));
    } catch (const invalid_input_error& e) {
      throw invalid_input_error(concat("layer ", l, ": ", e.message()), __FILE__, __LINE__);
    }
  }
  return out;
}
} // namespace detail

//! Parses the document written by expert_maps_to_json, validating every map. No exception of the
//! JSON library escapes: a value of the wrong type is a format_error like any other.
//! @throws locus::format_error naming the key, layer or rank that is malformed (offset() is the layer)
//! @throws locus::invalid_input_error from expert_map when a layer breaks a placement rule
//! @throws locus::config_error when the sizes cannot form a map
inline std::vector<expert_map> expert_maps_from_json(const nlohmann::json& doc) {
  try {
    return detail::expert_maps_from_json_unchecked(doc);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(detail::concat("expert map JSON: ", detail::json_error_text(e)), 0, __FILE__, __LINE__);
  }
}

//! A saved plan: the maps and, when known, the model's layer numbering.
struct expert_plan_file {
  std::vector<expert_map> maps;
  std::vector<std::size_t> model_layers; //!< hidden-layer index of each map; empty when not saved
  std::size_t hidden_layers = 0;         //!< the model's hidden layers; 0 when not saved
  std::size_t gpus_per_node = 0;         //!< GPUs per node of the plan's topology; 0 when not saved
};

//! A plan (its maps, and what else it knows) as the JSON document save_expert_plan writes.
//! @throws locus::config_error when `model_layers` does not have one ascending id per map, or its
//!         last is not below `hidden_layers` (where given) and max_hidden_layers, or gpus_per_node
//!         does not divide the ranks
inline nlohmann::json expert_plan_to_json(const expert_plan_file& plan) {
  auto doc = expert_maps_to_json(plan.maps);
  const auto& ids = plan.model_layers;
  if (!ids.empty()) {
    LOCUS_REQUIRE(ids.size() == plan.maps.size(), config_error, "expert plan: ", ids.size(), " model layer ids for ",
                  plan.maps.size(), " maps");
    for (std::size_t l = 1; l < ids.size(); ++l)
      LOCUS_REQUIRE(ids[l] > ids[l - 1], config_error, "expert plan: model layer ids must ascend");
    doc["model_layers"] = ids;
  }
  LOCUS_REQUIRE(plan.hidden_layers == 0 || ids.empty() || plan.hidden_layers > ids.back(), config_error,
                "expert plan: ", plan.hidden_layers, " hidden layers, but model layer ", ids.back(), " is a map's");
  LOCUS_REQUIRE(plan.hidden_layers <= max_hidden_layers && (ids.empty() || ids.back() < max_hidden_layers),
                config_error, "expert plan: model layers past the ", max_hidden_layers,
                " hidden layers a model has at most (what the plan reader refuses)");
  if (plan.hidden_layers > 0) doc["hidden_layers"] = plan.hidden_layers;
  if (plan.gpus_per_node > 0) {
    LOCUS_REQUIRE(plan.maps.front().ranks() % plan.gpus_per_node == 0, config_error,
                  "expert plan: ", plan.gpus_per_node, " GPUs per node do not divide ", plan.maps.front().ranks(),
                  " ranks");
    doc["gpus_per_node"] = plan.gpus_per_node;
  }
  return doc;
}

//! The text of a plan's file: expert_plan_to_json, one space of indent. @throws as expert_plan_to_json
inline std::string expert_plan_text(const expert_plan_file& plan) { return expert_plan_to_json(plan).dump(1) + '\n'; }

//! Writes a plan (its maps, and what else it knows) to a JSON file, atomically.
//! @throws locus::io_error when the file cannot be written
//! @throws locus::config_error as expert_plan_to_json
inline void save_expert_plan(const std::string& path, const expert_plan_file& plan) {
  write_file_atomically(path, expert_plan_text(plan));
}

//! Writes per-layer maps (and the model layer of each, when given) to a JSON file, atomically.
//! @throws as save_expert_plan
inline void save_expert_maps(const std::string& path, const std::vector<expert_map>& layers,
                             const std::vector<std::size_t>& model_layers = {}, std::size_t hidden_layers = 0) {
  save_expert_plan(path, {layers, model_layers, hidden_layers, 0});
}

//! Reads a saved plan: the maps and the model layer numbering when the file has it.
//! @throws locus::io_error, locus::format_error (with the file name), locus::invalid_input_error
inline expert_plan_file load_expert_plan(const std::string& path) {
  // A parsed JSON array of numbers costs about ten times its text; cap the text so that a file
  // which is not a map cannot ask for gigabytes (a real map is a few hundred kilobytes).
  const std::string text = detail::read_whole_file(path, std::size_t{64} << 20, "an expert map");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    const auto* pe = dynamic_cast<const nlohmann::json::parse_error*>(&e);
    const std::size_t at = pe ? pe->byte : 0;
    // A parse that ran off the end of the text means the file stops early.
    const bool at_end = pe && at >= text.size() && text.find_first_not_of(" \t\r\n") != std::string::npos;
    throw format_error(detail::concat(path, ": not valid JSON", at_end ? " (the file looks truncated)" : "", ": ",
                                      detail::json_error_text(e)),
                       at, __FILE__, __LINE__);
  }
  expert_plan_file out;
  try {
    out.maps = expert_maps_from_json(doc);
    if (doc.contains("model_layers")) {
      if (!doc["model_layers"].is_array() || doc["model_layers"].size() != out.maps.size())
        throw format_error("expert map JSON: \"model_layers\" must list one layer id per layer", 0);
      for (const auto& id : doc["model_layers"]) {
        if (!id.is_number_unsigned() || (!out.model_layers.empty() && id.get<std::size_t>() <= out.model_layers.back()))
          throw format_error("expert map JSON: \"model_layers\" must be ascending non-negative integers", 0);
        if (id.get<std::size_t>() >= max_hidden_layers)
          throw format_error(detail::concat("expert map JSON: \"model_layers\" names layer ", id.get<std::size_t>(),
                                            ", past the ", max_hidden_layers, " hidden layers a model has at most"),
                             0);
        out.model_layers.push_back(id.get<std::size_t>());
      }
    }
    if (doc.contains("hidden_layers")) out.hidden_layers = detail::json_size(doc, "hidden_layers");
    if (out.hidden_layers > max_hidden_layers)
      throw format_error(detail::concat("expert map JSON: \"hidden_layers\" is ", out.hidden_layers,
                                        ", expected at most ", max_hidden_layers),
                         0);
    // What map export would refuse only later: a model whose hidden layers end before its MoE layers.
    if (out.hidden_layers > 0 && !out.model_layers.empty() && out.hidden_layers <= out.model_layers.back())
      throw format_error(detail::concat("expert map JSON: \"hidden_layers\" is ", out.hidden_layers,
                                        ", but \"model_layers\" names hidden layer ", out.model_layers.back()),
                         0);
    if (doc.contains("gpus_per_node")) {
      out.gpus_per_node = detail::json_size(doc, "gpus_per_node");
      if (out.gpus_per_node == 0 || out.maps.front().ranks() % out.gpus_per_node != 0)
        throw format_error(detail::concat("expert map JSON: \"gpus_per_node\" ", out.gpus_per_node,
                                          " does not divide the ", out.maps.front().ranks(), " ranks"),
                           0);
    }
  } catch (const format_error& e) {
    throw format_error(detail::concat(path, ": ", e.message()), e.offset(), __FILE__, __LINE__);
  } catch (const invalid_input_error& e) { // a map that breaks an invariant: named with its file
    throw invalid_input_error(detail::concat(path, ": ", e.message()), __FILE__, __LINE__);
  }
  return out;
}

//! Reads per-layer maps from a JSON file (without the model layer numbering; see load_expert_plan).
//! @throws locus::io_error, locus::format_error (with the file name), locus::invalid_input_error
inline std::vector<expert_map> load_expert_maps(const std::string& path) { return load_expert_plan(path).maps; }

} // namespace locus::inline LOCUS_ABI_NAMESPACE
