// libFuzzer target: the workload-aware grouping model's JSON reader (`locus plan --grouping`
// files). Any input must either give a model that survives a round trip, classifies a request of
// its own shape and gives its node load without fault, or raise a locus error: no JSON-library
// exception, no abort, no allocation the input does not pay for.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <locus/grouper/workload_model_json.hpp>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto doc = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return 0;
  try {
    const auto m = locus::grouper::grouping_from_json(doc);
    const auto again = locus::grouper::grouping_from_json(locus::grouper::grouping_to_json(m));
    if (again.clusters() != m.clusters() || again.cluster_node() != m.cluster_node() || again.layers() != m.layers() ||
        again.experts() != m.experts())
      std::abort();
    // One request of the model's shape: two tokens, each on expert (token + layer) mod experts.
    locus::trace::trace_builder b(m.experts(), 1, m.layers());
    b.set_domains({"fuzz"});
    b.add_request(0, 0, 2);
    for (std::size_t t = 0; t < 2; ++t)
      for (std::size_t l = 0; l < m.layers(); ++l) {
        b.ids(l, t)[0] = static_cast<locus::trace::trace_expert_id>((t + l) % m.experts());
        b.weights(l, t)[0] = 1.0f;
      }
    const auto t = b.build().with_prefill_tokens(2);
    std::vector<std::uint32_t> scratch;
    const auto c = m.classify(t, 0, 2, scratch);
    if (c.cluster >= m.clusters()) std::abort();
    const auto again_c = again.classify(t, 0, 2, scratch);
    if (again_c.cluster != c.cluster || again_c.confident != c.confident) std::abort();
    const auto load = m.node_load();
    if (load.size() != m.layers()) std::abort();
  } catch (const locus::error&) {
  }
  return 0;
}
