#pragma once
//! @file
//! The host `exchanger` form of the device transports (nccl.hpp, device_local.hpp), written once:
//! host rows staged through device memory, moved by the endpoint's device exchange, and the
//! received rows copied back to the host, so host dispatch runs on a device transport unchanged.
//!
//! Both copies go through page-locked memory. A copy from pageable memory to the device waits for
//! the stream's earlier work before it starts, and one from the device into pageable memory returns
//! only once it is done: either would wait, untimed, for an exchange queued before it, so a lost
//! peer would hang the caller there instead of in the transport's timed wait.
//!
//! Written against a memory policy `M` (the CUDA one: `detail::cuda_memory::stream_memory`; the CPU
//! tests' one queues host copies on a host stream, tests/support/host_nccl.hpp): `M::stream`,
//! `M::buffer<T>` (a growable device array: `room_for(n)`, `resize(n)`, `data()`), `M::pinned<T>`
//! (its page-locked host counterpart: `resize(n)`, `data()`), and `to_device(dst, src, bytes,
//! stream)`, `to_host(dst, src, bytes, stream)` and `zero(dst, bytes, stream)`, each queued on the
//! stream.

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::exchange {

//! An endpoint's buffers for host exchanges: the rows sent, on the device, and both directions'
//! page-locked copies.
template <class M>
struct host_staging {
  typename M::template buffer<std::byte> send;
  typename M::template pinned<std::byte> host_send, host_recv;
};

//! Runs `req` through `ep.exchange_device` with its rows staged in `s`, counts the rows the request
//! keeps on this GPU in `bytes`, and fills `out`: the received rows are copied back on `stream`,
//! `wait()` waits for the stream (each transport its own way: the NCCL one under its timeout), and
//! only then are they copied into `out.rows`. `wait()` is called whenever anything was queued, so
//! the page-locked buffers are free again when this returns (when the exchange raises instead, a
//! copy may still be queued: stream order keeps it ahead of the next call's).
template <class M, class Endpoint, class Wait>
void stage_host_exchange(Endpoint& ep, host_staging<M>& s, typename M::stream stream, link_counters& bytes,
                         const exchange_request& req, exchange_result& out, Wait&& wait) {
  const std::size_t sent = req.rows.size();
  std::byte* d_send = s.send.room_for(std::max<std::size_t>(sent, 1));
  if (sent > 0) {
    s.host_send.resize(sent);
    std::memcpy(s.host_send.data(), req.rows.data(), sent);
    M::to_device(d_send, s.host_send.data(), sent, stream);
  }
  device_exchange_result d;
  ep.exchange_device(req.group, req.row_bytes, d_send, req.counts, req.expected_counts, d, req.stage);
  count_kept(bytes, req);
  out.row_bytes = req.row_bytes;
  out.counts = d.counts;
  out.offsets = d.offsets;
  const std::size_t received = out.offsets.back() * req.row_bytes;
  out.rows.resize(received);
  if (received > 0) {
    s.host_recv.resize(received);
    M::to_host(s.host_recv.data(), d.rows, received, stream);
  }
  if (sent == 0 && received == 0) return;
  wait();
  if (received > 0) std::memcpy(out.rows.data(), s.host_recv.data(), received);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::exchange
