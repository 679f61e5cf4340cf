#pragma once
// The one-GPU transport's meeting protocol (transport/detail/device_local_protocol.hpp) with host
// memory, for the CPU tests: a "stream" runs what is queued on it at once, so an event is done when
// recorded and a wait returns at once, and a tile's copies run through stage::run_grid inside the
// row stage's meeting (by its last arrival, while every other member waits there). What it checks
// is the protocol's host side: the board the members share (under ThreadSanitizer in the TSan
// build), its header rounds, checks and failures; the CUDA policy's stream order needs a GPU.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <locus/transport/detail/device_local_protocol.hpp>
#include <locus/transport/detail/group_gather.hpp>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <vector>

namespace locus_test {

struct host_local_device {
  using stream = int; // no handle: every operation runs when issued
  struct event {};
  struct group_stream {};
  struct staging {};
  //! A receive buffer, poisoned at every growth: a row the copies did not write reads 0xA5 bytes.
  class buffer {
  public:
    std::byte* room_for(std::size_t n) {
      if (v_.size() < n) v_.assign(n, std::byte{0xA5});
      return v_.data();
    }

  private:
    std::vector<std::byte> v_;
  };

  static void record(event&, stream) {}
  static void record(event&, group_stream&) {}
  static void join(group_stream&, const event&) {}
  static void wait(stream, const event&) {}
  static void synchronize(stream) {}
  // Every pair of the tile, on a small grid of several blocks and threads (the body strides).
  static void launch_tile(group_stream&, const locus::transport::detail::group_gather::tile_params& p,
                          locus::transport::detail::group_gather::tile_shape shape) {
    namespace gg = locus::transport::detail::group_gather;
    for (unsigned s = 0; s < p.senders; ++s)
      for (unsigned r = 0; r < p.receivers; ++r)
        locus::transport::detail::stage::run_grid(2, 3, [&](locus::transport::detail::stage::grid_index g) {
          if (shape.vec)
            gg::copy_pair<true>(g, p, s, r);
          else
            gg::copy_pair<false>(g, p, s, r);
        });
  }
  template <class Endpoint>
  static void host_exchange(Endpoint& ep, staging&, stream, locus::transport::link_counters& bytes,
                            const locus::transport::exchange_request& req, locus::transport::exchange_result& out) {
    locus::transport::device_exchange_result d;
    ep.exchange_device(req.group, req.row_bytes, req.rows.data(), req.counts, req.expected_counts, d, req.stage);
    locus::transport::detail::exchange::count_kept(bytes, req);
    out.row_bytes = req.row_bytes;
    out.counts = d.counts;
    out.offsets = d.offsets;
    out.rows.resize(out.offsets.back() * req.row_bytes);
    if (!out.rows.empty()) std::memcpy(out.rows.data(), d.rows, out.rows.size());
  }
};

using host_local_fabric = locus::transport::detail::device_local::fabric<host_local_device>;
using host_local_transport = locus::transport::detail::device_local::rank_endpoint<host_local_device>;

} // namespace locus_test
