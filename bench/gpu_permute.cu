// Question: what fraction of the memory-bandwidth floor does the device permute reach for the
// DeepSeek-V3 dispatch (4096 tokens x 7168 hidden, bf16, top-8 over EP64), and how does it compare
// with a straightforward one-thread-per-element gather measured in the same run?
//
//   gpu_permute [--tokens N] [--reps R] [--json FILE]
//
// Floor: the fewest bytes the permute must move - read every token once, write every send row -
// at the device's peak bandwidth (from its memory clock and bus width), and, as a practical
// reference, at the bandwidth of a device-to-device cudaMemcpy of the send buffer's size.
// Also times the device layout and combine. Prints the table last; writes JSON.
#include "bench_output.hpp"
#include "deepseek_shape.hpp"
#include "gpu_bench.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_permute.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace locus;
using namespace bench_shape;
using bench_gpu::time_ms;

// The baseline: one thread per element, 2-byte loads and stores.
__global__ void naive_permute(const bfloat16* x, const std::int32_t* row_token, std::size_t rows, std::size_t hidden,
                              bfloat16* send) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * hidden) return;
  const std::size_t r = i / hidden, h = i % hidden;
  send[i] = x[static_cast<std::size_t>(row_token[r]) * hidden + h];
}

} // namespace

int main(int argc, char** argv) try {
  std::size_t tokens = 4096, reps = 20;
  std::string json_path = "gpu_permute.json";
  CLI::App app{"Device permute at DeepSeek-V3 dispatch shape against the memory-bandwidth floor and a "
               "one-thread-per-element gather"};
  bench_args::show_defaults(app);
  app.add_option("--tokens", tokens, "Tokens to permute")->check(bench_args::positive);
  app.add_option("--reps", reps, "Timed repetitions per kernel (best kept)")->check(bench_args::positive);
  app.add_option("--json", json_path, "JSON results file");
  CLI11_PARSE(app, argc, argv);
  int device = 0;
  LOCUS_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  LOCUS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  int mem_clock_khz = 0, bus_bits = 0;
  double peak_gbs = 0;
  if (cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) == cudaSuccess)
    peak_gbs = 2.0 * mem_clock_khz * 1e3 * (bus_bits / 8.0) / 1e9; // double data rate
  (void)cudaGetLastError();

  std::mt19937 rng(2024);
  const expert_map map = deepseek_map();
  const topo_type topo;
  const auto r = deepseek_routing(tokens, rng);
  device_buffer<expert_id> ids;
  ids.upload(r.ids());
  device_buffer<float> weights;
  weights.upload(r.weights());
  const device_routing_view<top_k<k_n>> view(ids.data(), weights.data(), tokens);
  transport::device_layout<top_k<k_n>, experts<experts_n>> l;
  l.assign(view, map, topo, 0);
  const std::size_t rows = l.rows(), H = hidden_n;

  std::vector<bfloat16> x(tokens * H);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& v : x)
    v = bfloat16(u(rng));
  device_buffer<bfloat16> dx, send, send2, out;
  dx.upload(x);
  send.resize(rows * H);
  send2.resize(rows * H);
  out.resize(tokens * H);

  const double send_bytes = static_cast<double>(rows * H * sizeof(bfloat16));
  const double floor_bytes = send_bytes + static_cast<double>(tokens * H * sizeof(bfloat16));
  const float t_layout = time_ms(reps, [&] { l.assign(view, map, topo, 0); });
  const float t_permute = time_ms(reps, [&] { transport::permute(l, dx.data(), H, send.data()); });
  const float t_naive = time_ms(reps, [&] {
    naive_permute<<<static_cast<unsigned>((rows * H + 255) / 256), 256>>>(dx.data(), l.row_token(), rows, H,
                                                                          send2.data());
  });
  const float t_memcpy = time_ms(reps, [&] {
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(send2.data(), send.data(), rows * H * sizeof(bfloat16), cudaMemcpyDeviceToDevice));
  });
  const float t_combine = time_ms(reps, [&] { transport::combine(l, send.data(), H, out.data()); });
  if (!(send.to_host() == [&] {
        naive_permute<<<static_cast<unsigned>((rows * H + 255) / 256), 256>>>(dx.data(), l.row_token(), rows, H,
                                                                              send2.data());
        return send2.to_host();
      }()))
    throw std::runtime_error("permute and the naive baseline disagree");

  const double permute_gbs = floor_bytes / (t_permute * 1e-3) / 1e9;
  const double naive_gbs = floor_bytes / (t_naive * 1e-3) / 1e9;
  const double memcpy_gbs = 2.0 * send_bytes / (t_memcpy * 1e-3) / 1e9; // read + write
  const double combine_gbs = (send_bytes + static_cast<double>(tokens * H * 2)) / (t_combine * 1e-3) / 1e9;
  const double of_peak = peak_gbs > 0 ? permute_gbs / peak_gbs : 0.0;
  const double of_memcpy = permute_gbs / memcpy_gbs;

  bench_output::file(json_path) << "{\n  \"device\": \"" << prop.name << "\",\n  \"tokens\": " << tokens
                                << ",\n  \"hidden\": " << H << ",\n  \"element\": \"bf16\",\n  \"rows\": " << rows
                                << ",\n  \"floor_bytes\": " << floor_bytes << ",\n  \"peak_gb_per_s\": " << peak_gbs
                                << ",\n  \"memcpy_gb_per_s\": " << memcpy_gbs << ",\n  \"layout_ms\": " << t_layout
                                << ",\n  \"permute_ms\": " << t_permute << ",\n  \"permute_gb_per_s\": " << permute_gbs
                                << ",\n  \"permute_fraction_of_peak\": " << of_peak
                                << ",\n  \"permute_fraction_of_memcpy\": " << of_memcpy
                                << ",\n  \"naive_permute_ms\": " << t_naive << ",\n  \"naive_gb_per_s\": " << naive_gbs
                                << ",\n  \"combine_ms\": " << t_combine << ",\n  \"combine_gb_per_s\": " << combine_gbs
                                << "\n}\n";
  std::printf("gpu_permute on %s: %zu tokens x %zu bf16, %zu send rows, layout %.3f ms\n", prop.name, tokens, H, rows,
              t_layout);
  std::printf("| kernel | ms | GB/s (floor bytes) | of peak %.0f GB/s | of D2D memcpy %.0f GB/s |\n", peak_gbs,
              memcpy_gbs);
  std::printf("| --- | ---: | ---: | ---: | ---: |\n");
  std::printf("| permute (16-byte vectors) | %.3f | %.0f | %.0f%% | %.0f%% |\n", t_permute, permute_gbs, 100 * of_peak,
              100 * of_memcpy);
  std::printf("| naive permute (baseline) | %.3f | %.0f | %.0f%% | %.0f%% |\n", t_naive, naive_gbs,
              peak_gbs > 0 ? 100 * naive_gbs / peak_gbs : 0.0, 100 * naive_gbs / memcpy_gbs);
  std::printf("| combine | %.3f | %.0f | %.0f%% | %.0f%% |\n", t_combine, combine_gbs,
              peak_gbs > 0 ? 100 * combine_gbs / peak_gbs : 0.0, 100 * combine_gbs / memcpy_gbs);
  std::printf("permute speedup over naive: %.2fx\n", t_naive / t_permute);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpu_permute: %s\n", e.what());
  return 1;
}
