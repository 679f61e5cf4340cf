#define BOOST_TEST_MODULE trace
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/trace.hpp>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace locus;
namespace fs = std::filesystem;

namespace {

// ------------------------------------------------------------------------------------------
// Helpers: a random trace, a scratch folder, and error-message checks.
// ------------------------------------------------------------------------------------------

//! A trace with random distinct ids per token and random weights; domains "a", "b", "c".
trace::trace random_trace(std::uint32_t seed, std::size_t requests, std::size_t experts, std::size_t k,
                          std::size_t layers, std::size_t max_len = 12) {
  std::mt19937 rng(seed);
  trace::trace_builder b(experts, k, layers);
  b.set_domains({"a", "bb", "ccc"});
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(1000 + r, static_cast<std::uint32_t>(rng() % 3), 1 + rng() % max_len);
  std::vector<trace::trace_expert_id> pool(experts);
  std::uniform_real_distribution<float> w(0.0f, 1.0f);
  for (std::size_t t = 0; t < b.tokens(); ++t) {
    b.set_token(t, rng() % 2 ? trace::phase::prefill : trace::phase::decode, static_cast<std::int32_t>(rng() % 5) - 1);
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t e = 0; e < experts; ++e)
        pool[e] = static_cast<trace::trace_expert_id>(e);
      for (std::size_t j = 0; j < k; ++j) {
        std::swap(pool[j], pool[j + rng() % (experts - j)]);
        b.ids(l, t)[j] = pool[j];
        b.weights(l, t)[j] = w(rng);
      }
    }
  }
  return b.build();
}

struct scratch_dir {
  fs::path path;
  explicit scratch_dir(const std::string& tag) {
    path = fs::temp_directory_path() / ("locus_test_trace_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

//! Runs `f`, requires a format_error whose message contains every needle, returns its offset.
template <class F>
std::uint64_t expect_format_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const format_error& e) {
    for (const auto& n : needles)
      BOOST_TEST(e.message().find(n) != std::string::npos, "message \"" << e.message() << "\" lacks \"" << n << "\"");
    return e.offset();
  } catch (const std::exception& e) {
    BOOST_FAIL("expected locus::format_error, got: " << e.what());
  }
  BOOST_FAIL("expected locus::format_error, nothing was thrown");
  return 0;
}

// ------------------------------------------------------------------------------------------
// An independent, byte-at-a-time reading of the binary format spec (docs/trace-format.md).
// ------------------------------------------------------------------------------------------

std::uint64_t le(const std::vector<std::byte>& b, std::size_t at, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i)
    v = (v << 8) | static_cast<std::uint8_t>(b[at + i]);
  return v;
}
void put_le(std::vector<std::byte>& b, std::size_t at, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i)
    b[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

std::uint64_t rotl(std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

//! The checksum as the spec words it: 32-byte blocks, four lanes, zero-padded tail, length mix.
std::uint64_t reference_checksum(const std::vector<std::byte>& b, std::size_t from, std::size_t n) {
  const std::uint64_t m1 = 0x9e3779b97f4a7c15ull, m2 = 0xbf58476d1ce4e5b9ull, m3 = 0x94d049bb133111ebull;
  std::uint64_t lane[4] = {m1, m2, m3, m1 ^ m2};
  for (std::size_t blk = 0; blk < n; blk += 32) {
    for (int i = 0; i < 4; ++i) {
      std::uint64_t w = 0;
      for (int j = 7; j >= 0; --j) {
        const std::size_t at = blk + 8 * i + j;
        w = (w << 8) | (at < n ? static_cast<std::uint8_t>(b[from + at]) : 0u);
      }
      lane[i] = rotl(lane[i] ^ (w * m2), 29) * m1;
    }
  }
  std::uint64_t h = rotl(lane[0], 1) + rotl(lane[1], 7) + rotl(lane[2], 12) + rotl(lane[3], 18);
  h ^= static_cast<std::uint64_t>(n) * m1;
  h = (h ^ (h >> 30)) * m2;
  h = (h ^ (h >> 27)) * m3;
  return h ^ (h >> 31);
}

//! Recomputes both checksums after a deliberate edit, so that only the edited field is wrong.
void reseal(std::vector<std::byte>& b) {
  put_le(b, 56, reference_checksum(b, 80, b.size() - 80), 8);
  put_le(b, 72, reference_checksum(b, 0, 72), 8);
}

//! Section offsets of an encoded trace, computed from the header alone.
struct layout {
  std::size_t requests_at, phases_at, steps_at;
  std::vector<std::size_t> ids_at, weights_at;
};
std::size_t a8(std::size_t n) { return (n + 7) / 8 * 8; }
layout layout_of(const std::vector<std::byte>& b) {
  const auto domains = le(b, 28, 4), requests = le(b, 32, 8), tokens = le(b, 40, 8), k = le(b, 20, 4),
             layers = le(b, 24, 4);
  std::size_t at = 80;
  for (std::uint64_t d = 0; d < domains; ++d)
    at += 4 + le(b, at, 4);
  layout o;
  o.requests_at = a8(at);
  o.phases_at = o.requests_at + 16 * requests;
  o.steps_at = a8(o.phases_at + tokens);
  at = a8(o.steps_at + 4 * tokens);
  for (std::uint64_t l = 0; l < layers; ++l) {
    o.ids_at.push_back(at);
    at = a8(at + 2 * tokens * k);
    o.weights_at.push_back(at);
    at = a8(at + 4 * tokens * k);
  }
  BOOST_REQUIRE_EQUAL(at, b.size());
  return o;
}

} // namespace

// ==========================================================================================
// Model, builder, slicing
// ==========================================================================================

BOOST_AUTO_TEST_CASE(builder_lays_out_requests_contiguously) {
  trace::trace_builder b(8, 2, 3);
  BOOST_TEST(b.domain("x") == 0u);
  BOOST_TEST(b.domain("y") == 1u);
  BOOST_TEST(b.domain("x") == 0u); // existing name: same index
  const auto r0 = b.add_request(7, 1, 3);
  const auto r1 = b.add_request(9, 0, 2);
  BOOST_TEST(r0 == 0u);
  BOOST_TEST(r1 == 1u);
  // Fill: token t, layer l, choice j gets expert (t + l + 3j) % 8 and weight t + l / 10 + j / 100.
  for (std::size_t t = 0; t < 5; ++t)
    for (std::size_t l = 0; l < 3; ++l)
      for (std::size_t j = 0; j < 2; ++j) {
        b.ids(l, t)[j] = static_cast<trace::trace_expert_id>((t + l + 3 * j) % 8);
        b.weights(l, t)[j] =
            static_cast<float>(static_cast<double>(t) + static_cast<double>(l) / 10.0 + static_cast<double>(j) / 100.0);
      }
  b.set_token(4, trace::phase::decode, 3);
  const auto t = b.build();
  BOOST_TEST(t.experts() == 8u);
  BOOST_TEST(t.top_k() == 2u);
  BOOST_TEST(t.layers() == 3u);
  BOOST_TEST(t.requests() == 2u);
  BOOST_TEST(t.tokens() == 5u);
  BOOST_TEST(t.request(0).id == 7u);
  BOOST_TEST(t.request(0).domain == 1u);
  BOOST_TEST(t.request(0).first_token == 0u);
  BOOST_TEST(t.request(1).first_token == 3u);
  BOOST_TEST(t.request(1).length == 2u);
  BOOST_TEST((t.token_phase(0) == trace::phase::unknown));
  BOOST_TEST(t.token_step(0) == -1);
  BOOST_TEST((t.token_phase(4) == trace::phase::decode));
  BOOST_TEST(t.token_step(4) == 3);
  for (std::size_t l = 0; l < 3; ++l) {
    const auto v = t.layer(l);
    BOOST_TEST(v.tokens() == 5u);
    for (std::size_t tok = 0; tok < 5; ++tok)
      for (std::size_t j = 0; j < 2; ++j) {
        BOOST_TEST(v.ids()[tok * 2 + j] == (tok + l + 3 * j) % 8);
        BOOST_TEST(v.weights()[tok * 2 + j] ==
                   static_cast<float>(static_cast<double>(tok) + static_cast<double>(l) / 10.0 +
                                      static_cast<double>(j) / 100.0));
      }
    const auto q = t.request_layer(1, l);
    BOOST_TEST(q.tokens() == 2u);
    BOOST_TEST(q.ids()[0] == (3 + l) % 8);
  }
  // 3 layers × 5 tokens × 2 × 6 bytes + 5 × 5 + 2 request records.
  BOOST_TEST(t.memory_bytes() == 3u * 5 * 2 * 6 + 5 * 5 + 2 * sizeof(trace::request_info));
  BOOST_TEST(std::string(trace::to_string(trace::phase::prefill)) == "prefill");
}

BOOST_AUTO_TEST_CASE(builder_rejects_bad_shapes_and_data) {
  BOOST_CHECK_THROW(trace::trace_builder(0, 1, 1), invalid_input_error);
  BOOST_CHECK_THROW(trace::trace_builder(65537, 1, 1), invalid_input_error);
  BOOST_CHECK_THROW(trace::trace_builder(4, 5, 1), invalid_input_error);
  BOOST_CHECK_THROW(trace::trace_builder(128, 65, 1), invalid_input_error);
  BOOST_CHECK_THROW(trace::trace_builder(4, 2, 0), invalid_input_error);
  {
    trace::trace_builder b(4, 2, 1);
    BOOST_CHECK_THROW(b.add_request(0, 0, 1), invalid_input_error); // no domain yet
    b.domain("d");
    BOOST_CHECK_THROW(b.add_request(0, 0, 0), invalid_input_error);
    b.add_request(0, 0, 2);
    BOOST_CHECK_THROW(b.ids(1, 0), invalid_input_error);
    BOOST_CHECK_THROW(b.ids(0, 2), invalid_input_error);
    b.ids(0, 1)[1] = 4; // out of range for 4 experts
    try {
      (void)b.build();
      BOOST_FAIL("build accepted expert id 4 of 4");
    } catch (const invalid_input_error& e) {
      BOOST_TEST(e.message().find("layer 0 token 1 choice 1: expert id 4 is out of range [0, 4)") != std::string::npos,
                 e.message());
    }
  }
  {
    trace::trace_builder b(4, 2, 1);
    b.domain("d");
    b.add_request(0, 0, 1);
    b.weights(0, 0)[0] = std::numeric_limits<float>::quiet_NaN();
    BOOST_CHECK_THROW((void)b.build(), invalid_input_error);
  }
  {
    trace::trace_builder b(4, 2, 1);
    b.domain("d");
    b.add_request(0, 0, 1);
    b.weights(0, 0)[1] = -std::numeric_limits<float>::infinity();
    BOOST_CHECK_THROW((void)b.build(), invalid_input_error);
  }
}

// The branch-free validators against std::isfinite and a sign test / a plain comparison, with every
// special value at every position of short lengths.
BOOST_AUTO_TEST_CASE(validators_match_a_per_value_reference) {
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -2.5f,
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::signaling_NaN(),
                            -std::numeric_limits<float>::denorm_min()};
  for (std::size_t n = 0; n <= 5; ++n)
    for (std::size_t at = 0; at < std::max<std::size_t>(n, 1); ++at)
      for (float v : specials) {
        std::vector<float> w(n, 0.5f);
        if (n) w[at] = v;
        const bool want = n == 0 || (std::isfinite(v) && v >= 0); // -0 >= 0
        BOOST_TEST(trace::trace_builder::weights_valid(w.data(), n) == want, "n " << n << " at " << at << " " << v);
      }
  for (std::size_t n = 1; n <= 5; ++n)
    for (std::size_t at = 0; at < n; ++at) {
      std::vector<trace::trace_expert_id> ids(n, 3);
      ids[at] = 9;
      BOOST_TEST(trace::trace_builder::ids_in_range(ids.data(), n, 10));
      BOOST_TEST(!trace::trace_builder::ids_in_range(ids.data(), n, 9));
    }
}

BOOST_AUTO_TEST_CASE(accessors_check_their_indices) {
  const auto t = random_trace(1, 4, 8, 2, 2);
  BOOST_CHECK_THROW(t.request(4), invalid_input_error);
  BOOST_CHECK_THROW(t.layer(2), invalid_input_error);
  BOOST_CHECK_THROW(t.token_phase(t.tokens()), invalid_input_error);
  BOOST_CHECK_THROW(t.token_step(t.tokens()), invalid_input_error);
  BOOST_CHECK_THROW(t.select_domain(3), invalid_input_error);
  BOOST_CHECK_THROW(t.select_layers(1, 2), invalid_input_error);
  BOOST_CHECK_THROW(t.select_layers(0, 0), invalid_input_error);
  // first + count wraps past 2^64 - 1: refused by select_layers itself, not by model_layer(2^64 - 1).
  try {
    (void)t.select_layers(~std::size_t{0}, 2);
    BOOST_ERROR("select_layers accepted layers from 2^64 - 1");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message() == "trace::select_layers: 2 layers from layer 18446744073709551615 are not inside [0, 2)");
  }
  const std::size_t bad[] = {0, 4};
  BOOST_CHECK_THROW(t.select_requests(bad), invalid_input_error);
}

