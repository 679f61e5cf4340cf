#pragma once
//! @file
//! Synthetic expert-activation traces with controllable structure, fitted to real traces and
//! rescaled to other model shapes.
//!
//! The generative model (`synth_model`), per request r of domain d and per layer l:
//!
//! 1. The request's own expert weights q_{r,l,e} = w_{d,l,e} · exp(σ z_{r,l,e}), z ~ N(0, 1) drawn
//!    once per (request, layer, expert). w are the domain's *sampling weights*; σ
//!    (`request_sigma`) is how much a request departs from its domain: since prefill and decode
//!    tokens of a request share q, a larger σ gives a higher prefill↔decode correlation.
//!    Decode tokens may use q · exp(δ z'), δ = `decode_drift`, to weaken that link again.
//! 2. Each token chooses top_k distinct experts by sampling without replacement ∝ q. With
//!    probability `cluster_probability` it first picks a co-activation cluster (∝ the cluster's
//!    share of q) and draws `cluster_take` of its experts from inside that cluster, which creates
//!    co-activation within clusters (per-layer expert partitions, `cluster_of`).
//! 3. Request lengths are resampled from the domain's empirical lengths or drawn log-normal;
//!    the first `prefill_tokens` tokens are prefill, the rest decode with steps 0, 1, ...
//!
//! The *target* popularity of a domain (share of choices per expert and layer) is kept apart from
//! the sampling weights: sampling without replacement, request noise and clusters all distort
//! marginals, so `calibrate` adjusts w until sampled loads match the target (multiplicative
//! fixed-point updates on a sample).
//!
//! Everything is seeded through splitmix64 keyed by (seed, request, layer), so a sample is the
//! same on every platform and for every thread count.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/error.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/trace/statistics.hpp>
#include <locus/trace/trace.hpp>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

//! One domain of a synthesizer model.
struct synth_domain {
  std::string name;
  double weight = 1.0; //!< relative share of requests
  //! Target popularity, `layers × experts`: per layer the share of choices each expert should get
  //! (a row sums to 1; top_k × share must stay ≤ 1).
  std::vector<double> popularity;
  //! Sampling weights, same shape; empty = the popularity itself (before calibrate()).
  std::vector<double> sampling_weights;
  //! Empirical request lengths to resample; empty = log-normal with the parameters below.
  std::vector<std::uint32_t> lengths;
  double length_log_mean = 5.0;  //!< μ of ln(length)
  double length_log_sigma = 0.8; //!< σ of ln(length)
  std::uint32_t min_length = 1, max_length = 16384;
};

//! The generative model (see the file comment).
struct synth_model {
  std::size_t experts = 0, top_k = 0, layers = 0;
  std::vector<synth_domain> domains;
  //! Co-activation clusters, `layers × experts`: the cluster index of each expert per layer.
  //! Empty = no clusters.
  std::vector<std::uint16_t> cluster_of;
  std::size_t clusters = 0;
  double cluster_probability = 0.0; //!< probability a token draws from one cluster first
  std::size_t cluster_take = 0;     //!< experts drawn from that cluster (0 = top_k − 1, at least 1)
  double request_sigma = 0.5;       //!< σ of the per-request log-normal noise
  double decode_drift = 0.0;        //!< δ of the extra decode-only noise
  double segment_sigma = 0.0;       //!< η of the noise redrawn every `segment_tokens` tokens
  std::size_t segment_tokens = 16;  //!< length of a segment (a stretch of text on one topic)
  std::size_t prefill_tokens = 32;  //!< leading tokens of each request marked prefill
  //! The model layer id of each layer and the model's hidden-layer count (trace::model_layer), as
  //! fitted from a trace that records them, so that samples keep them (engine exports number their
  //! layers by them). Empty: 0, 1, ...; a rescale to another shape has none.
  std::vector<std::uint32_t> model_layers;
  std::uint32_t hidden_layers = 0;

  //! Checks every size and value; throws locus::config_error naming the first bad field.
  void validate() const;
};

//! How many requests / tokens a sample has.
struct sample_options {
  std::size_t requests = 0; //!< when > 0, exactly this many requests
  std::size_t tokens = 0;   //!< otherwise requests are added until at least this many tokens
  std::uint64_t seed = 1;
  unsigned threads = 0; //!< parallel_for worker bound (0 = hardware concurrency)
};

//! Shape and structure of a model built from scratch (make_synth_model).
struct synth_shape {
  std::size_t experts = 64, top_k = 6, layers = 26;
  std::size_t domains = 3;
  //! Popularity of the expert of rank i (0-based) ∝ (i + 1)^(−zipf): larger is more skewed.
  double zipf = 0.8;
  //! 0: every domain ranks experts alike; 1: each domain has its own independent ranking.
  double domain_shift = 0.6;
  std::size_t clusters = 8; //!< co-activation clusters per layer (0 = none)
  double cluster_probability = 0.5;
  double request_sigma = 0.6;
  double decode_drift = 0.0;
  double length_log_mean = 5.0, length_log_sigma = 0.8;
  std::size_t prefill_tokens = 32;
  std::uint64_t seed = 1;
};

//! What fit() matches and how hard it tries.
struct fit_options {
  std::size_t prefill_tokens = 32;       //!< prefill split used to measure the real correlation
  std::size_t clusters = 8;              //!< co-activation clusters per layer to find (0 = none)
  std::size_t calibration_tokens = 8192; //!< tokens per domain in each calibration sample
  std::size_t calibration_rounds = 4;
  std::size_t search_steps = 6; //!< bisection steps for σ, δ and the cluster probability
  std::uint64_t seed = 1;
  unsigned threads = 0;
};

//! Target shape of rescale().
struct rescale_options {
  std::size_t experts = 256, top_k = 8, layers = 58;
  //! σ of a log-normal factor that makes the experts split from one source expert differ.
  double jitter = 0.2;
  bool shuffle = true; //!< permute expert ids per layer so split experts are not adjacent
  std::size_t calibration_tokens = 8192;
  std::size_t calibration_rounds = 4;
  std::uint64_t seed = 1;
  unsigned threads = 0;
};

//! Fraction of co-chosen expert pairs that fall in the same cluster: over every token and layer,
//! Σ [cluster(a) = cluster(b)] over pairs of distinct chosen experts a < b, divided by the number
//! of such pairs. The co-activation statistic fit() matches.
//! @param cluster_of `layers × experts` cluster indices
//! @throws locus::invalid_input_error when the size does not match the trace
inline double same_cluster_pair_share(const trace& t, std::span<const std::uint16_t> cluster_of);

namespace detail::synth {

inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) noexcept {
  locus::trace::detail::splitmix64 g(a ^ (b * 0xd1b54a32d192ed03ull + 0x8cb92ba72f3d8dd7ull));
  g.next();
  return g.next();
}

//! Standard normal by Box–Muller (one of the pair; simplicity over speed, the draws are O(E)
//! per request and layer).
inline double normal(locus::trace::detail::splitmix64& g) noexcept {
  double u = g.uniform();
  while (u <= 0.0)
    u = g.uniform();
  const double v = g.uniform();
  return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
}

//! Per-layer expert order grouped by cluster, so a cluster is a contiguous range of the
//! cumulative-weight array and sampling inside it is one binary search.
struct prepared_model {
  std::vector<std::uint16_t> order;       //!< layers × experts: expert at each position
  std::vector<std::uint32_t> cluster_end; //!< layers × clusters: end position of each cluster
  std::vector<std::uint16_t> cluster_at;  //!< layers × experts: cluster of each position
  std::size_t clusters = 1;
  std::size_t take = 0;
  bool use_clusters = false; //!< clusters exist and the cluster probability is positive
  //! exp(σ z), exp(δ z), exp(η z) at the 1024 mid-quantiles of N(0, 1): one table lookup per
  //! expert instead of a Box–Muller and an exp, since segments redraw E factors every few tokens.
  std::vector<double> request_factor, drift_factor, segment_factor;
};

//! z at the mid-quantiles (i + ½)/n of N(0, 1), by bisection on Φ(z) = ½ erfc(−z/√2).
inline const std::vector<double>& normal_quantiles() {
  static const std::vector<double> table = [] {
    std::vector<double> t(1024);
    for (std::size_t i = 0; i < t.size(); ++i) {
      const double p = (static_cast<double>(i) + 0.5) / static_cast<double>(t.size());
      double lo = -10.0, hi = 10.0;
      for (int it = 0; it < 80; ++it) {
        const double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
      }
      t[i] = 0.5 * (lo + hi);
    }
    return t;
  }();
  return table;
}

inline std::vector<double> lognormal_table(double sigma) {
  std::vector<double> t = normal_quantiles();
  for (auto& v : t)
    v = std::exp(sigma * v);
  return t;
}

//! One factor exp(σ z) from a table (10 random bits pick the quantile).
inline double factor(const std::vector<double>& table, locus::trace::detail::splitmix64& g) noexcept {
  return table[g.next() >> 54];
}

inline prepared_model prepare(const synth_model& m) {
  prepared_model p;
  const std::size_t E = m.experts, L = m.layers;
  p.clusters = m.cluster_of.empty() ? 1 : m.clusters;
  p.take = m.cluster_take ? m.cluster_take : std::max<std::size_t>(1, m.top_k - 1);
  p.use_clusters = p.clusters > 1 && m.cluster_probability > 0.0;
  p.request_factor = lognormal_table(m.request_sigma);
  p.drift_factor = lognormal_table(m.decode_drift);
  p.segment_factor = lognormal_table(m.segment_sigma);
  p.order.resize(L * E);
  p.cluster_at.resize(L * E);
  p.cluster_end.assign(L * p.clusters, 0);
  for (std::size_t l = 0; l < L; ++l) {
    auto* ord = p.order.data() + l * E;
    for (std::size_t e = 0; e < E; ++e)
      ord[e] = static_cast<std::uint16_t>(e);
    auto cl = [&](std::size_t e) -> std::size_t { return m.cluster_of.empty() ? 0 : m.cluster_of[l * E + e]; };
    std::stable_sort(ord, ord + E, [&](std::uint16_t a, std::uint16_t b) { return cl(a) < cl(b); });
    for (std::size_t i = 0; i < E; ++i) {
      p.cluster_at[l * E + i] = static_cast<std::uint16_t>(cl(ord[i]));
      p.cluster_end[l * p.clusters + cl(ord[i])] = static_cast<std::uint32_t>(i + 1);
    }
    // Empty clusters end where the previous one ends.
    for (std::size_t c = 1; c < p.clusters; ++c)
      p.cluster_end[l * p.clusters + c] =
          std::max(p.cluster_end[l * p.clusters + c], p.cluster_end[l * p.clusters + c - 1]);
  }
  return p;
}

//! Sampling ∝ q over the cluster-ordered positions of one layer through the prefix sums of q:
//! a cluster is a contiguous range, so one array serves whole-layer and in-cluster draws, and a
//! rebuild (every segment) is one pass of additions; a draw is a branch-free binary search.
struct layer_sampler {
  std::vector<double> q;   //!< weight per position
  std::vector<double> cum; //!< prefix sums of q

  void build() {
    cum.resize(q.size());
    double acc = 0.0;
    for (std::size_t i = 0; i < q.size(); ++i)
      cum[i] = acc += q[i];
  }
  //! A position in [a, b) ∝ q, or b when the range has no weight.
  std::size_t draw(std::size_t a, std::size_t b, locus::trace::detail::splitmix64& g) const {
    const double lo = a ? cum[a - 1] : 0.0, hi = cum[b - 1];
    if (!(hi > lo)) return b;
    return find(a, b, lo + g.uniform() * (hi - lo));
  }
  //! The first position of [a, b) whose prefix sum exceeds u (so zero-weight positions are
  //! never chosen), clamped to b − 1.
  std::size_t find(std::size_t a, std::size_t b, double u) const {
    const double* base = cum.data() + a;
    std::size_t len = b - a;
    while (len > 1) {
      const std::size_t half = len / 2;
      base = base[half - 1] <= u ? base + half : base;
      len -= half;
    }
    const auto pos = static_cast<std::size_t>(base - cum.data());
    return pos < b ? pos : b - 1;
  }
};

struct scratch {
  std::vector<double> base, drift; //!< per position: request weights, decode factors
  layer_sampler sampler;
};

//! Draws one token's top-k into `ids`/`weights` from sampler `s` of layer `l`.
inline void draw_token(const synth_model& m, const prepared_model& p, std::size_t l, const layer_sampler& s,
                       locus::trace::detail::splitmix64& g, trace_expert_id* ids, float* weights) {
  const std::size_t E = m.experts, k = m.top_k;
  const std::uint16_t* ord = p.order.data() + l * E;
  const double* q = s.q.data();
  std::uint32_t chosen_pos[max_trace_top_k];
  std::size_t n = 0;
  auto taken = [&](std::size_t pos) {
    for (std::size_t i = 0; i < n; ++i)
      if (chosen_pos[i] == pos) return true;
    return false;
  };
  std::uint32_t sorted[max_trace_top_k]; // chosen positions, ascending
  auto add = [&](std::size_t pos) {
    chosen_pos[n] = static_cast<std::uint32_t>(pos);
    std::size_t i = n++;
    for (; i > 0 && sorted[i - 1] > pos; --i)
      sorted[i] = sorted[i - 1];
    sorted[i] = static_cast<std::uint32_t>(pos);
  };
  // One draw ∝ q over the unchosen positions of [a, b), exactly: u is drawn over the range's mass
  // without the chosen experts, then mapped back onto the prefix sums by stepping over each
  // chosen expert's interval in ascending order. O(k + log E), however concentrated q is.
  auto draw_in = [&](std::size_t a, std::size_t b) -> bool {
    const double* cum = s.cum.data();
    const double lo = a ? cum[a - 1] : 0.0, hi = cum[b - 1];
    double removed = 0.0;
    for (std::size_t i = 0; i < n; ++i)
      if (sorted[i] >= a && sorted[i] < b) removed += q[sorted[i]];
    const double avail = hi - lo - removed;
    if (!(avail > (hi - lo) * 1e-12)) return false;
    double u = lo + g.uniform() * avail;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t c = sorted[i];
      if (c < a || c >= b) continue;
      if ((c ? cum[c - 1] : 0.0) <= u)
        u += q[c];
      else
        break;
    }
    std::size_t pos = s.find(a, b, u);
    if (taken(pos) || q[pos] <= 0.0) {
      // Rounding put u on a chosen or empty interval: the nearest valid position instead.
      std::size_t best = b;
      for (std::size_t x = a; x < b; ++x)
        if (!taken(x) && q[x] > 0.0 &&
            (best == b || (x > pos ? x - pos : pos - x) < (best > pos ? best - pos : pos - best)))
          best = x;
      if (best == b) return false;
      pos = best;
    }
    add(pos);
    return true;
  };
  if (p.use_clusters && g.uniform() < m.cluster_probability) {
    // The cluster of one ∝ q draw: clusters are picked in proportion to their share of q.
    const std::size_t first = s.draw(0, E, g);
    if (first < E) {
      const std::size_t c = p.cluster_at[l * E + first];
      const std::size_t a = c ? p.cluster_end[l * p.clusters + c - 1] : 0, b = p.cluster_end[l * p.clusters + c];
      const std::size_t want = std::min({p.take, k, b - a});
      for (std::size_t i = 0; i < want; ++i)
        if (!draw_in(a, b)) break;
    }
  }
  while (n < k) {
    if (!draw_in(0, E)) {
      // Every remaining weight is zero: take the lowest unchosen positions (only when a model
      // has fewer positive weights than top_k).
      for (std::uint32_t pos = 0; n < k && pos < E; ++pos)
        if (!taken(pos)) add(pos);
    }
  }
  double sum = 0.0;
  for (std::size_t i = 0; i < k; ++i)
    sum += q[chosen_pos[i]];
  for (std::size_t i = 0; i < k; ++i) {
    ids[i] = ord[chosen_pos[i]];
    weights[i] = static_cast<float>(sum > 0.0 ? q[chosen_pos[i]] / sum : 1.0 / static_cast<double>(k));
  }
}

//! Generates one request of `length` tokens in domain `d`: for each layer l, ids into
//! `ids[l] + token·k` and weights likewise.
inline void generate_request(const synth_model& m, const prepared_model& p, std::size_t d, std::size_t length,
                             std::uint64_t seed, trace_expert_id* const* ids, float* const* weights, scratch& s) {
  const std::size_t E = m.experts, k = m.top_k;
  const auto& dom = m.domains[d];
  const auto& w = dom.sampling_weights.empty() ? dom.popularity : dom.sampling_weights;
  const bool drift = m.decode_drift > 0.0 && length > m.prefill_tokens;
  const bool segments = m.segment_sigma > 0.0;
  const std::size_t seg = std::max<std::size_t>(1, m.segment_tokens);
  s.base.resize(E);
  s.drift.resize(E);
  s.sampler.q.resize(E);
  for (std::size_t l = 0; l < m.layers; ++l) {
    locus::trace::detail::splitmix64 g(mix(seed, l + 1));
    const std::uint16_t* ord = p.order.data() + l * E;
    for (std::size_t i = 0; i < E; ++i) {
      const double base = w[l * E + ord[i]];
      s.base[i] = m.request_sigma > 0.0 ? base * factor(p.request_factor, g) : base;
      s.drift[i] = drift ? factor(p.drift_factor, g) : 1.0;
    }
    for (std::size_t i = 0; i < length; ++i) {
      const bool dec = i >= m.prefill_tokens;
      // A new segment (fresh η noise), or the switch to decode weights, rebuilds the sampler.
      if (i == 0 || (segments && i % seg == 0) || (drift && i == m.prefill_tokens)) {
        for (std::size_t x = 0; x < E; ++x)
          s.sampler.q[x] = s.base[x] * (dec ? s.drift[x] : 1.0) * (segments ? factor(p.segment_factor, g) : 1.0);
        s.sampler.build();
      }
      draw_token(m, p, l, s.sampler, g, ids[l] + i * k, weights[l] + i * k);
    }
  }
}

inline std::size_t draw_length(const synth_domain& dom, locus::trace::detail::splitmix64& g) {
  if (!dom.lengths.empty()) return dom.lengths[g.below(dom.lengths.size())];
  const double v = std::exp(dom.length_log_mean + dom.length_log_sigma * normal(g));
  return static_cast<std::size_t>(
      std::clamp(std::llround(v), static_cast<long long>(dom.min_length), static_cast<long long>(dom.max_length)));
}

//! Loads (layers × experts counts) of `tokens` tokens of domain d sampled from m.
inline std::vector<std::uint64_t> sample_domain_load(const synth_model& m, const prepared_model& p, std::size_t d,
                                                     std::size_t tokens, std::uint64_t seed, unsigned threads) {
  // Lengths first (sequentially, for determinism), then requests in parallel.
  std::vector<std::size_t> lengths;
  locus::trace::detail::splitmix64 g(mix(seed, 0x1e9));
  for (std::size_t n = 0; n < tokens;) {
    lengths.push_back(std::max<std::size_t>(1, draw_length(m.domains[d], g)));
    n += lengths.back();
  }
  const std::size_t E = m.experts, L = m.layers, k = m.top_k;
  std::vector<std::vector<std::uint64_t>> part(std::max(1u, threads ? threads : default_host_threads()));
  parallel_for(lengths.size(), 1, static_cast<unsigned>(part.size()), [&](std::size_t b, std::size_t e, unsigned w) {
    auto& counts = part[w];
    counts.assign(L * E, 0);
    scratch s;
    std::vector<std::vector<trace_expert_id>> id(L);
    std::vector<std::vector<float>> wt(L);
    std::vector<trace_expert_id*> ip(L);
    std::vector<float*> wp(L);
    for (std::size_t r = b; r < e; ++r) {
      for (std::size_t l = 0; l < L; ++l) {
        id[l].resize(lengths[r] * k);
        wt[l].resize(lengths[r] * k);
        ip[l] = id[l].data();
        wp[l] = wt[l].data();
      }
      generate_request(m, p, d, lengths[r], mix(seed, r + 7), ip.data(), wp.data(), s);
      for (std::size_t l = 0; l < L; ++l)
        for (auto x : id[l])
          ++counts[l * E + x];
    }
  });
  std::vector<std::uint64_t> out(L * E, 0);
  for (const auto& c : part)
    for (std::size_t i = 0; i < c.size(); ++i)
      out[i] += c[i];
  return out;
}

//! Caps top_k × share at 1 (an expert cannot be chosen twice by one token) and renormalises,
//! repeating until no entry exceeds the cap.
inline void cap_popularity(std::span<double> row, std::size_t k) {
  const double cap = 1.0 / static_cast<double>(k);
  for (int it = 0; it < 64; ++it) {
    double fixed = 0.0, free = 0.0;
    std::size_t capped = 0;
    for (double v : row) {
      if (v >= cap) {
        fixed += cap;
        ++capped;
      } else {
        free += v;
      }
    }
    if (capped == 0) break;
    const double scale = free > 0.0 ? (1.0 - fixed) / free : 0.0;
    bool again = false;
    for (double& v : row) {
      if (v >= cap) {
        v = cap;
      } else {
        v *= scale;
        again |= v > cap;
      }
    }
    if (!again) break;
  }
}

inline void normalise_rows(std::vector<double>& v, std::size_t rows, std::size_t cols) {
  for (std::size_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (std::size_t c = 0; c < cols; ++c)
      s += v[r * cols + c];
    if (s > 0.0)
      for (std::size_t c = 0; c < cols; ++c)
        v[r * cols + c] /= s;
  }
}

//! Average-linkage agglomerative clustering of experts by co-activation lift
//! C(i, j) · N / (n_i n_j) (observed over independent co-choice), into `clusters` groups of at
//! most 2 × E / clusters experts, so that no cluster swallows a layer.
inline std::vector<std::uint16_t> cluster_by_lift(const coactivation& co, std::size_t tokens, std::size_t clusters) {
  const std::size_t E = co.experts;
  std::vector<double> lift(E * E, 0.0);
  for (std::size_t i = 0; i < E; ++i)
    for (std::size_t j = 0; j < E; ++j) {
      const double ni = static_cast<double>(co.at(i, i)), nj = static_cast<double>(co.at(j, j));
      lift[i * E + j] = (i != j && ni > 0 && nj > 0)
                            ? static_cast<double>(co.at(i, j)) * static_cast<double>(tokens) / (ni * nj)
                            : 0.0;
    }
  const std::size_t max_size = std::max<std::size_t>(2, (2 * E + clusters - 1) / clusters);
  std::vector<std::vector<std::size_t>> members(E);
  for (std::size_t i = 0; i < E; ++i)
    members[i] = {i};
  // link(a, b) = Σ lift over members: average linkage divides by |a|·|b|.
  std::vector<double> link = lift;
  std::vector<bool> alive(E, true);
  std::size_t count = E;
  while (count > clusters) {
    double best = -1.0;
    std::size_t ba = E, bb = E;
    for (std::size_t a = 0; a < E; ++a) {
      if (!alive[a]) continue;
      for (std::size_t b = a + 1; b < E; ++b) {
        if (!alive[b] || members[a].size() + members[b].size() > max_size) continue;
        const double avg = link[a * E + b] / static_cast<double>(members[a].size() * members[b].size());
        if (avg > best) best = avg, ba = a, bb = b;
      }
    }
    if (ba == E) break; // size limit reached everywhere
    for (std::size_t c = 0; c < E; ++c) {
      link[ba * E + c] += link[bb * E + c];
      link[c * E + ba] = link[ba * E + c];
    }
    members[ba].insert(members[ba].end(), members[bb].begin(), members[bb].end());
    members[bb].clear();
    alive[bb] = false;
    --count;
  }
  std::vector<std::uint16_t> out(E, 0);
  std::uint16_t id = 0;
  for (std::size_t a = 0; a < E; ++a) {
    if (!alive[a]) continue;
    for (auto i : members[a])
      out[i] = id;
    ++id;
  }
  return out;
}

} // namespace detail::synth

//! A model's shape within a trace's limits, and its tables (domains × layers × experts entries,
//! a few of them) within what a machine holds: checked before any table is built, so that an
//! absurd shape is refused at once instead of after minutes of work or an exhausted memory.
//! @throws locus::config_error naming `what` and the first value out of range
inline void check_synth_shape(const char* what, std::size_t experts, std::size_t top_k, std::size_t layers,
                              std::size_t domains) {
  LOCUS_REQUIRE(experts >= 1 && experts <= max_trace_experts, config_error, what, ": experts is ", experts,
                ", expected 1..", max_trace_experts);
  LOCUS_REQUIRE(top_k >= 1 && top_k <= std::min(experts, max_trace_top_k), config_error, what, ": top_k is ", top_k,
                ", expected 1..", std::min(experts, max_trace_top_k));
  LOCUS_REQUIRE(layers >= 1 && layers <= max_trace_layers, config_error, what, ": layers is ", layers, ", expected 1..",
                max_trace_layers);
  LOCUS_REQUIRE(domains >= 1 && domains <= max_trace_domains, config_error, what, ": domains is ", domains,
                ", expected 1..", max_trace_domains);
  constexpr std::size_t max_entries = std::size_t{1} << 28; // 2 GiB per table of doubles
  LOCUS_REQUIRE(domains * layers <= max_entries / experts, config_error, what, ": ", domains, " domains × ", layers,
                " layers × ", experts, " experts is more than ", max_entries,
                " table entries (2 GiB per table: fewer experts, layers or domains)");
}

inline void synth_model::validate() const {
  LOCUS_REQUIRE(!domains.empty(), config_error, "synth_model: no domain");
  check_synth_shape("synth_model", experts, top_k, layers, domains.size());
  LOCUS_REQUIRE(model_layers.empty() || model_layers.size() == layers, config_error,
                "synth_model: ", model_layers.size(), " model layer ids for ", layers, " layers");
  double total_weight = 0.0;
  for (std::size_t d = 0; d < domains.size(); ++d) {
    const auto& dom = domains[d];
    LOCUS_REQUIRE(dom.popularity.size() == layers * experts, config_error, "synth_model: domain ", d, " (", dom.name,
                  ") has ", dom.popularity.size(),
                  " popularity entries, expected layers × experts = ", layers * experts);
    LOCUS_REQUIRE(dom.sampling_weights.empty() || dom.sampling_weights.size() == layers * experts, config_error,
                  "synth_model: domain ", d, " has ", dom.sampling_weights.size(), " sampling weights, expected 0 or ",
                  layers * experts);
    LOCUS_REQUIRE(std::isfinite(dom.weight) && dom.weight >= 0.0, config_error, "synth_model: domain ", d,
                  " weight is ", dom.weight);
    total_weight += dom.weight;
    const auto& w = dom.sampling_weights.empty() ? dom.popularity : dom.sampling_weights;
    for (std::size_t l = 0; l < layers; ++l) {
      double s = 0.0;
      for (std::size_t e = 0; e < experts; ++e) {
        const double v = w[l * experts + e];
        LOCUS_REQUIRE(std::isfinite(v) && v >= 0.0, config_error, "synth_model: domain ", d, " layer ", l, " expert ",
                      e, ": weight ", v, " is negative or not finite");
        LOCUS_REQUIRE(std::isfinite(dom.popularity[l * experts + e]) && dom.popularity[l * experts + e] >= 0.0,
                      config_error, "synth_model: domain ", d, " layer ", l, " expert ", e, ": popularity ",
                      dom.popularity[l * experts + e], " is negative or not finite");
        s += v;
      }
      LOCUS_REQUIRE(s > 0.0, config_error, "synth_model: domain ", d, " layer ", l, " has no positive weight");
    }
    LOCUS_REQUIRE(dom.min_length >= 1 && dom.min_length <= dom.max_length, config_error, "synth_model: domain ", d,
                  " length bounds [", dom.min_length, ", ", dom.max_length, "] are empty or start at 0");
    LOCUS_REQUIRE(std::isfinite(dom.length_log_mean) && std::isfinite(dom.length_log_sigma) &&
                      dom.length_log_sigma >= 0.0,
                  config_error, "synth_model: domain ", d, " log-normal length parameters (", dom.length_log_mean, ", ",
                  dom.length_log_sigma, ") are invalid");
    for (auto len : dom.lengths)
      LOCUS_REQUIRE(len >= 1, config_error, "synth_model: domain ", d, " has an empirical length 0");
  }
  LOCUS_REQUIRE(total_weight > 0.0, config_error, "synth_model: every domain weight is 0");
  LOCUS_REQUIRE(cluster_of.empty() || (cluster_of.size() == layers * experts && clusters >= 1), config_error,
                "synth_model: cluster_of has ", cluster_of.size(), " entries (expected 0 or ", layers * experts,
                ") with ", clusters, " clusters");
  for (std::size_t i = 0; i < cluster_of.size(); ++i)
    LOCUS_REQUIRE(cluster_of[i] < clusters, config_error, "synth_model: layer ", i / experts, " expert ", i % experts,
                  " is in cluster ", cluster_of[i], ", expected < ", clusters);
  LOCUS_REQUIRE(cluster_probability >= 0.0 && cluster_probability <= 1.0, config_error,
                "synth_model: cluster_probability ", cluster_probability, " is outside [0, 1]");
  LOCUS_REQUIRE(cluster_take <= top_k, config_error, "synth_model: cluster_take ", cluster_take, " exceeds top_k ",
                top_k);
  LOCUS_REQUIRE(std::isfinite(request_sigma) && request_sigma >= 0.0 && request_sigma <= 10.0, config_error,
                "synth_model: request_sigma ", request_sigma, " is outside [0, 10]");
  LOCUS_REQUIRE(std::isfinite(decode_drift) && decode_drift >= 0.0 && decode_drift <= 10.0, config_error,
                "synth_model: decode_drift ", decode_drift, " is outside [0, 10]");
  LOCUS_REQUIRE(std::isfinite(segment_sigma) && segment_sigma >= 0.0 && segment_sigma <= 10.0, config_error,
                "synth_model: segment_sigma ", segment_sigma, " is outside [0, 10]");
  LOCUS_REQUIRE(segment_tokens >= 1, config_error, "synth_model: segment_tokens is 0");
}

