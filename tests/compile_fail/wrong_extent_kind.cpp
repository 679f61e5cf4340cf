// Extents are typed: a top_k cannot stand where the expert count belongs.
#include <locus/core/moe_shape.hpp>

template class locus::moe_shape<locus::top_k<8>, locus::top_k<2>, locus::hidden<128>>;
