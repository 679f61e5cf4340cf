#!/usr/bin/env bash
# Route-JSONL shapes that loggers write, and train/test splits, through the `locus` driver (issue
# 18): every case runs the driver on small files made here and checks its output or its refusal.
# Usage: import_split_cases.sh <locus binary> <scratch folder> <tests/data/trace folder>
set -u
source "$(dirname "$0")/../support/case_runner.sh"
cases_begin "$1" "$2"
data=$3

whole=$data/decode_only.jsonl # 24 requests (ids 0..23; even ids domain d0, odd d1), 4 tokens, 2 layers
"$locus" trace import "$whole" -o "$work/whole.bin" -q || { echo "FAIL: import" >&2; exit 1; }

# 1. `experts` in a route record is the chosen experts (topk_ids); in a meta line, the expert count.
sed -e 's/"topk_ids"/"experts"/' -e 's/"num_experts"/"experts"/' "$whole" >"$work/experts_key.jsonl"
ok '24 requests, 96 tokens, 2 layers, 16 experts' trace import "$work/experts_key.jsonl" -o "$work/experts_key.bin"
same "$work/whole.bin" "$work/experts_key.bin"
sed -e '2s/"topk_ids": \[[0-9, ]*\]/"experts": 16, &/' "$whole" >"$work/experts_number.jsonl"
refused 'experts_number.jsonl:2: "experts" in a route record is the list of chosen experts' \
  trace import "$work/experts_number.jsonl" -o "$work/x.bin"

# 2. Ragged layers: the last token of request 5 missing at layer 1 is dropped, the request kept.
grep -v '"req_id": 5, "token_idx": 3, "layer": 1,' "$whole" >"$work/ragged.jsonl"
ok '24 requests, 95 tokens' trace import "$work/ragged.jsonl" -o "$work/r.bin"
ok '1 token dropped from 1 ragged request$' trace import "$work/ragged.jsonl" -o "$work/r.bin"
ok 'kept the tokens every layer holds in 1 request whose layers end at different tokens, dropping 1 token ' \
  trace import "$work/ragged.jsonl" -o "$work/r.bin"
ok 'request 5 \(first record at line 42\): kept the 3 tokens every layer holds, dropped token_idx 3' \
  trace import "$work/ragged.jsonl" -o "$work/r.bin"
ok 'fitted on 24 requests' plan --trace "$work/ragged.jsonl" --test-fraction 0 --nodes 2 --gpus-per-node 2 \
  --out "$work/m.json"
refused 'layer 1 has 3 tokens, layer 0 has 4.*--strict-layers' trace import "$work/ragged.jsonl" -o "$work/r.bin" \
  --strict-layers

# 3. A req_id reused by the next request: the error points at --split-on-restart, which fixes it.
sed -e 's/"req_id": [0-9]*/"req_id": 7/' "$whole" | sed -e 's/"domain": "d1"/"domain": "d0"/' >"$work/reused.jsonl"
refused 'token_idx 0 at layer 0 appears twice.*--split-on-restart' trace import "$work/reused.jsonl" -o "$work/x.bin"
ok '24 requests, 96 tokens' trace import "$work/reused.jsonl" -o "$work/x.bin" --split-on-restart
ok 'fitted on' plan --trace "$work/reused.jsonl" --split-on-restart --nodes 2 --gpus-per-node 2 --out "$work/m.json"
# trace synth --fit reads the same logs with the same flags (it had neither).
refused 'token_idx 0 at layer 0 appears twice.*--split-on-restart' trace synth --fit "$work/reused.jsonl" \
  --prefill-tokens 1 --out "$work/fit.bin"
ok 'fitted' trace synth --fit "$work/reused.jsonl" --split-on-restart --prefill-tokens 1 --tokens 200 \
  --out "$work/fit.bin"
refused '--strict-layers requires --fit' trace synth --strict-layers --out "$work/fit.bin"

# 4. One file per layer, given one by one, as a folder, or on stdin: the same trace.
mkdir -p "$work/per_layer"
head -1 "$whole" >"$work/per_layer/layer0.jsonl"
head -1 "$whole" >"$work/per_layer/layer1.jsonl"
grep '"layer": 0,' "$whole" >>"$work/per_layer/layer0.jsonl"
grep '"layer": 1,' "$whole" >>"$work/per_layer/layer1.jsonl"
ok '24 requests, 96 tokens, 2 layers' trace import "$work/per_layer/layer1.jsonl" "$work/per_layer/layer0.jsonl" \
  -o "$work/files.bin"
