// moe_layer: decode steps of one MoE layer composed from policies, on R ranks run as threads of this
// process (the `local` transport), flat versus node-hierarchical exchange.
//
//   moe_layer [--nodes 2] [--gpus-per-node 2] [--experts 16] [--top-k 4] [--hidden 128] [--ffn 256]
//             [--tokens 32] [--steps 8]
//
// Each step: every rank routes its tokens (softmax top-k over x·W_router), dispatches them to the
// ranks holding their experts, runs the SwiGLU experts it hosts and combines the outputs, plus one
// shared expert. Prints per step time and the bytes each link class carried, and checks that the
// flat and the hierarchical layer give the same outputs.
#include "tool_cli.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <locus/layer/moe_layer.hpp>
#include <locus/placement/linear.hpp>
#include <random>
#include <string>
#include <thread>

using namespace locus;

namespace {

using tool_cli::positive;

// Ranks run as threads of this process; a topology beyond this is a mistake, not a workload.
constexpr std::size_t max_ranks = 1024;

struct options {
  std::size_t nodes = 2, gpus = 2, experts = 16, k = 4, hidden = 128, ffn = 256, tokens = 32, steps = 8;
};

template <class W>
layer::expert_weights<W> random_weights(std::size_t experts, std::size_t hidden, std::size_t ffn, unsigned seed) {
  std::vector<expert_id> ids(experts);
  for (std::size_t e = 0; e < experts; ++e)
    ids[e] = static_cast<expert_id>(e);
  layer::expert_weights<W> w(hidden, ffn, ids);
  std::mt19937 rng(seed);
  std::normal_distribution<float> in(0.0f, 1.0f / std::sqrt(float(hidden))), out(0.0f, 1.0f / std::sqrt(float(ffn)));
  for (expert_id e : ids) {
    for (auto& v : w.gate(e))
      v = W(in(rng));
    for (auto& v : w.up(e))
      v = W(in(rng));
    for (auto& v : w.down(e))
      v = W(out(rng));
  }
  return w;
}

struct result {
  std::vector<std::vector<float>> y; // per rank, last step
  transport::link_counters bytes;    // all ranks, all steps
  double seconds_per_step = 0;
};

template <class Transport>
result run(const options& o) {
  using layer_t = moe_layer<dynamic_moe_shape, dynamic_topology, Transport>;
  const dynamic_topology topo(o.nodes, o.gpus);
  const std::size_t ranks = topo.ranks(), slots = (o.experts + ranks - 1) / ranks;
  placement::plan_input in{topo, o.experts, slots, {std::vector<double>(o.experts, 1.0)}, {}};
  // Planning happens before the layer: where the experts live is the layer's input.
  const expert_map map = plan_placement<placement::linear>(in)[0];
  const auto experts = random_weights<float>(o.experts, o.hidden, o.ffn, 1);
  const auto shared = random_weights<float>(1, o.hidden, o.ffn, 2);
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> gate(o.hidden * o.experts);
  for (auto& v : gate)
    v = g(rng);

  transport::local_fabric fabric(topo, Transport::kind);
  result res;
  res.y.resize(ranks);
  std::vector<transport::link_counters> bytes(ranks);
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<double> seconds(ranks, 0.0);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        auto ep = fabric.endpoint(r);
        // The ranks share this machine's cores.
        const unsigned per_rank = std::max(1u, default_host_threads() / static_cast<unsigned>(ranks));
        layer_t l(dynamic_moe_shape(o.experts, o.k, o.hidden, 1), topo, ep, map,
                  layer::swiglu_host<float>(layer::expert_weights<float>::for_rank(map, r, experts), per_rank));
        l.set_router(gate);
        l.set_shared_experts(layer::swiglu_host<float>(shared, per_rank));
        std::mt19937 xr(static_cast<unsigned>(100 + r));
        std::normal_distribution<float> xd(0.0f, 1.0f);
        std::vector<float> x(o.tokens * o.hidden), y(x.size());
        for (std::size_t s = 0; s < o.steps; ++s) {
          for (auto& v : x)
            v = xd(xr);
          const auto t0 = std::chrono::steady_clock::now();
          l.forward(x, y);
          seconds[r] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        res.y[r] = y;
        bytes[r] = ep.bytes();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads)
    t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  // A step ends when its slowest rank finishes.
  res.seconds_per_step = *std::max_element(seconds.begin(), seconds.end()) / static_cast<double>(o.steps);
  for (const auto& b : bytes)
    res.bytes += b;
  return res;
}

} // namespace

int main(int argc, char** argv) try {
  options o;
  CLI::App app{"One MoE layer on in-process ranks (threads), flat against hierarchical transport"};
  tool_cli::show_defaults(app);
  app.add_option("--nodes", o.nodes, "Nodes")->check(positive);
  app.add_option("--gpus-per-node", o.gpus, "GPUs (ranks) per node")->check(positive);
  app.add_option("--experts", o.experts, "Routed experts")->check(positive);
  app.add_option("--top-k", o.k, "Experts per token")->check(positive);
  app.add_option("--hidden", o.hidden, "Hidden size")->check(positive);
  app.add_option("--ffn", o.ffn, "Expert FFN size")->check(positive);
  app.add_option("--tokens", o.tokens, "Tokens per rank per step (0: none)");
  app.add_option("--steps", o.steps, "Steps")->check(positive);
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  // Each rank is a thread; and the sizes are checked before anything is allocated. Weights: the
  // routed experts and the shared one, gate + up + down each; the router; per rank and step the
  // input, output and the k rows of each token dispatched, computed and combined.
  const double ranks = static_cast<double>(o.nodes) * static_cast<double>(o.gpus);
  if (ranks > max_ranks) {
    std::fprintf(stderr, "moe_layer: --nodes x --gpus-per-node = %.0f ranks; at most %zu run as threads here\n", ranks,
                 max_ranks);
    return 2;
  }
  const double h = static_cast<double>(o.hidden), k = static_cast<double>(o.k);
  tool_cli::require_memory(4.0 * (3.0 * h * static_cast<double>(o.ffn) * (static_cast<double>(o.experts) + 1) +
                                  h * static_cast<double>(o.experts) +
                                  ranks * static_cast<double>(o.tokens) * h * (2.0 + 3.0 * k)),
                           "these sizes (weights, router and per-rank buffers)");
  std::printf("moe_layer: %zu nodes x %zu GPUs, %zu experts, top-%zu, hidden %zu, ffn %zu, %zu tokens/rank, "
              "%zu steps\n",
              o.nodes, o.gpus, o.experts, o.k, o.hidden, o.ffn, o.tokens, o.steps);
  const result flat = run<transport::local_flat>(o);
  const result hier = run<transport::local_hierarchical>(o);
  double diff = 0;
  for (std::size_t r = 0; r < flat.y.size(); ++r)
    for (std::size_t i = 0; i < flat.y[r].size(); ++i)
      diff = std::max(diff, static_cast<double>(std::abs(flat.y[r][i] - hier.y[r][i])));
  std::printf("\n%-14s %14s %14s %14s %12s\n", "transport", "same_gpu B", "intra_node B", "inter_node B", "ms/step");
  for (const auto& [name, res] : {std::pair{"flat", &flat}, std::pair{"hierarchical", &hier}})
    std::printf("%-14s %14llu %14llu %14llu %12.3f\n", name,
                static_cast<unsigned long long>(res->bytes.sent(link_class::same_gpu)),
                static_cast<unsigned long long>(res->bytes.sent(link_class::intra_node)),
                static_cast<unsigned long long>(res->bytes.sent(link_class::inter_node)), res->seconds_per_step * 1e3);
  std::printf("\nmax |flat - hierarchical| over all outputs: %.3g\n", diff);
  return diff < 1e-4 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moe_layer: %s\n", tool_cli::error_text(e).c_str());
  return 2;
}
