// Question: how close do the router kernels come to the memory-bandwidth floor? A router reads
// the logits and writes the routing once, so its floor is (logits bytes + routing bytes) / the
// device's achievable bandwidth, the latter measured in the same run with a device-to-device copy.
// The thread-per-token kernel is timed beside each warp-per-token kernel as the baseline.
//
//   gpu_router [--json FILE]
// Prints a table last and writes JSON.
#include "bench_output.hpp"
#include "gpu_bench.hpp"
#include "tool_cli.hpp"

#include <cstdio>
#include <cstdlib>
#include <locus/router/cuda.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

namespace lr = locus::router;
using locus::bfloat16;
using locus::expert_id;

struct row {
  std::string name;
  std::size_t tokens;
  double bytes;
  double warp_us, thread_us;
};

double copy_bandwidth() {
  const std::size_t bytes = std::size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  LOCUS_CUDA_CHECK(cudaMalloc(&a, bytes));
  LOCUS_CUDA_CHECK(cudaMalloc(&b, bytes));
  LOCUS_CUDA_CHECK(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  LOCUS_CUDA_CHECK(cudaEventCreate(&e0));
  LOCUS_CUDA_CHECK(cudaEventCreate(&e1));
  LOCUS_CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  float best = 1e30f;
  for (int i = 0; i < 10; ++i) {
    LOCUS_CUDA_CHECK(cudaEventRecord(e0));
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    LOCUS_CUDA_CHECK(cudaEventRecord(e1));
    LOCUS_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    LOCUS_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best = std::min(best, ms);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (best * 1e-3); // read + write
}

// Microseconds per launch, 50 launches queued back to back (best of 5).
template <class Launch>
double time_us(Launch&& launch) {
  return bench_gpu::time_ms_per_call(5, 50, launch) * 1e3;
}

template <class Experts, class T, class Router>
row measure(const std::string& name, const Router& router, std::size_t tokens) {
  constexpr std::size_t E = Experts::static_value;
  const std::size_t k = router.top_k();
  using K = typename Router::top_k_type;
  std::vector<T> logits(tokens * E);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> d(0.0f, 2.0f);
  for (auto& x : logits)
    x = T(d(rng));
  T* d_logits = nullptr;
  expert_id* d_ids = nullptr;
  float* d_w = nullptr;
  LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_logits), logits.size() * sizeof(T)));
  LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_ids), tokens * k * sizeof(expert_id)));
  LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_w), tokens * k * sizeof(float)));
  LOCUS_CUDA_CHECK(cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(T), cudaMemcpyHostToDevice));
  lr::cuda_router<Router> device(router);
  const lr::device_logits_view<Experts, const T> in(d_logits, tokens);
  const lr::device_mutable_routing_view<K> out(d_ids, d_w, tokens, K(k));
  row r{name, tokens, static_cast<double>(tokens * E * sizeof(T) + tokens * k * (sizeof(expert_id) + sizeof(float))), 0,
        0};
  r.warp_us = time_us([&] { device.route(in, out, nullptr, lr::cuda_kernel::warp_per_token); });
  r.thread_us = time_us([&] { device.route(in, out, nullptr, lr::cuda_kernel::thread_per_token); });
  device.check();
  cudaFree(d_logits);
  cudaFree(d_ids);
  cudaFree(d_w);
  return r;
}

} // namespace

int main(int argc, char** argv) try {
  std::string json_path = "gpu_router.json";
  CLI::App app{"Router kernels against the memory-bandwidth floor, warp per token beside thread per token"};
  tool_cli::show_defaults(app);
  app.add_option("--json", json_path, "JSON results file");
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  cudaDeviceProp prop{};
  LOCUS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double bw = copy_bandwidth();

  std::vector<row> rows;
  std::vector<float> bias(256);
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  for (auto& x : bias)
    x = u(rng);
  using ds_router = lr::sigmoid_grouped<locus::groups<8>, locus::top_groups<4>, locus::top_k<8>>;
  for (const std::size_t tokens : {std::size_t{4096}, std::size_t{65536}}) {
    rows.push_back(
        measure<locus::experts<256>, float>("sigmoid_grouped E=256 K=8 8/4 fp32", ds_router(bias, 2.5f), tokens));
    rows.push_back(
        measure<locus::experts<256>, bfloat16>("sigmoid_grouped E=256 K=8 8/4 bf16", ds_router(bias, 2.5f), tokens));
    rows.push_back(measure<locus::experts<128>, bfloat16>("softmax_topk E=128 K=8 bf16",
                                                          lr::softmax_topk<locus::top_k<8>>(), tokens));
    rows.push_back(measure<locus::experts<128>, bfloat16>("sigmoid_top1 E=128 bf16", lr::sigmoid_top1(), tokens));
  }

  // The JSON is built in memory and written atomically at the end (bench_output.hpp).
  char* json_text = nullptr;
  std::size_t json_size = 0;
  FILE* f = ::open_memstream(&json_text, &json_size);
  if (!f) throw std::runtime_error("cannot build " + json_path);
  std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"copy_bandwidth_GBps\": %.1f,\n  \"rows\": [\n", prop.name, bw / 1e9);
  std::printf("device %s, device-to-device copy bandwidth %.0f GB/s\n\n", prop.name, bw / 1e9);
  std::printf(
      "| router | tokens | bytes | floor us | warp kernel us | GB/s | of floor | thread kernel us | warp speed-up |\n"
      "|---|---|---|---|---|---|---|---|---|\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    const double floor_us = r.bytes / bw * 1e6;
    const double gbps = r.bytes / (r.warp_us * 1e-6) / 1e9;
    std::fprintf(f,
                 "    {\"router\": \"%s\", \"tokens\": %zu, \"bytes\": %.0f, \"floor_us\": %.3f, \"warp_us\": %.3f, "
                 "\"thread_us\": %.3f, \"achieved_GBps\": %.1f, \"fraction_of_floor\": %.3f}%s\n",
                 r.name.c_str(), r.tokens, r.bytes, floor_us, r.warp_us, r.thread_us, gbps, floor_us / r.warp_us,
                 i + 1 < rows.size() ? "," : "");
    std::printf("| %s | %zu | %.0f | %.2f | %.2f | %.0f | %.0f%% | %.2f | %.1fx |\n", r.name.c_str(), r.tokens, r.bytes,
                floor_us, r.warp_us, gbps, 100.0 * floor_us / r.warp_us, r.thread_us, r.thread_us / r.warp_us);
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
  bench_output::files()[json_path] << std::string(json_text, json_size);
  std::free(json_text);
  std::printf("\nJSON in %s\n", json_path.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpu_router: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
