#define BOOST_TEST_MODULE core
#include <array>
#include <atomic>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <locus/locus.hpp>
#include <pthread.h>
#include <type_traits>
#include <vector>

using namespace locus;

BOOST_AUTO_TEST_SUITE(extents)

BOOST_AUTO_TEST_CASE(static_extents_store_nothing_and_fold) {
  static_assert(experts<256>::is_static && !experts<>::is_static);
  static_assert(experts<256>::value() == 256);
  static_assert(std::is_empty_v<top_k<8>>);
  static_assert(sizeof(moe_shape<experts<256>, top_k<8>, hidden<7168>>) == 1);
  constexpr moe_shape<experts<256>, top_k<8>, hidden<7168>> s;
  static_assert(s.experts() == 256 && s.top_k() == 8 && s.hidden() == 7168 && s.shared_experts() == 0);
  BOOST_TEST(s.top_k() == 8u);
}

BOOST_AUTO_TEST_CASE(dynamic_extents_hold_their_value) {
  experts<> e(64);
  BOOST_TEST(e.value() == 64u);
  BOOST_CHECK_THROW(experts<>(0), config_error);
  BOOST_CHECK_THROW(nodes<>(0), config_error);
  BOOST_CHECK_NO_THROW(shared_experts<>(0));
  // A static extent accepts its own value and refuses any other.
  BOOST_CHECK_NO_THROW(experts<64>(64));
  BOOST_CHECK_THROW(experts<64>(63), config_error);
}

BOOST_AUTO_TEST_CASE(static_and_dynamic_shapes_agree) {
  using fixed = moe_shape<experts<64>, top_k<6>, hidden<2048>, shared_experts<2>>;
  const fixed a;
  const dynamic_moe_shape b(64, 6, 2048, 2);
  const moe_shape<experts<64>, top_k<>, hidden<2048>> mixed(64, 6, 2048);
  BOOST_TEST(a.experts() == b.experts());
  BOOST_TEST(a.top_k() == b.top_k());
  BOOST_TEST(a.hidden() == b.hidden());
  BOOST_TEST(a.shared_experts() == b.shared_experts());
  BOOST_TEST(mixed.top_k() == 6u);
}

BOOST_AUTO_TEST_CASE(invalid_dynamic_shapes_raise) {
  BOOST_CHECK_THROW(dynamic_moe_shape(8, 9, 16), config_error);
  BOOST_CHECK_THROW(dynamic_moe_shape(0, 1, 16), config_error);
  BOOST_CHECK_THROW(dynamic_moe_shape(8, 0, 16), config_error);
  BOOST_CHECK_THROW((moe_shape<experts<64>, top_k<>, hidden<>>(32, 6, 16)), config_error);
  try {
    dynamic_moe_shape(8, 9, 16);
    BOOST_FAIL("expected a config_error");
  } catch (const config_error& e) {
    BOOST_TEST(std::string(e.what()).find("top_k (9) exceeds the number of experts (8)") != std::string::npos);
    BOOST_TEST(e.kind() == error_kind::config);
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(topologies)

// Independent reference: enumerate nodes and local ranks in order and count.
template <class Topo>
void check_mapping(const Topo& t, std::size_t n, std::size_t g) {
  BOOST_TEST(t.ranks() == n * g);
  std::size_t rank = 0;
  for (std::size_t node = 0; node < n; ++node)
    for (std::size_t local = 0; local < g; ++local, ++rank) {
      BOOST_TEST(t.node_of(rank) == node);
      BOOST_TEST(t.local_rank_of(rank) == local);
      BOOST_TEST(t.rank_of(node, local) == rank);
    }
  for (std::size_t a = 0; a < t.ranks(); ++a)
    for (std::size_t b = 0; b < t.ranks(); ++b) {
      const link_class expected =
          a == b ? link_class::same_gpu : (a / g == b / g ? link_class::intra_node : link_class::inter_node);
      BOOST_TEST(static_cast<int>(t.link(a, b)) == static_cast<int>(expected));
    }
}

BOOST_AUTO_TEST_CASE(rank_mapping_static_and_dynamic) {
  check_mapping(topology<nodes<4>, gpus_per_node<2>>{}, 4, 2);
  check_mapping(topology<nodes<8>, gpus_per_node<8>>{}, 8, 8);
  check_mapping(dynamic_topology(3, 5), 3, 5);
  check_mapping(topology<nodes<>, gpus_per_node<1>>(7, 1), 7, 1);
  static_assert(topology<nodes<8>, gpus_per_node<8>>{}.ranks() == 64);
  static_assert(topology<nodes<8>, gpus_per_node<8>>{}.node_of(17) == 2);
}

BOOST_AUTO_TEST_CASE(invalid_topologies_raise) {
  BOOST_CHECK_THROW(dynamic_topology(0, 8), config_error);
  BOOST_CHECK_THROW(dynamic_topology(2, 0), config_error);
  BOOST_CHECK_THROW((topology<nodes<4>, gpus_per_node<>>(3, 2)), config_error);
  const dynamic_topology t(2, 2);
  BOOST_CHECK_THROW(t.check_rank(4), invalid_input_error);
  BOOST_CHECK_NO_THROW(t.check_rank(3));
#if LOCUS_HAS_BOUNDS_CHECKS()
  BOOST_CHECK_THROW(t.node_of(4), bounds_error);
#endif
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(routing_views)

BOOST_AUTO_TEST_CASE(views_index_token_major) {
  std::vector<expert_id> ids = {3, 1, 0, 2, 7, 5};
  std::vector<float> w = {0.5f, 0.25f, 0.125f, 0.0625f, 1.f, 2.f};
  routing_view<top_k<2>, expert_id, float> v(ids.data(), w.data(), 3);
  BOOST_TEST(v.tokens() == 3u);
  BOOST_TEST(v.expert(1, 1) == 2);
  BOOST_TEST(v.weight(2, 0) == 1.f);
  v.expert(0, 0) = 4;
  BOOST_TEST(ids[0] == 4);
  const routing_view<top_k<2>> cv = v; // non-const to const conversion
  BOOST_TEST(cv.token_ids(2)[1] == 5);
  const auto sub = cv.subview(1, 2);
  BOOST_TEST(sub.tokens() == 2u);
  BOOST_TEST(sub.expert(0, 0) == 0);
  // Static and dynamic top_k read the same elements.
  routing_view<top_k<>> dv(ids.data(), w.data(), 3, top_k<>(2));
  for (std::size_t t = 0; t < 3; ++t)
    for (std::size_t j = 0; j < 2; ++j)
      BOOST_TEST(dv.expert(t, j) == cv.expert(t, j));
  static_assert(std::is_trivially_copyable_v<routing_view<top_k<8>>>);
  static_assert(std::is_trivially_copyable_v<device_routing_view<top_k<>>>);
}

#if LOCUS_HAS_BOUNDS_CHECKS()
BOOST_AUTO_TEST_CASE(views_check_bounds) {
  std::vector<expert_id> ids(4);
  routing_view<top_k<2>, expert_id, float> v(ids.data(), nullptr, 2);
  BOOST_CHECK_THROW(v.expert(2, 0), bounds_error);
  BOOST_CHECK_THROW(v.expert(0, 2), bounds_error);
  BOOST_CHECK_THROW(v.weight(0, 0), bounds_error); // no weights
  BOOST_CHECK_THROW(v.subview(1, 2), bounds_error);
}
#endif

BOOST_AUTO_TEST_CASE(validation_names_the_problem) {
  routing<top_k<2>> r({0, 1, 2, 9}, {0.5f, 0.5f, 0.5f, 0.5f});
  try {
    validate_routing(r.view(), 8);
    BOOST_FAIL("expected invalid_input_error");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message() == "token 1 choice 1: expert id 9 is out of range [0, 8)");
  }
  r.ids()[3] = 2;
  BOOST_CHECK_THROW(validate_routing(r.view(), 8), invalid_input_error); // expert 2 twice
  r.ids()[3] = 3;
  r.weights()[2] = std::numeric_limits<float>::quiet_NaN();
  BOOST_CHECK_THROW(validate_routing(r.view(), 8), invalid_input_error);
  r.weights()[2] = 0.25f;
  BOOST_CHECK_NO_THROW(validate_routing(r.view(), 8));
  BOOST_CHECK_THROW((routing<top_k<2>>({0, 1, 2}, {1.f, 1.f, 1.f})), invalid_input_error);
  // Tokens without ids: refused, not dereferenced (this was a null read).
  const float w[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  BOOST_CHECK_THROW(validate_routing(routing_view<top_k<2>>(nullptr, w, 2), 8), invalid_input_error);
  BOOST_CHECK_NO_THROW(validate_routing(routing_view<top_k<2>>(nullptr, nullptr, 0), 8));
}

// 2^62 tokens × top_k 4 wrapped to empty arrays, and the routing claimed 2^62 tokens over them.
BOOST_AUTO_TEST_CASE(routing_sizes_that_wrap_are_refused) {
  BOOST_CHECK_THROW(routing<top_k<>>(std::size_t{1} << 62, top_k<>(4)), invalid_input_error);
  BOOST_CHECK_THROW(routing<top_k<8>>(SIZE_MAX / 4), invalid_input_error);
  BOOST_TEST(routing<top_k<>>(3, top_k<>(2)).ids().size() == 6u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(messages_carry_kind_location_and_code) {
  try {
    LOCUS_THROW(transport_error, "rank ", 3, " expected ", 10, " tokens");
  } catch (const error& e) {
    const std::string what = e.what();
    BOOST_TEST(what.rfind("locus: transport error: rank 3 expected 10 tokens [", 0) == 0);
    BOOST_TEST(what.find("test_core.cpp:") != std::string::npos);
    BOOST_TEST(e.line() > 0);
  }
  const io_error io("cannot open x", "f.cpp", 7, 2);
  BOOST_TEST(io.code() == 2);
  const format_error f("bad magic", 4);
  BOOST_TEST(f.offset() == 4u);
  BOOST_TEST(f.kind() == error_kind::format);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(policies)

struct my_router {
  using policy_concept = router_tag;
};
struct my_transport {
  using policy_concept = transport_tag;
};
struct default_router {
  using policy_concept = router_tag;
};
struct default_backend {
  using policy_concept = backend_tag;
};

// A backend names its memory space and itself; the tag alone does not make one.
struct tag_only_backend {
  using policy_concept = backend_tag;
};
static_assert(backend_policy<backend::host> && !backend_policy<tag_only_backend> && !backend_policy<default_router>);

BOOST_AUTO_TEST_CASE(policies_in_any_order_with_defaults) {
  static_assert(policy_of<my_router, router_tag> && !policy_of<my_transport, router_tag> &&
                !policy_of<int, router_tag>);
  using a = policy_set<my_transport, my_router>;
  using b = policy_set<my_router, my_transport>;
  static_assert(std::is_same_v<a::get<router_tag, default_router>, my_router>);
  static_assert(std::is_same_v<b::get<transport_tag, void>, my_transport>);
  static_assert(std::is_same_v<b::get<backend_tag, default_backend>, default_backend>);
  BOOST_TEST(true);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(host_utilities)

BOOST_AUTO_TEST_CASE(parallel_for_covers_every_index_once_for_any_thread_count) {
  for (unsigned threads : {1u, 2u, 3u, 7u}) {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{5}, std::size_t{1000}}) {
      std::vector<int> hits(n, 0);
      parallel_for(n, 3, threads, [&](std::size_t b, std::size_t e, unsigned) {
        for (std::size_t i = b; i < e; ++i)
          ++hits[i];
      });
      for (std::size_t i = 0; i < n; ++i)
        BOOST_TEST(hits[i] == 1);
    }
  }
}

BOOST_AUTO_TEST_CASE(parallel_for_rethrows_a_worker_exception) {
  BOOST_CHECK_THROW(parallel_for(100, 1, 4u,
                                 [](std::size_t b, std::size_t, unsigned) {
                                   if (b > 0) throw config_error("chunk failed");
                                 }),
                    config_error);
}

#ifdef __GLIBC__
// With no thread to be had (the process's thread or memory limits), parallel_for threw the
// std::thread's system_error, after starting none or (worse) some threads, whose destructors then
// ended the process. Every chunk now runs, on the caller. A default stack no mapping can hold makes
// every thread start fail.
BOOST_AUTO_TEST_CASE(parallel_for_runs_on_the_caller_when_no_thread_starts) {
  pthread_attr_t before, huge;
  BOOST_REQUIRE(pthread_getattr_default_np(&before) == 0);
  BOOST_REQUIRE(pthread_attr_init(&huge) == 0);
  BOOST_REQUIRE(pthread_attr_setstacksize(&huge, std::size_t{1} << 46) == 0);
  BOOST_REQUIRE(pthread_setattr_default_np(&huge) == 0);
  std::vector<int> hits(1000, 0);
  std::vector<unsigned> workers(1000, 99);
  bool threw = false;
  try {
    parallel_for(hits.size(), 3, 4u, [&](std::size_t b, std::size_t e, unsigned w) {
      for (std::size_t i = b; i < e; ++i) {
        ++hits[i];
        workers[i] = w;
      }
    });
  } catch (...) {
    threw = true;
  }
  pthread_setattr_default_np(&before);
  pthread_attr_destroy(&huge);
  pthread_attr_destroy(&before);
  BOOST_TEST(!threw);
  for (std::size_t i = 0; i < hits.size(); ++i) {
    BOOST_TEST(hits[i] == 1);
    BOOST_TEST(workers[i] == i * 4 / hits.size()); // chunk w keeps its worker number
  }
}
#endif

// A cancel_scope's flag is seen by its thread and by parallel_for's workers, not by other threads;
// scopes nest and restore the outer flag.
BOOST_AUTO_TEST_CASE(cancel_scopes_nest_and_reach_parallel_for_workers) {
  BOOST_TEST(!cancel_requested());
  BOOST_CHECK_NO_THROW(throw_if_cancelled());
  std::atomic<bool> outer{true}, inner{false};
  {
    const cancel_scope a(outer);
    BOOST_CHECK_THROW(throw_if_cancelled(), cancelled_error);
    {
      const cancel_scope b(inner);
      BOOST_CHECK_NO_THROW(throw_if_cancelled());
      inner = true;
      BOOST_TEST(cancel_requested());
    }
    BOOST_TEST(cancel_requested()); // the outer scope's flag again
    std::array<std::atomic<int>, 4> seen{};
    parallel_for(4, 1, 4u, [&](std::size_t b, std::size_t, unsigned) { seen[b] = cancel_requested() ? 1 : 2; });
    for (const auto& s : seen)
      BOOST_TEST(s.load() == 1);
    // The error says what happened, and is its own kind.
    try {
      throw_if_cancelled();
    } catch (const error& e) {
      BOOST_TEST(e.kind() == error_kind::cancelled);
      BOOST_TEST(std::string(e.what()) == "locus: cancelled: the computation was cancelled");
    }
  }
  BOOST_TEST(!cancel_requested());
  std::array<std::atomic<int>, 4> seen{};
  parallel_for(4, 1, 4u, [&](std::size_t b, std::size_t, unsigned) { seen[b] = cancel_requested() ? 1 : 2; });
  for (const auto& s : seen)
    BOOST_TEST(s.load() == 2);
}

BOOST_AUTO_TEST_CASE(bfloat16_rounds_to_nearest_even_and_keeps_specials) {
  // Reference: round the float's bit pattern by hand in 64-bit arithmetic.
  auto reference = [](float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    const std::uint64_t low = u & 0xffffu, high = u >> 16;
    std::uint64_t r = high;
    if (low > 0x8000u || (low == 0x8000u && (high & 1u))) ++r;
    return static_cast<std::uint16_t>(r);
  };
  for (float f : {0.0f, -0.0f, 1.0f, 1.00390625f, 1.001953125f, 1.005859375f, 3.14159f, -2.5e-3f, 65504.0f, 1e30f,
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::denorm_min()}) {
    BOOST_TEST(bfloat16(f).bits == reference(f), "value " << f);
    const float back = static_cast<float>(bfloat16(f));
    BOOST_TEST(bfloat16(back).bits == bfloat16(f).bits); // round trip is exact
  }
  BOOST_TEST(std::isnan(static_cast<float>(bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  BOOST_TEST(static_cast<float>(bfloat16(1.0f)) == 1.0f);
}

BOOST_AUTO_TEST_SUITE_END()
