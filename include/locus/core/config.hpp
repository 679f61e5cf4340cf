#pragma once
//! @file
//! Compiler and platform configuration: host/device qualifiers and function-like feature tests.

#include <locus/core/version.hpp>

// Feature tests are function-like so that a misspelt test is a compile error, not a silent 0.
#if defined(__CUDACC__)
#define LOCUS_DETAIL_CUDA_COMPILER 1
#else
#define LOCUS_DETAIL_CUDA_COMPILER 0
#endif
//! True while compiling with a CUDA compiler (either pass).
#define LOCUS_HAS_CUDA_COMPILER() (LOCUS_DETAIL_CUDA_COMPILER)

#if defined(__CUDA_ARCH__)
#define LOCUS_DETAIL_DEVICE_PASS 1
#else
#define LOCUS_DETAIL_DEVICE_PASS 0
#endif
//! True inside the device compilation pass.
#define LOCUS_IS_DEVICE_PASS() (LOCUS_DETAIL_DEVICE_PASS)

#if defined(LOCUS_ENABLE_BOUNDS_CHECKS) || !defined(NDEBUG)
#define LOCUS_DETAIL_BOUNDS_CHECKS 1
#else
#define LOCUS_DETAIL_BOUNDS_CHECKS 0
#endif
//! True when accessors check their indices (debug builds, or LOCUS_ENABLE_BOUNDS_CHECKS).
#define LOCUS_HAS_BOUNDS_CHECKS() (LOCUS_DETAIL_BOUNDS_CHECKS)

#if LOCUS_HAS_CUDA_COMPILER()
#define LOCUS_HOST_DEVICE __host__ __device__ inline
#define LOCUS_DEVICE __device__ inline
#else
//! Function usable from host and device code.
#define LOCUS_HOST_DEVICE inline
//! Device-only function (plain inline on a host-only compiler).
#define LOCUS_DEVICE inline
#endif

#if LOCUS_IS_DEVICE_PASS()
#define LOCUS_UNROLL _Pragma("unroll")
#else
//! Asks the device compiler to unroll the loop that follows (host compilers decide for themselves).
#define LOCUS_UNROLL
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LOCUS_RESTRICT __restrict__
#define LOCUS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LOCUS_RESTRICT
#define LOCUS_UNLIKELY(x) (x)
#endif
