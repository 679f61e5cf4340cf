#pragma once
// locus-requires: nccl
//! @file
//! LOCUS_NCCL_CHECK: turns a failing NCCL call into locus::nccl_error.

#include <locus/core/error.hpp>
#include <nccl.h>

#ifndef LOCUS_NCCL_CHECK
//! Evaluates an NCCL call once; on failure throws locus::nccl_error whose code() is the
//! ncclResult_t, with NCCL's own description and its last error message.
#define LOCUS_NCCL_CHECK(call)                                                                                         \
  do {                                                                                                                 \
    const ncclResult_t locus_nccl_status = (call);                                                                     \
    if (LOCUS_UNLIKELY(locus_nccl_status != ncclSuccess && locus_nccl_status != ncclInProgress)) {                     \
      throw ::locus::nccl_error(::locus::detail::concat(#call, " failed: ", ncclGetErrorString(locus_nccl_status),     \
                                                        " (", ncclGetLastError(nullptr), ")"),                         \
                                __FILE__, __LINE__, static_cast<int>(locus_nccl_status));                              \
    }                                                                                                                  \
  } while (0)
#endif