// Every slice is checked entry by entry against the source, indexed by (request, position).
BOOST_AUTO_TEST_CASE(slicing_by_requests_domain_positions_layers) {
  const auto t = random_trace(2, 30, 16, 4, 3);
  auto same_token = [&](const trace::trace& s, std::size_t st, std::size_t tt, std::size_t s_layer,
                        std::size_t t_layer) {
    BOOST_TEST((s.token_phase(st) == t.token_phase(tt)));
    BOOST_TEST(s.token_step(st) == t.token_step(tt));
    for (std::size_t j = 0; j < 4; ++j) {
      BOOST_TEST(s.layer(s_layer).ids()[st * 4 + j] == t.layer(t_layer).ids()[tt * 4 + j]);
      BOOST_TEST(s.layer(s_layer).weights()[st * 4 + j] == t.layer(t_layer).weights()[tt * 4 + j]);
    }
  };
  {
    const std::vector<std::size_t> pick = {5, 2, 5, 29};
    const auto s = t.select_requests(pick);
    BOOST_TEST(s.requests() == 4u);
    BOOST_TEST(s.domains() == t.domains());
    std::size_t next = 0;
    for (std::size_t i = 0; i < pick.size(); ++i) {
      const auto &a = s.request(i), &b = t.request(pick[i]);
      BOOST_TEST(a.id == b.id);
      BOOST_TEST(a.domain == b.domain);
      BOOST_TEST(a.length == b.length);
      BOOST_TEST(a.first_token == next);
      next += a.length;
      for (std::size_t p = 0; p < a.length; ++p)
        for (std::size_t l = 0; l < 3; ++l)
          same_token(s, a.first_token + p, b.first_token + p, l, l);
    }
    BOOST_TEST(s.tokens() == next);
  }
  for (std::uint32_t d = 0; d < 3; ++d) {
    const auto s = t.select_domain(d);
    std::vector<std::uint64_t> want;
    for (const auto& q : t.request_table())
      if (q.domain == d) want.push_back(q.id);
    BOOST_TEST_REQUIRE(s.requests() == want.size());
    for (std::size_t i = 0; i < want.size(); ++i) {
      BOOST_TEST(s.request(i).id == want[i]);
      BOOST_TEST(s.request(i).domain == d);
    }
  }
  {
    const auto s = t.select_positions(2, 5);
    std::size_t i = 0;
    for (const auto& q : t.request_table()) {
      if (q.length <= 2) continue;
      const auto& a = s.request(i++);
      BOOST_TEST(a.id == q.id);
      BOOST_TEST(a.length == std::min<std::size_t>(5, q.length - 2));
      for (std::size_t p = 0; p < a.length; ++p)
        for (std::size_t l = 0; l < 3; ++l)
          same_token(s, a.first_token + p, q.first_token + 2 + p, l, l);
    }
    BOOST_TEST(s.requests() == i);
  }
  {
    const auto s = t.select_layers(1, 2);
    BOOST_TEST(s.layers() == 2u);
    BOOST_TEST(s.tokens() == t.tokens());
    for (std::size_t tok = 0; tok < t.tokens(); ++tok)
      for (std::size_t l = 0; l < 2; ++l)
        same_token(s, tok, tok, l, l + 1);
  }
  {
    const auto s = t.with_prefill_tokens(3);
    for (const auto& q : s.request_table())
      for (std::size_t p = 0; p < q.length; ++p) {
        BOOST_TEST((s.token_phase(q.first_token + p) == (p < 3 ? trace::phase::prefill : trace::phase::decode)));
        BOOST_TEST(s.token_step(q.first_token + p) == (p < 3 ? -1 : static_cast<std::int32_t>(p - 3)));
      }
    BOOST_TEST(s.layer(0).ids()[7] == t.layer(0).ids()[7]);
  }
}

BOOST_AUTO_TEST_CASE(split_by_request_is_deterministic_and_partitions) {
  const auto t = random_trace(3, 400, 8, 2, 1, 3);
  const auto [train, test] = trace::split_by_request(t, 0.25, 42);
  const auto [train2, test2] = trace::split_by_request(t, 0.25, 42);
  BOOST_TEST((train == train2));
  BOOST_TEST((test == test2));
  // A partition of the requests, each side in source order.
  std::multiset<std::uint64_t> all, got;
  for (const auto& q : t.request_table())
    all.insert(q.id);
  for (const auto* s : {&train, &test}) {
    for (std::size_t r = 0; r < s->requests(); ++r) {
      got.insert(s->request(r).id);
      if (r > 0) BOOST_TEST(s->request(r).id > s->request(r - 1).id);
    }
  }
  BOOST_TEST((all == got));
  BOOST_TEST(train.tokens() + test.tokens() == t.tokens());
  // 400 Bernoulli(0.25) draws: 100 expected, sd 8.7; 5 sd either side.
  BOOST_TEST(test.requests() > 56u);
  BOOST_TEST(test.requests() < 144u);
  const auto [train3, test3] = trace::split_by_request(t, 0.25, 43);
  BOOST_TEST(!(test3 == test));
  BOOST_TEST(trace::split_by_request(t, 0.0, 1).second.requests() == 0u);
  BOOST_TEST(trace::split_by_request(t, 1.0, 1).first.requests() == 0u);
  BOOST_CHECK_THROW(trace::split_by_request(t, 1.5, 1), invalid_input_error);
  BOOST_CHECK_THROW(trace::split_by_request(t, std::nan(""), 1), invalid_input_error);
}

// ==========================================================================================
// Binary format
// ==========================================================================================

BOOST_AUTO_TEST_CASE(checksum_matches_the_spec_at_every_length) {
  std::mt19937 rng(5);
  std::vector<std::byte> b(300);
  for (auto& x : b)
    x = static_cast<std::byte>(rng());
  for (std::size_t n = 0; n <= 300; ++n) {
    BOOST_TEST(trace::checksum64::of(b.data(), n) == reference_checksum(b, 0, n), "length " << n);
    // Fed in uneven pieces, the incremental checksum is the same.
    trace::checksum64 c;
    for (std::size_t i = 0; i < n;) {
      const std::size_t piece = std::min<std::size_t>(1 + rng() % 40, n - i);
      c.update(b.data() + i, piece);
      i += piece;
    }
    BOOST_TEST(c.digest() == reference_checksum(b, 0, n));
  }
}

