#pragma once
//! @file
//! Every host router: softmax_topk, sigmoid_grouped, sigmoid_top1 (the CUDA paths are in
//! router/cuda.hpp).

#include <locus/router/logits.hpp>
#include <locus/router/sigmoid_grouped.hpp>
#include <locus/router/sigmoid_top1.hpp>
#include <locus/router/softmax_topk.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::router {
static_assert(router_policy<softmax_topk<top_k<2>>> && router_policy<sigmoid_grouped<>> && router_policy<sigmoid_top1>);
} // namespace locus::inline LOCUS_ABI_NAMESPACE::router
