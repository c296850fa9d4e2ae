"""Named tensors <-> Flower ArrayRecords, with pruned tensors in the compact sparse encoding.

An ArrayRecord keeps the keys of the model's SHARED state; each value is either the dense float
tensor or, when that is smaller, its sparse encoding (a 1-D uint8 array, see sparse_codec). Both
the sites and the server use these two functions, in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.ndarrays import values_of
from strategies.sparse_codec import SparseFormatError, decode, encode, is_encoded


@dataclass(frozen=True)
class Tensor:
    """A received tensor: its values (zeros where pruned) and, for encoded ones, the kept mask."""

    values: np.ndarray
    mask: np.ndarray | None = None  # None: dense, every element kept


def encode_record(tensors: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None,
                  value_dtype: str = "float32", sparse_zeros: bool = False) -> ArrayRecord:
    """An ArrayRecord in which every tensor with a mask (or, with ``sparse_zeros``, every float
    tensor holding zeros) travels encoded when that is smaller than its dense bytes."""
    masks = masks or {}
    record = ArrayRecord()
    for key, values in tensors.items():
        array = np.asarray(values)
        candidate = key in masks or (sparse_zeros and array.dtype.kind == "f" and array.size
                                     and np.count_nonzero(array) < array.size)
        if candidate:
            blob = encode(array, masks.get(key), value_dtype)
            if blob.nbytes < array.nbytes:
                record[key] = Array(blob)
                continue
        record[key] = Array(np.ascontiguousarray(array))
    return record


def decode_record(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Every tensor of ``record`` as dense values (+ mask when it came encoded), checked against
    ``shapes``; raises SparseFormatError / ValueError with the reason when something is off."""
    tensors = {}
    for key, shape in shapes.items():
        array = values_of(record[key])
        if is_encoded(array):
            decoded = decode(array, shape)
            tensors[key] = Tensor(decoded.values, decoded.mask)
        elif array.dtype == np.uint8:
            raise SparseFormatError(f"array {key} is uint8 but not an encoded tensor")
        else:
            tensors[key] = Tensor(array)
    return tensors


def dense_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Decoded tensors back as a plain dense ArrayRecord (for server-side steps that need models)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(t.values)) for key, t in tensors.items()})
