#pragma once
// locus-requires: json
//! @file
//! The workload-aware grouping model (class means, classifier threshold, cluster → node map and
//! cluster usage) saved and loaded as versioned JSON, so that the grouping a plan was made with is
//! deployed with it instead of being fitted again. Needs nlohmann_json.
//!
//! Format (version 1): {"format": "locus-grouping", "version": 1, "layers", "experts", "nodes",
//! "clusters", "classifier_layer_stride", "min_similarity", "class_min_similarity": [k] (each
//! class's confidence threshold; a file without it, written before thresholds were per class,
//! loads with "min_similarity" for every class), "options": {...}, "cluster_node": [k],
//! "cluster_tokens": [k], "cluster_requests": [k], "usage": [k][layers × experts],
//! "means": [(layers × experts) × stride] (feature-major class means, clusters padded to 16)}.
//! Floats are written with enough digits to read back bit for bit, so a loaded model assigns every
//! request exactly as the saved one. The training bookkeeping (which training requests fell in
//! which cluster) is not saved.

#include <cmath>
#include <cstdint>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/core/json_error.hpp>
#include <locus/core/json_integer.hpp>
#include <locus/core/read_file.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

inline constexpr int grouping_json_version = 1;
//! The most nodes a grouping file may name (32,768 GPUs at 8 per node).
inline constexpr std::size_t max_grouping_nodes = 4096;

struct workload_model_io {
  // A non-negative integer of the file, at most `max` (core/json_integer.hpp); anything else is a
  // format error.
  static std::uint64_t integer(const nlohmann::json& v, const char* what, std::uint64_t max = SIZE_MAX) {
    const auto x = ::locus::detail::json_unsigned(v, max);
    if (!x)
      ::locus::detail::format_fail("grouping JSON: ", what, " is ", ::locus::detail::json_excerpt(v),
                                   max == SIZE_MAX
                                       ? ", expected a non-negative integer"
                                       : ::locus::detail::concat(", expected an integer in [0, ", max, "]"));
    return *x;
  }

  static nlohmann::json to_json(const workload_model& m) {
    const auto& o = m.opt_;
    return {{"format", "locus-grouping"},
            {"version", grouping_json_version},
            {"layers", m.layers_},
            {"experts", m.experts_},
            {"nodes", m.nodes_},
            {"clusters", m.k_},
            {"classifier_layer_stride", m.layer_stride_},
            {"min_similarity", m.min_similarity_},
            {"class_min_similarity", m.class_min_similarity_},
            {"options",
             {{"clusters", o.clusters},
              {"seed", o.seed},
              {"restarts", o.restarts},
              {"max_iterations", o.max_iterations},
              {"prefill_tokens", o.prefill_tokens},
              {"classifier_layers", o.classifier_layers},
              {"min_similarity", o.min_similarity},
              {"confidence_quantile", o.confidence_quantile},
              {"confidence_margin", o.confidence_margin},
              {"balance_slack", o.balance_slack}}},
            {"cluster_node", m.cluster_node_},
            {"cluster_tokens", m.cluster_tokens_},
            {"cluster_requests", m.cluster_requests_},
            {"usage", m.usage_},
            {"stride", m.stride_},
            {"means", m.means_t_}};
  }

  // The values a fitted model can hold, so that a damaged file is refused rather than changing what
  // the model classifies (a threshold of 1e39, read as inf, made no request confident) or sums
  // (negative usage or request counts): what fitting checks of its options, and every number finite
  // (a JSON number past a float's range reads as inf), counts and usage non-negative, and the
  // classifier's stride the one its layers and options give.
  static void check_values(const workload_model& m) {
    const auto& o = m.opt_;
    ::locus::detail::format_require(o.clusters >= 1 && o.prefill_tokens >= 1 && o.classifier_layers >= 1,
                                    "grouping JSON: options \"clusters\", \"prefill_tokens\" and "
                                    "\"classifier_layers\" must be at least 1");
    ::locus::detail::format_require(std::isfinite(o.min_similarity) && std::isfinite(o.confidence_quantile) &&
                                        std::isfinite(o.confidence_margin) && std::isfinite(o.balance_slack) &&
                                        o.balance_slack >= 0,
                                    "grouping JSON: options \"min_similarity\", \"confidence_quantile\", "
                                    "\"confidence_margin\" and \"balance_slack\" must be finite (the slack >= 0)");
    ::locus::detail::format_require(m.layer_stride_ == (m.layers_ + o.classifier_layers - 1) / o.classifier_layers,
                                    "grouping JSON: classifier_layer_stride ", m.layer_stride_, " is not what ",
                                    m.layers_, " layers read by ", o.classifier_layers, " classifier layers give");
    const auto finite = [](const auto& v, bool non_negative) {
      for (const auto x : v)
        if (!std::isfinite(x) || (non_negative && x < 0)) return false;
      return true;
    };
    ::locus::detail::format_require(std::isfinite(m.min_similarity_) && finite(m.class_min_similarity_, false),
                                    "grouping JSON: a confidence threshold is not a finite number");
    ::locus::detail::format_require(finite(m.cluster_tokens_, true) && finite(m.cluster_requests_, true),
                                    "grouping JSON: a cluster's token or request count is negative or not finite");
    for (std::size_t c = 0; c < m.k_; ++c)
      ::locus::detail::format_require(finite(m.usage_[c], true), "grouping JSON: cluster ", c,
                                      " usage holds a negative or non-finite value");
    ::locus::detail::format_require(finite(m.means_t_, false), "grouping JSON: a class mean is not a finite number");
  }

