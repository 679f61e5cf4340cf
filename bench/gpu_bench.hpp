#pragma once
// What the CUDA benchmarks share: the command-line conventions of the host benchmarks and the
// event timing of a kernel sequence on the default stream.
#include "tool_cli.hpp"

#include <algorithm>
#include <cstddef>
#include <cuda_runtime.h>
#include <locus/core/cuda_error.hpp>

namespace bench_gpu {

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
