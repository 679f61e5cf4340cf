#pragma once
//! @file
//! `device_exchange_result`: the rows a device exchange received, shared by the NCCL transport
//! (`transport/nccl.hpp`) and the one-GPU multi-rank transport (`transport/device_local.hpp`), so
//! device code is written once for both; and the checks both make of a device exchange's request
//! and of the headers that come back (`detail::exchange::device_request`).

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
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
  //! The round's tail: `tail_width` counts from each source member (source-major), whatever the
  //! caller counts beyond rows and entries (the device dispatcher: entries per local slot).
  std::vector<std::uint32_t> tail;
  std::size_t tail_width = 0;
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
  //! `entry_counts` entries of `entry_bytes` to each member, and `tail_width` more counts to each
  //! (`tail`, destination-major: members × tail_width values); `agreement` as exchange_request's.
  device_request(exchange_group group, std::size_t members, std::size_t row_bytes, std::span<const std::size_t> counts,
                 std::size_t entry_bytes, std::span<const std::size_t> entry_counts, std::uint32_t stage,
                 std::span<const std::uint32_t> tail = {}, std::uint32_t tail_width = 0, std::uint64_t agreement = 0)
      : members_(members), tail_(tail), tail_width_(tail_width) {
    req_ = {group, row_bytes, {static_cast<const std::byte*>(nullptr), sum(counts) * row_bytes}, counts, {}};
    req_.stage = stage;
    req_.agreement = agreement;
    req_.entry_bytes = entry_bytes;
    req_.entries = {static_cast<const std::byte*>(nullptr), sum(entry_counts) * entry_bytes};
    req_.entry_counts = entry_counts;
    status_ = check_request(req_, members, problem_);
    if (status_ == ok && tail.size() != members * tail_width) {
      status_ = tail_size;
      problem_ =
          ::locus::detail::concat("the tail has ", tail.size(), " counts but the ", to_string(group), " group of ",
                                  members, " members at ", tail_width, " per member needs ", members * tail_width);
    }
  }

  const exchange_request& request() const noexcept { return req_; }
  //! Whether this member's own request is valid (else it sends no rows and every member raises).
  bool valid() const noexcept { return status_ == ok; }
  //! Rows this member sends to member `m` (none when its request is invalid).
  std::size_t count(std::size_t m) const noexcept { return valid() ? req_.counts[m] : 0; }
  //! The header to member `m` of the exchange at `at`.
  header header_for(const position& at, std::size_t m) const { return header_to(at, req_, status_, m, tail_width_); }
  //! The tail counts to member `m` (a count round's; zeros when this member's request is invalid,
  //! so a receiver never reads past what the headers announce).
  std::uint32_t tail_to(std::size_t m, std::size_t i) const noexcept {
    return valid() ? tail_[m * tail_width_ + i] : 0;
  }
  std::uint32_t tail_width() const noexcept { return tail_width_; }

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

  //! The count round's result, from the headers and the received tails (`tail`: tail_width()
  //! counts from each member, source-major), after a clean verdict (which checked that every
  //! member's tail has this member's width).
  void counts(std::span<const header> received, std::span<const std::uint32_t> tail, device_counts& out) const {
    out.rows.resize(members_);
    out.entries.resize(members_);
    for (std::size_t m = 0; m < members_; ++m) {
      out.rows[m] = static_cast<std::size_t>(received[m].count);
      out.entries[m] = static_cast<std::size_t>(received[m].entries);
    }
    out.tail_width = tail_width_;
    out.tail.assign(tail.begin(), tail.begin() + static_cast<std::ptrdiff_t>(members_ * tail_width_));
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
  std::span<const std::uint32_t> tail_;
  std::uint32_t tail_width_ = 0;
  exchange_request req_;
  std::uint32_t status_ = ok;
  std::string problem_;
};

//! A header round as bytes (the NCCL transport's; the one-GPU transport shares memory instead): each
//! member sends each member one message of header_message_bytes(tail_width) bytes, its header
//! (device_request::header_for) then its tail_width counts for that member (tail_to).
inline std::size_t header_message_bytes(std::size_t tail_width) noexcept {
  return sizeof(header) + tail_width * sizeof(std::uint32_t);
}

//! Writes `req`'s message to member `m` of the round at `at` into `out`.
inline void write_header_message(const device_request& req, const position& at, std::size_t m, std::byte* out) {
  const header h = req.header_for(at, m);
  std::memcpy(out, &h, sizeof h);
  for (std::size_t i = 0; i < req.tail_width(); ++i) {
    const std::uint32_t c = req.tail_to(m, i);
    std::memcpy(out + sizeof h + i * sizeof c, &c, sizeof c);
  }
}

//! Reads a message of a round whose tails are `tail_width` counts wide: its header into `h` and its
//! counts into `tail` (what device_request::counts takes, source-major, at the sender's place).
inline void read_header_message(const std::byte* in, std::size_t tail_width, header& h, std::uint32_t* tail) {
  std::memcpy(&h, in, sizeof h);
  if (tail_width) std::memcpy(tail, in + sizeof h, tail_width * sizeof(std::uint32_t));
}

//! The segments of a receiver's `slots` local slots from a count round whose tail carries each
//! sender's entries per slot (`in.tail_width == slots`): `offsets[s]` = the entries of slots
//! before s, summed over the senders (slots + 1 values). Returns an empty string, or why the counts
//! cannot be used (a sender whose per-slot counts do not add up to its entries, a tail of
//! another width, a total past 32-bit offsets); `offsets` is then all zeros.
inline std::string slot_offsets_from(const device_counts& in, std::size_t slots, std::vector<std::int32_t>& offsets) {
  offsets.assign(slots + 1, 0);
  const std::size_t senders = in.entries.size();
  if (in.tail_width != slots || in.tail.size() != senders * slots)
    return ::locus::detail::concat("received a count round's tail of ", in.tail.size(), " counts (", in.tail_width,
                                   " per sender) for ", slots, " local slots and ", senders, " senders");
  for (std::size_t m = 0; m < senders; ++m) {
    std::uint64_t sum = 0;
    for (std::size_t s = 0; s < slots; ++s)
      sum += in.tail[m * slots + s];
    if (sum != in.entries[m])
      return ::locus::detail::concat("was announced ", in.entries[m], " entries by member ", m,
                                     " of the count round, whose entries per slot add up to ", sum);
  }
  std::uint64_t at = 0;
  for (std::size_t s = 0; s < slots; ++s) {
    for (std::size_t m = 0; m < senders; ++m)
      at += in.tail[m * slots + s];
    if (at > static_cast<std::uint64_t>(INT32_MAX)) {
      offsets.assign(slots + 1, 0);
      return ::locus::detail::concat("was announced more than ", INT32_MAX, " entries (past 32-bit offsets)");
    }
    offsets[s + 1] = static_cast<std::int32_t>(at);
  }
  return {};
}

//! Why a receiver cannot use segments (`offsets`, slots + 1 values) that give entries to a local
//! slot holding no expert (`slot_expert[s] == empty_slot`), or an empty string.
inline std::string entries_for_empty_slot(std::span<const std::int32_t> offsets,
                                          std::span<const expert_id> slot_expert) {
  for (std::size_t s = 0; s < slot_expert.size() && s + 1 < offsets.size(); ++s)
    if (slot_expert[s] == empty_slot && offsets[s + 1] != offsets[s])
      return ::locus::detail::concat("was sent ", offsets[s + 1] - offsets[s], " entries for its local slot ", s,
                                     ", which holds no expert");
  return {};
}

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
