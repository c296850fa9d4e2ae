"""Bytes against accuracy, both directions: FedKLPR, compressed updates and their controls, each paired
seed by seed with FedPav on the same sites.

    python bench/compare_bytes.py --federation synthetic-fedreid9 --seeds 0 1 2
    python bench/compare_bytes.py --seeds 0 1 2                          # the three demo sites
    python bench/compare_bytes.py --federation synthetic-fedreid9 --seeds 0 --variants fedpav fedklpr

Every row is one variant: a preset plus overrides (``VARIANTS``), run through ``fedreid-sim`` by
bench/compare_algorithms.py's runner and cached under ``bench/results/runs/`` like its runs (a
variant with overrides is kept as ``preset+tag``). Per seed: the mean mAP over the training sites
and over the held-out sites, averaged over the evaluations in the last quarter of the rounds
(rounds 15 and 20 of 20 on the nine sites, 16 and 20 on the demo sites), and the bytes the
training sites' messages took per round in each direction (training and evaluation exchanges,
measured from the serialised Flower messages; the held-out sites' evaluations are a measurement,
not federation traffic, and are left out), averaged over all rounds. Differences are taken seed by
seed against ``fedpav`` (the mean and the range of the per-seed differences). Writes
``bytes_<federation>.md`` and ``bytes_<federation>.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import compare_algorithms  # noqa: E402  (bench/, next to this file)
from traffic import exchanged_bytes  # noqa: E402
from reid.data.federations import FEDERATIONS, federation_size  # noqa: E402
from server import simulate  # noqa: E402
from server.config import compose_config  # noqa: E402
from server.outputs import markdown_table  # noqa: E402
from strategies.held_out import unseen_results  # noqa: E402
from strategies.validation import TARGET_ADAPTED  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A row: a preset, the overrides that make it this variant, and how to name it."""

    preset: str
    overrides: str = ""
    tag: str = ""

    @property
    def label(self) -> str:
        return f"{self.preset}+{self.tag}" if self.tag else self.preset


VARIANTS = {v.label: v for v in (
    Variant("fedpav"),
    Variant("fedpav", "", "repeat"),  # the same run again: how far a rerun of one seed moves by itself
    Variant("fedpav", "transport.dtype=float16", "fp16"),
    Variant("fedpav", "algorithm.bn_stats=average", "bn_average"),
    Variant("fedklpr"),
    Variant("fedklpr_no_pruning"),
    Variant("fedpav_compressed"),
    Variant("fedklpr_compressed"),
    Variant("fedpav_compressed", "algorithm.compression.bits=4", "4bit"),
    Variant("fedpav_compressed", "algorithm.compression.bits=2", "2bit"),
    Variant("fedpav_compressed", "algorithm.compression.bits=4 algorithm.compression.topk=0.5", "4bit_top50"),
    Variant("fedpav_compressed", "algorithm.compression.bits=4 algorithm.compression.topk=0.1", "4bit_top10"),
    Variant("fedklpr_no_crr"),
    Variant("fedpav_cluster"),
    Variant("fedpav_cluster", "algorithm.bn_stats=average", "journal"),
    Variant("fedpav_cluster", "algorithm.clustering.embedding=update", "update"),
)}
DEFAULT = list(VARIANTS)


def _late(lines: list[dict]) -> list[dict]:
    """The evaluated rounds in the last quarter of the run."""
    last = max(line["round"] for line in lines)
    return [line for line in lines if line.get("evaluate") and line["evaluate"].get("mean")
            and line["round"] >= 0.75 * last]


def seed_summary(lines: list[dict]) -> dict[str, float]:
    """One seed's late mean mAP (training sites, held-out sites) and bytes per round each way."""
    late = _late(lines)
    up, down = exchanged_bytes(lines)
    unseen = [held["mean"]["mAP"] for line in late if (held := unseen_results(line.get("unseen"), TARGET_ADAPTED))["mean"]]
    return {"mAP": float(np.mean([line["evaluate"]["mean"]["mAP"] for line in late])),
            "unseen": float(np.mean(unseen)) if unseen else float("nan"),
            "up_mb": up / 1e6, "down_mb": down / 1e6}


def bn_policy(variant: Variant, profile: str) -> str:
    cfg = compose_config({"algorithm": variant.preset, "profile": profile, "overrides": variant.overrides})
    return str(cfg.algorithm.bn_stats)


def _pct(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.1f}"


def _paired(seeds: list[dict[str, float]], base: list[dict[str, float]], key: str) -> str:
    """Mean, standard deviation and range of the per-seed differences, each seed against FedPav's same seed."""
    by_seed = {s["seed"]: s[key] for s in base}
    diffs = [100 * (s[key] - by_seed[s["seed"]]) for s in seeds if s["seed"] in by_seed]
    if not diffs or any(np.isnan(diffs)):
        return "-"
    spread = f" ±{np.std(diffs, ddof=1):.1f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.1f}{spread} ({min(diffs):+.1f} to {max(diffs):+.1f})"


def bytes_table(rows: dict[str, list[dict[str, float]]], policies: dict[str, str], caption: str) -> str:
    base = rows.get("fedpav")
    dense = (np.mean([s["up_mb"] + s["down_mb"] for s in base]) if base else None)
    header = ["variant", "seeds", "BN statistics", "training sites mAP", "minus FedPav (per seed)", "held-out mAP",
              "minus FedPav (per seed)", "up MB / round", "down MB / round", "total x FedPav"]
    out = []
    for label, seeds in rows.items():
        up, down = np.mean([s["up_mb"] for s in seeds]), np.mean([s["down_mb"] for s in seeds])
        out.append([label, str(len(seeds)), policies[label], _pct(float(np.mean([s["mAP"] for s in seeds]))),
                    _paired(seeds, base, "mAP") if base else "-",
                    _pct(float(np.mean([s["unseen"] for s in seeds]))),
                    _paired(seeds, base, "unseen") if base else "-",
                    f"{up:.1f}", f"{down:.1f}", f"{(up + down) / dense:.2f}x" if dense else "-"])
    return markdown_table(caption, header, out)


def plot(rows: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Total bytes per round (up + down, x FedPav) against the training sites' and the held-out
    sites' mAP, one point per variant, bars: min-max over seeds."""
    base = rows.get("fedpav")
    dense = np.mean([s["up_mb"] + s["down_mb"] for s in base]) if base else 1.0
    panels = [(key, title) for key, title in (("mAP", "training sites"), ("unseen", "held-out sites"))
              if any(not np.isnan(s[key]) for seeds in rows.values() for s in seeds)]  # the demo holds none out
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), sharex=True, squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        for index, (label, seeds) in enumerate(rows.items()):
            values = np.array([100 * s[key] for s in seeds])
            if np.isnan(values).any():
                continue
            x = np.mean([s["up_mb"] + s["down_mb"] for s in seeds]) / dense
            y = values.mean()
            axis.errorbar(x, y, yerr=[[y - values.min()], [values.max() - y]], fmt="os^vD<>pP*Xh"[index % 12],
                          capsize=3, markersize=7, label=label)
        axis.set_xscale("log")
        axis.set_xticks([0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel("bytes per round, up + down, x dense fp32 FedPav (log)")
        axis.set_ylabel(f"mean mAP, {title} (%), last quarter of rounds")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federation", default="synthetic", choices=FEDERATIONS)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--runs", type=Path, default=None, help="where runs are cached (default: OUT/runs)")
    parser.add_argument("--cached-only", action="store_true")
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args()
    sites = federation_size(args.federation) or 3
    profile = simulate.FEDERATION_PROFILES[args.federation]
    run_args = argparse.Namespace(
        federation=args.federation, profile=profile, sites=sites, out=args.out, rerun=args.rerun,
        sites_root=(REPO / "data" / args.federation).resolve(), public_root=(REPO / "data" / "synthetic-public").resolve(),
        runs=(args.runs or args.out / "runs") / (args.federation if args.federation != "synthetic" else ""))
    simulate.ensure_synthetic_sites(run_args.sites_root, sites, 0, args.federation)
    simulate.ensure_public_set(run_args.public_root, 0)
    rows, policies = {}, {}
    for label in ["fedpav", *[v for v in args.variants if v != "fedpav"]]:
        variant = VARIANTS[label]
        run_args.tag, run_args.overrides = variant.tag, variant.overrides
        seeds = []
        for seed in args.seeds:
            cache = run_args.runs / label / f"seed{seed}.jsonl"
            if args.cached_only and not cache.exists():
                continue
            start = time.perf_counter()
            seeds.append({**seed_summary(compare_algorithms.cached_run(variant.preset, seed, run_args)), "seed": seed})
            print(f"== {label} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        if seeds:
            rows[label], policies[label] = seeds, bn_policy(variant, profile)
    cfg = compose_config({"profile": profile})
    caption = (f"{args.federation} (data seed 0), profile `{profile}`: {cfg.model.backbone} at {cfg.model.height}x"
               f"{cfg.model.width}, {cfg.federation.rounds} rounds, training seeds {args.seeds}. mAP (%): mean over "
               "the evaluations of the last quarter of the rounds, averaged over seeds; differences are per seed "
               "against FedPav's same seed (mean ± standard deviation, and min to max). Bytes: per round, averaged over all rounds, training-site "
               "messages only, as serialised by Flower. BN statistics: `local` = each site keeps its own (held-out "
               "sites compute theirs on their unlabelled images, AdaBN); `average` = they travel and are averaged.")
    text = bytes_table(rows, policies, caption)
    name = "bytes_" + ("demo" if args.federation == "synthetic" else args.federation.replace("synthetic-", ""))
    (args.out / f"{name}.md").write_text(text)
    plot(rows, args.out / f"{name}.png")
    print("\n" + text + f"\nwritten: {args.out / (name + '.md')}, {args.out / (name + '.png')}")


if __name__ == "__main__":
    main()
