#pragma once
// Result files of the benchmarks (JSON, Markdown): text collected in memory and written through
// locus::atomic_file when the object goes out of scope, so that an interrupted or failed run
// never leaves a truncated result where a good one was.
#include <exception>
#include <locus/core/atomic_file.hpp>
#include <sstream>
#include <string>

namespace bench_output {

//! `bench_output::file(path) << a << b;` writes path atomically at the end of the statement (or,
//! for a named object, of its scope). Nothing is written while an exception is unwinding.
class file {
public:
  explicit file(std::string path) : path_(std::move(path)) {}
  file(const file&) = delete;
  file& operator=(const file&) = delete;
  ~file() noexcept(false) {
    if (std::uncaught_exceptions() == uncaught_) locus::write_file_atomically(path_, text_.str());
  }
  template <class T>
  file& operator<<(const T& v) {
    text_ << v;
    return *this;
  }

private:
  std::string path_;
  std::ostringstream text_;
  int uncaught_ = std::uncaught_exceptions();
};

} // namespace bench_output
