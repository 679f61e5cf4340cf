// An expert_callable whose function takes pointers instead of the spans the policy passes is
// refused with one message naming the expected signature.
#include <cstddef>
#include <locus/layer/expert_compute.hpp>

void run(const locus::layer::expert_blocks<float>& blocks) {
  auto f = [](locus::expert_id, const float*, float*, std::size_t) {};
  locus::layer::expert_callable<decltype(f)> compute(f);
  compute(blocks);
}
