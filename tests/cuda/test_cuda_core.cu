#define BOOST_TEST_MODULE cuda_core
#include "../support/hold_stream.cuh"

#include <boost/test/unit_test.hpp>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
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
  // Raised once: a later launch check (the next kernel's cudaGetLastError) must not raise it again.
  BOOST_CHECK_EQUAL(cudaGetLastError(), cudaSuccess);
}

namespace {
// Host memory standing in for device memory, counting the frees (no CUDA call: this case runs
// without a GPU too).
struct counted_memory {
  static inline int allocations = 0, frees = 0;
  static void* allocate(std::size_t bytes) {
    ++allocations;
    return ::operator new(bytes);
  }
  static void release(void* p) noexcept {
    ++frees;
    ::operator delete(p);
  }
};
} // namespace

// Growing frees nothing before destruction (cudaFree would wait for the whole device, untimed,
// behind a step's exchanges): outgrown blocks are freed with the array, and growth at least doubles,
// so repeated small growth allocates a few blocks only.
BOOST_AUTO_TEST_CASE(growth_frees_nothing_before_destruction) {
  {
    detail::cuda_memory::owned_array<int, counted_memory> a(4);
    for (std::size_t n = 5; n <= 1000; ++n) {
      a.resize(n);
      a.data()[n - 1] = static_cast<int>(n); // the whole size is writable
    }
    BOOST_TEST(counted_memory::frees == 0);
    BOOST_TEST(a.size() == 1000u);
    BOOST_TEST(counted_memory::allocations <= 10); // 4, 8, 16, ..., 1024
    a.resize(3);                                   // shrinking keeps the block
    BOOST_TEST(counted_memory::frees == 0);
    detail::cuda_memory::owned_array<int, counted_memory> b(std::move(a));
    BOOST_TEST(counted_memory::frees == 0);
  }
  BOOST_TEST(counted_memory::frees == counted_memory::allocations);
}

// A device buffer grows while its stream is held by a kernel that only the host releases (as a
// step's NCCL kernels wait for a peer): growing must not wait for the device, or the kernel times
// out first.
BOOST_AUTO_TEST_CASE(device_buffer_growth_does_not_wait_for_the_device) {
  device_buffer<float> grown(1024);
  device_buffer<int> released(1);
  LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
  const locus_test::mapped_flag go;
  cudaStream_t stream = locus_test::held_stream(go, released.data());
  grown.resize(std::size_t{1} << 24);
  pinned_buffer<int> staging(16);
  staging.resize(1024);
  go.set();
  BOOST_TEST(released.to_host(stream) == std::vector<int>{1}, "growing waited for the device");
  BOOST_TEST(grown.size() == std::size_t{1} << 24);
  LOCUS_CUDA_CHECK(cudaStreamDestroy(stream));
}
