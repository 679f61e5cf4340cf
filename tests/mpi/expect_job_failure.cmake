# cmake -DCOMMAND="mpiexec;...;prog;arg;..." -DEXPECT="regex;regex;..." [-DREJECT=regex] -P expect_job_failure.cmake
# Passes when the command exits non-zero AND its output (stdout + stderr) matches EVERY regex, so a
# fault test can require a message from each rank, in whatever order the ranks wrote them, and
# does not match REJECT when given (e.g. an MPI_Abort the job must end without).
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit, got 0; output:\n${out}${err}")
endif()
foreach(expect IN LISTS EXPECT)
  if(NOT "${out}${err}" MATCHES "${expect}")
    message(FATAL_ERROR "exit ${rc}, but the output does not match \"${expect}\":\n${out}${err}")
  endif()
endforeach()
if(DEFINED REJECT AND "${out}${err}" MATCHES "${REJECT}")
  message(FATAL_ERROR "exit ${rc} with the expected messages, but the output also matches \"${REJECT}\":\n${out}${err}")
endif()
message(STATUS "exit ${rc} with the expected messages:\n${out}${err}")
