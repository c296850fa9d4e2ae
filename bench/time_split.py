"""Where a simulation's time goes: training, evaluation, aggregation and the framework, from the run's
own ``metrics.jsonl`` (each line's ``time_split``, server/timing.py).

    python bench/time_split.py [--federation synthetic-fedreid9] [--rounds 20] [--seed 0] [--runs RUN_FOLDER ...]

Runs ``fedreid-sim --federation synthetic-fedreid9`` (nine training sites and six held-out ones on
the Ray engine, 20 rounds, evaluated every 5) through ``fedreid.simulate``, then prints the run's
totals and each part's share, the rounds' medians, and the whole command's wall time beside the
rounds' (the rest is starting the SuperLink, Ray and the ServerApp, and stopping them).
``--runs`` reads finished run folders instead of simulating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedreid.api import load_run, simulate  # noqa: E402
from server.timing import run_split  # noqa: E402

PARTS = ("training", "evaluation", "aggregation", "framework")


def print_split(label: str, history: list[dict], command_s: float | None) -> None:
    totals = run_split(history)
    timed = [r["time_split"] for r in history if r.get("time_split")]
    print(f"\n{label}: {len(timed)} lines, rounds' wall {totals['round_s']:.1f} s"
          + (f", whole command {command_s:.1f} s" if command_s is not None else ""))
    print("| part | seconds | share of the rounds | median per line s |")
    print("|---|---:|---:|---:|")
    for part in PARTS:
        print(f"| {part} | {totals[part + '_s']:.1f} | {100 * totals['share'][part]:.1f} % | "
              f"{statistics.median(s[part + '_s'] for s in timed):.2f} |")
    print(f"| of the framework: recording (checkpoint, model file, plots) | {totals['recording_s']:.1f} | "
          f"{100 * totals['share']['recording']:.1f} % | {statistics.median(s['recording_s'] for s in timed):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federation", default="synthetic-fedreid9")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", default="fedpav")
    parser.add_argument("--runs", type=Path, nargs="*", help="finished run folders to read instead of simulating")
    args = parser.parse_args()
    if args.runs:
        for folder in args.runs:
            print_split(str(folder), load_run(folder).history, None)
        return
    with tempfile.TemporaryDirectory(prefix="fedreid-time-split-") as scratch:
        started = time.perf_counter()
        result = simulate(args.algorithm, REPO / "data" / args.federation, rounds=args.rounds, seed=args.seed,
                          federation=args.federation, profile="fedreid9_synthetic" if args.federation ==
                          "synthetic-fedreid9" else "demo", output_dir=Path(scratch) / "outputs")
        command_s = time.perf_counter() - started
        print_split(f"{args.algorithm} on {args.federation}, seed {args.seed}, {args.rounds} rounds", result.history,
                    command_s)


if __name__ == "__main__":
    main()
