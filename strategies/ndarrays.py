"""Flower Arrays to and from NumPy without ``np.save``/``np.load`` for every tensor.

A Flower ``Array`` of stype ``numpy.ndarray`` holds a ``.npy`` file's bytes. ``Array(ndarray)``
writes them with ``np.save`` and ``Array.numpy()`` reads them with ``np.load``: both parse or
format the header each time and copy through a BytesIO, about 0.3-0.6 ms per tensor. A ResNet-10
record is some 330 tensors, and every round unpacks three uploads and builds the averaged model,
so the server spent 0.25 s a round there, between the last reply and the next round's messages.

``to_array`` writes the same ``.npy`` bytes (the header is built once per dtype and shape) with
one copy of the values; ``values_of`` reads them as a read-only view of the Array's bytes (the
header parsed once per distinct header). Both are byte-for-byte interchangeable with Flower's own
(tests/test_packing.py). ``values_of`` refuses what ``np.load(allow_pickle=False)`` refuses
(object arrays), and bytes that do not match their header's size.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from flwr.app import Array

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=4096)
def _header_for(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    stream = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(stream, fields)
    except ValueError:  # a header too long for format 1.0 (a very high-dimensional shape)
        stream = io.BytesIO()
        np.lib.format.write_array_header_2_0(stream, fields)
    return stream.getvalue()


def to_array(values: np.ndarray) -> Array:
    """``Array(values)``, with the same bytes, without ``np.save`` (an array not in C order is
    written in C order: the same values, where ``np.save`` would keep Fortran order)."""
    values = np.asarray(values)
    if not values.flags.c_contiguous:
        values = np.ascontiguousarray(values)  # (which would also make a 0-d array 1-d: not called for those)
    if values.dtype.hasobject:
        raise ValueError("object arrays cannot travel as Flower Arrays")
    header = _header_for(values.dtype.str, tuple(values.shape))
    body = memoryview(values).cast("B") if values.size and values.ndim else values.tobytes()
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=NUMPY_STYPE, data=b"".join((header, body)))


@lru_cache(maxsize=4096)
def _parse_header(head: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(head)
    version = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(stream)
    return dtype, tuple(shape), bool(fortran_order)


def values_of(array: Array) -> np.ndarray:
    """``array.numpy()`` as a read-only view of the Array's bytes (copy it before writing to it)."""
    data = array.data
    if array.stype != NUMPY_STYPE or not data.startswith(_MAGIC) or len(data) < 12:
        return array.numpy()  # not what this reader knows: Flower's own (which raises for a bad stype)
    length_bytes = 2 if data[6] == 1 else 4
    end = 8 + length_bytes + int.from_bytes(data[8:8 + length_bytes], "little")
    try:
        dtype, shape, fortran_order = _parse_header(data[:end])
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"an array's .npy header is malformed ({error})") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused (np.load would need allow_pickle)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f"an array's bytes ({len(data) - end}) do not hold its shape {shape} of {dtype}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return values.reshape(shape, order="F" if fortran_order else "C")
