#pragma once
//! @file
//! What every expert-map planner is given: the deployment, the slot budget and the expected
//! per-layer expert load (usually counted on a training trace).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>
#include <string>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Input of a planner. Planners return one expert_map per layer.
struct plan_input {
  dynamic_topology topology{1, 1};
  std::size_t experts = 0;
  //! Physical slots per rank; `ranks × slots_per_rank - experts` slots are redundant (replicas).
  std::size_t slots_per_rank = 0;
  //! `load[layer][expert]`: expected tokens routed to the expert (any non-negative scale).
  std::vector<std::vector<double>> load;
  //! Optional `node_load[layer][node][expert]`: expected tokens routed to the expert from requests
  //! grouped onto each node (activation-aware planners need it; others ignore it).
  std::vector<std::vector<std::vector<double>>> node_load;

  std::size_t layers() const noexcept { return load.size(); }
  std::size_t ranks() const noexcept { return topology.ranks(); }
  std::size_t slots() const noexcept { return ranks() * slots_per_rank; }

  //! Checks sizes and values; says which layer or expert is wrong.
  //! @throws locus::config_error, locus::invalid_input_error
  void validate() const {
    LOCUS_REQUIRE(experts > 0, config_error, "plan_input: zero experts");
    LOCUS_REQUIRE(slots_per_rank > 0, config_error, "plan_input: zero slots per rank");
    LOCUS_REQUIRE(slots() >= experts, config_error, "plan_input: ", ranks(), " ranks × ", slots_per_rank,
                  " slots cannot host ", experts, " experts");
    LOCUS_REQUIRE(slots_per_rank <= experts, config_error, "plan_input: ", slots_per_rank, " slots per rank for ",
                  experts, " experts (a GPU holds each expert at most once)");
    LOCUS_REQUIRE(!load.empty(), config_error, "plan_input: no layers in the load table");
    for (std::size_t l = 0; l < load.size(); ++l) {
      LOCUS_REQUIRE(load[l].size() == experts, invalid_input_error, "plan_input: layer ", l, " has ", load[l].size(),
                    " load values for ", experts, " experts");
      for (std::size_t e = 0; e < experts; ++e)
        LOCUS_REQUIRE(std::isfinite(load[l][e]) && load[l][e] >= 0, invalid_input_error, "plan_input: layer ", l,
                      " expert ", e, " has load ", load[l][e], " (must be finite and non-negative)");
    }
    if (node_load.empty()) return;
    LOCUS_REQUIRE(node_load.size() == load.size(), invalid_input_error, "plan_input: node_load has ", node_load.size(),
                  " layers, load has ", load.size());
    for (std::size_t l = 0; l < node_load.size(); ++l) {
      LOCUS_REQUIRE(node_load[l].size() == topology.nodes(), invalid_input_error, "plan_input: node_load layer ", l,
                    " has ", node_load[l].size(), " nodes, the topology ", topology.nodes());
      for (std::size_t n = 0; n < node_load[l].size(); ++n) {
        LOCUS_REQUIRE(node_load[l][n].size() == experts, invalid_input_error, "plan_input: node_load layer ", l,
                      " node ", n, " has ", node_load[l][n].size(), " values for ", experts, " experts");
        for (std::size_t e = 0; e < experts; ++e)
          LOCUS_REQUIRE(std::isfinite(node_load[l][n][e]) && node_load[l][n][e] >= 0, invalid_input_error,
                        "plan_input: node_load layer ", l, " node ", n, " expert ", e, " is ", node_load[l][n][e],
                        " (must be finite and non-negative)");
      }
    }
  }
};

