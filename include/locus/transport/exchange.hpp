#pragma once
//! @file
//! The exchange layer every transport implements: rows of a fixed byte width go from each rank to
//! destination ranks, given per-destination row counts; each rank gets back the rows addressed to
//! it, grouped by source, with per-source counts. Combine is the same call in reverse (the received
//! counts become the send counts), which returns rows to their senders in their original order.
//!
//! An exchange runs over a *group* of ranks: the whole world, the ranks of one node (intra-node
//! fan-out of a hierarchical transport), or the rail of one local rank (the ranks with the same
//! local rank on every node, which carry the inter-node stage). Members of a group are numbered
//! 0..size-1: on a node by local rank, on a rail by node.
//!
//! Every exchange begins with a header round in which each member tells each other member its row
//! width, the exchange's name, how many rows it sends and whether its own input was valid. The name
//! is (step, index, stage): the step the caller last announced with the transport's `begin_step`,
//! the number of exchanges this member made over the group since then, and the caller's optional
//! `exchange_request::stage`. Every member sees every header, so disagreements (different row
//! widths, names that differ because a rank skipped, repeated or added an exchange or a step, invalid
//! input on one rank) raise locus::transport_error on *every* member, naming the ranks on each side,
//! instead of corrupting data; receiver-side expectations (`expected_counts`) add a second round so
//! that one rank's mismatch is raised by all. A member that does not arrive within the configured
//! timeout makes the others raise locus::timeout_error naming the ranks that did not arrive; the
//! transport is then unusable (every later call raises) because the group's messages are no longer
//! in step. The fault model (what each fault yields, within what time) is in docs/design.md.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/core/transport_kind.hpp>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! The ranks an exchange runs over.
enum class exchange_group : std::uint8_t {
  world, //!< every rank; member = rank
  node,  //!< the ranks of the caller's node; member = local rank
  rail,  //!< the ranks with the caller's local rank, one per node; member = node
};

inline const char* to_string(exchange_group g) noexcept {
  switch (g) {
  case exchange_group::world: return "world";
  case exchange_group::node: return "node";
  case exchange_group::rail: return "rail";
  }
  return "unknown";
}

//! The most ranks an in-process fabric (local_fabric, device_local_fabric) takes. Its world group
//! shares one board holding a header and row offsets for every (sender, receiver) pair, about 80
//! bytes each: 2048 ranks take about 340 MB, the topology's ceiling of 65536 ranks would take
//! 340 GB. Such ranks are threads (or streams) of one process, so a count beyond this is a mistake
//! to name, not a workload to allocate for.
inline constexpr std::size_t max_in_process_ranks = 2048;

//! Options shared by every transport.
struct exchange_options {
  //! How long a member waits for its peers in one exchange before raising locus::timeout_error.
  //! Every stage of an exchange (headers, count agreement, rows) ends by this deadline.
  std::chrono::milliseconds timeout{30000};
};

//! Bytes and rows a rank actually moved, per link class (same GPU, intra-node, inter-node).
struct link_counters {
  std::array<std::uint64_t, link_class_count> bytes_sent{};
  std::array<std::uint64_t, link_class_count> rows_sent{};
  std::array<std::uint64_t, link_class_count> bytes_received{};
  std::array<std::uint64_t, link_class_count> rows_received{};

  std::uint64_t sent(link_class c) const noexcept { return bytes_sent[static_cast<std::size_t>(c)]; }
  std::uint64_t received(link_class c) const noexcept { return bytes_received[static_cast<std::size_t>(c)]; }
  void clear() noexcept { *this = link_counters{}; }
  link_counters& operator+=(const link_counters& o) noexcept {
    for (std::size_t c = 0; c < link_class_count; ++c) {
      bytes_sent[c] += o.bytes_sent[c];
      rows_sent[c] += o.rows_sent[c];
      bytes_received[c] += o.bytes_received[c];
      rows_received[c] += o.rows_received[c];
    }
    return *this;
  }
};

