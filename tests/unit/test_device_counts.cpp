// The host side of the device transports' count round (transport/device_exchange.hpp): the tail
// of counts it carries beyond rows and entries (the device dispatcher's entries per local slot),
// the headers' agreement on its width, and the segments a receiver makes of it
// (slot_offsets_from), which size its expert compute without a wait. The transports that move
// these messages are CUDA code; this is the logic they share, run on the CPU.
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstring>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/layout.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace locus;
using namespace locus::transport;
namespace dx = locus::transport::detail::exchange;

BOOST_AUTO_TEST_SUITE(device_count_round)

// Each member's header announces the tail's width, and tail_to gives the counts meant for each
// receiver; a tail of the wrong size makes the request invalid (every member then raises, as for
// any bad request) and sends no counts.
BOOST_AUTO_TEST_CASE(requests_carry_their_tail) {
  const std::size_t members = 3;
  const std::vector<std::size_t> rows{1, 0, 2}, entries{2, 0, 3};
  const std::vector<std::uint32_t> tail{1, 1, 0, 0, 0, 0, 2, 0, 1}; // 3 slots per receiver
  const dx::device_request good(exchange_group::world, members, 16, rows, 8, entries, 11, tail, 3);
  BOOST_TEST(good.valid());
  const dx::position at{4, 2, 11};
  for (std::size_t m = 0; m < members; ++m) {
    const dx::header h = good.header_for(at, m);
    BOOST_TEST(h.tail == 3u);
    BOOST_TEST(h.count == rows[m]);
    BOOST_TEST(h.entries == entries[m]);
    for (std::size_t i = 0; i < 3; ++i)
      BOOST_TEST(good.tail_to(m, i) == tail[m * 3 + i]);
  }
  const std::vector<std::uint32_t> short_tail(tail.begin(), tail.end() - 1);
  const dx::device_request bad(exchange_group::world, members, 16, rows, 8, entries, 11, short_tail, 3);
  BOOST_TEST(!bad.valid());
  BOOST_TEST(bad.header_for(at, 0).status == static_cast<std::uint32_t>(dx::tail_size));
  BOOST_TEST(bad.tail_to(2, 2) == 0u);
  BOOST_TEST(std::string(dx::describe(dx::tail_size)).find("tail") != std::string::npos);
}

// Members that disagree on the tail's width are named by every member's verdict (each receives a
// header from every member, itself included); agreeing ones pass, and counts() hands the received
// tails on.
BOOST_AUTO_TEST_CASE(the_headers_agree_on_the_tail_width) {
  const dx::group_map groups{dynamic_topology(1, 3), 1};
  const std::vector<std::size_t> rows{1, 1, 1}, entries{1, 1, 1};
  const std::vector<std::uint32_t> tail{1, 0, 1, 0, 0, 1};
  const dx::device_request req(exchange_group::world, 3, 16, rows, 8, entries, 11, tail, 2);
  const dx::position at{0, 0, 11};
  std::vector<dx::header> received{req.header_for(at, 1), req.header_for(at, 1), req.header_for(at, 1)};
  bool expectations = true;
  BOOST_TEST(req.verdict(received, groups, expectations).empty());
  BOOST_TEST(!expectations);
  device_counts out;
  const std::vector<std::uint32_t> from{1, 0, 0, 1, 1, 0}; // what each member sent this one
  req.counts(received, from, out);
  BOOST_TEST(out.tail_width == 2u);
  BOOST_TEST(out.tail == from);
  BOOST_TEST(out.entries == entries);
  received[2].tail = 3;
  const std::string why = req.verdict(received, groups, expectations);
  BOOST_TEST(why.find("rank 2 sends 3") != std::string::npos, why);
}

