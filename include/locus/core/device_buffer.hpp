#pragma once
// locus-requires: cuda
//! @file
//! `locus::device_buffer<T>`: a small owning array in device memory (RAII over cudaMalloc /
//! cudaFree). Growing keeps no contents: it is scratch and output storage for kernels, reused
//! across steps so that the steady state allocates nothing.

#include <locus/core/cuda_error.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

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
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), capacity_(std::exchange(o.capacity_, 0)) {}
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

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  //! Copies host data in (resizing to fit); synchronous.
  void assign(const T* host, std::size_t n) {
    resize(n);
    if (n) LOCUS_CUDA_CHECK(cudaMemcpy(data_, host, n * sizeof(T), cudaMemcpyHostToDevice));
  }
  void assign(const std::vector<T>& host) { assign(host.data(), host.size()); }
  //! Copies the contents to a new host vector; synchronous.
  std::vector<T> to_host() const {
    std::vector<T> out(size_);
    if (size_) LOCUS_CUDA_CHECK(cudaMemcpy(out.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
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

} // namespace locus::LOCUS_ABI_NAMESPACE
