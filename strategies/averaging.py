"""Weighted averaging of named arrays: the arithmetic of FedPav-style aggregation, nothing else."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


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
