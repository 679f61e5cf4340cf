#!/usr/bin/env bash
# Hostile command-line values through the other programs a user runs (examples/moe_layer and the
# benchmarks): every case must end with a clear message on stderr, without a source location, and
# exit status 1 or 2, under a 1 GiB address-space limit, within seconds; results files record the
# command, the machine and the date.
# Usage: program_cases.sh <moe_layer> <eplb> <router> <trace_io> <comm_volume> <drift> <placement_oracle>
#                         <trace_stats> <scratch folder>
set -u
source "$(dirname "$0")/../support/case_runner.sh"
moe_layer=$1 eplb=$2 router=$3 trace_io=$4 comm_volume=$5 drift=$6 placement_oracle=$7 trace_stats=$8
cases_begin "$moe_layer" "$9"
ulimit -v 1048576 # KiB: 1 GiB of address space for every case

# Whole numbers in decimal: CLI11 2.1 read "-1" as 2^64 - 1, "010" as 8, "0x10" as 16 and clamped
# 2^64 to 2^64 - 1, and "1.5" gave "At Most 1 required but received 2".
refused '"-1" is not a whole number >= 0' --tokens -1
refused '"0x10" is not a whole number' --experts 0x10
refused '"1.5" is not a whole number' --steps 1.5
refused '18446744073709551616 is out of range' --experts 18446744073709551616
ok 'max \|flat - hierarchical\|' --steps 010 --tokens 2 --hidden 8 --ffn 8 --experts 8
refused 'moe_layer has no option --bogus \(see moe_layer --help\)' --bogus
refused 'has no option --expert \(did you mean --experts\?' --expert 8
# Absurd sizes: refused before anything is allocated or a thread started.
# A failure reads "<program>: <kind>: <message>", one name first ("locus: configuration error: moe_layer: ..."
# and the benchmarks' "eplb: locus: I/O error: ..." said two).
refused '^moe_layer: configuration error: these sizes .* need about .* GB of memory; this machine has' --experts 1000000000
refused 'need about .* GB of memory' --hidden 4000000 --ffn 4000000
refused 'at most 1024 run as threads' --nodes 100000
refused 'exceeds the number of experts' --top-k 17 --steps 1

# Results folders and files that cannot be written are named before the run.
locus=$eplb
: >"$work/plain"
refused '^eplb: I/O error: .*plain: cannot be made the results folder' --out "$work/plain"
refused '"0x10" is not a whole number' --repeats 0x10
locus=$router
refused 'it is a directory' --json "$work"
refused 'folder does not exist' --json "$work/none/r.json"
refused 'cannot create a file in its folder|folder does not exist' --md "$work/plain/r.md"
refused 'must be at most 3600 \(an hour per row\), got 1e308' --min-seconds 1e308
# The Markdown written over the JSON, which the run then said it wrote.
refused 'r.json and .*r.json name one file: give each result its own' --json "$work/r.json" --md "$work/./r.json"
ok 'JSON in' --tokens 16 --min-seconds 0.001 --json "$work/r.json" --md "$work/r.md"
check 'router.json records command, machine and date' \
  grep -Eq '"command": "build/dev/bench/router --tokens 16.*"machine": ".*[0-9]{4}-[0-9]{2}-[0-9]{2}' \
  <(tr -d '\n' <"$work/r.json")
check 'router.md records the command' grep -q 'Produced by `build/dev/bench/router --tokens 16' "$work/r.md"
check 'router.json names the program as run from its folder' bash -c \
  "cd '$(dirname "$router")/..' && bench/router --tokens 16 --min-seconds 0.001 --json '$work/r2.json' >/dev/null &&
   grep -q '\"command\": \"bench/router --tokens 16' '$work/r2.json'"
locus=$trace_io
# The size in a few digits (1e+09), not std::to_string's "1000000000.000000".
refused '^trace_io: configuration error: --gb 1e\+09 \(the trace and its read-back\) need about .* GB of memory' \
  --gb 1e9 --out "$work"
# A --tmp that is not there is said before the first measurement (it failed after the ESFT rows).
refused "^trace_io: I/O error: $work/none: no such folder \(--tmp\)$" --gb 0.001 --tmp "$work/none" --out "$work"
refused 'must be a number above 0' --gb nan --out "$work"
# A size below one token built an empty trace, whose baseline read crashed (SIGSEGV).
refused '^trace_io: configuration error: --gb 1e-06 holds no token of the synthetic trace' --gb 1e-6 --out "$work"
# --trace's default is decided when the program runs (it named the folders of the machine that built
# it), and a trace that is not there is said with the path and how to give one.
root=$(cd "$(dirname "$0")/../.." && pwd)
unset LOCUS_TRACES # the cases set it where they mean to
ok 'TEXT=\.\./shared/traces/esft' --help
ok '\$LOCUS_TRACES/esft if LOCUS_TRACES is set' --help
LOCUS_TRACES=$work/elsewhere ok "TEXT=$work/elsewhere/esft" --help
check 'trace_io --help names no folder of the build' bash -c "! '$trace_io' --help | grep -v '^Usage:' | grep -qF '$root'"
LOCUS_TRACES=$work/none refused "LOCUS_TRACES is $work/none, but $work/none/esft does not exist" --out "$work"
refused "$work/none: no such folder \(--trace\)" --trace "$work/none" --out "$work"
refused "$work/plain: not an ESFT folder \(--trace\)" --trace "$work/plain" --out "$work"

# The scripts answer --help with their usage and refuse what they do not take before they install,
# build, delete or rewrite anything: `scripts/format --help` rewrote every source in place,
# `scripts/python-test --help` deleted the virtual environment, `scripts/fuzz abc` ran unbounded,
# `scripts/demo --help` installed and built the driver first.
scripts=$(cd "$(dirname "$0")/../../scripts" && pwd)
for s in test python-test; do
  locus=$scripts/$s
  ok 'usage|The .* (command|tests)' --help
  refused 'unexpected argument "--bogus"; it takes none' --bogus
done
locus=$scripts/format
ok 'scripts/format --check' --help
refused 'unexpected argument "--chek"' --chek
locus=$scripts/fuzz
refused 'whole number from 1 to 999999, got "abc"' abc
refused 'whole number from 1 to 999999, got "0"' 0
locus=$scripts/demo
LOCUS_BUILD_DIR=$work/no_demo ok 'usage: scripts/demo \[locus compare options\]' --help
check 'scripts/demo --help builds nothing' test ! -e "$work/no_demo"
locus=$scripts/gpu-check
ok 'scripts/gpu-check --prepare' --help
refused 'unexpected argument "--bogus"' --bogus
check 'no results where a run was refused' test ! -e "$work/eplb.json" -a ! -e "$work/trace_io.json"

# A run that fails before writing its results leaves no folder of its own, nor the parents it would
# have made (an empty folder was left behind); a folder that was there stays.
python3 "$(dirname "$0")/../support/tiny_esft.py" "$work/esft" 48
for p in comm_volume drift placement_oracle trace_stats; do
  locus=${!p}
  refused "^$p: format error: .*plain: offset 0: file ends inside the magic" --trace "$work/plain" --out "$work/made_$p/out"
  check "$p removes the folders it made" test ! -e "$work/made_$p"
done
locus=$drift
refused '--phases: the trace has no domain "foo" \(its domains: law, math\)' --trace "$work/esft" --phases foo \
  --out "$work/made_drift/out"
check 'drift --phases foo leaves no folder' test ! -e "$work/made_drift"
refused '--hedge-replicas spends replica slots: it needs --redundant' --trace "$work/esft" --hedge-replicas 4 \
  --out "$work/made_drift/out"
refused '--unseen-domain foo is not one of --phases \(law, math\)' --trace "$work/esft" --phases law,math \
  --unseen-domain foo --out "$work/made_drift/out"
refused '--replan-slack: "nan" is not a finite number >= 0' --trace "$work/esft" --replan-slack nan \
  --out "$work/made_drift/out"
check 'drift --unseen-domain foo leaves no folder' test ! -e "$work/made_drift"
locus=$trace_io
refused 'need about .* GB of memory' --gb 1e9 --out "$work/made_io/out"
check 'trace_io removes the folders it made' test ! -e "$work/made_io"
mkdir "$work/kept"
refused 'need about .* GB of memory' --gb 1e9 --out "$work/kept"
check 'a folder that was there stays' test -d "$work/kept"
locus=$trace_stats
refused 'none/t.md: cannot write: its folder does not exist' --trace "$work/esft" --out "$work/made_md" --md "$work/none/t.md"
check 'trace_stats checks --md before the run' test ! -e "$work/made_md"
# A --md that is a link to the JSON the run writes (not there yet): the Markdown replaced the JSON.
mkdir -p "$work/ts_link"
ln -s "$work/ts_link/trace_stats.json" "$work/ts_link.md"
refused 'name one file: give each result its own' --trace "$work/esft" --out "$work/ts_link" --md "$work/ts_link.md"
# A results folder is made with its parents, as `locus trace report --out` makes its folder.
locus=$placement_oracle
# NaN ran as a node bound and -5 as none; a bound without free homes was dropped without a word.
refused '--home-caps: "nan" is neither -1 \(none\) nor a bound >= 0' --homes free --home-caps nan
refused '--home-caps bounds the free homes; give --homes free' --home-caps 0.1
# An empty list item was dropped without a word: the run had a shorter list.
refused '^placement_oracle: usage error: --slacks: "0.1,,0.2" has an empty item' --slacks 0.1,,0.2
refused '^placement_oracle: usage error: --redundant: "1," has an empty item' --redundant=1,
succeeds --trace "$work/esft" --nodes 2 --gpus 2 --anneal 10 --redundant 0 --slacks 0.1 --out "$work/p1/p2/p3"
check 'a results folder is made with its parents' test -f "$work/p1/p2/p3/placement_oracle.json"
# ... nor does a run stopped by a signal (Ctrl-C, SIGTERM): the folder is checked at the start and
# made when the first result is written (it was made at the start, and a signal runs no destructor).
# The run is stopped once it says it is fitting (its folder checked), long before its first result.
stopped_run_leaves_no_folder() {
  local sig=$1 rc pid
  : >"$work/stopped.err"
  timeout -s KILL 60 "$placement_oracle" --trace "$work/esft" --nodes 2 --gpus 2 --anneal 1000000 --redundant 0 \
    --slacks 0.1 --out "$work/stopped_$sig/a/b" >/dev/null 2>"$work/stopped.err" &
  pid=$! # timeout's, which passes the signal on
  for _ in $(seq 400); do
    grep -q 'fitting maps' "$work/stopped.err" && break
    sleep 0.05
  done
  if ! grep -q 'fitting maps' "$work/stopped.err"; then
    echo "placement_oracle did not start fitting in 20 s: $(cat "$work/stopped.err")" >&2
    kill -s KILL "$pid"
    wait "$pid"
    return 1
  fi
  kill -s "$sig" "$pid"
  wait "$pid"
  rc=$?
  if [ "$rc" -ne $((128 + $(kill -l "$sig"))) ]; then
    echo "placement_oracle ended with status $rc, not by SIG$sig: $(cat "$work/stopped.err")" >&2
    return 1
  fi
  [ ! -e "$work/stopped_$sig" ] || { echo "SIG$sig left $(find "$work/stopped_$sig")" >&2 && return 1; }
}
check 'a run stopped by SIGINT leaves no results folder' stopped_run_leaves_no_folder INT
check 'a run stopped by SIGTERM leaves no results folder' stopped_run_leaves_no_folder TERM
# A folder that cannot be made is still said before the run: a file where a parent should be, a
# folder that takes no entries.
locus=$drift
refused '^drift: usage error: --phases: "law,,summary" has an empty item' --phases law,,summary
refused "plain/sub: cannot be made the results folder: $work/plain is not a folder" --trace "$work/esft" \
  --out "$work/plain/sub"
