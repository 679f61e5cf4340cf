#pragma once
//! @file
//! Baseline placements: `linear` (contiguous blocks of experts per rank, the default of vLLM and
//! Megatron-Core) and `round_robin` (expert e on rank e mod R). Neither uses redundant slots.

#include <locus/core/policy.hpp>
#include <locus/placement/plan_input.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Contiguous blocks of experts, as even as the counts allow: with E = B·R + x experts on R ranks,
//! the first x ranks hold B + 1 and the rest B (60 on 8: 8,8,8,8,7,7,7,7), so no rank is left
//! short by more than one. Ignores load.
struct linear {
  using policy_concept = placement_tag;
  static constexpr const char* name = "linear";

  std::vector<expert_map> plan(const plan_input& in) const {
    in.validate();
    const std::size_t base = in.experts / in.ranks(), extra = in.experts % in.ranks();
    std::vector<expert_id> table(in.slots(), empty_slot);
    for (std::size_t r = 0, e = 0; r < in.ranks(); ++r)
      for (std::size_t s = 0; s < base + (r < extra ? 1 : 0); ++s, ++e)
        table[r * in.slots_per_rank + s] = static_cast<expert_id>(e);
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

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
