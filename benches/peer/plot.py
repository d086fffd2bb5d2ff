#!/usr/bin/env python3
"""Latency distributions of one bench run (benches/suite), as a PNG.

    plot.py samples.csv latency.png

samples.csv has the columns panel, series, unit, value (one row per
sample); rows with an empty panel are not plotted. Each panel shows the
empirical CDF of each series on a log time axis, so medians (0.5) and
tails (0.99) can be read off directly.
"""

import csv
import sys
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = OrderedDict(
    [
        ("single", "Pop latency, one call at a time"),
        ("reply", "Agent reply → E"),
        ("scale", "Serve: pop latency, N calls at once"),
        ("burst", "Per-call: pop latency, M processes at once"),
    ]
)


def main(src, dst):
    panels = OrderedDict((p, OrderedDict()) for p in TITLES)
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            panel = row["panel"]
            if panel not in panels:
                continue
            panels[panel].setdefault(row["series"], []).append(float(row["value"]))
    used = [p for p in panels if panels[p]]
    if not used:
        print("nothing to plot")
        return
    fig, axes = plt.subplots(len(used), 1, figsize=(10, 3.6 * len(used)), squeeze=False)
    for ax, panel in zip(axes[:, 0], used):
        for name, values in panels[panel].items():
            values = sorted(v for v in values if v > 0)
            if not values:
                continue
            n = len(values)
            ys = [(i + 1) / n for i in range(n)]
            median = (values[(n - 1) // 2] + values[n // 2]) / 2
            ax.step(values, ys, where="post", label="%s (N=%d, median %.2f ms)" % (name, n, median))
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of calls ≤ x")
        ax.set_title(TITLES[panel])
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.axhline(0.99, color="grey", lw=0.6, ls="--")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
