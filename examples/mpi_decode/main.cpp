// mpi_decode: decode steps of one MoE layer (locus::moe_layer: dispatch → expert compute → combine) over MPI,
// with the flat and the rail-aligned hierarchical transport, under linear and locality placement.
//
//   mpirun -np 8 build/dev/examples/mpi_decode/mpi_decode [--gpus-per-node 2] [--steps 16]
//          [--trace PATH --layer L] [--hidden 256] [--timeout-ms 30000] [--stop-rank R]
//
// Without --trace a synthetic workload is used: 64 experts, top-8, 32 running requests per rank,
// each request drawing 70% of its experts from its node's domain. With --trace (a locus binary
// trace or an ESFT folder) requests are dealt round-robin to ranks and decode step s takes the
// s-th token of every request on the rank. The layer's expert compute is a user callable
// (layer::expert_callable) applying a small dense map per expert (y = W_e x with a fixed W_e), and
// every step's output is checked against a dense reference.
//
// Faults end the run on every rank instead of hanging it: the ranks agree whether every one of them
// could parse its options (tool_cli::parse_or_finish), then check that they were given the same
// options (a rank told a different --steps would otherwise wait for ever in an exchange its peers
// never make), every step names its exchanges (mpi_transport::begin_step), and the per-step
// synchronisation runs under the same deadline as the exchanges (--timeout-ms). After reporting an
// error a rank calls MPI_Abort, since a rank that stopped or left would block MPI_Finalize; errors
// every rank meets alike in step (different options, a trace that cannot be read) end every rank
// through MPI_Finalize instead.
// --stop-rank R is a fault drill: rank R stops itself (SIGSTOP) before the second step.
#include "../locus/trace_input.hpp"
#include "tool_cli_mpi.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <functional>
#include <locus/core/mpi_error.hpp>
#include <locus/layer/moe_layer.hpp>
#include <locus/locus.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/mpi.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>

using namespace locus;
using namespace locus::transport;