mkdir "$work/locked" && chmod 500 "$work/locked"
if [ "$(id -u)" -ne 0 ]; then # root may write anywhere
  refused "locked/new: cannot be made the results folder: $work/locked: Permission denied" --trace "$work/esft" \
    --out "$work/locked/new"
fi
locus=$placement_oracle
# The results say what the reader controls, not which source file holds what: comm_volume.md said
# the synthetic rows "appear when locus/trace/synthesizer.hpp is present" (--synthetic decides).
locus=$comm_volume
succeeds --trace "$work/esft" --only 2x2 --synthetic 0 --out "$work/cv"
check 'comm_volume.md names no source file' bash -c "! grep -Eq '[a-z_]+\.(hpp|cuh|cpp|cu)\b' '$work/cv/comm_volume.md'"
check 'comm_volume.md says --synthetic 0 left the synthetic rows out' \
  grep -q 'synthetic rows .* are left out (`--synthetic 0`' "$work/cv/comm_volume.md"
# Without the 4x2 rows there is no domain accuracy: it was reported as 0.0%.
check 'a 2x2 run reports no domain accuracy' grep -q '"domain_accuracy_4x2": null' "$work/cv/comm_volume.json"
# A prefill longer than every request: the planner's refusal named a library function.
refused '^comm_volume: configuration error: --prefill-tokens 100000 leaves no decode token: the longest request' \
  --trace "$work/esft" --prefill-tokens 100000 --out "$work/cv_prefill"
# A results file names what a target is, not the tracker's number ("## Targets (issue 5)").
check 'comm_volume.md names its targets, no issue number' bash -c \
  "grep -q '^## Targets: inter-node bytes and GPU balance' '$work/cv/comm_volume.md' &&
   ! grep -Eiq 'issue [0-9]' '$work/cv/comm_volume.md'"
locus=$placement_oracle
# A list option's value that is not a number names the option and what it takes (CLI11 said "Could not
# convert: --home-caps = 0.1,x"), after the program's name like every failure (CLI11's text came alone).
refused '^placement_oracle: usage error: --home-caps: "x" is not a number; it takes a comma-separated list' --home-caps 0.1,x
refused '^placement_oracle: usage error: --redundant: "x" is not a whole number >= 0 .*; it takes a comma-separated list' --redundant 1,x
refused '^placement_oracle: usage error: --slacks: "nan" is not a finite number >= 0' --slacks 0.1,nan
# A long run says on stderr what it is doing; stdout carries the results.
progress_on_stderr() {
  "$placement_oracle" --trace "$work/esft" --nodes 2 --gpus-per-node 2 --anneal 10 --redundant 0 --slacks 0.1 \
    --out "$work/po" >"$work/po.out" 2>"$work/po.err" || { cat "$work/po.err" >&2; return 1; }
  grep -q '^placement_oracle: fitting maps: 4 rows' "$work/po.err" && ! grep -q '^placement_oracle:' "$work/po.out"
}
check 'placement_oracle says its progress on stderr' progress_on_stderr
# The driver's name for the option (--gpus-per-node) and the program's first one (--gpus) both work.
ok 'gpus-per-node,--gpus UINT' --help
check 'placement_oracle.md names no issue number' bash -c \
  "grep -q '^# How low can copies go' '$work/po/placement_oracle.md' && ! grep -Eiq 'issue [0-9]' '$work/po/placement_oracle.md'"
cases_end
