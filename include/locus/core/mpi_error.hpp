#pragma once
// locus-requires: mpi
//! @file
//! LOCUS_MPI_CHECK: turns a failing MPI call into locus::mpi_error.

#include <locus/core/error.hpp>
#include <string>

// Open MPI's C++ bindings (compiled in where the MPI install keeps them) cast between function
// types, which -Wextra -Werror refuses in a user's build; locus uses the C API alone.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wcast-function-type"
#endif
#include <mpi.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace locus::inline LOCUS_ABI_NAMESPACE::detail {
//! MPI's own text for an error code.
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "unknown MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(length));
}
} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail

#ifndef LOCUS_MPI_CHECK
//! Evaluates an MPI call once; on failure throws locus::mpi_error whose code() is the MPI error
//! code. Communicators must use MPI_ERRORS_RETURN for errors to reach this check.
#define LOCUS_MPI_CHECK(call)                                                                                          \
  do {                                                                                                                 \
    const int locus_mpi_status = (call);                                                                               \
    if (LOCUS_UNLIKELY(locus_mpi_status != MPI_SUCCESS)) {                                                             \
      throw ::locus::mpi_error(                                                                                        \
          ::locus::detail::concat(#call, " failed: ", ::locus::detail::mpi_error_string(locus_mpi_status)), __FILE__,  \
          __LINE__, locus_mpi_status);                                                                                 \
    }                                                                                                                  \
  } while (0)
#endif
