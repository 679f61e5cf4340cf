#pragma once
// locus-requires: cuda
//! @file
//! The host `exchanger` form of the device transports (nccl.hpp, device_local.hpp), written once:
//! host rows staged through device memory, moved by the endpoint's device exchange, and the
//! received rows copied back to the host, so host dispatch runs on a device transport unchanged.

#include <algorithm>
#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::exchange {

//! Runs `req` through `ep.exchange_device` with its rows staged in `send`, counts the rows the
//! request keeps on this GPU in `bytes`, and queues the copy of the received rows into `out` on
//! `stream`. @returns whether a copy was queued: the caller waits for the stream before `out.rows`
//! is read (each transport its own way: the NCCL one under its timeout).
template <class Endpoint>
bool stage_host_exchange(Endpoint& ep, device_buffer<std::byte>& send, cudaStream_t stream, link_counters& bytes,
                         const exchange_request& req, exchange_result& out) {
  std::byte* d_send = send.room_for(std::max<std::size_t>(req.rows.size(), 1));
  if (!req.rows.empty())
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(d_send, req.rows.data(), req.rows.size(), cudaMemcpyHostToDevice, stream));
  device_exchange_result d;
  ep.exchange_device(req.group, req.row_bytes, d_send, req.counts, req.expected_counts, d, req.stage);
  count_kept(bytes, req);
  out.row_bytes = req.row_bytes;
  out.counts = d.counts;
  out.offsets = d.offsets;
  out.rows.resize(out.offsets.back() * req.row_bytes);
  if (out.rows.empty()) return false;
  LOCUS_CUDA_CHECK(cudaMemcpyAsync(out.rows.data(), d.rows, out.rows.size(), cudaMemcpyDeviceToHost, stream));
  return true;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::exchange
