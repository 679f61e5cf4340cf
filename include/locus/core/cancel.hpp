#pragma once
//! @file
//! Cooperative cancellation of the long host computations (planning, annealing, simulating,
//! re-planning). A caller that can be interrupted (the Python bindings on Ctrl-C) runs the work
//! under a `cancel_scope` bound to a flag it sets from elsewhere; the long loops call
//! `throw_if_cancelled()` at coarse points (a layer, a step, a few thousand proposals) and raise
//! `cancelled_error` once the flag is set. Without a scope, a check is one thread-local read.
//! The scope is per thread: `parallel_for` hands its caller's flag to its workers.

#include <atomic>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE {

namespace detail {
//! The flag of the innermost cancel_scope on this thread, or none.
inline constinit thread_local const std::atomic<bool>* cancel_flag = nullptr;

//! Makes `flag` (possibly none) this thread's flag until destroyed: cancel_scope and the workers
//! of parallel_for.
class cancel_flag_guard {
public:
  explicit cancel_flag_guard(const std::atomic<bool>* flag) noexcept : previous_(cancel_flag) { cancel_flag = flag; }
  ~cancel_flag_guard() { cancel_flag = previous_; }
  cancel_flag_guard(const cancel_flag_guard&) = delete;
  cancel_flag_guard& operator=(const cancel_flag_guard&) = delete;

private:
  const std::atomic<bool>* previous_;
};
} // namespace detail

//! While alive, the long computations this thread runs raise `cancelled_error` soon after `flag`
//! becomes true (set from any thread). Scopes nest; the innermost one's flag is checked.
class cancel_scope {
public:
  explicit cancel_scope(const std::atomic<bool>& flag) noexcept : guard_(&flag) {}

private:
  detail::cancel_flag_guard guard_;
};

//! Whether the current thread's cancel_scope (if any) has been told to stop.
inline bool cancel_requested() noexcept {
  const auto* flag = detail::cancel_flag;
  return flag != nullptr && flag->load(std::memory_order_relaxed);
}

//! @throws locus::cancelled_error when the current thread's cancel_scope has been told to stop
inline void throw_if_cancelled() {
  if (cancel_requested()) throw cancelled_error("the computation was cancelled");
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
