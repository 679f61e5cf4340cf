#include "../support/npy_file.hpp"
#include "../support/safetensors_file.hpp"

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <locus/placement/load_import.hpp>
#include <string>
#include <unistd.h>
#include <vector>

using namespace locus;
using namespace locus::placement;

namespace {

// A .npy (version 1) file of `values` with NumPy's header for `descr` and `shape`.
template <class T>
std::string npy(const std::string& descr, const std::string& shape, const std::vector<T>& values) {
  return locus_test::npy_file(descr, shape, values.data(), values.size() * sizeof(T));
}

void write(const std::filesystem::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

std::string safetensors(const std::vector<std::pair<std::string, std::vector<std::int32_t>>>& tensors) {
  std::vector<locus_test::safetensor> ts;
  for (const auto& [name, v] : tensors)
    ts.push_back({name, "I32", {v.size()}, locus_test::bytes_of(v)});
  return locus_test::safetensors_file(ts);
}

// A safetensors file whose header is `header` as given, then `body`.
std::string raw_safetensors(const std::string& header, const std::string& body) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + body;
}

struct temp_dir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("locus_load_import_" + std::to_string(::getpid()));
  temp_dir() { std::filesystem::create_directories(path); }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

} // namespace

BOOST_AUTO_TEST_SUITE(load_import)

BOOST_AUTO_TEST_CASE(npy_loads_and_routed_experts) {
  temp_dir d;
  write(d.path / "load.npy", npy<double>("<f8", "(2, 3)", {1, 2, 3, 4, 5, 6}));
  const auto a = import_load((d.path / "load.npy").string());
  BOOST_TEST(a.load == (std::vector<std::vector<double>>{{1, 2, 3}, {4, 5, 6}}));
  BOOST_TEST(a.layer_ids == (std::vector<std::size_t>{0, 1}));
  // A loads table names its expert count: the same one is taken, another refused (it was ignored).
  BOOST_TEST(import_load((d.path / "load.npy").string(), 3).load.size() == 2u);
  BOOST_CHECK_THROW(import_load((d.path / "load.npy").string(), 4), invalid_input_error);
  // Two tokens, two layers, top-2: layer 0 routes to {0,3} and {3,1}; layer 1 to {2,2}... counted.
  write(d.path / "routed.npy", npy<std::int32_t>("<i4", "(2, 2, 2)", {0, 3, 2, 1, 3, 1, 2, 0}));
  const auto r = import_load((d.path / "routed.npy").string(), 5);
  BOOST_TEST(r.load == (std::vector<std::vector<double>>{{1, 1, 0, 2, 0}, {1, 1, 2, 0, 0}}));
  BOOST_CHECK_THROW(import_load((d.path / "routed.npy").string(), 3), invalid_input_error); // id 3 of 3 experts
  // An engine's array has a row per hidden layer; a dense layer's routes every choice to expert 0
  // (no router chooses one expert twice): it is left out and the MoE layers keep their indices.
  write(d.path / "hidden.npy", npy<std::int32_t>("<i4", "(2, 3, 2)", {0, 0, 0, 3, 2, 1, 0, 0, 3, 1, 2, 0}));
  const auto h = import_load((d.path / "hidden.npy").string(), 5);
  BOOST_TEST(h.layer_ids == (std::vector<std::size_t>{1, 2}));
  BOOST_TEST(h.load == (std::vector<std::vector<double>>{{1, 1, 0, 2, 0}, {1, 1, 2, 0, 0}}));
  write(d.path / "dense.npy", npy<std::int32_t>("<i4", "(2, 1, 2)", {0, 0, 0, 0}));
  BOOST_CHECK_THROW(import_load((d.path / "dense.npy").string(), 5), invalid_input_error);
  // A [layers, experts] table with a row per hidden layer (SGLang's logical counts summed over
  // steps): a row of zeros is a dense layer's, left out; the others keep their indices.
  write(d.path / "hidden_load.npy", npy<double>("<f8", "(4, 2)", {0, 0, 1, 2, 0, 0, 3, 0}));
  const auto hl = import_load((d.path / "hidden_load.npy").string());
  BOOST_TEST(hl.layer_ids == (std::vector<std::size_t>{1, 3}));
  BOOST_TEST(hl.layers_named);
  BOOST_TEST(hl.hidden_layers == 4u);
  BOOST_TEST(hl.load == (std::vector<std::vector<double>>{{1, 2}, {3, 0}}));
  BOOST_TEST(!a.layers_named); // nothing left out: numbered 0..L-1, not named
  // A bad value is named by its row in the file, not by its place among the rows kept.
  write(d.path / "hidden_nan.npy", npy<double>("<f8", "(3, 2)", {0, 0, 1, 2, -1, 3}));
  try {
    import_load((d.path / "hidden_nan.npy").string());
    BOOST_ERROR("a negative load was taken");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find("layer 2 expert 0 has load -1") != std::string::npos, e.what());
  }
  write(d.path / "zero_load.npy", npy<double>("<f8", "(2, 2)", {0, 0, 0, 0}));
  BOOST_CHECK_THROW(import_load((d.path / "zero_load.npy").string()), invalid_input_error);
  // Top-1 (Llama 4): a dense layer's row is expert 0 for every token too; with at least
  // dense_top1_tokens tokens it is left out, with fewer a router's choice of expert 0 is kept.
  const auto top1 = [&](std::size_t tokens) {
    std::vector<std::int32_t> ids;
    for (std::size_t t = 0; t < tokens; ++t)
      ids.insert(ids.end(), {0, static_cast<std::int32_t>(1 + t % 3), 0, static_cast<std::int32_t>(t % 4)});
    write(d.path / "top1.npy", npy<std::int32_t>("<i4", "(" + std::to_string(tokens) + ", 4, 1)", ids));
    return import_load((d.path / "top1.npy").string(), 4);
  };
  const auto many = top1(dense_top1_tokens);
  BOOST_TEST(many.layer_ids == (std::vector<std::size_t>{1, 3}));
  BOOST_TEST(many.hidden_layers == 4u);
  const auto few = top1(dense_top1_tokens - 1);
  BOOST_TEST(few.layer_ids == (std::vector<std::size_t>{0, 1, 2, 3}));
  write(d.path / "big.npy", npy<std::int32_t>(">i4", "(1, 2)", {1, 2}));
  BOOST_CHECK_THROW(import_load((d.path / "big.npy").string()), format_error);
  write(d.path / "short.npy", npy<double>("<f8", "(2, 3)", {1, 2, 3}));
  BOOST_CHECK_THROW(import_load((d.path / "short.npy").string()), format_error);
  write(d.path / "neg.npy", npy<double>("<f8", "(1, 2)", {1, -2}));
  BOOST_CHECK_THROW(import_load((d.path / "neg.npy").string()), invalid_input_error);
}

