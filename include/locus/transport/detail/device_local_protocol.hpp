#pragma once
//! @file
//! The one-GPU multi-rank transport's meeting protocol (`transport/device_local.hpp`), written
//! against a device policy so that the CPU tests run it with host memory and threads
//! (tests/support/host_local_device.hpp) and the ThreadSanitizer build checks its shared board.
//!
//! R ranks are threads of one process; rows never pass through the host, and the members meet on
//! the host once per known-count exchange (twice with a header round):
//! - each sender records an event on its stream once its send rows are queued, makes the group's
//!   own stream wait for it, and publishes its send buffer; each receiver publishes its receive
//!   buffer (sized by the counts it knows, or by the header round);
//! - the last member to arrive queues every copy of the exchange on the group's stream, as a few
//!   launches (`detail/group_gather.hpp`: two for a group of 64), and records "all done";
//! - every member's stream waits for "all done": its rows have arrived and its send buffer may be
//!   rewritten by work queued afterwards.
//!
//! A device policy `D` provides: `D::stream` (an endpoint's stream handle, not owned),
//! `D::event` and `D::group_stream` (owned, default-constructible), `D::buffer` (a growable byte
//! buffer with `room_for(n)`), `D::staging` (an endpoint's state for host exchanges), and the static
//! functions `record(event&, stream)` (the event after the stream's queued work), `join(group_stream&,
//! const event&)` (the group's stream waits for it), `record(event&, group_stream&)`, `wait(stream,
//! const event&)`, `launch_tile(group_stream&, const group_gather::tile_params&,
//! group_gather::tile_shape)` (one tile's copies, `copy_pair` for every pair), `synchronize(stream)`
//! and `host_exchange(endpoint&, staging&, stream, link_counters&, const exchange_request&,
//! exchange_result&)` (the host `exchanger` form).

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/transport/detail/group_gather.hpp>
#include <locus/transport/detail/timed_barrier.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::device_local {

//! Shared state of one group instance (the world, one node, or one rail).
template <class Device>
struct board {
  explicit board(std::vector<std::size_t> ranks)
      : barrier(ranks, "device local transport"), world(ranks),
        at(ranks.size()), headers{std::vector<exchange::header>(ranks.size() * ranks.size()),
                                  std::vector<exchange::header>(ranks.size() * ranks.size())},
        send_rows(ranks.size(), nullptr), send_offsets(ranks.size(), std::vector<std::size_t>(ranks.size() + 1, 0)),
        recv_rows(ranks.size(), nullptr), expected(ranks.size(), std::vector<std::size_t>(ranks.size(), 0)),
        checked(ranks.size(), 0), bad_sender(ranks.size(), ranks.size()), bad_count(ranks.size(), 0),
        codes(ranks.size(), 0), tails{std::vector<std::vector<std::uint32_t>>(ranks.size()),
                                      std::vector<std::vector<std::uint32_t>>(ranks.size())},
        tile(std::make_unique<group_gather::tile_params>()) {}

  std::size_t members() const noexcept { return send_rows.size(); }

  //! A member's part of the "all ready" join: the group's stream waits for `e`, recorded on the
  //! member's stream once its send rows are queued (each member queues its own wait before it
  //! arrives, so the waits are queued in parallel).
  void join(const typename Device::event& e) { Device::join(joiner, e); }

  //! Run by the last member to arrive at the row stage, once every member published its send and
  //! receive buffers and joined its `ready` event: checks that every member is at the same
  //! exchange (a known-count exchange has no header round that would), then each checked receive
  //! against what its senders send (a receiver that disagrees gets nothing and raises), queues every
  //! copy of the exchange on the group's stream (group_gather.hpp) and records `all_done` after them.
  //! @throws locus::transport_error when the members are at different exchanges (the barrier then
  //!         fails for every member, and stays failed)
  void copy_all(std::size_t row_bytes, exchange_group g) {
    if (std::string why = exchange::out_of_step(at, world); !why.empty())
      LOCUS_THROW(transport_error, "device local transport: the row stage over the ", to_string(g), " group: ", why);
    const std::size_t R = members();
    const auto sends = [&](std::size_t s, std::size_t r) { return send_offsets[s][r + 1] - send_offsets[s][r]; };
    for (std::size_t r = 0; r < R; ++r) {
      bad_sender[r] = R;
      if (!checked[r]) continue;
      for (std::size_t s = 0; s < R && bad_sender[r] == R; ++s)
        if (sends(s, r) != expected[r][s]) {
          bad_sender[r] = s;
          bad_count[r] = sends(s, r);
        }
    }
    group_gather::for_each_tile(
        R, row_bytes, send_rows.data(), sends, [&](std::size_t r) { return bad_sender[r] != R; }, recv_rows.data(),
        *tile,
        [&](const group_gather::tile_params& p, group_gather::tile_shape shape) {
          Device::launch_tile(joiner, p, shape);
        });
    Device::record(all_done, joiner);
  }

  timed_barrier barrier;
  std::vector<std::size_t> world;     //!< per member: its world rank
  std::vector<exchange::position> at; //!< per member: the exchange it is in (its row stage)
  //! Per header round, alternating (`round_parity`): [sender * members + receiver]. Two, because a
  //! count round has one meeting, after which a member reads its headers while a faster member may
  //! already write its next round's: alternating, that round writes the other copy, and the one
  //! after it needs this member at the meeting between them.
  std::vector<exchange::header> headers[2];
  std::vector<const std::byte*> send_rows;
  std::vector<std::vector<std::size_t>> send_offsets; //!< per sender: first row for each receiver
  std::vector<std::byte*> recv_rows;                  //!< per receiver: its receive buffer
  std::vector<std::vector<std::size_t>> expected;     //!< per receiver: rows it expects from each sender
  //! Per receiver: whether `expected` is checked. Bytes, not std::vector<bool>: members write
  //! their own entries concurrently, and vector<bool> packs them into shared words (seen on an
  //! H200: a lost write made an unchecked exchange compare stale expectations).
  std::vector<std::uint8_t> checked;
  std::vector<std::size_t> bad_sender, bad_count;   //!< per receiver: first sender that disagrees (or R)
  std::vector<std::uint32_t> codes;                 //!< second-round expectation codes
  std::vector<std::vector<std::uint32_t>> tails[2]; //!< per round parity and sender: its tail, receiver-major
  typename Device::group_stream joiner;             //!< where the members' events are joined
  typename Device::event all_done;                  //!< after the copies of the last row stage
  std::unique_ptr<group_gather::tile_params> tile;  //!< the launch parameters, reused (17 KiB)
};

template <class Device>
class rank_endpoint;

//! Shared state of R ranks on one GPU. Create it once, then hand `endpoint(r, stream)` to the
//! thread acting as rank r. The fabric must outlive its endpoints.
template <class Device>
class fabric : public exchange::fabric_state<device_local::board<Device>> {
public:
  //! @param topo nodes × GPUs per node; its rank count is the number of endpoints
  //! @param kind how dispatch over these endpoints moves copies: the transport policy's `P::kind`
  fabric(const dynamic_topology& topo, transport_kind kind, exchange_options options = {})
      : exchange::fabric_state<device_local::board<Device>>(topo, kind, options, "device_local_fabric") {}

  //! The endpoint of `rank`, issuing its copies on `stream` (not owned; give each rank its own).
  //! @throws locus::invalid_input_error when rank is out of range
  //! @throws what the device policy raises when the endpoint's events cannot be created
  rank_endpoint<Device> endpoint(std::size_t rank, typename Device::stream stream) {
    this->topology().check_rank(rank);
    return rank_endpoint<Device>(*this, rank, stream);
  }

private:
  friend class rank_endpoint<Device>;
};

//! One rank's endpoint of a fabric. Each endpoint is used by one thread at a time.
template <class Device>
class rank_endpoint : public exchange::endpoint_state {
public:
  rank_endpoint(rank_endpoint&&) noexcept = default;

  bool hierarchical() const noexcept { return fabric_->hierarchical(); }
  typename Device::stream stream() const noexcept { return stream_; }

  //! This rank leaves a step half done (an error after its peers posted their part of its
  //! exchanges; device_dispatcher calls it): the meetings of every group it belongs to fail with
  //! `why`, so the peers waiting in them, and every later exchange of any member, raise
  //! transport_error at once instead of pairing this rank's next step with what is left of this one
  //! (known-count exchanges carry no name that would tell them apart).
  void abandon(const char* why) noexcept {
    try {
      const std::string what =
          ::locus::detail::concat("rank ", rank(), " left a step half done (", why, "); the transport is unusable");
      for (exchange_group g : {exchange_group::world, exchange_group::node, exchange_group::rail})
        fabric_->board(g, rank()).barrier.abandon(what);
    } catch (...) { // no memory for the message: the peers time out instead
    }
  }

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
    namespace dx = exchange;
    const dx::device_request req(group, groups_.size(group), row_bytes, send, counts, expected, stage);
    rendezvous r(*this, group, stage);
    header_round(r, req, expected);
    req.shape(received_, out);
    move_rows(r, row_bytes, out, false);
    req.add_bytes(bytes_, groups_, out);
  }

  //! Collective over `group`: a count round alone. Each member tells each member how many rows of
  //! `row_bytes` and entries of `entry_bytes` it is going to send it in the known-count exchanges
  //! that follow (`exchange_device_known`), and `tail_width` more counts (`tail`, destination-major:
  //! the device dispatcher's entries per local slot of the receiver), which every member must give
  //! the same width; with the checks of a header round, so a step needs one
  //! round for all of them. `agreement`: a value every member must give alike (the device
  //! dispatcher's step_agreement of its expert map and layer index; exchange_request::agreement).
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when a member does not arrive within the fabric's timeout
  void exchange_device_counts(exchange_group group, std::size_t row_bytes, std::span<const std::size_t> counts,
                              std::size_t entry_bytes, std::span<const std::size_t> entry_counts, device_counts& out,
                              std::uint32_t stage = 0, std::span<const std::uint32_t> tail = {},
                              std::uint32_t tail_width = 0, std::uint64_t agreement = 0) {
    namespace dx = exchange;
    const dx::device_request req(group, groups_.size(group), row_bytes, counts, entry_bytes, entry_counts, stage, tail,
                                 tail_width, agreement);
    rendezvous r(*this, group, stage);
    header_round(r, req, {});
    // Every member's tail has this width (the verdict checked it); read before the next meeting.
    recv_tail_.resize(r.members * tail_width);
    for (std::size_t m = 0; m < r.members; ++m)
      std::copy_n(r.b.tails[r.parity][m].begin() + static_cast<std::ptrdiff_t>(r.self * tail_width), tail_width,
                  recv_tail_.begin() + static_cast<std::ptrdiff_t>(m * tail_width));
    req.counts(received_, recv_tail_, out);
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
    namespace dx = exchange;
    const std::size_t members = groups_.size(group);
    dx::check_known("device local transport", group, members, row_bytes, send_counts, recv_counts);
    dx::known_shape(recv_counts, row_bytes, out);
    rendezvous r(*this, group, 0);
    r.b.at[r.self] = steps_.next(group, 0); // no header round: the row stage checks it
    publish(r, send, send_counts);
    move_rows(r, row_bytes, out, true);
    const dx::device_request req(group, members, row_bytes, send, send_counts, {}, 0);
    req.add_bytes(bytes_, groups_, out);
  }

  //! Waits for the work queued on this endpoint's stream (the host wait a caller makes before
  //! reading device results; the NCCL transport's form adds a timeout).
  void synchronize(const char*) { Device::synchronize(stream_); }

  //! The host `exchanger` form: stages host rows through device memory, so host dispatch runs on
  //! this transport unchanged (see exchange.hpp).
  void exchange(const exchange_request& req, exchange_result& out) {
    Device::host_exchange(*this, *staging_, stream_, bytes_, req, out);
  }

