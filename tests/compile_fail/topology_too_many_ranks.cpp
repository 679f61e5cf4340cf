// A static topology beyond max_topology_ranks is refused at compile time, as the run-time
// constructor refuses it with a config_error (1,000 × 1,000 ranks compiled before).
#include <locus/core/topology.hpp>

locus::topology<locus::nodes<1000>, locus::gpus_per_node<1000>> t;