//! One member's input to an exchange.
struct exchange_request {
  exchange_group group = exchange_group::world;
  std::size_t row_bytes = 0;           //!< width of every row, equal on all members
  std::span<const std::byte> rows;     //!< rows ordered by destination member
  std::span<const std::size_t> counts; //!< rows per destination member (size = group size)
  //! Optional: rows this member expects from each source member (size = group size). A mismatch
  //! raises locus::transport_error on every member of the group.
  std::span<const std::size_t> expected_counts;
  //! Optional name of this exchange within a step (for example dispatch = 1, combine = 2), equal on
  //! all members. With it a rank that skips one exchange of a step is caught at that very exchange;
  //! without it, at its next exchange after the step's end (see `begin_step` of the transports).
  std::uint32_t stage = 0;
  //! Optional entries that travel with the rows, in the same message as the exchange's name (a
  //! dispatch's fan-out table): `entry_counts[m]` items of `entry_bytes` each to member m, ordered by
  //! destination member like the rows. Zero `entry_bytes`: none.
  std::size_t entry_bytes = 0;
  std::span<const std::byte> entries{};
  std::span<const std::size_t> entry_counts{};
  //! Rows (and entries) this member sends itself but keeps where they are, read in place by the
  //! caller instead of being copied: not part of `rows`, `counts` or `entries`, but counted in
  //! bytes() as moved over the same-GPU link, as the traffic model counts a copy that stays on its
  //! GPU.
  std::size_t kept_rows = 0, kept_entries = 0;
  //! Optional: a value every member must give alike, else every member raises
  //! locus::transport_error (the dispatchers give step_agreement of their expert map and layer,
  //! so that ranks stepping with different maps, or different layers, raise instead of routing
  //! rows by two maps or into another layer's experts). 0: none.
  std::uint64_t agreement = 0;
  //! Set by a member that leaves a step whose earlier exchange failed on it, to meet the members
  //! still waiting in this exchange with no request: every member raises at once (they would wait
  //! out the timeout for it). Nothing else of the request is read.
  bool abandoned = false;

  //! 1 when this member checks expected counts (everyone then runs the second round).
  std::uint32_t expectations_flag() const noexcept { return expected_counts.empty() ? 0u : 1u; }
};

//! What an exchange delivered to one member. Reused between calls to keep its capacity.
struct exchange_result {
  std::vector<std::byte> rows;      //!< received rows, grouped by source member in member order
  std::vector<std::size_t> counts;  //!< rows from each source member
  std::vector<std::size_t> offsets; //!< first row of each source member (size = group size + 1)
  std::size_t row_bytes = 0;
  //! Received entries (exchange_request::entries), grouped by source member like the rows.
  std::vector<std::byte> entries;
  std::vector<std::size_t> entry_counts;  //!< entries from each source member
  std::vector<std::size_t> entry_offsets; //!< first entry of each source member (size = group size + 1)
  std::size_t entry_bytes = 0;

  std::size_t row_count() const noexcept { return offsets.empty() ? 0 : offsets.back(); }
  const std::byte* row(std::size_t i) const noexcept { return rows.data() + i * row_bytes; }
  std::byte* row(std::size_t i) noexcept { return rows.data() + i * row_bytes; }
  std::size_t entry_count() const noexcept { return entry_offsets.empty() ? 0 : entry_offsets.back(); }
  const std::byte* entry(std::size_t i) const noexcept { return entries.data() + i * entry_bytes; }
  std::byte* entry(std::size_t i) noexcept { return entries.data() + i * entry_bytes; }
};

//! A host object that moves rows between ranks: what dispatch and combine are written against.
//! `exchange` is collective over the group; `bytes()` accumulates what this rank moved.
template <class T>
concept exchanger = requires(T& t, const T& ct, const exchange_request& req, exchange_result& out, exchange_group g,
                             std::size_t m) {
  { ct.rank() } -> std::convertible_to<std::size_t>;
  { ct.topology() } -> std::convertible_to<dynamic_topology>;
  { ct.group_size(g) } -> std::convertible_to<std::size_t>;
  { ct.world_rank_of(g, m) } -> std::convertible_to<std::size_t>;
  { ct.hierarchical() } -> std::convertible_to<bool>;
  { ct.bytes() } -> std::convertible_to<const link_counters&>;
  t.reset_bytes();
  t.exchange(req, out);
};

//! The agreement of a dispatcher's exchanges (exchange_request::agreement): its expert map's
//! fingerprint mixed with the index of the layer it serves, so that ranks stepping two layers of
//! one map in different orders raise instead of exchanging one layer's rows as the other's, and
//! with where the routing weights apply (a receiver applies them: ranks that disagree would
//! weight each other's tokens at different sites). Never 0 (0: no agreement).
inline std::uint64_t step_agreement(std::uint64_t map_fingerprint, std::uint64_t layer_index,
                                    weight_site site = weight_site::expert_output) noexcept {
  std::uint64_t z = layer_index + 0x9e3779b97f4a7c15ull; // splitmix64's finaliser: nearby indices far apart
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const std::uint64_t a = map_fingerprint ^ z ^ (site == weight_site::expert_input ? 0x5bd1e9955bd1e995ull : 0);
  return a == 0 ? 1 : a;
}

//! An exchanger that moves exchange_request::entries with the rows (`T::carries_entries`).
template <class T>
concept carries_entries = exchanger<T> && requires {
  requires T::carries_entries;
};

//! One exchange of rows with their entries: a single exchange where the exchanger carries entries,
//! else the rows, then the entries as rows of their own width (through `scratch`).
template <exchanger E>
void exchange_with_entries(E& ex, const exchange_request& req, exchange_result& out, exchange_result& scratch) {
  if constexpr (carries_entries<E>) {
    ex.exchange(req, out);
  } else {
    exchange_request rows = req;
    rows.entry_bytes = 0;
    rows.entries = {};
    rows.entry_counts = {};
    rows.kept_entries = 0;
    ex.exchange(rows, out);
    exchange_request entries{req.group, req.entry_bytes, req.entries, req.entry_counts, {}, req.stage};
    entries.kept_rows = req.kept_entries;
    ex.exchange(entries, scratch);
    std::swap(out.entries, scratch.rows);
    std::swap(out.entry_counts, scratch.counts);
    std::swap(out.entry_offsets, scratch.offsets);
    out.entry_bytes = req.entry_bytes;
  }
}

//! A transport policy: a tag type naming its host object (`exchanger_type`) and how dispatch over
//! it moves copies (`kind`: flat or hierarchical).
template <class P>
concept transport = transport_policy<P> && requires {
  typename P::exchanger_type;
  { P::kind } -> std::convertible_to<transport_kind>;
};

namespace detail::exchange {

//! Group membership from the topology: the same numbering for every transport.
struct group_map {
  dynamic_topology topo;
  std::size_t rank;

  std::size_t size(exchange_group g) const noexcept {
    switch (g) {
    case exchange_group::node: return topo.gpus_per_node();
    case exchange_group::rail: return topo.nodes();
    default: return topo.ranks();
    }
  }
  std::size_t self_member(exchange_group g) const noexcept {
    switch (g) {
    case exchange_group::node: return rank % topo.gpus_per_node();
    case exchange_group::rail: return rank / topo.gpus_per_node();
    default: return rank;
    }
  }
  std::size_t world_rank_of(exchange_group g, std::size_t m) const noexcept {
    switch (g) {
    case exchange_group::node: return (rank / topo.gpus_per_node()) * topo.gpus_per_node() + m;
    case exchange_group::rail: return m * topo.gpus_per_node() + rank % topo.gpus_per_node();
    default: return m;
    }
  }
};

//! World ranks of the members of `rank`'s instance of group `g`, in member order: what a transport
//! that shares one board per group instance (the local transports) builds its boards from.
inline std::vector<std::size_t> group_ranks(const dynamic_topology& topo, exchange_group g, std::size_t rank) {
  const group_map map{topo, rank};
  std::vector<std::size_t> ranks(map.size(g));
  for (std::size_t m = 0; m < ranks.size(); ++m)
    ranks[m] = map.world_rank_of(g, m);
  return ranks;
}

//! One Board per instance of every exchange group of a topology (the world, each node, each rail),
//! built from the instance's world ranks: the shared state of an in-process fabric, whose ranks
//! meet on their group instance's board.
template <class Board>
class group_boards {
public:
  //! @param fabric the fabric's name, for the message
  //! @throws locus::config_error when `topo` has more than max_in_process_ranks ranks (before
  //!         anything is allocated)
  group_boards(const dynamic_topology& topo, const char* fabric) : topo_(topo) {
    LOCUS_REQUIRE(topo.ranks() <= max_in_process_ranks, config_error, fabric, ": ", topo.nodes(), " nodes × ",
                  topo.gpus_per_node(), " GPUs per node = ", topo.ranks(), " ranks exceed the limit of ",
                  max_in_process_ranks, " ranks in one process (its exchange tables grow as ranks², about ",
                  static_cast<double>(
                      std::llround(8e-7 * static_cast<double>(topo.ranks()) * static_cast<double>(topo.ranks()))) /
                      10,
                  " GB here)");
    world_ = std::make_unique<Board>(group_ranks(topo, exchange_group::world, 0));
    for (std::size_t n = 0; n < topo.nodes(); ++n)
      nodes_.push_back(std::make_unique<Board>(group_ranks(topo, exchange_group::node, n * topo.gpus_per_node())));
    for (std::size_t l = 0; l < topo.gpus_per_node(); ++l)
      rails_.push_back(std::make_unique<Board>(group_ranks(topo, exchange_group::rail, l)));
  }

  //! The board of `rank`'s instance of group `g`.
  Board& of(exchange_group g, std::size_t rank) {
    switch (g) {
    case exchange_group::node: return *nodes_[topo_.node_of(rank)];
    case exchange_group::rail: return *rails_[topo_.local_rank_of(rank)];
    default: return *world_;
    }
  }

private:
  dynamic_topology topo_;
  std::unique_ptr<Board> world_; // boards hold mutexes and atomics: they stay where they were built
  std::vector<std::unique_ptr<Board>> nodes_, rails_;
};

//! What every in-process fabric (local_fabric, device_local_fabric) holds: its topology, how
//! dispatch over it moves copies, its options, and the boards its ranks meet on.
template <class Board>
class fabric_state {
public:
  fabric_state(const dynamic_topology& topo, transport_kind kind, exchange_options options, const char* name)
      : topo_(topo), kind_(kind), options_(options), boards_(topo, name) {}
  fabric_state(const fabric_state&) = delete;
  fabric_state& operator=(const fabric_state&) = delete;

  const dynamic_topology& topology() const noexcept { return topo_; }
  transport_kind kind() const noexcept { return kind_; }
  bool hierarchical() const noexcept { return kind_ == transport_kind::hierarchical; }
  const exchange_options& options() const noexcept { return options_; }

protected:
  //! The board of `rank`'s instance of group `g` (for the fabric's endpoints).
  Board& board(exchange_group g, std::size_t rank) { return boards_.of(g, rank); }

private:
  dynamic_topology topo_;
  transport_kind kind_;
  exchange_options options_;
  group_boards<Board> boards_;
};

//! The header one member sends to each other member before the rows.
struct header {
  std::uint64_t step = 0;  //!< the step the sender last announced (begin_step)
  std::uint64_t index = 0; //!< exchanges the sender made over this group since then
  std::uint64_t row_bytes = 0;
  std::uint64_t count = 0;
  std::uint32_t stage = 0;        //!< exchange_request::stage
  std::uint32_t status = 0;       //!< 0: valid input; otherwise a local_problem code
  std::uint32_t expectations = 0; //!< 1 when the sender checks expected counts (second round)
  std::uint32_t tail = 0;         //!< a device count round's counts per member beyond rows and entries
  std::uint64_t entry_bytes = 0;  //!< width of the entries that travel with the rows (0: none)
  std::uint64_t entries = 0;      //!< entries to the receiver
  std::uint64_t agreement = 0;    //!< exchange_request::agreement
};

//! Where one member stands: the name of the exchange it is in.
struct position {
  std::uint64_t step = 0, index = 0;
  std::uint32_t stage = 0;
  friend bool operator==(const position&, const position&) = default;
};
inline position position_of(const header& h) noexcept { return {h.step, h.index, h.stage}; }

inline std::string describe(const position& p) {
  return ::locus::detail::concat("step ", p.step, " exchange #", p.index, p.stage ? " (stage " : "",
                                 p.stage ? std::to_string(p.stage) + ")" : std::string());
}

//! "rank 3" or "ranks 0, 1, 2".
inline std::string rank_list(std::span<const std::size_t> ranks) {
  std::string out = ranks.size() == 1 ? "rank " : "ranks ";
  for (std::size_t i = 0; i < ranks.size(); ++i)
    out += (i ? ", " : "") + std::to_string(ranks[i]);
  return out;
}

//! Per-group counters of one member: the step it announced, exchanges since, and every exchange
//! it ever made (which transports use to keep the messages of consecutive exchanges apart).
struct step_counter {
  std::uint64_t step = 0;
  std::array<std::uint64_t, 3> index{}, calls{};

