"""Why a domain-generalisation method's gain over FedPav varies from one held-out site to the next:
the gain per in-distribution held-out site against how far that site lies from the training sites.

    python bench/feddg_reason.py                       # feddg vs fedpav, data seeds 0 1 2, seeds 0 1 2
    python bench/feddg_reason.py --method feddg_no_share

Reads the runs ``bench/feddg_benchmark.py`` keeps (and runs the missing ones). For every
(data seed, held-out site) it reports, after the fact and for analysis only (no method reads any of
it):

* the site's *style distance*: for each of its cameras, the distance from that camera's style row
  (``reid.style.camera_styles`` of its test images: the colour statistics the method shares) to
  the nearest training camera's, each of the 33 numbers scaled by its spread over the training
  cameras; the mean over the site's cameras;
* FedPav's source-only mAP there, and what AdaBN on the site's own images adds to it (the part of
  the domain gap that BatchNorm statistics carry);
* the method's source-only gain over FedPav, mean and standard deviation over the training seeds.

Then the correlation of the gain with each of the three, and how the spread of the nine paired
differences of the benchmark's table splits between data seeds (which held-out domains were drawn)
and training seeds (run-to-run noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from feddg_benchmark import data_root, run  # noqa: E402
from reid.data import fedreid9  # noqa: E402
from reid.data.layout import scan_split  # noqa: E402
from reid.data.tensor_cache import decode_images  # noqa: E402
from reid.style import camera_styles  # noqa: E402
from strategies.validation import SOURCE_ONLY, TARGET_ADAPTED  # noqa: E402

HEIGHT, WIDTH = 64, 32  # the benchmark's input size (profile fedreid9_synthetic)


def site_styles(root: Path, splits: tuple[str, ...]) -> np.ndarray:
    """One style row per camera of the site at ``root``, from the images of ``splits``."""
    samples = [s for split in splits for s in scan_split(root, split).samples]
    images = decode_images([s.path for s in samples], HEIGHT, WIDTH)
    return camera_styles(images, np.array([s.camid for s in samples]))


def style_distances(data_seed: int) -> dict[str, float]:
    """Per in-distribution held-out site: mean over its cameras of the scaled distance to the nearest
    training camera's style."""
    root = data_root(data_seed)
    training = np.concatenate([site_styles(root / s.name, ("train",)) for s in fedreid9.training_styles()])
    scale = training.std(0) + 1e-6
    out = {}
    for name in fedreid9.IN_DISTRIBUTION:
        rows = site_styles(root / name, ("gallery", "query"))
        gaps = np.linalg.norm((rows[:, None, :] - training[None, :, :]) / scale, axis=2)
        out[name] = float(gaps.min(1).mean())
    return out


def pearson(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: list[float], y: list[float]) -> float:
    ranks = [np.argsort(np.argsort(v)).astype(float) for v in (x, y)]
    return float(np.corrcoef(*ranks)[0, 1])


def spread_split(diffs: dict[int, list[float]]) -> tuple[float, float, float]:
    """Standard deviation of all paired differences, of the data seeds' means, and pooled within a
    data seed (over training seeds)."""
    every = [d for values in diffs.values() for d in values]
    means = [statistics.mean(v) for v in diffs.values()]
    within = statistics.mean(statistics.variance(v) for v in diffs.values()) ** 0.5
    return statistics.stdev(every), statistics.stdev(means), within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="feddg")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feddg_reason.md")
    args = parser.parse_args()

    rows, pair_diffs = [], {}
    for data_seed in args.data_seeds:
        distance = style_distances(data_seed)
        base = [run("fedpav", data_seed, s, args.rounds, False) for s in args.seeds]
        other = [run(args.method, data_seed, s, args.rounds, False) for s in args.seeds]
        pair_diffs[data_seed] = [100 * (o[f"in/{SOURCE_ONLY}"] - b[f"in/{SOURCE_ONLY}"]) for b, o in zip(base, other)]
        for name in fedreid9.IN_DISTRIBUTION:
            source = [100 * b[SOURCE_ONLY][name]["mAP"] for b in base]
            adapted = [100 * b[TARGET_ADAPTED][name]["mAP"] for b in base]
            gains = [100 * o[SOURCE_ONLY][name]["mAP"] - s for o, s in zip(other, source)]
            rows.append(dict(data_seed=data_seed, site=name, distance=distance[name],
                             fedpav=statistics.mean(source),
                             adabn=statistics.mean(a - s for a, s in zip(adapted, source)),
                             gain=statistics.mean(gains), gain_sd=statistics.stdev(gains) if len(gains) > 1 else 0.0))

    lines = [f"# python bench/feddg_reason.py {' '.join(sys.argv[1:])}", "",
             f"{args.method} against fedpav on synthetic-fedreid9's in-distribution held-out sites, source-only "
             f"(no image of the held-out site before ranking), {args.rounds} rounds, data seeds {args.data_seeds}, "
             f"training seeds {args.seeds}. mAP points; gain = {args.method} minus fedpav on the same "
             "(data seed, training seed), mean ± standard deviation over the training seeds. Style distance: "
             "mean over the site's cameras of the distance to the nearest training camera's style row, each "
             "number scaled by its spread over the training cameras (computed after the runs, for this "
             "analysis only).", "",
             "| data seed | site | style distance | fedpav source-only | fedpav: AdaBN adds | gain |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["distance"]):
        lines.append(f"| {r['data_seed']} | {r['site']} | {r['distance']:.2f} | {r['fedpav']:.1f} | "
                     f"{r['adabn']:+.1f} | {r['gain']:+.1f} ± {r['gain_sd']:.1f} |")
    gains = [r["gain"] for r in rows]
    lines += ["", f"Correlation of the gain with each, over the {len(rows)} (data seed, site) rows "
                  "(Pearson / Spearman):", ""]
    for key, label in (("distance", "style distance"), ("fedpav", "fedpav source-only mAP"),
                       ("adabn", "what AdaBN adds to fedpav")):
        values = [r[key] for r in rows]
        lines.append(f"- {label}: {pearson(values, gains):+.2f} / {spearman(values, gains):+.2f}")
    total, between, within = spread_split(pair_diffs)
    per_seed = ", ".join(f"data seed {d}: {statistics.mean(v):+.1f} ({min(v):+.1f} to {max(v):+.1f})"
                         for d, v in pair_diffs.items())
    lines += ["", "The benchmark table's paired differences (in-distribution mean, source-only), by data seed: "
                  f"{per_seed}. Standard deviation over all {sum(map(len, pair_diffs.values()))} pairs "
                  f"{total:.1f}; of the data seeds' means {between:.1f}; within a data seed (pooled over "
                  f"training seeds) {within:.1f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
