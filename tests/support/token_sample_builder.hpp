#pragma once
// Hand-made one-layer, top-1 token samples for the token-level planner's tests.
#include <cstddef>
#include <cstdint>
#include <locus/placement/token_refine.hpp>

namespace locus_test {

//! Builds a one-layer top-1 `placement::token_sample` request by request.
struct token_sample_builder {
  explicit token_sample_builder(std::size_t experts) {
    s.experts = experts;
    s.top_k = 1;
    s.ids.resize(1);
  }
  //! One request of `length` tokens from `node`, each routed to `expert`.
  void add(std::uint32_t node, std::uint16_t expert, int length) {
    for (int t = 0; t < length; ++t) {
      s.home.push_back(node);
      s.request.push_back(request);
      s.ids[0].push_back(expert);
    }
    ++request;
  }
  locus::placement::token_sample s;
  std::uint32_t request = 0;
};

} // namespace locus_test
