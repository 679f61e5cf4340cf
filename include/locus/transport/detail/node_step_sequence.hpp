#pragma once
//! @file
//! The hierarchical step's order (`transport/device_dispatch.hpp`, detail/node_step.hpp): which
//! stage body runs on which arrays, which exchange moves what, and every offset and size between
//! them, written once against an *engine* so that the device dispatcher runs it with CUDA launches,
//! CUB scans and the transport's device exchanges, and the CPU test (tests/unit/test_node_step.cpp)
//! runs the same sequence with host executors and the one-GPU transport's protocol with host
//! memory, ranks as threads.
//!
//! The engine's operations: detail/step_engine.hpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/transport/detail/node_step.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/detail/step_engine.hpp>
#include <locus/transport/exchange.hpp>
#include <span>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::node_step {

//! The stage bodies as launchable types: `name::run(grid_index, args...)` calls the body, so an
//! engine launches it as one kernel template (the device dispatcher's `stage_kernel<name, ...>`)
//! or runs it through stage::run_grid.
namespace stages {
#define LOCUS_DETAIL_STAGE_TYPE(name, body)                                                                            \
  struct name {                                                                                                        \
    template <class... A>                                                                                              \
    LOCUS_HOST_DEVICE static void run(grid_index g, A... a) {                                                          \
      body(g, a...);                                                                                                   \
    }                                                                                                                  \
  };
LOCUS_DETAIL_STAGE_TYPE(rail_row_entries, node_step::rail_row_entries)
LOCUS_DETAIL_STAGE_TYPE(rail_entries, node_step::rail_entries)
LOCUS_DETAIL_STAGE_TYPE(unpack_entries, node_step::unpack_entries)
LOCUS_DETAIL_STAGE_TYPE(metadata_check, stage::receive_metadata_check)
LOCUS_DETAIL_STAGE_TYPE(total_check, stage::receive_total_check)
LOCUS_DETAIL_STAGE_TYPE(fanout_count, node_step::fanout_count)
LOCUS_DETAIL_STAGE_TYPE(fanout_check, node_step::fanout_check)
LOCUS_DETAIL_STAGE_TYPE(fanout_place, node_step::fanout_place)
LOCUS_DETAIL_STAGE_TYPE(node_send_rows, node_step::node_send_rows)
LOCUS_DETAIL_STAGE_TYPE(node_send_row_entries, node_step::node_send_row_entries)
LOCUS_DETAIL_STAGE_TYPE(node_send_entries, node_step::node_send_entries)
LOCUS_DETAIL_STAGE_TYPE(forward_count, node_step::forward_count)
LOCUS_DETAIL_STAGE_TYPE(forward_place, node_step::forward_place)
LOCUS_DETAIL_STAGE_TYPE(fill, node_step::fill)
LOCUS_DETAIL_STAGE_TYPE(return_index, node_step::return_index)
#undef LOCUS_DETAIL_STAGE_TYPE
} // namespace stages

using step::received;

//! What the step reads of its node layout: the host counts and the device arrays.
struct layout_view {
  layout_counts counts;
  std::size_t rows = 0;
  const std::int32_t* row_entry_offsets = nullptr; //!< rows + 1
  const std::int32_t* entry_target = nullptr;      //!< per entry: its final rank
  const std::int32_t* entry_slot = nullptr;        //!< per entry: its slot there
  const float* entry_weight = nullptr;             //!< per entry
};

//! The step's arrays, kept between dispatch and combine (and between steps, for their capacity).
template <class E, class T>
struct step_buffers {
  template <class U>
  using buffer = typename E::template buffer<U>;
  buffer<std::int32_t> tables, flag;            // the count round's tables; the forwarding check's word
  buffer<unsigned long long> total;             // the rail rows' entries, summed by the check
  buffer<std::int32_t> row_entries;             // the entry counts of the rows sent (rail, then node stage)
  buffer<node_entry> rail_entries, fwd_entries; // rail entries sent; received
  buffer<std::int32_t> fwd_row_entries, fwd_reo, fwd_target, fwd_slot;
  buffer<float> fwd_weight;
  buffer<std::int32_t> fan_count, fan_present, row_at, entry_at, fan_row, fan_row_entries, fan_slot, fan_source;
  buffer<float> fan_weight, ones;
  buffer<std::int32_t> index, send_slots;
  buffer<float> send_weights;
  buffer<std::int32_t> recv_row_entries, recv_slots; //!< the node stage's entry metadata, received
  buffer<float> recv_weights;
  buffer<T> src, stage_send, pool, ret; // rows: layout rows and rail rows; to send; combine's pool; returned
};

