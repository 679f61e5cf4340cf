// The NCCL transport's protocol (transport/detail/nccl_protocol.hpp) on the CPU, ranks as threads
// over a host imitation of NCCL (tests/support/host_nccl.hpp): the device transports' shared cases
// (tests/support/device_local_cases.hpp) but those of the one-GPU transport's own checks, host
// dispatch and combine on every topology shape, and the failures: a lost peer, an asynchronous
// error, a failed post, a receive whose size its sender does not send, a communicator of another
// size. The CUDA test (tests/cuda/test_nccl_transport.cpp) runs the same protocol with NCCL on the
// one rank a GPU holds.
#define BOOST_TEST_MODULE nccl_protocol
#include "../support/device_local_cases.hpp"
#include "../support/host_nccl.hpp"

#include <boost/test/unit_test.hpp>
#include <chrono>
#include <cstring>
#include <latch>
#include <string>

namespace {

namespace dlc = locus_test::device_local_cases;
namespace hn = locus_test::host_nccl;
using namespace locus;
using namespace locus::transport;

struct nccl_harness {
  using endpoint = hn::transport;
  //! A world of ranks and what every endpoint is made with; endpoint(r, _) is rank r's transport
  //! (collective: every rank makes its own, on its own thread, with its own stream).
  struct fabric {
    fabric(const dynamic_topology& t, transport_kind k,
           exchange_options o = exchange_options{std::chrono::milliseconds(20000)})
        : topo(t), kind(k), options(o), world(t.ranks()) {}
    hn::transport endpoint(std::size_t r, int) {
      return hn::transport(world.comm(r), world.stream(r), topo, kind, options);
    }
    dynamic_topology topo;
    transport_kind kind;
    exchange_options options;
    hn::world world;
  };
  struct stream_owner {
    int s = 0;
  };
  //! Rows in the imitation's device memory; an upload is a copy queued on the stream.
  template <class U>
  struct rows {
    hn::array<U> v;
    rows() = default;
    explicit rows(std::size_t n) { v.resize(n); }
    void resize(std::size_t n) { v.resize(n); }
    void upload(const std::vector<U>& x, hn::stream_state* s) {
      v.resize(x.size());
      s->enqueue([dst = v.data(), x] {
        std::copy(x.begin(), x.end(), dst);
        return true;
      });
    }
    U* data() noexcept { return v.data(); }
  };
  static std::vector<std::uint64_t> read_rows(endpoint& ep, const device_exchange_result& out) {
    ep.synchronize("the test's read");
    const auto* p = reinterpret_cast<const std::uint64_t*>(out.rows);
    return std::vector<std::uint64_t>(p, p + out.offsets.back());
  }
};

const std::byte* bytes_of(const std::vector<std::uint64_t>& v) { return reinterpret_cast<const std::byte*>(v.data()); }

template <class E>
std::string message_if(const std::exception_ptr& p) {
  if (!p) return "no error";
  try {
    std::rethrow_exception(p);
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("another error: ") + e.what();
  }
}

} // namespace

BOOST_AUTO_TEST_CASE(rows_arrive_from_every_member_of_every_group) {
  dlc::rows_arrive_from_every_member_of_every_group<nccl_harness>();
}
BOOST_AUTO_TEST_CASE(disagreeing_counts_raise_on_every_member) {
  dlc::disagreeing_counts_raise_on_every_member<nccl_harness>();
}
BOOST_AUTO_TEST_CASE(host_dispatch_and_combine_over_the_transport_match_reference) {
  dlc::host_dispatch_and_combine_match_reference<nccl_harness>();
}
BOOST_AUTO_TEST_CASE(count_round_then_known_count_exchanges) {
  dlc::count_round_then_known_count_exchanges<nccl_harness>();
}
BOOST_AUTO_TEST_CASE(a_group_of_65_ranks_delivers_every_row) {
  dlc::a_group_of_several_tiles_delivers_every_row<nccl_harness>();
}
BOOST_AUTO_TEST_CASE(back_to_back_count_rounds) { dlc::back_to_back_count_rounds<nccl_harness>(); }

// Host dispatch and combine on shapes the shared case leaves out (one node, one GPU per node, odd
// counts), several seeds.
BOOST_AUTO_TEST_CASE(host_dispatch_and_combine_on_every_shape) {
  dlc::host_dispatch_and_combine_match_reference<nccl_harness>({{1, 1}, {1, 4}, {3, 1}, {2, 3}, {4, 2}}, {1, 2, 3});
}

// The byte counters of a self exchange, and a malformed request: it raises transport_error (a
// verdict of the complete header round) and leaves the transport usable.
BOOST_AUTO_TEST_CASE(one_rank_counts_its_bytes_and_survives_a_malformed_request) {
  nccl_harness::fabric fabric(dynamic_topology(1, 1), transport_kind::flat);
  auto t = fabric.endpoint(0, 0);
  const std::vector<std::uint64_t> rows{1, 2, 3, 4, 5};
  const std::vector<std::size_t> counts{rows.size()};
  exchange_result out;
  t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), counts, {}}, out);
  BOOST_TEST_REQUIRE(out.row_count() == rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::uint64_t v;
    std::memcpy(&v, out.row(i), sizeof v);
    BOOST_TEST(v == rows[i]);
  }
  BOOST_TEST(t.bytes().sent(link_class::same_gpu) == rows.size() * sizeof(std::uint64_t));
  const std::vector<std::size_t> wrong{rows.size(), 1};
  BOOST_CHECK_THROW(
      t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), wrong, {}}, out),
      transport_error);
  t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), counts, {}}, out);
  BOOST_TEST(out.row_count() == rows.size());
}

// Rank 3 never joins the count round: the others raise timeout_error naming the round and the
// group, every communicator they run on is aborted (each exactly once: the imitation counts them),
// and every later call raises transport_error. Rank 3's own transport, idle, destroys its own.
BOOST_AUTO_TEST_CASE(a_lost_peer_times_out_and_aborts_every_communicator) {
  const dynamic_topology topo(2, 2);
  nccl_harness::fabric fabric(topo, transport_kind::hierarchical, exchange_options{std::chrono::milliseconds(300)});
  std::vector<std::string> first(topo.ranks()), later(topo.ranks());
  std::vector<int> aborted(topo.ranks(), 0);
  dlc::on_ranks(topo.ranks(), [&](std::size_t r) {
    auto ep = fabric.endpoint(r, 0);
    if (r == 3) return;
    const std::vector<std::size_t> ones(topo.ranks(), 1);
    device_counts counts;
    try {
      ep.exchange_device_counts(exchange_group::world, 8, ones, 4, ones, counts, 1);
    } catch (const timeout_error& e) {
      first[r] = e.what();
    }
    aborted[r] = ep.communicator(exchange_group::world) == nullptr &&
                 ep.communicator(exchange_group::node) == nullptr && ep.communicator(exchange_group::rail) == nullptr;
    try {
      ep.synchronize("a later wait");
    } catch (const transport_error& e) {
      later[r] = e.what();
    }
  });
  for (std::size_t r = 0; r < 3; ++r)
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_TEST(first[r].find("in the header round of step 0 exchange #0 (stage 1) of an exchange over the world "
                               "group") != std::string::npos,
                 first[r]);
      BOOST_TEST(aborted[r] == 1);
      BOOST_TEST(later[r].find("unusable") != std::string::npos, later[r]);
    }
  BOOST_TEST(fabric.world.live() == 0);
}

