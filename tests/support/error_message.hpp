#pragma once
// The message of the locus error `f` raises (of type E), for tests that look into it; a marker
// when it raises none.
#include <locus/core/error.hpp>
#include <string>

namespace locus_test {

inline constexpr const char* no_error = "<no exception>";

template <class E = locus::error, class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.message();
  }
  return no_error;
}

} // namespace locus_test
