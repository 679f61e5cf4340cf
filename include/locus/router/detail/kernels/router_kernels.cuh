#pragma once
//! @file
//! CUDA kernels of the routers.
//!
//! - Thread per token: one thread runs the shared per-token function (detail/per_token.hpp) on
//!   its row. Any expert count and k, static or dynamic; the fallback and the small-E path.
//! - Warp per token: the row is spread over a warp's registers (E / 32 values per lane, read with
//!   16-byte vector loads), and the top-k is k rounds of a warp-wide arg-max (a shuffle butterfly
//!   under detail::router::better, a total order, so every lane agrees on the winner and the
//!   result equals the host's sequential scan). E, k (and the groups) are template parameters.
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
#pragma unroll
  for (int c = 0; c < per_lane / V; ++c) {
    const auto pack = *reinterpret_cast<const vector_pack<T, V>*>(row + (c * warp_size + lane) * V);
#pragma unroll
    for (int v = 0; v < V; ++v)
      x[c * V + v] = load_logit(&pack.v[v]);
  }
}

//! Warp arg-max under `better`: every lane returns the same (value, id) and, with it, the payload
//! of the winner.
LOCUS_DEVICE void warp_best(float& v, int& id, float& payload) {
#pragma unroll
  for (int offset = warp_size / 2; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(full_mask, v, offset);
    const int oid = __shfl_xor_sync(full_mask, id, offset);
    const float op = __shfl_xor_sync(full_mask, payload, offset);
    if (better(ov, oid, v, id)) {
      v = ov;
      id = oid;
      payload = op;
    }
  }
}

LOCUS_DEVICE int warp_min(int v) {
#pragma unroll
  for (int offset = warp_size / 2; offset > 0; offset /= 2)
    v = min(v, __shfl_xor_sync(full_mask, v, offset));
  return v;
}

LOCUS_DEVICE double warp_sum(double v) {
#pragma unroll
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
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (!is_finite(x[i])) bad = min(bad, expert_of<V>(i, lane));
  if (__ballot_sync(full_mask, bad != INT_MAX) == 0) return false;
  bad = warp_min(bad);
  if (lane == 0) flag_token(st, token, bad);
  write_flagged(ids, weights, k, static_cast<unsigned>(lane), warp_size);
  return true;
}

//! k rounds of warp arg-max over x (taken values become -inf); `payload` travels with each value.
template <int N, int V, int K>
LOCUS_DEVICE void warp_top_k(float (&x)[N], const float (&payload)[N], int lane, float (&sel_v)[K], int (&sel_e)[K],
                             float (&sel_p)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    float bv = -std::numeric_limits<float>::infinity(), bp = 0.0f;
    int be = INT_MAX;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int e = expert_of<V>(i, lane);
      if (better(x[i], e, bv, be)) {
        bv = x[i];
        be = e;
        bp = payload[i];
      }
    }
    warp_best(bv, be, bp);
    sel_v[j] = bv;
    sel_e[j] = be;
    sel_p[j] = bp;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (expert_of<V>(i, lane) == be) x[i] = -std::numeric_limits<float>::infinity();
  }
}

template <int K>
LOCUS_DEVICE void write_choices(const int (&e)[K], const float (&w)[K], int lane, expert_id* ids, float* weights) {
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j % warp_size == lane) {
      ids[j] = e[j];
      weights[j] = w[j];
    }
}

// --- warp per token: the routers ----------------------------------------------------------------

inline constexpr int warp_kernel_block = 128; //!< 4 tokens per block

LOCUS_DEVICE std::size_t warp_token() {
  return (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / warp_size;
}

template <int E, int K, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    softmax_topk_warp_kernel(const T* logits, std::size_t tokens, bool renormalize, expert_id* ids, float* weights,
                             device_status st) {
  constexpr int N = E / warp_size;
  const std::size_t t = warp_token();
  if (t >= tokens) return; // uniform per warp
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  ids += t * K;
  weights += t * K;
  float x[N];
  load_row<E, T, V>(logits + t * E, lane, x);
  if (warp_flag_non_finite<N, V>(x, lane, t, st, ids, weights, K)) return;

  float ignored[N] = {};
  float sel_v[K], sel_p[K];
  int sel_e[K];
  float all[N];
#pragma unroll
  for (int i = 0; i < N; ++i)
    all[i] = x[i];
  warp_top_k<N, V, K>(x, ignored, lane, sel_v, sel_e, sel_p);
  const float m = sel_v[0]; // the largest logit
  float ex[K], w[K], sum = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    ex[j] = exp(fsub(sel_v[j], m));
    sum = fadd(sum, ex[j]);
  }
  if (!renormalize) {
    double partial = 0.0;
#pragma unroll
    for (int i = 0; i < N; ++i)
      partial += static_cast<double>(exp(fsub(all[i], m)));
    sum = static_cast<float>(warp_sum(partial));
  }
#pragma unroll
  for (int j = 0; j < K; ++j)
    w[j] = fdiv(ex[j], sum);
  write_choices<K>(sel_e, w, lane, ids, weights);
}

template <int E, int G, int TG, int K, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    sigmoid_grouped_warp_kernel(const T* logits, std::size_t tokens, const float* bias, float scale, bool normalize,
                                expert_id* ids, float* weights, device_status st) {
  static_assert(G <= warp_size, "locus: the warp-per-token grouped router holds one group score per lane");
  constexpr int N = E / warp_size, size = E / G;
  __shared__ float biased[warp_kernel_block / warp_size][E];
  const std::size_t t = warp_token();
  if (t >= tokens) return;
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  float* row_scores = biased[threadIdx.x / warp_size];
  ids += t * K;
  weights += t * K;
  float x[N];
  load_row<E, T, V>(logits + t * E, lane, x);
  if (warp_flag_non_finite<N, V>(x, lane, t, st, ids, weights, K)) return;

  float s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = expert_of<V>(i, lane);
    s[i] = sigmoid(x[i]);
    x[i] = bias ? fadd(s[i], __ldg(bias + e)) : s[i];
    row_scores[e] = x[i];
  }
  __syncwarp();
  // One group per lane: the same top2_sum as the host, over the same values, so the same score.
  const float score = lane < G ? top2_sum(row_scores + lane * size, size) : -std::numeric_limits<float>::infinity();
  int rank = 0;
#pragma unroll
  for (int h = 0; h < G; ++h)
    rank += better(__shfl_sync(full_mask, score, h), h, score, lane) ? 1 : 0;
  const unsigned kept = __ballot_sync(full_mask, lane < G && rank < TG);
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (!((kept >> (expert_of<V>(i, lane) / size)) & 1u)) x[i] = -std::numeric_limits<float>::infinity();

  float sel_v[K], sel_s[K], w[K];
  int sel_e[K];
  warp_top_k<N, V, K>(x, s, lane, sel_v, sel_e, sel_s);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j)
    sum = fadd(sum, sel_s[j]);
  const float denominator = fadd(sum, grouped_denominator_epsilon);
#pragma unroll
  for (int j = 0; j < K; ++j)
    w[j] = normalize ? fmul(fdiv(sel_s[j], denominator), scale) : fmul(sel_s[j], scale);
  write_choices<K>(sel_e, w, lane, ids, weights);
}

template <int E, class T, int V>
__global__ void __launch_bounds__(warp_kernel_block)
    sigmoid_top1_warp_kernel(const T* logits, std::size_t tokens, expert_id* ids, float* weights, device_status st) {
  constexpr int N = E / warp_size;
  const std::size_t t = warp_token();
  if (t >= tokens) return;
  const int lane = static_cast<int>(threadIdx.x % warp_size);
  float x[N];
  load_row<E, T, V>(logits + t * E, lane, x);
  if (warp_flag_non_finite<N, V>(x, lane, t, st, ids + t, weights + t, 1)) return;
  float bv = -std::numeric_limits<float>::infinity(), unused = 0.0f;
  int be = INT_MAX;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = expert_of<V>(i, lane);
    if (better(x[i], e, bv, be)) {
      bv = x[i];
      be = e;
    }
  }
  warp_best(bv, be, unused);
  if (lane == 0) {
    ids[t] = be;
    weights[t] = sigmoid(bv);
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