// Found by fuzz_npy: a header whose fortran_order has no value (std::out_of_range escaped), and an
// empty routed array (its largest id -1 cast to an expert count; an empty array's other extents
// sized the loads with no byte of the file behind them). Both are locus errors now.
BOOST_AUTO_TEST_CASE(npy_fuzz_finds_are_locus_errors) {
  temp_dir d;
  std::string cut = npy<double>("<f8", "(1, 2)", {1, 2});
  const auto colon = cut.find(':', cut.find("'fortran_order'"));
  cut = cut.substr(0, 8) + std::string(2, '\0') + cut.substr(10, colon - 9);
  const auto len = colon + 1 - 10;
  cut[8] = static_cast<char>(len & 0xff);
  cut[9] = static_cast<char>(len >> 8);
  write(d.path / "cut.npy", cut);
  BOOST_CHECK_THROW(import_load((d.path / "cut.npy").string()), format_error);
  write(d.path / "empty_routed.npy", npy<std::int32_t>("<i4", "(0, 2, 2)", {}));
  BOOST_CHECK_THROW(import_load((d.path / "empty_routed.npy").string()), invalid_input_error);
  write(d.path / "empty_wide.npy", npy<double>("<f8", "(1099511627775, 0)", {}));
  BOOST_CHECK_THROW(import_load((d.path / "empty_wide.npy").string()), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(trtllm_statistics_sum_ranks_and_iterations) {
  temp_dir d;
  write(d.path / "meta_info.json", R"({"num_experts": 3, "num_experts_per_token": 2})");
  write(d.path / "rank0.safetensors", safetensors({{"100_3", {1, 2, 3}}, {"101_3", {1, 0, 0}}, {"100_5", {0, 0, 9}}}));
  write(d.path / "rank1.safetensors", safetensors({{"100_3", {5, 5, 5}}, {"101_5", {1, 1, 1}}}));
  // The raw dumps beside the counts (each token's experts, [tokens, k]) are not counts.
  write(d.path / "rank0_raw.safetensors", safetensors({{"100_3", {0, 1, 2, 2}}, {"100_5", {1, 1}}}));
  const auto s = import_load(d.path.string());
  BOOST_TEST(s.layer_ids == (std::vector<std::size_t>{3, 5}));
  BOOST_TEST(s.load == (std::vector<std::vector<double>>{{7, 7, 8}, {1, 1, 10}}));
  BOOST_TEST(import_load(d.path.string(), 3).load.size() == 2u);
  BOOST_CHECK_THROW(import_load(d.path.string(), 4), invalid_input_error); // meta_info.json says 3
  write(d.path / "rank2.safetensors", safetensors({{"100_3", {1, 2}}}));
  BOOST_CHECK_THROW(import_load(d.path.string()), format_error); // 2 values for 3 experts
  // A rank without one of the layers the others record: its sum would be partial.
  write(d.path / "rank2.safetensors", safetensors({{"100_3", {1, 2, 3}}}));
  BOOST_CHECK_EXCEPTION(import_load(d.path.string()), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("rank2.safetensors has no statistics of layer 5, which") != std::string::npos;
  });
  write(d.path / "rank2.safetensors", safetensors({{"100_3", {1, 2, 3}}, {"100_5", {1, 2, 3}}, {"100_7", {1, 2, 3}}}));
  BOOST_CHECK_EXCEPTION(import_load(d.path.string()), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("has no statistics of layer 7, which") != std::string::npos;
  });
  // A window that holds none of layer 5's tensors would drop the layer.
  std::filesystem::remove(d.path / "rank1.safetensors");
  std::filesystem::remove(d.path / "rank2.safetensors");
  BOOST_TEST(import_load(d.path.string(), 0, {100, 101}).layer_ids == (std::vector<std::size_t>{3, 5}));
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {101, 102}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("layer 5 has no statistics of iterations 101 to 101") != std::string::npos;
  });
}

// A window sums the iterations in it and still checks the others; a window with nothing in it,
// an empty one, or one given with a .npy file is refused.
BOOST_AUTO_TEST_CASE(trtllm_iteration_window) {
  temp_dir d;
  write(d.path / "meta_info.json", R"({"num_experts": 3})");
  write(d.path / "rank0.safetensors", safetensors({{"100_3", {1, 2, 3}}, {"101_3", {1, 0, 0}}, {"102_3", {0, 4, 0}}}));
  write(d.path / "rank1.safetensors", safetensors({{"101_3", {5, 5, 5}}}));
  BOOST_TEST(import_load(d.path.string(), 0, {101, 102}).load == (std::vector<std::vector<double>>{{6, 5, 5}}));
  BOOST_TEST(import_load(d.path.string(), 0, {101}).load == (std::vector<std::vector<double>>{{6, 9, 5}}));
  // rank1's file starts after iteration 100: a window holding it would sum rank0's share alone.
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {0, 101}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("rank1.safetensors has no statistics of layer 3 in iterations 0 to 100, which") !=
           std::string::npos;
  });
  // ... and one that stops before the window (a rank that failed): refused, whoever is listed first.
  write(d.path / "rank1.safetensors", safetensors({{"99_3", {5, 5, 5}}}));
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {101}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("rank1.safetensors has no statistics of layer 3 in iterations from 101 on") !=
           std::string::npos;
  });
  std::filesystem::rename(d.path / "rank0.safetensors", d.path / "rank9.safetensors");
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {101}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("rank1.safetensors has no statistics of layer 3 in iterations from 101 on, "
                                      "which ") != std::string::npos;
  });
  BOOST_TEST(import_load(d.path.string(), 0, {99, 103}).load == (std::vector<std::vector<double>>{{7, 11, 8}}));
  std::filesystem::rename(d.path / "rank9.safetensors", d.path / "rank0.safetensors");
  write(d.path / "rank1.safetensors", safetensors({{"101_3", {5, 5, 5}}}));
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {200}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("no statistics of iterations from 200 on") != std::string::npos;
  });
  BOOST_CHECK_EXCEPTION(import_load(d.path.string(), 0, {5, 7}), invalid_input_error, [](const auto& e) {
    return std::string(e.what()).find("no statistics of iterations 5 to 6") != std::string::npos;
  });
  BOOST_CHECK_THROW(import_load(d.path.string(), 0, {7, 7}), config_error);
  write(d.path / "rank2.safetensors", safetensors({{"5_3", {1, 2}}})); // outside the window, still wrong
  BOOST_CHECK_THROW(import_load(d.path.string(), 0, {101}), format_error);
  const auto npy_path = d.path / "load.npy";
  write(npy_path, npy<double>("<f8", "(1, 2)", {1, 2}));
  BOOST_CHECK_THROW(import_load(npy_path.string(), 0, {1}), config_error);
  BOOST_TEST(import_load(npy_path.string()).load.size() == 1u);
}

// Counts and sizes in a statistics folder must be integers the file pays for: a float, a negative
// number or a shape whose element count overflows is a format error, never a cast (undefined for a
// float out of range) or an allocation of the overflowed count.
BOOST_AUTO_TEST_CASE(trtllm_hostile_numbers_are_format_errors) {
  const auto with_header = [](const std::string& info) {
    const std::string header = "{\"100_3\":" + info + "}", body(12, '\0');
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i)
      out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    return out + header + body;
  };
  const std::string shapes[] = {R"({"dtype":"I32","shape":[-1],"data_offsets":[0,12]})",
                                R"({"dtype":"I32","shape":[3.0],"data_offsets":[0,12]})",
                                R"({"dtype":"I32","shape":[1e30],"data_offsets":[0,12]})",
                                R"({"dtype":"I32","shape":[4294967296,4294967296,4],"data_offsets":[0,0]})",
                                R"({"dtype":"I32","shape":[3],"data_offsets":[0.0,12]})",
                                R"({"dtype":"I32","shape":[3],"data_offsets":[0,-12]})",
                                R"({"dtype":"I32","shape":"3","data_offsets":[0,12]})"};
  for (const auto& info : shapes) {
    temp_dir d;
    write(d.path / "meta_info.json", R"({"num_experts": 3})");
    write(d.path / "rank0.safetensors", with_header(info));
    BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  }
  for (const char* meta : {R"({"num_experts": -1.5})", R"({"num_experts": 3.0})", R"({"num_experts": -3})"}) {
    temp_dir d;
    write(d.path / "meta_info.json", meta);
    write(d.path / "rank0.safetensors", safetensors({{"100_3", {1, 2, 3}}}));
    BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  }
  temp_dir d; // the same file with integers loads
  write(d.path / "meta_info.json", R"({"num_experts": 3})");
  write(d.path / "rank0.safetensors", with_header(R"({"dtype":"I32","shape":[3],"data_offsets":[0,12]})"));
  BOOST_TEST(import_load(d.path.string()).load == (std::vector<std::vector<double>>{{0, 0, 0}}));
}

// Found by reading and by fuzz_trtllm: a tensor name "1__" or with a layer past 64 bits made
// std::stoul throw std::invalid_argument / std::out_of_range, and "1_2_3" was read as layer 2.
// Two names for one iteration and layer ("1_3", "01_3") counted it twice.
BOOST_AUTO_TEST_CASE(trtllm_tensor_names_must_be_iteration_layer) {
  for (const char* name : {"1__", "1_2_3", "1_99999999999999999999999", "_3", "1_", "1_+3", "1_ 3"}) {
    temp_dir d;
    write(d.path / "meta_info.json", R"({"num_experts": 2})");
    write(d.path / "rank0.safetensors", safetensors({{name, {1, 2}}}));
    BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  }
  temp_dir d;
  write(d.path / "meta_info.json", R"({"num_experts": 2})");
  write(d.path / "rank0.safetensors", safetensors({{"1_3", {1, 2}}, {"01_3", {1, 2}}}));
  BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  // The largest numbers that fit are read whole: any iteration, a layer below max_hidden_layers
  // (one past it is refused: a plan made of it would be refused by every export).
  write(d.path / "rank0.safetensors", safetensors({{"18446744073709551615_4095", {1, 2}}}));
  const auto s = import_load(d.path.string());
  BOOST_TEST(s.layer_ids == (std::vector<std::size_t>{4095}));
  BOOST_TEST(s.load == (std::vector<std::vector<double>>{{1, 2}}));
  write(d.path / "rank0.safetensors", safetensors({{"18446744073709551615_4096", {1, 2}}}));
  BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
}

// The safetensors format's own rules, which a reader that only bounds-checks lets through with a
// wrong sum: a tensor named twice (the JSON parser kept the last), two tensors reading the same
// bytes (counted twice), bytes no tensor covers; and a header over the format's 100 MB limit.
BOOST_AUTO_TEST_CASE(safetensors_rules_are_format_errors) {
  const std::string twelve = locus_test::bytes_of<std::int32_t>({1, 2, 3}), zeros4(4, '\0'), zeros8(8, '\0');
  const std::string cases[] = {
      raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},)"
                      R"("1_3":{"dtype":"I32","shape":[3],"data_offsets":[12,24]}})",
                      twelve + twelve),
      raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},)"
                      R"("1_4":{"dtype":"I32","shape":[3],"data_offsets":[0,12]}})",
                      twelve),
      raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},)"
                      R"("1_4":{"dtype":"I32","shape":[3],"data_offsets":[8,20]}})",
                      twelve + zeros8),
      raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[4,16]}})", zeros4 + twelve),
      raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[0,12]}})", twelve + zeros4),
  };
  for (const auto& file : cases) {
    temp_dir d;
    write(d.path / "meta_info.json", R"({"num_experts": 3})");
    write(d.path / "rank0.safetensors", file);
    BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  }
  temp_dir d;
  write(d.path / "meta_info.json", R"({"num_experts": 3})");
  // The two tensors in the other order of their bytes tile the data: read.
  write(d.path / "rank0.safetensors",
        raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[3],"data_offsets":[12,24]},)"
                        R"("1_4":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},"__metadata__":{"a":"b"}})",
                        twelve + locus_test::bytes_of<std::int32_t>({4, 5, 6})));
  BOOST_TEST(import_load(d.path.string()).load == (std::vector<std::vector<double>>{{4, 5, 6}, {1, 2, 3}}));
  // A header size past the limit is refused by that limit, before the file's size is looked at.
  std::string huge = safetensors({{"1_3", {1, 2, 3}}});
  huge[0] = '\x01', huge[1] = '\xe1', huge[2] = '\xf5', huge[3] = '\x05'; // 100000001
  write(d.path / "rank0.safetensors", huge);
  try {
    (void)import_load(d.path.string());
    BOOST_FAIL("read a header over the limit");
  } catch (const format_error& e) {
    BOOST_TEST(e.message().find("100000000 the safetensors format allows") != std::string::npos, e.message());
  }
}

// A value nested deeper than the stack holds frames of nlohmann's recursive dump() (a 400 KB
// file) overflowed the stack while its error message was written.
BOOST_AUTO_TEST_CASE(deeply_nested_values_are_format_errors) {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  temp_dir d;
  write(d.path / "meta_info.json", R"({"num_experts": )" + deep + "}");
  write(d.path / "rank0.safetensors", safetensors({{"1_3", {1, 2, 3}}}));
  BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
  write(d.path / "meta_info.json", R"({"num_experts": 3})");
  write(d.path / "rank0.safetensors",
        raw_safetensors(R"({"1_3":{"dtype":"I32","shape":[)" + deep + R"(],"data_offsets":[0,12]}})",
                        locus_test::bytes_of<std::int32_t>({1, 2, 3})));
  BOOST_CHECK_THROW(import_load(d.path.string()), format_error);
}

// The excerpt of a value in a message is dump()'s first characters (dump is the reference).
BOOST_AUTO_TEST_CASE(json_excerpt_is_the_start_of_dump) {
  for (const char* text : {R"(3)", R"(-1.5)", R"("a\"b")", R"([])", R"({})", R"([1,[2,[3]],{"k":[4,5]}])",
                           R"({"b":1,"a":{"c":[null,true,"xyzxyzxyzxyzxyzxyzxyzxyzxyzxyz"]}})"}) {
    const auto v = nlohmann::json::parse(text);
    for (const std::size_t max : {std::size_t{1}, std::size_t{5}, std::size_t{40}})
      BOOST_TEST(::locus::detail::json_excerpt(v, max) == v.dump().substr(0, max), text << " " << max);
  }
}

// A path the file system refuses to look up (a name too long) is a locus error naming it; the
// throwing std::filesystem calls raised std::filesystem::filesystem_error.
BOOST_AUTO_TEST_CASE(unreadable_paths_are_io_errors) {
  BOOST_CHECK_THROW(import_load(std::string(5000, 'a')), io_error);
}

// A .npy descr that only starts like a known dtype ("<i4x") was read as NaNs and refused as bad
// loads; it is a dtype locus does not read.
BOOST_AUTO_TEST_CASE(npy_unknown_dtypes_are_format_errors) {
  temp_dir d;
  for (const char* descr : {"<i4x", "=i4", "xf8", "<f2", "<b1"}) {
    write(d.path / "odd.npy", npy<std::int32_t>(descr, "(1, 2)", {1, 2}));
    BOOST_CHECK_THROW(import_load((d.path / "odd.npy").string()), format_error);
  }
}

BOOST_AUTO_TEST_SUITE_END()
