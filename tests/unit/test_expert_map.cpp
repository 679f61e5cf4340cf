#define BOOST_TEST_MODULE expert_map
#include "../support/error_message.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <locus/core/expert_map.hpp>
#include <locus/core/expert_map_json.hpp>
#include <random>
#include <string>

using namespace locus;

namespace {

// A random valid map: every expert once, then random replicas into free slots.
expert_map random_map(std::mt19937& rng, std::size_t experts, std::size_t ranks, std::size_t slots) {
  std::vector<expert_id> table(ranks * slots, empty_slot);
  std::vector<std::size_t> order(ranks * slots);
  for (std::size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::size_t next = 0;
  for (std::size_t e = 0; e < experts; ++e)
    table[order[next++]] = static_cast<expert_id>(e);
  std::uniform_int_distribution<std::size_t> pick(0, experts - 1);
  for (; next < order.size(); ++next) {
    const std::size_t cell = order[next];
    const std::size_t e = pick(rng);
    bool on_rank = false;
    for (std::size_t s = 0; s < slots; ++s)
      on_rank |= table[cell / slots * slots + s] == static_cast<expert_id>(e);
    if (!on_rank && rng() % 2) table[cell] = static_cast<expert_id>(e);
  }
  return expert_map(experts, ranks, slots, table);
}
} // namespace

BOOST_AUTO_TEST_CASE(index_matches_brute_force_scan) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const std::size_t ranks = 1 + rng() % 8, slots = 1 + rng() % 6;
    const std::size_t experts = 1 + rng() % (ranks * slots);
    const expert_map m = random_map(rng, experts, ranks, slots);
    std::size_t occupied = 0;
    for (std::size_t e = 0; e < experts; ++e) {
      std::vector<slot_ref> expected;
      for (std::size_t r = 0; r < ranks; ++r)
        for (std::size_t s = 0; s < slots; ++s)
          if (m.slot_table()[r * slots + s] == static_cast<expert_id>(e))
            expected.push_back({static_cast<std::int32_t>(r), static_cast<std::int32_t>(s)});
      const auto got = m.replicas(e);
      BOOST_REQUIRE_EQUAL(got.size(), expected.size());
      BOOST_TEST(std::equal(got.begin(), got.end(), expected.begin()));
      BOOST_TEST(m.view().replica_count(static_cast<std::int32_t>(e)) == static_cast<std::int32_t>(expected.size()));
      for (std::size_t r = 0; r < ranks; ++r)
        BOOST_TEST(m.hosts(r, e) == std::any_of(expected.begin(), expected.end(), [&](const slot_ref& s) {
                     return s.rank == static_cast<std::int32_t>(r);
                   }));
      occupied += expected.size();
    }
    BOOST_TEST(m.replica_slots_used() == occupied - experts);
  }
}

BOOST_AUTO_TEST_CASE(invalid_maps_name_the_offender) {
  BOOST_TEST(locus_test::error_message([] {
               expert_map(4, 2, 2, {0, 1, 2, 9});
             }) == "slot (rank 1, slot 1) holds expert id 9, out of range [0, 4)");
  BOOST_TEST(locus_test::error_message([] {
               expert_map(4, 2, 2, {0, 1, 2, empty_slot});
             }) == "expert 3 is not hosted on any slot");
  // Two replicas on one rank are allowed and both listed.
  BOOST_TEST(expert_map(3, 2, 2, {0, 0, 1, 2}).replica_count(0) == 2u);
  BOOST_CHECK_THROW(expert_map(4, 2, 2, {0, 1, 2}), config_error);
  BOOST_CHECK_THROW(expert_map(5, 2, 2, {0, 1, 2, 3}), config_error);
  BOOST_CHECK_THROW(expert_map(0, 2, 2, {}), config_error);
  BOOST_TEST(locus_test::error_message([] {
               expert_map::from_replicas(2, 2, 1, {{{0, 0}}, {{0, 0}}});
             }) == "slot (rank 0, slot 0) is used twice: by expert 0 and by expert 1");
  BOOST_TEST(locus_test::error_message([] {
               expert_map::from_replicas(2, 2, 1, {{{0, 0}}, {{2, 0}}});
             }) == "expert 1 is given slot (rank 2, slot 0) outside the 2 × 1 slot table");
  const expert_map ok = expert_map::from_replicas(2, 2, 2, {{{0, 0}, {1, 1}}, {{1, 0}}});
  BOOST_TEST(ok.replica_count(0) == 2u);
  BOOST_TEST(ok.expert_at(0, 1) == empty_slot);
  BOOST_CHECK_THROW(ok.replicas(2), invalid_input_error);
  BOOST_CHECK_THROW(ok.expert_at(2, 0), invalid_input_error);
  BOOST_TEST((ok.experts_on(1) == std::vector<expert_id>{1, 0}));
}

