#pragma once
// locus-requires: json
//! @file
//! The words of a JSON library error for a locus message: nlohmann's text without its exception
//! tag ("[json.exception.parse_error.101] "), which names nothing a user can act on; and a short
//! excerpt of a bad value.

#include <cstddef>
#include <locus/core/config.hpp>
#include <nlohmann/json.hpp>
#include <string>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail {

//! `e.what()` without its leading "[json.exception.<kind>.<id>] " tag.
inline std::string json_error_text(const nlohmann::json::exception& e) {
  std::string text = e.what();
  if (text.rfind("[json.exception.", 0) == 0)
    if (const std::size_t end = text.find("] "); end != std::string::npos) text.erase(0, end + 2);
  return text;
}

namespace json_excerpt_detail {
// Every level writes a character before it descends, so the recursion is at most `max` deep.
inline void append(const nlohmann::json& v, std::string& out, std::size_t max) {
  if (out.size() >= max) return;
  if (v.is_array() || v.is_object()) {
    out += v.is_array() ? '[' : '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end() && out.size() < max; ++it) {
      if (!first) out += ',';
      first = false;
      if (v.is_object()) out += nlohmann::json(it.key()).dump() + ':';
      append(*it, out, max);
    }
    out += v.is_array() ? ']' : '}';
  } else {
    out += v.dump();
  }
}
} // namespace json_excerpt_detail

//! The first `max` characters of `v.dump()`, for a message naming a bad value. `dump` recurses
//! once per level of nesting: a value nested a few ten thousand deep (a small file) would overflow
//! the stack while the error is being written.
inline std::string json_excerpt(const nlohmann::json& v, std::size_t max = 40) {
  std::string out;
  json_excerpt_detail::append(v, out, max);
  return out.substr(0, max);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail
