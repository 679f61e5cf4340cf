#pragma once
//! @file
//! How a type opts in as a policy: it declares a member tag, `using policy_concept =
//! locus::router_tag;`, which says what kind it means to be, and has the members of that kind,
//! checked by the kind's concept. `require_*<P>` turn a failed check into one readable diagnostic,
//! and `policy_set` picks a layer's policies given in any order, with defaults and a duplicate
//! check.

#include <concepts>
#include <locus/core/config.hpp>
#include <locus/core/routing.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Tag of gating policies (router logits → routing).
struct router_tag {};
//! Tag of request → rank policies (planning, outside the layer's step).
struct grouper_tag {};
//! Tag of expert-map planners (planning, outside the layer's step).
struct placement_tag {};
//! Tag of dispatch / combine exchanges.
struct transport_tag {};
//! Tag of execution backends (host, CUDA).
struct backend_tag {};
//! Tag of expert-compute policies (the FFN applied to each expert's token block).
struct expert_compute_tag {};

//! `P` declares `policy_concept` equal to `Tag`: what kind of policy it means to be. Whether it
//! has the members that kind needs is each kind's own concept (`router_policy` in
//! router/logits.hpp, `placement_policy` in placement/plan_input.hpp, `grouper_policy` in
//! grouper/grouper.hpp, `transport::transport` in transport/exchange.hpp, `backend_policy` here).
template <class P, class Tag>
concept policy_of = requires {
  typename P::policy_concept;
}
&&std::same_as<typename P::policy_concept, Tag>;

//! An execution backend: the tag, the memory space its buffers live in and a name.
template <class P>
concept backend_policy = policy_of<P, backend_tag> && requires {
  { P::space } -> std::convertible_to<memory_space>;
  { P::name } -> std::convertible_to<const char*>;
};
template <class P>
concept transport_policy = policy_of<P, transport_tag>;
template <class P>
concept expert_compute_policy = policy_of<P, expert_compute_tag>;

// The require_* checks exist for their diagnostic: a concept failure deep inside a layer's
// instantiation is pages long, a static_assert at the user's composition is one line.
template <class P>
struct require_transport {
  static_assert(transport_policy<P>, "locus: this type is not a transport policy; a transport declares "
                                     "`using policy_concept = locus::transport_tag;`");
  using type = P;
};
template <class P>
struct require_backend {
  static_assert(backend_policy<P>, "locus: this type is not a backend policy; a backend declares "
                                   "`using policy_concept = locus::backend_tag;`, `static constexpr "
                                   "locus::memory_space space` and `static constexpr const char* name`");
  using type = P;
};

namespace detail {
template <class Tag, class... Ps>
inline constexpr std::size_t count_policies = (std::size_t{0} + ... + (policy_of<Ps, Tag> ? 1 : 0));

template <class Tag, class Default, class... Ps>
struct find_policy {
  using type = Default;
};
template <class Tag, class Default, class P, class... Ps>
struct find_policy<Tag, Default, P, Ps...> {
  using type = std::conditional_t<policy_of<P, Tag>, P, typename find_policy<Tag, Default, Ps...>::type>;
};

template <class P, class... Tags>
inline constexpr bool has_any_tag = (policy_of<P, Tags> || ...);
} // namespace detail

//! Policies given in any order. `policy_set<Ps...>::get<Tag, Default>` is the one policy whose tag
//! is `Tag`, or `Default` when none was given. Giving two policies of one kind, or a type that is
//! no policy of a layer's step at all, is a compile error that says so.
template <class... Ps>
struct policy_set {
  static_assert(((!policy_of<Ps, grouper_tag> && !policy_of<Ps, placement_tag>)&&...),
                "locus: groupers and placements are no layer policies; they plan before the layer exists "
                "(locus::plan_placement, placement::plan_by_name) and the layer takes the resulting expert map");
  static_assert((detail::has_any_tag<Ps, router_tag, transport_tag, backend_tag, expert_compute_tag, grouper_tag,
                                     placement_tag> &&
                 ...),
                "locus: every policy must declare `using policy_concept = <locus::router_tag, transport_tag, "
                "backend_tag or expert_compute_tag>;` (a function or lambda computing experts: wrap it in "
                "locus::layer::expert_callable)");
  static_assert(detail::count_policies<router_tag, Ps...> <= 1, "locus: a router policy is given twice");
  static_assert(detail::count_policies<transport_tag, Ps...> <= 1, "locus: a transport policy is given twice");
  static_assert(detail::count_policies<backend_tag, Ps...> <= 1, "locus: a backend policy is given twice");
  static_assert(detail::count_policies<expert_compute_tag, Ps...> <= 1,
                "locus: an expert-compute policy is given twice");

  template <class Tag, class Default>
  using get = typename detail::find_policy<Tag, Default, Ps...>::type;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