// from_replicas sized its table from ranks × slots before checking them: 2^33 × 2^31 wrapped to
// an empty table, and slot (0, 0) was written past its end; 2^20 × 2^30 was a bad_alloc.
BOOST_AUTO_TEST_CASE(from_replicas_checks_sizes_before_sizing_the_table) {
  const std::vector<std::vector<slot_ref>> one{{slot_ref{0, 0}}};
  BOOST_CHECK_THROW(expert_map::from_replicas(1, std::size_t{1} << 33, std::size_t{1} << 31, one), config_error);
  BOOST_CHECK_THROW(expert_map::from_replicas(1, std::size_t{1} << 20, std::size_t{1} << 30, one), config_error);
  BOOST_CHECK_THROW(expert_map::from_replicas(0, 0, 0, {}), config_error);
  BOOST_TEST(expert_map::from_replicas(1, 1, 1, one).replica_count(0) == 1u);
}

BOOST_AUTO_TEST_CASE(json_round_trip) {
  std::mt19937 rng(11);
  std::vector<expert_map> layers;
  for (int l = 0; l < 5; ++l)
    layers.push_back(random_map(rng, 16, 4, 5));
  const auto path = std::filesystem::temp_directory_path() / "locus_test_expert_map.json";
  save_expert_maps(path.string(), layers);
  const auto loaded = load_expert_maps(path.string());
  BOOST_REQUIRE_EQUAL(loaded.size(), layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l)
    BOOST_TEST((loaded[l] == layers[l]));
  std::filesystem::remove(path);
}

// A plan saved with its topology reads it back; a file whose GPUs per node do not divide its
// ranks is refused, and a map that breaks an invariant is named with its file.
BOOST_AUTO_TEST_CASE(json_plan_keeps_its_topology) {
  const auto path = (std::filesystem::temp_directory_path() / "locus_test_expert_plan.json").string();
  std::vector<expert_map> layers = {expert_map(4, 4, 1, {0, 1, 2, 3}), expert_map(4, 4, 1, {3, 2, 1, 0})};
  save_expert_plan(path, {layers, {1, 2}, 3, 2});
  const auto back = load_expert_plan(path);
  BOOST_TEST(back.gpus_per_node == 2u);
  BOOST_TEST(back.hidden_layers == 3u);
  BOOST_TEST((back.model_layers == std::vector<std::size_t>{1, 2}));
  BOOST_TEST(load_expert_plan((save_expert_maps(path, layers), path)).gpus_per_node == 0u); // not saved: unknown
  BOOST_CHECK_THROW(save_expert_plan(path, {layers, {}, 0, 3}), config_error);
  // A model whose hidden layers end at or before a map's layer is refused on both ways (map check
  // took such a file that map export then refused).
  BOOST_CHECK_THROW(save_expert_plan(path, {layers, {1, 2}, 2, 2}), config_error);
  auto doc = expert_maps_to_json(layers);
  doc["model_layers"] = {1, 2};
  doc["hidden_layers"] = 2;
  write_file_atomically(path, doc.dump());
  BOOST_CHECK_THROW(load_expert_plan(path), format_error);
  doc["hidden_layers"] = 3;
  write_file_atomically(path, doc.dump());
  BOOST_TEST(load_expert_plan(path).hidden_layers == 3u);
  doc.erase("model_layers");
  doc.erase("hidden_layers");
  doc["gpus_per_node"] = 3;
  write_file_atomically(path, doc.dump());
  BOOST_CHECK_THROW(load_expert_plan(path), format_error);
  doc["gpus_per_node"] = 2;
  doc["layers"][0][1] = nlohmann::json::array({0}); // expert 0 twice, expert 1 nowhere
  write_file_atomically(path, doc.dump());
  try {
    (void)load_expert_plan(path);
    BOOST_ERROR("a map hosting no copy of expert 1 loaded");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(std::string(e.what()).find(path) != std::string::npos, e.what());
  }
  std::filesystem::remove(path);
}

BOOST_AUTO_TEST_CASE(json_errors_are_precise) {
  auto doc = expert_maps_to_json({expert_map(2, 2, 1, {0, 1})});
  BOOST_CHECK_NO_THROW(expert_maps_from_json(doc));
  auto bad = doc;
  bad["version"] = 99;
  BOOST_CHECK_THROW(expert_maps_from_json(bad), format_error);
  bad = doc;
  bad["layers"][0][1] = nlohmann::json::array({0, 1});
  try {
    expert_maps_from_json(bad);
    BOOST_FAIL("expected format_error");
  } catch (const format_error& e) {
    BOOST_TEST(e.message() == "expert map JSON: layer 0 rank 1 must list 1 slots");
  }
  // A slot that is not a whole number is named by its value ("is number" read as if it were one).
  for (const auto& [cell, text] :
       {std::pair{nlohmann::json(1.5), std::string("1.5, not a whole number")},
        std::pair{nlohmann::json(1.0), std::string("1.0, a float (ids are written as integers)")},
        std::pair{nlohmann::json("1"), std::string("string")}}) {
    bad = doc;
    bad["layers"][0][1][0] = cell;
    try {
      expert_maps_from_json(bad);
      BOOST_FAIL("expected format_error");
    } catch (const format_error& e) {
      BOOST_TEST(e.message() == "expert map JSON: layer 0 rank 1 slot 0 is " + text + ", expected an expert id or -1");
    }
  }
  bad = doc;
  bad["layers"][0][1][0] = 0; // expert 1 now hosted nowhere
  try {
    expert_maps_from_json(bad);
    BOOST_FAIL("expected invalid_input_error");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message() == "layer 0: expert 1 is not hosted on any slot");
  }
  const auto path = std::filesystem::temp_directory_path() / "locus_test_bad.json";
  std::ofstream(path) << "{ not json";
  BOOST_CHECK_THROW(load_expert_maps(path.string()), format_error);
  std::filesystem::remove(path);
  BOOST_CHECK_THROW(load_expert_maps("/nonexistent/locus.json"), io_error);
}

