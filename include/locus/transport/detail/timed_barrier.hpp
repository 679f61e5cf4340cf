#pragma once
//! @file
//! The meeting point of the in-process transports (`local.hpp`, `device_local.hpp`): R rank
//! threads arrive, the last one may run work for all (the one-GPU transport joins CUDA events
//! there), and all leave together, or raise once a deadline passes.
//!
//! Why not a mutex and a condition variable: releasing R waiters that way makes each of them take
//! the mutex again on its way out, one after another, and the one-GPU transport's 64 rank threads
//! meet at least twice per dispatch + combine. Here an arrival takes the mutex only to count
//! itself; waiters spin briefly, then sleep on a futex over one word that changes when the
//! meeting ends or the barrier breaks, and leave without the mutex.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <locus/core/error.hpp>
#include <locus/transport/exchange.hpp>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <climits>
#include <ctime>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail {

//! Sleeps while `word` holds `expected`, at most `for_at_most` (wakes early on `wake_all`, and may
//! wake spuriously: callers re-check).
inline void sleep_while_equal(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                              std::chrono::nanoseconds for_at_most) {
#if defined(__linux__)
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  const auto ns = std::max<std::int64_t>(for_at_most.count(), 0);
  timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
  syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &ts, nullptr, 0);
#else
  if (word.load(std::memory_order_acquire) == expected)
    std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(for_at_most, std::chrono::microseconds(50)));
#endif
}

