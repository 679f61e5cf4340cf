// Question: on one GPU, what does the whole device step of `device_dispatcher` cost at the
// DeepSeek-V3 decode shape (256 experts, top-8, hidden 7168, bf16, 128 tokens per rank, EP64 = 8
// nodes x 8 GPUs as threads on the one-GPU device transport), flat and hierarchical, against raw
// device-to-device copies of the bytes the flat step moves, issued by the same threads in the same
// run? The step is what the layer runs: device layout (with its count read), count round, entry
// metadata and row exchanges, the receive layout built on the device, the expert input gather,
// identity experts (one copy of the expert input to the output), the weighted reduction, the
// exchanges back and the combine; routing is given (the router is timed by gpu_router).
//
//   gpu_step [--tokens N] [--reps R] [--json FILE]
//
// Each rank's y must equal the sum of its token's weights times its input (identity experts):
// checked before anything is reported. With 64 ranks as threads on one GPU, the step's time is
// mostly the ranks' host side (launches, waits and meetings, serialised on one device), which is
// what the host queueing column shows; it is not a claim about multi-node speed.
#include "bench_output.hpp"
#include "deepseek_shape.hpp"
#include "gpu_bench.hpp"

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_dispatch.hpp>
#include <locus/transport/device_local.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace locus;
using namespace bench_shape;
using clock_type = std::chrono::steady_clock;
using dispatcher_type = transport::device_dispatcher<transport::device_local_transport, bfloat16, top_k<k_n>,
                                                     experts<experts_n>, hidden<hidden_n>>;

// One rank's inputs, made once and shared by every timed configuration.
struct rank_input {
  std::vector<bfloat16> x;
  routing<top_k<k_n>> routing;
  std::size_t flat_rows = 0; // rows the flat layout sends (the raw copies' bytes)
};

struct timing {
  double step_us = 1e30;  // best over reps: first barrier to the last stream's completion
  double queue_us = 1e30; // rank 0's host time to queue its step (its waits and meetings included)
  double worst_error = 0; // largest |y - x * sum of weights| / (|x| * sum of weights + 1e-3), all ranks
};

// Runs the step (kind) or the raw copies (raw) over 64 rank threads; the best time of `reps`.
timing run(const std::vector<rank_input>& in, std::size_t tokens, std::size_t reps, transport_kind kind, bool raw) {
  const expert_map map = deepseek_map();
  const dynamic_topology dtopo(nodes_n, gpus_n);
  const std::size_t R = dtopo.ranks(), H = hidden_n;
  transport::device_local_fabric fabric(dtopo, kind);
  std::barrier sync(static_cast<std::ptrdiff_t>(R));
  std::vector<std::exception_ptr> errors(R);
  std::vector<double> worst(R, 0.0);
  timing t;
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t stream = nullptr;
      try {
        LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        auto ep = fabric.endpoint(r, stream);
        dispatcher_type d(ep, map, H, stream);
        device_buffer<bfloat16> dx, dy(tokens * H), raw_a, raw_b;
        device_buffer<expert_id> ids;
        device_buffer<float> w;
        dx.upload(in[r].x, stream);
        ids.upload(in[r].routing.ids(), stream);
        w.upload(in[r].routing.weights(), stream);
        const std::size_t raw_bytes = in[r].flat_rows * H * sizeof(bfloat16);
        raw_a.resize(std::max<std::size_t>(raw_bytes / sizeof(bfloat16), 1));
        raw_b.resize(std::max<std::size_t>(raw_bytes / sizeof(bfloat16), 1));
        std::uint64_t step = 0;
        const auto one_step = [&] {
          ep.begin_step(step++);
          d.dispatch(dx.data(), device_routing_view<top_k<k_n>>(ids.data(), w.data(), tokens));
          const auto b = d.blocks();
          const std::size_t n = b.total_rows();
          if (n > 0)
            LOCUS_CUDA_CHECK(
                cudaMemcpyAsync(b.output, b.input, n * H * sizeof(bfloat16), cudaMemcpyDeviceToDevice, stream));
          d.combine(dy.data());
        };
        const auto raw_copies = [&] { // the bytes the flat step sends and returns, device to device
          if (raw_bytes == 0) return;
          LOCUS_CUDA_CHECK(cudaMemcpyAsync(raw_b.data(), raw_a.data(), raw_bytes, cudaMemcpyDeviceToDevice, stream));
          LOCUS_CUDA_CHECK(cudaMemcpyAsync(raw_a.data(), raw_b.data(), raw_bytes, cudaMemcpyDeviceToDevice, stream));
        };
        for (std::size_t i = 0; i <= reps; ++i) { // the first repetition warms up
          sync.arrive_and_wait();
          const auto t0 = clock_type::now();
          if (raw)
            raw_copies();
          else
            one_step();
          const double queued = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
          LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
          sync.arrive_and_wait();
          const double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
          if (r == 0 && i > 0) {
            t.step_us = std::min(t.step_us, us);
            t.queue_us = std::min(t.queue_us, queued);
          }
        }
        if (!raw) {
          d.finish();
          std::vector<bfloat16> y(tokens * H);
          dy.download(y, stream);
          const auto view = in[r].routing.view();
          for (std::size_t tok = 0; tok < tokens; ++tok) {
            float sum = 0;
            for (std::size_t j = 0; j < k_n; ++j)
              sum += view.weight(tok, j);
            for (std::size_t h = 0; h < H; ++h) {
              const double xv = static_cast<float>(in[r].x[tok * H + h]), yv = static_cast<float>(y[tok * H + h]);
              worst[r] = std::max(worst[r], std::abs(yv - xv * sum) / (std::abs(xv) * sum + 1e-3));
            }
          }
        }
      } catch (...) {
        errors[r] = std::current_exception();
        sync.arrive_and_drop();
      }
      if (stream) cudaStreamDestroy(stream);
    });
  for (auto& th : threads)
    th.join();
  bench_gpu::rethrow_first(errors, "gpu_step");
  t.worst_error = *std::max_element(worst.begin(), worst.end());
  return t;
}

} // namespace

int main(int argc, char** argv) try {
  std::size_t tokens = 128, reps = 10;
  std::string json_path = "gpu_step.json";
  CLI::App app{"The whole device step of device_dispatcher (flat and hierarchical) over the one-GPU multi-rank "
               "transport at DeepSeek-V3 decode shape, against raw device copies of the same bytes"};
  tool_cli::show_defaults(app);
  app.add_option("--tokens", tokens, "Tokens per rank")->check(tool_cli::positive);
  app.add_option("--reps", reps, "Timed repetitions per configuration (best kept)")->check(tool_cli::positive);
  app.add_option("--json", json_path, "JSON results file");
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  const cudaDeviceProp prop = bench_gpu::current_device();

  const expert_map map = deepseek_map();
  const topo_type topo;
  const std::size_t R = topo.ranks();
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<rank_input> in;
  std::size_t flat_rows = 0;
  for (std::size_t r = 0; r < R; ++r) {
    rank_input ri{std::vector<bfloat16>(tokens * hidden_n), deepseek_routing(tokens, rng), 0};
    for (auto& v : ri.x)
      v = bfloat16(u(rng));
    transport::layout<top_k<k_n>> l;
    l.assign(ri.routing.view(), map, topo, r, transport::layout_options{transport_kind::flat, 1});
    ri.flat_rows = l.rows();
    flat_rows += l.rows();
    in.push_back(std::move(ri));
  }
  // Alternating, so that the machine's drift touches every configuration alike.
  timing flat, hier, raw;
  for (int round = 0; round < 2; ++round) {
    const auto f = run(in, tokens, reps, transport_kind::flat, false);
    const auto h = run(in, tokens, reps, transport_kind::hierarchical, false);
    const auto c = run(in, tokens, reps, transport_kind::flat, true);
    if (f.step_us < flat.step_us) flat = f;
    if (h.step_us < hier.step_us) hier = h;
    if (c.step_us < raw.step_us) raw = c;
  }
  // bf16 rows, fp32 sums rounded once: well within 1% of x times the weights' sum.
  if (flat.worst_error > 0.02 || hier.worst_error > 0.02)
    throw std::runtime_error("the step's output differs from x times the weights' sum (identity experts): flat " +
                             std::to_string(flat.worst_error) + ", hierarchical " + std::to_string(hier.worst_error));
  bench_output::files()[json_path] << "{\n  \"device\": \"" << prop.name << "\",\n  \"ranks\": " << R
                                   << ",\n  \"tokens_per_rank\": " << tokens << ",\n  \"hidden\": " << hidden_n
                                   << ",\n  \"element\": \"bf16\",\n  \"flat_rows_all_ranks\": " << flat_rows
                                   << ",\n  \"flat_step_us\": " << flat.step_us
                                   << ",\n  \"flat_host_queue_us\": " << flat.queue_us
                                   << ",\n  \"hierarchical_step_us\": " << hier.step_us
                                   << ",\n  \"hierarchical_host_queue_us\": " << hier.queue_us
                                   << ",\n  \"raw_copies_us\": " << raw.step_us
                                   << ",\n  \"flat_over_raw\": " << flat.step_us / raw.step_us
                                   << ",\n  \"hierarchical_over_flat\": " << hier.step_us / flat.step_us
                                   << ",\n  \"worst_relative_error\": " << std::max(flat.worst_error, hier.worst_error)
                                   << "\n}\n";
  std::printf("gpu_step on %s: %zu ranks x %zu tokens x %zu bf16 (one-GPU device transport), %zu flat rows\n",
              prop.name, R, tokens, hidden_n, flat_rows);
  std::printf("| measure | value |\n| --- | ---: |\n");
  std::printf("| flat step, all ranks (us) | %.1f |\n", flat.step_us);
  std::printf("| rank 0's host time in it (us) | %.1f |\n", flat.queue_us);
  std::printf("| hierarchical step (us) | %.1f |\n", hier.step_us);
  std::printf("| rank 0's host time in it (us) | %.1f |\n", hier.queue_us);
  std::printf("| raw D2D copies of the flat step's bytes (us) | %.1f |\n", raw.step_us);
  std::printf("| flat step / raw copies | %.2f |\n", flat.step_us / raw.step_us);
  std::printf("| hierarchical / flat | %.2f |\n", hier.step_us / flat.step_us);
  std::printf("| worst relative error of y (identity experts) | %.2g |\n",
              std::max(flat.worst_error, hier.worst_error));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "gpu_step: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
