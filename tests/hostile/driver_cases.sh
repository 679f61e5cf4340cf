#!/usr/bin/env bash
# Hostile command-line values and inputs through the `locus` driver: every case must end with a
# clear one-line message on stderr and exit status 1 or 2 (never a signal, an abort, an
# out-of-memory exit or a stack trace), under a 1 GiB address-space limit, within seconds.
# Usage: driver_cases.sh <locus binary> <scratch folder>
set -u
source "$(dirname "$0")/../support/case_runner.sh"
cases_begin "$1" "$2"
ulimit -v 1048576 # KiB: 1 GiB of address space for every case

# A small top-6 ESFT folder and a binary trace made from it.
"$locus" trace synth --experts 16 --top-k 6 --layers 2 --domains 2 --tokens 4000 --seed 3 --out "$work/t.bin" \
  >/dev/null 2>&1 || { echo "FAIL: synth" >&2; exit 1; }

# Absurd topologies and sizes: refused before anything is allocated.
refused '--nodes: Value 1000000000 not in range 1 to 65536' plan --trace "$work/t.bin" --nodes 1000000000 --out "$work/m.json"
refused '--nodes: Value 18446744073709551615 not in range 1 to 65536' plan --trace "$work/t.bin" --nodes 18446744073709551615 --gpus-per-node 2 --out "$work/m.json"
refused '--gpus-per-node: Value 65537 not in range 1 to 65536' simulate --trace "$work/t.bin" --gpus-per-node 65537
refused 'topology: 65536 nodes × 2 GPUs per node exceed 65536 ranks' plan --trace "$work/t.bin" --nodes 65536 --gpus-per-node 2 --out "$work/m.json"
refused 'redundant slots per rank is 1000000000000' plan --trace "$work/t.bin" --redundant-slots 1000000000000 --out "$work/m.json"
refused 'redundant slots per rank is 18446744073709551615' plan --trace "$work/t.bin" --redundant-slots 18446744073709551615 --out "$work/m.json"
"$locus" trace synth --experts 256 --top-k 8 --layers 8 --domains 2 --tokens 500 --seed 3 --out "$work/wide.bin" \
  >/dev/null 2>&1 || { echo "FAIL: synth" >&2; exit 1; }
refused 'plan: 65536 nodes' plan --trace "$work/wide.bin" --nodes 65536 --gpus-per-node 1 --out "$work/m.json"
refused 'topology: 65536 nodes × 2 GPUs per node exceed 65536 ranks' plan --trace "$work/t.bin" --nodes 65536 --gpus-per-node 2 --out "$work/m.json"
refused 'hidden' simulate --trace "$work/t.bin" --hidden 18446744073709551615
# A mistyped option is named with the closest one, before CLI11 reads its value as a positional.
refused 'locus plan has no option --tarce \(did you mean --trace\?; see locus plan --help\)' plan --tarce "$work/t.bin"
refused 'locus map export has no option --too \(did you mean --to\?' map export m.json --too sglang
refused 'locus simulate has no option --bogus \(see locus simulate --help\)' simulate --bogus=1
refused 'standard input \(-\) is given more than once as a trace' plan --trace - --trace - --out "$work/twice.json" </dev/null
refused 'not a whole number' plan --trace "$work/t.bin" --nodes 1e9 --out "$work/m.json"
refused '0 is not allowed' plan --trace "$work/t.bin" --clusters 0 --out "$work/m.json"
# A relative input that is not there names the folder it was looked for from (the README's
# ../shared/traces/esft exists only beside this project's checkout).
refused 'no_such_folder/t.bin: no such file or folder \(looked for from /' simulate --trace no_such_folder/t.bin
refused '^locus: I/O error: /no_such_folder/t.bin: no such file or folder$' simulate --trace /no_such_folder/t.bin
ok 'the grouping model has [0-9]+ clusters, not --clusters 100000: one per training request at most' plan \
  --trace "$work/t.bin" --placement locality --clusters 100000 --out "$work/m_k.json"
refused '--anneal: Value 18446744073709551615 not in range 0 to 1048576' plan --trace "$work/t.bin" --placement locality --anneal 18446744073709551615 --out "$work/m.json"
refused 'trace synth: about .* GB, this machine has' trace synth --experts 16 --top-k 2 --layers 2 --tokens 18446744073709551615 --out "$work/s.bin"
refused '--expert-read-us: 1e308 is not a number from 0 to 1e\+09' simulate --trace "$work/t.bin" --expert-read-us 1e308
refused '--threads: Value 18446744073709551615 not in range 0 to 4096' trace stats "$work/t.bin" --threads 18446744073709551615
refused 'table entries \(2 GiB per table: fewer experts, layers or domains\)' trace synth --experts 65536 --layers 4096 \
  --out "$work/s.bin"
# A topology whose replica tables no machine here holds is refused before any work, naming the
# options (it grew until killed); skipped on a machine with the 86 GB it needs.
if [ "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" -lt 80000000 ]; then
  "$locus" trace synth --experts 65536 --top-k 64 --layers 2 --requests 40 --mean-length 50 --out "$work/wide.bin" \
    >/dev/null 2>&1 || case_fail "trace synth (65,536 experts)"
  refused 'simulating 256 nodes × 256 GPUs \(--nodes, --gpus-per-node, or a map.s own\) with 65536 experts: .* need about 85.9 GB of memory' \
    simulate --trace "$work/wide.bin" --nodes 256 --gpus-per-node 256
  refused 'simulating 256 nodes × 256 GPUs .* with 65536 experts: .* need about' \
    compare --trace "$work/wide.bin" --nodes 256 --gpus-per-node 256
fi
# synth --fit splits requests at --prefill-tokens, recorded phases or not: the refusal says so.
refused 'the fit splits every request there \(the phases a trace records are not used\)' trace synth \
  --fit "$(dirname "$0")/../data/trace/decode_only.jsonl" --requests 5 --out "$work/s.bin"
# At a test fraction of 0 or 1 no seed moves a request: the message does not suggest one; a trace
# read from - is <stdin>, as in every other message.
refused 'requests of [^ ]*t.bin in the training split \(raise --test-fraction\)$' simulate --trace "$work/t.bin" --test-fraction 0
refused 'in the test split \(lower --test-fraction\)$' plan --trace "$work/t.bin" --test-fraction 1 --out "$work/m.json"
check "a trace read from standard input is named <stdin>" bash -c "'$locus' simulate --trace - --test-fraction 0 \
  <'$work/t.bin' 2>&1 >/dev/null | grep -q 'requests of <stdin> in the training split'"
# I/O failures say why.
refused '[^ ]*no-such-esft: no such folder \(expected an ESFT expert_scores folder\)' trace import "$work/no-such-esft" \
  --format esft --out "$work/x.bin"
refused 't.bin: not a directory \(expected an ESFT expert_scores folder\)' trace import "$work/t.bin" --format esft \
  --out "$work/x.bin"
check "help that cannot be written fails" bash -c "! '$locus' plan --help >/dev/full 2>'$work/help_err.txt' &&
  grep -q 'standard output: write failed' '$work/help_err.txt'"
refused '--train-requests [^ ]*nope.txt: cannot open: No such file or directory' plan --trace "$work/t.bin" \
  --train-requests "$work/nope.txt" --out "$work/m.json"
check "a folder as standard input says why it cannot be read" bash -c "'$locus' trace stats - <'$work' 2>&1 |
  grep -q '<stdin>: read failed: Is a directory'"
# Non-finite or negative reals: named as what they are.
for v in -1 nan inf -inf; do
  refused "arrival-rate.*not a finite number >= 0" simulate --trace "$work/t.bin" --arrival-rate "$v"
  refused "expert-read-us: .* is not a number from 0 to 1e\+09" simulate --trace "$work/t.bin" --expert-read-us "$v"
  refused "expert-read-us: .* is not a number from 0 to 1e\+09" compare --trace "$work/t.bin" --expert-read-us "$v"
  refused "balance-shift.*not a finite number >= 0" plan --trace "$work/t.bin" --balance-shift "$v" --out "$work/m.json"
  refused "fill-slack.*not a finite number >= 0" plan --trace "$work/t.bin" --fill-slack "$v" --out "$work/m.json"
  refused "hedge-class-spread: $v is not a number from 0 to 2" plan --trace "$work/t.bin" --hedge-class-spread "$v" --out "$work/m.json"
  refused "hedge-cost-budget.*not a finite number >= 0" plan --trace "$work/t.bin" --hedge-cost-budget "$v" --out "$work/m.json"
