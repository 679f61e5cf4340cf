#define BOOST_TEST_MODULE trace_jsonl
#include "../support/error_message.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/trace/binary.hpp>
#include <locus/trace/jsonl.hpp>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace locus;
namespace fs = std::filesystem;

namespace {

//! One route record as the test writes it (independently of the importer).
struct rec {
  std::string req; // JSON text of req_id ("" = omitted)
  std::uint64_t token = 0;
  std::uint64_t layer = 0;
  std::vector<int> ids;
  std::vector<float> w;
  std::string phase, domain;
  int step = -2; // -2: omitted
};

std::string line_of(const rec& r) {
  std::string s = "{";
  if (!r.req.empty()) s += "\"req_id\": " + r.req + ", ";
  s += "\"token_idx\": " + std::to_string(r.token) + ", \"layer\": " + std::to_string(r.layer) + ", \"topk_ids\": [";
  for (std::size_t j = 0; j < r.ids.size(); ++j)
    s += (j ? ", " : "") + std::to_string(r.ids[j]);
  s += "], \"topk_weights\": [";
  char buf[32];
  for (std::size_t j = 0; j < r.w.size(); ++j) {
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(r.w[j])); // 9 digits: exact float round trip
    s += (j ? ", " : "") + std::string(buf);
  }
  s += "]";
  if (!r.phase.empty()) s += ", \"phase\": \"" + r.phase + "\"";
  if (r.step != -2) s += ", \"step\": " + std::to_string(r.step);
  if (!r.domain.empty()) s += ", \"domain\": \"" + r.domain + "\"";
  s += ", \"extra\": {\"nested\": [1, {\"x\": null}], \"layer\": \"ignored\"}}";
  return s;
}

//! A reference request: its records per layer, in token order.
struct ref_request {
  std::uint64_t id;
  std::string domain;
  std::size_t length;
  std::vector<std::vector<rec>> layers; // [layer][token]
};

std::vector<ref_request> random_requests(std::mt19937& rng, std::size_t n, std::size_t experts, std::size_t k,
                                         std::size_t layers) {
  const char* domains[] = {"code", "math", "chat"};
  std::vector<ref_request> out;
  for (std::size_t r = 0; r < n; ++r) {
    ref_request q{100 + 3 * r, domains[rng() % 3], 1 + rng() % 9, {}};
    q.layers.resize(layers);
    const std::size_t prefill = rng() % (q.length + 1);
    for (std::size_t l = 0; l < layers; ++l)
      for (std::size_t t = 0; t < q.length; ++t) {
        rec x;
        x.req = std::to_string(q.id);
        x.token = t;
        x.layer = l + 1; // layer numbers from 1: the importer renumbers them from 0
        std::vector<int> pool(experts);
        for (std::size_t e = 0; e < experts; ++e)
          pool[e] = static_cast<int>(e);
        std::shuffle(pool.begin(), pool.end(), rng);
        x.ids.assign(pool.begin(), pool.begin() + static_cast<std::ptrdiff_t>(k));
        for (std::size_t j = 0; j < k; ++j)
          x.w.push_back(std::uniform_real_distribution<float>(0, 1)(rng));
        x.phase = t < prefill ? "prefill" : "decode";
        x.step = t < prefill ? -1 : static_cast<int>(t - prefill);
        if (t == 0) x.domain = q.domain; // the domain only on some records
        q.layers[l].push_back(x);
      }
    out.push_back(std::move(q));
  }
  return out;
}

void check_against(const trace::trace& t, const std::vector<ref_request>& want, std::size_t k) {
  BOOST_TEST_REQUIRE(t.requests() == want.size());
  for (std::size_t r = 0; r < want.size(); ++r) {
    const auto& q = t.request(r);
    BOOST_TEST(q.id == want[r].id);
    BOOST_TEST(t.domains()[q.domain] == want[r].domain);
    BOOST_TEST_REQUIRE(q.length == want[r].length);
    for (std::size_t l = 0; l < want[r].layers.size(); ++l)
      for (std::size_t p = 0; p < q.length; ++p) {
        const auto& x = want[r].layers[l][p];
        const std::size_t tok = q.first_token + p;
        if (l == 0) {
          BOOST_TEST((t.token_phase(tok) == (x.phase == "prefill" ? trace::phase::prefill : trace::phase::decode)));
          BOOST_TEST(t.token_step(tok) == x.step);
        }
        for (std::size_t j = 0; j < k; ++j) {
          BOOST_TEST(t.layer(l).ids()[tok * k + j] == x.ids[j]);
          BOOST_TEST(t.layer(l).weights()[tok * k + j] == x.w[j]);
        }
      }
  }
}

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

trace::jsonl_options opts(std::size_t experts = 8) {
  trace::jsonl_options o;
  o.experts = experts;
  return o;
}

} // namespace

