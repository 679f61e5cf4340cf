#pragma once
//! @file
//! `workload_aware`: the grouper of the published activation-aware method. Offline, it clusters
//! historical requests by their decode activation vectors (tokens sent to each expert of each
//! layer, L2-normalised) with seeded k-means and maps clusters to nodes balancing decode tokens.
//! Online, it classifies an arriving request from its prefill activations (nearest class mean in
//! prefill space: the mean of the training members' normalised prefill vectors, which is the
//! "small trained classifier" the method allows and matches what is observable at arrival) and
//! places it on the least-loaded rank with room on its cluster's node. A request whose best
//! similarity falls below what that class's own training requests reach (unseen traffic: a request
//! of a new kind may sit nearer a tight class than a loose class's members sit to theirs), or
//! whose node is full or too far above the least-loaded node, goes to the least-loaded rank
//! instead.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/cancel.hpp>
#include <locus/core/error.hpp>
#include <locus/core/topology.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/grouper/grouper.hpp>
#include <locus/grouper/kmeans.hpp>
#include <locus/trace/trace.hpp>
#include <memory>
#include <numeric>
#include <span>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

//! Options of the workload-aware model and grouper.
struct workload_aware_options {
  std::size_t clusters = 8;         //!< k of k-means (clamped to the training requests)
  std::uint64_t seed = 1;           //!< k-means seed
  std::size_t restarts = 4;         //!< k-means restarts (lowest inertia wins; at most kmeans_options::max_restarts)
  std::size_t max_iterations = 100; //!< Lloyd iterations at most
  std::size_t prefill_tokens = 32;  //!< prefill tokens used to classify, at most
  //! Layers the classifier reads, at most (evenly spaced from layer 0): the domain signal is in
  //! every layer, and reading 8 of DeepSeek-V3's 58 keeps the class means in a core's L2 cache
  //! and assign() within its budget.
  std::size_t classifier_layers = 8;
  //! A request is classified confidently when its cosine similarity to the best class mean is at
  //! least this; negative: per class, the `confidence_quantile` quantile of that class's training
  //! requests' own (leave-one-out) similarities, so that traffic unlike anything seen falls back
  //! (a class of one request takes the quantile over all training requests).
  double min_similarity = -1;
  double confidence_quantile = 0.0;
  //! Subtracted from the automatic threshold: fresh requests of a known kind score a little below
  //! the training ones even out of sample (the class means were fitted to the same population).
  double confidence_margin = 0.05;
  //! The cluster's node is used while its running requests exceed the least-loaded node's by less
  //! than this fraction of a node's capacity (requests per rank × GPUs per node); at 1 (default)
  //! only a full node sends requests elsewhere, so that bursts of one kind of traffic still land
  //! where their experts are, while per-rank capacity always holds.
  double balance_slack = 1.0;
};

//! A request classification: cluster, cosine similarity to its class mean, and whether that
//! similarity clears the confidence threshold.
struct classification {
  std::uint32_t cluster = 0;
  float similarity = 0;
  bool confident = false;
};

namespace detail::workload {

//! Adds the routing counts of tokens `[first, first + count)` of request `r` at every layer into
//! `out` (`layers × experts`, layer-major).
inline void add_counts(const trace::trace& t, std::size_t r, std::size_t first, std::size_t count, float* out,
                       std::size_t layer_stride = 1) {
  const auto& q = t.request(r);
  const std::size_t k = t.top_k(), e = t.experts();
  count = std::min<std::size_t>(count, q.length > first ? q.length - first : 0);
  for (std::size_t l = 0; l < t.layers(); l += layer_stride) {
    const auto view = t.layer(l);
    float* row = out + l * e;
    for (std::size_t i = 0; i < count; ++i) {
      const auto* ids = view.token_ids(q.first_token + first + i);
      for (std::size_t j = 0; j < k; ++j)
        row[ids[j]] += 1.0f;
    }
  }
}

//! Adds the expert counts of request `r`'s tokens marked decode, from token `first` on, to `out`
//! (`layers × experts`), and returns how many there were: a later turn's prompt between decode
//! tokens is no decode, as the simulator and the planner count it.
inline std::size_t add_decode_counts(const trace::trace& t, std::size_t r, std::size_t first, float* out) {
  const auto& q = t.request(r);
  const auto phases = std::span(t.phases()).subspan(q.first_token, q.length);
  const std::size_t k = t.top_k(), e = t.experts();
  std::size_t n = 0;
  for (std::size_t i = first; i < q.length; ++i)
    n += phases[i] == trace::phase::decode;
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    float* row = out + l * e;
    for (std::size_t i = first; i < q.length; ++i) {
      if (phases[i] != trace::phase::decode) continue;
      const auto* ids = view.token_ids(q.first_token + i);
      for (std::size_t j = 0; j < k; ++j)
        row[ids[j]] += 1.0f;
    }
  }
  return n;
}

//! Tokens at the start of request `r` not marked decode.
inline std::size_t prefill_length(const trace::trace& t, std::size_t r) {
  const auto& q = t.request(r);
  std::size_t p = 0;
  while (p < q.length && t.token_phase(q.first_token + p) != trace::phase::decode)
    ++p;
  return p;
}

inline void normalize(float* v, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i)
    s += static_cast<double>(v[i]) * v[i];
  if (s <= 0) return;
  const float inv = static_cast<float>(1.0 / std::sqrt(s));
  for (std::size_t i = 0; i < n; ++i)
    v[i] *= inv;
}

} // namespace detail::workload

//! The offline half: clusters, their node, their decode usage and the prefill classifier.
class workload_model {
public:
  workload_model() = default;

  //! Fits on the requests of `train` that have both prefill and decode tokens: their decode
  //! activations are clustered, each cluster's usage summed, a prefill classifier built from the
  //! clusters' prefill means with its confidence threshold, and the clusters spread over the nodes.
  //! @throws locus::config_error when no such request exists or `clusters` is 0
  static workload_model fit(const trace::trace& train, const dynamic_topology& topo,
                            const workload_aware_options& opt = {}) {
    workload_model m = shaped(train, topo, opt);
    const std::vector<std::size_t> reqs = fit_requests(train);
    const request_features f = m.features(train, reqs);
    m.k_ = std::min(opt.clusters, reqs.size());
    const kmeans_result km = kmeans(f.decode, f.dim, {m.k_, opt.seed, opt.max_iterations, opt.restarts});
    m.labels_ = km.labels;
    m.training_requests_ = reqs;
    m.sum_cluster_usage(train);
    const std::vector<double> means = prefill_means(f, km.labels, m.k_);
    m.set_classifier(means, f.dim);
    m.set_thresholds(f, means, km, opt);
    m.cluster_node_ = balance_clusters(m.cluster_tokens_, m.nodes_);
    return m;
  }

