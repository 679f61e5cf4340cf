#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! The data movement of `transport/permute.hpp` on a GPU (float or bfloat16, any hidden size;
//! 16-byte vectorised when the row size is a multiple of 16 bytes and the pointers are aligned).
//! Results equal the host functions bit for bit. All pointers are device pointers; every call is
//! asynchronous on `stream`. `hidden` is a std::size_t or a static `locus::hidden<N>`, for which
//! the kernels are instantiated (constant row loops; the same stage bodies).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_scan.cuh>
#include <exception>
#include <locus/core/bfloat16.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/error.hpp>
#include <locus/transport/detail/dispatch_permute.hpp>
#include <locus/transport/detail/kernels/receive_layout.cuh>
#include <locus/transport/detail/stage.hpp>
#include <locus/transport/device_layout.hpp>
#include <locus/transport/layout.hpp>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::transport {

namespace detail::permute {
template <class T>
inline constexpr bool device_element = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

// The receive layout's kernels and build order: detail/kernels/receive_layout.cuh.
//! `out[0] = 0` and `out[1 .. n]` the inclusive sums of `in[0 .. n)` on `stream`: CUB's device-wide
//! scan (stage::exclusive_scan's sums), `temp` its scratch. Unlike the stage kernels it runs also
//! when the check word is set: what it then writes is never read (every later body skips).
inline void device_scan(const std::int32_t* in, std::size_t n, std::int32_t* out, device_buffer<std::byte>& temp,
                        cudaStream_t stream) {
  LOCUS_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(std::int32_t), stream));
  if (n == 0) return;
  std::size_t bytes = 0;
  LOCUS_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out + 1, static_cast<int>(n), stream));
  LOCUS_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.room_for(std::max<std::size_t>(bytes, 1)), bytes, in, out + 1,
                                                 static_cast<int>(n), stream));
}
} // namespace detail::permute

//! A receive_layout on the device: uploaded (`assign`, built on the host) or built where the
//! received metadata lies (`build`, the receive-layout stage bodies). The slot offsets (slots + 1
//! values) are also on the host, where the expert compute sizes its GEMMs: the host layout's, or
//! for a build the ones the senders announced in the count round, which the build checks.
class device_receive_layout {
public:
  device_receive_layout() = default;
  //! Uploads `rl` on `stream` (the host arrays may change once this returns).
  explicit device_receive_layout(const receive_layout& rl, cudaStream_t stream = nullptr) { assign(rl, stream); }
  void assign(const receive_layout& rl, cudaStream_t stream = nullptr) {
    rows_ = rl.rows();
    entries_ = rl.entries();
    row_entry_offsets_.upload(rl.row_entry_offsets(), stream);
    expert_row_.upload(rl.expert_row(), stream);
    entry_position_.upload(rl.entry_position(), stream);
    expert_weight_.upload(rl.expert_weight(), stream);
    slot_offsets_host_.assign(rl.slot_offsets().begin(), rl.slot_offsets().end());
    clear_flag(stream); // checked on the host
  }

  //! Builds the layout on `stream` from received metadata in device memory: `rows` row entry
  //! counts, `entries` slots and weights (or null), in receive_layout's order.
  //! `expected_slot_offsets` (host, slots + 1 values) are the offsets the senders announced in the
  //! count round (`device_counts::tail`), which the caller sizes its expert compute by: the build
  //! reads nothing back. On the device it first checks the metadata
  //! (stage::receive_metadata_check: rows with entries, counts adding up, slots in range), then the
  //! offsets it counts against the expected ones (stage::slot_offsets_check). A violation sets its
  //! bit in the word at flag() and every body after it does nothing, so bad metadata writes nothing
  //! out of bounds; the expert-input gather then skips and the weighted reduction writes zeros.
  //! The word stays on the device until the caller next waits for the stream (read it then;
  //! error_of() words it). The caller waits for the stream between two builds (the announced
  //! offsets travel through pinned memory that the next build rewrites).
  void build(std::span<const std::int32_t> expected_slot_offsets, const std::int32_t* row_entry_counts,
             std::size_t rows, const std::int32_t* entry_slot, const float* entry_weight, std::size_t entries,
             cudaStream_t stream = nullptr) {
    namespace dp = detail::permute;
    LOCUS_REQUIRE(!expected_slot_offsets.empty(), invalid_input_error,
                  "device_receive_layout::build: no slot offsets (slots + 1 values)");
    LOCUS_REQUIRE(static_cast<std::size_t>(expected_slot_offsets.back()) == entries, invalid_input_error,
                  "device_receive_layout::build: the expected slot offsets end at ", expected_slot_offsets.back(),
                  " but ", entries, " entries were received");
    const std::size_t slots = expected_slot_offsets.size() - 1;
    const std::size_t chunks = detail::stage::slot_chunks(entries, dp::receive_chunk);
    // The layout's offsets are 32-bit, and CUB counts its scans' items in an int.
    LOCUS_REQUIRE(rows <= INT32_MAX && entries <= INT32_MAX && slots * chunks <= INT32_MAX, invalid_input_error,
                  "device_receive_layout::build: ", rows, " rows, ", entries, " entries and ", slots * chunks,
                  " slot chunks: past 32-bit offsets");
    rows_ = rows;
    entries_ = entries;
    const dp::receive_layout_sizes n(rows, entries, slots);
    row_entry_offsets_.resize(n.row_entry_offsets);
    expert_row_.resize(n.per_entry);
    entry_position_.resize(n.per_entry);
    expert_weight_.resize(entry_weight ? n.per_entry : 0);
    entry_row_.resize(n.per_entry);
    count_.resize(n.count);
    at_.resize(n.at);
    slot_offsets_.resize(n.slot_offsets);
    slot_offsets_host_.assign(expected_slot_offsets.begin(), expected_slot_offsets.end());
    // Staged through pinned memory, so the copy queues instead of perhaps waiting on the stream
    // (CUDA allows a pageable copy to); its previous copy ran before the stream was last waited
    // for, which the caller does between builds (the dispatcher: its count read).
    expected_host_.resize(slots + 1);
    std::copy(slot_offsets_host_.begin(), slot_offsets_host_.end(), expected_host_.data());
    expected_.resize(slots + 1);
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(expected_.data(), expected_host_.data(), (slots + 1) * sizeof(std::int32_t),
                                     cudaMemcpyHostToDevice, stream));
    clear_flag(stream);
    total_.resize(1);
    LOCUS_CUDA_CHECK(cudaMemsetAsync(total_.data(), 0, sizeof(unsigned long long), stream));
    const auto launch = [stream](auto kernel, unsigned blocks, unsigned threads, auto... args) {
      kernel<<<blocks, threads, 0, stream>>>(args...);
    };
    const auto scan = [&](const std::int32_t* in, std::size_t items, std::int32_t* out) {
      dp::device_scan(in, items, out, scan_temp_, stream);
    };
    dp::receive_layout_sequence(launch, scan, row_entry_counts, rows, entry_slot, entry_weight, entries, slots,
                                {row_entry_offsets_.data(), entry_row_.data(), count_.data(), at_.data(),
                                 slot_offsets_.data(), expected_.data(), expert_row_.data(),
                                 entry_weight ? expert_weight_.data() : nullptr, entry_position_.data(), flag_.data(),
                                 total_.data()});
    LOCUS_CUDA_CHECK(cudaGetLastError());
  }

  //! The check word of the last build (zero after assign), on the device: zero when the received
  //! metadata was good, else stage::bad_* bits; error_of() words it.
  const std::int32_t* flag() const noexcept { return flag_.data(); }

  //! Null for a zero check word, else the locus::transport_error saying what the metadata broke;
  //! `when` (e.g. " in the previous step") is added after "metadata".
  static std::exception_ptr error_of(std::int32_t bits, const char* when = "") {
    if (bits == 0) return nullptr;
    namespace st = detail::stage;
    return std::make_exception_ptr(transport_error(
        std::string("device_receive_layout: bad received entry metadata") + when + ":" +
        (bits & st::bad_row_entries ? " a row without entries;" : "") +
        (bits & st::bad_entry_total ? " row entry counts that do not add up to the entries received;" : "") +
        (bits & st::bad_slot ? " an entry's slot outside this rank's slots;" : "") +
        (bits & st::bad_slot_counts ? " entries per slot other than the senders announced;" : "")));
  }

  //! Expert-input segment of each local slot (slots + 1 values, host).
  std::span<const std::int32_t> slot_offsets_host() const noexcept { return slot_offsets_host_; }
  std::size_t rows() const noexcept { return rows_; }
  std::size_t entries() const noexcept { return entries_; }
  const std::int32_t* row_entry_offsets() const noexcept { return row_entry_offsets_.data(); }
  const std::int32_t* expert_row() const noexcept { return expert_row_.data(); }
  const std::int32_t* entry_position() const noexcept { return entry_position_.data(); }
  //! Null when built without weights.
  const float* expert_weight() const noexcept { return expert_weight_.empty() ? nullptr : expert_weight_.data(); }

private:
  void clear_flag(cudaStream_t stream) {
    flag_.resize(1);
    LOCUS_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0, sizeof(std::int32_t), stream));
  }

  std::size_t rows_ = 0, entries_ = 0;
  device_buffer<std::int32_t> row_entry_offsets_, expert_row_, entry_position_;
  device_buffer<float> expert_weight_;
  device_buffer<std::int32_t> entry_row_, count_, at_, slot_offsets_, expected_; // build's scratch
  device_buffer<std::int32_t> flag_;                                             // the check word
  device_buffer<unsigned long long> total_;                                      // the rows' entries, summed
  device_buffer<std::byte> scan_temp_;                                           // CUB's scratch
  pinned_buffer<std::int32_t> expected_host_; // build: the announced offsets on their way up
  std::vector<std::int32_t> slot_offsets_host_;
};

