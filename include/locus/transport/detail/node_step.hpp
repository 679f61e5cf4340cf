#pragma once
//! @file
//! One rank's hierarchical device step (`transport/device_dispatch.hpp`), written as host count
//! arithmetic and stage bodies that the CUDA kernels run and the CPU tests run through
//! `stage::run_grid`, so that a CPU-only build checks the index arithmetic the GPU executes.
//!
//! The step (rank `self` on node n, local rank l, G GPUs per node):
//! - its node layout sends one row per (token, remote node) to the rail peer there (the rank with
//!   local rank l) and one row per (token, rank) inside node n; in layout order the rows of the
//!   rail peers on nodes before n come first, then node n's block (per local rank), then the rail
//!   peers on later nodes;
//! - **one count round** (world group) tells every rank every size of the step: besides the rows
//!   and entries it sends each rank first-hand, a rank's tail to rank q carries its entries for
//!   each local slot of q and the rows of its that reach q (through q's node), and, to its rail
//!   peers, the rows and entries each of them forwards to every rank of its node
//!   (`round_message`, `counts_from`);
//! - rail stage: the rows outside node n's block, with their entries (target, slot, weight), to the
//!   rail peers; each rail peer fans them out by target on the device (stage::fanout_*), checked
//!   against what the count round announced (`fanout_check`);
//! - node stage: to each local rank g its own rows for g, then the rail rows it forwards to g
//!   (itself included), with their entries (slot, weight): the receiver builds its receive layout
//!   from them on the device, as the flat step does;
//! - combine goes back the same way: each rail peer sums what its node returned for each rail row
//!   (`forward_count`, `forward_place`, then the weighted row reduction with unit weights) before
//!   the rail stage back; the layout's rows are gathered in layout order (`return_index`).
//!
//! Every position a device body computes comes from the count round's tables (host) and the
//! device arrays: nothing is read back, so the step waits only for its layout's counts and the
//! count round.

#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <span>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::node_step {

using stage::grid_index;

//! One entry as it travels with a rail row: the local rank it is for on the receiving node, its
//! slot there and its weight.
struct node_entry {
  std::int32_t target;
  std::int32_t slot;
  float weight;
};
static_assert(sizeof(node_entry) == 12);

//! The forwarding check's bit for a step whose offsets do not fit in 32 bits (its tables are
//! zero): set before the step's bodies run, beside stage.hpp's bad_* bits.
inline constexpr std::int32_t past_32_bits = 16;

//! @name Host: the count round
//! @{

//! Tail counts per member of a hierarchical count round: entries per slot (`slots`), rows that
//! reach the member, then for a rail peer (rows, entries) forwarded to each of its node's `gpus`.
inline std::size_t tail_width(std::size_t slots, std::size_t gpus) { return slots + 1 + 2 * gpus; }

//! A node layout's counts as the host holds them after its count read.
struct layout_counts {
  std::span<const std::int32_t> rank_offsets;       //!< rows per send rank (ranks + 1 offsets)
  std::span<const std::int32_t> rank_entry_offsets; //!< entries per send rank (ranks + 1 offsets)
  std::span<const std::int32_t> slot_counts;        //!< entries per (final rank, slot): ranks × slots
  std::span<const std::int32_t> reach;              //!< rows carrying an entry for each final rank
};

//! The count round's message of rank `self`: rows and entries it sends each rank first-hand (the
//! layout's per-send-rank counts: its node's ranks and its rail peers), and the tail
//! (`tail_width` counts per rank, destination-major).
inline void round_message(const layout_counts& c, std::size_t gpus, std::size_t self, std::size_t slots,
                          std::vector<std::size_t>& rows, std::vector<std::size_t>& entries,
                          std::vector<std::uint32_t>& tail) {
  const std::size_t R = c.rank_offsets.size() - 1, W = tail_width(slots, gpus);
  rows.resize(R);
  entries.resize(R);
  tail.assign(R * W, 0);
  const auto entries_of = [&](std::size_t d) {
    std::uint64_t e = 0;
    for (std::size_t s = 0; s < slots; ++s)
      e += static_cast<std::uint32_t>(c.slot_counts[d * slots + s]);
    return static_cast<std::uint32_t>(e);
  };
  for (std::size_t q = 0; q < R; ++q) {
    rows[q] = static_cast<std::size_t>(c.rank_offsets[q + 1] - c.rank_offsets[q]);
    entries[q] = static_cast<std::size_t>(c.rank_entry_offsets[q + 1] - c.rank_entry_offsets[q]);
    std::uint32_t* t = tail.data() + q * W;
    for (std::size_t s = 0; s < slots; ++s)
      t[s] = static_cast<std::uint32_t>(c.slot_counts[q * slots + s]);
    t[slots] = static_cast<std::uint32_t>(c.reach[q]);
    if (q / gpus != self / gpus && q % gpus == self % gpus) // a rail peer: what it forwards
      for (std::size_t g = 0; g < gpus; ++g) {
        const std::size_t d = q / gpus * gpus + g;
        t[slots + 1 + 2 * g] = static_cast<std::uint32_t>(c.reach[d]);
        t[slots + 2 + 2 * g] = entries_of(d);
      }
  }
}

