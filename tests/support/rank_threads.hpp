#pragma once
// Ranks as threads for the in-process transports' tests: runs f(rank) on one thread per rank and
// collects each rank's exception, so that a failing rank does not end the others' meetings.

#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace locus_test {

//! Runs f(r) for r < ranks, each on its own thread; returns each rank's exception (or null).
template <class F>
std::vector<std::exception_ptr> run_rank_threads(std::size_t ranks, F&& f) {
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<std::thread> threads;
  threads.reserve(ranks);
  for (std::size_t r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads)
    t.join();
  return errors;
}

} // namespace locus_test