  //! Largest-first assignment of clusters to nodes by decode tokens: each cluster, heaviest first
  //! (lower index on ties), to the node with the fewest tokens so far (lower node on ties).
  static std::vector<std::uint32_t> balance_clusters(const std::vector<double>& tokens, std::size_t nodes) {
    std::vector<std::size_t> order(tokens.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return tokens[a] > tokens[b]; });
    std::vector<double> node_tokens(nodes, 0.0);
    std::vector<std::uint32_t> out(tokens.size(), 0);
    for (const std::size_t c : order) {
      const auto n =
          static_cast<std::size_t>(std::min_element(node_tokens.begin(), node_tokens.end()) - node_tokens.begin());
      out[c] = static_cast<std::uint32_t>(n);
      node_tokens[n] += tokens[c];
    }
    return out;
  }

  std::size_t clusters() const noexcept { return k_; }
  std::size_t layers() const noexcept { return layers_; }
  std::size_t experts() const noexcept { return experts_; }
  std::size_t nodes() const noexcept { return nodes_; }
  const workload_aware_options& options() const noexcept { return opt_; }
  //! The confidence threshold over all training requests (what a class of one request uses).
  float min_similarity() const noexcept { return min_similarity_; }
  //! The confidence threshold of cluster `c`: a request classified into `c` is confident when its
  //! similarity reaches it.
  float class_min_similarity(std::size_t c) const noexcept { return class_min_similarity_[c]; }
  //! The classifier reads layers 0, stride, 2·stride, ...
  std::size_t classifier_layer_stride() const noexcept { return layer_stride_; }

  //! Node of each cluster.
  const std::vector<std::uint32_t>& cluster_node() const noexcept { return cluster_node_; }
  //! Replaces the cluster → node map (a joint planner refines it).
  //! @throws locus::invalid_input_error on a wrong size or a node out of range
  void set_cluster_node(std::vector<std::uint32_t> map) {
    LOCUS_REQUIRE(map.size() == k_, invalid_input_error, "workload_model: ", map.size(), " cluster nodes for ", k_,
                  " clusters");
    for (std::size_t c = 0; c < k_; ++c)
      LOCUS_REQUIRE(map[c] < nodes_, invalid_input_error, "workload_model: cluster ", c, " mapped to node ", map[c],
                    " of ", nodes_);
    cluster_node_ = std::move(map);
  }
  //! Decode tokens of the training requests of cluster `c`.
  double cluster_tokens(std::size_t c) const { return cluster_tokens_.at(c); }
  //! Training requests of cluster `c`.
  double cluster_requests(std::size_t c) const { return cluster_requests_.at(c); }
  //! Decode (token, expert) pairs of cluster `c`, `layers × experts` layer-major.
  const std::vector<double>& cluster_usage(std::size_t c) const { return usage_.at(c); }
  //! Training requests used (indices into the training trace) and their clusters.
  const std::vector<std::size_t>& training_requests() const noexcept { return training_requests_; }
  const std::vector<std::uint32_t>& training_labels() const noexcept { return labels_; }

  //! `[layer][node][expert]`: decode (token, expert) pairs of the clusters mapped to each node —
  //! the usage U of the published placement.
  std::vector<std::vector<std::vector<double>>> node_load() const {
    std::vector<std::vector<std::vector<double>>> out(
        layers_, std::vector<std::vector<double>>(nodes_, std::vector<double>(experts_, 0.0)));
    for (std::size_t c = 0; c < k_; ++c)
      for (std::size_t l = 0; l < layers_; ++l)
        for (std::size_t e = 0; e < experts_; ++e)
          out[l][cluster_node_[c]][e] += usage_[c][l * experts_ + e];
    return out;
  }

  //! Classifies request `r` of `t` from its first `min(prefill_tokens, options().prefill_tokens)`
  //! tokens. `scratch` is reused between calls (all zero between calls; resized as needed); it is
  //! all the state a call writes, so threads with scratch of their own may classify on one model.
  //! @throws locus::invalid_input_error when the trace's shape differs from the model's
  classification classify(const trace::trace& t, std::size_t r, std::size_t prefill_tokens,
                          std::vector<std::uint32_t>& scratch) const {
    LOCUS_REQUIRE(t.layers() == layers_ && t.experts() == experts_, invalid_input_error,
                  "workload_aware: the trace has ", t.layers(), " layers × ", t.experts(),
                  " experts; the model was fitted on ", layers_, " × ", experts_);
    const auto& q = t.request(r);
    const std::size_t n = std::min({prefill_tokens, opt_.prefill_tokens, static_cast<std::size_t>(q.length)});
    const std::size_t k = k_, tk = t.top_k();
    // Per-feature counts, then the list of the layer's distinct features (zeroed again below).
    const std::size_t table = layers_ * experts_;
    scratch.resize(std::max(scratch.size(), table + n * tk));
    std::uint32_t* const distinct_list = scratch.data() + table;
    float scores_fixed[max_clusters_fast] = {};
    std::vector<float> wide;
    float* s = scores_fixed;
    if (k > max_clusters_fast) {
      wide.assign(k, 0.0f);
      s = wide.data();
    }
    std::uint64_t norm2 = 0;
    for (std::size_t l = 0; l < layers_; l += layer_stride_) {
      // Histogram of the layer's prefill choices: the score is Σ count × class-mean row, and a
      // handful of popular experts take most choices, so rows are read once per distinct expert.
      const auto view = t.layer(l);
      const std::size_t base = l * experts_;
      std::size_t distinct = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const auto* ids = view.token_ids(q.first_token + i);
        for (std::size_t j = 0; j < tk; ++j) {
          const std::size_t f = base + ids[j];
          if (scratch[f]++ == 0) distinct_list[distinct++] = static_cast<std::uint32_t>(f);
        }
      }
      // Clusters in blocks of 16 accumulated in a local array (registers, no aliasing with the
      // means), then added to the scores.
      for (std::size_t c0 = 0; c0 < k; c0 += 16) {
        float acc[16] = {};
        accumulate16(distinct_list, distinct, scratch.data(), c0, acc);
        for (std::size_t c = 0; c < std::min<std::size_t>(16, k - c0); ++c)
          s[c0 + c] += acc[c];
      }
      for (std::size_t d = 0; d < distinct; ++d) {
        const std::uint64_t cnt = scratch[distinct_list[d]];
        norm2 += cnt * cnt;
        scratch[distinct_list[d]] = 0;
      }
    }
    std::fill_n(distinct_list, n * tk, 0u);
    classification out;
    std::size_t best = 0;
    for (std::size_t c = 1; c < k; ++c)
      if (s[c] > s[best]) best = c;
    out.cluster = static_cast<std::uint32_t>(best);
    out.similarity = norm2 ? s[best] / std::sqrt(static_cast<float>(norm2)) : 0.0f;
    out.confident = norm2 > 0 && out.similarity >= class_min_similarity_[best];
    return out;
  }