//! Samples a trace from `m` (see the file comment). Request r's domain, length and routing come
//! from generators keyed by (seed, r), so the result does not depend on the thread count.
//! Domains are named as in the model; request ids are 0, 1, ...
//! @throws locus::config_error on an invalid model or when neither requests nor tokens is set
inline trace sample(const synth_model& m, const sample_options& opt) {
  m.validate();
  LOCUS_REQUIRE(opt.requests > 0 || opt.tokens > 0, config_error, "synth sample: set requests or tokens (both are 0)");
  const auto p = detail::synth::prepare(m);
  std::vector<double> cum_domain;
  double acc = 0.0;
  for (const auto& d : m.domains)
    cum_domain.push_back(acc += d.weight);
  trace_builder b(m.experts, m.top_k, m.layers);
  if (!m.model_layers.empty() || m.hidden_layers != 0) b.set_model_layers(m.model_layers, m.hidden_layers);
  std::vector<std::string> names;
  for (const auto& d : m.domains)
    names.push_back(d.name);
  b.set_domains(names);
  std::vector<std::uint32_t> dom_of;
  std::vector<std::size_t> len_of;
  std::size_t total = 0;
  for (std::size_t r = 0; opt.requests ? r < opt.requests : total < opt.tokens; ++r) {
    locus::trace::detail::splitmix64 g(detail::synth::mix(opt.seed, r));
    const double u = g.uniform() * acc;
    const auto d = static_cast<std::uint32_t>(std::min<std::size_t>(
        std::upper_bound(cum_domain.begin(), cum_domain.end(), u) - cum_domain.begin(), m.domains.size() - 1));
    const std::size_t len = std::max<std::size_t>(1, detail::synth::draw_length(m.domains[d], g));
    dom_of.push_back(d);
    len_of.push_back(len);
    total += len;
  }
  b.reserve_tokens(total);
  for (std::size_t r = 0; r < dom_of.size(); ++r)
    b.add_request(r, dom_of[r], len_of[r]);
  std::vector<trace_expert_id*> ids(m.layers);
  std::vector<float*> wts(m.layers);
  for (std::size_t l = 0; l < m.layers; ++l) {
    ids[l] = b.layer_ids(l).data();
    wts[l] = b.layer_weights(l).data();
  }
  auto phases = b.token_phases();
  auto steps = b.token_steps();
  std::vector<std::size_t> first(dom_of.size());
  for (std::size_t r = 0, f = 0; r < dom_of.size(); ++r)
    first[r] = f, f += len_of[r];
  parallel_for(dom_of.size(), 4, opt.threads, [&](std::size_t rb, std::size_t re, unsigned) {
    detail::synth::scratch s;
    std::vector<trace_expert_id*> ip(m.layers);
    std::vector<float*> wp(m.layers);
    for (std::size_t r = rb; r < re; ++r) {
      for (std::size_t l = 0; l < m.layers; ++l) {
        ip[l] = ids[l] + first[r] * m.top_k;
        wp[l] = wts[l] + first[r] * m.top_k;
      }
      detail::synth::generate_request(m, p, dom_of[r], len_of[r], detail::synth::mix(opt.seed ^ 0x5eedull, r + 1),
                                      ip.data(), wp.data(), s);
      for (std::size_t i = 0; i < len_of[r]; ++i) {
        const bool pre = i < m.prefill_tokens;
        phases[first[r] + i] = pre ? phase::prefill : phase::decode;
        steps[first[r] + i] = pre ? -1 : static_cast<std::int32_t>(i - m.prefill_tokens);
      }
    }
  });
  return b.build();
}

//! Adjusts every domain's sampling weights so that sampled loads match its target popularity:
//! each round samples `tokens_per_domain` tokens per domain, measures the share ŝ of every
//! expert, and sets w ← w · (s / ŝ)^0.8 (damped to avoid oscillation on noisy shares; an expert
//! never drawn has its weight doubled). Deterministic for a given seed.
//! @throws locus::config_error when rounds are asked for with no token to measure shares on
inline void calibrate(synth_model& m, std::size_t tokens_per_domain = 8192, std::size_t rounds = 4,
                      std::uint64_t seed = 1, unsigned threads = 0) {
  m.validate();
  // No token: every share is 0 / 0, and the NaN weights surfaced later as a "negative or not finite"
  // model weight that named neither this function nor the count.
  LOCUS_REQUIRE(rounds == 0 || tokens_per_domain > 0, config_error,
                "synth calibrate: calibration tokens per domain is 0 (with ", rounds, " rounds: nothing to measure)");
  const auto p = detail::synth::prepare(m);
  const std::size_t E = m.experts, L = m.layers;
  for (std::size_t d = 0; d < m.domains.size(); ++d) {
    auto& dom = m.domains[d];
    for (std::size_t l = 0; l < L; ++l)
      detail::synth::cap_popularity({dom.popularity.data() + l * E, E}, m.top_k);
    if (dom.sampling_weights.empty()) dom.sampling_weights = dom.popularity;
    for (std::size_t round = 0; round < rounds; ++round) {
      const auto load = detail::synth::sample_domain_load(m, p, d, tokens_per_domain,
                                                          detail::synth::mix(seed, d * 131 + round), threads);
      for (std::size_t l = 0; l < L; ++l) {
        double total = 0.0;
        for (std::size_t e = 0; e < E; ++e)
          total += static_cast<double>(load[l * E + e]);
        for (std::size_t e = 0; e < E; ++e) {
          const double target = dom.popularity[l * E + e];
          const double got = static_cast<double>(load[l * E + e]) / total;
          double& w = dom.sampling_weights[l * E + e];
          if (target <= 0.0)
            w = 0.0;
          else if (got <= 0.0)
            w *= 2.0;
          else
            w *= std::pow(target / got, 0.8);
        }
      }
      detail::synth::normalise_rows(dom.sampling_weights, L, E);
    }
  }
}

