#pragma once
// A kernel that holds its stream until the host lets it go: the CUDA tests' stand-in for a step's
// NCCL kernels waiting for a peer (an upload, a free or a growth that waits for the stream would
// then wait for the kernel's time limit).

#include <locus/core/cuda_error.hpp>

namespace locus_test {

//! A host int the device reads (mapped pinned memory), 0 until set(): hold_stream's release.
struct mapped_flag {
  int* host = nullptr;
  int* device = nullptr;
  mapped_flag() {
    LOCUS_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int), cudaHostAllocMapped));
    *host = 0;
    LOCUS_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device), host, 0));
  }
  mapped_flag(const mapped_flag&) = delete;
  mapped_flag& operator=(const mapped_flag&) = delete;
  ~mapped_flag() { cudaFreeHost(host); }
  void set() const { *static_cast<volatile int*>(host) = 1; }
};

//! Holds its stream until the host sets *go (mapped pinned memory) or `limit_ns` pass; *released
//! says which (1: the host's flag).
//! Static: a kernel cannot be inline (nvcc ignores it), and each including file gets its own copy.
static __global__ void hold_stream(const volatile int* go, unsigned long long limit_ns, int* released) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    if (*go != 0) {
      *released = 1;
      return;
    }
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > limit_ns) {
      *released = 0;
      return;
    }
  }
}

//! A new non-blocking stream, held by hold_stream until `go` is set (5 s at most; *released says
//! which).
inline cudaStream_t held_stream(const mapped_flag& go, int* released) {
  cudaStream_t stream = nullptr;
  LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  hold_stream<<<1, 1, 0, stream>>>(go.device, 5'000'000'000ull, released);
  LOCUS_CUDA_CHECK(cudaGetLastError());
  return stream;
}

} // namespace locus_test
