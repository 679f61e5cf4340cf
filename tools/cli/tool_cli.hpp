#pragma once
// The command-line conventions of every locus program (the driver, the examples, the benchmarks,
// host or CUDA): options parsed by CLI11, unknown flags refused, every default shown in --help,
// and values checked in plain words. CLI11's own PositiveNumber and NonNegativeNumber print the
// 309-digit largest double as the bound, let NaN through and call infinity negative.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <new>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

namespace tool_cli {

// Whole numbers as people write them: decimal digits (with a sign where the option takes one),
// leading zeros ignored. CLI11 2.1 reads them with strtoull/strtoll in base 0, so "010" was 8 (octal)
// while the other checks read 10, "0x10" was 16, "-1" wrapped to 2^64 - 1 and a value beyond the type
// was clamped to its largest, all without a word. Validators run before the conversion and may
// rewrite the value, so "010" reaches it as "10".
inline std::string whole_number(std::string& value, bool sign) {
  const bool signed_value = sign && !value.empty() && (value[0] == '-' || value[0] == '+');
  const bool negative = signed_value && value[0] == '-';
  std::string digits = signed_value ? value.substr(1) : value;
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
    return "\"" + value + "\" is not a whole number" + (sign ? "" : " >= 0") + " (decimal digits only)";
  digits.erase(0, std::min(digits.find_first_not_of('0'), digits.size() - 1));
  const std::string largest = !sign ? "18446744073709551615" : negative ? "9223372036854775808" : "9223372036854775807";
  if (digits.size() > largest.size() || (digits.size() == largest.size() && digits > largest))
    return value + " is out of range (" + (sign ? "-2^63 to 2^63 - 1" : "at most 2^64 - 1") + ")";
  value = (negative ? "-" : "") + digits;
  return {};
}

// A real number as CLI11 reads one; its own word for anything else was "Could not convert: --slacks =
// 0.1,x", which says neither which value nor what the option takes.
inline std::string real_number(const std::string& value) {
  double x = 0;
  return CLI::detail::lexical_cast(value, x) ? std::string() : "\"" + value + "\" is not a number";
}

// Adds the value rules to every option (of `app` and its subcommands) by its type: whole numbers in
// decimal for an integer, a number for a floating-point one, a text that is not empty; no text in
// --help. A list option's values are checked one by one, and its message says it takes a list.
inline void check_numbers(CLI::App& app) {
  for (CLI::Option* opt : app.get_options()) {
    const std::string type = opt->get_type_name();
    const std::string base = type.substr(0, type.find(':'));
    const char delimiter = opt->get_delimiter();
    const std::string list = delimiter == ',' ? "; it takes a comma-separated list"
                             : delimiter      ? std::string("; it takes a list separated by '") + delimiter + "'"
                                              : "";
    if (base == "UINT" || base == "INT")
      opt->check(CLI::Validator(
          [sign = base == "INT", list](std::string& v) {
            const std::string m = whole_number(v, sign);
            return m.empty() ? m : m + list;
          },
          ""));
    else if (base == "FLOAT")
      opt->check(CLI::Validator(
          [list](std::string& v) {
            const std::string m = real_number(v);
            return m.empty() ? m : m + list;
          },
          ""));
    // A text value given empty (`--map "$MAP"` with MAP unset) read as the option left out: the run
    // went on with the default (a baseline map, no fit, no JSON) and said nothing.
    else if (base == "TEXT")
      opt->check(CLI::Validator(
          [list](std::string& v) {
            return v.empty() ? "an empty value; leave the option out for its default" + list : std::string();
          },
          ""));
  }
  for (CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    check_numbers(*sub);
}

// The names of an enumeration's values (to_string of each), for CLI::IsMember.
template <class Values>
std::vector<std::string> names_of(const Values& values) {
  std::vector<std::string> out;
  for (const auto v : values)
    out.emplace_back(to_string(v));
  return out;
}

// A list option with nothing in it by default shows no default ("TEXT=[] ..." read as a value).
inline void hide_empty_lists(CLI::App& app) {
  for (CLI::Option* opt : app.get_options())
    if (opt->get_default_str() == "[]") opt->default_str("");
  for (CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    hide_empty_lists(*sub);
}

// Every option of `app` shows its default in --help, every integer option reads whole numbers in
// decimal and a value that is not a number is said as such (check_numbers, applied when parsing
// starts, once the options exist). CLI11 already refuses unknown options.
inline void show_defaults(CLI::App& app) {
  app.option_defaults()->always_capture_default();
  app.preparse_callback([&app](std::size_t) {
    check_numbers(app);
    hide_empty_lists(app);
  });
}

// Edit distance between two option names (insertions, deletions, substitutions, swaps of
// neighbours), for "did you mean".
inline std::size_t option_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i)
    d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j)
    d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i)
    for (std::size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

//! For "<program>: usage error: ...": the first `--name` that no option of the command given names, with the closest
//! option where one is near ("--tarce": did you mean --trace?); else empty. Checked before CLI11 parses: it says only
//! "The following arguments were not expected" (listing them in reverse), or first complains about what the mistyped
//! option's value became (a positional file that does not exist).
inline std::string unknown_option(const CLI::App& app, int argc, char** argv, const std::string& program) {
  std::vector<const CLI::App*> chain{&app}; // the command words given, in order
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--") break;
    for (const CLI::App* sub : chain.back()->get_subcommands([](const CLI::App*) { return true; }))
      if (sub->get_name() == argv[i]) {
        chain.push_back(sub);
        break;
      }
  }
  std::string command = program;
  for (std::size_t i = 1; i < chain.size(); ++i)
    command += " " + chain[i]->get_name();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) continue;
    const std::string name = arg.substr(0, arg.find('='));
    bool known = false;
    std::string closest;
    std::size_t best = SIZE_MAX;
    for (const CLI::App* a : chain)
      for (const CLI::Option* o : a->get_options())
        for (const std::string& l : o->get_lnames()) {
          known = known || "--" + l == name;
          if (const std::size_t d = option_distance(name, "--" + l); d < best) {
            best = d;
            closest = "--" + l;
          }
        }
    if (known) continue;
    const bool near = best <= std::max<std::size_t>(1, (name.size() - 2) / 3);
    return command + " has no option " + name + (near ? " (did you mean " + closest + "?; see " : " (see ") + command +
           " --help)";
  }
  return {};
}

// The first list option (of `app` or a subcommand) given a value with an empty item ("a,,b", "a,",
// ","), as "--phases: \"law,,summary\" has an empty item", else "": CLI11 drops empty items, so a
// typo ran with a shorter list and no word.
inline std::string empty_list_item(CLI::App& app, int argc, char** argv) {
  for (const CLI::Option* opt : app.get_options()) {
    const char d = opt->get_delimiter();
    if (d == '\0') continue;
    for (const std::string& name : opt->get_lnames()) {
      const std::string flag = "--" + name;
      for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (a == "--") break; // the options end here
        std::string_view value;
        if (a == flag && i + 1 < argc)
          value = argv[i + 1];
        else if (a.size() > flag.size() && a.starts_with(flag) && a[flag.size()] == '=')
          value = a.substr(flag.size() + 1);
        else
          continue;
        if (!value.empty() && (value.front() == d || value.back() == d || value.find(std::string(2, d)) != value.npos))
          return flag + ": \"" + std::string(value) + "\" has an empty item";
      }
    }
  }
  for (CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    if (std::string m = empty_list_item(*sub, argc, argv); !m.empty()) return m;
  return {};
}

// Parses the command line: nullopt to carry on, else the status for main to return: 0 after --help,
// 2 for a command line that is wrong (CLI11's message on stderr), as the driver answers; CLI11's own
// codes (105 for a refused value, 109 for an unknown option) mean nothing to a shell script.
// A mistake reads like every other failure of the program, its name first: "<program>: usage error:
// <what CLI11 says> (see --help)" (it was CLI11's text alone, the only line without the name).
[[nodiscard]] inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  const std::string program = argc > 0 ? std::filesystem::path(argv[0]).filename().string() : app.get_name();
  app.failure_message([program](const CLI::App*, const CLI::Error& e) {
    return program + ": usage error: " + e.what() + " (see --help)\n";
  });
  if (const std::string unknown = unknown_option(app, argc, argv, program); !unknown.empty()) {
    std::fprintf(stderr, "%s: usage error: %s\n", program.c_str(), unknown.c_str());
    return 2;
  }
  if (const std::string empty = empty_list_item(app, argc, argv); !empty.empty()) {
    std::fprintf(stderr, "%s: usage error: %s (see --help)\n", program.c_str(), empty.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return std::nullopt;
}

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

// A number from `lo` to `hi`, said in words ("Value 1.5 not in range 0.000000 to 1.000000" was CLI11's).
inline CLI::Validator number_in(double lo, double hi) {
  std::ostringstream name;
  name << "FLOAT in [" << lo << ", " << hi << "]";
  return CLI::Validator(
      [lo, hi](std::string& value) -> std::string {
        double x = 0;
        if (!CLI::detail::lexical_cast(value, x)) return "\"" + value + "\" is not a number";
        if (!std::isfinite(x) || x < lo || x > hi) {
          std::ostringstream m;
          m << value << " is not a number from " << lo << " to " << hi;
          return m.str();
        }
        return {};
      },
      name.str());
}

// A value `parse` accepts: `parse(value)` throws a locus::error whose message says what is wrong,
// so that the option's own parser decides, and a bad value is a usage error (exit 2) naming it.
template <class Parse>
CLI::Validator parsed_by(Parse parse, std::string description) {
  return CLI::Validator(
      [parse](std::string& value) -> std::string {
        try {
          (void)parse(value);
          return {};
        } catch (const locus::error& e) {
          return e.message();
        }
      },
      std::move(description));
}

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

// 0 (off) or a ratio such as a GPU max/mean: a finite number >= 1.
inline const CLI::Validator zero_or_at_least_one{[](std::string& value) -> std::string {
                                                   double x = 0;
                                                   if (!CLI::detail::lexical_cast(value, x))
                                                     return "\"" + value + "\" is not a number";
                                                   if (!std::isfinite(x) || (x != 0 && x < 1))
                                                     return "\"" + value +
                                                            "\" is neither 0 (off) nor a finite number >= 1";
                                                   return {};
                                                 },
                                                 "0 OR >= 1"};

// The folder a run writes its results into. It is checked when the run starts, so that a folder that
// cannot be used is said at once, not after minutes or hours of measuring; but it is made (with any of
// its parents that are missing, as `mkdir -p`, like every locus program that writes a folder) only
// when the first file is written into it (file() or make()): a run that ends before that, by an
// error, Ctrl-C, SIGTERM or a kill, leaves no new folder behind (it left an empty one, with its
// parents, when a signal stopped it: signals run no destructor). The folders it made are removed
// again, deepest first, if still empty when the object goes (a write that failed); a folder that was
// there before is never removed. Errors are locus::io_error naming `dir` and `what` the folder is.
class results_folder {
public:
  // Checks that `dir` is a folder that takes files (a file is created in it and dropped unnamed), or,
  // where it is missing, that the nearest folder above it that is there takes new entries and that no
  // part of the path is something other than a folder (a file, a symbolic link to nothing) or a name
  // too long. Nothing is made.
  results_folder(std::string dir, std::string what) : dir_(std::move(dir)), what_(std::move(what)) {
    namespace fs = std::filesystem;
    if (dir_.empty()) throw locus::io_error("the " + what_ + " has an empty name");
    // The nearest part of the path that is there (following symbolic links); ENOTDIR says that a
    // part above is not a folder, which the walk then reaches. A name too long is said here too.
    fs::path at = dir_;
    struct stat st {};
    for (;;) {
      if (::stat(at.c_str(), &st) == 0) break;
      const int e = errno;
      if (e != ENOENT && e != ENOTDIR)
        fail(at == fs::path(dir_) ? std::strerror(e) : at.string() + ": " + std::strerror(e));
      struct stat lst {};
      if (e == ENOENT && ::lstat(at.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode))
        fail(at.string() + " is a symbolic link to nothing");
      missing_ = true;
      const fs::path up = at.parent_path();
      if (up.empty() || up == at) { // a relative name's top: the working folder
        at = up.empty() ? fs::path(".") : up;
        if (::stat(at.c_str(), &st) != 0) fail(at.string() + ": " + std::strerror(errno));
        break;
      }
      at = up;
    }
    if (!S_ISDIR(st.st_mode)) fail(missing_ ? at.string() + " is not a folder" : "it is not a folder");
    if (!missing_) {
      // Probed as every results file is: a folder that refuses files (permissions, a read-only or
      // full filesystem, /proc) says so here.
      locus::check_writable((fs::path(dir_) / ".results-probe").string());
      return;
    }
    // The folder the first missing one goes into must take new entries: the permissions (which root
    // passes), and a file probed there as above (a read-only filesystem, /proc).
    if (::access(at.c_str(), W_OK | X_OK) != 0) fail(at.string() + ": " + std::strerror(errno));
    try {
      locus::check_writable((at / ".results-probe").string());
    } catch (const locus::io_error& e) {
      fail(at.string() + ": " + std::strerror(e.code()));
    }
  }
  results_folder(results_folder&& other) noexcept
      : dir_(std::move(other.dir_)), what_(std::move(other.what_)), missing_(other.missing_),
        made_(std::move(other.made_)) {
    other.missing_ = false;
    other.made_.clear();
  }
  results_folder(const results_folder&) = delete;
  results_folder& operator=(const results_folder&) = delete;
  results_folder& operator=(results_folder&&) = delete;
  ~results_folder() { drop_empty(); }

  // The folder as given.
  const std::string& path() const noexcept { return dir_; }

  // Makes the folder, with its missing parents, if it is not there yet (once; later calls do nothing).
  void make() {
    if (!missing_) return;
    namespace fs = std::filesystem;
    std::error_code ec;
    // The folders missing now, deepest first ("a/b/" names "a/b" twice; removing it twice is harmless).
    for (fs::path p = dir_; !p.empty() && !fs::exists(fs::symlink_status(p, ec)); p = p.parent_path()) {
      if (p.filename() != "." && p.filename() != "..") made_.push_back(p); // "a/.." is a folder that was there
      if (p == p.root_path() || p == p.parent_path()) break;
    }
    fs::create_directories(dir_, ec);
    if (ec) {
      drop_empty();
      fail(ec.message());
    }
    missing_ = false;
  }

  // The path of the file `name` in the folder, the folder made first (make()): what a run passes to
  // the writer of a results file once the results are there.
  std::string file(const std::string& name) {
    make();
    return (std::filesystem::path(dir_) / name).string();
  }

  // Whether `path` names a file directly in this folder while the folder is not made yet: such a file
  // can be written once it is (the folder's own check covered it), though its folder is not there.
  bool covers(const std::string& path) const {
    namespace fs = std::filesystem;
    const auto normal = [](const fs::path& p) {
      std::error_code ec;
      fs::path a = fs::absolute(p, ec).lexically_normal();
      if (!a.empty() && a.filename().empty()) a = a.parent_path(); // "x/" and "x" are one folder
      return a;
    };
    const fs::path file = path;
    return missing_ && !file.filename().empty() && normal(file.parent_path()) == normal(dir_);
  }

  // Checks before the run that the results file `path` can be written at the end (its folder exists
  // and takes files, it is not a folder), or that it is one this folder covers().
  void check_file(const std::string& path) const {
    if (!covers(path)) locus::check_writable(path);
  }

private:
  [[noreturn]] void fail(const std::string& why) const {
    throw locus::io_error(dir_ + ": cannot be made the " + what_ + ": " + why);
  }
  void drop_empty() noexcept {
    for (const auto& p : made_) {
      std::error_code ec;
      if (std::filesystem::is_directory(std::filesystem::symlink_status(p, ec)) && std::filesystem::is_empty(p, ec) &&
          !ec)
        std::filesystem::remove(p, ec);
    }
    made_.clear();
  }
  std::string dir_, what_;
  bool missing_ = false; // the folder (or a parent) is not there: make() makes it
  std::vector<std::filesystem::path> made_;
};

// Refuses a run whose buffers (`bytes`, as the program works them out from its options) exceed this
// machine's memory, naming `what` asked for them: such a run would otherwise be killed part-way, or
// swap for hours, instead of saying so. In double precision, so that no product of sizes wraps.
inline void require_memory(double bytes, const std::string& what) {
  const double have = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGE_SIZE));
  if (have > 0 && bytes > have) {
    char text[160];
    std::snprintf(text, sizeof text, " need about %.3g GB of memory; this machine has %.3g GB", bytes / 1e9,
                  have / 1e9);
    throw locus::config_error(what + text);
  }
}

//! `x` as one word of a POSIX shell command, so that a printed or recorded command can be pasted
//! back: in single quotes (a quote inside as '\''), or as it is where it holds only characters no
//! shell reads specially.
inline std::string shell_quote(const std::string& x) {
  const bool plain = !x.empty() && std::all_of(x.begin(), x.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::string_view("_./:=@%+,-").find(c) != std::string_view::npos;
  });
  if (plain) return x;
  std::string r = "'";
  for (const char c : x)
    r += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return r + "'";
}

//! "1 request", "2 requests": a count and its noun, the plural made with "s".
inline std::string counted(std::size_t n, const std::string& noun) {
  return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}

// What a program prints after its own name for the exception that ends it ("drift: " + this, or
// "exchange: rank 3: " + this): a locus error as its kind and message, without the "locus: " of what()
// (the program's name stands there; "drift: locus: configuration error: ..." said two names) and
// without the source location (the driver shows that under --verbose); memory exhaustion in words
// rather than the standard library's "std::bad_alloc" or "cannot create std::vector larger than
// max_size()"; a file-system error as path and reason.
inline std::string error_text(const std::exception& e) {
  if (const auto* le = dynamic_cast<const locus::error*>(&e))
    return std::string(locus::to_string(le->kind())) + ": " + le->message();
  if (dynamic_cast<const std::bad_alloc*>(&e) || dynamic_cast<const std::length_error*>(&e))
    return "out of memory: the sizes asked for need more than this machine can hold";
  if (const auto* fe = dynamic_cast<const std::filesystem::filesystem_error*>(&e))
    return fe->path1().string() + ": " + fe->code().message();
  return e.what();
}

} // namespace tool_cli
