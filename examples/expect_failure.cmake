# cmake -DCOMMAND="prog;arg;..." -DEXPECT=regex -P expect_failure.cmake
# Passes when the command exits non-zero AND its output (stdout + stderr) matches EXPECT, so a
# test proves both that bad input is refused and that the user is told why.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit, got 0; output:\n${out}${err}")
endif()
# A crash (CMake reports a signal as text, e.g. "Child aborted") is not a refusal.
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "expected an exit status, the command crashed (${rc}); output:\n${out}${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "exit ${rc}, but the output does not match \"${EXPECT}\":\n${out}${err}")
endif()
message(STATUS "exit ${rc} with the expected message: ${err}")
