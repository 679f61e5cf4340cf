#include <boost/test/unit_test.hpp>
#include <locus/placement/engine_export.hpp>
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
  const auto layers = model_layers::contiguous(2, 1, 4);
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
  BOOST_CHECK_THROW(model_layers::contiguous(2, 3, 4), config_error); // layers 3, 4 of 4
  BOOST_CHECK_THROW(sglang_json(maps, model_layers::contiguous(1, 0)), config_error);
  BOOST_CHECK_THROW(parse_engine_format("onnx"), config_error);
}

// Engine files list every hidden layer: an absurd layer index or count is refused before anything
// is built (one such number used to fill the machine's memory).
BOOST_AUTO_TEST_CASE(absurd_layer_numbers_are_refused) {
  BOOST_CHECK_THROW(model_layers::contiguous(26, 4294967295u), config_error);
  BOOST_CHECK_THROW(model_layers::contiguous(26, static_cast<std::size_t>(-1)), config_error);
  BOOST_CHECK_THROW(model_layers::contiguous(26, 1, 100000000), config_error);
  BOOST_CHECK_THROW(model_layers::contiguous(max_hidden_layers, 1), config_error);
  BOOST_CHECK_NO_THROW(model_layers::contiguous(max_hidden_layers - 1, 1));
  model_layers big;
  big.moe_layer = {1, 2};
  big.hidden_layers = max_hidden_layers + 1;
  BOOST_CHECK_THROW(big.validate(2), config_error);
}

BOOST_AUTO_TEST_SUITE_END()
