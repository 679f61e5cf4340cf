// The correct forms of every misuse tested beside this file.
#include <locus/backend/host.hpp>
#include <locus/core/moe_shape.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/topology.hpp>
#include <locus/grouper/baselines.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/placement/linear.hpp>
#include <locus/router/softmax_topk.hpp>

struct router_a {
  using policy_concept = locus::router_tag;
};
struct transport_a {
  using policy_concept = locus::transport_tag;
};
template struct locus::require_router<locus::router::softmax_topk<>>;
template struct locus::require_backend<locus::backend::host>;
template struct locus::require_grouper<locus::grouper::least_loaded>;
template struct locus::require_placement<locus::placement::linear>;
template struct locus::require_transport<transport_a>;
template struct locus::policy_set<router_a, transport_a>;
template class locus::moe_shape<locus::experts<8>, locus::top_k<8>, locus::hidden<128>>;
locus::topology<locus::nodes<1>, locus::gpus_per_node<8>> t;

// A function computing experts, wrapped, with the signature expert_callable calls.
inline auto span_compute = [](locus::expert_id, std::span<const float>, std::span<float>, std::size_t) {};
template struct locus::policy_set<locus::layer::expert_callable<decltype(span_compute)>>;
void run_callable(const locus::layer::expert_blocks<float>& blocks) {
  locus::layer::expert_callable<decltype(span_compute)> compute(span_compute);
  compute(blocks);
}

// A grouped router that suits its static shape (DeepSeek-V3's).
#include <locus/layer/moe_layer.hpp>
#include <locus/router/sigmoid_grouped.hpp>
using v3_shape = locus::moe_shape<locus::experts<256>, locus::top_k<8>, locus::hidden<16>>;
using v3_router = locus::router::sigmoid_grouped<locus::groups<8>, locus::top_groups<4>, locus::top_k<8>>;
template class locus::moe_layer<v3_shape, locus::topology<locus::nodes<2>, locus::gpus_per_node<2>>, v3_router>;

// A routing of the layer's static top_k.
using given_layer =
    locus::moe_layer<locus::moe_shape<locus::experts<8>, locus::top_k<2>, locus::hidden<16>>,
                     locus::topology<locus::nodes<2>, locus::gpus_per_node<2>>, locus::layer::given_routing>;
void step(given_layer& l, std::span<const float> x, std::span<float> y, const locus::routing<locus::top_k<2>>& r) {
  l.forward(x, r.view(), y);
}

// The largest static topology (max_topology_ranks).
locus::topology<locus::nodes<256>, locus::gpus_per_node<256>> largest;
