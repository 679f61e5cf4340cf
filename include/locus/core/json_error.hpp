#pragma once
// locus-requires: json
//! @file
//! The words of a JSON library error for a locus message: nlohmann's text without its exception
//! tag ("[json.exception.parse_error.101] "), which names nothing a user can act on.

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

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail
