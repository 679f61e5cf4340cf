#!/usr/bin/env bash
# On-line re-planning through the driver (`simulate --replan-every / --drift-every`, `map replan`):
# a saved plan and grouping re-plan as the same plan fitted in the run (a saved grouping keeps no
# training labels: both place the training traffic by classifying it), a grouper that ignores the
# grouping model re-plans on the window alone (the model's nodes are not where it puts requests,
# and a drift check against them fired on stationary traffic), and a budget written as a decimal
# share of the slots counts in full.
# Usage: online_replan_cases.sh <locus binary> <scratch folder>
set -u
source "$(dirname "$0")/../support/case_runner.sh"
cases_begin "$1" "$2"

"$locus" trace synth --out "$work/mid.bin" --experts 32 --top-k 4 --layers 4 --domains 3 --requests 400 \
  --mean-length 80 --seed 5 --threads 1 -q >/dev/null &&
  "$locus" plan --trace "$work/mid.bin" --placement locality --copies flat --out "$work/p.json" -q >/dev/null ||
  { echo "FAIL: setup" >&2; exit 1; }

# The `online` block of a simulate run's report (its figures, not the static run's or the time).
online() {
  timeout 60 "$locus" simulate --trace "$work/mid.bin" "$@" -q | sed -n '/^re-planned on line/,/^  moved/p'
}
args=(--grouper workload_aware --replan-every 20 --drift-every 5)
online --placement locality "${args[@]}" >"$work/fitted.txt"
online --map "$work/p.json" --grouping "$work/p.grouping.json" "${args[@]}" >"$work/saved.txt"
check "a run re-plans" grep -Eq '^re-planned on line: [1-9]' "$work/fitted.txt"
same "$work/fitted.txt" "$work/saved.txt"
# Stationary traffic (one trace split at random) grouped round robin: no drift to re-plan for.
ok 're-planned on line: 0 re-plans \(0 on drift' simulate --trace "$work/mid.bin" --placement locality \
  --grouper round_robin --drift-every 5 --replan-window 20 --balance-trigger 0

# 100 slots: a budget of 0.57 is 57 of them (0.57 × 100 is 56.99999999999999 in binary).
"$locus" trace synth --out "$work/e100.bin" --experts 100 --top-k 4 --layers 1 --requests 200 --mean-length 60 \
  --seed 4 --threads 1 -q >/dev/null &&
  "$locus" plan --trace "$work/e100.bin" --nodes 2 --gpus-per-node 2 --placement linear --out "$work/l.json" -q >/dev/null ||
  { echo "FAIL: setup" >&2; exit 1; }
ok 'of 57 slots budgeted' map replan "$work/l.json" --trace "$work/e100.bin" --budget 0.57 --out "$work/r.json"
ok 'of 29 slots budgeted' map replan "$work/l.json" --trace "$work/e100.bin" --budget 0.29 --out "$work/r.json"
# Weights moved in the unit that shows them: a few experts of 3 MB are megabytes, not "0.00 GB".
ok 'slots budgeted moved \([0-9.]+% of all slots, [0-9.]+ MB of weights\)' map replan "$work/l.json" \
  --trace "$work/e100.bin" --budget 0.29 --expert-bytes 3000000 --out "$work/r.json"
# A budget of one slot moves nothing (a move swaps two experts): refused, naming the least that moves.
refused '--budget 0.01 of the 100 slots \(all layers\) is 1 slot; a move swaps two experts, so nothing could move: give at least 0.02' \
  map replan "$work/l.json" --trace "$work/e100.bin" --budget 0.01 --out "$work/r.json"
ok 'of 0 slots budgeted moved' map replan "$work/l.json" --trace "$work/e100.bin" --budget 0 --out "$work/r.json"
refused '--replan-budget 0.001 of the 128 slots \(all layers\) is 0 slots; .*give at least 0.015625' \
  simulate --trace "$work/mid.bin" --map "$work/p.json" --replan-every 20 --replan-budget 0.001
# Without --budget a plan of fewer than 20 slots re-plans a pair (10% of them is under two), as the
# help's default says; given, a budget that small is refused as above.
"$locus" trace synth --out "$work/e8.bin" --experts 8 --top-k 2 --layers 1 --requests 200 --mean-length 60 \
  --seed 4 --threads 1 -q >/dev/null &&
  "$locus" plan --trace "$work/e8.bin" --nodes 2 --gpus-per-node 2 --placement linear --out "$work/l8.json" -q >/dev/null ||
  { echo "FAIL: setup" >&2; exit 1; }
ok 'of 2 slots budgeted moved' map replan "$work/l8.json" --trace "$work/e8.bin" --out "$work/r8.json"
refused '--budget 0.1 of the 8 slots \(all layers\) is 0 slots' map replan "$work/l8.json" --trace "$work/e8.bin" \
  --budget 0.1 --out "$work/r8.json"
ok 'at least a pair of slots' map replan --help
cases_end
