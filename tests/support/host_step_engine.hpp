#pragma once
// The CPU side of the device steps' sequences (transport/detail/flat_step_sequence.hpp,
// node_step_sequence.hpp): a host engine, ranks as threads over the one-GPU transport's protocol with host memory, and
// the checks both tests make (tests/unit/test_flat_step.cpp, test_node_step.cpp). A row is one
// double, a token's identity (token_id); an expert's output for it is expert_output, small integers
// so that every sum is exact in double. Each rank must receive every copy routed to it once
// (token, expert, weight) under the segments the count round announced, and combine must return
// each token's weighted sum over its copies; the reference comes from the routings and the host
// layouts' replica choices alone.

#include "../mpi/dispatch_cases.hpp"
#include "host_local_device.hpp"
#include "rank_threads.hpp"

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <locus/transport/detail/node_step.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/detail/step_engine.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <locus/transport/layout.hpp>
#include <locus/transport/local.hpp>
#include <span>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

namespace locus_test::host_step {

using namespace locus;
using namespace locus::transport;
namespace st = locus::transport::detail::stage;

inline std::int64_t token_id(std::size_t s, std::size_t t) { return static_cast<std::int64_t>(s * 1000000 + t); }
// An expert's output for a token: small integers, so every sum below is exact in double.
inline double expert_output(std::int64_t id, expert_id e) { return static_cast<double>(id % 97 + 1) * (e + 3); }

// The count round every rank makes: per receiver q, what each source sent it.
struct round_state {
  std::vector<std::vector<std::size_t>> rows, entries; // per source: to each rank
  std::vector<std::vector<std::uint32_t>> tail;        // per source: W per rank
};
inline device_counts delivered(const round_state& r, std::size_t q, std::size_t W) {
  device_counts out;
  out.tail_width = W;
  for (std::size_t s = 0; s < r.rows.size(); ++s) {
    out.rows.push_back(r.rows[s][q]);
    out.entries.push_back(r.entries[s][q]);
    out.tail.insert(out.tail.end(), r.tail[s].begin() + static_cast<std::ptrdiff_t>(q * W),
                    r.tail[s].begin() + static_cast<std::ptrdiff_t>(q * W + W));
  }
  return out;
}

// A host buffer that fills what it holds with a poison value at every resize, as device memory
// holds whatever it held: a stage that reads an element the sequence never wrote shows.
template <class U>
struct poisoned_buffer {
  std::vector<U> v;
  void resize(std::size_t n) { v.assign(n, poison()); }
  U* data() noexcept { return v.data(); }
  const U* data() const noexcept { return v.data(); }
  static U poison() {
    if constexpr (std::is_same_v<U, locus::transport::detail::node_step::node_entry>)
      return {-1000003, -1000003, std::numeric_limits<float>::quiet_NaN()};
    else if constexpr (std::is_floating_point_v<U>)
      return std::numeric_limits<U>::quiet_NaN();
    else
      return static_cast<U>(-1000003);
  }
};

// The device steps' host engine (transport/detail/step_engine.hpp): stage bodies through
// stage::run_grid on one grid shape, the one-thread scan body, exchanges over the in-process host
// transport (each checks that every sender sends the counts the receiver expects). A row is one
// double: the token's identity on the way out, its weighted sum on the way back.
struct engine {
  template <class U>
  using buffer = poisoned_buffer<U>;
  std::size_t blocks, threads; // the grid every body runs on
  host_local_transport* ex;
  const layout<>* l;
  std::size_t source;
  device_exchange_result metadata, rows, returned;
  std::vector<std::byte> last; // the last exchange's received bytes

  template <class Stage, class... A>
  void launch(std::size_t, Stage, A... a) {
    st::run_grid(blocks, threads, [&](st::grid_index g) { Stage::run(g, a...); });
  }
  void scan(const std::int32_t* in, std::size_t n, std::int32_t* out) {
    st::run_grid(blocks, threads, [&](st::grid_index g) { st::exclusive_scan(g, in, n, out); });
  }
  template <class U>
  void zero(U* p, std::size_t n) {
    std::fill_n(p, n, U{});
  }
  template <class U>
  void copy(U* dst, const U* src, std::size_t n) {
    std::copy_n(src, n, dst);
  }
  void upload(std::span<const std::int32_t> tables, std::int32_t word, std::int32_t* table_dst,
              std::int32_t* word_dst) {
    std::copy(tables.begin(), tables.end(), table_dst);
    *word_dst = word;
  }
  // The received bytes stay valid only until the next exchange of any kind (step_engine.hpp): each
  // exchange poisons the last one's bytes and copies its own into a fresh block, so a sequence
  // that read a result after another exchange reads poison (or freed memory, under ASan).
  const void* exchange(exchange_group g, locus::transport::detail::step::received into, std::size_t element_bytes,
                       const void* send, std::span<const std::size_t> send_counts,
                       std::span<const std::size_t> recv_counts) {
    device_exchange_result& out = into == locus::transport::detail::step::received::metadata ? metadata
                                  : into == locus::transport::detail::step::received::rows   ? rows
                                                                                             : returned;
    std::fill(last.begin(), last.end(), std::byte{0xA5});
    ex->exchange_device_known(g, element_bytes, static_cast<const std::byte*>(send), send_counts, recv_counts, out);
    const std::size_t bytes = out.offsets.back() * element_bytes;
    last = std::vector<std::byte>(out.rows, out.rows + bytes);
    return last.data();
  }
  void permute(double* dst) {
    for (std::size_t r = 0; r < l->rows(); ++r)
      dst[r] = static_cast<double>(token_id(source, static_cast<std::size_t>(l->row_token()[r])));
  }
  void gather(const double* src, const std::int32_t* index, std::size_t n, double* dst) {
    for (std::size_t i = 0; i < n; ++i)
      dst[i] = src[index[i]];
  }
  void reduce(const double* src, const std::int32_t* offsets, const std::int32_t* position, const float* weight,
              std::size_t n, double* dst, const std::int32_t* flag) {
    for (std::size_t r = 0; r < n; ++r) {
      double sum = 0;
      if (*flag == 0)
        for (std::int32_t e = offsets[r]; e < offsets[r + 1]; ++e)
          sum += static_cast<double>(weight[position[e]]) * src[position[e]];
      dst[r] = sum;
    }
  }
};

// What one rank's run of the sequence received and returned.
struct rank_result {
  std::vector<double> received;                 // the rows received (token identities)
  std::vector<std::int32_t> row_entries, slots; // their entry metadata
  std::vector<float> weights;
  std::vector<double> returned; // the layout's rows after combine
  std::int32_t flag = 0;        // the forwarding check's word (hierarchical)
};

// Runs `step(q, engine&, result&)` for every rank q as a thread over the one-GPU transport's
// protocol with host memory (host_local_device.hpp) of `kind`, its
// engine on a `blocks × threads` grid; a rank's exception fails the test on the test's thread.
template <class Step>
std::vector<rank_result> run_ranks(const dynamic_topology& topo, transport_kind kind,
                                   const std::vector<layout<>>& layouts, std::size_t blocks, std::size_t threads,
                                   Step&& step) {
  host_local_fabric fabric(topo, kind, exchange_options{std::chrono::milliseconds(20000)});
  std::vector<rank_result> results(topo.ranks());
  const auto errors = run_rank_threads(topo.ranks(), [&](std::size_t q) {
    auto endpoint = fabric.endpoint(q, 0);
    engine e{blocks, threads, &endpoint, &layouts[q], q, {}, {}, {}, {}};
    step(q, e, results[q]);
  });
  for (std::size_t q = 0; q < results.size(); ++q)
    if (errors[q]) {
      try {
        std::rethrow_exception(errors[q]);
      } catch (const std::exception& e) {
        BOOST_FAIL("rank " << q << ": " << e.what());
      }
    }
  return results;
}

// Rank q's expert outputs summed per received row (its entries in order), from its received rows
// and metadata (`out`); throws on a slot out of range (the rank thread reports it).
inline std::vector<double> expert_sums(const rank_result& out, const expert_map& map, std::size_t q) {
  std::vector<double> back;
  std::size_t e = 0;
  for (std::size_t r = 0; r < out.received.size(); ++r) {
    double sum = 0;
    for (std::int32_t i = 0; i < out.row_entries[r] && e < out.slots.size(); ++i, ++e) {
      const auto slot = static_cast<std::size_t>(out.slots[e]);
      if (slot >= map.slots_per_rank()) throw std::logic_error("a received slot out of range");
      sum += static_cast<double>(out.weights[e]) *
             expert_output(static_cast<std::int64_t>(out.received[r]), map.expert_at(q, slot));
    }
    back.push_back(sum);
  }
  return back;
}

// The checks of a case once every rank ran: what each received against the routings, under
// `slot_offsets[q]` (the segments rank q's count round announced), and each token's combined sum.
inline void check_step(const locus_test::dispatch_case& c, const std::vector<layout<>>& layouts,
                       const std::vector<rank_result>& results,
                       const std::vector<std::vector<std::int32_t>>& slot_offsets) {
  const std::size_t R = c.topo.ranks(), K = c.k, S = c.map.slots_per_rank();
  // Every copy arrives once at the rank of its replica, with its slot's expert and its weight,
  // under the segments the count round announced.
  using copy = std::tuple<std::int64_t, expert_id, float>;
  std::vector<std::vector<copy>> expected(R), got(R);
  for (std::size_t s = 0; s < R; ++s)
    for (std::size_t t = 0; t < c.routings[s].tokens(); ++t)
      for (std::size_t j = 0; j < K; ++j) {
        const auto d = static_cast<std::size_t>(layouts[s].copy_rank()[t * K + j]);
        expected[d].emplace_back(token_id(s, t), c.routings[s].view().expert(t, j), c.routings[s].view().weight(t, j));
      }
  for (std::size_t q = 0; q < R; ++q) {
    const auto& me = results[q];
    BOOST_TEST_CONTEXT("rank " << q) {
      BOOST_TEST(me.flag == 0);
      std::vector<std::int32_t> per_slot(S + 1, 0);
      std::size_t e = 0;
      for (std::size_t r = 0; r < me.received.size(); ++r) {
        BOOST_TEST_REQUIRE(me.row_entries[r] >= 1);
        for (std::int32_t i = 0; i < me.row_entries[r]; ++i, ++e) {
          BOOST_TEST_REQUIRE(e < me.slots.size());
          const auto slot = static_cast<std::size_t>(me.slots[e]);
          got[q].emplace_back(static_cast<std::int64_t>(me.received[r]), c.map.expert_at(q, slot), me.weights[e]);
          ++per_slot[slot + 1];
        }
      }
      BOOST_TEST(e == me.slots.size());
      for (std::size_t i = 0; i < S; ++i)
        per_slot[i + 1] += per_slot[i];
      BOOST_TEST(per_slot == slot_offsets[q]);
      std::sort(expected[q].begin(), expected[q].end());
      std::sort(got[q].begin(), got[q].end());
      BOOST_TEST((got[q] == expected[q]));
    }
  }
  // Combine: each token's distinct rows summed equal its weighted sum over its copies.
  for (std::size_t s = 0; s < R; ++s) {
    const auto& l = layouts[s];
    const auto& rows = results[s].returned;
    for (std::size_t t = 0; t < c.routings[s].tokens(); ++t) {
      double y = 0, want = 0;
      std::vector<std::int32_t> seen;
      for (std::size_t j = 0; j < K; ++j) {
        const std::int32_t row = l.copy_row()[t * K + j];
        if (std::find(seen.begin(), seen.end(), row) == seen.end()) y += rows.at(static_cast<std::size_t>(row));
        seen.push_back(row);
        want += static_cast<double>(c.routings[s].view().weight(t, j)) *
                expert_output(token_id(s, t), c.routings[s].view().expert(t, j));
      }
      BOOST_TEST_CONTEXT("rank " << s << " token " << t) { BOOST_TEST(y == want); }
    }
  }
}

} // namespace locus_test::host_step
