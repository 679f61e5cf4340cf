#pragma once
//! @file
//! Sizes carried as types. `locus::experts<256>` is a compile-time size, `locus::experts<>`
//! (that is, `experts<locus::dynamic>`) a run-time one; both answer `value()`, so one code path
//! serves static and dynamic shapes (as CuTe's `Int<N>` and mdspan's extents do). A static
//! extent stores nothing and its value folds into the generated code.

#include <concepts>
#include <cstddef>
#include <limits>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <type_traits>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Marks an extent whose value is given at run time.
inline constexpr std::size_t dynamic = std::numeric_limits<std::size_t>::max();

namespace detail {
// Each tag names the quantity (for messages) and its smallest legal value.
struct experts_tag {
  static constexpr const char* name = "experts";
  static constexpr std::size_t min = 1;
};
struct top_k_tag {
  static constexpr const char* name = "top_k";
  static constexpr std::size_t min = 1;
};
struct hidden_tag {
  static constexpr const char* name = "hidden";
  static constexpr std::size_t min = 1;
};
struct shared_experts_tag {
  static constexpr const char* name = "shared_experts";
  static constexpr std::size_t min = 0;
};
struct nodes_tag {
  static constexpr const char* name = "nodes";
  static constexpr std::size_t min = 1;
};
struct gpus_per_node_tag {
  static constexpr const char* name = "gpus_per_node";
  static constexpr std::size_t min = 1;
};
struct groups_tag {
  static constexpr const char* name = "groups";
  static constexpr std::size_t min = 1;
};
struct top_groups_tag {
  static constexpr const char* name = "top_groups";
  static constexpr std::size_t min = 1;
};
} // namespace detail

//! A size named by `Tag`: static when `N != dynamic`, run-time otherwise.
//! @tparam Tag what the size measures (gives its name and minimum)
//! @tparam N   the compile-time value, or locus::dynamic
template <class Tag, std::size_t N = dynamic>
class extent {
  static_assert(N >= Tag::min, "locus: a static extent is below its minimum (zero experts, zero top_k, zero nodes...)");

public:
  using tag_type = Tag;
  static constexpr bool is_static = true;
  static constexpr std::size_t static_value = N;

  constexpr extent() noexcept = default;
  //! Accepts the value it already has, so generic code may construct any extent from a number.
  //! @throws locus::config_error when `v != N`
  constexpr explicit extent(std::size_t v) {
    if (v != N) LOCUS_THROW(config_error, Tag::name, " is ", N, " at compile time but ", v, " was given at run time");
  }
  LOCUS_HOST_DEVICE static constexpr std::size_t value() noexcept { return N; }
  constexpr operator std::size_t() const noexcept { return N; }
};

//! The run-time specialisation: stores its value and validates it on construction.
template <class Tag>
class extent<Tag, dynamic> {
public:
  using tag_type = Tag;
  static constexpr bool is_static = false;
  static constexpr std::size_t static_value = dynamic;

  //! @throws locus::config_error when `v` is below the quantity's minimum
  constexpr explicit extent(std::size_t v) : value_(v) {
    if constexpr (Tag::min > 0) // a minimum of 0 needs no check (and nvcc warns on the comparison)
      if (v < Tag::min) LOCUS_THROW(config_error, Tag::name, " must be at least ", Tag::min, ", got ", v);
    if (v == dynamic)
      LOCUS_THROW(config_error, Tag::name, " is ", v, " (2^64-1, the value reserved for locus::dynamic)");
  }
  LOCUS_HOST_DEVICE constexpr std::size_t value() const noexcept { return value_; }
  constexpr operator std::size_t() const noexcept { return value_; }

private:
  std::size_t value_;
};

//! Routed experts per MoE layer.
template <std::size_t N = dynamic>
using experts = extent<detail::experts_tag, N>;
//! Experts chosen per token.
template <std::size_t N = dynamic>
using top_k = extent<detail::top_k_tag, N>;
//! Hidden (model) dimension of a token vector.
template <std::size_t N = dynamic>
using hidden = extent<detail::hidden_tag, N>;
//! Shared experts every token passes through (0 for none).
template <std::size_t N = dynamic>
using shared_experts = extent<detail::shared_experts_tag, N>;
//! Nodes of the deployment.
template <std::size_t N = dynamic>
using nodes = extent<detail::nodes_tag, N>;
//! GPUs (ranks) per node.
template <std::size_t N = dynamic>
using gpus_per_node = extent<detail::gpus_per_node_tag, N>;
//! Expert groups of a grouped router.
template <std::size_t N = dynamic>
using groups = extent<detail::groups_tag, N>;
//! Groups kept per token by a grouped router.
template <std::size_t N = dynamic>
using top_groups = extent<detail::top_groups_tag, N>;

namespace detail {
template <class T>
struct is_extent : std::false_type {};
template <class Tag, std::size_t N>
struct is_extent<extent<Tag, N>> : std::true_type {};
} // namespace detail

//! Any locus extent.
template <class T>
concept any_extent = detail::is_extent<T>::value;

//! An extent measuring `Tag` (e.g. `extent_of<E, detail::experts_tag>`).
template <class T, class Tag>
concept extent_of = any_extent<T> && std::same_as<typename T::tag_type, Tag>;

namespace detail {
//! Holds one extent as a base class, so a static extent costs no storage. Base classes rather than
//! [[no_unique_address]] members because nvcc rejects, as a kernel parameter, a class whose only
//! members are empty [[no_unique_address]] ones.
template <std::size_t I, class E>
struct extent_slot : E {
  constexpr extent_slot() = default;
  constexpr explicit extent_slot(E e) : E(e) {}
  LOCUS_HOST_DEVICE constexpr const E& get() const noexcept { return *this; }
};
} // namespace detail

//! Builds an extent from a run-time value, validating it (for static extents: that it matches).
template <any_extent E>
constexpr E make_extent(std::size_t v) {
  return E(v);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
