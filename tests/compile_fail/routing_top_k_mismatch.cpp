// A routing whose static top_k differs from the layer's static top_k is refused at compile time.
#include <locus/layer/moe_layer.hpp>

using shape = locus::moe_shape<locus::experts<8>, locus::top_k<2>, locus::hidden<16>>;
using topo = locus::topology<locus::nodes<2>, locus::gpus_per_node<2>>;
using layer = locus::moe_layer<shape, topo, locus::layer::given_routing>;

void step(layer& l, std::span<const float> x, std::span<float> y, const locus::routing<locus::top_k<3>>& r) {
  l.forward(x, r.view(), y);
}
