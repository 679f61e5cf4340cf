// Request names (a route JSONL log's string req_ids): kept by the trace, its selections and the
// binary format (version 3), refused when partial, too long or damaged.
#include "../support/error_message.hpp"
#include "../support/trace_bytes.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstring>
#include <locus/trace/binary.hpp>
#include <string>
#include <vector>

using namespace locus;
using namespace locus::trace;

namespace {

// Three requests, 2 layers, 8 experts, top-2, named by `names` (empty: unnamed).
locus::trace::trace named(const std::vector<std::string>& names, std::vector<std::uint32_t> layers = {}) {
  trace_builder b(8, 2, 2);
  b.set_domains({"a"});
  b.set_model_layers(std::move(layers));
  const std::size_t lengths[] = {2, 1, 3};
  for (std::size_t r = 0; r < 3; ++r)
    b.add_request(r, 0, lengths[r], names.empty() ? std::string_view() : std::string_view(names[r]));
  for (std::size_t l = 0; l < 2; ++l)
    for (std::size_t t = 0; t < b.tokens(); ++t) {
      b.ids(l, t)[0] = static_cast<trace_expert_id>((t + l) % 8);
      b.ids(l, t)[1] = static_cast<trace_expert_id>((t + l + 5) % 8);
    }
  return b.build();
}

} // namespace

BOOST_AUTO_TEST_SUITE(trace_request_names)

BOOST_AUTO_TEST_CASE(names_survive_the_binary_format_and_selections) {
  const std::vector<std::string> names = {"cmpl-a", "cmpl-\xc3\xa9\t\"b\"", std::string(max_trace_request_name, 'z')};
  const auto t = named(names);
  BOOST_TEST(t.has_request_names());
  BOOST_TEST(!t.has_model_layers());
  for (std::size_t r = 0; r < 3; ++r)
    BOOST_TEST(t.request_name(r) == names[r]);
  BOOST_TEST(t.request_label(0) == "\"cmpl-a\"");
  const auto bytes = encode_trace(t);
  BOOST_TEST(locus_test::version_of(bytes) == 3u);
  const auto back = decode_trace(bytes);
  BOOST_TEST((back == t));
  BOOST_TEST(back.request_name(1) == names[1]);
  BOOST_TEST(!back.has_model_layers());      // no layer table: the file adds no layer ids
  BOOST_TEST((encode_trace(back) == bytes)); // one encoding per file
  // With model layer ids too (the layer table comes first, as its flag says).
  const auto both = named(names, {3, 9});
  const auto both_bytes = encode_trace(both);
  BOOST_TEST(locus_test::version_of(both_bytes) == 3u);
  BOOST_TEST(locus_test::flags_of(both_bytes) == 3u);
  BOOST_TEST(locus_test::flags_of(bytes) == 2u);
  BOOST_TEST((decode_trace(both_bytes) == both));
  BOOST_TEST(decode_trace(both_bytes).model_layer(1) == 9u);
  // Selections keep each request's name.
  const std::size_t pick[] = {2, 0, 2};
  const auto sel = t.select_requests(pick);
  BOOST_TEST(sel.request_name(0) == names[2]);
  BOOST_TEST(sel.request_name(1) == names[0]);
  BOOST_TEST(sel.request_name(2) == names[2]);
  const auto tail = t.select_positions(2, 5); // only request 2 has a third token
  BOOST_TEST(tail.requests() == 1u);
  BOOST_TEST(tail.request_name(0) == names[2]);
  BOOST_TEST(t.with_prefill_tokens(1).request_name(1) == names[1]);
  BOOST_TEST(t.select_layers(1, 1).request_name(0) == names[0]);
  // Names take part in equality.
  BOOST_TEST(!(named({"x", "y", "z"}) == named({"x", "y", "w"})));
  BOOST_TEST(!(named({"x", "y", "z"}) == named({})));
}

// Names in messages and lists: plain where they read back as themselves, a JSON string where
// they hold a comma, a quote, a backslash, a control character or spaces at an end (or are empty).
BOOST_AUTO_TEST_CASE(names_are_quoted_where_a_list_would_misread_them) {
  BOOST_TEST(listed_name("law") == "law");
  BOOST_TEST(listed_name("summary text") == "summary text");
  BOOST_TEST(listed_name("caf\xC3\xA9") == "caf\xC3\xA9"); // UTF-8 as it is
  BOOST_TEST(listed_name("law, civil") == "\"law, civil\"");
  BOOST_TEST(listed_name("") == "\"\"");
  BOOST_TEST(listed_name(" law") == "\" law\"");
  BOOST_TEST(listed_name("law\t") == "\"law\\t\"");
  BOOST_TEST(listed_name("say \"hi\"") == "\"say \\\"hi\\\"\"");
  BOOST_TEST(listed_name("a\\b") == "\"a\\\\b\"");
  BOOST_TEST(listed_name(std::string("a\nb\x01", 4)) == "\"a\\nb\\u0001\"");
  BOOST_TEST(quoted_name("law") == "\"law\"");
  // A message naming an unknown domain lists the others so.
  trace_builder b(4, 1, 1);
  b.set_domains({"law, civil", "intent"});
  b.add_request(0, 0, 1);
  b.ids(0, 0)[0] = 1;
  b.weights(0, 0)[0] = 1;
  const auto t = b.build();
  BOOST_TEST(locus_test::error_message<config_error>([&] { t.domain_index("law", "--train-domains"); }) ==
             "--train-domains: the trace has no domain \"law\" (its domains: \"law, civil\", intent)");
  BOOST_TEST(t.domain_index("law, civil", "x") == 0u);
}