// An asynchronous error reported by the communicators while rank 0 waits for a peer that does not
// come (rank 1 joins only once rank 0 has raised): the wait raises it and aborts every
// communicator, and the transport is unusable from then on.
BOOST_AUTO_TEST_CASE(an_asynchronous_error_aborts_and_raises) {
  const dynamic_topology topo(1, 2);
  nccl_harness::fabric fabric(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(2000)});
  std::exception_ptr first;
  std::string later;
  bool aborted = false;
  std::latch made(2), raised(1);
  dlc::on_ranks(2, [&](std::size_t r) {
    const std::vector<std::uint64_t> rows = dlc::world_rows(r, {1, 1}, 0);
    auto ep = fabric.endpoint(r, 0);
    made.arrive_and_wait(); // both constructors' waits are over
    const std::vector<std::size_t> ones{1, 1};
    device_exchange_result out;
    if (r == 1) {
      raised.wait();
      try {
        ep.exchange_device_known(exchange_group::world, 8, bytes_of(rows), ones, ones, out);
        ep.synchronize("rank 1's wait"); // raises too (the error, or the timeout): not checked
      } catch (...) {
      }
      return;
    }
    ep.exchange_device_known(exchange_group::world, 8, bytes_of(rows), ones, ones, out);
    fabric.world.raise_async_error();
    try {
      ep.synchronize("the test's wait");
    } catch (...) {
      first = std::current_exception();
    }
    aborted = ep.communicator(exchange_group::world) == nullptr && ep.communicator(exchange_group::node) == nullptr &&
              ep.communicator(exchange_group::rail) == nullptr;
    raised.count_down();
    try {
      ep.synchronize("a later wait");
    } catch (const transport_error& e) {
      later = e.what();
    }
  });
  BOOST_TEST(message_if<hn::failure>(first).find("an asynchronous error") != std::string::npos,
             message_if<hn::failure>(first));
  BOOST_TEST(aborted);
  BOOST_TEST(later.find("unusable") != std::string::npos, later);
  BOOST_TEST(fabric.world.live() == 0);
}

// Rank 3 takes part in the header round of an exchange and then fails to post its rows (its send
// fails, and it leaves the transport aborted): the others wait for its rows and raise timeout_error
// naming the row exchange; nobody returns rows that never came.
BOOST_AUTO_TEST_CASE(a_peer_lost_after_the_header_round_times_out_the_row_exchange) {
  const dynamic_topology topo(2, 2);
  nccl_harness::fabric fabric(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(300)});
  std::vector<std::string> said(topo.ranks());
  dlc::on_ranks(topo.ranks(), [&](std::size_t r) {
    const std::vector<std::size_t> ones(topo.ranks(), 1);
    const std::vector<std::uint64_t> rows = dlc::world_rows(r, ones, 0);
    nccl_harness::rows<std::uint64_t> send;
    auto ep = fabric.endpoint(r, 0);
    send.upload(rows, ep.stream());
    device_exchange_result out;
    if (r == 3) hn::fail_send_after = static_cast<int>(topo.ranks()); // the header round's sends pass
    try {
      ep.exchange_device(exchange_group::world, 8, reinterpret_cast<const std::byte*>(send.data()), ones, {}, out);
      said[r] = "no error";
    } catch (const std::exception& e) {
      said[r] = e.what();
    }
    hn::fail_send_after = -1;
  });
  for (std::size_t r = 0; r < 3; ++r)
    BOOST_TEST(said[r].find("in the row exchange of step 0 exchange #0 of an exchange over the world group") !=
                   std::string::npos,
               said[r]);
  BOOST_TEST(said[3].find("a send failed (as asked)") != std::string::npos, said[3]);
  BOOST_TEST(fabric.world.live() == 0);
}

// A send that fails inside the exchange's group: the group is ended before the error is raised
// (left open, every later call of the thread would join it), and the transport is unusable.
BOOST_AUTO_TEST_CASE(a_failed_post_ends_the_group_and_breaks_the_transport) {
  nccl_harness::fabric fabric(dynamic_topology(1, 1), transport_kind::flat);
  auto t = fabric.endpoint(0, 0);
  const std::vector<std::uint64_t> rows{1};
  const std::vector<std::size_t> one{1};
  device_exchange_result out;
  hn::fail_send_after = 0;
  BOOST_CHECK_THROW(t.exchange_device_known(exchange_group::world, 8, bytes_of(rows), one, one, out), hn::failure);
  hn::fail_send_after = -1;
  BOOST_TEST(hn::nccl::open_depth() == 0);
  BOOST_CHECK_THROW(t.exchange_device_known(exchange_group::world, 8, bytes_of(rows), one, one, out), transport_error);
  BOOST_CHECK_THROW(t.synchronize("a later wait"), transport_error);
}

// The imitation holds NCCL's precondition that a receive's size is its matched send's: rank 1
// expects two rows from rank 0, which sends one; rank 1's next wait raises and aborts, and rank 0,
// whose send is never taken, raises at its timeout. (The transport takes known counts as given;
// the one-GPU transport compares them, NCCL cannot.)
BOOST_AUTO_TEST_CASE(a_receive_larger_than_its_send_fails_the_receiver) {
  const dynamic_topology topo(1, 2);
  nccl_harness::fabric fabric(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(2000)});
  std::vector<std::exception_ptr> raised(2);
  dlc::on_ranks(2, [&](std::size_t r) {
    auto ep = fabric.endpoint(r, 0);
    const std::vector<std::uint64_t> rows = dlc::world_rows(r, {1, 1}, 0);
    const std::vector<std::size_t> ones{1, 1}, recv{r == 1 ? 2u : 1u, 1};
    device_exchange_result out;
    try {
      ep.exchange_device_known(exchange_group::world, 8, bytes_of(rows), ones, recv, out);
      ep.synchronize("the test's read");
    } catch (...) {
      raised[r] = std::current_exception();
    }
  });
  BOOST_TEST(message_if<transport_error>(raised[0]).find("rank 0 waited 2000 ms in the test's read") !=
                 std::string::npos,
             message_if<transport_error>(raised[0]));
  BOOST_TEST(message_if<hn::failure>(raised[1]).find("rank 1 receives 16 bytes from rank 0, which sent 8") !=
                 std::string::npos,
             message_if<hn::failure>(raised[1]));
  BOOST_TEST(fabric.world.live() == 0);
}

// The topology is checked collectively, over the transport's own world before it is split by the
// topology: ranks given different topologies, or one the communicator's size does not fit (all, or
// only some of them), all raise config_error, and none waits in a split for a rank that left.
BOOST_AUTO_TEST_CASE(a_topology_that_does_not_fit_raises_on_every_rank) {
  struct setup {
    const char* what;
    dynamic_topology rank0, others;
    const char* says;
  };
  for (const setup& c : {setup{"different shapes", dynamic_topology(1, 4), dynamic_topology(4, 1),
                               "the ranks were given different topologies (1 to 4 nodes, 1 to 4 GPUs per node)"},
                         setup{"too many ranks", dynamic_topology(2, 4), dynamic_topology(2, 4),
                               "the communicator has 4 ranks but the topology has 2 nodes × 4 = 8"},
                         setup{"too many on some", dynamic_topology(1, 4), dynamic_topology(1, 5),
                               "the ranks were given different topologies"}}) {
    hn::world w(4);
    std::vector<std::string> said(4);
    const auto start = std::chrono::steady_clock::now();
    dlc::on_ranks(4, [&](std::size_t r) {
      try {
        hn::transport t(w.comm(r), w.stream(r), r == 0 ? c.rank0 : c.others, transport_kind::hierarchical,
                        exchange_options{std::chrono::milliseconds(5000)});
      } catch (const config_error& e) {
        said[r] = e.what();
      }
    });
    BOOST_TEST_CONTEXT(c.what) {
      for (const std::string& s : said)
        BOOST_TEST(s.find(c.says) != std::string::npos, s);
      BOOST_TEST(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 4.0);
      BOOST_TEST(w.live() == 0);
    }
  }
}

// A transport destroyed with a step unfinished (rank 0 posted a known-count exchange that rank 1
// never joins): the destructor gives the stream the timeout, as a wait would, then aborts, so it
// returns instead of waiting for the peer forever, and every communicator is released once.
BOOST_AUTO_TEST_CASE(a_transport_left_mid_step_is_aborted_by_its_destructor) {
  const dynamic_topology topo(1, 2);
  nccl_harness::fabric fabric(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(300)});
  std::vector<double> took(2, 0.0);
  dlc::on_ranks(2, [&](std::size_t r) {
    std::chrono::steady_clock::time_point start;
    {
      // The rows outlive the endpoint: its destructor may still run the queued send that reads them.
      const std::vector<std::uint64_t> rows = dlc::world_rows(0, {1, 1}, 0);
      auto ep = fabric.endpoint(r, 0);
      if (r == 0) {
        const std::vector<std::size_t> ones{1, 1};
        device_exchange_result out;
        ep.exchange_device_known(exchange_group::world, 8, bytes_of(rows), ones, ones, out);
      }
      start = std::chrono::steady_clock::now();
    }
    took[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  BOOST_TEST(took[0] >= 0.29);
  BOOST_TEST(took[0] < 10.0);
  BOOST_TEST(took[1] < 0.29);
  BOOST_TEST(fabric.world.live() == 0);
}
