#pragma once
// The NCCL transport's protocol (transport/detail/nccl_protocol.hpp) over a host imitation of
// NCCL, for the CPU tests: ranks are threads of one `host_nccl::world`, each with its own stream.
//
// What it imitates, so that the protocol's host side is checked as NCCL would run it:
// - a stream is a queue run in order, and only when some thread asks whether it is idle (its
//   owner's timed wait, or a peer's wait helping it along, as a GPU runs on its own): work queued
//   and not waited for has not happened, so a host read before the wait, or a host buffer
//   rewritten after a copy from it was queued, reads or sends the wrong bytes;
// - a group's sends and receives are one operation on the stream; sends and receives match in
//   order per (communicator, sender, receiver), and a receive whose matched send has another size
//   fails the stream (NCCL leaves it undefined: a hang or corrupt rows); a send is done only once
//   its receive took it ("blocking for the GPU", as NCCL documents ncclSend), so a group waits
//   for every peer it sends to, and an exchange that a peer leaves out hangs the sender until
//   its timed wait gives up;
// - a split is collective over the parent (a member that never comes fails it after 20 s);
// - an aborted communicator's queued work ends at once, writing nothing (what ncclCommAbort
//   releases); every communicator a split made is counted until it is destroyed or aborted, once;
// - failures on request: a thread's sends after its next n raise, or every communicator reports an
//   asynchronous error.
// Device and pinned memory are host arrays, filled with 0xA5 bytes when they grow; an outgrown
// block is kept until the array dies, as device_buffer keeps it, and an array's end first runs
// what every stream can run, as cudaFree waits for the device (a copy queued behind an aborted
// exchange still lands before its buffer goes).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <functional>
#include <locus/transport/detail/nccl_protocol.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <sanitizer/asan_interface.h>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace locus_test::host_nccl {

//! What the imitation raises where NCCL or CUDA would return an error.
struct failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class world;

// Every live world, so that an array's end can run what the streams hold (see the file comment).
inline std::mutex worlds_mutex;
inline std::vector<world*> worlds;
inline void pump_every_world();

//! The members of one communicator: their mailboxes and the splits made from it.
struct group {
  group(world& w, std::size_t n) : owner(&w), size(n), mail(n * n) {}
  struct split_round {
    std::vector<std::pair<int, int>> entries; // (color, key) per member
    std::size_t arrived = 0;
    std::map<int, std::shared_ptr<group>> children; // per color
  };
  world* owner;
  std::size_t size;
  std::mutex m;
  std::condition_variable cv;
  struct message {
    std::vector<std::byte> bytes;
    std::shared_ptr<std::atomic<bool>> taken = std::make_shared<std::atomic<bool>>(false);
  };
  std::vector<std::deque<message>> mail;     // [sender * size + receiver], in send order
  std::map<std::size_t, split_round> splits; // by the members' split count
};

//! One member's handle of a group.
struct communicator {
  std::shared_ptr<group> g;
  int rank;
  std::size_t splits_made = 0;
  std::shared_ptr<std::atomic<bool>> aborted = std::make_shared<std::atomic<bool>>(false);
};

//! A stream: queued operations, each returning true once done, run in order.
struct stream_state {
  world* owner;
  std::mutex m;
  std::deque<std::function<bool()>> ops;
  std::string failed; // sticky, as a CUDA stream error

  void enqueue(std::function<bool()> op) {
    std::lock_guard lock(m);
    ops.push_back(std::move(op));
  }
  // Runs what can run; returns whether nothing is left.
  bool pump() {
    std::lock_guard lock(m);
    if (!failed.empty()) return false;
    try {
      while (!ops.empty() && ops.front()())
        ops.pop_front();
    } catch (const std::exception& e) {
      failed = e.what();
      ops.clear();
    }
    return ops.empty() && failed.empty();
  }
  std::string failure_message() {
    std::lock_guard lock(m);
    return failed;
  }
};

//! Ranks as threads of one process, with a root communicator and a stream per rank.
class world {
public:
  explicit world(std::size_t ranks) : root_(std::make_shared<group>(*this, ranks)) {
    for (std::size_t r = 0; r < ranks; ++r) {
      roots_.push_back(std::make_unique<communicator>(communicator{root_, static_cast<int>(r)}));
      streams_.push_back(std::make_unique<stream_state>());
      streams_.back()->owner = this;
    }
    std::lock_guard lock(worlds_mutex);
    worlds.push_back(this);
  }
  ~world() {
    std::lock_guard lock(worlds_mutex);
    std::erase(worlds, this);
  }
  world(const world&) = delete;
  world& operator=(const world&) = delete;
  communicator* comm(std::size_t r) { return roots_[r].get(); }
  stream_state* stream(std::size_t r) { return streams_[r].get(); }

  //! Communicators that splits made and nothing destroyed or aborted yet; -1 once a communicator
  //! was released twice, or one this world did not make (which is then left alone).
  int live() {
    std::lock_guard lock(made_mutex_);
    return misused_ ? -1 : static_cast<int>(made_.size());
  }
  //! From now on every communicator reports an asynchronous error.
  void raise_async_error() { async_error_ = true; }
  bool async_error() const { return async_error_.load(); }