private:
  // The fit's named steps, in the order fit() runs them.

  // Normalised activation vectors (`layers × experts` each) of the fitted requests, request-major:
  // all decode tokens, and the first `prefill_tokens` prefill tokens on the classifier's layers.
  struct request_features {
    std::size_t dim = 0;
    std::vector<float> decode, prefill;
  };

  // An empty model with the trace's and the topology's shape and the validated options.
  static workload_model shaped(const trace::trace& train, const dynamic_topology& topo,
                               const workload_aware_options& opt) {
    LOCUS_REQUIRE(opt.clusters >= 1, config_error, "workload_aware: clusters must be at least 1");
    LOCUS_REQUIRE(opt.prefill_tokens >= 1, config_error, "workload_aware: prefill_tokens must be at least 1");
    workload_model m;
    m.layers_ = train.layers();
    m.experts_ = train.experts();
    m.nodes_ = topo.nodes();
    m.opt_ = opt;
    LOCUS_REQUIRE(opt.classifier_layers >= 1, config_error, "workload_aware: classifier_layers must be at least 1");
    // NaN passes every comparison: a NaN quantile indexed the similarities with a cast NaN, a NaN
    // margin or threshold made no request confident and a NaN slack never balanced.
    LOCUS_REQUIRE(!std::isnan(opt.min_similarity) && !std::isnan(opt.confidence_quantile) &&
                      std::isfinite(opt.confidence_margin),
                  config_error, "workload_aware: min_similarity (", opt.min_similarity, "), confidence_quantile (",
                  opt.confidence_quantile, ") and confidence_margin (", opt.confidence_margin, ") must be numbers");
    LOCUS_REQUIRE(opt.confidence_quantile >= 0 && opt.confidence_quantile <= 1, config_error,
                  "workload_aware: confidence_quantile is ", opt.confidence_quantile,
                  ", expected a number from 0 to 1");
    LOCUS_REQUIRE(opt.balance_slack >= 0, config_error, "workload_aware: balance_slack is ", opt.balance_slack,
                  ", expected a number >= 0");
    // More classifier layers than the trace has is every layer (SIZE_MAX once wrapped the sum below
    // to a stride of 0, and the fit looped for ever).
    const std::size_t used = std::min(opt.classifier_layers, m.layers_);
    m.layer_stride_ = (m.layers_ + used - 1) / used;
    return m;
  }

  // The requests with both prefill and decode tokens.
  static std::vector<std::size_t> fit_requests(const trace::trace& train) {
    std::vector<std::size_t> reqs;
    for (std::size_t r = 0; r < train.requests(); ++r) {
      const std::size_t p = detail::workload::prefill_length(train, r);
      if (p > 0 && p < train.request(r).length) reqs.push_back(r);
    }
    LOCUS_REQUIRE(!reqs.empty(), config_error,
                  "workload_aware: the training trace has no request with both prefill and "
                  "decode tokens (mark each request's prefill: trace::with_prefill_tokens; --prefill-tokens in the "
                  "locus tool)");
    return reqs;
  }

  request_features features(const trace::trace& train, const std::vector<std::size_t>& reqs) const {
    request_features f;
    f.dim = layers_ * experts_;
    const std::size_t n = reqs.size(), dim = f.dim;
    f.decode.assign(n * dim, 0.0f);
    f.prefill.assign(n * dim, 0.0f);
    for (std::size_t i = 0; i < n; ++i) {
      if (i % 256 == 0) throw_if_cancelled();
      const std::size_t r = reqs[i], p = detail::workload::prefill_length(train, r);
      detail::workload::add_decode_counts(train, r, p, f.decode.data() + i * dim);
      detail::workload::add_counts(train, r, 0, std::min(p, opt_.prefill_tokens), f.prefill.data() + i * dim,
                                   layer_stride_);
    }
    for (std::size_t i = 0; i < n; ++i) {
      detail::workload::normalize(f.decode.data() + i * dim, dim);
      detail::workload::normalize(f.prefill.data() + i * dim, dim);
    }
    return f;
  }

  // Each cluster's decode (token, expert) pairs, tokens and requests, in tokens (not normalised).
  void sum_cluster_usage(const trace::trace& train) {
    const std::size_t dim = layers_ * experts_;
    usage_.assign(k_, std::vector<double>(dim, 0.0));
    cluster_tokens_.assign(k_, 0.0);
    cluster_requests_.assign(k_, 0.0);
    std::vector<float> counts(dim);
    for (std::size_t i = 0; i < training_requests_.size(); ++i) {
      const std::size_t r = training_requests_[i], p = detail::workload::prefill_length(train, r);
      std::fill(counts.begin(), counts.end(), 0.0f);
      const std::size_t decode = detail::workload::add_decode_counts(train, r, p, counts.data());
      auto& u = usage_[labels_[i]];
      for (std::size_t f = 0; f < dim; ++f)
        u[f] += counts[f];
      cluster_tokens_[labels_[i]] += static_cast<double>(decode);
      cluster_requests_[labels_[i]] += 1.0;
    }
  }

  // Sum of the normalised prefill vectors of each cluster's members, `k × dim`.
  static std::vector<double> prefill_means(const request_features& f, const std::vector<std::uint32_t>& labels,
                                           std::size_t k) {
    std::vector<double> means(k * f.dim, 0.0);
    for (std::size_t i = 0; i < labels.size(); ++i)
      for (std::size_t d = 0; d < f.dim; ++d)
        means[labels[i] * f.dim + d] += f.prefill[i * f.dim + d];
    return means;
  }

  // The classifier: class means normalised, stored feature-major for the sparse online gather.
  void set_classifier(const std::vector<double>& means, std::size_t dim) {
    stride_ = (k_ + 15) / 16 * 16;
    means_t_.assign(dim * stride_, 0.0f);
    for (std::size_t c = 0; c < k_; ++c) {
      double s = 0;
      for (std::size_t f = 0; f < dim; ++f)
        s += means[c * dim + f] * means[c * dim + f];
      const double inv = s > 0 ? 1.0 / std::sqrt(s) : 0.0;
      for (std::size_t f = 0; f < dim; ++f)
        means_t_[f * stride_ + c] = static_cast<float>(means[c * dim + f] * inv);
    }
  }

  // Confidence thresholds from the training requests' leave-one-out similarities: each member
  // against its class mean computed without it, which is what an unseen request of the same
  // population meets (a member's similarity to a mean it is part of is biased upwards). Per class:
  // a loose class's members sit far from their mean, and a pooled threshold set by them would let
  // a request of an unseen kind pass as a member of a tight class it merely resembles.
  void set_thresholds(const request_features& f, const std::vector<double>& means, const kmeans_result& km,
                      const workload_aware_options& opt) {
    const std::size_t dim = f.dim, k = means.size() / dim;
    if (opt.min_similarity >= 0) {
      min_similarity_ = static_cast<float>(opt.min_similarity);
      class_min_similarity_.assign(k, min_similarity_);
      return;
    }
    std::vector<double> sum_norm2(k, 0.0);
    for (std::size_t c = 0; c < k; ++c)
      for (std::size_t d = 0; d < dim; ++d)
        sum_norm2[c] += means[c * dim + d] * means[c * dim + d];
    std::vector<std::vector<double>> sims(k);
    std::vector<double> all;
    for (std::size_t i = 0; i < km.labels.size(); ++i) {
      const std::size_t c = km.labels[i];
      if (km.sizes[c] < 2) continue;
      double xs = 0, xx = 0;
      for (std::size_t d = 0; d < dim; ++d) {
        const double x = f.prefill[i * dim + d];
        xs += x * means[c * dim + d];
        xx += x * x;
      }
      const double v2 = sum_norm2[c] - 2 * xs + xx;
      sims[c].push_back(v2 > 0 ? (xs - xx) / std::sqrt(v2) : 0.0);
      all.push_back(sims[c].back());
    }
    const auto quantile = [&](std::vector<double>& v) {
      std::sort(v.begin(), v.end());
      const double pos = std::clamp(opt.confidence_quantile, 0.0, 1.0) * static_cast<double>(v.size() - 1);
      return static_cast<float>(v[static_cast<std::size_t>(std::floor(pos))] - opt.confidence_margin);
    };
    min_similarity_ = all.empty() ? 0.0f : quantile(all);
    class_min_similarity_.assign(k, min_similarity_);
    for (std::size_t c = 0; c < k; ++c)
      if (!sims[c].empty()) class_min_similarity_[c] = quantile(sims[c]);
  }

  friend struct workload_model_io; // saving and loading (grouper/workload_model_json.hpp)
  static constexpr std::size_t max_clusters_fast = 64;

  // acc[0..16) += count(f) × means_t_[f][c0 .. c0 + 16) over the distinct features of a layer.
  // Rows are padded to a multiple of 16 clusters so that this fixed-width loop is the only one.
  void accumulate16(const std::uint32_t* distinct_list, std::size_t distinct, const std::uint32_t* counts,
                    std::size_t c0, float* acc) const {
    float a[16] = {};
    for (std::size_t d = 0; d < distinct; ++d) {
      const std::size_t f = distinct_list[d];
      const float cnt = static_cast<float>(counts[f]);
      const float* m = means_t_.data() + f * stride_ + c0;
      for (std::size_t c = 0; c < 16; ++c)
        a[c] += cnt * m[c];
    }
    for (std::size_t c = 0; c < 16; ++c)
      acc[c] = a[c];
  }

  std::size_t layers_ = 0, experts_ = 0, nodes_ = 0, k_ = 0, layer_stride_ = 1;
  workload_aware_options opt_{};
  float min_similarity_ = 0;
  std::vector<float> class_min_similarity_; // per cluster
  std::vector<std::uint32_t> cluster_node_, labels_;
  std::vector<std::size_t> training_requests_;
  std::vector<double> cluster_tokens_, cluster_requests_;
  std::vector<std::vector<double>> usage_;
  std::size_t stride_ = 16;    // k rounded up to a multiple of 16
  std::vector<float> means_t_; // feature-major: (layer × experts) × stride_, zero-padded
};

