#pragma once
//! @file
//! The expert-activation trace: requests × tokens × MoE layers × top-k (expert id, weight).
//!
//! Storage is columnar. Per request: id, domain, length. Per token: phase and decode step. Per
//! layer: one contiguous `tokens × top_k` block of 16-bit expert ids and one of float weights, so
//! `layer(l)` is a zero-copy `routing_view`. Tokens are numbered globally; request `r` owns the
//! contiguous range `[first_token, first_token + length)` in position order, and requests follow
//! each other without gaps. A token-layer row with top-8 costs 8 × (2 + 4) = 48 bytes, so 10^8
//! rows take 4.8 GB.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/random.hpp>
#include <locus/core/routing.hpp>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

//! Expert id as stored in a trace: 16 bits are enough for every MoE model (≤ 65,536 experts)
//! and halve the memory of a 32-bit id on 10^8-row traces.
using trace_expert_id = std::uint16_t;

//! Largest expert count a trace can hold.
inline constexpr std::size_t max_trace_experts = 65536;
//! Largest top-k a trace accepts (no model chooses more; bounds per-token scratch arrays).
inline constexpr std::size_t max_trace_top_k = 64;
//! Most MoE layers a trace accepts (models have at most a few hundred; bounds the per-layer
//! tables a corrupt count would otherwise allocate).
inline constexpr std::size_t max_trace_layers = 4096;
//! Most domains a trace's domain table accepts (domains are task families, not request tags).
inline constexpr std::size_t max_trace_domains = 65536;
//! Longest domain name a trace accepts, in bytes (the binary format's bound, so that every trace
//! built can be written and pickled).
inline constexpr std::size_t max_trace_domain_name = 4096;
//! Longest request name (a logged string `req_id`) a trace holds.
inline constexpr std::size_t max_trace_request_name = 4096;

//! The index of the first of `tokens` tokens (`k` ids each, token-major) that chooses one expert
//! twice, or `tokens` when there is none. A token's top-k are distinct experts: every reader,
//! importer, builder and planner entry enforces this one rule (docs/trace-format.md).
template <class Id>
std::size_t first_repeated_choice(const Id* ids, std::size_t tokens, std::size_t k) noexcept {
  // Branch-free over a block of tokens so that the common, clean case stays cheap.
  constexpr std::size_t block = 256;
  for (std::size_t t0 = 0; t0 < tokens; t0 += block) {
    const std::size_t t1 = std::min(tokens, t0 + block);
    unsigned bad = 0;
    for (std::size_t t = t0; t < t1; ++t) {
      const Id* p = ids + t * k;
      for (std::size_t j = 1; j < k; ++j)
        for (std::size_t i = 0; i < j; ++i)
          bad |= static_cast<unsigned>(p[i] == p[j]);
    }
    if (bad == 0) continue;
    for (std::size_t t = t0; t < t1; ++t) {
      const Id* p = ids + t * k;
      for (std::size_t j = 1; j < k; ++j)
        for (std::size_t i = 0; i < j; ++i)
          if (p[i] == p[j]) return t;
    }
  }
  return tokens;
}

//! The choice of a token's `k` ids that repeats an earlier one (k when none does).
template <class Id>
std::size_t repeated_choice(const Id* p, std::size_t k) noexcept {
  for (std::size_t j = 1; j < k; ++j)
    for (std::size_t i = 0; i < j; ++i)
      if (p[i] == p[j]) return j;
  return k;
}

//! Which forward pass produced a token's routing.
enum class phase : std::uint8_t { prefill = 0, decode = 1, unknown = 2 };

//! Name of a phase as written in files and JSON ("prefill", "decode", "unknown").
inline const char* to_string(phase p) noexcept {
  switch (p) {
  case phase::prefill: return "prefill";
  case phase::decode: return "decode";
  case phase::unknown: return "unknown";
  }
  return "unknown";
}

//! `name` as a JSON string: in double quotes, with quotes, backslashes and control characters
//! escaped (\n, \r, \t, else \u00XX; other bytes as they are).
inline std::string quoted_name(std::string_view name) {
  std::string out = "\"";
  for (const char c : name) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n' || c == '\r' || c == '\t') {
      out += '\\';
      out += c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
    } else if (static_cast<unsigned char>(c) < 0x20) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[static_cast<unsigned char>(c) >> 4];
      out += hex[static_cast<unsigned char>(c) & 15];
    } else {
      out += c;
    }
  }
  return out + '"';
}

//! How a list of names (a trace's domains in a message; what --train-domains takes) shows `name`:
//! as is, or as quoted_name where it is empty, holds a comma, a double quote, a backslash or a
//! control character, or starts or ends with a space or tab, so that the list reads back into the
//! same names.
inline std::string listed_name(std::string_view name) {
  const bool plain = !name.empty() && name.front() != ' ' && name.front() != '\t' && name.back() != ' ' &&
                     name.back() != '\t' && std::none_of(name.begin(), name.end(), [](char c) {
                       return c == ',' || c == '"' || c == '\\' || static_cast<unsigned char>(c) < 0x20;
                     });
  return plain ? std::string(name) : quoted_name(name);
}

//! One request (sequence) of a trace.
struct request_info {
  std::uint64_t id = 0;          //!< the id the source gave it (unique within a trace built by locus importers)
  std::uint32_t domain = 0;      //!< index into trace::domains()
  std::uint64_t first_token = 0; //!< global index of its first token
  std::uint32_t length = 0;      //!< number of tokens
};

class trace_builder;

//! An expert-activation trace (see the file comment for the layout). Immutable once built; build
//! one with `trace_builder`, an importer, the binary reader or the synthesizer.
class trace {
public:
  //! The routing of one layer as a read-only view, token-major `tokens() × top_k()`.
  using layer_view = locus::routing_view<locus::top_k<>, const trace_expert_id, const float>;

  trace() = default;

  std::size_t experts() const noexcept { return experts_; }
  std::size_t top_k() const noexcept { return top_k_; }
  std::size_t layers() const noexcept { return layers_; }
  std::size_t requests() const noexcept { return requests_.size(); }
  //! All tokens of all requests.
  std::size_t tokens() const noexcept { return phases_.size(); }
  //! Domain table; `request_info::domain` indexes it.
  const std::vector<std::string>& domains() const noexcept { return domains_; }

  //! Model (hidden-layer) index of traced layer `l`. Engines number every hidden layer, dense ones
  //! included, while a trace holds only the MoE layers; `l` itself when the source did not say.
  std::size_t model_layer(std::size_t l) const {
    LOCUS_REQUIRE(l < layers_, invalid_input_error, "trace::model_layer: layer ", l, " out of range [0, ", layers_,
                  ")");
    return model_layers_.empty() ? l : model_layers_[l];
  }
  //! model_layer(l) of every traced layer, ascending.
  std::vector<std::size_t> model_layer_ids() const {
    std::vector<std::size_t> out(layers_);
    for (std::size_t l = 0; l < layers_; ++l)
      out[l] = model_layer(l);
    return out;
  }
  //! True when the source gave the model layer ids (otherwise they are 0..layers-1).
  bool has_model_layers() const noexcept { return !model_layers_.empty(); }
  //! The model's hidden-layer count, dense layers included; 0 when the source did not say.
  std::size_t hidden_layers() const noexcept { return hidden_layers_; }

  //! Request `r`; its tokens are `[first_token, first_token + length)`, in position order.
  const request_info& request(std::size_t r) const {
    LOCUS_REQUIRE(r < requests_.size(), invalid_input_error, "trace::request: request ", r, " out of range [0, ",
                  requests_.size(), ")");
    return requests_[r];
  }
  const std::vector<request_info>& request_table() const noexcept { return requests_; }
  //! True when the source named its requests by strings (a route JSONL whose `req_id`s are
  //! strings, e.g. vLLM's "cmpl-..."): request_info::id then numbers them in order of first
  //! appearance and request_name gives the logged string.
  bool has_request_names() const noexcept { return !request_names_.empty(); }
  //! The logged name of request `r`; empty when the trace has none.
  const std::string& request_name(std::size_t r) const {
    static const std::string none;
    (void)request(r); // the range check
    return request_names_.empty() ? none : request_names_[r];
  }
  //! How files name request `r`: its logged name when the trace has names, else its id in decimal.
  std::string request_key(std::size_t r) const {
    return request_names_.empty() ? std::to_string(request(r).id) : request_name(r);
  }
  //! How messages name the request of `key` (a request_key): a name in quotes, an id as it is.
  std::string key_label(const std::string& key) const { return request_names_.empty() ? key : quoted_name(key); }
  //! How messages name request `r`: key_label of its request_key.
  std::string request_label(std::size_t r) const { return key_label(request_key(r)); }

  phase token_phase(std::size_t token) const {
    LOCUS_REQUIRE(token < tokens(), invalid_input_error, "trace::token_phase: token ", token, " out of range [0, ",
                  tokens(), ")");
    return phases_[token];
  }
  //! Decode step of a token (0 for the first decoded token), -1 when unknown or in prefill.
  std::int32_t token_step(std::size_t token) const {
    LOCUS_REQUIRE(token < tokens(), invalid_input_error, "trace::token_step: token ", token, " out of range [0, ",
                  tokens(), ")");
    return steps_[token];
  }
  const std::vector<phase>& phases() const noexcept { return phases_; }
  const std::vector<std::int32_t>& steps() const noexcept { return steps_; }

  //! All tokens of layer `l`, token-major `tokens() × top_k()`: ids and weights.
  layer_view layer(std::size_t l) const {
    LOCUS_REQUIRE(l < layers_, invalid_input_error, "trace::layer: layer ", l, " out of range [0, ", layers_, ")");
    return layer_view(ids_[l].data(), weights_[l].data(), tokens(), locus::top_k<>(top_k_));
  }
  //! The tokens of request `r` at layer `l`.
  layer_view request_layer(std::size_t r, std::size_t l) const {
    const auto& q = request(r);
    return layer(l).subview(q.first_token, q.length);
  }

  //! A copy in which the first `p` tokens of every request are prefill and the rest decode, with
  //! decode steps 0, 1, ... (for traces such as ESFT that come from one teacher-forced pass).
  trace with_prefill_tokens(std::size_t p) const {
    trace out = *this;
    for (const auto& q : requests_) {
      for (std::size_t i = 0; i < q.length; ++i) {
        const std::size_t t = q.first_token + i;
        if (i < p) {
          out.phases_[t] = phase::prefill;
          out.steps_[t] = -1;
        } else {
          out.phases_[t] = phase::decode;
          out.steps_[t] = static_cast<std::int32_t>(i - p);
        }
      }
    }
    return out;
  }

  //! The requests at `request_indices`, in that order (a request may appear twice). Domains keep
  //! their indices so that statistics of slices stay comparable.
  //! @throws locus::invalid_input_error on an index out of range
  trace select_requests(std::span<const std::size_t> request_indices) const;

  //! The index of the domain called `name`.
  //! @throws locus::config_error "<what>: the trace has no domain "<name>" (its domains: ...)" when
  //!         there is none, `what` naming where the name came from (e.g. an option)
  std::uint32_t domain_index(std::string_view name, std::string_view what) const {
    const auto it = std::find(domains_.begin(), domains_.end(), name);
    if (it == domains_.end()) {
      std::string all;
      for (const auto& d : domains_)
        all += (all.empty() ? "" : ", ") + listed_name(d);
      LOCUS_THROW(config_error, what, ": the trace has no domain ", quoted_name(name), " (its domains: ", all, ")");
    }
    return static_cast<std::uint32_t>(it - domains_.begin());
  }

  //! The requests of one domain. @throws locus::invalid_input_error when `domain` is out of range
  trace select_domain(std::uint32_t domain) const {
    LOCUS_REQUIRE(domain < domains_.size(), invalid_input_error, "trace::select_domain: domain ", domain,
                  " out of range [0, ", domains_.size(), ")");
    std::vector<std::size_t> idx;
    for (std::size_t r = 0; r < requests_.size(); ++r)
      if (requests_[r].domain == domain) idx.push_back(r);
    return select_requests(idx);
  }

  //! Tokens `[first, first + count)` of every request (clipped to its length); requests left
  //! with no token are dropped. E.g. `select_positions(0, P)` keeps the first P tokens.
  trace select_positions(std::size_t first, std::size_t count) const;

  //! The layers `[first, first + count)`. @throws locus::invalid_input_error when out of range
  trace select_layers(std::size_t first, std::size_t count) const {
    // Subtracted, not added: first + count may wrap past 2^64 - 1.
    LOCUS_REQUIRE(count > 0 && first <= layers_ && count <= layers_ - first, invalid_input_error,
                  "trace::select_layers: ", count, " layers from layer ", first, " are not inside [0, ", layers_, ")");
    trace out = *this;
    out.layers_ = count;
    out.model_layers_.resize(count);
    for (std::size_t l = 0; l < count; ++l)
      out.model_layers_[l] = static_cast<std::uint32_t>(model_layer(first + l));
    out.ids_.assign(ids_.begin() + static_cast<std::ptrdiff_t>(first),
                    ids_.begin() + static_cast<std::ptrdiff_t>(first + count));
    out.weights_.assign(weights_.begin() + static_cast<std::ptrdiff_t>(first),
                        weights_.begin() + static_cast<std::ptrdiff_t>(first + count));
    return out;
  }

