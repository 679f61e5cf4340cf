#pragma once
//! @file
//! CUDA kernels of the routers.
//!
//! - Thread per token: one thread runs the shared per-token function (detail/per_token.hpp) on
//!   its row. Any expert count and k, static or dynamic; the fallback and the small-E path.
//! - Warp per token: the row is spread over a warp's registers (E / 32 values per lane, read with
//!   16-byte vector loads), and the top-k is k rounds of a warp-wide arg-max under
//!   detail::router::better (a total order, so the result equals the host's sequential scan): a
//!   reduction of order-preserving unsigned keys, then one of the experts holding the best key. The
//!   selection is instruction-bound, so the per-choice arithmetic (exp, weights) runs one choice
//!   per lane, and the top-1 router routes several tokens per warp so that its lanes share the
//!   sigmoids. E, k (and the groups) are template parameters.
//!
//! Every kernel flags a token with a non-finite logit: it counts it in `status.count`, keeps the
//! smallest (token << 20 | expert) in `status.first`, and writes ids -1 and weights 0 for it.

#include <climits>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/config.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/router/detail/per_token.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router {

//! Where kernels report non-finite logits (device memory, two counters).
struct device_status {
  unsigned long long* count = nullptr; //!< tokens flagged
  unsigned long long* first = nullptr; //!< min over flagged (token << 20 | expert); ~0 when none
};

//! Bits of `first` that hold the expert (experts < 2^20).
inline constexpr unsigned status_expert_bits = 20;

LOCUS_DEVICE void flag_token(const device_status& st, std::size_t token, int expert) {
  atomicAdd(st.count, 1ull);
  atomicMin(st.first,
            (static_cast<unsigned long long>(token) << status_expert_bits) | static_cast<unsigned long long>(expert));
}

LOCUS_DEVICE void write_flagged(expert_id* ids, float* weights, std::size_t k, unsigned lane, unsigned stride) {
  for (std::size_t j = lane; j < k; j += stride) {
    ids[j] = -1;
    weights[j] = 0.0f;
  }
}

// --- thread per token ---------------------------------------------------------------------------

//! Runs `fn(t)` (returns -1 or the first non-finite expert) for every token, one thread each.
template <class Fn>
__global__ void thread_per_token_kernel(std::size_t tokens, Fn fn, device_status st) {
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int bad = fn(t);
  if (bad >= 0) {
    flag_token(st, t, bad);
    fn.flagged(t);
  }
}

template <class TopK, class Experts, class T>
struct softmax_thread_fn {
  softmax_topk_params<TopK> p;
  Experts experts;
  const T* logits;
  expert_id* ids;
  float* weights;
  LOCUS_DEVICE int operator()(std::size_t t) const {
    const std::size_t k = p.k();
    return softmax_topk_token(p, experts, logits + t * experts.value(), ids + t * k, weights + t * k);
  }
  LOCUS_DEVICE void flagged(std::size_t t) const { write_flagged(ids + t * p.k(), weights + t * p.k(), p.k(), 0, 1); }
};

template <class Groups, class TopGroups, class TopK, class Experts, class T>
struct grouped_thread_fn {
  sigmoid_grouped_params<Groups, TopGroups, TopK> p;
  Experts experts;
  const T* logits;
  expert_id* ids;
  float* weights;
  float* fscratch; //!< tokens × grouped_scratch_floats
  int* iscratch;   //!< tokens × groups
  LOCUS_DEVICE int operator()(std::size_t t) const {
    const std::size_t k = p.k(), n = experts.value();
    return sigmoid_grouped_token(p, experts, logits + t * n, ids + t * k, weights + t * k,
                                 fscratch + t * grouped_scratch_floats(n, p.groups()), iscratch + t * p.groups());
  }
  LOCUS_DEVICE void flagged(std::size_t t) const { write_flagged(ids + t * p.k(), weights + t * p.k(), p.k(), 0, 1); }
};

template <class Experts, class T>
struct top1_thread_fn {
  Experts experts;
  const T* logits;
  expert_id* ids;
  float* weights;
  LOCUS_DEVICE int operator()(std::size_t t) const {
    return sigmoid_top1_token(experts, logits + t * experts.value(), ids + t, weights + t);
  }
  LOCUS_DEVICE void flagged(std::size_t t) const { write_flagged(ids + t, weights + t, 1, 0, 1); }
};

// --- warp per token: building blocks ------------------------------------------------------------

inline constexpr unsigned full_mask = 0xffffffffu;
inline constexpr int warp_size = 32;

//! Values per vector load: as many as fit 16 bytes and divide the values per lane.
template <int E, class T>
constexpr int vector_width() {
  int v = static_cast<int>(16 / sizeof(T));
  while (v > 1 && (E / warp_size) % v != 0)
    v /= 2;
  return v;
}

