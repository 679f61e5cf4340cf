#pragma once
//! @file
//! A small fork-join loop for the host paths: splits [0, n) into contiguous chunks, one per
//! worker thread, and runs the body on each. Chunks are contiguous so that each worker
//! writes a disjoint range (no false sharing between neighbours' outputs) and so that the
//! result never depends on the thread count.

#include <algorithm>
#include <cstddef>
#include <exception>
#include <locus/core/cancel.hpp>
#include <locus/core/config.hpp>
#include <thread>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Worker threads the host paths use by default: the hardware concurrency, at least 1. Asked
//! once: glibc reads it from /sys on every call (tens of microseconds, once per layout).
inline unsigned default_host_threads() noexcept {
  static const unsigned threads = [] {
    const unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1u : hc;
  }();
  return threads;
}

//! Calls `body(begin, end, worker)` on contiguous chunks covering [0, n).
//! @param n       number of items
//! @param grain   minimum items per chunk; below 2 * grain everything runs on the caller
//! @param threads upper bound on workers (0 = default_host_threads())
//! @param body    callable (std::size_t begin, std::size_t end, unsigned worker)
//! The first exception thrown by any chunk is rethrown on the caller after all workers join. The
//! workers run under the caller's cancel_scope (core/cancel.hpp), if any. Chunks whose thread
//! could not be started run on the caller, after its own.
template <class Body>
void parallel_for(std::size_t n, std::size_t grain, unsigned threads, Body&& body) {
  if (n == 0) return;
  if (threads == 0) threads = default_host_threads();
  grain = std::max<std::size_t>(grain, 1);
  const std::size_t max_chunks = std::max<std::size_t>(n / grain, 1);
  const auto workers = static_cast<unsigned>(std::min<std::size_t>(threads, max_chunks));
  if (workers <= 1) {
    body(std::size_t{0}, n, 0u);
    return;
  }
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  const auto chunk_begin = [&](unsigned w) { return n * w / workers; };
  const auto* cancel_flag = detail::cancel_flag;
  // A thread that cannot start (the process's thread or memory limits) leaves its chunk to the
  // caller: the threads already started must be joined, or their destructors end the process.
  unsigned started = 1;
  try {
    for (; started < workers; ++started) {
      pool.emplace_back([&, w = started] {
        const detail::cancel_flag_guard cancel(cancel_flag);
        try {
          body(chunk_begin(w), chunk_begin(w + 1), w);
        } catch (...) {
          errors[w] = std::current_exception();
        }
      });
    }
  } catch (...) {
  }
  const auto run_here = [&](unsigned w) {
    try {
      body(chunk_begin(w), chunk_begin(w + 1), w);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  };
  run_here(0);
  for (unsigned w = started; w < workers; ++w)
    run_here(w);
  for (auto& t : pool)
    t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

//! parallel_for with the default thread count.
template <class Body>
void parallel_for(std::size_t n, std::size_t grain, Body&& body) {
  parallel_for(n, grain, 0u, static_cast<Body&&>(body));
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
