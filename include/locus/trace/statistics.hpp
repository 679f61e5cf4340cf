#pragma once
//! @file
//! Statistics of an expert-activation trace, each with its formula:
//!
//! - expert load per layer and its imbalance (max/mean, coefficient of variation, Gini);
//! - per-domain popularity and the Jensen–Shannon divergence between domains, per layer;
//! - prefill↔decode correlation of expert counts, per request and layer, aggregated per layer;
//! - co-activation (experts chosen by the same token) and inter-layer transitions;
//! - request signatures (normalised expert-usage vectors) for grouping requests.
//!
//! Counting runs one layer per task through `locus::parallel_for`: layers are independent and
//! each writes only its own rows, so results never depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <locus/core/error.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/trace/trace.hpp>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

//! Which tokens a statistic counts.
enum class token_filter : std::uint8_t {
  all,     //!< every token, whatever its phase
  prefill, //!< tokens whose phase is prefill
  decode,  //!< tokens whose phase is decode
};

//! Name of a token filter ("all", "prefill", "decode").
inline const char* to_string(token_filter f) noexcept {
  switch (f) {
  case token_filter::all: return "all";
  case token_filter::prefill: return "prefill";
  case token_filter::decode: return "decode";
  }
  return "all";
}

namespace detail::trace_stats {
inline bool keep(token_filter f, phase p) noexcept {
  return f == token_filter::all || (f == token_filter::prefill && p == phase::prefill) ||
         (f == token_filter::decode && p == phase::decode);
}
//! Grain for parallel_for over layers: one layer per task is already ~tokens × k work.
inline constexpr std::size_t layer_grain = 1;
} // namespace detail::trace_stats

// ---------------------------------------------------------------------------------------------
// Load and imbalance
// ---------------------------------------------------------------------------------------------

//! Per layer, per expert load: `count(l, e)` = number of (token, choice) pairs at layer `l` whose
//! expert is `e`, over the tokens the filter keeps. Each row sums to `tokens × top_k`.
struct expert_load {
  std::size_t layers = 0;
  std::size_t experts = 0;
  std::size_t tokens = 0;            //!< tokens counted (after the filter)
  std::vector<std::uint64_t> counts; //!< layer-major `layers × experts`

  std::uint64_t count(std::size_t l, std::size_t e) const { return counts.at(l * experts + e); }
  //! The load vector of layer `l`.
  std::span<const std::uint64_t> layer(std::size_t l) const {
    LOCUS_REQUIRE(l < layers, invalid_input_error, "expert_load::layer: layer ", l, " out of range [0, ", layers, ")");
    return {counts.data() + l * experts, experts};
  }
};

//! Counts the load of every expert at every layer (see expert_load).
//! @param threads worker bound for parallel_for (0 = hardware concurrency)
inline expert_load compute_expert_load(const trace& t, token_filter filter = token_filter::all, unsigned threads = 0) {
  expert_load out;
  out.layers = t.layers();
  out.experts = t.experts();
  out.counts.assign(t.layers() * t.experts(), 0);
  const auto& ph = t.phases();
  for (auto p : ph)
    out.tokens += detail::trace_stats::keep(filter, p) ? 1 : 0;
  const std::size_t k = t.top_k(), n = t.tokens(), e_count = t.experts();
  parallel_for(t.layers(), detail::trace_stats::layer_grain, threads, [&](std::size_t b, std::size_t e, unsigned) {
    for (std::size_t l = b; l < e; ++l) {
      const trace_expert_id* ids = t.layer(l).ids();
      std::uint64_t* row = out.counts.data() + l * e_count;
      if (filter == token_filter::all) {
        // The whole layer is one contiguous block: a straight histogram, no per-token branch.
        for (std::size_t i = 0; i < n * k; ++i)
          ++row[ids[i]];
      } else {
        for (std::size_t tok = 0; tok < n; ++tok)
          if (detail::trace_stats::keep(filter, ph[tok]))
            for (std::size_t j = 0; j < k; ++j)
              ++row[ids[tok * k + j]];
      }
    }
  });
  return out;
}

