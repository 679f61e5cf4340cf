#pragma once
//! @file
//! Expert compute: the FFN each expert applies to the token rows dispatched to it.
//!
//! After dispatch, a rank holds one block of rows per local expert (`expert_blocks`): one pointer
//! per row into the receive buffers (no copy), or contiguous (shared experts, tests). An expert-compute policy turns
//! each block's input rows into output rows of the same shape:
//! - `swiglu_host<W>`: the reference SwiGLU FFN, out = (silu(x·W_gate) ⊙ (x·W_up))·W_down, with
//!   weights stored in `W` (float or bfloat16) and every dot product accumulated in fp32, blocked
//!   and spread over worker threads (`core/parallel_for.hpp`); it can also add each output row,
//!   weighted, straight into combine's per-copy sums (`weighted_sum_target`), so that the output
//!   rows are never written and read back;
//! - `expert_callable<F>`: a user callable given each expert's contiguous block (expert id, rows
//!   in, rows out); rows given by pointer are gathered into a scratch block first;
//! - `swiglu_cuda<W>` (layer/expert_compute_cuda.hpp): the same FFN with cuBLAS GEMMs.
//!
//! `expert_weights<W>` stores the SwiGLU weights of the experts one rank hosts under an
//! expert_map (each hosted expert once, however many of the rank's slots hold it).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <locus/backend/host.hpp>
#include <locus/core/bfloat16.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::layer {

//! Element types activations and expert weights may be stored in (arithmetic is fp32).
template <class T>
concept expert_element = std::same_as<T, float> || std::same_as<T, bfloat16>;

//! Trivially copyable view of the rows dispatched to one rank, blocked by local expert: the rows of
//! block `i` (expert `experts[i]`) are `[offsets[i], offsets[i + 1])`, each `hidden` values, in
//! `input`; the policy writes the same rows of `output`. `experts` and `offsets` are host arrays;
//! `input` and `output` live in `Space`. On the host, the inputs may instead be given row by row:
//! when `input_rows` is set, row `i`'s `hidden` inputs are at `input_rows[i]` and `input` is not
//! read (swiglu_host reads them in place; others gather them first).
template <class T, memory_space Space = memory_space::host>
struct expert_blocks {
  static constexpr memory_space space = Space;
  const expert_id* experts = nullptr;   //!< `count` expert ids
  const std::size_t* offsets = nullptr; //!< `count + 1` row offsets, non-decreasing, offsets[0] = 0
  std::size_t count = 0;
  const T* input = nullptr; //!< `offsets[count] × hidden`
  T* output = nullptr;      //!< `offsets[count] × hidden`
  std::size_t hidden = 0;
  const T* const* input_rows = nullptr; //!< optional: `offsets[count]` row pointers (host only)

  std::size_t rows(std::size_t i) const noexcept { return offsets[i + 1] - offsets[i]; }
  //! The `hidden` inputs of row `i`, under either form.
  const T* input_row(std::size_t i) const noexcept { return input_rows ? input_rows[i] : input + i * hidden; }
  std::size_t total_rows() const noexcept { return count == 0 ? 0 : offsets[count]; }
};

//! Where a compute that fuses combine's weighted sum leaves its results, instead of output rows:
//! for every row `r` of the blocks, `sums[row_copy[r] × hidden + c] += row_weight[r] × out(r, c)`,
//! summed in fp32 in ascending row order per copy, with `out` rounded to the activation type first
//! (so the sums equal what the dispatcher's combine computes from output rows). `sums` holds
//! `copies × hidden` values the caller zeroes; the dispatcher provides all three arrays
//! (dispatch_handle::copy_sums, row_copies, row_weights). With `row_first` (a compute that
//! declares `writes_first_rows`; dispatch_handle::copy_sums_to_write and row_first), the first
//! row of each copy writes its sum instead of adding to it, and the caller need not zero them.
struct weighted_sum_target {
  float* sums = nullptr;
  const std::uint32_t* row_copy = nullptr; //!< per row: the received copy it belongs to
  const float* row_weight = nullptr;       //!< per row: its routing weight
  std::size_t copies = 0;
  const std::uint8_t* row_first = nullptr; //!< optional, per row: 1 for its copy's first row
};

