// The host side of the device transports' count round (transport/device_exchange.hpp): the tail
// of counts it carries beyond rows and entries (the device dispatcher's entries per local slot),
// the headers' agreement on its width, and the segments a receiver makes of it
// (slot_offsets_from), which size its expert compute without a wait. The transports that move
// these messages are CUDA code; this is the logic they share, run on the CPU.
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <locus/core/error.hpp>
#include <locus/transport/device_exchange.hpp>
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

BOOST_AUTO_TEST_SUITE_END()