  static workload_model from_json(const nlohmann::json& doc) {
    workload_model m;
    try {
      ::locus::detail::format_require(doc.is_object() && doc.value("format", "") == "locus-grouping",
                                      "grouping JSON: \"format\" is not \"locus-grouping\"");
      const auto version = integer(doc.at("version"), "\"version\"");
      ::locus::detail::format_require(version == static_cast<std::uint64_t>(grouping_json_version),
                                      "grouping JSON: version ", version,
                                      " is not supported (this build reads version ", grouping_json_version, ")");
      m.layers_ = integer(doc.at("layers"), "\"layers\"");
      m.experts_ = integer(doc.at("experts"), "\"experts\"");
      m.nodes_ = integer(doc.at("nodes"), "\"nodes\"");
      m.k_ = integer(doc.at("clusters"), "\"clusters\"");
      m.layer_stride_ = integer(doc.at("classifier_layer_stride"), "\"classifier_layer_stride\"");
      m.min_similarity_ = doc.at("min_similarity").get<float>();
      // A file from before the per-class thresholds: every class takes the pooled one (filled
      // below, once the cluster count is known to be paid for by the file's arrays).
      const bool pooled = !doc.contains("class_min_similarity");
      if (!pooled) m.class_min_similarity_ = doc.at("class_min_similarity").get<std::vector<float>>();
      const auto& o = doc.at("options");
      m.opt_.clusters = integer(o.at("clusters"), "options \"clusters\"");
      m.opt_.seed = integer(o.at("seed"), "options \"seed\"");
      m.opt_.restarts = integer(o.at("restarts"), "options \"restarts\"");
      m.opt_.max_iterations = integer(o.at("max_iterations"), "options \"max_iterations\"");
      m.opt_.prefill_tokens = integer(o.at("prefill_tokens"), "options \"prefill_tokens\"");
      m.opt_.classifier_layers = integer(o.at("classifier_layers"), "options \"classifier_layers\"");
      m.opt_.min_similarity = o.at("min_similarity").get<double>();
      m.opt_.confidence_quantile = o.at("confidence_quantile").get<double>();
      m.opt_.confidence_margin = o.at("confidence_margin").get<double>();
      m.opt_.balance_slack = o.at("balance_slack").get<double>();
      const auto& nodes = doc.at("cluster_node");
      ::locus::detail::format_require(nodes.is_array(), "grouping JSON: \"cluster_node\" is not an array");
      m.cluster_node_.clear();
      for (const auto& n : nodes)
        m.cluster_node_.push_back(static_cast<std::uint32_t>(integer(n, "a cluster's node", UINT32_MAX)));
      m.cluster_tokens_ = doc.at("cluster_tokens").get<std::vector<double>>();
      m.cluster_requests_ = doc.at("cluster_requests").get<std::vector<double>>();
      m.usage_ = doc.at("usage").get<std::vector<std::vector<double>>>();
      m.stride_ = integer(doc.at("stride"), "\"stride\"");
      m.means_t_ = doc.at("means").get<std::vector<float>>();
      // At most one threshold per entry of "cluster_node": an unchecked "clusters" of 2^60 was an
      // allocation of 2^62 bytes (the checks below refuse any size other than the cluster count).
      if (pooled)
        m.class_min_similarity_.assign(std::min<std::uint64_t>(m.k_, m.cluster_node_.size()), m.min_similarity_);
    } catch (const nlohmann::json::exception& e) {
      ::locus::detail::format_fail("grouping JSON: ", ::locus::detail::json_error_text(e));
    }
    // Every size the classifier and node_load() index by, checked before any product of them is
    // formed (so none wraps), so a damaged file cannot make them read out of bounds or allocate
    // what it does not pay for.
    ::locus::detail::format_require(
        m.layers_ > 0 && m.experts_ > 0 && m.nodes_ > 0 && m.k_ > 0 && m.layer_stride_ > 0,
        "grouping JSON: layers, experts, nodes, clusters and the layer stride must be positive");
    ::locus::detail::format_require(m.layers_ <= trace::max_trace_layers && m.experts_ <= trace::max_trace_experts,
                                    "grouping JSON: ", m.layers_, " layers × ", m.experts_,
                                    " experts; a trace has at most ", trace::max_trace_layers, " × ",
                                    trace::max_trace_experts);
    // node_load() allocates layers × nodes × experts values, and no array of the file pays for the
    // nodes: a count beyond any deployment is a damaged file, not a plan to act on.
    ::locus::detail::format_require(m.nodes_ <= max_grouping_nodes, "grouping JSON: ", m.nodes_, " nodes; at most ",
                                    max_grouping_nodes, " are read");
    ::locus::detail::format_require(m.cluster_node_.size() == m.k_ && m.cluster_tokens_.size() == m.k_ &&
                                        m.cluster_requests_.size() == m.k_ && m.usage_.size() == m.k_ &&
                                        m.class_min_similarity_.size() == m.k_,
                                    "grouping JSON: the per-cluster arrays must have ", m.k_, " entries");
    ::locus::detail::format_require(m.stride_ == (m.k_ + 15) / 16 * 16, "grouping JSON: stride ", m.stride_,
                                    " is not the cluster count ", m.k_, " rounded up to a multiple of 16");
    const std::size_t dim = m.layers_ * m.experts_; // at most 2^28, and the stride at most k + 15
    ::locus::detail::format_require(m.means_t_.size() == dim * m.stride_, "grouping JSON: ", m.means_t_.size(),
                                    " class-mean values, expected ", dim * m.stride_);
    for (std::size_t c = 0; c < m.k_; ++c) {
      ::locus::detail::format_require(m.cluster_node_[c] < m.nodes_, "grouping JSON: cluster ", c, " is on node ",
                                      m.cluster_node_[c], " of ", m.nodes_);
      ::locus::detail::format_require(m.usage_[c].size() == dim, "grouping JSON: cluster ", c, " usage has ",
                                      m.usage_[c].size(), " values, expected ", dim);
    }
    check_values(m);
    return m;
  }
};

//! The model as a JSON document (see the file comment).
inline nlohmann::json grouping_to_json(const workload_model& m) { return workload_model_io::to_json(m); }
//! Parses a document written by grouping_to_json. @throws locus::format_error naming what is wrong
inline workload_model grouping_from_json(const nlohmann::json& doc) { return workload_model_io::from_json(doc); }

//! The text of a model's file (grouping_to_json).
inline std::string grouping_text(const workload_model& m) { return grouping_to_json(m).dump() + '\n'; }

//! Writes the model to `path` atomically. @throws locus::io_error
inline void save_grouping(const std::string& path, const workload_model& m) {
  ::locus::write_file_atomically(path, grouping_text(m));
}

//! Reads a model saved by save_grouping. @throws locus::io_error, locus::format_error (with the file name)
inline workload_model load_grouping(const std::string& path) {
  // A model is a few megabytes (usage per cluster, layer and expert); the cap keeps a device or a
  // wrong file from growing the text without bound.
  const std::string text = ::locus::detail::read_whole_file(path, std::size_t{256} << 20, "a grouping model");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw format_error(::locus::detail::concat(path, ": not valid JSON: ", ::locus::detail::json_error_text(e)),
                       e.byte);
  } catch (const nlohmann::json::exception& e) { // a number past a double's range (out_of_range.406)
    throw format_error(::locus::detail::concat(path, ": not valid JSON: ", ::locus::detail::json_error_text(e)), 0);
  }
  try {
    return grouping_from_json(doc);
  } catch (const format_error& e) {
    throw format_error(::locus::detail::concat(path, ": ", e.message()), e.offset());
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