//! The node each request of `t` runs on under the model's grouping, as a re-plan of recorded
//! traffic assumes it: a request classified with confidence (from its first `prefill_tokens`
//! tokens) on its class's node, the others over the nodes in turn, as the grouper's least-loaded
//! fallback spreads them. The grouper's balance fallbacks, which send a confident request elsewhere
//! when its node is busy, depend on the cluster's state at its arrival and are not replayed.
//! @throws locus::invalid_input_error when the trace's shape differs from the model's
inline std::vector<std::uint32_t> class_nodes(const workload_model& m, const trace::trace& t,
                                              std::size_t prefill_tokens) {
  std::vector<std::uint32_t> out(t.requests()), scratch;
  std::size_t next = 0;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto c = m.classify(t, r, prefill_tokens, scratch);
    out[r] = c.confident ? m.cluster_node()[c.cluster] : static_cast<std::uint32_t>(next++ % m.nodes());
  }
  return out;
}

//! Counters of the decisions a workload_aware grouper took.
struct workload_aware_stats {
  std::size_t placed_on_cluster_node = 0;
  std::size_t fallback_low_confidence = 0;
  std::size_t fallback_node_full = 0;
  std::size_t fallback_imbalance = 0;
};

//! The online half: see the file comment.
class workload_aware {
public:
  using policy_concept = grouper_tag;
  static constexpr const char* name = "workload_aware";

  //! @throws locus::config_error when `model` is null
  explicit workload_aware(std::shared_ptr<const workload_model> model) : model_(std::move(model)) {
    LOCUS_REQUIRE(model_ != nullptr, config_error, "workload_aware: no model (fit one with workload_model::fit)");
  }

  std::size_t assign(const arrival& a, const cluster_state& c) {
    LOCUS_REQUIRE(a.source != nullptr, invalid_input_error, "workload_aware: the arrival has no trace");
    LOCUS_REQUIRE(c.topology.nodes() == model_->nodes(), config_error, "workload_aware: the model was fitted for ",
                  model_->nodes(), " nodes; the cluster has ", c.topology.nodes());
    // Ranks are read by the topology's numbering: a shorter state table was read past its end.
    LOCUS_REQUIRE(c.ranks.size() == c.topology.ranks(), invalid_input_error, "workload_aware: the cluster state has ",
                  c.ranks.size(), " ranks but its topology ", c.topology.ranks());
    last_ = model_->classify(*a.source, a.request, a.prefill_tokens, scratch_);
    if (!last_.confident) {
      ++stats_.fallback_low_confidence;
      return fallback_.assign(a, c);
    }
    const std::size_t node = model_->cluster_node()[last_.cluster], gpus = c.topology.gpus_per_node();
    // Node loads in running requests; the least-loaded node is the balance reference.
    std::uint64_t mine = 0, least = UINT64_MAX;
    for (std::size_t n = 0; n < c.topology.nodes(); ++n) {
      std::uint64_t load = 0;
      for (std::size_t g = 0; g < gpus; ++g)
        load += c.ranks[n * gpus + g].running_requests;
      if (n == node) mine = load;
      least = std::min(least, load);
    }
    const double allowance = model_->options().balance_slack * static_cast<double>(c.capacity * gpus);
    if (static_cast<double>(mine - least) >= allowance && mine > least) {
      ++stats_.fallback_imbalance;
      return fallback_.assign(a, c);
    }
    std::size_t best = no_rank;
    for (std::size_t g = 0; g < gpus; ++g) {
      const std::size_t r = node * gpus + g;
      if (c.has_room(r) && (best == no_rank || c.ranks[r].running_tokens < c.ranks[best].running_tokens)) best = r;
    }
    if (best == no_rank) {
      ++stats_.fallback_node_full;
      return fallback_.assign(a, c);
    }
    ++stats_.placed_on_cluster_node;
    return best;
  }

  const workload_model& model() const noexcept { return *model_; }
  const workload_aware_stats& stats() const noexcept { return stats_; }
  //! The classification of the last assigned request.
  const classification& last_classification() const noexcept { return last_; }

private:
  std::shared_ptr<const workload_model> model_;
  least_loaded fallback_;
  workload_aware_stats stats_;
  classification last_;
  std::vector<std::uint32_t> scratch_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
