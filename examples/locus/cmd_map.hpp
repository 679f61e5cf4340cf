#pragma once
// `locus map ...`: expert-map tools.
#include <locus/core/expert_map_json.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>

namespace locus_driver {

// `locus map check`: validate a saved plan and summarise it.
inline int map_check(const std::string& path) {
  const auto layers = locus::load_expert_maps(path);
  const auto& m = layers.front();
  std::size_t replicas = 0;
  for (const auto& l : layers) replicas += l.replica_slots_used();
  std::printf("%s: %zu layers, %zu experts, %zu ranks x %zu slots, %zu replica slots in use\n", path.c_str(),
              layers.size(), m.experts(), m.ranks(), m.slots_per_rank(), replicas);
  return 0;
}

inline void register_map(CLI::App& app) {
  auto* map_cmd = app.add_subcommand("map", "Expert-map tools");
  map_cmd->require_subcommand(1);
  auto* check = map_cmd->add_subcommand("check", "Validate a saved expert map and summarise it");
  auto path = std::make_shared<std::string>();
  check->add_option("file", *path, "Expert map JSON")->required()->check(CLI::ExistingFile);
  check->callback([path] { map_check(*path); });
}

} // namespace locus_driver
