// The router's CUDA kernels (router/detail/kernels/router_kernels.cuh), compiled by the host compiler
// and run on the CPU under a warp emulator (tests/support/warp_emulator.hpp), against the host path
// (detail/per_token.hpp): expert ids exactly, weights bit for bit (within 1e-6 relative where the
// softmax denominator is summed over all experts in double, in a different order). The host path is
// itself tested against a double-precision brute-force reference (test_router.cpp). So a CPU-only
// build catches errors in the kernels' lane arithmetic, shuffles and tie-breaks; the GPU test
// (tests/cuda/test_router_kernels.cu) remains what checks the device compiler's code.
//
// Every CUDA thread is a std::thread, so the cost is threads and warp barriers: a few tokens per
// shape, chosen so that every launch has a full block and a partial one (and, for top-1, a partial
// last warp).
#define BOOST_TEST_MODULE router_kernels_host
#include "../support/router_inputs.hpp"
#include "../support/warp_emulator.hpp"

#include <algorithm>
#include <bit>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// The kernels as nvcc compiles them for sm_90 (the architecture the project builds): their own
// includes are read first, without __CUDA_ARCH__, so that the shared host/device headers keep their
// host branches (LOCUS_IS_DEVICE_PASS() is 0: the rounded float operations are the plain operators,
// whose bits are __fadd_rn's and the others'); then the kernel header alone is read as the sm_90
// pass reads it, taking its __CUDA_ARCH__ >= 800 branches (__reduce_min_sync / __reduce_max_sync,
// which the emulator provides) instead of the shuffle butterflies older GPUs run.
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/router/detail/per_token.hpp>
#define __CUDA_ARCH__ 900
#include <locus/router/detail/kernels/router_kernels.cuh>
#undef __CUDA_ARCH__
static_assert(!LOCUS_IS_DEVICE_PASS(), "the shared headers must be read as the host pass reads them");

namespace {

namespace we = locus_test::warp_emulator;
namespace kr = locus::detail::router;
using locus::bfloat16;
using locus::expert_id;

// --- inputs -------------------------------------------------------------------------------------

enum class logits_kind {
  random, //!< normal(0, 2), with a token holding +inf and NaN and one holding -inf
  tied,   //!< five values, -0 and +0 among them: the lowest-id rule decides most choices
};

const char* name_of(logits_kind kind) { return kind == logits_kind::random ? "random" : "tied"; }

//! Rows of NaN after the last token: a kernel that reads past its tokens flags one more.
constexpr std::size_t guard_rows = 16;

template <class T>
std::vector<T> make_logits(std::size_t tokens, std::size_t experts, unsigned seed, logits_kind kind) {
  auto v = kind == logits_kind::tied ? locus_test::tied_logits<T>(tokens * experts, seed)
                                     : locus_test::random_logits<T>(tokens * experts, seed);
  if (kind == logits_kind::random) {
    // Token 1 (a warp's second token for top-1): the lowest bad expert (3) and another one held by a
    // different lane; the last token (in the partial block): -inf.
    v[1 * experts + experts - 1] = T(std::numeric_limits<float>::quiet_NaN());
    v[1 * experts + 3] = T(std::numeric_limits<float>::infinity());
    v[(tokens - 1) * experts + experts / 2] = T(-std::numeric_limits<float>::infinity());
  }
  v.resize((tokens + guard_rows) * experts, T(std::numeric_limits<float>::quiet_NaN()));
  return v;
}

unsigned blocks_for(std::size_t threads, unsigned block) {
  return static_cast<unsigned>((threads + block - 1) / block);
}

// --- comparison ---------------------------------------------------------------------------------

//! The kernels' status words (device_status points at them).
struct status_words {
  unsigned long long count = 0, first = ~0ull;
  kr::device_status view() { return {&count, &first}; }
};

//! One launch's outputs beside the host's, with what the host says about each token. The kernel's
//! ids and weights are followed by a guard of untouched entries.
struct outputs {
  static constexpr expert_id unset_id = 7777;
  static constexpr float unset_weight = 7777.0f;
  static constexpr std::size_t guard = 64;

  std::size_t tokens, k;
  std::vector<expert_id> ids, host_ids;
  std::vector<float> weights, host_weights;
  std::vector<int> bad; //!< per token: -1, or the first non-finite expert (host)
  status_words status;

  outputs(std::size_t t, std::size_t kk)
      : tokens(t), k(kk), ids(t * kk + guard, unset_id), host_ids(t * kk), weights(t * kk + guard, unset_weight),
        host_weights(t * kk), bad(t) {}
};

//! Token by token: a flagged token has ids -1 and weights +0, any other the host's ids and weights
//! (bits, or within `tolerance` relative); the status counts the flagged tokens and keeps the first.
void check(const std::string& what, const outputs& o, float tolerance = 0.0f) {
  BOOST_TEST_CONTEXT(what) {
    unsigned long long flagged = 0, first = ~0ull;
    int reported = 0;
    for (std::size_t t = 0; t < o.tokens; ++t) {
      if (o.bad[t] >= 0) {
        ++flagged;
        first = std::min(first, (static_cast<unsigned long long>(t) << kr::status_expert_bits) |
                                    static_cast<unsigned long long>(o.bad[t]));
      }
      for (std::size_t j = 0; j < o.k; ++j) {
        const std::size_t i = t * o.k + j;
        const expert_id want_id = o.bad[t] >= 0 ? -1 : o.host_ids[i];
        const float want = o.bad[t] >= 0 ? 0.0f : o.host_weights[i];
        const bool weight_ok = tolerance == 0.0f || o.bad[t] >= 0
                                   ? std::bit_cast<std::uint32_t>(o.weights[i]) == std::bit_cast<std::uint32_t>(want)
                                   : std::fabs(o.weights[i] - want) <= tolerance * std::fabs(want);
        if ((o.ids[i] != want_id || !weight_ok) && reported++ < 8)
          BOOST_ERROR("token " << t << " choice " << j << ": kernel (" << o.ids[i] << ", " << std::hexfloat
                               << o.weights[i] << "), host (" << want_id << ", " << want << ")" << std::defaultfloat);
      }
    }
    BOOST_TEST(reported == 0);
    const auto past_ids =
        std::count(o.ids.begin() + static_cast<std::ptrdiff_t>(o.tokens * o.k), o.ids.end(), outputs::unset_id);
    const auto past_weights = std::count(o.weights.begin() + static_cast<std::ptrdiff_t>(o.tokens * o.k),
                                         o.weights.end(), outputs::unset_weight);
    BOOST_TEST(past_ids == static_cast<std::ptrdiff_t>(outputs::guard), "ids written past the last token");
    BOOST_TEST(past_weights == static_cast<std::ptrdiff_t>(outputs::guard), "weights written past the last token");
    BOOST_TEST(o.status.count == flagged);
    BOOST_TEST(o.status.first == first);
  }
}

// Every warp kernel must have reduced with __reduce_*_sync, as the sm_90 code does.
void check_device_path(const std::string& what, const we::launch_counts& counts) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST(counts.reductions > 0u, "no __reduce_*_sync ran: the kernels took a path sm_90 does not");
  }
}

// --- the warp kernels ---------------------------------------------------------------------------

template <int E, int G, int TG, int K, class T = float>
void grouped_case(std::size_t tokens, unsigned round, logits_kind kind, bool with_bias, bool normalize = true) {
  constexpr int V = kr::vector_width<E, T>();
  const unsigned seed = round * 1000u + static_cast<unsigned>(E * 131 + G * 17 + K) + static_cast<unsigned>(kind);
  const auto logits = make_logits<T>(tokens, E, seed, kind);
  const auto bias_values = locus_test::random_bias(E, seed + 1, 0.3f);
  const float* bias = with_bias ? bias_values.data() : nullptr;
  const float scale = 2.5f;
  outputs o(tokens, K);
  const auto counts = we::launch(blocks_for(tokens * kr::warp_size, kr::warp_kernel_block), kr::warp_kernel_block, [&] {
    kr::sigmoid_grouped_warp_kernel<E, G, TG, K, T, V>(logits.data(), tokens, bias, scale, normalize, o.ids.data(),
                                                       o.weights.data(), o.status.view());
  });
  const kr::sigmoid_grouped_params<locus::groups<G>, locus::top_groups<TG>, locus::top_k<K>> p(
      locus::groups<G>{}, locus::top_groups<TG>{}, locus::top_k<K>{}, bias, scale, normalize);
  std::vector<float> fscratch(kr::grouped_scratch_floats(E, G));
  std::vector<int> iscratch(G);
  for (std::size_t t = 0; t < tokens; ++t)
    o.bad[t] = kr::sigmoid_grouped_token(p, locus::experts<E>{}, logits.data() + t * E, o.host_ids.data() + t * K,
                                         o.host_weights.data() + t * K, fscratch.data(), iscratch.data());
  const std::string what = "sigmoid_grouped E" + std::to_string(E) + " G" + std::to_string(G) + " TG" +
                           std::to_string(TG) + " K" + std::to_string(K) + (sizeof(T) == 2 ? " bf16" : "") +
                           (with_bias ? " bias" : "") + (normalize ? "" : " unnormalised") + ", " + name_of(kind) +
                           " logits, " + std::to_string(tokens) + " tokens";
  check(what, o);
  check_device_path(what, counts);
}

template <int E, int K, class T = float>
void softmax_case(std::size_t tokens, unsigned round, logits_kind kind, bool renormalize) {
  constexpr int V = kr::vector_width<E, T>();
  const unsigned seed = round * 1000u + static_cast<unsigned>(E * 7 + K) + static_cast<unsigned>(kind);
  const auto logits = make_logits<T>(tokens, E, seed, kind);
  outputs o(tokens, K);
  const auto counts = we::launch(blocks_for(tokens * kr::warp_size, kr::warp_kernel_block), kr::warp_kernel_block, [&] {
    kr::softmax_topk_warp_kernel<E, K, T, V>(logits.data(), tokens, renormalize, o.ids.data(), o.weights.data(),
                                             o.status.view());
  });
  const kr::softmax_topk_params<locus::top_k<K>> p(locus::top_k<K>{}, renormalize);
  for (std::size_t t = 0; t < tokens; ++t)
    o.bad[t] = kr::softmax_topk_token(p, locus::experts<E>{}, logits.data() + t * E, o.host_ids.data() + t * K,
                                      o.host_weights.data() + t * K);
  const std::string what = "softmax_topk E" + std::to_string(E) + " K" + std::to_string(K) +
                           (sizeof(T) == 2 ? " bf16" : "") + (renormalize ? "" : " not renormalised") + ", " +
                           name_of(kind) + " logits, " + std::to_string(tokens) + " tokens";
  // Without renormalisation the denominator is a double sum over every expert in the warp's order.
  check(what, o, renormalize ? 0.0f : 1e-6f);
  check_device_path(what, counts);
}

template <int E, class T = float>
void top1_case(std::size_t warps, unsigned round, logits_kind kind) {
  constexpr int V = kr::vector_width<E, T>(), P = kr::top1_tokens_per_warp<E>();
  // The last warp short of P tokens where P > 1.
  const std::size_t tokens = warps * P - P / 2;
  const unsigned seed = round * 1000u + static_cast<unsigned>(E) + static_cast<unsigned>(kind);
  const auto logits = make_logits<T>(tokens, E, seed, kind);
  outputs o(tokens, 1);
  const auto counts = we::launch(blocks_for(warps * kr::warp_size, kr::warp_kernel_block), kr::warp_kernel_block, [&] {
    kr::sigmoid_top1_warp_kernel<E, T, V>(logits.data(), tokens, o.ids.data(), o.weights.data(), o.status.view());
  });
  for (std::size_t t = 0; t < tokens; ++t)
    o.bad[t] = kr::sigmoid_top1_token(locus::experts<E>{}, logits.data() + t * E, o.host_ids.data() + t,
                                      o.host_weights.data() + t);
  const std::string what = "sigmoid_top1 E" + std::to_string(E) + (sizeof(T) == 2 ? " bf16" : "") + " (" +
                           std::to_string(P) + " tokens per warp), " + name_of(kind) + " logits, " +
                           std::to_string(tokens) + " tokens";
  check(what, o);
  check_device_path(what, counts);
}

// Each shape runs twice per kind of logits, with other logits: over a full block of four warps and a
// block with two of its warps idle, then over two full blocks and a block with one warp working.
struct round_shape {
  unsigned round;
  std::size_t warps;
};
constexpr round_shape rounds[] = {{1, 6}, {2, 9}};
constexpr logits_kind kinds[] = {logits_kind::random, logits_kind::tied};

} // namespace

// --- the emulator itself ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(emulator_collectives_do_what_cuda_defines) {
  constexpr unsigned threads = 64, blocks = 2, lanes = blocks * threads;
  std::vector<int> from_next(lanes), from_xor(lanes), low(lanes);
  std::vector<unsigned> ballot(lanes), high(lanes);
  std::vector<float> through_shared(lanes);
  unsigned long long sum = 0, smallest = ~0ull;
  const auto counts = we::launch(blocks, threads, [&] {
    __shared__ float row[64];
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    const int v = static_cast<int>(g) * 3 - 50;
    from_next[g] = __shfl_sync(0xffffffffu, v, static_cast<int>(lane) + 1); // lane 31 reads lane 0
    from_xor[g] = __shfl_xor_sync(0xffffffffu, v, 5);
    ballot[g] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    low[g] = __reduce_min_sync(0xffffffffu, v);
    high[g] = __reduce_max_sync(0xffffffffu, g ^ 7u);
    row[threadIdx.x] = static_cast<float>(g);
    __syncwarp();
    through_shared[g] = row[threadIdx.x ^ 31u];
    atomicAdd(&sum, static_cast<unsigned long long>(g));
    atomicMin(&smallest, static_cast<unsigned long long>(g) + 10u);
  });
  unsigned long long want_sum = 0;
  for (unsigned g = 0; g < lanes; ++g) {
    const unsigned base = g - g % 32, lane = g % 32;
    const auto value = [](unsigned x) { return static_cast<int>(x) * 3 - 50; };
    BOOST_TEST(from_next[g] == value(base + (lane + 1) % 32));
    BOOST_TEST(from_xor[g] == value(base + (lane ^ 5u)));
    BOOST_TEST(ballot[g] == 0x49249249u);
    BOOST_TEST(low[g] == value(base));
    unsigned want_high = 0;
    for (unsigned l = 0; l < 32; ++l)
      want_high = std::max(want_high, (base + l) ^ 7u);
    BOOST_TEST(high[g] == want_high);
    BOOST_TEST(through_shared[g] == static_cast<float>(base + (lane ^ 31u)));
    want_sum += g;
  }
  BOOST_TEST(sum == want_sum);
  BOOST_TEST(smallest == 10u);
  BOOST_TEST(counts.shuffles == 2u * lanes / 32);
  BOOST_TEST(counts.ballots == lanes / 32);
  BOOST_TEST(counts.reductions == 2u * lanes / 32);
  BOOST_TEST(counts.syncwarps == lanes / 32);
}

namespace {
bool names(const std::logic_error& e, const std::string& what) {
  BOOST_TEST_MESSAGE(e.what());
  return std::string(e.what()).find(what) != std::string::npos;
}
} // namespace

