#pragma once
//! @file
//! The exception hierarchy rooted at locus::error, and the macros that raise it with the source
//! location and a precise message.

#include <cstdint>
#include <cstdio>
#include <locus/core/config.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! Which subsystem produced an error; `error::code()` carries that subsystem's own code.
enum class error_kind {
  config,        //!< an invalid shape, topology, option or combination of them
  invalid_input, //!< data handed to a public entry is wrong (expert id out of range, NaN weight...)
  format,        //!< a file or record does not follow its format
  bounds,        //!< an index outside a view (bounds-checked builds)
  transport,     //!< ranks disagree (counts, sizes) or a peer misbehaved
  timeout,       //!< a peer did not arrive in time
  cuda,          //!< a CUDA runtime or driver call failed; code() is the cudaError_t
  nccl,          //!< an NCCL call failed; code() is the ncclResult_t
  mpi,           //!< an MPI call failed; code() is the MPI error code
  io,            //!< the operating system refused a file operation; code() is errno
  cancelled,     //!< the caller asked a long computation to stop (core/cancel.hpp)
};

//! Name of an error kind, as printed in messages.
inline const char* to_string(error_kind k) noexcept {
  switch (k) {
  case error_kind::config: return "configuration error";
  case error_kind::invalid_input: return "invalid input";
  case error_kind::format: return "format error";
  case error_kind::bounds: return "index out of bounds";
  case error_kind::transport: return "transport error";
  case error_kind::timeout: return "timeout";
  case error_kind::cuda: return "CUDA error";
  case error_kind::nccl: return "NCCL error";
  case error_kind::mpi: return "MPI error";
  case error_kind::io: return "I/O error";
  case error_kind::cancelled: return "cancelled";
  }
  return "error";
}

inline std::ostream& operator<<(std::ostream& os, error_kind k) { return os << to_string(k); }

//! Root of every exception locus throws. `what()` reads
//! "locus: <kind>: <message> [<file>:<line>]".
class error : public std::runtime_error {
public:
  error(error_kind kind, std::string message, const char* file = nullptr, int line = 0, int code = 0)
      : std::runtime_error(compose(kind, message, file, line)), kind_(kind), code_(code), message_(std::move(message)),
        file_(file ? file : ""), line_(line) {}

  //! Subsystem that failed.
  error_kind kind() const noexcept { return kind_; }
  //! The original code of the failing call (cudaError_t, ncclResult_t, MPI code, errno), or 0.
  int code() const noexcept { return code_; }
  //! The message without prefix and location.
  const std::string& message() const noexcept { return message_; }
  const std::string& file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

private:
  static std::string compose(error_kind kind, const std::string& message, const char* file, int line) {
    std::string s = "locus: ";
    s += to_string(kind);
    s += ": ";
    s += message;
    if (file && *file) {
      s += " [";
      s += file;
      s += ':';
      s += std::to_string(line);
      s += ']';
    }
    return s;
  }

  error_kind kind_;
  int code_;
  std::string message_;
  std::string file_;
  int line_;
};

// One class per kind so callers can catch precisely what they can handle.
#define LOCUS_DETAIL_DEFINE_ERROR(name, kind_value)                                                                    \
  class name : public error {                                                                                          \
  public:                                                                                                              \
    explicit name(std::string message, const char* file = nullptr, int line = 0, int code = 0)                         \
        : error(error_kind::kind_value, std::move(message), file, line, code) {}                                       \
  }

LOCUS_DETAIL_DEFINE_ERROR(config_error, config);
LOCUS_DETAIL_DEFINE_ERROR(invalid_input_error, invalid_input);
LOCUS_DETAIL_DEFINE_ERROR(bounds_error, bounds);
LOCUS_DETAIL_DEFINE_ERROR(transport_error, transport);
LOCUS_DETAIL_DEFINE_ERROR(timeout_error, timeout);
LOCUS_DETAIL_DEFINE_ERROR(cuda_error, cuda);
LOCUS_DETAIL_DEFINE_ERROR(nccl_error, nccl);
LOCUS_DETAIL_DEFINE_ERROR(mpi_error, mpi);
LOCUS_DETAIL_DEFINE_ERROR(io_error, io);
LOCUS_DETAIL_DEFINE_ERROR(cancelled_error, cancelled);
#undef LOCUS_DETAIL_DEFINE_ERROR

//! A file or record that does not follow its format. `offset()` is the byte offset (binary
//! files) or the 1-based line number (text files) where the problem was found.
class format_error : public error {
public:
  format_error(std::string message, std::uint64_t offset, const char* file = nullptr, int line = 0)
      : error(error_kind::format, std::move(message), file, line), offset_(offset) {}
  std::uint64_t offset() const noexcept { return offset_; }

private:
  std::uint64_t offset_;
};

namespace detail {
//! Streams every argument into one string: the message builder behind LOCUS_THROW.
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

//! A format_error with offset 0 whose message is `args` streamed together: for readers of whole
//! documents (JSON, NumPy headers) where no byte offset is known. format_error carries an offset,
//! so such readers raise it through these rather than LOCUS_REQUIRE.
template <class... Args>
[[noreturn]] void format_fail(const Args&... args) {
  throw format_error(concat(args...), 0);
}
//! format_fail(args...) unless `ok`.
template <class... Args>
void format_require(bool ok, const Args&... args) {
  if (!ok) format_fail(args...);
}

[[noreturn]] inline void throw_bounds(const char* what, const char* file, int line) {
  throw bounds_error(what, file, line);
}
} // namespace detail

} // namespace locus::inline LOCUS_ABI_NAMESPACE

//! Throws `error_type(message, __FILE__, __LINE__)`; the message is every further argument
//! streamed together: `LOCUS_THROW(locus::config_error, "top_k ", k, " exceeds ", e, " experts")`.
#define LOCUS_THROW(error_type, ...) throw error_type(::locus::detail::concat(__VA_ARGS__), __FILE__, __LINE__)

//! Throws `error_type` with the message when `cond` is false.
#define LOCUS_REQUIRE(cond, error_type, ...)                                                                           \
  do {                                                                                                                 \
    if (LOCUS_UNLIKELY(!(cond))) LOCUS_THROW(error_type, __VA_ARGS__);                                                 \
  } while (0)

//! Invariant check usable in host and device code: throws locus::bounds_error on the host and
//! traps on the device. Active when LOCUS_HAS_BOUNDS_CHECKS(), compiled out otherwise.
#if LOCUS_HAS_BOUNDS_CHECKS()
#if LOCUS_IS_DEVICE_PASS()
#define LOCUS_ASSERT(cond, what)                                                                                       \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      printf("locus: %s [%s:%d] thread %d block %d\n", what, __FILE__, __LINE__, (int)threadIdx.x, (int)blockIdx.x);   \
      __trap();                                                                                                        \
    }                                                                                                                  \
  } while (0)
#else
#define LOCUS_ASSERT(cond, what)                                                                                       \
  do {                                                                                                                 \
    if (LOCUS_UNLIKELY(!(cond))) ::locus::detail::throw_bounds(what, __FILE__, __LINE__);                              \
  } while (0)
#endif
#else
#define LOCUS_ASSERT(cond, what)                                                                                       \
  do {                                                                                                                 \
  } while (0)
#endif
