"""CMC, mAP and mINP with the torchreid (Market-1501) protocol, vectorised and memory-bounded.

Protocol, per query:
  * the gallery is ranked by ascending distance; at exactly equal distances the entry with the
    smaller gallery index ranks first (a stable sort's order; torchreid's default argsort breaks
    such ties arbitrarily, which only moves results where features are exactly equal);
  * gallery entries with the query's pid AND camera are removed (same-camera shots are too easy);
  * a query with no remaining true match is skipped and does not count in the averages;
  * CMC[k] = 1 from the rank of the first true match on; AP is the non-interpolated mean of
    precision@k over every remaining true match; INP = (#true matches) / (rank of the last one).

Both mAP conventions are reported: ``mAP`` is torchreid's (above; what most re-ID work reports)
and ``mAP_market`` the original Market-1501 one that the FedReID code uses: per hit, recall step
x (precision before the hit + precision at it) / 2 (a trapezoid), averaged over ALL queries, so a
query without a true match counts as 0. It is usually about 1 point lower.

No gallery row is sorted: a query's CMC and AP depend only on the ranks of its few true matches,
and each match's rank is a count (``match_ranks``). Queries are processed in chunks of about
``chunk_elements`` distances; ``evaluate_features`` computes those distances from the features
chunk by chunk (on the GPU when the features are there) and never holds the whole matrix.
A gallery shorter than ``max_rank``
lowers ``max_rank``; a query whose remaining list is shorter than ``max_rank`` keeps its last
CMC value (1, once matched) for the missing ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # distances per chunk of queries: 64 MB of float32


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
    _check_labels(*distmat.shape, q_pids, g_pids, q_camids, g_camids)


def _check_labels(num_q: int, num_g: int, q_pids: np.ndarray, g_pids: np.ndarray,
                  q_camids: np.ndarray, g_camids: np.ndarray) -> None:
    if num_q == 0 or num_g == 0:
        raise ValueError(f"nothing to rank: {num_q} queries x {num_g} gallery entries")
    for name, array, size in (("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q),
                              ("g_pids", g_pids, num_g), ("g_camids", g_camids, num_g)):
        if np.asarray(array).shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {np.asarray(array).shape}")


def _no_valid_query() -> ValueError:
    return ValueError("no valid query: no query has a true match in the gallery once same-pid, "
                      "same-camera entries are removed; check the query/gallery split")


class _Totals:
    """Running sums of the per-query metrics over chunks of queries."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.first_hits = np.zeros(max_rank + 1, dtype=np.int64)  # histogram of first-match ranks
        self.ap, self.inp, self.trapezoid, self.valid, self.queries = 0.0, 0.0, 0.0, 0, 0

    def add(self, rows: np.ndarray, kept_rank: np.ndarray, rows_here: int) -> None:
        """One chunk's true matches: their query row and 0-based rank among the kept gallery entries,
        grouped by row and ascending within it."""
        hit_number = np.arange(len(rows)) - np.searchsorted(rows, rows) + 1  # 1-based within its row
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
        self.ap += float((ap[valid] / num_pos[valid]).sum())
        self.trapezoid += float((trapezoid[valid] / num_pos[valid]).sum())
        self.inp += float((num_pos[valid] / (last_rank[valid] + 1)).sum())
        self.first_hits += np.bincount(np.minimum(kept_rank[is_first], self.max_rank), minlength=self.max_rank + 1)
        self.valid += int(valid.sum())
        self.queries += rows_here

    def result(self) -> RankResult:
        if self.valid == 0:
            raise _no_valid_query()
        cmc = (np.cumsum(self.first_hits[: self.max_rank]) / self.valid).astype(np.float32)
        return RankResult(cmc=cmc, mAP=self.ap / self.valid, mINP=self.inp / self.valid,
                          num_valid_queries=self.valid, num_skipped_queries=self.queries - self.valid,
                          mAP_market=self.trapezoid / self.queries)


class GalleryIndex:
    """The gallery's entries grouped by identity, so that a query's own identity's entries are found
    without comparing it with every gallery label."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor) -> None:
        self.pids, self.camids = g_pids, g_camids
        self.order = torch.argsort(g_pids, stable=True)
        self.identities, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def same_identity(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query row, gallery index) of every gallery entry with the query's identity."""
        at = torch.searchsorted(self.identities, q_pids).clamp(max=len(self.identities) - 1)
        count = torch.where(self.identities[at] == q_pids, self.counts[at], 0)
        rows = torch.repeat_interleave(torch.arange(len(q_pids), device=q_pids.device), count)
        within = torch.arange(len(rows), device=q_pids.device) - (torch.cumsum(count, 0) - count)[rows]
        return rows, self.order[self.starts[at][rows] + within]


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 keys whose order is the float32 values' order (-0.0 and +0.0 equal)."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    flipped = bits ^ ((bits >> 31) | torch.tensor(-2**31, dtype=torch.int32, device=bits.device))
    return flipped.to(torch.int64) & 0xFFFFFFFF


