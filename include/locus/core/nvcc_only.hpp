#pragma once
// locus-requires: cuda
//! @file
//! Included first by the headers that hold CUDA kernels: compiled by a host compiler (a .cpp file)
//! they would fail deep inside a kernel or a CUB header; this says what to do instead.

#include <locus/core/config.hpp>

#if !LOCUS_HAS_CUDA_COMPILER()
#error "locus: this header holds CUDA kernels: include it from a .cu file compiled by nvcc"
#endif
