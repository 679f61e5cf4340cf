// The one-GPU multi-rank device transport: ranks as threads, each with its own stream, rows moved
// device to device. The cases are shared with the CPU test of its protocol
// (tests/support/device_local_cases.hpp); here they run with device memory and CUDA streams.
#define BOOST_TEST_MODULE device_local
#include "../support/device_local_cases.hpp"

#include <boost/test/unit_test.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_local.hpp>

namespace {

namespace dlc = locus_test::device_local_cases;

struct cuda_harness {
  using fabric = locus::transport::device_local_fabric;
  using endpoint = locus::transport::device_local_transport;
  struct stream_owner {
    cudaStream_t s = nullptr;
    stream_owner() { LOCUS_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
    stream_owner(const stream_owner&) = delete;
    stream_owner& operator=(const stream_owner&) = delete;
    ~stream_owner() { cudaStreamDestroy(s); }
  };
  template <class U>
  using rows = locus::device_buffer<U>;
  // The received rows on the host (waits for the endpoint's stream).
  static std::vector<std::uint64_t> read_rows(endpoint& ep, const locus::transport::device_exchange_result& out) {
    std::vector<std::uint64_t> got(out.offsets.back());
    if (!got.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(got.data(), out.rows, got.size() * sizeof(std::uint64_t), cudaMemcpyDeviceToHost,
                                       ep.stream()));
    ep.synchronize("the test's read");
    return got;
  }
};

} // namespace

BOOST_AUTO_TEST_CASE(rows_arrive_from_every_member_of_every_group) {
  dlc::rows_arrive_from_every_member_of_every_group<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(disagreeing_counts_raise_on_every_member) {
  dlc::disagreeing_counts_raise_on_every_member<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(host_dispatch_and_combine_over_the_device_transport_match_reference) {
  dlc::host_dispatch_and_combine_match_reference<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(count_round_then_known_count_exchanges) {
  dlc::count_round_then_known_count_exchanges<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(known_counts_and_tail_widths_are_checked) {
  dlc::known_counts_and_tail_widths_are_checked<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(a_group_of_several_tiles_delivers_every_row) {
  dlc::a_group_of_several_tiles_delivers_every_row<cuda_harness>();
}
BOOST_AUTO_TEST_CASE(back_to_back_count_rounds) { dlc::back_to_back_count_rounds<cuda_harness>(); }
BOOST_AUTO_TEST_CASE(a_skipped_known_exchange_raises_on_every_member) {
  dlc::a_skipped_known_exchange_raises_on_every_member<cuda_harness>();
}
