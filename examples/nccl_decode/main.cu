// nccl_decode: the mpi_decode program over NCCL, one rank per GPU (MPI only bootstraps NCCL).
//
//   mpirun -np <GPUs> nccl_decode [--gpus-per-node G] [--steps 16] [--hidden 256] (--help lists the defaults)
//
// Synthetic decode steps (64 experts, top-8, 32 requests per rank) go through the device-resident
// moe_layer (backend::cuda, nccl_flat and nccl_hierarchical): device layout → permute → NCCL exchange → expert compute
// on the device (expert e multiplies by e + 1) → weighted reduction → NCCL exchange back →
// combine, under linear and locality placement; prints bytes per link class, the median step time
// and the largest error against a dense reference. Token rows stay in device memory from input to
// output; the inputs are uploaded and the outputs downloaded only to check them, outside the
// timed step.
#include "tool_cli_mpi.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/mpi_error.hpp>
#include <locus/layer/moe_layer_cuda.hpp>
#include <locus/locus.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/transport/nccl.hpp>
#include <mpi.h>
#include <random>
#include <string>

using namespace locus;
using namespace locus::transport;

namespace {
__global__ void scale_rows(const float* in, float* out, std::size_t n, float factor) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    out[i] = in[i] * factor;
}

// The example's expert compute policy: rows of expert e are multiplied by e + 1, on the device.
struct scale_by_expert {
  using policy_concept = expert_compute_tag;
  using activation_type = float;
  cudaStream_t stream = nullptr;

  void operator()(const layer::expert_blocks<float, memory_space::device>& b) const {
    for (std::size_t i = 0; i < b.count; ++i) {
      const std::size_t n = b.rows(i) * b.hidden;
      if (n == 0) continue;
      scale_rows<<<static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 1024)), 256, 0, stream>>>(
          b.input + b.offsets[i] * b.hidden, b.output + b.offsets[i] * b.hidden, n,
          static_cast<float>(b.experts[i] + 1));
      LOCUS_CUDA_CHECK(cudaGetLastError());
    }
  }
  // The layer's host step is not used here.
  void operator()(const layer::expert_blocks<float, memory_space::host>&) const {
    LOCUS_THROW(config_error, "the expert compute runs on device rows only");
  }
};
} // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank_i = 0, size_i = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_i);
  MPI_Comm_size(MPI_COMM_WORLD, &size_i);
  const auto me = static_cast<std::size_t>(rank_i), ranks = static_cast<std::size_t>(size_i);
  int status = 0;
  try {
    std::size_t gpus_per_node = ranks, steps = 16, hidden = 256, requests = 32;
    CLI::App app{"Decode steps of one MoE layer over NCCL, one rank per GPU, linear and locality placement"};
    tool_cli::show_defaults(app);
    app.add_option("--gpus-per-node", gpus_per_node, "GPUs (ranks) per node")
        ->check(tool_cli::positive)
        ->default_str("all ranks (one node)");
    app.add_option("--steps", steps, "Decode steps")->check(tool_cli::positive);
    app.add_option("--hidden", hidden, "Hidden size")->check(tool_cli::positive);
    if (const auto code = tool_cli::parse_or_finish(app, argc, argv, MPI_COMM_WORLD, "nccl_decode")) return *code;
    LOCUS_REQUIRE(ranks % gpus_per_node == 0, config_error, ranks, " ranks are not a multiple of --gpus-per-node ",
                  gpus_per_node);
    const dynamic_topology topo(ranks / gpus_per_node, gpus_per_node);
    int devices = 0;
    LOCUS_CUDA_CHECK(cudaGetDeviceCount(&devices));
    LOCUS_REQUIRE(devices > 0, config_error, "no CUDA device visible");
    LOCUS_CUDA_CHECK(cudaSetDevice(static_cast<int>(topo.local_rank_of(me)) % devices));
    ncclUniqueId id;
    if (me == 0) LOCUS_NCCL_CHECK(ncclGetUniqueId(&id));
    LOCUS_MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD));
    ncclComm_t comm;
    LOCUS_NCCL_CHECK(ncclCommInitRank(&comm, size_i, id, rank_i));
    cudaStream_t stream;
    LOCUS_CUDA_CHECK(cudaStreamCreate(&stream));

    constexpr std::size_t experts = 64, k = 8;
    std::vector<std::size_t> perm(experts);
    for (std::size_t e = 0; e < experts; ++e)
      perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), std::mt19937_64(7));
    const std::size_t per = experts / topo.nodes();
    const auto routing_of = [&](std::size_t step, std::size_t r) {
      std::mt19937_64 rng(step * 7919 + r);
      routing<> rt(requests, top_k<>(k));
      for (std::size_t t = 0; t < requests; ++t)
        for (std::size_t j = 0; j < k; ++j)
          for (;;) {
            const std::size_t e =
                perm[rng() % 10 < 7 && per >= k ? topo.node_of(r) * per + rng() % per : rng() % experts];
            bool dup = false;
            for (std::size_t p = 0; p < j; ++p)
              dup |= static_cast<std::size_t>(rt.view().expert(t, p)) == e;
            if (dup) continue;
            rt.view().expert(t, j) = static_cast<expert_id>(e);
            rt.view().weight(t, j) = 1.0f / static_cast<float>(k);
            break;
          }
      return rt;
    };
    placement::plan_input in;
    in.topology = topo;
    in.experts = experts;
    in.slots_per_rank = (experts + ranks - 1) / ranks + 1;
    in.load.assign(1, std::vector<double>(experts, 0.0));
    in.node_load.assign(1, std::vector<std::vector<double>>(topo.nodes(), std::vector<double>(experts, 0.0)));
    for (std::size_t s = 0; s < steps; ++s)
      for (std::size_t r = 0; r < ranks; ++r) {
        const auto rt = routing_of(s, r);
        for (expert_id e : rt.ids()) {
          in.load[0][static_cast<std::size_t>(e)] += 1;
          in.node_load[0][topo.node_of(r)][static_cast<std::size_t>(e)] += 1;
        }
      }
    if (me == 0)
      std::printf("nccl_decode: %zu ranks as %zu nodes x %zu GPUs, hidden %zu, %zu steps\n%-9s %-18s %14s %14s %14s "
                  "%10s %10s\n",
                  ranks, topo.nodes(), topo.gpus_per_node(), hidden, steps, "placement", "transport", "same-GPU KB",
                  "intra-node KB", "inter-node KB", "step ms", "max error");
    for (const std::string name : {"linear", "locality"}) {
      const expert_map map = placement::plan_by_name(name, in).at(0);
      // Flat, then hierarchical (node stage first, one copy per remote node fanned out inside it).
      const auto run = [&]<class Policy>(Policy, const char* label) {
        nccl_transport t(comm, stream, topo, Policy::kind);
        using shape = moe_shape<locus::experts<experts>, locus::top_k<k>, locus::hidden<>, locus::shared_experts<0>>;
        moe_layer<shape, dynamic_topology, Policy, backend::cuda, layer::given_routing, scale_by_expert> moe(
            shape(experts, k, hidden, 0), topo, t, map, scale_by_expert{stream}, backend::cuda{stream});
        device_buffer<float> dx, dy, w;
        device_buffer<expert_id> ids;
        std::vector<double> times;
        double worst = 0;
        for (std::size_t s = 0; s < steps; ++s) {
          const auto r = routing_of(s, me);
          std::vector<float> x(requests * hidden), y(x.size());
          for (std::size_t i = 0; i < x.size(); ++i)
            x[i] = static_cast<float>(static_cast<int>((me * 31 + i) % 13) - 6);
          dx.upload(x, stream);
          ids.upload(r.ids(), stream);
          w.upload(r.weights(), stream);
          dy.resize(x.size());
          LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
          MPI_Barrier(MPI_COMM_WORLD);
          const auto t0 = std::chrono::steady_clock::now();
          t.begin_step(s);
          moe.forward(dx.data(), device_routing_view<top_k<k>>(ids.data(), w.data(), requests), dy.data());
          moe.finish(); // waits for the step under the transport's timeout
          times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
          dy.download(y, stream);
          for (std::size_t tk = 0; tk < requests; ++tk) {
            double f = 0;
            for (std::size_t j = 0; j < k; ++j)
              f += r.view().weight(tk, j) * (r.view().expert(tk, j) + 1.0);
            for (std::size_t h = 0; h < hidden; ++h)
              worst = std::max(worst, std::abs(f * x[tk * hidden + h] - y[tk * hidden + h]) /
                                          std::max(1.0, std::abs(f * x[tk * hidden + h])));
          }
        }
        std::array<std::uint64_t, 3> bytes{};
        MPI_Reduce(t.bytes().bytes_sent.data(), bytes.data(), 3, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
        std::sort(times.begin(), times.end());
        if (me == 0)
          std::printf("%-9s %-18s %14.1f %14.1f %14.1f %10.3f %10.1e\n", name.c_str(), label,
                      static_cast<double>(bytes[0]) / 1e3, static_cast<double>(bytes[1]) / 1e3,
                      static_cast<double>(bytes[2]) / 1e3, times[times.size() / 2] * 1e3, worst);
      };
      run(nccl_flat{}, "nccl_flat");
      run(nccl_hierarchical{}, "nccl_hierarchical");
    }
    LOCUS_CUDA_CHECK(cudaStreamDestroy(stream));
    ncclCommDestroy(comm);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_decode: rank %zu: %s\n", me, tool_cli::error_text(e).c_str());
    status = 1;
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
