// The hostile-input suite: generated malformed inputs (binary traces with crafted headers and
// random bit flips resealed with fresh checksums, route JSONL, ESFT folders, expert maps) run
// through the readers, the planners and the simulator. The contract for every one of them:
// a clear locus::error or a valid result; never a crash, an abort, a foreign exception or an
// allocation the input did not pay for. Each group runs in a forked child whose address space is
// capped at 1 GiB (RLIMIT_AS), so an allocation sized by a corrupt count fails there as
// bad_alloc, which counts as a failure like a crash does. Also here: the atomic file writer.
#define BOOST_TEST_MODULE hostile_inputs
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <locus/core/atomic_file.hpp>
#include <locus/core/expert_map_json.hpp>
#include <locus/cost/decode_simulator.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/load_import.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/token_refine.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/jsonl.hpp>
#include <locus/transport/local.hpp>
#include <numeric>
#include <random>
#include <string>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace locus;
namespace fs = std::filesystem;

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool address_sanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool address_sanitizer = true;
#else
constexpr bool address_sanitizer = false;
#endif
#else
constexpr bool address_sanitizer = false;
#endif

constexpr rlim_t memory_cap = rlim_t{1} << 30;

//! Runs `body` in a child process capped at 1 GiB of address space (not under ASan, whose shadow
//! memory needs terabytes of it). The child exits 0 when the body returns; any locus::error the
//! body lets out is a failure too, since bodies catch the ones they expect. Returns a description
//! of what went wrong, empty when nothing did.
std::string run_capped(const std::function<void()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    if (!address_sanitizer) {
      rlimit lim{memory_cap, memory_cap};
      ::setrlimit(RLIMIT_AS, &lim);
    }
    ::alarm(120); // a hang ends as SIGALRM, not as a stuck test run
    int code = 0;
    try {
      body();
    } catch (const std::bad_alloc&) {
      code = 3;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "escaped: %s\n", e.what());
      code = 4;
    } catch (...) {
      code = 5;
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  if (!WIFEXITED(status)) return "ended abnormally";
  switch (WEXITSTATUS(status)) {
  case 0: return {};
  case 3: return "std::bad_alloc: an allocation over the 1 GiB cap";
  case 4: return "an exception escaped (see stderr)";
  default: return "exit status " + std::to_string(WEXITSTATUS(status));
  }
}

//! Counts what a case ended in; anything other than success or a locus::error is recorded.
struct outcome_counter {
  std::size_t ok = 0, refused = 0;
  std::vector<std::string> wrong;
  template <class F>
  void run(const std::string& what, F&& f) {
    if (std::getenv("LOCUS_HOSTILE_VERBOSE")) std::fprintf(stderr, "case: %s\n", what.c_str());
    try {
      f();
      ++ok;
    } catch (const error& e) {
      ++refused;
      // A clear error: non-empty, one line of text, naming something.
      if (e.message().empty()) wrong.push_back(what + ": empty message");
    } catch (const std::bad_alloc&) {
      throw; // the cap was hit: the whole group fails
    } catch (const std::exception& e) {
      wrong.push_back(what + ": foreign exception: " + e.what());
    }
  }
  void require_clean() const {
    if (std::getenv("LOCUS_HOSTILE_VERBOSE")) std::fprintf(stderr, "valid %zu, refused %zu\n", ok, refused);
    for (const auto& w : wrong)
      std::fprintf(stderr, "%s\n", w.c_str());
    if (!wrong.empty()) std::_Exit(6);
  }
};

//! A small valid trace: distinct ids per token, phases unknown.
trace::trace small_trace(std::uint32_t seed, std::size_t requests = 24, std::size_t experts = 16, std::size_t k = 2,
                         std::size_t layers = 2) {
  std::mt19937 rng(seed);
  trace::trace_builder b(experts, k, layers);
  b.set_domains({"code", "math"});
  for (std::size_t r = 0; r < requests; ++r)
    b.add_request(r, static_cast<std::uint32_t>(r % 2), 6 + rng() % 10);
  std::vector<trace::trace_expert_id> pool(experts);
  for (std::size_t t = 0; t < b.tokens(); ++t)
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t e = 0; e < experts; ++e)
        pool[e] = static_cast<trace::trace_expert_id>(e);
      for (std::size_t j = 0; j < k; ++j) {
        std::swap(pool[j], pool[j + rng() % (experts - j)]);
        b.ids(l, t)[j] = pool[j];
        b.weights(l, t)[j] = 0.1f + static_cast<float>(rng() % 100) / 100.0f;
      }
    }
  return b.build();
}

//! What the driver does with a trace: plan every kind of placement on a small topology and
//! simulate decode with the plan. Only locus errors may come out.
void plan_and_simulate(const trace::trace& raw) {
  // A valid trace with tens of thousands of experts (a crafted header can make one) is legitimate
  // but slow to plan; the suite reads it and stops there.
  if (raw.experts() > 1024) return;
  const auto t = raw.with_prefill_tokens(3);
  const dynamic_topology topo(2, 2);
  for (const char* placement : {"linear", "eplb", "locality"}) {
    placement::activation_plan_options opt;
    opt.grouping.clusters = 2;
    const auto plan = placement::plan_activation_aware(t, topo, placement, 1, opt);
    auto g = grouper::grouper_by_name("workload_aware", plan.model);
    cost::simulation_config cfg;
    cfg.topology = topo;
    cfg.batch_per_rank = 4;
    cfg.max_steps = 50;
    (void)cost::simulate_decode(t, plan.maps, g, cfg);
  }
}

void reseal(std::vector<std::byte>& b) {
  auto put = [&](std::size_t at, std::uint64_t v) { std::memcpy(b.data() + at, &v, 8); };
  put(56, trace::checksum64::of(b.data() + 80, b.size() - 80));
  put(72, trace::checksum64::of(b.data(), 72));
}

struct scratch {
  fs::path path;
  explicit scratch(const std::string& tag) {
    path = fs::temp_directory_path() / ("locus_hostile_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_text(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << s;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

} // namespace

// ==========================================================================================
// Binary traces
// ==========================================================================================

BOOST_AUTO_TEST_CASE(binary_crafted_headers) {
  const auto err = run_capped([] {
    outcome_counter c;
    const auto good = trace::encode_trace(small_trace(1));
    const std::vector<std::uint64_t> values = {0,
                                               1,
                                               2,
                                               7,
                                               255,
                                               65535,
                                               65536,
                                               65537,
                                               1u << 31,
                                               0xffffffffull,
                                               1ull << 32,
                                               1ull << 40,
                                               1ull << 62,
                                               ~0ull >> 1,
                                               ~0ull,
                                               good.size(),
                                               good.size() - 80,
                                               100000000};
    struct field {
      std::size_t at, bytes;
    };
    for (const field f : {field{16, 4}, field{20, 4}, field{24, 4}, field{28, 4}, field{32, 8}, field{40, 8},
                          field{48, 8}, field{64, 8}})
      for (const auto v : values) {
        auto b = good;
        std::memcpy(b.data() + f.at, &v, f.bytes);
        reseal(b);
        c.run("field " + std::to_string(f.at) + " = " + std::to_string(v),
              [&] { plan_and_simulate(trace::decode_trace(b, "crafted")); });
      }
    // Headers over an empty payload: with no token every layer count matched the payload size.
    trace::trace_builder eb(4, 2, 1);
    const auto empty = trace::encode_trace(eb.build());
    for (const auto layers : {std::uint64_t{0xffffffffu}, std::uint64_t{100000000}, std::uint64_t{65536}}) {
      auto b = empty;
      std::memcpy(b.data() + 24, &layers, 4);
      reseal(b);
      c.run("empty trace, layers " + std::to_string(layers), [&] { (void)trace::decode_trace(b); });
    }
    // 2^24 empty domain names: the payload pays 4 bytes each, the table would cost 32+ each.
    {
      std::vector<std::byte> b(80 + 4 * (std::size_t{1} << 24));
      std::copy_n(empty.begin(), 80, b.begin());
      const std::uint32_t d = 1u << 24;
      const std::uint64_t payload = b.size() - 80;
      std::memcpy(b.data() + 28, &d, 4);
      std::memcpy(b.data() + 48, &payload, 8);
      reseal(b);
      c.run("16M empty domain names", [&] { (void)trace::decode_trace(b); });
    }
    c.require_clean();
    BOOST_TEST(c.refused > 100u); // every crafted header is refused or (rarely) harmless
  });
  BOOST_TEST(err.empty(), err);
}

BOOST_AUTO_TEST_CASE(binary_random_bit_flips_resealed) {
  const auto err = run_capped([] {
    outcome_counter c;
    std::mt19937_64 rng(7);
    const auto good = trace::encode_trace(small_trace(2, 12));
    for (int i = 0; i < 600; ++i) {
      auto b = good;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        // Mostly the payload (the header checks are covered above), where resealing lets the
        // reader's value checks, not the checksum, decide.
        const std::size_t at = (rng() % 8 == 0) ? rng() % 72 : 80 + rng() % (b.size() - 80);
        b[at] ^= static_cast<std::byte>(1u << (rng() % 8));
      }
      if (rng() % 10 == 0) b.resize(80 + rng() % (b.size() - 80)); // and truncation
      if (b.size() >= 80) reseal(b);
      c.run("flip case " + std::to_string(i), [&] { plan_and_simulate(trace::decode_trace(b, "flipped")); });
    }
    c.require_clean();
    BOOST_TEST(c.refused > 300u);
    BOOST_TEST(c.ok + c.refused == 600u);
  });
  BOOST_TEST(err.empty(), err);
}

// ==========================================================================================
// Route JSONL
// ==========================================================================================

BOOST_AUTO_TEST_CASE(jsonl_mutations) {
  const auto err = run_capped([] {
    outcome_counter c;
    std::mt19937_64 rng(11);
    std::string good = "{\"type\": \"meta\", \"num_experts\": 16, \"top_k\": 2}\n";
    for (int r = 0; r < 6; ++r)
      for (int tok = 0; tok < 8; ++tok)
        for (int l = 0; l < 2; ++l)
          good += "{\"req_id\": " + std::to_string(r) + ", \"token_idx\": " + std::to_string(tok) +
                  ", \"layer\": " + std::to_string(l) + ", \"topk_ids\": [" + std::to_string((r + tok) % 16) + ", " +
                  std::to_string((r + tok + 1 + l) % 16) + "], \"topk_weights\": [0.6, 0.4], \"domain\": \"" +
                  (r % 2 ? "code" : "math") + "\"}\n";
    const std::vector<std::string> junk = {"1e400",
                                           "-1",
                                           "18446744073709551616",
                                           "1e30",
                                           "null",
                                           "[",
                                           "]",
                                           "{",
                                           "}",
                                           "\"",
                                           ",",
                                           "NaN",
                                           "Infinity",
                                           "0.5",
                                           "[1, 1]",
                                           "\"x\"",
                                           "[[1]]",
                                           "true",
                                           "{\"type\": \"meta\", \"num_experts\": 8}",
                                           "\\u0000",
                                           "65536",
                                           "-0",
                                           std::string(5000, '['),
                                           "[" + std::string(3000, '1') + "]"};
    for (int i = 0; i < 500; ++i) {
      std::string s = good;
      const int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits; ++e) {
        const std::size_t at = rng() % s.size();
        switch (rng() % 3) {
        case 0: s.insert(at, junk[rng() % junk.size()]); break;
        case 1: s.erase(at, 1 + rng() % 8); break;
        default: s[at] = static_cast<char>(rng() % 256); break;
        }
      }
      trace::jsonl_options o;
      o.skip_bad = rng() % 2 == 0;
      o.max_line_bytes = 4096;
      c.run("jsonl case " + std::to_string(i), [&] { plan_and_simulate(trace::import_jsonl_text(s, "mutated", o)); });
    }
    // A 64 MB line is refused before it is buffered or parsed.
    trace::jsonl_options o;
    const std::string huge = "{\"type\": \"stats\", \"blob\": [" + std::string(64u << 20, '1') + "]}\n" + good;
    c.run("64 MB line", [&] { (void)trace::import_jsonl_text(huge, "huge", o); });
    c.require_clean();
    BOOST_TEST(c.refused > 100u);
  });
  BOOST_TEST(err.empty(), err);
}

// ==========================================================================================
// ESFT folders
// ==========================================================================================

BOOST_AUTO_TEST_CASE(esft_text_mutations) {
  const auto err = run_capped([] {
    outcome_counter c;
    std::mt19937_64 rng(13);
    std::string text;
    for (int line = 0; line < 10; ++line) {
      std::string ids, w;
      for (int tok = 0; tok < 5; ++tok)
        for (int j = 0; j < 2; ++j) {
          ids += std::to_string((line + tok + 3 * j) % 16) + "\t";
          w += "\t0." + std::to_string(1 + (tok + j) % 9);
        }
      text += ids + w + "\n";
    }
    const std::vector<std::string> junk = {"99999999999", "1e99", "1e-99", "nan", "-1",  "\t",   "\n",
                                           "\t\t",        "x",    "65535", "0.5", "inf", "\r\n", "4294967296"};
    for (int i = 0; i < 400; ++i) {
      std::string a = text, b = text;
      for (std::string* s : {&a, &b}) {
        if (rng() % 2) continue;
        const std::size_t at = rng() % s->size();
        if (rng() % 2)
          s->insert(at, junk[rng() % junk.size()]);
        else
          s->erase(at, 1 + rng() % 4);
      }
      std::vector<trace::esft_domain_text> doms(2);
      doms[0].name = "x";
      doms[0].layers = {{"x/1", a}, {"x/2", b}};
      doms[1].name = rng() % 8 == 0 ? "x" : "y";
      doms[1].layers = {{"y/1", b}, {"y/2", a}};
      c.run("esft case " + std::to_string(i),
            [&] { plan_and_simulate(trace::import_esft(doms, 16, rng() % 4 == 0 ? 1 : 2)); });
    }
    c.require_clean();
    BOOST_TEST(c.refused > 100u);
  });
  BOOST_TEST(err.empty(), err);
}

BOOST_AUTO_TEST_CASE(esft_folder_layouts) {
  scratch dir("esft");
  const auto root = dir.path.string();
  trace::write_esft(small_trace(3, 20, 16, 2, 3), root);
  const auto err = run_capped([&] {
    outcome_counter c;
    auto import = [&](const std::string& what, const trace::esft_options& o = {}) {
      c.run(what, [&] { (void)trace::import_esft(root, o); });
    };
    trace::esft_options o;
    o.experts = 16;
    o.top_k = 2;
    import("valid", o);
    BOOST_TEST(c.ok == 1u);
    // Symbolic-link loops: a domain folder and a layer file that point at themselves.
    fs::create_symlink(dir.path / "loop", dir.path / "loop");
    fs::create_symlink(dir.path / "code" / "expert_weights_9.txt", dir.path / "code" / "expert_weights_9.txt");
    import("symlink loops", o);
    o.domains = {"loop"};
    import("a looping domain", o);
    o.domains = {"code", "code"};
    import("a domain twice", o);
    o.domains = {"../" + dir.path.filename().string()};
    import("a domain outside the root", o);
    o.domains = {};
    o.layers = 100000;
    import("more layers than files", o);
    fs::remove(dir.path / "code" / "expert_weights_9.txt");
    fs::remove(dir.path / "math" / "expert_weights_2.txt");
    fs::create_directories(dir.path / "math" / "expert_weights_2.txt");
    o.layers = 0;
    import("a layer file that is a folder", o);
    c.require_clean();
    BOOST_TEST(c.refused == 6u);
  });
  BOOST_TEST(err.empty(), err);
}

// ==========================================================================================
// Expert maps
// ==========================================================================================

BOOST_AUTO_TEST_CASE(map_document_mutations) {
  scratch dir("maps");
  const auto err = run_capped([&] {
    outcome_counter c;
    std::mt19937_64 rng(17);
    const auto doc =
        expert_maps_to_json({expert_map(4, 2, 3, {0, 1, -1, 2, 3, 0}), expert_map(4, 2, 3, {3, 2, 1, 0, -1, -1})});
    const std::vector<nlohmann::json> values = {5,
                                                "1",
                                                nullptr,
                                                -1,
                                                0,
                                                1.5,
                                                std::uint64_t{1} << 31,
                                                std::uint64_t{1} << 32,
                                                std::uint64_t{1} << 40,
                                                ~std::uint64_t{0},
                                                nlohmann::json::array(),
                                                nlohmann::json::object(),
                                                nlohmann::json::array({1, 2}),
                                                true};
    const std::vector<std::string> keys = {"format", "version", "experts", "ranks", "slots_per_rank", "layers"};
    for (int i = 0; i < 400; ++i) {
      auto d = doc;
      const auto& v = values[rng() % values.size()];
      switch (rng() % 3) {
      case 0: d[keys[rng() % keys.size()]] = v; break;
      case 1: d["layers"][rng() % 2][rng() % 2][rng() % 3] = v; break;
      default: d["layers"][rng() % 2][rng() % 2] = v; break;
      }
      if (rng() % 5 == 0) d.erase(keys[rng() % keys.size()]);
      c.run("map case " + std::to_string(i), [&] { (void)expert_maps_from_json(d); });
      // Through a file too, sometimes cut short.
      std::string text = d.dump();
      if (rng() % 3 == 0) text.resize(rng() % text.size());
      const auto p = dir.path / "map.json";
      write_text(p, text);
      c.run("map file " + std::to_string(i), [&] { (void)load_expert_maps(p.string()); });
    }
    fs::create_symlink(dir.path / "self.json", dir.path / "self.json");
    c.run("map symlink loop", [&] { (void)load_expert_maps((dir.path / "self.json").string()); });
    c.run("map path is a folder", [&] { (void)load_expert_maps(dir.path.string()); });
    c.require_clean();
    BOOST_TEST(c.refused > 300u);
  });
  BOOST_TEST(err.empty(), err);
}

// ==========================================================================================
// Atomic writes: nothing lost
// ==========================================================================================

namespace {
std::size_t temporaries_in(const fs::path& dir) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    n += e.path().filename().string().find(".locus-tmp.") != std::string::npos;
  return n;
}
} // namespace

BOOST_AUTO_TEST_CASE(a_failed_write_keeps_the_old_file) {
  scratch dir("atomic");
  const auto path = (dir.path / "trace.bin").string();
  const auto good = small_trace(5);
  trace::write_trace(good, path);
  const std::string before = read_text(path);
  // A write abandoned half-way (an exception between its first bytes and the commit, as a value
  // the writer rejects): the old file stays whole and no temporary is left.
  {
    {
      locus::atomic_file f(path);
      f.write("partial", 7);
    }
    BOOST_TEST(read_text(path) == before);
    BOOST_TEST(temporaries_in(dir.path) == 0u);
  }
  // A file the writer may not write, in a folder it may (as open() would refuse it, though a
  // rename would not): io_error, the file as it was. As root, the child writes as nobody.
  {
    const auto locked = (dir.path / "locked.bin").string();
    locus::write_file_atomically(locked, "kept");
    fs::permissions(locked, fs::perms::owner_read | fs::perms::group_read | fs::perms::others_read);
    fs::permissions(dir.path, fs::perms::all);
    const auto err = run_capped([&] {
      if (::geteuid() == 0 && ::setuid(65534) != 0) std::_Exit(9);
      try {
        locus::write_file_atomically(locked, "replaced");
        std::_Exit(7);
      } catch (const io_error& e) {
        if (e.code() != EACCES) std::_Exit(8);
      }
    });
    BOOST_TEST(err.empty(), err);
    BOOST_TEST(read_text(locked) == "kept");
    BOOST_TEST(temporaries_in(dir.path) == 0u);
    fs::remove(locked);
  }
  // A file-size limit hit in the middle of the write (as a full disk would be): io_error with
  // EFBIG, the old file intact, no temporary left.
  {
    const auto err = run_capped([&] {
      std::signal(SIGXFSZ, SIG_IGN);
      rlimit lim{4096, 4096};
      ::setrlimit(RLIMIT_FSIZE, &lim);
      try {
        trace::write_trace(small_trace(6, 400), path);
        std::_Exit(7); // must not succeed under the limit
      } catch (const io_error& e) {
        if (e.code() != EFBIG) std::_Exit(8);
      }
    });
    BOOST_TEST(err.empty(), err);
    BOOST_TEST(read_text(path) == before);
    BOOST_TEST(temporaries_in(dir.path) == 0u);
    BOOST_TEST((trace::read_trace(path) == good));
  }
  // Killed in the middle of writing (SIGKILL): the old file is intact, and no temporary is left
  // where the folder takes unnamed files (O_TMPFILE); the named fallback leaves exactly one.
  const auto killed_while_writing = [&] {
    const pid_t pid = ::fork();
    if (pid == 0) {
      locus::atomic_file f(path);
      f.write("partial", 7);
      ::raise(SIGKILL);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    BOOST_TEST(WIFSIGNALED(status));
    BOOST_TEST(read_text(path) == before);
  };
  const int probe = ::open(dir.path.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
  const bool unnamed_files = probe >= 0;
  if (probe >= 0) ::close(probe);
  killed_while_writing();
  BOOST_TEST(temporaries_in(dir.path) == (unnamed_files ? 0u : 1u));
  locus::detail::atomic_file_named_temporary = true;
  killed_while_writing();
  BOOST_TEST(temporaries_in(dir.path) == (unnamed_files ? 1u : 2u));
  // The named path writes and replaces like the unnamed one.
  trace::write_trace(small_trace(7), path);
  BOOST_TEST((trace::read_trace(path) == small_trace(7)));
  trace::write_trace(good, path);
  locus::detail::atomic_file_named_temporary = false;
  // Clear what the kills left for the checks below.
  for (const auto& e : fs::directory_iterator(dir.path))
    if (e.path().filename().string().find(".locus-tmp.") != std::string::npos) fs::remove(e.path());
  // Maps and ESFT folders go through the same writer.
  const auto map_path = (dir.path / "map.json").string();
  save_expert_maps(map_path, {expert_map(2, 2, 1, {0, 1})});
  const std::string map_before = read_text(map_path);
  BOOST_CHECK_THROW(save_expert_maps(map_path, {}), config_error);
  BOOST_TEST(read_text(map_path) == map_before);
  // Writing through a symbolic link replaces the file it names and keeps the link.
  fs::create_symlink("trace.bin", dir.path / "link.bin");
  trace::write_trace(small_trace(8), (dir.path / "link.bin").string());
  BOOST_TEST(fs::is_symlink(dir.path / "link.bin"));
  BOOST_TEST((trace::read_trace(path) == small_trace(8)));
  // An existing file keeps its permissions.
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  trace::write_trace(good, path);
  BOOST_TEST(
      (fs::status(path).permissions() == (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read)));
  // A short file is named as truncated.
  fs::resize_file(path, fs::file_size(path) - 10);
  try {
    (void)trace::read_trace(path);
    BOOST_FAIL("a truncated trace was read");
  } catch (const format_error& e) {
    BOOST_TEST(e.message().find("truncated") != std::string::npos, e.message());
  }
  BOOST_TEST(temporaries_in(dir.path) == 0u);
}

// Several outputs of one command: each is prepared (written out, synced, named) before any is
// committed, so a failure while writing the second leaves the first target as it was; prepare
// and commit in both the unnamed and the named way.
BOOST_AUTO_TEST_CASE(prepared_files_replace_nothing_until_committed) {
  scratch dir("prepare");
  const auto a = (dir.path / "a.txt").string(), b = (dir.path / "b.txt").string();
  locus::write_file_atomically(a, "old a");
  locus::write_file_atomically(b, "old b");
  const int probe = ::open(dir.path.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
  const bool unnamed_files = probe >= 0; // else every file takes the named way
  if (probe >= 0) ::close(probe);
  for (const bool named : {false, true}) {
    locus::detail::atomic_file_named_temporary = named;
    const std::string a0 = read_text(a), b0 = read_text(b);
    {
      locus::atomic_file fa(a);
      fa.write("new a");
      fa.prepare();
      fa.prepare(); // twice is once
      BOOST_CHECK_THROW(fa.write("more"), io_error);
      BOOST_TEST(read_text(a) == a0);
      // The second output fails while being written (a file-size limit): the first, prepared,
      // is abandoned with it.
      const auto err = run_capped([&] {
        std::signal(SIGXFSZ, SIG_IGN);
        rlimit lim{4096, 4096};
        ::setrlimit(RLIMIT_FSIZE, &lim);
        try {
          locus::atomic_file fb(b);
          fb.write(std::string(1 << 21, 'b')); // past the write buffer: written out now
          fb.prepare();
          std::_Exit(7);
        } catch (const io_error& e) {
          if (e.code() != EFBIG) std::_Exit(8);
        }
      });
      BOOST_TEST(err.empty(), err);
    } // fa destroyed uncommitted
    BOOST_TEST(read_text(a) == a0);
    BOOST_TEST(read_text(b) == b0);
    BOOST_TEST(temporaries_in(dir.path) == 0u);
    {
      locus::atomic_file fa(a), fb(b);
      fa.write(named ? "a2" : "a1");
      fb.write(named ? "b2" : "b1");
      fa.prepare();
      fb.prepare();
      BOOST_TEST(read_text(a) == a0);
      BOOST_TEST(temporaries_in(dir.path) == (named || !unnamed_files ? 2u : 0u)); // unnamed until committed
      fa.commit();
      fb.commit();
      BOOST_CHECK_THROW(fb.commit(), io_error); // committed once
    }
    BOOST_TEST(read_text(a) == (named ? "a2" : "a1"));
    BOOST_TEST(read_text(b) == (named ? "b2" : "b1"));
    BOOST_TEST(temporaries_in(dir.path) == 0u);
  }
  locus::detail::atomic_file_named_temporary = false;
}

// Targets a rename could not replace are refused before anything is written, and names near the
// folder's limit still get a temporary (its name, 20 bytes longer, is cut short).
BOOST_AUTO_TEST_CASE(targets_no_rename_could_replace_are_refused_up_front) {
  scratch dir("replaceable");
  for (const bool named : {false, true}) {
    locus::detail::atomic_file_named_temporary = named;
    // 250 bytes: the target's name fits (255), ".<name>.locus-tmp.<pid>.<n>" would not.
    const auto long_name = (dir.path / std::string(250, 'c')).string();
    locus::write_file_atomically(long_name, "old");
    locus::write_file_atomically(long_name, named ? "named" : "unnamed");
    BOOST_TEST(read_text(long_name) == (named ? "named" : "unnamed"));
    BOOST_TEST(temporaries_in(dir.path) == 0u);
    fs::remove(long_name);
  }
  locus::detail::atomic_file_named_temporary = false;
  // A name longer than the folder takes: refused when opened, not after the work.
  try {
    locus::atomic_file f((dir.path / std::string(300, 'n')).string());
    BOOST_FAIL("opened a name of 300 bytes");
  } catch (const io_error& e) {
    BOOST_TEST(e.code() == ENAMETOOLONG);
  }
  // Another user's file in a sticky folder (/tmp's rule): the folder takes new files, but no rename
  // over that one. As root, the child writes as nobody; the file keeps its content.
  if (::geteuid() == 0) {
    const auto sticky = dir.path / "sticky";
    fs::create_directory(sticky);
    fs::permissions(dir.path, fs::perms::all);
    fs::permissions(sticky, fs::perms::all | fs::perms::sticky_bit);
    const auto theirs = (sticky / "theirs.json").string();
    locus::write_file_atomically(theirs, "root's");
    fs::permissions(theirs, fs::perms::all); // writable by anyone: open() alone would take it
    const auto err = run_capped([&] {
      if (::setuid(65534) != 0) std::_Exit(9);
      try {
        locus::atomic_file f(theirs);
        std::_Exit(7);
      } catch (const io_error& e) {
        if (e.code() != EPERM || e.message().find("sticky bit") == std::string::npos) std::_Exit(8);
      }
    });
    BOOST_TEST(err.empty(), err);
    BOOST_TEST(read_text(theirs) == "root's");
    BOOST_TEST(temporaries_in(sticky) == 0u);
    // A replaced file keeps its owner and group (root may give them), not the writer's.
    const auto owned = (dir.path / "owned.json").string();
    locus::write_file_atomically(owned, "old");
    BOOST_TEST(::chown(owned.c_str(), 65534, 65534) == 0);
    locus::write_file_atomically(owned, "new");
    struct stat st {};
    BOOST_TEST(::stat(owned.c_str(), &st) == 0);
    BOOST_TEST(st.st_uid == 65534u);
    BOOST_TEST(st.st_gid == 65534u);
    BOOST_TEST(read_text(owned) == "new");
  }
}

// A folder where a file is read: an io_error saying so. The stream readers threw the standard
// library's ios_base::failure ("basic_filebuf::underflow") or took the folder's size for the file's.
BOOST_AUTO_TEST_CASE(readers_refuse_directories) {
  scratch dir("read_dirs");
  auto expect_dir = [](const std::function<void()>& read) {
    try {
      read();
      BOOST_FAIL("read a directory");
    } catch (const io_error& e) {
      BOOST_TEST(e.message().find("cannot read: it is a directory") != std::string::npos, e.message());
    }
  };
  const std::string d = dir.path.string();
  expect_dir([&] { (void)load_expert_plan(d); });
  expect_dir([&] { (void)grouper::load_grouping(d); });
  fs::create_directories(dir.path / "stats" / "meta_info.json");
  expect_dir([&] { (void)placement::import_load((dir.path / "stats").string()); });
}

BOOST_AUTO_TEST_CASE(non_regular_targets) {
  scratch dir("targets");
  // A character device is written directly (the bytes vanish into /dev/null, nothing crashes).
  BOOST_CHECK_NO_THROW(trace::write_trace(small_trace(9), "/dev/null"));
  BOOST_CHECK_NO_THROW(save_expert_maps("/dev/null", {expert_map(2, 2, 1, {0, 1})}));
  // A folder, a missing folder, an empty name, a symlink loop: io_error with the reason.
  auto expect_io = [](const std::string& p, const std::string& needle) {
    try {
      locus::write_file_atomically(p, "x");
      BOOST_FAIL("wrote " << p);
    } catch (const io_error& e) {
      BOOST_TEST(e.message().find(needle) != std::string::npos, e.message());
    }
  };
  expect_io(dir.path.string(), "it is a directory");
  expect_io((dir.path / "no" / "such" / "file").string(), "its folder does not exist");
  expect_io("", "empty name");
  fs::create_symlink(dir.path / "loop", dir.path / "loop");
  expect_io((dir.path / "loop").string(), "symbolic links loop");
  // A FIFO cannot take the binary header written last: the trace is encoded first and arrives whole.
  const auto fifo = dir.path / "fifo";
  BOOST_REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const pid_t reader = ::fork();
  if (reader == 0) {
    std::ifstream f(fifo, std::ios::binary);
    const std::string got((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const auto want = trace::encode_trace(small_trace(9));
    ::_exit(got.size() == want.size() && std::memcmp(got.data(), want.data(), want.size()) == 0 ? 0 : 1);
  }
  BOOST_CHECK_NO_THROW(trace::write_trace(small_trace(9), fifo.string()));
  int status = 0;
  ::waitpid(reader, &status, 0);
  BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0), "the FIFO's reader got another trace");
  {
    // ... and nothing can be written back into one.
    std::thread drain([&] { std::ifstream f(fifo, std::ios::binary); });
    locus::atomic_file f(fifo.string());
    BOOST_TEST(f.direct());
    f.write("abc");
    try {
      f.write_at(0, "x", 1);
      BOOST_FAIL("wrote back into a FIFO");
    } catch (const io_error& e) {
      BOOST_TEST(e.message().find("cannot write back") != std::string::npos, e.message());
    }
    drain.join();
  }
  // A path that names an open descriptor (/dev/fd/N, as /dev/stdout names 1) is written through the
  // descriptor: the file it holds keeps its inode and what it held (an append stays one), where a
  // rename would have replaced the file a shell redirected the descriptor to.
  const auto log = dir.path / "log.txt";
  std::ofstream(log) << "earlier\n";
  const int fd = ::open(log.c_str(), O_WRONLY | O_APPEND);
  BOOST_REQUIRE(fd >= 0);
  struct stat before {};
  BOOST_REQUIRE(::stat(log.c_str(), &before) == 0);
  BOOST_TEST(locus::open_stream_fd("/dev/fd/" + std::to_string(fd)) == fd);
  BOOST_TEST(locus::open_stream_fd("/proc/self/fd/" + std::to_string(fd)) == fd);
  // ... however it is spelled, and through a link of the caller's own (not through the
  // descriptor's own link, which leads to the log file itself).
  BOOST_TEST(locus::open_stream_fd("//dev/./fd/" + std::to_string(fd)) == fd);
  BOOST_TEST(locus::open_stream_fd("/proc/" + std::to_string(::getpid()) + "/fd/" + std::to_string(fd)) == fd);
  fs::create_symlink("/dev/fd/" + std::to_string(fd), dir.path / "to_fd");
  fs::create_symlink(dir.path / "to_fd", dir.path / "to_link");
  BOOST_TEST(locus::open_stream_fd((dir.path / "to_fd").string()) == fd);
  BOOST_TEST(locus::open_stream_fd((dir.path / "to_link").string()) == fd);
  BOOST_TEST(locus::open_stream_fd(log.string()) == -1); // the file itself: replaced by a rename
  BOOST_CHECK_NO_THROW(locus::write_file_atomically("/dev/fd/" + std::to_string(fd), "later\n"));
  ::close(fd);
  // A closed descriptor, or a name that only looks like one, is an ordinary path.
  BOOST_TEST(locus::open_stream_fd("/dev/fd/" + std::to_string(fd)) == -1);
  struct stat after {};
  BOOST_REQUIRE(::stat(log.c_str(), &after) == 0);
  BOOST_TEST(before.st_ino == after.st_ino);
  std::ifstream in(log);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  BOOST_TEST(text == "earlier\nlater\n");
  BOOST_TEST(locus::open_stream_fd("/dev/fd/1x") == -1);
  BOOST_TEST(locus::open_stream_fd("/dev/fd/") == -1);
  BOOST_TEST(locus::open_stream_fd("/dev/fd/99999999999999999999") == -1);
  BOOST_TEST(temporaries_in(dir.path) == 0u);
}

// ==========================================================================================
// Sizes a caller gives: refused before anything is sized from them
// ==========================================================================================

BOOST_AUTO_TEST_CASE(absurd_sizes_are_config_errors) {
  const auto err = run_capped([] {
    auto expect_config = [](const char* what, auto&& f, const std::string& needle) {
      try {
        f();
        std::fprintf(stderr, "%s: accepted\n", what);
        std::_Exit(9);
      } catch (const config_error& e) {
        if (e.message().find(needle) == std::string::npos) {
          std::fprintf(stderr, "%s: %s lacks %s\n", what, e.message().c_str(), needle.c_str());
          std::_Exit(10);
        }
      }
    };
    // 10^9 nodes, and 2^63 × 4 ranks, which wraps 64 bits to 0.
    expect_config(
        "nodes 1e9", [] { (void)dynamic_topology(1000000000, 1); }, "exceed 65536 ranks");
    expect_config(
        "wrapping ranks", [] { (void)dynamic_topology(std::size_t{1} << 63, 4); }, "exceed 65536 ranks");
    expect_config(
        "nodes 2^64-1", [] { (void)dynamic_topology(~std::size_t{0}, 1); }, "reserved for locus::dynamic");
    expect_config(
        "redundant 1e12", [] { (void)placement::slots_for(64, 8, 1000000000000ull); },
        "redundant slots per rank is 1000000000000");
    expect_config(
        "redundant 2^64-1", [] { (void)placement::slots_for(64, 8, ~std::size_t{0}); },
        "expected at most 56 (a GPU holds each of the 64 experts at most once");
    // An in-process fabric's world board is ranks² headers and offsets: 65536 ranks, the topology's
    // ceiling, was a std::bad_alloc after trying to allocate 340 GB.
    expect_config(
        "fabric 65536 ranks", [] { (void)transport::local_fabric(dynamic_topology(65536, 1), transport_kind::flat); },
        "local_fabric: 65536 nodes × 1 GPUs per node = 65536 ranks exceed the limit of 2048 ranks in one process (its "
        "exchange tables grow as ranks², about 343.6 GB here)");
    expect_config(
        "fabric 2049 ranks",
        [] { (void)transport::local_fabric(dynamic_topology(2049, 1), transport_kind::hierarchical); },
        "2049 ranks exceed the limit of 2048 ranks in one process (its exchange tables grow as ranks², about 0.3 GB "
        "here)");
    // The token state packs each copy's rank and node in 16 bits each, the all-ones word meaning
    // none: every entry point that builds it refuses 65,535 ranks (replan_by_tokens and
    // sample_copy_cost built it unchecked, after a ranks² replica table of about 17 GB).
    {
      const dynamic_topology topo(1, 65535);
      std::vector<expert_id> slots(topo.ranks());
      std::iota(slots.begin(), slots.end(), expert_id{0});
      const std::vector<expert_map> maps{expert_map(topo.ranks(), topo.ranks(), 1, slots)};
      placement::token_sample sample;
      sample.experts = topo.ranks();
      sample.top_k = 2;
      sample.home = {0, 0};
      sample.ids = {{0, 65534, 65534, 1}};
      expect_config(
          "replan 65535 ranks", [&] { (void)placement::replan_by_tokens(maps, sample, topo, {}, 10, 1); },
          "token refinement: 65535 ranks (at most 65,534)");
      expect_config(
          "copy cost 65535 ranks", [&] { (void)placement::sample_copy_cost(maps, sample, topo, {}); },
          "token refinement: 65535 ranks (at most 65,534)");
      expect_config(
          "refine 65535 ranks", [&] { (void)placement::refine_layer_by_tokens(maps[0], sample, 0, topo, {}); },
          "token refinement: 65535 ranks (at most 65,534)");
    }
    BOOST_CHECK_NO_THROW((void)placement::slots_for(64, 8, 56));
    expect_config(
        "redundant 57", [] { (void)placement::slots_for(64, 8, 57); }, "expected at most 56");
    const auto t = small_trace(21).with_prefill_tokens(3);
    expect_config(
        "per-node tables",
        [&] {
          (void)placement::plan_activation_aware(small_trace(21, 24, 1024, 2, 64), dynamic_topology(65536, 1), "linear",
                                                 0);
        },
        "exceed the planner's limit");
    const auto plan = placement::plan_activation_aware(t, dynamic_topology(2, 2), "linear", 0);
    auto g = grouper::grouper_by_name("round_robin", plan.model);
    for (const double rate : {-1.0, std::nan(""), HUGE_VAL}) {
      cost::simulation_config cfg;
      cfg.topology = dynamic_topology(2, 2);
      cfg.arrival_rate = rate;
      expect_config(
          "arrival rate", [&] { (void)cost::simulate_decode(t, plan.maps, g, cfg); }, "arrival_rate is");
    }
    cost::simulation_config cfg;
    cfg.topology = dynamic_topology(2, 2);
    cfg.sizes = cost::message_sizes{~std::uint64_t{0} / 3, 16};
    expect_config(
        "byte counters", [&] { (void)cost::simulate_decode(t, plan.maps, g, cfg); },
        "would overflow the byte counters");
    placement::token_refine_options o;
    o.anneal_per_expert = ~std::size_t{0};
    placement::token_sample s;
    s.experts = 16;
    s.top_k = 2;
    s.home = {0};
    s.ids = {{0, 1}};
    expect_config(
        "anneal", [&] { (void)placement::refine_layer_by_tokens(plan.maps[0], s, 0, dynamic_topology(2, 2), o); },
        "anneal_per_expert is");
  });
  BOOST_TEST(err.empty(), err);
}
