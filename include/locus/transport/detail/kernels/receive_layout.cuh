#pragma once
//! @file
//! The receive layout built where the received metadata lies (`transport/device_permute.hpp`,
//! device_receive_layout::build): the metadata check and the stage bodies (detail/stage.hpp) as
//! kernels, the sizes of what they write, and the order they run in, written once for the device
//! and for the CPU test that runs the same sequence under the warp emulator
//! (tests/unit/test_receive_layout_kernels_host.cpp). Each body after the check does nothing once
//! the check's word (`skip`) is set, so bad metadata writes nothing out of bounds.

#include <cstddef>
#include <cstdint>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/detail/stage.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute {

template <class = void>
__global__ void receive_check_kernel(const std::int32_t* row_entry_counts, std::size_t rows, const std::int32_t* slot,
                                     std::size_t entries, std::size_t slots, std::int32_t* flag,
                                     unsigned long long* total) {
  stage::receive_metadata_check(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, row_entry_counts,
                                rows, slot, entries, slots, flag, total);
}
template <class = void>
__global__ void receive_total_check_kernel(const unsigned long long* total, std::size_t entries, std::int32_t* flag) {
  stage::receive_total_check(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, total, entries, flag);
}
template <class = void>
__global__ void entry_rows_kernel(const std::int32_t* skip, const std::int32_t* offsets, std::size_t rows,
                                  std::int32_t* entry_row) {
  if (*skip) return;
  stage::entry_rows(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, offsets, rows, entry_row);
}
template <class = void>
__global__ void slot_chunk_count_kernel(const std::int32_t* skip, const std::int32_t* slot, std::size_t entries,
                                        std::size_t slots, std::size_t chunk, std::int32_t* count) {
  if (*skip) return;
  stage::slot_chunk_count(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, slot, entries, slots,
                          chunk, count);
}
template <class = void>
__global__ void slot_offsets_kernel(const std::int32_t* skip, const std::int32_t* at, std::size_t entries,
                                    std::size_t slots, std::size_t chunk, std::int32_t* slot_offsets) {
  if (*skip) return;
  stage::slot_offsets_of(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, at, entries, slots, chunk,
                         slot_offsets);
}
template <class = void>
__global__ void slot_offsets_check_kernel(const std::int32_t* slot_offsets, const std::int32_t* expected,
                                          std::size_t slots, std::int32_t* flag) {
  stage::slot_offsets_check(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, slot_offsets, expected,
                            slots, flag);
}
template <class = void>
__global__ void slot_chunk_place_kernel(const std::int32_t* skip, const std::int32_t* slot, const float* weight,
                                        const std::int32_t* entry_row, std::size_t entries, std::size_t chunk,
                                        const std::int32_t* at, std::int32_t* expert_row, float* expert_weight,
                                        std::int32_t* position) {
  if (*skip) return;
  stage::slot_chunk_place(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, slot, weight, entry_row,
                          entries, chunk, at, expert_row, expert_weight, position);
}

//! Entries per slot-counting thread: short, since its placement recounts them.
inline constexpr std::size_t receive_chunk = 32;

//! How many elements each array of a build holds (at least one where a kernel may take its address).
struct receive_layout_sizes {
  std::size_t row_entry_offsets, per_entry, count, at, slot_offsets;
  receive_layout_sizes(std::size_t rows, std::size_t entries, std::size_t slots)
      : row_entry_offsets(rows + 1), per_entry(entries > 0 ? entries : 1),
        count(slots * stage::slot_chunks(entries, receive_chunk) > 0
                  ? slots * stage::slot_chunks(entries, receive_chunk)
                  : 1),
        at(slots * stage::slot_chunks(entries, receive_chunk) + 1), slot_offsets(slots + 1) {}
};

//! Where a build writes (sized by receive_layout_sizes; `expected`, the senders' announced slot
//! offsets, slots + 1 of them; `flag` zero and `total` zero before the build).
struct receive_layout_arrays {
  std::int32_t* row_entry_offsets;
  std::int32_t* entry_row;
  std::int32_t* count;
  std::int32_t* at;
  std::int32_t* slot_offsets;
  const std::int32_t* expected;
  std::int32_t* expert_row;
  float* expert_weight; //!< null without weights
  std::int32_t* entry_position;
  std::int32_t* flag;
  unsigned long long* total;
};

//! The build, in order: `launch(kernel, blocks, threads, arguments...)` runs a kernel (on the device:
//! `kernel<<<blocks, threads, 0, stream>>>`), `scan(in, n, out)` writes out[0] = 0 and the inclusive
//! sums of in[0 .. n) to out[1 .. n] (on the device: CUB's; it runs also when the check word is set,
//! and what it writes then is never read).
template <class Launch, class Scan>
void receive_layout_sequence(Launch&& launch, Scan&& scan, const std::int32_t* row_entry_counts, std::size_t rows,
                             const std::int32_t* entry_slot, const float* entry_weight, std::size_t entries,
                             std::size_t slots, const receive_layout_arrays& a) {
  constexpr std::size_t chunk = receive_chunk;
  constexpr unsigned threads = 256;
  const std::size_t chunks = stage::slot_chunks(entries, chunk);
  launch(&receive_check_kernel<>, layout::blocks_for(rows > entries ? rows : entries), threads, row_entry_counts, rows,
         entry_slot, entries, slots, a.flag, a.total);
  launch(&receive_total_check_kernel<>, 1u, 32u, a.total, entries, a.flag);
  scan(row_entry_counts, rows, a.row_entry_offsets);
  launch(&entry_rows_kernel<>, layout::blocks_for(rows), threads, a.flag, a.row_entry_offsets, rows, a.entry_row);
  launch(&slot_chunk_count_kernel<>, layout::blocks_for(chunks), threads, a.flag, entry_slot, entries, slots, chunk,
         a.count);
  scan(a.count, slots * chunks, a.at);
  launch(&slot_offsets_kernel<>, layout::blocks_for(slots + 1), threads, a.flag, a.at, entries, slots, chunk,
         a.slot_offsets);
  launch(&slot_offsets_check_kernel<>, layout::blocks_for(slots + 1), threads, a.slot_offsets, a.expected, slots,
         a.flag);
  launch(&slot_chunk_place_kernel<>, layout::blocks_for(chunks), threads, a.flag, entry_slot, entry_weight, a.entry_row,
         entries, chunk, a.at, a.expert_row, a.expert_weight, a.entry_position);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute
