#define BOOST_TEST_MODULE cuda_core
#include <boost/test/unit_test.hpp>
#include <locus/core/cuda_error.hpp>
#include <locus/locus.hpp>
#include <random>
#include <vector>

using namespace locus;

namespace {
// Per-expert load counted on the device through a routing view and the topology: the same
// accessors the host uses, so this proves they are usable in kernels.
template <class K>
__global__ void count_load(device_routing_view<K> r, int* load, int* remote, topology<nodes<2>, gpus_per_node<2>> topo,
                           int experts_per_rank, int source_rank) {
  const std::size_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= r.tokens()) return;
  for (std::size_t j = 0; j < r.top_k(); ++j) {
    const int e = r.expert(t, j);
    atomicAdd(&load[e], 1);
    if (topo.link(static_cast<std::size_t>(source_rank), static_cast<std::size_t>(e / experts_per_rank)) ==
        link_class::inter_node)
      atomicAdd(remote, 1);
  }
}
} // namespace

BOOST_AUTO_TEST_CASE(device_load_matches_host) {
  constexpr int experts = 16, tokens = 5000, k = 4, source = 1;
  std::mt19937 rng(3);
  routing<top_k<k>> r(tokens);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j)
      r.view().expert(t, j) = static_cast<expert_id>((t * 7 + j * 5 + rng() % 3) % experts);
  std::vector<int> host_load(experts, 0);
  int host_remote = 0;
  const topology<nodes<2>, gpus_per_node<2>> topo;
  for (expert_id e : r.ids()) {
    ++host_load[e];
    host_remote += topo.link(source, static_cast<std::size_t>(e / 4)) == link_class::inter_node;
  }
  expert_id* d_ids = nullptr;
  int* d_load = nullptr;
  LOCUS_CUDA_CHECK(cudaMalloc(&d_ids, r.ids().size() * sizeof(expert_id)));
  LOCUS_CUDA_CHECK(cudaMalloc(&d_load, (experts + 1) * sizeof(int)));
  LOCUS_CUDA_CHECK(cudaMemcpy(d_ids, r.ids().data(), r.ids().size() * sizeof(expert_id), cudaMemcpyHostToDevice));
  LOCUS_CUDA_CHECK(cudaMemset(d_load, 0, (experts + 1) * sizeof(int)));
  device_routing_view<top_k<k>> view(d_ids, nullptr, tokens);
  count_load<<<(tokens + 255) / 256, 256>>>(view, d_load, d_load + experts, topo, 4, source);
  LOCUS_CUDA_CHECK(cudaGetLastError());
  std::vector<int> device_load(experts + 1);
  LOCUS_CUDA_CHECK(cudaMemcpy(device_load.data(), d_load, device_load.size() * sizeof(int), cudaMemcpyDeviceToHost));
  LOCUS_CUDA_CHECK(cudaFree(d_ids));
  LOCUS_CUDA_CHECK(cudaFree(d_load));
  for (int e = 0; e < experts; ++e)
    BOOST_TEST(device_load[e] == host_load[e]);
  BOOST_TEST(device_load[experts] == host_remote);
}

BOOST_AUTO_TEST_CASE(cuda_errors_become_exceptions) {
  BOOST_CHECK_THROW(LOCUS_CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(16), 8, cudaMemcpyHostToDevice)),
                    cuda_error);
}
