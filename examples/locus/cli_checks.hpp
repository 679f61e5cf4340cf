#pragma once
// Command-line value checks that say what is wrong in plain words. CLI11's own PositiveNumber
// and NonNegativeNumber print the 309-digit largest double as the bound, let NaN through, and
// call infinity negative.
#include <CLI/CLI.hpp>
#include <cmath>
#include <string>

namespace locus_driver {

//! A whole number >= 1 written in decimal digits ("1e9" and "-1" are refused as such).
inline CLI::Validator positive_whole() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos)
          return "\"" + s + "\" is not a whole number (decimal digits only)";
        if (s.find_first_not_of('0') == std::string::npos) return "0 is not allowed: expected at least 1";
        return {};
      },
      "WHOLE >= 1");
}

//! A finite number >= 0.
inline CLI::Validator finite_non_negative() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return "\"" + s + "\" is not a number";
        if (!std::isfinite(v) || v < 0) return "\"" + s + "\" is not a finite number >= 0";
        return {};
      },
      "FINITE >= 0");
}

} // namespace locus_driver
