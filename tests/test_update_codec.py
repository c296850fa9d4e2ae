"""Compressed changes (strategies/update_codec.py): what they keep, what they cost, and how they
fail on bytes that are not what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.update_codec import (HEADER_BYTES, CompressionSpec, UpdateFormatError, change_bytes, decode_change,
                                     decode_record_change, encode_change, encode_record_change)


def _values(n: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=n) * 0.01).astype(np.float32)  # heavy tails, as weight changes have


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_value_is_within_half_a_step_of_its_block_and_the_size_is_as_stated(bits: int) -> None:
    spec = CompressionSpec(enabled=True, bits=bits, block=256)
    change = _values()
    coded = encode_change(change, spec)
    decoded = decode_change(coded.blob, change.size)
    assert np.array_equal(decoded.change, coded.applied)  # what the sender reckons the receiver holds
    for start in range(0, change.size, spec.block):
        block = slice(start, start + spec.block)
        step = np.abs(change[block]).max() / spec.levels
        assert np.abs(change[block] - decoded.change[block]).max() <= step / 2 * (1 + 1e-5)
    assert coded.blob.nbytes == pytest.approx(change_bytes(change.size, spec), abs=1)
    assert coded.blob.nbytes <= change.nbytes * (bits / 32 + 4 / spec.block) + HEADER_BYTES + 1


def test_top_k_codes_exactly_the_largest_entries_and_leaves_the_rest_unchanged() -> None:
    spec = CompressionSpec(enabled=True, bits=8, topk=0.1)
    change = _values()
    decoded = decode_change(encode_change(change, spec).blob, change.size)
    coded = np.flatnonzero(decoded.change)
    largest = np.argsort(-np.abs(change))[:500]
    assert set(coded) <= set(largest) and len(coded) >= 490  # a few of the 500 may round to zero
    assert encode_change(change, spec).blob.nbytes < 0.08 * change.nbytes


def test_a_change_over_a_mask_carries_the_mask_when_asked_and_zeroes_the_pruned_positions() -> None:
    rng = np.random.default_rng(1)
    change, mask = _values(), rng.random(5000) < 0.3
    spec = CompressionSpec(enabled=True)
    carried = decode_change(encode_change(change, spec, mask, send_mask=True).blob, change.size)
    assert np.array_equal(carried.mask, mask) and not carried.change[~mask].any()
    implied = decode_change(encode_change(change, spec, mask).blob, change.size, support=mask)
    assert implied.mask is None and np.array_equal(implied.change, carried.change)
    assert encode_change(change, spec, mask).blob.nbytes < 0.4 * encode_change(change, spec).blob.nbytes


def test_error_feedback_sends_over_the_rounds_everything_but_the_last_residual() -> None:
    """Ten rounds of 2-bit changes with the residual carried: what the receiver applied sums to what
    was meant minus the residual left at the end, to float precision."""
    spec = CompressionSpec(enabled=True, bits=2, block=64)
    residual = {}
    base = {"w": np.zeros((50, 40), np.float32)}
    target_sum = np.zeros((50, 40), np.float32)
    held = base["w"].copy()
    for round_ in range(10):
        change = _values(2000, seed=round_).reshape(50, 40)
        target_sum += change
        encoded = encode_record_change({"w": held + change}, {"w": held}, spec, residual=residual)
        rebuilt = decode_record_change(encoded.record, {"w": held}, {"w": (50, 40)})["w"].values
        assert np.array_equal(rebuilt, encoded.reconstructed["w"])
        residual = encoded.residual
        held = rebuilt
    np.testing.assert_allclose(held, target_sum - residual["w"], atol=1e-5)
    without = decode_change(encode_change(target_sum.reshape(-1), spec).blob, 2000).change.reshape(50, 40)
    assert np.abs(held - target_sum).mean() < np.abs(without - target_sum).mean()  # the residual is small


def test_biases_and_batchnorm_travel_whole_and_a_missing_base_is_refused() -> None:
    target = {"conv.weight": _values(288).reshape(8, 4, 3, 3), "bn.running_var": np.full(8, 0.5, np.float32)}
    base = {"conv.weight": np.zeros((8, 4, 3, 3), np.float32), "bn.running_var": np.ones(8, np.float32)}
    encoded = encode_record_change(target, base, CompressionSpec(enabled=True))
    assert encoded.record["bn.running_var"].numpy().dtype == np.float32  # whole, exact
    decoded = decode_record_change(encoded.record, base, {k: v.shape for k, v in target.items()})
    assert np.array_equal(decoded["bn.running_var"].values, target["bn.running_var"])
    with pytest.raises(UpdateFormatError, match="no model it changes"):
        decode_record_change(encoded.record, {}, {k: v.shape for k, v in target.items()})


def _blob(**changes: object) -> np.ndarray:
    spec = CompressionSpec(enabled=True, bits=4, block=16, topk=float(changes.pop("topk", 0.0)))  # type: ignore[arg-type]
    return encode_change(_values(100), spec).blob.copy()


MALFORMED = {
    "magic": (lambda b: np.concatenate([np.frombuffer(b"XXXX", np.uint8), b[4:]]), 100, "not a compressed change"),
    "length": (lambda b: b[:-3], 100, "bytes of scales and values"),
    "elements": (lambda b: b, 99, "has 100 elements, the tensor 99"),
    "bits": (lambda b: np.concatenate([b[:4], [3], b[5:]]).astype(np.uint8), 100, "3 bits per value"),
    "nan scale": (lambda b: _with_scale(b, np.nan), 100, "scale is negative, too large or not finite"),
    "negative scale": (lambda b: _with_scale(b, -1.0), 100, "scale is negative"),
}


def _with_scale(blob: np.ndarray, value: float) -> np.ndarray:
    out = blob.copy()
    out[HEADER_BYTES:HEADER_BYTES + 4] = np.frombuffer(np.float32(value).tobytes(), np.uint8)
    return out


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_changes_are_refused_with_the_reason(case: str) -> None:
    damage, n, reason = MALFORMED[case]
    with pytest.raises(UpdateFormatError, match=reason):
        decode_change(damage(_blob()), n)


def test_integers_outside_the_levels_and_positions_outside_the_tensor_are_refused() -> None:
    blob = _blob()
    blob[-1] = 0xFF  # two 4-bit codes of 15: beyond the 15 levels 0..14 (-7..7)
    with pytest.raises(UpdateFormatError, match=r"outside \[-7, 7\]"):
        decode_change(blob, 100)
    sparse = encode_change(_values(100), CompressionSpec(enabled=True, topk=0.1)).blob
    with pytest.raises(UpdateFormatError):  # the same positions do not fit a tensor of 5 kept entries
        decode_change(sparse, 100, support=np.arange(100) < 5)
