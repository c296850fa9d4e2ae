"""The packed wire format: bit-exact in float32, within the dtype's rounding in bfloat16/float16,
the sparse encoding untouched, a malformed pack rejected, and the screening still naming the bad
tensor of a packed reply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from reid.models import ModelSpec, build_model, shared_state
from strategies.fedpav import FedPav
from strategies.packing import (
    MANIFEST_KEY,
    PACKED_KEY,
    PackingError,
    from_bfloat16_bits,
    pack_record,
    to_bfloat16_bits,
    unpack_record,
)
from strategies.sparse_records import decode_record, encode_record


def _model_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(shared_state(build_model(ModelSpec(backbone="resnet10", height=64, width=32)), "local"))


def test_float32_round_trips_bit_exactly_with_integer_and_sparse_tensors() -> None:
    dense = {k: a.numpy() for k, a in _model_arrays().items()}
    key = next(k for k, v in dense.items() if v.ndim == 4)
    mask = np.random.default_rng(0).random(dense[key].shape) < 0.3
    record = encode_record(dense, {key: mask})  # one tensor travels sparse-encoded (uint8)
    restored = unpack_record(pack_record(record))
    assert list(restored.keys()) == list(record.keys())
    for name in record.keys():
        assert restored[name].numpy().tobytes() == record[name].numpy().tobytes(), name
        assert restored[name].dtype == record[name].dtype and restored[name].shape == record[name].shape
    decoded = decode_record(restored, {k: v.shape for k, v in dense.items()})
    np.testing.assert_array_equal(decoded[key].mask, mask)


def test_packing_turns_hundreds_of_objects_into_a_few() -> None:
    record = _model_arrays()
    objects = lambda r: len(get_all_nested_objects(Message(RecordDict({"arrays": r}), dst_node_id=1,  # noqa: E731
                                                                  message_type="train")))
    assert len(record) > 30 and objects(record) > len(record)  # each tensor is at least one object
    assert objects(pack_record(record)) <= 12  # message, records, two arrays, 5-MiB chunks of the 20 MB


@pytest.mark.parametrize("dtype, relative", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_lower_precisions_round_trip_within_their_rounding_and_leave_integers_alone(dtype: str,
                                                                                   relative: float) -> None:
    record = _model_arrays()
    packed = pack_record(record, dtype)
    restored = unpack_record(packed)
    assert packed[PACKED_KEY].numpy().nbytes < 0.55 * sum(a.numpy().nbytes for a in record.values())
    for name in record.keys():
        sent, got = record[name].numpy(), restored[name].numpy()
        assert got.dtype == sent.dtype and got.shape == sent.shape
        if sent.dtype.kind != "f":
            np.testing.assert_array_equal(got, sent)  # e.g. BatchNorm's num_batches_tracked
            continue
        normal = np.abs(sent) > 1e-4  # float16's subnormals are coarser; everything else within one rounding
        np.testing.assert_allclose(got[normal], sent[normal], rtol=relative, atol=0)
        assert np.abs(got[~normal] - sent[~normal]).max(initial=0.0) <= 1e-6


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials() -> None:
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(values))
    np.testing.assert_array_equal(back[[0, 3, 4, 5, 6]], values[[0, 3, 4, 5, 6]])
    assert back[1] == 1.0 and back[2] == 1.015625  # ties to even: down, and up
    assert np.signbit(back[7]) and np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan], np.float32))))


def _manifest(record: ArrayRecord) -> list[dict]:
    return json.loads(record[MANIFEST_KEY].numpy().tobytes())


def _with_manifest(record: ArrayRecord, entries: list[dict]) -> ArrayRecord:
    blob = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8).copy()
    return ArrayRecord({PACKED_KEY: record[PACKED_KEY], MANIFEST_KEY: Array(blob)})


def test_a_manifest_that_does_not_fit_its_bytes_is_refused_with_the_tensor_named() -> None:
    packed = pack_record(ArrayRecord({"a": Array(np.ones(4, np.float32)), "b": Array(np.ones(2, np.float32))}))
    entries = _manifest(packed)
    entries[1]["shape"] = [3]
    with pytest.raises(PackingError, match="array b"):
        unpack_record(_with_manifest(packed, entries))
    entries = _manifest(packed)
    entries[1]["offset"] = 10_000
    with pytest.raises(PackingError, match="array b"):
        unpack_record(_with_manifest(packed, entries))
    with pytest.raises(PackingError, match="appears twice"):
        unpack_record(_with_manifest(packed, [_manifest(packed)[0]] * 2))
    broken = ArrayRecord({PACKED_KEY: packed[PACKED_KEY], MANIFEST_KEY: Array(np.frombuffer(b"{nope", np.uint8).copy())})
    with pytest.raises(PackingError, match="unreadable manifest"):
        unpack_record(broken)


def test_the_screening_of_a_packed_reply_names_the_bad_tensor() -> None:
    arrays = ArrayRecord({"layer.weight": Array(np.zeros(4, np.float32)), "layer.bias": Array(np.zeros(1, np.float32))})
    strategy = FedPav(min_sites=1)
    (sent,) = strategy.configure_train(1, arrays, ConfigRecord({}), _OneNode())
    bad = {"layer.weight": np.ones(4, np.float32), "layer.bias": np.array([np.nan], np.float32)}
    reply_arrays = pack_record(ArrayRecord({k: Array(v) for k, v in bad.items()}), "bfloat16")
    reply = Message(RecordDict({"arrays": reply_arrays, "metrics": MetricRecord({"num-examples": 5}),
                                "site": ConfigRecord({"name": "mall"})}), reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = 5
    assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert strategy.last_train.rejected["mall"] == "array layer.bias holds non-finite values"


class _OneNode:
    def get_node_ids(self) -> list[int]:
        return [5]


# -- Flower Arrays without np.save / np.load per tensor (strategies/ndarrays.py) ---------------------

NDARRAY_CASES = [np.random.default_rng(0).standard_normal((64, 3, 7, 7)).astype(np.float32), np.array(3.5),
                 np.zeros((0, 4), np.float32), np.arange(10, dtype=np.int64), np.array([True, False]),
                 np.random.default_rng(1).standard_normal(5).astype(np.float16), np.zeros(3, np.uint8)]


@pytest.mark.parametrize("values", NDARRAY_CASES, ids=lambda v: f"{v.dtype}{list(v.shape)}")
def test_to_array_writes_flowers_bytes_and_values_of_reads_them_back(values: np.ndarray) -> None:
    from strategies.ndarrays import to_array, values_of

    ours, flowers = to_array(values), Array(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    for array in (ours, flowers):
        read = values_of(array)
        assert read.dtype == values.dtype and read.shape == values.shape and np.array_equal(read, values)
        assert not read.flags.writeable  # a view of the Array's bytes


def test_values_of_reads_fortran_order_and_refuses_what_np_load_would() -> None:
    from strategies.ndarrays import to_array, values_of

    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    assert np.array_equal(values_of(Array(fortran)), fortran)  # np.save kept Fortran order
    assert np.array_equal(values_of(to_array(fortran)), fortran)  # written in C order
    short = Array(np.arange(8, dtype=np.float32))
    truncated = Array(dtype=short.dtype, shape=short.shape, stype=short.stype, data=short.data[:-4])
    with pytest.raises(ValueError, match="do not hold"):
        values_of(truncated)
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue() + b"\x00" * 8)
    with pytest.raises(ValueError, match="object arrays"):
        values_of(pickled)
