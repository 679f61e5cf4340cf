#pragma once
//! @file
//! The per-token and per-row logic of a layout, written once for the host path
//! (`transport/layout.hpp`) and the CUDA kernels (`transport/detail/kernels/layout.cuh`), so both
//! produce the same layout by construction.

#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/transport/replica_selection.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout {

//! The end bit of a radix sort over keys 0..max_key, max_key included (at most 31: the keys are
//! non-negative int32).
inline int key_bits(std::size_t max_key) {
  int b = 1;
  while (b < 31 && (std::size_t{1} << b) <= max_key)
    ++b;
  return b;
}

//! Blocks of `threads` threads covering n items, at least one (a launch of no blocks is an error;
//! the stage bodies stride over n, so one block with nothing to do does nothing).
inline unsigned blocks_for(std::size_t n, unsigned threads = 256) {
  const std::size_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b > 0 ? b : 1);
}

//! Per-source constants of a layout build.
struct token_params {
  std::int32_t source = 0;       //!< source rank
  std::int32_t gpus = 1;         //!< GPUs per node
  std::int32_t slots = 1;        //!< slots per rank
  std::int32_t bucket_width = 1; //!< bucket keys per rank: slots (flat) or gpus × slots (node)
  bool node = false;             //!< node-deduplicated rows
};

// The replica rule (transport/replica_selection.hpp), named here for the kernels.
using ::locus::transport::choose_replica;
using ::locus::transport::join_candidate;
using ::locus::transport::joins_rows;

//! The replicas one token's copies join under the locality rules (transport/replica_selection.hpp),
//! from its source's tables (replica_candidates): per copy j, the replica it joins, or -1 (a fixed
//! copy, or a balanced one that joins nothing and takes the round robin). `e` holds the token's `k`
//! experts, valid and distinct; `replicas` is the map's CSR replica array. The host layout calls it
//! per token, the device layout's validate_kernel per thread.
template <std::size_t KMax, class Id>
LOCUS_HOST_DEVICE void token_joins(const token_params& p, const Id* e, std::size_t k, const std::int32_t* fixed,
                                   const std::int32_t* cand_offsets, const std::int32_t* cands,
                                   const slot_ref* replicas, std::int32_t* join) {
  std::int32_t reached[KMax] = {}; // set before read; zeroed so no compiler warns otherwise
  std::int32_t n = 0;
  for (std::size_t j = 0; j < k; ++j) {
    const std::int32_t f = fixed[e[j]];
    join[j] = -1;
    if (f >= 0) reached[n++] = replicas[f].rank;
  }
  const auto rank_of = [replicas](std::int32_t i) { return replicas[i].rank; };
  for (std::size_t j = 0; j < k; ++j) {
    const auto x = static_cast<std::int32_t>(e[j]);
    if (fixed[x] >= 0) continue;
    join[j] = join_candidate(cands + cand_offsets[x], cand_offsets[x + 1] - cand_offsets[x], rank_of, reached, n,
                             p.source, p.gpus, p.node);
  }
}

//! The device layout's sort key of a copy of expert `e`: its expert, then whether it joined a
//! row (joined copies sort after the expert's balanced ones, so a balanced copy's place in its
//! run is its round-robin index).
LOCUS_HOST_DEVICE std::int32_t replica_sort_key(std::int32_t e, bool joined) { return 2 * e + (joined ? 1 : 0); }

//! The rank a copy bound for `dst` is sent to: `dst`, or for a node layout and a remote node the
//! rail peer (the rank with the source's local rank on `dst`'s node).
LOCUS_HOST_DEVICE std::int32_t send_rank(const token_params& p, std::int32_t dst) {
  if (!p.node || dst / p.gpus == p.source / p.gpus) return dst;
  return dst / p.gpus * p.gpus + p.source % p.gpus;
}

