#pragma once
//! @file
//! `locus::transport_kind`: whether token copies travel flat (one per distinct destination rank)
//! or node-hierarchically (one per distinct remote node, to the rail peer, which forwards inside
//! its node). The one spelling of that choice: transport policies carry it (`P::kind`), layouts are
//! built for it and the traffic model counts by it.

#include <cstddef>
#include <cstdint>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>
#include <string_view>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! How token copies travel between ranks.
enum class transport_kind : std::uint8_t {
  flat,         //!< one copy per distinct destination rank of a token
  hierarchical, //!< one copy per distinct remote node (to the rail peer), then the fan-out inside it
};

//! How copies actually move over a transport of kind `k` with `gpus_per_node` GPUs per node: a
//! hierarchical transport with one GPU per node has no node stage (its rail peers are all the
//! ranks, its node layout is the flat one), so it moves copies as a flat one does. The host and
//! device dispatchers both take their path from here.
constexpr transport_kind exchange_path(transport_kind k, std::size_t gpus_per_node) noexcept {
  return k == transport_kind::hierarchical && gpus_per_node > 1 ? transport_kind::hierarchical : transport_kind::flat;
}

inline const char* to_string(transport_kind k) noexcept { return k == transport_kind::flat ? "flat" : "hierarchical"; }

//! Parses "flat" or "hierarchical". @throws locus::config_error on anything else
inline transport_kind parse_transport_kind(std::string_view s) {
  if (s == "flat") return transport_kind::flat;
  if (s == "hierarchical") return transport_kind::hierarchical;
  LOCUS_THROW(config_error, "unknown transport kind \"", s, "\" (expected flat or hierarchical)");
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