BOOST_AUTO_TEST_CASE(binary_round_trip_memory_and_file) {
  scratch_dir dir("rt");
  for (std::uint32_t seed = 0; seed < 6; ++seed) {
    const std::size_t experts = seed == 5 ? 65536 : 8 + 7 * seed;
    const auto t = random_trace(seed, 1 + 5 * seed, experts, 1 + seed % 4, 1 + seed % 3);
    const auto bytes = trace::encode_trace(t);
    BOOST_TEST((trace::decode_trace(bytes) == t));
    const auto path = (dir.path / ("t" + std::to_string(seed) + ".bin")).string();
    trace::write_trace(t, path);
    BOOST_TEST(fs::file_size(path) == bytes.size());
    BOOST_TEST((trace::read_trace(path) == t));
    // The header as the spec lays it out.
    BOOST_TEST(std::memcmp(bytes.data(), "LOCUSTRC", 8) == 0);
    BOOST_TEST(le(bytes, 8, 4) == 1u);
    BOOST_TEST(le(bytes, 12, 4) == 80u);
    BOOST_TEST(le(bytes, 16, 4) == t.experts());
    BOOST_TEST(le(bytes, 20, 4) == t.top_k());
    BOOST_TEST(le(bytes, 24, 4) == t.layers());
    BOOST_TEST(le(bytes, 28, 4) == t.domains().size());
    BOOST_TEST(le(bytes, 32, 8) == t.requests());
    BOOST_TEST(le(bytes, 40, 8) == t.tokens());
    BOOST_TEST(le(bytes, 48, 8) == bytes.size() - 80);
    BOOST_TEST(le(bytes, 56, 8) == reference_checksum(bytes, 80, bytes.size() - 80));
    BOOST_TEST(le(bytes, 64, 8) == 0u);
    BOOST_TEST(le(bytes, 72, 8) == reference_checksum(bytes, 0, 72));
    // Sections where the spec puts them.
    const auto o = layout_of(bytes);
    for (std::size_t r = 0; r < t.requests(); ++r) {
      BOOST_TEST(le(bytes, o.requests_at + 16 * r, 8) == t.request(r).id);
      BOOST_TEST(le(bytes, o.requests_at + 16 * r + 8, 4) == t.request(r).domain);
      BOOST_TEST(le(bytes, o.requests_at + 16 * r + 12, 4) == t.request(r).length);
    }
    const std::size_t last = t.tokens() * t.top_k() - 1;
    BOOST_TEST(le(bytes, o.ids_at.back() + 2 * last, 2) == t.layer(t.layers() - 1).ids()[last]);
    float w;
    std::memcpy(&w, bytes.data() + o.weights_at.back() + 4 * last, 4);
    BOOST_TEST(w == t.layer(t.layers() - 1).weights()[last]);
  }
}

BOOST_AUTO_TEST_CASE(binary_round_trip_of_an_empty_trace) {
  trace::trace_builder b(4, 2, 2);
  const auto t = b.build();
  BOOST_TEST((trace::decode_trace(trace::encode_trace(t)) == t));
}

// An empty span from a null pointer (found by fuzz_plan under UBSan: memcpy from null).
BOOST_AUTO_TEST_CASE(an_empty_span_is_a_format_error) {
  expect_format_error([] { (void)trace::decode_trace(std::span<const std::byte>()); }, {"file ends inside the magic"});
}

BOOST_AUTO_TEST_CASE(missing_file_is_an_io_error) {
  BOOST_CHECK_THROW(trace::read_trace("/nonexistent/locus/trace.bin"), io_error);
  BOOST_CHECK_THROW(trace::write_trace(random_trace(1, 1, 4, 1, 1), "/nonexistent/locus/trace.bin"), io_error);
}

// A file cut at any byte, header or payload, is refused with the offset where data ran out (or,
// past the header, the payload size field that disagrees with the file).
BOOST_AUTO_TEST_CASE(truncation_at_every_byte) {
  const auto bytes = trace::encode_trace(random_trace(7, 3, 8, 2, 2, 4));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    const std::span<const std::byte> cut(bytes.data(), n);
    const auto off =
        expect_format_error([&] { (void)trace::decode_trace(cut, "cut.bin"); },
                            {"cut.bin: offset ", n < 80 ? "file ends inside the" : "(the file looks truncated)"});
    if (n < 80)
      BOOST_TEST(off == n, "cut at " << n);
    else
      BOOST_TEST(off == 48u, "cut at " << n);
  }
  // Also through the file reader.
  scratch_dir dir("cut");
  for (std::size_t n : {std::size_t{0}, std::size_t{5}, std::size_t{40}, std::size_t{79}, bytes.size() - 1}) {
    const auto p = dir.path / "cut.bin";
    write_file(p, std::string(reinterpret_cast<const char*>(bytes.data()), n));
    expect_format_error([&] { (void)trace::read_trace(p.string()); }, {"cut.bin: offset "});
  }
}

BOOST_AUTO_TEST_CASE(every_flipped_byte_is_detected) {
  const auto good = trace::encode_trace(random_trace(8, 3, 8, 2, 2, 4));
  for (std::size_t i = 0; i < good.size(); ++i)
    for (unsigned mask : {0x01u, 0x80u, 0xffu}) {
      auto bad = good;
      bad[i] ^= static_cast<std::byte>(mask);
      try {
        (void)trace::decode_trace(bad);
        BOOST_FAIL("flipping byte " << i << " with mask " << mask << " went unnoticed");
      } catch (const format_error& e) {
        BOOST_TEST(e.message().find("offset") != std::string::npos);
        if (i < 8) BOOST_TEST(e.message().find("bad magic") != std::string::npos);
        if (i >= 80 && i < good.size()) BOOST_TEST(e.offset() >= 28u); // never blames the magic
      }
    }
  // A payload flip in the middle of the weights is caught by the checksum, not by validation.
  auto bad = good;
  const auto o = layout_of(good);
  bad[o.weights_at[0] + 1] ^= std::byte{0x01}; // a low mantissa bit: still a finite weight
  const auto off = expect_format_error([&] { (void)trace::decode_trace(bad); }, {"payload checksum mismatch"});
  BOOST_TEST(off == 56u);
}

