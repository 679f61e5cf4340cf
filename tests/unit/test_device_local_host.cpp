// The one-GPU transport's meeting protocol (transport/detail/device_local_protocol.hpp) run on the
// CPU with host memory (tests/support/host_local_device.hpp): the cases the CUDA test runs
// (tests/support/device_local_cases.hpp), and its failures: a rank that abandons a step makes every
// peer raise at once, a rank that never arrives makes its peers time out naming it, and a late one
// learns it came late. Ranks are threads; the TSan build checks the board they share.
#define BOOST_TEST_MODULE device_local_host
#include "../support/device_local_cases.hpp"
#include "../support/host_local_device.hpp"

#include <atomic>
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <latch>
#include <string>

namespace {

namespace dlc = locus_test::device_local_cases;
using namespace locus;
using namespace locus::transport;

struct host_harness {
  using fabric = locus_test::host_local_fabric;
  using endpoint = locus_test::host_local_transport;
  struct stream_owner {
    int s = 0;
  };
  template <class U>
  struct rows {
    std::vector<U> v;
    rows() = default;
    explicit rows(std::size_t n) : v(n) {}
    void resize(std::size_t n) { v.resize(n); }
    void upload(const std::vector<U>& x, int) { v = x; }
    U* data() noexcept { return v.data(); }
  };
  static std::vector<std::uint64_t> read_rows(endpoint& ep, const device_exchange_result& out) {
    ep.synchronize("the test's read");
    const auto* p = reinterpret_cast<const std::uint64_t*>(out.rows);
    return std::vector<std::uint64_t>(p, p + out.offsets.back());
  }
};

const std::byte* bytes_of(const std::vector<std::uint64_t>& v) { return reinterpret_cast<const std::byte*>(v.data()); }

} // namespace

BOOST_AUTO_TEST_CASE(rows_arrive_from_every_member_of_every_group) {
  dlc::rows_arrive_from_every_member_of_every_group<host_harness>();
}
BOOST_AUTO_TEST_CASE(disagreeing_counts_raise_on_every_member) {
  dlc::disagreeing_counts_raise_on_every_member<host_harness>();
}
BOOST_AUTO_TEST_CASE(host_dispatch_and_combine_over_the_transport_match_reference) {
  dlc::host_dispatch_and_combine_match_reference<host_harness>();
}
BOOST_AUTO_TEST_CASE(count_round_then_known_count_exchanges) {
  dlc::count_round_then_known_count_exchanges<host_harness>();
}
BOOST_AUTO_TEST_CASE(known_counts_and_tail_widths_are_checked) {
  dlc::known_counts_and_tail_widths_are_checked<host_harness>();
}
BOOST_AUTO_TEST_CASE(a_group_of_several_tiles_delivers_every_row) {
  dlc::a_group_of_several_tiles_delivers_every_row<host_harness>();
}
BOOST_AUTO_TEST_CASE(back_to_back_count_rounds) { dlc::back_to_back_count_rounds<host_harness>(); }
BOOST_AUTO_TEST_CASE(a_skipped_known_exchange_raises_on_every_member) {
  dlc::a_skipped_known_exchange_raises_on_every_member<host_harness>();
}

// Rank 2 leaves its step after one exchange (as device_dispatcher does on an error after its peers
// posted): each peer raises transport_error naming the reason by its next exchange at the latest
// (one that has already met may raise on leaving it), at once rather than at the 20 s timeout, and
// so does every exchange after that.
BOOST_AUTO_TEST_CASE(an_abandoned_step_makes_every_peer_raise_at_once) {
  const dynamic_topology topo(2, 2);
  locus_test::host_local_fabric fabric(topo, transport_kind::hierarchical,
                                       exchange_options{std::chrono::milliseconds(20000)});
  std::vector<std::string> first(topo.ranks()), later(topo.ranks());
  std::vector<int> raised_at(topo.ranks(), -1);
  const auto start = std::chrono::steady_clock::now();
  dlc::on_ranks(topo.ranks(), [&](std::size_t r) {
    auto ep = fabric.endpoint(r, 0);
    const std::size_t R = topo.ranks();
    const std::vector<std::uint64_t> send = dlc::world_rows(r, std::vector<std::size_t>(R, 1), 0);
    const std::vector<std::size_t> ones(R, 1);
    device_exchange_result out;
    if (r == 2) {
      ep.exchange_device_known(exchange_group::world, 8, bytes_of(send), ones, ones, out);
      ep.abandon("a failed allocation");
      return;
    }
    for (int i = 0; i < 2 && raised_at[r] < 0; ++i)
      try {
        ep.exchange_device_known(exchange_group::world, 8, bytes_of(send), ones, ones, out);
      } catch (const transport_error& e) {
        first[r] = e.what();
        raised_at[r] = i;
      }
    try {
      ep.exchange_device_known(exchange_group::world, 8, bytes_of(send), ones, ones, out);
    } catch (const transport_error& e) {
      later[r] = e.what();
    }
  });
  const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  BOOST_TEST(took.count() < 10.0);
  for (std::size_t r : {0u, 1u, 3u}) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_TEST(raised_at[r] >= 0);
      BOOST_TEST(first[r].find("rank 2 left a step half done (a failed allocation)") != std::string::npos, first[r]);
      BOOST_TEST(!later[r].empty());
    }
  }
}

// Rank 1 never joins the count round: the others (meeting first, so that both wait the same
// timeout) raise timeout_error after it, naming rank 1; when it arrives afterwards it learns the
// others gave up on it.
BOOST_AUTO_TEST_CASE(a_missing_rank_is_named_by_the_ranks_that_waited) {
  const dynamic_topology topo(1, 3);
  locus_test::host_local_fabric fabric(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(1000)});
  std::vector<std::string> said(topo.ranks());
  std::atomic<int> waited{0};
  std::latch both(2);
  dlc::on_ranks(topo.ranks(), [&](std::size_t r) {
    auto ep = fabric.endpoint(r, 0);
    const std::vector<std::size_t> ones(3, 1);
    device_counts counts;
    if (r == 1) {
      // Arrive only after both peers gave up (bounded: a peer that failed otherwise counts too).
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (waited.load() < 2 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else {
      both.arrive_and_wait();
    }
    try {
      ep.exchange_device_counts(exchange_group::world, 8, ones, 4, ones, counts, 1);
    } catch (const timeout_error& e) {
      said[r] = e.what();
    } catch (const std::exception& e) {
      said[r] = std::string("another error: ") + e.what();
    }
    if (r != 1) ++waited;
  });
  BOOST_TEST(said[0].find("device local transport: rank 0 waited 1000 ms") != std::string::npos, said[0]);
  BOOST_TEST(said[0].find("rank 1 did not arrive") != std::string::npos, said[0]);
  BOOST_TEST(said[2].find("rank 1 did not arrive") != std::string::npos, said[2]);
  BOOST_TEST(said[1].find("arrived late") != std::string::npos, said[1]);
}
