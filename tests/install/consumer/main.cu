// The CUDA component consumed from an installed tree: a kernel using a routing view.
#include <locus/core/cuda_error.hpp>
#include <locus/locus.hpp>

__global__ void first_expert(locus::device_routing_view<locus::top_k<2>> r, int* out) {
  if (r.tokens() > 0) *out = r.expert(0, 0);
}

int main() {
  int* d = nullptr;
  LOCUS_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
  first_expert<<<1, 1>>>(locus::device_routing_view<locus::top_k<2>>(nullptr, nullptr, 0), d);
  LOCUS_CUDA_CHECK(cudaFree(d));
  return 0;
}
