"""Rank-1 and mAP per site over rounds, and the bytes each round moved, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_site_metrics(rounds: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Three panels: Rank-1 and mAP (one line per site and a dashed mean) and the megabytes each
    training round sent down and received up; None when nothing was evaluated."""
    evaluated = [r for r in rounds if r.get("evaluate")]
    if not evaluated:
        return None
    sites = sorted({s for r in evaluated for s in r["evaluate"]["sites"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for axis, key, label in ((axes[0], "rank1", "Rank-1 (%)"), (axes[1], "mAP", "mAP (%)")):
        for site in sites:
            points = [(r["round"], 100 * r["evaluate"]["sites"][site][key]) for r in evaluated
                      if site in r["evaluate"]["sites"]]
            axis.plot(*zip(*points), marker="o", label=site)
        means = [(r["round"], 100 * r["evaluate"]["mean"][key]) for r in evaluated if r["evaluate"].get("mean")]
        if means:
            axis.plot(*zip(*means), linestyle="--", marker="x", color="black", label="mean")
        axis.set_ylabel(label)
    axes[1].legend(loc="lower right", fontsize=8)
    trained = [r for r in rounds if (r.get("train") or {}).get("bytes")]
    top = 0.0
    for direction, label, style in (("sent", "down (to sites)", "-o"), ("received", "up (from sites)", "--s")):
        points = [(r["round"], r["train"]["bytes"].get(direction, 0) / 1e6) for r in trained]
        if points:
            axes[2].plot(*zip(*points), style, markersize=4, label=label)
            top = max(top, *(mb for _, mb in points))
    axes[2].set_ylabel("MB per training round")
    axes[2].set_ylim(0, 1.2 * top if top > 0 else 1)
    if trained:
        axes[2].legend(loc="lower right", fontsize=8)
    recorded = sorted({r["round"] for r in rounds})
    for axis in axes:
        axis.set_xlabel("round")
        if len(recorded) <= 12:  # few rounds: a tick at each (one round alone would get fractional ticks)
            axis.set_xticks(recorded)
            axis.set_xlim(recorded[0] - 0.5, recorded[-1] + 0.5)
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
