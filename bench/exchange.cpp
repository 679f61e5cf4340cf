// bench/exchange: what do locus's dispatch + combine cost over the raw MPI collective moving the
// same bytes, and what do node dedup (hierarchical) and a locality placement save?
//
//   mpirun -np 8 build/dev/bench/exchange [--gpus-per-node 2] [--tokens 256] [--hidden 1024]
//          [--experts 64] [--top-k 8] [--steps 12] [--input fused,rows] [--json exchange.json]
//          [--markdown exchange.md]
//
// For every (placement, transport) pair, each step runs the layer's path: layout (replica choice,
// destination plan, per-rank counts, fan-out entries), dispatch (rows packed once, exchanged with
// their entries, per-expert blocks of pointers into the receive buffers) and combine (weighted
// partial sums per received copy, exchanged back, per-token sum; in `fused` the expert compute
// forms the weighted sums, as the layer does with layer::swiglu_host (each copy's first row writes
// its sum, so nothing is zeroed), and combine sends them; in `rows` combine forms them from output
// rows),
// then replays the very same exchanges (same communicators, row widths and per-peer counts) as
// bare MPI_Alltoallv calls on pre-filled buffers: the raw collective for the same bytes. Times are
// the slowest rank's, medians over steps (or, with --statistic min, the fastest step). Routings are synthetic with
// domain locality: tokens of node n draw their experts from domain n with probability --locality, so a locality
// placement has something to find; the locality placement is planned from the routings' node usage.
#include "bench_args.hpp"
#include "bench_output.hpp"
#include "tool_cli_mpi.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <locus/core/mpi_error.hpp>
#include <locus/locus.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/mpi.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>

using namespace locus;
using namespace locus::transport;

namespace {
struct options {
  std::size_t gpus_per_node = 2, tokens = 256, hidden = 1024, experts = 64, k = 8, steps = 12, warmup = 2;
  double locality = 0.7;
  std::string json = "exchange.json", markdown;
  std::vector<std::string> inputs{"fused", "rows"};
  std::string statistic = "median";
};

// Records every exchange a dispatcher makes, so the raw collective can replay the same counts.
struct record {
  exchange_group group;
  std::size_t row_bytes;
  std::vector<int> send_counts, recv_counts;
};
class recording_exchanger {
public:
  static constexpr bool carries_entries = true;
  explicit recording_exchanger(mpi_transport& t) : t_(&t) {}
  std::size_t rank() const noexcept { return t_->rank(); }
  const dynamic_topology& topology() const noexcept { return t_->topology(); }
  bool hierarchical() const noexcept { return t_->hierarchical(); }
  std::size_t group_size(exchange_group g) const noexcept { return t_->group_size(g); }
  std::size_t world_rank_of(exchange_group g, std::size_t m) const noexcept { return t_->world_rank_of(g, m); }
  const link_counters& bytes() const noexcept { return t_->bytes(); }
  void reset_bytes() noexcept { t_->reset_bytes(); }
  void exchange(const exchange_request& req, exchange_result& out) {
    const auto t0 = std::chrono::steady_clock::now();
    t_->exchange(req, out);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!recording) return;
    // Rows a rank keeps for itself (read in place, never copied) are replayed as rows to itself,
    // as a caller of MPI_Alltoallv has to send them: the replay moves every row of the dispatch.
    const std::size_t self = self_member(req.group);
    record r{req.group, req.row_bytes, {}, {}};
    for (std::size_t c : req.counts)
      r.send_counts.push_back(static_cast<int>(c));
    for (std::size_t c : out.counts)
      r.recv_counts.push_back(static_cast<int>(c));
    r.send_counts[self] += static_cast<int>(req.kept_rows);
    r.recv_counts[self] += static_cast<int>(req.kept_rows);
    log.push_back(std::move(r));
    if (req.entry_bytes == 0) return;
    // The raw replay moves the entries in a collective of their own.
    record e{req.group, req.entry_bytes, {}, {}};
    for (std::size_t c : req.entry_counts)
      e.send_counts.push_back(static_cast<int>(c));
    for (std::size_t c : out.entry_counts)
      e.recv_counts.push_back(static_cast<int>(c));
    e.send_counts[self] += static_cast<int>(req.kept_entries);
    e.recv_counts[self] += static_cast<int>(req.kept_entries);
    log.push_back(std::move(e));
  }
  bool recording = false;
  double seconds = 0; //!< wall time inside exchanges (header round + collective)
  std::vector<record> log;

private:
  std::size_t self_member(exchange_group g) const noexcept {
    const std::size_t gpus = t_->topology().gpus_per_node();
    return g == exchange_group::node ? rank() % gpus : g == exchange_group::rail ? rank() / gpus : rank();
  }
  mpi_transport* t_;
};

// Bare MPI_Alltoallv of recorded counts on pre-allocated buffers.
// With `with_counts`, each Alltoallv is preceded by the MPI_Alltoall of its counts that any caller
// who does not know the receive counts in advance needs (the minimal count exchange).
double replay(const mpi_transport& t, const std::vector<record>& log, std::size_t first, std::size_t last,
              std::vector<std::byte>& send, std::vector<std::byte>& recv, bool with_counts = false) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = first; i < last; ++i) {
    const record& r = log[i];
    const std::size_t n = r.send_counts.size();
    std::vector<int> sd(n), rd(n);
    int s = 0, q = 0;
    for (std::size_t m = 0; m < n; ++m) {
      sd[m] = s;
      s += r.send_counts[m];
      rd[m] = q;
      q += r.recv_counts[m];
    }
    if (send.size() < static_cast<std::size_t>(s) * r.row_bytes) send.resize(static_cast<std::size_t>(s) * r.row_bytes);
    if (recv.size() < static_cast<std::size_t>(q) * r.row_bytes) recv.resize(static_cast<std::size_t>(q) * r.row_bytes);
    if (with_counts) {
      std::vector<int> got(n);
      LOCUS_MPI_CHECK(MPI_Alltoall(r.send_counts.data(), 1, MPI_INT, got.data(), 1, MPI_INT, t.communicator(r.group)));
    }
    MPI_Datatype row;
    MPI_Type_contiguous(static_cast<int>(r.row_bytes), MPI_BYTE, &row);
    MPI_Type_commit(&row);
    LOCUS_MPI_CHECK(MPI_Alltoallv(send.data(), r.send_counts.data(), sd.data(), row, recv.data(), r.recv_counts.data(),
                                  rd.data(), row, t.communicator(r.group)));
    MPI_Type_free(&row);
  }
  const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

// Routing of one rank at one step: k distinct experts, from the node's domain with probability p.
routing<> make_routing(const options& o, const dynamic_topology& topo, std::size_t rank, std::size_t step) {
  std::mt19937_64 rng(0x5eed + step * 1000003 + rank);
  const std::size_t domain = topo.node_of(rank), domains = topo.nodes(), per = o.experts / domains;
  // Domains are a fixed shuffle of the experts, so that linear placement does not match them.
  std::vector<std::size_t> perm(o.experts);
  for (std::size_t e = 0; e < o.experts; ++e)
    perm[e] = e;
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(42));
  std::uniform_real_distribution<double> u(0, 1);
  routing<> r(o.tokens, top_k<>(o.k));
  for (std::size_t t = 0; t < o.tokens; ++t)
    for (std::size_t j = 0; j < o.k; ++j) {
      for (;;) {
        const std::size_t e = perm[u(rng) < o.locality && per >= o.k ? domain * per + rng() % per : rng() % o.experts];
        bool dup = false;
        for (std::size_t p = 0; p < j; ++p)
          dup |= static_cast<std::size_t>(r.view().expert(t, p)) == e;
        if (dup) continue;
        r.view().expert(t, j) = static_cast<expert_id>(e);
        r.view().weight(t, j) = 1.0f / static_cast<float>(o.k);
        break;
      }
    }
  return r;
}

// The machine a result was measured on: CPU model, cores, and the load average (1, 5, 15 min),
// which on a shared machine says how much the times can be trusted.
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}
std::string load_average() {
  std::ifstream in("/proc/loadavg");
  double a = 0, b = 0, c = 0;
  in >> a >> b >> c;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f %.2f %.2f", a, b, c);
  return buf;
}
std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&t));
  return buf;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}
