#pragma once
// A kernel that holds its stream until the host lets it go: the CUDA tests' stand-in for a step's
// NCCL kernels waiting for a peer (an upload, a free or a growth that waits for the stream would
// then wait for the kernel's time limit).

namespace locus_test {

//! Holds its stream until the host sets *go (mapped pinned memory) or `limit_ns` pass; *released
//! says which (1: the host's flag).
__global__ inline void hold_stream(const volatile int* go, unsigned long long limit_ns, int* released) {
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

} // namespace locus_test
