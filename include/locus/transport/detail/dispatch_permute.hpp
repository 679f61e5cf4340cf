#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! Host dispatch of the permute kernels: picks the 16-byte vector path when the row size and the
//! base pointers allow it, and a launch shape of `parts_for` blocks per row (gridDim.y): one when
//! rows are many, more when they are few (a decode step's 128 tokens on one block each left most
//! of an H200 idle: the combine ran at 20% of its bandwidth).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/cuda_error.hpp>
#include <locus/transport/detail/kernels/permute.cuh>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute {

inline constexpr unsigned block_threads = 128;
inline constexpr std::size_t max_blocks = std::size_t{1} << 20; // rows beyond are strided

inline unsigned grid_for(std::size_t rows) {
  return static_cast<unsigned>(rows == 0 ? 1 : (rows < max_blocks ? rows : max_blocks));
}

//! Blocks sharing one row: enough for about `fill_blocks` blocks in all, never more than the
//! row's `row_chunks` (16-byte vectors, or elements) give a block of threads work.
inline unsigned parts_for(std::size_t rows, std::size_t row_chunks) {
  constexpr std::size_t fill_blocks = 1024;
  const std::size_t most = std::max<std::size_t>((row_chunks + block_threads - 1) / block_threads, 1);
  const std::size_t want = rows >= fill_blocks ? 1 : (fill_blocks + rows - 1) / std::max<std::size_t>(rows, 1);
  return static_cast<unsigned>(std::min(want, most));
}

//! The launch grid of `rows` rows of `hidden` elements of T.
template <class T, bool Vec>
dim3 shape_for(std::size_t rows, std::size_t hidden) {
  return dim3(grid_for(rows), parts_for(rows, Vec ? hidden / stage::per_vec<T> : hidden));
}

//! dst[r] = src[index[r * stride]] for r < rows; nothing when `skip` points to a non-zero word
//! (a receive layout whose metadata was refused: its indices were never built).
template <class T, class H>
void dispatch_gather(const T* src, const std::int32_t* index, std::size_t stride, std::size_t rows, H hidden, T* dst,
                     cudaStream_t stream, const std::int32_t* skip = nullptr) {
  if (rows == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), src, dst))
    gather_rows_kernel<T, true, H><<<shape_for<T, true>(rows, stage::width(hidden)), block_threads, 0, stream>>>(
        src, index, stride, rows, hidden, dst, skip);
  else
    gather_rows_kernel<T, false, H><<<shape_for<T, false>(rows, stage::width(hidden)), block_threads, 0, stream>>>(
        src, index, stride, rows, hidden, dst, skip);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

//! dst[r] = weight[r] · src[index[r]] for r < rows (stage::gather_scaled_rows).
template <class T, class H>
void dispatch_gather_scaled(const T* src, const std::int32_t* index, const float* weight, std::size_t rows, H hidden,
                            T* dst, cudaStream_t stream, const std::int32_t* skip = nullptr) {
  if (rows == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), src, dst))
    gather_scaled_rows_kernel<T, true, H><<<shape_for<T, true>(rows, stage::width(hidden)), block_threads, 0, stream>>>(
        src, index, weight, rows, hidden, dst, skip);
  else
    gather_scaled_rows_kernel<T, false, H>
        <<<shape_for<T, false>(rows, stage::width(hidden)), block_threads, 0, stream>>>(src, index, weight, rows,
                                                                                        hidden, dst, skip);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

//! dst[copy_row[t * k + j]] = src[t] for t < tokens (each row once). `K`: a locus::top_k extent.
template <class T, class K, class H>
void dispatch_scatter(K k, const T* src, const std::int32_t* copy_row, std::size_t tokens, H hidden, T* dst,
                      cudaStream_t stream) {
  if (tokens == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), src, dst))
    scatter_rows_kernel<T, true, K, H><<<shape_for<T, true>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(
        k, src, copy_row, tokens, hidden, dst);
  else
    scatter_rows_kernel<T, false, K, H>
        <<<shape_for<T, false>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(k, src, copy_row, tokens,
                                                                                          hidden, dst);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

template <class T, class H>
void dispatch_reduce(const T* y, const std::int32_t* row_entry_offsets, const std::int32_t* entry_position,
                     const float* weight, std::size_t rows, H hidden, T* out, cudaStream_t stream,
                     const std::int32_t* zero = nullptr) {
  if (rows == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), y, out))
    reduce_rows_kernel<T, true, H><<<shape_for<T, true>(rows, stage::width(hidden)), block_threads, 0, stream>>>(
        y, row_entry_offsets, entry_position, weight, rows, hidden, out, zero);
  else
    reduce_rows_kernel<T, false, H><<<shape_for<T, false>(rows, stage::width(hidden)), block_threads, 0, stream>>>(
        y, row_entry_offsets, entry_position, weight, rows, hidden, out, zero);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

//! `K`: a locus::top_k extent (static: the kernel is instantiated for it).
template <class T, class K, class H>
void dispatch_combine(K k, const T* rows_in, const std::int32_t* copy_row, std::size_t tokens, H hidden, T* out,
                      cudaStream_t stream) {
  if (tokens == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), rows_in, out))
    combine_kernel<T, true, K, H><<<shape_for<T, true>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(
        k, rows_in, copy_row, tokens, hidden, out);
  else
    combine_kernel<T, false, K, H><<<shape_for<T, false>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(
        k, rows_in, copy_row, tokens, hidden, out);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

template <class T, class K, class H>
void dispatch_combine_weighted(K k, const T* y, const std::int32_t* copy_entry, const float* weight, std::size_t tokens,
                               H hidden, T* out, cudaStream_t stream) {
  if (tokens == 0 || stage::width(hidden) == 0) return;
  if (stage::vectorisable<T>(stage::width(hidden), y, out))
    combine_weighted_kernel<T, true, K, H>
        <<<shape_for<T, true>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(k, y, copy_entry, weight,
                                                                                         tokens, hidden, out);
  else
    combine_weighted_kernel<T, false, K, H>
        <<<shape_for<T, false>(tokens, stage::width(hidden)), block_threads, 0, stream>>>(k, y, copy_entry, weight,
                                                                                          tokens, hidden, out);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute
