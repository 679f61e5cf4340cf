#pragma once
//! @file
//! `router::sigmoid_grouped<groups, top_groups, K>`: DeepSeek-V3 gating — sigmoid scores, a
//! per-expert correction bias used for selection only, group-limited top-k, weights from the
//! unbiased scores normalised over the chosen experts and multiplied by a routed scaling factor.

#include <cmath>
#include <locus/core/error.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/dispatch_host.hpp>
#include <locus/router/detail/per_token.hpp>
#include <locus/router/logits.hpp>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! Grouped sigmoid top-k gating (DeepSeek-V3 `noaux_tc`).
//!
//! Per token: s_e = sigmoid(logit_e); b_e = s_e + bias_e. The experts are split into `groups`
//! equal contiguous groups; a group's score is the sum of its two largest b. The `top_groups`
//! best groups are kept (equal scores: lower group id), and the k largest b among their experts
//! are chosen (equal b: lower expert id), ordered by decreasing b. Weight j is
//! s_j / (sum of the k chosen s + 1e-20) * routed_scaling_factor, or s_j * routed_scaling_factor
//! without normalisation. The same ids come out of the host and device paths. Without a bias the
//! group score is still the top-2 sum (as Hugging Face's DeepseekV3TopkRouter computes it; vLLM's
//! grouped_topk takes the group's maximum when it is given no bias, DeepSeek-V2's rule).
//! @tparam Groups    `locus::groups<G>` or `groups<>`
//! @tparam TopGroups `locus::top_groups<T>` or `top_groups<>`
//! @tparam TopK      `locus::top_k<K>` or `top_k<>`
template <class Groups = groups<>, class TopGroups = top_groups<>, class TopK = top_k<>>
class sigmoid_grouped {
  static_assert(extent_of<Groups, locus::detail::groups_tag>,
                "locus::router::sigmoid_grouped: the first parameter must be locus::groups<G> (or groups<>)");
  static_assert(extent_of<TopGroups, locus::detail::top_groups_tag>,
                "locus::router::sigmoid_grouped: the second parameter must be locus::top_groups<T> (or top_groups<>)");
  static_assert(extent_of<TopK, locus::detail::top_k_tag>,
                "locus::router::sigmoid_grouped: the third parameter must be locus::top_k<K> (or top_k<>)");
  static_assert(!(Groups::is_static && TopGroups::is_static) || TopGroups::static_value <= Groups::static_value,
                "locus::router::sigmoid_grouped: top_groups must not exceed groups");

public:
  using policy_concept = router_tag;
  using top_k_type = TopK;
  using groups_type = Groups;
  using top_groups_type = TopGroups;
  using params_type = detail::router::sigmoid_grouped_params<Groups, TopGroups, TopK>;
  static constexpr const char* name = "sigmoid_grouped";
  static constexpr bool is_static = Groups::is_static && TopGroups::is_static && TopK::is_static;
  //! validate_experts's conditions at compile time, for a static expert count `Experts` (a layer
  //! that composes this router with static extents asserts them).
  template <std::size_t Experts>
  requires is_static struct expert_fit {
    static constexpr std::size_t per_group = Experts / Groups::static_value;
    static constexpr bool divides = Experts % Groups::static_value == 0;
    static constexpr bool two_per_group = per_group >= 2;
    static constexpr bool k_fits = TopK::static_value <= TopGroups::static_value * per_group;
  };

  //! Static groups, top_groups and k.
  //! @param bias                  per-expert selection correction (empty: none)
  //! @param routed_scaling_factor multiplies every weight (DeepSeek-V3: 2.5)
  //! @param normalize             whether the chosen sigmoid scores are normalised to sum to 1
  explicit sigmoid_grouped(std::vector<float> bias = {}, float routed_scaling_factor = 1.0f,
                           bool normalize = true) requires is_static
      : sigmoid_grouped(Groups::static_value, TopGroups::static_value, TopK::static_value, std::move(bias),
                        routed_scaling_factor, normalize) {}

  //! Run-time values; each must equal its static extent where there is one.
  //! @throws locus::config_error on top_groups > groups, a zero value, a static mismatch, or a
  //!         non-finite bias or scaling factor
  sigmoid_grouped(std::size_t groups, std::size_t top_groups, std::size_t k, std::vector<float> bias = {},
                  float routed_scaling_factor = 1.0f, bool normalize = true)
      : bias_(std::move(bias)),
        params_(Groups(groups), TopGroups(top_groups), TopK(k), nullptr, routed_scaling_factor, normalize) {
    LOCUS_REQUIRE(top_groups <= groups, config_error, "router::sigmoid_grouped: top_groups ", top_groups,
                  " exceeds groups ", groups);
    LOCUS_REQUIRE(std::isfinite(routed_scaling_factor), config_error,
                  "router::sigmoid_grouped: the routed scaling factor ", routed_scaling_factor, " is not finite");
    for (std::size_t e = 0; e < bias_.size(); ++e)
      LOCUS_REQUIRE(std::isfinite(bias_[e]), config_error, "router::sigmoid_grouped: bias of expert ", e, " is ",
                    bias_[e], ", not finite");
    params_.bias = bias_.empty() ? nullptr : bias_.data();
  }

  sigmoid_grouped(const sigmoid_grouped& o) : bias_(o.bias_), params_(o.params_) { rebind(); }
  sigmoid_grouped(sigmoid_grouped&& o) noexcept : bias_(std::move(o.bias_)), params_(o.params_) { rebind(); }
  sigmoid_grouped& operator=(sigmoid_grouped o) noexcept {
    bias_.swap(o.bias_);
    params_ = o.params_;
    rebind();
    return *this;
  }
  ~sigmoid_grouped() = default;

  std::size_t groups() const noexcept { return params_.groups(); }
  std::size_t top_groups() const noexcept { return params_.top_groups(); }
  std::size_t top_k() const noexcept { return params_.k(); }
  float routed_scaling_factor() const noexcept { return params_.scale; }
  bool normalize() const noexcept { return params_.normalize; }
  //! The correction bias (empty when none).
  const std::vector<float>& bias() const noexcept { return bias_; }
  //! Kernel parameters; `bias` points to host memory (the CUDA router substitutes its copy).
  const params_type& params() const noexcept { return params_; }

  //! Checks that the expert count suits the groups: divisible, at least two experts per group
  //! (the group score sums two), enough experts in the kept groups for k, and one bias each.
  //! @throws locus::config_error saying which condition fails
  void validate_experts(std::size_t experts) const {
    LOCUS_REQUIRE(experts % groups() == 0, config_error, "router::sigmoid_grouped: ", experts,
                  " experts do not split into ", groups(), " equal groups");
    LOCUS_REQUIRE(experts / groups() >= 2, config_error, "router::sigmoid_grouped: groups of ", experts / groups(),
                  " expert(s); the group score needs at least 2 per group");
    LOCUS_REQUIRE(top_k() <= top_groups() * (experts / groups()), config_error, "router::sigmoid_grouped: top_k ",
                  top_k(), " exceeds the ", top_groups() * (experts / groups()), " experts of the kept groups");
    LOCUS_REQUIRE(bias_.empty() || bias_.size() == experts, config_error, "router::sigmoid_grouped: ", bias_.size(),
                  " bias values for ", experts, " experts");
  }

  //! Routes `logits` into `out` on up to `threads` host threads (0: all cores).
  //! @throws locus::config_error when the expert count does not suit the groups (validate_experts)
  //! @throws locus::invalid_input_error on mismatched sizes or a non-finite logit
  template <class Experts, class T>
  void route(const logits_view<Experts, T>& logits, const mutable_routing_view<TopK>& out, unsigned threads = 0) const {
    detail::router::validate_route_arguments(name, logits, out, top_k());
    validate_experts(logits.experts());
    const Experts e = logits.experts_extent();
    const params_type p = params_;
    detail::router::route_host(name, logits, out, threads,
                               detail::router::grouped_scratch_floats(logits.experts(), groups()), groups(),
                               [&](const auto* row, expert_id* ids, float* w, float* fs, int* is) {
                                 return detail::router::sigmoid_grouped_token(p, e, row, ids, w, fs, is);
                               });
  }
  //! Routes `logits` into a new routing.
  template <class Experts, class T>
  routing<TopK> route(const logits_view<Experts, T>& logits, unsigned threads = 0) const {
    routing<TopK> r(logits.tokens(), TopK(top_k()));
    route(logits, r.view(), threads);
    return r;
  }

private:
  void rebind() noexcept { params_.bias = bias_.empty() ? nullptr : bias_.data(); }

  std::vector<float> bias_;
  params_type params_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
