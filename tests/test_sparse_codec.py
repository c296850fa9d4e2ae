"""The sparse codec: exact round trips, fp16 error bounds, sizes near the bound, and malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.sparse_codec import (
    BITMASK,
    HEADER_BYTES,
    RICE,
    SparseFormatError,
    decode,
    encode,
    is_encoded,
    support_bound_bytes,
)

DENSITIES = [0.0, 0.001, 0.05, 0.1, 0.3, 0.5, 0.6, 0.9, 0.999, 1.0]


def _pruned(shape: tuple[int, ...], density: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.normal(scale=0.05, size=shape).astype(np.float32)
    mask = rng.random(shape) < density
    return np.where(mask, values, 0.0).astype(np.float32), mask


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (1000,), (7,)])
def test_fp32_round_trip_is_exact(density: float, shape: tuple[int, ...]) -> None:
    tensor, mask = _pruned(shape, density)
    decoded = decode(encode(tensor, mask), shape)
    np.testing.assert_array_equal(decoded.values, tensor)
    np.testing.assert_array_equal(decoded.mask, mask)


@pytest.mark.parametrize("density", DENSITIES)
def test_fp16_round_trip_stays_within_half_precision(density: float) -> None:
    tensor, mask = _pruned((256, 128), density)
    decoded = decode(encode(tensor, mask, value_dtype="float16"), tensor.shape)
    np.testing.assert_array_equal(decoded.mask, mask)
    assert np.all(decoded.values[~mask] == 0)
    error = np.abs(decoded.values - tensor)
    assert np.all(error <= np.abs(tensor) * 2.0 ** -11 + 2.0 ** -24)  # fp16: 11-bit significand


def test_kept_zeros_stay_kept() -> None:
    tensor = np.array([0.0, 1.5, 0.0, -2.0], dtype=np.float32)
    mask = np.array([True, True, False, True])
    decoded = decode(encode(tensor, mask), (4,))
    np.testing.assert_array_equal(decoded.mask, mask)


@pytest.mark.parametrize("density,expected", [(0.6, BITMASK), (0.5, BITMASK), (0.05, RICE), (0.001, RICE)])
def test_the_smaller_support_form_is_chosen(density: float, expected: int) -> None:
    tensor, _ = _pruned((100_000,), density)
    assert encode(tensor)[4] == expected


@pytest.mark.parametrize("density", [0.7, 0.5, 0.3, 0.1, 0.01])
def test_size_is_within_5_percent_of_the_information_bound(density: float) -> None:
    n = 1_000_000
    tensor, mask = _pruned((n,), density)
    k = int(mask.sum())
    for dtype, width in (("float32", 4), ("float16", 2)):
        size = encode(tensor, mask, value_dtype=dtype).size
        bound = support_bound_bytes(n, k) + k * width
        assert size <= 1.05 * bound, (dtype, size / bound)


def test_upload_at_40_percent_pruning_meets_the_targets() -> None:
    n = 1_000_000
    tensor, mask = _pruned((n,), 0.6)
    assert encode(tensor, mask).size / (4 * n) <= 0.64
    assert encode(tensor, mask, value_dtype="float16").size / (4 * n) <= 0.34


def _corrupt(blob: np.ndarray, at: int, value: int) -> np.ndarray:
    bad = blob.copy()
    bad[at] = value
    return bad


@pytest.mark.parametrize("density", [0.6, 0.01])
def test_malformed_encodings_are_rejected_with_a_reason(density: float) -> None:
    tensor, mask = _pruned((5000,), density, seed=3)
    blob = encode(tensor, mask)
    k = int(mask.sum())
    cases = {
        "too short for its header": blob[:10],
        "bad magic": _corrupt(blob, 0, ord("X")),
        "unknown support format": _corrupt(blob, 4, 9),
        "unknown value dtype": _corrupt(blob, 5, 7),
        "value bytes": blob[:-3],  # truncated values
        "expected 4 for shape": None,
    }
    for reason, bad in cases.items():
        with pytest.raises(SparseFormatError, match=reason):
            decode(bad if bad is not None else blob, (4,) if bad is None else (5000,))
    header = np.frombuffer(blob[:HEADER_BYTES].tobytes(), dtype=np.uint8).copy()
    # a count that disagrees with the support
    wrong_k = header.copy()
    wrong_k[16:20] = np.array([k + 1], dtype="<u4").view(np.uint8)
    with pytest.raises(SparseFormatError):
        decode(np.concatenate([wrong_k, blob[HEADER_BYTES:]]), (5000,))
    # a count larger than the tensor
    huge_k = header.copy()
    huge_k[16:20] = np.array([6000], dtype="<u4").view(np.uint8)
    with pytest.raises(SparseFormatError, match="exceeds the tensor size"):
        decode(np.concatenate([huge_k, blob[HEADER_BYTES:]]), (5000,))


def test_out_of_range_positions_and_non_finite_values_are_rejected() -> None:
    tensor = np.zeros(1000, dtype=np.float32)
    tensor[[3, 500, 990]] = [1.0, 2.0, 3.0]
    blob = encode(tensor)
    assert blob[4] == RICE
    smaller = blob.copy()
    smaller[8:16] = np.array([600], dtype="<u8").view(np.uint8)  # claims a 600-element tensor
    with pytest.raises(SparseFormatError, match="outside the tensor"):
        decode(smaller, (600,))
    nan_values = blob.copy()
    nan_values[-4:] = np.array([np.nan], dtype="<f4").view(np.uint8)
    with pytest.raises(SparseFormatError, match="NaN or infinity"):
        decode(nan_values, (1000,))
    with pytest.raises(SparseFormatError, match="1-D uint8"):
        decode(blob.astype(np.int16), (1000,))
    assert is_encoded(blob) and not is_encoded(tensor) and not is_encoded(blob[:3])
