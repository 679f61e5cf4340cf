#pragma once
// What every subcommand shares for its output: progress on stderr, and `--json FILE` documents
// that name their format and version.
//
// Progress is for a person watching a terminal: it is shown when stderr is a terminal, rewriting
// one line in place, and never otherwise (a log or a pipe gets no progress lines) unless
// `--progress` asks for it, when each step is a line of its own. `-q` / `--quiet` silences it
// everywhere. Results always go to stdout or to the files named, never to the progress stream.
#include "tool_cli.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <iterator>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/placement/engine_export.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

namespace locus_driver {

//! When progress is printed (the global `-q` and `--progress` flags set it).
enum class progress_mode { automatic, always, never };

inline progress_mode& progress_setting() {
  static progress_mode mode = progress_mode::automatic;
  return mode;
}

//! Progress of one command on stderr: stages (start/done) and counted steps (step).
class progress {
public:
  explicit progress(std::string cmd) : cmd_(std::move(cmd)) {
    tty_ = ::isatty(STDERR_FILENO) == 1;
    const auto mode = progress_setting();
    on_ = mode == progress_mode::always || (mode == progress_mode::automatic && tty_);
    begin_ = std::chrono::steady_clock::now();
  }
  progress(const progress&) = delete;
  progress& operator=(const progress&) = delete;
  ~progress() { clear(); }

  //! A stage begins.
  void start(const std::string& what) {
    what_ = what;
    t0_ = std::chrono::steady_clock::now();
    show(what + "...");
  }
  //! The stage ends; its seconds (a stage over a second says how long it took).
  double done() {
    const double s = seconds_since(t0_);
    if (s > 1.0 && on_ && !tty_) std::fprintf(stderr, "%s: %s took %.1f s\n", cmd_.c_str(), what_.c_str(), s);
    return s;
  }
  //! Step `done` of `total` begins; `what` says what it is.
  void step(std::size_t done, std::size_t total, const std::string& what) {
    char head[64];
    std::snprintf(head, sizeof head, "[%zu/%zu, %.0f s] ", done, total, seconds_since(begin_));
    show(head + what);
  }
  //! Removes the progress line from a terminal (before a result is printed below it).
  void clear() {
    if (on_ && tty_ && shown_) std::fprintf(stderr, "\r\033[K");
    shown_ = false;
  }

private:
  static double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }
  void show(const std::string& line) {
    if (!on_) return;
    if (tty_) {
      std::fprintf(stderr, "\r\033[K%s: %s", cmd_.c_str(), line.c_str());
      shown_ = true;
    } else {
      std::fprintf(stderr, "%s: %s\n", cmd_.c_str(), line.c_str());
    }
    std::fflush(stderr);
  }

  std::string cmd_, what_;
  bool tty_ = false, on_ = false, shown_ = false;
  std::chrono::steady_clock::time_point begin_, t0_;
};

//! `v` with `precision` decimals ("n/a" when it is not finite), for the commands' printed figures.
inline std::string fixed(double v, int precision) {
  if (!std::isfinite(v)) return "n/a";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

//! Adds `--json [FILE]` to `cmd`: the command's figures as a JSON document; `-` or no value is
//! stdout, which then carries the JSON instead of the table.
inline CLI::Option* add_json_option(CLI::App* cmd, std::string& path) {
  return cmd
      ->add_option_function<std::string>(
          "--json",
          [&path](const std::string& value) {
            // CLI11 runs no check on an empty value of an option that may take none: `--json ""`
            // read as no JSON at all, which is not what the user asked for.
            if (value.empty()) throw CLI::ValidationError("--json", "an empty value; leave the option out for no JSON");
            path = value;
          },
          "Also write the figures as JSON to this file (written whole or not at all); - or no value: "
          "stdout, instead of the table. Default: no JSON")
      ->expected(0, 1)
      // The value taken when --json comes without one; the help shows [PATH] instead of "=-",
      // which would read as the default when the option is absent.
      ->default_str("-")
      ->option_text("[PATH]");
}

//! The well-formed UTF-8 sequence at s[i]: its length (1 for ASCII) and code point, or length 0
//! when it is not one: a bad lead or continuation byte, a truncated sequence, an overlong encoding
//! (C0 9B would be an escape character in disguise), a surrogate or a code point past U+10FFFF.
struct utf8_sequence {
  std::size_t length = 0;
  std::uint32_t code_point = 0;
};
inline utf8_sequence utf8_at(const std::string& s, std::size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  const std::size_t n = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return {};
  std::uint32_t cp = n == 1 ? b : b & (0x7Fu >> n);
  for (std::size_t k = 1; k < n; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c >> 6) != 0x2) return {};
    cp = (cp << 6) | (c & 0x3Fu);
  }
  static constexpr std::uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < least[n] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return {};
  return {n, cp};
}

//! Code points a terminal acts on rather than shows: the C1 controls (U+009B starts an escape
//! sequence on many terminals) and the bidirectional overrides and isolates, which reorder the
//! text shown after them; and the invisible ones no script needs (zero-width space, word joiner,
//! byte-order mark), with which a name looks like another.
inline bool terminal_control(std::uint32_t cp) {
  return (cp >= 0x80 && cp <= 0x9F) || (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069) ||
         cp == 0x061C || cp == 0x200E || cp == 0x200F || cp == 0x200B || cp == 0x2060 || cp == 0xFEFF;
}

//! One line of text, safe on a terminal: control characters (a newline or an escape sequence in a
//! domain name, say) are written as escapes or '?', C1 controls, bidirectional overrides and
//! invisible characters as \u{XXXX}, and bytes that are not UTF-8 (a binary file quoted by a parser's message) as \xNN.
//! For messages and for names from the input in tables.
inline std::string one_line(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const char c = s[i];
    const auto [n, cp] = utf8_at(s, i);
    if (n > 1 && terminal_control(cp)) {
      char code[16];
      std::snprintf(code, sizeof code, "\\u{%04X}", static_cast<unsigned>(cp));
      out += code;
      i += n;
      continue;
    }
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (n == 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02X", static_cast<unsigned char>(c));
      out += hex;
    } else if (n == 1 && ((static_cast<unsigned char>(c) < 0x20 && c != '\t') || c == 0x7f)) {
      out += '?';
    } else {
      out.append(s, i, n);
      i += n;
      continue;
    }
    ++i;
  }
  return out;
}

using tool_cli::shell_quote;

//! Whether `--json` sends the document to stdout (the table is then not printed).
inline bool json_to_stdout(const std::string& path) { return path == "-"; }

//! Whether `path` leads to the process's standard output: /dev/stdout; a descriptor that is a copy
//! of it (/dev/fd/3 after `3>&1`) where stdout is a pipe, socket or file (a terminal or /dev/null is
//! one device that any descriptor may share, not this stream); or, where stdout is a regular file,
//! a path to that file (`--out m.json > m.json`).
inline bool names_stdout(const std::string& path) {
  if (path.empty() || path == "-") return false;
  const int fd = locus::open_stream_fd(path);
  if (fd == STDOUT_FILENO) return true;
  struct stat a {
  }, b{};
  if (::fstat(STDOUT_FILENO, &b) != 0) return false;
  const bool same_file = [&] {
    if (fd >= 0) return !S_ISCHR(b.st_mode) && ::fstat(fd, &a) == 0;
    return S_ISREG(b.st_mode) && ::stat(path.c_str(), &a) == 0;
  }();
  return same_file && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

//! Whether one of a command's outputs is its standard output (`--json -`, or a path that names it):
//! the command then prints no summary there, where it would join the output.
inline bool stdout_taken(std::initializer_list<std::string> outputs) {
  return std::any_of(outputs.begin(), outputs.end(), [](const std::string& p) { return p == "-" || names_stdout(p); });
}

//! The text of `doc` as the `locus <command>` document: "format": "locus.<command>" (spaces as
//! dots: "locus.trace.stats") and "version": 1 are added.
inline std::string json_text(const std::string& command, nlohmann::json doc) {
  std::string format = "locus." + command;
  for (char& c : format)
    if (c == ' ') c = '.';
  doc["format"] = format;
  doc["version"] = 1;
  // Names and paths from the input may hold bytes that are not UTF-8: replaced, never a throw
  // after the work is done.
  return doc.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

//! Whether `path` leads to a device, FIFO or socket (following links: /dev/stdout redirected to a
//! file is that file); false for a regular file, a folder or nothing.
inline bool is_special_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode);
}

//! Whether `path` names a device, FIFO or socket, or one of the process's open descriptors
//! (/dev/stdout: locus::open_stream_fd), which take bytes as they are written: they cannot be
//! replaced by a rename, nor take them back; false for a regular file, a folder or nothing.
inline bool is_device(const std::string& path) { return locus::open_stream_fd(path) >= 0 || is_special_file(path); }

//! Whether this run has put files in place (an output_set committed): a failure reported after it
//! (the summary that did not reach stdout) says so, so that exit status 1 is not read as "nothing
//! was written".
inline bool& files_committed() {
  static bool committed = false;
  return committed;
}

//! A command's outputs, all written before any is put in place: each file is written whole into an
//! unnamed file beside its target (locus::atomic_file) and synced; commit() then writes the devices,
//! FIFOs and the JSON on stdout (`--json -`), which cannot take bytes back, names every file beside
//! its target, and only then renames them in turn. A run that fails before the renames (a full
//! disk, a file-size limit, a drawing that failed, any error of the work still to do, a name the
//! folder refuses), or whose device write fails (a full device, a closed pipe), leaves every file as
//! it was. A target no rename could replace (an append-only folder, another user's file in a sticky
//! folder, a mount point) is refused when it is opened; a rename that fails all the same (the
//! folder changed meanwhile) says which outputs were replaced before it.
//! Destroyed without a commit, it leaves nothing behind (but a named temporary where the folder
//! takes no unnamed file and the process is killed).
class output_set {
public:
  //! A file to write to `path` through (not stdout). Prepared, with every other, by commit().
  locus::atomic_file& open(const std::string& path) {
    files_.push_back(std::make_unique<locus::atomic_file>(path));
    return *files_.back();
  }
  //! `content` as the file `path` (nothing for an empty path); written out at once, so that a
  //! write that fails does so before the work that follows.
  void add(const std::string& path, std::string_view content) {
    if (path.empty()) return;
    if (is_device(path)) {
      direct_.emplace_back(path, std::string(content));
      return;
    }
    auto& f = open(path);
    f.write(content);
    f.prepare();
  }
  //! The `locus <command>` JSON document (json_text) as `path`: "-" is stdout, "" nothing.
  void add_json(const std::string& path, const std::string& command, nlohmann::json doc) {
    if (path.empty()) return;
    std::string text = json_text(command, std::move(doc));
    if (json_to_stdout(path))
      stdout_ = std::move(text);
    else
      add(path, text);
  }
  //! Prepares every file, writes the devices and stdout, then renames each file over its target.
  //! @throws locus::io_error
  void commit() {
    for (auto& f : files_)
      f->prepare();
    for (const auto& [path, content] : direct_)
      locus::write_file_atomically(path, content); // written straight into the device
    direct_.clear();
    if (!stdout_.empty()) {
      const bool written = std::fwrite(stdout_.data(), 1, stdout_.size(), stdout) == stdout_.size();
      LOCUS_REQUIRE(std::fflush(stdout) == 0 && written, locus::io_error,
                    "standard output: write failed: ", std::strerror(errno));
      stdout_.clear();
    }
    for (auto& f : files_)
      f->stage();
    std::string replaced;
    for (auto& f : files_) {
      try {
        f->commit();
      } catch (const locus::io_error& e) {
        if (replaced.empty()) throw;
        throw locus::io_error(e.message() + "; replaced already: " + replaced, __FILE__, __LINE__, e.code());
      }
      replaced += (replaced.empty() ? "" : ", ") + f->path();
      files_committed() = true;
    }
    files_.clear();
  }

private:
  std::vector<std::unique_ptr<locus::atomic_file>> files_;
  std::vector<std::pair<std::string, std::string>> direct_; // devices and FIFOs, written by commit()
  std::string stdout_;                                      // `--json -`, written by commit()
};

//! Writes `doc` as the `locus <command>` document (json_text) to `path`: "-" is stdout, "" nothing,
//! any other path atomically; for a command whose only output it is.
inline void write_json(const std::string& path, const std::string& command, nlohmann::json doc) {
  output_set out;
  out.add_json(path, command, std::move(doc));
  out.commit();
}

//! A private folder, `<parent>/<prefix>XXXXXX` (mkdtemp), for the files of a command that another
//! program reads or adds to before the command knows it will finish (a report's CSV files and the
//! figures a script draws from them). add_files_to() hands them to an output_set, so that they
//! replace their targets together or not at all. Removed with what it holds when the object goes
//! (a killed process leaves it behind).
class staging_folder {
public:
  //! @throws locus::io_error when the folder cannot be made
  staging_folder(const std::string& parent, const std::string& prefix) {
    std::string name = (std::filesystem::path(parent) / (prefix + "XXXXXX")).string();
    if (::mkdtemp(name.data()) == nullptr)
      LOCUS_THROW(locus::io_error, parent, ": cannot make a staging folder in it: ", std::strerror(errno));
    path_ = name;
  }
  staging_folder(const staging_folder&) = delete;
  staging_folder& operator=(const staging_folder&) = delete;
  ~staging_folder() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

  const std::filesystem::path& path() const noexcept { return path_; }

  //! The names of the folder's regular files (not of its subfolders), in name order.
  //! @throws locus::io_error
  std::vector<std::string> file_names() const {
    namespace fs = std::filesystem;
    std::vector<std::string> names;
    std::error_code ec;
    for (fs::directory_iterator it(path_, ec), end; !ec && it != end; it.increment(ec))
      if (it->is_regular_file(ec) && !ec) names.push_back(it->path().filename().string());
    LOCUS_REQUIRE(!ec, locus::io_error, path_.string(), ": cannot list the folder: ", ec.message());
    std::sort(names.begin(), names.end());
    return names;
  }

  //! Adds each of file_names(), in name order, to `out` as the file of the same name in
  //! `destination`; returns the names. @throws locus::io_error
  std::vector<std::string> add_files_to(output_set& out, const std::filesystem::path& destination) const {
    const auto names = file_names();
    for (const auto& name : names) {
      std::ifstream in(path_ / name, std::ios::binary);
      std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      LOCUS_REQUIRE(in.good() || in.eof(), locus::io_error, (path_ / name).string(), ": cannot read the file back");
      out.add((destination / name).string(), content);
    }
    return names;
  }

private:
  std::filesystem::path path_;
};

//! The exit status a shell would show for a child's wait status (std::system, pclose): its exit
//! code, 128 + the signal that killed it, or -1 when it could not run.
inline int exit_status(int wait_status) {
  if (wait_status == -1) return -1;
  if (WIFEXITED(wait_status)) return WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) return 128 + WTERMSIG(wait_status);
  return wait_status;
}

//! An output a command will write: the option that names it, and its path ("": none; "-": stdout,
//! for --json only).
struct output_file {
  const char* option;
  std::string path;
};

//! Where `path` leads: absolute, every symbolic link followed, also one whose target does not
//! exist yet (which writing through it creates), "." and ".." resolved. `./a.json`, an absolute
//! spelling and a link to a.json all lead to one path.
inline std::filesystem::path resolved_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  if (ec) return fs::path(path).lexically_normal();
  for (int hops = 0; hops < 40; ++hops) {           // the kernel's own limit on links in a path
    const fs::path c = fs::weakly_canonical(p, ec); // resolves the links up to the last existing element
    // Unresolvable (a folder it may not search, a loop): compared as spelled, never as "" (every
    // such path would then be one file).
    if (ec) return p.lexically_normal();
    p = c;
    if (!fs::is_symlink(fs::symlink_status(p, ec)) || ec) return p;
    const fs::path target = fs::read_symlink(p, ec); // a dangling link: weakly_canonical left it
    if (ec) return p;
    p = target.is_absolute() ? target : p.parent_path() / target;
  }
  return p;
}

//! Whether a trace or statistics folder's reader reads a file of this name: an ESFT layer file
//! (expert_weights_<n>.txt), route JSONL (*.jsonl, *.ndjson), TensorRT-LLM statistics
//! (rank*.safetensors, meta_info.json).
inline bool read_in_a_folder(const std::string& name) {
  const auto ends = [&](std::string_view tail) {
    return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  return (name.rfind("expert_weights_", 0) == 0 && ends(".txt")) || ends(".jsonl") || ends(".ndjson") ||
         (name.rfind("rank", 0) == 0 && ends(".safetensors")) || name == "meta_info.json";
}

//! Whether the existing file `path` may be replaced by a --json document: empty, or one itself (a
//! JSON object whose "format" is "locus.<command>", json_text). A trace, an expert map or an engine's
//! file (JSON objects too, whose format, where they name one, is not a command's) is not. The
//! document is read only as far as its top-level "format", and a JSON-lines file fails at its
//! second line. `format` is the start of the formats that may be replaced (a grouping model's:
//! "locus-grouping").
inline bool replaceable_json(const std::string& path, std::string_view format = "locus.") {
  struct finder : nlohmann::json_sax<nlohmann::json> {
    explicit finder(std::string_view f) : format(f) {}
    std::string_view format;
    int depth = 0;
    bool at_format = false, found = false, blank = true;
    bool value() { // any value but the format string: stop at the top level, else go on
      blank = false;
      at_format = false;
      return depth > 0;
    }
    bool null() override { return value(); }
    bool boolean(bool) override { return value(); }
    bool number_integer(number_integer_t) override { return value(); }
    bool number_unsigned(number_unsigned_t) override { return value(); }
    bool number_float(number_float_t, const string_t&) override { return value(); }
    bool binary(binary_t&) override { return value(); }
    bool string(string_t& v) override {
      if (at_format && depth == 1) {
        found = v.starts_with(format);
        return false; // the answer: read no further
      }
      return value();
    }
    bool start_object(std::size_t) override {
      blank = false;
      at_format = false;
      ++depth;
      return true;
    }
    bool key(string_t& k) override {
      at_format = depth == 1 && k == "format";
      return true;
    }
    bool end_object() override {
      --depth;
      return depth > 0; // the top-level object ended without a format
    }
    bool start_array(std::size_t) override {
      blank = false;
      at_format = false;
      ++depth;
      return depth > 1;
    }
    bool end_array() override {
      --depth;
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }
  } f(format);
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  (void)nlohmann::json::sax_parse(in, &f, nlohmann::json::input_format_t::json, false);
  if (f.found) return true;
  if (!f.blank) return false;
  // Nothing parsed: an empty or blank file holds nothing to lose.
  in.clear();
  in.seekg(0);
  char c = 0;
  while (in.get(c))
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n') return false;
  return true;
}

//! Checks a command's outputs before it does any work: each can be written (its folder exists and
//! takes files, no directory is in the way), no two are one file, and none is one of `inputs` or
//! a file an input folder's reader would read (read_in_a_folder). A run then neither fails after
//! its work nor replaces what it reads, or one of its results with another. Paths are compared
//! where they lead (resolved_path; hard links by identity). @throws locus::io_error or
//! locus::config_error naming the option
inline void check_outputs(const std::vector<output_file>& outputs, const std::vector<std::string>& inputs = {}) {
  namespace fs = std::filesystem;
  // Only files are compared: outputs written into a device (/dev/null, a terminal) share it. A
  // descriptor's path (/dev/stdout) that holds a regular file is that file: `--out plan.json --json
  // /dev/stdout > plan.json` would rename the plan over the file the JSON goes to.
  const auto same = [&](const std::string& a, const std::string& b) {
    if (is_special_file(a)) return false;
    std::error_code ec;
    if (fs::exists(a, ec) && fs::exists(b, ec) && fs::equivalent(a, b, ec) && !ec) return true; // hard links too
    return resolved_path(a) == resolved_path(b);
  };
  // An output under an input folder that the folder's reader would take for one of its files
  // (the folder itself is refused by check_writable; a plan or a table written there is not read).
  const auto inside = [&](const std::string& out, const std::string& folder) {
    std::error_code ec;
    if (is_device(out) || !fs::is_directory(folder, ec) || !read_in_a_folder(fs::path(out).filename().string()))
      return false;
    const fs::path f = resolved_path(folder), o = resolved_path(out);
    const auto [fi, oi] = std::mismatch(f.begin(), f.end(), o.begin(), o.end());
    return fi == f.end() && oi != o.end();
  };
  // Standard output takes one result: two (`--out /dev/stdout --json -`) would run into one stream
  // no reader can split, whatever stdout is (a pipe, a terminal, a file).
  const output_file* on_stdout = nullptr;
  for (const auto& o : outputs) {
    if (o.path.empty() || !((std::string_view(o.option) == "--json" && json_to_stdout(o.path)) || names_stdout(o.path)))
      continue;
    LOCUS_REQUIRE(on_stdout == nullptr, locus::config_error, on_stdout->option, " ", on_stdout->path, " and ", o.option,
                  " ", o.path,
                  " both write to standard output, where one result would run into the "
                  "other: name a file for one of them");
    on_stdout = &o;
  }
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const auto& o = outputs[i];
    if (o.path.empty() || (std::string_view(o.option) == "--json" && json_to_stdout(o.path))) continue;
    // Only --json sends "-" to stdout; any other output took it as a file named "-", which no two
    // outputs were checked against (`--out - --grouping -` kept the grouping alone).
    LOCUS_REQUIRE(o.path != "-", locus::config_error, o.option,
                  " -: only --json writes to standard output; name a file (./- for one called \"-\")");
    for (std::size_t j = 0; j < i; ++j)
      LOCUS_REQUIRE(outputs[j].path.empty() || json_to_stdout(outputs[j].path) || !same(o.path, outputs[j].path),
                    locus::config_error, outputs[j].option, " and ", o.option, " name the same file, ", o.path,
                    ": one result would replace the other");
    for (const auto& in : inputs) {
      LOCUS_REQUIRE(in.empty() || !same(o.path, in), locus::config_error, o.option, " ", o.path,
                    " is also an input of this command: writing it would replace what it reads");
      LOCUS_REQUIRE(in.empty() || !inside(o.path, in), locus::config_error, o.option, " ", o.path, " is inside ", in,
                    ", which this command reads, and its name is one the folder's reader takes: write it elsewhere");
    }
    // --json takes an optional value, so `--json a.jsonl b.bin` reads a.jsonl as the JSON output: an
    // existing file that is not an earlier --json document is refused rather than replaced.
    // (Through a descriptor, /dev/stdout, nothing is replaced: the document is appended to it.)
    std::error_code regular_error;
    if (std::string_view(o.option) == "--json" && !is_device(o.path) &&
        fs::is_regular_file(o.path, regular_error)) // never a FIFO
      LOCUS_REQUIRE(replaceable_json(o.path), locus::config_error, "--json ", o.path,
                    " exists and is not a locus --json document: writing it would replace it (--json takes an "
                    "optional file: an input named after it is read as the JSON output; write --json=FILE or put "
                    "--json last)");
    locus::check_writable(o.path);
  }
}

//! Where and when a result was made: the command line, the UTC date, the CPU model, its cores and
//! the load average (results files record them).
struct run_info {
  std::string command, date, cpu;
  unsigned cores = 0;
  double load[3] = {0, 0, 0};

  static run_info capture(int argc, char** argv) {
    run_info r;
    for (int i = 0; i < argc; ++i)
      r.command += (i ? " " : "") + std::string(i == 0 ? "locus" : argv[i]);
    char buf[32];
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
    r.date = buf;
    std::ifstream cpuinfo("/proc/cpuinfo");
    for (std::string line; std::getline(cpuinfo, line);)
      if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
        r.cpu = line.substr(line.find(':') + 2);
        break;
      }
    r.cores = std::thread::hardware_concurrency();
    if (::getloadavg(r.load, 3) != 3) r.load[0] = r.load[1] = r.load[2] = 0;
    return r;
  }
  nlohmann::json to_json() const {
    return {{"command", command},
            {"date", date},
            {"cpu", cpu},
            {"cores", cores},
            {"load_average", {load[0], load[1], load[2]}}};
  }
  std::string machine() const {
    char buf[96];
    std::snprintf(buf, sizeof buf, ", %u cores, load average %.2f %.2f %.2f", cores, load[0], load[1], load[2]);
    return (cpu.empty() ? std::string("unknown CPU") : cpu) + buf;
  }
};

//! The command line of this run (set by main before parsing).
inline run_info& this_run() {
  static run_info r;
  return r;
}

// The model layers a plan saved, as map check says them: "hidden layers 3..60 of 61", "hidden layers
// 1, 3, ..., 47 of 48" (evenly spaced), or each one listed.
inline std::string saved_layers_text(const std::vector<std::size_t>& ids, std::size_t hidden) {
  std::string out = "hidden layers ";
  const std::size_t step = locus::placement::model_layers::even_step(ids);
  if (step == 1)
    out += std::to_string(ids.front()) + ".." + std::to_string(ids.back());
  else if (step > 1 && ids.size() > 3)
    out += std::to_string(ids[0]) + ", " + std::to_string(ids[1]) + ", ..., " + std::to_string(ids.back());
  else
    for (std::size_t i = 0; i < ids.size(); ++i)
      out += (i ? ", " : "") + std::to_string(ids[i]);
  // A plan that saved no hidden-layer count (an ESFT or route-log trace) is read as ending at its
  // last MoE layer: said as a reading, not as the model's count.
  return out + (hidden ? " of " + std::to_string(hidden)
                       : " (no hidden-layer count saved: exports take the last + 1, " + std::to_string(ids.back() + 1) +
                             ", unless --num-hidden-layers says otherwise)");
}

} // namespace locus_driver
