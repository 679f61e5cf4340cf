// Keeping more groups than there are is rejected at compile time with a readable message.
#include <locus/router/sigmoid_grouped.hpp>

locus::router::sigmoid_grouped<locus::groups<4>, locus::top_groups<8>, locus::top_k<8>> bad;