//! Dispatch of rank `self` once the count round is read (`sc`): the rail stage, the fan-out checked
//! on the device, the node stage's entry metadata (into b.recv_*; then `metadata_received()`, where
//! the caller builds its receive layout), then the node stage's rows. Returns the received rows
//! (sc.node_in of them, node-member order), valid until the engine's next exchange.
template <class E, class T, class Received>
const T* dispatch_sequence(E& e, step_buffers<E, T>& b, const layout_view& lay, const step_counts& sc, std::size_t gpus,
                           std::size_t self, std::size_t hidden, Received&& metadata_received) {
  const std::size_t G = gpus, n = self / G, L = lay.rows;
  const auto ro = lay.counts.rank_offsets, eo = lay.counts.rank_entry_offsets;
  const auto at_least_one = [](std::size_t v) { return std::max<std::size_t>(v, 1); };
  // The step's tables and the forwarding check's first word. A step past 32-bit offsets starts with
  // the check failed, so that no body indexes by its zeroed tables.
  b.tables.resize(sc.tables.size());
  b.flag.resize(1);
  b.total.resize(1);
  e.upload(std::span<const std::int32_t>(sc.tables), sc.indexable ? 0 : past_32_bits, b.tables.data(), b.flag.data());
  std::int32_t* flag = b.flag.data();

  // Rail stage: the layout's rows outside this node's block, with their entries.
  const std::int32_t own_begin = ro[n * G], own_rows = ro[n * G + G] - own_begin;
  const std::int32_t own_entry_begin = eo[n * G], own_entries = eo[n * G + G] - own_entry_begin;
  const auto own_end = static_cast<std::size_t>(own_begin + own_rows);
  const std::size_t rail_out = L - static_cast<std::size_t>(own_rows);
  const std::size_t rail_out_entries = static_cast<std::size_t>(eo.back() - own_entries);
  b.src.resize(at_least_one(L + sc.rail_in) * hidden);
  e.permute(b.src.data());
  b.stage_send.resize(at_least_one(rail_out) * hidden);
  e.copy(b.stage_send.data(), b.src.data(), static_cast<std::size_t>(own_begin) * hidden);
  e.copy(b.stage_send.data() + static_cast<std::size_t>(own_begin) * hidden, b.src.data() + own_end * hidden,
         (L - own_end) * hidden);
  b.row_entries.resize(at_least_one(rail_out));
  b.rail_entries.resize(at_least_one(rail_out_entries));
  e.launch(rail_out, stages::rail_row_entries{}, lay.row_entry_offsets, rail_out, own_begin, own_rows,
           b.row_entries.data());
  e.launch(rail_out_entries, stages::rail_entries{}, lay.entry_target, lay.entry_slot, lay.entry_weight,
           rail_out_entries, own_entry_begin, own_entries, b.rail_entries.data());
  const std::size_t rin = sc.rail_in, rin_entries = sc.rail_in_entries;
  const void* got = e.exchange(exchange_group::rail, received::metadata, sizeof(std::int32_t), b.row_entries.data(),
                               sc.rail_send, sc.rail_recv);
  b.fwd_row_entries.resize(at_least_one(rin));
  e.copy(b.fwd_row_entries.data(), static_cast<const std::int32_t*>(got), rin);
  got = e.exchange(exchange_group::rail, received::metadata, sizeof(node_entry), b.rail_entries.data(),
                   sc.rail_send_entries, sc.rail_recv_entries);
  b.fwd_entries.resize(at_least_one(rin_entries));
  e.copy(b.fwd_entries.data(), static_cast<const node_entry*>(got), rin_entries);
  got = e.exchange(exchange_group::rail, received::rows, hidden * sizeof(T), b.stage_send.data(), sc.rail_send,
                   sc.rail_recv);
  e.copy(b.src.data() + L * hidden, static_cast<const T*>(got), rin * hidden);

  // Fan-out of the rail rows by target, checked on the device: the received metadata as the
  // receive layout checks its own (targets in place of slots), then the fan-out's counts against
  // the count round's. A step refused past 32-bit offsets fans out nothing (fanout_rows).
  const std::size_t fr = fanout_rows(sc), fan = G * fr, fan_entries = fr > 0 ? rin_entries : 0;
  b.fwd_target.resize(at_least_one(rin_entries));
  b.fwd_slot.resize(at_least_one(rin_entries));
  b.fwd_weight.resize(at_least_one(rin_entries));
  b.fwd_reo.resize(rin + 1);
  b.fan_count.resize(at_least_one(fan));
  b.fan_present.resize(at_least_one(fan));
  b.row_at.resize(fan + 1);
  b.entry_at.resize(fan + 1);
  b.fan_row.resize(at_least_one(fan));
  b.fan_row_entries.resize(at_least_one(fan));
  b.fan_slot.resize(at_least_one(fan_entries));
  b.fan_weight.resize(at_least_one(fan_entries));
  b.fan_source.resize(at_least_one(fan_entries));
  e.launch(rin_entries, stages::unpack_entries{}, b.fwd_entries.data(), rin_entries, b.fwd_target.data(),
           b.fwd_slot.data(), b.fwd_weight.data());
  e.zero(b.total.data(), 1);
  e.launch(std::max(rin, rin_entries), stages::metadata_check{}, b.fwd_row_entries.data(), rin, b.fwd_target.data(),
           rin_entries, G, flag, b.total.data());
  e.launch(1, stages::total_check{}, b.total.data(), rin_entries, flag);
  e.scan(b.fwd_row_entries.data(), rin, b.fwd_reo.data());
  e.launch(fr, stages::fanout_count{}, b.fwd_reo.data(), b.fwd_target.data(), fr, G, flag, b.fan_count.data(),
           b.fan_present.data());
  e.scan(b.fan_present.data(), fan, b.row_at.data());
  e.scan(b.fan_count.data(), fan, b.entry_at.data());
  e.launch(G + 1, stages::fanout_check{}, b.row_at.data(), b.entry_at.data(), fr, G, b.tables.data(), flag);
  e.launch(fr, stages::fanout_place{}, b.fwd_reo.data(), b.fwd_target.data(), b.fwd_slot.data(), b.fwd_weight.data(),
           fr, G, b.row_at.data(), b.entry_at.data(), flag, b.fan_row.data(), b.fan_row_entries.data(),
           b.fan_slot.data(), b.fan_weight.data(), b.fan_source.data());

  // Node stage: per local rank its own rows, then the rows forwarded to it (itself included).
  const std::size_t nout = sc.node_out, nout_entries = sc.node_out_entries;
  b.index.resize(at_least_one(nout));
  e.launch(nout, stages::node_send_rows{}, b.tables.data(), G, b.fan_row.data(), static_cast<std::int32_t>(L), nout,
           flag, b.index.data());
  b.stage_send.resize(at_least_one(nout) * hidden);
  e.gather(b.src.data(), b.index.data(), nout, b.stage_send.data());
  b.row_entries.resize(at_least_one(nout));
  b.send_slots.resize(at_least_one(nout_entries));
  b.send_weights.resize(at_least_one(nout_entries));
  e.launch(nout, stages::node_send_row_entries{}, b.tables.data(), G, lay.row_entry_offsets, b.fan_row_entries.data(),
           nout, flag, b.row_entries.data());
  e.launch(nout_entries, stages::node_send_entries{}, b.tables.data(), G, lay.entry_slot, lay.entry_weight,
           b.fan_slot.data(), b.fan_weight.data(), nout_entries, flag, b.send_slots.data(), b.send_weights.data());
  const std::size_t nin = sc.node_in, nin_entries = sc.node_in_entries;
  b.recv_row_entries.resize(at_least_one(nin));
  b.recv_slots.resize(at_least_one(nin_entries));
  b.recv_weights.resize(at_least_one(nin_entries));
  got = e.exchange(exchange_group::node, received::metadata, sizeof(std::int32_t), b.row_entries.data(), sc.node_send,
                   sc.node_recv);
  e.copy(b.recv_row_entries.data(), static_cast<const std::int32_t*>(got), nin);
  got = e.exchange(exchange_group::node, received::metadata, sizeof(std::int32_t), b.send_slots.data(),
                   sc.node_send_entries, sc.node_recv_entries);
  e.copy(b.recv_slots.data(), static_cast<const std::int32_t*>(got), nin_entries);
  got = e.exchange(exchange_group::node, received::metadata, sizeof(float), b.send_weights.data(), sc.node_send_entries,
                   sc.node_recv_entries);
  e.copy(b.recv_weights.data(), static_cast<const float*>(got), nin_entries);
  metadata_received();
  return static_cast<const T*>(e.exchange(exchange_group::node, received::rows, hidden * sizeof(T), b.stage_send.data(),
                                          sc.node_send, sc.node_recv));
}

