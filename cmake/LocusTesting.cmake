# Test helpers: one Boost.Test executable per area, ctest labels unit / mpi / cuda / install /
# compile_fail.
#
# LOCUS_PORTABLE_TESTS links Boost.Test, libstdc++ and the CUDA runtime statically, so that test and
# benchmark binaries built here run on a GPU machine that has a driver but not Boost
# (scripts/gpu-check --prepare).
if(LOCUS_PORTABLE_TESTS)
  set(Boost_USE_STATIC_LIBS ON)
endif()
find_package(Boost 1.71 CONFIG COMPONENTS unit_test_framework)
if(NOT Boost_FOUND)
  message(FATAL_ERROR "locus: LOCUS_BUILD_TESTS=ON needs Boost.Test (apt-get install libboost-test-dev), "
                      "or configure with -DLOCUS_BUILD_TESTS=OFF")
endif()

function(locus_portable_runtime name)
  if(LOCUS_PORTABLE_TESTS)
    target_link_options(${name} PRIVATE -static-libstdc++ -static-libgcc)
    if(TARGET CUDA::cudart_static)
      set_target_properties(${name} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
    endif()
  endif()
endfunction()

function(locus_test_executable name)
  cmake_parse_arguments(arg "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${arg_SOURCES})
  target_link_libraries(${name} PRIVATE locus::locus Boost::unit_test_framework locus_build_flags ${arg_LIBS})
  if(NOT LOCUS_PORTABLE_TESTS)
    target_compile_definitions(${name} PRIVATE BOOST_TEST_DYN_LINK)
  endif()
  target_compile_definitions(${name} PRIVATE
    LOCUS_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
    LOCUS_SHARED_DIR="${PROJECT_SOURCE_DIR}/../shared")
  locus_portable_runtime(${name})
endfunction()

#! locus_add_unit_test(NAME name SOURCES ... [LIBS ...])
function(locus_add_unit_test)
  cmake_parse_arguments(arg "" "NAME;TIMEOUT" "SOURCES;LIBS" ${ARGN})
  locus_test_executable(${arg_NAME} SOURCES ${arg_SOURCES} LIBS ${arg_LIBS})
  add_test(NAME ${arg_NAME} COMMAND ${arg_NAME} --color_output=false)
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 300)
  endif()
  set_tests_properties(${arg_NAME} PROPERTIES LABELS unit TIMEOUT ${arg_TIMEOUT})
endfunction()

# mpirun refuses to run as root and to place more ranks than cores unless told; both are the
# normal case on a developer box and in CI, so the flags are added for Open MPI.
set(locus_mpiexec_flags "")
if(TARGET MPI::MPI_CXX AND MPIEXEC_EXECUTABLE)
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE locus_mpiexec_version ERROR_QUIET)
  if(locus_mpiexec_version MATCHES "Open MPI|OpenRTE")
    set(locus_mpiexec_flags --allow-run-as-root --oversubscribe --bind-to none)
  endif()
endif()

#! locus_add_mpi_test(NAME name SOURCES ... NP 2 4 8 [LIBS ...] [ARGS ...])
#! One ctest per rank count, named name.npN, run through mpiexec.
function(locus_add_mpi_test)
  cmake_parse_arguments(arg "" "NAME;TIMEOUT" "SOURCES;LIBS;NP;ARGS" ${ARGN})
  if(NOT TARGET locus::mpi)
    return()
  endif()
  locus_test_executable(${arg_NAME} SOURCES ${arg_SOURCES} LIBS locus::mpi ${arg_LIBS})
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 300)
  endif()
  foreach(np IN LISTS arg_NP)
    add_test(NAME ${arg_NAME}.np${np}
      COMMAND ${MPIEXEC_EXECUTABLE} ${locus_mpiexec_flags} ${MPIEXEC_NUMPROC_FLAG} ${np}
              ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${arg_NAME}> ${MPIEXEC_POSTFLAGS} --color_output=false ${arg_ARGS})
    set_tests_properties(${arg_NAME}.np${np} PROPERTIES LABELS mpi TIMEOUT ${arg_TIMEOUT} PROCESSORS 2
      ENVIRONMENT "OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_btl_vader_single_copy_mechanism=none")
  endforeach()
endfunction()

#! locus_add_cuda_test(NAME name SOURCES ... [LIBS ...]): built wherever nvcc exists, labelled
#! cuda so that scripts/test runs it only where a GPU is visible.
function(locus_add_cuda_test)
  cmake_parse_arguments(arg "" "NAME" "SOURCES;LIBS" ${ARGN})
  if(NOT TARGET locus::cuda)
    return()
  endif()
  locus_test_executable(${arg_NAME} SOURCES ${arg_SOURCES} LIBS locus::cuda ${arg_LIBS})
  add_test(NAME ${arg_NAME} COMMAND ${arg_NAME} --color_output=false)
  set_tests_properties(${arg_NAME} PROPERTIES LABELS cuda TIMEOUT 300)
endfunction()

#! locus_add_compile_fail_test(NAME name SOURCE file DIAGNOSTIC regex [LIBS ...])
#! The source must fail to compile and the compiler output must match the regex, so the test
#! proves both that the misuse is rejected and that the user is told why.
function(locus_add_compile_fail_test)
  cmake_parse_arguments(arg "" "NAME;SOURCE;DIAGNOSTIC" "LIBS" ${ARGN})
  add_library(${arg_NAME} OBJECT EXCLUDE_FROM_ALL ${arg_SOURCE})
  target_link_libraries(${arg_NAME} PRIVATE locus::locus ${arg_LIBS})
  add_test(NAME ${arg_NAME}
    COMMAND ${CMAKE_COMMAND} --build ${CMAKE_BINARY_DIR} --target ${arg_NAME} --config $<CONFIG>)
  # RESOURCE_LOCK: each of these runs a build in the shared build tree; two at once would race.
  set_tests_properties(${arg_NAME} PROPERTIES LABELS compile_fail TIMEOUT 300 RESOURCE_LOCK locus_build_tree
    PASS_REGULAR_EXPRESSION "${arg_DIAGNOSTIC}"
    FAIL_REGULAR_EXPRESSION "Built target ${arg_NAME}")
endfunction()
