// A grouped router whose static groups do not divide the static expert count is refused when the
// layer is composed, not by its first forward.
#include <locus/layer/moe_layer.hpp>
#include <locus/router/sigmoid_grouped.hpp>

using shape = locus::moe_shape<locus::experts<8>, locus::top_k<2>, locus::hidden<16>>;
using topo = locus::topology<locus::nodes<2>, locus::gpus_per_node<2>>;
using grouped = locus::router::sigmoid_grouped<locus::groups<3>, locus::top_groups<1>, locus::top_k<2>>;
template class locus::moe_layer<shape, topo, grouped>;
