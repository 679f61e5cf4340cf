#pragma once
//! @file
//! CUDA kernels moving token vectors through a layout: row scatter (permute), row gather
//! (unpermute, expert input, weighted expert input), weighted row reduction and combine. Each kernel is a stage body of
//! `transport/detail/stage.hpp` run on gridDim.y blocks per output row; threads stride over the
//! row in 16-byte vectors (`Vec = true`, when the row size and base pointers allow it) or single
//! elements.
//! The host path runs the same bodies, so the results are equal bit for bit. `H` is the row width:
//! a std::size_t or a static `locus::hidden<N>`, for which the kernel is instantiated.

#include <cstddef>
#include <cstdint>
#include <locus/transport/detail/stage.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute {

// The gridDim.y blocks of one blockIdx.x act as one block of gridDim.y * blockDim.x threads: a
// row's elements are shared by several blocks when rows are few (dispatch_permute.hpp).
__device__ __forceinline__ stage::grid_index this_thread() {
  return stage::grid_index{blockIdx.x, gridDim.x, blockIdx.y * blockDim.x + threadIdx.x, gridDim.y * blockDim.x};
}

// `skip` (may be null): a word that, when non-zero, makes the kernel do nothing (a refused
// receive layout's check word).
template <class T, bool Vec, class H>
__global__ void gather_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ index,
                                   std::size_t stride, std::size_t rows, H hidden, T* __restrict__ dst,
                                   const std::int32_t* skip) {
  if (skip && *skip) return;
  stage::gather_rows<T, Vec>(this_thread(), src, index, stride, rows, hidden, dst);
}

template <class T, bool Vec, class H>
__global__ void gather_scaled_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ index,
                                          const float* __restrict__ weight, std::size_t rows, H hidden,
                                          T* __restrict__ dst, const std::int32_t* skip) {
  if (skip && *skip) return;
  stage::gather_scaled_rows<T, Vec>(this_thread(), src, index, weight, rows, hidden, dst);
}

template <class T, bool Vec, class K, class H>
__global__ void scatter_rows_kernel(K k, const T* __restrict__ src, const std::int32_t* __restrict__ copy_row,
                                    std::size_t tokens, H hidden, T* __restrict__ dst) {
  stage::scatter_rows<T, Vec>(this_thread(), k, src, copy_row, tokens, hidden, dst);
}

// `zero` (may be null): a word that, when non-zero, makes the kernel write zero rows instead (a
// refused receive layout's check word: its offsets and positions were never built).
template <class T, bool Vec, class H>
__global__ void reduce_rows_kernel(const T* __restrict__ y, const std::int32_t* __restrict__ row_entry_offsets,
                                   const std::int32_t* __restrict__ entry_position, const float* __restrict__ weight,
                                   std::size_t rows, H hidden, T* __restrict__ out, const std::int32_t* zero) {
  if (zero && *zero)
    stage::zero_rows(this_thread(), rows, hidden, out);
  else
    stage::reduce_rows<T, Vec>(this_thread(), y, row_entry_offsets, entry_position, weight, rows, hidden, out);
}

template <class T, bool Vec, class K, class H>
__global__ void combine_kernel(K k, const T* __restrict__ rows_in, const std::int32_t* __restrict__ copy_row,
                               std::size_t tokens, H hidden, T* __restrict__ out) {
  stage::combine<T, Vec>(this_thread(), k, rows_in, copy_row, tokens, hidden, out);
}

template <class T, bool Vec, class K, class H>
__global__ void combine_weighted_kernel(K k, const T* __restrict__ y, const std::int32_t* __restrict__ copy_entry,
                                        const float* __restrict__ weight, std::size_t tokens, H hidden,
                                        T* __restrict__ out) {
  stage::combine_weighted<T, Vec>(this_thread(), k, y, copy_entry, weight, tokens, hidden, out);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute
