"""Generalisation to camera sites that never trained, as the FedDG-ReID papers measure it: a method
against FedPav on synthetic-fedreid9's held-out sites under both protocols, paired per seed.

    python bench/feddg_benchmark.py                                   # feddg vs fedpav, data seed 0, seeds 0 1 2
    python bench/feddg_benchmark.py --data-seeds 0 1 2 --seeds 0 1 2  # the full 3 x 3
    python bench/feddg_benchmark.py --methods fedpav feddg feddg_no_share local

Each data seed is its own copy of the benchmark (``fedreid-synth --federation synthetic-fedreid9
--seed N``: the nine training sites' cameras and people, and four in-distribution held-out sites
drawn anew; night and dusk keep their looks), written once to data/synthetic-fedreid9-data<N>.
Every (method, data seed, training seed) is one 20-round ``fedreid-sim`` run (profile
fedreid9_synthetic); its summary is kept under bench/results/runs/feddg/ and reused (``--rerun``).

Reported, from each run's last evaluation: the training sites' mean mAP; the in-distribution
held-out sites (unseen-a..d) and the out-of-range ones (night, dusk), each under source-only (no
target image: the federation's BatchNorm statistics) and target-adapted (AdaBN on the site's own
unlabelled images) -- never mixed in one column. Differences to FedPav are paired on the same
(data seed, training seed): their mean, standard deviation and range. ``local`` (each site alone)
is the floor: its best single site per held-out site.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedreid.api import simulate  # noqa: E402
from reid.data import fedreid9  # noqa: E402
from reid.data.federations import generate_sites  # noqa: E402
from strategies.held_out import unseen_results  # noqa: E402
from strategies.validation import SOURCE_ONLY, TARGET_ADAPTED  # noqa: E402

RUNS = REPO / "bench" / "results" / "runs" / "feddg"
# Only the last round's numbers are reported. ``local`` ranks every held-out site with each of the
# nine sites' models under both protocols (108 rankings an evaluation): it evaluates once, at the end.
LAST_ROUND_ONLY = {"local": "federation.eval_every=1000 federation.eval_at_start=false"}
COLUMNS = [("training sites", "train", None), ("in-distribution, source-only", "in", SOURCE_ONLY),
           ("in-distribution, target-adapted", "in", TARGET_ADAPTED), ("out of range, source-only", "out", SOURCE_ONLY),
           ("out of range, target-adapted", "out", TARGET_ADAPTED)]


def data_root(data_seed: int) -> Path:
    """The benchmark of ``data_seed``, generated once."""
    root = REPO / "data" / f"synthetic-fedreid9-data{data_seed}"
    if not all((root / style.name / "gallery").is_dir() for style in fedreid9.styles(data_seed)):
        print(f"generating synthetic-fedreid9 for data seed {data_seed} in {root}", flush=True)
        generate_sites(root, len(fedreid9.styles(data_seed)), seed=data_seed, overwrite=True,
                       federation=fedreid9.FEDERATION)
    return root


def summary(history: list[dict]) -> dict:
    """The numbers of a run's last evaluated round (mAP in [0, 1])."""
    last = [r for r in history if r.get("evaluate") and (r["evaluate"] or {}).get("sites")][-1]
    groups = {"in": fedreid9.IN_DISTRIBUTION, "out": fedreid9.OUT_OF_RANGE}
    out: dict = {"round": last["round"], "train": statistics.mean(m["mAP"] for m in last["evaluate"]["sites"].values())}
    for protocol in (SOURCE_ONLY, TARGET_ADAPTED):
        sites = unseen_results(last.get("unseen"), protocol)["sites"]
        out[protocol] = {name: {"mAP": m["mAP"], "rank1": m["rank1"], "model": m.get("model", "global")}
                         for name, m in sites.items()}
        for group, names in groups.items():
            values = [sites[n]["mAP"] for n in names if n in sites]
            out[f"{group}/{protocol}"] = statistics.mean(values) if len(values) == len(names) else float("nan")
    return out


def run(method: str, data_seed: int, seed: int, rounds: int, rerun: bool) -> dict:
    path = RUNS / f"{method}-data{data_seed}-seed{seed}-r{rounds}.json"
    if path.is_file() and not rerun:
        return json.loads(path.read_text())
    root = data_root(data_seed)
    print(f"running {method}, data seed {data_seed}, training seed {seed}, {rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedreid-feddg-") as scratch:
        result = simulate(method, root, rounds=rounds, seed=seed, federation=fedreid9.FEDERATION,
                          profile="fedreid9_synthetic", output_dir=Path(scratch), generate=False,
                          overrides=LAST_ROUND_ONLY.get(method))
        numbers = summary(result.history)
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers, indent=1))
    return numbers


def value(numbers: dict, key: str, protocol: str | None) -> float:
    return numbers["train"] if protocol is None else numbers[f"{key}/{protocol}"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def paired(base: list[dict], other: list[dict], key: str, protocol: str | None) -> str:
    """Mean paired difference in mAP points, its standard deviation and range over the pairs."""
    diffs = [100 * (value(o, key, protocol) - value(b, key, protocol)) for b, o in zip(base, other)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.1f} ± {spread:.1f} ({min(diffs):+.1f} to {max(diffs):+.1f})"


def table(results: dict[str, list[dict]], pairs: list[tuple[int, int]], rounds: int) -> str:
    lines = [f"synthetic-fedreid9, {rounds} rounds, {len(pairs)} (data seed, training seed) pairs: "
             f"{', '.join(f'({d}, {s})' for d, s in pairs)}. mAP in percent, mean over the pairs; "
             "held-out sites never trained. Source-only: ranked with no image of the held-out site "
             "(the training sites' BatchNorm statistics, averaged as FedAvg weighs); target-adapted: after "
             "AdaBN on its unlabelled training images. In-distribution: unseen-a..d; out of range: night, dusk.", "",
             "| method | " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method, runs in results.items():
        cells = [_pct(statistics.mean(value(r, key, protocol) for r in runs)) for _, key, protocol in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "fedpav" in results:
        lines += ["", "Paired differences to fedpav, mAP points: mean ± standard deviation (min to max) over the pairs.",
                  "", "| method | " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
        for method, runs in results.items():
            if method != "fedpav":
                lines.append(f"| {method} - fedpav | " + " | ".join(paired(results["fedpav"], runs, key, protocol)
                                                                    for _, key, protocol in COLUMNS) + " |")
    held = fedreid9.HELD_OUT
    lines += ["", "Per held-out site, mAP (source-only / target-adapted), mean over the pairs:", "",
              "| method | " + " | ".join(held) + " |", "|---|" + "---:|" * len(held)]
    for method, runs in results.items():
        cells = [f"{_pct(statistics.mean(r[SOURCE_ONLY][s]['mAP'] for r in runs))} / "
                 f"{_pct(statistics.mean(r[TARGET_ADAPTED][s]['mAP'] for r in runs))}" for s in held]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fedpav", "feddg"])
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feddg_benchmark.md")
    args = parser.parse_args()
    pairs = [(d, s) for d in args.data_seeds for s in args.seeds]
    results = {method: [run(method, d, s, args.rounds, args.rerun) for d, s in pairs] for method in args.methods}
    text = table(results, pairs, args.rounds)
    print(text)
    args.out.write_text(f"# python bench/feddg_benchmark.py {' '.join(sys.argv[1:])}\n\n{text}")


if __name__ == "__main__":
    main()