//! A compute that fuses combine's weighted sum and honours weighted_sum_target::row_first: it
//! declares `static constexpr bool writes_first_rows = true`, and the layer then hands it unzeroed
//! sums (one pass over them fewer per step).
template <class C>
concept first_row_writer = std::same_as<decltype(C::writes_first_rows), const bool> && C::writes_first_rows;

} // namespace locus::inline LOCUS_ABI_NAMESPACE::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {
//! Checks the structure of a block view (offsets start at zero and never decrease, buffers present).
//! @throws locus::invalid_input_error naming the offending block
template <class T, memory_space S>
void check_blocks(const char* who, const locus::layer::expert_blocks<T, S>& b, std::size_t hidden) {
  LOCUS_REQUIRE(b.hidden == hidden, invalid_input_error, who, ": the blocks have hidden size ", b.hidden,
                ", the weights ", hidden);
  if (b.count == 0) return;
  LOCUS_REQUIRE(b.experts != nullptr && b.offsets != nullptr, invalid_input_error, who,
                ": expert ids or offsets are missing for ", b.count, " blocks");
  LOCUS_REQUIRE(b.offsets[0] == 0, invalid_input_error, who, ": the first block starts at row ", b.offsets[0],
                ", not 0");
  for (std::size_t i = 0; i < b.count; ++i)
    LOCUS_REQUIRE(b.offsets[i + 1] >= b.offsets[i], invalid_input_error, who, ": block ", i, " (expert ", b.experts[i],
                  ") ends at row ", b.offsets[i + 1], " before it starts at row ", b.offsets[i]);
  LOCUS_REQUIRE(S == memory_space::host || b.input_rows == nullptr, invalid_input_error, who,
                ": row pointers are a host-side form; device blocks must be contiguous");
  LOCUS_REQUIRE(b.total_rows() == 0 || ((b.input != nullptr || b.input_rows != nullptr) && b.output != nullptr),
                invalid_input_error, who, ": ", b.total_rows(), " rows but no input or output buffer");
}

//! The inputs of `b` as one contiguous `rows × hidden` array: `b.input` itself, or the rows given
//! by pointer copied into `scratch`.
template <class T>
const T* contiguous_input(const locus::layer::expert_blocks<T, memory_space::host>& b, std::vector<T>& scratch) {
  if (b.input_rows == nullptr) return b.input;
  const std::size_t rows = b.total_rows();
  scratch.resize(rows * b.hidden);
  for (std::size_t r = 0; r < rows; ++r)
    std::copy_n(b.input_rows[r], b.hidden, scratch.data() + r * b.hidden);
  return scratch.data();
}

