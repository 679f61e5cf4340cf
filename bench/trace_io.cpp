// How fast are the trace readers? (issue 3)
//   1. Importing the three ESFT domains (~37 MB of TSV): locus::trace::import_esft against a
//      straightforward std::ifstream / operator>> parser written here (target: locus < 2 s).
//   2. Route JSONL import (one record per token and layer, written here from the ESFT trace, or
//      from a small synthetic trace without it): locus::trace::import_jsonl (SAX parse into
//      columns, then request assembly and validation) against std::getline + a full nlohmann-json
//      DOM parse per line that only pulls the fields out (no assembly, no checks).
//   3. Binary write and read of a ~1 GB synthetic trace from the page cache: locus write_trace /
//      read_trace (validating, checksummed) against reading the same file through an
//      std::ifstream one value at a time per column (target: locus read >= 1 GB/s).
// Usage: trace_io [--trace DIR] [--gb 1.0] [--tmp DIR] [--out DIR]
// Writes DIR/trace_io.json and DIR/trace_io.md; the temporary binary file is removed.
#include "bench_args.hpp"
#include "bench_output.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <sys/statvfs.h>
#include <unistd.h>
#include <vector>

namespace {

// The temporary files (a gigabyte each at the default --gb) are removed by destructors, which a
// signal does not run: a Ctrl-C, SIGTERM or SIGHUP removes them here, then ends the run as it would.
char temporary_paths[3][4096];
void remove_temporaries(int sig) {
  for (const auto& p : temporary_paths)
    if (p[0]) ::unlink(p);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
void remove_on_signal(std::size_t slot, const std::string& path) {
  if (path.size() >= sizeof temporary_paths[slot]) return;
  std::memcpy(temporary_paths[slot], path.c_str(), path.size() + 1);
  for (const int sig : {SIGINT, SIGTERM, SIGHUP})
    std::signal(sig, remove_temporaries);
}
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

//! Wall-clock and CPU seconds (user + system of this process: on a shared, oversubscribed machine
//! the wall clock mostly measures waiting for a core, CPU time what the work itself costs).
struct timing {
  double wall = 1e300, cpu = 1e300;
};

//! Best of `n` runs, wall and CPU separately (the minimum is the least disturbed run).
template <class F>
timing best_of(int n, F&& f) {
  timing best;
  for (int i = 0; i < n; ++i) {
    const auto c0 = std::clock();
    const auto t0 = clock_type::now();
    f();
    best.wall = std::min(best.wall, std::chrono::duration<double>(clock_type::now() - t0).count());
    best.cpu = std::min(best.cpu, static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC);
  }
  return best;
}

//! The baseline ESFT parser: getline per sequence, operator>> per value, no validation beyond
//! what the stream does. Returns the number of (id, weight) pairs read.
std::size_t baseline_esft(const fs::path& root) {
  std::size_t pairs = 0;
  std::vector<int> ids;
  std::vector<float> weights;
  for (const auto& dom : {"intent", "law", "summary"})
    for (int l = 1; l <= 26; ++l) {
      std::ifstream in(root / dom / ("expert_weights_" + std::to_string(l) + ".txt"));
      std::string line;
      while (std::getline(in, line)) {
        const auto cut = line.find("\t\t");
        std::istringstream a(line.substr(0, cut)), b(line.substr(cut + 2));
        ids.clear();
        weights.clear();
        int id;
        float w;
        while (a >> id)
          ids.push_back(id);
        while (b >> w)
          weights.push_back(w);
        pairs += std::min(ids.size(), weights.size());
      }
    }
  return pairs;
}

//! Writes `t` as route JSONL (docs/trace-format.md): a meta line, then one record per token and
//! layer, request by request. Returns the number of route records.
std::size_t write_jsonl(const locus::trace::trace& t, const std::string& path) {
  locus::atomic_file f(path);
  std::size_t records = 0;
  f.write("{\"type\": \"meta\", \"num_experts\": " + std::to_string(t.experts()) +
          ", \"top_k\": " + std::to_string(t.top_k()) + "}\n");
  std::string line;
  char num[32];
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    for (std::size_t i = 0; i < q.length; ++i) {
      const std::size_t tok = q.first_token + i;
      for (std::size_t l = 0; l < t.layers(); ++l) {
        const auto v = t.layer(l);
        line = "{\"req_id\": " + std::to_string(q.id) + ", \"token_idx\": " + std::to_string(i) +
               ", \"layer\": " + std::to_string(l) + ", \"topk_ids\": [";
        for (std::size_t j = 0; j < t.top_k(); ++j)
          line += (j ? ", " : "") + std::to_string(v.token_ids(tok)[j]);
        line += "], \"topk_weights\": [";
        for (std::size_t j = 0; j < t.top_k(); ++j) {
          std::snprintf(num, sizeof num, "%s%.6g", j ? ", " : "", static_cast<double>(v.token_weights(tok)[j]));
          line += num;
        }
        line += "], \"phase\": \"";
        line += t.token_phase(tok) == locus::trace::phase::decode ? "decode" : "prefill";
        line += "\", \"domain\": \"" + t.domains()[q.domain] + "\"}\n";
        f.write(line);
        ++records;
      }
    }
  }
  f.commit();
  return records;
}

//! The baseline JSONL reader: getline, a full DOM parse per line, the fields pulled into vectors.
//! Returns the number of route records read.
std::size_t baseline_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::vector<std::uint64_t> req, token, layer;
  std::vector<int> ids;
  std::vector<float> weights;
  std::vector<std::string> phase, domain;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    if (j.contains("type") && j["type"] != "route") continue;
    req.push_back(j["req_id"].get<std::uint64_t>());
    token.push_back(j["token_idx"].get<std::uint64_t>());
    layer.push_back(j["layer"].get<std::uint64_t>());
    for (const auto& v : j["topk_ids"])
      ids.push_back(v.get<int>());
    for (const auto& v : j["topk_weights"])
      weights.push_back(v.get<float>());
    phase.push_back(j["phase"].get<std::string>());
    domain.push_back(j["domain"].get<std::string>());
  }
  return req.size();
}

//! A synthetic trace of `tokens` tokens (requests of 512), top-8 of 256 experts, `layers` layers.
locus::trace::trace synthetic(std::size_t tokens, std::size_t layers) {
  locus::trace::trace_builder b(256, 8, layers);
  b.set_domains({"synthetic"});
  b.reserve_tokens(tokens);
  for (std::size_t t = 0, r = 0; t < tokens; t += 512, ++r)
    b.add_request(r, 0, std::min<std::size_t>(512, tokens - t));
  locus::trace::detail::splitmix64 g(7);
  for (std::size_t l = 0; l < layers; ++l) {
    auto ids = b.layer_ids(l);
    auto w = b.layer_weights(l);
    for (std::size_t t = 0; t < tokens; ++t) {
      // Eight distinct experts: a random start and a random odd stride modulo 256.
      const std::uint64_t x = g.next();
      const auto start = static_cast<unsigned>(x & 255u), stride = static_cast<unsigned>(((x >> 8) & 127u) * 2 + 1);
      for (std::size_t j = 0; j < 8; ++j) {
        ids[t * 8 + j] = static_cast<locus::trace::trace_expert_id>((start + j * stride) & 255u);
        w[t * 8 + j] = static_cast<float>((x >> (16 + 5 * j)) & 31u) / 32.0f;
      }
    }
  }
  return b.build();
}

//! The baseline binary reader: the same file through std::ifstream, one value at a time per column
//! (header fields taken on trust; no checksum, no validation). Returns a sum so nothing is elided.
std::uint64_t baseline_read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  auto get = [&](auto& v) { in.read(reinterpret_cast<char*>(&v), sizeof v); };
  char magic[8];
  in.read(magic, 8);
  std::uint32_t version, header, experts, k, layers, domains;
  std::uint64_t requests, tokens, payload, checksum, reserved, hchecksum;
  get(version), get(header), get(experts), get(k), get(layers), get(domains);
  get(requests), get(tokens), get(payload), get(checksum), get(reserved), get(hchecksum);
  std::uint64_t pos = 80;
  auto skip_pad = [&] {
    while (pos % 8) {
      char c;
      in.read(&c, 1);
      ++pos;
    }
  };
  for (std::uint32_t d = 0; d < domains; ++d) {
    std::uint32_t len;
    get(len);
    std::string s(len, '\0');
    in.read(s.data(), len);
    pos += 4 + len;
  }
  skip_pad();
  std::vector<std::uint64_t> ids_r(requests);
  std::vector<std::uint32_t> dom(requests), len(requests);
  for (std::uint64_t r = 0; r < requests; ++r)
    get(ids_r[r]), get(dom[r]), get(len[r]);
  pos += 16 * requests;
  std::vector<std::uint8_t> phases(tokens);
  for (auto& p : phases)
    get(p);
  pos += tokens;
  skip_pad();
  std::vector<std::int32_t> steps(tokens);
  for (auto& s : steps)
    get(s);
  pos += 4 * tokens;
  skip_pad();
  std::uint64_t sum = 0;
  std::vector<std::uint16_t> ids(tokens * k);
  std::vector<float> w(tokens * k);
  for (std::uint32_t l = 0; l < layers; ++l) {
    for (auto& v : ids)
      get(v);
    pos += 2 * ids.size();
    skip_pad();
    for (auto& v : w)
      get(v);
    pos += 4 * w.size();
    skip_pad();
    sum += ids.back() + static_cast<std::uint64_t>(w.back());
  }
  if (!in) throw std::runtime_error("baseline reader: stream failed on " + path);
  return sum;
}

} // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Trace readers (ESFT import, binary write/read) against plain iostreams"};
  tool_cli::show_defaults(app);
  std::string esft, tmp_dir = fs::temp_directory_path().string(), out_dir = ".";
  double gb = 1.0;
  const CLI::Option* trace_opt =
      bench_args::add_trace_option(app, esft, "ESFT folder (its import rows are skipped when there is none)");
  app.add_option("--gb", gb, "Size of the synthetic binary trace in GB")->check(tool_cli::positive);
  app.add_option("--tmp", tmp_dir, "Folder for the temporary trace files");
  app.add_option("--out", out_dir, bench_args::out_folder_help);
  if (const auto code = tool_cli::parse(app, argc, argv)) return *code;
  // The ESFT rows are one part of this benchmark: a missing default skips them (saying why), a
  // folder given that is not there ends the run.
  std::string no_esft;
  if (trace_opt->count() > 0) {
    if (!fs::exists(esft)) throw locus::io_error(esft + ": no such folder (--trace)");
    if (!fs::is_directory(esft)) throw locus::io_error(esft + ": not an ESFT folder (--trace)");
  } else if (auto found = bench_args::find_default_trace(); found && fs::is_directory(*found)) {
    esft = *found;
    bench_args::say_default_trace(esft);
  } else {
    no_esft = found ? *found + " is not an ESFT folder" : bench_args::no_default_trace("an ESFT folder");
    esft.clear();
  }
  auto folder = bench_args::output_folder(out_dir); // checked now, made when the first result is written
  const auto run = bench_args::provenance_of(argc, argv, "build/dev/bench/trace_io");
  // The trace and its read-back sit in memory together; the file and the baseline's copy on --tmp.
  // Sizes as a person writes them ("--gb 1.5", "about 3.15 GB"), not std::to_string's "1.500000".
  const auto gb_text = [](double v) {
    char text[32];
    std::snprintf(text, sizeof text, "%.3g", v);
    return std::string(text);
  };
  tool_cli::require_memory(2 * gb * 1e9, "--gb " + gb_text(gb) + " (the trace and its read-back)");
  // The synthetic binary trace: 32 layers × top-8 × 6 bytes per token. A size below one token
  // built an empty trace, whose baseline read then crashed.
  constexpr std::size_t layers = 32;
  constexpr double token_bytes = layers * 8.0 * 6.0;
  const auto tokens = static_cast<std::size_t>(gb * 1e9 / token_bytes);
  if (tokens == 0)
    throw locus::config_error("--gb " + gb_text(gb) + " holds no token of the synthetic trace (one token is " +
                              gb_text(token_bytes / 1e9) + " GB)");
  // --tmp is checked before the first measurement, not when the JSONL rows first write to it.
  struct statvfs fs_info {};
  if (::statvfs(tmp_dir.c_str(), &fs_info) != 0 || !fs::is_directory(tmp_dir))
    throw locus::io_error(tmp_dir + ": no such folder (--tmp)");
  if (static_cast<double>(fs_info.f_bavail) * static_cast<double>(fs_info.f_frsize) < 2.1 * gb * 1e9)
    throw locus::io_error(tmp_dir + ": too little free space for --gb " + gb_text(gb) +
                          " (the binary trace and the baseline's copy: about " + gb_text(2.1 * gb) + " GB)");
  nlohmann::json doc = {{"bench", "trace_io"}, {"esft", esft}, {"rows", nlohmann::json::array()}};
  struct row {
    std::string what, unit;
    timing locus, baseline;
    double amount; //!< GB for throughputs (value = amount / seconds); 0 for plain seconds
    std::string target;
  };
  std::vector<row> rows;

  // 1. ESFT import.
  locus::trace::trace jsonl_source; // for 2.
  if (no_esft.empty()) {
    locus::trace::trace& t = jsonl_source;
    std::uintmax_t bytes = 0;
    for (const auto& e : fs::recursive_directory_iterator(esft))
      if (e.is_regular_file() && e.path().extension() == ".txt") bytes += e.file_size();
    (void)locus::trace::import_esft(esft); // warm the page cache
    const timing locus_s = best_of(3, [&] { t = locus::trace::import_esft(esft); });
    std::size_t pairs = 0;
    const timing base_s = best_of(1, [&] { pairs = baseline_esft(esft); });
    if (pairs != t.tokens() * t.top_k() * t.layers())
      throw std::runtime_error("baseline ESFT parser read " + std::to_string(pairs) + " pairs, locus " +
                               std::to_string(t.tokens() * t.top_k() * t.layers()));
    std::fprintf(stderr, "ESFT: %.1f MB, %zu requests, %zu tokens: locus %.3f s, baseline %.3f s (wall)\n",
                 static_cast<double>(bytes) / 1e6, t.requests(), t.tokens(), locus_s.wall, base_s.wall);
    rows.push_back(
        {"ESFT import (3 domains, " + std::to_string(bytes / 1000000) + " MB)", "s", locus_s, base_s, 0.0, "< 2 s"});
  } else {
    std::printf("trace_io: ESFT import skipped: %s\n", no_esft.c_str());
  }

  // 2. Route JSONL import.
  {
    if (jsonl_source.tokens() == 0) jsonl_source = synthetic(8192, 8);
    const std::string jpath =
        (fs::path(tmp_dir) / ("locus_trace_io_" + std::to_string(::getpid()) + ".jsonl")).string();
    struct remover {
      std::string p;
      ~remover() {
        std::error_code ec;
        fs::remove(p, ec);
      }
    } cleanup{jpath};
    remove_on_signal(2, jpath);
    const std::size_t records = write_jsonl(jsonl_source, jpath);
    const double jgb = static_cast<double>(fs::file_size(jpath)) / 1e9;
    locus::trace::trace imported;
    (void)locus::trace::import_jsonl(jpath); // page cache warm
    const timing locus_s = best_of(2, [&] { imported = locus::trace::import_jsonl(jpath); });
    if (imported.tokens() != jsonl_source.tokens() || imported.layers() != jsonl_source.layers() ||
        imported.requests() != jsonl_source.requests())
      throw std::runtime_error("JSONL import does not give back the trace it was written from");
    for (std::size_t l = 0; l < imported.layers(); ++l)
      if (!std::equal(imported.layer(l).ids(), imported.layer(l).ids() + imported.tokens() * imported.top_k(),
                      jsonl_source.layer(l).ids()))
        throw std::runtime_error("JSONL import gives other expert ids at layer " + std::to_string(l));
    std::size_t base_records = 0;
    const timing base_s = best_of(1, [&] { base_records = baseline_jsonl(jpath); });
    if (base_records != records)
      throw std::runtime_error("baseline JSONL reader read " + std::to_string(base_records) + " records of " +
                               std::to_string(records));
    std::fprintf(stderr, "JSONL: %.1f MB, %zu records: locus %.3f s, baseline %.3f s (wall)\n", jgb * 1e3, records,
                 locus_s.wall, base_s.wall);
    rows.push_back({"route JSONL import (" + std::to_string(records) + " records, " +
                        std::to_string(static_cast<std::size_t>(jgb * 1e3)) + " MB)",
                    "GB/s", locus_s, base_s, jgb, ""});
  }

  // 3. Binary write + read of a ~gb GB synthetic trace.
  std::fprintf(stderr, "building a synthetic trace: %zu tokens x %zu layers x top-8...\n", tokens, layers);
  const auto t = synthetic(tokens, layers);
  const std::string path = (fs::path(tmp_dir) / ("locus_trace_io_" + std::to_string(::getpid()) + ".bin")).string();
  struct remover {
    std::string p;
    ~remover() {
      std::error_code ec;
      fs::remove(p, ec);
      fs::remove(p + ".baseline", ec);
    }
  } cleanup{path};
  remove_on_signal(0, path);
  remove_on_signal(1, path + ".baseline");
  const timing write_s = best_of(2, [&] { locus::trace::write_trace(t, path); });
  const double size_gb = static_cast<double>(fs::file_size(path)) / 1e9;
  locus::trace::trace back;
  (void)locus::trace::read_trace(path); // page cache warm
  const timing read_s = best_of(3, [&] { back = locus::trace::read_trace(path); });
  if (!(back == t)) throw std::runtime_error("binary read-back differs from the written trace");
  back = locus::trace::trace{};
  std::uint64_t sink = 0;
  const timing base_read_s = best_of(1, [&] { sink += baseline_read(path); });
  // Baseline writer: std::ofstream one value at a time, same layout (no checksum).
  const timing base_write_s = best_of(1, [&] {
    std::ofstream out(path + ".baseline", std::ios::binary);
    const auto check = [&] {
      if (!out) throw locus::io_error(path + ".baseline: the baseline could not write it (disk full?)");
    };
    char header[80] = {};
    out.write(header, 80);
    for (std::size_t l = 0; l < layers; ++l) {
      const auto v = t.layer(l);
      for (std::size_t i = 0; i < v.tokens() * 8; ++i)
        out.write(reinterpret_cast<const char*>(v.ids() + i), 2);
      for (std::size_t i = 0; i < v.tokens() * 8; ++i)
        out.write(reinterpret_cast<const char*>(v.weights() + i), 4);
      check();
    }
    out.close();
    check();
  });
  fs::remove(path + ".baseline");
  std::fprintf(stderr, "binary: %.3f GB; write %.3f s (baseline %.3f s), read %.3f s (baseline %.3f s) wall [%llu]\n",
               size_gb, write_s.wall, base_write_s.wall, read_s.wall, base_read_s.wall,
               static_cast<unsigned long long>(sink % 10));
  rows.push_back({"binary write (" + std::to_string(size_gb).substr(0, 4) + " GB, to page cache)", "GB/s", write_s,
                  base_write_s, size_gb, ""});
  rows.push_back({"binary read (" + std::to_string(size_gb).substr(0, 4) + " GB, from page cache, validated)", "GB/s",
                  read_s, base_read_s, size_gb, ">= 1 GB/s"});

  // Table, JSON, markdown.
  std::string md = "| measurement | unit | locus (wall) | baseline (wall) | locus (CPU) | baseline (CPU) | "
                   "locus / baseline (CPU) | target | met (wall / CPU) |\n"
                   "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |\n";
  for (const auto& r : rows) {
    auto value = [&](double secs) { return r.amount > 0 ? r.amount / secs : secs; };
    const double speedup = r.baseline.cpu / r.locus.cpu; // time ratio: > 1 means locus is faster
    auto met = [&](double secs) {
      if (r.target == "< 2 s") return secs < 2.0;
      if (r.target == ">= 1 GB/s") return r.amount / secs >= 1.0;
      return true;
    };
    char line[768];
    std::snprintf(
        line, sizeof line, "| %s | %s | %.3f | %.3f | %.3f | %.3f | %.1fx faster | %s | %s |\n", r.what.c_str(),
        r.unit.c_str(), value(r.locus.wall), value(r.baseline.wall), value(r.locus.cpu), value(r.baseline.cpu), speedup,
        r.target.empty() ? "-" : r.target.c_str(),
        r.target.empty()
            ? "-"
            : (std::string(met(r.locus.wall) ? "yes" : "NO") + " / " + (met(r.locus.cpu) ? "yes" : "NO")).c_str());
    md += line;
    doc["rows"].push_back({{"what", r.what},
                           {"unit", r.unit},
                           {"locus_wall", value(r.locus.wall)},
                           {"baseline_wall", value(r.baseline.wall)},
                           {"locus_cpu", value(r.locus.cpu)},
                           {"baseline_cpu", value(r.baseline.cpu)},
                           {"speedup_cpu", speedup},
                           {"target", r.target},
                           {"met_wall", met(r.locus.wall)},
                           {"met_cpu", met(r.locus.cpu)}});
  }
  doc["command"] = run.command;
  doc["machine"] = run.machine;
  doc["binary_gb"] = size_gb;
  doc["synthetic_tokens"] = tokens;
  doc["synthetic_layers"] = layers;
  // The 1-minute load average and core count, so that a reader can judge the wall-clock figures.
  std::string load = "unknown";
  if (std::ifstream la("/proc/loadavg"); la) la >> load;
  doc["load_average_1min"] = load;
  doc["cores"] = ::sysconf(_SC_NPROCESSORS_ONLN);
  bench_output::files files; // the two together or neither
  files[folder.file("trace_io.json")] << doc.dump(1) << '\n';
  files[folder.file("trace_io.md")]
      << "# Trace I/O throughput\n\nProduced by `" << run.command << "` on " << run.machine
      << " (Release, one core). The machine is shared and oversubscribed, so both the wall clock and the CPU time "
         "(user + system of "
         "the "
         "process) are given; each locus figure is the best of 2-3 runs, each baseline one run. Baselines, "
         "measured in the same run: ESFT — a `std::ifstream` + `getline` + `operator>>` parser; route JSONL (written "
         "from the imported ESFT trace, one record per token and layer) — `getline` + a full nlohmann-json DOM parse "
         "per line pulling the fields out, without the request assembly and checks locus does; binary — the same file "
         "written and read through `std::fstream` one value at a time per column, with no checksum or validation. "
         "The locus reader validates every id and weight and verifies the checksum while it reads. The binary "
         "figures are for a synthetic trace of "
      << tokens << " tokens x " << layers << " layers x top-8 (" << size_gb
      << " GB), read from the page cache right after it was written; the temporary file is removed. Load average "
         "at the end of the run: "
      << load << " on " << ::sysconf(_SC_NPROCESSORS_ONLN)
      << " cores (with more runnable processes than cores the wall clock measures waiting for a core; the CPU "
         "columns measure the work).\n\n"
      << md;
  std::printf("\n%s", md.c_str());
  files.commit();
  std::printf("\nwrote %s/trace_io.{json,md}\n", out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "trace_io: %s\n", tool_cli::error_text(e).c_str());
  return 1;
}
