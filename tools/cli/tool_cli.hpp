#pragma once
// The command-line conventions of every locus program (the driver, the examples, the benchmarks,
// host or CUDA): options parsed by CLI11, unknown flags refused, every default shown in --help,
// and values checked in plain words. CLI11's own PositiveNumber and NonNegativeNumber print the
// 309-digit largest double as the bound, let NaN through and call infinity negative.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <string>

namespace tool_cli {

// Every option of `app` shows its default in --help. CLI11 already refuses unknown options and
// values that do not parse.
inline void show_defaults(CLI::App& app) { app.option_defaults()->always_capture_default(); }

// A finite number above zero.
inline const CLI::Validator positive{[](std::string& value) -> std::string {
                                       double x = 0;
                                       if (CLI::detail::lexical_cast(value, x) && std::isfinite(x) && x > 0) return {};
                                       return "must be a number above 0, got " + value;
                                     },
                                     "POSITIVE"};

// A whole number >= 1 written in decimal digits ("1e9" and "-1" are refused as such).
inline const CLI::Validator positive_whole{[](std::string& value) -> std::string {
                                             if (value.empty() ||
                                                 value.find_first_not_of("0123456789") != std::string::npos)
                                               return "\"" + value + "\" is not a whole number (decimal digits only)";
                                             if (value.find_first_not_of('0') == std::string::npos)
                                               return "0 is not allowed: expected at least 1";
                                             return {};
                                           },
                                           "WHOLE >= 1"};

// A finite number >= 0.
inline const CLI::Validator finite_non_negative{[](std::string& value) -> std::string {
                                                  double x = 0;
                                                  if (!CLI::detail::lexical_cast(value, x))
                                                    return "\"" + value + "\" is not a number";
                                                  if (!std::isfinite(x) || x < 0)
                                                    return "\"" + value + "\" is not a finite number >= 0";
                                                  return {};
                                                },
                                                "FINITE >= 0"};

// The first argument written as a whole number above 2^64 - 1 (alone or as --name=value), or
// empty: CLI11 clamps such a value to 2^64 - 1 without a word, and no count or size here is wider.
inline std::string number_beyond_64_bits(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string v = argv[i];
    if (const auto eq = v.find('='); v.rfind("--", 0) == 0 && eq != std::string::npos) v = v.substr(eq + 1);
    if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string digits = v.substr(std::min(v.find_first_not_of('0'), v.size()));
    if (digits.size() > 20 || (digits.size() == 20 && digits > "18446744073709551615")) return v;
  }
  return {};
}

} // namespace tool_cli
