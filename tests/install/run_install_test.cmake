# cmake -P script: install, configure the consumer against the prefix, build it, run it.
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run(${CMAKE_COMMAND} --install "${LOCUS_BUILD_DIR}" --prefix "${prefix}")
if(NOT EXISTS "${prefix}/share/cmake/locus/locusConfig.cmake" OR NOT EXISTS "${prefix}/include/locus/locus.hpp")
  message(FATAL_ERROR "install tree is incomplete under ${prefix}")
endif()
run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCONSUMER_VARIANT=${VARIANT} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
if(VARIANT STREQUAL "cuda")
  # Built and linked is the check here; running needs a GPU.
  return()
endif()
run("${WORK_DIR}/build/consumer")
# A component that this installation lacks must be reported by find_package, not silently ignored.
run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/missing" -DCMAKE_PREFIX_PATH=${prefix}
    -DCONSUMER_VARIANT=missing)