//! A model built from scratch with the structure `shape` asks for (uncalibrated: sampling
//! weights = popularity; call calibrate() when exact marginals matter).
//! Per domain and layer, scores s_e = (1 − shift)·g_{l,e} + shift·g_{d,l,e} with standard normal
//! g, experts ranked by score, popularity ∝ (rank + 1)^(−zipf); clusters are random equal-size
//! partitions per layer; lengths log-normal.
//! @throws locus::config_error on an invalid shape
inline synth_model make_synth_model(const synth_shape& sh) {
  check_synth_shape("synth shape", sh.experts, sh.top_k, sh.layers, sh.domains);
  LOCUS_REQUIRE(sh.zipf >= 0.0 && sh.zipf <= 8.0, config_error, "synth shape: zipf ", sh.zipf, " is outside [0, 8]");
  LOCUS_REQUIRE(sh.domain_shift >= 0.0 && sh.domain_shift <= 1.0, config_error, "synth shape: domain_shift ",
                sh.domain_shift, " is outside [0, 1]");
  LOCUS_REQUIRE(sh.clusters <= sh.experts && sh.clusters < 65536, config_error, "synth shape: clusters ", sh.clusters,
                " exceeds experts ", sh.experts);
  synth_model m;
  m.experts = sh.experts;
  m.top_k = sh.top_k;
  m.layers = sh.layers;
  m.request_sigma = sh.request_sigma;
  m.decode_drift = sh.decode_drift;
  m.prefill_tokens = sh.prefill_tokens;
  m.cluster_probability = sh.clusters > 1 ? sh.cluster_probability : 0.0;
  const std::size_t E = sh.experts, L = sh.layers;
  locus::trace::detail::splitmix64 g(detail::synth::mix(sh.seed, 0xabc));
  std::vector<double> common(L * E);
  for (auto& v : common)
    v = detail::synth::normal(g);
  std::vector<std::size_t> idx(E);
  for (std::size_t d = 0; d < sh.domains; ++d) {
    synth_domain dom;
    dom.name = "domain" + std::to_string(d);
    dom.length_log_mean = sh.length_log_mean;
    dom.length_log_sigma = sh.length_log_sigma;
    dom.popularity.resize(L * E);
    for (std::size_t l = 0; l < L; ++l) {
      std::vector<double> score(E);
      for (std::size_t e = 0; e < E; ++e)
        score[e] = (1.0 - sh.domain_shift) * common[l * E + e] + sh.domain_shift * detail::synth::normal(g);
      std::iota(idx.begin(), idx.end(), std::size_t{0});
      std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return score[a] > score[b]; });
      for (std::size_t rank = 0; rank < E; ++rank)
        dom.popularity[l * E + idx[rank]] = std::pow(static_cast<double>(rank + 1), -sh.zipf);
    }
    detail::synth::normalise_rows(dom.popularity, L, E);
    m.domains.push_back(std::move(dom));
  }
  if (sh.clusters > 1) {
    m.clusters = sh.clusters;
    m.cluster_of.resize(L * E);
    for (std::size_t l = 0; l < L; ++l) {
      std::iota(idx.begin(), idx.end(), std::size_t{0});
      for (std::size_t i = E; i > 1; --i)
        std::swap(idx[i - 1], idx[g.below(i)]);
      for (std::size_t i = 0; i < E; ++i)
        m.cluster_of[l * E + idx[i]] = static_cast<std::uint16_t>(i * sh.clusters / E);
    }
  }
  for (auto& dom : m.domains)
    for (std::size_t l = 0; l < L; ++l)
      detail::synth::cap_popularity({dom.popularity.data() + l * E, E}, m.top_k);
  m.validate();
  return m;
}

inline double same_cluster_pair_share(const trace& t, std::span<const std::uint16_t> cluster_of) {
  LOCUS_REQUIRE(cluster_of.size() == t.layers() * t.experts(), invalid_input_error,
                "same_cluster_pair_share: ", cluster_of.size(),
                " cluster entries, expected layers × experts = ", t.layers() * t.experts());
  const std::size_t E = t.experts(), k = t.top_k();
  std::uint64_t same = 0, pairs = 0;
  trace_expert_id u[max_trace_top_k];
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const trace_expert_id* ids = t.layer(l).ids();
    const std::uint16_t* c = cluster_of.data() + l * E;
    for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
      const std::size_t m = detail::trace_stats::distinct(ids + tok * k, k, u);
      for (std::size_t a = 0; a < m; ++a)
        for (std::size_t b = a + 1; b < m; ++b)
          same += c[u[a]] == c[u[b]] ? 1 : 0;
      pairs += m * (m - 1) / 2;
    }
  }
  return pairs ? static_cast<double>(same) / static_cast<double>(pairs) : 0.0;
}

namespace detail::synth {
//! A sample with `requests` requests, for measuring a statistic while fitting.
inline ::locus::trace::trace probe(const synth_model& m, std::size_t requests, std::uint64_t seed, unsigned threads) {
  sample_options o;
  o.requests = requests;
  o.seed = seed;
  o.threads = threads;
  return sample(m, o);
}

//! Up to `count` layers spread evenly over [0, layers): the global parameters (σ, δ, cluster
//! probability) are fitted on these only, which keeps fit() within seconds.
inline std::vector<std::size_t> spread_layers(std::size_t layers, std::size_t count) {
  std::vector<std::size_t> out;
  const std::size_t n = std::min(layers, count);
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(i * layers / n);
  return out;
}

//! The model restricted to `layers` (popularity, sampling weights and clusters).
inline synth_model select_layers(const synth_model& m, const std::vector<std::size_t>& layers) {
  synth_model out = m;
  const std::size_t E = m.experts;
  out.layers = layers.size();
  out.model_layers.clear();
  for (const auto l : layers)
    if (!m.model_layers.empty()) out.model_layers.push_back(m.model_layers[l]);
  auto pick = [&](const auto& v) {
    std::remove_cvref_t<decltype(v)> r;
    if (v.empty()) return r;
    for (auto l : layers)
      r.insert(r.end(), v.begin() + static_cast<std::ptrdiff_t>(l * E),
               v.begin() + static_cast<std::ptrdiff_t>((l + 1) * E));
    return r;
  };
  for (std::size_t d = 0; d < m.domains.size(); ++d) {
    out.domains[d].popularity = pick(m.domains[d].popularity);
    out.domains[d].sampling_weights = pick(m.domains[d].sampling_weights);
  }
  out.cluster_of = pick(m.cluster_of);
  return out;
}

//! Bisection for f(x) = target on [lo, hi], f monotone increasing (or decreasing when
//! `increasing` is false); returns the bound when the target lies outside f's range.
template <class F>
double bisect(double lo, double hi, double target, std::size_t steps, bool increasing, F&& f) {
  const double sign = increasing ? 1.0 : -1.0;
  if (sign * f(lo) >= sign * target) return lo;
  if (sign * f(hi) <= sign * target) return hi;
  for (std::size_t i = 0; i < steps; ++i) {
    const double mid = 0.5 * (lo + hi);
    (sign * f(mid) < sign * target ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}
} // namespace detail::synth

//! Fits a synthesizer model to a real trace:
//! - domains: names, request shares, empirical lengths, popularity = (count + 0.1) / Σ per layer
//!   (a small prior so an expert unseen in a short trace is rare, not impossible);
//! - co-activation clusters: per layer, average-linkage clustering of experts by co-activation
//!   lift into `clusters` groups; `cluster_probability` by bisection so that the sample's
//!   same-cluster pair share (same_cluster_pair_share) matches the real one;
//! - the mean prefill↔decode correlation (first `prefill_tokens` tokens as prefill) by bisection
//!   on `segment_sigma` when the real one is below what the domain skew alone gives (requests
//!   that wander between topics), else on `request_sigma` (requests more individual than
//!   their domain);
//! - sampling weights calibrated to the popularity (calibrate()).
//! The global parameters are searched on a sample with the real request count over 8 layers
//! spread across the model.
//!
//! Tolerances (checked on ESFT by tests/unit/test_trace_synthesizer.cpp, sample with the real
//! request count, first 32 tokens prefill): mean JS divergence between real and synthetic
//! popularity per domain and layer < 0.01 bits (measured 0.002); mean Gini of the layer loads
//! within 0.03 (0.252 vs 0.240); mean max/mean within 10 % (2.54 vs 2.33); mean prefill↔decode
//! correlation within 0.08 (0.355 vs 0.382); same-cluster pair share within 0.03 (0.340 vs 0.351);
//! mean JS between domains within 0.03; each domain's share of requests within 15 % of the trace.
//! @throws locus::invalid_input_error when the trace is empty or `clusters` exceeds the experts
inline synth_model fit(const trace& real, const fit_options& opt = {}) {
  LOCUS_REQUIRE(real.requests() > 0 && real.tokens() > 0, invalid_input_error, "synth fit: the trace is empty");
  LOCUS_REQUIRE(opt.clusters <= real.experts(), invalid_input_error, "synth fit: ", opt.clusters, " clusters for ",
                real.experts(), " experts");
  // Its first calibration samples half of them per domain: at least one token each.
  LOCUS_REQUIRE(opt.calibration_tokens >= 2, config_error, "synth fit: calibration_tokens is ", opt.calibration_tokens,
                ", expected at least 2");
  const std::size_t E = real.experts(), L = real.layers();
  synth_model m;
  m.experts = E;
  m.top_k = real.top_k();
  m.layers = L;
  m.prefill_tokens = opt.prefill_tokens;
  if (real.has_model_layers())
    for (const std::size_t id : real.model_layer_ids())
      m.model_layers.push_back(static_cast<std::uint32_t>(id));
  m.hidden_layers = static_cast<std::uint32_t>(real.hidden_layers());
  const auto marked = real.with_prefill_tokens(opt.prefill_tokens);
  const auto pop = compute_domain_popularity(marked, token_filter::all, opt.threads);
  for (std::size_t d = 0; d < pop.domains; ++d) {
    synth_domain dom;
    dom.name = real.domains()[d];
    dom.weight = static_cast<double>(pop.requests[d]);
    dom.popularity.resize(L * E);
    for (std::size_t i = 0; i < L * E; ++i)
      dom.popularity[i] = static_cast<double>(pop.counts[d * L * E + i]) + 0.1;
    detail::synth::normalise_rows(dom.popularity, L, E);
    for (const auto& q : real.request_table())
      if (q.domain == d) dom.lengths.push_back(q.length);
    // A domain with no request stays in the table (indices must match) with weight 0.
    if (dom.lengths.empty()) dom.lengths.push_back(1), dom.weight = 0.0;
    m.domains.push_back(std::move(dom));
  }
  if (opt.clusters > 1) {
    m.clusters = opt.clusters;
    m.cluster_of.resize(L * E);
    const auto co = compute_coactivation_all(marked, token_filter::all, opt.threads);
    for (std::size_t l = 0; l < L; ++l) {
      const auto c = detail::synth::cluster_by_lift(co[l], real.tokens(), opt.clusters);
      std::copy(c.begin(), c.end(), m.cluster_of.begin() + static_cast<std::ptrdiff_t>(l * E));
    }
  }
  // A clustered token draws all but one of its experts from its cluster, so that the cluster
  // probability alone spans weak to strong co-activation.
  m.cluster_take = m.top_k > 1 ? m.top_k - 1 : 1;
  const std::size_t n = real.requests();
  calibrate(m, opt.calibration_tokens / 2, std::max<std::size_t>(2, opt.calibration_rounds / 2), opt.seed, opt.threads);
  const auto layers = detail::synth::spread_layers(L, 8);
  // The real statistics over the same layers as the probes.
  trace_builder rb(E, real.top_k(), layers.size());
  rb.set_domains(real.domains());
  rb.reserve_tokens(real.tokens());
  for (const auto& q : real.request_table())
    rb.add_request(q.id, q.domain, q.length);
  for (std::size_t i = 0; i < layers.size(); ++i) {
    std::copy_n(marked.layer(layers[i]).ids(), real.tokens() * real.top_k(), rb.layer_ids(i).data());
    std::copy_n(marked.layer(layers[i]).weights(), real.tokens() * real.top_k(), rb.layer_weights(i).data());
  }
  std::copy(marked.phases().begin(), marked.phases().end(), rb.token_phases().begin());
  std::copy(marked.steps().begin(), marked.steps().end(), rb.token_steps().begin());
  const auto real_layers = rb.build();
  auto sub = detail::synth::select_layers(m, layers);
  auto probe = [&](std::uint64_t salt) { return detail::synth::probe(sub, n, opt.seed + salt, opt.threads); };
  auto cross = [&] {
    const double c = compute_prefill_decode_correlation(probe(23), opt.threads).overall_mean();
    return std::isnan(c) ? 0.0 : c;
  };
  const double target_share = m.clusters > 1 ? same_cluster_pair_share(real_layers, sub.cluster_of) : 0.0;
  const double target_cross = compute_prefill_decode_correlation(real_layers, opt.threads).overall_mean();
  auto search = [&] {
    if (m.clusters > 1)
      sub.cluster_probability = detail::synth::bisect(0.0, 1.0, target_share, opt.search_steps, true, [&](double x) {
        sub.cluster_probability = x;
        return same_cluster_pair_share(probe(11), sub.cluster_of);
      });
    // With σ = η = 0 a request's prefill and decode counts correlate only through the domain's
    // skew. Real requests that correlate less wander between topics: η (fresh noise per segment)
    // brings the correlation down; requests that correlate more are more individual: σ raises it.
    sub.request_sigma = sub.segment_sigma = sub.decode_drift = 0.0;
    if (std::isnan(target_cross)) return;
    if (cross() < target_cross) {
      sub.request_sigma = detail::synth::bisect(0.0, 3.0, target_cross, opt.search_steps, true, [&](double x) {
        sub.request_sigma = x;
        return cross();
      });
    } else {
      sub.segment_sigma = detail::synth::bisect(0.0, 4.0, target_cross, opt.search_steps, false, [&](double x) {
        sub.segment_sigma = x;
        return cross();
      });
    }
  };
  search();
  // The noise flattens the sampled loads, so calibration sharpens the weights, which raises the
  // correlation again: calibrate the probe model at the found parameters and search once more.
  calibrate(sub, opt.calibration_tokens, opt.calibration_rounds, opt.seed + 2, opt.threads);
  search();
  m.cluster_probability = sub.cluster_probability;
  m.request_sigma = sub.request_sigma;
  m.segment_sigma = sub.segment_sigma;
  m.decode_drift = sub.decode_drift;
  // σ, δ and the clusters moved the marginals: calibrate again for the final parameters.
  for (auto& d : m.domains)
    d.sampling_weights.clear();
  calibrate(m, opt.calibration_tokens, opt.calibration_rounds, opt.seed + 1, opt.threads);
  return m;
}

//! Rescales a model to another shape, e.g. the 64-expert top-6 26-layer ESFT fit to DeepSeek-V3's
//! 256 experts, top-8, 58 layers:
//! - layer l' takes source layer round(l' (L − 1) / (L' − 1));
//! - new expert e' covers the source interval [e' E / E', (e' + 1) E / E') and takes the share of
//!   popularity the overlap gives (so 64 → 256 splits each expert into 4, 256 → 64 merges 4),
//!   times a seeded log-normal jitter (σ = `jitter`) so split experts differ; rows are capped at
//!   1 / top_k' and renormalised; it inherits the cluster of the source expert at its midpoint;
//! - with `shuffle`, expert ids are permuted per layer so that split experts are not adjacent
//!   (a linear placement would otherwise see them as one block);
//! - σ, δ, cluster probability, lengths and domains carry over; cluster_take scales with top-k;
//!   sampling weights are calibrated for the new shape.
//! Each domain keeps its rank-frequency shape, so max/mean and Gini stay close to the source
//! (tested), and domains stay distinct.
//! @throws locus::config_error on an invalid target shape
inline synth_model rescale(const synth_model& src, const rescale_options& opt) {
  src.validate();
  check_synth_shape("synth rescale", opt.experts, opt.top_k, opt.layers, src.domains.size());
  LOCUS_REQUIRE(std::isfinite(opt.jitter) && opt.jitter >= 0.0 && opt.jitter <= 5.0, config_error,
                "synth rescale: jitter ", opt.jitter, " outside [0, 5]");
  LOCUS_REQUIRE(opt.calibration_rounds == 0 || opt.calibration_tokens > 0, config_error,
                "synth rescale: calibration_tokens is 0 (with ", opt.calibration_rounds, " calibration rounds)");
  const std::size_t E0 = src.experts, L0 = src.layers, E = opt.experts, L = opt.layers;
  synth_model m = src;
  m.model_layers.clear(); // another model's layers: the source's ids name none of them
  m.hidden_layers = 0;
  m.experts = E;
  m.top_k = opt.top_k;
  m.layers = L;
  m.cluster_take =
      src.cluster_take ? std::max<std::size_t>(1, (src.cluster_take * opt.top_k + src.top_k / 2) / src.top_k) : 0;
  m.cluster_take = std::min(m.cluster_take, opt.top_k);
  const auto src_layer = [&](std::size_t l) {
    return L == 1 ? std::size_t{0}
                  : static_cast<std::size_t>(std::llround(static_cast<double>(l) * static_cast<double>(L0 - 1) /
                                                          static_cast<double>(L - 1)));
  };
  // Per layer: the permutation and the jitter are shared by all domains, so that an expert hot in
  // two domains of the source stays one expert in the target.
  locus::trace::detail::splitmix64 g(detail::synth::mix(opt.seed, 0x5ca1e));
  std::vector<std::size_t> perm(E);
  std::vector<double> jit(E);
  std::vector<std::vector<std::size_t>> perms(L);
  std::vector<std::vector<double>> jits(L);
  for (std::size_t l = 0; l < L; ++l) {
    std::iota(perm.begin(), perm.end(), std::size_t{0});
    if (opt.shuffle)
      for (std::size_t i = E; i > 1; --i)
        std::swap(perm[i - 1], perm[g.below(i)]);
    for (auto& j : jit)
      j = std::exp(opt.jitter * detail::synth::normal(g));
    perms[l] = perm;
    jits[l] = jit;
  }
  for (auto& dom : m.domains) {
    std::vector<double> p(L * E, 0.0);
    for (std::size_t l = 0; l < L; ++l) {
      const double* s = src.domains[&dom - m.domains.data()].popularity.data() + src_layer(l) * E0;
      for (std::size_t e = 0; e < E; ++e) {
        // Overlap of [e E0/E, (e+1) E0/E) with each source expert [x, x+1), in source units.
        const double a = static_cast<double>(e) * static_cast<double>(E0) / static_cast<double>(E);
        const double b = static_cast<double>(e + 1) * static_cast<double>(E0) / static_cast<double>(E);
        double v = 0.0;
        for (auto x = static_cast<std::size_t>(a); x < E0 && static_cast<double>(x) < b; ++x)
          v += s[x] * (std::min(b, static_cast<double>(x + 1)) - std::max(a, static_cast<double>(x)));
        p[l * E + perms[l][e]] = v * jits[l][e];
      }
    }
    detail::synth::normalise_rows(p, L, E);
    for (std::size_t l = 0; l < L; ++l)
      detail::synth::cap_popularity({p.data() + l * E, E}, opt.top_k);
    dom.popularity = std::move(p);
    dom.sampling_weights.clear();
  }
  if (!src.cluster_of.empty()) {
    m.cluster_of.assign(L * E, 0);
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t e = 0; e < E; ++e) {
        const auto mid =
            std::min<std::size_t>(E0 - 1, static_cast<std::size_t>((static_cast<double>(e) + 0.5) *
                                                                   static_cast<double>(E0) / static_cast<double>(E)));
        m.cluster_of[l * E + perms[l][e]] = src.cluster_of[src_layer(l) * E0 + mid];
      }
  }
  calibrate(m, opt.calibration_tokens, opt.calibration_rounds, opt.seed, opt.threads);
  return m;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
