#define BOOST_TEST_MODULE mpi_layer
#include "../support/moe_reference.hpp"
#include "dispatch_cases.hpp"
#include "mpi_fixture.hpp"

#include <locus/layer/moe_layer.hpp>
#include <locus/placement/linear.hpp>
#include <locus/transport/mpi.hpp>

using namespace locus;
using locus::layer::expert_weights;

namespace {

using dyn_shape = dynamic_moe_shape;

// Every rank builds the same random case (a pure function of the seed), runs its part through the
// layer and checks its outputs against the dense double reference of its own tokens; the verdict
// is agreed over all ranks so that every rank reports the same result.
template <class Transport>
void run_cases(std::size_t nodes, std::size_t gpus, std::uint64_t first_seed, std::size_t count) {
  const dynamic_topology topo(nodes, gpus);
  BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(world_size()), topo.ranks());
  transport::mpi_transport ex(MPI_COMM_WORLD, topo, Transport::kind);
  const std::size_t r = ex.rank();
  double worst = 0;
  for (std::uint64_t seed = first_seed; seed < first_seed + count; ++seed) {
    const auto c = locus_test::make_case(seed, nodes, gpus);
    const std::size_t ffn = 4 + seed % 9, shared = seed % 4 == 0 ? 1 : 0;
    const auto all = locus_test::model_weights<float>(seed, c.experts, c.hidden, ffn);
    const auto shared_w = locus_test::model_weights<float>(seed + 7, shared, c.hidden, ffn);
    moe_layer<dyn_shape, dynamic_topology, Transport> layer(
        dyn_shape(c.experts, c.k, c.hidden, shared), topo, ex, c.map,
        layer::swiglu_host<float>(expert_weights<float>::for_rank(c.map, r, all), 1));
    if (shared) layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
    const auto x = c.inputs(r);
    std::vector<float> y(x.size(), -1.0f);
    layer.forward(x, c.routings[r].view(), y);
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(x, c.routings[r].view(), all, shared ? &shared_w : nullptr, &scale);
    for (std::size_t i = 0; i < y.size(); ++i)
      worst = std::max(worst, std::abs(y[i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
  }
  double global = 0;
  MPI_Allreduce(&worst, &global, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (r == 0)
    BOOST_TEST_MESSAGE(nodes << "x" << gpus << " " << to_string(Transport::kind) << ": " << count
                             << " cases, worst error / tolerance " << global);
  BOOST_TEST(global <= 1.0);
}

} // namespace

// 8 ranks as 4 nodes × 2 GPUs and as 2 nodes × 4 GPUs; other rank counts run 1 node × N.
BOOST_AUTO_TEST_CASE(layer_matches_dense_reference_over_mpi) {
  const auto n = static_cast<std::size_t>(world_size());
  if (n == 8) {
    run_cases<transport::mpi_flat>(4, 2, 1, 25);
    run_cases<transport::mpi_hierarchical>(4, 2, 1, 25);
    run_cases<transport::mpi_flat>(2, 4, 101, 25);
    run_cases<transport::mpi_hierarchical>(2, 4, 101, 25);
  } else {
    run_cases<transport::mpi_flat>(1, n, 1, 10);
    run_cases<transport::mpi_hierarchical>(1, n, 1, 10);
  }
}

// The whole step with the default router (softmax top-k over x·W_router) and a shared expert, over
// mpi_hierarchical: the routing equals a double-precision router's and the outputs the dense MoE.
BOOST_AUTO_TEST_CASE(routed_forward_over_mpi) {
  const std::size_t n = static_cast<std::size_t>(world_size()), gpus = n % 2 == 0 ? 2 : 1;
  constexpr std::size_t E = 16, K = 4, H = 24, F = 20;
  const dynamic_topology topo(n / gpus, gpus);
  const std::size_t slots = (E + n - 1) / n + 1;
  placement::plan_input in{topo, E, slots, {std::vector<double>(E, 1.0)}, {}};
  using layer_t = moe_layer<dyn_shape, dynamic_topology, transport::mpi_hierarchical>;
  const expert_map map = plan_placement<placement::round_robin>(in)[0];
  const auto all = locus_test::model_weights<float>(61, E, H, F);
  const auto shared_w = locus_test::model_weights<float>(62, 1, H, F);
  const auto gate = locus_test::random_rows<float>(63, H, E);
  transport::mpi_transport ex(MPI_COMM_WORLD, topo, transport_kind::hierarchical);
  const std::size_t r = ex.rank();
  layer_t layer(dyn_shape(E, K, H, 1), topo, ex, map,
                layer::swiglu_host<float>(expert_weights<float>::for_rank(map, r, all), 1));
  layer.set_router(gate);
  layer.set_shared_experts(layer::swiglu_host<float>(shared_w, 1));
  const auto x = locus_test::random_rows<float>(500 + r, 9 + r, H);
  std::vector<float> y(x.size());
  layer.forward(x, y);
  std::vector<expert_id> ids;
  std::vector<float> w;
  locus_test::reference_softmax_topk(x, gate, H, E, K, true, ids, w);
  int ok = layer.last_routing().ids() == ids ? 1 : 0;
  routing<> ref_routing(ids, w, top_k<>(K));
  std::vector<double> scale;
  const auto ref = locus_test::dense_moe(x, ref_routing.view(), all, &shared_w, &scale);
  for (std::size_t i = 0; i < y.size(); ++i)
    ok &= std::abs(y[i] - ref[i]) <= 1e-5 * scale[i] + 1e-6 ? 1 : 0;
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  BOOST_TEST(all_ok == 1);
}