BOOST_AUTO_TEST_CASE(resealed_bad_values_are_named) {
  const auto t = random_trace(9, 4, 8, 2, 2, 4);
  const auto good = trace::encode_trace(t);
  const auto o = layout_of(good);
  {
    auto b = good;
    put_le(b, o.ids_at[1] + 2 * 3, 8, 2); // layer 1, token 1, choice 1
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); },
                                         {"layer 1 token 1 choice 1: expert id 8 is out of range [0, 8)"});
    BOOST_TEST(off == o.ids_at[1] + 6);
  }
  for (float v : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    auto b = good;
    std::memcpy(b.data() + o.weights_at[0] + 4 * 2, &v, 4); // layer 0, token 1, choice 0
    reseal(b);
    const auto off =
        expect_format_error([&] { (void)trace::decode_trace(b); }, {"layer 0 token 1 choice 0: weight", "not finite"});
    BOOST_TEST(off == o.weights_at[0] + 8);
  }
  {
    // A negative weight, resealed: named as such; the same flip without resealing is damage, named by
    // the checksum (a weight's sign bit is the likeliest bit for a flip to hit).
    auto b = good;
    const float v = -0.25f;
    std::memcpy(b.data() + o.weights_at[1] + 4 * 3, &v, 4); // layer 1, token 1, choice 1
    auto unsealed = b;
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); },
                                         {"layer 1 token 1 choice 1: weight -0.25 is negative"});
    BOOST_TEST(off == o.weights_at[1] + 12);
    expect_format_error([&] { (void)trace::decode_trace(unsealed); }, {"payload checksum mismatch"});
  }
  {
    auto b = good;
    put_le(b, o.phases_at + 2, 7, 1);
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); }, {"token 2 has phase 7"});
    BOOST_TEST(off == o.phases_at + 2);
  }
  {
    auto b = good;
    put_le(b, o.steps_at + 4, static_cast<std::uint32_t>(-5), 4);
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"token 1 has decode step -5"});
  }
  {
    auto b = good;
    put_le(b, o.requests_at + 16 + 8, 3, 4); // request 1 domain 3 of 3
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); }, {"request 1 has domain 3"});
    BOOST_TEST(off == o.requests_at + 24);
  }
  {
    // Request lengths that do not add up to the declared tokens ("mismatched counts").
    auto b = good;
    put_le(b, o.requests_at + 12, le(b, o.requests_at + 12, 4) - 1, 4);
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); }, {"the header declares"});
    BOOST_TEST(off == 40u);
  }
  {
    auto b = good;
    put_le(b, o.requests_at + 12, 0, 4);
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"request 0 has length 0"});
  }
  {
    // Header fields, each resealed so that only the field itself is wrong.
    struct edit {
      std::size_t at;
      int bytes;
      std::uint64_t value;
      const char* needle;
      std::uint64_t offset;
    };
    for (const edit e :
         {edit{8, 4, 4, "unsupported version 4, this reader reads versions 1 to 3", 8},
          edit{12, 4, 64, "header size 64", 12}, edit{16, 4, 0, "experts is 0", 16},
          edit{16, 4, 70000, "experts is 70000", 16}, edit{20, 4, 0, "top_k is 0", 20},
          edit{20, 4, 9, "top_k is 9", 20}, edit{24, 4, 0, "layers is 0", 24}, edit{64, 8, 1, "reserved", 64},
          edit{40, 8, 1, "every request has at least one token", 40}, edit{48, 8, 8, "payload size is 8", 48},
          edit{24, 4, 3, "does not match the counts", 48}, edit{28, 4, 60000, "domains cannot fit", 28},
          edit{28, 4, 1u << 30, "domains is 1073741824, expected at most 65536", 28},
          edit{24, 4, 0xffffffffu, "layers is 4294967295, expected 1..4096", 24}}) {
      auto b = good;
      put_le(b, e.at, e.value, e.bytes);
      reseal(b);
      const auto off = expect_format_error([&] { (void)trace::decode_trace(b); }, {e.needle});
      BOOST_TEST(off == e.offset, e.needle);
    }
  }
  {
    // Huge counts whose sizes overflow 64 bits must not allocate or wrap.
    auto b = good;
    put_le(b, 40, ~0ull >> 1, 8);
    put_le(b, 32, ~0ull >> 2, 8);
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"offset 48", "does not match"});
  }
  {
    auto b = good;
    put_le(b, 80, 5000, 4); // first domain name length
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"offset 80", "name length 5000"});
  }
  {
    auto b = good;
    b.push_back(std::byte{0});
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"the file has extra bytes"});
  }
}

// A token that chooses one expert twice breaks every planner (token_refine read a wild address on
// one): the builder and the binary reader refuse it, as the text importers always did.
BOOST_AUTO_TEST_CASE(repeated_expert_in_a_token_is_refused_everywhere) {
  {
    trace::trace_builder b(8, 3, 2);
    b.domain("d");
    b.add_request(0, 0, 2);
    for (std::size_t l = 0; l < 2; ++l)
      for (std::size_t t = 0; t < 2; ++t)
        for (std::size_t j = 0; j < 3; ++j)
          b.ids(l, t)[j] = static_cast<trace::trace_expert_id>(j + t);
    b.ids(1, 1)[2] = 1; // token 1 of layer 1 now chooses expert 1 at choices 0 and 2
    try {
      (void)b.build();
      BOOST_FAIL("build accepted a repeated expert");
    } catch (const invalid_input_error& e) {
      BOOST_TEST(e.message().find("layer 1 token 1 choice 2: expert 1 is chosen twice") != std::string::npos,
                 e.message());
    }
  }
  const auto good = trace::encode_trace(random_trace(3, 4, 16, 4, 3, 5));
  const auto o = layout_of(good);
  for (std::size_t l = 0; l < 3; ++l) {
    auto b = good;
    // Token 2's choice 3 repeats its choice 1.
    const std::size_t at = o.ids_at[l] + 2 * (2 * 4 + 3);
    put_le(b, at, le(b, o.ids_at[l] + 2 * (2 * 4 + 1), 2), 2);
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); },
                                         {"layer " + std::to_string(l) + " token 2 choice 3", "chosen twice"});
    BOOST_TEST(off == at);
  }
}

// Counts that the payload does not pay for: with no token, any number of layers matched the payload
// size, and the reader allocated per-layer tables for 2^32-1 layers (bad_alloc) or 10^8 (4.7 GB).
BOOST_AUTO_TEST_CASE(binary_counts_are_bounded_before_allocation) {
  trace::trace_builder eb(4, 2, 2);
  const auto empty = trace::encode_trace(eb.build());
  for (const std::uint64_t layers : {std::uint64_t{0xffffffffu}, std::uint64_t{100000000}, std::uint64_t{4097}}) {
    auto b = empty;
    put_le(b, 24, layers, 4);
    reseal(b);
    const auto off = expect_format_error([&] { (void)trace::decode_trace(b); },
                                         {"layers is " + std::to_string(layers) + ", expected 1..4096"});
    BOOST_TEST(off == 24u);
  }
  {
    // 25M empty domain names fit a 100 MB payload but would cost 1 GB of strings.
    std::vector<std::byte> b(80 + 4 * 70000);
    std::copy_n(empty.begin(), 80, b.begin());
    put_le(b, 28, 70000, 4);
    put_le(b, 48, 4 * 70000, 8);
    reseal(b);
    const auto off =
        expect_format_error([&] { (void)trace::decode_trace(b); }, {"domains is 70000, expected at most 65536"});
    BOOST_TEST(off == 28u);
  }
  {
    // Two domains of one name: requests could not say which one they belong to.
    trace::trace_builder tb(4, 1, 1);
    tb.set_domains({"a", "b"});
    auto b = trace::encode_trace(tb.build());
    put_le(b, 80 + 4 + 1 + 4, 'a', 1); // the second name becomes "a"
    reseal(b);
    expect_format_error([&] { (void)trace::decode_trace(b); }, {"domain 1 \"a\" repeats an earlier domain name"});
    trace::trace_builder dup(4, 1, 1);
    BOOST_CHECK_THROW(dup.set_domains({"x", "y", "x"}), invalid_input_error);
    // A name the format cannot write is refused where the trace is built, not where it is saved.
    BOOST_CHECK_THROW(dup.set_domains({"x", std::string(trace::max_trace_domain_name + 1, 'y')}), invalid_input_error);
    BOOST_CHECK_NO_THROW(dup.set_domains({"x", std::string(trace::max_trace_domain_name, 'y')}));
  }
  BOOST_CHECK_THROW(trace::trace_builder(4, 1, 4097), invalid_input_error);
}

// ==========================================================================================
// ESFT importer
// ==========================================================================================

namespace {
std::vector<trace::esft_domain_text> one_domain(const std::vector<std::string>& layer_texts) {
  std::vector<trace::esft_domain_text> d(1);
  d[0].name = "dom";
  for (std::size_t l = 0; l < layer_texts.size(); ++l)
    d[0].layers.push_back({"dom/expert_weights_" + std::to_string(l + 1) + ".txt", layer_texts[l]});
  return d;
}
} // namespace

BOOST_AUTO_TEST_CASE(esft_in_memory_import) {
  // 2 experts per token (top-2), experts < 4; line 1: 2 tokens, line 2: 1 token.
  const std::string l1 = "0\t3\t2\t1\t\t0.5\t0.25\t1e-3\t0.125\n1\t0\t\t0.75\t0.0625\n";
  const std::string l2 = "3\t2\t1\t0\t\t1\t2\t3\t4\r\n0\t1\t\t5\t6\t\n"; // CRLF and a trailing tab are accepted
  const auto t = trace::import_esft(one_domain({l1, l2}), 4, 2);
  BOOST_TEST(t.requests() == 2u);
  BOOST_TEST(t.tokens() == 3u);
  BOOST_TEST(t.layers() == 2u);
  BOOST_TEST(t.domains() == std::vector<std::string>{"dom"});
  BOOST_TEST(t.request(0).length == 2u);
  BOOST_TEST(t.request(1).length == 1u);
  const std::vector<int> ids0 = {0, 3, 2, 1, 1, 0}, ids1 = {3, 2, 1, 0, 0, 1};
  const std::vector<float> w0 = {0.5f, 0.25f, 1e-3f, 0.125f, 0.75f, 0.0625f}, w1 = {1, 2, 3, 4, 5, 6};
  for (std::size_t i = 0; i < 6; ++i) {
    BOOST_TEST(t.layer(0).ids()[i] == ids0[i]);
    BOOST_TEST(t.layer(1).ids()[i] == ids1[i]);
    BOOST_TEST(t.layer(0).weights()[i] == w0[i]);
    BOOST_TEST(t.layer(1).weights()[i] == w1[i]);
  }
}

