#define BOOST_TEST_MODULE transport_local
#include "../mpi/dispatch_cases.hpp"
#include "../support/rank_threads.hpp"

#include <array>
#include <atomic>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/local.hpp>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <utility>

using namespace locus;
using namespace locus::transport;

namespace {
// Runs body(endpoint) on one thread per rank; returns each rank's exception (or null).
std::vector<std::exception_ptr> run_ranks(local_fabric& f, const std::function<void(local_transport&)>& body) {
  return locus_test::run_rank_threads(f.topology().ranks(), [&](std::size_t r) {
    auto ep = f.endpoint(r);
    body(ep);
  });
}

std::string message_of(const std::exception_ptr& p) {
  if (!p) return {};
  try {
    std::rethrow_exception(p);
  } catch (const std::exception& e) {
    return e.what();
  }
}

template <class E>
bool raised(const std::exception_ptr& p) {
  if (!p) return false;
  try {
    std::rethrow_exception(p);
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
}

struct row {
  std::uint32_t src, dst, index;
};

// Boost.Test's assertions are not thread-safe: checks made inside a rank's thread take this lock,
// so that concurrent ranks never touch the framework's state at once.
std::mutex rank_test_mutex;
} // namespace
#define RANK_TEST(...)                                                                                                 \
  do {                                                                                                                 \
    std::lock_guard rank_test_lock_(rank_test_mutex);                                                                  \
    BOOST_TEST(__VA_ARGS__);                                                                                           \
  } while (false)

namespace {
// The local transport behind a hook that sees each exchange request first; `Entries` says whether
// it carries entries (exchange_with_entries otherwise moves them in an exchange of their own).
template <bool Entries>
class observed {
public:
  static constexpr bool carries_entries = Entries;
  observed(local_transport& t, std::function<void(const exchange_request&)> see) : t_(&t), see_(std::move(see)) {}
  std::size_t rank() const noexcept { return t_->rank(); }
  const dynamic_topology& topology() const noexcept { return t_->topology(); }
  bool hierarchical() const noexcept { return t_->hierarchical(); }
  std::size_t group_size(exchange_group g) const noexcept { return t_->group_size(g); }
  std::size_t world_rank_of(exchange_group g, std::size_t m) const noexcept { return t_->world_rank_of(g, m); }
  const link_counters& bytes() const noexcept { return t_->bytes(); }
  void reset_bytes() noexcept { t_->reset_bytes(); }
  void exchange(const exchange_request& req, exchange_result& out) {
    see_(req);
    t_->exchange(req, out);
  }

private:
  local_transport* t_;
  std::function<void(const exchange_request&)> see_;
};
// The local transport as an exchanger that does not carry entries (and checks it is given none).
using rows_only = observed<false>;
rows_only make_rows_only(local_transport& t) {
  return rows_only(t, [](const exchange_request& req) { RANK_TEST(req.entry_bytes == 0u); }); // it would drop them
}
static_assert(carries_entries<local_transport> && !carries_entries<rows_only>);

// Sends count(s, d) rows and entry_count(s, d) entries from s to d in one exchange_with_entries;
// checks what arrived against the same formulas.
template <class Exchanger>
void check_entries_travel(Exchanger& ex, std::size_t ranks) {
  const auto count = [](std::size_t s, std::size_t d) { return (s * 5 + d * 3) % 4; };
  const auto entry_count = [](std::size_t s, std::size_t d) { return (s + 2 * d) % 3; };
  const std::size_t me = ex.rank();
  std::vector<std::size_t> counts(ranks), entry_counts(ranks);
  std::vector<row> rows, entries;
  for (std::size_t d = 0; d < ranks; ++d) {
    counts[d] = count(me, d);
    entry_counts[d] = entry_count(me, d);
    for (std::size_t i = 0; i < counts[d]; ++i)
      rows.push_back({static_cast<std::uint32_t>(me), static_cast<std::uint32_t>(d), static_cast<std::uint32_t>(i)});
    for (std::size_t i = 0; i < entry_counts[d]; ++i)
      entries.push_back(
          {static_cast<std::uint32_t>(me), static_cast<std::uint32_t>(d), static_cast<std::uint32_t>(100 + i)});
  }
  exchange_request req{exchange_group::world, sizeof(row), std::as_bytes(std::span(rows)), counts, {}};
  req.entry_bytes = sizeof(row);
  req.entries = std::as_bytes(std::span(entries));
  req.entry_counts = entry_counts;
  exchange_result out, scratch;
  exchange_with_entries(ex, req, out, scratch);
  RANK_TEST(out.entry_bytes == sizeof(row));
  std::size_t at = 0, entry_at = 0;
  for (std::size_t s = 0; s < ranks; ++s) {
    RANK_TEST(out.counts[s] == count(s, me));
    RANK_TEST(out.entry_counts[s] == entry_count(s, me));
    for (std::size_t i = 0; i < out.counts[s]; ++i, ++at) {
      row got;
      std::memcpy(&got, out.row(at), sizeof got);
      RANK_TEST((got.src == s && got.dst == me && got.index == i));
    }
    for (std::size_t i = 0; i < out.entry_counts[s]; ++i, ++entry_at) {
      row got;
      std::memcpy(&got, out.entry(entry_at), sizeof got);
      RANK_TEST((got.src == s && got.dst == me && got.index == 100 + i));
    }
  }
  RANK_TEST(at == out.row_count());
  RANK_TEST(entry_at == out.entry_count());
}
} // namespace

// Entries (a dispatch's fan-out table) arrive with their rows, grouped by source like them, over
// an exchanger that carries them and, in a second exchange, over one that does not; either way the
// byte counters include them.
BOOST_AUTO_TEST_CASE(entries_travel_with_their_rows) {
  const dynamic_topology topo(2, 2);
  for (bool carried : {true, false}) {
    local_fabric f(topo, transport_kind::flat);
    std::vector<std::uint64_t> sent(topo.ranks());
    const auto errors = run_ranks(f, [&](local_transport& ep) {
      if (carried) {
        check_entries_travel(ep, topo.ranks());
      } else {
        rows_only r = make_rows_only(ep);
        check_entries_travel(r, topo.ranks());
      }
      for (std::size_t k = 0; k < 3; ++k)
        sent[ep.rank()] += ep.bytes().bytes_sent[k];
    });
    for (const auto& e : errors)
      BOOST_TEST(!e, message_of(e));
    std::uint64_t expect = 0, total = 0;
    for (std::size_t s = 0; s < topo.ranks(); ++s)
      for (std::size_t d = 0; d < topo.ranks(); ++d)
        expect += ((s * 5 + d * 3) % 4 + (s + 2 * d) % 3) * sizeof(row);
    for (auto b : sent)
      total += b;
    BOOST_TEST(total == expect, (carried ? "carried" : "second exchange"));
  }
}

// Rows arrive grouped by source in member order, each source's rows in send order; byte counters
// equal a brute-force count per link class.
BOOST_AUTO_TEST_CASE(world_exchange_delivers_every_row_once) {
  const dynamic_topology topo(2, 3);
  local_fabric f(topo, transport_kind::flat);
  const auto count = [](std::size_t s, std::size_t d) { return (s * 5 + d * 3) % 4; };
  std::vector<link_counters> counters(topo.ranks());
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    const std::size_t me = ep.rank();
    std::vector<std::size_t> counts(topo.ranks());
    std::vector<row> rows;
    for (std::size_t d = 0; d < topo.ranks(); ++d) {
      counts[d] = count(me, d);
      for (std::size_t i = 0; i < counts[d]; ++i)
        rows.push_back({static_cast<std::uint32_t>(me), static_cast<std::uint32_t>(d), static_cast<std::uint32_t>(i)});
    }
    exchange_result out;
    ep.exchange({exchange_group::world, sizeof(row), std::as_bytes(std::span(rows)), counts, {}}, out);
    std::size_t at = 0;
    for (std::size_t s = 0; s < topo.ranks(); ++s) {
      RANK_TEST(out.counts[s] == count(s, me));
      for (std::size_t i = 0; i < out.counts[s]; ++i, ++at) {
        row got;
        std::memcpy(&got, out.row(at), sizeof got);
        RANK_TEST((got.src == s && got.dst == me && got.index == i));
      }
    }
    RANK_TEST(at == out.row_count());
    counters[me] = ep.bytes();
  });
  for (const auto& e : errors)
    BOOST_TEST(!e);
  std::array<std::uint64_t, 3> expect{};
  for (std::size_t s = 0; s < topo.ranks(); ++s)
    for (std::size_t d = 0; d < topo.ranks(); ++d)
      expect[static_cast<std::size_t>(topo.link(s, d))] += count(s, d) * sizeof(row);
  std::array<std::uint64_t, 3> sent{}, received{};
  for (const auto& c : counters)
    for (std::size_t k = 0; k < 3; ++k) {
      sent[k] += c.bytes_sent[k];
      received[k] += c.bytes_received[k];
    }
  BOOST_TEST(sent == expect, boost::test_tools::per_element());
  BOOST_TEST(received == expect, boost::test_tools::per_element());
}