//! Slots per rank needed to host `experts` once plus `redundant_per_rank` replicas per rank.
//! @throws locus::config_error when `redundant_per_rank` exceeds `experts` (a rank with that many
//!         replica slots could already hold every expert; larger values are typing mistakes that
//!         would size tables far beyond memory)
inline std::size_t slots_for(std::size_t experts, std::size_t ranks, std::size_t redundant_per_rank) {
  LOCUS_REQUIRE(ranks > 0, config_error, "slots_for: zero ranks");
  // A GPU without an expert would sit idle in every MoE layer: refuse rather than plan it.
  LOCUS_REQUIRE(experts >= ranks, config_error, experts, " experts cannot give each of ", ranks,
                " GPUs (nodes × GPUs per node) one: use at most ", experts, " GPUs");
  // A GPU holds each expert at most once (a second copy on the same GPU serves nothing the first
  // does not): its slots are at most the experts.
  const std::size_t first = (experts + ranks - 1) / ranks;
  LOCUS_REQUIRE(redundant_per_rank <= experts - first, config_error, "redundant slots per rank is ", redundant_per_rank,
                ", expected at most ", experts - first, " (a GPU holds each of the ", experts,
                " experts at most once, and ", first, " slots hold its first copies)");
  return first + redundant_per_rank;
}

//! Replica slots per rank for `redundant_total` redundant experts over all ranks, as DeepSeek's EPLB
//! and vLLM count them (num_redundant_experts: the physical experts are `experts` +
//! `redundant_total`, the same number on every rank). When the ranks do not divide `experts`, the
//! slots that fill up the last copies' row count among the redundant ones (locus leaves them empty and
//! `map export` fills them).
//! @throws locus::config_error when `experts` + `redundant_total` does not split evenly over the
//!         ranks or is fewer than the slots the first copies take, naming the nearest totals that do,
//!         or exceeds every rank holding every expert once, naming the most
inline std::size_t redundant_slots_for_total(std::size_t experts, std::size_t ranks, std::size_t redundant_total) {
  LOCUS_REQUIRE(ranks > 0 && experts > 0, config_error, "redundant experts: zero ranks or experts");
  const std::size_t first = (experts + ranks - 1) / ranks;
  // The totals that fit: the empty slots of a plan without replica slots, plus whole rows of ranks,
  // up to every GPU holding every expert once (slots_for's bound).
  const std::size_t least = first * ranks - experts;
  const std::size_t most = least + (experts - std::min(first, experts)) * ranks;
  LOCUS_REQUIRE(redundant_total <= most, config_error, redundant_total, " redundant experts for ", experts,
                " experts on ", ranks, " GPUs: at most ", most, " (a GPU holds each expert at most once)");
  if (redundant_total < least || (redundant_total - least) % ranks != 0) {
    const std::size_t above =
        redundant_total < least ? least : least + (redundant_total - least + ranks - 1) / ranks * ranks;
    const std::string below = redundant_total < least
                                  ? std::string()
                                  : std::to_string(least + (redundant_total - least) / ranks * ranks) + " or ";
    LOCUS_THROW(config_error, redundant_total,
                " redundant experts: EPLB's count puts as many experts on every GPU, so ", experts,
                " experts and the redundant ones must split evenly over the ", ranks, " GPUs (nearest: ", below, above,
                ")");
  }
  return (experts + redundant_total) / ranks - first;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! An expert-map planner: the tag, a name, and `plan(plan_input)` returning one map per layer.
template <class P>
concept placement_policy = policy_of<P, placement_tag> && requires(const P& p, const placement::plan_input& in) {
  { P::name } -> std::convertible_to<const char*>;
  { p.plan(in) } -> std::same_as<std::vector<expert_map>>;
};

//! `require_placement<P>::type` is `P`, or one readable error when `P` is no placement.
template <class P>
struct require_placement {
  static_assert(placement_policy<P>, "locus: this type is not a placement policy; a placement declares `using "
                                     "policy_concept = locus::placement_tag;`, a `name` and `std::vector<expert_map> "
                                     "plan(const placement::plan_input&) const`");
  using type = P;
};

//! Plans one expert map per layer of `in` with the placement `P` built from `args`: what a
//! deployment runs before its layers exist (the layers take the maps).
//! @throws whatever `P`'s plan throws on `in` (locus::config_error, locus::invalid_input_error)
template <class P, class... Args>
std::vector<expert_map> plan_placement(const placement::plan_input& in, Args&&... args) {
  return typename require_placement<P>::type(std::forward<Args>(args)...).plan(in);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
