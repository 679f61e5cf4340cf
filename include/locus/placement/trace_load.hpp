#pragma once
//! @file
//! Expected expert load counted on a trace: the input of load-driven planners.

#include <locus/placement/plan_input.hpp>
#include <locus/trace/trace.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! `load[layer][expert]` = (token, expert) pairs of `t` routed to the expert. With `decode_only`,
//! only tokens marked decode count (the tokens a serving deployment spends most steps on).
inline std::vector<std::vector<double>> expert_load(const trace::trace& t, bool decode_only = false) {
  std::vector<std::vector<double>> load(t.layers(), std::vector<double>(t.experts(), 0.0));
  const std::size_t k = t.top_k();
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto view = t.layer(l);
    auto& out = load[l];
    for (std::size_t tok = 0; tok < t.tokens(); ++tok) {
      if (decode_only && t.token_phase(tok) != trace::phase::decode) continue;
      const auto* ids = view.token_ids(tok);
      for (std::size_t j = 0; j < k; ++j)
        out[ids[j]] += 1.0;
    }
  }
  return load;
}

//! A plan_input for `t` on `topo` with `redundant_per_rank` replica slots per rank.
inline plan_input plan_input_from_trace(const trace::trace& t, const dynamic_topology& topo,
                                        std::size_t redundant_per_rank, bool decode_only = false) {
  plan_input in;
  in.topology = topo;
  in.experts = t.experts();
  in.slots_per_rank = slots_for(t.experts(), topo.ranks(), redundant_per_rank);
  in.load = expert_load(t, decode_only);
  return in;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