//! Wakes every thread sleeping on `word` (after it changed).
inline void wake_all(std::atomic<std::uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

//! A barrier that gives up at a deadline. Once one member times out the barrier is broken for
//! good: the members are no longer in step, so every later arrival raises at once. It remembers
//! who had arrived when it broke, so that every waiting member names the ranks that did not
//! arrive, and a member that arrives late learns that the others gave up waiting for it.
class timed_barrier {
public:
  struct no_work {
    void operator()() const noexcept {}
  };

  //! @param ranks     world rank of each member (for messages)
  //! @param transport the transport's name, which its messages start with
  explicit timed_barrier(std::vector<std::size_t> ranks, const char* transport = "local transport")
      : transport_(transport), ranks_(std::move(ranks)), arrived_(ranks_.size(), false) {}

  //! @param where what the member is doing, for messages ("the header round of step 2 exchange #0")
  //! @param last work the last member to arrive runs before it releases the others (the one-GPU
  //!        transport joins the members' CUDA events there); when it throws, every member of this
  //!        meeting throws transport_error and the barrier is unusable from then on
  template <class Last = no_work>
  void arrive_and_wait(std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds timeout,
                       std::size_t member, exchange_group group, const std::string& where, Last&& last = Last{}) {
    std::unique_lock lock(mutex_);
    if (failed_.load(std::memory_order_relaxed))
      LOCUS_THROW(transport_error, transport_, ": unusable after the ", to_string(group), " group failed in ",
                  failure_);
    if (broken_) {
      if (std::find(missing_.begin(), missing_.end(), ranks_[member]) != missing_.end())
        LOCUS_THROW(timeout_error, transport_, ": rank ", ranks_[member], " reached ", where, " over the ",
                    to_string(group), " group after ", exchange::rank_list(waited_),
                    " had given up waiting for it: it arrived late; the transport is unusable from now on");
      LOCUS_THROW(transport_error, transport_, ": unusable after an earlier exchange over the ", to_string(group),
                  " group timed out (", exchange::rank_list(missing_), " did not arrive)");
    }
    const std::uint64_t generation = generation_.load(std::memory_order_relaxed);
    if (arrived_[member]) {
      // One member cannot wait twice in one meeting: two threads act as one rank (a rank's endpoint
      // taken twice). Its peers would meet a copy of it in place of another rank, or time out.
      failure_ = ::locus::detail::concat(where, ": rank ", ranks_[member],
                                         " arrived twice (two threads use its endpoint at once; take each rank's "
                                         "endpoint once and use it from one thread at a time)");
      failed_.store(true, std::memory_order_release);
      word_.fetch_add(1, std::memory_order_release);
      lock.unlock();
      wake_all(word_);
      throw_if_failed(group);
    }
    arrived_[member] = true;
    if (++waiting_ == ranks_.size()) {
      waiting_ = 0;
      std::fill(arrived_.begin(), arrived_.end(), false);
      try {
        last();
      } catch (const ::locus::error& e) { // its message, without the kind and source location
        failure_ = ::locus::detail::concat(where, ": ", e.message());
        failed_.store(true, std::memory_order_relaxed);
      } catch (const std::exception& e) {
        failure_ = ::locus::detail::concat(where, ": ", e.what());
        failed_.store(true, std::memory_order_relaxed);
      }
      generation_.store(generation + 1, std::memory_order_release);
      word_.fetch_add(1, std::memory_order_release);
      lock.unlock();
      wake_all(word_);
      throw_if_failed(group);
      return;
    }
    const std::uint32_t word = word_.load(std::memory_order_relaxed);
    lock.unlock();
    // Spin a little (the last arrival is often microseconds away), then sleep on the word.
    for (int spin = 0; word_.load(std::memory_order_acquire) == word; ++spin) {
      if (spin < 64) {
        std::this_thread::yield();
        continue;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) break;
      sleep_while_equal(word_, word, deadline - now);
    }
    if (generation_.load(std::memory_order_acquire) != generation) {
      throw_if_failed(group);
      return;
    }
    // The deadline passed, the barrier broke, or a member abandoned it: the rare path, under the mutex.
    lock.lock();
    if (generation_.load(std::memory_order_relaxed) != generation) {
      lock.unlock();
      throw_if_failed(group);
      return;
    }
    throw_if_failed(group);
    if (!broken_) {
      broken_ = true;
      for (std::size_t m = 0; m < ranks_.size(); ++m)
        (arrived_[m] ? waited_ : missing_).push_back(ranks_[m]);
      word_.fetch_add(1, std::memory_order_release);
      wake_all(word_);
    }
    // Every member waiting in this generation saw the same arrivals: all name the same ranks.
    LOCUS_THROW(timeout_error, transport_, ": rank ", ranks_[member], " waited ", timeout.count(), " ms in ", where,
                " over the ", to_string(group), " group; ", exchange::rank_list(missing_),
                " did not arrive; the transport is unusable from now on");
  }

  //! A member that leaves the group's collective work half done (an error inside a step, after
  //! its peers have posted their part) says so: the barrier fails with `why`, and every member
  //! waiting in it now, or arriving later, raises transport_error at once instead of meeting this
  //! member's next step out of step.
  void abandon(const std::string& why) {
    std::lock_guard lock(mutex_);
    if (failed_.load(std::memory_order_relaxed) || broken_) return; // already says why
    failure_ = why;
    failed_.store(true, std::memory_order_release);
    word_.fetch_add(1, std::memory_order_release);
    wake_all(word_);
  }

private:
  void throw_if_failed(exchange_group group) const {
    if (failed_.load(std::memory_order_acquire))
      LOCUS_THROW(transport_error, transport_, ": the ", to_string(group), " group failed in ", failure_);
  }

  const char* transport_; //!< for messages (a string literal)
  std::mutex mutex_;      //!< arrivals, breaking and failing
  std::vector<std::size_t> ranks_;
  std::vector<bool> arrived_;
  std::size_t waiting_ = 0;
  std::atomic<std::uint64_t> generation_ = 0; //!< meetings ended (written under the mutex)
  std::atomic<std::uint32_t> word_ = 0;       //!< changes when a meeting ends or the barrier breaks
  std::atomic<bool> failed_ = false;          //!< the last arrival's work threw (failure_ says what)
  std::string failure_;
  bool broken_ = false;
  std::vector<std::size_t> missing_, waited_; //!< world ranks absent / present when the barrier broke
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail
