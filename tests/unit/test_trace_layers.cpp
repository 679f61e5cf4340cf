#include "../support/trace_bytes.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstring>
#include <locus/trace/binary.hpp>
#include <vector>

using namespace locus;
using namespace locus::trace;

namespace {

// Two requests, 3 layers, 8 experts, top-2, with model layer ids when given.
locus::trace::trace small(std::vector<std::uint32_t> ids = {}, std::uint32_t hidden = 0) {
  trace_builder b(8, 2, 3);
  b.set_domains({"a"});
  b.set_model_layers(std::move(ids), hidden);
  b.add_request(10, 0, 2);
  b.add_request(11, 0, 1);
  for (std::size_t l = 0; l < 3; ++l)
    for (std::size_t t = 0; t < 3; ++t) {
      auto id = b.ids(l, t);
      id[0] = static_cast<trace_expert_id>((t + l) % 8);
      id[1] = static_cast<trace_expert_id>((t + l + 3) % 8);
    }
  return b.build();
}

} // namespace

BOOST_AUTO_TEST_SUITE(trace_model_layers)

BOOST_AUTO_TEST_CASE(layer_ids_survive_the_binary_format_and_selections) {
  const auto t = small({1, 2, 5}, 7);
  BOOST_TEST(t.model_layer_ids() == (std::vector<std::size_t>{1, 2, 5}), boost::test_tools::per_element());
  BOOST_TEST(t.hidden_layers() == 7u);
  const auto bytes = encode_trace(t);
  BOOST_TEST(locus_test::version_of(bytes) == 2u);
  const auto back = decode_trace(bytes);
  BOOST_TEST((back == t));
  BOOST_TEST(back.model_layer_ids() == t.model_layer_ids(), boost::test_tools::per_element());
  BOOST_TEST(back.hidden_layers() == 7u);
  BOOST_TEST((encode_trace(back) == bytes)); // one encoding per file
  // Selections keep the ids of the layers they keep.
  BOOST_TEST(t.select_layers(1, 2).model_layer_ids() == (std::vector<std::size_t>{2, 5}),
             boost::test_tools::per_element());
  BOOST_TEST(small().select_layers(1, 2).model_layer_ids() == (std::vector<std::size_t>{1, 2}),
             boost::test_tools::per_element());
  BOOST_TEST(t.select_positions(0, 1).model_layer_ids() == t.model_layer_ids(), boost::test_tools::per_element());
  const std::size_t first[] = {1};
  BOOST_TEST(t.select_requests(first).hidden_layers() == 7u);
}

BOOST_AUTO_TEST_CASE(a_trace_without_ids_is_written_as_version_1) {
  const auto t = small();
  BOOST_TEST(!t.has_model_layers());
  BOOST_TEST(t.model_layer_ids() == (std::vector<std::size_t>{0, 1, 2}), boost::test_tools::per_element());
  const auto bytes = encode_trace(t);
  BOOST_TEST(locus_test::version_of(bytes) == 1u);
  BOOST_TEST((decode_trace(bytes) == t));
}

BOOST_AUTO_TEST_CASE(bad_layer_ids_are_refused) {
  BOOST_CHECK_THROW(small({1, 1, 2}), invalid_input_error); // not ascending
  BOOST_CHECK_THROW(small({1, 2}), invalid_input_error);    // one id short
  BOOST_CHECK_THROW(small({1, 2, 7}, 7), invalid_input_error);
  // A file whose layer table descends (both checksums recomputed, so only the table is wrong).
  auto bytes = encode_trace(small({1, 2, 5}, 7));
  const std::size_t table = 80 + 8; // after the one-entry domain table ("a": 4 + 1 bytes, padded to 8)
  const std::uint32_t two = 2;
  std::memcpy(bytes.data() + table + 8, &two, 4); // layer 2 = 2, not above layer 1's 2
  locus_test::reseal_trace(bytes);
  try {
    decode_trace(bytes);
    BOOST_FAIL("a descending layer table was accepted");
  } catch (const format_error& e) {
    BOOST_TEST(e.offset() == table + 8);
    BOOST_TEST(std::string(e.what()).find("layer 2 is model layer 2") != std::string::npos);
  }
}

BOOST_AUTO_TEST_SUITE_END()
