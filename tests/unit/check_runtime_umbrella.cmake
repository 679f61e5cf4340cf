# Fails when the runtime umbrella, locus/locus.hpp, includes a planning header (trace, grouper,
# placement or cost): those belong to locus/planning.hpp. Run with
#   cmake -DCXX=<compiler> -DINCLUDE_DIR=<repo>/include -P check_runtime_umbrella.cmake
execute_process(COMMAND "${CXX}" -std=c++20 "-I${INCLUDE_DIR}" -H -fsyntax-only -x c++ "${INCLUDE_DIR}/locus/locus.hpp"
                RESULT_VARIABLE rc ERROR_VARIABLE tree OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "locus/locus.hpp does not compile on its own:\n${tree}")
endif()
string(REGEX MATCHALL "locus/(trace|grouper|placement|cost)/[a-z_]+\\.hpp" planning "${tree}")
if(planning)
  list(REMOVE_DUPLICATES planning)
  list(JOIN planning ", " named)
  message(FATAL_ERROR "locus/locus.hpp includes planning headers: ${named}")
endif()
string(FIND "${tree}" "locus/layer/moe_layer.hpp" layer_at)
if(layer_at EQUAL -1)
  message(FATAL_ERROR "the include tree of locus/locus.hpp was not read (no moe_layer.hpp in it):\n${tree}")
endif()
message(STATUS "locus/locus.hpp includes no planning header")