done
refused "test-fraction" plan --trace "$work/t.bin" --test-fraction nan --out "$work/m.json"
# Maps that used to abort on a JSON type error, or truncate ids.
printf '{"format": 5}' >"$work/format5.json"
refused '"format" is 5' map check "$work/format5.json"
printf '{"format": "locus-expert-map", "version": "1"}' >"$work/version1.json"
refused 'unsupported version "1"' map check "$work/version1.json"
printf '{"format": "locus-expert-map", "version": 1, "experts": 2, "ranks": 1, "slots_per_rank": 2, "layers": [[[0, 4294967297]]]}' >"$work/bigid.json"
refused 'holds expert 4294967297' map check "$work/bigid.json"
printf '{"format": "locus-expert-map", "version": 1, "experts": 2, "ranks": 1, "slots_per_rank": 1099511627776, "layers": [[[0, 1]]]}' >"$work/slots.json"
refused 'slots_per_rank' map check "$work/slots.json"
printf '{"format": "locus-expert-map", "version": 1, "exp' >"$work/cut.json"
refused 'looks truncated' map check "$work/cut.json"
# Two copies of expert 1 on GPU 0 (as EPLB's packing may place them): said, and counted in the JSON.
printf '{"format": "locus-expert-map", "version": 1, "experts": 3, "ranks": 2, "slots_per_rank": 2, "layers": [[[1, 1], [0, 2]], [[0, 1], [2, 1]]]}' >"$work/twice.json"
ok '^1 of them holds a second copy of an expert on a GPU that has it already: it balances nothing' map check "$work/twice.json"
ok '"same_gpu_copies": 1' map check "$work/twice.json" --json -
printf '{"format": "locus-expert-map", "version": 1, "experts": 3, "ranks": 2, "slots_per_rank": 2, "layers": [[[0, 1], [2, 1]]]}' >"$work/apart.json"
ok '"same_gpu_copies": 0' map check "$work/apart.json" --json -
# Symbolic-link loops and odd outputs.
ln -s "$work/loop" "$work/loop"
refused 'loop|Too many levels' trace import "$work/loop" -o "$work/x.bin"
refused 'loop|Too many levels' plan --trace "$work/loop" --out "$work/m.json"
refused 'loop' trace import "$work/t.bin" -o "$work/loop"
refused 'it is a directory' trace import "$work/t.bin" -o "$work"
refused 'folder does not exist' trace import "$work/t.bin" -o "$work/none/x.bin"
refused 'must be a regular file' trace import "$work/t.bin" -o /dev/null --verify
succeeds trace import "$work/t.bin" -o /dev/null
# Domains: repeated, outside the root, and top-k below the data's.
"$locus" trace import "$work/t.bin" -o "$work/t2.bin" >/dev/null
mkdir -p "$work/esft"
# An ESFT folder written by the library through the synthesizer's binary trace is not available
# from the driver, so build a tiny top-6 one: 2 domains x 2 layers x 40 lines of 8 tokens.
python3 "$(dirname "$0")/../support/tiny_esft.py" "$work/esft" 8
refused 'domain "law" is given twice' trace import "$work/esft" -o "$work/x.bin" --domains law law
refused 'not a folder name inside the root' trace import "$work/esft" -o "$work/x.bin" --domains ../esft
refused 'looks like top-6' trace import "$work/esft" -o "$work/x.bin" --top-k 3
succeeds trace import "$work/esft" -o "$work/x.bin"
# --verbose adds the source location (from the library's include/ on, no build folders), and only then.
verbose_names_location() {
  "$locus" map check "$work/format5.json" --verbose 2>&1 >/dev/null | grep -q ' \[include/locus/[a-z_/]*\.hpp:[0-9]*\]'
}
check "--verbose gives no source location" verbose_names_location
# trace report: domain names that are not file names, and one called "all".
report_has_aggregate() {
  if ! "$locus" trace report "$work/t.bin" --out "$work/report" --no-render >/dev/null 2>"$work/err"; then
    echo "trace report: $(cat "$work/err")" >&2
    return 1
  fi
  ls "$work/report" | grep -q '^load_all.csv$' || { echo "report has no load_all.csv" >&2; return 1; }
}
check "trace report" report_has_aggregate
# A report that fails before writing anything leaves no folder of its own behind.
report_leaves_no_folder() {
  ! "$locus" trace report "$work/absent.bin" --out "$work/no_report" --no-render >/dev/null 2>&1 &&
    [ ! -e "$work/no_report" ]
}
check "trace report removes its empty folder" report_leaves_no_folder
# ... nor the parents it made for it; a report folder is made with its parents (as the benchmarks'
# results folders are).
refused 'absent.bin' trace report "$work/absent.bin" --out "$work/no_parent/no_report" --no-render
check "trace report removes the parents it made" test ! -e "$work/no_parent"
succeeds trace report "$work/t.bin" --out "$work/deep/er/report" --no-render
check "trace report makes its folder's parents" test -f "$work/deep/er/report/load_all.csv"
# A rendering script that exits 0 without drawing a figure is no rendering: refused, nothing written.
refused 'drew no figure; the report folder is unchanged' trace report "$work/t.bin" --out "$work/blank_report" \
  --script /dev/null
check "a report that drew nothing leaves no folder" test ! -e "$work/blank_report"
python3 - "$work/odd.jsonl" <<'PY'
import json, random, sys
rng = random.Random(7)
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"type": "meta", "num_experts": 8, "top_k": 2}) + "\n")
    for req, dom in enumerate(["all", "x/../y", "new\nline", "law"]):
        for tok in range(40):
            for layer in range(2):
                ids = rng.sample(range(8), 2)
                f.write(json.dumps({"req_id": req, "token_idx": tok, "layer": layer, "topk_ids": ids,
                                    "topk_weights": [0.6, 0.4], "domain": dom}) + "\n")
PY
odd_names_report() {
  local bad=0
  if ! "$locus" trace import "$work/odd.jsonl" -o "$work/odd.bin" >/dev/null 2>"$work/err" ||
    ! "$locus" trace report "$work/odd.bin" --out "$work/odd_report" --no-render --prefill-tokens 8 >/dev/null \
      2>"$work/err"; then
    echo "report of odd domain names: $(cat "$work/err")" >&2
    return 1
  fi
  for f in load_all.csv load_domain0_all.csv load_domain1_x_.._y.csv load_domain2_new_line.csv load_law.csv; do
    [ -f "$work/odd_report/$f" ] || { echo "report lacks $f: $(ls "$work/odd_report")" >&2; bad=1; }
  done
  [ ! -e "$work/y.csv" ] && [ ! -e "$work/odd_report/load_x" ] || { echo "report wrote outside its folder" >&2; bad=1; }
  # The aggregate holds all three domains: its first row is not domain 0's.
  cmp -s "$work/odd_report/load_all.csv" "$work/odd_report/load_domain0_all.csv" &&
    { echo "domain \"all\" overwrote the aggregate" >&2; bad=1; }
  return $bad
}
check "trace report of odd domain names" odd_names_report

# A new user's session (2026-12-05): numbers that used to fill the machine's memory or hang, and
# outputs that used to replace an input or each other, or fail only after the work.
"$locus" plan --trace "$work/t.bin" --placement linear --out "$work/lin.json" >/dev/null
refused '--first-moe-layer: Value 4294967295 not in range 0 to 4095' map export "$work/lin.json" --to sglang --first-moe-layer 4294967295 --out "$work/q.json"
refused '--num-hidden-layers: Value 100000000 not in range 1 to 4096' map export "$work/lin.json" --to sglang --num-hidden-layers 100000000 --out "$work/q.json"
refused 'after step 10\^18' simulate --trace "$work/t.bin" --arrival-rate 1e-300
ok '^simulated [0-9,]+ requests' simulate --trace "$work/t.bin" --arrival-rate 1e-9
ok 'layer time estimate +[0-9.]+ us \(model; 7\.50 us per expert read\)' simulate --trace "$work/t.bin" --expert-read-us 7.5
ok 'layer time estimate +[0-9.]+ us \(model; expert weight reads not counted\)' simulate --trace "$work/t.bin"
# Redundant experts over all GPUs, as EPLB counts them: 8 for 16 experts on 8 GPUs is one slot per
# GPU; a total that does not split evenly names the nearest that do; one count or the other.
ok '"redundant_experts": 8,' plan --trace "$work/t.bin" --placement eplb --redundant-experts 8 --out "$work/re8.json" --json -
ok '"redundant_slots": 1,?$' plan --trace "$work/t.bin" --placement eplb --redundant-experts 8 --out "$work/re8.json" --json -
check "--redundant-experts 8 plans as --redundant-slots 1" bash -c "'$locus' plan --trace '$work/t.bin' --placement eplb \
  --redundant-slots 1 --out '$work/rs1.json' >/dev/null && cmp -s '$work/re8.json' '$work/rs1.json'"
refused '5 redundant experts: .* 16 experts and the redundant ones must split evenly over the 8 GPUs \(nearest: 0 or 8\)' plan --trace "$work/t.bin" --placement eplb --redundant-experts 5 --out "$work/m.json"
refused '--redundant-slots excludes --redundant-experts' plan --trace "$work/t.bin" --redundant-slots 1 --redundant-experts 8 --out "$work/m.json"
refused '12 redundant experts' compare --trace "$work/t.bin" --redundant-experts 12
refused 'at most 112' simulate --trace "$work/t.bin" --placement eplb --redundant-experts 1000
# Balance over windows of steps: one step is the per-step figure, a window past the run's end the
# run's; the largest count is taken (one window), not refused or wrapped.
window_ends() {
  "$locus" simulate --trace "$work/t.bin" --placement eplb --balance-window 1 --json "$work/w1.json" -q >/dev/null &&
    "$locus" simulate --trace "$work/t.bin" --placement eplb --balance-window 18446744073709551615 \
      --json "$work/wmax.json" -q >/dev/null &&
    python3 - "$work/w1.json" "$work/wmax.json" <<'PY'
import json, sys
one, whole = (json.load(open(p)) for p in sys.argv[1:])
assert abs(one["gpu_imbalance_window"] - one["gpu_imbalance_step_weighted"]) < 1e-12, one
assert abs(whole["gpu_imbalance_window"] - whole["gpu_imbalance_aggregate"]) < 1e-12, whole
assert one["gpu_imbalance_step_weighted"] > whole["gpu_imbalance_aggregate"], (one, whole)
PY
}
check "--balance-window 1 is per step, past the run's end over the run" window_ends
# The re-planned replay reports the same windows: one step is its own per-step figure.
online_window() {
  "$locus" simulate --trace "$work/t.bin" --replan-every 100 --balance-window 1 --json "$work/ow.json" -q >/dev/null &&
    python3 - "$work/ow.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["online"]
assert o["balance_window"] == 1, o
assert abs(o["gpu_imbalance_window"] - o["gpu_imbalance_step_weighted"]) < 1e-12, o
PY
}
check "the re-planned replay's --balance-window 1 is its per-step figure" online_window
check "the re-planned replay prints its window line too" bash -c "[ \"\$('$locus' simulate --trace '$work/t.bin' \
  --replan-every 100 --balance-window 4 | sed -n '/^re-planned on line/,\$p' |
  grep -cE '^  GPU max/mean per window +[0-9.]+ \(windows of 4 simulated steps\)$')\" = 1 ]"
ok 'GPU max/mean per window +[0-9.]+ \(windows of 1 simulated step\)$' simulate --trace "$work/t.bin" --balance-window 1
ok 'GPU max/mean per window +[0-9.]+ \(windows of 18,446,744,073,709,551,615 simulated steps\)$' simulate --trace "$work/t.bin" --balance-window 18446744073709551615
# The balance hedges: 0 (off) is taken with any planner, a count only where it applies.
succeeds plan --trace "$work/t.bin" --placement eplb --redundant-slots 1 --hedge-replicas 0 --out "$work/h0.json"
ok '^[0-9]+ replicas over the layers, [0-9]+ of them balance hedges' plan --trace "$work/t.bin" --placement locality \
  --redundant-slots 1 --out "$work/h1.json"
ok '"hedge_copies": ?0' plan --trace "$work/t.bin" --placement locality --redundant-slots 1 --hedge-replicas 0 \
  --out "$work/h2.json" --json -
# --json records the options the plan was made with (spread and byte budget included).
ok '"hedge_class_spread": ?0.6' plan --trace "$work/t.bin" --placement locality --redundant-slots 1 \
  --hedge-class-spread 0.6 --hedge-cost-budget 0 --out "$work/h3.json" --json -
refused '--hedge-replicas applies to --placement locality, not eplb' plan --trace "$work/t.bin" --placement eplb \
  --redundant-slots 1 --hedge-replicas 4 --out "$work/h.json"
refused '--hedge-replicas spends replica slots: it needs --redundant-slots' plan --trace "$work/t.bin" \
  --placement locality --hedge-replicas 4 --out "$work/h.json"
ok 'locus +locality +1 ' compare --trace "$work/t.bin" --nodes 2 --gpus-per-node 2 --anneal 0 --hedge-replicas 0 -q
refused 'no decode tokens' simulate --trace "$work/t.bin" --prefill-tokens 100000
refused 'no decode tokens' compare --trace "$work/t.bin" --prefill-tokens 100000
refused 'acts before its end' simulate --trace "$work/t.bin" --replan-every 10 --replan-window 18446744073709551615
refused 'apply with --replan-every' simulate --trace "$work/t.bin" --replan-window 5
refused 'apply with --replan-every' simulate --trace "$work/t.bin" --replan-slack 0.2
# What --fit learnt is a result (summary and JSON); with -q nothing reaches stderr.
ok '"request_sigma"' trace synth --fit "$work/t.bin" --tokens 2000 --out "$work/fit.bin" --json -
ok '^fitted: request σ' -q trace synth --fit "$work/t.bin" --tokens 2000 --out "$work/fit.bin"
check "trace synth -q --fit writes nothing on stderr" \
  test -z "$("$locus" -q trace synth --fit "$work/t.bin" --tokens 2000 --out "$work/fit.bin" 2>&1 >/dev/null)"
refused '--layers: Value 100000 not in range 1 to 4096' trace synth --experts 16 --top-k 2 --layers 100000 --out "$work/s.bin"
refused 'domains is 100000, expected' trace synth --experts 16 --top-k 2 --layers 2 --domains 100000 --out "$work/s.bin"
refused '--rescale: layers is 100000' trace synth --fit "$work/t.bin" --rescale 256:8:100000 --out "$work/s.bin"
refused '--layer -2 is not a layer' trace report "$work/t.bin" --layer -2 --out "$work/r2" --no-render
refused '--anneal applies to --placement locality' plan --trace "$work/t.bin" --placement linear --anneal 3 --out "$work/m.json"
refused '--fill-slack applies to --placement locality' plan --trace "$work/t.bin" --placement eplb --redundant-slots 1 --fill-slack 0.3 --out "$work/m.json"
refused '--fill-slack bounds the replica fill: it needs --redundant-slots' plan --trace "$work/t.bin" --placement locality --fill-slack 0.3 --out "$work/m.json"
succeeds plan --trace "$work/t.bin" --placement locality --redundant-slots 1 --fill-slack 0.3 --out "$work/fill.json"
refused '--hedge-class-spread: 5 is not a number from 0 to 2' plan --trace "$work/t.bin" --placement locality --redundant-slots 1 --hedge-class-spread 5 --out "$work/m.json"
refused '--hedge-cost-budget applies to --placement locality' plan --trace "$work/t.bin" --placement eplb --redundant-slots 1 --hedge-cost-budget 0 --out "$work/m.json"
refused '--hedge-class-spread shapes the balance hedges in replica slots: it needs --redundant-slots' plan --trace "$work/t.bin" --placement locality --hedge-class-spread 0.6 --out "$work/m.json"
succeeds plan --trace "$work/t.bin" --placement locality --redundant-slots 1 --hedge-class-spread 0.6 --hedge-cost-budget 0 --out "$work/spread.json"
refused '--hedge-class-spread shapes the balance hedges, which --hedge-replicas 0 turns off' plan --trace "$work/t.bin" --placement locality --redundant-slots 1 --hedge-replicas 0 --hedge-class-spread 0.6 --out "$work/m.json"
succeeds plan --trace "$work/t.bin" --placement eplb --redundant-slots 1 --hedge-class-spread 0 --out "$work/eplb0.json"
refused "--hedge-class-spread shapes the locality rows' replica slots: --redundant 0 compares none" compare --trace "$work/t.bin" --redundant 0 --hedge-class-spread 0.6
refused '--fill-slack shapes the locality rows' compare --trace "$work/t.bin" --redundant 0 --fill-slack 0.3
refused '--hedge-cost-budget shapes the balance hedges, which --hedge-replicas 0 turns off' compare --trace "$work/t.bin" --hedge-replicas 0 --hedge-cost-budget 0
refused '--grouping is the workload_aware' simulate --trace "$work/t.bin" --map "$work/lin.json" --grouping "$work/lin.json"
refused 'does not apply: --map simulates the saved plan as it is \(--grouper round_robin\)' simulate --trace "$work/t.bin" --map "$work/lin.json" --placement eplb
refused 'name the same file' plan --trace "$work/t.bin" --placement locality --out "$work/same.json" --grouping "$work/same.json"
refused 'also an input' map export "$work/lin.json" --to eplb --out "$work/lin.json"
# The same file under another spelling, a link to it, a request-id file, a file inside a trace folder.
refused 'name the same file' plan --trace "$work/t.bin" --placement locality --out "$work/same.json" --grouping "$work/./same.json"
ln -sf "$work/linked.json" "$work/link.json"
refused 'name the same file' plan --trace "$work/t.bin" --placement locality --out "$work/linked.json" --grouping "$work/link.json"
refused 'name the same file' trace synth --experts 8 --requests 3 --out "$work/c.bin" --json "$work/./c.bin"
echo 1 >"$work/ids.txt"
refused '--out [^ ]*ids.txt is also an input' plan --trace "$work/t.bin" --train-requests "$work/ids.txt" --out "$work/ids.txt"
refused 'is inside [^ ]*esft, which this command reads' plan --trace "$work/esft" --out "$work/esft/law/expert_weights_9.txt"
refused 'is inside [^ ]*esft, which this command reads' trace import "$work/esft" -o "$work/esft/law/expert_weights_1.txt"
succeeds plan --trace "$work/esft" --out "$work/esft/law/plan.json" # a name no reader takes
rm -f "$work/esft/law/plan.json" "$work/esft/law/plan.grouping.json"
# map export: the values its code holds for "the plan's own" cannot be given.
refused '--first-moe-layer: Value 18446744073709551615 not in range' map export "$work/lin.json" --to sglang --out "$work/o.json" --first-moe-layer 18446744073709551615
refused '--num-hidden-layers: Value 0 not in range' map export "$work/lin.json" --to sglang --out "$work/o.json" --num-hidden-layers 0
# write_npy PATH DESCR SHAPE VALUES...: a NumPy .npy file of little-endian int32 ('<i4') or
# float64 ('<f8') values, written here without NumPy.
write_npy() {
  python3 - "$@" <<'PY'
import struct, sys
path, descr, shape, *vals = sys.argv[1:]
head = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)
head += " " * (63 - (10 + len(head)) % 64) + "\n"
code, kind = {"<i4": ("i", int), "<f8": ("d", float)}[descr]
with open(path, "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode())
    f.write(struct.pack("<%d%s" % (len(vals), code), *[kind(v) for v in vals]))
PY
}
# Routed experts [5 tokens, 4 hidden layers, top-2] with dense layers 0 and 2 (every choice expert 0):
# the plan keeps the MoE layers' hidden indices and the hidden-layer count for the exports.
write_npy "$work/routed.npy" '<i4' '(5, 4, 2)' $(for _ in 1 2 3 4 5; do echo 0 0 1 2 0 0 2 3; done)
succeeds plan --load "$work/routed.npy" --nodes 1 --gpus-per-node 2 --placement eplb --out "$work/routed.json"
# plan's default placement reads the loads (eplb, as Python's locus.plan): linear ignored them.
ok ': eplb placement, ' plan --load "$work/routed.npy" --nodes 1 --gpus-per-node 2 --out "$work/routed_default.json"
ok ': eplb placement, ' plan --trace "$work/t.bin" --out "$work/trace_default.json"
# Dense layers 0 and 3 (every choice expert 0): the saved count says layer 3 is dense, so an export
# says nothing of MoE layers going on there; a larger count given says it.
write_npy "$work/routed03.npy" '<i4' '(20, 4, 2)' $(for _ in $(seq 20); do echo 0 0 1 2 2 3 0 0; done)
succeeds plan --load "$work/routed03.npy" --nodes 1 --gpus-per-node 2 --placement eplb --out "$work/routed03.json"
check "an export at the plan's own count says nothing of unplanned layers" \
  bash -c "'$locus' map export '$work/routed03.json' --to trtllm --out '$work/r03.yaml' 2>'$work/r03.err' >/dev/null \
  && ! grep -q 'numbering goes on' '$work/r03.err'"
check "... nor at that count given" bash -c "'$locus' map export '$work/routed03.json' --to trtllm \
  --num-hidden-layers 4 --out '$work/r03.yaml' 2>'$work/r03.err' >/dev/null && ! grep -q 'numbering goes on' '$work/r03.err'"
ok 'numbering goes on at layer 3 of the model.s 6' map export "$work/routed03.json" --to trtllm --num-hidden-layers 6 \
  --out "$work/r03.yaml"
# A [layers, experts] table names no model layer: plan says so as map check does.
write_npy "$work/table.npy" '<f8' '(3, 4)' $(seq 1 12)
ok '3 layers \(no model layer numbers saved\)' plan --load "$work/table.npy" --nodes 1 --gpus-per-node 2 \
  --placement eplb --out "$work/table.json"
ok 'no model layer numbers saved' map check "$work/table.json"
ok 'hidden layers 1..3 of 4' map export "$work/routed.json" --to sglang --out "$work/routed.sglang.json"
# map export --to locus renumbers the map's layers as the options say, and names no engine flag.
"$locus" map export "$work/routed.json" --to locus --first-moe-layer 3 --moe-layer-step 1 --num-hidden-layers 61 \
  --out "$work/renumbered.json" >"$work/renumbered.txt" 2>&1 || { echo "FAIL: export --to locus" >&2; exit 1; }
check "export --to locus prints no engine flag" bash -c "! grep -q 'pass:' '$work/renumbered.txt'"
ok 'hidden layers 3..4 of 61' map export "$work/renumbered.json" --to sglang --out "$work/renumbered.sglang.json"
# Options that would do nothing: refused, or said.
refused "--replica-slack is locality_bounded's load bound; --replica-rule locality_first does not use it" simulate --trace "$work/t.bin" --replica-slack 3
refused "--grouper round_robin does not use: add --grouper workload_aware" simulate --trace "$work/t.bin" --grouping "$work/t.bin"
refused '--clusters sizes the grouping model, which --placement linear fits only when --grouping asks for one' \
  plan --trace "$work/t.bin" --placement linear --clusters 4 --out "$work/m.json"
refused '--clusters sizes the grouping model, which --placement linear with --grouper round_robin does not fit' \
  simulate --trace "$work/t.bin" --placement linear --clusters 4
succeeds simulate --trace "$work/t.bin" --placement linear --grouper workload_aware --clusters 4
succeeds plan --trace "$work/t.bin" --placement linear --clusters 4 --grouping "$work/lin_grouping.json" --out "$work/m.json"
ok '[0-9]+ slots left empty over the layers \(linear places no replicas' plan --trace "$work/t.bin" --placement linear --redundant-slots 1 --out "$work/empty.json"
# A failing drawing leaves the other outputs of an earlier run as they were (written together or not at all).
printf '#!/bin/sh\ncase "$1" in -c) exit 0;; esac\ncat >/dev/null; exit 3\n' >"$work/failing_python"
chmod +x "$work/failing_python"
echo '{"format": "locus.compare", "earlier": 1}' >"$work/c.json"
echo earlier >"$work/c.md"
refused 'drawing [^ ]*c.png with [^ ]*failing_python failed \(exit status 3\)' compare --trace "$work/t.bin" --anneal 0 \
  --json "$work/c.json" --markdown "$work/c.md" --png "$work/c.png" --python "$work/failing_python"
check "a failed drawing keeps the earlier JSON and Markdown" \
  test "$(cat "$work/c.json")" = '{"format": "locus.compare", "earlier": 1}' -a "$(cat "$work/c.md")" = earlier -a ! -e "$work/c.png"
# An empty value is not the option left out (`--map "$MAP"` with MAP unset).
refused '--map: an empty value' simulate --trace "$work/t.bin" --map ""
refused '--fit: an empty value' trace synth --out "$work/q.bin" --fit "" --requests 2
refused '--json: an empty value' trace stats "$work/t.bin" --json ""
refused '--json=: an empty value' trace stats "$work/t.bin" --json=
# trace synth: shape-mode options with --fit, and a mean length the cut would change.
refused '--zipf sets the shape mode' trace synth --fit "$work/t.bin" --zipf 3 --requests 3 --out "$work/g.bin"
refused '--mean-length 100000 is above --max-length 16384' trace synth --experts 4 --top-k 1 --layers 1 --requests 3 --mean-length 100000 --out "$work/d.bin"
ok '3 requests, 300000 tokens' trace synth --experts 4 --top-k 1 --layers 1 --clusters 0 --requests 3 --mean-length 100000 --length-sigma 0 --max-length 200000 --out "$work/d.bin"
refused 'also an input' plan --trace "$work/t.bin" --placement linear --out "$work/t.bin"
refused 'planned for 4 nodes x 2 GPUs; this run has 8 x 1' simulate --trace "$work/t.bin" --map "$work/lin.json" --nodes 8 --gpus-per-node 1
# Without --nodes and --gpus-per-node a saved map brings its own topology (the defaults, 4 x 2, would refuse it).
"$locus" plan --trace "$work/t.bin" --nodes 8 --gpus-per-node 1 --out "$work/lin81.json" >/dev/null 2>&1 ||
  { echo "FAIL: plan 8x1" >&2; exit 1; }
succeeds simulate --trace "$work/t.bin" --map "$work/lin81.json"
refused 'planned for 8 nodes x 1 GPUs; this run has 4 x 2' simulate --trace "$work/t.bin" --map "$work/lin81.json" --nodes 4
# TensorRT-LLM statistics: layer 3 of four experts, expert 0 hot in iteration 100, expert 3 in 101;
# --load-iterations sums a window, so eplb replicates another expert.
mkdir -p "$work/trt"
printf '{"num_experts": 4}' >"$work/trt/meta_info.json"
trt_header='{"100_3":{"dtype":"I32","shape":[4],"data_offsets":[0,16]},"101_3":{"dtype":"I32","shape":[4],"data_offsets":[16,32]}}'
{
  printf "\\x$(printf %02x ${#trt_header})\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
  printf '%s' "$trt_header"
  printf '\x09\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00'
  printf '\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x09\x00\x00\x00'
} >"$work/trt/rank0.safetensors"
trt=(plan --load "$work/trt" --placement eplb --nodes 2 --gpus-per-node 1 --redundant-slots 1)
succeeds "${trt[@]}" --load-iterations 100:101 --out "$work/trt100.json"
succeeds "${trt[@]}" --load-iterations 101: --out "$work/trt101.json"
check "--load-iterations windows plan different maps" test "$(cat "$work/trt100.json")" != "$(cat "$work/trt101.json")"
refused 'no statistics of iterations from 102 on' "${trt[@]}" --load-iterations 102: --out "$work/trt.json"
refused 'usage error: --load-iterations: "5:5" holds no iteration' "${trt[@]}" --load-iterations 5:5 --out "$work/trt.json"
refused 'expected FIRST:END or FIRST:' "${trt[@]}" --load-iterations 7 --out "$work/trt.json"
refused 'load-iterations requires --load' plan --trace "$work/t.bin" --load-iterations 1:2 --out "$work/trt.json"
# A raw dump beside the counts (each token's experts) is no statistics file: left out, as
# TensorRT-LLM's reader leaves it (its 2 x 2 ids were refused as counts of 4 experts).
raw_header='{"100_3":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}'
{
  printf "\\x$(printf %02x ${#raw_header})\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
  printf '%s' "$raw_header"
  printf '\x00\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00'
} >"$work/trt/rank0_raw.safetensors"
succeeds "${trt[@]}" --load-iterations 100:101 --out "$work/trt100raw.json"
check "a raw dump beside the statistics changes nothing" cmp -s "$work/trt100.json" "$work/trt100raw.json"
rm "$work/trt/rank0_raw.safetensors"
# Engine files: SGLang reads --init-expert-location as a file only when it ends in .json; a model
# with MTP layers needs their TensorRT-LLM keys (KeyError at start-up without them).
refused 'SGLang reads --init-expert-location as a file only when its name ends in .json' \
  map export "$work/lin.json" --to sglang --out "$work/lin.sglang"
check "a refused SGLang name writes nothing" test ! -e "$work/lin.sglang"
# ... also through a link of that name to a .json file (SGLang is given the link's name).
ln -s "$work/lin_sglang_target.json" "$work/lin_link"
refused 'SGLang reads --init-expert-location as a file only when its name ends in .json' \
  map export "$work/lin.json" --to sglang --out "$work/lin_link"