// Records of all requests interleaved in random order, layers from 1, meta lines between them.
BOOST_AUTO_TEST_CASE(interleaved_records_reassemble_exactly) {
  std::mt19937 rng(1);
  const auto want = random_requests(rng, 25, 16, 4, 3);
  std::vector<std::string> lines;
  for (const auto& q : want)
    for (const auto& layer : q.layers)
      for (const auto& x : layer)
        lines.push_back(line_of(x));
  // Shuffle, but keep each request's first line (t = 0 of layer 1) ahead of its others, so that
  // request order is the order of want; the domain is on t = 0 records only.
  std::shuffle(lines.begin(), lines.end(), rng);
  std::string text = "{\"type\": \"meta\", \"num_experts\": 16, \"top_k\": 4, \"model\": \"test\"}\n";
  for (const auto& q : want)
    text += line_of(q.layers[0][0]) + "\n";
  for (std::size_t i = 0; i < lines.size(); ++i) {
    bool first = false;
    for (const auto& q : want)
      first = first || lines[i] == line_of(q.layers[0][0]);
    if (first) continue;
    text += lines[i] + (i % 7 == 0 ? "\r\n" : "\n");
    if (i % 50 == 0) text += "{\"type\": \"stats\", \"gpu_util\": 0.5}\n\n";
  }
  trace::jsonl_report rep;
  trace::jsonl_options o; // experts and top_k from the meta line
  const auto t = trace::import_jsonl_text(text, "mem.jsonl", o, &rep);
  BOOST_TEST(t.experts() == 16u);
  BOOST_TEST(t.top_k() == 4u);
  BOOST_TEST(t.layers() == 3u);
  check_against(t, want, 4);
  std::size_t records = 0;
  for (const auto& q : want)
    records += q.length * 3;
  BOOST_TEST(rep.route_records == records);
  BOOST_TEST(rep.bad_records == 0u);
  BOOST_TEST(rep.meta_lines == 1u);
  BOOST_TEST(rep.skipped_lines > 1u); // the stats records and blank lines
  BOOST_TEST(rep.lines == records + rep.meta_lines + rep.skipped_lines);
}

// The logged layer numbers are the model's layer ids: kept (so that engine exports number the
// layers as the log did), sorted; numbers 0, 1, ... are the default and need no table.
BOOST_AUTO_TEST_CASE(logged_layer_numbers_are_the_model_layer_ids) {
  const auto record = [](std::uint64_t layer) {
    return "{\"req_id\": 1, \"token_idx\": 0, \"layer\": " + std::to_string(layer) +
           ", \"topk_ids\": [1, 2], \"topk_weights\": [0.5, 0.5]}\n";
  };
  // DeepSeek-V3's MoE layers are 3..60: a log of three of them, out of order.
  const auto t = trace::import_jsonl_text(record(60) + record(3) + record(4294967295u), "l.jsonl", opts());
  BOOST_TEST_REQUIRE(t.layers() == 3u);
  BOOST_TEST(t.has_model_layers());
  BOOST_TEST(t.model_layer_ids() == std::vector<std::size_t>({3, 60, 4294967295u}), boost::test_tools::per_element());
  const auto dense = trace::import_jsonl_text(record(1) + record(0), "d.jsonl", opts());
  BOOST_TEST(!dense.has_model_layers());
  BOOST_TEST(dense.model_layer(1) == 1u);
}

BOOST_AUTO_TEST_CASE(string_ids_default_domain_and_nulls) {
  const std::string text =
      "{\"req_id\": \"a\", \"token_idx\": 5, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [0.5, 0.25], "
      "\"phase\": null, \"domain\": null}\n"
      "{\"req_id\": \"b\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [3, 4], \"topk_weights\": [1, 2]}\n"
      "{\"req_id\": \"a\", \"token_idx\": 2, \"layer\": 0, \"topk_ids\": [0, 7], \"topk_weights\": [3e-1, 1E2]}\n";
  const auto t = trace::import_jsonl_text(text, "s.jsonl", opts());
  BOOST_TEST(t.requests() == 2u);
  BOOST_TEST(t.request(0).id == 0u); // string ids: numbered in order of appearance
  BOOST_TEST(t.request(1).id == 1u);
  // ... and kept as the requests' names, which the binary format carries (version 3).
  BOOST_TEST(t.has_request_names());
  BOOST_TEST(t.request_name(0) == "a");
  BOOST_TEST(t.request_name(1) == "b");
  BOOST_TEST(t.request_label(1) == "\"b\"");
  BOOST_TEST((trace::decode_trace(trace::encode_trace(t)) == t));
  BOOST_TEST(t.request(0).length == 2u);
  BOOST_TEST(t.domains() == std::vector<std::string>{"default"});
  // Token 2 sorts before token 5.
  BOOST_TEST(t.layer(0).ids()[0] == 0u);
  BOOST_TEST(t.layer(0).ids()[1] == 7u);
  BOOST_TEST(t.layer(0).weights()[1] == 100.0f);
  BOOST_TEST(t.layer(0).ids()[2] == 1u);
  BOOST_TEST((t.token_phase(0) == trace::phase::unknown));
  BOOST_TEST(t.token_step(0) == -1);
  // An empty domain name is no name, as null is: no domain named "" appears.
  const auto blank = trace::import_jsonl_text(
      "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1], "
      "\"domain\": \"\"}\n"
      "{\"req_id\": 1, \"token_idx\": 1, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1], "
      "\"domain\": \"law\"}\n",
      "b.jsonl", opts());
  BOOST_TEST(blank.domains() == std::vector<std::string>{"law"});
  BOOST_TEST(!blank.has_request_names()); // numeric ids are the ids: no names
  BOOST_TEST(blank.request_label(0) == "1");
  // An empty string names no request.
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(
            "{\"req_id\": \"\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1]}\n",
            "e.jsonl", opts());
      },
      {"e.jsonl:1: ", "req_id is a string of 0 bytes, expected 1..4096"});
  // ... which it needs only as a name: requests reconstructed from token_idx restarts keep none.
  {
    auto split = opts();
    split.split_on_restart = true;
    const auto unnamed = trace::import_jsonl_text(
        "{\"req_id\": \"\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1]}\n",
        "e.jsonl", split);
    BOOST_TEST(unnamed.requests() == 1u);
    BOOST_TEST(!unnamed.has_request_names());
  }
  // An inconsistent request is named by its string.
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(
            "{\"req_id\": \"cmpl-x\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1]}\n"
            "{\"req_id\": \"cmpl-x\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 3], \"topk_weights\": [1, "
            "1]}\n",
            "d.jsonl", opts());
      },
      {"d.jsonl:2: ", "request \"cmpl-x\" (numbered 0; first record at line 1)", "appears twice"});
  // A number after strings (the other order is a case of bad_records_fail_or_are_skipped_and_counted).
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(
            "{\"req_id\": \"a\", \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1]}\n"
            "{\"req_id\": 0, \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [1, 1]}\n",
            "m.jsonl", opts());
      },
      {"m.jsonl:2: ", "req_id is a number here and a string at line 1"});
}

// No req_id (or a constant one): requests are cut where token_idx restarts, per layer.
BOOST_AUTO_TEST_CASE(requests_reconstructed_from_token_restarts) {
  const std::vector<std::size_t> lengths = {3, 1, 4, 2};
  for (const std::string& req : {std::string(), std::string("7")}) {
    std::string text;
    for (auto len : lengths)
      for (std::size_t t = 0; t < len; ++t)
        for (int l = 0; l < 2; ++l) {
          rec x;
          x.req = req;
          x.token = 10 + t; // restarts need not be at 0
          x.layer = static_cast<std::uint64_t>(l);
          x.ids = {static_cast<int>(len), static_cast<int>(t)};
          x.w = {1.0f, 2.0f};
          text += line_of(x) + "\n";
        }
    auto o = opts();
    if (req.empty())
      expect_format_error([&] { (void)trace::import_jsonl_text(text, "r.jsonl", o); },
                          {"r.jsonl:1:", "lacks \"req_id\"", "split_on_restart"});
    else // a constant req_id without reconstruction: one request whose token_idx repeat
      expect_format_error([&] { (void)trace::import_jsonl_text(text, "r.jsonl", o); },
                          {"request 7 (first record at line 1): token_idx 10 at layer 0 appears twice",
                           "import with jsonl_options::split_on_restart",
                           "(jsonl_options::skip_bad drops such a request and counts it)"});
    o.split_on_restart = true;
    const auto t = trace::import_jsonl_text(text, "r.jsonl", o);
    BOOST_TEST_REQUIRE(t.requests() == lengths.size());
    for (std::size_t r = 0; r < lengths.size(); ++r) {
      BOOST_TEST(t.request(r).id == r);
      BOOST_TEST(t.request(r).length == lengths[r]);
      for (std::size_t p = 0; p < lengths[r]; ++p) {
        BOOST_TEST(t.layer(1).ids()[(t.request(r).first_token + p) * 2] == lengths[r]);
        BOOST_TEST(t.layer(1).ids()[(t.request(r).first_token + p) * 2 + 1] == p);
      }
    }
  }
}

