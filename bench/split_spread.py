"""How do the 4x2 ESFT figures of comm_volume spread over splits of the requests, and what does
each leave-one-domain-out plan do on mixed and on held-out traffic? Runs comm_volume once per
split seed (same planner options for every seed), collects the locality rows, the balance
references and the unseen-domain rows, and writes DIR/split_spread{.json,.md}.

    /usr/bin/python3 bench/split_spread.py BUILD_BENCH_DIR OUT_DIR [--seeds 1,2,3,4,5] [--name NAME]
                     [-- extra comm_volume options]
"""
import json
import os
import sys
import tempfile
import time

import seed_sweep

ROWS = [
    ("no replicas, flat", "4x2 locality 0 workload_aware flat", 0.75, 1.15),
    ("1 redundant/GPU, flat", "4x2 locality 1 workload_aware flat", 0.65, 1.10),
    ("1 redundant/GPU, hierarchical", "4x2 locality 1 workload_aware hierarchical", 0.45, 1.10),
    ("eplb 1 redundant/GPU, round-robin, flat (balance only)", "4x2 eplb 1 round_robin flat", None, None),
    ("linear, round-robin, flat", "4x2 linear 0 round_robin flat", None, None),
]


def key(r):
    return "%s %s %d %s %s" % (r["topology"], r["placement"], r["redundant_slots_per_gpu"], r["grouper"], r["transport"])


def main():
    opts, seeds, extra, comm_volume = seed_sweep.parse(
        sys.argv[1:], "comm_volume", "Run comm_volume's 4x2 ESFT rows once per split seed and tabulate their spread",
        "1,2,3,4,5", "split_spread")
    out_dir, name = opts.out_dir, opts.name
    start = time.time()
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            d = os.path.join(tmp, str(s))
            cmd = [comm_volume, "--only", "4x2", "--synthetic", "0", "--split-seed", str(s),
                   "--out", d] + extra
            seed_sweep.run("split_spread.py", cmd, "comm_volume --split-seed %d%s" % (
                s, (" " + " ".join(extra)) if extra else ""))
            with open(os.path.join(d, "comm_volume.json")) as f:
                per_seed[s] = json.load(f)
    seconds = time.time() - start
    machine = per_seed[seeds[0]].get("machine", "unknown machine")
    doc = {"command": opts.command, "seeds": seeds, "comm_volume_options": extra, "seconds": seconds, "rows": {},
           "unseen": {}, "machine": machine}
    md = ["# Spread over request splits (ESFT, 4x2)", "",
          "Produced by `%s` in %.0f s: "
          "`comm_volume --only 4x2 --synthetic 0 --split-seed S%s` for S in %s; every seed planned with the same "
          "options, on %s. Each cell: inter-node bytes reduction vs linear / round-robin / flat of the same split, then "
          "GPU max/mean (aggregate); the main rows use the replica rule given to comm_volume (default locality_first)."
          % (opts.command, seconds, (" " + " ".join(extra)) if extra else "", ",".join(map(str, seeds)), machine),
          "", "| row | " + " | ".join("seed %d" % s for s in seeds) + " | reduction min–max | max/mean worst | target |",
          "|---|" + "---|" * (len(seeds) + 3)]
    for label, k, max_ratio, max_bal in ROWS:
        cells, reds, bals = [], [], []
        for s in seeds:
            row = next((r for r in per_seed[s]["rows"] if key(r) == k), None)
            if row is None:
                cells.append("—")
                continue
            red = 1 - row["inter_node_bytes_vs_baseline"]
            bal = row["gpu_imbalance_aggregate"]
            reds.append(red)
            bals.append(bal)
            cells.append("%.1f%%, %.3f" % (100 * red, bal))
        target = "—"
        if max_ratio is not None and reds:
            ok = all(b <= max_bal for b in bals)
            target = "max/mean ≤ %.2f on every seed: %s" % (max_bal, "met" if ok else "MISSED on %d of %d seeds" % (
                sum(b > max_bal for b in bals), len(bals)))
        doc["rows"][label] = {"reduction": reds, "gpu_imbalance": bals}
        md.append("| %s | %s | %.1f–%.1f%% | %.3f | %s |" % (label, " | ".join(cells), 100 * min(reds), 100 * max(reds),
                                                           max(bals), target))
    # Every replica row under every replica rule (comm_volume simulates each on the same maps).
    rules = ["locality_first", "same_gpu_else_random", "random", "locality_bounded"]
    md += ["", "## Replica rows under each replica rule", "",
           "Per rule: inter-node bytes reduction min–max over the seeds, worst GPU max/mean (aggregate), and on how many "
           "seeds max/mean ≤ 1.10 (the shifted-traffic target for these rows).", "",
           "| row | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    doc["by_replica_rule"] = {}
    for label, k, max_ratio, max_bal in ROWS:
        if " 1 " not in k:
            continue
        cells = []
        for rule in rules:
            reds, bals = [], []
            for s in seeds:
                row = next((r for r in per_seed[s]["rows"] if key(r) == k), None)
                by = (row or {}).get("by_replica_rule", {}).get(rule)
                if by is None:
                    continue
                reds.append(1 - by["inter_node_bytes_vs_baseline"])
                bals.append(by["gpu_imbalance_aggregate"])
            doc["by_replica_rule"].setdefault(label, {})[rule] = {"reduction": reds, "gpu_imbalance": bals}
            cells.append("%.1f–%.1f%%, worst %.3f, %d/%d ≤ 1.10" % (
                100 * min(reds), 100 * max(reds), max(bals), sum(b <= 1.10 for b in bals), len(bals))
                         if reds else "—")
        md.append("| %s | %s |" % (label, " | ".join(cells)))
    # With `-- --balance-floor 1`: each row's floor (placement::min_max_split) beside its measured balance.
    if any("gpu_balance_floor" in r for r in per_seed[seeds[0]]["rows"]):
        md += ["", "## Balance floor", "",
               "Per seed: measured GPU max/mean (aggregate) / the lowest any split among the map's replicas reaches. "
               "A floor above the target is plan-limited: only a different map meets it.", "",
               "| row | " + " | ".join("seed %d" % s for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        doc["floors"] = {}
        for label, k, _, _ in ROWS:
            rows = [next((r for r in per_seed[s]["rows"] if key(r) == k), None) for s in seeds]
            doc["floors"][label] = [r["gpu_balance_floor"] if r else None for r in rows]
            md.append("| %s | %s |" % (label, " | ".join(
                "%.3f / %.3f" % (r["gpu_imbalance_aggregate"], r["gpu_balance_floor"]) if r else "—" for r in rows)))
        # Locality rows with replicas: the worst floor over the balance hedge's draws of the training
        # sample, and the layers whose test floor is above it (a test mix the hedge could not see).
        resampled = [(label, k) for label, k, _, _ in ROWS
                     if any("gpu_balance_floor_worst_resample" in r for s in seeds for r in per_seed[s]["rows"]
                            if key(r) == k)]
        if resampled:
            md += ["", "Worst floor over the balance hedge's draws of the training sample (mean over layers) / "
                   "layers whose test floor is above it:", "",
                   "| row | " + " | ".join("seed %d" % s for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
            doc["worst_resampled_floors"] = {}
            for label, k in resampled:
                rows = [next((r for r in per_seed[s]["rows"] if key(r) == k), None) for s in seeds]
                doc["worst_resampled_floors"][label] = [
                    [r["gpu_balance_floor_worst_resample"], r["layers_test_floor_above_worst_resample"]] if r else None
                    for r in rows]
                md.append("| %s | %s |" % (label, " | ".join(
                    "%.3f / %d" % (r["gpu_balance_floor_worst_resample"], r["layers_test_floor_above_worst_resample"])
                    if r else "—" for r in rows)))
    first = per_seed[seeds[0]]
    md += ["", "## Leave one domain out (locality, %d redundant slots/GPU, flat, replica rule %s)" % (
        first.get("unseen_redundant_slots_per_gpu", 0), first.get("replica_rule", "locality_first")), "",
           "Per seed and held-out domain: mixed test split (bytes vs linear / round-robin / flat, GPU max/mean), then "
           "the held-out domain's own test requests (bytes with workload-aware over round-robin grouping on the same "
           "maps, GPU max/mean against linear's on the same requests). Shifted-traffic targets: mixed ≥ 20% lower at "
           "≤ 1.15; held-out max/mean ≤ linear's and wa / rr ≤ 1. The last column is the balance-only reference: "
           "EPLB with the same redundant slots planned on the same training requests (the held-out domain unseen "
           "too), round-robin grouping, on the mixed split and on the held-out requests.", "",
           "| seed | held out | mixed: reduction | mixed: max/mean | held-out: wa / rr | held-out: max/mean (linear) "
           "| met | EPLB max/mean: mixed / held-out |",
           "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for u in per_seed[s].get("unseen_domain", []):
            red = 1 - u["vs_linear_all"]
            ok = red >= 0.20 and u["gpu_imbalance_aggregate"] <= 1.15 and \
                u["gpu_imbalance_held_out"] <= u["linear_gpu_imbalance_held_out"] and u["wa_over_rr_held_out"] <= 1.0
            eplb = "%.3f / %.3f" % (u["eplb_gpu_imbalance_all"], u["eplb_gpu_imbalance_held_out"]) \
                if "eplb_gpu_imbalance_all" in u else "—"
            md.append("| %d | %s | %.1f%% | %.3f | %.3f | %.3f (%.3f) | %s | %s |" % (
                s, u["held_out"], 100 * red, u["gpu_imbalance_aggregate"], u["wa_over_rr_held_out"],
                u["gpu_imbalance_held_out"], u["linear_gpu_imbalance_held_out"], "yes" if ok else "no", eplb))
            doc["unseen"].setdefault(str(s), []).append(u)
    cases = [u for s in seeds for u in per_seed[s].get("unseen_domain", [])]
    if cases:
        def count(test):
            return sum(1 for u in cases if test(u))
        mixed = count(lambda u: u["gpu_imbalance_aggregate"] <= 1.15)
        held = count(lambda u: u["gpu_imbalance_held_out"] <= u["linear_gpu_imbalance_held_out"])
        every = count(lambda u: 1 - u["vs_linear_all"] >= 0.20 and u["gpu_imbalance_aggregate"] <= 1.15 and
                      u["gpu_imbalance_held_out"] <= u["linear_gpu_imbalance_held_out"] and
                      u["wa_over_rr_held_out"] <= 1.0)
        line = "Of %d cases: mixed max/mean ≤ 1.15 in %d, held-out max/mean ≤ linear's in %d, every target in %d" % (
            len(cases), mixed, held, every)
        if all("eplb_gpu_imbalance_all" in u for u in cases):
            line += "; EPLB: mixed ≤ 1.15 in %d, held-out ≤ linear's in %d" % (
                count(lambda u: u["eplb_gpu_imbalance_all"] <= 1.15),
                count(lambda u: u["eplb_gpu_imbalance_held_out"] <= u["linear_gpu_imbalance_held_out"]))
        md += ["", line + "."]
    seed_sweep.write("split_spread.py", out_dir, name, doc, md)
    print("\n".join(md))


if __name__ == "__main__":
    seed_sweep.main("split_spread.py", main)
