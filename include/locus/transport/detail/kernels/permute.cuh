#pragma once
//! @file
//! CUDA kernels moving token vectors through a layout: row gather (permute, unpermute, expert
//! input), weighted row reduction and combine. One block per output row; threads stride over the
//! row in 16-byte vectors (`Vec = true`, when the row size and base pointers allow it) or single
//! elements. Sums use separate round-to-nearest multiply and add (__fmul_rn, __fadd_rn) in the
//! host's order, so results equal the host path (`transport/permute.hpp`) bit for bit.

#include <locus/core/bfloat16.hpp>

#include <cstddef>
#include <cstdint>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::permute {

//! Elements of T per 16-byte vector.
template <class T>
inline constexpr std::size_t per_vec = 16 / sizeof(T);

template <class T>
__device__ __forceinline__ float load_float(T v) {
  if constexpr (sizeof(T) == 4) return v;
  else return bfloat16::to_float(v.bits);
}
template <class T>
__device__ __forceinline__ T store_float(float f) {
  if constexpr (sizeof(T) == 4) return f;
  else return bfloat16::from_bits(bfloat16::from_float(f));
}

//! dst[r] = src[index[r * stride]] for r < rows (`rows` read from `*rows_ptr` when given).
template <class T, bool Vec>
__global__ void gather_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ index, std::size_t stride,
                                   std::size_t rows, const std::int32_t* rows_ptr, std::size_t hidden, T* __restrict__ dst) {
  const std::size_t n = rows_ptr ? static_cast<std::size_t>(*rows_ptr) : rows;
  for (std::size_t r = blockIdx.x; r < n; r += gridDim.x) {
    const std::size_t from = static_cast<std::size_t>(index[r * stride]);
    if constexpr (Vec) {
      const std::size_t vecs = hidden / per_vec<T>;
      const uint4* s = reinterpret_cast<const uint4*>(src + from * hidden);
      uint4* d = reinterpret_cast<uint4*>(dst + r * hidden);
      for (std::size_t i = threadIdx.x; i < vecs; i += blockDim.x) d[i] = __ldg(s + i);
    } else {
      for (std::size_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[r * hidden + i] = src[from * hidden + i];
    }
  }
}

// Adds w * y (or y when !Weighted) for the per_vec<T> (Vec) or 1 element(s) at `y` into acc.
template <class T, bool Vec, bool Weighted>
__device__ __forceinline__ void accumulate(float* acc, const T* y, float w) {
  constexpr std::size_t n = Vec ? per_vec<T> : 1;
  alignas(16) T v[n];
  if constexpr (Vec) *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(y));
  else v[0] = y[0];
#pragma unroll
  for (std::size_t i = 0; i < n; ++i) {
    const float x = load_float(v[i]);
    acc[i] = __fadd_rn(acc[i], Weighted ? __fmul_rn(w, x) : x);
  }
}

template <class T, bool Vec>
__device__ __forceinline__ void store(T* out, const float* acc) {
  constexpr std::size_t n = Vec ? per_vec<T> : 1;
  alignas(16) T v[n];
#pragma unroll
  for (std::size_t i = 0; i < n; ++i) v[i] = store_float<T>(acc[i]);
  if constexpr (Vec) *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(v);
  else out[0] = v[0];
}

//! rows_out[r] = sum over r's entries e (in order) of weight[pos[e]] * y[pos[e]].
template <class T, bool Vec>
__global__ void reduce_rows_kernel(const T* __restrict__ y, const std::int32_t* __restrict__ row_entry_offsets,
                                   const std::int32_t* __restrict__ entry_position, const float* __restrict__ weight,
                                   std::size_t rows, std::size_t hidden, T* __restrict__ out) {
  constexpr std::size_t n = Vec ? per_vec<T> : 1;
  for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const std::int32_t e0 = row_entry_offsets[r], e1 = row_entry_offsets[r + 1];
    for (std::size_t h = threadIdx.x * n; h < hidden; h += blockDim.x * n) {
      float acc[n] = {};
      for (std::int32_t e = e0; e < e1; ++e) {
        const std::size_t p = static_cast<std::size_t>(entry_position[e]);
        accumulate<T, Vec, true>(acc, y + p * hidden + h, weight[p]);
      }
      store<T, Vec>(out + r * hidden + h, acc);
    }
  }
}

//! out[t] = sum of t's distinct rows (first choice first), unweighted.
template <class T, bool Vec, std::size_t K>
__global__ void combine_kernel(const T* __restrict__ rows_in, const std::int32_t* __restrict__ copy_row,
                               std::size_t tokens, std::size_t hidden, T* __restrict__ out) {
  constexpr std::size_t n = Vec ? per_vec<T> : 1;
  for (std::size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    std::int32_t row[K];
    bool first[K];
#pragma unroll
    for (std::size_t j = 0; j < K; ++j) {
      row[j] = copy_row[t * K + j];
      first[j] = true;
      for (std::size_t i = 0; i < j; ++i) first[j] &= row[i] != row[j];
    }
    for (std::size_t h = threadIdx.x * n; h < hidden; h += blockDim.x * n) {
      float acc[n] = {};
#pragma unroll
      for (std::size_t j = 0; j < K; ++j)
        if (first[j]) accumulate<T, Vec, false>(acc, rows_in + static_cast<std::size_t>(row[j]) * hidden + h, 0.0f);
      store<T, Vec>(out + t * hidden + h, acc);
    }
  }
}

//! out[t] = sum over j of weight[e] * y[e], e = copy_entry[t * K + j].
template <class T, bool Vec, std::size_t K>
__global__ void combine_weighted_kernel(const T* __restrict__ y, const std::int32_t* __restrict__ copy_entry,
                                        const float* __restrict__ weight, std::size_t tokens, std::size_t hidden,
                                        T* __restrict__ out) {
  constexpr std::size_t n = Vec ? per_vec<T> : 1;
  for (std::size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    std::int32_t entry[K];
#pragma unroll
    for (std::size_t j = 0; j < K; ++j) entry[j] = copy_entry[t * K + j];
    for (std::size_t h = threadIdx.x * n; h < hidden; h += blockDim.x * n) {
      float acc[n] = {};
#pragma unroll
      for (std::size_t j = 0; j < K; ++j)
        accumulate<T, Vec, true>(acc, y + static_cast<std::size_t>(entry[j]) * hidden + h, weight[entry[j]]);
      store<T, Vec>(out + t * hidden + h, acc);
    }
  }
}

} // namespace locus::LOCUS_ABI_NAMESPACE::transport::detail::permute
