# Warning and sanitizer flags for the project's own programs (never pushed onto consumers).
add_library(locus_build_flags INTERFACE)
target_compile_options(locus_build_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion>
  # GCC's maybe-uninitialized fires inside CUB's dispatch code once inlined into a .cu file
  # (cub/device/dispatch/dispatch_scan.cuh), system header or not: noise in every CUDA build.
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall -Xcompiler=-Wno-maybe-uninitialized>)
if(LOCUS_SANITIZE AND LOCUS_SANITIZE_THREAD)
  message(FATAL_ERROR "locus: LOCUS_SANITIZE and LOCUS_SANITIZE_THREAD cannot share a build")
endif()
if(LOCUS_SANITIZE_THREAD)
  # Host threads (parallel_for, the in-process transports, the warp emulator's grid) checked for
  # data races: a race there shows only now and then, under load, without it.
  target_compile_options(locus_build_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=thread>)
  target_link_options(locus_build_flags INTERFACE -fsanitize=thread)
endif()
if(LOCUS_SANITIZE)
  target_compile_options(locus_build_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer>)
  target_link_options(locus_build_flags INTERFACE -fsanitize=address,undefined)
  # Sanitized builds check every accessor.
  target_compile_definitions(locus_build_flags INTERFACE LOCUS_ENABLE_BOUNDS_CHECKS=1)
endif()
