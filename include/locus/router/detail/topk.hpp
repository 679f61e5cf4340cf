#pragma once
//! @file
//! A top-k buffer for one token: the k best (score, id) pairs seen so far, best first, in the
//! order of detail::router::better. With a compile-time k it lives in registers (every index is a
//! constant after unrolling); with a run-time k it lives in caller-provided arrays.

#include <climits>
#include <cstddef>
#include <limits>
#include <locus/core/config.hpp>
#include <locus/core/extents.hpp>
#include <locus/router/detail/math.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router {

//! Static capacity `K`: the pairs are members, so with inlining they stay in registers.
template <std::size_t K>
struct topk_buffer {
  float v[K];
  int id[K];

  //! The storage pointers are ignored; they exist so static and dynamic buffers are built alike.
  LOCUS_HOST_DEVICE explicit topk_buffer(std::size_t, float*, int*) {
#if LOCUS_IS_DEVICE_PASS()
#pragma unroll
#endif
    for (std::size_t j = 0; j < K; ++j) {
      v[j] = -std::numeric_limits<float>::infinity();
      id[j] = INT_MAX;
    }
  }
  LOCUS_HOST_DEVICE static constexpr std::size_t size() { return K; }
  LOCUS_HOST_DEVICE float value(std::size_t j) const { return v[j]; }
  LOCUS_HOST_DEVICE int index(std::size_t j) const { return id[j]; }

  //! Inserts (x, e) when it beats the current k-th pair. The shifting loop is written with
  //! constant indices only, so that a register array is never indexed at run time.
  LOCUS_HOST_DEVICE void push(float x, int e) {
    if (!better(x, e, v[K - 1], id[K - 1])) return;
#if LOCUS_IS_DEVICE_PASS()
#pragma unroll
#endif
    for (std::size_t j = K - 1; j > 0; --j) {
      if (better(x, e, v[j - 1], id[j - 1])) {
        v[j] = v[j - 1];
        id[j] = id[j - 1];
      } else {
        v[j] = x;
        id[j] = e;
        return;
      }
    }
    v[0] = x;
    id[0] = e;
  }
};

//! Run-time capacity: the pairs live in arrays the caller provides (for a router, its outputs).
template <>
struct topk_buffer<dynamic> {
  float* v;
  int* id;
  std::size_t k;

  LOCUS_HOST_DEVICE topk_buffer(std::size_t k_, float* values, int* ids) : v(values), id(ids), k(k_) {
    for (std::size_t j = 0; j < k; ++j) {
      v[j] = -std::numeric_limits<float>::infinity();
      id[j] = INT_MAX;
    }
  }
  LOCUS_HOST_DEVICE std::size_t size() const { return k; }
  LOCUS_HOST_DEVICE float value(std::size_t j) const { return v[j]; }
  LOCUS_HOST_DEVICE int index(std::size_t j) const { return id[j]; }

  LOCUS_HOST_DEVICE void push(float x, int e) {
    if (!better(x, e, v[k - 1], id[k - 1])) return;
    std::size_t j = k - 1;
    for (; j > 0 && better(x, e, v[j - 1], id[j - 1]); --j) {
      v[j] = v[j - 1];
      id[j] = id[j - 1];
    }
    v[j] = x;
    id[j] = e;
  }
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
