// The correct forms of every misuse tested beside this file.
#include <locus/core/moe_shape.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>

struct router_a {
  using policy_concept = locus::router_tag;
};
struct transport_a {
  using policy_concept = locus::transport_tag;
};
template struct locus::require_router<router_a>;
template struct locus::require_transport<transport_a>;
template struct locus::policy_set<router_a, transport_a>;
template class locus::moe_shape<locus::experts<8>, locus::top_k<8>, locus::hidden<128>>;
locus::topology<locus::nodes<1>, locus::gpus_per_node<8>> t;
