#pragma once
//! @file
//! The flat device step's order (`transport/device_dispatch.hpp`): every row straight to its
//! destination rank over the world group, written once against an engine (detail/step_engine.hpp)
//! so that the device dispatcher runs it with CUDA launches and the transport's device exchanges,
//! and the CPU test (tests/unit/test_flat_step.cpp) with host executors and the one-GPU
//! transport's protocol with host memory, ranks as threads.
//!
//! Before the count round (queued, so it overlaps the round's meeting): the layout's rows into the
//! send buffer and each row's entry count. After it, every exchange knows its counts: the entry
//! metadata (entries per row, local slot, weight), then the rows; combine sends the reduced rows
//! back the same way.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/detail/step_engine.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <span>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::flat_step {

using stage::grid_index;
using step::received;

//! The stage body of the step as a launchable type (step_engine.hpp).
namespace stages {
struct adjacent_difference {
  template <class... A>
  LOCUS_HOST_DEVICE static void run(grid_index g, A... a) {
    stage::adjacent_difference(g, a...);
  }
};
} // namespace stages

//! What the step reads of its layout (device arrays).
struct layout_view {
  std::size_t rows = 0;
  const std::int32_t* row_entry_offsets = nullptr; //!< rows + 1
  const std::int32_t* entry_slot = nullptr;        //!< per entry: its slot on the destination rank
  const float* entry_weight = nullptr;             //!< per entry
};

//! The step's arrays, kept between dispatch and combine (and between steps, for their capacity).
template <class E, class T>
struct step_buffers {
  template <class U>
  using buffer = typename E::template buffer<U>;
  buffer<T> send;                                    //!< the layout's rows, in layout order
  buffer<std::int32_t> row_entries;                  //!< each row's entry count, sent with it
  buffer<std::int32_t> recv_row_entries, recv_slots; //!< the entry metadata received
  buffer<float> recv_weights;
};

//! Before the count round: the layout's rows into b.send and their entry counts into b.row_entries.
template <class E, class T>
void prepare_sequence(E& e, step_buffers<E, T>& b, const layout_view& lay, std::size_t hidden) {
  const std::size_t rows = lay.rows;
  b.send.resize(std::max<std::size_t>(rows, 1) * hidden);
  b.row_entries.resize(std::max<std::size_t>(rows, 1));
  e.permute(b.send.data());
  if (rows > 0) e.launch(rows, stages::adjacent_difference{}, lay.row_entry_offsets, rows, b.row_entries.data());
}

//! After the count round (`round`: what each member sends this rank; `send_counts`,
//! `entry_counts`: what this rank sends each): the entry metadata into b.recv_*, then
//! `metadata_received()` (where the caller builds its receive layout), then the rows. Returns the
//! received rows (grouped by sender), valid until the engine's next exchange.
template <class E, class T, class Received>
const T* dispatch_sequence(E& e, step_buffers<E, T>& b, const layout_view& lay,
                           std::span<const std::size_t> send_counts, std::span<const std::size_t> entry_counts,
                           const device_counts& round, std::size_t hidden, Received&& metadata_received) {
  std::size_t rows = 0, entries = 0;
  for (std::size_t m = 0; m < round.rows.size(); ++m) {
    rows += round.rows[m];
    entries += round.entries[m];
  }
  b.recv_row_entries.resize(std::max<std::size_t>(rows, 1));
  b.recv_slots.resize(std::max<std::size_t>(entries, 1));
  b.recv_weights.resize(std::max<std::size_t>(entries, 1));
  // Each result copied out at once: the next exchange may reuse the transport's receive buffer.
  const void* got = e.exchange(exchange_group::world, received::metadata, sizeof(std::int32_t), b.row_entries.data(),
                               send_counts, round.rows);
  e.copy(b.recv_row_entries.data(), static_cast<const std::int32_t*>(got), rows);
  got = e.exchange(exchange_group::world, received::metadata, sizeof(std::int32_t), lay.entry_slot, entry_counts,
                   round.entries);
  e.copy(b.recv_slots.data(), static_cast<const std::int32_t*>(got), entries);
  got = e.exchange(exchange_group::world, received::metadata, sizeof(float), lay.entry_weight, entry_counts,
                   round.entries);
  e.copy(b.recv_weights.data(), static_cast<const float*>(got), entries);
  metadata_received();
  return static_cast<const T*>(
      e.exchange(exchange_group::world, received::rows, hidden * sizeof(T), b.send.data(), send_counts, round.rows));
}

//! Combine: `back` (the reduced rows of what this rank received, in the order received) back to
//! their senders. Returns this rank's layout rows, in layout order, valid until the engine's next
//! exchange.
template <class E, class T>
const T* combine_sequence(E& e, std::span<const std::size_t> send_counts, const device_counts& round,
                          std::size_t hidden, const T* back) {
  return static_cast<const T*>(
      e.exchange(exchange_group::world, received::returned, hidden * sizeof(T), back, round.rows, send_counts));
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::flat_step
