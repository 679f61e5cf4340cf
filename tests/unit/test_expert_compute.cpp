#define BOOST_TEST_MODULE expert_compute
#include "../support/moe_reference.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <locus/layer/detail/shared_sum_stages.hpp>
#include <locus/layer/detail/swiglu_stages.hpp>
#include <locus/layer/expert_compute.hpp>
#include <numeric>

using namespace locus;
using locus::layer::expert_blocks;
using locus::layer::expert_weights;

namespace {

// A rank's blocks: for each listed expert, `rows[i]` input rows.
template <class A>
struct block_set {
  std::vector<expert_id> experts;
  std::vector<std::size_t> offsets{0};
  std::vector<A> in, out;
  std::size_t hidden = 0;

  block_set(std::vector<expert_id> e, const std::vector<std::size_t>& rows, std::size_t h, std::uint64_t seed)
      : experts(std::move(e)), hidden(h) {
    for (std::size_t r : rows)
      offsets.push_back(offsets.back() + r);
    in = locus_test::random_rows<A>(seed, offsets.back(), h);
    out.assign(in.size(), A{});
  }
  expert_blocks<A> view() { return {experts.data(), offsets.data(), experts.size(), in.data(), out.data(), hidden}; }
};

// Every output row against the double reference: |out - ref| <= rel · |ref| + acc · scale + 1e-6.
template <class W, class A>
void check_against_reference(const expert_weights<W>& w, const block_set<A>& b, double rel, double acc) {
  const std::size_t H = w.hidden();
  std::vector<double> ref(H), scale(H);
  double worst = 0;
  for (std::size_t i = 0; i < b.experts.size(); ++i)
    for (std::size_t r = b.offsets[i]; r < b.offsets[i + 1]; ++r) {
      locus_test::reference_ffn(w, b.experts[i], b.in.data() + r * H, ref.data(), scale.data());
      for (std::size_t c = 0; c < H; ++c) {
        const double got = locus_test::as_double(b.out[r * H + c]);
        const double err = std::abs(got - ref[c]), tol = rel * std::abs(ref[c]) + acc * scale[c] + 1e-6;
        worst = std::max(worst, err / tol);
        if (err > tol)
          BOOST_FAIL("expert " << b.experts[i] << " row " << r << " column " << c << ": got " << got << ", reference "
                               << ref[c] << " (tolerance " << tol << ")");
      }
    }
  BOOST_TEST_MESSAGE("worst error / tolerance = " << worst);
  BOOST_TEST(worst <= 1.0);
}

} // namespace

BOOST_AUTO_TEST_CASE(fp32_swiglu_matches_double_reference) {
  // Sizes that are not multiples of the tiles; uneven blocks including empty ones.
  constexpr std::size_t hidden = 70, ffn = 100;
  auto all = locus_test::model_weights<float>(1, 6, hidden, ffn);
  block_set<float> b({0, 2, 3, 5}, {13, 0, 1, 29}, hidden, 7);
  layer::swiglu_host<float> compute(all, 3);
  compute(b.view());
  check_against_reference(all, b, 0.0, 2e-6);
}

// The shared silu (host FFN and the CUDA activation stage): within 1e-6 of silu in double over
// the range where it is not tiny, and the right limits outside it: -0 below -88 (the clamped exp
// made the quotient grow back to -2 at -FLT_MAX), -0 at -inf, +inf at +inf, NaN for NaN.
BOOST_AUTO_TEST_CASE(silu_holds_at_the_ends_of_the_float_range) {
  using detail::layer::silu;
  double worst = 0;
  for (float v = -80.0f; v <= 88.0f; v += 0.01f) {
    const double want = static_cast<double>(v) / (1.0 + std::exp(-static_cast<double>(v)));
    if (std::abs(want) < 1e-30) continue;
    worst = std::max(worst, std::abs(static_cast<double>(silu(v)) - want) / std::abs(want));
  }
  BOOST_TEST(worst < 1e-6);
  constexpr float big = std::numeric_limits<float>::max(), inf = std::numeric_limits<float>::infinity();
  for (const float v : {-88.5f, -1e4f, -1e30f, -1e37f, -big, -inf}) {
    BOOST_TEST(silu(v) == 0.0f, v);
    BOOST_TEST(std::signbit(silu(v)), v);
  }
  BOOST_TEST(silu(big) == big);
  BOOST_TEST(silu(inf) == inf);
  BOOST_TEST(std::isnan(silu(std::numeric_limits<float>::quiet_NaN())));
  BOOST_TEST(silu(0.0f) == 0.0f);
}

BOOST_AUTO_TEST_CASE(result_does_not_depend_on_thread_count) {
  constexpr std::size_t hidden = 48, ffn = 72;
  auto all = locus_test::model_weights<float>(2, 4, hidden, ffn);
  block_set<float> one({0, 1, 3}, {17, 5, 40}, hidden, 9), many = one;
  layer::swiglu_host<float> a(all, 1), b(all, 4);
  a(one.view());
  b(many.view());
  BOOST_TEST(std::memcmp(one.out.data(), many.out.data(), one.out.size() * sizeof(float)) == 0);
  check_against_reference(all, one, 0.0, 2e-6);
}

BOOST_AUTO_TEST_CASE(bf16_weights_and_activations) {
  constexpr std::size_t hidden = 64, ffn = 96;
  auto all = locus_test::model_weights<bfloat16>(3, 3, hidden, ffn);
  block_set<bfloat16> b({0, 1, 2}, {9, 16, 3}, hidden, 11);
  layer::swiglu_host<bfloat16> compute(all, 2);
  compute(b.view());
  // The output is rounded to bfloat16 (relative 2^-8); the sums themselves are fp32.
  check_against_reference(all, b, 1.0 / 256, 2e-6);
}

BOOST_AUTO_TEST_CASE(bf16_weights_fp32_activations) {
  constexpr std::size_t hidden = 32, ffn = 40;
  auto all = locus_test::model_weights<bfloat16>(4, 2, hidden, ffn);
  block_set<float> b({1}, {21}, hidden, 13);
  layer::swiglu_host<bfloat16> compute(all);
  compute(b.view());
  check_against_reference(all, b, 0.0, 2e-6);
}

BOOST_AUTO_TEST_CASE(weights_for_a_rank_hold_each_hosted_expert_once) {
  // 6 experts on 2 ranks × 4 slots; rank 1 holds expert 4 twice and a replica of expert 0.
  const expert_map map(6, 2, 4, {0, 1, 2, 3, 4, 5, 4, 0});
  auto all = locus_test::model_weights<float>(5, 6, 8, 12);
  auto r1 = expert_weights<float>::for_rank(map, 1, all);
  BOOST_TEST((std::vector<expert_id>(r1.experts().begin(), r1.experts().end()) == std::vector<expert_id>{0, 4, 5}));
  BOOST_TEST(r1.bytes() == 3 * 3 * 8 * 12 * sizeof(float));
  for (expert_id e : r1.experts()) {
    const auto a = all.view(e), b = r1.view(e);
    BOOST_TEST(std::equal(a.gate, a.gate + 96, b.gate));
    BOOST_TEST(std::equal(a.up, a.up + 96, b.up));
    BOOST_TEST(std::equal(a.down, a.down + 96, b.down));
  }
  // Read through a const reference: the same weights as the writable spans and the view.
  const expert_weights<float>& held = r1;
  for (expert_id e : held.experts()) {
    const auto v = held.view(e);
    const std::span<const float> g = held.gate(e), u = held.up(e), d = held.down(e);
    BOOST_TEST((g.data() == v.gate && u.data() == v.up && d.data() == v.down));
    BOOST_TEST((g.size() == 96u && u.size() == 96u && d.size() == 96u));
    BOOST_TEST(g.data() == r1.gate(e).data());
  }
  BOOST_CHECK_THROW(held.gate(1), invalid_input_error);
  BOOST_TEST(!r1.contains(1));
  BOOST_CHECK_THROW(r1.view(1), invalid_input_error);
  BOOST_CHECK_THROW(expert_weights<float>::for_rank(map, 2, all), invalid_input_error);
  BOOST_CHECK_THROW(expert_weights<float>(8, 8, {1, 3, 1}), invalid_input_error);
  BOOST_CHECK_THROW(expert_weights<float>(0, 8, {1}), config_error);
}

// One expert numbered 2^31 - 1 sized an 8 GiB id → position table; hidden × ffn products that
// wrap 64 bits (2 × 3074457345618258603 × 3 = 2) gave gate() spans far longer than the storage.
BOOST_AUTO_TEST_CASE(weights_are_sized_by_what_they_hold) {
  const expert_weights<float> high(1, 1, {INT32_MAX, 7});
  BOOST_TEST(high.bytes() == 2 * 3 * sizeof(float));
  BOOST_TEST(high.contains(INT32_MAX));
  BOOST_TEST(high.index_of(INT32_MAX) == 1u);
  BOOST_TEST(!high.contains(8));
  BOOST_TEST(!high.contains(-1));
  BOOST_CHECK_THROW(expert_weights<float>(2, 3074457345618258603ull, {0}), config_error);
  BOOST_CHECK_THROW(expert_weights<float>(std::size_t{1} << 32, std::size_t{1} << 32, {0}), config_error);
  // 3 × 2^40 bf16 weights per expert: 2796202 experts fit a size_t of bytes, 2796203 do not.
  std::vector<expert_id> many(2796203);
  std::iota(many.begin(), many.end(), 0);
  BOOST_CHECK_THROW(expert_weights<bfloat16>(std::size_t{1} << 20, std::size_t{1} << 20, many), config_error);
}

BOOST_AUTO_TEST_CASE(bad_blocks_are_rejected) {
  auto all = locus_test::model_weights<float>(6, 2, 16, 16);
  layer::swiglu_host<float> compute(expert_weights<float>::for_rank(expert_map(2, 2, 1, {0, 1}), 0, all));
  block_set<float> foreign({1}, {3}, 16, 1);
  try {
    compute(foreign.view());
    BOOST_FAIL("a block of an expert not held here must be refused");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find("expert 1") != std::string::npos);
  }
  block_set<float> wrong_hidden({0}, {3}, 8, 1);
  BOOST_CHECK_THROW(compute(wrong_hidden.view()), invalid_input_error);
  block_set<float> ok({0, 0}, {2, 2}, 16, 1);
  ok.offsets = {0, 3, 2};
  BOOST_CHECK_THROW(compute(ok.view()), invalid_input_error);
}

BOOST_AUTO_TEST_CASE(user_callable_sees_each_nonempty_block) {
  block_set<float> b({2, 5, 7}, {4, 0, 3}, 6, 21);
  std::vector<std::pair<expert_id, std::size_t>> calls;
  // Out = (expert id + 1) · in: a function the test can predict without the library.
  layer::expert_callable f([&](expert_id e, std::span<const float> in, std::span<float> out, std::size_t rows) {
    calls.emplace_back(e, rows);
    BOOST_REQUIRE(in.size() == rows * 6 && out.size() == rows * 6);
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i];
  });
  f(b.view());
  BOOST_TEST((calls == std::vector<std::pair<expert_id, std::size_t>>{{2, 4}, {7, 3}}));
  for (std::size_t i = 0; i < 4 * 6; ++i)
    BOOST_TEST(b.out[i] == 3.0f * b.in[i]);
  for (std::size_t i = 4 * 6; i < 7 * 6; ++i)
    BOOST_TEST(b.out[i] == 8.0f * b.in[i]);
}

namespace {
// The rows of `b` scattered in reverse order through a separate buffer, given by pointer (as the
// dispatcher leaves them in its receive buffers): the view has no contiguous input.
template <class A>
struct scattered_rows {
  std::vector<A> storage;
  std::vector<const A*> pointers;
  explicit scattered_rows(const block_set<A>& b) {
    const std::size_t rows = b.offsets.back(), H = b.hidden;
    storage.resize(rows * (H + 3)); // a stride that is not the hidden size
    pointers.resize(rows);
    for (std::size_t r = 0; r < rows; ++r) {
      A* at = storage.data() + (rows - 1 - r) * (H + 3);
      std::copy_n(b.in.data() + r * H, H, at);
      pointers[r] = at;
    }
  }
  expert_blocks<A> view(block_set<A>& b) const {
    return {b.experts.data(), b.offsets.data(), b.experts.size(), nullptr, b.out.data(), b.hidden, pointers.data()};
  }
};
} // namespace

BOOST_AUTO_TEST_CASE(rows_given_by_pointer_give_the_same_outputs) {
  constexpr std::size_t hidden = 70, ffn = 100;
  auto all = locus_test::model_weights<float>(3, 6, hidden, ffn);
  block_set<float> contiguous({0, 2, 3, 5}, {13, 0, 1, 29}, hidden, 8), by_pointer = contiguous;
  const scattered_rows<float> rows(by_pointer);
  layer::swiglu_host<float> compute(all, 3);
  compute(contiguous.view());
  compute(rows.view(by_pointer));
  BOOST_TEST(std::memcmp(contiguous.out.data(), by_pointer.out.data(), contiguous.out.size() * sizeof(float)) == 0);
  check_against_reference(all, by_pointer, 0.0, 2e-6);

  // bf16 activations by pointer as well.
  auto w16 = locus_test::model_weights<bfloat16>(3, 6, hidden, ffn);
  block_set<bfloat16> c16({1, 4}, {9, 17}, hidden, 5), p16 = c16;
  const scattered_rows<bfloat16> rows16(p16);
  layer::swiglu_host<bfloat16, bfloat16> compute16(w16, 2);
  compute16(c16.view());
  compute16(rows16.view(p16));
  BOOST_TEST(std::memcmp(c16.out.data(), p16.out.data(), c16.out.size() * sizeof(bfloat16)) == 0);
}

BOOST_AUTO_TEST_CASE(user_callable_gets_rows_given_by_pointer_gathered) {
  block_set<float> b({2, 7}, {4, 3}, 6, 22);
  const scattered_rows<float> rows(b);
  layer::expert_callable f([&](expert_id e, std::span<const float> in, std::span<float> out, std::size_t) {
    for (std::size_t i = 0; i < in.size(); ++i)
      out[i] = static_cast<float>(e + 1) * in[i];
  });
  f(rows.view(b));
  for (std::size_t i = 0; i < 4 * 6; ++i)
    BOOST_TEST(b.out[i] == 3.0f * b.in[i]);
  for (std::size_t i = 4 * 6; i < 7 * 6; ++i)
    BOOST_TEST(b.out[i] == 8.0f * b.in[i]);
}

BOOST_AUTO_TEST_CASE(blocks_without_any_input_are_rejected) {
  auto all = locus_test::model_weights<float>(6, 2, 16, 16);
  layer::swiglu_host<float> compute(all, 1);
  block_set<float> b({0}, {3}, 16, 1);
  auto v = b.view();
  v.input = nullptr; // and no row pointers either
  try {
    compute(v);
    BOOST_FAIL("rows without input must be refused");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find("no input or output buffer") != std::string::npos);
  }
}

// The fused weighted sum equals summing the output rows afterwards: sums[copy] += w · out(row) in
// ascending row order, with the output rounded to the activation type first.
template <class W, class A>
void check_fused_sums(std::uint64_t seed, unsigned threads) {
  constexpr std::size_t hidden = 150, ffn = 40; // three column tiles, the last one partial
  auto all = locus_test::model_weights<W>(seed, 6, hidden, ffn);
  block_set<A> b({0, 1, 3, 5}, {9, 0, 4, 21}, hidden, seed + 1);
  const std::size_t rows = b.offsets.back(), copies = 11;
  std::vector<std::uint32_t> row_copy(rows);
  std::vector<float> row_weight(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    row_copy[r] = static_cast<std::uint32_t>((r * 7 + seed) % copies);
    row_weight[r] = 0.1f + 0.05f * static_cast<float>(r % 9);
  }
  layer::swiglu_host<W> compute(all, threads);
  compute(b.view()); // output rows, the unfused way
  std::vector<float> expected(copies * hidden, 0.0f);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < hidden; ++c)
      expected[row_copy[r] * hidden + c] += row_weight[r] * to_float(b.out[r * hidden + c]);
  std::vector<float> sums(copies * hidden, 0.0f);
  std::fill(b.out.begin(), b.out.end(), A{});
  compute(b.view(), layer::weighted_sum_target{sums.data(), row_copy.data(), row_weight.data(), copies});
  double worst = 0;
  for (std::size_t i = 0; i < sums.size(); ++i)
    worst = std::max(worst, std::abs(double(sums[i]) - expected[i]) / std::max(1.0, std::abs(double(expected[i]))));
  BOOST_TEST(worst <= 1e-6, "fused sums differ from the summed outputs by " << worst);
  BOOST_TEST(std::all_of(b.out.begin(), b.out.end(), [](A v) { return to_float(v) == 0.0f; }),
             "the fused compute must not write output rows");
  // Writing each copy's first row (row_first) instead of adding it: sums left unzeroed (here NaN)
  // end equal to the zeroed ones, bit for bit.
  std::vector<std::uint8_t> first(rows, 0), seen(copies, 0);
  for (std::size_t r = 0; r < rows; ++r) {
    first[r] = !seen[row_copy[r]];
    seen[row_copy[r]] = 1;
  }
  std::vector<float> written(copies * hidden, std::numeric_limits<float>::quiet_NaN());
  for (std::size_t c = 0; c < copies; ++c)
    if (!seen[c]) std::fill_n(written.begin() + static_cast<std::ptrdiff_t>(c * hidden), hidden, 0.0f);
  static_assert(layer::first_row_writer<layer::swiglu_host<W>>);
  compute(b.view(),
          layer::weighted_sum_target{written.data(), row_copy.data(), row_weight.data(), copies, first.data()});
  BOOST_TEST(std::memcmp(written.data(), sums.data(), sums.size() * sizeof(float)) == 0,
             "sums written from each copy's first row differ from the zeroed-and-added ones");
}

// What the layer reads to skip zeroing: only a declared, true writes_first_rows counts.
struct silent_compute {};
struct declines_first_rows {
  static constexpr bool writes_first_rows = false;
};
struct non_constant_first_rows {
  static inline bool writes_first_rows = true; // not a constant: cannot be relied on at compile time
};
static_assert(!layer::first_row_writer<silent_compute>);
static_assert(!layer::first_row_writer<declines_first_rows>);
static_assert(!layer::first_row_writer<non_constant_first_rows>);

BOOST_AUTO_TEST_CASE(fused_weighted_sums_equal_summed_outputs) {
  for (unsigned threads : {1u, 3u}) {
    check_fused_sums<float, float>(31, threads);
    check_fused_sums<bfloat16, bfloat16>(32, threads);
    check_fused_sums<bfloat16, float>(33, threads);
  }
  // Independent of the thread count, bit for bit.
  auto all = locus_test::model_weights<float>(40, 3, 130, 30);
  block_set<float> b({0, 2}, {17, 6}, 130, 41);
  std::vector<std::uint32_t> row_copy(23);
  std::vector<float> w(23, 0.5f);
  for (std::size_t r = 0; r < 23; ++r)
    row_copy[r] = static_cast<std::uint32_t>(r % 5);
  std::vector<float> one(5 * 130, 0.0f), many(one);
  layer::swiglu_host<float>(all, 1)(b.view(), layer::weighted_sum_target{one.data(), row_copy.data(), w.data(), 5});
  layer::swiglu_host<float>(all, 4)(b.view(), layer::weighted_sum_target{many.data(), row_copy.data(), w.data(), 5});
  BOOST_TEST(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0);
}

BOOST_AUTO_TEST_CASE(fused_target_is_checked) {
  auto all = locus_test::model_weights<float>(6, 2, 16, 16);
  layer::swiglu_host<float> compute(all, 1);
  block_set<float> b({0}, {3}, 16, 1);
  std::vector<std::uint32_t> row_copy{0, 1, 2};
  std::vector<float> w(3, 1.0f), sums(2 * 16);
  try {
    compute(b.view(), layer::weighted_sum_target{sums.data(), row_copy.data(), w.data(), 2});
    BOOST_FAIL("a row of copy 2 of 2 must be refused");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find("copy 2 of 2") != std::string::npos);
  }
  BOOST_CHECK_THROW(compute(b.view(), layer::weighted_sum_target{nullptr, row_copy.data(), w.data(), 3}),
                    invalid_input_error);
}

// The CUDA SwiGLU's math on the host: its packed gate|up weights (detail::layer::pack_gate_up) times
// the rows, as its first GEMM computes them (fp32, row-major rows × 2·ffn), its activation body
// (detail::layer::silu_mul, through stage::run_grid on several grid shapes), then the down GEMM:
// equal to the double reference FFN within the host SwiGLU's tolerances. A gate|up layout that
// the packing and the body read differently (columns swapped, a stride of ffn for 2·ffn) fails it.
template <class W>
void cuda_swiglu_math_on_the_host(double rel, double acc) {
  constexpr std::size_t hidden = 24, ffn = 40;
  const auto all = locus_test::model_weights<W>(3, 5, hidden, ffn);
  const std::vector<W> packed = detail::layer::pack_gate_up(all);
  const auto experts = all.experts();
  for (const auto& [blocks, threads] : {std::pair<std::size_t, std::size_t>{1, 1}, {3, 7}, {2, 64}}) {
    block_set<W> b({0, 2, 4}, {5, 0, 9}, hidden, 11);
    for (std::size_t i = 0; i < b.experts.size(); ++i) {
      const auto pos =
          static_cast<std::size_t>(std::find(experts.begin(), experts.end(), b.experts[i]) - experts.begin());
      const std::size_t rows = b.offsets[i + 1] - b.offsets[i];
      std::vector<float> gu(std::max<std::size_t>(rows, 1) * 2 * ffn);
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < 2 * ffn; ++c) {
          float s = 0;
          for (std::size_t h = 0; h < hidden; ++h)
            s += static_cast<float>(b.in[(b.offsets[i] + r) * hidden + h]) *
                 static_cast<float>(packed[(pos * hidden + h) * 2 * ffn + c]);
          gu[r * 2 * ffn + c] = s;
        }
      std::vector<W> act(std::max<std::size_t>(rows, 1) * ffn, W{});
      transport::detail::stage::run_grid(blocks, threads, [&](transport::detail::stage::grid_index g) {
        detail::layer::silu_mul(g, gu.data(), act.data(), rows, ffn);
      });
      const auto v = all.view(b.experts[i]);
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < hidden; ++c) {
          float s = 0;
          for (std::size_t j = 0; j < ffn; ++j)
            s += static_cast<float>(act[r * ffn + j]) * static_cast<float>(v.down[j * hidden + c]);
          b.out[(b.offsets[i] + r) * hidden + c] = W(s);
        }
    }
    BOOST_TEST_CONTEXT("grid " << blocks << " x " << threads) { check_against_reference(all, b, rel, acc); }
  }
}

BOOST_AUTO_TEST_CASE(cuda_swiglu_math_on_the_host_matches_reference) {
  cuda_swiglu_math_on_the_host<float>(0.0, 2e-6);
  // bfloat16: the activation and the output are rounded (relative 2^-8 each).
  cuda_swiglu_math_on_the_host<bfloat16>(1.0 / 256, 1.0 / 128);
}

// The layer step's elementwise stages (detail/shared_sum_stages.hpp: the router input's fp32 copy,
// the shared experts' sum and its add to the routed output), which the host layer runs as one thread
// and the device kernels as a grid: on every grid shape each element is written exactly once (outputs
// start as NaN; a grid that skipped an element leaves one, a grid that visited one twice adds its part
// twice) and equals the sum in order of the parts, each added in fp32, rounded once to T.
template <class T>
void shared_sum_stages_cover_every_element() {
  using transport::detail::stage::grid_index;
  using transport::detail::stage::run_grid;
  constexpr std::size_t n = 1001, parts = 3;
  std::vector<std::vector<T>> part;
  for (std::size_t p = 0; p < parts; ++p)
    part.push_back(locus_test::random_rows<T>(40 + p, 1, n));
  const std::vector<T> routed = locus_test::random_rows<T>(50, 1, n);
  for (const auto& [blocks, threads] : {std::pair<std::size_t, std::size_t>{1, 1}, {3, 7}, {2, 64}, {1100, 1}}) {
    BOOST_TEST_CONTEXT("grid " << blocks << " x " << threads) {
      std::vector<float> f32(n, std::numeric_limits<float>::quiet_NaN());
      run_grid(blocks, threads, [&](grid_index g) { detail::layer::to_f32(g, routed.data(), n, f32.data()); });
      std::vector<float> sum(n, std::numeric_limits<float>::quiet_NaN());
      for (std::size_t p = 0; p < parts; ++p)
        run_grid(blocks, threads,
                 [&](grid_index g) { detail::layer::accumulate(g, part[p].data(), n, p == 0, sum.data()); });
      std::vector<T> y = routed;
      run_grid(blocks, threads, [&](grid_index g) { detail::layer::add_sum(g, sum.data(), n, y.data()); });
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const volatile float a = static_cast<float>(part[0][i]), b = static_cast<float>(part[1][i]),
                             c = static_cast<float>(part[2][i]);
        const volatile float ab = a + b;
        const volatile float s = ab + c;
        const volatile float r = static_cast<float>(routed[i]) + s;
        const T expect = static_cast<T>(static_cast<float>(r));
        wrong += f32[i] != static_cast<float>(routed[i]) || sum[i] != s || std::memcmp(&y[i], &expect, sizeof(T)) != 0;
      }
      BOOST_TEST(wrong == 0u);
      // Gated (the shared experts' gate): each row of `hidden` values scaled by its score, rows
      // shorter and longer than the grid's stride.
      for (const std::size_t hidden : {std::size_t{1}, std::size_t{7}, std::size_t{13}, std::size_t{77}, n}) {
        const std::vector<float> score = locus_test::random_rows<float>(60 + hidden, n / hidden, 1);
        std::vector<T> gated = routed;
        run_grid(blocks, threads,
                 [&](grid_index g) { detail::layer::add_sum(g, sum.data(), n, gated.data(), score.data(), hidden); });
        std::size_t gated_wrong = 0;
        for (std::size_t i = 0; i < n; ++i) {
          const volatile float scaled = score[i / hidden] * sum[i];
          const volatile float r = static_cast<float>(routed[i]) + scaled;
          const T expect = static_cast<T>(static_cast<float>(r));
          gated_wrong += std::memcmp(&gated[i], &expect, sizeof(T)) != 0;
        }
        BOOST_TEST(gated_wrong == 0u, "hidden " << hidden);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(shared_sum_stages_cover_every_element_once) {
  shared_sum_stages_cover_every_element<float>();
  shared_sum_stages_cover_every_element<bfloat16>();
}

// The shared experts' gate scores in their two stages: on every grid shape the same bits as the
// documented order written out here (lane l sums h = l, l + 32, ... ascending; the partials added
// pairwise, lane l + w into l for w = 16 ... 1), and within fp32 rounding of sigmoid(x·gate) in double;
// rows shorter than the lanes, a multiple of them, and neither.
template <class T>
void gate_scores_follow_their_order() {
  using transport::detail::stage::grid_index;
  using transport::detail::stage::run_grid;
  constexpr std::size_t L = detail::layer::gate_lanes;
  for (const std::size_t hidden : {std::size_t{5}, std::size_t{64}, std::size_t{301}}) {
    constexpr std::size_t tokens = 9;
    const std::vector<T> x = locus_test::random_rows<T>(70 + hidden, tokens, hidden);
    const std::vector<float> gate = locus_test::random_rows<float>(80 + hidden, 1, hidden);
    std::vector<float> expect(tokens);
    std::size_t far = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
      float lane[L];
      double exact = 0.0;
      for (std::size_t l = 0; l < L; ++l) {
        volatile float v = 0.0f;
        for (std::size_t h = l; h < hidden; h += L) {
          const volatile float prod = static_cast<float>(x[t * hidden + h]) * gate[h];
          v = v + prod;
        }
        lane[l] = v;
      }
      for (std::size_t h = 0; h < hidden; ++h)
        exact += static_cast<double>(static_cast<float>(x[t * hidden + h])) * gate[h];
      for (std::size_t w = L / 2; w > 0; w /= 2)
        for (std::size_t l = 0; l < w; ++l) {
          const volatile float sum = lane[l] + lane[l + w];
          lane[l] = sum;
        }
      expect[t] = detail::router::sigmoid(lane[0]);
      far += std::abs(expect[t] - 1.0 / (1.0 + std::exp(-exact))) > 1e-5;
    }
    BOOST_TEST(far == 0u, "hidden " << hidden);
    for (const auto& [blocks, threads] : {std::pair<std::size_t, std::size_t>{1, 1}, {3, 7}, {2, 64}, {400, 1}}) {
      std::vector<float> partial(tokens * L, std::numeric_limits<float>::quiet_NaN());
      std::vector<float> score(tokens, std::numeric_limits<float>::quiet_NaN());
      run_grid(blocks, threads, [&](grid_index g) {
        detail::layer::gate_partials(g, x.data(), tokens, hidden, gate.data(), partial.data());
      });
      run_grid(blocks, threads,
               [&](grid_index g) { detail::layer::gate_finish(g, partial.data(), tokens, score.data()); });
      BOOST_TEST(std::memcmp(score.data(), expect.data(), tokens * sizeof(float)) == 0,
                 "hidden " << hidden << ", grid " << blocks << " x " << threads);
    }
  }
}

BOOST_AUTO_TEST_CASE(gate_scores_follow_one_order_on_every_grid) {
  gate_scores_follow_their_order<float>();
  gate_scores_follow_their_order<bfloat16>();
}