// Node and rail groups number members by local rank and by node.
BOOST_AUTO_TEST_CASE(node_and_rail_groups_follow_the_topology) {
  const dynamic_topology topo(3, 2);
  local_fabric f(topo, transport_kind::hierarchical);
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    for (exchange_group g : {exchange_group::node, exchange_group::rail}) {
      const std::size_t n = ep.group_size(g);
      std::vector<std::uint32_t> rows(n, static_cast<std::uint32_t>(ep.rank()));
      std::vector<std::size_t> counts(n, 1);
      exchange_result out;
      ep.exchange({g, sizeof(std::uint32_t), std::as_bytes(std::span(rows)), counts, {}}, out);
      for (std::size_t m = 0; m < n; ++m) {
        std::uint32_t from;
        std::memcpy(&from, out.row(m), sizeof from);
        const std::size_t expect = g == exchange_group::node ? topo.rank_of(topo.node_of(ep.rank()), m)
                                                             : topo.rank_of(m, topo.local_rank_of(ep.rank()));
        RANK_TEST(from == expect);
      }
    }
  });
  for (const auto& e : errors)
    BOOST_TEST(!e);
}

// Different row widths, invalid input on one rank, and a count that differs from the receiver's
// expectation raise transport_error on every rank; the fabric stays usable afterwards.
BOOST_AUTO_TEST_CASE(disagreements_raise_on_every_rank) {
  const dynamic_topology topo(2, 2);
  local_fabric f(topo, transport_kind::flat);
  for (int variant = 0; variant < 3; ++variant) {
    const auto errors = run_ranks(f, [&](local_transport& ep) {
      const std::size_t me = ep.rank();
      std::size_t width = 8;
      std::vector<std::size_t> counts(4, 1), expected;
      if (variant == 0 && me == 2) width = 16;
      if (variant == 1 && me == 1) counts.resize(3);
      if (variant == 2) {
        expected.assign(4, 1);
        if (me == 3) expected[0] = 2;
      }
      std::size_t total = 0;
      for (auto c : counts)
        total += c;
      std::vector<std::byte> rows(total * width);
      exchange_result out;
      ep.exchange({exchange_group::world, width, rows, counts, expected}, out);
    });
    for (const auto& e : errors)
      BOOST_TEST(raised<transport_error>(e), "variant " << variant);
  }
  // Still in step: a valid exchange succeeds.
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    std::vector<std::size_t> counts(4, 1);
    std::vector<std::byte> rows(4 * 8);
    exchange_result out;
    ep.exchange({exchange_group::world, 8, rows, counts, {}}, out);
    RANK_TEST(out.row_count() == 4u);
  });
  for (const auto& e : errors)
    BOOST_TEST(!e);
}

