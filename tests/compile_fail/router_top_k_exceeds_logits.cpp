// A router's static top_k above the static expert count of the logits it routes is refused at
// compile time (it compiled and was refused at run time).
#include <locus/router/softmax_topk.hpp>

locus::routing<locus::top_k<9>> route(const locus::router::logits_view<locus::experts<8>, const float>& logits) {
  return locus::router::softmax_topk<locus::top_k<9>>{}.route(logits);
}
