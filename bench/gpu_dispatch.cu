// Question: on one GPU, what do device dispatch + combine cost for the DeepSeek-V3 decode shape
// (256 experts, top-8, hidden 7168, bf16, 128 tokens per rank, EP64 = 8 x 8 ranks as threads on
// the one-GPU device transport) against raw device-to-device copies of the same bytes issued by the
// same threads in the same run; what bandwidth do the permute and combine kernels reach against the
// HBM bandwidth a large device-to-device copy measures in the same run (one launch timed alone, and
// 50 queued back to back, which hides the launch latency a 128-token kernel is bound by); and is
// the combine kernel instantiated for a static top-8 at least as fast as the same kernel with a
// dynamic top-k?
//
//   gpu_dispatch [--tokens N] [--reps R] [--json FILE]
//
// Dispatch = layout-ordered permute into the send buffer + the device exchange; combine = the
// known-count exchange back (experts are the identity, so each received row returns unchanged) +
// the combine kernel; the two exchanges are also timed alone, with rank 0's host time to queue
// them. The layout is computed once before timing (it is timed on its own). Context, not a claim
// about multi-node speed: DeepEP's published low-latency kernels take 77-192 us for dispatch and
// a similar time for combine at 128 tokens per rank over RDMA.
#include "bench_output.hpp"
#include "deepseek_shape.hpp"
#include "gpu_bench.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_local.hpp>
#include <locus/transport/device_permute.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace locus;
using namespace bench_shape;
using bench_gpu::time_ms;
using clock_type = std::chrono::steady_clock;
using layout_type = transport::device_layout<top_k<k_n>, experts<experts_n>>;

// One rank: its stream, routing, layout and buffers.
struct rank_state {
  cudaStream_t stream = nullptr;
  device_buffer<expert_id> ids;
  device_buffer<float> weights;
  layout_type layout;
  device_buffer<bfloat16> x, send, back, y, raw;
  std::vector<std::size_t> counts;
};

} // namespace

