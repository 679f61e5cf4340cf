#pragma once
// The command-line conventions of every benchmark, host or CUDA: options parsed by CLI11 (unknown
// flags refused, defaults shown in --help). Kept apart from bench_args.hpp so that the .cu
// benchmarks take them without the trace readers.
#include <CLI/CLI.hpp>
#include <string>

namespace bench_args {

// Every option of `app` shows its default in --help. CLI11 already refuses unknown options and
// values that do not parse (CLI11_PARSE prints why and ends the program with a non-zero code).
inline void show_defaults(CLI::App& app) { app.option_defaults()->always_capture_default(); }

// A number above zero. CLI11's PositiveNumber would answer "0" with a range up to DBL_MAX and a
// word with the same range; this says what it wants.
inline const CLI::Validator positive{[](std::string& value) -> std::string {
                                       double x = 0;
                                       if (CLI::detail::lexical_cast(value, x) && x > 0) return {};
                                       return "must be a number above 0, got " + value;
                                     },
                                     "POSITIVE"};

} // namespace bench_args
