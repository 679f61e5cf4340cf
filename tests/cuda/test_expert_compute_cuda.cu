#define BOOST_TEST_MODULE expert_compute_cuda
#include "../support/moe_reference.hpp"

#include <boost/test/unit_test.hpp>
#include <locus/layer/expert_compute_cuda.hpp>

using namespace locus;

namespace {
// cuBLAS SwiGLU on host-staged and device-resident blocks against the double reference.
template <class W>
void run_case(double rel, double acc) {
  constexpr std::size_t hidden = 96, ffn = 160;
  auto all = locus_test::model_weights<W>(31, 5, hidden, ffn);
  const std::vector<expert_id> experts{0, 1, 3, 4};
  std::vector<std::size_t> offsets{0, 17, 17, 18, 59}; // an empty block and a one-row block
  auto in = locus_test::random_rows<W>(5, offsets.back(), hidden);
  std::vector<W> out(in.size());
  layer::swiglu_cuda<W> compute(all);
  compute(layer::expert_blocks<W>{experts.data(), offsets.data(), experts.size(), in.data(), out.data(), hidden});

  std::vector<double> ref(hidden), scale(hidden);
  double worst = 0;
  for (std::size_t i = 0; i < experts.size(); ++i)
    for (std::size_t r = offsets[i]; r < offsets[i + 1]; ++r) {
      locus_test::reference_ffn(all, experts[i], in.data() + r * hidden, ref.data(), scale.data());
      for (std::size_t c = 0; c < hidden; ++c) {
        const double err = std::abs(locus_test::as_double(out[r * hidden + c]) - ref[c]);
        worst = std::max(worst, err / (rel * std::abs(ref[c]) + acc * scale[c] + 1e-6));
      }
    }
  BOOST_TEST_MESSAGE("worst error / tolerance = " << worst);
  BOOST_TEST(worst <= 1.0);

  // Device-resident blocks give the same bits as the staged path.
  device_buffer<W> din, dout(in.size());
  din.upload(in);
  compute(layer::expert_blocks<W, memory_space::device>{experts.data(), offsets.data(), experts.size(), din.data(),
                                                        dout.data(), hidden});
  std::vector<W> out2(in.size());
  dout.download(out2);
  BOOST_TEST(std::memcmp(out.data(), out2.data(), out.size() * sizeof(W)) == 0);

  // An expert the compute holds no weights for (it was given experts 0-4).
  const std::vector<expert_id> foreign{static_cast<expert_id>(all.experts().size())};
  std::vector<std::size_t> one{0, 1};
  BOOST_CHECK_THROW(compute(layer::expert_blocks<W>{foreign.data(), one.data(), 1, in.data(), out.data(), hidden}),
                    invalid_input_error);
}
} // namespace

// TF32 is not used (CUBLAS_COMPUTE_32F), so fp32 GEMMs are as exact as the host's.
BOOST_AUTO_TEST_CASE(fp32_cublas_swiglu) { run_case<float>(0.0, 2e-6); }
// bfloat16 activations between the GEMMs and at the output: relative 2^-8 per rounding.
BOOST_AUTO_TEST_CASE(bf16_cublas_swiglu) { run_case<bfloat16>(2.0 / 256, 1.0 / 128); }

// The layer on the CUDA backend (cuBLAS expert compute, host-staged local transport, 2 × 2 ranks as
// threads sharing the device) against the dense reference.
#include "../mpi/dispatch_cases.hpp"

#include <locus/layer/moe_layer.hpp>
#include <thread>

BOOST_AUTO_TEST_CASE(moe_layer_on_cuda_backend) {
  using layer_t = moe_layer<dynamic_moe_shape, dynamic_topology, transport::local_hierarchical, backend::cuda>;
  static_assert(std::is_same_v<layer_t::expert_compute_type, layer::swiglu_cuda<float>>);
  const auto c = locus_test::make_case(11, 2, 2);
  const auto all = locus_test::model_weights<float>(12, c.experts, c.hidden, 16);
  transport::local_fabric f(c.topo, transport_kind::hierarchical);
  std::vector<std::vector<float>> y(4);
  std::vector<std::exception_ptr> errors(4);
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      try {
        auto ep = f.endpoint(r);
        layer_t l(dynamic_moe_shape(c.experts, c.k, c.hidden, 0), c.topo, ep, c.map,
                  layer::swiglu_cuda<float>(layer::expert_weights<float>::for_rank(c.map, r, all)));
        const auto x = c.inputs(r);
        y[r].resize(x.size());
        l.forward(x, c.routings[r].view(), y[r]);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads)
    t.join();
  for (std::size_t r = 0; r < 4; ++r) {
    BOOST_REQUIRE(!errors[r]);
    std::vector<double> scale;
    const auto ref = locus_test::dense_moe(c.inputs(r), c.routings[r].view(), all, nullptr, &scale);
    double worst = 0;
    for (std::size_t i = 0; i < ref.size(); ++i)
      worst = std::max(worst, std::abs(y[r][i] - ref[i]) / (2e-6 * scale[i] + 1e-6));
    BOOST_TEST(worst <= 1.0);
  }
}