BOOST_AUTO_TEST_CASE(esft_bad_text_names_file_line_and_column) {
  struct bad_case {
    std::vector<std::string> layers;
    std::vector<std::string> needles;
    std::uint64_t line;
  };
  const std::string ok = "0\t1\t\t0.5\t0.5\n";
  const std::vector<bad_case> cases = {
      {{"0\t9\t\t0.5\t0.5\n"}, {"dom/expert_weights_1.txt:1:3:", "expert id 9 is out of range [0, 4)"}, 1},
      {{ok + "0\tx\t\t0.5\t0.5\n"}, {"expert_weights_1.txt:2:3:", "expected an expert id", "\"x"}, 2},
      {{"0\t-1\t\t0.5\t0.5\n"}, {":1:3:", "expected an expert id"}, 1},
      {{"0\t1\t\tnan\t0.5\n"}, {":1:6:", "weight is not finite"}, 1},
      {{"0\t1\t\t0.5\tinf\n"}, {":1:10:", "weight is not finite"}, 1},
      {{"0\t1\t\t0.5\t-7\n"}, {":1:10:", "weight \"-7\" is negative"}, 1},
      {{"0\t1\t\t0.5\t1e99\n"}, {":1:10:", "weight \"1e99\" is outside the range of a float"}, 1},
      {{"0\t1\t\t0.5\t1e-99\n"}, {":1:10:", "weight \"1e-99\" is outside the range of a float"}, 1},
      {{"0\t99999999999\t\t0.5\t0.5\n"}, {":1:3:", "expert id \"99999999999\" is out of range [0, 4)"}, 1},
      {{"0\t1\t\t0.5\tzz\n"}, {":1:10:", "expected a weight", "\"zz\""}, 1},
      {{"0\t1\t\t0.5\n"}, {":1:1:", "2 expert ids but 1 weights"}, 1},
      {{"0\t1\t2\t\t0.5\t0.5\t0.5\n"}, {"3 expert ids is not a multiple of top_k 2"}, 1},
      {{"1\t1\t\t0.5\t0.5\n"}, {"token 0 chooses expert 1 twice"}, 1},
      // Two tokens of top-3 read as top-2: a pair straddles them; the line reads as top-3.
      {{"0\t1\t2\t2\t3\t0\t\t1\t1\t1\t1\t1\t1\n"},
       {"token 1 chooses expert 2 twice (read with top_k 2; with top_k 3 every token of the line chooses distinct"},
       1},
      {{"0\t1\n"}, {"line ends after the expert ids"}, 1},
      {{ok + "0\t1\t\t0.5"}, {":2:1:", "2 expert ids but 1 weights", "the file looks truncated"}, 2},
      {{"0 1\t\t0.5\t0.5\n"}, {":1:2:", "expected a tab after an expert id"}, 1},
      {{"0\t1\t\t0.5 0.5\n"}, {"expected a tab after a weight"}, 1},
      {{ok + "\n" + ok}, {":2:1:", "blank line"}, 2},
      {{""}, {"dom/expert_weights_1.txt:1:1:", "no sequence"}, 1},
      // Layers that disagree: token count on a line, and number of lines.
      {{ok + ok, ok + "0\t1\t2\t3\t\t1\t1\t1\t1\n"},
       {"dom/expert_weights_2.txt:2:1:", "2 tokens, but dom/expert_weights_1.txt line 2 has 1"},
       2},
      {{ok + ok, ok}, {"dom/expert_weights_2.txt:2:1:", "1 sequences (lines), but dom/expert_weights_1.txt has 2"}, 2},
  };
  for (const auto& c : cases) {
    const auto off = expect_format_error([&] { (void)trace::import_esft(one_domain(c.layers), 4, 2); }, c.needles);
    BOOST_TEST(off == c.line, c.needles.back());
  }
  // Domains with different layer counts.
  const std::vector<std::string> texts2 = {ok, ok}, texts1 = {ok}; // the domains view these texts
  auto two = one_domain(texts2);
  two.push_back(one_domain(texts1).front());
  two.back().name = "other";
  BOOST_CHECK_THROW(trace::import_esft(two, 4, 2), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(esft_folder_write_and_import_round_trip) {
  scratch_dir dir("esft");
  auto t = random_trace(11, 12, 64, 6, 3);
  trace::write_esft(t, dir.path.string());
  trace::esft_options opt;
  std::size_t calls = 0;
  opt.progress = [&](std::size_t done, std::size_t all) {
    ++calls;
    BOOST_TEST(done <= all);
  };
  const auto u = trace::import_esft(dir.path.string(), opt);
  BOOST_TEST(calls == 3u * u.domains().size());
  BOOST_TEST(u.layers() == 3u);
  // expert_weights_<n> is model layer n: the trace keeps that numbering for engine exports.
  BOOST_TEST(u.has_model_layers());
  BOOST_TEST(u.model_layer_ids() == (std::vector<std::size_t>{1, 2, 3}), boost::test_tools::per_element());
  BOOST_TEST(u.requests() == t.requests());
  // Import orders domains by name and renumbers requests; compare request by request.
  std::map<std::string, std::vector<std::size_t>> by_domain;
  for (std::size_t r = 0; r < t.requests(); ++r)
    by_domain[t.domains()[t.request(r).domain]].push_back(r);
  std::size_t r = 0;
  for (const auto& [name, rs] : by_domain)
    for (auto src : rs) {
      const auto &a = u.request(r), &b = t.request(src);
      BOOST_TEST(u.domains()[a.domain] == name);
      BOOST_TEST(a.id == r);
      BOOST_TEST(a.length == b.length);
      for (std::size_t l = 0; l < 3; ++l)
        for (std::size_t i = 0; i < a.length * 6u; ++i) {
          BOOST_TEST(u.layer(l).ids()[a.first_token * 6 + i] == t.layer(l).ids()[b.first_token * 6 + i]);
          BOOST_TEST(u.layer(l).weights()[a.first_token * 6 + i] == t.layer(l).weights()[b.first_token * 6 + i]);
        }
      ++r;
    }
  // A missing layer file in the second domain, a file that is not a folder, an empty folder.
  fs::remove(dir.path / "bb" / "expert_weights_3.txt");
  try {
    (void)trace::import_esft(dir.path.string());
    BOOST_FAIL("missing layer file accepted");
  } catch (const io_error& e) {
    BOOST_TEST(e.message().find("expert_weights_3.txt: missing") != std::string::npos, e.message());
  }
  BOOST_CHECK_THROW(trace::import_esft((dir.path / "a" / "expert_weights_1.txt").string()), io_error);
  fs::create_directories(dir.path / "empty");
  BOOST_CHECK_THROW(trace::import_esft((dir.path / "empty").string()), invalid_input_error);
}

// Folder layouts that used to import silently wrong: a gap in the first domain's layer files cut
// every domain short, a domain without layer 1 was skipped, a domain named twice was imported
// twice, a domain name could lead outside the root, and a layer file that is a folder "read failed".
BOOST_AUTO_TEST_CASE(esft_folder_layouts_are_checked) {
  scratch_dir dir("esft_layouts");
  const auto t = random_trace(12, 9, 64, 6, 3);
  const auto root = dir.path.string();
  trace::write_esft(t, root);
  auto expect_io = [&](const trace::esft_options& opt, const std::string& needle) {
    try {
      (void)trace::import_esft(root, opt);
      BOOST_FAIL("accepted; expected an error containing " << needle);
    } catch (const error& e) {
      BOOST_TEST(e.message().find(needle) != std::string::npos, e.message());
    }
  };
  BOOST_TEST(trace::import_esft(root).layers() == 3u);
  // A sub-folder without layer files is no domain, and the report says it was passed over.
  fs::create_directories(dir.path / "empty");
  trace::esft_report rep;
  rep.skipped_folders = {"stale"};
  BOOST_TEST(trace::import_esft(root, {}, &rep).domains() == (std::vector<std::string>{"a", "bb", "ccc"}),
             boost::test_tools::per_element());
  BOOST_TEST(rep.skipped_folders == std::vector<std::string>{(dir.path / "empty").string()},
             boost::test_tools::per_element());
  fs::remove(dir.path / "empty");
  // A gap in the first domain (sorted: "a").
  fs::rename(dir.path / "a" / "expert_weights_2.txt", dir.path / "a" / "keep.txt");
  expect_io({}, "expert_weights_2.txt: missing, but expert_weights_3.txt exists");
  // No layer 1 at all in a domain: an error, not a skipped domain.
  fs::rename(dir.path / "a" / "keep.txt", dir.path / "a" / "expert_weights_2.txt");
  fs::rename(dir.path / "a" / "expert_weights_1.txt", dir.path / "a" / "keep.txt");
  expect_io({}, "expert_weights_1.txt: missing, but expert_weights_2.txt exists");
  fs::rename(dir.path / "a" / "keep.txt", dir.path / "a" / "expert_weights_1.txt");
  trace::esft_options o;
  o.domains = {"a", "a"};
  expect_io(o, "domain \"a\" is given twice");
  for (const char* name : {"../a", "..", ".", "a/../bb", ""}) {
    o.domains = {name};
    expect_io(o, "is not a folder name inside the root");
  }
  o.domains = {"nope"};
  expect_io(o, "no such domain folder (the root holds a, bb, ccc)"); // the ones there, to tell a typo
  // A layer file named past the plain numbering: refused, not left out (a name that numbers
  // nothing is no layer file).
  std::ofstream(dir.path / "a" / "expert_weights_backup.txt") << "x";
  BOOST_TEST(trace::import_esft(root).layers() == 3u);
  for (const char* name : {"expert_weights_0.txt", "expert_weights_01.txt", "expert_weights_+4.txt",
                           "expert_weights_5000.txt", "expert_weights_-1.txt"}) {
    fs::copy_file(dir.path / "a" / "expert_weights_1.txt", dir.path / "a" / name);
    expect_io({}, std::string(name) + ": not a layer file this importer reads");
    fs::remove(dir.path / "a" / name);
  }
  // A layer file that is a folder.
  fs::remove(dir.path / "bb" / "expert_weights_3.txt");
  fs::create_directories(dir.path / "bb" / "expert_weights_3.txt");
  expect_io({}, "expert_weights_3.txt: is a folder, expected a layer file");
}

// A domain folder given instead of its parent reads as that one domain; naming domains inside it
// is refused with a message that says to give the parent.
BOOST_AUTO_TEST_CASE(esft_domain_folder_given_directly) {
  scratch_dir dir("esft_one_domain");
  trace::write_esft(random_trace(15, 9, 64, 6, 3), dir.path.string());
  trace::esft_options only_bb;
  only_bb.domains = {"bb"};
  const auto want = trace::import_esft(dir.path.string(), only_bb);
  BOOST_TEST_REQUIRE(want.domains().size() == 1u);
  BOOST_TEST(want.requests() > 0u);
  BOOST_TEST((trace::import_esft((dir.path / "bb").string()) == want));
  BOOST_TEST((trace::import_esft((dir.path / "bb").string() + "/") == want));
  BOOST_TEST((trace::import_esft((dir.path / "bb" / ".").string()) == want));
  try {
    (void)trace::import_esft((dir.path / "bb").string(), only_bb);
    BOOST_FAIL("domains inside a domain folder accepted");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message().find("is one domain folder") != std::string::npos, e.message());
    BOOST_TEST(e.message().find("give the parent folder") != std::string::npos, e.message());
  }
}

// ESFT files do not state top-k: top-6 data read as top-3 parsed as twice the tokens.
BOOST_AUTO_TEST_CASE(esft_top_k_below_the_data_is_refused) {
  scratch_dir dir("esft_top_k");
  const auto t = random_trace(13, 40, 64, 6, 3);
  trace::write_esft(t, dir.path.string());
  trace::esft_options o;
  o.top_k = 3;
  try {
    (void)trace::import_esft(dir.path.string(), o);
    BOOST_FAIL("top-6 data imported as top-3");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message().find("the data looks like top-6; import it with top_k 6") != std::string::npos, e.message());
  }
  o.top_k = 2;
  BOOST_CHECK_THROW((void)trace::import_esft(dir.path.string(), o), invalid_input_error); // looks like top-4 or top-6
  o.top_k = 6;
  BOOST_TEST(trace::import_esft(dir.path.string(), o).tokens() == t.tokens());
  // Genuine top-3 data of the same size is accepted.
  scratch_dir dir3("esft_top_3");
  trace::write_esft(random_trace(14, 40, 64, 3, 3), dir3.path.string());
  o.top_k = 3;
  BOOST_CHECK_NO_THROW((void)trace::import_esft(dir3.path.string(), o));
}