// Documents that used to escape as nlohmann exceptions (an abort in the driver), allocate what
// the file never paid for, or truncate ids silently to 32 bits.
BOOST_AUTO_TEST_CASE(hostile_map_documents_are_format_errors) {
  const auto doc = expert_maps_to_json({expert_map(2, 2, 1, {0, 1})});
  struct edit {
    const char* key;
    nlohmann::json value;
    const char* needle;
  };
  for (const auto& e :
       {edit{"format", 5, "\"format\" is 5, expected \"locus-expert-map\""},
        edit{"version", "1", "unsupported version \"1\""}, edit{"version", nullptr, "unsupported version null"},
        edit{"slots_per_rank", std::uint64_t{1} << 40, "\"slots_per_rank\" is 1099511627776, expected 1..2147483647"},
        edit{"ranks", -3, "\"ranks\" is -3, expected 1..2147483647"},
        edit{"experts", 0, "\"experts\" is 0, expected 1..2147483647"}}) {
    auto bad = doc;
    bad[e.key] = e.value;
    try {
      (void)expert_maps_from_json(bad);
      BOOST_FAIL("accepted " << e.key << " = " << e.value.dump());
    } catch (const format_error& x) {
      BOOST_TEST(x.message().find(e.needle) != std::string::npos, x.message());
    }
  }
  auto no_version = doc;
  no_version.erase("version");
  try {
    (void)expert_maps_from_json(no_version);
    BOOST_FAIL("accepted a map without a version");
  } catch (const format_error& x) {
    BOOST_TEST(x.message() == "expert map JSON: \"version\" is missing");
  }
  // Ids of 2^31 and 2^32 (which became expert 0), and -2.
  for (const nlohmann::json& id : {nlohmann::json(std::uint64_t{1} << 31), nlohmann::json(std::uint64_t{1} << 32),
                                   nlohmann::json(-2), nlohmann::json(std::uint64_t{18446744073709551615ull})}) {
    auto bad = doc;
    bad["layers"][0][0][0] = id;
    try {
      (void)expert_maps_from_json(bad);
      BOOST_FAIL("accepted id " << id.dump());
    } catch (const format_error& x) {
      BOOST_TEST(x.message().find("layer 0 rank 0 slot 0 holds expert " + id.dump() +
                                  ", expected -1 (empty) or 0..1") != std::string::npos,
                 x.message());
    }
  }
  {
    auto bad = doc;
    bad["layers"][0][0][0] = 0.5;
    BOOST_CHECK_THROW(expert_maps_from_json(bad), format_error);
    bad = doc;
    bad["layers"] = "x";
    BOOST_CHECK_THROW(expert_maps_from_json(bad), format_error);
    BOOST_CHECK_THROW(expert_maps_from_json(nlohmann::json::array()), format_error);
  }
  // A value nested deeper than nlohmann's recursive dump() has stack for (a 400 KB file) overflowed
  // the stack while the message quoting it was written.
  for (const char* key : {"format", "version", "experts"}) {
    auto bad = doc;
    bad[key] = nlohmann::json::parse(std::string(200000, '[') + std::string(200000, ']'));
    BOOST_CHECK_THROW(expert_maps_from_json(bad), format_error);
  }
  // A map cut short on disk is named a truncation.
  const auto path =
      std::filesystem::temp_directory_path() / ("locus_test_truncated_" + std::to_string(::getpid()) + ".json");
  const std::string text = doc.dump(1);
  std::ofstream(path) << text.substr(0, text.size() / 2);
  try {
    (void)load_expert_maps(path.string());
    BOOST_FAIL("accepted a truncated map");
  } catch (const format_error& x) {
    BOOST_TEST(x.message().find("the file looks truncated") != std::string::npos, x.message());
  }
  std::filesystem::remove(path);
  // expert_map itself: 3 ranks × 6148914691236517206 slots wraps 64 bits to 2, which matched a
  // two-entry table.
  BOOST_CHECK_THROW(expert_map(2, 3, 6148914691236517206ull, {0, 1}), config_error);
}
