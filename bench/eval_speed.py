"""Benchmark: vectorised ``evaluate_rank`` against the per-query loop, side by side in one run.

Market-1501 scale (3,368 queries x 15,913 gallery, 512-d features): both evaluators on the same
distance matrix, their times, the ratio, and whether CMC/mAP/mINP agree.
MSMT17 scale (11,659 x 82,161): the vectorised evaluator alone, in a fresh process, reporting its
time and the process's peak memory (the float32 distance matrix alone is 3.8 GB).

    python bench/eval_speed.py            # both parts
    python bench/eval_speed.py --skip-msmt
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reid.metrics import evaluate_rank, evaluate_rank_reference  # noqa: E402


def synthetic_problem(num_q: int, num_g: int, num_ids: int, num_cams: int, dim: int = 512, seed: int = 0):
    """Clustered unit features (one centre per identity, heavy noise) and their cosine distances."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.concatenate([q_pids[rng.permutation(num_q)][: num_g // 3], rng.integers(0, num_ids, num_g)])[:num_g]
    q_cams, g_cams = rng.integers(1, num_cams + 1, num_q), rng.integers(1, num_cams + 1, num_g)
    centres = rng.normal(size=(num_ids, dim)).astype(np.float32)

    def features(pids: np.ndarray) -> np.ndarray:
        f = centres[pids] + rng.normal(scale=2.5, size=(len(pids), dim)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    q, g = features(q_pids), features(g_pids)
    distmat = np.empty((num_q, num_g), dtype=np.float32)
    for start in range(0, num_q, 1024):  # in blocks, so no float64 or temporary Q x G copy is made
        np.matmul(q[start:start + 1024], g.T, out=distmat[start:start + 1024])
    np.subtract(1.0, distmat, out=distmat)
    return distmat, q_pids, g_pids, q_cams, g_cams


def market(repeats: int) -> None:
    problem = synthetic_problem(3368, 15913, 751, 6)
    fast_times, loop_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        start = time.perf_counter()
        fast = evaluate_rank(*problem)
        fast_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        slow = evaluate_rank_reference(*problem)
        loop_times.append(time.perf_counter() - start)
    agree = (np.array_equal(fast.cmc, slow.cmc) and abs(fast.mAP - slow.mAP) < 1e-9
             and abs(fast.mINP - slow.mINP) < 1e-9)
    best_fast, best_loop = min(fast_times), min(loop_times)
    print("Market-1501 scale: 3368 queries x 15913 gallery, 512-d")
    print(f"  vectorised evaluate_rank : {best_fast:6.2f} s (best of {repeats}: {', '.join(f'{t:.2f}' for t in fast_times)})")
    print(f"  per-query loop           : {best_loop:6.2f} s (best of {repeats}: {', '.join(f'{t:.2f}' for t in loop_times)})")
    print(f"  loop / vectorised        : {best_loop / best_fast:6.2f}x")
    print(f"  results agree            : {agree} (Rank-1 {fast.rank(1):.4f}, mAP {fast.mAP:.4f}, mINP {fast.mINP:.4f})")


def _msmt_child(out: mp.Queue) -> None:
    start = time.perf_counter()
    problem = synthetic_problem(11659, 82161, 3060, 15)
    built = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    result = evaluate_rank(*problem)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.put((built, elapsed, rss_before, peak, problem[0].nbytes / 2**30, result.rank(1), result.mAP))


def msmt() -> None:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_msmt_child, args=(queue,))
    child.start()
    built, elapsed, rss_before, peak, dist_gb, rank1, mAP = queue.get()
    child.join()
    print("MSMT17 scale: 11659 queries x 82161 gallery, 512-d (fresh process)")
    print(f"  building the problem     : {built:6.1f} s; distance matrix {dist_gb:.2f} GiB")
    print(f"  vectorised evaluate_rank : {elapsed:6.1f} s (Rank-1 {rank1:.4f}, mAP {mAP:.4f})")
    print(f"  peak RSS before / during : {rss_before:.2f} / {peak:.2f} GiB (target < 6 GB in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-msmt", action="store_true")
    args = parser.parse_args()
    market(args.repeats)
    if not args.skip_msmt:
        msmt()


if __name__ == "__main__":
    main()
