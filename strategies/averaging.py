"""Weighted averaging of named arrays, plain and mask-aware: the arithmetic of aggregation, nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from strategies.sparse_records import Tensor


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1; refuses negative, non-finite or all-zero weights."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need at least one weight")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero")
    return w / total


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k * x_k / sum_k w_k per key, accumulated in float64 and returned in each key's dtype."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = normalise_weights(weights)
    result = {}
    for key, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for wk, update in zip(w, updates):
            acc += wk * update[key]
        result[key] = acc.astype(first.dtype)
    return result


def masked_weighted_average(updates: Sequence[Mapping[str, "Tensor"]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Mask-aware average: each element is averaged over the sites that kept it,

        out[i] = sum_k w_k m_k[i] x_k[i] / sum_k w_k m_k[i],

    and an element no site kept stays zero. Tensors without a mask count as fully kept, so for
    them this is the plain weighted average. Accumulates in float64; returns each key's dtype.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = normalise_weights(weights)
    result = {}
    for key, first in updates[0].items():
        numerator = np.zeros(first.values.shape, dtype=np.float64)
        masked = [u[key].mask for u in updates if u[key].mask is not None]
        for wk, update in zip(w, updates):
            numerator += wk * update[key].values  # pruned entries are zero: they add nothing
        if not masked:
            result[key] = numerator.astype(first.values.dtype)
            continue
        denominator = np.zeros(first.values.shape, dtype=np.float64)
        for wk, update in zip(w, updates):
            if update[key].mask is None:
                denominator += wk
            else:
                np.add(denominator, wk, out=denominator, where=update[key].mask)
        out = np.zeros(first.values.shape, dtype=np.float64)
        np.divide(numerator, denominator, out=out, where=denominator > 0)
        result[key] = out.astype(first.values.dtype)
    return result
