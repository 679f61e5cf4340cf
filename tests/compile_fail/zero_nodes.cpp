// A topology of zero nodes is refused at compile time.
#include <locus/core/topology.hpp>

locus::topology<locus::nodes<0>, locus::gpus_per_node<8>> t;
