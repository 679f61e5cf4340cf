#pragma once
//! @file
//! What the device step's sequences (detail/flat_step_sequence.hpp, detail/node_step_sequence.hpp)
//! are written against: an *engine* that runs stage bodies, scans, copies and exchanges. The
//! device dispatcher's engine (`transport/device_dispatch.hpp`) issues CUDA launches, CUB scans
//! and the endpoint's device exchanges on its stream; the CPU tests' engine
//! (tests/support/host_step_engine.hpp) runs the bodies through stage::run_grid and the exchanges
//! over the one-GPU transport's protocol with host memory, ranks as threads, so a CPU-only build
//! runs the order, offsets and sizes the GPU runs.
//!
//! An engine `E` provides, for row elements `T`:
//! - `template <class U> using buffer`: `resize(n)` (contents not kept) and `data()`;
//! - `launch(items, Stage{}, args...)`: runs `Stage::run(grid_index, args...)` over a grid that
//!   covers `items` items (at least one block);
//! - `scan(in, n, out)`: out[0 .. n] = the exclusive scan of in[0 .. n) with the total at out[n];
//! - `zero(p, n)`, `copy(dst, src, n)`: n elements (n may be 0);
//! - `upload(tables, first_word, table_dst, word_dst)`: host tables and a check word to where the
//!   bodies read them;
//! - `exchange(group, received, element_bytes, send, send_counts, receive_counts)`: a known-count
//!   exchange over `group`, returning the received elements (in member order), valid only until the
//!   engine's next exchange of any kind (the NCCL transport has one receive buffer); `received`
//!   names the record of counts and offsets it fills, which the caller may read later;
//! - `permute(dst)`: the layout's rows, in layout order; `gather(src, index, n, dst)`: dst[i] =
//!   src[index[i]] for n rows; `reduce(src, offsets, position, weight, n, dst, flag)`: dst[r] = the
//!   weighted sum of src[position[e]] over r's entries e, zeros when `*flag` is set.

#include <locus/core/config.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::step {

//! Which of the engine's exchange records (counts and offsets, not the received bytes) an exchange
//! fills: entry metadata, rows, and rows coming back in combine.
enum class received { metadata, rows, returned };

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport::detail::step
