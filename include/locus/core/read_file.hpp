#pragma once
//! @file
//! The one way locus reads a small whole file (a JSON map, a grouping model, a load table): a
//! folder, a file over a size cap or a failed read is a `locus::io_error` or `locus::format_error`
//! naming the path, never a stream exception of the standard library or an allocation the file
//! did not pay for.

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <locus/core/error.hpp>
#include <string>
#include <string_view>
#include <sys/stat.h>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail {

//! The whole content of `path`; `what` names the content in the size error ("an expert map").
//! @throws locus::io_error when it cannot be opened or read, or is a directory
//! @throws locus::format_error when it holds more than `max_bytes`
//! `looks_right(first)`, asked once of the first 64 KiB (or the whole file where shorter), may stop
//! the read there (false): a file of another kind (/dev/zero given as a load table) is then handed
//! back cut short for the caller's format check to refuse, not read to the cap.
template <class LooksRight>
std::string read_whole_file(const std::string& path, std::size_t max_bytes, const char* what,
                            LooksRight&& looks_right) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    const int e = errno;
    throw io_error(concat(path, ": cannot open: ", std::strerror(e)), __FILE__, __LINE__, e);
  }
  struct closer {
    std::FILE* f;
    ~closer() { std::fclose(f); }
  } guard{f};
  struct stat st {};
  if (::fstat(::fileno(f), &st) == 0 && S_ISDIR(st.st_mode))
    throw io_error(concat(path, ": cannot read: it is a directory"), __FILE__, __LINE__, EISDIR);
  std::string text;
  char buf[1 << 16];
  // Read up to the cap (not by the size fstat gives, which a device or FIFO does not have).
  for (;;) {
    const std::size_t n = std::fread(buf, 1, sizeof buf, f);
    if (text.size() + n > max_bytes)
      throw format_error(concat(path, ": more than ", max_bytes, " bytes is too large for ", what), max_bytes, __FILE__,
                         __LINE__);
    text.append(buf, n);
    if (n < sizeof buf) break;
    if (text.size() == sizeof buf && !looks_right(std::string_view(text))) return text;
  }
  if (std::ferror(f)) {
    const int e = errno;
    throw io_error(concat(path, ": read failed: ", std::strerror(e)), __FILE__, __LINE__, e);
  }
  return text;
}

//! read_whole_file of any content.
inline std::string read_whole_file(const std::string& path, std::size_t max_bytes, const char* what) {
  return read_whole_file(path, max_bytes, what, [](std::string_view) { return true; });
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail
