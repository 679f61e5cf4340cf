#pragma once
// locus-requires: mpi
//! @file
//! MPI transports. `mpi_transport` owns duplicated communicators for the three exchange groups:
//! the world, the node (an `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)` communicator split further
//! by the topology's node index, so that 8 processes on one machine can act as 4 nodes × 2 GPUs or
//! 2 × 4), and the rail (ranks of one local rank across nodes: the network stage of the
//! rail-aligned hierarchical exchange). Policies: `mpi_flat` (one `MPI_Alltoallv` over the world)
//! and `mpi_hierarchical` (rail stage, then node fan-out).
//!
//! Each exchange is: a header round of point-to-point messages (row width, sequence number, row
//! count, validity; see exchange.hpp), an optional second round for receiver expectations, then
//! `MPI_Alltoallv` of the rows as a contiguous datatype of the row width. The header round polls
//! with a deadline, so a peer that never arrives ends in locus::timeout_error instead of a hang;
//! with `exchange_options::deadline_on_rows` the rows move by `MPI_Ialltoallv` under the same
//! deadline.

#include <climits>
#include <locus/core/mpi_error.hpp>
#include <locus/transport/exchange.hpp>
#include <map>
#include <mpi.h>
#include <thread>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Host object of the MPI transports: communicators, datatypes and counters of one rank.
class mpi_transport {
public:
  //! Collective over `comm`.
  //! @param comm         the ranks of the deployment; its size must equal `topo.ranks()` (duplicated)
  //! @param topo         nodes × GPUs per node (ranks per node is a parameter, not the machine's)
  //! @param hierarchical whether dispatch over this transport uses the two-stage exchange
  //! @throws locus::config_error on every rank when the communicator size differs from the
  //!         topology or a node's ranks do not share memory
  mpi_transport(MPI_Comm comm, const dynamic_topology& topo, bool hierarchical, exchange_options options = {})
      : groups_{topo, 0}, hierarchical_(hierarchical), options_(options) {
    int size = 0, rank = 0;
    LOCUS_MPI_CHECK(MPI_Comm_size(comm, &size));
    LOCUS_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    LOCUS_REQUIRE(static_cast<std::size_t>(size) == topo.ranks(), config_error, "mpi_transport: the communicator has ",
                  size, " ranks but the topology has ", topo.nodes(), " nodes × ", topo.gpus_per_node(), " = ",
                  topo.ranks());
    groups_.rank = static_cast<std::size_t>(rank);
    LOCUS_MPI_CHECK(MPI_Comm_dup(comm, &world_));
    LOCUS_MPI_CHECK(MPI_Comm_set_errhandler(world_, MPI_ERRORS_RETURN));
    const int node = static_cast<int>(topo.node_of(groups_.rank));
    const int local = static_cast<int>(topo.local_rank_of(groups_.rank));
    MPI_Comm shared = MPI_COMM_NULL;
    LOCUS_MPI_CHECK(MPI_Comm_split_type(world_, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared));
    LOCUS_MPI_CHECK(MPI_Comm_split(shared, node, local, &node_));
    LOCUS_MPI_CHECK(MPI_Comm_free(&shared));
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

  std::size_t rank() const noexcept { return groups_.rank; }
  const dynamic_topology& topology() const noexcept { return groups_.topo; }
  bool hierarchical() const noexcept { return hierarchical_; }
  std::size_t group_size(exchange_group g) const noexcept { return groups_.size(g); }
  std::size_t world_rank_of(exchange_group g, std::size_t member) const noexcept {
    return groups_.world_rank_of(g, member);
  }
  const link_counters& bytes() const noexcept { return bytes_; }
  void reset_bytes() noexcept { bytes_.clear(); }
  const exchange_options& options() const noexcept { return options_; }
  //! The duplicated communicator of a group.
  MPI_Comm communicator(exchange_group g) const noexcept {
    return g == exchange_group::node ? node_ : g == exchange_group::rail ? rail_ : world_;
  }

  //! Collective over `req.group` (see exchange.hpp).
  //! @throws locus::transport_error on every member when the requests disagree
  //! @throws locus::timeout_error when a member does not arrive within options().timeout; the
  //!         transport is unusable afterwards
  void exchange(const exchange_request& req, exchange_result& out) {
    namespace dx = detail::exchange;
    LOCUS_REQUIRE(!broken_, transport_error,
                  "mpi_transport: unusable after an earlier exchange timed out (its ranks are out of step)");
    const MPI_Comm comm = communicator(req.group);
    const std::size_t members = groups_.size(req.group), self = groups_.self_member(req.group);
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    std::uint64_t& seq = sequence_[static_cast<std::size_t>(req.group)];
    const int tag = static_cast<int>(seq % 4096) * 4;

    std::string own_problem;
    const std::uint32_t status = dx::check_request(req, members, own_problem);
    send_headers_.resize(members);
    recv_headers_.resize(members);
    for (std::size_t m = 0; m < members; ++m)
      send_headers_[m] = {seq, req.row_bytes, status == dx::ok ? req.counts[m] : 0, status, req.expectations_flag()};
    ++seq;
    requests_.assign(2 * members, MPI_REQUEST_NULL);
    for (std::size_t m = 0; m < members; ++m)
      LOCUS_MPI_CHECK(
          MPI_Irecv(&recv_headers_[m], sizeof(dx::header), MPI_BYTE, static_cast<int>(m), tag, comm, &requests_[m]));
    for (std::size_t m = 0; m < members; ++m)
      LOCUS_MPI_CHECK(MPI_Isend(&send_headers_[m], sizeof(dx::header), MPI_BYTE, static_cast<int>(m), tag, comm,
                                &requests_[members + m]));
    wait(req.group, deadline, members, "the header round");
    if (std::string why = dx::verdict(recv_headers_, self, req.group, own_problem); !why.empty())
      LOCUS_THROW(transport_error, "mpi_transport: ", why);

    bool expectations = false;
    for (const auto& h : recv_headers_)
      expectations |= h.expectations != 0;
    if (expectations) {
      const std::uint32_t mine = dx::expectation_code(recv_headers_, req.expected_counts);
      codes_.assign(members, 0);
      requests_.assign(2 * members, MPI_REQUEST_NULL);
      for (std::size_t m = 0; m < members; ++m)
        LOCUS_MPI_CHECK(MPI_Irecv(&codes_[m], 1, MPI_UINT32_T, static_cast<int>(m), tag + 1, comm, &requests_[m]));
      for (std::size_t m = 0; m < members; ++m)
        LOCUS_MPI_CHECK(MPI_Isend(&mine, 1, MPI_UINT32_T, static_cast<int>(m), tag + 1, comm, &requests_[members + m]));
      wait(req.group, deadline, members, "the count-agreement round");
      if (std::string why = dx::expectation_verdict(codes_, req.group, recv_headers_, req.expected_counts, self);
          !why.empty())
        LOCUS_THROW(transport_error, "mpi_transport: ", why);
    }

    dx::shape_result(recv_headers_, req.row_bytes, out);
    send_counts_.resize(members);
    send_displs_.resize(members);
    recv_counts_.resize(members);
    recv_displs_.resize(members);
    std::size_t send_at = 0;
    for (std::size_t m = 0; m < members; ++m) {
      LOCUS_REQUIRE(req.counts[m] <= INT_MAX && out.offsets[m + 1] <= INT_MAX && send_at + req.counts[m] <= INT_MAX,
                    invalid_input_error, "mpi_transport: more than INT_MAX rows in one exchange");
      send_counts_[m] = static_cast<int>(req.counts[m]);
      send_displs_[m] = static_cast<int>(send_at);
      send_at += req.counts[m];
      recv_counts_[m] = static_cast<int>(out.counts[m]);
      recv_displs_[m] = static_cast<int>(out.offsets[m]);
    }
    const MPI_Datatype row = row_type(req.row_bytes);
    if (options_.deadline_on_rows) {
      requests_.assign(1, MPI_REQUEST_NULL);
      LOCUS_MPI_CHECK(MPI_Ialltoallv(req.rows.data(), send_counts_.data(), send_displs_.data(), row, out.rows.data(),
                                     recv_counts_.data(), recv_displs_.data(), row, comm, &requests_[0]));
      wait(req.group, deadline, 0, "the row exchange");
    } else {
      LOCUS_MPI_CHECK(MPI_Alltoallv(req.rows.data(), send_counts_.data(), send_displs_.data(), row, out.rows.data(),
                                    recv_counts_.data(), recv_displs_.data(), row, comm));
    }
    dx::count_bytes(bytes_, topology(), rank(), req, out,
                    [&](std::size_t m) { return groups_.world_rank_of(req.group, m); });
  }

private:
  // Polls every pending request until all complete or the deadline passes. The first `receives`
  // requests are receives from members 0..receives-1, so a timeout can name who never arrived.
  void wait(exchange_group g, std::chrono::steady_clock::time_point deadline, std::size_t receives, const char* what) {
    std::size_t spins = 0;
    for (;;) {
      int done = 0;
      LOCUS_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE));
      if (done) return;
      if (std::chrono::steady_clock::now() > deadline) break;
      // Spin briefly (the common case on dedicated cores), then yield: on an oversubscribed
      // machine the peers this rank waits for need its core. (Sleeping instead measured slower:
      // the woken rank waits for a scheduler tick behind other processes.)
      if (++spins > 64) std::this_thread::yield();
    }
    broken_ = true;
    std::string missing;
    for (std::size_t m = 0; m < receives; ++m) {
      if (requests_[m] == MPI_REQUEST_NULL) continue;
      missing += (missing.empty() ? "" : ", ") + std::to_string(groups_.world_rank_of(g, m));
      MPI_Cancel(&requests_[m]);
      MPI_Request_free(&requests_[m]);
    }
    LOCUS_THROW(timeout_error, "mpi_transport: rank ", rank(), " waited ", options_.timeout.count(), " ms in ", what,
                " of an exchange over the ", to_string(g), " group",
                missing.empty() ? std::string() : ", ranks that never arrived: " + missing,
                "; the transport is unusable from now on");
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

  detail::exchange::group_map groups_;
  bool hierarchical_;
  exchange_options options_;
  MPI_Comm world_ = MPI_COMM_NULL, node_ = MPI_COMM_NULL, rail_ = MPI_COMM_NULL;
  bool broken_ = false;
  link_counters bytes_;
  std::array<std::uint64_t, 3> sequence_{};
  std::map<std::size_t, MPI_Datatype> types_;
  std::vector<detail::exchange::header> send_headers_, recv_headers_;
  std::vector<std::uint32_t> codes_;
  std::vector<MPI_Request> requests_;
  std::vector<int> send_counts_, send_displs_, recv_counts_, recv_displs_;
};

//! Flat MPI transport: one `MPI_Alltoallv` over all ranks.
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
