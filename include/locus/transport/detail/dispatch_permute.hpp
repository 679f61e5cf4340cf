#pragma once
// locus-requires: cuda
//! @file
//! Host dispatch of the permute kernels: picks the 16-byte vector path when the row size and the
//! base pointers allow it, and a launch shape of one block per row.

#include <locus/core/cuda_error.hpp>
#include <locus/transport/detail/kernels/permute.cuh>

#include <cstddef>
#include <cstdint>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute {

inline constexpr unsigned block_threads = 128;
inline constexpr std::size_t max_blocks = std::size_t{1} << 20; // rows beyond are strided

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class T>
bool vectorisable(std::size_t hidden, const void* a, const void* b) {
  return (hidden * sizeof(T)) % 16 == 0 && aligned16(a) && aligned16(b);
}

inline unsigned grid_for(std::size_t rows) {
  return static_cast<unsigned>(rows == 0 ? 1 : (rows < max_blocks ? rows : max_blocks));
}

//! dst[r] = src[index[r * stride]]; `rows_ptr` (device) overrides `rows` when given.
template <class T>
void dispatch_gather(const T* src, const std::int32_t* index, std::size_t stride, std::size_t rows,
                     const std::int32_t* rows_ptr, std::size_t hidden, T* dst, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  if (vectorisable<T>(hidden, src, dst))
    gather_rows_kernel<T, true><<<grid_for(rows), block_threads, 0, stream>>>(src, index, stride, rows, rows_ptr, hidden, dst);
  else
    gather_rows_kernel<T, false><<<grid_for(rows), block_threads, 0, stream>>>(src, index, stride, rows, rows_ptr, hidden, dst);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void dispatch_reduce(const T* y, const std::int32_t* row_entry_offsets, const std::int32_t* entry_position,
                     const float* weight, std::size_t rows, std::size_t hidden, T* out, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  if (vectorisable<T>(hidden, y, out))
    reduce_rows_kernel<T, true><<<grid_for(rows), block_threads, 0, stream>>>(y, row_entry_offsets, entry_position, weight, rows, hidden, out);
  else
    reduce_rows_kernel<T, false><<<grid_for(rows), block_threads, 0, stream>>>(y, row_entry_offsets, entry_position, weight, rows, hidden, out);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

template <class T, std::size_t K>
void dispatch_combine(const T* rows_in, const std::int32_t* copy_row, std::size_t tokens, std::size_t hidden, T* out,
                      cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  if (vectorisable<T>(hidden, rows_in, out))
    combine_kernel<T, true, K><<<grid_for(tokens), block_threads, 0, stream>>>(rows_in, copy_row, tokens, hidden, out);
  else
    combine_kernel<T, false, K><<<grid_for(tokens), block_threads, 0, stream>>>(rows_in, copy_row, tokens, hidden, out);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

template <class T, std::size_t K>
void dispatch_combine_weighted(const T* y, const std::int32_t* copy_entry, const float* weight, std::size_t tokens,
                               std::size_t hidden, T* out, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  if (vectorisable<T>(hidden, y, out))
    combine_weighted_kernel<T, true, K><<<grid_for(tokens), block_threads, 0, stream>>>(y, copy_entry, weight, tokens, hidden, out);
  else
    combine_weighted_kernel<T, false, K><<<grid_for(tokens), block_threads, 0, stream>>>(y, copy_entry, weight, tokens, hidden, out);
  LOCUS_CUDA_CHECK(cudaGetLastError());
}

} // namespace locus::LOCUS_ABI_NAMESPACE::transport::detail::permute
