#pragma once
// locus-requires: json
//! @file
//! Expert loads recorded by serving engines, read as the `[layers][experts]` table that the
//! load-driven planners (linear, round_robin, eplb) take:
//!   - a NumPy `.npy` file: `[layers, experts]` loads (any integer or float dtype; a row of zeros is
//!     a dense layer's, left out), or per-token routed experts `[tokens, layers, k]` (integers),
//!     which are counted (a dense layer's row, expert 0 for every choice, is left out);
//!   - a TensorRT-LLM expert-statistics folder: `meta_info.json` (num_experts) and
//!     `rank*.safetensors`, each tensor `"{iteration}_{layer}"` a vector of per-expert counts,
//!     summed over ranks and iterations (`rank*_raw.safetensors`, the raw dumps of each token's
//!     experts, are left out as TensorRT-LLM's reader leaves them). The model's layer index of each
//!     row is kept.
//! Only the little-endian dtypes NumPy and safetensors write on the usual machines are read;
//! anything else is refused with a message naming the file and what is wrong.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/json_error.hpp>
#include <locus/core/json_integer.hpp>
#include <locus/core/read_file.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! The TensorRT-LLM iterations a load sums: [begin, end) (the statistics cover a whole run; a
//! plan for today's traffic may want its recent iterations only).
struct iteration_window {
  std::uint64_t begin = 0;
  std::uint64_t end = std::numeric_limits<std::uint64_t>::max();
  bool all() const noexcept { return begin == 0 && end == std::numeric_limits<std::uint64_t>::max(); }
  //! "iterations 100 to 199", "iterations from 100 on", as a message says it.
  std::string text() const {
    return end == std::numeric_limits<std::uint64_t>::max()
               ? ::locus::detail::concat("iterations from ", begin, " on")
               : ::locus::detail::concat("iterations ", begin, " to ", end - 1);
  }
};

//! Routed experts of a top-1 model (`[tokens, layers, 1]`): a row that chose expert 0 for at least
//! this many tokens is a dense layer's, which engines fill with expert 0 (fewer: kept, a router's).
inline constexpr std::size_t dense_top1_tokens = 16;

//! Loads with the model layer index of each row.
struct imported_load {
  std::vector<std::size_t> layer_ids;    //!< model layer of each row (0..L-1 when the file does not say)
  std::vector<std::vector<double>> load; //!< `[layers][experts]`
  //! Whether the file names the layers (TensorRT-LLM statistics by their tensors' names, a routed-
  //! experts array by its rows' places among every hidden layer's); else layer_ids is 0..L-1.
  bool layers_named = false;
  //! The model's hidden layers where the file says (a routed-experts array has a row per hidden
  //! layer, dense ones included); 0 where it does not.
  std::size_t hidden_layers = 0;
};

namespace detail::load_import {

//! The file at `path`; where its first bytes fail `looks_right`, only those (the caller's format
//! check refuses them).
template <class LooksRight = bool (*)(std::string_view)>
std::string read_all(
    const std::string& path, LooksRight looks_right = [](std::string_view) { return true; }) {
  // Engine statistics can be large (steps × layers × experts): the cap stops a device, the
  // caller's look at the first bytes a file of another kind.
  return ::locus::detail::read_whole_file(path, std::size_t{1} << 34, "a load table", looks_right);
}

//! One little-endian element of `dtype` (NumPy's "<i4" style, or safetensors' "I32" style,
//! normalised by the callers to NumPy's) at `p`, as a double.
inline double element(const std::string& dtype, const char* p) {
  auto get = [p](auto v) {
    std::memcpy(&v, p, sizeof v);
    return static_cast<double>(v);
  };
  if (dtype == "<i4") return get(std::int32_t{});
  if (dtype == "<i8") return get(std::int64_t{});
  if (dtype == "<u4") return get(std::uint32_t{});
  if (dtype == "<u8") return get(std::uint64_t{});
  if (dtype == "<i2") return get(std::int16_t{});
  if (dtype == "<u2") return get(std::uint16_t{});
  if (dtype == "|u1" || dtype == "<u1") return get(std::uint8_t{});
  if (dtype == "|i1" || dtype == "<i1") return get(std::int8_t{});
  if (dtype == "<f4") return get(float{});
  if (dtype == "<f8") return get(double{});
  return std::nan("");
}

//! The bytes of one element of `dtype`, 0 for a dtype `element` does not read (so a descr such
//! as "<i4x" is refused, not read as NaNs).
inline std::size_t element_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {{"<i1", 1}, {"|i1", 1}, {"<u1", 1}, {"|u1", 1},
                                                           {"<i2", 2}, {"<u2", 2}, {"<i4", 4}, {"<u4", 4},
                                                           {"<f4", 4}, {"<i8", 8}, {"<u8", 8}, {"<f8", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

//! An array: shape and values as doubles.
struct array {
  std::vector<std::size_t> shape;
  std::vector<double> values;
};

//! A `.npy` file (format versions 1-3, C order, little-endian numeric dtypes).
inline array read_npy(const std::string& path) {
  const std::string data = read_all(path, [](std::string_view first) { return first.starts_with("\x93NUMPY"); });
  ::locus::detail::format_require(data.size() >= 10 && data.compare(0, 6, "\x93NUMPY") == 0, path,
                                  ": not a NumPy .npy file");
  const int major = static_cast<unsigned char>(data[6]);
  ::locus::detail::format_require(major >= 1 && major <= 3, path, ": unsupported .npy version ", major);
  std::size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len =
        static_cast<unsigned char>(data[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(data[9])) << 8);
    start = 10;
  } else {
    ::locus::detail::format_require(data.size() >= 12, path, ": truncated .npy header");
    for (int i = 3; i >= 0; --i)
      header_len = (header_len << 8) | static_cast<unsigned char>(data[8 + i]);
    start = 12;
  }
  ::locus::detail::format_require(start + header_len <= data.size(), path,
                                  ": .npy header runs past the end of the file");
  const std::string header = data.substr(start, header_len);
  // The header is a Python dict literal: {'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }
  auto value_after = [&](const std::string& key) {
    const auto k = header.find("'" + key + "'");
    ::locus::detail::format_require(k != std::string::npos, path, ": .npy header has no '", key, "'");
    const auto colon = header.find(':', k);
    ::locus::detail::format_require(colon != std::string::npos, path, ": malformed .npy header");
    return colon + 1;
  };
  std::size_t d = header.find('\'', value_after("descr"));
  const std::size_t d_end = d == std::string::npos ? d : header.find('\'', d + 1);
  ::locus::detail::format_require(d_end != std::string::npos, path, ": malformed descr in the .npy header");
  const std::string dtype = header.substr(d + 1, d_end - d - 1);
  const std::size_t esize = element_size(dtype);
  ::locus::detail::format_require(esize > 0, path, ": dtype ", dtype,
                                  " is not one locus reads: little-endian integers (<i1 .. <i8, <u1 .. <u8) or "
                                  "floats (<f4, <f8)");
  // (A header that ends after the colon has no value: find_first_not_of gives npos, which compare
  // would throw std::out_of_range for.)
  const std::size_t f = header.find_first_not_of(' ', value_after("fortran_order"));
  ::locus::detail::format_require(f != std::string::npos && header.compare(f, 5, "False") == 0, path,
                                  ": Fortran-ordered arrays are not read (save with np.ascontiguousarray)");
  const std::size_t s = header.find('(', value_after("shape"));
  const std::size_t s_end = s == std::string::npos ? s : header.find(')', s);
  ::locus::detail::format_require(s_end != std::string::npos, path, ": malformed shape in the .npy header");
  array out;
  std::size_t count = 1;
  for (std::size_t i = s + 1; i < s_end;) {
    while (i < s_end && (header[i] == ' ' || header[i] == ','))
      ++i;
    if (i >= s_end) break;
    ::locus::detail::format_require(header[i] >= '0' && header[i] <= '9', path, ": malformed shape in the .npy header");
    std::size_t v = 0;
    while (i < s_end && header[i] >= '0' && header[i] <= '9') {
      ::locus::detail::format_require(v < (std::size_t{1} << 40), path, ": an extent in the .npy shape is too large");
      v = v * 10 + static_cast<std::size_t>(header[i++] - '0');
    }
    out.shape.push_back(v);
    ::locus::detail::format_require(v == 0 || count <= (std::size_t{1} << 40) / v, path,
                                    ": the .npy array is too large");
    count *= v;
  }
  const std::size_t body = start + header_len;
  ::locus::detail::format_require(data.size() - body == count * esize, path, ": ", data.size() - body,
                                  " data bytes for ", count, " elements of ", esize, " bytes");
  out.values.resize(count);
  for (std::size_t i = 0; i < count; ++i)
    out.values[i] = element(dtype, data.data() + body + i * esize);
  return out;
}

//! The largest safetensors header read: the format's own limit (its reference reader refuses
//! larger ones), so no file makes the JSON parser build a tree many times its size.
inline constexpr std::uint64_t max_safetensors_header = 100'000'000;

//! Every tensor of a safetensors file (8-byte little-endian header size, JSON header, data).
//! As the format requires, tensor names are unique and the tensors' data offsets tile the data
//! exactly: a duplicate name (the JSON parser would keep the last silently) or bytes read by two
//! tensors (counted twice) is a format error, not a wrong sum.
inline std::map<std::string, array> read_safetensors(const std::string& path) {
  // A safetensors file opens with its JSON header's size (at least "{}").
  const std::string data = read_all(path, [](std::string_view first) {
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i)
      n = (n << 8) | static_cast<unsigned char>(first[static_cast<std::size_t>(i)]);
    return n >= 2 && n <= max_safetensors_header;
  });
  ::locus::detail::format_require(data.size() >= 8, path, ": too short for a safetensors header");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<unsigned char>(data[static_cast<std::size_t>(i)]);
  ::locus::detail::format_require(n <= max_safetensors_header, path, ": header of ", n, " bytes is larger than the ",
                                  max_safetensors_header, " the safetensors format allows");
  ::locus::detail::format_require(n <= data.size() - 8, path, ": header of ", n,
                                  " bytes runs past the end of the file");
  nlohmann::json header;
  std::set<std::string> seen; // top-level keys, to refuse a name given twice
  const nlohmann::json::parser_callback_t unique = [&](int depth, nlohmann::json::parse_event_t event,
                                                       nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key) {
      const auto& name = parsed.get_ref<const std::string&>();
      ::locus::detail::format_require(seen.insert(name).second, path, ": tensor ", name,
                                      " is named twice in the header");
    }
    return true;
  };
  try {
    header = nlohmann::json::parse(data.begin() + 8, data.begin() + 8 + static_cast<std::ptrdiff_t>(n), unique);
  } catch (const nlohmann::json::exception& e) {
    ::locus::detail::format_fail(path, ": header is not JSON: ", ::locus::detail::json_error_text(e));
  }
  ::locus::detail::format_require(header.is_object(), path, ": header is not a JSON object");
  const std::size_t body = 8 + n, body_size = data.size() - body;
  static const std::map<std::string, std::string> dtypes = {
      {"I8", "|i1"},  {"U8", "|u1"},  {"I16", "<i2"}, {"U16", "<u2"}, {"I32", "<i4"},
      {"U32", "<u4"}, {"I64", "<i8"}, {"U64", "<u8"}, {"F32", "<f4"}, {"F64", "<f8"}};
  std::map<std::string, array> out;
  struct extent {
    std::size_t begin, end;
    std::string name;
    bool operator<(const extent& o) const { return begin != o.begin ? begin < o.begin : end < o.end; }
  };
  std::vector<extent> extents;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      const auto dt = dtypes.find(info.at("dtype").get<std::string>());
      ::locus::detail::format_require(dt != dtypes.end(), path, ": tensor ", name, " has unsupported dtype ",
                                      info.at("dtype").get<std::string>());
      array a;
      const std::size_t esize = element_size(dt->second);
      // Integers only (a float or negative one is refused, not cast), and a shape whose element
      // count the file's bytes cannot hold is refused before it is multiplied out.
      // (Named copies: clang before 16 cannot capture structured bindings.)
      const nlohmann::json& tensor = info;
      const std::string& tensor_name = name;
      const auto integers = [&](const char* key, std::size_t max) {
        const auto& list = tensor.at(key);
        ::locus::detail::format_require(list.is_array(), path, ": tensor ", tensor_name, ": \"", key,
                                        "\" is not a list");
        std::vector<std::size_t> v;
        for (const auto& x : list) {
          const auto value = ::locus::detail::json_unsigned(x, max);
          ::locus::detail::format_require(value.has_value(), path, ": tensor ", tensor_name, ": \"", key, "\" holds ",
                                          ::locus::detail::json_excerpt(x), ", not an integer in [0, ", max, "]");
          v.push_back(static_cast<std::size_t>(*value));
        }
        return v;
      };
      a.shape = integers("shape", SIZE_MAX);
      const auto offsets = integers("data_offsets", body_size);
      std::size_t count = 1;
      for (const std::size_t x : a.shape) {
        ::locus::detail::format_require(x == 0 || count <= body_size / esize / x, path, ": tensor ", name,
                                        " has a shape larger than the file");
        count *= x;
      }
      ::locus::detail::format_require(offsets.size() == 2 && offsets[0] <= offsets[1] && offsets[1] <= body_size &&
                                          offsets[1] - offsets[0] == count * esize,
                                      path, ": tensor ", name,
                                      " has data offsets that do not fit its shape or the file");
      extents.push_back({offsets[0], offsets[1], name});
      a.values.resize(count);
      for (std::size_t i = 0; i < count; ++i)
        a.values[i] = element(dt->second, data.data() + body + offsets[0] + i * esize);
      out.emplace(name, std::move(a));
    } catch (const nlohmann::json::exception& e) {
      ::locus::detail::format_fail(path, ": tensor ", name, ": ", ::locus::detail::json_error_text(e));
    }
  }
  std::sort(extents.begin(), extents.end());
  std::size_t end = 0;
  for (const auto& x : extents) {
    ::locus::detail::format_require(x.begin >= end, path, ": tensor ", x.name, " (data bytes ", x.begin, " to ", x.end,
                                    ") overlaps the tensor before it");
    ::locus::detail::format_require(x.begin == end, path, ": data bytes ", end, " to ", x.begin,
                                    " belong to no tensor");
    end = x.end;
  }
  ::locus::detail::format_require(end == body_size, path, ": data bytes ", end, " to ", body_size,
                                  " belong to no tensor");
  return out;
}

//! The iteration and layer of a TensorRT-LLM statistics tensor named "ITERATION_LAYER": two
//! decimal numbers of at most 64 bits; nothing for any other name ("1__", "1_2_3", a number past
//! 64 bits), which must be refused, not read in part.
inline std::optional<std::pair<std::uint64_t, std::uint64_t>> iteration_layer(const std::string& key) {
  const auto sep = key.find('_');
  if (sep == std::string::npos) return std::nullopt;
  const auto number = [](const char* first, const char* last, std::uint64_t& v) {
    const auto [end, ec] = std::from_chars(first, last, v);
    return first != last && ec == std::errc{} && end == last;
  };
  std::pair<std::uint64_t, std::uint64_t> id;
  const char* p = key.data();
  if (!number(p, p + sep, id.first) || !number(p + sep + 1, p + key.size(), id.second)) return std::nullopt;
  return id;
}

} // namespace detail::load_import

//! Loads from a `.npy` file or a TensorRT-LLM statistics folder (see the file comment).
//! `experts`: the expert count for routed-expert arrays (0: the largest id + 1); a loads table or a
//! statistics folder names its own, and another count than that is refused (0: any). `iterations`:
//! for a statistics folder, the iterations summed (every tensor is checked, whatever its
//! iteration); a window that holds none of them is refused.
//! @throws locus::io_error, locus::format_error naming the file, locus::invalid_input_error on
//!         negative or non-finite values or ids out of range, locus::config_error for an empty
//!         window or a window with a .npy file
inline imported_load import_load(const std::string& path, std::size_t experts = 0, iteration_window iterations = {}) {
  LOCUS_REQUIRE(iterations.begin < iterations.end, config_error, "import_load: the iteration window [",
                iterations.begin, ", ", iterations.end, ") holds no iteration");
  imported_load out;
  // The non-throwing overloads: a name too long or a folder that cannot be searched is a locus
  // error naming the path (the throwing ones raise std::filesystem::filesystem_error); a path
  // that is no folder is read as a .npy, whose reader names what is wrong with it.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    const auto meta_path = (std::filesystem::path(path) / "meta_info.json").string();
    LOCUS_REQUIRE(std::filesystem::exists(meta_path, ec), invalid_input_error, path,
                  " is a folder without meta_info.json (not TensorRT-LLM expert statistics)");
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(detail::load_import::read_all(meta_path));
      const auto& n = meta.at("num_experts");
      const auto e = ::locus::detail::json_unsigned(n);
      ::locus::detail::format_require(e.has_value(), meta_path, ": \"num_experts\" is ",
                                      ::locus::detail::json_excerpt(n), ", not a non-negative integer");
      LOCUS_REQUIRE(experts == 0 || experts == *e, invalid_input_error, meta_path, ": statistics of ", *e,
                    " experts, not of the ", experts, " asked for");
      experts = static_cast<std::size_t>(*e);
    } catch (const nlohmann::json::exception& e) {
      ::locus::detail::format_fail(meta_path, ": ", ::locus::detail::json_error_text(e));
    }
    // Sorted, so that sums of floats and the first error named do not depend on the folder's order.
    std::vector<std::filesystem::path> files;
    for (std::filesystem::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec)) {
      const auto& p = it->path();
      const std::string name = p.filename().string();
      // rankN_raw.safetensors, written beside the counts when raw dumps are on, holds each token's
      // selected experts, not counts: TensorRT-LLM's own reader leaves it out too.
      if (name.starts_with("rank") && name.ends_with(".safetensors") && !name.ends_with("_raw.safetensors"))
        files.push_back(p);
    }
    LOCUS_REQUIRE(!ec, io_error, path, ": cannot list the folder: ", ec.message());
    std::sort(files.begin(), files.end());
    std::map<std::size_t, std::vector<double>> rows;
    // The layers each file records (any iteration): every rank records every MoE layer, so a file
    // that lacks one another has is damaged or from another run, and its sum would be partial.
    // So within the window: a file that stops before it (a rank that failed, a copy cut short) or
    // starts after it would leave its rank out of the window's sum.
    std::set<std::uint64_t> first_layers, first_summed;
    std::string first_file;
    for (const auto& file : files) {
      const std::string where = file.string();
      std::set<std::uint64_t> layers_here;
      std::set<std::uint64_t> summed_here; // the layers with a tensor in the window
      // One tensor per iteration and layer in a file: "1_3" and "01_3" would count it twice.
      std::map<std::pair<std::uint64_t, std::uint64_t>, std::string> seen;
      for (const auto& [key, a] : detail::load_import::read_safetensors(where)) {
        const auto id = detail::load_import::iteration_layer(key);
        ::locus::detail::format_require(id.has_value(), where, ": tensor name \"", key,
                                        "\" is not ITERATION_LAYER (two decimal numbers)");
        const auto [other, fresh] = seen.emplace(*id, key);
        ::locus::detail::format_require(fresh, where, ": tensors ", other->second, " and ", key,
                                        " both hold iteration ", id->first, " of layer ", id->second);
        ::locus::detail::format_require(a.shape.size() == 1 && a.shape[0] == experts, where, ": ", key, " holds ",
                                        a.values.size(), " values in ", a.shape.size(),
                                        " dimensions, not a list of one count per each of ", experts, " experts");
        ::locus::detail::format_require(id->second < max_hidden_layers, where, ": tensor ", key, " is of layer ",
                                        id->second, ", past the ", max_hidden_layers,
                                        " hidden layers a model has at most");
        layers_here.insert(id->second);
        if (!iterations.all() && (id->first < iterations.begin || id->first >= iterations.end))
          continue; // checked, not summed
        summed_here.insert(id->second);
        auto& row = rows.try_emplace(static_cast<std::size_t>(id->second), experts, 0.0).first->second;
        for (std::size_t e = 0; e < experts; ++e)
          row[e] += a.values[e];
      }
      if (first_file.empty()) {
        first_file = where;
        first_layers = std::move(layers_here);
        first_summed = std::move(summed_here);
        continue;
      }
      if (layers_here != first_layers) {
        std::vector<std::uint64_t> odd; // the layers one of the two files has and the other lacks
        std::set_symmetric_difference(first_layers.begin(), first_layers.end(), layers_here.begin(), layers_here.end(),
                                      std::back_inserter(odd));
        const bool first_has = first_layers.contains(odd.front());
        LOCUS_THROW(invalid_input_error, first_has ? where : first_file, " has no statistics of layer ", odd.front(),
                    ", which ", first_has ? first_file : where,
                    " has: the ranks' files are from different runs or damaged");
      }
      if (summed_here != first_summed) {
        std::vector<std::uint64_t> odd;
        std::set_symmetric_difference(first_summed.begin(), first_summed.end(), summed_here.begin(), summed_here.end(),
                                      std::back_inserter(odd));
        const bool first_has = first_summed.contains(odd.front());
        LOCUS_THROW(invalid_input_error, first_has ? where : first_file, " has no statistics of layer ", odd.front(),
                    " in ", iterations.text(), ", which ", first_has ? first_file : where,
                    " has: a rank's file stops before the window or starts after it, and its sum would be missing");
      }
    }
    LOCUS_REQUIRE(!files.empty(), invalid_input_error, path, " has no rank*.safetensors files");
    LOCUS_REQUIRE(!rows.empty() || iterations.all(), invalid_input_error, path, ": no statistics of ",
                  iterations.text());
    // A window that holds none of a layer's tensors would drop the layer from the plan.
    for (const auto l : first_layers)
      LOCUS_REQUIRE(rows.contains(static_cast<std::size_t>(l)), invalid_input_error, path, ": layer ", l,
                    " has no statistics of ", iterations.text(), " (it has in other iterations)");
    for (auto& [layer, row] : rows) {
      out.layer_ids.push_back(layer);
      out.load.push_back(std::move(row));
    }
    out.layers_named = true;
  } else {
    LOCUS_REQUIRE(iterations.all(), config_error, path,
                  ": an iteration window applies to TensorRT-LLM statistics folders, not to a .npy file");
    const auto a = detail::load_import::read_npy(path);
    // An empty array has no loads, and its other extents (up to 2^40 each) are paid for by no byte
    // of the file: refused before they size anything.
    LOCUS_REQUIRE(!a.values.empty(), invalid_input_error, path, ": no loads in the file (an empty array)");
    if (a.shape.size() == 2) {
      LOCUS_REQUIRE(experts == 0 || experts == a.shape[1], invalid_input_error, path, ": [layers, experts] loads of ",
                    a.shape[1], " experts, not of the ", experts, " asked for");
      // A row with no load at all is a dense layer's (SGLang's logical counts summed over steps have
      // a row per hidden layer): left out, the others keep their indices as model layer ids.
      const std::size_t layers = a.shape[0], width = a.shape[1];
      for (std::size_t l = 0; l < layers; ++l) {
        const auto row = a.values.begin() + static_cast<std::ptrdiff_t>(l * width);
        if (std::all_of(row, row + static_cast<std::ptrdiff_t>(width), [](double v) { return v == 0; })) continue;
        out.load.emplace_back(row, row + static_cast<std::ptrdiff_t>(width));
        out.layer_ids.push_back(l);
      }
      LOCUS_REQUIRE(!out.load.empty(), invalid_input_error, path, ": every layer's loads are zero: no MoE layer in ",
                    "the array");
      if (out.load.size() < layers) {
        out.layers_named = true;
        out.hidden_layers = layers;
      } else {
        out.layer_ids.clear(); // no row left out: numbered 0..L-1 below, as before, not named
      }
    } else {
      LOCUS_REQUIRE(a.shape.size() == 3, invalid_input_error, path, ": expected [layers, experts] loads or [tokens, ",
                    "layers, k] routed experts, not a ", a.shape.size(), "-dimensional array");
      double largest = -1;
      for (const double v : a.values) {
        LOCUS_REQUIRE(v >= 0 && v == std::floor(v) && v < 65536, invalid_input_error, path, ": routed expert id ", v,
                      " is not an expert id");
        largest = std::max(largest, v);
      }
      if (experts == 0) experts = static_cast<std::size_t>(largest) + 1;
      LOCUS_REQUIRE(largest < static_cast<double>(experts), invalid_input_error, path, ": routed expert id ", largest,
                    " is out of range for ", experts, " experts");
      const std::size_t tokens = a.shape[0], layers = a.shape[1], k = a.shape[2];
      out.load.assign(layers, std::vector<double>(experts, 0.0));
      for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t l = 0; l < layers; ++l)
          for (std::size_t j = 0; j < k; ++j)
            out.load[l][static_cast<std::size_t>(a.values[(t * layers + l) * k + j])] += 1;
      // Engines (vLLM, SGLang) return a row for every hidden layer and leave a dense layer's at
      // expert 0 for every choice: with k >= 2 no router chooses one expert twice, so such a row is
      // a dense layer's and is left out (its index is not among layer_ids). A top-1 router may choose
      // expert 0 for every one of a few tokens, not for dense_top1_tokens of them.
      std::vector<std::vector<double>> moe;
      for (std::size_t l = 0; l < layers; ++l) {
        if ((k >= 2 || tokens >= dense_top1_tokens) && tokens > 0 && out.load[l][0] == static_cast<double>(tokens * k))
          continue;
        moe.push_back(std::move(out.load[l]));
        out.layer_ids.push_back(l);
      }
      LOCUS_REQUIRE(!moe.empty(), invalid_input_error, path, ": every layer routes every token to expert 0 ", k,
                    " times (dense layers' rows): no MoE layer in the array");
      out.load = std::move(moe);
      out.layers_named = true;
      out.hidden_layers = layers;
    }
    if (out.layer_ids.empty())
      for (std::size_t l = 0; l < out.load.size(); ++l)
        out.layer_ids.push_back(l);
  }
  LOCUS_REQUIRE(!out.load.empty() && !out.load.front().empty(), invalid_input_error, path, ": no loads in the file");
  for (std::size_t l = 0; l < out.load.size(); ++l) {
    double total = 0;
    for (std::size_t e = 0; e < out.load[l].size(); ++e) {
      // Named by the file's own row (rows of zeros were left out before).
      LOCUS_REQUIRE(std::isfinite(out.load[l][e]) && out.load[l][e] >= 0, invalid_input_error, path, ": layer ",
                    out.layer_ids[l], " expert ", e, " has load ", out.load[l][e],
                    " (must be finite and non-negative)");
      total += out.load[l][e];
    }
    // Planners add loads up: a layer whose sum is not a number would reach them as "load inf".
    LOCUS_REQUIRE(std::isfinite(total), invalid_input_error, path, ": the loads of layer ", out.layer_ids[l],
                  " add up past the largest double; scale them down");
  }
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
