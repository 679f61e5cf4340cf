#pragma once
//! @file
//! `device_exchange_result`: the rows a device exchange received, shared by the NCCL transport
//! (`transport/nccl.hpp`) and the one-GPU multi-rank transport (`transport/device_local.hpp`), so
//! device code is written once for both.

#include <cstddef>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

//! Device rows received by an `exchange_device` call (valid until the next exchange).
struct device_exchange_result {
  const std::byte* rows = nullptr;  //!< device memory, grouped by source member
  std::vector<std::size_t> counts;  //!< rows from each source member
  std::vector<std::size_t> offsets; //!< first row of each source member (members + 1)
  std::size_t row_bytes = 0;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