//! `send[r] = tokens[row_token[r]]` for the `l.rows()` rows, read token-major: each token is read
//! once and written to each of its rows (stage::scatter_rows).
template <class T, class TopK, class Experts, class H = std::size_t>
void permute(const device_layout<TopK, Experts>& l, const T* tokens, H hidden, T* send, cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::permute: elements must be float or bfloat16");
  detail::permute::dispatch_scatter<T>(TopK{}, tokens, l.copy_row(), l.tokens(), hidden, send, stream);
}

//! `tokens[t] = send[copy_row[t * K]]`: the inverse of permute.
template <class T, class TopK, class Experts, class H = std::size_t>
void unpermute(const device_layout<TopK, Experts>& l, const T* send, H hidden, T* tokens,
               cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::unpermute: elements must be float or bfloat16");
  detail::permute::dispatch_gather<T>(send, l.copy_row(), TopK::static_value, l.tokens(), hidden, tokens, stream);
}

//! `expert_in[i] = received[expert_row[i]]`; nothing when the layout's check word is set.
template <class T, class H = std::size_t>
void gather_expert_input(const device_receive_layout& rl, const T* received, H hidden, T* expert_in,
                         cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::gather_expert_input: elements must be float or bfloat16");
  detail::permute::dispatch_gather<T>(received, rl.expert_row(), 1, rl.entries(), hidden, expert_in, stream, rl.flag());
}

//! `expert_in[i] = weight[i] · received[expert_row[i]]` (fp32, rounded to T): the expert input of a
//! routing whose weights apply there (weight_site::expert_input); nothing when the layout's check
//! word is set.
//! @throws locus::invalid_input_error when the receive layout has no weights
template <class T, class H = std::size_t>
void gather_weighted_expert_input(const device_receive_layout& rl, const T* received, H hidden, T* expert_in,
                                  cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::gather_weighted_expert_input: elements must be float or bfloat16");
  LOCUS_REQUIRE(rl.entries() == 0 || rl.expert_weight(), invalid_input_error,
                "gather_weighted_expert_input: the receive layout was built without weights");
  detail::permute::dispatch_gather_scaled<T>(received, rl.expert_row(), rl.expert_weight(), rl.entries(), hidden,
                                             expert_in, stream, rl.flag());
}

//! `rows_out[r] = sum over r's entries of weight × expert_out` (as the host function), or of
//! expert_out alone when `site` is expert_input (the weights were applied to the inputs); zeros
//! when the layout's check word is set (its metadata was refused: its indices were never built).
//! @throws locus::invalid_input_error when the receive layout has no weights to apply
template <class T, class H = std::size_t>
void reduce_expert_output(const device_receive_layout& rl, const T* expert_out, H hidden, T* rows_out,
                          cudaStream_t stream = nullptr, weight_site site = weight_site::expert_output) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::reduce_expert_output: elements must be float or bfloat16");
  const bool weighted = site == weight_site::expert_output;
  LOCUS_REQUIRE(!weighted || rl.entries() == 0 || rl.expert_weight(), invalid_input_error,
                "reduce_expert_output: the receive layout was built without weights");
  detail::permute::dispatch_reduce<T>(expert_out, rl.row_entry_offsets(), rl.entry_position(),
                                      weighted ? rl.expert_weight() : nullptr, rl.rows(), hidden, rows_out, stream,
                                      rl.flag());
}

//! `out[t] = sum of t's returned rows` (as the host function).
template <class T, class TopK, class Experts, class H = std::size_t>
void combine(const device_layout<TopK, Experts>& l, const T* returned, H hidden, T* out,
             cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>, "locus::transport::combine: elements must be float or bfloat16");
  detail::permute::dispatch_combine<T>(TopK{}, returned, l.copy_row(), l.tokens(), hidden, out, stream);
}

//! `out[t] = sum over j of weight × entry_out[copy_entry[t * K + j]]` (as the host function).
//! @throws locus::invalid_input_error when the layout was built without weights
template <class T, class TopK, class Experts, class H = std::size_t>
void combine_weighted(const device_layout<TopK, Experts>& l, const T* entry_out, H hidden, T* out,
                      cudaStream_t stream = nullptr) {
  static_assert(detail::permute::device_element<T>,
                "locus::transport::combine_weighted: elements must be float or bfloat16");
  LOCUS_REQUIRE(l.copies() == 0 || l.entry_weight(), invalid_input_error,
                "combine_weighted: the layout was built from a routing without weights");
  detail::permute::dispatch_combine_weighted<T>(TopK{}, entry_out, l.copy_entry(), l.entry_weight(), l.tokens(), hidden,
                                                out, stream);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::transport
