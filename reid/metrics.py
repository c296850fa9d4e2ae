"""CMC, mAP and mINP with the torchreid (Market-1501) protocol, vectorised and memory-bounded.

Protocol, per query:
  * the gallery is ranked by ascending distance (NumPy's default sort: exact ties are broken
    arbitrarily but deterministically, as in torchreid);
  * gallery entries with the query's pid AND camera are removed (same-camera shots are too easy);
  * a query with no remaining true match is skipped and does not count in the averages;
  * CMC[k] = 1 from the rank of the first true match on; AP is the non-interpolated mean of
    precision@k over every remaining true match; INP = (#true matches) / (rank of the last one).

Both mAP conventions are reported: ``mAP`` is torchreid's (above; what most re-ID work reports)
and ``mAP_market`` the original Market-1501 one that the FedReID code uses: per hit, recall step
x (precision before the hit + precision at it) / 2 (a trapezoid), averaged over ALL queries, so a
query without a true match counts as 0. It is usually about 1 point lower.

Queries are processed in chunks, so the working memory beyond the distance matrix stays near
``chunk_elements`` x ~20 bytes whatever the gallery size. A gallery shorter than ``max_rank``
lowers ``max_rank``; a query whose remaining list is shorter than ``max_rank`` keeps its last
CMC value (1, once matched) for the missing ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RankResult:
    """CMC curve (cmc[k-1] = Rank-k), mAP and mINP in [0, 1], and how many queries counted."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int
    mAP_market: float = float("nan")

    def rank(self, k: int) -> float:
        """Rank-k accuracy; beyond a short gallery the curve stays at its last value."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])


def _check_inputs(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                  q_camids: np.ndarray, g_camids: np.ndarray) -> None:
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D [queries, gallery], got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat is empty: {num_q} queries x {num_g} gallery entries")
    for name, array, size in (("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q),
                              ("g_pids", g_pids, num_g), ("g_camids", g_camids, num_g)):
        if np.asarray(array).shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {np.asarray(array).shape}")


def _no_valid_query() -> ValueError:
    return ValueError("no valid query: no query has a true match in the gallery once same-pid, "
                      "same-camera entries are removed; check the query/gallery split")


def _count_before_in_row(rows: np.ndarray, flags: np.ndarray, num_rows: int) -> np.ndarray:
    """For entries grouped by row (rows ascending), how many flagged entries precede each one in its row."""
    exclusive = np.cumsum(flags) - flags
    counts = np.bincount(rows, minlength=num_rows)
    row_start = np.cumsum(counts) - counts
    return exclusive - exclusive[row_start[rows]]


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> RankResult:
    """Evaluate a [Q, G] distance matrix (smaller = more similar) with the torchreid protocol.

    Only the sort is dense: true matches are sparse, so each one's rank among the kept entries is
    its sorted position minus the removed (same-camera) matches before it, computed on the
    match coordinates alone.
    """
    _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        log.info("gallery has only %d entries: max_rank lowered from %d", num_g, max_rank)
        max_rank = num_g
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    first_hits = np.zeros(max_rank + 1, dtype=np.int64)  # histogram of first-match ranks
    ap_sum, inp_sum, trapezoid_sum, num_valid = 0.0, 0.0, 0.0, 0
    chunk = max(1, chunk_elements // num_g)
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        rows_here = stop - start
        order = np.argsort(distmat[start:stop], axis=1)
        rows, cols = np.nonzero(g_pids[order] == q_pids[start:stop, None])  # row-major: cols ascend
        removed = g_camids[order[rows, cols]] == q_camids[start + rows]
        del order
        kept_rank = cols - _count_before_in_row(rows, removed, rows_here)  # 0-based, junk removed
        hit = ~removed
        rows, kept_rank = rows[hit], kept_rank[hit]
        hit_number = _count_before_in_row(rows, np.ones_like(rows), rows_here) + 1  # 1-based
        num_pos = np.bincount(rows, minlength=rows_here)
        precision = hit_number / (kept_rank + 1)
        ap = np.bincount(rows, weights=precision, minlength=rows_here)
        before = np.where(kept_rank > 0, (hit_number - 1) / np.maximum(kept_rank, 1), 1.0)
        trapezoid = np.bincount(rows, weights=(before + precision) / 2, minlength=rows_here)
        valid = num_pos > 0
        is_first = hit_number == 1
        is_last = hit_number == num_pos[rows]
        last_rank = np.zeros(rows_here, dtype=np.int64)
        last_rank[rows[is_last]] = kept_rank[is_last]
        ap_sum += float((ap[valid] / num_pos[valid]).sum())
        trapezoid_sum += float((trapezoid[valid] / num_pos[valid]).sum())
        inp_sum += float((num_pos[valid] / (last_rank[valid] + 1)).sum())
        first_hits += np.bincount(np.minimum(kept_rank[is_first], max_rank), minlength=max_rank + 1)
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise _no_valid_query()
    cmc = (np.cumsum(first_hits[:max_rank]) / num_valid).astype(np.float32)
    return RankResult(cmc=cmc, mAP=ap_sum / num_valid, mINP=inp_sum / num_valid,
                      num_valid_queries=num_valid, num_skipped_queries=num_q - num_valid,
                      mAP_market=trapezoid_sum / num_q)


def evaluate_rank_reference(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> RankResult:
    """The same protocol as a plain per-query loop: slow and obviously right; the oracle for tests
    and the baseline of ``bench/eval_speed.py``."""
    _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    cmcs, aps, inps, trapezoids = [], [], [], []
    for q in range(num_q):
        order = np.argsort(distmat[q])
        removed = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        hits = (g_pids[order] == q_pids[q])[~removed].astype(np.float64)
        if not hits.any():
            continue
        cmc = np.minimum(hits.cumsum(), 1.0)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        cmcs.append(cmc)
        ranks = np.flatnonzero(hits)
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))
        inps.append(len(ranks) / (ranks[-1] + 1))
        trapezoid = 0.0
        for hit, rank in enumerate(ranks):  # Market-1501's compute_AP, literally
            precision = (hit + 1) / (rank + 1)
            old_precision = hit / rank if rank != 0 else 1.0
            trapezoid += (1.0 / len(ranks)) * (old_precision + precision) / 2
        trapezoids.append(trapezoid)
    if not cmcs:
        raise _no_valid_query()
    return RankResult(cmc=np.mean(cmcs, axis=0).astype(np.float32), mAP=float(np.mean(aps)),
                      mINP=float(np.mean(inps)), num_valid_queries=len(cmcs),
                      num_skipped_queries=num_q - len(cmcs), mAP_market=float(np.sum(trapezoids) / num_q))
