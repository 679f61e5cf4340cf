#pragma once
//! @file
//! Re-planning with bounded migration: given the maps in service and a new window of traffic
//! (`plan_input` with `node_load` for the new window), produce maps that move at most
//! `max_moved_experts` expert weights in all (summed over layers) and report the bytes moved.
//! Moves are swaps of two single-copy experts between nodes (each swap moves two experts),
//! chosen greedily by the gain in local usage of the new window (remote pairs removed), across
//! all layers, while the two nodes' loads stay under (1 + balance_slack) × the mean or no worse
//! than before. Every other slot keeps its expert, so only swapped slots need new weights.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/placement/load_bound.hpp>
#include <locus/placement/locality.hpp>
#include <locus/placement/plan_input.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::placement {

//! Result of replan_bounded.
struct replan_result {
  std::vector<expert_map> maps;
  std::size_t experts_moved = 0; //!< slots whose expert changed
  std::uint64_t bytes_moved = 0; //!< experts_moved × expert_bytes
  double local_before = 0;       //!< new-window (token, expert) pairs on their node's copy, before
  double local_after = 0;        //!< the same, after
};

namespace detail::replan {
//! Usage of the new window that lands on a copy on the source node.
inline double local_usage(const expert_map& m, const std::vector<std::vector<double>>& u, std::size_t gpus) {
  double s = 0;
  const std::size_t nodes = u.size();
  for (std::size_t e = 0; e < m.experts(); ++e) {
    std::vector<bool> on(nodes, false);
    for (const slot_ref& r : m.replicas(e))
      on[static_cast<std::size_t>(r.rank) / gpus] = true;
    for (std::size_t n = 0; n < nodes; ++n)
      if (on[n]) s += u[n][e];
  }
  return s;
}
} // namespace detail::replan

//! See the file comment. @throws locus::config_error when the maps do not match `in`
inline replan_result replan_bounded(const std::vector<expert_map>& current, const plan_input& in,
                                    std::size_t max_moved_experts, std::uint64_t expert_bytes,
                                    double balance_slack = 0.05) {
  in.validate();
  LOCUS_REQUIRE(current.size() == in.layers(), config_error, "replan: ", current.size(), " maps for ", in.layers(),
                " layers");
  const std::size_t nodes = in.topology.nodes(), gpus = in.topology.gpus_per_node(), experts = in.experts;
  for (std::size_t l = 0; l < current.size(); ++l)
    LOCUS_REQUIRE(current[l].experts() == experts && current[l].ranks() == in.ranks(), config_error, "replan: layer ",
                  l, " map has ", current[l].experts(), " experts on ", current[l].ranks(), " ranks, expected ",
                  experts, " on ", in.ranks());
  const auto& nl = in.node_load;
  LOCUS_REQUIRE(!nl.empty(), config_error, "replan: needs the new window's per-node usage (plan_input::node_load)");

  replan_result out;
  std::vector<std::vector<expert_id>> tables;
  for (const auto& m : current) {
    tables.push_back(m.slot_table());
    out.local_before += detail::replan::local_usage(m, nl[&m - current.data()], gpus);
  }
  const std::size_t spr = current.front().slots_per_rank();
  std::vector<std::vector<double>> node_w(in.layers(), std::vector<double>(nodes, 0.0));
  std::vector<std::vector<double>> w(in.layers(), std::vector<double>(experts, 0.0));
  std::vector<double> cap(in.layers(), 0.0);
  for (std::size_t l = 0; l < in.layers(); ++l) {
    double total = 0;
    for (std::size_t n = 0; n < nodes; ++n)
      for (std::size_t e = 0; e < experts; ++e)
        w[l][e] += nl[l][n][e];
    for (double x : w[l])
      total += x;
    cap[l] = load_bound(total, nodes, balance_slack);
  }
  while (out.experts_moved + 2 <= max_moved_experts) {
    double best_gain = 1e-9;
    std::size_t bl = 0, bs1 = 0, bs2 = 0;
    bool found = false;
    for (std::size_t l = 0; l < in.layers(); ++l) {
      const auto& u = nl[l];
      const auto& tab = tables[l];
      // Single-copy experts and their slot; node loads by first copies.
      std::vector<std::int32_t> count(experts, 0);
      std::vector<std::size_t> slot(experts, 0);
      std::vector<double> load(nodes, 0.0);
      for (std::size_t s = 0; s < tab.size(); ++s)
        if (tab[s] != empty_slot) {
          ++count[static_cast<std::size_t>(tab[s])];
          slot[static_cast<std::size_t>(tab[s])] = s;
          load[s / spr / gpus] += w[l][static_cast<std::size_t>(tab[s])] / 1.0;
        }
      for (std::size_t e = 0; e < experts; ++e) {
        if (count[e] != 1) continue;
        const std::size_t a = slot[e] / spr / gpus;
        for (std::size_t f = e + 1; f < experts; ++f) {
          if (count[f] != 1) continue;
          const std::size_t x = slot[f] / spr / gpus;
          if (x == a) continue;
          const double gain = u[x][e] + u[a][f] - u[a][e] - u[x][f];
          if (gain <= best_gain) continue;
          const double na = load[a] - w[l][e] + w[l][f], nx = load[x] - w[l][f] + w[l][e];
          if (!keeps_load_bound(std::max(na, nx), std::max(load[a], load[x]), cap[l])) continue;
          best_gain = gain;
          bl = l;
          bs1 = slot[e];
          bs2 = slot[f];
          found = true;
        }
      }
    }
    if (!found) break;
    std::swap(tables[bl][bs1], tables[bl][bs2]);
    out.experts_moved += 2;
  }
  for (std::size_t l = 0; l < tables.size(); ++l) {
    out.maps.emplace_back(experts, in.ranks(), spr, std::move(tables[l]));
    out.local_after += detail::replan::local_usage(out.maps.back(), nl[l], gpus);
  }
  out.bytes_moved = static_cast<std::uint64_t>(out.experts_moved) * expert_bytes;
  return out;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::placement
