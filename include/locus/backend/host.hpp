#pragma once
//! @file
//! `backend::host`: the CPU execution backend. Memory is ordinary host memory and parallel work
//! runs on `core/parallel_for.hpp` worker threads.

#include <locus/core/parallel_for.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>

namespace locus::inline LOCUS_ABI_NAMESPACE::backend {

//! The host backend: buffers in host memory, work on up to `threads` worker threads.
struct host {
  using policy_concept = backend_tag;
  static constexpr memory_space space = memory_space::host;
  static constexpr const char* name = "host";

  //! Upper bound on worker threads (0 = all hardware threads).
  unsigned threads = 0;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::backend
