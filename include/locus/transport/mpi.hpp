#pragma once
// locus-requires: mpi
//! @file
//! MPI transports. `mpi_transport` owns duplicated communicators for the three exchange groups:
//! the world, the node (an `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)` communicator split further
//! by the topology's node index, so that 8 processes on one machine can act as 4 nodes × 2 GPUs or
//! 2 × 4), and the rail (ranks of one local rank across nodes: the network stage of the
//! rail-aligned hierarchical exchange). Policies: `mpi_flat` (one exchange over the world: point to
//! point sends of envelopes, then rows, as below) and `mpi_hierarchical` (rail stage, then node
//! fan-out).
//!
//! Each exchange sends every peer, at once, an *envelope* (row width, the exchange's name, row and
//! entry counts, validity, then the entries; see exchange.hpp), then, once every peer's envelope
//! arrived, the rows in place, as a contiguous datatype of the row width. A receiver takes each
//! envelope at whatever size it has (MPI_Improbe, MPI_Mrecv), reaches the verdict every member
//! reaches, then receives the rows in place: no round trip before the rows move. An optional second round checks
//! receiver expectations. When a verdict fails the rows are still drained, so the group's messages stay in step and the
//! next exchange can run. Every stage polls against the deadline, so no fault blocks a rank for longer than the
//! timeout: a peer that never arrives, stops or dies ends in locus::timeout_error naming the ranks that did not arrive.
//! A rank that times out tells its peers in every group (a *notice*), so a rank that arrives after its peers gave up
//! does not pair with their stale headers: it raises too, naming the ranks that gave up. A timeout while the rows move
//! (a peer stopped after its envelope) cannot withdraw a send MPI has started: after such a timeout_error, keep the
//! request's rows alive until MPI_Finalize.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <locus/core/mpi_error.hpp>
#include <locus/transport/exchange.hpp>
#include <map>
#include <mpi.h>
#include <thread>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Host object of the MPI transports: communicators, datatypes and counters of one rank.
class mpi_transport : public detail::exchange::endpoint_state {
public:
  //! Collective over `comm`.
  //! @param comm         the ranks of the deployment; its size must equal `topo.ranks()` (duplicated)
  //! @param topo         nodes × GPUs per node (ranks per node is a parameter, not the machine's)
  //! @param kind         how dispatch over this transport moves copies: the transport policy's `P::kind`
  //! @throws locus::config_error on every rank when the ranks were given different topologies or
  //!         transport kinds, the communicator size differs from the topology, or a node's ranks
  //!         do not share memory
  mpi_transport(MPI_Comm comm, const dynamic_topology& topo, transport_kind kind, exchange_options options = {})
      : endpoint_state(topo, 0), kind_(kind), options_(options) {
    int size = 0, rank = 0;
    LOCUS_MPI_CHECK(MPI_Comm_size(comm, &size));
    LOCUS_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    groups_.rank = static_cast<std::size_t>(rank);
    LOCUS_MPI_CHECK(MPI_Comm_dup(comm, &world_));
    LOCUS_MPI_CHECK(MPI_Comm_set_errhandler(world_, MPI_ERRORS_RETURN));
    check_topology(topo, size);
    const int node = static_cast<int>(topo.node_of(groups_.rank));
    const int local = static_cast<int>(topo.local_rank_of(groups_.rank));
    MPI_Comm shared = MPI_COMM_NULL;
    LOCUS_MPI_CHECK(MPI_Comm_split_type(world_, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared));
    LOCUS_MPI_CHECK(MPI_Comm_split(shared, node, local, &node_));
    int on_machine = 0;
    LOCUS_MPI_CHECK(MPI_Comm_size(shared, &on_machine));
    LOCUS_MPI_CHECK(MPI_Comm_free(&shared));
    // A waiting rank yields its core only when the machine runs more ranks than it has cores (the
    // peers it waits for need the core); otherwise it keeps polling, as MPI's own collectives do:
    // a rank that yields to an unrelated process waits a whole time slice to run again.
    const unsigned cores = std::thread::hardware_concurrency();
    if (cores == 0 || static_cast<unsigned>(on_machine) <= cores) spin_limit_ = SIZE_MAX;
    LOCUS_MPI_CHECK(MPI_Comm_split(world_, local, node, &rail_));
    int node_size = 0, node_rank = 0, rail_size = 0, rail_rank = 0;
    LOCUS_MPI_CHECK(MPI_Comm_size(node_, &node_size));
    LOCUS_MPI_CHECK(MPI_Comm_rank(node_, &node_rank));
    LOCUS_MPI_CHECK(MPI_Comm_size(rail_, &rail_size));
    LOCUS_MPI_CHECK(MPI_Comm_rank(rail_, &rail_rank));
    const int ok = node_size == static_cast<int>(topo.gpus_per_node()) && node_rank == local &&
                   rail_size == static_cast<int>(topo.nodes()) && rail_rank == node;
    int all_ok = 0;
    LOCUS_MPI_CHECK(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, world_));
    if (!all_ok) {
      release();
      LOCUS_THROW(config_error, "mpi_transport: the ranks of a topology node (", topo.gpus_per_node(),
                  " consecutive ranks) do not all share memory; on this rank the node communicator has ", node_size,
                  " members");
    }
  }
  mpi_transport(const mpi_transport&) = delete;
  mpi_transport& operator=(const mpi_transport&) = delete;
  ~mpi_transport() { release(); }

  transport_kind kind() const noexcept { return kind_; }
  bool hierarchical() const noexcept { return kind_ == transport_kind::hierarchical; }
  const exchange_options& options() const noexcept { return options_; }
  //! The duplicated communicator of a group.
  MPI_Comm communicator(exchange_group g) const noexcept {
    return g == exchange_group::node ? node_ : g == exchange_group::rail ? rail_ : world_;
  }

  //! Collective over `req.group` (see exchange.hpp).
  //! @throws locus::transport_error on every member when the requests or the exchange names disagree
  //! @throws locus::timeout_error when a member does not arrive within options().timeout, or when
  //!         this rank arrives after a peer gave up waiting for it; the transport is unusable afterwards
  void exchange(const exchange_request& req, exchange_result& out) {
    namespace dx = detail::exchange;
    LOCUS_REQUIRE(broken_.empty(), transport_error, "mpi_transport: unusable after an earlier exchange failed (",
                  broken_, ")");
    const MPI_Comm comm = communicator(req.group);
    const std::size_t members = groups_.size(req.group), self = groups_.self_member(req.group);
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    const dx::position at = steps_.next(req.group, req.stage);
    const int tag = first_exchange_tag +
                    static_cast<int>(steps_.calls[static_cast<std::size_t>(req.group)] % tag_cycle) * tags_per_exchange;
    const stage_info where{req.group, at, deadline};

    std::string own_problem;
    const std::uint32_t status =
        within_mpi_limits(req, members, dx::check_request(req, members, own_problem, &out), own_problem);
    // Everything goes out at once, without waiting for the peers: to each member an envelope (the
    // exchange's name, counts and validity, then the entries) and, when there are any, the rows in
    // place. A receiver learns the sizes from the envelope, so there is no separate header round.
    recv_headers_.resize(members);
    send_displs_.resize(members + 1);
    envelope_displs_.resize(members + 1);
    send_displs_[0] = envelope_displs_[0] = 0;
    std::size_t entry_at = 0, self_entries_at = 0;
    for (std::size_t m = 0; m < members; ++m) {
      if (m == self) self_entries_at = entry_at;
      const dx::header h = dx::header_to(at, req, status, m);
      const std::size_t entry_bytes = h.entries * h.entry_bytes;
      envelope_displs_[m + 1] = envelope_displs_[m] + sizeof(dx::header) + entry_bytes;
      send_displs_[m + 1] = send_displs_[m] + h.count;
      envelopes_out_.resize(envelope_displs_[m + 1]);
      std::memcpy(envelopes_out_.data() + envelope_displs_[m], &h, sizeof h);
      if (entry_bytes)
        std::memcpy(envelopes_out_.data() + envelope_displs_[m] + sizeof h, req.entries.data() + entry_at, entry_bytes);
      entry_at += entry_bytes;
      if (m == self) recv_headers_[m] = h;
    }
    const MPI_Datatype row = status == dx::ok ? row_type(req.row_bytes) : MPI_BYTE;
    // Requests: [0, members) row receives, [members, 2 members) row sends, then envelope sends.
    requests_.assign(3 * members, MPI_REQUEST_NULL);
    for (std::size_t i = 1; i < members; ++i) {
      const std::size_t m = (self + i) % members;
      const std::size_t bytes = envelope_displs_[m + 1] - envelope_displs_[m];
      LOCUS_MPI_CHECK(MPI_Isend(envelopes_out_.data() + envelope_displs_[m], static_cast<int>(bytes), MPI_BYTE,
                                static_cast<int>(m), tag, comm, &requests_[2 * members + m]));
    }
    receive_envelopes(where, comm, tag, members, self);
    check_notices(where, "the envelope stage");
    // Rows only once every envelope arrived (every peer proved present): a rank that gives up
    // waiting for an envelope leaves no send pending on the caller's rows, which the caller frees
    // as the error unwinds (a queued send read them after they were freed).
    for (std::size_t i = 1; i < members; ++i) {
      const std::size_t m = (self + i) % members;
      if (const std::size_t n = send_displs_[m + 1] - send_displs_[m])
        LOCUS_MPI_CHECK(MPI_Isend(req.rows.data() + send_displs_[m] * req.row_bytes, static_cast<int>(n), row,
                                  static_cast<int>(m), tag + 2, comm, &requests_[members + m]));
    }

    std::string why = dx::verdict(recv_headers_, groups_, req.group, own_problem);
    bool expectations = false;
    for (const auto& h : recv_headers_)
      expectations |= h.expectations != 0;
    if (why.empty() && expectations) {
      my_code_ = dx::expectation_code(recv_headers_, req.expected_counts);
      codes_.assign(members, 0);
      // After the pending sends (which complete only in the row stage), so that a timeout here
      // abandons them too.
      const std::size_t base = requests_.size();
      requests_.resize(base + 2 * members, MPI_REQUEST_NULL);
      for (std::size_t m = 0; m < members; ++m)
        LOCUS_MPI_CHECK(
            MPI_Irecv(&codes_[m], 1, MPI_UINT32_T, static_cast<int>(m), tag + 1, comm, &requests_[base + m]));
      for (std::size_t m = 0; m < members; ++m)
        LOCUS_MPI_CHECK(
            MPI_Isend(&my_code_, 1, MPI_UINT32_T, static_cast<int>(m), tag + 1, comm, &requests_[base + members + m]));
      wait(where, base, members, "the count-agreement round");
      requests_.resize(base);
      why = dx::expectation_verdict(codes_, groups_, req.group, recv_headers_, req.expected_counts);
    }

    // The rows: in place when the exchange is valid; otherwise drained, so that the group's
    // messages stay in step for the next exchange (every member reaches the same verdict).
    if (why.empty()) {
      dx::shape_result(recv_headers_, req.row_bytes, out);
      for (std::size_t m = 0; m < members; ++m)
        if (out.entry_counts[m])
          std::memcpy(out.entry(out.entry_offsets[m]),
                      m == self ? req.entries.data() + self_entries_at : envelopes_in_[m].data() + sizeof(dx::header),
                      out.entry_counts[m] * out.entry_bytes);
    }
    // Drained rows get a region each: pending receives must not share a buffer.
    std::size_t drain = 0;
    drain_displs_.resize(members);
    for (std::size_t m = 0; m < members; ++m) {
      drain_displs_[m] = drain;
      if (m != self) drain += recv_headers_[m].count * recv_headers_[m].row_bytes;
    }
    if (!why.empty()) drain_.resize(drain);
    for (std::size_t i = 1; i < members; ++i) {
      const std::size_t m = (self + members - i) % members;
      const dx::header& h = recv_headers_[m];
      if (h.count == 0) continue;
      if (why.empty())
        LOCUS_MPI_CHECK(MPI_Irecv(out.row(out.offsets[m]), static_cast<int>(h.count), row, static_cast<int>(m), tag + 2,
                                  comm, &requests_[m]));
      else
        LOCUS_MPI_CHECK(MPI_Irecv(drain_.data() + drain_displs_[m], static_cast<int>(h.count * h.row_bytes), MPI_BYTE,
                                  static_cast<int>(m), tag + 2, comm, &requests_[m]));
    }
    if (why.empty() && out.counts[self])
      std::memcpy(out.row(out.offsets[self]), req.rows.data() + send_displs_[self] * req.row_bytes,
                  out.counts[self] * req.row_bytes);
    wait(where, 0, members, "the row stage");
    check_notices(where, "the row stage");
    if (!why.empty()) LOCUS_THROW(transport_error, "mpi_transport: ", why);
    dx::count_bytes(bytes_, topology(), rank(), req, out,
                    [&](std::size_t m) { return groups_.world_rank_of(req.group, m); });
  }

private:
  // Tag 1 carries notices; each exchange uses three tags from first_exchange_tag on, cycling (a
  // group's messages of one exchange cannot meet those of the exchange tag_cycle calls later).
  static constexpr int notice_tag = 1, first_exchange_tag = 4, tags_per_exchange = 4, tag_cycle = 4096;
  // A notice: step, index, stage and group of the exchange given up, then the world ranks missed.
  static constexpr std::size_t notice_fields = 4;

  struct stage_info {
    exchange_group group;
    detail::exchange::position at;
    std::chrono::steady_clock::time_point deadline;
  };

  // Polls the pending requests from `first` on until all complete or the deadline passes. The
  // `receives` requests from `first` on are receives from members 0..receives-1, so a timeout can
  // name who never arrived.
  void wait(const stage_info& where, std::size_t first, std::size_t receives, const char* what) {
    std::size_t spins = 0;
    for (;;) {
      int done = 0;
      LOCUS_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size() - first), requests_.data() + first, &done,
                                  MPI_STATUSES_IGNORE));
      if (done) return;
      if (std::chrono::steady_clock::now() > where.deadline) break;
      // Spin briefly (the common case on dedicated cores), then yield: on an oversubscribed
      // machine the peers this rank waits for need its core. (Sleeping instead measured slower:
      // the woken rank waits for a scheduler tick behind other processes.)
      if (++spins > spin_limit_) std::this_thread::yield();
      // A peer that gave up will never complete this stage: stop waiting as soon as its notice is here.
      if (spins % 256 == 0) {
        int notice = 0;
        LOCUS_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, notice_tag, communicator(where.group), &notice, MPI_STATUS_IGNORE));
        if (notice) break;
      }
    }
    // MPI_Testall leaves every request in place when one is pending: test the receives one by one
    // to name only the members that really did not arrive.
    std::vector<std::size_t> missing;
    for (std::size_t m = 0; m < receives; ++m) {
      int arrived = 1;
      if (requests_[first + m] != MPI_REQUEST_NULL) MPI_Test(&requests_[first + m], &arrived, MPI_STATUS_IGNORE);
      if (!arrived) missing.push_back(groups_.world_rank_of(where.group, m));
    }
    fail(where, what, &missing);
  }

  // Receives the envelope of every other member (any size: MPI_Improbe, then MPI_Mrecv) into
  // envelopes_in_ and its header into recv_headers_, polling against the deadline like wait().
  void receive_envelopes(const stage_info& where, MPI_Comm comm, int tag, std::size_t members, std::size_t self) {
    namespace dx = detail::exchange;
    envelopes_in_.resize(members);
    pending_.clear();
    for (std::size_t i = 1; i < members; ++i)
      pending_.push_back((self + members - i) % members);
    std::size_t spins = 0;
    while (!pending_.empty()) {
      bool got = false;
      for (std::size_t p = 0; p < pending_.size();) {
        const std::size_t m = pending_[p];
        int flag = 0;
        MPI_Message msg = MPI_MESSAGE_NULL;
        MPI_Status st;
        LOCUS_MPI_CHECK(MPI_Improbe(static_cast<int>(m), tag, comm, &flag, &msg, &st));
        if (!flag) {
          ++p;
          continue;
        }
        int bytes = 0;
        LOCUS_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &bytes));
        auto& in = envelopes_in_[m];
        in.resize(static_cast<std::size_t>(bytes));
        LOCUS_MPI_CHECK(MPI_Mrecv(in.data(), bytes, MPI_BYTE, &msg, MPI_STATUS_IGNORE));
        dx::header h{};
        if (in.size() >= sizeof h) std::memcpy(&h, in.data(), sizeof h);
        // A well-formed envelope holds its header and exactly the entries it announces.
        if (in.size() < sizeof h || in.size() - sizeof h != h.entries * h.entry_bytes) {
          h = {};
          h.status = dx::malformed;
        }
        recv_headers_[m] = h;
        pending_[p] = pending_.back();
        pending_.pop_back();
        got = true;
      }
      if (pending_.empty() || got) continue;
      if (std::chrono::steady_clock::now() > where.deadline) break;
      if (++spins > spin_limit_) std::this_thread::yield();
      if (spins % 256 == 0) {
        int notice = 0;
        LOCUS_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, notice_tag, comm, &notice, MPI_STATUS_IGNORE));
        if (notice) break;
      }
    }
    if (pending_.empty()) return;
    std::vector<std::size_t> missing;
    for (std::size_t m : pending_)
      missing.push_back(groups_.world_rank_of(where.group, m));
    std::sort(missing.begin(), missing.end());
    fail(where, "the envelope stage", &missing);
  }

  // After a stage completed: raises if a peer has given up meanwhile (its stale messages can look
  // like fresh ones; its notice tells them apart). One probe when there is none.
  void check_notices(const stage_info& where, const char* what) {
    int flag = 0;
    LOCUS_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, notice_tag, communicator(where.group), &flag, MPI_STATUS_IGNORE));
    if (flag) fail(where, what, nullptr);
  }

  // Ends this rank's part in the exchange with timeout_error: reads the peers' notices, says who did
  // not arrive (members still missing here, or those a peer gave up waiting for) or that this rank
  // itself arrived late, then gives up and tells the peers. `missing` is null when the stage did
  // complete (a peer gave up all the same).
  [[noreturn]] void fail(const stage_info& where, const char* what, const std::vector<std::size_t>* missing) {
    namespace dx = detail::exchange;
    std::vector<std::size_t> gave_up, waited_for_me, they_missed;
    std::string their_exchange;
    const MPI_Comm comm = communicator(where.group);
    for (;;) {
      int flag = 0, bytes = 0;
      MPI_Status st;
      LOCUS_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, notice_tag, comm, &flag, &st));
      if (!flag) break;
      LOCUS_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &bytes));
      std::vector<std::uint64_t> n(std::max<std::size_t>(static_cast<std::size_t>(bytes) / 8, notice_fields));
      LOCUS_MPI_CHECK(MPI_Recv(n.data(), bytes, MPI_BYTE, st.MPI_SOURCE, notice_tag, comm, MPI_STATUS_IGNORE));
      const std::size_t giver = groups_.world_rank_of(where.group, static_cast<std::size_t>(st.MPI_SOURCE));
      gave_up.push_back(giver);
      if (their_exchange.empty())
        their_exchange = ::locus::detail::concat(dx::describe({n[0], n[1], static_cast<std::uint32_t>(n[2])}),
                                                 " over the ", to_string(static_cast<exchange_group>(n[3])), " group");
      for (std::size_t i = notice_fields; i < n.size(); ++i) {
        if (n[i] == rank())
          waited_for_me.push_back(giver);
        else if (std::find(they_missed.begin(), they_missed.end(), n[i]) == they_missed.end())
          they_missed.push_back(static_cast<std::size_t>(n[i]));
      }
    }
    std::sort(gave_up.begin(), gave_up.end());
    std::sort(they_missed.begin(), they_missed.end());
    std::sort(waited_for_me.begin(), waited_for_me.end());
    const std::string stage =
        ::locus::detail::concat(what, " of ", dx::describe(where.at), " over the ", to_string(where.group), " group");
    std::string message;
    std::vector<std::size_t> absent; // the ranks this rank reports as not arrived, passed on in its notice
    if (!waited_for_me.empty()) {
      message = ::locus::detail::concat("mpi_transport: rank ", rank(), " reached ", stage, " after ",
                                        dx::rank_list(waited_for_me), " had given up waiting for this rank (at ",
                                        their_exchange, "): it arrived late");
    } else {
      if (missing)
        for (std::size_t r : *missing)
          if (std::find(gave_up.begin(), gave_up.end(), r) == gave_up.end()) absent.push_back(r);
      for (std::size_t r : they_missed)
        if (r != rank() && std::find(absent.begin(), absent.end(), r) == absent.end()) absent.push_back(r);
      std::sort(absent.begin(), absent.end());
      const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                                (where.deadline - options_.timeout));
      message = missing ? ::locus::detail::concat("mpi_transport: rank ", rank(), " waited ", waited.count(),
                                                  " ms (of ", options_.timeout.count(), ") in ", stage)
                        : ::locus::detail::concat("mpi_transport: rank ", rank(), " in ", stage);
      if (!absent.empty()) message += "; " + dx::rank_list(absent) + " did not arrive in time";
      if (!gave_up.empty()) message += "; " + dx::rank_list(gave_up) + " gave up waiting (at " + their_exchange + ")";
      if (absent.empty() && gave_up.empty()) message += "; its own messages did not complete";
    }
    message += "; the transport is unusable from now on";
    give_up(where, absent);
    broken_ = message;
    LOCUS_THROW(timeout_error, message);
  }

  // Abandons every pending request and tells every peer of every group where this rank gave up and
  // whom it found missing.
  void give_up(const stage_info& where, const std::vector<std::size_t>& absent) noexcept {
    for (MPI_Request& r : requests_) {
      if (r == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
    notice_.assign({where.at.step, where.at.index, where.at.stage, static_cast<std::uint64_t>(where.group)});
    notice_.insert(notice_.end(), absent.begin(), absent.end());
    for (exchange_group g : {exchange_group::world, exchange_group::node, exchange_group::rail}) {
      const std::size_t self = groups_.self_member(g);
      for (std::size_t m = 0; m < groups_.size(g); ++m) {
        if (m == self) continue;
        // Small enough to go eagerly; the request is freed at once so that nothing waits for it.
        MPI_Request r = MPI_REQUEST_NULL;
        if (MPI_Isend(notice_.data(), static_cast<int>(notice_.size() * 8), MPI_BYTE, static_cast<int>(m), notice_tag,
                      communicator(g), &r) == MPI_SUCCESS)
          MPI_Request_free(&r);
      }
    }
  }

  // MPI counts are ints: rows, row widths and entry bytes to one member past INT_MAX make the
  // request invalid, as a member's status that every member sees (raised alone, before sending,
  // it left the peers waiting out the timeout for this rank).
  static std::uint32_t within_mpi_limits(const exchange_request& req, std::size_t members, std::uint32_t status,
                                         std::string& why) {
    namespace dx = detail::exchange;
    if (status != dx::ok) return status;
    constexpr std::size_t most = INT_MAX;
    if (req.row_bytes > most) {
      why = ::locus::detail::concat("mpi_transport: rows of ", req.row_bytes, " bytes exceed INT_MAX");
      return dx::too_large;
    }
    for (std::size_t m = 0; m < members; ++m) {
      const std::size_t entry_bytes = req.entry_bytes ? req.entry_counts[m] * req.entry_bytes : 0;
      if (req.counts[m] > most || req.counts[m] * req.row_bytes > most || entry_bytes > most - sizeof(dx::header)) {
        why = ::locus::detail::concat("mpi_transport: ", req.counts[m], " rows of ", req.row_bytes, " bytes and ",
                                      entry_bytes, " bytes of entries to member ", m,
                                      " exceed INT_MAX rows or bytes in one message");
        return dx::too_large;
      }
    }
    return dx::ok;
  }

  MPI_Datatype row_type(std::size_t row_bytes) {
    if (auto it = types_.find(row_bytes); it != types_.end()) return it->second;
    LOCUS_REQUIRE(row_bytes <= INT_MAX, invalid_input_error, "mpi_transport: rows of ", row_bytes,
                  " bytes exceed INT_MAX");
    MPI_Datatype t;
    LOCUS_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &t));
    LOCUS_MPI_CHECK(MPI_Type_commit(&t));
    types_.emplace(row_bytes, t);
    return t;
  }

  // Collective: every rank learns whether all ranks were given one topology and one transport kind
  // and whether it has the communicator's size, and all raise alike. A rank that raised alone
  // before the splits would leave its peers waiting in them, untimed; ranks of two kinds would meet
  // each other's exchanges out of step and time out, naming the wrong ranks.
  void check_topology(const dynamic_topology& topo, int size) {
    const auto clamp = [](std::size_t v) { return static_cast<int>(std::min<std::size_t>(v, INT_MAX)); };
    const int nodes = clamp(topo.nodes()), gpus = clamp(topo.gpus_per_node()), kind = static_cast<int>(kind_);
    const int mine[6] = {nodes, -nodes, gpus, -gpus, kind, -kind};
    int all[6] = {};
    LOCUS_MPI_CHECK(MPI_Allreduce(mine, all, 6, MPI_INT, MPI_MIN, world_));
    if (all[0] != -all[1] || all[2] != -all[3]) {
      release();
      LOCUS_THROW(config_error, "mpi_transport: the ranks were given different topologies (", all[0], " to ", -all[1],
                  " nodes, ", all[2], " to ", -all[3], " GPUs per node); this rank's is ", nodes, " × ", gpus);
    }
    if (all[4] != -all[5]) {
      release();
      LOCUS_THROW(config_error,
                  "mpi_transport: the ranks were given different transport kinds (flat and "
                  "hierarchical); this rank's is ",
                  to_string(kind_));
    }
    if (static_cast<std::size_t>(size) != topo.ranks()) {
      release();
      LOCUS_THROW(config_error, "mpi_transport: the communicator has ", size, " ranks but the topology has ",
                  topo.nodes(), " nodes × ", topo.gpus_per_node(), " = ", topo.ranks());
    }
  }

  void release() noexcept {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& [bytes, t] : types_)
      MPI_Type_free(&t);
    types_.clear();
    for (MPI_Comm* c : {&rail_, &node_, &world_})
      if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  }

  transport_kind kind_;
  exchange_options options_;
  MPI_Comm world_ = MPI_COMM_NULL, node_ = MPI_COMM_NULL, rail_ = MPI_COMM_NULL;
  std::string broken_;                //!< why the transport is unusable; empty while it works
  std::vector<std::uint64_t> notice_; //!< sent when giving up; kept alive for the sends
  std::map<std::size_t, MPI_Datatype> types_;
  std::vector<detail::exchange::header> recv_headers_;
  std::vector<std::uint32_t> codes_;
  std::uint32_t my_code_ = 0; // a member: a send abandoned at a timeout may still read it
  std::vector<MPI_Request> requests_, second_;
  std::vector<std::size_t> send_displs_, envelope_displs_, drain_displs_, pending_;
  std::vector<std::byte> envelopes_out_, drain_; // members: abandoned sends may still read them
  std::vector<std::vector<std::byte>> envelopes_in_;
  std::size_t spin_limit_ = 64;
};

//! Flat MPI transport: one exchange over all ranks (envelopes, then rows, point to point).
struct mpi_flat {
  using policy_concept = transport_tag;
  using exchanger_type = mpi_transport;
  static constexpr transport_kind kind = transport_kind::flat;
};

//! Rail-aligned two-stage MPI transport: one copy per destination node across the network, then
//! the fan-out inside the node.
struct mpi_hierarchical {
  using policy_concept = transport_tag;
  using exchanger_type = mpi_transport;
  static constexpr transport_kind kind = transport_kind::hierarchical;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