double fastest(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

struct result {
  std::string placement, transport, input;
  std::array<std::uint64_t, 3> dispatch_bytes{};
  double dispatch_s = 0, combine_s = 0, raw_dispatch_s = 0, raw_combine_s = 0, exchange_s = 0, raw_counts_s = 0;
};
} // namespace

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
    CLI::App app{"What locus's dispatch + combine cost over the raw MPI collective moving the same bytes, and what "
                 "node dedup and a locality placement save; run it as `mpirun -np R` (R ranks on this machine, a "
                 "multiple of --gpus-per-node)"};
    tool_cli::show_defaults(app);
    app.add_option("--gpus-per-node", o.gpus_per_node, "GPUs (ranks) per node")->check(tool_cli::positive);
    app.add_option("--tokens", o.tokens, "Tokens per rank and step")->check(tool_cli::positive);
    app.add_option("--hidden", o.hidden, "Hidden size (fp32)")->check(tool_cli::positive);
    app.add_option("--experts", o.experts, "Experts")->check(tool_cli::positive);
    app.add_option("--top-k", o.k, "Experts per token")->check(tool_cli::positive);
    app.add_option("--steps", o.steps, "Timed steps")->check(tool_cli::positive);
    app.add_option("--locality", o.locality, "Chance that a token draws its experts from its node's domain")
        ->check(tool_cli::number_in(0, 1));
    app.add_option("--input", o.inputs, "Compute inputs to measure: fused, rows")
        ->delimiter(',')
        ->check(CLI::IsMember({"fused", "rows"}));
    app.add_option("--statistic", o.statistic,
                   "Per-step times reported: median, or min (the fastest step, in which no rank lost its core to "
                   "another process: what the path costs on a busy shared machine)")
        ->check(CLI::IsMember({"median", "min"}));
    app.add_option("--json", o.json, "JSON results file");
    app.add_option("--markdown", o.markdown, "Markdown results file (default: none)");
    if (const auto code = tool_cli::parse_or_finish(app, argc, argv, MPI_COMM_WORLD, "exchange")) return *code;
    // Checked on every rank alike, so that all leave through MPI_Finalize (not the abort's banner).
    try {
      bench_output::require_distinct(o.json, o.markdown);
    } catch (const std::invalid_argument& e) {
      if (me == 0) std::fprintf(stderr, "exchange: usage error: %s\n", e.what());
      MPI_Finalize();
      return 2;
    }
    if (me == 0) { // the writer: a results file that cannot be written is said before the run
      bench_args::output_file(o.json);
      if (!o.markdown.empty()) bench_args::output_file(o.markdown);
    }
    const std::string command =
        bench_args::command_line(argc, argv, "mpirun -np " + std::to_string(ranks) + " build/dev/bench/exchange");
    if (ranks % o.gpus_per_node != 0) {
      // Every rank sees the same world: all leave through MPI_Finalize, without the abort's banner
      // (one rank alone is the usual case: the program started without mpirun).
      if (me == 0)
        std::fprintf(stderr,
                     "exchange: configuration error: %zu rank%s not a multiple of %zu GPUs per node: run it as "
                     "`mpirun -np R` with R a multiple of --gpus-per-node\n",
                     ranks, ranks == 1 ? " is" : "s are", static_cast<std::size_t>(o.gpus_per_node));
      MPI_Finalize();
      return 1;
    }
    const dynamic_topology topo(ranks / o.gpus_per_node, o.gpus_per_node);
    const std::size_t slots = (o.experts + ranks - 1) / ranks + 1;

    // Node usage of the routings, for the locality planner (every rank computes the same).
    placement::plan_input in;
    in.topology = topo;
    in.experts = o.experts;
    in.slots_per_rank = slots;
    in.load.assign(1, std::vector<double>(o.experts, 0.0));
    in.node_load.assign(1, std::vector<std::vector<double>>(topo.nodes(), std::vector<double>(o.experts, 0.0)));
    for (std::size_t s = 0; s < o.steps + o.warmup; ++s)
      for (std::size_t r = 0; r < ranks; ++r) {
        const auto routing = make_routing(o, topo, r, s);
        for (expert_id e : routing.ids()) {
          in.load[0][static_cast<std::size_t>(e)] += 1;
          in.node_load[0][topo.node_of(r)][static_cast<std::size_t>(e)] += 1;
        }
      }

    const std::string load_before = load_average(), started = utc_now();
    std::vector<result> results;
    std::vector<std::byte> raw_send, raw_recv;
    for (const std::string placement_name : {"linear", "locality"}) {
      const expert_map map = placement::plan_by_name(placement_name, in).at(0);
      for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical})
        for (const std::string& input : o.inputs) {
          mpi_transport t(MPI_COMM_WORLD, topo, kind, exchange_options{std::chrono::seconds(120)});
          recording_exchanger rec(t);
          moe_dispatcher<recording_exchanger, float> d(rec, map, o.hidden);
          layout<> plan;
          dispatch_handle<float> h;
          result res{placement_name, std::string("mpi_") + to_string(kind), input};
          std::vector<double> ds, cs, rds, rcs, es, rks;
          for (std::size_t s = 0; s < o.steps + o.warmup; ++s) {
            const auto routing = make_routing(o, topo, me, s);
            std::vector<float> x(o.tokens * o.hidden, 1.0f), y(x.size());
            rec.log.clear();
            rec.recording = true;
            rec.seconds = 0;
            t.reset_bytes();
            MPI_Barrier(MPI_COMM_WORLD);
            const auto t0 = std::chrono::steady_clock::now();
            d.plan(plan, routing.view());
            d.dispatch(std::span<const float>(x), plan, h);
            const auto t1 = std::chrono::steady_clock::now();
            const std::size_t dispatch_exchanges = rec.log.size();
            const auto bytes = t.bytes().bytes_sent;
            MPI_Barrier(MPI_COMM_WORLD);
            const auto t2 = std::chrono::steady_clock::now();
            // The layer's fused compute (swiglu_host) writes each copy's first row: unzeroed sums.
            if (input == "fused") static_cast<void>(h.copy_sums_to_write());
            d.combine(y, h);
            const auto t3 = std::chrono::steady_clock::now();
            rec.recording = false;
            double local[3] = {std::chrono::duration<double>(t1 - t0).count(),
                               std::chrono::duration<double>(t3 - t2).count(), rec.seconds};
            double slowest[3];
            MPI_Allreduce(local, slowest, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            const double rd = replay(t, rec.log, 0, dispatch_exchanges, raw_send, raw_recv);
            const double rc = replay(t, rec.log, dispatch_exchanges, rec.log.size(), raw_send, raw_recv);
            const double rk = replay(t, rec.log, 0, rec.log.size(), raw_send, raw_recv, true);
            if (s < o.warmup) continue;
            ds.push_back(slowest[0]);
            es.push_back(slowest[2]);
            cs.push_back(slowest[1]);
            rds.push_back(rd);
            rcs.push_back(rc);
            rks.push_back(rk);
            std::array<std::uint64_t, 3> all{};
            MPI_Allreduce(bytes.data(), all.data(), 3, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
            for (std::size_t c = 0; c < 3; ++c)
              res.dispatch_bytes[c] += all[c];
          }
          const auto stat = [&](const std::vector<double>& v) { return o.statistic == "min" ? fastest(v) : median(v); };
          res.dispatch_s = stat(ds);
          res.combine_s = stat(cs);
          res.raw_dispatch_s = stat(rds);
          res.raw_combine_s = stat(rcs);
          res.exchange_s = stat(es);
          res.raw_counts_s = stat(rks);
          results.push_back(res);
        }
    }

    if (me == 0) {
      const result& base = results.front(); // linear, flat
      nlohmann::json j;
      const std::string machine = cpu_model() + ", " + std::to_string(std::thread::hardware_concurrency()) +
                                  " hardware threads, load average " + load_before + " at the start and " +
                                  load_average() + " at the end";
      j["command"] = command;
      j["machine"] = machine;
      j["date"] = started;
      j["ranks"] = ranks;
      j["nodes"] = topo.nodes();
      j["gpus_per_node"] = topo.gpus_per_node();
      j["tokens_per_rank"] = o.tokens;
      j["hidden"] = o.hidden;
      j["experts"] = o.experts;
      j["top_k"] = o.k;
      j["steps"] = o.steps;
      j["statistic"] = o.statistic;
      j["locality"] = o.locality;
      std::string table;
      char line[512];
      std::snprintf(line, sizeof line,
                    "| %-9s | %-16s | %-6s | %14s | %14s | %9s | %9s | %9s | %9s | %10s | %8s | %12s | %9s | %9s |\n",
                    "placement", "transport", "input", "inter-node MB", "intra-node MB", "disp ms", "raw ms", "comb ms",
                    "raw ms", "in exch ms", "overhead", "vs raw+cnt", "inter/lin", "time/lin");
      table += line;
      table += "|-----------|------------------|--------|---------------:|---------------:|----------:|----------:|----"
               "------:|"
               "----------:|-----------:|---------:|-------------:|----------:|----------:|\n";
      for (const auto& r : results) {
        const double total = r.dispatch_s + r.combine_s, raw = r.raw_dispatch_s + r.raw_combine_s;
        const double inter = static_cast<double>(r.dispatch_bytes[2]) / 1e6 / static_cast<double>(o.steps);
        const double intra = static_cast<double>(r.dispatch_bytes[1]) / 1e6 / static_cast<double>(o.steps);
        const double base_inter = static_cast<double>(base.dispatch_bytes[2]);
        const double base_total = base.dispatch_s + base.combine_s;
        std::snprintf(
            line, sizeof line,
            "| %-9s | %-16s | %-6s | %14.2f | %14.2f | %9.2f | %9.2f | %9.2f | %9.2f | %10.2f | %7.1f%% | %11.1f%% "
            "| %9.3f | %9.3f |\n",
            r.placement.c_str(), r.transport.c_str(), r.input.c_str(), inter, intra, r.dispatch_s * 1e3,
            r.raw_dispatch_s * 1e3, r.combine_s * 1e3, r.raw_combine_s * 1e3, r.exchange_s * 1e3,
            (total / raw - 1.0) * 100.0, (total / r.raw_counts_s - 1.0) * 100.0,
            base_inter > 0 ? static_cast<double>(r.dispatch_bytes[2]) / base_inter : 0.0, total / base_total);
        table += line;
        j["results"].push_back(
            {{"placement", r.placement},
             {"transport", r.transport},
             {"expert_input", r.input},
             {"dispatch_bytes_per_step",
              {{"same_gpu", r.dispatch_bytes[0] / o.steps},
               {"intra_node", r.dispatch_bytes[1] / o.steps},
               {"inter_node", r.dispatch_bytes[2] / o.steps}}},
             {"dispatch_s", r.dispatch_s},
             {"combine_s", r.combine_s},
             {"raw_dispatch_s", r.raw_dispatch_s},
             {"raw_combine_s", r.raw_combine_s},
             {"time_inside_exchanges_s", r.exchange_s},
             {"raw_with_count_exchange_s", r.raw_counts_s},
             {"overhead_vs_raw_with_counts", total / r.raw_counts_s - 1.0},
             {"overhead", total / raw - 1.0},
             {"inter_node_bytes_vs_linear_flat", static_cast<double>(r.dispatch_bytes[2]) / std::max(base_inter, 1.0)},
             {"time_vs_linear_flat", total / base_total}});
      }
      std::printf("exchange: %zu ranks as %zu nodes x %zu GPUs, %zu tokens/rank, hidden %zu (fp32), %zu experts, "
                  "top-%zu, %zu steps (%s; slowest rank)\n",
                  ranks, topo.nodes(), topo.gpus_per_node(), o.tokens, o.hidden, o.experts, o.k, o.steps,
                  o.statistic.c_str());
      std::printf("overhead = (locus dispatch + combine) / (raw MPI_Alltoallv of the same exchanges) - 1; "
                  "bytes per dispatch step (combine moves the same rows back)\n\n%s",
                  table.c_str());
      bench_output::files files; // the two together or neither
      files[o.json] << j.dump(2) << "\n";
      if (!o.markdown.empty()) {
        auto& md = files[o.markdown];
        md << "# Exchange benchmark\n\n"
           << "Command: `" << command << "`\n\n"
           << "Machine: " << machine << "; " << started << ".\n\n"
           << ranks << " MPI ranks on one machine acting as " << topo.nodes() << " nodes × " << topo.gpus_per_node()
           << " GPUs; " << o.tokens << " tokens per rank, hidden " << o.hidden << " (fp32), " << o.experts
           << " experts, top-" << o.k << ", " << o.steps << " steps ("
           << (o.statistic == "min" ? "fastest step" : "medians")
           << ", slowest rank). Every link is shared memory here, so the times say what locus "
              "adds over the raw collective; the inter-node bytes say what a network would carry.\n\n"
           << "`overhead` = (locus dispatch + combine) / (bare `MPI_Alltoallv` replay of the same exchanges, same "
              "counts and communicators) − 1. `inter/lin` and `time/lin` are relative to linear placement with the "
              "flat transport. `in exch ms` is the time dispatch + combine spent inside the transport's exchanges "
              "(header round + collective); `vs raw+cnt` compares with the raw replay preceded, per exchange, by the "
              "`MPI_Alltoall` of counts a caller needs when receive counts are not known in advance; the rest of "
              "locus's time is the layout and permutations (packing rows, "
              "ordering rows per expert, weighted sums). `input`: `rows` hands the compute a pointer per row into "
              "the receive buffers and combine forms the weighted sums from output rows; `fused` lets the expert "
              "compute add each output row, "
              "weighted, to its copy's sum (what the layer does with `layer::swiglu_host`), so combine times only "
              "zeroing and sending the sums: the sums' cost is in the compute, measured by "
              "`bench/expert_compute`.\n\n"
           << table;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "exchange: rank %zu: %s\n", me, tool_cli::error_text(e).c_str());
    status = 1;
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