private:
  friend class fabric<Device>;

  // One exchange's meeting of the members on the group's board, with its deadline.
  struct rendezvous {
    rendezvous(rank_endpoint& t, exchange_group g, std::uint32_t exchange_stage)
        : group(g), members(t.groups_.size(g)), self(t.groups_.self_member(g)), b(t.fabric_->board(g, t.rank())),
          timeout(t.fabric_->options().timeout), deadline(std::chrono::steady_clock::now() + timeout),
          stage(exchange_stage) {}
    void sync(const std::string& what) { b.barrier.arrive_and_wait(deadline, timeout, self, group, what); }
    // The row stage's meeting: its last arrival queues the exchange's copies (board::copy_all).
    void sync_copying(std::size_t row_bytes) {
      b.barrier.arrive_and_wait(deadline, timeout, self, group, "the row stage",
                                [this, row_bytes] { b.copy_all(row_bytes, group); });
    }
    exchange_group group;
    std::size_t members, self;
    device_local::board<Device>& b;
    std::chrono::milliseconds timeout;
    std::chrono::steady_clock::time_point deadline;
    std::uint32_t stage;
    unsigned parity = 0; //!< which copy of the board's headers and tails the header round used
  };

  // This member's send buffer, per-receiver offsets and events on the board.
  void publish(rendezvous& r, const std::byte* send, std::span<const std::size_t> counts) {
    auto& offsets = r.b.send_offsets[r.self];
    offsets[0] = 0;
    for (std::size_t m = 0; m < r.members; ++m)
      offsets[m + 1] = offsets[m] + counts[m];
    r.b.send_rows[r.self] = send;
    Device::record(*ready_, stream_);
    r.b.join(*ready_);
  }

  // The header round (and count-agreement round when `expected` is given) of `req`, which also
  // publishes the send buffer: afterwards received_ holds the received headers.
  void header_round(rendezvous& r, const exchange::device_request& req, std::span<const std::size_t> expected) {
    namespace dx = exchange;
    const dx::position at = steps_.next(r.group, r.stage);
    r.b.at[r.self] = at; // read by the row stage's check, after the meetings between
    const std::string where = ::locus::detail::concat("the header round of ", dx::describe(at));
    // Every member counts its header rounds per group alike (they are in step, which the round
    // checks), so all use the same copy.
    r.parity = static_cast<unsigned>(round_parity_[static_cast<std::size_t>(r.group)]++ & 1u);
    auto& headers = r.b.headers[r.parity];
    for (std::size_t m = 0; m < r.members; ++m)
      headers[r.self * r.members + m] = req.header_for(at, m);
    auto& tail = r.b.tails[r.parity][r.self];
    tail.resize(r.members * req.tail_width());
    for (std::size_t m = 0; m < r.members; ++m)
      for (std::size_t i = 0; i < req.tail_width(); ++i)
        tail[m * req.tail_width() + i] = req.tail_to(m, i);
    count_buf_.resize(r.members);
    for (std::size_t m = 0; m < r.members; ++m)
      count_buf_[m] = req.count(m);
    publish(r, req.request().rows.data(), count_buf_);
    r.sync(where);
    received_.resize(r.members);
    for (std::size_t m = 0; m < r.members; ++m)
      received_[m] = headers[m * r.members + r.self];
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

  // The row stage: posts this member's receive buffer (and, when `check`, the rows it expects
  // from each sender) and meets the group, whose last arrival queues every copy of the exchange
  // on the group's stream (board::copy_all). This stream then waits for those copies, which also
  // frees this member's send buffer for work queued afterwards. A checked receive that disagrees
  // with a sender gets no rows and raises here; the other members go on.
  void move_rows(rendezvous& r, std::size_t row_bytes, device_exchange_result& out, bool check) {
    auto& b = r.b;
    parity_ ^= 1u;
    std::byte* recv = recv_[parity_]->room_for(std::max<std::size_t>(out.offsets[r.members] * row_bytes, 1));
    b.recv_rows[r.self] = recv;
    b.checked[r.self] = check ? 1 : 0;
    if (check) std::copy(out.counts.begin(), out.counts.end(), b.expected[r.self].begin());
    r.sync_copying(row_bytes);
    Device::wait(stream_, b.all_done);
    out.rows = recv;
    // Read before this member's next meeting, after which the board is rewritten.
    const std::size_t bad = b.bad_sender[r.self];
    LOCUS_REQUIRE(bad == r.members, transport_error, "device local transport: rank ", rank(), " expected ",
                  out.counts[bad], " rows from rank ", groups_.world_rank_of(r.group, bad), " in a known-count ",
                  "exchange over the ", to_string(r.group), " group, which sends it ", b.bad_count[r.self]);
  }

  rank_endpoint(fabric<Device>& f, std::size_t rank, typename Device::stream stream)
      : endpoint_state(f.topology(), rank), fabric_(&f), stream_(stream),
        ready_(std::make_unique<typename Device::event>()) {}

  fabric<Device>* fabric_;
  typename Device::stream stream_;
  // Behind pointers so that the endpoint can move (events and device memory cannot).
  std::unique_ptr<typename Device::event> ready_;
  std::unique_ptr<typename Device::staging> staging_ = std::make_unique<typename Device::staging>();
  std::unique_ptr<typename Device::buffer> recv_[2] = {std::make_unique<typename Device::buffer>(),
                                                       std::make_unique<typename Device::buffer>()};
  unsigned parity_ = 0;
  std::array<std::uint64_t, 3> round_parity_{}; // header rounds per group (world, node, rail)
  std::vector<exchange::header> received_;
  std::vector<std::size_t> count_buf_;
  std::vector<std::uint32_t> recv_tail_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::device_local