// Counts whose sum or byte size wraps 64 bits matched an empty send buffer: 2^63 rows to each of
// two members add up to 0, and each receiver then copied 2^63 rows into an empty buffer.
BOOST_AUTO_TEST_CASE(counts_that_wrap_are_refused_on_every_rank) {
  local_fabric f(dynamic_topology(1, 2), transport_kind::flat, exchange_options{std::chrono::milliseconds(5000)});
  for (const std::size_t width : {std::size_t{1}, std::size_t{1} << 62}) {
    const auto errors = run_ranks(f, [&](local_transport& ep) {
      const std::size_t n = width == 1 ? std::size_t{1} << 63 : 2;
      const std::vector<std::size_t> counts{n, n};
      exchange_result out;
      ep.exchange({exchange_group::world, width, {}, counts, {}}, out);
    });
    for (const auto& e : errors)
      BOOST_TEST(raised<transport_error>(e), message_of(e));
  }
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    const std::vector<std::size_t> counts{0, 0}, entry_counts{std::size_t{1} << 63, std::size_t{1} << 63};
    exchange_request req{exchange_group::world, 8, {}, counts, {}};
    req.entry_bytes = 8;
    req.entry_counts = entry_counts;
    exchange_result out;
    ep.exchange(req, out);
  });
  for (const auto& e : errors)
    BOOST_TEST(raised<transport_error>(e), message_of(e));
}

// Forwarding what arrived by sending from the result it arrived in (out.rows into out) would
// receive over, or reallocate, rows still being sent: refused on every member of the exchange.
BOOST_AUTO_TEST_CASE(sending_from_the_result_received_into_is_refused_everywhere) {
  local_fabric f(dynamic_topology(1, 2), transport_kind::flat, exchange_options{std::chrono::milliseconds(20000)});
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    const std::vector<std::size_t> counts{2, 2};
    const std::vector<std::uint64_t> rows{1, 2, 3, 4};
    exchange_result out;
    ep.exchange({exchange_group::world, 8, std::as_bytes(std::span(rows)), counts, {}}, out);
    ep.exchange({exchange_group::world, 8, std::span<const std::byte>(out.rows), out.counts, {}}, out);
  });
  for (const auto& e : errors) {
    BOOST_TEST(raised<transport_error>(e), message_of(e));
    BOOST_TEST((message_of(e).find("sends from the exchange_result it receives into") != std::string::npos ||
                message_of(e).find("passed a send buffer that lies in the buffer the exchange receives into") !=
                    std::string::npos),
               message_of(e));
  }
}

// A rank that never arrives makes the others raise timeout_error after the timeout, not hang.
BOOST_AUTO_TEST_CASE(missing_peer_times_out) {
  const dynamic_topology topo(2, 2);
  local_fabric f(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(150)});
  const auto start = std::chrono::steady_clock::now();
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    if (ep.rank() == 1) return;
    std::vector<std::size_t> counts(4, 0);
    exchange_result out;
    ep.exchange({exchange_group::world, 8, {}, counts, {}}, out);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  BOOST_TEST(!errors[1]);
  for (std::size_t r : {0u, 2u, 3u}) {
    BOOST_TEST(raised<timeout_error>(errors[r]));
    // Only the rank that really stayed away is named.
    BOOST_TEST(message_of(errors[r]).find("world group; rank 1 did not arrive;") != std::string::npos,
               message_of(errors[r]));
  }
  BOOST_TEST(seconds < 5.0);
}

// Every member's error is a transport_error that says `why`, and the failed barrier refuses a
// later arrival of `member`.
template <class Errors>
void expect_failed_with(const Errors& errors, const std::string& why, locus::transport::detail::timed_barrier& barrier,
                        std::size_t member) {
  for (const auto& e : errors) {
    BOOST_TEST(raised<transport_error>(e));
    BOOST_TEST(message_of(e).find(why) != std::string::npos, message_of(e));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  BOOST_CHECK_THROW(barrier.arrive_and_wait(deadline, std::chrono::seconds(1), member, exchange_group::world, "later"),
                    transport_error);
}

// A rank's endpoint used by two threads at once (the fabric's endpoint(r) taken twice): the
// second arrival of one member in a meeting fails it at once for both, naming the rank, rather than
// meeting as another rank or waiting for the timeout. (At the barrier itself: through exchange()
// the two threads would also write the rank's board slots at once, which ThreadSanitizer reports.)
BOOST_AUTO_TEST_CASE(one_member_arriving_twice_is_named) {
  locus::transport::detail::timed_barrier barrier({0, 1});
  std::array<std::exception_ptr, 2> errors{};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < 2; ++i)
    threads.emplace_back([&, i] {
      try {
        barrier.arrive_and_wait(std::chrono::steady_clock::now() + std::chrono::seconds(60), std::chrono::seconds(60),
                                0, exchange_group::world, "the header round");
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  for (auto& t : threads)
    t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  BOOST_TEST(seconds < 30.0); // not at the deadline
  expect_failed_with(errors, "the header round: rank 0 arrived twice (two threads use its endpoint at once", barrier,
                     1);
}

// The barrier's work for the last arrival (the one-GPU transport joins CUDA events there) runs
// once per meeting, before anyone leaves; when it throws, every member of that meeting raises
// transport_error naming where, and every later arrival raises at once.
BOOST_AUTO_TEST_CASE(barrier_work_of_the_last_arrival_runs_once_and_its_failure_reaches_all) {
  constexpr std::size_t members = 5;
  locus::transport::detail::timed_barrier barrier({0, 1, 2, 3, 4});
  std::atomic<int> runs = 0, passed = 0;
  std::array<std::exception_ptr, members> errors{};
  std::vector<std::thread> threads;
  for (std::size_t m = 0; m < members; ++m)
    threads.emplace_back([&, m] {
      try {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        for (int meeting = 0; meeting < 3; ++meeting) {
          barrier.arrive_and_wait(deadline, std::chrono::seconds(10), m, exchange_group::world, "meeting", [&] {
            // Everyone else has arrived and nobody has left: `passed` counts whole meetings.
            if (passed.load() != meeting * static_cast<int>(members)) throw std::logic_error("left early");
            ++runs;
            if (meeting == 1) throw std::runtime_error("join failed");
          });
          ++passed;
        }
      } catch (...) {
        errors[m] = std::current_exception();
      }
    });
  for (auto& t : threads)
    t.join();
  BOOST_TEST(runs.load() == 2);
  BOOST_TEST(passed.load() == static_cast<int>(members)); // only the first meeting passed
  expect_failed_with(errors, "meeting: join failed", barrier, 0);
}

// A member that abandons the barrier (it left a step half done) wakes the members waiting in it at
// once, long before their deadline, and every one raises transport_error with its reason, as does
// every later arrival, the abandoning member's own next one included.
BOOST_AUTO_TEST_CASE(an_abandoned_barrier_releases_its_waiters_with_the_reason) {
  constexpr std::size_t members = 4;
  locus::transport::detail::timed_barrier barrier({0, 1, 2, 3});
  std::array<std::exception_ptr, members - 1> errors{};
  std::atomic<int> waiting = 0;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (std::size_t m = 0; m + 1 < members; ++m)
    threads.emplace_back([&, m] {
      try {
        ++waiting;
        barrier.arrive_and_wait(std::chrono::steady_clock::now() + std::chrono::seconds(60), std::chrono::seconds(60),
                                m, exchange_group::world, "the row stage");
      } catch (...) {
        errors[m] = std::current_exception();
      }
    });
  while (waiting.load() < static_cast<int>(members) - 1)
    std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(50)); // let them sleep in the barrier
  barrier.abandon("rank 3 left a step half done (out of memory)");
  for (auto& t : threads)
    t.join();
  BOOST_TEST((std::chrono::steady_clock::now() - start < std::chrono::seconds(30))); // not at the deadline
  expect_failed_with(errors, "rank 3 left a step half done (out of memory)", barrier, 3);
}

// A rank that arrives after the others gave up raises too, saying so, instead of joining an
// exchange nobody else is in; the others name it alone, in its node group as in the world.
BOOST_AUTO_TEST_CASE(late_peer_raises_and_is_named) {
  const dynamic_topology topo(2, 2);
  for (exchange_group g : {exchange_group::world, exchange_group::node}) {
    local_fabric f(topo, transport_kind::flat, exchange_options{std::chrono::milliseconds(150)});
    const auto errors = run_ranks(f, [&](local_transport& ep) {
      if (ep.rank() == 3) std::this_thread::sleep_for(std::chrono::milliseconds(400));
      const std::size_t members = ep.group_size(g);
      std::vector<std::size_t> counts(members, 1);
      std::vector<std::byte> rows(members * 8);
      exchange_result out;
      ep.exchange({g, 8, rows, counts, {}}, out);
    });
    const std::string others = g == exchange_group::world ? "ranks 0, 1, 2" : "rank 2";
    for (std::size_t r = 0; r < 4; ++r) {
      const std::string m = message_of(errors[r]);
      if (g == exchange_group::node && r < 2) {
        BOOST_TEST(!errors[r], m);
      } else if (r == 3) {
        BOOST_TEST(raised<timeout_error>(errors[r]));
        BOOST_TEST(m.find("after " + others + " had given up waiting for it: it arrived late") != std::string::npos, m);
      } else {
        BOOST_TEST(raised<timeout_error>(errors[r]));
        BOOST_TEST(m.find("rank 3 did not arrive;") != std::string::npos, m);
      }
    }
  }
}

// The step in the header catches a rank that skipped a step: every rank raises transport_error
// naming both sides, and, all having seen the same headers, all can go on.
BOOST_AUTO_TEST_CASE(skipped_step_is_caught_on_every_rank) {
  local_fabric f(dynamic_topology(1, 3), transport_kind::flat, exchange_options{std::chrono::milliseconds(5000)});
  std::vector<std::string> first(3);
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    std::vector<std::size_t> counts(3, 1);
    std::vector<std::byte> rows(3 * 8);
    exchange_result out;
    try {
      for (std::uint64_t step = 0; step < 3; ++step) {
        if (ep.rank() == 1 && step == 1) continue;
        ep.begin_step(step);
        ep.exchange({exchange_group::world, 8, rows, counts, {}}, out);
      }
    } catch (const transport_error& e) {
      first[ep.rank()] = e.what();
    }
    ep.begin_step(7);
    ep.exchange({exchange_group::world, 8, rows, counts, {}}, out);
  });
  for (std::size_t r = 0; r < 3; ++r) {
    BOOST_TEST(!errors[r], message_of(errors[r]));
    BOOST_TEST(first[r].find("ranks 0, 2 are at step 1 exchange #0; rank 1 is at step 2 exchange #0") !=
                   std::string::npos,
               first[r]);
  }
}

// Random cases through the local transport, flat and hierarchical: outputs equal the dense
// reference, every (token, expert) pair reaches its expert exactly once, and the bytes moved per
// link class equal the traffic model's copies times the row sizes, for dispatch and for combine.
BOOST_AUTO_TEST_CASE(random_dispatch_combine_matches_reference_and_model) {
  const std::pair<std::size_t, std::size_t> shapes[] = {{1, 1}, {1, 3}, {3, 1}, {2, 2}, {4, 2}, {2, 4}};
  int cases = 0;
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    const auto [nodes, gpus] = shapes[seed % std::size(shapes)];
    const auto c = locus_test::make_case(seed, nodes, gpus);
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      local_fabric f(c.topo, kind);
      std::vector<link_counters> dispatch_bytes(c.topo.ranks()), combine_bytes(c.topo.ranks());
      std::vector<double> errors(c.topo.ranks());
      std::vector<std::uint64_t> rows_per_expert(c.experts, 0);
      std::mutex m;
      cost::message_sizes sizes;
      const auto failures = run_ranks(f, [&](local_transport& ep) {
        const std::size_t me = ep.rank();
        moe_dispatcher<local_transport, float> d(ep, c.map, c.hidden);
        const auto x = c.inputs(me);
        layout<> l;
        d.plan(l, c.routings[me].view());
        auto h = d.dispatch(std::span<const float>(x), l);
        dispatch_bytes[me] = ep.bytes();
        ep.reset_bytes();
        if (!locus_test::payloads_are_inputs(h, c)) throw std::runtime_error("a row's payload is no token's input");
        // Half the cases form the weighted sums beside the experts (the fused path).
        std::vector<float> y(x.size());
        if (seed % 4 >= 2)
          locus_test::run_experts_into_sums(h, seed % 4 == 3);
        else
          locus_test::run_experts(h);
        d.combine(y, h);
        combine_bytes[me] = ep.bytes();
        errors[me] = locus_test::max_error(y, c.reference(me));
        std::lock_guard lock(m);
        for (std::size_t i = 0; i < h.local_experts().size(); ++i)
          rows_per_expert[static_cast<std::size_t>(h.local_experts()[i])] +=
              h.expert_offsets()[i + 1] - h.expert_offsets()[i];
        sizes = d.message_sizes();
      });
      for (const auto& e : failures) {
        BOOST_TEST_REQUIRE(!e);
      }
      for (double e : errors)
        BOOST_TEST(e < 1e-5, "seed " << seed << " " << to_string(kind));
      std::vector<std::uint64_t> expect_rows(c.experts, 0);
      for (const auto& r : c.routings)
        for (expert_id e : r.ids())
          ++expect_rows[static_cast<std::size_t>(e)];
      BOOST_TEST(rows_per_expert == expect_rows, boost::test_tools::per_element());
      // Rows carry the hidden vector only; the fan-out entries are the model's too.
      BOOST_TEST(sizes.dispatch_bytes == c.hidden * sizeof(float));
      const auto model = c.model(kind);
      for (std::size_t cls = 0; cls < link_class_count; ++cls) {
        std::uint64_t db = 0, cb = 0;
        for (std::size_t r = 0; r < c.topo.ranks(); ++r) {
          db += dispatch_bytes[r].bytes_sent[cls];
          cb += combine_bytes[r].bytes_sent[cls];
        }
        BOOST_TEST(db == model.dispatch_bytes(static_cast<link_class>(cls), sizes),
                   "seed " << seed << " class " << cls);
        BOOST_TEST(cb == model.combine_bytes(static_cast<link_class>(cls), sizes), "seed " << seed << " class " << cls);
      }
      ++cases;
    }
  }
  BOOST_TEST(cases == 120);
}

// Rows of double: combine converts the fp32 sums into rows of T to send and back into y, on the
// flat and hierarchical paths (one GPU per node included, where the hierarchical exchanger takes
// the one-exchange path). y equals the dense reference.
BOOST_AUTO_TEST_CASE(double_rows_combine_matches_reference) {
  const std::pair<std::size_t, std::size_t> shapes[] = {{2, 1}, {3, 1}, {2, 2}};
  for (std::uint64_t seed = 31; seed <= 36; ++seed) {
    const auto [nodes, gpus] = shapes[seed % std::size(shapes)];
    const auto c = locus_test::make_case(seed, nodes, gpus);
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      local_fabric f(c.topo, kind);
      std::vector<double> errors(c.topo.ranks(), 1.0);
      const auto failures = run_ranks(f, [&](local_transport& ep) {
        const std::size_t me = ep.rank();
        moe_dispatcher<local_transport, double> d(ep, c.map, c.hidden);
        const auto xf = c.inputs(me);
        const std::vector<double> x(xf.begin(), xf.end());
        layout<> l;
        d.plan(l, c.routings[me].view());
        auto h = d.dispatch(std::span<const double>(x), l);
        // The test's experts (expert e multiplies by e + 1), half the seeds fused into the sums.
        const auto experts = h.local_experts();
        const auto offsets = h.expert_offsets();
        const bool fused = seed % 2 == 0;
        auto out = h.expert_output();
        const auto copy = h.row_copies();
        const auto weight = h.row_weights();
        std::span<float> sums;
        if (fused) sums = h.copy_sums();
        for (std::size_t i = 0; i < experts.size(); ++i)
          for (std::size_t row = offsets[i]; row < offsets[i + 1]; ++row)
            for (std::size_t k = 0; k < c.hidden; ++k) {
              const double v = h.expert_input_row(row)[k] * static_cast<double>(experts[i] + 1);
              if (fused)
                sums[copy[row] * c.hidden + k] += weight[row] * static_cast<float>(v);
              else
                out[row * c.hidden + k] = v;
            }
        std::vector<double> y(x.size());
        d.combine(y, h);
        const auto ref = c.reference(me);
        double worst = y.size() == ref.size() ? 0.0 : 1e30;
        for (std::size_t i = 0; i < std::min(y.size(), ref.size()); ++i)
          worst = std::max(worst, std::abs(y[i] - ref[i]) / std::max(1.0, std::abs(ref[i])));
        errors[me] = worst;
      });
      for (const auto& e : failures)
        BOOST_TEST_REQUIRE(!e);
      for (std::size_t r = 0; r < c.topo.ranks(); ++r)
        BOOST_TEST(errors[r] < 1e-5, "seed " << seed << " " << to_string(kind) << " rank " << r);
    }
  }
}

// With one GPU per node a hierarchical exchanger has no node stage: dispatch and combine take the
// one-exchange path (one world exchange each, as flat), with the same outputs, bit for bit, and
// the same bytes. With two GPUs per node they take the two stages (rail, node; node, rail).
BOOST_AUTO_TEST_CASE(hierarchical_with_one_gpu_per_node_takes_the_one_exchange_path) {
  for (const auto& [nodes, gpus] : {std::pair<std::size_t, std::size_t>{3, 1}, {2, 2}}) {
    const auto c = locus_test::make_case(41, nodes, gpus);
    const std::size_t ranks = c.topo.ranks();
    std::vector<std::vector<float>> y_of[2];
    std::vector<std::vector<exchange_group>> groups_of[2];
    std::vector<link_counters> bytes_of[2];
    std::vector<int> staged(ranks, -1);
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      const auto k = static_cast<std::size_t>(kind == transport_kind::hierarchical);
      y_of[k].resize(ranks);
      groups_of[k].resize(ranks);
      bytes_of[k].resize(ranks);
      local_fabric f(c.topo, kind);
      const auto failures = run_ranks(f, [&](local_transport& ep) {
        const std::size_t me = ep.rank();
        std::vector<exchange_group> groups;
        observed<true> ex(ep, [&](const exchange_request& req) { groups.push_back(req.group); });
        moe_dispatcher<observed<true>, float> d(ex, c.map, c.hidden);
        if (k == 1) staged[me] = d.staged();
        const auto x = c.inputs(me);
        layout<> l;
        d.plan(l, c.routings[me].view());
        auto h = d.dispatch(std::span<const float>(x), l);
        locus_test::run_experts(h);
        y_of[k][me].resize(x.size());
        d.combine(y_of[k][me], h);
        groups_of[k][me] = groups;
        bytes_of[k][me] = ep.bytes();
      });
      for (const auto& e : failures)
        BOOST_TEST_REQUIRE(!e);
    }
    using g = exchange_group;
    const std::vector<exchange_group> one{g::world, g::world}, two{g::rail, g::node, g::node, g::rail};
    for (std::size_t r = 0; r < ranks; ++r) {
      BOOST_TEST((groups_of[0][r] == one));
      BOOST_TEST(staged[r] == (gpus > 1 ? 1 : 0));
      BOOST_TEST((groups_of[1][r] == (gpus > 1 ? two : one)), "rank " << r << " of " << nodes << " x " << gpus);
      if (gpus > 1) continue;
      // Bit for bit (a rank may have no tokens: memcmp must not see their null data()).
      const auto& a = y_of[0][r];
      const auto& b = y_of[1][r];
      BOOST_TEST(
          (a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0)));
      BOOST_TEST(bytes_of[0][r].bytes_sent == bytes_of[1][r].bytes_sent, boost::test_tools::per_element());
    }
  }
}

// Combine's one-pass start of a token's sum (detail::dispatch::start_row: own row's sum, or zero,
// plus the first returned row) equals starting from that sum and adding the row (add_row), bit
// for bit: signed zeros, denormals, infinities and NaN included, for rows of float and double.
template <class T>
void check_start_row(std::mt19937& rng) {
  const float specials[] = {0.0f,
                            -0.0f,
                            1e-40f,
                            -1e-40f,
                            1e30f,
                            -1e30f,
                            3.4e38f,
                            -3.4e38f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            1.0f,
                            -1.5f};
  const auto value = [&] {
    if (rng() % 2) return specials[rng() % std::size(specials)];
    return std::ldexp(static_cast<float>(rng() % 20001) - 10000.0f, static_cast<int>(rng() % 40) - 20);
  };
  std::size_t differ = 0, cases = 0;
  for (std::size_t n : {1u, 7u, 8u, 13u, 64u})
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> first(n), old_sum(n), new_sum(n);
      std::vector<T> src(n);
      for (std::size_t c = 0; c < n; ++c) {
        first[c] = value();
        src[c] = static_cast<T>(value());
      }
      const bool own = trial % 2 == 0;
      if (own)
        old_sum = first;
      else
        std::fill(old_sum.begin(), old_sum.end(), 0.0f);
      transport::detail::dispatch::add_row<false>(old_sum.data(), src.data(), 1.0f, n);
      transport::detail::dispatch::start_row(new_sum.data(), own ? first.data() : nullptr, src.data(), n);
      differ += std::memcmp(old_sum.data(), new_sum.data(), n * sizeof(float)) != 0;
      ++cases;
    }
  BOOST_TEST(differ == 0u, differ << " of " << cases << " rows differ");
}

BOOST_AUTO_TEST_CASE(one_pass_start_equals_copy_then_add) {
  std::mt19937 rng(7);
  check_start_row<float>(rng);
  check_start_row<double>(rng);
}

// Two micro-batches in flight on one dispatcher: dispatch A, dispatch B, combine B, combine A.
// Each handle carries all its combine needs, so both equal the dense reference.
// On every rank of `f`: a dispatcher of case `a`'s map, batch A dispatched, then batch B (the same
// map and shape, other routings); `body(me, dispatcher, handle_a, handle_b)` does the rest.
template <class Body>
std::vector<std::exception_ptr> two_dispatches(local_fabric& f, const locus_test::dispatch_case& a,
                                               const locus_test::dispatch_case& b, Body&& body) {
  return run_ranks(f, [&](local_transport& ep) {
    const std::size_t me = ep.rank();
    moe_dispatcher<local_transport, float> d(ep, a.map, a.hidden);
    const auto xa = a.inputs(me), xb = b.inputs(me);
    layout<> la, lb;
    d.plan(la, a.routings[me].view());
    d.plan(lb, b.routings[me].view());
    auto ha = d.dispatch(std::span<const float>(xa), la);
    auto hb = d.dispatch(std::span<const float>(xb), lb);
    body(me, d, ha, hb);
  });
}

BOOST_AUTO_TEST_CASE(two_handles_interleave) {
  for (std::uint64_t seed : {21u, 22u, 23u, 24u}) {
    const auto a = locus_test::make_case(seed, 2, 2);
    // Batch B: the same deployment (map, shape) with other routings.
    auto b = locus_test::make_case(seed + 100, 2, 2);
    b.map = a.map;
    b.experts = a.experts;
    b.hidden = a.hidden;
    b.k = a.k;
    for (std::size_t r = 0; r < b.routings.size(); ++r) {
      locus::routing<> fresh(b.routings[r].tokens() + 3, top_k<>(a.k));
      for (std::size_t t = 0; t < fresh.tokens(); ++t)
        for (std::size_t j = 0; j < a.k; ++j) {
          fresh.view().expert(t, j) = static_cast<expert_id>((t * 5 + r + j) % a.experts);
          fresh.view().weight(t, j) = 0.25f + static_cast<float>(j) / 8.0f;
        }
      b.routings[r] = std::move(fresh);
    }
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      local_fabric f(a.topo, kind);
      std::vector<double> err_a(a.topo.ranks(), 1.0), err_b(a.topo.ranks(), 1.0);
      const auto failures = two_dispatches(f, a, b, [&](std::size_t me, auto& d, auto& ha, auto& hb) {
        locus_test::run_experts(hb);
        locus_test::run_experts_into_sums(ha);
        std::vector<float> ya(ha.tokens() * a.hidden), yb(hb.tokens() * a.hidden);
        d.combine(yb, hb);
        d.combine(ya, ha);
        err_a[me] = locus_test::max_error(ya, a.reference(me));
        err_b[me] = locus_test::max_error(yb, b.reference(me));
      });
      for (const auto& e : failures)
        BOOST_TEST_REQUIRE(!e);
      for (std::size_t r = 0; r < a.topo.ranks(); ++r) {
        BOOST_TEST(err_a[r] < 1e-5, "seed " << seed << " " << to_string(kind) << " rank " << r);
        BOOST_TEST(err_b[r] < 1e-5, "seed " << seed << " " << to_string(kind) << " rank " << r);
      }
    }
  }
}

// Ranks that combine two handles in different orders (rank 0 combines B first, the others A):
// every rank raises transport_error at the first combine, naming it, instead of reading the other
// dispatch's rows as its own (past the end of the shorter batch: a heap overflow under ASan).
BOOST_AUTO_TEST_CASE(combining_handles_in_different_orders_raises_everywhere) {
  const auto a = locus_test::make_case(25, 2, 2);
  auto b = locus_test::make_case(125, 2, 2);
  b.map = a.map;
  b.experts = a.experts;
  b.hidden = a.hidden;
  b.k = a.k;
  for (std::size_t r = 0; r < b.routings.size(); ++r) { // batch B: a quarter of A's tokens
    locus::routing<> fewer(std::max<std::size_t>(1, a.routings[r].tokens() / 4), top_k<>(a.k));
    for (std::size_t t = 0; t < fewer.tokens(); ++t)
      for (std::size_t j = 0; j < a.k; ++j) {
        fewer.view().expert(t, j) = static_cast<expert_id>((t * 3 + r + j) % a.experts);
        fewer.view().weight(t, j) = 0.5f;
      }
    b.routings[r] = std::move(fewer);
  }
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    local_fabric f(a.topo, kind, exchange_options{std::chrono::milliseconds(20000)});
    const auto failures = two_dispatches(f, a, b, [&](std::size_t me, auto& d, auto& ha, auto& hb) {
      locus_test::run_experts(ha);
      locus_test::run_experts(hb);
      std::vector<float> ya(ha.tokens() * a.hidden), yb(hb.tokens() * a.hidden);
      if (me == 0) {
        d.combine(yb, hb);
        d.combine(ya, ha);
      } else {
        d.combine(ya, ha);
        d.combine(yb, hb);
      }
    });
    // Rank 0's node (ranks 0 and 1 in the hierarchical run) names the mismatch; the other node's
    // ranks, which agreed, learn in their rail stage that their peers left.
    for (std::size_t r = 0; r < failures.size(); ++r) {
      BOOST_TEST(raised<transport_error>(failures[r]), to_string(kind)
                                                           << " rank " << r << ": " << message_of(failures[r]));
      const bool named = message_of(failures[r]).find("combine different dispatches") != std::string::npos;
      BOOST_TEST((named || (kind == transport_kind::hierarchical && r >= 2)), message_of(failures[r]));
    }
  }
}

// Invalid input on one rank raises there and does not leave the others waiting.
// A rank's own copies are neither packed nor moved: their expert rows point into x itself, one per
// copy the layout sends to this rank, and every other row lies outside x.
BOOST_AUTO_TEST_CASE(own_rows_are_read_in_place_from_x) {
  for (std::uint64_t seed : {31u, 32u}) {
    const auto c = locus_test::make_case(seed, 2, 2);
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      local_fabric f(c.topo, kind);
      std::vector<std::size_t> in_x(c.topo.ranks()), own(c.topo.ranks()), misplaced(c.topo.ranks());
      const auto failures = run_ranks(f, [&](local_transport& ep) {
        const std::size_t me = ep.rank();
        moe_dispatcher<local_transport, float> d(ep, c.map, c.hidden);
        const auto x = c.inputs(me);
        layout<> l;
        d.plan(l, c.routings[me].view());
        const auto h = d.dispatch(std::span<const float>(x), l);
        for (std::int32_t r : l.copy_rank())
          own[me] += static_cast<std::size_t>(r) == me;
        const auto begin = reinterpret_cast<std::uintptr_t>(x.data());
        const auto end = reinterpret_cast<std::uintptr_t>(x.data() + x.size());
        for (const float* row : h.expert_input_rows()) {
          const auto at = reinterpret_cast<std::uintptr_t>(row);
          if (at < begin || at >= end) continue;
          ++in_x[me];
          misplaced[me] += (at - begin) % (c.hidden * sizeof(float)) != 0;
        }
      });
      for (const auto& e : failures) {
        BOOST_TEST_REQUIRE(!e);
      }
      BOOST_TEST(in_x == own, boost::test_tools::per_element());
      BOOST_TEST(misplaced == std::vector<std::size_t>(c.topo.ranks(), 0), boost::test_tools::per_element());
      std::size_t total = 0;
      for (std::size_t n : own)
        total += n;
      BOOST_TEST(total > 0u); // the case has own copies to find
    }
  }
}

