#define BOOST_TEST_MODULE layout_kernels
#include "../support/hold_stream.cuh"
#include "../support/layout_cases.hpp"

#include <boost/test/unit_test.hpp>

// The device layout and permute kernels against the host path (itself tested against brute
// force in tests/unit/test_layout.cpp): every array equal, every vector equal bit for bit.
#include <algorithm>
#include <array>
#include <cstring>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_permute.hpp>
#include <locus/transport/permute.hpp>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

using namespace locus;
using namespace locus::transport;

namespace {

expert_map random_map(std::size_t experts, std::size_t ranks, std::size_t slots, std::size_t replicas,
                      std::mt19937& rng) {
  std::vector<std::size_t> free_slots(ranks * slots);
  std::iota(free_slots.begin(), free_slots.end(), 0);
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  std::vector<expert_id> table(ranks * slots, empty_slot);
  std::size_t next = 0;
  for (std::size_t e = 0; e < experts; ++e)
    table[free_slots[next++]] = static_cast<expert_id>(e);
  for (std::size_t i = 0; i < replicas && next < free_slots.size(); ++i)
    table[free_slots[next++]] = static_cast<expert_id>(i % std::min<std::size_t>(experts, 5));
  return expert_map(experts, ranks, slots, table);
}

using locus_test::random_routing;

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
  std::vector<T> out(n);
  if (n) LOCUS_CUDA_CHECK(cudaMemcpy(out.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

template <class T>
void check_equal(const char* what, std::span<const T> host, const T* device) {
  const auto got = download(device, host.size());
  BOOST_CHECK_MESSAGE(std::memcmp(got.data(), host.data(), host.size() * sizeof(T)) == 0,
                      what << " differs from the host");
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// `H`: the row width the device kernels get (a number, or a static locus::hidden they are
// instantiated for).
template <class T, std::size_t K, class Experts, class H = std::size_t, class Topology>
void check_case(std::size_t experts, const Topology& topo, std::size_t slots, std::size_t replicas, std::size_t tokens,
                std::size_t hidden, transport_kind kind, std::mt19937& rng,
                const placement::replica_policy& policy = {}) {
  const H hx(hidden);
  const expert_map map = random_map(experts, topo.ranks(), slots, replicas, rng);
  const auto r = random_routing<K>(tokens, experts, rng);
  const std::size_t src = topo.ranks() / 2;
  layout<top_k<K>> host;
  host.assign(r.view(), map, topo, src, layout_options{kind, 2, 64, policy});

  device_buffer<expert_id> ids;
  ids.upload(r.ids());
  device_buffer<float> weights;
  weights.upload(r.weights());
  device_layout<top_k<K>, Experts> dev;
  dev.assign(device_routing_view<top_k<K>>(ids.data(), weights.data(), tokens), map, topo, src, kind, nullptr, policy);
  BOOST_TEST_CONTEXT("E=" << experts << " K=" << K << " ranks " << topo.ranks() << " " << to_string(kind) << " hidden "
                          << hidden << " " << placement::to_string(policy.rule)) {
    BOOST_REQUIRE_EQUAL(dev.rows(), host.rows());
    BOOST_CHECK(dev.link_copies() == host.link_copies());
    check_equal<std::int32_t>("copy_rank", host.copy_rank(), dev.copy_rank());
    check_equal<std::int32_t>("copy_slot", host.copy_slot(), dev.copy_slot());
    check_equal<std::int32_t>("copy_replica", host.copy_replica(), dev.copy_replica());
    check_equal<std::int32_t>("copy_row", host.copy_row(), dev.copy_row());
    check_equal<std::int32_t>("copy_entry", host.copy_entry(), dev.copy_entry());
    check_equal<std::int32_t>("row_token", host.row_token(), dev.row_token());
    check_equal<std::int32_t>("rank_offsets", host.rank_offsets(), dev.rank_offsets());
    check_equal<std::int32_t>("rank_entry_offsets", host.rank_entry_offsets(), dev.rank_entry_offsets());
    check_equal<std::int32_t>("row_entry_offsets", host.row_entry_offsets(), dev.row_entry_offsets());
    check_equal<std::int32_t>("entry_copy", host.entry_copy(), dev.entry_copy());
    check_equal<std::int32_t>("entry_target", host.entry_target(), dev.entry_target());
    check_equal<std::int32_t>("entry_slot", host.entry_slot(), dev.entry_slot());
    check_equal<float>("entry_weight", host.entry_weight(), dev.entry_weight());
    check_equal<std::int32_t>("slot_counts", host.slot_counts(), dev.slot_counts());
    // The tokens reaching each rank (the hierarchical count round's), counted on the host.
    BOOST_CHECK(dev.reach_host() == locus_test::tokens_reaching(host.copy_rank(), K, topo.ranks()));
    if (kind == transport_kind::hierarchical) {
      std::vector<std::int32_t> fw(host.rows());
      for (std::size_t i = 0; i < host.rows(); ++i)
        fw[i] = static_cast<std::int32_t>(host.forwards(i));
      check_equal<std::int32_t>("row_forwards", std::span<const std::int32_t>(fw), dev.row_forwards());
    }

    // Data movement, host vs device.
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    std::vector<T> x(tokens * hidden), entry_out(host.copies() * hidden);
    for (auto& v : x)
      v = T(u(rng));
    for (auto& v : entry_out)
      v = T(u(rng));
    device_buffer<T> dx, dsend, dback, dentry, dout;
    dx.upload(x);
    dentry.upload(entry_out);
    dsend.resize(host.rows() * hidden);
    dback.resize(tokens * hidden);
    dout.resize(tokens * hidden);

    std::vector<T> send(host.rows() * hidden), back(tokens * hidden), out(tokens * hidden), outw(tokens * hidden);
    permute<T>(host, x, hidden, send);
    permute(dev, dx.data(), hx, dsend.data());
    BOOST_CHECK(same_bits(dsend.to_host(), send));
    unpermute(dev, dsend.data(), hx, dback.data());
    BOOST_CHECK(same_bits(dback.to_host(), x));
    // Returned rows: any values; combine sums them.
    combine<T>(host, send, hidden, out);
    combine(dev, dsend.data(), hx, dout.data());
    BOOST_CHECK(same_bits(dout.to_host(), out));
    combine_weighted<T>(host, entry_out, hidden, outw);
    combine_weighted(dev, dentry.data(), hx, dout.data());
    BOOST_CHECK(same_bits(dout.to_host(), outw));

    // Receiver side: this source's rows to rank 0 as a receive layout.
    const auto r0 = static_cast<std::size_t>(host.rank_offsets()[0]),
               r1 = static_cast<std::size_t>(host.rank_offsets()[1]);
    std::vector<std::int32_t> counts;
    for (std::size_t row = r0; row < r1; ++row)
      counts.push_back(host.row_entry_offsets()[row + 1] - host.row_entry_offsets()[row]);
    const auto e0 = static_cast<std::size_t>(host.rank_entry_offsets()[0]),
               e1 = static_cast<std::size_t>(host.rank_entry_offsets()[1]);
    receive_layout rl;
    rl.assign(slots, counts, host.entry_slot().subspan(e0, e1 - e0), host.entry_weight().subspan(e0, e1 - e0));
    device_receive_layout drl(rl);
    const std::vector<T> recv(send.begin(), send.begin() + static_cast<std::ptrdiff_t>(r1 * hidden));
    std::vector<T> in(rl.entries() * hidden), red(rl.rows() * hidden);
    gather_expert_input<T>(rl, recv, hidden, in);
    reduce_expert_output<T>(rl, in, hidden, red);
    device_buffer<T> din, dred;
    din.resize(in.size());
    dred.resize(red.size());
    gather_expert_input(drl, dsend.data(), hx, din.data());
    BOOST_CHECK(same_bits(din.to_host(), in));
    reduce_expert_output(drl, din.data(), hx, dred.data());
    BOOST_CHECK(same_bits(dred.to_host(), red));
  }
}

} // namespace

// The receive layout's check word, read after the stream was waited for.
static std::int32_t check_word(const locus::transport::device_receive_layout& d) {
  std::int32_t w = -1;
  LOCUS_CUDA_CHECK(cudaMemcpy(&w, d.flag(), sizeof w, cudaMemcpyDeviceToHost));
  return w;
}

BOOST_AUTO_TEST_CASE(device_layout_and_kernels_equal_host) {
  std::mt19937 rng(17);
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    check_case<float, 2, experts<8>>(8, dynamic_topology(2, 2), 3, 4, 777, 64, kind, rng);
    check_case<bfloat16, 2, experts<>>(8, dynamic_topology(1, 1), 10, 2, 100, 13, kind, rng);
    check_case<bfloat16, 6, experts<64>>(64, dynamic_topology(2, 4), 9, 6, 3001, 256, kind, rng);
    check_case<float, 1, experts<128>>(128, dynamic_topology(4, 4), 9, 10, 2000, 7, kind, rng);
    check_case<bfloat16, 8, experts<256>>(256, topology<nodes<8>, gpus_per_node<8>>{}, 5, 40, 4096, 7168, kind, rng);
    check_case<float, 8, experts<>>(256, dynamic_topology(4, 8), 9, 20, 513, 100, kind, rng);
  }
}

// Kernels instantiated for a static hidden size (constant row loops) give the host's bits too.
BOOST_AUTO_TEST_CASE(static_hidden_kernels_equal_host) {
  std::mt19937 rng(23);
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    check_case<float, 2, experts<8>, hidden<64>>(8, dynamic_topology(2, 2), 3, 4, 777, 64, kind, rng);
    check_case<bfloat16, 2, experts<>, hidden<13>>(8, dynamic_topology(1, 1), 10, 2, 100, 13, kind, rng);
    check_case<bfloat16, 8, experts<256>, hidden<7168>>(256, dynamic_topology(8, 8), 5, 40, 1024, 7168, kind, rng);
  }
}

// Every replica rule: the kernel's choices (7-argument choose_replica, the copy index as the batch
// position) are the host layout's.
BOOST_AUTO_TEST_CASE(device_layout_follows_every_replica_rule) {
  std::mt19937 rng(29);
  std::vector<std::uint8_t> hot8(8, 0), hot32(32, 0);
  hot8[1] = hot8[6] = 1;
  for (std::size_t r = 0; r < hot32.size(); r += 3)
    hot32[r] = 1;
  for (const auto rule : placement::all_replica_rules)
    for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
      check_case<float, 6, experts<64>>(64, dynamic_topology(2, 4), 9, 20, 3001, 16, kind, rng, {rule, 3, hot8});
      check_case<float, 8, experts<>>(256, dynamic_topology(4, 8), 9, 40, 513, 8, kind, rng, {rule, 7, hot32});
    }
}

BOOST_AUTO_TEST_CASE(device_layout_names_bad_input) {
  const expert_map map(8, 4, 2, {0, 1, 2, 3, 4, 5, 6, 7});
  const dynamic_topology topo(2, 2);
  const std::vector<expert_id> bad{0, 1, 2, 9};
  const std::vector<float> w{1, 1, 1, 1};
  device_buffer<expert_id> ids;
  ids.upload(bad);
  device_buffer<float> weights;
  weights.upload(w);
  device_layout<top_k<2>, experts<8>> dev;
  try {
    dev.assign(device_routing_view<top_k<2>>(ids.data(), weights.data(), 2), map, topo, 0);
    BOOST_ERROR("no exception for an out-of-range expert id");
  } catch (const invalid_input_error& e) {
    BOOST_CHECK(std::string(e.what()).find("token 1 choice 1: expert id 9 out of range") != std::string::npos);
  }
}

// The layout's uploads (its replica tables, megabytes here) queue behind the stream's earlier work
// instead of waiting for it, so that its one wait is `wait` (a transport's timed synchronize): the
// stream is held by a kernel that only the wait releases. A copy from pageable memory of this size
// waits for the stream, so the kernel would time out first.
BOOST_AUTO_TEST_CASE(device_layout_uploads_queue_behind_earlier_work) {
  const std::size_t E = std::size_t{1} << 18;
  std::vector<expert_id> table(E);
  std::iota(table.begin(), table.end(), 0);
  const expert_map map(E, 1, E, table);
  const dynamic_topology topo(1, 1);
  const std::vector<expert_id> ids_h{0, 77, 5, 262143};
  const std::vector<float> w_h{0.5f, 0.5f, 0.25f, 0.75f};
  device_buffer<expert_id> ids;
  ids.upload(ids_h);
  device_buffer<float> weights;
  weights.upload(w_h);
  device_buffer<int> released(1);
  device_layout<top_k<2>, experts<>> dev;
  // One layout first, on a stream nothing holds: with CUDA's lazy module loading (the default) a
  // kernel's first launch may wait for the device, which behind the held stream would read as the
  // layout waiting. Later steps launch loaded kernels; this case tests those.
  dev.assign(device_routing_view<top_k<2>>(ids.data(), weights.data(), 2), map, topo, 0, transport_kind::flat, nullptr,
             {}, nullptr, [] { LOCUS_CUDA_CHECK(cudaStreamSynchronize(nullptr)); });
  LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
  const locus_test::mapped_flag go;
  cudaStream_t stream = locus_test::held_stream(go, released.data());
  bool waited = false;
  dev.assign(device_routing_view<top_k<2>>(ids.data(), weights.data(), 2), map, topo, 0, transport_kind::flat, stream,
             {}, nullptr, [&] {
               waited = true;
               go.set();
               LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
             });
  BOOST_TEST(waited);
  BOOST_TEST(released.to_host(stream) == std::vector<int>{1}, "the layout waited for the stream before its wait");
  BOOST_TEST(dev.rows() == 2u); // one row per token: one rank
  LOCUS_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The "plan nothing" flag (the router's non-finite-logit counter): clear, the layout is the one
// built without it; set, it has no rows, tokens or link copies, leaves the routing's own errors
// unreported (the flag's owner raises its own), and hands the flag's words back from the same wait.
BOOST_AUTO_TEST_CASE(plan_nothing_flag_empties_the_layout_only_when_set) {
  std::mt19937 rng(37);
  const dynamic_topology topo(2, 4);
  const auto map = random_map(32, 8, 6, 8, rng);
  const auto r = random_routing<4>(300, 32, rng);
  device_buffer<expert_id> ids, bad_ids;
  ids.upload(r.ids());
  std::vector<expert_id> bad(r.ids().begin(), r.ids().end());
  bad[5] = -1; // what the router writes for a flagged token
  bad_ids.upload(bad);
  device_buffer<float> weights;
  weights.upload(r.weights());
  for (transport_kind kind : {transport_kind::flat, transport_kind::hierarchical}) {
    BOOST_TEST_CONTEXT((kind == transport_kind::flat ? "flat" : "hierarchical")) {
      device_layout<top_k<4>, experts<>> plain, clear, set;
      plain.assign(device_routing_view<top_k<4>>(ids.data(), weights.data(), 300), map, topo, 3, kind);
      BOOST_TEST_REQUIRE(plain.rows() > 0);
      device_buffer<unsigned long long> flag;
      flag.upload(std::vector<unsigned long long>{0, ~0ull});
      clear.assign(device_routing_view<top_k<4>>(ids.data(), weights.data(), 300), map, topo, 3, kind, nullptr, {},
                   flag.data());
      BOOST_TEST(!clear.planned_nothing());
      BOOST_TEST(clear.tokens() == 300u);
      BOOST_TEST(clear.rank_offsets_host() == plain.rank_offsets_host());
      BOOST_TEST(clear.rank_entry_offsets_host() == plain.rank_entry_offsets_host());
      BOOST_TEST(clear.link_copies() == plain.link_copies());
      flag.upload(std::vector<unsigned long long>{3, 42});
      set.assign(device_routing_view<top_k<4>>(bad_ids.data(), weights.data(), 300), map, topo, 3, kind, nullptr, {},
                 flag.data());
      BOOST_TEST(set.planned_nothing());
      BOOST_TEST((set.flag_words() == std::array<unsigned long long, 2>{3, 42}));
      BOOST_TEST(set.rows() == 0u);
      BOOST_TEST(set.tokens() == 0u);
      BOOST_TEST(set.rank_offsets_host() == std::vector<std::int32_t>(9, 0));
      BOOST_TEST(set.rank_entry_offsets_host() == std::vector<std::int32_t>(9, 0));
      BOOST_TEST((set.link_copies() == std::array<std::uint64_t, link_class_count>{}));
    }
  }
}

// device_receive_layout::build (the receive-layout stage bodies on the device) equals the host
// receive_layout bit for bit, weights included, and reads back the same slot offsets.
BOOST_AUTO_TEST_CASE(device_built_receive_layout_equals_host) {
  std::mt19937 rng(16);
  for (const std::size_t slots : {1u, 32u})
    for (const std::size_t rows : {0u, 5u, 1000u}) {
      std::vector<std::int32_t> counts(rows);
      for (auto& c : counts)
        c = std::uniform_int_distribution<std::int32_t>(1, 8)(rng);
      const auto entries = static_cast<std::size_t>(std::accumulate(counts.begin(), counts.end(), 0));
      std::vector<std::int32_t> slot(entries);
      std::vector<float> w(entries);
      for (std::size_t e = 0; e < entries; ++e) {
        slot[e] = std::uniform_int_distribution<std::int32_t>(0, static_cast<std::int32_t>(slots) - 1)(rng);
        w[e] = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
      }
      receive_layout host;
      host.assign(slots, counts, slot, w);
      device_buffer<std::int32_t> dc, ds;
      device_buffer<float> dw;
      dc.upload(std::span<const std::int32_t>(counts));
      ds.upload(std::span<const std::int32_t>(slot));
      dw.upload(std::span<const float>(w));
      device_receive_layout d;
      d.build(host.slot_offsets(), dc.data(), rows, ds.data(), dw.data(), entries);
      LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<std::int32_t> offsets(rows + 1), expert_row(entries), position(entries);
      std::vector<float> expert_weight(entries);
      LOCUS_CUDA_CHECK(cudaMemcpy(offsets.data(), d.row_entry_offsets(), offsets.size() * 4, cudaMemcpyDeviceToHost));
      if (entries > 0) {
        LOCUS_CUDA_CHECK(cudaMemcpy(expert_row.data(), d.expert_row(), entries * 4, cudaMemcpyDeviceToHost));
        LOCUS_CUDA_CHECK(cudaMemcpy(position.data(), d.entry_position(), entries * 4, cudaMemcpyDeviceToHost));
        LOCUS_CUDA_CHECK(cudaMemcpy(expert_weight.data(), d.expert_weight(), entries * 4, cudaMemcpyDeviceToHost));
      }
      BOOST_TEST_CONTEXT(slots << " slots, " << rows << " rows") {
        BOOST_TEST(check_word(d) == 0);
        BOOST_TEST(d.entries() == entries);
        BOOST_TEST(std::equal(offsets.begin(), offsets.end(), host.row_entry_offsets().begin(),
                              host.row_entry_offsets().end()));
        BOOST_TEST(std::equal(d.slot_offsets_host().begin(), d.slot_offsets_host().end(), host.slot_offsets().begin(),
                              host.slot_offsets().end()));
        BOOST_TEST(
            std::equal(expert_row.begin(), expert_row.end(), host.expert_row().begin(), host.expert_row().end()));
        BOOST_TEST(
            std::equal(position.begin(), position.end(), host.entry_position().begin(), host.entry_position().end()));
        BOOST_TEST(std::memcmp(expert_weight.data(), host.expert_weight().data(), entries * sizeof(float)) == 0);
      }
    }
}

// Bad received metadata: the device build writes nothing out of bounds (its bodies skip), sets
// its check word on the device (read here after a wait, as the dispatcher reads it with its next
// count read), the reduction over it writes zero rows and the gather nothing; a good build after
// it on the same object is clean again. `announced` are the slot offsets the count round gave.
BOOST_AUTO_TEST_CASE(device_receive_layout_refuses_bad_metadata) {
  namespace st = locus::transport::detail::stage;
  const std::size_t slots = 4, hidden = 8;
  struct bad_case {
    const char* what;
    std::vector<std::int32_t> counts, slot, announced;
    std::int32_t bit;
  };
  const std::vector<bad_case> cases{
      {"row without entries", {2, 0, 1}, {0, 1, 2}, {0, 1, 2, 3, 3}, st::bad_row_entries},
      {"counts exceed entries", {2, 1000000, 1}, {0, 1, 2}, {0, 1, 2, 3, 3}, st::bad_entry_total},
      {"counts short of entries", {1, 1}, {0, 1, 2}, {0, 1, 2, 3, 3}, st::bad_entry_total},
      {"negative slot", {1, 2}, {0, -1, 2}, {0, 1, 2, 3, 3}, st::bad_slot},
      {"slot past the end", {1, 2}, {0, 4, 2}, {0, 1, 2, 3, 3}, st::bad_slot},
      {"other slots than announced", {1, 2}, {0, 1, 1}, {0, 1, 2, 3, 3}, st::bad_slot_counts}};
  device_receive_layout d;
  for (const auto& c : cases) {
    device_buffer<std::int32_t> dc, ds;
    dc.upload(std::span<const std::int32_t>(c.counts));
    ds.upload(std::span<const std::int32_t>(c.slot));
    const std::vector<float> w(c.slot.size(), 1.0f);
    device_buffer<float> dw;
    dw.upload(std::span<const float>(w));
    d.build(c.announced, dc.data(), c.counts.size(), ds.data(), dw.data(), c.slot.size());
    // The reduction writes zeros over rows that held ones; the gather leaves its output as it was.
    const std::vector<float> ones(c.counts.size() * hidden, 1.0f), sevens(c.slot.size() * hidden, 7.0f);
    device_buffer<float> out, expert_out, in, expert_in;
    out.upload(std::span<const float>(ones));
    expert_out.upload(std::span<const float>(sevens));
    in.upload(std::span<const float>(sevens));
    expert_in.upload(std::span<const float>(sevens));
    reduce_expert_output(d, expert_out.data(), hidden, out.data());
    gather_expert_input(d, in.data(), hidden, expert_in.data());
    LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
    BOOST_TEST_CONTEXT(c.what) {
      const std::int32_t bits = check_word(d);
      BOOST_TEST((bits & c.bit) != 0);
      BOOST_CHECK_THROW(std::rethrow_exception(device_receive_layout::error_of(bits)), transport_error);
      BOOST_TEST(d.slot_offsets_host().size() == slots + 1);
      const auto zeros = out.to_host(), gathered = expert_in.to_host();
      BOOST_TEST(std::all_of(zeros.begin(), zeros.end(), [](float v) { return v == 0.0f; }));
      BOOST_TEST(std::all_of(gathered.begin(), gathered.end(), [](float v) { return v == 7.0f; }));
    }
  }
  const std::vector<std::int32_t> counts{1, 2}, slot{3, 0, 3}, want{0, 1, 1, 1, 3};
  device_buffer<std::int32_t> dc, ds;
  dc.upload(std::span<const std::int32_t>(counts));
  ds.upload(std::span<const std::int32_t>(slot));
  d.build(want, dc.data(), counts.size(), ds.data(), nullptr, slot.size());
  LOCUS_CUDA_CHECK(cudaDeviceSynchronize());
  BOOST_TEST(check_word(d) == 0);
  BOOST_TEST(!device_receive_layout::error_of(0));
  BOOST_TEST(std::equal(d.slot_offsets_host().begin(), d.slot_offsets_host().end(), want.begin(), want.end()));
  // Announced offsets that do not end at the entries received are the caller's error.
  const std::vector<std::int32_t> short_of{0, 1, 1, 1, 2};
  BOOST_CHECK_THROW(d.build(short_of, dc.data(), counts.size(), ds.data(), nullptr, slot.size()), invalid_input_error);
}
