#define BOOST_TEST_MODULE nccl_transport
#include "../mpi/dispatch_cases.hpp"

#include <atomic>
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/nccl.hpp>
#include <thread>

using namespace locus;
using namespace locus::transport;

namespace {
// One rank on one GPU: the NCCL code paths (header round, per-peer send/receive, staging) run
// for real; multi-rank logic is covered by the local and MPI transports on the same dispatcher.
struct one_gpu {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  one_gpu() {
    int dev = 0;
    LOCUS_NCCL_CHECK(ncclCommInitAll(&comm, 1, &dev));
    LOCUS_CUDA_CHECK(cudaStreamCreate(&stream));
  }
  ~one_gpu() {
    cudaStreamDestroy(stream);
    ncclCommDestroy(comm);
  }
};
} // namespace

BOOST_AUTO_TEST_CASE(self_exchange_and_byte_counts) {
  one_gpu g;
  nccl_transport t(g.comm, g.stream, dynamic_topology(1, 1), transport_kind::flat);
  std::vector<std::uint64_t> rows{1, 2, 3, 4, 5};
  std::vector<std::size_t> counts{rows.size()};
  exchange_result out;
  t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), counts, {}}, out);
  BOOST_TEST_REQUIRE(out.row_count() == rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::uint64_t v;
    std::memcpy(&v, out.row(i), sizeof v);
    BOOST_TEST(v == rows[i]);
  }
  BOOST_TEST(t.bytes().sent(link_class::same_gpu) == rows.size() * sizeof(std::uint64_t));
  // A malformed request raises transport_error and leaves the transport usable.
  std::vector<std::size_t> wrong{rows.size(), 1};
  BOOST_CHECK_THROW(
      t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), wrong, {}}, out),
      transport_error);
  t.exchange({exchange_group::world, sizeof(std::uint64_t), std::as_bytes(std::span(rows)), counts, {}}, out);
  BOOST_TEST(out.row_count() == rows.size());
}

BOOST_AUTO_TEST_CASE(dispatch_combine_on_one_gpu_matches_reference) {
  one_gpu g;
  for (bool hier : {false, true}) {
    nccl_transport t(g.comm, g.stream, dynamic_topology(1, 1),
                     hier ? transport_kind::hierarchical : transport_kind::flat);
    for (std::uint64_t seed = 1; seed <= 20; ++seed) {
      const auto c = locus_test::make_case(seed, 1, 1);
      moe_dispatcher<nccl_transport, float> d(t, c.map, c.hidden);
      const auto x = c.inputs(0);
      layout<> l;
      d.plan(l, c.routings[0].view());
      auto h = d.dispatch(std::span<const float>(x), l);
      locus_test::run_experts(h);
      std::vector<float> y(x.size());
      d.combine(y, h);
      BOOST_TEST(locus_test::max_error(y, c.reference(0)) < 1e-5);
    }
  }
}

// The count round and a known-count exchange on one rank: the round returns the row and entry
// counts sent, the rows arrive without a header round, and a count array of the wrong size raises
// before anything is posted and leaves the transport unusable (with more ranks the peers would
// have posted their part, which this rank's next exchange would meet).
BOOST_AUTO_TEST_CASE(count_round_then_known_count_exchange_on_one_gpu) {
  one_gpu g;
  nccl_transport t(g.comm, g.stream, dynamic_topology(1, 1), transport_kind::flat);
  const std::vector<std::uint64_t> rows{7, 8, 9};
  const std::vector<std::size_t> counts{rows.size()}, entries{5};
  device_counts c;
  // The tail travels with the header: three counts to the one member (itself).
  const std::vector<std::uint32_t> tail{2, 0, 3};
  t.exchange_device_counts(exchange_group::world, sizeof(std::uint64_t), counts, 8, entries, c, 11, tail, 3);
  BOOST_TEST(c.rows == counts, boost::test_tools::per_element());
  BOOST_TEST(c.entries == entries, boost::test_tools::per_element());
  BOOST_TEST(c.tail_width == 3u);
  BOOST_TEST(c.tail == tail, boost::test_tools::per_element());
  void* d = nullptr;
  LOCUS_CUDA_CHECK(cudaMalloc(&d, rows.size() * sizeof(std::uint64_t)));
  LOCUS_CUDA_CHECK(cudaMemcpy(d, rows.data(), rows.size() * sizeof(std::uint64_t), cudaMemcpyHostToDevice));
  device_exchange_result out;
  t.exchange_device_known(exchange_group::world, sizeof(std::uint64_t), static_cast<const std::byte*>(d), counts,
                          c.rows, out);
  std::vector<std::uint64_t> got(out.offsets.back());
  BOOST_TEST_REQUIRE(got.size() == rows.size());
  LOCUS_CUDA_CHECK(
      cudaMemcpyAsync(got.data(), out.rows, got.size() * sizeof(std::uint64_t), cudaMemcpyDeviceToHost, g.stream));
  t.synchronize("the test's read");
  BOOST_TEST(got == rows, boost::test_tools::per_element());
  const std::vector<std::size_t> wrong{1, 2};
  BOOST_CHECK_THROW(t.exchange_device_known(exchange_group::world, sizeof(std::uint64_t),
                                            static_cast<const std::byte*>(d), wrong, c.rows, out),
                    invalid_input_error);
  BOOST_CHECK_THROW(t.exchange_device_counts(exchange_group::world, sizeof(std::uint64_t), counts, 8, entries, c, 11),
                    transport_error);
  cudaFree(d);
}

// A stream held past the timeout (as by an exchange whose peer was lost: here a host function
// that waits for the test's release, since one GPU cannot host two NCCL ranks and NCCL refuses a
// receive from itself that no send matches): the timed wait raises timeout_error and aborts every
// communicator the transport runs on, its world included; every later call raises
// transport_error, and the caller's communicator is still the caller's. That the abort also
// releases a real NCCL kernel needs two GPUs (examples/nccl_decode).
BOOST_AUTO_TEST_CASE(a_timeout_aborts_every_communicator) {
  one_gpu g;
  {
    nccl_transport t(g.comm, g.stream, dynamic_topology(1, 1), transport_kind::flat,
                     exchange_options{std::chrono::milliseconds(500)});
    BOOST_TEST((t.communicator(exchange_group::world) != g.comm));
    device_buffer<std::uint64_t> rows(1);
    const std::vector<std::size_t> one{1};
    device_exchange_result out;
    std::atomic<bool> release{false};
    // Bounded: the abort frees NCCL's memory, and a free may wait for the whole device.
    LOCUS_CUDA_CHECK(cudaLaunchHostFunc(
        g.stream,
        [](void* p) {
          const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
          while (!static_cast<std::atomic<bool>*>(p)->load() && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        },
        &release));
    BOOST_CHECK_THROW(t.synchronize("the test's wait"), timeout_error);
    for (exchange_group grp : {exchange_group::world, exchange_group::node, exchange_group::rail})
      BOOST_TEST((t.communicator(grp) == nullptr));
    release = true;
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    BOOST_CHECK_THROW(t.synchronize("a later wait"), transport_error);
    device_counts c;
    BOOST_CHECK_THROW(t.exchange_device_counts(exchange_group::world, 8, one, 8, one, c), transport_error);
    BOOST_CHECK_THROW(t.exchange_device_known(exchange_group::world, sizeof(std::uint64_t),
                                              reinterpret_cast<const std::byte*>(rows.data()), one, one, out),
                      transport_error);
  }                   // the destructor returns (it waited for nothing)
  cudaGetLastError(); // an aborted kernel may leave an error behind; the next case starts clean
  int size = 0;
  BOOST_TEST(ncclCommCount(g.comm, &size) == ncclSuccess);
  BOOST_TEST(size == 1);
}

// A send that fails inside the exchange's NCCL group ends the group before the error is raised
// (here: a null communicator, which NCCL refuses without touching a GPU). Left open, the thread's
// group would hold every later NCCL call of the transport, so its waits would find an idle stream
// and read stale messages: the next ncclGroupEnd must find no group open.
BOOST_AUTO_TEST_CASE(a_failed_post_closes_the_nccl_group) {
  const std::size_t offsets[2] = {0, 8};
  std::byte buffer[8] = {};
  const transport::detail::nccl::peer_io<transport::detail::nccl::cuda_nccl> io{buffer,  offsets, buffer,
                                                                                offsets, nullptr, nullptr};
  BOOST_CHECK_THROW(transport::detail::nccl::exchange_peers(1, io), nccl_error);
  BOOST_TEST(ncclGroupEnd() == ncclInvalidUsage); // "not in a group call"
}
