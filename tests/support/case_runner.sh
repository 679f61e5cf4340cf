# The case runner of the driver's shell tests (tests/driver, tests/hostile): sourced, never run.
# A script sources it, calls `cases_begin <locus binary> <scratch folder>`, runs its cases with the
# helpers below and ends with `cases_end`, which prints "<script>: all passed (N cases)" (what
# ctest's PASS_REGULAR_EXPRESSION looks for) or the count that failed, and exits 0 or 1. Every run
# of the driver is capped at 60 s, so that a hang fails its case instead of the whole test.
# Failures are reported on stderr as they happen, each with the command line that failed.

# cases_begin <locus binary> <scratch folder>: sets $locus and $work (emptied) and the counters.
cases_begin() {
  locus=$1
  work=$2
  rm -rf "$work"
  mkdir -p "$work"
  cases_run=0
  cases_failed=0
}

# case_fail <message>: counts the current case as failed.
case_fail() {
  echo "FAIL $*" >&2
  cases_failed=$((cases_failed + 1))
}

# ok <regex> <args...>: the run must succeed and its output (stdout and stderr) match <regex>.
ok() {
  local want=$1
  shift
  cases_run=$((cases_run + 1))
  local out
  if ! out=$(timeout 60 "$locus" "$@" 2>&1); then
    case_fail "(exit): locus $*"
    echo "$out" | tail -5 >&2
  elif ! echo "$out" | grep -Eq -- "$want"; then
    case_fail "(output): locus $*"
    echo "  wanted /$want/, got: $out" >&2
  fi
}

# succeeds <args...>: the run must succeed (its output is not looked at; stdin is the caller's).
succeeds() {
  cases_run=$((cases_run + 1))
  local err
  if ! err=$(timeout 60 "$locus" "$@" 2>&1 >/dev/null); then
    case_fail "(exit): locus $*"
    echo "$err" | tail -5 >&2
  fi
}

# refused <regex> <args...>: the run must fail with status 1 or 2 (never a signal, an abort or an
# out-of-memory exit), and its stderr match <regex> and name no source location (that takes
# --verbose).
refused() {
  local want=$1
  shift
  cases_run=$((cases_run + 1))
  local out rc
  out=$(timeout 60 "$locus" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -ne 1 ] && [ "$rc" -ne 2 ]; then
    case_fail "($rc): locus $*"
    echo "$out" | tail -5 >&2
  elif ! echo "$out" | grep -Eq -- "$want"; then
    case_fail "(message): locus $*"
    echo "  wanted /$want/, got: $out" >&2
  elif echo "$out" | grep -q '\[.*\.hpp:[0-9]*\]'; then
    case_fail "(source location without --verbose): locus $*: $out"
  fi
}

# same <a> <b>: two files must be identical (e.g. the same trace, encoded the one way there is).
same() {
  cases_run=$((cases_run + 1))
  cmp -s "$1" "$2" || case_fail "(differ): $1 $2"
}

# check <description> <command...>: a case of the script's own, passed when the command succeeds.
check() {
  local what=$1
  shift
  cases_run=$((cases_run + 1))
  "$@" || case_fail "$what"
}

# cases_end: the summary line and the exit status.
cases_end() {
  local name
  name=$(basename "$0" .sh)
  if [ "$cases_failed" -ne 0 ]; then
    echo "$name: $cases_failed of $cases_run cases failed"
    exit 1
  fi
  echo "$name: all passed ($cases_run cases)"
  exit 0
}
