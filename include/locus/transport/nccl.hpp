#pragma once
// locus-requires: nccl
//! @file
//! NCCL transports. `nccl_transport` owns an NCCL communicator per exchange group (world, node and
//! rail, each made from the caller's world with `ncclCommSplit`), a stream and device
//! staging buffers. Rows move with `ncclGroupStart` + one `ncclSend`/`ncclRecv` per peer; for the
//! common group sizes (1, 2, 4, 8, 16, 32, 64) the peer loop is unrolled at compile time.
//!
//! Protocol per exchange (see exchange.hpp): a header round (row width, exchange name, count, validity)
//! exchanged over NCCL and copied to the host, an optional expectation round, then the rows. Every
//! wait polls the stream with a deadline and watches `ncclCommGetAsyncError`; on timeout or an
//! asynchronous error every communicator the transport runs on is aborted (`ncclCommAbort`, which
//! releases kernels waiting for a lost peer), and every later call raises locus::transport_error.
//! The world exchanges run on the transport's own split of the caller's communicator, so that it
//! too can be aborted while the caller's stays the caller's to destroy.
//!
//! `exchange_device_counts` is a header round alone (rows and entries per peer) and
//! `exchange_device_known` moves rows whose counts both sides know, with no header round and no
//! wait (a lost peer surfaces at the next timed wait: a header round or `synchronize()`); the
//! device dispatcher's flat step uses one count round, then known-count exchanges only.
//! `exchange_device` moves device rows with their own header round. `exchange` satisfies the host
//! `exchanger` concept by staging host rows through device memory, so `moe_dispatcher` runs on it
//! unchanged. Policies: `nccl_flat`, `nccl_hierarchical`. The protocol is written once against a
//! policy for NCCL's and the stream's calls (detail/nccl_protocol.hpp), so the CPU tests run it,
//! ranks as threads, over a host imitation of NCCL.

#include <algorithm>
#include <cstring>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/nccl_error.hpp>
#include <locus/transport/detail/nccl_protocol.hpp>
#include <locus/transport/device_exchange.hpp>
#include <locus/transport/exchange.hpp>
#include <nccl.h>
#include <thread>
#include <utility>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::nccl {

//! The protocol's CUDA policy (detail/nccl_protocol.hpp): NCCL's calls and the stream's.
struct cuda_nccl {
  using comm = ncclComm_t;
  using stream = cudaStream_t;
  using config = ncclConfig_t;
  using memory = ::locus::detail::cuda_memory::stream_memory;

