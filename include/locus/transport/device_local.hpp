#pragma once
// locus-requires: cuda
//! @file
//! The one-GPU multi-rank device transport: R ranks as threads of one process sharing one GPU,
//! each with its own stream, exchanging device rows with device-to-device copies. It has the
//! device interface of `nccl_transport` (`exchange_device`, `device_exchange_result`), so the
//! whole multi-rank device path runs and is tested on one GPU, where NCCL cannot put two ranks on
//! one device.
//!
//! Per exchange the members meet twice on the host, the only host synchronisation:
//! 1. Each sender records an event on its stream once its send rows are queued, makes the group's
//!    own stream wait for it, and publishes its buffer (with the headers - counts, exchange names -
//!    when the exchange has a header round). The last member to arrive records one "all ready"
//!    event on the group's stream: the join of every sender's.
//! 2. Each receiver makes its stream wait for that one event and gathers its rows out of the
//!    senders' buffers with ONE kernel (a segment per sender), then records its "done" event and
//!    joins it the same way into one "all done" event, which every sender's stream waits for
//!    before work queued afterwards may rewrite its send buffer.
//! So a group of R members issues O(R) stream operations per exchange, not O(R^2) copies and
//! event waits, and rows never pass through the host.

#include <algorithm>
#include <chrono>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/detail/host_staging.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/local.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::device_local {

//! An owned CUDA event without timing (cheap to record and wait on).
class event {
public:
  event() { LOCUS_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event() {
    if (e_) cudaEventDestroy(e_); // a failing destroy in a destructor has nowhere to report to
  }
  cudaEvent_t get() const noexcept { return e_; }

private:
  cudaEvent_t e_ = nullptr;
};

//! An owned non-blocking CUDA stream.
class stream {
public:
  stream() { LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  cudaStream_t get() const noexcept { return s_; }

private:
  cudaStream_t s_ = nullptr;
};

//! Shared state of one group instance (the world, one node, or one rail).
struct board {
  explicit board(std::vector<std::size_t> ranks)
      : barrier(ranks), headers(ranks.size() * ranks.size()), send_rows(ranks.size(), nullptr),
        send_offsets(ranks.size(), std::vector<std::size_t>(ranks.size() + 1, 0)), codes(ranks.size(), 0) {}

  //! A member's part of a join: the group's stream waits for `e`, recorded on the member's stream
  //! (each member queues its own wait before it arrives, so the waits are queued in parallel).
  void join(cudaEvent_t e) const { LOCUS_CUDA_CHECK(cudaStreamWaitEvent(joiner.get(), e, 0)); }
  //! Run by the last member to arrive, once every member queued its `join`: one wait on `joined`
  //! then stands for the whole group's events.
  void record(const event& joined) const { LOCUS_CUDA_CHECK(cudaEventRecord(joined.get(), joiner.get())); }

