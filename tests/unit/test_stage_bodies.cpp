// The stage bodies the CUDA kernels run (transport/detail/stage.hpp), run here by the host
// executor over several grid shapes, against naive loops written from the documented formulas and
// against the host functions of transport/permute.hpp on a real layout. The reference loops sum in
// the documented order, so every comparison is bit for bit.
#define BOOST_TEST_MODULE stage_bodies
#include <algorithm>
#include <array>
#include <boost/test/unit_test.hpp>
#include <cstdint>
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
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
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

// `H`: the row width the bodies get, a number or a locus::hidden extent of the value `hidden`.
template <class T, class K, class H = std::size_t>
void check_bodies(std::size_t hidden, K k) {
  const H hx(hidden);
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
    st::scatter_rows<T, decltype(vec)::value>(g, k, x.data(), l.copy_row().data(), tokens, hx, out);
  });
  for_each_grid(send, hidden, "gather over row_token", [&](st::grid_index g, auto vec, T* out) {
    st::gather_rows<T, decltype(vec)::value>(g, x.data(), l.row_token().data(), 1, rows, hx, out);
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
    st::combine<T, decltype(vec)::value>(g, k, returned.data(), l.copy_row().data(), tokens, hx, out);
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
                                                  l.entry_weight().data(), tokens, hx, out);
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
                                             l.entry_weight().data(), rows, hx, out);
  });
  // ... without weights (they were applied to the expert input): the outputs summed as they are.
  std::vector<T> red_unit(rows * hidden);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t h = 0; h < hidden; ++h) {
      float acc = 0;
      for (auto e = l.row_entry_offsets()[i]; e < l.row_entry_offsets()[i + 1]; ++e)
        acc = acc + as_float(entry_out[static_cast<std::size_t>(position[static_cast<std::size_t>(e)]) * hidden + h]);
      red_unit[i * hidden + h] = T(acc);
    }
  for_each_grid(red_unit, hidden, "reduce_rows unweighted", [&](st::grid_index g, auto vec, T* out) {
    st::reduce_rows<T, decltype(vec)::value>(g, entry_out.data(), l.row_entry_offsets().data(), position.data(),
                                             nullptr, rows, hx, out);
  });

  // gather_scaled_rows: dst[i] = weight[i] · src[index[i]], the weight rounded to T first and the
  // product rounded to T (as the host dispatcher scales its expert rows for
  // weight_site::expert_input, and engines a bf16 row by a bf16 score); -0 and a zero weight kept.
  std::vector<float> scale(copies);
  for (std::size_t i = 0; i < copies; ++i)
    scale[i] = i % 7 == 3 ? 0.0f : l.entry_weight()[i] * (i % 2 ? -1.0f : 1.0f);
  std::vector<T> scaled(copies * hidden);
  for (std::size_t i = 0; i < copies; ++i)
    for (std::size_t h = 0; h < hidden; ++h)
      scaled[i * hidden + h] =
          T(as_float(T(scale[i])) * as_float(entry_out[static_cast<std::size_t>(position[i]) * hidden + h]));
  for_each_grid(scaled, hidden, "gather_scaled_rows", [&](st::grid_index g, auto vec, T* out) {
    st::gather_scaled_rows<T, decltype(vec)::value>(g, entry_out.data(), position.data(), scale.data(), copies, hx,
                                                    out);
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

// A static hidden extent (what the kernels are instantiated for) runs the same bodies: the same
// bits as the formulas, on the element and the vector path.
BOOST_AUTO_TEST_CASE(static_hidden_extents_give_the_same_bits) {
  check_bodies<float, top_k<4>, hidden<16>>(16, top_k<4>{});
  check_bodies<float, top_k<>, hidden<13>>(13, top_k<>(6));
  check_bodies<bfloat16, top_k<8>, hidden<24>>(24, top_k<8>{});
  check_bodies<bfloat16, top_k<>, hidden<3>>(3, top_k<>(3));
  BOOST_CHECK_THROW((check_bodies<float, top_k<4>, hidden<16>>(8, top_k<4>{})), config_error);
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

// The segment copy of the one-GPU transport's receive gather: every byte of the segment arrives,
// none beside it is written, on every grid shape, vectorised where the pointers allow it.
BOOST_AUTO_TEST_CASE(copy_bytes_moves_exactly_the_segment) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255);
  for (std::size_t bytes : {0, 1, 15, 16, 48, 64, 1008, 4096, 14336 * 3}) {
    for (std::size_t shift : {0, 16, 3}) {
      std::vector<std::byte> src(bytes + 64), dst(bytes + 64, std::byte{0xAB});
      for (auto& b : src)
        b = std::byte(byte(rng));
      // 64-byte aligned bases, then the shift (3 breaks vector alignment).
      auto* s = reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(src.data()) + 15) & ~std::uintptr_t{15});
      auto* d = reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(dst.data()) + 15) & ~std::uintptr_t{15});
      d += shift;
      const bool vec = shift != 3 && bytes % 16 == 0;
      for (const auto& grid : grids) {
        std::fill(dst.begin(), dst.end(), std::byte{0xAB});
        st::run_grid(grid[0], grid[1], [&](st::grid_index g) {
          if (vec)
            st::copy_bytes<true>(g, s, d, bytes);
          else
            st::copy_bytes<false>(g, s, d, bytes);
        });
        BOOST_TEST(std::memcmp(d, s, bytes) == 0,
                   bytes << " bytes, shift " << shift << ", grid " << grid[0] << "x" << grid[1]);
        const auto outside = std::count_if(dst.begin(), dst.end(), [&](const std::byte& b) {
          return (&b < d || &b >= d + bytes) && b != std::byte{0xAB};
        });
        BOOST_TEST(outside == 0);
      }
    }
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

// The device layout's replica stage (validate_kernel's joins and sort keys, then
// sorted_copy_replica one thread per copy in key order) picks the host layout's replica for every
// copy, under every rule the layer can be given and both transports: the device dispatcher passes
// the layer's rule to the same tables (replica_candidates) and the same per-token join.
BOOST_AUTO_TEST_CASE(device_replica_stage_picks_the_host_layouts_replicas_for_every_rule) {
  // 2 nodes × 2 GPUs, 8 experts on 3 slots per rank; expert 1 on ranks 0, 1 and 2 (both nodes),
  // experts 0 and 4 on two ranks of node 0.
  const dynamic_topology topo(2, 2);
  std::vector<expert_id> table(4 * 3, empty_slot);
  for (std::size_t e = 0; e < 8; ++e)
    table[(e % 4) * 3 + e / 4] = static_cast<expert_id>(e);
  table[0 * 3 + 2] = 1;
  table[1 * 3 + 2] = 0;
  table[2 * 3 + 2] = 1;
  table[3 * 3 + 2] = 4;
  const expert_map map(8, 4, 3, table);
  const std::size_t tokens = 53, k = 3;
  std::mt19937 rng(11);
  std::vector<expert_id> ids(tokens * k), all(8);
  std::iota(all.begin(), all.end(), 0);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    std::copy_n(all.begin(), k, ids.begin() + static_cast<std::ptrdiff_t>(t * k));
  }
  const routing<top_k<>> r(ids, std::vector<float>(tokens * k, 0.5f), top_k<>(k));
  namespace dl = locus::transport::detail::layout;

  const std::vector<std::uint8_t> hot = {1, 0, 0, 1};
  std::vector<std::vector<std::int32_t>> by_rule;
  std::size_t joined_copies = 0;
  for (const transport_kind kind : {transport_kind::flat, transport_kind::hierarchical})
    for (const placement::replica_rule rule : placement::all_replica_rules)
      for (std::size_t src = 0; src < topo.ranks(); ++src) {
        BOOST_TEST_CONTEXT(to_string(kind) << ", rule " << to_string(rule) << ", source rank " << src) {
          placement::replica_policy policy{rule, 7, {}};
          if (rule == placement::replica_rule::locality_bounded) policy.hot = hot;
          layout<top_k<>> host;
          layout_options opt{kind, 2, 8}; // several chunks: the host's chunked count
          opt.replicas = policy;
          host.assign(r.view(), map, topo, src, opt);
          std::vector<std::int32_t> fixed, cand_offsets, cands;
          placement::replica_candidates(map, topo, src, fixed, cand_offsets, cands, policy);
          cands.push_back(-1); // never empty, as on the device
          // validate_kernel, one token per thread: joins and sort keys.
          const dl::token_params p{static_cast<std::int32_t>(src), 2, 3, 1, kind == transport_kind::hierarchical};
          std::vector<std::int32_t> join(tokens * k, -1), key(tokens * k);
          for (std::size_t t = 0; t < tokens; ++t) {
            if (dl::joins_rows(rule))
              dl::token_joins<8>(p, ids.data() + t * k, k, fixed.data(), cand_offsets.data(), cands.data(),
                                 map.view().replicas, join.data() + t * k);
            for (std::size_t j = 0; j < k; ++j)
              key[t * k + j] = dl::replica_sort_key(ids[t * k + j], join[t * k + j] >= 0);
          }
          // The stable sort by key, then replica_kernel, one thread per position.
          std::vector<std::int32_t> sorted_copy(tokens * k), sorted_key(tokens * k);
          std::iota(sorted_copy.begin(), sorted_copy.end(), 0);
          std::stable_sort(sorted_copy.begin(), sorted_copy.end(), [&](std::int32_t a, std::int32_t b) {
            return key[static_cast<std::size_t>(a)] < key[static_cast<std::size_t>(b)];
          });
          for (std::size_t q = 0; q < sorted_copy.size(); ++q)
            sorted_key[q] = key[static_cast<std::size_t>(sorted_copy[q])];
          std::vector<std::int32_t> device(tokens * k, -1);
          for (std::size_t q = 0; q < sorted_copy.size(); ++q)
            device[static_cast<std::size_t>(sorted_copy[q])] =
                dl::sorted_copy_replica(sorted_key.data(), sorted_copy.data(), q, fixed.data(), cand_offsets.data(),
                                        cands.data(), join.data(), rule);
          const auto expected = host.copy_replica();
          BOOST_TEST(device == std::vector<std::int32_t>(expected.begin(), expected.end()),
                     boost::test_tools::per_element());
          for (const std::int32_t j : join)
            joined_copies += j >= 0;
          if (src == 0 && kind == transport_kind::flat) by_rule.push_back(device);
        }
      }
  // The rules do choose differently here, and copies do join rows, so the comparison above
  // tells them apart.
  BOOST_TEST(by_rule.size() == placement::all_replica_rules.size());
  BOOST_TEST(by_rule[0] != by_rule[2]); // random spreads over every replica
  BOOST_TEST(by_rule[0] != by_rule[3]); // locality_bounded looks past hot rank 0
  BOOST_TEST(joined_copies > 0);
}

namespace {

// The fan-out stage bodies over received rows (entries per row, target local rank, slot, weight),
// run by the host executor on `grid`, against the host's make_node_fanout.
void check_fanout(std::size_t gpus, const std::vector<std::int32_t>& row_entries,
                  const std::vector<std::int32_t>& target, const std::vector<std::int32_t>& slot,
                  const std::vector<float>& weight, const std::size_t (&grid)[2]) {
  const std::size_t rows = row_entries.size(), n = gpus * rows;
  std::vector<std::int32_t> reo(rows + 1, 0);
  std::inclusive_scan(row_entries.begin(), row_entries.end(), reo.begin() + 1);
  std::vector<std::int32_t> count(n, -1), present(n, -1), row_at(n + 1, -1), entry_at(n + 1, -1);
  st::run_grid(grid[0], grid[1], [&](st::grid_index g) {
    st::fanout_count(g, reo.data(), target.data(), rows, gpus, count.data(), present.data());
  });
  st::run_grid(1, 1, [&](st::grid_index g) { st::exclusive_scan(g, present.data(), n, row_at.data()); });
  st::run_grid(1, 1, [&](st::grid_index g) { st::exclusive_scan(g, count.data(), n, entry_at.data()); });
  const auto fan_rows = static_cast<std::size_t>(row_at[n]), fan_entries = static_cast<std::size_t>(entry_at[n]);
  std::vector<std::int32_t> out_row(fan_rows, -1), out_row_entries(fan_rows, -1), out_slot(fan_entries, -1),
      out_source(fan_entries, -1), targets(gpus + 1, -1);
  std::vector<float> out_weight(fan_entries, -1.0f);
  st::run_grid(grid[0], grid[1], [&](st::grid_index g) {
    st::fanout_place(g, reo.data(), target.data(), slot.data(), weight.data(), rows, gpus, row_at.data(),
                     entry_at.data(), out_row.data(), out_row_entries.data(), out_slot.data(), out_weight.data(),
                     out_source.data());
    st::fanout_targets(g, row_at.data(), rows, gpus, targets.data());
  });
  const node_fanout f = make_node_fanout(gpus, row_entries, target, slot, weight);
  BOOST_TEST(targets == f.target_row_offsets, boost::test_tools::per_element());
  BOOST_TEST(out_row == f.rows, boost::test_tools::per_element());
  BOOST_TEST(out_row_entries == f.row_entry_counts, boost::test_tools::per_element());
  BOOST_TEST(out_slot == f.entry_slot, boost::test_tools::per_element());
  BOOST_TEST(out_weight == f.entry_weight, boost::test_tools::per_element());
  BOOST_TEST(out_source == f.entry_source, boost::test_tools::per_element());
}

} // namespace

BOOST_AUTO_TEST_CASE(fanout_bodies_equal_make_node_fanout_on_random_rows) {
  std::mt19937 rng(21);
  for (std::size_t gpus : {1, 2, 3, 8})
    for (std::size_t rows : {0, 1, 2, 41})
      for (const auto& grid : grids) {
        BOOST_TEST_CONTEXT(gpus << " GPUs, " << rows << " rows, grid " << grid[0] << " x " << grid[1]) {
          std::uniform_int_distribution<std::int32_t> entries(1, 5), tgt(0, static_cast<std::int32_t>(gpus) - 1),
              sl(0, 6);
          std::vector<std::int32_t> row_entries(rows), target, slot;
          std::vector<float> weight;
          for (auto& c : row_entries) {
            c = entries(rng);
            for (std::int32_t q = 0; q < c; ++q) {
              target.push_back(tgt(rng));
              slot.push_back(sl(rng));
              weight.push_back(static_cast<float>(target.size()) * 0.25f);
            }
          }
          check_fanout(gpus, row_entries, target, slot, weight, grid);
        }
      }
}

// What a rail peer receives from node layouts: the rows a hierarchical host layout sends to it.
BOOST_AUTO_TEST_CASE(fanout_bodies_equal_make_node_fanout_on_host_node_layouts) {
  const dynamic_topology topo(3, 4);
  std::vector<expert_id> table(12 * 2, empty_slot);
  for (std::size_t e = 0; e < 24; ++e)
    table[(e % 12) * 2 + e / 12] = static_cast<expert_id>(e);
  const expert_map map(24, 12, 2, table);
  const std::size_t tokens = 61, k = 6;
  std::mt19937 rng(23);
  std::vector<expert_id> ids(tokens * k), all(24);
  std::vector<float> w(tokens * k);
  std::iota(all.begin(), all.end(), 0);
  std::uniform_real_distribution<float> uw(0.01f, 1.0f);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    for (std::size_t j = 0; j < k; ++j) {
      ids[t * k + j] = all[j];
      w[t * k + j] = uw(rng);
    }
  }
  const routing<top_k<6>> r(std::move(ids), std::move(w), top_k<6>{});
  std::size_t forwarded = 0;
  for (std::size_t src = 0; src < topo.ranks(); ++src) {
    layout<top_k<6>> l;
    l.assign(r.view(), map, topo, src, layout_options{transport_kind::hierarchical, 1});
    for (std::size_t d = 0; d < topo.ranks(); ++d) {
      if (topo.node_of(d) == topo.node_of(src)) continue; // rail stage: rows to remote rail peers only
      const auto ro = l.rank_offsets(), reo = l.row_entry_offsets();
      std::vector<std::int32_t> row_entries, target, slot;
      std::vector<float> weight;
      for (auto row = ro[d]; row < ro[d + 1]; ++row) {
        row_entries.push_back(reo[static_cast<std::size_t>(row) + 1] - reo[static_cast<std::size_t>(row)]);
        for (auto e = static_cast<std::size_t>(reo[static_cast<std::size_t>(row)]);
             e < static_cast<std::size_t>(reo[static_cast<std::size_t>(row) + 1]); ++e) {
          target.push_back(l.entry_target()[e]);
          slot.push_back(l.entry_slot()[e]);
          weight.push_back(l.entry_weight()[e]);
          forwarded += static_cast<std::size_t>(l.entry_target()[e]) != topo.local_rank_of(d);
        }
      }
      BOOST_TEST_CONTEXT("source " << src << ", rail peer " << d) {
        check_fanout(4, row_entries, target, slot, weight, {3, 2});
      }
    }
  }
  BOOST_TEST(forwarded > 0); // rows do fan out past the rail peer
}

// The layout's "plan nothing" stage (a rank whose router flagged non-finite logits): with the flag
// clear the counts the host reads are the host layout's own, with it set they say no rows, no
// entries and no link copies - for topologies of one rank (fewer offsets than link classes) and of
// many, and every grid shape.
BOOST_AUTO_TEST_CASE(plan_nothing_zeroes_the_layout_counts_only_when_flagged) {
  std::mt19937 rng(31);
  for (const auto& [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 1}, {2, 2}, {3, 4}}) {
    const dynamic_topology topo(nodes, gpus);
    const std::size_t R = topo.ranks(), E = 2 * R + 1;
    std::vector<expert_id> table(R * 3, empty_slot);
    for (std::size_t e = 0; e < E; ++e)
      table[(e % R) * 3 + e / R] = static_cast<expert_id>(e);
    const expert_map map(E, R, 3, table);
    const std::size_t tokens = 40, k = 2;
    std::vector<expert_id> ids(tokens * k), all(E);
    std::iota(all.begin(), all.end(), 0);
    for (std::size_t t = 0; t < tokens; ++t) {
      std::shuffle(all.begin(), all.end(), rng);
      ids[t * k] = all[0];
      ids[t * k + 1] = all[1];
    }
    const routing<top_k<2>> r(std::move(ids), std::vector<float>(tokens * k, 0.5f), top_k<2>{});
    layout<top_k<2>> l;
    l.assign(r.view(), map, topo, R - 1, layout_options{transport_kind::flat, 1});
    const std::vector<std::int32_t> ro(l.rank_offsets().begin(), l.rank_offsets().end()),
        reo(l.rank_entry_offsets().begin(), l.rank_entry_offsets().end()),
        sc(l.slot_counts().begin(), l.slot_counts().end());
    const std::vector<unsigned long long> links(l.link_copies().begin(), l.link_copies().end());
    BOOST_TEST_REQUIRE(ro.back() > 0); // the layout does send rows, so zeroing them is visible
    BOOST_TEST_REQUIRE(sc.size() == R * 3);
    for (const auto& g : grids)
      for (const unsigned long long flag : {0ull, 1ull, 7ull}) {
        auto ro2 = ro, reo2 = reo, sc2 = sc;
        std::vector<std::int32_t> reach(R, 5);
        auto links2 = links;
        st::run_grid(g[0], g[1], [&](st::grid_index i) {
          st::plan_nothing_if(i, &flag, R, ro2.data(), reo2.data(), sc2.data(), sc2.size(), reach.data(),
                              links2.data());
        });
        BOOST_TEST_CONTEXT(R << " ranks, grid " << g[0] << " x " << g[1] << ", flag " << flag) {
          if (flag == 0) {
            BOOST_TEST(ro2 == ro);
            BOOST_TEST(reo2 == reo);
            BOOST_TEST(sc2 == sc);
            BOOST_TEST(links2 == links);
            BOOST_TEST(reach == std::vector<std::int32_t>(R, 5));
          } else {
            BOOST_TEST(reach == std::vector<std::int32_t>(R, 0));
            BOOST_TEST(ro2 == std::vector<std::int32_t>(R + 1, 0));
            BOOST_TEST(reo2 == std::vector<std::int32_t>(R + 1, 0));
            BOOST_TEST(sc2 == std::vector<std::int32_t>(R * 3, 0));
            BOOST_TEST(links2 == std::vector<unsigned long long>(3, 0));
          }
        }
      }
  }
}

// The device receive layout (entry_rows → slot_chunk_count → exclusive_scan → slot_offsets_of →
// slot_chunk_place) equals the host receive_layout: same offsets, same order, same weights.
BOOST_AUTO_TEST_CASE(receive_layout_bodies_equal_the_host_receive_layout) {
  std::mt19937 rng(16);
  const std::array<std::array<std::size_t, 2>, 3> grids{{{1, 1}, {2, 3}, {5, 32}}};
  for (const std::size_t slots : {1u, 3u, 32u})
    for (const std::size_t rows : {0u, 1u, 7u, 300u}) {
      std::uniform_int_distribution<std::int32_t> per_row(1, 8);
      std::uniform_int_distribution<std::int32_t> slot(0, static_cast<std::int32_t>(slots) - 1);
      std::uniform_real_distribution<float> weight(0.f, 1.f);
      std::vector<std::int32_t> counts(rows);
      for (auto& c : counts)
        c = per_row(rng);
      const auto entries = static_cast<std::size_t>(std::accumulate(counts.begin(), counts.end(), 0));
      std::vector<std::int32_t> slot_of(entries);
      std::vector<float> w(entries);
      for (std::size_t e = 0; e < entries; ++e) {
        slot_of[e] = slot(rng);
        w[e] = weight(rng);
      }
      receive_layout host;
      host.assign(slots, counts, slot_of, w);
      for (const std::size_t chunk : {1u, 4u, 32u})
        for (const auto& g : grids) {
          const std::size_t chunks = st::slot_chunks(entries, chunk);
          std::vector<std::int32_t> offsets(rows + 1), entry_row(entries, -1), count(slots * chunks, -1),
              at(slots * chunks + 1), slot_offsets(slots + 1), expert_row(entries, -1), position(entries, -1);
          std::vector<float> expert_weight(entries, -1.f);
          st::run_grid(1, 1, [&](st::grid_index i) { st::exclusive_scan(i, counts.data(), rows, offsets.data()); });
          st::run_grid(g[0], g[1],
                       [&](st::grid_index i) { st::entry_rows(i, offsets.data(), rows, entry_row.data()); });
          st::run_grid(g[0], g[1], [&](st::grid_index i) {
            st::slot_chunk_count(i, slot_of.data(), entries, slots, chunk, count.data());
          });
          st::run_grid(1, 1, [&](st::grid_index i) { st::exclusive_scan(i, count.data(), count.size(), at.data()); });
          st::run_grid(g[0], g[1], [&](st::grid_index i) {
            st::slot_offsets_of(i, at.data(), entries, slots, chunk, slot_offsets.data());
          });
          st::run_grid(g[0], g[1], [&](st::grid_index i) {
            st::slot_chunk_place(i, slot_of.data(), w.data(), entry_row.data(), entries, chunk, at.data(),
                                 expert_row.data(), expert_weight.data(), position.data());
          });
          BOOST_TEST_CONTEXT(slots << " slots, " << rows << " rows, chunk " << chunk << ", grid " << g[0] << " x "
                                   << g[1]) {
            BOOST_TEST(std::equal(offsets.begin(), offsets.end(), host.row_entry_offsets().begin(),
                                  host.row_entry_offsets().end()));
            BOOST_TEST(std::equal(slot_offsets.begin(), slot_offsets.end(), host.slot_offsets().begin(),
                                  host.slot_offsets().end()));
            BOOST_TEST(
                std::equal(expert_row.begin(), expert_row.end(), host.expert_row().begin(), host.expert_row().end()));
            // (no entries: both may be empty vectors, whose data() memcmp may not be given)
            BOOST_TEST((entries == 0 ||
                        std::memcmp(expert_weight.data(), host.expert_weight().data(), entries * sizeof(float)) == 0));
            BOOST_TEST(std::equal(position.begin(), position.end(), host.entry_position().begin(),
                                  host.entry_position().end()));
          }
        }
    }
}

// The receive-metadata check sets exactly the bits of what is wrong (a row without entries, entry
// counts that do not add up, a slot out of range), over several grids, and nothing on good
// metadata; the host receive_layout refuses the same inputs.
BOOST_AUTO_TEST_CASE(receive_metadata_check_flags_bad_metadata) {
  struct check_case {
    const char* what;
    std::vector<std::int32_t> counts, slot;
    std::int32_t bits;
  };
  const std::size_t slots = 4;
  const std::vector<check_case> cases{
      {"good", {2, 1, 3}, {0, 3, 1, 2, 2, 0}, 0},
      {"no rows, no entries", {}, {}, 0},
      {"row without entries", {2, 0, 1}, {0, 1, 2}, st::bad_row_entries},
      {"negative entry count", {2, -1, 2}, {0, 1, 2}, st::bad_row_entries | st::bad_entry_total},
      {"counts exceed entries", {2, 2, 1}, {0, 1, 2}, st::bad_entry_total},
      {"counts short of entries", {1, 1}, {0, 1, 2}, st::bad_entry_total},
      {"counts that wrap 32 bits", {2147483647, 2147483647, 4}, {0, 1, 2, 3}, st::bad_entry_total},
      {"entries with no rows", {}, {0}, st::bad_entry_total},
      {"negative slot", {1, 2}, {0, -1, 2}, st::bad_slot},
      {"slot past the end", {1, 2}, {0, 4, 2}, st::bad_slot},
      {"everything", {0, 5}, {7, 1}, st::bad_row_entries | st::bad_entry_total | st::bad_slot}};
  for (const auto& c : cases)
    for (const auto& g : grids) {
      std::int32_t flag = 0;
      unsigned long long total = 0;
      st::run_grid(g[0], g[1], [&](st::grid_index i) {
        st::receive_metadata_check(i, c.counts.data(), c.counts.size(), c.slot.data(), c.slot.size(), slots, &flag,
                                   &total);
      });
      st::run_grid(g[0], g[1], [&](st::grid_index i) { st::receive_total_check(i, &total, c.slot.size(), &flag); });
      BOOST_TEST_CONTEXT(c.what << ", grid " << g[0] << " x " << g[1]) { BOOST_TEST(flag == c.bits); }
    }
  for (const auto& c : cases) {
    BOOST_TEST_CONTEXT(c.what) {
      receive_layout host;
      if (c.bits == 0)
        BOOST_CHECK_NO_THROW(host.assign(slots, c.counts, c.slot, {}));
      else
        BOOST_CHECK_THROW(host.assign(slots, c.counts, c.slot, {}), locus::error);
    }
  }
}

// The count round's announced segments against what the receive layout counted: equal offsets
// leave the word alone, any difference sets bad_slot_counts, and a word already set (the build
// skipped) is left as it was, over several grids.
BOOST_AUTO_TEST_CASE(slot_offsets_check_compares_with_the_announced_segments) {
  const std::vector<std::int32_t> built{0, 2, 2, 5, 9};
  struct check_case {
    const char* what;
    std::vector<std::int32_t> expected;
    std::int32_t before, after;
  };
  const std::vector<check_case> cases{{"equal", built, 0, 0},
                                      {"first slot differs", {0, 1, 2, 5, 9}, 0, st::bad_slot_counts},
                                      {"only the end differs", {0, 2, 2, 5, 8}, 0, st::bad_slot_counts},
                                      {"already refused", {0, 1, 2, 5, 9}, st::bad_slot, st::bad_slot}};
  for (const auto& c : cases)
    for (const auto& g : grids) {
      std::int32_t flag = c.before;
      st::run_grid(g[0], g[1], [&](st::grid_index i) {
        st::slot_offsets_check(i, built.data(), c.expected.data(), built.size() - 1, &flag);
      });
      BOOST_TEST_CONTEXT(c.what << ", grid " << g[0] << " x " << g[1]) { BOOST_TEST(flag == c.after); }
    }
}

// zero_rows writes every element of every row, and nothing past them, over several grids.
BOOST_AUTO_TEST_CASE(zero_rows_clears_exactly_the_rows) {
  for (const std::size_t rows : {0u, 1u, 9u})
    for (const std::size_t hidden : {1u, 8u, 13u})
      for (const auto& g : grids) {
        std::vector<float> out(rows * hidden + 3, 5.0f);
        st::run_grid(g[0], g[1], [&](st::grid_index i) { st::zero_rows(i, rows, hidden, out.data()); });
        BOOST_TEST_CONTEXT(rows << " rows of " << hidden << ", grid " << g[0] << " x " << g[1]) {
          BOOST_TEST(std::all_of(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(rows * hidden),
                                 [](float v) { return v == 0.0f; }));
          BOOST_TEST(std::all_of(out.end() - 3, out.end(), [](float v) { return v == 5.0f; }));
        }
      }
}
