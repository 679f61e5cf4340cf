#pragma once
//! @file
//! `device_exchange_result`: the rows a device exchange received, shared by the NCCL transport
//! (`transport/nccl.hpp`) and the one-GPU multi-rank transport (`transport/device_local.hpp`), so
//! device code is written once for both; and the checks both make of a device exchange's request
//! and of the headers that come back (`detail::exchange::device_request`).

#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/transport/exchange.hpp>
#include <span>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Device rows received by an `exchange_device` call (valid until the next exchange).
struct device_exchange_result {
  const std::byte* rows = nullptr;  //!< device memory, grouped by source member
  std::vector<std::size_t> counts;  //!< rows from each source member
  std::vector<std::size_t> offsets; //!< first row of each source member (members + 1)
  std::size_t row_bytes = 0;
};

//! What a count round (`exchange_device_counts`) delivered: per source member, the rows and the
//! entries it is going to send this member in the known-count exchanges that follow.
struct device_counts {
  std::vector<std::size_t> rows;    //!< rows from each source member
  std::vector<std::size_t> entries; //!< entries from each source member
};

namespace detail::exchange {

//! One member's side of a device exchange, before and after its header round: the request over
//! device rows (`send` is not read on the host), checked against the group, the header it sends to
//! each member, the verdict on the headers it received and, once the rows are in, the result's
//! shape and the byte counters.
class device_request {
public:
  device_request(exchange_group group, std::size_t members, std::size_t row_bytes, const std::byte* send,
                 std::span<const std::size_t> counts, std::span<const std::size_t> expected, std::uint32_t stage)
      : members_(members) {
    req_ = {group, row_bytes, {send, sum(counts) * row_bytes}, counts, expected};
    req_.stage = stage;
    status_ = check_request(req_, members, problem_);
  }
  //! A count round's request: no rows move, the headers carry `counts` rows of `row_bytes` and
  //! `entry_counts` entries of `entry_bytes` to each member.
  device_request(exchange_group group, std::size_t members, std::size_t row_bytes, std::span<const std::size_t> counts,
                 std::size_t entry_bytes, std::span<const std::size_t> entry_counts, std::uint32_t stage)
      : members_(members) {
    req_ = {group, row_bytes, {static_cast<const std::byte*>(nullptr), sum(counts) * row_bytes}, counts, {}};
    req_.stage = stage;
    req_.entry_bytes = entry_bytes;
    req_.entries = {static_cast<const std::byte*>(nullptr), sum(entry_counts) * entry_bytes};
    req_.entry_counts = entry_counts;
    status_ = check_request(req_, members, problem_);
  }

  const exchange_request& request() const noexcept { return req_; }
  //! Whether this member's own request is valid (else it sends no rows and every member raises).
  bool valid() const noexcept { return status_ == ok; }
  //! Rows this member sends to member `m` (none when its request is invalid).
  std::size_t count(std::size_t m) const noexcept { return valid() ? req_.counts[m] : 0; }
  //! The header to member `m` of the exchange at `at`.
  header header_for(const position& at, std::size_t m) const { return header_to(at, req_, status_, m); }

  //! The verdict on the headers received (`received[m]` from member m): empty when the rows may
  //! move; `expectations` tells whether a count-agreement round follows.
  std::string verdict(std::span<const header> received, const group_map& groups, bool& expectations) const {
    expectations = false;
    for (const header& h : received)
      expectations |= h.expectations != 0;
    return exchange::verdict(received, groups, req_.group, problem_);
  }

  //! The received counts and offsets, from the headers (after a clean verdict).
  void shape(std::span<const header> received, device_exchange_result& out) const {
    out.row_bytes = req_.row_bytes;
    out.counts.resize(members_);
    out.offsets.assign(members_ + 1, 0);
    for (std::size_t m = 0; m < members_; ++m) {
      out.counts[m] = static_cast<std::size_t>(received[m].count);
      out.offsets[m + 1] = out.offsets[m] + out.counts[m];
    }
  }

  //! The count round's result, from the headers (after a clean verdict).
  void counts(std::span<const header> received, device_counts& out) const {
    out.rows.resize(members_);
    out.entries.resize(members_);
    for (std::size_t m = 0; m < members_; ++m) {
      out.rows[m] = static_cast<std::size_t>(received[m].count);
      out.entries[m] = static_cast<std::size_t>(received[m].entries);
    }
  }

  //! Adds the finished exchange to `bytes`.
  void add_bytes(link_counters& bytes, const group_map& groups, const device_exchange_result& out) const {
    exchange_result shape;
    shape.counts = out.counts;
    count_bytes(bytes, groups.topo, groups.rank, req_, shape,
                [&](std::size_t m) { return groups.world_rank_of(req_.group, m); });
  }

private:
  static std::size_t sum(std::span<const std::size_t> v) {
    std::size_t total = 0;
    for (std::size_t c : v)
      total += c;
    return total;
  }
  std::size_t members_;
  exchange_request req_;
  std::uint32_t status_ = ok;
  std::string problem_;
};

//! The checks of a known-count exchange (no header round, so nothing to agree on): both count
//! arrays have one value per member. The counts come from a count round every member made, so a
//! failure here is a caller's error, raised before anything is posted.
inline void check_known(const char* who, exchange_group group, std::size_t members, std::size_t row_bytes,
                        std::span<const std::size_t> send_counts, std::span<const std::size_t> recv_counts) {
  LOCUS_REQUIRE(row_bytes > 0, invalid_input_error, who, ": a known-count exchange with rows of zero bytes");
  LOCUS_REQUIRE(send_counts.size() == members && recv_counts.size() == members, invalid_input_error, who,
                ": a known-count exchange over the ", to_string(group), " group of ", members, " members got ",
                send_counts.size(), " send counts and ", recv_counts.size(), " receive counts");
}

//! The shape of a known-count exchange's result.
inline void known_shape(std::span<const std::size_t> recv_counts, std::size_t row_bytes, device_exchange_result& out) {
  out.row_bytes = row_bytes;
  out.counts.assign(recv_counts.begin(), recv_counts.end());
  out.offsets.assign(recv_counts.size() + 1, 0);
  for (std::size_t m = 0; m < recv_counts.size(); ++m)
    out.offsets[m + 1] = out.offsets[m] + recv_counts[m];
}

} // namespace detail::exchange

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
