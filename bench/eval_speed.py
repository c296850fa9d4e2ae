"""Benchmark: the evaluator that ranks only the true matches, against a bare ``np.argsort`` of the
same distance matrix (what any evaluator that sorts the gallery rows cannot go below), in one run.

Market-1501 scale (3,368 queries x 15,913 gallery, 512-d features): a bare argsort of the distance
matrix; ``evaluate_rank`` on that matrix; ``evaluate_features`` from the features (distances
included, chunk by chunk); whether they agree with the per-query loop on the first 400 queries.
MSMT17 scale (11,659 x 82,161): ``evaluate_features`` alone, in a fresh process, with its time and
the process's peak memory (the float32 distance matrix it never builds would be 3.8 GB).

    python bench/eval_speed.py            # both parts
    python bench/eval_speed.py --skip-msmt
    python bench/eval_speed.py --device cuda
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
from reid.metrics import evaluate_features, evaluate_rank, evaluate_rank_reference  # noqa: E402


def synthetic_features(num_q: int, num_g: int, num_ids: int, num_cams: int, dim: int = 512, seed: int = 0):
    """Clustered unit features (one centre per identity, heavy noise): q, g, and the labels."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.concatenate([q_pids[rng.permutation(num_q)][: num_g // 3], rng.integers(0, num_ids, num_g)])[:num_g]
    q_cams, g_cams = rng.integers(1, num_cams + 1, num_q), rng.integers(1, num_cams + 1, num_g)
    centres = rng.normal(size=(num_ids, dim)).astype(np.float32)

    def features(pids: np.ndarray) -> np.ndarray:
        f = centres[pids] + rng.normal(scale=2.5, size=(len(pids), dim)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    return features(q_pids), features(g_pids), q_pids, g_pids, q_cams, g_cams


def distances(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """1 - q g^T in float32, built in blocks so that no float64 or temporary [Q, G] copy is made."""
    num_q, num_g = len(q), len(g)
    distmat = np.empty((num_q, num_g), dtype=np.float32)
    for start in range(0, num_q, 1024):  # in blocks, so no float64 or temporary Q x G copy is made
        np.matmul(q[start:start + 1024], g.T, out=distmat[start:start + 1024])
    np.subtract(1.0, distmat, out=distmat)
    return distmat


def _best(times: list[float]) -> str:
    return f"{min(times):6.2f} s (best of {len(times)}: {', '.join(f'{t:.2f}' for t in times)})"


def market(repeats: int, device: str) -> None:
    q, g, q_pids, g_pids, q_cams, g_cams = synthetic_features(3368, 15913, 751, 6)
    distmat = distances(q, g)
    labels = (q_pids, g_pids, q_cams, g_cams)
    sort_times, rank_times, feature_times = [], [], []
    for _ in range(repeats):  # interleaved, so all three see the same machine state
        start = time.perf_counter()
        np.argsort(distmat, axis=1)
        sort_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        from_matrix = evaluate_rank(distmat, *labels)
        rank_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        from_features = evaluate_features(q, g, *labels, device=device)
        feature_times.append(time.perf_counter() - start)
    few = 400
    loop = evaluate_rank_reference(distmat[:few], q_pids[:few], g_pids, q_cams[:few], g_cams)
    head = evaluate_rank(distmat[:few], q_pids[:few], g_pids, q_cams[:few], g_cams)
    agree = (np.array_equal(head.cmc, loop.cmc) and abs(head.mAP - loop.mAP) < 1e-9 and abs(head.mINP - loop.mINP) < 1e-9
             and np.array_equal(from_matrix.cmc, from_features.cmc) and abs(from_matrix.mAP - from_features.mAP) < 1e-6)
    print(f"Market-1501 scale: 3368 queries x 15913 gallery, 512-d; evaluate_features on {device}")
    print(f"  bare np.argsort of the matrix      : {_best(sort_times)}")
    print(f"  evaluate_rank (given the matrix)   : {_best(rank_times)}")
    print(f"  evaluate_features (distances too)  : {_best(feature_times)}")
    print(f"  argsort / evaluate_rank            : {min(sort_times) / min(rank_times):6.2f}x")
    print(f"  argsort / evaluate_features        : {min(sort_times) / min(feature_times):6.2f}x")
    print(f"  agree (loop on {few} queries; matrix = features): {agree} (Rank-1 {from_features.rank(1):.4f}, "
          f"mAP {from_features.mAP:.4f}, mINP {from_features.mINP:.4f})")


def _msmt_child(out: mp.Queue, device: str) -> None:
    start = time.perf_counter()
    problem = synthetic_features(11659, 82161, 3060, 15)
    built = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    result = evaluate_features(*problem, device=device)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.put((built, elapsed, rss_before, peak, 11659 * 82161 * 4 / 2**30, result.rank(1), result.mAP))


def msmt(device: str) -> None:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_msmt_child, args=(queue, device))
    child.start()
    built, elapsed, rss_before, peak, dist_gb, rank1, mAP = queue.get()
    child.join()
    print("MSMT17 scale: 11659 queries x 82161 gallery, 512-d (fresh process)")
    print(f"  building the features      : {built:6.1f} s (the distance matrix would be {dist_gb:.2f} GiB)")
    print(f"  evaluate_features ({device}) : {elapsed:6.1f} s (Rank-1 {rank1:.4f}, mAP {mAP:.4f})")
    print(f"  peak RSS before / during   : {rss_before:.2f} / {peak:.2f} GiB (target: at most 2 GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-msmt", action="store_true")
    parser.add_argument("--device", default="cpu", help="where evaluate_features computes (cpu, cuda)")
    args = parser.parse_args()
    market(args.repeats, args.device)
    if not args.skip_msmt:
        msmt(args.device)


if __name__ == "__main__":
    main()
