#!/usr/bin/python3
"""Renders the figures of `locus trace report` from the CSV files it wrote.

    /usr/bin/python3 scripts/trace_report.py REPORT_DIR

Reads load_<domain>.csv (file names from summary.json), load_all.csv, imbalance.csv, coactivation.csv, prefill_decode.csv, correlation.csv and
summary.json in REPORT_DIR and writes PNG files beside them:
  load_*.png              expert-load share heatmap (layer x expert), one per domain and one for all
  imbalance.png           max/mean, Gini and domain JS divergence per layer
  coactivation.png        co-activation heatmap of the report layer (experts ordered by load)
  prefill_decode.png      per request and expert: prefill share vs decode share, and the
                          per-layer prefill/decode correlation distribution
Needs only matplotlib (python3-matplotlib from Debian); numpy comes with it.
"""
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 80  # keeps each PNG well under 200 KB


def prefill_words(summary):
    """What counted as prefill: the trace's recorded phases, or its first N tokens."""
    n = summary["prefill_tokens"]
    return "recorded phases" if n == "recorded" else f"first {n} tokens prefill"


def read_matrix(path, skip_header=True):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            rows.append(line.rstrip("\n").split(","))
    if skip_header:
        rows = rows[1:]
        return np.array([[float(x) for x in r[1:]] for r in rows])
    return np.array([[float(x) for x in r] for r in rows])


def load_heatmaps(out, summary):
    # Domain files are named by the driver (index + sanitised name, summary "file"), so a domain
    # called "all" or holding "/" can neither clash with the aggregate nor leave the folder.
    entries = [(d["name"], d.get("file", f"load_{d['name']}"), d["tokens"]) for d in summary["domains"]]
    entries.append(("all", "load_all", sum(x["tokens"] for x in summary["domains"])))
    mats = [(name, stem, tokens, read_matrix(os.path.join(out, stem + ".csv"))) for name, stem, tokens in entries]
    experts, layers = summary["experts"], summary["layers"]
    uniform = 1.0 / experts
    vmax = max(float(np.percentile(m, 99.5)) for _, _, _, m in mats) / uniform
    for name, stem, tokens, m in mats:
        fig, ax = plt.subplots(figsize=(min(12, 3 + experts * 0.12), 2 + layers * 0.14))
        im = ax.imshow(m / uniform, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"Expert load, domain '{name}' ({tokens} tokens): share / uniform share")
        fig.colorbar(im, ax=ax, label="load relative to uniform (1 = balanced)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, stem + ".png"), dpi=DPI)
        plt.close(fig)


def imbalance(out, summary):
    with open(os.path.join(out, "imbalance.csv")) as f:
        rows = list(csv.DictReader(f))
    layer = [int(r["layer"]) for r in rows]
    mm = [float(r["max_over_mean"]) for r in rows]
    gini = [float(r["gini"]) for r in rows]
    js = [float(r["domain_js_mean"]) for r in rows]
    corr = [float(r["correlation_mean"]) for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(layer, mm, "o-", label="max / mean load")
    a.axhline(1.0, color="grey", lw=0.8, ls=":")
    a.set_ylabel("max / mean")
    a.set_title(f"Load imbalance per layer ({summary['experts']} experts, top-{summary['top_k']})")
    a.legend(loc="upper left")
    b.plot(layer, gini, "s-", label="Gini of expert load")
    b.plot(layer, js, "^-", label="JS divergence between domains (bits, mean over pairs)")
    b.plot(layer, corr, "d-", label=f"prefill/decode correlation (mean, {prefill_words(summary)})")
    b.set_xlabel("MoE layer")
    b.set_ylim(0, 1)
    b.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "imbalance.png"), dpi=DPI)
    plt.close(fig)


def coactivation(out, summary):
    m = read_matrix(os.path.join(out, "coactivation.csv"), skip_header=False)
    load = np.diag(m).copy()
    order = np.argsort(-load)
    tokens = summary["tokens"]
    # Lift: observed co-choice over what independent choices would give (n_i n_j / N).
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = m * tokens / np.outer(load, load)
    np.fill_diagonal(lift, np.nan)
    lift = lift[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(7, 6))
    # Pairs never chosen together (lift 0) are drawn at the bottom of the scale.
    shown = np.where(lift > 0, np.log2(np.where(lift > 0, lift, 1.0)), -2.0)
    shown[np.isnan(lift)] = np.nan
    im = ax.imshow(shown, cmap="coolwarm", vmin=-2, vmax=2, interpolation="nearest")
    ax.set_title(f"Co-activation, layer {summary['report_layer']}: log2 lift (experts by load)")
    ax.set_xlabel("expert rank by load")
    ax.set_ylabel("expert rank by load")
    fig.colorbar(im, ax=ax, label="log2(observed / independent)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "coactivation.png"), dpi=DPI)
    plt.close(fig)


def prefill_decode(out, summary):
    with open(os.path.join(out, "prefill_decode.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out, "correlation.csv")) as f:
        corr = list(csv.DictReader(f))
    domains = [d["name"] for d in summary["domains"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.8))
    for d in domains:
        x = [float(r["prefill_share"]) for r in rows if r["domain"] == d]
        y = [float(r["decode_share"]) for r in rows if r["domain"] == d]
        a.scatter(x, y, s=5, alpha=0.35, label=d)
    lim = max([float(r["prefill_share"]) for r in rows] + [float(r["decode_share"]) for r in rows] + [0.01])
    a.plot([0, lim], [0, lim], color="grey", lw=0.8, ls=":")
    a.set_xlabel("share of the request's prefill choices")
    a.set_ylabel("share of its decode choices")
    a.set_title(f"Per request and expert, layer {summary['report_layer']}")
    a.legend(markerscale=3)
    layers = summary["layers"]
    data = [[float(r["correlation"]) for r in corr if int(r["layer"]) == l] for l in range(layers)]
    b.boxplot(data, positions=list(range(layers)), widths=0.6, showfliers=False)
    b.set_xticks(list(range(0, layers, max(1, layers // 10))))
    b.set_xticklabels([str(l) for l in range(0, layers, max(1, layers // 10))])
    b.set_xlabel("MoE layer")
    b.set_ylabel("Pearson r, prefill vs decode expert counts")
    b.set_title(f"Per-request correlation ({prefill_words(summary)})")
    b.axhline(0, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "prefill_decode.png"), dpi=DPI)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: trace_report.py REPORT_DIR")
    out = sys.argv[1]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    load_heatmaps(out, summary)
    imbalance(out, summary)
    coactivation(out, summary)
    prefill_decode(out, summary)


if __name__ == "__main__":
    main()
