"""A message's arrays packed into one flat byte array plus a manifest, optionally in a lower precision.

Flower ships every Array of a record as its own content-addressed object, cut into chunks, one
RPC per object and (with the SuperLink's SQLite state) one write transaction per object: a
ResNet-50 record is about 650 objects. Packed, it is two arrays: ``packed`` (every tensor's bytes,
one after the other) and ``manifest`` (UTF-8 JSON: name, dtype on the wire, dtype to restore,
shape, offset, size per tensor).

``transport_dtype`` (``float32`` | ``bfloat16`` | ``float16``) lowers the precision of dense
float32 tensors for the trip only; they are restored to float32 on arrival, so everything after
the wire (screening, float64 aggregation, the sparse encoding of pruned tensors, which travels as
uint8 and is never converted) sees the same keys, shapes and dtypes as before. NumPy has no
bfloat16: it travels as the upper 16 bits of the float32 pattern, rounded to nearest even.

Unpacking checks the manifest against the bytes and raises ``PackingError`` with the reason, so
a malformed upload is rejected like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from strategies.ndarrays import to_array, values_of

PACKED_KEY = "packed"
MANIFEST_KEY = "manifest"
TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")
TRANSPORT_DTYPE_KEY = "transport-dtype"  # round config: the precision a site sends its dense arrays back in
_BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class TransportSpec:
    """How SHARED arrays travel: packed into one array (``pack``), dense floats in ``dtype``."""

    pack: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport.dtype must be one of {TRANSPORT_DTYPES}, got {self.dtype!r}")


class PackingError(ValueError):
    """A packed record whose manifest and bytes disagree."""


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the 16 bfloat16 bits (as uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's mantissa into the exponent (Inf); keep it a NaN
        bits = np.where(nan, np.uint32(0x7FC00000), bits)
    rounded = bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))
    return (rounded >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """The uint16 bfloat16 bits back to float32 (exact: bfloat16 is a truncated float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_wire(values: np.ndarray, transport_dtype: str) -> tuple[np.ndarray, str]:
    """The bytes to send for one tensor and the name of their dtype on the wire."""
    if values.dtype != np.float32 or transport_dtype == "float32":
        return np.ascontiguousarray(values), values.dtype.str
    if transport_dtype == _BFLOAT16:
        return to_bfloat16_bits(values), _BFLOAT16
    return values.astype(np.float16), np.dtype(np.float16).str


def _from_wire(raw: np.ndarray, wire: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if wire == _BFLOAT16:
        values = from_bfloat16_bits(raw.view(np.uint16))
    else:
        values = raw.view(np.dtype(wire)).astype(np.dtype(dtype), copy=True)
    return values.reshape(shape)


def pack_record(record: ArrayRecord, transport_dtype: str = "float32") -> ArrayRecord:
    """``record``'s arrays as one ``packed`` uint8 array plus its ``manifest``."""
    if transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype {transport_dtype!r} is not one of {TRANSPORT_DTYPES}")
    entries: list[dict[str, Any]] = []
    pieces: list[np.ndarray] = []
    offset = 0
    for name, array in record.items():
        values = values_of(array)
        wire_values, wire = _to_wire(values, transport_dtype)
        raw = wire_values.reshape(-1).view(np.uint8)
        entries.append({"name": name, "wire": wire, "dtype": values.dtype.str, "shape": list(values.shape),
                        "offset": offset, "nbytes": int(raw.nbytes)})
        pieces.append(raw)
        offset += raw.nbytes
    packed = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    manifest = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED_KEY: to_array(packed), MANIFEST_KEY: to_array(manifest)})


def is_packed(record: ArrayRecord) -> bool:
    return set(record.keys()) == {PACKED_KEY, MANIFEST_KEY}


def _entry(raw: Any, size: int) -> tuple[str, str, str, tuple[int, ...], int, int]:
    try:
        name, wire, dtype = str(raw["name"]), str(raw["wire"]), str(raw["dtype"])
        shape = tuple(int(d) for d in raw["shape"])
        offset, nbytes = int(raw["offset"]), int(raw["nbytes"])
        item = 2 if wire == _BFLOAT16 else np.dtype(wire).itemsize
        np.dtype(dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise PackingError(f"manifest entry {raw!r} is malformed ({error})") from None
    if wire == _BFLOAT16 and dtype != np.dtype(np.float32).str:
        raise PackingError(f"array {name}: bfloat16 on the wire restores only to float32, not {dtype}")
    if min(shape, default=0) < 0 or offset < 0 or offset + nbytes > size \
            or nbytes != item * int(np.prod(shape, dtype=np.int64)):
        raise PackingError(f"array {name}: {nbytes} bytes at offset {offset} do not hold shape {shape} of {wire} "
                           f"within the {size} packed bytes")
    return name, wire, dtype, shape, offset, nbytes


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The arrays of a packed record, restored to their own dtypes; a record that is not packed is
    returned as it is. Raises PackingError when the manifest does not describe the bytes."""
    if not is_packed(record):
        return record
    try:
        packed = values_of(record[PACKED_KEY])
        entries = json.loads(values_of(record[MANIFEST_KEY]).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise PackingError(f"unreadable manifest ({error})") from None
    if packed.dtype != np.uint8 or packed.ndim != 1 or not isinstance(entries, list):
        raise PackingError("a packed record holds a 1-D uint8 array and a list of entries")
    restored = ArrayRecord()
    for raw in entries:
        name, wire, dtype, shape, offset, nbytes = _entry(raw, packed.size)
        if name in restored:
            raise PackingError(f"array {name} appears twice in the manifest")
        restored[name] = to_array(_from_wire(packed[offset:offset + nbytes], wire, dtype, shape))
    return restored
