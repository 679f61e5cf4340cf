#pragma once
// A host emulator of as much of the CUDA execution model as the router's warp kernels use, so that a
// CPU-only build compiles the real kernel source (include/locus/router/detail/kernels/*.cuh) with
// the host compiler and checks it against the host path. Every CUDA thread of a block is a
// std::thread; the 32 lanes of a warp meet at a barrier for each warp collective.
//
// What it models:
// - threadIdx / blockIdx / blockDim / gridDim (x only: y and z are 0 and 1);
// - lockstep at every warp collective (__shfl_sync, __shfl_xor_sync, __ballot_sync,
//   __reduce_min_sync / __reduce_max_sync, __syncwarp): each lane waits until all 32 have arrived,
//   then reads the others' values. Between collectives the lanes run freely, as under independent
//   thread scheduling (sm_70+): data passed through memory is ordered by __syncwarp, and a kernel
//   that omits it races here as on the device;
// - the rules of full-mask collectives, each a std::logic_error from launch() naming the call site:
//   all 32 lanes must arrive (a lane that returned from the kernel cannot: "reached by n of 32
//   lanes"), at the same call site ("divergent warp"; any __syncwarp meets any other, as in CUDA),
//   with the mask 0xffffffff (partial masks are refused, not modelled);
// - __shared__ memory as function-local statics: blocks run one at a time and launches never
//   overlap, so a kernel's shared array belongs to the running block (not cleared between blocks);
// - atomicAdd / atomicMin as atomics over the block's threads; __ldg as a plain load; the integer
//   min / max overloads of CUDA's headers; __global__ and __launch_bounds__ as nothing.
//
// What it does not model: shuffle widths below 32 (no such parameter: a call fails to compile) and
// xor lane masks outside 0..31 (refused), __syncthreads and the other block-level built-ins (no
// router kernel uses them; a kernel that does fails to compile here), several blocks in flight at
// once, the memory system (coalescing, caches, bank conflicts) and the device compiler's code
// generation (FMA contraction, fast-math flags): the arithmetic's bits are the host compiler's,
// which is why the kernels build theirs from correctly rounded operations (router/detail/math.hpp).
// A collective is identified by its source location, not its call path: lanes that reach one
// helper's shuffle from two different callers pass as converged.
//
// Including a kernel header: include its dependencies first, then define __CUDA_ARCH__ as the
// architecture the project builds for while the kernel header alone is read, so that it takes the
// branches nvcc takes there (the router kernels' __reduce_*_sync for sm_80+) and the shared
// host/device headers keep their host branches (see tests/unit/test_router_kernels_host.cpp).
//
// The built-ins are defined under their CUDA names in the global namespace, because the kernel
// source calls them unqualified: the one place where the project defines reserved identifiers.
#include <array>
#include <atomic>
#include <barrier>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <version>
#if defined(__cpp_lib_source_location)
#include <source_location>
#endif

namespace locus_test::warp_emulator {

inline constexpr unsigned warp_lanes = 32;
inline constexpr unsigned full_mask = 0xffffffffu;

//! Where a collective is called: std::source_location where the library has it, else the compiler
//! built-ins it is made of (Clang 14 with libstdc++ 12 lacks it). Either way a default argument,
//! so it names the kernel's line that calls the intrinsic.
struct call_site {
  const char* file = "";
  unsigned line = 0, column = 0;

#if defined(__cpp_lib_source_location)
  static constexpr call_site here(std::source_location s = std::source_location::current()) noexcept {
    return {s.file_name(), static_cast<unsigned>(s.line()), static_cast<unsigned>(s.column())};
  }
#else
  static constexpr call_site here(const char* file = __builtin_FILE(), unsigned line = __builtin_LINE(),
#if __has_builtin(__builtin_COLUMN)
                                  unsigned column = __builtin_COLUMN()
#else
                                  unsigned column = 0
#endif
                                      ) noexcept {
    return {file, line, column};
  }
#endif

  friend bool operator==(const call_site& a, const call_site& b) {
    return a.line == b.line && a.column == b.column && std::strcmp(a.file, b.file) == 0;
  }
};

//! The type of threadIdx, blockIdx, blockDim and gridDim.
struct index3 {
  unsigned x = 0, y = 0, z = 0;
};

//! How many collectives of each kind a launch ran (one per warp, not per lane).
struct launch_counts {
  unsigned long long shuffles = 0;   //!< __shfl_sync and __shfl_xor_sync
  unsigned long long ballots = 0;    //!< __ballot_sync
  unsigned long long reductions = 0; //!< __reduce_*_sync
  unsigned long long syncwarps = 0;  //!< __syncwarp
};

enum class collective { shuffle, ballot, reduction, syncwarp };

//! Thrown in the lanes of a warp whose collective broke a rule, to unwind them out of the kernel.
struct warp_fault {};

//! One warp of the running block: the lanes' barrier, the values they exchange and the record of
//! the collective each lane waits in.
class warp {
public:
  warp() : barrier_(warp_lanes, on_phase{this}) {}
  warp(const warp&) = delete;
  warp& operator=(const warp&) = delete;

  //! Lane `lane` enters a collective with `value`; returns every lane's value once all have.
  const std::array<std::uint64_t, warp_lanes>& exchange(unsigned lane, collective kind, const char* name, unsigned mask,
                                                        std::uint64_t value, const call_site& where,
                                                        const char* refused = nullptr) {
    // Two rows, alternating: a lane can write the next collective's row only after the others have
    // arrived there, hence after they have read this one.
    auto& row = rows_[rounds_[lane]++ % 2];
    row[lane] = value;
    calls_[lane] = {kind, name, mask, where, refused, true};
    barrier_.arrive_and_wait();
    if (!fault_.empty()) throw warp_fault{};
    return row;
  }

  //! Lane leaves the warp: it returned from the kernel (or was unwound).
  void leave() { barrier_.arrive_and_drop(); }

  const std::string& fault() const { return fault_; }
  const launch_counts& counts() const { return counts_; }

private:
  struct call {
    collective kind = collective::syncwarp;
    const char* name = "";
    unsigned mask = 0;
    call_site where;
    const char* refused = nullptr; //!< why the emulator does not model this call, or null
    bool waiting = false;
  };

  struct on_phase {
    warp* self;
    void operator()() noexcept { self->check_phase(); }
  };

  static std::string hex(unsigned v) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s = "0x";
    for (int shift = 28; shift >= 0; shift -= 4)
      s += digits[(v >> shift) & 15u];
    return s;
  }

  static std::string site(const call& c) {
    return std::string(c.name) + " at " + c.where.file + ":" + std::to_string(c.where.line);
  }

  // Runs once per barrier phase, after every lane still in the kernel has arrived (or left).
  void check_phase() noexcept {
    unsigned waiting = 0, first = 0;
    for (unsigned l = 0; l < warp_lanes; ++l)
      if (calls_[l].waiting) first = waiting++ == 0 ? l : first;
    if (waiting == 0) return; // the lanes left the kernel
    const call& c = calls_[first];
    if (fault_.empty() && waiting != warp_lanes)
      fault_ = site(c) + " reached by " + std::to_string(waiting) + " of 32 lanes; the others returned from the " +
               "kernel (a full-mask collective needs every lane)";
    for (unsigned l = 0; l < warp_lanes && fault_.empty(); ++l) {
      const call& o = calls_[l];
      if (!o.waiting) continue;
      if (o.refused != nullptr)
        fault_ = site(o) + " in lane " + std::to_string(l) + ": " + o.refused;
      else if (o.mask != full_mask)
        fault_ = site(o) + " in lane " + std::to_string(l) + " with mask " + hex(o.mask) +
                 ": only full-mask collectives are modelled";
      else if (o.kind != c.kind || (c.kind != collective::syncwarp && !(o.where == c.where)))
        fault_ = "divergent warp: lane " + std::to_string(first) + " in " + site(c) + ", lane " + std::to_string(l) +
                 " in " + site(o);
    }
    switch (c.kind) {
    case collective::shuffle: ++counts_.shuffles; break;
    case collective::ballot: ++counts_.ballots; break;
    case collective::reduction: ++counts_.reductions; break;
    case collective::syncwarp: ++counts_.syncwarps; break;
    }
    for (auto& o : calls_)
      o.waiting = false;
  }

  std::barrier<on_phase> barrier_;
  std::array<std::array<std::uint64_t, warp_lanes>, 2> rows_{};
  std::array<unsigned, warp_lanes> rounds_{};
  std::array<call, warp_lanes> calls_{};
  std::string fault_;
  launch_counts counts_;
};

inline thread_local warp* current_warp = nullptr;
inline thread_local unsigned current_lane = 0;

template <class T>
std::uint64_t to_word(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t),
                "warp emulator: a shuffled value is a trivially copyable type of at most 8 bytes");
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof v);
  return u;
}

template <class T>
T from_word(std::uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

//! A shuffle that reads lane `source` (0..31), or refuses with `refused` (all lanes meet first).
template <class T>
T shuffle(const char* name, unsigned mask, T v, unsigned source, const call_site& where,
          const char* refused = nullptr) {
  const auto& row = current_warp->exchange(current_lane, collective::shuffle, name, mask, to_word(v), where, refused);
  return from_word<T>(row[source % warp_lanes]);
}

template <class T, class Op>
T reduce(unsigned mask, T v, Op op, const call_site& where) {
  const auto& row =
      current_warp->exchange(current_lane, collective::reduction, "__reduce_*_sync", mask, to_word(v), where);
  T r = from_word<T>(row[0]);
  for (unsigned l = 1; l < warp_lanes; ++l)
    r = op(r, from_word<T>(row[l]));
  return r;
}

} // namespace locus_test::warp_emulator

// --- the CUDA built-ins, under their CUDA names -----------------------------------------------------

#define __global__
#define __launch_bounds__(...)
#define __shared__ static

inline thread_local locus_test::warp_emulator::index3 threadIdx, blockIdx;
inline locus_test::warp_emulator::index3 blockDim{1, 1, 1}, gridDim{1, 1, 1};

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane,
              locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  // CUDA reads lane src_lane modulo the width (32).
  return locus_test::warp_emulator::shuffle("__shfl_sync", mask, var, static_cast<unsigned>(src_lane) & 31u, where);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask,
                  locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  const bool inside = lane_mask >= 0 && lane_mask < 32;
  return locus_test::warp_emulator::shuffle(
      "__shfl_xor_sync", mask, var, locus_test::warp_emulator::current_lane ^ static_cast<unsigned>(lane_mask & 31),
      where, inside ? nullptr : "a lane mask outside 0..31 is not modelled");
}

inline unsigned
__ballot_sync(unsigned mask, int predicate,
              locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  namespace we = locus_test::warp_emulator;
  const auto& row = we::current_warp->exchange(we::current_lane, we::collective::ballot, "__ballot_sync", mask,
                                               predicate != 0 ? 1u : 0u, where);
  unsigned bits = 0;
  for (unsigned l = 0; l < we::warp_lanes; ++l)
    bits |= static_cast<unsigned>(row[l] != 0) << l;
  return bits;
}

inline int
__reduce_min_sync(unsigned mask, int value,
                  locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  return locus_test::warp_emulator::reduce(
      mask, value, [](int a, int b) { return a < b ? a : b; }, where);
}
inline unsigned
__reduce_min_sync(unsigned mask, unsigned value,
                  locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  return locus_test::warp_emulator::reduce(
      mask, value, [](unsigned a, unsigned b) { return a < b ? a : b; }, where);
}
inline int
__reduce_max_sync(unsigned mask, int value,
                  locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  return locus_test::warp_emulator::reduce(
      mask, value, [](int a, int b) { return a > b ? a : b; }, where);
}
inline unsigned
__reduce_max_sync(unsigned mask, unsigned value,
                  locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  return locus_test::warp_emulator::reduce(
      mask, value, [](unsigned a, unsigned b) { return a > b ? a : b; }, where);
}

inline void __syncwarp(unsigned mask = locus_test::warp_emulator::full_mask,
                       locus_test::warp_emulator::call_site where = locus_test::warp_emulator::call_site::here()) {
  namespace we = locus_test::warp_emulator;
  we::current_warp->exchange(we::current_lane, we::collective::syncwarp, "__syncwarp", mask, 0, where);
}

template <class T>
T __ldg(const T* p) {
  return *p;
}

template <std::integral T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <std::integral T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}

// The integer overloads of CUDA's global min / max.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

namespace locus_test::warp_emulator {

//! Runs `kernel()` (a kernel call with its arguments bound) over `blocks` blocks of `threads`
//! threads (a multiple of 32, at most 1024), one block at a time, each thread a std::thread.
//! Rethrows the first exception of a thread; a broken warp rule throws std::logic_error naming it.
//! Returns the collectives the warps ran.
template <class Kernel>
launch_counts launch(unsigned blocks, unsigned threads, Kernel&& kernel) {
  if (threads == 0 || threads % warp_lanes != 0 || threads > 1024)
    throw std::invalid_argument("warp emulator: " + std::to_string(threads) +
                                " threads per block; a multiple of 32 up to 1024 is modelled");
  static std::mutex one_launch; // __shared__ statics belong to the one running block
  const std::lock_guard lock(one_launch);
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  if (blocks == 0) return {};

  // Per block: fresh warps (a lane that returns drops out of its warp's barrier for good).
  std::vector<std::unique_ptr<warp>> warps(threads / warp_lanes);
  launch_counts counts;
  std::mutex error_lock;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  bool stop = false;
  const auto record = [&](std::exception_ptr e) {
    const std::lock_guard g(error_lock);
    if (!error) error = std::move(e);
    failed = true;
  };
  const auto next_block = [&]() noexcept {
    for (auto& w : warps) {
      if (w) {
        counts.shuffles += w->counts().shuffles;
        counts.ballots += w->counts().ballots;
        counts.reductions += w->counts().reductions;
        counts.syncwarps += w->counts().syncwarps;
      }
      w = std::make_unique<warp>();
    }
    stop = failed.load(); // read by every thread after the barrier, written again only at the next
  };
  next_block();
  std::barrier block_end(static_cast<std::ptrdiff_t>(threads), next_block);

  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      current_lane = t % warp_lanes;
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = {b, 0, 0};
        current_warp = warps[t / warp_lanes].get();
        try {
          kernel();
        } catch (const warp_fault&) {
          record(
              std::make_exception_ptr(std::logic_error("warp emulator: block " + std::to_string(b) + ", warp " +
                                                       std::to_string(t / warp_lanes) + ": " + current_warp->fault())));
        } catch (...) {
          record(std::current_exception());
        }
        current_warp->leave();
        block_end.arrive_and_wait();
        if (stop) break;
      }
    });
  for (auto& th : pool)
    th.join();
  if (error) std::rethrow_exception(error);
  return counts;
}

} // namespace locus_test::warp_emulator