succeeds map export "$work/lin.json" --to vllm --mtp-layers 1 --out "$work/v_mtp.json"
succeeds map export "$work/lin.json" --to vllm --out "$work/v_plain.json"
check "--mtp-layers leaves a vLLM file as it was (it has no MTP row)" cmp -s "$work/v_mtp.json" "$work/v_plain.json"
refused '--mtp-layers describes an engine' map export "$work/lin.json" --to locus --mtp-layers 1 --out "$work/l.json"
refused '--mtp-layers: Value 17 not in range' map export "$work/lin.json" --to trtllm --mtp-layers 17 --out "$work/t.yaml"
succeeds map export "$work/trt100.json" --to trtllm --mtp-layers 1 --out "$work/mtp.yaml"
check "the MTP layer follows the hidden layers with the trivial placement" grep -qx '  4: \[0, 1, 2, 3, 0, 1\]' "$work/mtp.yaml"
refused 'was made for 2 GPUs per node' map export "$work/lin.json" --to eplb --gpus-per-node 1 --out "$work/e.json"
succeeds map export "$work/lin.json" --to eplb --out /dev/null --json /dev/null
succeeds trace report "$work/t.bin" --out "$work/rep_new" --json "$work/rep_new/r.json" --no-render
check "trace report writes a --json inside its new folder" grep -q '"format": "locus.trace.report"' "$work/rep_new/r.json"
# trace report: the figures are drawn in a staging folder; the report replaces the earlier one only
# when they are all drawn, and leaves no staging folder behind either way.
succeeds trace report "$work/t.bin" --out "$work/rep_keep" --no-render
cp "$work/rep_keep/imbalance.csv" "$work/imbalance.before"
printf '#!/bin/sh\necho changed >"$2/imbalance.csv"; echo drawn >"$2/imbalance.png"; exit 3\n' >"$work/failing_render"
printf '#!/bin/sh\nfor f in "$2"/*.csv; do echo drawn >"${f%%.csv}.png"; done\n' >"$work/render"
chmod +x "$work/failing_render" "$work/render"
refused 'rendering the figures \([^ ]*failing_render [^ ]*failing_render\) failed \(exit status 3\); the report folder is unchanged' \
  trace report "$work/t.bin" --out "$work/rep_keep" --python "$work/failing_render" --script "$work/failing_render"
check "a failed rendering keeps the earlier report" cmp -s "$work/imbalance.before" "$work/rep_keep/imbalance.csv"
check "a failed rendering adds no figure" test ! -e "$work/rep_keep/imbalance.png"
ok 'rep_keep: CSV files written, [0-9]+ figures rendered' trace report "$work/t.bin" --out "$work/rep_keep" \
  --python "$work/render" --script "$work/render"
check "a rendered report has its figures" test "$(cat "$work/rep_keep/imbalance.png")" = drawn
check "a report leaves no staging folder" bash -c "! ls -a '$work/rep_keep' | grep -q locus-report"
refused '--json [^ ]*summary.json is a name the report writes' trace report "$work/t.bin" --out "$work/rep_keep" \
  --json "$work/rep_keep/summary.json" --no-render
refused 'acts before its end' simulate --trace "$work/t.bin" --drift-every 1000 --replan-window 1100
refused 'balance-trigger acts at the drift checks' simulate --trace "$work/t.bin" --balance-trigger 1.2
refused 'neither 0 \(off\) nor a finite number >= 1' simulate --trace "$work/t.bin" --drift-every 5 --balance-trigger 0.9
ok '"replans": ?[1-9]' simulate --trace "$work/t.bin" --replan-every 100 --drift-every 5000 --json -
cp "$work/odd.jsonl" "$work/self.jsonl"
refused 'also an input' trace import "$work/self.jsonl" -o "$work/self.jsonl"
refused '--[a-z-]*: [0-9]* is out of range \(at most 2\^64 - 1\)' simulate --trace "$work/t.bin" --batch-per-rank 99999999999999999999
refused '--[a-z-]*: [0-9]* is out of range \(at most 2\^64 - 1\)' simulate --trace "$work/t.bin" --skip-requests=18446744073709551616
refused 'cannot create a file in its folder' plan --trace "$work/t.bin" --placement linear --out /proc/m.json
refused 'unknown command "frobnicate" \(commands: compare, map, plan, simulate, trace' frobnicate
refused 'unknown command "frob" \(commands of trace: import' trace frob
printf 'n\377\376 garbage' >"$work/garbage.json"
refused "not valid JSON: parse error at line 1, column 2: .*last read: 'n\\\\xFF'$" map check "$work/garbage.json"
stats_of_two_files_and_stdin() {
  # A route log split by layer into two files, and the whole log on standard input.
  grep -v '"layer": 1' "$work/odd.jsonl" >"$work/odd_l0.jsonl"
  { head -1 "$work/odd.jsonl"; grep '"layer": 1' "$work/odd.jsonl"; } >"$work/odd_l1.jsonl"
  "$locus" trace stats "$work/odd_l0.jsonl" "$work/odd_l1.jsonl" --json - >"$work/s2.json" || return 1
  "$locus" trace stats - --json - <"$work/odd.jsonl" >"$work/s1.json" || return 1
  grep -q '"layers": 2' "$work/s2.json" && grep -q '"layers": 2' "$work/s1.json"
}
check "trace stats reads what its help says" stats_of_two_files_and_stdin
# A binary trace on standard input is read as one ("invalid JSON" was all stdin gave but route JSONL),
# from a pipe too.
binary_on_stdin() {
  "$locus" trace stats "$work/t.bin" --json - >"$work/sf.json" || return 1
  "$locus" trace stats - --json - <"$work/t.bin" >"$work/ss.json" || return 1
  cat "$work/t.bin" | "$locus" trace stats - --json - >"$work/sp.json" || return 1
  # The same statistics; only the input's name may differ.
  diff <(grep -v '"trace"\|"path"\|"input' "$work/sf.json") <(grep -v '"trace"\|"path"\|"input' "$work/ss.json") >&2 &&
    cmp -s "$work/ss.json" "$work/sp.json" && grep -q '"layers": 2' "$work/ss.json"
}
check "trace stats reads a binary trace on stdin" binary_on_stdin
# A command word missing names the commands there are (CLI11 said "A subcommand is required").
refused '^locus: usage error: a command is required \(commands: compare, map, plan, simulate, trace; see --help\)$'
refused '^locus: usage error: map needs a command \(commands of map: check, export, replan; see --help\)$' map
refused '^locus: usage error: trace needs a command \(commands of trace: import, stats, synth, report; see --help\)$' trace
# A bad value of compare's --transport list is a usage error (exit 2), as simulate's --transport is;
# it was a configuration error (exit 1) found after the trace was read.
bad_transport_exits_2() {
  local rc
  "$locus" compare --synthetic-requests 16 --transport flat,ring >/dev/null 2>"$work/tr.err"
  rc=$?
  [ "$rc" -eq 2 ] && grep -q '^locus: usage error: --transport: unknown transport "ring"' "$work/tr.err"
}
check "compare --transport flat,ring exits 2" bad_transport_exits_2
check "trace import reads a binary trace on stdin" bash -c "'$locus' trace import - -o '$work/stdin.bin' <'$work/t.bin' >/dev/null"
same "$work/t.bin" "$work/stdin.bin"
printf 'LOCUS' >"$work/short.bin"
refused '<stdin>: offset 5: file ends inside the magic' trace stats - <"$work/short.bin"
no_partial_outputs() {
  rm -f "$work/x.json" "$work/c.json"
  "$locus" plan --trace "$work/t.bin" --placement locality --out "$work/x.json" --grouping "$work/none/g.json" \
    2>/dev/null && return 1
  "$locus" compare --synthetic-requests 40 --json "$work/c.json" --markdown "$work/none/c.md" 2>/dev/null && return 1
  [ ! -e "$work/x.json" ] && [ ! -e "$work/c.json" ] || { echo "a refused run left an output behind" >&2; return 1; }
}
check "outputs are checked before the work" no_partial_outputs
# A second user's session (review-cli). --png writes as every output does: through a symbolic link
# to its file and into a device (the figure was renamed over both).
png_goes_through_links_and_devices() {
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || return 0 # nothing to draw with: the case holds
  ln -sfn fig.png "$work/fig_link.png"
  "$locus" compare --synthetic-requests 16 -q --png "$work/fig_link.png" >/dev/null 2>"$work/png.err" ||
    { cat "$work/png.err" >&2; return 1; }
  [ -L "$work/fig_link.png" ] && [ -s "$work/fig.png" ] || { echo "--png replaced its symbolic link" >&2; return 1; }
  mknod "$work/null_device" c 1 3 2>/dev/null || return 0 # only root makes a device: the rest holds
  "$locus" compare --synthetic-requests 16 -q --png "$work/null_device" >/dev/null 2>"$work/png.err" ||
    { cat "$work/png.err" >&2; return 1; }
  [ -c "$work/null_device" ] || { echo "--png replaced the device it was to write into" >&2; return 1; }
}
check "--png writes through a symbolic link and into a device" png_goes_through_links_and_devices
# Only --json takes "-" for stdout: another output named "-" was a file no other output was checked
# against (--out - --grouping - kept the grouping alone).
refused '--out -: only --json writes to standard output' plan --trace "$work/t.bin" --placement locality --out - \
  --grouping -
refused '--grouping -: only --json writes to standard output' plan --trace "$work/t.bin" --placement locality \
  --out "$work/dash.json" --grouping -
refused '--out -: only --json writes to standard output' trace import "$work/t.bin" -o -
refused '--markdown -: only --json writes to standard output' compare --synthetic-requests 16 --markdown - --json -
check "a refused \"-\" leaves no file called -" test ! -e ./- -a ! -e "$work/-"
# Any finite --replica-slack (1e9 and above were refused once the plan was made, as not finite).
ok '^simulated [0-9,]+ requests' simulate --trace "$work/t.bin" --replica-rule locality_bounded --replica-slack 1e308
# Options that do not apply to the input are refused, not dropped without a word.
refused '--train-domains applies to a trace \(--trace\); a plan from --load' "${trt[@]}" --train-domains law \
  --out "$work/trt.json"
refused '--prefill-tokens applies to a trace' "${trt[@]}" --prefill-tokens 8 --out "$work/trt.json"
succeeds "${trt[@]}" --experts 4 --out "$work/trt.json"
refused 'statistics of 4 experts, not of the 5 asked for' "${trt[@]}" --experts 5 --out "$work/trt.json"
refused '--layers does not apply to [^ ]*t.bin, a binary trace' trace import "$work/t.bin" -o "$work/x.bin" --layers 5
refused '--skip-bad does not apply to [^ ]*esft, an ESFT folder' trace import "$work/esft" -o "$work/x.bin" --skip-bad
refused '--domains does not apply to [^ ]*odd.jsonl, route JSONL' trace import "$work/odd.jsonl" -o "$work/x.bin" \
  --domains law
# Values said as the option and the files are, before the work, not by a library function's name.
refused '--anneal: Value 1048577 not in range 0 to 1048576' compare --synthetic-requests 16 --anneal 1048577
refused '--rescale "-5:6:2": expected EXPERTS:TOP_K:LAYERS \(whole numbers\)' trace synth --fit "$work/t.bin" \
  --rescale -5:6:2 --out "$work/s.bin"
refused '--train-requests .*: is a folder, expected a file of request ids' plan --trace "$work/t.bin" \
  --train-requests "$work/esft" --out "$work/m.json"
refused '--load-trace [^ ]*esft has 2 layers of 64 experts; the plan in [^ ]*lin.json has 2 layers of 16' map export \
  "$work/lin.json" --to sglang --load-trace "$work/esft" --out "$work/q.json"
mkdir -p "$work/empty_esft"
refused '^locus: invalid input: [^ ]*empty_esft holds no domain folder' plan --trace "$work/empty_esft" \
  --out "$work/m.json"
# map check refuses what map export would: hidden layers that end before a MoE layer.
python3 - "$work/lin.json" "$work/hidden.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["model_layers"], d["hidden_layers"] = [1, 2], 2
json.dump(d, open(sys.argv[2], "w"))
PY
refused '"hidden_layers" is 2, but "model_layers" names hidden layer 2' map check "$work/hidden.json"
# --json takes an optional value: a trace named after it was read as the JSON output and replaced.
refused '--json [^ ]*t2.bin exists and is not a locus --json document' trace stats --json "$work/t2.bin" "$work/t.bin"
# ... and so was any JSON object: a route JSONL trace, an expert map. An earlier --json document is
# replaced, an empty file too.
cp "$(dirname "$0")/../data/trace/decode_only.jsonl" "$work/in.jsonl"
refused '--json [^ ]*in.jsonl exists and is not a locus --json document' trace stats --json "$work/in.jsonl" "$work/t.bin"
cmp -s "$(dirname "$0")/../data/trace/decode_only.jsonl" "$work/in.jsonl" || case_fail "--json replaced a JSONL trace"
cp "$work/lin.json" "$work/lin2.json"
refused '--json [^ ]*lin2.json exists and is not a locus --json document' map check --json "$work/lin2.json" "$work/lin.json"
cmp -s "$work/lin.json" "$work/lin2.json" || case_fail "--json replaced an expert map"
succeeds trace stats "$work/t.bin" --json "$work/stats.json"
succeeds trace stats "$work/t.bin" --json "$work/stats.json"
: >"$work/empty.json"
succeeds trace stats "$work/t.bin" --json "$work/empty.json"
# /dev/stdout names the process's standard output: written through it (a shell's append stays one,
# and the summary, which would join the output, is not printed), never renamed over the file it
# was redirected to. A binary trace streams through a pipe whole.
printf 'earlier line\n' >"$work/stdout.txt"
"$locus" map export "$work/lin.json" --to sglang --out /dev/stdout >>"$work/stdout.txt" 2>/dev/null ||
  case_fail "map export --out /dev/stdout"
{ head -n 1 "$work/stdout.txt" | grep -qx 'earlier line' && tail -n 1 "$work/stdout.txt" | grep -q '^{"physical_to_logical_map"'; } ||
  case_fail "map export --out /dev/stdout replaced the file stdout was appended to, or printed its summary into it"
# ... also through a link of the user's own, or a copy of the descriptor (/dev/fd/3 after 3>&1).
ln -s /dev/stdout "$work/so"
printf 'earlier line\n' >"$work/stdout2.txt"
"$locus" map export "$work/lin.json" --to sglang --out "$work/so" >>"$work/stdout2.txt" 2>/dev/null ||
  case_fail "map export --out (a link to /dev/stdout)"
{ head -n 1 "$work/stdout2.txt" | grep -qx 'earlier line' && [ "$(wc -l <"$work/stdout2.txt")" -eq 2 ]; } ||
  case_fail "map export --out (a link to /dev/stdout) replaced the file or printed its summary into it"
"$locus" map export "$work/lin.json" --to sglang --out /dev/fd/3 >"$work/stdout3.txt" 3>&1 2>/dev/null ||
  case_fail "map export --out /dev/fd/3 3>&1"
[ "$(wc -l <"$work/stdout3.txt")" -eq 1 ] || case_fail "map export --out /dev/fd/3 3>&1 printed its summary into the output"
("$locus" trace import "$work/t.bin" -o /dev/stdout | "$locus" trace stats - >"$work/piped.txt") 2>/dev/null &&
  grep -q 'requests' "$work/piped.txt" || case_fail "trace import -o /dev/stdout | trace stats -"
# /dev/stdout redirected to a file is that file: named beside it as another output or an input, it
# is refused (the plan would have been renamed over the file the JSON went to, or a second plan
# appended to the input); a --json document appended through it is no replacement.
# (refused sends stdout to /dev/null, so these redirect it themselves.)
cp "$work/lin.json" "$work/lin3.json"
msg=$("$locus" map replan "$work/lin3.json" --trace "$work/t.bin" --out /dev/stdout 2>&1 >>"$work/lin3.json")
check "map replan --out /dev/stdout >> its input is refused" test $? -eq 1
check "... naming the input" sh -c "echo \"\$1\" | grep -q 'is also an input of this command'" sh "$msg"
cmp -s "$work/lin.json" "$work/lin3.json" || case_fail "map replan --out /dev/stdout appended to its input"
msg=$("$locus" plan --trace "$work/t.bin" --out "$work/same.json" --json /dev/stdout 2>&1 >"$work/same.json")
check "plan --out F --json /dev/stdout > F is refused" test $? -eq 1
check "... naming both" sh -c "echo \"\$1\" | grep -q -- '--out [^ ]*same.json and --json /dev/stdout both write to standard output'" sh "$msg"
# ... also with --json -, which wrote into the file the plan's rename then unlinked (lost, exit 0).
msg=$("$locus" plan --trace "$work/t.bin" --out "$work/same2.json" --json - 2>&1 >"$work/same2.json")
check "plan --out F --json - > F is refused" test $? -eq 1
check "... naming both" sh -c "echo \"\$1\" | grep -q -- '--out [^ ]*same2.json and --json - both write to standard output'" sh "$msg"
# A device (a terminal, /dev/null) is shared, not standard output's stream: outputs may name it.
succeeds plan --trace "$work/t.bin" --out /dev/fd/3 --json - 3>/dev/null
succeeds plan --trace "$work/t.bin" --placement locality --out /dev/stderr --grouping /dev/stderr
# Standard output takes one result, whatever it is (a pipe here): two would run into one stream.
refused '--out /dev/stdout and --json - both write to standard output' plan --trace "$work/t.bin" --out /dev/stdout --json -
refused '--json - and --markdown /dev/stdout both write' compare --trace "$work/t.bin" --markdown /dev/stdout --json - -q
refused '--out /dev/stdout and --grouping /dev/stdout both write' plan --trace "$work/t.bin" --placement locality \
  --out /dev/stdout --grouping /dev/stdout
refused '--out /dev/stdout and --json - both write' map export "$work/lin.json" --to vllm --out /dev/stdout --json -
succeeds plan --trace "$work/t.bin" --out /dev/null --json -
printf 'a log line\n' >"$work/log2.txt"
"$locus" trace stats "$work/t.bin" --json /dev/stdout >>"$work/log2.txt" 2>/dev/null ||
  case_fail "trace stats --json /dev/stdout >> log (refused as a replacement)"
{ head -n 1 "$work/log2.txt" | grep -qx 'a log line' && grep -q '"format": "locus.trace.stats"' "$work/log2.txt"; } ||
  case_fail "trace stats --json /dev/stdout >> log lost the log or the document"
# With standard output closed, the first file opened took descriptor 1, and --json /dev/stdout
# wrote into the plan: descriptors 0-2 are opened on /dev/null first.
"$locus" -q plan --trace "$work/t.bin" --out "$work/closed.json" --json /dev/stdout >&- 2>/dev/null ||
  case_fail "plan with stdout closed"
"$locus" map check "$work/closed.json" >/dev/null 2>&1 || case_fail "stdout closed: the plan holds more than the plan"
# A device output that fails is written before the files are renamed: they stay as they were.
if [ -w /dev/full ]; then
  refused '/dev/full: write failed' plan --trace "$work/t.bin" --out "$work/full_plan.json" --json /dev/full
  check "a failed device output leaves the plan unwritten" test ! -e "$work/full_plan.json"
fi
# A folder of route JSONL files with a part that cannot be read: refused, not skipped.
mkdir -p "$work/parts"
cp "$(dirname "$0")/../data/trace/decode_only.jsonl" "$work/parts/a.jsonl"
ln -s "$work/parts/missing.jsonl" "$work/parts/b.jsonl"
refused 'b.jsonl: cannot read it' trace stats "$work/parts"
rm "$work/parts/b.jsonl"
mkdir "$work/parts/c.jsonl"
refused 'c.jsonl: is not a file' trace stats "$work/parts"
# Model layers past what a model has (which every export refuses): refused by the map reader.
python3 - "$work/lin.json" "$work/deep.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["model_layers"], d["hidden_layers"] = [1, 2], 5000
json.dump(d, open(sys.argv[2], "w"))
PY
refused '"hidden_layers" is 5000, expected at most 4096' map check "$work/deep.json"
# map replan: options that would change nothing are refused.
refused '--prior-requests applies with --prior' map replan "$work/lin.json" --trace "$work/t.bin" \
  --prior-requests 5 --out "$work/r.json"
printf '0 0\n' >"$work/homes.txt"
refused '--grouping gives the nodes of requests --homes does not list' map replan "$work/lin.json" \
  --trace "$work/t.bin" --homes "$work/homes.txt" --grouping "$work/lin.json" --out "$work/r.json"
refused '--budget: nan is not a number from 0 to 1' map replan "$work/lin.json" --trace "$work/t.bin" --budget nan \
  --out "$work/r.json"
# map replan: the window and the prior are inputs too (--out or --json named after one replaced
# the trace; a route JSONL file opens with "{" like a JSON document), and one standard input.
"$locus" trace import "$work/t.bin" -o "$work/w.bin" >/dev/null
cp "$(dirname "$0")/../data/trace/decode_only.jsonl" "$work/w.jsonl"
refused '--json [^ ]*w.jsonl is also an input of this command' map replan "$work/lin.json" --trace "$work/w.jsonl" \
  --prefill-tokens 0 --out "$work/r.json" --json "$work/w.jsonl"
refused '--out [^ ]*w.bin is also an input of this command' map replan "$work/lin.json" --trace "$work/t.bin" \
  --prior "$work/w.bin" --out "$work/w.bin"
cmp -s "$(dirname "$0")/../data/trace/decode_only.jsonl" "$work/w.jsonl" || case_fail "map replan replaced its window"
refused '--trace - and --prior - both read standard input' map replan "$work/lin.json" --trace - --prior - \
  --out "$work/r.json" <"$work/t.bin"
# ... a window or a prior with nothing to decode, named as such; a rank that is not a number; moved
# bytes beyond 64 bits (they wrapped to a small figure).
refused 'the window [^ ]*t.bin has no decode tokens to re-plan on' map replan "$work/lin.json" --trace "$work/t.bin" \
  --prefill-tokens 1000000 --out "$work/r.json"
sed 's/"decode"/"prefill"/' "$work/w.jsonl" >"$work/prefill.jsonl"
refused 'the prior [^ ]*prefill.jsonl has no decode tokens' map replan "$work/lin.json" --trace "$work/w.jsonl" \
  --prior "$work/prefill.jsonl" --out "$work/r.json"
printf '0 -1\n' >"$work/homes_neg.txt"
refused '"-1" is not a rank' map replan "$work/lin.json" --trace "$work/t.bin" \
  --homes "$work/homes_neg.txt" --out "$work/r.json"
refused '--expert-bytes: Value 18446744073709551615 not in range' map replan "$work/lin.json" --trace "$work/t.bin" \
  --expert-bytes 18446744073709551615 --out "$work/r.json"
# A third review (polish): messages in the user's terms.
# --eplb-groups that select EPLB's hierarchical policy (a multiple of --nodes) but do not split the
# experts: named by the option, not by rebalance_experts; other counts take the global policy.
refused '^locus: configuration error: --eplb-groups 12: the 16 experts do not split into 12 equal groups' plan \
  --trace "$work/t.bin" --placement eplb --eplb-groups 12 --nodes 4 --out "$work/m.json"
refused '^locus: configuration error: --eplb-groups 6: the 4 experts do not split' "${trt[@]}" --eplb-groups 6 \
  --out "$work/trt.json"
succeeds plan --trace "$work/t.bin" --placement eplb --eplb-groups 3 --nodes 4 --out "$work/m.json"
ok 'multiple of --nodes' plan --help
# A route JSONL without a meta line: the command's own --experts is named (not trace import's, nor
# jsonl_options::experts); map export, which has no --experts, names none.
grep -v '"type"' "$work/w.jsonl" >"$work/nometa.jsonl"
refused 'nometa.jsonl:1: the number of experts is not declared: put a meta line with num_experts before the route records, or give the count with --experts$' \
  map replan "$work/lin.json" --trace "$work/nometa.jsonl" --out "$work/r.json"
refused 'or give the count with --experts$' plan --trace "$work/nometa.jsonl" --out "$work/m.json"
refused 'or give the count with --experts$' trace import "$work/nometa.jsonl" -o "$work/x.bin"
refused 'nometa.jsonl:1: the number of experts is not declared: put a meta line with num_experts before the route records$' \
  map export "$work/lin.json" --to sglang --load-trace "$work/nometa.jsonl" --out "$work/q.json"
succeeds map replan "$work/lin.json" --trace "$work/nometa.jsonl" --experts 16 --out "$work/r.json"
# --experts with a trace that is not route JSONL: an ESFT folder's count is honoured (as trace
# import's is), a binary trace's refused (it records its own; both were dropped without a word).
refused '^locus: configuration error: --experts 8 does not apply to [^ ]*t.bin, a binary trace' trace synth \
  --fit "$work/t.bin" --experts 8 --out "$work/s.bin"
refused '^locus: configuration error: --experts 16 does not apply to [^ ]*t.bin, a binary trace' plan \
  --trace "$work/t.bin" --experts 16 --out "$work/m.json"
refused '^locus: configuration error: --experts 16 does not apply to <stdin>, a binary trace' trace stats - \
  --experts 16 <"$work/t.bin"
ok '"experts": 128' trace synth --fit "$work/esft" --experts 128 --prefill-tokens 4 --tokens 500 --out "$work/s.bin" --json -
ok ' 128 experts' trace stats "$work/esft" --experts 128
refused 'expert id [0-9]+ is out of range \[0, 8\)' trace synth --fit "$work/esft" --experts 8 --prefill-tokens 4 --out "$work/s.bin"
# trace synth --prefill-tokens that cover every request: refused before anything is written (the
# trace had no decode tokens; with --fit the fit measured nothing).
refused '^locus: configuration error: --prefill-tokens 1000000 covers every sampled request \(the longest has [0-9]+ tokens\): the trace would have no decode tokens' \
  trace synth --experts 16 --top-k 2 --layers 2 --prefill-tokens 1000000 --tokens 1000 --out "$work/pf.bin"
refused '^locus: configuration error: --prefill-tokens 100000 covers every request of [^ ]*t.bin \(the longest has [0-9]+ tokens\)' \
  trace synth --fit "$work/t.bin" --prefill-tokens 100000 --tokens 1000 --out "$work/pf.bin"
check "a refused trace synth writes no trace" test ! -e "$work/pf.bin"
# trace import --domains is split on commas, as --train-domains is ("intent,law" was one folder name).
ok 'domains \[math, law\]' trace import "$work/esft" -o "$work/x.bin" --domains math,law
ok 'domains \[law\]' trace import "$work/esft" -o "$work/x.bin" --domains law
refused 'domain "law" is given twice' trace import "$work/esft" -o "$work/x.bin" --domains law,law
# Messages a user could reach that named a library function: the workload-aware grouping fitted on a
# split without prefill ("workload_aware: ..."), expert counts beyond a trace's ("trace: experts is"),
# an ESFT folder read with fewer experts than its top-k ("trace: top_k is 6, expected 1..2").
for args in "plan --placement locality --out $work/m.json" "simulate --grouper workload_aware" "compare -q"; do
  # shellcheck disable=SC2086
  refused '^locus: configuration error: no request of the training split of [^ ]*t.bin has both prefill and decode tokens \(--prefill-tokens 0,' \
    $args --trace "$work/t.bin" --prefill-tokens 0
done
refused 'and --placement activation_usage \(with its workload-aware grouping\) learns' plan --trace "$work/t.bin" \
  --placement activation_usage --prefill-tokens 100000 --out "$work/m.json"
refused '^locus: usage error: --experts: Value 70000 not in range 0 to 65536' trace import "$work/w.jsonl" \
  --experts 70000 -o "$work/x.bin"
refused '^locus: usage error: --experts: Value 70000 not in range 0 to 65536' plan --trace "$work/w.jsonl" \
  --experts 70000 --out "$work/m.json"
refused '^locus: usage error: --top-k: Value 70 not in range 0 to 64' trace import "$work/esft" --top-k 70 -o "$work/x.bin"
refused '^locus: configuration error: --experts 2 is fewer than the 6 experts each token chooses \(an ESFT folder' \
  trace import "$work/esft" --experts 2 -o "$work/x.bin"
refused '^locus: configuration error: --experts 4 is fewer than the 5 experts each token chooses \(--top-k\)' \
  trace import "$work/esft" --experts 4 --top-k 5 -o "$work/x.bin"
