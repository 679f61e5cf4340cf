#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <locus/grouper/workload_model_json.hpp>
#include <string>
#include <unistd.h>
#include <vector>

using namespace locus;

namespace {

// Requests of four kinds, each routing mostly into its own block of experts (a splitmix stream,
// so the test is the same everywhere).
trace::trace kinds_trace(std::size_t requests) {
  const std::size_t experts = 32, k = 2, layers = 3, len = 24;
  trace::trace_builder b(experts, k, layers);
  b.set_domains({"d"});
  std::uint64_t state = 7;
  auto next = [&] {
    state += 0x9e3779b97f4a7c15ULL;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  for (std::size_t r = 0; r < requests; ++r) {
    b.add_request(r, 0, len);
    for (std::size_t i = 0; i < len; ++i) {
      const std::size_t t = r * len + i;
      b.set_token(t, i < 8 ? trace::phase::prefill : trace::phase::decode, i < 8 ? -1 : static_cast<int>(i - 8));
      for (std::size_t l = 0; l < layers; ++l) {
        auto ids = b.ids(l, t);
        const std::size_t first = (r % 4) * 8 + next() % 8;
        ids[0] = static_cast<trace::trace_expert_id>(first);
        ids[1] = static_cast<trace::trace_expert_id>(next() % 4 == 0 ? (first + 9) % experts : (first + 1) % experts);
      }
    }
  }
  return b.build();
}

// A model of four classes fitted on kinds_trace(40) on 2 × 2 GPUs, reading 8 prefill tokens.
grouper::workload_model fitted_model(const trace::trace& t) {
  grouper::workload_aware_options opt;
  opt.clusters = 4;
  opt.prefill_tokens = 8;
  return grouper::workload_model::fit(t, dynamic_topology(2, 2), opt);
}

} // namespace

BOOST_AUTO_TEST_SUITE(grouping_json)

// A saved and loaded model classifies every request exactly as the fitted one and gives the same
// node load; damaged documents are refused.
BOOST_AUTO_TEST_CASE(round_trip_gives_identical_assignments) {
  const auto t = kinds_trace(40);
  const auto fitted = fitted_model(t);
  const auto path = std::filesystem::temp_directory_path() / ("locus_grouping_" + std::to_string(::getpid()) + ".json");
  grouper::save_grouping(path.string(), fitted);
  const auto loaded = grouper::load_grouping(path.string());
  std::filesystem::remove(path);
  BOOST_TEST(loaded.clusters() == fitted.clusters());
  BOOST_TEST(loaded.cluster_node() == fitted.cluster_node(), boost::test_tools::per_element());
  BOOST_TEST(loaded.min_similarity() == fitted.min_similarity());
  for (std::size_t c = 0; c < fitted.clusters(); ++c)
    BOOST_TEST(loaded.class_min_similarity(c) == fitted.class_min_similarity(c));
  std::vector<std::uint32_t> s1, s2;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto a = fitted.classify(t, r, 8, s1), b = loaded.classify(t, r, 8, s2);
    BOOST_TEST(a.cluster == b.cluster);
    BOOST_TEST(a.similarity == b.similarity);
    BOOST_TEST(a.confident == b.confident);
  }
  BOOST_TEST(loaded.node_load() == fitted.node_load());

  auto doc = grouper::grouping_to_json(fitted);
  doc["version"] = 2;
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["cluster_node"][0] = 7; // node 7 of 2
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["means"].erase(0);
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc.erase("usage");
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["stride"] = std::uint64_t{1} << 60; // layers × experts × stride wraps to 0 class-mean values
  doc["means"] = nlohmann::json::array();
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["layers"] = std::uint64_t{1} << 40; // more layers than any trace
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["nodes"] = 100000000; // node_load() would allocate gigabytes
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  // Nested deeper than nlohmann's recursive dump() has stack for: quoted in the message, it
  // overflowed the stack.
  doc["nodes"] = nlohmann::json::parse(std::string(200000, '[') + std::string(200000, ']'));
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  doc = grouper::grouping_to_json(fitted);
  doc["class_min_similarity"].erase(0); // one threshold short
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
  // A file from before the thresholds were per class: every class takes the pooled threshold.
  doc = grouper::grouping_to_json(fitted);
  doc.erase("class_min_similarity");
  const auto old = grouper::grouping_from_json(doc);
  for (std::size_t c = 0; c < old.clusters(); ++c)
    BOOST_TEST(old.class_min_similarity(c) == fitted.min_similarity());
  // Such a file with a damaged cluster count: the pooled thresholds were filled for that count
  // before any check (2^60 clusters: an allocation of 2^62 bytes; found by fuzz_grouping).
  doc["clusters"] = std::uint64_t{1} << 60;
  BOOST_CHECK_THROW(grouper::grouping_from_json(doc), format_error);
}

// Values no fitted model holds are refused, not read: each of these loaded and changed what the
// model classifies or sums (a JSON number past a float's range reads as inf); one past a double's
// range is a format error of the file, not the JSON library's own exception.
BOOST_AUTO_TEST_CASE(values_no_fitted_model_holds_are_refused) {
  const auto t = kinds_trace(40);
  const auto fitted = fitted_model(t);
  BOOST_CHECK_NO_THROW(grouper::grouping_from_json(grouper::grouping_to_json(fitted)));
  const auto damaged = [&](auto&& edit, const char* what) {
    auto doc = grouper::grouping_to_json(fitted);
    edit(doc);
    BOOST_TEST_CONTEXT(what) {
      try {
        static_cast<void>(grouper::grouping_from_json(doc));
        BOOST_ERROR("loaded");
      } catch (const format_error& e) {
        BOOST_TEST(std::string(e.what()).find("grouping JSON") != std::string::npos, e.what());
      }
    }
  };
  damaged([](auto& d) { d["means"][3] = 1e39; }, "a class mean past float");
  damaged([](auto& d) { d["class_min_similarity"][1] = 1e39; }, "a threshold past float");
  damaged([](auto& d) { d["min_similarity"] = -1e39; }, "the pooled threshold past float");
  damaged([](auto& d) { d["usage"][0][5] = -1; }, "negative usage");
  damaged([](auto& d) { d["cluster_requests"][2] = -3; }, "a negative request count");
  damaged([](auto& d) { d["cluster_tokens"][0] = std::numeric_limits<double>::quiet_NaN(); }, "a NaN token count");
  damaged([](auto& d) { d["classifier_layer_stride"] = 1000000; }, "a stride the layers do not give");
  damaged([](auto& d) { d["options"]["prefill_tokens"] = 0; }, "no prefill tokens");
  damaged([](auto& d) { d["options"]["balance_slack"] = -0.5; }, "a negative slack");

  const auto path = std::filesystem::temp_directory_path() / ("locus_grouping_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream out(path);
    out << R"({"format": "locus-grouping", "version": 1e400})";
  }
  try {
    static_cast<void>(grouper::load_grouping(path.string()));
    BOOST_ERROR("loaded");
  } catch (const format_error& e) {
    BOOST_TEST(std::string(e.what()).find("number overflow") != std::string::npos, e.what());
  }
  std::filesystem::remove(path);
}

BOOST_AUTO_TEST_SUITE_END()
