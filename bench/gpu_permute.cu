// Question: what fraction of the memory-bandwidth floor does the device permute reach for the
// DeepSeek-V3 dispatch (4096 tokens x 7168 hidden, bf16, top-8 over EP64), and how does it compare
// with a straightforward one-thread-per-element gather measured in the same run?
//
//   gpu_permute [--tokens N] [--decode-tokens N] [--reps R] [--json FILE]
//
// Floor: the fewest bytes the permute must move - read every token once, write every send row -
// at the device's peak bandwidth (from its memory clock and bus width), and, as a practical
// reference, at the bandwidth of a device-to-device cudaMemcpy of the send buffer's size.
// Also times the device layout and combine. Prints the table last; writes JSON.
//
// Second question: is the static instantiation of the row kernels (top_k<8>, hidden<7168>: constant
// row loops, the token's choices unrolled in registers) at least as fast as the dynamic
// instantiation of the same shape (run-time top-k and row width, the same stage bodies)? Measured
// at the decode shape (--decode-tokens, 128 per rank) on the same layout and buffers, each kernel's
// static and dynamic launches alternated, with the ratio static / dynamic per kernel and in total
// (below 1: the static one is faster). The outputs must be equal bit for bit.
#include "bench_output.hpp"
#include "deepseek_shape.hpp"
#include "gpu_bench.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
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

// One row kernel timed both ways: per-launch microseconds, best of `reps` timings of `inner`
// launches, the static and dynamic timings alternated (twice each) so neither runs only warm.
struct static_dynamic {
  const char* kernel;
  double static_us, dynamic_us;
};

template <class S, class D>
static_dynamic time_both(const char* kernel, std::size_t reps, S&& s, D&& d) {
  constexpr int inner = 50;
  const auto many = [](auto& f) {
    return [&f] {
      for (int i = 0; i < inner; ++i)
        f();
    };
  };
  auto ms = many(s);
  auto md = many(d);
  float ts = time_ms(reps, ms), td = time_ms(reps, md);
  ts = std::min(ts, time_ms(reps, ms));
  td = std::min(td, time_ms(reps, md));
  return {kernel, 1e3 * ts / inner, 1e3 * td / inner};
}

// The first `n` elements of a and b (what both kernels wrote) are equal bit for bit.
template <class T>
void require_equal(const device_buffer<T>& a, const device_buffer<T>& b, std::size_t n, const char* kernel) {
  const auto ha = a.to_host(), hb = b.to_host();
  if (std::memcmp(ha.data(), hb.data(), n * sizeof(T)) != 0)
    throw std::runtime_error(std::string("the static and dynamic ") + kernel + " kernels disagree");
}

// The row kernels at the decode shape, instantiated for top_k<8> and hidden<7168> and for run-time
// values of both, on the same layout (source rank 0) and inputs.
std::vector<static_dynamic> static_vs_dynamic(const expert_map& map, std::size_t tokens, std::size_t reps,
                                              std::mt19937& rng, std::size_t& rows_out) {
  namespace dp = transport::detail::permute;
  using K = top_k<k_n>;
  using H = hidden<hidden_n>;
  const std::size_t Hn = hidden_n;
  const topo_type topo;
  const auto r = deepseek_routing(tokens, rng);
  device_buffer<expert_id> ids;
  ids.upload(r.ids());
  device_buffer<float> weights;
  weights.upload(r.weights());
  const device_routing_view<K> view(ids.data(), weights.data(), tokens);
  transport::device_layout<K, experts<experts_n>> l;
  l.assign(view, map, topo, 0);
  const std::size_t rows = l.rows(), copies = l.copies();
  rows_out = rows;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const auto random_rows = [&](std::size_t n) {
    std::vector<bfloat16> v(n * Hn);
    for (auto& e : v)
      e = bfloat16(u(rng));
    device_buffer<bfloat16> d;
    d.upload(v);
    return d;
  };
  // x: the tokens; rows_in: one row per send row (what comes back); per_copy: one row per copy (an
  // expert output per entry, read by the weighted reductions through the entry's copy index).
  const auto x = random_rows(tokens), rows_in = random_rows(rows), per_copy = random_rows(copies);
  device_buffer<bfloat16> a, b;
  a.resize(std::max(rows, tokens) * Hn);
  b.resize(std::max(rows, tokens) * Hn);
  const top_k<> kd(k_n);
  std::vector<static_dynamic> out;

  const auto scatter_s = [&] {
    dp::dispatch_scatter<bfloat16>(top_k<k_n>{}, x.data(), l.copy_row(), tokens, H{}, a.data(), nullptr);
  };
  const auto scatter_d = [&] {
    dp::dispatch_scatter<bfloat16>(kd, x.data(), l.copy_row(), tokens, Hn, b.data(), nullptr);
  };
  out.push_back(time_both("permute (scatter_rows)", reps, scatter_s, scatter_d));
  require_equal(a, b, rows * Hn, "permute");

  const auto gather_s = [&] {
    dp::dispatch_gather<bfloat16>(rows_in.data(), l.copy_row(), k_n, tokens, H{}, a.data(), nullptr);
  };
  const auto gather_d = [&] {
    dp::dispatch_gather<bfloat16>(rows_in.data(), l.copy_row(), k_n, tokens, Hn, b.data(), nullptr);
  };
  out.push_back(time_both("unpermute (gather_rows)", reps, gather_s, gather_d));
  require_equal(a, b, tokens * Hn, "unpermute");

  const auto reduce_s = [&] {
    dp::dispatch_reduce<bfloat16>(per_copy.data(), l.row_entry_offsets(), l.entry_copy(), weights.data(), rows, H{},
                                  a.data(), nullptr);
  };
  const auto reduce_d = [&] {
    dp::dispatch_reduce<bfloat16>(per_copy.data(), l.row_entry_offsets(), l.entry_copy(), weights.data(), rows, Hn,
                                  b.data(), nullptr);
  };
  out.push_back(time_both("weighted row reduction (reduce_rows)", reps, reduce_s, reduce_d));
  require_equal(a, b, rows * Hn, "reduce_rows");

  const auto combine_s = [&] {
    dp::dispatch_combine<bfloat16>(K{}, rows_in.data(), l.copy_row(), tokens, H{}, a.data(), nullptr);
  };
  const auto combine_d = [&] {
    dp::dispatch_combine<bfloat16>(kd, rows_in.data(), l.copy_row(), tokens, Hn, b.data(), nullptr);
  };
  out.push_back(time_both("combine", reps, combine_s, combine_d));
  require_equal(a, b, tokens * Hn, "combine");

  const auto weighted_s = [&] {
    dp::dispatch_combine_weighted<bfloat16>(K{}, per_copy.data(), l.copy_entry(), l.entry_weight(), tokens, H{},
                                            a.data(), nullptr);
  };
  const auto weighted_d = [&] {
    dp::dispatch_combine_weighted<bfloat16>(kd, per_copy.data(), l.copy_entry(), l.entry_weight(), tokens, Hn, b.data(),
                                            nullptr);
  };
  out.push_back(time_both("weighted combine", reps, weighted_s, weighted_d));
  require_equal(a, b, tokens * Hn, "combine_weighted");
  return out;
}

} // namespace

int main(int argc, char** argv) try {
  std::size_t tokens = 4096, decode_tokens = 128, reps = 20;
  std::string json_path = "gpu_permute.json";
  CLI::App app{"Device permute at DeepSeek-V3 dispatch shape against the memory-bandwidth floor and a "
               "one-thread-per-element gather"};
  tool_cli::show_defaults(app);
  app.add_option("--tokens", tokens, "Tokens to permute")->check(tool_cli::positive);
  app.add_option("--decode-tokens", decode_tokens, "Tokens of the static-versus-dynamic comparison (decode)")
      ->check(tool_cli::positive);
  app.add_option("--reps", reps, "Timed repetitions per kernel (best kept)")->check(tool_cli::positive);
  app.add_option("--json", json_path, "JSON results file");
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
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

  std::size_t decode_rows = 0;
  const auto sd = static_vs_dynamic(map, decode_tokens, reps, rng, decode_rows);
  double sum_s = 0, sum_d = 0;
  std::string sd_json;
  for (const auto& k : sd) {
    sum_s += k.static_us;
    sum_d += k.dynamic_us;
    sd_json += std::string(sd_json.empty() ? "" : ", ") + "{\"kernel\": \"" + k.kernel +
               "\", \"static_us\": " + std::to_string(k.static_us) +
               ", \"dynamic_us\": " + std::to_string(k.dynamic_us) +
               ", \"ratio\": " + std::to_string(k.static_us / k.dynamic_us) + "}";
  }

  const double permute_gbs = floor_bytes / (t_permute * 1e-3) / 1e9;
  const double naive_gbs = floor_bytes / (t_naive * 1e-3) / 1e9;
  const double memcpy_gbs = 2.0 * send_bytes / (t_memcpy * 1e-3) / 1e9; // read + write
  const double combine_gbs = (send_bytes + static_cast<double>(tokens * H * 2)) / (t_combine * 1e-3) / 1e9;
  const double of_peak = peak_gbs > 0 ? permute_gbs / peak_gbs : 0.0;
  const double of_memcpy = permute_gbs / memcpy_gbs;

  bench_output::files()[json_path] << "{\n  \"device\": \"" << prop.name << "\",\n  \"tokens\": " << tokens
                                   << ",\n  \"hidden\": " << H << ",\n  \"element\": \"bf16\",\n  \"rows\": " << rows
                                   << ",\n  \"floor_bytes\": " << floor_bytes << ",\n  \"peak_gb_per_s\": " << peak_gbs
                                   << ",\n  \"memcpy_gb_per_s\": " << memcpy_gbs << ",\n  \"layout_ms\": " << t_layout
                                   << ",\n  \"permute_ms\": " << t_permute
                                   << ",\n  \"permute_gb_per_s\": " << permute_gbs
                                   << ",\n  \"permute_fraction_of_peak\": " << of_peak
                                   << ",\n  \"permute_fraction_of_memcpy\": " << of_memcpy
                                   << ",\n  \"naive_permute_ms\": " << t_naive
                                   << ",\n  \"naive_gb_per_s\": " << naive_gbs << ",\n  \"combine_ms\": " << t_combine
                                   << ",\n  \"combine_gb_per_s\": " << combine_gbs
                                   << ",\n  \"static_vs_dynamic\": {\n    \"tokens\": " << decode_tokens
                                   << ",\n    \"rows\": " << decode_rows << ",\n    \"top_k\": " << k_n
                                   << ",\n    \"experts\": " << experts_n << ",\n    \"kernels\": [" << sd_json
                                   << "],\n    \"total_static_us\": " << sum_s
                                   << ",\n    \"total_dynamic_us\": " << sum_d
                                   << ",\n    \"ratio_static_over_dynamic\": " << sum_s / sum_d << "\n  }\n}\n";
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
  std::printf("\nstatic (top_k<%zu>, hidden<%zu>) vs dynamic instantiation, %zu decode tokens, %zu rows:\n", k_n,
              hidden_n, decode_tokens, decode_rows);
  std::printf("| kernel | static us | dynamic us | static / dynamic |\n| --- | ---: | ---: | ---: |\n");
  for (const auto& k : sd)
    std::printf("| %s | %.2f | %.2f | %.3f |\n", k.kernel, k.static_us, k.dynamic_us, k.static_us / k.dynamic_us);
  std::printf("| all five | %.2f | %.2f | %.3f |\n", sum_s, sum_d, sum_s / sum_d);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpu_permute: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
