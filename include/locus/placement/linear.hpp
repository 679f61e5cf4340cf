#pragma once
//! @file
//! Baseline placements: `linear` (contiguous blocks of experts per rank, the default of vLLM and
//! Megatron-Core) and `round_robin` (expert e on rank e mod R). Neither uses redundant slots.

#include <locus/core/policy.hpp>
#include <locus/placement/plan_input.hpp>

#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Experts `[r·B, (r+1)·B)` on rank r, B = ceil(experts / ranks). Ignores load.
struct linear {
  using policy_concept = placement_tag;
  static constexpr const char* name = "linear";

  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    const std::size_t per_rank = (in.experts + in.ranks() - 1) / in.ranks();
    std::vector<expert_id> table(in.slots(), empty_slot);
    for (std::size_t e = 0; e < in.experts; ++e)
      table[(e / per_rank) * in.slots_per_rank + e % per_rank] = static_cast<expert_id>(e);
    return std::vector<expert_map>(in.layers(), expert_map(in.experts, in.ranks(), in.slots_per_rank, table));
  }
};

//! Expert e on rank `e mod R`, slot `e div R`. Ignores load.
struct round_robin {
  using policy_concept = placement_tag;
  static constexpr const char* name = "round_robin";

  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    std::vector<expert_id> table(in.slots(), empty_slot);
    for (std::size_t e = 0; e < in.experts; ++e)
      table[(e % in.ranks()) * in.slots_per_rank + e / in.ranks()] = static_cast<expert_id>(e);
    return std::vector<expert_map>(in.layers(), expert_map(in.experts, in.ranks(), in.slots_per_rank, table));
  }
};

} // namespace locus::LOCUS_ABI_NAMESPACE::placement