//! The device tables of a step: (gpus + 1) offsets each, in this order (`step_counts::tables`).
enum table : std::size_t {
  own_row,       //!< the layout's first row for each local rank of this node (absolute)
  own_entry,     //!< the layout's first entry for each local rank of this node (absolute)
  forward_row,   //!< the fan-out's first row for each target
  forward_entry, //!< the fan-out's first entry for each target
  node_row,      //!< the node stage's first send row for each local rank
  node_entry_at, //!< the node stage's first send entry for each local rank
  table_count
};

//! Every size of one rank's step, from its layout and the count round.
struct step_counts {
  std::vector<std::size_t> rail_send, rail_send_entries, rail_recv, rail_recv_entries; //!< per node
  std::vector<std::size_t> node_send, node_send_entries, node_recv, node_recv_entries; //!< per local rank
  std::vector<std::int32_t> slot_offsets; //!< the local slots' segments (slots + 1)
  std::vector<std::int32_t> tables;       //!< table_count × (gpus + 1), see `table`
  std::size_t rail_in = 0, rail_in_entries = 0, node_out = 0, node_out_entries = 0, node_in = 0, node_in_entries = 0;
  //! false: the round could not be read at all (a tail of another width): no sizes
  bool sized = true;
  //! false: the step is past 32-bit offsets, so the tables are zero and the device must not index
  //! by them (the dispatcher then starts its forwarding check failed: every body takes its guarded
  //! branch)
  bool indexable = true;
};

