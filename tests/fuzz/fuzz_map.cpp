// libFuzzer target: the expert-map JSON reader. Any input must either give maps that satisfy the
// placement rules and survive a round trip, or raise a locus error: no JSON-library exception,
// no abort, no allocation the input does not pay for (the input is at most -max_len bytes, and
// the run's -rss_limit_mb catches the rest).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <locus/core/expert_map_json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Parse errors are the reader's business in load_expert_maps; here the document reader is
  // fuzzed on every document nlohmann-json accepts (no exceptions: a discarded value is skipped).
  const auto doc = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return 0;
  try {
    const auto maps = locus::expert_maps_from_json(doc);
    const auto again = locus::expert_maps_from_json(locus::expert_maps_to_json(maps));
    if (again.size() != maps.size()) std::abort();
    for (std::size_t l = 0; l < maps.size(); ++l)
      if (!(again[l] == maps[l])) std::abort();
  } catch (const locus::error&) {
  }
  return 0;
}
