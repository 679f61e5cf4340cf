#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <locus/placement/engine_export.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace locus;
using namespace locus::placement;

BOOST_AUTO_TEST_SUITE(engine_export)

// 4 experts on 2 ranks × 3 slots, two slots empty. Loads 10, 40, 20, 30: rank 0 (holds 0, 1)
// gets the largest load per replica not on it (3: 30), rank 1 (holds 2, 3) then 1 (40).
BOOST_AUTO_TEST_CASE(fill_takes_the_largest_load_per_replica_not_on_the_rank) {
  const std::vector<expert_map> maps = {expert_map(4, 2, 3, {0, 1, empty_slot, 2, 3, empty_slot})};
  const auto full = fill_empty_slots(maps, {{10, 40, 20, 30}});
  BOOST_TEST(full[0].slot_table() == (std::vector<expert_id>{0, 1, 3, 2, 3, 1}), boost::test_tools::per_element());
  // Equal loads: the expert with most load from the slot's node that the node does not serve yet.
  // Nodes of one GPU: node 0 = rank 0, node 1 = rank 1.
  const auto by_node = fill_empty_slots(maps, {{1, 1, 1, 1}}, {{{0, 0, 5, 9}, {7, 3, 0, 0}}}, 1);
  BOOST_TEST(by_node[0].slot_table() == (std::vector<expert_id>{0, 1, 3, 2, 3, 0}), boost::test_tools::per_element());
  // No loads: fewest replicas, lowest id.
  const auto plain = fill_empty_slots(maps);
  BOOST_TEST(plain[0].slot_table() == (std::vector<expert_id>{0, 1, 2, 2, 3, 0}), boost::test_tools::per_element());
  BOOST_CHECK_THROW(fill_empty_slots(maps, {{1, 2, 3}}), invalid_input_error);
  BOOST_CHECK_THROW(fill_empty_slots(maps, {}, {}, 3), config_error);
}

// The rule written plainly (each slot in rank-major order scans its rank and node for every
// expert), against the fill's bookkeeping on random plans, loads and node loads, with ties.
BOOST_AUTO_TEST_CASE(fill_equals_the_rule_written_plainly) {
  std::mt19937 rng(31);
  for (int round = 0; round < 200; ++round) {
    const std::size_t experts = 2 + rng() % 9, gpn = 1 + rng() % 3, nodes = 1 + rng() % 3, ranks = gpn * nodes;
    const std::size_t per_rank = (experts + ranks - 1) / ranks + rng() % 3;
    std::vector<std::vector<slot_ref>> where(experts);
    std::vector<std::size_t> free_slots(ranks * per_rank);
    std::iota(free_slots.begin(), free_slots.end(), std::size_t{0});
    std::shuffle(free_slots.begin(), free_slots.end(), rng);
    for (std::size_t e = 0; e < experts; ++e) { // one copy each, some a second
      const std::size_t s = free_slots[e];
      where[e].push_back({static_cast<std::int32_t>(s / per_rank), static_cast<std::int32_t>(s % per_rank)});
    }
    for (std::size_t i = experts; i < free_slots.size() && rng() % 3 == 0; ++i)
      where[rng() % experts].push_back(
          {static_cast<std::int32_t>(free_slots[i] / per_rank), static_cast<std::int32_t>(free_slots[i] % per_rank)});
    const std::vector<expert_map> maps = {expert_map::from_replicas(experts, ranks, per_rank, where)};
    std::vector<std::vector<double>> load(1, std::vector<double>(experts));
    for (auto& x : load[0])
      x = static_cast<double>(rng() % 4); // ties
    std::vector<std::vector<std::vector<double>>> node_load(1, std::vector<std::vector<double>>(nodes));
    for (auto& row : node_load[0]) {
      row.resize(experts);
      for (auto& x : row)
        x = static_cast<double>(rng() % 3);
    }
    const bool with_nodes = rng() % 2;
    const auto got = fill_empty_slots(maps, load, with_nodes ? node_load : decltype(node_load){}, gpn);
    std::vector<expert_id> table = maps[0].slot_table();
    std::vector<std::size_t> count(experts, 0);
    for (const expert_id e : table)
      if (e != empty_slot) ++count[static_cast<std::size_t>(e)];
    for (std::size_t slot = 0; slot < table.size(); ++slot) {
      if (table[slot] != empty_slot) continue;
      const std::size_t rank = slot / per_rank, node = rank / gpn;
      const auto held = [&](std::size_t e, std::size_t from, std::size_t to) {
        for (std::size_t x = from; x < to; ++x)
          if (table[x] == static_cast<expert_id>(e)) return true;
        return false;
      };
      std::size_t best = experts;
      double best_share = 0, best_saved = 0;
      for (int pass = 0; pass < 2 && best == experts; ++pass)
        for (std::size_t e = 0; e < experts; ++e) {
          if (pass == 0 && held(e, rank * per_rank, (rank + 1) * per_rank)) continue;
          const double share = load[0][e] / static_cast<double>(std::max<std::size_t>(count[e], 1));
          const double saved =
              !with_nodes || held(e, node * gpn * per_rank, (node + 1) * gpn * per_rank) ? 0.0 : node_load[0][node][e];
          if (best == experts || share > best_share || (share == best_share && saved > best_saved)) {
            best = e;
            best_share = share;
            best_saved = saved;
          }
        }
      table[slot] = static_cast<expert_id>(best);
      ++count[best];
    }
    BOOST_TEST(got[0].slot_table() == table, boost::test_tools::per_element());
  }
}

