// The stage bodies the CUDA kernels run (transport/detail/stage.hpp), run here by the host
// executor over several grid shapes, against naive loops written from the documented formulas and
// against the host functions of transport/permute.hpp on a real layout. The reference loops sum in
// the documented order, so every comparison is bit for bit.
#define BOOST_TEST_MODULE stage_bodies
#include <boost/test/unit_test.hpp>
#include <cstring>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/permute.hpp>
#include <numeric>
#include <random>
#include <vector>

using namespace locus;
using namespace locus::transport;
namespace st = locus::transport::detail::stage;

namespace {

// (blocks, threads) shapes: one thread; fewer blocks than rows (strided rows); more threads than
// elements of a row.
const std::size_t grids[][2] = {{1, 1}, {3, 4}, {7, 5}, {64, 64}};

template <class T>
std::vector<T> random_rows(std::size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<T> v(n);
  for (auto& x : v)
    x = T(u(rng));
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
float as_float(T v) {
  return to_float(v);
}

// Runs `body(grid_index, vec)` over every grid shape, for the element path and (when the rows
// allow it) the 16-byte vector path, and checks each result against `expected`.
template <class T, class Body>
void for_each_grid(const std::vector<T>& expected, std::size_t hidden, const char* what, Body&& body) {
  for (const auto& g : grids)
    for (bool vec : {false, true}) {
      if (vec && (hidden * sizeof(T)) % 16 != 0) continue;
      std::vector<T> out(expected.size(), T(-7.0f));
      st::run_grid(g[0], g[1], [&](st::grid_index i) {
        if (vec)
          body(i, std::true_type{}, out.data());
        else
          body(i, std::false_type{}, out.data());
      });
      BOOST_TEST_CONTEXT(what << ": grid " << g[0] << " x " << g[1] << (vec ? ", vectors" : ", elements")) {
        BOOST_TEST(same_bits(out, expected));
      }
    }
}

template <class T, class K>
void check_bodies(std::size_t hidden, K k) {
  std::mt19937 rng(static_cast<unsigned>(hidden * 31 + k.value()));
  // A layout over 2 nodes × 2 GPUs, 16 experts (two replicated), so tokens share rows.
  const dynamic_topology topo(2, 2);
  std::vector<expert_id> table(4 * 5, empty_slot);
  for (std::size_t e = 0; e < 16; ++e)
    table[(e % 4) * 5 + e / 4] = static_cast<expert_id>(e);
  table[0 * 5 + 4] = 5;
  table[3 * 5 + 4] = 0;
  const expert_map map(16, 4, 5, table);
  const std::size_t tokens = 37, kv = k.value();
  std::vector<expert_id> ids(tokens * kv);
  std::vector<float> w(tokens * kv);
  std::vector<expert_id> all(16);
  std::iota(all.begin(), all.end(), 0);
  std::uniform_real_distribution<float> uw(0.01f, 1.0f);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    for (std::size_t j = 0; j < kv; ++j) {
      ids[t * kv + j] = all[j];
      w[t * kv + j] = uw(rng);
    }
  }
  const routing<K> r(std::move(ids), std::move(w), k);
  layout<K> l;
  l.assign(r.view(), map, topo, 1, layout_options{transport_kind::flat, 1, 8});
  const std::size_t rows = l.rows(), copies = l.copies();
  BOOST_REQUIRE(rows < copies); // some rows carry several choices: combine must count them once

  const auto x = random_rows<T>(tokens * hidden, rng);
  const auto returned = random_rows<T>(rows * hidden, rng);
  const auto entry_out = random_rows<T>(copies * hidden, rng);

  // permute: send[r] = x[row_token[r]]
  std::vector<T> send(rows * hidden);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t h = 0; h < hidden; ++h)
      send[i * hidden + h] = x[static_cast<std::size_t>(l.row_token()[i]) * hidden + h];
  std::vector<T> host(rows * hidden);
  permute<T>(l, x, hidden, host, 2);
  BOOST_TEST(same_bits(host, send));
  for_each_grid(send, hidden, "permute", [&](st::grid_index g, auto vec, T* out) {
    st::gather_rows<T, decltype(vec)::value>(g, x.data(), l.row_token().data(), 1, rows, hidden, out);
  });

  // combine: out[t] = sum of t's distinct rows, in order of first choice.
  std::vector<T> comb(tokens * hidden);
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t h = 0; h < hidden; ++h) {
      float acc = 0;
      std::vector<std::int32_t> seen;
      for (std::size_t j = 0; j < kv; ++j) {
        const std::int32_t row = l.copy_row()[t * kv + j];
        if (std::find(seen.begin(), seen.end(), row) != seen.end()) continue;
        seen.push_back(row);
        acc = acc + as_float(returned[static_cast<std::size_t>(row) * hidden + h]);
      }
      comb[t * hidden + h] = T(acc);
    }
  std::vector<T> host_comb(tokens * hidden);
  combine<T>(l, returned, hidden, host_comb, 3);
  BOOST_TEST(same_bits(host_comb, comb));
  for_each_grid(comb, hidden, "combine", [&](st::grid_index g, auto vec, T* out) {
    st::combine<T, decltype(vec)::value>(g, k, returned.data(), l.copy_row().data(), tokens, hidden, out);
  });

  // combine_weighted: out[t] = sum over j of weight[e] * entry_out[e], e = copy_entry[t, j].
  std::vector<T> combw(tokens * hidden);
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t h = 0; h < hidden; ++h) {
      float acc = 0;
      for (std::size_t j = 0; j < kv; ++j) {
        const auto e = static_cast<std::size_t>(l.copy_entry()[t * kv + j]);
        const float p = l.entry_weight()[e] * as_float(entry_out[e * hidden + h]);
        acc = acc + p;
      }
      combw[t * hidden + h] = T(acc);
    }
  std::vector<T> host_combw(tokens * hidden);
  combine_weighted<T>(l, entry_out, hidden, host_combw, 2);
  BOOST_TEST(same_bits(host_combw, combw));
  for_each_grid(combw, hidden, "combine_weighted", [&](st::grid_index g, auto vec, T* out) {
    st::combine_weighted<T, decltype(vec)::value>(g, k, entry_out.data(), l.copy_entry().data(),
                                                  l.entry_weight().data(), tokens, hidden, out);
  });

  // reduce_rows over the layout's own rows and entries (a rank receiving everything this source sent).
  std::vector<std::int32_t> position(copies);
  std::iota(position.begin(), position.end(), 0);
  std::shuffle(position.begin(), position.end(), rng);
  std::vector<T> red(rows * hidden);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t h = 0; h < hidden; ++h) {
      float acc = 0;
      for (auto e = l.row_entry_offsets()[i]; e < l.row_entry_offsets()[i + 1]; ++e) {
        const auto p = static_cast<std::size_t>(position[static_cast<std::size_t>(e)]);
        const float term = l.entry_weight()[p] * as_float(entry_out[p * hidden + h]);
        acc = acc + term;
      }
      red[i * hidden + h] = T(acc);
    }
  for_each_grid(red, hidden, "reduce_rows", [&](st::grid_index g, auto vec, T* out) {
    st::reduce_rows<T, decltype(vec)::value>(g, entry_out.data(), l.row_entry_offsets().data(), position.data(),
                                             l.entry_weight().data(), rows, hidden, out);
  });
}

} // namespace

BOOST_AUTO_TEST_CASE(float_rows_static_and_dynamic_top_k) {
  for (std::size_t hidden : {1, 13, 16, 40}) {
    check_bodies<float>(hidden, top_k<4>{});
    check_bodies<float>(hidden, top_k<>(4));
    check_bodies<float>(hidden, top_k<>(6));
  }
}

BOOST_AUTO_TEST_CASE(bf16_rows_static_and_dynamic_top_k) {
  for (std::size_t hidden : {3, 8, 24}) {
    check_bodies<bfloat16>(hidden, top_k<8>{});
    check_bodies<bfloat16>(hidden, top_k<>(3));
  }
}

BOOST_AUTO_TEST_CASE(exclusive_scan_matches_std) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::int32_t> u(0, 9);
  for (std::size_t n : {0, 1, 2, 17, 300}) {
    std::vector<std::int32_t> in(n), expected(n + 1), out(n + 1, -1);
    for (auto& v : in)
      v = u(rng);
    std::exclusive_scan(in.begin(), in.end(), expected.begin(), 0);
    expected[n] = std::accumulate(in.begin(), in.end(), 0);
    st::run_grid(3, 4, [&](st::grid_index g) { st::exclusive_scan(g, in.data(), n, out.data()); });
    BOOST_TEST(out == expected);
  }
}

BOOST_AUTO_TEST_CASE(adjacent_difference_inverts_the_scan) {
  std::mt19937 rng(6);
  std::uniform_int_distribution<std::int32_t> u(0, 9);
  for (std::size_t n : {0, 1, 5, 300}) {
    std::vector<std::int32_t> in(n), offsets(n + 1), out(n, -1);
    for (auto& v : in)
      v = u(rng);
    st::run_grid(1, 1, [&](st::grid_index g) { st::exclusive_scan(g, in.data(), n, offsets.data()); });
    st::run_grid(3, 7, [&](st::grid_index g) { st::adjacent_difference(g, offsets.data(), n, out.data()); });
    BOOST_TEST(out == in);
  }
}