  timed_barrier barrier;
  std::vector<exchange::header> headers; //!< [sender * members + receiver]
  std::vector<const std::byte*> send_rows;
  std::vector<std::vector<std::size_t>> send_offsets; //!< per sender: first row for each receiver
  std::vector<std::uint32_t> codes;                   //!< second-round expectation codes
  stream joiner;                                      //!< where the members' events are joined
  event all_ready, all_done;                          //!< the joins of `ready` and of `done`
};

//! At most this many segments per gather kernel (its parameters carry them by value).
inline constexpr std::size_t segments_per_launch = 64;

//! The segments one gather kernel copies: `bytes[s]` bytes from `src[s]` to `dst[s]`.
struct segment_batch {
  std::uint32_t count = 0;
  const std::byte* src[segments_per_launch];
  std::byte* dst[segments_per_launch];
  std::size_t bytes[segments_per_launch];
};

// One grid row (blockIdx.y) per segment; the blocks of a row share its bytes (stage::copy_bytes).
template <bool Vec>
__global__ void gather_segments_kernel(const segment_batch batch) {
  const unsigned s = blockIdx.y;
  stage::copy_bytes<Vec>(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, batch.src[s], batch.dst[s],
                         batch.bytes[s]);
}

//! Queues the copies of `batch` on `stream` as one kernel: 16-byte vectors when every segment
//! allows them, enough blocks per segment for its largest one to take 32 KiB per block.
inline void gather_segments(const segment_batch& batch, cudaStream_t stream) {
  if (batch.count == 0) return;
  constexpr unsigned threads = 512;
  constexpr std::size_t block_bytes = threads * 16 * 4;
  bool vec = true;
  std::size_t largest = 0;
  for (std::uint32_t i = 0; i < batch.count; ++i) {
    vec = vec && stage::vectorisable_bytes(batch.bytes[i], batch.src[i], batch.dst[i]);
    largest = std::max(largest, batch.bytes[i]);
  }
  const dim3 grid(static_cast<unsigned>(std::clamp<std::size_t>((largest + block_bytes - 1) / block_bytes, 1, 64)),
                  batch.count);
  if (vec)
    gather_segments_kernel<true><<<grid, threads, 0, stream>>>(batch);
  else
    gather_segments_kernel<false><<<grid, threads, 0, stream>>>(batch);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

} // namespace detail::device_local

class device_local_transport;

//! Shared state of R ranks on one GPU. Create it once, then hand `endpoint(r, stream)` to the
//! thread acting as rank r. The fabric must outlive its endpoints.
class device_local_fabric {
public:
  //! @param topo nodes × GPUs per node; its rank count is the number of endpoints
  //! @param kind how dispatch over these endpoints moves copies: the transport policy's `P::kind`
  device_local_fabric(const dynamic_topology& topo, transport_kind kind, exchange_options options = {})
      : topo_(topo), kind_(kind), options_(options) {
    using detail::exchange::group_ranks;
    world_ = std::make_unique<detail::device_local::board>(group_ranks(topo, exchange_group::world, 0));
    for (std::size_t n = 0; n < topo.nodes(); ++n)
      nodes_.push_back(std::make_unique<detail::device_local::board>(
          group_ranks(topo, exchange_group::node, n * topo.gpus_per_node())));
    for (std::size_t l = 0; l < topo.gpus_per_node(); ++l)
      rails_.push_back(std::make_unique<detail::device_local::board>(group_ranks(topo, exchange_group::rail, l)));
  }
  device_local_fabric(const device_local_fabric&) = delete;
  device_local_fabric& operator=(const device_local_fabric&) = delete;

  const dynamic_topology& topology() const noexcept { return topo_; }
  transport_kind kind() const noexcept { return kind_; }
  bool hierarchical() const noexcept { return kind_ == transport_kind::hierarchical; }
  const exchange_options& options() const noexcept { return options_; }

  //! The endpoint of `rank`, issuing its copies on `stream` (not owned; give each rank its own).
  //! @throws locus::invalid_input_error when rank is out of range
  //! @throws locus::cuda_error when the endpoint's events cannot be created
  inline device_local_transport endpoint(std::size_t rank, cudaStream_t stream);

private:
  friend class device_local_transport;
  detail::device_local::board& board(exchange_group g, std::size_t rank) {
    switch (g) {
    case exchange_group::node: return *nodes_[topo_.node_of(rank)];
    case exchange_group::rail: return *rails_[topo_.local_rank_of(rank)];
    default: return *world_;
    }
  }

  dynamic_topology topo_;
  transport_kind kind_;
  exchange_options options_;
  std::unique_ptr<detail::device_local::board> world_;
  std::vector<std::unique_ptr<detail::device_local::board>> nodes_, rails_;
};

//! One rank's endpoint of a device_local_fabric. Each endpoint is used by one thread at a time.
class device_local_transport {
public:
  device_local_transport(device_local_transport&&) noexcept = default;

  std::size_t rank() const noexcept { return groups_.rank; }
  const dynamic_topology& topology() const noexcept { return groups_.topo; }
  bool hierarchical() const noexcept { return fabric_->hierarchical(); }
  std::size_t group_size(exchange_group g) const noexcept { return groups_.size(g); }
  std::size_t world_rank_of(exchange_group g, std::size_t member) const noexcept {
    return groups_.world_rank_of(g, member);
  }
  const link_counters& bytes() const noexcept { return bytes_; }
  void reset_bytes() noexcept { bytes_.clear(); }
  cudaStream_t stream() const noexcept { return stream_; }

  //! Names the exchanges that follow as exchanges of step `step` (see exchange.hpp).
  void begin_step(std::uint64_t step) noexcept { steps_.begin(step); }

  //! Collective over `group`: `send` holds device rows ordered by destination member, written by
  //! work already queued on this endpoint's stream. Returns once the copies are queued; the rows
  //! in `out` are ready for work queued afterwards on the same stream and stay valid until the
  //! second exchange after this one (receive buffers alternate), so a rank may send rows it
  //! received straight on.
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when a member does not arrive within the fabric's timeout
  void exchange_device(exchange_group group, std::size_t row_bytes, const std::byte* send,
                       std::span<const std::size_t> counts, std::span<const std::size_t> expected,
                       device_exchange_result& out, std::uint32_t stage = 0) {
    namespace dx = detail::exchange;
    const dx::device_request req(group, groups_.size(group), row_bytes, send, counts, expected, stage);
    rendezvous r(*this, group, stage);
    header_round(r, req, expected);
    req.shape(received_, out);
    move_rows(r, row_bytes, out);
    req.add_bytes(bytes_, groups_, out);
  }

  //! Collective over `group`: a count round alone. Each member tells each member how many rows of
  //! `row_bytes` and entries of `entry_bytes` it is going to send it in the known-count exchanges
  //! that follow (`exchange_device_known`), with the checks of a header round, so a step needs one
  //! round for all of them.
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when a member does not arrive within the fabric's timeout
  void exchange_device_counts(exchange_group group, std::size_t row_bytes, std::span<const std::size_t> counts,
                              std::size_t entry_bytes, std::span<const std::size_t> entry_counts, device_counts& out,
                              std::uint32_t stage = 0) {
    namespace dx = detail::exchange;
    const dx::device_request req(group, groups_.size(group), row_bytes, counts, entry_bytes, entry_counts, stage);
    rendezvous r(*this, group, stage);
    header_round(r, req, {});
    req.counts(received_, out);
  }

  //! Collective over `group`: rows whose counts every member already knows (a count round's, or
  //! the reverse of an exchange it made), `send_counts` to and `recv_counts` from each member. No
  //! header round: the members meet only to find each other's send buffers, and no stream is
  //! waited for. A count that disagrees with its sender's raises on the receiver (both arrays sit
  //! on the shared board, so the check is free here).
  //! @throws locus::invalid_input_error when a count array's size is not the group size
  //! @throws locus::transport_error when a receive count differs from what its sender sends
  //! @throws locus::timeout_error when a member does not arrive within the fabric's timeout
  void exchange_device_known(exchange_group group, std::size_t row_bytes, const std::byte* send,
                             std::span<const std::size_t> send_counts, std::span<const std::size_t> recv_counts,
                             device_exchange_result& out) {
    namespace dx = detail::exchange;
    const std::size_t members = groups_.size(group);
    dx::check_known("device local transport", group, members, row_bytes, send_counts, recv_counts);
    dx::known_shape(recv_counts, row_bytes, out);
    rendezvous r(*this, group, 0);
    publish(r, send, send_counts);
    r.sync_joining_ready("the rows of a known-count exchange");
    move_rows(r, row_bytes, out, send_counts);
    const dx::device_request req(group, members, row_bytes, send, send_counts, {}, 0);
    req.add_bytes(bytes_, groups_, out);
  }

  //! Waits for the work queued on this endpoint's stream (the host wait a caller makes before
  //! reading device results; the NCCL transport's form adds a timeout).
  void synchronize(const char*) { LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  //! The host `exchanger` form: stages host rows through device memory, so host dispatch runs on
  //! this transport unchanged (see exchange.hpp).
  void exchange(const exchange_request& req, exchange_result& out) {
    detail::exchange::stage_host_exchange(*this, *send_, stream_, bytes_, req, out);
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

private:
  friend class device_local_fabric;

  // One exchange's meeting of the members on the group's board, with its deadline.
  struct rendezvous {
    rendezvous(device_local_transport& t, exchange_group g, std::uint32_t stage)
        : group(g), members(t.groups_.size(g)), self(t.groups_.self_member(g)), b(t.fabric_->board(g, t.rank())),
          timeout(t.fabric_->options().timeout), deadline(std::chrono::steady_clock::now() + timeout), stage(stage) {}
    void sync(const std::string& what) { b.barrier.arrive_and_wait(deadline, timeout, self, group, what); }
    // A meeting of members that each joined their `ready` (or `done`) event: its last arrival
    // records the join.
    void sync_joining_ready(const std::string& what) {
      b.barrier.arrive_and_wait(deadline, timeout, self, group, what, [this] { b.record(b.all_ready); });
    }
    void sync_joining_done(const std::string& what) {
      b.barrier.arrive_and_wait(deadline, timeout, self, group, what, [this] { b.record(b.all_done); });
    }
    exchange_group group;
    std::size_t members, self;
    detail::device_local::board& b;
    std::chrono::milliseconds timeout;
    std::chrono::steady_clock::time_point deadline;
    std::uint32_t stage;
  };

  // This member's send buffer, per-receiver offsets and events on the board.
  void publish(rendezvous& r, const std::byte* send, std::span<const std::size_t> counts) {
    auto& offsets = r.b.send_offsets[r.self];
    offsets[0] = 0;
    for (std::size_t m = 0; m < r.members; ++m)
      offsets[m + 1] = offsets[m] + counts[m];
    r.b.send_rows[r.self] = send;
    LOCUS_CUDA_CHECK(cudaEventRecord(ready_->get(), stream_));
    r.b.join(ready_->get());
  }

  // The header round (and count-agreement round when `expected` is given) of `req`, which also
  // publishes the send buffer: afterwards received_ holds the received headers.
  void header_round(rendezvous& r, const detail::exchange::device_request& req, std::span<const std::size_t> expected) {
    namespace dx = detail::exchange;
    const dx::position at = steps_.next(r.group, r.stage);
    const std::string where = ::locus::detail::concat("the header round of ", dx::describe(at));
    for (std::size_t m = 0; m < r.members; ++m)
      r.b.headers[r.self * r.members + m] = req.header_for(at, m);
    count_buf_.resize(r.members);
    for (std::size_t m = 0; m < r.members; ++m)
      count_buf_[m] = req.count(m);
    publish(r, req.request().rows.data(), count_buf_);
    r.sync_joining_ready(where);
    received_.resize(r.members);
    for (std::size_t m = 0; m < r.members; ++m)
      received_[m] = r.b.headers[m * r.members + r.self];
    bool expectations = false;
    if (std::string why = req.verdict(received_, groups_, expectations); !why.empty()) {
      r.sync(where); // nobody rewrites the board before all have read it
      LOCUS_THROW(transport_error, "device local transport: ", why);
    }
    if (expectations) {
      const std::string round = ::locus::detail::concat("the count-agreement round of ", dx::describe(at));
      r.b.codes[r.self] = dx::expectation_code(received_, expected);
      r.sync(round);
      std::string why = dx::expectation_verdict(r.b.codes, groups_, r.group, received_, expected);
      r.sync(round);
      if (!why.empty()) LOCUS_THROW(transport_error, "device local transport: ", why);
    }
  }

  // Gathers `out`'s rows out of the senders' published buffers on this stream (one kernel, after
  // the group's "all ready" join), then makes this stream wait for the group's "all done" join, so
  // the caller may rewrite its send buffer afterwards (`sent`: its send counts; empty: the
  // published offsets). With `sent` given the receive counts are first checked against the
  // senders' offsets, every member meeting once more before any raises.
  void move_rows(rendezvous& r, std::size_t row_bytes, device_exchange_result& out,
                 std::span<const std::size_t> sent = {}) {
    namespace dl = detail::device_local;
    auto& b = r.b;
    std::size_t bad = r.members, bad_sends = 0;
    if (!sent.empty())
      for (std::size_t m = 0; m < r.members && bad == r.members; ++m)
        if (const std::size_t n = b.send_offsets[m][r.self + 1] - b.send_offsets[m][r.self]; n != out.counts[m]) {
          bad = m;
          bad_sends = n; // read now: the board is rewritten once everyone passed the next barrier
        }
    parity_ ^= 1u;
    std::byte* recv = recv_[parity_]->room_for(std::max<std::size_t>(out.offsets[r.members] * row_bytes, 1));
    if (bad == r.members && out.offsets[r.members] > 0) {
      LOCUS_CUDA_CHECK(cudaStreamWaitEvent(stream_, b.all_ready.get(), 0));
      dl::segment_batch batch;
      for (std::size_t m = 0; m < r.members; ++m) {
        if (out.counts[m] == 0) continue;
        batch.src[batch.count] = b.send_rows[m] + b.send_offsets[m][r.self] * row_bytes;
        batch.dst[batch.count] = recv + out.offsets[m] * row_bytes;
        batch.bytes[batch.count] = out.counts[m] * row_bytes;
        if (++batch.count == dl::segments_per_launch) {
          dl::gather_segments(batch, stream_);
          batch.count = 0;
        }
      }
      dl::gather_segments(batch, stream_);
    }
    LOCUS_CUDA_CHECK(cudaEventRecord(done_->get(), stream_));
    r.b.join(done_->get());
    out.rows = recv;
    // Every receiver has queued its copies and joined its `done` before the last to arrive records
    // the join; only the group's stream waits for an endpoint's events, and each endpoint queues
    // that wait itself, so none is destroyed while a wait on it is being queued.
    r.sync_joining_done("the row stage");
    LOCUS_CUDA_CHECK(cudaStreamWaitEvent(stream_, b.all_done.get(), 0));
    LOCUS_REQUIRE(bad == r.members, transport_error, "device local transport: rank ", rank(), " expected ",
                  out.counts[bad], " rows from rank ", groups_.world_rank_of(r.group, bad), " in a known-count ",
                  "exchange over the ", to_string(r.group), " group, which sends it ", bad_sends);
  }

  device_local_transport(device_local_fabric& f, std::size_t rank, cudaStream_t stream)
      : fabric_(&f), groups_{f.topology(), rank}, stream_(stream),
        ready_(std::make_unique<detail::device_local::event>()),
        done_(std::make_unique<detail::device_local::event>()) {}

  device_local_fabric* fabric_;
  detail::exchange::group_map groups_;
  cudaStream_t stream_;
  // Behind pointers so that the endpoint can move (events and device memory cannot).
  std::unique_ptr<detail::device_local::event> ready_, done_;
  std::unique_ptr<device_buffer<std::byte>> send_ = std::make_unique<device_buffer<std::byte>>();
  std::unique_ptr<device_buffer<std::byte>> recv_[2] = {std::make_unique<device_buffer<std::byte>>(),
                                                        std::make_unique<device_buffer<std::byte>>()};
  unsigned parity_ = 0;
  link_counters bytes_;
  detail::exchange::step_counter steps_;
  std::vector<detail::exchange::header> received_;
  std::vector<std::size_t> count_buf_;
};

inline device_local_transport device_local_fabric::endpoint(std::size_t rank, cudaStream_t stream) {
  topo_.check_rank(rank);
  return device_local_transport(*this, rank, stream);
}

//! Policy tags of the one-GPU multi-rank device transport.
struct device_local_flat {
  using policy_concept = transport_tag;
  using exchanger_type = device_local_transport;
  static constexpr transport_kind kind = transport_kind::flat;
};
struct device_local_hierarchical {
  using policy_concept = transport_tag;
  using exchanger_type = device_local_transport;
  static constexpr transport_kind kind = transport_kind::hierarchical;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
