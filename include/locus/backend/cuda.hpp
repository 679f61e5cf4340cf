#pragma once
// locus-requires: cuda
//! @file
//! `backend::cuda`: the CUDA execution backend, and the cuBLAS handle the CUDA paths share (device
//! memory is `locus::device_buffer`, core/device_buffer.hpp). Each owner is a host object; kernels receive
//! raw pointers or trivially copyable views.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <locus/core/cuda_error.hpp>
#include <locus/core/device_buffer.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
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

} // namespace locus::inline LOCUS_ABI_NAMESPACE::backend
