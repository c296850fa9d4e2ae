"""The synthetic-fedreid9 comparison's tables and figure (bench/compare_algorithms.py --federation
synthetic-fedreid9): per-site mAP with the held-out sites beside it, what federating buys each
site against training alone as a function of its size, and the leave-one-site-out protocol.

Every function here reads the summaries ``compare_algorithms.summarise`` makes; nothing trains.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from server.outputs import markdown_table  # noqa: E402
from strategies.validation import SOURCE_ONLY, TARGET_ADAPTED  # noqa: E402
from traffic import bytes_cell  # noqa: E402  (bench/, next to this file)

GAIN_METHODS = ("fedpav", "feddg", "fedpav_kd", "fedpav_cdw")  # drawn against `local` in the figure


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _spread(values: list[float]) -> str:
    return f"{_pct(float(np.mean(values)))} ({_pct(min(values))}-{_pct(max(values))})" if values else "-"


def by_size(result: dict) -> list[str]:
    """The training sites, largest first (training images)."""
    return sorted(result["sites"], key=lambda s: (-result["train_images"].get(s, 0), s))


def main_table(results: list[dict], caption: str) -> str:
    """mAP per training site (largest first) and its mean, mAP per held-out site and its mean (each
    with the seeds' min-max), and the bytes per round each way, their sum against FedPav's."""
    sites = by_size(results[0])
    held_out = sorted(results[0]["unseen"])
    header = ["method", "seeds", *(f"{s} ({int(results[0]['train_images'][s])})" for s in sites),
              "mean mAP (min-max)", *(f"{s} (held out)" for s in held_out), "held-out mean mAP (min-max)",
              "up / down MB per round (x FedPav)"]
    rows = []
    for r in results:
        low, high = r["mAP_spread"]
        upload = bytes_cell(r, results)
        rows.append([r["method"], str(r["seeds"]), *(_pct(r["sites"][s]["mAP"]) for s in sites),
                     f"{_pct(r['mean']['mAP'])} ({_pct(low)}-{_pct(high)})",
                     *(_pct(r["unseen"][s]["mAP"]) if s in r["unseen"] else "-" for s in held_out),
                     _spread(r["unseen_mean_seeds"]), upload])
    return markdown_table(caption, header, rows)


def gain_rows(results: list[dict], method: str) -> list[tuple[str, float, float, float, float]]:
    """(site, training images, mean gain, lowest, highest) of ``method`` over ``local``, mAP, per
    site; the gain of a seed is that seed's federated minus that seed's local mAP."""
    by_method = {r["method"]: r for r in results}
    fed, alone = by_method[method], by_method["local"]
    rows = []
    for site in by_size(alone):
        gains = [f - a for f, a in zip(fed["site_seeds"][site], alone["site_seeds"][site])]
        rows.append((site, alone["train_images"][site], float(np.mean(gains)), min(gains), max(gains)))
    return rows


def gain_table(results: list[dict]) -> str:
    """Per site: its size, `local`'s mAP, and each federated method's gain over it (min-max over seeds)."""
    by_method = {r["method"]: r for r in results}
    methods = [m for m in GAIN_METHODS if m in by_method]
    sites = by_size(by_method["local"])
    header = ["site", "train images", "local mAP", *(f"{m} minus local" for m in methods)]
    gains = {m: {row[0]: row for row in gain_rows(results, m)} for m in methods}
    rows = [[site, str(int(by_method["local"]["train_images"][site])), _pct(by_method["local"]["sites"][site]["mAP"]),
             *(f"{gains[m][site][2] * 100:+.1f} ({gains[m][site][3] * 100:+.1f} to {gains[m][site][4] * 100:+.1f})"
               for m in methods)] for site in sites]
    return markdown_table("What federating buys each training site: federated minus `local` mAP (points), mean "
                          "over seeds (min to max of the per-seed differences), largest site first.", header, rows)


def plot_gains(results: list[dict], path: Path) -> None:
    """Federated minus local mAP per site against the site's training images (log scale), one
    series per federated method, bars: min-max over seeds; FedReID's shape is that small sites gain."""
    by_method = {r["method"]: r for r in results}
    fig, axis = plt.subplots(figsize=(8.5, 5.2))
    methods = [m for m in GAIN_METHODS if m in by_method]
    for offset, method in enumerate(methods):
        rows = gain_rows(results, method)
        x = np.array([row[1] for row in rows]) * (1 + 0.06 * (offset - (len(methods) - 1) / 2))
        y = np.array([100 * row[2] for row in rows])
        low, high = y - np.array([100 * row[3] for row in rows]), np.array([100 * row[4] for row in rows]) - y
        axis.errorbar(x, y, yerr=[low, high], fmt="os^D"[offset % 4], capsize=3, label=method, alpha=0.85)
    for site, size, *_ in gain_rows(results, methods[0]):
        axis.annotate(site, (size, axis.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), fontsize=7,
                      rotation=90, ha="center", va="bottom", color="grey")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("training images at the site (log scale)")
    axis.set_ylabel("federated minus local mAP (points); bars: min-max over seeds")
    axis.set_title("What federating buys each of the nine sites (synthetic-fedreid9)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_table(results: list[dict]) -> str:
    """Per method: Rank-1 / mAP on each held-out site and the mean mAP (min-max); `local` ranks each
    held-out site with the best single site's model there (which one, per seed)."""
    held_out = sorted(results[0]["unseen"])
    header = ["method", *(f"{s} R1 / mAP" for s in held_out), "mean mAP (min-max over seeds)", "model ranked there"]
    rows = []
    for r in results:
        if not r["unseen"]:
            continue
        models = sorted({m for s in held_out for m in r["unseen_models"].get(s, [])})
        rows.append([r["method"], *(f"{_pct(r['unseen'][s]['rank1'])} / {_pct(r['unseen'][s]['mAP'])}"
                                    for s in held_out), _spread(r["unseen_mean_seeds"]),
                     "global" if models == ["global"] else "best single site: " + ", ".join(
                         f"{s}: {'/'.join(r['unseen_models'][s])}" for s in held_out)])
    return markdown_table("Held-out sites (never trained): the global model, or for `local` the best single "
                          "site's model there; BatchNorm statistics from the held-out site's own unlabelled images.",
                          header, rows)


def leave_one_out_table(results: dict[str, list[dict]], group: list[str]) -> str:
    """FedDG-ReID's protocol on synthetic domains: per held-out site of ``group`` (the others train),
    each method's Rank-1 / mAP there, and the mean mAP over the group (min-max over seeds); one
    table per protocol (source-only as the papers rank, then target-adapted)."""
    tables = []
    for protocol in (SOURCE_ONLY, TARGET_ADAPTED):
        header = ["method", *(f"{s} held out: R1 / mAP" for s in group), "mean mAP over the held-out sites (min-max)"]
        rows = []
        for method, summaries in results.items():
            cells, per_seed = [], []
            for site, summary in zip(group, summaries):
                held = summary if protocol == TARGET_ADAPTED else summary[protocol]
                cells.append(f"{_pct(held['unseen'][site]['rank1'])} / {_pct(held['unseen'][site]['mAP'])}")
                per_seed.append(held["unseen_mean_seeds"])
            means = [float(np.mean(values)) for values in zip(*per_seed)]  # seed by seed, over the held-out sites
            rows.append([method, *cells, _spread(means)])
        tables.append(markdown_table(f"Leave one site out over {', '.join(group)} (FedDG-ReID protocol), {protocol}: "
                                     "the three others train, the held-out one is ranked after the last round.",
                                     header, rows))
        tables.append(_paired_folds(results, protocol))
    return "\n".join(tables)


def _paired_folds(results: dict[str, list[dict]], protocol: str) -> str:
    """Each method against the first one (the baseline), paired per (held-out site, seed): the mean
    difference in mAP points, its standard deviation and range."""
    (base, base_summaries), *others = results.items()

    def per_pair(summaries: list[dict]) -> list[float]:
        return [value for summary in summaries for value in
                (summary if protocol == TARGET_ADAPTED else summary[protocol])["unseen_mean_seeds"]]

    lines = []
    for method, summaries in others:
        diffs = [100 * (o - b) for b, o in zip(per_pair(base_summaries), per_pair(summaries))]
        if len(diffs) > 1:
            lines.append(f"{method} - {base}, {protocol}, paired over {len(diffs)} (held-out site, seed) pairs: "
                         f"{np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1):.1f} mAP points "
                         f"({min(diffs):+.1f} to {max(diffs):+.1f}).")
    return "\n".join(lines) + ("\n" if lines else "")
