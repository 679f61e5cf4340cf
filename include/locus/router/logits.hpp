#pragma once
//! @file
//! `logits_view`: the router's input, a non-owning token-major `tokens × experts` array of fp32
//! or bfloat16 logits, host or device, with the expert count as a static or dynamic extent.

#include <concepts>
#include <cstddef>
#include <locus/core/bfloat16.hpp>
#include <locus/core/config.hpp>
#include <locus/core/extents.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {

//! Non-owning view of router logits, trivially copyable (usable as a kernel parameter).
//! @tparam Experts `locus::experts<E>` or `experts<>`
//! @tparam T       `const float` or `const locus::bfloat16` (or their non-const versions)
//! @tparam Space   where the array lives
template <class Experts = experts<>, class T = const float, memory_space Space = memory_space::host>
class logits_view : detail::extent_slot<0, Experts> {
  static_assert(extent_of<Experts, locus::detail::experts_tag>,
                "locus::router::logits_view: the first parameter must be locus::experts<E> (or experts<>)");
  static_assert(std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, bfloat16>,
                "locus::router::logits_view: logits are float or locus::bfloat16");

public:
  using experts_type = Experts;
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  static constexpr memory_space space = Space;

  //! @param data   `tokens × experts` logits, token-major
  //! @param tokens number of tokens (rows)
  //! @param e      the expert count (omit it for a static extent)
  LOCUS_HOST_DEVICE constexpr logits_view(T* data, std::size_t tokens, Experts e = Experts{})
      : detail::extent_slot<0, Experts>(e), data_(data), tokens_(tokens) {}

  LOCUS_HOST_DEVICE constexpr std::size_t tokens() const noexcept { return tokens_; }
  LOCUS_HOST_DEVICE constexpr std::size_t experts() const noexcept { return this->get().value(); }
  LOCUS_HOST_DEVICE constexpr Experts experts_extent() const noexcept { return this->get(); }
  LOCUS_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  //! The logits of token `t`.
  LOCUS_HOST_DEVICE constexpr T* row(std::size_t t) const {
    LOCUS_ASSERT(t < tokens_, "logits_view::row: token index out of range");
    return data_ + t * experts();
  }
  //! Tokens `[first, first + count)`.
  LOCUS_HOST_DEVICE constexpr logits_view subview(std::size_t first, std::size_t count) const {
    LOCUS_ASSERT(first + count <= tokens_, "logits_view::subview: range out of bounds");
    return logits_view(data_ + first * experts(), count, experts_extent());
  }

private:
  T* data_;
  std::size_t tokens_;
};

//! Logits in device memory.
template <class Experts = experts<>, class T = const float>
using device_logits_view = logits_view<Experts, T, memory_space::device>;

//! A writable view of device memory (router outputs on the GPU).
template <class TopK = top_k<>>
using device_mutable_routing_view = routing_view<TopK, expert_id, float, memory_space::device>;

} // namespace locus::inline LOCUS_ABI_NAMESPACE::router

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! A router: the tag, a name, the top-k extent it writes (`top_k_type`), its k, and a host
//! `route(logits, out, threads)` from fp32 logits of any expert count into a routing of that
//! top-k.
template <class R>
concept router_policy = policy_of<R, router_tag> &&
    requires(const R& r, const router::logits_view<experts<>, const float>& l,
             const mutable_routing_view<typename R::top_k_type>& out) {
  { R::name } -> std::convertible_to<const char*>;
  { r.top_k() } -> std::convertible_to<std::size_t>;
  r.route(l, out, 0u);
};

//! `require_router<R>::type` is `R`, or one readable error when `R` is no router.
template <class R>
struct require_router {
  static_assert(router_policy<R>, "locus: this type is not a router policy; a router declares `using policy_concept = "
                                  "locus::router_tag;`, a `top_k_type`, a `name`, `top_k()` and a host "
                                  "`route(logits_view, mutable_routing_view<top_k_type>, threads)`");
  using type = R;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
