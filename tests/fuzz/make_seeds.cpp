// Writes the fuzz seed corpus (tests/fuzz/corpus/{binary,esft,jsonl,grouping,npy,trtllm}/) from
// tiny synthetic traces (grouping: workload-aware models fitted on them; npy: load and routing
// arrays; trtllm: TensorRT-LLM expert-statistics folders):
//   c++ -std=c++20 -I include tests/fuzz/make_seeds.cpp -o make_seeds && ./make_seeds tests/fuzz/corpus
// The seeds are committed; rerun this only when the formats change.
#include "../support/npy_file.hpp"
#include "../support/safetensors_file.hpp"

#include <cstdio>
#include <filesystem>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <string>
#include <vector>

namespace {
namespace fs = std::filesystem;

locus::trace::trace tiny(std::uint64_t seed, std::size_t experts, std::size_t k, std::size_t layers,
                         std::size_t requests) {
  locus::trace::detail::splitmix64 g(seed);
  locus::trace::trace_builder b(experts, k, layers);
  b.set_domains({"code", "math"});
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(r, static_cast<std::uint32_t>(r % 2), 1 + g.below(3));
  for (std::size_t t = 0; t < b.tokens(); ++t) {
    b.set_token(t, g.below(2) ? locus::trace::phase::prefill : locus::trace::phase::decode,
                static_cast<std::int32_t>(g.below(4)) - 1);
    for (std::size_t l = 0; l < layers; ++l) {
      std::vector<locus::trace::trace_expert_id> pool(experts);
      for (std::size_t e = 0; e < experts; ++e)
        pool[e] = static_cast<locus::trace::trace_expert_id>(e);
      for (std::size_t j = 0; j < k; ++j) {
        std::swap(pool[j], pool[j + g.below(experts - j)]);
        b.ids(l, t)[j] = pool[j];
        b.weights(l, t)[j] = static_cast<float>(g.uniform());
      }
    }
  }
  return b.build();
}

void put(const fs::path& p, const std::string& bytes) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}
} // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds <corpus dir>\n");
    return 2;
  }
  const fs::path root = argv[1];
  for (const char* d : {"binary", "esft", "jsonl"})
    fs::create_directories(root / d);
  struct shape {
    std::size_t experts, k, layers, requests;
  };
  const shape shapes[] = {{4, 1, 1, 1}, {8, 2, 2, 3}, {16, 4, 3, 2}};
  int n = 0;
  for (const auto& s : shapes) {
    const auto t = tiny(static_cast<std::uint64_t>(n) + 1, s.experts, s.k, s.layers, s.requests);
    const auto bin = locus::trace::encode_trace(t);
    put(root / "binary" / ("seed" + std::to_string(n) + ".bin"),
        std::string(reinterpret_cast<const char*>(bin.data()), bin.size()));
    // ESFT target layout: [k - 1][experts - k] then layer files separated by '\f' (fuzz_esft.cpp).
    std::string esft;
    esft += static_cast<char>(s.k - 1);
    esft += static_cast<char>(s.experts - s.k);
    for (std::size_t l = 0; l < t.layers(); ++l) {
      if (l) esft += '\f';
      esft += locus::trace::format_esft_layer(t, 0, l);
    }
    put(root / "esft" / ("seed" + std::to_string(n) + ".txt"), esft);
    // JSONL target layout: [options byte] then the file; records in file order, one per token per layer.
    std::string jsonl(1, static_cast<char>(n == 1 ? 4 : 0)); // seed 1 declares experts in a meta line
    jsonl += "{\"type\": \"meta\", \"num_experts\": " + std::to_string(s.experts) + "}\n";
    for (std::size_t r = 0; r < t.requests(); ++r) {
      const auto& q = t.request(r);
      for (std::size_t p = 0; p < q.length; ++p)
        for (std::size_t l = 0; l < t.layers(); ++l) {
          const std::size_t tok = q.first_token + p;
          std::string ids, ws;
          for (std::size_t j = 0; j < s.k; ++j) {
            ids += (j ? ", " : "") + std::to_string(t.layer(l).ids()[tok * s.k + j]);
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.6g", static_cast<double>(t.layer(l).weights()[tok * s.k + j]));
            ws += (j ? ", " : "") + std::string(buf);
          }
          jsonl += "{\"req_id\": " + std::to_string(q.id) + ", \"token_idx\": " + std::to_string(p) +
                   ", \"layer\": " + std::to_string(l) + ", \"topk_ids\": [" + ids + "], \"topk_weights\": [" + ws +
                   "], \"phase\": \"" + locus::trace::to_string(t.token_phase(tok)) +
                   "\", \"step\": " + std::to_string(t.token_step(tok)) + ", \"domain\": \"" + t.domains()[q.domain] +
                   "\"}\n";
        }
    }
    put(root / "jsonl" / ("seed" + std::to_string(n) + ".jsonl"), jsonl);
    ++n;
  }
  // Grouping models, fitted with the first token of each request as its prefill.
  fs::create_directories(root / "grouping");
  for (std::size_t g = 0; g < 2; ++g) {
    const auto t = tiny(100 + g, 8, 2, 2, 8).with_prefill_tokens(1);
    locus::grouper::workload_aware_options o;
    o.clusters = 2 + g;
    o.prefill_tokens = 1;
    const auto m = locus::grouper::workload_model::fit(t, locus::dynamic_topology(2, 1), o);
    put(root / "grouping" / ("seed" + std::to_string(g) + ".json"), locus::grouper::grouping_to_json(m).dump());
  }
  // .npy target layout: [expert count the caller passes] then a version-1 .npy file.
  fs::create_directories(root / "npy");
  const auto npy = locus_test::npy_file;
  const double loads[] = {1, 2, 3, 4, 5, 6};
  const std::int32_t routed[] = {0, 3, 2, 1, 3, 1, 2, 0};
  const std::uint16_t counts[] = {7, 0, 9};
  put(root / "npy" / "seed0.bin", std::string(1, '\0') + npy("<f8", "(2, 3)", loads, sizeof loads));
  put(root / "npy" / "seed1.bin", std::string(1, '\5') + npy("<i4", "(2, 2, 2)", routed, sizeof routed));
  put(root / "npy" / "seed2.bin", std::string(1, '\0') + npy("<u2", "(3,)", counts, sizeof counts));
  // TensorRT-LLM statistics target layout: meta_info.json, "#@#", rank0.safetensors[, "#@#", rank1].
  fs::create_directories(root / "trtllm");
  using locus_test::bytes_of;
  const std::string st0 = locus_test::safetensors_file({{"0_0", "I32", {4}, bytes_of<std::int32_t>({3, 0, 1, 4})},
                                                        {"0_1", "I32", {4}, bytes_of<std::int32_t>({2, 2, 2, 2})},
                                                        {"1_0", "I32", {4}, bytes_of<std::int32_t>({0, 5, 0, 1})}});
  const std::string st1 = locus_test::safetensors_file(
      {{"7_2", "F32", {3}, bytes_of<float>({1.5f, 0, 2})}, {"8_2", "I64", {3}, bytes_of<std::int64_t>({4, 1, 0})}},
      R"({"format":"pt"})");
  const std::string st2 = locus_test::safetensors_file(
      {{"7_2", "U8", {3}, bytes_of<std::uint8_t>({9, 8, 7})}, {"7_4", "F64", {3}, bytes_of<double>({0.25, 1, 0})}});
  const std::string mark = "#@#";
  put(root / "trtllm" / "seed0.bin", R"({"num_experts": 4, "num_experts_per_token": 2})" + mark + st0);
  put(root / "trtllm" / "seed1.bin", R"({"num_experts": 3})" + mark + st1 + mark + st2);
  put(root / "trtllm" / "seed2.bin", R"({"num_experts": 3, "num_experts_per_token": 1})" + mark + st2);
  std::printf("wrote %d seeds per target under %s\n", n, root.c_str());
  return 0;
}
