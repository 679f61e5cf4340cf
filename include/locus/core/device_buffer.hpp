#pragma once
// locus-requires: cuda
//! @file
//! `locus::device_buffer<T>`: the one owning array in device memory (RAII over cudaMalloc /
//! cudaFree). Growing keeps no contents: it is scratch and output storage for kernels, reused
//! across steps so that the steady state allocates nothing. Copies to and from the host are
//! issued on a stream. `locus::pinned_buffer<T>`: its page-locked host counterpart, where values
//! the host reads from the device land (see there why).

#include <cstddef>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/error.hpp>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! An owning, move-only array of trivially copyable `T` in device memory.
template <class T>
class device_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "locus::device_buffer holds trivially copyable elements only");

public:
  device_buffer() = default;
  //! @throws locus::cuda_error when the allocation fails
  explicit device_buffer(std::size_t n) { resize(n); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~device_buffer() { release(); }

  //! Makes room for `n` elements; contents are unspecified afterwards when the buffer grew.
  //! @throws locus::cuda_error when the allocation fails
  void resize(std::size_t n) {
    if (n > capacity_) {
      release();
      void* p = nullptr;
      LOCUS_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
      data_ = static_cast<T*>(p);
      capacity_ = n;
    }
    size_ = n;
  }

  //! resize(n), then data(): room for `n` elements, for scratch whose size changes every call.
  //! @throws locus::cuda_error when the allocation fails
  T* room_for(std::size_t n) {
    resize(n);
    return data_;
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  //! Copies `host` in (resizing to fit) on `stream`. The host memory may be reused on return:
  //! a copy from pageable memory is staged before cudaMemcpyAsync returns, and a caller passing
  //! pinned memory keeps it alive until the stream has run.
  //! @throws locus::cuda_error when the allocation or the copy fails
  void upload(std::span<const T> host, cudaStream_t stream = nullptr) {
    resize(host.size());
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(data_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream));
  }
  //! Copies the first `host.size()` elements out on `stream` and waits for the stream.
  //! @throws locus::invalid_input_error when more elements are asked for than the buffer holds
  void download(std::span<T> host, cudaStream_t stream = nullptr) const {
    LOCUS_REQUIRE(host.size() <= size_, invalid_input_error, "device_buffer::download: ", host.size(),
                  " elements requested from a buffer of ", size_);
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(host.data(), data_, host.size_bytes(), cudaMemcpyDeviceToHost, stream));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  //! The contents as a new host vector (waits for `stream`).
  std::vector<T> to_host(cudaStream_t stream = nullptr) const {
    std::vector<T> out(size_);
    download(out, stream);
    return out;
  }

private:
  void release() noexcept {
    if (data_) cudaFree(data_); // a failing free in a destructor has nowhere to report to
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

//! An owning, move-only array of trivially copyable `T` in page-locked host memory
//! (cudaMallocHost). A device-to-host copy into pageable memory returns only once it is done, so
//! it waits for everything queued before it on its stream, untimed; into this one it is queued
//! like any other work, and the caller chooses how to wait (e.g. a transport's timed
//! synchronize(), which notices a lost peer). Growing keeps no contents.
template <class T>
class pinned_buffer {
  static_assert(std::is_trivially_copyable_v<T>, "locus::pinned_buffer holds trivially copyable elements only");

public:
  pinned_buffer() = default;
  //! @throws locus::cuda_error when the allocation fails
  explicit pinned_buffer(std::size_t n) { resize(n); }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  pinned_buffer(pinned_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~pinned_buffer() { release(); }

  //! Makes room for `n` elements; contents are unspecified afterwards when the buffer grew.
  //! @throws locus::cuda_error when the allocation fails
  void resize(std::size_t n) {
    if (n > capacity_) {
      release();
      void* p = nullptr;
      LOCUS_CUDA_CHECK(cudaMallocHost(&p, n * sizeof(T)));
      data_ = static_cast<T*>(p);
      capacity_ = n;
    }
    size_ = n;
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }

private:
  void release() noexcept {
    if (data_) cudaFreeHost(data_); // a failing free in a destructor has nowhere to report to
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
