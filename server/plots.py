"""Rank-1 and mAP per site over rounds, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_site_metrics(rounds: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Two panels (Rank-1, mAP), one line per site and a dashed mean; None when nothing was evaluated."""
    evaluated = [r for r in rounds if r.get("evaluate")]
    if not evaluated:
        return None
    sites = sorted({s for r in evaluated for s in r["evaluate"]["sites"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for axis, key, label in ((axes[0], "rank1", "Rank-1 (%)"), (axes[1], "mAP", "mAP (%)")):
        for site in sites:
            points = [(r["round"], 100 * r["evaluate"]["sites"][site][key]) for r in evaluated
                      if site in r["evaluate"]["sites"]]
            axis.plot(*zip(*points), marker="o", label=site)
        means = [(r["round"], 100 * r["evaluate"]["mean"][key]) for r in evaluated if r["evaluate"].get("mean")]
        if means:
            axis.plot(*zip(*means), linestyle="--", color="black", label="mean")
        axis.set_xlabel("round")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