//! Groups one token's `k` copies (destination ranks and slots) into rows.
//! Writes, per copy, the row index within the token (`local_row`), and per row its bucket key
//! (send rank × bucket width + lead entry), entry count and forwards. Returns the row count.
template <std::size_t KMax>
LOCUS_HOST_DEVICE std::int32_t group_rows(const token_params& p, const std::int32_t* rank, const std::int32_t* slot,
                                          std::size_t k, std::int32_t* local_row, std::int32_t* row_key,
                                          std::int32_t* row_size, std::int32_t* row_forwards) {
  std::int32_t send[KMax];
  std::int32_t rows = 0;
  for (std::size_t j = 0; j < k; ++j) {
    const std::int32_t dst = rank[j];
    const std::int32_t to = send_rank(p, dst);
    const std::int32_t sub = p.node ? (dst % p.gpus) * p.slots + slot[j] : slot[j];
    std::int32_t i = 0;
    while (i < rows && send[i] != to)
      ++i;
    if (i == rows) {
      send[i] = to;
      row_key[i] = sub;
      row_size[i] = 0;
      row_forwards[i] = 0;
      ++rows;
    }
    row_key[i] = sub < row_key[i] ? sub : row_key[i];
    ++row_size[i];
    // A forward per distinct destination other than the receiving peer (an equal destination
    // implies the same row).
    if (dst != to) {
      bool fresh = true;
      for (std::size_t q = 0; q < j; ++q)
        fresh &= rank[q] != dst;
      if (fresh) ++row_forwards[i];
    }
    local_row[j] = i;
  }
  for (std::int32_t i = 0; i < rows; ++i)
    row_key[i] += send[i] * p.bucket_width;
  return rows;
}

//! Whether copy j of a token is the first of its copies on its rank (`rank[0..j]`): a token
//! reaches each rank once however many of its copies land there (the layout's `reach` counts).
LOCUS_HOST_DEVICE bool first_copy_on_rank(const std::int32_t* rank, std::size_t j) {
  for (std::size_t q = 0; q < j; ++q)
    if (rank[q] == rank[j]) return false;
  return true;
}

//! Link class index (0 same GPU, 1 intra-node, 2 inter-node) of a row sent to `to`.
LOCUS_HOST_DEVICE std::int32_t row_link(const token_params& p, std::int32_t to) {
  if (to == p.source) return 0;
  return to / p.gpus == p.source / p.gpus ? 1 : 2;
}

//! The copies (indices `c0 + j`) of row `row` of a token, ordered by (rank, slot). Returns how many.
template <std::size_t KMax>
LOCUS_HOST_DEVICE std::int32_t row_members(const token_params& p, const std::int32_t* rank, const std::int32_t* slot,
                                           const std::int32_t* local_row, std::size_t k, std::int32_t row,
                                           std::int32_t* members) {
  std::int32_t m = 0;
  for (std::size_t j = 0; j < k; ++j) {
    if (local_row[j] != row) continue;
    const std::int64_t key = std::int64_t{rank[j]} * p.slots + slot[j];
    std::int32_t q = m++;
    while (q > 0 && std::int64_t{rank[members[q - 1]]} * p.slots + slot[members[q - 1]] > key) {
      members[q] = members[q - 1];
      --q;
    }
    members[q] = static_cast<std::int32_t>(j);
  }
  return m;
}

//! The replica of the copy at position `p` of one source's copies sorted stably by
//! replica_sort_key (the device layout's replica stage, one thread per position): a joined copy's
//! is `join[copy]` (token_joins); a balanced copy's index within its expert's run of balanced
//! copies is its round-robin index (the locality rules), its copy index (token × k + choice) its
//! position in the batch (random). Equal to the host layout's pass, which counts each expert's
//! balanced copies in copy order.
LOCUS_HOST_DEVICE std::int32_t sorted_copy_replica(const std::int32_t* sorted_key, const std::int32_t* sorted_copy,
                                                   std::size_t p, const std::int32_t* fixed,
                                                   const std::int32_t* cand_offsets, const std::int32_t* cands,
                                                   const std::int32_t* join, placement::replica_rule rule) {
  const std::int32_t key = sorted_key[p];
  if (key & 1) return join[sorted_copy[p]];
  // First position of the run (binary search: runs are sorted).
  std::size_t lo = 0, hi = p;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (sorted_key[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return choose_replica(fixed, cand_offsets, cands, key >> 1, static_cast<std::int32_t>(p - lo), rule, sorted_copy[p]);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::layout
