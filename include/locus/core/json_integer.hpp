#pragma once
// locus-requires: json
//! @file
//! A non-negative integer read from a JSON value without undefined behaviour. nlohmann's
//! `get<unsigned type>()` converts a float such as -1.0 or 1e30 with a C++ cast, which is
//! undefined for values out of range, and wraps a negative integer; a file reader must refuse
//! both, so every count, size or id read from a file goes through here.

#include <cstdint>
#include <locus/core/config.hpp>
#include <nlohmann/json.hpp>
#include <optional>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail {

//! The value when it is an integer in [0, max]; std::nullopt for a float, a negative number, a
//! larger one, or anything that is not a number.
inline std::optional<std::uint64_t> json_unsigned(const nlohmann::json& v, std::uint64_t max = UINT64_MAX) {
  if (!v.is_number_integer()) return std::nullopt;
  if (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) return std::nullopt;
  const auto x = v.get<std::uint64_t>();
  if (x > max) return std::nullopt;
  return x;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail
