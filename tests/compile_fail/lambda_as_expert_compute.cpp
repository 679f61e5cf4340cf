// A lambda given as a layer's expert compute has no policy tag; the message says how to wrap it.
#include <locus/core/policy.hpp>
#include <locus/layer/expert_compute.hpp>

inline auto compute = [](const locus::layer::expert_blocks<float>&) {};
template struct locus::policy_set<decltype(compute)>;
