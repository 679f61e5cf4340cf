#pragma once
// Reading and editing an encoded binary trace in tests: its version and version 3's section flags,
// and both checksums recomputed (with the library's checksum64) after a field was changed, so that
// only the field itself is wrong.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/trace/binary.hpp>
#include <vector>

namespace locus_test {

inline std::uint32_t version_of(const std::vector<std::byte>& bytes) {
  std::uint32_t v;
  std::memcpy(&v, bytes.data() + 8, 4);
  return v;
}

//! Version 3's section flags (1: layer table, 2: request names).
inline std::uint32_t flags_of(const std::vector<std::byte>& bytes) {
  std::uint32_t v;
  std::memcpy(&v, bytes.data() + 68, 4);
  return v;
}

inline void reseal_trace(std::vector<std::byte>& bytes) {
  const auto payload = locus::trace::checksum64::of(bytes.data() + 80, bytes.size() - 80);
  std::memcpy(bytes.data() + 56, &payload, 8);
  const auto header = locus::trace::checksum64::of(bytes.data(), 72);
  std::memcpy(bytes.data() + 72, &header, 8);
}

} // namespace locus_test
