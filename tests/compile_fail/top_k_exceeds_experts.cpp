// A static shape choosing more experts per token than exist is refused at compile time.
#include <locus/core/moe_shape.hpp>

template class locus::moe_shape<locus::experts<8>, locus::top_k<9>, locus::hidden<128>>;
