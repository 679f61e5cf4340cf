#!/usr/bin/python3
"""Plots bench/results/comm_volume.json (written by bench/comm_volume).

  /usr/bin/python3 bench/plot_comm_volume.py [RESULTS_DIR]

Writes RESULTS_DIR/comm_volume.png (inter-node bytes per decode token relative to linear /
round_robin / flat, per topology, for the flat-transport rows with each placement's best grouper
and for the chosen hierarchical rows) and RESULTS_DIR/comm_volume_tradeoff.png (bytes against
per-GPU aggregate max/mean for every row at 4x2).
"""
import argparse
import os
import sys

import plot_files


def fail(message):
    plot_files.fail("plot_comm_volume.py", message)


def load(path):
    """comm_volume.json at `path`, or a one-line message saying why it cannot be drawn."""
    doc = plot_files.read_json("plot_comm_volume.py", path)
    try:
        if not doc["rows"]:
            raise ValueError("no rows")
        for r in doc["rows"]:
            str(r["topology"]) + str(r["placement"]) + str(r["grouper"]) + str(r["transport"])
            int(r["redundant_slots_per_gpu"])
            float(r["inter_node_bytes_vs_baseline"]) + float(r["gpu_imbalance_aggregate"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail("%s is not what bench/comm_volume writes (%s: %s)" % (path, type(e).__name__, e))
    return doc


def save(fig, path):
    plot_files.save_png("plot_comm_volume.py", fig, path, 120)


def main():
    parser = argparse.ArgumentParser(description="Plot RESULTS_DIR/comm_volume.json (written by bench/comm_volume).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results_dir", nargs="?", default="bench/results", help="folder holding comm_volume.json")
    out = parser.parse_args().results_dir
    doc = load(os.path.join(out, "comm_volume.json"))
    try:
        import matplotlib  # after the options: --help works without matplotlib
    except ImportError:
        fail("drawing needs matplotlib (python3-matplotlib)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    topologies = []
    for r in rows:
        if r["topology"] not in topologies:
            topologies.append(r["topology"])

    # Bar chart: a few representative configurations per topology.
    configs = [
        ("linear", 0, "round_robin", "flat", "linear / rr (baseline)"),
        ("eplb", 1, "round_robin", "flat", "eplb +1 / rr"),
        ("activation_usage", 0, "workload_aware", "flat", "paper: usage / workload-aware"),
        ("locality", 0, "workload_aware", "flat", "locality / wa"),
        ("locality", 1, "workload_aware", "flat", "locality +1 / wa"),
        ("locality", 1, "workload_aware", "hierarchical", "locality +1 / wa, hierarchical"),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(configs)
    for i, (p, red, g, tr, label) in enumerate(configs):
        ys = []
        for t in topologies:
            match = [r for r in rows if r["topology"] == t and r["placement"] == p and
                     r["redundant_slots_per_gpu"] == red and r["grouper"] == g and r["transport"] == tr]
            ys.append(match[0]["inter_node_bytes_vs_baseline"] if match else 0)
        xs = [j + (i - len(configs) / 2 + 0.5) * width for j in range(len(topologies))]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(topologies)))
    ax.set_xticklabels([t.replace("x", " nodes x ", 1) + " GPUs" if " " not in t else t.replace(" synthetic ", "\nsynthetic ")
                        for t in topologies], fontsize=8)
    ax.set_ylabel("inter-node bytes / decode token\n(relative to linear, round-robin, flat)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title("ESFT test split: network bytes per decode token (bench/comm_volume)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save(fig, os.path.join(out, "comm_volume.png"))

    # Trade-off: bytes against balance, every row of 4x2.
    fig, ax = plt.subplots(figsize=(10.5, 5))
    colors = {"linear": "tab:gray", "round_robin": "tab:brown", "eplb": "tab:orange",
              "activation_usage": "tab:blue", "locality": "tab:green"}
    markers = {"round_robin": "o", "least_loaded": "s", "workload_aware": "*"}
    seen = set()
    for r in rows:
        if r["topology"] != "4x2":
            continue
        key = (r["placement"], r["grouper"])
        label = None if key in seen else f'{r["placement"]} / {r["grouper"]}'
        seen.add(key)
        color = colors.get(r["placement"], "tab:purple")  # a placement newer than this script
        face = color if r["transport"] == "flat" else "none"
        ax.scatter(r["gpu_imbalance_aggregate"], r["inter_node_bytes_vs_baseline"], marker=markers.get(r["grouper"], "x"),
                   s=60 if r["redundant_slots_per_gpu"] else 35, facecolors=face, edgecolors=color,
                   label=label)
    ax.set_xlabel("per-GPU expert load max/mean (aggregate over the run)")
    ax.set_ylabel("inter-node bytes vs linear / rr / flat")
    ax.set_title("4x2 trade-off: filled = flat, hollow = hierarchical; large = 1 redundant slot/GPU")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save(fig, os.path.join(out, "comm_volume_tradeoff.png"))
    print(f"wrote {out}/comm_volume.png and {out}/comm_volume_tradeoff.png")


if __name__ == "__main__":
    try:
        main()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # A field of the right name but another type ("topology": 4) passed load()'s look.
        fail("comm_volume.json is not what bench/comm_volume writes (%s: %s)" % (type(e).__name__, e))
    except KeyboardInterrupt:
        sys.stderr.write("\nplot_comm_volume.py: interrupted\n")
        sys.exit(130)