  communicator* make(std::shared_ptr<group> g, int rank) {
    auto c = std::make_unique<communicator>(communicator{std::move(g), rank});
    std::lock_guard lock(made_mutex_);
    made_.push_back(c.get());
    return c.release();
  }
  void release(communicator* c) noexcept {
    std::lock_guard lock(made_mutex_);
    const auto at = std::find(made_.begin(), made_.end(), c);
    if (at == made_.end()) {
      misused_ = true;
      return;
    }
    made_.erase(at);
    delete c;
  }
  // Runs every stream's queue as far as it goes (a waiting rank helps its peers along).
  void pump_all() {
    for (auto& s : streams_)
      s->pump();
  }

private:
  std::shared_ptr<group> root_;
  std::vector<std::unique_ptr<communicator>> roots_;
  std::vector<std::unique_ptr<stream_state>> streams_;
  std::mutex made_mutex_;
  std::vector<communicator*> made_; // by splits, not yet released
  bool misused_ = false;
  std::atomic<bool> async_error_{false};
};

inline void pump_every_world() {
  std::lock_guard lock(worlds_mutex);
  for (world* w : worlds)
    w->pump_all();
}

//! A host array for device or pinned memory, poisoned when it grows; outgrown blocks are kept.
template <class T>
class array {
public:
  array() = default;
  array(const array&) = delete;
  array& operator=(const array&) = delete;
  ~array() {
    pump_every_world();
    if (!blocks_.empty()) ASAN_UNPOISON_MEMORY_REGION(data(), capacity_ * sizeof(T));
  }

  void resize(std::size_t n) {
    if (n > capacity_) {
      const std::size_t grown = std::max(n, 2 * capacity_);
      auto block = std::make_unique<T[]>(grown);
      std::memset(static_cast<void*>(block.get()), 0xA5, grown * sizeof(T));
      blocks_.push_back(std::move(block));
      capacity_ = grown;
    }
    // Under AddressSanitizer the room past the size is out of bounds, as a device allocation of
    // exactly that size would be: a receive or copy that overruns it is reported.
    if (capacity_ > 0) {
      ASAN_UNPOISON_MEMORY_REGION(data(), capacity_ * sizeof(T));
      ASAN_POISON_MEMORY_REGION(data() + n, (capacity_ - n) * sizeof(T));
    }
    size_ = n;
  }
  T* room_for(std::size_t n) {
    resize(n);
    return data();
  }
  T* data() noexcept { return blocks_.empty() ? nullptr : blocks_.back().get(); }
  std::size_t size() const noexcept { return size_; }

private:
  std::vector<std::unique_ptr<T[]>> blocks_;
  std::size_t size_ = 0, capacity_ = 0;
};

struct memory {
  using stream = stream_state*;
  template <class T>
  using buffer = array<T>;
  template <class T>
  using pinned = array<T>;
  static void copy(void* dst, const void* src, std::size_t n, stream s) {
    s->enqueue([=] {
      std::memcpy(dst, src, n);
      return true;
    });
  }
  static void to_device(void* dst, const void* src, std::size_t n, stream s) { copy(dst, src, n, s); }
  static void to_host(void* dst, const void* src, std::size_t n, stream s) { copy(dst, src, n, s); }
  static void zero(void* dst, std::size_t n, stream s) {
    s->enqueue([=] {
      std::memset(dst, 0, n);
      return true;
    });
  }
};

// A thread's open group (NCCL's group calls are per thread).
struct posted {
  bool is_send;
  const std::byte* send;
  std::byte* recv;
  std::size_t bytes;
  int peer;
  communicator* c;
  stream_state* s;
};
struct open_group {
  int depth = 0;
  std::vector<posted> ops;
};
inline thread_local open_group this_thread_group;
//! Set on a rank's thread to n >= 0: its sends after the next n raise (until it is set again).
inline thread_local int fail_send_after = -1;

//! The NCCL policy of detail/nccl_protocol.hpp.
struct nccl {
  using comm = communicator*;
  using stream = stream_state*;
  struct config {};
  using memory = host_nccl::memory;

  static int comm_size(comm c) { return static_cast<int>(c->g->size); }
  static int comm_rank(comm c) { return c->rank; }

  static comm split(comm parent, int color, int key, const config*) {
    group& g = *parent->g;
    std::unique_lock lock(g.m);
    auto& round = g.splits[parent->splits_made++];
    if (round.entries.empty()) round.entries.assign(g.size, {0, 0});
    round.entries[static_cast<std::size_t>(parent->rank)] = {color, key};
    ++round.arrived;
    g.cv.notify_all();
    if (!g.cv.wait_for(lock, std::chrono::seconds(20), [&] { return round.arrived == g.size; }))
      throw failure("host_nccl: a split whose members never all came");
    std::vector<std::size_t> members;
    for (std::size_t r = 0; r < g.size; ++r)
      if (round.entries[r].first == color) members.push_back(r);
    std::stable_sort(members.begin(), members.end(),
                     [&](std::size_t a, std::size_t b) { return round.entries[a].second < round.entries[b].second; });
    auto& child = round.children[color];
    if (!child) child = std::make_shared<group>(*g.owner, members.size());
    const auto me = std::find(members.begin(), members.end(), static_cast<std::size_t>(parent->rank)) - members.begin();
    return g.owner->make(child, static_cast<int>(me));
  }

  static void group_start() { ++this_thread_group.depth; }
  static void send(const std::byte* p, std::size_t n, int peer, comm c, stream s) {
    if (fail_send_after == 0) throw failure("host_nccl: a send failed (as asked)");
    if (fail_send_after > 0) --fail_send_after;
    post({true, p, nullptr, n, peer, c, s});
  }
  static void recv(std::byte* p, std::size_t n, int peer, comm c, stream s) {
    post({false, nullptr, p, n, peer, c, s});
  }
  static void group_end(comm) {
    open_group& o = this_thread_group;
    if (o.depth == 0) throw failure("host_nccl: a group end outside a group");
    if (--o.depth > 0) return;
    std::vector<posted> ops = std::exchange(o.ops, {});
    if (ops.empty()) return;
    for (const posted& p : ops)
      if (p.s != ops.front().s) throw failure("host_nccl: one group on two streams");
    ops.front().s->enqueue(group_op(std::move(ops)));
  }
  static void group_end_quietly() noexcept {
    open_group& o = this_thread_group;
    if (o.depth > 0 && --o.depth == 0) o.ops.clear();
  }

  static bool idle(stream s) {
    if (s->pump()) return true;
    if (std::string f = s->failure_message(); !f.empty()) throw failure("host_nccl: the stream failed: " + f);
    s->owner->pump_all();
    if (s->pump()) return true;
    if (std::string f = s->failure_message(); !f.empty()) throw failure("host_nccl: the stream failed: " + f);
    return false;
  }
  static void check(comm c) {
    if (c->g->owner->async_error()) throw failure("host_nccl: an asynchronous error (as asked)");
  }
  static void abort(comm c) noexcept {
    c->aborted->store(true);
    c->g->owner->release(c);
  }
  static void destroy(comm c) noexcept { c->g->owner->release(c); }

  //! Threads' open groups (0 when every group was ended).
  static int open_depth() { return this_thread_group.depth; }

private:
  static void post(const posted& p) {
    if (this_thread_group.depth == 0) throw failure("host_nccl: a send or receive outside a group");
    if (p.peer < 0 || static_cast<std::size_t>(p.peer) >= p.c->g->size) throw failure("host_nccl: a peer out of range");
    this_thread_group.ops.push_back(p);
  }

  // One group as a stream operation: the sends leave at its first run; it is done once every
  // receive has taken its message and every send was taken by its receive.
  static std::function<bool()> group_op(std::vector<posted> ops) {
    struct state {
      struct op { // holds no communicator: an abort on another thread frees it
        posted p;
        std::size_t me;
        std::shared_ptr<group> g;
        std::shared_ptr<std::atomic<bool>> aborted;
        std::shared_ptr<std::atomic<bool>> taken; // a send's message, once left
        bool done = false;
      };
      std::vector<op> ops;
      bool sent = false;
    };
    auto st = std::make_shared<state>();
    for (const posted& p : ops)
      st->ops.push_back({p, static_cast<std::size_t>(p.c->rank), p.c->g, p.c->aborted, nullptr, false});
    return [st] {
      for (auto& o : st->ops)
        if (o.aborted->load()) return true; // an aborted communicator's work ends, writing nothing
      if (!st->sent) {
        for (auto& o : st->ops)
          if (o.p.is_send) {
            std::lock_guard lock(o.g->m);
            const auto to = static_cast<std::size_t>(o.p.peer);
            auto& q = o.g->mail[o.me * o.g->size + to];
            q.push_back({std::vector<std::byte>(o.p.send, o.p.send + o.p.bytes)});
            o.taken = q.back().taken;
          }
        st->sent = true;
      }
      bool all = true;
      for (auto& o : st->ops) {
        if (o.done) continue;
        if (o.p.is_send) {
          o.done = o.taken->load();
          all = all && o.done;
          continue;
        }
        std::lock_guard lock(o.g->m);
        const std::size_t me = o.me, from = static_cast<std::size_t>(o.p.peer);
        auto& q = o.g->mail[from * o.g->size + me];
        if (q.empty()) {
          all = false;
          continue;
        }
        if (q.front().bytes.size() != o.p.bytes)
          throw failure("host_nccl: rank " + std::to_string(me) + " receives " + std::to_string(o.p.bytes) +
                        " bytes from rank " + std::to_string(from) + ", which sent " +
                        std::to_string(q.front().bytes.size()));
        std::memcpy(o.p.recv, q.front().bytes.data(), o.p.bytes);
        q.front().taken->store(true);
        q.pop_front();
        o.done = true;
      }
      return all;
    };
  }
};

using transport = locus::transport::detail::nccl::endpoint<nccl>;

} // namespace locus_test::host_nccl