//! True when a warp-per-token kernel exists for E (a multiple of the warp size).
constexpr bool warp_kernel_supports(std::size_t experts) { return experts >= 32 && experts % 32 == 0; }

template <class T, int V>
struct alignas(sizeof(T) * V) vector_pack {
  T v[V];
};

//! Expert held by a lane's i-th value: lane l holds, for chunk c, the V consecutive experts
//! starting at (c * 32 + l) * V, so a warp's chunk is one contiguous, coalesced 32 * V run.
template <int V>
LOCUS_DEVICE int expert_of(int i, int lane) {
  return ((i / V) * warp_size + lane) * V + i % V;
}

template <int E, class T, int V>
LOCUS_DEVICE void load_row(const T* row, int lane, float (&x)[E / warp_size]) {
  constexpr int per_lane = E / warp_size;
  LOCUS_UNROLL
  for (int c = 0; c < per_lane / V; ++c) {
    const auto pack = *reinterpret_cast<const vector_pack<T, V>*>(row + (c * warp_size + lane) * V);
    LOCUS_UNROLL
    for (int v = 0; v < V; ++v)
      x[c * V + v] = load_logit(&pack.v[v]);
  }
}

LOCUS_DEVICE int warp_min(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(full_mask, v);
#else
  LOCUS_UNROLL
  for (int offset = warp_size / 2; offset > 0; offset /= 2)
    v = min(v, __shfl_xor_sync(full_mask, v, offset));
  return v;
#endif
}

LOCUS_DEVICE unsigned warp_max(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(full_mask, v);
#else
  LOCUS_UNROLL
  for (int offset = warp_size / 2; offset > 0; offset /= 2)
    v = max(v, __shfl_xor_sync(full_mask, v, offset));
  return v;
#endif
}

LOCUS_DEVICE double warp_sum(double v) {
  LOCUS_UNROLL
  for (int offset = warp_size / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(full_mask, v, offset);
  return v;
}

//! Checks a row held in registers; on a non-finite value flags the token (lowest expert) and
//! returns true, all lanes alike.
template <int N, int V>
LOCUS_DEVICE bool warp_flag_non_finite(const float (&x)[N], int lane, std::size_t token, const device_status& st,
                                       expert_id* ids, float* weights, std::size_t k) {
  int bad = INT_MAX;
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i)
    if (!is_finite(x[i])) bad = min(bad, expert_of<V>(i, lane));
  if (__ballot_sync(full_mask, bad != INT_MAX) == 0) return false;
  bad = warp_min(bad);
  if (lane == 0) flag_token(st, token, bad);
  write_flagged(ids, weights, k, static_cast<unsigned>(lane), warp_size);
  return true;
}

//! The warp's best candidate under `better` (the highest key, the lowest expert on equal keys):
//! two warp reductions (max of the lanes' best keys, then min of the experts holding it) instead of
//! a shuffle butterfly carrying (value, id) pairs. Returns the expert; `best` gets its key.
template <int N, int V>
LOCUS_DEVICE int warp_arg_best(const unsigned (&key)[N], int lane, unsigned& best) {
  unsigned local = 0;
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i)
    local = max(local, key[i]);
  best = warp_max(local);
  int mine = INT_MAX; // a lane's experts rise with i: the first match is its lowest
  LOCUS_UNROLL
  for (int i = N - 1; i >= 0; --i)
    if (key[i] == best) mine = expert_of<V>(i, lane);
  return warp_min(mine);
}

//! Lane holding expert `e`.
template <int V>
LOCUS_DEVICE int lane_of(int e) {
  return (e / V) % warp_size;
}

//! k rounds of warp_arg_best over `key` (each winner's key becomes 0). Choice j's expert and
//! payload (the winner's entry of `pay`) go to lane j % 32, slot j / 32, so that the weights are
//! computed one choice per lane; `payload_sum` adds the payloads in choice order, as the host does
//! (every lane alike).
template <int N, int V, int K>
struct warp_choices {
  static constexpr int slots = (K + warp_size - 1) / warp_size;
  int expert[slots];
  float payload[slots];
  float first_payload = 0.0f; //!< choice 0's payload, every lane
  float payload_sum = 0.0f;

  LOCUS_DEVICE warp_choices(unsigned (&key)[N], const float (&pay)[N], int lane) {
    LOCUS_UNROLL
    for (int j = 0; j < K; ++j) {
      unsigned best;
      const int e = warp_arg_best<N, V>(key, lane, best);
      float held = 0.0f;
      LOCUS_UNROLL
      for (int i = 0; i < N; ++i)
        if (expert_of<V>(i, lane) == e) {
          key[i] = 0;
          held = pay[i];
        }
      const float p = __shfl_sync(full_mask, held, lane_of<V>(e));
      if (j == 0) first_payload = p;
      payload_sum = fadd(payload_sum, p);
      if (j % warp_size == lane) {
        expert[j / warp_size] = e;
        payload[j / warp_size] = p;
      }
    }
  }

