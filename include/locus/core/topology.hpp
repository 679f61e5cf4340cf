#pragma once
//! @file
//! The deployment: `nodes × gpus_per_node` ranks, rank = node * gpus_per_node + local rank.

#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/core/extents.hpp>
#include <ostream>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! The link a copy travels over between two ranks.
enum class link_class : std::uint8_t {
  same_gpu = 0,   //!< source and destination are the same rank: no transfer
  intra_node = 1, //!< another GPU of the same node (NVLink)
  inter_node = 2, //!< another node (the network) - what locus exists to reduce
};
inline constexpr std::size_t link_class_count = 3;

inline const char* to_string(link_class c) noexcept {
  switch (c) {
  case link_class::same_gpu: return "same_gpu";
  case link_class::intra_node: return "intra_node";
  case link_class::inter_node: return "inter_node";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, link_class c) { return os << to_string(c); }

//! Most ranks a topology may have. Far above any expert-parallel group, and low enough that
//! per-rank tables sized from a mistyped count (`--nodes 1e9`) are refused instead of allocated.
inline constexpr std::size_t max_topology_ranks = std::size_t{1} << 16;

namespace detail {
[[noreturn]] inline void throw_topology_too_large(std::size_t nodes, std::size_t gpus_per_node) {
  throw config_error(
      concat("topology: ", nodes, " nodes × ", gpus_per_node, " GPUs per node exceed ", max_topology_ranks, " ranks"),
      __FILE__, __LINE__);
}
} // namespace detail

//! Nodes × GPUs per node. Ranks are numbered node-major.
//! @tparam Nodes       `locus::nodes<N>` or `nodes<>`
//! @tparam GpusPerNode `locus::gpus_per_node<G>` or `gpus_per_node<>`
template <class Nodes, class GpusPerNode>
class topology : detail::extent_slot<0, Nodes>, detail::extent_slot<1, GpusPerNode> {
  static_assert(extent_of<Nodes, detail::nodes_tag>,
                "locus::topology: the first parameter must be locus::nodes<N> (or nodes<> for a run-time value)");
  static_assert(extent_of<GpusPerNode, detail::gpus_per_node_tag>,
                "locus::topology: the second parameter must be locus::gpus_per_node<G> (or gpus_per_node<>)");
  // What the run-time constructor refuses with a config_error (divided: a product may wrap).
  static_assert(!(Nodes::is_static && GpusPerNode::is_static) ||
                    Nodes::static_value <= max_topology_ranks / GpusPerNode::static_value,
                "locus::topology: nodes × gpus_per_node exceed max_topology_ranks (65,536 ranks)");

public:
  using nodes_type = Nodes;
  using gpus_per_node_type = GpusPerNode;
  static constexpr bool is_static = Nodes::is_static && GpusPerNode::is_static;

  constexpr topology() noexcept requires is_static = default;
  //! @throws locus::config_error on zero nodes or GPUs, or a mismatch with a static extent
  //! @throws locus::config_error when nodes × gpus_per_node exceeds max_topology_ranks (checked by
  //!         division, so a product that wraps 64 bits is caught too)
  constexpr topology(std::size_t nodes, std::size_t gpus_per_node)
      : detail::extent_slot<0, Nodes>(Nodes(nodes)), detail::extent_slot<1, GpusPerNode>(GpusPerNode(gpus_per_node)) {
    if (nodes > max_topology_ranks / gpus_per_node) detail::throw_topology_too_large(nodes, gpus_per_node);
  }

  LOCUS_HOST_DEVICE constexpr std::size_t nodes() const noexcept {
    return detail::extent_slot<0, Nodes>::get().value();
  }
  LOCUS_HOST_DEVICE constexpr std::size_t gpus_per_node() const noexcept {
    return detail::extent_slot<1, GpusPerNode>::get().value();
  }
  LOCUS_HOST_DEVICE constexpr std::size_t ranks() const noexcept { return nodes() * gpus_per_node(); }

  //! Node hosting `rank`.
  LOCUS_HOST_DEVICE constexpr std::size_t node_of(std::size_t rank) const {
    LOCUS_ASSERT(rank < ranks(), "topology::node_of: rank out of range");
    return rank / gpus_per_node();
  }
  //! Position of `rank` inside its node.
  LOCUS_HOST_DEVICE constexpr std::size_t local_rank_of(std::size_t rank) const {
    LOCUS_ASSERT(rank < ranks(), "topology::local_rank_of: rank out of range");
    return rank % gpus_per_node();
  }
  //! Global rank of local rank `local` on `node`.
  LOCUS_HOST_DEVICE constexpr std::size_t rank_of(std::size_t node, std::size_t local) const {
    LOCUS_ASSERT(node < nodes() && local < gpus_per_node(), "topology::rank_of: node or local rank out of range");
    return node * gpus_per_node() + local;
  }
  //! The link a copy from `src` to `dst` uses.
  LOCUS_HOST_DEVICE constexpr link_class link(std::size_t src, std::size_t dst) const {
    if (src == dst) return link_class::same_gpu;
    return node_of(src) == node_of(dst) ? link_class::intra_node : link_class::inter_node;
  }

  //! Host-side validation of a rank taken from user input.
  //! @throws locus::invalid_input_error naming the rank and the rank count
  void check_rank(std::size_t rank) const {
    if (rank >= ranks())
      LOCUS_THROW(invalid_input_error, "rank ", rank, " out of range: the topology has ", ranks(), " ranks");
  }
};

//! A topology given at run time.
using dynamic_topology = topology<nodes<>, gpus_per_node<>>;

namespace detail {
template <class T>
struct is_topology : std::false_type {};
template <class N, class G>
struct is_topology<topology<N, G>> : std::true_type {};
} // namespace detail

//! Any locus::topology.
template <class T>
concept any_topology = detail::is_topology<T>::value;

} // namespace locus::inline LOCUS_ABI_NAMESPACE
