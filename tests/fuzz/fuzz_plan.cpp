// libFuzzer target: plan and simulate on fuzzed binary traces. Every trace the reader accepts
// must plan (linear, eplb, locality with the token-level stage) and simulate without a crash, a
// sanitizer report or an exception other than a locus error. Inputs are small (-max_len), so
// each run stays bounded; traces larger than the cap below are skipped to keep runs fast.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/trace/binary.hpp>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Both checksums are recomputed first, so that mutations reach the reader's value checks and the
  // planners instead of stopping at a checksum mismatch (fuzz_binary covers the checksums).
  std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                               reinterpret_cast<const std::byte*>(data) + size);
  if (size >= locus::trace::binary_header_bytes) {
    const std::uint64_t payload = locus::trace::checksum64::of(bytes.data() + 80, size - 80);
    std::memcpy(bytes.data() + 56, &payload, 8);
    const std::uint64_t header = locus::trace::checksum64::of(bytes.data(), 72);
    std::memcpy(bytes.data() + 72, &header, 8);
  }
  locus::trace::trace raw;
  try {
    raw = locus::trace::decode_trace(bytes, "fuzz");
  } catch (const locus::error&) {
    return 0;
  }
  if (raw.tokens() * raw.layers() > 4096 || raw.experts() > 256) return 0;
  const auto t = raw.with_prefill_tokens(1);
  const locus::dynamic_topology topo(2, 2);
  for (const char* placement : {"linear", "eplb", "locality"}) {
    try {
      locus::placement::activation_plan_options opt;
      opt.grouping.clusters = 2;
      const auto plan = locus::placement::plan_activation_aware(t, topo, placement, size % 3, opt);
      auto g = locus::grouper::grouper_by_name("workload_aware", plan.model);
      locus::cost::simulation_config cfg;
      cfg.topology = topo;
      cfg.batch_per_rank = 2;
      cfg.max_steps = 20;
      (void)locus::cost::simulate_decode(t, plan.maps, g, cfg);
    } catch (const locus::error&) {
    }
  }
  return 0;
}
