# Warning and sanitizer flags for the project's own programs (never pushed onto consumers).
add_library(locus_build_flags INTERFACE)
target_compile_options(locus_build_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
if(LOCUS_SANITIZE)
  target_compile_options(locus_build_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer>)
  target_link_options(locus_build_flags INTERFACE -fsanitize=address,undefined)
  # Sanitized builds check every accessor.
  target_compile_definitions(locus_build_flags INTERFACE LOCUS_ENABLE_BOUNDS_CHECKS=1)
endif()