BOOST_AUTO_TEST_CASE(emulator_refuses_what_cuda_leaves_undefined) {
  // Half the warp returns, the other half shuffles with a full mask.
  BOOST_CHECK_EXCEPTION(we::launch(1, 32,
                                   [] {
                                     if (threadIdx.x < 16) return;
                                     (void)__shfl_sync(0xffffffffu, 1, 0);
                                   }),
                        std::logic_error, [](const auto& e) { return names(e, "reached by 16 of 32 lanes"); });
  // A warp diverged into two different collectives.
  BOOST_CHECK_EXCEPTION(we::launch(1, 64,
                                   [] {
                                     if (threadIdx.x % 32 < 4)
                                       (void)__ballot_sync(0xffffffffu, 1);
                                     else
                                       (void)__shfl_xor_sync(0xffffffffu, 1, 1);
                                   }),
                        std::logic_error, [](const auto& e) { return names(e, "divergent warp"); });
  // The same collective in different loop trips: lane 0 runs one more trip than the others.
  BOOST_CHECK_EXCEPTION(we::launch(1, 32,
                                   [] {
                                     int v = 0;
                                     for (unsigned i = 0; i < (threadIdx.x == 0 ? 3u : 2u); ++i)
                                       v += __shfl_sync(0xffffffffu, v, 1);
                                   }),
                        std::logic_error, [](const auto& e) { return names(e, "reached by 1 of 32 lanes"); });
  // Partial masks are not modelled.
  BOOST_CHECK_EXCEPTION(we::launch(1, 32, [] { (void)__ballot_sync(0x0000ffffu, 1); }), std::logic_error,
                        [](const auto& e) { return names(e, "only full-mask"); });
  // An exception in a lane is rethrown; its warp's other lanes are released.
  BOOST_CHECK_THROW(we::launch(2, 32,
                               [] {
                                 if (threadIdx.x == 7) throw std::runtime_error("lane 7");
                                 __syncwarp();
                               }),
                    std::runtime_error);
  BOOST_CHECK_THROW(we::launch(1, 48, [] {}), std::invalid_argument);
}

// --- the kernels --------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(sigmoid_grouped_warp_kernel_matches_host) {
  for (const auto [r, n] : rounds)
    for (const auto kind : kinds) {
      grouped_case<256, 8, 4, 8>(n, r, kind, true); // DeepSeek-V3: 8 lanes per group, 4 values per load
      grouped_case<256, 8, 4, 8>(n, r, kind, false);
      grouped_case<256, 8, 4, 8, bfloat16>(n, r, kind, true); // 8 values per load
      grouped_case<64, 8, 3, 5>(n, r, kind, true);            // 4 lanes per group, 2 values per load
      grouped_case<96, 3, 2, 33>(n, r, kind, true);           // k > 32, 3 groups of 32 lanes
      grouped_case<192, 6, 5, 37>(n, r, kind, true);          // 6 groups, k > 32
      grouped_case<160, 8, 3, 6>(n, r, kind, true);           // 20 lanes per group: shared memory
      grouped_case<192, 4, 2, 8>(n, r, kind, true);           // 24 lanes per group: shared, 2 per load
      grouped_case<128, 32, 7, 9>(n, r, kind, true);          // 32 groups of one lane
      grouped_case<32, 16, 5, 3>(n, r, kind, true);           // one value per lane
      grouped_case<384, 12, 5, 40>(n, r, kind, true);         // 12 values per lane, k > 32
    }
  grouped_case<256, 8, 4, 8>(6, 3, logits_kind::random, true, false);
}

BOOST_AUTO_TEST_CASE(softmax_topk_warp_kernel_matches_host) {
  for (const auto [r, n] : rounds)
    for (const auto kind : kinds) {
      softmax_case<64, 6>(n, r, kind, true);
      softmax_case<64, 6>(n, r, kind, false);
      softmax_case<96, 40>(n, r, kind, true); // k > 32, one value per lane
      softmax_case<128, 32>(n, r, kind, true);
      softmax_case<32, 32>(n, r, kind, true); // k = E
      softmax_case<256, 8, bfloat16>(n, r, kind, true);
    }
}

BOOST_AUTO_TEST_CASE(sigmoid_top1_warp_kernel_matches_host) {
  for (const auto [r, n] : rounds)
    for (const auto kind : kinds) {
      top1_case<32>(n, r, kind);  // 16 tokens per warp
      top1_case<96>(n, r, kind);  // 5
      top1_case<128>(n, r, kind); // 4
      top1_case<256, bfloat16>(n, r, kind);
      top1_case<512>(n, r, kind); // 1
    }
}

// The fallback kernel (any shape, dynamic extents) runs the per-token functions one thread each; what
// it adds is the indexing and the flagging, checked here over two blocks, the second partial.
BOOST_AUTO_TEST_CASE(thread_per_token_kernel_matches_host) {
  const std::size_t tokens = 130, n = 100; // not a multiple of the warp size
  const locus::experts<> experts(n);
  const auto logits = make_logits<float>(tokens, n, 5, logits_kind::random);
  const unsigned blocks = blocks_for(tokens, 128);
  {
    const kr::softmax_topk_params<locus::top_k<>> p(locus::top_k<>(7), true);
    outputs o(tokens, 7);
    const kr::softmax_thread_fn<locus::top_k<>, locus::experts<>, float> fn{p, experts, logits.data(), o.ids.data(),
                                                                            o.weights.data()};
    we::launch(blocks, 128, [&] { kr::thread_per_token_kernel(tokens, fn, o.status.view()); });
    for (std::size_t t = 0; t < tokens; ++t)
      o.bad[t] = kr::softmax_topk_token(p, experts, logits.data() + t * n, o.host_ids.data() + t * 7,
                                        o.host_weights.data() + t * 7);
    check("softmax_topk, thread per token", o);
  }
  {
    using params = kr::sigmoid_grouped_params<locus::groups<>, locus::top_groups<>, locus::top_k<>>;
    const auto bias = locus_test::random_bias(n, 6, 0.3f);
    const params p(locus::groups<>(5), locus::top_groups<>(2), locus::top_k<>(6), bias.data(), 2.5f, true);
    outputs o(tokens, 6);
    std::vector<float> fscratch(tokens * kr::grouped_scratch_floats(n, 5));
    std::vector<int> iscratch(tokens * 5);
    const kr::grouped_thread_fn<locus::groups<>, locus::top_groups<>, locus::top_k<>, locus::experts<>, float> fn{
        p, experts, logits.data(), o.ids.data(), o.weights.data(), fscratch.data(), iscratch.data()};
    we::launch(blocks, 128, [&] { kr::thread_per_token_kernel(tokens, fn, o.status.view()); });
    for (std::size_t t = 0; t < tokens; ++t)
      o.bad[t] = kr::sigmoid_grouped_token(p, experts, logits.data() + t * n, o.host_ids.data() + t * 6,
                                           o.host_weights.data() + t * 6, fscratch.data(), iscratch.data());
    check("sigmoid_grouped, thread per token", o);
  }
  {
    outputs o(tokens, 1);
    const kr::top1_thread_fn<locus::experts<>, float> fn{experts, logits.data(), o.ids.data(), o.weights.data()};
    we::launch(blocks, 128, [&] { kr::thread_per_token_kernel(tokens, fn, o.status.view()); });
    for (std::size_t t = 0; t < tokens; ++t)
      o.bad[t] =
          kr::sigmoid_top1_token(experts, logits.data() + t * n, o.host_ids.data() + t, o.host_weights.data() + t);
    check("sigmoid_top1, thread per token", o);
  }
}
