#pragma once
// locus-requires: cuda
//! @file
//! LOCUS_CUDA_CHECK: turns a failing CUDA runtime call into locus::cuda_error.

#include <cuda_runtime_api.h>
#include <locus/core/error.hpp>

#ifndef LOCUS_CUDA_CHECK
//! Evaluates a CUDA runtime call once; on failure throws locus::cuda_error whose code() is the
//! cudaError_t and whose message names the call, the error and its description.
#define LOCUS_CUDA_CHECK(call)                                                                                         \
  do {                                                                                                                 \
    const cudaError_t locus_cuda_status = (call);                                                                      \
    if (LOCUS_UNLIKELY(locus_cuda_status != cudaSuccess)) {                                                            \
      throw ::locus::cuda_error(::locus::detail::concat(#call, " failed: ", cudaGetErrorName(locus_cuda_status), " (", \
                                                        cudaGetErrorString(locus_cuda_status), ")"),                   \
                                __FILE__, __LINE__, static_cast<int>(locus_cuda_status));                              \
    }                                                                                                                  \
  } while (0)
#endif
