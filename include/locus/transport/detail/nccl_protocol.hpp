#pragma once
//! @file
//! The NCCL transport's protocol (`transport/nccl.hpp`), written against a policy `N` that makes
//! NCCL's and the stream's calls, so that the CPU tests run it with ranks as threads over a host
//! imitation of NCCL's ordered sends and receives (tests/support/host_nccl.hpp): its header rounds,
//! the offsets its rows are posted at, its host staging, and what it does on a timeout, an
//! asynchronous error or a failed post.
//!
//! A policy `N` provides:
//! - `N::comm` (a communicator handle, null when there is none), `N::stream`, `N::config`;
//! - `N::memory`, the memory policy of transport/detail/host_staging.hpp over `N::stream`;
//! - `comm_size(comm)`, `comm_rank(comm)`; `split(parent, color, key, const config*)`, a blocking
//!   communicator split from `parent` (collective over it);
//! - `group_start()`, `send(const std::byte*, bytes, peer, comm, stream)`, `recv(std::byte*, bytes,
//!   peer, comm, stream)` and `group_end(comm)` (throws the group's error; returns once the group's
//!   operations are on the stream), and `group_end_quietly()`, which ends a group whose post failed
//!   and ignores what it returns;
//! - `idle(stream)`: whether the stream's queued work has finished (throws on a stream error);
//!   `check(comm)`: throws when the communicator reports an asynchronous error;
//! - `abort(comm)` and `destroy(comm)` (noexcept).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/core/error.hpp>
#include <locus/transport/detail/host_staging.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::nccl {

//! Posts the sends and receives of one peer inside a group.
template <class N>
struct peer_io {
  const std::byte* send;
  const std::size_t* send_offsets; //!< bytes, members + 1
  std::byte* recv;
  const std::size_t* recv_offsets; //!< bytes, members + 1
  typename N::comm comm;
  typename N::stream stream;

  void operator()(std::size_t m) const {
    const std::size_t out = send_offsets[m + 1] - send_offsets[m], in = recv_offsets[m + 1] - recv_offsets[m];
    if (out) N::send(send + send_offsets[m], out, static_cast<int>(m), comm, stream);
    if (in) N::recv(recv + recv_offsets[m], in, static_cast<int>(m), comm, stream);
  }
};

//! One send/receive pair per peer, unrolled for a compile-time peer count.
template <std::size_t Peers, class N>
void exchange_unrolled(const peer_io<N>& io) {
  [&]<std::size_t... M>(std::index_sequence<M...>) { (io(M), ...); }
  (std::make_index_sequence<Peers>{});
}

//! Chooses the unrolled form for the common group sizes, a loop otherwise. A send or receive that
//! fails inside the group still ends it (ncclGroupEnd discards the group and returns the error it
//! recorded): left open, the thread's group would swallow every later NCCL call of this transport,
//! whose waits would then find an idle stream and read stale messages.
template <class N>
void exchange_peers(std::size_t members, const peer_io<N>& io) {
  N::group_start();
  try {
    switch (members) {
    case 1: exchange_unrolled<1>(io); break;
    case 2: exchange_unrolled<2>(io); break;
    case 4: exchange_unrolled<4>(io); break;
    case 8: exchange_unrolled<8>(io); break;
    case 16: exchange_unrolled<16>(io); break;
    case 32: exchange_unrolled<32>(io); break;
    case 64: exchange_unrolled<64>(io); break;
    default:
      for (std::size_t m = 0; m < members; ++m)
        io(m);
    }
  } catch (...) {
    N::group_end_quietly(); // the first error is the one raised
    throw;
  }
  N::group_end(io.comm);
}

//! Host object of the NCCL transports for one rank (one GPU); `nccl_transport` is this with the
//! CUDA policy (transport/nccl.hpp documents it).
template <class N>
class endpoint : public exchange::endpoint_state {
  using comm_t = typename N::comm;
  using stream_t = typename N::stream;
  using memory = typename N::memory;

  // Runs `f`, this rank's part of an exchange. When it ends early (an allocation, a copy or a post
  // that failed, a caller's error found once the step was named), the members are out of step: the
  // peers posted their part, which this rank's next exchange would meet. So the transport is
  // unusable from then on, as after a timeout.
  template <class F>
  decltype(auto) in_step(F&& f) {
    try {
      return f();
    } catch (...) {
      abort_all();
      throw;
    }
  }

public:
  endpoint(comm_t world, stream_t stream, const dynamic_topology& topo, transport_kind kind,
           exchange_options options = {}, const typename N::config* config = nullptr)
      : endpoint_state(topo, 0), stream_(stream), hierarchical_(kind == transport_kind::hierarchical),
        options_(options) {
    const int size = N::comm_size(world), rank = N::comm_rank(world);
    groups_.rank = static_cast<std::size_t>(rank);
    try {
      // A world of its own: after a timeout it is aborted with the others (the caller's is not ours
      // to abort); node and rail are split from it, so they inherit nothing of the caller's.
      world_ = N::split(world, 0, rank, config);
      check_topology(topo, static_cast<std::size_t>(size));
      node_ = N::split(world_, static_cast<int>(topo.node_of(groups_.rank)),
                       static_cast<int>(topo.local_rank_of(groups_.rank)), config);
      rail_ = N::split(world_, static_cast<int>(topo.local_rank_of(groups_.rank)),
                       static_cast<int>(topo.node_of(groups_.rank)), config);
      connect_all();
    } catch (...) {
      abort_all();
      throw;
    }
  }
  endpoint(const endpoint&) = delete;
  endpoint& operator=(const endpoint&) = delete;
  // Runs before the members' destructors. Destroying a communicator waits for its work, which
  // a step left unfinished (an error between its exchanges) may hold for a lost peer: the stream
  // gets the timeout first, as a wait would, and is aborted past it. The abort releases the
  // kernels that the device buffers' frees would otherwise wait for.
  ~endpoint() {
    if (!broken_ && !idle_by(std::chrono::steady_clock::now() + options_.timeout)) abort_all();
    if (broken_) {
      abort_all();
      return;
    }
    for (comm_t c : {world_, node_, rail_})
      if (c) N::destroy(c);
  }

  bool hierarchical() const noexcept { return hierarchical_; }
  stream_t stream() const noexcept { return stream_; }
  comm_t communicator(exchange_group g) const noexcept {
    return g == exchange_group::node ? node_ : g == exchange_group::rail ? rail_ : world_;
  }

  //! This rank leaves a step half done (an error after its peers posted their part of its
  //! exchanges; device_dispatcher calls it): the transport aborts its communicators and is unusable
  //! from then on, so its next step cannot pair with what is left of this one. The peers learn it
  //! at their timeout (NCCL has no way to tell them sooner).
  void abandon(const char*) noexcept { abort_all(); }

  //! Collective over `group`: `send` holds device rows ordered by destination member.
  //! `stage` names the exchange within the step (exchange_request::stage). Two waits: the header
  //! round (counts) and the rows.
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when the exchange does not finish within the timeout
  void exchange_device(exchange_group group, std::size_t row_bytes, const std::byte* send,
                       std::span<const std::size_t> counts, std::span<const std::size_t> expected,
                       device_exchange_result& out, std::uint32_t stage = 0) {
    namespace dx = exchange;
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    const auto req = in_step(
        [&] { return dx::device_request(group, groups_.size(group), row_bytes, send, counts, expected, stage); });
    const dx::position at = header_round(group, req, expected, deadline); // a verdict raises here, on every member
    in_step([&] {
      req.shape(std::span<const dx::header>(host_headers_.data() + groups_.size(group), groups_.size(group)), out);
      post_rows(group, row_bytes, send, counts, out);
      wait(deadline, group, ::locus::detail::concat("the row exchange of ", dx::describe(at)));
    });
    req.add_bytes(bytes_, groups_, out);
  }

