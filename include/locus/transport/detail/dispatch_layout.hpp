#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! Host dispatch of the device layout: the kernel and CUB call sequence behind
//! `transport::device_layout::assign`. Sequence (all on one stream, every order stable):
//!   1. validate ids / weights; joins (locality rules);       validate_kernel<K, Experts>
//!      (expert and joined, copy) pairs
//!   2. stable sort by expert, balanced copies first          cub::DeviceRadixSort::SortPairs
//!   3. replica per copy (the join, else the replica rule;     replica_kernel
//!      round robin index = run position, batch position =
//!      copy index)
//!   4. rows per token, bucket keys, per-rank, reach and link  group_kernel<K>
//!      counts
//!   5. stable sort of rows by bucket key                      cub::DeviceRadixSort::SortPairs
//!   6. rank offsets; per-row entry counts; entry offsets      cub::DeviceScan::ExclusiveSum (×2)
//!   7. rows' tokens and entries                               place_kernel<K>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/detail/kernels/layout.cuh>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout {

//! Device storage of one layout (outputs and scratch), reused across steps.
struct device_layout_buffers {
  device_buffer<std::int32_t> copy_rank, copy_slot, copy_replica, copy_row, copy_entry;
  device_buffer<std::int32_t> row_token, row_forwards, row_entry_offsets, rank_offsets, rank_entry_offsets;
  device_buffer<std::int32_t> entry_copy, entry_target, entry_slot;
  device_buffer<float> entry_weight;
  device_buffer<std::int32_t> slot_counts;
  device_buffer<std::int32_t> reach; // rows carrying an entry for each final rank (tokens with a copy there)
  device_buffer<unsigned long long> links;
  // scratch
  device_buffer<std::int32_t> fixed, cand_offsets, cands, error;
  device_buffer<std::int32_t> key_in, key_out, val_in, val_out, local_row, row_size, sorted_size, rank_rows;
  device_buffer<unsigned char> temp;
};

//! Runs steps 1-7 on `stream`. Host tables (fixed / candidates) must already be in `b`.
template <std::size_t K, class Experts>
void dispatch_build(device_layout_buffers& b, const std::int32_t* ids, const float* weights, std::size_t tokens,
                    Experts experts, const slot_ref* replicas, const token_params& p, std::size_t ranks,
                    placement::replica_rule rule, cudaStream_t stream) {
  const std::size_t n = tokens * K;
  const auto S = static_cast<std::size_t>(p.slots);
  const std::size_t buckets = ranks * static_cast<std::size_t>(p.bucket_width);
  constexpr unsigned threads = 256;
  b.copy_rank.resize(n);
  b.copy_slot.resize(n);
  b.copy_replica.resize(n);
  b.copy_row.resize(n);
  b.copy_entry.resize(n);
  b.row_token.resize(n);
  b.row_forwards.resize(n);
  b.row_entry_offsets.resize(n + 1);
  b.rank_offsets.resize(ranks + 1);
  b.rank_entry_offsets.resize(ranks + 1);
  b.entry_copy.resize(n);
  b.entry_target.resize(n);
  b.entry_slot.resize(n);
  b.entry_weight.resize(weights ? n : 0);
  b.slot_counts.resize(ranks * S);
  b.reach.resize(ranks);
  b.links.resize(3);
  b.error.resize(1);
  b.key_in.resize(n);
  b.key_out.resize(n);
  b.val_in.resize(n);
  b.val_out.resize(n);
  b.local_row.resize(n);
  b.row_size.resize(n);
  b.sorted_size.resize(n + 1);
  b.rank_rows.resize(ranks + 1);

  LOCUS_CUDA_CHECK(cudaMemsetAsync(b.slot_counts.data(), 0, ranks * S * sizeof(std::int32_t), stream));
  LOCUS_CUDA_CHECK(cudaMemsetAsync(b.reach.data(), 0, ranks * sizeof(std::int32_t), stream));
  LOCUS_CUDA_CHECK(cudaMemsetAsync(b.links.data(), 0, 3 * sizeof(unsigned long long), stream));
  LOCUS_CUDA_CHECK(cudaMemsetAsync(b.rank_rows.data(), 0, (ranks + 1) * sizeof(std::int32_t), stream));
  LOCUS_CUDA_CHECK(cudaMemsetAsync(b.error.data(), 0x7f, sizeof(std::int32_t), stream)); // "no error": a huge index
  if (n == 0) {
    LOCUS_CUDA_CHECK(cudaMemsetAsync(b.rank_offsets.data(), 0, (ranks + 1) * sizeof(std::int32_t), stream));
    LOCUS_CUDA_CHECK(cudaMemsetAsync(b.rank_entry_offsets.data(), 0, (ranks + 1) * sizeof(std::int32_t), stream));
    LOCUS_CUDA_CHECK(cudaMemsetAsync(b.row_entry_offsets.data(), 0, sizeof(std::int32_t), stream));
    return;
  }

  // CUB temporary storage: the largest of the three calls.
  std::size_t t_sort1 = 0, t_sort2 = 0, t_scan = 0;
  LOCUS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, t_sort1, b.key_in.data(), b.key_out.data(), b.val_in.data(),
                                                   b.val_out.data(), static_cast<int>(n), 0,
                                                   key_bits(2 * experts.value()), stream));
  LOCUS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, t_sort2, b.key_in.data(), b.key_out.data(), b.val_in.data(),
                                                   b.val_out.data(), static_cast<int>(n), 0, key_bits(buckets),
                                                   stream));
  LOCUS_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, t_scan, b.sorted_size.data(), b.row_entry_offsets.data(),
                                                 static_cast<int>(n + 1), stream));
  std::size_t t_scan2 = 0;
  LOCUS_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, t_scan2, b.rank_rows.data(), b.rank_offsets.data(),
                                                 static_cast<int>(ranks + 1), stream));
  std::size_t temp = t_sort1 > t_sort2 ? t_sort1 : t_sort2;
  temp = temp > t_scan ? temp : t_scan;
  temp = temp > t_scan2 ? temp : t_scan2;
  b.temp.resize(temp);

  validate_kernel<K, Experts><<<blocks_for(tokens, threads), threads, 0, stream>>>(
      ids, weights, tokens, experts, p, b.fixed.data(), b.cand_offsets.data(), b.cands.data(), replicas, rule,
      b.error.data(), b.key_in.data(), b.val_in.data(), b.copy_replica.data());
  LOCUS_CUDA_CHECK(cudaGetLastError());
  LOCUS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp.data(), temp, b.key_in.data(), b.key_out.data(),
                                                   b.val_in.data(), b.val_out.data(), static_cast<int>(n), 0,
                                                   key_bits(2 * experts.value()), stream));
  replica_kernel<<<blocks_for(n, threads), threads, 0, stream>>>(
      b.key_out.data(), b.val_out.data(), n, b.fixed.data(), b.cand_offsets.data(), b.cands.data(), rule, replicas,
      p.slots, b.copy_rank.data(), b.copy_slot.data(), b.copy_replica.data(), b.slot_counts.data());
  LOCUS_CUDA_CHECK(cudaGetLastError());
  group_kernel<K><<<blocks_for(tokens, threads), threads, 0, stream>>>(
      p, b.copy_rank.data(), b.copy_slot.data(), tokens, static_cast<std::int32_t>(buckets), b.local_row.data(),
      b.key_in.data(), b.val_in.data(), b.row_size.data(), b.rank_rows.data(), b.reach.data(), b.links.data());
  LOCUS_CUDA_CHECK(cudaGetLastError());
  LOCUS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp.data(), temp, b.key_in.data(), b.key_out.data(),
                                                   b.val_in.data(), b.val_out.data(), static_cast<int>(n), 0,
                                                   key_bits(buckets), stream));
  LOCUS_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(b.temp.data(), temp, b.rank_rows.data(), b.rank_offsets.data(),
                                                 static_cast<int>(ranks + 1), stream));
  row_sizes_kernel<<<blocks_for(n + 1, threads), threads, 0, stream>>>(b.val_out.data(), b.row_size.data(), n,
                                                                       b.sorted_size.data());
  LOCUS_CUDA_CHECK(cudaGetLastError());
  LOCUS_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(b.temp.data(), temp, b.sorted_size.data(), b.row_entry_offsets.data(),
                                                 static_cast<int>(n + 1), stream));
  place_kernel<K><<<blocks_for(n, threads), threads, 0, stream>>>(
      p, b.key_out.data(), b.val_out.data(), b.rank_offsets.data(), static_cast<std::int32_t>(ranks),
      b.row_entry_offsets.data(), b.copy_rank.data(), b.copy_slot.data(), b.local_row.data(), weights,
      b.row_token.data(), p.node ? b.row_forwards.data() : nullptr, b.copy_row.data(), b.copy_entry.data(),
      b.entry_copy.data(), b.entry_target.data(), b.entry_slot.data(), weights ? b.entry_weight.data() : nullptr);
  LOCUS_CUDA_CHECK(cudaGetLastError());
  rank_entry_offsets_kernel<<<blocks_for(ranks + 1, threads), threads, 0, stream>>>(
      b.rank_offsets.data(), b.row_entry_offsets.data(), static_cast<std::int32_t>(ranks), b.rank_entry_offsets.data());
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout
