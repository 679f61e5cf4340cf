#pragma once
// Result files of the benchmarks (JSON, Markdown): text collected in memory and written through
// locus::atomic_file when the object goes out of scope, so that an interrupted or failed run
// never leaves a truncated result where a good one was.
#include <deque>
#include <exception>
#include <filesystem>
#include <locus/core/atomic_file.hpp>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace bench_output {

//! `path` with its symbolic links followed, a link to nothing included (weakly_canonical stops
//! at one: a dangling link and the file it would make were two names).
inline std::filesystem::path resolved(std::filesystem::path path) {
  std::error_code ec;
  for (int hop = 0; hop < 16 && std::filesystem::is_symlink(path, ec); ++hop) {
    const auto target = std::filesystem::read_symlink(path, ec);
    if (ec) break;
    path = target.is_absolute() ? target : path.parent_path() / target;
  }
  const auto c = std::filesystem::weakly_canonical(path, ec);
  return ec ? path.lexically_normal() : c;
}

//! True when `a` and `b` name one file (the same path, through `..` or links, or one file).
inline bool same_file(const std::string& a, const std::string& b) {
  if (resolved(a) == resolved(b)) return true;
  std::error_code ec;
  return std::filesystem::equivalent(a, b, ec) && !ec;
}

//! Refuses, before the run, two results given one file (the second write replaced the first).
//! @throws std::invalid_argument naming both
inline void require_distinct(const std::string& a, const std::string& b) {
  if (!a.empty() && !b.empty() && same_file(a, b))
    throw std::invalid_argument(a + " and " + b + " name one file: give each result its own");
}

//! The files of one run (a .json and its .md), written together: each into a temporary beside its
//! target, all synced and named before any is renamed, so that a run that fails leaves the earlier
//! run's files as they were (a new .json beside an old .md read as one run). Two names of one file
//! are refused (the second write replaced the first).
//! @throws locus::io_error, std::invalid_argument naming the path given twice
inline void write_together(const std::vector<std::pair<std::string, std::string>>& files) {
  for (std::size_t i = 0; i < files.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      require_distinct(files[j].first, files[i].first);
  std::vector<std::unique_ptr<locus::atomic_file>> out;
  for (const auto& [path, text] : files) {
    out.push_back(std::make_unique<locus::atomic_file>(path));
    out.back()->write(text.data(), text.size());
    out.back()->prepare();
  }
  for (auto& f : out)
    f->stage();
  for (auto& f : out)
    f->commit();
}

//! Result files collected by name and written together (write_together) at the end of the scope
//! (of a statement for a temporary: `bench_output::files()["a.json"] << ...;`), unless an exception
//! is unwinding: `bench_output::files out; out["a.json"] << ...; out["a.md"] << ...;`
class files {
public:
  files() = default;
  files(const files&) = delete;
  files& operator=(const files&) = delete;
  ~files() noexcept(false) {
    if (std::uncaught_exceptions() == uncaught_) commit();
  }
  //! Writes the files now (the destructor then writes nothing), so that what follows, a "wrote"
  //! line, can say they were.
  void commit() {
    std::vector<std::pair<std::string, std::string>> all;
    for (const auto& [path, text] : text_)
      all.emplace_back(path, text.str());
    text_.clear();
    write_together(all);
  }
  //! The text of `path` (an empty path: none, the text is dropped).
  std::ostringstream& operator[](const std::string& path) {
    if (path.empty()) return dropped_;
    for (auto& [p, t] : text_)
      if (p == path) return t;
    return text_.emplace_back(path, std::ostringstream()).second;
  }

private:
  std::deque<std::pair<std::string, std::ostringstream>> text_; // stable references
  std::ostringstream dropped_;
  int uncaught_ = std::uncaught_exceptions();
};

} // namespace bench_output
