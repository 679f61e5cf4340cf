#pragma once
// Reading a trace named on the command line: a locus binary trace file, or an ESFT folder.
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>

#include <filesystem>
#include <string>

namespace locus_driver {

inline locus::trace::trace load_trace(const std::string& path) {
  if (std::filesystem::is_directory(path)) return locus::trace::import_esft(path);
  return locus::trace::read_trace(path);
}

} // namespace locus_driver
