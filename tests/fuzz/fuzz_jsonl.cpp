// libFuzzer target: the route-JSONL importer. Byte 0 picks the options (fail or skip-and-count,
// request reconstruction, experts declared or taken from a meta line, ragged layers trimmed or
// refused); the rest is the file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <locus/trace/jsonl.hpp>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  locus::trace::jsonl_options o;
  o.skip_bad = (data[0] & 1) != 0;
  o.split_on_restart = (data[0] & 2) != 0;
  o.experts = (data[0] & 4) ? 0 : 8;
  o.top_k = (data[0] & 8) ? 2 : 0;
  o.trim_ragged = (data[0] & 16) == 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  locus::trace::jsonl_report rep;
  try {
    const auto t = locus::trace::import_jsonl_text(text, "fuzz", o, &rep);
    std::size_t tokens = 0;
    for (const auto& q : t.request_table())
      tokens += q.length;
    if (tokens != t.tokens() || rep.route_records < t.tokens() * t.layers() || rep.lines == 0) std::abort();
    if (!o.skip_bad && (rep.bad_records != 0 || rep.dropped_requests != 0)) std::abort();
    if (!o.trim_ragged && rep.trimmed_requests != 0) std::abort();
    if ((rep.trimmed_requests == 0) != (rep.trimmed_tokens == 0)) std::abort();
  } catch (const locus::error&) {
  }
  return 0;
}