int main(int argc, char** argv) try {
  std::size_t tokens = 128, reps = 20;
  std::string json_path = "gpu_dispatch.json";
  CLI::App app{"Device dispatch + combine over the one-GPU multi-rank transport at DeepSeek-V3 decode shape, against "
               "raw device copies of the same bytes, and the permute and combine kernels against HBM bandwidth"};
  tool_cli::show_defaults(app);
  app.add_option("--tokens", tokens, "Tokens per rank")->check(tool_cli::positive);
  app.add_option("--reps", reps, "Timed repetitions per measure (best kept)")->check(tool_cli::positive);
  app.add_option("--json", json_path, "JSON results file");
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  const cudaDeviceProp prop = bench_gpu::current_device();

  const expert_map map = deepseek_map();
  const topo_type topo;
  const dynamic_topology dtopo(nodes_n, gpus_n);
  const std::size_t R = topo.ranks(), H = hidden_n, row_bytes = H * sizeof(bfloat16);
  std::vector<rank_state> ranks(R);
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::size_t total_rows = 0;
  for (std::size_t r = 0; r < R; ++r) {
    auto& s = ranks[r];
    LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    const auto routing = deepseek_routing(tokens, rng);
    s.ids.upload(routing.ids(), s.stream);
    s.weights.upload(routing.weights(), s.stream);
    s.layout.assign(device_routing_view<top_k<k_n>>(s.ids.data(), s.weights.data(), tokens), map, topo, r,
                    transport_kind::flat, s.stream);
    std::vector<bfloat16> x(tokens * H);
    for (auto& v : x)
      v = bfloat16(u(rng));
    s.x.upload(x, s.stream);
    const std::size_t rows = s.layout.rows();
    total_rows += rows;
    s.send.resize(std::max<std::size_t>(rows, 1) * H);
    s.back.resize(std::max<std::size_t>(rows, 1) * H);
    s.raw.resize(std::max<std::size_t>(rows, 1) * H);
    s.y.resize(tokens * H);
    s.counts.resize(R);
    const auto& off = s.layout.rank_offsets_host();
    for (std::size_t d = 0; d < R; ++d)
      s.counts[d] = static_cast<std::size_t>(off[d + 1] - off[d]);
  }
  LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
  const float t_layout = time_ms(reps, [&] {
    ranks[0].layout.assign(device_routing_view<top_k<k_n>>(ranks[0].ids.data(), ranks[0].weights.data(), tokens), map,
                           topo, 0, transport_kind::flat, nullptr);
  });

  // Every rank thread runs `step` once per repetition between two barriers; the time of a
  // repetition is from the first barrier to the last stream's completion (the second barrier).
  transport::device_local_fabric fabric(dtopo, transport_kind::flat);
  // 0: dispatch + combine; 1: raw copies; 2: the two exchanges alone (no permute, no combine).
  std::vector<double> best_us(3, 1e30);
  double best_queue_us = 1e30; // rank 0's host time to queue the two exchanges (meetings included)
  std::vector<std::exception_ptr> errors(R);
  std::barrier sync(static_cast<std::ptrdiff_t>(R));
  std::atomic<bool> round_trip_ok = true;
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      auto& s = ranks[r];
      try {
        auto ep = fabric.endpoint(r, s.stream);
        transport::device_exchange_result recv, ret;
        const auto exchanges = [&] {
          ep.exchange_device(transport::exchange_group::world, row_bytes,
                             reinterpret_cast<const std::byte*>(s.send.data()), s.counts, {}, recv, 1);
          // The return knows its counts (dispatch's, reversed): no header round, as in the dispatcher.
          ep.exchange_device_known(transport::exchange_group::world, row_bytes, recv.rows, recv.counts, s.counts, ret);
        };
        const auto dispatch_combine = [&] {
          transport::permute(s.layout, s.x.data(), H, s.send.data(), s.stream);
          exchanges();
          transport::combine(s.layout, reinterpret_cast<const bfloat16*>(ret.rows), H, s.y.data(), s.stream);
        };
        const auto raw_copies = [&] {
          const std::size_t bytes = s.layout.rows() * row_bytes;
          if (bytes == 0) return;
          LOCUS_CUDA_CHECK(cudaMemcpyAsync(s.raw.data(), s.send.data(), bytes, cudaMemcpyDeviceToDevice, s.stream));
          LOCUS_CUDA_CHECK(cudaMemcpyAsync(s.back.data(), s.raw.data(), bytes, cudaMemcpyDeviceToDevice, s.stream));
        };
        for (int which = 0; which < 3; ++which)
          for (std::size_t i = 0; i <= reps; ++i) { // the first repetition warms up
            sync.arrive_and_wait();
            const auto t0 = clock_type::now();
            if (which == 0)
              dispatch_combine();
            else if (which == 1)
              raw_copies();
            else
              exchanges();
            const double queued_us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
            if (r == 0 && i > 0 && which == 2) best_queue_us = std::min(best_queue_us, queued_us);
            LOCUS_CUDA_CHECK(cudaStreamSynchronize(s.stream));
            sync.arrive_and_wait();
            const double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
            if (r == 0 && i > 0)
              best_us[static_cast<std::size_t>(which)] = std::min(best_us[static_cast<std::size_t>(which)], us);
          }
        // The identity experts return every row unchanged: the returned rows are the sent rows.
        dispatch_combine();
        LOCUS_CUDA_CHECK(cudaStreamSynchronize(s.stream));
        const std::size_t bytes = s.layout.rows() * row_bytes;
        std::vector<std::byte> a(bytes), b(bytes);
        if (bytes) {
          LOCUS_CUDA_CHECK(cudaMemcpy(a.data(), s.send.data(), bytes, cudaMemcpyDeviceToHost));
          LOCUS_CUDA_CHECK(cudaMemcpy(b.data(), ret.rows, bytes, cudaMemcpyDeviceToHost));
        }
        sync.arrive_and_wait(); // nobody reuses its buffers before every receiver has read
        if (a != b) round_trip_ok = false;
      } catch (...) {
        errors[r] = std::current_exception();
        sync.arrive_and_drop();
      }
    });
  for (auto& t : threads)
    t.join();
  bench_gpu::rethrow_first(errors, "gpu_dispatch");
  if (!round_trip_ok) throw std::runtime_error("rows returned by the identity experts differ from the rows sent");

  // Kernel bandwidth against the HBM bandwidth of a large device-to-device copy.
  auto& s0 = ranks[0];
  const std::size_t rows0 = s0.layout.rows();
  device_buffer<std::byte> big_a(std::size_t{1} << 30), big_b(std::size_t{1} << 30);
  const float t_hbm = time_ms(reps, [&] {
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(big_b.data(), big_a.data(), big_a.size(), cudaMemcpyDeviceToDevice));
  });
  const double hbm_gbs = 2.0 * static_cast<double>(big_a.size()) / (t_hbm * 1e-3) / 1e9;
  const float t_permute = time_ms(reps, [&] { transport::permute(s0.layout, s0.x.data(), H, s0.send.data()); });
  const float t_combine_static = time_ms(reps, [&] {
    transport::detail::permute::dispatch_combine<bfloat16>(top_k<k_n>{}, s0.send.data(), s0.layout.copy_row(), tokens,
                                                           H, s0.y.data(), nullptr);
  });
  const float t_combine_dynamic = time_ms(reps, [&] {
    transport::detail::permute::dispatch_combine<bfloat16>(top_k<>(k_n), s0.send.data(), s0.layout.copy_row(), tokens,
                                                           H, s0.y.data(), nullptr);
  });
  // The same two kernels 50 at a time, back to back: their throughput when their launch latency is
  // hidden behind queued work, as in a step whose kernels are queued ahead.
  const float t_permute_queued =
      bench_gpu::time_ms_per_call(reps, 50, [&] { transport::permute(s0.layout, s0.x.data(), H, s0.send.data()); });
  const float t_combine_queued = bench_gpu::time_ms_per_call(reps, 50, [&] {
    transport::detail::permute::dispatch_combine<bfloat16>(top_k<k_n>{}, s0.send.data(), s0.layout.copy_row(), tokens,
                                                           H, s0.y.data(), nullptr);
  });
  // Bytes each kernel must move at least: permute reads each sent token once and writes every
  // row; combine reads every row and writes every token.
  const double permute_bytes = static_cast<double>((rows0 + tokens) * row_bytes);
  const double combine_bytes = permute_bytes;
  const double permute_gbs = permute_bytes / (t_permute * 1e-3) / 1e9;
  const double combine_gbs = combine_bytes / (t_combine_static * 1e-3) / 1e9;
  const double permute_queued_gbs = permute_bytes / (t_permute_queued * 1e-3) / 1e9;
  const double combine_queued_gbs = combine_bytes / (t_combine_queued * 1e-3) / 1e9;
  const double ratio = best_us[0] / best_us[1];

  bench_output::files()[json_path]
      << "{\n  \"device\": \"" << prop.name << "\",\n  \"ranks\": " << R << ",\n  \"tokens_per_rank\": " << tokens
      << ",\n  \"hidden\": " << H << ",\n  \"element\": \"bf16\",\n  \"rows_all_ranks\": " << total_rows
      << ",\n  \"layout_ms\": " << t_layout << ",\n  \"dispatch_combine_us\": " << best_us[0]
      << ",\n  \"raw_copies_us\": " << best_us[1] << ",\n  \"ratio_to_raw\": " << ratio
      << ",\n  \"exchanges_alone_us\": " << best_us[2] << ",\n  \"exchanges_host_queue_us\": " << best_queue_us
      << ",\n  \"hbm_gb_per_s\": " << hbm_gbs << ",\n  \"permute_ms\": " << t_permute
      << ",\n  \"permute_gb_per_s\": " << permute_gbs << ",\n  \"permute_fraction_of_hbm\": " << permute_gbs / hbm_gbs
      << ",\n  \"combine_static_ms\": " << t_combine_static << ",\n  \"combine_dynamic_ms\": " << t_combine_dynamic
      << ",\n  \"combine_gb_per_s\": " << combine_gbs << ",\n  \"combine_fraction_of_hbm\": " << combine_gbs / hbm_gbs
      << ",\n  \"permute_queued_ms\": " << t_permute_queued
      << ",\n  \"permute_queued_fraction_of_hbm\": " << permute_queued_gbs / hbm_gbs
      << ",\n  \"combine_queued_ms\": " << t_combine_queued
      << ",\n  \"combine_queued_fraction_of_hbm\": " << combine_queued_gbs / hbm_gbs << "\n}\n";
  std::printf("gpu_dispatch on %s: %zu ranks x %zu tokens x %zu bf16 (one-GPU device transport), %zu rows\n", prop.name,
              R, tokens, H, total_rows);
  std::printf("| measure | value |\n| --- | ---: |\n");
  std::printf("| dispatch + combine, all ranks (us) | %.1f |\n", best_us[0]);
  std::printf("| raw D2D copies of the same bytes (us) | %.1f |\n", best_us[1]);
  std::printf("| ratio (target <= 1.5) | %.2f |\n", ratio);
  std::printf("| the two exchanges alone, no permute or combine (us) | %.1f |\n", best_us[2]);
  std::printf("| rank 0's host time to queue them, meetings included (us) | %.1f |\n", best_queue_us);
  std::printf("| measured HBM (GB/s, 1 GiB D2D copy) | %.0f |\n", hbm_gbs);
  std::printf("| permute, rank 0 (GB/s, of HBM; target >= 70%%) | %.0f (%.0f%%) |\n", permute_gbs,
              100 * permute_gbs / hbm_gbs);
  std::printf("| combine, rank 0 (GB/s, of HBM; target >= 70%%) | %.0f (%.0f%%) |\n", combine_gbs,
              100 * combine_gbs / hbm_gbs);
  std::printf("| the same, 50 launches queued back to back (of HBM) | permute %.0f%%, combine %.0f%% |\n",
              100 * permute_queued_gbs / hbm_gbs, 100 * combine_queued_gbs / hbm_gbs);
  std::printf("| combine static top-8 / dynamic top-k (ms) | %.4f / %.4f |\n", t_combine_static, t_combine_dynamic);
  std::printf("| layout, rank 0 (ms) | %.3f |\n", t_layout);
  for (auto& s : ranks)
    cudaStreamDestroy(s.stream);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpu_dispatch: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