  //! Collective over `group`: a count round alone (one wait). Each member tells each member how
  //! many rows of `row_bytes` and entries of `entry_bytes` it is going to send it in the
  //! known-count exchanges that follow (`exchange_device_known`), and `tail_width` more counts
  //! (`tail`, destination-major: the device dispatcher's entries per local slot of the receiver),
  //! with the checks of a header round (the exchange's name, widths, array sizes), so a step needs
  //! one round for all of them. Every member must give the same tail width (a precondition, not a
  //! check): the tails travel in the headers' messages, sized by each member's own width, and NCCL
  //! does not define sends and receives of different sizes; a wider receiver waits for bytes that
  //! never come, so the round times out and the transport is unusable from then on. The device
  //! dispatcher's width is the expert map's slots per rank, which every rank's map shares.
  //! `agreement`: a value every member must give alike (the device dispatcher's step_agreement of
  //! its expert map and layer index; exchange_request::agreement).
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when the round does not finish within the timeout
  void exchange_device_counts(exchange_group group, std::size_t row_bytes, std::span<const std::size_t> counts,
                              std::size_t entry_bytes, std::span<const std::size_t> entry_counts, device_counts& out,
                              std::uint32_t stage = 0, std::span<const std::uint32_t> tail = {},
                              std::uint32_t tail_width = 0, std::uint64_t agreement = 0) {
    namespace dx = exchange;
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    const auto req = in_step([&] {
      return dx::device_request(group, groups_.size(group), row_bytes, counts, entry_bytes, entry_counts, stage, tail,
                                tail_width, agreement);
    });
    header_round(group, req, {}, deadline);
    in_step([&] {
      req.counts(std::span<const dx::header>(host_headers_.data() + groups_.size(group), groups_.size(group)),
                 recv_tail_, out);
    });
  }

  //! Collective over `group`: rows whose counts every member already knows (a count round's, or
  //! the reverse of an exchange it made), `send_counts` to and `recv_counts` from each member. No
  //! header round and no wait: the rows are posted on the stream and ready for work queued
  //! afterwards; a peer that never posts is caught, with the timeout, by the next wait on the
  //! stream (the next count round or synchronize()). The received rows stay valid until the next
  //! exchange (one receive buffer).
  //! @throws locus::invalid_input_error when a count array's size is not the group size (the
  //!         transport is unusable afterwards: the peers posted their part of the exchange)
  void exchange_device_known(exchange_group group, std::size_t row_bytes, const std::byte* send,
                             std::span<const std::size_t> send_counts, std::span<const std::size_t> recv_counts,
                             device_exchange_result& out) {
    namespace dx = exchange;
    LOCUS_REQUIRE(!broken_, transport_error, "nccl_transport: unusable after an earlier exchange failed or timed out");
    const std::size_t members = groups_.size(group);
    // A caller's error here too leaves the members out of step: the peers post this exchange.
    in_step([&] {
      dx::check_known("nccl_transport", group, members, row_bytes, send_counts, recv_counts);
      dx::known_shape(recv_counts, row_bytes, out);
      post_rows(group, row_bytes, send, send_counts, out);
    });
    const dx::device_request req(group, members, row_bytes, send, send_counts, {}, 0);
    req.add_bytes(bytes_, groups_, out);
  }

  //! Waits for the work queued on the stream, with the transport's timeout and error watch (the
  //! host wait a caller makes before reading device results, e.g. a layout's offsets).
  //! @throws locus::timeout_error when the stream does not finish within the timeout
  void synchronize(const char* what) {
    LOCUS_REQUIRE(!broken_, transport_error, "nccl_transport: unusable after an earlier exchange failed or timed out");
    wait(std::chrono::steady_clock::now() + options_.timeout, exchange_group::world, what);
  }

  //! The host `exchanger` form: stages host rows through device memory (see exchange.hpp).
  void exchange(const exchange_request& req, exchange_result& out) {
    exchange::stage_host_exchange(*this, staging_, stream_, bytes_, req, out, [&] {
      wait(std::chrono::steady_clock::now() + options_.timeout, req.group, "copying received rows to the host");
    });
  }

private:
  // The header round (and count-agreement round when `expected` is given) of `req`: afterwards
  // host_headers_[members, 2 * members) hold the received headers. Returns the exchange's name.
  exchange::position header_round(exchange_group group, const exchange::device_request& req,
                                  std::span<const std::size_t> expected,
                                  std::chrono::steady_clock::time_point deadline) {
    namespace dx = exchange;
    LOCUS_REQUIRE(!broken_, transport_error, "nccl_transport: unusable after an earlier exchange failed or timed out");
    const comm_t comm = communicator(group);
    const std::size_t members = groups_.size(group);
    dx::position at{};
    std::string why; // a verdict every member reaches alike: raised after the round, which is complete
    in_step([&] {
      at = steps_.next(group, req.request().stage);
      // One message per member: its header, then a count round's tail (tail_width() counts).
      const std::size_t W = req.tail_width(), message = dx::header_message_bytes(W);
      host_messages_.resize(2 * members * message);
      for (std::size_t m = 0; m < members; ++m)
        dx::write_header_message(req, at, m, host_messages_.data() + m * message);
      std::byte* d_messages = headers_.room_for(2 * members * message);
      memory::to_device(d_messages, host_messages_.data(), members * message, stream_);
      fixed_offsets(members, message);
      post(members, {d_messages, offsets_a_.data(), d_messages + members * message, offsets_a_.data(), comm, stream_});
      memory::to_host(host_messages_.data() + members * message, d_messages + members * message, members * message,
                      stream_);
      wait(deadline, group, ::locus::detail::concat("the header round of ", dx::describe(at)));
      host_headers_.resize(2 * members);
      recv_tail_.resize(members * W);
      for (std::size_t m = 0; m < members; ++m)
        dx::read_header_message(host_messages_.data() + (members + m) * message, W, host_headers_[members + m],
                                recv_tail_.data() + m * W);
      const std::span<const dx::header> received(host_headers_.data() + members, members);
      bool expectations = false;
      why = req.verdict(received, groups_, expectations);
      if (!why.empty() || !expectations) return;
      codes_.resize(2 * members);
      std::fill_n(codes_.data(), 2 * members, dx::expectation_code(received, expected));
      std::byte* d_codes = headers_.room_for(2 * members * sizeof(std::uint32_t));
      memory::to_device(d_codes, codes_.data(), members * sizeof(std::uint32_t), stream_);
      fixed_offsets(members, sizeof(std::uint32_t));
      post(members,
           {d_codes, offsets_a_.data(), d_codes + members * sizeof(std::uint32_t), offsets_a_.data(), comm, stream_});
      memory::to_host(codes_.data() + members, d_codes + members * sizeof(std::uint32_t),
                      members * sizeof(std::uint32_t), stream_);
      wait(deadline, group, ::locus::detail::concat("the count-agreement round of ", dx::describe(at)));
      const std::span<const std::uint32_t> codes(codes_.data() + members, members);
      why = dx::expectation_verdict(codes, groups_, group, received, expected);
    });
    if (!why.empty()) LOCUS_THROW(transport_error, "nccl_transport: ", why);
    return at;
  }

  // Posts the rows: `send_counts` rows to each member from `send`, `out`'s counts from each member
  // into the receive buffer (out.rows).
  void post_rows(exchange_group group, std::size_t row_bytes, const std::byte* send,
                 std::span<const std::size_t> send_counts, device_exchange_result& out) {
    const std::size_t members = groups_.size(group);
    offsets_a_.assign(members + 1, 0);
    offsets_b_.assign(members + 1, 0);
    for (std::size_t m = 0; m < members; ++m) {
      offsets_a_[m + 1] = offsets_a_[m] + send_counts[m] * row_bytes;
      offsets_b_[m + 1] = out.offsets[m + 1] * row_bytes;
    }
    std::byte* d_recv = recv_.room_for(std::max<std::size_t>(offsets_b_[members], 1));
    post(members, {send, offsets_a_.data(), d_recv, offsets_b_.data(), communicator(group), stream_});
    out.rows = d_recv;
  }

  // Every rank's topology to every rank, over the transport's world before the topology splits it
  // (a timed round; it also connects the world's pairs, see connect_all): all ranks reach the same
  // verdict, so ranks given different topologies, or one the communicator's size does not fit, all
  // raise config_error, where one raising alone would leave its peers in the splits, untimed.
  void check_topology(const dynamic_topology& topo, std::size_t size) {
    constexpr std::size_t message = 2 * sizeof(std::uint64_t);
    const std::uint64_t mine[2] = {topo.nodes(), topo.gpus_per_node()};
    host_messages_.resize(2 * size * message);
    for (std::size_t m = 0; m < size; ++m)
      std::memcpy(host_messages_.data() + m * message, mine, message);
    std::byte* d = headers_.room_for(2 * size * message);
    memory::to_device(d, host_messages_.data(), size * message, stream_);
    fixed_offsets(size, message);
    post(size, {d, offsets_a_.data(), d + size * message, offsets_a_.data(), world_, stream_});
    memory::to_host(host_messages_.data() + size * message, d + size * message, size * message, stream_);
    wait(std::chrono::steady_clock::now() + options_.timeout, exchange_group::world, "checking the ranks' topologies");
    std::uint64_t low[2] = {mine[0], mine[1]}, high[2] = {mine[0], mine[1]};
    for (std::size_t m = 0; m < size; ++m) {
      std::uint64_t theirs[2];
      std::memcpy(theirs, host_messages_.data() + (size + m) * message, message);
      for (int i = 0; i < 2; ++i) {
        low[i] = std::min(low[i], theirs[i]);
        high[i] = std::max(high[i], theirs[i]);
      }
    }
    LOCUS_REQUIRE(low[0] == high[0] && low[1] == high[1], config_error,
                  "nccl_transport: the ranks were given different topologies (", low[0], " to ", high[0], " nodes, ",
                  low[1], " to ", high[1], " GPUs per node); this rank's is ", mine[0], " × ", mine[1]);
    LOCUS_REQUIRE(size == topo.ranks(), config_error, "nccl_transport: the communicator has ", size,
                  " ranks but the topology has ", topo.nodes(), " nodes × ", topo.gpus_per_node(), " = ", topo.ranks());
  }

