#define BOOST_TEST_MODULE layout
#include "../support/replica_reference.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <locus/cost/traffic.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/permute.hpp>
#include <locus/transport/replica_selection.hpp>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using namespace locus;
using namespace locus::transport;

namespace {

struct shape_case {
  std::size_t experts, k, nodes, gpus, slots, tokens;
  std::size_t empty_ranks; // ranks left without any expert
  std::size_t replicas;    // extra replica slots filled
};

// A random valid map: every expert once on a random non-empty rank's slot, then `replicas` extra
// copies of random experts in free slots (possibly on a rank already holding the expert).
expert_map random_map(const shape_case& s, std::mt19937& rng) {
  const std::size_t ranks = s.nodes * s.gpus;
  std::vector<std::size_t> usable;
  for (std::size_t r = s.empty_ranks; r < ranks; ++r)
    usable.push_back(r);
  std::shuffle(usable.begin(), usable.end(), rng);
  std::vector<std::size_t> free_slots;
  for (std::size_t r : usable)
    for (std::size_t sl = 0; sl < s.slots; ++sl)
      free_slots.push_back(r * s.slots + sl);
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  BOOST_REQUIRE(free_slots.size() >= s.experts + s.replicas);
  std::vector<expert_id> table(ranks * s.slots, empty_slot);
  std::size_t next = 0;
  for (std::size_t e = 0; e < s.experts; ++e)
    table[free_slots[next++]] = static_cast<expert_id>(e);
  std::uniform_int_distribution<std::size_t> pick(0, std::min<std::size_t>(s.experts, 6) - 1); // hot experts
  for (std::size_t i = 0; i < s.replicas; ++i)
    table[free_slots[next++]] = static_cast<expert_id>(pick(rng));
  return expert_map(s.experts, ranks, s.slots, table);
}

routing<top_k<>> random_routing(std::size_t tokens, std::size_t experts, std::size_t k, std::mt19937& rng) {
  std::vector<expert_id> ids(tokens * k);
  std::vector<float> w(tokens * k);
  std::vector<expert_id> all(experts);
  std::iota(all.begin(), all.end(), 0);
  std::uniform_real_distribution<float> u(0.01f, 1.0f);
  for (std::size_t t = 0; t < tokens; ++t) {
    // Skewed: half the tokens draw from the first few experts (so replicas get balanced).
    const std::size_t pool = (t % 2 == 0) ? std::max(k, std::min<std::size_t>(experts, 8)) : experts;
    std::shuffle(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(pool), rng);
    for (std::size_t j = 0; j < k; ++j) {
      ids[t * k + j] = all[j];
      w[t * k + j] = u(rng);
    }
  }
  return routing<top_k<>>(std::move(ids), std::move(w), top_k<>(k));
}

// ---------------------------------------------------------------------------------------------
// Brute-force reference: replica choice by the rule's text (tests/support/replica_reference.hpp),
// rows as tuples sorted with std::sort, entries found by scanning.

struct ref_row {
  std::int32_t send_rank, lead, token;
  std::vector<std::int32_t> copies; // ordered by (rank, slot)
  std::int32_t forwards = 0;
  bool operator<(const ref_row& o) const {
    return std::tie(send_rank, lead, token) < std::tie(o.send_rank, o.lead, o.token);
  }
};

struct ref_layout {
  std::vector<std::int32_t> rank, slot, replica;
  std::vector<ref_row> rows;
  std::vector<std::int32_t> slot_counts;
};

ref_layout reference(const routing<top_k<>>& r, const expert_map& map, const dynamic_topology& topo, std::size_t src,
                     transport_kind kind) {
  ref_layout out;
  locus_test::replica_reference sel(map, topo, kind);
  const std::size_t k = r.top_k(), G = topo.gpus_per_node(), S = map.slots_per_rank();
  out.slot_counts.assign(map.slot_count(), 0);
  for (std::size_t t = 0; t < r.tokens(); ++t)
    for (const std::int32_t idx : sel.token(src, std::span<const expert_id>(r.ids().data() + t * k, k))) {
      const slot_ref s = map.view().replicas[idx];
      out.rank.push_back(s.rank);
      out.slot.push_back(s.slot);
      out.replica.push_back(idx);
      ++out.slot_counts[static_cast<std::size_t>(s.rank) * S + static_cast<std::size_t>(s.slot)];
    }
  for (std::size_t t = 0; t < r.tokens(); ++t) {
    std::map<std::int32_t, std::vector<std::int32_t>> by_send;
    for (std::size_t j = 0; j < k; ++j) {
      const std::int32_t c = static_cast<std::int32_t>(t * k + j), dst = out.rank[static_cast<std::size_t>(c)];
      std::int32_t to = dst;
      if (kind == transport_kind::hierarchical && topo.node_of(static_cast<std::size_t>(dst)) != topo.node_of(src))
        to = static_cast<std::int32_t>(
            topo.rank_of(topo.node_of(static_cast<std::size_t>(dst)), topo.local_rank_of(src)));
      by_send[to].push_back(c);
    }
    for (auto& [to, copies] : by_send) {
      ref_row row{to, INT32_MAX, static_cast<std::int32_t>(t), copies};
      std::sort(row.copies.begin(), row.copies.end(), [&](std::int32_t a, std::int32_t b) {
        return std::pair(out.rank[static_cast<std::size_t>(a)], out.slot[static_cast<std::size_t>(a)]) <
               std::pair(out.rank[static_cast<std::size_t>(b)], out.slot[static_cast<std::size_t>(b)]);
      });
      std::set<std::int32_t> targets;
      for (std::int32_t c : copies) {
        const std::int32_t dst = out.rank[static_cast<std::size_t>(c)];
        const std::int32_t lead = kind == transport_kind::flat
                                      ? out.slot[static_cast<std::size_t>(c)]
                                      : (dst % static_cast<std::int32_t>(G)) * static_cast<std::int32_t>(S) +
                                            out.slot[static_cast<std::size_t>(c)];
        row.lead = std::min(row.lead, lead);
        if (dst != to) targets.insert(dst);
      }
      row.forwards = static_cast<std::int32_t>(targets.size());
      out.rows.push_back(row);
    }
  }
  std::sort(out.rows.begin(), out.rows.end());
  return out;
}

template <class TopK>
void check_against_reference(const layout<TopK>& l, const ref_layout& ref, const routing<top_k<>>& r) {
  const std::size_t n = ref.rank.size();
  BOOST_REQUIRE_EQUAL(l.copies(), n);
  for (std::size_t c = 0; c < n; ++c) {
    BOOST_REQUIRE_EQUAL(l.copy_rank()[c], ref.rank[c]);
    BOOST_REQUIRE_EQUAL(l.copy_slot()[c], ref.slot[c]);
    BOOST_REQUIRE_EQUAL(l.copy_replica()[c], ref.replica[c]);
  }
  BOOST_REQUIRE_EQUAL(l.rows(), ref.rows.size());
  std::vector<std::int32_t> rank_count(l.ranks(), 0);
  std::size_t entry = 0;
  for (std::size_t i = 0; i < ref.rows.size(); ++i) {
    const ref_row& row = ref.rows[i];
    ++rank_count[static_cast<std::size_t>(row.send_rank)];
    BOOST_REQUIRE_EQUAL(l.row_token()[i], row.token);
    BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(l.row_entry_offsets()[i]), entry);
    if (l.kind() == transport_kind::hierarchical)
      BOOST_REQUIRE_EQUAL(l.forwards(i), static_cast<std::size_t>(row.forwards));
    for (std::int32_t c : row.copies) {
      const auto uc = static_cast<std::size_t>(c);
      BOOST_REQUIRE_EQUAL(l.entry_copy()[entry], c);
      BOOST_REQUIRE_EQUAL(l.copy_entry()[uc], static_cast<std::int32_t>(entry));
      BOOST_REQUIRE_EQUAL(l.copy_row()[uc], static_cast<std::int32_t>(i));
      BOOST_REQUIRE_EQUAL(l.entry_slot()[entry], ref.slot[uc]);
      BOOST_REQUIRE_EQUAL(l.entry_target()[entry], ref.rank[uc] % static_cast<std::int32_t>(l.gpus_per_node()));
      BOOST_REQUIRE_EQUAL(l.entry_weight()[entry], r.weights()[uc]);
      ++entry;
    }
  }
  BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(l.row_entry_offsets()[l.rows()]), entry);
  std::int32_t off = 0;
  for (std::size_t d = 0; d < l.ranks(); ++d) {
    BOOST_REQUIRE_EQUAL(l.rank_offsets()[d], off);
    BOOST_REQUIRE_EQUAL(l.rank_entry_offsets()[d], l.row_entry_offsets()[static_cast<std::size_t>(off)]);
    off += rank_count[d];
  }
  BOOST_REQUIRE_EQUAL(l.rank_offsets()[l.ranks()], off);
  BOOST_REQUIRE(
      std::equal(ref.slot_counts.begin(), ref.slot_counts.end(), l.slot_counts().begin(), l.slot_counts().end()));
}

const std::vector<shape_case> shapes = {
    // E, K, nodes, gpus, slots, tokens, empty ranks, replicas
    {8, 2, 2, 2, 3, 300, 0, 4},    {8, 2, 1, 1, 8, 50, 0, 0},     {8, 2, 1, 1, 10, 97, 0, 2},
    {64, 6, 2, 4, 11, 513, 1, 6},  {64, 6, 4, 2, 8, 200, 0, 0},   {128, 1, 4, 4, 10, 700, 2, 10},
    {128, 1, 1, 8, 17, 64, 0, 8},  {256, 8, 8, 8, 5, 400, 0, 40}, {256, 8, 4, 8, 10, 333, 3, 20},
    {256, 8, 16, 4, 4, 129, 0, 0}, {64, 6, 2, 4, 9, 0, 0, 3},     {16, 4, 3, 3, 2, 257, 0, 2},
};

} // namespace

BOOST_AUTO_TEST_CASE(layouts_match_brute_force_reference_and_traffic_model) {
  std::mt19937 rng(7);
  for (const shape_case& s : shapes) {
    const expert_map map = random_map(s, rng);
    const dynamic_topology topo(s.nodes, s.gpus);
    const auto r = random_routing(s.tokens, s.experts, s.k, rng);
    for (std::size_t src : {std::size_t{0}, topo.ranks() - 1, topo.ranks() / 2}) {
      for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
        BOOST_TEST_CONTEXT("E=" << s.experts << " K=" << s.k << " " << s.nodes << "x" << s.gpus << " src " << src << " "
                                << to_string(kind)) {
          layout<top_k<>> l;
          l.assign(r.view(), map, topo, src, layout_options{kind, 3, 16});
          check_against_reference(l, reference(r, map, topo, src, kind), r);
          // The traffic model's count for the same tokens, all on `src`.
          cost::layer_traffic traffic(topo.ranks());
          cost::traffic_counter counter(topo, kind == transport_kind::flat ? cost::transport_kind::flat
                                                                           : cost::transport_kind::hierarchical);
          const std::vector<std::uint32_t> sources(s.tokens, static_cast<std::uint32_t>(src));
          counter.count_step(map, r.view(), {}, sources, traffic);
          for (std::size_t c = 0; c < link_class_count; ++c)
            BOOST_CHECK_EQUAL(l.link_copies()[c], traffic.copies[c]);
          for (std::size_t d = 0; d < topo.ranks(); ++d) {
            std::uint64_t rows_d = 0;
            for (std::size_t sl = 0; sl < s.slots; ++sl)
              rows_d += static_cast<std::uint64_t>(l.slot_counts()[d * s.slots + sl]);
            BOOST_CHECK_EQUAL(rows_d, traffic.expert_rows[d]);
          }
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(results_do_not_depend_on_threads_or_static_extents) {
  std::mt19937 rng(11);
  const shape_case s{256, 8, 8, 8, 5, 3000, 0, 40};
  const expert_map map = random_map(s, rng);
  const auto r = random_routing(s.tokens, s.experts, s.k, rng);
  const dynamic_topology dyn_topo(8, 8);
  const topology<nodes<8>, gpus_per_node<8>> static_topo;
  const routing_view<top_k<8>> static_view(r.ids().data(), r.weights().data(), r.tokens());
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    layout<top_k<>> base;
    base.assign(r.view(), map, dyn_topo, 9, layout_options{kind, 1, 1});
    for (unsigned threads : {2u, 3u, 8u}) {
      layout<top_k<8>> l;
      l.assign(static_view, map, static_topo, 9, layout_options{kind, threads, 1});
      auto same = [](auto a, auto b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); };
      BOOST_TEST_CONTEXT(to_string(kind) << " threads " << threads) {
        BOOST_CHECK(same(l.copy_rank(), base.copy_rank()));
        BOOST_CHECK(same(l.copy_slot(), base.copy_slot()));
        BOOST_CHECK(same(l.copy_row(), base.copy_row()));
        BOOST_CHECK(same(l.row_token(), base.row_token()));
        BOOST_CHECK(same(l.rank_offsets(), base.rank_offsets()));
        BOOST_CHECK(same(l.entry_copy(), base.entry_copy()));
        BOOST_CHECK(same(l.entry_weight(), base.entry_weight()));
        BOOST_CHECK(same(l.slot_counts(), base.slot_counts()));
        BOOST_CHECK(l.link_copies() == base.link_copies());
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(node_fanout_covers_exactly_the_node_layouts_copies) {
  std::mt19937 rng(5);
  for (const shape_case& s : shapes) {
    const expert_map map = random_map(s, rng);
    const dynamic_topology topo(s.nodes, s.gpus);
    const auto r = random_routing(s.tokens, s.experts, s.k, rng);
    const std::size_t src = topo.ranks() - 1;
    const auto flat = make_layout(r.view(), map, topo, src, 2);
    const auto node = make_node_layout(r.view(), map, topo, src, 2);
    // Every (token, rank, slot, weight) the node layout's copies go to, as a multiset (its replica
    // choices may differ from the flat layout's: a copy joins a node its token already reaches).
    std::multiset<std::tuple<std::int32_t, std::int32_t, std::int32_t, float>> expected, got;
    for (std::size_t c = 0; c < node.copies(); ++c)
      expected.emplace(static_cast<std::int32_t>(c / s.k), node.copy_rank()[c], node.copy_slot()[c], r.weights()[c]);
    // Each receiving peer splits its rows by target local rank, from the metadata alone.
    std::uint64_t forwards = 0;
    for (std::size_t d = 0; d < topo.ranks(); ++d) {
      const auto r0 = static_cast<std::size_t>(node.rank_offsets()[d]),
                 r1 = static_cast<std::size_t>(node.rank_offsets()[d + 1]);
      const auto e0 = static_cast<std::size_t>(node.rank_entry_offsets()[d]),
                 e1 = static_cast<std::size_t>(node.rank_entry_offsets()[d + 1]);
      std::vector<std::int32_t> counts;
      for (std::size_t row = r0; row < r1; ++row)
        counts.push_back(node.row_entry_offsets()[row + 1] - node.row_entry_offsets()[row]);
      const auto f = make_node_fanout(topo.gpus_per_node(), counts, node.entry_target().subspan(e0, e1 - e0),
                                      node.entry_slot().subspan(e0, e1 - e0), node.entry_weight().subspan(e0, e1 - e0));
      std::size_t fe = 0;
      for (std::size_t g = 0; g < topo.gpus_per_node(); ++g) {
        const std::int32_t target = static_cast<std::int32_t>(topo.rank_of(topo.node_of(d), g));
        if (static_cast<std::size_t>(target) != d) forwards += f.row_count(g);
        for (auto i = f.target_row_offsets[g]; i < f.target_row_offsets[g + 1]; ++i)
          for (std::int32_t n = 0; n < f.row_entry_counts[static_cast<std::size_t>(i)]; ++n, ++fe)
            got.emplace(node.row_token()[r0 + static_cast<std::size_t>(f.rows[static_cast<std::size_t>(i)])], target,
                        f.entry_slot[fe], f.entry_weight[fe]);
      }
      BOOST_CHECK_EQUAL(fe, e1 - e0);
    }
    BOOST_CHECK(got == expected);
    std::uint64_t layout_forwards = 0;
    for (std::size_t row = 0; row < node.rows(); ++row)
      layout_forwards += node.forwards(row);
    BOOST_CHECK_EQUAL(forwards, layout_forwards);
    BOOST_CHECK_LE(node.link_copies()[2], flat.link_copies()[2]);
  }
}

namespace {

template <class T>
std::vector<T> random_vectors(std::size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<T> v(n);
  for (auto& x : v)
    x = T(u(rng));
  return v;
}

// The "expert": y = a_e * x + b_e elementwise, computed in double then stored as T.
double expert_fn(std::size_t e, double x) {
  return (0.5 + 0.01 * static_cast<double>(e)) * x + 0.001 * static_cast<double>(e);
}

template <class T>
void permute_and_combine(std::size_t hidden, double tolerance) {
  std::mt19937 rng(3);
  for (const shape_case& s : shapes) {
    const expert_map map = random_map(s, rng);
    const dynamic_topology topo(s.nodes, s.gpus);
    const std::size_t R = topo.ranks(), tokens = std::min<std::size_t>(s.tokens, 120);
    // Every rank sends its own tokens; the "transport" concatenates rows by source rank.
    std::vector<routing<top_k<>>> routings;
    std::vector<layout<top_k<>>> layouts(R);
    std::vector<std::vector<T>> x(R), send(R);
    for (std::size_t src = 0; src < R; ++src) {
      routings.push_back(random_routing(tokens, s.experts, s.k, rng));
      layouts[src].assign(routings[src].view(), map, topo, src, layout_options{transport_kind::flat, 2, 8});
      x[src] = random_vectors<T>(tokens * hidden, rng);
      send[src].resize(layouts[src].rows() * hidden);
      permute<T>(layouts[src], x[src], hidden, send[src], 2);
      for (std::size_t row = 0; row < layouts[src].rows(); ++row)
        BOOST_REQUIRE(std::equal(
            send[src].begin() + static_cast<std::ptrdiff_t>(row * hidden),
            send[src].begin() + static_cast<std::ptrdiff_t>((row + 1) * hidden),
            x[src].begin() +
                static_cast<std::ptrdiff_t>(static_cast<std::size_t>(layouts[src].row_token()[row]) * hidden)));
      std::vector<T> back(x[src].size());
      unpermute<T>(layouts[src], send[src], hidden, back, 3);
      BOOST_REQUIRE(back == x[src]);
    }
    std::vector<std::vector<T>> returned(R);
    for (std::size_t src = 0; src < R; ++src)
      returned[src].resize(layouts[src].rows() * hidden);
    for (std::size_t d = 0; d < R; ++d) {
      std::vector<T> recv;
      std::vector<std::int32_t> counts, slots;
      std::vector<float> weights;
      for (std::size_t src = 0; src < R; ++src) {
        const auto& l = layouts[src];
        const auto r0 = static_cast<std::size_t>(l.rank_offsets()[d]),
                   r1 = static_cast<std::size_t>(l.rank_offsets()[d + 1]);
        recv.insert(recv.end(), send[src].begin() + static_cast<std::ptrdiff_t>(r0 * hidden),
                    send[src].begin() + static_cast<std::ptrdiff_t>(r1 * hidden));
        for (std::size_t row = r0; row < r1; ++row)
          counts.push_back(l.row_entry_offsets()[row + 1] - l.row_entry_offsets()[row]);
        for (auto e = l.rank_entry_offsets()[d]; e < l.rank_entry_offsets()[d + 1]; ++e) {
          slots.push_back(l.entry_slot()[static_cast<std::size_t>(e)]);
          weights.push_back(l.entry_weight()[static_cast<std::size_t>(e)]);
        }
      }
      receive_layout rl;
      rl.assign(map.slots_per_rank(), counts, slots, weights);
      std::vector<T> in(rl.entries() * hidden), out(rl.entries() * hidden), rows_out(rl.rows() * hidden);
      gather_expert_input<T>(rl, recv, hidden, in, 2);
      for (std::size_t sl = 0; sl < map.slots_per_rank(); ++sl) {
        const auto e = map.expert_at(d, sl);
        for (auto i = static_cast<std::size_t>(rl.slot_offsets()[sl]);
             i < static_cast<std::size_t>(rl.slot_offsets()[sl + 1]); ++i) {
          BOOST_REQUIRE(e != empty_slot);
          for (std::size_t h = 0; h < hidden; ++h)
            out[i * hidden + h] =
                T(static_cast<float>(expert_fn(static_cast<std::size_t>(e), to_float(in[i * hidden + h]))));
        }
      }
      reduce_expert_output<T>(rl, out, hidden, rows_out, 2);
      std::size_t at = 0;
      for (std::size_t src = 0; src < R; ++src) {
        const auto& l = layouts[src];
        const auto r0 = static_cast<std::size_t>(l.rank_offsets()[d]),
                   r1 = static_cast<std::size_t>(l.rank_offsets()[d + 1]);
        std::copy(rows_out.begin() + static_cast<std::ptrdiff_t>(at * hidden),
                  rows_out.begin() + static_cast<std::ptrdiff_t>((at + r1 - r0) * hidden),
                  returned[src].begin() + static_cast<std::ptrdiff_t>(r0 * hidden));
        at += r1 - r0;
      }
    }
    for (std::size_t src = 0; src < R; ++src) {
      const auto& l = layouts[src];
      std::vector<T> y(tokens * hidden), yw(tokens * hidden), entry_out(l.copies() * hidden);
      combine<T>(l, returned[src], hidden, y, 2);
      for (std::size_t e = 0; e < l.copies(); ++e) {
        const auto c = static_cast<std::size_t>(l.entry_copy()[e]);
        const auto ex = static_cast<std::size_t>(routings[src].ids()[c]);
        for (std::size_t h = 0; h < hidden; ++h)
          entry_out[e * hidden + h] = T(static_cast<float>(expert_fn(ex, to_float(x[src][c / s.k * hidden + h]))));
      }
      combine_weighted<T>(l, entry_out, hidden, yw, 3);
      for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < hidden; ++h) {
          double ref = 0, mag = 0;
          for (std::size_t j = 0; j < s.k; ++j) {
            const double term =
                static_cast<double>(routings[src].weights()[t * s.k + j]) *
                expert_fn(static_cast<std::size_t>(routings[src].ids()[t * s.k + j]), to_float(x[src][t * hidden + h]));
            ref += term;
            mag += std::abs(term);
          }
          BOOST_REQUIRE_SMALL(static_cast<double>(to_float(y[t * hidden + h])) - ref, tolerance * (mag + 1e-3));
          BOOST_REQUIRE_SMALL(static_cast<double>(to_float(yw[t * hidden + h])) - ref, tolerance * (mag + 1e-3));
        }
    }
  }
}

template <class F>
void check_throws(F&& f, const std::string& needle) {
  try {
    f();
    BOOST_ERROR("no exception; expected one mentioning \"" << needle << "\"");
  } catch (const locus::error& e) {
    BOOST_CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos,
                        "message \"" << e.what() << "\" lacks \"" << needle << "\"");
  }
}

} // namespace

BOOST_AUTO_TEST_CASE(permute_unpermute_identity_and_combine_float) { permute_and_combine<float>(13, 1e-5); }
BOOST_AUTO_TEST_CASE(permute_unpermute_identity_and_combine_bf16) { permute_and_combine<bfloat16>(8, 3e-2); }

BOOST_AUTO_TEST_CASE(invalid_inputs_are_named) {
  const dynamic_topology topo(2, 2);
  const expert_map map(8, 4, 2, {0, 1, 2, 3, 4, 5, 6, 7});
  layout<top_k<>> l;
  routing<top_k<>> bad_id({0, 9, 1, 2}, {1, 1, 1, 1}, top_k<>(2));
  check_throws([&] { l.assign(bad_id.view(), map, topo, 0); }, "token 0 choice 1: expert id 9 out of range");
  routing<top_k<>> negative({0, 1, -1, 2}, {1, 1, 1, 1}, top_k<>(2));
  check_throws([&] { l.assign(negative.view(), map, topo, 0); }, "token 1 choice 0: expert id -1");
  routing<top_k<>> twice({0, 1, 3, 3}, {1, 1, 1, 1}, top_k<>(2));
  check_throws([&] { l.assign(twice.view(), map, topo, 0); }, "token 1: expert 3 is chosen twice");
  routing<top_k<>> nan_weight({0, 1, 2, 3}, {1, 1, 1, std::nanf("")}, top_k<>(2));
  check_throws([&] { l.assign(nan_weight.view(), map, topo, 0); }, "token 1 choice 1");
  routing<top_k<>> ok({0, 1, 2, 3}, {1, 1, 1, 1}, top_k<>(2));
  check_throws([&] { l.assign(ok.view(), map, topo, 4); }, "source rank 4 out of range");
  check_throws([&] { l.assign(ok.view(), map, dynamic_topology(1, 2), 0); },
               "the expert map has 4 ranks but the topology has 2");
  l.assign(ok.view(), map, topo, 0);
  std::vector<float> x(2 * 4), send(l.rows() * 4 + 1);
  check_throws([&] { permute<float>(l, x, 4, send); }, "send holds");
  std::vector<float> short_x(7);
  check_throws([&] { unpermute<float>(l, std::vector<float>(l.rows() * 4), 4, short_x); }, "tokens holds 7 values");
  receive_layout rl;
  const std::vector<std::int32_t> counts{1, 2}, slots{0, 1, 2};
  check_throws([&] { rl.assign(2, counts, slots); }, "entry 2 names slot 2");
  const std::vector<std::int32_t> slots2{0, 1};
  check_throws([&] { rl.assign(2, counts, slots2); }, "exceed the 2 entries");
  check_throws(
      [&] {
        (void)make_node_fanout(2, counts, std::vector<std::int32_t>{0, 5, 1}, slots, {});
      },
      "targets local rank 5");
  // A count whose sum passes 2^31 - 1 is refused before the sum (a signed overflow before).
  check_throws(
      [&] {
        (void)make_node_fanout(2, std::vector<std::int32_t>{1, INT32_MAX}, std::vector<std::int32_t>{0, 1, 1}, slots,
                               {});
      },
      "exceed the 3 entries");
  routing<top_k<>> no_weights_r({0, 1, 2, 3}, {1, 1, 1, 1}, top_k<>(2));
  const routing_view<top_k<>> no_weights(no_weights_r.ids().data(), nullptr, 2, top_k<>(2));
  l.assign(no_weights, map, topo, 0);
  BOOST_CHECK(l.entry_weight().empty());
  std::vector<float> eo(l.copies() * 4), out(2 * 4);
  check_throws([&] { combine_weighted<float>(l, eo, 4, out); }, "without weights");
}

// Sizes whose products wrap 64 bits passed the checks built to refuse them: 2^62 tokens × top_k
// 4 passed the 32-bit copy bound (the layout then read past the ids), 2 tokens × hidden 2^63
// passed permute with empty spans, and receive_layout / make_node_fanout sized their tables from
// 2^64 - 1 + 1 = 0 and wrote past them.
BOOST_AUTO_TEST_CASE(sizes_that_wrap_are_refused) {
  const dynamic_topology topo(1, 2);
  const expert_map map(4, 2, 2, {0, 1, 2, 3});
  std::vector<expert_id> ids{0, 2, 1, 3};
  layout<top_k<>> l;
  const routing_view<top_k<>> huge(ids.data(), nullptr, std::size_t{1} << 62, top_k<>(4));
  check_throws([&] { l.assign(huge, map, topo, 0); }, "copies exceed 32-bit indices");
  l.assign(routing_view<top_k<>>(ids.data(), nullptr, 2, top_k<>(2)), map, topo, 0);
  std::vector<float> none;
  check_throws([&] { permute<float>(l, none, std::size_t{1} << 63, none); }, "tokens holds 0 values");
  check_throws([&] { combine<float>(l, none, std::size_t{1} << 63, none); }, "returned holds 0 values");
  receive_layout rl;
  const std::vector<std::int32_t> counts{1}, slots{0}, targets{0};
  BOOST_CHECK_THROW(rl.assign(SIZE_MAX, counts, slots), config_error);
  BOOST_CHECK_THROW(rl.assign(std::size_t{1} << 40, counts, slots), config_error);
  BOOST_CHECK_THROW((void)make_node_fanout(SIZE_MAX, counts, targets, slots), config_error);
  BOOST_CHECK_THROW((void)make_node_fanout(std::size_t{1} << 40, counts, targets, slots), config_error);
  BOOST_TEST(make_node_fanout(2, counts, targets, slots).row_count(0) == 1u);
}