// Each kind of bad record: in fail mode the message names file, line and what is wrong; in skip
// mode the record is counted and the good request survives.
BOOST_AUTO_TEST_CASE(bad_records_fail_or_are_skipped_and_counted) {
  const std::string good = "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], "
                           "\"topk_weights\": [0.5, 0.5]}";
  auto with = [](const std::string& fields) {
    return "{\"req_id\": 2, \"token_idx\": 0, \"layer\": 0, " + fields + "}";
  };
  const std::string ids = "\"topk_ids\": [1, 2]", ws = "\"topk_weights\": [0.5, 0.5]";
  struct bad_case {
    std::string line;
    std::string needle;
  };
  const std::vector<bad_case> cases = {
      {"{\"req_id\": 2, \"token_idx\": 0", "invalid JSON"},
      {"not json at all", "invalid JSON"},
      {"[1, 2, 3]", "expected a JSON object"},
      {"42", "expected a JSON object"},
      {with("\"topk_ids\": [1, 2], \"topk_weights\": [NaN, 0.5]"), "NaN or Infinity"},
      {with("\"topk_ids\": [1, 2], \"topk_weights\": [Infinity, 0.5]"), "NaN or Infinity"},
      {with(ids + ", \"topk_weights\": [1e300, 0.5]"), "topk_weights[0] = 1e+300 is not finite"},
      {with("\"topk_ids\": [1, 8], " + ws), "topk_ids[1] = 8 is out of range [0, 8)"},
      {with("\"topk_ids\": [3, 3], " + ws), "chooses expert 3 twice"},
      {with("\"topk_ids\": [1, 2, 3], \"topk_weights\": [0.5, 0.5, 0.5]"),
       "topk_ids has 3 entries, expected top_k = 2"},
      {with(ids + ", \"topk_weights\": [0.5]"), "topk_weights has 1 entries, expected top_k = 2"},
      {with("\"topk_ids\": [1, -2], " + ws), "\"topk_ids\" is a negative number"},
      {with("\"topk_ids\": [1, 2.5], " + ws), "\"topk_ids\" is a fractional number"},
      {with("\"topk_ids\": [1, 2.0], " + ws), "\"topk_ids\" is a number written with a point or an exponent"},
      {with(ids + ", \"topk_weights\": [-5, 0.5]"), "topk_weights[0] = -5 is negative"},
      {with("\"topk_ids\": [\"1\", 2], " + ws), "\"topk_ids\" is a string"},
      {with("\"topk_ids\": 1, " + ws), "\"topk_ids\" is a number, expected an array"},
      {with(ids + ", \"topk_weights\": [[0.5], 0.5]"), "\"topk_weights\" is a nested array"},
      {with(ids + ", \"topk_weights\": [\"x\", 0.5]"), "\"topk_weights\" is a string"},
      {with(ids), "lacks \"topk_weights\""},
      {with(ws), "lacks \"topk_ids\""},
      {"{\"req_id\": 2, \"layer\": 0, " + ids + ", " + ws + "}", "lacks \"token_idx\""},
      {"{\"req_id\": 2, \"token_idx\": 0, " + ids + ", " + ws + "}", "lacks \"layer\""},
      {"{\"req_id\": 2, \"token_idx\": -1, \"layer\": 0, " + ids + ", " + ws + "}",
       "\"token_idx\" is a negative number"},
      {"{\"req_id\": 2, \"token_idx\": 3.0, \"layer\": 0, " + ids + ", " + ws + "}",
       "\"token_idx\" is a number written with a point or an exponent"},
      {"{\"req_id\": 2, \"token_idx\": 0, \"layer\": 1e0, " + ids + ", " + ws + "}",
       "\"layer\" is a number written with a point or an exponent"},
      {"{\"req_id\": 2, \"token_idx\": \"0\", \"layer\": 0, " + ids + ", " + ws + "}", "\"token_idx\" is a string"},
      {"{\"req_id\": 2, \"token_idx\": 0, \"layer\": {}, " + ids + ", " + ws + "}", "\"layer\" is an object"},
      {"{\"req_id\": 2, \"token_idx\": 0, \"layer\": 4294967296, " + ids + ", " + ws + "}",
       "layer 4294967296 exceeds 2^32-1"},
      {"{\"req_id\": -2, \"token_idx\": 0, \"layer\": 0, " + ids + ", " + ws + "}", "\"req_id\" is a negative number"},
      {"{\"req_id\": true, \"token_idx\": 0, \"layer\": 0, " + ids + ", " + ws + "}", "\"req_id\" is a boolean"},
      // Strings are numbered 0, 1, ... and numbers kept: both in one log would give two requests id 1.
      {"{\"req_id\": \"b\", \"token_idx\": 0, \"layer\": 0, " + ids + ", " + ws + "}",
       "req_id is a string here and a number at line 1: a log's req_ids are all numbers or all strings"},
      {with(ids + ", " + ws + ", \"phase\": \"warmup\""),
       "\"phase\" is \"warmup\", expected \"prefill\" or \"decode\""},
      {with(ids + ", " + ws + ", \"step\": -3"), "step -3 is outside"},
      {with(ids + ", " + ws + ", \"step\": 1.5"), "\"step\" is a fractional number"},
      {with(ids + ", " + ws + ", \"domain\": 3"), "\"domain\" is a number"},
      // What a trace's domain table holds (and the binary format writes): a longer one read, then
      // refused by write_trace or a pickle.
      {with(ids + ", " + ws + ", \"domain\": \"" + std::string(4097, 'd') + "\""),
       "a domain name of 4097 bytes, expected at most 4096"},
      {"{\"req_id\": 1, \"token_idx\": 1, \"layer\": 0, " + ids + ", " + ws + ", \"domain\": \"law\"}",
       "domain \"law\" but earlier records of this request (line 1) say \"x\""},
      // A field named twice says two things (a JSON parser keeps one of them).
      {"{\"req_id\": 2, \"req_id\": 3, \"token_idx\": 0, \"layer\": 0, " + ids + ", " + ws + "}",
       "\"req_id\" appears twice"},
      {with(ids + ", " + ws + ", \"topk_ids\": [2, 1]"), "\"topk_ids\" appears twice"},
      // nlohmann-json ends its input at a NUL byte: the rest of the line was never read.
      {with(ids + ", " + ws) + std::string("\0\0", 2), "a NUL byte at column"},
  };
  for (const auto& c : cases) {
    const std::string text = good.substr(0, good.size() - 1) + ", \"domain\": \"x\"}\n" + c.line + "\n";
    const auto line = expect_format_error([&] { (void)trace::import_jsonl_text(text, "bad.jsonl", opts()); },
                                          {"bad.jsonl:2: ", c.needle});
    BOOST_TEST(line == 2u, c.needle);
    auto o = opts();
    o.skip_bad = true;
    trace::jsonl_report rep;
    const auto t = trace::import_jsonl_text(text, "bad.jsonl", o, &rep);
    BOOST_TEST(rep.bad_records == 1u, c.needle);
    BOOST_TEST(rep.route_records == 1u);
    BOOST_TEST_REQUIRE(rep.messages.size() == 1u);
    BOOST_TEST(rep.messages[0].find("bad.jsonl:2: ") == 0u);
    BOOST_TEST(t.requests() == 1u);
    BOOST_TEST(t.request(0).id == 1u);
  }
}

// Layers that disagree on a request's tokens, and duplicated tokens.
BOOST_AUTO_TEST_CASE(inconsistent_requests_fail_or_are_dropped) {
  auto r = [](int req, int tok, int layer) {
    return "{\"req_id\": " + std::to_string(req) + ", \"token_idx\": " + std::to_string(tok) +
           ", \"layer\": " + std::to_string(layer) + ", \"topk_ids\": [0, 1], \"topk_weights\": [1, 1]}\n";
  };
  const std::string ok = r(9, 0, 0) + r(9, 0, 1);
  struct bad_case {
    std::string text;
    std::string needle;
    std::uint64_t line;
  };
  const std::vector<bad_case> cases = {
      {ok + r(1, 0, 0) + r(1, 1, 0) + r(1, 0, 1),
       "request 1 (first record at line 3): layer 1 has 1 tokens, layer 0 has 2", 5},
      {ok + r(1, 0, 0) + r(1, 0, 1) + r(1, 1, 1), "layer 1 has 2 tokens, layer 0 has 1", 5},
      {ok + r(1, 0, 0) + r(1, 2, 1), "layer 1 has token_idx 2 where layer 0 has 0", 4},
      {ok + r(1, 0, 0), "request 1 (first record at line 3) has no record for layer 1", 3},
      {ok + r(1, 0, 0) + r(1, 0, 1) + r(1, 0, 0), "token_idx 0 at layer 0 appears twice (also line 3)", 5},
  };
  for (const auto& c : cases) {
    auto strict = opts();
    strict.trim_ragged = false; // the first two cases are ragged tails, kept trimmed by default
    const auto line =
        expect_format_error([&] { (void)trace::import_jsonl_text(c.text, "inc.jsonl", strict); }, {c.needle});
    BOOST_TEST(line == c.line, c.needle);
    auto o = strict;
    o.skip_bad = true;
    trace::jsonl_report rep;
    const auto t = trace::import_jsonl_text(c.text, "inc.jsonl", o, &rep);
    BOOST_TEST(rep.dropped_requests == 1u);
    BOOST_TEST_REQUIRE(rep.messages.size() == 1u);
    BOOST_TEST(rep.messages[0].find("(request dropped)") != std::string::npos);
    BOOST_TEST(t.requests() == 1u);
    BOOST_TEST(t.request(0).id == 9u);
  }
}

