// libFuzzer target: the .npy reader of `placement::import_load` (expert loads saved by NumPy, e.g.
// SGLang's or vLLM's expert-distribution recorders). The first byte chooses the expert count the
// caller passes (0: inferred), the rest is the file. Any input must either give loads of one row
// per layer, every value finite and non-negative, or raise a locus error: no other exception, no
// abort, no allocation the file does not pay for.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <locus/placement/load_import.hpp>
#include <string>
#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const std::string path = "/tmp/locus_fuzz_npy_" + std::to_string(::getpid()) + ".npy";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  std::fwrite(data + 1, 1, size - 1, f);
  std::fclose(f);
  try {
    const auto got = locus::placement::import_load(path, data[0] % 16);
    if (got.layer_ids.size() != got.load.size()) std::abort();
    for (const auto& row : got.load)
      for (double v : row)
        if (!std::isfinite(v) || v < 0) std::abort();
  } catch (const locus::error&) {
  }
  std::remove(path.c_str()); // nothing left in /tmp when the run ends
  return 0;
}
