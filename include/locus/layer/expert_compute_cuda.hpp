#pragma once
// locus-requires: cuda
#include <locus/core/nvcc_only.hpp> // first: a host compiler stops here, saying why
//! @file
//! `layer::swiglu_cuda<W>`: the SwiGLU expert FFN on the GPU. Per expert block, one cuBLAS GEMM
//! computes x·[W_gate | W_up] into fp32, a fused kernel applies silu(gate) ⊙ up, and a second GEMM
//! multiplies by W_down; every GEMM accumulates in fp32 (CUBLAS_COMPUTE_32F). The gate and up
//! matrices are interleaved per row on upload (`hidden × 2·ffn`) so that the first stage is one
//! GEMM per expert instead of two. Blocks are issued in order on one stream; an empty block
//! issues nothing.

#include <algorithm>
#include <library_types.h>
#include <locus/backend/cuda.hpp>
#include <locus/layer/detail/kernels/silu_mul.cuh>
#include <locus/layer/expert_compute.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {
template <class T>
inline constexpr cudaDataType_t cuda_type = std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::layer {

//! SwiGLU expert compute with cuBLAS. Activations are stored in the weights' type (`float` or
//! `bfloat16`); the gate|up product is kept in fp32 until the SiLU-multiply.
//! @tparam W weight (and activation) storage, float or locus::bfloat16
template <expert_element W = float>
class swiglu_cuda {
public:
  using policy_concept = expert_compute_tag;
  using weight_type = W;
  using activation_type = W;
  static constexpr memory_space space = memory_space::device;

  //! Uploads `weights` to the current device.
  //! @throws locus::cuda_error when the device or cuBLAS cannot be used
  explicit swiglu_cuda(const expert_weights<W>& weights, cudaStream_t stream = nullptr)
      : hidden_(weights.hidden()), ffn_(weights.ffn()), stream_(stream), blas_(stream),
        experts_(weights.experts().begin(), weights.experts().end()) {
    const std::size_t H = hidden_, F = ffn_, E = experts_.size();
    const std::vector<W> gu = detail::layer::pack_gate_up(weights);
    std::vector<W> down(E * F * H);
    for (std::size_t i = 0; i < E; ++i) {
      const swiglu_expert_view<W> v = weights.view(experts_[i]);
      std::copy(v.down, v.down + F * H, down.begin() + static_cast<std::ptrdiff_t>(i * F * H));
    }
    gate_up_.upload(gu, stream_);
    down_.upload(down, stream_);
    LOCUS_CUDA_CHECK(cudaStreamSynchronize(stream_)); // the host staging vectors die here
  }

  std::size_t hidden() const noexcept { return hidden_; }
  std::size_t ffn() const noexcept { return ffn_; }
  std::span<const expert_id> experts() const noexcept { return experts_; }
  cudaStream_t stream() const noexcept { return stream_; }

  //! Computes every block of device-resident rows (expert ids and offsets on the host); returns
  //! once the work is queued on the stream.
  //! @throws locus::invalid_input_error on a block of an expert not held here, a hidden-size
  //!         mismatch or malformed offsets
  void operator()(const expert_blocks<W, memory_space::device>& b) {
    detail::layer::check_blocks("swiglu_cuda", b, hidden_);
    const std::size_t rows = b.total_rows(), H = hidden_, F = ffn_;
    std::vector<std::size_t> pos(b.count);
    for (std::size_t i = 0; i < b.count; ++i)
      pos[i] = position(b.experts[i]);
    if (rows == 0) return;
    gu_.resize(rows * 2 * F);
    act_.resize(rows * F);
    const float one = 1.0f, zero = 0.0f;
    constexpr cudaDataType_t wt = detail::layer::cuda_type<W>;
    // Row-major C (R × N) = A (R × K) · B (K × N) is column-major Cᵀ = Bᵀ · Aᵀ: the weights come first.
    for (std::size_t i = 0; i < b.count; ++i) {
      const int R = static_cast<int>(b.rows(i));
      if (R == 0) continue;
      LOCUS_CUBLAS_CHECK(cublasGemmEx(blas_.get(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(2 * F), R,
                                      static_cast<int>(H), &one, gate_up_.data() + pos[i] * H * 2 * F, wt,
                                      static_cast<int>(2 * F), b.input + b.offsets[i] * H, wt, static_cast<int>(H),
                                      &zero, gu_.data() + b.offsets[i] * 2 * F, CUDA_R_32F, static_cast<int>(2 * F),
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    const std::size_t n = rows * F;
    const unsigned threads = 256;
    const auto blocks = static_cast<unsigned>(std::min<std::size_t>((n + threads - 1) / threads, 65535));
    detail::layer::kernels::silu_mul<W><<<blocks, threads, 0, stream_>>>(gu_.data(), act_.data(), rows, F);
    LOCUS_CUDA_CHECK(cudaGetLastError());
    for (std::size_t i = 0; i < b.count; ++i) {
      const int R = static_cast<int>(b.rows(i));
      if (R == 0) continue;
      LOCUS_CUBLAS_CHECK(cublasGemmEx(blas_.get(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(H), R,
                                      static_cast<int>(F), &one, down_.data() + pos[i] * F * H, wt, static_cast<int>(H),
                                      act_.data() + b.offsets[i] * F, wt, static_cast<int>(F), &zero,
                                      b.output + b.offsets[i] * H, wt, static_cast<int>(H), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    }
  }

  //! Host-resident rows: staged through device buffers (for host-staged transports such as MPI);
  //! returns when the outputs are back on the host.
  void operator()(const expert_blocks<W, memory_space::host>& b) {
    detail::layer::check_blocks("swiglu_cuda", b, hidden_);
    const std::size_t n = b.total_rows() * hidden_;
    in_.upload(std::span<const W>(detail::layer::contiguous_input(b, staging_), n), stream_);
    out_.resize(n);
    (*this)(expert_blocks<W, memory_space::device>{b.experts, b.offsets, b.count, in_.data(), out_.data(), b.hidden});
    out_.download(std::span<W>(b.output, n), stream_);
  }

private:
  std::size_t position(expert_id e) const {
    const auto it = std::lower_bound(experts_.begin(), experts_.end(), e);
    LOCUS_REQUIRE(it != experts_.end() && *it == e, invalid_input_error, "swiglu_cuda: expert ", e,
                  " is not among the ", experts_.size(), " experts uploaded to this device");
    return static_cast<std::size_t>(it - experts_.begin());
  }

  std::size_t hidden_, ffn_;
  cudaStream_t stream_;
  backend::cublas_handle blas_;
  std::vector<expert_id> experts_;
  device_buffer<W> gate_up_, down_, act_, in_, out_;
  device_buffer<float> gu_;
  std::vector<W> staging_; // rows given by pointer, gathered for the upload
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {
template <>
struct default_expert_compute<backend::cuda> {
  using type = locus::layer::swiglu_cuda<float>;
};
} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