  static int comm_size(ncclComm_t c) {
    int n = 0;
    LOCUS_NCCL_CHECK(ncclCommCount(c, &n));
    return n;
  }
  static int comm_rank(ncclComm_t c) {
    int r = 0;
    LOCUS_NCCL_CHECK(ncclCommUserRank(c, &r));
    return r;
  }
  //! `parent` split by (`color`, `key`) into a blocking communicator configured as `base` (null:
  //! NCCL's defaults); without a configuration NCCL copies the parent's, and a non-blocking parent
  //! would give communicators whose calls return before their work is queued. A non-blocking parent
  //! still runs the split itself in the background: its state says when the split is done. Whether
  //! the new communicator shares the parent's resources, its abort flag included, NCCL decides by
  //! the parent's configuration (splitShare, or NCCL_COMM_SPLIT_SHARE_RESOURCES), not by this one's.
  static ncclComm_t split(ncclComm_t parent, int color, int key, const ncclConfig_t* base) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    if (base) config = *base;
    config.blocking = 1;
    ncclComm_t out = nullptr;
    settle(parent, ncclCommSplit(parent, color, key, &out, &config));
    return out;
  }
  static void group_start() { LOCUS_NCCL_CHECK(ncclGroupStart()); }
  static void send(const std::byte* p, std::size_t n, int peer, ncclComm_t c, cudaStream_t s) {
    LOCUS_NCCL_CHECK(ncclSend(p, n, ncclChar, peer, c, s));
  }
  static void recv(std::byte* p, std::size_t n, int peer, ncclComm_t c, cudaStream_t s) {
    LOCUS_NCCL_CHECK(ncclRecv(p, n, ncclChar, peer, c, s));
  }
  //! A non-blocking communicator (NCCL_COMM_BLOCKING=0 overrides the transport's configuration)
  //! launches the group from another thread: its operations are on the stream, and a wait on the
  //! stream means something, only once the communicator's state has left ncclInProgress.
  static void group_end(ncclComm_t c) { settle(c, ncclGroupEnd()); }
  static void group_end_quietly() noexcept { static_cast<void>(ncclGroupEnd()); }
  static bool idle(cudaStream_t s) {
    const cudaError_t e = cudaStreamQuery(s);
    if (e == cudaErrorNotReady) return false;
    LOCUS_CUDA_CHECK(e);
    return true;
  }
  static void check(ncclComm_t c) {
    ncclResult_t async = ncclSuccess;
    LOCUS_NCCL_CHECK(ncclCommGetAsyncError(c, &async));
    LOCUS_NCCL_CHECK(async); // ncclInProgress: a non-blocking call still running, not an error
  }
  static void abort(ncclComm_t c) noexcept { ncclCommAbort(c); }
  static void destroy(ncclComm_t c) noexcept { ncclCommDestroy(c); }

private:
  // Waits while `c`'s state is ncclInProgress (a non-blocking communicator's call still running),
  // then raises what the call came to.
  static void settle(ncclComm_t c, ncclResult_t r) {
    while (r == ncclInProgress) {
      std::this_thread::yield();
      ncclResult_t state = ncclSuccess;
      r = ncclCommGetAsyncError(c, &state);
      if (r == ncclSuccess) r = state;
    }
    LOCUS_NCCL_CHECK(r);
  }
};

} // namespace detail::nccl

//! Host object of the NCCL transports for one rank (one GPU).
//!
//! Constructor (collective over `world`: ncclCommSplit is collective):
//! `nccl_transport(ncclComm_t world, cudaStream_t stream, const dynamic_topology& topo,
//! transport_kind kind, exchange_options options = {}, const ncclConfig_t* config = nullptr)`
//! - `world`: an initialised communicator over all ranks (not owned);
//! - `stream`: the stream exchanges run on (not owned);
//! - `topo`: nodes × GPUs per node; ranks = world size. Checked collectively, in a timed round over
//!   the transport's own world before the node and rail splits: ranks given different topologies,
//!   or one the world's size does not fit, all raise locus::config_error;
//! - `kind`: how dispatch over it moves copies (the transport policy's `P::kind`);
//! - `config`: the configuration of the transport's own communicators (copied, with `blocking` set
//!   to 1), null for NCCL's defaults. The caller's communicator's configuration is not inherited
//!   (NCCL copies it only into a split made without one); NCCL_* environment variables apply as
//!   everywhere.
//!
//! A caller's communicator made with splitShare = 1 (or NCCL_COMM_SPLIT_SHARE_RESOURCES=1) shares
//! its abort flag with the transport's own world, so that a timeout, which aborts the transport's
//! communicators, aborts it too; NCCL decides that by the parent, so the transport cannot.
using nccl_transport = detail::nccl::endpoint<detail::nccl::cuda_nccl>;

//! Flat NCCL transport: per-peer send/receive over all ranks.
struct nccl_flat {
  using policy_concept = transport_tag;
  using exchanger_type = nccl_transport;
  static constexpr transport_kind kind = transport_kind::flat;
};

//! Rail-aligned two-stage NCCL transport: network rails, then NVLink peers.
struct nccl_hierarchical {
  using policy_concept = transport_tag;
  using exchanger_type = nccl_transport;
  static constexpr transport_kind kind = transport_kind::hierarchical;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