BOOST_AUTO_TEST_CASE(bad_input_raises_without_hanging_the_others) {
  const auto c = locus_test::make_case(7, 2, 2);
  local_fabric f(c.topo, transport_kind::hierarchical, exchange_options{std::chrono::milliseconds(5000)});
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    moe_dispatcher<local_transport, float> d(ep, c.map, c.hidden);
    routing<> r(2, top_k<>(c.k));
    for (std::size_t t = 0; t < 2; ++t)
      for (std::size_t j = 0; j < c.k; ++j)
        r.view().expert(t, j) = static_cast<expert_id>(j);
    layout<> l;
    d.plan(l, r.view());
    // Rank 3 passes one input value too few.
    std::vector<float> x(2 * c.hidden - (ep.rank() == 3 ? 1 : 0), 1.0f);
    auto h = d.dispatch(std::span<const float>(x), l);
  });
  BOOST_TEST(raised<invalid_input_error>(errors[3]));
  for (std::size_t r = 0; r < 3; ++r)
    BOOST_TEST(!errors[r]);
}

// A hidden size whose row width wraps (2^62 + 1 floats: 4 bytes) is refused, as is a combine
// into a handle another dispatcher filled: it read that handle's rows at this one's width, past
// their end.
BOOST_AUTO_TEST_CASE(row_widths_and_handles_of_another_size_are_refused) {
  local_fabric f(dynamic_topology(1, 1), transport_kind::flat);
  auto ep = f.endpoint(0);
  const expert_map map(2, 1, 2, {0, 1});
  BOOST_CHECK_THROW((moe_dispatcher<local_transport, float>(ep, map, (std::size_t{1} << 62) + 1)), config_error);
  moe_dispatcher<local_transport, float> narrow(ep, map, 4), wide(ep, map, 64);
  const std::vector<expert_id> ids{0, 1};
  const std::vector<float> w{0.5f, 0.5f}, x(4, 1.0f);
  layout<> l;
  narrow.plan(l, routing_view<top_k<>>(ids.data(), w.data(), 1, top_k<>(2)));
  auto h = narrow.dispatch(std::span<const float>(x), l);
  std::vector<float> y(64);
  try {
    wide.combine(y, h);
    BOOST_ERROR("combine accepted a handle of another hidden size");
  } catch (const invalid_input_error& e) {
    BOOST_TEST(e.message() == "moe_dispatcher::combine: the handle was dispatched with hidden size 4 but this "
                              "dispatcher's is 64");
  }
  // The handle is intact: its own dispatcher still combines it.
  std::fill(h.expert_output().begin(), h.expert_output().end(), 1.0f);
  std::vector<float> y4(4);
  narrow.combine(y4, h);
  BOOST_TEST(y4[0] == 1.0f);
}

// A layout made for another kind of exchange (flat on a hierarchical transport) is refused on that
// rank, after the exchanges.
BOOST_AUTO_TEST_CASE(a_layout_of_the_wrong_kind_is_refused) {
  const auto c = locus_test::make_case(5, 2, 2);
  local_fabric f(c.topo, transport_kind::hierarchical, exchange_options{std::chrono::milliseconds(5000)});
  const auto errors = run_ranks(f, [&](local_transport& ep) {
    moe_dispatcher<local_transport, float> d(ep, c.map, c.hidden);
    layout<> l;
    if (ep.rank() == 0)
      l.assign(c.routings[0].view(), c.map, c.topo, 0, layout_options{transport_kind::flat});
    else
      d.plan(l, c.routings[ep.rank()].view());
    const auto x = c.inputs(ep.rank());
    auto h = d.dispatch(std::span<const float>(x), l);
  });
  BOOST_TEST(raised<invalid_input_error>(errors[0]));
  for (std::size_t r = 1; r < 4; ++r)
    BOOST_TEST(!errors[r]);
}

// A rank whose input is bad raises from dispatch, but still serves what its peers sent: after it
// computes and combines (with no tokens of its own), every other rank's outputs are exact.
BOOST_AUTO_TEST_CASE(a_rank_with_bad_input_still_serves_its_peers) {
  const auto c = locus_test::make_case(13, 2, 2);
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    local_fabric f(c.topo, kind, exchange_options{std::chrono::milliseconds(5000)});
    std::vector<double> errors(c.topo.ranks(), 1.0);
    const auto raised_by = run_ranks(f, [&](local_transport& ep) {
      const std::size_t me = ep.rank();
      moe_dispatcher<local_transport, float> d(ep, c.map, c.hidden);
      auto x = c.inputs(me);
      std::vector<float> y(x.size());
      if (me == 2) x.push_back(0.0f);
      layout<> l;
      d.plan(l, c.routings[me].view());
      dispatch_handle<float> h;
      bool failed = false;
      try {
        d.dispatch(std::span<const float>(x), l, h);
      } catch (const invalid_input_error&) {
        failed = true;
      }
      locus_test::run_experts(h);
      if (failed) {
        d.combine(std::span<float>{}, h); // no tokens of its own this step
        throw invalid_input_error("rank 2 failed as planned", __FILE__, __LINE__);
      }
      d.combine(y, h);
      errors[me] = locus_test::max_error(y, c.reference(me));
    });
    BOOST_REQUIRE(c.routings[2].view().tokens() > 0);
    BOOST_TEST(raised<invalid_input_error>(raised_by[2]));
    for (std::size_t r : {0u, 1u, 3u}) {
      BOOST_TEST(!raised_by[r]);
      BOOST_TEST(errors[r] < 1e-5, "rank " << r << " " << to_string(kind) << ": error " << errors[r]);
    }
  }
}
