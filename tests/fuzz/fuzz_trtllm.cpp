// libFuzzer target: the TensorRT-LLM expert-statistics reader of `placement::import_load` (a folder
// of meta_info.json and rank*.safetensors). The input is split at the marker "#@#" into the
// meta_info.json text and up to two safetensors files (rank0, rank1), written into a folder of this
// process. Any input must either give one row per layer, every row num_experts long, layers in
// increasing order, every value finite and non-negative, or raise a locus error: no other
// exception, no abort, no allocation the files do not pay for.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <locus/placement/load_import.hpp>
#include <string>
#include <string_view>
#include <unistd.h>

namespace {
void put(const std::filesystem::path& p, std::string_view bytes) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  if (!f) std::abort();
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // The folder goes when the run ends (libFuzzer exits through exit(), which runs this destructor).
  static const struct scratch {
    std::filesystem::path dir =
        std::filesystem::temp_directory_path() / ("locus_fuzz_trtllm_" + std::to_string(::getpid()));
    ~scratch() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } folder;
  const std::filesystem::path& dir = folder.dir;
  std::filesystem::create_directories(dir);
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  constexpr std::string_view marker = "#@#";
  std::string_view parts[3];
  std::size_t n = 0; // parts present: meta_info.json, then the safetensors files
  while (n < 3) {
    const auto cut = n < 2 ? rest.find(marker) : std::string_view::npos;
    parts[n++] = rest.substr(0, cut);
    if (cut == std::string_view::npos) break;
    rest.remove_prefix(cut + marker.size());
  }
  put(dir / "meta_info.json", parts[0]);
  for (std::size_t r = 0; r < 2; ++r) {
    const auto p = dir / ("rank" + std::to_string(r) + ".safetensors");
    if (r + 1 < n)
      put(p, parts[r + 1]);
    else
      std::filesystem::remove(p);
  }
  try {
    const auto got = locus::placement::import_load(dir.string());
    if (got.layer_ids.size() != got.load.size() || got.load.empty()) std::abort();
    // A folder that loads declared its expert count, and every row has that many values.
    const auto meta = nlohmann::json::parse(parts[0]);
    if (got.load.front().size() != meta.at("num_experts").get<std::uint64_t>()) std::abort();
    for (std::size_t l = 0; l < got.load.size(); ++l) {
      if (got.load[l].size() != got.load.front().size() || got.load[l].empty()) std::abort();
      if (l > 0 && got.layer_ids[l] <= got.layer_ids[l - 1]) std::abort();
      for (double v : got.load[l])
        if (!std::isfinite(v) || v < 0) std::abort();
    }
  } catch (const locus::error&) {
  }
  return 0;
}