//! Combine of rank `self` after dispatch_sequence: `back` holds the reduced rows of what it
//! received (sc.node_in rows, in the order received). The node stage back; each rail row's sum
//! over what its node returned for it (zeros once the forwarding check failed); the rail stage
//! back; the layout's rows gathered in layout order. Returns them (lay.rows rows, in b.ret).
template <class E, class T>
const T* combine_sequence(E& e, step_buffers<E, T>& b, const layout_view& lay, const step_counts& sc, std::size_t gpus,
                          std::size_t self, std::size_t hidden, const T* back) {
  const std::size_t G = gpus, n = self / G, L = lay.rows;
  const auto ro = lay.counts.rank_offsets;
  const std::size_t nout = sc.node_out, rin = sc.rail_in;
  const std::size_t rail_out = L - static_cast<std::size_t>(ro[n * G + G] - ro[n * G]);
  const auto at_least_one = [](std::size_t v) { return std::max<std::size_t>(v, 1); };
  const std::int32_t* flag = b.flag.data();
  // Room for every layout row after the node returns: return_index stays in bounds even when the
  // tables were zeroed (a step past 32-bit offsets).
  b.pool.resize(at_least_one(nout + L) * hidden);
  const void* got =
      e.exchange(exchange_group::node, received::returned, hidden * sizeof(T), back, sc.node_recv, sc.node_send);
  e.copy(b.pool.data(), static_cast<const T*>(got), nout * hidden);
  b.fan_count.resize(at_least_one(rin));
  b.fwd_reo.resize(rin + 1);
  b.fan_row.resize(at_least_one(G * fanout_rows(sc))); // read only where the check passed
  b.ones.resize(at_least_one(nout));
  e.launch(rin, stages::forward_count{}, b.row_at.data(), rin, G, flag, b.fan_count.data());
  e.scan(b.fan_count.data(), rin, b.fwd_reo.data());
  e.launch(rin, stages::forward_place{}, b.row_at.data(), rin, G, b.tables.data(), b.fwd_reo.data(), flag,
           b.fan_row.data());
  e.launch(nout, stages::fill{}, nout, 1.0f, b.ones.data());
  b.stage_send.resize(at_least_one(rin) * hidden);
  e.reduce(b.pool.data(), b.fwd_reo.data(), b.fan_row.data(), b.ones.data(), rin, b.stage_send.data(), flag);
  got = e.exchange(exchange_group::rail, received::returned, hidden * sizeof(T), b.stage_send.data(), sc.rail_recv,
                   sc.rail_send);
  e.copy(b.pool.data() + nout * hidden, static_cast<const T*>(got), rail_out * hidden);
  b.index.resize(at_least_one(L));
  e.launch(L, stages::return_index{}, b.tables.data(), G, L, static_cast<std::int32_t>(nout), b.index.data());
  b.ret.resize(at_least_one(L) * hidden);
  e.gather(b.pool.data(), b.index.data(), L, b.ret.data());
  return b.ret.data();
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::node_step
