// libFuzzer target: the binary trace reader. Any input must either decode or raise a locus error;
// an input that decodes must re-encode to the very same bytes (the format has one encoding per
// trace: zero padding and the reserved field are checked), which catches a reader that accepts
// more than the writer can produce.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <locus/trace/binary.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto t = locus::trace::decode_trace(bytes, "fuzz");
    const auto again = locus::trace::encode_trace(t);
    if (again.size() != size || std::memcmp(again.data(), data, size) != 0) std::abort();
  } catch (const locus::error&) {
  }
  return 0;
}
