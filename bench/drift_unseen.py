"""What does each policy do when a task domain it never saw arrives? Runs drift once per split seed
and held-out domain (every plan, the grouping and locus adaptive's prior fitted without that
domain's training requests; one phase per domain, each phase drawn from its own domain only) and
once per seed with every domain trained, and tabulates the held-out domain's phase: its GPU
max/mean against linear's on the same steps and its inter-node byte saving, for the static plan,
locus adaptive (re-planned under the migration budget), its window-only variant and the per-phase
oracle; and the whole run (the mixed traffic). Writes OUT_DIR/NAME{.json,.md}.

    /usr/bin/python3 bench/drift_unseen.py BUILD_BENCH_DIR OUT_DIR [--seeds 1,2,3]
                     [--domains summary,law,intent] [--name NAME] [-- extra drift options]
"""
import json
import os
import sys
import tempfile
import time

import seed_sweep

POLICIES = [("static", "static locality"), ("adaptive", "locus adaptive"),
            ("adaptive, window only", "locus adaptive, window only"), ("oracle per phase", "oracle per phase")]


def main():
    opts, seeds, extra, drift = seed_sweep.parse(
        sys.argv[1:], "drift",
        "Run drift with each task domain held out of training, per split seed, and tabulate the held-out domain's "
        "phase", "1,2,3", "drift_unseen",
        lambda p: p.add_argument("--domains", default="summary,law,intent",
                                 help="the phases, in order; each is held out in turn"))
    domains = opts.domains.split(",")
    for d in domains:
        if not d or "/" in d:
            seed_sweep.usage_error(opts.parser, "--domains: %r is not a domain name (in %r)" % (d, opts.domains))
        if domains.count(d) > 1:
            seed_sweep.usage_error(opts.parser, "--domains: %s is given twice" % d)
    base = ["--deepseek", "0", "--lookahead", "0", "--phase-share", "1", "--phases", ",".join(domains)]
    start = time.time()
    runs = {}  # (seed, held-out domain or "") -> drift.json
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            for d in [""] + domains:
                out = os.path.join(tmp, "%d_%s" % (s, d or "all"))
                cmd = [drift] + base + ["--split-seed", str(s), "--out", out] + \
                    (["--unseen-domain", d] if d else []) + extra
                # drift's own message says what was wrong (an unknown domain, a bad extra option).
                seed_sweep.run("drift_unseen.py", cmd, "drift --split-seed %d%s%s" % (
                    s, " --unseen-domain " + d if d else "", (" " + " ".join(extra)) if extra else ""))
                with open(os.path.join(out, "drift.json")) as f:
                    runs[(s, d)] = json.load(f)
    seconds = time.time() - start
    first = runs[(seeds[0], "")]
    machine = first.get("machine", "unknown machine")
    doc = {"command": opts.command, "seeds": seeds, "domains": domains, "drift_options": base + extra,
           "seconds": seconds, "machine": machine, "replan_slack": first["replan_slack"],
           "balance_trigger": first["balance_trigger"], "prior_requests": first["prior_requests"],
           "swap_significance": first["swap_significance"], "cases": []}
    md = ["# A task domain the plans never saw (ESFT, 4 × 2, %s)" % first.get("transport", "flat"), "",
          "Produced by `%s` in %.0f s "
          "on %s: `drift %s --split-seed S [--unseen-domain D]%s` for every seed S and held-out domain D, and once "
          "per seed with every domain trained. One phase per domain (%s, in that order), each drawn from its own "
          "domain's test requests only; with D held out every plan, the workload-aware grouping and locus adaptive's "
          "prior are fitted on the training split without D's requests. Re-plans: EPLB every %d steps from the last "
          "%d; locus adaptive every %d, and early on drift or when its maps measure a GPU max/mean above %.2f "
          "since its last re-plan, at most %d of %d expert slots moved per re-plan, repairing first the GPUs "
          "above %.4g × the mean load, or above two standard errors of a GPU's load where the spread of the "
          "window's requests gives more (the window's, with the training sample counted as %g requests beside "
          "it), and taking a swap for the copies it saves only above %g standard errors of that saving (summed "
          "per request); the oracle re-plans at each phase start on that phase's own traffic and moves freely."
          % (opts.command, seconds, machine, " ".join(base),
             (" " + " ".join(extra)) if extra else "", ", ".join(domains), first["interval"], first["window"],
             first["interval"], first["balance_trigger"], first["budget_experts"], first["slots"],
             1 + first["replan_slack"], first["prior_requests"], first["swap_significance"]), "",
          "## The held-out domain's phase", "",
          "GPU max/mean over the phase (rows summed over its steps, per layer, mean over layers) and, after the "
          "slash, its inter-node byte saving against linear placement on the same steps. Shifted-traffic target: "
          "max/mean no worse than linear's. The last column: the same phase's max/mean in the seed's run with "
          "every domain trained.", "",
          "| seed | held out | linear | " + " | ".join(p for p, _ in POLICIES) + " | same domain trained: static / "
          "adaptive |", "|---|---|---|" + "---|" * len(POLICIES) + "---|"]
    summary = {p: [] for p, _ in POLICIES}
    for s in seeds:
        for d in domains:
            run = runs[(s, d)]
            ph = run["phases"].index(d)
            pol = {x["name"]: x for x in run["policies"]}
            seen = {x["name"]: x for x in runs[(s, "")]["policies"]}
            lin = pol["linear"]["phase_gpu_imbalance"][ph]
            case = {"seed": s, "held_out": d, "linear_gpu_imbalance": lin, "policies": {}}
            cells = []
            for label, name in POLICIES:
                x = pol[name]
                imb, sav = x["phase_gpu_imbalance"][ph], x["phase_saving"][ph]
                case["policies"][label] = {
                    "phase_gpu_imbalance": imb, "phase_saving": sav, "run_saving": x["saving_vs_linear"],
                    "run_share_of_oracle_saving": x["share_of_oracle_saving"],
                    "run_gpu_imbalance": x["gpu_imbalance_aggregate"], "worst_window": x["worst_window_imbalance"],
                    "max_moved_share": x["max_moved_share"]}
                summary[label].append((imb <= lin, imb, sav))
                cells.append("%s%.3f / %.1f%%" % ("" if imb <= lin else "**", imb, 100 * sav) +
                             ("" if imb <= lin else "**"))
            case["same_domain_trained"] = {
                "static": seen["static locality"]["phase_gpu_imbalance"][ph],
                "adaptive": seen["locus adaptive"]["phase_gpu_imbalance"][ph]}
            doc["cases"].append(case)
            md.append("| %d | %s | %.3f | %s | %.3f / %.3f |" % (
                s, d, lin, " | ".join(cells), case["same_domain_trained"]["static"],
                case["same_domain_trained"]["adaptive"]))
    md += ["", "Bold: above linear's. Per policy over the %d cases: phases at or under linear's max/mean, the "
           "max/mean range and the phase's saving range:" % (len(seeds) * len(domains)), ""]
    for label, _ in POLICIES:
        v = summary[label]
        md.append("- %s: %d of %d at or under linear's; max/mean %.3f–%.3f; saving %.1f–%.1f%%" % (
            label, sum(ok for ok, _, _ in v), len(v), min(i for _, i, _ in v), max(i for _, i, _ in v),
            100 * min(x for _, _, x in v), 100 * max(x for _, _, x in v)))
    md += ["", "## The whole run (every phase: mixed traffic)", "",
           "Inter-node byte saving against linear (share of the oracle's), GPU max/mean over the run and the worst "
           "reported window. Shifted-traffic targets: ≥ 20% below linear with every window's max/mean ≤ 1.15.", "",
           "| seed | held out | " + " | ".join(p for p, _ in POLICIES[:3]) + " |", "|---|---|" + "---|" * 3]
    for c in doc["cases"]:
        md.append("| %d | %s | %s |" % (c["seed"], c["held_out"], " | ".join(
            "%.1f%% (%.2f), %.3f, worst %.3f" % (100 * c["policies"][p]["run_saving"],
                                                 c["policies"][p]["run_share_of_oracle_saving"],
                                                 c["policies"][p]["run_gpu_imbalance"], c["policies"][p]["worst_window"])
            for p, _ in POLICIES[:3])))
    seed_sweep.write("drift_unseen.py", opts.out_dir, opts.name, doc, md)
    print("\n".join(md))


if __name__ == "__main__":
    seed_sweep.main("drift_unseen.py", main)
