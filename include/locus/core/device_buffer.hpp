#pragma once
// locus-requires: cuda
//! @file
//! `locus::device_buffer<T>`: the one owning array in device memory (RAII over cudaMalloc /
//! cudaFree). Growing keeps no contents: it is scratch and output storage for kernels, reused
//! across steps so that the steady state allocates nothing. Growing frees nothing: cudaFree (and
//! cudaFreeHost) waits for the whole device, untimed, so inside a step whose exchanges wait for a
//! lost peer it would hang before the step's timed wait; an outgrown block is kept until the
//! buffer is destroyed (after a transport's abort has released such kernels), and growing at least
//! doubles the capacity, so what is kept stays below it. Copies to and from the host are
//! issued on a stream. `locus::pinned_buffer<T>`: its page-locked host counterpart, where values
//! the host reads from the device land (see there why).

#include <algorithm>
#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

namespace detail::cuda_memory {

//! Device memory (cudaMalloc / cudaFree).
struct device {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    LOCUS_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  static void release(void* p) noexcept { cudaFree(p); } // a failing free has nowhere to report to
};

//! Page-locked host memory (cudaMallocHost / cudaFreeHost).
struct pinned {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    LOCUS_CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  static void release(void* p) noexcept { cudaFreeHost(p); }
};

//! An owning, move-only array of trivially copyable `T` in `Memory`; growing keeps no contents.
template <class T, class Memory>
class owned_array {
  static_assert(std::is_trivially_copyable_v<T>, "locus: CUDA buffers hold trivially copyable elements only");

public:
  owned_array() = default;
  //! @throws locus::cuda_error when the allocation fails
  explicit owned_array(std::size_t n) { resize(n); }
  owned_array(const owned_array&) = delete;
  owned_array& operator=(const owned_array&) = delete;
  owned_array(owned_array&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)), retired_(std::move(o.retired_)) {}
  owned_array& operator=(owned_array&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
      retired_ = std::move(o.retired_);
    }
    return *this;
  }
  ~owned_array() { release(); }

  //! Makes room for `n` elements; contents are unspecified afterwards when the array grew. The
  //! outgrown block is kept, not freed, until destruction (see the file comment: a free waits
  //! for the device).
  //! @throws locus::cuda_error when the allocation fails
  void resize(std::size_t n) {
    if (n > capacity_) {
      const std::size_t grown = std::max(n, 2 * capacity_);
      if (data_) retired_.reserve(retired_.size() + 1); // before allocating: nothing to leak after
      T* p = static_cast<T*>(Memory::allocate(grown * sizeof(T)));
      if (data_) retired_.push_back(data_);
      data_ = p;
      capacity_ = grown;
    }
    size_ = n;
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

private:
  void release() noexcept {
    if (data_) Memory::release(data_);
    for (T* p : retired_)
      Memory::release(p);
    retired_.clear();
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  std::vector<T*> retired_; // outgrown blocks, freed with this one
};

} // namespace detail::cuda_memory

//! An owning, move-only array of trivially copyable `T` in device memory.
template <class T>
class device_buffer : public detail::cuda_memory::owned_array<T, detail::cuda_memory::device> {
  using base = detail::cuda_memory::owned_array<T, detail::cuda_memory::device>;

public:
  using base::base;
  using base::data;
  using base::resize;
  using base::size;

  //! resize(n), then data(): room for `n` elements, for scratch whose size changes every call.
  //! @throws locus::cuda_error when the allocation fails
  T* room_for(std::size_t n) {
    resize(n);
    return data();
  }

  //! Copies `host` in (resizing to fit) on `stream`. The host memory may be reused on return:
  //! a copy from pageable memory is staged before cudaMemcpyAsync returns, and a caller passing
  //! pinned memory keeps it alive until the stream has run.
  //! @throws locus::cuda_error when the allocation or the copy fails
  void upload(std::span<const T> host, cudaStream_t stream = nullptr) {
    resize(host.size());
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(data(), host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream));
  }
  //! Copies the first `host.size()` elements out on `stream` and waits for the stream.
  //! @throws locus::invalid_input_error when more elements are asked for than the buffer holds
  void download(std::span<T> host, cudaStream_t stream = nullptr) const {
    LOCUS_REQUIRE(host.size() <= size(), invalid_input_error, "device_buffer::download: ", host.size(),
                  " elements requested from a buffer of ", size());
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(host.data(), data(), host.size_bytes(), cudaMemcpyDeviceToHost, stream));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  //! The contents as a new host vector (waits for `stream`).
  std::vector<T> to_host(cudaStream_t stream = nullptr) const {
    std::vector<T> out(size());
    download(out, stream);
    return out;
  }
};

//! An owning, move-only array of trivially copyable `T` in page-locked host memory. A
//! device-to-host copy into pageable memory returns only once it is done, so it waits for
//! everything queued before it on its stream, untimed; into this one it is queued like any other
//! work, and the caller chooses how to wait (e.g. a transport's timed synchronize(), which notices
//! a lost peer).
template <class T>
class pinned_buffer : public detail::cuda_memory::owned_array<T, detail::cuda_memory::pinned> {
  using base = detail::cuda_memory::owned_array<T, detail::cuda_memory::pinned>;

public:
  using base::base;
  using base::data;

  T& operator[](std::size_t i) noexcept { return data()[i]; }
  const T& operator[](std::size_t i) const noexcept { return data()[i]; }
};

namespace detail::cuda_memory {

//! The CUDA memory policy of code written against device memory in general (the transports' host
//! staging, transport/detail/host_staging.hpp, and the NCCL transport's protocol): arrays and
//! copies queued on a stream.
struct stream_memory {
  using stream = cudaStream_t;
  template <class T>
  using buffer = device_buffer<T>;
  template <class T>
  using pinned = pinned_buffer<T>;
  static void to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t s) {
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
  }
  static void to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t s) {
    LOCUS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
  }
  static void zero(void* dst, std::size_t bytes, cudaStream_t s) {
    LOCUS_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, s));
  }
};

} // namespace detail::cuda_memory

} // namespace locus::inline LOCUS_ABI_NAMESPACE
