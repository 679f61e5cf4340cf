#pragma once
//! @file
//! The load-bound rule every planner keeps (locality's node loads, token_refine's rank loads and
//! shifted mixes, the workload-aware grouping's node tokens and requests), written once:
//!   - the bound: a unit (GPU, node) may take at most (1 + slack) × the mean load over the units;
//!   - a change keeps the bound when the larger load it leaves on the units it touches is within
//!     the bound, or no larger than the larger of their loads before it, so that a start above
//!     the bound never gets worse but can be repaired.

#include <algorithm>
#include <cstddef>
#include <locus/core/config.hpp>
#include <locus/core/error.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! The most load one of `units` units may take: (1 + slack) × total / units. `slack_name` names the
//! option the slack came from in the message that refuses it.
//! @throws locus::config_error when `units` is zero or `slack` negative or NaN
inline double load_bound(double total, std::size_t units, double slack, const char* slack_name = "slack") {
  LOCUS_REQUIRE(units > 0, config_error, "load bound: no units to spread the load over");
  LOCUS_REQUIRE(slack >= 0, config_error, "load bound: ", slack_name, " ", slack, ", expected a number >= 0");
  return (1.0 + slack) * total / static_cast<double>(units);
}

//! Whether a change keeps the bound `bound`: `worst_after` is the largest load it leaves on the
//! units it changes, `worst_before` the largest of their loads before it. The tolerance absorbs
//! the rounding of loads summed in different orders.
inline bool keeps_load_bound(double worst_after, double worst_before, double bound) noexcept {
  return worst_after <= std::max(bound, worst_before) + 1e-9;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