def _sort(keys: torch.Tensor) -> torch.Tensor:
    """Ascending; on the CPU through NumPy, whose sort of int64 is several times faster than torch's."""
    return torch.sort(keys).values if keys.is_cuda else torch.from_numpy(np.sort(keys.numpy()))


def match_ranks(distances: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor,
                gallery: GalleryIndex) -> tuple[np.ndarray, np.ndarray]:
    """The true matches of a chunk of queries, as (query row, 0-based rank among the kept gallery
    entries), grouped by row and ascending, without sorting any gallery row.

    Only entries no farther than a query's farthest true match can stand before one of its matches;
    they are found with one comparison per distance. Each gets one integer key, (row, distance,
    gallery index) in that order of significance, so that one sort of those few keys orders every
    row by distance with ties broken by gallery index (the tie rule, a stable sort's), and a match's
    rank is its key's position minus its row's start. Entries of the query's identity seen by the
    query's own camera are not ranked at all.
    """
    num_rows, num_g = distances.shape
    col_bits = max(1, (num_g - 1).bit_length())
    if num_rows > 1 << (31 - col_bits):
        raise ValueError(f"{num_rows} queries in one chunk exceed the key's {31 - col_bits} row bits "
                         f"at a gallery of {num_g}: lower chunk_elements")
    rows, cols = gallery.same_identity(q_pids)
    removed = gallery.camids[cols] == q_camids[rows]
    hit_rows, hit_cols = rows[~removed], cols[~removed]
    if len(hit_rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    farthest = torch.full((num_rows,), float("-inf"), dtype=distances.dtype, device=distances.device)
    farthest.scatter_reduce_(0, hit_rows, distances[hit_rows, hit_cols], reduce="amax")
    candidate = distances <= farthest[:, None]
    candidate[rows[removed], cols[removed]] = False
    c_rows, c_cols = candidate.nonzero(as_tuple=True)
    del candidate

    def keys(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (r << (32 + col_bits)) | (_order_keys(distances[r, c]) << col_bits) | c

    ordered = _sort(keys(c_rows, c_cols))
    per_row = torch.bincount(c_rows, minlength=num_rows)
    position = torch.searchsorted(ordered, keys(hit_rows, hit_cols).to(ordered.device))
    rank = position.to(per_row.device) - (torch.cumsum(per_row, 0) - per_row)[hit_rows]
    order = torch.argsort(hit_rows * num_g + rank)  # grouped by row, ascending rank
    return hit_rows[order].cpu().numpy(), rank[order].cpu().numpy()


def _as_tensor(values: np.ndarray | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.to(device) if device is not None else tensor


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> RankResult:
    """Evaluate a given [Q, G] distance matrix (smaller = more similar) with the torchreid protocol,
    ranking only the true matches (``match_ranks``), a chunk of queries at a time."""
    _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    return _rank_in_chunks(lambda start, stop: torch.from_numpy(np.ascontiguousarray(distmat[start:stop])),
                           distmat.shape, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_elements, None)


def _rank_in_chunks(distances: Callable[[int, int], torch.Tensor], shape: tuple[int, int], q_pids: np.ndarray,
                    g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray, max_rank: int,
                    chunk_elements: int, device: torch.device | None) -> RankResult:
    """The metrics over chunks of about ``chunk_elements`` distances, ``distances(start, stop)``
    giving the rows of queries start..stop."""
    num_q, num_g = shape
    totals = _Totals(_lowered(max_rank, num_g))
    gallery = GalleryIndex(_as_tensor(g_pids, device), _as_tensor(g_camids, device))
    q_pid_t, q_cam_t = _as_tensor(q_pids, device), _as_tensor(q_camids, device)
    chunk = max(1, chunk_elements // num_g)
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        rows, ranks = match_ranks(distances(start, stop), q_pid_t[start:stop], q_cam_t[start:stop], gallery)
        totals.add(rows, ranks, stop - start)
    return totals.result()


@torch.no_grad()
def evaluate_features(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    device: torch.device | str | None = None,
) -> RankResult:
    """``evaluate_rank`` of the cosine distances 1 − q·g of L2-normalised features, computed a chunk
    of queries at a time on ``device`` (the features' own by default): no [Q, G] matrix is ever
    held, so an MSMT17-sized site (11,659 × 82,161) needs a few hundred MB, not 3.8 GB."""
    num_q, num_g = len(q_feats), len(g_feats)
    _check_labels(num_q, num_g, q_pids, g_pids, q_camids, g_camids)
    device = torch.device(device) if device is not None else None
    queries, gallery = _as_tensor(q_feats, device).float(), _as_tensor(g_feats, device).float()
    return _rank_in_chunks(  # 1 - q.g, computed in place
        lambda start, stop: torch.mm(queries[start:stop], gallery.T).neg_().add_(1.0), (num_q, num_g),
        q_pids, g_pids, q_camids, g_camids, max_rank, chunk_elements, gallery.device)


def _lowered(max_rank: int, num_g: int) -> int:
    if num_g < max_rank:
        log.info("gallery has only %d entries: max_rank lowered from %d", num_g, max_rank)
    return min(max_rank, num_g)


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
        order = np.argsort(distmat[q], kind="stable")
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