//! The sizes of rank `self`'s step from its layout counts and the count round it received
//! (`round`: per source rank its first-hand rows and entries, and its tail). Returns an empty
//! string, or why the round cannot be used for this rank's expert compute (first-hand counts that
//! disagree with the same sender's tail, a rail peer's tail that disagrees with itself, per-slot
//! counts past 32-bit offsets; `sized` false: a tail of another width, which leaves no sizes at
//! all): the caller then refuses only its own segments (`slot_offsets` all zero) and still runs
//! the step's exchanges with these sizes. Those of the rail stage and of first-hand rows are the
//! ones the senders use (the same messages); the node stage's rows forwarded from a rail peer to
//! another rank of its node are sized from two messages of the rail peer's source (its forwards
//! to the rail peer, its reach to the receiver), which an honest sender writes from the same
//! counts: a sender whose two disagree makes the two sides' sizes differ (the one-GPU transport
//! raises on the receiver, NCCL reaches its timeout). For its own self-exchange the rank keeps
//! the two sides equal whatever it refuses.
inline std::string counts_from(const layout_counts& c, const device_counts& round, std::size_t gpus, std::size_t self,
                               std::size_t slots, step_counts& out) {
  const std::size_t R = c.rank_offsets.size() - 1, G = gpus, N = R / G, n = self / G, l = self % G;
  const std::size_t W = tail_width(slots, G);
  out.rail_send.assign(N, 0);
  out.rail_send_entries.assign(N, 0);
  out.rail_recv.assign(N, 0);
  out.rail_recv_entries.assign(N, 0);
  out.node_send.assign(G, 0);
  out.node_send_entries.assign(G, 0);
  out.node_recv.assign(G, 0);
  out.node_recv_entries.assign(G, 0);
  out.slot_offsets.assign(slots + 1, 0);
  out.tables.assign(table_count * (G + 1), 0);
  out.rail_in = out.rail_in_entries = out.node_out = out.node_out_entries = out.node_in = out.node_in_entries = 0;
  out.sized = out.indexable = true;
  if (round.tail_width != W || round.tail.size() != R * W || round.rows.size() != R || round.entries.size() != R) {
    out.sized = out.indexable = false;
    return ::locus::detail::concat("received a count round of ", round.rows.size(), " members with ", round.tail_width,
                                   " tail counts each; a hierarchical step over ", R, " ranks with ", slots,
                                   " slots and ", G, " GPUs per node needs ", W);
  }
  const auto T = [&](std::size_t s, std::size_t i) -> std::uint64_t { return round.tail[s * W + i]; };
  const auto slot_sum = [&](std::size_t s) {
    std::uint64_t e = 0;
    for (std::size_t i = 0; i < slots; ++i)
      e += T(s, i);
    return e;
  };
  std::string why;
  const auto refuse = [&](auto&&... what) {
    if (why.empty()) why = ::locus::detail::concat(what...);
  };
  const auto at = [&](table t, std::size_t g) -> std::int32_t& { return out.tables[t * (G + 1) + g]; };
  std::vector<std::uint64_t> fwd_rows(G, 0), fwd_entries(G, 0);
  for (std::size_t m = 0; m < N; ++m) {
    if (m == n) continue;
    const std::size_t peer = m * G + l;
    out.rail_send[m] = static_cast<std::size_t>(c.rank_offsets[peer + 1] - c.rank_offsets[peer]);
    out.rail_send_entries[m] = static_cast<std::size_t>(c.rank_entry_offsets[peer + 1] - c.rank_entry_offsets[peer]);
    out.rail_recv[m] = round.rows[peer];
    out.rail_recv_entries[m] = round.entries[peer];
    std::uint64_t rows_sum = 0, rows_max = 0, entries_sum = 0;
    for (std::size_t g = 0; g < G; ++g) {
      const std::uint64_t r = T(peer, slots + 1 + 2 * g), e = T(peer, slots + 2 + 2 * g);
      fwd_rows[g] += r;
      fwd_entries[g] += e;
      rows_sum += r;
      rows_max = r > rows_max ? r : rows_max;
      entries_sum += e;
    }
    // Each rail row reaches at least one rank of this node and each at most once; its entries
    // are the entries forwarded.
    if (round.entries[peer] != entries_sum || round.rows[peer] > rows_sum || round.rows[peer] < rows_max)
      refuse("was announced ", round.rows[peer], " rail rows and ", round.entries[peer], " entries by rank ", peer,
             ", which forwards ", rows_sum, " rows (at most ", rows_max, " to one rank) and ", entries_sum,
             " entries through it");
    // What it forwards to this rank is what reaches this rank from it: one count, written twice.
    if (T(peer, slots) != T(peer, slots + 1 + 2 * l) || slot_sum(peer) != T(peer, slots + 2 + 2 * l))
      refuse("was told by rank ", peer, " that ", T(peer, slots), " rows and ", slot_sum(peer),
             " entries reach it, but that it forwards ", T(peer, slots + 1 + 2 * l), " rows and ",
             T(peer, slots + 2 + 2 * l), " entries to itself");
  }
  for (std::size_t s = 0; s < R; ++s) {
    const bool own_node = s / G == n, rail_peer = !own_node && s % G == l;
    if (own_node && (round.rows[s] != T(s, slots) || round.entries[s] != slot_sum(s)))
      refuse("was announced ", round.rows[s], " rows and ", round.entries[s], " entries by rank ", s,
             " of its node, whose tail says ", T(s, slots), " rows and ", slot_sum(s), " entries");
    if (!own_node && !rail_peer && (round.rows[s] != 0 || round.entries[s] != 0))
      refuse("was announced ", round.rows[s], " rows by rank ", s, ", which sends it none first-hand");
  }
  std::uint64_t node_rows_sum = 0, node_entries_sum = 0, fwd_rows_sum = 0, fwd_entries_sum = 0;
  for (std::size_t g = 0; g <= G; ++g) {
    const std::size_t d = n * G + g;
    at(own_row, g) = c.rank_offsets[d];
    at(own_entry, g) = c.rank_entry_offsets[d];
    at(forward_row, g) = static_cast<std::int32_t>(fwd_rows_sum);
    at(forward_entry, g) = static_cast<std::int32_t>(fwd_entries_sum);
    at(node_row, g) = static_cast<std::int32_t>(node_rows_sum);
    at(node_entry_at, g) = static_cast<std::int32_t>(node_entries_sum);
    if (g == G) break;
    out.node_send[g] = static_cast<std::size_t>(c.rank_offsets[d + 1] - c.rank_offsets[d] + fwd_rows[g]);
    out.node_send_entries[g] =
        static_cast<std::size_t>(c.rank_entry_offsets[d + 1] - c.rank_entry_offsets[d] + fwd_entries[g]);
    // From local rank g: its own rows for this rank, then the rows of its rail peers that reach it.
    std::uint64_t rows = round.rows[d], entries = round.entries[d];
    for (std::size_t m = 0; m < N; ++m)
      if (m != n) {
        rows += T(m * G + g, slots);
        entries += slot_sum(m * G + g);
      }
    out.node_recv[g] = static_cast<std::size_t>(rows);
    out.node_recv_entries[g] = static_cast<std::size_t>(entries);
    fwd_rows_sum += fwd_rows[g];
    fwd_entries_sum += fwd_entries[g];
    node_rows_sum += out.node_send[g];
    node_entries_sum += out.node_send_entries[g];
  }
  for (std::size_t m = 0; m < N; ++m) {
    out.rail_in += out.rail_recv[m];
    out.rail_in_entries += out.rail_recv_entries[m];
  }
  for (std::size_t g = 0; g < G; ++g) {
    out.node_in += out.node_recv[g];
    out.node_in_entries += out.node_recv_entries[g];
  }
  out.node_out = static_cast<std::size_t>(node_rows_sum);
  out.node_out_entries = static_cast<std::size_t>(node_entries_sum);
  // The device indexes every stage with 32-bit offsets, and its scans write n + 1 of them.
  constexpr std::uint64_t limit = INT32_MAX - 1;
  const std::uint64_t layout_rows = static_cast<std::uint64_t>(c.rank_offsets[R]);
  if (node_rows_sum > limit || node_entries_sum > limit || out.node_in_entries > limit || out.rail_in_entries > limit ||
      out.rail_in * G > limit || layout_rows + out.rail_in > limit) {
    refuse("was announced a step past 32-bit offsets (", out.rail_in, " rail rows, ", node_entries_sum,
           " node entries to send, ", out.node_in_entries, " to receive)");
    out.tables.assign(table_count * (G + 1), 0); // nothing the device could index by
    out.indexable = false;
  }
  // The segments: each local slot's entries, over every sender.
  std::uint64_t e = 0;
  for (std::size_t s = 0; s < slots && why.empty(); ++s) {
    for (std::size_t src = 0; src < R; ++src)
      e += T(src, s);
    if (e > limit) refuse("was announced more than ", limit, " entries (past 32-bit offsets)");
    out.slot_offsets[s + 1] = static_cast<std::int32_t>(e);
  }
  if (why.empty() && static_cast<std::size_t>(out.slot_offsets[slots]) != out.node_in_entries)
    refuse("was announced ", out.slot_offsets[slots], " entries per slot but ", out.node_in_entries,
           " entries in the node stage");
  if (!why.empty()) {
    out.slot_offsets.assign(slots + 1, 0);
    // Its rows to itself are sized by what it sends: the self-exchange's two sides agree.
    out.node_recv[l] = out.node_send[l];
    out.node_recv_entries[l] = out.node_send_entries[l];
    out.node_in = out.node_in_entries = 0;
    for (std::size_t g = 0; g < G; ++g) {
      out.node_in += out.node_recv[g];
      out.node_in_entries += out.node_recv_entries[g];
    }
  }
  return why;
}