BOOST_AUTO_TEST_CASE(eplb_arrays_list_slots_in_order_and_pad) {
  const std::vector<expert_map> maps = {expert_map(3, 2, 2, {0, 1, 2, 0})};
  const auto r = to_eplb_arrays(maps);
  BOOST_TEST(r.max_replicas == 2u);
  BOOST_TEST(r.physical_to_logical == (std::vector<std::int64_t>{0, 1, 2, 0}), boost::test_tools::per_element());
  BOOST_TEST(r.logical_to_physical == (std::vector<std::int64_t>{0, 3, 1, -1, 2, -1}),
             boost::test_tools::per_element());
  BOOST_TEST(r.logical_count == (std::vector<std::int64_t>{2, 1, 1}), boost::test_tools::per_element());
  const std::vector<expert_map> holed = {expert_map(3, 2, 2, {0, 1, 2, empty_slot})};
  BOOST_CHECK_THROW(to_eplb_arrays(holed), invalid_input_error);
}

// Hidden layers 0 (dense), 1 and 2 (MoE), 3 (dense): dense rows are p mod E.
BOOST_AUTO_TEST_CASE(sglang_has_a_row_per_hidden_layer_and_trtllm_keys_model_layers) {
  const std::vector<expert_map> maps = {expert_map(3, 2, 2, {2, 1, 0, 2}), expert_map(3, 2, 2, {1, 0, 2, 1})};
  const auto layers = model_layers::spaced(2, 1, 1, 4);
  const auto doc = sglang_json(maps, layers);
  const auto rows = doc.at("physical_to_logical_map").get<std::vector<std::vector<int>>>();
  BOOST_TEST(rows == (std::vector<std::vector<int>>{{0, 1, 2, 0}, {2, 1, 0, 2}, {1, 0, 2, 1}, {0, 1, 2, 0}}));
  BOOST_TEST(trtllm_yaml(maps, layers) == "num_slots: 4\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n"
                                          "  1: [2, 1, 0, 2]\n  2: [1, 0, 2, 1]\n");
  // DeepSeek-V3/R1 with MTP: TensorRT-LLM looks up the MTP layer (hidden layer count + i) and
  // raised KeyError at start-up without it; it gets the trivial placement. SGLang's file is as before.
  auto with_mtp = layers;
  with_mtp.mtp_layers = 1;
  BOOST_TEST(trtllm_yaml(maps, with_mtp) == "num_slots: 4\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n"
                                            "  1: [2, 1, 0, 2]\n  2: [1, 0, 2, 1]\n  4: [0, 1, 2, 0]\n");
  BOOST_TEST(sglang_json(maps, with_mtp) == doc);
  with_mtp.mtp_layers = model_layers::max_mtp_layers + 1;
  BOOST_CHECK_THROW(trtllm_yaml(maps, with_mtp), config_error);
  const auto v = vllm_json(maps);
  BOOST_TEST(v.at("logical_replica_count").dump() == "[[1,1,2],[1,2,1]]");
  BOOST_TEST(v.at("num_ranks").get<std::size_t>() == 2u);
  BOOST_CHECK_THROW(model_layers::spaced(2, 3, 1, 4), config_error); // layers 3, 4 of 4
  BOOST_CHECK_THROW(sglang_json(maps, model_layers::spaced(1, 0)), config_error);
  BOOST_CHECK_THROW(parse_engine_format("onnx"), config_error);
}

// A planned layer numbered among the MTP layers (TensorRT-LLM's statistics hold DeepSeek-V3's layer
// 61 beside 3..60): TensorRT-LLM keys it with its map, and the MTP layers the plan lacks with the
// trivial placement; SGLang's, vLLM's and EPLB's files leave it out.
BOOST_AUTO_TEST_CASE(planned_mtp_layers_are_trtllms_only) {
  const std::vector<expert_map> maps = {expert_map(3, 2, 2, {2, 1, 0, 2}), expert_map(3, 2, 2, {1, 0, 2, 1})};
  model_layers layers{{1, 2}, 2};
  BOOST_CHECK_THROW(layers.validate(2), config_error); // layer 2 of 2 hidden layers, no MTP layer
  layers.mtp_layers = 2;
  BOOST_TEST(layers.planned_mtp() == 1u);
  BOOST_TEST(trtllm_yaml(maps, layers) == "num_slots: 4\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n"
                                          "  1: [2, 1, 0, 2]\n  2: [1, 0, 2, 1]\n  3: [0, 1, 2, 0]\n");
  const auto rows = sglang_json(maps, layers).at("physical_to_logical_map").get<std::vector<std::vector<int>>>();
  BOOST_TEST(rows == (std::vector<std::vector<int>>{{0, 1, 2, 0}, {2, 1, 0, 2}}));
  BOOST_TEST(nlohmann::json::parse(export_text(engine_format::vllm, maps, layers)).at("physical_to_logical_map") ==
             vllm_json({maps[0]}).at("physical_to_logical_map"));
  BOOST_TEST(nlohmann::json::parse(export_text(engine_format::eplb, maps, layers)).at("phy2log").size() == 1u);
  model_layers past{{1, 4}, 2, 2}; // layer 4: past the two MTP layers 2 and 3
  BOOST_CHECK_THROW(past.validate(2), config_error);
  model_layers only{{2, 3}, 2, 2}; // every planned layer an MTP layer
  BOOST_CHECK_THROW(only.validate(2), config_error);
}

// The model layer where the planned MoE layers' numbering goes on past the plan, below the hidden
// layer count: a MoE layer an engine would serve with no plan (or a dense one: exporters say it).
BOOST_AUTO_TEST_CASE(unplanned_layers_are_found_by_the_plans_spacing) {
  BOOST_TEST(model_layers::spaced(26, 3, 1, 61).unplanned_layer() == 29u); // a 26-layer plan for DeepSeek-V3
  BOOST_TEST(model_layers::spaced(58, 3, 1, 61).unplanned_layer() == 0u);
  BOOST_TEST(model_layers::spaced(24, 1, 2, 48).unplanned_layer() == 0u); // Llama 4 Maverick
  BOOST_TEST(model_layers::spaced(20, 1, 2, 48).unplanned_layer() == 41u);
  BOOST_TEST(model_layers::spaced(1, 3, 1, 61).unplanned_layer() == 4u); // one layer: step 1
  BOOST_TEST(model_layers::spaced(1, 0, 1, 1).unplanned_layer() == 0u);
  BOOST_TEST((model_layers{{1, 2, 5}, 10}.unplanned_layer()) == 0u); // uneven: nothing to infer
  model_layers with_mtp{{3, 4, 5}, 5, 1};                            // layer 5 is the MTP layer
  BOOST_TEST(with_mtp.unplanned_layer() == 0u);
  with_mtp.hidden_layers = 6; // then 5 is a hidden layer: no MTP layer planned, none unplanned
  BOOST_TEST(with_mtp.unplanned_layer() == 0u);
  with_mtp.hidden_layers = 8;
  BOOST_TEST(with_mtp.unplanned_layer() == 6u);
}

// Llama 4 Maverick's MoE layers alternate with dense ones (hidden layers 1, 3, ..., 47 of 48): every
// other SGLang row is the trivial placement and TensorRT-LLM keys the odd layers; a step that
// passes the layer limit, or 0, is refused.
BOOST_AUTO_TEST_CASE(alternating_moe_layers_are_numbered_by_their_step) {
  std::vector<expert_map> maps;
  for (std::size_t l = 0; l < 24; ++l)
    maps.emplace_back(3, 2, 2, std::vector<expert_id>{static_cast<expert_id>(l % 3), 1, 2, 0});
  const auto layers = model_layers::spaced(24, 1, 2, 48);
  BOOST_TEST(layers.moe_layer.front() == 1u);
  BOOST_TEST(layers.moe_layer.back() == 47u);
  const auto rows = sglang_json(maps, layers).at("physical_to_logical_map").get<std::vector<std::vector<int>>>();
  BOOST_TEST_REQUIRE(rows.size() == 48u);
  for (std::size_t h = 0; h < 48; ++h)
    BOOST_TEST(rows[h] == (h % 2 == 0 ? std::vector<int>{0, 1, 2, 0}
                                      : std::vector<int>{static_cast<int>(((h - 1) / 2) % 3), 1, 2, 0}),
               "hidden layer " << h);
  const auto yaml = trtllm_yaml(maps, layers);
  BOOST_TEST(yaml.find("\n  1: [0, 1, 2, 0]\n  3: [1, 1, 2, 0]\n") != std::string::npos, yaml);
  BOOST_TEST(yaml.find("\n  47: [2, 1, 2, 0]\n") != std::string::npos, yaml);
  BOOST_TEST(yaml.find("\n  2: ") == std::string::npos, yaml);
  BOOST_TEST(model_layers::spaced(24, 1, 2).hidden_layers == 48u); // the last MoE layer + 1
  BOOST_CHECK_THROW(model_layers::spaced(24, 1, 0), config_error);
  BOOST_CHECK_THROW(model_layers::spaced(3, 0, max_hidden_layers / 2), config_error);
  BOOST_CHECK_THROW(model_layers::spaced(3, 1, static_cast<std::size_t>(-1) / 2), config_error);
  BOOST_CHECK_NO_THROW(model_layers::spaced(2, 0, max_hidden_layers - 1));
}

// Engine files list every hidden layer: an absurd layer index or count is refused before anything
// is built (one such number used to fill the machine's memory).
BOOST_AUTO_TEST_CASE(absurd_layer_numbers_are_refused) {
  BOOST_CHECK_THROW(model_layers::spaced(26, 4294967295u), config_error);
  BOOST_CHECK_THROW(model_layers::spaced(26, static_cast<std::size_t>(-1)), config_error);
  BOOST_CHECK_THROW(model_layers::spaced(26, 1, 1, 100000000), config_error);
  BOOST_CHECK_THROW(model_layers::spaced(max_hidden_layers, 1), config_error);
  BOOST_CHECK_NO_THROW(model_layers::spaced(max_hidden_layers - 1, 1));
  model_layers big;
  big.moe_layer = {1, 2};
  big.hidden_layers = max_hidden_layers + 1;
  BOOST_CHECK_THROW(big.validate(2), config_error);
}

BOOST_AUTO_TEST_SUITE_END()
