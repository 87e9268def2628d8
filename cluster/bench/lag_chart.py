"""The lag benchmark's chart, one PNG (matplotlib, no display needed):

* left: the lag distribution of every origin → destination pair (box: quartiles,
  whiskers: 5th–95th percentile, dots: every sample beyond), with the pair's
  floor (the least any protocol could do on the modelled link; median of the
  images') as a red tick, and the range of the images' own floors as a thin
  red line (an image whose push was acknowledged late has a lower floor: its
  lag is held to its own, the report's ``below`` column);
* right, top: origin × destination heatmap of p50 lag (ms);
* right, bottom: the same of p50 ÷ floor (blank where the floor is under 1 ms).
"""

from __future__ import annotations

import math
from pathlib import Path

from .lag_report import LagResults


def write_chart(results: LagResults, path: Path) -> bool:
    """The chart of ``results`` at ``path``; False (and no file) when no image
    arrived anywhere, so there is nothing to draw."""
    if not any(p.samples for p in results.pairs()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in results.pairs() if p.samples]
    lags = {(a.origin, a.destination): [] for a in results.arrivals}
    for a in results.arrivals:
        lags[(a.origin, a.destination)].append(a.lag_ms)
    nodes = [n["name"] for n in results.cluster["nodes"]]
    origins = [n for n in nodes if any(p.origin == n for p in pairs)]

    height = max(5.0, 0.32 * len(pairs) + 1.5)
    fig = plt.figure(figsize=(15, height), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.25, 1))
    box = fig.add_subplot(grid[:, 0])
    labels = [f"{p.origin} → {p.destination}" for p in pairs]
    data = [lags[(p.origin, p.destination)] for p in pairs]
    if data:
        box.boxplot(data, orientation="horizontal", whis=(5, 95), tick_labels=labels,
                    flierprops={"markersize": 3, "alpha": 0.6}, medianprops={"color": "black"})
        floors: dict[tuple[str, str], list[float]] = {}
        for a in results.arrivals:
            floors.setdefault((a.origin, a.destination), []).append(a.floor_ms)
        for i, p in enumerate(pairs, start=1):
            box.plot([p.floor_ms, p.floor_ms], [i - 0.4, i + 0.4], color="red", linewidth=2)
            own = floors[(p.origin, p.destination)]   # each image is held to its own floor
            box.plot([min(own), max(own)], [i, i], color="red", linewidth=1, alpha=0.4)
    box.invert_yaxis()
    box.set_xlabel("lag after the origin's acknowledgement (ms); red: floor, the least any "
                   "protocol could do on the link (tick: median, line: each image's)")
    mode = "modelled WAN" if results.wan else "loopback"
    title = f"replication lag per pair ({mode}"
    title += f"; fault: {results.fault})" if results.fault else ")"
    box.set_title(title, fontsize=10)
    box.grid(axis="x", alpha=0.3)

    by_pair = {(p.origin, p.destination): p for p in pairs}
    for row, (label, value) in enumerate((("p50 lag (ms)", lambda p: p.p50_ms),
                                          ("p50 ÷ floor", lambda p: p.p50_ratio))):
        ax = fig.add_subplot(grid[row, 1])
        matrix = [[_cell(by_pair.get((o, d)), value) for d in nodes] for o in origins]
        image = ax.imshow(matrix, cmap="viridis_r" if row == 0 else "magma_r", aspect="auto")
        ax.set_xticks(range(len(nodes)), nodes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(origins)), origins, fontsize=8)
        ax.set_xlabel("destination")
        ax.set_ylabel("origin")
        ax.set_title(label, fontsize=10)
        for i, row_values in enumerate(matrix):
            for j, v in enumerate(row_values):
                if not math.isnan(v):  # dark cells (high values, reversed maps) get white text
                    dark = image.norm(v) > 0.5
                    ax.text(j, i, f"{v:.0f}" if row == 0 else f"{v:.2f}", ha="center",
                            va="center", fontsize=7, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


def _cell(pair, value) -> float:
    if pair is None:
        return math.nan
    v = value(pair)
    return math.nan if v is None else v