refused '^locus: configuration error: --experts 2 is fewer than the 6' trace stats "$work/esft" --experts 2
# Names from the input reach the terminal escaped: a newline or an escape sequence in a domain name
# keeps its table row on one line and sends the terminal nothing.
printf '{"type": "meta", "num_experts": 4, "top_k": 2}\n{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [0, 1], "topk_weights": [0.5, 0.5], "domain": "a\\nb"}\n{"req_id": 1, "token_idx": 0, "layer": 0, "topk_ids": [2, 1], "topk_weights": [0.5, 0.5], "domain": "x\\u001b[31my"}\n' >"$work/ctl.jsonl"
ok '^a\\nb +1 +1$' trace stats "$work/ctl.jsonl"
check "a domain's escape sequence is not printed" sh -c "! \"$locus\" trace stats \"$work/ctl.jsonl\" | grep -q \"\$(printf '\\033')\""
# A C1 control (U+009B, a terminal's one-byte escape) and a right-to-left override (U+202E) are
# shown as code points, not sent.
printf '{"type": "meta", "num_experts": 4, "top_k": 2}\n{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [0, 1], "topk_weights": [0.5, 0.5], "domain": "p\\u009b31mq"}\n{"req_id": 1, "token_idx": 0, "layer": 0, "topk_ids": [2, 1], "topk_weights": [0.5, 0.5], "domain": "r\\u202es"}\n' >"$work/c1.jsonl"
ok '^p\\u\{009B\}31mq +1 +1$' trace stats "$work/c1.jsonl"
ok '^r\\u\{202E\}s +1 +1$' trace stats "$work/c1.jsonl"
# Route-JSONL reading options given with another format are refused, not dropped; so is an empty
# transport in a list.
refused '^locus: configuration error: --split-on-restart does not apply to [^ ]*t.bin, a binary trace' trace stats \
  "$work/t.bin" --split-on-restart
refused '^locus: configuration error: --strict-layers does not apply to [^ ]*esft, an ESFT folder' plan \
  --trace "$work/esft" --strict-layers --out "$work/m.json"
refused 'an empty transport in "flat,"' compare --trace "$work/t.bin" --transport flat,
# An empty standard input or file is named as empty.
refused '<stdin> is empty: no route record' trace stats - </dev/null
# map replan counts copies under the engine's replica rule, and says which.
ok '"replica_rule": "random"' map replan "$work/lin.json" --trace "$work/t.bin" --replica-rule random \
  --out "$work/r2.json" --json -
refused "replica-rule: nearest not in" map replan "$work/lin.json" --trace "$work/t.bin" --replica-rule nearest \
  --out "$work/r2.json"
# Files (a file-safety review): a name near the folder's limit is written (its temporary's name is
# cut short), one past it refused before the work; a file-size limit is an error, not a signal; a
# table that did not reach stdout fails the run; endless or foreign input is refused unread; an
# output no one named is not put over a file of another kind; hints quote the paths they repeat.
long=$(printf 'c%.0s' $(seq 250))
ok 'top-6' trace synth --experts 16 --top-k 6 --layers 1 --tokens 200 --out "$work/$long"
refused "cannot write: File name too long" trace synth --experts 16 --top-k 6 --layers 1 --tokens 200 \
  --out "$work/$long$long"
check "a file-size limit is an error naming the file" sh -c "ulimit -f 8; \"$locus\" trace synth --experts 16 \
--top-k 6 --layers 2 --tokens 4000 --out \"$work/fs.bin\" 2>\"$work/fs.err\"; test \$? -eq 1 && grep -q \
'fs.bin: write failed: File too large' \"$work/fs.err\""
if [ -w /dev/full ]; then
  check "a table that did not reach stdout fails the run" sh -c "\"$locus\" trace stats \"$work/t.bin\" >/dev/full \
2>\"$work/full.err\"; test \$? -eq 1 && grep -q 'standard output: write failed' \"$work/full.err\""
fi
refused 'train-requests /dev/zero: longer than 64 MiB; not a list of requests' simulate --trace "$work/t.bin" \
  --train-requests /dev/zero
refused '/dev/zero: not a NumPy .npy file' plan --load /dev/zero --out "$work/lp.json"
check "endless standard input after a trace's magic is refused unread" sh -c "(printf LOCUSTRC; cat /dev/zero) | \
timeout 20 \"$locus\" trace stats - 2>&1 | grep -q 'unsupported version 0'"
refused 'cannot read a binary trace from it: Illegal seek \(a pipe; give it on standard input instead, as -\)' \
  trace stats <(cat "$work/t.bin")
cp "$work/t.bin" "$work/mm.grouping.json"
refused 'puts the grouping model in .*mm.grouping.json, which exists and is not one' plan --trace "$work/t.bin" \
  --out "$work/mm.json" --placement locality
same "$work/t.bin" "$work/mm.grouping.json"
ok "pass: --init-expert-location '[^ ]*my map.json' " map export "$work/lin.json" --to sglang --out "$work/my map.json"
# The engine reads the file from its own folder: the hints name it absolutely, whatever --out said.
locus_abs=$(realpath "$locus")
work_abs=$(realpath "$work")
(cd "$work_abs" && "$locus_abs" map export lin.json --to vllm --out rel_v.json >rel_v.txt 2>&1)
check "a relative --out is named absolutely in the engine's hint" \
  grep -q "locus.vllm.register(\"\?$work_abs/rel_v.json" "$work_abs/rel_v.txt"
ok 'locus.vllm.register\("[^ ]*a\\"b.json"\)' map export "$work/lin.json" --to vllm --out "$work/a\"b.json"
esc_out="$work/$(printf 'e\033[2Jx').json"
check "a path's escape sequence is not sent to the terminal" sh -c "\"$locus\" plan --trace \"$work/t.bin\" \
--out \"$esc_out\" | grep -q 'e?\[2Jx.json: ' && ! \"$locus\" plan --trace \"$work/t.bin\" --out \"$esc_out\" | \
grep -q \"\$(printf '\\033')\""
# A report into the folder of an earlier one removes the earlier report's files it does not write
# again (a domain the new trace lacks), and nothing of anyone else's.
"$locus" trace synth --experts 16 --top-k 6 --layers 2 --domains 3 --tokens 3000 --seed 4 --out "$work/t3.bin" -q >/dev/null
"$locus" trace report "$work/t3.bin" --out "$work/rep" --no-render >/dev/null || case_fail "report of t3.bin"
echo mine >"$work/rep/mine.csv"
ok 'CSV files written; 1 file of the earlier report removed' trace report "$work/t.bin" --out "$work/rep" --no-render
check "the earlier report's third domain is gone" test ! -e "$work/rep/load_domain2_domain2.csv"
check "a file no report listed stays" test -e "$work/rep/mine.csv"
# A summary.json of another kind in the folder (its format a number) is no report's: nothing removed.
mkdir -p "$work/rep2"
echo '{"format": 5, "files": ["mine.csv"]}' >"$work/rep2/summary.json"
echo mine >"$work/rep2/mine.csv"
ok 'CSV files written$' trace report "$work/t.bin" --out "$work/rep2" --no-render
check "a file another summary listed stays" test -e "$work/rep2/mine.csv"
# Names a crafted summary lists are removed only as plain regular files of the folder that this run
# did not write: not through a NUL ("load_all.csv\0" is load_all.csv to the system), not a link, not
# the --json document just written there.
"$locus" trace report "$work/t.bin" --out "$work/rep3" --no-render >/dev/null || case_fail "report into rep3"
echo outside >"$work/outside.txt"
ln -s "$work/outside.txt" "$work/rep3/link.csv"
echo '{"format": "locus.trace.report.summary", "files": ["load_all.csv\u0000", "link.csv", "r.json"]}' \
  >"$work/rep3/summary.json"
echo '{"format": "locus.trace.report"}' >"$work/rep3/r.json"
ok 'CSV files written$' trace report "$work/t.bin" --out "$work/rep3" --no-render --json "$work/rep3/r.json"
check "a name cut short by a NUL removes nothing" test -e "$work/rep3/load_all.csv"
check "a link named by a summary stays, and so does its target" test -L "$work/rep3/link.csv" -a -e "$work/outside.txt"
check "the --json just written stays" test -s "$work/rep3/r.json"
# After files were put in place, a summary that did not reach stdout says they were.
if [ -w /dev/full ]; then
  check "a failed summary after the files says they were written" sh -c "\"$locus\" plan --trace \"$work/t.bin\" \
--out \"$work/full_summary.json\" >/dev/full 2>\"$work/fs2.err\"; test \$? -eq 1 && grep -q \
\"(the command's files were written)\" \"$work/fs2.err\" && test -e \"$work/full_summary.json\""
fi
# A folder no rename may change (chattr +a, where the filesystem has it) is refused before the work.
mkdir -p "$work/ao"
if chattr +a "$work/ao" 2>/dev/null; then
  refused 'ao/g.json: cannot write: its folder is append-only' plan --trace "$work/t.bin" --placement locality \
    --out "$work/ao_map.json" --grouping "$work/ao/g.json"
  check "nothing was written beside the refused output" test ! -e "$work/ao_map.json"
  chattr -a "$work/ao"
fi
# A map written to a stream names no file for the grouping model beside it: /dev/null.grouping.json
# was a stray file in /dev. A FIFO in the scratch folder stands in for the device.
mkfifo "$work/map_pipe"
cat "$work/map_pipe" >"$work/map_pipe.out" &
check "plan to a stream writes no grouping model beside it" bash -c "'$locus' plan --trace '$work/t.bin' \
  --placement locality --out '$work/map_pipe' 2>'$work/pipe.err' >/dev/null && grep -q 'grouping model was not written' '$work/pipe.err' && ! test -e '$work/map_pipe.grouping.json'"
wait
check "the map went through the stream" grep -q '"format": *"locus-expert-map"' "$work/map_pipe.out"
cases_end
