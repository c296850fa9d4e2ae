"""Compressed model changes: a tensor's change from a model both ends hold, in a few bits per value.

Beyond the papers (FedPav, FedKLPR, FedUReID, RAF and the FedDG methods send whole models): a site
sends its round update (trained minus received) and the server sends the global model's change
since the model that site holds, each quantised to ``bits`` per value with one float32 scale per
``block`` values, optionally only the ``topk`` share of largest entries. What a quantisation
leaves out is not lost: the sender keeps it and adds it to its next change (error feedback; the
server's copy of each site's model plays that part on the way down).

One change is one uint8 blob::

    header  (32 bytes): magic b"QUP1", bits, flags, Rice parameters of the mask and the top-k
            positions, block (u32), n (u64, elements of the tensor), k (u64, values coded)
    mask    (flag MASK) the positions the tensor keeps, when they differ from the model the receiver
            holds (a pruned tensor whose mask moved): their count (u64) and Rice-coded gaps, or a
            bitmask (flag MASK_BITMAP), whichever is smaller
    top-k   (flag TOPK) which of the kept positions carry a value, as Rice-coded gaps
    scales  ceil(k / block) float32, one per block of coded values: max |value| / levels
    values  k signed integers in [-levels, levels], levels = 2^(bits-1) - 1, offset by levels and
            packed little-endian within each byte (8, 4 or 2 bits each)

A position outside the mask is zero; a kept position without a coded value has not changed (it is
not a zero weight). Decoding checks everything it reads and raises ``UpdateFormatError`` with the
reason: magic, lengths, counts, positions out of range, scales that are negative or not finite,
integers outside the levels. Pure NumPy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.ndarrays import values_of
from strategies.sparse_codec import SparseFormatError, decode_positions, encode_positions, rice_position_bytes
from strategies.sparse_records import Tensor

MAGIC = b"QUP1"
_HEADER = struct.Struct("<4sBBBBIQQ4x")  # magic, bits, flags, mask rice b, top-k rice b, block, n, k -> 32 bytes
HEADER_BYTES = _HEADER.size
MASK, TOPK, MASK_BITMAP = 1, 2, 4
BITS = (2, 4, 8)
CONFIG_PREFIX = "compression."
MAX_SCALE = 1e30  # a larger scale times the levels could overflow float32


class UpdateFormatError(ValueError):
    """A compressed change is malformed; the message says how."""


@dataclass(frozen=True)
class CompressionSpec:
    """How changes travel: ``bits`` per value, one scale per ``block`` values, the ``topk`` share of
    largest entries (0: all), and error feedback on the site."""

    enabled: bool = False
    bits: int = 8
    block: int = 256
    topk: float = 0.0
    error_feedback: bool = True
    downlink: bool = True  # the server sends changes too (else whole models on the way down)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"compression.bits must be one of {BITS}, got {self.bits}")
        if not 16 <= self.block <= 1 << 20:
            raise ValueError(f"compression.block must be in [16, 2^20], got {self.block}")
        if not 0.0 <= self.topk < 1.0:
            raise ValueError(f"compression.topk must be in [0, 1) (0: every value), got {self.topk}")

    @property
    def levels(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def to_config(self) -> dict[str, int | float | bool]:
        """As flat round-config entries (``compression.bits``, ...), the way sites receive it."""
        return {f"{CONFIG_PREFIX}{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> "CompressionSpec":
        """Inverse of ``to_config``; absent entries keep their defaults (compression off)."""
        return cls(**{f.name: config[f"{CONFIG_PREFIX}{f.name}"] for f in fields(cls)  # type: ignore[arg-type]
                      if f"{CONFIG_PREFIX}{f.name}" in config})


def is_update(array: np.ndarray) -> bool:
    """Compressed changes travel as 1-D uint8 arrays starting with the magic bytes."""
    return array.dtype == np.uint8 and array.ndim == 1 and array.size >= 4 and array[:4].tobytes() == MAGIC


# ----- one vector of values -------------------------------------------------------------------------

def _pack(unsigned: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    padded = np.zeros(-(-unsigned.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: unsigned.size] = unsigned
    lanes = padded.reshape(-1, per_byte)
    out = np.zeros(len(lanes), dtype=np.uint8)
    for lane in range(per_byte):
        out |= lanes[:, lane] << np.uint8(lane * bits)
    return out


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    lanes = np.stack([(packed >> np.uint8(lane * bits)) & mask for lane in range(per_byte)], axis=1)
    return lanes.reshape(-1)[:count]


def quantise(values: np.ndarray, spec: CompressionSpec) -> tuple[np.ndarray, np.ndarray]:
    """(scales per block, integers in [-levels, levels]): round to nearest, scale = max |x| / levels."""
    count = values.size
    blocks = -(-count // spec.block)
    padded = np.zeros(blocks * spec.block, dtype=np.float32)
    padded[:count] = values
    padded = padded.reshape(blocks, spec.block)
    scales = (np.abs(padded).max(axis=1) / spec.levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    ints = np.clip(np.rint(padded / safe[:, None]), -spec.levels, spec.levels).astype(np.int16)
    return scales, ints.reshape(-1)[:count]


def dequantise(scales: np.ndarray, ints: np.ndarray, block: int) -> np.ndarray:
    per_value = np.repeat(scales, block)[: ints.size]
    return ints.astype(np.float32) * per_value


def _support_bytes(mask: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """The kept positions in the smaller of Rice-coded gaps and a bitmask: (bytes, Rice b, is bitmap)."""
    positions = np.flatnonzero(mask)
    if rice_position_bytes(positions) + 8 < (mask.size + 7) // 8:
        body, b = encode_positions(positions)
        return np.concatenate([np.array([positions.size], dtype="<u8").view(np.uint8), body]), b, False
    return np.packbits(mask.astype(bool)), 0, True


@dataclass(frozen=True)
class Coded:
    """One encoded change and what the receiver will make of it (the sender's error feedback)."""

    blob: np.ndarray
    applied: np.ndarray  # the change over the whole tensor (flat), as the receiver decodes it


def encode_change(change: np.ndarray, spec: CompressionSpec, support: np.ndarray | None = None,
                  send_mask: bool = False) -> Coded:
    """Encode ``change`` (flat float32, one entry per tensor element) over ``support`` (the kept
    positions, None = all); ``send_mask`` carries the support itself."""
    flat = np.ascontiguousarray(change, dtype=np.float32).reshape(-1)
    n = flat.size
    kept = np.arange(n) if support is None else np.flatnonzero(np.ravel(support))
    values = flat[kept]
    flags, pieces, mask_b, topk_b = 0, [], 0, 0
    if send_mask and support is not None:
        body, mask_b, bitmap = _support_bytes(np.ravel(support))
        flags |= MASK | (MASK_BITMAP if bitmap else 0)
        pieces.append(body)
    coded_at = np.arange(values.size)
    if spec.topk > 0 and values.size:
        k = max(1, int(np.ceil(spec.topk * values.size)))
        coded_at = np.sort(np.argpartition(np.abs(values), values.size - k)[values.size - k:])
        body, topk_b = encode_positions(coded_at)
        flags |= TOPK
        pieces.append(body)
    scales, ints = quantise(values[coded_at], spec)
    pieces += [scales.astype("<f4").view(np.uint8), _pack((ints + spec.levels).astype(np.uint8), spec.bits)]
    header = np.frombuffer(_HEADER.pack(MAGIC, spec.bits, flags, mask_b, topk_b, spec.block, n, coded_at.size),
                           dtype=np.uint8)
    applied = np.zeros(n, dtype=np.float32)
    applied[kept[coded_at]] = dequantise(scales, ints, spec.block)
    return Coded(np.concatenate([header, *pieces]), applied)


@dataclass(frozen=True)
class DecodedChange:
    """A decoded change: over the whole tensor (flat), and the mask it carried (None: unchanged)."""

    change: np.ndarray
    mask: np.ndarray | None


def decode_change(blob: np.ndarray, n: int, support: np.ndarray | None = None) -> DecodedChange:
    """The change of an ``n``-element tensor; ``support``: the kept positions of the model the
    receiver holds (used unless the blob carries a mask). Raises UpdateFormatError."""
    if not is_update(blob) or blob.size < HEADER_BYTES:
        raise UpdateFormatError("not a compressed change (magic or header missing)")
    magic, bits, flags, mask_b, topk_b, block, count, k = _HEADER.unpack(blob[:HEADER_BYTES].tobytes())
    if bits not in BITS:
        raise UpdateFormatError(f"{bits} bits per value is not one of {BITS}")
    if flags & ~(MASK | TOPK | MASK_BITMAP) or not 16 <= block <= 1 << 20:
        raise UpdateFormatError(f"unknown flags {flags} or block {block} out of range")
    if count != n:
        raise UpdateFormatError(f"the change has {count} elements, the tensor {n}")
    body = blob[HEADER_BYTES:]
    try:
        mask = None
        if flags & MASK:
            if flags & MASK_BITMAP:
                used = (n + 7) // 8
                if body.size < used:
                    raise UpdateFormatError(f"mask bitmap truncated: {body.size} < {used} bytes")
                mask = np.unpackbits(body[:used], count=n).astype(bool)
            else:
                if body.size < 16:
                    raise UpdateFormatError("mask truncated before its count and stream lengths")
                kept_count = int(body[:8].view("<u8")[0])
                if kept_count > n:
                    raise UpdateFormatError(f"the mask keeps {kept_count} of {n} positions")
                positions, used = decode_positions(body[8:], n, kept_count, mask_b)
                used += 8
                mask = np.zeros(n, dtype=bool)
                mask[positions] = True
            body = body[used:]
        held = mask if mask is not None else (None if support is None else np.ravel(support).astype(bool))
        kept = np.arange(n) if held is None else np.flatnonzero(held)
        if k > kept.size:
            raise UpdateFormatError(f"{k} coded values for {kept.size} kept positions")
        coded_at = np.arange(kept.size)
        if flags & TOPK:
            if body.size < 8:
                raise UpdateFormatError("top-k positions truncated before their stream lengths")
            coded_at, used = decode_positions(body, kept.size, k, topk_b)
            body = body[used:]
        elif k != kept.size:
            raise UpdateFormatError(f"{k} coded values but {kept.size} kept positions and no top-k positions")
    except SparseFormatError as error:
        raise UpdateFormatError(str(error)) from None
    levels = (1 << (bits - 1)) - 1
    blocks = -(-k // block)
    value_bytes = -(-k // (8 // bits))
    if body.size != 4 * blocks + value_bytes:
        raise UpdateFormatError(f"{body.size} bytes of scales and values, expected {4 * blocks + value_bytes} for "
                                f"{k} values of {bits} bits in blocks of {block}")
    scales = body[: 4 * blocks].view("<f4").astype(np.float32)
    if not np.isfinite(scales).all() or (scales < 0).any() or (scales > MAX_SCALE).any():
        raise UpdateFormatError("a scale is negative, too large or not finite")
    unsigned = _unpack(body[4 * blocks:], bits, k)
    if (unsigned > 2 * levels).any():
        raise UpdateFormatError(f"a value lies outside [-{levels}, {levels}]")
    change = np.zeros(n, dtype=np.float32)
    change[kept[coded_at]] = dequantise(scales, unsigned.astype(np.int16) - levels, block)
    return DecodedChange(change, mask)


# ----- whole records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedRecord:
    """A compressed record, what the receiver will hold after decoding it, and the sender's residual."""

    record: ArrayRecord
    reconstructed: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]


def encode_record_change(target: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], spec: CompressionSpec,
                         masks: Mapping[str, np.ndarray] | None = None,
                         base_masks: Mapping[str, np.ndarray] | None = None,
                         residual: Mapping[str, np.ndarray] | None = None) -> EncodedRecord:
    """Every weight tensor (float, 2-D or more) of ``target`` as its change from ``base`` (plus the
    carried ``residual``), over its mask (``masks``; the mask travels when it differs from
    ``base_masks``); biases, BatchNorm parameters and statistics and non-float tensors travel whole
    (about 1% of a ResNet's values, and a running variance must never be nudged below zero). The
    receiver rebuilds ``reconstructed``; ``residual`` is what it did not get."""
    masks, base_masks, residual = masks or {}, base_masks or {}, residual or {}
    record, rebuilt, left = ArrayRecord(), {}, {}
    for key, value in target.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.ndim < 2:  # biases and BatchNorm: few values, sent whole
            record[key] = Array(np.ascontiguousarray(value))
            rebuilt[key] = value
            continue
        base_values = np.asarray(base[key], dtype=np.float32).reshape(-1)
        change = value.astype(np.float32).reshape(-1) - base_values
        if key in residual:
            change = change + residual[key].reshape(-1)
        mask = masks.get(key)
        held = base_masks.get(key)
        send_mask = mask is not None and (held is None or not np.array_equal(held, mask))
        coded = encode_change(change, spec, mask, send_mask)
        record[key] = Array(coded.blob)
        new = base_values + coded.applied
        if mask is not None:
            new = np.where(np.ravel(mask), new, np.float32(0))
        rebuilt[key] = new.reshape(value.shape).astype(value.dtype)
        rest = change - coded.applied
        if mask is not None:
            rest = np.where(np.ravel(mask), rest, np.float32(0))
        left[key] = rest.reshape(value.shape)
    return EncodedRecord(record, rebuilt, left)


def decode_record_change(record: ArrayRecord, base: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                         base_masks: Mapping[str, np.ndarray] | None = None) -> dict[str, Tensor]:
    """Every tensor of ``record`` rebuilt on ``base`` (values, and the mask when it has one);
    raises UpdateFormatError / ValueError with the reason."""
    base_masks = base_masks or {}
    tensors = {}
    for key, shape in shapes.items():
        array = values_of(record[key])
        if not is_update(array):
            if array.dtype == np.uint8:
                raise UpdateFormatError(f"array {key} is uint8 but not a compressed change")
            tensors[key] = Tensor(array)
            continue
        if key not in base:
            raise UpdateFormatError(f"array {key} is a change, but there is no model it changes")
        n = int(np.prod(shape))
        held = base_masks.get(key)
        try:
            decoded = decode_change(array, n, held)
        except UpdateFormatError as error:
            raise UpdateFormatError(f"array {key}: {error}") from None
        mask = decoded.mask if decoded.mask is not None else held
        values = np.asarray(base[key], dtype=np.float32).reshape(-1) + decoded.change
        if mask is not None:
            values = np.where(np.ravel(mask), values, np.float32(0))
        if not np.isfinite(values).all():
            raise UpdateFormatError(f"array {key}: the rebuilt values are not finite")
        tensors[key] = Tensor(values.reshape(shape), None if mask is None else np.asarray(mask).reshape(shape))
    return tensors


def change_bytes(values: int, spec: CompressionSpec) -> float:
    """Bytes a dense change of ``values`` values takes (no top-k, no mask): for tables and tests."""
    return HEADER_BYTES + 4 * -(-values // spec.block) + values * spec.bits / 8