  void begin(std::uint64_t s) noexcept {
    step = s;
    index = {};
  }
  //! The position of the next exchange over `g`; advances the counters.
  position next(exchange_group g, std::uint32_t stage) noexcept {
    const auto i = static_cast<std::size_t>(g);
    ++calls[i];
    return {step, index[i]++, stage};
  }
};

//! What every transport endpoint keeps of its place and its traffic (its groups, the bytes it
//! moved, the exchanges it made), with the accessors the `exchanger` concept asks for.
class endpoint_state {
public:
  std::size_t rank() const noexcept { return groups_.rank; }
  const dynamic_topology& topology() const noexcept { return groups_.topo; }
  std::size_t group_size(exchange_group g) const noexcept { return groups_.size(g); }
  std::size_t world_rank_of(exchange_group g, std::size_t member) const noexcept {
    return groups_.world_rank_of(g, member);
  }
  const link_counters& bytes() const noexcept { return bytes_; }
  void reset_bytes() noexcept { bytes_.clear(); }

  //! Names the exchanges that follow (until the next call) as exchanges of step `step`: a rank that
  //! skipped, repeated or added an exchange or a step is caught on every member at its next
  //! exchange that compares names (a header round; the one-GPU transport's known-count ones too).
  void begin_step(std::uint64_t step) noexcept { steps_.begin(step); }

  //! 0 for the first layer made on this endpoint, then 1, 2, ...: a layer's default index
  //! (moe_layer::set_layer_index), alike on every rank that makes its layers in the same order.
  std::uint64_t next_layer_ordinal() noexcept { return layers_made_++; }

protected:
  endpoint_state(const dynamic_topology& topo, std::size_t rank) : groups_{topo, rank} {}

  group_map groups_;
  link_counters bytes_;
  step_counter steps_;
  std::uint64_t layers_made_ = 0;
};

enum local_problem : std::uint32_t {
  ok = 0,
  counts_size = 1,
  rows_size = 2,
  zero_width = 3,
  expected_size = 4,
  entry_counts_size = 5,
  entries_size = 6,
  malformed = 7,    //!< set by a receiver: the message did not hold what its header announced
  tail_size = 8,    //!< a count round's tail that is not `tail` counts per member
  abandoned = 9,    //!< exchange_request::abandoned: the member left the step
  too_large = 10,   //!< more rows or bytes than the transport sends in one message
  overlapping = 11, //!< a send buffer inside the result the exchange writes
};

inline const char* describe(std::uint32_t p) {
  switch (p) {
  case counts_size: return "a per-destination count array whose size is not the group size";
  case rows_size: return "a send buffer whose size is not the sum of the counts times the row width";
  case zero_width: return "a row width of zero";
  case expected_size: return "an expected-count array whose size is not the group size";
  case entry_counts_size: return "a per-destination entry count array whose size is not the group size";
  case entries_size: return "an entry buffer whose size is not the sum of the entry counts times the entry width";
  case malformed: return "a message that does not hold what its header announces";
  case tail_size: return "a count round's tail whose size is not the group size times its width";
  case abandoned: return "no request: it left the step after an earlier exchange of the step failed there";
  case too_large: return "more rows or bytes than the transport sends in one message";
  case overlapping: return "a send buffer that lies in the buffer the exchange receives into";
  default: return "an invalid request";
  }
}

//! Whether [p, p + n) and the storage `v` holds (all of its capacity, which a resize may reuse or
//! free) overlap.
inline bool overlaps(std::span<const std::byte> p, const std::vector<std::byte>& v) noexcept {
  if (p.empty() || v.capacity() == 0) return false;
  const auto a = reinterpret_cast<std::uintptr_t>(p.data()), b = reinterpret_cast<std::uintptr_t>(v.data());
  return a < b + v.capacity() && b < a + p.size();
}

//! Validates one member's request; returns the problem code and fills `why` with the details.
//! `out`, when given, is the result the exchange writes: a request that sends from it is refused
//! (receiving into the buffer a send still reads, or reallocating it, corrupts the rows).
inline std::uint32_t check_request(const exchange_request& req, std::size_t members, std::string& why,
                                   const exchange_result* out = nullptr) {
  if (req.abandoned) {
    why = "this rank left the step after an earlier exchange of the step failed";
    return abandoned;
  }
  if (req.row_bytes == 0) {
    why = "the row width is zero";
    return zero_width;
  }
  if (req.counts.size() != members) {
    why = ::locus::detail::concat("counts has ", req.counts.size(), " entries but the ", to_string(req.group),
                                  " group has ", members, " members");
    return counts_size;
  }
  if (!req.expected_counts.empty() && req.expected_counts.size() != members) {
    why = ::locus::detail::concat("expected_counts has ", req.expected_counts.size(), " entries but the ",
                                  to_string(req.group), " group has ", members, " members");
    return expected_size;
  }
  // Summed and multiplied without wrapping: counts of 2^63 to two members add up to 0 rows, which
  // an empty buffer matched, and each receiver was then told to expect 2^63 rows.
  std::size_t total = 0;
  bool fits = true;
  for (std::size_t c : req.counts) {
    fits &= c <= SIZE_MAX - total;
    total += c;
  }
  if (!fits || total > req.rows.size() / req.row_bytes || total * req.row_bytes != req.rows.size()) {
    why = fits ? ::locus::detail::concat("the counts add up to ", total, " rows of ", req.row_bytes,
                                         " bytes but the send buffer holds ", req.rows.size(), " bytes")
               : std::string("the counts add up to more than 2^64 - 1 rows");
    return rows_size;
  }
  if (req.entry_bytes == 0 ? !req.entry_counts.empty() : req.entry_counts.size() != members) {
    why = ::locus::detail::concat("entry_counts has ", req.entry_counts.size(), " entries but ",
                                  req.entry_bytes ? "the " : "entries of zero width need none; the ",
                                  to_string(req.group), " group has ", members, " members");
    return entry_counts_size;
  }
  std::size_t entries = 0;
  fits = true;
  for (std::size_t c : req.entry_counts) {
    fits &= c <= SIZE_MAX - entries;
    entries += c;
  }
  if (!fits || (req.entry_bytes != 0 && entries > req.entries.size() / req.entry_bytes) ||
      entries * req.entry_bytes != req.entries.size()) {
    why = fits ? ::locus::detail::concat("the entry counts add up to ", entries, " entries of ", req.entry_bytes,
                                         " bytes but the entry buffer holds ", req.entries.size(), " bytes")
               : std::string("the entry counts add up to more than 2^64 - 1 entries");
    return entries_size;
  }
  if (out && (overlaps(req.rows, out->rows) || overlaps(req.entries, out->entries) ||
              overlaps(req.rows, out->entries) || overlaps(req.entries, out->rows))) {
    why = "the request sends from the exchange_result it receives into (copy the rows out first, or receive into "
          "another result)";
    return overlapping;
  }
  return ok;
}

//! Empty when every member of a group is at the same exchange (`at[m]`: member m's position,
//! `world[m]` its world rank); otherwise which ranks are at which exchange, in member order of
//! first appearance.
inline std::string out_of_step(std::span<const position> at, std::span<const std::size_t> world) {
  std::vector<std::pair<position, std::vector<std::size_t>>> by;
  for (std::size_t m = 0; m < at.size(); ++m) {
    auto it = std::find_if(by.begin(), by.end(), [&](const auto& e) { return e.first == at[m]; });
    if (it == by.end()) it = by.insert(by.end(), {at[m], {}});
    it->second.push_back(world[m]);
  }
  if (by.size() <= 1) return {};
  std::string why;
  for (std::size_t i = 0; i < by.size(); ++i)
    why += ::locus::detail::concat(i ? "; " : "", rank_list(by[i].second), by[i].second.size() == 1 ? " is" : " are",
                                   " at ", describe(by[i].first));
  return why + " (a rank skipped, repeated or added an exchange or a step)";
}

//! The verdict every member reaches from the same set of headers (`received[m]` is the header
//! member m sent to this member; all members see the same names, widths and status values).
//! Returns an empty string when the exchange may proceed.
inline std::string verdict(std::span<const header> received, const group_map& groups, exchange_group g,
                           const std::string& own_problem) {
  const std::size_t self = groups.self_member(g);
  const auto where = [&] { return ::locus::detail::concat("exchange over the ", to_string(g), " group: "); };
  for (std::size_t m = 0; m < received.size(); ++m) {
    if (received[m].status != ok) {
      if (m == self && !own_problem.empty())
        return ::locus::detail::concat(where(), "this rank's request is invalid: ", own_problem);
      return ::locus::detail::concat(where(), "rank ", groups.world_rank_of(g, m), " passed ",
                                     describe(received[m].status));
    }
  }
  std::vector<position> at(received.size());
  std::vector<std::size_t> world(received.size());
  for (std::size_t m = 0; m < received.size(); ++m) {
    at[m] = position_of(received[m]);
    world[m] = groups.world_rank_of(g, m);
  }
  if (std::string why = out_of_step(at, world); !why.empty()) return where() + why;
  for (std::size_t m = 1; m < received.size(); ++m)
    if (received[m].row_bytes != received[0].row_bytes)
      return ::locus::detail::concat(where(), "rank ", groups.world_rank_of(g, 0), " sends rows of ",
                                     received[0].row_bytes, " bytes but rank ", groups.world_rank_of(g, m),
                                     " sends rows of ", received[m].row_bytes, " bytes");
  for (std::size_t m = 1; m < received.size(); ++m)
    if (received[m].entry_bytes != received[0].entry_bytes)
      return ::locus::detail::concat(where(), "rank ", groups.world_rank_of(g, 0), " sends entries of ",
                                     received[0].entry_bytes, " bytes but rank ", groups.world_rank_of(g, m),
                                     " sends entries of ", received[m].entry_bytes, " bytes");
  for (std::size_t m = 1; m < received.size(); ++m)
    if (received[m].agreement != received[0].agreement)
      return ::locus::detail::concat(where(), "rank ", groups.world_rank_of(g, 0), " and rank ",
                                     groups.world_rank_of(g, m),
                                     " step with different expert maps, step different layers, apply the "
                                     "routing weights at different sites or combine different dispatches "
                                     "(agreement values ",
                                     received[0].agreement, " and ", received[m].agreement,
                                     "; 0: none): every rank must step its layers in the same order, each "
                                     "with the same map, layer index and weight site as the others (by default "
                                     "the index is the order its layers were made in, the site the router's), "
                                     "and combine its dispatches in the same order");
  for (std::size_t m = 1; m < received.size(); ++m)
    if (received[m].tail != received[0].tail)
      return ::locus::detail::concat(where(), "rank ", groups.world_rank_of(g, 0), " sends ", received[0].tail,
                                     " tail counts per member but rank ", groups.world_rank_of(g, m), " sends ",
                                     received[m].tail);
  return {};
}

//! The header to member `m` of a request whose check gave `status`.
//! `tail`: the counts per member a device count round carries beyond rows and entries.
inline header header_to(const position& at, const exchange_request& req, std::uint32_t status, std::size_t m,
                        std::uint32_t tail = 0) {
  const bool ok_ = status == ok;
  return {at.step,
          at.index,
          req.row_bytes,
          ok_ ? req.counts[m] : 0,
          at.stage,
          status,
          req.expectations_flag(),
          tail,
          ok_ ? req.entry_bytes : 0,
          ok_ && req.entry_bytes ? req.entry_counts[m] : 0,
          req.agreement};
}

//! Receiver-side check of `expected_counts`: the code sent in the second round (0 = agrees,
//! otherwise 1 + the first source member whose count differs).
inline std::uint32_t expectation_code(std::span<const header> received, std::span<const std::size_t> expected) {
  if (expected.empty()) return 0;
  for (std::size_t m = 0; m < received.size(); ++m)
    if (received[m].count != expected[m]) return static_cast<std::uint32_t>(m + 1);
  return 0;
}

//! Message for a failed second round: the first member (in member order) that reported a mismatch.
inline std::string expectation_verdict(std::span<const std::uint32_t> codes, const group_map& groups, exchange_group g,
                                       std::span<const header> received, std::span<const std::size_t> expected) {
  for (std::size_t m = 0; m < codes.size(); ++m) {
    if (codes[m] == 0) continue;
    const std::size_t src = codes[m] - 1;
    if (m == groups.self_member(g))
      return ::locus::detail::concat("exchange over the ", to_string(g), " group: rank ", groups.world_rank_of(g, src),
                                     " sends ", received[src].count, " rows to this rank (", groups.world_rank_of(g, m),
                                     ") but ", expected[src], " were expected");
    return ::locus::detail::concat("exchange over the ", to_string(g), " group: rank ", groups.world_rank_of(g, m),
                                   " received a row count from rank ", groups.world_rank_of(g, src),
                                   " that differs from the count it expected");
  }
  return {};
}

//! Fills `out`'s counts and offsets from the received headers and sizes its row buffer.
inline void shape_result(std::span<const header> received, std::size_t row_bytes, exchange_result& out) {
  out.row_bytes = row_bytes;
  out.counts.resize(received.size());
  out.offsets.resize(received.size() + 1);
  out.offsets[0] = 0;
  for (std::size_t m = 0; m < received.size(); ++m) {
    out.counts[m] = static_cast<std::size_t>(received[m].count);
    out.offsets[m + 1] = out.offsets[m] + out.counts[m];
  }
  out.rows.resize(out.offsets.back() * row_bytes);
  out.entry_bytes = received.empty() ? 0 : static_cast<std::size_t>(received[0].entry_bytes);
  out.entry_counts.resize(received.size());
  out.entry_offsets.resize(received.size() + 1);
  out.entry_offsets[0] = 0;
  for (std::size_t m = 0; m < received.size(); ++m) {
    out.entry_counts[m] = static_cast<std::size_t>(received[m].entries);
    out.entry_offsets[m + 1] = out.entry_offsets[m] + out.entry_counts[m];
  }
  out.entries.resize(out.entry_offsets.back() * out.entry_bytes);
}

//! Adds the rows and entries a rank kept for itself (read in place, never moved) to its same-GPU
//! counters, so that measured bytes equal the traffic model's.
inline void count_kept(link_counters& c, const exchange_request& req) {
  const auto same = static_cast<std::size_t>(link_class::same_gpu);
  const std::uint64_t kept = req.kept_rows * req.row_bytes + req.kept_entries * req.entry_bytes;
  c.rows_sent[same] += req.kept_rows;
  c.rows_received[same] += req.kept_rows;
  c.bytes_sent[same] += kept;
  c.bytes_received[same] += kept;
}

//! Adds one finished exchange to the counters.
template <class MemberToRank>
void count_bytes(link_counters& c, const dynamic_topology& topo, std::size_t self, const exchange_request& req,
                 const exchange_result& out, MemberToRank&& world_rank_of) {
  for (std::size_t m = 0; m < req.counts.size(); ++m) {
    const std::size_t peer = world_rank_of(m);
    const auto cls = static_cast<std::size_t>(topo.link(self, peer));
    c.rows_sent[cls] += req.counts[m];
    c.bytes_sent[cls] += req.counts[m] * req.row_bytes;
    c.rows_received[cls] += out.counts[m];
    c.bytes_received[cls] += out.counts[m] * req.row_bytes;
    if (req.entry_bytes) c.bytes_sent[cls] += req.entry_counts[m] * req.entry_bytes;
    if (out.entry_bytes) c.bytes_received[cls] += out.entry_counts[m] * out.entry_bytes;
  }
  count_kept(c, req);
}

} // namespace detail::exchange

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
