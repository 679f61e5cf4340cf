#pragma once
// Reading a trace named on the command line: a locus binary trace file, an ESFT folder, or a route
// JSONL file (.jsonl / .ndjson; experts declared by a meta line, see docs/trace-format.md).
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>

#include <filesystem>
#include <string>

namespace locus_driver {

inline locus::trace::trace load_trace(const std::string& path) {
  std::error_code ec; // error codes, not exceptions: a symlink loop is an input error like any other
  const auto st = std::filesystem::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw locus::io_error(path + ": " + ec.message(), __FILE__, __LINE__, ec.value());
  if (std::filesystem::is_directory(st)) return locus::trace::import_esft(path);
  const auto ext = std::filesystem::path(path).extension();
  if (ext == ".jsonl" || ext == ".ndjson") return locus::trace::import_jsonl(path);
  return locus::trace::read_trace(path);
}

} // namespace locus_driver