//! Imbalance of one load vector x_1..x_n (n experts), mean μ = Σx/n:
//! - `max_over_mean` = max_i x_i / μ (1 = perfectly balanced, n = everything on one expert);
//! - `cv` = σ/μ with the population standard deviation σ = sqrt(Σ(x_i − μ)²/n);
//! - `gini` = Σ_i (2i − n − 1) x_(i) / (n Σx) over the loads sorted ascending x_(1) ≤ … ≤ x_(n)
//!   (0 = balanced, (n−1)/n = everything on one expert).
//! An all-zero vector (nothing counted) is reported as balanced: 1, 0, 0.
struct imbalance {
  double max_over_mean = 1.0;
  double cv = 0.0;
  double gini = 0.0;
};

//! Imbalance of a load vector (see imbalance). Works on integer or floating loads.
//! @throws locus::invalid_input_error on an empty vector or a negative or non-finite load
template <class T>
imbalance compute_imbalance(std::span<const T> load) {
  LOCUS_REQUIRE(!load.empty(), invalid_input_error, "compute_imbalance: empty load vector");
  const std::size_t n = load.size();
  std::vector<double> x(n);
  double sum = 0.0, mx = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    x[i] = static_cast<double>(load[i]);
    LOCUS_REQUIRE(std::isfinite(x[i]) && x[i] >= 0.0, invalid_input_error, "compute_imbalance: load of expert ", i,
                  " is ", x[i], ", expected a finite value >= 0");
    sum += x[i];
    mx = std::max(mx, x[i]);
  }
  imbalance out;
  if (sum <= 0.0) return out;
  const double mean = sum / static_cast<double>(n);
  double ss = 0.0;
  for (double v : x)
    ss += (v - mean) * (v - mean);
  out.max_over_mean = mx / mean;
  out.cv = std::sqrt(ss / static_cast<double>(n)) / mean;
  std::sort(x.begin(), x.end());
  double g = 0.0;
  for (std::size_t i = 0; i < n; ++i)
    g += (2.0 * static_cast<double>(i + 1) - static_cast<double>(n) - 1.0) * x[i];
  out.gini = g / (static_cast<double>(n) * sum);
  return out;
}
template <class T>
imbalance compute_imbalance(const std::vector<T>& load) {
  return compute_imbalance(std::span<const T>(load));
}

//! Imbalance of every layer of a load matrix.
inline std::vector<imbalance> layer_imbalance(const expert_load& load) {
  std::vector<imbalance> out(load.layers);
  for (std::size_t l = 0; l < load.layers; ++l)
    out[l] = compute_imbalance(load.layer(l));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Domains
// ---------------------------------------------------------------------------------------------

//! Per-domain popularity: `p(d, l, e)` = load of expert e at layer l over the tokens of domain d's
//! requests, divided by (tokens of d × top_k), so each (d, l) row is a probability distribution.
//! A domain with no tokens has an all-zero row.
struct domain_popularity {
  std::size_t domains = 0, layers = 0, experts = 0;
  std::vector<std::uint64_t> requests; //!< requests per domain
  std::vector<std::uint64_t> tokens;   //!< tokens per domain (after the filter)
  std::vector<std::uint64_t> counts;   //!< `domains × layers × experts` loads
  std::vector<double> p;               //!< same shape, normalised as above

  std::span<const double> row(std::size_t d, std::size_t l) const {
    LOCUS_REQUIRE(d < domains && l < layers, invalid_input_error, "domain_popularity::row: (domain ", d, ", layer ", l,
                  ") out of range (", domains, " domains, ", layers, " layers)");
    return {p.data() + (d * layers + l) * experts, experts};
  }
  std::span<const std::uint64_t> count_row(std::size_t d, std::size_t l) const {
    LOCUS_REQUIRE(d < domains && l < layers, invalid_input_error, "domain_popularity::count_row: (domain ", d,
                  ", layer ", l, ") out of range (", domains, " domains, ", layers, " layers)");
    return {counts.data() + (d * layers + l) * experts, experts};
  }
};

//! Counts per-domain popularity (see domain_popularity).
inline domain_popularity compute_domain_popularity(const trace& t, token_filter filter = token_filter::all,
                                                   unsigned threads = 0) {
  domain_popularity out;
  out.domains = t.domains().size();
  out.layers = t.layers();
  out.experts = t.experts();
  out.requests.assign(out.domains, 0);
  out.tokens.assign(out.domains, 0);
  out.counts.assign(out.domains * out.layers * out.experts, 0);
  out.p.assign(out.counts.size(), 0.0);
  const auto& ph = t.phases();
  // Token → domain once, so that the per-layer loops read one byte-sized column.
  std::vector<std::uint32_t> token_domain(t.tokens());
  for (const auto& q : t.request_table()) {
    ++out.requests[q.domain];
    for (std::size_t i = 0; i < q.length; ++i) {
      token_domain[q.first_token + i] = q.domain;
      out.tokens[q.domain] += detail::trace_stats::keep(filter, ph[q.first_token + i]) ? 1 : 0;
    }
  }
  const std::size_t k = t.top_k(), n = t.tokens(), E = t.experts(), L = t.layers();
  parallel_for(L, detail::trace_stats::layer_grain, threads, [&](std::size_t b, std::size_t e, unsigned) {
    for (std::size_t l = b; l < e; ++l) {
      const trace_expert_id* ids = t.layer(l).ids();
      for (std::size_t tok = 0; tok < n; ++tok) {
        if (!detail::trace_stats::keep(filter, ph[tok])) continue;
        std::uint64_t* row = out.counts.data() + (token_domain[tok] * L + l) * E;
        for (std::size_t j = 0; j < k; ++j)
          ++row[ids[tok * k + j]];
      }
      for (std::size_t d = 0; d < out.domains; ++d) {
        if (out.tokens[d] == 0) continue;
        const double norm = 1.0 / (static_cast<double>(out.tokens[d]) * static_cast<double>(k));
        for (std::size_t x = 0; x < E; ++x)
          out.p[(d * L + l) * E + x] = static_cast<double>(out.counts[(d * L + l) * E + x]) * norm;
      }
    }
  });
  return out;
}

//! Jensen–Shannon divergence in bits between distributions p and q (each normalised here to sum
//! to 1): JS = ½ KL(p‖m) + ½ KL(q‖m) with m = (p + q)/2 and KL(a‖b) = Σ a_i log2(a_i / b_i), terms
//! with a_i = 0 contributing 0. It lies in [0, 1]: 0 for equal distributions, 1 for disjoint support.
//! @throws locus::invalid_input_error on different sizes, negative or non-finite entries, or a zero sum
inline double js_divergence(std::span<const double> p, std::span<const double> q) {
  LOCUS_REQUIRE(p.size() == q.size() && !p.empty(), invalid_input_error, "js_divergence: sizes ", p.size(), " and ",
                q.size(), " differ or are zero");
  double sp = 0.0, sq = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    LOCUS_REQUIRE(std::isfinite(p[i]) && p[i] >= 0.0 && std::isfinite(q[i]) && q[i] >= 0.0, invalid_input_error,
                  "js_divergence: entry ", i, " is (", p[i], ", ", q[i], "), expected finite values >= 0");
    sp += p[i];
    sq += q[i];
  }
  LOCUS_REQUIRE(sp > 0.0 && sq > 0.0, invalid_input_error, "js_divergence: a distribution sums to 0");
  // Finite entries may sum past the largest double; then each is divided by its row's largest
  // first (an infinite sum made every share 0 and the divergence 0).
  const double up = std::isfinite(sp) ? 1.0 : *std::max_element(p.begin(), p.end());
  const double uq = std::isfinite(sq) ? 1.0 : *std::max_element(q.begin(), q.end());
  if (up != 1.0) {
    sp = 0.0;
    for (const double x : p)
      sp += x / up;
  }
  if (uq != 1.0) {
    sq = 0.0;
    for (const double x : q)
      sq += x / uq;
  }
  double js = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double a = p[i] / up / sp, b = q[i] / uq / sq, m = 0.5 * (a + b);
    if (a > 0.0) js += 0.5 * a * std::log2(a / m);
    if (b > 0.0) js += 0.5 * b * std::log2(b / m);
  }
  return std::clamp(js, 0.0, 1.0);
}

//! Jensen–Shannon divergence between every pair of domains at every layer:
//! `js(l, a, b)`, symmetric, zero on the diagonal; NaN where a domain has no tokens.
struct domain_divergence {
  std::size_t layers = 0, domains = 0;
  std::vector<double> js; //!< `layers × domains × domains`
  double at(std::size_t l, std::size_t a, std::size_t b) const { return js.at((l * domains + a) * domains + b); }
  //! Mean over domain pairs a < b with a defined value, per layer (NaN for fewer than 2 domains).
  std::vector<double> mean_per_layer() const {
    std::vector<double> out(layers, std::numeric_limits<double>::quiet_NaN());
    for (std::size_t l = 0; l < layers; ++l) {
      double s = 0.0;
      std::size_t c = 0;
      for (std::size_t a = 0; a < domains; ++a)
        for (std::size_t b = a + 1; b < domains; ++b)
          if (!std::isnan(at(l, a, b))) s += at(l, a, b), ++c;
      if (c > 0) out[l] = s / static_cast<double>(c);
    }
    return out;
  }
};

//! JS divergence between the domains' popularity rows (see js_divergence), per layer.
inline domain_divergence compute_domain_divergence(const domain_popularity& pop) {
  domain_divergence out;
  out.layers = pop.layers;
  out.domains = pop.domains;
  out.js.assign(pop.layers * pop.domains * pop.domains, 0.0);
  for (std::size_t l = 0; l < pop.layers; ++l)
    for (std::size_t a = 0; a < pop.domains; ++a)
      for (std::size_t b = a + 1; b < pop.domains; ++b) {
        const double v = (pop.tokens[a] == 0 || pop.tokens[b] == 0) ? std::numeric_limits<double>::quiet_NaN()
                                                                    : js_divergence(pop.row(a, l), pop.row(b, l));
        out.js[(l * pop.domains + a) * pop.domains + b] = v;
        out.js[(l * pop.domains + b) * pop.domains + a] = v;
      }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Prefill ↔ decode correlation
// ---------------------------------------------------------------------------------------------

//! Pearson correlation r = Σ(a_i − ā)(b_i − b̄) / sqrt(Σ(a_i − ā)² · Σ(b_i − b̄)²), in double.
//! Undefined, and returned as NaN, when either vector has zero variance (a constant vector, e.g.
//! no tokens at all): there is no linear relation to measure, and reporting 0 or 1 would bias the
//! aggregates.
//! @throws locus::invalid_input_error when the sizes differ or are zero
template <class T>
double pearson(std::span<const T> a, std::span<const T> b) {
  LOCUS_REQUIRE(a.size() == b.size() && !a.empty(), invalid_input_error, "pearson: sizes ", a.size(), " and ", b.size(),
                " differ or are zero");
  const auto n = static_cast<double>(a.size());
  double ma = 0.0, mb = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i)
    ma += static_cast<double>(a[i]), mb += static_cast<double>(b[i]);
  ma /= n;
  mb /= n;
  double sab = 0.0, saa = 0.0, sbb = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]) - ma, y = static_cast<double>(b[i]) - mb;
    sab += x * y;
    saa += x * x;
    sbb += y * y;
  }
  if (saa <= 0.0 || sbb <= 0.0) return std::numeric_limits<double>::quiet_NaN();
  return std::clamp(sab / std::sqrt(saa * sbb), -1.0, 1.0);
}

//! Prefill↔decode correlation. For request r and layer l, let a_e = number of choices of expert e
//! by r's prefill tokens at l and b_e the same over its decode tokens; `r(r, l)` = pearson(a, b)
//! over the experts e. It is NaN (undefined) when the request has no prefill or no decode token,
//! or either count vector is constant (see pearson). Per layer, `mean` and `median` aggregate the
//! defined values only, and `defined` says how many there were (NaN when none).
//! Phases come from the trace; use `trace::with_prefill_tokens(P)` to mark the first P tokens of
//! each request as prefill.
struct prefill_decode_correlation {
  std::size_t requests = 0, layers = 0;
  std::vector<double> r;            //!< request-major `requests × layers`
  std::vector<double> mean, median; //!< per layer
  std::vector<std::size_t> defined; //!< per layer
  double at(std::size_t req, std::size_t l) const { return r.at(req * layers + l); }
  //! Mean over layers of the per-layer means (layers with no defined value skipped; NaN if none).
  double overall_mean() const {
    double s = 0.0;
    std::size_t c = 0;
    for (double v : mean)
      if (!std::isnan(v)) s += v, ++c;
    return c ? s / static_cast<double>(c) : std::numeric_limits<double>::quiet_NaN();
  }
};

//! Computes the prefill↔decode correlation of every request at every layer (see above).
inline prefill_decode_correlation compute_prefill_decode_correlation(const trace& t, unsigned threads = 0) {
  prefill_decode_correlation out;
  out.requests = t.requests();
  out.layers = t.layers();
  out.r.assign(out.requests * out.layers, std::numeric_limits<double>::quiet_NaN());
  out.mean.assign(out.layers, std::numeric_limits<double>::quiet_NaN());
  out.median.assign(out.layers, std::numeric_limits<double>::quiet_NaN());
  out.defined.assign(out.layers, 0);
  const std::size_t k = t.top_k(), E = t.experts(), L = t.layers();
  const auto& ph = t.phases();
  parallel_for(L, detail::trace_stats::layer_grain, threads, [&](std::size_t b, std::size_t e, unsigned) {
    std::vector<std::uint32_t> pre(E), dec(E);
    std::vector<double> vals;
    for (std::size_t l = b; l < e; ++l) {
      const trace_expert_id* ids = t.layer(l).ids();
      for (std::size_t req = 0; req < out.requests; ++req) {
        const auto& q = t.request_table()[req];
        std::fill(pre.begin(), pre.end(), 0u);
        std::fill(dec.begin(), dec.end(), 0u);
        std::size_t np = 0, nd = 0;
        for (std::size_t i = 0; i < q.length; ++i) {
          const std::size_t tok = q.first_token + i;
          std::uint32_t* c = ph[tok] == phase::prefill  ? (++np, pre.data())
                             : ph[tok] == phase::decode ? (++nd, dec.data())
                                                        : nullptr;
          if (!c) continue;
          for (std::size_t j = 0; j < k; ++j)
            ++c[ids[tok * k + j]];
        }
        if (np == 0 || nd == 0) continue;
        out.r[req * L + l] = pearson(std::span<const std::uint32_t>(pre), std::span<const std::uint32_t>(dec));
      }
      vals.clear();
      for (std::size_t req = 0; req < out.requests; ++req)
        if (!std::isnan(out.r[req * L + l])) vals.push_back(out.r[req * L + l]);
      out.defined[l] = vals.size();
      if (vals.empty()) continue;
      out.mean[l] = std::accumulate(vals.begin(), vals.end(), 0.0) / static_cast<double>(vals.size());
      std::sort(vals.begin(), vals.end());
      const std::size_t m = vals.size() / 2;
      out.median[l] = vals.size() % 2 ? vals[m] : 0.5 * (vals[m - 1] + vals[m]);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Co-activation and transitions
// ---------------------------------------------------------------------------------------------

//! Co-activation at one layer: for experts i ≠ j, `at(i, j)` = number of tokens that chose both i
//! and j (symmetric); the diagonal `at(i, i)` = number of tokens that chose i, i.e. its load. A
//! token lists each expert at most once in a well-formed routing; if it repeats one, the repeat
//! is ignored so that counts stay "tokens", never "pairs of choices".
struct coactivation {
  std::size_t experts = 0;
  std::vector<std::uint64_t> counts; //!< `experts × experts`, row-major
  std::uint64_t at(std::size_t i, std::size_t j) const { return counts.at(i * experts + j); }
};

namespace detail::trace_stats {
//! The distinct ids of one token's k choices, in first-seen order (k ≤ max_trace_top_k).
inline std::size_t distinct(const trace_expert_id* ids, std::size_t k, trace_expert_id* out) noexcept {
  std::size_t m = 0;
  for (std::size_t j = 0; j < k; ++j) {
    bool seen = false;
    for (std::size_t x = 0; x < m; ++x)
      seen |= out[x] == ids[j];
    if (!seen) out[m++] = ids[j];
  }
  return m;
}
} // namespace detail::trace_stats

//! Co-activation matrix of layer `l` over the tokens the filter keeps.
//! @throws locus::invalid_input_error when `l` is out of range
inline coactivation compute_coactivation(const trace& t, std::size_t l, token_filter filter = token_filter::all) {
  const auto view = t.layer(l);
  coactivation out;
  const std::size_t E = t.experts(), k = t.top_k();
  out.experts = E;
  out.counts.assign(E * E, 0);
  const auto& ph = t.phases();
  trace_expert_id u[max_trace_top_k];
  for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
    if (!detail::trace_stats::keep(filter, ph[tok])) continue;
    const std::size_t m = detail::trace_stats::distinct(view.ids() + tok * k, k, u);
    for (std::size_t a = 0; a < m; ++a) {
      std::uint64_t* row = out.counts.data() + std::size_t{u[a]} * E;
      for (std::size_t b = 0; b < m; ++b)
        ++row[u[b]];
    }
  }
  return out;
}

//! Co-activation of every layer, one layer per task.
inline std::vector<coactivation> compute_coactivation_all(const trace& t, token_filter filter = token_filter::all,
                                                          unsigned threads = 0) {
  std::vector<coactivation> out(t.layers());
  parallel_for(t.layers(), detail::trace_stats::layer_grain, threads, [&](std::size_t b, std::size_t e, unsigned) {
    for (std::size_t l = b; l < e; ++l)
      out[l] = compute_coactivation(t, l, filter);
  });
  return out;
}

//! Transitions from layer l to l + 1: `at(i, j)` = number of (token, choice at l, choice at l+1)
//! triples where the token chose expert i at layer l and expert j at layer l + 1, so every token
//! adds k² (each row i sums to k × load of i at l).
struct layer_transition {
  std::size_t experts = 0;
  std::size_t from_layer = 0;        //!< l; the transition goes to l + 1
  std::vector<std::uint64_t> counts; //!< `experts × experts`, row = expert at l
  std::uint64_t at(std::size_t i, std::size_t j) const { return counts.at(i * experts + j); }
};

//! Transition counts from layer `l` to layer `l + 1`.
//! @throws locus::invalid_input_error when l + 1 is not a layer
inline layer_transition compute_transition(const trace& t, std::size_t l, token_filter filter = token_filter::all) {
  LOCUS_REQUIRE(l < t.layers() && l + 1 < t.layers(), invalid_input_error, "compute_transition: layer ", l,
                " has no next layer (the trace has ", t.layers(), ")"); // l + 1 wraps for l = 2^64 - 1
  layer_transition out;
  const std::size_t E = t.experts(), k = t.top_k();
  out.experts = E;
  out.from_layer = l;
  out.counts.assign(E * E, 0);
  const trace_expert_id* a = t.layer(l).ids();
  const trace_expert_id* b = t.layer(l + 1).ids();
  const auto& ph = t.phases();
  for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
    if (!detail::trace_stats::keep(filter, ph[tok])) continue;
    for (std::size_t x = 0; x < k; ++x) {
      std::uint64_t* row = out.counts.data() + std::size_t{a[tok * k + x]} * E;
      for (std::size_t y = 0; y < k; ++y)
        ++row[b[tok * k + y]];
    }
  }
  return out;
}

//! Transitions for every l → l + 1, one pair per task (layers − 1 entries).
inline std::vector<layer_transition> compute_transitions_all(const trace& t, token_filter filter = token_filter::all,
                                                             unsigned threads = 0) {
  if (t.layers() < 2) return {};
  std::vector<layer_transition> out(t.layers() - 1);
  parallel_for(out.size(), detail::trace_stats::layer_grain, threads, [&](std::size_t b, std::size_t e, unsigned) {
    for (std::size_t l = b; l < e; ++l)
      out[l] = compute_transition(t, l, filter);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Request signatures
// ---------------------------------------------------------------------------------------------

//! What a request signature covers.
struct signature_options {
  //! Layers to include, in this order; empty = every layer.
  std::vector<std::size_t> layers;
  //! Tokens to count: e.g. prefill to classify an arriving request by its prefill activations.
  token_filter tokens = token_filter::all;
  unsigned threads = 0; //!< parallel_for worker bound (0 = hardware concurrency)
};

//! Request signatures: for request r, the concatenation over the chosen layers l_1..l_m of
//! c_{r,l} / ‖c_{r,l}‖₂, where c_{r,l}[e] = number of choices of expert e by r's counted tokens at
//! layer l. A block whose counts are all zero (the request has no counted token) stays all zero.
//! Each row therefore has norm sqrt(m) when the request has counted tokens, and the cosine
//! similarity of two rows, divided by m, is the mean over layers of the per-layer cosines: the
//! measure a k-means on these rows groups by.
struct request_signatures {
  std::size_t requests = 0;
  std::size_t experts = 0;
  std::vector<std::size_t> layers;           //!< the layers, in block order
  std::vector<float> values;                 //!< `requests × dimension()`, row-major
  std::vector<std::uint32_t> counted_tokens; //!< per request, tokens counted

  std::size_t dimension() const noexcept { return layers.size() * experts; }
  std::span<const float> row(std::size_t r) const {
    LOCUS_REQUIRE(r < requests, invalid_input_error, "request_signatures::row: request ", r, " out of range [0, ",
                  requests, ")");
    return {values.data() + r * dimension(), dimension()};
  }
};

namespace detail::trace_stats {
inline std::vector<std::size_t> checked_layers(const ::locus::trace::trace& t, const std::vector<std::size_t>& layers,
                                               const char* who) {
  std::vector<std::size_t> out = layers;
  if (out.empty()) {
    out.resize(t.layers());
    std::iota(out.begin(), out.end(), std::size_t{0});
  }
  for (auto l : out)
    LOCUS_REQUIRE(l < t.layers(), invalid_input_error, who, ": layer ", l, " out of range [0, ", t.layers(), ")");
  return out;
}

//! Writes request r's signature into `dst` (dimension floats); returns counted tokens.
inline std::uint32_t signature_into(const ::locus::trace::trace& t, std::size_t r,
                                    const std::vector<std::size_t>& layers, token_filter filter, float* dst,
                                    std::vector<std::uint32_t>& scratch) {
  const auto& q = t.request(r);
  const std::size_t E = t.experts(), k = t.top_k();
  const auto& ph = t.phases();
  std::uint32_t counted = 0;
  for (std::size_t i = 0; i < q.length; ++i)
    counted += keep(filter, ph[q.first_token + i]) ? 1 : 0;
  scratch.resize(E);
  for (std::size_t b = 0; b < layers.size(); ++b) {
    std::fill(scratch.begin(), scratch.end(), 0u);
    const trace_expert_id* ids = t.layer(layers[b]).ids();
    for (std::size_t i = 0; i < q.length; ++i) {
      const std::size_t tok = q.first_token + i;
      if (!keep(filter, ph[tok])) continue;
      for (std::size_t j = 0; j < k; ++j)
        ++scratch[ids[tok * k + j]];
    }
    double ss = 0.0;
    for (auto c : scratch)
      ss += static_cast<double>(c) * static_cast<double>(c);
    const double inv = ss > 0.0 ? 1.0 / std::sqrt(ss) : 0.0;
    for (std::size_t x = 0; x < E; ++x)
      dst[b * E + x] = static_cast<float>(static_cast<double>(scratch[x]) * inv);
  }
  return counted;
}
} // namespace detail::trace_stats

//! Signatures of every request (see request_signatures), one request per task.
//! @throws locus::invalid_input_error on a layer out of range
inline request_signatures compute_request_signatures(const trace& t, const signature_options& opt = {}) {
  request_signatures out;
  out.requests = t.requests();
  out.experts = t.experts();
  out.layers = detail::trace_stats::checked_layers(t, opt.layers, "compute_request_signatures");
  out.values.assign(out.requests * out.dimension(), 0.0f);
  out.counted_tokens.assign(out.requests, 0);
  parallel_for(out.requests, 8, opt.threads, [&](std::size_t b, std::size_t e, unsigned) {
    std::vector<std::uint32_t> scratch;
    for (std::size_t r = b; r < e; ++r)
      out.counted_tokens[r] = detail::trace_stats::signature_into(t, r, out.layers, opt.tokens,
                                                                  out.values.data() + r * out.dimension(), scratch);
  });
  return out;
}

//! The signature of one request (same definition), e.g. for a request arriving online.
//! @throws locus::invalid_input_error on a request or layer out of range
inline std::vector<float> compute_request_signature(const trace& t, std::size_t r, const signature_options& opt = {}) {
  const auto layers = detail::trace_stats::checked_layers(t, opt.layers, "compute_request_signature");
  std::vector<float> out(layers.size() * t.experts());
  std::vector<std::uint32_t> scratch;
  detail::trace_stats::signature_into(t, r, layers, opt.tokens, out.data(), scratch);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Everything at once
// ---------------------------------------------------------------------------------------------

//! What compute_statistics computes beyond load, imbalance, domains and correlation.
struct statistics_options {
  bool coactivation = true; //!< co-activation matrices of every layer (layers × E² counters)
  bool transitions = true;  //!< transition matrices of every l → l+1 ((layers − 1) × E² counters)
  unsigned threads = 0;     //!< parallel_for worker bound (0 = hardware concurrency)
};

//! All statistics of a trace (each member documented on its type).
struct trace_statistics {
  std::size_t requests = 0, tokens = 0, layers = 0, experts = 0, top_k = 0;
  std::vector<std::string> domain_names;
  expert_load load;                          //!< all tokens
  std::vector<imbalance> layer_imbalance;    //!< of `load`, per layer
  domain_popularity popularity;              //!< per domain, all tokens
  domain_divergence divergence;              //!< JS between domains, per layer
  prefill_decode_correlation correlation;    //!< from the trace's phases
  std::vector<coactivation> coactivations;   //!< per layer (empty unless asked)
  std::vector<layer_transition> transitions; //!< per l → l+1 (empty unless asked)

  //! Mean over layers of an imbalance member, e.g. `mean_imbalance(&imbalance::gini)`.
  double mean_imbalance(double imbalance::*member) const {
    double s = 0.0;
    for (const auto& x : layer_imbalance)
      s += x.*member;
    return layer_imbalance.empty() ? 0.0 : s / static_cast<double>(layer_imbalance.size());
  }
};

//! Computes every statistic of `t`. Each pass runs its layers in parallel.
inline trace_statistics compute_statistics(const trace& t, const statistics_options& opt = {}) {
  trace_statistics s;
  s.requests = t.requests();
  s.tokens = t.tokens();
  s.layers = t.layers();
  s.experts = t.experts();
  s.top_k = t.top_k();
  s.domain_names = t.domains();
  s.popularity = compute_domain_popularity(t, token_filter::all, opt.threads);
  // The total load is the sum of the domains' loads: no second pass over the routing.
  s.load.layers = t.layers();
  s.load.experts = t.experts();
  s.load.tokens = t.tokens();
  s.load.counts.assign(t.layers() * t.experts(), 0);
  for (std::size_t d = 0; d < s.popularity.domains; ++d)
    for (std::size_t i = 0; i < s.load.counts.size(); ++i)
      s.load.counts[i] += s.popularity.counts[d * s.load.counts.size() + i];
  s.layer_imbalance = layer_imbalance(s.load);
  s.divergence = compute_domain_divergence(s.popularity);
  s.correlation = compute_prefill_decode_correlation(t, opt.threads);
  if (opt.coactivation) s.coactivations = compute_coactivation_all(t, token_filter::all, opt.threads);
  if (opt.transitions) s.transitions = compute_transitions_all(t, token_filter::all, opt.threads);
  return s;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
