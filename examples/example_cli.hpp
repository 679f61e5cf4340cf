#pragma once
// The command-line conventions of the examples (CLI11, like the driver): defaults shown in --help,
// unknown flags refused, and counts that must be above zero say so.
#include <CLI/CLI.hpp>
#include <string>

namespace example_cli {

// A number above zero (CLI11's PositiveNumber reports a range up to DBL_MAX instead).
inline const CLI::Validator positive{[](std::string& value) -> std::string {
                                       double x = 0;
                                       if (CLI::detail::lexical_cast(value, x) && x > 0) return {};
                                       return "must be a number above 0, got " + value;
                                     },
                                     "POSITIVE"};

} // namespace example_cli
