#pragma once
//! @file
//! The shape of one MoE layer: routed experts, experts per token, hidden size, shared experts.

#include <cstddef>
#include <locus/core/extents.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Shape of an MoE layer. Each parameter is a static or dynamic extent of the named kind.
//! Invalid static combinations (top_k > experts) are compile errors; invalid dynamic ones throw
//! locus::config_error on construction.
//! @tparam Experts routed experts, `locus::experts<N>`
//! @tparam TopK    experts per token, `locus::top_k<N>`
//! @tparam Hidden  hidden size, `locus::hidden<N>`
//! @tparam Shared  shared experts, `locus::shared_experts<N>` (default none)
template <class Experts, class TopK, class Hidden, class Shared = shared_experts<0>>
class moe_shape : detail::extent_slot<0, Experts>,
                  detail::extent_slot<1, TopK>,
                  detail::extent_slot<2, Hidden>,
                  detail::extent_slot<3, Shared> {
  static_assert(extent_of<Experts, detail::experts_tag>,
                "locus::moe_shape: the first parameter must be locus::experts<N> (or experts<> for a run-time value)");
  static_assert(extent_of<TopK, detail::top_k_tag>,
                "locus::moe_shape: the second parameter must be locus::top_k<N> (or top_k<> for a run-time value)");
  static_assert(extent_of<Hidden, detail::hidden_tag>,
                "locus::moe_shape: the third parameter must be locus::hidden<N> (or hidden<> for a run-time value)");
  static_assert(extent_of<Shared, detail::shared_experts_tag>,
                "locus::moe_shape: the fourth parameter must be locus::shared_experts<N>");
  // Only with both tags right: extents given in the wrong order fired this one too, misleadingly.
  static_assert(!(extent_of<Experts, detail::experts_tag> && extent_of<TopK, detail::top_k_tag>) ||
                    !(Experts::is_static && TopK::is_static) || TopK::static_value <= Experts::static_value,
                "locus::moe_shape: top_k must not exceed the number of experts");

public:
  using experts_type = Experts;
  using top_k_type = TopK;
  using hidden_type = Hidden;
  using shared_experts_type = Shared;
  //! True when every extent is known at compile time.
  static constexpr bool is_static = Experts::is_static && TopK::is_static && Hidden::is_static && Shared::is_static;

  //! Fully static shapes need no arguments.
  constexpr moe_shape() noexcept requires is_static = default;

  //! Run-time construction; static extents must agree with the values given.
  //! @throws locus::config_error on a zero extent, a mismatch with a static extent, or top_k > experts
  constexpr moe_shape(std::size_t experts, std::size_t top_k, std::size_t hidden,
                      std::size_t shared = Shared::is_static ? Shared::static_value : 0)
      : detail::extent_slot<0, Experts>(Experts(experts)), detail::extent_slot<1, TopK>(TopK(top_k)),
        detail::extent_slot<2, Hidden>(Hidden(hidden)), detail::extent_slot<3, Shared>(Shared(shared)) {
    if (top_k > experts) LOCUS_THROW(config_error, "top_k (", top_k, ") exceeds the number of experts (", experts, ")");
  }

  LOCUS_HOST_DEVICE constexpr std::size_t experts() const noexcept {
    return detail::extent_slot<0, Experts>::get().value();
  }
  LOCUS_HOST_DEVICE constexpr std::size_t top_k() const noexcept { return detail::extent_slot<1, TopK>::get().value(); }
  LOCUS_HOST_DEVICE constexpr std::size_t hidden() const noexcept {
    return detail::extent_slot<2, Hidden>::get().value();
  }
  LOCUS_HOST_DEVICE constexpr std::size_t shared_experts() const noexcept {
    return detail::extent_slot<3, Shared>::get().value();
  }
};

//! A shape whose every extent is given at run time (offline tools, trace planning).
using dynamic_moe_shape = moe_shape<experts<>, top_k<>, hidden<>, shared_experts<>>;

namespace detail {
template <class T>
struct is_moe_shape : std::false_type {};
template <class E, class K, class H, class S>
struct is_moe_shape<moe_shape<E, K, H, S>> : std::true_type {};
} // namespace detail

//! Any locus::moe_shape.
template <class T>
concept any_moe_shape = detail::is_moe_shape<T>::value;

} // namespace locus::inline LOCUS_ABI_NAMESPACE