BOOST_AUTO_TEST_CASE(declarations_and_empty_inputs) {
  const std::string one = "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 4, \"topk_ids\": [1, 2], "
                          "\"topk_weights\": [0.5, 0.5]}\n";
  BOOST_CHECK_THROW(trace::import_jsonl_text(one, "x", {}), invalid_input_error); // experts declared nowhere
  // The message names the setting that gives the count as the caller calls it (a tool's own option),
  // and none where the caller has none.
  const auto undeclared = [&](const std::string& setting) {
    trace::jsonl_options named;
    named.settings.experts = setting;
    try {
      (void)trace::import_jsonl_text(one, "x", named);
    } catch (const invalid_input_error& e) {
      return std::string(e.message());
    }
    return std::string("no error");
  };
  BOOST_TEST(undeclared("jsonl_options::experts").find("give the count with jsonl_options::experts") !=
             std::string::npos);
  BOOST_TEST(undeclared("--experts").find("give the count with --experts") != std::string::npos);
  BOOST_TEST(undeclared("--experts").find("trace import") == std::string::npos);
  BOOST_TEST(undeclared("").find("put a meta line with num_experts before the route records") != std::string::npos);
  BOOST_TEST(undeclared("").find("give the count") == std::string::npos);
  auto o = opts();
  o.layers = 2;
  expect_format_error([&] { (void)trace::import_jsonl_text(one, "x", o); },
                      {"1 distinct layer numbers (4..4), expected 2"});
  o = opts();
  o.top_k = 3;
  expect_format_error([&] { (void)trace::import_jsonl_text(one, "x", o); }, {"x:1:", "expected top_k = 3"});
  expect_format_error([&] { (void)trace::import_jsonl_text("", "x", opts()); }, {"no route record"});
  // A pretty-printed JSON document (a map, a plan) is named as what it is, not as JSON cut short.
  for (const char* doc : {"{\n  \"format\": \"locus-expert-map\",\n  \"layers\": []\n}\n",
                          "{\"format\": \"locus-expert-map\",\n\"layers\": []}\n"})
    expect_format_error([&] { (void)trace::import_jsonl_text(doc, "m.json", opts()); },
                        {"m.json:1: invalid JSON", "one JSON document spread over several lines"});
  expect_format_error([&] { (void)trace::import_jsonl_text("{\"type\": \"meta\"}\n\n", "x", opts()); },
                      {"no route record"});
  o = opts();
  o.skip_bad = true;
  expect_format_error([&] { (void)trace::import_jsonl_text("{]\n{}\n", "x", o); }, {"every route record was bad"});
  // A meta line too late to declare the experts, or declaring too many.
  const std::string late = one + "{\"type\": \"meta\", \"num_experts\": 16}\n";
  trace::jsonl_options none;
  BOOST_CHECK_THROW(trace::import_jsonl_text(late, "x", none), invalid_input_error);
  expect_format_error(
      [&] { (void)trace::import_jsonl_text("{\"type\": \"meta\", \"num_experts\": 70000}\n" + one, "x", none); },
      {"x:1:", "num_experts is 70000, expected 1..65536"});
  const auto t = trace::import_jsonl_text("{\"type\": \"meta\", \"experts\": 3}\n" + one, "x", none);
  BOOST_TEST(t.experts() == 3u);
}

// Meta lines that were silently ignored or misreported.
BOOST_AUTO_TEST_CASE(meta_lines_are_checked) {
  const std::string one = "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 4, \"topk_ids\": [1, 2], "
                          "\"topk_weights\": [0.5, 0.5]}\n";
  const trace::jsonl_options none;
  // A second meta line that contradicts the first (it used to be ignored).
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(
            "{\"type\": \"meta\", \"num_experts\": 64}\n{\"type\": \"meta\", \"num_experts\": 32}\n" + one, "x", none);
      },
      {"x:2:", "num_experts 32 conflicts with num_experts 64 declared at line 1"});
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(
            "{\"type\": \"meta\", \"num_experts\": 64, \"top_k\": 2}\n{\"type\": \"meta\", \"top_k\": 6}\n" + one, "x",
            none);
      },
      {"x:2:", "top_k 6 conflicts with top_k 2 declared at line 1"});
  // Skipping bad records skips no meta line: a dropped declaration would let the first win silently,
  // and the error advises no --skip-bad that cannot help.
  trace::jsonl_options skipping;
  skipping.skip_bad = true;
  for (const trace::jsonl_options* o : {&none, static_cast<const trace::jsonl_options*>(&skipping)})
    BOOST_TEST(locus_test::error_message<format_error>([&] {
                 (void)trace::import_jsonl_text(
                     "{\"type\": \"meta\", \"num_experts\": 64}\n{\"type\": \"meta\", \"experts\": 8, "
                     "\"num_experts\": 16}\n" +
                         one,
                     "x", *o);
               }) == "x:2: \"experts\" 8 and \"num_experts\" 16 disagree (a meta line)");
  // The same declaration twice is fine.
  BOOST_TEST(
      trace::import_jsonl_text(
          "{\"type\": \"meta\", \"num_experts\": 8}\n{\"type\": \"meta\", \"num_experts\": 8}\n" + one, "x", none)
          .experts() == 8u);
  // num_experts 0 is a bad declaration, not a missing one.
  expect_format_error(
      [&] { (void)trace::import_jsonl_text("{\"type\": \"meta\", \"num_experts\": 0}\n" + one, "x", none); },
      {"x:1:", "num_experts is 0, expected 1..65536"});
  // top_k above the number of experts is named as such (it was reported as a count mismatch).
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text("{\"type\": \"meta\", \"num_experts\": 16, \"top_k\": 17}\n" + one, "x", none);
      },
      {"x:1:", "top_k is 17, expected 1..16 (16 experts)"});
  // Ids beyond 2^64-1 are integers, not fractions; one written with an exponent is said to be.
  for (const auto& [id, said] : {std::pair{"18446744073709551616", "is an integer beyond 2^64-1"},
                                 std::pair{"1e30", "is a number written with a point or an exponent"}})
    expect_format_error(
        [&] {
          (void)trace::import_jsonl_text(
              std::string("{\"type\": \"meta\", \"num_experts\": 8}\n{\"req_id\": 1, \"token_idx\": ") + id +
                  ", \"layer\": 0, \"topk_ids\": [1, 2], \"topk_weights\": [0.5, 0.5]}\n",
              "x", none);
        },
        {"x:2:", "\"token_idx\" ", said});
}

// A line longer than the limit is refused before it is buffered or parsed; an unterminated last
// line that does not parse is named as a truncation.
BOOST_AUTO_TEST_CASE(long_and_truncated_lines) {
  auto o = opts();
  o.max_line_bytes = 1000;
  const std::string big = "{\"type\": \"stats\", \"x\": \"" + std::string(2000, 'y') + "\"}\n";
  expect_format_error([&] { (void)trace::import_jsonl_text(big, "x", o); }, {"x:1:", "line longer than 1000 bytes"});
  const fs::path p = fs::temp_directory_path() / ("locus_test_jsonl_long_" + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(p, std::ios::binary) << big;
  expect_format_error([&] { (void)trace::import_jsonl(p.string(), o); }, {":1:", "line longer than 1000 bytes"});
  std::ofstream(p, std::ios::binary) << "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [1, 2], "
                                        "\"topk_weights\": [0.5, 0.5]}\n{\"req_id\": 1, \"token_idx\": 1, \"lay";
  expect_format_error([&] { (void)trace::import_jsonl(p.string(), opts()); }, {":2:", "the file looks truncated"});
  fs::remove(p);
}

// Through a file: lines longer than the read chunk, no final newline, CRLF, progress reports.
BOOST_AUTO_TEST_CASE(file_import_streams_across_chunks) {
  std::mt19937 rng(2);
  const auto want = random_requests(rng, 200, 64, 6, 4);
  const fs::path p = fs::temp_directory_path() / ("locus_test_trace_jsonl_" + std::to_string(::getpid()) + ".jsonl");
  std::string text = "{\"type\": \"meta\", \"padding\": \"" + std::string(1500000, 'x') + "\"}\r\n";
  for (const auto& q : want)
    for (const auto& layer : q.layers)
      for (const auto& x : layer)
        text += line_of(x) + "\n";
  text.pop_back(); // no final newline
  std::ofstream(p, std::ios::binary) << text;
  auto o = opts(64);
  std::uint64_t last = 0, calls = 0;
  o.progress = [&](std::uint64_t done, std::uint64_t all) {
    BOOST_TEST(done <= all);
    BOOST_TEST(done >= last);
    last = done;
    ++calls;
  };
  trace::jsonl_report rep;
  const auto t = trace::import_jsonl(p.string(), o, &rep);
  fs::remove(p);
  check_against(t, want, 6);
  BOOST_TEST(last == text.size());
  BOOST_TEST(calls >= 1u);
  BOOST_CHECK_THROW(trace::import_jsonl("/nonexistent/locus.jsonl", o), io_error);
}

namespace {
using locus::trace::detail::trace::jsonl_fields;
using locus::trace::detail::trace::jsonl_sax;

bool same_fields(const jsonl_fields& a, const jsonl_fields& b) {
  return a.req_kind == b.req_kind && a.req_number == b.req_number && a.req_text == b.req_text &&
         a.has_token == b.has_token && a.has_layer == b.has_layer && a.has_ids == b.has_ids &&
         a.has_weights == b.has_weights && a.has_step == b.has_step && a.has_phase == b.has_phase &&
         a.has_domain == b.has_domain && a.has_type == b.has_type && a.token_idx == b.token_idx && a.layer == b.layer &&
         a.step == b.step && a.ph == b.ph && a.domain == b.domain && a.type == b.type && a.ids == b.ids &&
         a.weights == b.weights && a.meta_experts == b.meta_experts && a.meta_top_k == b.meta_top_k &&
         a.error == b.error;
}
} // namespace

// The fast lexer for flat records and nlohmann-json's SAX parser fill the same fields whenever
// the lexer takes a line; on the lines route loggers write it must take them. Lines: typical
// records, records with every odd value the schema allows, and random byte-level mutations.
BOOST_AUTO_TEST_CASE(fast_lexer_agrees_with_nlohmann_json) {
  std::vector<std::string> lines = {
      R"({"req_id": 17, "token_idx": 3, "layer": 5, "topk_ids": [4, 9], "topk_weights": [0.6, 0.4], "phase": "decode", "step": 0, "domain": "code"})",
      R"({"req_id":"a-b","token_idx":0,"layer":0,"topk_ids":[0,63],"topk_weights":[1e-3,2.5E+2],"phase":"prefill"})",
      R"( { "type" : "meta" , "num_experts" : 64 , "top_k" : 6 } )",
      R"({"req_id": null, "token_idx": 1, "layer": 2, "topk_ids": [], "topk_weights": [], "step": -4, "extra": [1, "x", null]})",
      R"({"req_id": 1, "token_idx": 1, "layer": 1, "topk_ids": [1, 2], "topk_ids": [3], "topk_weights": [-0, -0.0, 0.1234567890123456789]})",
      R"({"req_id": 1, "token_idx": 18446744073709551615, "layer": 1, "topk_ids": [1.5], "topk_weights": ["x"]})",
      R"({"phase": "neither", "domain": 5, "layer": "2", "topk_ids": [[1]], "other": {"a": 1}})",
      R"({})",
  };
  std::mt19937_64 rng(11);
  const std::string alphabet = "{}[]\":,0123456789.-+eE nulltrue\\\t\x80";
  const std::size_t seeds = lines.size();
  for (std::size_t i = 0; i < 3000; ++i) {
    std::string s = lines[rng() % seeds];
    for (int m = 0, n = 1 + static_cast<int>(rng() % 3); m < n && !s.empty(); ++m) {
      const std::size_t at = rng() % s.size();
      switch (rng() % 3) {
      case 0: s.erase(at, 1); break;
      case 1: s.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
      default: s[at] = alphabet[rng() % alphabet.size()]; break;
      }
    }
    lines.push_back(s);
  }
  std::size_t taken = 0;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    jsonl_fields fast, slow;
    bool fast_ok = false;
    {
      jsonl_sax sax(fast);
      fast_ok = locus::trace::detail::trace::flat_record_lexer<jsonl_sax>(lines[i], sax).run();
    }
    jsonl_sax sax(slow);
    const bool slow_ok =
        nlohmann::json::sax_parse(lines[i].begin(), lines[i].end(), &sax, nlohmann::json::input_format_t::json, true);
    if (i < 5) BOOST_TEST(fast_ok, "the lexer must take line " << i << ": " << lines[i]);
    if (!fast_ok) continue;
    ++taken;
    BOOST_TEST(slow_ok, "nlohmann-json rejects a line the lexer took: " << lines[i]);
    BOOST_TEST(same_fields(fast, slow), "fields differ for: " << lines[i]);
  }
  BOOST_TEST_MESSAGE("lexer took " << taken << " of " << lines.size() << " lines");
  BOOST_TEST(taken > lines.size() / 10); // the mutations must not make the test vacuous
}

