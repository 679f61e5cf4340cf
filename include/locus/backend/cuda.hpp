#pragma once
// locus-requires: cuda
//! @file
//! `backend::cuda`: the CUDA execution backend, and the small RAII pieces the CUDA paths share:
//! a device buffer, a stream and a cuBLAS handle. Each owner is a host object; kernels receive
//! raw pointers or trivially copyable views.

#include <locus/core/cuda_error.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <utility>

#ifndef LOCUS_CUBLAS_CHECK
//! Evaluates a cuBLAS call once; on failure throws locus::cuda_error whose code() is the
//! cublasStatus_t and whose message names the call and the status.
#define LOCUS_CUBLAS_CHECK(call)                                                                                       \
  do {                                                                                                                 \
    const cublasStatus_t locus_cublas_status = (call);                                                                 \
    if (LOCUS_UNLIKELY(locus_cublas_status != CUBLAS_STATUS_SUCCESS)) {                                                \
      throw ::locus::cuda_error(::locus::detail::concat(#call, " failed: ", cublasGetStatusName(locus_cublas_status),  \
                                                        " (", cublasGetStatusString(locus_cublas_status), ")"),        \
                                __FILE__, __LINE__, static_cast<int>(locus_cublas_status));                            \
    }                                                                                                                  \
  } while (0)
#endif

namespace locus::inline LOCUS_ABI_NAMESPACE::backend {

//! The CUDA backend: buffers in device memory, work on `stream` of the current device.
struct cuda {
  using policy_concept = backend_tag;
  static constexpr memory_space space = memory_space::device;
  static constexpr const char* name = "cuda";

  //! The stream work is issued on (0: the legacy default stream).
  cudaStream_t stream = nullptr;
};

//! An owning, move-only array of `T` in device memory.
template <class T>
class device_buffer {
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

  //! Makes room for `n` elements; contents are not kept when the buffer grows.
  void resize(std::size_t n) {
    if (n <= capacity_) {
      size_ = n;
      return;
    }
    release();
    LOCUS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)));
    size_ = capacity_ = n;
  }
  //! Copies `host` into the buffer (resizing it) on `stream`.
  void upload(std::span<const T> host, cudaStream_t stream = nullptr) {
    resize(host.size());
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(data_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream));
  }
  //! Copies the first `host.size()` elements to `host` on `stream` (synchronising it).
  void download(std::span<T> host, cudaStream_t stream = nullptr) const {
    LOCUS_REQUIRE(host.size() <= size_, invalid_input_error, "device_buffer::download: ", host.size(),
                  " elements requested from a buffer of ", size_);
    if (!host.empty())
      LOCUS_CUDA_CHECK(cudaMemcpyAsync(host.data(), data_, host.size_bytes(), cudaMemcpyDeviceToHost, stream));
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

private:
  void release() noexcept {
    if (data_) cudaFree(data_); // a failure here cannot be reported from a destructor
    data_ = nullptr;
    size_ = capacity_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

//! An owning cuBLAS handle bound to a stream.
class cublas_handle {
public:
  //! @throws locus::cuda_error when cuBLAS cannot be initialised (no device, driver mismatch)
  explicit cublas_handle(cudaStream_t stream = nullptr) {
    LOCUS_CUBLAS_CHECK(cublasCreate(&handle_));
    set_stream(stream);
  }
  cublas_handle(const cublas_handle&) = delete;
  cublas_handle& operator=(const cublas_handle&) = delete;
  cublas_handle(cublas_handle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  cublas_handle& operator=(cublas_handle&& o) noexcept {
    if (this != &o) {
      if (handle_) cublasDestroy(handle_);
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }
  ~cublas_handle() {
    if (handle_) cublasDestroy(handle_);
  }
  void set_stream(cudaStream_t stream) { LOCUS_CUBLAS_CHECK(cublasSetStream(handle_, stream)); }
  cublasHandle_t get() const noexcept { return handle_; }

private:
  cublasHandle_t handle_ = nullptr;
};

} // namespace locus::LOCUS_ABI_NAMESPACE::backend
