#pragma once
// locus-requires: cuda
//! @file
//! LOCUS_CUDA_CHECK: turns a failing CUDA runtime call into locus::cuda_error.

#include <cuda_runtime_api.h>
#include <locus/core/error.hpp>

#ifndef LOCUS_CUDA_CHECK
//! Evaluates a CUDA runtime call once; on failure throws locus::cuda_error whose code() is the
//! cudaError_t and whose message names the call, the error and its description. The failure is
//! also taken off the thread's last-error slot, which a later success does not clear: left there,
//! the next launch check (`LOCUS_CUDA_CHECK(cudaGetLastError())`) would raise it again, in a step
//! that caught the first and went on to finish its exchange (a sticky error stays on the context).
#define LOCUS_CUDA_CHECK(call)                                                                                         \
  do {                                                                                                                 \
    const cudaError_t locus_cuda_status = (call);                                                                      \
    if (LOCUS_UNLIKELY(locus_cuda_status != cudaSuccess)) {                                                            \
      static_cast<void>(cudaGetLastError());                                                                           \
      throw ::locus::cuda_error(::locus::detail::concat(#call, " failed: ", cudaGetErrorName(locus_cuda_status), " (", \
                                                        cudaGetErrorString(locus_cuda_status), ")"),                   \
                                __FILE__, __LINE__, static_cast<int>(locus_cuda_status));                              \
    }                                                                                                                  \
  } while (0)
#endif