BOOST_AUTO_TEST_CASE(an_unnamed_trace_keeps_its_old_encoding) {
  const auto t = named({});
  BOOST_TEST(!t.has_request_names());
  BOOST_TEST(t.request_name(1).empty());
  BOOST_TEST(t.request_label(1) == "1");
  BOOST_TEST(locus_test::version_of(encode_trace(t)) == 1u);
  BOOST_TEST(locus_test::version_of(encode_trace(named({}, {3, 9}))) == 2u);
  BOOST_CHECK_THROW((void)t.request_name(3), invalid_input_error);
}

// A hidden-layer count without layer ids is version 3 with no section flag: version 2 would add
// the identity ids, and the trace read back would claim layer ids its source never gave.
BOOST_AUTO_TEST_CASE(a_hidden_layer_count_alone_adds_no_layer_ids) {
  trace_builder b(8, 2, 2);
  b.set_domains({"a"});
  b.set_model_layers({}, 61);
  b.add_request(0, 0, 1);
  b.ids(0, 0)[1] = 1;
  b.ids(1, 0)[1] = 1;
  const auto t = b.build();
  const auto bytes = encode_trace(t);
  BOOST_TEST(locus_test::version_of(bytes) == 3u);
  BOOST_TEST(locus_test::flags_of(bytes) == 0u);
  const auto back = decode_trace(bytes);
  BOOST_TEST((back == t));
  BOOST_TEST(!back.has_model_layers());
  BOOST_TEST(back.hidden_layers() == 61u);
  // Equality tells given layer ids from none.
  trace_builder c(8, 2, 2);
  c.set_domains({"a"});
  c.set_model_layers({0, 1}, 61);
  c.add_request(0, 0, 1);
  c.ids(0, 0)[1] = 1;
  c.ids(1, 0)[1] = 1;
  BOOST_TEST(!(c.build() == t));
}

BOOST_AUTO_TEST_CASE(partial_or_long_names_are_refused) {
  BOOST_CHECK_THROW(named({"a", "", "c"}), invalid_input_error);
  BOOST_CHECK_THROW(named({"", "", "c"}), invalid_input_error);
  BOOST_CHECK_THROW(named({"a", std::string(max_trace_request_name + 1, 'n'), "c"}), invalid_input_error);
  try {
    (void)named({"a", "", "c"});
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message().find("request 1 has no name but request 0 has one") != std::string::npos, e.message());
  }
}

BOOST_AUTO_TEST_CASE(damaged_name_tables_are_named) {
  const auto good = encode_trace(named({"p", "qq", "rrr"}));
  const std::size_t table = 80 + 8; // after the domain table ("a"); no layer table
  // A zero and an oversized length, both checksums recomputed so that only the length is wrong.
  for (const std::uint32_t len : {0u, 5000u}) {
    auto bad = good;
    std::memcpy(bad.data() + table, &len, 4);
    locus_test::reseal_trace(bad);
    const auto msg = locus_test::error_message<format_error>([&] { (void)decode_trace(bad); });
    BOOST_TEST(msg.find("offset 88: request 0 name length " + std::to_string(len) + ", expected 1..4096") !=
                   std::string::npos,
               msg);
  }
  // A longer name that stays inside the file shifts every section: the counts disagree.
  {
    auto bad = good;
    const std::uint32_t two = 2;
    std::memcpy(bad.data() + table, &two, 4);
    locus_test::reseal_trace(bad);
    BOOST_TEST(locus_test::error_message<format_error>([&] { (void)decode_trace(bad); }) != locus_test::no_error);
  }
  // Every cut and every flipped byte of a version-3 file is refused, never read as something else.
  for (std::size_t n = 0; n < good.size(); ++n)
    BOOST_CHECK_THROW((void)decode_trace(std::span<const std::byte>(good.data(), n)), format_error);
  for (std::size_t i = 0; i < good.size(); ++i) {
    auto bad = good;
    bad[i] ^= std::byte{0x01};
    BOOST_CHECK_THROW((void)decode_trace(bad), format_error);
  }
  // Unknown section flags, and a version 3 that says what version 1 or 2 would, are refused.
  for (const std::uint64_t field : {std::uint64_t{7} << 32, std::uint64_t{0}, std::uint64_t{1} << 32}) {
    auto bad = good;
    std::memcpy(bad.data() + 64, &field, 8);
    locus_test::reseal_trace(bad);
    const auto msg = locus_test::error_message<format_error>([&] { (void)decode_trace(bad); });
    BOOST_TEST(msg.find("offset 64: ") != std::string::npos, msg);
  }
  // A request count the payload cannot hold names for is refused before anything is allocated.
  {
    auto bad = good;
    const std::uint64_t many = std::uint64_t{1} << 40;
    std::memcpy(bad.data() + 32, &many, 8);
    std::memcpy(bad.data() + 40, &many, 8); // tokens >= requests
    locus_test::reseal_trace(bad);
    const auto msg = locus_test::error_message<format_error>([&] { (void)decode_trace(bad); });
    BOOST_TEST(msg.find("request names cannot fit") != std::string::npos, msg);
  }
}

BOOST_AUTO_TEST_SUITE_END()