  //! Writes choice j (ids[j], weight(payload, slot)) from lane j % 32, slot j / 32.
  template <class Weight>
  LOCUS_DEVICE void write(int lane, expert_id* ids, float* weights, Weight&& weight) const {
    LOCUS_UNROLL
    for (int s = 0; s < slots; ++s) {
      const int j = s * warp_size + lane;
      if (j < K) {
        ids[j] = expert[s];
        weights[j] = weight(payload[s], s);
      }
    }
  }
};

// --- warp per token: the routers ----------------------------------------------------------------

inline constexpr int warp_kernel_block = 128; //!< 4 warps per block

LOCUS_DEVICE std::size_t warp_index() {
  return (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / warp_size;
}

template <int E, int K, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    softmax_topk_warp_kernel(const T* logits, std::size_t tokens, bool renormalize, expert_id* ids, float* weights,
                             device_status st) {
  constexpr int N = E / warp_size;
  const std::size_t t = warp_index();
  if (t >= tokens) return; // uniform per warp
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  ids += t * K;
  weights += t * K;
  float x[N];
  load_row<E, T, V>(logits + t * E, lane, x);
  if (warp_flag_non_finite<N, V>(x, lane, t, st, ids, weights, K)) return;

  unsigned key[N];
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i)
    key[i] = order_key(x[i]);
  using choices = warp_choices<N, V, K>;
  const choices top(key, x, lane);
  const float m = top.first_payload; // the largest logit: exp never overflows
  // Choice j's exp in lane j; the sum in choice order, as the host adds it.
  float ex[choices::slots];
  LOCUS_UNROLL
  for (int s = 0; s < choices::slots; ++s)
    ex[s] = s * warp_size + lane < K ? exp(fsub(top.payload[s], m)) : 0.0f;
  float sum = 0.0f;
  if (renormalize) {
    LOCUS_UNROLL
    for (int j = 0; j < K; ++j)
      sum = fadd(sum, __shfl_sync(full_mask, ex[j / warp_size], j % warp_size));
  } else {
    double partial = 0.0;
    LOCUS_UNROLL
    for (int i = 0; i < N; ++i)
      partial += static_cast<double>(exp(fsub(x[i], m)));
    sum = static_cast<float>(warp_sum(partial));
  }
  top.write(lane, ids, weights, [&](float, int slot) { return fdiv(ex[slot], sum); });
}

//! Whether the group scores can be reduced in registers: a lane's vector of V experts lies in one
//! group, and a group's vectors sit in a power-of-two run of lanes within one chunk.
template <int E, int G, int V>
constexpr bool groups_in_registers() {
  constexpr int size = E / G, lanes = size / V;
  return size % V == 0 && lanes <= warp_size && (lanes & (lanes - 1)) == 0;
}

//! Bit g set for each of the TG best groups by score (the sum of a group's two largest b); the
//! scores reduced in registers (groups_in_registers).
template <int E, int G, int TG, int V>
LOCUS_DEVICE unsigned kept_groups_in_registers(const float (&b)[E / warp_size], int lane) {
  constexpr int N = E / warp_size, chunks = N / V, size = E / G, lanes = size / V;
  float score[chunks];
  LOCUS_UNROLL
  for (int c = 0; c < chunks; ++c) {
    // The two largest of the chunk's V values (with multiplicity), then of the group's lanes.
    float m1 = -std::numeric_limits<float>::infinity(), m2 = m1;
    LOCUS_UNROLL
    for (int v = 0; v < V; ++v)
      top2_push(m1, m2, b[c * V + v]);
    LOCUS_UNROLL
    for (int offset = 1; offset < lanes; offset *= 2)
      top2_merge(m1, m2, __shfl_xor_sync(full_mask, m1, offset), __shfl_xor_sync(full_mask, m2, offset));
    score[c] = fadd(m1, m2); // the host's top2_sum: a sum of the same two values
  }
  // Lane g (< G) gathers group g's score and counts the groups that beat it.
  float mine = -std::numeric_limits<float>::infinity();
  float all[G];
  LOCUS_UNROLL
  for (int g = 0; g < G; ++g) {
    const int first = g * size; // the group's first expert: its chunk and lane
    all[g] = __shfl_sync(full_mask, score[first / (warp_size * V)], (first / V) % warp_size);
    if (lane == g) mine = all[g];
  }
  int rank = 0;
  LOCUS_UNROLL
  for (int g = 0; g < G; ++g)
    rank += better(all[g], g, mine, lane) ? 1 : 0;
  return __ballot_sync(full_mask, lane < G && rank < TG);
}

//! The same through shared memory, for group shapes the register reduction does not cover: lane g
//! runs the host's top2_sum over group g.
template <int E, int G, int TG, int V>
LOCUS_DEVICE unsigned kept_groups_in_shared(const float (&b)[E / warp_size], int lane, float* row_scores) {
  constexpr int N = E / warp_size, size = E / G;
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i)
    row_scores[expert_of<V>(i, lane)] = b[i];
  __syncwarp();
  const float score = lane < G ? top2_sum(row_scores + lane * size, size) : -std::numeric_limits<float>::infinity();
  int rank = 0;
  LOCUS_UNROLL
  for (int g = 0; g < G; ++g)
    rank += better(__shfl_sync(full_mask, score, g), g, score, lane) ? 1 : 0;
  return __ballot_sync(full_mask, lane < G && rank < TG);
}

template <int E, int G, int TG, int K, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    sigmoid_grouped_warp_kernel(const T* logits, std::size_t tokens, const float* bias, float scale, bool normalize,
                                expert_id* ids, float* weights, device_status st) {
  static_assert(G <= warp_size, "locus: the warp-per-token grouped router holds one group score per lane");
  constexpr int N = E / warp_size, size = E / G;
  constexpr bool in_registers = groups_in_registers<E, G, V>();
  __shared__ float biased[in_registers ? 1 : warp_kernel_block / warp_size][in_registers ? 1 : E];
  const std::size_t t = warp_index();
  if (t >= tokens) return;
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  ids += t * K;
  weights += t * K;
  float x[N];
  load_row<E, T, V>(logits + t * E, lane, x);
  if (warp_flag_non_finite<N, V>(x, lane, t, st, ids, weights, K)) return;

  float s[N], b[N];
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i) {
    s[i] = sigmoid(x[i]);
    b[i] = bias ? fadd(s[i], __ldg(bias + expert_of<V>(i, lane))) : s[i];
  }
  unsigned kept;
  if constexpr (in_registers)
    kept = kept_groups_in_registers<E, G, TG, V>(b, lane);
  else
    kept = kept_groups_in_shared<E, G, TG, V>(b, lane, biased[threadIdx.x / warp_size]);
  unsigned key[N];
  LOCUS_UNROLL
  for (int i = 0; i < N; ++i)
    key[i] = ((kept >> (expert_of<V>(i, lane) / size)) & 1u) != 0 ? order_key(b[i]) : 0u;

  const warp_choices<N, V, K> top(key, s, lane);
  const float denominator = fadd(top.payload_sum, grouped_denominator_epsilon);
  top.write(lane, ids, weights, [&](float chosen, int) {
    return normalize ? fmul(fdiv(chosen, denominator), scale) : fmul(chosen, scale);
  });
}

//! Tokens a top-1 warp routes: enough that the lanes share the sigmoids, few enough that every
//! row is loaded before the first reduction (N values per token and lane in registers).
template <int E>
constexpr int top1_tokens_per_warp() {
  constexpr int n = E / warp_size;
  return n >= 16 ? 1 : 16 / n;
}

template <int E, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    sigmoid_top1_warp_kernel(const T* logits, std::size_t tokens, expert_id* ids, float* weights, device_status st) {
  constexpr int N = E / warp_size, P = top1_tokens_per_warp<E>();
  const std::size_t first = warp_index() * P;
  if (first >= tokens) return; // uniform per warp
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  const int count = static_cast<int>(tokens - first < P ? tokens - first : P);
  float x[P][N];
  LOCUS_UNROLL
  for (int p = 0; p < P; ++p)
    if (p < count) load_row<E, T, V>(logits + (first + p) * E, lane, x[p]);
  // Token p's choice ends in lane p, which then computes its weight.
  int chosen = -1;
  unsigned chosen_key = 0;
  LOCUS_UNROLL
  for (int p = 0; p < P; ++p) {
    if (p >= count) break;
    if (warp_flag_non_finite<N, V>(x[p], lane, first + p, st, ids + first + p, weights + first + p, 1)) {
      if (lane == p) chosen = -2;
      continue;
    }
    unsigned key[N];
    LOCUS_UNROLL
    for (int i = 0; i < N; ++i)
      key[i] = order_key(x[p][i]);
    unsigned best;
    const int e = warp_arg_best<N, V>(key, lane, best);
    if (lane == p) {
      chosen = e;
      chosen_key = best;
    }
  }
  if (chosen >= 0) {
    ids[first + lane] = chosen;
    weights[first + lane] = sigmoid(key_value(chosen_key));
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
