"""Weighted averaging of named arrays, plain and mask-aware: the arithmetic of aggregation, nothing else.

Sums run in float32, block by block with in-place operations, in the order the updates are given,
so the same inputs always give the same bits.
"""

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


BLOCK = 1 << 15  # elements per block: a block's sums stay in the CPU cache while every site is added


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1)


def _weighted_mean_blocked(values: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None,
                           weights: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """sum_k w_k x_k, divided by sum_k w_k m_k when masks are given, in float32 and in cache-sized blocks.

    Every site's block is read once while the block's sums stay in the cache, so the masked
    version costs little more than the plain one."""
    w = weights.astype(np.float32)
    flats = [_flat(v) for v in values]
    bits = None if masks is None else [None if m is None else _flat(m).view(np.uint8) for m in masks]
    size = flats[0].size
    out = np.empty(size, dtype=np.float32)
    scratch = np.empty(min(BLOCK, size), dtype=np.float32)
    denominator = np.empty(min(BLOCK, size), dtype=np.float32)
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        total, tmp, den = out[start:stop], scratch[: stop - start], denominator[: stop - start]
        total[:] = 0
        den[:] = 0
        for k, weight in enumerate(w):
            np.multiply(flats[k][start:stop], weight, out=tmp)
            total += tmp
            if bits is not None:
                if bits[k] is None:
                    den += weight
                else:
                    np.multiply(bits[k][start:stop], weight, out=tmp)
                    den += tmp
        if bits is not None:
            np.maximum(den, np.float32(1e-30), out=den)  # nobody kept it: 0 / tiny = 0
            total /= den
    return out.reshape(shape)


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k per key, returned in each key's dtype."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = normalise_weights(weights)
    return {key: _weighted_mean_blocked([u[key] for u in updates], None, w, first.shape).astype(first.dtype,
                                                                                                copy=False)
            for key, first in updates[0].items()}


def masked_weighted_average(updates: Sequence[Mapping[str, "Tensor"]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Mask-aware average: each element is averaged over the sites that kept it,

        out[i] = sum_k w_k m_k[i] x_k[i] / sum_k w_k m_k[i],

    and an element no site kept stays zero. Tensors without a mask count as fully kept, so for
    them this is the plain weighted average. Pruned entries arrive as zeros, so the numerator is
    the plain weighted sum of the values.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = normalise_weights(weights)
    result = {}
    for key, first in updates[0].items():
        masks = [u[key].mask for u in updates]
        averaged = _weighted_mean_blocked([u[key].values for u in updates],
                                          None if all(m is None for m in masks) else masks, w, first.values.shape)
        result[key] = averaged.astype(first.values.dtype, copy=False)
    return result
