#pragma once
//! @file
//! The stage bodies of the token-row movement, written once for the host path
//! (`transport/permute.hpp`) and the CUDA kernels (`transport/detail/kernels/permute.cuh`): row
//! scatter (permute), row gather (unpermute, expert input), weighted row reduction, combine,
//! weighted combine, a segment copy and an exclusive scan of offsets. Each body is the work of one
//! thread of a grid: `grid_index` names the thread, the body strides over rows by `blocks` and
//! over a row's elements by `threads`. A kernel passes blockIdx / threadIdx; the host runs the same
//! body over every index (`run_grid`), so the CPU tests exercise the code the GPU runs.
//!
//! Sums accumulate in float in a fixed order (a row's entries in entry order; a token's rows in
//! order of their first choice j) with separate round-to-nearest multiply and add, so the host and
//! the device give the same bits (the host is built without floating-point contraction, the
//! default on x86-64 without -mfma).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/core/rounded_float.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::stage {

//! One thread of a one-dimensional grid of blocks.
struct grid_index {
  std::size_t block = 0, blocks = 1, thread = 0, threads = 1;
};

//! Runs `body(grid_index)` for every thread of a `blocks × threads` grid, in order (the host
//! executor of a kernel body; bodies must not depend on the order of threads).
template <class Body>
void run_grid(std::size_t blocks, std::size_t threads, Body&& body) {
  for (std::size_t b = 0; b < blocks; ++b)
    for (std::size_t t = 0; t < threads; ++t)
      body(grid_index{b, blocks, t, threads});
}

//! Elements of T per 16-byte vector.
template <class T>
inline constexpr std::size_t per_vec = 16 / sizeof(T);

//! A 16-byte vector of raw bits.
struct alignas(16) vec16 {
  std::uint32_t w[4];
};

LOCUS_HOST_DEVICE vec16 load_vec(const void* p) {
#if LOCUS_IS_DEVICE_PASS()
  const uint4 v = __ldg(static_cast<const uint4*>(p));
  return vec16{{v.x, v.y, v.z, v.w}};
#else
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

LOCUS_HOST_DEVICE void store_vec(void* p, const vec16& v) {
#if LOCUS_IS_DEVICE_PASS()
  *static_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

template <class T>
LOCUS_HOST_DEVICE float load_float(T v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return bfloat16::to_float(v.bits);
}

template <class T>
LOCUS_HOST_DEVICE T store_float(float f) {
  if constexpr (std::is_same_v<T, float>)
    return f;
  else
    return bfloat16::from_bits(bfloat16::from_float(f));
}

//! Elements a thread handles at once: one 16-byte vector (`Vec`) or one element.
template <class T, bool Vec>
inline constexpr std::size_t chunk = Vec ? per_vec<T> : 1;

//! A row width: a std::size_t, or a `locus::hidden` extent - a static one makes it a compile-time
//! constant, so the row loops below are bounded by constants (the same body serves both).
template <class H>
LOCUS_HOST_DEVICE constexpr std::size_t width(H h) noexcept {
  if constexpr (std::is_integral_v<H>)
    return static_cast<std::size_t>(h);
  else
    return h.value();
}

//! Whether rows of `hidden` elements at `a` and `b` can move in 16-byte vectors.
template <class T>
bool vectorisable(std::size_t hidden, const void* a, const void* b) {
  return (hidden * sizeof(T)) % 16 == 0 && reinterpret_cast<std::uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<std::uintptr_t>(b) % 16 == 0;
}

// acc += w * y (Weighted) or y, for the chunk<T, Vec> elements at `y`.
template <class T, bool Vec, bool Weighted>
LOCUS_HOST_DEVICE void accumulate(float* acc, const T* y, float w) {
  constexpr std::size_t n = chunk<T, Vec>;
  T v[n];
  if constexpr (Vec) {
    const vec16 bits = load_vec(y);
    std::memcpy(static_cast<void*>(v), &bits, sizeof bits);
  } else {
    v[0] = y[0];
  }
  LOCUS_UNROLL
  for (std::size_t i = 0; i < n; ++i) {
    const float x = load_float(v[i]);
    acc[i] = locus::detail::fadd(acc[i], Weighted ? locus::detail::fmul(w, x) : x);
  }
}

template <class T, bool Vec>
LOCUS_HOST_DEVICE void store(T* out, const float* acc) {
  constexpr std::size_t n = chunk<T, Vec>;
  T v[n];
  LOCUS_UNROLL
  for (std::size_t i = 0; i < n; ++i)
    v[i] = store_float<T>(acc[i]);
  if constexpr (Vec) {
    vec16 bits;
    std::memcpy(&bits, static_cast<const void*>(v), sizeof bits);
    store_vec(out, bits);
  } else {
    out[0] = v[0];
  }
}

//! Whether choice j of a token (its rows `cr[0..k)`) is the first to name its row: a row shared
//! by several choices is written or summed once.
LOCUS_HOST_DEVICE bool first_choice_of_row(const std::int32_t* cr, std::size_t j) {
  bool f = true;
  for (std::size_t i = 0; i < j; ++i)
    f &= cr[i] != cr[j];
  return f;
}

//! A token's rows (`cr[0..k)`, one per choice) as the scatter and the combine walk them: choice
//! j's row when it is the first to name it, else -1. A static top-k (`K`) keeps the rows and
//! their freshness in registers, computed once per token; a dynamic one reads them per use.
template <class K>
class token_rows {
public:
  LOCUS_HOST_DEVICE explicit token_rows(const std::int32_t* cr) : cr_(cr) {
    if constexpr (K::is_static) {
      LOCUS_UNROLL
      for (std::size_t j = 0; j < cached; ++j)
        row_[j] = first_choice_of_row(cr, j) ? cr[j] : -1;
    }
  }
  LOCUS_HOST_DEVICE std::int32_t first_row(std::size_t j) const {
    if constexpr (K::is_static)
      return row_[j];
    else
      return first_choice_of_row(cr_, j) ? cr_[j] : -1;
  }

private:
  static constexpr std::size_t cached = K::is_static ? K::static_value : 1;
  const std::int32_t* cr_;
  std::int32_t row_[cached] = {};
};

//! `dst[r] = src[index[r * stride]]` for r < rows. `hidden` (here and below): see width().
template <class T, bool Vec, class H>
LOCUS_HOST_DEVICE void gather_rows(grid_index g, const T* LOCUS_RESTRICT src, const std::int32_t* LOCUS_RESTRICT index,
                                   std::size_t stride, std::size_t rows, H hidden_extent, T* LOCUS_RESTRICT dst) {
  const std::size_t hidden = width(hidden_extent);
  for (std::size_t r = g.block; r < rows; r += g.blocks) {
    const auto from = static_cast<std::size_t>(index[r * stride]);
    if constexpr (Vec) {
      const std::size_t vecs = hidden / per_vec<T>;
      const T* s = src + from * hidden;
      T* d = dst + r * hidden;
      for (std::size_t i = g.thread; i < vecs; i += g.threads)
        store_vec(d + i * per_vec<T>, load_vec(s + i * per_vec<T>));
    } else {
      for (std::size_t i = g.thread; i < hidden; i += g.threads)
        dst[r * hidden + i] = src[from * hidden + i];
    }
  }
}

//! `dst[r] = weight[r] · src[index[r]]` for r < rows, the weight rounded to T first and each product
//! in fp32 rounded to T, as engines scale a bf16 row by a bf16 score (Hugging Face's and vLLM's
//! Llama 4: the score cast to the hidden states' type, then multiplied): the expert input of a
//! routing whose weights apply to it (weight_site::expert_input), as the host dispatcher scales its rows.
template <class T, bool Vec, class H>
LOCUS_HOST_DEVICE void gather_scaled_rows(grid_index g, const T* LOCUS_RESTRICT src,
                                          const std::int32_t* LOCUS_RESTRICT index, const float* LOCUS_RESTRICT weight,
                                          std::size_t rows, H hidden_extent, T* LOCUS_RESTRICT dst) {
  const std::size_t hidden = width(hidden_extent);
  constexpr std::size_t n = chunk<T, Vec>;
  for (std::size_t r = g.block; r < rows; r += g.blocks) {
    const T* s = src + static_cast<std::size_t>(index[r]) * hidden;
    T* d = dst + r * hidden;
    const float w = load_float(store_float<T>(weight[r]));
    for (std::size_t h = g.thread * n; h < hidden; h += g.threads * n) {
      T in[n];
      if constexpr (Vec) {
        const vec16 bits = load_vec(s + h);
        std::memcpy(static_cast<void*>(in), &bits, sizeof bits);
      } else {
        in[0] = s[h];
      }
      float v[n];
      LOCUS_UNROLL
      for (std::size_t i = 0; i < n; ++i)
        v[i] = locus::detail::fmul(w, load_float(in[i]));
      store<T, Vec>(d + h, v);
    }
  }
}

//! `dst[copy_row[t * k + j]] = src[t]` for every token t < tokens and choice j (a row shared by
//! several choices is written once): the permute, read token-major, so each token is read once
//! however many rows it fills (gather_rows over row_token reads it once per row). Every row of a
//! layout is some choice's row, so every row is written.
template <class T, bool Vec, class K, class H>
LOCUS_HOST_DEVICE void scatter_rows(grid_index g, K k, const T* LOCUS_RESTRICT src,
                                    const std::int32_t* LOCUS_RESTRICT copy_row, std::size_t tokens, H hidden_extent,
                                    T* LOCUS_RESTRICT dst) {
  const std::size_t hidden = width(hidden_extent);
  constexpr std::size_t n = chunk<T, Vec>;
  const std::size_t kv = k.value();
  for (std::size_t t = g.block; t < tokens; t += g.blocks) {
    const token_rows<K> rows(copy_row + t * kv);
    // Element h of choice j's row, or nullptr when an earlier choice has the same row.
    const auto target = [&](std::size_t j, std::size_t h) -> T* {
      const std::int32_t r = rows.first_row(j);
      return r >= 0 ? dst + static_cast<std::size_t>(r) * hidden + h : nullptr;
    };
    const T* s = src + t * hidden;
    for (std::size_t h = g.thread * n; h < hidden; h += g.threads * n) {
      if constexpr (Vec) {
        const vec16 v = load_vec(s + h);
        LOCUS_UNROLL
        for (std::size_t j = 0; j < kv; ++j)
          if (T* d = target(j, h)) store_vec(d, v);
      } else {
        const T v = s[h];
        LOCUS_UNROLL
        for (std::size_t j = 0; j < kv; ++j)
          if (T* d = target(j, h)) *d = v;
      }
    }
  }
}

//! Copies `bytes` bytes from `src` to `dst`: one pair of the one-GPU transport's copies
//! (detail/group_gather.hpp), shared by the blocks of one grid row. `Vec`: 16-byte vectors, four
//! in flight per thread (both pointers and `bytes` must be multiples of 16).
template <bool Vec>
LOCUS_HOST_DEVICE void copy_bytes(grid_index g, const std::byte* LOCUS_RESTRICT src, std::byte* LOCUS_RESTRICT dst,
                                  std::size_t bytes) {
  const std::size_t step = g.blocks * g.threads;
  std::size_t i = g.block * g.threads + g.thread;
  if constexpr (Vec) {
    constexpr std::size_t unroll = 4;
    const std::size_t vecs = bytes / 16;
    for (; i + (unroll - 1) * step < vecs; i += unroll * step) {
      vec16 v[unroll];
      LOCUS_UNROLL
      for (std::size_t u = 0; u < unroll; ++u)
        v[u] = load_vec(src + (i + u * step) * 16);
      LOCUS_UNROLL
      for (std::size_t u = 0; u < unroll; ++u)
        store_vec(dst + (i + u * step) * 16, v[u]);
    }
    for (; i < vecs; i += step)
      store_vec(dst + i * 16, load_vec(src + i * 16));
  } else {
    for (; i < bytes; i += step)
      dst[i] = src[i];
  }
}

//! `out[r] = sum over r's entries e (in order) of weight[p] * y[p]`, p = entry_position[e]; of
//! y[p] alone when `weight` is null (the weights applied to the expert input: 1 · y is y).
template <class T, bool Vec, class H>
LOCUS_HOST_DEVICE void
reduce_rows(grid_index g, const T* LOCUS_RESTRICT y, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
            const std::int32_t* LOCUS_RESTRICT entry_position, const float* LOCUS_RESTRICT weight, std::size_t rows,
            H hidden_extent, T* LOCUS_RESTRICT out) {
  const std::size_t hidden = width(hidden_extent);
  constexpr std::size_t n = chunk<T, Vec>;
  for (std::size_t r = g.block; r < rows; r += g.blocks) {
    const std::int32_t e0 = row_entry_offsets[r], e1 = row_entry_offsets[r + 1];
    for (std::size_t h = g.thread * n; h < hidden; h += g.threads * n) {
      float acc[n] = {};
      for (std::int32_t e = e0; e < e1; ++e) {
        const auto p = static_cast<std::size_t>(entry_position[e]);
        accumulate<T, Vec, true>(acc, y + p * hidden + h, weight ? weight[p] : 1.0f);
      }
      store<T, Vec>(out + r * hidden + h, acc);
    }
  }
}

//! `out[t] = sum of t's distinct rows (first choice first)`, unweighted. `k` is a
//! `locus::top_k` extent: a static one keeps the token's rows in registers and unrolls the loops.
template <class T, bool Vec, class K, class H>
LOCUS_HOST_DEVICE void combine(grid_index g, K k, const T* LOCUS_RESTRICT rows_in,
                               const std::int32_t* LOCUS_RESTRICT copy_row, std::size_t tokens, H hidden_extent,
                               T* LOCUS_RESTRICT out) {
  const std::size_t hidden = width(hidden_extent);
  constexpr std::size_t n = chunk<T, Vec>;
  const std::size_t kv = k.value();
  for (std::size_t t = g.block; t < tokens; t += g.blocks) {
    // A row shared by several choices counts once: choice j adds its row when no earlier choice
    // has the same row.
    const token_rows<K> rows(copy_row + t * kv);
    for (std::size_t h = g.thread * n; h < hidden; h += g.threads * n) {
      float acc[n] = {};
      LOCUS_UNROLL
      for (std::size_t j = 0; j < kv; ++j)
        if (const std::int32_t r = rows.first_row(j); r >= 0)
          accumulate<T, Vec, false>(acc, rows_in + static_cast<std::size_t>(r) * hidden + h, 0.0f);
      store<T, Vec>(out + t * hidden + h, acc);
    }
  }
}

//! `out[t] = sum over j of weight[e] * y[e]`, e = copy_entry[t * k + j], j ascending.
template <class T, bool Vec, class K, class H>
LOCUS_HOST_DEVICE void
combine_weighted(grid_index g, K k, const T* LOCUS_RESTRICT y, const std::int32_t* LOCUS_RESTRICT copy_entry,
                 const float* LOCUS_RESTRICT weight, std::size_t tokens, H hidden_extent, T* LOCUS_RESTRICT out) {
  const std::size_t hidden = width(hidden_extent);
  constexpr std::size_t n = chunk<T, Vec>;
  constexpr std::size_t cached = K::is_static ? K::static_value : 1;
  const std::size_t kv = k.value();
  for (std::size_t t = g.block; t < tokens; t += g.blocks) {
    const std::int32_t* ce = copy_entry + t * kv;
    std::int32_t entry[cached] = {};
    float w[cached] = {};
    if constexpr (K::is_static) {
      LOCUS_UNROLL
      for (std::size_t j = 0; j < cached; ++j) {
        entry[j] = ce[j];
        w[j] = weight[ce[j]];
      }
    }
    for (std::size_t h = g.thread * n; h < hidden; h += g.threads * n) {
      float acc[n] = {};
      LOCUS_UNROLL
      for (std::size_t j = 0; j < kv; ++j) {
        std::int32_t e;
        float we;
        if constexpr (K::is_static) {
          e = entry[j];
          we = w[j];
        } else {
          e = ce[j];
          we = weight[e];
        }
        accumulate<T, Vec, true>(acc, y + static_cast<std::size_t>(e) * hidden + h, we);
      }
      store<T, Vec>(out + t * hidden + h, acc);
    }
  }
}

//! `out[i] = offsets[i + 1] - offsets[i]` for i < n: per-row counts from exclusive offsets (the
//! entry counts a receiver needs with each row).
LOCUS_HOST_DEVICE void adjacent_difference(grid_index g, const std::int32_t* LOCUS_RESTRICT offsets, std::size_t n,
                                           std::int32_t* LOCUS_RESTRICT out) {
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads)
    out[i] = offsets[i + 1] - offsets[i];
}

//! `out[i] = in[0] + ... + in[i - 1]` for i ≤ n (n + 1 values; `out[0] = 0`), by one thread: the
//! host executor's form of the scans the device stages take from CUB (the same sums).
LOCUS_HOST_DEVICE void exclusive_scan(grid_index g, const std::int32_t* LOCUS_RESTRICT in, std::size_t n,
                                      std::int32_t* LOCUS_RESTRICT out) {
  if (g.block != 0 || g.thread != 0) return;
  std::int32_t sum = 0;
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = sum;
    sum += in[i];
  }
  out[n] = sum;
}

//! A layout told to plan nothing: when `*flag` is not zero (a rank whose routing must send no
//! tokens, e.g. the router's non-finite-logit counter), its per-rank row and entry offsets
//! (`ranks + 1` values each), its per-(rank, slot) copy counts (`slot_counts` values), its
//! tokens reaching each rank (`ranks` values) and its per-link copy counts (3) become zero, so the counts the host
//! reads with them say "no rows"; otherwise they are left as the layout built them. The flag is read on the device,
//! after the router and the layout, so the host learns it in the same wait as the counts instead of one of its own.
LOCUS_HOST_DEVICE void plan_nothing_if(grid_index g, const unsigned long long* LOCUS_RESTRICT flag, std::size_t ranks,
                                       std::int32_t* LOCUS_RESTRICT rank_offsets,
                                       std::int32_t* LOCUS_RESTRICT rank_entry_offsets,
                                       std::int32_t* LOCUS_RESTRICT slot_counts, std::size_t slot_count,
                                       std::int32_t* LOCUS_RESTRICT reach, unsigned long long* LOCUS_RESTRICT links) {
  if (*flag == 0) return;
  std::size_t n = ranks + 1 > 3 ? ranks + 1 : 3;
  n = n > slot_count ? n : slot_count;
  for (std::size_t i = g.block * g.threads + g.thread; i < n; i += g.blocks * g.threads) {
    if (i <= ranks) {
      rank_offsets[i] = 0;
      rank_entry_offsets[i] = 0;
    }
    if (i < ranks) reach[i] = 0;
    if (i < slot_count) slot_counts[i] = 0;
    if (i < 3) links[i] = 0;
  }
}

//! `out[r] = 0` for r < rows: what a row stage writes instead of its result when its input was
//! refused (the weighted reduction of a receive layout whose metadata failed its check), striding
//! as the row bodies do.
template <class T, class H>
LOCUS_HOST_DEVICE void zero_rows(grid_index g, std::size_t rows, H hidden_extent, T* LOCUS_RESTRICT out) {
  const std::size_t hidden = width(hidden_extent);
  for (std::size_t r = g.block; r < rows; r += g.blocks)
    for (std::size_t i = g.thread; i < hidden; i += g.threads)
      out[r * hidden + i] = T{};
}

//! @name The intra-node fan-out of a hierarchical dispatch, as a rail peer computes it: which of
//! the rows it received in the rail stage go to which rank of its node, with the entries for that
//! rank (transport::node_fanout, the host's make_node_fanout: target-major, rows in received
//! order, a row's entries in their order). Three steps: fanout_count, then exclusive_scan of both
//! of its outputs, then fanout_place.
//! @{

//! Per received row r and local rank g < gpus: `count[g * rows + r]` = r's entries targeting g,
//! `present[g * rows + r]` = 1 when there is one. `row_entry_offsets` has rows + 1 values.
LOCUS_HOST_DEVICE void fanout_count(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
                                    const std::int32_t* LOCUS_RESTRICT entry_target, std::size_t rows, std::size_t gpus,
                                    std::int32_t* LOCUS_RESTRICT count, std::int32_t* LOCUS_RESTRICT present) {
  for (std::size_t r = g.block * g.threads + g.thread; r < rows; r += g.blocks * g.threads)
    for (std::size_t t = 0; t < gpus; ++t) {
      std::int32_t n = 0;
      for (std::int32_t e = row_entry_offsets[r]; e < row_entry_offsets[r + 1]; ++e)
        n += static_cast<std::size_t>(entry_target[e]) == t;
      count[t * rows + r] = n;
      present[t * rows + r] = n > 0;
    }
}

//! Writes the fan-out from the exclusive scans of fanout_count's outputs (`row_at` of `present`,
//! `entry_at` of `count`, gpus × rows + 1 values each): per fan-out row its received row and entry
//! count, per fan-out entry its slot, weight (when `weight` is not null) and received entry index.
LOCUS_HOST_DEVICE void fanout_place(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets,
                                    const std::int32_t* LOCUS_RESTRICT entry_target,
                                    const std::int32_t* LOCUS_RESTRICT entry_slot, const float* LOCUS_RESTRICT weight,
                                    std::size_t rows, std::size_t gpus, const std::int32_t* LOCUS_RESTRICT row_at,
                                    const std::int32_t* LOCUS_RESTRICT entry_at, std::int32_t* LOCUS_RESTRICT out_row,
                                    std::int32_t* LOCUS_RESTRICT out_row_entries, std::int32_t* LOCUS_RESTRICT out_slot,
                                    float* LOCUS_RESTRICT out_weight, std::int32_t* LOCUS_RESTRICT out_source) {
  for (std::size_t r = g.block * g.threads + g.thread; r < rows; r += g.blocks * g.threads)
    for (std::size_t t = 0; t < gpus; ++t) {
      const std::size_t i = t * rows + r;
      if (row_at[i + 1] == row_at[i]) continue; // no entry of r targets t
      out_row[row_at[i]] = static_cast<std::int32_t>(r);
      out_row_entries[row_at[i]] = entry_at[i + 1] - entry_at[i];
      std::int32_t q = entry_at[i];
      for (std::int32_t e = row_entry_offsets[r]; e < row_entry_offsets[r + 1]; ++e) {
        if (static_cast<std::size_t>(entry_target[e]) != t) continue;
        out_slot[q] = entry_slot[e];
        if (weight) out_weight[q] = weight[e];
        out_source[q] = e;
        ++q;
      }
    }
}

//! `target_row_offsets[t] = row_at[t * rows]` for t ≤ gpus: where each local rank's fan-out rows
//! begin (node_fanout::target_row_offsets).
LOCUS_HOST_DEVICE void fanout_targets(grid_index g, const std::int32_t* LOCUS_RESTRICT row_at, std::size_t rows,
                                      std::size_t gpus, std::int32_t* LOCUS_RESTRICT target_row_offsets) {
  for (std::size_t t = g.block * g.threads + g.thread; t <= gpus; t += g.blocks * g.threads)
    target_row_offsets[t] = row_at[t * rows];
}
//! @}

//! @name Receive layout
//! The receive layout (`receive_layout`) built where the received metadata lies: entries ordered
//! by local slot, then by received row (stably, i.e. in entry order). Entries are cut into chunks
//! of `chunk` consecutive entries; each chunk counts its entries per slot, an exclusive scan of
//! those counts (slot-major: `count[s * chunks + c]`) gives each (slot, chunk) its first position,
//! and each chunk places its entries from there. Steps: entry_rows, slot_chunk_count,
//! exclusive_scan of the counts (`slots * chunks` values), slot_offsets_of, slot_chunk_place.
//! Slots must lie in [0, slots) (the source layouts wrote them from the expert map).
//! @{

//! Chunks of `chunk` entries covering `entries`.
LOCUS_HOST_DEVICE std::size_t slot_chunks(std::size_t entries, std::size_t chunk) {
  return (entries + chunk - 1) / chunk;
}

//! `entry_row[e]` = the received row whose entries include e (`row_entry_offsets`: rows + 1).
LOCUS_HOST_DEVICE void entry_rows(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_offsets, std::size_t rows,
                                  std::int32_t* LOCUS_RESTRICT entry_row) {
  for (std::size_t r = g.block * g.threads + g.thread; r < rows; r += g.blocks * g.threads)
    for (std::int32_t e = row_entry_offsets[r]; e < row_entry_offsets[r + 1]; ++e)
      entry_row[e] = static_cast<std::int32_t>(r);
}

//! `count[s * chunks + c]` = entries of chunk c with local slot s, for every slot s < slots.
LOCUS_HOST_DEVICE void slot_chunk_count(grid_index g, const std::int32_t* LOCUS_RESTRICT entry_slot,
                                        std::size_t entries, std::size_t slots, std::size_t chunk,
                                        std::int32_t* LOCUS_RESTRICT count) {
  const std::size_t chunks = slot_chunks(entries, chunk);
  for (std::size_t c = g.block * g.threads + g.thread; c < chunks; c += g.blocks * g.threads) {
    for (std::size_t s = 0; s < slots; ++s)
      count[s * chunks + c] = 0;
    const std::size_t end = c * chunk + chunk < entries ? c * chunk + chunk : entries;
    for (std::size_t e = c * chunk; e < end; ++e)
      ++count[static_cast<std::size_t>(entry_slot[e]) * chunks + c];
  }
}

//! `slot_offsets[s] = at[s * chunks]` for s ≤ slots (`at`: the exclusive scan of slot_chunk_count).
LOCUS_HOST_DEVICE void slot_offsets_of(grid_index g, const std::int32_t* LOCUS_RESTRICT at, std::size_t entries,
                                       std::size_t slots, std::size_t chunk,
                                       std::int32_t* LOCUS_RESTRICT slot_offsets) {
  const std::size_t chunks = slot_chunks(entries, chunk);
  for (std::size_t s = g.block * g.threads + g.thread; s <= slots; s += g.blocks * g.threads)
    slot_offsets[s] = at[s * chunks];
}

//! Places each entry of each chunk at `at[slot * chunks + c]` plus the entries of that chunk and
//! slot before it: `expert_row`, `expert_weight` (when `weight` is not null) and `entry_position`
//! as receive_layout has them. The count of earlier same-slot entries is recounted per entry (a
//! chunk is short), so no body writes another's counters.
LOCUS_HOST_DEVICE void slot_chunk_place(grid_index g, const std::int32_t* LOCUS_RESTRICT entry_slot,
                                        const float* LOCUS_RESTRICT weight,
                                        const std::int32_t* LOCUS_RESTRICT entry_row, std::size_t entries,
                                        std::size_t chunk, const std::int32_t* LOCUS_RESTRICT at,
                                        std::int32_t* LOCUS_RESTRICT expert_row, float* LOCUS_RESTRICT expert_weight,
                                        std::int32_t* LOCUS_RESTRICT entry_position) {
  const std::size_t chunks = slot_chunks(entries, chunk);
  for (std::size_t c = g.block * g.threads + g.thread; c < chunks; c += g.blocks * g.threads) {
    const std::size_t begin = c * chunk, end = begin + chunk < entries ? begin + chunk : entries;
    for (std::size_t e = begin; e < end; ++e) {
      const std::int32_t s = entry_slot[e];
      std::int32_t before = 0;
      for (std::size_t f = begin; f < e; ++f)
        before += entry_slot[f] == s;
      const std::int32_t pos = at[static_cast<std::size_t>(s) * chunks + c] + before;
      expert_row[pos] = entry_row[e];
      if (weight) expert_weight[pos] = weight[e];
      entry_position[e] = pos;
    }
  }
}
//! @}

//! @name Receive-metadata check
//! What the receive-layout bodies assume of received metadata, checked where it lies before they
//! run (the host receive_layout refuses the same): every row has at least one entry, the rows'
//! entry counts add up to `entries`, and every entry's slot lies in [0, slots). A violation sets
//! its bit in `*flag` (zeroed beforehand), so the device build skips its other bodies instead of
//! writing out of bounds; the word stays on the device until its caller next waits.
//! @{
inline constexpr std::int32_t bad_row_entries = 1; //!< a row with no (or a negative count of) entries
inline constexpr std::int32_t bad_entry_total = 2; //!< the rows' entry counts do not add up to `entries`
inline constexpr std::int32_t bad_slot = 4;        //!< an entry's slot outside [0, slots)
//! the entries per slot differ from what the senders announced in the count round
inline constexpr std::int32_t bad_slot_counts = 8;

//! Sets `bits` in `*flag`, atomically: many threads may find violations, on the device and on
//! the host alike (a host executor, such as the CPU tests' warp emulator, runs a grid's threads
//! concurrently; a plain `|=` there lost updates).
LOCUS_HOST_DEVICE void flag_set(std::int32_t* flag, std::int32_t bits) {
#if LOCUS_IS_DEVICE_PASS()
  atomicOr(flag, bits);
#else
  std::atomic_ref<std::int32_t>(*flag).fetch_or(bits, std::memory_order_relaxed);
#endif
}

//! Reads `*flag` while other threads of the same grid may set it.
LOCUS_HOST_DEVICE std::int32_t flag_read(const std::int32_t* flag) {
#if LOCUS_IS_DEVICE_PASS()
  return *static_cast<const volatile std::int32_t*>(flag);
#else
  return std::atomic_ref<std::int32_t>(*const_cast<std::int32_t*>(flag)).load(std::memory_order_relaxed);
#endif
}

//! Adds `value` to `*total`, atomically (every thread adds its share; see flag_set).
LOCUS_HOST_DEVICE void total_add(unsigned long long* total, unsigned long long value) {
#if LOCUS_IS_DEVICE_PASS()
  atomicAdd(total, value);
#else
  std::atomic_ref<unsigned long long>(*total).fetch_add(value, std::memory_order_relaxed);
#endif
}

//! Every thread checks a stride of the `rows` entry counts (each at least 1) and adds its stride's
//! counts to `*total` (64 bits, so no count can wrap it; zero before the grid runs), and a stride of
//! the `entries` slots. receive_total_check then compares the total with `entries`: no thread walks
//! every row (a receive layout holds thousands of them at decode, tens of thousands at prefill).
LOCUS_HOST_DEVICE void receive_metadata_check(grid_index g, const std::int32_t* LOCUS_RESTRICT row_entry_counts,
                                              std::size_t rows, const std::int32_t* LOCUS_RESTRICT entry_slot,
                                              std::size_t entries, std::size_t slots, std::int32_t* flag,
                                              unsigned long long* total) {
  const std::size_t first = g.block * g.threads + g.thread, stride = g.blocks * g.threads;
  unsigned long long sum = 0;
  bool short_row = false;
  for (std::size_t r = first; r < rows; r += stride) {
    if (row_entry_counts[r] < 1)
      short_row = true;
    else
      sum += static_cast<unsigned long long>(row_entry_counts[r]);
  }
  if (short_row) flag_set(flag, bad_row_entries);
  if (sum) total_add(total, sum);
  for (std::size_t e = first; e < entries; e += stride)
    if (entry_slot[e] < 0 || static_cast<std::size_t>(entry_slot[e]) >= slots) {
      flag_set(flag, bad_slot);
      return; // one is enough for this thread
    }
}

//! After receive_metadata_check: the rows' entry counts must add up to `entries` (one thread).
LOCUS_HOST_DEVICE void receive_total_check(grid_index g, const unsigned long long* total, std::size_t entries,
                                           std::int32_t* flag) {
  if (g.block == 0 && g.thread == 0 && *total != static_cast<unsigned long long>(entries))
    flag_set(flag, bad_entry_total);
}

//! After the build counted the received entries per slot: `slot_offsets` (slots + 1 values) must
//! equal `expected`, the offsets the host sized the expert compute by (from the count round), or
//! the build's placement would put rows under the wrong expert. Does nothing once `*flag` is set
//! (the offsets were not built).
LOCUS_HOST_DEVICE void slot_offsets_check(grid_index g, const std::int32_t* LOCUS_RESTRICT slot_offsets,
                                          const std::int32_t* LOCUS_RESTRICT expected, std::size_t slots,
                                          std::int32_t* flag) {
  if (flag_read(flag)) return;
  for (std::size_t s = g.block * g.threads + g.thread; s <= slots; s += g.blocks * g.threads)
    if (slot_offsets[s] != expected[s]) {
      flag_set(flag, bad_slot_counts);
      return;
    }
}
//! @}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::stage
