#pragma once
//! @file
//! Routings: for each token, its top-k (expert id, weight). Stored token-major as two
//! `tokens × k` arrays. `routing_view` is a non-owning, trivially copyable view usable in
//! kernels; `routing` owns host storage.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <locus/core/extents.hpp>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Where the memory behind a view lives. Host algorithms accept host views only, so a device
//! pointer is never dereferenced on the CPU by mistake.
enum class memory_space { host, device };

//! Expert ids are 32-bit: every MoE model in use has far fewer than 2^31 experts, and kernels
//! move half the bytes of a 64-bit id.
using expert_id = std::int32_t;

//! Where a token's routing weight multiplies: the output of its expert, y = Σ_j w_j · E_j(x)
//! (DeepSeek-V3, Qwen3, Mixtral), or its input, y = Σ_j E_j(w_j · x) (Llama 4, whose router scales
//! the hidden state before the expert). The two differ for any nonlinear expert. A router policy
//! names its model's site (`routing_weight_site`); expert_output when it names none.
enum class weight_site : std::uint8_t { expert_output, expert_input };

//! Non-owning view of a routing.
//! @tparam TopK   `locus::top_k<K>` or `top_k<>`
//! @tparam Id     expert id type, possibly const
//! @tparam Weight weight type, possibly const
//! @tparam Space  where the arrays live
template <class TopK = top_k<>, class Id = const expert_id, class Weight = const float,
          memory_space Space = memory_space::host>
class routing_view {
  static_assert(extent_of<TopK, detail::top_k_tag>, "locus::routing_view: the first parameter must be locus::top_k<K>");
  static_assert(std::is_integral_v<Id>, "locus::routing_view: expert ids must be integers");

public:
  using top_k_type = TopK;
  using id_type = Id;
  using weight_type = Weight;
  static constexpr memory_space space = Space;

  //! An empty view; with a run-time top_k the k is given (a view of no token has one too).
  routing_view() requires TopK::is_static = default;
  //! @param ids     `tokens × k` expert ids, token-major
  //! @param weights `tokens × k` weights in the same order (may be null for id-only routings)
  //! @param k       the top-k: given where it is a run-time value (`top_k<>`), implied where static
  LOCUS_HOST_DEVICE constexpr routing_view(Id* ids, Weight* weights, std::size_t tokens, TopK k)
      : ids_(ids), weights_(weights), tokens_(tokens), k_(k) {}
  LOCUS_HOST_DEVICE constexpr routing_view(Id* ids, Weight* weights, std::size_t tokens) requires TopK::is_static
      : ids_(ids),
        weights_(weights),
        tokens_(tokens) {}

  //! Views of non-const elements convert to views of const ones.
  template <class OtherId, class OtherWeight>
  requires(std::is_convertible_v<OtherId*, Id*>&& std::is_convertible_v<OtherWeight*, Weight*>) LOCUS_HOST_DEVICE
      constexpr routing_view(const routing_view<TopK, OtherId, OtherWeight, Space>& other)
      : ids_(other.ids()), weights_(other.weights()), tokens_(other.tokens()), k_(other.k_extent()) {}

  LOCUS_HOST_DEVICE constexpr std::size_t tokens() const noexcept { return tokens_; }
  LOCUS_HOST_DEVICE constexpr std::size_t top_k() const noexcept { return k_.value(); }
  LOCUS_HOST_DEVICE constexpr TopK k_extent() const noexcept { return k_; }
  LOCUS_HOST_DEVICE constexpr bool has_weights() const noexcept { return weights_ != nullptr; }
  LOCUS_HOST_DEVICE constexpr Id* ids() const noexcept { return ids_; }
  LOCUS_HOST_DEVICE constexpr Weight* weights() const noexcept { return weights_; }

  //! Expert of the `j`-th choice of token `t`.
  LOCUS_HOST_DEVICE constexpr Id& expert(std::size_t t, std::size_t j) const {
    LOCUS_ASSERT(t < tokens_ && j < top_k(), "routing_view::expert: token or choice index out of range");
    return ids_[t * top_k() + j];
  }
  //! Weight of the `j`-th choice of token `t`.
  LOCUS_HOST_DEVICE constexpr Weight& weight(std::size_t t, std::size_t j) const {
    LOCUS_ASSERT(t < tokens_ && j < top_k(), "routing_view::weight: token or choice index out of range");
    LOCUS_ASSERT(weights_ != nullptr, "routing_view::weight: the routing carries no weights");
    return weights_[t * top_k() + j];
  }
  //! The `k` expert ids of token `t`.
  LOCUS_HOST_DEVICE constexpr Id* token_ids(std::size_t t) const {
    LOCUS_ASSERT(t < tokens_, "routing_view::token_ids: token index out of range");
    return ids_ + t * top_k();
  }
  //! The `k` weights of token `t`.
  LOCUS_HOST_DEVICE constexpr Weight* token_weights(std::size_t t) const {
    LOCUS_ASSERT(t < tokens_ && weights_ != nullptr, "routing_view::token_weights: token out of range or no weights");
    return weights_ + t * top_k();
  }
  //! Tokens `[first, first + count)` as a view.
  LOCUS_HOST_DEVICE constexpr routing_view subview(std::size_t first, std::size_t count) const {
    LOCUS_ASSERT(first + count <= tokens_, "routing_view::subview: range out of bounds");
    return routing_view(ids_ + first * top_k(), weights_ ? weights_ + first * top_k() : nullptr, count, k_);
  }

private:
  Id* ids_ = nullptr;
  Weight* weights_ = nullptr;
  std::size_t tokens_ = 0;
  [[no_unique_address]] TopK k_{};
};

//! A writable host view (router outputs).
template <class TopK = top_k<>>
using mutable_routing_view = routing_view<TopK, expert_id, float, memory_space::host>;
//! A read-only view of device memory.
template <class TopK = top_k<>>
using device_routing_view = routing_view<TopK, const expert_id, const float, memory_space::device>;

//! Owning host routing.
template <class TopK = top_k<>>
class routing {
public:
  //! No token; with a run-time top_k (`top_k<>`) the constructors below take k.
  routing() requires TopK::is_static = default;
  //! `tokens` tokens, ids set to 0 and weights to 0 (k: given where it is a run-time value).
  //! @throws locus::invalid_input_error when `tokens × k` does not fit a size_t
  explicit routing(std::size_t tokens, TopK k)
      : ids_(checked_copies(tokens, k.value())), weights_(ids_.size()), tokens_(tokens), k_(k) {}
  explicit routing(std::size_t tokens) requires TopK::is_static : routing(tokens, TopK{}) {}
  //! Takes ownership of token-major arrays. @throws locus::invalid_input_error on a size mismatch
  routing(std::vector<expert_id> ids, std::vector<float> weights, TopK k)
      : ids_(std::move(ids)), weights_(std::move(weights)), tokens_(ids_.size() / k.value()), k_(k) {
    LOCUS_REQUIRE(ids_.size() % k.value() == 0, invalid_input_error, "routing: ", ids_.size(),
                  " ids is not a multiple of top_k ", k.value());
    LOCUS_REQUIRE(weights_.size() == ids_.size(), invalid_input_error, "routing: ", ids_.size(), " ids but ",
                  weights_.size(), " weights");
  }
  routing(std::vector<expert_id> ids, std::vector<float> weights) requires TopK::is_static
      : routing(std::move(ids), std::move(weights), TopK{}) {}

  std::size_t tokens() const noexcept { return tokens_; }
  std::size_t top_k() const noexcept { return k_.value(); }
  routing_view<TopK, expert_id, float> view() noexcept { return {ids_.data(), weights_.data(), tokens_, k_}; }
  routing_view<TopK> view() const noexcept { return {ids_.data(), weights_.data(), tokens_, k_}; }
  std::vector<expert_id>& ids() noexcept { return ids_; }
  std::vector<float>& weights() noexcept { return weights_; }
  const std::vector<expert_id>& ids() const noexcept { return ids_; }
  const std::vector<float>& weights() const noexcept { return weights_; }

private:
  // A product that wraps would size arrays far shorter than tokens() claims.
  static std::size_t checked_copies(std::size_t tokens, std::size_t k) {
    LOCUS_REQUIRE(tokens <= SIZE_MAX / k, invalid_input_error, "routing: ", tokens, " tokens × top_k ", k,
                  " overflow a size_t");
    return tokens * k;
  }

  std::vector<expert_id> ids_;
  std::vector<float> weights_;
  std::size_t tokens_ = 0;
  [[no_unique_address]] TopK k_{};
};

//! Checks a host routing against `experts`: every id in range, no expert twice in one token,
//! every weight finite.
//! @throws locus::invalid_input_error naming the token, the choice and the offending value, or on
//!         tokens without ids (a null ids pointer)
template <class TopK, class Id, class Weight>
void validate_routing(const routing_view<TopK, Id, Weight, memory_space::host>& r, std::size_t experts) {
  const std::size_t k = r.top_k();
  LOCUS_REQUIRE(r.tokens() == 0 || r.ids() != nullptr, invalid_input_error, "routing: ", r.tokens(),
                " tokens but the ids pointer is null");
  for (std::size_t t = 0; t < r.tokens(); ++t) {
    const auto* ids = r.token_ids(t);
    for (std::size_t j = 0; j < k; ++j) {
      const auto e = ids[j];
      if (e < 0 || static_cast<std::size_t>(e) >= experts)
        LOCUS_THROW(invalid_input_error, "token ", t, " choice ", j, ": expert id ", e, " is out of range [0, ",
                    experts, ")");
      for (std::size_t i = 0; i < j; ++i)
        if (ids[i] == e) LOCUS_THROW(invalid_input_error, "token ", t, ": expert ", e, " is chosen twice");
      if (r.has_weights() && !std::isfinite(static_cast<double>(r.weight(t, j))))
        LOCUS_THROW(invalid_input_error, "token ", t, " choice ", j, " (expert ", e, "): weight ", r.weight(t, j),
                    " is not finite");
    }
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