//! The rail rows the rail peer fans out on the device: none in a step refused past 32-bit offsets,
//! whose forwarding check starts failed (no fan-out body runs) and whose refused sizes would
//! otherwise size the fan-out's scratch and scans (rail rows × GPUs: past a scan's int count).
inline std::size_t fanout_rows(const step_counts& sc) noexcept { return sc.indexable ? sc.rail_in : 0; }
//! @}

//! @name Device: stage bodies of the step (one thread of a grid each; see stage.hpp)
//! @{

//! The member whose range of `offsets` (members + 1 ascending values, offsets[0] ≤ p <
//! offsets[members]) holds position p: the last m with offsets[m] ≤ p (empty members skipped).
LOCUS_HOST_DEVICE std::size_t member_of(const std::int32_t* offsets, std::size_t members, std::int64_t p) {
  std::size_t lo = 0, hi = members;
  while (hi - lo > 1) {
    const std::size_t mid = (lo + hi) / 2;
    if (offsets[mid] <= p)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

//! Rail rows' entry counts: the layout's rows outside its node block `[own_begin, own_begin +
//! own_rows)`, in layout order (which is rail member order).
LOCUS_HOST_DEVICE void rail_row_entries(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
                                        std::size_t rail_rows, std::int32_t own_begin, std::int32_t own_rows,
                                        std::int32_t* LOCUS_RESTRICT out) {
  for (std::size_t i = g.block * g.threads + g.thread; i < rail_rows; i += g.blocks * g.threads) {
    const auto r = static_cast<std::int32_t>(i) < own_begin ? static_cast<std::int32_t>(i)
                                                            : static_cast<std::int32_t>(i) + own_rows;
    out[i] = row_entry_offsets[r + 1] - row_entry_offsets[r];
  }
}

//! Rail rows' entries (target, slot, weight or 0), the layout's entries outside its node block
//! `[own_begin, own_begin + own_entries)`.
LOCUS_HOST_DEVICE void rail_entries(grid_index g, const std::int32_t* LOCUS_RESTRICT target,
                                    const std::int32_t* LOCUS_RESTRICT slot, const float* LOCUS_RESTRICT weight,
                                    std::size_t rail_entries, std::int32_t own_begin, std::int32_t own_entries,
                                    node_entry* LOCUS_RESTRICT out) {
  for (std::size_t i = g.block * g.threads + g.thread; i < rail_entries; i += g.blocks * g.threads) {
    const auto e = static_cast<std::int32_t>(i) < own_begin ? static_cast<std::int32_t>(i)
                                                            : static_cast<std::int32_t>(i) + own_entries;
    out[i] = {target[e], slot[e], weight ? weight[e] : 0.0f};
  }
}

//! The received rail entries as the fan-out reads them.
LOCUS_HOST_DEVICE void unpack_entries(grid_index g, const node_entry* LOCUS_RESTRICT in, std::size_t n,
                                      std::int32_t* LOCUS_RESTRICT target, std::int32_t* LOCUS_RESTRICT slot,
                                      float* LOCUS_RESTRICT weight) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads) {
    target[i] = in[i].target;
    slot[i] = in[i].slot;
    weight[i] = in[i].weight;
  }
}

