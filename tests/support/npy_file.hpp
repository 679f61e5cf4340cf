#pragma once
// A NumPy .npy file (format version 1) in memory, for tests and fuzz seeds of locus's .npy reader:
// NumPy's header for `descr` and `shape` (a Python tuple, e.g. "(2, 3)"), padded as NumPy pads it,
// then `bytes` bytes of values.
#include <cstddef>
#include <string>

namespace locus_test {

inline std::string npy_file(const std::string& descr, const std::string& shape, const void* values, std::size_t bytes) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(values), bytes);
  return out;
}

} // namespace locus_test