//! silu(v) = v / (1 + exp(-v)) from correctly rounded operations only (router/detail/math.hpp's
//! exp), so that the CUDA SwiGLU's activation stage, which runs this body, equals the host's bit for
//! bit. Below -88 it is -0 (the true value is under 1e-36 in size): exp clamps its input there, and
//! the quotient would grow back towards -v / 1.7e38 (-2 at -FLT_MAX); -inf gives -0, NaN NaN.
LOCUS_HOST_DEVICE float silu(float v) {
  namespace math = locus::detail::router;
  return math::select(v < -88.0f, -0.0f, math::fdiv(v, math::fadd(1.0f, math::exp(-v))));
}
} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::layer {

//! Trivially copyable view of one expert's SwiGLU weights, row-major:
//! `gate` and `up` are `hidden × ffn`, `down` is `ffn × hidden`.
template <class W>
struct swiglu_expert_view {
  const W* gate = nullptr;
  const W* up = nullptr;
  const W* down = nullptr;
  std::size_t hidden = 0;
  std::size_t ffn = 0;
};

//! The SwiGLU weights of a set of experts (those one rank hosts, or a whole model), each stored
//! once, contiguously: gate (`hidden × ffn`), up (`hidden × ffn`), down (`ffn × hidden`).
//! @tparam W storage element, float or locus::bfloat16
template <expert_element W>
class expert_weights {
public:
  using value_type = W;

  expert_weights() = default;
  //! Zero weights for `experts` (distinct ids, any order; kept sorted ascending).
  //! @throws locus::config_error on a zero hidden or ffn size
  //! @throws locus::invalid_input_error on a negative or repeated expert id
  expert_weights(std::size_t hidden, std::size_t ffn, std::vector<expert_id> experts)
      : hidden_(hidden), ffn_(ffn), experts_(std::move(experts)) {
    LOCUS_REQUIRE(hidden > 0 && ffn > 0, config_error, "expert_weights: hidden (", hidden, ") and ffn (", ffn,
                  ") sizes must be positive");
    // Divided, not multiplied: a product that wraps would give spans longer than the storage.
    LOCUS_REQUIRE(ffn <= SIZE_MAX / sizeof(W) / 3 / hidden &&
                      experts_.size() <= SIZE_MAX / sizeof(W) / (3 * hidden * ffn),
                  config_error, "expert_weights: ", experts_.size(), " experts × 3 × hidden ", hidden, " × ffn ", ffn,
                  " weights overflow a size_t");
    std::sort(experts_.begin(), experts_.end());
    for (std::size_t i = 0; i < experts_.size(); ++i) {
      LOCUS_REQUIRE(experts_[i] >= 0, invalid_input_error, "expert_weights: negative expert id ", experts_[i]);
      LOCUS_REQUIRE(i == 0 || experts_[i] != experts_[i - 1], invalid_input_error, "expert_weights: expert ",
                    experts_[i], " is given twice");
    }
    data_.assign(experts_.size() * per_expert(), W{});
  }

  //! The weights of every expert `rank` hosts under `map`, filled by
  //! `fill(expert_id e, std::span<W> gate, std::span<W> up, std::span<W> down)`.
  //! @throws locus::invalid_input_error when `rank` is outside the map
  template <class Fill>
  static expert_weights for_rank(const expert_map& map, std::size_t rank, std::size_t hidden, std::size_t ffn,
                                 Fill&& fill) {
    std::vector<expert_id> hosted = map.experts_on(rank);
    std::sort(hosted.begin(), hosted.end());
    hosted.erase(std::unique(hosted.begin(), hosted.end()), hosted.end()); // two slots, one copy of the weights
    expert_weights w(hidden, ffn, std::move(hosted));
    for (expert_id e : w.experts())
      fill(e, w.gate(e), w.up(e), w.down(e));
    return w;
  }

  //! The subset of `all` that `rank` hosts under `map` (copied).
  //! @throws locus::invalid_input_error when `all` lacks an expert the rank hosts
  static expert_weights for_rank(const expert_map& map, std::size_t rank, const expert_weights& all) {
    const auto copy = [&](expert_id e, std::span<W> g, std::span<W> u, std::span<W> d) {
      const swiglu_expert_view<W> v = all.view(e);
      std::copy(v.gate, v.gate + g.size(), g.begin());
      std::copy(v.up, v.up + u.size(), u.begin());
      std::copy(v.down, v.down + d.size(), d.begin());
    };
    return for_rank(map, rank, all.hidden(), all.ffn(), copy);
  }

  std::size_t hidden() const noexcept { return hidden_; }
  std::size_t ffn() const noexcept { return ffn_; }
  //! Hosted experts, ascending.
  std::span<const expert_id> experts() const noexcept { return experts_; }
  std::size_t size() const noexcept { return experts_.size(); }
  //! Bytes of weight storage.
  std::size_t bytes() const noexcept { return data_.size() * sizeof(W); }
  // A binary search, not a table indexed by id: one expert numbered 2^31 - 1 made that table 8 GiB.
  bool contains(expert_id e) const noexcept { return std::binary_search(experts_.begin(), experts_.end(), e); }
  //! Position of `e` in experts(). @throws locus::invalid_input_error when `e` is not held here
  std::size_t index_of(expert_id e) const {
    const auto it = std::lower_bound(experts_.begin(), experts_.end(), e);
    LOCUS_REQUIRE(it != experts_.end() && *it == e, invalid_input_error, "expert_weights: expert ", e,
                  " is not among the experts held here (", experts_.size(), " experts)");
    return static_cast<std::size_t>(it - experts_.begin());
  }

  //! Expert `e`'s gate, up and down weights (writable; read-only on a const object).
  //! @throws locus::invalid_input_error when `e` is not held here
  std::span<W> gate(expert_id e) { return {base(e), hidden_ * ffn_}; }
  std::span<W> up(expert_id e) { return {base(e) + hidden_ * ffn_, hidden_ * ffn_}; }
  std::span<W> down(expert_id e) { return {base(e) + 2 * hidden_ * ffn_, hidden_ * ffn_}; }
  std::span<const W> gate(expert_id e) const { return {base(e), hidden_ * ffn_}; }
  std::span<const W> up(expert_id e) const { return {base(e) + hidden_ * ffn_, hidden_ * ffn_}; }
  std::span<const W> down(expert_id e) const { return {base(e) + 2 * hidden_ * ffn_, hidden_ * ffn_}; }
  swiglu_expert_view<W> view(expert_id e) const {
    const W* b = base(e);
    return {b, b + hidden_ * ffn_, b + 2 * hidden_ * ffn_, hidden_, ffn_};
  }

private:
  std::size_t per_expert() const noexcept { return 3 * hidden_ * ffn_; }
  W* base(expert_id e) { return data_.data() + index_of(e) * per_expert(); }
  const W* base(expert_id e) const { return data_.data() + index_of(e) * per_expert(); }

  std::size_t hidden_ = 0;
  std::size_t ffn_ = 0;
  std::vector<expert_id> experts_; //!< ascending
  std::vector<W> data_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

//! Tile sizes of the host SwiGLU: rows per tile, and output columns per tile. A tile's fp32
//! accumulators (2 × rows × cols for gate and up) stay in L1.
struct swiglu_host_tiles {
  static constexpr std::size_t rows = 8;
  static constexpr std::size_t cols = 64;
};

// One work item: a tile of rows of one block × a tile of output columns.
struct tile {
  std::uint32_t block;
  std::uint32_t row0, rows;
  std::uint32_t col0, cols;
};

inline void make_tiles(std::vector<tile>& out, std::span<const std::size_t> offsets, std::size_t cols) {
  using tiles = swiglu_host_tiles;
  out.clear();
  for (std::size_t b = 0; b + 1 < offsets.size(); ++b)
    for (std::size_t r = offsets[b]; r < offsets[b + 1]; r += tiles::rows)
      for (std::size_t c = 0; c < cols; c += tiles::cols)
        out.push_back({static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(r),
                       static_cast<std::uint32_t>(std::min(tiles::rows, offsets[b + 1] - r)),
                       static_cast<std::uint32_t>(c), static_cast<std::uint32_t>(std::min(tiles::cols, cols - c))});
}

// `n` weights of a row as a full tile of floats: the row itself when it is fp32 and fills the tile,
// otherwise widened into `buf` with zeros after `n`. Inner loops then always run over the constant
// tile width, which the compiler vectorises without a remainder loop.
template <class W>
inline const float* tile_row(const W* w, std::size_t n, float* buf) {
  constexpr std::size_t cols = swiglu_host_tiles::cols;
  if constexpr (std::is_same_v<W, float>)
    if (n == cols) return w;
  for (std::size_t j = 0; j < n; ++j)
    buf[j] = to_float(w[j]);
  for (std::size_t j = n; j < cols; ++j)
    buf[j] = 0.0f;
  return buf;
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::layer {

//! The reference SwiGLU FFN on the host: out = (silu(x·W_gate) ⊙ (x·W_up))·W_down per expert.
//! Weights are stored in `W`; inputs and outputs may be float or bfloat16; every product is
//! accumulated in fp32 in a fixed order, so results do not depend on the thread count. The work
//! is split into (rows × columns) tiles over all blocks, so a decode step with few rows per expert
//! still uses every worker.
//! @tparam W weight storage, float or locus::bfloat16
//! @tparam A the activation type a layer built on this policy uses (either type is accepted here)
template <expert_element W = float, expert_element A = float>
class swiglu_host {
public:
  using policy_concept = expert_compute_tag;
  using weight_type = W;
  using activation_type = A;
  static constexpr memory_space space = memory_space::host;
  //! Honours weighted_sum_target::row_first (the layer then skips zeroing the sums).
  static constexpr bool writes_first_rows = true;

  //! @param weights the experts this rank computes
  //! @param threads worker threads (0 = all hardware threads)
  explicit swiglu_host(expert_weights<W> weights, unsigned threads = 0)
      : weights_(std::move(weights)), threads_(threads) {}

  const expert_weights<W>& weights() const noexcept { return weights_; }
  unsigned threads() const noexcept { return threads_; }
  void set_threads(unsigned threads) noexcept { threads_ = threads; }

  //! Computes every block.
  //! @throws locus::invalid_input_error on a block of an expert not held here, a hidden-size
  //!         mismatch or malformed offsets
  template <expert_element X>
  void operator()(const expert_blocks<X, memory_space::host>& b) {
    if (!gate_up(b)) return;
    // Stage 2: out = act·W_down, tiles over (rows, hidden columns).
    parallel_for(tiles_.size(), 1, threads_, [&](std::size_t begin, std::size_t end, unsigned) {
      float o[tiles::rows][tiles::cols];
      for (std::size_t it = begin; it < end; ++it) {
        const detail::layer::tile t = tiles_[it];
        down_tile(t, o);
        for (std::size_t r = 0; r < t.rows; ++r) {
          X* out = b.output + (t.row0 + r) * weights_.hidden() + t.col0;
          for (std::size_t j = 0; j < t.cols; ++j)
            out[j] = static_cast<X>(o[r][j]);
        }
      }
    });
  }

  //! Computes every block and adds each output row, weighted, to its copy's sum in `s` (combine's
  //! weighted sum fused into the FFN: the output rows are neither written nor read back).
  //! @throws locus::invalid_input_error as above, or when `s` lacks an array or names a copy
  //!         outside `[0, s.copies)`
  template <expert_element X>
  void operator()(const expert_blocks<X, memory_space::host>& b, const weighted_sum_target& s) {
    const std::size_t rows = b.total_rows(), hidden = weights_.hidden();
    LOCUS_REQUIRE(rows == 0 || (s.sums != nullptr && s.row_copy != nullptr && s.row_weight != nullptr),
                  invalid_input_error, "swiglu_host: ", rows, " rows but the weighted-sum target lacks an array");
    for (std::size_t r = 0; r < rows; ++r)
      LOCUS_REQUIRE(s.row_copy[r] < s.copies, invalid_input_error, "swiglu_host: row ", r, " belongs to copy ",
                    s.row_copy[r], " of ", s.copies);
    if (!gate_up(b)) return;
    // Stage 2 by column tile: one thread owns a tile's columns of every copy's sum and visits the
    // rows in ascending order, so the sums need no atomics and do not depend on the thread count.
    const std::size_t col_tiles = (hidden + tiles::cols - 1) / tiles::cols;
    parallel_for(col_tiles, 1, threads_, [&](std::size_t begin, std::size_t end, unsigned) {
      float o[tiles::rows][tiles::cols];
      for (std::size_t ct = begin; ct < end; ++ct)
        for (std::size_t it = ct; it < tiles_.size(); it += col_tiles) { // tiles_ is column-innermost
          const detail::layer::tile t = tiles_[it];
          down_tile(t, o);
          for (std::size_t r = 0; r < t.rows; ++r) {
            const float w = s.row_weight[t.row0 + r];
            float* sum = s.sums + std::size_t{s.row_copy[t.row0 + r]} * hidden + t.col0;
            if (s.row_first && s.row_first[t.row0 + r])
              for (std::size_t j = 0; j < t.cols; ++j)
                sum[j] = w * to_float(static_cast<X>(o[r][j]));
            else
              for (std::size_t j = 0; j < t.cols; ++j)
                sum[j] += w * to_float(static_cast<X>(o[r][j]));
          }
        }
    });
  }

private:
  using tiles = detail::layer::swiglu_host_tiles;

  // Stage 1: act = silu(x·W_gate) ⊙ (x·W_up), tiles over (rows, ffn columns); then leaves the
  // stage-2 tiles (rows, hidden columns; columns innermost) in tiles_. False when there are no rows.
  template <expert_element X>
  bool gate_up(const expert_blocks<X, memory_space::host>& b) {
    detail::layer::check_blocks("swiglu_host", b, weights_.hidden());
    views_.resize(b.count);
    for (std::size_t i = 0; i < b.count; ++i)
      views_[i] = weights_.view(b.experts[i]);
    const std::size_t rows = b.total_rows(), hidden = weights_.hidden(), ffn = weights_.ffn();
    if (rows == 0) return false;
    act_.resize(rows * ffn);
    const std::span<const std::size_t> offsets(b.offsets, b.count + 1);
    detail::layer::make_tiles(tiles_, offsets, ffn);
    parallel_for(tiles_.size(), 1, threads_, [&](std::size_t begin, std::size_t end, unsigned) {
      float g[tiles::rows][tiles::cols], u[tiles::rows][tiles::cols];
      float xr[tiles::rows];
      float wbuf[2][tiles::cols];
      for (std::size_t it = begin; it < end; ++it) {
        const detail::layer::tile t = tiles_[it];
        const swiglu_expert_view<W>& v = views_[t.block];
        const X* in[tiles::rows];
        for (std::size_t r = 0; r < t.rows; ++r) {
          in[r] = b.input_row(t.row0 + r);
          for (std::size_t j = 0; j < tiles::cols; ++j)
            g[r][j] = u[r][j] = 0.0f;
        }
        for (std::size_t h = 0; h < hidden; ++h) {
          const float* wg = detail::layer::tile_row(v.gate + h * ffn + t.col0, t.cols, wbuf[0]);
          const float* wu = detail::layer::tile_row(v.up + h * ffn + t.col0, t.cols, wbuf[1]);
          for (std::size_t r = 0; r < t.rows; ++r)
            xr[r] = to_float(in[r][h]);
          for (std::size_t r = 0; r < t.rows; ++r) {
            const float x = xr[r];
            for (std::size_t j = 0; j < tiles::cols; ++j) {
              g[r][j] += x * wg[j];
              u[r][j] += x * wu[j];
            }
          }
        }
        for (std::size_t r = 0; r < t.rows; ++r) {
          float* a = act_.data() + (t.row0 + r) * ffn + t.col0;
          for (std::size_t j = 0; j < t.cols; ++j)
            a[j] = detail::layer::silu(g[r][j]) * u[r][j];
        }
      }
    });
    detail::layer::make_tiles(tiles_, offsets, hidden);
    return true;
  }

  // One stage-2 tile: o = act·W_down over the tile's rows and hidden columns.
  void down_tile(const detail::layer::tile& t, float (&o)[tiles::rows][tiles::cols]) const {
    const std::size_t hidden = weights_.hidden(), ffn = weights_.ffn();
    const swiglu_expert_view<W>& v = views_[t.block];
    float wbuf[tiles::cols];
    for (std::size_t r = 0; r < t.rows; ++r)
      for (std::size_t j = 0; j < tiles::cols; ++j)
        o[r][j] = 0.0f;
    for (std::size_t f = 0; f < ffn; ++f) {
      const float* wd = detail::layer::tile_row(v.down + f * hidden + t.col0, t.cols, wbuf);
      for (std::size_t r = 0; r < t.rows; ++r) {
        const float a = act_[(t.row0 + r) * ffn + f];
        for (std::size_t j = 0; j < tiles::cols; ++j)
          o[r][j] += a * wd[j];
      }
    }
  }

  expert_weights<W> weights_;
  unsigned threads_;
  std::vector<swiglu_expert_view<W>> views_;
  std::vector<detail::layer::tile> tiles_;
  std::vector<float> act_;
};

//! A user-supplied expert compute: `f(expert_id e, std::span<const T> in, std::span<T> out,
//! std::size_t rows)` is called once per non-empty block, in block order, with the block's
//! `rows × hidden` input rows and the output rows it must fill. Rows given by pointer, as the layer
//! gives them (it reads received rows in place), are first gathered into a contiguous block: one
//! copy of the step's rows that swiglu_host, which reads rows by pointer, does not make.
template <class F>
class expert_callable {
public:
  using policy_concept = expert_compute_tag;
  static constexpr memory_space space = memory_space::host;

  explicit expert_callable(F f) : f_(std::move(f)) {}

  template <class T>
  void operator()(const expert_blocks<T, memory_space::host>& b) {
    // Checked here rather than as a constraint: the layer's own check then passes and this one
    // message, not a failed call deep in the loop below, names the signature expected.
    constexpr bool callable = std::invocable<F&, expert_id, std::span<const T>, std::span<T>, std::size_t>;
    static_assert(callable, "locus::layer::expert_callable: the function must be callable as f(locus::expert_id e, "
                            "std::span<const T> in, std::span<T> out, std::size_t rows), T the activation type");
    if constexpr (callable) call(b);
  }

  F& function() noexcept { return f_; }

private:
  template <class T>
  void call(const expert_blocks<T, memory_space::host>& b) {
    detail::layer::check_blocks("expert_callable", b, b.hidden);
    std::vector<T> scratch;
    const T* input = detail::layer::contiguous_input(b, scratch);
    for (std::size_t i = 0; i < b.count; ++i) {
      const std::size_t rows = b.rows(i);
      if (rows == 0) continue;
      const std::size_t first = b.offsets[i] * b.hidden, n = rows * b.hidden;
      f_(b.experts[i], std::span<const T>(input + first, n), std::span<T>(b.output + first, n), rows);
    }
  }

  F f_;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

//! The expert compute a backend uses when none is given; backends other than host specialise it
//! (layer/expert_compute_cuda.hpp does for backend::cuda).
template <class Backend>
struct default_expert_compute {
  static_assert(sizeof(Backend) == 0, "locus::moe_layer: this backend has no default expert compute; give one "
                                      "(for backend::cuda, include <locus/layer/expert_compute_cuda.hpp>)");
};
template <>
struct default_expert_compute<backend::host> {
  using type = locus::layer::swiglu_host<float>;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer
