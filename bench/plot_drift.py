"""Draws DIR/drift.png from DIR/drift.json (bench/drift): inter-node bytes per token and GPU
max/mean per reported window, per policy, with the phase starts and the re-plans marked.

    /usr/bin/python3 bench/plot_drift.py DIR
"""
import argparse
import os
import sys

import plot_files


def fail(message):
    plot_files.fail("plot_drift.py", message)


def load(path):
    """drift.json at `path`, or a one-line message saying why it cannot be drawn."""
    doc = plot_files.read_json("plot_drift.py", path)
    try:
        for p in doc["policies"]:
            str(p["name"])
            for w in p["windows"]:
                float(w["first_step"]) + float(w["steps"]) + float(w["bytes_per_token"]) + float(w["gpu_imbalance"])
            for e in p["events"] if p["name"] == "locus adaptive" else []:
                float(e["step"]), str(e["reason"])
        for s in doc["phase_start"]:
            float(s)
        list(doc["phases"]), str(doc["transport"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail("%s is not what bench/drift writes (%s: %s)" % (path, type(e).__name__, e))
    return doc


def main(out_dir):
    doc = load(os.path.join(out_dir, "drift.json"))
    try:
        import matplotlib  # after the options: --help works without matplotlib
    except ImportError:
        fail("drawing needs matplotlib (python3-matplotlib)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for p in doc["policies"]:
        steps = [w["first_step"] + w["steps"] / 2 for w in p["windows"]]
        top.plot(steps, [w["bytes_per_token"] / 1e3 for w in p["windows"]], label=p["name"], linewidth=1.2)
        bottom.plot(steps, [w["gpu_imbalance"] for w in p["windows"]], label=p["name"], linewidth=1.2)
        if p["name"] == "locus adaptive":
            for e in p["events"]:
                bottom.axvline(e["step"], color="grey", alpha=0.25 if e["reason"] == "scheduled" else 0.6,
                               linestyle=":" if e["reason"] == "scheduled" else "-", linewidth=0.8)
    for s, name in zip(doc["phase_start"], doc["phases"]):
        for ax in (top, bottom):
            ax.axvline(s, color="black", linewidth=1)
        top.text(s, top.get_ylim()[1], " " + name, va="top", fontsize=9)
    bottom.axhline(1.15, color="red", linestyle="--", linewidth=0.8)
    top.set_ylabel("inter-node kB / decode token")
    bottom.set_ylabel("GPU max/mean (window)")
    bottom.set_xlabel("decode step (grey: locus adaptive re-plans; solid: drift- or balance-triggered)")
    top.legend(fontsize=8)
    top.set_title("ESFT 4x2, %s transport: request mix in phases" % doc["transport"])
    fig.tight_layout()
    plot_files.save_png("plot_drift.py", fig, os.path.join(out_dir, "drift.png"), 110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw DIR/drift.png from DIR/drift.json (written by bench/drift).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dir", nargs="?", default=".", help="folder holding drift.json")
    args = parser.parse_args()
    try:
        main(args.dir)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # A field of the right name but another type ("first_step": "1") passed load()'s look.
        fail("%s is not what bench/drift writes (%s: %s)" % (os.path.join(args.dir, "drift.json"),
                                                             type(e).__name__, e))
    except KeyboardInterrupt:
        sys.stderr.write("\nplot_drift.py: interrupted\n")
        sys.exit(130)
