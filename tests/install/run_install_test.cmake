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
# The mpi variant must not need CUDA or NCCL: their package lookups are disabled for it.
set(no_gpu_packages "")
if(VARIANT STREQUAL "mpi")
  set(no_gpu_packages -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON -DCMAKE_DISABLE_FIND_PACKAGE_NCCL=ON)
endif()
run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCONSUMER_VARIANT=${VARIANT} -DCMAKE_BUILD_TYPE=Release ${no_gpu_packages})
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
if(VARIANT STREQUAL "cuda")
  # Built and linked is the check here; running needs a GPU.
  return()
endif()
run("${WORK_DIR}/build/consumer")
if(VARIANT STREQUAL "core")
  # The driver installs, and a build without CMake finds the headers through pkg-config.
  if(NOT EXISTS "${prefix}/bin/locus")
    message(FATAL_ERROR "the locus driver was not installed under ${prefix}/bin")
  endif()
  run("${prefix}/bin/locus" --help)
  find_program(pkg_config pkg-config)
  if(pkg_config)
    set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
    execute_process(COMMAND ${pkg_config} --cflags locus OUTPUT_VARIABLE pc_cflags OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "pkg-config --cflags locus failed (${rc})")
    endif()
    separate_arguments(pc_cflags UNIX_COMMAND "${pc_cflags}")
    run(${CXX_COMPILER} ${pc_cflags} "${CONSUMER_SOURCE_DIR}/main.cpp" -o "${WORK_DIR}/pkgconfig_consumer" -pthread)
    run("${WORK_DIR}/pkgconfig_consumer")
  endif()
endif()
# A component whose dependency this machine lacks: optional, it is not found and the rest loads;
# required, the package is not found (MPI's lookup disabled stands for a machine without MPI).
if(VARIANT STREQUAL "mpi")
  run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/optional" -DCMAKE_PREFIX_PATH=${prefix}
      -DCONSUMER_VARIANT=optional -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
endif()
# A component that this installation lacks must be reported by find_package, not silently ignored.
run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/missing" -DCMAKE_PREFIX_PATH=${prefix}
    -DCONSUMER_VARIANT=missing)
