"""What the transport precision (``transport.dtype``) costs in accuracy and saves in bytes.

    python bench/transport_dtype.py [--seeds 0 1 2] [--dtypes float32 bfloat16 float16]

The README's demo federation (3 synthetic sites, 20 rounds, the small model, Ray simulation) once
per (dtype, seed); prints the final mean mAP and Rank-1 (mean and min-max over seeds) and the MB
per round down and up, as measured from the serialised messages.
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
from server.simulate import main as simulate  # noqa: E402


def run(dtype: str, seed: int, out: Path) -> list[dict]:
    folder = out / f"{dtype}-seed{seed}"
    code = simulate(["--profile", "demo", "--seed", str(seed), "--overrides", f"transport.dtype={dtype}",
                     "--output-dir", str(folder)])
    if code != 0:
        raise RuntimeError(f"the {dtype} run with seed {seed} failed")
    (metrics,) = folder.glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedreid-dtype-") as scratch:
        for dtype in args.dtypes:
            runs = [run(dtype, seed, Path(scratch)) for seed in args.seeds]
            final = [[r for r in lines if r.get("evaluate")][-1]["evaluate"]["mean"] for lines in runs]
            trained = [r["train"] for lines in runs for r in lines if r.get("train")]
            maps = [100 * f["mAP"] for f in final]
            rows.append((dtype, statistics.mean(maps), min(maps), max(maps),
                         statistics.mean(100 * f["rank1"] for f in final),
                         statistics.mean(t["bytes"]["sent"] for t in trained) / 1e6,
                         statistics.mean(t["bytes"]["received"] for t in trained) / 1e6))
    print(f"demo federation, seeds {args.seeds}; final evaluation after round 20")
    print("| transport.dtype | mean mAP (min-max) | mean Rank-1 | MB down / round | MB up / round |")
    print("|---|---:|---:|---:|---:|")
    for dtype, mean_map, low, high, rank1, down, up in rows:
        print(f"| {dtype} | {mean_map:.1f} ({low:.1f}-{high:.1f}) | {rank1:.1f} | {down:.1f} | {up:.1f} |")


if __name__ == "__main__":
    main()