namespace {

using tool_cli::positive;

constexpr std::size_t max_timeout_ms = 86'400'000;

struct options {
  std::size_t gpus_per_node = 2, steps = 16, hidden = 256, layer = 0, requests_per_rank = 32, timeout_ms = 30000;
  std::size_t stop_rank = SIZE_MAX;
  std::string trace;
};

// Waits for a nonblocking collective until the deadline: the blocking form would wait for ever
// on a rank that stopped or left.
void finish(MPI_Request& request, const options& o, const char* what) {
  // Clamped: the option check, which refuses a deadline past a day on every rank alike, runs
  // under it too (past 2^63 ms the deadline would wrap to one already passed).
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(std::min(o.timeout_ms, max_timeout_ms));
  for (;;) {
    int done = 0;
    LOCUS_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (std::chrono::steady_clock::now() > deadline)
      LOCUS_THROW(timeout_error, what, " did not complete within ", o.timeout_ms,
                  " ms: a rank stopped, left or runs a different number of steps");
    std::this_thread::yield();
  }
}

// Thrown once every rank knows the run cannot go on and one of them has said why: each ends
// through MPI_Finalize with status 1.
struct agreed_failure {};

// Every rank must run the same configuration. Each rank gathers every rank's options (under the
// deadline) and, when they differ, all raise the same config_error naming the ranks and values.
void check_same_options(const options& o, std::size_t ranks) {
  const std::uint64_t mine[] = {o.gpus_per_node,     o.steps,      o.hidden,    o.layer,
                                o.requests_per_rank, o.timeout_ms, o.stop_rank, std::hash<std::string>{}(o.trace)};
  constexpr std::size_t fields = std::size(mine);
  const char* names[fields] = {"--gpus-per-node",     "--steps",      "--hidden",    "--layer",
                               "--requests-per-rank", "--timeout-ms", "--stop-rank", "--trace"};
  std::vector<std::uint64_t> all(fields * ranks);
  MPI_Request r = MPI_REQUEST_NULL;
  LOCUS_MPI_CHECK(MPI_Iallgather(mine, static_cast<int>(fields), MPI_UINT64_T, all.data(), static_cast<int>(fields),
                                 MPI_UINT64_T, MPI_COMM_WORLD, &r));
  finish(r, o, "the option check");
  for (std::size_t f = 0; f < fields; ++f)
    for (std::size_t q = 1; q < ranks; ++q)
      if (all[q * fields + f] != all[f]) {
        std::string values;
        for (std::size_t p = 0; p < ranks; ++p)
          values +=
              locus::detail::concat(p ? ", " : "", "rank ", p, ": ",
                                    f + 1 == fields ? (all[p * fields + f] == all[f] ? "as rank 0" : "another value")
                                                    : std::to_string(all[p * fields + f]));
        LOCUS_THROW(config_error, "the ranks were given different ", names[f], " (", values,
                    "); every rank must run the same configuration");
      }
}

// The workload: per step and rank, a routing (ids int32, weights) of that rank's running tokens.
struct workload {
  std::size_t experts = 0, k = 0;
  std::vector<std::vector<routing<>>> steps; // [step][rank]
};

workload synthetic(const options& o, const dynamic_topology& topo) {
  workload w;
  w.experts = 64;
  w.k = 8;
  std::vector<std::size_t> perm(w.experts);
  for (std::size_t e = 0; e < w.experts; ++e)
    perm[e] = e;
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(7));
  const std::size_t per = w.experts / topo.nodes();
  for (std::size_t s = 0; s < o.steps; ++s) {
    std::vector<routing<>> ranks;
    for (std::size_t r = 0; r < topo.ranks(); ++r) {
      std::mt19937_64 rng(s * 7919 + r);
      routing<> rt(o.requests_per_rank, top_k<>(w.k));
      for (std::size_t t = 0; t < o.requests_per_rank; ++t)
        for (std::size_t j = 0; j < w.k; ++j)
          for (;;) {
            const bool local = rng() % 10 < 7 && per >= w.k;
            const std::size_t e = perm[local ? topo.node_of(r) * per + rng() % per : rng() % w.experts];
            bool dup = false;
            for (std::size_t p = 0; p < j; ++p)
              dup |= static_cast<std::size_t>(rt.view().expert(t, p)) == e;
            if (dup) continue;
            rt.view().expert(t, j) = static_cast<expert_id>(e);
            rt.view().weight(t, j) = 1.0f / static_cast<float>(w.k);
            break;
          }
      ranks.push_back(std::move(rt));
    }
    w.steps.push_back(std::move(ranks));
  }
  return w;
}

workload from_trace(const options& o, const dynamic_topology& topo) {
  const auto tr = locus_driver::load_trace(o.trace);
  LOCUS_REQUIRE(o.layer < tr.layers(), config_error, "layer ", o.layer, " out of range [0, ", tr.layers(), ")");
  workload w;
  w.experts = tr.experts();
  w.k = tr.top_k();
  const auto view = tr.layer(o.layer);
  for (std::size_t s = 0; s < o.steps; ++s) {
    std::vector<routing<>> ranks;
    for (std::size_t r = 0; r < topo.ranks(); ++r) {
      std::vector<expert_id> ids;
      std::vector<float> weights;
      for (std::size_t q = r; q < tr.requests(); q += topo.ranks()) {
        const auto& req = tr.request(q);
        if (s >= req.length) continue;
        const std::size_t t = req.first_token + s;
        for (std::size_t j = 0; j < w.k; ++j) {
          ids.push_back(static_cast<expert_id>(view.expert(t, j)));
          weights.push_back(view.weight(t, j));
        }
      }
      ranks.emplace_back(std::move(ids), std::move(weights), top_k<>(w.k));
    }
    w.steps.push_back(std::move(ranks));
  }
  return w;
}

// W_e[i][h]: a fixed, expert-specific dense map (small integers over 64: exact products).
float weight_of(std::size_t e, std::size_t i, std::size_t h) {
  return static_cast<float>(static_cast<int>((e * 17 + i * 5 + h * 3) % 9) - 4) / 64.0f;
}
void expert_ffn(std::size_t e, const float* x, float* y, std::size_t hidden) {
  for (std::size_t i = 0; i < hidden; ++i) {
    float acc = 0;
    for (std::size_t h = 0; h < hidden; ++h)
      acc += weight_of(e, i, h) * x[h];
    y[i] = acc;
  }
}
float input_of(std::size_t rank, std::size_t t, std::size_t h) {
  return static_cast<float>(static_cast<int>((rank * 31 + t * 7 + h) % 13) - 6) / 8.0f;
}
} // namespace

// The workload, read by every rank from the same input (or made alike): the ranks agree whether all
// could, so that a missing or broken trace ends every rank through MPI_Finalize, the lowest failing
// rank saying why, instead of each rank's MPI_Abort.
workload agreed_workload(const options& o, const dynamic_topology& topo, std::size_t me, std::size_t ranks) {
  workload w;
  std::string why;
  try {
    w = o.trace.empty() ? synthetic(o, topo) : from_trace(o, topo);
  } catch (const std::exception& e) {
    why = tool_cli::error_text(e);
  }
  const int mine = why.empty() ? static_cast<int>(ranks) : static_cast<int>(me);
  int first = 0;
  MPI_Request r = MPI_REQUEST_NULL;
  LOCUS_MPI_CHECK(MPI_Iallreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD, &r));
  finish(r, o, "the workload check");
  if (static_cast<std::size_t>(first) == ranks) return w;
  if (static_cast<std::size_t>(first) == me) {
    std::fprintf(stderr, "mpi_decode: rank %zu: %s\n", me, why.c_str());
    std::fflush(stderr);
  }
  throw agreed_failure{};
}

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank_i = 0, size_i = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_i);
  MPI_Comm_size(MPI_COMM_WORLD, &size_i);
  const auto me = static_cast<std::size_t>(rank_i), ranks = static_cast<std::size_t>(size_i);
  int status = 0;
  try {
    options o;
    CLI::App app{"Decode steps of one MoE layer over MPI, flat and hierarchical, linear and locality placement"};
    tool_cli::show_defaults(app);
    app.add_option("--gpus-per-node", o.gpus_per_node, "GPUs (ranks) per node")->check(positive);
    app.add_option("--steps", o.steps, "Decode steps")->check(positive);
    app.add_option("--hidden", o.hidden, "Hidden size")->check(positive);
    app.add_option("--trace", o.trace, "Binary trace or ESFT folder (default: a synthetic workload)");
    app.add_option("--layer", o.layer, "Trace layer to replay");
    app.add_option("--requests-per-rank", o.requests_per_rank, "Running requests per rank")->check(positive);
    app.add_option("--timeout-ms", o.timeout_ms, "Deadline of every exchange and per-step synchronisation")
        ->check(positive);
    app.add_option("--stop-rank", o.stop_rank, "Fault drill: this rank stops itself before the second step")
        ->default_str("none");
    if (const auto code = tool_cli::parse_or_finish(app, argc, argv, MPI_COMM_WORLD, "mpi_decode")) return *code;
    // After the options agree, so that every rank refuses alike (one refusing alone left its peers
    // in the option check): a deadline beyond a day is a mistake, a stop rank past the last one
    // would drill nothing.
    check_same_options(o, ranks);
    LOCUS_REQUIRE(o.timeout_ms <= max_timeout_ms, config_error, "--timeout-ms ", o.timeout_ms, " is more than a day (",
                  max_timeout_ms, " ms)");
    LOCUS_REQUIRE(o.stop_rank == SIZE_MAX || o.stop_rank < ranks, config_error, "--stop-rank ", o.stop_rank,
                  " is past the last of the ", ranks, " ranks");
    LOCUS_REQUIRE(ranks % o.gpus_per_node == 0, config_error, ranks, " ranks are not a multiple of --gpus-per-node ",
                  o.gpus_per_node);
    const dynamic_topology topo(ranks / o.gpus_per_node, o.gpus_per_node);
    // Every rank builds every rank's routings (ids and weights, 8 bytes per choice of 8) of the
    // synthetic workload, and per step its own input and output rows.
    const double per_step = static_cast<double>(ranks) * static_cast<double>(o.requests_per_rank);
    if (o.trace.empty())
      tool_cli::require_memory(static_cast<double>(o.steps) * per_step * 64.0 +
                                   8.0 * static_cast<double>(o.requests_per_rank) * static_cast<double>(o.hidden),
                               "--steps x ranks x --requests-per-rank and --hidden");
    const workload w = agreed_workload(o, topo, me, ranks);

    // Placement input: expert load per node over the workload (what the offline planner sees).
    placement::plan_input in;
    in.topology = topo;
    in.experts = w.experts;
    in.slots_per_rank = std::min(w.experts, (w.experts + ranks - 1) / ranks + 1); // one spare, if it fits
    in.load.assign(1, std::vector<double>(w.experts, 0.0));
    in.node_load.assign(1, std::vector<std::vector<double>>(topo.nodes(), std::vector<double>(w.experts, 0.0)));
    for (const auto& step : w.steps)
      for (std::size_t r = 0; r < ranks; ++r)
        for (expert_id e : step[r].ids()) {
          in.load[0][static_cast<std::size_t>(e)] += 1;
          in.node_load[0][topo.node_of(r)][static_cast<std::size_t>(e)] += 1;
        }

    if (me == 0)
      std::printf("mpi_decode: %zu ranks as %zu nodes x %zu GPUs, %s, %zu experts, top-%zu, hidden %zu, %zu steps\n\n"
                  "%-9s %-17s %14s %14s %14s %12s %10s\n",
                  ranks, topo.nodes(), topo.gpus_per_node(), o.trace.empty() ? "synthetic workload" : o.trace.c_str(),
                  w.experts, w.k, o.hidden, o.steps, "placement", "transport", "same-GPU KB", "intra-node KB",
                  "inter-node KB", "step ms", "max error");
    for (const std::string name : {"linear", "locality"}) {
      const expert_map map = placement::plan_by_name(name, in).at(0);
      for (bool hier : {false, true}) {
        mpi_transport t(MPI_COMM_WORLD, topo, hier ? transport_kind::hierarchical : transport_kind::flat,
                        exchange_options{std::chrono::milliseconds(o.timeout_ms)});
        // The layer with the dense maps as its expert compute; the policy fixes flat or hierarchical.
        auto maps = [&](expert_id e, std::span<const float> rows_in, std::span<float> rows_out, std::size_t rows) {
          for (std::size_t row = 0; row < rows; ++row)
            expert_ffn(static_cast<std::size_t>(e), rows_in.data() + row * o.hidden, rows_out.data() + row * o.hidden,
                       o.hidden);
        };
        using compute = layer::expert_callable<decltype(maps)>;
        const dynamic_moe_shape shape(w.experts, w.k, o.hidden, 0);
        std::optional<moe_layer<dynamic_moe_shape, dynamic_topology, mpi_flat, compute>> flat_layer;
        std::optional<moe_layer<dynamic_moe_shape, dynamic_topology, mpi_hierarchical, compute>> hier_layer;
        // The trace layer's index names the layer in every exchange: an engine stepping several
        // layers gives each its own, so that ranks stepping them in different orders raise.
        if (hier)
          hier_layer.emplace(shape, topo, t, map, compute(maps)).set_layer_index(o.layer);
        else
          flat_layer.emplace(shape, topo, t, map, compute(maps)).set_layer_index(o.layer);
        std::vector<double> times;
        double worst = 0;
        t.reset_bytes();
        for (std::size_t s = 0; s < w.steps.size(); ++s) {
          const routing<>& r = w.steps[s][me];
          std::vector<float> x(r.tokens() * o.hidden), y(x.size());
          for (std::size_t tk = 0; tk < r.tokens(); ++tk)
            for (std::size_t h = 0; h < o.hidden; ++h)
              x[tk * o.hidden + h] = input_of(me, tk, h);
          if (s == 1 && me == o.stop_rank) std::raise(SIGSTOP);
          MPI_Request sync = MPI_REQUEST_NULL;
          LOCUS_MPI_CHECK(MPI_Ibarrier(MPI_COMM_WORLD, &sync));
          finish(sync, o, "the per-step barrier");
          t.begin_step(s);
          const auto t0 = std::chrono::steady_clock::now();
          if (hier)
            hier_layer->forward(x, r.view(), y);
          else
            flat_layer->forward(x, r.view(), y);
          const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          double slowest = 0;
          LOCUS_MPI_CHECK(MPI_Iallreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD, &sync));
          finish(sync, o, "the per-step time reduction");
          times.push_back(slowest);
          // Dense reference in double: every token through its top-k experts, weighted.
          std::vector<float> ye(o.hidden);
          for (std::size_t tk = 0; tk < r.tokens(); ++tk) {
            std::vector<double> ref(o.hidden, 0.0);
            for (std::size_t j = 0; j < w.k; ++j) {
              expert_ffn(static_cast<std::size_t>(r.view().expert(tk, j)), x.data() + tk * o.hidden, ye.data(),
                         o.hidden);
              for (std::size_t h = 0; h < o.hidden; ++h)
                ref[h] += r.view().weight(tk, j) * static_cast<double>(ye[h]);
            }
            for (std::size_t h = 0; h < o.hidden; ++h)
              worst = std::max(worst, std::abs(ref[h] - y[tk * o.hidden + h]) / std::max(1.0, std::abs(ref[h])));
          }
        }
        std::array<std::uint64_t, 3> bytes{};
        MPI_Request sums[2];
        LOCUS_MPI_CHECK(MPI_Ireduce(t.bytes().bytes_sent.data(), bytes.data(), 3, MPI_UINT64_T, MPI_SUM, 0,
                                    MPI_COMM_WORLD, &sums[0]));
        double all_worst = 0;
        LOCUS_MPI_CHECK(MPI_Ireduce(&worst, &all_worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD, &sums[1]));
        finish(sums[0], o, "the byte count reduction");
        finish(sums[1], o, "the error reduction");
        std::sort(times.begin(), times.end());
        if (me == 0)
          std::printf("%-9s %-17s %14.1f %14.1f %14.1f %12.3f %10.1e\n", name.c_str(),
                      hier ? "mpi_hierarchical" : "mpi_flat", static_cast<double>(bytes[0]) / 1e3,
                      static_cast<double>(bytes[1]) / 1e3, static_cast<double>(bytes[2]) / 1e3,
                      times[times.size() / 2] * 1e3, all_worst);
      }
    }
    if (me == 0)
      std::printf("\nbytes: dispatch + combine over all steps and ranks; step ms: median of the slowest rank\n");
  } catch (const agreed_failure&) {
    status = 1; // said by the rank that found it; every rank is in step and can finalize
  } catch (const config_error& e) {
    std::fprintf(stderr, "mpi_decode: rank %zu: %s\n", me, tool_cli::error_text(e).c_str());
    std::fflush(stderr);
    // Raised alike on every rank (different options, topology): all are in step and can finalize.
    status = 1;
  } catch (const std::exception& e) {
    // A rank that stopped or left would block MPI_Finalize: end the job.
    std::fprintf(stderr, "mpi_decode: rank %zu: %s\n", me, tool_cli::error_text(e).c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