  //! Bytes held by the routing arrays and token columns.
  std::size_t memory_bytes() const noexcept {
    return layers_ * tokens() * top_k_ * (sizeof(trace_expert_id) + sizeof(float)) +
           tokens() * (sizeof(phase) + sizeof(std::int32_t)) + requests_.size() * sizeof(request_info) + names_bytes();
  }

  //! Exact equality of shape, tables and every routing entry (weights compared bitwise).
  friend bool operator==(const trace& a, const trace& b) {
    if (a.experts_ != b.experts_ || a.top_k_ != b.top_k_ || a.layers_ != b.layers_ || a.domains_ != b.domains_ ||
        a.phases_ != b.phases_ || a.steps_ != b.steps_ || a.ids_ != b.ids_ ||
        a.requests_.size() != b.requests_.size() || a.model_layers_ != b.model_layers_ ||
        a.hidden_layers_ != b.hidden_layers_ || a.request_names_ != b.request_names_)
      return false;
    for (std::size_t r = 0; r < a.requests_.size(); ++r) {
      const auto &x = a.requests_[r], &y = b.requests_[r];
      if (x.id != y.id || x.domain != y.domain || x.first_token != y.first_token || x.length != y.length) return false;
    }
    for (std::size_t l = 0; l < a.layers_; ++l)
      if (a.weights_[l].size() != b.weights_[l].size() ||
          (!a.weights_[l].empty() && // memcmp must not see the null data() of an empty vector
           std::memcmp(a.weights_[l].data(), b.weights_[l].data(), a.weights_[l].size() * sizeof(float)) != 0))
        return false;
    return true;
  }

private:
  friend class trace_builder;

  std::size_t names_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : request_names_)
      n += sizeof s + s.size();
    return n;
  }

  std::size_t experts_ = 0;
  std::size_t top_k_ = 0;
  std::size_t layers_ = 0;
  std::vector<std::string> domains_;
  std::vector<request_info> requests_;
  std::vector<phase> phases_;
  std::vector<std::int32_t> steps_;
  // One block per layer rather than one array for all: a layer is still contiguous (the
  // zero-copy view needs no more), and appending a request never moves other layers.
  std::vector<std::vector<trace_expert_id>> ids_;
  std::vector<std::vector<float>> weights_;
  std::vector<std::uint32_t> model_layers_; // empty: 0..layers-1
  std::uint32_t hidden_layers_ = 0;         // 0: unknown
  std::vector<std::string> request_names_;  // empty: none; else one per request
};

//! Builds a trace request by request; importers, the binary reader, the synthesizer and tests
//! use it. `build()` validates everything (ids in range, weights finite and not negative) before
//! handing the trace over, so a `trace` always holds valid data.
class trace_builder {
public:
  //! @throws locus::invalid_input_error when a size is zero or too large
  trace_builder(std::size_t experts, std::size_t top_k, std::size_t layers) {
    LOCUS_REQUIRE(experts >= 1 && experts <= max_trace_experts, invalid_input_error, "trace: experts is ", experts,
                  ", expected 1..", max_trace_experts);
    LOCUS_REQUIRE(top_k >= 1 && top_k <= max_trace_top_k && top_k <= experts, invalid_input_error, "trace: top_k is ",
                  top_k, ", expected 1..", std::min(max_trace_top_k, experts));
    LOCUS_REQUIRE(layers >= 1 && layers <= max_trace_layers, invalid_input_error, "trace: layers is ", layers,
                  ", expected 1..", max_trace_layers);
    t_.experts_ = experts;
    t_.top_k_ = top_k;
    t_.layers_ = layers;
    t_.ids_.resize(layers);
    t_.weights_.resize(layers);
  }

  std::size_t experts() const noexcept { return t_.experts_; }
  std::size_t top_k() const noexcept { return t_.top_k_; }
  std::size_t layers() const noexcept { return t_.layers_; }
  std::size_t tokens() const noexcept { return t_.phases_.size(); }
  std::size_t requests() const noexcept { return t_.requests_.size(); }

  //! Index of domain `name`, adding it to the table when new.
  std::uint32_t domain(std::string_view name) {
    for (std::size_t d = 0; d < t_.domains_.size(); ++d)
      if (t_.domains_[d] == name) return static_cast<std::uint32_t>(d);
    LOCUS_REQUIRE(t_.domains_.size() < max_trace_domains, invalid_input_error, "trace: more than ", max_trace_domains,
                  " domains");
    t_.domains_.emplace_back(name);
    return static_cast<std::uint32_t>(t_.domains_.size() - 1);
  }
  //! Sets the model (hidden-layer) index of each traced layer and the model's hidden-layer count
  //! (0: unknown); checked by build().
  void set_model_layers(std::vector<std::uint32_t> ids, std::uint32_t hidden_layers = 0) {
    t_.model_layers_ = std::move(ids);
    t_.hidden_layers_ = hidden_layers;
  }
  //! Sets the whole domain table (before adding requests that index it).
  //! @throws locus::invalid_input_error when a name repeats or is too long, or there are too many
  void set_domains(std::vector<std::string> names) {
    LOCUS_REQUIRE(names.size() <= max_trace_domains, invalid_input_error, "trace: ", names.size(),
                  " domains, expected at most ", max_trace_domains);
    for (std::size_t d = 0; d < names.size(); ++d)
      LOCUS_REQUIRE(names[d].size() <= max_trace_domain_name, invalid_input_error, "trace: domain ", d, " name of ",
                    names[d].size(), " bytes, expected at most ", max_trace_domain_name);
    const std::size_t d = first_repeated_domain(names);
    LOCUS_REQUIRE(d == names.size(), invalid_input_error, "trace: domain ", d, " \"", names[d % names.size()],
                  "\" repeats an earlier domain name");
    t_.domains_ = std::move(names);
  }

  //! Index of the first name that repeats an earlier one, or `names.size()`.
  static std::size_t first_repeated_domain(const std::vector<std::string>& names) {
    std::vector<std::size_t> order(names.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return names[a] < names[b]; });
    std::size_t first = names.size();
    for (std::size_t i = 1; i < order.size(); ++i)
      if (names[order[i]] == names[order[i - 1]]) first = std::min(first, order[i]);
    return first;
  }

  //! Pre-allocates for `tokens` more tokens.
  void reserve_tokens(std::size_t tokens) {
    const std::size_t n = t_.phases_.size() + tokens;
    t_.phases_.reserve(n);
    t_.steps_.reserve(n);
    for (std::size_t l = 0; l < t_.layers_; ++l) {
      t_.ids_[l].reserve(n * t_.top_k_);
      t_.weights_[l].reserve(n * t_.top_k_);
      advise_huge_pages(t_.ids_[l].data(), t_.ids_[l].capacity() * sizeof(trace_expert_id));
      advise_huge_pages(t_.weights_[l].data(), t_.weights_[l].capacity() * sizeof(float));
    }
  }

  //! Appends a request of `length` tokens (ids 0, weights 0, phase unknown, step -1) and returns
  //! its index; fill it through `ids`, `weights` and `set_token`. `name`: the string the source
  //! named it by (trace::request_name); a trace names every request or none (checked by build()).
  //! @throws locus::invalid_input_error when the domain is not in the table, length is 0 or the
  //!         name is longer than max_trace_request_name
  std::size_t add_request(std::uint64_t id, std::uint32_t domain, std::size_t length, std::string_view name = {}) {
    LOCUS_REQUIRE(domain < t_.domains_.size(), invalid_input_error, "trace: request ", id, " has domain ", domain,
                  " but the domain table has ", t_.domains_.size(), " entries");
    LOCUS_REQUIRE(length >= 1 && length <= 0xffffffffu, invalid_input_error, "trace: request ", id, " has length ",
                  length, ", expected 1..2^32-1");
    LOCUS_REQUIRE(name.size() <= max_trace_request_name, invalid_input_error, "trace: request ", id, " has a name of ",
                  name.size(), " bytes, expected at most ", max_trace_request_name);
    request_info q;
    q.id = id;
    q.domain = domain;
    q.first_token = t_.phases_.size();
    q.length = static_cast<std::uint32_t>(length);
    t_.requests_.push_back(q);
    t_.request_names_.emplace_back(name);
    const std::size_t n = t_.phases_.size() + length;
    t_.phases_.resize(n, phase::unknown);
    t_.steps_.resize(n, -1);
    for (std::size_t l = 0; l < t_.layers_; ++l) {
      t_.ids_[l].resize(n * t_.top_k_);
      t_.weights_[l].resize(n * t_.top_k_);
    }
    return t_.requests_.size() - 1;
  }

  //! The `top_k` ids of global token `token` at layer `l`, writable.
  std::span<trace_expert_id> ids(std::size_t l, std::size_t token) {
    check(l, token);
    return {t_.ids_[l].data() + token * t_.top_k_, t_.top_k_};
  }
  //! The `top_k` weights of global token `token` at layer `l`, writable.
  std::span<float> weights(std::size_t l, std::size_t token) {
    check(l, token);
    return {t_.weights_[l].data() + token * t_.top_k_, t_.top_k_};
  }
  //! The whole id block of layer `l` (`tokens() × top_k()`), for bulk readers.
  std::span<trace_expert_id> layer_ids(std::size_t l) { return t_.ids_.at(l); }
  std::span<float> layer_weights(std::size_t l) { return t_.weights_.at(l); }
  std::span<phase> token_phases() { return t_.phases_; }
  std::span<std::int32_t> token_steps() { return t_.steps_; }

  void set_token(std::size_t token, phase p, std::int32_t step) {
    check(0, token);
    t_.phases_[token] = p;
    t_.steps_[token] = step;
  }

  //! Tag for build(): the caller has already checked every id, weight and phase (the binary reader
  //! does, chunk by chunk while the data is in cache), so build() need not pass over it again.
  struct already_validated_t {
    explicit already_validated_t() = default;
  };

  //! Returns the trace without re-validating it; only for callers that validated every value
  //! exactly as build() would (see already_validated_t). The builder is left empty.
  trace build(already_validated_t) {
    check_model_layers();
    check_request_names();
    trace out = std::move(t_);
    t_ = trace{};
    return out;
  }

  //! Validates and returns the trace; the builder is left empty.
  //! @throws locus::invalid_input_error naming the layer, token and choice of the first bad entry
  trace build() {
    check_model_layers();
    check_request_names();
    const std::size_t k = t_.top_k_;
    for (std::size_t l = 0; l < t_.layers_; ++l) {
      const auto& ids = t_.ids_[l];
      const auto& w = t_.weights_[l];
      if (!ids_in_range(ids.data(), ids.size(), t_.experts_) || !weights_valid(w.data(), w.size())) {
        for (std::size_t i = 0; i < ids.size(); ++i) {
          LOCUS_REQUIRE(ids[i] < t_.experts_, invalid_input_error, "trace: layer ", l, " token ", i / k, " choice ",
                        i % k, ": expert id ", ids[i], " is out of range [0, ", t_.experts_, ")");
          LOCUS_REQUIRE(weight_valid(w[i]), invalid_input_error, "trace: layer ", l, " token ", i / k, " choice ",
                        i % k, " (expert ", ids[i], "): weight ", w[i],
                        std::isfinite(w[i]) ? " is negative (a routing weight is >= 0)" : " is not finite");
        }
      }
      const std::size_t t = first_repeated_choice(ids.data(), ids.size() / k, k);
      if (t < ids.size() / k) {
        const std::size_t j = repeated_choice(ids.data() + t * k, k);
        LOCUS_THROW(invalid_input_error, "trace: layer ", l, " token ", t, " choice ", j, ": expert ", ids[t * k + j],
                    " is chosen twice (a token's top-k experts must be distinct)");
      }
    }
    for (std::size_t t = 0; t < t_.phases_.size(); ++t)
      LOCUS_REQUIRE(static_cast<std::uint8_t>(t_.phases_[t]) <= 2, invalid_input_error, "trace: token ", t,
                    " has phase ", static_cast<int>(t_.phases_[t]), ", expected 0 (prefill), 1 (decode) or 2");
    trace out = std::move(t_);
    t_ = trace{};
    return out;
  }

  //! True when every id is below `experts`; branch-free so that it vectorises on large blocks.
  static bool ids_in_range(const trace_expert_id* ids, std::size_t n, std::size_t experts) noexcept {
    trace_expert_id mx = 0;
    for (std::size_t i = 0; i < n; ++i)
      mx = std::max(mx, ids[i]);
    return n == 0 || mx < experts;
  }
  //! Whether `w` is a routing weight: finite and not below zero (-0 is zero).
  static bool weight_valid(float w) noexcept { return std::isfinite(w) && !(w < 0); }

  //! True when every weight is weight_valid, branch-free, two floats per 64-bit word. A lane is
  //! bad when its exponent is all ones (infinity, NaN: adding one to the exponent carries into the
  //! lane's sign bit) or when its sign is set and the rest is not zero (a negative number; -0 is
  //! zero: adding 0x7fffffff to the rest carries into bit 31 exactly when the rest is not zero).
  //! Neither sum carries out of its lane. Plain integer ops that GCC vectorises at -O3 (Release):
  //! 64 Mi weights in 13 ms there against 47 ms for a per-float test (28 ms at -O2; 2-core build
  //! machine, 6 December 2026), as fast as the finiteness test alone was.
  static bool weights_valid(const float* w, std::size_t n) noexcept {
    constexpr std::uint64_t exponent = 0x7f8000007f800000ull, one = 0x0080000000800000ull, sign = 0x8000000080000000ull,
                            rest = 0x7fffffff7fffffffull;
    const auto bad_lanes = [&](std::uint64_t u) { return (((u & exponent) + one) | (((u & rest) + rest) & u)) & sign; };
    std::uint64_t bad = 0;
    std::size_t i = 0;
    for (; i + 2 <= n; i += 2) {
      std::uint64_t u;
      std::memcpy(&u, w + i, sizeof u);
      bad |= bad_lanes(u);
    }
    if (i < n) {
      std::uint32_t u;
      std::memcpy(&u, w + i, sizeof u);
      bad |= bad_lanes(u); // the high lane is zero: a good weight
    }
    return bad == 0;
  }

private:
  //! Asks Linux for transparent huge pages on a large, not yet touched block. Faulting in fresh
  //! 4 KiB pages runs at about 1 GB/s and would by itself cap reading a multi-GB trace there;
  //! 2 MiB pages cut the faults 512-fold. A hint only: ignored where unsupported.
  static void advise_huge_pages([[maybe_unused]] void* p, [[maybe_unused]] std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr std::uintptr_t page = 4096;
    if (bytes < (std::size_t{8} << 20)) return;
    const auto b = (reinterpret_cast<std::uintptr_t>(p) + page - 1) & ~(page - 1);
    const auto e = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(page - 1);
    if (e > b) (void)::madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#endif
  }

  // Model layer ids: one per traced layer, ascending, below the hidden-layer count when known.
  void check_model_layers() const {
    const auto& ids = t_.model_layers_;
    if (ids.empty()) {
      LOCUS_REQUIRE(t_.hidden_layers_ == 0 || t_.layers_ <= t_.hidden_layers_, invalid_input_error,
                    "trace: ", t_.layers_, " traced layers in a model of ", t_.hidden_layers_, " hidden layers");
      return;
    }
    LOCUS_REQUIRE(ids.size() == t_.layers_, invalid_input_error, "trace: ", ids.size(), " model layer ids for ",
                  t_.layers_, " layers");
    for (std::size_t l = 0; l < ids.size(); ++l) {
      LOCUS_REQUIRE(l == 0 || ids[l] > ids[l - 1], invalid_input_error, "trace: model layer ids must ascend (layer ",
                    l - 1, " is ", ids[l - 1], ", layer ", l, " is ", ids[l], ")");
      LOCUS_REQUIRE(t_.hidden_layers_ == 0 || ids[l] < t_.hidden_layers_, invalid_input_error, "trace: layer ", l,
                    " is model layer ", ids[l], ", but the model has ", t_.hidden_layers_, " hidden layers");
    }
  }

  // Request names: every request named, or none (the table is then dropped).
  void check_request_names() {
    auto& names = t_.request_names_;
    const auto named = static_cast<std::size_t>(
        std::count_if(names.begin(), names.end(), [](const std::string& n) { return !n.empty(); }));
    if (named == 0) {
      names.clear();
      return;
    }
    if (named == names.size()) return;
    const bool first_named = !names.front().empty();
    const auto odd = static_cast<std::size_t>(
        std::find_if(names.begin(), names.end(), [&](const std::string& n) { return n.empty() == first_named; }) -
        names.begin());
    LOCUS_THROW(invalid_input_error, "trace: request ", t_.requests_[odd].id,
                first_named ? " has no name" : " has a name", " but request ", t_.requests_.front().id,
                first_named ? " has one" : " has none", "; a trace names every request or none");
  }

  void check(std::size_t l, std::size_t token) const {
    LOCUS_REQUIRE(l < t_.layers_ && token < t_.phases_.size(), invalid_input_error, "trace_builder: layer ", l,
                  " token ", token, " out of range (", t_.layers_, " layers, ", t_.phases_.size(), " tokens)");
  }

  trace t_;
};

inline trace trace::select_requests(std::span<const std::size_t> request_indices) const {
  trace_builder b(experts_, top_k_, layers_);
  b.set_domains(domains_);
  b.set_model_layers(model_layers_, hidden_layers_);
  std::size_t n = 0;
  for (auto r : request_indices)
    n += request(r).length;
  b.reserve_tokens(n);
  for (auto r : request_indices) {
    const auto& q = requests_[r];
    const std::size_t dst = b.tokens();
    b.add_request(q.id, q.domain, q.length, request_name(r));
    std::copy_n(phases_.begin() + static_cast<std::ptrdiff_t>(q.first_token), q.length,
                b.token_phases().begin() + static_cast<std::ptrdiff_t>(dst));
    std::copy_n(steps_.begin() + static_cast<std::ptrdiff_t>(q.first_token), q.length,
                b.token_steps().begin() + static_cast<std::ptrdiff_t>(dst));
    for (std::size_t l = 0; l < layers_; ++l) {
      std::copy_n(ids_[l].data() + q.first_token * top_k_, std::size_t{q.length} * top_k_,
                  b.layer_ids(l).data() + dst * top_k_);
      std::copy_n(weights_[l].data() + q.first_token * top_k_, std::size_t{q.length} * top_k_,
                  b.layer_weights(l).data() + dst * top_k_);
    }
  }
  return b.build();
}

inline trace trace::select_positions(std::size_t first, std::size_t count) const {
  trace_builder b(experts_, top_k_, layers_);
  b.set_domains(domains_);
  b.set_model_layers(model_layers_, hidden_layers_);
  for (std::size_t r = 0; r < requests_.size(); ++r) {
    const auto& q = requests_[r];
    if (first >= q.length) continue;
    const std::size_t len = std::min<std::size_t>(count, q.length - first);
    if (len == 0) continue;
    const std::size_t src = q.first_token + first;
    const std::size_t dst = b.tokens();
    b.add_request(q.id, q.domain, len, request_name(r));
    std::copy_n(phases_.begin() + static_cast<std::ptrdiff_t>(src), len,
                b.token_phases().begin() + static_cast<std::ptrdiff_t>(dst));
    std::copy_n(steps_.begin() + static_cast<std::ptrdiff_t>(src), len,
                b.token_steps().begin() + static_cast<std::ptrdiff_t>(dst));
    for (std::size_t l = 0; l < layers_; ++l) {
      std::copy_n(ids_[l].data() + src * top_k_, len * top_k_, b.layer_ids(l).data() + dst * top_k_);
      std::copy_n(weights_[l].data() + src * top_k_, len * top_k_, b.layer_weights(l).data() + dst * top_k_);
    }
  }
  return b.build();
}

namespace detail {
using locus::splitmix64; // the generator lives in core (the planner anneals with it too)
} // namespace detail

//! Deterministic train/test split by request: each request goes to the test side with
//! probability `test_fraction`, decided by a hash of (seed, request id, position), so the same
//! seed gives the same split on every platform. Both sides keep request order.
//! @return (train, test)
//! @throws locus::invalid_input_error when `test_fraction` is outside [0, 1]
inline std::pair<trace, trace> split_by_request(const trace& t, double test_fraction, std::uint64_t seed) {
  LOCUS_REQUIRE(test_fraction >= 0.0 && test_fraction <= 1.0, invalid_input_error, "split_by_request: test_fraction ",
                test_fraction, " is outside [0, 1]");
  std::vector<std::size_t> train, test;
  for (std::size_t r = 0; r < t.requests(); ++r) {
    detail::splitmix64 g(seed ^ (t.request(r).id * 0x9e3779b97f4a7c15ull) ^ (r << 1));
    g.next();
    (g.uniform() < test_fraction ? test : train).push_back(r);
  }
  return {t.select_requests(train), t.select_requests(test)};
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
