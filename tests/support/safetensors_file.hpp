#pragma once
// A safetensors file in memory, for tests and fuzz seeds of locus's TensorRT-LLM statistics reader:
// the 8-byte little-endian header size, the JSON header, then each tensor's bytes in order (the
// data offsets tile the buffer, as the format requires).
#include <cstddef>
#include <string>
#include <vector>

namespace locus_test {

struct safetensor {
  std::string name, dtype;        //!< e.g. "100_3", "I32"
  std::vector<std::size_t> shape; //!< e.g. {3}
  std::string bytes;              //!< little-endian values
};

inline std::string safetensors_file(const std::vector<safetensor>& tensors, const std::string& metadata = "") {
  std::string header = "{", body;
  if (!metadata.empty()) header += "\"__metadata__\":" + metadata;
  for (const auto& t : tensors) {
    if (header.size() > 1) header += ',';
    std::string shape;
    for (const std::size_t x : t.shape)
      shape += (shape.empty() ? "" : ",") + std::to_string(x);
    header += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[" + shape + "],\"data_offsets\":[" +
              std::to_string(body.size()) + "," + std::to_string(body.size() + t.bytes.size()) + "]}";
    body += t.bytes;
  }
  header += "}";
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + body;
}

//! The bytes of `values` as they lie in memory (little-endian on the machines locus runs on).
template <class T>
std::string bytes_of(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

} // namespace locus_test