same "$work/whole.bin" "$work/files.bin"
ok '24 requests, 96 tokens, 2 layers' trace import "$work/per_layer" -o "$work/folder.bin"
same "$work/whole.bin" "$work/folder.bin"
succeeds trace import - -o "$work/stdin.bin" -q <"$whole"
same "$work/whole.bin" "$work/stdin.bin"
ok 'fitted on 12 requests' plan --trace "$work/per_layer/layer0.jsonl" --trace "$work/per_layer/layer1.jsonl" \
  --nodes 2 --gpus-per-node 2 --train-domains d0 --out "$work/m.json"
ok 'fitted on 24 requests' plan --trace "$work/per_layer" --test-fraction 0 --nodes 2 --gpus-per-node 2 \
  --out "$work/m.json"
echo '{"req_id": 1, "token_idx": 0}' >>"$work/per_layer/layer1.jsonl"
refused 'layer1.jsonl:98: route record lacks "layer"' trace import "$work/per_layer" -o "$work/x.bin"
refused 'only route JSONL is read from several files' plan --trace "$work/whole.bin" --trace "$whole" \
  --out "$work/m.json"

# 5. ESFT: a domain folder given directly is that one domain; an empty folder says what it expected.
mkdir -p "$work/esft/law" "$work/esft/code" "$work/empty"
for d in law code; do
  for l in 1 2; do
    printf '1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t\t.1\t.1\t.1\t.1\t.1\t.1\t.1\t.1\t.1\t.1\t.1\t.1\n' \
      >"$work/esft/$d/expert_weights_$l.txt"
    printf '%s\t%s\t3\t4\t5\t6\t\t.2\t.2\t.2\t.2\t.2\t.2\n' "$l" 9 >>"$work/esft/$d/expert_weights_$l.txt"
  done
done
ok '2 requests, 3 tokens, 2 layers, 64 experts, top-6, domains \[law\]' trace import "$work/esft/law" -o "$work/law.bin"
ok 'domains \[law\]' trace import "$work/esft" --domains law -o "$work/law_from_root.bin"
same "$work/law.bin" "$work/law_from_root.bin"
ok '4 requests, 6 tokens, 2 layers, 64 experts, top-6, domains \[code, law\]' trace import "$work/esft/" -o "$work/e.bin"
refused 'is one domain folder.*give the parent folder' trace import "$work/esft/law" --domains law -o "$work/x.bin"
refused 'holds no domain folder with expert_weights' trace import "$work/empty" -o "$work/x.bin"

# 6. Splits: by domain, by time, by request-id files; conflicting flags refused; help shows defaults.
small=(--nodes 2 --gpus-per-node 2)
ok 'fitted on 12 requests' plan --trace "$whole" --train-domains d0 --test-domains d1 "${small[@]}" --out "$work/m.json"
ok 'fitted on 12 requests' plan --trace "$whole" --test-domains d1 "${small[@]}" --out "$work/m.json"
ok '"decode_tokens": 48' simulate --trace "$whole" --train-domains d0 --test-domains d1 "${small[@]}" --json
ok 'fitted on 24 requests' plan --trace "$whole" --train-domains d0,d1 "${small[@]}" --out "$work/m.json"
ok 'fitted on 18 requests' plan --trace "$whole" --split time --test-fraction 0.25 "${small[@]}" --out "$work/m.json"
# The time split tests the last requests: ids 18..23, 6 requests of 4 tokens.
ok '"decode_tokens": 24' simulate --trace "$whole" --split time --test-fraction 0.25 "${small[@]}" --json
printf '0 1 2 # the first three\n3,4\n\n' >"$work/train_ids.txt"
printf '20\n21\n' >"$work/test_ids.txt"
ok 'fitted on 5 requests' plan --trace "$whole" --train-requests "$work/train_ids.txt" "${small[@]}" --out "$work/m.json"
ok '"decode_tokens": 8' simulate --trace "$whole" --train-requests "$work/train_ids.txt" \
  --test-requests "$work/test_ids.txt" "${small[@]}" --json
ok '"decode_tokens": 76' simulate --trace "$whole" --train-requests "$work/train_ids.txt" "${small[@]}" --json
refused 'train-domains excludes --test-fraction|test-fraction excludes --train-domains' \
  plan --trace "$whole" --train-domains d0 --test-fraction 0.3 --out "$work/m.json"
refused 'excludes' plan --trace "$whole" --train-domains d0 --train-requests "$work/train_ids.txt" --out "$work/m.json"
refused 'excludes' plan --trace "$whole" --test-requests "$work/test_ids.txt" --split time --out "$work/m.json"
refused 'split: .*not in \{random,time\}|random,time' plan --trace "$whole" --split sideways --out "$work/m.json"
refused 'train-domains: the trace has no domain "zz" \(its domains: d0, d1\)' \
  plan --trace "$whole" --train-domains zz --out "$work/m.json"
# A domain name holding a comma is listed in double quotes (a JSON string), as messages show it;
# spaces around a name are dropped.
sed -e 's/"domain": "d1"/"domain": "d1, x"/' "$whole" >"$work/comma.jsonl"
ok 'domains \[d0, "d1, x"\]' trace import "$work/comma.jsonl" -o "$work/comma.bin"
ok 'fitted on 12 requests' plan --trace "$work/comma.bin" --train-domains '"d1, x"' --out "$work/m.json"
ok 'fitted on 12 requests' plan --trace "$work/comma.bin" --test-domains ' d0 ' --out "$work/m.json"
ok 'fitted on 24 requests' plan --trace "$work/comma.bin" --train-domains 'd0, "d1, x"' --out "$work/m.json"
refused 'train-domains: the trace has no domain "d1" \(its domains: d0, "d1, x"\)' \
  plan --trace "$work/comma.bin" --train-domains 'd1, x' --out "$work/m.json"
refused 'train-domains: d0,: an empty name' plan --trace "$whole" --train-domains d0, --out "$work/m.json"
refused 'train-domains: "d0: a quoted name has no closing quote' plan --trace "$whole" --train-domains '"d0' \
  --out "$work/m.json"
refused 'request 0 \(domain "d0"\) is both in the training and in the test split' \
  plan --trace "$whole" --train-domains d0 --test-domains d0,d1 --out "$work/m.json"
printf '1 99 100\n' >"$work/bad_ids.txt"
refused 'train-requests .*bad_ids.txt: 2 listed request ids are not in the trace \(99, 100\)' \
  plan --trace "$whole" --train-requests "$work/bad_ids.txt" --out "$work/m.json"
printf '1 x2\n' >"$work/junk_ids.txt"
refused 'junk_ids.txt:1: "x2" is not a request id' plan --trace "$whole" --test-requests "$work/junk_ids.txt" \
  --out "$work/m.json"
refused 'training split is empty: --split time with --test-fraction 1 puts all 24 requests.*lower --test-fraction' \
  plan --trace "$whole" --split time --test-fraction 1 --out "$work/m.json"
refused 'test split is empty, nothing to simulate: --train-domains/--test-domains select no test request' \
  simulate --trace "$whole" --train-domains d0,d1 "${small[@]}"
ok '--split TEXT:\{random,time\}=random' plan --help
ok '--test-fraction FLOAT.*=0\.5' simulate --help
ok '--skip-requests UINT=0' plan --help
ok '--json \[PATH\] ' simulate --help

# A plan keeps the layer numbers its trace logged; an export that renumbers them says so.
sed -e 's/"layer": 1,/"layer": 2,/' -e 's/"layer": 0,/"layer": 1,/' "$whole" >"$work/layers12.jsonl"
succeeds plan --trace "$work/layers12.jsonl" --test-fraction 0 --nodes 2 --gpus-per-node 2 --out "$work/l12.json"
ok "number the plan's layers 3\.\.4; the plan saved 1\.\.2" map export "$work/l12.json" --to sglang \
  --first-moe-layer 3 --out "$work/l12_sglang.json"
check "an export that keeps the saved numbers says nothing" \
  bash -c "! timeout 60 '$locus' map export '$work/l12.json' --to sglang --first-moe-layer 1 --out '$work/l12_s.json' \
  2>&1 | grep -q 'number the plan'"
# MoE layers that alternate with dense ones (Llama 4 Maverick: 1, 3, ..., 47 of 48): --moe-layer-step.
succeeds plan --trace "$work/layers12.jsonl" --test-fraction 0 --nodes 2 --gpus-per-node 2 --placement eplb \
  --redundant-slots 1 --out "$work/l12e.json"
ok 'hidden layers 1\.\.3 of 5' map export "$work/l12e.json" --to sglang --first-moe-layer 1 --moe-layer-step 2 \
  --num-hidden-layers 5 --out "$work/l13_s.json"
check "every other SGLang row is a MoE layer's" \
  python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['physical_to_logical_map']; \
sys.exit(not (len(m) == 5 and m[0] == m[2] == m[4] == [p % 16 for p in range(len(m[0]))] != m[1]))" \
  "$work/l13_s.json"
succeeds map export "$work/l12.json" --to trtllm --first-moe-layer 1 --moe-layer-step 2 --out "$work/l13_t.yaml"
check "TensorRT-LLM keys the odd layers" grep -q '^  3: \[' "$work/l13_t.yaml"
refused '--moe-layer-step: Value 0 not in range' map export "$work/l12.json" --to sglang --moe-layer-step 0 \
  --out "$work/l0.json"
# TensorRT-LLM's statistics hold DeepSeek-V3's MTP layer (61) beside the hidden layers: saved layers
# past --num-hidden-layers are MTP layers, keyed with their own maps for TensorRT-LLM (more MTP
# layers from --mtp-layers get the trivial placement) and left out of the files without such rows.
ok 'hidden layers 1\.\.1 of 2, 2 MTP layers \(1 planned\)' map export "$work/l12e.json" --to trtllm \
  --num-hidden-layers 2 --mtp-layers 2 --out "$work/mtp.yaml"
check "TensorRT-LLM keys the planned MTP layer and the trivial one after it" \
  bash -c "[ \"\$(grep -o '^  [0-9]*:' '$work/mtp.yaml' | tr -d ' \n')\" = '1:2:3:' ]"
ok "the plan's last 1 layer \(from layer 2, past --num-hidden-layers 2\).*sglang file has no row for; left out" \
  map export "$work/l12e.json" --to sglang --num-hidden-layers 2 --out "$work/mtp_s.json"
check "SGLang's file has the hidden layers only" \
  python3 -c "import json, sys; sys.exit(len(json.load(open(sys.argv[1]))['physical_to_logical_map']) != 2)" \
  "$work/mtp_s.json"
refused 'every planned layer is an MTP layer \(from hidden layer 1 on\); a plan needs a hidden layer' map export \
  "$work/l12e.json" --to trtllm --num-hidden-layers 1 --mtp-layers 2 --out "$work/mtp_v.yaml"
# More saved layers past the count than the model's MTP layers (1 unless --mtp-layers says more): the
# count is wrong, and those layers would be dropped from the files.
# For a file with no MTP rows the count comes first (--mtp-layers would only leave real layers out);
# TensorRT-LLM, which keys MTP layers, is told the option.
refused 'layers 1\.\.2 lie past --num-hidden-layers 1: give the model.s hidden-layer count; only if they are its multi-token-prediction layers, which the vllm file has no row for, does --mtp-layers 2 leave them out' \
  map export "$work/l12e.json" --to vllm --num-hidden-layers 1 --out "$work/mtp_v.json"
refused 'layers 1\.\.2 lie past --num-hidden-layers 1: as multi-token-prediction layers they need --mtp-layers 2' \
  map export "$work/l12e.json" --to trtllm --num-hidden-layers 1 --out "$work/mtp_v.yaml"
succeeds map export "$work/l12e.json" --to trtllm --num-hidden-layers 2 --out "$work/mtp1.yaml" --json "$work/mtp1.json"
check "the export's JSON names the MTP layer apart" python3 -c "import json, sys; d = json.load(open(sys.argv[1])); \
sys.exit(not (d['hidden_layer_ids'] == [1] and d['mtp_layer_ids'] == [2] and d['moe_layers'] == 1 and \
d['mtp_layers'] == 1 and d['hidden_layers'] == 2))" "$work/mtp1.json"
# Layers the options number past --num-hidden-layers are MTP layers only where --mtp-layers says so.
ok 'hidden layers 1\.\.1 of 2, 1 MTP layer \(1 planned\)' map export "$work/l12e.json" --to trtllm \
  --first-moe-layer 1 --num-hidden-layers 2 --mtp-layers 1 --out "$work/mtp_n.yaml"
refused 'layers 2\.\.2 lie past --num-hidden-layers 2: as multi-token-prediction layers they need --mtp-layers 1' \
  map export "$work/l12e.json" --to trtllm --first-moe-layer 1 --num-hidden-layers 2 --out "$work/mtp_n.yaml"
# Further past the count than a model's MTP layers go (16): no --mtp-layers to suggest.
refused 'lie past --num-hidden-layers 2, 4000 layers past it, more than a model.s multi-token-prediction layers \(at most 16\)' \
  map export "$work/l12e.json" --to trtllm --first-moe-layer 4000 --num-hidden-layers 2 --mtp-layers 1 \
  --out "$work/mtp_far.yaml"
# --moe-layer-step alone keeps the saved first layer: a plan saved from layer 1 stays there.
ok 'hidden layers 1\.\.3 of 4' map export "$work/l12e.json" --to trtllm --moe-layer-step 2 --out "$work/step.yaml"
# A plan that saved no layer numbers (a synthetic trace) is written as hidden layers 0..L-1, said
# for the engines that index every hidden layer (a model with dense layers needs the options).
succeeds trace synth --out "$work/synth.bin" --experts 8 --top-k 2 --layers 2 --requests 6 --mean-length 60
succeeds plan --trace "$work/synth.bin" --test-fraction 0 --nodes 2 --gpus-per-node 2 --out "$work/synth.json"
ok 'the plan saves no model layer numbers: its 2 layers are written as hidden layers 0\.\.1' map export \
  "$work/synth.json" --to trtllm --out "$work/synth.yaml"
ok 'no model layer numbers saved: map export writes the layers as hidden layers 0\.\.1' map check "$work/synth.json"
# A route log saves no hidden-layer count: the count exports read is said as a reading.
ok '^model layers: hidden layers 1\.\.2 \(no hidden-layer count saved: exports take the last \+ 1, 3' \
  map check "$work/l12.json"
succeeds map export "$work/l12.json" --to locus --num-hidden-layers 5 --out "$work/l12_h5.json"
ok '^model layers: hidden layers 1\.\.2 of 5$' map check "$work/l12_h5.json"
ok 'the plan saves no model layer numbers' map export "$work/synth.json" --to sglang --num-hidden-layers 5 \
  --out "$work/synth5.json"
check "a numbered export of that plan says nothing" \
  bash -c "! timeout 60 '$locus' map export '$work/synth.json' --to trtllm --first-moe-layer 3 --out '$work/s3.yaml' \
  2>&1 | grep -q 'saves no model layer'"
# The model's MoE layers going on past the plan's (a 2-layer plan from layer 3 of 8 hidden layers):
# said, with the layer the engine would serve without a plan, and in the JSON; not for a plan that
# covers them.
ok 'end at hidden layer 4, but their numbering goes on at layer 5 of the model.s 8' map export "$work/synth.json" \
  --to trtllm --first-moe-layer 3 --num-hidden-layers 8 --out "$work/s38.yaml" --json "$work/s38.json"
check "the export's JSON names the unplanned layer" python3 -c "import json, sys; \
sys.exit(json.load(open(sys.argv[1]))['unplanned_moe_layer'] != 5)" "$work/s38.json"
check "an export that covers the model's MoE layers says nothing of them" \
  bash -c "! timeout 60 '$locus' map export '$work/synth.json' --to trtllm --first-moe-layer 3 --num-hidden-layers 5 \
  --out '$work/s35.yaml' 2>&1 | grep -q 'numbering goes on'"

# String req_ids (vLLM's "cmpl-..."): kept as the requests' names through the binary format; id
# files and --homes name requests by them (in quotes where a name holds a comma or a space).
sed -e 's/"req_id": \([0-9]*\),/"req_id": "cmpl-\1",/' -e 's/"req_id": "cmpl-7",/"req_id": "cmpl 7, #b",/' \
  "$whole" >"$work/named.jsonl"
ok 'requests keep their string req_ids as names \(first: "cmpl-0"\)' trace import "$work/named.jsonl" \
  -o "$work/named.bin"
printf 'cmpl-0, cmpl-2 # comment\n"cmpl 7, #b"\n' >"$work/named_ids.txt"
ok 'fitted on 3 requests' plan --trace "$work/named.bin" --train-requests "$work/named_ids.txt" --nodes 2 \
  --gpus-per-node 2 --out "$work/named_plan.json"
ok 'fitted on 3 requests' plan --trace "$work/named.jsonl" --train-requests "$work/named_ids.txt" --nodes 2 \
  --gpus-per-node 2 --out "$work/named_plan.json"
printf '0 2\n' >"$work/numbered_ids.txt"
refused 'numbered_ids.txt: 2 listed request names are not in the trace \("0", "2"\); its requests are named by their logged req_id strings' \
  plan --trace "$work/named.bin" --train-requests "$work/numbered_ids.txt" --out "$work/m.json"
printf '"cmpl-0\n' >"$work/open_quote.txt"
refused 'open_quote.txt:1: a quoted entry has no closing quote' \
  plan --trace "$work/named.bin" --train-requests "$work/open_quote.txt" --out "$work/m.json"
succeeds map export "$work/named_plan.json" --to locus --load-trace "$work/named.bin" --out "$work/named_served.json"
for i in $(seq 0 23); do
  if [ "$i" = 7 ]; then printf '"cmpl 7, #b" 1\n'; else printf 'cmpl-%d %d\n' "$i" $((i % 4)); fi
done >"$work/named_homes.txt"
ok 'inter-node copies per token' map replan "$work/named_served.json" --trace "$work/named.bin" --prefill-tokens 1 \
  --homes "$work/named_homes.txt" --out "$work/named_next.json"
# A file of numbers against a trace of numeral names is taken by name, and says so.
sed -e 's/"req_id": \([0-9]*\),/"req_id": "\1",/' "$whole" >"$work/numerals.jsonl"
printf '3\n' >"$work/three.txt"
ok 'note: --test-requests lists numbers; .*taken as a name \("3" is the request logged as that string\)' \
  plan --trace "$work/numerals.jsonl" --test-requests "$work/three.txt" --nodes 2 --gpus-per-node 2 \
  --out "$work/numerals.json"
# A byte-order mark starts no entry; a quoted entry ends at its quote.
printf '\xef\xbb\xbfcmpl-0\n' >"$work/bom_ids.txt"
ok 'fitted on 1 request\)' plan --trace "$work/named.bin" --train-requests "$work/bom_ids.txt" --nodes 2 \
  --gpus-per-node 2 --out "$work/m.json"
printf '"cmpl-0"x\n' >"$work/quote_junk.txt"
refused 'quote_junk.txt:1: a quoted entry runs on past its closing quote' \
  plan --trace "$work/named.bin" --train-requests "$work/quote_junk.txt" --out "$work/m.json"
# Names from the log reach the terminal escaped, in the skipped records' list too.
record='"token_idx": 0, "layer": 0, "topk_ids": [1, 2], "topk_weights": [1, 1]}'
printf '{"type": "meta", "num_experts": 16, "top_k": 2}\n{"req_id": "a\\u001b[2Jb", %s\n{"req_id": "a\\u001b[2Jb", %s\n{"req_id": "ok", %s\n' \
  "$record" "$record" "$record" >"$work/escape.jsonl"
ok 'dropped 1 inconsistent request; first problems:' trace import "$work/escape.jsonl" --skip-bad -o "$work/escape.bin"
ok '^  .*escape.jsonl:3: request "a.\[2Jb" \(numbered 0' trace import "$work/escape.jsonl" --skip-bad -o "$work/escape.bin"
check "a name's escape sequence is not written raw" \
  bash -c "! timeout 60 '$locus' trace import '$work/escape.jsonl' --skip-bad -o '$work/escape.bin' 2>&1 | grep -q \$'\\x1b'"
refused 'lists no rank for request "cmpl-0" .*named by their logged req_id strings' map replan \
  "$work/named_served.json" --trace "$work/named.bin" --prefill-tokens 1 --homes "$work/numbered_ids.txt" \
  --out "$work/named_next.json"

cases_end
