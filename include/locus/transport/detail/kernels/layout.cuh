#pragma once
//! @file
//! CUDA kernels of the device layout (`transport/device_layout.hpp`). K (top-k) is a template
//! parameter so per-token scratch lives in registers; Experts is a locus::experts extent (static:
//! the range check is against a constant). The per-token logic is the host's
//! (`transport/detail/layout_token.hpp`); sorting and scanning are CUB's, so every order is
//! stable and the result equals the host layout bit for bit.

#include <cstddef>
#include <cstdint>
#include <locus/core/expert_map.hpp>
#include <locus/transport/detail/layout_token.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/replica_selection.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout {

//! Checks ids (range, repeats) and weights (finite); records the smallest offending copy in
//! `*error`; under the locality rules finds the copies that join a row their token already sends
//! (token_joins: the replica, else -1, into `join`); writes (sort key, copy) pairs for the stable
//! sort by expert that puts each expert's balanced copies first (replica_sort_key).
template <std::size_t K, class Experts>
__global__ void validate_kernel(const std::int32_t* ids, const float* weights, std::size_t tokens, Experts experts,
                                token_params p, const std::int32_t* fixed, const std::int32_t* cand_offsets,
                                const std::int32_t* cands, const slot_ref* replicas, placement::replica_rule rule,
                                std::int32_t* error, std::int32_t* key, std::int32_t* copy, std::int32_t* join) {
  const std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  std::int32_t e[K], joined[K];
  bool token_bad = false;
#pragma unroll
  for (std::size_t j = 0; j < K; ++j)
    e[j] = ids[t * K + j];
#pragma unroll
  for (std::size_t j = 0; j < K; ++j) {
    const auto c = static_cast<std::int32_t>(t * K + j);
    bool bad = e[j] < 0 || static_cast<std::size_t>(e[j]) >= experts.value();
    for (std::size_t i = 0; i < j; ++i)
      bad |= e[i] == e[j];
    if (weights && !isfinite(weights[c])) bad = true;
    if (bad) atomicMin(error, c);
    token_bad |= bad;
  }
  // A bad token's layout is discarded; its keys only keep the sort in range.
  if (!token_bad && joins_rows(rule)) {
    token_joins<K>(p, e, K, fixed, cand_offsets, cands, replicas, joined);
  } else {
#pragma unroll
    for (std::size_t j = 0; j < K; ++j)
      joined[j] = -1;
  }
#pragma unroll
  for (std::size_t j = 0; j < K; ++j) {
    const auto c = static_cast<std::int32_t>(t * K + j);
    key[c] = token_bad ? 0 : replica_sort_key(e[j], joined[j] >= 0);
    copy[c] = c;
    join[c] = joined[j];
  }
}

// Non-template kernels are `static`: with external linkage, two translation units that include
// this header would each define them and fail to link.

//! One thread per copy, in sort-key order: the replica (sorted_copy_replica; `copy_replica`
//! holds validate_kernel's joins on entry), its rank and slot, and the slot's count.
static __global__ void replica_kernel(const std::int32_t* sorted_key, const std::int32_t* sorted_copy,
                                      std::size_t copies, const std::int32_t* fixed, const std::int32_t* cand_offsets,
                                      const std::int32_t* cands, placement::replica_rule rule, const slot_ref* replicas,
                                      std::int32_t slots, std::int32_t* copy_rank, std::int32_t* copy_slot,
                                      std::int32_t* copy_replica, std::int32_t* slot_counts) {
  const std::size_t p = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (p >= copies) return;
  const std::int32_t c = sorted_copy[p];
  // Each copy is one thread's: reading its join and writing its replica do not race.
  const std::int32_t rep =
      sorted_copy_replica(sorted_key, sorted_copy, p, fixed, cand_offsets, cands, copy_replica, rule);
  const slot_ref s = replicas[rep];
  copy_replica[c] = rep;
  copy_rank[c] = s.rank;
  copy_slot[c] = s.slot;
  atomicAdd(&slot_counts[s.rank * slots + s.slot], 1);
}

//! One thread per token: rows of the token (group_rows), their bucket keys for the stable sort
//! (unused row places get `sentinel`, which sorts last), counts per send rank and link class,
//! and the tokens reaching each rank.
template <std::size_t K>
__global__ void group_kernel(token_params p, const std::int32_t* copy_rank, const std::int32_t* copy_slot,
                             std::size_t tokens, std::int32_t sentinel, std::int32_t* local_row, std::int32_t* row_key,
                             std::int32_t* row_index, std::int32_t* row_size, std::int32_t* rank_rows,
                             std::int32_t* reach, unsigned long long* links) {
  const std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const std::size_t c0 = t * K;
  std::int32_t rank[K], slot[K], lrow[K], key[K], size[K], fwd[K];
#pragma unroll
  for (std::size_t j = 0; j < K; ++j) {
    rank[j] = copy_rank[c0 + j];
    slot[j] = copy_slot[c0 + j];
  }
  const std::int32_t rows = group_rows<K>(p, rank, slot, K, lrow, key, size, fwd);
#pragma unroll
  for (std::size_t j = 0; j < K; ++j) {
    local_row[c0 + j] = lrow[j];
    const bool used = static_cast<std::int32_t>(j) < rows;
    row_key[c0 + j] = used ? key[j] : sentinel;
    row_index[c0 + j] = static_cast<std::int32_t>(c0 + j);
    row_size[c0 + j] = used ? size[j] : 0;
    if (first_copy_on_rank(rank, j)) atomicAdd(&reach[rank[j]], 1);
    if (used) {
      const std::int32_t to = key[j] / p.bucket_width;
      atomicAdd(&rank_rows[to], 1);
      atomicAdd(&links[row_link(p, to)], 1ull);
      if (fwd[j]) atomicAdd(&links[1], static_cast<unsigned long long>(fwd[j]));
    }
  }
}

//! Entry counts in sorted row order (0 past the last row, and one extra 0 at `places`), for the
//! scan into row_entry_offsets.
static __global__ void row_sizes_kernel(const std::int32_t* sorted_index, const std::int32_t* row_size,
                                        std::size_t places, std::int32_t* sorted_size) {
  const std::size_t q = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (q > places) return;
  sorted_size[q] = q < places ? row_size[sorted_index[q]] : 0; // unused places have size 0
}

//! One thread per row: token, entries (row_members order) and forwards.
template <std::size_t K>
__global__ void place_kernel(token_params p, const std::int32_t* sorted_key, const std::int32_t* sorted_index,
                             const std::int32_t* rank_offsets, std::int32_t ranks,
                             const std::int32_t* row_entry_offsets, const std::int32_t* copy_rank,
                             const std::int32_t* copy_slot, const std::int32_t* local_row, const float* weights,
                             std::int32_t* row_token, std::int32_t* row_forwards, std::int32_t* copy_row,
                             std::int32_t* copy_entry, std::int32_t* entry_copy, std::int32_t* entry_target,
                             std::int32_t* entry_slot, float* entry_weight) {
  const std::size_t r = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (r >= static_cast<std::size_t>(rank_offsets[ranks])) return;
  const std::int32_t src = sorted_index[r];
  const std::int32_t t = src / static_cast<std::int32_t>(K), i = src % static_cast<std::int32_t>(K);
  const std::size_t c0 = static_cast<std::size_t>(t) * K;
  std::int32_t rank[K], slot[K], lrow[K], members[K];
#pragma unroll
  for (std::size_t j = 0; j < K; ++j) {
    rank[j] = copy_rank[c0 + j];
    slot[j] = copy_slot[c0 + j];
    lrow[j] = local_row[c0 + j];
  }
  const std::int32_t m = row_members<K>(p, rank, slot, lrow, K, i, members);
  const std::int32_t to = sorted_key[r] / p.bucket_width;
  std::int32_t entry = row_entry_offsets[r], forwards = 0;
  for (std::int32_t q = 0; q < m; ++q, ++entry) {
    const std::int32_t j = members[q];
    const std::int32_t c = static_cast<std::int32_t>(c0) + j;
    copy_row[c] = static_cast<std::int32_t>(r);
    copy_entry[c] = entry;
    entry_copy[entry] = c;
    entry_target[entry] = rank[j] % p.gpus;
    entry_slot[entry] = slot[j];
    if (weights) entry_weight[entry] = weights[c];
    if (rank[j] != to && (q == 0 || rank[members[q - 1]] != rank[j])) ++forwards;
  }
  row_token[r] = t;
  if (row_forwards) row_forwards[r] = forwards;
}

//! rank_entry_offsets[d] = row_entry_offsets[rank_offsets[d]].
static __global__ void rank_entry_offsets_kernel(const std::int32_t* rank_offsets,
                                                 const std::int32_t* row_entry_offsets, std::int32_t ranks,
                                                 std::int32_t* rank_entry_offsets) {
  const std::int32_t d = static_cast<std::int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (d <= ranks) rank_entry_offsets[d] = row_entry_offsets[rank_offsets[d]];
}

//! stage::plan_nothing_if: zero counts when `*flag` is set.
static __global__ void plan_nothing_kernel(const unsigned long long* flag, std::size_t ranks,
                                           std::int32_t* rank_offsets, std::int32_t* rank_entry_offsets,
                                           std::int32_t* slot_counts, std::size_t slot_count, std::int32_t* reach,
                                           unsigned long long* links) {
  stage::plan_nothing_if(stage::grid_index{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x}, flag, ranks, rank_offsets,
                         rank_entry_offsets, slot_counts, slot_count, reach, links);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout
