"""Compact encoding of pruned tensors, so sparsity really shrinks the bytes on the wire.

A tensor of n elements of which k are kept becomes one uint8 blob:

    header  (24 bytes): magic b"SPK1", format, value dtype, Rice parameter, padding, n (u64), k (u32)
    support the positions of the kept elements, in whichever form is smaller for this density:
              BITMASK  n bits, np.packbits order                       ~ n/8 bytes
              RICE     the gaps between kept positions, Rice-coded: a unary stream of quotients and
                       a stream of fixed-width remainders               ~ k (1 + b + 2^-b E[gap]) bits
    values  the kept values in position order, float32 (exact) or float16

The information bound for the support of a random mask is n.H(k/n) bits; the bitmask meets it
near density 1/2 and Rice-coded gaps (optimal for geometric gaps) approach it at low density,
so taking the smaller of the two stays close to the bound at every density.

Decoding checks everything it reads and raises ``SparseFormatError`` with the reason: wrong
magic or length, counts that disagree, positions out of range, non-finite values. A malformed
blob is never turned into silent zeros.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SPK1"
_HEADER = struct.Struct("<4sBBBBQI4x")  # magic, format, dtype, rice_b, reserved, n, k, pad -> 24 bytes
HEADER_BYTES = _HEADER.size
BITMASK, RICE = 1, 2
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_DTYPE_CODES = {np.dtype("<f4"): 1, np.dtype("<f2"): 2}
MAX_RICE_BITS = 30


class SparseFormatError(ValueError):
    """An encoded tensor is malformed; the message says how."""


@dataclass(frozen=True)
class Decoded:
    """A decoded tensor: dense values (zeros where pruned) and the kept-positions mask."""

    values: np.ndarray
    mask: np.ndarray


def _rice_bits(gaps_minus_one: np.ndarray, b: int) -> int:
    """Exact size in bits of Rice-coding the gaps with parameter b (unary quotient + b-bit remainder)."""
    return int((gaps_minus_one >> b).sum()) + len(gaps_minus_one) * (1 + b)


def _best_rice_parameter(gaps_minus_one: np.ndarray) -> tuple[int, int]:
    """(b, bits) minimising the Rice size; the optimum sits near log2(mean gap)."""
    if len(gaps_minus_one) == 0:
        return 0, 0
    centre = int(np.log2(max(float(gaps_minus_one.mean()), 1.0)))
    candidates = range(max(0, centre - 2), min(MAX_RICE_BITS, centre + 3) + 1)
    return min(((b, _rice_bits(gaps_minus_one, b)) for b in candidates), key=lambda item: item[1])


def _unary_stream(quotients: np.ndarray) -> np.ndarray:
    """Bits '1'*q + '0' per quotient, concatenated (as a 0/1 uint8 array)."""
    total = int(quotients.sum()) + len(quotients)
    bits = np.ones(total, dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0  # each quotient's terminating zero
    return bits


def _remainder_stream(remainders: np.ndarray, b: int) -> np.ndarray:
    """b bits per remainder, most significant first (as a 0/1 uint8 array)."""
    if b == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(b - 1, -1, -1, dtype=np.uint64)
    return ((remainders.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8).ravel()


def encode_positions(positions: np.ndarray) -> tuple[np.ndarray, int]:
    """Sorted distinct positions as Rice-coded gaps: (the bytes, the Rice parameter). The bytes hold
    the two streams' lengths first, so ``decode_positions`` knows where they end."""
    gaps_minus_one = np.diff(positions, prepend=-1).astype(np.uint64) - 1  # first gap counts from -1
    b, _ = _best_rice_parameter(gaps_minus_one)
    unary = np.packbits(_unary_stream(gaps_minus_one >> np.uint64(b)))
    remainder = np.packbits(_remainder_stream(gaps_minus_one & np.uint64((1 << b) - 1), b))
    return np.concatenate([np.array([unary.size, remainder.size], dtype="<u4").view(np.uint8), unary, remainder]), b


def rice_position_bytes(positions: np.ndarray) -> int:
    """What ``encode_positions`` would take, without building it."""
    gaps_minus_one = np.diff(positions, prepend=-1).astype(np.uint64) - 1
    return (_best_rice_parameter(gaps_minus_one)[1] + 7) // 8 + 8


def encode(tensor: np.ndarray, mask: np.ndarray | None = None, value_dtype: str = "float32") -> np.ndarray:
    """Encode the kept entries of ``tensor`` (``mask``; default: its non-zeros) as one uint8 array."""
    flat = np.ascontiguousarray(tensor, dtype=np.float32).ravel()
    n = flat.size
    if mask is not None and mask.size != n:
        raise ValueError(f"mask has {mask.size} elements, tensor {n}")
    positions = np.flatnonzero(flat if mask is None else np.ravel(mask))
    k = positions.size
    dtype = np.dtype("<f2") if value_dtype == "float16" else np.dtype("<f4")
    values = flat[positions].astype(dtype)
    if rice_position_bytes(positions) < (n + 7) // 8:
        support, b = encode_positions(positions)
        fmt = RICE
    else:
        mask = np.zeros(n, dtype=bool)
        mask[positions] = True
        support, fmt, b = np.packbits(mask), BITMASK, 0
    header = np.frombuffer(_HEADER.pack(MAGIC, fmt, _DTYPE_CODES[dtype], b, 0, n, k), dtype=np.uint8)
    return np.concatenate([header, support, values.view(np.uint8)])


def _read_header(blob: np.ndarray) -> tuple[int, np.dtype, int, int, int]:
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise SparseFormatError(f"an encoded tensor must be a 1-D uint8 array, got {blob.dtype} {blob.shape}")
    if blob.size < HEADER_BYTES:
        raise SparseFormatError(f"encoded tensor too short for its header: {blob.size} < {HEADER_BYTES} bytes")
    magic, fmt, dtype_code, b, _reserved, n, k = _HEADER.unpack(blob[:HEADER_BYTES].tobytes())
    if magic != MAGIC:
        raise SparseFormatError(f"bad magic {magic!r}: not an encoded tensor")
    if fmt not in (BITMASK, RICE):
        raise SparseFormatError(f"unknown support format {fmt}")
    if dtype_code not in _DTYPES:
        raise SparseFormatError(f"unknown value dtype code {dtype_code}")
    if k > n:
        raise SparseFormatError(f"value count {k} exceeds the tensor size {n}")
    if b > MAX_RICE_BITS:
        raise SparseFormatError(f"Rice parameter {b} out of range")
    return fmt, _DTYPES[dtype_code], b, n, k


def decode_positions(body: np.ndarray, n: int, k: int, b: int) -> tuple[np.ndarray, int]:
    """The k positions (< n) ``encode_positions`` wrote at the start of ``body``, and the bytes they
    took; raises SparseFormatError when the streams are short, run past the end or leave the range."""
    if body.size < 8:
        raise SparseFormatError("Rice support truncated before its stream lengths")
    unary_len, remainder_len = (int(x) for x in body[:8].view("<u4"))
    if 8 + unary_len + remainder_len > body.size:
        raise SparseFormatError(f"Rice streams ({unary_len} + {remainder_len} bytes) run past the end of the data")
    unary = np.unpackbits(body[8:8 + unary_len])
    zeros = np.flatnonzero(unary == 0)
    if zeros.size < k:
        raise SparseFormatError(f"Rice quotient stream holds {zeros.size} codes, expected {k}")
    zeros = zeros[:k]
    quotients = np.diff(zeros, prepend=-1) - 1
    if remainder_len * 8 < k * b:
        raise SparseFormatError(f"Rice remainder stream holds {remainder_len * 8} bits, needs {k * b}")
    if b:
        bits = np.unpackbits(body[8 + unary_len:8 + unary_len + remainder_len])[: k * b].reshape(k, b)
        remainders = bits.astype(np.uint64) @ (np.uint64(1) << np.arange(b - 1, -1, -1, dtype=np.uint64))
    else:
        remainders = np.zeros(k, dtype=np.uint64)
    gaps = (quotients.astype(np.uint64) << np.uint64(b)) + remainders + np.uint64(1)
    positions = np.cumsum(gaps.astype(np.int64)) - 1
    if k and (positions[-1] >= n or positions[-1] < 0):
        raise SparseFormatError(f"a kept position ({int(positions[-1])}) lies outside the tensor of {n} elements")
    return positions, 8 + unary_len + remainder_len


def decode(blob: np.ndarray, shape: tuple[int, ...]) -> Decoded:
    """Dense values and mask of an encoded tensor of the given shape; raises SparseFormatError."""
    fmt, dtype, b, n, k = _read_header(blob)
    if n != int(np.prod(shape)):
        raise SparseFormatError(f"encoded tensor has {n} elements, expected {int(np.prod(shape))} for shape {shape}")
    body = blob[HEADER_BYTES:]
    if fmt == BITMASK:
        mask_bytes = (n + 7) // 8
        if body.size < mask_bytes:
            raise SparseFormatError(f"bitmask truncated: {body.size} < {mask_bytes} bytes")
        mask = np.unpackbits(body[:mask_bytes], count=n).astype(bool)
        if int(mask.sum()) != k:
            raise SparseFormatError(f"bitmask marks {int(mask.sum())} kept elements but the header says {k}")
        positions, used = np.flatnonzero(mask), mask_bytes
    else:
        positions, used = decode_positions(body, n, k, b)
    value_bytes = body[used:]
    if value_bytes.size != k * dtype.itemsize:
        raise SparseFormatError(f"{value_bytes.size} value bytes for {k} kept {dtype.name} values "
                                f"(expected {k * dtype.itemsize})")
    values = value_bytes.view(dtype).astype(np.float32)
    if not np.isfinite(values).all():
        raise SparseFormatError("kept values include NaN or infinity")
    dense = np.zeros(n, dtype=np.float32)
    dense[positions] = values
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    return Decoded(values=dense.reshape(shape), mask=mask.reshape(shape))


def is_encoded(array: np.ndarray) -> bool:
    """Encoded tensors travel as 1-D uint8 arrays starting with the magic bytes."""
    return array.dtype == np.uint8 and array.ndim == 1 and array.size >= 4 and array[:4].tobytes() == MAGIC


def support_bound_bytes(n: int, k: int) -> float:
    """Information bound of a support of k positions among n: n.H(k/n) bits, in bytes."""
    if k in (0, n):
        return 0.0
    p = k / n
    return n * -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) / 8
