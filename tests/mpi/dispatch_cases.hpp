#pragma once

#include <limits>
// Random dispatch/combine cases shared by the local-transport unit tests and the MPI tests. A case
// is a pure function of its seed, so every rank (or thread) builds the same whole case and takes
// its own part; references are computed independently in double precision from the routing.
#include <algorithm>
#include <cmath>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/cost/traffic.hpp>
#include <random>
#include <vector>

namespace locus_test {

struct dispatch_case {
  locus::dynamic_topology topo{1, 1};
  std::size_t experts = 0, k = 0, hidden = 0;
  locus::expert_map map{1, 1, 1, std::vector<locus::expert_id>{0}};
  std::vector<locus::routing<>> routings; // per source rank
  bool skewed = false;
  std::size_t replicas = 0;

  // Input value of (rank, token, h): small integers over 16, exact in float.
  static float input(std::size_t rank, std::size_t token, std::size_t h) {
    return static_cast<float>(static_cast<int>((rank * 131 + token * 7 + h * 3) % 97) - 48) / 16.0f;
  }
  std::vector<float> inputs(std::size_t rank) const {
    const std::size_t n = routings[rank].tokens();
    std::vector<float> x(n * hidden);
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t h = 0; h < hidden; ++h)
        x[t * hidden + h] = input(rank, t, h);
    return x;
  }
  // Dense reference: every token through its top-k experts, expert e multiplying by (e + 1).
  std::vector<double> reference(std::size_t rank) const {
    const auto& r = routings[rank];
    std::vector<double> y(r.tokens() * hidden, 0.0);
    for (std::size_t t = 0; t < r.tokens(); ++t)
      for (std::size_t j = 0; j < k; ++j) {
        const double f = static_cast<double>(r.view().weight(t, j)) * (r.view().expert(t, j) + 1.0);
        for (std::size_t h = 0; h < hidden; ++h)
          y[t * hidden + h] += f * input(rank, t, h);
      }
    return y;
  }
  // The traffic model's copies: each source rank's tokens form one step with its own selector.
  locus::cost::layer_traffic model(locus::cost::transport_kind kind) const {
    locus::cost::traffic_counter<locus::dynamic_topology> counter(topo, kind);
    locus::cost::layer_traffic out(topo.ranks());
    for (std::size_t s = 0; s < topo.ranks(); ++s) {
      std::vector<std::uint32_t> sources(routings[s].tokens(), static_cast<std::uint32_t>(s));
      counter.count_step(map, routings[s].view(), {}, sources, out);
    }
    return out;
  }
};

// `map` with the slots of ranks 0 and 1 traded: the same sizes, another placement (a rank that
// steps with it disagrees with its peers).
inline locus::expert_map ranks_traded(const locus::expert_map& map) {
  auto table = map.slot_table();
  const auto S = static_cast<std::ptrdiff_t>(map.slots_per_rank());
  std::swap_ranges(table.begin(), table.begin() + S, table.begin() + S);
  return locus::expert_map(map.experts(), map.ranks(), map.slots_per_rank(), table);
}

// topologies: (nodes, gpus_per_node) with nodes * gpus == ranks.
inline dispatch_case make_case(std::uint64_t seed, std::size_t nodes, std::size_t gpus) {
  std::mt19937_64 rng(seed);
  dispatch_case c;
  c.topo = locus::dynamic_topology(nodes, gpus);
  const std::size_t ranks = nodes * gpus;
  c.experts = std::size_t{4} + rng() % 29;
  c.k = std::min<std::size_t>(1 + rng() % 6, c.experts);
  c.hidden = 1 + rng() % 12;
  c.skewed = rng() % 2 == 0;
  const std::size_t slots = (c.experts + ranks - 1) / ranks + 1 + rng() % 2;
  // Every expert once, in a random permutation of slots; then replicas of random experts into
  // free slots on ranks that do not hold that expert yet.
  std::vector<std::size_t> free_slots(ranks * slots);
  for (std::size_t i = 0; i < free_slots.size(); ++i)
    free_slots[i] = i;
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  std::vector<locus::expert_id> table(ranks * slots, locus::empty_slot);
  for (std::size_t e = 0; e < c.experts; ++e)
    table[free_slots[e]] = static_cast<locus::expert_id>(e);
  const std::size_t want = rng() % (free_slots.size() - c.experts + 1);
  for (std::size_t i = c.experts; i < free_slots.size() && c.replicas < want; ++i) {
    const auto e = static_cast<locus::expert_id>(rng() % c.experts);
    const std::size_t rank = free_slots[i] / slots;
    bool held = false;
    for (std::size_t s = 0; s < slots; ++s)
      held |= table[rank * slots + s] == e;
    if (held) continue;
    table[free_slots[i]] = e;
    ++c.replicas;
  }
  c.map = locus::expert_map(c.experts, ranks, slots, table);
  // Popularity: uniform or Zipf-like; a token draws k distinct experts by popularity.
  std::vector<double> pop(c.experts, 1.0);
  if (c.skewed)
    for (std::size_t e = 0; e < c.experts; ++e)
      pop[e] = 1.0 / std::pow(static_cast<double>(e + 1), 1.2);
  std::shuffle(pop.begin(), pop.end(), rng);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  for (std::size_t r = 0; r < ranks; ++r) {
    const std::size_t tokens = rng() % 5 == 0 ? 0 : rng() % 40; // some ranks are empty
    locus::routing<> routing(tokens, locus::top_k<>(c.k));
    for (std::size_t t = 0; t < tokens; ++t) {
      std::vector<double> p = pop;
      for (std::size_t j = 0; j < c.k; ++j) {
        std::discrete_distribution<std::size_t> pick(p.begin(), p.end());
        const std::size_t e = pick(rng);
        p[e] = 0.0;
        routing.view().expert(t, j) = static_cast<locus::expert_id>(e);
        routing.view().weight(t, j) = weight(rng);
      }
    }
    c.routings.push_back(std::move(routing));
  }
  return c;
}

