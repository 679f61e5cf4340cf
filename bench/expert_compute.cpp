// Question: how fast is the host SwiGLU expert compute (blocked, multithreaded, fp32 accumulate)
// against a straightforward per-row baseline measured in the same run, at decode and prefill
// block sizes, with fp32 and bfloat16 weights?
//
//   expert_compute [--hidden 512] [--ffn 256] [--experts 8] [--out DIR]
// The baseline computes each row with plain dot products over the same weights (one thread). Every
// variant's output is checked against the baseline's before its time counts. `by-ptr` runs the same
// compute on the same rows given by pointer, scattered (the layer's form: the dispatcher leaves rows
// in its receive buffers); `ptr/contig` near 1 means skipping the dispatcher's copy costs nothing here.
// `fused` runs it with combine's weighted sum fused in (each output row added, weighted, to its
// copy's sum; two rows per copy, scattered), against `+sum`: the plain compute followed by the same
// sums formed from the output rows, as the dispatcher's combine does for computes that do not fuse. Writes
// DIR/expert_compute.json (default: the current directory).
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <locus/layer/expert_compute.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

using namespace locus;

namespace {

template <class W>
layer::expert_weights<W> make_weights(std::size_t experts, std::size_t hidden, std::size_t ffn) {
  std::vector<expert_id> ids(experts);
  for (std::size_t e = 0; e < experts; ++e)
    ids[e] = static_cast<expert_id>(e);
  layer::expert_weights<W> w(hidden, ffn, ids);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> d(-0.05f, 0.05f);
  for (expert_id e : ids) {
    for (auto& v : w.gate(e))
      v = W(d(rng));
    for (auto& v : w.up(e))
      v = W(d(rng));
    for (auto& v : w.down(e))
      v = W(d(rng));
  }
  return w;
}

// The baseline: per row, act_f = silu(Σ_h x_h G[h,f]) · Σ_h x_h U[h,f], out_c = Σ_f act_f D[f,c].
template <class W>
void naive(const layer::expert_weights<W>& w, const layer::expert_blocks<float>& b) {
  const std::size_t H = w.hidden(), F = w.ffn();
  std::vector<float> act(F);
  for (std::size_t i = 0; i < b.count; ++i) {
    const auto v = w.view(b.experts[i]);
    for (std::size_t r = b.offsets[i]; r < b.offsets[i + 1]; ++r) {
      const float* x = b.input + r * H;
      for (std::size_t f = 0; f < F; ++f) {
        float g = 0, u = 0;
        for (std::size_t h = 0; h < H; ++h) {
          g += x[h] * to_float(v.gate[h * F + f]);
          u += x[h] * to_float(v.up[h * F + f]);
        }
        act[f] = g / (1.0f + std::exp(-g)) * u;
      }
      for (std::size_t c = 0; c < H; ++c) {
        float o = 0;
        for (std::size_t f = 0; f < F; ++f)
          o += act[f] * to_float(v.down[f * H + c]);
        b.output[r * H + c] = o;
      }
    }
  }
}

template <class F>
double best_seconds(F&& f, int reps) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Host SwiGLU expert compute against a per-row baseline, at decode and prefill sizes"};
  tool_cli::show_defaults(app);
  std::size_t hidden = 512, ffn = 256, experts = 8;
  std::string out_dir = ".";
  app.add_option("--hidden", hidden, "Hidden size")->check(tool_cli::positive);
  app.add_option("--ffn", ffn, "Expert FFN size")->check(tool_cli::positive);
  app.add_option("--experts", experts, "Experts")->check(tool_cli::positive);
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/expert_compute");
  const auto w32 = make_weights<float>(experts, hidden, ffn);
  const auto w16 = make_weights<bfloat16>(experts, hidden, ffn);
  nlohmann::json results = nlohmann::json::array();
  std::printf("expert_compute: %zu experts, hidden %zu, ffn %zu, %u hardware threads\n\n", experts, hidden, ffn,
              default_host_threads());
  std::printf("%-8s %-5s %-9s %12s %12s %10s %10s %12s %11s %10s %10s %11s\n", "rows/exp", "W", "threads",
              "baseline ms", "locus ms", "speedup", "GFLOP/s", "by-ptr ms", "ptr/contig", "+sum ms", "fused ms",
              "fused/+sum");
  for (std::size_t rows_per_expert : {4, 64}) {
    std::vector<expert_id> ids(experts);
    std::vector<std::size_t> offsets(experts + 1, 0);
    for (std::size_t e = 0; e < experts; ++e) {
      ids[e] = static_cast<expert_id>(e);
      offsets[e + 1] = offsets[e] + rows_per_expert;
    }
    const std::size_t rows = offsets.back();
    std::vector<float> x(rows * hidden), y_ref(x.size()), y(x.size());
    std::mt19937 rng(2);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (auto& v : x)
      v = d(rng);
    // The same rows scattered in reverse order with a gap between them, given by pointer: how the
    // layer hands swiglu_host the rows the dispatcher left in its receive buffers.
    std::vector<float> scattered(rows * (hidden + 40));
    std::vector<const float*> row_ptr(rows);
    for (std::size_t r = 0; r < rows; ++r) {
      float* at = scattered.data() + (rows - 1 - r) * (hidden + 40);
      std::copy_n(x.data() + r * hidden, hidden, at);
      row_ptr[r] = at;
    }
    const std::size_t copies = std::max<std::size_t>(1, rows / 2);
    std::vector<std::uint32_t> row_copy(rows);
    std::vector<float> row_weight(rows), sums(copies * hidden), sums_fused(copies * hidden);
    for (std::size_t r = 0; r < rows; ++r) {
      row_copy[r] = static_cast<std::uint32_t>((r * 2654435761u) % copies);
      row_weight[r] = 0.125f * static_cast<float>(1 + r % 3);
    }
    const layer::weighted_sum_target target{sums_fused.data(), row_copy.data(), row_weight.data(), copies};
    const auto sum_outputs = [&](const std::vector<float>& out) { // the combine-side pass
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (std::size_t r = 0; r < rows; ++r) {
        float* dst = sums.data() + std::size_t{row_copy[r]} * hidden;
        for (std::size_t c = 0; c < hidden; ++c)
          dst[c] += row_weight[r] * out[r * hidden + c];
      }
    };
    const double flop = 6.0 * static_cast<double>(rows * hidden * ffn);
    for (int bf16 = 0; bf16 < 2; ++bf16) {
      const layer::expert_blocks<float> ref{ids.data(), offsets.data(), experts, x.data(), y_ref.data(), hidden};
      const layer::expert_blocks<float> blk{ids.data(), offsets.data(), experts, x.data(), y.data(), hidden};
      std::vector<float> y_ptr(y.size());
      const layer::expert_blocks<float> by_ptr{ids.data(),   offsets.data(), experts,       nullptr,
                                               y_ptr.data(), hidden,         row_ptr.data()};
      const double base = bf16 ? best_seconds([&] { naive(w16, ref); }, 2) : best_seconds([&] { naive(w32, ref); }, 2);
      for (unsigned threads : {1u, 0u}) {
        double t = 0, tp = 0, ts = 0, tf = 0;
        const auto time_all = [&](auto& c) {
          t = best_seconds([&] { c(blk); }, 3);
          tp = best_seconds([&] { c(by_ptr); }, 3);
          ts = best_seconds([&] { c(by_ptr), sum_outputs(y_ptr); }, 3);
          tf = best_seconds([&] { std::fill(sums_fused.begin(), sums_fused.end(), 0.0f), c(by_ptr, target); }, 3);
        };
        if (bf16) {
          layer::swiglu_host<bfloat16> c(w16, threads);
          time_all(c);
        } else {
          layer::swiglu_host<float> c(w32, threads);
          time_all(c);
        }
        double sum_diff = 0;
        for (std::size_t i = 0; i < sums.size(); ++i)
          sum_diff =
              std::max(sum_diff, double(std::abs(sums[i] - sums_fused[i])) / std::max(1.0, double(std::abs(sums[i]))));
        LOCUS_REQUIRE(sum_diff <= 1e-5, invalid_input_error, "fused sums differ by ", sum_diff);
        LOCUS_REQUIRE(y_ptr == y, invalid_input_error, "rows by pointer give other outputs");
        double diff = 0, scale = 0;
        for (std::size_t i = 0; i < y.size(); ++i) {
          diff = std::max(diff, double(std::abs(y[i] - y_ref[i])));
          scale = std::max(scale, double(std::abs(y_ref[i])));
        }
        LOCUS_REQUIRE(diff <= 1e-4 * std::max(scale, 1.0), invalid_input_error,
                      "locus output differs from the baseline by ", diff);
        const unsigned used = threads == 0 ? default_host_threads() : threads;
        std::printf("%-8zu %-5s %-9u %12.3f %12.3f %9.2fx %10.2f %12.3f %11.3f %10.3f %10.3f %11.3f\n", rows_per_expert,
                    bf16 ? "bf16" : "fp32", used, base * 1e3, t * 1e3, base / t, flop / t / 1e9, tp * 1e3, tp / t,
                    ts * 1e3, tf * 1e3, tf / ts);
        results.push_back({{"rows_per_expert", rows_per_expert},
                           {"weights", bf16 ? "bf16" : "fp32"},
                           {"threads", used},
                           {"baseline_ms", base * 1e3},
                           {"locus_ms", t * 1e3},
                           {"speedup", base / t},
                           {"gflops", flop / t / 1e9},
                           {"rows_by_pointer_ms", tp * 1e3},
                           {"by_pointer_over_contiguous", tp / t},
                           {"plus_sum_ms", ts * 1e3},
                           {"fused_ms", tf * 1e3},
                           {"fused_over_plus_sum", tf / ts}});
      }
    }
  }
  const nlohmann::json doc{{"benchmark", "expert_compute"},
                           {"command", run.command},
                           {"machine", run.machine},
                           {"hidden", hidden},
                           {"ffn", ffn},
                           {"experts", experts},
                           {"rows", results}};
  bench_output::files()[folder.file("expert_compute.json")] << doc.dump(2) << "\n";
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "expert_compute: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
