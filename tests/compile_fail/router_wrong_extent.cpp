// softmax_topk takes a top_k extent; an experts extent in its place is named in the diagnostic.
#include <locus/router/softmax_topk.hpp>

locus::router::softmax_topk<locus::experts<8>> bad;