// Relative error of y against the reference, with an absolute floor for values near zero.
inline double max_error(const std::vector<float>& y, const std::vector<double>& ref) {
  double worst = y.size() == ref.size() ? 0.0 : 1e30;
  for (std::size_t i = 0; i < std::min(y.size(), ref.size()); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(y[i]) - ref[i]) / std::max(1.0, std::abs(ref[i])));
  return worst;
}

// The test's experts: expert e multiplies its input by (e + 1). Calls f(row, h, value) for every
// value of every expert row a dispatch handle holds.
template <class Handle, class F>
void for_each_expert_value(const Handle& d, F&& f) {
  const auto experts = d.local_experts();
  const auto offsets = d.expert_offsets();
  for (std::size_t i = 0; i < experts.size(); ++i)
    for (std::size_t row = offsets[i]; row < offsets[i + 1]; ++row)
      for (std::size_t h = 0; h < d.hidden(); ++h)
        f(row, h, d.expert_input_row(row)[h] * static_cast<float>(experts[i] + 1));
}

// Runs the experts into the handle's output rows.
template <class Handle>
void run_experts(Handle& d) {
  auto out = d.expert_output();
  for_each_expert_value(d, [&](std::size_t row, std::size_t h, float v) { out[row * d.hidden() + h] = v; });
}

// The same experts with combine's weighted sum done here, as a fusing compute does: fills
// copy_sums() (which combine then sends) and leaves the output rows alone. With `write_first`,
// as a compute declaring writes_first_rows does: the sums come unzeroed (copy_sums_to_write) and
// each copy's first row writes its sum.
template <class Handle>
void run_experts_into_sums(Handle& d, bool write_first = false) {
  const auto copy = d.row_copies();
  const auto weight = d.row_weights();
  auto sums = write_first ? d.copy_sums_to_write() : d.copy_sums();
  const auto first = d.row_first();
  if (write_first) // what an earlier step may have left: every copy's first row must overwrite it
    for (std::size_t row = 0; row < copy.size(); ++row)
      if (first[row])
        std::fill_n(sums.begin() + static_cast<std::ptrdiff_t>(copy[row] * d.hidden()), d.hidden(),
                    std::numeric_limits<float>::quiet_NaN());
  for_each_expert_value(d, [&](std::size_t row, std::size_t h, float v) {
    float& sum = sums[copy[row] * d.hidden() + h];
    sum = (write_first && first[row] ? 0.0f : sum) + weight[row] * v;
  });
}

// Every expert row's payload is the input of some token of some rank: rows arrive unaltered.
template <class Handle>
bool payloads_are_inputs(const Handle& d, const dispatch_case& c) {
  for (std::size_t row = 0; row < d.expert_rows(); ++row) {
    bool found = false;
    for (std::size_t s = 0; s < c.routings.size() && !found; ++s)
      for (std::size_t t = 0; t < c.routings[s].tokens() && !found; ++t) {
        bool same = true;
        for (std::size_t h = 0; h < c.hidden && same; ++h)
          same = d.expert_input_row(row)[h] == dispatch_case::input(s, t, h);
        found = same;
      }
    if (!found) return false;
  }
  return true;
}

} // namespace locus_test
