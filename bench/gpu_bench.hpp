#pragma once
// What the CUDA benchmarks share: the command-line conventions of the host benchmarks and the
// event timing of a kernel sequence on the default stream.
#include "tool_cli.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cuda_runtime.h>
#include <exception>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <vector>

namespace bench_gpu {

// The properties of the current device (the one the benchmark runs on).
inline cudaDeviceProp current_device() {
  int device = 0;
  LOCUS_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  LOCUS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop;
}

// After rank threads joined, with `errors[r]` each rank's failure (or none): a rank that fails
// makes the others time out waiting for it, so the failures that are not timeouts are printed
// first (the cause, each as "<who>: rank r: ..."), then the first error of all is rethrown.
inline void rethrow_first(const std::vector<std::exception_ptr>& errors, const char* who) {
  std::exception_ptr first;
  for (std::size_t r = 0; r < errors.size(); ++r) {
    if (!errors[r]) continue;
    if (!first) first = errors[r];
    try {
      std::rethrow_exception(errors[r]);
    } catch (const locus::timeout_error&) {
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: rank %zu: %s\n", who, r, tool_cli::error_text(e).c_str());
    }
  }
  if (first) std::rethrow_exception(first);
}

// Best of `reps` timings of f() on the default stream, by events, after one warm-up call. The best
// rather than the mean: the question is what the kernels can do, not what a shared device lets them.
template <class F>
float time_ms(std::size_t reps, F&& f) {
  cudaEvent_t a, b;
  LOCUS_CUDA_CHECK(cudaEventCreate(&a));
  LOCUS_CUDA_CHECK(cudaEventCreate(&b));
  f();
  LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
  float best = 1e30f;
  for (std::size_t i = 0; i < reps; ++i) {
    LOCUS_CUDA_CHECK(cudaEventRecord(a));
    f();
    LOCUS_CUDA_CHECK(cudaEventRecord(b));
    LOCUS_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    LOCUS_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms);
  }
  LOCUS_CUDA_CHECK(cudaEventDestroy(a));
  LOCUS_CUDA_CHECK(cudaEventDestroy(b));
  return best;
}

// Milliseconds per call of f() when `calls` calls are queued back to back (best of `reps`): the
// launch latency of each call is hidden behind the previous one's work, as in a queued step.
template <class F>
float time_ms_per_call(std::size_t reps, int calls, F&& f) {
  return time_ms(reps,
                 [&] {
                   for (int i = 0; i < calls; ++i)
                     f();
                 }) /
         static_cast<float>(calls);
}

} // namespace bench_gpu