// The real ESFT traces (../shared/traces/esft), checked against the counts in their README and
// against a plain iostream reading of one layer file.
BOOST_AUTO_TEST_CASE(esft_real_traces) {
  const fs::path root = fs::path(LOCUS_SHARED_DIR) / "traces" / "esft";
  if (!fs::is_directory(root)) {
    BOOST_TEST_MESSAGE("skipped: " << root.string() << " is absent (the real traces live beside the repository)");
    return;
  }
  const auto t = trace::import_esft(root.string());
  BOOST_TEST(t.layers() == 26u);
  BOOST_TEST(t.experts() == 64u);
  BOOST_TEST(t.top_k() == 6u);
  BOOST_TEST(t.domains() == (std::vector<std::string>{"intent", "law", "summary"}));
  const std::size_t want_requests[] = {127, 33, 13}, want_tokens[] = {8222, 8327, 8479};
  for (std::uint32_t d = 0; d < 3; ++d) {
    std::size_t requests = 0, tokens = 0;
    for (const auto& q : t.request_table())
      if (q.domain == d) {
        ++requests;
        tokens += q.length;
      }
    BOOST_TEST(requests == want_requests[d]);
    BOOST_TEST(tokens == want_tokens[d]);
  }
  BOOST_TEST(t.tokens() == 8222u + 8327 + 8479);

  // Layer 7 of "law" read with iostreams: ids then weights per line.
  std::ifstream in(root / "law" / "expert_weights_7.txt");
  std::string line;
  std::size_t r = 127, checked = 0;
  while (std::getline(in, line)) {
    const auto cut = line.find("\t\t");
    BOOST_REQUIRE(cut != std::string::npos);
    std::istringstream ids(line.substr(0, cut)), ws(line.substr(cut + 2));
    const auto& q = t.request(r++);
    std::size_t i = 0;
    int id;
    std::string w;
    while (ids >> id) {
      BOOST_REQUIRE(i < q.length * 6u);
      BOOST_TEST(t.layer(6).ids()[q.first_token * 6 + i] == id);
      ++i;
    }
    BOOST_TEST(i == q.length * 6u);
    i = 0;
    while (ws >> w) {
      BOOST_TEST(t.layer(6).weights()[q.first_token * 6 + i] == std::strtof(w.c_str(), nullptr));
      ++i;
    }
    BOOST_TEST(i == q.length * 6u);
    checked += i;
  }
  BOOST_TEST(r == 127u + 33);
  BOOST_TEST(checked == 8327u * 6);

  // Real data through the binary format, unchanged.
  BOOST_TEST((trace::decode_trace(trace::encode_trace(t)) == t));
}