//! stage::fanout_count, skipped once `*flag` is set (the received metadata was refused: its
//! offsets cannot be trusted to stay in bounds).
LOCUS_HOST_DEVICE void fanout_count(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
                                    const std::int32_t* LOCUS_RESTRICT entry_target, std::size_t rows, std::size_t gpus,
                                    const std::int32_t* flag, std::int32_t* LOCUS_RESTRICT count,
                                    std::int32_t* LOCUS_RESTRICT present) {
  if (*flag) {
    for (std::size_t i = g.block * g.threads + g.thread; i < rows * gpus; i += g.blocks * g.threads)
      count[i] = present[i] = 0;
    return;
  }
  stage::fanout_count(g, row_entry_offsets, entry_target, rows, gpus, count, present);
}

//! After the scans of fanout_count's outputs: the fan-out's rows and entries per target must be
//! what the rail peers announced in the count round (`tables`' forward_row and forward_entry),
//! which sized the node stage; else `stage::bad_slot_counts` is set and nothing is placed.
LOCUS_HOST_DEVICE void fanout_check(grid_index g, const std::int32_t* LOCUS_RESTRICT row_at,
                                    const std::int32_t* LOCUS_RESTRICT entry_at, std::size_t rows, std::size_t gpus,
                                    const std::int32_t* LOCUS_RESTRICT tables, std::int32_t* flag) {
  if (stage::flag_read(flag)) return; // other threads of this grid may be setting it
  const std::int32_t* want_row = tables + forward_row * (gpus + 1);
  const std::int32_t* want_entry = tables + forward_entry * (gpus + 1);
  for (std::size_t t = g.block * g.threads + g.thread; t <= gpus; t += g.blocks * g.threads)
    if (row_at[t * rows] != want_row[t] || entry_at[t * rows] != want_entry[t]) {
      stage::flag_set(flag, stage::bad_slot_counts);
      return;
    }
}

//! stage::fanout_place, skipped once `*flag` is set.
LOCUS_HOST_DEVICE void fanout_place(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
                                    const std::int32_t* LOCUS_RESTRICT entry_target,
                                    const std::int32_t* LOCUS_RESTRICT entry_slot, const float* LOCUS_RESTRICT weight,
                                    std::size_t rows, std::size_t gpus, const std::int32_t* LOCUS_RESTRICT row_at,
                                    const std::int32_t* LOCUS_RESTRICT entry_at, const std::int32_t* flag,
                                    std::int32_t* LOCUS_RESTRICT out_row, std::int32_t* LOCUS_RESTRICT out_row_entries,
                                    std::int32_t* LOCUS_RESTRICT out_slot, float* LOCUS_RESTRICT out_weight,
                                    std::int32_t* LOCUS_RESTRICT out_source) {
  if (*flag) return;
  stage::fanout_place(g, row_entry_offsets, entry_target, entry_slot, weight, rows, gpus, row_at, entry_at, out_row,
                      out_row_entries, out_slot, out_weight, out_source);
}

// Positions are 64-bit in the node stage's bodies: a step refused past 32-bit offsets keeps the
// stage's announced size (up to 2^32 entries) over zeroed tables, and a position cast to 32 bits
// would turn negative there and index before the tables instead of taking the guarded branch.

//! The node stage's send rows, `index[p]` for p < n in the source row space (the layout's rows,
//! then the rail rows received at `layout_rows + r`): per local rank its own rows, then the fan-out
//! rows for it. Once `*flag` is set the forwarded positions name row 0 (their entry counts go out
//! as 0, which every receiver refuses).
LOCUS_HOST_DEVICE void node_send_rows(grid_index g, const std::int32_t* LOCUS_RESTRICT tables, std::size_t gpus,
                                      const std::int32_t* LOCUS_RESTRICT fan_row, std::int32_t layout_rows,
                                      std::size_t n, const std::int32_t* flag, std::int32_t* LOCUS_RESTRICT index) {
  const std::size_t G1 = gpus + 1;
  const std::int32_t *own = tables + own_row * G1, *fwd = tables + forward_row * G1, *at = tables + node_row * G1;
  for (std::size_t p = g.block * g.threads + g.thread; p < n; p += g.blocks * g.threads) {
    const std::size_t m = member_of(at, gpus, static_cast<std::int64_t>(p));
    const std::int64_t j = static_cast<std::int64_t>(p) - at[m], mine = own[m + 1] - own[m];
    index[p] =
        j < mine ? own[m] + static_cast<std::int32_t>(j) : (*flag ? 0 : layout_rows + fan_row[fwd[m] + j - mine]);
  }
}

//! The node stage's send rows' entry counts, in node_send_rows' order.
LOCUS_HOST_DEVICE void node_send_row_entries(grid_index g, const std::int32_t* LOCUS_RESTRICT tables, std::size_t gpus,
                                             const std::int32_t* LOCUS_RESTRICT layout_row_entry_offsets,
                                             const std::int32_t* LOCUS_RESTRICT fan_row_entries, std::size_t n,
                                             const std::int32_t* flag, std::int32_t* LOCUS_RESTRICT out) {
  const std::size_t G1 = gpus + 1;
  const std::int32_t *own = tables + own_row * G1, *fwd = tables + forward_row * G1, *at = tables + node_row * G1;
  for (std::size_t p = g.block * g.threads + g.thread; p < n; p += g.blocks * g.threads) {
    const std::size_t m = member_of(at, gpus, static_cast<std::int64_t>(p));
    const std::int64_t j = static_cast<std::int64_t>(p) - at[m], mine = own[m + 1] - own[m];
    if (j < mine) {
      const std::int32_t r = own[m] + static_cast<std::int32_t>(j);
      out[p] = layout_row_entry_offsets[r + 1] - layout_row_entry_offsets[r];
    } else {
      out[p] = *flag ? 0 : fan_row_entries[fwd[m] + j - mine];
    }
  }
}

