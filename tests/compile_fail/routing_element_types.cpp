// A given routing whose ids or weights are not expert_id / float is refused with a static_assert,
// not an overload error inside the layer.
#include <cstdint>
#include <locus/layer/moe_layer.hpp>

using shape = locus::moe_shape<locus::experts<8>, locus::top_k<2>, locus::hidden<16>>;
using topo = locus::topology<locus::nodes<2>, locus::gpus_per_node<2>>;
using layer = locus::moe_layer<shape, topo, locus::layer::given_routing>;

void step(layer& l, std::span<const float> x, std::span<float> y, const std::int64_t* ids, const float* w) {
  l.forward(x, locus::routing_view<locus::top_k<2>, const std::int64_t, const float>(ids, w, 1, {}), y);
}
