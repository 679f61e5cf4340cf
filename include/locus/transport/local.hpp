#pragma once
//! @file
//! The `local` transport: R ranks as threads of one process, exchanging rows through shared
//! memory. A `local_fabric` owns the shared state; each thread takes its `local_transport`
//! endpoint (one per rank) and calls the same collective exchanges an MPI rank would, so dispatch
//! and combine are tested without MPI, and single-process programs can use the same code.
//! Groups (world, node, rail) follow the fabric's topology exactly as on a real machine.

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <locus/transport/detail/timed_barrier.hpp>
#include <locus/transport/exchange.hpp>
#include <memory>
#include <mutex>
#include <string>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::local {

//! Shared state of one group instance (the world, one node, or one rail).
struct group_board {
  explicit group_board(std::vector<std::size_t> ranks)
      : barrier(ranks), headers(ranks.size() * ranks.size()), send_rows(ranks.size(), nullptr),
        send_offsets(ranks.size(), std::vector<std::size_t>(ranks.size() + 1, 0)), send_entries(ranks.size(), nullptr),
        entry_offsets(ranks.size(), std::vector<std::size_t>(ranks.size() + 1, 0)), codes(ranks.size(), 0) {}

  timed_barrier barrier;
  std::vector<exchange::header> headers; //!< [sender * members + receiver]
  std::vector<const std::byte*> send_rows;
  std::vector<std::vector<std::size_t>> send_offsets; //!< per sender: first row for each receiver
  std::vector<const std::byte*> send_entries;
  std::vector<std::vector<std::size_t>> entry_offsets; //!< per sender: first entry for each receiver
  std::vector<std::uint32_t> codes;                    //!< second-round expectation codes
};

} // namespace detail::local

class local_transport;

//! Shared memory of R in-process ranks. Create it once, then hand `endpoint(r)` to the thread
//! acting as rank r. The fabric must outlive its endpoints. `topology()`, `kind()`,
//! `hierarchical()` and `options()` say what it was made with.
class local_fabric : public detail::exchange::fabric_state<detail::local::group_board> {
public:
  //! @param topo         nodes × GPUs per node; its rank count is the number of endpoints
  //! @param kind how dispatch over these endpoints moves copies: the transport policy's `P::kind`
  local_fabric(const dynamic_topology& topo, transport_kind kind, exchange_options options = {})
      : fabric_state(topo, kind, options, "local_fabric") {}

  //! The endpoint of `rank`. @throws locus::invalid_input_error when rank is out of range
  inline local_transport endpoint(std::size_t rank);

private:
  friend class local_transport;
};

//! One rank's endpoint of a local_fabric: the exchanger handed to dispatch and combine. Each
//! endpoint is used by one thread at a time.
class local_transport : public detail::exchange::endpoint_state {
public:
  //! Entries travel with the rows (exchange_request::entries).
  static constexpr bool carries_entries = true;

  bool hierarchical() const noexcept { return fabric_->hierarchical(); }

  //! Collective over `req.group`: every member of the group calls it with the same row width.
  //! @throws locus::transport_error on every member when the members' requests or exchange names disagree
  //! @throws locus::timeout_error when a member does not arrive within the fabric's timeout (naming
  //!         it), or on the member that arrives after the others gave up
  void exchange(const exchange_request& req, exchange_result& out) {
    namespace dx = detail::exchange;
    const std::size_t members = groups_.size(req.group), self = groups_.self_member(req.group);
    auto& board = fabric_->board(req.group, rank());
    const auto timeout = fabric_->options().timeout;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    const dx::position at = steps_.next(req.group, req.stage);
    const auto sync = [&](const char* what) {
      board.barrier.arrive_and_wait(deadline, timeout, self, req.group,
                                    ::locus::detail::concat(what, " of ", dx::describe(at)));
    };

    std::string own_problem;
    const std::uint32_t status = dx::check_request(req, members, own_problem, &out);
    auto& offsets = board.send_offsets[self];
    auto& entry_offsets = board.entry_offsets[self];
    offsets[0] = entry_offsets[0] = 0;
    for (std::size_t m = 0; m < members; ++m) {
      const dx::header h = dx::header_to(at, req, status, m);
      board.headers[self * members + m] = h;
      offsets[m + 1] = offsets[m] + h.count;
      entry_offsets[m + 1] = entry_offsets[m] + h.entries;
    }
    board.send_rows[self] = req.rows.data();
    board.send_entries[self] = req.entries.data();
    sync("the header round");

    std::vector<dx::header> received(members);
    bool expectations = false;
    for (std::size_t m = 0; m < members; ++m) {
      received[m] = board.headers[m * members + self];
      expectations |= received[m].expectations != 0;
    }
    if (std::string why = dx::verdict(received, groups_, req.group, own_problem); !why.empty()) {
      sync("the header round"); // nobody rewrites the board before all have read it
      LOCUS_THROW(transport_error, "local transport: ", why);
    }
    if (expectations) {
      board.codes[self] = dx::expectation_code(received, req.expected_counts);
      sync("the count-agreement round");
      std::string why = dx::expectation_verdict(board.codes, groups_, req.group, received, req.expected_counts);
      sync("the count-agreement round");
      if (!why.empty()) LOCUS_THROW(transport_error, "local transport: ", why);
    }

    dx::shape_result(received, req.row_bytes, out);
    for (std::size_t m = 0; m < members; ++m) {
      if (out.counts[m] == 0) continue;
      const std::byte* src = board.send_rows[m] + board.send_offsets[m][self] * req.row_bytes;
      std::memcpy(out.row(out.offsets[m]), src, out.counts[m] * req.row_bytes);
    }
    for (std::size_t m = 0; m < members; ++m) {
      if (out.entry_counts[m] == 0) continue;
      const std::byte* src = board.send_entries[m] + board.entry_offsets[m][self] * out.entry_bytes;
      std::memcpy(out.entry(out.entry_offsets[m]), src, out.entry_counts[m] * out.entry_bytes);
    }
    // Senders may reuse their buffers only after every receiver has copied.
    sync("the row stage");
    dx::count_bytes(bytes_, topology(), rank(), req, out,
                    [&](std::size_t m) { return groups_.world_rank_of(req.group, m); });
  }

private:
  friend class local_fabric;
  local_transport(local_fabric& f, std::size_t rank) : endpoint_state(f.topology(), rank), fabric_(&f) {}

  local_fabric* fabric_;
};

inline local_transport local_fabric::endpoint(std::size_t rank) {
  topology().check_rank(rank);
  return local_transport(*this, rank);
}

//! Policy tags of the local transport.
struct local_flat {
  using policy_concept = transport_tag;
  using exchanger_type = local_transport;
  static constexpr transport_kind kind = transport_kind::flat;
};
struct local_hierarchical {
  using policy_concept = transport_tag;
  using exchanger_type = local_transport;
  static constexpr transport_kind kind = transport_kind::hierarchical;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