//! The node stage's send entries (slot, weight), in node_send_rows' order: per local rank the
//! layout's entries for it, then the fan-out's. Once `*flag` is set the forwarded ones are
//! (-1, 0).
LOCUS_HOST_DEVICE void
node_send_entries(grid_index g, const std::int32_t* LOCUS_RESTRICT tables, std::size_t gpus,
                  const std::int32_t* LOCUS_RESTRICT layout_slot, const float* LOCUS_RESTRICT layout_weight,
                  const std::int32_t* LOCUS_RESTRICT fan_slot, const float* LOCUS_RESTRICT fan_weight, std::size_t n,
                  const std::int32_t* flag, std::int32_t* LOCUS_RESTRICT out_slot, float* LOCUS_RESTRICT out_weight) {
  const std::size_t G1 = gpus + 1;
  const std::int32_t *own = tables + own_entry * G1, *fwd = tables + forward_entry * G1,
                     *at = tables + node_entry_at * G1;
  for (std::size_t p = g.block * g.threads + g.thread; p < n; p += g.blocks * g.threads) {
    const std::size_t m = member_of(at, gpus, static_cast<std::int64_t>(p));
    const std::int64_t j = static_cast<std::int64_t>(p) - at[m], mine = own[m + 1] - own[m];
    if (j < mine) {
      out_slot[p] = layout_slot[own[m] + j];
      out_weight[p] = layout_weight ? layout_weight[own[m] + j] : 0.0f;
    } else if (*flag) {
      out_slot[p] = -1;
      out_weight[p] = 0.0f;
    } else {
      out_slot[p] = fan_slot[fwd[m] + j - mine];
      out_weight[p] = fan_weight[fwd[m] + j - mine];
    }
  }
}

//! Combine: `count[r]` = the node ranks rail row r went to (its fan-out rows); 0 once `*flag` is
//! set (the row then returns zeros).
LOCUS_HOST_DEVICE void forward_count(grid_index g, const std::int32_t* LOCUS_RESTRICT row_at, std::size_t rows,
                                     std::size_t gpus, const std::int32_t* flag, std::int32_t* LOCUS_RESTRICT count) {
  for (std::size_t r = g.block * g.threads + g.thread; r < rows; r += g.blocks * g.threads) {
    std::int32_t c = 0;
    if (!*flag)
      for (std::size_t t = 0; t < gpus; ++t)
        c += row_at[t * rows + r + 1] > row_at[t * rows + r];
    count[r] = c;
  }
}

//! Combine: where rail row r's returns lie among the node stage's returned rows (node send order),
//! by target: `position[offsets[r] ..]`, offsets being the exclusive scan of forward_count.
LOCUS_HOST_DEVICE void forward_place(grid_index g, const std::int32_t* LOCUS_RESTRICT row_at, std::size_t rows,
                                     std::size_t gpus, const std::int32_t* LOCUS_RESTRICT tables,
                                     const std::int32_t* LOCUS_RESTRICT offsets, const std::int32_t* flag,
                                     std::int32_t* LOCUS_RESTRICT position) {
  if (*flag) return;
  const std::size_t G1 = gpus + 1;
  const std::int32_t *own = tables + own_row * G1, *fwd = tables + forward_row * G1, *at = tables + node_row * G1;
  for (std::size_t r = g.block * g.threads + g.thread; r < rows; r += g.blocks * g.threads) {
    std::int32_t k = offsets[r];
    for (std::size_t t = 0; t < gpus; ++t) {
      const std::size_t i = t * rows + r;
      if (row_at[i + 1] > row_at[i]) position[k++] = at[t] + (own[t + 1] - own[t]) + (row_at[i] - fwd[t]);
    }
  }
}

//! `out[i] = value` for i < n.
LOCUS_HOST_DEVICE void fill(grid_index g, std::size_t n, float value, float* LOCUS_RESTRICT out) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads)
    out[i] = value;
}

//! Combine: where layout row r's returned sum lies in the pool (the node stage's returned rows,
//! `node_rows` of them, then the rail stage's, in layout order of the rail rows).
LOCUS_HOST_DEVICE void return_index(grid_index g, const std::int32_t* LOCUS_RESTRICT tables, std::size_t gpus,
                                    std::size_t layout_rows, std::int32_t node_rows,
                                    std::int32_t* LOCUS_RESTRICT index) {
  const std::size_t G1 = gpus + 1;
  const std::int32_t *own = tables + own_row * G1, *at = tables + node_row * G1;
  const std::int32_t begin = own[0], end = own[gpus];
  for (std::size_t i = g.block * g.threads + g.thread; i < layout_rows; i += g.blocks * g.threads) {
    const auto r = static_cast<std::int32_t>(i);
    if (r < begin)
      index[i] = node_rows + r;
    else if (r >= end)
      index[i] = node_rows + r - (end - begin);
    else {
      const std::size_t m = member_of(own, gpus, r);
      index[i] = at[m] + (r - own[m]);
    }
  }
}
//! @}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::node_step