// Layers that end early (a logger stopped mid-step): the request keeps the tokens every layer holds,
// and the report says how many were dropped; with trim_ragged false it is inconsistent.
BOOST_AUTO_TEST_CASE(ragged_tails_are_trimmed_and_counted) {
  auto r = [](int req, int tok, int layer, int e) {
    return "{\"req_id\": " + std::to_string(req) + ", \"token_idx\": " + std::to_string(tok) +
           ", \"layer\": " + std::to_string(layer) + ", \"topk_ids\": [" + std::to_string(e) +
           ", 7], \"topk_weights\": [1, 1]}\n";
  };
  // Request 1: layer 0 holds tokens 0..4, layer 1 tokens 0..2, layer 2 tokens 0..3. Request 2 is whole.
  std::string text;
  for (int t = 0; t < 5; ++t)
    text += r(1, t, 0, t);
  for (int t = 0; t < 3; ++t)
    text += r(1, t, 1, t + 1);
  for (int t = 0; t < 4; ++t)
    text += r(1, t, 2, t + 2);
  for (int l = 0; l < 3; ++l)
    text += r(2, 0, l, l);
  trace::jsonl_report rep;
  const auto t = trace::import_jsonl_text(text, "rag.jsonl", opts(), &rep);
  BOOST_TEST_REQUIRE(t.requests() == 2u);
  BOOST_TEST(t.request(0).length == 3u);
  BOOST_TEST(t.request(1).length == 1u);
  for (std::size_t l = 0; l < 3; ++l)
    for (std::size_t p = 0; p < 3; ++p)
      BOOST_TEST(t.layer(l).ids()[p * 2] == p + l);
  BOOST_TEST(rep.trimmed_requests == 1u);
  BOOST_TEST(rep.trimmed_tokens == 2u); // token_idx 3 and 4
  BOOST_TEST(rep.dropped_requests == 0u);
  BOOST_TEST_REQUIRE(rep.trimmed_examples.size() == 1u);
  BOOST_TEST(rep.trimmed_examples[0].find("request 1 (first record at line 1): kept the 3 tokens every layer holds, "
                                          "dropped token_idx 3..4") == 0u);
  auto strict = opts();
  strict.trim_ragged = false;
  expect_format_error([&] { (void)trace::import_jsonl_text(text, "rag.jsonl", strict); },
                      {"layer 1 has 3 tokens, layer 0 has 5", "(jsonl_options::trim_ragged keeps the tokens"});
  // A tool names its own options, and none where it has none to offer.
  strict.settings = {"--experts", "--split-on-restart", "importing without --strict-layers", "--skip-bad"};
  expect_format_error([&] { (void)trace::import_jsonl_text(text, "rag.jsonl", strict); },
                      {"(importing without --strict-layers keeps the tokens every layer holds) (--skip-bad drops"});
  strict.settings = {"", "", "", ""};
  const auto bare =
      locus_test::error_message<format_error>([&] { (void)trace::import_jsonl_text(text, "rag.jsonl", strict); });
  BOOST_TEST(bare.find("every layer must hold the same tokens") != std::string::npos, bare);
  BOOST_TEST(bare.find('(') == bare.find("(first record"), bare); // no advice after it
  // A token missing inside a layer (not at its end) is not a ragged tail.
  expect_format_error(
      [&] { (void)trace::import_jsonl_text(r(1, 0, 0, 0) + r(1, 1, 0, 1) + r(1, 1, 1, 1), "x", opts()); },
      {"layer 1 has token_idx 1 where layer 0 has 0"});
}