// The NCCL transport's header round as bytes: every member writes its message to every member;
// member m receives sender s's message to m at s's place; read back, they give each sender's header
// to m (byte for byte) and its tail counts for m, which counts() hands on source-major.
BOOST_AUTO_TEST_CASE(header_messages_carry_each_senders_header_and_tail) {
  constexpr std::size_t R = 4, W = 3;
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::size_t> n(0, 9);
  std::vector<std::vector<std::size_t>> rows(R, std::vector<std::size_t>(R)), entries(R, std::vector<std::size_t>(R));
  std::vector<std::vector<std::uint32_t>> tails(R, std::vector<std::uint32_t>(R * W));
  for (std::size_t s = 0; s < R; ++s)
    for (std::size_t m = 0; m < R; ++m) {
      rows[s][m] = n(rng);
      entries[s][m] = rows[s][m] + n(rng);
      for (std::size_t i = 0; i < W; ++i)
        tails[s][m * W + i] = static_cast<std::uint32_t>(n(rng));
    }
  std::vector<dx::device_request> reqs;
  for (std::size_t s = 0; s < R; ++s)
    reqs.emplace_back(exchange_group::world, R, 16, rows[s], 8, entries[s], 5, tails[s], W);
  const dx::position at{2, 1, 5};
  const std::size_t message = dx::header_message_bytes(W);
  BOOST_TEST(message == sizeof(dx::header) + W * sizeof(std::uint32_t));
  std::vector<std::vector<std::byte>> sent(R, std::vector<std::byte>(R * message));
  for (std::size_t s = 0; s < R; ++s)
    for (std::size_t m = 0; m < R; ++m)
      dx::write_header_message(reqs[s], at, m, sent[s].data() + m * message);
  for (std::size_t m = 0; m < R; ++m) {
    std::vector<dx::header> headers(R);
    std::vector<std::uint32_t> tail(R * W);
    for (std::size_t s = 0; s < R; ++s)
      dx::read_header_message(sent[s].data() + m * message, W, headers[s], tail.data() + s * W);
    device_counts out;
    reqs[m].counts(headers, tail, out);
    for (std::size_t s = 0; s < R; ++s) {
      BOOST_TEST_CONTEXT("sender " << s << " to member " << m) {
        const dx::header want = reqs[s].header_for(at, m);
        BOOST_TEST(std::memcmp(&headers[s], &want, sizeof want) == 0);
        BOOST_TEST(out.rows[s] == rows[s][m]);
        BOOST_TEST(out.entries[s] == entries[s][m]);
        for (std::size_t i = 0; i < W; ++i)
          BOOST_TEST(out.tail[s * W + i] == tails[s][m * W + i]);
      }
    }
  }
}

// The segments: each local slot's entries summed over the senders, checked against the entries
// each sender announced; refused counts give a reason and all-zero offsets.
BOOST_AUTO_TEST_CASE(slot_offsets_from_sums_the_senders) {
  device_counts in;
  in.entries = {3, 0, 4};
  in.tail_width = 3;
  in.tail = {1, 0, 2, 0, 0, 0, 2, 2, 0};
  std::vector<std::int32_t> offsets;
  BOOST_TEST(dx::slot_offsets_from(in, 3, offsets).empty());
  // slot 0: 1 + 0 + 2, slot 1: 0 + 0 + 2, slot 2: 2 + 0 + 0
  BOOST_TEST(offsets == (std::vector<std::int32_t>{0, 3, 5, 7}));

  device_counts none;
  none.entries = {0, 0};
  none.tail_width = 2;
  none.tail = {0, 0, 0, 0};
  BOOST_TEST(dx::slot_offsets_from(none, 2, offsets).empty());
  BOOST_TEST(offsets == (std::vector<std::int32_t>{0, 0, 0}));

  auto lying = in;
  lying.tail[4] = 1; // member 1 announced no entries but counts one
  std::string why = dx::slot_offsets_from(lying, 3, offsets);
  BOOST_TEST(why.find("announced 0 entries by member 1") != std::string::npos, why);
  BOOST_TEST(offsets == (std::vector<std::int32_t>{0, 0, 0, 0}));

  BOOST_TEST(!dx::slot_offsets_from(in, 4, offsets).empty()); // another width than the slots
  auto cut = in;
  cut.tail.pop_back();
  BOOST_TEST(!dx::slot_offsets_from(cut, 3, offsets).empty());

  device_counts huge; // two senders whose entries fit in 32 bits alone but not together
  huge.entries = {2000000000, 2000000000};
  huge.tail_width = 1;
  huge.tail = {2000000000, 2000000000};
  why = dx::slot_offsets_from(huge, 1, offsets);
  BOOST_TEST(why.find("32-bit") != std::string::npos, why);
  BOOST_TEST(offsets == (std::vector<std::int32_t>{0, 0}));
}

// What the device flat step relies on, on the CPU: a flat layout's copies per (rank, slot) — the
// tail each rank sends in the count round — summed over the senders are the segments of the
// receive layout each receiver builds from the entry metadata it actually receives (the layout is
// equal bit for bit on the device). Were they not, every step's device check would refuse its
// metadata. Random routings over maps with replicas, under every replica rule, several topologies.
BOOST_AUTO_TEST_CASE(announced_segments_are_the_received_layout_segments) {
  std::mt19937 rng(2026);
  for (const auto& [nodes, gpus] : {std::pair<std::size_t, std::size_t>{1, 2}, {2, 2}, {3, 2}, {4, 1}}) {
    const dynamic_topology topo(nodes, gpus);
    const std::size_t R = topo.ranks(), S = 3, E = 2 * R;
    // Rank r holds experts 2r and 2r + 1, and in its third slot a replica of an expert of the next rank.
    std::vector<expert_id> table(R * S);
    for (std::size_t r = 0; r < R; ++r) {
      table[r * S] = static_cast<expert_id>(2 * r);
      table[r * S + 1] = static_cast<expert_id>(2 * r + 1);
      table[r * S + 2] = static_cast<expert_id>((2 * r + 2 + r % 2) % E);
    }
    const expert_map map(E, R, S, table);
    for (const auto rule : all_replica_rules) {
      const std::size_t k = std::min<std::size_t>(3, E);
      std::vector<layout<top_k<>>> layouts(R);
      for (std::size_t src = 0; src < R; ++src) {
        const std::size_t tokens = 1 + rng() % 40;
        std::vector<expert_id> ids(tokens * k), all(E);
        std::iota(all.begin(), all.end(), 0);
        for (std::size_t t = 0; t < tokens; ++t) {
          std::shuffle(all.begin(), all.end(), rng);
          std::copy_n(all.begin(), k, ids.begin() + static_cast<std::ptrdiff_t>(t * k));
        }
        const routing<top_k<>> r(std::move(ids), std::vector<float>(tokens * k, 0.25f), top_k<>(k));
        layout_options opt{transport_kind::flat, 1};
        opt.replicas.rule = rule;
        layouts[src].assign(r.view(), map, topo, src, opt);
      }
      for (std::size_t d = 0; d < R; ++d) {
        // What rank d receives: the count round's counts and tails, and the entry metadata itself.
        device_counts in;
        in.tail_width = S;
        std::vector<std::int32_t> row_entries, slots;
        for (std::size_t src = 0; src < R; ++src) {
          const auto& l = layouts[src];
          const auto ro = l.rank_offsets(), reo = l.rank_entry_offsets(), rows = l.row_entry_offsets();
          in.rows.push_back(static_cast<std::size_t>(ro[d + 1] - ro[d]));
          in.entries.push_back(static_cast<std::size_t>(reo[d + 1] - reo[d]));
          for (std::size_t s = 0; s < S; ++s)
            in.tail.push_back(static_cast<std::uint32_t>(l.slot_counts()[d * S + s]));
          for (std::int32_t row = ro[d]; row < ro[d + 1]; ++row)
            row_entries.push_back(rows[static_cast<std::size_t>(row) + 1] - rows[static_cast<std::size_t>(row)]);
          slots.insert(slots.end(), l.entry_slot().begin() + reo[d], l.entry_slot().begin() + reo[d + 1]);
        }
        std::vector<std::int32_t> announced;
        BOOST_TEST_CONTEXT(nodes << " x " << gpus << ", rule " << to_string(rule) << ", receiver " << d) {
          BOOST_TEST(dx::slot_offsets_from(in, S, announced).empty());
          receive_layout received;
          received.assign(S, row_entries, slots);
          BOOST_TEST(announced ==
                         std::vector<std::int32_t>(received.slot_offsets().begin(), received.slot_offsets().end()),
                     boost::test_tools::per_element());
        }
      }
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