  // One byte to and from every member of node and rail when hierarchical (the world's pairs are
  // connected by the topology round), in the constructor, which is collective anyway: NCCL connects
  // a pair at its first send or receive (NCCL_RUNTIME_CONNECT, on by default) inside the group's
  // end, which waits for the peer untimed. Connecting here moves that untimed handshake into the
  // constructor (untimed already: the communicator splits are too), so that a peer lost later is
  // met by a step's timed wait rather than by a first exchange's handshake; the stream's wait that
  // follows is timed like any other.
  void connect_all() {
    if (!hierarchical_) return;
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    for (exchange_group g : {exchange_group::node, exchange_group::rail}) {
      const std::size_t members = groups_.size(g);
      std::byte* d = headers_.room_for(2 * members);
      memory::zero(d, members, stream_);
      fixed_offsets(members, 1);
      post(members, {d, offsets_a_.data(), d + members, offsets_a_.data(), communicator(g), stream_});
      wait(deadline, g, "connecting the transport's communicators");
    }
  }

  // Posts one exchange's sends and receives (always inside in_step: a failure leaves the members
  // out of step).
  void post(std::size_t members, const peer_io<N>& io) { exchange_peers(members, io); }

  // Whether the stream's work finished by `deadline` (false also on a stream error).
  bool idle_by(std::chrono::steady_clock::time_point deadline) const noexcept {
    try {
      for (;;) {
        if (N::idle(stream_)) return true;
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::yield();
      }
    } catch (...) {
      return false;
    }
  }

  // Marks the transport unusable and aborts every communicator it owns, which releases kernels
  // still waiting for a peer (what would otherwise hold a later free or destroy forever).
  void abort_all() noexcept {
    broken_ = true;
    for (comm_t* c : {&world_, &node_, &rail_})
      if (*c) N::abort(std::exchange(*c, comm_t{}));
  }

  void fixed_offsets(std::size_t members, std::size_t bytes) {
    offsets_a_.resize(members + 1);
    for (std::size_t m = 0; m <= members; ++m)
      offsets_a_[m] = m * bytes;
  }

  // Polls the stream until its work is done, a communicator reports an error, or the deadline.
  void wait(std::chrono::steady_clock::time_point deadline, exchange_group g, const std::string& what) {
    for (;;) {
      try {
        if (N::idle(stream_)) return;
        for (comm_t c : {world_, node_, rail_})
          if (c) N::check(c);
      } catch (...) {
        abort_all();
        throw;
      }
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::yield();
    }
    abort_all();
    LOCUS_THROW(timeout_error, "nccl_transport: rank ", rank(), " waited ", options_.timeout.count(), " ms in ", what,
                " of an exchange over the ", to_string(g), " group; the transport is unusable from now on");
  }

  comm_t world_{}, node_{}, rail_{}; // owned (split from the caller's)
  stream_t stream_;
  bool hierarchical_;
  exchange_options options_;
  bool broken_ = false;
  typename memory::template buffer<std::byte> headers_, recv_;
  exchange::host_staging<memory> staging_;     // host exchange()
  std::vector<exchange::header> host_headers_; // [members, 2 * members): the received ones
  // A header round's messages, sent then received; pinned, so that their copies queue instead of
  // waiting untimed for the exchange (wait() is the round's one, timed, wait).
  typename memory::template pinned<std::byte> host_messages_;
  std::vector<std::uint32_t> recv_tail_; // a count round's received tails, source-major
  typename memory::template pinned<std::uint32_t>
      codes_; // the count-agreement round's codes (pinned: as host_messages_)
  std::vector<std::size_t> offsets_a_, offsets_b_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::nccl