// `experts` is the chosen-experts list in a route record and the expert count in a meta line.
BOOST_AUTO_TEST_CASE(experts_key_means_what_its_line_is) {
  const std::string meta = "{\"type\": \"meta\", \"experts\": 8, \"top_k\": 2}\n";
  const std::string with_ids = "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"topk_ids\": [3, 5], "
                               "\"topk_weights\": [0.5, 0.25]}\n";
  const std::string with_experts = "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"experts\": [3, 5], "
                                   "\"topk_weights\": [0.5, 0.25]}\n";
  // The route record's `experts` is read as topk_ids; the meta line's `experts` declares 8 experts.
  const auto a = trace::import_jsonl_text(meta + with_ids, "a", {});
  const auto b = trace::import_jsonl_text(meta + with_experts, "b", {});
  BOOST_TEST(a.experts() == 8u);
  BOOST_TEST((a == b));
  BOOST_TEST(b.layer(0).ids()[1] == 5u);
  // The type may come after the key.
  const auto c = trace::import_jsonl_text("{\"experts\": 8, \"type\": \"meta\"}\n" + with_experts, "c", {});
  BOOST_TEST((a == c));
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(meta + "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"experts\": 8, "
                                              "\"topk_ids\": [3, 5], \"topk_weights\": [0.5, 0.25]}\n",
                                       "d", {});
      },
      {"d:2: \"experts\" in a route record is the list of chosen experts", "num_experts"});
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(meta + "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"experts\": [3, 5], "
                                              "\"topk_ids\": [3, 5], \"topk_weights\": [0.5, 0.25]}\n",
                                       "e", {});
      },
      {"e:2: both \"topk_ids\" and \"experts\""});
  expect_format_error(
      [&] { (void)trace::import_jsonl_text("{\"type\": \"meta\", \"experts\": [1]}\n" + with_ids, "f", {}); },
      {"f:1: \"experts\" in a meta line is the number of experts"});
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text("{\"type\": \"meta\", \"experts\": 8, \"num_experts\": 16}\n" + with_ids, "g",
                                       {});
      },
      {"g:1: \"experts\" 8 and \"num_experts\" 16 disagree"});
  expect_format_error(
      [&] {
        (void)trace::import_jsonl_text(meta + "{\"req_id\": 1, \"token_idx\": 0, \"layer\": 0, \"experts\": [3, -5], "
                                              "\"topk_weights\": [0.5, 0.25]}\n",
                                       "h", {});
      },
      {"h:2: \"experts\" is a negative number"});
}

// Several files (one per layer, or shards) import as the one file that concatenates them; a folder
// reads its *.jsonl files sorted by name; errors name the file.
BOOST_AUTO_TEST_CASE(several_files_import_as_one_log) {
  std::mt19937 rng(3);
  const auto want = random_requests(rng, 20, 16, 2, 3);
  const fs::path dir = fs::temp_directory_path() / ("locus_test_jsonl_files_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<std::string> paths;
  std::string all;
  for (std::size_t l = 0; l < 3; ++l) {
    std::string text = "{\"type\": \"meta\", \"num_experts\": 16}\n";
    for (const auto& q : want)
      for (const auto& x : q.layers[l])
        text += line_of(x) + "\n";
    paths.push_back((dir / ("layer_" + std::to_string(l) + ".jsonl")).string());
    std::ofstream(paths.back(), std::ios::binary) << text;
    all += text;
  }
  std::ofstream(dir / "notes.txt") << "not a trace\n";
  const auto one = trace::import_jsonl_text(all, "all", {});
  check_against(one, want, 2);
  BOOST_TEST((trace::import_jsonl(paths) == one));
  BOOST_TEST((trace::import_jsonl(dir.string()) == one));
  const auto listed = trace::jsonl_inputs({dir.string()});
  BOOST_TEST(listed == paths);
  // Files in another order give the same requests (records are matched, not concatenated).
  BOOST_TEST((trace::import_jsonl(std::vector<std::string>{paths[2], paths[0], paths[1]}) == one));
  // A bad record in the second file is reported at that file's own line.
  {
    std::ofstream(paths[1], std::ios::app) << "{\"req_id\": 1, \"token_idx\": 0}\n";
    const std::size_t bad_line = static_cast<std::size_t>(std::count(all.begin(), all.end(), '\n')) / 3 + 1;
    const auto line = expect_format_error([&] { (void)trace::import_jsonl(paths); },
                                          {paths[1] + ":" + std::to_string(bad_line) + ": route record lacks"});
    BOOST_TEST(line == bad_line);
  }
  // A request repeated across files names both places.
  {
    const std::string dup = line_of(want[0].layers[0][0]) + "\n";
    std::ofstream(paths[1], std::ios::binary) << dup;
    std::ofstream(paths[2], std::ios::binary) << dup;
    expect_format_error(
        [&] {
          (void)trace::import_jsonl(std::vector<std::string>{paths[1], paths[2]}, opts(16));
        },
        {paths[2] + ":1: request " + std::to_string(want[0].id) + " (first record at " + paths[1] +
         ":1): token_idx 0 at layer 1 appears twice (also " + paths[1] + ":1)"});
  }
  fs::remove_all(dir);
  fs::create_directories(dir);
  BOOST_CHECK_THROW(trace::import_jsonl(dir.string()), io_error); // a folder without .jsonl files
  fs::remove_all(dir);
}
